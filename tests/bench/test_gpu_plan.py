"""The GPU plan of bench/gpu_check.sh, checked without a GPU: two calls that fit, call 1 within
~150 compiled variants in preferred mode while covering every kernel and every GPU-marked test file,
call 2's rows each with a budget; and the variant counts read from the autotune spaces."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from vlmcore.bench import gpu_plan
from vlmcore.bench.__main__ import main
from vlmcore.bench.smoke import SMOKE
from vlmcore.bench.variants import KernelCall, config_id, count_variants, masked_keys, preferred_configs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plan():
    return gpu_plan.plan()


def test_call1_compiles_at_most_150_variants_and_covers_every_kernel(plan):
    one = plan["call1"]
    assert one["variants"]["preferred"] <= 150, one["variants"]
    assert one["variants"]["full"] > 5 * one["variants"]["preferred"]  # why preferred mode exists
    assert not one["kernels_missing"] and set(one["kernels_covered"]) == gpu_plan.all_kernels()
    assert len(gpu_plan.all_kernels()) >= 18  # every *_kernel of the five kernel modules
    assert gpu_plan.fits(plan)


def test_call1_runs_every_gpu_marked_test_file_by_name(plan):
    marked = {str(path.relative_to(REPO)) for path in (REPO / "tests").rglob("test_*.py")
              if re.search(r"pytest\.mark\.gpu\b", path.read_text())}
    files = [entry["file"] for entry in plan["call1"]["test_files"]]
    assert marked <= set(files) and len(files) == len(set(files))
    assert all(entry["known"] for entry in plan["call1"]["test_files"])  # every file's kernel calls are counted
    assert files[0] == "tests/kernels/test_momentum_contrastive.py"  # never GPU-tested kernels first
    masked, contrastive = (files.index(f"tests/kernels/test_{name}.py") for name in ("masked_cross_attention",
                                                                                      "contrastive"))
    assert masked < contrastive
    assert all((REPO / name).exists() for name in files)


def test_call2_rows_each_have_a_budget_and_vlmcore_comes_first(plan):
    two = plan["call2"]
    assert two["bench_budget_s"] > 0 and len(two["rows"]) > 50
    assert all(row["budget_s"] > 0 for row in two["rows"])
    assert abs(sum(row["budget_s"] for row in two["rows"]) - two["bench_budget_s"]) < 1e-6
    contrastive_rows = [row["provider"] for row in two["rows"] if row["op"] == "contrastive"]
    assert contrastive_rows[0] == "vlmcore" and "memeff" in contrastive_rows
    setup = sum(seconds for _, seconds in plan["call1"]["setup"]) + plan["call1"]["tests_seconds"]
    assert setup <= plan["call_seconds"] <= 300


def test_preferred_mode_compiles_one_config_per_key():
    call = KernelCall.of("masked", "bf16", batch=16, length=512, num_media=5, tokens=64, heads=8, head_dim=64)
    count = count_variants([call])
    assert count.preferred == 4 == len(count.tunings)  # fwd, dq, kv, the span table
    assert count.full > count.preferred
    twice = count_variants([call, call])
    assert (twice.preferred, twice.full) == (count.preferred, count.full)
    # a new length bucket re-tunes, but compiles nothing new in preferred mode
    other = KernelCall.of("masked", "bf16", batch=16, length=1024, num_media=5, tokens=64, heads=8, head_dim=64)
    both = count_variants([call, other])
    assert len(both.tunings) > len(count.tunings) and both.preferred == count.preferred


def test_smoke_calls_cover_every_smoke_kernel_and_the_plan_prints(capsys):
    smoke = count_variants(gpu_plan.SMOKE_CALLS)
    assert smoke.kernels() == gpu_plan.all_kernels()
    assert len(SMOKE) >= 5
    assert main(["gpu-plan"]) == 0
    out = capsys.readouterr().out
    assert "call 1 compiles" in out and "not covered: none" in out and "budget" in out
    assert main(["gpu-plan", "--test-files"]) == 0
    assert capsys.readouterr().out.split() == gpu_plan.gpu_test_files()


def test_call1_defers_tests_within_their_files_and_counts_them_apart(plan):
    one = plan["call1"]
    files = [entry["file"] for entry in one["test_files"]]
    deferred = [entry["file"] for entry in one["deferred_tests"]]
    assert deferred == [name for name in files if name in gpu_plan.DEFERRED_TESTS]
    for name, (_select, calls) in gpu_plan.DEFERRED_TESTS.items():
        assert set(calls) <= set(gpu_plan.GPU_TEST_CALLS[name])  # a deferred call is one of the file's
    with_deferred = one["variants"]["preferred"] + sum(entry["new_preferred"] for entry in one["deferred_tests"])
    assert one["variants_with_deferred"]["preferred"] == with_deferred


def test_deferred_selections_pick_only_odd_shape_tests():
    """The ``-k`` expressions of the deferred tests select GPU tests of their files, odd shapes only."""
    for name, (select, _calls) in gpu_plan.DEFERRED_TESTS.items():
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-k", select,
                               "-p", "no:cacheprovider", name], cwd=REPO, capture_output=True, text=True, timeout=300)
        ids = [line for line in proc.stdout.splitlines() if "::" in line]
        assert ids and all("::test_gpu_odd_shapes[" in line for line in ids), proc.stdout[-2000:]


def test_preferred_configs_are_what_each_autotuner_holds_in_preferred_mode():
    table = preferred_configs()
    contrastive = {name for name, precision in table if precision is not None}
    assert {precision for _name, precision in table} == {None, "tf32", "ieee"} and len(contrastive) == 5
    assert len(table) == 2 * 5 + 2 + 3 + 4  # contrastive per precision, momentum, masked, resampler
    momentum, masked, resampler = (importlib.import_module(f"vlmcore.kernels.{name}") for name in (
        "momentum_contrastive", "masked_cross_attention", "resampler_attention"))
    assert config_id(table["_momentum_distill_bwd_kernel", None]) == config_id(momentum.PREFERRED_CONFIG)
    assert config_id(table["_mxa_bwd_kv_kernel", None]) == config_id(masked.PREFERRED_CONFIGS["kv"])
    assert config_id(table["_resampler_bwd_dkdv_kernel", None]) == config_id(resampler.PREFERRED_MODE_CONFIGS["dkdv"])


def test_preferred_mode_compiles_the_preferred_config_and_its_one_pass_flag():
    """Between 64 and 128 tokens per image the full kv space holds a whole image (one-pass backward)
    but the preferred kv config (64 keys) does not: preferred mode compiles the two-pass kernels."""
    variants = masked_keys(torch.bfloat16, batch=2, length=256, num_media=2, tokens=100, heads=2, head_dim=64)
    kv = next(v for v in variants if v.kernel == "_mxa_bwd_kv_kernel")
    assert all(dict(flags)["ONE_PASS"] for flags, _config in kv.full)
    flags, config = kv.preferred
    assert not dict(flags)["ONE_PASS"] and config == config_id(preferred_configs()["_mxa_bwd_kv_kernel", None])
