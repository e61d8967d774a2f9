#!/usr/bin/env bash
# VNN-COMP harness: run_instance.sh v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT
# Writes RESULTS_FILE (sat + counterexample, unsat, unknown, timeout or error) within TIMEOUT seconds.
set -uo pipefail
[ "${1:-}" = "v1" ] && [ $# -eq 6 ] || {
  echo "usage: run_instance.sh v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT" >&2; exit 1; }
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"; [ -x "$PY" ] || PY=python3
ONNX="$3"; case "$ONNX" in *.gz) [ -f "${ONNX%.gz}" ] || gunzip -kf "$ONNX"; ONNX="${ONNX%.gz}";; esac
# the solver's process id, for prepare_instance.sh (which stops a leftover of this tool only)
PIDFILE="${CERTKIT_WORKER_PIDFILE:-$ROOT/.vnncomp_worker.pid}"
# CERTKIT_DEVICE: cpu (default), cuda or auto (see `certkit run-instance --help`)
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m certkit.cli run-instance "$ONNX" "$4" \
  --timeout "$6" --results "$5" --category "$2" --pidfile "$PIDFILE" --device "${CERTKIT_DEVICE:-cpu}"
