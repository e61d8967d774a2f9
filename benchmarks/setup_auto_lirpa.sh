#!/usr/bin/env bash
# Install auto_LiRPA 0.3 (its only PyPI release, written for torch < 1.13) into a private
# directory and patch it to run on the project's torch, for benchmarks/crown_vs_auto_lirpa.py.
# Benchmark-only: certkit itself never imports auto_LiRPA.
#
#   benchmarks/setup_auto_lirpa.sh [DIR]      (default: <repo>/.cache/auto_lirpa, git-ignored)
#
# Idempotent: downloads only what is missing, and each patch checks whether it is applied.
# Prints, on its last line, the PYTHONPATH to use:
#   PYTHONPATH=$(benchmarks/setup_auto_lirpa.sh | tail -1) python benchmarks/crown_vs_auto_lirpa.py
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$repo/.cache/auto_lirpa}
python=${PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || python=python3
mkdir -p "$dir/wheels"
dir=$(cd "$dir" && pwd)
pkg="$dir/lib"    # auto_LiRPA itself
deps="$dir/deps"  # appdirs, tqdm (its two small run-time imports that the venv lacks)

if [ ! -f "$pkg/auto_LiRPA/__init__.py" ]; then
    "$python" -m pip download --quiet --no-deps --dest "$dir/wheels" "auto_LiRPA==0.3" >&2
    # --no-deps: its pins (torch<1.13, torchvision, pylint, ...) cannot hold here and are not needed
    "$python" -m pip install --quiet --no-deps --target "$pkg" "$dir"/wheels/auto_LiRPA-0.3-*.whl >&2
fi
if [ ! -f "$deps/appdirs.py" ] || [ ! -d "$deps/tqdm" ]; then
    "$python" -m pip install --quiet --target "$deps" appdirs tqdm >&2
fi

"$python" - "$pkg/auto_LiRPA" >&2 <<'EOF'
import pathlib
import sys

root = pathlib.Path(sys.argv[1])


def patch(rel, old, new, why):
    path = root / rel
    text = path.read_text()
    if new in text:
        return
    if old not in text:
        sys.exit(f"setup_auto_lirpa: cannot patch {rel} ({why}): text not found")
    path.write_text(text.replace(old, new))
    print(f"patched {rel}: {why}")


# numpy 2 removed numpy.lib.arraysetops; isin lives in numpy itself
patch("operators/base.py", "from numpy.lib.arraysetops import isin", "from numpy import isin",
      "numpy>=2 has no numpy.lib.arraysetops")
# torch 2.x moved the TorchScript ONNX exporter's globals; _set_opset_version is gone
patch("parse_graph.py", "from torch.onnx.symbolic_helper import _set_opset_version\n",
      "from torch.onnx._internal.torchscript_exporter._globals import GLOBALS\n\n\n"
      "def _set_opset_version(v):\n    GLOBALS.export_onnx_opset_version = v\n",
      "torch>=2 has no torch.onnx.symbolic_helper._set_opset_version")
# torch._C.Node lost __getitem__ for attributes: read them with the accessor named by kindOf
patch("parse_graph.py", "attrs = {k: n[k] for k in n.attributeNames()}",
      "attrs = {k: getattr(n, n.kindOf(k))(k) for k in n.attributeNames()}",
      "torch._C.Node has no __getitem__ in torch>=2")
# (a 0.3 limitation, not torch's) a per-channel constant (1, C, 1, 1), as in the models' input
# normalisation x / std, times a Patches A at batch > 1: 0.3 asserts the constant has the batch's
# size in dimension 0; size 1 broadcasts just as well. (The benchmark gives such constants the
# shape (1, C, 1, 1): at (C, 1, 1) 0.3 sums their dense A over the batch, mixing samples.)
patch("operators/bivariate.py",
      "            if const.size(0) == x.patches.size(1) and",
      "            if const.size(0) in (1, x.patches.size(1)) and",
      "per-channel (1,C,1,1) constants times a Patches A at batch > 1")
# torch>=2 calls Module._named_members(..., remove_duplicate=...); 0.3's override lacks the argument
patch("bound_general.py", "def _named_members(self, get_members_fn, prefix='', recurse=True):",
      "def _named_members(self, get_members_fn, prefix='', recurse=True, remove_duplicate=True):",
      "Module._named_members takes remove_duplicate in torch>=2")
EOF

echo "$pkg:$deps"
