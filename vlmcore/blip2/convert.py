"""BLIP-2 checkpoint conversion: Hugging Face weights by name into :class:`~vlmcore.blip2.QFormer`,
:class:`~vlmcore.blip2.Blip2Stage1` and :class:`~vlmcore.blip2.Blip2LM`.

Functions beside the models, not methods of them (the models' ``load_hf_state_dict`` delegate
here). Names map by :func:`hf_qformer_key` (the Q-Former) and :func:`hf_head_key` (the heads);
:func:`load_mapped` copies them, refusing unknown names and shape mismatches by name.
"""

from __future__ import annotations

import re

import torch
from torch import nn

_HF_LAYER_PARTS = {
    "attention.attention.query": "self_attn.query",
    "attention.attention.key": "self_attn.key",
    "attention.attention.value": "self_attn.value",
    "attention.output.dense": "self_attn.dense",
    "attention.output.LayerNorm": "self_attn.norm",
    "crossattention.attention.query": "cross_attn.query",
    "crossattention.attention.key": "cross_attn.key",
    "crossattention.attention.value": "cross_attn.value",
    "crossattention.output.dense": "cross_attn.dense",
    "crossattention.output.LayerNorm": "cross_attn.norm",
    "intermediate.dense": "ffn.fc1",
    "output.dense": "ffn.fc2",
    "output.LayerNorm": "ffn.norm",
    "intermediate_query.dense": "ffn_query.fc1",
    "output_query.dense": "ffn_query.fc2",
    "output_query.LayerNorm": "ffn_query.norm",
}


def hf_qformer_key(key: str) -> str | None:
    """Our :class:`QFormer` parameter name for a Hugging Face BLIP-2 key, or None if it is not a Q-Former key.

    ``[qformer.]layernorm.*`` -> ``embed_norm.*``; ``[qformer.]encoder.layer.{i}.<part>.{weight,bias}``
    -> ``layers.{i}.<ours>`` (:data:`_HF_LAYER_PARTS`); ``query_tokens``; ``embeddings.word_embeddings``
    / ``embeddings.position_embeddings`` -> ``word_embeddings`` / ``position_embeddings``.
    """
    if key == "query_tokens":
        return key
    embed = re.match(r"^embeddings\.(word_embeddings|position_embeddings)\.weight$", key)
    if embed:
        return f"{embed.group(1)}.weight"
    key = key.removeprefix("qformer.")
    norm = re.match(r"^layernorm\.(weight|bias)$", key)
    if norm:
        return f"embed_norm.{norm.group(1)}"
    layer = re.match(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", key)
    if layer and layer.group(2) in _HF_LAYER_PARTS:
        return f"layers.{layer.group(1)}.{_HF_LAYER_PARTS[layer.group(2)]}.{layer.group(3)}"
    return None


_HF_HEADS = {
    "vision_projection": "vision_proj", "vision_proj": "vision_proj",
    "text_projection": "text_proj", "text_proj": "text_proj",
    "itm_head": "itm_head", "language_projection": "language_projection",
}


def hf_head_key(key: str) -> str | None:
    """``vision_projection``/``text_projection``/``itm_head``/``language_projection`` ``.{weight,bias}``
    (HF; LAVIS ``vision_proj``/``text_proj``) -> our head name, else None."""
    head = re.match(r"^([a-z_]+)\.(weight|bias)$", key)
    if head and head.group(1) in _HF_HEADS:
        return f"{_HF_HEADS[head.group(1)]}.{head.group(2)}"
    return None


def load_mapped(module: nn.Module, mapped: dict[str, tuple[str, torch.Tensor]], *, strict: bool,
                source: str, expected: list[str] | None = None) -> None:
    """Copy ``{our name: (source key, tensor)}`` into ``module``'s parameters.

    Raises ``ValueError`` naming the keys when a name is not a parameter of ``module``, on any shape
    mismatch, and (``strict``) when a parameter in ``expected`` (default: all of them) gets no
    value.
    """
    own = dict(module.named_parameters())
    unknown = sorted(f"{key} -> {name}" for name, (key, _) in mapped.items() if name not in own)
    if unknown:
        raise ValueError(f"{source} keys map to no parameter of {type(module).__name__}: {unknown[:6]}")
    mismatched = [f"{key} {tuple(value.shape)} vs {name} {tuple(own[name].shape)}"
                  for name, (key, value) in mapped.items() if tuple(value.shape) != tuple(own[name].shape)]
    if mismatched:
        raise ValueError(f"{source} weights have mismatched shapes (different config?): {mismatched[:6]}")
    missing = sorted(n for n in (own if expected is None else expected) if n not in mapped)
    if strict and missing:
        raise ValueError(f"{source} state dict lacks {len(missing)} parameters of {type(module).__name__}, "
                         f"e.g. {missing[:6]} (pass strict=False to keep their current values)")
    with torch.no_grad():
        for name, (_, value) in mapped.items():
            own[name].copy_(value.to(device=own[name].device, dtype=own[name].dtype))


def load_hf_qformer_state_dict(qformer: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
                               ) -> list[str]:
    """Load a Hugging Face ``Blip2QFormerModel`` state dict (bare, or with the ``qformer.`` prefix of the
    BLIP-2 models) plus ``query_tokens`` and ``embeddings.*`` (``Blip2ForImageTextRetrieval``) into
    ``qformer`` (a :class:`~vlmcore.blip2.QFormer`).

    Names map by :func:`hf_qformer_key`; a shape mismatch raises ``ValueError`` naming both keys;
    with ``strict``, so does any Q-Former parameter the dict does not provide (a stage-2 HF model
    has no text embeddings or text FFN: load it with ``strict=False``). Returns the keys not used.
    """
    mapped, unused = {}, []
    for key, value in state_dict.items():
        name = hf_qformer_key(key)
        if name is None:
            unused.append(key)
        elif name in mapped:
            raise ValueError(f"state_dict holds two keys for {name}: {mapped[name][0]} and {key}")
        else:
            mapped[name] = (key, value)
    load_mapped(qformer, mapped, strict=strict, source="HF Q-Former")
    return unused


def _map_hf_blip2(state_dict: dict[str, torch.Tensor], heads: tuple[str, ...]
                  ) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str]]:
    """``({our name: (HF key, tensor)}, unused HF keys)``: the Q-Former keys (under ``qformer.``) and
    the head keys whose our-name starts with one of ``heads``; every other key is unused."""
    mapped, unused = {}, []
    for key, value in state_dict.items():
        name = hf_qformer_key(key)
        name = f"qformer.{name}" if name is not None else hf_head_key(key)
        if name is None or not name.startswith(("qformer.", *heads)):
            unused.append(key)
        else:
            mapped[name] = (key, value)
    return mapped, unused


def load_hf_stage1_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
                              ) -> list[str]:
    """Load HF ``Blip2ForImageTextRetrieval`` weights (``qformer.*``, ``query_tokens``, ``embeddings.*``,
    ``vision_projection``, ``text_projection``, ``itm_head``) into a :class:`~vlmcore.blip2.Blip2Stage1`
    by name; ``ValueError`` on shape mismatches (and, with ``strict``, on missing ones; HF has no ITG
    head nor temperature, so those are never required). Returns the unused keys (e.g. ``vision_model.*``)."""
    heads = ("vision_proj.", "text_proj.", "itm_head.")
    mapped, unused = _map_hf_blip2(state_dict, heads)
    expected = [n for n, _ in model.named_parameters() if n.startswith(("qformer.", *heads))]
    load_mapped(model, mapped, strict=strict, source="HF BLIP-2", expected=expected)
    return unused


def load_hf_stage2_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
                              ) -> list[str]:
    """Load HF ``Blip2ForConditionalGeneration`` bridge weights (``qformer.*``, ``query_tokens``,
    ``language_projection``) into a :class:`~vlmcore.blip2.Blip2LM` by name; ``strict``: every
    query-path parameter must be there. Returns the unused keys (``vision_model.*``, ``language_model.*``)."""
    mapped, unused = _map_hf_blip2(state_dict, ("language_projection.",))
    expected = [n for n, p in model.named_parameters() if p.requires_grad]
    load_mapped(model, mapped, strict=strict, source="HF BLIP-2", expected=expected)
    return unused

