"""BLIP-2 whole models from Hugging Face and back: ``Blip2ForConditionalGeneration`` <-> :class:`Blip2LM`.

- :func:`load_hf_blip2`: a local ``save_pretrained`` directory -> HF's model, its key report
  through :func:`~vlmcore.checkpoint_keys.check_keys`; :func:`blip2_lm_from_hf`: that model ->
  our :class:`Blip2LM` (HF's vision model and LM shared, the bridge copied by
  :func:`~vlmcore.blip2.convert.load_hf_stage2_state_dict`);
- :func:`blip2_vision_from_hf`: only the ``Blip2VisionModel`` of such a directory (``model.vision.type: hf``);
- :func:`export_hf_blip2`: a :class:`Blip2LM` -> a directory ``Blip2ForConditionalGeneration.from_pretrained``
  loads with no missing or unexpected key. HF's names are the list of what to write: each HF key
  is mapped to ours (:func:`~vlmcore.blip2.convert.hf_qformer_key`, ``hf_head_key``, the
  ``vision_model.`` / ``language_model.`` prefixes), so a key with no source and a trained weight
  with no HF place are both refused.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from vlmcore.blip2.convert import hf_head_key, hf_qformer_key, load_hf_stage2_state_dict
from vlmcore.blip2.qformer import QFormer
from vlmcore.blip2.stage2 import Blip2LM
from vlmcore.checkpoint_keys import check_keys
from vlmcore.vision import HFVisionAdapter

#: The Q-Former's feed-forward activation (``F.gelu``, the exact erf form): HF ``hidden_act`` ``gelu``.
HF_QFORMER_ACT = "gelu"


def qformer_kwargs_from_hf(config) -> dict:
    """The :class:`~vlmcore.blip2.QFormer` arguments of an HF ``Blip2Config`` (its ``qformer_config``,
    ``num_query_tokens`` and the vision width); ``ValueError`` for a Q-Former ours does not compute."""
    q = config.qformer_config
    if q.hidden_act != HF_QFORMER_ACT or getattr(q, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"HF BLIP-2 Q-Former with hidden_act {q.hidden_act!r} / position_embedding_type "
                         f"{getattr(q, 'position_embedding_type', None)!r}: vlmcore's Q-Former is gelu + absolute")
    return dict(vision_width=config.vision_config.hidden_size, hidden_size=q.hidden_size,
                num_layers=q.num_hidden_layers, num_heads=q.num_attention_heads,
                intermediate_size=q.intermediate_size, num_query_tokens=config.num_query_tokens,
                cross_attention_freq=q.cross_attention_frequency, vocab_size=q.vocab_size,
                max_position_embeddings=q.max_position_embeddings, pad_token_id=q.pad_token_id,
                layer_norm_eps=q.layer_norm_eps, dropout=q.hidden_dropout_prob,
                attention_dropout=q.attention_probs_dropout_prob)


def load_hf_blip2(path: str, *, source: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """HF ``Blip2ForConditionalGeneration`` from the local directory ``path`` (``config.json`` + weights).

    transformers reads the weights (its own names, tied embeddings, dtype); every key it could not
    place, every weight it lacks and every mis-shaped one is refused in one
    :class:`~vlmcore.checkpoint_keys.CheckpointKeysError` whose subject is ``source``.
    """
    from transformers import Blip2ForConditionalGeneration

    model, info = Blip2ForConditionalGeneration.from_pretrained(
        path, local_files_only=True, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
    mismatched = [f"{key}: {tuple(theirs)} vs ours {tuple(ours)}" for key, theirs, ours in info["mismatched_keys"]]
    check_keys(source, info["missing_keys"], info["unexpected_keys"], mismatched)
    return model.eval()


def blip2_vision_from_hf(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The HF ``Blip2VisionModel`` of a BLIP-2 directory (its ``vision_model.*`` weights, one
    :func:`check_keys` report), or of a ``Blip2VisionModel`` directory of its own."""
    from transformers import AutoConfig, Blip2VisionModel

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type == "blip_2_vision_model":
        return Blip2VisionModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    vision = Blip2VisionModel(config.vision_config).to(dtype)
    state = {k.removeprefix("vision_model."): v for k, v in read_hf_weights(path).items()
             if k.startswith("vision_model.")}
    result = vision.load_state_dict(state, strict=False)
    check_keys(f"{path} vision_model", result.missing_keys, result.unexpected_keys)
    return vision


def read_hf_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``save_pretrained`` directory (``model.safetensors``, sharded or not)."""
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{path!r} holds no model.safetensors(.index.json)")
    state = {}
    for file in files:
        state.update(load_file(os.path.join(path, file)))
    return state


def blip2_lm_from_hf(hf: nn.Module, *, lang_model: nn.Module | None = None, image_token_id: int | None = None,
                     vocab_size: int | None = None) -> nn.Module:
    """A :class:`~vlmcore.blip2.Blip2LM` holding the modules and weights of an HF ``Blip2ForConditionalGeneration``.

    The vision model (in an :class:`~vlmcore.vision.HFVisionAdapter` returning every token, as HF
    feeds the Q-Former) and the LM are HF's own modules, shared, not copied; ``lang_model`` replaces
    the LM. The Q-Former, queries and ``language_projection`` are copied by name
    (:func:`load_hf_stage2_state_dict`, strict). ``vocab_size``: of the Q-Former's text embeddings
    (unused in stage 2; default HF's).
    """
    kwargs = qformer_kwargs_from_hf(hf.config)
    kwargs["vocab_size"] = vocab_size or kwargs["vocab_size"]
    qformer = QFormer(kwargs.pop("vision_width"), **kwargs)
    tower = HFVisionAdapter(hf.vision_model, prefix_tokens="keep")
    model = Blip2LM(qformer, hf.language_model if lang_model is None else lang_model, tower,
                    image_token_id=image_token_id)
    bridge = {k: v for k, v in hf.state_dict().items() if not k.startswith(("vision_model.", "language_model."))}
    load_hf_stage2_state_dict(model, bridge, strict=True)
    return model


def _hf_vision(model: Blip2LM) -> nn.Module:
    """The HF ``Blip2VisionModel`` inside ``model``'s tower; ``ValueError`` when HF has no place for the tower."""
    tower = model.vision_encoder
    inner = getattr(tower, "model", None)
    if not isinstance(tower, HFVisionAdapter) or type(inner).__name__ != "Blip2VisionModel":
        raise ValueError(f"export to hf: HF BLIP-2 holds a Blip2VisionModel, this model's vision tower is "
                         f"{type(inner or tower).__name__} (start from a BLIP-2 directory: init, or model.vision "
                         "type hf with a BLIP-2 path)")
    if tower.prefix_tokens != "keep":
        raise ValueError("export to hf: HF BLIP-2 feeds the Q-Former every vision token, CLS included; this tower "
                         "drops it (model.vision.prefix_tokens: keep)")
    return inner


def hf_blip2_config(model: Blip2LM):
    """The ``Blip2Config`` of ``model``: its vision model's, Q-Former's and LM's configs."""
    from transformers import Blip2Config

    q = model.qformer
    layer = q.layers[0]
    qformer_config = dict(
        hidden_size=q.hidden_size, num_hidden_layers=len(q.layers), num_attention_heads=q.num_heads,
        intermediate_size=layer.ffn_query.fc1.out_features, cross_attention_frequency=q.cross_attention_freq,
        vocab_size=q.vocab_size, max_position_embeddings=q.max_position_embeddings,
        pad_token_id=q.word_embeddings.padding_idx, layer_norm_eps=q.embed_norm.eps,
        hidden_dropout_prob=q.embed_dropout.p, attention_probs_dropout_prob=layer.self_attn.attention_dropout,
        encoder_hidden_size=q.vision_width, hidden_act=HF_QFORMER_ACT)
    return Blip2Config(vision_config=_hf_vision(model).config.to_dict(), qformer_config=qformer_config,
                       text_config=model.lang_model.config.to_dict(), num_query_tokens=q.num_query_tokens,
                       image_token_index=model.image_token_id)


def _source_tensor(key: str, ours: dict, vision: dict, lm: dict) -> tuple[str, torch.Tensor] | None:
    """``(our name, tensor)`` that HF's ``key`` holds, or None."""
    for prefix, state in (("vision_model.", vision), ("language_model.", lm)):
        if key.startswith(prefix):
            name = key.removeprefix(prefix)
            return (f"{prefix}{name}", state[name]) if name in state else None
    name = hf_qformer_key(key)
    name = f"qformer.{name}" if name is not None else hf_head_key(key)
    return (name, ours[name]) if name in ours else None


def export_hf_blip2(model: Blip2LM, out_dir: str) -> None:
    """Write ``model`` as an HF ``Blip2ForConditionalGeneration`` ``save_pretrained`` directory.

    Every key of HF's model gets our tensor (one report of those with none); a trained weight of
    ours that HF has no key for (the ITG / text parts never train in stage 2) is refused too.
    ``image_token_index`` is ``model.image_token_id`` (HF fills its placeholders with the queries).
    """
    from transformers import Blip2ForConditionalGeneration

    config = hf_blip2_config(model)
    hf = Blip2ForConditionalGeneration(config).eval()
    ours = {k: v for k, v in model.state_dict().items() if k.startswith(("qformer.", "language_projection."))}
    vision, lm = _hf_vision(model).state_dict(), model.lang_model.state_dict()
    state, used, missing = {}, set(), []
    for key, target in hf.state_dict().items():
        found = _source_tensor(key, ours, vision, lm)
        if found is None:
            missing.append(key)
            continue
        used.add(found[0])
        state[key] = found[1].detach().to(target.dtype)
    lost = [n for n, p in model.named_parameters() if p.requires_grad and n not in used]
    check_keys("export to hf", missing, lost, hint="HF keys with no weight of ours / trained weights HF has no key for")
    hf.load_state_dict(state, strict=True)
    hf.save_pretrained(out_dir)
