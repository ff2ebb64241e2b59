"""OpenFlamingo checkpoint conversion for :class:`vlmcore.Flamingo`, both ways, by name.

OpenFlamingo (``open_flamingo.src.flamingo.Flamingo``) names its modules ``vision_encoder`` (open_clip's
``visual``), ``perceiver`` and ``lang_encoder`` (the HF causal LM, extended in place): each decoder
layer of the LM is wrapped in a ``FlamingoLayer`` (``<layers>.{i}.decoder_layer.*``, with the block
of that layer at ``<layers>.{i}.gated_cross_attn_layer.*``), the blocks are also registered as
``lang_encoder.gated_cross_attn_layers.{i}`` (indexed by decoder layer) and the unwrapped layers stay
registered as ``lang_encoder.old_decoder_blocks.{i}``. Its training saves the trainable part only
(``checkpoint.pt``: ``{"model_state_dict": ...}``, keys prefixed ``module.`` under DDP / FSDP).

- :func:`map_openflamingo_keys` (the one home of the key mapping) / :func:`load_openflamingo_state_dict`
  (lenient: returns the keys it did not use) / :func:`load_openflamingo_checkpoint` (strict, the
  config ``init``): such a checkpoint -> our bridge (``perceiver.*``, ``gated_cross_attn_layers.*``;
  the trained ``<image>`` / ``<|endofchunk|>`` rows of the input embedding -> ``new_token_embeddings``
  when we train them).
- :func:`openflamingo_state_dict`: our whole model -> the full state dict OpenFlamingo's model loads
  with ``strict=True``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from vlmcore.checkpoint_keys import check_keys
from vlmcore.flamingo import Flamingo, find_decoder_layers
from vlmcore.vision import OpenCLIPVisionAdapter

#: Checkpoint keys under these prefixes that are not bridge weights are not loaded: the vision tower
#: comes from ``model.vision`` and the LM from ``model.lm`` (OpenFlamingo also saves its trained LM
#: input embeddings there; only the rows of our ``new_token_embeddings`` are read from them).
FROZEN_PREFIXES = ("vision_encoder.", "lang_encoder.")


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys without the ``module.`` prefix DDP / FSDP / DeepSpeed add (when every key has it)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict


def _module_path(root: nn.Module, target: nn.Module, what: str) -> str:
    """The dotted name of ``target`` inside ``root``."""
    for name, module in root.named_modules(remove_duplicate=False):
        if module is target:
            return name
    raise ValueError(f"{what} is not a submodule of {type(root).__name__}")


def _layers_path(lang_model: nn.Module) -> str:
    """The dotted name of the LM's decoder-layer ``ModuleList`` (``model.layers``, ``transformer.h``, ...)."""
    return _module_path(lang_model, find_decoder_layers(lang_model)[2], "the decoder layers")


def _embedding_key(lang_model: nn.Module) -> str:
    """The state-dict key of the LM's input embedding weight (``model.embed_tokens.weight``, ...)."""
    return _module_path(lang_model, lang_model.get_input_embeddings(), "the input embedding") + ".weight"


def map_openflamingo_keys(model: Flamingo, state_dict: dict[str, torch.Tensor]
                          ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``({our bridge name: tensor}, checkpoint keys not used)``.

    ``perceiver.*`` -> ``perceiver.*``; ``[lang_encoder.]gated_cross_attn_layers.{layer}.*`` -> our
    block before that decoder layer; with ``new_token_embeddings``, the ``<image>`` / ``<|endofchunk|>``
    rows of ``lang_encoder.<input embedding>.weight``. Keys with a prefix before ``perceiver.`` or
    ``gated_cross_attn_layers.`` (the duplicate inside each ``FlamingoLayer``) are matched too.
    """
    state_dict = strip_module_prefix(state_dict)
    position = {layer: j for j, layer in enumerate(model.cross_attn_layer_indices)}
    own = model.trainable_state_dict()
    embedding_key = "lang_encoder." + _embedding_key(model.lang_model)
    mapped, unused = {}, []
    for key, value in state_dict.items():
        perceiver = re.match(r"^(?:.*\.)?perceiver\.(.+)$", key)
        block = re.match(r"^(?:.*\.)?gated_cross_attn_layers\.(\d+)\.(.+)$", key)
        name = None
        if perceiver is not None:
            name = f"perceiver.{perceiver.group(1)}"
        elif block is not None and int(block.group(1)) in position:
            name = f"gated_cross_attn_layers.{position[int(block.group(1))]}.{block.group(2)}"
        elif key == embedding_key and model.new_token_embeddings is not None:
            name, value = "new_token_embeddings", value[model.new_token_ids.cpu()]
        if name in own:
            mapped[name] = value
        else:
            unused.append(key)
    return mapped, unused


def load_openflamingo_state_dict(model: Flamingo, state_dict: dict[str, torch.Tensor],
                                 source: str = "OpenFlamingo checkpoint") -> list[str]:
    """Load the resampler and gated cross-attention weights of an OpenFlamingo checkpoint into
    ``model``'s bridge by name (:func:`map_openflamingo_keys`), leaving ``new_token_embeddings`` as they
    are when the checkpoint has no input embedding. One
    :class:`~vlmcore.checkpoint_keys.CheckpointKeysError` names every bridge weight it lacks; a shape
    mismatch raises ``ValueError`` naming the key.

    Returns:
        the checkpoint keys that were not used (LM, vision encoder, duplicates of the blocks).
    """
    mapped, unused = map_openflamingo_keys(model, state_dict)
    missing = [k for k in model.trainable_state_dict() if k not in mapped and k != "new_token_embeddings"]
    check_keys(source, missing, (), hint="the checkpoint lacks bridge weights: a different "
               "cross_attn_every_n_layers or resampler depth?")
    model.load_trainable_state_dict(mapped, strict=False)
    return unused


def load_openflamingo_checkpoint(model: Flamingo, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load an OpenFlamingo ``model_state_dict`` into ``model``'s bridge; one
    :class:`~vlmcore.checkpoint_keys.CheckpointKeysError` names every bridge weight it lacks (the
    trained ``new_token_embeddings`` included) and every key that is neither a bridge weight nor under
    :data:`FROZEN_PREFIXES` (the allow-list). Keys that hold a duplicate of a bridge weight
    (``...gated_cross_attn_layer.*`` inside a decoder layer) are under ``lang_encoder.`` and so allowed.
    A shape mismatch raises ``ValueError`` naming the key."""
    mapped, unused = map_openflamingo_keys(model, state_dict)
    missing = [k for k in model.trainable_state_dict() if k not in mapped]
    unexpected = [k for k in unused if not k.startswith(FROZEN_PREFIXES)]
    check_keys(source, missing, unexpected)
    model.load_trainable_state_dict(mapped, strict=True)


def _vision_state(model: Flamingo) -> dict[str, torch.Tensor]:
    """OpenFlamingo's ``vision_encoder.*``: open_clip's ``visual`` tower, whose tokens feed the resampler."""
    tower = model.vision_encoder
    if not isinstance(tower, OpenCLIPVisionAdapter) or tower.prefix_tokens != "drop":
        raise ValueError("OpenFlamingo's vision encoder is an open_clip tower returning its patch tokens: export "
                         "needs model.vision.type: open_clip with prefix_tokens drop, got "
                         f"{type(tower).__name__}")
    return {f"vision_encoder.{k}": v for k, v in tower.visual.state_dict().items()}


def _lm_embeddings(model: Flamingo, lm_state: dict[str, torch.Tensor]) -> None:
    """Write our trained ``new_token_embeddings`` rows into the LM's input embedding in ``lm_state``."""
    if model.new_token_embeddings is None:
        return
    lm = model.lang_model
    output = lm.get_output_embeddings()
    if output is not None and output.weight is lm.get_input_embeddings().weight:
        raise ValueError("the LM ties its input and output embeddings: OpenFlamingo would change the output rows "
                         "of <image> / <|endofchunk|> too (train with model.flamingo.train_new_token_embeddings: "
                         "false, or an LM with untied embeddings)")
    key = _embedding_key(lm)
    weight = lm_state[key].clone()
    weight[model.new_token_ids.cpu()] = model.new_token_embeddings.detach().to(weight.dtype).cpu()
    lm_state[key] = weight


def openflamingo_state_dict(model: Flamingo) -> dict[str, torch.Tensor]:
    """The full state dict of OpenFlamingo's ``Flamingo`` holding ``model``'s weights (CPU tensors).

    Every parameter of OpenFlamingo's model under each name its ``state_dict`` lists (the decoder
    layers under ``<layers>.{i}.decoder_layer`` and ``old_decoder_blocks.{i}``; the blocks under
    ``gated_cross_attn_layers.{i}`` and ``<layers>.{i}.gated_cross_attn_layer``), so that
    ``load_state_dict(..., strict=True)`` accepts it.
    """
    state = _vision_state(model)
    state.update({f"perceiver.{k}": v for k, v in model.perceiver.state_dict().items()})
    # Our FlamingoLayer wrappers add "decoder_layer." inside the LM's own state dict (Flamingo's hides it).
    lm_state = {re.sub(r"\.decoder_layer\.", ".", k, count=1): v for k, v in model.lang_model.state_dict().items()}
    _lm_embeddings(model, lm_state)
    layers = _layers_path(model.lang_model)
    layer_key = re.compile(rf"^{re.escape(layers)}\.(\d+)\.(.+)$")
    for key, value in lm_state.items():
        inner = layer_key.match(key)
        if inner is None:
            state[f"lang_encoder.{key}"] = value
        else:
            state[f"lang_encoder.{layers}.{inner.group(1)}.decoder_layer.{inner.group(2)}"] = value
            state[f"lang_encoder.old_decoder_blocks.{inner.group(1)}.{inner.group(2)}"] = value
    for j, layer in enumerate(model.cross_attn_layer_indices):
        for key, value in model.gated_cross_attn_layers[j].state_dict().items():
            state[f"lang_encoder.gated_cross_attn_layers.{layer}.{key}"] = value
            state[f"lang_encoder.{layers}.{layer}.gated_cross_attn_layer.{key}"] = value
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}
