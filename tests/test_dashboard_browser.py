"""The dashboard in a real browser: Debian's chromium driven by Playwright, headless.

``columnhub serve`` runs as a subprocess on a loopback port; the test submits a
request over HTTP, watches its row on the page go to ``complete`` (every status
the row shows is recorded by a MutationObserver in the page), checks the
page's figures against ``/api/v1/requests`` and a direct uproot read, and saves
a screenshot under ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uproot
import yaml

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = [pytest.mark.browser, pytest.mark.service]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[1]
ORDER = ["queued", "running", "complete"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _columnhub() -> list[str]:
    exe = Path(sys.executable).parent / "columnhub"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "columnhub.cli.main"]


@contextlib.contextmanager
def _serve(tmp_path: Path, shared_data: Path, *extra: str) -> Iterator[str]:
    """``columnhub serve`` on a free loopback port; its URL."""
    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *_columnhub(),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--state-dir",
                str(tmp_path / "state"),
                "--cache",
                str(tmp_path / "cache"),
                "--data-root",
                str(shared_data),
                "--log-level",
                "warning",
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"columnhub serve exited:\n{log.read_text()}"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"service not ready:\n{log.read_text()}"
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def service(tmp_path: Path, shared_data: Path) -> Iterator[str]:
    """``columnhub serve`` with auth off (loopback only); its URL."""
    with _serve(tmp_path, shared_data) as url:
        yield url


@contextlib.contextmanager
def _browser(tmp_path: Path) -> Iterator[Any]:
    """Headless chromium (Debian's) with a fresh user-data dir."""
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


def _reference(path: Path) -> tuple[int, int]:
    """Independent reference (uproot + numpy): events in the file, events with >= 5 jets."""
    with uproot.open(path) as f:
        n_jet = f["Events"]["nJet"].array(library="np")
    return len(n_jet), int(np.count_nonzero(n_jet >= 5))


_WATCH = """(rid) => {
  window.__seen = [];
  const note = () => {
    const row = document.querySelector(`tr[data-request-id="${rid}"]`);
    if (!row) { return; }
    const s = row.querySelector(".status").textContent;
    const parts = row.querySelector(".parts").textContent;
    const last = window.__seen[window.__seen.length - 1];
    if (!last || last[0] !== s || last[1] !== parts) { window.__seen.push([s, parts]); }
  };
  new MutationObserver(note).observe(document.body, {subtree: true, childList: true,
                                                     characterData: true});
  note();
}"""


def test_dashboard_shows_a_request_completing(
    service: str, tmp_path: Path, shared_data: Path, record_property: Any
) -> None:
    spec = {
        "dataset": {"name": "ttbar", "files": [str(shared_data / "nano_tt_v12.root")]},
        "columns": ["nJet", "Jet_pt", "MET_pt"],
        "where": "nJet >= 5",
        "chunk_size": 40,
        "output": {"target_part_bytes": 1},  # a part per chunk: progress in several steps
    }
    shot = tmp_path / "dashboard.png"
    with _browser(tmp_path) as context:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(service + "/")
        assert page.title() == "columnhub"
        page.wait_for_function("document.querySelector('#updated').textContent !== ''")

        resp = httpx.post(
            f"{service}/api/v1/requests",
            json=spec,
            params={"title": "browser <b>test</b>"},
            timeout=30,
        )
        assert resp.status_code == 202, resp.text
        rid = resp.json()["id"]
        page.wait_for_selector(f'tr[data-request-id="{rid}"]', timeout=30_000)
        page.evaluate(_WATCH, rid)
        row = page.locator(f'tr[data-request-id="{rid}"]')
        page.wait_for_selector(
            f'tr[data-request-id="{rid}"][data-status="complete"]', timeout=120_000
        )
        # one more poll, so the figures outside the row are drawn from the same state
        stamp = page.text_content("#updated")
        page.wait_for_function(f"document.querySelector('#updated').textContent !== {stamp!r}")
        page.screenshot(path=str(shot), full_page=True)
        record_property("screenshot", str(shot))
        print(f"dashboard screenshot: {shot}")

        seen = page.evaluate("window.__seen")
        listed = httpx.get(f"{service}/api/v1/requests", timeout=30).json()["requests"]
        status = httpx.get(f"{service}/api/v1/requests/{rid}", timeout=30).json()
        texts: dict[str, Any] = {
            "status": row.locator(".status").text_content(),
            "parts": row.locator(".parts").text_content(),
            "events": row.locator(".events").text_content(),
            "title": row.locator(".title").text_content(),
            "bar": row.locator("progress").evaluate("b => [b.value, b.max]"),
            "bar_visible": row.locator("progress").is_visible(),
            "complete": page.text_content('.count[data-state="complete"]'),
            "running": page.text_content('.count[data-state="running"]'),
            "delivered": page.text_content("#events-delivered"),
        }

    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert errors == []
    # the row went forward only, and ended complete with every part done
    states = [s for s, _ in seen]
    assert states[-1] == "complete"
    assert [ORDER.index(s) for s in states] == sorted(ORDER.index(s) for s in states)
    progress = status["progress"]
    assert status["status"] == "complete"
    assert progress["parts_total"] > 1
    assert progress["parts_done"] == progress["parts_total"]
    # the page's numbers are the API's numbers
    assert texts["status"] == "complete"
    assert texts["parts"] == f"{progress['parts_done']}/{progress['parts_total']}"
    assert texts["bar"] == [progress["parts_done"], progress["parts_total"]]
    assert texts["bar_visible"]
    assert texts["title"] == "browser <b>test</b>"  # shown as text, never as markup
    assert int(texts["events"].replace(",", "")) == progress["events"]
    by_state = {s: sum(r["status"] == s for r in listed) for s in ORDER}
    assert int(texts["complete"]) == by_state["complete"] == 1
    assert int(texts["running"]) == by_state["running"] == 0
    assert [r["id"] for r in listed] == [rid]
    # and both are the truth (a direct uproot read): every event read, the selected delivered
    read, selected = _reference(shared_data / "nano_tt_v12.root")
    assert progress["events"] == progress["events_total"] == read
    assert int(texts["delivered"].replace(",", "")) == selected < read


def test_dashboard_with_tokens_shows_only_the_users_requests(
    tmp_path: Path, shared_data: Path, record_property: Any
) -> None:
    tokens = {"alice": "alice-secret-token", "bob": "bob-secret-token"}
    token_file = tmp_path / "tokens.yaml"
    token_file.write_text(
        yaml.safe_dump(
            {
                "tokens": {
                    hashlib.sha256(t.encode()).hexdigest(): {
                        "user": user,
                        "scopes": ["read", "submit"],
                    }
                    for user, t in tokens.items()
                }
            }
        )
    )
    spec = {
        "dataset": {"name": "dy", "files": [str(shared_data / "nano_dy.root")]},
        "columns": ["MET_pt"],
    }
    shot = tmp_path / "dashboard-alice.png"
    with _serve(tmp_path, shared_data, "--token-file", str(token_file)) as url:
        ids = {}
        for user, t in tokens.items():
            headers = {"Authorization": f"Bearer {t}"}
            resp = httpx.post(f"{url}/api/v1/requests", json=spec, headers=headers, timeout=30)
            assert resp.status_code == 202, resp.text
            ids[user] = resp.json()["id"]
        with _browser(tmp_path) as context:
            page = context.new_page()
            page.goto(url + "/")
            # no figures without a token: the page asks for one
            page.wait_for_selector("#login:not([hidden])")
            page.wait_for_selector("#error:not([hidden])")
            assert "AuthError" in (page.text_content("#error") or "")
            assert page.locator("#request-rows tr").count() == 0
            page.fill("#token", tokens["alice"])
            page.click("#login button")
            page.wait_for_selector(f'tr[data-request-id="{ids["alice"]}"][data-status="complete"]')
            # the page's next poll is drawn from the same state as the API's answers
            stamp = page.text_content("#updated")
            page.wait_for_function(f"document.querySelector('#updated').textContent !== {stamp!r}")
            page.screenshot(path=str(shot), full_page=True)
            record_property("screenshot", str(shot))
            print(f"dashboard screenshot: {shot}")
            shown = page.eval_on_selector_all(
                "#request-rows tr", "rows => rows.map(r => r.dataset.requestId)"
            )
            user = page.text_content("#user")
            login_hidden = page.eval_on_selector("#login", "f => f.hidden")
            complete = page.text_content('.count[data-state="complete"]')
        alice = {"Authorization": f"Bearer {tokens['alice']}"}
        listed = httpx.get(f"{url}/api/v1/requests", headers=alice, timeout=30).json()
        bob_status = httpx.get(
            f"{url}/api/v1/requests/{ids['bob']}",
            headers={"Authorization": f"Bearer {tokens['bob']}"},
            timeout=30,
        ).json()
    assert user == "alice"
    assert login_hidden is True
    assert shown == [r["id"] for r in listed["requests"]] == [ids["alice"]]  # never bob's
    # the counts are over all users: bob's identical request (the same job) is counted
    assert bob_status["status"] == "complete"
    assert bob_status["samples"][""]["job"] == listed["requests"][0]["samples"][""]["job"]
    assert int(complete or "0") == 2
