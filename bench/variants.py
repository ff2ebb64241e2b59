"""How many kernel variants a GPU step compiles, counted on the host from the autotune spaces.

A Triton autotuner tunes once per autotune key it meets (the key arguments plus the dtypes of the
tensor arguments) and compiles every config its pruner keeps for that key; compiled binaries are
cached by their code (kernel, dtype, compile-time flags, config), so a config compiled under one key
is not compiled again under another key that differs only in key-only arguments (size buckets,
sizes). Per step:

    tunings:          the distinct (kernel, dtype, autotune key) met
    full autotuning:  the distinct (kernel, dtype, flags, config) over every config each key keeps
    preferred mode:   the distinct (kernel, dtype, flags, preferred config): one config per key
                      (``VLMCORE_AUTOTUNE=preferred``), the config of the op's launch plan

Kernels without an autotuner (sigmoid, the span table, the column merge) count once per distinct
flags and dtype. Which kernels a call launches, with which flags, comes from the op's own launch
plan (the function its launchers use); the spaces from the kernels' config lists and pruners, read
here without a GPU. Not counted: Triton's specializations of integer arguments (divisible by 16 or
not), which can add a compile where a test uses odd sizes.

A call is a :class:`KernelCall`; :func:`count_variants` counts a list of them (a step).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from unittest import mock

import torch
from vlmcore.kernels._host import next_power_of_2

# By import path: vlmcore.kernels re-exports the ops under their module's name (masked_cross_attention).
contrastive_module = importlib.import_module("vlmcore.kernels.contrastive")
masked_module = importlib.import_module("vlmcore.kernels.masked_cross_attention")
momentum_module = importlib.import_module("vlmcore.kernels.momentum_contrastive")
resampler_module = importlib.import_module("vlmcore.kernels.resampler_attention")
sigmoid_module = importlib.import_module("vlmcore.kernels.sigmoid_contrastive")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class KernelCall:
    """One forward + backward of one op at one shape: ``op`` in :data:`KEY_FUNCTIONS`, ``shape``
    its keyword arguments there (a tuple of pairs, so calls hash), ``dtype`` ``bf16`` / ``fp16`` / ``fp32``."""

    op: str
    shape: tuple
    dtype: str

    @classmethod
    def of(cls, op: str, dtype: str, **shape) -> KernelCall:
        return cls(op, tuple(sorted(shape.items())), dtype)


@dataclass(frozen=True)
class Variant:
    """One launch's compile facts: ``tuning`` its autotune key, ``flags`` its compile-time flags,
    ``preferred`` the config it runs in preferred mode, ``configs`` every config its pruner keeps."""

    kernel: str
    tuning: tuple
    flags: tuple
    preferred: tuple
    configs: tuple


@dataclass
class VariantCount:
    """Compiled variants of a set of calls (see the module docstring for what counts once)."""

    tunings: set = field(default_factory=set)
    preferred_builds: set = field(default_factory=set)
    full_builds: set = field(default_factory=set)

    def add(self, call: KernelCall) -> None:
        for v in KEY_FUNCTIONS[call.op](DTYPES[call.dtype], **dict(call.shape)):
            self.tunings.add((v.kernel, call.dtype, v.tuning))
            self.preferred_builds.add((v.kernel, call.dtype, v.flags, v.preferred))
            self.full_builds.update((v.kernel, call.dtype, v.flags, config) for config in v.configs)

    @property
    def full(self) -> int:
        return len(self.full_builds)

    @property
    def preferred(self) -> int:
        return len(self.preferred_builds)

    def kernels(self) -> set[str]:
        return {kernel for kernel, _dtype, _flags, _config in self.preferred_builds}


def config_id(config) -> tuple:
    """A hashable identity of a ``triton.Config`` or a planned config dict (tiles, warps, stages)."""
    if isinstance(config, dict):
        items = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
        return tuple(sorted(items.items())) + (config.get("num_warps"), config.get("num_stages"))
    return tuple(sorted(config.kwargs.items())) + (config.num_warps, config.num_stages)


def count_variants(calls) -> VariantCount:
    """The variants of every call together (keys met twice compile once)."""
    count = VariantCount()
    for call in calls:
        count.add(call)
    return count


@contextlib.contextmanager
def _cuda_spaces(module) -> Iterator[None]:
    """Let ``module``'s config functions return their CUDA spaces on this (interpreter) host."""
    with mock.patch.object(module, "interpreter_enabled", lambda: False):
        yield


_WARPS = ("num_warps", "num_stages")


def _variant(kernel: str, tuning: tuple, config: dict, tiles: tuple[str, ...], kept=(), flags: tuple = ()) -> Variant:
    """A planned launch's variant: ``config`` its planned (preferred) config, of which ``tiles`` are
    tile sizes and the rest compile-time flags (with ``flags`` added); ``kept`` the pruned autotune
    space (empty: not autotuned, the planned config is the only one)."""
    base = {k: v for k, v in config.items() if k in tiles or k in _WARPS}
    code = tuple(sorted({**{k: v for k, v in config.items() if k not in base}, **dict(flags)}.items()))
    configs = tuple(config_id({**base, **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages})
                    for c in kept) or (config_id(base),)
    return Variant(kernel, tuning, code, config_id(base), configs)


_CONTRASTIVE_TILES = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DO", "BLOCK_K", "BLOCK")


def contrastive_keys(dtype: torch.dtype, n: int, d: int, symmetric: bool = True, accuracy: bool = False,
                     mode: str = "fwd_bwd") -> list[Variant]:
    """The variants of one contrastive-loss call (its plan's launches)."""
    m = contrastive_module
    plan = m.contrastive_plan(n, d, dtype, symmetric=symmetric, accuracy=accuracy, with_cols=symmetric, mode=mode)
    precision = m._precision(dtype)
    choice = m._choose(n, n, d, dtype, symmetric=symmetric, accuracy=accuracy, with_cols=symmetric,
                       interpreter=False)
    spaces = {
        "_contrastive_fwd_kernel": lambda: m._prune(m._fwd_configs(), {
            "d": d, "rows_per_group": choice.rows_per_group, "ACCURACY": accuracy, "PRECISION": precision}),
        "_contrastive_bwd_rows_kernel": lambda: m._prune(m._bwd_configs(), {"d": d, "PRECISION": precision}),
        "_contrastive_bwd_cols_kernel": lambda: m._prune(m._bwd_configs(), {"d": d, "PRECISION": precision}),
        "_contrastive_grad_window_kernel": lambda: m._prune(m._window_configs(), {"d": d}),
        "_contrastive_window_matmul_kernel": lambda: m._prune_matmul(
            m._matmul_configs(), {"K": min(choice.window_rows, choice.window_cols), "PRECISION": precision}),
    }
    tuning = (m._size_bucket(n, n), d, choice.rows_per_group, choice.window_rows, choice.window_cols)
    return [_variant(launch.kernel, tuning + (tuple(sorted(launch.config.items())),), launch.config,
                     _CONTRASTIVE_TILES, spaces[launch.kernel]() if launch.kernel in spaces else ())
            for launch in plan.launches if not launch.kernel.startswith("torch.")]


def sigmoid_keys(dtype: torch.dtype, n: int, d: int) -> list[Variant]:
    """The sigmoid loss has fixed configs per dtype: one variant per kernel and flag set."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    plan = sigmoid_module.sigmoid_contrastive_plan(n, d, name)
    config = {launch.kernel: {k: v for k, v in launch.config.items() if k not in ("window", "side")}
              for launch in plan.launches}
    return [_variant(kernel, (), c, ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_K")) for kernel, c in config.items()]


def momentum_keys(dtype: torch.dtype, b: int, queue: int, e: int, ids: bool = False) -> list[Variant]:
    """Forward and backward kernels of both directions (one key: the same column count); the
    preferred config is the first the pruner keeps."""
    m = momentum_module
    with _cuda_spaces(m):
        space = m._configs()
    block_e = max(16, next_power_of_2(e))
    flags = (("BLOCK_E", block_e), ("PRECISION", m._precision(dtype)), ("HAS_IDS", ids))
    tuning = (next_power_of_2(b + queue),) + flags
    variants = []
    for kernel, prune in (("_momentum_distill_fwd_kernel", m._prune),
                          ("_momentum_distill_bwd_kernel", m._prune_backward)):
        kept = prune(space, {}, BLOCK_E=block_e, HAS_IDS=ids)
        first = {**kept[0].kwargs, "num_warps": kept[0].num_warps, "num_stages": kept[0].num_stages}
        variants.append(_variant(kernel, tuning, first, ("BLOCK_M", "BLOCK_N"), kept, flags))
    return variants


def masked_keys(dtype: torch.dtype, batch: int, length: int, num_media: int, tokens: int, heads: int,
                head_dim: int, mode: str = "immediate") -> list[Variant]:
    """Forward, dQ and kv kernels and the span table, from the op's launch plan."""
    m = masked_module
    block_d = m._block_d(head_dim)
    one_pass = m._one_pass(mode, tokens, m._CUDA_CONFIGS["kv"])
    plan = m.masked_cross_attention_plan(batch, length, num_media, tokens, heads, head_dim, mode, dtype=dtype)
    named = {"q_ptr": torch.empty(0, dtype=dtype), "R": tokens}
    tuned = {"_mxa_fwd_kernel": ("fwd", m._fwd_kernel, False), "_mxa_bwd_dq_kernel": ("dq", m._dq_kernel, False),
             "_mxa_bwd_kv_kernel": ("kv", m._kv_kernel, one_pass)}
    variants = []
    for launch in plan.launches:
        flags = (("IMMEDIATE", mode == "immediate"),)  # the span table's only flag
        kept = ()
        if launch.kernel in tuned:
            name, kernel, passes = tuned[launch.kernel]
            flags += (("HEAD_DIM", head_dim), ("BLOCK_D", block_d), ("ONE_PASS", passes))
            kept = kernel.early_config_prune(m._CUDA_CONFIGS[name], named, BLOCK_D=block_d, ONE_PASS=passes)
        tuning = (next_power_of_2(length), tokens) + flags
        variants.append(_variant(launch.kernel, tuning, launch.config, ("BLOCK_M", "BLOCK_N", "BLOCK_J", "BLOCK_L"),
                                 kept, flags))
    return variants


def resampler_keys(dtype: torch.dtype, batch: int, media: int, latents: int, heads: int, head_dim: int,
                   with_latents: bool = True, with_mask: bool = False, sms: int = 132) -> list[Variant]:
    """Forward and the fused or split backward the plan chooses on an ``sms``-SM GPU (0: fused)."""
    m = resampler_module
    plan = m.resampler_attention_plan(batch, media, latents, heads, head_dim, with_latents=with_latents,
                                      dtype=dtype, sms=sms)
    tuned = {"_resampler_fwd_kernel": m._resampler_fwd_kernel, "_resampler_bwd_dq_kernel": m._resampler_bwd_dq_kernel,
             "_resampler_bwd_dkdv_kernel": m._resampler_bwd_dkdv_kernel,
             "_resampler_bwd_fused_kernel": m._resampler_bwd_fused_kernel}
    block_d = max(16, next_power_of_2(head_dim))
    flags = (("HEAD_DIM", head_dim), ("HAS_LATENTS", with_latents), ("HAS_MASK", with_mask))
    tuning = (latents, next_power_of_2(media)) + flags
    variants = []
    for launch in plan.launches:
        kept = tuned[launch.kernel].early_config_prune(
            m._cuda_key_block_configs(), {"num_media": media, "num_queries": latents},
            BLOCK_D=block_d, HAS_LATENTS=with_latents)
        variants.append(_variant(launch.kernel, tuning, launch.config, ("BLOCK_M", "BLOCK_N"), kept, flags))
    return variants


KEY_FUNCTIONS = {
    "contrastive": contrastive_keys,
    "sigmoid": sigmoid_keys,
    "momentum": momentum_keys,
    "masked": masked_keys,
    "resampler": resampler_keys,
}
