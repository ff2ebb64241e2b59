#!/usr/bin/env bash
# Add the GPU check's own wheels to ./.whl (run from the project root, on a machine with a registry,
# after ../shared/tools/gpu_wheels.sh): the memeff peer (pure-Python Triton wheel) and pytest-timeout
# (per-test timeouts in call 1). Idempotent; the GPU image installs .whl/*.whl offline.
set -euo pipefail
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    -d .whl memeff==0.3.1 pytest-timeout==2.4.0
ls -la .whl
