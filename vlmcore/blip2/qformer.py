"""BLIP-2's Querying Transformer (Q-Former): a BERT encoder whose learned queries read a frozen image.

Semantics of LAVIS ``blip2_models/Qformer.py`` and Hugging Face ``Blip2QFormerModel`` (Li et al.
2023): ``num_query_tokens`` learned queries are concatenated before the text embeddings (queries
get no position embedding), the sequence is LayerNorm-ed and runs through BERT layers. Every
layer's self-attention is shared by queries and text; every ``cross_attention_freq``-th layer
(0, freq, 2 freq, ...) lets the query slice attend to the frozen image tokens; queries have their
own feed-forward (``ffn_query``), text the BERT one (``ffn``).

The image cross-attention is the fused op :func:`vlmcore.kernels.resampler_attention` in its
Q-Former form (no latent keys), with the image padding mask. Self-attention is
``torch.nn.functional.scaled_dot_product_attention`` with one of the three BLIP-2 masks
(:func:`self_attention_mask`).

Hugging Face weights load by name with :meth:`QFormer.load_hf_state_dict`; the key map is
:func:`vlmcore.blip2.convert.hf_qformer_key`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import vlmcore.blip2.convert as convert
from vlmcore._checks import check_positive_int, check_token_ids
from vlmcore.kernels import resampler_attention

MASK_MODES = ("bidirectional", "unimodal", "causal")


def self_attention_mask(num_queries: int, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The ``[B, 1, Q + L, Q + L]`` bool self-attention mask (True = attend) of one BLIP-2 objective.

    Args:
        num_queries: Q, the query tokens at the start of the sequence (all valid).
        attention_mask: ``[B, L]`` text padding mask (1 / True = token).
        mode: ``"bidirectional"`` (ITM: everything sees every non-padding token), ``"unimodal"``
            (ITC: queries see only queries, text only text), ``"causal"`` (ITG: queries see
            queries; text sees all queries and text up to itself).
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    batch, text_length = attention_mask.shape
    device = attention_mask.device
    total = num_queries + text_length
    key_valid = torch.cat([torch.ones(batch, num_queries, dtype=torch.bool, device=device),
                           attention_mask.bool()], dim=1)  # [B, Q + L]
    is_query = torch.arange(total, device=device) < num_queries  # [Q + L]
    if mode == "bidirectional":
        allowed = torch.ones(total, total, dtype=torch.bool, device=device)
    elif mode == "unimodal":
        allowed = is_query[:, None] == is_query[None, :]
    else:
        position = torch.arange(total, device=device)
        # queries: keys among the queries; text: every query and text at or before itself
        allowed = torch.where(is_query[:, None], is_query[None, :], position[None, :] <= position[:, None])
    return allowed[None, None] & key_valid[:, None, None, :]


# Adapted from LAVIS Qformer.py's BertAttention (transformers' BertSelfAttention + BertSelfOutput in one).
class QFormerSelfAttention(nn.Module):
    """BERT self-attention + output block: ``LayerNorm(x + dense(attn(x)))``.

    With ``past`` (keys, values ``[B, H, P, Dh]`` of earlier tokens, e.g. the queries of an ITC
    pass), the new tokens attend ``[past; own]`` keys; ``return_kv`` also returns this call's own
    keys and values.
    """

    def __init__(self, hidden_size: int, num_heads: int, layer_norm_eps: float, dropout: float,
                 attention_dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.attention_dropout = attention_dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` -> ``[B, H, L, Dh]``."""
        return x.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                past: tuple[torch.Tensor, torch.Tensor] | None = None, return_kv: bool = False):
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        own_kv = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              dropout_p=self.attention_dropout if self.training else 0.0)
        attn = attn.transpose(1, 2).reshape(x.shape)
        out = self.norm(x + self.dropout(self.dense(attn)))
        return (out, own_kv) if return_kv else out


# Adapted from LAVIS Qformer.py's BertAttention(is_cross_attention=True); attention by the fused op.
class QFormerCrossAttention(nn.Module):
    """Queries attend to the image tokens (fused :func:`resampler_attention`, no latents):
    ``LayerNorm(x + dense(attn(x, image)))``. No attention-probability dropout (the fused op has
    none; LAVIS drops 10% of the cross-attention probabilities in training)."""

    def __init__(self, hidden_size: int, vision_width: int, num_heads: int, layer_norm_eps: float, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(vision_width, hidden_size)
        self.value = nn.Linear(vision_width, hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, image_embeds: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        batch, num_queries, _ = x.shape
        heads = (self.num_heads, self.head_dim)
        q = self.query(x).view(batch, num_queries, *heads)  # [B, Q, H, Dh]
        k = self.key(image_embeds).view(batch, image_embeds.shape[1], *heads)  # [B, S, H, Dh]
        v = self.value(image_embeds).view(batch, image_embeds.shape[1], *heads)
        attn = resampler_attention(q, k, v, media_mask=image_mask, softmax_scale=self.head_dim**-0.5)
        return self.norm(x + self.dropout(self.dense(attn.reshape(x.shape))))


# Adapted from transformers' modeling_bert.BertIntermediate + BertOutput (LAVIS: also *_query copies).
class QFormerFeedForward(nn.Module):
    """BERT intermediate + output: ``LayerNorm(x + fc2(act(fc1(x))))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, layer_norm_eps: float, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


# Adapted from LAVIS Qformer.py's BertLayer (queries: cross-attention and their own feed-forward).
class QFormerLayer(nn.Module):
    """Shared self-attention; cross-attention (query slice, if this layer has one); split FFNs."""

    def __init__(self, hidden_size: int, vision_width: int, num_heads: int, intermediate_size: int,
                 layer_norm_eps: float, dropout: float, attention_dropout: float, has_cross_attention: bool):
        super().__init__()
        self.self_attn = QFormerSelfAttention(hidden_size, num_heads, layer_norm_eps, dropout, attention_dropout)
        self.cross_attn = (QFormerCrossAttention(hidden_size, vision_width, num_heads, layer_norm_eps, dropout)
                           if has_cross_attention else None)
        self.ffn = QFormerFeedForward(hidden_size, intermediate_size, layer_norm_eps, dropout)
        self.ffn_query = QFormerFeedForward(hidden_size, intermediate_size, layer_norm_eps, dropout)

    def forward(self, x, mask, num_queries, image_embeds, image_mask, past=None, return_kv=False):
        out = self.self_attn(x, mask, past=past, return_kv=return_kv)
        out, kv = out if return_kv else (out, None)
        queries, text = out[:, :num_queries], out[:, num_queries:]
        parts = []
        if num_queries > 0:
            if self.cross_attn is not None:
                queries = self.cross_attn(queries, image_embeds, image_mask)
            parts.append(self.ffn_query(queries))
        if text.shape[1] > 0:
            parts.append(self.ffn(text))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return (out, kv) if return_kv else out


class QFormer(nn.Module):
    """The BLIP-2 Q-Former (defaults: BERT-base, 32 queries, cross-attention every 2nd layer, EVA ViT-g width).

    Args:
        vision_width: width of the frozen image tokens (1408 for EVA ViT-g).
        hidden_size, num_layers, num_heads, intermediate_size: BERT size (768, 12, 12, 3072).
        num_query_tokens: learned queries (32), initialized N(0, 0.02).
        cross_attention_freq: layers 0, freq, 2 freq, ... cross-attend the image.
        vocab_size, max_position_embeddings, pad_token_id: text embedding (BERT-base + [DEC]: 30523).
        layer_norm_eps: 1e-12 (BERT).
        dropout, attention_dropout: hidden-state and self-attention-probability dropout (0.1 in BERT
            / LAVIS); cross-attention probabilities are not dropped (see :class:`QFormerCrossAttention`).

    Main entry: :meth:`forward`; the ITC/ITG parts of BLIP-2 use :meth:`encode_image` (queries
    only, optionally returning each layer's query keys/values) and :meth:`decode_text` (causal text
    over those cached query keys/values).
    """

    def __init__(self, vision_width: int = 1408, *, hidden_size: int = 768, num_layers: int = 12,
                 num_heads: int = 12, intermediate_size: int = 3072, num_query_tokens: int = 32,
                 cross_attention_freq: int = 2, vocab_size: int = 30523, max_position_embeddings: int = 512,
                 pad_token_id: int = 0, layer_norm_eps: float = 1e-12, dropout: float = 0.1,
                 attention_dropout: float = 0.1):
        super().__init__()
        for name, value in (("vision_width", vision_width), ("hidden_size", hidden_size),
                            ("num_layers", num_layers), ("num_heads", num_heads),
                            ("intermediate_size", intermediate_size), ("num_query_tokens", num_query_tokens),
                            ("cross_attention_freq", cross_attention_freq), ("vocab_size", vocab_size),
                            ("max_position_embeddings", max_position_embeddings)):
            check_positive_int(name, value)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads}")
        self.vision_width = vision_width
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_query_tokens = num_query_tokens
        self.cross_attention_freq = cross_attention_freq
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, hidden_size) * 0.02)
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.embed_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.embed_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(hidden_size, vision_width, num_heads, intermediate_size, layer_norm_eps, dropout,
                         attention_dropout, has_cross_attention=i % cross_attention_freq == 0)
            for i in range(num_layers)
        )

    # ----------------------------------------------------------------------------- checks

    def _check_image(self, image_embeds: torch.Tensor, image_mask: torch.Tensor | None, batch: int | None) -> None:
        """Raise ``ValueError`` unless ``image_embeds`` is ``[B, S, vision_width]`` (``B = batch`` when given)
        and ``image_mask`` None or bool ``[B, S]``."""
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3:
            got = tuple(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__
            raise ValueError(f"image_embeds must be [B, S, vision_width={self.vision_width}], got {got}")
        if image_embeds.shape[-1] != self.vision_width:
            raise ValueError(f"image_embeds must have width vision_width={self.vision_width}, got "
                             f"{tuple(image_embeds.shape)}")
        if batch is not None and image_embeds.shape[0] != batch:
            raise ValueError(f"image_embeds has batch {image_embeds.shape[0]} but text_ids has batch {batch}")
        if image_mask is not None:
            if not isinstance(image_mask, torch.Tensor) or tuple(image_mask.shape) != tuple(image_embeds.shape[:2]):
                got = tuple(image_mask.shape) if isinstance(image_mask, torch.Tensor) else type(image_mask).__name__
                raise ValueError(f"image_mask must be [B, S] = {tuple(image_embeds.shape[:2])}, got {got}")

    def _check_text(self, text_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Check ``text_ids`` ``[B, L]`` and ``attention_mask``; return the mask as bool (all True when None)."""
        check_token_ids("text_ids", text_ids)
        if text_ids.shape[1] > self.max_position_embeddings:
            raise ValueError(f"text_ids has length {text_ids.shape[1]}, longer than the position table "
                             f"(max_position_embeddings={self.max_position_embeddings})")
        if attention_mask is None:
            return torch.ones_like(text_ids, dtype=torch.bool)
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(text_ids.shape):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"attention_mask must have the shape of text_ids {tuple(text_ids.shape)}, got {got}")
        return attention_mask.bool()

    # ----------------------------------------------------------------------------- pieces

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Word + position embeddings (positions from 0), before the shared LayerNorm: ``[B, L, D]``."""
        positions = torch.arange(text_ids.shape[1], device=text_ids.device)
        return self.word_embeddings(text_ids) + self.position_embeddings(positions)[None]

    def run_layers(self, embeddings: torch.Tensor, mask: torch.Tensor | None, num_queries: int,
                   image_embeds: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                   past: list | None = None, return_kv: bool = False):
        """LayerNorm + dropout of ``embeddings`` ``[B, Q + L, D]`` (Q queries first), then every layer.

        ``mask``: ``[B, 1, Q + L, P + Q + L]`` bool or None (attend everything); ``past``: per layer
        ``(k, v)`` ``[B, H, P, Dh]`` attended before the own keys. Returns ``[B, Q + L, D]`` (and
        the per-layer own ``(k, v)`` with ``return_kv``).
        """
        if num_queries > 0 and any(layer.cross_attn is not None for layer in self.layers) and image_embeds is None:
            raise ValueError("image_embeds is required when queries are run (they cross-attend the image)")
        x = self.embed_dropout(self.embed_norm(embeddings))
        kvs = []
        for i, layer in enumerate(self.layers):
            out = layer(x, mask, num_queries, image_embeds, image_mask,
                        past=None if past is None else past[i], return_kv=return_kv)
            if return_kv:
                x, kv = out
                kvs.append(kv)
            else:
                x = out
        return (x, kvs) if return_kv else x

    # ----------------------------------------------------------------------------- public

    def forward(self, image_embeds: torch.Tensor | None = None, text_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, image_mask: torch.Tensor | None = None,
                mode: str = "bidirectional", use_queries: bool = True) -> torch.Tensor:
        """Queries (and text) through the Q-Former.

        Args:
            image_embeds: ``[B, S, vision_width]`` frozen image tokens (needed with queries).
            text_ids: ``[B, L]`` token ids, or None (queries only).
            attention_mask: ``[B, L]`` text padding mask (1 = token), default all ones.
            image_mask: ``[B, S]`` bool, False = padding image token (not attended).
            mode: self-attention mask between queries and text (:func:`self_attention_mask`).
            use_queries: False runs the text alone (the ITC text encoder).

        Returns:
            ``[B, Q + L, hidden]`` (Q = ``num_query_tokens`` if ``use_queries`` else 0).
        """
        if text_ids is None and not use_queries:
            raise ValueError("text_ids must be given when use_queries=False")
        batch = None
        parts = []
        if text_ids is not None:
            attention_mask = self._check_text(text_ids, attention_mask)
            batch = text_ids.shape[0]
        if use_queries:
            if image_embeds is None:
                raise ValueError("image_embeds is required when the queries are used")
            self._check_image(image_embeds, image_mask, batch)
            batch = image_embeds.shape[0]
            parts.append(self.query_tokens.expand(batch, -1, -1))
        if text_ids is not None:
            parts.append(self.embed_text(text_ids).to(self.query_tokens.dtype))
        num_queries = self.num_query_tokens if use_queries else 0
        if text_ids is None:
            mask = None
        else:
            mask = self_attention_mask(num_queries, attention_mask, mode)
        embeddings = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        image_embeds = None if image_embeds is None else image_embeds.to(embeddings.dtype)
        return self.run_layers(embeddings, mask, num_queries, image_embeds if use_queries else None, image_mask)

    def encode_image(self, image_embeds: torch.Tensor, image_mask: torch.Tensor | None = None,
                     return_kv: bool = False):
        """Queries alone over the image: ``[B, Q, hidden]`` (and per layer the queries' ``(k, v)``
        ``[B, H, Q, Dh]`` with ``return_kv``, reusable by :meth:`decode_text`: exact, because under
        the ITG mask queries never see text)."""
        self._check_image(image_embeds, image_mask, None)
        embeddings = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.run_layers(embeddings, None, self.num_query_tokens, image_embeds.to(embeddings.dtype),
                               image_mask, return_kv=return_kv)

    def encode_text(self, text_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text alone (the ITC text side, BERT with padding mask): ``[B, L, hidden]``."""
        return self.forward(None, text_ids, attention_mask, use_queries=False)

    def decode_text(self, text_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    query_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """ITG: text ``[B, L]`` causally over cached query keys/values (from :meth:`encode_image`
        with ``return_kv=True``); equals the text slice of ``forward(mode="causal")``. ``[B, L, hidden]``."""
        attention_mask = self._check_text(text_ids, attention_mask)
        if len(query_kv) != len(self.layers):
            raise ValueError(f"query_kv must hold one (k, v) per layer ({len(self.layers)}), got {len(query_kv)}")
        batch, length = text_ids.shape
        if query_kv[0][0].shape[0] != batch:
            raise ValueError(f"query_kv has batch {query_kv[0][0].shape[0]} but text_ids has batch {batch}")
        num_queries = query_kv[0][0].shape[2]
        causal = self_attention_mask(num_queries, attention_mask, "causal")[:, :, num_queries:]  # [B, 1, L, Q + L]
        return self.run_layers(self.embed_text(text_ids).to(self.query_tokens.dtype), causal, 0, past=query_kv)

    # ----------------------------------------------------------------------------- HF weights

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
        """:func:`vlmcore.blip2.convert.load_hf_qformer_state_dict` (``Blip2QFormerModel`` weights by name)."""
        return convert.load_hf_qformer_state_dict(self, state_dict, strict=strict)
