"""The mixture policy: which training datasets a step reads, the loss weight of each, and how many
backward passes carry their gradients (``optim.mixture``, ``optim.mixture_backward``).

Modes (``optim.mixture``), with what ``data.train[i].weight`` means in each:

- ``accumulate`` (Flamingo's accumulation over datasets): every dataset, every step; the step's
  gradient is ``sum_i weight_i * grad loss_i``. ``weight`` = loss weight.
- ``round_robin``: one dataset per step, in ``data.train`` order (step s reads dataset
  ``(s - 1) mod n``); its loss is multiplied by ``weight``, so n consecutive steps apply the same
  weighted gradients as one ``accumulate`` step, each with 1/n of its memory and compute.
  ``weight`` = loss weight.
- ``sample`` (LAVIS's ratio sampling, ``MultiIterLoader``): one dataset per step, dataset i drawn
  with probability ``weight_i / sum(weight)`` from a generator seeded by ``seed`` (its state is
  checkpointed, so a resumed run draws what the uninterrupted one would); the loss is unweighted.
  ``weight`` = draw probability (up to normalisation).

Backward (``optim.mixture_backward``), for the datasets one micro-batch reads:

- ``joint``: one graph, ``sum_i weight_i * loss_i``, one backward: the activations of all of them
  are alive at once.
- ``per_dataset`` (OpenFlamingo's ``train_utils``: one backward per loader): one forward and backward
  per dataset, the gradients accumulating in place: the peak is the largest dataset's. DeepSpeed
  counts each backward as a micro-batch (:func:`backwards_per_micro_batch`). Only ``accumulate``
  reads several datasets per micro-batch; in the other modes both settings are the same schedule.
"""

from __future__ import annotations

import torch

MIXTURES = ("accumulate", "round_robin", "sample")
MIXTURE_BACKWARDS = ("joint", "per_dataset")


def backwards_per_micro_batch(mixture: str, mixture_backward: str, n_datasets: int) -> int:
    """Backward passes per micro-batch: the datasets one micro-batch reads under ``per_dataset``
    (all of them under ``accumulate``, one otherwise), else 1. DeepSpeed's gradient_accumulation_steps
    is ``accumulation_steps`` times this, so its boundary (the reduction and the update) falls on
    the step's last backward."""
    if mixture_backward == "per_dataset" and mixture == "accumulate":
        return n_datasets
    return 1


class MixturePolicy:
    """Which datasets each step visits (:meth:`visit`), with which loss weights, in which backward groups.

    Args:
        mixture: one of :data:`MIXTURES`.
        mixture_backward: one of :data:`MIXTURE_BACKWARDS`.
        weights: ``data.train[i].weight``, one per dataset (positive).
        seed: seeds the ``sample`` draws; the same on every rank, so all ranks read the same dataset.
    """

    def __init__(self, mixture: str, mixture_backward: str, weights: list[float], seed: int):
        if mixture not in MIXTURES:
            raise ValueError(f"optim.mixture: must be one of {MIXTURES}, got {mixture!r}")
        if mixture_backward not in MIXTURE_BACKWARDS:
            raise ValueError(f"optim.mixture_backward: must be one of {MIXTURE_BACKWARDS}, got {mixture_backward!r}")
        self.mixture, self.mixture_backward = mixture, mixture_backward
        self.weights = list(weights)
        self.probabilities = torch.tensor(self.weights, dtype=torch.float64) / sum(self.weights)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def backwards_per_micro_batch(self) -> int:
        return backwards_per_micro_batch(self.mixture, self.mixture_backward, len(self.weights))

    def visit(self, step: int) -> list[int]:
        """The indices of the datasets step ``step`` (1-based) reads, in ``data.train`` order. Call it
        once per step, in step order: ``sample`` draws from the generator."""
        if self.mixture == "accumulate":
            return list(range(len(self.weights)))
        if self.mixture == "round_robin":
            return [(step - 1) % len(self.weights)]
        return [int(torch.multinomial(self.probabilities, 1, generator=self.generator))]

    def loss_weight(self, dataset: int) -> float:
        """The factor of dataset ``dataset``'s loss: its weight, or 1 under ``sample`` (the weight was its odds)."""
        return 1.0 if self.mixture == "sample" else self.weights[dataset]

    def backward_groups(self, visited: list[int]) -> list[list[int]]:
        """The visited datasets split into backward passes: one group (``joint``) or one each (``per_dataset``)."""
        return [[i] for i in visited] if self.mixture_backward == "per_dataset" else [list(visited)]

    def state_dict(self) -> dict:
        """What a resumed run needs to draw the same datasets: the generator's state (``[N]`` uint8)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the draws from :meth:`state_dict`'s ``state`` (a checkpoint of another mode holds
        the generator as seeded: it never drew)."""
        self.generator.set_state(state["generator"])
