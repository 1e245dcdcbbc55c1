"""Data access of service requests: files only under the data roots, URLs only under the prefixes.

A real directory tree in ``tmp_path`` with symbolic links leading out of the
root and inside it; the reference decides by the real path (``os.path.realpath``)
of every file the delivery would read, and for URLs from the parts the test
generated (not by parsing the URL again).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from columnhub.errors import DatasetError, PermissionDeniedError, SpecError
from columnhub.service.access import check_entry, check_inputs, check_url, under_prefix
from columnhub.spec import Request, Samples

PREFIXES = ["https://data.example.org/open/", "root://eos.example.org//store/user/"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``data/`` (the root) with links out of it and inside it, ``outside/`` next to it.

    ::

        data/a.root  data/sub/b.root  data/sub/c.parquet
        data/escape.root -> ../outside/secret.root     (a file link leaving the root)
        data/alias.root -> sub/b.root                  (a link inside the root)
        data/linkdir -> ../outside                     (a directory link leaving the root)
        data/inner -> sub                              (a directory link inside the root)
        data/result/  a columnhub result whose manifest names ../../outside/secret.root
        data/good/    a columnhub result whose manifest names its own part
        outside/secret.root  outside/other.root
        rootlink -> data                               (a root given through a link)
    """
    base = tmp_path_factory.mktemp("access")
    data, outside = base / "data", base / "outside"
    (data / "sub").mkdir(parents=True)
    outside.mkdir()
    for path in (data / "a.root", data / "sub/b.root", data / "sub/c.parquet"):
        path.write_bytes(b"")
    for path in (outside / "secret.root", outside / "other.root"):
        path.write_bytes(b"")
    (data / "escape.root").symlink_to("../outside/secret.root")
    (data / "alias.root").symlink_to("sub/b.root")
    (data / "linkdir").symlink_to("../outside", target_is_directory=True)
    (data / "inner").symlink_to("sub", target_is_directory=True)
    for name, files in (("result", ["../../outside/secret.root"]), ("good", ["part-0.parquet"])):
        (data / name).mkdir()
        (data / name / "part-0.parquet").write_bytes(b"")
        manifest = {"complete": True, "files": files}
        (data / name / "manifest.json").write_text(json.dumps(manifest))
    (base / "rootlink").symlink_to("data", target_is_directory=True)
    return base


def reference(entry: str, root: Path) -> str:
    """'allowed', 'denied' or 'missing', by the real paths of what the delivery would read."""
    real_root = os.path.realpath(root)

    def inside(path: str) -> bool:
        real = os.path.realpath(path)
        return real == real_root or real.startswith(real_root + os.sep)

    if not entry.startswith("/"):
        return "denied"
    if not inside(entry):
        return "denied"
    path = Path(entry)  # as the delivery sees it (pathlib drops '.' components)
    if path.is_dir():
        manifest = Path(entry) / "manifest.json"
        if manifest.is_file():
            names = json.loads(manifest.read_text())["files"]
            files = [os.path.join(entry, n) for n in names]
        else:
            files = [
                os.path.join(entry, n)
                for n in os.listdir(entry)
                if n.endswith((".root", ".parquet")) and os.path.isfile(os.path.join(entry, n))
            ]
            if not files:
                return "missing"
        return "allowed" if all(inside(f) for f in files) else "denied"
    if path.is_file():
        return "allowed"
    return "missing"


def outcome(entry: str, roots: list[Path]) -> str:
    try:
        check_entry(entry, data_roots=roots, url_prefixes=PREFIXES)
    except PermissionDeniedError:
        return "denied"
    except DatasetError:
        return "missing"
    return "allowed"


COMPONENTS = [
    "..", ".", "", "data", "outside", "sub", "inner", "linkdir", "result", "good",
    "a.root", "b.root", "c.parquet", "escape.root", "alias.root", "secret.root", "other.root",
    "rootlink", "nothing.root",
]  # fmt: skip


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    start=st.sampled_from(["base", "data", "rootlink", "relative", "tilde"]),
    parts=st.lists(st.sampled_from(COMPONENTS), max_size=5),
    root_through_link=st.booleans(),
)
def test_a_path_is_allowed_iff_its_real_files_are_under_a_root(
    tree: Path, start: str, parts: list[str], root_through_link: bool
) -> None:
    head = {
        "base": str(tree),
        "data": str(tree / "data"),
        "rootlink": str(tree / "rootlink"),
        "relative": "data",
        "tilde": "~",
    }[start]
    entry = "/".join([head, *parts])
    root = tree / ("rootlink" if root_through_link else "data")
    expected = reference(entry, root)
    cwd = os.getcwd()
    os.chdir(tree)  # a relative path would name a real file here: still refused
    try:
        assert outcome(entry, [root]) == expected, entry
    finally:
        os.chdir(cwd)


def test_denial_names_the_path_and_the_roots(tree: Path) -> None:
    root = tree / "data"
    with pytest.raises(PermissionDeniedError) as err:
        check_entry(str(root / "escape.root"), data_roots=[root], url_prefixes=[])
    text = str(err.value)
    assert str(root / "escape.root") in text
    assert str(tree / "outside" / "secret.root") in text  # where the link leads
    assert str(root) in text  # the allowed roots
    with pytest.raises(PermissionDeniedError, match="not an absolute path"):
        check_entry("data/a.root", data_roots=[root], url_prefixes=[])
    with pytest.raises(PermissionDeniedError, match="no data roots are configured"):
        check_entry(str(root / "a.root"), data_roots=[], url_prefixes=[])
    with pytest.raises(PermissionDeniedError, match="file: URLs are not accepted"):
        check_entry(f"file://{root}/a.root", data_roots=[root], url_prefixes=[])
    with pytest.raises(PermissionDeniedError, match="file: URLs are not accepted"):
        check_entry(f"FILE://{root}/a.root", data_roots=[root], url_prefixes=[])


def test_globs_expand_under_a_root_only(tree: Path) -> None:
    root = tree / "data"
    files = check_entry(str(root / "sub" / "*.root"), data_roots=[root], url_prefixes=[])
    assert files == [str(root / "sub" / "b.root")]
    # the link matched by the wildcard leads out: refused
    with pytest.raises(PermissionDeniedError, match=r"secret\.root"):
        check_entry(str(root / "*.root"), data_roots=[root], url_prefixes=[])
    with pytest.raises(PermissionDeniedError, match=r"secret\.root"):
        check_entry(str(root / "*" / "secret.root"), data_roots=[root], url_prefixes=[])
    # '..' after the wildcard climbs out: refused by each match's real path
    with pytest.raises(PermissionDeniedError, match="outside the service's data roots"):
        check_entry(str(root / "s*" / ".." / ".." / "outside" / "*.root"), data_roots=[root],
                    url_prefixes=[])  # fmt: skip
    # a pattern whose fixed part is outside is refused before anything is listed
    with pytest.raises(PermissionDeniedError, match="outside"):
        check_entry(str(tree / "outside" / "*.root"), data_roots=[root], url_prefixes=[])
    with pytest.raises(PermissionDeniedError):
        check_entry("/*/*.root", data_roots=[root], url_prefixes=[])


@settings(max_examples=500, deadline=None)
@given(
    scheme=st.sampled_from(["https", "HTTPS", "root", "http", "file", "s3"]),
    user=st.sampled_from(["", "user@", "data.example.org@", "u:p@"]),
    host=st.sampled_from(
        [
            "data.example.org",
            "DATA.example.org",
            "evil.example",
            "data.example.org.evil.example",
            "eos.example.org",
            "127.0.0.1",
            "data.example.org.",
        ]
    ),
    port=st.sampled_from(["", ":443", ":1094", ":8443"]),
    start=st.sampled_from([[], ["open"], ["", "store", "user"], ["store", "user"], ["openx"]]),
    segments=st.lists(
        st.sampled_from(
            ["open", "openx", "store", "user", "..", ".", "%2e%2e", "%2E", "a.root", ""]
        ),
        max_size=4,
    ),
    query=st.sampled_from(["", "?authz=x", "?a=b/../c"]),
)
def test_a_url_is_allowed_iff_under_a_prefix(
    scheme: str,
    user: str,
    host: str,
    port: str,
    start: list[str],
    segments: list[str],
    query: str,
) -> None:
    segments = start + segments
    url = f"{scheme}://{user}{host}{port}/" + "/".join(segments) + query
    # the reference, from the parts themselves
    plain = [s for s in segments if s != ""]
    dots = any(s.lower() in ("..", ".", "%2e%2e", "%2e") for s in segments)
    host_name = host.lower().rstrip(".")
    scheme_l = scheme.lower()
    default = {"https": ":443", "root": ":1094"}.get(scheme_l)
    same_port = port in ("", default)
    allowed = (
        not user
        and not dots
        and same_port
        and (
            (scheme_l == "https" and host_name == "data.example.org" and plain[:1] == ["open"])
            or (scheme_l == "root" and host_name == "eos.example.org" and plain[:2] == ["store", "user"])
        )
    )  # fmt: skip
    try:
        check_url(url, url_prefixes=PREFIXES)
        got = True
    except PermissionDeniedError:
        got = False
    assert got == allowed, url
    assert under_prefix(url, PREFIXES[0]) or under_prefix(url, PREFIXES[1]) or not allowed


def test_url_refusals_say_why() -> None:
    cases = {
        "https://data.example.org/open/..%2f..%2fadmin": "'..' segments",
        "https://data.example.org@evil.example/open/a.root": "user names or passwords",
        "https://data.example.org/open/a.root::file:///etc/passwd": "'::'",
        "https://data.example.org\\@evil.example/open/a.root": "backslashes",
        "https://data.example.org:99999/open/a.root": "not a valid URL",
        "gopher://data.example.org/open/a.root": "none of the service's URL prefixes",
        "/data/x://y": "not an absolute URL",
    }
    for url, why in cases.items():
        with pytest.raises(PermissionDeniedError, match=why) as err:
            check_entry(url, data_roots=[], url_prefixes=PREFIXES)
        assert "https://data.example.org/open/" in str(err.value)  # the allowed prefixes
    for prefix in ("file:///data/", "data.example.org/open", "https://u@h/x", "https://h/?q=1"):
        with pytest.raises(SpecError, match="URL prefix"):
            check_url("https://h/x", url_prefixes=[prefix])


def test_result_directory_manifest_cannot_point_out(tree: Path) -> None:
    root = tree / "data"
    good = check_entry(str(root / "good"), data_roots=[root], url_prefixes=[])
    assert good == [str(root / "good" / "part-0.parquet")]
    with pytest.raises(PermissionDeniedError, match=r"secret\.root"):
        check_entry(str(root / "result"), data_roots=[root], url_prefixes=[])


def spec(files: list[str], **more: object) -> dict[str, object]:
    return {"dataset": {"files": files}, "columns": ["Jet_pt"], **more}


def test_check_inputs_covers_friends_samples_registry_and_output(tree: Path) -> None:
    root = tree / "data"
    inside, out = str(root / "a.root"), str(tree / "outside" / "other.root")
    kwargs = {"data_roots": [root], "url_prefixes": PREFIXES}
    check_inputs(Request.model_validate(spec([inside, "https://data.example.org/open/x.root"])),
                 **kwargs)  # fmt: skip
    friend = {"name": "syst", "dataset": {"files": [out]}, "columns": ["Jet_ptUp"]}
    with pytest.raises(PermissionDeniedError, match=r"friend 'syst'.*other\.root"):
        check_inputs(Request.model_validate(spec([inside], friends=[friend])), **kwargs)
    samples = Samples.from_dict({"columns": ["Jet_pt"], "samples": {"dy": [inside], "tt": [out]}})
    with pytest.raises(PermissionDeniedError, match=r"sample 'tt'.*other\.root"):
        check_inputs(samples, **kwargs)
    with pytest.raises(PermissionDeniedError, match="registry"):
        check_inputs(Request.model_validate(spec([inside], registry=str(root))), **kwargs)
    # the service's own registry (set by the service in the job specs) is allowed
    own = Request.model_validate(spec([inside], registry="/srv/models"))
    check_inputs(own, registry="/srv/models", **kwargs)
    with pytest.raises(PermissionDeniedError, match="registry"):
        check_inputs(own, registry="/srv/other-models", **kwargs)
    with pytest.raises(PermissionDeniedError, match=r"output\.directory"):
        check_inputs(
            Request.model_validate(spec([inside], output={"directory": "/tmp/x"})), **kwargs
        )
    with pytest.raises(PermissionDeniedError, match="evil"):
        check_inputs(Request.model_validate(spec(["https://evil.example/open/x.root"])), **kwargs)


@pytest.mark.service
def test_a_link_made_after_submission_is_refused_when_the_job_runs(
    tmp_path: Path, shared_data: Path
) -> None:
    """Submitted as a real file under the root, swapped for a link out before a runner runs it."""
    import asyncio
    import shutil

    import httpx

    from columnhub.service.app import create_app
    from columnhub.service.config import load_config
    from columnhub.service.jobs import Runner

    root, outside = tmp_path / "data", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    shutil.copy(shared_data / "nano_dy.root", root / "mine.root")
    shutil.copy(shared_data / "nano_dy.root", outside / "theirs.root")
    config = load_config(state_dir=tmp_path / "state", data_roots=[root], workers=1)
    app = create_app(config, runner=False)  # API only: the job waits in the queue
    spec = {"dataset": {"files": [str(root / "mine.root")]}, "columns": ["MET_pt"]}

    async def call(method: str, path: str, **kwargs: object) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)  # type: ignore[arg-type]

    submitted = asyncio.run(call("POST", "/api/v1/requests", json=spec))
    assert submitted.status_code == 202, submitted.text
    (root / "mine.root").unlink()
    (root / "mine.root").symlink_to(outside / "theirs.root")
    assert Runner(app.state.db, config).run_once()
    status = asyncio.run(call("GET", f"/api/v1/requests/{submitted.json()['id']}")).json()
    assert status["status"] == "failed", status
    assert status["error"]["type"] == "PermissionDeniedError"
    assert str(outside / "theirs.root") in status["error"]["message"]


def test_where_links_outside_the_roots_lead_is_not_told(tree: Path) -> None:
    root = tree / "data"
    outside_link = tree / "outside" / "to-other"
    if not outside_link.is_symlink():
        outside_link.symlink_to(tree / "outside" / "other.root")
    with pytest.raises(PermissionDeniedError) as err:
        check_entry(str(outside_link), data_roots=[root], url_prefixes=[])
    assert str(outside_link) in str(err.value)
    assert "other.root" not in str(err.value)  # the target of a link outside every root
    with pytest.raises(PermissionDeniedError) as err:
        check_entry(str(root / "linkdir" / "other.root"), data_roots=[root], url_prefixes=[])
    assert str(tree / "outside" / "other.root") in str(err.value)  # a link inside the root: told
