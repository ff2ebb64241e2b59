"""Compile every contrastive kernel variant for an H100 (sm_90a) on a machine without a GPU.

Run as a script with ``TRITON_INTERPRET=0`` (tests/test_contrastive.py does): Triton's frontend,
its GPU passes and the bundled ``ptxas`` turn each kernel into a cubin, so type or layout errors
that the interpreter cannot see fail here. Arguments get the 16-divisibility a real launch with
d = 768 and aligned tensors gets. Prints one JSON line per variant:
``{"kernel", "config", "dtype", "spill_bytes", "wgmma", "shared"}``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
import vlmcore.kernels.contrastive as module  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
DIVISIBLE = {"d", "stride_a", "stride_b", "stride_da", "stride_db", "n_rows", "n_cols", "rows_per_group",
             "win_rows", "win_cols", "row0", "col0", "size_bucket"}
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
        elif name in ("p_a", "p_b", "p_da", "p_db", "p_g"):
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
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET,
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    report = subprocess.run([PTXAS, "--gpu-name", "sm_90a", "-v", handle.name, "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
    os.unlink(handle.name)
    spills = re.search(r"(\d+) bytes spill stores", report)
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    shared = kernel.metadata.shared
    return {"kernel": fn.__name__, "dtype": dtype, "config": {**constexprs, "num_warps": num_warps,
            "num_stages": num_stages}, "spill_bytes": int(spills.group(1)) if spills else 0,
            "wgmma": ptx.count("wgmma.mma_async"), "shared": shared, "registers": registers,
            "ctas_per_sm": ctas_per_sm(registers, shared, num_warps)}


def variants():
    """(kernel, dtype, constexprs, warps, stages): in bf16 every autotune config (all constexpr modes
    for the first config, the training mode for the others); in fp16 / fp32 the first config."""
    for dtype in ("bf16", "fp16", "fp32"):
        precision = "ieee" if dtype == "fp32" else "tf32"
        count = None if dtype == "bf16" else 1
        for i, config in enumerate(module._fwd_configs()[:count]):
            modes = ((True, False), (True, True), (False, True), (False, False)) if i == 0 else ((True, False),)
            for col_stats, accuracy in modes:
                yield (module._contrastive_fwd_kernel, dtype,
                       dict(COL_STATS=col_stats, ACCURACY=accuracy, PRECISION=precision, **config.kwargs),
                       config.num_warps, config.num_stages)
        for i, config in enumerate(module._bwd_configs()[:count]):
            for kernel in (module._contrastive_bwd_rows_kernel, module._contrastive_bwd_cols_kernel):
                for symmetric in ((True, False) if i == 0 else (True,)):
                    yield (kernel, dtype, dict(SYMMETRIC=symmetric, PRECISION=precision, **config.kwargs),
                           config.num_warps, config.num_stages)
        block = module._window_block(module.torch.float32 if dtype == "fp32" else module.torch.bfloat16)
        for i, config in enumerate(module._window_configs()[:count]):
            for symmetric, write_ds in (((True, True), (False, False)) if i == 0 else ((True, True),)):
                yield (module._contrastive_grad_window_kernel, dtype,
                       dict(SYMMETRIC=symmetric, WRITE_DS=write_ds, PRECISION=precision, BLOCK_M=block,
                            BLOCK_N=block, **config.kwargs), config.num_warps, config.num_stages)
    for accuracy in (True, False):
        yield module._contrastive_merge_cols_kernel, "fp32", dict(ACCURACY=accuracy, BLOCK=1024), 4, 1


if __name__ == "__main__":
    for fn, dtype, constexprs, warps, stages in variants():
        print(json.dumps(compile_variant(fn, dtype, constexprs, warps, stages)), flush=True)
    sys.exit(0)
