"""The trainer's own checkpoint state in a file that cannot run code: safetensors + JSON.

A trainer state (step, counters, data positions, RNG states) is a tree of dicts, lists, tuples,
numbers, strings, ``torch.Tensor`` (the torch / CUDA RNG states) and ``numpy.ndarray`` (numpy's
Mersenne-Twister keys). :func:`write` stores the tensors and arrays as safetensors entries and the
rest of the tree as JSON in the file's metadata, with a marker where each tensor, array or tuple
was; :func:`read` rebuilds the same tree. Reading a safetensors file parses a JSON header and
copies bytes: unlike a pickle (``torch.save``), a crafted file cannot execute anything.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

#: The metadata key holding the JSON tree.
TREE_KEY = "trainer_state"


class StateFileError(ValueError):
    """A trainer-state file that cannot be read (truncated, not safetensors, or an unknown layout)."""


def _encode(value, tensors: dict[str, torch.Tensor]):
    """``value`` as JSON-able data; tensors / arrays moved into ``tensors`` under a running name."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"__ndarray__": name}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"trainer state: dict keys must be strings, got {list(value)[:5]}")
        return {k: _encode(v, tensors) for k, v in value.items()}
    if isinstance(value, np.generic):  # numpy scalars (e.g. a position read from an array)
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"trainer state: cannot store a {type(value).__name__} (tensors, arrays, numbers, "
                    "strings, lists, tuples and dicts only)")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return tensors[value["__ndarray__"]].numpy()
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def write(state: dict, path: str) -> None:
    """Write ``state`` to ``path`` (a temporary file, then renamed: a crash leaves no half file)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    # allow_nan=False: a non-finite float would not be valid JSON (there is none in a trainer state).
    tree = json.dumps(_encode(state, tensors), allow_nan=False)
    save_file(tensors, path + ".tmp", metadata={TREE_KEY: tree})
    os.replace(path + ".tmp", path)


def read(path: str) -> dict:
    """The state written by :func:`write`; :class:`StateFileError` (naming ``path``) when it cannot be read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise StateFileError(f"{path}: not a readable trainer state (truncated or damaged?): "
                             f"{type(e).__name__}: {e}") from None
    if TREE_KEY not in metadata:
        raise StateFileError(f"{path}: a safetensors file without the '{TREE_KEY}' metadata (not a trainer state)")
    try:
        return _decode(json.loads(metadata[TREE_KEY]), tensors)
    except (ValueError, KeyError) as e:
        raise StateFileError(f"{path}: damaged trainer state: {type(e).__name__}: {e}") from None
