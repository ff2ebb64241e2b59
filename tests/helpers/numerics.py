"""Comparison helpers for kernel tests: per-dtype tolerances and a readable assert-close."""

from __future__ import annotations

import torch

# (atol, rtol) of a kernel output against the fp32 reference, by the kernel's input dtype.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
# Gradients accumulate over a reduction dimension; a little looser.
GRAD_TOLERANCES = {
    torch.float32: (2e-4, 2e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (5e-2, 5e-2),
}


def tolerance(dtype: torch.dtype, grad: bool = False) -> tuple[float, float]:
    """``(atol, rtol)`` for ``dtype`` (outputs, or gradients with ``grad=True``)."""
    return (GRAD_TOLERANCES if grad else TOLERANCES)[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 grad: bool = False, atol: float | None = None, rtol: float | None = None,
                 name: str = "tensor", max_report: int = 5) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise, in fp32.

    NaN/inf must appear at the same places in both (a NaN where the reference is finite fails).
    On failure, reports the shape, the worst error and the first ``max_report`` mismatching
    elements with their indices, instead of a bare ``False``.
    """
    default_atol, default_rtol = tolerance(dtype or actual.dtype, grad)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().float().cpu()
    e = expected.detach().float().cpu()
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    inf_mismatch = torch.isinf(a) != torch.isinf(e)
    finite = torch.isfinite(a) & torch.isfinite(e)
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    too_far = finite & (err > atol + rtol * e.abs())
    bad = nan_mismatch | inf_mismatch | too_far
    if not bool(bad.any()):
        return
    idx = bad.nonzero()[:max_report]
    lines = [
        f"{name}: {int(bad.sum())} of {a.numel()} elements mismatch (shape {tuple(a.shape)}, "
        f"atol={atol:g}, rtol={rtol:g}); max abs error {float(err.max()):.3g}; "
        f"NaN parity mismatches {int(nan_mismatch.sum())}, inf parity mismatches {int(inf_mismatch.sum())}"
    ]
    for i in idx:
        where = tuple(int(x) for x in i)
        lines.append(f"  at {where}: got {float(a[where]):.6g}, expected {float(e[where]):.6g}")
    raise AssertionError("\n".join(lines))


def run_sm90_compile_check(script_name: str, timeout: int) -> list[dict]:
    """Run ``tests/helpers/compile_checks/<script_name>`` (a compile-only sm_90 check) with the real Triton compiler.

    Skips when this Triton build ships no NVIDIA ptxas. The script prints one JSON object per
    compiled kernel variant; those rows are returned. No GPU is needed.
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton build ships no NVIDIA ptxas")
    script = Path(__file__).parent / "compile_checks" / script_name
    # The script imports its sibling sm90_compile, so its own folder must lead sys.path: PYTHONSAFEPATH
    # (set by the Makefile) would drop it. The repository root never gets on sys.path this way.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    proc = subprocess.run([sys.executable, str(script)], env=dict(env, TRITON_INTERPRET="0"),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


class _CountingLaunch:
    """Wraps a module's kernel so that the interpreter's tl.dot calls made during its launches are
    attributed to it (``state["counts"][name]``)."""

    def __init__(self, kernel, name: str, state: dict):
        self.kernel, self.name, self.state = kernel, name, state
        self.configs = kernel.configs

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.state["current"] = self.name
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.state["current"] = None

        return launch


def count_interpreter_dots(monkeypatch, module, kernels: dict[str, str], fn) -> dict[str, int]:
    """Run ``fn`` and return how many ``tl.dot`` calls the Triton interpreter executed in each kernel.

    ``kernels`` maps the module attribute that launchers use (e.g. ``"_fwd_kernel"``) to the name
    the counts are reported under (e.g. the ``@triton.jit`` function's name, as in a launch plan).
    Dots per inner tile are fixed per kernel, so this counts the tiles the kernels really ran.
    """
    from triton.runtime import interpreter

    state = {"current": None, "counts": dict.fromkeys(kernels.values(), 0)}
    real_dot = interpreter.InterpreterBuilder.create_dot

    def counting_dot(self, *args, **kwargs):
        if state["current"] is not None:
            state["counts"][state["current"]] += 1
        return real_dot(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting_dot)
    for attr, name in kernels.items():
        monkeypatch.setattr(module, attr, _CountingLaunch(getattr(module, attr), name, state))
    fn()
    return state["counts"]
