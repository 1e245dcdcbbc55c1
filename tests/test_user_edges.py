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
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
from hypothesis import given
from hypothesis import strategies as st

import columnhub
from columnhub.errors import SpecError
from columnhub.plan import make_plan
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
            f"dataset: {{name: d, files: a.root}}\ncolumns: [x]\noutput: {{include_keys: {text}}}\n"
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


# ---------------------------------------------------------------------------
# relative paths in a spec file resolve against the spec file's folder

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
    exe = Path(sys.executable).parent / "columnhub"
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )


def test_spec_file_paths_are_relative_to_its_folder(shared_data: Path, tmp_path: Path) -> None:
    specs = tmp_path / "analysis" / "specs"
    data = tmp_path / "analysis" / "data"
    data.mkdir(parents=True)
    specs.mkdir()
    shutil.copyfile(shared_data / SAMPLE, data / "dy_1.root")
    (specs / "req.yaml").write_text(
        textwrap.dedent(
            """
            dataset: {files: [../data/dy_1.root]}
            columns: [MET_pt, sys_Jet_pt]
            friends:
              - name: sys
                dataset: {files: ../data/*.root}
                columns: [Jet_pt]
                match: aligned
                prefix: sys_
            registry: ../models
            output: {directory: ../out}
            """
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    request = load_request(specs / "req.yaml")
    assert request.dataset.files == (str(data / "dy_1.root"),)
    assert request.friends[0].dataset.files == (str(data / "*.root"),)
    assert request.registry == str(tmp_path / "analysis" / "models")
    assert request.output.directory == str(tmp_path / "analysis" / "out")
    assert request.dataset.name == "dy_1"

    done = _cli("deliver", str(specs / "req.yaml"), cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    result = columnhub.Result.open(tmp_path / "analysis" / "out")
    got = result.to_awkward()
    with uproot.open(shared_data / SAMPLE) as file:
        expected = file["Events"].arrays(["MET_pt", "Jet_pt"])
    assert ak.to_list(got.MET_pt) == ak.to_list(expected.MET_pt)
    assert ak.to_list(got.sys_Jet_pt) == ak.to_list(expected.Jet_pt)
    assert not list(elsewhere.iterdir())  # nothing written relative to the cwd


def test_dict_and_request_paths_stay_relative_to_cwd(tmp_path: Path) -> None:
    data = {"dataset": {"name": "d", "files": ["d/a.root"]}, "columns": ["x"], "output": {"directory": "o"}}
    assert load_request(data).dataset.files == ("d/a.root",)
    assert load_request(data).output.directory == "o"
    assert load_request(Request.from_dict(data)).dataset.files == ("d/a.root",)
    (tmp_path / "r.json").write_text(
        '{"dataset": {"name": "d", "files": ["d/a.root", "root://h//x.root", "/abs/b.root"]}, "columns": ["x"],'
        ' "define": {"files": "x + 1"}}'
    )
    from_file = load_request(tmp_path / "r.json")
    assert sorted(from_file.dataset.files) == sorted(
        [str(tmp_path / "d" / "a.root"), "root://h//x.root", "/abs/b.root"]
    )
    assert from_file.define == {"files": "x + 1"}  # expressions are never paths


def test_demo_spec_runs_from_the_repository_root(shared_data: Path, tmp_path: Path) -> None:
    done = _cli("deliver", "examples/demo.yaml", "-o", str(tmp_path / "demo"), cwd=REPO)
    assert done.returncode == 0, done.stderr
    result = columnhub.Result.open(tmp_path / "demo")
    with uproot.open(shared_data / "nano_tt_v12.root") as file:
        ev = file["Events"].arrays(["nJet", "MET_pt"])
    assert result.events == int(ak.sum((ev.nJet >= 4) & (ev.MET_pt > 30)))


# ---------------------------------------------------------------------------
# progress bars: tqdm.auto (widgets in Jupyter)


def test_progress_bars_use_tqdm_auto(shared_data: Path, tmp_path: Path) -> None:
    import tqdm.auto

    from columnhub.delivery import _tqdm

    assert _tqdm(True) is tqdm.auto.tqdm
    assert _tqdm(False) is None
    seen: list[tuple[int, int]] = []
    result = columnhub.deliver(
        {"dataset": {"name": "d", "files": [str(shared_data / SAMPLE)]}, "columns": ["MET_pt"]},
        output=tmp_path / "o",
        progress=lambda done, total: seen.append((done, total)),
        chunk_size=10,
    )
    assert seen and seen[-1] == (result.events, result.events)


# ---------------------------------------------------------------------------
# a long chain of define


def test_chain_of_1000_defines_delivered(shared_data: Path, tmp_path: Path) -> None:
    n = 1000
    define = {"d0": "nJet"}
    for i in range(1, n):
        define[f"d{i}"] = f"d{i - 1} + 1"
    define["j0"] = "Jet_pt"
    for i in range(1, 50):
        define[f"j{i}"] = f"j{i - 1} * 2"
    request = {
        "dataset": {"name": "d", "files": [str(shared_data / "nano_tt_v12.root")]},
        "columns": ["nJet", f"d{n - 1}", "j49"],
        "define": define,
        "where": f"d{n - 1} > {n + 3}",
    }
    result = columnhub.deliver(request, output=tmp_path / "o", chunk_size=100)
    assert result.complete
    with uproot.open(shared_data / "nano_tt_v12.root") as file:
        ev = file["Events"].arrays(["nJet", "Jet_pt"])
    njet = ak.to_numpy(ev.nJet).astype(np.int64)
    keep = njet + (n - 1) > n + 3
    got = result.to_awkward()
    np.testing.assert_array_equal(ak.to_numpy(got[f"d{n - 1}"]), (njet + (n - 1))[keep])
    jets = ev.Jet_pt[keep]
    for _ in range(49):
        jets = jets * 2
    assert ak.to_list(got.j49) == ak.to_list(jets)
    # the second time every column comes from the cache, through the same chain
    again = columnhub.arrays(request, cache=True, chunk_size=100)
    np.testing.assert_array_equal(ak.to_numpy(again[f"d{n - 1}"]), (njet + (n - 1))[keep])


def test_long_cycle_still_named(shared_data: Path) -> None:
    define = {f"d{i}": f"d{i + 1} + 1" for i in range(600)}
    define["d600"] = "d0 * 2"
    with pytest.raises(SpecError, match="circular .*d0 -> d1 -> d2 .* -> d600 -> d0"):
        columnhub.arrays(
            {"dataset": {"name": "d", "files": [str(shared_data / SAMPLE)]}, "columns": ["d0"], "define": define}
        )


# ---------------------------------------------------------------------------
# a missing optional dependency names its extra (no traceback through the CLI)

_BLOCKER = '''
import os
import sys

_BLOCKED = set(os.environ.get("COLUMNHUB_TEST_BLOCK", "").split(","))


class _Unimportable:
    """Makes the named top-level modules (and their submodules) unimportable."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".", 1)[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Unimportable())
'''


def _without(modules: str, tmp_path: Path) -> dict[str, str]:
    """An environment whose Python cannot import ``modules`` (comma separated)."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(_BLOCKER)
    path = [str(shim), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p),
            "COLUMNHUB_TEST_BLOCK": modules}


def test_blocker_really_blocks(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import onnxruntime"],
        env=_without("onnxruntime", tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert "No module named 'onnxruntime'" in done.stderr


def _model_spec(shared_data: Path, tmp_path: Path, kind: str) -> Path:
    from columnhub.inference.testing import make_mlp_onnx, make_xgboost_json, write_card

    root = tmp_path / "models"
    card: dict[str, object] = {"name": "m", "version": 1, "inputs": ["MET_pt", "num(Jet_pt)"],
                               "outputs": [{"name": "score"}]}
    if kind == "xgboost":
        make_xgboost_json(root / "m.json", n_features=2, seed=1)
        card["file"] = "m.json"
    else:
        make_mlp_onnx(root / "m.onnx", n_features=2, hidden=(4,), seed=1)
        card["file"] = "m.onnx"
    if kind == "triton":
        card["remote"] = {"servers": ["127.0.0.1:1"], "protocol": "http", "model_name": "m",
                          "model_version": 1, "fallback_local": False, "timeout_s": 1}
    write_card(root / "m.yaml", card)
    spec = tmp_path / "req.yaml"
    backend = "remote" if kind == "triton" else "local"
    spec.write_text(
        f"dataset: {{name: d, files: {shared_data / SAMPLE}}}\ncolumns: [score]\nregistry: models\n"
        f"models: [{{model: m, version: 1, backend: {backend}}}]\n"
    )
    return spec


@pytest.mark.parametrize(
    ("kind", "blocked", "extra"),
    [
        ("onnx", "onnxruntime", "ml"),
        ("xgboost", "xgboost", "ml"),
        ("triton", "tritonclient", "ml"),
    ],
)
def test_missing_model_dependency_names_the_extra(
    shared_data: Path, tmp_path: Path, kind: str, blocked: str, extra: str
) -> None:
    spec = _model_spec(shared_data, tmp_path, kind)
    ok = _cli("deliver", str(spec), "-o", str(tmp_path / "ok"), "--no-cache")
    if kind == "triton":  # with tritonclient it gets as far as asking the (absent) server
        assert ok.returncode == 2
        assert "Connection refused" in ok.stderr
    else:
        assert ok.returncode == 0, ok.stderr  # the spec itself is fine
    done = _cli("deliver", str(spec), "-o", str(tmp_path / "o"), "--no-cache",
                env=_without(blocked, tmp_path))
    assert done.returncode == 2, done.stderr
    assert f"pip install 'columnhub[{extra}]'" in done.stderr
    assert repr(blocked) in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("url", "blocked", "extra"),
    [
        ("root://127.0.0.1:1//data/x.root", "fsspec_xrootd,XRootD", "xrootd"),
        ("http://127.0.0.1:1/x.root", "aiohttp", "http"),
        ("http://127.0.0.1:1/x.parquet", "aiohttp", "http"),
    ],
)
def test_missing_storage_dependency_names_the_extra(
    tmp_path: Path, url: str, blocked: str, extra: str
) -> None:
    spec = tmp_path / "req.yaml"
    spec.write_text(f"dataset: {{name: d, files: '{url}', timeout: 5}}\ncolumns: [MET_pt]\n")
    done = _cli("deliver", str(spec), "-o", str(tmp_path / "o"), env=_without(blocked, tmp_path))
    assert done.returncode == 2, done.stderr
    assert f"pip install 'columnhub[{extra}]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert "corrupt" not in done.stderr


def test_missing_dask_awkward_names_the_extra(shared_data: Path, tmp_path: Path) -> None:
    columnhub.deliver({"dataset": {"name": "d", "files": [str(shared_data / SAMPLE)]}, "columns": ["MET_pt"]},
                      output=tmp_path / "o")
    script = textwrap.dedent(
        f"""
        import columnhub
        from columnhub.errors import ColumnhubError
        try:
            columnhub.Result.open({str(tmp_path / "o")!r}).to_dask()
        except ModuleNotFoundError as err:
            assert isinstance(err, ColumnhubError), type(err).__mro__
            print(err)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], env=_without("dask_awkward", tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pip install 'columnhub[dask]'" in done.stdout


# ---------------------------------------------------------------------------
# key columns are checked when a dataset is delivered, not only when joined

_KEY_DTYPES = ["uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
               "float32", "float64", "bool"]


def _write_root(path: Path, branches: dict[str, object], *, rntuple: bool = False) -> Path:
    """A ROOT file with a TTree ``Events`` (as NanoAOD has), or an RNTuple."""
    with uproot.recreate(path) as file:
        if rntuple:
            file["Events"] = branches
        else:
            file.mktree("Events", {k: ak.Array(v).type.content if isinstance(v, ak.Array)
                                   else np.asarray(v).dtype for k, v in branches.items()})
            file["Events"].extend(branches)
    return path


@given(
    dtype=st.sampled_from(_KEY_DTYPES),
    values=st.lists(st.integers(-3, 100), min_size=1, max_size=30),
    chunk_size=st.integers(1, 40),
    rntuple=st.booleans(),
)
def test_key_column_types_checked_on_delivery(
    dtype: str, values: list[int], chunk_size: int, rntuple: bool
) -> None:
    import tempfile

    from columnhub.errors import KeyTypeError

    event = np.asarray(values).astype(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_root(
            Path(tmp) / "k.root", {"event": event, "x": np.arange(len(values))}, rntuple=rntuple
        )
        request = {"dataset": {"name": "d", "files": [str(path)], "keys": ["event"]}, "columns": ["x"],
                   "chunk_size": chunk_size}
        # the reference: what a key column may be
        integer = np.dtype(dtype).kind in "iu"
        negative = [i for i, v in enumerate(event.tolist()) if integer and v < 0]
        if not integer:
            with pytest.raises(KeyTypeError, match=rf"'event'.* has type {np.dtype(dtype).name}"):
                make_plan(Request.from_dict(request))
            with pytest.raises(KeyTypeError, match="dataset.keys"):
                columnhub.deliver(request, output=Path(tmp) / "o", cache=False)
            assert not (Path(tmp) / "o").exists()  # failed while planning: nothing written
        elif negative:
            with pytest.raises(KeyTypeError, match=r"k\.root: .*'event' has a negative value") as err:
                columnhub.arrays(request)
            found = re.search(r"negative value (-\d+) at entry (\d+);", str(err.value))
            assert found is not None
            value, entry = int(found.group(1)), int(found.group(2))
            assert event[entry] == value < 0  # the entry named holds the value named
        else:
            got = columnhub.arrays(request)
            assert ak.to_list(got.event) == event.tolist()
            assert ak.to_list(got.x) == list(range(len(values)))


def test_jagged_and_parquet_keys_checked_on_delivery(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from columnhub.errors import KeyTypeError

    jagged = _write_root(
        tmp_path / "j.root",
        {"event": ak.Array([[1, 2], [3], []]), "x": np.arange(3)},
    )
    with pytest.raises(KeyTypeError, match=r"'event'.*\[\].*jagged"):
        columnhub.arrays({"dataset": {"name": "d", "files": [str(jagged)], "keys": ["event"]}, "columns": ["x"]})
    table = pa.table({"run": pa.array([1, 1, 1], pa.uint32()), "event": pa.array([1.0, 2.0, 3.0]),
                      "x": pa.array([1, 2, 3])})
    pq.write_table(table, tmp_path / "f.parquet")
    with pytest.raises(KeyTypeError, match=r"'event'.*has type double"):
        columnhub.arrays({"dataset": {"name": "d", "files": [str(tmp_path / "f.parquet")], "keys": ["run", "event"]},
                          "columns": ["x"]})
    # a second file with negative keys: named with its file and entry
    good = _write_root(tmp_path / "a.root", {"event": np.array([5, 6], np.int64), "x": np.arange(2)})
    bad = _write_root(tmp_path / "b.root", {"event": np.array([7, 8, -9], np.int64), "x": np.arange(3)})
    with pytest.raises(KeyTypeError, match=r"b\.root.*negative value -9 at entry 2"):
        columnhub.arrays({"dataset": {"name": "d", "files": [str(good), str(bad)], "keys": ["event"]},
                          "columns": ["x"]})


# ---------------------------------------------------------------------------
# errors named as what they are, not as a corrupt file


class _Serving:
    """A loopback HTTP server for one file that misbehaves on purpose.

    ``mode``: ``no-ranges`` answers every request with the whole file (200);
    ``stall`` answers byte ranges that overlap ``stall_range`` with
    nothing at all (until the test ends), every other range properly.
    """

    def __init__(self, data: bytes, *, mode: str, stall_range: tuple[int, int] = (0, 0)) -> None:
        import http.server
        import threading

        self.stop = threading.Event()
        self.stalled = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                """Quiet."""

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer(head=False)

            def _answer(self, *, head: bool) -> None:
                header = self.headers.get("Range")
                if mode == "no-ranges" or header is None:
                    self._send(200, data, head=head)
                    return
                first_text, _, last_text = header.split("=", 1)[1].split(",")[0].partition("-")
                first = int(first_text)
                last = int(last_text) if last_text else len(data) - 1
                if mode == "stall" and first < stall_range[1] and last >= stall_range[0]:
                    outer.stalled += 1
                    outer.stop.wait(30)  # say nothing until the test is over (bounded)
                    return
                self._send(206, data[first : last + 1], head=head,
                           extra={"Content-Range": f"bytes {first}-{last}/{len(data)}"})

            def _send(self, status: int, body: bytes, *, head: bool,
                      extra: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                """Clients that hang up on a stalled answer are expected."""

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Serving:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:{port}/x.root", "root://127.0.0.1:{port}//x.root",
            "http://127.0.0.1:{port}/x.parquet"]
)
def test_connection_refused_is_named(url: str) -> None:
    from columnhub.errors import CorruptFileError, SourceConnectionError

    url = url.format(port=_closed_port())
    with pytest.raises(SourceConnectionError, match="refused the connection") as err:
        columnhub.arrays({"dataset": {"name": "d", "files": [url], "timeout": 2}, "columns": ["MET_pt"]})
    assert url in str(err.value)
    assert not isinstance(err.value, CorruptFileError)
    assert "corrupt" not in str(err.value)


def test_a_refused_xrootd_connection_is_named_when_the_client_times_out_first() -> None:
    """XRootD retries a refused connection until its own timeout ("Operation expired").

    That answer raced the wall-clock limit of the same length and, when it came
    first (on a loaded machine), was named a stall. Here the client is called
    without the limit, so its own expiry always comes first.
    """
    from columnhub.errors import SourceConnectionError
    from columnhub.sources.root import _open_tree
    from columnhub.spec import DatasetSpec

    pytest.importorskip("fsspec_xrootd")
    url = f"root://127.0.0.1:{_closed_port()}//x.root"
    spec = DatasetSpec.model_validate({"name": "d", "files": [url], "timeout": 1})
    with pytest.raises(SourceConnectionError, match="refused the connection") as err:
        _open_tree(url, spec)
    assert url in str(err.value)
    assert "stopped answering" not in str(err.value)


def test_server_without_ranges_is_named(shared_data: Path) -> None:
    from columnhub.errors import SourceProtocolError

    with _Serving((shared_data / SAMPLE).read_bytes(), mode="no-ranges") as server:
        with pytest.raises(SourceProtocolError, match="does not support byte-range requests") as err:
            columnhub.arrays({"dataset": {"name": "d", "files": [server.url(SAMPLE)], "timeout": 5},
                              "columns": ["MET_pt"]})
    assert server.url(SAMPLE) in str(err.value)
    assert "corrupt" not in str(err.value)


def test_stall_in_the_middle_of_a_read_is_named(shared_data: Path, http_server) -> None:
    from columnhub.errors import SourceTimeoutError

    path = shared_data / SAMPLE
    with uproot.open(path) as file:  # where the baskets are: before the tree's metadata
        tree = file["Events"]
        branch = tree["Jet_pt"]
        baskets = (int(branch.member("fBasketSeek")[0]), int(file.key("Events").fSeekKey))
        expected = tree["MET_pt"].array(library="np")
    assert baskets[0] < baskets[1]
    with _Serving(path.read_bytes(), mode="stall", stall_range=baskets) as server:
        # 3 s of waiting on the server; decoding the metadata's ~1500 branches (seconds of CPU
        # on a loaded machine) does not count against it
        request = {"dataset": {"name": "d", "files": [server.url(SAMPLE)], "timeout": 3}, "columns": ["Jet_pt"]}
        make_plan(Request.from_dict(request))  # the metadata is served: planning works
        with pytest.raises(SourceTimeoutError, match="stopped answering|did not answer") as err:
            columnhub.arrays(request)
        assert server.stalled >= 1  # it really was the basket read that stalled
    text = str(err.value)
    assert server.url(SAMPLE) in text
    assert "not subscriptable" not in text and "corrupt" not in text
    # the same file through a well-behaved server reads as it does locally
    got = columnhub.arrays({"dataset": {"name": "d", "files": [http_server.put(path, name="ok.root")]},
                            "columns": ["MET_pt"]})
    np.testing.assert_array_equal(ak.to_numpy(got.MET_pt), expected)


def _burn_cpu(seconds: float) -> None:
    """Run on the CPU until this thread has used ``seconds`` of it."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        sum(range(1000))


def test_storage_timeout_counts_waiting_not_working() -> None:
    """A loaded machine decoding a large tree's metadata is not a storage that stopped answering.

    Reference: the wall clock. Each call below runs longer than its limit; only
    the one whose waits add up past the limit is a timeout.
    """
    from columnhub.errors import SourceTimeoutError
    from columnhub.sources._timeout import call_with_timeout

    def work_with_short_waits() -> str:
        for _ in range(4):  # 2 s of CPU and 0.2 s of waiting against a 1 s limit
            _burn_cpu(0.5)
            time.sleep(0.05)
        return "decoded"

    start = time.monotonic()
    assert call_with_timeout(work_with_short_waits, seconds=1.0, what="storage") == "decoded"
    assert time.monotonic() - start > 1.0  # a wall-clock limit would have given up

    def wait_in_pieces() -> str:
        for _ in range(6):  # 1.8 s of waiting, with work between the waits
            time.sleep(0.3)
            _burn_cpu(0.05)
        return "never"

    with pytest.raises(SourceTimeoutError, match=r"storage for x did not answer within 1 s"):
        call_with_timeout(wait_in_pieces, seconds=1.0, what="storage for x")

    stop = threading.Event()

    def spin() -> None:  # a client that polls without ever sleeping: the wall-clock limit
        while not stop.is_set():
            pass

    start = time.monotonic()
    try:
        with pytest.raises(SourceTimeoutError, match=r"did not answer within 0\.2 s"):
            call_with_timeout(spin, seconds=0.2, what="storage")
    finally:
        stop.set()
    assert time.monotonic() - start >= 10 * 0.2

    def fails() -> None:
        msg = "inner"
        raise KeyError(msg)

    with pytest.raises(KeyError, match="inner"):  # the call's own error, unchanged
        call_with_timeout(fails, seconds=1.0, what="storage")


def test_a_wait_on_storage_in_a_pool_thread_ends_with_its_job() -> None:
    """``abandon_waits`` holds in the local executor's threads too (a service job's parts)."""
    from columnhub.execute.local import run_ordered
    from columnhub.sources._timeout import abandon_waits, call_with_timeout

    class Stopped(BaseException):
        pass

    stop = threading.Event()
    release = threading.Event()

    def check() -> None:
        if stop.is_set():
            raise Stopped

    def task(_: int) -> None:
        stop.set()  # the job is cancelled while this task waits for storage that never answers
        call_with_timeout(lambda: release.wait(30), seconds=5, what="storage")

    try:
        # without the context in the pool's threads this is a SourceTimeoutError after 5 s
        with abandon_waits(check), pytest.raises(Stopped):
            list(run_ordered(task, [0, 1], workers=2))
    finally:
        release.set()
    assert call_with_timeout(lambda: "outside", seconds=1, what="storage") == "outside"


def test_branch_uproot_cannot_interpret_is_named(tmp_path: Path) -> None:
    from columnhub.errors import UnreadableBranchError

    n = 7
    good = tmp_path / "good.root"
    with uproot.recreate(good, compression=None) as file:
        file.mktree("Events", {"run": np.uint32, "luminosityBlock": np.uint32,
                               "event": np.uint64, "weird": np.float64, "y": np.float32})
        file["Events"].extend({"run": np.ones(n, np.uint32), "luminosityBlock": np.ones(n, np.uint32),
                               "event": np.arange(n, dtype=np.uint64), "weird": np.arange(n) * 1.5,
                               "y": np.arange(n, dtype=np.float32)})
    data = good.read_bytes()
    assert data.count(b"TLeafD") == 2  # its streamer and its class tag: the only float64 leaf
    bad = tmp_path / "bad.root"
    bad.write_bytes(data.replace(b"TLeafD", b"TLeafX"))  # a leaf class uproot does not know
    with uproot.open(bad) as file:  # the reference: uproot itself cannot read it
        with pytest.raises(Exception, match="none of the rules matched"):
            file["Events"]["weird"].array()
    with pytest.raises(UnreadableBranchError, match=r"branch 'weird' of .*bad\.root.*TLeafX"):
        columnhub.arrays({"dataset": {"name": "d", "files": [str(bad)]}, "columns": ["y", "weird"]})
    got = columnhub.arrays({"dataset": {"name": "d", "files": [str(bad)]}, "columns": ["y"]})
    assert ak.to_list(got.y) == list(range(n))  # the other branches read as they are


def test_branch_missing_from_one_file_names_it(tmp_path: Path) -> None:
    keys = {"run": np.ones(3, np.uint32), "luminosityBlock": np.ones(3, np.uint32)}
    files = []
    for i in range(3):
        branches = {**keys, "event": np.arange(3, dtype=np.uint64) + 3 * i, "y": np.arange(3.0)}
        if i != 1:
            branches["x"] = np.arange(3.0) * i
        files.append(str(_write_root(tmp_path / f"part{i}.root", branches)))
    with pytest.raises(columnhub.errors.ColumnNotFoundError) as err:
        columnhub.arrays({"dataset": {"name": "d", "files": files}, "columns": ["x"]})
    text = str(err.value)
    assert "'x'" in text and files[1] in text and "1 of the 3 files" in text
    assert files[0] in text.split("it is in", 1)[1]  # and which files have it
    got = columnhub.arrays({"dataset": {"name": "d", "files": files}, "columns": ["y"]})
    assert ak.to_list(got.y) == [0.0, 1.0, 2.0] * 3


# ---------------------------------------------------------------------------
# docs/spec.md matches the code on model output names


def test_model_outputs_keep_the_card_names_as_documented(shared_data: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from columnhub.inference.testing import make_mlp_onnx, write_card

    root = tmp_path / "models"
    make_mlp_onnx(root / "evt.onnx", n_features=2, hidden=(4,), n_outputs=2, seed=2)
    write_card(root / "evt.yaml", {
        "name": "evtclass", "version": 1, "file": "evt.onnx", "inputs": ["MET_pt", "MET_phi"],
        "outputs": [{"name": "p_sig", "tensor": "score", "index": 0},
                    {"name": "p_bkg", "tensor": "score", "index": 1}],
    })
    got = columnhub.arrays({
        "dataset": {"name": "d", "files": [str(shared_data / SAMPLE)]}, "columns": ["p_sig", "p_bkg"],
        "registry": str(root), "models": [{"model": "evtclass", "version": 1}],
    })
    assert got.fields == ["run", "luminosityBlock", "event", "p_sig", "p_bkg"]
    with uproot.open(shared_data / SAMPLE) as file:
        x = file["Events"].arrays(["MET_pt", "MET_phi"], library="np")
    session = ort.InferenceSession(str(root / "evt.onnx"), providers=["CPUExecutionProvider"])
    want = session.run(None, {"features": np.column_stack([x["MET_pt"], x["MET_phi"]])})[0]
    np.testing.assert_allclose(ak.to_numpy(got.p_sig), want[:, 0], rtol=1e-5)
    np.testing.assert_allclose(ak.to_numpy(got.p_bkg), want[:, 1], rtol=1e-5)
    # what docs/spec.md says the default is
    doc = (REPO / "docs" / "spec.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `outputs` |"))
    default = row.split("|")[3]
    assert "<model>_" not in default
    assert "card" in default


def test_missing_dependency_of_an_optional_module_names_the_extra(tmp_path: Path) -> None:
    # tritonclient.http itself is installed, the HTTP client library it imports is not
    script = textwrap.dedent(
        """
        from columnhub._extras import require
        from columnhub.errors import ColumnhubError
        try:
            require("tritonclient.http", what="remote inference")
        except ModuleNotFoundError as err:
            assert isinstance(err, ColumnhubError), type(err).__mro__
            print(err)
        """
    )
    done = subprocess.run([sys.executable, "-c", script],
                          env=_without("geventhttpclient", tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "'geventhttpclient'" in done.stdout
    assert "pip install 'columnhub[ml]'" in done.stdout


def test_a_data_file_given_as_the_spec_is_a_user_error(shared_data: Path) -> None:
    """``columnhub deliver file.root`` (the data file instead of a spec) says so, exit 2, no traceback."""
    root_file = next(shared_data.glob("*.root"))
    done = _cli("deliver", str(root_file), "-o", "never-written")
    assert done.returncode == 2, done.stderr
    assert "is not text" in done.stderr
    assert "Traceback" not in done.stderr
