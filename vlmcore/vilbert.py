"""ViLBERT (Lu et al. 2019) and VL-BERT (Su et al. 2020): region-feature vision-language transformers.

- :class:`ViLBERT`: two BERT streams, text (``hidden_size``, ``num_attention_heads``) and visual
  (``v_hidden_size``, ``v_num_attention_heads``) over detector region features, exchanging
  information in co-attentional layers (:class:`CoAttentionLayer`) at ``bi_hidden_size`` /
  ``bi_num_attention_heads``. Layer plan as vilbert-multi-task's ``bert_base_6layer_6conect``:
  co-attention block ``i`` runs after text layers ``< t_biattention_id[i]`` and visual layers
  ``< v_biattention_id[i]``; the remaining layers of each stream run at the end.
- :class:`VLBERT`: one stream over ``[text; regions]``: text tokens carry word + position +
  segment embeddings plus the whole-image visual feature; region tokens carry the ``[IMG]`` word
  embedding, the projected region feature and a box-geometry embedding.
- Pre-training heads: masked language modelling, masked region modelling (ViLBERT: KL to the
  detector's class distribution; VL-BERT: classification of the detector's class), image-text
  alignment (ViLBERT: ``pooled_t * pooled_v`` -> 2 classes).
- :func:`mask_tokens` (15% of tokens, 80/10/10) and :func:`mask_regions` (15% of regions, 90% of
  them zeroed, overlapping regions excluded from the global feature) run on the tensors' device
  with tensor ops only.

Every attention here — both co-attention directions, the visual and text self-attention, VL-BERT's
single-stream self-attention — is :func:`vlmcore.kernels.resampler_attention` in its no-latents
form with the other side's padding mask: fused, the masked scores never exist in memory, and a
query whose keys are all padding gets an exact zero context (the reference's additive -10000 mask
would average the padding instead). Dropout applies to hidden states, not to the attention
probabilities (the fused op does not form them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmcore._checks import check_positive_int, check_token_ids
from vlmcore.kernels import resampler_attention

IGNORE_INDEX = -100
POOLER_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


@dataclass
class ViLBERTConfig:
    """Sizes of :class:`ViLBERT` / :class:`VLBERT`; defaults = vilbert-multi-task's
    ``bert_base_6layer_6conect.json`` (text BERT-base, visual 1024 x 8 heads, co-attention 1024 x 8)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    v_feature_size: int = 2048
    v_loc_size: int = 5
    v_hidden_size: int = 1024
    v_num_hidden_layers: int = 6
    v_num_attention_heads: int = 8
    v_intermediate_size: int = 1024
    bi_hidden_size: int = 1024
    bi_num_attention_heads: int = 8
    v_biattention_id: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    t_biattention_id: list[int] = field(default_factory=lambda: [6, 7, 8, 9, 10, 11])
    v_target_size: int = 1601  # detector classes (Visual Genome 1600 + background)
    max_regions: int = 101
    hidden_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    # vilbert-multi-task pools with ReLU; "tanh" is BERT's pooler (tiny models learn the alignment
    # objective with it: a 64-wide ViLBERT stayed at chance for 1000 steps with ReLU, see the README).
    pooler_activation: str = "relu"

    def __post_init__(self):
        if self.pooler_activation not in POOLER_ACTIVATIONS:
            raise ValueError(f"pooler_activation must be one of {sorted(POOLER_ACTIVATIONS)}, "
                             f"got {self.pooler_activation!r}")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "v_feature_size", "v_loc_size",
                     "v_hidden_size", "v_num_attention_heads", "v_intermediate_size", "bi_hidden_size",
                     "bi_num_attention_heads", "v_target_size", "max_regions"):
            check_positive_int(name, getattr(self, name))
        for name in ("num_hidden_layers", "v_num_hidden_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for width, heads in (("hidden_size", "num_attention_heads"), ("v_hidden_size", "v_num_attention_heads"),
                             ("bi_hidden_size", "bi_num_attention_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"{width}={getattr(self, width)} is not divisible by {heads}={getattr(self, heads)}")
        if len(self.v_biattention_id) != len(self.t_biattention_id):
            raise ValueError(f"v_biattention_id and t_biattention_id must have the same length (one entry per "
                             f"co-attention block), got {self.v_biattention_id} and {self.t_biattention_id}")
        for name, ids, layers in (("v_biattention_id", self.v_biattention_id, self.v_num_hidden_layers),
                                  ("t_biattention_id", self.t_biattention_id, self.num_hidden_layers)):
            if list(ids) != sorted(ids) or any(not 0 <= i <= layers for i in ids):
                raise ValueError(f"{name} must be non-decreasing layer indices in [0, {layers}], got {ids}")
        if not 0 <= self.hidden_dropout_prob < 1:
            raise ValueError(f"hidden_dropout_prob must be in [0, 1), got {self.hidden_dropout_prob}")


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, W]`` -> a ``[B, N, heads, W / heads]`` view."""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
           heads: int) -> torch.Tensor:
    """Multi-head attention of ``q [B, Lq, W]`` over ``k, v [B, Lk, W]`` through the fused op.

    ``key_mask``: bool ``[B, Lk]``, False = padding (never attended). Returns ``[B, Lq, W]``; a
    query with no key left gets zeros.
    """
    out = resampler_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads), media_mask=key_mask,
                              softmax_scale=(q.shape[-1] // heads) ** -0.5)
    return out.reshape(q.shape)


class FeedForward(nn.Module):
    """BERT's post-LN feed-forward: ``LN(x + dropout(W2 gelu(W1 x)))``."""

    def __init__(self, width: int, intermediate: int, dropout: float, eps: float):
        super().__init__()
        self.intermediate = nn.Linear(width, intermediate)
        self.output = nn.Linear(intermediate, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))


class SelfAttentionLayer(nn.Module):
    """A post-LN BERT layer: self-attention with a key padding mask, then :class:`FeedForward`.

    ``forward(x [B, L, width], mask bool [B, L] | None) -> [B, L, width]``.
    """

    def __init__(self, width: int, heads: int, intermediate: int, dropout: float, eps: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.attn_output = nn.Linear(width, width)
        self.attn_norm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FeedForward(width, intermediate, dropout, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        context = attend(self.query(x), self.key(x), self.value(x), mask, self.heads)
        x = self.attn_norm(x + self.dropout(self.attn_output(context)))
        return self.ffn(x)


class CoAttentionLayer(nn.Module):
    """ViLBERT's co-attentional transformer layer (vilbert-multi-task ``BertConnectionLayer``).

    Each stream's queries attend to the OTHER stream's keys/values (both projected to
    ``bi_width``), masked by the other stream's padding; per stream a projection back to its width,
    residual + LayerNorm, then its own feed-forward.

    ``forward(visual [B, R, v_width], visual_mask [B, R], text [B, L, t_width], text_mask [B, L])
    -> (visual', text')``; masks are bool, False = padding (or None: nothing padded).
    """

    def __init__(self, v_width: int, t_width: int, bi_width: int, bi_heads: int, v_intermediate: int,
                 t_intermediate: int, dropout: float, eps: float):
        super().__init__()
        self.heads = bi_heads
        # The fused op; benchmarks swap in another attention with attend()'s signature.
        self.attention = attend
        self.v_query, self.v_key, self.v_value = (nn.Linear(v_width, bi_width) for _ in range(3))
        self.t_query, self.t_key, self.t_value = (nn.Linear(t_width, bi_width) for _ in range(3))
        self.v_attn_output = nn.Linear(bi_width, v_width)
        self.t_attn_output = nn.Linear(bi_width, t_width)
        self.v_attn_norm = nn.LayerNorm(v_width, eps=eps)
        self.t_attn_norm = nn.LayerNorm(t_width, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.v_ffn = FeedForward(v_width, v_intermediate, dropout, eps)
        self.t_ffn = FeedForward(t_width, t_intermediate, dropout, eps)

    def forward(self, visual: torch.Tensor, visual_mask: torch.Tensor | None, text: torch.Tensor,
                text_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # Regions read the text; text reads the regions.
        v_context = self.attention(self.v_query(visual), self.t_key(text), self.t_value(text), text_mask, self.heads)
        t_context = self.attention(self.t_query(text), self.v_key(visual), self.v_value(visual), visual_mask,
                                   self.heads)
        visual = self.v_attn_norm(visual + self.dropout(self.v_attn_output(v_context)))
        text = self.t_attn_norm(text + self.dropout(self.t_attn_output(t_context)))
        return self.v_ffn(visual), self.t_ffn(text)


class TextEmbeddings(nn.Module):
    """Word + position + segment embeddings, LayerNorm, dropout: ``ids [B, L] -> [B, L, hidden]``."""

    def __init__(self, config: ViLBERTConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                extra: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = x + self.token_type_embeddings(types)
        if extra is not None:
            x = x + extra
        return self.dropout(self.norm(x))


class RegionEmbeddings(nn.Module):
    """ViLBERT's region embedding: ``LN(W_f features + W_b boxes)``: ``[B, R, F], [B, R, 5] -> [B, R, v_hidden]``."""

    def __init__(self, config: ViLBERTConfig):
        super().__init__()
        self.feature_embeddings = nn.Linear(config.v_feature_size, config.v_hidden_size)
        self.location_embeddings = nn.Linear(config.v_loc_size, config.v_hidden_size)
        self.norm = nn.LayerNorm(config.v_hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(self.feature_embeddings(features) + self.location_embeddings(boxes)))


class PredictionTransform(nn.Module):
    """BERT's head transform ``LN(gelu(W x))``, shared by the MLM and region heads."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x)))


def _check_regions(config: ViLBERTConfig, features: torch.Tensor, boxes: torch.Tensor,
                   region_mask: torch.Tensor | None, batch: int) -> None:
    """Host checks of the region inputs (shapes, widths, the region count), every error naming its argument;
    on CPU tensors also the box values (on CUDA that check would cost a device sync, so the data
    pipeline validates boxes where they are decoded)."""
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        raise ValueError(f"region_features must be a [B, R, {config.v_feature_size}] tensor, got "
                         f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}")
    b, regions, width = features.shape
    if width != config.v_feature_size:
        raise ValueError(f"region_features: feature width {width} != v_feature_size {config.v_feature_size}")
    if b != batch:
        raise ValueError(f"region_features: batch {b} != input_ids batch {batch}")
    if regions > config.max_regions:
        raise ValueError(f"region_features: {regions} regions exceed max_regions={config.max_regions}")
    if not isinstance(boxes, torch.Tensor) or tuple(boxes.shape) != (b, regions, config.v_loc_size):
        raise ValueError(f"region_boxes must be [B, R, {config.v_loc_size}] = {(b, regions, config.v_loc_size)} "
                         f"(x1, y1, x2, y2 normalized, area), got "
                         f"{tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__}")
    if boxes.device.type == "cpu" and not torch.compiler.is_compiling() and boxes.numel():
        if bool(((boxes < 0) | (boxes > 1)).any()) or not bool(torch.isfinite(boxes).all()):
            raise ValueError("region_boxes: coordinates and areas must be normalized to [0, 1]")
    if region_mask is not None and (region_mask.dtype != torch.bool or tuple(region_mask.shape) != (b, regions)):
        raise ValueError(f"region_mask must be a bool [B, R] = {(b, regions)} tensor (True = real region), got "
                         f"{region_mask.dtype} {tuple(region_mask.shape)}")


def _check_text(config: ViLBERTConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                extra_positions: int = 0) -> None:
    check_token_ids("input_ids", input_ids)
    if input_ids.shape[1] + extra_positions > config.max_position_embeddings:
        raise ValueError(f"input_ids: length {input_ids.shape[1]} (+{extra_positions} region positions) exceeds "
                         f"max_position_embeddings={config.max_position_embeddings}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")


def _bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.to(torch.bool)


class _PretrainedBase(nn.Module):
    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialization: N(0, initializer_range) weights, zero biases, unit LayerNorms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.config.initializer_range)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()


class ViLBERT(_PretrainedBase):
    """Two-stream ViLBERT with its pre-training heads.

    ``forward(input_ids [B, L], region_features [B, R, F], region_boxes [B, R, 5], attention_mask [B, L] = None,
    region_mask [B, R] = None, token_type_ids [B, L] = None)`` returns a dict:

    - ``text`` ``[B, L, hidden]``, ``visual`` ``[B, R, v_hidden]``: last hidden states of each stream;
    - ``pooled_text``, ``pooled_visual`` ``[B, bi_hidden]``: act(dense(first token)) of each stream
      (``pooler_activation``, ReLU as the reference)
      (region 0 is the global image feature, ViLBERT's convention);
    - ``mlm_logits`` ``[B, L, vocab]`` (decoder tied to the word embeddings),
      ``region_logits`` ``[B, R, v_target_size]``, ``alignment_logits`` ``[B, 2]`` (on
      ``pooled_text * pooled_visual``; class 1 = the caption matches the image).

    Masks: True (or 1) = real token / region. A sample whose regions are all padding gets zero
    co-attention contexts over regions (no NaN).
    """

    def __init__(self, config: ViLBERTConfig | None = None):
        super().__init__()
        self.config = config = config or ViLBERTConfig()
        eps, drop = config.layer_norm_eps, config.hidden_dropout_prob
        self.text_embeddings = TextEmbeddings(config)
        self.region_embeddings = RegionEmbeddings(config)
        self.text_layers = nn.ModuleList(
            SelfAttentionLayer(config.hidden_size, config.num_attention_heads, config.intermediate_size, drop, eps)
            for _ in range(config.num_hidden_layers))
        self.visual_layers = nn.ModuleList(
            SelfAttentionLayer(config.v_hidden_size, config.v_num_attention_heads, config.v_intermediate_size,
                               drop, eps)
            for _ in range(config.v_num_hidden_layers))
        self.co_layers = nn.ModuleList(
            CoAttentionLayer(config.v_hidden_size, config.hidden_size, config.bi_hidden_size,
                             config.bi_num_attention_heads, config.v_intermediate_size, config.intermediate_size,
                             drop, eps)
            for _ in config.v_biattention_id)
        self.text_pooler = nn.Linear(config.hidden_size, config.bi_hidden_size)
        self.visual_pooler = nn.Linear(config.v_hidden_size, config.bi_hidden_size)
        self.mlm_transform = PredictionTransform(config.hidden_size, eps)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.region_transform = PredictionTransform(config.v_hidden_size, eps)
        self.region_decoder = nn.Linear(config.v_hidden_size, config.v_target_size)
        self.alignment_head = nn.Linear(config.bi_hidden_size, 2)
        self.apply(self._init_weights)

    def encode(self, input_ids, region_features, region_boxes, attention_mask=None, region_mask=None,
               token_type_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two streams' last hidden states ``(text [B, L, hidden], visual [B, R, v_hidden])``."""
        _check_text(self.config, input_ids, attention_mask)
        _check_regions(self.config, region_features, region_boxes, region_mask, input_ids.shape[0])
        text_mask, visual_mask = _bool_mask(attention_mask), _bool_mask(region_mask)
        text = self.text_embeddings(input_ids, token_type_ids)
        visual = self.region_embeddings(region_features, region_boxes)
        t_done = v_done = 0
        for co_layer, v_until, t_until in zip(self.co_layers, self.config.v_biattention_id,
                                              self.config.t_biattention_id):
            for layer in self.visual_layers[v_done:v_until]:
                visual = layer(visual, visual_mask)
            for layer in self.text_layers[t_done:t_until]:
                text = layer(text, text_mask)
            visual, text = co_layer(visual, visual_mask, text, text_mask)
            v_done, t_done = v_until, t_until
        for layer in self.visual_layers[v_done:]:
            visual = layer(visual, visual_mask)
        for layer in self.text_layers[t_done:]:
            text = layer(text, text_mask)
        return text, visual

    def forward(self, input_ids, region_features, region_boxes, attention_mask=None, region_mask=None,
                token_type_ids=None) -> dict[str, torch.Tensor]:
        text, visual = self.encode(input_ids, region_features, region_boxes, attention_mask, region_mask,
                                   token_type_ids)
        activation = POOLER_ACTIVATIONS[self.config.pooler_activation]
        pooled_text = activation(self.text_pooler(text[:, 0]))
        pooled_visual = activation(self.visual_pooler(visual[:, 0]))
        mlm_logits = F.linear(self.mlm_transform(text), self.text_embeddings.word_embeddings.weight, self.mlm_bias)
        return {
            "text": text,
            "visual": visual,
            "pooled_text": pooled_text,
            "pooled_visual": pooled_visual,
            "mlm_logits": mlm_logits,
            "region_logits": self.region_decoder(self.region_transform(visual)),
            "alignment_logits": self.alignment_head(pooled_text * pooled_visual),
        }


class BoxGeometryEmbedding(nn.Module):
    """VL-BERT's geometry embedding: sinusoids of the 4 box coordinates (``dim / 4`` each, wavelengths
    up to 1000 as in VL-BERT), then a linear map: ``[B, R, >= 4] -> [B, R, width]``."""

    def __init__(self, width: int, dim: int = 64):
        super().__init__()
        if dim % 8:
            raise ValueError(f"geometry dim must be a multiple of 8, got {dim}")
        self.dim = dim
        self.proj = nn.Linear(dim, width)

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        coords = boxes[..., :4].float() * 100.0  # [B, R, 4]
        freqs = 1000.0 ** (-torch.arange(self.dim // 8, device=boxes.device, dtype=torch.float32) / (self.dim // 8))
        angles = coords.unsqueeze(-1) * freqs  # [B, R, 4, dim / 8]
        sinusoids = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # [B, R, dim]
        return self.proj(sinusoids.to(self.proj.weight.dtype))


class VLBERT(_PretrainedBase):
    """Single-stream VL-BERT over ``[text; regions]`` with MLM and masked RoI classification heads.

    Text tokens: word + position + segment 0 + the projected whole-image feature (region 0).
    Region tokens: the ``[IMG]`` word embedding (``image_token_id``) + projected region feature +
    box geometry embedding + one shared position (after the text) + segment 1.

    ``forward(input_ids [B, L], region_features [B, R, F], region_boxes [B, R, 5], attention_mask=None,
    region_mask=None)`` returns ``hidden [B, L + R, hidden]``, ``text`` ``[B, L, hidden]``,
    ``visual`` ``[B, R, hidden]``, ``mlm_logits`` ``[B, L, vocab]``, ``region_logits``
    ``[B, R, v_target_size]``. Uses ``hidden_size`` / ``num_hidden_layers`` / ``num_attention_heads``
    of the config (the visual-stream sizes are ViLBERT's only).
    """

    def __init__(self, config: ViLBERTConfig | None = None, image_token_id: int = 1):
        super().__init__()
        self.config = config = config or ViLBERTConfig()
        if not 0 <= image_token_id < config.vocab_size:
            raise ValueError(f"image_token_id must be in [0, vocab_size={config.vocab_size}), got {image_token_id}")
        self.image_token_id = image_token_id
        eps, drop = config.layer_norm_eps, config.hidden_dropout_prob
        self.text_embeddings = TextEmbeddings(config)
        self.visual_projection = nn.Linear(config.v_feature_size, config.hidden_size)
        self.geometry = BoxGeometryEmbedding(config.hidden_size)
        self.layers = nn.ModuleList(
            SelfAttentionLayer(config.hidden_size, config.num_attention_heads, config.intermediate_size, drop, eps)
            for _ in range(config.num_hidden_layers))
        self.mlm_transform = PredictionTransform(config.hidden_size, eps)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.region_transform = PredictionTransform(config.hidden_size, eps)
        self.region_decoder = nn.Linear(config.hidden_size, config.v_target_size)
        self.apply(self._init_weights)

    def forward(self, input_ids, region_features, region_boxes, attention_mask=None,
                region_mask=None) -> dict[str, torch.Tensor]:
        config = self.config
        _check_text(config, input_ids, attention_mask, extra_positions=1)
        _check_regions(config, region_features, region_boxes, region_mask, input_ids.shape[0])
        batch, length = input_ids.shape
        regions = region_features.shape[1]
        visual_features = self.visual_projection(region_features)  # [B, R, hidden]
        text = self.text_embeddings(input_ids, extra=visual_features[:, :1])
        image_ids = torch.full((batch, regions), self.image_token_id, dtype=input_ids.dtype, device=input_ids.device)
        region_position = torch.full_like(image_ids, length)
        emb = self.text_embeddings
        visual = (emb.word_embeddings(image_ids) + emb.position_embeddings(region_position)
                  + emb.token_type_embeddings(torch.ones_like(image_ids)) + visual_features
                  + self.geometry(region_boxes))
        visual = emb.dropout(emb.norm(visual))
        hidden = torch.cat([text, visual], dim=1)
        text_mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                     else attention_mask.to(torch.bool))
        visual_mask = (torch.ones(batch, regions, dtype=torch.bool, device=input_ids.device) if region_mask is None
                       else region_mask)
        mask = torch.cat([text_mask, visual_mask], dim=1)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        text, visual = hidden[:, :length], hidden[:, length:]
        return {
            "hidden": hidden,
            "text": text,
            "visual": visual,
            "mlm_logits": F.linear(self.mlm_transform(text), emb.word_embeddings.weight, self.mlm_bias),
            "region_logits": self.region_decoder(self.region_transform(visual)),
        }


# ------------------------------------------------------------------------------------ pre-training


def mask_tokens(input_ids: torch.Tensor, *, mask_token_id: int, vocab_size: int, special_tokens: torch.Tensor,
                generator: torch.Generator | None = None, probability: float = 0.15
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption: ``(corrupted ids, labels)``, both ``[B, L]``.

    Each token that is not special (``special_tokens`` bool ``[B, L]``: padding, CLS, SEP, ...) is
    chosen with ``probability``; a chosen token becomes ``mask_token_id`` (80%), a uniformly random
    token (10%) or stays (10%). Labels hold the original id at chosen positions, ``-100``
    elsewhere. Tensor ops on the ids' device only (no host sync).
    """
    if not 0 < probability < 1:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    if special_tokens.shape != input_ids.shape or special_tokens.dtype != torch.bool:
        raise ValueError(f"special_tokens must be a bool tensor of input_ids' shape {tuple(input_ids.shape)}")
    device = input_ids.device
    draws = torch.rand(input_ids.shape + (2,), generator=generator, device=device)
    chosen = (draws[..., 0] < probability) & ~special_tokens
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = draws[..., 1]
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device, dtype=input_ids.dtype)
    corrupted = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    corrupted = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, corrupted)
    return corrupted, labels


def box_iou(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of ``[B, R, >= 4]`` boxes (x1, y1, x2, y2) -> ``[B, R, R]`` in fp32."""
    b = boxes[..., :4].float()
    area = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt = torch.maximum(b[..., None, :2], b[..., None, :, :2])
    rb = torch.minimum(b[..., None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area[..., :, None] + area[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def mask_regions(features: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor, *,
                 generator: torch.Generator | None = None, probability: float = 0.15, zero_probability: float = 0.9,
                 overlap_threshold: float = 0.4, global_region: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """ViLBERT's masked region corruption: ``(features', region_labels)``.

    Each real region (``region_mask`` True; region 0 excluded when ``global_region``: it is the
    image-level feature) is chosen with ``probability``; a chosen region's feature is zeroed with
    ``zero_probability`` (else kept) and labelled 1 (predict its class distribution), others -1.
    As vilbert-multi-task does, every region overlapping a chosen one with IoU > ``overlap_threshold``
    is left out of the recomputed global feature (region 0 = mean of the remaining real regions),
    so the image-level token cannot leak what was masked.

    Shapes: ``features [B, R, F]``, ``boxes [B, R, 5]``, ``region_mask`` bool ``[B, R]``; returns
    ``features' [B, R, F]`` and ``region_labels`` int64 ``[B, R]``. Tensor ops only (no host sync).
    """
    for name, value in (("probability", probability), ("zero_probability", zero_probability)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    batch, regions, _ = features.shape
    device = features.device
    draws = torch.rand(batch, regions, 2, generator=generator, device=device)
    eligible = region_mask.clone()
    if global_region:
        eligible[:, 0] = False
    chosen = (draws[..., 0] < probability) & eligible
    zeroed = chosen & (draws[..., 1] < zero_probability)
    out = features.masked_fill(zeroed.unsqueeze(-1), 0.0)
    labels = chosen.long() * 2 - 1  # 1 = chosen, -1 = not
    if global_region:
        overlaps = (box_iou(boxes) > overlap_threshold) & chosen.unsqueeze(-1)  # [B, chosen i, overlapped j]
        excluded = overlaps.any(dim=1) | chosen
        keep = eligible & ~excluded
        weights = keep.to(out.dtype).unsqueeze(-1)
        mean = (out * weights).sum(1) / weights.sum(1).clamp(min=1)
        out = torch.cat([mean.unsqueeze(1), out[:, 1:]], dim=1)
    return out, labels


def masked_region_kl(region_logits: torch.Tensor, target_distribution: torch.Tensor,
                     region_labels: torch.Tensor) -> torch.Tensor:
    """ViLBERT's masked region loss: KL(target || softmax(logits)) summed over classes, averaged over
    regions with label 1 (zero when none). ``[B, R, C], [B, R, C], [B, R] -> fp32 scalar``.

    (vilbert-multi-task divides the same sum by ``masked regions x C``; that is this loss / C.)
    """
    if region_logits.shape != target_distribution.shape:
        raise ValueError(f"target_distribution must have region_logits' shape {tuple(region_logits.shape)}, got "
                         f"{tuple(target_distribution.shape)}")
    log_probs = F.log_softmax(region_logits.float(), dim=-1)
    target = target_distribution.float()
    kl = (torch.xlogy(target, target) - target * log_probs).sum(-1)  # [B, R]
    chosen = (region_labels == 1).float()
    return (kl * chosen).sum() / chosen.sum().clamp(min=1)


def masked_region_classification(region_logits: torch.Tensor, target_distribution: torch.Tensor,
                                 region_labels: torch.Tensor) -> torch.Tensor:
    """VL-BERT's masked RoI classification: cross-entropy against the detector's most likely class,
    averaged over regions with label 1 (zero when none). ``[B, R, C], [B, R, C], [B, R] -> fp32 scalar``."""
    target = torch.where(region_labels == 1, target_distribution.argmax(-1),
                         torch.full_like(region_labels, IGNORE_INDEX))
    loss = F.cross_entropy(region_logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss / (region_labels == 1).sum().clamp(min=1)


def mlm_loss(mlm_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked-LM cross-entropy over positions whose label is not -100 (zero when none)."""
    loss = F.cross_entropy(mlm_logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss / (labels != IGNORE_INDEX).sum().clamp(min=1)


def mismatch_captions(input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                      generator: torch.Generator | None = None, probability: float = 0.5
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ViLBERT's alignment data: each caption is replaced, with ``probability``, by another sample's
    caption of the batch (a derangement: never its own). Returns ``(ids, mask, alignment_labels)``
    with labels 1 = matched, 0 = mismatched; ``[B, L], [B, L] -> [B, L], [B, L], [B]``.
    A batch of one keeps its caption (label 1).
    """
    batch = input_ids.shape[0]
    device = input_ids.device
    if batch < 2:
        return input_ids, attention_mask, torch.ones(batch, dtype=torch.long, device=device)
    swap = torch.rand(batch, generator=generator, device=device) < probability
    shift = torch.randint(1, batch, (batch,), generator=generator, device=device)
    partner = torch.where(swap, (torch.arange(batch, device=device) + shift) % batch,
                          torch.arange(batch, device=device))
    return input_ids[partner], attention_mask[partner], (~swap).long()


def vilbert_pretraining_loss(outputs: dict, mlm_labels: torch.Tensor, region_targets: torch.Tensor,
                             region_labels: torch.Tensor, alignment_labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """ViLBERT's three losses and their sum. MLM and region losses only count matched pairs, as the
    reference does (a mismatched caption says nothing about the image's regions).

    ``outputs``: :meth:`ViLBERT.forward`'s dict; ``mlm_labels [B, L]``, ``region_targets [B, R, C]``,
    ``region_labels [B, R]``, ``alignment_labels [B]`` (1 = matched).
    """
    matched = alignment_labels.bool()
    mlm = mlm_loss(outputs["mlm_logits"], mlm_labels.masked_fill(~matched.unsqueeze(1), IGNORE_INDEX))
    region = masked_region_kl(outputs["region_logits"], region_targets,
                              region_labels.masked_fill(~matched.unsqueeze(1), -1))
    alignment = F.cross_entropy(outputs["alignment_logits"].float(), alignment_labels)
    return {"loss": mlm + region + alignment, "mlm_loss": mlm, "region_loss": region, "alignment_loss": alignment}


def alignment_scores(model: ViLBERT, input_ids, region_features, region_boxes, attention_mask=None,
                     region_mask=None) -> torch.Tensor:
    """Log-probability that each caption matches its image: ``[B]`` (retrieval ranks pairs by it)."""
    logits = model(input_ids, region_features, region_boxes, attention_mask, region_mask)["alignment_logits"]
    return F.log_softmax(logits.float(), dim=-1)[:, 1]

