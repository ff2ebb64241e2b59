"""The numbers one optimizer step reduces over its micro-batches and ranks, as named fields.

The loss-side numbers (finiteness, losses, the task's metrics) stay on the device while the step
runs; the counts (samples, tokens, skipped samples) are host integers. :meth:`StepAccumulator.finish`
puts both in one device tensor, the trainer all-reduces it once and reads it back once
(:meth:`StepStats.from_tensor` of its ``tolist()``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

STATS_DTYPE = torch.float64  # exact integer counts far beyond any run's sample count


@dataclasses.dataclass
class StepStats:
    """Sums over one optimizer step (its A micro-batches) and, once reduced, over the ranks.

    Each field is a float64 tensor on the training device, or, after :meth:`from_tensor` of a list,
    a float (the ``[]`` fields) or a list of floats. D = datasets, M = the task's metrics of all
    datasets, R = skip reasons (``data.pipeline.SKIP_REASONS``).
    """

    nonfinite: torch.Tensor  # [A] ranks whose weighted loss was not finite, per micro-batch
    loss: torch.Tensor  # [] the weighted losses (sum over datasets), finite ones only
    dataset_losses: torch.Tensor  # [D] each dataset's loss, finite micro-batches only
    metrics: torch.Tensor  # [M] the task's extra scalars, finite micro-batches only
    samples: torch.Tensor  # [D] samples read
    tokens: torch.Tensor  # [] non-padding text tokens read
    skipped: torch.Tensor  # [D * R] samples skipped since the run began, per dataset and reason

    def to_tensor(self) -> torch.Tensor:
        """All fields in one flat ``[A + 2 + 2D + M + D R]`` tensor, in field order."""
        return torch.cat([getattr(self, f.name).reshape(-1) for f in dataclasses.fields(self)])

    @classmethod
    def from_tensor(cls, flat: torch.Tensor | Sequence[float], layout: StepStats) -> StepStats:
        """Split ``flat`` (a :meth:`to_tensor` result or its ``tolist()``) into the fields of ``layout``'s sizes."""
        values, start = {}, 0
        for field in dataclasses.fields(cls):
            like = getattr(layout, field.name)
            values[field.name] = flat[start] if like.dim() == 0 else flat[start:start + like.numel()]
            start += like.numel()
        if start != len(flat):
            raise ValueError(f"StepStats.from_tensor: {len(flat)} values for a layout of {start}")
        return cls(**values)


class StepAccumulator:
    """Sums the micro-batches of one optimizer step without reading anything back to the host."""

    def __init__(self, micro_batches: int, device: torch.device):
        self.device = device
        self.nonfinite = torch.zeros(micro_batches, dtype=STATS_DTYPE, device=device)
        self.losses: torch.Tensor | None = None  # [1 + D + M]: weighted loss, per-dataset losses, metrics
        self.samples: list[int] | None = None
        self.tokens = 0

    def _scalar(self, x: torch.Tensor | float) -> torch.Tensor:
        """``x`` as a float64 ``[]`` on the device (a Python float is filled in there, not copied up)."""
        if isinstance(x, torch.Tensor):
            return x.detach().to(STATS_DTYPE).reshape(())
        return torch.full((), x, dtype=STATS_DTYPE, device=self.device)

    def add(self, micro: int, total: torch.Tensor, losses: list[torch.Tensor], metrics: list[torch.Tensor | float],
            samples: list[int], tokens: int) -> None:
        """One micro-batch: ``total`` ``[]`` its weighted loss, ``losses`` D ``[]`` per-dataset losses,
        ``metrics`` M scalars (``[]`` tensors on the device, or floats), ``samples`` per dataset and
        ``tokens`` (host integers)."""
        finite = torch.isfinite(total.detach())
        self.nonfinite[micro] = (~finite).to(STATS_DTYPE)
        values = torch.stack([self._scalar(x) for x in (total, *losses, *metrics)])
        # A non-finite micro-batch adds nothing (its step is skipped or the run stops).
        values = torch.where(finite, values, torch.zeros_like(values))
        self.losses = values if self.losses is None else self.losses + values
        self.samples = samples if self.samples is None else [a + b for a, b in zip(self.samples, samples)]
        self.tokens += tokens

    def finish(self, skipped: list[int]) -> StepStats:
        """The step's :class:`StepStats` on the device (``skipped``: the D x R cumulative counts);
        the host counts go up in one copy (from pinned memory on CUDA, so it does not wait)."""
        counts = torch.tensor([self.tokens, *self.samples, *skipped], dtype=STATS_DTYPE)
        if self.device.type == "cuda":
            counts = counts.pin_memory()
        counts = counts.to(self.device, non_blocking=True)
        n_sets = len(self.samples)
        return StepStats(nonfinite=self.nonfinite, loss=self.losses[0], dataset_losses=self.losses[1:1 + n_sets],
                         metrics=self.losses[1 + n_sets:], samples=counts[1:1 + n_sets], tokens=counts[0],
                         skipped=counts[1 + n_sets:])
