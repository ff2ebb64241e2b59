"""Vision encoders: a small built-in ViT and adapters for open_clip, timm and transformers towers.

Every encoder here maps images ``[N, C, H, W]`` to tokens ``[N, v, width]`` in ``forward`` and
to one pooled vector per image ``[N, pooled_width]`` in ``pooled``; it exposes ``width`` (token
width) and ``pooled_width``. :class:`vlmcore.Flamingo` consumes the tokens,
:class:`vlmcore.CLIP` and :class:`vlmcore.FrozenPrefix` the pooled vector (through
:func:`pooled_features`, which also accepts any other module).

``open_clip``, ``timm`` and ``transformers`` are optional: the adapters take an already built model
and import nothing themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmcore._checks import check_positive_int, check_positive_number


class Attention(nn.Module):
    """Multi-head self-attention, one ``qkv`` projection, ``F.scaled_dot_product_attention`` core.

    ``forward(x [N, T, width]) -> [N, T, width]``; ``causal=True`` masks future positions.
    """

    def __init__(self, width: int, heads: int, *, causal: bool = False):
        super().__init__()
        for name, value in (("width", width), ("heads", heads)):
            check_positive_int(name, value)
        if width % heads != 0:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.proj.in_features:
            raise ValueError(f"x must be [N, T, width={self.proj.in_features}], got shape {tuple(x.shape)}")
        n, t, width = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [N, H, T, Dh]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [N, H, T, Dh]
        return self.proj(out.transpose(1, 2).reshape(n, t, width))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block (CLIP's ``ResidualAttentionBlock``): attention then GELU MLP.

    ``forward(x [N, T, width]) -> [N, T, width]``.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, *, causal: bool = False):
        super().__init__()
        check_positive_number("mlp_ratio", mlp_ratio)
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal=causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    """A small ViT (CLIP layout): patch embedding, CLS token, learned positions, pre-norm blocks.

    Args:
        image_size: side of the square input images (pixels).
        patch_size: side of a patch; must divide ``image_size``.
        width, depth, heads: transformer width, number of blocks, attention heads.
        mlp_ratio: MLP hidden width / width.
        channels: input channels.

    ``forward(images [N, C, H, W]) -> [N, 1 + num_patches, width]`` (CLS first, after the final
    LayerNorm); ``pooled(images) -> [N, width]`` (the CLS token). ``num_tokens = 1 + num_patches``.
    """

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0, channels: int = 3):
        super().__init__()
        for name, value in (("image_size", image_size), ("patch_size", patch_size), ("width", width),
                            ("depth", depth), ("heads", heads), ("channels", channels)):
            check_positive_int(name, value)
        if image_size % patch_size != 0:
            raise ValueError(f"patch_size ({patch_size}) must divide image_size ({image_size})")
        self.image_size = image_size
        self.patch_size = patch_size
        self.channels = channels
        self.width = width
        self.pooled_width = width
        self.num_patches = (image_size // patch_size) ** 2
        self.num_tokens = 1 + self.num_patches
        self.conv1 = nn.Conv2d(channels, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(self.num_tokens, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.ln_post = nn.LayerNorm(width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be [N, C, H, W] with (C, H, W) = {expected}, got {got}")
        x = self.conv1(images.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [N, P, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [N, 1 + P, width]
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The CLS token of :meth:`forward`, ``[N, width]``."""
        return self.forward(images)[:, 0]


class OpenCLIPVisionAdapter(nn.Module):
    """Wrap an ``open_clip`` visual tower (``model.visual`` of a ViT model).

    ``forward`` returns the patch tokens (``visual.output_tokens = True``, as OpenFlamingo does),
    ``[N, P, width]``; ``pooled`` the tower's pooled, projected embedding ``[N, output_dim]``.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        if not hasattr(visual, "output_tokens"):
            raise TypeError("visual must be an open_clip VisionTransformer (it has no 'output_tokens' attribute)")
        self.visual = visual
        self.visual.output_tokens = True
        self.width = int(visual.transformer.width)
        self.pooled_width = int(visual.output_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)[1]

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)[0]


class TimmViTAdapter(nn.Module):
    """Wrap a ``timm`` ViT (built with ``num_classes=0`` or not; the head is never used).

    ``forward`` returns ``model.forward_features(images)`` (prefix + patch tokens after the final
    norm), ``[N, v, embed_dim]``; ``pooled`` the pre-logits pooled vector ``[N, embed_dim]``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise TypeError("model must be a timm model with forward_features and forward_head")
        self.model = model
        self.width = int(getattr(model, "embed_dim", getattr(model, "num_features", 0)))
        self.pooled_width = int(getattr(model, "num_features", self.width))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


class HFVisionAdapter(nn.Module):
    """Wrap a transformers ``CLIPVisionModel`` or ``SiglipVisionModel`` (or any vision model whose
    output has ``last_hidden_state`` and ``pooler_output``).

    ``forward`` returns ``last_hidden_state`` ``[N, v, hidden_size]`` (CLIP: CLS + patches; SigLIP:
    patches); ``pooled`` returns ``pooler_output`` ``[N, hidden_size]``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        config = getattr(model, "config", None)
        hidden = getattr(getattr(config, "vision_config", config), "hidden_size", None)
        if hidden is None:
            raise TypeError("model must be a transformers vision model with config.hidden_size")
        self.model = model
        self.width = int(hidden)
        self.pooled_width = int(hidden)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).last_hidden_state

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).pooler_output


def vision_width(encoder: nn.Module, *, pooled: bool = False) -> int:
    """The token width (or, with ``pooled=True``, the pooled width) an encoder declares.

    Raises ``ValueError`` when the module declares neither ``width`` nor ``pooled_width``.
    """
    names = ("pooled_width", "width") if pooled else ("width",)
    for name in names:
        value = getattr(encoder, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(
        f"cannot tell the output width of {type(encoder).__name__}: give it a 'width' attribute "
        "(or pass the width explicitly), or wrap it in one of the vlmcore.vision adapters"
    )


def pooled_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """One vector per image ``[N, D]`` from any encoder.

    Uses ``encoder.pooled`` when it exists (the built-in ViT and the adapters); otherwise calls
    the encoder and keeps a 2-D output as is, or averages the tokens of a ``[N, v, D]`` output.
    """
    if hasattr(encoder, "pooled"):
        return encoder.pooled(images)
    out = encoder(images)
    if out.dim() == 2:
        return out
    if out.dim() == 3:
        return out.mean(dim=1)
    raise ValueError(f"{type(encoder).__name__} returned shape {tuple(out.shape)}; expected [N, D] or [N, v, D]")
