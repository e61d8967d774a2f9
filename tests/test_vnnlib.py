"""VNN-LIB: every competition file parses with sizes matching its network; round trips; errors name the line."""

from __future__ import annotations

import csv
import gzip

import numpy as np
import pytest

from certkit.vnnlib import VnnlibError, format_vnnlib, parse_vnnlib, read_vnnlib, robustness_property
from tests.conftest import VNNCOMP


def _instances():
    """(family, vnnlib path, network input size, output size) for every distinct property file."""
    info = VNNCOMP / "net_info.csv"
    if not info.is_file():
        return []
    sizes = {}
    with open(info) as f:
        for row in csv.DictReader(f):
            dims = lambda s: int(np.prod([int(d) for d in s.split("x") if d.isdigit()]))  # noqa: E731
            sizes[(row["family"], row["onnx"])] = (dims(row["input_shape"]), dims(row["output_shape"]))
    seen, out = set(), []
    for fam in sorted(p.name for p in VNNCOMP.iterdir() if (p / "instances.csv").is_file()):
        with open(VNNCOMP / fam / "instances.csv") as f:
            for onnx_rel, vnn_rel, _ in csv.reader(f):
                key = (fam, vnn_rel.strip(), onnx_rel.strip())
                if key not in seen:
                    seen.add(key)
                    out.append((fam, VNNCOMP / fam / vnn_rel.strip(), *sizes[(fam, onnx_rel.strip())]))
    return out


INSTANCES = _instances()


def test_every_competition_property_parses_with_matching_sizes(vnncomp_dir):
    assert len(INSTANCES) >= 450
    cache = {}
    for fam, path, n_in, n_out in INSTANCES:
        prop = cache.get(path) or cache.setdefault(path, read_vnnlib(path))
        assert prop.num_inputs == n_in and prop.num_outputs == n_out, (fam, path.name)
        assert prop.cases and all(c.polytopes for c in prop.cases)
        for c in prop.cases:
            assert (c.lower <= c.upper).all() and np.isfinite(c.lower).all()


def test_round_trip_is_identity(vnncomp_dir):
    paths = sorted({p for _, p, _, _ in INSTANCES})
    for path in paths[::15]:
        prop = read_vnnlib(path)
        assert parse_vnnlib(format_vnnlib(prop)).equals(prop), path.name


def test_acas_property_semantics(vnncomp_dir):
    # ACAS Xu property 2: the unsafe set is "COC (Y_0) is the maximal output": Y_j - Y_0 <= 0, j = 1..4
    prop = read_vnnlib(VNNCOMP / "acasxu" / "vnnlib" / "prop_2.vnnlib")
    (case,) = prop.cases
    assert len(case.polytopes) == 1
    A, b = case.polytopes[0]
    assert A.shape == (4, 5) and (b == 0).all()
    assert (A[:, 0] == -1).all() and (A[:, 1:] == np.eye(4)).all()
    assert case.lower[3] == 0.45 and case.upper[3] == 0.5 and case.lower[4] == -0.5 and case.upper[4] == -0.45


def test_robustness_property_meaning():
    text = robustness_property(np.zeros(3), np.ones(3), label=1, num_outputs=3, comment="x")
    prop = parse_vnnlib(text)
    (case,) = prop.cases
    assert (case.lower == 0).all() and (case.upper == 1).all()
    rows = sorted(tuple(A[0]) for A, _ in case.polytopes)
    assert rows == [(-1.0, 1.0, 0.0), (0.0, 1.0, -1.0)]  # Y_1 - Y_j <= 0 for j = 0, 2
    # the competitions' plain form, which simple VNN-LIB parsers understand
    assert "(and (<= Y_1 Y_0))" in text and "(and (<= Y_1 Y_2))" in text and "(* " not in text


def test_linear_terms_disjunctions_and_gz(tmp_path):
    text = """; comment
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(assert (or (and (>= X_0 -1) (<= X_0 0)) (and (>= X_0 0.5) (<= X_0 1))))
(assert (<= X_1 2.5))
(assert (>= X_1 (- 2)))
(assert (or (and (<= (+ Y_0 (* 2 Y_1)) 3) (> Y_0 Y_1)) (< (- Y_1) 0.25)))
"""
    prop = parse_vnnlib(text)
    assert len(prop.cases) == 2
    assert prop.cases[0].lower.tolist() == [-1, -2] and prop.cases[1].upper.tolist() == [1, 2.5]
    A, b = prop.cases[0].polytopes[0]
    assert A.tolist() == [[1, 2], [-1, 1]] and b.tolist() == [3, 0]
    A, b = prop.cases[0].polytopes[1]
    assert A.tolist() == [[0, -1]] and b.tolist() == [0.25]
    assert parse_vnnlib(format_vnnlib(prop)).equals(prop)
    gz = tmp_path / "p.vnnlib.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    assert read_vnnlib(gz).equals(prop)


@pytest.mark.parametrize("text,message", [
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1)\n", "line 3: '(' is never closed"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1)))\n", "line 3: unexpected ')'"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 one))\n", "line 3: unknown token 'one'"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_1 1))\n", "line 3: X_1 is not declared"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n\n(assert (<= (* Y_0 Y_0) 1))\n", "line 4: product"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 Y_0))\n", "line 3: constraints mixing"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1))\n(assert (<= Y_0 1))\n",
     "X_0 has no lower"),
    ("(declare-const Z Real)\n", "line 1: unsupported variable name 'Z'"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (=> X_0 1))\n", "line 3: unsupported operator"),
])
def test_errors_name_the_line(text, message):
    with pytest.raises(VnnlibError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        parse_vnnlib(text)


def test_missing_file(tmp_path):
    with pytest.raises(VnnlibError, match="no such file"):
        read_vnnlib(tmp_path / "nope.vnnlib")
