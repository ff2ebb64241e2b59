"""BLIP's text transformer, the multimodal mixture of encoder-decoder (MED), and its LM head.

One BERT-style text transformer is used three ways:

- unimodal text encoder (``mode="text"``): bidirectional self-attention only, ``[CLS]`` first;
- image-grounded text encoder (``mode="multimodal"``): bidirectional self-attention, then
  cross-attention to every image token in every layer, ``[ENC]`` first; the ITM head reads its
  first token;
- image-grounded text decoder (``mode="decoder"``): causal self-attention, the same
  cross-attention and feed-forward, ``[DEC]`` (BOS) first; the LM head predicts the next token.
  Generation runs it with a :class:`DecoderCache`: each step feeds only the new tokens.

Encoder and decoder share every parameter except the self-attention blocks (BLIP's best setting):
each layer holds ``attention`` (encoder) and ``decoder_attention`` (decoder), and one
``crossattention``, ``intermediate``, ``output``. Cross-attention runs on
:func:`vlmcore.kernels.resampler_attention` (the no-latents form, with an image padding mask).
Parameter names are BERT's (Hugging Face ``BlipTextModel``, salesforce ``med.py``), so weights load
by name (:mod:`vlmcore.blip.convert`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmcore._checks import check_positive_int, check_token_ids
from vlmcore.kernels import resampler_attention

MODES = ("text", "multimodal", "decoder")


@dataclass
class MEDConfig:
    """Sizes and special tokens of BLIP's text transformer (BERT-base in the paper).

    ``bos_token_id`` is BLIP's ``[DEC]`` (first token of the decoder input), ``enc_token_id`` its
    ``[ENC]`` (first token of the image-grounded encoder input), ``sep_token_id`` ends a caption
    (generation stops there), ``pad_token_id`` pads. ``encoder_width`` is the image token width.
    """

    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    encoder_width: int = 768
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    pad_token_id: int = 0
    bos_token_id: int = 30522
    enc_token_id: int = 30523
    sep_token_id: int = 102
    tie_word_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "encoder_width"):
            check_positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        for name in ("pad_token_id", "bos_token_id", "enc_token_id", "sep_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} must be a token id in [0, vocab_size={self.vocab_size}), got {value!r}")

    @classmethod
    def from_hf(cls, text_config, *, enc_token_id: int | None = None) -> MEDConfig:
        """From a transformers ``BlipTextConfig``. HF has no ``[ENC]`` id; default: ``bos_token_id + 1``
        when that is inside the vocabulary (BLIP's tokenizer), else ``bos_token_id``."""
        bos = int(text_config.bos_token_id)
        if enc_token_id is None:
            enc_token_id = bos + 1 if bos + 1 < text_config.vocab_size else bos
        return cls(
            vocab_size=text_config.vocab_size, hidden_size=text_config.hidden_size,
            num_hidden_layers=text_config.num_hidden_layers, num_attention_heads=text_config.num_attention_heads,
            intermediate_size=text_config.intermediate_size,
            max_position_embeddings=text_config.max_position_embeddings,
            encoder_width=text_config.encoder_hidden_size, layer_norm_eps=text_config.layer_norm_eps,
            hidden_dropout_prob=text_config.hidden_dropout_prob,
            attention_probs_dropout_prob=text_config.attention_probs_dropout_prob,
            pad_token_id=int(text_config.pad_token_id), bos_token_id=bos, enc_token_id=int(enc_token_id),
            sep_token_id=int(text_config.sep_token_id),
            tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", True)),
        )


# Adapted from transformers' modeling_bert.BertEmbeddings, as BLIP's med.py uses it (no token types).
class _Embeddings(nn.Module):
    """Word + learned position embeddings, LayerNorm, dropout: ``[B, L] -> [B, L, hidden]``."""

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        """``past_length``: tokens before ``input_ids`` (cached decoding), where their positions start."""
        positions = torch.arange(past_length, past_length + input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class _LayerCache:
    """One layer's cached keys / values: ``self_kv`` ``([B, H, T, Dh], [B, H, T, Dh])`` of the causal
    self-attention (T = tokens decoded so far) and ``image_kv`` ``([B, S, H, Dh], [B, S, H, Dh])`` of
    the cross-attention over the image; None until the first call fills them."""

    __slots__ = ("self_kv", "image_kv")

    def __init__(self):
        self.self_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.image_kv: tuple[torch.Tensor, torch.Tensor] | None = None


class DecoderCache:
    """The keys / values of one decoding run of the image-grounded decoder (``mode="decoder"``).

    Pass the same (initially empty) cache to every :meth:`MEDTextModel.forward` call of a run, with
    only the new tokens each time and the attention mask of all tokens so far. Self-attention keys /
    values grow by the new tokens per call; the image's cross-attention keys / values are computed
    at the first call and reused (the image does not change across steps). The interface Hugging
    Face's ``generate`` uses: :meth:`get_seq_length`, :meth:`reorder_cache`, ``is_compileable``.
    """

    is_compileable = False  # generate asks before choosing torch.compile; a growing cache is not static

    def __init__(self):
        self.layers: list[_LayerCache] = []

    def layer(self, index: int) -> _LayerCache:
        """Layer ``index``'s entry (created on first use)."""
        while len(self.layers) <= index:
            self.layers.append(_LayerCache())
        return self.layers[index]

    def get_seq_length(self) -> int:
        """Tokens cached so far (0 for an empty cache)."""
        if not self.layers or self.layers[0].self_kv is None:
            return 0
        return self.layers[0].self_kv[0].shape[2]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep row ``beam_idx[i]`` as row ``i`` (``beam_idx`` long ``[B]``) of the self-attention keys /
        values: beam search continuing the chosen beams. The image keys / values are left in place:
        beam search only reorders the beams of one image, whose image rows are equal, and copying
        ``[B, S, H, Dh]`` per layer per step would cost more than the step."""
        for entry in self.layers:
            if entry.self_kv is not None:
                entry.self_kv = tuple(t.index_select(0, beam_idx.to(t.device)) for t in entry.self_kv)


# Adapted from transformers' modeling_bert.BertSelfAttention (scaled_dot_product_attention here).
class _SelfAttentionCore(nn.Module):
    """``query`` / ``key`` / ``value`` projections and scaled dot-product self-attention.

    ``forward(x [B, L, hidden], additive_mask [B, 1, L, T], cache) -> [B, L, hidden]`` (before the
    output projection). The mask is additive (0 or the dtype's minimum), as BERT / HF eager. With a
    :class:`_LayerCache`, the keys / values of ``x`` are appended to its ``self_kv`` and the queries
    attend all ``T`` cached tokens; without one, ``T = L``.
    """

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor, cache: _LayerCache | None = None) -> torch.Tensor:
        b, length, width = x.shape
        shape = (b, length, self.heads, width // self.heads)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value))
        if cache is not None:
            if cache.self_kv is not None:
                k = torch.cat([cache.self_kv[0], k], dim=2)
                v = torch.cat([cache.self_kv[1], v], dim=2)
            cache.self_kv = (k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask.to(q.dtype),
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, length, width)


# Adapted from BLIP med.py's BertSelfAttention(is_cross_attention=True) (the fused op here).
class _CrossAttentionCore(nn.Module):
    """Text queries attend image tokens through :func:`vlmcore.kernels.resampler_attention`.

    ``forward(x [B, L, hidden], image_embeds [B, S, encoder_width], image_mask [B, S] bool or None,
    cache) -> [B, L, hidden]``. With a :class:`_LayerCache`, the image keys / values are projected
    once (first call) and read from its ``image_kv`` afterwards. Attention dropout is not applied
    (the fused op has none; BLIP trains with attention dropout 0).
    """

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.encoder_width, config.hidden_size)
        self.value = nn.Linear(config.encoder_width, config.hidden_size)

    def forward(self, x: torch.Tensor, image_embeds: torch.Tensor, image_mask: torch.Tensor | None,
                cache: _LayerCache | None = None) -> torch.Tensor:
        b, length, width = x.shape
        q = self.query(x).view(b, length, self.heads, width // self.heads)
        if cache is None:
            k, v = self._image_kv(image_embeds.to(q.dtype))
        else:
            if cache.image_kv is None:
                cache.image_kv = self._image_kv(image_embeds.to(q.dtype))
            k, v = cache.image_kv
        return resampler_attention(q, k, v, media_mask=image_mask).reshape(b, length, width)

    def _image_kv(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the image tokens: ``[B, S, encoder_width] -> 2 x [B, S, H, Dh]``."""
        b, s, _ = image_embeds.shape
        shape = (b, s, self.heads, self.key.out_features // self.heads)
        return self.key(image_embeds).view(shape), self.value(image_embeds).view(shape)


# Adapted from transformers' modeling_bert.BertSelfOutput / BertOutput (one class for both).
class _AttentionOutput(nn.Module):
    """``dense`` + dropout, residual, ``LayerNorm`` (BERT's post-norm sub-layer output)."""

    def __init__(self, width_in: int, config: MEDConfig):
        super().__init__()
        self.dense = nn.Linear(width_in, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


# Adapted from transformers' modeling_bert.BertAttention.
class _SelfAttention(nn.Module):
    """``attention`` / ``decoder_attention`` of a layer: ``self`` then ``output``, ``[B, L, hidden]``."""

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.self = _SelfAttentionCore(config)
        self.output = _AttentionOutput(config.hidden_size, config)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor, cache: _LayerCache | None = None) -> torch.Tensor:
        return self.output(self.self(x, additive_mask, cache), x)


class _CrossAttention(nn.Module):
    """``crossattention`` of a layer: ``self`` (text attends image) then ``output``, ``[B, L, hidden]``."""

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.self = _CrossAttentionCore(config)
        self.output = _AttentionOutput(config.hidden_size, config)

    def forward(self, x, image_embeds, image_mask, cache: _LayerCache | None = None):
        return self.output(self.self(x, image_embeds, image_mask, cache), x)


# Adapted from transformers' modeling_bert.BertIntermediate.
class _Intermediate(nn.Module):
    """Feed-forward up-projection with exact GELU: ``[B, L, hidden] -> [B, L, intermediate]``."""

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


# Adapted from BLIP med.py's BertLayer (transformers' modeling_bert.BertLayer + cross-attention).
class MEDLayer(nn.Module):
    """One MED layer: self-attention (``attention`` for the encoders, ``decoder_attention`` for the
    decoder), cross-attention to the image (multimodal / decoder modes), feed-forward. All but the
    self-attention is shared by the three modes. ``cache``: this layer's :class:`_LayerCache` when
    decoding with a :class:`DecoderCache`."""

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.attention = _SelfAttention(config)
        self.decoder_attention = _SelfAttention(config)
        self.crossattention = _CrossAttention(config)
        self.intermediate = _Intermediate(config)
        self.output = _AttentionOutput(config.intermediate_size, config)

    def forward(self, x, additive_mask, mode, image_embeds, image_mask, cache: _LayerCache | None = None):
        x = (self.decoder_attention if mode == "decoder" else self.attention)(x, additive_mask, cache)
        if mode != "text":
            x = self.crossattention(x, image_embeds, image_mask, cache)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    """The ``layer`` list (a container, so that parameter names read ``encoder.layer.N.*``)."""

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.layer = nn.ModuleList(MEDLayer(config) for _ in range(config.num_hidden_layers))


class MEDTextModel(nn.Module):
    """BLIP's text transformer in its three modes (module docstring).

    ``forward(input_ids [B, L], attention_mask [B, P + L] or None, *, mode, image_embeds [B, S, W],
    image_mask [B, S] bool or None, cache) -> [B, L, hidden]``. ``cache`` (decoder mode only): a
    :class:`DecoderCache` holding the keys / values of the ``P`` tokens before ``input_ids`` (P = 0
    without one, or for an empty one); it is extended by ``input_ids``.
    """

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, mode: str = "text",
                image_embeds: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                cache: DecoderCache | None = None) -> torch.Tensor:
        check_token_ids("input_ids", input_ids)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if cache is not None and mode != "decoder":
            raise ValueError(f"cache is for mode='decoder' (cached generation), got mode={mode!r}")
        b, length = input_ids.shape
        past = 0 if cache is None else cache.get_seq_length()
        total = past + length
        if total > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {length} tokens (+ {past} cached), more than max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if mode != "text":
            _check_image_inputs(image_embeds, image_mask, b, self.config.encoder_width)
        if attention_mask is None:
            attention_mask = torch.ones(b, total, dtype=torch.long, device=input_ids.device)
        elif tuple(attention_mask.shape) != (b, total):
            raise ValueError(f"attention_mask must be [B, cached + L] = {(b, total)}, got "
                             f"{tuple(attention_mask.shape)}")
        x = self.embeddings(input_ids, past)
        allowed = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T] keys
        if mode == "decoder":  # query i (position past + i) sees keys 0 .. past + i
            allowed = allowed & torch.ones(length, total, dtype=torch.bool, device=x.device).tril(past)
        additive = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~allowed, torch.finfo(x.dtype).min)
        for index, layer in enumerate(self.encoder.layer):
            x = layer(x, additive, mode, image_embeds, image_mask, None if cache is None else cache.layer(index))
        return x


def _check_image_inputs(image_embeds, image_mask, batch: int, width: int) -> None:
    """Raise ``ValueError`` unless ``image_embeds`` is ``[batch, S, width]`` and ``image_mask`` is None or
    bool ``[batch, S]``."""
    if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3:
        got = tuple(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__
        raise ValueError(f"image_embeds must be a [B, S, encoder_width] tensor for the image-grounded modes, got {got}")
    if image_embeds.shape[0] != batch or image_embeds.shape[2] != width:
        raise ValueError(f"image_embeds must be [B={batch}, S, encoder_width={width}], got {tuple(image_embeds.shape)}")
    if image_mask is not None and (image_mask.dtype != torch.bool or tuple(image_mask.shape) != image_embeds.shape[:2]):
        raise ValueError(f"image_mask must be a bool [B, S] = {tuple(image_embeds.shape[:2])} tensor "
                         f"(False = padding), got {image_mask.dtype} {tuple(image_mask.shape)}")


# Adapted from transformers' modeling_bert.BertPredictionHeadTransform.
class _PredictionTransform(nn.Module):
    """``dense``, GELU, ``LayerNorm``: ``[.., hidden] -> [.., hidden]``."""

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


# Adapted from transformers' modeling_bert.BertLMPredictionHead.
class _Predictions(nn.Module):
    """``transform`` then the ``decoder`` projection to the vocabulary: ``[.., hidden] -> [.., vocab]``."""

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.transform = _PredictionTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, x):
        return self.decoder(self.transform(x))


# Adapted from transformers' modeling_bert.BertOnlyMLMHead.
class LMHead(nn.Module):
    """BERT's LM head (``predictions.transform`` then ``predictions.decoder``): ``[.., hidden] -> [.., vocab]``."""

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.predictions = _Predictions(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)


__all__ = ["DecoderCache", "LMHead", "MEDConfig", "MEDLayer", "MEDTextModel", "MODES"]


def with_first_token(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """A copy of ``input_ids`` ``[N, L]`` whose first column is ``token_id``: BLIP swaps the tokenizer's
    ``[CLS]`` for the mode's token (``[ENC]`` for the multimodal encoder, ``[DEC]`` for the decoder)."""
    check_token_ids("input_ids", input_ids)
    out = input_ids.clone()
    out[:, 0] = token_id
    return out
