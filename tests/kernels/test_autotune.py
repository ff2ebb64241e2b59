"""``VLMCORE_AUTOTUNE`` (kernels/_autotune.py): ``preferred`` leaves every autotuned kernel exactly ONE
config, one its own pruner keeps at every key; the default tunes the whole CUDA space.

The variable is read when the op modules import, so each mode runs in a fresh subprocess, with
``TRITON_INTERPRET=0`` so that the modules build their CUDA spaces (nothing is compiled or launched:
no GPU needed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "helpers" / "compile_checks" / "autotune_spaces.py"
# Every autotuned kernel: contrastive has one autotuner per dot precision (disjoint spaces).
AUTOTUNED = {
    "contrastive": {f"{name}[{precision}]" for name in ("_fwd_tuned", "_bwd_rows_tuned", "_bwd_cols_tuned",
                                                         "_window_tuned", "_matmul_tuned")
                    for precision in ("tf32", "ieee")},
    "momentum_contrastive": {"_momentum_distill_fwd_kernel", "_momentum_distill_bwd_kernel"},
    "masked_cross_attention": {"_fwd_kernel", "_dq_kernel", "_kv_kernel"},
    "resampler_attention": {"_resampler_fwd_kernel", "_resampler_bwd_dq_kernel", "_resampler_bwd_dkdv_kernel",
                            "_resampler_bwd_fused_kernel"},
}


def _report(mode: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "VLMCORE_AUTOTUNE"}
    if mode is not None:
        env["VLMCORE_AUTOTUNE"] = mode
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300,
                          cwd=SCRIPT.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _by_module(report: dict) -> dict[str, dict[str, int]]:
    found: dict[str, dict[str, int]] = {}
    for tuner in report["autotuners"]:
        found.setdefault(tuner["module"], {})[tuner["name"]] = tuner["configs"]
    return found


def test_preferred_mode_leaves_one_config_per_autotuned_kernel_that_its_pruner_keeps():
    report = _report("preferred")
    found = _by_module(report)
    assert {module: set(names) for module, names in found.items()} == AUTOTUNED
    assert all(count == 1 for names in found.values() for count in names.values()), found
    assert report["pruned_away"] == []


def test_full_autotuning_is_the_default():
    found = _by_module(_report(None))
    assert {module: set(names) for module, names in found.items()} == AUTOTUNED
    assert sum(count > 1 for names in found.values() for count in names.values()) >= 17, found


def test_an_unknown_mode_is_refused_naming_the_variable():
    env = dict(os.environ, VLMCORE_AUTOTUNE="fastest")
    proc = subprocess.run([sys.executable, "-c", "import vlmcore.kernels"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=SCRIPT.parent)
    assert proc.returncode != 0
    assert "VLMCORE_AUTOTUNE must be one of ('full', 'preferred'), got 'fastest'" in proc.stderr


@pytest.mark.parametrize("mode", ["", "full", "PREFERRED"])
def test_mode_names(mode, monkeypatch):
    from vlmcore.kernels import _autotune

    monkeypatch.setenv("VLMCORE_AUTOTUNE", mode)
    assert _autotune.autotune_mode() == (mode.lower() or "full")
