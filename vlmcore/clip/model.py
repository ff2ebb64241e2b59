"""CLIP dual encoder (Radford et al. 2021) and zero-shot classification.

Training loss: the fused op :func:`vlmcore.kernels.contrastive_loss` through the model's
:class:`vlmcore.ContrastiveLoss` criterion, which holds the learnable temperature. Retrieval
Recall@k lives in :mod:`vlmcore.retrieval` (``vlmcore.clip.retrieval_metrics`` names it too).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmcore._checks import check_positive_int
from vlmcore.kernels import contrastive_loss
from vlmcore.losses import ContrastiveLoss, SigLIPLoss
from vlmcore.retrieval import retrieval_metrics
from vlmcore.vision import TransformerBlock, VisionTransformer, pooled_features
from vlmcore.vision import vision_width as declared_width

#: :class:`TextTransformer` pooling: at the end-of-text token (CLIP) or at the last position (SigLIP).
TEXT_POOLS = ("eot", "last")


class TextTransformer(nn.Module):
    """CLIP's text tower: token + position embeddings, pre-norm blocks (causal by default), final
    LayerNorm, one pooled vector per row.

    Pooling (``pool``): ``"eot"`` (CLIP): the first position of ``eot_token_id`` in each row; with
    ``eot_token_id=None``, the position of the largest token id (OpenAI CLIP, whose EOT has the
    largest id); a row without the EOT token is pooled at its last non-``pad_token_id`` token.
    ``"last"`` (SigLIP, whose text is padded to a fixed length): the last position of the row.

    ``causal``: the attention masks future positions (CLIP); SigLIP's text attends both ways.
    ``act``, ``mlp_ratio``, ``norm_eps``: the blocks' MLP and LayerNorms (see
    :class:`vlmcore.vision.TransformerBlock`).

    ``forward(tokens [n, T] int64) -> [n, width]``.
    """

    def __init__(self, vocab_size: int, context_length: int, width: int, depth: int, heads: int,
                 pad_token_id: int = 0, eot_token_id: int | None = None, mlp_ratio: float = 4.0, *,
                 causal: bool = True, pool: str = "eot", act: str = "gelu", norm_eps: float = 1e-5):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("context_length", context_length), ("width", width),
                            ("depth", depth), ("heads", heads)):
            check_positive_int(name, value)
        if eot_token_id is not None and not 0 <= eot_token_id < vocab_size:
            raise ValueError(f"eot_token_id must be None or a token id in [0, {vocab_size}), got {eot_token_id!r}")
        if pool not in TEXT_POOLS:
            raise ValueError(f"pool must be one of {', '.join(map(repr, TEXT_POOLS))}, got {pool!r}")
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.width = width
        self.pad_token_id = pad_token_id
        self.eot_token_id = eot_token_id
        self.causal = causal
        self.pool = pool
        self.act = act
        self.norm_eps = norm_eps
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, mlp_ratio, causal=causal, act=act, norm_eps=norm_eps)
            for _ in range(depth))
        self.ln_final = nn.LayerNorm(width, eps=norm_eps)

    def pool_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[n]`` index of the token each row is pooled at (see the class docstring)."""
        if self.pool == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        last_real = torch.where(tokens != self.pad_token_id, positions, 0).amax(dim=1)
        if self.eot_token_id is None:
            return tokens.argmax(dim=1)
        is_eot = tokens == self.eot_token_id
        return torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1), last_real)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be an integer tensor [n, T], got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor [n, T], got dtype {tokens.dtype}")
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be an integer tensor [n, T] with T >= 1, got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"tokens has length {tokens.shape[1]} > context_length {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]  # [n, T, width]
        for block in self.blocks:
            x = block(x)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), self.pool_positions(tokens)]


class CLIP(nn.Module):
    """CLIP: image tower + causal text transformer, linear projections, normalized features,
    learnable temperature.

    Args:
        embed_dim: joint embedding width.
        vision_encoder: None (build a :class:`vlmcore.VisionTransformer` from ``image_size``,
            ``patch_size``, ``vision_width``, ``vision_depth``, ``vision_heads``), or any module
            (adapters of :mod:`vlmcore.vision`); its pooled output (:func:`vlmcore.vision.pooled_features`)
            of width ``pooled_width``/``width`` is projected to ``embed_dim``.
        vocab_size, context_length, text_width, text_depth, text_heads: the text transformer.
        pad_token_id, eot_token_id: text pooling (see :class:`TextTransformer`).
        text_encoder: None (build the :class:`TextTransformer` above), or a built one (the text
            arguments above are then unused; its ``width`` is projected).
        image_projection: project the pooled image vector to ``embed_dim`` (a bias-free linear, CLIP);
            False: the pooled vector is the image feature (SigLIP's MAP head; its width must be ``embed_dim``).
        text_projection_bias: the text projection has a bias (SigLIP's text head).
        init_temperature, max_logit_scale: the criterion's temperature (s = 1/tau <= max_logit_scale).
        loss: ``"clip"`` (softmax InfoNCE, :class:`vlmcore.ContrastiveLoss`) or ``"siglip"`` (pairwise
            sigmoid, :class:`vlmcore.SigLIPLoss`: s = exp(t') from ``siglip_init_scale``, bias from
            ``siglip_init_bias``; ``max_logit_scale`` is not applied; ring/gather from
            ``siglip_dist_impl``). Zero-shot scores are then ``sigmoid(s cos + b)`` (same ranking).

    ``encode_image(images [n, C, H, W]) -> [n, embed_dim]`` and ``encode_text(tokens [n, T]) ->
    [n, embed_dim]``, both L2-normalized. ``forward(images, tokens, *, group=None, local_loss=False)``
    returns ``dict(loss, i2t_acc, t2i_acc, logit_scale, image_features, text_features)`` (SigLIP:
    ``logit_bias`` instead of the accuracies, which would need the local n x n similarities).
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        vision_encoder: nn.Module | None = None,
        image_size: int = 224,
        patch_size: int = 16,
        vision_width: int = 768,
        vision_depth: int = 12,
        vision_heads: int = 12,
        vocab_size: int = 49408,
        context_length: int = 77,
        text_width: int = 512,
        text_depth: int = 12,
        text_heads: int = 8,
        pad_token_id: int = 0,
        eot_token_id: int | None = None,
        text_encoder: nn.Module | None = None,
        image_projection: bool = True,
        text_projection_bias: bool = False,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        loss: str = "clip",
        siglip_init_scale: float = 10.0,
        siglip_init_bias: float = -10.0,
        siglip_dist_impl: str = "ring",
    ):
        super().__init__()
        check_positive_int("embed_dim", embed_dim)
        if vision_encoder is None:
            vision_encoder = VisionTransformer(image_size, patch_size, vision_width, vision_depth, vision_heads)
        self.visual = vision_encoder
        if text_encoder is None:
            text_encoder = TextTransformer(vocab_size, context_length, text_width, text_depth, text_heads,
                                           pad_token_id=pad_token_id, eot_token_id=eot_token_id)
        self.text = text_encoder
        pooled_width = declared_width(vision_encoder, pooled=True)
        if image_projection:
            self.image_projection = nn.Linear(pooled_width, embed_dim, bias=False)
        elif pooled_width == embed_dim:
            self.image_projection = nn.Identity()
        else:
            raise ValueError(f"image_projection=False needs the vision encoder's pooled width ({pooled_width}) "
                             f"to equal embed_dim ({embed_dim})")
        self.text_projection = nn.Linear(text_encoder.width, embed_dim, bias=text_projection_bias)
        if loss == "clip":
            self.criterion = ContrastiveLoss(init_temperature, max_logit_scale)
        elif loss == "siglip":
            self.criterion = SigLIPLoss(siglip_init_scale, siglip_init_bias, dist_impl=siglip_dist_impl)
        else:
            raise ValueError(f"loss must be 'clip' or 'siglip', got {loss!r}")
        self.loss = loss
        self.embed_dim = embed_dim

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.image_projection(pooled_features(self.visual, images))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.text_projection(self.text(tokens))
        return F.normalize(features, dim=-1) if normalize else features

    def logit_scale(self) -> torch.Tensor:
        """The current multiplier s = exp(theta), clamped (0-dim)."""
        return self.criterion.scale()

    def pair_scores(self, similarity: torch.Tensor) -> torch.Tensor:
        """Scores of cosine similarities: CLIP ``s * cos`` (logits); SigLIP ``sigmoid(s * cos + b)``
        (the pair probability the loss trains). Both are increasing in cos: rankings are the same."""
        scale = self.logit_scale().to(similarity.device, similarity.dtype)
        if self.loss == "siglip":
            return torch.sigmoid(scale * similarity + self.criterion.logit_bias.to(similarity.device, similarity.dtype))
        return scale * similarity

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, *, group=None, local_loss: bool = False) -> dict:
        """Contrastive training step on matching (image, text) rows.

        Args:
            images: ``[n, C, H, W]``; tokens: ``[n, T]`` int64; row i of each is a pair.
            group, local_loss: distributed loss settings (see
                :func:`vlmcore.kernels.contrastive_loss`); default: those of ``self.criterion``.

        Returns:
            ``{"loss", "i2t_acc", "t2i_acc", "logit_scale", "image_features", "text_features"}``.
        """
        if isinstance(images, torch.Tensor) and isinstance(tokens, torch.Tensor) and images.dim() > 0 \
                and tokens.dim() > 0 and images.shape[0] != tokens.shape[0]:
            raise ValueError(f"images and tokens must have the same number of rows (pairs), got "
                             f"{images.shape[0]} and {tokens.shape[0]}")
        image_features = self.encode_image(images)
        text_features = self.encode_text(tokens)
        if self.loss == "siglip":
            if local_loss:
                raise ValueError("local_loss is a softmax-loss option; the SigLIP loss is always per rank")
            out = self.criterion(image_features, text_features.to(image_features.dtype), group=group,
                                 output_dict=True)
            out["image_features"] = image_features
            out["text_features"] = text_features
            return out
        scale = self.criterion.scale().to(image_features.device)
        out = contrastive_loss(
            image_features, text_features.to(image_features.dtype), scale,
            group=group if group is not None else self.criterion.group,
            local_loss=local_loss or self.criterion.local_loss,
            label_smoothing=self.criterion.label_smoothing, output_dict=True,
        )
        out["logit_scale"] = scale.detach()
        out["image_features"] = image_features
        out["text_features"] = text_features
        return out


@torch.no_grad()
def zero_shot_classifier(model: CLIP, tokenizer: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                         templates: Sequence[str | Callable[[str], str]]) -> torch.Tensor:
    """Class weights from label text: per class, the normalized mean of its normalized prompt embeddings.

    Args:
        model: anything with ``encode_text(tokens) -> [n, embed_dim]`` (normalized).
        tokenizer: ``list[str] -> LongTensor [n, T]``.
        classnames: C class names.
        templates: format strings with one ``{}`` (``"a photo of a {}."``) or callables ``name -> str``.

    Returns:
        ``[embed_dim, C]`` (column c is class c), on the model's device.
    """
    for arg, value in (("classnames", classnames), ("templates", templates)):
        if isinstance(value, str):
            raise TypeError(f"{arg} must be a sequence of strings, not a single string ({value!r})")
        if len(value) == 0:
            raise ValueError(f"{arg} must be non-empty")
    for template in templates:
        if callable(template):
            continue
        if not isinstance(template, str):
            raise TypeError(f"templates must hold format strings or callables, got {type(template).__name__}")
        if not any(field is not None for _, field, _, _ in string.Formatter().parse(template)):
            raise ValueError(f"templates must contain a '{{}}' field for the class name, got {template!r}")
    device = next(model.parameters()).device
    columns = []
    for name in classnames:
        texts = [t(name) if callable(t) else t.format(name) for t in templates]
        features = F.normalize(model.encode_text(tokenizer(texts).to(device)).float(), dim=-1)  # [len(templates), d]
        columns.append(F.normalize(features.mean(dim=0), dim=-1))
    return torch.stack(columns, dim=1)


@torch.no_grad()
def zero_shot_predict(model: CLIP, images: torch.Tensor, classifier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classify images with a :func:`zero_shot_classifier` matrix.

    Returns:
        ``(logits [n, C], preds [n])``: logits = ``model.pair_scores(cos(image, class))`` when the
        model has it (CLIP: ``s * cos``; SigLIP: ``sigmoid(s * cos + b)``), else ``s * cos`` with the
        model's ``logit_scale()`` (or 100 as in CLIP's evaluation); preds = argmax.
    """
    if not isinstance(classifier, torch.Tensor) or classifier.dim() != 2:
        got = tuple(classifier.shape) if isinstance(classifier, torch.Tensor) else type(classifier).__name__
        raise ValueError(f"classifier must be [embed_dim, C] (from zero_shot_classifier), got {got}")
    features = model.encode_image(images.to(classifier.device)).float()
    if features.shape[-1] != classifier.shape[0]:
        raise ValueError(f"classifier has {classifier.shape[0]} rows but the model's image features have width "
                         f"{features.shape[-1]}; classifier must be [embed_dim, C]")
    similarity = features @ classifier.float()
    if hasattr(model, "pair_scores"):
        logits = model.pair_scores(similarity)
    else:
        logits = (float(model.logit_scale()) if hasattr(model, "logit_scale") else 100.0) * similarity
    return logits, logits.argmax(dim=1)


__all__ = ["CLIP", "TextTransformer", "retrieval_metrics", "zero_shot_classifier", "zero_shot_predict"]
