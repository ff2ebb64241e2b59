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
  with no HF place are both refused;
- stage 1, :class:`Blip2Stage1` <-> ``Blip2ForImageTextRetrieval``: :func:`blip2_stage1_from_hf` (also
  from a ``Blip2ForConditionalGeneration`` / ``Blip2Model`` directory, whose stage-1 heads stay at
  their initialization: :data:`STAGE2_DIRECTORY_LACKS`) and :func:`export_hf_blip2_stage1`. HF's
  retrieval model has no ITG head and no temperature (:data:`NOT_IN_HF_RETRIEVAL`).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from vlmcore.blip2.convert import hf_head_key, hf_qformer_key, load_hf_stage2_state_dict
from vlmcore.blip2.qformer import QFormer
from vlmcore.blip2.stage1 import Blip2Stage1
from vlmcore.blip2.stage2 import Blip2LM
from vlmcore.checkpoint_keys import check_keys, read_hf_weights
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


def _hf_vision(model: Blip2LM | Blip2Stage1) -> nn.Module:
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


def _hf_qformer_config(q: QFormer) -> dict:
    """The HF ``Blip2QFormerConfig`` arguments of our Q-Former."""
    layer = q.layers[0]
    return dict(
        hidden_size=q.hidden_size, num_hidden_layers=len(q.layers), num_attention_heads=q.num_heads,
        intermediate_size=layer.ffn_query.fc1.out_features, cross_attention_frequency=q.cross_attention_freq,
        vocab_size=q.vocab_size, max_position_embeddings=q.max_position_embeddings,
        pad_token_id=q.word_embeddings.padding_idx, layer_norm_eps=q.embed_norm.eps,
        hidden_dropout_prob=q.embed_dropout.p, attention_probs_dropout_prob=layer.self_attn.attention_dropout,
        encoder_hidden_size=q.vision_width, hidden_act=HF_QFORMER_ACT)


def hf_blip2_config(model: Blip2LM):
    """The ``Blip2Config`` of ``model``: its vision model's, Q-Former's and LM's configs."""
    from transformers import Blip2Config

    q = model.qformer
    return Blip2Config(vision_config=_hf_vision(model).config.to_dict(), qformer_config=_hf_qformer_config(q),
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


# ---------------------------------------------------------------------------------------------------
# stage 1: Blip2ForImageTextRetrieval
# ---------------------------------------------------------------------------------------------------

#: :class:`Blip2Stage1` parameters HF's ``Blip2ForImageTextRetrieval`` has no key for, never read nor
#: written: the ITG head (HF's retrieval model does not caption; the head's output matrix is the tied
#: Q-Former word embeddings, which are exported) and the ITC temperature (HF's ITC logits are the raw
#: similarities, as :meth:`Blip2Stage1.similarity`).
NOT_IN_HF_RETRIEVAL = ("lm_head_dense.", "lm_head_norm.", "lm_head_bias", "temp")

#: The allow-list of a ``Blip2ForConditionalGeneration`` / ``Blip2Model`` directory: the stage-1
#: parameters it has no weights for, which stay at their initialization (the Q-Former's text
#: embeddings, its text feed-forwards (HF builds them only with ``use_qformer_text_input``), the ITC
#: projections and the ITM head). Its vision model, Q-Former query path and queries load.
STAGE2_DIRECTORY_LACKS = re.compile(
    r"^(qformer\.(word_embeddings|position_embeddings)\.|qformer\.layers\.\d+\.ffn\.|vision_proj\.|text_proj\.|itm_head\.)")

#: Keys of such a directory stage 1 does not use (its LM is never read from the files).
STAGE2_DIRECTORY_ONLY = ("language_model.", "language_projection.")

#: ``config.architectures`` -> whether the directory holds the stage-1 heads.
STAGE1_SOURCES = {"Blip2ForImageTextRetrieval": True, "Blip2ForConditionalGeneration": False, "Blip2Model": False}


def hf_stage1_key(key: str) -> str | None:
    """Our :class:`Blip2Stage1` name of an HF BLIP-2 key (``vision_model.*`` -> the tower's
    ``vision_encoder.model.*``; Q-Former, queries, text embeddings and heads by
    :func:`hf_qformer_key` / :func:`hf_head_key`), or None."""
    if key.startswith("vision_model."):
        return "vision_encoder.model." + key.removeprefix("vision_model.")
    name = hf_qformer_key(key)
    return f"qformer.{name}" if name is not None else hf_head_key(key)


def _has_stage1_heads(config, source: str) -> bool:
    """Whether the BLIP-2 ``config`` is a retrieval model's (heads) or a stage-2 model's; ``ValueError`` else."""
    architectures = getattr(config, "architectures", None) or []
    if config.model_type != "blip-2" or len(architectures) != 1 or architectures[0] not in STAGE1_SOURCES:
        raise ValueError(f"{source}: a BLIP-2 stage-1 init is a transformers directory of one of "
                         f"{', '.join(STAGE1_SOURCES)}; its config.json says model_type {config.model_type!r}, "
                         f"architectures {architectures}")
    return STAGE1_SOURCES[architectures[0]]


def _hf_retrieval_keys(config) -> dict[str, str]:
    """``{our name: HF key}`` of every weight of a ``Blip2ForImageTextRetrieval`` of ``config`` (built on
    the meta device: names only)."""
    from transformers import Blip2ForImageTextRetrieval

    with torch.device("meta"):
        hf = Blip2ForImageTextRetrieval(config)
    return {hf_stage1_key(key): key for key in hf.state_dict()}


def blip2_stage1_from_hf(path: str, *, source: str, dec_token_id: int, **stage1_kwargs) -> Blip2Stage1:
    """A :class:`Blip2Stage1` (fp32) with the weights of the HF BLIP-2 directory ``path``.

    Its ``config.json`` sets the architecture: the vision model (an HF ``Blip2VisionModel`` in an
    :class:`~vlmcore.vision.HFVisionAdapter` returning every token, as HF feeds the Q-Former), the
    Q-Former, ``embed_dim`` = ``image_text_hidden_size``. A ``Blip2ForImageTextRetrieval`` directory
    gives every weight but the ones in :data:`NOT_IN_HF_RETRIEVAL`; a ``Blip2ForConditionalGeneration``
    / ``Blip2Model`` one leaves :data:`STAGE2_DIRECTORY_LACKS` at their initialization (its LM is not
    read). The keys the directory lacks, the ones that map to nothing and the mis-shaped ones are
    refused in one :class:`~vlmcore.checkpoint_keys.CheckpointKeysError` whose subject is ``source``.
    ``dec_token_id`` and ``stage1_kwargs``: :class:`Blip2Stage1`'s (the tokenizer's ``[DEC]``; the losses).
    """
    from transformers import AutoConfig, Blip2VisionModel

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with_heads = _has_stage1_heads(config, source)
    kwargs = qformer_kwargs_from_hf(config)
    qformer = QFormer(kwargs.pop("vision_width"), **kwargs)
    tower = HFVisionAdapter(Blip2VisionModel(config.vision_config), prefix_tokens="keep")
    model = Blip2Stage1(qformer, tower, embed_dim=config.image_text_hidden_size, dec_token_id=dec_token_id,
                        **stage1_kwargs)
    own = dict(model.named_parameters())
    mapped, unexpected, mismatched = {}, [], []
    for key, value in read_hf_weights(path, skip=("language_model.",)).items():
        name = hf_stage1_key(key)
        if name not in own:
            if with_heads or not key.startswith(STAGE2_DIRECTORY_ONLY):
                unexpected.append(key)
            continue
        if value.shape != own[name].shape:
            mismatched.append(f"{key}: {tuple(value.shape)} vs ours {tuple(own[name].shape)}")
        mapped[name] = value  # a mis-shaped key is there, not missing
    missing = [key for name, key in _hf_retrieval_keys(config).items()
               if name not in mapped and (with_heads or not STAGE2_DIRECTORY_LACKS.match(name))]
    check_keys(source, missing, unexpected, mismatched)
    with torch.no_grad():
        for name, value in mapped.items():
            own[name].copy_(value)
    return model


def hf_blip2_stage1_config(model: Blip2Stage1):
    """The ``Blip2Config`` of ``model`` as a ``Blip2ForImageTextRetrieval`` (text feed-forwards on; no
    ``image_token_index``: HF's forward then takes the caption ids as they are)."""
    from transformers import Blip2Config

    return Blip2Config(vision_config=_hf_vision(model).config.to_dict(),
                       qformer_config={**_hf_qformer_config(model.qformer), "use_qformer_text_input": True},
                       num_query_tokens=model.qformer.num_query_tokens,
                       image_text_hidden_size=model.vision_proj.out_features)


def export_hf_blip2_stage1(model: Blip2Stage1, out_dir: str) -> None:
    """Write ``model`` as an HF ``Blip2ForImageTextRetrieval`` ``save_pretrained`` directory.

    Every key of HF's model gets our tensor (one report of those with none); a trained weight with no
    HF key is refused too, except :data:`NOT_IN_HF_RETRIEVAL` (the ITG head and the temperature, which
    HF's retrieval model does not have). A vision tower that is not an HF ``Blip2VisionModel`` keeping
    every token is refused by name. The caption ids are the run tokenizer's (``[CLS]`` first).
    """
    from transformers import Blip2ForImageTextRetrieval

    hf = Blip2ForImageTextRetrieval(hf_blip2_stage1_config(model)).eval()
    ours = model.state_dict()
    state, used, missing = {}, set(), []
    for key, target in hf.state_dict().items():
        name = hf_stage1_key(key)
        if name not in ours:
            missing.append(key)
            continue
        used.add(name)
        state[key] = ours[name].detach().to(target.dtype)
    lost = [n for n, p in model.named_parameters()
            if p.requires_grad and n not in used and not n.startswith(NOT_IN_HF_RETRIEVAL)]
    check_keys("export to hf", missing, lost, hint="HF keys with no weight of ours / trained weights HF has no key for")
    hf.load_state_dict(state, strict=True)
    hf.save_pretrained(out_dir)
