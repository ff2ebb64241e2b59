"""Timing, memory and ceilings: how every benchmark row is measured.

- GPU: ``triton.testing.do_bench`` (L2 flushed between calls, gradients reset through
  ``grad_to_none``) with quantiles 0.5 / 0.2 / 0.8. A call slower than ``slow_ms`` on its timed
  probe run (after the warm-up) is reported from that single run (notes say so), so that a
  6-second peer does not eat the run's time budget.
- CPU: a plain ``time.perf_counter`` loop (at least 3 calls, about ``cpu_budget_s`` of them).
- Peak memory: ``torch.cuda.max_memory_allocated()`` during one call minus what was allocated
  before it, in MiB. Outputs, saved activations and input gradients made by the call count.
  On CPU there is no allocator statistic: the cell is left empty.
- Modes: ``fwd`` (forward with autograd recording, as in training), ``bwd`` (``backward`` of an
  output made beforehand, graph retained), ``fwd_bwd`` (both).
- A :class:`MemoryError`-like failure (CUDA OOM) is a result row with status ``oom``; any other
  exception becomes an ``error`` row. Neither stops the run.
- Order: every case of the first provider (vlmcore), then the next provider's: when the time
  budget runs out, it is the peers' rows that are written as ``skipped``. The warm-up call
  (compilation, autotuning) counts against the budget: a row whose warm-up ends past the deadline
  is ``skipped`` with the warm-up time in its notes.
- Correctness gate (:mod:`vlmcore.bench.gate`): before vlmcore's rows of a case are timed, one
  forward + backward is compared with the op's reference; every row of that case carries the
  error, the finite check and ``pass`` / ``fail``.
"""

from __future__ import annotations

import gc
import math
import os
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from vlmcore.kernels import backend

from .gate import GateResult, compare, forward_backward, nan_poisoned_empty, upcast
from .results import CsvWriter, dtype_name, make_row

MODES = ("fwd", "bwd", "fwd_bwd")
QUANTILES = (0.5, 0.2, 0.8)
# Share of a run's time budget each op of ``all`` gets, in run order (what an op leaves unused
# rolls over to the next).
BUDGET_SHARES = {"contrastive": 0.25, "masked_xattn": 0.3, "resampler": 0.15, "e2e": 0.3, "sigmoid": 0.15,
                 "vilbert": 0.05, "blip2": 0.1, "blip": 0.1}


class Unavailable(Exception):
    """A provider cannot run here (not installed, needs CUDA, ...): the message says why."""


class Unsupported(Exception):
    """A provider cannot express this case (e.g. a mode its API has no form for)."""


class BudgetSpent(Exception):
    """The run's deadline passed during a row's warm-up: the row is written as ``skipped``."""


@dataclass
class Case:
    """One shape of one op.

    Args:
        shape: label, ``key=value`` pairs separated by spaces.
        x: the swept number of this shape (for plots).
        make_inputs: builds the inputs on the run's device and dtype (leaves that need gradients
            have ``requires_grad=True``); called once per provider.
        flops: minimum FLOPs per mode (the ANCHORS.md floor); bytes: minimum bytes moved per mode.
        meta: anything the providers need to know about the shape (R, mode of the op, ...).
    """

    shape: str
    x: float
    make_inputs: Callable[[], dict]
    flops: dict[str, float]
    bytes: dict[str, float]
    meta: dict = field(default_factory=dict)


@dataclass
class Provider:
    """One implementation of an op.

    Args:
        name: CSV provider name.
        build: ``build(case, inputs) -> fn`` where ``fn()`` runs the op forward on ``inputs`` and
            returns a differentiable tensor. Work that a real user does once per batch (masks,
            sequence offsets) goes in ``build``, outside the timed call. May raise
            :class:`Unavailable` or :class:`Unsupported`.
        check: ``check(device) -> None``; raises :class:`Unavailable` with the reason when the
            provider cannot run on this machine (called once per run).
        backend: the vlmcore backend in force while it runs (``triton`` for vlmcore itself).
        anchor_only: measured on the first case only, and on the others only while more than half
            of the op's time budget is left (FlexAttention compiles once per shape: 5-30 s each).
    """

    name: str
    build: Callable
    check: Callable[[torch.device], None] = lambda device: None
    backend: str = "auto"
    anchor_only: bool = False


@dataclass(frozen=True)
class Gate:
    """How vlmcore's rows of an op are checked: against ``reference`` (a provider of the same op),
    on fp32 copies of the inputs when ``upcast`` (pure ops), else on the same inputs (modules whose
    weights live in the run's dtype). A case's ``meta["gate_case"]`` (a smaller :class:`Case` of
    the same op and width) replaces it where the fp32 reference would not fit."""

    reference: Provider
    upcast: bool = True


@dataclass
class RunContext:
    """What a benchmark run shares: device, dtype, modes, the CSV, the time budget, the ceilings."""

    device: torch.device
    dtype: torch.dtype
    modes: tuple[str, ...]
    writer: CsvWriter
    quick: bool = False
    deadline: float = math.inf
    rep_ms: int = 100
    warmup_ms: int = 25
    slow_ms: float = 400.0  # 100 ms on CPU (set by the CLI): interpreter rows are timed once
    cpu_budget_s: float = 0.25
    matmul_tflops: float = math.nan
    copy_gbps: float = math.nan
    rows: list = field(default_factory=list)
    echo: Callable[[str], None] = print

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def emit(self, op: str, provider: str, case_shape: str, mode: str, status: str, **fields) -> dict:
        dtype = fields.pop("dtype", dtype_name(self.dtype))
        row = make_row(op, provider, case_shape, mode, status, dtype=dtype, **fields)
        self.writer.write(row)
        self.rows.append(row)
        self.echo(_describe(row))
        return row


def _describe(row: dict) -> str:
    head = f"{row['op']:<13} {row['provider']:<15} {row['shape']:<40} {row['mode']:<10}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['notes']}"
    if row["throughput"]:
        return f"{head} {row['throughput']} {row['unit']}  {row['ms_p50']} ms  peak {row['peak_mib'] or '-'} MiB"
    return (f"{head} {row['ms_p50']} ms (p20 {row['ms_p20']}, p80 {row['ms_p80']})  peak {row['peak_mib'] or '-'} MiB"
            f"  {row['tflops'] or '-'} TFLOP/s  {row['gbps'] or '-'} GB/s")


def is_oom(error: BaseException) -> bool:
    """CUDA (or host) out-of-memory, whatever layer raised it."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return "out of memory" in str(error).lower()


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached blocks to the CUDA allocator (nothing to do on CPU)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _leaves(inputs: dict) -> list[torch.Tensor]:
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def _clear_grads(leaves: Iterable[torch.Tensor]) -> None:
    for leaf in leaves:
        leaf.grad = None


def _wall_ms(call: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def time_call(call: Callable[[], object], leaves: list[torch.Tensor], ctx: RunContext,
              probe: float | None = None) -> tuple[list[float], str]:
    """``[p50, p20, p80]`` milliseconds of ``call`` (already warmed up), and a note on how they were taken.

    ``probe``: the wall time of one call already made (see :func:`probe_call`); taken here if None.
    """
    if probe is None:
        probe = _wall_ms(call, ctx.device)
        _clear_grads(leaves)
    if probe > ctx.slow_ms:
        return [probe] * 3, f"one timed run after warm-up ({probe:.0f} ms > {ctx.slow_ms:.0f} ms)"
    if ctx.cuda:
        import triton.testing

        values = triton.testing.do_bench(
            call, warmup=ctx.warmup_ms, rep=ctx.rep_ms, grad_to_none=leaves or None, quantiles=list(QUANTILES)
        )
        return [float(v) for v in values], "triton.testing.do_bench"
    times = []
    budget_end = time.perf_counter() + ctx.cpu_budget_s
    while len(times) < 3 or (time.perf_counter() < budget_end and len(times) < 50):
        times.append(_wall_ms(call, ctx.device))
        _clear_grads(leaves)
    quantiles = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return quantiles.tolist(), f"perf_counter loop, {len(times)} calls"


def probe_call(call: Callable[[], object], leaves: list[torch.Tensor], device: torch.device) -> tuple[float, float]:
    """One timed ``call``: ``(extra CUDA memory allocated during it in MiB (NaN on CPU), wall ms)``."""
    _clear_grads(leaves)
    before = 0
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if device.type == "cuda" else math.nan
    _clear_grads(leaves)
    return peak, wall_ms


def make_call(fn: Callable[[], torch.Tensor], mode: str, leaves: list[torch.Tensor]) -> tuple[Callable, list]:
    """The timed callable for ``mode``; also returns objects to keep alive (the bwd-mode output)."""
    out = fn()
    grad = torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)
    if mode == "fwd":
        del out
        return fn, [grad]
    if mode == "fwd_bwd":
        del out

        def fwd_bwd():
            fn().backward(grad)

        return fwd_bwd, [grad]
    if mode == "bwd":
        def bwd():
            out.backward(grad, retain_graph=True)

        return bwd, [out, grad]
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def measure(fn: Callable[[], torch.Tensor], inputs: dict, mode: str, ctx: RunContext) -> dict:
    """Warm up, then time and take the peak memory of ``fn`` in ``mode``; returns result fields.

    Raises:
        BudgetSpent: the warm-up (compilation, autotuning) ended past the run's deadline.
    """
    leaves = _leaves(inputs)
    call, keep = make_call(fn, mode, leaves)
    start = time.monotonic()
    call()  # warm-up: compilation, autotuning, caches
    synchronize(ctx.device)
    warmup_s = time.monotonic() - start
    if ctx.out_of_time():
        raise BudgetSpent(f"time budget of this run spent during the warm-up ({warmup_s:.1f} s)")
    _clear_grads(leaves)
    memory, probe = probe_call(call, leaves, ctx.device)
    (p50, p20, p80), how = time_call(call, leaves, ctx, probe)
    del keep
    return {"ms_p50": p50, "ms_p20": p20, "ms_p80": p80, "peak_mib": memory,
            "notes": f"{how}; warm-up {warmup_s:.2f} s"}


def useful_rates(case: Case, mode: str, ms: float, ctx: RunContext) -> dict:
    """Useful TFLOP/s and GB/s against the case's floors, and their fractions of the measured ceilings."""
    flops, nbytes = case.flops.get(mode, math.nan), case.bytes.get(mode, math.nan)
    tflops = flops / ms / 1e9 if ms > 0 else math.nan
    gbps = nbytes / ms / 1e6 if ms > 0 else math.nan
    return {
        "tflops": tflops,
        "gbps": gbps,
        "frac_matmul": tflops / ctx.matmul_tflops if ctx.matmul_tflops > 0 else math.nan,
        "frac_copy": gbps / ctx.copy_gbps if ctx.copy_gbps > 0 else math.nan,
    }


def run_op(op: str, cases: list[Case], providers: list[Provider], ctx: RunContext, gate: Gate | None = None) -> None:
    """Every (provider, case, mode) of one op, one CSV row each; never raises for a provider's failure.

    Providers in the given order (vlmcore first), each over every case. With ``gate``, the
    provider named ``vlmcore`` is checked against ``gate.reference`` once per case.
    """
    reasons = {provider.name: _unavailable_reason(provider, ctx.device) for provider in providers}
    op_start, op_deadline = time.monotonic(), ctx.deadline
    for provider in providers:
        for position, case in enumerate(cases):
            if reasons[provider.name] is not None:
                for mode in ctx.modes:
                    ctx.emit(op, provider.name, case.shape, mode, "unavailable", x=case.x, notes=reasons[provider.name])
                continue
            if provider.anchor_only and position > 0 and not _half_budget_left(op_start, op_deadline):
                for mode in ctx.modes:
                    ctx.emit(op, provider.name, case.shape, mode, "skipped", x=case.x,
                             notes=f"{provider.name} runs on the anchor shape only unless half of the op's time "
                                   f"budget is left (it compiles once per shape)")
                continue
            run_gate = gate if gate is not None and provider.name == "vlmcore" else None
            _run_provider(op, case, provider, ctx, run_gate)


def _unavailable_reason(provider: Provider, device: torch.device) -> str | None:
    try:
        provider.check(device)
        return None
    except Unavailable as error:
        return str(error)
    except Exception as error:  # a broken install is a reason too, not a crash
        return f"{type(error).__name__}: {error}"


def _half_budget_left(start: float, deadline: float) -> bool:
    if not math.isfinite(deadline):
        return True
    return deadline - time.monotonic() > (deadline - start) / 2


def gate_case(case: Case, provider: Provider, gate: Gate, dtype: torch.dtype) -> GateResult:
    """One forward + backward of ``provider`` (NaN-poisoned buffers) against ``gate.reference``,
    at ``case`` or at its ``meta["gate_case"]``."""
    checked = case.meta.get("gate_case", case)
    inputs = checked.make_inputs()
    with backend(provider.backend):
        fn = provider.build(checked, inputs)
        with nan_poisoned_empty():
            got = forward_backward(fn, inputs)
    reference_inputs = upcast(inputs) if gate.upcast else inputs
    with backend(gate.reference.backend):
        expected = forward_backward(gate.reference.build(checked, reference_inputs), reference_inputs)
    return compare(got, expected, dtype, checked.shape)


def _gate_fields(op: str, case: Case, provider: Provider, gate: Gate, ctx: RunContext) -> tuple[dict, str]:
    """The gate's CSV fields and note for every row of ``case``; a gate that cannot run fails."""
    try:
        return gate_case(case, provider, gate, ctx.dtype).fields(case.shape)
    except Exception as error:
        return {"finite": "", "gate": "fail"}, f"GATE FAIL: the gate could not run: {first_line(error)}"
    finally:
        free_memory(ctx.device)


def first_line(error: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` for a result row; the full traceback goes to stderr when
    ``VLMCORE_BENCH_TRACEBACK=1`` (a failing row is then debuggable without editing the suite)."""
    if os.environ.get("VLMCORE_BENCH_TRACEBACK", "0") not in ("", "0"):
        traceback.print_exception(error)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:limit]


def _run_provider(op: str, case: Case, provider: Provider, ctx: RunContext, gate: Gate | None = None) -> None:
    inputs = fn = None
    gate_fields, gate_note = {}, ""
    if gate is not None and not ctx.out_of_time():
        gate_fields, gate_note = _gate_fields(op, case, provider, gate, ctx)
    for mode in ctx.modes:
        if ctx.out_of_time():
            ctx.emit(op, provider.name, case.shape, mode, "skipped", x=case.x, notes="time budget of this run spent")
            continue
        status, fields = "ok", {}
        try:
            with backend(provider.backend):
                if inputs is None:
                    inputs = case.make_inputs()
                    fn = provider.build(case, inputs)
                fields = measure(fn, inputs, mode, ctx)
            fields.update(useful_rates(case, mode, fields["ms_p50"], ctx))
        except Unavailable as error:
            status, fields = "unavailable", {"notes": str(error)}
        except Unsupported as error:
            status, fields = "unsupported", {"notes": str(error)}
        except BudgetSpent as error:
            status, fields = "skipped", {"notes": str(error)}
        except Exception as error:
            status = "oom" if is_oom(error) else "error"
            fields = {"notes": first_line(error)}
        if status != "ok":
            inputs = fn = None  # rebuilt for the next mode: a failure may leave graphs behind
            free_memory(ctx.device)
        if gate_fields:
            fields = {**fields, **gate_fields, "notes": "; ".join(n for n in (gate_note, fields.get("notes")) if n)}
        ctx.emit(op, provider.name, case.shape, mode, status, x=case.x, **fields)
    del inputs, fn
    free_memory(ctx.device)


def measure_ceilings(ctx: RunContext) -> None:
    """The card's own ceilings: dense matmul TFLOP/s and device-copy GB/s (read + write), as rows.

    GPU: bf16 8192^3 matmul and a 1 GiB copy. CPU: fp32 1024^3 (512^3 with --quick) and 64 MiB.
    Sets ``ctx.matmul_tflops`` / ``ctx.copy_gbps`` for the fractions of the other rows.
    """
    if ctx.cuda:
        size, dtype, copy_bytes = 8192, torch.bfloat16, 2**30
    else:
        size, dtype, copy_bytes = (512 if ctx.quick else 1024), torch.float32, 2**26
    label = f"matmul {dtype_name(dtype)} {size}^3"
    try:
        a = torch.randn(size, size, device=ctx.device, dtype=dtype)
        b = torch.randn(size, size, device=ctx.device, dtype=dtype)
        (ms, _, _), how = time_call(lambda: a @ b, [], ctx)
        ctx.matmul_tflops = 2 * size**3 / ms / 1e9
        ctx.emit("ceiling", "torch", label, "matmul", "ok", dtype=dtype_name(dtype), ms_p50=ms,
                 tflops=ctx.matmul_tflops, frac_matmul=1.0, notes=how)
    except Exception as error:
        ctx.emit("ceiling", "torch", label, "matmul", "oom" if is_oom(error) else "error", dtype=dtype_name(dtype),
                 notes=first_line(error))
    finally:
        a = b = None
    label = f"copy {copy_bytes // 2**20} MiB"
    try:
        src = torch.empty(copy_bytes // 4, device=ctx.device, dtype=torch.float32).fill_(1.0)
        dst = torch.empty_like(src)
        (ms, _, _), how = time_call(lambda: dst.copy_(src), [], ctx)
        ctx.copy_gbps = 2 * copy_bytes / ms / 1e6
        ctx.emit("ceiling", "torch", label, "copy", "ok", dtype="fp32", ms_p50=ms, gbps=ctx.copy_gbps,
                 frac_copy=1.0, notes=f"{how}; bytes read + written")
    except Exception as error:
        ctx.emit("ceiling", "torch", label, "copy", "oom" if is_oom(error) else "error", dtype="fp32",
                 notes=first_line(error))
    finally:
        src = dst = None
    free_memory(ctx.device)
