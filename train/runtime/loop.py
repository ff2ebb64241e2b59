"""The training loop: DeepSpeed engine set-up, the mixture step, logging, evaluation, checkpoints.

One step = one batch from *every* training dataset; the loss is ``sum_i weight_i * loss_i``
(Flamingo's accumulation over M3W / ALIGN / LTIP / VTP: the weighted gradients of all datasets
are summed before the update, not round-robin), then one optimizer step. The optimizer sees the
trainable parameters only (frozen LM / vision tower excluded).

A non-finite loss (on any rank) skips the update and is counted; ``max_nonfinite_steps`` in a row
save a checkpoint and abort with a :class:`NonFiniteLossError`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import time

import numpy as np
import torch
from vlmcore.train.config import TrainConfig, to_dict
from vlmcore.train.data.pipeline import SKIP_REASONS, DataStream, ShardStream, expand_shards
from vlmcore.train.data.tokenizer import Tokenizer, train_word_tokenizer
from vlmcore.train.deepspeed_config import deepspeed_dict
from vlmcore.train.runtime import checkpoint, distributed
from vlmcore.train.runtime.metrics import MetricsLogger, utc_now
from vlmcore.train.tasks import Task, get_task
from vlmcore.train.tools import shapes
from vlmcore.train.validate import validate_inputs


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite_steps`` consecutive non-finite losses."""


def lr_lambda(cfg: TrainConfig):
    """Multiplier of the base lr at scheduler step s (0-based optimizer steps).

    Linear warmup over ``warmup_steps``, then ``optim.schedule``: ``cosine`` (to ``min_lr_ratio``
    at ``max_steps``), ``linear`` (straight line to ``min_lr_ratio``), ``constant``, or
    ``warmup_constant_cooldown`` (constant, then a linear decay to ``min_lr_ratio`` over the last
    ``cooldown_fraction`` of ``max_steps``; the "WSD" schedule).
    """
    o = cfg.optim
    floor = o.min_lr_ratio

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "warmup_constant_cooldown":
            cooldown = max(1, round(o.cooldown_fraction * cfg.max_steps))
            start = max(o.warmup_steps, cfg.max_steps - cooldown)
            if step < start:
                return 1.0
            progress = min(1.0, (step - start + 1) / max(1, cfg.max_steps - start))
            return 1.0 - (1.0 - floor) * progress
        span = max(1, cfg.max_steps - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        if o.schedule == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def samples_per_step(cfg: TrainConfig, world_size: int) -> int:
    """Samples one optimizer step consumes: every dataset's batch x ranks x accumulation steps."""
    return sum(d.batch_size for d in cfg.data.train) * world_size * cfg.optim.accumulation_steps


def resolve_max_steps(cfg: TrainConfig, world_size: int) -> int:
    """``max_steps``, or OpenCLIP's ``epochs * ceil(train_num_samples / global batch)`` when given by epochs
    (global batch = :func:`samples_per_step`; OpenCLIP: ``ceil(num_samples / (batch * world))`` batches
    per epoch, ``// accum_freq`` steps)."""
    if cfg.max_steps:
        return cfg.max_steps
    return cfg.epochs * math.ceil(cfg.train_num_samples / samples_per_step(cfg, world_size))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases, norms, embeddings' 1-D params, scales."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    o = cfg.optim
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=device.type == "cuda")


def promote_scalar_parameters(model: torch.nn.Module) -> list[str]:
    """Reshape 0-dim parameters (CLIP's temperature) to ``[1]``, in place; returns their names.

    DeepSpeed 0.19.8 broadcasts parameters as ``p.data.view(torch.uint8)``, which fails on 0-dim
    tensors. Every vlmcore consumer of such a scalar accepts a one-element tensor.
    """
    names = []
    for name, p in model.named_parameters():
        if p.dim() == 0:
            p.data = p.data.reshape(1)
            names.append(name)
    return names


def build_ds_config(cfg: TrainConfig, precision: str) -> dict:
    ds = deepspeed_dict(cfg)
    ds["train_micro_batch_size_per_gpu"] = cfg.data.train[0].batch_size
    ds["gradient_accumulation_steps"] = cfg.optim.accumulation_steps
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("zero_optimization", {"stage": 0})
    # The trainer's precision decides (auto: bf16 on CUDA, fp32 on CPU), whatever the section says;
    # DeepSpeed reads "bf16" before its old name "bfloat16".
    ds["bf16"] = {**ds.pop("bfloat16", {}), **ds.get("bf16", {}), "enabled": precision == "bf16"}
    # fp16: DeepSpeed's dynamic loss scaling (loss_scale 0) unless the section sets a static scale;
    # its other keys (initial_scale_power, loss_scale_window, hysteresis, min_loss_scale) pass through.
    ds["fp16"] = {"loss_scale": 0, **ds.get("fp16", {}), "enabled": precision == "fp16"}
    if precision != "fp16":
        ds["fp16"] = {"enabled": False}
    return ds


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if cfg.precision in ("bf16", "fp16") and device.type != "cuda":
        raise ValueError(f"precision: {cfg.precision} needs a CUDA device (on CPU, training runs in fp32; "
                         "DeepSpeed's fp16 loss scaling is CUDA-only)")
    return cfg.precision


PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def prepare_inputs(cfg: TrainConfig, info: distributed.DistInfo) -> Tokenizer:
    """Generate the shapes data and train the tokenizer if asked and missing (rank 0), then check every
    input (``validate.validate_inputs``: one ConfigError for all) and return the loaded tokenizer."""
    if info.is_main:
        s = cfg.data.shapes
        if s is not None and not shapes.is_complete(s.dir):
            shapes.make_shapes(s.dir, s.n_train, s.n_eval, s.n_docs, s.image_size, s.shard_size, s.seed)
        t = cfg.tokenizer
        if t.train_from_shapes and not os.path.exists(t.path):
            if s is None:
                raise ValueError("tokenizer.train_from_shapes needs data.shapes")
            train_word_tokenizer(os.path.join(s.dir, "captions.txt"), t.path)
    distributed.barrier()
    # Only the tasks that place images in the text get <image> / <|endofchunk|>.
    media_tokens = get_task(cfg.task).media_tokens
    return validate_inputs(cfg, lambda: Tokenizer(cfg.tokenizer.path, cfg.tokenizer.context_length,
                                                  kind=cfg.tokenizer.type, media_tokens=media_tokens))


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


def _metric_items(streams: list[DataStream], metrics: list[dict]) -> list[tuple[str, float]]:
    """The task's extra scalars as (key, local value); keyed ``name/<dataset>`` when there are several."""
    items = []
    for stream, extra in zip(streams, metrics):
        for key, value in extra.items():
            items.append((f"{key}/{stream.name}" if len(streams) > 1 else key, float(value)))
    return items


def _grad_norm(params: list[torch.Tensor]) -> float:
    """2-norm of the (already all-reduced) gradients of ``params``."""
    squares = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def _streams(cfg: TrainConfig, task: Task, info: distributed.DistInfo) -> list[DataStream]:
    out = []
    for i, d in enumerate(cfg.data.train):
        encoder = task.encoder(d.kind, d.max_images)
        name = d.name or f"{d.kind}{i}"
        dataset = ShardStream(
            expand_shards(d.shards), encoder, d.batch_size, seed=cfg.seed * 1000 + i, rank=info.rank,
            world_size=info.world_size, num_workers=cfg.data.num_workers, shuffle_buffer=d.shuffle_buffer,
            resampled=d.resampled, name=name, max_consecutive_bad=cfg.data.max_consecutive_bad_samples,
            min_image_similarity=d.min_image_similarity)
        out.append(DataStream(name, dataset, cfg.data.num_workers, d.weight))
    return out


def train(cfg: TrainConfig, local_rank: int | None = None) -> dict:
    """Run (or resume) a training described by ``cfg``; returns the last evaluation (empty if none).
    A collective that waits more than ``cfg.collective_timeout_s`` stops it with a message."""
    with distributed.timeouts_explained(cfg.collective_timeout_s):
        return _train(cfg, local_rank)


def _train(cfg: TrainConfig, local_rank: int | None = None) -> dict:
    import deepspeed

    info = distributed.init(local_rank, cfg.collective_timeout_s)
    threads, why = distributed.configure_threads()
    precision = resolve_precision(cfg, info.device)
    cfg = dataclasses.replace(cfg, max_steps=resolve_max_steps(cfg, info.world_size))
    seed_everything(cfg.seed + info.rank)
    tok = prepare_inputs(cfg, info)

    task = get_task(cfg.task)(cfg, tok)
    model = task.build_model(PARAM_DTYPES[precision])
    promote_scalar_parameters(model)
    # Checkpoints hold no frozen parameter: they are rebuilt from the config, identified by this
    # fingerprint (rank 0's: DeepSpeed broadcasts rank 0's weights, random-init LMs included).
    sources = {"model.lm.path": cfg.model.lm.path if cfg.model.lm is not None else "",
               "model.vision.init": cfg.model.vision.init if cfg.model.vision.freeze else ""}
    fingerprint = distributed.broadcast_object(
        checkpoint.frozen_fingerprint(model, {k: v for k, v in sources.items() if v}) if info.is_main else None)
    ds_config = build_ds_config(cfg, precision)
    zero_stage = int(ds_config["zero_optimization"].get("stage", 0))
    task.prepare_for_engine(model, zero_stage)
    optimizer = None if "optimizer" in ds_config else build_optimizer(model, cfg, info.device)
    scheduler = None if "scheduler" in ds_config else (
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config, dist_init_required=False)
    module = engine.module
    group = distributed.data_parallel_group()
    streams = _streams(cfg, task, info)
    weights = [d.weight for d in cfg.data.train]

    ckpt_dir = os.path.join(cfg.out_dir, "checkpoints")
    start_step, nonfinite_total = 0, 0
    # Resolve, verify and load the checkpoint to resume from (None: a fresh start); its notes are logged below.
    resume_tag, state, resume_notes = checkpoint.resume(engine, ckpt_dir, cfg.resume, info.rank, fingerprint,
                                                        cfg.resume_fallback)
    restored_rng = None
    if resume_tag is not None:
        start_step, nonfinite_total = state["step"], state["nonfinite_steps"]
        for stream in streams:
            stream.load_state_dict(state["data"][stream.name])
        restored_rng = state["rng"]
    if info.is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        checkpoint.write_json_atomic(os.path.join(cfg.out_dir, "config.json"), to_dict(cfg))  # never half-written
    log = MetricsLogger(cfg.out_dir, info.is_main, cfg.max_steps, start_step, cfg.progress_bar and info.is_main,
                        resume_step=start_step if resume_tag is not None else None)
    log.message(f"intra-op threads per rank: {threads} ({why})")
    for note in resume_notes:  # a missing 'latest', a fallback to the previous checkpoint
        log.message(note)
    if resume_tag is not None:
        log.message(f"resumed from {resume_tag} (step {start_step})")
    if restored_rng is not None:
        checkpoint.set_rng_state(restored_rng)

    def trainer_state(step: int) -> dict:
        return {"step": step, "nonfinite_steps": nonfinite_total, "rng": checkpoint.rng_state(),
                "data": {s.name: s.state_dict() for s in streams}}

    def save(step: int) -> None:
        checkpoint.save(engine, ckpt_dir, step, trainer_state(step), cfg.keep_last, info.rank, fingerprint)

    def run_eval(step: int) -> dict:
        results = task.run_evaluation(module, info, zero_stage)
        log.log_eval(step, results)
        return results

    last_eval: dict = {}
    streak = 0
    engine.train()
    step = start_step
    accumulation = cfg.optim.accumulation_steps
    while step < cfg.max_steps:
        step += 1
        distributed.report_step(step)  # lets a rank that times out name the ranks behind it
        started = time.perf_counter()
        # One optimizer step = ``accumulation`` micro-batches of every dataset. DeepSpeed scales each
        # backward by 1 / accumulation and updates at the last one (its gradient_accumulation_steps).
        sums = None  # per-rank sums over the micro-batches of the numbers below, reduced once per step
        grad_norm, lr = None, engine.get_lr()[0]
        for micro in range(accumulation):
            batches = [next(s) for s in streams]
            total, losses, metrics = mixture_loss(task, engine, batches, weights, info.device, group)
            finite = bool(torch.isfinite(total.detach()))
            extra = _metric_items(streams, metrics)
            counts = [float(next(iter(b.values())).shape[0]) for b in batches]  # samples per dataset
            values = ([0.0 if finite else 1.0, float(total.detach()) if finite else 0.0,
                       sum(task.batch_tokens(b) for b in batches)] + counts
                      + [float(x.detach()) if finite else 0.0 for x in losses]
                      + [value if finite else 0.0 for _, value in extra])
            if accumulation > 1:  # decide on this micro-batch before its backward (collectives inside)
                (bad,) = distributed.all_reduce_sum([values[0]], info.device)
                if bad:
                    log.close()
                    raise NonFiniteLossError(
                        f"loss was non-finite at step {step}, micro-batch {micro + 1} of {accumulation}: with "
                        "optim.accumulation_steps > 1 a non-finite micro-batch stops the run (its window's other "
                        "gradients are already accumulated, so the step cannot be skipped). The last checkpoint "
                        f"is in {ckpt_dir}. Lower optim.lr or check the data.")
                engine.backward(total)
                if micro == accumulation - 1:
                    local_norm = _grad_norm(trainable) if zero_stage == 0 else None
                engine.step()
            sums = values if sums is None else [a + b for a, b in zip(sums, values)]
        skip_counts = [s.skip_counts.get(reason, 0) for s in streams for reason in SKIP_REASONS]
        reduced = distributed.all_reduce_sum(sums + skip_counts, info.device)
        skipped = reduced[len(sums):]
        n_sets = len(streams)
        bad_ranks = reduced[0]
        if accumulation == 1:
            if bad_ranks == 0:
                engine.backward(total)
                local_norm = _grad_norm(trainable) if zero_stage == 0 else None  # ZeRO-0 reports none
                engine.step()
        if bad_ranks == 0:
            norm = engine.get_global_grad_norm() if local_norm is None else local_norm
            grad_norm = float(norm) if norm is not None else None
            streak = 0
        else:
            nonfinite_total += 1
            streak += 1
        elapsed = time.perf_counter() - started
        world = info.world_size
        means = world * accumulation  # the logged losses / metrics: means over ranks and micro-batches
        dataset_samples = reduced[3:3 + n_sets]
        record = {
            "step": step,
            "time": utc_now(),
            "loss": reduced[1] / means if bad_ranks == 0 else float("nan"),
            "lr": lr,
            "samples_per_s": sum(dataset_samples) / elapsed,
            "tokens_per_s": reduced[2] / elapsed,
            "grad_norm": grad_norm,
            "skipped_samples": int(sum(skipped)),
            "nonfinite_steps": nonfinite_total,
        }
        record.update({f"samples/{s.name}": int(v) for s, v in zip(streams, dataset_samples)})
        # Cumulative skipped samples per dataset and reason, summed over ranks (non-zero ones only).
        for i, s in enumerate(streams):
            for j, reason in enumerate(SKIP_REASONS):
                if skipped[i * len(SKIP_REASONS) + j]:
                    record[f"skipped/{s.name}/{reason}"] = int(skipped[i * len(SKIP_REASONS) + j])
        losses_at = 3 + n_sets
        if n_sets > 1 and bad_ranks == 0:
            record.update({f"loss/{s.name}": v / means for s, v in zip(streams, reduced[losses_at:losses_at + n_sets])})
        if bad_ranks == 0:  # the task's extra scalars, averaged over ranks (and micro-batches)
            record.update({key: v / means for (key, _), v in zip(extra, reduced[losses_at + n_sets:len(sums)])})
        if step % cfg.log_every == 0 or step == cfg.max_steps or bad_ranks:
            log.log_step(record)
        if streak >= cfg.max_nonfinite_steps:
            save(step)
            log.close()
            raise NonFiniteLossError(
                f"loss was non-finite for {streak} steps in a row (up to step {step}; max_nonfinite_steps="
                f"{cfg.max_nonfinite_steps}). Checkpoint {checkpoint.tag_for(step)} saved in {ckpt_dir}. "
                "Lower optim.lr, check the data, or raise max_nonfinite_steps.")
        if cfg.data.eval is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            last_eval = run_eval(step)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
            save(step)
        if cfg.testing.sigkill_at_step and step == cfg.testing.sigkill_at_step and info.is_main:
            os.kill(os.getpid(), signal.SIGKILL)
        if cfg.testing.stall_at_step == step and info.rank == info.world_size - 1:
            time.sleep(3600)  # fault injection: a stalled (alive, silent) rank
    if cfg.data.eval is not None:
        last_eval = run_eval(step)
    for filename, (names, prefix) in task.export(module).items():
        checkpoint.export_safetensors(module, names, os.path.join(cfg.out_dir, filename), zero_stage, prefix)
    if info.is_main and last_eval:
        checkpoint.write_json_atomic(os.path.join(cfg.out_dir, "eval.json"), {"step": step, **last_eval})
    log.close()
    return last_eval
