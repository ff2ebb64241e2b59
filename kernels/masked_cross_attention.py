"""Flamingo masked per-image cross-attention: a text token attends only to its image's visual tokens.

Public op: :func:`masked_cross_attention`. Helper: :func:`media_index_from_locations`.
(The block-sparse Triton kernel is being added in this file; until then every backend runs the
reference.)
"""

from __future__ import annotations

import torch

from ._backend import use_triton  # noqa: F401  (used once the Triton path lands)
from ._checks import check_float_tensor, check_same, check_softmax_scale
from .reference import masked_cross_attention_reference

MODES = ("immediate", "all_previous")


def media_index_from_locations(media_locations: torch.Tensor, *, use_cached_media: bool = False) -> torch.Tensor:
    """Index of the last image at or before each text position.

    Args:
        media_locations: bool ``[B, L]``, True at image (``<image>``) tokens.
        use_cached_media: generation with cached media (OpenFlamingo ``use_cached_media``): every
            token attends to the LAST image of its sample, wherever it stands.

    Returns:
        int64 ``[B, L]``: ``cumsum(media_locations) - 1`` (the image token belongs to its own image,
        tokens before the first image get -1); with ``use_cached_media``, ``num_images - 1`` everywhere.
    """
    if not isinstance(media_locations, torch.Tensor) or media_locations.dim() != 2:
        raise ValueError(
            f"media_locations must be a 2-D [B, L] tensor, got "
            f"{tuple(media_locations.shape) if isinstance(media_locations, torch.Tensor) else type(media_locations).__name__}"
        )
    counts = media_locations.to(torch.int64).cumsum(dim=1)
    if use_cached_media:
        return (counts[:, -1:] - 1).expand_as(counts).contiguous()
    return counts - 1


def _validate(q, k, v, media_index, tokens_per_media, mode, softmax_scale) -> float:
    check_float_tensor("q", q, 4)
    check_float_tensor("k", k, 4)
    check_float_tensor("v", v, 4)
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    batch, length, heads, head_dim = q.shape
    if isinstance(tokens_per_media, bool) or not isinstance(tokens_per_media, int) or tokens_per_media < 1:
        raise ValueError(f"tokens_per_media must be a positive int, got {tokens_per_media!r}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[2] != heads or k.shape[3] != head_dim:
        raise ValueError(
            f"k must be [B, M*R, H, Dh] with B={batch}, H={heads}, Dh={head_dim} from q, got {tuple(k.shape)}"
        )
    if k.shape[1] % tokens_per_media != 0:
        raise ValueError(
            f"k has {k.shape[1]} media tokens, not a multiple of tokens_per_media={tokens_per_media}"
        )
    if not isinstance(media_index, torch.Tensor) or media_index.dtype.is_floating_point or media_index.dtype == torch.bool:
        raise TypeError("media_index must be an integer tensor [B, L]")
    if tuple(media_index.shape) != (batch, length):
        raise ValueError(f"media_index must have shape [B, L] = {(batch, length)}, got {tuple(media_index.shape)}")
    if media_index.device != q.device:
        raise ValueError(f"media_index is on {media_index.device} but q is on {q.device}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return check_softmax_scale(softmax_scale, head_dim)


def masked_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    media_index: torch.Tensor,
    tokens_per_media: int,
    *,
    mode: str = "immediate",
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Masked per-image cross-attention (Flamingo).

    Args:
        q: ``[B, L, H, Dh]`` text queries.
        k, v: ``[B, M*R, H, Dh]`` media keys/values, media-major: image j owns rows j*R .. j*R+R-1.
        media_index: integer ``[B, L]``, last image at or before each position, -1 for none
            (see :func:`media_index_from_locations`). Indices outside ``[-1, M)`` select nothing.
        tokens_per_media: R, visual tokens per image.
        mode: ``"immediate"`` (Flamingo; attend image ``media_index`` only) or ``"all_previous"``
            (images ``0 .. media_index``). Tokens with index -1 get exactly zero in both modes
            (OpenFlamingo's ``all_previous`` lets them attend everything uniformly; we do not).
        softmax_scale: default ``Dh ** -0.5``.

    Returns:
        ``[B, L, H, Dh]`` in q's dtype.
    """
    scale = _validate(q, k, v, media_index, tokens_per_media, mode, softmax_scale)
    return masked_cross_attention_reference(
        q, k, v, media_index, tokens_per_media, mode=mode, softmax_scale=scale
    )
