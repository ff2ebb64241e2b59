"""How many kernel variants a GPU step compiles, counted on the host from the autotune spaces.

A Triton autotuner tunes once per autotune key it meets (the key arguments plus the dtypes of the
tensor arguments) and compiles every config its pruner keeps for that key; compiled binaries are
cached by their code (kernel, dtype, compile-time flags, config), so a config compiled under one key
is not compiled again under another key that differs only in key-only arguments (size buckets,
sizes). Per step:

    tunings:          the distinct (kernel, dtype, autotune key) met
    full autotuning:  the distinct (kernel, dtype, flags, config) over every config each key keeps
    preferred mode:   the distinct (kernel, dtype, flags, preferred config): one config per key
                      (``VLMCORE_AUTOTUNE=preferred``), the one config ``kernels/_autotune.py``'s
                      ``tuning_space`` leaves the kernel's autotuner (Triton runs no pruner then)

Kernels without an autotuner (sigmoid, the span table, the column merge) count once per distinct
flags and dtype. Which kernels a call launches, with which flags, comes from the op's own launch
plan (the function its launchers use); the full spaces from the kernels' CUDA config lists and
pruners, read here without a GPU; the preferred configs from the autotuners themselves, as a
process in preferred mode builds them (:func:`preferred_configs`). Not counted: Triton's
specializations of integer arguments (divisible by 16 or not), which can add a compile where a test
uses odd sizes.

A call is a :class:`KernelCall`; :func:`count_variants` counts a list of them (a step).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from unittest import mock

import torch
import triton
from vlmcore.kernels import _autotune
from vlmcore.kernels._host import next_power_of_2

# By import path: vlmcore.kernels re-exports the ops under their module's name (masked_cross_attention).
contrastive_module = importlib.import_module("vlmcore.kernels.contrastive")
masked_module = importlib.import_module("vlmcore.kernels.masked_cross_attention")
momentum_module = importlib.import_module("vlmcore.kernels.momentum_contrastive")
resampler_module = importlib.import_module("vlmcore.kernels.resampler_attention")
sigmoid_module = importlib.import_module("vlmcore.kernels.sigmoid_contrastive")
KERNEL_MODULES = (contrastive_module, masked_module, momentum_module, resampler_module, sigmoid_module)

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
    """One launch's compile facts: ``tuning`` its autotune key; ``full`` the (flags, config) of every
    config its pruner keeps; ``preferred`` the (flags, config) it compiles in preferred mode."""

    kernel: str
    tuning: tuple
    full: tuple
    preferred: tuple


@dataclass
class VariantCount:
    """Compiled variants of a set of calls (see the module docstring for what counts once)."""

    tunings: set = field(default_factory=set)
    preferred_builds: set = field(default_factory=set)
    full_builds: set = field(default_factory=set)

    def add(self, call: KernelCall) -> None:
        for v in KEY_FUNCTIONS[call.op](DTYPES[call.dtype], **dict(call.shape)):
            self.tunings.add((v.kernel, call.dtype, v.tuning))
            self.preferred_builds.add((v.kernel, call.dtype, *v.preferred))
            self.full_builds.update((v.kernel, call.dtype, *build) for build in v.full)

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


def _autotuner_configs() -> list[dict]:
    """Every autotuner of the kernel modules as this process built them, at a module's top level or
    in a top-level dict keyed by dot precision: ``{"kernel", "precision" (the dict key or None),
    "configs": [[kwargs, num_warps, num_stages], ...]}``."""
    found = []
    for module in KERNEL_MODULES:
        for value in vars(module).values():
            for precision, tuner in value.items() if isinstance(value, dict) else [(None, value)]:
                if isinstance(tuner, triton.runtime.Autotuner):
                    found.append({"kernel": tuner.base_fn.__name__, "precision": precision,
                                  "configs": [[c.kwargs, c.num_warps, c.num_stages] for c in tuner.configs]})
    return found


@functools.cache
def preferred_configs() -> dict[tuple[str, str | None], triton.Config]:
    """``{(kernel, precision or None): config}``: the one config each autotuner holds under
    ``VLMCORE_AUTOTUNE=preferred``, exactly what ``_autotune.tuning_space`` kept.

    The mode is read when the kernel modules import, so a fresh process imports them in preferred
    mode with ``TRITON_INTERPRET=0`` (their CUDA spaces; nothing is compiled, no GPU needed) and
    reports its autotuners (:func:`_autotuner_configs`)."""
    env = {**os.environ, _autotune.ENV_VAR: "preferred", "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", __name__], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"reading the preferred-mode autotuners failed:\n{proc.stderr[-4000:]}")
    table = {}
    for tuner in json.loads(proc.stdout.splitlines()[-1]):
        if len(tuner["configs"]) != 1:
            raise RuntimeError(f"{tuner['kernel']} holds {len(tuner['configs'])} configs in preferred mode, not one")
        (kwargs, num_warps, num_stages), = tuner["configs"]
        table[tuner["kernel"], tuner["precision"]] = triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)
    return table


_WARPS = ("num_warps", "num_stages")


def _variant(kernel: str, tuning: tuple, config: dict, tiles: tuple[str, ...], kept=(),
             preferred: triton.Config | None = None, flags: tuple = (), preferred_flags: tuple | None = None
             ) -> Variant:
    """A planned launch's variant: ``config`` its planned config, of which ``tiles`` (and warps,
    stages) are tile sizes and the rest compile-time flags (with ``flags`` added). ``kept`` the
    pruned autotune space and ``preferred`` the autotuner's one config in preferred mode (both
    unset: not autotuned, the planned config is the only one); their keys override the planned
    tiles. ``preferred_flags``: the flags in preferred mode where they differ."""
    base = {k: v for k, v in config.items() if k in tiles or k in _WARPS}
    code = tuple(sorted({**{k: v for k, v in config.items() if k not in base}, **dict(flags)}.items()))
    preferred_code = code if preferred_flags is None else tuple(
        sorted({**dict(code), **dict(preferred_flags)}.items()))

    def build(c: triton.Config) -> tuple:
        return config_id({**base, **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages})

    full = tuple((code, build(c)) for c in kept) or ((code, config_id(base)),)
    return Variant(kernel, tuning, full, (preferred_code, build(preferred) if preferred else config_id(base)))


_CONTRASTIVE_TILES = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DO", "BLOCK_K", "BLOCK")


def contrastive_keys(dtype: torch.dtype, n: int, d: int, symmetric: bool = True, accuracy: bool = False,
                     mode: str = "fwd_bwd", max_row_groups: int | None = None) -> list[Variant]:
    """The variants of one contrastive-loss call (its plan's launches); the autotuners are per dot
    precision, read from each launch's ``PRECISION`` flag. ``max_row_groups``: the cap on the
    forward's row groups where a test sets one (None: the module's)."""
    m = contrastive_module
    cap = m.MAX_ROW_GROUPS if max_row_groups is None else max_row_groups
    with mock.patch.object(m, "MAX_ROW_GROUPS", cap):
        plan = m.contrastive_plan(n, d, dtype, symmetric=symmetric, accuracy=accuracy, with_cols=symmetric,
                                  mode=mode)
        choice = m._choose(n, n, d, dtype, symmetric=symmetric, accuracy=accuracy, with_cols=symmetric,
                           interpreter=False)
    row_tile = m._row_tile(choice.rows_per_group)
    spaces = {
        "_contrastive_fwd_kernel": lambda p: m._prune(m._fwd_configs(p), {
            "d": d, "row_tile": row_tile, "ACCURACY": accuracy, "PRECISION": p}),
        "_contrastive_bwd_rows_kernel": lambda p: m._prune(m._bwd_configs(p), {"d": d, "PRECISION": p}),
        "_contrastive_bwd_cols_kernel": lambda p: m._prune(m._bwd_configs(p), {"d": d, "PRECISION": p}),
        "_contrastive_grad_window_kernel": lambda p: m._prune(m._window_configs(), {"d": d, "PRECISION": p}),
        "_contrastive_window_matmul_kernel": lambda p: m._prune_matmul(
            m._matmul_configs(p), {"K": min(choice.window_rows, choice.window_cols), "PRECISION": p}),
    }
    tuning = (m._size_bucket(n, n), d, choice.window_rows, choice.window_cols)
    variants = []
    for launch in plan.launches:
        if launch.kernel.startswith("torch."):
            continue
        # the forward's key holds the row-tile class of its groups (the other keys no group size)
        key = tuning + ((row_tile,) if launch.kernel == "_contrastive_fwd_kernel" else ())
        precision = launch.config.get("PRECISION")
        tuned = launch.kernel in spaces
        variants.append(_variant(launch.kernel, key + (tuple(sorted(launch.config.items())),), launch.config,
                                 _CONTRASTIVE_TILES, spaces[launch.kernel](precision) if tuned else (),
                                 preferred_configs()[launch.kernel, precision] if tuned else None))
    return variants


def sigmoid_keys(dtype: torch.dtype, n: int, d: int, ids: bool = False) -> list[Variant]:
    """The sigmoid loss has fixed configs per dtype: one variant per kernel and flag set. The scores
    kernel's positives (the diagonal, or pairs of equal group ids with ``ids``) are compile-time."""
    m = sigmoid_module
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    plan = m.sigmoid_contrastive_plan(n, d, name)
    config = {launch.kernel: {k: v for k, v in launch.config.items() if k not in ("window", "side")}
              for launch in plan.launches}
    positives = (("POSITIVES", m.POSITIVES_IDS if ids else m.POSITIVES_DIAGONAL),)
    return [_variant(kernel, (), c, ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_K"),
                     flags=positives if kernel == "_sigmoid_scores_kernel" else ())
            for kernel, c in config.items()]


def momentum_keys(dtype: torch.dtype, b: int, queue: int, e: int, ids: bool = False) -> list[Variant]:
    """Forward and backward kernels of both directions (one key: the same column count), keyed and
    flagged by the launchers' own ``_meta`` (meta tensors: nothing allocated)."""
    m = momentum_module
    rows = torch.empty(b, e, dtype=dtype, device="meta")
    cols = torch.empty(b + queue, e, dtype=dtype, device="meta")
    meta = m._meta(rows, cols, torch.empty(b, dtype=torch.int64, device="meta") if ids else None)
    flags = tuple(sorted((k, v) for k, v in meta.items() if k != "size_bucket"))
    tuning = tuple(sorted(meta.items()))
    variants = []
    for kernel, prune in (("_momentum_distill_fwd_kernel", m._prune),
                          ("_momentum_distill_bwd_kernel", m._prune_backward)):
        kept = prune(m._cuda_configs(), {}, **meta)
        variants.append(_variant(kernel, tuning, {}, ("BLOCK_M", "BLOCK_N"), kept,
                                 preferred_configs()[kernel, None], flags))
    return variants


def masked_keys(dtype: torch.dtype, batch: int, length: int, num_media: int, tokens: int, heads: int,
                head_dim: int, mode: str = "immediate") -> list[Variant]:
    """Forward, dQ and kv kernels and the span table, from the op's launch plan. The one-pass
    backward needs a kv config holding a whole image, so its flag can differ in preferred mode."""
    m = masked_module
    block_d = m._block_d(head_dim)
    one_pass = m._one_pass(mode, tokens, m._CUDA_CONFIGS["kv"])
    preferred_kv = preferred_configs()["_mxa_bwd_kv_kernel", None]
    plan = m.masked_cross_attention_plan(batch, length, num_media, tokens, heads, head_dim, mode, dtype=dtype)
    named = {"q_ptr": torch.empty(0, dtype=dtype), "R": tokens}
    passes = (one_pass, m._one_pass(mode, tokens, [preferred_kv]))  # full, preferred: both backward kernels
    tuned = {"_mxa_fwd_kernel": ("fwd", m._fwd_kernel, (False, False)),
             "_mxa_bwd_dq_kernel": ("dq", m._dq_kernel, passes), "_mxa_bwd_kv_kernel": ("kv", m._kv_kernel, passes)}
    variants = []
    for launch in plan.launches:
        flags = (("IMMEDIATE", mode == "immediate"),)  # the span table's only flag
        kept, preferred, preferred_flags = (), None, None
        if launch.kernel in tuned:
            name, kernel, (full_pass, preferred_pass) = tuned[launch.kernel]
            flags += (("HEAD_DIM", head_dim), ("BLOCK_D", block_d), ("ONE_PASS", full_pass))
            preferred_flags = (("ONE_PASS", preferred_pass),)
            kept = kernel.early_config_prune(m._CUDA_CONFIGS[name], named, BLOCK_D=block_d, ONE_PASS=full_pass)
            preferred = preferred_configs()[launch.kernel, None]
        tuning = (next_power_of_2(length), tokens) + flags
        variants.append(_variant(launch.kernel, tuning, launch.config, ("BLOCK_M", "BLOCK_N", "BLOCK_J", "BLOCK_L"),
                                 kept, preferred, flags, preferred_flags))
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
        variants.append(_variant(launch.kernel, tuning, launch.config, ("BLOCK_M", "BLOCK_N"), kept,
                                 preferred_configs()[launch.kernel, None], flags))
    return variants


KEY_FUNCTIONS = {
    "contrastive": contrastive_keys,
    "sigmoid": sigmoid_keys,
    "momentum": momentum_keys,
    "masked": masked_keys,
    "resampler": resampler_keys,
}


if __name__ == "__main__":  # the preferred-mode process of preferred_configs()
    print(json.dumps(_autotuner_configs()))
