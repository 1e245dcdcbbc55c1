"""Inference metrics per model: rows, batches, throughput, latency, retries, failovers.

An :class:`InferenceMetrics` object is filled by :func:`~columnhub.inference.predict`
(thread-safe) and read with :meth:`InferenceMetrics.snapshot`, a plain dict
the executor puts in the manifest. It pickles (the lock is recreated).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["InferenceMetrics", "ModelMetrics"]

_MAX_LATENCIES = 100_000


@dataclass
class ModelMetrics:
    """Counters of one model (``name@version``)."""

    rows: int = 0
    events: int = 0
    calls: int = 0
    batches: int = 0
    seconds: float = 0.0
    retries: int = 0
    failovers: int = 0
    fallbacks: int = 0
    errors: int = 0
    backends: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        percentiles = (
            {f"p{q}": float(np.percentile(lat, q)) for q in (50, 90, 99)}
            if len(lat)
            else {"p50": None, "p90": None, "p99": None}
        )
        return {
            "rows": self.rows,
            "events": self.events,
            "calls": self.calls,
            "batches": self.batches,
            "seconds": self.seconds,
            "rows_per_s": self.rows / self.seconds if self.seconds > 0 else None,
            "batch_latency_ms": {**percentiles, "max": float(lat.max()) if len(lat) else None},
            "retries": self.retries,
            "failovers": self.failovers,
            "fallbacks": self.fallbacks,
            "errors": self.errors,
            "backends": dict(self.backends),
        }


class InferenceMetrics:
    """Thread-safe metrics of every model a request ran.

    >>> m = InferenceMetrics()
    >>> m.record_batch("tagger@1", rows=10, latency_s=0.002)
    >>> m.snapshot()["tagger@1"]["batches"]
    1
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, ModelMetrics] = {}

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            return {"_models": self._models}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._lock = threading.Lock()
        self._models = state["_models"]

    def _get(self, model: str) -> ModelMetrics:
        m = self._models.get(model)
        if m is None:
            m = self._models[model] = ModelMetrics()
        return m

    def record_call(
        self, model: str, *, rows: int, events: int, seconds: float, backend: str
    ) -> None:
        """Count one ``predict`` call (a chunk) and its wall time."""
        with self._lock:
            m = self._get(model)
            m.calls += 1
            m.rows += rows
            m.events += events
            m.seconds += seconds
            m.backends[backend] = m.backends.get(backend, 0) + 1

    def record_batch(self, model: str, *, rows: int, latency_s: float) -> None:
        """Count one batch (one request or one local run) and its latency."""
        with self._lock:
            m = self._get(model)
            m.batches += 1
            if len(m.latencies_ms) < _MAX_LATENCIES:
                m.latencies_ms.append(latency_s * 1e3)

    def record_retry(self, model: str, *, failover: bool) -> None:
        """Count a retried batch; ``failover`` when it moved to another server."""
        with self._lock:
            m = self._get(model)
            m.retries += 1
            if failover:
                m.failovers += 1

    def record_fallback(self, model: str) -> None:
        """Count a chunk computed locally because no server answered."""
        with self._lock:
            self._get(model).fallbacks += 1

    def record_error(self, model: str) -> None:
        """Count a chunk that failed."""
        with self._lock:
            self._get(model).errors += 1

    def merge(self, other: InferenceMetrics) -> None:
        """Add another object's counts (e.g. from a worker) into this one."""
        with other._lock:
            items = [(k, v) for k, v in other._models.items()]
        with self._lock:
            for name, o in items:
                m = self._get(name)
                for attr in (
                    "rows",
                    "events",
                    "calls",
                    "batches",
                    "seconds",
                    "retries",
                    "failovers",
                    "fallbacks",
                    "errors",
                ):
                    setattr(m, attr, getattr(m, attr) + getattr(o, attr))
                for b, n in o.backends.items():
                    m.backends[b] = m.backends.get(b, 0) + n
                room = _MAX_LATENCIES - len(m.latencies_ms)
                m.latencies_ms.extend(o.latencies_ms[:room])

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per model (``name@version``), a JSON-ready summary."""
        with self._lock:
            return {name: m.snapshot() for name, m in sorted(self._models.items())}
