#!/usr/bin/env bash
# The one-call GPU check: every GPU result of vlmcore is produced by this script.
#
#   bench/gpu_check.sh [--dry-run] OUTDIR
#
# On a GPU machine (image of ../shared/ENVIRONMENT.md: Python 3.12, torch cu130, triton 3.6, no
# registry access), from any directory:
#   1. installs the wheels of ./.whl/ offline if present (../shared/tools/gpu_wheels.sh builds them)
#      into /tmp/site, and sets TORCH_CUDA_ARCH_LIST=9.0 (DeepSpeed's op builder rejects "9.0a");
#   2. makes vlmcore importable without touching its dependencies (already importable, else
#      `pip install --no-deps --no-build-isolation -e .`, else a symlink tree mirroring setup.py's
#      package_dir on PYTHONPATH);
#   3. runs the GPU-marked tests (`pytest -m gpu tests`: bf16 at the ANCHORS shapes, large n,
#      memory), then every other kernel and module test on CUDA: the same tests CI runs in the
#      Triton interpreter put their tensors on the `device` fixture, so here they run the compiled
#      kernels, with bf16 added to their dtypes (interpreter-only checks skip themselves);
#   4. runs the whole benchmark (`python -m vlmcore.bench all`, time-budgeted) and the plots;
#   5. prints a short summary table last.
# Everything goes to OUTDIR: one log per step, bench.csv, PNGs, steps.tsv, summary.txt. The whole
# run is bounded to GPU_CHECK_SECONDS (default 480 s): each step runs under `timeout` with what is
# left. A failing step is recorded and the next one still runs; the exit code is non-zero when any
# step failed or timed out.
#
# --dry-run (no GPU needed): no installs, no tests; the benchmark runs with --quick (tiny shapes,
# CPU if there is no CUDA), then the plots and the summary. BENCH_COMMAND (default "all") picks the
# benchmark (e.g. "contrastive"), in both modes.
#
# On a lent device machine only a few files come back from $OUT: pack them, e.g.
#   bench/gpu_check.sh /tmp/gc; tar -czf "$OUT/gpu_check.tgz" -C /tmp/gc .
# To publish: copy OUTDIR/bench.csv to bench/results/<gpu>-<date>.csv and the PNGs to
# bench/results/plots/, then commit.
set -uo pipefail

usage() {
    echo "usage: bench/gpu_check.sh [--dry-run] OUTDIR" >&2
    exit 2
}

DRY_RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -eq 1 ] || usage

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1" || { echo "gpu_check.sh: cannot create $1" >&2; exit 2; }
OUT=$(cd "$1" && pwd)
PY=${PYTHON:-python3}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # steps cd elsewhere
TOTAL=${GPU_CHECK_SECONDS:-480}
BENCH_COMMAND=${BENCH_COMMAND:-all}
START=$(date +%s)
STEPS="$OUT/steps.tsv"
FAILED=0
: > "$STEPS"
cd "$REPO" || exit 2

left() { echo $(( TOTAL - ($(date +%s) - START) )); }

record() {  # NAME STATUS SECONDS NOTE
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEPS"
}

# step NAME CAP RESERVE CMD...: run CMD under `timeout min(CAP, time left - RESERVE)`, output in
# OUTDIR/NAME.log; RESERVE keeps time for the steps after this one.
step() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local budget=$(( $(left) - reserve ))
    [ "$budget" -gt "$cap" ] && budget=$cap
    if [ "$budget" -lt 5 ]; then
        echo "== $name: skipped (no time left)"
        record "$name" skipped 0 "no time left in the ${TOTAL}s budget"
        FAILED=1
        return 1
    fi
    local shown="$*"
    echo "== $name (timeout ${budget}s): ${shown:0:160}"
    local t0 rc status
    t0=$(date +%s)
    timeout --kill-after=10 "$budget" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        status=ok
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status=timeout
        FAILED=1
    else
        status="failed(rc=$rc)"
        FAILED=1
    fi
    tail -n 3 "$OUT/$name.log" | sed 's/^/   /'
    record "$name" "$status" $(( $(date +%s) - t0 )) "$(grep -v '^[[:space:]]*$' "$OUT/$name.log" | tail -n 1 | cut -c1-110)"
    return $rc
}

skip() {  # NAME REASON
    echo "== $1: skipped ($2)"
    record "$1" skipped 0 "$2"
}

# --------------------------------------------------------------------------- 1. environment
step env 30 0 bash -c "command -v nvidia-smi >/dev/null && nvidia-smi -L; $PY - <<'EOF'
import sys, numpy, torch, triton
print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '(none)')
EOF"

export TORCH_CUDA_ARCH_LIST=9.0
if [ "$DRY_RUN" = 1 ]; then
    skip wheels "dry run"
elif compgen -G "$REPO/.whl/*.whl" > /dev/null; then
    if step wheels 120 300 "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "$REPO"/.whl/*.whl; then
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
    fi
else
    skip wheels "no .whl/*.whl (run ../shared/tools/gpu_wheels.sh on a machine with a registry)"
fi

# --------------------------------------------------------------------------- 2. vlmcore importable
importable() {  # from another directory AND from the repository root, resolving to this checkout
    local probe="import vlmcore, vlmcore.kernels, vlmcore.bench, pathlib; assert pathlib.Path(vlmcore.kernels.__file__).resolve().is_relative_to(pathlib.Path('$REPO').resolve())"
    (cd /tmp && "$PY" -c "$probe") >/dev/null 2>&1 && (cd "$REPO" && "$PY" -c "$probe") >/dev/null 2>&1
}

install_vlmcore() {
    if importable; then
        echo "vlmcore already importable from this checkout"
        return 0
    fi
    local extra=""
    "$PY" -m pip install --help 2>/dev/null | grep -q -- --break-system-packages && extra="--break-system-packages"
    if "$PY" -m pip install -q --no-deps --no-build-isolation $extra -e "$REPO" && importable; then
        echo "installed: pip install --no-deps --no-build-isolation -e ."
        return 0
    fi
    echo "pip editable install unusable here; mapping the packages with a symlink tree"
    local shim=/tmp/vlmcore_pkgs
    rm -rf "$shim" && mkdir -p "$shim/vlmcore" || return 1
    ln -s "$REPO"/vlmcore/* "$shim/vlmcore/"
    ln -s "$REPO/kernels" "$shim/vlmcore/kernels"
    ln -s "$REPO/train" "$shim/vlmcore/train"
    ln -s "$REPO/bench" "$shim/vlmcore/bench"
    echo "export PYTHONPATH=$shim\${PYTHONPATH:+:\$PYTHONPATH} PYTHONSAFEPATH=1" > /tmp/vlmcore_env.sh
    return 0
}

rm -f /tmp/vlmcore_env.sh
if [ "$DRY_RUN" = 1 ]; then
    step install 60 200 bash -c "$(declare -f importable); REPO='$REPO'; PY='$PY'; importable && echo 'vlmcore importable from this checkout'"
else
    step install 120 200 bash -c "$(declare -f importable install_vlmcore); REPO='$REPO'; PY='$PY'; install_vlmcore"
    if [ -f /tmp/vlmcore_env.sh ]; then
        # shellcheck disable=SC1091
        . /tmp/vlmcore_env.sh  # the symlink tree first on the path; PYTHONSAFEPATH keeps ./vlmcore out
        importable || echo "   warning: vlmcore still not importable from this checkout"
    fi
fi

# --------------------------------------------------------------------------- 3. tests
KERNEL_TESTS=$(ls tests/kernels/test_contrastive*.py tests/kernels/test_masked_cross_attention*.py tests/kernels/test_resampler_attention*.py \
    tests/models/test_cross_attention_modules.py tests/models/test_resampler_modules.py tests/models/test_flamingo.py tests/models/test_clip.py \
    tests/kernels/test_sigmoid_contrastive.py tests/models/test_siglip_module.py \
    2>/dev/null | tr '\n' ' ')
if [ "$DRY_RUN" = 1 ]; then
    skip tests_gpu "dry run"
    skip tests_kernels_cuda "dry run"
else
    # --continue-on-collection-errors: a test module importing a package this image lacks
    # (deepspeed without the wheels) must not stop the GPU tests of the others.
    step tests_gpu 150 260 "$PY" -m pytest -m gpu tests -q --continue-on-collection-errors
    if [ -z "$KERNEL_TESTS" ]; then
        skip tests_kernels_cuda "no kernel test files found"
    else
        # The slow and multi-process cases stay in CPU CI; autotuning compiles dominate here.
        # shellcheck disable=SC2086
        step tests_kernels_cuda 120 230 "$PY" -m pytest -m "not gpu and not slow and not distributed" $KERNEL_TESTS -q
    fi
fi

# --------------------------------------------------------------------------- 4. benchmark + plots
BENCH_ARGS=(--out "$OUT/bench.csv")
if [ "$DRY_RUN" = 1 ]; then
    BENCH_ARGS+=(--quick)
else
    BENCH_ARGS+=(--rep-ms 50)
fi
# The bench stops measuring at its own budget (rows left are written as 'skipped'); the timeout
# above it only catches a hang. 45 s stay for plots and the summary.
BUDGET=$(( $(left) - 75 ))
[ "$BUDGET" -lt 20 ] && BUDGET=20
step bench $(( BUDGET + 30 )) 45 "$PY" -m vlmcore.bench "$BENCH_COMMAND" "${BENCH_ARGS[@]}" --time-budget "$BUDGET"
if [ -s "$OUT/bench.csv" ]; then
    step plot 30 15 "$PY" -m vlmcore.bench plot --results "$OUT/bench.csv" --out "$OUT"
else
    skip plot "no bench.csv"
    FAILED=1
fi

# --------------------------------------------------------------------------- 5. summary (last)
{
    echo
    echo "==================== vlmcore GPU check: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START )) s$( [ "$DRY_RUN" = 1 ] && echo ' (DRY RUN)')"
    printf '%-28s %-14s %6s  %s\n' step status seconds "last line of its log"
    while IFS=$'\t' read -r name status seconds note; do
        printf '%-28s %-14s %6s  %s\n' "$name" "$status" "$seconds" "$note"
    done < "$STEPS"
    echo
    if [ -s "$OUT/bench.csv" ]; then
        timeout 15 "$PY" -m vlmcore.bench summary --results "$OUT/bench.csv" || echo "(summary failed)"
    fi
    echo
    echo "logs, bench.csv, PNGs: $OUT"
} | tee "$OUT/summary.txt"
exit $FAILED
