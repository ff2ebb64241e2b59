"""The Trainer: DeepSpeed engine set-up and resume, the mixture step, logging, evaluation, checkpoints.

One step = one batch from the training datasets the mixture policy picks (:mod:`~vlmcore.train.runtime.mixture`;
by default every dataset, Flamingo's accumulation over M3W / ALIGN / LTIP / VTP: the loss is
``sum_i weight_i * loss_i``, in one backward or one per dataset), then one optimizer step. The
optimizer sees the trainable parameters only (frozen LM / vision tower excluded).

The step keeps its numbers on the device (:mod:`~vlmcore.train.runtime.stats`) and reads them to the
host once, after every backward is queued: one all-reduce, one ``tolist()``. A non-finite loss (on
any rank) then skips the update on every rank and is counted; ``max_nonfinite_steps`` in a row save a
checkpoint and abort with a :class:`NonFiniteLossError`.

Hooks: ``on_setup(cfg, info)`` callables run after the process group is up and before the inputs are
checked (the demo's data preparation, :mod:`vlmcore.train.tools.demo_inputs`); ``on_step_end(trainer,
step)`` callables run after each step's logging, evaluation and checkpoint (tests inject faults there).
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from vlmcore.train.config import TrainConfig, to_dict
from vlmcore.train.data.pipeline import SKIP_REASONS, DataStream, ShardStream, expand_shards
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.runtime import checkpoint, distributed, feature_cache
from vlmcore.train.runtime.engine import (
    PARAM_DTYPES,
    build_ds_config,
    build_optimizer,
    discard_gradients,
    grad_norm,
    promote_scalar_parameters,
    resolve_precision,
)
from vlmcore.train.runtime.metrics import MetricsLogger, utc_now
from vlmcore.train.runtime.mixture import MixturePolicy
from vlmcore.train.runtime.schedule import lr_lambda, resolve_max_steps
from vlmcore.train.runtime.stats import StepAccumulator, StepStats
from vlmcore.train.tasks import Task, get_task
from vlmcore.train.validate import validate_inputs

SetupHook = Callable[[TrainConfig, distributed.DistInfo], None]
StepEndHook = Callable[["Trainer", int], None]


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite_steps`` consecutive non-finite losses."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def mixture_loss(task: Task, model, batches: list[dict], weights: list[float], device, group=None):
    """``(sum_i w_i * loss_i, [loss_i], [metrics_i])`` over one batch of every dataset (one graph,
    one backward); ``metrics_i`` = the task's extra scalars of batch i."""
    results = [task.loss(model, b, device, group) for b in batches]
    losses = [loss for loss, _ in results]
    total = sum(w * loss for w, loss in zip(weights, losses))
    return total, losses, [metrics for _, metrics in results]


def build_streams(cfg: TrainConfig, task: Task, info: distributed.DistInfo) -> list[DataStream]:
    """One resumable stream of batches per ``data.train`` entry, this rank's share of its shards."""
    out = []
    for i, d in enumerate(cfg.data.train):
        encoder = task.encoder(d.kind, d.num_frames if d.kind == "video" else d.max_images)
        name = d.name or f"{d.kind}{i}"
        dataset = ShardStream(
            expand_shards(d.shards), encoder, d.batch_size, seed=cfg.seed * 1000 + i, rank=info.rank,
            world_size=info.world_size, num_workers=cfg.data.num_workers, shuffle_buffer=d.shuffle_buffer,
            resampled=d.resampled, name=name, max_consecutive_bad=cfg.data.max_consecutive_bad_samples,
            min_image_similarity=d.min_image_similarity)
        out.append(DataStream(name, dataset, cfg.data.num_workers, d.weight))
    return out


class Trainer:
    """One training run: :meth:`__init__` sets it up (or resumes it), :meth:`train` runs it."""

    def __init__(self, cfg: TrainConfig, local_rank: int | None = None, *, on_setup: Sequence[SetupHook] = (),
                 on_step_end: Sequence[StepEndHook] = ()):
        self.info = distributed.init(local_rank, cfg.collective_timeout_s)
        threads, why = distributed.configure_threads()
        self.precision = resolve_precision(cfg, self.info.device)
        self.cfg = cfg = dataclasses.replace(cfg, max_steps=resolve_max_steps(cfg, self.info.world_size))
        seed_everything(cfg.seed + self.info.rank)
        for hook in on_setup:
            hook(cfg, self.info)
        self.on_step_end = list(on_step_end)
        self.task = get_task(cfg.task)(cfg, self._validated_tokenizer())
        self._build_engine()
        self.streams = build_streams(cfg, self.task, self.info)
        self.mixture = MixturePolicy(cfg.optim.mixture, cfg.optim.mixture_backward,
                                     [d.weight for d in cfg.data.train], cfg.seed)  # the same draws on every rank
        self.metric_names: dict[int, list[str]] = {}  # per dataset: the record keys of the task's scalars
        self.ckpt_dir = os.path.join(cfg.out_dir, "checkpoints")
        self.step, self.nonfinite_total, self.streak = 0, 0, 0
        resume_tag, restored_rng, resume_notes = self._resume()
        if self.info.is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
            checkpoint.write_json_atomic(os.path.join(cfg.out_dir, "config.json"), to_dict(cfg))  # never half-written
        self.log = MetricsLogger(cfg.out_dir, self.info.is_main, cfg.max_steps, self.step,
                                 cfg.progress_bar and self.info.is_main,
                                 resume_step=self.step if resume_tag is not None else None)
        self.log.message(f"intra-op threads per rank: {threads} ({why})")
        for note in resume_notes:  # a missing 'latest', a fallback to the previous checkpoint
            self.log.message(note)
        if resume_tag is not None:
            self.log.message(f"resumed from {resume_tag} (step {self.step})")
            checkpoint.set_rng_state(restored_rng)

    def _validated_tokenizer(self) -> Tokenizer:
        """Check every input (``validate.validate_inputs``: one ConfigError for all); the loaded tokenizer."""
        t = self.cfg.tokenizer
        # Only the tasks that place images in the text get <image> / <|endofchunk|>.
        media_tokens = get_task(self.cfg.task).media_tokens
        return validate_inputs(self.cfg, lambda: Tokenizer(t.path, t.context_length, kind=t.type,
                                                           media_tokens=media_tokens))

    def _build_engine(self) -> None:
        """The task's model, the fingerprint of its frozen parameters, the DeepSpeed engine over it."""
        import deepspeed

        cfg, info = self.cfg, self.info
        model = self.task.build_model(PARAM_DTYPES[self.precision])
        promote_scalar_parameters(model)
        # Checkpoints hold no frozen parameter: they are rebuilt from the config, identified by this
        # fingerprint (rank 0's: DeepSpeed broadcasts rank 0's weights, random-init LMs included).
        sources = {"model.lm.path": cfg.model.lm.path if cfg.model.lm is not None else "",
                   "model.vision.init": cfg.model.vision.init if cfg.model.vision.freeze else ""}
        self.fingerprint = distributed.broadcast_object(
            checkpoint.frozen_fingerprint(model, {k: v for k, v in sources.items() if v}) if info.is_main else None)
        ds_config = build_ds_config(cfg, self.precision)
        self.zero_stage = int(ds_config["zero_optimization"].get("stage", 0))
        self.task.prepare_for_engine(model, self.zero_stage)
        optimizer = None if "optimizer" in ds_config else build_optimizer(model, cfg, info.device)
        scheduler = None if "scheduler" in ds_config else (
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=self.trainable,
                                                    optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
                                                    dist_init_required=False)
        self.module = self.engine.module
        self.group = distributed.data_parallel_group()

    def _resume(self) -> tuple[str | None, dict | None, list[str]]:
        """Resolve, verify and load the checkpoint ``resume`` names, if any (weights, optimizer, step,
        counters, data positions; :func:`checkpoint.resume`); returns its tag, its RNG state (set last,
        once nothing else draws) and the notes to log (a missing ``latest``, a fallback)."""
        tag, state, notes = checkpoint.resume(self.engine, self.ckpt_dir, self.cfg.resume, self.info.rank,
                                              self.fingerprint, self.cfg.resume_fallback)
        if tag is None:
            return None, None, notes
        self.step, self.nonfinite_total = state["step"], state["nonfinite_steps"]
        for stream in self.streams:
            stream.load_state_dict(state["data"][stream.name])
        if "mixture" in state:
            self.mixture.load_state_dict(state["mixture"])
        elif self.cfg.optim.mixture == "sample":
            notes.append(f"{tag} holds no mixture state (saved before optim.mixture existed): the sample draws "
                         "start from the seed")
        return tag, state["rng"], notes

    def train(self) -> dict:
        """Run the remaining steps, the final evaluation and the export; returns the last evaluation."""
        last_eval: dict = {}
        self.engine.train()
        while self.step < self.cfg.max_steps:
            self.step += 1
            distributed.report_step(self.step)  # lets a rank that times out name the ranks behind it
            self.train_step(self.step)
            results = self.eval_and_save(self.step)
            if results is not None:
                last_eval = results
            for hook in self.on_step_end:
                hook(self, self.step)
        if self.cfg.data.eval is not None:
            last_eval = self.evaluate(self.step)
        self.export(last_eval)
        self.log.close()
        return last_eval

    def train_step(self, step: int) -> None:
        """One optimizer step: every micro-batch forward and backward, one reduce and host read, then
        the update (or the skip) and the record."""
        started = time.perf_counter()
        lr = self.engine.get_lr()[0]
        visited = self.mixture.visit(step)
        accumulator = StepAccumulator(self.cfg.optim.accumulation_steps, self.info.device)
        for micro in range(self.cfg.optim.accumulation_steps):
            self.forward_backward_step(micro, accumulator, visited)
        stats = self.reduce(accumulator)
        norm = self.apply_or_skip(step, stats)
        self.record(step, stats, lr, time.perf_counter() - started, norm, visited)
        if self.streak >= self.cfg.max_nonfinite_steps:
            self.save(step)
            self.log.close()
            raise NonFiniteLossError(
                f"loss was non-finite for {self.streak} steps in a row (up to step {step}; max_nonfinite_steps="
                f"{self.cfg.max_nonfinite_steps}). Checkpoint {checkpoint.tag_for(step)} saved in {self.ckpt_dir}. "
                "Lower optim.lr, check the data, or raise max_nonfinite_steps.")

    def forward_backward_step(self, micro: int, accumulator: StepAccumulator, visited: list[int]) -> None:
        """Forward and backward of micro-batch ``micro``: one batch of each dataset in ``visited``, in one
        backward or one per dataset (``optim.mixture_backward``); its numbers go to ``accumulator``
        without a host read.

        Backward runs whether the loss is finite or not (knowing would cost a read): a non-finite
        step's gradients are dropped by :meth:`apply_or_skip`. Each backward is one of DeepSpeed's
        micro-steps (``engine.build_ds_config``) and is scaled here by 1 / accumulation_steps, so the
        gradients it sums are those of the joint loss; its ``step()`` after every backward but the
        step's last only advances its count. With ``optim.accum_freq`` > 1 the micro-batch is
        :meth:`cached_features_step`'s instead.
        """
        if self.cfg.optim.accum_freq > 1:  # a single training dataset (checked by the config)
            self.cached_features_step(micro, accumulator)
            return
        accumulation = self.cfg.optim.accumulation_steps
        batches = {i: self._to_pinned(next(self.streams[i])) for i in visited}  # the others keep their position
        groups = self.mixture.backward_groups(visited)
        total, losses, metrics = 0.0, {}, {}
        for g, group in enumerate(groups):
            part, part_losses, part_metrics = mixture_loss(
                self.task, self.engine, [batches[i] for i in group], [self.mixture.loss_weight(i) for i in group],
                self.info.device, self.group)
            self.engine.backward(part / accumulation, scale_wrt_gas=False)
            if micro < accumulation - 1 or g < len(groups) - 1:
                self.engine.step()
            total = total + part.detach()
            losses.update(zip(group, part_losses))
            metrics.update(zip(group, part_metrics))
        several = len(self.streams) > 1
        for i in visited:
            self.metric_names.setdefault(i, [f"{key}/{self.streams[i].name}" if several else key for key in metrics[i]])
        # An unvisited dataset's loss is a placeholder: it is never logged (its read count is a true 0).
        samples = [next(iter(batches[i].values())).shape[0] if i in batches else 0 for i in range(len(self.streams))]
        accumulator.add(micro, total, [losses.get(i, 0.0) for i in range(len(self.streams))],
                        [v for i in visited for v in metrics[i].values()], samples,
                        sum(self.task.batch_tokens(b) for b in batches.values()))

    def cached_features_step(self, micro: int, accumulator: StepAccumulator) -> None:
        """``optim.accum_freq`` = k: k batches of the one training dataset as one exact contrastive batch
        of k x b rows (:mod:`~vlmcore.train.runtime.feature_cache`), k backwards, each a micro-step of
        DeepSpeed's accumulation window (``gradient_accumulation_steps`` x k)."""
        k, window = self.cfg.optim.accum_freq, self.engine.gradient_accumulation_steps()
        weight = self.mixture.loss_weight(0)
        batches = [self._to_pinned(next(self.streams[0])) for _ in range(k)]

        def backward(loss: torch.Tensor, j: int) -> None:
            # DeepSpeed divides every backward by its window; the k passes make up one batch's gradient.
            self.engine.backward(loss * (weight * k))
            if micro * k + j < window - 1:
                self.engine.step()

        loss, metrics = feature_cache.task_step(self.task, self.engine, batches, self.info.device, self.group,
                                                backward)
        self.metric_names.setdefault(0, list(metrics))
        accumulator.add(micro, weight * loss, [loss], list(metrics.values()),
                        [sum(next(iter(b.values())).shape[0] for b in batches)],
                        sum(self.task.batch_tokens(b) for b in batches))

    def _to_pinned(self, batch: dict) -> dict:
        """On CUDA, ``batch``'s tensors in pinned host memory, so the tasks' ``non_blocking`` copies do not wait."""
        if self.info.device.type != "cuda":
            return batch
        return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def reduce(self, accumulator: StepAccumulator) -> StepStats:
        """The step's numbers summed over the ranks (one all-reduce) and read to the host: the step's one
        device-to-host transfer, queued after every backward."""
        skipped = [s.skip_counts.get(reason, 0) for s in self.streams for reason in SKIP_REASONS]
        stats = accumulator.finish(skipped)
        flat = distributed.all_reduce_sum_(stats.to_tensor())
        return StepStats.from_tensor(flat.tolist(), layout=stats)

    def _logs(self, step: int, stats: StepStats) -> bool:
        return step % self.cfg.log_every == 0 or step == self.cfg.max_steps or any(stats.nonfinite)

    def apply_or_skip(self, step: int, stats: StepStats) -> torch.Tensor | float | None:
        """Update if every rank's loss was finite, else drop the gradients: the same on every rank (``stats``
        is reduced). Returns the gradient norm of a logged update (None otherwise; ZeRO-0's is computed
        here, DeepSpeed's ZeRO optimizers compute theirs in ``step()``)."""
        accumulation = self.cfg.optim.accumulation_steps
        window = self.engine.gradient_accumulation_steps()  # backwards per step (engine.build_ds_config)
        if not any(stats.nonfinite):
            self.streak = 0
            logged = self._logs(step, stats)
            norm = grad_norm(self.trainable) if logged and self.zero_stage == 0 else None
            self.engine.step()
            return self.engine.get_global_grad_norm() if logged and norm is None else norm
        if window > 1:
            micro = next(i for i, bad in enumerate(stats.nonfinite) if bad)
            self.log.close()
            raise NonFiniteLossError(
                f"loss was non-finite at step {step}, micro-batch {micro + 1} of {accumulation}: with "
                "optim.accumulation_steps > 1, optim.mixture_backward: per_dataset or optim.accum_freq > 1 a "
                "non-finite micro-batch stops the run (DeepSpeed has counted the step's earlier backwards, so the "
                f"step cannot be skipped). The last checkpoint is in {self.ckpt_dir}. Lower optim.lr or check the "
                "data.")
        discard_gradients(self.engine)
        self.nonfinite_total += 1
        self.streak += 1
        return None

    def record(self, step: int, stats: StepStats, lr: float, elapsed: float,
               norm: torch.Tensor | float | None, visited: list[int]) -> None:
        """Log the step (every ``log_every`` steps, the last one and non-finite ones): means over ranks
        and micro-batches of the losses and scalars, throughput, exact counts. Per-dataset losses and
        scalars of the ``visited`` datasets only (the others were not read this step)."""
        if not self._logs(step, stats):
            return
        finite = not any(stats.nonfinite)
        means = self.info.world_size * self.cfg.optim.accumulation_steps
        record = {
            "step": step,
            "time": utc_now(),
            "loss": stats.loss / means if finite else float("nan"),
            "lr": lr,
            "samples_per_s": sum(stats.samples) / elapsed,
            "tokens_per_s": stats.tokens / elapsed,
            "grad_norm": float(norm) if norm is not None else None,
            "skipped_samples": int(sum(stats.skipped)),
            "nonfinite_steps": self.nonfinite_total,
        }
        record.update({f"samples/{s.name}": int(v) for s, v in zip(self.streams, stats.samples)})
        # Cumulative skipped samples per dataset and reason, summed over ranks (non-zero ones only).
        reasons = len(SKIP_REASONS)
        for i, s in enumerate(self.streams):
            for j, reason in enumerate(SKIP_REASONS):
                if stats.skipped[i * reasons + j]:
                    record[f"skipped/{s.name}/{reason}"] = int(stats.skipped[i * reasons + j])
        if finite and len(self.streams) > 1:
            record.update({f"loss/{self.streams[i].name}": stats.dataset_losses[i] / means for i in visited})
        if finite:  # the task's extra scalars, averaged over ranks (and micro-batches)
            keys = [key for i in visited for key in self.metric_names[i]]
            record.update({key: v / means for key, v in zip(keys, stats.metrics)})
        self.log.log_step(record)

    def eval_and_save(self, step: int) -> dict | None:
        """Evaluate every ``eval_every`` steps (the last one is evaluated by :meth:`train`) and checkpoint
        every ``save_every`` steps and at the end; returns the evaluation if one ran."""
        cfg = self.cfg
        results = None
        if cfg.data.eval is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            results = self.evaluate(step)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
            self.save(step)
        return results

    def evaluate(self, step: int) -> dict:
        results = self.task.run_evaluation(self.module, self.info, self.zero_stage)
        self.log.log_eval(step, results)
        return results

    def save(self, step: int) -> None:
        """A checkpoint of ``step`` on every rank (collective), with this rank's position and counters."""
        state = {"step": step, "nonfinite_steps": self.nonfinite_total, "rng": checkpoint.rng_state(),
                 "data": {s.name: s.state_dict() for s in self.streams}, "mixture": self.mixture.state_dict()}
        checkpoint.save(self.engine, self.ckpt_dir, step, state, self.cfg.keep_last, self.info.rank,
                        self.fingerprint)

    def export(self, last_eval: dict) -> None:
        """The task's weight files (safetensors) and ``eval.json`` in ``out_dir``."""
        for filename, (names, prefix) in self.task.export(self.module).items():
            checkpoint.export_safetensors(self.module, names, os.path.join(self.cfg.out_dir, filename),
                                          self.zero_stage, prefix)
        if self.info.is_main and last_eval:
            checkpoint.write_json_atomic(os.path.join(self.cfg.out_dir, "eval.json"), {"step": self.step, **last_eval})


def train(cfg: TrainConfig, local_rank: int | None = None, *, on_setup: Sequence[SetupHook] = (),
          on_step_end: Sequence[StepEndHook] = ()) -> dict:
    """Run (or resume) a training described by ``cfg``; returns the last evaluation (empty if none).
    A collective that waits more than ``cfg.collective_timeout_s`` stops it with a message naming the
    rank behind."""
    with distributed.timeouts_explained(cfg.collective_timeout_s):
        return Trainer(cfg, local_rank, on_setup=on_setup, on_step_end=on_step_end).train()
