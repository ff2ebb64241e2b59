"""Flamingo's Perceiver Resampler: a variable number of visual tokens -> a fixed number of latents.

OpenFlamingo's semantics and parameter names (``latents``, ``frame_embs``, ``media_time_embs``,
``layers``, ``norm``; per layer ``norm_media``, ``norm_latents``, ``to_q``, ``to_kv``, ``to_out``
and a feed-forward), so its weights load by name. The attention is the fused op
:func:`vlmcore.kernels.resampler_attention`, which reads media and latent keys without building
their concatenation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmcore._checks import check_positive_int
from vlmcore.cross_attention import feed_forward
from vlmcore.kernels import resampler_attention


class PerceiverAttention(nn.Module):
    """Latents attend to ``[media tokens; latents]`` (one ``to_kv`` projection for both).

    Args:
        dim: width of media tokens and latents.
        dim_head, heads: head size and count.

    ``forward(x [B, T, S, dim], latents [B, T, R, dim], media_mask=None) -> [B, T, R, dim]``;
    ``media_mask``: optional bool ``[B, T, S]``, False = padding token (not attended).
    ``to_kv`` is linear, so projecting media and latents separately equals projecting the concat.
    """

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        for name, value in (("dim", dim), ("dim_head", dim_head), ("heads", heads)):
            check_positive_int(name, value)
        inner = dim_head * heads
        self.dim = dim
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, N, 2*inner]`` -> k, v views ``[B*T, N, H, Dh]``."""
        b, tm, n, _ = t.shape
        return t.view(b * tm, n, 2, self.heads, self.dim_head).unbind(2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, media_mask: torch.Tensor | None = None) -> torch.Tensor:
        if (x.dim() != 4 or latents.dim() != 4 or x.shape[:2] != latents.shape[:2]
                or x.shape[-1] != self.dim or latents.shape[-1] != self.dim):
            raise ValueError(
                f"x must be [B, T, S, dim] and latents [B, T, R, dim] with the same B, T and dim={self.dim}; got "
                f"{tuple(x.shape)} and {tuple(latents.shape)}"
            )
        batch, num_media, num_latents, _ = latents.shape
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        q = self.to_q(latents).view(batch * num_media, num_latents, self.heads, self.dim_head)  # [B*T, R, H, Dh]
        k_media, v_media = self._heads(self.to_kv(x))  # [B*T, S, H, Dh]
        k_latents, v_latents = self._heads(self.to_kv(latents))  # [B*T, R, H, Dh]
        mask = None
        if media_mask is not None:
            if tuple(media_mask.shape) != tuple(x.shape[:3]):
                raise ValueError(f"media_mask must be [B, T, S] = {tuple(x.shape[:3])}, got {tuple(media_mask.shape)}")
            mask = media_mask.reshape(batch * num_media, x.shape[2])
        out = resampler_attention(q, k_media, v_media, k_latents, v_latents, media_mask=mask, softmax_scale=self.scale)
        return self.to_out(out.reshape(batch, num_media, num_latents, self.heads * self.dim_head))


class PerceiverResampler(nn.Module):
    """OpenFlamingo's Perceiver Resampler.

    Args:
        dim: visual token width.
        depth: number of (attention, feed-forward) layers.
        dim_head, heads: attention head size and count.
        num_latents: R, output tokens per media.
        max_num_media: size of the learned media-time embedding (None: no such embedding).
        max_num_frames: size of the learned frame embedding (None: no such embedding).
        ff_mult: feed-forward expansion.
        gradient_checkpointing: recompute each layer in backward (also settable later as the
            attribute of the same name).

    ``forward(x [B, T, F, v, dim], media_mask=None) -> [B, T, num_latents, dim]`` (T media, F frames,
    v tokens per frame); ``media_mask``: optional bool ``[B, T, F*v]``, False = padding token.
    """

    def __init__(self, dim: int, depth: int = 6, dim_head: int = 64, heads: int = 8, num_latents: int = 64,
                 max_num_media: int | None = None, max_num_frames: int | None = None, ff_mult: int = 4,
                 gradient_checkpointing: bool = False):
        super().__init__()
        for name, value in (("dim", dim), ("depth", depth), ("num_latents", num_latents)):
            check_positive_int(name, value)
        for name, value in (("max_num_media", max_num_media), ("max_num_frames", max_num_frames)):
            if value is not None:
                check_positive_int(name, value)
        self.dim = dim
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embs = nn.Parameter(torch.randn(max_num_frames, dim)) if max_num_frames is not None else None
        self.media_time_embs = nn.Parameter(torch.randn(max_num_media, 1, dim)) if max_num_media is not None else None
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.num_latents = num_latents
        self.gradient_checkpointing = gradient_checkpointing

    @staticmethod
    def _layer(attn: nn.Module, ff: nn.Module, x: torch.Tensor, latents: torch.Tensor,
               media_mask: torch.Tensor | None) -> torch.Tensor:
        latents = attn(x, latents, media_mask) + latents
        return ff(latents) + latents

    def forward(self, x: torch.Tensor, media_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor [B, T, F, v, dim], got {type(x).__name__}")
        if x.dim() != 5 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, F, v, dim] with dim={self.dim}, got shape {tuple(x.shape)}")
        batch, num_media, num_frames, tokens, dim = x.shape
        if media_mask is not None and tuple(media_mask.shape) != (batch, num_media, num_frames * tokens):
            raise ValueError(f"media_mask must be [B, T, F*v] = {(batch, num_media, num_frames * tokens)}, "
                             f"got {tuple(media_mask.shape)}")
        if self.frame_embs is not None:
            if num_frames > self.frame_embs.shape[0]:
                raise ValueError(f"x has {num_frames} frames but max_num_frames is {self.frame_embs.shape[0]}")
            x = x + self.frame_embs[:num_frames, None].to(x.dtype)  # [F, 1, dim] over [B, T, F, v, dim]
        x = x.reshape(batch, num_media, num_frames * tokens, dim)  # [B, T, F*v, dim]
        if self.media_time_embs is not None:
            if num_media > self.media_time_embs.shape[0]:
                raise ValueError(f"x has {num_media} media but max_num_media is {self.media_time_embs.shape[0]}")
            x = x + self.media_time_embs[:num_media].to(x.dtype)  # [T, 1, dim]
        latents = self.latents.to(x.dtype).expand(batch, num_media, -1, -1)  # [B, T, R, dim]
        for attn, ff in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                latents = checkpoint(self._layer, attn, ff, x, latents, media_mask, use_reentrant=False)
            else:
                latents = self._layer(attn, ff, x, latents, media_mask)
        return self.norm(latents)
