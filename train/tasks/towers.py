"""Vision towers from ``model.vision``: the built-in ViT, open_clip, timm and HF towers.

``model.vision.type``:

- ``builtin``: :class:`vlmcore.VisionTransformer` (``image_size, patch_size, width, depth, heads,
  mlp_ratio, act: gelu | quick_gelu``; weights from ``init``, a safetensors file, e.g. the
  ``vision.safetensors`` of a CLIP run).
- ``open_clip``: ``open_clip.create_model(name, pretrained=checkpoint, **model_kwargs).visual`` in an
  :class:`vlmcore.OpenCLIPVisionAdapter` (``checkpoint``: a local full-model file such as
  ``open_clip_pytorch_model.bin``, loaded by open_clip's own loader; null = random init).
- ``timm``: ``timm.create_model(name, num_classes=0, **model_kwargs)`` in a
  :class:`vlmcore.TimmViTAdapter` (``checkpoint``: a local timm state dict / ``.safetensors``, loaded by
  timm's ``pretrained_cfg_overlay=dict(file=...)`` path, which drops a classifier head).
- ``hf``: ``CLIPVisionModel`` / ``SiglipVisionModel`` / ``Blip2VisionModel`` from the local directory
  ``path`` (a vision model or a full CLIP / SigLIP / BLIP-2 model directory) in a
  :class:`vlmcore.HFVisionAdapter` (BLIP-2 feeds its Q-Former every token: ``prefix_tokens: keep``).

Nothing is downloaded: every weight comes from a local path. :func:`vision_preprocess` gives the
tower's input size and preprocessing values *without building it* (the data workers need them
before the model exists). :func:`freeze_vision` implements ``freeze`` / ``unlocked_layers`` (LiT:
a locked image tower; open_clip's ``--lock-image-unlocked-groups``).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch
from torch import nn
from vlmcore.train.data.preprocess import tower_preprocess

import vlmcore

if TYPE_CHECKING:
    from vlmcore.train.config import VisionConfig

_HF_CLASSES = {"clip": "CLIPVisionModel", "clip_vision_model": "CLIPVisionModel",
               "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel",
               "blip-2": "Blip2VisionModel", "blip_2_vision_model": "Blip2VisionModel"}


def _prefix_policy(v: VisionConfig) -> str:
    # The built-in ViT has always returned CLS + patches; the adapters follow OpenFlamingo (patches only).
    return v.prefix_tokens or ("keep" if v.type == "builtin" else "drop")


def _check_file(name: str, path: str | None) -> None:
    if path and not os.path.isfile(path):
        raise ValueError(f"model.vision.{name}: {path!r} does not exist")


def _hf_config(path: str) -> dict:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"model.vision.path: {path!r} has no config.json (a transformers model directory)")
    with open(config_file, encoding="utf-8") as f:
        return json.load(f)


def _open_clip_model_cfg(v: VisionConfig) -> dict:
    import open_clip

    cfg = open_clip.get_model_config(v.name)
    if cfg is None:
        raise ValueError(f"model.vision.name: open_clip has no model {v.name!r}")
    for key, value in v.model_kwargs.items():
        cfg[key] = value
    return cfg


def vision_preprocess(v: VisionConfig) -> tuple[int, dict]:
    """``(input size, the tower's own preprocessing values)`` of ``model.vision`` (not built)."""
    if v.type == "builtin":
        return v.image_size, tower_preprocess("builtin")
    if v.type == "open_clip":
        cfg = _open_clip_model_cfg(v)
        size = cfg["vision_cfg"].get("image_size", 224)
        size = size if isinstance(size, int) else int(size[-1])
        # open_clip's own default preprocess_cfg (OpenAI mean/std, bicubic, shortest) at the tower's size.
        from open_clip.transform import PreprocessCfg, merge_preprocess_dict

        merged = merge_preprocess_dict(PreprocessCfg(), cfg.get("preprocess_cfg", {}))
        merged = merge_preprocess_dict(merged, v.model_kwargs.get("force_preprocess_cfg") or {})
        return size, {k: merged[k] for k in ("mean", "std", "interpolation", "resize_mode")}
    if v.type == "timm":
        import timm

        pretrained = timm.models.get_pretrained_cfg(v.name)
        if pretrained is None:
            raise ValueError(f"model.vision.name: timm has no model {v.name!r}")
        values = tower_preprocess("timm", pretrained.to_dict())
        size = v.model_kwargs.get("img_size") or values.get("size", 224)
        values.pop("size", None)
        return int(size if isinstance(size, int) else size[-1]), values
    if v.type == "hf":
        config = _hf_config(v.path)
        vision_config = config.get("vision_config", config)
        values = tower_preprocess("hf", path=v.path)
        return int(vision_config.get("image_size", values.get("size", 224))), values
    raise ValueError(f"model.vision.type: unknown {v.type!r}")


def build_tower(v: VisionConfig) -> nn.Module:
    """The vision encoder of ``model.vision`` (exposes ``width``, ``pooled_width``, ``forward``, ``pooled``)."""
    policy = _prefix_policy(v)
    if v.type == "builtin":
        vit = vlmcore.VisionTransformer(v.image_size, v.patch_size, v.width, v.depth, v.heads,
                                        mlp_ratio=v.mlp_ratio, act=v.act)
        if v.init:
            from safetensors.torch import load_file

            if not os.path.isfile(v.init):
                raise ValueError(f"model.vision.init: {v.init!r} does not exist")
            vit.load_state_dict(load_file(v.init))
        if policy == "drop":
            raise ValueError("model.vision.prefix_tokens: 'drop' is for the adapter towers; the built-in ViT "
                             "returns CLS + patches")
        return vit
    if v.type == "open_clip":
        import open_clip

        _check_file("checkpoint", v.checkpoint)
        model = open_clip.create_model(v.name, pretrained=v.checkpoint or None, **v.model_kwargs)
        return vlmcore.OpenCLIPVisionAdapter(model.visual, prefix_tokens=policy)
    if v.type == "timm":
        import timm

        _check_file("checkpoint", v.checkpoint)
        kwargs = dict(v.model_kwargs)
        kwargs.setdefault("num_classes", 0)
        if v.checkpoint:
            model = timm.create_model(v.name, pretrained=True, pretrained_cfg_overlay={"file": v.checkpoint},
                                      **kwargs)
        else:
            model = timm.create_model(v.name, pretrained=False, **kwargs)
        return vlmcore.TimmViTAdapter(model, prefix_tokens=policy)
    if v.type == "hf":
        import transformers

        model_type = _hf_config(v.path).get("model_type")
        if model_type not in _HF_CLASSES:
            raise ValueError(f"model.vision.path: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(sorted(_HF_CLASSES))})")
        if _HF_CLASSES[model_type] == "Blip2VisionModel":  # its weights sit under vision_model. in a BLIP-2 dir
            from vlmcore.blip2.hf import blip2_vision_from_hf

            return vlmcore.HFVisionAdapter(blip2_vision_from_hf(v.path), prefix_tokens=policy)
        cls = getattr(transformers, _HF_CLASSES[model_type])
        model = cls.from_pretrained(v.path, local_files_only=True, dtype=torch.float32)
        return vlmcore.HFVisionAdapter(model, prefix_tokens=policy)
    raise ValueError(f"model.vision.type: unknown {v.type!r}")


def _last_blocks(tower: nn.Module, v: VisionConfig) -> tuple[list[nn.Module], list[nn.Module]]:
    """(the tower's sequence of blocks, the modules after them) for ``unlocked_layers``."""
    if v.type == "builtin":  # a SigLIP-style tower's attention-pool head follows its final norm
        return list(tower.blocks), [tower.ln_post] + ([tower.head] if tower.head is not None else [])
    if v.type == "timm":
        model = tower.model
        blocks = getattr(model, "blocks", None) or getattr(model, "stages", None)
        if blocks is None:
            raise ValueError(f"model.vision.unlocked_layers: timm model {type(model).__name__} has no "
                             "blocks/stages to unlock")
        tail = [getattr(model, n) for n in ("norm", "fc_norm", "head_drop", "attn_pool", "norm_pre")
                if isinstance(getattr(model, n, None), nn.Module)]
        return list(blocks), tail
    if v.type == "hf":
        vm = getattr(tower.model, "vision_model", tower.model)  # transformers 5 has no vision_model level
        tail = [getattr(vm, n) for n in ("post_layernorm", "head") if isinstance(getattr(vm, n, None), nn.Module)]
        return list(vm.encoder.layers), tail
    raise ValueError(f"model.vision.unlocked_layers: not supported for type {v.type!r}")


def freeze_vision(tower: nn.Module, v: VisionConfig) -> None:
    """``freeze``: no tower parameter trains, except the last ``unlocked_layers`` blocks (and what
    follows them: final norm, pooling, projection). open_clip uses its own ``visual.lock``."""
    if not v.freeze:
        return
    if v.type == "open_clip":
        # open_clip's groups: embeddings, the blocks but the last, [last block + ln_post], proj; so
        # N unlocked blocks (with ln_post and proj) are N + 1 of its groups (--lock-image-unlocked-groups).
        tower.visual.lock(unlocked_groups=v.unlocked_layers + 1 if v.unlocked_layers else 0, freeze_bn_stats=False)
        return
    tower.requires_grad_(False)
    if v.unlocked_layers:
        blocks, tail = _last_blocks(tower, v)
        if v.unlocked_layers > len(blocks):
            raise ValueError(f"model.vision.unlocked_layers: {v.unlocked_layers} > the tower's {len(blocks)} blocks")
        for module in blocks[-v.unlocked_layers:] + tail:
            module.requires_grad_(True)
