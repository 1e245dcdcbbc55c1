"""Model cards, the registry and local inference (ONNX Runtime, XGBoost).

References are independent: a direct ONNX Runtime call / ``booster.predict``
on a matrix stacked here with numpy, and Python loops for the jagged layout.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import onnxruntime as ort
import pytest
import uproot
import xgboost as xgb
from hypothesis import given, settings
from hypothesis import strategies as st

from columnhub.errors import ModelError, ModelInputError, ModelNotFoundError
from columnhub.inference import InferenceMetrics, ModelCard, ModelRegistry, load_card, predict
from columnhub.inference.batching import batch_rows, batch_slices
from columnhub.inference.testing import make_mlp_onnx, make_xgboost_json, write_card

JET_INPUTS = ["Jet_pt", "Jet_eta", "Jet_phi", "Jet_mass", "Jet_btagDeepFlavB"]
EVENT_INPUTS = ["MET_pt", "MET_phi", "nJet"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    root = tmp_path_factory.mktemp("registry")
    make_mlp_onnx(root / "jet" / "jet_mlp.onnx", n_features=5, hidden=(16, 16), seed=1)
    write_card(
        root / "jet" / "1.yaml",
        {
            "name": "jet_mlp",
            "version": 1,
            "file": "jet_mlp.onnx",
            "granularity": "object",
            "collection": "Jet",
            "inputs": JET_INPUTS,
            "outputs": [{"name": "score", "type": "float32"}],
        },
    )
    make_mlp_onnx(root / "evt" / "evt_mlp.onnx", n_features=3, hidden=(8,), n_outputs=2, seed=2)
    write_card(
        root / "evt" / "2.yaml",
        {
            "name": "evt_mlp",
            "version": 2,
            "file": "evt_mlp.onnx",
            "inputs": EVENT_INPUTS,
            "outputs": [
                {"name": "p0", "tensor": "score", "index": 0},
                {"name": "p1", "tensor": "score", "index": 1, "type": "float64"},
            ],
        },
    )
    make_xgboost_json(root / "xgb" / "bdt.json", n_features=4, seed=3)
    write_card(
        root / "xgb" / "bdt-1.yml",
        {
            "name": "bdt",
            "version": "1",
            "file": "bdt.json",
            "granularity": "object",
            "collection": "Jet",
            "inputs": JET_INPUTS[:4],
            "outputs": [{"name": "bdt_score"}],
        },
    )
    return ModelRegistry(root)


@pytest.fixture(scope="module")
def tt_events(shared_data: Path) -> ak.Array:
    with uproot.open(shared_data / "nano_tt_v12.root") as f:
        return f["Events"].arrays([*JET_INPUTS, "MET_pt", "MET_phi", "nJet"])


def _ort(path: Path, matrix: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: matrix})[0])


def _stack_jagged(arrays: list[ak.Array]) -> np.ndarray:
    # independent reference: per-event python loops
    rows = []
    for i in range(len(arrays[0])):
        for j in range(len(arrays[0][i])):
            rows.append([float(a[i][j]) for a in arrays])
    return np.asarray(rows, dtype=np.float32).reshape(-1, len(arrays))


# ---------------------------------------------------------------- registry


def test_registry_lists_and_loads(registry: ModelRegistry) -> None:
    assert registry.models() == {"bdt": ["1"], "evt_mlp": ["2"], "jet_mlp": ["1"]}
    card = registry.get("jet_mlp", 1)
    assert card.inputs == JET_INPUTS
    assert card.granularity == "object"
    assert card.collection == "Jet"
    assert card.output_names == ["score"]
    assert card.model_format == "onnx"
    assert registry.get("bdt", "1").model_format == "xgboost"
    assert card.model_path() == (registry.path / "jet" / "jet_mlp.onnx").resolve()


def test_missing_model_lists_registry(registry: ModelRegistry) -> None:
    with pytest.raises(ModelNotFoundError, match=r"did you mean 'jet_mlp'") as info:
        registry.get("jet_mpl", 1)
    message = str(info.value)
    for name in ("bdt (1)", "evt_mlp (2)", "jet_mlp (1)"):
        assert name in message
    assert isinstance(info.value, KeyError)


def test_missing_version_lists_versions(registry: ModelRegistry) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no version '7'.*available versions: 2"):
        registry.get("evt_mlp", 7)


def test_card_identity_tracks_file_and_card(tmp_path: Path) -> None:
    make_mlp_onnx(tmp_path / "m.onnx", n_features=2, hidden=(4,), seed=0)
    doc = {
        "name": "m",
        "version": 1,
        "file": "m.onnx",
        "inputs": ["a", "b"],
        "outputs": [{"name": "s"}],
    }
    write_card(tmp_path / "m.yaml", doc)
    first = load_card(tmp_path / "m.yaml")
    assert load_card(tmp_path / "m.yaml").identity == first.identity  # stable
    assert first.identity.startswith("model:m@1;")
    write_card(tmp_path / "m.yaml", {**doc, "inputs": ["b", "a"]})
    reordered = load_card(tmp_path / "m.yaml")
    assert reordered.identity != first.identity
    assert reordered.file_sha256 == first.file_sha256
    write_card(tmp_path / "m.yaml", doc)
    make_mlp_onnx(tmp_path / "m.onnx", n_features=2, hidden=(4,), seed=1)  # new weights
    retrained = load_card(tmp_path / "m.yaml")
    assert retrained.file_sha256 != first.file_sha256
    assert retrained.identity != first.identity
    assert retrained.card_sha256 != first.card_sha256


def test_card_is_frozen_and_picklable(registry: ModelRegistry) -> None:
    card = registry.get("jet_mlp", 1)
    assert pickle.loads(pickle.dumps(card)) == card
    with pytest.raises(ValueError, match=r"frozen"):
        card.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"granularity": "object"}, "needs 'collection'"),
        ({"collection": "Jet"}, "only allowed with granularity 'object'"),
        ({"file": "missing.onnx"}, "does not exist"),
        ({"file": "m.pkl"}, "cannot tell the format"),
        ({"outputs": [{"name": "s"}, {"name": "s"}]}, "unique"),
        ({"file_sha256": "abc"}, "is computed"),
        ({"remote": {"servers": ["localhost:1"], "model_name": "m"}}, "model_version"),
    ],
)
def test_bad_cards_are_explained(tmp_path: Path, doc: dict[str, Any], match: str) -> None:
    make_mlp_onnx(tmp_path / "m.onnx", n_features=1, hidden=(2,))
    (tmp_path / "m.pkl").write_bytes(b"x")
    base = {
        "name": "m",
        "version": 1,
        "file": "m.onnx",
        "inputs": ["a"],
        "outputs": [{"name": "s"}],
    }
    write_card(tmp_path / "m.yaml", {**base, **doc})
    with pytest.raises(ModelError, match=match):
        load_card(tmp_path / "m.yaml")


def test_duplicate_card_is_an_error(tmp_path: Path) -> None:
    make_mlp_onnx(tmp_path / "m.onnx", n_features=1, hidden=(2,))
    doc = {"name": "m", "version": 1, "file": "m.onnx", "inputs": ["a"], "outputs": [{"name": "s"}]}
    write_card(tmp_path / "a.yaml", doc)
    write_card(tmp_path / "b.yaml", doc)
    with pytest.raises(ModelError, match=r"defined twice"):
        ModelRegistry(tmp_path).get("m", 1)


# ---------------------------------------------------------------- local ONNX parity


def test_per_jet_parity_with_direct_onnxruntime(
    registry: ModelRegistry, tt_events: ak.Array
) -> None:
    card = registry.get("jet_mlp", 1)
    inputs = [tt_events[n] for n in JET_INPUTS]
    metrics = InferenceMetrics()
    out = predict(card, inputs, backend="local", metrics=metrics)
    assert list(out) == ["score"]
    score = out["score"]
    # same list lengths as the inputs, event by event
    assert ak.num(score).tolist() == ak.num(tt_events.Jet_pt).tolist()
    expected = _ort(card.model_path(), _stack_jagged(inputs))[:, 0]
    np.testing.assert_allclose(ak.to_numpy(ak.flatten(score)), expected, rtol=1e-5)
    assert str(score.type.content) == "var * float32"
    snap = metrics.snapshot()["jet_mlp@1"]
    assert snap["rows"] == len(expected)
    assert snap["events"] == len(tt_events)
    assert snap["calls"] == 1
    assert snap["backends"] == {"local": 1}


def test_per_event_parity_two_outputs(registry: ModelRegistry, tt_events: ak.Array) -> None:
    card = registry.get("evt_mlp", 2)
    inputs = [tt_events.MET_pt, tt_events.MET_phi, tt_events.nJet]  # nJet is an integer
    out = predict(card, inputs)
    matrix = np.array(
        [
            [float(tt_events.MET_pt[i]), float(tt_events.MET_phi[i]), float(tt_events.nJet[i])]
            for i in range(len(tt_events))
        ],
        dtype=np.float32,
    )
    expected = _ort(card.model_path(), matrix)
    assert out["p0"].type.content.primitive == "float32"  # type: ignore[attr-defined]
    assert out["p1"].type.content.primitive == "float64"  # type: ignore[attr-defined]
    np.testing.assert_allclose(ak.to_numpy(out["p0"]), expected[:, 0], rtol=1e-5)
    np.testing.assert_allclose(ak.to_numpy(out["p1"]), expected[:, 1], rtol=1e-5)
    # numpy inputs work the same
    out_np = predict(card, [np.asarray(ak.to_numpy(a)) for a in inputs])
    np.testing.assert_array_equal(ak.to_numpy(out_np["p0"]), ak.to_numpy(out["p0"]))


def test_jagged_round_trip_sliced_and_empty(registry: ModelRegistry, tt_events: ak.Array) -> None:
    card = registry.get("jet_mlp", 1)
    # a slice (offsets not starting at 0), events with no jets, an empty chunk
    sub = tt_events[37:61]
    keep = (np.arange(len(sub)) % 3)[:, None]  # 0, 1 or 2 jets per event
    masked = [sub[n][ak.local_index(sub[n]) < keep] for n in JET_INPUTS]
    counts = ak.num(masked[0]).tolist()
    assert 0 in counts
    out = predict(card, masked)["score"]
    assert ak.num(out).tolist() == counts
    expected = _ort(card.model_path(), _stack_jagged(masked))[:, 0]
    np.testing.assert_allclose(ak.to_numpy(ak.flatten(out)), expected, rtol=1e-5)

    empty = predict(card, [n[:0] for n in masked])["score"]
    assert len(empty) == 0
    assert str(empty.type) == "0 * var * float32"
    all_empty = predict(card, [ak.Array([[], [], []])] * 5)["score"]
    assert all_empty.tolist() == [[], [], []]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=6), min_size=0, max_size=40), st.integers(0, 9))
def test_jagged_layout_property(counts: list[int], seed: int) -> None:
    card = _PROPERTY_CARD[0]
    rng = np.random.default_rng(seed)
    total = sum(counts)
    arrays = [
        ak.unflatten(rng.normal(size=total).astype(np.float32), np.asarray(counts, dtype=np.int64))
        for _ in range(5)
    ]
    out = predict(card, arrays)["score"]
    assert ak.num(out).tolist() == counts
    expected = _ort(card.model_path(), _stack_jagged(arrays))[:, 0] if total else np.zeros(0)
    np.testing.assert_allclose(ak.to_numpy(ak.flatten(out)), expected, rtol=1e-5)


_PROPERTY_CARD: list[Any] = []


@pytest.fixture(autouse=True, scope="module")
def _property_card(registry: ModelRegistry) -> None:
    _PROPERTY_CARD[:] = [registry.get("jet_mlp", 1)]


# ---------------------------------------------------------------- wrong inputs


def test_wrong_inputs_are_named(registry: ModelRegistry, tt_events: ak.Array) -> None:
    jet = registry.get("jet_mlp", 1)
    good = [tt_events[n] for n in JET_INPUTS]
    with pytest.raises(ModelInputError, match=r"takes 5 inputs.*got 4"):
        predict(jet, good[:4])
    shifted = [*good[:2], tt_events.Jet_phi[:, :-1], *good[3:]]  # one object fewer
    with pytest.raises(ModelInputError, match=r"'Jet_phi' has \d+ objects in event 0"):
        predict(jet, shifted)
    with pytest.raises(ModelInputError, match=r"'Jet_eta' has 199 events"):
        predict(jet, [good[0], good[1][1:], *good[2:]])
    with pytest.raises(ModelInputError, match=r"'Jet_mass'.*per-object model needs one list"):
        predict(jet, [*good[:3], tt_events.MET_pt, good[4]])
    with pytest.raises(ModelInputError, match=r"'Jet_pt'.*var \* var"):
        predict(jet, [ak.Array([[[1.0]]]), *good[1:]])
    with pytest.raises(ModelInputError, match=r"'Jet_pt'.*string.*list of numbers"):
        predict(jet, [ak.Array([["a"]]), *[ak.Array([[1.0]])] * 4])
    with pytest.raises(ModelInputError, match=r"'Jet_eta'.*\?float64.*no missing values"):
        predict(jet, [ak.Array([[1.0]]), ak.Array([[1.0, None]]), *[ak.Array([[1.0]])] * 3])
    evt = registry.get("evt_mlp", 2)
    with pytest.raises(ModelInputError, match=r"'MET_phi'.*one number per event"):
        predict(evt, [tt_events.MET_pt, tt_events.Jet_pt, tt_events.nJet])
    with pytest.raises(ModelInputError, match=r"'MET_pt'.*1-D array"):
        predict(evt, [np.zeros((200, 2)), tt_events.MET_phi, tt_events.nJet])


def test_card_with_wrong_feature_count(tmp_path: Path) -> None:
    make_mlp_onnx(tmp_path / "m.onnx", n_features=3, hidden=(4,))
    write_card(
        tmp_path / "m.yaml",
        {
            "name": "m",
            "version": 1,
            "file": "m.onnx",
            "inputs": ["a", "b"],
            "outputs": [{"name": "s"}],
        },
    )
    card = load_card(tmp_path / "m.yaml")
    with pytest.raises(ModelInputError, match=r"takes 3 features.*lists 2 inputs"):
        predict(card, [np.zeros(4), np.zeros(4)])


def test_remote_backend_needs_servers(registry: ModelRegistry) -> None:
    with pytest.raises(ModelError, match=r"no 'remote' section"):
        predict(registry.get("evt_mlp", 2), [np.zeros(1)] * 3, backend="remote")
    with pytest.raises(ModelError, match=r"backend must be one of"):
        predict(registry.get("evt_mlp", 2), [np.zeros(1)] * 3, backend="gpu")  # type: ignore[arg-type]


# ---------------------------------------------------------------- XGBoost


def test_xgboost_parity_with_booster_predict(registry: ModelRegistry, tt_events: ak.Array) -> None:
    card = registry.get("bdt", 1)
    inputs = [tt_events[n] for n in JET_INPUTS[:4]]
    out = predict(card, inputs)["bdt_score"]
    booster = xgb.Booster()
    booster.load_model(str(card.model_path()))
    expected = booster.predict(xgb.DMatrix(_stack_jagged(inputs)))
    assert ak.num(out).tolist() == ak.num(tt_events.Jet_pt).tolist()
    np.testing.assert_allclose(ak.to_numpy(ak.flatten(out)), expected, rtol=1e-5)
    empty = predict(card, [a[:0] for a in inputs])["bdt_score"]
    assert len(empty) == 0


# ---------------------------------------------------------------- batching + metrics


@given(st.integers(0, 10_000), st.integers(1, 3000))
def test_batch_slices_cover_without_padding(n_rows: int, size: int) -> None:
    slices = list(batch_slices(n_rows, size))
    covered = np.concatenate([np.arange(s.start, s.stop) for s in slices]) if slices else []
    np.testing.assert_array_equal(covered, np.arange(n_rows))
    assert all(0 < s.stop - s.start <= size for s in slices)


def test_batch_rows_respects_rows_and_bytes() -> None:
    assert batch_rows(n_features=5, max_rows=100, max_bytes=1 << 20) == 100
    assert batch_rows(n_features=5, max_rows=10**6, max_bytes=2000) == 100
    assert batch_rows(n_features=5, max_rows=10, max_bytes=1) == 1


def test_metrics_snapshot_and_merge() -> None:
    a = InferenceMetrics()
    for ms in range(1, 101):
        a.record_batch("m@1", rows=10, latency_s=ms / 1000)
    a.record_call("m@1", rows=1000, events=100, seconds=2.0, backend="remote")
    a.record_retry("m@1", failover=True)
    a.record_retry("m@1", failover=False)
    b = pickle.loads(pickle.dumps(a))
    b.merge(a)
    snap = b.snapshot()["m@1"]
    assert snap["batches"] == 200
    assert snap["rows_per_s"] == pytest.approx(500.0)
    assert snap["retries"] == 4
    assert snap["failovers"] == 2
    assert snap["batch_latency_ms"]["p50"] == pytest.approx(50.5)
    assert snap["batch_latency_ms"]["max"] == pytest.approx(100.0)
    assert snap["backends"] == {"remote": 2}


def test_local_batches_are_stitched_in_order(
    registry: ModelRegistry, tt_events: ak.Array, monkeypatch: pytest.MonkeyPatch
) -> None:
    import columnhub.inference.onnx as onnx_backend

    card = registry.get("jet_mlp", 1)
    inputs = [tt_events[n] for n in JET_INPUTS]
    monkeypatch.setattr(onnx_backend, "LOCAL_BATCH_ROWS", 97)  # many batches, a short tail
    metrics = InferenceMetrics()
    out = predict(card, inputs, metrics=metrics)["score"]
    expected = _ort(card.model_path(), _stack_jagged(inputs))[:, 0]
    np.testing.assert_allclose(ak.to_numpy(ak.flatten(out)), expected, rtol=1e-5)
    assert metrics.snapshot()["jet_mlp@1"]["batches"] == -(-len(expected) // 97)


def _predict_in_child(args: tuple[ModelCard, list[ak.Array]]) -> np.ndarray:
    card, inputs = args
    return ak.to_numpy(ak.flatten(predict(card, inputs, backend="local")["score"]))


def test_forked_child_runs_the_local_backend(registry: ModelRegistry, tt_events: ak.Array) -> None:
    """A child forked after this process opened the ONNX Runtime session opens its own."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    card = registry.get("jet_mlp", 1)
    inputs = [tt_events[n] for n in JET_INPUTS]
    here = ak.to_numpy(ak.flatten(predict(card, inputs, backend="local")["score"]))
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        there = pool.submit(_predict_in_child, (card, inputs)).result(timeout=60)
    np.testing.assert_array_equal(here, there)
