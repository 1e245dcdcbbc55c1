"""Remote inference against two real Triton servers (pytriton, CPU) on loopback.

The servers run ``tests/triton_server.py`` with the Triton venv
(``scripts/setup-triton-venv.sh``, created on first use), serving ONNX models
built here. References: a direct ONNX Runtime call on a matrix stacked with
numpy, and the local backend.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import onnxruntime as ort
import pytest
import uproot

import columnhub
from columnhub.errors import InferenceServerError, ModelInputError
from columnhub.inference import InferenceMetrics, ModelCard, RemoteConfig, load_card, predict
from columnhub.inference.testing import make_mlp_onnx, write_card

pytestmark = pytest.mark.triton

REPO = Path(__file__).resolve().parents[1]
TRITON_PYTHON = REPO / ".venv-triton" / "bin" / "python"
SERVER_SCRIPT = REPO / "tests" / "triton_server.py"
JET_INPUTS = ["Jet_pt", "Jet_eta", "Jet_phi", "Jet_mass", "Jet_btagDeepFlavB"]
EVENT_INPUTS = ["MET_pt", "MET_phi", "nJet"]
MAX_BATCH = 512  # the servers' max_batch_size
READY_TIMEOUT_S = 120.0


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all held open while choosing, so none repeats)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


@dataclass
class TritonServer:
    """One ``tests/triton_server.py`` process (its own process group)."""

    models: list[str]
    workdir: Path
    http_port: int = 0  #: 0: free ports are chosen
    grpc_port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if not (self.http_port and self.grpc_port and self.metrics_port):
            self.http_port, self.grpc_port, self.metrics_port = _free_ports(3)

    @property
    def ready_file(self) -> Path:
        return self.workdir / f"ready-{self.http_port}"

    @property
    def log(self) -> Path:
        return self.workdir / f"server-{self.http_port}.log"

    def url(self, protocol: str) -> str:
        return f"127.0.0.1:{self.http_port if protocol == 'http' else self.grpc_port}"

    def start(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        args = [str(TRITON_PYTHON), str(SERVER_SCRIPT)]
        args += ["--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        args += ["--metrics-port", str(self.metrics_port), "--max-batch-size", str(MAX_BATCH)]
        args += ["--ready-file", str(self.ready_file)]
        workspace = self.workdir / f"pytriton-{self.http_port}"
        shutil.rmtree(workspace, ignore_errors=True)  # pytriton wants a new directory
        args += ["--workspace", str(workspace)]
        for m in self.models:
            args += ["--model", m]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                return
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                pytest.fail(f"triton server exited with {self.proc.returncode}:\n{tail}")
            time.sleep(0.1)
        self.kill()
        tail = self.log.read_text(errors="replace")[-3000:]
        pytest.fail(f"triton server not ready within {READY_TIMEOUT_S} s:\n{tail}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("triton-models")
    make_mlp_onnx(root / "jet_mlp.onnx", n_features=5, hidden=(16, 16), seed=11)
    make_mlp_onnx(root / "evt_mlp.onnx", n_features=3, hidden=(8,), n_outputs=2, seed=12)
    return root


SHM = Path("/dev/shm")


def _shm_names() -> set[str]:
    if not SHM.is_dir():
        return set()
    return {p.name for pattern in ("psm_*", "pytrtion*") for p in SHM.glob(pattern)}


@pytest.fixture(scope="module")
def server_pair(models_dir: Path) -> Iterator[list[TritonServer]]:
    if not TRITON_PYTHON.exists():
        subprocess.run([str(REPO / "scripts" / "setup-triton-venv.sh")], check=True, timeout=900)
    models = [
        f"jet_mlp:1={models_dir / 'jet_mlp.onnx'}",
        f"evt_mlp:3={models_dir / 'evt_mlp.onnx'}",
    ]
    pair = [TritonServer(models, models_dir), TritonServer(models, models_dir)]
    shm_before = _shm_names()
    try:
        for s in pair:
            s.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        for s in pair:
            s.wait_ready(deadline)
        yield pair
    finally:
        for s in pair:
            s.kill()
        # the Python backend's shared-memory regions outlive killed servers
        for name in _shm_names() - shm_before:
            (SHM / name).unlink(missing_ok=True)


@pytest.fixture
def servers(server_pair: list[TritonServer]) -> list[TritonServer]:
    """The two servers, restarted first if a test killed one (same ports)."""
    dead = [s for s in server_pair if s.proc is None or s.proc.poll() is not None]
    for s in dead:
        s.start()
    for s in dead:
        s.wait_ready(time.monotonic() + READY_TIMEOUT_S)
    return server_pair


def _card(models_dir: Path, kind: str) -> ModelCard:
    if kind == "jet":
        doc = {
            "name": "jet_mlp",
            "version": 1,
            "file": "jet_mlp.onnx",
            "granularity": "object",
            "collection": "Jet",
            "inputs": JET_INPUTS,
            "outputs": [{"name": "score"}],
        }
    else:
        doc = {
            "name": "evt_mlp",
            "version": 3,
            "file": "evt_mlp.onnx",
            "inputs": EVENT_INPUTS,
            "outputs": [
                {"name": "p0", "tensor": "score", "index": 0},
                {"name": "p1", "tensor": "score", "index": 1},
            ],
        }
    return load_card(write_card(models_dir / f"{kind}.yaml", doc))


def _remote(card: ModelCard, servers: list[str], protocol: str, **kw: Any) -> ModelCard:
    remote = RemoteConfig(
        servers=tuple(servers),
        protocol=protocol,  # type: ignore[arg-type]
        model_name=card.name,
        model_version=card.version,
        **kw,
    )
    return card.model_copy(update={"remote": remote})


@pytest.fixture(scope="module")
def tt_events(shared_data: Path) -> ak.Array:
    with uproot.open(shared_data / "nano_tt_v12.root") as f:
        return f["Events"].arrays([*JET_INPUTS, *EVENT_INPUTS])


def _direct(path: Path, matrix: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: matrix})[0])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_per_jet_parity(
    servers: list[TritonServer], models_dir: Path, tt_events: ak.Array, protocol: str
) -> None:
    card = _card(models_dir, "jet")
    remote = _remote(card, [s.url(protocol) for s in servers], protocol, max_batch_rows=300)
    inputs = [tt_events[n] for n in JET_INPUTS]
    metrics = InferenceMetrics()
    got = predict(remote, inputs, backend="remote", metrics=metrics)["score"]
    local = predict(card, inputs, backend="local")["score"]
    matrix = np.column_stack([ak.to_numpy(ak.flatten(a)) for a in inputs]).astype(np.float32)
    direct = _direct(card.model_path(), matrix)[:, 0]
    assert ak.num(got).tolist() == ak.num(tt_events.Jet_pt).tolist()
    np.testing.assert_allclose(ak.to_numpy(ak.flatten(got)), direct, rtol=1e-5)
    np.testing.assert_allclose(ak.to_numpy(ak.flatten(local)), direct, rtol=1e-5)
    snap = metrics.snapshot()["jet_mlp@1"]
    n_jets = len(matrix)
    assert snap["batches"] == -(-n_jets // 300)  # 300-row batches, the tail not padded
    assert snap["rows"] == n_jets
    assert snap["backends"] == {"remote": 1}
    assert snap["retries"] == 0


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_per_event_parity_and_server_batch_limit(
    servers: list[TritonServer], models_dir: Path, tt_events: ak.Array, protocol: str
) -> None:
    card = _card(models_dir, "evt")
    # asks for 10k rows per batch; the server's max_batch_size (512) wins
    remote = _remote(card, [s.url(protocol) for s in servers], protocol, max_batch_rows=10_000)
    big = {n: np.tile(ak.to_numpy(tt_events[n]), 6) for n in EVENT_INPUTS}  # 1200 events
    metrics = InferenceMetrics()
    got = predict(remote, [big[n] for n in EVENT_INPUTS], metrics=metrics)  # auto -> remote
    matrix = np.column_stack([big[n] for n in EVENT_INPUTS]).astype(np.float32)
    direct = _direct(card.model_path(), matrix)
    np.testing.assert_allclose(ak.to_numpy(got["p0"]), direct[:, 0], rtol=1e-5)
    np.testing.assert_allclose(ak.to_numpy(got["p1"]), direct[:, 1], rtol=1e-5)
    assert metrics.snapshot()["evt_mlp@3"]["batches"] == 3  # 512 + 512 + 176


def test_remote_empty_events_and_chunks(servers: list[TritonServer], models_dir: Path) -> None:
    card = _remote(_card(models_dir, "jet"), [s.url("http") for s in servers], "http")
    rng = np.random.default_rng(5)
    counts = np.array([0, 3, 0, 0, 1, 0], dtype=np.int64)
    arrays = [ak.unflatten(rng.normal(size=4).astype(np.float32), counts) for _ in JET_INPUTS]
    got = predict(card, arrays)["score"]
    assert ak.num(got).tolist() == counts.tolist()
    np.testing.assert_allclose(
        ak.to_numpy(ak.flatten(got)),
        ak.to_numpy(ak.flatten(predict(card, arrays, backend="local")["score"])),
        rtol=1e-5,
    )
    assert predict(card, [a[:0] for a in arrays])["score"].tolist() == []
    assert predict(card, [a[[0, 2]] for a in arrays])["score"].tolist() == [[], []]


def test_remote_feature_count_is_checked(servers: list[TritonServer], models_dir: Path) -> None:
    card = _card(models_dir, "jet")
    # a card that feeds 4 inputs to the 5-feature served model
    wrong = card.model_copy(update={"inputs": JET_INPUTS[:4]})
    wrong = _remote(wrong, [servers[0].url("http")], "http")
    with pytest.raises(ModelInputError, match=r"takes 5 features.*lists 4 inputs"):
        predict(wrong, [ak.Array([[1.0]])] * 4, backend="remote")


def test_all_servers_down_raises(models_dir: Path, hanging_server: Any) -> None:
    card = _card(models_dir, "jet")
    dead = [f"127.0.0.1:{_free_ports(1)[0]}", f"127.0.0.1:{hanging_server.port}"]
    arrays = [ak.Array([[1.0, 2.0], [3.0]])] * 5
    for protocol in ("http", "grpc"):
        remote = _remote(card, dead, protocol, timeout_s=1.0, retries=2, backoff_ms=1)
        with pytest.raises(InferenceServerError, match=r"(?s)server.*127\.0\.0\.1"):
            predict(remote, arrays, backend="remote")
    # with a local fallback the same request succeeds, and says so in the metrics
    fallback = _remote(card, dead, "http", timeout_s=1.0, retries=1, fallback_local=True)
    metrics = InferenceMetrics()
    got = predict(fallback, arrays, metrics=metrics)["score"]
    expected = predict(card, arrays, backend="local")["score"]
    assert got.tolist() == expected.tolist()
    assert metrics.snapshot()["jet_mlp@1"]["fallbacks"] == 1


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_failover_when_a_server_dies_mid_request(
    servers: list[TritonServer], models_dir: Path, protocol: str
) -> None:
    card = _card(models_dir, "jet")
    remote = _remote(
        card, [s.url(protocol) for s in servers], protocol, max_batch_rows=256, timeout_s=10
    )
    rng = np.random.default_rng(7)
    counts = rng.poisson(5, size=40_000).astype(np.int64)
    n = int(counts.sum())
    arrays = [ak.unflatten(rng.normal(size=n).astype(np.float32), counts) for _ in JET_INPUTS]
    expected = predict(card, arrays, backend="local")["score"]
    metrics = InferenceMetrics()
    victim = servers[1]
    killed = threading.Event()

    def kill_after_first_batches() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if metrics.snapshot().get("jet_mlp@1", {}).get("batches", 0) >= 5:
                victim.kill()
                killed.set()
                return
            time.sleep(0.001)

    killer = threading.Thread(target=kill_after_first_batches)
    killer.start()
    try:
        got = predict(remote, arrays, backend="remote", metrics=metrics)["score"]
        killer.join(timeout=60)
        assert killed.is_set()
        assert ak.num(got).tolist() == counts.tolist()
        np.testing.assert_allclose(
            ak.to_numpy(ak.flatten(got)), ak.to_numpy(ak.flatten(expected)), rtol=1e-5
        )
        snap = metrics.snapshot()["jet_mlp@1"]
        assert snap["batches"] == -(-n // 256)  # every batch answered exactly once
        assert snap["failovers"] >= 1
    finally:
        killer.join(timeout=60)
        victim.kill()  # the `servers` fixture restarts it for the next test


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_deliver_with_remote_model_matches_local(
    servers: list[TritonServer], models_dir: Path, shared_data: Path, tmp_path: Path, protocol: str
) -> None:
    """A request whose model card names the two servers: same columns as local inference."""
    registry = tmp_path / "registry"
    registry.mkdir()
    shutil.copy(models_dir / "jet_mlp.onnx", registry / "jet_mlp.onnx")
    card = {
        "name": "jet_mlp", "version": 1, "file": "jet_mlp.onnx", "granularity": "object",
        "collection": "Jet", "inputs": JET_INPUTS, "outputs": [{"name": "score"}],
        "remote": {"servers": [s.url(protocol) for s in servers], "protocol": protocol,
                   "model_name": "jet_mlp", "model_version": "1", "max_batch_rows": 256},
    }
    write_card(registry / "jet_mlp.yaml", card)
    request = {
        "dataset": {"name": "tt", "files": [str(shared_data / "nano_tt_v12.root")]},
        "registry": str(registry), "columns": ["score"], "chunk_size": 50,
        "models": [{"model": "jet_mlp", "version": 1, "backend": "remote"}],
    }
    remote = columnhub.deliver(request, output=tmp_path / "remote", cache=False)
    request["models"] = [{"model": "jet_mlp", "version": 1, "backend": "local"}]
    local = columnhub.deliver(request, output=tmp_path / "local", cache=False)
    got, want = remote.to_awkward().score, local.to_awkward().score
    assert ak.num(got).tolist() == ak.num(want).tolist()
    np.testing.assert_allclose(ak.to_numpy(ak.flatten(got)), ak.to_numpy(ak.flatten(want)), rtol=1e-5)
    assert remote.manifest["inference"]["jet_mlp@1"]["backends"] == {"remote": 4}
