"""Missing values in expressions follow SQL's three-valued (Kleene) logic.

A left-joined friend column is ``None`` where the friend has no partner, and
``x[:, 0]``, ``first(x)``, ``min(x)`` give ``None`` for empty lists. Every
result here is checked against a brute-force reference written in this file:
Python ``None``/``True``/``False`` per element, combined by the truth tables
of SQL (TRUE OR NULL = TRUE, FALSE AND NULL = FALSE, NOT NULL = NULL), and, end
to end, against a selection made by hand on a direct uproot read.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pyarrow as pa
import pytest
import uproot
from hypothesis import given, settings
from hypothesis import strategies as st

import columnhub
from columnhub.expressions import parse
from columnhub.spec import Request

Tri = bool | None  # a three-valued truth value
Tree = Any  # str (a name or a literal) | tuple (operator, *operands)

# --------------------------------------------------------------------------- reference


def k_and(a: Tri, b: Tri) -> Tri:
    if a is False or b is False:
        return False
    if a is None or b is None:
        return None
    return True


def k_or(a: Tri, b: Tri) -> Tri:
    if a is True or b is True:
        return True
    if a is None or b is None:
        return None
    return False


def k_not(a: Tri) -> Tri:
    return None if a is None else not a


def k_xor(a: Tri, b: Tri) -> Tri:
    return None if a is None or b is None else a != b


def k_any(items: list[Tri]) -> Tri:
    result: Tri = False
    for item in items:
        result = k_or(result, item)
    return result


def k_all(items: list[Tri]) -> Tri:
    result: Tri = True
    for item in items:
        result = k_and(result, item)
    return result


BINARY: dict[str, Callable[[Tri, Tri], Tri]] = {
    "&": k_and,
    "and": k_and,
    "|": k_or,
    "or": k_or,
    "^": k_xor,
}


def reference(tree: Tree, env: dict[str, Tri]) -> Tri:
    """The value of ``tree`` for one element, by the truth tables."""
    if isinstance(tree, str):
        return {"True": True, "False": False}.get(tree, env.get(tree))
    op, *args = tree
    if op in ("~", "not"):
        return k_not(reference(args[0], env))
    return BINARY[op](reference(args[0], env), reference(args[1], env))


def render(tree: Tree) -> str:
    if isinstance(tree, str):
        return tree
    op, *args = tree
    if op == "~":
        return f"~({render(args[0])})"
    if op == "not":
        return f"(not ({render(args[0])}))"
    return f"({render(args[0])}) {op} ({render(args[1])})"


def names_in(tree: Tree) -> set[str]:
    if isinstance(tree, str):
        return set() if tree in ("True", "False") else {tree}
    return set().union(*(names_in(a) for a in tree[1:]))


def trees(names: list[str]) -> st.SearchStrategy[Tree]:
    """Random nested ``& | ^ and or ~ not`` trees over ``names`` and the literals."""
    leaves = st.sampled_from([*names, *names, "True", "False"])
    return st.recursive(
        leaves,
        lambda kids: st.one_of(
            st.tuples(st.sampled_from(["~", "not"]), kids),
            st.tuples(st.sampled_from(["&", "|", "^", "and", "or"]), kids, kids),
        ),
        max_leaves=10,
    )


# --------------------------------------------------------------------------- operands

LAYOUTS = ("bytemasked", "indexed", "arrow", "plain")


@st.composite
def nullable_bools(draw: st.DrawFn, n: int) -> tuple[list[Tri], ak.Array]:
    """``n`` optional booleans, and an awkward array of them in a random option layout.

    Under a missing value the stored boolean is random, so code that reads it
    instead of honouring the mask is caught.
    """
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "plain":
        values = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        return list(values), ak.Array(np.array(values, dtype=np.bool_))
    items: list[Tri] = draw(st.lists(st.none() | st.booleans(), min_size=n, max_size=n))
    hidden = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    stored = np.array([h if v is None else v for v, h in zip(items, hidden, strict=True)])
    valid = np.array([v is not None for v in items], dtype=np.bool_)
    if layout == "bytemasked":
        array = ak.mask(ak.Array(stored.astype(np.bool_)), valid)
    elif layout == "indexed":
        index = np.where(valid, np.arange(n), -1).astype(np.int64)
        content = ak.contents.NumpyArray(stored.astype(np.bool_))
        array = ak.Array(ak.contents.IndexedOptionArray(ak.index.Index64(index), content))
    else:
        array = ak.from_arrow(pa.array(items, type=pa.bool_()), highlevel=True)
    return items, array


def optional_ints(values: list[int | None]) -> ak.Array:
    """``?int64`` (typed even when every value is missing)."""
    stored = np.array([0 if v is None else v for v in values], dtype=np.int64)
    return ak.mask(ak.Array(stored), np.array([v is not None for v in values], dtype=np.bool_))


def jagged_of(flat: ak.Array, counts: list[int]) -> ak.Array:
    return ak.unflatten(flat, np.array(counts, dtype=np.int64))


# --------------------------------------------------------------------------- per event


@settings(deadline=None)
@given(data=st.data())
def test_nullable_boolean_logic_matches_three_valued_reference(data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 25), label="events")
    names = ["a", "b", "c"]
    items, columns = {}, {}
    for name in names:
        items[name], columns[name] = data.draw(nullable_bools(n), label=name)
    tree = data.draw(trees(names), label="tree")
    text = render(tree)
    got = parse(text).evaluate(columns).tolist()
    want = [reference(tree, {k: v[i] for k, v in items.items()}) for i in range(n)]
    assert got == want, text


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("a | b", [True, True, True, True, False, None, True, None, None]),
        ("a & b", [True, False, None, False, False, False, None, False, None]),
        ("a or b", [True, True, True, True, False, None, True, None, None]),
        ("a and b", [True, False, None, False, False, False, None, False, None]),
        ("a ^ b", [False, True, None, True, False, None, None, None, None]),
        ("~a", [False, False, False, True, True, True, None, None, None]),
        ("not b", [False, True, None, False, True, None, False, True, None]),
    ],
)
def test_truth_tables(text: str, want: list[Tri]) -> None:
    """All nine pairs (a, b) of (True, False, None) in turn, as SQL's truth tables give them."""
    values: list[Tri] = [True, False, None]
    a = ak.Array([x for x in values for _ in values])
    b = ak.Array([y for _ in values for y in values])
    assert parse(text).evaluate({"a": a, "b": b}).tolist() == want


@settings(deadline=None)
@given(data=st.data())
def test_chained_comparison_is_a_kleene_and(data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 25), label="events")
    ints = st.lists(st.none() | st.integers(-3, 3), min_size=n, max_size=n)
    a, b, c = (data.draw(ints, label=k) for k in "abc")
    columns = {k: optional_ints(v) for k, v in zip("abc", (a, b, c), strict=True)}
    text = data.draw(st.sampled_from(["a < b < c", "a <= b != c", "a == b == c", "c > a >= b"]))
    ops = {
        "<": int.__lt__,
        "<=": int.__le__,
        "==": int.__eq__,
        "!=": int.__ne__,
        ">": int.__gt__,
        ">=": int.__ge__,
    }
    parts = text.split()
    got = parse(text).evaluate(columns).tolist()
    want = []
    for i in range(n):
        row = {"a": a[i], "b": b[i], "c": c[i]}
        result: Tri = True
        for j in range(1, len(parts), 2):
            left, right = row[parts[j - 1]], row[parts[j + 1]]
            cmp: Tri = None if left is None or right is None else ops[parts[j]](left, right)
            result = k_and(result, cmp)
        want.append(result)
    assert got == want, text


def test_where_with_a_missing_condition_is_missing() -> None:
    cond = ak.Array([True, None, False, None])
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 20.0, 30.0, 40.0])
    got = parse("where(c, a, b)").evaluate({"c": cond, "a": a, "b": b}).tolist()
    assert got == [
        x if k else y if k is not None else None
        for k, x, y in zip(cond.tolist(), a.tolist(), b.tolist(), strict=True)
    ]
    assert parse("a if c else b").evaluate({"c": cond, "a": a, "b": b}).tolist() == got


@settings(deadline=None)
@given(
    n=st.lists(st.none() | st.integers(-(2**40), 2**40), max_size=20),
    m=st.lists(st.integers(-(2**40), 2**40), max_size=20),
)
def test_integer_bitwise_operators_keep_ordinary_semantics(
    n: list[int | None], m: list[int]
) -> None:
    k = min(len(n), len(m))
    n, m = n[:k], m[:k]
    columns = {"n": optional_ints(n), "m": ak.Array(np.array(m, dtype=np.int64))}
    for text, fn in [
        ("n & m", int.__and__),
        ("n | m", int.__or__),
        ("n ^ m", int.__xor__),
        ("(n | 5) & m", lambda x, y: (x | 5) & y),
        ("~n", lambda x, _: ~x),
    ]:
        got = parse(text).evaluate(columns).tolist()
        want = [None if x is None else fn(x, y) for x, y in zip(n, m, strict=True)]
        assert got == want, text


def test_issue_examples_keep_the_events_sql_keeps() -> None:
    """The two selections of the issue: unmatched events are kept when the rest is TRUE."""
    matched = ak.Array([True, True, False, False])
    met = ak.Array([40.0, 20.0, None, None])
    njet = np.array([1, 9, 9, 1])
    columns = {"matched": matched, "MET_pt": met, "nJet": njet}
    assert parse("(~matched) | (MET_pt > 30)").evaluate(columns).tolist() == [
        True,
        False,
        True,
        True,
    ]
    assert parse("(MET_pt > 30) | (nJet > 8)").evaluate(columns).tolist() == [
        True,
        True,
        True,
        None,
    ]
    assert parse("(MET_pt > 30) & (nJet > 8)").evaluate(columns).tolist() == [
        False,
        False,
        None,
        False,
    ]


# --------------------------------------------------------------------------- per object


@st.composite
def jagged_case(draw: st.DrawFn) -> dict[str, Any]:
    """Jagged operands ``j0, j1`` (same counts), a flat one ``f``, some lists missing."""
    counts = draw(st.lists(st.integers(0, 4), max_size=12))
    n, total = len(counts), sum(counts)
    items, columns = {}, {}
    for name in ("j0", "j1"):
        flat_items, flat = draw(nullable_bools(total))
        lists: list[list[Tri] | None] = []
        start = 0
        for c in counts:
            lists.append(flat_items[start : start + c])
            start += c
        array = jagged_of(flat, counts)
        if draw(st.booleans()):  # some whole lists missing (?var * ?bool)
            present = draw(st.lists(st.booleans(), min_size=n, max_size=n))
            array = ak.mask(array, np.array(present, dtype=np.bool_))
            lists = [v if p else None for v, p in zip(lists, present, strict=True)]
        items[name], columns[name] = lists, array
    items["f"], columns["f"] = draw(nullable_bools(n))
    columns["x"] = jagged_of(ak.Array(np.arange(total, dtype=np.int64)), counts)
    items["x"] = [list(range(sum(counts[:i]), sum(counts[: i + 1]))) for i in range(n)]
    return {"counts": counts, "items": items, "columns": columns}


def reference_lists(tree: Tree, case: dict[str, Any]) -> list[list[Tri] | None]:
    """Per event: None if a jagged operand's list is missing, else the per-item values."""
    items, out = case["items"], []
    used = names_in(tree) & {"j0", "j1"}
    for i, count in enumerate(case["counts"]):
        if any(items[name][i] is None for name in used):
            out.append(None)
            continue
        out.append(
            [
                reference(
                    tree,
                    {
                        "j0": items["j0"][i][k] if items["j0"][i] is not None else None,
                        "j1": items["j1"][i][k] if items["j1"][i] is not None else None,
                        "f": items["f"][i],
                    },
                )
                for k in range(count)
            ]
        )
    return out


@settings(deadline=None)
@given(case=jagged_case(), data=st.data())
def test_jagged_masks_with_missing_items_follow_kleene(
    case: dict[str, Any], data: st.DataObject
) -> None:
    tree = data.draw(trees(["j0", "j1", "f"]), label="tree")
    if not names_in(tree) & {"j0", "j1"}:
        tree = ("&", tree, "j0")  # make it per object
    text = render(tree)
    want = reference_lists(tree, case)
    columns = case["columns"]
    assert parse(text).evaluate(columns).tolist() == want, text

    # any()/all() over each list: TRUE if any TRUE, else NULL if any NULL, else FALSE
    assert parse(f"any({text})").evaluate(columns).tolist() == [
        None if v is None else k_any(v) for v in want
    ], text
    assert parse(f"all({text})").evaluate(columns).tolist() == [
        None if v is None else k_all(v) for v in want
    ], text

    # x[mask], as SQL's WHERE: an object whose mask item is missing is dropped
    xs = case["items"]["x"]
    assert parse(f"x[{text}]").evaluate(columns).tolist() == [
        None if v is None else [x for x, keep in zip(xs[i], v, strict=True) if keep is True]
        for i, v in enumerate(want)
    ], text


def test_any_all_of_numbers_with_missing_items() -> None:
    """``any``/``all`` of numbers test ``!= 0``, with missing items as in Kleene logic."""
    lists = [[0.0, None], [1.0, None], [None], [], [0.0, 2.0], [np.nan, None]]
    x = ak.Array(lists)

    def tri(v: float | None) -> Tri:
        return None if v is None else bool(v != 0)

    assert parse("any(x)").evaluate({"x": x}).tolist() == [
        k_any([tri(v) for v in r]) for r in lists
    ]
    assert parse("all(x)").evaluate({"x": x}).tolist() == [
        k_all([tri(v) for v in r]) for r in lists
    ]


def test_empty_list_first_and_an_or_keep_the_event() -> None:
    """``x[:, 0]`` is missing for an empty list; OR-ing a TRUE keeps the event."""
    pt = ak.Array([[50.0, 10.0], [], [20.0]])
    got = parse("(Jet_pt[:, 0] > 30) | (num(Jet_pt) == 0)").evaluate({"Jet_pt": pt}).tolist()
    assert got == [True, True, False]
    # and the other way round, the missing leading jet makes an AND missing
    got = parse("(Jet_pt[:, 0] > 30) & (num(Jet_pt) == 0)").evaluate({"Jet_pt": pt}).tolist()
    assert got == [False, None, False]


# --------------------------------------------------------------------------- end to end

KEYS = ("run", "luminosityBlock", "event")


def _write(path: Path, tree: dict[str, Any]) -> None:
    with uproot.recreate(path) as f:
        f["Events"] = tree


@pytest.fixture(scope="module")
def left_join_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A primary ROOT file and a shuffled Parquet friend that lacks about a third of its events."""
    d = tmp_path_factory.mktemp("kleene")
    rng = np.random.default_rng(9)
    n = 300
    counts = rng.integers(0, 5, n)
    primary = {
        "run": np.full(n, 1, dtype=np.uint32),
        "luminosityBlock": (np.arange(n) // 100 + 1).astype(np.uint32),
        "event": (np.arange(n) * 7 + 3).astype(np.uint64),
        "MET_pt": rng.uniform(0, 60, n),
        "Jet_pt": ak.unflatten(rng.uniform(10, 80, int(counts.sum())), counts),
    }
    _write(d / "primary.root", primary)
    has = rng.random(n) < 0.65
    order = rng.permutation(np.flatnonzero(has))
    friend = pa.table(
        {
            "run": pa.array(primary["run"][order]),
            "luminosityBlock": pa.array(primary["luminosityBlock"][order]),
            "event": pa.array(primary["event"][order]),
            "fMET": pa.array(rng.uniform(0, 60, len(order))),
            "fPass": pa.array(rng.random(len(order)) < 0.5),
            "fTau": pa.array(
                [list(rng.uniform(0, 80, k)) for k in rng.integers(0, 4, len(order))],
                type=pa.list_(pa.float64()),
            ),
        }
    )
    import pyarrow.parquet as pq

    pq.write_table(friend, d / "friend.parquet", row_group_size=50)
    return {"dir": d, "primary": d / "primary.root", "friend": d / "friend.parquet"}


def _direct(inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """Primary rows, each with its friend's value (None without a partner), read directly."""
    import pyarrow.parquet as pq

    with uproot.open(inputs["primary"]) as f:
        rows = f["Events"].arrays([*KEYS, "MET_pt", "Jet_pt"], library="ak").tolist()
    friend = pq.read_table(inputs["friend"]).to_pylist()
    by_key = {tuple(r[k] for k in KEYS): r for r in friend}
    for row in rows:
        key = tuple(row[k] for k in KEYS)
        row["matched"] = key in by_key
        partner = by_key.get(key, {})
        row["fMET"], row["fTau"] = partner.get("fMET"), partner.get("fTau")
        row["fPass"] = partner.get("fPass")
    return rows


def _cmp(value: float | None, cut: float) -> Tri:
    return None if value is None else value > cut


SELECTIONS: dict[str, tuple[str, Callable[[dict[str, Any]], Tri]]] = {
    # (where, written with {matched} and {fMET}; the same selection by hand)
    "unmatched_or_high": (
        "(~{matched}) | ({fMET} > 30)",
        lambda r: k_or(not r["matched"], _cmp(r["fMET"], 30)),
    ),
    "friend_or_primary": (
        "({fMET} > 30) | (MET_pt > 40)",
        lambda r: k_or(_cmp(r["fMET"], 30), r["MET_pt"] > 40),
    ),
    "not_friend_and_jets": (
        "not ({fMET} > 20) and any(Jet_pt > 50)",
        lambda r: k_and(k_not(_cmp(r["fMET"], 20)), k_any([p > 50 for p in r["Jet_pt"]])),
    ),
    "friend_flag": ("{fPass}", lambda r: r["fPass"]),  # the where is a ?bool column itself
    "not_friend_flag": ("not {fPass}", lambda r: k_not(r["fPass"])),
    "friend_list_or_primary": (  # a friend's list column is one missing list without partner
        "any({fTau} > 60) | (MET_pt > 40)",
        lambda r: k_or(
            None if r["fTau"] is None else k_any([t > 60 for t in r["fTau"]]), r["MET_pt"] > 40
        ),
    ),
    "leading_jet_or_none": (
        "(Jet_pt[:, 0] > 40) | (num(Jet_pt) == 0)",
        lambda r: k_or(_cmp(r["Jet_pt"][0] if r["Jet_pt"] else None, 40), not r["Jet_pt"]),
    ),
}


@pytest.mark.parametrize("selection", sorted(SELECTIONS))
def test_left_joined_friend_selection_matches_direct_read(
    left_join_inputs: dict[str, Any], tmp_path: Path, selection: str
) -> None:
    template, by_hand = SELECTIONS[selection]
    spec = {
        "dataset": {"name": "primary", "files": [str(left_join_inputs["primary"])]},
        "columns": [*KEYS, "MET_pt"],
        "chunk_size": 64,
        "friends": [
            {
                "name": "jes",
                "dataset": {"name": "jes", "files": [str(left_join_inputs["friend"])]},
                "columns": ["fMET", "fTau", "fPass"],
                "how": "left",
            }
        ],
    }
    fs = Request.from_dict(spec).friends[0]
    names = {n: fs.output_name(n) for n in ("fMET", "fTau", "fPass")}
    names["matched"] = fs.matched_name
    flag = template.format(**names)
    spec["columns"] = [*spec["columns"], names["fMET"], names["matched"]]
    rows = _direct(left_join_inputs)
    cache = tmp_path / "cache"

    # as a define: the three-valued value of every event, None included
    every = columnhub.deliver(
        {**spec, "define": {"flag": flag}, "columns": [*spec["columns"], "flag"]},
        output=tmp_path / "all",
        cache=cache,
    )
    got_all = {tuple(r[k] for k in KEYS): r for r in every.to_arrow().to_pylist()}
    assert len(got_all) == len(rows)
    for r in rows:
        out = got_all[tuple(r[k] for k in KEYS)]
        assert (out["flag"], out[names["fMET"]], out[names["matched"]]) == (
            by_hand(r),
            r["fMET"],
            r["matched"],
        )
    assert {True, False} <= {by_hand(r) for r in rows}

    # as the where: an event is kept exactly when it is TRUE (NULL drops it, as SQL's WHERE)
    result = columnhub.deliver({**spec, "where": flag}, output=tmp_path / "out", cache=cache)
    kept = [r for r in rows if by_hand(r) is True]
    got = result.to_arrow().to_pylist()
    assert collections.Counter(tuple(r[k] for k in KEYS) for r in got) == collections.Counter(
        tuple(r[k] for k in KEYS) for r in kept
    )
    by_key = {tuple(r[k] for k in KEYS): r for r in kept}
    for r in got:
        want = by_key[tuple(r[k] for k in KEYS)]
        assert (r[names["fMET"]], r[names["matched"]], r["MET_pt"]) == (
            want["fMET"],
            want["matched"],
            want["MET_pt"],
        )


@settings(deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.none() | st.integers(0, 5),  # a per-event cut, missing without a partner
            st.lists(st.tuples(st.integers(0, 5), st.booleans()), max_size=4),  # (pt, fwd)
        ),
        max_size=12,
    )
)
def test_a_missing_event_value_meets_each_object_as_a_missing_item(
    events: list[tuple[int | None, list[tuple[int, bool]]]],
) -> None:
    """``Jet_pt > cut`` with ``cut`` missing is one missing item per jet, so an OR recovers."""
    counts = [len(jets) for _, jets in events]
    columns = {
        "cut": optional_ints([cut for cut, _ in events]),
        "pt": jagged_of(
            ak.Array(np.array([p for _, j in events for p, _ in j], dtype=np.int64)), counts
        ),
        "fwd": jagged_of(
            ak.Array(np.array([f for _, j in events for _, f in j], dtype=np.bool_)), counts
        ),
    }
    want = [[k_or(None if cut is None else p > cut, f) for p, f in jets] for cut, jets in events]
    assert parse("(pt > cut) | fwd").evaluate(columns).tolist() == want
    assert parse("pt[(pt > cut) | fwd]").evaluate(columns).tolist() == [
        [p for (p, _), keep in zip(jets, w, strict=True) if keep]
        for (_, jets), w in zip(events, want, strict=True)
    ]
    assert parse("where(pt > cut, 1, 0)").evaluate(columns).tolist() == [
        [None if cut is None else int(p > cut) for p, _ in jets] for cut, jets in events
    ]


@pytest.mark.parametrize("how", ["right", "outer"])
@pytest.mark.parametrize(
    ("template", "by_hand"),
    [
        ("(~{matched}) | big", lambda r: k_or(not r["matched"], _cmp(r["x"], 2))),
        ("big", lambda r: _cmp(r["x"], 2)),
        ("({fx} > 50) | (x > 2)", lambda r: k_or(_cmp(r["fx"], 50), _cmp(r["x"], 2))),
        ("({fx} > 50) & ~big", lambda r: k_and(_cmp(r["fx"], 50), k_not(_cmp(r["x"], 2)))),
    ],
)
def test_friend_rows_without_primary_partner_follow_kleene(
    tmp_path: Path, how: str, template: str, by_hand: Callable[[dict[str, Any]], Tri]
) -> None:
    """Right/outer tail rows have every primary column missing; the where still decides."""

    def keys(events: list[int]) -> dict[str, np.ndarray]:
        m = len(events)
        return {
            "run": np.ones(m, np.uint32),
            "luminosityBlock": np.ones(m, np.uint32),
            "event": np.array(events, np.uint64),
        }

    p_events, f_events = [1, 2, 3, 5], [2, 3, 4, 6, 7, 8]
    x = {1: 1.0, 2: 3.0, 3: 1.0, 5: 4.0}
    fx = {2: 60.0, 3: 10.0, 4: 70.0, 6: 20.0, 7: 55.0, 8: 5.0}
    _write(tmp_path / "p.root", {**keys(p_events), "x": np.array([x[e] for e in p_events])})
    _write(tmp_path / "f.root", {**keys(f_events), "fx": np.array([fx[e] for e in f_events])})
    spec: dict[str, Any] = {
        "dataset": {"name": "p", "files": [str(tmp_path / "p.root")]},
        "columns": ["event", "x"],
        "define": {"big": "x > 2"},
        "friends": [
            {
                "name": "f",
                "dataset": {"name": "f", "files": [str(tmp_path / "f.root")]},
                "columns": ["fx"],
                "how": how,
            }
        ],
    }
    fs = Request.from_dict(spec).friends[0]
    names = {"matched": fs.matched_name, "fx": fs.output_name("fx")}
    spec["where"] = template.format(**names)
    spec["columns"] += [names["fx"], names["matched"]]
    result = columnhub.deliver(spec, output=tmp_path / "out", cache=False)
    got = sorted(r["event"] for r in result.to_arrow().to_pylist())

    rows = [
        {"event": e, "x": x.get(e), "fx": fx.get(e), "matched": e in x and e in fx}
        for e in sorted(set(f_events) | (set(p_events) if how == "outer" else set()))
    ]
    want = [r["event"] for r in rows if by_hand(r) is True]
    assert got == want


@settings(deadline=None)
@given(case=jagged_case(), data=st.data())
def test_where_per_object_with_missing_items_and_lists(
    case: dict[str, Any], data: st.DataObject
) -> None:
    """``where(cond, a, b)``: missing where cond is missing or the chosen value is; a missing
    list stays one missing list (``ak.where`` alone makes it a list of one None)."""
    tree = data.draw(trees(["j0", "j1", "f"]), label="tree")
    if not names_in(tree) & {"j0", "j1"}:
        tree = ("|", tree, "j1")
    text = render(tree)
    conds = reference_lists(tree, case)
    items, columns = case["items"], case["columns"]
    # the chosen values: x (never missing) where True, j0 as 0/1 (maybe missing) where False
    got = parse(f"where({text}, x, where(j0, 1, 0))").evaluate(columns).tolist()
    want: list[list[Any] | None] = []
    for i, cond in enumerate(conds):
        if cond is None or items["j0"][i] is None:
            want.append(None)
            continue
        want.append(
            [
                None if c is None else x if c else (None if j is None else int(j))
                for c, x, j in zip(cond, items["x"][i], items["j0"][i], strict=True)
            ]
        )
    assert got == want, text


def test_new_logic_never_reuses_results_or_columns_of_the_old(
    left_join_inputs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kleene logic changed what a ``where``/``define`` gives for the same text: the provider
    versions are part of every column key and of the whole-result key, so a cache filled by
    the earlier code (here: another provider version) is never served."""
    from columnhub import plan as plan_module

    spec: dict[str, Any] = {
        "dataset": {"name": "primary", "files": [str(left_join_inputs["primary"])]},
        "columns": ["event", "MET_pt", "flag"],
        "define": {"flag": "(MET_pt > 30) | (num(Jet_pt) > 2)"},
        "where": "flag | (MET_pt < 5)",
    }
    cache = tmp_path / "cache"
    monkeypatch.setitem(plan_module.PROVIDER_VERSIONS, "define", 1)
    monkeypatch.setitem(plan_module.PROVIDER_VERSIONS, "where", 1)
    first = columnhub.deliver(spec, output=tmp_path / "old", cache=cache)
    same = columnhub.deliver(spec, output=tmp_path / "same", cache=cache)
    assert same.manifest["cache"].get("reused_result")  # the control: same versions reuse
    monkeypatch.undo()
    newer = columnhub.deliver(spec, output=tmp_path / "new", cache=cache)
    assert not newer.manifest["cache"].get("reused_result")
    assert newer.manifest["cache"]["misses"] >= 2  # the define and the where, recomputed
    assert newer.to_arrow().to_pylist() == first.to_arrow().to_pylist()  # (no NULLs here)
