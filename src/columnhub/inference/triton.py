"""Remote backend: Triton / KServe v2 inference servers over HTTP or gRPC (``tritonclient``).

One chunk's ``(n_rows, n_features)`` matrix is cut into batches sized by rows
and bytes under the server's ``max_batch_size`` (the tail batch is sent as it
is, never padded). Up to ``max_in_flight`` batches are in flight at once (a
per-process thread pool; each thread keeps its own clients, which are not
thread-safe). Each batch goes to the healthy server with the fewest requests in
flight; a failure marks that server down and the batch is retried on another
one after an exponential backoff in milliseconds. Each attempt is bounded by
``timeout_s``, and there are at most ``retries + 1`` attempts, so a request
whose servers are all down or hung raises :class:`InferenceServerError` in
bounded time, never hangs.

Model metadata and config (input name, outputs, ``max_batch_size``) are fetched
once per process and model version. Nothing here is pickled: clients, pools
and caches are per-process module state.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import gc
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from columnhub.errors import InferenceServerError, ModelError, ModelInputError
from columnhub.inference._outputs import select_outputs
from columnhub.inference.balancer import ServerPool, backoff_s, pool_for
from columnhub.inference.batching import batch_rows, batch_slices
from columnhub.inference.registry import ModelCard, RemoteConfig

if TYPE_CHECKING:
    from columnhub.inference.metrics import InferenceMetrics

__all__ = ["RemoteModelInfo", "model_info", "run_remote", "server_address"]

_TRITON_TO_NUMPY = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "BOOL": np.bool_,
}


@dataclass(frozen=True)
class RemoteModelInfo:
    """What the server says about a model version (fetched once per process)."""

    input_name: str
    input_datatype: str
    n_features: int | None
    outputs: tuple[str, ...]
    max_batch_size: int


def server_address(url: str) -> str:
    """``host:port`` of a server address given with or without a scheme.

    >>> server_address("grpc://127.0.0.1:8001/")
    '127.0.0.1:8001'
    """
    return url.split("://", 1)[-1].rstrip("/")


def _tritonclient(protocol: str) -> Any:
    from columnhub._extras import require

    module = "tritonclient.grpc" if protocol == "grpc" else "tritonclient.http"
    return require(module, what="remote inference (Triton / KServe v2)")


_local = threading.local()
_open_lock = threading.Lock()
# every thread's client dict: closed and emptied at exit, while the modules are
# alive (a gRPC client collected at interpreter shutdown fails noisily in __del__)
_client_dicts: list[dict[tuple[str, str, float], Any]] = []


def _thread_clients() -> dict[tuple[str, str, float], Any]:
    clients: dict[tuple[str, str, float], Any] | None = getattr(_local, "clients", None)
    if clients is None:
        clients = _local.clients = {}
        with _open_lock:
            _client_dicts.append(clients)
    return clients


@atexit.register
def _close_all_clients() -> None:
    with _open_lock:
        dicts = list(_client_dicts)
        _client_dicts.clear()
    for clients in dicts:
        while clients:
            _, client = clients.popitem()
            with contextlib.suppress(Exception):
                client.close()
            del client
    gc.collect()


def _client(remote: RemoteConfig, url: str) -> Any:
    clients = _thread_clients()
    key = (remote.protocol, url, remote.timeout_s)
    client = clients.get(key)
    if client is None:
        module = _tritonclient(remote.protocol)
        if remote.protocol == "grpc":
            client = module.InferenceServerClient(server_address(url))
        else:
            client = module.InferenceServerClient(
                server_address(url),
                connection_timeout=remote.timeout_s,
                network_timeout=remote.timeout_s,
            )
        clients[key] = client
    return client


def _drop_client(remote: RemoteConfig, url: str) -> None:
    client = _thread_clients().pop((remote.protocol, url, remote.timeout_s), None)
    if client is not None:
        with contextlib.suppress(Exception):  # closing a broken connection may fail
            client.close()


def _health_check(remote: RemoteConfig) -> Any:
    def check(url: str) -> bool:
        client = _client(remote, url)
        try:
            if remote.protocol == "grpc":
                return bool(
                    client.is_model_ready(
                        remote.model_name, remote.model_version, client_timeout=remote.timeout_s
                    )
                )
            return bool(client.is_model_ready(remote.model_name, remote.model_version))
        except Exception:
            _drop_client(remote, url)
            raise

    return check


def _pool(remote: RemoteConfig) -> ServerPool:
    key = (remote.protocol, remote.servers, remote.model_name, remote.model_version)
    probe = min(1.0, remote.timeout_s)
    return pool_for(key, remote.servers, check=_health_check(remote), probe_interval_s=probe)


_info_lock = threading.Lock()
_infos: dict[tuple[object, ...], RemoteModelInfo] = {}


def _fetch_info(remote: RemoteConfig, url: str) -> RemoteModelInfo:
    client = _client(remote, url)
    if remote.protocol == "grpc":
        kw = {"as_json": True, "client_timeout": remote.timeout_s}
        meta = client.get_model_metadata(remote.model_name, remote.model_version, **kw)
        config = client.get_model_config(remote.model_name, remote.model_version, **kw)["config"]
    else:
        meta = client.get_model_metadata(remote.model_name, remote.model_version)
        config = client.get_model_config(remote.model_name, remote.model_version)
    first = meta["inputs"][0]
    shape = [int(d) for d in first.get("shape", [])]
    return RemoteModelInfo(
        input_name=str(first["name"]),
        input_datatype=str(first["datatype"]),
        n_features=shape[-1] if len(shape) >= 2 and shape[-1] > 0 else None,
        outputs=tuple(str(o["name"]) for o in meta["outputs"]),
        max_batch_size=int(config.get("max_batch_size", 0) or 0),
    )


def model_info(card: ModelCard) -> RemoteModelInfo:
    """The model's metadata and config, from the first server that answers (cached).

    Raises:
        ModelError: the card has no ``remote`` section.
        InferenceServerError: no server answered.
    """
    remote = _remote(card)
    key = (remote.protocol, remote.servers, remote.model_name, remote.model_version)
    info = _infos.get(key)
    if info is not None:
        return info
    with _info_lock:
        info = _infos.get(key)
        if info is not None:
            return info
        errors = []
        for url in remote.servers:
            try:
                info = _fetch_info(remote, url)
            except Exception as err:  # noqa: BLE001 - any failure: try the next server
                _drop_client(remote, url)
                errors.append(f"{url}: {err or type(err).__name__}")
                continue
            _infos[key] = info
            return info
    msg = (
        f"no server could describe model {remote.model_name!r} version "
        f"{remote.model_version!r} (card {card.name!r}) over {remote.protocol}: "
        f"{'; '.join(errors)}. Check that the servers run and serve this model version"
    )
    raise InferenceServerError(msg)


def _remote(card: ModelCard) -> RemoteConfig:
    if card.remote is None:
        msg = f"model {card.name!r} version {card.version!r} has no 'remote' section in its card"
        raise ModelError(msg)
    return card.remote


def _infer(remote: RemoteConfig, url: str, info: RemoteModelInfo, x: np.ndarray) -> dict[str, Any]:
    module = _tritonclient(remote.protocol)
    client = _client(remote, url)
    dtype = _TRITON_TO_NUMPY.get(info.input_datatype, np.float32)
    data = x if x.dtype == dtype else x.astype(dtype)
    tensor = module.InferInput(info.input_name, list(data.shape), info.input_datatype)
    if remote.protocol == "grpc":
        tensor.set_data_from_numpy(data)
        outputs = [module.InferRequestedOutput(name) for name in info.outputs]
        result = client.infer(
            remote.model_name,
            [tensor],
            model_version=remote.model_version,
            outputs=outputs,
            client_timeout=remote.timeout_s,
        )
    else:
        tensor.set_data_from_numpy(data, binary_data=True)
        outputs = [module.InferRequestedOutput(name, binary_data=True) for name in info.outputs]
        result = client.infer(
            remote.model_name, [tensor], model_version=remote.model_version, outputs=outputs
        )
    return {name: result.as_numpy(name) for name in info.outputs}


def _send(
    card: ModelCard,
    info: RemoteModelInfo,
    pool: ServerPool,
    x: np.ndarray,
    metrics: InferenceMetrics | None,
    cancelled: threading.Event,
) -> dict[str, np.ndarray]:
    remote = _remote(card)
    key = f"{card.name}@{card.version}"
    failed: list[str] = []
    attempts = 0
    for attempt in range(remote.retries + 1):
        if cancelled.is_set():
            break
        url = pool.acquire(exclude=failed)
        if url is None:
            break
        attempts += 1
        t0 = time.perf_counter()
        try:
            tensors = _infer(remote, url, info, x)
        except Exception as err:  # noqa: BLE001 - connection, timeout, server error: retry elsewhere
            pool.release(url, error=err)
            _drop_client(remote, url)
            failed.append(url)
            if attempt < remote.retries:
                if metrics is not None:
                    others = any(s.healthy and s.url != url for s in pool.states)
                    metrics.record_retry(key, failover=others)
                time.sleep(backoff_s(attempt, base_ms=remote.backoff_ms))
            continue
        pool.release(url)
        if metrics is not None:
            metrics.record_batch(key, rows=len(x), latency_s=time.perf_counter() - t0)
        return select_outputs(card, tensors, n_rows=len(x))
    msg = (
        f"no inference server answered for model {card.name!r} version {card.version!r} "
        f"({remote.model_name!r} version {remote.model_version!r} over {remote.protocol}) "
        f"after {attempts} attempt(s); servers: {pool.describe()}. Start a server, fix "
        "'remote.servers' in the card, or set 'remote.fallback_local: true'"
    )
    raise InferenceServerError(msg)


_executors_lock = threading.Lock()
_executors: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def _forget_after_fork() -> None:
    """A forked child starts with no request threads and no connections of its parent.

    Its copies of the parent's pools have no threads (work would never run),
    and gRPC channels and HTTP connections must not be shared across a fork.
    """
    global _executors_lock, _open_lock, _local, _info_lock, _executors, _client_dicts
    # kept referenced, never used: closing the parent's connections here could block
    _inherited.append((_executors, _client_dicts, _local))
    _executors = {}
    _info_lock = threading.Lock()
    _executors_lock = threading.Lock()
    _open_lock = threading.Lock()
    _local = threading.local()
    _client_dicts = []


_inherited: list[Any] = []
os.register_at_fork(after_in_child=_forget_after_fork)


def _executor(size: int) -> concurrent.futures.ThreadPoolExecutor:
    with _executors_lock:
        ex = _executors.get(size)
        if ex is None:
            ex = _executors[size] = concurrent.futures.ThreadPoolExecutor(
                max_workers=size, thread_name_prefix=f"columnhub-triton-{size}"
            )
        return ex


def run_remote(
    card: ModelCard,
    matrix: np.ndarray,
    *,
    metrics: InferenceMetrics | None = None,
) -> dict[str, np.ndarray]:
    """Run the card's model on its servers on a ``(n_rows, n_features)`` float32 matrix.

    Returns:
        One 1-D array per card output.

    Raises:
        ModelInputError: the served model takes another number of features.
        InferenceServerError: no server answered a batch within the card's
            timeouts and retries.
    """
    remote = _remote(card)
    pool = _pool(remote)
    if not any(s.healthy for s in pool.states) and not pool.probe_all():
        msg = (
            f"every inference server of model {card.name!r} version {card.version!r} is down: "
            f"{pool.describe()}. Start a server or set 'remote.fallback_local: true'"
        )
        raise InferenceServerError(msg)
    info = model_info(card)
    n_rows, n_features = matrix.shape
    if info.n_features is not None and info.n_features != n_features:
        msg = (
            f"served model {remote.model_name!r} version {remote.model_version!r} takes "
            f"{info.n_features} features, but card {card.name!r} lists {n_features} inputs "
            f"({', '.join(card.inputs)}); fix the card's inputs"
        )
        raise ModelInputError(msg)
    if n_rows == 0:
        return {o.name: np.zeros(0, dtype=np.dtype(o.type)) for o in card.outputs}
    max_rows = remote.max_batch_rows
    if info.max_batch_size > 0:
        max_rows = min(max_rows, info.max_batch_size)
    itemsize = np.dtype(_TRITON_TO_NUMPY.get(info.input_datatype, np.float32)).itemsize
    size = batch_rows(
        n_features=n_features,
        max_rows=max_rows,
        max_bytes=remote.max_batch_bytes,
        itemsize=itemsize,
    )
    slices = list(batch_slices(n_rows, size))
    cancelled = threading.Event()
    if len(slices) == 1:
        parts = [_send(card, info, pool, matrix, metrics, cancelled)]
    else:
        executor = _executor(remote.max_in_flight)
        futures = [
            executor.submit(_send, card, info, pool, matrix[sl], metrics, cancelled)
            for sl in slices
        ]
        done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            cancelled.set()
            for f in futures:
                f.cancel()
            concurrent.futures.wait(futures)
            raise failed[0].exception()  # type: ignore[misc]
        parts = [f.result() for f in futures]
    return {
        o.name: np.concatenate([p[o.name] for p in parts]).astype(np.dtype(o.type), copy=False)
        for o in card.outputs
    }
