"""ServiceX queries as columnhub requests: UprootRaw and FuncADL_Uproot.

The ``servicex`` client sends a *selection* text and a *codegen* name. This
module turns the two query languages columnhub serves into an ordinary
columnhub spec (a request dictionary, or a ``samples:`` spec for several
trees) that :func:`columnhub.load_request` accepts:

- ``uproot-raw``: a JSON list of tree queries, each the arguments of uproot's
  ``TTree.arrays(expressions, cut=, filter_name=, filter_typename=,
  aliases=)``. ``cut`` and ``expressions`` are uproot's Python-like
  expressions, with the awkward functions the ServiceX transformer adds
  (``num``, ``sum``, ``any``, ... per event); they are rewritten node by
  node into columnhub's safe expression language. The text is parsed with
  :func:`ast.parse` and never evaluated.
- ``uproot``: func_adl as qastle text (both forms the client emits: from
  Python, ``(call Select ...)``, and from YAML, ``(Select ...)``), parsed with
  ``qastle``. The common analysis subset: ``Where``/``Select`` over events,
  dictionaries of columns, ``Where``/``Select``/``Count``/``Sum``/``Max``/
  ``Min``/``Any``/``All`` on a collection inside an event lambda.

Anything else raises :class:`~columnhub.errors.SpecError` naming the
construct; the front door answers it with a 400 the client shows.

:func:`translate` is pure (no I/O). A tree query that selects branches by
pattern (``filter_name`` globs or regexes, ``filter_typename``, or neither
``expressions`` nor ``filter_name``: every branch) needs the tree's branch
list: :func:`expand` reads it (metadata of the first file only, cached by
the process as planning does) and calls :func:`translate` with it. The front
door calls :func:`expand`; it reads nothing when the query names its columns.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from columnhub.errors import ColumnhubError, SpecError

__all__ = [
    "CODEGENS",
    "MAX_SELECTION_LENGTH",
    "BranchList",
    "expand",
    "translate",
    "trees_needing_branches",
]

#: the codegens this module translates
CODEGENS: tuple[str, ...] = ("uproot-raw", "uproot")

#: the longest selection text accepted (qastle and JSON are parsed whole)
MAX_SELECTION_LENGTH = 100_000

#: tree name -> its branches as ``(name, typename)`` in the tree's order
BranchList = Mapping[str, Sequence[tuple[str, str]]]

_EVENTS = "Events"
#: event keys columnhub can use for a tree (it needs some, even when not delivered)
_KEY_SETS: tuple[tuple[str, ...], ...] = (
    ("run", "luminosityBlock", "event"),
    ("runNumber", "eventNumber"),
    ("run", "luminosityBlock"),
    ("run",),
)
_FORMATS = {"parquet": "parquet", "root-file": "root", "root": "root"}
_MAX_DEPTH = 100
_MAX_REGEX = 500
_COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def translate(
    codegen: str,
    selection: str,
    *,
    files: list[str],
    result_format: str,
    branches: BranchList | None = None,
) -> dict[str, Any]:
    """Translate a ServiceX query into a columnhub spec, without I/O.

    Args:
        codegen: ``uproot-raw`` (UprootRaw JSON) or ``uproot`` (func_adl qastle).
        selection: the query text the client sent.
        files: the input files (paths or URLs) of the request.
        result_format: ``parquet`` or ``root-file`` (the client's names).
        branches: the branch list of each tree whose query selects branches
            by pattern (see :func:`trees_needing_branches`); :func:`expand`
            reads it.

    Returns:
        A request dictionary, or a ``samples:`` spec with one sample per tree
        query (named after its output tree) when the query reads several.

    Raises:
        SpecError: the query uses a construct columnhub does not serve; the
            message names it (the client shows it to the user).
        LookupError: a query needs the branch list of a tree that
            ``branches`` lacks (a caller's mistake: call :func:`expand`).
    """
    fmt = _output_format(result_format)
    if not files:
        msg = "the request names no input files; give a file list (or a dataset) to read"
        raise SpecError(msg)
    text = _check_selection(codegen, selection)
    if codegen == "uproot-raw":
        samples = _uproot_raw(text, branches or {})
    else:
        sample = _func_adl(text)
        if sample.tree != _EVENTS:
            sample.keys = _keys(sample.tree, (branches or {}).get(sample.tree), "func_adl")
        samples = [sample]
    spec = _spec(samples, files=list(files), fmt=fmt)
    from columnhub.spec import load_request

    try:
        load_request(spec)
    except SpecError as err:
        msg = f"{codegen} query: {err}"
        raise SpecError(msg) from err
    return spec


def trees_needing_branches(codegen: str, selection: str) -> list[str]:
    """The trees whose branch list :func:`translate` needs for this query (pure).

    Raises:
        SpecError: the selection is not a valid query of ``codegen``.
    """
    text = _check_selection(codegen, selection)
    if codegen != "uproot-raw":
        tree = _func_adl(text).tree
        return [] if tree == _EVENTS else [tree]
    out: list[str] = []
    for i, query in enumerate(_uproot_raw_queries(text)):
        if "copy_histograms" in query:
            continue
        tq = _tree_query(i, query)
        out += [t for t, _ in tq.trees if t not in out and (tq.needs_branches or t != _EVENTS)]
    return out


def expand(codegen: str, selection: str, *, files: list[str], result_format: str) -> dict[str, Any]:
    """:func:`translate`, reading the branch lists the query needs (metadata only).

    Reads the first file's branch list of each tree whose query selects
    branches by pattern, as uproot does (branches uproot cannot interpret are
    left out), then translates. Nothing is read for a query that names its
    columns.

    Raises:
        SpecError: an unsupported query (as :func:`translate`).
        DatasetError: a file or tree cannot be read.
    """
    try:  # pure first: a query columnhub refuses is refused before anything is read
        return translate(codegen, selection, files=files, result_format=result_format)
    except LookupError:
        pass
    trees = trees_needing_branches(codegen, selection)
    branches = {tree: _read_branches(files, tree) for tree in trees}
    return translate(
        codegen, selection, files=files, result_format=result_format, branches=branches
    )


# -- shared --------------------------------------------------------------------------


@dataclass
class _Sample:
    """One tree query as the parts of a columnhub request."""

    name: str
    tree: str
    columns: list[str]
    define: dict[str, str] = field(default_factory=dict)
    where: str | None = None
    keys: list[str] | None = None
    explode: bool = False


def _output_format(result_format: str) -> str:
    fmt = _FORMATS.get(str(result_format).strip().lower())
    if fmt is None:
        msg = (
            f"result-format {result_format!r} is not supported by columnhub; "
            "use parquet or root-file"
        )
        raise SpecError(msg)
    return fmt


def _check_selection(codegen: str, selection: str) -> str:
    if codegen not in CODEGENS:
        msg = f"codegen {codegen!r} is not translated here; supported: {', '.join(CODEGENS)}"
        raise SpecError(msg)
    if not isinstance(selection, str) or not selection.strip():
        msg = f"{codegen} query: the selection is empty; send the query text"
        raise SpecError(msg)
    if len(selection) > MAX_SELECTION_LENGTH:
        msg = (
            f"{codegen} query: the selection is {len(selection)} characters long, "
            f"more than the {MAX_SELECTION_LENGTH} allowed; split it into several requests"
        )
        raise SpecError(msg)
    return selection


def _spec(samples: list[_Sample], *, files: list[str], fmt: str) -> dict[str, Any]:
    output: dict[str, Any] = {"format": fmt, "include_keys": False}
    if any(s.explode for s in samples):  # func_adl's SelectMany: one row per object
        output["explode"] = True

    def body(s: _Sample) -> dict[str, Any]:
        out: dict[str, Any] = {"columns": list(s.columns)}
        if s.define:
            out["define"] = dict(s.define)
        if s.where is not None:
            out["where"] = s.where
        return out

    if len(samples) == 1:
        s = samples[0]
        dataset: dict[str, Any] = {"files": list(files), "tree": s.tree}
        if s.name != s.tree:  # treename: {input: output}: the output name names the dataset
            dataset["name"] = s.name
        if s.keys is not None:
            dataset["keys"] = list(s.keys)
        return {"dataset": dataset, **body(s), "output": output}
    seen: dict[str, str] = {}
    entries: dict[str, Any] = {}
    for s in samples:
        clash = seen.get(s.name.lower())
        if clash is not None:
            msg = (
                f"two tree queries write the output tree {s.name!r}"
                + (f" (and {clash!r})" if clash != s.name else "")
                + "; give one of them another output name with a mapping, "
                "treename: {input_tree: output_name}"
            )
            raise SpecError(msg)
        seen[s.name.lower()] = s.name
        entries[s.name] = {
            "dataset": {
                "name": s.name,
                "files": list(files),
                "tree": s.tree,
                **({"keys": list(s.keys)} if s.keys is not None else {}),
            },
            **body(s),
        }
    return {"samples": entries, "output": output}


def _describe(node: ast.AST) -> str:
    """A short name of a construct for messages (``lambda``, ``method call .sum()``)."""
    names: dict[type, str] = {
        ast.Lambda: "lambda",
        ast.ListComp: "list comprehension",
        ast.SetComp: "set comprehension",
        ast.DictComp: "dict comprehension",
        ast.GeneratorExp: "generator expression",
        ast.List: "list literal",
        ast.Tuple: "tuple",
        ast.Dict: "dict literal",
        ast.Set: "set literal",
        ast.NamedExpr: "assignment expression (:=)",
        ast.JoinedStr: "f-string",
        ast.FormattedValue: "f-string",
        ast.Starred: "* unpacking",
        ast.Await: "await",
        ast.Yield: "yield",
        ast.YieldFrom: "yield",
        ast.Slice: "slice",
    }
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Attribute):
            return f"method call .{node.func.attr}()"
        if isinstance(node.func, ast.Name):
            return f"call of {node.func.id}()"
        return "call of a computed function"
    if isinstance(node, ast.Attribute):
        return f"attribute access .{node.attr}"
    if isinstance(node, ast.Constant):
        return f"constant {node.value!r}"[:80]
    return names.get(type(node), type(node).__name__)


def _paren(text: str) -> str:
    return f"({text})"


_BINOPS: dict[type, str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
}
_CMPOPS: dict[type, str] = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
}
_OP_NAMES: dict[type, str] = {
    ast.MatMult: "operator @",
    ast.LShift: "operator <<",
    ast.RShift: "operator >>",
    ast.In: "operator in",
    ast.NotIn: "operator not in",
    ast.Is: "operator is",
    ast.IsNot: "operator is not",
}


def _constant(value: object, where: str) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            msg = f"{where}: the constant {value!r} is not supported; use a finite number"
            raise SpecError(msg)
        return repr(value)
    kind = "string" if isinstance(value, str | bytes) else type(value).__name__
    msg = (
        f"{where}: a {kind} constant ({value!r:.40}) is not supported by columnhub; "
        "expressions hold numbers, True and False only"
    )
    raise SpecError(msg)


def _validate(text: str, where: str) -> str:
    """``text`` checked by columnhub's own expression parser (a SpecError if refused)."""
    from columnhub.errors import ExpressionError
    from columnhub.expressions import parse

    try:
        parse(text)
    except ExpressionError as err:
        msg = f"{where}: {err}"
        raise SpecError(msg) from err
    return text


# -- UprootRaw -------------------------------------------------------------------------

#: uproot/numpy function -> (columnhub function, numbers of positional arguments)
_ELEMENTWISE: dict[str, tuple[str, tuple[int, ...]]] = {
    "abs": ("abs", (1,)),
    "absolute": ("abs", (1,)),
    "fabs": ("abs", (1,)),
    "sqrt": ("sqrt", (1,)),
    "exp": ("exp", (1,)),
    "log": ("log", (1,)),
    "log10": ("log10", (1,)),
    "sin": ("sin", (1,)),
    "cos": ("cos", (1,)),
    "tan": ("tan", (1,)),
    "arcsin": ("arcsin", (1,)),
    "asin": ("arcsin", (1,)),
    "arccos": ("arccos", (1,)),
    "acos": ("arccos", (1,)),
    "arctan": ("arctan", (1,)),
    "atan": ("arctan", (1,)),
    "arctan2": ("arctan2", (2,)),
    "atan2": ("arctan2", (2,)),
    "sinh": ("sinh", (1,)),
    "cosh": ("cosh", (1,)),
    "tanh": ("tanh", (1,)),
    "floor": ("floor", (1,)),
    "ceil": ("ceil", (1,)),
    "round": ("round", (1, 2)),
    "rint": ("round", (1,)),
    "isnan": ("isnan", (1,)),
    "where": ("where", (3,)),
}
#: the ServiceX transformer's awkward reductions (per event: axis=1 by default)
_REDUCTIONS: dict[str, str] = {
    "num": "num({})",
    "count": "num({})",
    "count_nonzero": "sum(({}) != 0)",
    "sum": "sum({})",
    "any": "any({})",
    "all": "all({})",
    "min": "min({})",
    "max": "max({})",
    "mean": "(sum({0}) / num({0}))",
    "firsts": "first({})",
}
_OTHER_FUNCTIONS = {
    "logical_and": " & ",
    "logical_or": " | ",
}
_BOOLEAN_CALLS = {"any", "all", "isnan", "logical_and", "logical_or"}
_TREE_QUERY_FIELDS = {
    "treename",
    "expressions",
    "cut",
    "filter_name",
    "filter_typename",
    "aliases",
    "fail_on_missing_trees",
    "use_standard_awkward_axis",
}


def _allowed_functions() -> str:
    names = sorted({*_ELEMENTWISE, *_REDUCTIONS, *_OTHER_FUNCTIONS, "neg", "get"})
    return ", ".join(names)


class _UprootEmitter:
    """Rewrite one uproot expression (a Python AST) as columnhub expression text."""

    def __init__(self, aliases: Mapping[str, str], where: str) -> None:
        self.aliases = aliases
        self.where = where
        self.expanding: list[str] = []
        self.parsed: dict[str, ast.expr] = {}
        self.expanded: dict[str, str] = {}

    def refuse(self, what: str, fix: str = "") -> NoReturn:
        msg = f"{self.where}: {what} is not supported by columnhub" + (f"; {fix}" if fix else "")
        raise SpecError(msg)

    def alias_tree(self, name: str) -> ast.expr:
        if name not in self.parsed:
            self.parsed[name] = _parse_uproot(self.aliases[name], f"{self.where}, alias {name!r}")
        return self.parsed[name]

    def column(self, name: str, depth: int) -> str:
        if name in self.aliases:
            if name in self.expanding:
                chain = " -> ".join([*self.expanding, name])
                msg = f"{self.where}: the aliases refer to each other in a cycle ({chain})"
                raise SpecError(msg)
            if name in self.expanded:
                return self.expanded[name]
            self.expanding.append(name)
            try:
                text = _paren(self.emit(self.alias_tree(name), depth + 1))
            finally:
                self.expanding.pop()
            from columnhub.expressions import MAX_LENGTH

            if len(text) > MAX_LENGTH:
                msg = (
                    f"{self.where}: alias {name!r} expands to more than {MAX_LENGTH} characters; "
                    "simplify the aliases"
                )
                raise SpecError(msg)
            self.expanded[name] = text
            return text
        if name in ("pi", "e"):
            self.refuse(
                f"the name {name!r}",
                f"columnhub reads {name!r} as the constant; rename the branch with an alias",
            )
        if any(part.startswith("__") for part in name.split(".")):
            self.refuse(f"the name {name!r} (names starting with __)")
        if not _COLUMN_NAME.fullmatch(name):
            self.refuse(f"the branch name {name!r}", "columnhub names are letters, digits, _ and .")
        return name

    def emit(self, node: ast.AST, depth: int = 0) -> str:
        if depth > _MAX_DEPTH:
            msg = f"{self.where}: the expression nests deeper than {_MAX_DEPTH} levels; simplify it"
            raise SpecError(msg)
        d = depth + 1
        if isinstance(node, ast.Expression):
            return self.emit(node.body, d)
        if isinstance(node, ast.Constant):
            return _constant(node.value, self.where)
        if isinstance(node, ast.Name):
            return self.column(node.id, d)
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted is None:
                self.refuse(_describe(node), "only branch names may hold dots")
            return self.column(dotted, d)
        if isinstance(node, ast.BinOp):
            op = _BINOPS.get(type(node.op))
            if op is None:
                self.refuse(_OP_NAMES.get(type(node.op), type(node.op).__name__))
            return f"{_paren(self.emit(node.left, d))} {op} {_paren(self.emit(node.right, d))}"
        if isinstance(node, ast.UnaryOp):
            inner = self.emit(node.operand, d)
            if isinstance(node.op, ast.Not):
                return f"~{_paren(_truth(node.operand, inner))}"
            sign = {ast.USub: "-", ast.UAdd: "+"}.get(type(node.op), "~")
            return f"{sign}{_paren(inner)}"
        if isinstance(node, ast.BoolOp):
            op = " & " if isinstance(node.op, ast.And) else " | "
            return op.join(_paren(_truth(v, self.emit(v, d))) for v in node.values)
        if isinstance(node, ast.Compare):
            parts = [_paren(self.emit(node.left, d))]
            for cmp, right in zip(node.ops, node.comparators, strict=True):
                sym = _CMPOPS.get(type(cmp))
                if sym is None:
                    self.refuse(_OP_NAMES.get(type(cmp), type(cmp).__name__))
                parts += [sym, _paren(self.emit(right, d))]
            return " ".join(parts)
        if isinstance(node, ast.IfExp):
            args = [self.emit(n, d) for n in (node.test, node.body, node.orelse)]
            return f"where({', '.join(args)})"
        if isinstance(node, ast.Call):
            return self.call(node, d)
        if isinstance(node, ast.Subscript):
            return self.subscript(node, d)
        self.refuse(_describe(node))

    def call(self, node: ast.Call, depth: int) -> str:
        if not isinstance(node.func, ast.Name):
            self.refuse(_describe(node), "call the functions by name: " + _allowed_functions())
        name = node.func.id
        if any(isinstance(a, ast.Starred) for a in node.args):
            self.refuse(f"* arguments in {name}()")
        if name == "get":
            arg = node.args[0] if len(node.args) == 1 and not node.keywords else None
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                self.refuse("get() of anything but one branch name in quotes")
            return self.column(arg.value, depth)
        if name in _REDUCTIONS:
            return self.reduction(node, name, depth)
        if name not in _ELEMENTWISE and name not in _OTHER_FUNCTIONS and name != "neg":
            self.refuse(f"the function {name}()", "allowed functions: " + _allowed_functions())
        keywords = [k.arg for k in node.keywords]
        if keywords:
            self.refuse(f"keyword arguments {keywords} in {name}()")
        args = [self.emit(a, depth) for a in node.args]
        if name == "neg" and len(args) == 1:
            return f"-{_paren(args[0])}"
        if name in _OTHER_FUNCTIONS and len(args) == 2:
            return _OTHER_FUNCTIONS[name].join(_paren(a) for a in args)
        if name in _ELEMENTWISE:
            target, counts = _ELEMENTWISE[name]
            if len(args) in counts:
                return f"{target}({', '.join(args)})"
            want = " or ".join(str(c) for c in counts)
            msg = f"{self.where}: {name}() takes {want} argument(s) in columnhub, got {len(args)}"
            raise SpecError(msg)
        self.refuse(f"the function {name}()", "allowed functions: " + _allowed_functions())

    def reduction(self, node: ast.Call, name: str, depth: int) -> str:
        axes: list[ast.expr] = list(node.args[1:2])
        for kw in node.keywords:
            if kw.arg != "axis":
                self.refuse(f"the argument {kw.arg}= of {name}()", "only axis=1 is")
            axes.append(kw.value)
        if len(node.args) not in (1, 2) or len(axes) > 1:
            msg = f"{self.where}: {name}() takes one array (and axis=1), got {len(node.args)} arguments"
            raise SpecError(msg)
        for axis in axes:
            value = _int_literal(axis)
            if value not in (1, -1):
                self.refuse(
                    f"{name}(..., axis={ast.unparse(axis)})",
                    "columnhub reduces each event's list (axis=1); select events with the cut",
                )
        return _REDUCTIONS[name].format(self.emit(node.args[0], depth))

    def subscript(self, node: ast.Subscript, depth: int) -> str:
        value = _paren(self.emit(node.value, depth))
        index = node.slice
        if isinstance(index, ast.Tuple):
            if len(index.elts) == 2 and _is_full_slice(index.elts[0]):
                inner = index.elts[1]
                if isinstance(inner, ast.Slice):
                    bounds = [
                        "" if b is None else str(self.literal_index(b))
                        for b in (inner.lower, inner.upper, inner.step)
                    ]
                    text = ":".join(bounds) if inner.step is not None else ":".join(bounds[:2])
                    return f"{value}[:, {text}]"
                return f"{value}[:, {self.literal_index(inner)}]"
            self.refuse("this subscript", "use x[mask], x[:, i] or x[:, a:b]")
        if isinstance(index, ast.Slice) or _int_literal(index) is not None:
            self.refuse(
                "indexing or slicing the events",
                "select events with the cut; x[:, i] takes the i-th object of each event",
            )
        if isinstance(index, ast.Constant):
            self.refuse(f"the subscript [{index.value!r:.40}]", "use x[mask], x[:, i] or x[:, a:b]")
        return f"{value}[{self.emit(index, depth)}]"

    def literal_index(self, node: ast.AST) -> int:
        value = _int_literal(node)
        if value is None:
            self.refuse(
                f"the computed index {_describe(node)}", "object indices are integer literals"
            )
        return value


def _int_literal(node: ast.AST) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) is int
    ):
        return -node.operand.value
    return None


def _is_full_slice(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Slice)
        and node.lower is None
        and node.upper is None
        and node.step is None
    )


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def _parse_uproot(text: Any, where: str) -> ast.expr:
    if not isinstance(text, str):
        msg = f"{where}: expected an expression as text, got {type(text).__name__}"
        raise SpecError(msg)
    from columnhub.expressions import MAX_LENGTH

    if len(text) > MAX_LENGTH:
        msg = f"{where}: the expression is {len(text)} characters long, more than {MAX_LENGTH}"
        raise SpecError(msg)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        msg = f"{where}: {text!r:.200} is not a valid expression ({err.msg})"
        raise SpecError(msg) from None
    except (RecursionError, MemoryError, ValueError) as err:
        msg = f"{where}: the expression cannot be parsed ({type(err).__name__}); simplify it"
        raise SpecError(msg) from None
    return tree.body


def _uproot_expression(text: Any, aliases: Mapping[str, str], where: str) -> tuple[str, ast.expr]:
    node = _parse_uproot(text, where)
    try:
        out = _UprootEmitter(aliases, where).emit(node)
    except RecursionError:
        msg = f"{where}: the expression nests too deeply; simplify it"
        raise SpecError(msg) from None
    return _validate(out, where), node


@dataclass
class _TreeQuery:
    index: int
    trees: list[tuple[str, str]]
    expressions: list[str] | None
    cut: str | None
    filter_name: Any
    filter_typename: Any
    aliases: dict[str, str]

    @property
    def where(self) -> str:
        return f"uproot-raw query {self.index + 1}"

    @property
    def needs_branches(self) -> bool:
        if self.expressions is not None:
            return False
        if self.filter_typename is not None or self.filter_name is None:
            return True
        return any(not _is_plain_name(f) for f in _as_list(self.filter_name))


def _as_list(value: Any) -> list[Any]:
    return [value] if isinstance(value, str) else list(value)


def _is_plain_name(pattern: str) -> bool:
    return not (_REGEX_FILTER.match(pattern) or any(c in pattern for c in "*?["))


_REGEX_FILTER = re.compile(r"^/(.*)/([iLmsux]*)$", re.DOTALL)


def _uproot_raw_queries(text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:
        msg = f"uproot-raw query: the selection is not JSON ({err}); send a list of tree queries"
        raise SpecError(msg) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        msg = "uproot-raw query: the selection must be a non-empty JSON list of tree queries"
        raise SpecError(msg)
    for i, query in enumerate(data):
        if not isinstance(query, dict):
            msg = f"uproot-raw query {i + 1}: expected an object with treename, got {type(query).__name__}"
            raise SpecError(msg)
    return data


def _strings(value: Any, what: str, where: str) -> list[str]:
    items = _as_list(value) if isinstance(value, str | list | tuple) else None
    if not items or not all(isinstance(v, str) and v for v in items):
        msg = f"{where}: {what} must be a string or a non-empty list of strings, got {value!r:.80}"
        raise SpecError(msg)
    return items


def _tree_query(i: int, query: dict[str, Any]) -> _TreeQuery:
    where = f"uproot-raw query {i + 1}"
    if "copy_histograms" in query:
        msg = (
            f"{where}: copy_histograms is not supported by columnhub, which delivers "
            "the columns of trees only; remove the copy_histograms query"
        )
        raise SpecError(msg)
    unknown = sorted(set(query) - _TREE_QUERY_FIELDS)
    if unknown:
        msg = (
            f"{where}: unknown field(s) {unknown}; allowed: {', '.join(sorted(_TREE_QUERY_FIELDS))}"
        )
        raise SpecError(msg)
    if query.get("use_standard_awkward_axis"):
        msg = (
            f"{where}: use_standard_awkward_axis: true is not supported by columnhub, whose "
            "reductions work per event (axis=1); leave it out"
        )
        raise SpecError(msg)
    if query.get("fail_on_missing_trees") not in (None, True, False):
        msg = f"{where}: fail_on_missing_trees must be true or false"
        raise SpecError(msg)
    trees = _treenames(query.get("treename"), where)
    expressions = query.get("expressions")
    exprs = None if expressions is None else _strings(expressions, "expressions", where)
    cut = query.get("cut")
    if cut is not None and not isinstance(cut, str):
        msg = f"{where}: cut must be an expression as text, got {cut!r:.80}"
        raise SpecError(msg)
    aliases = query.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        msg = f"{where}: aliases must map names to expressions (text), got {aliases!r:.80}"
        raise SpecError(msg)
    for name in aliases:
        if not _COLUMN_NAME.fullmatch(name) or name.startswith("__"):
            msg = f"{where}: the alias name {name!r} is not a valid name (letters, digits, _ and .)"
            raise SpecError(msg)
    filter_name = query.get("filter_name")
    filter_typename = query.get("filter_typename")
    if filter_name is not None:
        _compile_filter(_strings(filter_name, "filter_name", where), "filter_name", where)
    if filter_typename is not None:
        _compile_filter(
            _strings(filter_typename, "filter_typename", where), "filter_typename", where
        )
    return _TreeQuery(i, trees, exprs, cut, filter_name, filter_typename, aliases)


def _treenames(value: Any, where: str) -> list[tuple[str, str]]:
    if isinstance(value, dict) and value:
        pairs = list(value.items())
    elif isinstance(value, str | list) and value:
        pairs = [(t, t) for t in _as_list(value)]
    else:
        msg = f"{where}: treename must be a tree name, a list of them or a mapping input -> output name, got {value!r:.80}"
        raise SpecError(msg)
    for tree, out in pairs:
        if not (isinstance(tree, str) and tree and isinstance(out, str) and out):
            msg = f"{where}: tree names must be non-empty strings, got {tree!r:.40} -> {out!r:.40}"
            raise SpecError(msg)
    return pairs


def _compile_filter(patterns: Any, what: str, where: str) -> Callable[[str], bool]:
    """uproot's filter rules: ``/regex/flags``, globs (``*?[``), exact names; a list is any-of."""
    tests: list[Callable[[str], bool]] = []
    for pattern in _as_list(patterns):
        m = _REGEX_FILTER.match(pattern)
        if m is not None:
            tests.append(_regex_test(m.group(1), m.group(2), what, where))
        elif any(c in pattern for c in "*?["):
            tests.append(re.compile(fnmatch.translate(pattern)).match)  # type: ignore[arg-type]
        else:
            tests.append(pattern.__eq__)
    return lambda name: any(t(name) for t in tests)


def _regex_test(regex: str, flags: str, what: str, where: str) -> Callable[[str], bool]:
    if len(regex) > _MAX_REGEX:
        msg = f"{where}: the {what} regex is {len(regex)} characters long, more than {_MAX_REGEX}"
        raise SpecError(msg)
    bits = 0
    for flag in flags:
        bits |= {
            "i": re.IGNORECASE,
            "L": 0,
            "m": re.MULTILINE,
            "s": re.DOTALL,
            "u": re.UNICODE,
            "x": re.VERBOSE,
        }[flag]
    try:
        compiled = re.compile(regex, bits)
    except (re.error, OverflowError, RecursionError) as err:
        msg = f"{where}: the {what} regex /{regex}/ is invalid: {err}"
        raise SpecError(msg) from None
    if _nested_repeat(regex, bits):
        msg = (
            f"{where}: the {what} regex /{regex}/ repeats a repeat or an alternation (such as (a+)+ or (a|ab)*), "
            "which can take exponential time; columnhub refuses it: simplify the regex"
        )
        raise SpecError(msg)
    return lambda name: compiled.match(name) is not None


def _nested_repeat(regex: str, flags: int) -> bool:
    """Whether a regex repeats a repeat or an alternation (catastrophic backtracking risk)."""
    import re._parser as sre_parse  # the standard library's regex parser (Python >= 3.11)

    repeats = {
        sre_parse.MAX_REPEAT,
        sre_parse.MIN_REPEAT,
        getattr(sre_parse, "POSSESSIVE_REPEAT", None),
    }

    def children(op: Any, arg: Any) -> list[Any]:
        if op is sre_parse.SUBPATTERN:
            return [arg[-1]]
        if op is sre_parse.BRANCH:
            return list(arg[1])
        if op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
            return [arg[1]]
        return []

    def walk(items: Any, inside: bool) -> bool:
        for op, arg in items:
            if op is sre_parse.BRANCH and inside:
                return True  # (a|ab)* can backtrack exponentially too
            if op in repeats:
                _low, high, sub = arg
                if high != 1 and inside:
                    return True
                if walk(sub, inside or high != 1):
                    return True
            elif any(walk(child, inside) for child in children(op, arg)):
                return True
        return False

    try:
        return walk(sre_parse.parse(regex, flags), False)
    except Exception:  # noqa: BLE001 - unparsable here: refuse as risky
        return True


def _uproot_raw(text: str, branches: BranchList) -> list[_Sample]:
    """Every tree query as a sample; every query is checked before a missing branch list counts."""
    samples: list[_Sample] = []
    missing: LookupError | None = None
    for i, query in enumerate(_uproot_raw_queries(text)):
        tq = _tree_query(i, query)
        for tree, out in tq.trees:
            try:
                samples.append(_uproot_sample(tq, tree, out, branches))
            except LookupError as err:
                missing = missing or err
    if missing is not None:
        raise missing
    return samples


def _uproot_sample(tq: _TreeQuery, tree: str, out: str, branches: BranchList) -> _Sample:
    where = tq.where + (f" (tree {tree!r})" if len(tq.trees) > 1 else "")
    cut = None
    if tq.cut is not None and tq.cut.strip():
        cut, node = _uproot_expression(tq.cut, tq.aliases, f"{where}, cut")
        if not _is_boolean_node(node):
            cut = _validate(f"({cut}) != 0", f"{where}, cut")
    columns: list[str] = []
    define: dict[str, str] = {}
    if tq.expressions is not None:
        for text in tq.expressions:
            what = f"{where}, expression {text!r:.80}"
            converted, node = _uproot_expression(text, tq.aliases, what)
            dotted = _dotted(node)
            if dotted is not None and dotted not in tq.aliases:
                name = dotted  # a branch: delivered as it is
            else:
                name = dotted if dotted is not None else re.sub(r"\s+", "", text)
                define[name] = converted
            if name not in columns:
                columns.append(name)
    elif tq.needs_branches:
        if tree not in branches:
            msg = f"the branch list of tree {tree!r} is needed: call expand(), not translate()"
            raise LookupError(msg)
        columns = _filtered(tq, tree, branches[tree], where)
    else:
        for name in _as_list(tq.filter_name):
            if not _COLUMN_NAME.fullmatch(name):
                msg = f"{where}: filter_name {name!r} is no branch name columnhub can deliver"
                raise SpecError(msg)
            if name not in columns:
                columns.append(name)
    keys = _keys(tree, branches.get(tree), where) if tree != _EVENTS or tree in branches else None
    return _Sample(name=out, tree=tree, columns=columns, define=define, where=cut, keys=keys)


def _keys(tree: str, listing: Sequence[tuple[str, str]] | None, where: str) -> list[str] | None:
    """The event keys of a tree other than NanoAOD's ``Events`` (columnhub plans with keys)."""
    if listing is None:
        msg = f"the branch list of tree {tree!r} is needed: call expand(), not translate()"
        raise LookupError(msg)
    names = {n for n, _ in listing}
    for keys in _KEY_SETS:
        if all(k in names for k in keys):
            return None if keys == _KEY_SETS[0] else list(keys)
    msg = (
        f"{where}: tree {tree!r} has none of the event-number branches columnhub needs "
        "(run, luminosityBlock, event; or runNumber, eventNumber); columnhub serves trees "
        "with event numbers only"
    )
    raise SpecError(msg)


def _truth(node: ast.AST, text: str) -> str:
    """``text`` as a truth value: Python's ``and``/``or``/``not`` test numbers against 0.

    columnhub's ``&``, ``|`` and ``~`` are bitwise on integers (``2 & 1`` is 0),
    so a number under ``and``/``or``/``not`` is compared with 0 first.
    """
    return text if _is_boolean_node(node) else f"({text}) != 0"


def _is_boolean_node(node: ast.AST) -> bool:
    """Whether a cut is boolean by its form (else it is compared with 0, as uproot does)."""
    if isinstance(node, ast.Compare | ast.BoolOp) or (
        isinstance(node, ast.Constant) and isinstance(node.value, bool)
    ):
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.Invert):
        return isinstance(node.op, ast.Not) or _is_boolean_node(node.operand)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitAnd | ast.BitOr | ast.BitXor):
        return _is_boolean_node(node.left) and _is_boolean_node(node.right)
    if type(node).__name__ in ("Any", "All"):  # func_adl's (qastle) Any/All
        return True
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _BOOLEAN_CALLS
    )


def _filtered(
    tq: _TreeQuery, tree: str, listing: Sequence[tuple[str, str]], where: str
) -> list[str]:
    by_name = (
        _compile_filter(tq.filter_name, "filter_name", where)
        if tq.filter_name is not None
        else None
    )
    by_type = (
        _compile_filter(tq.filter_typename, "filter_typename", where)
        if tq.filter_typename is not None
        else None
    )
    out = [
        name
        for name, typename in listing
        if (by_name is None or by_name(name)) and (by_type is None or by_type(typename))
    ]
    if not out:
        from columnhub.errors import closest

        shown = [f"filter_name={tq.filter_name!r}"] if tq.filter_name is not None else []
        shown += (
            [f"filter_typename={tq.filter_typename!r}"] if tq.filter_typename is not None else []
        )
        names = [n for n, _ in listing]
        hint = closest(str(_as_list(tq.filter_name or [""])[0]), names)
        msg = f"{where}: {', '.join(shown)} selects no branch of tree {tree!r}" + (
            f"; closest names: {', '.join(hint)}" if hint else ""
        )
        raise SpecError(msg)
    bad = [n for n in out if not _COLUMN_NAME.fullmatch(n)]
    if bad:
        msg = (
            f"{where}: the branches {bad[:5]} have names columnhub cannot deliver; filter them out"
        )
        raise SpecError(msg)
    return out


def _read_branches(files: list[str], tree: str) -> list[tuple[str, str]]:
    """The first file's branches of ``tree`` as ``(name, typename)``, in the tree's order."""
    from columnhub.datasets import resolve
    from columnhub.spec import DatasetSpec

    try:
        spec = DatasetSpec(name="servicex", files=tuple(files), tree=tree)
    except ValueError as err:
        msg = f"the files or tree of the request are invalid: {err}"
        raise SpecError(msg) from None
    dataset = resolve(spec)
    info = dataset.files[0]
    if info.format != "root":
        return list(dataset.columns.items())
    import uproot

    from columnhub.sources.root import _cached_tree

    out: list[tuple[str, str]] = []
    for name, branch in _cached_tree(info, spec).iteritems(recursive=True, full_paths=False):
        if isinstance(branch.interpretation, uproot.interpretation.identify.UnknownInterpretation):
            continue
        out.append((name, str(branch.typename)))
    return out


# -- FuncADL (qastle) -------------------------------------------------------------------

_SOURCES = {"EventDataset", "ServiceXDatasetSource", "ServiceXSourceUpROOT", "UprootDataset"}
_AGGREGATES = {"Count": "num", "Sum": "sum", "Max": "max", "Min": "min"}


@dataclass(frozen=True)
class _Event:
    """The event itself: an attribute is a branch."""


@dataclass(frozen=True)
class _Record:
    """The dictionary a Select returned: an attribute is one of its entries.

    ``objects``: after a SelectMany, one dictionary per object (every entry a
    per-event list of one collection, delivered one row per object).
    """

    fields: dict[str, str]
    objects: bool = False


@dataclass(frozen=True)
class _Objects:
    """The objects a SelectMany gave: each one element of the per-event lists ``base``.

    ``prefix``: for ``e.Jet`` (or ``e.Jet_pt``), the NanoAOD collection the
    objects belong to: an attribute ``j.pt`` is the column ``Jet_pt``.
    ``masks``: the object Wheres applied so far, in order.
    """

    base: str
    prefix: str | None = None
    masks: tuple[str, ...] = ()

    @property
    def expr(self) -> str:
        """The objects themselves (the per-event lists, masked)."""
        return self.masked(self.base)

    def masked(self, column: str) -> str:
        return _paren(column) + "".join(f"[{m}]" for m in self.masks)

    def where(self, mask: str) -> _Objects:
        return _Objects(self.base, self.prefix, (*self.masks, mask))


_Value = _Event | _Record | _Objects | str


class _FuncAdl:
    def __init__(self) -> None:
        self.tree: str | None = None
        self.wheres: list[str] = []
        self.explode = False

    def refuse(self, what: str, fix: str = "") -> NoReturn:
        msg = f"func_adl: {what} is not supported by columnhub" + (f"; {fix}" if fix else "")
        raise SpecError(msg)

    # the query: a chain of Where/Select over the events

    def query(self, node: ast.AST, depth: int = 0) -> _Value:
        import qastle.linq_util as linq

        if depth > _MAX_DEPTH:
            msg = f"func_adl: the query chains more than {_MAX_DEPTH} operators"
            raise SpecError(msg)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _SOURCES
        ):
            self.tree = _tree_of(node)
            return _Event()
        if isinstance(node, linq.Where):
            current = self.query(node.source, depth + 1)
            if _per_object(current):
                return self.where_objects(node.predicate, current, depth)
            self.wheres.append(self.lambda_body(node.predicate, [current], depth))
            return current
        if isinstance(node, linq.Select):
            current = self.query(node.source, depth + 1)
            if _per_object(current):
                return self.select_objects(node.selector, current, depth)
            return self.lambda_value(node.selector, [current], depth)
        if isinstance(node, linq.SelectMany):
            current = self.query(node.source, depth + 1)
            return self.select_many(node.selector, current, depth)
        self.refuse(self.name_of(node))

    # one row per object: SelectMany over a collection of the event, then Where/Select

    def select_many(self, node: ast.AST, current: _Value, depth: int) -> _Value:
        """The objects of one collection of each event (delivered with ``output.explode``)."""
        import qastle.linq_util as linq

        if _per_object(current):
            self.refuse("a SelectMany after a SelectMany (objects of objects)")
        if not isinstance(node, ast.Lambda) or len(node.args.args) != 1:
            self.refuse(f"{_describe(node)} where a one-argument lambda belongs")
        env: dict[str, _Value] = {node.args.args[0].arg: current}
        self.explode = True
        body = node.body
        if (
            isinstance(body, linq.Select)
            and isinstance(body.selector, ast.Lambda)
            and isinstance(body.selector.body, ast.Dict)
        ):  # e.Jet_pt.Select(lambda j: {'pt': j, ...}): the dictionary of each object
            source = self.objects(body.source, env, depth + 1)
            return self.select_objects(body.selector, source, depth + 1, env)
        return self.objects(body, env, depth + 1)

    def objects(self, node: ast.AST, env: dict[str, _Value], depth: int) -> _Objects:
        """The objects of a collection of the event: ``e.Jet``, ``e.Jet_pt``, ``e.Jet.Where(...)``."""
        import qastle.linq_util as linq

        if depth > _MAX_DEPTH:
            msg = f"func_adl: the expression nests deeper than {_MAX_DEPTH} levels; simplify it"
            raise SpecError(msg)
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and isinstance(env.get(node.value.id), _Event)
        ):
            name = self.member(_Event(), node.attr)
            return _Objects(name, prefix=name)
        if isinstance(node, linq.Where):
            source = self.objects(node.source, env, depth + 1)
            found = self.where_objects(node.predicate, source, depth + 1, env)
            assert isinstance(found, _Objects)
            return found
        value = self.value(node, env, depth)
        if not isinstance(value, str):
            self.refuse(
                "a SelectMany whose lambda returns the event or a dictionary",
                "return one collection of the event: SelectMany(lambda e: e.Jet_pt)",
            )
        return _Objects(value)

    def select_objects(
        self,
        node: ast.AST,
        current: _Value,
        depth: int,
        outer: Mapping[str, _Value] | None = None,
    ) -> _Value:
        """A Select on objects: a dictionary of per-object columns, or new objects."""
        if not isinstance(node, ast.Lambda) or len(node.args.args) != 1:
            self.refuse(f"{_describe(node)} where a one-argument lambda belongs")
        param = node.args.args[0].arg
        env: dict[str, _Value] = {**(outer or {}), param: current}
        if isinstance(node.body, ast.Dict):
            record = self.record(node.body, env, depth)  # inside SelectMany: sees the event too
            for name, value in zip(record.fields, node.body.values, strict=True):
                if not _uses(value, param):
                    self.refuse(
                        f"the per-object entry {name!r} that does not use the object {param!r}",
                        "it would be one value per event, not one per object",
                    )
            return _Record(record.fields, objects=True)
        if not _uses(node.body, param):
            self.refuse(
                f"a Select on objects that does not use its argument {param!r}",
                "it would give one value per event, not one per object",
            )
        return _Objects(self.expr(node.body, env, depth + 1))

    def where_objects(
        self,
        node: ast.AST,
        current: _Value,
        depth: int,
        outer: Mapping[str, _Value] | None = None,
    ) -> _Value:
        """A Where on objects: the objects (or each entry of their dictionary) masked."""
        if not isinstance(node, ast.Lambda) or len(node.args.args) != 1:
            self.refuse(f"{_describe(node)} where a one-argument lambda belongs")
        param = node.args.args[0].arg
        if not _uses(node.body, param):
            self.refuse(
                f"a Where on objects that does not use its argument {param!r}",
                "filter the events with a Where before the SelectMany",
            )
        if isinstance(current, _Objects):
            mask = self.expr(node.body, {**(outer or {}), param: current}, depth + 1)
            return current.where(mask)
        assert isinstance(current, _Record)
        mask = self.lambda_body(node, [_Record(current.fields)], depth)
        return _Record(
            {k: f"{_paren(v)}[{_paren(mask)}]" for k, v in current.fields.items()}, objects=True
        )

    def name_of(self, node: ast.AST) -> str:
        import qastle.linq_util as linq

        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            return f"the data source {node.func.id}"
        for cls in (
            linq.OrderBy, linq.OrderByDescending, linq.Choose, linq.Zip, linq.Concat,
            linq.ElementAt, linq.Last, linq.Aggregate, linq.Contains, linq.First,
            linq.Count, linq.Sum, linq.Max, linq.Min, linq.Any, linq.All,
        ):  # fmt: skip
            if isinstance(node, cls):
                return str(cls.__name__)
        return _describe(node)

    def lambda_value(self, node: ast.AST, args: list[_Value], depth: int) -> _Value:
        if not isinstance(node, ast.Lambda):
            self.refuse(f"{_describe(node)} where a lambda belongs")
        params = [a.arg for a in node.args.args]
        if len(params) != len(args):
            msg = f"func_adl: a lambda takes {len(params)} argument(s) here, expected {len(args)}"
            raise SpecError(msg)
        env = dict(zip(params, args, strict=True))
        body = node.body
        if isinstance(body, ast.Dict):
            return self.record(body, env, depth)
        return self.value(body, env, depth + 1)

    def record(self, body: ast.Dict, env: dict[str, _Value], depth: int) -> _Record:
        """A dictionary of columns, its entries evaluated in ``env``."""
        fields: dict[str, str] = {}
        if len(body.keys) != len(body.values):
            self.refuse("a dictionary with more keys than values (or fewer)")
        for key, value in zip(body.keys, body.values, strict=True):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                self.refuse("a dictionary key that is not a string")
            if not key.value or any(ch.isspace() for ch in key.value):
                msg = f"func_adl: the column name {key.value!r} is not valid (no spaces)"
                raise SpecError(msg)
            fields[key.value] = self.expr(value, env, depth + 1)
        return _Record(fields)

    def lambda_body(self, node: ast.AST, args: list[_Value], depth: int) -> str:
        out = self.lambda_value(node, args, depth)
        if not isinstance(out, str):
            self.refuse("a Where whose lambda returns a dictionary or the event")
        return out

    # values inside a lambda

    def value(self, node: ast.AST, env: dict[str, _Value], depth: int) -> _Value:
        """An event, a record or a column expression."""
        if isinstance(node, ast.Name) and node.id in env:
            return env[node.id]
        return self.expr(node, env, depth)

    def member(self, base: _Value, name: str) -> str:
        if isinstance(base, _Event):
            if name.startswith("__") or not _COLUMN_NAME.fullmatch(name):
                self.refuse(f"the column name {name!r}")
            return name
        if isinstance(base, _Record):
            if name not in base.fields:
                msg = (
                    f"func_adl: {name!r} is not in the dictionary of the previous Select; "
                    f"it holds {', '.join(base.fields)}"
                )
                raise SpecError(msg)
            return _paren(base.fields[name])
        if isinstance(base, _Objects) and base.prefix is not None:
            if name.startswith("__") or not _COLUMN_NAME.fullmatch(name):
                self.refuse(f"the column name {name!r}")
            return base.masked(f"{base.prefix}_{name}")
        self.refuse(f"attribute access .{name} on a column", "objects have no attributes here")

    def expr(self, node: ast.AST, env: dict[str, _Value], depth: int) -> str:
        import qastle.linq_util as linq

        if depth > _MAX_DEPTH:
            msg = f"func_adl: the expression nests deeper than {_MAX_DEPTH} levels; simplify it"
            raise SpecError(msg)
        d = depth + 1
        if isinstance(node, ast.Name):
            if node.id not in env:
                self.refuse(
                    f"the free name {node.id!r}",
                    "columns are attributes of the lambda's argument (e.Jet_pt)",
                )
            bound = env[node.id]
            if isinstance(bound, str):
                return bound
            if isinstance(bound, _Objects):
                return bound.expr
            self.refuse(
                f"using the whole {'event' if isinstance(bound, _Event) else 'dictionary'} {node.id!r} as a value"
            )
        if isinstance(node, ast.Attribute):
            return self.member(self.value(node.value, env, d), node.attr)
        if isinstance(node, ast.Subscript):
            index = node.slice
            if isinstance(index, ast.Constant) and isinstance(index.value, str):
                return self.member(self.value(node.value, env, d), index.value)
            self.refuse("a subscript other than e['column']")
        if isinstance(node, ast.Constant):
            return _constant(node.value, "func_adl")
        if isinstance(node, ast.BinOp):
            op = _BINOPS.get(type(node.op))
            if op is None:
                self.refuse(_OP_NAMES.get(type(node.op), type(node.op).__name__))
            return f"{_paren(self.expr(node.left, env, d))} {op} {_paren(self.expr(node.right, env, d))}"
        if isinstance(node, ast.UnaryOp):
            inner = self.expr(node.operand, env, d)
            if isinstance(node.op, ast.Not):
                return f"~{_paren(_truth(node.operand, inner))}"
            sign = {ast.USub: "-", ast.UAdd: "+"}.get(type(node.op), "~")
            return f"{sign}{_paren(inner)}"
        if isinstance(node, ast.BoolOp):
            op = " & " if isinstance(node.op, ast.And) else " | "
            return op.join(_paren(_truth(v, self.expr(v, env, d))) for v in node.values)
        if isinstance(node, ast.Compare):
            parts = [_paren(self.expr(node.left, env, d))]
            for cmp, right in zip(node.ops, node.comparators, strict=True):
                sym = _CMPOPS.get(type(cmp))
                if sym is None:
                    self.refuse(_OP_NAMES.get(type(cmp), type(cmp).__name__))
                parts += [sym, _paren(self.expr(right, env, d))]
            return " ".join(parts)
        if isinstance(node, ast.IfExp):
            args = [self.expr(n, env, d) for n in (node.test, node.body, node.orelse)]
            return f"where({', '.join(args)})"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "abs":
            if len(node.args) != 1 or node.keywords:
                self.refuse("abs() with other than one argument")
            return f"abs({self.expr(node.args[0], env, d)})"
        if isinstance(node, linq.Where):
            source = self.expr(node.source, env, d)
            mask = self.object_lambda(node.predicate, source, env, d)
            return f"{_paren(source)}[{mask}]"
        if isinstance(node, linq.Select):
            source = self.expr(node.source, env, d)
            return self.object_lambda(node.selector, source, env, d)
        if type(node).__name__ in _AGGREGATES and isinstance(
            node, linq.Count | linq.Sum | linq.Max | linq.Min
        ):
            return f"{_AGGREGATES[type(node).__name__]}({self.expr(node.source, env, d)})"
        if isinstance(node, linq.Any | linq.All):
            source = self.expr(node.source, env, d)
            test = self.object_lambda(node.predicate, source, env, d)
            return f"{'any' if isinstance(node, linq.Any) else 'all'}({test})"
        self.refuse(self.name_of(node))

    def object_lambda(self, node: ast.AST, source: str, env: dict[str, _Value], depth: int) -> str:
        """The body of a per-object lambda, its argument standing for ``source``'s objects."""
        if not isinstance(node, ast.Lambda) or len(node.args.args) != 1:
            self.refuse(f"{_describe(node)} where a one-argument lambda belongs")
        if isinstance(node.body, ast.Dict):
            self.refuse(
                "a dictionary inside a collection's Select",
                "build the dictionary at the event level",
            )
        param = node.args.args[0].arg
        if not any(isinstance(n, ast.Name) and n.id == param for n in ast.walk(node.body)):
            self.refuse(
                f"a collection's lambda that does not use its argument {param!r}",
                "it would give one value per event, not one per object",
            )
        inner = {**env, param: _paren(source)}
        return self.expr(node.body, inner, depth + 1)


def _per_object(value: _Value) -> bool:
    return isinstance(value, _Objects) or (isinstance(value, _Record) and value.objects)


def _uses(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node))


def _tree_of(node: ast.Call) -> str:
    args = node.args
    tree = args[1] if len(args) >= 2 else None
    if not (isinstance(tree, ast.Constant) and isinstance(tree.value, str)) or tree.value in (
        "",
        "None",
    ):
        msg = (
            "func_adl: the query names no tree; start it with FromTree('Events') "
            "(FuncADL_Uproot().FromTree('Events') in Python, FromTree('Events'). in YAML)"
        )
        raise SpecError(msg)
    return tree.value


def _nesting(text: str) -> int:
    """The deepest parenthesis nesting of qastle text, outside quoted strings (a linear scan)."""
    depth = deepest = 0
    quote = ""
    escaped = False
    for ch in text:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    return deepest


def _func_adl(text: str) -> _Sample:
    import qastle

    if _nesting(text) > 2 * _MAX_DEPTH:
        msg = f"func_adl: the query nests more than {2 * _MAX_DEPTH} levels deep; simplify it"
        raise SpecError(msg)
    try:
        tree = qastle.insert_linq_nodes(qastle.text_ast_to_python_ast(text))
    except RecursionError:
        msg = "func_adl: the query nests too deeply to parse; simplify it"
        raise SpecError(msg) from None
    except ColumnhubError:
        raise
    except Exception as err:  # noqa: BLE001 - qastle/lark raise many kinds for bad text
        msg = (
            f"func_adl: the selection is not valid qastle ({type(err).__name__}: {str(err)[:200]})"
        )
        raise SpecError(msg) from None
    body = tree.body if isinstance(tree, ast.Module) else None
    if not body or len(body) != 1 or not isinstance(body[0], ast.Expr):
        msg = "func_adl: the selection must be one query"
        raise SpecError(msg)
    translator = _FuncAdl()
    try:
        result = translator.query(body[0].value)
    except RecursionError:
        msg = "func_adl: the query nests too deeply; simplify it"
        raise SpecError(msg) from None
    if isinstance(result, _Objects):
        msg = (
            "func_adl: a SelectMany must end with a Select returning a dictionary of the "
            "object's columns, e.g. .SelectMany(lambda e: e.Jet_pt).Select(lambda j: {'pt': j})"
        )
        raise SpecError(msg)
    if not isinstance(result, _Record):
        msg = (
            "func_adl: the query must end with a Select returning a dictionary of columns, "
            "e.g. .Select(lambda e: {'jet_pt': e.Jet_pt})"
        )
        raise SpecError(msg)
    assert translator.tree is not None
    columns: list[str] = []
    define: dict[str, str] = {}
    for name, text_ in result.fields.items():
        plain = text_[1:-1] if text_.startswith("(") and text_.endswith(")") else text_
        if plain == name and _COLUMN_NAME.fullmatch(name):
            columns.append(name)
            continue
        define[name] = _validate(text_, f"func_adl: column {name!r}")
        columns.append(name)
    wheres = [_validate(w, "func_adl: Where") for w in translator.wheres]
    where = " & ".join(_paren(w) for w in wheres) if wheres else None
    if where is not None and len(wheres) > 1:
        where = _validate(where, "func_adl: Where")
    return _Sample(
        name=translator.tree,
        tree=translator.tree,
        columns=columns,
        define=define,
        where=where,
        explode=translator.explode,
    )
