#!/usr/bin/env bash
# VNN-COMP harness: install certkit (the README's setup: a venv with the pinned torch).
set -euo pipefail
[ "${1:-}" = "v1" ] || { echo "usage: install_tool.sh v1" >&2; exit 1; }
cd "$(dirname "$0")/.."
make install
