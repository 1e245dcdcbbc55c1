"""Prometheus metrics of the service (``GET /metrics``) and the figures the dashboard shows.

One :class:`ServiceMetrics` per app, with its own
:class:`prometheus_client.CollectorRegistry` (never the global one), so several
apps in one process (tests, two replicas) do not clash.

Where the figures come from:

- **the database** (every replica sees the same): requests and jobs by state,
  the progress of running jobs (events/s now), and, once per complete job, its
  manifest (events delivered, parts, bytes written, column-cache hits and
  misses, inference rows and seconds per model, whether a stored result was
  reused). A complete job is read once and remembered by id, so a scrape reads
  only the new ones. These counters are facility-wide: with several replicas,
  aggregate them with ``max``, not ``sum``.
- **this process**: the HTTP latency histogram (per route template) and the
  time-to-result histogram of the jobs it has seen complete.
- **probes, cached a few seconds**: the inference servers of the model
  registry (``is_model_ready`` on each server of each remote model card, with a
  short timeout), and the column cache's size.

:func:`install` adds the middleware and the route; the core app calls it once
(``docs/service-contract.md``).
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from columnhub._extras import require

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = [
    "ServerHealth",
    "ServiceMetrics",
    "Snapshot",
    "get_metrics",
    "install",
]

log = logging.getLogger(__name__)

#: request states, as in the contract (every state is reported, zeros included)
STATES = ("queued", "running", "complete", "failed", "cancelled")
#: buckets of the HTTP latency histogram (seconds): a fully cached request is < 0.1 s
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: buckets of the time to result (seconds)
RESULT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
#: seconds a probe result (inference servers, cache size, Dask workers) is reused
HEALTH_TTL_S = 10.0
CACHE_TTL_S = 5.0
WORKERS_TTL_S = 2.0
#: the longest a health probe of one inference server may take
PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ServerHealth:
    """One inference server of one model version, as last probed."""

    model: str
    version: str
    server: str
    protocol: str
    up: bool
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "server": self.server,
            "protocol": self.protocol,
            "up": self.up,
            "error": self.error,
        }


@dataclass
class _Done:
    """What one complete job contributed (from its manifest, else its progress)."""

    events: int = 0
    parts: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    reused: bool = False
    inference: dict[str, tuple[int, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """The service's figures at one moment (what ``/metrics`` and the dashboard show).

    Attributes:
        requests: requests by state (every state, zeros included).
        jobs: jobs (units of work, one per request hash) by state.
        parts_done: output parts of every complete job.
        events_delivered: events (rows) of every complete job.
        bytes_written: bytes of the output parts of every complete job.
        cache_hits: column-cache hits of every complete job.
        cache_misses: column-cache misses of every complete job.
        results_reused: complete jobs answered by a stored result (nothing computed).
        events_per_s: the summed rate of the running jobs now.
        running_events: events done so far by the running jobs.
        inference: per model (``name@version``) ``{"rows", "seconds", "rows_per_s"}``.
        inference_servers: the inference servers' health.
        cache_entries: entries in the column cache (``None``: unknown).
        cache_bytes: their bytes (``None``: unknown).
        cache_location: the column cache's location.
    """

    requests: dict[str, int]
    jobs: dict[str, int]
    parts_done: int
    events_delivered: int
    bytes_written: int
    cache_hits: int
    cache_misses: int
    results_reused: int
    events_per_s: float
    running_events: int
    inference: dict[str, dict[str, float]]
    inference_servers: list[ServerHealth]
    cache_entries: int | None
    cache_bytes: int | None
    cache_location: str | None

    @property
    def hit_ratio(self) -> float | None:
        """Cache hits over lookups (``None`` before any lookup)."""
        total = self.cache_hits + self.cache_misses
        return self.cache_hits / total if total else None


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, str | bytes) and value:
        try:
            loaded = json.loads(value)
        except ValueError:
            return {}
        return loaded if isinstance(loaded, dict) else {}
    return {}


def _as_time(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, str) and value:
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    return None


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _float(value: Any) -> float:
    try:
        return float(value or 0.0)
    except (TypeError, ValueError):
        return 0.0


def _from_manifest(output_dir: Any, progress: dict[str, Any]) -> _Done:
    """A complete job's figures: its manifest, else (results removed) its last progress."""
    from columnhub.errors import ColumnhubError
    from columnhub.output.manifest import read_manifest

    manifest = None
    if output_dir:
        try:
            manifest = read_manifest(Path(output_dir))
        except (ColumnhubError, OSError, ValueError):
            manifest = None
    if manifest is None:
        return _Done(
            events=_int(progress.get("events")),
            parts=_int(progress.get("parts_done")),
            bytes=_int(progress.get("bytes")),
            hits=_int(progress.get("cache_hits")),
            misses=_int(progress.get("cache_misses")),
        )
    cache = manifest.get("cache") or {}
    inference = {
        str(model): (_int(m.get("rows")), _float(m.get("seconds")))
        for model, m in (manifest.get("inference") or {}).items()
        if isinstance(m, dict)
    }
    return _Done(
        events=_int(manifest.get("events")),
        parts=len(manifest.get("parts") or []),
        bytes=sum(_int(p.get("bytes")) for p in manifest.get("parts") or []),
        hits=_int(cache.get("hits")),
        misses=_int(cache.get("misses")),
        reused=bool(cache.get("reused_result")),
        inference=inference,
    )


def _registry_servers(models: str | None) -> list[tuple[str, str, Any]]:
    """``(model, version, RemoteConfig)`` of every remote model card of the registry."""
    if not models:
        return []
    from columnhub.inference.registry import ModelRegistry

    registry = ModelRegistry(models)
    out = []
    for name, versions in registry.models().items():
        for version in versions:
            card = registry.get(name, version)
            if card.remote is not None:
                out.append((name, version, card.remote))
    return out


def _probe(remote: Any, url: str) -> tuple[bool, str | None]:
    """Is ``url`` live and ready to serve the model (Triton / KServe v2 ``is_model_ready``)?"""
    from columnhub.inference.triton import _drop_client, _health_check

    quick = remote.model_copy(update={"timeout_s": min(remote.timeout_s, PROBE_TIMEOUT_S)})
    try:
        up = bool(_health_check(quick)(url))
    except Exception as err:  # noqa: BLE001 - any failure of a probe is "down", with its reason
        return False, f"{type(err).__name__}: {err}"[:300]
    finally:
        _drop_client(quick, url)  # probe threads are short-lived: keep no client behind
    return up, None if up else "model not ready"


class ServiceMetrics:
    """The metrics of one app: its registry, the HTTP histogram, the database readers.

    Args:
        app: the FastAPI app; ``app.state.db`` (a ``Database``) and
            ``app.state.config`` (a ``ServiceConfig``) are read when figures are
            asked for, so they may be set after :func:`install`.
    """

    def __init__(self, app: FastAPI) -> None:
        prom = require("prometheus_client", what="the service's /metrics")
        self.app = app
        self.registry = prom.CollectorRegistry(auto_describe=True)
        self.http_seconds = prom.Histogram(
            "columnhub_http_request_duration_seconds",
            "Time to answer an HTTP request, by method, route template and status.",
            ["method", "route", "status"],
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )
        self.result_seconds = prom.Histogram(
            "columnhub_request_duration_seconds",
            "Time from submission to result of the complete jobs this process has seen"
            " (a fully cached request: well under 0.1 s).",
            buckets=RESULT_BUCKETS,
            registry=self.registry,
        )
        self._lock = threading.Lock()
        self._done: dict[str, _Done] = {}
        self._probe_lock = threading.Lock()
        self._health: tuple[float, list[ServerHealth]] | None = None
        self._cache: tuple[float, tuple[int | None, int | None, str | None]] | None = None
        self.registry.register(_Collector(self))

    # -- the database ------------------------------------------------------

    def _db(self) -> Any:
        return getattr(self.app.state, "db", None)

    def _config(self) -> Any:
        return getattr(self.app.state, "config", None)

    def _rows(self, sql: str, **params: Any) -> list[Any]:
        from sqlalchemy import text

        engine = self._db().engine
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params))

    def _refresh_done(self) -> None:
        """Read the manifests of the jobs that completed since the last call."""
        ids = [r[0] for r in self._rows("SELECT id FROM jobs WHERE state = 'complete'")]
        with self._lock:
            new = [i for i in ids if i not in self._done]
        for start in range(0, len(new), 500):
            batch = new[start : start + 500]
            marks = ", ".join(f":i{k}" for k in range(len(batch)))
            rows = self._rows(
                "SELECT id, output_dir, progress, created_at, finished_at FROM jobs"
                f" WHERE id IN ({marks})",
                **{f"i{k}": v for k, v in enumerate(batch)},
            )
            config = self._config()
            for job_id, output_dir, progress, created, finished in rows:
                if not output_dir and config is not None:
                    output_dir = config.result_directory(job_id)
                done = _from_manifest(output_dir, _as_dict(progress))
                with self._lock:
                    if job_id in self._done:
                        continue
                    self._done[job_id] = done
                t0, t1 = _as_time(created), _as_time(finished)
                if t0 is not None and t1 is not None:
                    self.result_seconds.observe(max((t1 - t0).total_seconds(), 0.0))

    def snapshot(self) -> Snapshot:
        """The figures now (database read; probes reused for a few seconds)."""
        db = self._db()
        if db is None:
            msg = "the app has no database (app.state.db); create it with create_app(config)"
            raise RuntimeError(msg)
        counts = {s: 0 for s in STATES}
        counts.update({str(k): int(v) for k, v in db.counts().items()})
        jobs = {s: 0 for s in STATES}
        for state, n in self._rows("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            jobs[str(state)] = int(n)
        self._refresh_done()
        running = [
            _as_dict(r[0]) for r in self._rows("SELECT progress FROM jobs WHERE state = 'running'")
        ]
        with self._lock:
            done = list(self._done.values())
        inference: dict[str, list[float]] = {}
        for d in done:
            for model, (rows, seconds) in d.inference.items():
                acc = inference.setdefault(model, [0.0, 0.0])
                acc[0] += rows
                acc[1] += seconds
        entries, size, location = self._cache_use()
        return Snapshot(
            requests=counts,
            jobs=jobs,
            parts_done=sum(d.parts for d in done),
            events_delivered=sum(d.events for d in done),
            bytes_written=sum(d.bytes for d in done),
            cache_hits=sum(d.hits for d in done),
            cache_misses=sum(d.misses for d in done),
            results_reused=sum(d.reused for d in done),
            events_per_s=sum(_float(p.get("rate_events_per_s")) for p in running),
            running_events=sum(_int(p.get("events")) for p in running),
            inference={
                m: {"rows": r, "seconds": s, "rows_per_s": r / s if s > 0 else 0.0}
                for m, (r, s) in sorted(inference.items())
            },
            inference_servers=self.inference_health(),
            cache_entries=entries,
            cache_bytes=size,
            cache_location=location,
        )

    # -- probes ------------------------------------------------------------

    def inference_health(self, *, refresh: bool = False) -> list[ServerHealth]:
        """Every server of every remote model card of the configured registry, probed.

        Probes run in parallel, each bounded by :data:`PROBE_TIMEOUT_S`, and are
        reused for :data:`HEALTH_TTL_S` seconds.
        """
        with self._probe_lock:
            now = time.monotonic()
            if not refresh and self._health is not None and now - self._health[0] < HEALTH_TTL_S:
                return self._health[1]
            config = self._config()
            try:
                servers = _registry_servers(getattr(config, "models", None))
            except Exception as err:  # noqa: BLE001 - a broken registry shows as an error row
                log.warning("cannot read the model registry for health checks: %s", err)
                servers = []
            targets = [(n, v, r, url) for n, v, r in servers for url in r.servers]
            results: list[ServerHealth] = []
            if targets:
                workers = min(16, len(targets))
                with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                    probes = pool.map(lambda t: _probe(t[2], t[3]), targets)
                    for (name, version, remote, url), (up, error) in zip(
                        targets, probes, strict=True
                    ):
                        results.append(ServerHealth(name, version, url, remote.protocol, up, error))
            self._health = (time.monotonic(), results)
            return results

    def _cache_use(self) -> tuple[int | None, int | None, str | None]:
        with self._probe_lock:
            now = time.monotonic()
            if self._cache is not None and now - self._cache[0] < CACHE_TTL_S:
                return self._cache[1]
            location = getattr(self._config(), "cache", None)
            value: tuple[int | None, int | None, str | None] = (None, None, location)
            if location:
                try:
                    from columnhub.cache import ColumnCache

                    stats = ColumnCache(location, read_only=True).stats()
                    value = (stats.entries, stats.bytes, str(stats.location))
                except Exception as err:  # noqa: BLE001 - an unreadable cache: sizes unknown
                    log.warning("cannot read the column cache %s: %s", location, err)
            self._cache = (time.monotonic(), value)
            return value

    # -- HTTP --------------------------------------------------------------

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered HTTP request."""
        self.http_seconds.labels(method, route, str(status)).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition of the registry and its content type."""
        prom = require("prometheus_client", what="the service's /metrics")
        if self._db() is not None:  # jobs completed since the last scrape: in the histogram now
            self._refresh_done()
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST


class _Collector:
    """Reads a :class:`Snapshot` at each scrape and writes it as metric families."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Any]:
        return []  # families are only known at collect time (no db at registration)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if self.metrics._db() is None:
            return
        s = self.metrics.snapshot()
        g = GaugeMetricFamily("columnhub_requests", "Requests by state.", labels=["state"])
        for state, n in s.requests.items():
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily(
            "columnhub_jobs", "Jobs (one per request hash) by state.", labels=["state"]
        )
        for state, n in s.jobs.items():
            g.add_metric([state], n)
        yield g
        for name, doc, value in (
            ("columnhub_parts_done", "Output parts of the complete jobs.", s.parts_done),
            ("columnhub_events_delivered", "Events of the complete jobs.", s.events_delivered),
            ("columnhub_bytes_written", "Output bytes of the complete jobs.", s.bytes_written),
            ("columnhub_cache_hits", "Column-cache hits of the complete jobs.", s.cache_hits),
            ("columnhub_cache_misses", "Column-cache misses of the complete jobs.", s.cache_misses),
            (
                "columnhub_results_reused",
                "Complete jobs answered by a stored result (nothing computed).",
                s.results_reused,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily(
            "columnhub_cache_hit_ratio",
            "Column-cache hits over lookups of the complete jobs (0 before any lookup).",
            value=s.hit_ratio or 0.0,
        )
        yield GaugeMetricFamily(
            "columnhub_events_per_second", "Summed rate of the running jobs.", value=s.events_per_s
        )
        yield GaugeMetricFamily(
            "columnhub_running_events",
            "Events done so far by running jobs.",
            value=s.running_events,
        )
        if s.cache_bytes is not None:
            yield GaugeMetricFamily(
                "columnhub_cache_bytes", "Bytes stored in the column cache.", value=s.cache_bytes
            )
            yield GaugeMetricFamily(
                "columnhub_cache_entries", "Entries in the column cache.", value=s.cache_entries
            )
        rows = CounterMetricFamily(
            "columnhub_inference_rows", "Rows inferred, per model.", labels=["model"]
        )
        secs = CounterMetricFamily(
            "columnhub_inference_seconds", "Seconds spent inferring, per model.", labels=["model"]
        )
        rate = GaugeMetricFamily(
            "columnhub_inference_rows_per_second",
            "Rows per second of inference over the complete jobs, per model.",
            labels=["model"],
        )
        for model, m in s.inference.items():
            rows.add_metric([model], m["rows"])
            secs.add_metric([model], m["seconds"])
            rate.add_metric([model], m["rows_per_s"])
        yield rows
        yield secs
        yield rate
        up = GaugeMetricFamily(
            "columnhub_inference_server_up",
            "1 when the inference server is live and serves the model version.",
            labels=["model", "version", "server", "protocol"],
        )
        for h in s.inference_servers:
            up.add_metric([h.model, h.version, h.server, h.protocol], 1.0 if h.up else 0.0)
        yield up


def _route_template(scope: dict[str, Any]) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None) or getattr(route, "path_format", None)
    return str(path) if path else "<unmatched>"


class _TimingMiddleware:
    """Pure ASGI middleware: the HTTP latency histogram, labelled by route template."""

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_http(
                scope.get("method", "GET"),
                _route_template(scope),
                status[0],
                time.perf_counter() - t0,
            )


def get_metrics(app: FastAPI) -> ServiceMetrics:
    """The app's :class:`ServiceMetrics` (installed by :func:`install`).

    Raises:
        RuntimeError: :func:`install` was not called on this app.
    """
    metrics = getattr(app.state, "metrics", None)
    if not isinstance(metrics, ServiceMetrics):
        msg = "metrics are not installed on this app; call columnhub.service.metrics.install(app)"
        raise RuntimeError(msg)  # noqa: TRY004 - a set-up mistake, not a bad argument type
    return metrics


def install(app: FastAPI) -> ServiceMetrics:
    """Add ``GET /metrics`` and the HTTP latency middleware to ``app`` (once).

    ``/metrics`` needs no token (Prometheus scrapes it; it shows counts, never
    a user's request or data). Call before the app starts serving.

    Returns:
        The app's metrics (also ``app.state.metrics``).
    """
    existing = getattr(app.state, "metrics", None)
    if isinstance(existing, ServiceMetrics):
        return existing
    from fastapi import Response

    metrics = ServiceMetrics(app)
    app.state.metrics = metrics
    app.add_middleware(_TimingMiddleware, metrics=metrics)

    @app.get("/metrics", response_class=Response, response_model=None, tags=["operations"])
    def prometheus_metrics() -> Any:
        """Prometheus text exposition of the service's metrics (no token needed)."""
        body, content_type = metrics.exposition()
        return Response(content=body, media_type=content_type)

    return metrics
