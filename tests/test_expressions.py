"""Tests of the safe expression language (columnhub.expressions).

Every feature is checked against an independent hand-written awkward/numpy
computation, on small random jagged data and on a real NanoAOD file.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import doctest
import math
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import awkward as ak
import numpy as np
import pytest
import uproot
from hypothesis import given, settings
from hypothesis import strategies as st

from columnhub import expressions
from columnhub.errors import ColumnhubError, ColumnNotFoundError, ExpressionError
from columnhub.expressions import FUNCTIONS, MAX_DEPTH, MAX_LENGTH, Expression, parse

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def _structure(value: Any) -> Any:
    if isinstance(value, list):
        return [_structure(v) for v in value]
    return None


def assert_same(got: Any, want: Any, *, rtol: float = 1e-6, atol: float = 1e-9) -> None:
    """Equal awkward/numpy/list values: same nesting, None where None, floats close."""
    g = ak.to_list(got) if not isinstance(got, list) else got
    w = ak.to_list(want) if not isinstance(want, list) else want
    assert _structure(g) == _structure(w), (g, w)
    for a, b in zip(_leaves(g), _leaves(w), strict=True):
        if a is None or b is None:
            assert a is b, (g, w)
        elif isinstance(a, float) or isinstance(b, float):
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(
                a, b, rel_tol=rtol, abs_tol=atol
            ), (a, b)
        else:
            assert a == b, (a, b)


def _jagged(rng: np.random.Generator, counts: np.ndarray, low: float, high: float) -> ak.Array:
    flat = rng.uniform(low, high, int(counts.sum())).astype(np.float32)
    return ak.unflatten(flat, counts)


@pytest.fixture(scope="module")
def rand() -> dict[str, Any]:
    """Small random NanoAOD-like columns (jagged jets and muons, flat MET)."""
    rng = np.random.default_rng(7)
    n = 300
    jets = rng.integers(0, 7, n)
    muons = rng.integers(0, 4, n)
    return {
        "Jet_pt": _jagged(rng, jets, 5, 200),
        "Jet_eta": _jagged(rng, jets, -4.5, 4.5),
        "Jet_phi": _jagged(rng, jets, -np.pi, np.pi),
        "Jet_mass": _jagged(rng, jets, 0, 20),
        "Muon_pt": _jagged(rng, muons, 3, 100),
        "Muon_eta": _jagged(rng, muons, -2.4, 2.4),
        "Muon_phi": _jagged(rng, muons, -np.pi, np.pi),
        "Muon_mass": ak.ones_like(_jagged(rng, muons, 0, 1)) * np.float32(0.1057),
        "MET_pt": rng.uniform(0, 150, n).astype(np.float32),
        "MET_phi": rng.uniform(-np.pi, np.pi, n).astype(np.float32),
        "nJet": jets.astype(np.int32),
    }


@pytest.fixture(scope="module")
def nano(shared_data: Path) -> dict[str, ak.Array]:
    """Real NanoAOD columns read with uproot."""
    branches = [f"{c}_{v}" for c in ("Jet", "Muon") for v in ("pt", "eta", "phi", "mass")] + [
        "MET_pt",
        "MET_phi",
        "nJet",
        "Muon_charge",
        "run",
        "event",
    ]
    with uproot.open(shared_data / "nano_tt_v12.root") as f:
        arrays = f["Events"].arrays(branches)
    return {name: arrays[name] for name in branches}


# --------------------------------------------------------------------------- features


def _hand(name: str, c: dict[str, Any]) -> ak.Array:
    """Hand-written references, by case name (independent of the expression code)."""
    pt, eta, phi = c["Jet_pt"], c["Jet_eta"], c["Jet_phi"]
    met = ak.Array(c["MET_pt"])
    refs: dict[str, Callable[[], Any]] = {
        "add": lambda: pt + eta,
        "arith": lambda: -pt * 2 + eta / 3 - (pt // 7) % 3 + (+eta) ** 2,
        "flat_jagged": lambda: pt / met,
        "compare": lambda: pt >= 50,
        "chained": lambda: (eta > -1) & (eta < 2.5),
        "logic": lambda: ((pt > 30) & (abs(eta) < 2.4)) | ~(phi > 0),
        "aliases": lambda: ((pt > 30) & (abs(eta) < 2.4)) | ~(phi > 0),
        "xor": lambda: (pt > 30) ^ (eta > 0),
        "mask": lambda: pt[pt > 30],
        "mask_other": lambda: eta[(pt > 30) & (abs(eta) < 2.4)],
        "num": lambda: ak.num(pt[abs(eta) < 2.4], axis=1) >= 2,
        "sum": lambda: ak.sum(pt, axis=1),
        "any": lambda: ak.any(pt > 100, axis=1),
        "all": lambda: ak.all(pt > 20, axis=1),
        "min": lambda: ak.min(pt, axis=1),
        "max": lambda: ak.max(pt, axis=1),
        "mean": lambda: ak.mask(ak.sum(pt, axis=1) / ak.num(pt, axis=1), ak.num(pt, axis=1) > 0),
        "first": lambda: ak.firsts(pt),
        "index0": lambda: ak.pad_none(pt, 1)[:, 0],
        "index2": lambda: ak.pad_none(pt, 3)[:, 2],
        "index_last": lambda: ak.Array([row[-1] if len(row) else None for row in pt.tolist()]),
        "index_m2": lambda: ak.Array([row[-2] if len(row) >= 2 else None for row in pt.tolist()]),
        "slice": lambda: pt[:, :2],
        "slice_step": lambda: pt[:, 1::2],
        "mask_then_index": lambda: ak.pad_none(pt[pt > 30], 1)[:, 0],
        "where": lambda: ak.where(pt > 50, pt, 0),
        "ifexp": lambda: ak.where(pt > 50, pt, 0),
        "minmax": lambda: np.minimum(pt, 60) + np.maximum(eta, 0),
        "isnan": lambda: np.isnan(np.sqrt(eta)),
        "round": lambda: np.round(pt / 3),
        "round2": lambda: np.round(pt / 3, 2),
        "floorceil": lambda: np.floor(eta) + np.ceil(eta),
        "trig": lambda: np.sin(phi) + np.cos(phi) + np.tan(phi / 4),
        "arc": lambda: np.arcsin(eta / 5) + np.arccos(eta / 5) + np.arctan(eta),
        "arctan2": lambda: np.arctan2(eta, phi),
        "hyper": lambda: np.sinh(eta) + np.cosh(eta) + np.tanh(eta),
        "explog": lambda: np.exp(eta) + np.log(pt) + np.log10(pt) + np.sqrt(pt),
        "const": lambda: pt * np.pi + np.e,
        "bools": lambda: (pt > 30) | False,
    }
    return refs[name]()


FEATURES = {
    "add": "Jet_pt + Jet_eta",
    "arith": "-Jet_pt * 2 + Jet_eta / 3 - (Jet_pt // 7) % 3 + (+Jet_eta) ** 2",
    "flat_jagged": "Jet_pt / MET_pt",
    "compare": "Jet_pt >= 50",
    "chained": "-1 < Jet_eta < 2.5",
    "logic": "(Jet_pt > 30) & (abs(Jet_eta) < 2.4) | ~(Jet_phi > 0)",
    "aliases": "Jet_pt > 30 and abs(Jet_eta) < 2.4 or not Jet_phi > 0",
    "xor": "(Jet_pt > 30) ^ (Jet_eta > 0)",
    "mask": "Jet_pt[Jet_pt > 30]",
    "mask_other": "Jet_eta[(Jet_pt > 30) & (abs(Jet_eta) < 2.4)]",
    "num": "num(Jet_pt[abs(Jet_eta) < 2.4]) >= 2",
    "sum": "sum(Jet_pt)",
    "any": "any(Jet_pt > 100)",
    "all": "all(Jet_pt > 20)",
    "min": "min(Jet_pt)",
    "max": "max(Jet_pt)",
    "mean": "mean(Jet_pt)",
    "first": "first(Jet_pt)",
    "index0": "Jet_pt[:, 0]",
    "index2": "Jet_pt[:, 2]",
    "index_last": "Jet_pt[:, -1]",
    "index_m2": "Jet_pt[:, -2]",
    "slice": "Jet_pt[:, :2]",
    "slice_step": "Jet_pt[:, 1::2]",
    "mask_then_index": "Jet_pt[Jet_pt > 30][:, 0]",
    "where": "where(Jet_pt > 50, Jet_pt, 0)",
    "ifexp": "Jet_pt if Jet_pt > 50 else 0",
    "minmax": "minimum(Jet_pt, 60) + maximum(Jet_eta, 0)",
    "isnan": "isnan(sqrt(Jet_eta))",
    "round": "round(Jet_pt / 3)",
    "round2": "round(Jet_pt / 3, 2)",
    "floorceil": "floor(Jet_eta) + ceil(Jet_eta)",
    "trig": "sin(Jet_phi) + cos(Jet_phi) + tan(Jet_phi / 4)",
    "arc": "arcsin(Jet_eta / 5) + arccos(Jet_eta / 5) + arctan(Jet_eta)",
    "arctan2": "arctan2(Jet_eta, Jet_phi)",
    "hyper": "sinh(Jet_eta) + cosh(Jet_eta) + tanh(Jet_eta)",
    "explog": "exp(Jet_eta) + log(Jet_pt) + log10(Jet_pt) + sqrt(Jet_pt)",
    "const": "Jet_pt * pi + e",
    "bools": "(Jet_pt > 30) | False",
}


@pytest.mark.parametrize("case", sorted(FEATURES))
def test_feature_matches_hand_written_awkward(case: str, rand: dict[str, Any]) -> None:
    with np.errstate(all="ignore"):
        want = _hand(case, rand)
    got = parse(FEATURES[case]).evaluate(rand)
    assert isinstance(got, ak.Array)
    assert len(got) == len(rand["MET_pt"])
    assert_same(got, want)


@pytest.mark.parametrize("case", ["num", "mask", "index0", "slice", "sum", "max"])
def test_feature_matches_hand_written_awkward_on_real_nanoaod(
    case: str, nano: dict[str, ak.Array]
) -> None:
    got = parse(FEATURES[case]).evaluate(nano)
    assert_same(got, _hand(case, nano))


def test_every_function_is_exercised_by_a_feature_case() -> None:
    used = {name for text in FEATURES.values() for name in parse(text).canonical.split("(")}
    tested_elsewhere = {"delta_phi", "delta_r", "mass", "mass2"}
    missing = {f for f in FUNCTIONS if not any(u.endswith(f) for u in used)}
    assert missing <= tested_elsewhere


def test_flat_columns_keep_their_dtype_with_literals(rand: dict[str, Any]) -> None:
    got = parse("MET_pt * 2 + 1").evaluate(rand)
    want = rand["MET_pt"] * 2 + 1
    assert str(ak.type(got)) == f"{len(want)} * float32"
    np.testing.assert_array_equal(ak.to_numpy(got), want)


def test_real_data_selection_counts_match_direct_numpy(nano: dict[str, ak.Array]) -> None:
    got = parse("num(Jet_pt[(Jet_pt > 30) & (abs(Jet_eta) < 2.4)]) >= 4").evaluate(nano)
    want = [
        sum(1 for p, e in zip(pts, etas, strict=True) if p > 30 and abs(e) < 2.4) >= 4
        for pts, etas in zip(nano["Jet_pt"].tolist(), nano["Jet_eta"].tolist(), strict=True)
    ]
    assert got.tolist() == want
    assert 0 < sum(want) < len(want)  # the cut actually selects something


# --------------------------------------------------------------------------- physics helpers


def _direct_mass(pts: list[float], etas: list[float], phis: list[float], ms: list[float]) -> float:
    e = px = py = pz = 0.0
    for pt, eta, phi, m in zip(pts, etas, phis, ms, strict=True):
        x, y, z = pt * math.cos(phi), pt * math.sin(phi), pt * math.sinh(eta)
        px, py, pz = px + x, py + y, pz + z
        e += math.sqrt(x * x + y * y + z * z + m * m)
    return math.sqrt(max(e * e - px * px - py * py - pz * pz, 0.0))


def test_dimuon_mass_matches_direct_formula_on_real_data(nano: dict[str, ak.Array]) -> None:
    text = "mass(Muon_pt[:, :2], Muon_eta[:, :2], Muon_phi[:, :2], Muon_mass[:, :2])"
    got = parse(text).evaluate(nano).tolist()
    rows = zip(*(nano[f"Muon_{v}"].tolist() for v in ("pt", "eta", "phi", "mass")), strict=True)
    want = [_direct_mass(pt[:2], eta[:2], phi[:2], m[:2]) for pt, eta, phi, m in rows]
    assert_same(got, want, rtol=1e-4)
    two = ak.num(nano["Muon_pt"]) >= 2
    assert ak.sum(two) > 5
    # Opposite-sign pairs of the tt sample: masses well above the muon mass.
    assert max(g for g, t in zip(got, two.tolist(), strict=True) if t) > 20


def test_mass_on_random_jagged_and_with_constant_mass(rand: dict[str, Any]) -> None:
    got = parse("mass(Jet_pt, Jet_eta, Jet_phi, 0)").evaluate(rand).tolist()
    rows = zip(*(rand[f"Jet_{v}"].tolist() for v in ("pt", "eta", "phi")), strict=True)
    want = [_direct_mass(pt, eta, phi, [0.0] * len(pt)) for pt, eta, phi in rows]
    # A single massless jet has mass 0 up to float64 round-off of E**2 - p**2 (E ~ 10 TeV).
    assert_same(got, want, rtol=1e-6, atol=1e-2)


def test_mass2_matches_mass_of_two_leading_objects(rand: dict[str, Any]) -> None:
    m2 = parse(
        "mass2(Muon_pt[:, 0], Muon_eta[:, 0], Muon_phi[:, 0], Muon_mass[:, 0],"
        " Muon_pt[:, 1], Muon_eta[:, 1], Muon_phi[:, 1], Muon_mass[:, 1])"
    ).evaluate(rand)
    rows = zip(*(rand[f"Muon_{v}"].tolist() for v in ("pt", "eta", "phi", "mass")), strict=True)
    want = [
        _direct_mass(pt[:2], eta[:2], phi[:2], m[:2]) if len(pt) >= 2 else None
        for pt, eta, phi, m in rows
    ]
    assert_same(m2, want, rtol=1e-4)


def test_delta_phi_and_delta_r_match_direct_formula(rand: dict[str, Any]) -> None:
    dphi = parse("delta_phi(Jet_phi, MET_phi)").evaluate(rand)
    dr = parse("delta_r(Jet_eta, Jet_phi, Muon_eta[:, 0], Muon_phi[:, 0])").evaluate(rand)
    want_dphi, want_dr = [], []
    rows = zip(
        rand["Jet_eta"].tolist(),
        rand["Jet_phi"].tolist(),
        rand["MET_phi"].tolist(),
        rand["Muon_eta"].tolist(),
        rand["Muon_phi"].tolist(),
        strict=True,
    )
    for etas, phis, met_phi, mu_etas, mu_phis in rows:
        want_dphi.append([math.remainder(p - met_phi, 2 * math.pi) for p in phis])
        if not mu_etas:
            # no muon: the missing per-event value meets each jet as a missing item
            want_dr.append([None] * len(etas))
            continue
        want_dr.append(
            [
                math.hypot(e - mu_etas[0], math.remainder(p - mu_phis[0], 2 * math.pi))
                for e, p in zip(etas, phis, strict=True)
            ]
        )
    assert_same(dphi, want_dphi, rtol=1e-4)
    assert_same(dr, want_dr, rtol=1e-4)
    flat = ak.flatten(dphi)
    assert ak.all(flat >= -np.pi)
    assert ak.all(flat <= np.pi)


def test_delta_r_on_real_data(nano: dict[str, ak.Array]) -> None:
    got = parse("min(delta_r(Jet_eta, Jet_phi, Muon_eta[:, 0], Muon_phi[:, 0]))").evaluate(nano)
    want = []
    rows = zip(
        *(nano[k].tolist() for k in ("Jet_eta", "Jet_phi", "Muon_eta", "Muon_phi")), strict=False
    )
    for etas, phis, mu_etas, mu_phis in rows:
        if not mu_etas or not etas:
            want.append(None)
            continue
        want.append(
            min(
                math.hypot(e - mu_etas[0], math.remainder(p - mu_phis[0], 2 * math.pi))
                for e, p in zip(etas, phis, strict=True)
            )
        )
    assert_same(got, want, rtol=1e-4)
    assert any(w is not None for w in want)


# --------------------------------------------------------------------------- API details


def test_names_include_dotted_names_but_not_functions_or_constants() -> None:
    expr = parse("sqrt(AnalysisJetsAuxDyn.pt) + sys_up.Jet_pt * pi + friend.matched + e")
    assert expr.names == frozenset({"AnalysisJetsAuxDyn.pt", "sys_up.Jet_pt", "friend.matched"})
    assert expr.text == "sqrt(AnalysisJetsAuxDyn.pt) + sys_up.Jet_pt * pi + friend.matched + e"


def test_dotted_names_read_flat_keys_and_record_fields() -> None:
    cols = {
        "sys_up.Jet_pt": ak.Array([[1.0, 2.0], []]),
        "friend": ak.Array([{"matched": True, "x": {"y": 5}}, {"matched": False, "x": {"y": 6}}]),
    }
    assert parse("sum(sys_up.Jet_pt)").evaluate(cols).tolist() == [3.0, 0.0]
    assert parse("friend.matched").evaluate(cols).tolist() == [True, False]
    assert parse("friend.x.y * 2").evaluate(cols).tolist() == [10, 12]
    with pytest.raises(ColumnNotFoundError, match=r"friend\.nope"):
        parse("friend.nope").evaluate(cols)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("a+b", "a + b"),
        ("(a)+(b)", "a + b"),
        ("  a*b\n", "a * b"),
        ("Jet_pt[Jet_pt>30]", "Jet_pt[ Jet_pt  >  30 ]"),
        ("x[:,0]", "x[ : , 0 ]"),
        ("a and b", "a & b"),
        ("not a", "~a"),
        ("a if c else b", "where(c, a, b)"),
        ("0<x<5", "0 < x < 5"),
        ("((a + b)) * c", "(a + b) * c"),
        ("friend . matched", "friend.matched"),
        ("1.0", "1."),
        ("(a+b\n + c)", "a + b + c"),
    ],
)
def test_canonical_is_equal_for_equivalent_spellings(a: str, b: str) -> None:
    assert parse(a).canonical == parse(b).canonical


@pytest.mark.parametrize(
    ("a", "b"), [("a - (b - c)", "a - b - c"), ("a ** b ** c", "(a ** b) ** c"), ("a/b", "a//b")]
)
def test_canonical_differs_for_different_expressions(a: str, b: str) -> None:
    assert parse(a).canonical != parse(b).canonical


def test_expression_pickles_and_evaluates_after_a_round_trip(rand: dict[str, Any]) -> None:
    expr = parse("num(Jet_pt[abs(Jet_eta) < 2.4])")
    back = pickle.loads(pickle.dumps(expr))
    assert back == expr
    assert back.canonical == expr.canonical
    assert back.names == expr.names
    assert back.evaluate(rand).tolist() == expr.evaluate(rand).tolist()
    # Built by hand (no compiled tree) it still evaluates, by re-parsing its text.
    bare = Expression(text=expr.text, canonical=expr.canonical, names=expr.names)
    assert bare.evaluate(rand).tolist() == expr.evaluate(rand).tolist()


def test_numpy_inputs_and_constant_expressions(rand: dict[str, Any]) -> None:
    met = np.asarray(rand["MET_pt"], dtype=np.float64)
    got = parse("MET_pt / 2").evaluate({"MET_pt": met})
    np.testing.assert_array_equal(ak.to_numpy(got), met / 2)
    const = parse("2 * pi").evaluate({"MET_pt": met})
    assert const.tolist() == [2 * np.pi] * len(met)
    with pytest.raises(ExpressionError, match="number of events"):
        parse("1 + 1").evaluate({})


def test_literal_arithmetic_never_hangs_and_never_warns() -> None:
    cols = {"x": np.arange(4, dtype=np.int64)}
    got = parse("9**9**9 + x").evaluate(cols)
    want = np.int64(9) ** np.int64(9**9) + np.arange(4)  # int64 wrap-around, as in numpy
    np.testing.assert_array_equal(ak.to_numpy(got), want)
    assert parse("1 / 0 + x").evaluate(cols).tolist() == [np.inf] * 4
    assert parse("x // 0").evaluate(cols).tolist() == [0] * 4
    assert parse("10.0 ** 400").evaluate(cols).tolist() == [np.inf] * 4
    assert np.isnan(parse("sqrt(-1.0)").evaluate(cols).tolist()).all()
    assert parse("0x" + "f" * 300 + " > x").evaluate(cols).tolist() == [True] * 4


def test_missing_column_lists_closest_names_and_position(rand: dict[str, Any]) -> None:
    with pytest.raises(ColumnNotFoundError) as info:
        parse("MET_pt + Jet_Pt[:, 0]").evaluate(rand)
    message = str(info.value)
    assert "'Jet_Pt'" in message
    assert "Jet_pt" in message
    assert "position 9" in message
    assert "\n             ^" in message.split("\n", 1)[1]
    assert isinstance(info.value, KeyError)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ("Jet_pt +* 2", 8, "invalid syntax"),
        ("a + (b", 4, "never closed"),
        ("a + lambda: 1", 4, "lambda"),
        ("a + foo(b)", 4, "unknown function 'foo'"),
        ("a + sqr(b)", 4, "did you mean sqrt"),
        ("a + x.__class__", 4, "'__'"),
        ("a + x.sum()", 4, "plain name"),
        ("a + (a+b).c", 4, "dotted column name"),
        ("a + min(a, b)", 4, "minimum(a, b)"),
        ("a + sqrt(a, b)", 4, "takes 1 argument"),
        ("a + where(a, b)", 4, "takes 3 arguments"),
        ("a + sqrt(x=a)", 9, "positional"),
        ("a + 'abc'", 4, "str literals"),
        ("a + None", 4, "None is not allowed"),
        ("a + [x for x in y]", 4, "comprehensions"),
        ("a + (1, 2)", 4, "tuples"),
        ("a + x[0]", 4, "first axis"),
        ("a + x[1:2]", 4, "first axis"),
        ("a + x[:, b]", 9, "integer literals"),
        ("a + x[:, 1.5]", 9, "integer literals"),
        ("a + x[:, ::0]", 9, "step cannot be zero"),
        ("a + x[:, :, 0]", 4, "subscripts allowed"),
        ("a in b", 0, "not allowed"),
        ("a > 1 & b in c", 0, "not allowed"),
        ("a @ b", 0, "MatMult"),
        ("a << 2", 0, "LShift"),
        ("a + (b := 2)", 5, "assignments"),
        ("a + f'{b}'", 4, "f-strings"),
        ("a + 1j", 4, "complex"),
        ("é + ä + sqrt()", 8, "takes 1 argument"),
        ("  a + 'x'", 6, "str literals"),
        ("(a +\n 'x')", 6, "str literals"),
        ("a + 2 ** -1", 4, "negative integer powers"),
        ("", 0, "empty"),
        ("Jet_pt > 30 & Jet_eta < 2", 9, "reads as `Jet_pt > (30 & Jet_eta) < 2`"),
        ("a == 1 | b == 2", 5, "'|' binds tighter"),
    ],
)
def test_parse_errors_point_at_the_offending_node(text: str, position: int, fragment: str) -> None:
    with pytest.raises(ExpressionError) as info:
        parse(text)
    err = info.value
    assert fragment in str(err)
    assert err.position == position
    if not text:
        return
    lines = str(err).splitlines()
    assert lines[-1] == "    " + " " * position + "^"
    assert lines[-2] == "    " + text.replace("\n", " ")


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ("MET_pt + sum(MET_pt)", 9, "sum() works on the per-event lists"),
        ("MET_pt + MET_pt[:, 0]", 9, "indexing [:, 0]"),
        ("Jet_pt[MET_pt > 3]", 0, "both the column and the mask must be jagged"),
        ("Jet_pt[Jet_pt]", 0, "must be boolean"),
        ("Jet_pt + Muon_pt", 0, "cannot evaluate '+' `Jet_pt + Muon_pt`"),
        ("MET_pt + (Jet_eta & 1)", 10, "'&'"),
        ("mass(MET_pt, MET_pt, MET_pt, MET_pt)", 0, "at least one argument must be jagged"),
    ],
)
def test_evaluation_errors_name_the_sub_expression(
    text: str, position: int, fragment: str, rand: dict[str, Any]
) -> None:
    expr = parse(text)
    with pytest.raises(ExpressionError) as info:
        expr.evaluate(rand)
    assert fragment in str(info.value)
    assert info.value.position == position
    assert str(info.value).splitlines()[-1] == "    " + " " * position + "^"


def test_parenthesized_bitwise_operands_in_comparisons_are_accepted() -> None:
    cols = {"flags": np.array([1, 2, 3, 6]), "pt": np.array([10.0, 20.0, 30.0, 40.0])}
    assert parse("0 < (flags & 2) < 3").evaluate(cols).tolist() == [False, True, True, True]
    assert parse("(flags & 2) == 2").evaluate(cols).tolist() == [False, True, True, True]
    got = parse("(pt > 15) & (flags < 5)").evaluate(cols).tolist()
    assert got == [False, True, True, False]


def test_limits_on_length_and_depth() -> None:
    with pytest.raises(ExpressionError, match="limit is 10000"):
        parse("a+" * (MAX_LENGTH // 2) + "a")
    with pytest.raises(ExpressionError, match="nested"):
        parse("(" * 150 + "a" + ")" * 150 + "+1" * 0 + "-a" * 150)
    with pytest.raises(ExpressionError, match="nested"):
        parse("-" * 3000 + "a")
    with pytest.raises(ExpressionError, match="nested"):
        parse(" and ".join(["a"] * 200))
    with pytest.raises(ExpressionError, match="nested"):
        parse("sqrt(" * 120 + "a" + ")" * 120)
    deep = "+".join(["a"] * (MAX_DEPTH - 5))
    assert parse(deep).evaluate({"a": np.ones(3)}).tolist() == [MAX_DEPTH - 5.0] * 3
    with pytest.raises(ExpressionError, match="must be a string"):
        parse(b"a + b")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- safety


@contextlib.contextmanager
def no_code_execution() -> Iterator[list[str]]:
    """While active, eval/exec fail and compile() works only for ``ast.PyCF_ONLY_AST``.

    Imports of os/subprocess/shutil/socket are recorded too. Yields the list of
    forbidden calls seen (it must stay empty).
    """
    calls: list[str] = []
    real_compile = builtins.compile
    real_import = builtins.__import__

    def guarded_compile(
        source: Any, filename: Any, mode: str, flags: int = 0, *a: Any, **kw: Any
    ) -> Any:
        if not flags & ast.PyCF_ONLY_AST:
            calls.append(f"compile({source!r})")
            msg = "compile() of code"
            raise AssertionError(msg)
        return real_compile(source, filename, mode, flags, *a, **kw)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        calls.append(f"eval/exec{args!r}")
        msg = "eval/exec called"
        raise AssertionError(msg)

    def guarded_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name in {"os", "subprocess", "shutil", "socket"}:
            calls.append(f"import {name}")
        return real_import(name, *args, **kwargs)

    expressions._parse_cached.cache_clear()
    with (
        mock.patch.object(builtins, "compile", guarded_compile),
        mock.patch.object(builtins, "eval", forbidden),
        mock.patch.object(builtins, "exec", forbidden),
        mock.patch.object(builtins, "__import__", guarded_import),
    ):
        yield calls


_SMALL = {
    "x": ak.Array([[1.0, 2.0], [], [3.0]]),
    "y": ak.Array([[True, False], [], [True]]),
    "z": np.array([1.5, -2.0, 0.0]),
    "i": np.array([1, 2, 3]),
    "a.b": np.array([4.0, 5.0, 6.0]),
}


def _parse_and_evaluate(text: str) -> None:
    with no_code_execution() as calls:
        try:
            _check_parse_and_evaluate(text)
        finally:
            assert calls == []


def _check_parse_and_evaluate(text: str) -> None:
    try:
        expr = parse(text)
    except ColumnhubError:
        return
    assert isinstance(expr.canonical, str)
    assert parse(expr.canonical).canonical == expr.canonical  # canonical is a fixed point
    try:
        result = expr.evaluate(_SMALL)
    except ColumnhubError:
        return
    assert isinstance(result, ak.Array)
    assert len(result) == 3


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=60))
def test_random_text_raises_only_columnhub_errors(text: str) -> None:
    _parse_and_evaluate(text)


_TOKENS = [
    "x", "y", "z", "i", "a.b", "q", "pi", "e", "True", "None", "0", "1", "2.5", "-1", "9",
    "1e308", "0x7fffffffffffffff", "+", "-", "*", "/", "//", "%", "**", "&", "|", "^",
    "~", "<", "<=", "==", "!=", ">", "and", "or", "not", "if", "else", "(", ")", "[", "]",
    ",", ":", ".", "lambda", "__import__", "__class__", "'os'", "for", "in", "is", "@",
    *sorted(FUNCTIONS), "[:, 0]", "[:, -1]", "[:, :2]", "[x > 1]", "[y]", "open", "exec",
]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(tokens=st.lists(st.sampled_from(_TOKENS), max_size=14))
def test_random_token_soup_raises_only_columnhub_errors(tokens: list[str]) -> None:
    _parse_and_evaluate(" ".join(tokens))
    _parse_and_evaluate("".join(tokens))


def test_dangerous_texts_are_rejected_before_anything_runs() -> None:
    texts = [
        "__import__('os').system('true')",
        "().__class__.__bases__[0].__subclasses__()",
        "open('/etc/passwd')",
        "exec('1')",
        "eval('1')",
        "x.__class__",
        "(lambda: 1)()",
        "[c for c in ().__class__.__mro__]",
        "globals()",
    ]
    with no_code_execution() as calls:
        for text in texts:
            with pytest.raises(ExpressionError):
                parse(text)
    assert calls == []


# --------------------------------------------------------------------------- random trees

_UNARY = {"neg": (np.negative, "-({})"), "abs": (np.abs, "abs({})"), "sin": (np.sin, "sin({})")}
_BINARY = {
    "+": np.add,
    "-": np.subtract,
    "*": np.multiply,
    "/": np.true_divide,
    "**": np.power,
    "minimum": np.minimum,
    "maximum": np.maximum,
    "arctan2": np.arctan2,
}

_leaf = st.one_of(
    st.sampled_from(["u", "v", "w"]),
    st.floats(min_value=-100, max_value=100, allow_nan=False, width=32).map(lambda f: float(f)),
)


def _tree() -> st.SearchStrategy[Any]:
    return st.recursive(
        _leaf,
        lambda kids: st.one_of(
            st.tuples(st.sampled_from(sorted(_UNARY)), kids),
            st.tuples(st.sampled_from(sorted(_BINARY)), kids, kids),
        ),
        max_leaves=12,
    )


def _render(tree: Any) -> str:
    if isinstance(tree, str):
        return tree
    if isinstance(tree, float):
        return repr(tree)
    if len(tree) == 2:
        return _UNARY[tree[0]][1].format(_render(tree[1]))
    op, left, right = tree
    if op in {"minimum", "maximum", "arctan2"}:
        return f"{op}({_render(left)}, {_render(right)})"
    return f"({_render(left)}) {op} ({_render(right)})"


def _reference(tree: Any, cols: dict[str, np.ndarray]) -> Any:
    if isinstance(tree, str):
        return cols[tree]
    if isinstance(tree, float):
        return np.float64(tree)
    if len(tree) == 2:
        return _UNARY[tree[0]][0](_reference(tree[1], cols))
    op, left, right = tree
    return _BINARY[op](_reference(left, cols), _reference(right, cols))


@settings(max_examples=200, deadline=None)
@given(tree=_tree(), seed=st.integers(0, 2**32 - 1))
def test_random_arithmetic_trees_agree_with_numpy(tree: Any, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cols = {k: rng.uniform(-5, 5, 17) for k in ("u", "v", "w")}
    text = _render(tree)
    with np.errstate(all="ignore"):
        want = np.broadcast_to(_reference(tree, cols), (17,))
    got = ak.to_numpy(parse(text).evaluate(cols))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=0, equal_nan=True)


@settings(max_examples=100, deadline=None)
@given(tree=_tree(), seed=st.integers(0, 2**32 - 1))
def test_random_trees_broadcast_over_jagged_like_awkward(tree: Any, seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 4, 9)
    jag = ak.unflatten(rng.uniform(-5, 5, int(counts.sum())), counts)
    cols = {"u": jag, "v": rng.uniform(-5, 5, 9), "w": jag * 2}
    with np.errstate(all="ignore"):
        want = _reference(tree, cols)  # type: ignore[arg-type]
    got = parse(_render(tree)).evaluate(cols)
    if not isinstance(want, ak.Array):
        want = np.broadcast_to(want, (9,)).tolist()
    assert_same(got, want, rtol=1e-9)


# --------------------------------------------------------------------------- docs


def test_documentation_examples_run() -> None:
    failures, attempted = doctest.testfile(
        str(REPO / "docs" / "expressions.md"),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
    )
    assert attempted > 30
    assert failures == 0


def test_module_doctests() -> None:
    failures, attempted = doctest.testmod(expressions)
    assert attempted > 0
    assert failures == 0
