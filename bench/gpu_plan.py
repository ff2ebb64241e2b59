"""``python -m vlmcore.bench gpu-plan``: the GPU check as two device calls of at most ~5 minutes each.

A lent device gives 15 minutes in all, start-up and idle included. ``bench/gpu_check.sh`` spends
them in two calls, each bounded by its own clock (``--call 1`` / ``--call 2``):

- **call 1, correctness** (``VLMCORE_AUTOTUNE=preferred``: one config per autotune key): the
  environment, the offline wheels, vlmcore importable, the smoke check of every kernel
  (:mod:`vlmcore.bench.smoke`), then the GPU-marked tests file by file (:func:`gpu_test_files`:
  the kernels that no GPU has verified yet first), ``-v``, per-test timeouts, long tracebacks;
- **call 2, speed** (full autotuning, issued while the machine is warm): the benchmark with its
  time budget split per op and per row (vlmcore rows first, each gated), the plots, the summary.

Everything here is computed on the host, no GPU needed: the steps and their timeouts, the test
files, the benchmark rows with their budgets, and the kernel variants each step compiles
(:mod:`vlmcore.bench.variants`, with and without preferred mode). ``--dry-run`` of the script
prints it (:func:`format_plan`).
"""

from __future__ import annotations

import importlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import blip, blip2, contrastive, masked_xattn, resampler, sigmoid, vilbert
from .harness import RunContext
from .results import CsvWriter
from .variants import KernelCall, count_variants

REPO = Path(__file__).resolve().parent.parent
CALL_SECONDS = 280  # each call's own clock: 20 s under the 5 minutes a device call is given
# GPU test files in the order call 1 runs them: the kernels no GPU has verified first (momentum,
# masked, resampler, sigmoid), the contrastive loss (GPU-tested before), then the models.
TEST_ORDER = (
    "tests/kernels/test_momentum_contrastive.py",
    "tests/kernels/test_masked_cross_attention.py",
    "tests/kernels/test_resampler_attention.py",
    "tests/kernels/test_sigmoid_contrastive.py",
    "tests/kernels/test_contrastive_multi_positive.py",
    "tests/kernels/test_contrastive.py",
    "tests/models/test_flamingo.py",
    "tests/models/test_qformer.py",
    "tests/models/test_blip2_stage1.py",
    "tests/train/test_train_sync.py",
)
# Always run in call 1 even before it holds a GPU-marked test: the momentum op's GPU tests (BLIP's
# shape) are where its fp16 gradients are checked on a card.
REQUIRED_TEST_FILES = ("tests/kernels/test_momentum_contrastive.py",)
PER_TEST_TIMEOUT_S = 60
PER_FILE_TIMEOUT_S = 90  # a file's cap; the script gives it min(this, what is left of the call)
COMPILE_SECONDS = (0.6, 1.6)  # per bf16 variant, measured with Triton 3.6's compiler + ptxas for sm_90a
KERNEL_MODULES = ("contrastive", "masked_cross_attention", "momentum_contrastive", "resampler_attention",
                  "sigmoid_contrastive")


def _calls(op: str, dtypes: tuple[str, ...], shapes: list[dict]) -> list[KernelCall]:
    return [KernelCall.of(op, dtype, **shape) for dtype in dtypes for shape in shapes]


def _masked(length, num_media, tokens, heads, head_dim, batch=2, modes=("immediate", "all_previous")):
    return [dict(batch=batch, length=length, num_media=num_media, tokens=tokens, heads=heads, head_dim=head_dim,
                 mode=mode) for mode in modes]


# More SMs than any GPU test launches backward programs: the resampler plan then picks the split
# backward, as the tests that force it do (``_backward_plan`` patched to "split").
SPLIT_BACKWARD_SMS = 2**20

# The odd shapes of the attention ops' GPU tests (test_gpu_odd_shapes), in every dtype.
_MASKED_ODD_SHAPES = _masked(777, 9, 17, 4, 32, 3) + _masked(777, 9, 17, 4, 96, 3)
_RESAMPLER_ODD_SHAPES = [dict(batch=5, media=131, latents=37, heads=3, head_dim=hd, with_mask=True, sms=sms)
                         for hd in (32, 96, 128) for sms in (0, 132)]  # the fused and the split backward

# The kernel calls of each GPU-marked test file's GPU tests, read from the tests (2026-12-07); model
# tests at their tiny configs (approximate shapes: the counts are what matters). A new GPU test file
# without an entry is reported by the plan (and fails tests/bench/test_gpu_plan.py).
GPU_TEST_CALLS = {
    "tests/kernels/test_momentum_contrastive.py":
        _calls("momentum", ("bf16", "fp16"), [dict(b=256, queue=57600, e=256, ids=ids) for ids in (False, True)]),
    "tests/kernels/test_masked_cross_attention.py":
        _calls("masked", ("bf16",), _masked(512, 5, 64, 8, 64, batch=16) + _masked(4096, 32, 64, 32, 128, batch=4))
        + _calls("masked", ("fp32",), _masked(512, 5, 64, 8, 64, batch=16) + _masked(512, 5, 64, 8, 128, batch=16))
        + _calls("masked", ("fp32", "fp16", "bf16"), _MASKED_ODD_SHAPES),
    "tests/kernels/test_resampler_attention.py":
        _calls("resampler", ("bf16",), [dict(batch=640, media=257, latents=64, heads=8, head_dim=64, with_mask=True),
                                        dict(batch=256, media=1025, latents=64, heads=16, head_dim=64, with_mask=True),
                                        dict(batch=64, media=257, latents=32, heads=12, head_dim=64, with_latents=False,
                                             with_mask=True),
                                        dict(batch=64, media=257, latents=64, heads=8, head_dim=64)])
        + _calls("resampler", ("fp32", "fp16", "bf16"),
                 _RESAMPLER_ODD_SHAPES)
        + _calls("resampler", ("bf16",), [dict(batch=640, media=257, latents=64, heads=8, head_dim=64, with_mask=True,
                                               sms=SPLIT_BACKWARD_SMS),
                                          dict(batch=64, media=257, latents=32, heads=12, head_dim=64,
                                               with_latents=False, with_mask=True, sms=SPLIT_BACKWARD_SMS)])
        + _calls("resampler", ("fp32",), [dict(batch=16, media=257, latents=64, heads=8, head_dim=128, with_mask=True,
                                               sms=SPLIT_BACKWARD_SMS)]),
    "tests/kernels/test_sigmoid_contrastive.py":
        _calls("sigmoid", ("bf16",), [dict(n=n, d=768) for n in (8192, 32768)]
               + [dict(n=4096, d=256, ids=ids) for ids in (False, True)]),  # the CUDA-graph capture
    "tests/kernels/test_contrastive_multi_positive.py": _calls("contrastive", ("bf16",), [dict(n=256, d=64)]),
    "tests/kernels/test_contrastive.py":
        _calls("contrastive", ("bf16", "fp16", "fp32"), [dict(n=4096, d=768, accuracy=True)])
        + _calls("contrastive", ("bf16",), [dict(n=n, d=768) for n in (8192, 32768, 65536)]
                 + [dict(n=256, d=64), dict(n=4096, d=64), dict(n=4096, d=768), dict(n=131072, d=128)])
        + _calls("contrastive", ("bf16", "fp32"), [dict(n=4096, d=256, accuracy=True, max_row_groups=2)]),
    "tests/models/test_flamingo.py":
        _calls("masked", ("bf16",), _masked(64, 2, 8, 2, 64, modes=("immediate",)))
        + _calls("resampler", ("bf16",), [dict(batch=4, media=17, latents=8, heads=2, head_dim=64)]),
    "tests/models/test_qformer.py":
        _calls("resampler", ("bf16",),
               [dict(batch=4, media=257, latents=32, heads=2, head_dim=64, with_latents=False)]),
    "tests/train/test_train_sync.py":  # a tiny two-dataset CLIP run in fp32 (batch 4 each, embed_dim 16)
        _calls("contrastive", ("fp32",), [dict(n=4, d=16)]),
    "tests/models/test_blip2_stage1.py":
        _calls("contrastive", ("fp32",), [dict(n=6, d=32)])
        + _calls("resampler", ("fp32",), [dict(batch=6, media=17, latents=8, heads=2, head_dim=16, with_latents=False,
                                                with_mask=False)]),
}

# GPU tests call 1 defers: run after every other GPU test file, while time is left (``-k`` selects
# them; the first pass runs the file with ``-k "not (...)"``). The fp16 odd shapes of the two
# attention ops: fp16 compiles the same 16-bit tensor-core code as bf16 (run at the anchor and odd
# shapes first) and its numerics are checked on CPU by the interpreter, which cannot check bf16.
# Without deferring them call 1 would compile 165 variants, over its ~150 (bench/NOTES.md).
DEFERRED_TESTS = {
    "tests/kernels/test_masked_cross_attention.py":
        ("test_gpu_odd_shapes and dtype1", _calls("masked", ("fp16",), _MASKED_ODD_SHAPES)),
    "tests/kernels/test_resampler_attention.py":
        ("test_gpu_odd_shapes and dtype1", _calls("resampler", ("fp16",), _RESAMPLER_ODD_SHAPES)),
}

# The smoke check's calls (bench/smoke.py: one bf16 anchor and one fp32 small shape per kernel op).
SMOKE_CALLS = (
    _calls("contrastive", ("bf16",), [dict(n=8192, d=768)]) + _calls("contrastive", ("fp32",), [dict(n=128, d=32)])
    + _calls("sigmoid", ("bf16",), [dict(n=8192, d=768)]) + _calls("sigmoid", ("fp32",), [dict(n=96, d=32)])
    + _calls("momentum", ("bf16",), [dict(b=256, queue=57600, e=256)])
    + _calls("momentum", ("fp32",), [dict(b=32, queue=96, e=32, ids=True)])
    + _calls("masked", ("bf16",), _masked(512, 5, 64, 8, 64, batch=16))
    + _calls("masked", ("fp32",), _masked(48, 3, 16, 2, 32))
    + _calls("resampler", ("bf16",), [dict(batch=640, media=257, latents=64, heads=8, head_dim=64, with_mask=True)])
    + _calls("resampler", ("fp32",), [dict(batch=5, media=131, latents=37, heads=3, head_dim=32, with_mask=True)])
)

# The bench ops in ``python -m vlmcore.bench all`` order, with their cases and providers on a GPU.
_BENCH_OPS = {
    "contrastive": lambda ctx: [(contrastive.OP, contrastive.cases(ctx), contrastive.PROVIDERS)],
    "masked_xattn": lambda ctx: [(masked_xattn.OP, masked_xattn.cases(ctx), masked_xattn.PROVIDERS)],
    "resampler": lambda ctx: [(resampler.OP, resampler.cases(ctx), resampler.PROVIDERS)],
    "e2e": lambda ctx: [],  # two train steps and two batch searches per model: listed by _e2e_rows
    "sigmoid": lambda ctx: [(sigmoid.OP, sigmoid.cases(ctx), sigmoid.PROVIDERS)],
    "vilbert": lambda ctx: [(vilbert.OP, vilbert.cases(ctx), vilbert.PROVIDERS)],
    "blip2": lambda ctx: [(blip2.OP_QFORMER, [blip2.qformer_case(blip2.QFORMER_GPU, ctx)], blip2.QFORMER_PROVIDERS),
                          (blip2.OP_STAGE2, [blip2.stage2_case(blip2.STAGE2_GPU, ctx)], blip2.STAGE2_PROVIDERS)],
    "blip": lambda ctx: [(blip.OP, blip.cases(ctx), blip.PROVIDERS),
                         (blip.OP_IDS, blip.cases(ctx, with_ids=True), blip.PROVIDERS)],
}


@dataclass(frozen=True)
class BenchRow:
    """One (op, provider, shape) of call 2, its modes' rows sharing ``budget_s`` seconds."""

    op: str
    provider: str
    shape: str
    budget_s: float


def bench_rows(budget_s: float) -> list[BenchRow]:
    """Call 2's rows on a GPU, in run order, each with its share of ``budget_s``: the op's share
    (:data:`~vlmcore.bench.harness.BUDGET_SHARES`) split evenly over its (provider, shape) rows."""
    from .harness import BUDGET_SHARES, MODES

    ctx = RunContext(device=torch.device("cuda"), dtype=torch.bfloat16, modes=MODES, writer=CsvWriter(None))
    total_share = sum(BUDGET_SHARES.values())
    rows = []
    for name, groups in _BENCH_OPS.items():
        op_budget = budget_s * BUDGET_SHARES[name] / total_share
        entries = ([(op, p.name, case.shape) for op, cases, providers in groups(ctx) for p in providers
                    for case in cases] if name != "e2e" else _e2e_rows())
        rows += [BenchRow(op, provider, shape, op_budget / len(entries)) for op, provider, shape in entries]
    return rows


def _e2e_rows() -> list[tuple[str, str, str]]:
    return [(op, provider, mode) for op in ("e2e_flamingo", "e2e_clip") for provider in ("vlmcore", "reference")
            for mode in ("train_step", "max_batch")]


def bench_calls() -> list[KernelCall]:
    """The kernel calls of call 2's gated vlmcore rows (module rows: ViLBERT, BLIP-2 and e2e, not counted)."""
    calls = _calls("contrastive", ("bf16",), [dict(n=n, d=contrastive.DIM) for n in contrastive.GPU_SIZES])
    calls += _calls("sigmoid", ("bf16",), [dict(n=n, d=sigmoid.DIM) for n in sigmoid.GPU_SIZES])
    calls += _calls("momentum", ("bf16",), [dict(b=b, queue=q, e=blip.DIM, ids=ids) for b, q in blip.GPU_SHAPES
                                           for ids in (False, True)])
    shapes = masked_xattn.ANCHOR_SHAPES + masked_xattn.ALL_PREVIOUS_SHAPES
    batch, length, _m, tokens, heads, head_dim, attend = masked_xattn.ANCHOR_SHAPES[0]
    shapes += tuple((batch, length, m, tokens, heads, head_dim, attend) for m in masked_xattn.SWEEP_IMAGES)
    calls += _calls("masked", ("bf16",), [dict(zip(("batch", "length", "num_media", "tokens", "heads", "head_dim",
                                                    "mode"), shape)) for shape in shapes])
    calls += _calls("resampler", ("bf16",), [dict(zip(("batch", "media", "latents", "heads", "head_dim",
                                                       "with_latents"), shape)) for shape in resampler.GPU_SHAPES])
    return calls


def all_kernels() -> set[str]:
    """Every ``@triton.jit`` kernel (a ``*_kernel`` function) of vlmcore's kernel modules."""
    names = set()
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"vlmcore.kernels.{module_name}")
        for value in vars(module).values():
            function = value
            while hasattr(function, "fn"):  # Autotuner -> JITFunction -> python function
                function = function.fn
            name = getattr(function, "__name__", "")
            if function is not value and name.endswith("_kernel"):
                names.add(name)
    return names


def gpu_test_files(repo: Path = REPO) -> list[str]:
    """Test files holding a GPU-marked test (and :data:`REQUIRED_TEST_FILES`), in :data:`TEST_ORDER`,
    files not listed there after them by name."""
    marked = {str(path.relative_to(repo)) for path in sorted((repo / "tests").rglob("test_*.py"))
              if re.search(r"pytest\.mark\.gpu\b", path.read_text())}
    found = marked | {name for name in REQUIRED_TEST_FILES if (repo / name).exists()}
    return [name for name in TEST_ORDER if name in found] + sorted(found - set(TEST_ORDER))


# (step, timeout s) of each call before its long step; the long step gets what is left of the call.
CALL1_SETUP = (("env", 15), ("wheels", 30), ("install", 30), ("smoke", 60))
CALL2_SETUP = (("env", 15), ("wheels", 30), ("install", 30))
CALL2_AFTER = (("plot", 45), ("summary", 15))


def plan(call_seconds: int = CALL_SECONDS) -> dict:
    """Both calls: steps with timeouts, test files with their new variants (the deferred tests last),
    bench rows with budgets, and the variants each step compiles (``full`` autotuning / ``preferred``
    mode); call 1's ``variants`` count its first pass, without the deferred tests."""
    files = gpu_test_files()
    seen = count_variants(SMOKE_CALLS)
    smoke = {"preferred": seen.preferred, "full": seen.full}
    tests_left = call_seconds - sum(t for _, t in CALL1_SETUP)

    def run(name: str, calls: list[KernelCall], **entry) -> dict:
        before = (seen.preferred, seen.full)
        for call in calls:
            seen.add(call)
        return {"file": name, **entry, "new_preferred": seen.preferred - before[0], "new_full": seen.full - before[1]}

    per_file = []
    for name in files:
        later = set(DEFERRED_TESTS[name][1]) if name in DEFERRED_TESTS else set()
        first = [call for call in GPU_TEST_CALLS.get(name, []) if call not in later]
        per_file.append(run(name, first, timeout_s=PER_FILE_TIMEOUT_S, known=name in GPU_TEST_CALLS,
                            deferred=DEFERRED_TESTS.get(name, ("",))[0]))
    first_pass = {"preferred": seen.preferred, "full": seen.full, "kernels": seen.kernels()}
    deferred = [run(name, DEFERRED_TESTS[name][1], select=DEFERRED_TESTS[name][0])
                for name in files if name in DEFERRED_TESTS]
    bench = count_variants(bench_calls())
    budget = call_seconds - sum(t for _, t in CALL2_SETUP) - sum(t for _, t in CALL2_AFTER)
    rows = bench_rows(budget)
    return {
        "call_seconds": call_seconds, "per_test_timeout_s": PER_TEST_TIMEOUT_S,
        "call1": {"setup": CALL1_SETUP, "tests_seconds": tests_left, "smoke_variants": smoke, "test_files": per_file,
                  "variants": {"preferred": first_pass["preferred"], "full": first_pass["full"]},
                  "deferred_tests": deferred,
                  "variants_with_deferred": {"preferred": seen.preferred, "full": seen.full},
                  "kernels_covered": sorted(first_pass["kernels"]),
                  "kernels_missing": sorted(all_kernels() - first_pass["kernels"])},
        "call2": {"setup": CALL2_SETUP, "after": CALL2_AFTER, "bench_budget_s": budget,
                  "rows": [row.__dict__ for row in rows],
                  "variants": {"preferred": bench.preferred, "full": bench.full},
                  "compile_s": [round(bench.full * s) for s in COMPILE_SECONDS]},
    }


def format_plan(p: dict) -> str:
    """The plan as text (what ``gpu_check.sh --dry-run`` prints first)."""
    one, two = p["call1"], p["call2"]
    lines = [f"GPU plan: two device calls, each on its own {p['call_seconds']} s clock (start them with "
             f"timeout_s=300; about 4 minutes stay for start-up and a rerun)",
             "", "call 1: correctness, VLMCORE_AUTOTUNE=preferred (one config per autotune key)"]
    lines += [f"  {name:<9} timeout {seconds:>3} s" for name, seconds in one["setup"]]
    lines.append(f"  smoke: every kernel, bf16 anchor + fp32 small vs the fp32 reference: "
                 f"{one['smoke_variants']['preferred']} variants (full autotuning: {one['smoke_variants']['full']})")
    lines.append(f"  GPU tests, file by file (-m gpu -v --tb=long, {p['per_test_timeout_s']} s per test, each file "
                 f"min({PER_FILE_TIMEOUT_S} s, what is left)), {one['tests_seconds']} s in all:")
    for entry in one["test_files"]:
        known = "" if entry["known"] else "  (NOT IN GPU_TEST_CALLS: variants unknown)"
        later = f"  (deferred: {entry['deferred']})" if entry["deferred"] else ""
        lines.append(f"    {entry['file']:<52} +{entry['new_preferred']:>3} variants "
                     f"(full autotuning: +{entry['new_full']}){known}{later}")
    lines.append(f"  call 1 compiles {one['variants']['preferred']} variants in preferred mode "
                 f"(full autotuning would compile {one['variants']['full']})")
    lines.append("  then, while time is left, the deferred GPU tests (-k), file by file:")
    for entry in one["deferred_tests"]:
        lines.append(f"    {entry['file']:<52} +{entry['new_preferred']:>3} variants "
                     f"(full autotuning: +{entry['new_full']})  -k '{entry['select']}'")
    lines.append(f"  with them call 1 compiles {one['variants_with_deferred']['preferred']} variants "
                 f"(full autotuning: {one['variants_with_deferred']['full']})")
    missing = ", ".join(one["kernels_missing"]) or "none"
    lines.append(f"  kernels covered: {len(one['kernels_covered'])}; not covered: {missing}")
    lines += ["", "call 2: speed, full autotuning (issue it while the machine is still warm)"]
    lines += [f"  {name:<9} timeout {seconds:>3} s" for name, seconds in two["setup"]]
    lines.append(f"  bench: {two['bench_budget_s']} s for {len(two['rows'])} rows (x modes), vlmcore first, "
                 f"each gated; {two['variants']['full']} variants with full autotuning "
                 f"({two['variants']['preferred']} keys) for the gated vlmcore op rows")
    low, high = two["compile_s"]
    lines.append(f"  compiling them takes {low}-{high} s at {COMPILE_SECONDS[0]}-{COMPILE_SECONDS[1]} s each: "
                 + ("inside the bench budget" if high <= two["bench_budget_s"] else
                    "more than the bench budget can hold: the rows at the end (peers of the later ops) "
                    "will be written as 'skipped'; the deadline is checked after each warm-up"))
    for row in two["rows"]:
        lines.append(f"    {row['op']:<15} {row['provider']:<16} {row['shape']:<52} budget {row['budget_s']:5.1f} s")
    lines += [f"  {name:<9} timeout {seconds:>3} s" for name, seconds in two["after"]]
    return "\n".join(lines)


def main(as_json: bool = False, test_files: bool = False, deferred_tests: bool = False) -> None:
    """Print the plan (as JSON), or only the GPU test files in run order, or only the deferred tests
    (``file<TAB>-k expression`` per line, in run order)."""
    if test_files:
        print("\n".join(gpu_test_files()))
    elif deferred_tests:
        print("\n".join(f"{name}\t{DEFERRED_TESTS[name][0]}" for name in gpu_test_files() if name in DEFERRED_TESTS))
    elif as_json:
        print(json.dumps(plan()))
    else:
        print(format_plan(plan()))


def fits(p: dict) -> bool:
    """Whether the plan keeps to its targets: call 1 <= 150 variants in preferred mode, every kernel
    and every GPU test file covered, every bench row with a positive budget."""
    one, two = p["call1"], p["call2"]
    return (one["variants"]["preferred"] <= 150 and not one["kernels_missing"]
            and all(entry["known"] for entry in one["test_files"])
            and all(row["budget_s"] > 0 and math.isfinite(row["budget_s"]) for row in two["rows"]))
