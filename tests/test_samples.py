"""Several samples per request: ``samples:`` and coffea filesets, against references.

Each sample of a multi-sample request must give exactly what the same
single-sample request gives, and what a direct uproot read gives.
"""

from __future__ import annotations

import doctest
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pytest
import uproot
from hypothesis import given
from hypothesis import strategies as st

import columnhub
from columnhub import Request, Samples
from columnhub.errors import DuplicateKeyError, SampleError, SpecError

KEYS = ["run", "luminosityBlock", "event"]
SAMPLES = {"dy": "nano_dy.root", "dimuon": "nano_dimuon.root", "tt": "nano_tt_v12.root"}


def read(path: Path, branches: list[str]) -> dict[str, ak.Array]:
    tree = uproot.open(path)["Events"]
    return {b: tree[b].array() for b in branches}


def with_counters(columns: list[str], branches: set[str]) -> list[str]:
    """The delivered columns as docs/nanoevents.md orders them.

    A column's collection is its name up to the first ``_``; the file's
    counter branch ``n<collection>`` comes just before the collection's first
    column, unless the request lists it.
    """
    out: list[str] = []
    for name in columns:
        head, sep, _ = name.partition("_")
        counter = "n" + head
        if sep and counter in branches and counter not in columns and counter not in out:
            out.append(counter)
        out.append(name)
    return out


def reference(path: Path, *, where_njet: int, columns: list[str]) -> dict[str, list[Any]]:
    """Brute force: ``nJet >= where_njet``, ``ht = sum(Jet_pt[Jet_pt > 30])``."""
    raw = read(path, [*KEYS, "nJet", "Jet_pt", "MET_pt"])
    keep = raw["nJet"] >= where_njet
    values = {**raw, "ht": ak.sum(raw["Jet_pt"][raw["Jet_pt"] > 30], axis=1)}
    delivered = with_counters([*KEYS, *columns], set(uproot.open(path)["Events"].keys()))
    return {c: ak.to_list(values[c][keep]) for c in delivered}


def as_lists(array: ak.Array) -> dict[str, list[Any]]:
    return {f: ak.to_list(array[f]) for f in array.fields}


def approx(got: dict[str, list[Any]], want: dict[str, list[Any]]) -> None:
    """Same columns, same structure, values equal (floats to float32 precision)."""
    assert list(got) == list(want)
    for name, values in want.items():
        a, b = ak.Array(got[name]), ak.Array(values)
        if a.ndim > 1:
            assert ak.to_list(ak.num(a)) == ak.to_list(ak.num(b)), name
            a, b = ak.flatten(a), ak.flatten(b)
        assert np.allclose(ak.to_numpy(a), ak.to_numpy(b), rtol=1e-6), name


SHARED = {
    "columns": ["MET_pt", "Jet_pt", "ht"],
    "define": {"ht": "sum(Jet_pt[Jet_pt > 30])"},
    "where": "nJet >= 2",
    "chunk_size": 16,
}


def multi(shared_data: Path) -> dict[str, Any]:
    return {"samples": {n: [str(shared_data / f)] for n, f in SAMPLES.items()}, **SHARED}


# -- results equal the single-sample deliveries and uproot ---------------------


def test_each_sample_equals_its_single_request_and_uproot(
    shared_data: Path, tmp_path: Path
) -> None:
    results = columnhub.deliver(
        multi(shared_data), output=tmp_path / "out", workers=2, progress=False
    )
    assert list(results) == list(SAMPLES)  # in the order given
    for name, file in SAMPLES.items():
        result = results[name]
        assert result.complete
        assert result.directory == tmp_path / "out" / name
        single = Request.from_dict(
            {"dataset": {"name": name, "files": [str(shared_data / file)]}, **SHARED}
        )
        assert result.manifest["request_hash"] == single.hash  # the single request's identity
        alone = columnhub.deliver(single, output=tmp_path / "single" / name, cache=False)
        got = as_lists(result.to_awkward())
        assert got == as_lists(alone.to_awkward())
        approx(got, reference(shared_data / file, where_njet=2, columns=SHARED["columns"]))


def test_arrays_per_sample(shared_data: Path) -> None:
    arrays = columnhub.arrays(Samples.from_dict(multi(shared_data)), workers=2)
    assert list(arrays) == list(SAMPLES)
    for name, file in SAMPLES.items():
        approx(
            as_lists(arrays[name]),
            reference(shared_data / file, where_njet=2, columns=SHARED["columns"]),
        )


def test_arrays_of_a_failing_sample_name_it_and_keep_the_others(
    shared_data: Path, tmp_path: Path
) -> None:
    spec = {
        "columns": ["MET_pt"],
        "samples": {
            "gone": str(tmp_path / "missing.root"),
            "dy": str(shared_data / "nano_dy.root"),
        },
    }
    with pytest.raises(SampleError, match="sample 'gone'") as info:
        columnhub.arrays(spec)
    assert list(info.value.errors) == ["gone"]
    want = read(shared_data / "nano_dy.root", ["MET_pt"])["MET_pt"]
    assert ak.to_list(info.value.results["dy"].MET_pt) == ak.to_list(want)


def test_chunk_size_argument_applies_to_every_sample(shared_data: Path, tmp_path: Path) -> None:
    results = columnhub.deliver(
        multi(shared_data), output=tmp_path / "out", chunk_size=7, progress=False
    )
    for name, file in SAMPLES.items():
        single = Request.from_dict(
            {
                "dataset": {"name": name, "files": [str(shared_data / file)]},
                **SHARED,
                "chunk_size": 7,
            }
        )
        assert results[name].manifest["request_hash"] == single.hash
        assert {
            c["entry_stop"] - c["entry_start"] for c in results[name].manifest["chunks"]
        } <= set(range(1, 8))


def test_per_sample_overrides(shared_data: Path, tmp_path: Path) -> None:
    spec = {
        **SHARED,
        "samples": {
            "dy": str(shared_data / "nano_dy.root"),
            "tt": {
                "dataset": {"files": [str(shared_data / "nano_tt_v12.root")]},
                "where": "nJet >= 6",  # replaces the shared where
                "define": {"lead": "first(Jet_pt)"},  # added to the shared define
                "columns": ["MET_pt", "ht", "lead"],  # replaces the shared columns
                "output": {"include_keys": False},  # merged over the shared output
            },
        },
        "output": {"compression": "lz4"},
    }
    requests = Samples.from_dict(spec).requests()
    assert requests["dy"].where == "nJet >= 2"
    assert requests["tt"].define == {"ht": "sum(Jet_pt[Jet_pt > 30])", "lead": "first(Jet_pt)"}
    assert requests["tt"].output.compression == "lz4"
    results = columnhub.deliver(spec, output=tmp_path / "out", progress=False)
    approx(
        as_lists(results["dy"].to_awkward()),
        reference(shared_data / "nano_dy.root", where_njet=2, columns=SHARED["columns"]),
    )
    raw = read(shared_data / "nano_tt_v12.root", ["nJet", "Jet_pt", "MET_pt"])
    keep = raw["nJet"] >= 6
    got = results["tt"].to_awkward()
    assert got.fields == ["MET_pt", "ht", "lead"]
    assert ak.to_list(got.MET_pt) == ak.to_list(raw["MET_pt"][keep])
    assert ak.to_list(got.lead) == ak.to_list(raw["Jet_pt"][keep][:, 0])
    assert ak.to_list(got.ht) == pytest.approx(
        ak.to_list(ak.sum(raw["Jet_pt"][keep][raw["Jet_pt"][keep] > 30], axis=1)), rel=1e-6
    )


def test_shared_output_directory_gives_one_folder_per_sample(
    shared_data: Path, tmp_path: Path
) -> None:
    spec = {**multi(shared_data), "output": {"directory": str(tmp_path / "here")}}
    results = columnhub.deliver(spec, progress=False)
    assert {n: r.directory for n, r in results.items()} == {
        n: tmp_path / "here" / n for n in SAMPLES
    }
    for name in SAMPLES:
        assert columnhub.Result.open(tmp_path / "here" / name).complete


def test_output_given_as_an_object_is_merged_too(shared_data: Path, tmp_path: Path) -> None:
    spec = {
        **multi(shared_data),
        "output": columnhub.OutputSpec(directory=str(tmp_path / "here")),
    }
    spec["samples"]["tt"] = {
        "dataset": spec["samples"]["tt"],
        "output": columnhub.OutputSpec(compression="lz4"),
    }
    requests = Samples.from_dict(spec).requests()
    assert {n: r.output.directory for n, r in requests.items()} == {
        n: str(tmp_path / "here" / n) for n in SAMPLES
    }
    assert requests["tt"].output.compression == "lz4"
    assert requests["dy"].output.compression == "zstd"


def test_default_output_directory_per_sample(shared_data: Path) -> None:
    results = columnhub.deliver(multi(shared_data), progress=False)
    for name, result in results.items():
        request = Samples.from_dict(multi(shared_data)).requests()[name]
        assert result.directory == columnhub.delivery.default_output_directory(request)


# -- coffea filesets -------------------------------------------------------------


def fileset_forms(shared_data: Path) -> dict[str, Any]:
    dy, tt = str(shared_data / "nano_dy.root"), str(shared_data / "nano_tt_v12.root")
    return {
        "list": {"dy": [dy], "tt": [tt]},
        "files as {path: treename}": {
            "dy": {"files": {dy: "Events"}, "metadata": {"xs": 6077.22, "is_data": False}},
            "tt": {"files": {tt: "Events"}},
        },
        "files as list, with treename": {
            "dy": {"files": [dy], "treename": "Events", "metadata": {}},
            "tt": {"files": [tt]},
        },
        "preprocessed": {
            "dy": {
                "files": {
                    dy: {
                        "object_path": "Events",
                        "steps": [[0, 14], [14, 40]],
                        "num_entries": 40,
                        "uuid": "x",
                    }
                },
                "metadata": {},
                "form": None,
            },
            "tt": {"files": {tt: {"object_path": "Events", "steps": None}}},
        },
    }


@pytest.mark.parametrize("form", list(fileset_forms(Path())))
@pytest.mark.parametrize("where", ["dataset", "samples"])
def test_coffea_fileset_forms(shared_data: Path, form: str, where: str) -> None:
    fileset = fileset_forms(shared_data)[form]
    spec = {where: fileset, **SHARED}
    built = columnhub.load_request(spec)
    assert isinstance(built, Samples)
    want = {
        name: Request.from_dict(
            {"dataset": {"name": name, "files": [str(shared_data / SAMPLES[name])]}, **SHARED}
        )
        for name in ("dy", "tt")
    }
    assert built.requests() == want


def test_coffea_fileset_delivers_like_uproot(shared_data: Path, tmp_path: Path) -> None:
    fileset = fileset_forms(shared_data)["files as {path: treename}"]
    results = columnhub.deliver(
        {"dataset": fileset, **SHARED}, output=tmp_path / "out", progress=False
    )
    for name in ("dy", "tt"):
        approx(
            as_lists(results[name].to_awkward()),
            reference(shared_data / SAMPLES[name], where_njet=2, columns=SHARED["columns"]),
        )


def test_coffea_preprocessed_fileset_object(shared_data: Path) -> None:
    """A fileset as coffea's own preprocess returns it (a pydantic DataGroupSpec)."""
    from coffea.dataset_tools import preprocess
    from coffea.dataset_tools.filespec import DataGroupSpec

    files = {str(shared_data / f): "Events" for f in ("nano_dy.root",)}
    fileset = DataGroupSpec({"dy": {"files": files, "metadata": {"xs": 1.0}}})
    runnable, _ = preprocess(fileset, step_size=15, skip_bad_files=False, scheduler="sync")
    arrays = columnhub.arrays({"dataset": runnable, **SHARED})
    approx(
        as_lists(arrays["dy"]),
        reference(shared_data / "nano_dy.root", where_njet=2, columns=SHARED["columns"]),
    )


@pytest.mark.parametrize(
    ("samples", "fragment"),
    [
        ({"dy": {"files": {"a.root": "Events", "b.root": "Other"}}}, "several trees"),
        ({"dy": {"files": {"a.root": "Events"}, "treename": "T"}}, "several trees"),
        (
            {
                "dy": {
                    "files": {
                        "a.root": {"object_path": "Events", "steps": [[0, 10]], "num_entries": 40}
                    }
                }
            },
            "do not cover the whole file",
        ),
        (
            {
                "dy": {
                    "files": {
                        "a.root": {
                            "object_path": "Events",
                            "steps": [[0, 10], [20, 40]],
                            "num_entries": 40,
                        }
                    }
                }
            },
            "do not cover the whole file",
        ),
        ({"dy": {"files": {"a.root": 3}}}, "maps each file to its tree name"),
        ({"dy": 3}, "is no dataset"),
        ({"dy": {"files": ["a.root"], "where": "nJet > 2"}}, "put its dataset under 'dataset'"),
        ({}, "no sample given"),
    ],
)
def test_fileset_mistakes_are_named(samples: Any, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        columnhub.load_request({"samples": samples, "columns": ["MET_pt"]})


# -- sample names ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a/b", "/DYJets/Run2/NANOAODSIM", "-rf", ".hidden", "a b", "x" * 129]
)
def test_unsafe_sample_names_are_refused(name: str) -> None:
    with pytest.raises(SpecError, match="not a safe directory name"):
        Samples.from_dict({"samples": {name: ["a.root"]}, "columns": ["MET_pt"]})


def test_names_differing_only_in_case_are_refused() -> None:
    with pytest.raises(SpecError, match="differ only in case"):
        Samples.from_dict({"samples": {"DY": ["a.root"], "dy": ["b.root"]}, "columns": ["x"]})


NAME = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=12
)


SAFE_LOOKING = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,12}", fullmatch=True)


@given(names=st.lists(st.one_of(NAME, SAFE_LOOKING), min_size=1, max_size=5, unique=True))
def test_accepted_names_are_one_folder_below_the_output(names: list[str]) -> None:
    """Whatever the names, an accepted set puts each sample in its own child folder."""
    spec = {"samples": {n: [f"{i}.root"] for i, n in enumerate(names)}, "columns": ["MET_pt"]}
    try:
        built = Samples.from_dict(spec)
    except SpecError:
        return
    assert list(built.requests()) == names  # the order given
    base = Path("/output")
    folders = [base / n for n in names]
    for name, folder in zip(names, folders, strict=True):
        assert folder.parent == base
        assert folder.name == name
        assert not name.startswith(".")
        assert os.path.normpath(folder) == str(folder)
    assert len({str(f).casefold() for f in folders}) == len(folders)


def test_docstring_examples() -> None:
    import columnhub.spec

    failures, attempted = doctest.testmod(columnhub.spec)
    assert attempted > 0
    assert failures == 0


def test_list_of_named_samples_and_round_trip(shared_data: Path, tmp_path: Path) -> None:
    dy = str(shared_data / "nano_dy.root")
    as_list = Samples.from_dict(
        {
            "samples": [
                {"name": "dy", "files": [dy]},
                {"name": "dy2", "dataset": [dy], "where": "nJet > 3"},
            ],
            "columns": ["MET_pt"],
        }
    )
    assert list(as_list.requests()) == ["dy", "dy2"]
    assert as_list.requests()["dy2"].where == "nJet > 3"
    assert Samples.from_dict(as_list.to_dict()) == as_list
    assert Samples.from_yaml(as_list.to_yaml()) == as_list
    (tmp_path / "s.json").write_text(json.dumps(as_list.to_dict()))
    (tmp_path / "s.yaml").write_text(as_list.to_yaml())
    assert columnhub.load_request(tmp_path / "s.json") == as_list
    assert columnhub.load_request(tmp_path / "s.yaml") == as_list
    with pytest.raises(SpecError, match="given twice"):
        Samples.from_dict(
            {
                "samples": [{"name": "a", "files": dy}, {"name": "a", "files": dy}],
                "columns": ["MET_pt"],
            }
        )


def test_spec_mistakes_name_the_sample() -> None:
    with pytest.raises(SpecError, match=r"(?s)sample 'tt': .*where"):
        Samples.from_dict(
            {
                "samples": {"dy": ["a.root"], "tt": {"dataset": ["b.root"], "where": "nJet >"}},
                "columns": ["MET_pt"],
            }
        )
    with pytest.raises(SpecError, match="colums: unknown field"):
        Samples.from_dict({"samples": {"dy": ["a.root"]}, "colums": ["MET_pt"]})
    with pytest.raises(SpecError, match="samples: required field is missing"):
        Samples.from_dict({"dataset": {"files": ["a.root"]}, "columns": ["x"]})
    with pytest.raises(SpecError, match="not both"):
        Samples.from_dict(
            {"samples": {"dy": ["a.root"]}, "dataset": {"files": "a"}, "columns": ["x"]}
        )


def test_two_samples_never_share_a_directory(shared_data: Path, tmp_path: Path) -> None:
    spec = {
        "samples": {
            "dy": {
                "dataset": [str(shared_data / "nano_dy.root")],
                "output": {"directory": str(tmp_path / "same")},
            },
            "tt": {
                "dataset": [str(shared_data / "nano_tt_v12.root")],
                "output": {"directory": str(tmp_path / "same")},
            },
        },
        "columns": ["MET_pt"],
    }
    with pytest.raises(SpecError, match="would both write to"):
        columnhub.deliver(spec, progress=False)
    assert not (tmp_path / "same").exists()


# -- the cache, per sample -------------------------------------------------------


def test_cache_and_result_reuse_per_sample(shared_data: Path, tmp_path: Path) -> None:
    mine = tmp_path / "dy.root"
    shutil.copyfile(shared_data / "nano_dy.root", mine)
    spec = {**SHARED, "samples": {"dy": str(mine), "tt": str(shared_data / "nano_tt_v12.root")}}
    first = columnhub.deliver(spec, output=tmp_path / "out", progress=False)
    assert all(r.manifest["cache"]["hits"] == 0 for r in first.values())
    second = columnhub.deliver(spec, output=tmp_path / "out", progress=False)
    for result in second.values():  # a whole-result hit for every sample
        assert result.manifest["cache"]["misses"] == 0
        assert result.manifest["cache"].get("reused_result")
    # a new file for one sample: only that sample is computed again, from the new file
    shutil.copyfile(shared_data / "nano_dimuon.root", mine)
    third = columnhub.deliver(spec, output=tmp_path / "out", progress=False)
    assert third["tt"].manifest["cache"].get("reused_result")
    assert third["tt"].manifest["cache"]["misses"] == 0
    assert not third["dy"].manifest["cache"].get("reused_result")
    assert third["dy"].manifest["cache"]["misses"] > 0
    approx(
        as_lists(third["dy"].to_awkward()),
        reference(shared_data / "nano_dimuon.root", where_njet=2, columns=SHARED["columns"]),
    )


# -- a failing sample ------------------------------------------------------------


def test_a_sample_failing_while_delivering_leaves_the_others_delivered(
    shared_data: Path, tmp_path: Path
) -> None:
    dy = str(shared_data / "nano_dy.root")
    shutil.copyfile(dy, tmp_path / "copy.root")
    duplicated = {  # the same events twice: validate=one_to_one fails once the data is read
        "name": "f",
        "prefix": "f_",  # friend columns keep their names: MET_pt is the primary's
        "columns": ["MET_pt"],
        "dataset": {"name": "twice", "files": [dy, str(tmp_path / "copy.root")]},
    }
    spec = {
        "columns": ["MET_pt"],
        "samples": {
            "tt": str(shared_data / "nano_tt_v12.root"),
            "dy": {"dataset": dy, "friends": [duplicated], "columns": ["MET_pt", "f_MET_pt"]},
            "dimuon": str(shared_data / "nano_dimuon.root"),
        },
    }
    with pytest.raises(SampleError) as info:
        columnhub.deliver(spec, output=tmp_path / "out", progress=False)
    err = info.value
    assert "sample 'dy'" in str(err)
    assert "delivered: tt, dimuon" in str(err)
    assert list(err.errors) == ["dy"]
    assert isinstance(err.errors["dy"], DuplicateKeyError)
    assert isinstance(err.__cause__, DuplicateKeyError)
    assert list(err.results) == ["tt", "dimuon"]
    for name in ("tt", "dimuon"):
        result = columnhub.Result.open(tmp_path / "out" / name)
        assert result.complete
        want = read(shared_data / SAMPLES[name], ["MET_pt"])["MET_pt"]
        assert ak.to_list(result.to_awkward().MET_pt) == ak.to_list(want)
    failed = columnhub.Result.open(tmp_path / "out" / "dy")
    assert not failed.complete  # never a result marked complete that is not


def test_planning_mistakes_stop_every_sample_before_anything_is_written(
    shared_data: Path, tmp_path: Path
) -> None:
    spec = {
        "columns": ["MET_pt"],
        "samples": {
            "tt": str(shared_data / "nano_tt_v12.root"),
            "dy": {"dataset": str(shared_data / "nano_dy.root"), "columns": ["MET_ptt"]},
            "gone": str(tmp_path / "missing.root"),
        },
    }
    with pytest.raises(SampleError, match="2 of 3 sample") as info:
        columnhub.deliver(spec, output=tmp_path / "out", progress=False)
    assert list(info.value.errors) == ["dy", "gone"]
    assert "MET_pt" in str(info.value.errors["dy"])  # the closest name
    assert not (tmp_path / "out").exists()


# -- CLI ---------------------------------------------------------------------------


def columnhub_cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "columnhub"
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_cli_writes_one_directory_per_sample(shared_data: Path, tmp_path: Path) -> None:
    spec = tmp_path / "samples.yaml"
    spec.write_text(
        "samples:\n"
        f"  dy: [{shared_data / 'nano_dy.root'}]\n"
        "  tt:\n"
        f"    files: {{{shared_data / 'nano_tt_v12.root'}: Events}}\n"
        "columns: [MET_pt]\n"
        "where: MET_pt > 30\n"
    )
    done = columnhub_cli("deliver", str(spec), "-o", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dy", "tt"]
    for name in ("dy", "tt"):
        met = read(shared_data / SAMPLES[name], ["MET_pt"])["MET_pt"]
        want = ak.to_list(met[met > 30])
        result = columnhub.Result.open(tmp_path / "out" / name)
        assert ak.to_list(result.to_awkward().MET_pt) == want
        assert f"sample {name}:\n  delivered {len(want):,} of {len(met):,} events" in done.stdout


@pytest.mark.parametrize(
    ("samples", "fragment"),
    [
        ("  ../up: [a.root]\n", "'../up' is not a safe directory name"),
        ("  dy: {files: {a.root: Events, b.root: Other}}\n", "several trees"),
    ],
)
def test_cli_sample_mistakes_exit_2(tmp_path: Path, samples: str, fragment: str) -> None:
    spec = tmp_path / "samples.yaml"
    spec.write_text(f"samples:\n{samples}columns: [MET_pt]\n")
    done = columnhub_cli("deliver", str(spec), "-o", str(tmp_path / "out"))
    assert done.returncode == 2
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_cli_missing_file_of_one_sample_exits_2(shared_data: Path, tmp_path: Path) -> None:
    spec = tmp_path / "samples.yaml"
    spec.write_text(
        "samples:\n"
        f"  tt: [{shared_data / 'nano_tt_v12.root'}]\n"
        f"  gone: [{tmp_path / 'missing.root'}]\n"
        "columns: [MET_pt]\n"
    )
    done = columnhub_cli("deliver", str(spec), "-o", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "sample 'gone'" in done.stderr
    assert "missing.root" in done.stderr
    assert "Traceback" not in done.stderr
