"""Whole BLIP models from a plain spec: build, save, load, and from a salesforce/BLIP checkpoint.

A spec is a JSON-able dict (vision tower, :class:`~vlmcore.blip.text.MEDConfig` fields, ITC width,
momentum, queue size); :func:`save_blip` writes it beside the online weights and :func:`load_blip`
reads both back. :func:`salesforce_blip_spec` reads a spec off a salesforce/BLIP state dict's shapes,
and :func:`blip_from_salesforce` builds and loads that model. :func:`read_hf_blip` reads a transformers
``save_pretrained`` directory, :func:`hf_blip_spec` its spec, :func:`blip_from_hf` the model;
:func:`checkpoint_format` tells the four kinds of checkpoint apart.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict

import torch

from vlmcore.blip.convert import (
    HF_RENAMES,
    MOMENTUM_STATE,
    TIED_LM_WEIGHT,
    load_hf_captioning_state_dict,
    load_hf_retrieval_state_dict,
    load_salesforce_state_dict,
    read_salesforce_checkpoint,
)
from vlmcore.blip.heads_convert import (
    load_blip_into_nlvr,
    load_blip_into_vqa,
    load_hf_vqa_state_dict,
    load_salesforce_nlvr_state_dict,
    load_salesforce_vqa_state_dict,
)
from vlmcore.blip.model import BLIP, blip_vision_encoder
from vlmcore.blip.nlvr import BlipNLVR
from vlmcore.blip.text import MEDConfig
from vlmcore.blip.vqa import BlipVQA
from vlmcore.checkpoint_keys import check_keys, read_hf_weights
from vlmcore.vision import VisionTransformer


def build_blip(spec: dict) -> BLIP:
    """A BLIP from a JSON-able spec (what :func:`save_blip` stores)::

        {"vision": {"kind": "vit", "image_size": 224, "patch_size": 16, "width": 768, "depth": 12, "heads": 12}
                   # or {"kind": "hf_blip", <BlipVisionConfig fields>},
         "text": {<MEDConfig fields>}, "embed_dim": 256, "momentum": 0.995 or null, "queue_size": 57600}

    The spec is kept on the model as ``model.spec``.
    """
    if not isinstance(spec, dict) or "vision" not in spec or "text" not in spec:
        raise ValueError("spec must be a dict with 'vision' and 'text' entries")
    model = BLIP(build_vision_tower(spec["vision"]), MEDConfig(**spec["text"]),
                 embed_dim=int(spec.get("embed_dim", 256)), momentum=spec.get("momentum", 0.995),
                 queue_size=int(spec.get("queue_size", 57600)), temperature=float(spec.get("temperature", 0.07)))
    model.spec = dict(spec)
    return model


def build_vision_tower(vision: dict):
    """The image tower of a spec's ``vision`` entry (``kind`` ``"vit"``: :class:`VisionTransformer`,
    ``"hf_blip"``: :func:`blip_vision_encoder`; the other entries are their arguments)."""
    vision = dict(vision)
    kind = vision.pop("kind", "vit")
    if kind == "vit":
        return VisionTransformer(**vision)
    if kind == "hf_blip":
        return blip_vision_encoder(**vision)
    raise ValueError(f"spec['vision']['kind'] must be 'vit' or 'hf_blip', got {kind!r}")


def save_blip(model: BLIP, directory: str) -> str:
    """Write ``blip.json`` (the spec) and ``model.safetensors`` (online weights; no momentum copies or
    queues) into ``directory``, atomically per file. The model must come from :func:`build_blip`."""
    from safetensors.torch import save_file

    spec = getattr(model, "spec", None)
    if spec is None:
        raise ValueError("model has no spec: build it with build_blip(spec) to save it with save_blip")
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not k.startswith(MOMENTUM_STATE) and k != TIED_LM_WEIGHT}
    tmp = os.path.join(directory, "model.safetensors.tmp")
    save_file(state, tmp)
    os.replace(tmp, os.path.join(directory, "model.safetensors"))
    tmp = os.path.join(directory, "blip.json.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(spec, handle, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(directory, "blip.json"))
    return directory


def load_blip(directory: str, *, source: str | None = None, **overrides) -> BLIP:
    """The BLIP saved by :func:`save_blip` in ``directory`` (spec entries can be overridden, e.g.
    ``momentum=None`` for inference); every saved weight must match by name and shape (missing /
    unexpected ones are reported by ``check_keys``, ``source`` naming what was read)."""
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
    missing = [k for k in missing if not k.startswith(MOMENTUM_STATE) and k != TIED_LM_WEIGHT]
    check_keys(source or f"BLIP checkpoint {directory}", missing, unexpected)
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
    cross = bert + "encoder.layer.0.crossattention.self0.key.weight"  # BLIP_NLVR's twin cross-attention
    if cross not in state_dict:
        cross = bert + "encoder.layer.0.crossattention.self.key.weight"
    vocab, hidden = shape(bert + "embeddings.word_embeddings.weight")
    text = {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers(bert + "encoder.layer."),
            "intermediate_size": shape(bert + "encoder.layer.0.intermediate.dense.weight")[0],
            "max_position_embeddings": shape(bert + "embeddings.position_embeddings.weight")[0],
            "encoder_width": shape(cross)[1]}
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


def is_salesforce_checkpoint(path: str) -> bool:
    """Whether ``path`` is a salesforce/BLIP checkpoint file (``model_base.pth``, ...), as opposed to
    a :func:`save_blip` folder."""
    return os.path.isfile(path) and path.endswith((".pth", ".pt"))


# BlipVisionConfig fields a spec keeps (the rest of its to_dict() is bookkeeping).
_HF_VISION_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                     "patch_size", "layer_norm_eps", "hidden_act")


def checkpoint_format(path: str) -> str | None:
    """What ``path`` holds: ``"save_blip"`` (a folder with ``blip.json``), ``"hf"`` (a transformers
    ``save_pretrained`` folder: ``config.json``), ``"salesforce"`` (a ``.pth`` / ``.pt`` file), or None."""
    if os.path.isfile(os.path.join(path, "blip.json")):
        return "save_blip"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    return "salesforce" if is_salesforce_checkpoint(path) else None


def read_hf_blip(directory: str) -> tuple[object, str, dict[str, torch.Tensor]]:
    """``(BlipConfig, architecture, state dict)`` of a transformers ``save_pretrained`` BLIP directory:
    the architecture is ``config.json``'s first ``architectures`` entry (its ``model_type`` must be
    ``blip``), the weights ``model.safetensors`` or the shards its ``model.safetensors.index.json`` lists."""
    from transformers import BlipConfig

    with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
        raw = json.load(handle)
    architectures = raw.get("architectures") or []
    if raw.get("model_type") != "blip" or not architectures:
        raise ValueError(f"{directory!r} is not a Hugging Face BLIP directory: config.json has model_type "
                         f"{raw.get('model_type')!r}, architectures {architectures!r}")
    return BlipConfig.from_pretrained(directory), architectures[0], read_hf_weights(directory)


def hf_blip_spec(config, *, text_overrides: dict | None = None) -> dict:
    """A :func:`build_blip` spec (``hf_blip`` tower) for a transformers ``BlipConfig``;
    ``text_overrides`` replaces :class:`MEDConfig` fields (e.g. the tokenizer's special ids)."""
    vision = {"kind": "hf_blip", **{k: getattr(config.vision_config, k) for k in _HF_VISION_FIELDS}}
    text = asdict(MEDConfig.from_hf(config.text_config))
    text.update(text_overrides or {})
    return {"vision": vision, "text": text, "embed_dim": int(config.image_text_hidden_size)}


def blip_from_hf(directory: str, *, source: str | None = None, accept: tuple[str, ...] = tuple(HF_RENAMES),
                 **spec_overrides) -> BLIP:
    """The BLIP of a transformers ``BlipForImageTextRetrieval`` / ``BlipForConditionalGeneration``
    ``save_pretrained`` directory (:func:`read_hf_blip`), built by :func:`hf_blip_spec` with
    ``spec_overrides`` (``text_overrides``, ``momentum``, ``queue_size``, ``temperature``) and loaded
    by name; keys are reported by ``check_keys`` under ``source``. Another architecture than those of
    ``accept`` raises ``ValueError``. Parts the architecture lacks keep their initialization (a
    captioner's ITC / ITM heads; a retrieval model's decoder self-attention and LM head)."""
    config, architecture, state = read_hf_blip(directory)
    if architecture not in accept:
        raise ValueError(f"{source or directory}: the checkpoint is a {architecture}; this needs a "
                         f"{' or '.join(accept)}")
    spec = hf_blip_spec(config, text_overrides=spec_overrides.pop("text_overrides", None))
    spec.update(spec_overrides)
    model = build_blip(spec)
    load = (load_hf_retrieval_state_dict if architecture == "BlipForImageTextRetrieval"
            else load_hf_captioning_state_dict)
    load(model, state, source=f"{source or directory} ({architecture})")
    return model


def is_pretrained_blip(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a salesforce state dict is a pre-trained / retrieval BLIP (it has the ITM head or the
    ITC projections), as opposed to a fine-tuned ``BLIP_VQA`` / ``BLIP_NLVR``."""
    return any(k in state_dict for k in ("itm_head.weight", "vision_proj.weight", "text_proj.weight"))


def _pretrained_blip(path: str, fmt: str, image_size: int, text_overrides: dict | None, source: str) -> BLIP:
    """The BLIP of a pre-trained checkpoint: a save_blip folder, or a salesforce ``.pth`` (its ViT's
    positions resized to ``image_size``), without momentum encoders."""
    if fmt == "save_blip":
        return load_blip(path, source=source, momentum=None)
    state = read_salesforce_checkpoint(path)
    blip = build_blip(salesforce_blip_spec(state, image_size=image_size, momentum=None,
                                           text_overrides=text_overrides))
    load_salesforce_state_dict(blip, state, load_momentum=False, interpolate_pos_embed=True, source=source)
    return blip


def _head_source(path: str, image_size: int, text_overrides: dict | None, source: str, hf_architecture: str | None):
    """What a VQA / NLVR2 ``init`` holds: ``("blip", BLIP)`` for a pre-trained BLIP, else
    ``(format, spec, state dict)`` of the fine-tuned model (``"hf"``: ``hf_architecture`` only)."""
    fmt = checkpoint_format(path)
    if fmt is None:
        raise ValueError(f"{source}: {path!r} is neither a BLIP checkpoint folder (blip.json), a Hugging Face "
                         "save_pretrained folder (config.json) nor a salesforce/BLIP .pth file")
    if fmt == "hf":
        config, architecture, state = read_hf_blip(path)
        if architecture != hf_architecture:
            raise ValueError(f"{source}: the checkpoint is a {architecture}; this needs "
                             f"{hf_architecture or 'a salesforce .pth or a pre-trained BLIP'}")
        return "hf", hf_blip_spec(config, text_overrides=text_overrides), state
    if fmt == "salesforce":
        state = read_salesforce_checkpoint(path)
        if not is_pretrained_blip(state):
            spec = salesforce_blip_spec(state, image_size=image_size, momentum=None, text_overrides=text_overrides)
            return "salesforce", spec, state
    return "blip", _pretrained_blip(path, fmt, image_size, text_overrides, source)


def vqa_from_checkpoint(path: str, *, image_size: int, text_overrides: dict | None = None,
                        source: str | None = None) -> BlipVQA:
    """A :class:`BlipVQA` from ``path``: a transformers ``BlipForQuestionAnswering`` directory, a
    salesforce ``BLIP_VQA`` ``.pth``, or a pre-trained BLIP (a salesforce ``model_base.pth`` - one with
    ITM / ITC heads - or a :func:`save_blip` folder; :func:`load_blip_into_vqa`). Keys are reported by
    ``check_keys`` under ``source``."""
    source = source or path
    found = _head_source(path, image_size, text_overrides, source, "BlipForQuestionAnswering")
    if found[0] == "blip":
        blip = found[1]
        model = BlipVQA(blip.visual_encoder, blip.config)
        load_blip_into_vqa(model, blip.state_dict(), source=source)
        return model
    fmt, spec, state = found
    model = BlipVQA(build_vision_tower(spec["vision"]), MEDConfig(**spec["text"]))
    if fmt == "hf":
        load_hf_vqa_state_dict(model, state, source=source)
    else:
        load_salesforce_vqa_state_dict(model, state, source=source)
    return model


def nlvr_from_checkpoint(path: str, *, image_size: int, merge_from_layer: int, text_overrides: dict | None = None,
                         source: str | None = None) -> BlipNLVR:
    """A :class:`BlipNLVR` from ``path``: a salesforce ``BLIP_NLVR`` ``.pth``, or a pre-trained BLIP (a
    salesforce ``model_base.pth`` or a :func:`save_blip` folder; :func:`load_blip_into_nlvr`: each
    cross-attention into both ``self0`` and ``self1``, ``merge_layer`` / ``cls_head`` new)."""
    source = source or path
    found = _head_source(path, image_size, text_overrides, source, None)
    if found[0] == "blip":
        blip = found[1]
        model = BlipNLVR(blip.visual_encoder, blip.config, merge_from_layer=merge_from_layer)
        load_blip_into_nlvr(model, blip.state_dict(), source=source)
        return model
    _, spec, state = found
    model = BlipNLVR(build_vision_tower(spec["vision"]), MEDConfig(**spec["text"]), merge_from_layer=merge_from_layer)
    load_salesforce_nlvr_state_dict(model, state, source=source)
    return model
