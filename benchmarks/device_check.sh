#!/usr/bin/env bash
# One prepared check of a GPU machine (issue 15): benchmarks/device_check.sh [--cpu-smoke] [--out FILE].
# Needs no network; writes benchmarks/results/device_check-gpu.json after every section (--cpu-smoke:
# results/bench/device_check-cpu.json). What each section measures: benchmarks/device_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The script stops starting sections at its own deadline (470 s on a GPU, 150 s with --cpu-smoke); this hard
# limit only stops a section that hangs. The JSON already holds every section finished before it.
exec timeout --signal=KILL 540 "$PYTHON" -m benchmarks.device_check "$@"
