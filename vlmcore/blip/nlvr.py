"""BLIP's NLVR2 model (Li et al. 2022, section 5.4): two images, one sentence, true / false.

Both images go through the one ViT. The sentence (``[ENC]`` first) goes through an image-grounded
text encoder whose every cross-attention is doubled (salesforce ``nlvr_encoder.py``): per layer,
``self0`` attends the first image's tokens and ``self1`` the second's (separate parameters, both
initialized from the pre-trained cross-attention), each through its own output projection
(``dense0`` / ``dense1``); the two results are merged, then residual + ``LayerNorm`` as usual:

- layers below ``merge_from_layer`` (salesforce: 6 of 12): the average of the two;
- layers from ``merge_from_layer`` on: ``merge_layer``, a linear map of their concatenation
  ``[.., 2 hidden] -> [.., hidden]`` (no activation: salesforce's ``act`` is defined but unused).

A two-layer MLP (``cls_head``: linear, ReLU, linear) on the first token gives the two logits
(index 1 = the sentence is true). Parameter names are salesforce's ``BLIP_NLVR``
(:func:`vlmcore.blip.heads_convert.load_salesforce_nlvr_state_dict`). Cross-attention runs on
:func:`vlmcore.kernels.resampler_attention`, as in :mod:`vlmcore.blip.text`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmcore._checks import check_token_ids
from vlmcore.blip import heads_convert
from vlmcore.blip.text import (
    MEDConfig,
    _AttentionOutput,
    _CrossAttentionCore,
    _Embeddings,
    _Intermediate,
    _SelfAttention,
)
from vlmcore.vision import vision_width

#: salesforce ``nlvr_encoder.py``: ``merge=(is_cross_attention and layer_num >= 6)``.
MERGE_FROM_LAYER = 6


class _TwinOutput(nn.Module):
    """The two cross-attention outputs projected (``dense0`` / ``dense1``), merged (average, or
    ``merge_layer`` of the concatenation), dropout, residual, ``LayerNorm``: ``[B, L, hidden]``."""

    def __init__(self, config: MEDConfig, merge: bool):
        super().__init__()
        self.dense0 = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense1 = nn.Linear(config.hidden_size, config.hidden_size)
        self.merge_layer = nn.Linear(2 * config.hidden_size, config.hidden_size) if merge else None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x0, x1 = self.dense0(x0), self.dense1(x1)
        merged = (x0 + x1) / 2 if self.merge_layer is None else self.merge_layer(torch.cat([x0, x1], dim=-1))
        return self.LayerNorm(self.dropout(merged) + residual)


class _TwinCrossAttention(nn.Module):
    """``crossattention`` of an NLVR2 layer: the text attends image 0 (``self0``) and image 1 (``self1``)."""

    def __init__(self, config: MEDConfig, merge: bool):
        super().__init__()
        self.self0 = _CrossAttentionCore(config)
        self.self1 = _CrossAttentionCore(config)
        self.output = _TwinOutput(config, merge)

    def forward(self, x: torch.Tensor, image0: torch.Tensor, image1: torch.Tensor) -> torch.Tensor:
        return self.output(self.self0(x, image0, None), self.self1(x, image1, None), x)


class NLVRLayer(nn.Module):
    """Bidirectional self-attention, the twin cross-attention, feed-forward (BERT post-norm)."""

    def __init__(self, config: MEDConfig, merge: bool):
        super().__init__()
        self.attention = _SelfAttention(config)
        self.crossattention = _TwinCrossAttention(config, merge)
        self.intermediate = _Intermediate(config)
        self.output = _AttentionOutput(config.intermediate_size, config)

    def forward(self, x, additive_mask, image0, image1):
        x = self.crossattention(self.attention(x, additive_mask), image0, image1)
        return self.output(self.intermediate(x), x)


class _Layers(nn.Module):
    """The ``layer`` list (parameter names read ``encoder.layer.N.*``)."""

    def __init__(self, config: MEDConfig, merge_from_layer: int):
        super().__init__()
        self.layer = nn.ModuleList(NLVRLayer(config, merge=i >= merge_from_layer)
                                   for i in range(config.num_hidden_layers))


class NLVRTextEncoder(nn.Module):
    """The sentence encoder attending two images: ``forward(input_ids [B, L], attention_mask [B, L] or
    None, image0 [B, S, W], image1 [B, S, W]) -> [B, L, hidden]``."""

    def __init__(self, config: MEDConfig, merge_from_layer: int = MERGE_FROM_LAYER):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Layers(config, merge_from_layer)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image0: torch.Tensor,
                image1: torch.Tensor) -> torch.Tensor:
        check_token_ids("input_ids", input_ids)
        b, length = input_ids.shape
        if length > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {length} tokens, more than max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        for name, image in (("image0", image0), ("image1", image1)):
            if image.dim() != 3 or image.shape[0] != b or image.shape[2] != self.config.encoder_width:
                raise ValueError(f"{name} must be [B={b}, S, encoder_width={self.config.encoder_width}], got "
                                 f"{tuple(image.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif tuple(attention_mask.shape) != (b, length):
            raise ValueError(f"attention_mask must be [B, L] = {(b, length)}, got {tuple(attention_mask.shape)}")
        x = self.embeddings(input_ids)
        additive = torch.zeros((b, 1, 1, length), dtype=x.dtype, device=x.device).masked_fill(
            attention_mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        for layer in self.encoder.layer:
            x = layer(x, additive, image0.to(x.dtype), image1.to(x.dtype))
        return x


class BlipNLVR(nn.Module):
    """BLIP NLVR2: ViT + twin-cross-attention text encoder + ``cls_head`` (module docstring).

    Args:
        visual_encoder: images ``[B, C, H, W]`` -> tokens ``[B, S, width]``.
        text_config: :class:`MEDConfig` (``encoder_width`` = the image token width).
        merge_from_layer: the first layer that merges with ``merge_layer`` (salesforce: 6).
    """

    def __init__(self, visual_encoder: nn.Module, text_config: MEDConfig, *,
                 merge_from_layer: int = MERGE_FROM_LAYER):
        super().__init__()
        if not isinstance(text_config, MEDConfig):
            raise TypeError(f"text_config must be a MEDConfig, got {type(text_config).__name__}")
        if isinstance(merge_from_layer, bool) or not isinstance(merge_from_layer, int) or merge_from_layer < 0:
            raise ValueError(f"merge_from_layer must be an int >= 0, got {merge_from_layer!r}")
        width = vision_width(visual_encoder)
        if width != text_config.encoder_width:
            raise ValueError(f"text_config.encoder_width ({text_config.encoder_width}) must equal the visual "
                             f"encoder's token width ({width})")
        self.config = text_config
        self.merge_from_layer = merge_from_layer
        self.visual_encoder = visual_encoder
        self.text_encoder = NLVRTextEncoder(text_config, merge_from_layer)
        hidden = text_config.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, images0: torch.Tensor, images1: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, 2]`` (index 1 = true) for image pairs ``images0`` / ``images1`` ``[B, C, H, W]`` and
        sentences ``input_ids`` ``[B, L]`` (first id replaced by ``[ENC]``). Both images run through the
        ViT in one batch, as salesforce."""
        if images0.shape != images1.shape:
            raise ValueError(f"images0 and images1 must have one shape, got {tuple(images0.shape)} and "
                             f"{tuple(images1.shape)}")
        check_token_ids("input_ids", input_ids)
        embeds = self.visual_encoder(torch.cat([images0, images1]))
        image0, image1 = embeds.split(images0.shape[0])
        ids = input_ids.clone()
        ids[:, 0] = self.config.enc_token_id
        hidden = self.text_encoder(ids, attention_mask, image0, image1)
        return self.cls_head(hidden[:, 0])

    def loss(self, images0: torch.Tensor, images1: torch.Tensor, input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cross-entropy, logits [B, 2])`` for ``labels`` ``[B]`` (int64, 1 = true), as salesforce trains."""
        logits = self(images0, images1, input_ids, attention_mask)
        return F.cross_entropy(logits.float(), labels), logits

    def load_salesforce_state_dict(self, state_dict: dict[str, torch.Tensor] | str, **kwargs) -> None:
        """:func:`vlmcore.blip.heads_convert.load_salesforce_nlvr_state_dict` (salesforce ``BLIP_NLVR``)."""
        heads_convert.load_salesforce_nlvr_state_dict(self, state_dict, **kwargs)
