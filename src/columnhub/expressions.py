"""The safe expression language: derived columns computed from other columns.

An expression such as ``num(Jet_pt[abs(Jet_eta) < 2.4]) >= 2`` is parsed with
:func:`ast.parse` (``mode="eval"``), checked node by node against a whitelist
and compiled into a small tree of picklable evaluation nodes that call
awkward/numpy operations on whole arrays (no per-event Python). User text is
never given to ``eval``, ``exec`` or ``compile``.

Literals become numpy scalars, and every evaluation runs inside
``np.errstate(all="ignore")``: ``9**9**9`` wraps around in int64 instead of
computing a huge Python integer, ``1/0`` is ``inf``. When a literal meets an
array it is passed on as a plain Python number so that numpy's weak scalar
promotion keeps the array's dtype (``Jet_pt * 2`` stays ``float32``, exactly as
hand-written awkward code would).

The language is documented in ``docs/expressions.md``.

>>> import awkward as ak
>>> expr = parse("num(Jet_pt[Jet_pt > 30])")
>>> sorted(expr.names)
['Jet_pt']
>>> expr.evaluate({"Jet_pt": ak.Array([[50.0, 20.0, 40.0], [], [10.0]])}).tolist()
[2, 0, 0]
"""

from __future__ import annotations

import ast
import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import awkward as ak
import numpy as np

from columnhub.errors import ColumnNotFoundError, ExpressionError, closest

__all__ = [
    "CONSTANTS",
    "FUNCTIONS",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "Expression",
    "parse",
]

MAX_LENGTH = 10_000
"""Longest expression text accepted, in characters."""

MAX_DEPTH = 100
"""Deepest nesting of syntax-tree nodes accepted."""

CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}
"""Named constants; they take precedence over columns of the same name."""

_Value = Any  # ak.Array or a numpy scalar (np.generic)


# --------------------------------------------------------------------------- helpers


def _is_scalar(value: _Value) -> bool:
    return isinstance(value, np.generic)


def _weak(value: _Value) -> _Value:
    """A numpy scalar as a Python number (weakly typed for numpy); arrays unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def _call_mixed(func: Callable[..., Any], args: tuple[_Value, ...]) -> _Value:
    """Apply a numpy function to scalars and/or arrays with the promotion rules above."""
    if all(_is_scalar(a) for a in args):
        out = func(*args)
        return out[()] if isinstance(out, np.ndarray) else out
    return func(*(_weak(a) for a in _spread_missing(args)))


def _ndim(value: _Value) -> int:
    if _is_scalar(value):
        return 0
    return int(value.ndim)


def _literal(value: bool | float) -> np.generic:
    """A Python literal as a numpy scalar (never a Python int, so no bignum arithmetic)."""
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int):
        if -(2**63) <= value < 2**63:
            return np.int64(value)
        try:
            return np.float64(float(value))
        except OverflowError:
            return np.float64(np.inf if value > 0 else -np.inf)
    return np.float64(value)


def _short_error(err: BaseException) -> str:
    """The first paragraph of an (often very long) awkward/numpy error message."""
    text = str(err).strip() or type(err).__name__
    text = text.split("\n\nThis error occurred while", 1)[0].strip()
    if len(text) > 500:
        text = text[:500] + "..."
    return f"{type(err).__name__}: {text}"


# --------------------------------------------------------------------------- missing values
#
# Booleans with missing values (awkward option types, at any depth) follow SQL's
# three-valued (Kleene) logic, as pandas' nullable booleans and Arrow's
# and_kleene/or_kleene do. AND, OR, any() and all() are monotone, so their result
# is known exactly where the two extreme completions of the missing items (every
# None read as False, every None read as True) agree, and missing where they
# differ. ``~``/``not`` and ``^`` of a missing value are missing, which is what
# awkward's ufuncs already give.


def _has_option(value: _Value) -> bool:
    """Whether an array has missing values (an option type) at any depth."""
    if _is_scalar(value):
        return False
    layout = ak.to_layout(value)
    while True:
        if layout.is_option:
            return True
        if not hasattr(layout, "content"):
            return False
        layout = layout.content


def _is_boolean(value: _Value) -> bool:
    """Whether ``value`` is a boolean scalar or a (possibly jagged, optional) boolean array."""
    if _is_scalar(value):
        return bool(value.dtype == np.bool_)
    return _is_bool(value)


def _fill_items(x: _Value, *, value: bool) -> _Value:
    """Missing innermost items of ``x`` replaced by ``value``; missing lists stay missing."""
    if _is_scalar(x):
        return x
    return ak.fill_none(x, value, axis=-1)


def _option_parts(layout: Any) -> tuple[Any, np.ndarray]:
    """An option-type layout as its content (same length) and where it is valid."""
    n = len(layout)
    if isinstance(layout.content, ak.contents.EmptyArray):  # all missing, of no type
        return ak.contents.NumpyArray(np.zeros(n, dtype=np.bool_)), np.zeros(n, dtype=np.bool_)
    if isinstance(layout, ak.contents.BitMaskedArray):
        masked = layout.to_ByteMaskedArray()
    else:
        masked = layout.to_ByteMaskedArray(True)
    return masked.content, np.asarray(masked.mask_as_bool(valid_when=True))


def _spread_missing(values: tuple[_Value, ...]) -> tuple[_Value, ...]:
    """A missing per-event value meets a list as a list of missing items.

    awkward broadcasts a missing value into a missing *list*, which no ``|``
    can recover; here ``Jet_pt > f.cut`` for an event without ``f.cut`` is one
    missing item per jet, so ``(Jet_pt > f.cut) | (Jet_eta > 2)`` still selects
    the forward jets. Only the outermost missing values of the shallower
    operands are spread; a missing list of the deepest operand stays missing.
    """
    arrays = [v for v in values if isinstance(v, ak.Array)]
    if len(arrays) < 2:
        return values
    deepest = max(arrays, key=lambda a: a.ndim)
    out = []
    for v in values:
        if isinstance(v, ak.Array) and v.ndim < deepest.ndim and v.layout.is_option:
            parts = _option_parts(v.layout)
            content, valid = ak.Array(parts[0]), ak.Array(parts[1])
            content, valid, _ = ak.broadcast_arrays(content, valid, deepest)
            v = ak.mask(content, valid)
        out.append(v)
    return tuple(out)


def _unknown_where_differ(low: _Value, high: _Value) -> _Value:
    """``low`` where it equals ``high``, None elsewhere."""
    return ak.mask(low, low == high)


def _kleene(func: np.ufunc, a: _Value, b: _Value) -> _Value:
    """``&`` (``np.bitwise_and``) or ``|`` (``np.bitwise_or``) in three-valued logic.

    Integers (and booleans without missing values) get the plain bitwise ufunc.

    >>> a, b = ak.Array([True, False, None, None]), ak.Array([None, None, True, False])
    >>> _kleene(np.bitwise_or, a, b).tolist()
    [True, None, True, None]
    >>> _kleene(np.bitwise_and, a, b).tolist()
    [None, False, None, False]
    """
    if not (_has_option(a) or _has_option(b)) or not (_is_boolean(a) and _is_boolean(b)):
        return _call_mixed(func, (a, b))
    low = _call_mixed(func, (_fill_items(a, value=False), _fill_items(b, value=False)))
    high = _call_mixed(func, (_fill_items(a, value=True), _fill_items(b, value=True)))
    return _unknown_where_differ(low, high)


def _kleene_reduce(func: Callable[..., Any], x: _Value) -> _Value:
    """``ak.any``/``ak.all`` over each innermost list in three-valued logic.

    ``any``: True if an item is True, else None if an item is None, else False;
    ``all`` is its dual. An empty list gives False (any) and True (all).
    """
    if not _has_option(x):
        return func(x, axis=-1)
    if not _is_bool(x):
        x = x != 0  # what any/all test of a number; None stays None
    low = func(_fill_items(x, value=False), axis=-1)
    high = func(_fill_items(x, value=True), axis=-1)
    return _unknown_where_differ(low, high)


# --------------------------------------------------------------------------- functions


def _need_jagged(what: str, value: _Value) -> None:
    if _ndim(value) < 2:
        msg = (
            f"{what} works on the per-event lists of a jagged column, but its argument "
            "has one value per event (or is a constant); pass a jagged column such as Jet_pt"
        )
        raise TypeError(msg)


def _reducer(name: str, func: Callable[[Any], Any]) -> Callable[[_Value], _Value]:
    def reduce(x: _Value) -> _Value:
        _need_jagged(f"{name}()", x)
        return func(x)

    return reduce


def _where(cond: _Value, a: _Value, b: _Value) -> _Value:
    if all(_is_scalar(v) for v in (cond, a, b)):
        return np.asarray(np.where(cond, a, b))[()]
    if _is_scalar(cond):
        template = a if not _is_scalar(a) else b
        cond = ak.full_like(template, bool(cond), dtype=bool)
    cond, a, b = _spread_missing((cond, a, b))
    if not all(_plain_numbers(v) for v in (cond, a, b)):
        return ak.where(cond, _weak(a), _weak(b))
    return _where_numbers(cond, a, b)


def _plain_numbers(value: _Value) -> bool:
    """Whether ``value`` is a scalar or an array of (lists of, optional) numbers or booleans."""
    if _is_scalar(value):
        return True
    layout = ak.to_layout(value)
    while hasattr(layout, "content"):
        if layout.parameter("__array__") is not None:  # strings, bytestrings
            return False
        layout = layout.content
    return bool(layout.is_numpy) and layout.parameter("__array__") is None


def _numbers_and_valid(layout: Any) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A leaf's numbers and validity (None: all valid), or None above the leaves."""
    if layout.is_numpy:
        return layout.data, None
    if layout.is_option and layout.content.is_numpy:
        content, valid = _option_parts(layout)
        return content.data, valid
    return None


def _where_numbers(cond: _Value, a: _Value, b: _Value) -> _Value:
    """``where`` on numbers, per item: missing where ``cond`` or the chosen value is missing.

    Lists (and missing lists) are broadcast by awkward as for any ufunc;
    ``ak.where`` itself turns a missing list into a list of one missing item.
    """
    operands = (cond, a, b)
    is_array = [isinstance(v, ak.Array) for v in operands]

    def at_leaves(layouts: Any, **_: Any) -> Any:
        layouts = layouts if isinstance(layouts, list | tuple) else [layouts]
        found = [_numbers_and_valid(layout) for layout in layouts]
        leaves = [f for f in found if f is not None]
        if len(leaves) < len(found):
            return None  # not at the leaves yet: let awkward broadcast this level
        parts = iter(leaves)
        picked = [
            next(parts) if array else (_weak(v), None)
            for v, array in zip(operands, is_array, strict=True)
        ]
        (c, c_ok), (x, x_ok), (y, y_ok) = picked
        n = len(layouts[0])
        out = np.broadcast_to(np.where(c, x, y), (n,))
        content = ak.contents.NumpyArray(np.ascontiguousarray(out))
        if c_ok is None and x_ok is None and y_ok is None:
            return content
        every = np.ones(n, dtype=np.bool_)
        chosen = np.where(c, every if x_ok is None else x_ok, every if y_ok is None else y_ok)
        valid = (every if c_ok is None else c_ok) & chosen
        return ak.contents.ByteMaskedArray(
            ak.index.Index8(valid.view(np.int8)), content, valid_when=True
        )

    return ak.transform(at_leaves, *(v for v in operands if isinstance(v, ak.Array)))


def _round(x: _Value, decimals: _Value = None) -> _Value:
    if decimals is None:
        return _call_mixed(np.round, (x,))
    if not (_is_scalar(decimals) and np.issubdtype(decimals.dtype, np.integer)):
        msg = "round(x, n): n must be an integer literal such as 2"
        raise TypeError(msg)
    n = int(decimals)
    return _call_mixed(lambda v: np.round(v, n), (x,))


def _delta_phi(phi1: _Value, phi2: _Value) -> _Value:
    d = _call_mixed(np.subtract, (phi1, phi2))
    return _call_mixed(lambda v: (v + np.pi) % (2 * np.pi) - np.pi, (d,))


def _delta_r(eta1: _Value, phi1: _Value, eta2: _Value, phi2: _Value) -> _Value:
    deta = _call_mixed(np.subtract, (eta1, eta2))
    dphi = _delta_phi(phi1, phi2)
    return _call_mixed(lambda a, b: np.sqrt(a * a + b * b), (deta, dphi))


def _f64(value: _Value) -> _Value:
    if isinstance(value, ak.Array):
        return ak.values_astype(value, np.float64)
    return float(value)


def _p4(pt: _Value, eta: _Value, phi: _Value, m: _Value) -> tuple[_Value, ...]:
    """(E, px, py, pz) in float64: E**2 - p**2 cancels badly in float32."""
    pt, eta, phi, m = (_f64(v) for v in (pt, eta, phi, m))
    px = pt * np.cos(phi)
    py = pt * np.sin(phi)
    pz = pt * np.sinh(eta)
    energy = np.sqrt(px * px + py * py + pz * pz + m * m)
    return energy, px, py, pz


def _m_from_p4(energy: _Value, px: _Value, py: _Value, pz: _Value) -> _Value:
    m2 = energy * energy - px * px - py * py - pz * pz
    return np.sqrt(np.maximum(m2, 0.0))


def _mass(pt: _Value, eta: _Value, phi: _Value, m: _Value) -> _Value:
    args = [_weak(v) for v in (pt, eta, phi, m)]
    arrays = [v for v in args if isinstance(v, ak.Array)]
    if not arrays or max(a.ndim for a in arrays) < 2:
        msg = (
            "mass() sums the four-vectors in each event's list, so at least one argument "
            "must be jagged (e.g. Muon_pt[:, :2]); for two single objects use mass2()"
        )
        raise TypeError(msg)
    broadcast = iter(ak.broadcast_arrays(*arrays))
    full = [next(broadcast) if isinstance(v, ak.Array) else v for v in args]
    energy, px, py, pz = (ak.sum(c, axis=-1) for c in _p4(*full))
    return _m_from_p4(energy, px, py, pz)


def _mass2(*args: _Value) -> _Value:
    a = _p4(*(_weak(v) for v in args[:4]))
    b = _p4(*(_weak(v) for v in args[4:]))
    total = [x + y for x, y in zip(a, b, strict=True)]
    return _m_from_p4(*total)


def _mass2_mixed(*args: _Value) -> _Value:
    if all(_is_scalar(v) for v in args):
        return np.float64(_mass2(*(np.float64(v) for v in args)))
    return _mass2(*args)


def _ufunc(func: np.ufunc) -> Callable[..., _Value]:
    return lambda *args: _call_mixed(func, args)


@dataclass(frozen=True)
class _Function:
    impl: Callable[..., _Value]
    min_args: int
    max_args: int
    signature: str
    doc: str


def _f(impl: Callable[..., _Value], signature: str, doc: str, *, optional: int = 0) -> _Function:
    n = signature.count(",") + 1 if "()" not in signature else 0
    return _Function(impl, n - optional, n, signature, doc)


FUNCTIONS: dict[str, _Function] = {
    "abs": _f(_ufunc(np.absolute), "abs(x)", "absolute value"),
    "sqrt": _f(_ufunc(np.sqrt), "sqrt(x)", "square root (nan for x < 0)"),
    "exp": _f(_ufunc(np.exp), "exp(x)", "e**x"),
    "log": _f(_ufunc(np.log), "log(x)", "natural logarithm"),
    "log10": _f(_ufunc(np.log10), "log10(x)", "base-10 logarithm"),
    "sin": _f(_ufunc(np.sin), "sin(x)", "sine"),
    "cos": _f(_ufunc(np.cos), "cos(x)", "cosine"),
    "tan": _f(_ufunc(np.tan), "tan(x)", "tangent"),
    "arcsin": _f(_ufunc(np.arcsin), "arcsin(x)", "inverse sine"),
    "arccos": _f(_ufunc(np.arccos), "arccos(x)", "inverse cosine"),
    "arctan": _f(_ufunc(np.arctan), "arctan(x)", "inverse tangent"),
    "arctan2": _f(_ufunc(np.arctan2), "arctan2(y, x)", "angle of (x, y)"),
    "sinh": _f(_ufunc(np.sinh), "sinh(x)", "hyperbolic sine"),
    "cosh": _f(_ufunc(np.cosh), "cosh(x)", "hyperbolic cosine"),
    "tanh": _f(_ufunc(np.tanh), "tanh(x)", "hyperbolic tangent"),
    "floor": _f(_ufunc(np.floor), "floor(x)", "round down"),
    "ceil": _f(_ufunc(np.ceil), "ceil(x)", "round up"),
    "round": _f(_round, "round(x, n)", "round half to even, to n decimals", optional=1),
    "isnan": _f(_ufunc(np.isnan), "isnan(x)", "True where x is nan"),
    "minimum": _f(_ufunc(np.minimum), "minimum(a, b)", "elementwise minimum"),
    "maximum": _f(_ufunc(np.maximum), "maximum(a, b)", "elementwise maximum"),
    "where": _f(_where, "where(cond, a, b)", "a where cond is True, else b"),
    "num": _f(_reducer("num", lambda x: ak.num(x, axis=-1)), "num(x)", "length of each list"),
    "sum": _f(
        _reducer("sum", lambda x: ak.sum(x, axis=-1)), "sum(x)", "sum of each list (0 if empty)"
    ),
    "any": _f(
        _reducer("any", functools.partial(_kleene_reduce, ak.any)),
        "any(x)",
        "True if any item is True, else None if any is None, else False",
    ),
    "all": _f(
        _reducer("all", functools.partial(_kleene_reduce, ak.all)),
        "all(x)",
        "False if any item is False, else None if any is None, else True",
    ),
    "min": _f(
        _reducer("min", lambda x: ak.min(x, axis=-1, mask_identity=True)),
        "min(x)",
        "smallest of each list (None if empty)",
    ),
    "max": _f(
        _reducer("max", lambda x: ak.max(x, axis=-1, mask_identity=True)),
        "max(x)",
        "largest of each list (None if empty)",
    ),
    "mean": _f(
        _reducer("mean", lambda x: ak.mean(x, axis=-1, mask_identity=True)),
        "mean(x)",
        "mean of each list (None if empty)",
    ),
    "first": _f(
        _reducer("first", lambda x: ak.firsts(x, axis=-1)),
        "first(x)",
        "first element of each list (None if empty)",
    ),
    "delta_phi": _f(_delta_phi, "delta_phi(phi1, phi2)", "phi1 - phi2 wrapped to [-pi, pi)"),
    "delta_r": _f(_delta_r, "delta_r(eta1, phi1, eta2, phi2)", "sqrt(delta_eta**2 + delta_phi**2)"),
    "mass": _f(
        _mass,
        "mass(pt, eta, phi, m)",
        "invariant mass of the sum of each event's four-vectors (0 if empty)",
    ),
    "mass2": _f(
        _mass2_mixed,
        "mass2(pt1, eta1, phi1, m1, pt2, eta2, phi2, m2)",
        "invariant mass of two four-vectors",
    ),
}
"""The functions an expression may call, by name."""


# --------------------------------------------------------------------------- eval nodes


class _Node:
    """One node of a compiled expression (picklable; evaluated recursively)."""

    __slots__ = ("position", "source")

    def __init__(self, source: str, position: int) -> None:
        self.source = source
        self.position = position

    def run(self, env: _Env) -> _Value:
        raise TypeError(type(self).__name__)  # pragma: no cover - abstract


class _Env:
    """What one evaluation needs: the resolved columns and the expression text."""

    __slots__ = ("columns", "display")

    def __init__(self, columns: dict[str, ak.Array], display: str) -> None:
        self.columns = columns
        self.display = display


class _Const(_Node):
    __slots__ = ("value",)

    def __init__(self, source: str, position: int, value: np.generic) -> None:
        super().__init__(source, position)
        self.value = value

    def run(self, env: _Env) -> _Value:
        return self.value


class _Column(_Node):
    __slots__ = ("name",)

    def __init__(self, source: str, position: int, name: str) -> None:
        super().__init__(source, position)
        self.name = name

    def run(self, env: _Env) -> _Value:
        return env.columns[self.name]


class _Apply(_Node):
    """Apply a Python callable (numpy ufunc, awkward function) to evaluated children."""

    __slots__ = ("args", "func", "label")

    def __init__(
        self,
        source: str,
        position: int,
        label: str,
        func: Callable[..., _Value],
        args: tuple[_Node, ...],
    ) -> None:
        super().__init__(source, position)
        self.label = label
        self.func = func
        self.args = args

    def run(self, env: _Env) -> _Value:
        values = tuple(a.run(env) for a in self.args)
        try:
            return self.func(*values)
        except ExpressionError:
            raise
        except Exception as err:
            msg = f"cannot evaluate {self.label} `{self.source}`: {_short_error(err)}"
            raise ExpressionError(msg, text=env.display, position=self.position) from err


def _binary(func: np.ufunc) -> Callable[[_Value, _Value], _Value]:
    if func is np.bitwise_and or func is np.bitwise_or:
        return functools.partial(_kleene, func)
    return lambda a, b: _call_mixed(func, (a, b))


_BINOPS: dict[type[ast.operator], tuple[np.ufunc, str]] = {
    ast.Add: (np.add, "+"),
    ast.Sub: (np.subtract, "-"),
    ast.Mult: (np.multiply, "*"),
    ast.Div: (np.true_divide, "/"),
    ast.FloorDiv: (np.floor_divide, "//"),
    ast.Mod: (np.remainder, "%"),
    ast.Pow: (np.power, "**"),
    ast.BitAnd: (np.bitwise_and, "&"),
    ast.BitOr: (np.bitwise_or, "|"),
    ast.BitXor: (np.bitwise_xor, "^"),
}
_UNARYOPS: dict[type[ast.unaryop], tuple[np.ufunc, str]] = {
    ast.USub: (np.negative, "-"),
    ast.UAdd: (np.positive, "+"),
    ast.Invert: (np.invert, "~"),
    ast.Not: (np.invert, "not"),
}
_COMPARE: dict[type[ast.cmpop], tuple[np.ufunc, str]] = {
    ast.Eq: (np.equal, "=="),
    ast.NotEq: (np.not_equal, "!="),
    ast.Lt: (np.less, "<"),
    ast.LtE: (np.less_equal, "<="),
    ast.Gt: (np.greater, ">"),
    ast.GtE: (np.greater_equal, ">="),
}


def _take(index: int) -> Callable[[_Value], _Value]:
    stop = index + 1 if index != -1 else None

    def take(x: _Value) -> _Value:
        _need_jagged(f"indexing [:, {index}]", x)
        if index == 0:
            return ak.firsts(x, axis=1)
        # Slice first, so a large index never pads (allocates) anything.
        return ak.firsts(x[:, index:stop], axis=1)

    return take


def _slicer(start: int | None, stop: int | None, step: int | None) -> Callable[[_Value], _Value]:
    def cut(x: _Value) -> _Value:
        _need_jagged("slicing [:, a:b]", x)
        return x[:, start:stop:step]

    return cut


def _mask(x: _Value, mask: _Value) -> _Value:
    if _ndim(mask) < 2 or _ndim(x) < 2:
        msg = (
            "a mask selects objects inside each event's list, so both the column and the "
            "mask must be jagged, e.g. Jet_pt[Jet_pt > 30]; events are selected by the "
            "request's selection, not inside an expression"
        )
        raise TypeError(msg)
    if not _is_bool(mask):
        msg = f"a mask must be boolean, got {ak.type(mask)}; compare it, e.g. x[x > 30]"
        raise TypeError(msg)
    if _has_option(mask):
        # As SQL's WHERE: an object whose mask item is missing is dropped (awkward
        # alone would keep a None in its place). A missing list stays missing.
        mask = _fill_items(mask, value=False)
    return x[mask]


def _is_bool(value: _Value) -> bool:
    layout = ak.to_layout(value)
    while hasattr(layout, "content"):
        layout = layout.content
    return bool(layout.is_numpy and layout.dtype == np.bool_)


# --------------------------------------------------------------------------- the checker


class _Compiler:
    """Check an ``ast`` tree against the whitelist and build the evaluation nodes."""

    def __init__(self, text: str, display: str, shift: int, body: str) -> None:
        self.text = text
        self.display = display
        self.shift = shift
        self.names: dict[str, int] = {}
        lines = _lines(body)
        self.lines = lines
        self.line_starts = [0]
        for line in lines:
            self.line_starts.append(self.line_starts[-1] + len(line))

    def position(self, node: ast.AST, *, end: bool = False) -> int:
        """0-based character offset in the text of the start (or end) of ``node``."""
        if end:
            lineno = getattr(node, "end_lineno", None) or 1
            col = getattr(node, "end_col_offset", None) or 0
        else:
            lineno = getattr(node, "lineno", 1)
            col = getattr(node, "col_offset", 0)
        line = self.lines[lineno - 1] if lineno - 1 < len(self.lines) else ""
        chars = len(line.encode("utf-8")[:col].decode("utf-8", errors="ignore"))
        return self.shift + self.line_starts[lineno - 1] + chars

    def parenthesized(self, node: ast.AST) -> bool:
        """Whether ``node`` is written inside its own parentheses."""
        before = self.text[: self.position(node)].rstrip()
        after = self.text[self.position(node, end=True) :].lstrip()
        return before.endswith("(") and after.startswith(")")

    def check_precedence(self, node: ast.Compare) -> None:
        """Refuse ``a > 1 & b < 2``: Python reads it as ``a > (1 & b) < 2``."""
        if len(node.ops) < 2 or any(type(op) not in _COMPARE for op in node.ops):
            return  # 'in' / 'is' are refused by visit_Compare
        for middle in node.comparators[:-1]:
            if (
                isinstance(middle, ast.BinOp)
                and isinstance(middle.op, ast.BitAnd | ast.BitOr | ast.BitXor)
                and not self.parenthesized(middle)
            ):
                symbol = _BINOPS[type(middle.op)][1]
                word = {"&": "and", "|": "or", "^": "!="}[symbol]
                parts = [ast.unparse(node.left)]
                for op, right in zip(node.ops, node.comparators, strict=True):
                    text = ast.unparse(right)
                    parts += [_COMPARE[type(op)][1], f"({text})" if right is middle else text]
                msg = (
                    f"'{symbol}' binds tighter than comparisons, so this reads as "
                    f"`{' '.join(parts)}`; put each comparison in parentheses, "
                    f"e.g. (a > 1) {symbol} (b < 2), or write '{word}'"
                )
                raise self.fail(msg, middle)

    def fail(self, message: str, node: ast.AST) -> ExpressionError:
        return ExpressionError(message, text=self.display, position=self.position(node))

    # -- entry
    def compile(self, node: ast.expr) -> tuple[_Node, ast.expr]:
        """The evaluation node and the canonical ``ast`` node of ``node``."""
        method = getattr(self, f"visit_{type(node).__name__}", None)
        if method is None:
            raise self.fail(_disallowed_message(node), node)
        result: tuple[_Node, ast.expr] = method(node)
        return result

    def apply(
        self,
        node: ast.AST,
        canon: ast.expr,
        label: str,
        func: Callable[..., _Value],
        args: tuple[_Node, ...],
    ) -> tuple[_Node, ast.expr]:
        ast.copy_location(canon, node)
        if args and all(isinstance(a, _Const) for a in args):
            # Fold constants now, in numpy (never Python bignums), so errors show at parse.
            values = tuple(a.value for a in args if isinstance(a, _Const))
            try:
                with np.errstate(all="ignore"):
                    value = func(*values)
            except Exception as err:
                msg = f"cannot evaluate {label} `{ast.unparse(canon)}`: {_short_error(err)}"
                raise self.fail(msg, node) from err
            if isinstance(value, np.generic):
                return _Const(ast.unparse(canon), self.position(node), value), canon
        return _Apply(ast.unparse(canon), self.position(node), label, func, args), canon

    # -- leaves
    def visit_Constant(self, node: ast.Constant) -> tuple[_Node, ast.expr]:
        value = node.value
        if value is None:
            msg = (
                "None is not allowed in an expression; missing values come from the data "
                "(e.g. first(x) of an empty list)"
            )
            raise self.fail(
                msg,
                node,
            )
        if not isinstance(value, bool | int | float):
            kind = type(value).__name__
            msg = (
                f"{kind} literals are not allowed; only numbers and True/False are "
                "(column names are written without quotes)"
            )
            raise self.fail(
                msg,
                node,
            )
        return _Const(repr(value), self.position(node), _literal(value)), node

    def visit_Name(self, node: ast.Name) -> tuple[_Node, ast.expr]:
        self.check_identifier(node.id, node)
        if node.id in CONSTANTS:
            value = np.float64(CONSTANTS[node.id])
            return _Const(node.id, self.position(node), value), node
        self.names.setdefault(node.id, self.position(node))
        return _Column(node.id, self.position(node), node.id), node

    def visit_Attribute(self, node: ast.Attribute) -> tuple[_Node, ast.expr]:
        parts: list[str] = []
        current: ast.expr = node
        while isinstance(current, ast.Attribute):
            parts.append(current.attr)
            current = current.value
        if not isinstance(current, ast.Name):
            msg = (
                "attribute access (a.b) is only allowed as part of a dotted column name "
                "such as AnalysisJetsAuxDyn.pt"
            )
            raise self.fail(
                msg,
                node,
            )
        parts.append(current.id)
        for part in parts:
            self.check_identifier(part, node)
        name = ".".join(reversed(parts))
        self.names.setdefault(name, self.position(node))
        return _Column(name, self.position(node), name), node

    def check_identifier(self, name: str, node: ast.AST) -> None:
        if name.startswith("__"):
            msg = (
                f"names starting with '__' are not allowed (got {name!r}); "
                "use a column name such as Jet_pt"
            )
            raise self.fail(
                msg,
                node,
            )

    # -- operators
    def visit_BinOp(self, node: ast.BinOp) -> tuple[_Node, ast.expr]:
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise self.fail(_disallowed_message(node), node)
        left, lc = self.compile(node.left)
        right, rc = self.compile(node.right)
        canon = ast.BinOp(left=lc, op=node.op, right=rc)
        return self.apply(node, canon, f"'{op[1]}'", _binary(op[0]), (left, right))

    def visit_UnaryOp(self, node: ast.UnaryOp) -> tuple[_Node, ast.expr]:
        ufunc, symbol = _UNARYOPS[type(node.op)]
        operand, oc = self.compile(node.operand)
        op: ast.unaryop = ast.Invert() if isinstance(node.op, ast.Not) else node.op
        canon = ast.UnaryOp(op=op, operand=oc)
        return self.apply(node, canon, f"'{symbol}'", _ufunc(ufunc), (operand,))

    def visit_BoolOp(self, node: ast.BoolOp) -> tuple[_Node, ast.expr]:
        is_and = isinstance(node.op, ast.And)
        ufunc = np.bitwise_and if is_and else np.bitwise_or
        first, canon = self.compile(node.values[0])
        result = first
        for value in node.values[1:]:
            nxt, nc = self.compile(value)
            canon = ast.BinOp(left=canon, op=ast.BitAnd() if is_and else ast.BitOr(), right=nc)
            label = "'and'" if is_and else "'or'"
            result, canon = self.apply(node, canon, label, _binary(ufunc), (result, nxt))
        return result, canon

    def visit_Compare(self, node: ast.Compare) -> tuple[_Node, ast.expr]:
        self.check_precedence(node)
        operands = [self.compile(n) for n in (node.left, *node.comparators)]
        result: _Node | None = None
        for i, op in enumerate(node.ops):
            entry = _COMPARE.get(type(op))
            if entry is None:
                msg = (
                    f"comparison operator {type(op).__name__} ('in', 'is') is not allowed; "
                    "use ==, !=, <, <=, >, >="
                )
                raise self.fail(
                    msg,
                    node,
                )
            (left, lc), (right, rc) = operands[i], operands[i + 1]
            pair = ast.Compare(left=lc, ops=[op], comparators=[rc])
            part, _ = self.apply(node, pair, f"'{entry[1]}'", _binary(entry[0]), (left, right))
            if result is None:
                result = part
            else:
                both = ast.Compare(
                    left=operands[0][1],
                    ops=list(node.ops[: i + 1]),
                    comparators=[c for _, c in operands[1 : i + 2]],
                )
                label = "chained comparison"
                result, _ = self.apply(node, both, label, _binary(np.bitwise_and), (result, part))
        assert result is not None
        canon = ast.Compare(
            left=operands[0][1], ops=list(node.ops), comparators=[c for _, c in operands[1:]]
        )
        return result, ast.copy_location(canon, node)

    def visit_IfExp(self, node: ast.IfExp) -> tuple[_Node, ast.expr]:
        args = [self.compile(n) for n in (node.test, node.body, node.orelse)]
        canon = ast.Call(
            func=ast.Name(id="where", ctx=ast.Load()), args=[c for _, c in args], keywords=[]
        )
        return self.apply(node, canon, "where()", _where, tuple(a for a, _ in args))

    # -- calls
    def visit_Call(self, node: ast.Call) -> tuple[_Node, ast.expr]:
        if not isinstance(node.func, ast.Name):
            msg = (
                "only the built-in functions can be called, by plain name (no methods "
                f"or attributes); allowed: {', '.join(sorted(FUNCTIONS))}"
            )
            raise self.fail(
                msg,
                node,
            )
        name = node.func.id
        spec = FUNCTIONS.get(name)
        if spec is None:
            near = closest(name, FUNCTIONS, n=3)
            hint = f"did you mean {', '.join(near)}? " if near else ""
            msg = (
                f"unknown function {name!r}; {hint}allowed functions: "
                f"{', '.join(sorted(FUNCTIONS))}"
            )
            raise self.fail(
                msg,
                node,
            )
        if node.keywords:
            msg = f"{name}() takes positional arguments only: {spec.signature}"
            raise self.fail(msg, node.keywords[0])
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                msg = f"*args is not allowed: {spec.signature}"
                raise self.fail(msg, arg)
        n = len(node.args)
        if not spec.min_args <= n <= spec.max_args:
            wanted = (
                str(spec.max_args)
                if spec.min_args == spec.max_args
                else f"{spec.min_args} or {spec.max_args}"
            )
            hint = ""
            if name in ("min", "max") and n == 2:
                hint = f"; for the elementwise {name}imum of two values use {name}imum(a, b)"
            msg = (
                f"{name}() takes {wanted} argument{'s' if spec.max_args != 1 else ''} "
                f"({spec.signature}), got {n}{hint}"
            )
            raise self.fail(
                msg,
                node,
            )
        args = [self.compile(a) for a in node.args]
        canon = ast.Call(
            func=ast.Name(id=name, ctx=ast.Load()), args=[c for _, c in args], keywords=[]
        )
        return self.apply(node, canon, f"{name}()", spec.impl, tuple(a for a, _ in args))

    # -- subscripts
    def visit_Subscript(self, node: ast.Subscript) -> tuple[_Node, ast.expr]:
        value, vc = self.compile(node.value)
        sl = node.slice
        if isinstance(sl, ast.Tuple):
            if len(sl.elts) != 2 or not _is_full_slice(sl.elts[0]):
                raise self.fail(_SUBSCRIPT_HELP, node)
            inner = sl.elts[1]
            if isinstance(inner, ast.Slice):
                bounds = [self.int_literal(b, node) for b in (inner.lower, inner.upper, inner.step)]
                if bounds[2] == 0:
                    msg = "slice step cannot be zero"
                    raise self.fail(msg, inner)
                func: Callable[[_Value], _Value] = _slicer(bounds[0], bounds[1], bounds[2])
                label = "slice"
            else:
                index = self.int_literal(inner, node)
                assert index is not None
                func = _take(index)
                label = "index"
            canon = ast.Subscript(value=vc, slice=sl, ctx=ast.Load())
            ast.copy_location(canon, node)
            source = ast.unparse(canon)
            return _Apply(source, self.position(node), label, func, (value,)), canon
        if (
            isinstance(sl, ast.Slice)
            or (isinstance(sl, ast.Constant) and isinstance(sl.value, int))
            or (isinstance(sl, ast.UnaryOp) and isinstance(sl.operand, ast.Constant))
        ):
            raise self.fail(_SUBSCRIPT_HELP, node)
        mask, mc = self.compile(sl)
        canon = ast.Subscript(value=vc, slice=mc, ctx=ast.Load())
        return self.apply(node, canon, "mask", _mask, (value, mask))

    def int_literal(self, node: ast.expr | None, where: ast.AST) -> int | None:
        if node is None:
            return None
        sign = 1
        inner = node
        if isinstance(inner, ast.UnaryOp) and isinstance(inner.op, ast.USub | ast.UAdd):
            sign = -1 if isinstance(inner.op, ast.USub) else 1
            inner = inner.operand
        if (
            isinstance(inner, ast.Constant)
            and isinstance(inner.value, int)
            and not isinstance(inner.value, bool)
            and abs(inner.value) < 2**62
        ):
            return sign * inner.value
        msg = (
            "list indices and slice bounds must be integer literals, e.g. x[:, 0], "
            "x[:, -1], x[:, :2]"
        )
        raise self.fail(
            msg,
            node,
        )


_SUBSCRIPT_HELP = (
    "subscripts allowed: x[:, i] (i-th object of each event, None if too short), "
    "x[:, a:b] (objects a..b-1 of each event) and x[mask] with a jagged boolean mask "
    "such as Jet_pt[Jet_pt > 30]; the first axis (events) cannot be indexed"
)


def _is_full_slice(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Slice)
        and node.lower is None
        and node.upper is None
        and node.step is None
    )


_NODE_NAMES = {
    "Lambda": "lambda functions",
    "ListComp": "comprehensions",
    "SetComp": "comprehensions",
    "DictComp": "comprehensions",
    "GeneratorExp": "generator expressions",
    "List": "lists",
    "Tuple": "tuples",
    "Set": "sets",
    "Dict": "dicts",
    "JoinedStr": "f-strings",
    "NamedExpr": "assignments (:=)",
    "Starred": "*args",
    "Slice": "slices outside x[:, a:b]",
    "Await": "await",
    "Yield": "yield",
    "YieldFrom": "yield",
}


def _disallowed_message(node: ast.AST) -> str:
    kind = type(node).__name__
    if isinstance(node, ast.BinOp):
        op = type(node.op).__name__
        return (
            f"operator {op} is not allowed; allowed operators: + - * / // % ** "
            "& | ^ ~ and or not == != < <= > >="
        )
    what = _NODE_NAMES.get(kind, f"{kind} syntax")
    return (
        f"{what} not allowed in an expression; use numbers, column names, operators "
        "and the functions " + ", ".join(sorted(FUNCTIONS))
    )


def _depth(tree: ast.AST) -> int:
    """Nesting depth of ``tree``, computed without recursion.

    ``a and b and c`` and ``a < b < c`` count as deep as the chains of binary
    operations they are compiled to.
    """
    deepest = 0
    stack: list[tuple[ast.AST, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        step = 1
        if isinstance(node, ast.BoolOp):
            step = len(node.values)
        elif isinstance(node, ast.Compare):
            step = len(node.ops) + 1
        stack.extend((child, depth + step) for child in ast.iter_child_nodes(node))
    return deepest


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class Expression:
    """A parsed, checked expression; build it with :func:`parse`.

    Attributes:
        text: the text as given.
        canonical: a canonical spelling (whitespace, redundant parentheses and the
            aliases ``and``/``or``/``not``/``if-else`` normalised), equal for
            equivalent spellings; suitable for cache keys.
        names: the column names the expression reads (dotted names as one name).
    """

    text: str
    canonical: str
    names: frozenset[str]
    _root: _Node | None = field(default=None, compare=False, repr=False)
    _positions: tuple[tuple[str, int], ...] = field(default=(), compare=False, repr=False)

    def __reduce__(self) -> tuple[Callable[[str], Expression], tuple[str]]:
        return (parse, (self.text,))

    def evaluate(self, columns: Mapping[str, ak.Array | np.ndarray]) -> ak.Array:
        """Compute the expression on whole arrays.

        Args:
            columns: arrays by column name, all with one entry per event. Dotted
                names are looked up as given (``columns["sys_up.Jet_pt"]``) and,
                failing that, as fields of a record column (``columns["sys_up"]``).

        Returns:
            One value per event (flat) or one list per event (jagged). A constant
            expression is broadcast to the number of events of ``columns``.

        Raises:
            ColumnNotFoundError: a name is not in ``columns``.
            ExpressionError: the evaluation failed (the message names the
                sub-expression and points at it).
        """
        parsed = self if self._root is not None else parse(self.text)
        assert parsed._root is not None
        display = _display(self.text)
        resolved = {
            name: _resolve(name, columns, display, position) for name, position in parsed._positions
        }
        with np.errstate(all="ignore"):
            result = parsed._root.run(_Env(resolved, display))
            if isinstance(result, ak.Array):
                return result
            if not columns:
                msg = (
                    f"the constant expression `{self.text}` needs at least one column to "
                    "know the number of events; pass the columns of the chunk"
                )
                raise ExpressionError(msg, text=display, position=0)
            n = len(next(iter(columns.values())))
            return ak.Array(np.full(n, result))


def _lines(text: str) -> list[str]:
    """``text`` split into lines (with their ends) the way Python's tokenizer does."""
    return re.split(r"(?<=\r\n)|(?<=\r)(?!\n)|(?<=\n)", text)


def _display(text: str) -> str:
    """``text`` on one line (same length), for the caret display of errors."""
    return text.replace("\r", " ").replace("\n", " ").replace("\t", " ")


def _resolve(name: str, columns: Mapping[str, Any], display: str, position: int) -> ak.Array:
    if name in columns:
        return _as_array(columns[name])
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in columns:
            value = _as_array(columns[head])
            for part in parts[cut:]:
                if part not in ak.fields(value):
                    break
                value = value[part]
            else:
                return value
    near = closest(name, columns)
    hint = f"closest available: {', '.join(near)}" if near else "no similar column exists"
    msg = (
        f"column {name!r} not found; {hint}. Request the column from a dataset, "
        f"or fix its spelling (position {position}):\n    {display}\n    {' ' * position}^"
    )
    raise ColumnNotFoundError(msg)


def _as_array(value: Any) -> ak.Array:
    if isinstance(value, ak.Array):
        return value
    return ak.Array(value) if not isinstance(value, np.ndarray) else ak.from_numpy(value)


@functools.lru_cache(maxsize=2048)
def _parse_cached(text: str) -> Expression:
    display = _display(text)
    if not text.strip():
        msg = "empty expression; write e.g. Jet_pt[Jet_pt > 30]"
        raise ExpressionError(msg, text=display, position=0)
    body = text.lstrip()
    shift = len(text) - len(body)
    try:
        tree = ast.parse(body, mode="eval")
    except SyntaxError as err:
        lineno = err.lineno or 1
        lines = _lines(body)
        start = shift + sum(len(line) for line in lines[: lineno - 1])
        offset = start + max((err.offset or 1) - 1, 0)
        position = min(offset, max(len(text) - 1, 0))
        msg = f"invalid syntax: {err.msg}"
        raise ExpressionError(msg, text=display, position=position) from None
    except (RecursionError, MemoryError, ValueError) as err:
        msg = f"expression too deeply nested to parse (limit {MAX_DEPTH} levels)"
        raise ExpressionError(msg, text=display, position=None) from err
    depth = _depth(tree.body)
    if depth > MAX_DEPTH:
        msg = f"expression nested {depth} levels deep; the limit is {MAX_DEPTH}"
        raise ExpressionError(msg, text=display, position=None)
    compiler = _Compiler(text, display, shift, body)
    root, canon = compiler.compile(tree.body)
    canonical = ast.unparse(ast.fix_missing_locations(canon))
    return Expression(
        text=text,
        canonical=canonical,
        names=frozenset(compiler.names),
        _root=root,
        _positions=tuple(sorted(compiler.names.items())),
    )


def parse(text: str) -> Expression:
    """Parse and check an expression.

    Args:
        text: the expression, e.g. ``"num(Jet_pt[abs(Jet_eta) < 2.4]) >= 2"``.

    Returns:
        The checked :class:`Expression` (cheap: results are cached by text).

    Raises:
        ExpressionError: the text is not a valid expression; ``position`` is the
            0-based character offset of the offending part.

    >>> parse("a+b").canonical == parse("(a) + b").canonical
    True
    """
    if not isinstance(text, str):
        msg = f"an expression must be a string, got {type(text).__name__}: {text!r:.80}"
        raise ExpressionError(msg)
    if len(text) > MAX_LENGTH:
        msg = (
            f"expression is {len(text)} characters long; the limit is {MAX_LENGTH}. "
            "Split it into several named expressions."
        )
        raise ExpressionError(msg)
    return _parse_cached(text)
