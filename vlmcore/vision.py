"""Vision encoders: a small built-in ViT and adapters for open_clip, timm and transformers towers.

Every encoder here maps images ``[N, C, H, W]`` to tokens ``[N, v, width]`` in ``forward`` and
to one pooled vector per image ``[N, pooled_width]`` in ``pooled``; it exposes ``width`` (token
width) and ``pooled_width``. :class:`vlmcore.Flamingo` consumes the tokens,
:class:`vlmcore.CLIP` and :class:`vlmcore.FrozenPrefix` the pooled vector (through
:func:`pooled_features`, which also accepts any other module).

``open_clip``, ``timm`` and ``transformers`` are optional: the adapters take an already built model
and import nothing themselves. They never change the wrapped module (no flag is set on it), so the
user's own ``encode_image`` / ``forward`` keep working.

Token policy, the same for every adapter: ``prefix_tokens="drop"`` (default; OpenFlamingo's
convention: patch tokens only, e.g. 49 for a ViT-B/32 at 224 px) or ``"keep"`` (the CLS /
register tokens first, then the patches: 50). Towers without prefix tokens (SigLIP, convnext /
resnet feature maps) return the same tokens either way. Spatial feature maps ``[N, C, h, w]``
become tokens ``[N, h*w, C]`` (row-major).
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


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation ``x * sigmoid(1.702 x)`` (its ViT-B/32, ViT-L/14 ... were trained with it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _tanh_gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")


#: MLP activations by name: exact GELU, OpenAI CLIP's QuickGELU, SigLIP's tanh-approximated GELU.
ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU, "gelu_tanh": _tanh_gelu}
VISION_POOLS = ("cls", "map")
PREFIX_TOKEN_POLICIES = ("drop", "keep")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


class TransformerBlock(nn.Module):
    """Pre-norm transformer block (CLIP's ``ResidualAttentionBlock``): attention then an MLP.

    ``act``: the MLP activation, ``"gelu"`` (exact), ``"quick_gelu"`` (OpenAI CLIP) or
    ``"gelu_tanh"`` (SigLIP). It has no parameters, so the state-dict names are the same for all.
    ``norm_eps``: the LayerNorms' epsilon (CLIP 1e-5, SigLIP 1e-6).
    ``forward(x [N, T, width]) -> [N, T, width]``.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, *, causal: bool = False, act: str = "gelu",
                 norm_eps: float = 1e-5):
        super().__init__()
        check_positive_number("mlp_ratio", mlp_ratio)
        check_positive_number("norm_eps", norm_eps)
        _check_choice("act", act, tuple(ACTIVATIONS))
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads, causal=causal)
        self.ln_2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), ACTIVATIONS[act](), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class AttentionPool(nn.Module):
    """Multi-head attention pooling (SigLIP's "MAP" head): one learned query attends over the tokens,
    then a pre-norm residual MLP.

    ``forward(tokens [N, T, width]) -> [N, width]``.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, *, act: str = "gelu", norm_eps: float = 1e-5):
        super().__init__()
        for name, value in (("width", width), ("heads", heads)):
            check_positive_int(name, value)
        if width % heads != 0:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        _check_choice("act", act, tuple(ACTIVATIONS))
        self.heads = heads
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.qkv = nn.Linear(width, 3 * width)  # fused as in Attention (and SigLIP's checkpoints)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), ACTIVATIONS[act](), nn.Linear(hidden, width))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, t, width = tokens.shape
        dh = width // self.heads
        weight, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(self.probe.to(tokens.dtype), weight[:width], bias[:width])  # the query: the probe only
        q = q.view(1, self.heads, 1, dh).expand(n, -1, -1, -1)  # [N, H, 1, Dh]
        kv = F.linear(tokens, weight[width:], bias[width:])  # [N, T, 2 * width]
        k, v = kv.view(n, t, 2, self.heads, dh).permute(2, 0, 3, 1, 4)  # 2 x [N, H, T, Dh]
        x = self.proj(F.scaled_dot_product_attention(q, k, v).reshape(n, width))  # [N, width]
        return x + self.mlp(self.norm(x))


class VisionTransformer(nn.Module):
    """A ViT: patch embedding, learned positions, pre-norm blocks; CLIP's layout by default.

    Args:
        image_size: side of the square input images (pixels).
        patch_size: side of a patch; must divide ``image_size``.
        width, depth, heads: transformer width, number of blocks, attention heads.
        mlp_ratio: MLP hidden width / width.
        channels: input channels.
        act: MLP activation (see :class:`TransformerBlock`; OpenAI CLIP weights need ``"quick_gelu"``,
            SigLIP ``"gelu_tanh"``).
        class_token: prepend a learned CLS token (CLIP); SigLIP has none.
        patch_bias: the patch embedding has a bias (SigLIP; CLIP's has none).
        pre_norm: a LayerNorm ``ln_pre`` before the blocks (CLIP); SigLIP has none.
        pool: what :meth:`pooled` returns: ``"cls"`` (the CLS token, needs ``class_token``) or ``"map"``
            (an :class:`AttentionPool` head over all tokens, SigLIP).
        norm_eps: the LayerNorms' epsilon.

    ``forward(images [N, C, H, W]) -> [N, num_tokens, width]`` (CLS first when there is one, after
    the final LayerNorm); ``pooled(images) -> [N, width]``. ``num_tokens = class_token + num_patches``.
    """

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0, channels: int = 3, act: str = "gelu", *, class_token: bool = True,
                 patch_bias: bool = False, pre_norm: bool = True, pool: str = "cls", norm_eps: float = 1e-5):
        super().__init__()
        for name, value in (("image_size", image_size), ("patch_size", patch_size), ("width", width),
                            ("depth", depth), ("heads", heads), ("channels", channels)):
            check_positive_int(name, value)
        if image_size % patch_size != 0:
            raise ValueError(f"patch_size ({patch_size}) must divide image_size ({image_size})")
        _check_choice("pool", pool, VISION_POOLS)
        if pool == "cls" and not class_token:
            raise ValueError("pool='cls' needs class_token=True (use pool='map' for a tower without a CLS token)")
        self.image_size = image_size
        self.patch_size = patch_size
        self.channels = channels
        self.width = width
        self.pooled_width = width
        self.num_patches = (image_size // patch_size) ** 2
        self.num_tokens = int(class_token) + self.num_patches
        self.conv1 = nn.Conv2d(channels, width, kernel_size=patch_size, stride=patch_size, bias=patch_bias)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5) if class_token else None
        self.positional_embedding = nn.Parameter(torch.randn(self.num_tokens, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width, eps=norm_eps) if pre_norm else nn.Identity()
        self.act = act
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio, act=act, norm_eps=norm_eps)
                                    for _ in range(depth))
        self.ln_post = nn.LayerNorm(width, eps=norm_eps)
        self.norm_eps = norm_eps
        self.pool = pool
        self.head = AttentionPool(width, heads, mlp_ratio, act=act, norm_eps=norm_eps) if pool == "map" else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be [N, C, H, W] with (C, H, W) = {expected}, got {got}")
        x = self.conv1(images.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [N, P, width]
        if self.class_embedding is not None:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # [N, 1 + P, width]
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The CLS token of :meth:`forward` (``pool="cls"``) or its attention pool (``"map"``), ``[N, width]``."""
        tokens = self.forward(images)
        return self.head(tokens) if self.head is not None else tokens[:, 0]


def _spatial_to_tokens(features: torch.Tensor, channels: int, where: str) -> torch.Tensor:
    """``[N, C, h, w]`` (or channels-last ``[N, h, w, C]``) -> ``[N, h*w, C]``; 3-D passes through."""
    if features.dim() == 3:
        return features
    if features.dim() == 4:
        if features.shape[1] == channels:
            return features.flatten(2).transpose(1, 2)
        if features.shape[-1] == channels:
            return features.flatten(1, 2)
    raise ValueError(f"{where} returned shape {tuple(features.shape)}; expected tokens [N, T, {channels}] or a "
                     f"feature map [N, {channels}, h, w]")


class OpenCLIPVisionAdapter(nn.Module):
    """Wrap an ``open_clip`` ViT visual tower (``model.visual``; also CoCa's attentional-pooling towers).

    Args:
        visual: an ``open_clip.transformer.VisionTransformer``. It is not modified: the adapter runs
            the tower's own stages (``_embeds``, ``transformer``, ``_pool``, ``proj``), the same code
            as its ``forward``, and never sets ``output_tokens``.
        prefix_tokens: ``"drop"`` (default): the tokens open_clip returns with ``output_tokens``
            (patches, or the attentional pooler's query outputs after the first). ``"keep"``: the
            whole sequence before open_clip splits off the pooled token (CLS first).

    ``forward(images [N, 3, H, W]) -> [N, v, width]``; ``pooled(images) -> [N, output_dim]`` equals
    the tower's own ``forward`` (= ``encode_image`` without normalization). ``width`` is
    ``transformer.width``, or ``output_dim`` when an attentional pooler makes the tokens (CoCa).
    """

    def __init__(self, visual: nn.Module, *, prefix_tokens: str = "drop"):
        super().__init__()
        _check_choice("prefix_tokens", prefix_tokens, PREFIX_TOKEN_POLICIES)
        needed = ("_embeds", "transformer", "_pool", "output_dim")
        if not all(hasattr(visual, name) for name in needed):
            raise TypeError(f"visual must be an open_clip VisionTransformer (with {', '.join(needed)}); got "
                            f"{type(visual).__name__}. For open_clip's timm towers wrap visual.trunk in "
                            "TimmViTAdapter; ModifiedResNet (RN50 ...) towers are not supported")
        attn_pool = getattr(visual, "attn_pool", None)
        if prefix_tokens == "keep" and getattr(visual, "attn_pool_contrastive", None) is not None:
            raise ValueError("prefix_tokens='keep': this tower's tokens come from an attentional pooler with no "
                             "prefix token (attn_pool_type parallel/cascade); use 'drop'")
        self.visual = visual
        self.prefix_tokens = prefix_tokens
        self.width = int(visual.output_dim if attn_pool is not None else visual.transformer.width)
        self.pooled_width = int(visual.output_dim)

    def _trunk(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual.transformer(self.visual._embeds(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._trunk(images)
        if self.prefix_tokens == "drop":
            return self.visual._pool(x)[1]
        # The sequence that open_clip's _global_pool splits into (pooled, tokens).
        visual = self.visual
        if visual.attn_pool is not None:
            return visual.ln_post(visual.attn_pool(x))
        return x if visual.final_ln_after_pool else visual.ln_post(x)

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.visual._pool(self._trunk(images))[0]
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled


class TimmViTAdapter(nn.Module):
    """Wrap a ``timm`` model: ViTs (CLS / register prefix tokens) and CNNs (convnext, resnet ...).

    Args:
        model: a timm model (built with ``num_classes=0`` or not; the classifier is never used).
            It is not modified.
        prefix_tokens: ``"drop"`` (default) removes the ``model.num_prefix_tokens`` CLS / register
            tokens; ``"keep"`` returns them first. CNN feature maps have none.

    ``forward`` returns ``model.forward_features(images)`` as tokens ``[N, v, num_features]``
    (a feature map ``[N, C, h, w]`` becomes ``[N, h*w, C]``); ``pooled`` the pre-logits pooled
    vector ``model.forward_head(features, pre_logits=True)`` ``[N, num_features]``.
    """

    def __init__(self, model: nn.Module, *, prefix_tokens: str = "drop"):
        super().__init__()
        _check_choice("prefix_tokens", prefix_tokens, PREFIX_TOKEN_POLICIES)
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise TypeError("model must be a timm model with forward_features and forward_head")
        self.model = model
        self.prefix_tokens = prefix_tokens
        self.width = int(getattr(model, "num_features", 0) or getattr(model, "embed_dim", 0))
        if self.width <= 0:
            raise TypeError(f"cannot tell the feature width of timm model {type(model).__name__} (no num_features)")
        self.pooled_width = int(getattr(model, "head_hidden_size", None) or self.width)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = _spatial_to_tokens(self.model.forward_features(images), self.width,
                                    f"{type(self.model).__name__}.forward_features")
        if self.prefix_tokens == "drop" and self.num_prefix_tokens:
            tokens = tokens[:, self.num_prefix_tokens:]
        return tokens

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


class HFVisionAdapter(nn.Module):
    """Wrap a transformers ``CLIPVisionModel`` or ``SiglipVisionModel`` (or any vision model whose
    output has ``last_hidden_state`` and ``pooler_output`` and whose config has ``hidden_size``).

    Args:
        model: the vision model (not modified).
        prefix_tokens: ``"drop"`` (default) removes the tokens before the patches (CLIP's CLS; SigLIP
            has none); ``"keep"`` returns ``last_hidden_state`` as is. The number of prefix tokens is
            ``sequence length - (image_size / patch_size)^2``.

    ``forward`` -> ``[N, v, hidden_size]``; ``pooled`` returns ``pooler_output`` ``[N, hidden_size]``.
    """

    def __init__(self, model: nn.Module, *, prefix_tokens: str = "drop"):
        super().__init__()
        _check_choice("prefix_tokens", prefix_tokens, PREFIX_TOKEN_POLICIES)
        config = getattr(model, "config", None)
        config = getattr(config, "vision_config", config)
        hidden = getattr(config, "hidden_size", None)
        if hidden is None:
            raise TypeError("model must be a transformers vision model with config.hidden_size")
        self.model = model
        self.prefix_tokens = prefix_tokens
        self.width = int(hidden)
        self.pooled_width = int(hidden)
        image_size, patch_size = getattr(config, "image_size", None), getattr(config, "patch_size", None)
        self.num_patches = (image_size // patch_size) ** 2 if image_size and patch_size else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.model(pixel_values=images).last_hidden_state
        if self.prefix_tokens == "drop":
            if self.num_patches is None:
                raise ValueError("prefix_tokens='drop' needs config.image_size and config.patch_size")
            tokens = tokens[:, tokens.shape[1] - self.num_patches:]
        return tokens

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
