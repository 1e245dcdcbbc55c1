"""Model outputs as delivered columns: parity with a direct ONNX Runtime call, caching, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import awkward as ak
import numpy as np
import onnxruntime as ort
import pytest
import uproot

import columnhub
from columnhub.errors import ModelNotFoundError, SpecError
from columnhub.inference.testing import make_mlp_onnx, make_xgboost_json, write_card

JET_INPUTS = ["Jet_pt", "Jet_eta", "Jet_phi", "log(Jet_pt)"]


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    make_mlp_onnx(root / "jet" / "jet-2.onnx", n_features=4, hidden=(16, 16), seed=3)
    write_card(root / "jet" / "2.yaml", {
        "name": "jettag", "version": 2, "file": "jet-2.onnx", "granularity": "object",
        "collection": "Jet", "inputs": JET_INPUTS, "outputs": [{"name": "Jet_tag"}],
    })
    make_mlp_onnx(root / "evt" / "evt-1.onnx", n_features=2, hidden=(8,), n_outputs=2, seed=4)
    write_card(root / "evt" / "1.yaml", {
        "name": "evtclass", "version": 1, "file": "evt-1.onnx",
        "inputs": ["MET_pt / 100", "num(Jet_pt) / 10"],
        "outputs": [{"name": "p_sig", "tensor": "score", "index": 0},
                    {"name": "p_bkg", "tensor": "score", "index": 1}],
    })
    return root


def direct(path: Path, matrix: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: matrix.astype(np.float32)})[0]


def request(shared_data: Path, registry: Path, **extra: object) -> dict[str, object]:
    return {
        "dataset": {"name": "tt", "files": [str(shared_data / "nano_tt_v12.root")]},
        "registry": str(registry),
        "chunk_size": 64,
        **extra,
    }


def test_per_jet_and_per_event_models_match_direct_onnxruntime(
    shared_data: Path, registry: Path, tmp_path: Path
) -> None:
    result = columnhub.deliver(
        request(
            shared_data, registry,
            columns=["Jet_tag", "p_sig", "signal", "lead_tag"],
            define={"lead_tag": "max(Jet_tag)"},
            models=[{"model": "jettag", "version": 2},
                    {"model": "evtclass", "version": "1", "outputs": {"p_sig": "signal"}}],
        ) | {"columns": ["Jet_tag", "signal", "lead_tag"]},
        output=tmp_path / "out", cache=tmp_path / "cache",
    )
    t = uproot.open(shared_data / "nano_tt_v12.root")["Events"].arrays(
        ["Jet_pt", "Jet_eta", "Jet_phi", "MET_pt"]
    )
    flat = [ak.to_numpy(ak.flatten(t[c])) for c in ("Jet_pt", "Jet_eta", "Jet_phi")]
    jets = direct(registry / "jet" / "jet-2.onnx", np.column_stack([*flat, np.log(flat[0])]))
    events = direct(
        registry / "evt" / "evt-1.onnx",
        np.column_stack([ak.to_numpy(t.MET_pt) / 100, ak.to_numpy(ak.num(t.Jet_pt)) / 10]),
    )
    got = result.to_awkward()
    assert ak.num(got.Jet_tag).tolist() == ak.num(t.Jet_pt).tolist()
    np.testing.assert_allclose(ak.to_numpy(ak.flatten(got.Jet_tag)), jets[:, 0], rtol=1e-5)
    np.testing.assert_allclose(ak.to_numpy(got.signal), events[:, 0], rtol=1e-5)
    per_event_max = ak.max(ak.unflatten(jets[:, 0], ak.num(t.Jet_pt)), axis=1)
    np.testing.assert_allclose(
        ak.to_numpy(ak.fill_none(got.lead_tag, -1)),
        ak.to_numpy(ak.fill_none(per_event_max, -1)), rtol=1e-5,
    )
    snap = result.manifest["inference"]
    assert snap["jettag@2"]["rows"] == len(jets)
    assert snap["evtclass@1"]["events"] == len(t)
    assert set(result.manifest["models"]) == {"jettag@2", "evtclass@1"}


def test_model_outputs_select_events_and_are_cached(
    shared_data: Path, registry: Path, tmp_path: Path
) -> None:
    req = request(shared_data, registry, columns=["MET_pt", "p_sig"], where="p_sig > 0.5",
                  models=[{"model": "evtclass", "version": 1}])
    cold = columnhub.deliver(req, output=tmp_path / "a", cache=tmp_path / "cache")
    (tmp_path / "a" / "manifest.json").unlink()  # force the column-level path
    for f in cold.files:
        f.unlink()
    warm = columnhub.deliver(req, output=tmp_path / "b", cache=tmp_path / "cache")
    assert warm.manifest["cache"]["misses"] == 0
    assert warm.manifest["inference"] == {}  # no model ran: scores came from the cache
    t = uproot.open(shared_data / "nano_tt_v12.root")["Events"].arrays(["MET_pt", "Jet_pt"])
    scores = direct(registry / "evt" / "evt-1.onnx",
                    np.column_stack([ak.to_numpy(t.MET_pt) / 100,
                                     ak.to_numpy(ak.num(t.Jet_pt)) / 10]))[:, 0]
    want = ak.to_numpy(t.MET_pt)[scores > 0.5]
    assert 0 < len(want) < len(t)  # the selection really selects
    np.testing.assert_array_equal(ak.to_numpy(warm.to_awkward().MET_pt), want)


def test_changed_model_file_is_recomputed(shared_data: Path, registry: Path, tmp_path: Path) -> None:
    req = request(shared_data, registry, columns=["p_sig"], models=[{"model": "evtclass", "version": 1}])
    first = columnhub.deliver(req, output=tmp_path / "out", cache=tmp_path / "cache")
    before = ak.to_numpy(first.to_awkward().p_sig)
    make_mlp_onnx(registry / "evt" / "evt-1.onnx", n_features=2, hidden=(8,), n_outputs=2, seed=99)
    second = columnhub.deliver(req, output=tmp_path / "out", cache=tmp_path / "cache")
    assert "reused_result" not in second.manifest["cache"]
    assert second.manifest["cache"]["misses"] > 0
    after = ak.to_numpy(second.to_awkward().p_sig)
    assert not np.allclose(before, after)
    t = uproot.open(shared_data / "nano_tt_v12.root")["Events"].arrays(["MET_pt", "Jet_pt"])
    x = np.column_stack([ak.to_numpy(t.MET_pt) / 100, ak.to_numpy(ak.num(t.Jet_pt)) / 10])
    np.testing.assert_allclose(after, direct(registry / "evt" / "evt-1.onnx", x)[:, 0], rtol=1e-5)


def test_xgboost_model_column(shared_data: Path, tmp_path: Path) -> None:
    import xgboost

    root = tmp_path / "models"
    make_xgboost_json(root / "bdt.json", n_features=2, seed=5)
    write_card(root / "bdt.yaml", {"name": "bdt", "version": 1, "file": "bdt.json",
                                   "inputs": ["MET_pt", "num(Jet_pt)"], "outputs": [{"name": "bdt"}]})
    result = columnhub.deliver(
        request(shared_data, root, columns=["bdt"], models=[{"model": "bdt", "version": 1}]),
        output=tmp_path / "out", cache=False,
    )
    t = uproot.open(shared_data / "nano_tt_v12.root")["Events"].arrays(["MET_pt", "Jet_pt"])
    booster = xgboost.Booster()
    booster.load_model(str(root / "bdt.json"))
    x = np.column_stack([ak.to_numpy(t.MET_pt), ak.to_numpy(ak.num(t.Jet_pt))]).astype(np.float32)
    want = booster.predict(xgboost.DMatrix(x))
    np.testing.assert_allclose(ak.to_numpy(result.to_awkward().bdt), want, rtol=1e-5)


def test_missing_model_or_version_lists_the_registry(
    shared_data: Path, registry: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelNotFoundError, match="jettag"):
        columnhub.deliver(request(shared_data, registry, columns=["x"],
                                  models=[{"model": "jettagg", "version": 2}]), output=tmp_path / "o")
    with pytest.raises(ModelNotFoundError, match="2"):
        columnhub.deliver(request(shared_data, registry, columns=["x"],
                                  models=[{"model": "jettag", "version": 7}]), output=tmp_path / "o")
    with pytest.raises(SpecError, match="no output 'score'"):
        columnhub.deliver(request(shared_data, registry, columns=["x"],
                                  models=[{"model": "jettag", "version": 2,
                                           "outputs": {"score": "x"}}]), output=tmp_path / "o")
    with pytest.raises(SpecError, match="registry"):
        columnhub.deliver({"dataset": {"name": "tt", "files": [str(shared_data / "nano_tt_v12.root")]},
                           "columns": ["Jet_tag"], "models": [{"model": "jettag", "version": 2}]},
                          output=tmp_path / "o")


def test_cli_missing_model_exits_2(shared_data: Path, registry: Path, tmp_path: Path) -> None:
    spec = tmp_path / "r.yaml"
    spec.write_text(
        f"dataset: {{name: tt, files: [{shared_data / 'nano_tt_v12.root'}]}}\n"
        f"registry: {registry}\ncolumns: [Jet_tag]\nmodels: [{{model: jettag, version: 9}}]\n"
    )
    done = subprocess.run([str(Path(sys.executable).parent / "columnhub"), "deliver", str(spec),
                           "-o", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "jettag" in done.stderr
    assert "Traceback" not in done.stderr
