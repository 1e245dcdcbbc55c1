"""The executor's entry point: ``predict(card, inputs)`` -> one array per output column."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import awkward as ak
import numpy as np

from columnhub.errors import InferenceServerError, ModelError
from columnhub.inference.batching import Layout, flatten_inputs, restore_output
from columnhub.inference.metrics import InferenceMetrics
from columnhub.inference.registry import ModelCard

__all__ = ["BACKENDS", "predict", "run_matrix"]

#: Accepted values of ``predict(..., backend=...)``.
BACKENDS = ("auto", "local", "remote")


def _run_local(card: ModelCard, matrix: np.ndarray, metrics: InferenceMetrics | None) -> Any:
    if card.model_format == "xgboost":
        from columnhub.inference.xgboost import run_xgboost

        return run_xgboost(card, matrix, metrics=metrics)
    from columnhub.inference.onnx import run_onnx

    return run_onnx(card, matrix, metrics=metrics)


def run_matrix(
    card: ModelCard,
    matrix: np.ndarray,
    *,
    backend: Literal["auto", "local", "remote"] = "auto",
    metrics: InferenceMetrics | None = None,
) -> tuple[dict[str, np.ndarray], str]:
    """Run a model on an already stacked ``(n_rows, n_features)`` float32 matrix.

    Returns:
        ``(outputs, used)``: one 1-D array per card output and the backend that
        computed them (``local``, ``remote`` or ``fallback``).

    Raises:
        ModelError: unknown backend, or ``remote`` for a card without servers.
        InferenceServerError: no server answered and the card has no fallback.
    """
    if backend not in BACKENDS:
        msg = f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}"
        raise ModelError(msg)
    if backend == "remote" and card.remote is None:
        msg = (
            f"model {card.name!r} version {card.version!r} has no 'remote' section in its card; "
            "add servers to the card or use backend='local'"
        )
        raise ModelError(msg)
    if backend == "local" or card.remote is None:
        return _run_local(card, matrix, metrics), "local"
    from columnhub.inference.triton import run_remote

    try:
        return run_remote(card, matrix, metrics=metrics), "remote"
    except InferenceServerError:
        if not card.remote.fallback_local:
            raise
        if metrics is not None:
            metrics.record_fallback(f"{card.name}@{card.version}")
        return _run_local(card, matrix, metrics), "fallback"


def predict(
    card: ModelCard,
    inputs: Sequence[ak.Array | np.ndarray],
    *,
    backend: Literal["auto", "local", "remote"] = "auto",
    metrics: InferenceMetrics | None = None,
) -> dict[str, ak.Array]:
    """Run a model on one chunk's input columns.

    Args:
        card: the model (from :meth:`ModelRegistry.get`).
        inputs: the evaluated input expressions, one array per ``card.inputs``,
            in that order: 1-D per event for ``event`` granularity, jagged with
            equal list lengths for ``object`` granularity.
        backend: ``local`` (ONNX Runtime / XGBoost in this process), ``remote``
            (the card's Triton/KServe servers) or ``auto`` (remote when the card
            has servers, else local).
        metrics: filled with rows, batches, latencies, retries and failovers.

    Returns:
        One array per output name: per event, or jagged exactly like the inputs.

    Raises:
        ModelInputError: inputs of the wrong number, type or shape (names the input).
        InferenceServerError: no server answered and the card has no local fallback.
    """
    key = f"{card.name}@{card.version}"
    t0 = time.perf_counter()
    try:
        matrix, layout = flatten_inputs(card.inputs, inputs, granularity=card.granularity)
        values, used = run_matrix(card, matrix, backend=backend, metrics=metrics)
        result = _restore(card, values, layout)
    except ModelError:
        if metrics is not None:
            metrics.record_error(key)
        raise
    if metrics is not None:
        metrics.record_call(
            key,
            rows=layout.n_rows,
            events=layout.n_events,
            seconds=time.perf_counter() - t0,
            backend=used,
        )
    return result


def _restore(card: ModelCard, values: dict[str, np.ndarray], layout: Layout) -> dict[str, ak.Array]:
    return {o.name: restore_output(values[o.name], layout, dtype=o.type) for o in card.outputs}
