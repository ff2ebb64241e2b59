"""Compile the momentum-distillation ITC kernels for an H100 (sm_90a) on a machine without a GPU.

Run as a script with ``TRITON_INTERPRET=0`` (tests/kernels/test_momentum_contrastive.py does): Triton's
frontend, its GPU passes and the bundled ``ptxas`` turn each kernel variant into a cubin, so type
or layout errors the interpreter cannot see fail here. Arguments get the 16-divisibility a real
launch with e = 256 and aligned tensors gets. Both specializations of ``HAS_IDS`` are compiled: with
image ids (int64 id pointers) and without (the id / count pointers are ``None``, as the launchers
pass them). Prints one JSON line per variant:
``{"kernel", "config", "dtype", "spill_bytes", "registers", "wgmma", "mma", "shared"}``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import vlmcore.kernels.momentum_contrastive as module  # noqa: E402
from sm90_compile import compile_sm90  # noqa: E402

DIVISIBLE = {"e", "stride_r", "stride_rm", "stride_c", "stride_dr", "n_rows", "n_cols", "size_bucket"}
FEATURE_POINTERS = {"p_rows", "p_rows_m", "p_cols", "p_drows"}
ID_POINTERS = {"p_row_ids", "p_col_ids"}
IDS_ONLY_POINTERS = ID_POINTERS | {"p_count"}  # None without ids


def _types(fn, dtype: str) -> dict[str, str]:
    types = {}
    for name in fn.arg_names:
        if name in DIVISIBLE or name == "label_offset":
            types[name] = "i32"
        elif name == "alpha":
            types[name] = "fp32"
        elif name in FEATURE_POINTERS:
            types[name] = f"*{dtype}"
        elif name in ID_POINTERS:
            types[name] = "*i64"
        elif name.startswith("p_"):
            types[name] = "*fp32"
    return types


def compile_variant(fn, dtype: str, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    fn = getattr(fn, "fn", fn)  # the JITFunction under @triton.autotune
    types = _types(fn, dtype)
    if not constexprs["HAS_IDS"]:
        constexprs = {**constexprs, **{name: None for name in IDS_ONLY_POINTERS if name in fn.arg_names}}
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in constexprs and (types[name].startswith("*") or name in DIVISIBLE)}
    build = compile_sm90(fn, signature, constexprs, attrs, num_warps, num_stages)
    ptx = build.ptx
    tiles = {name: value for name, value in constexprs.items() if name not in IDS_ONLY_POINTERS}
    return {"kernel": fn.__name__, "dtype": dtype, "config": {**tiles, "num_warps": num_warps,
            "num_stages": num_stages}, "spill_bytes": build.spill_bytes, "registers": build.registers,
            "wgmma": ptx.count("wgmma.mma_async"), "mma": ptx.count("mma.sync"), "shared": build.shared}


def variants():
    """bf16 at e = 256 over every autotune config the pruner keeps; fp16 / fp32 (e = 256) and bf16 at
    e = 64 for the preferred config (``PREFERRED_CONFIG``, the one config under
    ``VLMCORE_AUTOTUNE=preferred``); each with and without ids."""
    configs = module._cuda_configs()
    kernels = ((module._momentum_distill_fwd_kernel, module._prune),
               (module._momentum_distill_bwd_kernel, module._prune_backward))
    for dtype, block_e, every in (("bf16", 256, True), ("fp16", 256, False), ("fp32", 256, False),
                                  ("bf16", 64, False)):
        precision = "ieee" if dtype == "fp32" else "tf32"
        for has_ids in (False, True):
            for kernel, prune in kernels:
                kept = prune(configs, {}, BLOCK_E=block_e, HAS_IDS=has_ids)  # what the autotuner keeps
                for config in kept if every else [module.PREFERRED_CONFIG]:
                    yield (kernel, dtype, dict(BLOCK_E=block_e, PRECISION=precision, HAS_IDS=has_ids,
                                               **config.kwargs), config.num_warps, config.num_stages)


if __name__ == "__main__":
    for fn, dtype, constexprs, warps, stages in variants():
        print(json.dumps(compile_variant(fn, dtype, constexprs, warps, stages)), flush=True)
    sys.exit(0)
