"""Flamingo's gated cross-attention: text tokens attend to the visual tokens of their image.

:class:`MaskedCrossAttention` and :class:`GatedCrossAttentionBlock` use OpenFlamingo's
parameter names (``norm``, ``to_q``, ``to_kv``, ``to_out``; ``attn``, ``attn_gate``, ``ff``,
``ff_gate``), so OpenFlamingo weights load by name. The attention itself is the fused op
:func:`vlmcore.kernels.masked_cross_attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmcore._checks import check_positive_int, check_positive_number
from vlmcore.kernels import masked_cross_attention, media_index_from_locations


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """OpenFlamingo's FeedForward: LayerNorm, Linear(dim, mult*dim, no bias), GELU, Linear(mult*dim, dim, no bias)."""
    check_positive_int("dim", dim)
    check_positive_number("ff_mult", mult)
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


def check_media_index(media_index: torch.Tensor, num_media: int, *, name: str = "media_index") -> None:
    """Raise ``ValueError`` unless every entry of ``media_index`` lies in ``[-1, num_media)``.

    One device-to-host sync; call it once per batch, not once per layer.
    """
    if media_index.numel() == 0:
        return
    low, high = int(media_index.min()), int(media_index.max())
    if low < -1 or high >= num_media:
        raise ValueError(
            f"{name} must lie in [-1, {num_media}) (-1 = no image yet; {num_media} images given), "
            f"got values in [{low}, {high}]: the text references more images than were passed"
        )


def resolve_media_index(
    media: torch.Tensor,
    text_length: int,
    media_locations: torch.Tensor | None,
    media_index: torch.Tensor | None,
    use_cached_media: bool,
) -> torch.Tensor:
    """The ``[B, L]`` image index of each text token from the forms the modules accept.

    ``media_index`` wins; else it comes from ``media_locations`` (``use_cached_media``: every token
    attends the last image of its sample); with neither, every token attends the last image given.
    """
    if media_index is not None:
        return media_index
    if media_locations is not None:
        return media_index_from_locations(media_locations, use_cached_media=use_cached_media)
    batch, num_media = media.shape[:2]
    return torch.full((batch, text_length), num_media - 1, dtype=torch.int64, device=media.device)


class MaskedCrossAttention(nn.Module):
    """Cross-attention from text tokens to the visual tokens of the image each token belongs to.

    Args:
        dim: text (LM hidden) width.
        dim_visual: width of the visual tokens.
        dim_head, heads: attention head size and count (inner width ``dim_head * heads``).
        only_attend_immediate_media: True (Flamingo): a token attends only the last image at or
            before it; False: every image at or before it. Tokens before the first image get zero.

    ``forward(x [B, L, dim], media [B, M, R, dim_visual], media_locations=None, media_index=None,
    use_cached_media=False) -> [B, L, dim]``. ``media_locations``: bool ``[B, L]``, True at image
    tokens; ``media_index``: int ``[B, L]``, the image each token attends (see
    :func:`vlmcore.kernels.media_index_from_locations`), validated to lie in ``[-1, M)``
    (``ValueError``) unless ``validate_index=False`` (callers that validated once per batch).
    With neither, every token attends the last image.
    """

    def __init__(self, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8,
                 only_attend_immediate_media: bool = True):
        super().__init__()
        for name, value in (("dim", dim), ("dim_visual", dim_visual), ("dim_head", dim_head), ("heads", heads)):
            check_positive_int(name, value)
        inner = dim_head * heads
        self.dim = dim
        self.dim_visual = dim_visual
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.only_attend_immediate_media = only_attend_immediate_media
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        media: torch.Tensor,
        media_locations: torch.Tensor | None = None,
        media_index: torch.Tensor | None = None,
        use_cached_media: bool = False,
        *,
        validate_index: bool = True,
    ) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not isinstance(media, torch.Tensor):
            raise TypeError(f"x and media must be torch.Tensors, got {type(x).__name__} and {type(media).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, L, dim] with dim={self.dim}, got shape {tuple(x.shape)}")
        if media.dim() != 4 or media.shape[0] != x.shape[0] or media.shape[-1] != self.dim_visual:
            raise ValueError(f"media must be [B, M, R, dim_visual] with B={x.shape[0]}, dim_visual={self.dim_visual}, "
                             f"got shape {tuple(media.shape)}")
        batch, length, _ = x.shape
        if media_index is None and media_locations is not None:
            if not isinstance(media_locations, torch.Tensor) or media_locations.dtype.is_floating_point:
                got = (media_locations.dtype if isinstance(media_locations, torch.Tensor)
                       else type(media_locations).__name__)
                raise TypeError(f"media_locations must be a bool tensor [B, L], got {got}")
            if tuple(media_locations.shape) != (batch, length):
                raise ValueError(f"media_locations must be [B, L] = {(batch, length)} (the first two dims of x), "
                                 f"got {tuple(media_locations.shape)}")
        num_media, tokens_per_media = media.shape[1:3]
        index = resolve_media_index(media, length, media_locations, media_index, use_cached_media)
        if validate_index and (media_index is not None or media_locations is not None):
            check_media_index(index, num_media)
        q = self.to_q(self.norm(x)).view(batch, length, self.heads, self.dim_head)  # [B, L, H, Dh]
        media = media.reshape(batch, num_media * tokens_per_media, -1).to(self.to_kv.weight.dtype)
        kv = self.to_kv(media)  # [B, M*R, 2*inner]
        k, v = kv.view(batch, num_media * tokens_per_media, 2, self.heads, self.dim_head).unbind(2)
        mode = "immediate" if self.only_attend_immediate_media else "all_previous"
        out = masked_cross_attention(q, k, v, index, tokens_per_media, mode=mode, softmax_scale=self.scale)
        return self.to_out(out.reshape(batch, length, self.heads * self.dim_head))


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's tanh-gated cross-attention + feed-forward block, the identity at init.

    ``x = attn(x, media) * tanh(attn_gate) + x; x = ff(x) * tanh(ff_gate) + x`` with both gates
    (shape ``[1]``, as in OpenFlamingo) initialized to 0. Arguments as
    :class:`MaskedCrossAttention`, plus ``ff_mult`` (feed-forward expansion).

    ``forward(x [B, L, dim], media [B, M, R, dim_visual], media_locations=None, media_index=None,
    use_cached_media=False) -> [B, L, dim]``.
    """

    def __init__(self, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8, ff_mult: int = 4,
                 only_attend_immediate_media: bool = True):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, dim_head=dim_head, heads=heads,
                                         only_attend_immediate_media=only_attend_immediate_media)
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))
        self.ff = feed_forward(dim, mult=ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))

    def forward(
        self,
        x: torch.Tensor,
        media: torch.Tensor,
        media_locations: torch.Tensor | None = None,
        media_index: torch.Tensor | None = None,
        use_cached_media: bool = False,
        *,
        validate_index: bool = True,
    ) -> torch.Tensor:
        attended = self.attn(x, media, media_locations, media_index, use_cached_media, validate_index=validate_index)
        x = attended * self.attn_gate.tanh().to(x.dtype) + x
        return self.ff(x) * self.ff_gate.tanh().to(x.dtype) + x
