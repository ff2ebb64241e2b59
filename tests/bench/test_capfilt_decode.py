"""``vlmcore-bench capfilt-decode``: one round on the demo shape runs both providers, checks that they
decoded the same tokens and reports captions/s."""

from vlmcore.bench.__main__ import main
from vlmcore.bench.capfilt_decode import measure


def test_one_round_reports_both_providers():
    row = measure("demo", "beam", repeats=1)
    assert row["batch"] == 64 and 1 <= row["tokens"] <= 12 - 5  # max_length minus [DEC] + the 4 prompt ids
    for name in ("cached", "uncached"):
        assert 0 < row[name]["min"] <= row[name]["median"] <= row[name]["max"]
    assert row["speedup"] == row["cached"]["median"] / row["uncached"]["median"]


def test_cli_prints_one_line_per_shape_and_decoding(capsys):
    assert main(["capfilt-decode", "--decoding", "nucleus", "--repeats", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("demo")]
    assert len(lines) == 1 and "nucleus" in lines[0] and "speed-up" in lines[0]
