"""``python -m vlmcore.bench sigmoid``: a tiny CPU quick run (rows for every provider, shape and
mode; peers that cannot run say why; plots), the providers' math, the floors."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import assert_close
from vlmcore.bench import sigmoid
from vlmcore.bench.__main__ import main
from vlmcore.bench.harness import RunContext, Unavailable
from vlmcore.bench.plot import plot_results
from vlmcore.bench.results import CsvWriter, read_rows
from vlmcore.kernels.reference import sigmoid_contrastive_loss_reference

MODES = ("fwd", "bwd", "fwd_bwd")


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_sigmoid") / "bench.csv"
    assert main(["sigmoid", "--quick", "--out", str(out)]) == 0
    return out, read_rows(out)


def test_quick_run_rows(quick_rows):
    _, rows = quick_rows
    ops = [r for r in rows if r["op"] == "sigmoid"]
    shapes = {r["shape"] for r in ops}
    assert len(shapes) == 2
    for provider in sigmoid.PROVIDERS:
        for shape in shapes:
            got = sorted(r["mode"] for r in ops if r["provider"] == provider.name and r["shape"] == shape)
            assert got == sorted(MODES), (provider.name, shape)
    for row in ops:
        if row["provider"] in ("vlmcore", "reference", "openclip_chunked"):
            assert row["status"] == "ok", row
            assert 0 < row["ms_p20"] <= row["ms_p50"] <= row["ms_p80"] and row["tflops"] > 0
        else:
            assert row["status"] == "unavailable" and ("CUDA" in row["notes"] or "not importable" in row["notes"])


def test_quick_run_plots(quick_rows, tmp_path):
    csv_path, _ = quick_rows
    written = {p.rsplit("/", 1)[-1] for p in map(str, plot_results(str(csv_path), str(tmp_path)))}
    assert "speedup_sigmoid_cpu.png" in written


def _ctx():
    return RunContext(device=torch.device("cpu"), dtype=torch.float32, modes=MODES, writer=CsvWriter(None),
                      quick=True)


def test_chunked_provider_is_the_loss():
    case = sigmoid.make_case(70, 16, _ctx())
    inputs = case.make_inputs()
    got = sigmoid._openclip_chunked(case, inputs)()  # chunks of 32: the diagonal crosses chunk borders
    expected = sigmoid_contrastive_loss_reference(inputs["image"], inputs["text"], inputs["log_scale"].exp(),
                                                  inputs["bias"])
    assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_siglip_kernel_provider_passes_the_log_scale(monkeypatch):
    def fake(img, txt, log_temperature, bias):  # siglip-kernel's signature: t' itself, not exp(t')
        logits = log_temperature.exp() * img @ txt.T + bias
        return -F.logsigmoid((2 * torch.eye(img.shape[0]) - 1) * logits).sum() / img.shape[0]

    monkeypatch.setattr(sigmoid, "load_siglip_kernel", lambda: fake)
    case = sigmoid.make_case(9, 16, _ctx())
    inputs = case.make_inputs()
    expected = sigmoid_contrastive_loss_reference(inputs["image"], inputs["text"], inputs["log_scale"].exp(),
                                                  inputs["bias"])
    assert_close(sigmoid._siglip_kernel(case, inputs)(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(Unavailable, match="CUDA"):
        sigmoid.check_siglip_kernel(torch.device("cpu"))


def test_floors_match_anchors():
    flops, nbytes = sigmoid.floors(65536, 768, 2)
    assert flops["fwd_bwd"] == 6 * 65536**2 * 768
    assert math.isclose(flops["fwd_bwd"] / 807e12 * 1e3, 24.5, rel_tol=0.01)  # ANCHORS: 24.5 ms floor
    assert nbytes["fwd_bwd"] == 4 * 65536 * 768 * 2


def test_gpu_rows_get_a_memory_plot(tmp_path):
    from vlmcore.bench.results import make_row

    path = tmp_path / "gpu.csv"
    writer = CsvWriter(path)
    for provider, mib in (("vlmcore", 1.0), ("reference", 4.0)):
        for n in (8192, 32768):
            row = make_row("sigmoid", provider, f"n={n} d=768", "fwd_bwd", "ok", dtype="bf16", x=n,
                           ms_p50=1.0, ms_p20=0.9, ms_p80=1.1, peak_mib=mib * n, notes="synthetic")
            row["device"] = "NVIDIA H200"
            writer.write(row)
    written = {p.name for p in plot_results(str(path), str(tmp_path / "plots"))}
    assert {"memory_sigmoid_nvidia-h200.png", "speedup_sigmoid_nvidia-h200.png"} <= written
