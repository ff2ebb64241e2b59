"""DeepSpeed checkpoints with an atomic ``latest``, per-rank trainer state, keep-last-K, safetensors.

Layout of ``<out_dir>/checkpoints``::

    step_00000040/          DeepSpeed's files: the *trainable* parameters, optimizer and scheduler states
        trainer_rank00000.pt   this rank's step, data position, RNG states, counters
        trainer_rank00001.pt
        frozen.json            fingerprint of the frozen parameters (see :func:`frozen_fingerprint`)
        complete               written once every rank has finished
    latest                  the tag of the newest *complete* checkpoint

The frozen parameters (a frozen LM, a frozen vision tower) are not saved
(``exclude_frozen_parameters=True``; a 7B LM would be ~14 GB per checkpoint): a resumed run rebuilds
them from the config, and :func:`load` refuses to resume when their fingerprint differs from the
one saved with the checkpoint.

``latest`` is written last (to a temporary file, then renamed) after every rank has finished
writing, so a crash mid-save leaves the previous checkpoint as ``latest``. Its format is
DeepSpeed's own (``engine.load_checkpoint(dir)`` reads it too).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil

import numpy as np
import torch
from vlmcore.train.runtime import distributed

TAG_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "complete"  # marker written by rank 0 once every rank has saved
FINGERPRINT = "frozen.json"


class FrozenModelMismatchError(ValueError):
    """The frozen parameters rebuilt from the config are not those the checkpoint was trained with."""


def _tensor_id(name: str, p: torch.Tensor) -> dict:
    data = p.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(data.view(torch.uint8).numpy()).hexdigest()
    return {"name": name, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."), "sha256": digest}


def frozen_fingerprint(module: torch.nn.Module, sources: dict[str, str]) -> dict:
    """What identifies the frozen parameters of ``module`` (call before DeepSpeed partitions them):
    ``sources`` (e.g. ``{"model.lm.path": ...}``), their number, total size, and the name, shape,
    dtype and SHA-256 of the first and the last frozen tensor."""
    frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
    out = {"sources": dict(sources), "tensors": len(frozen), "numel": sum(p.numel() for _, p in frozen),
           "bytes": sum(p.numel() * p.element_size() for _, p in frozen)}
    if frozen:
        out["first"], out["last"] = _tensor_id(*frozen[0]), _tensor_id(*frozen[-1])
    return out


def fingerprint_differences(saved: dict, now: dict) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    out = []
    for key in sorted(set(saved["sources"]) | set(now["sources"])):
        a, b = saved["sources"].get(key, ""), now["sources"].get(key, "")
        if a != b:
            out.append(f"{key}: checkpoint {a!r}, now {b!r}")
    for key, what in (("tensors", "frozen tensors"), ("numel", "frozen values"), ("bytes", "frozen bytes")):
        if saved[key] != now[key]:
            out.append(f"{what}: checkpoint {saved[key]}, now {now[key]}")
    for end in ("first", "last"):
        a, b = saved.get(end), now.get(end)
        if a != b:
            diff = [f"{k} {a.get(k)} -> {b.get(k)}" for k in ("name", "shape", "dtype", "sha256")
                    if a.get(k) != b.get(k)] if a and b else [f"{a} -> {b}"]
            out.append(f"{end} frozen tensor {(a or b)['name']!r}: " + ", ".join(diff))
    return out


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_latest(ckpt_dir: str) -> str | None:
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip() or None


def resolve_tag(ckpt_dir: str, resume: str) -> str | None:
    """The tag to resume from: ``latest`` -> the tag in the ``latest`` file (None if there is none)."""
    if resume == "latest":
        return read_latest(ckpt_dir)
    if not os.path.isdir(os.path.join(ckpt_dir, resume)):
        raise ValueError(f"resume: checkpoint {resume!r} not found in {ckpt_dir}")
    return resume


def save(engine, ckpt_dir: str, step: int, trainer_state: dict, keep_last: int, rank: int,
         fingerprint: dict | None = None) -> str:
    """Save on every rank (collective); returns the tag. ``latest`` moves only once all ranks are done.

    Frozen parameters are left out; ``fingerprint`` (:func:`frozen_fingerprint`) is saved to check them on resume.
    """
    tag = tag_for(step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"step": step}, save_latest=False,
                           exclude_frozen_parameters=True)
    path = os.path.join(ckpt_dir, tag, f"trainer_rank{rank:05d}.pt")
    torch.save(trainer_state, path + ".tmp")
    os.replace(path + ".tmp", path)
    if rank == 0 and fingerprint is not None:
        with open(os.path.join(ckpt_dir, tag, FINGERPRINT), "w", encoding="utf-8") as f:
            json.dump(fingerprint, f, indent=1)
    distributed.barrier()
    if rank == 0:
        open(os.path.join(ckpt_dir, tag, COMPLETE), "w").close()
        latest = os.path.join(ckpt_dir, "latest")
        with open(latest + ".tmp", "w", encoding="utf-8") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest + ".tmp", latest)
        prune(ckpt_dir, keep_last)
    distributed.barrier()
    return tag


def prune(ckpt_dir: str, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; delete older ones and incomplete leftovers."""
    tags = sorted(name for name in os.listdir(ckpt_dir) if TAG_RE.match(name))
    complete = [t for t in tags if os.path.isfile(os.path.join(ckpt_dir, t, COMPLETE))]
    keep = set(complete[-keep_last:]) | {read_latest(ckpt_dir)}
    for tag in tags:
        if tag not in keep:
            shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


def check_fingerprint(ckpt_dir: str, tag: str, fingerprint: dict) -> None:
    """Raise :class:`FrozenModelMismatchError` if the checkpoint's frozen-model fingerprint differs."""
    path = os.path.join(ckpt_dir, tag, FINGERPRINT)
    if not os.path.isfile(path):
        if fingerprint["tensors"]:
            raise FrozenModelMismatchError(
                f"checkpoint {tag!r} in {ckpt_dir} has no {FINGERPRINT}: it cannot be checked against the "
                f"{fingerprint['tensors']} frozen tensors rebuilt from the config")
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    differences = fingerprint_differences(saved, fingerprint)
    if differences:
        raise FrozenModelMismatchError(
            f"cannot resume from checkpoint {tag!r} in {ckpt_dir}: the frozen parameters rebuilt from the config "
            "are not those it was trained with (checkpoints hold only the trainable parameters): "
            + "; ".join(differences))


def _load_trainable(src: dict, dst: torch.nn.Module) -> None:
    """DeepSpeed's module load with the frozen parameters absent from ``src``: anything else missing is an error."""
    result = dst.load_state_dict(src, strict=False)
    frozen = {n for n, p in dst.named_parameters() if not p.requires_grad}
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")


def load(engine, ckpt_dir: str, tag: str, rank: int, fingerprint: dict | None = None) -> dict:
    """Restore the trainable parameters, optimizer and scheduler (DeepSpeed) and return this rank's
    trainer state; with ``fingerprint``, first check the frozen parameters (:func:`check_fingerprint`)."""
    path = os.path.join(ckpt_dir, tag, f"trainer_rank{rank:05d}.pt")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {tag!r} has no trainer state for rank {rank} ({path}); "
                         "resume with the same number of ranks")
    if fingerprint is not None:
        check_fingerprint(ckpt_dir, tag, fingerprint)
    load_path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True, load_module_strict=False,
                                          custom_load_fn=_load_trainable)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag!r} from {ckpt_dir}")
    return torch.load(path, weights_only=False)


def export_safetensors(module: torch.nn.Module, names: list[str], path: str, zero_stage: int,
                       strip_prefix: str = "") -> None:
    """Write the named parameters of ``module`` to ``path`` (gathered under ZeRO-3; rank 0 writes),
    keys without ``strip_prefix``."""
    from safetensors.torch import save_file

    params = dict(module.named_parameters())
    selected = [params[n] for n in names]
    if zero_stage == 3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(selected, modifier_rank=None)
    else:
        import contextlib

        ctx = contextlib.nullcontext()
    with ctx:
        if torch.distributed.get_rank() == 0:
            tensors = {n.removeprefix(strip_prefix): p.detach().float().contiguous().cpu().clone()
                       for n, p in zip(names, selected)}
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            save_file(tensors, path + ".tmp")
            os.replace(path + ".tmp", path)
    distributed.barrier()
