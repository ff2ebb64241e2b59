"""DeepSpeed checkpoints with an atomic ``latest``, per-rank trainer state, keep-last-K, safetensors.

Layout of ``<out_dir>/checkpoints``::

    step_00000040/          DeepSpeed's files (model, optimizer and scheduler states, per rank)
        trainer_rank00000.pt   this rank's step, data position, RNG states, counters
        trainer_rank00001.pt
        complete               written once every rank has finished
    latest                  the tag of the newest *complete* checkpoint

``latest`` is written last (to a temporary file, then renamed) after every rank has finished
writing, so a crash mid-save leaves the previous checkpoint as ``latest``. Its format is
DeepSpeed's own (``engine.load_checkpoint(dir)`` reads it too).
"""

from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

from . import distributed

TAG_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "complete"  # marker written by rank 0 once every rank has saved


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


def save(engine, ckpt_dir: str, step: int, trainer_state: dict, keep_last: int, rank: int) -> str:
    """Save on every rank (collective); returns the tag. ``latest`` moves only once all ranks are done."""
    tag = tag_for(step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"step": step}, save_latest=False)
    path = os.path.join(ckpt_dir, tag, f"trainer_rank{rank:05d}.pt")
    torch.save(trainer_state, path + ".tmp")
    os.replace(path + ".tmp", path)
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


def load(engine, ckpt_dir: str, tag: str, rank: int) -> dict:
    """Restore model, optimizer and scheduler (DeepSpeed) and return this rank's trainer state."""
    path = os.path.join(ckpt_dir, tag, f"trainer_rank{rank:05d}.pt")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {tag!r} has no trainer state for rank {rank} ({path}); "
                         "resume with the same number of ranks")
    load_path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
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
