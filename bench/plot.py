"""PNG plots of benchmark CSVs (matplotlib, Agg backend: no display needed).

- ``speedup_<op>_<device>.png``: for each shape (x axis) and mode (one panel each), the speed-up of
  vlmcore over each provider (provider ms / vlmcore ms; > 1 means vlmcore is faster); vlmcore
  rows whose correctness gate failed are not drawn. Rows a
  provider could not produce (OOM, unavailable, ...) are listed under the panel instead of drawn.
- ``memory_contrastive_<device>.png``: peak extra memory against n for every contrastive-loss
  provider (log-log), forward + backward; drawn when the CSV has memory (CUDA runs).
- ``e2e_<device>.png``: throughput of each end-to-end step, vlmcore vs reference.

When a CSV holds several runs of the same row, the last one wins.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .results import latest, read_rows

BENCH_OPS = ("contrastive", "masked_xattn", "resampler", "sigmoid")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(results: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw every plot the rows of ``results`` (a CSV or a directory of CSVs) allow; return the PNG paths.

    Raises:
        ValueError: no results there, or nothing to plot (no ``ok`` vlmcore rows and no memory).
    """
    rows = latest(read_rows(results))
    results = Path(results)
    out = Path(out_dir) if out_dir is not None else (results if results.is_dir() else results.parent) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for device in sorted({r["device"] for r in rows}):
        device_rows = [r for r in rows if r["device"] == device]
        for op in BENCH_OPS:
            path = _speedup(device_rows, op, device, out)
            if path is not None:
                written.append(path)
        path = _memory(device_rows, device, out)
        if path is not None:
            written.append(path)
        path = _memory(device_rows, device, out, op="sigmoid")
        if path is not None:
            written.append(path)
        path = _e2e(device_rows, device, out)
        if path is not None:
            written.append(path)
    if not written:
        raise ValueError(f"nothing to plot in {results}: no successful vlmcore rows with a peer to compare")
    return written


def _speedup(rows: list[dict], op: str, device: str, out: Path) -> Path | None:
    op_rows = [r for r in rows if r["op"] == op]
    modes = [m for m in ("fwd", "bwd", "fwd_bwd") if any(r["mode"] == m for r in op_rows)]
    # a vlmcore row whose correctness gate failed has no speed-up to draw
    ours = {(r["shape"], r["mode"]): r for r in op_rows
            if r["provider"] == "vlmcore" and r["status"] == "ok" and r.get("gate") != "fail"}
    if not ours:
        return None
    shapes = list(dict.fromkeys(r["shape"] for r in op_rows))
    providers = [p for p in dict.fromkeys(r["provider"] for r in op_rows) if p != "vlmcore"]
    plt = _pyplot()
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(7.0, 1.3 * len(shapes) + 3), 3.6 * len(modes)), squeeze=False)
    width = 0.8 / max(1, len(providers))
    for axis, mode in zip(axes[:, 0], modes):
        missing = []
        for index, provider in enumerate(providers):
            xs, ys = [], []
            for position, shape in enumerate(shapes):
                theirs = next((r for r in op_rows if r["provider"] == provider and r["shape"] == shape
                               and r["mode"] == mode), None)
                mine = ours.get((shape, mode))
                if theirs is None or mine is None:
                    continue
                if theirs["status"] == "ok" and mine["ms_p50"] > 0:
                    xs.append(position + (index - (len(providers) - 1) / 2) * width)
                    ys.append(theirs["ms_p50"] / mine["ms_p50"])
                elif theirs["status"] != "ok":
                    missing.append(f"{provider} @ {shape}: {theirs['status']}")
            bars = axis.bar(xs, ys, width=width, label=provider)
            axis.bar_label(bars, fmt="%.2g", fontsize=7)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_ylabel("speed-up of vlmcore (x)")
        axis.set_title(f"{op} — {mode} — {device}", fontsize=10)
        axis.set_xticks(range(len(shapes)))
        axis.set_xticklabels([s.replace(" ", "\n", 3) for s in shapes], fontsize=7)
        if providers:
            axis.legend(fontsize=7, loc="upper left")
        if missing:
            statuses = sorted({m.split(": ")[-1] for m in missing})
            axis.text(1.0, -0.35, "not drawn: " + ", ".join(f"{len([m for m in missing if m.endswith(s)])} {s}"
                                                          for s in statuses),
                      transform=axis.transAxes, ha="right", fontsize=7)
    fig.tight_layout()
    path = out / f"speedup_{op}_{_slug(device)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _memory(rows: list[dict], device: str, out: Path, op: str = "contrastive") -> Path | None:
    op_rows = [r for r in rows if r["op"] == op and r["mode"] == "fwd_bwd"]
    series: dict[str, list[tuple[float, float]]] = {}
    ooms: dict[str, list[float]] = {}
    for row in op_rows:
        if row["status"] == "ok" and not math.isnan(row["peak_mib"]) and not math.isnan(row["x"]):
            series.setdefault(row["provider"], []).append((row["x"], row["peak_mib"]))
        elif row["status"] == "oom":
            ooms.setdefault(row["provider"], []).append(row["x"])
    if not series:
        return None
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for provider, points in sorted(series.items()):
        points.sort()
        line, = axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
        for n in ooms.get(provider, []):
            axis.annotate("OOM", (n, points[-1][1]), color=line.get_color(), fontsize=8, ha="center")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("n (pairs), d = 768")
    axis.set_ylabel("peak extra memory (MiB), forward + backward")
    axis.set_title(f"{op} loss memory — {device}", fontsize=10)
    axis.grid(True, which="both", linewidth=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"memory_{op}_{_slug(device)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _e2e(rows: list[dict], device: str, out: Path) -> Path | None:
    steps = [r for r in rows if r["op"].startswith("e2e_") and r["mode"] == "train_step" and r["status"] == "ok"
             and not math.isnan(r["throughput"])]
    if not steps:
        return None
    plt = _pyplot()
    ops = list(dict.fromkeys(r["op"] for r in steps))
    fig, axes = plt.subplots(1, len(ops), figsize=(4.5 * len(ops), 4), squeeze=False)
    for axis, op in zip(axes[0], ops):
        op_rows = [r for r in steps if r["op"] == op]
        bars = axis.bar([r["provider"] for r in op_rows], [r["throughput"] for r in op_rows])
        axis.bar_label(bars, fmt="%.3g", fontsize=8)
        axis.set_ylabel(op_rows[0]["unit"])
        axis.set_title(f"{op} — {op_rows[0]['shape']}", fontsize=8)
    fig.suptitle(f"one training step — {device}", fontsize=10)
    fig.tight_layout()
    path = out / f"e2e_{_slug(device)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
