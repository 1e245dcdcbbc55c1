"""Reading ROOT files through real servers on loopback: XRootD and HTTP with ranges.

Every remote read is compared with a direct local uproot read of the same
file. The HTTP test server itself is checked against byte slicing, so a
broken range implementation cannot hide behind a lenient client.
"""

from __future__ import annotations

import email.parser
import email.policy
import http.client
import re
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
from hypothesis import given, settings
from hypothesis import strategies as st

import columnhub
from columnhub.errors import SourceTimeoutError

SAMPLE = "nano_dy.root"
BRANCHES = ["run", "event", "Jet_pt"]


def _local_arrays(path: Path) -> dict[str, ak.Array]:
    with uproot.open(path) as file:
        tree = file["Events"]
        return {name: tree[name].array(library="ak") for name in BRANCHES}


def _remote_arrays(url: str, **options: object) -> tuple[type, dict[str, ak.Array]]:
    with uproot.open(url, **options) as file:
        # all branches in one call: the source is asked for several ranges at once
        arrays = file["Events"].arrays(BRANCHES, library="ak", how=dict)
        return type(file.file.source), arrays


def _assert_same(remote: dict[str, ak.Array], local: dict[str, ak.Array]) -> None:
    assert remote.keys() == local.keys()
    for name, expected in local.items():
        got = remote[name]
        assert str(got.type) == str(expected.type), name
        assert ak.to_list(got) == ak.to_list(expected), name
    assert len(local["event"]) == 40


# ---------------------------------------------------------------------------
# the HTTP test server against byte slicing


def _get(port: int, path: str, *, method: str = "GET", range_header: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {} if range_header is None else {"Range": range_header}
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _split_multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(Content-Range, payload) of each part, parsed by the stdlib email parser."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    assert message.is_multipart()
    return [(part["Content-Range"], part.get_payload(decode=True)) for part in message.iter_parts()]


def test_http_server_whole_file_head_and_404(http_server, shared_data):
    http_server.put(shared_data / SAMPLE, name="whole.root")
    data = (shared_data / SAMPLE).read_bytes()

    status, headers, body = _get(http_server.port, "/whole.root")
    assert (status, body) == (200, data)
    assert headers["Accept-Ranges"] == "bytes"

    status, headers, body = _get(http_server.port, "/whole.root", method="HEAD")
    assert (status, body) == (200, b"")
    assert int(headers["Content-Length"]) == len(data)

    status, _, _ = _get(http_server.port, "/no-such-file.root")
    assert status == 404
    status, _, _ = _get(http_server.port, "/../../etc/passwd")
    assert status == 404


def test_http_server_single_suffix_and_unsatisfiable_ranges(http_server, shared_data):
    http_server.put(shared_data / SAMPLE, name="single.root")
    data = (shared_data / SAMPLE).read_bytes()
    size = len(data)

    status, headers, body = _get(http_server.port, "/single.root", range_header="bytes=10-19")
    assert (status, body) == (206, data[10:20])
    assert headers["Content-Range"] == f"bytes 10-19/{size}"

    status, _, body = _get(http_server.port, "/single.root", range_header="bytes=-7")
    assert (status, body) == (206, data[-7:])

    status, _, body = _get(http_server.port, "/single.root", range_header=f"bytes={size - 3}-")
    assert (status, body) == (206, data[-3:])

    status, headers, _ = _get(http_server.port, "/single.root", range_header=f"bytes={size}-")
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{size}"


@settings(max_examples=40, deadline=None)
@given(
    spans=st.lists(
        st.tuples(st.integers(0, 352_000), st.integers(1, 5_000)), min_size=1, max_size=6
    )
)
def test_http_server_ranges_match_slices(http_server, shared_data, spans):
    src = shared_data / SAMPLE
    if not (http_server.root / "ranges.root").exists():
        http_server.put(src, name="ranges.root")
    data = src.read_bytes()
    spans = [(start, min(start + length, len(data)) - 1) for start, length in spans]
    spans = [(first, last) for first, last in spans if first <= last]
    if not spans:
        return
    header = "bytes=" + ",".join(f"{first}-{last}" for first, last in spans)

    status, headers, body = _get(http_server.port, "/ranges.root", range_header=header)

    assert status == 206
    if len(spans) == 1:
        first, last = spans[0]
        assert body == data[first : last + 1]
        assert headers["Content-Range"] == f"bytes {first}-{last}/{len(data)}"
    else:
        parts = _split_multipart(headers["Content-Type"], body)
        assert [payload for _, payload in parts] == [data[a : b + 1] for a, b in spans]
        assert [rng for rng, _ in parts] == [f"bytes {a}-{b}/{len(data)}" for a, b in spans]


# ---------------------------------------------------------------------------
# uproot through the servers


@pytest.mark.xrootd
@pytest.mark.parametrize(
    "handler",
    [None, uproot.source.fsspec.FSSpecSource, uproot.source.xrootd.XRootDSource],
    ids=["default", "fsspec", "pyxrootd"],
)
def test_uproot_over_xrootd_matches_local(xrootd_server, shared_data, handler):
    url = xrootd_server.put(shared_data / SAMPLE)
    assert url == f"root://127.0.0.1:{xrootd_server.port}//{SAMPLE}"

    source_type, remote = _remote_arrays(url, handler=handler, timeout=30)

    # fsspec-xrootd is uproot's default handler for root:// URLs
    assert source_type is (uproot.source.fsspec.FSSpecSource if handler is None else handler)
    _assert_same(remote, _local_arrays(shared_data / SAMPLE))


@pytest.mark.parametrize(
    "handler",
    [None, uproot.source.http.HTTPSource],
    ids=["default-fsspec", "uproot-http-multipart"],
)
def test_uproot_over_http_matches_local(http_server, shared_data, handler):
    name = f"http-{'default' if handler is None else 'multipart'}.root"
    url = http_server.put(shared_data / SAMPLE, name=name)
    served_before = len(http_server.requests)

    source_type, remote = _remote_arrays(url, handler=handler, timeout=30)

    assert source_type is (uproot.source.fsspec.FSSpecSource if handler is None else handler)
    _assert_same(remote, _local_arrays(shared_data / SAMPLE))
    ranges = [rng for _, rng in http_server.requests[served_before:] if rng is not None]
    assert ranges, "uproot read the file without any Range request"
    if handler is uproot.source.http.HTTPSource:
        # uproot's own HTTP source asks for several ranges in one request
        assert any("," in rng for rng in ranges)


@pytest.mark.xrootd
def test_xrootd_serves_a_private_file_after_put(xrootd_server, shared_data, tmp_path):
    # the daemon runs unprivileged: put() must make a 0600 file readable to it
    private = tmp_path / "private.root"
    private.write_bytes((shared_data / SAMPLE).read_bytes())
    private.chmod(0o600)

    url = xrootd_server.put(private, name="sub/private.root")

    assert url.endswith("//sub/private.root")
    _, remote = _remote_arrays(url, timeout=30)
    _assert_same(remote, _local_arrays(shared_data / SAMPLE))


@pytest.mark.xrootd
def test_xrootd_missing_file_is_an_error(xrootd_server):
    with pytest.raises(OSError, match="no-such-file"):
        uproot.open(xrootd_server.url("no-such-file.root"), timeout=30)


def test_http_missing_file_is_an_error(http_server):
    with pytest.raises(FileNotFoundError):
        uproot.open(http_server.url("no-such-file.root"), timeout=30)


# ---------------------------------------------------------------------------
# a server that accepts and never answers: the timeout must fire


@pytest.mark.timeout(60)
def test_http_hanging_server_times_out(hanging_server):
    with pytest.raises(TimeoutError):
        uproot.open(hanging_server.url(SAMPLE), timeout=1)


@pytest.mark.xrootd
@pytest.mark.timeout(60)
def test_xrootd_hanging_server_times_out(hanging_server):
    # fsspec-xrootd reports an expired operation as a plain OSError
    with pytest.raises(OSError, match="expired"):
        uproot.open(hanging_server.url(SAMPLE, scheme="root"), timeout=1)


def test_remote_reads_agree_with_numpy_reference(shared_data):
    """The local reference itself is sane: event numbers are unique uint64."""
    local = _local_arrays(shared_data / SAMPLE)
    events = ak.to_numpy(local["event"])
    assert events.dtype == np.uint64
    assert len(np.unique(events)) == len(events)


# ---------------------------------------------------------------------------
# columnhub.deliver() through the servers, against a local delivery

DELIVER_COLUMNS = ["run", "event", "Jet_pt"]


def _deliver(url: str, out: Path, **dataset: object) -> columnhub.Result:
    request = {
        "dataset": {"name": "dy", "files": [url], **dataset},
        "columns": DELIVER_COLUMNS,
        "output": {"directory": str(out)},
    }
    return columnhub.deliver(request, workers=2, progress=False)


def _assert_same_delivery(remote: columnhub.Result, local: columnhub.Result, url: str) -> None:
    got, want = remote.to_awkward(), local.to_awkward()
    assert got.fields == want.fields
    for name in want.fields:
        assert str(got[name].type) == str(want[name].type), name
        assert ak.to_list(got[name]) == ak.to_list(want[name]), name
    assert remote.manifest["complete"] is True
    assert {chunk["file"] for chunk in remote.manifest["chunks"]} == {url}


def _assert_matches_uproot(result: columnhub.Result, path: Path) -> None:
    got = result.to_awkward()
    for name, array in _local_arrays(path).items():
        assert ak.to_list(got[name]) == ak.to_list(array), name


def test_deliver_over_http_matches_local(http_server, shared_data, tmp_path):
    local_path = shared_data / SAMPLE
    url = http_server.put(local_path, name="deliver.root")
    served_before = len(http_server.requests)

    remote = _deliver(url, tmp_path / "remote")

    assert any(rng for _, rng in http_server.requests[served_before:]), "nothing read over HTTP"
    local = _deliver(str(local_path), tmp_path / "local")
    _assert_same_delivery(remote, local, url)
    _assert_matches_uproot(remote, local_path)


@pytest.mark.xrootd
def test_deliver_over_xrootd_matches_local(xrootd_server, shared_data, tmp_path):
    local_path = shared_data / SAMPLE
    url = xrootd_server.put(local_path, name="deliver.root")

    remote = _deliver(url, tmp_path / "remote")

    local = _deliver(str(local_path), tmp_path / "local")
    _assert_same_delivery(remote, local, url)
    _assert_matches_uproot(remote, local_path)


@pytest.mark.timeout(60)
def test_deliver_from_hanging_http_server_times_out(hanging_server, tmp_path):
    url = hanging_server.url(SAMPLE)
    with pytest.raises(SourceTimeoutError, match=re.escape(url)):
        _deliver(url, tmp_path / "out", timeout=1)


@pytest.mark.xrootd
@pytest.mark.timeout(60)
def test_deliver_from_hanging_xrootd_server_times_out(hanging_server, tmp_path):
    url = hanging_server.url(SAMPLE, scheme="root")
    with pytest.raises(SourceTimeoutError, match=re.escape(url)):
        _deliver(url, tmp_path / "out", timeout=1)
