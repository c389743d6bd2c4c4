#!/usr/bin/env bash
# One prepared GPU check: install from wheels brought along, run the device tests, time the
# benchmark CT at the paper's width (plain float32, optimized, bf16) and BFR-AdamW against
# AdamW training iterations, write benchmarks/RESULTS-gpu.md. Sized for under 8 minutes on
# one H100/H200.
#
# The device machine has Python 3.12 and a CUDA torch but no internet. Beforehand, on a
# machine with internet, in this repository with its venv active (the one CI builds):
#
#     bash benchmarks/device_check.sh --fetch
#
# which writes .whl/requirements.txt (benchmarks/device_requirements.py: repux's run-time
# dependencies and pytest with all of theirs, at this venv's versions, less torch and its
# CUDA libraries and less what the lent H200's image holds; add --bare after --fetch for a
# machine without them) and downloads their wheels for CPython 3.12 on manylinux x86_64 into .whl/
# (ignored by git; carry it to the device with the working tree):
#
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 \
#         --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -r .whl/requirements.txt -d .whl
#
# Then, on the device machine, from the repository root:
#
#     bash benchmarks/device_check.sh            # installs from .whl/, tests, measures
#
# Here, on a CPU, the same steps shrunk to about a minute (no install, CPU tests, small sizes):
#
#     bash benchmarks/device_check.sh --shrunk --out /tmp/RESULTS-gpu.md
#
# Options: --out FILE (default benchmarks/RESULTS-gpu.md), --python PY (default python3),
# --no-install (dependencies already there).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=python3
OUT="$ROOT/benchmarks/RESULTS-gpu.md"
MODE=gpu
INSTALL=1
BARE=()
while [ $# -gt 0 ]; do
    case "$1" in
        --fetch) MODE=fetch ;;
        --bare) BARE=(--bare) ;;
        --shrunk) MODE=shrunk; INSTALL=0 ;;
        --no-install) INSTALL=0 ;;
        --out) OUT="$2"; shift ;;
        --python) PY="$2"; shift ;;
        *) echo "device_check.sh: unknown option $1 (expected --fetch [--bare], --shrunk, --no-install, --out FILE, --python PY)" >&2; exit 2 ;;
    esac
    shift
done
WHEELS="${REPUX_WHEELS:-$ROOT/.whl}"
log() { echo "[device_check $(date -u +%H:%M:%S)] $*" >&2; }

if [ "$MODE" = fetch ]; then
    mkdir -p "$WHEELS"
    "$PY" "$ROOT/benchmarks/device_requirements.py" "${BARE[@]}" > "$WHEELS/requirements.txt"
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -r "$WHEELS/requirements.txt" -d "$WHEELS"
    log "wheels for Python 3.12 in $WHEELS ($(ls "$WHEELS"/*.whl | wc -l) files)"
    exit 0
fi

START=$(date +%s)
cd "$ROOT"
# The project runs from its sources: no build step, nothing to fetch.
export PYTHONPATH="$ROOT/Training${PYTHONPATH:+:$PYTHONPATH}"

if [ "$INSTALL" = 1 ]; then
    if [ ! -f "$WHEELS/requirements.txt" ]; then
        echo "device_check.sh: $WHEELS/requirements.txt is missing: run 'bash benchmarks/device_check.sh --fetch' on a machine with internet first, or pass --no-install" >&2
        exit 2
    fi
    log "installing the dependencies from $WHEELS (no index)"
    "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" -r "$WHEELS/requirements.txt"
fi
"$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
EOF

if [ "$MODE" = shrunk ]; then
    # CI runs test_device.py on the CPU anyway: one of its tests checks the wiring here.
    DEVICE=cpu
    TESTS=(-k optimized_network)
    EXTRA=(--shrunk --iterations 1)
else
    DEVICE=cuda
    TESTS=()
    EXTRA=()
fi
log "device tests on $DEVICE"
REPUX_TEST_DEVICE=$DEVICE "$PY" -m pytest -q -p no:cacheprovider Testing/repux/test_device.py "${TESTS[@]}"

log "measurements"
"$PY" "$ROOT/benchmarks/device_check.py" --out "$OUT" "${EXTRA[@]}"
log "done in $(( $(date +%s) - START )) s; report: $OUT"
