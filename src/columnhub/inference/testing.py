"""Small models for tests, examples and benchmarks, built at run time (no committed binaries).

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> path = make_mlp_onnx(d / "m.onnx", n_features=3, hidden=(4,), seed=1)
>>> path.name
'm.onnx'
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = ["make_mlp_onnx", "make_xgboost_json", "write_card"]


def make_mlp_onnx(
    path: str | os.PathLike[str],
    *,
    n_features: int,
    hidden: Sequence[int] = (64, 64),
    n_outputs: int = 1,
    seed: int = 0,
    input_name: str = "features",
    output_name: str = "score",
    opset: int = 17,
) -> Path:
    """Write an ONNX multilayer perceptron: ReLU hidden layers, sigmoid output.

    The input is ``(batch, n_features)`` float32 with a dynamic batch axis; the
    output ``(batch, n_outputs)`` float32.

    Returns:
        The written path.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    sizes = [n_features, *hidden, n_outputs]
    nodes: list[Any] = []
    inits: list[Any] = []
    current = input_name
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        w = (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32)
        bias = (rng.normal(size=(b,)) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(bias, f"B{i}")]
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"B{i}"], [f"z{i}"]))
        last = i == len(sizes) - 2
        out = output_name if last else f"h{i}"
        nodes.append(helper.make_node("Sigmoid" if last else "Relu", [f"z{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", n_features])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", n_outputs])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    out_path = Path(path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
    return out_path


def make_xgboost_json(
    path: str | os.PathLike[str],
    *,
    n_features: int,
    n_rows: int = 2000,
    n_rounds: int = 20,
    seed: int = 0,
) -> Path:
    """Train a small binary XGBoost classifier on random data and save it as JSON."""
    import xgboost as xgb

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_rows, n_features)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, -1] ** 2 + rng.normal(scale=0.5, size=n_rows) > 0.5).astype(np.int32)
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 3, "nthread": 1, "seed": seed},
        xgb.DMatrix(x, label=y),
        num_boost_round=n_rounds,
    )
    out_path = Path(path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(out_path))
    return out_path


def write_card(path: str | os.PathLike[str], card: dict[str, Any]) -> Path:
    """Write a model card (a plain dict) as YAML."""
    out_path = Path(path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(yaml.safe_dump(card, sort_keys=False))
    return out_path
