"""Which samples a few-shot evaluation scores, and which demonstrations each query gets.

OpenFlamingo's protocol (``eval/utils.py``), reproduced draw for draw so that a trial with the same
seed picks the same samples and demos:

1. ``np.random.seed(seed)``; the evaluated subset = ``choice(len(eval set), num_samples, replace=False)``;
2. the *query set* (the pool random demos come from) = ``choice(len(train set), query_set_size,
   replace=False)`` from the same stream;
3. the subset is visited in ``DistributedSampler`` order (a ``randperm`` seeded with 0, then every
   ``world_size``-th index from ``rank``);
4. ``random.seed(seed + rank)``; each query draws ``random.sample(query set, k)``.

RICES (:mod:`vlmcore.eval.rices`) replaces step 4 by the query's nearest training images.
Here the streams are private generators (``numpy.random.RandomState``, ``random.Random``), which
draw exactly what the global calls draw.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TrialPlan:
    """One trial's samples: ``eval_indices`` (this rank's, in visiting order) into the eval set,
    ``query_set`` (indices into the training set) and the seeded generator that draws the demos."""

    eval_indices: list[int]
    query_set: list[int]
    demo_rng: random.Random

    def random_demos(self, k: int) -> list[int]:
        """``k`` training indices drawn from the query set without replacement (one query's demos)."""
        if k > len(self.query_set):
            raise ValueError(f"cannot draw {k} demonstrations from a query set of {len(self.query_set)}")
        return self.demo_rng.sample(self.query_set, k)


def distributed_order(num_items: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> list[int]:
    """Positions ``0..num_items-1`` as ``torch.utils.data.DistributedSampler(shuffle=True, seed=seed)``
    hands them to ``rank`` in epoch 0: a seeded permutation, padded by wrapping to a multiple of
    ``world_size``, then every ``world_size``-th entry from ``rank``."""
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed)).tolist()
    total = math.ceil(num_items / world_size) * world_size
    order += (order * math.ceil(total / max(num_items, 1)))[: total - num_items]
    return order[rank:total:world_size]


def plan_trial(num_eval: int, num_train: int, *, seed: int, num_samples: int = 0, query_set_size: int = 2048,
               rank: int = 0, world_size: int = 1) -> TrialPlan:
    """The samples of one trial (see the module docstring).

    Args:
        num_eval, num_train: sizes of the evaluated set and of the demonstration (training) set.
        seed: the trial's seed (OpenFlamingo ``--trial_seeds``).
        num_samples: evaluated samples (0 = all of the eval set).
        query_set_size: the random demos' pool (capped at the training set's size).
        rank, world_size: this rank's share of the evaluated samples.
    """
    num_samples = num_samples or num_eval
    if num_samples > num_eval:
        raise ValueError(f"num_samples={num_samples} exceeds the {num_eval} samples of the eval set")
    stream = np.random.RandomState(seed)
    subset = stream.choice(num_eval, num_samples, replace=False).tolist()
    query_set = stream.choice(num_train, min(query_set_size, num_train), replace=False).tolist()
    eval_indices = [subset[i] for i in distributed_order(num_samples, rank, world_size)]
    return TrialPlan(eval_indices, query_set, random.Random(seed + rank))


def prompt_images(demos: list[list[dict]], queries: list[dict], num_shots: int) -> list[list[torch.Tensor]]:
    """Per query: its demonstrations' images (none for 0 shots: their text only) then its own image."""
    return [([d["image"] for d in row] if num_shots > 0 else []) + [q["image"]] for row, q in zip(demos, queries)]
