"""How much the autotuned kernels tune: their whole CUDA space (default) or only the preferred config.

``VLMCORE_AUTOTUNE`` is read once, when the op modules import (their autotuners are built then):

- ``full`` (default, or unset): every config of a kernel's CUDA space that its pruner keeps is
  compiled and timed once per autotune key, for speed.
- ``preferred``: each autotuner holds exactly ONE config, the kernel's preferred one (the config the
  sm_90 compile checks in tests/helpers/compile_checks/ build offline, chosen so that the kernel's
  own pruner keeps it at every key the launchers use). Nothing is timed and each key compiles one
  variant: for correctness runs on a freshly lent GPU, where compiling whole spaces would take
  most of the time.

Either way the winners are cached on disk (Triton's ``cache_results``, in ``TRITON_CACHE_DIR``), so a
later process with the same kernels, keys and configs skips the tuning. The interpreter (CPU) never
tunes: Triton turns the cache off there and the launchers use one fixed small config.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import triton

ENV_VAR = "VLMCORE_AUTOTUNE"
MODES = ("full", "preferred")


def autotune_mode() -> str:
    """``"full"`` or ``"preferred"`` from ``$VLMCORE_AUTOTUNE`` (unset or empty: ``"full"``)."""
    value = os.environ.get(ENV_VAR, "") or "full"
    if value.lower() not in MODES:
        raise ValueError(f"environment variable {ENV_VAR} must be one of {MODES}, got {value!r}")
    return value.lower()


# Read at import: the autotune spaces below are fixed when the op modules define their kernels.
_MODE = autotune_mode()


def tuning_space(configs: list[triton.Config], preferred: triton.Config) -> list[triton.Config]:
    """``configs`` in ``full`` mode, ``[preferred]`` in ``preferred`` mode; ``preferred`` must be one of
    ``configs`` (so that it is compile-checked with the space)."""
    if preferred not in configs:
        raise ValueError(f"preferred config {preferred} is not in the autotune space")
    return list(configs) if _MODE == "full" else [preferred]


def autotune(configs: list[triton.Config], preferred: triton.Config, key: list[str],
             prune: Callable | None = None, restore: list[str] | None = None):
    """``triton.autotune`` over :func:`tuning_space` keyed on ``key``, pruned by ``prune`` (Triton calls
    the pruner only when several configs remain), ``restore`` restored between timed runs, results
    cached on disk."""
    return triton.autotune(tuning_space(configs, preferred), key=key,
                           prune_configs_by={"early_config_prune": prune} if prune else None,
                           restore_value=restore, cache_results=True)
