"""Resampler attention: latents attend to [media tokens; latents] without building the concat.

Public op: :func:`resampler_attention` (Perceiver Resampler; Q-Former cross-attention when the
latent keys are None). (The fused Triton kernel is being added in this file; until then every
backend runs the reference.)
"""

from __future__ import annotations

import torch

from ._backend import use_triton  # noqa: F401  (used once the Triton path lands)
from ._checks import check_float_tensor, check_same, check_softmax_scale
from .reference import resampler_attention_reference


def _validate(q, k_media, v_media, k_latents, v_latents, media_mask, softmax_scale) -> float:
    check_float_tensor("q", q, 4)
    check_float_tensor("k_media", k_media, 4)
    check_float_tensor("v_media", v_media, 4)
    check_same("k_media", k_media, "q", q)
    check_same("v_media", v_media, "q", q)
    batch, num_latents, heads, head_dim = q.shape
    if k_media.shape != v_media.shape:
        raise ValueError(f"k_media and v_media must have the same shape, got {tuple(k_media.shape)} and {tuple(v_media.shape)}")
    if k_media.shape[0] != batch or k_media.shape[2:] != (heads, head_dim):
        raise ValueError(f"k_media must be [B, S, H, Dh] with B={batch}, H={heads}, Dh={head_dim}, got {tuple(k_media.shape)}")
    if k_media.shape[1] < 1:
        raise ValueError("k_media must have at least one media token (S >= 1)")
    if (k_latents is None) != (v_latents is None):
        raise ValueError("k_latents and v_latents must both be tensors or both be None")
    if k_latents is not None:
        check_float_tensor("k_latents", k_latents, 4)
        check_float_tensor("v_latents", v_latents, 4)
        check_same("k_latents", k_latents, "q", q)
        check_same("v_latents", v_latents, "q", q)
        for name, t in (("k_latents", k_latents), ("v_latents", v_latents)):
            if t.shape != q.shape:
                raise ValueError(f"{name} must have q's shape [B, R, H, Dh] = {tuple(q.shape)}, got {tuple(t.shape)}")
    if media_mask is not None:
        if not isinstance(media_mask, torch.Tensor) or media_mask.dtype != torch.bool:
            raise TypeError("media_mask must be a bool tensor [B, S] (True = attend)")
        if tuple(media_mask.shape) != (batch, k_media.shape[1]):
            raise ValueError(f"media_mask must have shape [B, S] = {(batch, k_media.shape[1])}, got {tuple(media_mask.shape)}")
        if media_mask.device != q.device:
            raise ValueError(f"media_mask is on {media_mask.device} but q is on {q.device}")
    return check_softmax_scale(softmax_scale, head_dim)


def resampler_attention(
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor | None = None,
    v_latents: torch.Tensor | None = None,
    *,
    media_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q [k_media; k_latents]^T * scale) [v_media; v_latents]`` without the concat.

    Args:
        q: ``[B, R, H, Dh]`` latent queries (B = samples x images).
        k_media, v_media: ``[B, S, H, Dh]`` media keys/values.
        k_latents, v_latents: ``[B, R, H, Dh]`` latent keys/values, or None (Q-Former form).
        media_mask: optional bool ``[B, S]``; False = padding token, not attended. A query with
            nothing to attend gets zeros.
        softmax_scale: default ``Dh ** -0.5``.

    Returns:
        ``[B, R, H, Dh]`` in q's dtype.
    """
    scale = _validate(q, k_media, v_media, k_latents, v_latents, media_mask, softmax_scale)
    return resampler_attention_reference(
        q, k_media, v_media, k_latents, v_latents, media_mask=media_mask, softmax_scale=scale
    )
