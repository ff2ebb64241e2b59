"""Checkpoint conversion for BLIP's fine-tuned heads: :class:`~vlmcore.blip.vqa.BlipVQA` and
:class:`~vlmcore.blip.nlvr.BlipNLVR`, by name.

- :func:`load_hf_vqa_state_dict`: Hugging Face ``BlipForQuestionAnswering`` (``vision_model.*``,
  ``text_encoder.*``, ``text_decoder.bert.*``, ``text_decoder.cls.*``);
- :func:`load_salesforce_vqa_state_dict`: salesforce ``BLIP_VQA`` (``model_base_vqa_capfilt_large.pth``):
  the same text names, the ViT in timm-0.4 names;
- :func:`load_salesforce_nlvr_state_dict`: salesforce ``BLIP_NLVR`` (``model_base_nlvr.pth``): ViT,
  ``text_encoder.*`` with the twin cross-attention (``self0`` / ``self1``, ``dense0`` / ``dense1``,
  ``merge_layer``), ``cls_head.{0,2}``.

The ViT goes into the ``BlipVisionModel`` of :func:`~vlmcore.blip.model.blip_vision_encoder` (salesforce
names mapped as :mod:`vlmcore.blip.convert` does). The decoder's self-attention is our
``decoder_attention``. Every weight of the model must be covered; unknown, missing or mis-shaped
names and tied copies that differ raise ``ValueError`` naming them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vlmcore.blip.convert import (
    TIED_LM_WEIGHT,
    _copy_weights,
    _require_blip_vision,
    _resize_pos_embed,
    _salesforce_vit_name,
    read_salesforce_checkpoint,
)

# A checkpoint's tied copies -> the entry they must equal (BERT's LM head: the decoder bias and,
# when tied, the output matrix = the word embeddings).
_TIED_COPIES = {"text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
                "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight"}


def _text_name(key: str) -> str | None:
    """Our name of a ``text_encoder.*`` / ``text_decoder.*`` checkpoint key (HF and salesforce agree)."""
    if key.startswith("text_encoder."):
        return key
    if key.startswith("text_decoder.bert."):
        return "text_decoder." + key[len("text_decoder.bert."):].replace(".attention.", ".decoder_attention.", 1)
    if key == "text_decoder.cls.predictions.bias":
        return "lm_head.predictions.decoder.bias"
    if key.startswith("text_decoder.cls."):
        return "lm_head." + key[len("text_decoder.cls."):]
    return None


def _hf_name(key: str) -> str | None:
    if key.startswith("vision_model."):
        return "visual_encoder.model." + key[len("vision_model."):]
    return _text_name(key)


def _salesforce_name(key: str) -> str | None:
    if key.startswith("visual_encoder."):
        name = _salesforce_vit_name(key[len("visual_encoder."):])
        return None if name is None else "visual_encoder.model." + name
    if key.startswith("cls_head."):
        return key
    return _text_name(key)


def _skipped(key: str, value: torch.Tensor, tied: list[str]) -> bool:
    """Whether ``key`` loads nothing: ``arange`` position ids (checked) or a tied copy (appended to ``tied``)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state_dict[{key!r}] must be a tensor, got {type(value).__name__}")
    if key.endswith("embeddings.position_ids"):
        if not torch.equal(value.reshape(-1).cpu(), torch.arange(value.numel())):
            raise ValueError(f"{key} is not arange({value.numel()}): BLIP has no custom position ids")
        return True
    if key in _TIED_COPIES:
        tied.append(key)
        return True
    return False


def _load(model: nn.Module, state_dict: dict[str, torch.Tensor], rename: Callable[[str], str | None], source: str,
          interpolate_pos_embed: bool = False) -> None:
    """Copy every entry of ``state_dict`` into ``model`` under ``rename(key)``; all of the model must be covered."""
    _require_blip_vision(model, source)
    own = model.state_dict()
    targets, unknown, mis_shaped, tied = {}, [], [], []
    for key, value in state_dict.items():
        if _skipped(key, value, tied):
            continue
        ours = rename(key)
        if ours is None or ours not in own:
            unknown.append(key)
            continue
        if interpolate_pos_embed and key.endswith("pos_embed") and value.shape != own[ours].shape:
            value = _resize_pos_embed(key, value, tuple(own[ours].shape))
        if value.shape != own[ours].shape:
            mis_shaped.append(f"{key}: checkpoint {tuple(value.shape)} != model {tuple(own[ours].shape)} ({ours})")
        targets[ours] = value
    if unknown:
        raise ValueError(f"{len(unknown)} {source} weights have no counterpart in this model: {unknown[:10]}")
    if mis_shaped:
        raise ValueError(f"{len(mis_shaped)} {source} weights have another shape here: {mis_shaped[:10]}")
    for key in tied:
        if _TIED_COPIES[key] in state_dict and not torch.equal(state_dict[key], state_dict[_TIED_COPIES[key]]):
            raise ValueError(f"{key} differs from {_TIED_COPIES[key]} (one tied parameter in BLIP)")
    tied_here = {TIED_LM_WEIGHT} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(own) - set(targets) - tied_here)
    if missing:
        raise ValueError(f"{len(missing)} weights of this model are missing from the {source} state dict: "
                         f"{missing[:10]}")
    _copy_weights(model, targets)


def _check_salesforce_vit(model: nn.Module) -> None:
    """Raise ``ValueError`` unless the ViT is salesforce's (LayerNorm eps 1e-6, exact GELU)."""
    _require_blip_vision(model, "salesforce BLIP")
    config = model.visual_encoder.model.config
    if float(config.layer_norm_eps) != 1e-6 or config.hidden_act != "gelu":
        raise ValueError("salesforce BLIP's ViT uses LayerNorm eps 1e-6 and exact GELU; this visual encoder has "
                         f"layer_norm_eps={config.layer_norm_eps}, hidden_act={config.hidden_act!r}: build it with "
                         "blip_vision_encoder(..., layer_norm_eps=1e-6)")


def load_hf_vqa_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a transformers ``BlipForQuestionAnswering`` state dict into a :class:`BlipVQA` (module docstring)."""
    _load(model, state_dict, _hf_name, "BlipForQuestionAnswering")


def load_salesforce_vqa_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | str, *,
                                   interpolate_pos_embed: bool = True) -> None:
    """Load a salesforce ``BLIP_VQA`` state dict (or ``.pth`` path) into a :class:`BlipVQA`; ``pos_embed`` of
    another resolution is resized bicubically, as salesforce's ``load_checkpoint``, unless
    ``interpolate_pos_embed=False``."""
    if isinstance(state_dict, str):
        state_dict = read_salesforce_checkpoint(state_dict)
    _check_salesforce_vit(model)
    _load(model, state_dict, _salesforce_name, "salesforce BLIP_VQA", interpolate_pos_embed)


def load_salesforce_nlvr_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | str, *,
                                    interpolate_pos_embed: bool = True) -> None:
    """Load a salesforce ``BLIP_NLVR`` state dict (or ``.pth`` path) into a :class:`BlipNLVR` (same names
    as ours but for the ViT)."""
    if isinstance(state_dict, str):
        state_dict = read_salesforce_checkpoint(state_dict)
    _check_salesforce_vit(model)
    _load(model, state_dict, _salesforce_name, "salesforce BLIP_NLVR", interpolate_pos_embed)
