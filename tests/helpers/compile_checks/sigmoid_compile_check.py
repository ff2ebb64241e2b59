"""Compile every SigLIP kernel variant for an H100 (sm_90a) on a machine without a GPU.

Run as a script with ``TRITON_INTERPRET=0`` (tests/kernels/test_sigmoid_contrastive.py does): Triton's
frontend, its GPU passes and the bundled ``ptxas`` turn each kernel, in its preferred config (the
table the launchers and ``sigmoid_contrastive_plan`` read), into a cubin. Arguments get the
16-divisibility a real launch with d = 768 and aligned tensors gets. Prints one JSON line per
variant: ``{"kernel", "config", "dtype", "registers", "spill_bytes", "wgmma", "shared"}``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import vlmcore.kernels.sigmoid_contrastive as module  # noqa: E402
from sm90_compile import compile_sm90  # noqa: E402

DIVISIBLE = {"row0", "win_rows", "col0", "win_cols", "d", "stride_x", "stride_y", "stride_g", "M", "N", "K",
             "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm"}
INTS = DIVISIBLE | {"positive_offset"}
# strides that are 1 in a launch (the transposed operand of a product): typed i32, not divisible
UNIT_STRIDES = {("text", "stride_am"), ("text", "stride_bn"), ("image", "stride_ak"), ("image", "stride_bn")}


def _types(fn, dtype: str) -> dict[str, str]:
    types = {}
    for name in fn.arg_names:
        if name in INTS:
            types[name] = "i32"
        elif name in ("p_x", "p_y", "p_g", "p_a", "p_b"):
            types[name] = f"*{dtype}"
        elif name in ("p_xid", "p_yid"):
            types[name] = "*i64"
        elif name.startswith("p_"):
            types[name] = "*fp32"
    return types


def compile_variant(fn, dtype: str, constexprs: dict, num_warps: int, num_stages: int, side: str = "") -> dict:
    types = _types(fn, dtype)
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in constexprs and (types[name].startswith("*") or name in DIVISIBLE)
             and (side, name) not in UNIT_STRIDES}
    build = compile_sm90(fn, signature, constexprs, attrs, num_warps, num_stages)
    ptx = build.ptx
    return {"kernel": fn.__name__, "dtype": dtype, "side": side,
            "config": {**constexprs, "num_warps": num_warps, "num_stages": num_stages},
            "registers": build.registers,
            "spill_bytes": build.spill_bytes,
            "wgmma": ptx.count("wgmma.mma_async"), "shared": build.shared}


def variants():
    """(kernel, dtype, constexprs, warps, stages, side) of every launch mode, in the preferred configs."""
    for dtype in ("bf16", "fp16", "fp32"):
        key = module._config_key(dtype, "cuda")
        precision = "ieee" if dtype == "fp32" else "tf32"
        cfg = module._SCORES_CONFIG[key]
        blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
        positives_modes = (module.POSITIVES_NONE, module.POSITIVES_DIAGONAL, module.POSITIVES_IDS)
        for positives in positives_modes:
            for write_g in ((True, False) if positives == module.POSITIVES_DIAGONAL else (True,)):
                yield (module._sigmoid_scores_kernel, dtype,
                       dict(POSITIVES=positives, WRITE_G=write_g, PRECISION=precision, **blocks),
                       cfg["num_warps"], cfg["num_stages"], "")
        cfg = module._MATMUL_CONFIG[key]
        blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
        for side in ("image", "text"):
            yield (module._window_matmul_kernel, dtype, dict(PRECISION=precision, **blocks),
                   cfg["num_warps"], cfg["num_stages"], side)


if __name__ == "__main__":
    for fn, dtype, constexprs, warps, stages, side in variants():
        print(json.dumps(compile_variant(fn, dtype, constexprs, warps, stages, side)), flush=True)
    sys.exit(0)
