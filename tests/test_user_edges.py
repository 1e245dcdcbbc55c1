"""Small things a new user hits (issue 9, section 5).

YAML 1.2 booleans, default dataset names, errors that say what went wrong
(refused connections, servers without byte ranges, stalls, uninterpretable
branches, a branch missing from one file), key columns checked at delivery,
missing optional dependencies, paths relative to the spec file, progress
bars, and long chains of definitions. Every check compares with an
independent reference (a direct uproot read, a direct computation) or runs
the real thing (loopback servers, subprocesses, the installed CLI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
from hypothesis import given
from hypothesis import strategies as st

import columnhub
from columnhub.errors import SpecError
from columnhub.spec import Request, default_dataset_name, load_request

SAMPLE = "nano_dy.root"


# ---------------------------------------------------------------------------
# YAML 1.2: on / yes / no / off are strings


def test_documented_friend_spec_with_on_loads(shared_data: Path) -> None:
    sample = shared_data / SAMPLE
    request = Request.from_yaml(
        textwrap.dedent(
            f"""
            dataset:
              name: dy
              files: {sample}
            columns: [MET_pt, jes_MET_pt]
            friends:
              - name: jes
                dataset: {{name: dy-copy, files: {sample}}}
                columns: [MET_pt]
                on: [run, luminosityBlock, event]
                prefix: jes_
            """
        )
    )
    assert request.friends[0].on == ("run", "luminosityBlock", "event")
    result = columnhub.arrays(request)
    with uproot.open(sample) as file:
        expected = file["Events"]["MET_pt"].array(library="np")
    np.testing.assert_array_equal(ak.to_numpy(result["jes_MET_pt"]), expected)


@pytest.mark.parametrize("word", ["on", "off", "yes", "no", "y", "n", "On", "YES", "Off"])
def test_yaml_11_booleans_are_strings(word: str) -> None:
    request = Request.from_yaml(
        f"dataset: {{name: {word}, files: a.root, tree: {word}}}\ncolumns: [{word}]\n"
    )
    assert request.dataset.name == word
    assert request.dataset.tree == word
    assert request.columns == (word,)
    assert Request.from_yaml(request.to_yaml()) == request


def test_yaml_12_booleans_stay_booleans() -> None:
    for text, value in [("true", True), ("false", False), ("True", True), ("FALSE", False)]:
        request = Request.from_yaml(
            f"dataset: {{files: a.root}}\ncolumns: [x]\noutput: {{include_keys: {text}}}\n"
        )
        assert request.output.include_keys is value


# ---------------------------------------------------------------------------
# dataset.name is optional


def _reference_name(files: list[str]) -> str:
    """Brute force: the longest stem prefix shared by all, trimmed; else the folder."""
    stems = [Path(f).name.split(".", 1)[0] for f in files]
    best = ""
    for n in range(1, min(map(len, stems)) + 1):
        if len({s[:n] for s in stems}) == 1:
            best = stems[0][:n]
    best = best.rstrip("_-. ")
    if best:
        return best
    parents = {str(Path(f).parent) for f in files}
    if len(parents) == 1:
        folder = Path(parents.pop()).name
        if folder not in ("", ".", ".."):
            return folder
    return "dataset"


@given(
    folder=st.sampled_from(["", "data/", "/store/mc/ttbar/"]),
    stems=st.lists(
        st.text(alphabet="abcdefxyz_-0123456789", min_size=1, max_size=8),
        min_size=1,
        max_size=5,
    ),
)
def test_default_name_from_files(folder: str, stems: list[str]) -> None:
    files = [f"{folder}{s}.root" for s in stems]
    assert default_dataset_name(files) == _reference_name(files)


def test_dataset_name_defaults_and_explicit_hash_unchanged(shared_data: Path) -> None:
    sample = str(shared_data / SAMPLE)
    unnamed = Request.from_dict(
        {
            "dataset": {"files": [sample]},
            "columns": ["MET_pt", "jes_MET_pt"],
            "friends": [
                {"name": "jes", "dataset": {"files": [sample]}, "columns": ["MET_pt"], "prefix": "jes_"}
            ],
        }
    )
    assert unnamed.dataset.name == "nano_dy"
    assert unnamed.friends[0].dataset.name == "jes"
    named = Request.from_dict({"dataset": {"name": "nano_dy", "files": [sample]}, "columns": ["MET_pt"]})
    assert unnamed.replace(friends=(), columns=["MET_pt"]).hash == named.hash  # an explicit name hashes as before
    # the canonical form of an explicitly named request is exactly what it was
    assert named.canonical()["dataset"] == {
        "name": "nano_dy",
        "files": [sample],
        "tree": "Events",
        "keys": ["run", "luminosityBlock", "event"],
    }
    result = columnhub.arrays(unnamed)
    with uproot.open(sample) as file:
        expected = file["Events"].arrays(["MET_pt"], library="np")
    np.testing.assert_array_equal(ak.to_numpy(result["MET_pt"]), expected["MET_pt"])
    np.testing.assert_array_equal(ak.to_numpy(result["jes_MET_pt"]), expected["MET_pt"])


def test_unnamed_dataset_named_in_messages(tmp_path: Path) -> None:
    with pytest.raises(columnhub.errors.DatasetFileNotFoundError, match="'ttbar_2024'"):
        columnhub.arrays({"dataset": {"files": [str(tmp_path / "ttbar_2024.root")]}, "columns": ["x"]})
