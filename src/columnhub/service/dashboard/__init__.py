"""The dashboard: a page at ``/`` and the JSON it polls, ``GET /api/v1/overview``.

No build step: the page is HTML rendered here (with the current figures when
the caller is known) and one small vanilla-JS file (``static/dashboard.js``,
served by the app itself: nothing comes from a CDN) that polls the overview
every second and redraws the figures. The JS only ever sets ``textContent``,
so a request title cannot inject markup.

The overview (scope ``read``) holds the request counts by state (all users),
the caller's most recent requests with their progress, throughput, cache use
and hit ratio, the Dask workers when a scheduler is configured, and the
inference servers' health. Its figures are :class:`~columnhub.service.metrics.Snapshot`
(the same as ``/metrics``) so the two never disagree.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import json
import threading
import time
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request

from columnhub.service.metrics import get_metrics
from columnhub.service.metrics import install as install_metrics

__all__ = ["RECENT", "install", "overview"]

#: how many of the caller's requests the overview lists (newest first)
RECENT = 50
_WORKERS_TTL_S = 2.0
_STATES = ("queued", "running", "complete", "failed", "cancelled")


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


async def _identity(address: str) -> dict[str, Any]:
    from distributed.core import rpc

    scheduler = rpc(address, timeout=3)  # type: ignore[no-untyped-call]
    try:
        info: dict[str, Any] = await scheduler.identity()
    finally:
        await scheduler.close_rpc()  # type: ignore[no-untyped-call]
    return info


def _executing(metrics: dict[str, Any]) -> int:
    value = metrics.get("executing")
    if value is None:
        value = (metrics.get("task_counts") or {}).get("executing", 0)
    return int(value or 0)


class _Workers:
    """The Dask workers of the configured scheduler (its ``identity``, cached a moment).

    One short connection per look (no ``Client`` held open: nothing to close
    at shutdown, no reconnection attempts when the scheduler goes away).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[float, str, dict[str, Any]] | None = None

    def get(self, address: str | None, mode: str) -> dict[str, Any]:
        if address is None:
            return {"scheduler": None, "mode": mode, "workers": [], "error": None}
        with self._lock:
            now = time.monotonic()
            last = self._last
            if last is not None and last[1] == address and now - last[0] < _WORKERS_TTL_S:
                return last[2]
            try:
                from columnhub._extras import require

                require("distributed", what="the dashboard's Dask workers")
                info = asyncio.run(_identity(address))
                workers = [
                    {
                        "address": addr,
                        "name": str(w.get("name", addr)),
                        "nthreads": int(w.get("nthreads", 0)),
                        "memory_limit": int(w.get("memory_limit", 0) or 0),
                        "memory": int((w.get("metrics") or {}).get("memory", 0) or 0),
                        "executing": _executing(w.get("metrics") or {}),
                    }
                    for addr, w in sorted((info.get("workers") or {}).items())
                ]
                value = {"scheduler": address, "mode": mode, "workers": workers, "error": None}
            except Exception as err:  # noqa: BLE001 - an unreachable scheduler shows as an error
                value = {
                    "scheduler": address,
                    "mode": mode,
                    "workers": [],
                    "error": f"{type(err).__name__}: {err}"[:300],
                }
            self._last = (time.monotonic(), address, value)
            return value


def _scheduler(app: FastAPI) -> tuple[str | None, str]:
    """The scheduler address to show, and the executor mode."""
    address = getattr(app.state, "scheduler_address", None) or getattr(
        getattr(getattr(app.state, "services", None), "cluster", None), "scheduler_address", None
    )
    configured = getattr(getattr(app.state, "config", None), "scheduler", None)
    if address:
        return str(address), "dask"
    if configured in (None, ""):
        return None, "threads"
    if configured == "local":
        return None, "local"
    return str(configured), "dask"


def _newest_first(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(requests, key=lambda r: str(r.get("created_at") or ""), reverse=True)


def overview(app: FastAPI, user: str, *, everyone: bool = False) -> dict[str, Any]:
    """The dashboard's figures for ``user`` (the JSON of ``GET /api/v1/overview``).

    Args:
        app: the service app (with :func:`install` called).
        user: whose recent requests are listed (the counts are over all users).
        everyone: list every user's requests (an admin's view).
    """
    snap = get_metrics(app).snapshot()
    db = app.state.db
    views, total = db.list(None if everyone else user, page=1, per_page=RECENT)
    address, mode = _scheduler(app)
    ratio = snap.hit_ratio
    return {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        "user": user,
        "counts": snap.requests,
        "jobs": snap.jobs,
        "total": total,
        "requests": _newest_first([v.to_json() for v in views]),
        "throughput": {
            "events_per_s": snap.events_per_s,
            "running_events": snap.running_events,
            "events_delivered": snap.events_delivered,
            "parts_done": snap.parts_done,
            "bytes_written": snap.bytes_written,
        },
        "cache": {
            "hits": snap.cache_hits,
            "misses": snap.cache_misses,
            "hit_ratio": ratio,
            "results_reused": snap.results_reused,
            "entries": snap.cache_entries,
            "bytes": snap.cache_bytes,
            "location": snap.cache_location,
        },
        "workers": app.state.dashboard_workers.get(address, mode),
        "inference": {
            "servers": [h.to_json() for h in snap.inference_servers],
            "models": snap.inference,
        },
    }


# -- server-side rendering ---------------------------------------------------


def _fmt_int(n: Any) -> str:
    return f"{int(n):,}" if isinstance(n, int | float) else "-"


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover - the loop returns


def _fmt_ratio(r: Any) -> str:
    return f"{100 * r:.1f} %" if isinstance(r, int | float) else "-"


def _request_row(r: dict[str, Any]) -> str:
    e = html.escape
    p = r.get("progress") or {}
    done, total = int(p.get("parts_done") or 0), int(p.get("parts_total") or 0)
    return (
        f'<tr data-request-id="{e(str(r["id"]))}" data-status="{e(str(r["status"]))}">'
        f'<td class="id" title="{e(str(r["id"]))}">{e(str(r["id"])[:12])}</td>'
        f'<td class="title">{e(str(r.get("title") or ""))}</td>'
        f'<td class="status">{e(str(r["status"]))}</td>'
        f'<td class="progress"><progress max="{max(total, 1)}" value="{done}"></progress>'
        f' <span class="parts">{done}/{total}</span></td>'
        f'<td class="events num">{_fmt_int(p.get("events") or 0)}</td>'
        f'<td class="rate num">{_fmt_int(p.get("rate_events_per_s") or 0)}</td>'
        f'<td class="cache-hits num">{_fmt_int(p.get("cache_hits") or 0)}</td>'
        f'<td class="created">{e(str(r.get("created_at") or ""))}</td></tr>'
    )


def render_page(data: dict[str, Any] | None) -> str:
    """The page's HTML; ``data`` (an overview) fills the figures when known."""
    e = html.escape
    d = data or {}
    counts = d.get("counts") or {}
    tp = d.get("throughput") or {}
    cache = d.get("cache") or {}
    state_cells = "".join(
        f'<div class="tile"><span class="count" data-state="{s}">'
        f'{_fmt_int(counts.get(s, 0)) if data else "-"}</span><span class="label">{s}</span></div>'
        for s in _STATES
    )
    rows = "".join(_request_row(r) for r in d.get("requests") or [])
    # raw text inside <script>: no entity decoding, so escape "<" the JSON way instead
    initial = json.dumps(data).replace("<", "\\u003c") if data else ""
    return _PAGE.format(
        states=state_cells,
        rows=rows,
        events_per_s=_fmt_int(tp.get("events_per_s")) if data else "-",
        events_delivered=_fmt_int(tp.get("events_delivered")) if data else "-",
        parts_done=_fmt_int(tp.get("parts_done")) if data else "-",
        bytes_written=_fmt_bytes(tp.get("bytes_written")) if data else "-",
        hit_ratio=_fmt_ratio(cache.get("hit_ratio")),
        hits=_fmt_int(cache.get("hits")) if data else "-",
        misses=_fmt_int(cache.get("misses")) if data else "-",
        cache_bytes=_fmt_bytes(cache.get("bytes")),
        user=e(str(d.get("user", ""))),
        initial=initial,
        login_hidden="hidden" if data else "",
    )


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>columnhub</title>
<link rel="stylesheet" href="/dashboard/static/dashboard.css">
</head>
<body>
<header>
  <h1>columnhub</h1>
  <span id="user">{user}</span>
  <span id="updated" class="muted"></span>
</header>
<div id="error" class="error" hidden></div>
<form id="login" class="login" {login_hidden}>
  <label>Bearer token <input id="token" type="password" autocomplete="off"></label>
  <button type="submit">Show</button>
  <span class="muted">kept in this tab only (sessionStorage)</span>
</form>
<section id="states" class="tiles">{states}</section>
<section class="panels">
  <div class="panel" id="throughput">
    <h2>Throughput</h2>
    <dl>
      <dt>events/s now</dt><dd id="events-per-s">{events_per_s}</dd>
      <dt>events delivered</dt><dd id="events-delivered">{events_delivered}</dd>
      <dt>parts written</dt><dd id="parts-done">{parts_done}</dd>
      <dt>bytes written</dt><dd id="bytes-written">{bytes_written}</dd>
    </dl>
  </div>
  <div class="panel" id="cache">
    <h2>Column cache</h2>
    <dl>
      <dt>hit ratio</dt><dd id="hit-ratio">{hit_ratio}</dd>
      <dt>hits</dt><dd id="cache-hits">{hits}</dd>
      <dt>misses</dt><dd id="cache-misses">{misses}</dd>
      <dt>stored</dt><dd id="cache-bytes">{cache_bytes}</dd>
    </dl>
  </div>
  <div class="panel" id="workers">
    <h2>Workers</h2>
    <p id="scheduler" class="muted"></p>
    <table><thead><tr><th>worker</th><th>threads</th><th>executing</th><th>memory</th></tr></thead>
    <tbody id="worker-rows"></tbody></table>
  </div>
  <div class="panel" id="inference">
    <h2>Inference servers</h2>
    <table><thead><tr><th>model</th><th>server</th><th>health</th></tr></thead>
    <tbody id="inference-rows"></tbody></table>
    <p id="inference-rate" class="muted"></p>
  </div>
</section>
<section>
  <h2>Requests</h2>
  <table id="requests">
    <thead><tr><th>id</th><th>title</th><th>status</th><th>progress (parts)</th>
    <th>events read</th><th>events/s</th><th>cache hits</th><th>submitted</th></tr></thead>
    <tbody id="request-rows">{rows}</tbody>
  </table>
</section>
<script id="initial" type="application/json">{initial}</script>
<script src="/dashboard/static/dashboard.js"></script>
</body>
</html>
"""


def install(app: FastAPI) -> None:
    """Add the page at ``/``, its static files and ``GET /api/v1/overview`` to ``app``.

    Installs the metrics too when :func:`columnhub.service.metrics.install` was
    not called yet. The overview needs scope ``read`` (the page asks for a
    token when the service has auth on); the page itself holds no data unless
    the caller is known.
    """
    from fastapi import Depends, Response
    from fastapi.responses import HTMLResponse

    from columnhub.errors import ColumnhubError
    from columnhub.service.auth import principal

    install_metrics(app)
    app.state.dashboard_workers = _Workers()
    files = {
        "dashboard.js": ("text/javascript; charset=utf-8", _static("dashboard.js")),
        "dashboard.css": ("text/css; charset=utf-8", _static("dashboard.css")),
    }

    @app.get("/api/v1/overview", tags=["dashboard"])
    def api_overview(user: Any = Depends(principal("read"))) -> dict[str, Any]:  # noqa: B008
        """The dashboard's figures: counts, your recent requests, throughput, cache, workers."""
        return overview(app, user.user, everyone="admin" in user.scopes)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request) -> Any:
        data = None
        authenticator = getattr(app.state, "authenticator", None)
        if authenticator is not None:
            try:  # auth off (embedded start): the caller is known without a token
                who = authenticator.authenticate(request.headers.get("authorization"))
            except ColumnhubError:
                who = None
            if who is not None and "read" in who.scopes:
                data = overview(app, who.user, everyone="admin" in who.scopes)
        return HTMLResponse(render_page(data), headers={"Cache-Control": "no-store"})

    @app.get("/dashboard/static/{name}", include_in_schema=False, response_model=None)
    def static(name: str) -> Any:
        found = files.get(name)
        if found is None:
            return Response(status_code=404)
        media, body = found
        return Response(body, media_type=media, headers={"Cache-Control": "no-cache"})
