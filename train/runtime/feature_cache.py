"""Exact large-batch accumulation for losses of per-row features (``optim.accum_freq``, OpenCLIP's
``--accum-freq``).

A contrastive loss couples every row of its batch: ``optim.accumulation_steps`` gives each micro-batch
only its own negatives, so k micro-batches of b rows are not one batch of k * b. This scheme is
(OpenCLIP, ``open_clip_train/train.py``): for the k micro-batches of one step, on each rank,

1. run each micro-batch's forward under ``no_grad``, its RNG state saved first, and cache its
   features (``[k * b, d]`` per rank once concatenated);
2. for each micro-batch j: restore its RNG state (dropout and any other random op draw what they drew
   in step 1), recompute its features with grad, put them in place of its cached rows, compute the
   loss over all k * b rows (gathered across ranks by the loss as usual) and backward.

Only micro-batch j's rows carry a graph in pass j, so its backward reaches j's activations alone;
over the k passes the tower gradients sum to the gradient of the one k * b batch. The loss's own
parameters (a temperature, SigLIP's bias) enter all k losses: they get a gradient from the first pass
only (OpenCLIP's loop gives them k times theirs). Memory: one micro-batch's activations plus the cache;
cost: one extra forward (no grad) per micro-batch, and the loss computed k times.

The scheme draws from the torch RNGs (CPU, and the device's on CUDA) exactly what k plain forwards
would: it leaves them where step 1 left them, so a resumed run draws the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Features = dict[str, torch.Tensor]
FeaturesFn = Callable[[dict], Features]  # one micro-batch -> {name: [b, ...]}
LossFn = Callable[[Features, bool], tuple[torch.Tensor, dict]]  # ({name: [k*b, ...]}, criterion_grad) -> loss
BackwardFn = Callable[[torch.Tensor, int], None]  # (loss of pass j, j)


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch RNG states a forward on ``device`` draws from: ``(CPU, CUDA or None)``."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    """Restore a :func:`rng_state`."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _rows(features: Features) -> int:
    return next(iter(features.values())).shape[0]


def accumulate(features_fn: FeaturesFn, loss_fn: LossFn, batches: Sequence[dict], backward: BackwardFn,
               device: torch.device) -> tuple[torch.Tensor, dict]:
    """One step of the scheme (module docstring) over the k micro-batches ``batches``.

    Args:
        features_fn: micro-batch -> ``{name: [b_j, ...]}`` (row i from example i), in training mode.
        loss_fn: ``(features, criterion_grad)`` -> ``(loss [], metrics)``: the loss of all rows
            ``{name: [sum_j b_j, ...]}``; ``criterion_grad`` says whether the loss's own parameters get a
            gradient from this pass (True in pass 0 only).
        batches: the k micro-batches of this rank.
        backward: ``(loss, j)`` called once per pass j (k times). The sum of the k gradients of the
            ``loss`` it gets is the gradient of the loss of all rows: the caller scales each as it
            would scale the loss of one batch.
        device: where the forwards run (its RNG is saved and replayed).
    Returns:
        ``(loss, metrics)`` of pass 0 (the loss detached; every pass computes the same value).
    """
    states, parts = [], []
    with torch.no_grad():
        for batch in batches:
            states.append(rng_state(device))
            parts.append(features_fn(batch))
    after = rng_state(device)
    cache = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}  # {name: [k*b, ...]}
    sizes = [_rows(part) for part in parts]
    del parts
    result = None
    start = 0
    for j, batch in enumerate(batches):
        set_rng_state(states[j], device)
        fresh = features_fn(batch)
        end = start + sizes[j]
        merged = {key: torch.cat([cached[:start], fresh[key], cached[end:]]) for key, cached in cache.items()}
        loss, metrics = loss_fn(merged, j == 0)
        backward(loss, j)
        if j == 0:
            result = (loss.detach(), metrics)
        start = end
    set_rng_state(after, device)
    return result


def task_step(task, model, batches: Sequence[dict], device: torch.device, group, backward: BackwardFn
              ) -> tuple[torch.Tensor, dict]:
    """:func:`accumulate` with a ``caches_features`` task's :meth:`~vlmcore.train.tasks.base.Task.features`
    and :meth:`~vlmcore.train.tasks.base.Task.loss_from_features` (``model``: the engine or the module)."""
    return accumulate(
        lambda batch: task.features(model, batch, device),
        lambda features, criterion_grad: task.loss_from_features(model, features, group,
                                                                 criterion_grad=criterion_grad),
        batches, backward, device)
