"""Whole CLIP / SigLIP models from open_clip and Hugging Face, and back: weights by name.

- :func:`clip_from_open_clip`: an ``open_clip`` ViT CLIP (a built model, a model name + checkpoint
  file, or a directory holding ``open_clip_config.json``) -> :class:`vlmcore.CLIP`;
- :func:`clip_from_hf`: a transformers ``CLIPModel`` / ``SiglipModel`` (or its local directory)
  -> :class:`vlmcore.CLIP`;
- :func:`export_open_clip` / :func:`export_hf`: a :class:`vlmcore.CLIP` -> the peer's own files.

The architecture is read from the peer (its modules, or its config), never restated. Weights are
mapped name by name through one rule table per peer, used in both directions; a checkpoint whose
keys do not match (a key missing, one left over, a shape that differs) raises one
:class:`~vlmcore.checkpoint_keys.CheckpointKeysError` that lists them all. open_clip's SigLIP
models build their image tower with timm (a different module tree): load SigLIP through Hugging Face's ``SiglipModel``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Sequence

import torch
from torch import nn

from vlmcore.checkpoint_keys import check_keys, read_hf_weights
from vlmcore.clip.model import CLIP, TextTransformer
from vlmcore.vision import VisionTransformer

#: Our MLP activation names <-> Hugging Face ``hidden_act`` (gelu_new is the same tanh formula).
HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_HF_ACT_ALIASES = {"gelu_new": "gelu_tanh", **{v: k for k, v in HF_ACTIVATIONS.items()}}
#: Peer buffers that are not weights (older transformers checkpoints store the position ids).
IGNORED_PEER_KEYS = ("*position_ids",)
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


# --- name rules: applied in order (re.sub) to each of OUR parameter names give the peer's name;
# "{qkv}" in the result means three peer tensors (q, k, v) concatenated along dim 0.

_BLOCK_RULES_OPEN_CLIP = ((r"\.attn\.qkv\.(weight|bias)$", r".attn.in_proj_\1"), (r"\.attn\.proj\.", ".attn.out_proj."),
                          (r"\.mlp\.0\.", ".mlp.c_fc."), (r"\.mlp\.2\.", ".mlp.c_proj."))
_BLOCK_RULES_HF = ((r"\.ln_1\.", ".layer_norm1."), (r"\.ln_2\.", ".layer_norm2."),
                   (r"\.attn\.qkv\.", ".self_attn.{qkv}_proj."), (r"\.attn\.proj\.", ".self_attn.out_proj."),
                   (r"\.mlp\.0\.", ".mlp.fc1."), (r"\.mlp\.2\.", ".mlp.fc2."))


def _open_clip_rules(text_prefix: str, text_projection_bias: bool) -> tuple:
    """Our names -> open_clip's (``CLIP``: text modules at the top; ``CustomTextCLIP``: under ``text.``)."""
    text_projection = f"{text_prefix}text_projection" + (".weight" if text_projection_bias else "")
    return ((r"^criterion\.", ""), (r"^image_projection\.weight$", "visual.proj"),
            (r"^text_projection\.weight$", text_projection),
            (r"^text_projection\.bias$", f"{text_prefix}text_projection.bias"),
            (r"^text\.blocks\.", f"{text_prefix}transformer.resblocks."), (r"^text\.", text_prefix),
            (r"^visual\.blocks\.", "visual.transformer.resblocks."), *_BLOCK_RULES_OPEN_CLIP)


def _open_clip_transposed(text_projection_bias: bool) -> set[str]:
    """Our names whose open_clip tensor is the transpose (open_clip keeps ``x @ proj`` matrices)."""
    return {"image_projection.weight"} | (set() if text_projection_bias else {"text_projection.weight"})


def _hf_rules(siglip: bool) -> tuple:
    """Our names -> transformers' ``CLIPModel`` / ``SiglipModel`` names."""
    return ((r"^criterion\.", ""), (r"^image_projection\.", "visual_projection."),
            (r"^text_projection\.", "text_model.head." if siglip else "text_projection."),
            (r"^visual\.conv1\.", "vision_model.embeddings.patch_embedding."),
            (r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
            (r"^visual\.positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
            (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."),
            (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
            (r"^visual\.head\.qkv\.(weight|bias)$", r"vision_model.head.attention.in_proj_\1"),
            (r"^visual\.head\.proj\.", "vision_model.head.attention.out_proj."),
            (r"^visual\.head\.norm\.", "vision_model.head.layernorm."), (r"^visual\.head\.", "vision_model.head."),
            (r"^visual\.blocks\.", "vision_model.encoder.layers."),
            (r"^text\.token_embedding\.", "text_model.embeddings.token_embedding."),
            (r"^text\.positional_embedding$", "text_model.embeddings.position_embedding.weight"),
            (r"^text\.ln_final\.", "text_model.final_layer_norm."), (r"^text\.blocks\.", "text_model.encoder.layers."),
            *_BLOCK_RULES_HF)


def _peer_names(ours: str, rules) -> list[str]:
    """The peer names of our parameter ``ours`` (three for a fused q/k/v tensor)."""
    name = ours
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return [name.format(qkv=part) for part in "qkv"] if "{qkv}" in name else [name]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def load_peer_state(model: nn.Module, peer_state: dict, rules, transposed: set[str] = frozenset(), *,
                    source: str = "checkpoint", allow_missing: Sequence[str] = (),
                    allow_unexpected: Sequence[str] = ()) -> None:
    """Fill ``model``'s parameters from a peer state dict, by name (see the module docstring).

    Args:
        model: the vlmcore model (its state dict is the list of what is needed).
        peer_state: ``{peer name: tensor}``.
        rules, transposed: the peer's name rules and our names stored transposed by the peer.
        source: what the report calls the checkpoint (a path or a model name).
        allow_missing: glob patterns of PEER names that may be absent (ours then keep their init).
        allow_unexpected: glob patterns of peer names to ignore (besides :data:`IGNORED_PEER_KEYS`).
    Raises:
        CheckpointKeysError: listing every missing, unexpected and mis-shaped key.
    """
    ours = model.state_dict()
    loaded, used, missing, mismatched = {}, set(), [], []
    for name, target in ours.items():
        peer = _peer_names(name, rules)
        absent = [p for p in peer if p not in peer_state]
        if absent:
            missing += [p for p in absent if not _matches(p, allow_missing)]
            continue
        used.update(peer)
        tensor = torch.cat([peer_state[p] for p in peer]) if len(peer) > 1 else peer_state[peer[0]]
        tensor = tensor.t() if name in transposed else tensor
        if tensor.numel() != target.numel() or (tensor.dim() > 1 and tensor.shape != target.shape):
            mismatched.append(f"{'+'.join(peer)}: {tuple(tensor.shape)} vs ours {tuple(target.shape)}")
            continue
        loaded[name] = tensor.reshape(target.shape).to(target.dtype)  # 0-dim vs [1] logit scales
    ignored = IGNORED_PEER_KEYS + tuple(allow_unexpected)
    unexpected = [k for k in peer_state if k not in used and not _matches(k, ignored)]
    check_keys(source, missing, unexpected, mismatched,
               hint="allow_missing / allow_unexpected take glob patterns of the keys to let through")
    model.load_state_dict(loaded, strict=False)


def peer_state_dict(model: nn.Module, rules, transposed: set[str] = frozenset(),
                    peer_shapes: dict[str, torch.Size] | None = None) -> dict[str, torch.Tensor]:
    """Our state dict under the peer's names (the inverse of :func:`load_peer_state`); ``peer_shapes``
    reshapes tensors whose peer shape differs only by size-1 dimensions (the logit scale)."""
    out = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().t() if name in transposed else tensor.detach()
        peer = _peer_names(name, rules)
        for part, chunk in zip(peer, tensor.chunk(len(peer)) if len(peer) > 1 else [tensor]):
            shape = peer_shapes.get(part) if peer_shapes else None
            out[part] = (chunk.reshape(shape) if shape is not None else chunk).contiguous().clone()
    return out


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint file (``.safetensors`` or a torch pickle, read with ``weights_only``) as a flat
    state dict; a training checkpoint's ``{"state_dict": ...}`` and DDP's ``module.`` prefix are removed."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path!r} is not a state dict (got {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _activation_name(module: nn.Module, where: str) -> str:
    """Our name of a peer's activation module (QuickGELU, GELU, tanh GELU)."""
    if type(module).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    raise ValueError(f"{where}: activation {type(module).__name__} has no vlmcore equivalent")


def _mlp_ratio(width: int, hidden: int) -> float:
    """The ``mlp_ratio`` whose ``int(width * ratio)`` is ``hidden`` (TransformerBlock's rule)."""
    ratio = hidden / width
    if int(width * ratio) != hidden:
        raise ValueError(f"MLP hidden width {hidden} of width {width} cannot be expressed as a ratio")
    return ratio


# --- open_clip

def _open_clip_vision(visual: nn.Module) -> VisionTransformer:
    """Our :class:`VisionTransformer` shaped like an open_clip ViT tower (weights not copied)."""
    if type(visual).__name__ != "VisionTransformer" or getattr(visual, "attn_pool", None) is not None \
            or getattr(visual, "pool_type", None) != "tok":
        raise ValueError(f"open_clip image tower {type(visual).__name__}: only ViT towers pooled at the CLS token "
                         "convert (no attentional pooler; timm towers such as SigLIP's and ModifiedResNet do not): "
                         "load SigLIP with clip_from_hf, or keep the tower as vlmcore.OpenCLIPVisionAdapter")
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        raise ValueError(f"open_clip image tower: non-square image {visual.image_size} / patch {visual.patch_size}")
    blocks = visual.transformer.resblocks
    width = visual.conv1.out_channels
    return VisionTransformer(
        visual.image_size[0], visual.patch_size[0], width, len(blocks), blocks[0].attn.num_heads,
        mlp_ratio=_mlp_ratio(width, blocks[0].mlp.c_fc.out_features), channels=visual.conv1.in_channels,
        act=_activation_name(blocks[0].mlp.gelu, "open_clip image tower"), patch_bias=visual.conv1.bias is not None,
        pre_norm=not isinstance(visual.ln_pre, nn.Identity), norm_eps=visual.ln_post.eps)


def _open_clip_text(peer: nn.Module) -> TextTransformer:
    """Our :class:`TextTransformer` shaped like the text tower of an open_clip ``CLIP`` (modules on the
    model) or ``CustomTextCLIP`` (an open_clip ``TextTransformer`` in ``.text``)."""
    text = getattr(peer, "text", peer)
    if type(text).__name__ not in ("TextTransformer", "CLIP"):
        raise ValueError(f"open_clip text tower {type(text).__name__} (e.g. a Hugging Face text model) does not "
                         "convert; only open_clip's own TextTransformer does")
    if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
        raise ValueError("open_clip text tower with a CLS embedding or a padding mask (CoCa) does not convert")
    pool_type = getattr(text, "text_pool_type", getattr(text, "pool_type", None))
    eos_id = getattr(text, "text_eos_id", getattr(text, "eos_id", None))
    pools = {"argmax": ("eot", None), "eos": ("eot", eos_id), "last": ("last", None)}
    if pool_type not in pools:
        raise ValueError(f"open_clip text pool_type {pool_type!r} does not convert (argmax, eos, last do)")
    blocks = text.transformer.resblocks
    width = text.token_embedding.embedding_dim
    pool, eot = pools[pool_type]
    return TextTransformer(
        text.token_embedding.num_embeddings, text.positional_embedding.shape[0], width, len(blocks),
        blocks[0].attn.num_heads, pad_token_id=getattr(text, "pad_id", 0), eot_token_id=eot,
        mlp_ratio=_mlp_ratio(width, blocks[0].mlp.c_fc.out_features), causal=text.attn_mask is not None,
        pool=pool, act=_activation_name(blocks[0].mlp.gelu, "open_clip text tower"), norm_eps=text.ln_final.eps)


def _open_clip_peer(model_or_name) -> tuple[nn.Module, str | None]:
    """``(open_clip model, weights file of a directory or None)``; names are built with random init."""
    if isinstance(model_or_name, nn.Module):
        return model_or_name, None
    if not isinstance(model_or_name, str) or not model_or_name:
        raise TypeError(f"model_or_name must be an open_clip model, a model name or a directory, got {model_or_name!r}")
    import open_clip

    name, weights = model_or_name, None
    directory = name[len("local-dir:"):] if name.startswith("local-dir:") else name
    if os.path.isdir(directory):
        if not os.path.isfile(os.path.join(directory, OPEN_CLIP_CONFIG)):
            raise ValueError(f"{directory!r} has no {OPEN_CLIP_CONFIG} (an open_clip model directory)")
        name = "local-dir:" + directory
        weights = next((os.path.join(directory, f) for f in OPEN_CLIP_WEIGHTS
                        if os.path.isfile(os.path.join(directory, f))), None)
    elif open_clip.get_model_config(name) is None:
        raise ValueError(f"open_clip has no model {name!r} (and it is not a directory holding {OPEN_CLIP_CONFIG})")
    return open_clip.create_model(name, load_weights=False), weights


def clip_from_open_clip(model_or_name, pretrained: str | None = None, *, allow_missing: Sequence[str] = (),
                        allow_unexpected: Sequence[str] = ()) -> CLIP:
    """A :class:`vlmcore.CLIP` with the architecture and weights of an open_clip ViT CLIP.

    Args:
        model_or_name: a built open_clip ``CLIP`` / ``CustomTextCLIP`` (its weights are copied), an
            open_clip model name (``"ViT-B-32"``, ``"ViT-B-32-quickgelu"``; built without weights), or a
            local directory holding ``open_clip_config.json`` (+ ``open_clip_model.safetensors``, as
            :func:`export_open_clip` writes it; ``local-dir:`` prefix optional).
        pretrained: a local checkpoint file (``.safetensors``, ``.bin``, ``.pt``; a training
            checkpoint's ``state_dict`` is unwrapped) whose weights replace the model's.
        allow_missing, allow_unexpected: glob patterns of open_clip key names that may be absent /
            are ignored (see :func:`load_peer_state`).

    Returns:
        the model: ``encode_image`` / ``encode_text`` equal open_clip's normalized features and
        ``pair_scores`` its logits (``loss="siglip"`` when the model has a ``logit_bias``).
    Raises:
        CheckpointKeysError: the checkpoint's keys do not match the architecture (all listed).
    """
    peer, weights = _open_clip_peer(model_or_name)
    weights = pretrained or weights
    if weights is None and not isinstance(model_or_name, nn.Module):
        raise ValueError(f"{model_or_name!r}: no weights (pass pretrained=<checkpoint file>)")
    vision, text = _open_clip_vision(peer.visual), _open_clip_text(peer)
    text_prefix = "text." if hasattr(peer, "text") else ""
    projection = getattr(peer, "text", peer).text_projection
    bias = isinstance(projection, nn.Linear) and projection.bias is not None
    siglip = getattr(peer, "logit_bias", None) is not None
    model = CLIP(peer.visual.proj.shape[1], vision_encoder=vision, text_encoder=text, text_projection_bias=bias,
                 loss="siglip" if siglip else "clip")
    state = read_state_dict(weights) if weights else peer.state_dict()
    load_peer_state(model, state, _open_clip_rules(text_prefix, bias), _open_clip_transposed(bias),
                    source=weights or type(peer).__name__, allow_missing=allow_missing,
                    allow_unexpected=allow_unexpected)
    return model


def _heads(blocks) -> int:
    return blocks[0].attn.heads


def _check_exportable(model: CLIP, peer: str) -> None:
    """The parts every peer needs: our own ViT and text transformer."""
    if not isinstance(model, CLIP):
        raise TypeError(f"model must be a vlmcore.CLIP, got {type(model).__name__}")
    if not isinstance(model.visual, VisionTransformer):
        raise ValueError(f"export to {peer}: the image tower is {type(model.visual).__name__}, not vlmcore's "
                         "VisionTransformer (an adapter tower is the peer's own model already)")
    if not isinstance(model.text, TextTransformer):
        raise ValueError(f"export to {peer}: the text tower is {type(model.text).__name__}, not a TextTransformer")


def _open_clip_pool(text: TextTransformer) -> dict:
    """open_clip's ``pool_type`` (+ ``eos_id``) pooling where ``text`` does."""
    if text.pool == "last":
        return {"pool_type": "last"}
    if text.eot_token_id is None:
        return {"pool_type": "argmax"}
    return {"pool_type": "eos", "eos_id": text.eot_token_id}


def open_clip_config(model: CLIP) -> dict:
    """The open_clip ``model_cfg`` (as in ``open_clip_config.json``) of a vlmcore CLIP.

    Raises ValueError naming what open_clip's ViT CLIP cannot express (a MAP head, a patch bias,
    different activations in the two towers, a width not divisible into heads ...).
    """
    _check_exportable(model, "open_clip")
    v, t = model.visual, model.text
    problems = []
    if v.pool != "cls" or v.conv1.bias is not None:
        problems.append("the image tower must pool at its CLS token with a bias-free patch embedding")
    if v.act != t.act or v.act not in ("gelu", "quick_gelu"):
        problems.append(f"both towers must use gelu or both quick_gelu (got {v.act!r} and {t.act!r})")
    if not isinstance(model.image_projection, nn.Linear):
        problems.append("the image tower must have a projection")
    if problems:
        raise ValueError("export to open_clip: " + "; ".join(problems))
    vision = dict(image_size=v.image_size, layers=len(v.blocks), width=v.width, patch_size=v.patch_size,
                  head_width=v.width // _heads(v.blocks), mlp_ratio=v.blocks[0].mlp[0].out_features / v.width,
                  no_ln_pre=isinstance(v.ln_pre, nn.Identity), norm_kwargs={"eps": v.norm_eps})
    text = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=_heads(t.blocks),
                layers=len(t.blocks), mlp_ratio=t.blocks[0].mlp[0].out_features / t.width,
                no_causal_mask=not t.causal, proj_bias=model.text_projection.bias is not None,
                pad_id=t.pad_token_id, norm_kwargs={"eps": t.norm_eps}, **_open_clip_pool(t))
    cfg = dict(embed_dim=model.embed_dim, quick_gelu=v.act == "quick_gelu", vision_cfg=vision, text_cfg=text)
    if model.loss == "siglip":
        cfg["init_logit_bias"] = float(model.criterion.logit_bias)
    return cfg


def export_open_clip(model: CLIP, out_dir: str) -> str:
    """Write ``model`` as an open_clip model directory: ``open_clip_config.json`` (``model_cfg``) and
    ``open_clip_model.safetensors`` (open_clip's state dict). ``open_clip.create_model("local-dir:" +
    out_dir)`` and :func:`clip_from_open_clip` read it. Returns ``out_dir``."""
    from safetensors.torch import save_file

    cfg = open_clip_config(model)
    bias = model.text_projection.bias is not None
    state = peer_state_dict(model, _open_clip_rules("", bias), _open_clip_transposed(bias))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, OPEN_CLIP_CONFIG), "w", encoding="utf-8") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {}}, f, indent=2)
    save_file(state, os.path.join(out_dir, OPEN_CLIP_WEIGHTS[0]))
    return out_dir


# --- Hugging Face transformers

def _hf_activation(config) -> str:
    act = _HF_ACT_ALIASES.get(config.hidden_act)
    if act is None:
        raise ValueError(f"{config.model_type}: hidden_act {config.hidden_act!r} has no vlmcore equivalent "
                         f"(supported: {', '.join(sorted(_HF_ACT_ALIASES))})")
    return act


def _hf_vision(vc) -> VisionTransformer:
    """Our ViT shaped like a ``CLIPVisionConfig`` / ``SiglipVisionConfig`` (weights not copied)."""
    siglip = vc.model_type == "siglip_vision_model"
    if siglip and not getattr(vc, "vision_use_head", True):
        raise ValueError("SigLIP vision_use_head=False (no MAP head) does not convert")
    return VisionTransformer(
        vc.image_size, vc.patch_size, vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads,
        mlp_ratio=_mlp_ratio(vc.hidden_size, vc.intermediate_size), channels=vc.num_channels,
        act=_hf_activation(vc), class_token=not siglip, patch_bias=siglip, pre_norm=not siglip,
        pool="map" if siglip else "cls", norm_eps=vc.layer_norm_eps)


def _hf_text(tc) -> TextTransformer:
    """Our text transformer shaped like a ``CLIPTextConfig`` (causal, pooled at the EOS token; eos id 2
    means the largest id, transformers' legacy rule) or a ``SiglipTextConfig`` (bidirectional, last token)."""
    siglip = tc.model_type == "siglip_text_model"
    eot = None if siglip or tc.eos_token_id == 2 else tc.eos_token_id
    return TextTransformer(
        tc.vocab_size, tc.max_position_embeddings, tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads,
        pad_token_id=tc.pad_token_id if tc.pad_token_id is not None else 0, eot_token_id=eot,
        mlp_ratio=_mlp_ratio(tc.hidden_size, tc.intermediate_size), causal=not siglip,
        pool="last" if siglip else "eot", act=_hf_activation(tc), norm_eps=tc.layer_norm_eps)


def clip_from_hf(model_or_dir, *, allow_missing: Sequence[str] = (), allow_unexpected: Sequence[str] = ()) -> CLIP:
    """A :class:`vlmcore.CLIP` with the architecture and weights of a transformers ``CLIPModel`` or
    ``SiglipModel`` (``loss="siglip"``, its MAP head and text head converted too).

    Args:
        model_or_dir: the built model, or a local directory (``config.json`` + weights; nothing is downloaded).
        allow_missing, allow_unexpected: glob patterns of transformers key names (see :func:`load_peer_state`).
    Raises:
        CheckpointKeysError: the weights do not match the config (every key listed).
    """
    if isinstance(model_or_dir, nn.Module):
        config, state, source = model_or_dir.config, model_or_dir.state_dict(), type(model_or_dir).__name__
    elif isinstance(model_or_dir, str) and os.path.isfile(os.path.join(model_or_dir, "config.json")):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_or_dir, local_files_only=True)
        state, source = read_hf_weights(model_or_dir), model_or_dir
    else:
        raise ValueError(f"model_or_dir must be a transformers CLIPModel / SiglipModel or a local directory with "
                         f"config.json, got {model_or_dir!r}")
    if config.model_type not in ("clip", "siglip"):
        raise ValueError(f"{source}: model_type {config.model_type!r} is not supported (clip, siglip)")
    siglip = config.model_type == "siglip"
    vision, text = _hf_vision(config.vision_config), _hf_text(config.text_config)
    embed_dim = config.text_config.projection_size if siglip else config.projection_dim
    model = CLIP(embed_dim, vision_encoder=vision, text_encoder=text, image_projection=not siglip,
                 text_projection_bias=siglip, loss="siglip" if siglip else "clip")
    load_peer_state(model, state, _hf_rules(siglip), source=source, allow_missing=allow_missing,
                    allow_unexpected=allow_unexpected)
    return model


def _hf_tower_config(tower, hidden: int) -> dict:
    """The transformers config keys shared by both towers of both families."""
    return dict(hidden_size=tower.width, intermediate_size=hidden, num_hidden_layers=len(tower.blocks),
                num_attention_heads=_heads(tower.blocks), hidden_act=HF_ACTIVATIONS[tower.act],
                layer_norm_eps=tower.norm_eps)


def hf_config(model: CLIP):
    """The transformers ``CLIPConfig`` or ``SiglipConfig`` of a vlmcore CLIP.

    SigLIP's layout (MAP head, patch bias, no CLS / ``ln_pre`` / image projection, bidirectional text
    pooled at the last token, text head with a bias, sigmoid loss) gives a ``SiglipConfig``; CLIP's
    (CLS pooling, ``ln_pre``, causal text pooled at the EOT token, bias-free projections) a
    ``CLIPConfig``. Anything in between raises ValueError naming the parts that differ.
    """
    _check_exportable(model, "hf")
    v, t = model.visual, model.text
    siglip = v.pool == "map"
    want = dict(class_token=not siglip, patch_bias=siglip, ln_pre=not siglip, image_projection=not siglip,
                causal_text=not siglip, text_pool="last" if siglip else "eot", text_projection_bias=siglip,
                loss="siglip" if siglip else "clip")
    have = dict(class_token=v.class_embedding is not None, patch_bias=v.conv1.bias is not None,
                ln_pre=not isinstance(v.ln_pre, nn.Identity),
                image_projection=isinstance(model.image_projection, nn.Linear),
                causal_text=t.causal, text_pool=t.pool, text_projection_bias=model.text_projection.bias is not None,
                loss=model.loss)
    wrong = [f"{k}={have[k]!r} (needs {want[k]!r})" for k in want if have[k] != want[k]]
    if not siglip and t.eot_token_id == 2:
        wrong.append("eot_token_id=2 (transformers' CLIP reads eos id 2 as 'pool at the largest id')")
    if wrong:
        raise ValueError(f"export to hf: not a {'SigLIP' if siglip else 'CLIP'} layout: {', '.join(wrong)}")
    vision = dict(_hf_tower_config(v, v.blocks[0].mlp[0].out_features), image_size=v.image_size,
                  patch_size=v.patch_size, num_channels=v.channels)
    text = dict(_hf_tower_config(t, t.blocks[0].mlp[0].out_features), vocab_size=t.vocab_size,
                max_position_embeddings=t.context_length, pad_token_id=t.pad_token_id, bos_token_id=None)
    if siglip:
        from transformers import SiglipConfig

        return SiglipConfig(text_config=dict(text, projection_size=model.embed_dim), vision_config=vision)
    from transformers import CLIPConfig

    text["eos_token_id"] = 2 if t.eot_token_id is None else t.eot_token_id
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=model.embed_dim)


def export_hf(model: CLIP, out_dir: str) -> str:
    """Write ``model`` as a transformers model directory (``save_pretrained``: ``config.json`` +
    ``model.safetensors``) that ``CLIPModel`` / ``SiglipModel.from_pretrained`` loads with no missing or
    unexpected key. Returns ``out_dir``."""
    from transformers import CLIPModel, SiglipModel

    config = hf_config(model)
    peer = (SiglipModel if config.model_type == "siglip" else CLIPModel)(config)
    shapes = {k: v.shape for k, v in peer.state_dict().items()}
    peer.load_state_dict(peer_state_dict(model, _hf_rules(config.model_type == "siglip"), peer_shapes=shapes),
                         strict=True)
    peer.save_pretrained(out_dir)
    return out_dir
