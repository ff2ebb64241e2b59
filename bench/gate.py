"""The correctness gate of every vlmcore benchmark row (and of ``python -m vlmcore.bench smoke``).

A timing says nothing unless the kernel that produced it computed the right numbers on that card,
in that dtype. Before a vlmcore row is timed, the gate runs the same forward + backward once and
compares its output and every input gradient with the op's reference:

- **max relative error**: over the output and the gradients of every leaf, the largest
  ``max|got - ref| / max|ref|`` (normwise: a tolerance independent of the tensor's scale, as the
  assert of a kernel test with ``rtol`` on the largest entry), computed in fp32;
- **finite**: every value the vlmcore kernel produced is finite (a NaN where the reference is
  finite is a failure whatever the error says);
- **pass**: finite, and the error within :data:`GATE_TOLERANCE` of the input dtype.

Pure ops (contrastive, sigmoid, momentum, masked cross-attention, resampler) are compared with
their reference evaluated in fp32 on fp32 copies of the same inputs; whole modules (ViLBERT block,
Q-Former) with their reference provider in the run's dtype. Shapes whose fp32 reference would not
fit (the n x n logits at n = 131072 are 64 GiB) are gated at a reduced shape of the same op and
feature width (``Case.meta["gate_shape"]``), and the row's notes say so.

While the gated call runs, ``torch.empty`` / ``torch.empty_like`` return NaN-filled tensors: an
output element a kernel forgets to write then shows up as a non-finite value instead of passing
by luck with stale memory.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# Normwise relative error allowed per input dtype, the kernel tests' gradient tolerances
# (tests/helpers/numerics.py: atol = rtol = 5e-2 / 5e-3 for bf16 / fp16) taken relative to the
# largest reference entry; fp32: 1e-3, as a loss near 0.5 with the tests' 1e-4 atol + 1e-4 rtol
# already allows 3e-4 (seen: 2.1e-4 in the interpreter at n = 64, exp2 and another summation order).
GATE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class GateResult:
    """Outcome of one gated call: error, finiteness, verdict, and where the gate ran."""

    max_rel_err: float
    finite: bool
    tolerance: float
    worst: str  # name of the tensor with the largest error ("output", "grad image", ...)
    shape: str  # the shape the gate ran at (the row's own, or a reduced one)

    @property
    def passed(self) -> bool:
        return self.finite and self.max_rel_err <= self.tolerance

    def fields(self, row_shape: str) -> tuple[dict, str]:
        """CSV fields of the row (``max_rel_err``, ``finite``, ``gate``) and a note for its ``notes``."""
        if self.passed:
            note = f"gate pass: max rel err {self.max_rel_err:.3g} ({self.worst}) <= {self.tolerance:g}"
        elif not self.finite:
            note = f"GATE FAIL: non-finite values ({self.worst})"
        else:
            note = f"GATE FAIL: max rel err {self.max_rel_err:.3g} ({self.worst}) > {self.tolerance:g}"
        if self.shape != row_shape:
            note += f"; gated at the reduced shape {self.shape}"
        fields = {"max_rel_err": self.max_rel_err, "finite": str(self.finite).lower(),
                  "gate": "pass" if self.passed else "fail"}
        return fields, note


def _poison(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype.is_floating_point:
        tensor.fill_(float("nan"))
    return tensor


@contextlib.contextmanager
def nan_poisoned_empty() -> Iterator[None]:
    """While active, ``torch.empty`` and ``torch.empty_like`` return NaN-filled floating tensors."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *args, **kwargs: _poison(real_empty(*args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: _poison(real_empty_like(*args, **kwargs))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def leaves(inputs: dict) -> dict[str, torch.Tensor]:
    """The inputs that need gradients, by name."""
    return {name: t for name, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad}


def upcast(inputs: dict) -> dict:
    """fp32 copies of the floating tensors of ``inputs`` (leaves stay leaves); others shared."""
    copied = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            copied[name] = value.detach().float().requires_grad_(value.requires_grad)
        else:
            copied[name] = value
    return copied


def forward_backward(fn: Callable[[], torch.Tensor], inputs: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """``fn()`` forward, then backward of a fixed random cotangent: ``{"output": ..., "grad <leaf>": ...}``.

    The cotangent is drawn in fp32 on the host generator (the same for the vlmcore call and its
    reference, whatever their dtypes). Gradients of earlier calls are cleared first.
    """
    named = leaves(inputs)
    for leaf in named.values():
        leaf.grad = None
    out = fn()
    generator = torch.Generator().manual_seed(seed)
    cotangent = torch.ones(()) if out.dim() == 0 else torch.randn(out.shape, generator=generator)
    results = {"output": out.detach()}
    if named:
        out.backward(cotangent.to(out.device, out.dtype))
        results.update({f"grad {name}": leaf.grad for name, leaf in named.items() if leaf.grad is not None})
    return results


def compare(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], dtype: torch.dtype, shape: str) -> GateResult:
    """Max normwise relative error of ``got`` against ``ref`` over the tensors both have, and finiteness."""
    worst_name, worst, finite = "output", 0.0, True
    for name, expected in ref.items():
        actual = got.get(name)
        if actual is None:
            finite, worst_name, worst = False, f"{name} missing", math.inf
            continue
        actual, expected = actual.detach().float(), expected.detach().float()
        if not bool(torch.isfinite(actual).all()):
            finite = False
            worst_name = name if worst != math.inf else worst_name
            worst = math.inf
            continue
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        error = float((actual - expected).abs().max()) / scale if scale > 0 else float(actual.abs().max())
        if error > worst:
            worst_name, worst = name, error
    return GateResult(max_rel_err=worst, finite=finite, tolerance=GATE_TOLERANCE.get(dtype, 5e-2),
                      worst=worst_name, shape=shape)
