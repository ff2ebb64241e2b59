"""Compile the resampler-attention kernels for an H100 (sm_90a) on a machine without a GPU.

Run as a script with ``TRITON_INTERPRET=0`` (tests/kernels/test_resampler_attention.py does): Triton's
frontend, its GPU passes and the bundled ``ptxas`` turn each kernel into a cubin, so type, layout
or shared-memory errors that the interpreter cannot see fail here. The autotune configs are the
CUDA ones, filtered by the kernels' own pruners. Arguments get the types and specializations of a
launch on contiguous bf16 tensors: 16-aligned pointers, unit head-dim strides specialized to 1, the
other strides multiples of 16 (each is a multiple of Dh in 64, 96, 128), runtime sizes unaligned.

Usage: ``python tests/helpers/compile_checks/resampler_compile_check.py [all]``. By default a representative subset is
compiled (CI time); ``all`` compiles every surviving config of every shape. Prints one JSON line
per variant: ``{"kernel", "head_dim", "latents", "mask", "config", "shared", "spill_bytes",
"wgmma", "mma", "cubin"}`` (``wgmma`` / ``mma``: Hopper / pre-Hopper tensor-core instructions in
the PTX; a 32-row tile is below one warpgroup's 64, so it gets ``mma.sync``).
"""

from __future__ import annotations

import importlib
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from sm90_compile import compile_sm90  # noqa: E402

module = importlib.import_module("vlmcore.kernels.resampler_attention")

FP32_POINTERS = ("lse", "delta")
SCALARS_FP32 = ("qk_scale", "softmax_scale")
SCALARS_I32 = ("num_heads", "num_queries", "num_media", "media_bucket")  # runtime sizes: no divisibility assumed
KERNELS = {
    "fwd": module._resampler_fwd_kernel,
    "dq": module._resampler_bwd_dq_kernel,
    "dkdv": module._resampler_bwd_dkdv_kernel,
    "fused": module._resampler_bwd_fused_kernel,
}


def _signature(fn, constexprs: dict, has_mask: bool) -> tuple[dict, dict]:
    """(signature, attrs) of a bf16 launch; the uint8 mask pointer (or q's bf16 stand-in) and its strides."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in SCALARS_FP32:
            signature[name] = "fp32"
        elif name in SCALARS_I32:
            signature[name] = "i32"
        elif name == "stride_maskb":
            signature[name] = "i32"  # S tokens per sample: any value
        elif name.startswith("stride_"):
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = ("*fp32" if name in FP32_POINTERS
                               else "*u8" if name == "media_mask" and has_mask else "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _unit_strides(fn, has_mask: bool) -> dict:
    """The head-dim strides (and a contiguous mask's token stride) that a launch specializes to 1."""
    unit = {name: 1 for name in fn.arg_names if name.startswith("stride_") and name.endswith("d")}
    if has_mask:
        unit["stride_maskn"] = 1
    return unit


# H100 / H200 per SM: 64K registers, 228 KB shared memory (1 KB reserved per CTA), 2048 threads.
REGISTERS_PER_SM, SHARED_PER_SM, THREADS_PER_SM = 65536, 233472, 2048


def ctas_per_sm(registers: int, num_warps: int, shared: int) -> int:
    """Resident CTAs per SM allowed by registers (allocated per warp in units of 256), shared memory, threads."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(REGISTERS_PER_SM // (per_warp * num_warps), SHARED_PER_SM // (shared + 1024),
               THREADS_PER_SM // (32 * num_warps), 32)


def compile_variant(name: str, config: triton.Config, head_dim: int, latents: bool, mask: bool,
                    block_m: int = 64) -> dict:
    """Compile one variant to an sm_90a cubin; shared memory, registers, ptxas spill bytes, CTAs per SM,
    tensor-core ops. ``block_m``: the query tile (64 for R = 64 latents, 32 for a 32-query Q-Former)."""
    fn = KERNELS[name].fn
    constexprs = dict(HAS_LATENTS=latents, HAS_MASK=mask, HEAD_DIM=head_dim, PRECISION="tf32",
                      BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                      **config.kwargs, **_unit_strides(fn, mask))
    signature, attrs = _signature(fn, constexprs, mask)
    build = compile_sm90(fn, signature, constexprs, attrs, config.num_warps, config.num_stages)
    ptx = build.ptx
    registers = build.registers
    config_dict = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return {"kernel": name, "head_dim": head_dim, "latents": latents, "mask": mask, "block_m": block_m,
            "config": config_dict,
            "preferred": config_dict == module.planned_config(name, head_dim, 257, block_m, latents),
            "registers": registers, "ctas_per_sm": ctas_per_sm(registers, config.num_warps, build.shared),
            "shared": build.shared, "spill_bytes": build.spill_bytes,
            "wgmma": ptx.count("wgmma.mma_async"), "mma": ptx.count("mma.sync.aligned"),
            "cubin": build.cubin_bytes}


def surviving_configs(name: str, head_dim: int) -> list[triton.Config]:
    """The CUDA autotune configs that the kernel's own pruner keeps for this head dim (S = 257, R = 64)."""
    tuned = KERNELS[name]
    block_d = max(16, triton.next_power_of_2(head_dim))
    return tuned.early_config_prune(tuned.configs, {"num_media": 257, "num_queries": 64}, BLOCK_D=block_d,
                                    HAS_LATENTS=True)


def preferred_config(name: str, head_dim: int, latents: bool, queries: int) -> triton.Config:
    """The config the plan assumes (:func:`planned_config`, S = 257)."""
    preferred = dict(module.planned_config(name, head_dim, 257, queries, latents))
    return triton.Config({"BLOCK_N": preferred.pop("BLOCK_N")}, **preferred)


def _size(config: triton.Config) -> tuple:
    """Register and shared-memory pressure: key tile per warp, then pipeline depth, then key tile."""
    return config.kwargs["BLOCK_N"] / config.num_warps, config.num_stages, config.kwargs["BLOCK_N"]


def variants(everything: bool):
    """(kernel, config, head_dim, latents, mask).

    ``everything``: every surviving config in the four latents / mask modes at Dh 64 and 128, and at
    Dh 96 (padded to 128) with and without latents. Default subset, per kernel: at Dh 64 and 128
    the heaviest surviving config of each warp count (4 warps in the masked Q-Former mode, 8 warps
    in the masked Perceiver mode) and the first surviving config in a dense mode; at Dh 96 the
    heaviest config in the masked Perceiver mode.
    """
    for name in KERNELS:
        for head_dim in (64, 128):
            kept = surviving_configs(name, head_dim)
            if everything:
                for latents in (True, False):
                    for mask in (False, True):
                        for config in kept:
                            yield name, config, head_dim, latents, mask
                continue
            for warps in sorted({c.num_warps for c in kept}):
                heaviest = max((c for c in kept if c.num_warps == warps), key=_size)
                yield name, heaviest, head_dim, warps >= 8, True
            yield name, kept[0], head_dim, head_dim == 64, False
        kept = surviving_configs(name, 96)
        for latents in ((True, False) if everything else (True,)):
            for config in (kept if everything else [max(kept, key=_size)]):
                yield name, config, 96, latents, True


def preferred_variants():
    """Each kernel's preferred config at Dh 64 and 128: Perceiver form (R = 64 latents, masked) and
    Q-Former form (no latents, 32 queries: a 32-row query tile, below one warpgroup's 64); and its one
    config under ``VLMCORE_AUTOTUNE=preferred`` (``PREFERRED_MODE_CONFIGS``) at Dh 64 where that differs."""
    for name in KERNELS:
        for head_dim in (64, 128):
            yield name, preferred_config(name, head_dim, True, 64), head_dim, True, True, 64
            yield name, preferred_config(name, head_dim, False, 32), head_dim, False, False, 32
        one_config = module.PREFERRED_MODE_CONFIGS[name]
        if one_config != preferred_config(name, 64, True, 64):
            yield name, one_config, 64, True, True, 64


if __name__ == "__main__":
    everything = sys.argv[1:] == ["all"]
    for variant in variants(everything):
        print(json.dumps(compile_variant(*variant)), flush=True)
    for variant in preferred_variants():
        print(json.dumps(compile_variant(*variant)), flush=True)
    sys.exit(0)
