"""``python -m vlmcore.bench blip2 --quick`` writes one ok row per (op, provider, mode) on CPU (an
``unavailable`` row with its reason for a peer this environment lacks), and its floor."""

import math

import pytest
import torch
from vlmcore.bench import blip2
from vlmcore.bench.__main__ import main
from vlmcore.bench.harness import Unavailable
from vlmcore.bench.results import read_rows

MODES = ("fwd", "bwd", "fwd_bwd")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_blip2") / "bench.csv"
    assert main(["blip2", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    return read_rows(out)


def test_blip2_quick_rows(rows):
    for op, providers in ((blip2.OP_QFORMER, blip2.QFORMER_PROVIDERS), (blip2.OP_STAGE2, blip2.STAGE2_PROVIDERS)):
        for provider in providers:
            got = [r for r in rows if r["op"] == op and r["provider"] == provider.name]
            assert sorted(r["mode"] for r in got) == sorted(MODES), (op, provider.name)
            if _unavailable_here(provider):  # a peer this transformers lacks (4.x: no SDPA Q-Former)
                assert all(row["status"] == "unavailable" and row["notes"] for row in got), got
                continue
            for row in got:
                assert row["status"] == "ok", row
                assert 0 < row["ms_p20"] <= row["ms_p50"] <= row["ms_p80"] and row["tflops"] > 0, row
                assert math.isnan(row["gbps"])  # no byte floor for a whole model


def _unavailable_here(provider) -> bool:
    """Whether the provider's own availability check refuses this environment."""
    if provider.check is None:
        return False
    try:
        provider.check(torch.device("cpu"))
    except Unavailable:
        return True
    return False


def test_qformer_flops_floor_at_lavis_stage1_shapes():
    flops = blip2.qformer_flops(**blip2.QFORMER_GPU)
    # per sample: 12 layers x (4 * 2 * 32 * 768^2 + 4 * 32^2 * 768 + 4 * 32 * 768 * 3072) + 6 cross-attention
    # layers x (4 * 32 * 768^2 + 4 * 257 * 1408 * 768 + 4 * 32 * 257 * 768)
    per_sample = (12 * (8 * 32 * 768**2 + 4 * 32 * 32 * 768 + 4 * 32 * 768 * 3072)
                  + 6 * (4 * 32 * 768**2 + 4 * 257 * 1408 * 768 + 4 * 32 * 257 * 768))
    assert flops["fwd"] == 100 * per_sample
    assert flops["fwd_bwd"] == 3 * flops["fwd"]
