"""The benchmark suite itself: CLI, CSV format, providers' correctness, harness rules, plots, GPU check.

The whole ``python -m vlmcore.bench all --quick`` runs once (CPU: references in PyTorch, vlmcore's
kernels in the Triton interpreter); the other tests read its CSV or call pieces in-process.
"""

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import assert_close
from vlmcore.bench import contrastive, e2e, masked_xattn, resampler
from vlmcore.bench import providers as peers
from vlmcore.bench.__main__ import main
from vlmcore.bench.harness import Case, Gate, Provider, RunContext, Unavailable, run_op
from vlmcore.bench.plot import plot_results
from vlmcore.bench.results import COLUMNS, CsvWriter, make_row, read_rows, summary_table
from vlmcore.kernels.reference import (
    contrastive_loss_reference,
    masked_cross_attention_reference,
    resampler_attention_reference,
)

REPO = Path(__file__).resolve().parents[2]
OPS = {"contrastive": contrastive, "masked_xattn": masked_xattn, "resampler": resampler}
MODES = ("fwd", "bwd", "fwd_bwd")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("VLMCORE_BACKEND", None)
    return env


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``bench/gpu_check.sh --dry-run OUTDIR``, which runs ``python -m vlmcore.bench all --quick --out
    OUTDIR/bench.csv`` as a user does, then the plots (CLI) and the summary: one run serves all tests."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(_env(), PYTHON=sys.executable)
    env.pop("BENCH_COMMAND", None)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", str(out)],
                          cwd=out, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " -m vlmcore.bench all --out " + str(out / "bench.csv") + " --quick" in proc.stdout
    return out / "bench.csv", proc.stdout


@pytest.fixture(scope="module")
def rows(quick_run):
    return read_rows(quick_run[0])


def test_quick_run_writes_the_columns(quick_run):
    with open(quick_run[0], newline="") as handle:
        header = next(csv.reader(handle))
    assert tuple(header) == COLUMNS
    for column in ("op", "provider", "shape", "mode", "ms_p50", "ms_p20", "ms_p80", "peak_mib", "tflops", "gbps",
                   "device", "torch", "triton", "commit", "date"):
        assert column in header


def test_quick_run_has_a_row_per_op_provider_shape_mode(rows):
    for op, module in OPS.items():
        shapes = {r["shape"] for r in rows if r["op"] == op}
        assert len(shapes) >= 2, op
        for provider in module.PROVIDERS:
            for shape in shapes:
                got = sorted(r["mode"] for r in rows if r["op"] == op and r["provider"] == provider.name
                             and r["shape"] == shape)
                assert got == sorted(MODES), (op, provider.name, shape, got)


def test_quick_run_statuses(rows):
    allowed = {"ok", "unavailable", "unsupported"}
    assert {r["status"] for r in rows} <= allowed, [(r["op"], r["provider"], r["notes"]) for r in rows
                                                     if r["status"] not in allowed]
    for row in rows:
        assert row["device"] == "cpu" and row["torch"] == torch.__version__ and row["triton"] and row["date"]
        assert row["commit"]
        if row["status"] != "ok":
            assert row["notes"], row  # a reason, never a silent gap
        if row["op"] in OPS and row["provider"] in ("vlmcore", "reference", "sdpa"):
            assert row["status"] == "ok", row
            assert 0 < row["ms_p20"] <= row["ms_p50"] <= row["ms_p80"], row
            assert row["tflops"] > 0 and row["gbps"] > 0 and row["frac_matmul"] > 0 and row["frac_copy"] > 0
            assert math.isnan(row["peak_mib"])  # no allocator statistics on CPU
    # peers that cannot run on CPU say why
    by_provider = {(r["op"], r["provider"]): r for r in rows if r["status"] == "unavailable"}
    inf_cl_reason = by_provider[("contrastive", "inf_cl")]["notes"]
    assert "CUDA" in inf_cl_reason or "inf_cl not importable" in inf_cl_reason
    assert "CUDA" in by_provider[("masked_xattn", "flash_attn")]["notes"]
    assert "xformers" in by_provider[("masked_xattn", "xformers")]["notes"]
    assert "CPU" in by_provider[("masked_xattn", "flex_attention")]["notes"]


def test_quick_run_ceilings_and_e2e(rows, quick_run):
    ceilings = {r["mode"]: r for r in rows if r["op"] == "ceiling"}
    assert ceilings["matmul"]["status"] == "ok" and ceilings["matmul"]["tflops"] > 0
    assert ceilings["copy"]["status"] == "ok" and ceilings["copy"]["gbps"] > 0
    for op, unit in (("e2e_flamingo", "tokens/s"), ("e2e_clip", "samples/s")):
        for provider in ("vlmcore", "reference"):
            (row,) = [r for r in rows if r["op"] == op and r["provider"] == provider and r["mode"] == "train_step"]
            assert row["status"] == "ok", row
            assert row["unit"] == unit and row["throughput"] > 0 and row["ms_p50"] > 0
    assert "vs peers" in quick_run[1]  # the summary table closes the run


def _logs(out: Path) -> Path:
    """Where gpu_check.sh keeps the logs and PNGs it packs into OUTDIR/gpu_check.tgz."""
    return out.parent / (out.name + ".logs")


def test_plots_of_the_quick_run(quick_run):
    """The script's plot step (``python -m vlmcore.bench plot``) drew one speed-up PNG per op and the e2e one."""
    out = _logs(quick_run[0].parent)
    pngs = {p.name for p in out.glob("*.png")}
    assert {"speedup_contrastive_cpu.png", "speedup_masked_xattn_cpu.png", "speedup_resampler_cpu.png",
            "e2e_cpu.png"} <= pngs
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert "memory_contrastive_cpu.png" not in pngs  # no memory figures on CPU: nothing to draw


def _contrastive_gpu_rows():
    """Rows shaped like a GPU run, with memory and an OOM (fields as a real run writes them)."""
    rows = []
    for n, ours_mib, ref_mib, ref_status in ((8192, 40.0, 1100.0, "ok"), (32768, 160.0, 17600.0, "ok"),
                                             (65536, 320.0, math.nan, "oom")):
        for provider, mib, status, ms in (("vlmcore", ours_mib, "ok", 1.0), ("reference", ref_mib, ref_status, 3.5)):
            fields = {"x": n, "peak_mib": mib, "notes": "synthetic"}
            if status == "ok":
                fields.update(ms_p50=ms * n / 8192, ms_p20=ms, ms_p80=ms)
            row = make_row("contrastive", provider, f"n={n} d=768", "fwd_bwd", status, dtype="bf16", **fields)
            row["device"] = "NVIDIA H100 80GB HBM3"
            rows.append(row)
    return rows


def test_memory_plot_and_summary_with_gpu_like_rows(tmp_path):
    path = tmp_path / "gpu.csv"
    writer = CsvWriter(path)
    for row in _contrastive_gpu_rows():
        writer.write(row)
    written = {p.name for p in plot_results(path, tmp_path)}
    assert {"memory_contrastive_nvidia-h100-80gb-hbm3.png", "speedup_contrastive_nvidia-h100-80gb-hbm3.png"} <= written
    table = summary_table(read_rows(path))
    assert "reference 3.5x" in table and "reference oom" in table


def test_summary_command(quick_run, capsys):
    assert main(["summary", "--results", str(quick_run[0])]) == 0
    out = capsys.readouterr().out
    assert "ceiling" in out and "masked_xattn" in out and "e2e_flamingo" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bogus"], "invalid choice"),
        ([], "required"),
        (["contrastive", "--modes", "fwd,sideways"], "unknown mode(s) sideways"),
        (["contrastive", "--modes", ","], "unknown mode(s)"),
        (["contrastive", "--dtype", "bf16"], "bf16 on CPU"),
        (["contrastive", "--dtype", "fp8"], "invalid choice"),
        (["contrastive", "--time-budget", "-1"], "must be > 0"),
        (["contrastive", "--time-budget", "soon"], "expected a number of seconds"),
        (["plot", "--results", "/nonexistent/results.csv"], "does not exist"),
        (["summary", "--results", "/nonexistent"], "does not exist"),
    ],
)
def test_bad_arguments_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_device_without_cuda_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["contrastive", "--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_out_refuses_a_foreign_csv_and_a_directory(tmp_path, capsys):
    foreign = tmp_path / "other.csv"
    foreign.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit):
        main(["ceilings", "--out", str(foreign)])
    assert "different header" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ceilings", "--out", str(tmp_path)])
    assert "must be a file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["plot", "--results", str(tmp_path / "empty")])
    assert "no .csv results" in capsys.readouterr().err


def test_out_appends(tmp_path):
    out = tmp_path / "r.csv"
    assert main(["ceilings", "--out", str(out)]) == 0
    assert main(["ceilings", "--out", str(out)]) == 0
    assert len(read_rows(out)) == 4


# ----------------------------------------------------------------------------- floors (ANCHORS.md)

def test_contrastive_floor_matches_anchors():
    flops, nbytes = contrastive.floors(32768, 768, 2)
    assert flops["fwd_bwd"] == pytest.approx(6.6e12, rel=0.01)  # "6.6 TFLOP" at n = 32768, d = 768
    assert flops["fwd_bwd"] / 807e12 * 1e3 == pytest.approx(8.2, rel=0.02)  # "8.2 ms at 807 TFLOP/s"
    assert nbytes["fwd_bwd"] == 4 * 32768 * 768 * 2


def test_masked_xattn_floor_counts_useful_pairs_only():
    index = masked_xattn.media_index_layout(4, 4096, 32)
    flops, nbytes = masked_xattn.floors(index, 32, 64, 32, 128, "immediate", 2)
    pairs = 4 * 4096 * 64 * 32
    assert flops["fwd"] == 4 * pairs * 128 and flops["fwd_bwd"] == 14 * pairs * 128
    q_bytes, k_bytes = 4 * 4096 * 32 * 128 * 2, 4 * 32 * 64 * 32 * 128 * 2
    assert nbytes["fwd_bwd"] == 4 * (q_bytes + k_bytes)
    # all_previous: token with image j attends (j + 1) images
    small = torch.tensor([[-1, 0, 0, 1, 2]])
    flops_prev, _ = masked_xattn.floors(small, 3, 4, 1, 16, "all_previous", 2)
    assert flops_prev["fwd"] == 4 * 16 * 4 * (0 + 1 + 1 + 2 + 3)


def test_resampler_floor():
    flops, _ = resampler.floors(640, 257, 64, 8, 64, True, 2)
    assert flops["fwd"] == 4 * 640 * 8 * 64 * (257 + 64) * 64
    flops_q, _ = resampler.floors(256, 257, 32, 12, 64, False, 2)
    assert flops_q["fwd"] == 4 * 256 * 12 * 32 * 257 * 64


# ----------------------------------------------------------------------------- providers compute the op

def _ctx(**kwargs):
    defaults = dict(device=torch.device("cpu"), dtype=torch.float32, modes=MODES, writer=CsvWriter(None), quick=True,
                    echo=lambda line: None)
    defaults.update(kwargs)
    return RunContext(**defaults)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_masked_xattn_sdpa_and_flex_mask_match_reference():
    from torch.nn.attention.flex_attention import flex_attention

    ctx = _ctx()
    for attend in ("immediate", "all_previous"):
        case = masked_xattn.make_case(2, 40, 3, 8, 2, 16, attend, ctx)
        inputs = case.make_inputs()
        q, k, v, index = inputs["q"], inputs["k"], inputs["v"], inputs["media_index"]
        expected = masked_cross_attention_reference(q, k, v, index, 8, mode=attend)
        assert_close(masked_xattn._sdpa(case, inputs)(), expected)
        mask = masked_xattn.block_mask(case, inputs)
        # FlexAttention has no CPU backward (inputs must not require grad); its mask is what is checked here
        q, k, v = (t.detach().transpose(1, 2) for t in (q, k, v))
        got = flex_attention(q, k, v, block_mask=mask)
        assert_close(got.transpose(1, 2), expected)


def _segment_attention(q, k, v, cu_q, cu_k, max_q, max_k):
    """A plain varlen attention (what FlashAttention varlen computes), for checking the packing."""
    out = torch.zeros_like(q)
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if qe > qs:
            out[qs:qe] = F.scaled_dot_product_attention(
                q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1), v[ks:ke].transpose(0, 1)).transpose(0, 1)
    return out


def test_masked_xattn_varlen_packing_matches_reference(monkeypatch):
    """Segments per (sample, image), tokens before the first image gathered out and zero-filled back."""
    monkeypatch.setattr(peers, "load_varlen", lambda: ("plain", _segment_attention))
    case = masked_xattn.make_case(2, 30, 3, 8, 2, 16, "immediate", _ctx())
    inputs = case.make_inputs()
    inputs["media_index"] = torch.tensor([[-1] * 4 + [0] * 10 + [1] * 6 + [2] * 10,
                                          [-1] * 12 + [0] * 18])  # sample 1 uses one of its 3 images
    expected = masked_cross_attention_reference(inputs["q"], inputs["k"], inputs["v"], inputs["media_index"], 8)
    got = masked_xattn._varlen(case, inputs)()
    assert_close(got, expected)
    got.sum().backward()
    assert inputs["q"].grad[0, :4].abs().max() == 0 and inputs["k"].grad[1, 8:].abs().max() == 0


def test_resampler_sdpa_matches_reference():
    ctx = _ctx()
    for with_latents in (True, False):
        case = resampler.make_case(3, 21, 16, 2, 32, with_latents, ctx)
        inputs = case.make_inputs()
        expected = resampler_attention_reference(*resampler._args(inputs))
        assert_close(resampler._sdpa(case, inputs)(), expected)


def test_inf_cl_provider_is_the_symmetric_loss(monkeypatch):
    def one_direction(q, k, labels=None, scale=None, head_dim=256):  # Inf-CL's math: mean CE of q k^T
        return F.cross_entropy(q @ k.T, torch.arange(q.shape[0])).mean()

    monkeypatch.setattr(peers, "load_inf_cl", lambda: one_direction)
    case = contrastive.make_case(48, 32, _ctx())
    inputs = case.make_inputs()
    got = contrastive._inf_cl(case, inputs)()
    expected = contrastive_loss_reference(inputs["image"], inputs["text"], inputs["scale"])
    assert_close(got, expected)
    got.backward()
    assert inputs["scale"].grad is not None and torch.isfinite(inputs["scale"].grad)


# ----------------------------------------------------------------------------- harness rules

def _tiny_case():
    def make_inputs():
        return {"x": torch.randn(8, 8, requires_grad=True)}

    return Case("n=8", 8, make_inputs, {m: 1e6 for m in MODES}, {m: 1e3 for m in MODES})


def test_oom_error_unavailable_and_budget_become_rows():
    def oom(case, inputs):
        def fn():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return fn

    def broken(case, inputs):
        return lambda: inputs["x"].reshape(3, -1)

    def missing(device):
        raise Unavailable("not installed here")

    providers = [Provider("fine", lambda case, inputs: lambda: inputs["x"].exp()), Provider("oomer", oom),
                 Provider("broken", broken), Provider("absent", lambda case, inputs: None, check=missing)]
    ctx = _ctx()
    run_op("toy", [_tiny_case()], providers, ctx)
    status = {(r["provider"], r["mode"]): r for r in ctx.rows}
    assert len(ctx.rows) == 4 * 3
    assert all(status[("fine", m)]["status"] == "ok" for m in MODES)
    assert all(status[("oomer", m)]["status"] == "oom" and "out of memory" in status[("oomer", m)]["notes"]
               for m in MODES)
    assert all(status[("broken", m)]["status"] == "error" and "RuntimeError" in status[("broken", m)]["notes"]
               for m in MODES)
    assert all(status[("absent", m)]["status"] == "unavailable"
               and status[("absent", m)]["notes"] == "not installed here" for m in MODES)
    spent = _ctx(deadline=0.0)
    run_op("toy", [_tiny_case()], providers[:1], spent)
    assert [r["status"] for r in spent.rows] == ["skipped"] * 3


def test_make_row_rejects_unknown_fields():
    with pytest.raises(ValueError, match="status"):
        make_row("op", "p", "s", "fwd", "fine")
    with pytest.raises(ValueError, match="unknown result columns"):
        make_row("op", "p", "s", "fwd", "ok", speed=1.0)


def test_largest_batch_search():
    """Doubling then bisection finds the largest batch whose step fits, within 1/16, in few probes."""
    model = torch.nn.Linear(4, 1)
    seen = []

    def loss_fn(model, inputs):
        seen.append(inputs["batch"])
        if inputs["batch"] > 37:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return model(torch.ones(inputs["batch"], 4)).sum()

    def make_inputs(batch):
        return {"batch": batch}

    cpu = torch.device("cpu")
    batch, note = e2e.largest_batch(model, loss_fn, make_inputs, 4, 1024, cpu, deadline=math.inf)
    assert 35 <= batch <= 37 and "OOM at" in note and len(seen) <= e2e.MAX_BATCH_PROBES
    assert e2e.largest_batch(model, loss_fn, make_inputs, 4, 16, cpu, math.inf) == (16, "fits at the cap 16")
    batch, note = e2e.largest_batch(model, loss_fn, make_inputs, 4, 1024, cpu, deadline=0.0)
    assert batch == 0 and "lower bound" in note


def test_e2e_reports_missing_models(monkeypatch):
    monkeypatch.setattr(e2e, "_models_missing", lambda: "vlmcore has no Flamingo in this checkout")
    ctx = _ctx()
    e2e.run(ctx)
    assert {(r["op"], r["provider"], r["status"]) for r in ctx.rows} == {
        (op, p, "unavailable") for op in ("e2e_flamingo", "e2e_clip") for p in ("vlmcore", "reference")}
    assert all("no Flamingo" in r["notes"] for r in ctx.rows)


# ----------------------------------------------------------------------------- the GPU check script

def test_gpu_check_script_parses_and_rejects_bad_usage(tmp_path):
    script = REPO / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    bad = subprocess.run(["bash", str(script), "--fast", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --fast" in bad.stderr
    assert subprocess.run(["bash", str(script)], capture_output=True).returncode == 2


def test_gpu_check_dry_run_outputs(quick_run):
    """Logs, CSV, PNGs and the summary land in OUTDIR; the summary table is printed last."""
    out = quick_run[0].parent
    for name in ("bench.log", "env.log", "install.log", "plot.log"):
        assert (_logs(out) / name).exists(), name
    for name in ("steps.tsv", "summary.txt"):
        assert (out / name).exists(), name
    steps = dict(line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines())
    assert steps["bench"] == "ok" and steps["plot"] == "ok" and steps["install"] == "ok"
    assert steps["tests_gpu"] == "skipped"  # dry run: no tests, no installs
    stdout = quick_run[1].rstrip()
    assert stdout.endswith(f"logs, bench.csv, PNGs: {out}")
    assert stdout.index("DRY RUN") < stdout.index("vs peers") < stdout.index("e2e_clip", stdout.index("vs peers"))
    assert (out / "summary.txt").read_text().strip() == stdout[stdout.index("=" * 20):].strip()


def test_gpu_check_dry_run_prints_the_plan_and_keeps_outdir_small(quick_run):
    """The plan (steps, test files, rows, variants) comes first; OUTDIR holds at most 8 files, the
    logs and PNGs travel in one archive."""
    import tarfile

    out, stdout = quick_run[0].parent, quick_run[1]
    assert stdout.index("call 1 compiles") < stdout.index("call 2: speed") < stdout.index("=" * 20)
    assert "tests/kernels/test_masked_cross_attention.py" in stdout and "budget" in stdout
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"gpu_check.tgz", "plan.txt", "smoke.jsonl", "bench.csv"} <= set(files), files
    with tarfile.open(out / "gpu_check.tgz") as archive:
        names = {Path(name).name for name in archive.getnames()}
    assert {"bench.log", "smoke.log", "speedup_contrastive_cpu.png"} <= names


def test_gpu_check_dry_run_smoke_checks_every_kernel_in_fp32(quick_run):
    from vlmcore.bench.smoke import SMOKE

    lines = [json.loads(line) for line in (quick_run[0].parent / "smoke.jsonl").read_text().splitlines()]
    assert [line["kernel"] for line in lines] == [kernel.name for kernel in SMOKE]
    for line in lines:
        checks = {check["check"]: check for check in line["checks"]}
        assert checks["bf16-anchor"]["status"] == "skipped" and "interpreter" in checks["bf16-anchor"]["note"]
        assert checks["fp32-small"]["status"] == "pass" and checks["fp32-small"]["finite"], line
        assert checks["fp32-small"]["max_rel_err"] <= checks["fp32-small"]["tolerance"]
    assert "smoke kernel" in quick_run[1]  # the smoke table is part of the summary


# ----------------------------------------------------------------------------- the correctness gate

GATED_OPS = ("contrastive", "masked_xattn", "resampler", "sigmoid", "vilbert_coattn", "blip2_qformer",
             "blip2_stage2", "blip_itc", "blip_itc_ids")


def test_quick_run_gates_every_vlmcore_row(rows):
    """Every vlmcore row of an op benchmark carries its error, the finite check and a passing gate."""
    ours = [r for r in rows if r["provider"] == "vlmcore" and r["op"] in GATED_OPS]
    assert {r["op"] for r in ours} == set(GATED_OPS)
    for row in ours:
        assert row["gate"] == "pass" and row["finite"] == "true", row
        assert 0 <= row["max_rel_err"] <= 1e-3 and "gate pass" in row["notes"], row
    assert all(r["gate"] == "" for r in rows if r["provider"] != "vlmcore")


def test_a_failing_gate_is_marked_and_never_a_speedup():
    """A vlmcore result 10% off its reference (or non-finite) is written with gate = fail; the
    summary shows GATE-FAIL and the peers' times, no speed-up."""
    def wrong(case, inputs):
        return lambda: inputs["x"].exp() * 1.1

    def nan(case, inputs):
        return lambda: inputs["x"].exp() * float("nan")

    reference = Provider("reference", lambda case, inputs: lambda: inputs["x"].exp(), backend="reference")
    for build, finite, error in ((wrong, "true", 0.1), (nan, "false", math.inf)):
        ctx = _ctx()
        run_op("toy", [_tiny_case()], [Provider("vlmcore", build), reference], ctx, gate=Gate(reference))
        ours = [r for r in ctx.rows if r["provider"] == "vlmcore"]
        assert len(ours) == 3 and all(r["gate"] == "fail" and r["finite"] == finite for r in ours), ours
        assert all("GATE FAIL" in r["notes"] and math.isclose(float(r["max_rel_err"]), error, rel_tol=1e-3)
                   for r in ours)
        table = summary_table(ctx.rows)
        assert "GATE-FAIL" in table and "x," not in table and "reference" in table and " ms" in table


def test_gate_runs_at_the_reduced_shape_of_huge_cases():
    ctx = RunContext(device=torch.device("cpu"), dtype=torch.float32, modes=MODES, writer=CsvWriter(None))
    case = contrastive.make_case(2 * contrastive.GATE_MAX_N, 32, ctx)
    assert case.meta["gate_case"].shape == f"n={contrastive.GATE_MAX_N} d=32"
    assert "gate_case" not in contrastive.make_case(64, 32, ctx).meta


def test_vlmcore_rows_come_before_peers_and_warmup_counts_against_the_deadline(monkeypatch):
    ctx = _ctx()
    cases = [_tiny_case(), _tiny_case()]
    providers = [Provider("vlmcore", lambda case, inputs: lambda: inputs["x"].exp()),
                 Provider("peer", lambda case, inputs: lambda: inputs["x"].exp())]
    run_op("toy", cases, providers, ctx)
    assert [r["provider"] for r in ctx.rows] == ["vlmcore"] * 6 + ["peer"] * 6
    assert all("warm-up" in r["notes"] for r in ctx.rows)

    def slow_warmup(case, inputs):
        def fn():
            ctx.deadline = 0.0  # the deadline passes while the first call (the warm-up) runs
            return inputs["x"].exp()
        return fn

    ctx = _ctx()
    run_op("toy", [_tiny_case()], [Provider("slow", slow_warmup)], ctx)
    assert ctx.rows[0]["status"] == "skipped" and "warm-up" in ctx.rows[0]["notes"]


def test_anchor_only_provider_skips_other_shapes_when_half_the_budget_is_gone(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    ctx = _ctx(deadline=1000.0)
    calls = []

    def build(case, inputs):
        calls.append(case.shape)
        clock[0] += 600.0  # the anchor shape's compile took most of the op's budget
        return lambda: inputs["x"].exp()

    second = _tiny_case()
    second.shape = "n=9"
    run_op("toy", [_tiny_case(), second], [Provider("flex", build, anchor_only=True)], ctx)
    rows = {(r["shape"], r["mode"]): r for r in ctx.rows}
    assert calls == ["n=8"] and rows[("n=9", "fwd")]["status"] == "skipped"
    assert "anchor shape only" in rows[("n=9", "fwd")]["notes"]


def test_memeff_is_a_contrastive_peer_reported_unavailable_without_cuda(rows):
    memeff = [r for r in rows if r["op"] == "contrastive" and r["provider"] == "memeff"]
    assert memeff and all(r["status"] == "unavailable" for r in memeff)
    assert all("memeff" in r["notes"] for r in memeff)
