"""``python -m vlmcore.bench smoke``: every kernel once, checked, in a few seconds of GPU time.

For each kernel op (:data:`SMOKE`): one bf16 forward + backward at its ANCHORS shape and one fp32
forward + backward at a small shape, each against the op's reference evaluated in fp32 on fp32
copies of the inputs, with NaN-poisoned output buffers (:mod:`vlmcore.bench.gate`). One JSON line
per kernel op, printed and appended to ``--out`` as soon as it is known (a run cut short keeps the
lines it wrote)::

    {"kernel": "masked_immediate", "status": "pass", "checks": [{"check": "bf16-anchor", "shape": ...,
     "dtype": "bf16", "status": "pass", "max_rel_err": 0.004, "finite": true, "worst": "grad k",
     "tolerance": 0.05, "seconds": 3.1}, ...]}

Statuses: ``pass``, ``fail`` (error above tolerance or non-finite values), ``error`` (an exception:
its first line in ``note``), ``skipped`` (bf16 without CUDA: the Triton interpreter computes bf16
wrongly). Without CUDA the fp32 checks run in the interpreter. Exit code 1 when any check failed
or raised. Autotuning follows ``VLMCORE_AUTOTUNE`` (the GPU plan's first call sets ``preferred``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import blip, contrastive, masked_xattn, resampler, sigmoid
from .harness import Case, Gate, Provider, RunContext, first_line, free_memory, gate_case
from .results import CsvWriter, dtype_name


@dataclass(frozen=True)
class SmokeKernel:
    """One kernel op of the smoke check: its vlmcore provider and reference, and how to build its
    bf16 anchor case and fp32 small case on a context (``make_case(ctx, anchor) -> Case``)."""

    name: str
    provider: Provider
    reference: Provider
    make_case: Callable[[RunContext, bool], Case]


def _contrastive_case(ctx, anchor):
    return contrastive.make_case(8192, 768, ctx) if anchor else contrastive.make_case(128, 32, ctx)


def _sigmoid_case(ctx, anchor):
    return sigmoid.make_case(8192, 768, ctx) if anchor else sigmoid.make_case(96, 32, ctx)


def _momentum_case(ctx, anchor):
    # BLIP's per-rank shape with its 57,600-column queue; the small case takes the image-id path
    return blip.make_case(256, 57600, 256, ctx) if anchor else blip.make_case(32, 96, 32, ctx, with_ids=True)


def _masked_case(attend):
    def make(ctx, anchor):
        shape = (16, 512, 5, 64, 8, 64) if anchor else (2, 48, 3, 16, 2, 32)
        return masked_xattn.make_case(*shape, attend, ctx)

    return make


def _resampler_case(ctx, anchor):
    # Perceiver form with masked media, at the GPU tests' shapes (their compiles serve both); the
    # Q-Former form (a flag of the same kernels) is checked by the GPU tests' anchor shapes
    shape = (640, 257, 64, 8, 64) if anchor else (5, 131, 37, 3, 32)
    return resampler.make_case(*shape, True, ctx, with_mask=True)


SMOKE = (
    SmokeKernel("contrastive", contrastive.PROVIDERS[0], contrastive.PROVIDERS[1], _contrastive_case),
    SmokeKernel("sigmoid", sigmoid.PROVIDERS[0], sigmoid.PROVIDERS[1], _sigmoid_case),
    SmokeKernel("momentum", blip.PROVIDERS[0], blip.PROVIDERS[1], _momentum_case),
    SmokeKernel("masked_immediate", masked_xattn.PROVIDERS[0], masked_xattn.PROVIDERS[1], _masked_case("immediate")),
    SmokeKernel("masked_all_previous", masked_xattn.PROVIDERS[0], masked_xattn.PROVIDERS[1],
                _masked_case("all_previous")),
    SmokeKernel("resampler", resampler.PROVIDERS[0], resampler.PROVIDERS[1], _resampler_case),
)
CHECKS = (("bf16-anchor", torch.bfloat16, True), ("fp32-small", torch.float32, False))


def check_kernel(kernel: SmokeKernel, device: torch.device) -> dict:
    """Both checks of one kernel op; the JSON-ready record."""
    checks = []
    for label, dtype, anchor in CHECKS:
        ctx = RunContext(device=device, dtype=dtype, modes=("fwd_bwd",), writer=CsvWriter(None), quick=not anchor)
        record = {"check": label, "dtype": dtype_name(dtype)}
        start = time.monotonic()
        try:
            case = kernel.make_case(ctx, anchor)
            record["shape"] = case.shape
            if dtype == torch.bfloat16 and device.type != "cuda":
                record.update(status="skipped", note="bf16 needs CUDA: the Triton interpreter computes bf16 wrongly")
            else:
                result = gate_case(case, kernel.provider, Gate(kernel.reference), dtype)
                record.update(status="pass" if result.passed else "fail",
                              max_rel_err=result.max_rel_err if math.isfinite(result.max_rel_err) else None,
                              finite=result.finite, worst=result.worst, tolerance=result.tolerance)
        except Exception as error:
            record.update(status="error", note=first_line(error))
        finally:
            free_memory(device)
        record["seconds"] = round(time.monotonic() - start, 2)
        checks.append(record)
    statuses = {c["status"] for c in checks}
    overall = next((s for s in ("error", "fail", "pass") if s in statuses), "skipped")
    return {"kernel": kernel.name, "status": overall, "checks": checks}


def main(out: str | None, only: str | None = None) -> int:
    """Run the smoke check (``only``: one kernel op by name); 1 if any check failed or raised."""
    kernels = [k for k in SMOKE if only is None or k.name == only]
    if not kernels:
        raise ValueError(f"unknown kernel {only!r}; smoke kernels: {', '.join(k.name for k in SMOKE)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    failed = False
    for kernel in kernels:
        line = json.dumps(check_kernel(kernel, device))
        print(line, flush=True)
        if out is not None:
            with open(Path(out), "a") as handle:
                handle.write(line + "\n")
        failed |= json.loads(line)["status"] in ("fail", "error")
    return 1 if failed else 0


def summarize(path: str) -> int:
    """Print one line per kernel op of a smoke JSON lines file (``--summarize``)."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    print(f"{'smoke kernel':<22} {'status':<8} checks (dtype shape: status, max rel err / tolerance)")
    for record in lines:
        parts = []
        for check in record["checks"]:
            error = check.get("max_rel_err")
            detail = f"{error:.2g}/{check['tolerance']:g}" if error is not None else check.get("note", "")
            parts.append(f"{check['check']}: {check['status']} {detail}".strip())
        print(f"{record['kernel']:<22} {record['status']:<8} " + "; ".join(parts))
    return 0
