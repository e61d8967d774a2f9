#!/usr/bin/env bash
# VNN-COMP harness: prepare_instance.sh v1 CATEGORY ONNX VNNLIB
# Stops leftovers of an earlier instance, checks that certkit supports every operator of
# the network (a non-zero exit tells the harness to skip the instance) and caches its converted graph.
set -uo pipefail
[ "${1:-}" = "v1" ] && [ $# -eq 4 ] || { echo "usage: prepare_instance.sh v1 CATEGORY ONNX VNNLIB" >&2; exit 1; }
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"; [ -x "$PY" ] || PY=python3
# stop the solver of an earlier instance if it outlived its run_instance.sh, and nothing else: a
# pattern kill would also take down certkit solvers that other jobs run on this machine
PIDFILE="${CERTKIT_WORKER_PIDFILE:-$ROOT/.vnncomp_worker.pid}"
if [ -f "$PIDFILE" ]; then
  pid="$(cat "$PIDFILE")"
  if [[ "$pid" =~ ^[0-9]+$ ]] && tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline" | grep -q "certkit.vnncomp.worker"; then
    kill -9 -- "-$pid" 2>/dev/null || kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
fi
ONNX="$3"
case "$ONNX" in *.gz) gunzip -kf "$ONNX"; ONNX="${ONNX%.gz}";; esac
# convert the network once (the answer to "is every operator supported?") and keep its graph in the
# cache, so that run_instance.sh starts solving without converting or importing onnx
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m certkit.cli cache "$ONNX"
