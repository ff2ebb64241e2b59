"""``python -m vlmcore.bench plan [--op NAME] [--json]``: the exact work plan of every op per ANCHORS shape.

For every registered op and every ANCHORS.md shape, the op's own planning function (the one its
launchers call, see :mod:`vlmcore.kernels._plan`) gives executed vs useful FLOPs, modelled HBM
bytes vs the compulsory floor, the number of launches, the peak extra memory and a predicted time
range at the ceilings measured on the H100 (ANCHORS.md). Compile evidence (registers, spills,
CTAs per SM of each kernel's preferred sm_90a config) is joined in by kernel name where an op
supplies it. Everything printed is a prediction computed on the host, never a measurement.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict

from vlmcore.kernels._plan import OpPlan
from vlmcore.kernels.masked_cross_attention import masked_cross_attention_plan
from vlmcore.kernels.resampler_attention import resampler_attention_plan
from vlmcore.kernels.sigmoid_contrastive import sigmoid_contrastive_plan as sigmoid_plan

from . import contrastive
from . import masked_xattn as _masked_xattn
from . import resampler as _resampler

# Ceilings measured on one H100 80GB (ANCHORS.md, 2026-11-27).
MATMUL_FLOPS_PER_S = 807e12
COPY_BYTES_PER_S = 3.0e12

# op name -> (ANCHORS shapes, plan function taking one shape's keyword arguments).
# One line per op; each op file owns its planning function.
PLANNERS: dict[str, tuple[list[dict], Callable[..., OpPlan]]] = {
    "contrastive": (contrastive.PLAN_SHAPES, contrastive.plan),
    "masked_xattn": (_masked_xattn.PLAN_SHAPES, masked_cross_attention_plan),
    "resampler": (_resampler.PLAN_SHAPES, resampler_attention_plan),
    "sigmoid": ([dict(n=n, d=768, dtype="bf16") for n in (8192, 32768, 65536, 131072, 2**20)], sigmoid_plan),
}


def plans(op: str | None = None) -> list[OpPlan]:
    """The plans of ``op`` (every registered op when None) at its ANCHORS shapes."""
    if op is not None and op not in PLANNERS:
        raise ValueError(f"--op: unknown op {op!r}; planned ops: {', '.join(sorted(PLANNERS))}")
    names = [op] if op is not None else sorted(PLANNERS)
    return [PLANNERS[name][1](**shape) for name in names for shape in PLANNERS[name][0]]


def _gb(x: float) -> str:
    return f"{x / 1e9:.3f}"


def format_plan(plan: OpPlan) -> str:
    low, high = plan.predicted_ms(MATMUL_FLOPS_PER_S, COPY_BYTES_PER_S)
    shape = " ".join(f"{k}={v}" for k, v in plan.shape.items())
    pad = plan.executed_flops / plan.useful_flops - 1 if plan.useful_flops else 0.0
    lines = [
        f"{plan.op} [{shape}] {plan.mode}",
        f"  FLOPs executed {plan.executed_flops / 1e12:.3f} T (useful {plan.useful_flops / 1e12:.3f} T, "
        f"padding {pad:+.1%}; floor {plan.floor_flops / 1e12:.3f} T)",
        f"  HBM bytes {_gb(plan.hbm_bytes)} GB (floor {_gb(plan.floor_bytes)} GB, "
        f"x{plan.hbm_bytes / max(plan.floor_bytes, 1):.2f}); peak extra memory {plan.peak_extra_bytes / 2**20:.0f} MiB",
        f"  launches {plan.num_launches}; predicted {low:.3f}-{high:.3f} ms at "
        f"{MATMUL_FLOPS_PER_S / 1e12:.0f} TFLOP/s and {COPY_BYTES_PER_S / 1e12:.1f} TB/s (prediction)",
    ]
    for launch in plan.launches:
        lines.append(f"    {launch.kernel} x{launch.count}: grid {launch.grid} tiles {launch.tiles} "
                     f"config {launch.config}")
        if launch.evidence:
            lines.append("      sm_90a: " + ", ".join(f"{k} {v}" for k, v in sorted(launch.evidence.items())))
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)


def main(op: str | None, as_json: bool) -> None:
    for plan in plans(op):
        if as_json:
            low, high = plan.predicted_ms(MATMUL_FLOPS_PER_S, COPY_BYTES_PER_S)
            print(json.dumps({**asdict(plan), "executed_flops": plan.executed_flops,
                              "useful_flops": plan.useful_flops, "hbm_bytes": plan.hbm_bytes,
                              "num_launches": plan.num_launches, "predicted_ms": [low, high]}))
        else:
            print(format_plan(plan))
