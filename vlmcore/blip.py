"""BLIP (Li et al. 2022): the multimodal mixture of encoder-decoder (MED), ITC, ITM and captioning.

One BERT-style text transformer is used three ways:

- unimodal text encoder (``mode="text"``): bidirectional self-attention only, ``[CLS]`` first;
- image-grounded text encoder (``mode="multimodal"``): bidirectional self-attention, then
  cross-attention to every image token in every layer, ``[ENC]`` first; the ITM head reads its
  first token;
- image-grounded text decoder (``mode="decoder"``): causal self-attention, the same
  cross-attention and feed-forward, ``[DEC]`` (BOS) first; the LM head predicts the next token.

Encoder and decoder share every parameter except the self-attention blocks (BLIP's best setting):
each layer holds ``attention`` (encoder) and ``decoder_attention`` (decoder), and one
``crossattention``, ``intermediate``, ``output``. Cross-attention runs on
:func:`vlmcore.kernels.resampler_attention` (the no-latents form, with an image padding mask).

Parameter names follow Hugging Face ``transformers`` (``BlipForImageTextRetrieval`` and
``BlipForConditionalGeneration``), whose state dicts load by name:
:meth:`BLIP.load_hf_retrieval_state_dict`, :meth:`BLIP.load_hf_captioning_state_dict`. The original
salesforce/BLIP ``.pth`` checkpoints load by name too: :meth:`BLIP.load_salesforce_state_dict`, or
:func:`blip_from_salesforce` (builds the model from the checkpoint's shapes, then loads it).
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmcore._checks import check_positive_int, check_token_ids
from vlmcore.distributed import all_gather_no_grad, all_gather_with_grad
from vlmcore.kernels import momentum_contrastive_loss, resampler_attention
from vlmcore.vision import HFVisionAdapter, vision_width

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


# ----------------------------------------------------------------------------------------------
# text transformer (MED)
# ----------------------------------------------------------------------------------------------


class _Embeddings(nn.Module):
    """Word + learned position embeddings, LayerNorm, dropout: ``[B, L] -> [B, L, hidden]``."""

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class _SelfAttentionCore(nn.Module):
    """``query`` / ``key`` / ``value`` projections and scaled dot-product self-attention.

    ``forward(x [B, L, hidden], additive_mask [B, 1, L, L]) -> [B, L, hidden]`` (before the
    output projection). The mask is additive (0 or the dtype's minimum), as BERT / HF eager.
    """

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape
        shape = (b, length, self.heads, width // self.heads)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask.to(q.dtype),
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, length, width)


class _CrossAttentionCore(nn.Module):
    """Text queries attend image tokens through :func:`vlmcore.kernels.resampler_attention`.

    ``forward(x [B, L, hidden], image_embeds [B, S, encoder_width], image_mask [B, S] bool or None)
    -> [B, L, hidden]``. Attention dropout is not applied (the fused op has none; BLIP trains with
    attention dropout 0).
    """

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.encoder_width, config.hidden_size)
        self.value = nn.Linear(config.encoder_width, config.hidden_size)

    def forward(self, x: torch.Tensor, image_embeds: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        b, length, width = x.shape
        head_dim = width // self.heads
        q = self.query(x).view(b, length, self.heads, head_dim)
        image_embeds = image_embeds.to(q.dtype)
        k = self.key(image_embeds).view(b, image_embeds.shape[1], self.heads, head_dim)
        v = self.value(image_embeds).view(b, image_embeds.shape[1], self.heads, head_dim)
        return resampler_attention(q, k, v, media_mask=image_mask).reshape(b, length, width)


class _AttentionOutput(nn.Module):
    """``dense`` + dropout, residual, ``LayerNorm`` (BERT's post-norm sub-layer output)."""

    def __init__(self, width_in: int, config: MEDConfig):
        super().__init__()
        self.dense = nn.Linear(width_in, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _SelfAttention(nn.Module):
    def __init__(self, config: MEDConfig):
        super().__init__()
        self.self = _SelfAttentionCore(config)
        self.output = _AttentionOutput(config.hidden_size, config)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, additive_mask), x)


class _CrossAttention(nn.Module):
    def __init__(self, config: MEDConfig):
        super().__init__()
        self.self = _CrossAttentionCore(config)
        self.output = _AttentionOutput(config.hidden_size, config)

    def forward(self, x, image_embeds, image_mask):
        return self.output(self.self(x, image_embeds, image_mask), x)


class _Intermediate(nn.Module):
    def __init__(self, config: MEDConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class MEDLayer(nn.Module):
    """One MED layer: self-attention (``attention`` for the encoders, ``decoder_attention`` for the
    decoder), cross-attention to the image (multimodal / decoder modes), feed-forward. All but the
    self-attention is shared by the three modes."""

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.attention = _SelfAttention(config)
        self.decoder_attention = _SelfAttention(config)
        self.crossattention = _CrossAttention(config)
        self.intermediate = _Intermediate(config)
        self.output = _AttentionOutput(config.intermediate_size, config)

    def forward(self, x, additive_mask, mode, image_embeds, image_mask):
        x = (self.decoder_attention if mode == "decoder" else self.attention)(x, additive_mask)
        if mode != "text":
            x = self.crossattention(x, image_embeds, image_mask)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, config: MEDConfig):
        super().__init__()
        self.layer = nn.ModuleList(MEDLayer(config) for _ in range(config.num_hidden_layers))


class MEDTextModel(nn.Module):
    """BLIP's text transformer in its three modes (module docstring).

    ``forward(input_ids [B, L], attention_mask [B, L] or None, *, mode, image_embeds [B, S, W],
    image_mask [B, S] bool or None) -> [B, L, hidden]``.
    """

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, mode: str = "text",
                image_embeds: torch.Tensor | None = None, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_token_ids("input_ids", input_ids)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        b, length = input_ids.shape
        if length > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {length} tokens, more than max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if mode != "text":
            _check_image_inputs(image_embeds, image_mask, b, self.config.encoder_width)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif tuple(attention_mask.shape) != (b, length):
            raise ValueError(f"attention_mask must be [B, L] = {(b, length)}, got {tuple(attention_mask.shape)}")
        x = self.embeddings(input_ids)
        allowed = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L] keys
        if mode == "decoder":
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        additive = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~allowed, torch.finfo(x.dtype).min)
        for layer in self.encoder.layer:
            x = layer(x, additive, mode, image_embeds, image_mask)
        return x


def _check_image_inputs(image_embeds, image_mask, batch: int, width: int) -> None:
    if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3:
        got = tuple(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__
        raise ValueError(f"image_embeds must be a [B, S, encoder_width] tensor for the image-grounded modes, got {got}")
    if image_embeds.shape[0] != batch or image_embeds.shape[2] != width:
        raise ValueError(f"image_embeds must be [B={batch}, S, encoder_width={width}], got {tuple(image_embeds.shape)}")
    if image_mask is not None and (image_mask.dtype != torch.bool or tuple(image_mask.shape) != image_embeds.shape[:2]):
        raise ValueError(f"image_mask must be a bool [B, S] = {tuple(image_embeds.shape[:2])} tensor "
                         f"(False = padding), got {image_mask.dtype} {tuple(image_mask.shape)}")


class _PredictionTransform(nn.Module):
    def __init__(self, config: MEDConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class _Predictions(nn.Module):
    def __init__(self, config: MEDConfig):
        super().__init__()
        self.transform = _PredictionTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, x):
        return self.decoder(self.transform(x))


class LMHead(nn.Module):
    """BERT's LM head (``predictions.transform`` then ``predictions.decoder``): ``[.., hidden] -> [.., vocab]``."""

    def __init__(self, config: MEDConfig):
        super().__init__()
        self.predictions = _Predictions(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------


def blip_vision_encoder(**vision_config) -> HFVisionAdapter:
    """BLIP's ViT as a transformers ``BlipVisionModel`` (random init) in :class:`HFVisionAdapter`.

    Keyword arguments go to ``BlipVisionConfig`` (``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``intermediate_size``, ``image_size``, ``patch_size``, ...). This is
    the encoder whose weights load from HF BLIP checkpoints (``vision_model.*``).
    """
    from transformers import BlipVisionConfig, BlipVisionModel

    # BLIP's ITC / ITM read the CLS token: keep it (adapters drop prefix tokens by default).
    return HFVisionAdapter(BlipVisionModel(BlipVisionConfig(**vision_config)), prefix_tokens="keep")


class BLIP(nn.Module):
    """BLIP: image encoder + MED text transformer + ITC projections + ITM head + LM head.

    Args:
        visual_encoder: images ``[B, C, H, W]`` -> tokens ``[B, S, width]`` (first token = CLS):
            :class:`vlmcore.VisionTransformer`, an adapter, or :func:`blip_vision_encoder`.
        text_config: :class:`MEDConfig`; ``encoder_width`` must equal the image token width.
        embed_dim: ITC feature width (256 in BLIP).

        momentum: EMA coefficient of the momentum encoders (BLIP: 0.995); ``None`` builds no momentum
            encoders and no queues (captioning, inference), and :meth:`forward` then needs
            ``losses`` without ``"itc"``.
        queue_size: momentum features kept per modality (BLIP: 57,600); 0 = no queue.
        temperature: initial ITC temperature (BLIP: 0.07); clamped to [0.001, 0.5] at every forward.
    """

    def __init__(self, visual_encoder: nn.Module, text_config: MEDConfig, *, embed_dim: int = 256,
                 momentum: float | None = 0.995, queue_size: int = 57600, temperature: float = 0.07):
        super().__init__()
        if not isinstance(text_config, MEDConfig):
            raise TypeError(f"text_config must be a MEDConfig, got {type(text_config).__name__}")
        check_positive_int("embed_dim", embed_dim)
        width = vision_width(visual_encoder)
        if width != text_config.encoder_width:
            raise ValueError(f"text_config.encoder_width ({text_config.encoder_width}) must equal the visual "
                             f"encoder's token width ({width})")
        self.config = text_config
        self.embed_dim = embed_dim
        self.visual_encoder = visual_encoder
        self.text_encoder = MEDTextModel(text_config)
        self.lm_head = LMHead(text_config)
        if text_config.tie_word_embeddings:
            self.lm_head.predictions.decoder.weight = self.text_encoder.embeddings.word_embeddings.weight
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(text_config.hidden_size, embed_dim)
        self.itm_head = nn.Linear(text_config.hidden_size, 2)
        if not 0.001 <= float(temperature) <= 0.5:
            raise ValueError(f"temperature must be in [0.001, 0.5], got {temperature!r}")
        self.temp = nn.Parameter(torch.tensor(float(temperature)))
        self.momentum = momentum
        if momentum is not None:
            if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
                raise ValueError(f"momentum must be a float in [0, 1) or None, got {momentum!r}")
            if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
                raise ValueError(f"queue_size must be an int >= 0, got {queue_size!r}")
            self.visual_encoder_m = _frozen_copy(visual_encoder)
            self.vision_proj_m = _frozen_copy(self.vision_proj)
            self.text_encoder_m = _frozen_copy(self.text_encoder)
            self.text_proj_m = _frozen_copy(self.text_proj)
            self.register_buffer("image_queue", F.normalize(torch.randn(queue_size, embed_dim), dim=1))
            self.register_buffer("text_queue", F.normalize(torch.randn(queue_size, embed_dim), dim=1))
            # image ids of the queued entries (BLIP retrieval's idx_queue); -100 matches no sample
            self.register_buffer("idx_queue", torch.full((queue_size,), -100, dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # -- the three text modes and the heads ------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image tokens ``[B, S, width]`` (CLS first)."""
        return self.visual_encoder(images)

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """ITC image features: ``normalize(vision_proj(CLS))``, ``[B, embed_dim]``."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ITC text features from the unimodal encoder: ``normalize(text_proj(first token))``, ``[B, embed_dim]``.
        ``input_ids`` are used as given (BLIP: ``[CLS]`` first)."""
        hidden = self.text_encoder(input_ids, attention_mask, mode="text")
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                   *, replace_first_token: bool = True) -> torch.Tensor:
        """ITM logits ``[B, 2]`` (index 1 = match) of the image-grounded encoder's first token.

        With ``replace_first_token`` the first id becomes ``[ENC]`` (BLIP); HF's
        ``BlipForImageTextRetrieval`` uses the ids as given (``replace_first_token=False``).
        """
        if replace_first_token:
            input_ids = _with_first_token(input_ids, self.config.enc_token_id)
        hidden = self.text_encoder(input_ids, attention_mask, mode="multimodal", image_embeds=image_embeds,
                                   image_mask=image_mask)
        return self.itm_head(hidden[:, 0])

    def itm_match_probability(self, images: torch.Tensor, input_ids: torch.Tensor,
                              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``softmax(ITM logits)[:, 1]``, ``[B]``: the probability that caption i matches image i (CapFilt's filter)."""
        return self.itm_logits(self.encode_image(images), input_ids, attention_mask).float().softmax(-1)[:, 1]

    def decoder_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, image_mask: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Next-token logits ``[B, L, vocab]`` of the image-grounded decoder (ids used as given)."""
        hidden = self.text_encoder(input_ids, attention_mask, mode="decoder", image_embeds=image_embeds,
                                   image_mask=image_mask)
        return self.lm_head(hidden)

    def lm_loss(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *, prompt_length: int = 0, label_smoothing: float = 0.1, image_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """BLIP's captioning loss, an fp32 scalar.

        The first id becomes ``[DEC]``; targets are the ids shifted by one, with padding and the
        first ``prompt_length`` positions (BOS + the prompt's tokens, e.g. "a picture of ")
        excluded; cross-entropy with ``label_smoothing`` (0.1 in BLIP), mean over target tokens.
        """
        check_token_ids("input_ids", input_ids)
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 0:
            raise ValueError(f"prompt_length must be an int >= 0, got {prompt_length!r}")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        decoder_ids = _with_first_token(input_ids, self.config.bos_token_id)
        labels = decoder_ids.masked_fill(decoder_ids == self.config.pad_token_id, -100)
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)
        labels[:, :prompt_length] = -100
        logits = self.decoder_logits(image_embeds, decoder_ids, attention_mask, image_mask)
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100, label_smoothing=float(label_smoothing))

    def itc_similarity(self, images: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine similarities ``[B_images, B_texts]`` of the ITC features (HF ``use_itm_head=False``)."""
        return self.image_features(self.encode_image(images)) @ self.text_features(input_ids, attention_mask).T

    # -- momentum encoders, queues, pre-training losses -------------------------------------

    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.visual_encoder, self.visual_encoder_m), (self.vision_proj, self.vision_proj_m),
                (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]

    def _require_momentum(self, what: str) -> None:
        if self.momentum is None:
            raise ValueError(f"{what} needs the momentum encoders: build BLIP with momentum=<float> (not None)")

    @torch.no_grad()
    def copy_params_to_momentum(self) -> None:
        """Momentum encoders := online encoders (BLIP does this at init and after loading weights)."""
        self._require_momentum("copy_params_to_momentum")
        for online, momentum in self._momentum_pairs():
            for p, p_m in zip(online.parameters(), momentum.parameters()):
                p_m.copy_(p)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``theta_m = m theta_m + (1 - m) theta`` for every momentum parameter (one fused foreach op)."""
        self._require_momentum("momentum_update")
        online, momentum = [], []
        for a, b in self._momentum_pairs():
            online.extend(a.parameters())
            momentum.extend(b.parameters())
        torch._foreach_mul_(momentum, self.momentum)
        torch._foreach_add_(momentum, online, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def momentum_features(self, images: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """ITC features of the momentum encoders, ``([B, embed_dim], [B, embed_dim])``, no gradient."""
        self._require_momentum("momentum_features")
        image_m = F.normalize(self.vision_proj_m(self.visual_encoder_m(images)[:, 0]), dim=-1)
        text_m = F.normalize(self.text_proj_m(self.text_encoder_m(input_ids, attention_mask, mode="text")[:, 0]),
                             dim=-1)
        return image_m, text_m

    @torch.no_grad()
    def enqueue(self, image_features_m: torch.Tensor, text_features_m: torch.Tensor, group=None,
                image_ids: torch.Tensor | None = None) -> None:
        """Write the momentum features of this step and their ``image_ids`` ``[B]`` (-100 when None:
        matches no later sample) into the queues at ``queue_ptr``, gathered from every rank of
        ``group`` when given (rank order), wrapping around; no host sync."""
        self._require_momentum("enqueue")
        queue_size = self.image_queue.shape[0]
        if queue_size == 0:
            return
        if image_ids is None:
            image_ids = torch.full((image_features_m.shape[0],), -100, dtype=torch.long,
                                   device=image_features_m.device)
        if group is not None:
            image_features_m = all_gather_no_grad(image_features_m, group)
            text_features_m = all_gather_no_grad(text_features_m, group)
            image_ids = all_gather_no_grad(image_ids, group)
        n = image_features_m.shape[0]
        if n > queue_size:
            raise ValueError(f"queue_size ({queue_size}) must be >= the global batch ({n}) that is enqueued per step")
        slots = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % queue_size
        self.image_queue.index_copy_(0, slots, image_features_m.to(self.image_queue.dtype))
        self.text_queue.index_copy_(0, slots, text_features_m.to(self.text_queue.dtype))
        self.idx_queue.index_copy_(0, slots, image_ids.to(self.idx_queue.device, torch.long))
        self.queue_ptr.copy_((self.queue_ptr + n) % queue_size)

    def itc_loss(self, image_features: torch.Tensor, text_features: torch.Tensor, image_features_m: torch.Tensor,
                 text_features_m: torch.Tensor, alpha: float, image_ids: torch.Tensor | None = None) -> torch.Tensor:
        """BLIP's ITC with momentum distillation against [momentum batch; queue], through the fused
        :func:`vlmcore.kernels.momentum_contrastive_loss` (fp32 scalar). With ``image_ids`` ``[B]``
        every batch or queue entry of the same image is a positive (BLIP ``blip_retrieval.py``);
        with unique ids this is exactly the one-hot target of BLIP pre-training."""
        self._require_momentum("itc_loss")
        queued = self.image_queue.shape[0] > 0
        return momentum_contrastive_loss(
            image_features, text_features, image_features_m, text_features_m, self.temp, alpha,
            image_queue=self.image_queue.to(image_features.dtype) if queued else None,
            text_queue=self.text_queue.to(text_features.dtype) if queued else None,
            ids=image_ids, queue_ids=self.idx_queue if queued and image_ids is not None else None)

    def itm_loss(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 image_features: torch.Tensor, text_features: torch.Tensor, *, image_ids: torch.Tensor | None = None,
                 negatives_group=None, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM loss with one hard negative per row in each direction (BLIP).

        Negatives are drawn from ``softmax(ITC similarity / temp)`` by :func:`sample_hard_negatives`,
        never a positive: the diagonal, or with ``image_ids`` every pair of the same image. With
        ``negatives_group`` (retrieval fine-tuning, ``blip_retrieval.py``), the candidates are the
        whole batch of every rank: features, ids, masks and image ids are all-gathered, image tokens
        with a differentiable all-gather. Rows without any negative count 0. Returns ``(loss fp32
        scalar, accuracy of the 3B ITM decisions)``.
        """
        b = image_embeds.shape[0]
        offset = 0
        all_embeds, all_ids, all_mask = image_embeds, input_ids, attention_mask
        all_image_feat, all_text_feat, all_image_ids = image_features, text_features, image_ids
        if negatives_group is not None:
            import torch.distributed as dist


            offset = dist.get_rank(negatives_group) * b
            all_embeds = all_gather_with_grad(image_embeds.reshape(b, -1), negatives_group).view(
                -1, *image_embeds.shape[1:])
            all_ids = all_gather_no_grad(input_ids, negatives_group)
            all_mask = all_gather_no_grad(attention_mask, negatives_group)
            all_image_feat = all_gather_no_grad(image_features.detach(), negatives_group)
            all_text_feat = all_gather_no_grad(text_features.detach(), negatives_group)
            if image_ids is not None:
                all_image_ids = all_gather_no_grad(image_ids, negatives_group)
        with torch.no_grad():
            temp = self.temp.float()
            sim_i2t = (image_features @ all_text_feat.T).float() / temp  # [b, world b]
            sim_t2i = (text_features @ all_image_feat.T).float() / temp
            if image_ids is None:
                columns = torch.arange(all_ids.shape[0], device=image_embeds.device)
                positive = columns[None, :] == (torch.arange(b, device=image_embeds.device) + offset)[:, None]
            else:
                positive = image_ids[:, None] == all_image_ids[None, :]
            neg_text, text_ok = sample_hard_negatives(sim_i2t, positive, generator=generator)
            neg_image, image_ok = sample_hard_negatives(sim_t2i, positive, generator=generator)
        ids_cat = torch.cat([input_ids, input_ids, all_ids[neg_text]])
        mask_cat = torch.cat([attention_mask, attention_mask, all_mask[neg_text]])
        embeds_cat = torch.cat([image_embeds, all_embeds[neg_image], image_embeds])
        logits = self.itm_logits(embeds_cat, ids_cat, mask_cat).float()
        labels = torch.cat([torch.ones(b, dtype=torch.long, device=logits.device),
                            torch.zeros(2 * b, dtype=torch.long, device=logits.device)])
        weight = torch.cat([torch.ones_like(image_ok), image_ok, text_ok]).float()
        per_row = F.cross_entropy(logits, labels, reduction="none")
        loss = (per_row * weight).sum() / weight.sum().clamp_min(1.0)
        accuracy = (((logits.argmax(1) == labels).float() * weight).sum() / weight.sum().clamp_min(1.0)).detach()
        return loss, accuracy

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                alpha: float = 0.4, losses: tuple[str, ...] = ("itc", "itm", "lm"), prompt_length: int = 0,
                image_ids: torch.Tensor | None = None, group=None, all_rank_negatives: bool = False,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One BLIP training step's losses (``blip_pretrain.py``): ``{"loss", "itc", "itm", "lm", "itm_acc"}``
        for the requested ``losses``; ``loss`` is their sum.

        ``input_ids`` ``[B, L]`` start with ``[CLS]`` (the ITC text encoder reads them as given; ITM
        swaps in ``[ENC]``, LM ``[DEC]``). ``alpha``: distillation weight (see :func:`alpha_ramp`).
        ITC clamps the temperature to [0.001, 0.5], updates the momentum encoders, scores against
        the queues, then enqueues the momentum features (of every rank of ``group``).
        ``image_ids`` ``[B]`` (int64) makes same-image pairs ITC positives (batch and queue) and masks
        them out of the ITM negatives; ``all_rank_negatives`` draws
        them from every rank of ``group`` (retrieval fine-tuning) instead of the local batch
        (pre-training). ``prompt_length`` excludes the prompt from the LM loss.
        """
        unknown = set(losses) - {"itc", "itm", "lm"}
        if unknown or not losses:
            raise ValueError(f"losses must be a non-empty subset of ('itc', 'itm', 'lm'), got {losses!r}")
        check_token_ids("input_ids", input_ids)
        if all_rank_negatives and group is None:
            raise ValueError("all_rank_negatives=True needs group (the data-parallel process group)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out: dict[str, torch.Tensor] = {}
        image_embeds = self.encode_image(images)
        if "itc" in losses or "itm" in losses:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            image_feat = self.image_features(image_embeds)
            text_feat = self.text_features(input_ids, attention_mask)
        if "itc" in losses:
            self._require_momentum("the ITC loss")
            with torch.no_grad():
                self.momentum_update()
                image_feat_m, text_feat_m = self.momentum_features(images, input_ids, attention_mask)
            out["itc"] = self.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, alpha, image_ids)
            self.enqueue(image_feat_m, text_feat_m, group, image_ids)
        if "itm" in losses:
            out["itm"], out["itm_acc"] = self.itm_loss(image_embeds, input_ids, attention_mask, image_feat,
                                                       text_feat, image_ids=image_ids, generator=generator,
                                                       negatives_group=group if all_rank_negatives else None)
        if "lm" in losses:
            out["lm"] = self.lm_loss(image_embeds, input_ids, attention_mask, prompt_length=prompt_length)
        out["loss"] = sum(out[name] for name in ("itc", "itm", "lm") if name in out)
        return out

    @torch.no_grad()
    def retrieval_scores(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         *, k_test: int = 256, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """BLIP's retrieval scores: ITC similarity, with each query's top ``k_test`` candidates
        re-ranked by ``ITM logit(match) + ITC similarity`` (BLIP ``evaluation``); others get -100.

        Returns ``(score_i2t [N_img, N_txt], score_t2i [N_txt, N_img])`` (fp32).
        """
        check_positive_int("k_test", k_test)
        check_positive_int("batch_size", batch_size)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = torch.cat([self.encode_image(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        image_feat = self.image_features(embeds)
        text_feat = torch.cat([self.text_features(input_ids[i:i + batch_size], attention_mask[i:i + batch_size])
                               for i in range(0, len(input_ids), batch_size)])
        sim = (image_feat @ text_feat.T).float()

        def rerank(similarity: torch.Tensor, image_of, text_of) -> torch.Tensor:
            scores = torch.full_like(similarity, -100.0)
            k = min(k_test, similarity.shape[1])
            top_sim, top_idx = similarity.topk(k, dim=1)
            for row in range(similarity.shape[0]):
                img, txt = image_of(row, top_idx[row]), text_of(row, top_idx[row])
                itm = self.itm_logits(embeds[img], input_ids[txt], attention_mask[txt])[:, 1].float()
                scores[row, top_idx[row]] = itm + top_sim[row]
            return scores

        score_i2t = rerank(sim, lambda row, idx: torch.full_like(idx, row), lambda row, idx: idx)
        score_t2i = rerank(sim.T, lambda row, idx: idx, lambda row, idx: torch.full_like(idx, row))
        return score_i2t, score_t2i

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompt_ids: list[int] | None = None, *, num_beams: int = 3,
                 do_sample: bool = False, top_p: float = 0.9, max_length: int = 30, min_length: int = 10,
                 repetition_penalty: float = 1.0, num_return_sequences: int = 1, **generate_kwargs) -> torch.Tensor:
        """Captions for ``images`` ``[B, C, H, W]``, as BLIP generates them.

        The decoder input is ``[DEC] + prompt_ids`` (BLIP: the tokens of "a picture of " without
        ``[CLS]`` / ``[SEP]``); decoding stops at ``[SEP]``, pads with the pad id. Beam search by
        default (BLIP: 3 beams, max 30, min 10 tokens); ``do_sample=True`` is nucleus sampling with
        ``top_p`` (BLIP: 0.9, ``repetition_penalty=1.1``). ``max_length`` / ``min_length`` count the
        whole sequence, prompt included (as Hugging Face and BLIP do). Runs Hugging Face's
        ``GenerationMixin.generate`` over this model's decoder; extra keyword arguments go there.

        Returns:
            ``[B * num_return_sequences, T]`` token ids after the prompt (the caption; BLIP strips
            the prompt the same way), padded with ``pad_token_id``.
        """
        prompt_ids = [] if prompt_ids is None else [int(t) for t in prompt_ids]
        if any(not 0 <= t < self.config.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt_ids must be token ids in [0, {self.config.vocab_size}), got {prompt_ids}")
        check_positive_int("max_length", max_length)
        if max_length <= 1 + len(prompt_ids):
            raise ValueError(f"max_length ({max_length}) must exceed 1 + len(prompt_ids) ({1 + len(prompt_ids)})")
        if not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        image_embeds = self.encode_image(images)
        b = image_embeds.shape[0]
        input_ids = torch.tensor([[self.config.bos_token_id, *prompt_ids]], device=image_embeds.device).repeat(b, 1)
        wrapper = _decoder_for_generation_class()(self)
        sampling = dict(do_sample=True, top_p=float(top_p), num_beams=1) if do_sample else dict(
            do_sample=False, num_beams=int(num_beams))
        out = wrapper.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            encoder_hidden_states=image_embeds,
            max_length=int(max_length), min_length=int(min_length), repetition_penalty=float(repetition_penalty),
            num_return_sequences=int(num_return_sequences), eos_token_id=self.config.sep_token_id,
            pad_token_id=self.config.pad_token_id, bos_token_id=self.config.bos_token_id, use_cache=False,
            **sampling, **generate_kwargs,
        )
        return out[:, input_ids.shape[1]:]

    # -- Hugging Face weights ------------------------------------------------------------------

    def load_hf_retrieval_state_dict(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """Load a transformers ``BlipForImageTextRetrieval`` state dict by name.

        Loads the vision model, the text encoder (self-attention = the encoders' ``attention``,
        cross-attention and feed-forward shared with the decoder), ``vision_proj``, ``text_proj``
        and ``itm_head``. Unknown, missing or mis-shaped names raise ``ValueError`` listing them.
        Returns the names of this model's parameters the checkpoint does not cover (the
        decoder's self-attention, the LM head, ``temp``, momentum copies).
        """
        def rename(key: str) -> str | None:
            for hf, ours in (("vision_model.", "visual_encoder.model."), ("text_encoder.", "text_encoder."),
                             ("vision_proj.", "vision_proj."), ("text_proj.", "text_proj."),
                             ("itm_head.", "itm_head.")):
                if key.startswith(hf):
                    return ours + key[len(hf):]
            return None

        def covers(key: str) -> bool:
            if key.startswith("text_encoder."):
                return ".decoder_attention." not in key
            return key.startswith(("visual_encoder.", "vision_proj.", "text_proj.", "itm_head."))

        return self._load_renamed(state_dict, rename, covers, "BlipForImageTextRetrieval")

    def load_hf_captioning_state_dict(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """Load a transformers ``BlipForConditionalGeneration`` state dict by name.

        ``text_decoder.bert.*`` fills the shared text transformer with its self-attention mapped
        to ``decoder_attention``; ``text_decoder.cls.*`` the LM head. Tied copies (the LM decoder
        weight / bias) must equal their source. Unknown, missing or mis-shaped names raise
        ``ValueError``. Returns this model's parameters the checkpoint does not cover.
        """
        def rename(key: str) -> str | None:
            if key.startswith("vision_model."):
                return "visual_encoder.model." + key[len("vision_model."):]
            if key.startswith("text_decoder.bert."):
                rest = key[len("text_decoder.bert."):]
                return "text_encoder." + rest.replace(".attention.", ".decoder_attention.", 1)
            if key == "text_decoder.cls.predictions.bias":
                return "lm_head.predictions.decoder.bias"
            if key.startswith("text_decoder.cls."):
                return "lm_head." + key[len("text_decoder.cls."):]
            return None

        state_dict = dict(state_dict)
        hf_bias = state_dict.pop("text_decoder.cls.predictions.decoder.bias", None)
        if hf_bias is not None and "text_decoder.cls.predictions.bias" in state_dict and not torch.equal(
                hf_bias, state_dict["text_decoder.cls.predictions.bias"]):
            raise ValueError("text_decoder.cls.predictions.decoder.bias differs from text_decoder.cls.predictions.bias "
                             "(they are one tied parameter in BLIP)")
        if self.config.tie_word_embeddings:
            hf_weight = state_dict.pop("text_decoder.cls.predictions.decoder.weight", None)
            word = state_dict.get("text_decoder.bert.embeddings.word_embeddings.weight")
            if hf_weight is not None and word is not None and not torch.equal(hf_weight, word):
                raise ValueError("text_decoder.cls.predictions.decoder.weight differs from the word embeddings, but "
                                 "this model ties them (MEDConfig.tie_word_embeddings=True)")
        def covers(key: str) -> bool:
            if key.startswith("text_encoder."):
                return ".attention." not in key  # the encoders' own self-attention is not in a captioner
            return key.startswith(("visual_encoder.", "lm_head."))

        return self._load_renamed(state_dict, rename, covers, "BlipForConditionalGeneration")

    def _load_renamed(self, state_dict, rename, covers, source: str) -> list[str]:
        """Copy ``state_dict`` into this model under ``rename(hf_key)``; ``covers(our_key)`` says which of
        our weights the source must provide. Returns our state-dict names it left untouched."""
        own = self.state_dict()
        self._require_blip_vision(source)
        targets: dict[str, torch.Tensor] = {}
        unknown = []
        for key, value in state_dict.items():
            ours = rename(key)
            if ours is None or ours not in own:
                unknown.append(key)
            elif tuple(own[ours].shape) != tuple(value.shape):
                raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape "
                                 f"{tuple(own[ours].shape)} ({ours})")
            else:
                targets[ours] = value
        if unknown:
            raise ValueError(f"{len(unknown)} {source} weights have no counterpart in this BLIP: {unknown[:10]}")
        expected = {k for k in own if covers(k)}
        if self.config.tie_word_embeddings:
            expected.discard("lm_head.predictions.decoder.weight")
        missing = sorted(expected - set(targets))
        if missing:
            raise ValueError(f"{len(missing)} weights of this BLIP are missing from the {source} state dict: "
                             f"{missing[:10]}")
        with torch.no_grad():
            params = dict(self.named_parameters())
            params.update(dict(self.named_buffers()))
            for name, value in targets.items():
                params[name].copy_(value)
        if self.momentum is not None:
            self.copy_params_to_momentum()
        tied = {"lm_head.predictions.decoder.weight"} if self.config.tie_word_embeddings else set()
        return sorted(k for k in set(own) - set(targets) - tied if not k.startswith(MOMENTUM_STATE))

    def _require_blip_vision(self, source: str) -> None:
        own = self.state_dict()
        if not all(k.startswith("visual_encoder.model.") for k in own if k.startswith("visual_encoder.")):
            raise ValueError(f"loading {source} weights needs the visual encoder built by blip_vision_encoder() "
                             "(HFVisionAdapter over BlipVisionModel)")

    # -- salesforce/BLIP weights -----------------------------------------------------------------

    def load_salesforce_state_dict(self, state_dict: dict[str, torch.Tensor], *, load_momentum: bool = True,
                                   interpolate_pos_embed: bool = False) -> list[str]:
        """Load a state dict of the original salesforce/BLIP code (``torch.load(path)["model"]`` of
        ``model_base.pth``, ``model_base_capfilt_large.pth``, ``model_base_retrieval_coco.pth``,
        ``model_base_caption_capfilt_large.pth``, ...) by name.

        What maps where (salesforce -> this model):

        - ``visual_encoder.*`` (timm-0.4 ViT: ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
          ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``) -> the
          ``BlipVisionModel`` in ``visual_encoder.model`` (``embeddings.*``, ``encoder.layers.N.*``,
          ``post_layernorm``). Build the tower with :func:`blip_vision_encoder` and
          ``layer_norm_eps=1e-6`` (BLIP's ViT; another eps raises ``ValueError``).
        - ``text_encoder.*`` (BERT with ``crossattention``) -> ``text_encoder.*`` (same names);
          ``text_decoder.bert.*`` -> ``text_encoder.*`` with the self-attention in
          ``decoder_attention``. In a pre-training checkpoint both are present and the parameters
          BLIP ties (all but the self-attention) must be equal. ``text_decoder.cls.*`` -> ``lm_head``
          (``predictions.bias`` is the decoder bias; ``predictions.decoder.bias`` and, when this model
          ties them, ``predictions.decoder.weight`` must equal their tied source). ``position_ids``
          buffers must be ``arange`` and are dropped.
        - ``vision_proj``, ``text_proj``, ``itm_head``, ``temp`` -> the same names.
        - Momentum copies ``*_m`` -> ours; ``image_queue`` / ``text_queue`` ``[embed_dim, Q]`` ->
          ``[Q, embed_dim]`` (transposed); ``idx_queue`` ``[1, Q]`` -> ``[Q]`` (-100 when the
          checkpoint has queues but no ids: pre-training); ``ptr_queue`` / ``queue_ptr`` ->
          ``queue_ptr``. With ``load_momentum=False`` these entries are skipped. Momentum encoders
          the checkpoint does not provide are copied from the online ones (BLIP's ``copy_params``);
          the momentum text encoder's decoder self-attention (never used) too.

        Every part present must be complete (the vision tower always; the text encoder when any
        ``text_encoder.*`` is given; the decoder when any ``text_decoder.bert.*``; and so on).
        Unknown, missing or mis-shaped names raise ``ValueError`` listing them. A ``pos_embed`` of
        another resolution (e.g. a 224 px pre-training checkpoint into a 384 px model) raises,
        unless ``interpolate_pos_embed=True``: then its patch grid is resized bicubically
        (``align_corners=False``) with the CLS position kept, as salesforce's ``load_checkpoint``
        does. Returns this model's parameters the checkpoint does not cover (momentum state excluded).
        """
        self._require_blip_vision("salesforce BLIP")
        vision_config = self.visual_encoder.model.config
        if float(vision_config.layer_norm_eps) != 1e-6 or vision_config.hidden_act != "gelu":
            raise ValueError("salesforce BLIP's ViT uses LayerNorm eps 1e-6 and exact GELU; this visual encoder has "
                             f"layer_norm_eps={vision_config.layer_norm_eps}, hidden_act={vision_config.hidden_act!r}: "
                             "build it with blip_vision_encoder(..., layer_norm_eps=1e-6)")
        if load_momentum and self.momentum is None and any(_is_salesforce_momentum(k) for k in state_dict):
            raise ValueError("the checkpoint has momentum encoders / queues but this BLIP has none (momentum=None): "
                             "pass load_momentum=False to skip them")
        own = self.state_dict()
        targets: dict[str, tuple[torch.Tensor, str]] = {}
        unknown, mis_shaped, tied_copies = [], [], []
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state_dict[{key!r}] must be a tensor, got {type(value).__name__}")
            if _is_salesforce_momentum(key) and not load_momentum:
                continue
            if key.endswith("embeddings.position_ids") and key.startswith(("text_encoder", "text_decoder.bert.")):
                if not torch.equal(value.reshape(-1).cpu(), torch.arange(value.numel())):
                    raise ValueError(f"{key} is not arange({value.numel()}): this BLIP has no custom position ids")
                continue
            if key == "text_decoder.cls.predictions.decoder.bias":
                tied_copies.append((key, "text_decoder.cls.predictions.bias"))
                continue
            if key == "text_decoder.cls.predictions.decoder.weight" and self.config.tie_word_embeddings:
                tied_copies.append((key, "text_decoder.bert.embeddings.word_embeddings.weight"))
                continue
            ours, value = _salesforce_target(key, value)
            if ours is None or ours not in own:
                unknown.append(key)
                continue
            wanted = tuple(own[ours].shape)
            if interpolate_pos_embed and key.endswith("pos_embed") and tuple(value.shape) != wanted:
                value = _resize_pos_embed(key, value, wanted)
            if tuple(value.shape) != wanted:
                mis_shaped.append(f"{key}: checkpoint {tuple(value.shape)} != model {wanted} ({ours})")
            elif ours in targets:
                if not torch.equal(targets[ours][0], value):
                    raise ValueError(f"{key} differs from {targets[ours][1]}; both load into {ours}, which this "
                                     "BLIP shares between encoder and decoder (BLIP ties them)")
            else:
                targets[ours] = (value, key)
        if unknown:
            raise ValueError(f"{len(unknown)} salesforce BLIP weights have no counterpart in this BLIP: {unknown[:10]}")
        if mis_shaped:
            hint = " (pass interpolate_pos_embed=True to resize pos_embed)" if any(
                m.split(":")[0].endswith("pos_embed") for m in mis_shaped) else ""
            raise ValueError(f"{len(mis_shaped)} salesforce BLIP weights have another shape here{hint}: "
                             f"{mis_shaped[:10]}")
        for copy_key, source_key in tied_copies:
            if source_key in state_dict and not torch.equal(state_dict[copy_key], state_dict[source_key]):
                raise ValueError(f"{copy_key} differs from {source_key} (one tied parameter in BLIP)")
        missing = sorted(k for unit in self._salesforce_units(state_dict, set(targets)) for k in unit
                         if k not in targets)
        if missing:
            raise ValueError(f"{len(missing)} weights of this BLIP are missing from the salesforce BLIP state dict: "
                             f"{missing[:10]}")
        with torch.no_grad():
            params = dict(self.named_parameters())
            params.update(dict(self.named_buffers()))
            for name, (value, _) in targets.items():
                params[name].copy_(value)
            if self.momentum is not None:
                loaded = set(targets)
                if not any(k.startswith(_SALESFORCE_MOMENTUM) for k in loaded):  # same prefixes in both layouts
                    self.copy_params_to_momentum()
                else:  # the momentum text encoder's decoder self-attention is never used; keep it a copy
                    online = dict(self.text_encoder.named_parameters())
                    for name, p_m in self.text_encoder_m.named_parameters():
                        if ".decoder_attention." in name:
                            p_m.copy_(online[name])
                if "image_queue" in loaded and "idx_queue" not in loaded:
                    self.idx_queue.fill_(-100)  # pre-training queues carry no image ids: match nothing
        tied = {"lm_head.predictions.decoder.weight"} if self.config.tie_word_embeddings else set()
        return sorted(k for k in set(own) - set(targets) - tied if not k.startswith(MOMENTUM_STATE))

    def load_salesforce_checkpoint(self, path: str, **kwargs) -> list[str]:
        """:meth:`load_salesforce_state_dict` of :func:`read_salesforce_checkpoint` ``(path)``."""
        return self.load_salesforce_state_dict(read_salesforce_checkpoint(path), **kwargs)

    def _salesforce_units(self, state_dict, loaded: set[str]) -> list[list[str]]:
        """Groups of our state-dict names that a salesforce checkpoint provides all or nothing of."""
        own = [k for k in self.state_dict() if k != "lm_head.predictions.decoder.weight"
               or not self.config.tie_word_embeddings]

        def under(*prefixes, without=None):
            return [k for k in own if k.startswith(prefixes) and (without is None or without not in k)]

        units = [under("visual_encoder.")]  # always required
        if any(k.startswith("text_encoder.") for k in state_dict):
            units.append(under("text_encoder.", without=".decoder_attention."))
        if any(k.startswith("text_decoder.bert.") for k in state_dict):
            units.append(under("text_encoder.", without=".attention."))
        momentum_units = [under("visual_encoder_m.", "vision_proj_m.", "text_proj_m.") +
                          under("text_encoder_m.", without=".decoder_attention."),
                          [k for k in ("image_queue", "text_queue", "queue_ptr") if k in own]]
        for unit in [under("lm_head."), under("vision_proj."), under("text_proj."), under("itm_head."),
                     *momentum_units]:
            if any(k in loaded for k in unit):
                units.append(unit)
        return units


_SALESFORCE_MOMENTUM = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")
_SALESFORCE_QUEUES = ("image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr")
# timm-0.4 ViT block names (salesforce vit.py) -> transformers BlipEncoderLayer names
_SALESFORCE_VIT_BLOCK = (("norm1.", "layer_norm1."), ("attn.qkv.", "self_attn.qkv."),
                         ("attn.proj.", "self_attn.projection."), ("norm2.", "layer_norm2."), ("mlp.fc1.", "mlp.fc1."),
                         ("mlp.fc2.", "mlp.fc2."))
_SALESFORCE_VIT_TOP = {"patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                       "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                       "cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                       "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}


def _is_salesforce_momentum(key: str) -> bool:
    return key.startswith(_SALESFORCE_MOMENTUM) or key in _SALESFORCE_QUEUES


def _salesforce_vit_name(rest: str) -> str | None:
    if rest in _SALESFORCE_VIT_TOP:
        return _SALESFORCE_VIT_TOP[rest]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
    if match:
        for salesforce, hf in _SALESFORCE_VIT_BLOCK:
            if match[2].startswith(salesforce):
                return f"encoder.layers.{match[1]}.{hf}{match[2][len(salesforce):]}"
    return None


def _salesforce_target(key: str, value: torch.Tensor) -> tuple[str | None, torch.Tensor]:
    """Our state-dict name for salesforce ``key`` (None: no counterpart) and the value in our layout
    (queues transposed / flattened)."""
    for prefix, ours in (("visual_encoder_m.", "visual_encoder_m.model."),
                         ("visual_encoder.", "visual_encoder.model.")):
        if key.startswith(prefix):
            name = _salesforce_vit_name(key[len(prefix):])
            return (None if name is None else ours + name), value
    if key.startswith("text_decoder.bert."):
        return "text_encoder." + key[len("text_decoder.bert."):].replace(".attention.", ".decoder_attention.", 1), value
    if key == "text_decoder.cls.predictions.bias":
        return "lm_head.predictions.decoder.bias", value
    if key.startswith("text_decoder.cls."):
        return "lm_head." + key[len("text_decoder.cls."):], value
    if key in ("image_queue", "text_queue"):
        return key, (value.T.contiguous() if value.dim() == 2 else value)  # [embed_dim, Q] -> [Q, embed_dim]
    if key == "idx_queue":
        return key, (value.reshape(-1) if value.dim() == 2 and value.shape[0] == 1 else value)  # [1, Q] -> [Q]
    if key in ("ptr_queue", "queue_ptr"):
        return "queue_ptr", value
    if key.startswith(("text_encoder.", "text_encoder_m.", "vision_proj.", "vision_proj_m.", "text_proj.",
                       "text_proj_m.", "itm_head.")) or key == "temp":
        return key, value
    return None, value


def _resize_pos_embed(key: str, pos_embed: torch.Tensor, wanted: tuple[int, ...]) -> torch.Tensor:
    """``[1, 1 + n*n, D]`` -> ``wanted`` ``[1, 1 + m*m, D]``: bicubic resize of the patch grid, CLS kept
    (salesforce ``interpolate_pos_embed``). Non-square grids or another width raise ``ValueError``."""
    if pos_embed.dim() != 3 or len(wanted) != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != wanted[2]:
        raise ValueError(f"{key}: cannot resize {tuple(pos_embed.shape)} to {wanted}")
    old, new = round((pos_embed.shape[1] - 1) ** 0.5), round((wanted[1] - 1) ** 0.5)
    if old * old != pos_embed.shape[1] - 1 or new * new != wanted[1] - 1:
        raise ValueError(f"{key}: cannot resize {tuple(pos_embed.shape)} to {wanted} (not square patch grids)")
    grid = pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def is_salesforce_checkpoint(path: str) -> bool:
    """Whether ``path`` is a salesforce/BLIP checkpoint file (``model_base.pth``, ...), as opposed to
    a :func:`save_blip` folder."""
    import os

    return os.path.isfile(path) and path.endswith((".pth", ".pt"))


def read_salesforce_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a salesforce/BLIP ``.pth``: ``torch.load(path, map_location="cpu",
    weights_only=True)["model"]`` (or the loaded dict itself when it has no ``"model"`` entry)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path!r} does not hold a dict (got {type(checkpoint).__name__})")
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict):
        raise ValueError(f"{path!r}: checkpoint['model'] is a {type(state).__name__}, not a state dict")
    return state


def blip_retrieval_metrics(score_i2t: torch.Tensor, score_t2i: torch.Tensor,
                           text_to_image: torch.Tensor | None = None, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k of :meth:`BLIP.retrieval_scores` (i2t from ``score_i2t``, t2i from ``score_t2i``),
    with :func:`vlmcore.retrieval_metrics`' conventions (several captions per image via
    ``text_to_image``; ties rank pessimistically)."""
    from vlmcore.clip import retrieval_metrics

    n_img, n_txt = score_i2t.shape
    if tuple(score_t2i.shape) != (n_txt, n_img):
        raise ValueError(f"score_t2i must be [N_txt, N_img] = {(n_txt, n_img)}, got {tuple(score_t2i.shape)}")
    # a score matrix S equals S @ I^T: feed it as "features" against the identity
    eye = torch.eye(n_txt, dtype=score_i2t.dtype, device=score_i2t.device)
    i2t = retrieval_metrics(score_i2t, eye, text_to_image, ks=ks)
    t2i = retrieval_metrics(score_t2i.T.contiguous(), eye, text_to_image, ks=ks)
    out = {k: v for k, v in i2t.items() if k.startswith("i2t")}
    out.update({k: v for k, v in t2i.items() if k.startswith("t2i")})
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def alpha_ramp(step: int, ramp_steps: int, alpha: float = 0.4) -> float:
    """BLIP's distillation weight schedule: ``alpha * min(1, step / ramp_steps)`` (BLIP ramps over the
    first epoch's steps, then keeps ``alpha``)."""
    check_positive_int("ramp_steps", ramp_steps)
    return float(alpha) * min(1.0, max(0, step) / ramp_steps)


def sample_hard_negatives(similarity: torch.Tensor, positive_mask: torch.Tensor, *,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative column per row, drawn with probability ``softmax(similarity) + 1e-4`` (BLIP)
    restricted to the non-positive columns, entirely on the tensors' device (no host sync).

    Args:
        similarity: ``[b, N]`` scores (ITC similarity / temperature).
        positive_mask: bool ``[b, N]``, True where the column is a positive of the row (never drawn).
        generator: random generator on the tensors' device (default: the global one).

    Returns:
        ``(index long [b], valid bool [b])``; ``valid`` is False for a row whose columns are all
        positives (its index is then meaningless and must be weighted out).

    Gumbel-max sampling: ``argmax(log w + G)`` with ``G ~ Gumbel(0, 1)`` draws index j with
    probability ``w_j / sum w``, the distribution of BLIP's ``torch.multinomial(w, 1)``, without
    the per-row host loop.
    """
    if not isinstance(similarity, torch.Tensor) or similarity.dim() != 2:
        raise ValueError("similarity must be a [b, N] tensor")
    if not isinstance(positive_mask, torch.Tensor) or positive_mask.dtype != torch.bool \
            or positive_mask.shape != similarity.shape:
        raise ValueError(f"positive_mask must be a bool tensor of the similarity's shape {tuple(similarity.shape)}")
    weights = torch.softmax(similarity.float(), dim=1) + 1e-4
    log_w = weights.log().masked_fill(positive_mask, float("-inf"))
    uniform = torch.rand(similarity.shape, device=similarity.device, generator=generator)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
    index = (log_w + gumbel).argmax(dim=1)
    valid = (~positive_mask).any(dim=1)
    return index, valid


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False`` (a momentum encoder's initial state)."""
    copied = copy.deepcopy(module)
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied


def _with_first_token(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    check_token_ids("input_ids", input_ids)
    out = input_ids.clone()
    out[:, 0] = token_id
    return out


# ----------------------------------------------------------------------------------------------
# building from a plain spec, checkpoints
# ----------------------------------------------------------------------------------------------

MOMENTUM_STATE = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.", "image_queue",
                  "text_queue", "idx_queue", "queue_ptr")


def build_blip(spec: dict) -> BLIP:
    """A BLIP from a JSON-able spec (what :func:`save_blip` stores)::

        {"vision": {"kind": "vit", "image_size": 224, "patch_size": 16, "width": 768, "depth": 12, "heads": 12}
                   # or {"kind": "hf_blip", <BlipVisionConfig fields>},
         "text": {<MEDConfig fields>}, "embed_dim": 256, "momentum": 0.995 or null, "queue_size": 57600}

    The spec is kept on the model as ``model.spec``.
    """
    from vlmcore.vision import VisionTransformer

    if not isinstance(spec, dict) or "vision" not in spec or "text" not in spec:
        raise ValueError("spec must be a dict with 'vision' and 'text' entries")
    vision = dict(spec["vision"])
    kind = vision.pop("kind", "vit")
    if kind == "vit":
        encoder = VisionTransformer(**vision)
    elif kind == "hf_blip":
        encoder = blip_vision_encoder(**vision)
    else:
        raise ValueError(f"spec['vision']['kind'] must be 'vit' or 'hf_blip', got {kind!r}")
    model = BLIP(encoder, MEDConfig(**spec["text"]), embed_dim=int(spec.get("embed_dim", 256)),
                 momentum=spec.get("momentum", 0.995), queue_size=int(spec.get("queue_size", 57600)),
                 temperature=float(spec.get("temperature", 0.07)))
    model.spec = dict(spec)
    return model


def save_blip(model: BLIP, directory: str) -> str:
    """Write ``blip.json`` (the spec) and ``model.safetensors`` (online weights; no momentum copies or
    queues) into ``directory``, atomically per file. The model must come from :func:`build_blip`."""
    import json
    import os

    from safetensors.torch import save_file

    spec = getattr(model, "spec", None)
    if spec is None:
        raise ValueError("model has no spec: build it with build_blip(spec) to save it with save_blip")
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not k.startswith(MOMENTUM_STATE) and k != "lm_head.predictions.decoder.weight"}
    tmp = os.path.join(directory, "model.safetensors.tmp")
    save_file(state, tmp)
    os.replace(tmp, os.path.join(directory, "model.safetensors"))
    tmp = os.path.join(directory, "blip.json.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(spec, handle, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(directory, "blip.json"))
    return directory


def load_blip(directory: str, **overrides) -> BLIP:
    """The BLIP saved by :func:`save_blip` in ``directory`` (spec entries can be overridden, e.g.
    ``momentum=None`` for inference); every saved weight must match by name and shape."""
    import json
    import os

    from safetensors.torch import load_file

    spec_path = os.path.join(directory, "blip.json")
    if not os.path.isfile(spec_path):
        raise ValueError(f"{directory!r} is not a BLIP checkpoint (no blip.json)")
    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    spec.update(overrides)
    model = build_blip(spec)
    state = load_file(os.path.join(directory, "model.safetensors"))
    own = model.state_dict()
    for key, value in state.items():  # the trainer stores 0-dim parameters (temp) as [1]
        if key in own and value.shape != own[key].shape and value.numel() == own[key].numel() == 1:
            state[key] = value.reshape(own[key].shape)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(MOMENTUM_STATE) and k != "lm_head.predictions.decoder.weight"]
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory!r} does not match its spec: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    if model.momentum is not None:
        model.copy_params_to_momentum()
    return model


def salesforce_blip_spec(state_dict: dict[str, torch.Tensor], *, image_size: int | None = None,
                         vision_heads: int | None = None, momentum: float | None | str = "auto",
                         text_overrides: dict | None = None) -> dict:
    """A :func:`build_blip` spec for the model a salesforce/BLIP state dict loads into, sizes read from
    the weights' shapes: ViT width / depth / MLP / patch / checkpoint resolution, BERT width / depth /
    vocabulary / positions / cross-attention width, ``embed_dim`` (``vision_proj``), ``queue_size``
    (``image_queue``).

    Head counts are not in the weights: ``width // 64`` (BLIP's ViT-B 12, ViT-L 16, BERT-base 12
    heads) unless ``vision_heads`` / ``text_overrides["num_attention_heads"]`` say otherwise.
    ``image_size`` defaults to the checkpoint's (``pos_embed``); another one needs
    ``load_salesforce_state_dict(..., interpolate_pos_embed=True)``. ``momentum="auto"``: 0.995 when the
    checkpoint has momentum encoders, else ``None``. The text config keeps :class:`MEDConfig`'s
    special tokens (BLIP's ``bert-base-uncased`` + ``[DEC]`` 30522 + ``[ENC]`` 30523); ``text_overrides``
    replaces any :class:`MEDConfig` field.
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ValueError(f"not a salesforce BLIP state dict: {key!r} is missing")
        return tuple(state_dict[key].shape)

    def layers(prefix: str) -> int:
        found = {int(m[1]) for k in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        if not found:
            raise ValueError(f"not a salesforce BLIP state dict: no {prefix}N.* weights")
        return max(found) + 1

    def heads(width: int, given: int | None, what: str) -> int:
        if given is not None:
            return int(given)
        if width % 64:
            raise ValueError(f"{what} width {width} is not a multiple of 64: give its number of attention heads")
        return width // 64

    width = shape("visual_encoder.cls_token")[-1]
    patch = shape("visual_encoder.patch_embed.proj.weight")[-1]
    grid = round((shape("visual_encoder.pos_embed")[1] - 1) ** 0.5)
    vision = {"kind": "hf_blip", "hidden_size": width, "num_hidden_layers": layers("visual_encoder.blocks."),
              "num_attention_heads": heads(width, vision_heads, "ViT"),
              "intermediate_size": shape("visual_encoder.blocks.0.mlp.fc1.weight")[0],
              "image_size": int(image_size) if image_size is not None else grid * patch, "patch_size": patch,
              "layer_norm_eps": 1e-6}
    bert = "text_encoder." if "text_encoder.embeddings.word_embeddings.weight" in state_dict else "text_decoder.bert."
    vocab, hidden = shape(bert + "embeddings.word_embeddings.weight")
    text = {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers(bert + "encoder.layer."),
            "intermediate_size": shape(bert + "encoder.layer.0.intermediate.dense.weight")[0],
            "max_position_embeddings": shape(bert + "embeddings.position_embeddings.weight")[0],
            "encoder_width": shape(bert + "encoder.layer.0.crossattention.self.key.weight")[1]}
    text.update(text_overrides or {})
    if "num_attention_heads" not in text:
        text["num_attention_heads"] = heads(hidden, None, "text")
    has_momentum = "visual_encoder_m.cls_token" in state_dict
    if momentum == "auto":
        momentum = 0.995 if has_momentum else None
    queue = shape("image_queue")[1] if "image_queue" in state_dict else 57600  # BLIP's default
    return {"vision": vision, "text": text, "momentum": momentum, "queue_size": queue,
            "embed_dim": shape("vision_proj.weight")[0] if "vision_proj.weight" in state_dict else 256}


def blip_from_salesforce(checkpoint: str | dict[str, torch.Tensor], **spec_kwargs) -> BLIP:
    """A BLIP built by :func:`salesforce_blip_spec` and loaded from a salesforce/BLIP checkpoint (a path
    read by :func:`read_salesforce_checkpoint`, or its state dict), in eval mode. Momentum copies and
    queues load when the model has momentum encoders; ``pos_embed`` is interpolated when
    ``image_size`` differs from the checkpoint's (as salesforce's ``load_checkpoint``)."""
    state_dict = read_salesforce_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    spec = salesforce_blip_spec(state_dict, **spec_kwargs)
    model = build_blip(spec)
    model.load_salesforce_state_dict(state_dict, load_momentum=model.momentum is not None,
                                     interpolate_pos_embed=True)
    return model.eval()


@functools.cache
def _decoder_for_generation_class():
    """:class:`DecoderForGeneration`, built once on first use (transformers is imported lazily)."""
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class DecoderForGeneration(PreTrainedModel, GenerationMixin):
        """BLIP's image-grounded decoder behind Hugging Face's ``GenerationMixin`` (beam search,
        sampling, logits processors), so that no second beam search exists here. Built per
        :meth:`BLIP.generate` call around the model's own modules (no copy). No KV cache: each step
        re-runs the (short) caption through the decoder."""

        main_input_name = "input_ids"

        def __init__(self, model: BLIP):
            config = PretrainedConfig(vocab_size=model.config.vocab_size, bos_token_id=model.config.bos_token_id,
                                      eos_token_id=model.config.sep_token_id, pad_token_id=model.config.pad_token_id)
            super().__init__(config)
            self.text_encoder = model.text_encoder
            self.lm_head = model.lm_head

        def forward(self, input_ids, attention_mask=None, encoder_hidden_states=None, **_):
            hidden = self.text_encoder(input_ids, attention_mask, mode="decoder", image_embeds=encoder_hidden_states)
            return CausalLMOutput(logits=self.lm_head(hidden))

        def prepare_inputs_for_generation(self, input_ids, attention_mask=None, encoder_hidden_states=None, **_):
            return {"input_ids": input_ids, "attention_mask": attention_mask,
                    "encoder_hidden_states": encoder_hidden_states}

    return DecoderForGeneration
