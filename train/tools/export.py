"""``vlmcore-export``: write a finished run's model in a peer library's format.

``vlmcore-export --run RUN_DIR --to FORMAT --out DIR`` rebuilds the run's model from its directory
exactly as ``vlmcore-eval run`` does (``train/tasks/run_loader.py``: the config, the frozen parts
rebuilt and checked, the exported trainable weights filled in), then calls the writer the task
registers for ``FORMAT`` (:meth:`~vlmcore.train.tasks.base.Task.peer_exporters`), which writes into
``DIR`` the files the peer loads (``open_clip``, ``hf``: a transformers ``save_pretrained``
directory, ``openflamingo``: a ``checkpoint.pt``, ...). A format the task does not have is a usage
error listing the formats it has. ``DIR`` must be empty or absent: nothing is overwritten.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


class ExportError(ValueError):
    """Bad arguments of ``vlmcore-export`` (the console script prints it and exits with status 2)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv`` without the program name; None: ``sys.argv[1:]``)."""
    p = argparse.ArgumentParser(prog="vlmcore-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory of vlmcore-train (config.json + exported weights)")
    p.add_argument("--to", required=True, dest="format", help="peer format, e.g. hf, open_clip, openflamingo")
    p.add_argument("--out", required=True, help="output directory (created; must be empty if it exists)")
    return p.parse_args(argv)


def _writer(task, fmt: str):
    """The task's writer for ``fmt``; :class:`ExportError` listing the task's formats otherwise."""
    writers = task.peer_exporters()
    if fmt not in writers:
        known = ", ".join(sorted(writers)) or "none"
        raise ExportError(f"--to: task {task.name!r} has no export format {fmt!r} (its formats: {known})")
    return writers[fmt]


def export_run(run_dir: str, fmt: str, out_dir: str) -> list[str]:
    """Write the model of ``run_dir`` in format ``fmt`` into ``out_dir``; returns the files written (sorted)."""
    from vlmcore.train.tasks.run_loader import build_run_model, read_run_config

    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise ExportError(f"--run: {run_dir!r} has no config.json (not a vlmcore-train run directory)")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ExportError(f"--out: {out_dir!r} is not empty")
    task, model = build_run_model(run_dir, read_run_config(run_dir))
    writer = _writer(task, fmt)
    os.makedirs(out_dir, exist_ok=True)
    with torch.no_grad():
        writer(model.eval(), out_dir)
    return sorted(os.path.relpath(os.path.join(root, f), out_dir)
                  for root, _, files in os.walk(out_dir) for f in files)


def main(argv: list[str] | None = None) -> list[str]:
    """``vlmcore-export`` in-process (tests call it with a list of arguments)."""
    args = parse_args(argv)
    return export_run(args.run, args.format, args.out)


def console_main() -> None:
    """``vlmcore-export``: export, print the files written; bad arguments exit with status 2, no traceback."""
    try:
        files = main()
    except ExportError as e:
        print(f"vlmcore-export: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print("\n".join(files))


if __name__ == "__main__":
    console_main()
