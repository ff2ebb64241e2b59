"""DeepSpeed checkpoints with an atomic ``latest``, per-rank trainer state, keep-last-K, safetensors.

Layout of ``<out_dir>/checkpoints``::

    step_00000040/          DeepSpeed's files: the *trainable* parameters, optimizer and scheduler states
        trainer_rank00000.safetensors   this rank's step, data position, RNG states, counters
        trainer_rank00001.safetensors   (:mod:`.state_file`: tensors + JSON, no pickle)
        frozen.json            fingerprint of the frozen parameters (see :func:`frozen_fingerprint`)
        complete               written once every rank has finished: the size of every file of the tag
    latest                  the tag of the newest *complete* checkpoint

The frozen parameters (a frozen LM, a frozen vision tower) are not saved
(``exclude_frozen_parameters=True``; a 7B LM would be ~14 GB per checkpoint): a resumed run rebuilds
them from the config, and :func:`load` refuses to resume when their fingerprint differs from the
one saved with the checkpoint.

``latest`` is written last (to a temporary file, then renamed) after every rank has finished
writing, so a crash mid-save leaves the previous checkpoint as ``latest``. Its format is
DeepSpeed's own (``engine.load_checkpoint(dir)`` reads it too).

Our trainer state is never unpickled (a pickle can run code). DeepSpeed's own files
(``*_model_states.pt``, ``*_optim_states.pt``) are pickles that ``engine.load_checkpoint`` loads
with ``weights_only=False``: resume only from checkpoints of a trusted source. Before DeepSpeed
reads anything, :func:`verify` compares the tag's files with the sizes recorded in ``complete``,
so a truncated or deleted file is reported by tag and file name, with the previous complete tag.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch
from vlmcore.train.runtime import distributed, state_file

TAG_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "complete"  # marker written by rank 0 once every rank has saved
FINGERPRINT = "frozen.json"


class FrozenModelMismatchError(ValueError):
    """The frozen parameters rebuilt from the config are not those the checkpoint was trained with."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (missing, incomplete, corrupt, old format); the message
    names the tag and the file, and ``previous`` the newest older complete tag (None if there is none)."""

    previous: str | None = None


class CheckpointSaveError(RuntimeError):
    """A save that failed (e.g. no space left on the device); its partial folder has been removed."""


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


def trainer_state_path(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"trainer_rank{rank:05d}.safetensors")


def all_tags(ckpt_dir: str) -> list[str]:
    """Every ``step_*`` folder of ``ckpt_dir``, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(name for name in os.listdir(ckpt_dir) if TAG_RE.match(name))


def complete_tags(ckpt_dir: str) -> list[str]:
    """The tags whose save finished on every rank (the ``complete`` marker), oldest first."""
    return [t for t in all_tags(ckpt_dir) if os.path.isfile(os.path.join(ckpt_dir, t, COMPLETE))]


def resolve_resume(ckpt_dir: str, resume: str) -> tuple[str | None, str | None]:
    """``(tag to resume from, note for the log)``; ``(None, None)`` when there is nothing to resume.

    ``latest``: the tag in the ``latest`` file; without that file, the newest complete tag (a copied
    run, a deleted file), said in the note. Checkpoint folders of which none is complete are an
    error: starting over would replace the run's ``metrics.jsonl`` and exports.
    """
    if resume != "latest":
        if not os.path.isdir(os.path.join(ckpt_dir, resume)):
            raise ValueError(f"resume: checkpoint {resume!r} not found in {ckpt_dir}")
        return resume, None
    tag = read_latest(ckpt_dir)
    if tag is not None:
        return tag, None
    complete, tags = complete_tags(ckpt_dir), all_tags(ckpt_dir)
    if complete:
        return complete[-1], (f"{ckpt_dir}/latest is missing: resuming from the newest complete checkpoint "
                              f"{complete[-1]}")
    if tags:
        raise CheckpointError(
            f"resume: latest: {ckpt_dir} holds checkpoint folders ({', '.join(tags[-3:])}) but none is complete "
            f"(no '{COMPLETE}' marker: every save was interrupted), so there is nothing to resume. Remove them, "
            "or set resume: null to start the run over (its metrics.jsonl and exports are replaced)")
    return None, None


def resolve_tag(ckpt_dir: str, resume: str) -> str | None:
    """The tag to resume from (:func:`resolve_resume` without its note)."""
    return resolve_resume(ckpt_dir, resume)[0]


def _disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or one it came from) says the device is full. torch's writer reports a
    short write as ``RuntimeError: ... unexpected pos``, without the errno."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(error) or "unexpected pos" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _save_failed(ckpt_dir: str, tag: str, error: BaseException) -> CheckpointSaveError:
    """Remove the partial folder of ``tag`` and the error that says what happened and what still resumes."""
    tag_dir = os.path.join(ckpt_dir, tag)
    if not os.path.isfile(os.path.join(tag_dir, COMPLETE)):
        shutil.rmtree(tag_dir, ignore_errors=True)
    previous = read_latest(ckpt_dir)
    kept = (f"the previous checkpoint {previous} is still resumable" if previous
            else "there is no earlier checkpoint")
    if _disk_full(error):
        free = shutil.disk_usage(ckpt_dir).free if os.path.isdir(ckpt_dir) else 0
        return CheckpointSaveError(
            f"no space left on the device while saving checkpoint {tag} in {ckpt_dir} ({free / 2**20:.1f} MiB "
            f"free; {type(error).__name__}: {error}): the partial folder was removed and {kept}. Free some space "
            "(or lower keep_last) and resume")
    return CheckpointSaveError(f"saving checkpoint {tag} in {ckpt_dir} failed ({type(error).__name__}: {error}): "
                               f"the partial folder was removed and {kept}")


def _write_rank_files(engine, ckpt_dir: str, tag: str, step: int, trainer_state: dict, rank: int,
                      fingerprint: dict | None) -> None:
    """This rank's share of a save: DeepSpeed's files, its trainer state, rank 0 the fingerprint."""
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"step": step}, save_latest=False,
                           exclude_frozen_parameters=True)
    state_file.write(trainer_state, trainer_state_path(ckpt_dir, tag, rank))
    if rank == 0 and fingerprint is not None:
        write_json_atomic(os.path.join(ckpt_dir, tag, FINGERPRINT), fingerprint)


def write_json_atomic(path: str, obj, indent: int = 1) -> None:
    """Write ``obj`` as JSON to a temporary file, then rename it over ``path``: readers see the old
    file or the new one, never half of one."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _mark_complete(ckpt_dir: str, tag: str) -> None:
    """Write the ``complete`` marker: the size of every file of the tag (checked by :func:`verify`)."""
    tag_dir = os.path.join(ckpt_dir, tag)
    sizes = {}
    for folder, _, names in os.walk(tag_dir):
        for name in names:
            path = os.path.join(folder, name)
            sizes[os.path.relpath(path, tag_dir)] = os.path.getsize(path)
    write_json_atomic(os.path.join(tag_dir, COMPLETE), {"files": dict(sorted(sizes.items()))})


def save(engine, ckpt_dir: str, step: int, trainer_state: dict, keep_last: int, rank: int,
         fingerprint: dict | None = None) -> str:
    """Save on every rank (collective); returns the tag. ``latest`` moves only once all ranks are done.

    Frozen parameters are left out; ``fingerprint`` (:func:`frozen_fingerprint`) is saved to check them on resume.
    A failed write (a full disk) removes the partial folder and raises :class:`CheckpointSaveError`.
    """
    tag = tag_for(step)
    try:
        _write_rank_files(engine, ckpt_dir, tag, step, trainer_state, rank, fingerprint)
    except (OSError, RuntimeError) as e:
        raise _save_failed(ckpt_dir, tag, e) from e
    distributed.barrier()
    if rank == 0:
        _mark_complete(ckpt_dir, tag)
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
    tags = all_tags(ckpt_dir)
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


def _size_problems(tag_dir: str) -> list[str]:
    """Files of ``tag_dir`` missing, or of another size than the ``complete`` marker recorded."""
    marker = os.path.join(tag_dir, COMPLETE)
    with open(marker, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():  # a marker of an older version: it recorded no sizes
        return []
    try:
        sizes = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        return [f"its marker {marker} is damaged"]
    out = []
    for name, size in sizes.items():
        path = os.path.join(tag_dir, name)
        if not os.path.isfile(path):
            out.append(f"{path} is missing")
        elif os.path.getsize(path) != size:
            out.append(f"{path} has {os.path.getsize(path)} bytes, {size} were saved (truncated or damaged)")
    return out


def _trainer_state_problems(ckpt_dir: str, tag: str, rank: int, world_size: int) -> list[str]:
    """Why this rank's trainer state of ``tag`` cannot be read (empty when it reads)."""
    tag_dir = os.path.join(ckpt_dir, tag)
    path = trainer_state_path(ckpt_dir, tag, rank)
    if os.path.isfile(path):
        try:
            state_file.read(path)
        except state_file.StateFileError as e:
            return [str(e)]
        return []
    legacy = os.path.join(tag_dir, f"trainer_rank{rank:05d}.pt")
    if os.path.isfile(legacy):
        return [f"{legacy} is a trainer state in the old pickle format, which is never loaded (unpickling a file "
                "can run any code); this checkpoint was written by an older vlmcore: resume it with that version"]
    saved = len([n for n in os.listdir(tag_dir) if re.match(r"^trainer_rank\d{5}\.safetensors$", n)])
    if saved and saved != world_size:
        return [f"it holds the trainer states of {saved} rank(s) and this run has {world_size}: resume with "
                f"{saved} rank(s)"]
    return [f"{path} (the trainer state of rank {rank}) is missing"]


def verify(ckpt_dir: str, tag: str, rank: int, world_size: int) -> list[str]:
    """Why ``tag`` cannot be resumed on this rank, one line per problem naming the file (empty: it can).

    Reads nothing DeepSpeed wrote: the sizes of its files against the ``complete`` marker, and this
    rank's trainer state."""
    tag_dir = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(tag_dir):
        return [f"its folder {tag_dir} does not exist"]
    if not os.path.isfile(os.path.join(tag_dir, COMPLETE)):
        return [f"it is incomplete: {tag_dir} has no '{COMPLETE}' marker (its save was interrupted)"]
    problems = _size_problems(tag_dir)
    return problems + _trainer_state_problems(ckpt_dir, tag, rank, world_size)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _on_any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on some rank (every rank takes the same way out of a damaged checkpoint)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return distributed.all_reduce_sum([float(flag)], device)[0] > 0


def previous_complete(ckpt_dir: str, tag: str, rank: int) -> str | None:
    """The newest complete tag older than ``tag`` that :func:`verify` finds whole (None if none)."""
    older = [t for t in complete_tags(ckpt_dir) if t < tag]
    for candidate in reversed(older):
        if not verify(ckpt_dir, candidate, rank, _world_size()):
            return candidate
    return None


def _unusable(ckpt_dir: str, tag: str, rank: int, why: str) -> CheckpointError:
    previous = previous_complete(ckpt_dir, tag, rank)
    hint = (f" The previous complete checkpoint {previous} is whole: resume from it with resume={previous} (or "
            "set resume_fallback: true to fall back to it automatically)." if previous else
            " There is no earlier complete checkpoint to fall back to.")
    error = CheckpointError(f"cannot resume from checkpoint {tag!r} in {ckpt_dir}: {why}.{hint}")
    error.previous = previous
    return error


def load(engine, ckpt_dir: str, tag: str, rank: int, fingerprint: dict | None = None) -> dict:
    """Restore the trainable parameters, optimizer and scheduler (DeepSpeed) and return this rank's
    trainer state; first :func:`verify` the tag (a :class:`CheckpointError` naming the file and the
    previous complete tag) and, with ``fingerprint``, the frozen parameters (:func:`check_fingerprint`)."""
    problems = verify(ckpt_dir, tag, rank, _world_size())
    if _on_any_rank(bool(problems)):
        raise _unusable(ckpt_dir, tag, rank, "; ".join(problems) or "another rank found it damaged")
    if fingerprint is not None:
        check_fingerprint(ckpt_dir, tag, fingerprint)
    try:
        load_path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True, load_module_strict=False,
                                              custom_load_fn=_load_trainable)
    except (AssertionError, EOFError, OSError, RuntimeError, KeyError, pickle.UnpicklingError) as e:
        raise _unusable(ckpt_dir, tag, rank, f"DeepSpeed could not read its files ({type(e).__name__}: {e})") from e
    if load_path is None:
        raise _unusable(ckpt_dir, tag, rank, "DeepSpeed found no checkpoint in it")
    return state_file.read(trainer_state_path(ckpt_dir, tag, rank))


def resume(engine, ckpt_dir: str, resume: str | None, rank: int, fingerprint: dict | None,
           fallback: bool) -> tuple[str | None, dict | None, list[str]]:
    """``(tag, this rank's trainer state, notes for the log)`` of the checkpoint ``resume`` names
    (:func:`resolve_resume`), loaded into ``engine``; ``(None, None, notes)`` for a fresh start.

    A damaged newest checkpoint is an error naming the tag and the file; with ``fallback`` and
    ``resume="latest"`` the previous complete one is loaded instead, said in the notes."""
    if not resume:
        return None, None, []
    tag, note = resolve_resume(ckpt_dir, resume)
    notes = [note] if note else []
    if tag is None:
        return None, None, notes
    try:
        return tag, load(engine, ckpt_dir, tag, rank, fingerprint), notes
    except CheckpointError as e:
        if not (fallback and resume == "latest" and e.previous):
            raise
        notes.append(f"{e} Falling back to {e.previous} (resume_fallback: true).")
        return e.previous, load(engine, ckpt_dir, e.previous, rank, fingerprint), notes


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
