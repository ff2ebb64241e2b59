"""Compile every contrastive kernel variant for an H100 (sm_90a) on a machine without a GPU.

Run as a script with ``TRITON_INTERPRET=0`` (tests/kernels/test_contrastive.py does): Triton's frontend,
its GPU passes and the bundled ``ptxas`` turn each kernel into a cubin, so type or layout errors
that the interpreter cannot see fail here. Arguments get the 16-divisibility a real launch with
d = 768 and aligned tensors gets. Prints one JSON line per variant:
``{"kernel", "config", "dtype", "spill_bytes", "wgmma", "shared", "registers", "ctas_per_sm"}``
(registers per thread from ``ptxas -v``; resident CTAs per SM from registers, shared memory and warps
at the sm_90 limits below). ``--write-evidence FILE`` also stores the rows as the compile evidence
that ``python -m vlmcore.bench plan`` joins to the launch plan.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
import vlmcore.kernels.contrastive as module  # noqa: E402
from sm90_compile import compile_sm90  # noqa: E402

DIVISIBLE = {"d", "stride_a", "stride_b", "stride_da", "stride_db", "n_rows", "n_cols", "rows_per_group", "row_tile",
             "win_rows", "win_cols", "row0", "col0", "size_bucket", "M", "N", "K", "stride_xm", "stride_xk",
             "stride_y", "stride_rows", "stride_ds"}
INTS = DIVISIBLE | {"label_offset", "n_groups"}


# sm_90 (H100 / H200) per-SM limits: register file, shared memory, resident threads and blocks.
SM90_REGISTERS, SM90_SHARED, SM90_THREADS, SM90_BLOCKS = 65536, 228 * 1024, 2048, 32
SM90_SHARED_RESERVED_PER_CTA = 1024  # the driver keeps 1 KB of shared memory per resident block


def ctas_per_sm(registers: int, shared: int, num_warps: int) -> int:
    """Resident CTAs per SM on sm_90 given ptxas' registers per thread, shared bytes and warps.

    Registers are allocated per warp in units of 256 (so per thread in units of 8); the SM holds
    at most 64 warps (2048 threads) and 32 blocks.
    """
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_registers = (SM90_REGISTERS // regs_per_warp) // num_warps
    by_shared = SM90_SHARED // (shared + SM90_SHARED_RESERVED_PER_CTA)
    by_threads = SM90_THREADS // (32 * num_warps)
    return min(by_registers, by_shared, by_threads, SM90_BLOCKS)


def _types(fn, dtype: str) -> dict[str, str]:
    """Argument types: feature / gradient pointers in ``dtype``, int32 argmax pointers, fp32 otherwise."""
    types = {}
    for name in fn.arg_names:
        if name in INTS:
            types[name] = "i32"
        elif name == "smoothing":
            types[name] = "fp32"
        elif name in ("p_a", "p_b", "p_da", "p_db", "p_g", "p_x", "p_y", "p_out", "p_rows"):
            types[name] = f"*{dtype}"
        elif name.endswith("_arg"):
            types[name] = "*i32"
        elif name.startswith("p_"):
            types[name] = "*fp32"
    return types


def compile_variant(fn, dtype: str, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    types = _types(fn, dtype)
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in constexprs and (types[name].startswith("*") or name in DIVISIBLE)}
    build = compile_sm90(fn, signature, constexprs, attrs, num_warps, num_stages)
    ptx = build.ptx
    registers, shared = build.registers, build.shared
    return {"kernel": fn.__name__, "dtype": dtype, "config": {**constexprs, "num_warps": num_warps,
            "num_stages": num_stages}, "spill_bytes": build.spill_bytes,
            "wgmma": ptx.count("wgmma.mma_async"), "shared": shared, "registers": registers,
            "ctas_per_sm": ctas_per_sm(registers, shared, num_warps)}


def _fwd_kernel_variants(dtype: str, precision: str, every_config: bool):
    """The forward's pruned space per mode (key d = 768, 128-row groups: every n >= 32768; 64-row
    groups keep a subset of it)."""
    for col_stats, accuracy in ((True, False), (True, True), (False, True), (False, False)):
        named = {"d": 768, "row_tile": module._row_tile(128 if col_stats else 0), "ACCURACY": accuracy,
                 "PRECISION": precision}
        kept = module._prune(module._fwd_configs(), named)
        for config in kept if every_config else kept[:1]:
            yield (module._contrastive_fwd_kernel, dtype,
                   dict(COL_STATS=col_stats, ACCURACY=accuracy, PRECISION=precision, **config.kwargs),
                   config.num_warps, config.num_stages)


def variants(every_config_dtypes=("bf16", "fp32")):
    """(kernel, dtype, constexprs, warps, stages): every config of every pruned space, in each mode
    that changes the code, for the dtypes in ``every_config_dtypes``; the preferred (first) config
    of each space for the others (fp16 compiles like bf16)."""
    for dtype in ("bf16", "fp16", "fp32"):
        precision = "ieee" if dtype == "fp32" else "tf32"
        every = dtype in every_config_dtypes
        yield from _fwd_kernel_variants(dtype, precision, every)
        kept = module._prune(module._bwd_configs(), {"d": 768, "PRECISION": precision})
        for config in kept if every else kept[:1]:
            for kernel in (module._contrastive_bwd_rows_kernel, module._contrastive_bwd_cols_kernel):
                for symmetric in (True, False):
                    yield (kernel, dtype, dict(SYMMETRIC=symmetric, PRECISION=precision, **config.kwargs),
                           config.num_warps, config.num_stages)
        torch_dtype = module.torch.float32 if dtype == "fp32" else module.torch.bfloat16
        block = module._window_block(torch_dtype, interpreter=False)
        kept = module._prune(module._window_configs(), {"d": 768})
        for config in kept if every else kept[:1]:
            for symmetric in (True, False):
                yield (module._contrastive_grad_window_kernel, dtype,
                       dict(SYMMETRIC=symmetric, PRECISION=precision, BLOCK_M=block, BLOCK_N=block,
                            **config.kwargs), config.num_warps, config.num_stages)
        kept = module._prune_matmul(module._matmul_configs(), {"K": 4096, "PRECISION": precision})
        block_n = module._matmul_block_n(False, torch_dtype)
        # the row product's last step (accumulator read, logit-scale partials) and the column
        # product's middle and last steps: the modes with the most live values
        for config in kept if every else kept[:1]:
            for trans_x, first, last, write_ds in ((False, False, True, True), (True, False, False, False),
                                                   (True, False, True, False)):
                # the unit stride of the G' window is specialized to 1 by the JIT, as at a real launch
                unit = {"stride_xm": 1} if trans_x else {"stride_xk": 1}
                yield (module._contrastive_window_matmul_kernel, dtype,
                       dict(FIRST=first, LAST=last, TRANS_X=trans_x, WRITE_DS=write_ds, PRECISION=precision,
                            BLOCK_N=block_n, **unit, **config.kwargs), config.num_warps, config.num_stages)
    for accuracy in (True, False):
        yield module._contrastive_merge_cols_kernel, "fp32", dict(ACCURACY=accuracy, BLOCK=1024), 4, 1


def write_evidence(rows: list[dict], path: str) -> None:
    """Store the compile rows (bf16 and fp32; fp16 compiles like bf16) for ``bench plan``."""
    evidence = {"target": "sm_90a", "triton": triton.__version__,
                "source": "tests/helpers/compile_checks/contrastive_compile_check.py --write-evidence",
                "rows": [row for row in rows if row["dtype"] != "fp16"]}
    with open(path, "w") as handle:
        json.dump(evidence, handle, indent=0, sort_keys=True)
        handle.write("\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-evidence", metavar="JSON",
                        help="also write the bf16 / fp32 rows to this file (compile evidence for `bench plan`)")
    args = parser.parse_args(argv)
    rows = []
    for fn, dtype, constexprs, warps, stages in variants():
        row = compile_variant(fn, dtype, constexprs, warps, stages)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.write_evidence:
        write_evidence(rows, args.write_evidence)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
