"""ServiceX queries (UprootRaw, FuncADL_Uproot) translated into columnhub requests.

Each supported construct is translated, delivered embedded on the shared
NanoAOD files and compared with an independent reference: uproot's own
``TTree.arrays`` (with the ServiceX transformer's per-event awkward functions)
for UprootRaw, ``func_adl_uproot``'s own evaluation of the qastle for
FuncADL. The query texts come from the ``servicex`` client classes, so they
are exactly what the client sends.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import awkward as ak
import pytest
import uproot
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import columnhub
from columnhub.errors import SpecError
from columnhub.service.servicex_query import expand, translate, trees_needing_branches

servicex = pytest.importorskip("servicex")
from servicex import query as sxquery
from servicex.func_adl.func_adl_dataset import FuncADLQuery_Uproot

# -- references --------------------------------------------------------------------------


def _servicex_language() -> Any:
    """uproot's Python language with the ServiceX transformer's awkward functions.

    The transformer adds awkward functions whose ``axis`` defaults to 1 (per
    event) instead of awkward's 0; written here from its documentation.
    """
    from uproot.language.python import PythonLanguage

    def per_event(func: Any) -> Any:
        return lambda x, axis=1: func(x, axis=axis)

    functions = {
        **PythonLanguage.default_functions,
        "num": ak.num,
        "count": per_event(ak.count),
        "count_nonzero": per_event(ak.count_nonzero),
        "sum": per_event(ak.sum),
        "any": per_event(ak.any),
        "all": per_event(ak.all),
        "min": per_event(ak.min),
        "max": per_event(ak.max),
        "mean": per_event(ak.mean),
        "firsts": ak.firsts,
        "where": ak.where,
    }
    return PythonLanguage(functions=functions)


def _uproot_reference(path: Path, query: dict[str, Any], tree: str = "Events") -> ak.Array:
    """What the ServiceX uproot-raw transformer computes for one tree query."""
    with uproot.open(path) as f:
        return f[tree].arrays(
            query.get("expressions"),
            cut=query.get("cut"),
            filter_name=query.get("filter_name"),
            filter_typename=query.get("filter_typename"),
            aliases=query.get("aliases"),
            language=_servicex_language(),
        )


def _func_adl_reference(qastle_text: str, path: Path, tree: str = "Events") -> ak.Array:
    """func_adl_uproot's own evaluation of the qastle (what the ServiceX transformer runs)."""
    import func_adl_uproot

    return func_adl_uproot.generate_function(qastle_text)([str(path)], tree)


def _same_value(a: Any, b: Any, *, rel: float = 1e-6, abs_: float = 1e-9) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        return (
            isinstance(a, list)
            and isinstance(b, list)
            and len(a) == len(b)
            and all(_same_value(x, y, rel=rel, abs_=abs_) for x, y in zip(a, b, strict=True))
        )
    if a is None or b is None:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b) and type(a) is type(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def _assert_same(got: ak.Array, want: ak.Array, *, what: str) -> None:
    """Same values (floats to 1e-6), same lists, same missing values."""
    assert len(got) == len(want), what
    g, w = got.tolist(), want.tolist()
    assert _same_value(g, w), f"{what}: {g[:3]} != {w[:3]}"


def _compare_with_uproot(result: columnhub.Result, reference: ak.Array) -> None:
    """Every uproot field, by its name without spaces; columnhub adds only counters."""
    got = result.to_awkward()
    names = {name.replace(" ", ""): name for name in reference.fields}
    assert [n for n in got.fields if n in names] == list(names), (got.fields, reference.fields)
    for extra in set(got.fields) - set(names):  # NanoAOD counters (nJet for Jet_pt)
        assert extra.startswith("n"), extra
    for name, ref_name in names.items():
        _assert_same(got[name], reference[ref_name], what=name)


def _deliver(spec: dict[str, Any], tmp_path: Path) -> Any:
    return columnhub.deliver(spec, output=tmp_path / "out")


def _uproot_raw(*queries: dict[str, Any]) -> str:
    return sxquery.UprootRaw(list(queries)).generate_selection_string()


# -- UprootRaw ---------------------------------------------------------------------------


def test_uproot_raw_filter_names_and_cut(shared_data: Path, tmp_path: Path) -> None:
    dy = shared_data / "nano_dy.root"
    query = {
        "treename": "Events",
        "filter_name": ["MET_pt", "Jet_pt", "Jet_eta", "nMuon"],
        "cut": "(num(Jet_pt) >= 2) & (MET_pt > 15) | (nMuon > 1)",
    }
    selection = _uproot_raw(query)
    assert trees_needing_branches("uproot-raw", selection) == []
    spec = translate("uproot-raw", selection, files=[str(dy)], result_format="parquet")
    result = _deliver(spec, tmp_path)
    reference = _uproot_reference(dy, query)
    assert 0 < len(reference) < uproot.open(dy)["Events"].num_entries  # the cut selects
    # uproot orders the branches as the tree does, columnhub as the query names them
    got = result.to_awkward()
    assert sorted(n for n in got.fields if n != "nJet") == sorted(reference.fields)
    for name in reference.fields:
        _assert_same(got[name], reference[name], what=name)


@pytest.mark.parametrize(
    "expressions",
    [
        ["Jet_pt * 2", "abs(Jet_eta)", "MET_pt / (1 + nJet)", "-MET_phi", "MET_pt ** 2 // 7 % 5"],
        ["sum(Jet_pt)", "max(Jet_pt)", "min(Jet_eta)", "num(Jet_pt)", "count(Jet_pt)"],
        ["mean(Jet_pt)", "any(Jet_pt > 50)", "all(abs(Jet_eta) < 2.4)", "firsts(Jet_pt)"],
        ["count_nonzero(Jet_pt > 30, axis=1)", "sum(Jet_pt[Jet_pt > 30])", "Jet_pt[:, :2]"],
        [
            "sqrt(MET_pt) + log(MET_pt) - exp(-MET_phi)",
            "arctan2(MET_phi, MET_pt)",
            "where(MET_pt > 20, MET_pt, 0)",
        ],
        [
            "(MET_pt > 20) & ~(nJet > 3)",
            "get('MET_pt')",
            "MET_pt > 20 and nJet > 1",
            "not nJet > 3",
            "nJet and nMuon",
            "not nMuon",
            "nJet or 0",
        ],
    ],
)
def test_uproot_raw_expressions(shared_data: Path, tmp_path: Path, expressions: list[str]) -> None:
    dy = shared_data / "nano_dimuon.root"  # it has an event without jets: empty lists reduced
    query = {"treename": "Events", "expressions": expressions, "cut": "MET_pt > 1"}  # keeps it
    # Python's and/or/not raise on arrays in uproot; columnhub gives them Python's
    # meaning (numbers compared with 0, never bitwise): the reference spells that out
    python_logic = {
        "MET_pt > 20 and nJet > 1": "(MET_pt > 20) & (nJet > 1)",
        "not nJet > 3": "~(nJet > 3)",
        "nJet and nMuon": "(nJet != 0) & (nMuon != 0)",
        "not nMuon": "nMuon == 0",
        "nJet or 0": "(nJet != 0) | (0 != 0)",
    }
    reference_query = {**query, "expressions": [python_logic.get(e, e) for e in expressions]}
    spec = translate("uproot-raw", _uproot_raw(query), files=[str(dy)], result_format="parquet")
    got = _deliver(spec, tmp_path).to_awkward()
    reference = _uproot_reference(dy, reference_query)
    assert len(got.fields) == len(expressions)
    for name, text, ref_text in zip(
        got.fields, expressions, reference_query["expressions"], strict=True
    ):
        assert name == text.replace(" ", "")  # uproot names an output by its text
        _assert_same(got[name], reference[ref_text], what=text)


def test_uproot_raw_aliases_and_numeric_cut(shared_data: Path, tmp_path: Path) -> None:
    tt = shared_data / "nano_tt_v12.root"
    query = {
        "treename": "Events",
        "expressions": ["ht", "lead", "ht / lead"],
        "aliases": {"ht": "sum(good)", "good": "Jet_pt[Jet_pt > 30]", "lead": "max(Jet_pt)"},
        "cut": "num(good) - 4",  # a number: uproot keeps the events where it is not 0
    }
    spec = translate("uproot-raw", _uproot_raw(query), files=[str(tt)], result_format="parquet")
    assert "good" not in spec["columns"]
    result = _deliver(spec, tmp_path)
    reference = _uproot_reference(tt, query)
    assert len(reference) < uproot.open(tt)["Events"].num_entries
    _compare_with_uproot(result, reference)


@pytest.mark.parametrize(
    ("filter_name", "filter_typename"),
    [
        (["Jet_p*", "MET_?t"], None),
        (["/Muon_(pt|eta)$/", "/^met_PHI$/i"], None),
        ("/^Electron_.*/", ["float[]"]),
        (None, ["uint64_t", "int32_t"]),
        (["Jet_[pe]t*", "nJet"], None),
        ("/Jet_pt/", None),  # from the start, as uproot: not FatJet_pt, GenJet_pt
    ],
)
def test_uproot_raw_patterns(
    shared_data: Path, tmp_path: Path, filter_name: Any, filter_typename: Any
) -> None:
    dimuon = shared_data / "nano_dimuon.root"
    query = {
        "treename": "Events",
        "filter_name": filter_name,
        "filter_typename": filter_typename,
        "cut": "MET_pt > 20",
    }
    selection = _uproot_raw(query)
    assert trees_needing_branches("uproot-raw", selection) == ["Events"]
    with pytest.raises(LookupError, match="expand"):
        translate("uproot-raw", selection, files=[str(dimuon)], result_format="parquet")
    spec = expand("uproot-raw", selection, files=[str(dimuon)], result_format="parquet")
    reference = _uproot_reference(dimuon, query)
    assert reference.fields  # the pattern selects branches
    assert spec["columns"] == reference.fields  # the tree's order, as uproot
    _compare_with_uproot(_deliver(spec, tmp_path), reference)


def test_uproot_raw_every_branch(shared_data: Path) -> None:
    """No expressions and no filter_name: every branch, in the tree's order."""
    dy = shared_data / "nano_dy.root"
    selection = _uproot_raw({"treename": "Events"})
    spec = expand("uproot-raw", selection, files=[str(dy)], result_format="parquet")
    with uproot.open(dy) as f:
        want = f["Events"].arrays(entry_stop=1).fields
    assert spec["columns"] == want


def test_uproot_raw_several_trees_root_output(shared_data: Path, tmp_path: Path) -> None:
    dy = shared_data / "nano_dy.root"
    q1 = {
        "treename": {"Events": "zjets"},
        "filter_name": ["MET_pt", "Muon_pt"],
        "cut": "nMuon >= 2",
    }
    q2 = {"treename": ["Events", "Runs"], "filter_name": ["run", "/genEventSumw.?_/"]}
    selection = _uproot_raw(q1, q2)
    spec = expand("uproot-raw", selection, files=[str(dy)], result_format="root-file")
    assert list(spec["samples"]) == ["zjets", "Events", "Runs"]
    results = columnhub.deliver(spec, output=tmp_path / "out")
    assert list(results) == ["zjets", "Events", "Runs"]
    for name, (query, tree) in {
        "zjets": (q1, "Events"),
        "Events": (q2, "Events"),
        "Runs": (q2, "Runs"),
    }.items():
        result = results[name]
        assert result.manifest["format"] == "root"
        with uproot.open(result.files[0]) as f:
            assert f["Events"].classname == "TTree"
        _compare_with_uproot(result, _uproot_reference(dy, query, tree))


def test_expand_refuses_before_reading() -> None:
    """A refused query is refused by expand before any file is opened (here: none exists)."""
    selection = _uproot_raw(
        {"treename": "Events", "filter_name": "Jet_*"},
        {"treename": "Events", "filter_name": "MET_*", "cut": "MET_pt.sum()"},
    )
    with pytest.raises(SpecError, match=r"query 2, cut: method call \.sum\(\)"):
        expand("uproot-raw", selection, files=["/nonexistent/x.root"], result_format="parquet")


def test_uproot_raw_one_renamed_tree_is_one_request() -> None:
    selection = _uproot_raw({"treename": {"Events": "zjets"}, "filter_name": "MET_pt"})
    spec = translate("uproot-raw", selection, files=["x.root"], result_format="root-file")
    request = columnhub.load_request(spec)
    assert isinstance(request, columnhub.Request)
    assert request.dataset.name == "zjets"
    assert request.dataset.tree == "Events"
    assert request.output.format == "root"
    assert not request.output.include_keys  # uproot delivers only what was asked


def test_uproot_raw_refusals() -> None:
    files = ["/nonexistent/never-read.root"]  # translate is pure: the file is never opened

    def refused(query: Any, match: str) -> None:
        text = query if isinstance(query, str) else json.dumps(query)
        with pytest.raises(SpecError, match=match):
            translate("uproot-raw", text, files=files, result_format="parquet")

    refused([{"copy_histograms": "CutBookkeeper*"}], "copy_histograms is not supported")
    refused(
        [{"treename": "Events", "filter_nam": "Jet_pt"}], r"unknown field\(s\) \['filter_nam'\]"
    )
    refused(
        [{"treename": "Events", "expressions": "sum(Jet_pt)", "use_standard_awkward_axis": True}],
        "use_standard_awkward_axis",
    )
    refused(
        [{"treename": "Events", "expressions": "sum(Jet_pt, axis=0)"}], r"axis=0\) is not supported"
    )
    refused([{"treename": "Events", "expressions": "Jet_pt[0]"}], "indexing or slicing the events")
    refused([{"treename": "Events", "expressions": "e * Jet_pt"}], "the name 'e'")
    refused([{"treename": "Events", "expressions": "hypot(MET_pt, 1)"}], r"the function hypot\(\)")
    refused(
        [{"treename": "Events", "expressions": "x", "aliases": {"x": "y", "y": "x"}}],
        "cycle",
    )
    for regex in ("/(a+)+$/", "/(Jet_|Jet)*pt/", "/(x*y?)*z/i"):
        refused([{"treename": "Events", "filter_name": regex}], "exponential")
    refused([{"treename": "Events", "filter_name": "/Jet_(pt/"}], "regex /Jet_\\(pt/ is invalid")
    doubling = {f"a{i}": f"a{i + 1} + a{i + 1}" for i in range(30)}
    refused(
        [{"treename": "Events", "expressions": "a0", "aliases": {**doubling, "a30": "MET_pt"}}],
        "expands to more than 10000 characters",
    )
    refused(
        [{"treename": "Events", "filter_name": "x"}, {"treename": "Events", "filter_name": "y"}],
        "two tree queries write the output tree 'Events'",
    )
    refused("not json", "not JSON")
    with pytest.raises(SpecError, match="result-format 'arrow'"):
        translate(
            "uproot-raw", _uproot_raw({"treename": "Events"}), files=files, result_format="arrow"
        )


_HOSTILE = [
    ("__import__('os').system('touch /tmp/pwned')", r"method call \.system\(\)"),
    ("__import__('os')", r"function __import__\(\)"),
    ("Jet_pt.__class__.__mro__", "names starting with __"),
    ("(lambda: 1)()", "call of a computed function"),
    ("[x for x in Jet_pt]", "list comprehension"),
    ("Jet_pt.sum()", r"method call \.sum\(\)"),
    ("open('/etc/passwd').read()", r"method call \.read\(\)"),
    ("eval('1')", r"function eval\(\)"),
    ("(x := Jet_pt)", "assignment expression"),
    ("Jet_pt[Jet_pt.argmax()]", r"method call \.argmax\(\)"),
    ("f'{Jet_pt}'", "f-string"),
    ("'a' * 10", "string constant"),
    ("Jet_pt @ Jet_eta", "operator @"),
    ("Jet_pt[(1, 2)]", "subscript"),
    ("MET_pt in Jet_pt", "operator in"),
    ("get('a b')", "branch name 'a b'"),
    ("+".join(["Jet_pt"] * 2000), "characters long"),
    ("(" * 300 + "MET_pt" + ")" * 300, "nest|simplify"),
    ("-" * 150 + "MET_pt", "nests deeper"),
]


@pytest.mark.parametrize(("text", "match"), _HOSTILE)
def test_uproot_raw_hostile_expressions_are_refused(text: str, match: str) -> None:
    for field in ("cut", "expressions"):
        selection = json.dumps([{"treename": "Events", "filter_name": "MET_pt", field: text}])
        with pytest.raises(SpecError, match=match):
            translate("uproot-raw", selection, files=["x.root"], result_format="parquet")


_TOKENS = [
    "Jet_pt", "MET_pt", "nJet", "e", "pi", "1", "2.5", "-", "+", "*", "/", "**", "//", "%",
    "&", "|", "~", "^", "<", ">=", "==", "!=", "(", ")", "[", "]", ":", ",", ".", " ",
    "abs(", "sum(", "num(", "any(", "where(", "axis=1", "axis=0", "lambda x: ", "not ",
    " and ", " or ", " if ", " else ", "'os'", "__import__", "__class__", ".system(",
    "get('MET_pt')", "[:, 0]", "[:, 1:3]", "x", "{", "}", "@", ":=", "yield", "f'",
    "__import__('pathlib').Path('SENTINEL').touch()",
]  # fmt: skip


@given(st.lists(st.sampled_from(_TOKENS), max_size=25).map("".join) | st.text(max_size=60))
def test_uproot_raw_random_text_is_refused_or_translated(text: str) -> None:
    """Any text: a request columnhub accepts, or a SpecError; never evaluated, never a crash."""
    sentinel = Path("SENTINEL")
    for field in ("cut", "expressions"):
        selection = json.dumps([{"treename": "Events", "filter_name": "MET_pt", field: text}])
        try:
            spec = translate("uproot-raw", selection, files=["x.root"], result_format="parquet")
        except SpecError:
            continue
        assert columnhub.Request.from_dict(spec).columns
    assert not sentinel.exists()


def _binary(ops: list[str]) -> Any:
    return lambda children: st.tuples(children, st.sampled_from(ops), children).map(
        lambda t: f"({t[0]} {t[1]} {t[2]})"
    )


_JAGGED = st.recursive(
    st.sampled_from(["Jet_pt", "Jet_eta"]),
    lambda c: st.one_of(
        _binary(["+", "-", "*"])(c),
        c.map(lambda x: f"abs({x})"),
        c.map(lambda x: f"({x} * MET_pt)"),
    ),
    max_leaves=3,
)
_FLAT = st.recursive(
    st.sampled_from(["MET_pt", "MET_phi", "2", "0.5"])
    | _JAGGED.map(lambda x: f"sum({x})")
    | _JAGGED.map(lambda x: f"num({x})")
    | _JAGGED.map(lambda x: f"sum({x}[Jet_pt > 25])")
    | _JAGGED.map(lambda x: f"count_nonzero({x} > 0, axis=1)"),
    lambda c: st.one_of(_binary(["+", "-", "*"])(c), c.map(lambda x: f"abs({x})")),
    max_leaves=4,
)
_COMPARISON = st.tuples(_FLAT, st.sampled_from(["<", "<=", ">", ">=", "!="]), _FLAT).map(
    lambda t: f"({t[0]} {t[1]} {t[2]})"
) | _JAGGED.map(lambda x: f"any({x} > 20)")
_BOOLEAN = st.recursive(
    _COMPARISON,
    lambda c: st.one_of(_binary(["&", "|", "^"])(c), c.map(lambda x: f"~{x}")),
    max_leaves=3,
)


@pytest.fixture(scope="module")
def dy_events(shared_data: Path) -> tuple[Any, dict[str, Any]]:
    tree = uproot.open(shared_data / "nano_dy.root")["Events"]
    names = ["MET_pt", "MET_phi", "Jet_pt", "Jet_eta"]
    arrays = tree.arrays(names)
    return tree, {n: arrays[n] for n in names}


@settings(deadline=None)  # the first example opens the file
@given(expression=_FLAT | _BOOLEAN | _JAGGED)
def test_uproot_raw_translation_keeps_the_meaning(
    dy_events: tuple[Any, dict[str, Any]], expression: str
) -> None:
    """A random uproot expression computes what uproot computes, once translated.

    Without missing values: where they meet ``&``/``|`` columnhub's three-valued
    logic (``False & None`` is False) differs from awkward's (None), as documented.
    """
    from columnhub.expressions import parse

    assume("_" in expression)  # uproot gives a constant as one number, not one per event
    # ``~`` of a constant-only group such as ``~(2 < 2)``: Python's bitwise not of a bool
    # (-1) turns uproot's result into integers; the translation reads it as a logical not
    # (documented in docs/servicex-queries.md)
    assume(re.search(r"~\s*\([\d\s.<>=!()]+\)", expression) is None)
    tree, columns = dy_events
    selection = json.dumps([{"treename": "Events", "expressions": [expression]}])
    spec = translate("uproot-raw", selection, files=["x.root"], result_format="parquet")
    name = spec["columns"][0]
    text = spec.get("define", {}).get(name, name)
    got = parse(text).evaluate(columns)
    want = tree.arrays([expression], language=_servicex_language())[expression]
    assert _same_value(ak.to_list(got), want.tolist(), rel=1e-5, abs_=1e-3), (expression, text)


# -- FuncADL_Uproot ----------------------------------------------------------------------


def _python_query(build: Any) -> str:
    return build(sxquery.FuncADL_Uproot().FromTree("Events")).generate_selection_string()


def _yaml_query(text: str) -> str:
    import yaml

    node = yaml.ScalarNode(tag="!FuncADL_Uproot", value=text)
    return FuncADLQuery_Uproot.from_yaml(None, node).generate_selection_string()


# func_adl reads each lambda's source: one query per function, as users write them


def _q_columns(q: Any) -> Any:
    return q.Select(lambda e: {"met": e.MET_pt, "Jet_pt": e.Jet_pt, "eta": e["Jet_eta"]})


def _q_where_and_arithmetic(q: Any) -> Any:
    return (
        q.Where(lambda e: e.nJet >= 2 and not e.MET_pt < 20)
        .Where(lambda e: e.nMuon > 0 or e.MET_pt > 40)
        .Select(
            lambda e: {
                "x": e.MET_pt * 2 + abs(e.MET_phi) - 1,
                "y": e.Jet_pt / e.MET_pt,
                "both": e.nJet and e.nMuon,  # numbers: Python's truth, not bitwise &
            }
        )
    )


def _q_collections(q: Any) -> Any:
    return q.Select(
        lambda e: {
            "n30": e.Jet_pt.Where(lambda j: j > 30).Count(),
            "ht": e.Jet_pt.Where(lambda j: j > 30 and j < 1000).Sum(),
            "good": e.Jet_pt.Where(lambda j: j > e.MET_pt / 2),
            "double": e.Jet_pt.Select(lambda j: j * 2),
            "nmu": e.Muon_pt.Count(),
            "lead": e.Jet_pt.Max(),
        }
    )


def _q_select_then_where(q: Any) -> Any:
    return (
        q.Select(lambda e: {"pt": e.Jet_pt, "met": e.MET_pt})
        .Where(lambda r: r.met > 25)
        .Select(lambda r: {"pt": r.pt, "n": r.pt.Count(), "met": r.met})
    )


def _q_select_many(q: Any) -> Any:
    return q.SelectMany(lambda e: e.Jet_pt.Where(lambda j: j > 30)).Select(
        lambda j: {"pt": j, "twice": j * 2}
    )


def _q_select_many_dict(q: Any) -> Any:
    return q.Where(lambda e: e.MET_pt > 20).SelectMany(
        lambda e: e.Jet_pt.Select(lambda j: {"pt": j, "frac": j / e.MET_pt})
    )


def _q_select_then_select_many(q: Any) -> Any:
    return q.Select(lambda e: {"pt": e.Jet_pt, "met": e.MET_pt}).SelectMany(
        lambda r: r.pt.Select(lambda p: {"pt": p, "frac": p / r.met})
    )


_FUNC_ADL_QUERIES = {
    "columns": (
        _q_columns,
        "FromTree('Events').Select(lambda e: {'met': e.MET_pt, 'Jet_pt': e.Jet_pt, 'eta': e['Jet_eta']})",
    ),
    "where_and_arithmetic": (
        _q_where_and_arithmetic,
        (
            "FromTree('Events').Where(lambda e: e.nJet >= 2 and not e.MET_pt < 20)"
            ".Where(lambda e: e.nMuon > 0 or e.MET_pt > 40)"
            ".Select(lambda e: {'x': e.MET_pt * 2 + abs(e.MET_phi) - 1, 'y': e.Jet_pt / e.MET_pt,"
            " 'both': e.nJet and e.nMuon})"
        ),
    ),
    "collections": (
        _q_collections,
        (
            "FromTree('Events').Select(lambda e: {'n30': e.Jet_pt.Where(lambda j: j > 30).Count(),"
            " 'ht': e.Jet_pt.Where(lambda j: j > 30 and j < 1000).Sum(),"
            " 'good': e.Jet_pt.Where(lambda j: j > e.MET_pt / 2),"
            " 'double': e.Jet_pt.Select(lambda j: j * 2), 'nmu': e.Muon_pt.Count(),"
            " 'lead': e.Jet_pt.Max()})"
        ),
    ),
    "select_then_where": (
        _q_select_then_where,
        (
            "FromTree('Events').Select(lambda e: {'pt': e.Jet_pt, 'met': e.MET_pt})"
            ".Where(lambda r: r.met > 25).Select(lambda r: {'pt': r.pt, 'n': r.pt.Count(), 'met': r.met})"
        ),
    ),
    "select_many": (
        _q_select_many,
        (
            "FromTree('Events').SelectMany(lambda e: e.Jet_pt.Where(lambda j: j > 30))"
            ".Select(lambda j: {'pt': j, 'twice': j * 2})"
        ),
    ),
    "select_many_dict": (
        _q_select_many_dict,
        (
            "FromTree('Events').Where(lambda e: e.MET_pt > 20)"
            ".SelectMany(lambda e: e.Jet_pt.Select(lambda j: {'pt': j, 'frac': j / e.MET_pt}))"
        ),
    ),
    "select_then_select_many": (
        _q_select_then_select_many,
        (
            "FromTree('Events').Select(lambda e: {'pt': e.Jet_pt, 'met': e.MET_pt})"
            ".SelectMany(lambda r: r.pt.Select(lambda p: {'pt': p, 'frac': p / r.met}))"
        ),
    ),
}


@pytest.mark.parametrize("name", list(_FUNC_ADL_QUERIES))
def test_func_adl_python_and_yaml(shared_data: Path, tmp_path: Path, name: str) -> None:
    build, yaml_text = _FUNC_ADL_QUERIES[name]
    tt = shared_data / "nano_tt_v12.root"
    from_python = _python_query(build)
    from_yaml = _yaml_query(yaml_text)
    assert from_python.startswith("(call ")  # the two forms
    assert from_yaml.startswith(("(Select ", "(SelectMany "))
    spec = translate("uproot", from_python, files=[str(tt)], result_format="parquet")
    # both forms are one request
    assert (
        columnhub.Request.from_dict(spec).hash
        == columnhub.Request.from_dict(
            translate("uproot", from_yaml, files=[str(tt)], result_format="parquet")
        ).hash
    )
    got = _deliver(spec, tmp_path).to_awkward()
    reference = _func_adl_reference(from_python, tt)
    assert [f for f in got.fields if f in reference.fields] == reference.fields
    assert set(got.fields) - set(reference.fields) <= {"nJet"}  # Jet_pt comes with its counter
    assert len(got) == len(reference)  # SelectMany: one row per jet
    for field in reference.fields:
        _assert_same(got[field], reference[field], what=field)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("Select(lambda e: {'pt': e.Jet_pt.OrderBy(lambda j: j)})", "OrderBy is not supported"),
        ("SelectMany(lambda e: e.Jet_pt)", "SelectMany must end with a Select returning a dict"),
        (
            "SelectMany(lambda e: e.Jet_pt).SelectMany(lambda j: j).Select(lambda j: {'a': j})",
            "SelectMany after a SelectMany",
        ),
        ("SelectMany(lambda e: e).Select(lambda j: {'a': j})", "returns the event"),
        (
            "SelectMany(lambda e: e.Jet_pt.Select(lambda j: {'pt': j, 'met': e.MET_pt}))",
            "per-object entry 'met' that does not use the object 'j'",
        ),
        (
            "SelectMany(lambda e: e.Jet_pt).Where(lambda j: 1 > 0).Select(lambda j: {'a': j})",
            "Where on objects that does not use its argument",
        ),
        ("SelectMany(lambda e: e.Jet).Select(lambda j: {'a': j.__class__})", "'__class__'"),
        ("Select(lambda e: e.MET_pt)", "dictionary of columns"),
        ("Select(lambda e: {'pt': e.Jet_pt.First()})", "First is not supported"),
        ("Select(lambda e: {'pt': e.Jet_pt.pt()})", r"method call \.pt\(\)"),
        ("Select(lambda e: {'pt': e.__class__})", "column name '__class__'"),
        ("Select(lambda e: {'a b': e.MET_pt})", "no spaces"),
        ("Select(lambda e: {'pt': e.Jet_pt[0]})", "subscript"),
        (
            "Select(lambda e: {'pt': e.MET_pt}).Select(lambda r: {'x': r.other})",
            "'other' is not in",
        ),
        ("Select(lambda e: {'pt': __import__('os').system('ls')})", r"method call \.system\(\)"),
        ("Select(lambda e: {'pt': e.Jet_pt.Where(lambda j: j.pt > 3)})", r"attribute access \.pt"),
        ("Select(lambda e: {'one': e.Jet_pt.Select(lambda j: 1)})", "does not use its argument"),
        ("Select(lambda e: {'n': e.Jet_pt.Where(lambda j: e.MET_pt > 3).Count()})", "does not use"),
    ],
)
def test_func_adl_refusals(text: str, match: str) -> None:
    qastle_text = _yaml_query("FromTree('Events')." + text)
    with pytest.raises(SpecError, match=match):
        translate("uproot", qastle_text, files=["x.root"], result_format="parquet")


def test_func_adl_select_many_objects_of_a_collection(shared_data: Path, tmp_path: Path) -> None:
    """``e.Jet`` as NanoAOD objects (``j.pt`` is ``Jet_pt``), Where on objects before and after
    the dictionary: one row per jet, as a direct uproot read flattened here."""
    tt = shared_data / "nano_tt_v12.root"
    selection = _yaml_query(
        "FromTree('Events').Where(lambda e: e.MET_pt > 20)"
        ".SelectMany(lambda e: e.Jet.Where(lambda j: j.pt > 25))"
        ".Select(lambda j: {'pt': j.pt, 'eta': j.eta, 'm': j.mass})"
        ".Where(lambda r: abs(r.eta) < 2.4 and r.m > 5)"
    )
    spec = translate("uproot", selection, files=[str(tt)], result_format="root-file")
    assert spec["output"]["explode"] is True
    result = _deliver(spec, tmp_path)
    with uproot.open(tt) as f:
        events = f["Events"].arrays(["Jet_pt", "Jet_eta", "Jet_mass", "MET_pt"])
    events = events[events.MET_pt > 20]
    jets = ak.zip({"pt": events.Jet_pt, "eta": events.Jet_eta, "m": events.Jet_mass})
    jets = jets[jets.pt > 25]
    jets = ak.flatten(jets[(abs(jets.eta) < 2.4) & (jets.m > 5)])
    got: dict[str, list[float]] = {"pt": [], "eta": [], "m": []}
    for part in result.files:
        with uproot.open(part) as f:
            arrays = f["Events"].arrays(list(got))
        for name in got:
            got[name] += arrays[name].tolist()
    assert len(jets) > 0
    for name, values in got.items():
        _assert_same(ak.Array(values), jets[name], what=name)
    assert result.manifest["events"] == len(events)


def test_func_adl_python_refusal() -> None:
    """The Python client's text (call ...) is refused the same way."""
    selection = sxquery.FuncADL_Uproot().FromTree("Events").SelectMany(lambda e: e.Jet_pt)
    with pytest.raises(SpecError, match="SelectMany must end with a Select returning a dict"):
        translate(
            "uproot",
            selection.generate_selection_string(),
            files=["x.root"],
            result_format="parquet",
        )


def test_func_adl_other_tree(shared_data: Path, tmp_path: Path) -> None:
    """A tree other than Events (NanoAOD's Runs) is read with the event numbers it has."""
    dy = shared_data / "nano_dy.root"
    selection = _yaml_query(
        "FromTree('Runs').Select(lambda r: {'sumw': r.genEventSumw_, 'n': r.genEventCount_})"
    )
    assert trees_needing_branches("uproot", selection) == ["Runs"]
    spec = expand("uproot", selection, files=[str(dy)], result_format="parquet")
    assert spec["dataset"]["keys"] == ["run"]
    got = _deliver(spec, tmp_path).to_awkward()
    reference = _func_adl_reference(selection, dy, "Runs")
    for field in reference.fields:
        _assert_same(got[field], reference[field], what=field)


def test_func_adl_needs_a_tree() -> None:
    with pytest.raises(SpecError, match="FromTree"):
        translate(
            "uproot",
            _yaml_query("Select(lambda e: {'pt': e.Jet_pt})"),
            files=["x.root"],
            result_format="parquet",
        )


@pytest.mark.parametrize(
    "text",
    [
        "(call (attr (call __import__ 'os') 'system') 'ls')",
        "(Select (call EventDataset 'f' 'Events') (lambda (list e) (dict (list 'a') (list (call eval 'x')))))",
        "(Select (call EventDataset 'f' 'Events') (lambda (list e) (dict (list 'a') (list (attr (attr e '__class__') 'x')))))",
        "(Select (call EventDataset 'f' 'Events') (lambda (list e) (dict (list 'a') (list (call (lambda (list x) x) 1)))))",
        "(Select (call EventDataset 'f' 'Events') (lambda (list e) (dict (list 'a') (list (subscript e 0)))))",
        "(((((",
        "",
        "(Select (call EventDataset 'f' 'Events') (lambda (list e) (dict (list 'a' 'b') (list 1))))",
        "(Select (call EventDataset 'f' 'Events') (lambda (list e) (dict (list 'a') (list "
        + "(+ 1 " * 300
        + "1"
        + ")" * 300
        + "))))",
    ],
)
def test_func_adl_hostile_qastle(text: str) -> None:
    with pytest.raises(SpecError):
        translate("uproot", text, files=["x.root"], result_format="parquet")


_QASTLE_TOKENS = [
    "(", ")", "call", "Select", "Where", "EventDataset", "'f'", "'Events'", "lambda", "list",
    "e", "j", "dict", "'a'", "attr", "'Jet_pt'", "'__class__'", ">", "+", "1", "2.5", "and",
    "not", "subscript", "Count", "Sum", "OrderBy", "__import__", "'os'", " ",
]  # fmt: skip


@given(st.lists(st.sampled_from(_QASTLE_TOKENS), max_size=40).map(" ".join))
def test_func_adl_random_qastle_is_refused_or_translated(text: str) -> None:
    try:
        spec = translate("uproot", text, files=["x.root"], result_format="parquet")
    except SpecError:
        return
    assert columnhub.Request.from_dict(spec).columns


def test_translate_rejects_unknown_codegen_and_empty_files() -> None:
    with pytest.raises(SpecError, match="codegen 'atlasr22'"):
        translate("atlasr22", "x", files=["x.root"], result_format="parquet")
    with pytest.raises(SpecError, match="no input files"):
        translate(
            "uproot-raw", _uproot_raw({"treename": "Events"}), files=[], result_format="parquet"
        )
