"""Rebuild a run's model from its directory, for ``vlmcore-eval`` (entry point ``vlmcore.run_loaders``)
and ``vlmcore-export`` (:func:`build_run_model`).

A run directory holds ``config.json`` (the resolved config) and the files of the task's
:meth:`~vlmcore.train.tasks.base.Task.export` (its trainable parameters by name). The frozen parts
are rebuilt from the config exactly as the run built them on rank 0: same seed, then the task's
``build_model`` (a random-init LM is then the same LM). When the run left a checkpoint, its frozen
fingerprint is checked, so an LM directory changed since training is refused by name. A task whose
exported files hold its whole model rebuilds it from them alone (:meth:`Task.load_exported`: BLIP's
run directory is a BLIP checkpoint), so neither its ``init`` nor its ``out_dir`` is read or written.

Tasks served: those that generate text (``read``: the held-out samples for ``vlmcore-eval run``) and
those with a ``video_eval_encoder(video_decoder)`` (``videos``: the encoded clips for
``vlmcore-eval video-retrieval``, skips counted as :class:`~vlmcore.train.data.eval_counts.EvalTally`
counts them during training); any other task is refused by name.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
from collections.abc import Iterator

import numpy as np
import torch
from vlmcore.train.config import parse_config
from vlmcore.train.data.eval_counts import EvalDataError, EvalTally
from vlmcore.train.data.pipeline import BadSample, collate, expand_shards, read_tar
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.runtime import checkpoint
from vlmcore.train.tasks import get_task
from vlmcore.train.tasks.common import video_decoder
from vlmcore.train.tasks.generation import read_samples

from vlmcore.eval.inputs import EvalInputError
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


def _encoded(shards: list[str], encoder) -> Iterator[dict]:
    """Every usable sample of ``shards`` through ``encoder``, in reading order (a BadSample is skipped;
    the counting encoder has recorded it)."""
    for path in shards:
        for sample in read_tar(path):
            try:
                yield encoder(sample)
            except BadSample:
                continue


def video_batches(task, data: str, num_frames: int, batch_size: int, max_samples: int) -> tuple[list[dict], dict]:
    """``LoadedRun.videos`` of a task with a video eval encoder (contract in :class:`vlmcore.eval.run.LoadedRun`):
    the clips decoded as during training's evaluation (segment centres, the eval transform), counted by an
    :class:`EvalTally`. Shards that are missing or hold no usable clip raise ``EvalInputError("data", ...)``."""
    try:
        shards = expand_shards(data)
    except ValueError as e:
        raise EvalInputError("data", str(e)) from None
    tally = EvalTally()
    encoder = tally.wrap(task.video_eval_encoder(video_decoder(task.cfg, num_frames, train=False)))
    examples = list(itertools.islice(_encoded(shards, encoder), max_samples or None))
    try:
        counts = tally.summary(shards)
    except EvalDataError as e:
        raise EvalInputError("data", str(e)) from None
    return [collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)], counts


def _refuse_reading(task_name: str):
    """``LoadedRun.read`` of a task that does not generate text: it names the task."""
    def read(data: str, kind: str) -> list[dict]:
        raise ValueError(f"task {task_name!r} does not generate text; vlmcore-eval run scores the captioning tasks")
    return read


def load(run_dir: str, device: torch.device) -> LoadedRun:
    """The model of ``run_dir`` (fp32, eval mode, on ``device``) behind the :mod:`vlmcore.eval` interface."""
    cfg = read_run_config(run_dir)
    task_cls = get_task(cfg.task)
    scores_videos = hasattr(task_cls, "video_eval_encoder")
    if not (task_cls.generates or scores_videos):
        raise ValueError(f"task {cfg.task!r} neither generates text (vlmcore-eval run) nor scores videos "
                         "(vlmcore-eval video-retrieval)")
    task, model = build_run_model(run_dir, cfg)
    model = model.to(device).eval()
    vision = getattr(model, "vision_encoder", None) or model.visual_encoder
    videos = functools.partial(video_batches, task) if scores_videos else None
    if not task_cls.generates:
        return LoadedRun(model=model, read=_refuse_reading(cfg.task), vision=vision, videos=videos)
    images = task.eval_images()
    return LoadedRun(model=task.eval_model(model), read=lambda data, kind: read_samples(data, kind, images),
                     vision=vision, videos=videos)
