"""Shared pytest fixtures: sample data and real servers on loopback.

Fixtures:
    shared_data: the directory of real NanoAOD samples (``../shared/data``).
    xrootd_server: a real XRootD data server (the ``xrootd`` daemon) on loopback.
    http_server: a threaded HTTP server with byte-range support on loopback.
    hanging_server: a TCP server that accepts connections and never answers.
    deliver_killing_a_worker: runs a delivery on a Dask cluster and SIGKILLs
        the worker running one of its tasks (retries are then tested).
    postgres_server: a real PostgreSQL server (Debian's postgresql 15) on
        loopback, run as an unprivileged user; ``postgres_url``: a fresh
        database on it for one test.

The server fixtures are session scoped; each yields an object with ``.root``
(the exported local directory, where tests copy input files), ``.port`` and
``.url(name)``. ``put(path)`` copies a file into ``.root`` and returns its URL.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# The XRootD client checks request timeouts only every TimeoutResolution seconds
# (default 15), so a 1 s timeout would fire after 15 s. Read once, when the
# client first starts, hence set here before anything imports XRootD.
os.environ.setdefault("XRD_TIMEOUTRESOLUTION", "1")

INSTALL_HINT = (
    "run `scripts/install-system-deps.sh` as root (Debian: apt-get install xrootd-server)"
)


# ---------------------------------------------------------------------------
# data


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The directory of real NanoAOD samples (``nano_dy.root``, ...)."""
    if not SHARED_DATA.is_dir():
        msg = (
            f"sample data directory {SHARED_DATA} does not exist; the tests expect the "
            "shared NanoAOD samples (nano_dy.root, nano_dimuon.root, nano_tt_v12.root) "
            "next to the repository, in ../shared/data"
        )
        pytest.fail(msg, pytrace=False)
    return SHARED_DATA


# ---------------------------------------------------------------------------
# helpers


def _world_readable_tempdir(prefix: str) -> Path:
    """A fresh directory under the system temp dir that any user can read.

    pytest's ``tmp_path_factory`` directories are private to their owner, so an
    unprivileged server process could not read them.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def _copy_readable(src: Path, dst_dir: Path, name: str | None) -> Path:
    dst = dst_dir / (name if name is not None else src.name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(0o644)
    return dst


def _stop_process(proc: subprocess.Popen[bytes], *, grace: float = 5.0) -> None:
    """Terminate ``proc``; kill it if it has not exited after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


# ---------------------------------------------------------------------------
# XRootD


@dataclass(frozen=True)
class XRootDServer:
    """A running XRootD data server exporting ``root`` on 127.0.0.1:``port``."""

    port: int
    root: Path
    log: Path
    pid: int

    def url(self, name: str) -> str:
        """The ``root://`` URL of ``name`` (relative to ``root``)."""
        return f"root://127.0.0.1:{self.port}//{name.lstrip('/')}"

    def put(self, src: Path, *, name: str | None = None) -> str:
        """Copy ``src`` into the exported directory; return its URL."""
        return self.url(_copy_readable(src, self.root, name).relative_to(self.root).as_posix())


_XROOTD_READY = re.compile(r"xrootd \S+:(\d+) initialization completed")


def _xrootd_log_tail(log: Path, n: int = 60) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError as err:
        return f"(no log: {err})"
    return "\n".join(lines[-n:])


def _xrootd_stat_ok(port: int) -> str | None:
    """None when ``stat /`` succeeds through the XRootD client, else the error."""
    from XRootD import client  # the `xrootd` python bindings

    status, _ = client.FileSystem(f"root://127.0.0.1:{port}").stat("/", timeout=5)
    return None if status.ok else str(status.message)


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGTERM the child when pytest dies.

    Without it a pytest run killed with SIGKILL would leave the daemon behind.
    The C function is looked up here, before the fork: the child only calls it.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


@contextlib.contextmanager
def running_xrootd(*, start_timeout: float = 30.0) -> Iterator[XRootDServer]:
    """Run an ``xrootd`` data server on loopback, exporting a fresh temp directory.

    The daemon refuses to run as root, so under root it runs as ``nobody``.
    It listens on a port it picks itself (``xrd.port any``, read back from its
    log, so there is no race for a free port) and accepts only loopback
    clients (``xrd.allow host localhost``). On exit it is terminated (killed
    after 5 s) and the directory removed. The kernel also terminates it when
    the thread that started it dies (``PR_SET_PDEATHSIG``), so start it from a
    thread that outlives its use (pytest's main thread does).

    Raises:
        FileNotFoundError: the ``xrootd`` executable is not installed.
        RuntimeError: the daemon exited or did not answer within
            ``start_timeout`` seconds; the message holds its log.
    """
    exe = shutil.which("xrootd")
    if exe is None:
        msg = f"the `xrootd` server executable is not on PATH; {INSTALL_HINT}"
        raise FileNotFoundError(msg)
    base = _world_readable_tempdir("columnhub-xrootd-")
    root = base / "export"
    admin = base / "admin"
    root.mkdir(mode=0o755)
    admin.mkdir(mode=0o755)
    log = base / "xrootd.log"
    cfg = base / "xrootd.cfg"
    cfg.write_text(
        "\n".join(
            [
                "all.export /",
                f"oss.localroot {root}",
                f"all.adminpath {admin}",
                f"all.pidpath {admin}",
                "xrd.port any",
                "xrd.allow host localhost",
                "xrd.network nodnr",
                "",
            ]
        )
    )
    cfg.chmod(0o644)
    popen_user: dict[str, object] = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(admin, nobody.pw_uid, nobody.pw_gid)
        popen_user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    try:
        with log.open("wb") as log_fh:
            proc = subprocess.Popen(
                [exe, "-c", str(cfg)],
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                cwd=base,
                # only calls prctl (resolved before the fork); runs after the switch to nobody
                preexec_fn=_die_with_parent(),  # noqa: PLW1509
                **popen_user,  # type: ignore[arg-type]
            )
        try:
            port = _wait_for_xrootd(proc, log, timeout=start_timeout)
            yield XRootDServer(port=port, root=root, log=log, pid=proc.pid)
        finally:
            _stop_process(proc)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def xrootd_server() -> Iterator[XRootDServer]:
    """A real ``xrootd`` daemon on loopback, serving a fresh temp directory.

    See :func:`running_xrootd`. Tests copy inputs into ``.root`` (or use
    ``.put(path)``) and read them at ``.url(name)``.
    """
    if shutil.which("xrootd") is None:
        pytest.fail(f"the `xrootd` server executable is not on PATH; {INSTALL_HINT}")
    with running_xrootd() as server:
        yield server


def _wait_for_xrootd(proc: subprocess.Popen[bytes], log: Path, *, timeout: float) -> int:
    """Wait until the daemon reports its port and answers a ``stat``; return the port."""
    deadline = time.monotonic() + timeout
    port: int | None = None
    last_error = "no port reported in the log yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            msg = (
                f"xrootd exited with code {proc.returncode} at start; log:\n{_xrootd_log_tail(log)}"
            )
            raise RuntimeError(msg)
        if port is None:
            found = _XROOTD_READY.search(log.read_text(errors="replace"))
            if found:
                port = int(found.group(1))
        if port is not None:
            error = _xrootd_stat_ok(port)
            if error is None:
                return port
            last_error = f"stat / on port {port} failed: {error}"
        time.sleep(0.1)
    msg = f"xrootd not ready within {timeout:g} s ({last_error}); log:\n{_xrootd_log_tail(log)}"
    raise RuntimeError(msg)


# ---------------------------------------------------------------------------
# HTTP with byte ranges


_RANGE_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


def parse_range_header(header: str, size: int) -> list[tuple[int, int]] | None:
    """Parse an HTTP ``Range`` header into inclusive ``(first, last)`` byte pairs.

    Returns None when the header is not a ``bytes=`` range (serve the whole
    file), and an empty list when no range is satisfiable (answer 416).
    """
    unit, _, specs = header.partition("=")
    if unit.strip().lower() != "bytes" or not specs:
        return None
    ranges: list[tuple[int, int]] = []
    for spec in specs.split(","):
        match = _RANGE_SPEC.match(spec)
        if match is None:
            return None
        first_text, last_text = match.groups()
        if first_text == "" and last_text == "":
            return None
        if first_text == "":  # suffix range: the last N bytes
            length = int(last_text)
            if length == 0:
                continue
            first, last = max(size - length, 0), size - 1
        else:
            first = int(first_text)
            last = size - 1 if last_text == "" else min(int(last_text), size - 1)
            if last_text != "" and int(last_text) < first:
                return None
        if first < size and first <= last:
            ranges.append((first, last))
    return ranges


class RangeRequestHandler(http.server.BaseHTTPRequestHandler):
    """Serves files from ``server.root`` with GET/HEAD, single and multi ``Range``."""

    protocol_version = "HTTP/1.1"
    server: _RangeHTTPServer

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def _resolve(self) -> Path | None:
        name = self.path.split("?", 1)[0].split("#", 1)[0].lstrip("/")
        root = self.server.root.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return None
        return path

    def _not_found(self) -> None:
        body = b"not found\n"
        self.send_response(404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        """Headers only, with Content-Length and Accept-Ranges."""
        self._serve()

    def do_GET(self) -> None:
        """The whole file, one range (206) or several (206 multipart/byteranges)."""
        self._serve()

    def _serve(self) -> None:
        self.server.requests.append((self.command, self.headers.get("Range")))
        path = self._resolve()
        if path is None:
            self._not_found()
            return
        data = path.read_bytes()
        size = len(data)
        header = self.headers.get("Range")
        ranges = parse_range_header(header, size) if header else None
        head = self.command == "HEAD"
        if ranges is None:
            self._send(200, data, {"Content-Type": "application/octet-stream"}, head=head)
        elif not ranges:
            self._send(416, b"", {"Content-Range": f"bytes */{size}"}, head=head)
        elif len(ranges) == 1:
            first, last = ranges[0]
            self._send(
                206,
                data[first : last + 1],
                {
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"bytes {first}-{last}/{size}",
                },
                head=head,
            )
        else:
            boundary = "columnhub-byteranges-boundary"
            parts = []
            for first, last in ranges:
                parts.append(
                    (
                        f"--{boundary}\r\n"
                        "Content-Type: application/octet-stream\r\n"
                        f"Content-Range: bytes {first}-{last}/{size}\r\n\r\n"
                    ).encode()
                    + data[first : last + 1]
                    + b"\r\n"
                )
            body = b"".join(parts) + f"--{boundary}--\r\n".encode()
            content_type = f"multipart/byteranges; boundary={boundary}"
            self._send(206, body, {"Content-Type": content_type}, head=head)

    def _send(self, status: int, body: bytes, headers: dict[str, str], *, head: bool) -> None:
        self.send_response(status)
        self.send_header("Accept-Ranges", "bytes")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


class _RangeHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), RangeRequestHandler)
        self.root = root
        self.requests: list[tuple[str, str | None]] = []

    def handle_error(self, request: object, client_address: object) -> None:
        """Ignore clients that hang up mid-connection; report anything else."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionResetError | BrokenPipeError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


@dataclass(frozen=True)
class HTTPServer:
    """A running range-capable HTTP server exporting ``root`` on 127.0.0.1:``port``.

    ``requests`` records ``(method, Range header)`` of every request served.
    """

    port: int
    root: Path
    requests: list[tuple[str, str | None]] = field(repr=False)

    def url(self, name: str) -> str:
        """The ``http://`` URL of ``name`` (relative to ``root``)."""
        return f"http://127.0.0.1:{self.port}/{name.lstrip('/')}"

    def put(self, src: Path, *, name: str | None = None) -> str:
        """Copy ``src`` into the exported directory; return its URL."""
        return self.url(_copy_readable(src, self.root, name).relative_to(self.root).as_posix())


@pytest.fixture(scope="session")
def http_server() -> Iterator[HTTPServer]:
    """A threaded HTTP/1.1 server with ``Range`` support on loopback."""
    root = _world_readable_tempdir("columnhub-http-")
    server = _RangeHTTPServer(root)
    thread = threading.Thread(target=server.serve_forever, name="columnhub-http", daemon=True)
    thread.start()
    try:
        yield HTTPServer(port=server.server_address[1], root=root, requests=server.requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------
# a server that never answers


@dataclass(frozen=True)
class HangingServer:
    """A loopback TCP port that accepts connections and never sends a byte."""

    port: int

    def url(self, name: str, *, scheme: str = "http") -> str:
        """A URL of ``name`` on the hanging port (``scheme`` http or root)."""
        if scheme == "root":
            return f"root://127.0.0.1:{self.port}//{name.lstrip('/')}"
        return f"{scheme}://127.0.0.1:{self.port}/{name.lstrip('/')}"


@pytest.fixture(scope="session")
def hanging_server() -> Iterator[HangingServer]:
    """A TCP server that accepts, reads and discards, and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept_forever() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)  # keep it open, say nothing

    thread = threading.Thread(target=accept_forever, name="columnhub-hanging", daemon=True)
    thread.start()
    try:
        yield HangingServer(port=listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
        for conn in held:
            with contextlib.suppress(OSError):
                conn.close()


# ---------------------------------------------------------------------------
# PostgreSQL

PG_BIN = Path(os.environ.get("COLUMNHUB_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "columnhub-pg"


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL server on 127.0.0.1:``port`` (superuser ``postgres``, trust auth)."""

    port: int
    data: Path
    socket_dir: Path
    log: Path

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL (psycopg 3) of ``database``."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create the database ``name`` (``[a-z0-9_]``); its URL."""
        import psycopg

        assert re.fullmatch(r"[a-z0-9_]+", name), name
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_account() -> dict[str, object]:
    """``Popen`` keywords that run PostgreSQL as an unprivileged user (it refuses root).

    As root, the system user ``columnhub-pg`` is created if it does not exist.
    """
    if os.geteuid() != 0:
        return {}
    try:
        account = pwd.getpwnam(PG_USER)
    except KeyError:
        made = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
            check=False, capture_output=True, text=True,
        )
        try:  # another session may have made it at the same moment
            account = pwd.getpwnam(PG_USER)
        except KeyError:
            msg = f"cannot create the user {PG_USER!r} for PostgreSQL: {made.stderr.strip()}"
            raise RuntimeError(msg) from None
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _pg_log_tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError as err:
        return f"(no log: {err})"


@contextlib.contextmanager
def running_postgres(*, start_timeout: float = 60.0) -> Iterator[PostgresServer]:
    """``initdb`` a fresh cluster in a temp directory and run ``postgres`` on loopback.

    It runs as an unprivileged user (``columnhub-pg`` under root), listens only
    on 127.0.0.1 on a free port with its unix socket in the temp directory,
    with durability off (``fsync=off``: a test server). On exit it is shut
    down (SIGINT: fast shutdown) and the directory removed; the kernel also
    stops it if pytest dies (``PR_SET_PDEATHSIG``).
    """
    account = _pg_account()
    base = Path(tempfile.mkdtemp(prefix="columnhub-pg-"))
    data, sockets, log = base / "data", base / "sock", base / "postgres.log"
    sockets.mkdir()
    if account:
        for path in (base, sockets):
            os.chown(path, account["user"], account["group"])  # type: ignore[arg-type]
    try:
        subprocess.run(
            [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "-E", "UTF8", "--no-sync", "--locale=C"],
            check=True, capture_output=True, cwd=base, **account,  # type: ignore[arg-type]
        )
        for _ in range(5):  # a free port can be taken before postgres binds it: try another
            port = _free_port()
            with log.open("ab") as log_fh:
                proc = subprocess.Popen(
                    [str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port),
                     "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={sockets}",
                     "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off", "-c", "max_connections=200"],
                    stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT, cwd=base,
                    preexec_fn=_die_with_parent(),  # noqa: PLW1509
                    **account,  # type: ignore[arg-type]
                )
            ready = _wait_for_postgres(proc, port, timeout=start_timeout)
            if ready:
                break
            _stop_process(proc)
        else:
            msg = f"PostgreSQL did not start; its log:\n{_pg_log_tail(log)}"
            raise RuntimeError(msg)
        try:
            yield PostgresServer(port=port, data=data, socket_dir=sockets, log=log)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _wait_for_postgres(proc: subprocess.Popen[bytes], port: int, *, timeout: float) -> bool:
    """True once ``postgres`` accepts connections; False when it exited (port taken)."""
    import psycopg

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with psycopg.connect(
                host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=2
            ):
                return True
        except psycopg.OperationalError:
            time.sleep(0.1)
    msg = f"PostgreSQL did not accept connections on 127.0.0.1:{port} within {timeout:g} s"
    raise RuntimeError(msg)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL 15 server on loopback for the session (see :func:`running_postgres`)."""
    if not (PG_BIN / "initdb").is_file() or not (PG_BIN / "postgres").is_file():
        pytest.skip(
            f"PostgreSQL server binaries not found in {PG_BIN} (set $COLUMNHUB_PG_BIN); "
            "run `scripts/install-system-deps.sh` as root (Debian: apt-get install postgresql)"
        )
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> str:
    """The URL of a fresh, empty database on :func:`postgres_server`, for one test."""
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    return postgres_server.create_database(f"t_{name}_{os.urandom(4).hex()}")


# ---------------------------------------------------------------------------
# isolation


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own default column cache, never the user's."""
    path = tmp_path_factory.mktemp("columnhub-cache")
    monkeypatch.setenv("COLUMNHUB_CACHE", str(path))
    return path


# ---------------------------------------------------------------------------
# Dask: a worker killed in the middle of a task


def _set_env_on_worker(name: str, value: str | None) -> None:
    """Run on each worker (a module-level function travels to it by reference)."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _deliver_killing_a_worker(
    client: object,
    deliver: Callable[[], object],
    *,
    sleep_env: str,
    seconds: str,
    task_key: str,
    wait: float = 30.0,
) -> object:
    """``deliver()`` on a thread; SIGKILL the worker running a task whose key holds ``task_key``.

    ``sleep_env`` (a test hook of columnhub, e.g. ``COLUMNHUB_TEST_PART_SLEEP``)
    is set to ``seconds`` on every worker meanwhile, so the task is still
    running when its worker is killed. Returns what ``deliver()`` returned;
    raises what it raised.
    """
    client.run(_set_env_on_worker, sleep_env, seconds)  # type: ignore[attr-defined]
    try:
        pids = client.run(os.getpid)  # type: ignore[attr-defined]
        outcome: dict[str, object] = {}

        def run() -> None:
            try:
                outcome["result"] = deliver()
            except BaseException as err:  # noqa: BLE001 - handed to the test thread
                outcome["error"] = err

        thread = threading.Thread(target=run)
        thread.start()
        victim = None
        deadline = time.monotonic() + wait
        while victim is None and time.monotonic() < deadline:
            busy = {
                address: keys
                for address, keys in client.processing().items()  # type: ignore[attr-defined]
                if any(task_key in str(key) for key in keys)
            }
            if busy:
                victim = next(iter(busy))
            else:
                time.sleep(0.05)
        assert victim is not None, f"no {task_key!r} task started on a worker"
        time.sleep(0.3)  # inside its task (sleeping in the hook)
        os.kill(pids[victim], signal.SIGKILL)
        thread.join(3 * wait)
        assert not thread.is_alive()
    finally:
        client.run(_set_env_on_worker, sleep_env, None)  # type: ignore[attr-defined]
    assert "error" not in outcome, outcome.get("error")
    return outcome["result"]


@pytest.fixture
def deliver_killing_a_worker() -> Callable[..., object]:
    """:func:`_deliver_killing_a_worker`, for the tests of task retries on Dask."""
    return _deliver_killing_a_worker
