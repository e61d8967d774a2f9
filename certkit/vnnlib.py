"""VNN-LIB 1.0 as the competitions use it: read (plain or .gz) and write.

A property describes the *unsafe* set; ``unsat`` means no input in the box reaches it. It
is normalised into a disjunction of :class:`Case`: an input box and a disjunction of
output polytopes ``A·y ≤ b``. Strict comparisons are read as non-strict (the closure of
the unsafe set: proving it empty is sound, and counterexamples are checked on the
original inequalities by the caller).

The reader streams tokens and builds expressions with an explicit stack, so files of
tens of MB and deep nesting are fine; errors name the line and the token.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from certkit.errors import CertkitError
from certkit.files import GZ_LIMIT, read_gz_capped, write_atomically

_TOKEN = re.compile(r";[^\n]*|\(|\)|[^\s();]+")
_VAR = re.compile(r"([XY])_([0-9]{1,12})$")  # ASCII digits only; a bounded index converts to int safely
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$")  # no nan, inf, 1_0 or unicode digits
MAX_DISJUNCTS = 1_000_000


class VnnlibError(CertkitError):
    """A malformed or unsupported VNN-LIB file (the message names the line)."""


@dataclass
class Case:
    """x in [lower, upper] and y in one of the polytopes A·y ≤ b."""

    lower: np.ndarray
    upper: np.ndarray
    polytopes: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


@dataclass
class Property:
    num_inputs: int
    num_outputs: int
    cases: list[Case]

    def equals(self, other: Property) -> bool:
        if (self.num_inputs, self.num_outputs, len(self.cases)) != (other.num_inputs, other.num_outputs,
                                                                     len(other.cases)):
            return False
        for a, b in zip(self.cases, other.cases):
            if not (np.array_equal(a.lower, b.lower) and np.array_equal(a.upper, b.upper)):
                return False
            if len(a.polytopes) != len(b.polytopes):
                return False
            for (A1, b1), (A2, b2) in zip(a.polytopes, b.polytopes):
                if not (np.array_equal(A1, A2) and np.array_equal(b1, b2)):
                    return False
        return True


class _Node(list):
    """An s-expression (a list) that remembers where it started."""

    offset = 0


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _parse_sexprs(text: str):
    """Top-level s-expressions as nested lists of str, built without recursion."""
    stack: list[_Node] = []
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if tok[0] == ";":
            continue
        if tok == "(":
            node = _Node()
            node.offset = m.start()
            stack.append(node)
        elif tok == ")":
            if not stack:
                raise VnnlibError(f"line {_line(text, m.start())}: unexpected ')'")
            node = stack.pop()
            if stack:
                stack[-1].append(node)
            else:
                yield node
        else:
            if not stack:
                raise VnnlibError(f"line {_line(text, m.start())}: token {_show(tok)} outside parentheses")
            stack[-1].append(tok)
    if stack:
        raise VnnlibError(f"line {_line(text, stack[-1].offset)}: '(' is never closed")


def _show(tok: str, limit: int = 40) -> str:
    """A token for an error message: repr'd, and cut short (a hostile file may hold a 1 MB token)."""
    return repr(tok) if len(tok) <= limit else repr(tok[:limit]) + "..."


def _bottom_up(root: _Node, children, leaf, combine):
    """The value of the tree ``root`` with children evaluated before parents, using an explicit
    stack (100,000 nested parentheses must not reach Python's recursion limit).

    ``children(node)`` checks a list node and returns the items to evaluate, ``leaf(token, node)``
    gives a string item's value, ``combine(node, values)`` a list node's from its items' values."""
    order, stack = [], [root]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(c for c in children(node) if not isinstance(c, str))
    values: dict[int, object] = {}
    for node in reversed(order):  # pre-order reversed: every node after all of its descendants
        items = [leaf(c, node) if isinstance(c, str) else values.pop(id(c)) for c in children(node)]
        values[id(node)] = combine(node, items)
    return values[id(root)]


class _Reader:
    def __init__(self, text: str):
        self.text = text
        self.nx = self.ny = 0

    def fail(self, node, msg: str):
        where = f"line {_line(self.text, node.offset)}: " if isinstance(node, _Node) else ""
        raise VnnlibError(where + msg)

    def linear(self, e, ctx) -> dict:
        """A linear term as {variable or '': coefficient} ('' is the constant)."""
        if isinstance(e, str):
            return self._linear_leaf(e, ctx)
        return _bottom_up(e, self._term_items, self._linear_leaf, self._linear_node)

    def _term_items(self, e) -> list:
        if not e or not isinstance(e[0], str):
            self.fail(e, "empty or malformed term")
        if e[0] not in ("+", "-", "*"):
            self.fail(e, f"unsupported operator {_show(e[0])} in a term")
        return e[1:]

    def _linear_leaf(self, tok: str, ctx) -> dict:
        m = _VAR.match(tok)
        if m:
            self.check_var(m, tok, ctx)
            return {tok: 1.0}
        if not _NUMBER.match(tok):
            self.fail(ctx, f"unknown token {_show(tok)}")
        value = float(tok)
        if not math.isfinite(value):
            self.fail(ctx, f"number {_show(tok)} is out of range")
        return {"": value}

    def _linear_node(self, e, args: list[dict]) -> dict:
        op = e[0]
        if op == "+":
            return _add(*args)
        if op == "-":
            if not args:
                self.fail(e, "'-' needs at least one argument")
            if len(args) == 1:
                return _scale(args[0], -1.0)
            return _add(args[0], *(_scale(a, -1.0) for a in args[1:]))
        consts = [a for a in args if set(a) <= {""}]
        others = [a for a in args if not set(a) <= {""}]
        if len(others) > 1:
            self.fail(e, "product of two variables is not linear")
        factor = math.prod(a.get("", 0.0) for a in consts)
        return _scale(others[0], factor) if others else {"": factor}

    def check_var(self, m, tok, ctx):
        n = self.nx if m.group(1) == "X" else self.ny
        if int(m.group(2)) >= n:
            self.fail(ctx, f"{tok} is not declared")

    def declare(self, e) -> None:
        """Count the variable of a ``(declare-const X_i|Y_j Real)`` command: X_ and Y_ must each be
        declared in order from 0, so the counts are the vector sizes and every index is known."""
        if len(e) != 3 or not isinstance(e[1], str):
            self.fail(e, "malformed declare-const")
        m = _VAR.match(e[1])
        if not m:
            self.fail(e, f"unsupported variable name {_show(e[1])} (expected X_i or Y_j)")
        idx = int(m.group(2))
        if m.group(1) == "X":
            if idx != self.nx:
                self.fail(e, f"X_{idx} declared out of order")
            self.nx += 1
        else:
            if idx != self.ny:
                self.fail(e, f"Y_{idx} declared out of order")
            self.ny += 1

    def formula(self, e):
        """DNF of a formula: a list of conjunctions, each a list of (coefficients, node) with
        Σ coefficients·vars + const ≤ 0."""
        if isinstance(e, str):
            self.fail(e, "expected a formula")
        return _bottom_up(e, self._formula_items, lambda tok, node: self.fail(node, "expected a formula"),
                          self._formula_node)

    def _formula_items(self, e) -> list:
        if not e or not isinstance(e[0], str):
            self.fail(e, "expected a formula")
        op = e[0]
        if op in ("<=", "<", ">=", ">"):
            if len(e) != 3:
                self.fail(e, f"{op} takes two arguments")
            return []  # an atom: its terms are read by _formula_node
        if op in ("and", "or"):
            return e[1:]
        self.fail(e, f"unsupported operator {_show(op)}")

    def _formula_node(self, e, parts: list):
        op = e[0]
        if op == "and":
            return _conjoin(parts, lambda: self.fail(e, "too many disjuncts"))
        if op == "or":
            if sum(len(p) for p in parts) > MAX_DISJUNCTS:
                self.fail(e, "too many disjuncts")
            return [c for part in parts for c in part]
        lhs, rhs = self.linear(e[1], e), self.linear(e[2], e)
        diff = _add(lhs, _scale(rhs, -1.0)) if op in ("<=", "<") else _add(rhs, _scale(lhs, -1.0))
        if not all(math.isfinite(v) for v in diff.values()):
            self.fail(e, "a coefficient or constant overflows to infinity")
        return [[(diff, e)]]


def _split_conjunction(parts: list[list[list]], too_many) -> tuple[list, list[list]]:
    """A conjunction of DNFs as (atoms common to every disjunct, each disjunct's own atoms):
    plain conjunctions are gathered once (linear time for the thousands of input bounds of
    image properties), products are taken only over real disjunctions."""
    common = [atom for f in parts if len(f) == 1 for atom in f[0]]
    extra: list[list] = [[]]
    for f in parts:
        if len(f) != 1:
            if len(extra) * len(f) > MAX_DISJUNCTS:  # checked before the product is built
                too_many()
            extra = [a + b for a, b in itertools.product(extra, f)]
    return common, extra


def _conjoin(parts: list[list[list]], too_many) -> list[list]:
    common, extra = _split_conjunction(parts, too_many)
    return [common + e for e in extra]


def _add(*terms: dict) -> dict:
    out: dict = {}
    for t in terms:
        for k, v in t.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _scale(t: dict, c: float) -> dict:
    return {k: v * c for k, v in t.items()}


def parse_vnnlib(text: str) -> Property:
    """Parse VNN-LIB text into a :class:`Property`."""
    r = _Reader(text)
    asserts = []
    for e in _parse_sexprs(text):
        if not e or not isinstance(e[0], str):
            r.fail(e, "malformed command")
        if e[0] == "declare-const":
            r.declare(e)
        elif e[0] == "assert":
            if len(e) != 2:
                r.fail(e, "assert takes one formula")
            asserts.append(e[1])
        else:
            r.fail(e, f"unsupported command {_show(e[0])}")
    if r.nx == 0 or r.ny == 0:
        raise VnnlibError("the property declares no X_ or no Y_ variables")
    def too_many():
        raise VnnlibError("too many disjuncts")

    common, extra = _split_conjunction([r.formula(a) for a in asserts], too_many)
    return Property(r.nx, r.ny, _cases(r, common, extra))


class _Conjunct:
    """The input box and output rows that a conjunction of atoms describes so far."""

    def __init__(self, r: _Reader):
        self.r = r
        self.lo, self.up = np.full(r.nx, -np.inf), np.full(r.nx, np.inf)
        self.rows: list[np.ndarray] = []
        self.consts: list[float] = []
        self.empty = False

    def copy(self) -> _Conjunct:
        c = _Conjunct.__new__(_Conjunct)
        c.r, c.lo, c.up = self.r, self.lo.copy(), self.up.copy()
        c.rows, c.consts, c.empty = list(self.rows), list(self.consts), self.empty
        return c

    def add(self, atoms) -> _Conjunct:
        r = self.r
        for coeffs, node in atoms:
            xs = [k for k, v in coeffs.items() if v != 0 and k[:1] == "X"]
            ys = [k for k, v in coeffs.items() if v != 0 and k[:1] == "Y"]
            c = coeffs.get("", 0.0)
            if xs and ys:
                r.fail(node, "constraints mixing inputs and outputs are not supported")
            if xs:
                if len(xs) > 1:
                    r.fail(node, "only bounds on single inputs are supported (X_i <= c, X_i >= c)")
                a, i = coeffs[xs[0]], int(xs[0][2:])
                bound = -c / a
                if not math.isfinite(bound):
                    r.fail(node, f"the bound on {xs[0]} overflows to infinity")
                if a > 0:
                    self.up[i] = min(self.up[i], bound)
                else:
                    self.lo[i] = max(self.lo[i], bound)
            elif ys:
                row = np.zeros(r.ny)
                for k in ys:
                    row[int(k[2:])] = coeffs[k]
                self.rows.append(row)
                self.consts.append(-c)
            elif c > 0:
                self.empty = True  # a false constant constraint: this disjunct is empty
        return self


def _cases(r: _Reader, common: list, extra: list[list]) -> list[Case]:
    base = _Conjunct(r).add(common)
    cases: list[Case] = []
    index: dict[tuple, Case] = {}
    for atoms in extra:
        conj = base.copy().add(atoms)
        if conj.empty or (conj.lo > conj.up).any():  # no input satisfies it: that part of the unsafe set is empty
            continue
        missing = np.flatnonzero(~np.isfinite(conj.lo) | ~np.isfinite(conj.up))
        if len(missing):
            raise VnnlibError(f"input X_{missing[0]} has no lower or upper bound")
        key = (conj.lo.tobytes(), conj.up.tobytes())
        case = index.get(key)
        if case is None:
            case = index[key] = Case(conj.lo, conj.up)
            cases.append(case)
        case.polytopes.append((np.array(conj.rows).reshape(len(conj.rows), r.ny), np.array(conj.consts)))
    return cases


def read_vnnlib(path: str | Path, gz_limit: int = GZ_LIMIT) -> Property:
    """Read a .vnnlib or .vnnlib.gz file (a file, or a .gz's decompressed text, of more than
    ``gz_limit`` bytes is refused before it is read whole)."""
    path = Path(path)
    if not path.is_file():
        raise VnnlibError(f"{path}: no such file")
    try:
        if path.suffix != ".gz" and path.stat().st_size > gz_limit:
            raise VnnlibError(f"{path}: larger than {gz_limit / 2**20:g} MiB, the limit for a VNN-LIB file; refused")
        raw = read_gz_capped(path, gz_limit) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8-sig")  # a BOM (Windows editors) is no part of the text
    except (OSError, UnicodeDecodeError) as e:
        raise VnnlibError(f"{path}: cannot read ({e})") from None
    except CertkitError as e:
        raise VnnlibError(str(e)) from None
    try:
        return parse_vnnlib(text)
    except VnnlibError as e:
        raise VnnlibError(f"{path}: {e}") from None


# ------------------------------------------------------------------------ writing


def _atom(row: np.ndarray, c: float) -> str:
    """The constraint row·y ≤ c, in the competitions' plain form where it has one:
    (<= Y_a Y_b), (<= Y_j c) or (>= Y_j -c); a general linear term otherwise."""
    nz = np.flatnonzero(row)
    if len(nz) == 2 and c == 0 and sorted(row[nz].tolist()) == [-1.0, 1.0]:
        a, b = (nz[0], nz[1]) if row[nz[0]] == 1 else (nz[1], nz[0])
        return f"(<= Y_{a} Y_{b})"
    if len(nz) == 1 and abs(row[nz[0]]) == 1:
        return f"(<= Y_{nz[0]} {c!r})" if row[nz[0]] == 1 else f"(>= Y_{nz[0]} {-c!r})"
    parts = [f"(* {float(row[j])!r} Y_{j})" for j in nz]
    term = "0.0" if not parts else parts[0] if len(parts) == 1 else f"(+ {' '.join(parts)})"
    return f"(<= {term} {c!r})"


def format_vnnlib(prop: Property, comment: str = "") -> str:
    """VNN-LIB text whose :func:`parse_vnnlib` gives back ``prop`` exactly."""
    lines = [f"; {line}" for line in comment.splitlines()] if comment else []
    lines += [f"(declare-const X_{i} Real)" for i in range(prop.num_inputs)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(prop.num_outputs)]
    lines.append("")

    def box(case: Case) -> list[str]:
        return [f"(<= X_{i} {float(u)!r}) (>= X_{i} {float(lo)!r})" for i, (lo, u) in
                enumerate(zip(case.lower, case.upper))]

    def polytope(A: np.ndarray, b: np.ndarray) -> str:
        return "(and " + " ".join(_atom(row, float(c)) for row, c in zip(A, b)) + ")"

    if len(prop.cases) == 1:
        case = prop.cases[0]
        lines += [f"(assert {atom})" for pair in box(case) for atom in _split_pair(pair)]
        lines.append("(assert (or")
        lines += [f"    {polytope(A, b)}" for A, b in case.polytopes]
        lines.append("))")
    else:
        lines.append("(assert (or")
        for case in prop.cases:
            for A, b in case.polytopes:
                lines.append(f"    (and {' '.join(box(case))} {polytope(A, b)})")
        lines.append("))")
    return "\n".join(lines) + "\n"


def _split_pair(pair: str) -> list[str]:
    first, second = pair.split(") (")
    return [first + ")", "(" + second]


def robustness_case(lo: np.ndarray, up: np.ndarray, label: int, num_outputs: int) -> Case:
    """Input box over X_i (row-major order) and the unsafe set "some class j ≠ label scores
    at least as high as the label" (Y_label − Y_j ≤ 0 for some j), one polytope per j."""
    polys = []
    for j in range(num_outputs):
        if j != label:
            row = np.zeros(num_outputs)
            row[label], row[j] = 1.0, -1.0
            polys.append((row.reshape(1, -1), np.zeros(1)))
    return Case(np.asarray(lo, np.float64).reshape(-1), np.asarray(up, np.float64).reshape(-1), polys)


def robustness_property(lo: np.ndarray, up: np.ndarray, label: int, num_outputs: int, comment: str = "") -> str:
    """The VNN-LIB text of :func:`robustness_case`."""
    case = robustness_case(lo, up, label, num_outputs)
    return format_vnnlib(Property(case.lower.size, num_outputs, [case]), comment)


def write_property(path: str | Path, text: str) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def write_instances(path: str | Path, rows: list[tuple[str, str, float]]) -> None:
    """instances.csv: onnx path, vnnlib path, timeout (seconds), no header."""
    write_atomically(path, lambda tmp: Path(tmp).write_text("".join(f"{o},{v},{t:g}\n" for o, v, t in rows)))
