"""Benchmark of the symmetric contrastive (CLIP InfoNCE) loss.

Providers: ``vlmcore`` (the fused tiled kernel), ``reference`` (OpenCLIP ``ClipLoss`` math, n x n
logits materialized in fp32), ``inf_cl`` (Inf-CL's ``cal_inf_loss``, both directions averaged),
``memeff`` (PyPI ``memeff`` 0.3.1 ``MemoryEfficientCLIPLoss``: its temperature is a Python float,
so the logit scale gets no gradient there; CUDA only).

Correctness gate: vlmcore against the fp32 reference at n <= ``GATE_MAX_N``; larger n are gated at
``GATE_MAX_N`` (the fp32 logits of n = 65536 and their gradient would take 34 GiB).

Floors (ANCHORS.md section 1): forward 2 n^2 d FLOPs (one logits pass), backward 6 n^2 d
(recomputed logits + two gradient products), forward + backward 8 n^2 d. Bytes: the features read
once (2 n d elements) forward; read once and their gradients written once (4 n d) otherwise.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from vlmcore.kernels import contrastive_loss
from vlmcore.kernels._plan import OpPlan
from vlmcore.kernels.contrastive import contrastive_plan
from vlmcore.kernels.reference import contrastive_loss_reference

from . import providers as peers
from .harness import Case, Gate, Provider, RunContext, Unsupported, run_op

OP = "contrastive"
GPU_SIZES = (8192, 32768, 65536, 131072)
QUICK_SIZES = (64, 128)
HUGE_N = 1_048_576  # the "fits on one 80 GB GPU" row of ANCHORS.md, vlmcore only
DIM = 768
QUICK_DIM = 32
GATE_MAX_N = 32768


def floors(n: int, d: int, element_size: int) -> tuple[dict[str, float], dict[str, float]]:
    """Minimum FLOPs and bytes per mode for n pairs of d-dim features."""
    flops = {"fwd": 2.0 * n * n * d, "bwd": 6.0 * n * n * d, "fwd_bwd": 8.0 * n * n * d}
    nbytes = {"fwd": 2.0 * n * d * element_size, "bwd": 4.0 * n * d * element_size,
              "fwd_bwd": 4.0 * n * d * element_size}
    return flops, nbytes


def make_case(n: int, d: int, ctx: RunContext) -> Case:
    def make_inputs():
        generator = torch.Generator(device=ctx.device).manual_seed(n)
        image = torch.randn(n, d, device=ctx.device, generator=generator)
        text = image + 0.5 * torch.randn(n, d, device=ctx.device, generator=generator)
        return {
            "image": F.normalize(image, dim=-1).to(ctx.dtype).requires_grad_(),
            "text": F.normalize(text, dim=-1).to(ctx.dtype).requires_grad_(),
            "scale": torch.tensor(1 / 0.07, device=ctx.device).requires_grad_(),
        }

    flops, nbytes = floors(n, d, torch.tensor([], dtype=ctx.dtype).element_size())
    meta = {"gate_case": make_case(GATE_MAX_N, d, ctx)} if n > GATE_MAX_N else {}
    return Case(shape=f"n={n} d={d}", x=n, make_inputs=make_inputs, flops=flops, bytes=nbytes, meta=meta)


def _vlmcore(case, inputs):
    return lambda: contrastive_loss(inputs["image"], inputs["text"], inputs["scale"])


def _reference(case, inputs):
    return lambda: contrastive_loss_reference(inputs["image"], inputs["text"], inputs["scale"])


def _inf_cl(case, inputs):
    cal_inf_loss = peers.load_inf_cl()
    d = inputs["image"].shape[1]
    head_dim = next((h for h in (256, 128, 64, 32, 16) if d % h == 0), None)
    if head_dim is None:
        raise Unsupported(f"Inf-CL needs d divisible by 16, got d={d}")
    image, text, scale = inputs["image"], inputs["text"], inputs["scale"]

    # The scale multiplies the queries outside cal_inf_loss: inside, its gradient goes through an
    # all_reduce that needs torch.distributed even in one process. Same math either way.
    return lambda: (cal_inf_loss(scale * image, text, head_dim=head_dim)
                    + cal_inf_loss(scale * text, image, head_dim=head_dim)) / 2


def _memeff(case, inputs):
    loss = peers.load_memeff()(temperature=1.0 / float(inputs["scale"]), normalized_inputs=True, stable=False)
    return lambda: loss(inputs["image"], inputs["text"])


PROVIDERS = [
    Provider("vlmcore", _vlmcore, backend="triton"),
    Provider("reference", _reference, backend="reference"),
    Provider("inf_cl", _inf_cl, check=peers.check_inf_cl),
    Provider("memeff", _memeff, check=peers.check_memeff),
]
GATE = Gate(PROVIDERS[1])


def cases(ctx: RunContext) -> list[Case]:
    if ctx.quick:
        return [make_case(n, QUICK_DIM, ctx) for n in QUICK_SIZES]
    return [make_case(n, DIM, ctx) for n in GPU_SIZES]


def run(ctx: RunContext) -> None:
    """vlmcore over every n first (then the n = 1,048,576 row on a GPU), then the peers.

    The slow peers come last so that, when the time budget runs out, it is their largest shapes
    that are written as ``skipped``.
    """
    op_cases = cases(ctx)
    run_op(OP, op_cases, PROVIDERS[:1], ctx, gate=GATE)
    if ctx.cuda and not ctx.quick:
        run_huge(ctx)
    run_op(OP, op_cases, PROVIDERS[1:], ctx)


def run_huge(ctx: RunContext) -> None:
    """n = 1,048,576, forward + backward, vlmcore only: does it fit, and how long does it take.

    Predicted from the largest n measured (time grows as n^2); skipped when the prediction does
    not fit the remaining time budget, so one slow kernel cannot eat the whole GPU check.
    """
    shape = f"n={HUGE_N} d={DIM}"
    measured = [r for r in ctx.rows if r["op"] == OP and r["provider"] == "vlmcore" and r["mode"] == "fwd_bwd"
                and r["status"] == "ok"]
    if not measured:
        ctx.emit(OP, "vlmcore", shape, "fwd_bwd", "skipped", x=HUGE_N,
                 notes="no smaller fwd_bwd result to predict from")
        return
    largest = max(measured, key=lambda r: float(r["x"]))
    predicted_s = float(largest["ms_p50"]) / 1e3 * (HUGE_N / float(largest["x"])) ** 2
    remaining = ctx.deadline - time.monotonic()
    if 3 * predicted_s > remaining:
        ctx.emit(OP, "vlmcore", shape, "fwd_bwd", "skipped", x=HUGE_N,
                 notes=f"predicted {predicted_s:.1f} s per call, x3 calls > {remaining:.0f} s left in the budget")
        return
    saved_modes = ctx.modes
    ctx.modes = ("fwd_bwd",)
    try:
        run_op(OP, [make_case(HUGE_N, DIM, ctx)], PROVIDERS[:1], ctx, gate=GATE)
    finally:
        ctx.modes = saved_modes


# ----------------------------------------------------------------------------------------------
# launch plan (``python -m vlmcore.bench plan --op contrastive``)
# ----------------------------------------------------------------------------------------------

PLAN_SHAPES = [{"n": n, "d": DIM, "dtype": "bf16"} for n in (*GPU_SIZES, HUGE_N)]
# Written by ``tests/helpers/compile_checks/contrastive_compile_check.py --write-evidence`` (sm_90a compile, no GPU).
EVIDENCE = Path(__file__).resolve().parent / "evidence" / "contrastive_sm90.json"
_EVIDENCE_FIELDS = ("registers", "spill_bytes", "ctas_per_sm", "shared", "wgmma")


def _evidence_rows() -> list[dict]:
    if not EVIDENCE.exists():
        return []
    return json.loads(EVIDENCE.read_text())["rows"]


def join_evidence(plan_: OpPlan, rows: list[dict]) -> OpPlan:
    """``plan_`` with each launch's compile evidence: the row of the same kernel and dtype whose
    config has every entry of the launch's config (rows also name the JIT's unit-stride
    specializations). Launches without a compiled row (library calls) keep ``evidence=None``."""
    dtype = plan_.shape.get("dtype")

    def find(launch, ignored=()):
        # the column merge reads only fp32 statistics: compiled once, as fp32
        dtypes = (dtype, "fp32") if launch.kernel == "_contrastive_merge_cols_kernel" else (dtype,)
        return next((row for row in rows if row["kernel"] == launch.kernel and row["dtype"] in dtypes
                     and all(row["config"].get(k) == v for k, v in launch.config.items() if k not in ignored)), None)

    launches = []
    for launch in plan_.launches:
        match, nearest = find(launch), False
        if match is None and "FIRST" in launch.config:
            # the window products were compiled at their heaviest steps (accumulator read): the
            # first / middle / last step of the same tile config is the nearest evidence
            match, nearest = find(launch, ("FIRST", "LAST")), True
        evidence = {k: match[k] for k in _EVIDENCE_FIELDS} if match else None
        if evidence and nearest:
            evidence["compiled_step"] = f"FIRST={match['config']['FIRST']} LAST={match['config']['LAST']}"
        launches.append(replace(launch, evidence=evidence))
    return replace(plan_, launches=launches)


def plan(**shape) -> OpPlan:
    """The plan of :func:`vlmcore.kernels.contrastive.contrastive_plan` with sm_90a compile evidence."""
    return join_evidence(contrastive_plan(**shape), _evidence_rows())
