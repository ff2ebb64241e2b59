"""Compile the masked cross-attention kernels for an H100 (sm_90a) on a machine without a GPU.

Run as a script with ``TRITON_INTERPRET=0`` (tests/kernels/test_masked_cross_attention.py does): Triton's
frontend, its GPU passes and the bundled ``ptxas`` turn each kernel into a cubin, so type, layout
or shared-memory errors that the interpreter cannot see fail here, and ptxas reports registers and
spills. The autotune configs are the CUDA ones, filtered by the kernels' own pruners. Arguments get
the types and specializations of a launch on bf16 tensors: 16-aligned pointers, unit head-dim
strides specialized to 1, the other strides multiples of 16, runtime sizes unaligned.

Usage: ``python tests/helpers/compile_checks/masked_compile_check.py [all]``. By default: each kernel's preferred config
(``PREFERRED_CONFIGS``, the one the plan assumes) at Dh 64 and 128 and the heaviest surviving kv
configs (see :func:`variants`), ``immediate`` mode; ``all`` compiles every surviving config of
every kernel at Dh 64 and 128 (kv in both forms; bench/results/masked_sm90_compile_all.jsonl).
Prints one JSON line per variant: ``{"kernel", "head_dim", "one_pass", "config", "preferred",
"registers", "spill_bytes",
"shared", "ctas_per_sm", "wgmma", "mma"}``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
from sm90_compile import compile_sm90  # noqa: E402

mxa = importlib.import_module("vlmcore.kernels.masked_cross_attention")

POINTERS = {"idx_ptr": "*i64", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "span_ptr": "*i32"}
SCALARS_FP32 = ("qk_scale_log2", "sm_scale")
KERNELS = {"fwd": mxa._fwd_kernel, "dq": mxa._dq_kernel, "kv": mxa._kv_kernel}
# H100 / H200 per SM: 64K registers, 228 KB shared memory (1 KB reserved per CTA), 2048 threads.
REGISTERS_PER_SM, SHARED_PER_SM, THREADS_PER_SM = 65536, 233472, 2048


def ctas_per_sm(registers: int, num_warps: int, shared: int) -> int:
    """Resident CTAs per SM allowed by registers (allocated per warp in units of 256), shared memory, threads."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = REGISTERS_PER_SM // (per_warp * num_warps)
    by_shared = SHARED_PER_SM // (shared + 1024)
    return min(by_registers, by_shared, THREADS_PER_SM // (32 * num_warps), 32)


def compile_variant(name: str, config: dict, head_dim: int, one_pass: bool) -> dict:
    """Compile one variant to an sm_90a cubin; registers, spills, shared memory, CTAs/SM, tensor-core ops."""
    fn = KERNELS[name].fn
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=mxa._block_d(head_dim), IMMEDIATE=True,
                      DOT_PRECISION="tf32", BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"])
    if "ONE_PASS" in fn.arg_names:
        constexprs["ONE_PASS"] = one_pass
    constexprs.update({n: 1 for n in fn.arg_names if n.startswith("stride_") and n.endswith("d")})
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = POINTERS.get(arg, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg.startswith("stride_"):
            signature[arg] = "i32"
            if arg != "stride_ib":  # L per sample: any value
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "fp32" if arg in SCALARS_FP32 else "i32"
    build = compile_sm90(fn, signature, constexprs, attrs, config["num_warps"], config["num_stages"])
    ptx = build.ptx
    registers, shared = build.registers, build.shared
    return {"kernel": name, "head_dim": head_dim, "one_pass": one_pass, "config": config,
            "preferred": config == mxa.PREFERRED_CONFIGS[name], "registers": registers,
            "spill_bytes": build.spill_bytes, "shared": shared,
            "ctas_per_sm": ctas_per_sm(registers, config["num_warps"], shared),
            "wgmma": ptx.count("wgmma.mma_async"), "mma": ptx.count("mma.sync.aligned")}


def surviving_configs(name: str, head_dim: int, one_pass: bool) -> list[dict]:
    """The CUDA autotune configs that the kernel's own pruner keeps (bf16, R = 64)."""
    tuned = KERNELS[name]
    kept = tuned.early_config_prune(tuned.configs, {"q_ptr": torch.empty(0, dtype=torch.bfloat16), "R": 64},
                                    BLOCK_D=mxa._block_d(head_dim), ONE_PASS=one_pass)
    return [mxa._config_dict(c) for c in kept]


def _weight(config: dict) -> tuple:
    """Register pressure: tile area per warp, then pipeline depth."""
    return config["BLOCK_M"] * config["BLOCK_N"] / config["num_warps"], config["num_stages"]


def variants(everything: bool):
    """(kernel, config, head_dim, one_pass). The kv kernel in both forms (one-pass for monotone
    ``immediate`` samples, dK/dV only otherwise); the dQ kernel compiled with its one-pass branch.
    Default: every preferred config at Dh 64 and 128, and the heaviest surviving kv config (both
    forms) at Dh 64, the form that had spilled before the pruner counted pipelined tiles."""
    forms = (("fwd", False), ("dq", True), ("kv", True), ("kv", False))
    for head_dim in (64, 128):
        for name, one_pass in forms:
            kept = surviving_configs(name, head_dim, one_pass)
            if everything:
                for config in kept:
                    yield name, config, head_dim, one_pass
                continue
            preferred = mxa.PREFERRED_CONFIGS[name]
            yield name, preferred, head_dim, one_pass
            heaviest = max(kept, key=_weight)
            if name == "kv" and head_dim == 64 and heaviest != preferred:
                yield name, heaviest, head_dim, one_pass


if __name__ == "__main__":
    everything = sys.argv[1:] == ["all"]
    for variant in variants(everything):
        print(json.dumps(compile_variant(*variant)), flush=True)
    sys.exit(0)
