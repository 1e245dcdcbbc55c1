"""The ROOT writer: a TTree that keeps every column's name, type and order, or a clear refusal.

References are independent of the writer: a direct uproot read of the input
(with the selection applied by awkward), a brute-force dict lookup for a
friend's values, the same request delivered as Parquet, and, for the writer
alone, the Arrow tables it was given.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import uproot
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import columnhub
from columnhub.errors import OutputError, SpecError
from columnhub.output.root import RootPartWriter

KEYS = ["run", "luminosityBlock", "event"]
N = 150

# input branch -> (numpy dtype or kind, awkward type as uproot reads it back)
FLAT = {
    "i8": np.int8, "u8": np.uint8, "i16": np.int16, "u16": np.uint16,
    "i32": np.int32, "u32": np.uint32, "i64": np.int64, "u64": np.uint64,
    "f32": np.float32, "f64": np.float64,
}  # fmt: skip


def typed_events(n: int, seed: int) -> dict[str, Any]:
    """NanoAOD-like events with one column of every type a TTree holds."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {
        "run": np.full(n, 1, np.uint32),
        "luminosityBlock": (np.arange(n) // 50 + 1).astype(np.uint32),
        "event": (np.arange(n) * 7 + 3).astype(np.uint64),
    }
    for name, dtype in FLAT.items():
        if np.dtype(dtype).kind == "f":
            out[name] = rng.normal(0, 1, n).astype(dtype)
        else:
            info = np.iinfo(dtype)
            out[name] = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
    out["flag"] = rng.random(n) > 0.5
    out["label"] = ak.Array([f"ev-{i}-" + "x" * int(rng.integers(0, 300)) for i in range(n)])
    out["pos"] = rng.normal(0, 1, (n, 3)).astype(np.float32)
    out["mat"] = rng.integers(-9, 9, (n, 2, 2)).astype(np.int16)
    jets = rng.integers(0, 6, n)
    out["Jet_pt"] = ak.unflatten(rng.exponential(1, jets.sum()).astype(np.float32), jets)
    out["Jet_id"] = ak.unflatten(rng.integers(0, 7, jets.sum()).astype(np.uint8), jets)
    out["Jet_ok"] = ak.unflatten(rng.random(jets.sum()) > 0.3, jets)
    muons = rng.integers(0, 3, n)
    out["Muon_pt"] = ak.unflatten(rng.exponential(1, muons.sum()).astype(np.float64), muons)
    return out


def write_root(path: Path, data: dict[str, Any]) -> Path:
    with uproot.recreate(path) as f:
        f.mktree("Events", data, counter_name=lambda c: "n" + c.split("_")[0])
    return path


@pytest.fixture(scope="module")
def typed_input(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A typed primary file, and a friend (other order) with a flat and a jagged column."""
    base = tmp_path_factory.mktemp("typed")
    data = typed_events(N, seed=3)
    primary = write_root(base / "typed.root", data)
    order = np.random.default_rng(5).permutation(N)
    rng = np.random.default_rng(6)
    friend = {k: np.asarray(data[k])[order] for k in KEYS}
    friend["syst"] = rng.normal(0, 1, N)[order]
    counts = rng.integers(0, 4, N)
    friend["Jet_w"] = ak.unflatten(rng.random(counts.sum()).astype(np.float32), counts)[order]
    return {"primary": primary, "friend": write_root(base / "friend.root", friend)}


def counter_names(tree: Any) -> set[str]:
    return {b.count_branch.name for b in tree.values() if b.count_branch is not None}


def data_branches(tree: Any) -> list[str]:
    """The tree's branches in order, without the counters uproot reads from the lists."""
    counters, branches = counter_names(tree), tree.keys()
    return [k for k in branches if k not in counters]


def with_counters(columns: list[str], counters: set[str]) -> list[str]:
    """The delivered columns as docs/nanoevents.md orders them.

    A column's collection is its name up to the first ``_``; a collection with
    a counter (``counters``: the file's ``n<collection>`` branches, and those
    computed for a prefixed friend's lists) delivers it just before its first
    column, unless the request lists it.
    """
    out: list[str] = []
    for name in columns:
        head, sep, _ = name.partition("_")
        counter = "n" + head
        if sep and counter in counters and counter not in columns and counter not in out:
            out.append(counter)
        out.append(name)
    return out


def bare(t: Any) -> str:
    """An awkward type without option marks (Parquet marks every field nullable)."""
    return str(t).replace("?", "").replace("option[", "").replace("]", "")


def test_every_column_type_round_trips(typed_input: dict[str, Path], tmp_path: Path) -> None:
    raw = [*FLAT, "flag", "label", "pos", "mat", "nJet", "Jet_pt", "Jet_id", "Jet_ok", "Muon_pt"]
    # a define of other lengths than Jet's is named outside Jet (Jet_hard is refused, #9.2)
    defines = {"Jet_pt2": "Jet_pt * 2", "hard_pt": "Jet_pt[Jet_pt > 1]", "ht": "sum(Jet_pt)"}
    columns = [*raw[:5], "sys_syst", *raw[5:], *defines, "sys_Jet_w"]
    request = {
        "dataset": {"name": "typed", "files": [str(typed_input["primary"])]},
        "columns": columns,
        "define": defines,
        "where": "f64 > -0.5",
        "friends": [
            {
                "name": "sys",
                "prefix": "sys_",
                "dataset": {"name": "sysfriend", "files": [str(typed_input["friend"])]},
                "columns": ["syst", "Jet_w"],
            }
        ],
        "chunk_size": 16,
        "output": {"format": "root", "target_part_bytes": 6_000},
    }
    result = columnhub.deliver(request, output=tmp_path / "root", cache=False, progress=False)
    as_parquet = {**request, "output": {"format": "parquet"}}
    parquet = columnhub.deliver(as_parquet, output=tmp_path / "pq", cache=False, progress=False)

    # the reference: uproot reads the input, awkward selects and computes, a dict joins
    tree = uproot.open(typed_input["primary"])["Events"]
    ref = tree.arrays([*KEYS, *raw, "nMuon"])
    ref = ref[ref["f64"] > -0.5]
    ref_defines = {
        "Jet_pt2": ref["Jet_pt"] * 2,
        "hard_pt": ref["Jet_pt"][ref["Jet_pt"] > 1],
        "ht": ak.sum(ref["Jet_pt"], axis=1),
    }
    friend = uproot.open(typed_input["friend"])["Events"].arrays()
    by_key = {
        tuple(int(friend[k][i]) for k in KEYS): (friend["syst"][i], friend["Jet_w"][i])
        for i in range(len(friend))
    }
    keys = [tuple(int(ref[k][i]) for k in KEYS) for i in range(len(ref))]
    ref_friend = {
        "sys_syst": [float(by_key[k][0]) for k in keys],
        "sys_Jet_w": [ak.to_list(by_key[k][1]) for k in keys],
    }

    # the plan delivers the file's nMuon; the writer adds counter branches, not
    # columns, for the define-only hard_pt and for the prefixed friend's sys_Jet_w
    # (sys_syst and sys_Jet_w come from two of its collections: no computed nsys)
    delivered = with_counters([*KEYS, *columns], counter_names(tree))
    assert delivered.index("nMuon") + 1 == delivered.index("Muon_pt")
    assert result.manifest["format"] == "root"
    assert list(result.manifest["columns"]) == delivered
    assert result.events == len(ref) > 0
    assert len(result.files) > 2
    parts = [uproot.open(f)["Events"] for f in result.files]
    for part in parts:
        assert part.classname == "TTree"  # not an RNTuple
        # every column under its name, in order; a counter just before the first list it counts
        added = {"hard_pt": "nhard", "sys_Jet_w": "nsys"}
        want = [x for c in delivered for x in ([added[c], c] if c in added else [c])]
        assert part.keys() == want
        assert counter_names(part) == {"nJet", "nMuon", "nhard", "nsys"}
        for counter in ("nJet", "nMuon", "nhard", "nsys"):
            assert part[counter].typename == "int32_t", counter
        for name in ("Jet_pt", "Jet_id", "Jet_ok", "Jet_pt2"):  # one collection, one counter
            assert part[name].count_branch.name == "nJet", name
        assert part["hard_pt"].count_branch.name == "nhard"  # its own collection
        assert part["Muon_pt"].count_branch.name == "nMuon"  # the delivered nMuon counts it
        assert part["sys_Jet_w"].count_branch.name == "nsys"
    assert sum(p.num_entries for p in parts) == len(ref)

    got = ak.concatenate([p.arrays(delivered) for p in parts])
    got_pq = parquet.to_awkward()
    assert got_pq.fields == delivered
    for name in [*KEYS, *raw, "nMuon"]:
        assert ak.to_list(got[name]) == ak.to_list(ref[name]), name
        assert str(got[name].type.content) == str(ref[name].type.content), name
    for name, want in ref_defines.items():
        assert ak.to_list(got[name]) == ak.to_list(want), name
    for name, want in ref_friend.items():
        assert ak.to_list(got[name]) == want, name
    for name in delivered:  # the same values and types as the Parquet delivery
        assert ak.to_list(got[name]) == ak.to_list(got_pq[name]), name
        if name not in ("nJet", "nMuon"):  # counters: int32 in a TTree (NanoAOD's)
            assert str(got[name].type.content) == bare(got_pq[name].type.content), name
    assert ak.to_list(got["nJet"]) == ak.to_list(ak.num(ref["Jet_pt"]))
    assert all(result.manifest["columns"][c] == "int32" for c in ("nJet", "nMuon"))

    # the package's own reader: the delivered columns, in order, without the writer's counters
    back = result.to_awkward()
    assert back.fields == delivered
    assert ak.to_list(back) == ak.to_list(got)


def test_empty_selection_keeps_the_branches(typed_input: dict[str, Path], tmp_path: Path) -> None:
    columns = ["label", "pos", "Jet_pt", "Jet_ok"]
    request = {
        "dataset": {"name": "typed", "files": [str(typed_input["primary"])]},
        "columns": columns,
        "where": "f64 > 1000",
        "output": {"format": "root"},
    }
    result = columnhub.deliver(request, output=tmp_path / "out", cache=False, progress=False)
    [part] = [uproot.open(f)["Events"] for f in result.files]
    assert part.num_entries == 0
    assert data_branches(part) == [*KEYS, *columns]
    ref = uproot.open(typed_input["primary"])["Events"].arrays(columns)
    for name in columns:
        assert str(part[name].array().type.content) == str(ref[name].type.content), name
    primary = uproot.open(typed_input["primary"])["Events"]
    delivered = with_counters([*KEYS, *columns], counter_names(primary))
    assert "nJet" in delivered  # the plan delivers Jet's counter; the tree holds it as one
    assert part["Jet_ok"].count_branch.name == "nJet"
    assert result.to_awkward().fields == delivered


# -- the writer alone: random column sets and part sizes ----------------------------

# column -> (Arrow values for n rows, awkward type uproot reads back)
POOL = {
    "i8": (lambda r, n, c: pa.array(r.integers(-128, 127, n, dtype=np.int8)), "int8"),
    "u16": (lambda r, n, c: pa.array(r.integers(0, 65535, n, dtype=np.uint16)), "uint16"),
    "i32": (lambda r, n, c: pa.array(r.integers(-(2**31), 2**31 - 1, n, dtype=np.int32)), "int32"),
    "u64": (lambda r, n, c: pa.array(r.integers(0, 2**64 - 1, n, dtype=np.uint64)), "uint64"),
    "f32": (lambda r, n, c: pa.array(r.normal(0, 1, n).astype(np.float32)), "float32"),
    "f64": (lambda r, n, c: pa.array(r.normal(0, 1, n)), "float64"),
    "flag": (lambda r, n, c: pa.array(r.random(n) > 0.5), "bool"),
    "text": (lambda r, n, c: pa.array([f"t{i}" * (i % 4) for i in r.integers(0, 99, n)],
                                      pa.string()), "string"),
    "vec": (
        lambda r, n, c: pa.FixedSizeListArray.from_arrays(
            pa.array(r.normal(0, 1, 3 * n).astype(np.float32)), 3
        ),
        "3 * float32",
    ),
    "Jet_pt": (lambda r, n, c: jagged(c, r.exponential(1, c.sum()).astype(np.float32)),
               "var * float32"),
    "Jet_id": (lambda r, n, c: jagged(c, r.integers(0, 9, c.sum(), dtype=np.int16)),
               "var * int16"),
    "Jet_ok": (lambda r, n, c: jagged(c, r.random(c.sum()) > 0.5), "var * bool"),
    "Jet_sel": (lambda r, n, c: jagged(c + 1, r.normal(0, 1, (c + 1).sum())),
                "var * float64"),  # other lengths than the Jet collection's
    "el.pt": (lambda r, n, c: jagged(c % 2, r.random((c % 2).sum())), "var * float64"),
}  # fmt: skip


def jagged(counts: np.ndarray, values: np.ndarray) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def pool_tables(names: list[str], sizes: list[int], seed: int) -> list[pa.Table]:
    rng = np.random.default_rng(seed)
    tables = []
    for n in sizes:
        counts = rng.integers(0, 5, n)
        tables.append(pa.table({name: POOL[name][0](rng, n, counts) for name in names}))
    return tables


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    names=st.lists(st.sampled_from(sorted(POOL)), min_size=1, max_size=len(POOL), unique=True),
    sizes=st.lists(st.integers(0, 60), max_size=6),
    target=st.integers(1, 30_000),
    seed=st.integers(0, 2**16),
)
@example(names=["Jet_pt", "Jet_sel"], sizes=[0, 3], target=1, seed=0)  # an empty chunk first
@example(names=["text", "vec"], sizes=[0, 0], target=1, seed=0)  # nothing but empty chunks
def test_parts_read_back_as_the_tables(
    tmp_path_factory: pytest.TempPathFactory,
    names: list[str],
    sizes: list[int],
    target: int,
    seed: int,
) -> None:
    directory = tmp_path_factory.mktemp("parts")
    tables = pool_tables(names, sizes, seed)
    writer = RootPartWriter(directory, target_bytes=target)
    for table in tables:
        writer.write(table)
    parts = writer.close()
    if not tables:
        assert parts == []
        return
    assert [p.name for p in parts] == [f"part-{i:05d}.root" for i in range(len(parts))]
    assert sorted(f.name for f in directory.iterdir()) == [p.name for p in parts]
    assert all(p.bytes >= target for p in parts[:-1])
    trees = [uproot.open(directory / p.name)["Events"] for p in parts]
    assert [t.num_entries for t in trees] == [p.rows for p in parts]
    for tree in trees:
        assert tree.classname == "TTree"
        assert data_branches(tree) == names
    want = pa.concat_tables(tables)
    got = ak.concatenate([t.arrays(names) for t in trees])
    for name in names:
        assert got[name].tolist() == want.column(name).to_pylist(), name
        assert str(got[name].type.content) == POOL[name][1], name
    # the Jet columns share nJet; Jet_sel (other lengths) shares it only when no row says so
    jets = [n for n in names if n.startswith("Jet_")]
    family = {n: n == "Jet_sel" for n in jets}
    lead = family[jets[0]] if jets else None
    want_counter = {n: "nJet" if want.num_rows == 0 or family[n] == lead else "n" + n for n in jets}
    if "el.pt" in names:
        want_counter["el.pt"] = "nel.pt"
    for tree in trees:
        assert {n: tree[n].count_branch.name for n in want_counter} == want_counter


# -- what a TTree cannot hold: one clear refusal ------------------------------------


def write_parquet(path: Path, columns: dict[str, pa.Array], n: int) -> Path:
    keys = {
        "run": pa.array(np.ones(n, np.uint32)),
        "luminosityBlock": pa.array(np.ones(n, np.uint32)),
        "event": pa.array(np.arange(n, dtype=np.uint64)),
    }
    pq.write_table(pa.table({**keys, **columns}), path)
    return path


def odd_columns(n: int) -> dict[str, pa.Array]:
    """Columns Parquet holds and a TTree cannot, plus columns near the edge of what it can."""
    lists = [[float(i), float(i + 1)][: i % 3] for i in range(n)]
    counts = np.array([len(x) for x in lists])
    bad_counter = counts.copy()
    bad_counter[30] += 1  # agrees with the lists in the first chunks only
    other = [[1.0] * (len(x) + (i == 25)) for i, x in enumerate(lists)]
    return {
        "dj": pa.array([[[1.0], []], []] * (n // 2)),
        "rec": pa.array([{"a": i, "b": float(i)} for i in range(n)]),
        "half": pa.array(np.ones(n, np.float16)),
        "holes": pa.array([[1.0, None] if i == 40 else [1.0] for i in range(n)]),
        "maybe": pa.array([None if i == 7 else 1.5 for i in range(n)]),
        "texts": pa.array([["a", "b"]] * n),
        "Jet_pt": pa.array(lists, pa.list_(pa.float32())),
        "Jet_late": pa.array(other),  # the Jet lengths until row 25
        "nJet": pa.array(counts.astype(np.uint32)),
        "nJet_late": pa.array(bad_counter.astype(np.int64)),  # unused name: any integers
        "Tau_pt": pa.array(lists),
        "nTau": pa.array(bad_counter.astype(np.int32)),  # Tau's counter until row 30
        "Muon_pt": pa.array(lists),
        "nMuon": pa.array(np.arange(n) + 50),  # never Muon's lengths: kept as it is
        "a.b": pa.array(np.arange(n, dtype=np.float32)),
        "a_b": pa.array(-np.arange(n, dtype=np.float32)),
    }


@pytest.fixture(scope="module")
def odd_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_parquet(tmp_path_factory.mktemp("odd") / "odd.parquet", odd_columns(60), 60)


def deliver_root(source: Path, columns: list[str], out: Path, **extra: Any) -> Any:
    request = {
        "dataset": {"name": "odd", "files": [str(source)]},
        "columns": columns,
        "chunk_size": 10,
        "output": {"format": "root"},
        **extra,
    }
    return columnhub.deliver(request, output=out, cache=False, progress=False)


REFUSED = {
    "dj": "lists of lists",
    "rec": "records",
    "half": "float16",
    "holes": "missing items",
    "maybe": "1 rows are missing",
    "texts": "lists of strings",
}


def test_one_refusal_names_every_column_a_tree_cannot_hold(odd_input: Path, tmp_path: Path) -> None:
    with pytest.raises(OutputError) as info:
        deliver_root(odd_input, ["Jet_pt", *REFUSED], tmp_path / "out")
    message = str(info.value)
    first = {k: v for k, v in REFUSED.items() if k != "holes"}  # its hole is in a later chunk
    assert f"cannot hold {len(first)} delivered columns" in message
    for name, reason in first.items():
        [line] = [x for x in message.splitlines() if x.startswith(f"  - {name!r}")]
        assert reason in line, line
    assert "'Jet_pt'" not in message
    assert "output.format: parquet" in message
    manifest = columnhub.Result.open(tmp_path / "out").manifest
    assert manifest["complete"] is False
    assert not [f for f in (tmp_path / "out").iterdir() if f.name != "manifest.json"]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_each_refusal_alone(odd_input: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(OutputError, match=REFUSED[name]) as info:
        deliver_root(odd_input, [name], tmp_path / "out")
    assert repr(name) in str(info.value)


def test_a_column_missing_items_later_is_refused_when_reached(
    odd_input: Path, tmp_path: Path
) -> None:
    with pytest.raises(OutputError, match=r"'holes'.*missing items"):  # row 40: the fifth chunk
        deliver_root(odd_input, ["holes"], tmp_path / "out")
    assert columnhub.Result.open(tmp_path / "out").manifest["complete"] is False


def test_dotted_names_are_kept_apart_from_underscored_ones(odd_input: Path, tmp_path: Path) -> None:
    result = deliver_root(odd_input, ["a.b", "a_b"], tmp_path / "out")
    ref = pq.read_table(odd_input, columns=["a.b", "a_b"])
    [tree] = [uproot.open(f)["Events"] for f in result.files]
    assert data_branches(tree) == [*KEYS, "a.b", "a_b"]
    for name in ("a.b", "a_b"):
        assert tree[name].array().tolist() == ref.column(name).to_pylist()
        assert result.manifest["columns"][name] == "float32"


def test_a_counter_column_that_agrees_is_the_counter(odd_input: Path, tmp_path: Path) -> None:
    result = deliver_root(odd_input, ["nJet", "Jet_pt"], tmp_path / "out")
    ref = pq.read_table(odd_input, columns=["nJet", "Jet_pt"])
    [tree] = [uproot.open(f)["Events"] for f in result.files]
    assert data_branches(tree) == [*KEYS, "Jet_pt"]
    assert tree["Jet_pt"].count_branch.name == "nJet"
    assert tree["nJet"].array().tolist() == ref.column("nJet").to_pylist()
    assert tree["Jet_pt"].array().tolist() == ref.column("Jet_pt").to_pylist()
    assert result.manifest["columns"]["nJet"] == "int32"  # what the file holds, NanoAOD's type
    assert result.to_awkward().fields == [*KEYS, "nJet", "Jet_pt"]


@pytest.mark.parametrize("fmt", ["root", "parquet"])
@pytest.mark.parametrize(
    "columns", [["Muon_pt", "nMuon"], ["nTau", "Tau_pt"], ["Jet_pt", "Jet_late"]]
)
def test_a_counter_column_that_disagrees_is_refused_in_every_format(
    odd_input: Path, tmp_path: Path, columns: list[str], fmt: str
) -> None:
    # the file has nMuon, nTau, nJet: the plan delivers them as their collections' counters
    # and checks every list against them (docs/nanoevents.md) before any writer sees a row;
    # the reference: the first row where a list's length differs from its counter
    lists = [c for c in columns if "_" in c]
    ref = pq.read_table(odd_input).to_pydict()
    bad = [
        (i, c)
        for c in lists
        for i, items in enumerate(ref[c])
        if len(items) != ref["n" + c.split("_")[0]][i]
    ]
    row, column = min(bad)
    counter = "n" + column.split("_")[0]
    pattern = (
        rf"'{column}'.*event={row} it holds {len(ref[column][row])} value\(s\) where "
        rf"{counter} is {ref[counter][row]}"
    )
    with pytest.raises(SpecError, match=pattern) as info:
        deliver_root(odd_input, columns, tmp_path / "out", output={"format": fmt})
    assert f"define: {{{column.replace('_', '', 1)}: {column}}}" in str(info.value)
    assert columnhub.Result.open(tmp_path / "out").manifest["complete"] is False


def test_the_writer_never_overwrites_a_counter_column_that_disagrees(tmp_path: Path) -> None:
    # the writer alone (names the plan has no collection for reach it so): a column named
    # like a counter that differs from the lists on the first rows stays a branch of its own
    columns = odd_columns(60)
    table = pa.table({k: columns[k] for k in ("Muon_pt", "nMuon")})
    writer = RootPartWriter(tmp_path, target_bytes=1 << 20)
    for start in range(0, 60, 10):
        writer.write(table.slice(start, 10))
    [part] = writer.close()
    tree = uproot.open(tmp_path / part.name)["Events"]
    assert data_branches(tree) == ["Muon_pt", "nMuon"]
    assert tree["nMuon"].array().tolist() == table.column("nMuon").to_pylist()
    assert tree["nMuon"].typename == "int64_t"
    assert tree["Muon_pt"].count_branch.name == "nMuon_pt"
    assert tree["Muon_pt"].array().tolist() == table.column("Muon_pt").to_pylist()


@pytest.mark.parametrize(
    ("columns", "pattern"),
    [
        (["nTau", "Tau_pt"], (r"column 'nTau' .*counter.*'Tau_pt'.*row 30 it is 1 while "
                              r"'Tau_pt' holds 0 items; it would be overwritten")),
        (["Jet_pt", "Jet_late"], (r"'Jet_pt' and 'Jet_late' share the counter branch 'nJet'.*"
                                  r"row 25 they hold 1 and 2 items.*'Jet_'")),
    ],
)  # fmt: skip
def test_the_writer_refuses_lengths_that_disagree_later(
    tmp_path: Path, columns: list[str], pattern: str
) -> None:
    table = pa.table({k: v for k, v in odd_columns(60).items() if k in columns})
    writer = RootPartWriter(tmp_path, target_bytes=1 << 20)
    with pytest.raises(OutputError, match=pattern):
        for start in range(0, 60, 10):
            writer.write(table.slice(start, 10))
    writer.abort()
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def counterless_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Lists sharing a name prefix and no counter column: not NanoAOD, delivered as they are."""
    columns = odd_columns(60)
    path = tmp_path_factory.mktemp("counterless") / "ntuple.parquet"
    return write_parquet(path, {k: columns[k] for k in ("Jet_pt", "Jet_late")}, 60)


def test_lists_of_a_file_without_counters_that_disagree_later_keep_their_own_counters(
    counterless_input: Path, tmp_path: Path
) -> None:
    # the plan computes nJet from Jet_pt and lets Jet_late be (docs/nanoevents.md);
    # the ROOT parts take their counters from the plan, so Jet_late gets nJet_late
    # and row 25 (1 and 2 items) is written as it is, in every part alike
    result = deliver_root(counterless_input, ["Jet_pt", "Jet_late"], tmp_path / "out")
    ref = pq.read_table(counterless_input).to_pydict()
    late, pt = [], []
    for path in result.files:
        tree = uproot.open(path)["Events"]
        assert tree["Jet_pt"].count_branch.name == "nJet"
        assert tree["Jet_late"].count_branch.name == "nJet_late"
        late.extend(ak.to_list(tree["Jet_late"].array()))
        pt.extend(ak.to_list(tree["Jet_pt"].array()))
    assert late == ref["Jet_late"]
    assert pt == ref["Jet_pt"]
    # as Parquet, the same file delivers (the computed nJet counts Jet_pt)
    result = deliver_root(
        counterless_input, ["Jet_pt", "Jet_late"], tmp_path / "pq", output={"format": "parquet"}
    )
    got = result.to_awkward()
    assert got.fields == [*KEYS, "nJet", "Jet_pt", "Jet_late"]
    assert ak.to_list(got["nJet"]) == [len(x) for x in ref["Jet_pt"]]
    assert ak.to_list(got["Jet_late"]) == ref["Jet_late"]


@pytest.mark.parametrize("name", ["a/b", "x[2]", ""])
def test_names_root_cannot_hold_are_refused(tmp_path: Path, name: str) -> None:
    writer = RootPartWriter(tmp_path, target_bytes=1 << 20)
    with pytest.raises(OutputError, match="ROOT branch names cannot"):
        writer.write(pa.table({name: pa.array([1.0]), "ok": pa.array([2.0])}))
    writer.abort()
    assert not list(tmp_path.iterdir())


# -- the CLI: exit 2, one message, no traceback --------------------------------------


@pytest.mark.parametrize(
    ("columns", "needle", "fix"),
    [
        (["Jet_pt", "dj", "rec"], "'dj'", "output.format: parquet"),
        (["holes"], "'holes'", "output.format: parquet"),
        # the plan refuses a list that disagrees with its collection's counter (every format)
        (["nTau", "Tau_pt"], "'Tau_pt'", "define: {Taupt: Tau_pt}"),
        (["Jet_pt", "Jet_late"], "'Jet_late'", "define: {Jetlate: Jet_late}"),
    ],
)
def test_cli_refuses_with_exit_2(
    odd_input: Path, tmp_path: Path, columns: list[str], needle: str, fix: str
) -> None:
    spec = tmp_path / "req.yaml"
    spec.write_text(
        f"dataset: {{name: odd, files: ['{odd_input}']}}\n"
        f"columns: [{', '.join(repr(c) for c in columns)}]\n"
        "chunk_size: 10\n"
        "output: {format: root}\n"
    )
    exe = Path(sys.executable).parent / "columnhub"
    env = {**os.environ, "PYTHONPATH": str(Path(columnhub.__file__).parents[1])}
    done = subprocess.run(
        [str(exe), "deliver", str(spec), "-o", str(tmp_path / "out"), "--no-cache"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr
    assert fix in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_coffea_reads_the_tree_as_nanoaod(shared_data: Path, tmp_path: Path) -> None:
    nanoevents = pytest.importorskip("coffea.nanoevents")
    columns = ["Jet_pt", "Jet_eta", "Jet_phi", "Jet_mass", "MET_pt", "MET_phi"]
    muons = ["Muon_pt", "Muon_eta", "Muon_phi", "Muon_mass", "Muon_charge"]
    request = {
        "dataset": {"name": "tt", "files": [str(shared_data / "nano_tt_v12.root")]},
        "columns": columns + muons,  # no nJet, nMuon asked for: the writer adds the counters
        "where": "MET_pt > 30",
        "output": {"format": "root"},
    }
    result = columnhub.deliver(request, output=tmp_path / "out", cache=False, progress=False)

    class Schema(nanoevents.NanoAODSchema):  # type: ignore[misc]
        warn_missing_crossrefs = False  # a few columns, not a whole NanoAOD

    events = nanoevents.NanoEventsFactory.from_root(
        {str(result.files[0]): "Events"}, schemaclass=Schema, mode="eager"
    ).events()
    ref = uproot.open(shared_data / "nano_tt_v12.root")["Events"].arrays(columns + muons)
    ref = ref[ref["MET_pt"] > 30]
    assert ak.to_list(events.Jet.pt) == ak.to_list(ref["Jet_pt"])
    assert ak.to_list(events.Muon.charge) == ak.to_list(ref["Muon_charge"])
    pairs = ak.num(ak.combinations(events.Muon, 2)).tolist()
    assert pairs == [n * (n - 1) // 2 for n in ak.num(ref["Muon_pt"]).tolist()]
    assert ak.to_list(events.MET.pt) == ak.to_list(ref["MET_pt"])


def test_a_left_joined_friend_without_partners_is_refused_until_inner(
    typed_input: dict[str, Path], tmp_path: Path
) -> None:
    full = uproot.open(typed_input["friend"])["Events"].arrays()
    half = full[full["event"] % 2 == 0]  # every odd event has no partner
    path = write_root(tmp_path / "half.root", {k: half[k] for k in [*KEYS, "syst", "Jet_w"]})
    friend = {
        "name": "sys",
        "prefix": "sys_",
        "dataset": {"name": "half", "files": [str(path)]},
        "columns": ["syst"],
    }
    request = {
        "dataset": {"name": "typed", "files": [str(typed_input["primary"])]},
        "columns": ["f32", "sys_syst"],
        "friends": [friend],
        "output": {"format": "root"},
    }
    with pytest.raises(OutputError, match=r"'sys_syst': .*rows are missing") as info:
        columnhub.deliver(request, output=tmp_path / "left", cache=False, progress=False)
    assert "'f32'" not in str(info.value)

    inner = {**request, "friends": [{**friend, "how": "inner"}]}
    result = columnhub.deliver(inner, output=tmp_path / "inner", cache=False, progress=False)
    got = result.to_awkward()
    ref = uproot.open(typed_input["primary"])["Events"].arrays([*KEYS, "f32"])
    ref = ref[ref["event"] % 2 == 0]
    by_key = {
        tuple(int(half[k][i]) for k in KEYS): float(half["syst"][i]) for i in range(len(half))
    }
    assert ak.to_list(got["f32"]) == ak.to_list(ref["f32"])
    assert ak.to_list(got["sys_syst"]) == [
        by_key[tuple(int(ref[k][i]) for k in KEYS)] for i in range(len(ref))
    ]
