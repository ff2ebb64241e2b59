"""Checkpoint conversion for :class:`vlmcore.blip.BLIP`: Hugging Face and salesforce/BLIP weights by name.

Functions beside the model, not methods of it (``BLIP.load_*`` delegate here):

- Hugging Face ``transformers``: :func:`load_hf_retrieval_state_dict` (``BlipForImageTextRetrieval``),
  :func:`load_hf_captioning_state_dict` (``BlipForConditionalGeneration``); their parameter names
  are ours but for the prefixes and the decoder's self-attention.
- The original salesforce/BLIP ``.pth`` checkpoints: :func:`load_salesforce_state_dict` (the key
  map: :func:`_salesforce_target`), :func:`read_salesforce_checkpoint`.
- The way back to Hugging Face: :func:`save_hf_blip` writes a ``save_pretrained`` directory of
  ``BlipForImageTextRetrieval`` or ``BlipForConditionalGeneration``, each Hugging Face name filled
  through the same rename the loaders use (:data:`HF_RENAMES`), so the two directions cannot drift.

Missing and unknown names are reported together by :func:`vlmcore.checkpoint_keys.check_keys`
(a ``CheckpointKeysError``, a ``ValueError``); mis-shaped ones raise ``ValueError`` naming them;
nothing loads silently by shape.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from vlmcore.checkpoint_keys import check_keys

# State-dict prefixes of BLIP's momentum encoders and queues: never in a Hugging Face checkpoint nor
# in a save_blip folder; copied from the online encoders instead.
MOMENTUM_STATE = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.", "image_queue",
                  "text_queue", "idx_queue", "queue_ptr")
# The LM head's output matrix: the word embeddings themselves when MEDConfig.tie_word_embeddings.
TIED_LM_WEIGHT = "lm_head.predictions.decoder.weight"


# ----------------------------------------------------------------------------------------------
# shared by both sources
# ----------------------------------------------------------------------------------------------


def _require_blip_vision(model: nn.Module, source: str) -> None:
    """Raise ``ValueError`` unless ``model.visual_encoder`` wraps a transformers ``BlipVisionModel``."""
    own = model.state_dict()
    if not all(k.startswith("visual_encoder.model.") for k in own if k.startswith("visual_encoder.")):
        raise ValueError(f"loading {source} weights needs the visual encoder built by blip_vision_encoder() "
                         "(HFVisionAdapter over BlipVisionModel)")


@torch.no_grad()
def _copy_weights(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy ``{our state-dict name: tensor}`` into the model's parameters and buffers (shapes checked before)."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    for name, value in values.items():
        params[name].copy_(value)


def _untouched(model: nn.Module, loaded: set[str]) -> list[str]:
    """Our state-dict names a checkpoint left as they were: not ``loaded``, not the tied LM weight
    (it is the word embeddings), not momentum state (copied from the online encoders)."""
    tied = {TIED_LM_WEIGHT} if model.config.tie_word_embeddings else set()
    return sorted(k for k in set(model.state_dict()) - loaded - tied if not k.startswith(MOMENTUM_STATE))


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers
# ----------------------------------------------------------------------------------------------


def _rename_retrieval(key: str) -> str | None:
    """Our name of a ``BlipForImageTextRetrieval`` key (None: no counterpart)."""
    for hf, ours in (("vision_model.", "visual_encoder.model."), ("text_encoder.", "text_encoder."),
                     ("vision_proj.", "vision_proj."), ("text_proj.", "text_proj."), ("itm_head.", "itm_head.")):
        if key.startswith(hf):
            return ours + key[len(hf):]
    return None


def _rename_captioning(key: str) -> str | None:
    """Our name of a ``BlipForConditionalGeneration`` key: the decoder's BERT is our shared text
    transformer with its self-attention in ``decoder_attention``; ``cls`` is the LM head."""
    if key.startswith("vision_model."):
        return "visual_encoder.model." + key[len("vision_model."):]
    if key.startswith("text_decoder.bert."):
        return "text_encoder." + key[len("text_decoder.bert."):].replace(".attention.", ".decoder_attention.", 1)
    if key == "text_decoder.cls.predictions.bias":
        return "lm_head.predictions.decoder.bias"
    if key.startswith("text_decoder.cls."):
        return "lm_head." + key[len("text_decoder.cls."):]
    return None


#: Hugging Face architecture -> its key -> our key (None: no counterpart); the loaders and
#: :func:`save_hf_blip` both go through it.
HF_RENAMES = {"BlipForImageTextRetrieval": _rename_retrieval, "BlipForConditionalGeneration": _rename_captioning}
# Hugging Face's tied copies in a BLIP LM head -> the key whose value they hold.
HF_TIED = {"text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
           "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight"}


def load_hf_retrieval_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], *,
                                 source: str = "BlipForImageTextRetrieval") -> list[str]:
    """Load a transformers ``BlipForImageTextRetrieval`` state dict by name.

    Loads the vision model, the text encoder (self-attention = the encoders' ``attention``,
    cross-attention and feed-forward shared with the decoder), ``vision_proj``, ``text_proj``
    and ``itm_head``. Missing and unknown names are reported by ``check_keys`` (``source`` is the
    message's subject); mis-shaped ones raise ``ValueError``. Returns the names of this model's
    parameters the checkpoint does not cover (the decoder's self-attention, the LM head, ``temp``,
    momentum copies).
    """
    def covers(key: str) -> bool:
        if key.startswith("text_encoder."):
            return ".decoder_attention." not in key
        return key.startswith(("visual_encoder.", "vision_proj.", "text_proj.", "itm_head."))

    return _load_renamed(model, state_dict, _rename_retrieval, covers, source)


def load_hf_captioning_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], *,
                                  source: str = "BlipForConditionalGeneration") -> list[str]:
    """Load a transformers ``BlipForConditionalGeneration`` state dict by name.

    ``text_decoder.bert.*`` fills the shared text transformer with its self-attention mapped
    to ``decoder_attention``; ``text_decoder.cls.*`` the LM head. Tied copies (the LM decoder
    weight / bias) must equal their source. Missing and unknown names are reported by
    ``check_keys``. Returns this model's parameters the checkpoint does not cover.
    """
    state_dict = dict(state_dict)
    hf_bias = state_dict.pop("text_decoder.cls.predictions.decoder.bias", None)
    if hf_bias is not None and "text_decoder.cls.predictions.bias" in state_dict and not torch.equal(
            hf_bias, state_dict["text_decoder.cls.predictions.bias"]):
        raise ValueError("text_decoder.cls.predictions.decoder.bias differs from text_decoder.cls.predictions.bias "
                         "(they are one tied parameter in BLIP)")
    if model.config.tie_word_embeddings:
        hf_weight = state_dict.pop("text_decoder.cls.predictions.decoder.weight", None)
        word = state_dict.get("text_decoder.bert.embeddings.word_embeddings.weight")
        if hf_weight is not None and word is not None and not torch.equal(hf_weight, word):
            raise ValueError("text_decoder.cls.predictions.decoder.weight differs from the word embeddings, but "
                             "this model ties them (MEDConfig.tie_word_embeddings=True)")

    def covers(key: str) -> bool:
        if key.startswith("text_encoder."):
            return ".attention." not in key  # the encoders' own self-attention is not in a captioner
        return key.startswith(("visual_encoder.", "lm_head."))

    return _load_renamed(model, state_dict, _rename_captioning, covers, source)


def _load_renamed(model: nn.Module, state_dict, rename, covers, source: str) -> list[str]:
    """Copy ``state_dict`` into ``model`` under ``rename(hf_key)``; ``covers(our_key)`` says which of
    our weights the source must provide. Returns our state-dict names it left untouched."""
    own = model.state_dict()
    _require_blip_vision(model, source)
    targets: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        ours = rename(key)
        if ours is None or ours not in own:
            unknown.append(key)
        elif tuple(own[ours].shape) != tuple(value.shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape "
                             f"{tuple(own[ours].shape)} ({ours})")
        else:
            targets[ours] = value
    expected = {k for k in own if covers(k)}
    if model.config.tie_word_embeddings:
        expected.discard(TIED_LM_WEIGHT)
    check_keys(source, expected - set(targets), unknown)
    _copy_weights(model, targets)
    if model.momentum is not None:
        model.copy_params_to_momentum()
    return _untouched(model, set(targets))


def hf_blip_config(model: nn.Module, *, embed_dim: int | None = None):
    """The transformers ``BlipConfig`` of a BLIP-family model (:class:`BLIP`, :class:`BlipVQA`): its
    ``BlipVisionModel``'s config and a ``BlipTextConfig`` restating its :class:`MEDConfig`
    (``[SEP]`` ends a text, as BLIP's ``eos``; Hugging Face has no ``[ENC]`` id: it is
    ``bos_token_id + 1`` when read back, BLIP's layout). ``embed_dim``: the ITC width
    (``image_text_hidden_size``), when the model has one."""
    from transformers import BlipConfig

    _require_blip_vision(model, "Hugging Face BLIP")
    c = model.config
    text = {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
            "max_position_embeddings": c.max_position_embeddings, "encoder_hidden_size": c.encoder_width,
            "layer_norm_eps": c.layer_norm_eps, "hidden_dropout_prob": c.hidden_dropout_prob,
            "attention_probs_dropout_prob": c.attention_probs_dropout_prob, "pad_token_id": c.pad_token_id,
            "bos_token_id": c.bos_token_id, "sep_token_id": c.sep_token_id, "eos_token_id": c.sep_token_id,
            "tie_word_embeddings": c.tie_word_embeddings}
    extra = {} if embed_dim is None else {"image_text_hidden_size": int(embed_dim)}
    return BlipConfig(text_config=text, vision_config=model.visual_encoder.model.config.to_dict(), **extra)


@torch.no_grad()
def save_hf_blip(model: nn.Module, directory: str, architecture: str, rename=None, config=None) -> None:
    """Write ``model`` as a transformers ``architecture`` (``BlipForImageTextRetrieval``,
    ``BlipForConditionalGeneration``; a ``rename`` of another family, e.g. ``BlipForQuestionAnswering``)
    ``save_pretrained`` directory into ``directory``.

    Every Hugging Face parameter takes the value of our parameter ``rename(key)`` names (default:
    :data:`HF_RENAMES` ``[architecture]``; tied copies read their source), loaded ``strict`` into the
    peer's own model, which then saves itself. A name with no counterpart here is reported by
    ``check_keys``. What the architecture has no place for (e.g. a retrieval model's decoder, the
    learned ITC temperature: Hugging Face's ITC is the plain cosine similarity) is not written.
    """
    import transformers

    rename = rename or HF_RENAMES[architecture]
    config = config or hf_blip_config(model, embed_dim=getattr(model, "embed_dim", None))
    config.architectures = [architecture]
    peer = getattr(transformers, architecture)(config)
    own = model.state_dict()
    tied = dict(HF_TIED) if model.config.tie_word_embeddings else {k: v for k, v in HF_TIED.items() if "bias" in k}
    values, unmapped = {}, []
    for key in peer.state_dict():
        ours = rename(tied.get(key, key))
        if ours is None or ours not in own:
            unmapped.append(key)
        else:
            values[key] = own[ours].detach().to("cpu", torch.float32).clone()
    check_keys(f"exporting to {architecture}", unmapped, [])
    peer.load_state_dict(values, strict=True)
    peer.save_pretrained(directory)


# ----------------------------------------------------------------------------------------------
# salesforce/BLIP
# ----------------------------------------------------------------------------------------------


def load_salesforce_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], *, load_momentum: bool = True,
                               interpolate_pos_embed: bool = False, source: str = "salesforce BLIP") -> list[str]:
    """Load a state dict of the original salesforce/BLIP code (``torch.load(path)["model"]`` of
    ``model_base.pth``, ``model_base_capfilt_large.pth``, ``model_base_retrieval_coco.pth``,
    ``model_base_caption_capfilt_large.pth``, ...) by name.

    What maps where (salesforce -> this model):

    - ``visual_encoder.*`` (timm-0.4 ViT: ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
      ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``) -> the
      ``BlipVisionModel`` in ``visual_encoder.model`` (``embeddings.*``, ``encoder.layers.N.*``,
      ``post_layernorm``). Build the tower with :func:`blip_vision_encoder` and
      ``layer_norm_eps=1e-6`` (BLIP's ViT; another eps raises ``ValueError``).
    - ``text_encoder.*`` (BERT with ``crossattention``) -> ``text_encoder.*`` (same names);
      ``text_decoder.bert.*`` -> ``text_encoder.*`` with the self-attention in
      ``decoder_attention``. In a pre-training checkpoint both are present and the parameters
      BLIP ties (all but the self-attention) must be equal. ``text_decoder.cls.*`` -> ``lm_head``
      (``predictions.bias`` is the decoder bias; ``predictions.decoder.bias`` and, when this model
      ties them, ``predictions.decoder.weight`` must equal their tied source). ``position_ids``
      buffers must be ``arange`` and are dropped.
    - ``vision_proj``, ``text_proj``, ``itm_head``, ``temp`` -> the same names.
    - Momentum copies ``*_m`` -> ours; ``image_queue`` / ``text_queue`` ``[embed_dim, Q]`` ->
      ``[Q, embed_dim]`` (transposed); ``idx_queue`` ``[1, Q]`` -> ``[Q]`` (-100 when the
      checkpoint has queues but no ids: pre-training); ``ptr_queue`` / ``queue_ptr`` ->
      ``queue_ptr``. With ``load_momentum=False`` these entries are skipped. Momentum encoders
      the checkpoint does not provide are copied from the online ones (BLIP's ``copy_params``);
      the momentum text encoder's decoder self-attention (never used) too.

    Every part present must be complete (the vision tower always; the text encoder when any
    ``text_encoder.*`` is given; the decoder when any ``text_decoder.bert.*``; and so on).
    Missing and unknown names are reported by ``check_keys`` (``source``: the message's subject);
    mis-shaped ones raise ``ValueError`` listing them. A ``pos_embed`` of
    another resolution (e.g. a 224 px pre-training checkpoint into a 384 px model) raises,
    unless ``interpolate_pos_embed=True``: then its patch grid is resized bicubically
    (``align_corners=False``) with the CLS position kept, as salesforce's ``load_checkpoint``
    does. Returns this model's parameters the checkpoint does not cover (momentum state excluded).
    """
    _check_salesforce_model(model, state_dict, load_momentum)
    targets, unknown = _salesforce_targets(model, state_dict, load_momentum, interpolate_pos_embed)
    missing = {k for unit in _salesforce_units(model, state_dict, set(targets)) for k in unit if k not in targets}
    check_keys(source, missing, unknown)
    _copy_weights(model, {name: value for name, (value, _) in targets.items()})
    if model.momentum is not None:
        _complete_momentum_state(model, set(targets))
    return _untouched(model, set(targets))


def load_salesforce_checkpoint(model: nn.Module, path: str, **kwargs) -> list[str]:
    """:func:`load_salesforce_state_dict` of :func:`read_salesforce_checkpoint` ``(path)``."""
    return load_salesforce_state_dict(model, read_salesforce_checkpoint(path), **kwargs)


def _check_salesforce_model(model: nn.Module, state_dict: dict[str, torch.Tensor], load_momentum: bool) -> None:
    """Raise ``ValueError`` unless ``model`` can take a salesforce checkpoint: BLIP's ViT (eps 1e-6,
    exact GELU) as a ``BlipVisionModel``, and momentum encoders when momentum entries are to load."""
    _require_blip_vision(model, "salesforce BLIP")
    vision_config = model.visual_encoder.model.config
    if float(vision_config.layer_norm_eps) != 1e-6 or vision_config.hidden_act != "gelu":
        raise ValueError("salesforce BLIP's ViT uses LayerNorm eps 1e-6 and exact GELU; this visual encoder has "
                         f"layer_norm_eps={vision_config.layer_norm_eps}, hidden_act={vision_config.hidden_act!r}: "
                         "build it with blip_vision_encoder(..., layer_norm_eps=1e-6)")
    if load_momentum and model.momentum is None and any(_is_salesforce_momentum(k) for k in state_dict):
        raise ValueError("the checkpoint has momentum encoders / queues but this BLIP has none (momentum=None): "
                         "pass load_momentum=False to skip them")


def _salesforce_targets(model: nn.Module, state_dict: dict[str, torch.Tensor], load_momentum: bool,
                        interpolate_pos_embed: bool) -> tuple[dict[str, tuple[torch.Tensor, str]], list[str]]:
    """``({our name: (value in our layout, salesforce key)}`` for every entry of ``state_dict`` that
    loads, ``[salesforce keys with no counterpart]``). Raises ``ValueError`` on mis-shaped names and
    on tied copies that differ."""
    own = model.state_dict()
    targets: dict[str, tuple[torch.Tensor, str]] = {}
    unknown, mis_shaped, tied_copies = [], [], []
    for key, value in state_dict.items():
        if _skip_salesforce_entry(model, key, value, load_momentum, tied_copies):
            continue
        ours, value = _salesforce_target(key, value)
        if ours is None or ours not in own:
            unknown.append(key)
            continue
        wanted = tuple(own[ours].shape)
        if interpolate_pos_embed and key.endswith("pos_embed") and tuple(value.shape) != wanted:
            value = _resize_pos_embed(key, value, wanted)
        if tuple(value.shape) != wanted:
            mis_shaped.append(f"{key}: checkpoint {tuple(value.shape)} != model {wanted} ({ours})")
        elif ours in targets:
            if not torch.equal(targets[ours][0], value):
                raise ValueError(f"{key} differs from {targets[ours][1]}; both load into {ours}, which this "
                                 "BLIP shares between encoder and decoder (BLIP ties them)")
        else:
            targets[ours] = (value, key)
    if mis_shaped:
        hint = " (pass interpolate_pos_embed=True to resize pos_embed)" if any(
            m.split(":")[0].endswith("pos_embed") for m in mis_shaped) else ""
        raise ValueError(f"{len(mis_shaped)} salesforce BLIP weights have another shape here{hint}: "
                         f"{mis_shaped[:10]}")
    for copy_key, source_key in tied_copies:
        if source_key in state_dict and not torch.equal(state_dict[copy_key], state_dict[source_key]):
            raise ValueError(f"{copy_key} differs from {source_key} (one tied parameter in BLIP)")
    return targets, unknown


def _skip_salesforce_entry(model: nn.Module, key: str, value, load_momentum: bool,
                           tied_copies: list[tuple[str, str]]) -> bool:
    """Whether ``key`` loads nothing: momentum state not asked for, ``arange`` position ids (checked),
    or a tied copy (appended to ``tied_copies`` as ``(copy, source)``, compared once all is read)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state_dict[{key!r}] must be a tensor, got {type(value).__name__}")
    if _is_salesforce_momentum(key) and not load_momentum:
        return True
    if key.endswith("embeddings.position_ids") and key.startswith(("text_encoder", "text_decoder.bert.")):
        if not torch.equal(value.reshape(-1).cpu(), torch.arange(value.numel())):
            raise ValueError(f"{key} is not arange({value.numel()}): this BLIP has no custom position ids")
        return True
    if key == "text_decoder.cls.predictions.decoder.bias":
        tied_copies.append((key, "text_decoder.cls.predictions.bias"))
        return True
    if key == "text_decoder.cls.predictions.decoder.weight" and model.config.tie_word_embeddings:
        tied_copies.append((key, "text_decoder.bert.embeddings.word_embeddings.weight"))
        return True
    return False


@torch.no_grad()
def _complete_momentum_state(model: nn.Module, loaded: set[str]) -> None:
    """After a salesforce load: momentum encoders the checkpoint lacks are copied from the online ones
    (BLIP's ``copy_params``); queues without image ids get -100 ids."""
    if not any(k.startswith(_SALESFORCE_MOMENTUM) for k in loaded):  # same prefixes in both layouts
        model.copy_params_to_momentum()
    else:  # the momentum text encoder's decoder self-attention is never used; keep it a copy
        online = dict(model.text_encoder.named_parameters())
        for name, p_m in model.text_encoder_m.named_parameters():
            if ".decoder_attention." in name:
                p_m.copy_(online[name])
    if "image_queue" in loaded and "idx_queue" not in loaded:
        model.idx_queue.fill_(-100)  # pre-training queues carry no image ids: match nothing


def _salesforce_units(model: nn.Module, state_dict, loaded: set[str]) -> list[list[str]]:
    """Groups of our state-dict names that a salesforce checkpoint provides all or nothing of."""
    own = [k for k in model.state_dict() if k != TIED_LM_WEIGHT
           or not model.config.tie_word_embeddings]

    def under(*prefixes, without=None):
        return [k for k in own if k.startswith(prefixes) and (without is None or without not in k)]

    units = [under("visual_encoder.")]  # always required
    if any(k.startswith("text_encoder.") for k in state_dict):
        units.append(under("text_encoder.", without=".decoder_attention."))
    if any(k.startswith("text_decoder.bert.") for k in state_dict):
        units.append(under("text_encoder.", without=".attention."))
    momentum_units = [under("visual_encoder_m.", "vision_proj_m.", "text_proj_m.") +
                      under("text_encoder_m.", without=".decoder_attention."),
                      [k for k in ("image_queue", "text_queue", "queue_ptr") if k in own]]
    for unit in [under("lm_head."), under("vision_proj."), under("text_proj."), under("itm_head."),
                 *momentum_units]:
        if any(k in loaded for k in unit):
            units.append(unit)
    return units


# -- the salesforce key map ----------------------------------------------------------------------

_SALESFORCE_MOMENTUM = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")
_SALESFORCE_QUEUES = ("image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr")
# timm-0.4 ViT block names (salesforce vit.py) -> transformers BlipEncoderLayer names
_SALESFORCE_VIT_BLOCK = (("norm1.", "layer_norm1."), ("attn.qkv.", "self_attn.qkv."),
                         ("attn.proj.", "self_attn.projection."), ("norm2.", "layer_norm2."), ("mlp.fc1.", "mlp.fc1."),
                         ("mlp.fc2.", "mlp.fc2."))
_SALESFORCE_VIT_TOP = {"patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                       "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                       "cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                       "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}


def _is_salesforce_momentum(key: str) -> bool:
    """Whether salesforce ``key`` is momentum state (a ``*_m`` encoder or a queue)."""
    return key.startswith(_SALESFORCE_MOMENTUM) or key in _SALESFORCE_QUEUES


def _salesforce_vit_name(rest: str) -> str | None:
    """The ``BlipVisionModel`` name of a timm-0.4 ViT name (``rest`` after ``visual_encoder.``), or None."""
    if rest in _SALESFORCE_VIT_TOP:
        return _SALESFORCE_VIT_TOP[rest]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
    if match:
        for salesforce, hf in _SALESFORCE_VIT_BLOCK:
            if match[2].startswith(salesforce):
                return f"encoder.layers.{match[1]}.{hf}{match[2][len(salesforce):]}"
    return None


def _salesforce_target(key: str, value: torch.Tensor) -> tuple[str | None, torch.Tensor]:
    """Our state-dict name for salesforce ``key`` (None: no counterpart) and the value in our layout
    (queues transposed / flattened)."""
    for prefix, ours in (("visual_encoder_m.", "visual_encoder_m.model."),
                         ("visual_encoder.", "visual_encoder.model.")):
        if key.startswith(prefix):
            name = _salesforce_vit_name(key[len(prefix):])
            return (None if name is None else ours + name), value
    if key.startswith("text_decoder.bert."):
        return "text_encoder." + key[len("text_decoder.bert."):].replace(".attention.", ".decoder_attention.", 1), value
    if key == "text_decoder.cls.predictions.bias":
        return "lm_head.predictions.decoder.bias", value
    if key.startswith("text_decoder.cls."):
        return "lm_head." + key[len("text_decoder.cls."):], value
    if key in ("image_queue", "text_queue"):
        return key, (value.T.contiguous() if value.dim() == 2 else value)  # [embed_dim, Q] -> [Q, embed_dim]
    if key == "idx_queue":
        return key, (value.reshape(-1) if value.dim() == 2 and value.shape[0] == 1 else value)  # [1, Q] -> [Q]
    if key in ("ptr_queue", "queue_ptr"):
        return "queue_ptr", value
    if key.startswith(("text_encoder.", "text_encoder_m.", "vision_proj.", "vision_proj_m.", "text_proj.",
                       "text_proj_m.", "itm_head.")) or key == "temp":
        return key, value
    return None, value


def _resize_pos_embed(key: str, pos_embed: torch.Tensor, wanted: tuple[int, ...]) -> torch.Tensor:
    """``[1, 1 + n*n, D]`` -> ``wanted`` ``[1, 1 + m*m, D]``: bicubic resize of the patch grid, CLS kept
    (salesforce ``interpolate_pos_embed``). Non-square grids or another width raise ``ValueError``."""
    if pos_embed.dim() != 3 or len(wanted) != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != wanted[2]:
        raise ValueError(f"{key}: cannot resize {tuple(pos_embed.shape)} to {wanted}")
    old, new = round((pos_embed.shape[1] - 1) ** 0.5), round((wanted[1] - 1) ** 0.5)
    if old * old != pos_embed.shape[1] - 1 or new * new != wanted[1] - 1:
        raise ValueError(f"{key}: cannot resize {tuple(pos_embed.shape)} to {wanted} (not square patch grids)")
    grid = pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def read_salesforce_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a salesforce/BLIP ``.pth``: ``torch.load(path, map_location="cpu",
    weights_only=True)["model"]`` (or the loaded dict itself when it has no ``"model"`` entry)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path!r} does not hold a dict (got {type(checkpoint).__name__})")
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict):
        raise ValueError(f"{path!r}: checkpoint['model'] is a {type(state).__name__}, not a state dict")
    return state
