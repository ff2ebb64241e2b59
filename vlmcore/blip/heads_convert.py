"""Checkpoint conversion for BLIP's fine-tuned heads: :class:`~vlmcore.blip.vqa.BlipVQA` and
:class:`~vlmcore.blip.nlvr.BlipNLVR`, by name.

- :func:`load_hf_vqa_state_dict`: Hugging Face ``BlipForQuestionAnswering`` (``vision_model.*``,
  ``text_encoder.*``, ``text_decoder.bert.*``, ``text_decoder.cls.*``);
- :func:`load_salesforce_vqa_state_dict`: salesforce ``BLIP_VQA`` (``model_base_vqa_capfilt_large.pth``):
  the same text names, the ViT in timm-0.4 names;
- :func:`load_salesforce_nlvr_state_dict`: salesforce ``BLIP_NLVR`` (``model_base_nlvr.pth``): ViT,
  ``text_encoder.*`` with the twin cross-attention (``self0`` / ``self1``, ``dense0`` / ``dense1``,
  ``merge_layer``), ``cls_head.{0,2}``.

- :func:`load_blip_into_vqa` / :func:`load_blip_into_nlvr`: a pre-trained :class:`~vlmcore.blip.BLIP`'s
  state dict (ours: a salesforce ``model_base.pth`` loaded by :func:`~vlmcore.blip.blip_from_salesforce`,
  or a ``blip_pretrain`` run), as the papers fine-tune: VQA's question encoder from the text encoder,
  its answer decoder from the text decoder; NLVR2's ``self0`` and ``self1`` (and ``dense0`` /
  ``dense1``) both from each pre-trained cross-attention (salesforce ``blip_nlvr.load_checkpoint``),
  ``merge_layer`` and ``cls_head`` left new.

The ViT goes into the ``BlipVisionModel`` of :func:`~vlmcore.blip.model.blip_vision_encoder` (salesforce
names mapped as :mod:`vlmcore.blip.convert` does). The decoder's self-attention is our
``decoder_attention``. Every weight of the model must be covered; missing and unknown names are
reported together by :func:`vlmcore.checkpoint_keys.check_keys`; mis-shaped names and tied copies
that differ raise ``ValueError`` naming them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vlmcore.blip.convert import (
    MOMENTUM_STATE,
    TIED_LM_WEIGHT,
    _copy_weights,
    _require_blip_vision,
    _resize_pos_embed,
    _salesforce_vit_name,
    read_salesforce_checkpoint,
)
from vlmcore.checkpoint_keys import check_keys

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


def hf_vqa_name(key: str) -> str | None:
    """Our name of a ``BlipForQuestionAnswering`` key (None: no counterpart); the load and the export use it."""
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
    if mis_shaped:
        raise ValueError(f"{len(mis_shaped)} {source} weights have another shape here: {mis_shaped[:10]}")
    for key in tied:
        if _TIED_COPIES[key] in state_dict and not torch.equal(state_dict[key], state_dict[_TIED_COPIES[key]]):
            raise ValueError(f"{key} differs from {_TIED_COPIES[key]} (one tied parameter in BLIP)")
    tied_here = {TIED_LM_WEIGHT} if getattr(model.config, "tie_word_embeddings", False) else set()
    check_keys(source, set(own) - set(targets) - tied_here, unknown)
    _copy_weights(model, targets)


def _check_salesforce_vit(model: nn.Module) -> None:
    """Raise ``ValueError`` unless the ViT is salesforce's (LayerNorm eps 1e-6, exact GELU)."""
    _require_blip_vision(model, "salesforce BLIP")
    config = model.visual_encoder.model.config
    if float(config.layer_norm_eps) != 1e-6 or config.hidden_act != "gelu":
        raise ValueError("salesforce BLIP's ViT uses LayerNorm eps 1e-6 and exact GELU; this visual encoder has "
                         f"layer_norm_eps={config.layer_norm_eps}, hidden_act={config.hidden_act!r}: build it with "
                         "blip_vision_encoder(..., layer_norm_eps=1e-6)")


def load_hf_vqa_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], *,
                           source: str = "BlipForQuestionAnswering") -> None:
    """Load a transformers ``BlipForQuestionAnswering`` state dict into a :class:`BlipVQA` (module docstring)."""
    _load(model, state_dict, hf_vqa_name, source)


def load_salesforce_vqa_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | str, *,
                                   interpolate_pos_embed: bool = True, source: str = "salesforce BLIP_VQA") -> None:
    """Load a salesforce ``BLIP_VQA`` state dict (or ``.pth`` path) into a :class:`BlipVQA`; ``pos_embed`` of
    another resolution is resized bicubically, as salesforce's ``load_checkpoint``, unless
    ``interpolate_pos_embed=False``."""
    if isinstance(state_dict, str):
        state_dict = read_salesforce_checkpoint(state_dict)
    _check_salesforce_vit(model)
    _load(model, state_dict, _salesforce_name, source, interpolate_pos_embed)


def load_salesforce_nlvr_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | str, *,
                                    interpolate_pos_embed: bool = True, source: str = "salesforce BLIP_NLVR") -> None:
    """Load a salesforce ``BLIP_NLVR`` state dict (or ``.pth`` path) into a :class:`BlipNLVR` (same names
    as ours but for the ViT)."""
    if isinstance(state_dict, str):
        state_dict = read_salesforce_checkpoint(state_dict)
    _check_salesforce_vit(model)
    _load(model, state_dict, _salesforce_name, source, interpolate_pos_embed)


# ----------------------------------------------------------------------------------------------
# from a pre-trained BLIP (our names), as the papers fine-tune
# ----------------------------------------------------------------------------------------------

# A pre-trained BLIP's parts that a VQA / NLVR2 model has no place for (salesforce's strict=False
# load drops them too): ITC / ITM heads, the temperature, momentum state, the trainer's step count.
_PRETRAIN_ONLY = ("vision_proj.", "text_proj.", "itm_head.", "temp", "train_step", *MOMENTUM_STATE)


def _vqa_targets(key: str) -> list[str] | None:
    """VQA names a pre-trained BLIP ``key`` fills: a shared text layer part goes to both the question
    encoder and the answer decoder; each self-attention to its own side."""
    if key.startswith(("visual_encoder.", "lm_head.")):
        return [key]
    if key.startswith("text_encoder."):
        rest = key[len("text_encoder."):]
        if ".decoder_attention." in rest:
            return ["text_decoder." + rest]
        return ["text_encoder." + rest] + ([] if ".attention." in rest else ["text_decoder." + rest])
    return None


def _nlvr_targets(key: str) -> list[str] | None:
    """NLVR2 names a pre-trained BLIP ``key`` fills: each cross-attention (and its output projection)
    twice, as ``self0`` / ``self1`` (``dense0`` / ``dense1``); the decoder's parts nowhere."""
    if key.startswith("visual_encoder."):
        return [key]
    if key.startswith("lm_head.") or ".decoder_attention." in key:
        return []
    if not key.startswith("text_encoder."):
        return None
    for one, twins in ((".crossattention.self.", (".crossattention.self0.", ".crossattention.self1.")),
                       (".crossattention.output.dense.", (".crossattention.output.dense0.",
                                                          ".crossattention.output.dense1."))):
        if one in key:
            return [key.replace(one, twin) for twin in twins]
    return [key]


def _load_from_blip(model: nn.Module, blip_state: dict[str, torch.Tensor], targets: Callable[[str], list[str] | None],
                    is_new: Callable[[str], bool], source: str) -> None:
    """Copy ``blip_state`` into ``model`` under ``targets(key)`` (None: unknown; ``[]``: no place here);
    every weight of ``model`` but the new ones (``is_new(name)``) must be filled."""
    own = model.state_dict()
    values, unknown, mis_shaped = {}, [], []
    for key, value in blip_state.items():
        if key.startswith(_PRETRAIN_ONLY) or key == TIED_LM_WEIGHT:
            continue
        names = targets(key)
        if names is None or any(name not in own for name in names):
            unknown.append(key)
            continue
        for name in names:
            if value.shape != own[name].shape:
                mis_shaped.append(f"{key}: {tuple(value.shape)} != {tuple(own[name].shape)} ({name})")
            values[name] = value
    if mis_shaped:
        raise ValueError(f"{source}: {len(mis_shaped)} pre-trained BLIP weights have another shape here: "
                         f"{mis_shaped[:10]}")
    tied = {TIED_LM_WEIGHT} if getattr(model.config, "tie_word_embeddings", False) else set()
    check_keys(source, {k for k in own if not is_new(k)} - set(values) - tied, unknown)
    _copy_weights(model, values)


def load_blip_into_vqa(model: nn.Module, blip_state: dict[str, torch.Tensor], *, source: str = "BLIP") -> None:
    """Fill a :class:`BlipVQA` from a pre-trained :class:`BLIP`'s ``state_dict()`` (module docstring).
    The answer decoder's cross-attention reads the question states, so the BLIP's image width must
    equal its text width (BLIP-base: 768 both), else ``ValueError`` names the weights."""
    _load_from_blip(model, blip_state, _vqa_targets, lambda name: False, source)


def load_blip_into_nlvr(model: nn.Module, blip_state: dict[str, torch.Tensor], *, source: str = "BLIP") -> None:
    """Fill a :class:`BlipNLVR` from a pre-trained :class:`BLIP`'s ``state_dict()`` (module docstring);
    ``merge_layer`` and ``cls_head`` keep their initialization."""
    _load_from_blip(model, blip_state, _nlvr_targets,
                    lambda name: name.startswith("cls_head.") or ".crossattention.output.merge_layer." in name, source)
