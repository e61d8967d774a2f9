#!/usr/bin/env bash
# VNN-COMP harness: prepare_instance.sh v1 CATEGORY ONNX VNNLIB
# Stops leftovers of an earlier instance and checks that certkit supports every operator of
# the network (a non-zero exit tells the harness to skip the instance).
set -uo pipefail
[ "${1:-}" = "v1" ] && [ $# -eq 4 ] || { echo "usage: prepare_instance.sh v1 CATEGORY ONNX VNNLIB" >&2; exit 1; }
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"; [ -x "$PY" ] || PY=python3
pkill -9 -f "certkit.vnncomp.worker" 2>/dev/null || true
ONNX="$3"
case "$ONNX" in *.gz) gunzip -kf "$ONNX"; ONNX="${ONNX%.gz}";; esac
cd "$ROOT" && "$PY" -c "import sys; from certkit.onnx_io import read_proto, check_supported; check_supported(read_proto(sys.argv[1]))" "$ONNX"
