#!/usr/bin/env bash
# The GPU check: every GPU result of vlmcore comes from this script, in two device calls of at most
# ~5 minutes each (bench/NOTES.md says how to issue them; `--dry-run` prints the whole plan).
#
#   bench/gpu_check.sh [--dry-run] [--call 1|2|all] OUTDIR
#
# --call 1  correctness, VLMCORE_AUTOTUNE=preferred (one config per autotune key): environment,
#           offline wheels (./.whl, optional), vlmcore importable, the smoke check of every kernel
#           (`python -m vlmcore.bench smoke`: bf16 anchor + fp32 small shape vs the fp32 reference,
#           NaN-poisoned outputs, one JSON line per kernel), then the GPU-marked tests FILE BY FILE
#           (named explicitly, kernels no GPU has verified first; -v, per-test timeouts, long tracebacks),
#           then the tests the plan defers (`gpu-plan --deferred-tests`) while time is left.
# --call 2  speed, full autotuning: environment, wheels, install, the benchmark (time-budgeted, every
#           vlmcore row gated against its reference, vlmcore rows before peers), the plots.
# --call all (default) both, one after the other, each on its own clock.
# Each call stops itself after GPU_CHECK_SECONDS (default 280 s; 420 s dry): every step runs under `timeout` with
# what is left of its call. A failing step is recorded and the next one still runs; the exit code is
# non-zero when any step failed or timed out (a tests step fails only when a GPU test failed).
#
# OUTDIR receives at most 8 files, written as results arrive (a call killed outright keeps them):
#   steps.tsv, smoke.jsonl, tests.tsv, bench.csv, summary.txt, plan.txt, gpu_check.tgz
# The logs of every step and the PNGs go to LOGS (GPU_CHECK_LOGS, default OUTDIR.logs); an EXIT /
# TERM / INT trap packs them into OUTDIR/gpu_check.tgz and prints the summary table, last.
#
# --dry-run (CPU, no GPU needed): prints the plan (steps, test files, benchmark rows with their
# budgets, the kernel variants each step compiles), then runs what a CPU can: the smoke check's fp32
# shapes in the Triton interpreter, the benchmark with --quick, the plots and the summary.
# BENCH_COMMAND (default "all") picks the benchmark, in both modes.
set -uo pipefail

usage() {
    echo "usage: bench/gpu_check.sh [--dry-run] [--call 1|2|all] OUTDIR" >&2
    exit 2
}

DRY_RUN=0
CALL=all
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        --call) [ $# -ge 2 ] || usage; CALL=$2; shift 2 ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -eq 1 ] || usage
case "$CALL" in 1|2|all) ;; *) echo "gpu_check.sh: --call must be 1, 2 or all, got $CALL" >&2; usage ;; esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1" || { echo "gpu_check.sh: cannot create $1" >&2; exit 2; }
OUT=$(cd "$1" && pwd)
LOGS=${GPU_CHECK_LOGS:-$OUT.logs}
mkdir -p "$LOGS" || { echo "gpu_check.sh: cannot create $LOGS" >&2; exit 2; }
LOGS=$(cd "$LOGS" && pwd)
PY=${PYTHON:-python3}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # steps cd elsewhere
# 280 s per device call; a dry run gets 420 s per call (the Triton interpreter on a shared CPU)
TOTAL=${GPU_CHECK_SECONDS:-$( [ "$DRY_RUN" = 1 ] && echo 420 || echo 280 )}
BENCH_COMMAND=${BENCH_COMMAND:-all}
RUN_START=$(date +%s)
START=$RUN_START
STEPS="$OUT/steps.tsv"
FAILED=0
STEP_PID=""
FINISHED=0
: > "$STEPS"
cd "$REPO" || exit 2
export PYTHONSAFEPATH=1  # never the repository root on sys.path (kernels/ would shadow PyPI's `kernels`)

left() { echo $(( TOTAL - ($(date +%s) - START) )); }

record() {  # NAME STATUS SECONDS NOTE
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEPS"
}

skip() {  # NAME REASON
    echo "== $1: skipped ($2)"
    record "$1" skipped 0 "$2"
}

# step NAME CAP RESERVE CMD...: CMD under `timeout min(CAP, time left - RESERVE)`, output in
# LOGS/NAME.log. Runs in the background so that a TERM reaches the trap at once.
step() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local budget=$(( $(left) - reserve ))
    [ "$budget" -gt "$cap" ] && budget=$cap
    if [ "$budget" -lt 5 ]; then
        skip "$name" "no time left in the call's ${TOTAL}s"
        FAILED=1
        return 1
    fi
    local shown="$*" log="$LOGS/${name//\//_}.log" t0 rc status
    echo "== $name (timeout ${budget}s): ${shown:0:160}"
    t0=$(date +%s)
    timeout --kill-after=10 "$budget" "$@" > "$log" 2>&1 &
    STEP_PID=$!
    wait "$STEP_PID"
    rc=$?
    STEP_PID=""
    case $rc in
        0) status=ok ;;
        5) if [ "${NO_TESTS_OK:-0}" = 1 ]; then status=ok; rc=0; else status="failed(rc=5)"; FAILED=1; fi ;;
        124|137) status=timeout; FAILED=1 ;;
        *) status="failed(rc=$rc)"; FAILED=1 ;;
    esac
    tail -n 3 "$log" | sed 's/^/   /'
    record "$name" "$status" $(( $(date +%s) - t0 )) "$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-110)"
    return $rc
}

# ------------------------------------------------------------------ setup (both calls)
setup() {
    START=$(date +%s)
    step env 15 0 bash -c "command -v nvidia-smi >/dev/null && nvidia-smi -L; $PY - <<'EOF'
import sys, numpy, torch, triton
print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '(none)')
EOF"
    export TORCH_CUDA_ARCH_LIST=9.0  # DeepSpeed's op builder rejects the image's "9.0a"
    if [ "$DRY_RUN" = 1 ]; then
        skip wheels "dry run"
    elif [ -f /tmp/site/.vlmcore-wheels ]; then
        skip wheels "already installed in /tmp/site (warm machine)"
    elif compgen -G "$REPO/.whl/*.whl" > /dev/null; then
        step wheels 30 200 bash -c "'$PY' -m pip install -q --no-index --no-deps --target /tmp/site '$REPO'/.whl/*.whl \
            && touch /tmp/site/.vlmcore-wheels"
    else
        skip wheels "no .whl/ (gitignored: build it with ../shared/tools/gpu_wheels.sh and bench/gpu_wheels_extra.sh, carry it); peers needing wheels are reported unavailable"
    fi
    [ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
    install_step
}

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
    echo "export PYTHONPATH=$shim\${PYTHONPATH:+:\$PYTHONPATH}" > /tmp/vlmcore_env.sh
}

install_step() {
    if [ "$DRY_RUN" = 1 ]; then
        step install 30 60 bash -c "$(declare -f importable); REPO='$REPO'; PY='$PY'; importable && echo 'vlmcore importable from this checkout'"
        return
    fi
    rm -f /tmp/vlmcore_env.sh
    step install 30 60 bash -c "$(declare -f importable install_vlmcore); REPO='$REPO'; PY='$PY'; install_vlmcore"
    if [ -f /tmp/vlmcore_env.sh ]; then
        # shellcheck disable=SC1091
        . /tmp/vlmcore_env.sh  # the symlink tree first on the path
        importable || echo "   warning: vlmcore still not importable from this checkout"
    fi
}

# ------------------------------------------------------------------ call 1: correctness
# tests_file FILE [KEXPR [STEP_PREFIX]]: one GPU test file (only the tests `-k KEXPR` selects); its
# line in tests.tsv (file and selection, status, seconds, pytest's counts).
tests_file() {
    local file=$1 select=${2:-} name t0 rc status timeout_flag=() select_flag=()
    name="${3:-tests_gpu}/$(basename "$file" .py)"
    "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout "$PER_TEST")
    [ -n "$select" ] && select_flag=(-k "$select")
    t0=$(date +%s)
    # pytest exits 5 when the file has no GPU-marked test yet: not a failure
    NO_TESTS_OK=1 step "$name" "$PER_FILE" 10 "$PY" -m pytest -m gpu -v --tb=long "${timeout_flag[@]}" \
        "${select_flag[@]}" "$file"
    rc=$?
    case $rc in
        0) status=passed ;;
        1) status="GPU TEST FAILED" ;;
        124|137) status=timeout ;;
        *) status="error(rc=$rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$file${select:+ -k '$select'}" "$status" $(( $(date +%s) - t0 )) \
        "$(grep -E '^=+ .*(passed|failed|error|skipped|no tests ran).* =+$' "$LOGS/${name//\//_}.log" | tail -n 1 | tr -d '=' | xargs)" \
        >> "$OUT/tests.tsv"
}

# The deferred GPU tests (gpu-plan --deferred-tests) run after every file's first pass, while at least
# 30 s are left; the rest are recorded as not run (deferred by the plan, not failed).
deferred_tests() {
    local file select
    while IFS=$'\t' read -r file select; do
        if [ "$(left)" -lt 30 ]; then
            skip "tests_gpu_deferred/$(basename "$file" .py)" "deferred, no time left in call 1"
            printf '%s\t%s\t%s\t%s\n' "$file -k '$select'" "deferred, not run" 0 "no time left in call 1" >> "$OUT/tests.tsv"
        else
            tests_file "$file" "$select" tests_gpu_deferred
        fi
    done < <("$PY" -m vlmcore.bench gpu-plan --deferred-tests)
}

call1() {
    echo "-- call 1: correctness (VLMCORE_AUTOTUNE=preferred)"
    setup
    export VLMCORE_AUTOTUNE=preferred
    local smoke_cap=60
    [ "$DRY_RUN" = 1 ] && smoke_cap=150  # the Triton interpreter on a shared CPU: ~45 s seen
    step smoke "$smoke_cap" 10 "$PY" -m vlmcore.bench smoke --out "$OUT/smoke.jsonl"
    if [ "$DRY_RUN" = 1 ]; then
        skip tests_gpu "dry run: the GPU-marked tests need CUDA"
    else
        PER_TEST=$("$PY" -c "from vlmcore.bench.gpu_plan import PER_TEST_TIMEOUT_S as t; print(t)")
        PER_FILE=$("$PY" -c "from vlmcore.bench.gpu_plan import PER_FILE_TIMEOUT_S as t; print(t)")
        local file select
        declare -A later=()  # file -> the -k expression of its deferred tests
        while IFS=$'\t' read -r file select; do
            later[$file]=$select
        done < <("$PY" -m vlmcore.bench gpu-plan --deferred-tests)
        for file in $("$PY" -m vlmcore.bench gpu-plan --test-files); do
            tests_file "$file" "${later[$file]:+not (${later[$file]})}"
        done
        deferred_tests
    fi
    unset VLMCORE_AUTOTUNE
}

# ------------------------------------------------------------------ call 2: speed
call2() {
    echo "-- call 2: speed (full autotuning)"
    setup
    local args=(--out "$OUT/bench.csv")
    if [ "$DRY_RUN" = 1 ]; then args+=(--quick); else args+=(--rep-ms 50); fi
    # The bench stops measuring at its own budget (rows left are written as 'skipped'); the timeout
    # above it only catches a hang. 55 s stay for the plots and the summary.
    local budget=$(( $(left) - 85 ))
    [ "$budget" -lt 20 ] && budget=20
    step bench $(( budget + 30 )) 55 "$PY" -m vlmcore.bench "$BENCH_COMMAND" "${args[@]}" --time-budget "$budget"
    if [ -s "$OUT/bench.csv" ]; then
        step plot 45 10 "$PY" -m vlmcore.bench plot --results "$OUT/bench.csv" --out "$LOGS"
    else
        skip plot "no bench.csv"
        FAILED=1
    fi
}

# ------------------------------------------------------------------ summary (last) and packing
finish() {
    [ "$FINISHED" = 1 ] && return
    FINISHED=1
    [ -n "$STEP_PID" ] && kill -- "$STEP_PID" 2>/dev/null
    tar -czf "$OUT/gpu_check.tgz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")" 2>/dev/null
    {
        echo
        echo "==================== vlmcore GPU check: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - RUN_START )) s$( [ "$DRY_RUN" = 1 ] && echo ' (DRY RUN)'), call $CALL"
        printf '%-36s %-16s %6s  %s\n' step status seconds "last line of its log"
        while IFS=$'\t' read -r name status seconds note; do
            printf '%-36s %-16s %6s  %s\n' "$name" "$status" "$seconds" "$note"
        done < "$STEPS"
        if [ -s "$OUT/smoke.jsonl" ]; then
            echo
            timeout 15 "$PY" -m vlmcore.bench smoke --summarize "$OUT/smoke.jsonl" || echo "(smoke summary failed)"
        fi
        if [ -s "$OUT/tests.tsv" ]; then
            echo
            printf '%-52s %-16s %6s  %s\n' "GPU test file" status seconds "pytest"
            while IFS=$'\t' read -r file status seconds counts; do
                printf '%-52s %-16s %6s  %s\n' "$file" "$status" "$seconds" "$counts"
            done < "$OUT/tests.tsv"
        fi
        if [ -s "$OUT/bench.csv" ]; then
            echo
            timeout 15 "$PY" -m vlmcore.bench summary --results "$OUT/bench.csv" || echo "(summary failed)"
        fi
        echo
        echo "logs, bench.csv, PNGs: $OUT"
    } | tee "$OUT/summary.txt"
}

trap finish EXIT
trap 'FAILED=1; exit 143' TERM INT

"$PY" -m vlmcore.bench gpu-plan > "$OUT/plan.txt" 2>&1 || echo "(gpu-plan failed: see $OUT/plan.txt)"
[ "$DRY_RUN" = 1 ] && cat "$OUT/plan.txt"
[ "$CALL" = 1 ] || [ "$CALL" = all ] && call1
[ "$CALL" = 2 ] || [ "$CALL" = all ] && call2
exit $FAILED
