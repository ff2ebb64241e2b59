"""One report of the keys a checkpoint lacks, has in excess or holds in another shape, shared by the
conversions of every family.

A conversion maps the peer's names to ours, then calls :func:`check_keys` once with everything it
found wrong, so a bad checkpoint is refused with every offending key named in one message instead
of the first one only. Keys a conversion legitimately ignores (frozen parts that come from another
config section, duplicates of a registered module) never reach the report: each conversion lists
them in its own documented allow-list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch


class CheckpointKeysError(ValueError):
    """A checkpoint does not fit the model: :attr:`missing` / :attr:`unexpected` hold the keys,
    :attr:`mismatched` the ``"key: checkpoint shape vs ours"`` lines."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str] = ()):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, list(mismatched)


def check_keys(source: str, missing: Iterable[str], unexpected: Iterable[str], mismatched: Iterable[str] = (), *,
               hint: str = "", limit: int = 12) -> None:
    """Raise :class:`CheckpointKeysError` naming the ``missing``, ``unexpected`` and ``mismatched`` keys
    (up to ``limit`` of each, with their counts); nothing when all are empty.

    Args:
        source: what was read (``"model.flamingo.init /path/checkpoint.pt"``), the message's subject.
        missing: our parameter names the checkpoint gives no value.
        unexpected: checkpoint keys that map to nothing and are on no allow-list.
        mismatched: ``"key: checkpoint shape vs ours"`` lines of keys whose tensor has another shape.
        hint: a sentence appended in parentheses (how to let keys through, the likely cause).
    """
    missing, unexpected, mismatched = sorted(missing), sorted(unexpected), sorted(mismatched)
    if not missing and not unexpected and not mismatched:
        return
    parts = [f"{what} {len(keys)} keys: {', '.join(keys[:limit])}{' ...' if len(keys) > limit else ''}"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched))
             if keys]
    message = f"{source} does not fit the model: " + "; ".join(parts) + (f" ({hint})" if hint else "")
    raise CheckpointKeysError(message, missing, unexpected, mismatched)



def read_hf_weights(path: str, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a transformers ``save_pretrained`` directory: ``model.safetensors``, the shards its
    ``model.safetensors.index.json`` lists, or else ``pytorch_model.bin`` (read with ``weights_only``);
    keys starting with one of ``skip`` are never read (e.g. an LM the caller does not use)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        return {key: value for key, value in state.items() if not key.startswith(skip)}
    else:
        raise ValueError(f"{path!r} holds no model.safetensors(.index.json) or pytorch_model.bin "
                         "(write it with save_pretrained)")
    state = {}
    for file in files:
        with safe_open(os.path.join(path, file), framework="pt") as f:
            state.update({key: f.get_tensor(key) for key in f.keys() if not key.startswith(skip)})
    return state
