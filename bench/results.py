"""One results format for every benchmark: CSV rows with the machine, versions and commit.

Every row is one measurement (or one reason there is none). Columns, in file order:

==============  =================================================================================
op              ``ceiling``, ``contrastive``, ``masked_xattn``, ``resampler``, ``e2e_flamingo``,
                ``e2e_clip``
provider        ``vlmcore``, ``reference``, ``sdpa``, ``flex_attention``, ``flash_attn``
                (FlashAttention-2 varlen: the ``flash_attn`` package or torch's ``varlen_attn``),
                ``xformers``, ``inf_cl``; ``torch`` for ceilings
shape           ``key=value`` pairs separated by spaces (``n=8192 d=768``)
mode            ``fwd``, ``bwd``, ``fwd_bwd``; ``train_step`` / ``max_batch`` for e2e; the ceiling kind
dtype           input dtype (``bf16``, ``fp16``, ``fp32``)
x               the swept number of this row (n, images per sample, batch ...), for plots
status          ``ok``, ``oom`` (did not fit: a result), ``unavailable`` (provider missing: notes
                say why), ``unsupported`` (provider cannot express this op/mode), ``skipped``
                (time budget), ``error`` (exception text in notes)
ms_p50/p20/p80  time per call in milliseconds, median and 20th / 80th percentiles
peak_mib        extra device memory allocated during the call (CUDA allocator peak minus what was
                allocated before it), MiB. Empty on CPU: there is no allocator statistic there.
tflops, gbps    useful work per second against the floors of ANCHORS.md (minimum FLOPs / minimum
                bytes that any implementation must do), not what the provider happens to compute
frac_matmul     tflops / the measured matmul ceiling of this run (ceiling rows carry 1.0)
frac_copy       gbps / the measured device-copy ceiling of this run
throughput      e2e only: items per second, unit in ``unit`` (``tokens/s``, ``samples/s``)
max_rel_err     vlmcore rows: the correctness gate's largest normwise relative error of the output
                and every input gradient against the op's reference (see :mod:`vlmcore.bench.gate`)
finite          vlmcore rows: ``true`` when every value the gated call produced is finite
gate            vlmcore rows: ``pass`` or ``fail`` (a failed row is never reported as a speed-up);
                empty for peers, ceilings and end-to-end steps (their ops are gated in their rows)
device ...      GPU name (or ``cpu``), torch and triton versions, git commit, UTC date
notes           free text: why unavailable / what OOMed / how the time was taken
==============  =================================================================================
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import math
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

import torch

COLUMNS = (
    "op", "provider", "shape", "mode", "dtype", "x", "status",
    "ms_p50", "ms_p20", "ms_p80", "peak_mib", "tflops", "gbps", "frac_matmul", "frac_copy",
    "throughput", "unit", "max_rel_err", "finite", "gate", "device", "torch", "triton", "commit", "date", "notes",
)
STATUSES = ("ok", "oom", "unavailable", "unsupported", "skipped", "error")
_FLOAT_COLUMNS = ("x", "ms_p50", "ms_p20", "ms_p80", "peak_mib", "tflops", "gbps", "frac_matmul",
                  "frac_copy", "throughput", "max_rel_err")


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, str]:
    """Device name, torch / triton versions, git commit of the checkout, and the date (UTC)."""
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _git_commit() -> str:
    """Short commit of the checkout that holds this file, ``+dirty`` with local edits; ``unknown`` outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
            text=True, timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def make_row(op: str, provider: str, shape: str, mode: str, status: str, **fields) -> dict[str, str]:
    """A complete row: the given fields, the environment, and empty strings for the rest.

    Floats are written with 6 significant digits; NaN and None become empty cells.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown result columns {sorted(unknown)}")
    row = {column: "" for column in COLUMNS}
    row.update(environment())
    row.update(op=op, provider=provider, shape=shape, mode=mode, status=status)
    for key, value in fields.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            row[key] = ""
        elif isinstance(value, float):
            row[key] = f"{value:.6g}"
        else:
            row[key] = str(value)
    return row


class CsvWriter:
    """Appends rows to a CSV file (header written once), flushing after each row.

    Each row reaches the disk as soon as it is measured, so a run cut short by a timeout still
    leaves its results. An existing file must have exactly :data:`COLUMNS` as its header.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        if self.path is None:
            return
        if self.path.is_dir():
            raise ValueError(f"--out must be a file, got the directory {self.path}")
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as handle:
                header = next(csv.reader(handle), [])
            if tuple(header) != COLUMNS:
                raise ValueError(
                    f"{self.path} exists with a different header; results append only to vlmcore "
                    f"bench CSVs (columns {', '.join(COLUMNS)})"
                )
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", newline="") as handle:
                csv.DictWriter(handle, fieldnames=COLUMNS).writeheader()

    def write(self, row: dict[str, str]) -> None:
        if self.path is None:
            return
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=COLUMNS).writerow(row)


def read_rows(source: str | os.PathLike) -> list[dict]:
    """Rows of one CSV, or of every ``*.csv`` under a directory (sorted by path), floats parsed.

    Raises:
        ValueError: the path does not exist, holds no CSV, or a CSV lacks the columns.
    """
    source = Path(source)
    if source.is_dir():
        files = sorted(source.rglob("*.csv"))
        if not files:
            raise ValueError(f"no .csv results under {source}")
    elif source.is_file():
        files = [source]
    else:
        raise ValueError(f"results path {source} does not exist")
    rows = []
    for path in files:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = set(COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path} is not a vlmcore bench CSV (missing columns {sorted(missing)})")
            rows.extend(parse_row(row) for row in reader)
    return rows


def parse_row(row: dict) -> dict:
    """A copy of ``row`` with the number columns as floats (empty cells: NaN)."""
    parsed = dict(row)
    for column in _FLOAT_COLUMNS:
        value = parsed.get(column, "")
        parsed[column] = math.nan if value in ("", None) else float(value)
    return parsed


def latest(rows: Iterable[dict]) -> list[dict]:
    """Keep the last row for each (device, op, provider, shape, mode, dtype): later runs win."""
    kept: dict[tuple, dict] = {}
    for row in rows:
        kept[(row["device"], row["op"], row["provider"], row["shape"], row["mode"], row["dtype"])] = row
    return list(kept.values())


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}g}"


def summary_table(rows: Iterable[dict]) -> str:
    """A short text table: per op / shape / mode, vlmcore's time and memory and its speed-up over each peer."""
    rows = latest(parse_row(row) for row in rows)
    lines = []
    ceilings = [r for r in rows if r["op"] == "ceiling" and r["status"] == "ok"]
    for row in ceilings:
        value = f"{_fmt(row['tflops'], 4)} TFLOP/s" if not math.isnan(row["tflops"]) else f"{_fmt(row['gbps'], 4)} GB/s"
        lines.append(f"ceiling  {row['shape']:<34} {value}  ({row['device']})")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["op"] != "ceiling":
            groups.setdefault((row["op"], row["shape"], row["mode"], row["dtype"]), []).append(row)
    header = f"{'op':<13} {'shape':<40} {'mode':<10} {'vlmcore ms':>10} {'MiB':>8}  vs peers (x speed-up, or status)"
    lines.append(header)
    lines.append("-" * len(header))
    for (op, shape, mode, _dtype), group in groups.items():
        ours = next((r for r in group if r["provider"] == "vlmcore"), None)
        if ours is None:
            continue
        gate_failed = ours.get("gate") == "fail"
        if gate_failed:
            ours_ms, ours_mib = "GATE-FAIL", _fmt(ours["peak_mib"], 4)
        elif ours["status"] != "ok":
            ours_ms, ours_mib = ours["status"], "-"
        elif mode == "max_batch":
            ours_ms, ours_mib = f"B={_fmt(ours['x'], 6)}", _fmt(ours["peak_mib"], 4)
        elif not math.isnan(ours["throughput"]):
            ours_ms, ours_mib = f"{_fmt(ours['throughput'], 4)} {ours['unit']}", _fmt(ours["peak_mib"], 4)
        else:
            ours_ms, ours_mib = _fmt(ours["ms_p50"], 4), _fmt(ours["peak_mib"], 4)
        peers = []
        for row in group:
            if row["provider"] == "vlmcore":
                continue
            if row["status"] == "ok" and mode == "max_batch":
                peers.append(f"{row['provider']} B={_fmt(row['x'], 6)}")
            elif gate_failed and row["status"] == "ok":  # a wrong result has no speed-up
                peers.append(f"{row['provider']} {_fmt(row['ms_p50'], 4)} ms")
            elif row["status"] == "ok" and ours["status"] == "ok" and row["ms_p50"] > 0 and ours["ms_p50"] > 0:
                peers.append(f"{row['provider']} {row['ms_p50'] / ours['ms_p50']:.3g}x")
            else:
                peers.append(f"{row['provider']} {row['status']}")
        lines.append(f"{op:<13} {shape:<40} {mode:<10} {ours_ms:>10} {ours_mib:>8}  {', '.join(peers)}")
    return "\n".join(lines)
