"""Local XGBoost backend: boosters (JSON/UBJ files) cached per process, keyed by file hash."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from columnhub.errors import ModelError, ModelInputError
from columnhub.inference._outputs import select_outputs
from columnhub.inference.registry import ModelCard

if TYPE_CHECKING:
    from columnhub.inference.metrics import InferenceMetrics

__all__ = ["booster_for", "clear_boosters", "run_xgboost"]

_lock = threading.Lock()
_boosters: dict[str, Any] = {}


def _xgboost() -> Any:
    from columnhub._extras import require

    return require("xgboost", what="XGBoost models")


def booster_for(card: ModelCard) -> Any:
    """The process's booster for the card's model file (loaded once)."""
    key = card.file_sha256 or str(card.model_path())
    booster = _boosters.get(key)
    if booster is not None:
        return booster
    with _lock:
        booster = _boosters.get(key)
        if booster is None:
            xgb = _xgboost()
            booster = xgb.Booster()
            try:
                booster.load_model(str(card.model_path()))
            except xgb.core.XGBoostError as err:
                msg = (
                    f"cannot load XGBoost model {str(card.model_path())!r} of {card.name!r}: {err}"
                )
                raise ModelError(msg) from err
            _boosters[key] = booster
    return booster


def clear_boosters() -> None:
    """Forget every cached booster."""
    with _lock:
        _boosters.clear()


def run_xgboost(
    card: ModelCard,
    matrix: np.ndarray,
    *,
    metrics: InferenceMetrics | None = None,
) -> dict[str, np.ndarray]:
    """Run the card's XGBoost model on a ``(n_rows, n_features)`` float32 matrix.

    Returns:
        One 1-D array per card output (``index`` picks a class of a multi-class model).

    Raises:
        ModelInputError: the model expects another number of features.
    """
    booster = booster_for(card)
    n_features = booster.num_features()
    if n_features != matrix.shape[1]:
        msg = (
            f"model {card.name!r} version {card.version!r} takes {n_features} features, but the "
            f"card lists {matrix.shape[1]} inputs ({', '.join(card.inputs)}); fix the card's inputs"
        )
        raise ModelInputError(msg)
    t0 = time.perf_counter()
    if matrix.shape[0] == 0:
        n_groups = max(1, int(booster.attr("num_class") or 0))
        config_classes = _num_class(booster)
        shape = (
            (0,) if config_classes <= 1 and n_groups <= 1 else (0, max(n_groups, config_classes))
        )
        values = np.zeros(shape, dtype=np.float32)
    else:
        values = np.asarray(booster.inplace_predict(matrix, validate_features=False))
    if metrics is not None:
        metrics.record_batch(
            f"{card.name}@{card.version}", rows=matrix.shape[0], latency_s=time.perf_counter() - t0
        )
    return select_outputs(card, {"predictions": values}, n_rows=matrix.shape[0])


def _num_class(booster: Any) -> int:
    import json

    config = json.loads(booster.save_config())
    try:
        return int(config["learner"]["learner_model_param"]["num_class"])
    except (KeyError, ValueError):
        return 0
