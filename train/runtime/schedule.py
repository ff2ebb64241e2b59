"""How long a run is and how its learning rate moves: steps from epochs, the lr multiplier per step."""

from __future__ import annotations

import math

from vlmcore.train.config import TrainConfig


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


def samples_per_step(cfg: TrainConfig, world_size: int) -> float:
    """Samples one optimizer step consumes: the batch of the datasets it reads x ranks x accumulation
    steps x accum_freq; one dataset per step (``optim.mixture``): the mean batch (round_robin) or the
    expected one (sample: batches weighted by their draw odds)."""
    o = cfg.optim
    sizes = [d.batch_size for d in cfg.data.train]
    weights = [d.weight for d in cfg.data.train]
    batch = {"accumulate": sum(sizes), "round_robin": sum(sizes) / len(sizes),
             "sample": sum(w * b for w, b in zip(weights, sizes)) / sum(weights)}[o.mixture]
    return batch * world_size * o.accumulation_steps * o.accum_freq


def resolve_max_steps(cfg: TrainConfig, world_size: int) -> int:
    """``max_steps``, or OpenCLIP's ``epochs * ceil(train_num_samples / global batch)`` when given by epochs
    (global batch = :func:`samples_per_step`; OpenCLIP: ``ceil(num_samples / (batch * world))`` batches
    per epoch, ``// accum_freq`` steps)."""
    if cfg.max_steps:
        return cfg.max_steps
    return cfg.epochs * math.ceil(cfg.train_num_samples / samples_per_step(cfg, world_size))
