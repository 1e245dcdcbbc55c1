"""ML inference columns: model cards, local (ONNX Runtime, XGBoost) and remote (Triton) backends."""

from __future__ import annotations

from columnhub.inference.metrics import InferenceMetrics
from columnhub.inference.predict import BACKENDS, predict, run_matrix
from columnhub.inference.registry import (
    ModelCard,
    ModelOutput,
    ModelRegistry,
    RemoteConfig,
    load_card,
)

__all__ = [
    "BACKENDS",
    "InferenceMetrics",
    "ModelCard",
    "ModelOutput",
    "ModelRegistry",
    "RemoteConfig",
    "load_card",
    "predict",
    "run_matrix",
]
