"""Fuzzed parsers: hostile VNN-LIB text, ONNX files, ε strings and dataset strings end in certkit's
own one-line error (a ``CertkitError``) or a correct result, never another exception, a hang,
a crash or Python's recursion limit.

Hypothesis drives the mutations (token edits, truncations, byte flips, random text); fixed
cases pin what a user would try by hand (1e400, 10,000-digit numbers, 100,000 nested
parentheses, int64 or 10^12-wide inputs, cyclic graphs, ...). The default run keeps
``max_examples`` small; ``-m slow`` runs a wider sweep of the same properties.
"""

from __future__ import annotations

import gzip
import math
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from certkit.boxes import parse_eps
from certkit.errors import CertkitError
from certkit.vnnlib import Case, Property, VnnlibError, format_vnnlib, parse_vnnlib, read_vnnlib
from tests.conftest import VNNCOMP

FAST = settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
SLOW = settings(max_examples=2000, deadline=20000, suppress_health_check=[HealthCheck.too_slow])
WORK = Path(tempfile.mkdtemp(prefix="certkit_fuzz_"))  # hypothesis examples reuse files here (no fixtures)


def assert_one_line(err: BaseException) -> None:
    """certkit's error contract: a CertkitError whose message is one readable line."""
    assert isinstance(err, CertkitError), repr(err)
    msg = str(err)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    assert len(msg) < 1000, msg[:200]


# ====================================================================== VNN-LIB

SMALL = """; a hand-written property
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)
(assert (<= X_0 0.5))
(assert (>= X_0 -0.5))
(assert (and (<= X_1 1e-3) (>= X_1 (- 2.5))))
(assert (or (and (<= Y_0 Y_1) (>= (+ Y_2 (* 2 Y_0)) 1.5)) (and (< (- Y_1 Y_2) 0))))
"""

HOSTILE_TOKENS = ["(", ")", "((", "))", "1e400", "-1e400", "1e-400", "nan", "inf", "-inf", "NaN", "1_0", "0x10",
                  "9" * 10_000, "X_" + "9" * 5000, "X_99999", "Y_7", "X_٣", "٣", "１", "é", "\u202e", "\x00", "\ufeff",
                  "and", "or", "not", "=>", "assert", "declare-const", "Real", "Int", "+", "-", "*", "/", "<=", ">=",
                  "<", ">", "=", ";", "; comment\n", "\n", "", "1e308", "-1e308", "5e-324", "(* 1e300 1e300 Y_0)"]


def check_property(prop: Property) -> None:
    """What every parsed property must satisfy: declared sizes, finite numbers, non-empty boxes."""
    assert prop.num_inputs >= 1 and prop.num_outputs >= 1
    for case in prop.cases:
        assert case.lower.shape == case.upper.shape == (prop.num_inputs,)
        assert np.isfinite(case.lower).all() and np.isfinite(case.upper).all()
        assert (case.lower <= case.upper).all()
        assert case.polytopes
        for A, b in case.polytopes:
            assert A.shape == (len(b), prop.num_outputs)
            assert np.isfinite(A).all() and np.isfinite(b).all()


def parse_or_error(text: str) -> Property | None:
    """parse_vnnlib's verdict on ``text``: a checked property, or None after a one-line VnnlibError."""
    try:
        prop = parse_vnnlib(text)
    except VnnlibError as e:
        assert_one_line(e)
        return None
    check_property(prop)
    return prop


def _seed_texts() -> list[str]:
    """The hand-written property and small real competition files (when ../shared is present)."""
    texts = [SMALL]
    for rel in ("acasxu/vnnlib/prop_1.vnnlib", "acasxu/vnnlib/prop_6.vnnlib", "tllverifybench_2022/vnnlib"):
        path = VNNCOMP / rel
        if path.is_dir():
            path = next(iter(sorted(path.glob("*.vnnlib"))), None)
        if path is not None and path.is_file() and path.stat().st_size < 20_000:
            texts.append(path.read_text())
    return texts


SEEDS = _seed_texts()
_PIECES = re.compile(r"\s+|[()]|[^\s()]+")

mutation = st.tuples(st.sampled_from(["delete", "replace", "insert", "duplicate", "swap"]),
                     st.integers(0, 10**6), st.one_of(st.sampled_from(HOSTILE_TOKENS), st.text(max_size=6)))


def mutate(text: str, edits: list[tuple[str, int, str]]) -> str:
    """Apply token-level edits (positions taken modulo the token count)."""
    toks = _PIECES.findall(text)
    for kind, pos, tok in edits:
        if not toks:
            toks = [tok]
            continue
        i = pos % len(toks)
        if kind == "delete":
            del toks[i]
        elif kind == "replace":
            toks[i] = tok
        elif kind == "insert":
            toks.insert(i, tok)
        elif kind == "duplicate":
            toks.insert(i, toks[i])
        else:
            j = (pos // 7) % len(toks)
            toks[i], toks[j] = toks[j], toks[i]
    return "".join(toks)


@FAST
@given(seed=st.sampled_from(range(len(SEEDS))), edits=st.lists(mutation, min_size=1, max_size=6))
def test_vnnlib_token_mutations_end_in_an_error_or_a_valid_property(seed, edits):
    parse_or_error(mutate(SEEDS[seed], edits))


@FAST
@given(seed=st.sampled_from(range(len(SEEDS))), cut=st.floats(0, 1))
def test_vnnlib_truncations_end_in_an_error_or_a_valid_property(seed, cut):
    text = SEEDS[seed]
    parse_or_error(text[:int(len(text) * cut)])


@FAST
@given(text=st.text(alphabet=st.sampled_from("()XY_0123456789.e+-*<=> \n;and or assert declare-const Real٣é\x00"),
                    max_size=300))
def test_vnnlib_random_text_ends_in_an_error_or_a_valid_property(text):
    parse_or_error(text)


def test_vnnlib_seeds_parse():
    """The fuzz starts from valid files (else the mutations above test nothing)."""
    assert len(SEEDS) >= 1
    for text in SEEDS:
        assert parse_or_error(text) is not None
    prop = parse_vnnlib(SMALL)
    assert prop.num_inputs == 2 and prop.num_outputs == 3
    np.testing.assert_array_equal(prop.cases[0].lower, [-0.5, -2.5])
    np.testing.assert_array_equal(prop.cases[0].upper, [0.5, 1e-3])
    assert len(prop.cases[0].polytopes) == 2


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=True)


@st.composite
def properties(draw) -> Property:
    """Random well-formed properties (boxes with lower <= upper, polytopes with finite rows)."""
    nx, ny = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    cases = []
    for _ in range(draw(st.integers(1, 3))):
        a = np.array(draw(st.lists(finite, min_size=nx, max_size=nx)))
        b = np.array(draw(st.lists(finite, min_size=nx, max_size=nx)))
        polys = []
        for _ in range(draw(st.integers(1, 3))):
            k = draw(st.integers(1, 3))
            A = np.array(draw(st.lists(st.lists(finite, min_size=ny, max_size=ny), min_size=k, max_size=k)))
            A[~A.any(1), 0] = 1.0  # a zero row is a constant (true or false), not an output constraint
            polys.append((A, np.array(draw(st.lists(finite, min_size=k, max_size=k)))))
        cases.append(Case(np.minimum(a, b), np.maximum(a, b), polys))
    if len({(c.lower.tobytes(), c.upper.tobytes()) for c in cases}) != len(cases):
        cases = cases[:1]  # equal boxes merge on reading; keep the comparison exact
    return Property(nx, ny, cases)


@FAST
@given(prop=properties())
def test_vnnlib_random_valid_properties_read_back_exactly(prop):
    """A correct result where one is due: written properties parse back to the same numbers."""
    back = parse_vnnlib(format_vnnlib(prop))
    check_property(back)
    assert back.equals(prop)


HEADER = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
BOX = "(assert (<= X_0 1))\n(assert (>= X_0 0))\n"
DEPTH = 100_000


def _timed_parse(text: str, limit: float = 20.0) -> Property | None:
    t0 = time.perf_counter()
    result = parse_or_error(text)
    assert time.perf_counter() - t0 < limit
    return result


def test_vnnlib_deep_nesting_needs_no_recursion():
    """100,000 nested parentheses in each place they can nest, well below Python's recursion limit."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)  # a parser that recursed at all would fail here, not at 100,000
    try:
        deep_and = HEADER + "(assert " + "(and " * DEPTH + "(<= X_0 1) (>= X_0 0)" + ")" * DEPTH + ")\n" + \
            "(assert (<= Y_0 Y_1))"
        prop = _timed_parse(deep_and)
        assert prop is not None and prop.cases[0].lower.tolist() == [0.0] and prop.cases[0].upper.tolist() == [1.0]

        deep_or = HEADER + BOX + "(assert " + "(or " * DEPTH + "(<= Y_0 Y_1)" + ")" * DEPTH + ")"
        prop = _timed_parse(deep_or)
        assert prop is not None and len(prop.cases[0].polytopes) == 1

        deep_term = HEADER + BOX + "(assert (<= " + "(+ " * DEPTH + "Y_0" + ")" * DEPTH + " Y_1))"
        prop = _timed_parse(deep_term)
        assert prop is not None
        np.testing.assert_array_equal(prop.cases[0].polytopes[0][0], [[1.0, -1.0]])

        deep_neg = HEADER + BOX + "(assert (<= " + "(- " * DEPTH + "Y_0" + ")" * DEPTH + " 0))"  # even: +Y_0
        prop = _timed_parse(deep_neg)
        np.testing.assert_array_equal(prop.cases[0].polytopes[0][0], [[1.0, 0.0]])

        for bad in (HEADER + BOX + "(assert " + "(" * DEPTH + ")" * DEPTH + ")",
                    HEADER + "(" * DEPTH, ")" * DEPTH, "(" * DEPTH + ")" * DEPTH,
                    HEADER + BOX + "(assert (<= " + "(" * DEPTH + "Y_0" + ")" * DEPTH + " 1))",
                    HEADER + BOX + "(assert " + "(and " * DEPTH + "(foo Y_0)" + ")" * DEPTH + ")"):
            assert _timed_parse(bad) is None
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize("atom,words", [
    ("(<= X_0 1e400)", "out of range"),
    ("(<= X_0 -1e400)", "out of range"),
    ("(<= X_0 " + "9" * 10_000 + ")", "out of range"),
    ("(<= X_" + "9" * 10_000 + " 1)", "unknown token"),
    ("(<= X_0 nan)", "unknown token"),
    ("(<= X_0 inf)", "unknown token"),
    ("(<= X_0 1_0)", "unknown token"),
    ("(<= X_٣ 1)", "unknown token"),
    ("(<= (* 1e300 1e300 Y_0) Y_1)", "overflows"),
    ("(<= (+ 1e308 1e308 Y_0) Y_1)", "overflows"),
    ("(<= (* 1e-300 X_0) 1e300)", "overflows"),
    ("(<= (-) 1)", "'-' needs"),
    ("(<= Y_0 (* Y_0 Y_1))", "not linear"),
    ("(<= Y_0 Y_1 Y_0)", "takes two arguments"),
])
def test_vnnlib_huge_numbers_and_bad_terms_are_refused(atom, words):
    text = HEADER + BOX + f"(assert {atom})\n(assert (<= Y_0 Y_1))"
    with pytest.raises(VnnlibError) as err:
        parse_vnnlib(text)
    assert_one_line(err.value)
    assert words in str(err.value) and "line 6" in str(err.value)


def test_vnnlib_huge_but_finite_numbers_and_empty_boxes():
    """Correct results at the edges: 1e308 and 5e-324 are kept exactly; a disjunct whose box is
    empty (lower > upper) is no part of the unsafe set, so it is dropped, and a property whose
    every disjunct is empty has no cases (nothing can reach the unsafe set)."""
    prop = parse_vnnlib(HEADER + "(assert (<= X_0 1e308))\n(assert (>= X_0 5e-324))\n(assert (<= Y_0 -1e308))")
    assert prop.cases[0].upper[0] == 1e308 and prop.cases[0].lower[0] == 5e-324
    np.testing.assert_array_equal(prop.cases[0].polytopes[0][1], [-1e308])
    two = HEADER + "(assert (or (and (<= X_0 0) (>= X_0 1) (<= Y_0 Y_1)) (and (<= X_0 2) (>= X_0 1) (<= Y_1 Y_0))))"
    prop = parse_vnnlib(two)
    assert len(prop.cases) == 1 and prop.cases[0].lower.tolist() == [1.0]
    assert parse_vnnlib(HEADER + "(assert (<= X_0 0))\n(assert (>= X_0 1))\n(assert (<= Y_0 Y_1))").cases == []


def test_vnnlib_disjunction_blowup_is_refused_before_it_is_built():
    """(and (or a b) ...) with 40 disjunctions would be 2^40 disjuncts: refused at once."""
    text = HEADER + BOX + "(assert (and" + " (or (<= Y_0 Y_1) (<= Y_1 Y_0))" * 40 + "))"
    t0 = time.perf_counter()
    with pytest.raises(VnnlibError, match="too many disjuncts") as err:
        parse_vnnlib(text)
    assert time.perf_counter() - t0 < 10
    assert_one_line(err.value)


@FAST
@given(data=st.binary(max_size=400), gz=st.booleans())
def test_vnnlib_files_of_garbage_bytes(data, gz):
    """read_vnnlib on arbitrary bytes (invalid UTF-8, NULs, BOMs, gzip or not)."""
    path = WORK / ("garbage.vnnlib.gz" if gz else "garbage.vnnlib")
    path.write_bytes(data)
    try:
        check_property(read_vnnlib(path))
    except VnnlibError as e:
        assert_one_line(e)
        assert str(path) in str(e)


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00", b"\x1f\x8b\x08\x00garbage", SMALL.encode("utf-16"),
                                     "(declare-const X_0 Réal)".encode()])
@pytest.mark.parametrize("suffix", [".vnnlib", ".vnnlib.gz"])
def test_vnnlib_empty_binary_and_odd_encodings(tmp_path, content, suffix):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(content)
    with pytest.raises(VnnlibError) as err:
        read_vnnlib(path)
    assert_one_line(err.value)


def test_vnnlib_with_a_byte_order_mark_is_read(tmp_path):
    (tmp_path / "bom.vnnlib").write_bytes(b"\xef\xbb\xbf" + SMALL.encode())
    assert read_vnnlib(tmp_path / "bom.vnnlib").equals(parse_vnnlib(SMALL))


def test_vnnlib_truncated_and_valid_gzip(tmp_path):
    data = gzip.compress(SMALL.encode())
    (tmp_path / "ok.vnnlib.gz").write_bytes(data)
    assert read_vnnlib(tmp_path / "ok.vnnlib.gz").equals(parse_vnnlib(SMALL))
    for cut in (1, 10, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.vnnlib.gz").write_bytes(data[:cut])
        with pytest.raises(VnnlibError) as err:
            read_vnnlib(tmp_path / "cut.vnnlib.gz")
        assert_one_line(err.value)


# ====================================================================== ONNX


def small_model(dims=("b", 4), dtype=TensorProto.FLOAT, weights=np.float32) -> onnx.ModelProto:
    """x (batch, 4) → MatMul → Add → Relu → MatMul → y (batch, 3)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 5)).astype(weights), "W1"),
             numpy_helper.from_array(rng.standard_normal(5).astype(weights), "b1"),
             numpy_helper.from_array(rng.standard_normal((5, 3)).astype(weights), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    out_type = TensorProto.DOUBLE if weights == np.float64 else TensorProto.FLOAT
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, list(dims))],
                              [helper.make_tensor_value_info("y", out_type, ["b", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def load_everything(path: Path):
    """summarize_onnx, load_onnx and BoundedModel on ``path``: the BoundedModel, or None after
    one-line CertkitErrors (any other exception fails the test)."""
    from certkit.bounds import BoundedModel
    from certkit.onnx_io import load_onnx, summarize_onnx

    bm = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn in (summarize_onnx, load_onnx, BoundedModel):
            try:
                out = fn(path)
            except CertkitError as e:
                assert_one_line(e)
                continue
            if fn is BoundedModel:
                bm = out
    return bm


def agrees_with_onnxruntime(bm, path: Path) -> None:
    """A model certkit loads computes what onnxruntime computes (where onnxruntime can run it)."""
    from certkit.ort_session import run_onnxruntime

    x = torch.rand(2, *bm.graph.input_shape)
    try:
        ref = run_onnxruntime(path, x.numpy())
    except CertkitError:
        return  # onnxruntime refuses a file certkit reads: nothing to compare
    with torch.no_grad():
        out = bm(x.to(bm.dtype)).double().numpy()
    scale = np.abs(ref[np.isfinite(ref)]).max(initial=0.0)
    np.testing.assert_allclose(out.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4 * (1 + scale))


BASE = small_model().SerializeToString()
byte_edit = st.tuples(st.sampled_from(["flip", "delete", "insert", "truncate"]), st.integers(0, len(BASE) - 1),
                      st.binary(min_size=1, max_size=8))


@settings(FAST, max_examples=40)
@given(edits=st.lists(byte_edit, min_size=1, max_size=4))
def test_onnx_mutated_protobuf_bytes(edits):
    data = bytearray(BASE)
    for kind, pos, blob in edits:
        pos %= max(1, len(data))
        if kind == "flip":
            data[pos:pos + len(blob)] = blob
        elif kind == "delete":
            del data[pos:pos + len(blob)]
        elif kind == "insert":
            data[pos:pos] = blob
        else:
            del data[pos:]
    path = WORK / "mutated.onnx"
    path.write_bytes(bytes(data))
    bm = load_everything(path)
    if bm is not None:
        agrees_with_onnxruntime(bm, path)


def _edit(fn) -> onnx.ModelProto:
    m = small_model()
    fn(m)
    return m


def _set_dim(m: onnx.ModelProto, k: int, value) -> None:
    d = m.graph.input[0].type.tensor_type.shape.dim[k]
    d.Clear()
    if isinstance(value, str):
        d.dim_param = value
    else:
        d.dim_value = value


HOSTILE_MODELS = {
    "missing initializer": (lambda m: m.graph.ClearField("initializer"), None),
    "cyclic graph": (lambda m: m.graph.node[0].input.__setitem__(0, "y"), None),
    "cycle through relu": (lambda m: m.graph.node[0].input.__setitem__(0, "r"), None),
    "empty graph": (lambda m: [m.graph.ClearField(f) for f in ("node", "output", "initializer")], None),
    "no nodes": (lambda m: m.graph.ClearField("node"), None),
    "no outputs": (lambda m: m.graph.ClearField("output"), None),
    "two outputs": (lambda m: m.graph.output.append(helper.make_tensor_value_info("h1", TensorProto.FLOAT, ["b", 5])),
                    None),
    "two inputs": (lambda m: m.graph.input.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["b", 4])),
                   "exactly one input"),
    "zero-size dim": (lambda m: _set_dim(m, 1, 0), "must be positive"),
    "negative dim": (lambda m: _set_dim(m, 1, -3), "must be positive"),
    "huge dim": (lambda m: _set_dim(m, 1, 10**12), "limit"),
    "huge dims multiply": (lambda m: [m.graph.input[0].type.tensor_type.shape.dim.add().__setattr__("dim_value", 10**6)
                                      for _ in range(3)], "limit"),
    "scalar input": (lambda m: m.graph.input[0].type.tensor_type.shape.ClearField("dim"), "expected (batch"),
    "input without type": (lambda m: m.graph.input[0].ClearField("type"), None),
    "int64 input": (lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", TensorProto.INT64),
                    "element type INT64"),
    "float16 input": (lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", TensorProto.FLOAT16),
                      "element type FLOAT16"),
    "bool input": (lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", TensorProto.BOOL), "BOOL"),
    "initializer without data": (lambda m: m.graph.initializer[0].ClearField("raw_data"), "initializer"),
    "initializer with huge dims": (lambda m: m.graph.initializer[0].dims.__setitem__(0, 10**12), "initializer"),
    "initializer of the wrong type": (lambda m: setattr(m.graph.initializer[0], "data_type", TensorProto.INT64),
                                      "initializer"),
    "unknown operator": (lambda m: setattr(m.graph.node[2], "op_type", "NoSuchOp"), "NoSuchOp"),
    "no opset": (lambda m: m.ClearField("opset_import"), None),
    "duplicate output name": (lambda m: m.graph.node[1].output.__setitem__(0, "h"), None),
}


@pytest.mark.parametrize("name", list(HOSTILE_MODELS))
def test_onnx_hostile_structures(tmp_path, name):
    edit, words = HOSTILE_MODELS[name]
    path = tmp_path / "m.onnx"
    path.write_bytes(_edit(edit).SerializeToString())
    t0 = time.perf_counter()
    bm = load_everything(path)
    assert time.perf_counter() - t0 < 30
    if words is not None:
        from certkit.bounds import BoundedModel

        assert bm is None
        with pytest.raises(CertkitError, match=re.escape(words)):
            BoundedModel(path)
    elif bm is not None:
        agrees_with_onnxruntime(bm, path)


@pytest.mark.parametrize("weights", [np.float32, np.float64])
def test_onnx_double_input_is_read_and_matches_onnxruntime(tmp_path, weights):
    """A float64 input is a correct result, not an error: float32 points are exact in float64."""
    path = tmp_path / "d.onnx"
    path.write_bytes(small_model(dtype=TensorProto.DOUBLE, weights=weights).SerializeToString())
    bm = load_everything(path)
    assert bm is not None
    agrees_with_onnxruntime(bm, path)


def test_onnx_huge_dim_is_refused_before_any_allocation(tmp_path):
    """An input of 10^12 values per sample: the error comes at once, and memory stays flat."""
    import resource

    from certkit.bounds import BoundedModel
    from certkit.bounds.graph import MAX_INPUT_ELEMENTS, build_graph

    path = tmp_path / "h.onnx"
    path.write_bytes(_edit(lambda m: _set_dim(m, 1, 10**12)).SerializeToString())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CertkitError, match="limit") as err:
        BoundedModel(path)
    assert_one_line(err.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing near 4 TB was tried
    with pytest.raises(CertkitError, match="limit"):
        build_graph(torch.nn.Flatten(), (MAX_INPUT_ELEMENTS + 1,))
    with pytest.raises(CertkitError, match="positive"):
        build_graph(torch.nn.Flatten(), (3, 0))


# ====================================================================== ε strings

EPS_CASES = {"8/255": 8 / 255, "0.1": 0.1, "1e-3": 1e-3, "0": 0.0, "-0": 0.0, ".5": 0.5, "5.": 5.0, " 2/4 ": 0.5,
             "+1": 1.0, "0/5": 0.0, "1E-2": 0.01, "8 / 255": 8 / 255}
EPS_BAD = ["-1", "nan", "NaN", "inf", "-inf", "1/0", "0/0", "", " ", "8/255/2", "٣", "１/２", "1e400", "1e-400",
           "1/1e400", "1e300/1e-300", "9" * 10_000, "1_0", "0x10", "e5", ".", "1/", "/2", "eps", "\x00", "1\x002",
           "8/255 ", "0.1.2", "--1", "2**-8"]


@pytest.mark.parametrize("text,value", EPS_CASES.items())
def test_eps_strings_that_are_numbers(text, value):
    assert parse_eps(text) == value


@pytest.mark.parametrize("text", [t for t in EPS_BAD if t != "8/255 "])
def test_eps_strings_that_are_refused(text):
    with pytest.raises(CertkitError) as err:
        parse_eps(text)
    assert_one_line(err.value)
    assert len(str(err.value)) < 200


@FAST
@given(text=st.one_of(st.text(max_size=30), st.from_regex(r"[+-]?[0-9]{0,400}(\.[0-9]*)?([eE][+-]?[0-9]{1,4})?"
                                                          r"(/[+-]?[0-9]*\.?[0-9]*([eE][+-]?[0-9]{1,4})?)?",
                                                          fullmatch=True)))
def test_eps_random_strings(text):
    """Every string: a finite ε >= 0 equal to Python's reading of the number or fraction, or one line."""
    try:
        value = parse_eps(text)
    except CertkitError as e:
        assert_one_line(e)
        return
    assert math.isfinite(value) and value >= 0
    num, _, den = text.strip().partition("/")
    expected = float(num) / float(den) if den else float(num)
    assert value == expected + 0.0


@FAST
@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_eps_numbers(value):
    try:
        eps = parse_eps(value)
    except CertkitError as e:
        assert_one_line(e)
        assert not math.isfinite(value) or value < 0
        return
    assert eps == value and eps >= 0


# ====================================================================== dataset strings


def _npz(name: str, **arrays) -> str:
    path = WORK / name
    np.savez(path, **arrays)
    return f"npz:{path}"


def _dataset_cases() -> dict[str, tuple[str, str]]:
    """dataset string → (a word the error must contain)."""
    x = np.zeros((2, 4), np.float32)
    (WORK / "garbage.npz").write_bytes(b"PK\x03\x04garbage")
    (WORK / "empty_file.npz").write_bytes(b"")
    np.save(WORK / "single.npy", x)
    return {
        "unknown name": ("imagenet", "unknown dataset"),
        "upper case": ("MNIST", "unknown dataset"),
        "empty": ("", "unknown dataset"),
        "nul": ("\x00", "unknown dataset"),
        "bare npz": ("npz:", "no such file"),
        "missing file": (f"npz:{WORK / 'nope.npz'}", "no such file"),
        "name too long": ("npz:" + "x" * 5000, "too long"),
        "folder": (f"npz:{WORK}", "no such file"),
        "not a zip": (f"npz:{WORK / 'garbage.npz'}", "not a readable"),
        "empty file": (f"npz:{WORK / 'empty_file.npz'}", "not a readable"),
        "single array": (f"npz:{WORK / 'single.npy'}", "not an .npz archive"),
        "no y": (_npz("no_y.npz", x=x), "needs arrays"),
        "strings": (_npz("str.npz", x=np.array(["a", "b"]), y=np.array([0, 1])), "real-valued"),
        "scalar x": (_npz("scalar.npz", x=np.array(1.0), y=np.array(1)), "real-valued"),
        "complex x": (_npz("complex.npz", x=x.astype(np.complex64), y=np.array([0, 1])), "real-valued"),
        "object x": (_npz("object.npz", x=np.array([{}, 1], dtype=object), y=np.array([0, 1])), "not a readable"),
        "nan label": (_npz("nan_y.npz", x=x, y=np.array([np.nan, 1.0])), "integer class labels"),
        "fractional label": (_npz("frac_y.npz", x=x, y=np.array([0.5, 1.0])), "integer class labels"),
        "negative label": (_npz("neg_y.npz", x=x, y=np.array([-1, 1])), "whole numbers >= 0"),
        "huge label": (_npz("big_y.npz", x=x, y=np.array([2**63 + 5, 1], dtype=np.uint64)), "< 2**63"),
        "string labels": (_npz("str_y.npz", x=x, y=np.array(["a", "b"])), "integer class labels"),
        "count mismatch": (_npz("count.npz", x=x, y=np.array([0, 1, 2])), "labels in y"),
        "no samples": (_npz("none.npz", x=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64)), "outside"),
        "wrong shape": (_npz("shape.npz", x=np.zeros((2, 5), np.float32), y=np.array([0, 1])), "expects"),
    }


DATASETS = _dataset_cases()


@pytest.mark.parametrize("name", list(DATASETS))
def test_dataset_strings_that_are_refused(name):
    from certkit.verify import load_verify_data

    dataset, words = DATASETS[name]
    with pytest.raises(CertkitError) as err:
        load_verify_data(dataset, str(WORK / "no_data_here"), 0, 2, (4,))
    assert_one_line(err.value)
    assert words in str(err.value), str(err.value)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "tinyimagenet"])
def test_known_datasets_without_their_files(tmp_path, dataset):
    from certkit.verify import load_verify_data

    with pytest.raises(CertkitError, match="set --data-dir") as err:
        load_verify_data(dataset, str(tmp_path), 0, 2, (1, 28, 28))
    assert_one_line(err.value)


def test_dataset_npz_that_is_valid_reads_exactly():
    from certkit.verify import load_verify_data

    x = np.arange(24, dtype=np.uint8).reshape(3, 2, 4)
    dataset = _npz("good.npz", x=x, y=np.array([2.0, 0.0, 1.0]))  # whole-number float labels are fine
    xs, ys, idx = load_verify_data(dataset, None, 1, 5, (8,))
    assert xs.shape == (2, 8) and xs.dtype == torch.float32
    np.testing.assert_allclose(xs.numpy(), x[1:].reshape(2, 8) / 255, rtol=1e-6)
    assert ys.tolist() == [0, 1] and ys.dtype == torch.int64 and idx.tolist() == [1, 2]


@settings(FAST, max_examples=30)
@given(data=st.binary(max_size=200))
def test_dataset_npz_of_garbage_bytes(data):
    from certkit.verify import load_verify_data

    path = WORK / "random.npz"
    path.write_bytes(data)
    with pytest.raises(CertkitError) as err:
        load_verify_data(f"npz:{path}", None, 0, 1, (4,))
    assert_one_line(err.value)


# ====================================================================== through the CLI


def _cli(*args: str | Path):
    """The CLI in this process (the worker that run-instance starts still runs as its own process)."""
    from click.testing import CliRunner

    from certkit.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny.onnx"
    path.write_bytes(small_model().SerializeToString())
    return path


SAT_PROPERTY = ("".join(f"(declare-const X_{i} Real)\n" for i in range(4)) +
                "".join(f"(declare-const Y_{j} Real)\n" for j in range(3)) +
                "".join(f"(assert (<= X_{i} 0.1))\n(assert (>= X_{i} 0))\n" for i in range(4)) +
                "(assert (<= Y_0 1e9))\n")  # every input reaches it: sat
CLI_PROPERTIES = {"garbage.vnnlib": b"\x00\xff\xfe garbage \x80", "ok.vnnlib": SAT_PROPERTY.encode(),
                  "deep.vnnlib": b"(" * DEPTH, "huge.vnnlib": SMALL.replace("0.5", "1e400").encode()}


def run_instance_cli(tmp_path: Path, onnx_path: Path, name: str, capfd) -> None:
    """run-instance: a malformed property gives the result file `error`, exit status 1 and one
    `error:` line in the worker's log (no traceback); a well-formed one a valid answer."""
    prop = tmp_path / name
    prop.write_bytes(CLI_PROPERTIES[name])
    res = tmp_path / f"{name}.txt"
    capfd.readouterr()
    result = _cli("run-instance", onnx_path, prop, "--timeout", "60", "--results", res)
    log = capfd.readouterr().err
    assert "Traceback" not in log + result.output and "internal error" not in log, log
    text = res.read_text()
    if name == "ok.vnnlib":
        assert result.exit_code == 0 and text.splitlines()[0] == "sat", (result.output, log)
        assert re.search(r"\(X_0 [-+0-9.e]+\)", text) and "(Y_2 " in text, text
    else:
        assert result.exit_code == 1 and text.splitlines()[0] == "error", (result.output, log)
        assert len([ln for ln in log.splitlines() if "error:" in ln]) == 1, log


@pytest.mark.parametrize("name", ["garbage.vnnlib", "ok.vnnlib"])
def test_cli_run_instance_with_hostile_properties(tmp_path, tiny_onnx, capfd, name):
    run_instance_cli(tmp_path, tiny_onnx, name, capfd)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deep.vnnlib", "huge.vnnlib"])
def test_slow_cli_run_instance_with_hostile_properties(tmp_path, tiny_onnx, capfd, name):
    run_instance_cli(tmp_path, tiny_onnx, name, capfd)


@pytest.mark.parametrize("args,words", [
    (["--eps", "nan"], "bad epsilon"),
    (["--eps", "1e-400"], "rounds to 0"),
    (["--eps", "0.1", "--dataset", DATASETS["nan label"][0]], "integer class labels"),
    (["--eps", "0.1", "--dataset", "npz:" + "x" * 5000], "too long"),
    (["--eps", "0.1", "--dataset", "imagenet"], "unknown dataset"),
])
def test_cli_verify_with_hostile_strings(tiny_onnx, args, words):
    """Bad --eps and --dataset strings reach the user as one line with exit code 2."""
    result = _cli("verify", tiny_onnx, *args, *([] if "--dataset" in args else ["--dataset", "mnist"]))
    assert result.exit_code == 2, (args, result.output)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], (args, result.output)


def test_cli_paths_too_long_for_the_file_system(tiny_onnx):
    long = "x" * 5000
    for args in (["inspect", long], ["run-instance", long, long, "--timeout", "5", "--results", long]):
        result = _cli(*args)
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and "too long" in lines[0] and len(lines[0]) < 200, result.output


# ====================================================================== a wider sweep (-m slow)


@pytest.mark.slow
@SLOW
@given(seed=st.sampled_from(range(len(SEEDS))), edits=st.lists(mutation, min_size=1, max_size=12))
def test_slow_vnnlib_token_mutations(seed, edits):
    parse_or_error(mutate(SEEDS[seed], edits))


@pytest.mark.slow
@settings(SLOW, max_examples=500)
@given(edits=st.lists(byte_edit, min_size=1, max_size=8))
def test_slow_onnx_mutated_protobuf_bytes(edits):
    test_onnx_mutated_protobuf_bytes.hypothesis.inner_test(edits)
