"""``python -m vlmcore.bench`` (console script ``vlmcore-bench``): run benchmarks, plot, summarize.

    python -m vlmcore.bench {contrastive|masked_xattn|resampler|e2e|sigmoid|vilbert|blip2|blip|all|ceilings}
        [--quick] [--out FILE] [--modes fwd,bwd,fwd_bwd] [--dtype bf16|fp16|fp32]
        [--device cuda|cpu] [--time-budget SECONDS] [--rep-ms MS]
    python -m vlmcore.bench plot [--results DIR_or_CSV] [--out DIR]
    python -m vlmcore.bench summary [--results DIR_or_CSV]
    python -m vlmcore.bench plan [--op NAME] [--json]
    python -m vlmcore.bench host-overhead [--op masked_xattn|resampler] [--inner N] [--repeats N]
    python -m vlmcore.bench smoke [--out FILE.jsonl] [--kernel NAME] | smoke --summarize FILE.jsonl
    python -m vlmcore.bench gpu-plan [--json] [--test-files | --deferred-tests]
    python -m vlmcore.bench capfilt-decode [--shape demo|base|all] [--decoding nucleus|beam|all] [--repeats N]

Every benchmark measures the card's ceilings first (matmul, device copy), then appends one CSV row
per (op, provider, shape, mode) to ``--out`` (see :mod:`vlmcore.bench.results` for the columns).
Without CUDA the tiny CPU shapes run (``--quick`` is implied): references in plain PyTorch, vlmcore's
kernels in the Triton interpreter. Those numbers check the suite, not the kernels' speed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from . import blip, blip2, contrastive, e2e, masked_xattn, resampler, sigmoid, vilbert
from .harness import BUDGET_SHARES, MODES, RunContext, measure_ceilings
from .results import CsvWriter, read_rows, summary_table

OPS = {
    "contrastive": contrastive.run,
    "masked_xattn": masked_xattn.run,
    "resampler": resampler.run,
    "e2e": e2e.run,
    "sigmoid": sigmoid.run,
    "vilbert": vilbert.run,
    "blip2": blip2.run,
    "blip": blip.run,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {', '.join(bad) or '(none given)'}: give a comma-separated subset of {','.join(MODES)}"
        )
    return modes


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from error
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vlmcore.bench",
        description="vlmcore benchmarks: kernels vs references and peers, end-to-end steps, plots.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true",
                        help="tiny shapes (implied without CUDA): checks the suite, not the speed")
    common.add_argument("--out", metavar="FILE", help="CSV to append the rows to (created with a header if new)")
    common.add_argument("--modes", type=_modes, default=MODES, metavar="LIST",
                        help="comma-separated subset of fwd,bwd,fwd_bwd (default: all three)")
    common.add_argument("--dtype", choices=sorted(DTYPES),
                        help="input dtype (default: bf16 on CUDA, fp32 on CPU)")
    common.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    common.add_argument("--time-budget", type=_positive_float, metavar="SECONDS",
                        help="stop measuring after this long; the rows left are written as 'skipped'")
    common.add_argument("--rep-ms", type=int, default=100, metavar="MS",
                        help="do_bench repetition time per row on CUDA (default 100)")
    helps = {
        "contrastive": "symmetric CLIP loss: vlmcore vs OpenCLIP math vs Inf-CL",
        "masked_xattn": "Flamingo masked cross-attention vs reference, SDPA, FlexAttention, varlen, xformers",
        "resampler": "Perceiver / Q-Former attention vs reference and SDPA (concat)",
        "e2e": "one training step of a Flamingo-style model and of CLIP, vlmcore vs reference ops",
        "vilbert": "one ViLBERT co-attention block (both directions) vs the reference op and SDPA",
        "blip2": "BLIP-2 Q-Former image pass and stage-2 step vs HF Blip2QFormerModel / Blip2ForConditionalGeneration",
        "blip": "BLIP ITC with momentum distillation over a feature queue: fused vs materialized reference",
        "all": "ceilings, every op, then e2e",
        "sigmoid": "SigLIP sigmoid loss: vlmcore vs OpenCLIP math (materialized, chunked) vs siglip-kernel",
        "ceilings": "only the card's matmul and copy ceilings",
    }
    for name, text in helps.items():
        commands.add_parser(name, parents=[common], help=text, description=text)
    plot = commands.add_parser("plot", help="draw PNGs from result CSVs",
                               description="Speed-up of vlmcore over each provider per shape; memory vs n.")
    plot.add_argument("--results", default=str(DEFAULT_RESULTS), metavar="DIR_or_CSV",
                      help=f"a results CSV or a directory of them (default {DEFAULT_RESULTS})")
    plot.add_argument("--out", metavar="DIR", help="where the PNGs go (default: <results dir>/plots)")
    summary = commands.add_parser("summary", help="print the short summary table of result CSVs")
    summary.add_argument("--results", default=str(DEFAULT_RESULTS), metavar="DIR_or_CSV")
    plan = commands.add_parser("plan", help="the exact work plan of every op per ANCHORS shape (predictions)",
                               description="Executed vs useful FLOPs, modelled HBM bytes, launches, peak extra "
                                           "memory, sm_90a compile evidence and predicted times, from the "
                                           "launchers' own planning code. No GPU needed.")
    plan.add_argument("--op", metavar="NAME", help="one op (default: every planned op)")
    plan.add_argument("--json", action="store_true", help="one JSON object per shape instead of text")
    host = commands.add_parser("host-overhead", help="host time of an eager fwd+bwd (no-op launches) vs a trivial op",
                               description="Host (Python) time of one eager forward + backward per op at the small "
                                           "ANCHORS shape, Triton launches replaced by no-ops, and its ratio to one "
                                           "trivial eager torch op (runs on CPU).")
    host.add_argument("--op", choices=("masked_xattn", "resampler"), help="default: both")
    host.add_argument("--inner", type=int, default=10, help="calls per timed round (default 10)")
    host.add_argument("--repeats", type=int, default=50, help="rounds; the minimum is reported (default 50)")
    smoke = commands.add_parser("smoke", help="every kernel once: bf16 anchor + fp32 small shape vs fp32 reference",
                                description="One JSON line per kernel op: forward + backward at its bf16 ANCHORS shape "
                                            "(CUDA only) and an fp32 small shape, NaN-poisoned outputs, max relative "
                                            "error against the fp32 reference. Exit code 1 on any failure.")
    smoke.add_argument("--out", metavar="FILE", help="JSON lines file to append to, line by line")
    smoke.add_argument("--kernel", metavar="NAME", help="one kernel op (default: all)")
    smoke.add_argument("--summarize", metavar="FILE", help="print the table of a smoke JSON lines file instead")
    gpu = commands.add_parser("gpu-plan", help="the two device calls of bench/gpu_check.sh (no GPU needed)",
                              description="Steps and timeouts, GPU test files, benchmark rows with their budgets, "
                                          "and the kernel variants each call compiles, counted from the autotune "
                                          "spaces (full autotuning and VLMCORE_AUTOTUNE=preferred).")
    gpu.add_argument("--json", action="store_true", help="the plan as one JSON object")
    gpu.add_argument("--test-files", action="store_true", help="only the GPU test files, in run order")
    gpu.add_argument("--deferred-tests", action="store_true",
                     help="only the GPU tests call 1 runs last, while time is left: 'file<TAB>-k expression' lines")
    capfilt = commands.add_parser("capfilt-decode", help="CapFilt captions/s: KV-cached vs uncached BLIP decoding",
                                  description="BLIP.generate as CapFilt calls it, use_cache=True vs False, on the "
                                              "demo BLIP and a BLIP-base shape (runs on CPU); median, min and max "
                                              "captions/s over the repeats.")
    capfilt.add_argument("--shape", choices=("demo", "base", "all"), default="demo",
                         help="default: demo (base takes minutes on CPU)")
    capfilt.add_argument("--decoding", choices=("nucleus", "beam", "all"), default="all", help="default: all")
    capfilt.add_argument("--repeats", type=int, default=5, help="timed runs per provider (default 5)")
    return parser


def _context(args, parser) -> RunContext:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick
    if device.type == "cpu" and not quick:
        print("no CUDA device: running the tiny CPU shapes (--quick)")
        quick = True
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cpu" and dtype_name == "bf16":
        parser.error("--dtype bf16 on CPU: the Triton interpreter computes bf16 wrongly; use fp32 or fp16 on CPU")
    if args.rep_ms < 1:
        parser.error(f"--rep-ms must be >= 1, got {args.rep_ms}")
    try:
        writer = CsvWriter(args.out)
    except ValueError as error:
        parser.error(f"--out: {error}")
    budget = args.time_budget if args.time_budget is not None else math.inf
    return RunContext(device=device, dtype=DTYPES[dtype_name], modes=args.modes, writer=writer, quick=quick,
                      deadline=time.monotonic() + budget, rep_ms=args.rep_ms,
                      slow_ms=400.0 if device.type == "cuda" else 100.0)


def run_benchmarks(command: str, ctx: RunContext) -> None:
    """Ceilings, then the op(s) of ``command``, splitting the time budget between ops of ``all``."""
    measure_ceilings(ctx)
    names = list(OPS) if command == "all" else ([] if command == "ceilings" else [command])
    final_deadline = ctx.deadline
    for position, name in enumerate(names):
        share = BUDGET_SHARES[name] / sum(BUDGET_SHARES[n] for n in names[position:])
        remaining = final_deadline - time.monotonic()
        ctx.deadline = time.monotonic() + remaining * share if math.isfinite(remaining) else math.inf
        OPS[name](ctx)
    ctx.deadline = final_deadline


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "plot":
        from .plot import plot_results

        try:
            written = plot_results(args.results, args.out)
        except ValueError as error:
            parser.error(f"plot: {error}")
        for path in written:
            print(path)
        return 0
    if args.command == "plan":
        from .plan import main as plan_main

        try:
            plan_main(args.op, args.json)
        except ValueError as error:
            parser.error(f"plan: {error}")
        return 0
    if args.command == "host-overhead":
        from .host_overhead import main as host_overhead_main

        if args.inner < 1 or args.repeats < 1:
            parser.error("host-overhead: --inner and --repeats must be >= 1")
        host_overhead_main(args.op, args.inner, args.repeats)
        return 0
    if args.command == "capfilt-decode":
        from .capfilt_decode import DECODINGS, SHAPES
        from .capfilt_decode import main as capfilt_main

        if args.repeats < 1:
            parser.error("capfilt-decode: --repeats must be >= 1")
        capfilt_main(list(SHAPES) if args.shape == "all" else [args.shape],
                     list(DECODINGS) if args.decoding == "all" else [args.decoding], args.repeats)
        return 0
    if args.command == "smoke":
        from .smoke import main as smoke_main
        from .smoke import summarize

        try:
            return summarize(args.summarize) if args.summarize else smoke_main(args.out, args.kernel)
        except ValueError as error:
            parser.error(f"smoke: {error}")
    if args.command == "gpu-plan":
        from .gpu_plan import main as gpu_plan_main

        gpu_plan_main(as_json=args.json, test_files=args.test_files, deferred_tests=args.deferred_tests)
        return 0
    if args.command == "summary":
        try:
            print(summary_table(read_rows(args.results)))
        except ValueError as error:
            parser.error(f"summary: {error}")
        return 0
    ctx = _context(args, parser)
    start = time.monotonic()
    run_benchmarks(args.command, ctx)
    print()
    print(summary_table(ctx.rows))
    where = f", appended to {args.out}" if args.out else ""
    print(f"\n{len(ctx.rows)} rows in {time.monotonic() - start:.1f} s{where}")
    return 0


def console_main() -> None:
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    console_main()
