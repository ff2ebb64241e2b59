"""Rebuild a run's model from its directory, for ``vlmcore-eval run`` (entry point ``vlmcore.run_loaders``).

A run directory holds ``config.json`` (the resolved config) and the files of the task's
:meth:`~vlmcore.train.tasks.base.Task.export` (its trainable parameters by name). The frozen parts
are rebuilt from the config exactly as the run built them on rank 0: same seed, then the task's
``build_model`` (a random-init LM is then the same LM). When the run left a checkpoint, its frozen
fingerprint is checked, so an LM directory changed since training is refused by name. A task whose
exported files hold its whole model rebuilds it from them alone (:meth:`Task.load_exported`: BLIP's
run directory is a BLIP checkpoint), so neither its ``init`` nor its ``out_dir`` is read or written.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch
from vlmcore.train.config import parse_config
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.runtime import checkpoint
from vlmcore.train.tasks import get_task
from vlmcore.train.tasks.generation import read_samples

from vlmcore.eval.run import LoadedRun


def _load_exports(task, model: torch.nn.Module, run_dir: str) -> None:
    """Copy every exported file of the run into ``model`` (keys prefixed back); all must be there."""
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    for filename, (names, prefix) in task.export(model).items():
        path = os.path.join(run_dir, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the run did not finish its export")
        saved = load_file(path)
        missing = [n for n in names if n.removeprefix(prefix) not in saved]
        if missing:
            raise ValueError(f"{path} lacks {len(missing)} parameters of the model, e.g. {missing[:4]}")
        with torch.no_grad():
            for name in names:
                params[name].copy_(saved[name.removeprefix(prefix)].reshape(params[name].shape))


def _check_frozen(model: torch.nn.Module, cfg, run_dir: str) -> None:
    """Compare the rebuilt frozen parameters with the fingerprint of the run's latest checkpoint."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    tag = checkpoint.read_latest(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    if tag is None or not os.path.isfile(os.path.join(ckpt_dir, tag, checkpoint.FINGERPRINT)):
        return
    with open(os.path.join(ckpt_dir, tag, checkpoint.FINGERPRINT), encoding="utf-8") as f:
        saved = json.load(f)
    now = checkpoint.frozen_fingerprint(model, saved["sources"])
    differences = checkpoint.fingerprint_differences(saved, now)
    if differences:
        raise checkpoint.FrozenModelMismatchError(
            f"the frozen parameters rebuilt from {run_dir}/config.json are not those the run trained with: "
            + "; ".join(differences))


def read_run_config(run_dir: str):
    """The parsed ``config.json`` of ``run_dir`` (a ``TrainConfig``)."""
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        return parse_config(json.load(f), source=os.path.join(run_dir, "config.json"))


def build_run_model(run_dir: str, cfg=None):
    """``(task, model)`` of ``run_dir``: the model rebuilt in fp32 (on CPU) with the run's trained
    weights (frozen parts rebuilt as the run built them, then checked; see the module doc).
    ``cfg``: the run's parsed config when the caller has read it already (:func:`read_run_config`)."""
    cfg = read_run_config(run_dir) if cfg is None else cfg
    task_cls = get_task(cfg.task)
    tok = Tokenizer(cfg.tokenizer.path, cfg.tokenizer.context_length, kind=cfg.tokenizer.type,
                    media_tokens=task_cls.media_tokens)
    # The run seeded rank 0 with cfg.seed before building: a random-init frozen LM comes out the same.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    task = task_cls(cfg, tok)
    model = task.load_exported(run_dir)
    if model is None:
        model = task.build_model(torch.float32)
        _check_frozen(model, cfg, run_dir)
        _load_exports(task, model, run_dir)
    return task, model


def load(run_dir: str, device: torch.device) -> LoadedRun:
    """The model of ``run_dir`` (fp32, eval mode, on ``device``) behind the :mod:`vlmcore.eval` interface."""
    cfg = read_run_config(run_dir)
    if not get_task(cfg.task).generates:
        raise ValueError(f"task {cfg.task!r} does not generate text; vlmcore-eval run scores the captioning tasks")
    task, model = build_run_model(run_dir, cfg)
    model = model.to(device).eval()
    images = task.eval_images()
    vision = getattr(model, "vision_encoder", None) or model.visual_encoder
    return LoadedRun(model=task.eval_model(model), read=lambda data, kind: read_samples(data, kind, images),
                     vision=vision)
