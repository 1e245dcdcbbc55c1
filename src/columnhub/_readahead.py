"""Read-ahead while a new process imports the engine (private).

``columnhub deliver`` in a new process spends its first ~0.3 s importing
(awkward, pydantic, pyarrow) and validating the request on one core, while
the other cores wait. For local Parquet files the first reads are certain:
for a keyed join the key columns of the primary and of each friend (to match
them) and the friend's columns (the exchange), and the request's own columns
of a Parquet primary. :func:`start` reads them on a thread of its own
meanwhile, row group by row group, as Arrow tables held here; :func:`take`
hands a read those row groups instead of reading them again. Only the
command line arms it (:func:`arm`), and
:func:`columnhub.delivery.deliver` starts it once the request is not a
whole-result cache hit; a notebook has its imports done already.

It never changes a result:

- a read takes held row groups only when they hold every column it asks for,
  and only if the file is still the one the plan saw: the size, modification
  time, inode and device recorded before and after reading the held groups,
  and the footer's digest, must all equal the plan's (``FileInfo.check``);
  the reader then checks the file again after its read, as it always does;
- anything uncertain is skipped: the spec is parsed with plain JSON/YAML
  (globs, URLs, datasets by name, several samples: nothing is read ahead), a
  column the file lacks is not read, an error stops the read-ahead silently
  (the delivery then reads, and reports, as usual);
- at most ``$COLUMNHUB_READAHEAD_BYTES`` (default 512 MiB, uncompressed, from
  the footers) is held, and :func:`close` (at the end of the delivery) stops
  it and lets go of everything.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from columnhub._checksum import footer_hash, local_stamp

if TYPE_CHECKING:
    from columnhub.cache import ColumnCache
    from columnhub.plan import Plan

__all__ = ["arm", "close", "remember", "start", "take"]

_BUDGET_ENV = "COLUMNHUB_READAHEAD_BYTES"
#: the spec's default event keys (``columnhub.spec.CMS_KEYS``; not imported: pydantic)
_CMS_KEYS = ("run", "luminosityBlock", "event")

_armed: dict[str, Any] = {}
_state: _ReadAhead | None = None


def arm(source: str | os.PathLike[str]) -> None:
    """Read ahead for the spec file ``source`` when :func:`start` is next called for it."""
    _armed["source"] = os.fspath(source)


def start(request: Any, cache: ColumnCache | None) -> None:
    """Start reading ahead for ``request`` if it is the spec file :func:`arm` named.

    ``cache``: the column cache opened for the request, where an earlier
    request may have noted that a friend needs no exchange (:func:`remember`).
    """
    global _state
    source = _armed.pop("source", None)
    if source is None or not isinstance(request, str | os.PathLike) or os.fspath(request) != source:
        return
    close()
    with contextlib.suppress(Exception):  # only a guess: a spec it cannot read, none
        reads = _wanted(source, cache)
        if not reads:
            return
        # pyarrow is imported here, before the thread starts: imported on the
        # thread it would share the GIL with the engine's imports and start
        # reading ~0.1 s later, when the engine is nearly ready to read itself
        import pyarrow.parquet  # noqa: F401

        _state = _ReadAhead(reads)
        _state.thread.start()


def remember(cache: ColumnCache | None, plan: Plan) -> None:
    """Note in ``cache`` that the columns of ``plan``'s keyed Parquet friends are in it now.

    A later process reading ahead for the same primary and friend files and
    columns then reads nothing: its friend columns are in the cache already,
    and reading the files ahead would only take memory and cores from it.
    Only a hint: if the entries are gone (or were chunked otherwise) the
    request reads the friend as usual; a note that cannot be written is left
    out.
    """
    if cache is None or cache.read_only:
        return
    primary = [f.path for f in plan.dataset.files]
    for friend in plan.friends:
        files = friend.dataset.files
        if friend.spec.match != "keyed" or any(f.format != "parquet" for f in files):
            continue
        with contextlib.suppress(Exception):
            key = _exchanged_key(primary, [f.path for f in files], friend.spec.columns)
            cache.put_bytes(key, b"")


def _exchanged_key(primary: Sequence[str], friend: Sequence[str], columns: Sequence[str]) -> str:
    from columnhub.cache.addressing import entry_key

    def files(paths: Sequence[str]) -> list[list[Any]]:
        return [[os.path.realpath(p), *local_stamp(p).values()] for p in paths]

    return entry_key(
        kind="readahead-exchanged",
        primary=files(primary),
        friend=files(friend),
        columns=sorted(columns),
    )


def take(path: str, groups: Sequence[int], columns: Sequence[str], check: Any) -> list[Any]:
    """Each of the row groups ``groups`` of ``path`` with ``columns``: an Arrow table, or ``None``.

    ``None``: not read ahead, so the caller reads it (a group planned but not
    started yet is left to the caller). ``check`` is the plan's
    ``FileInfo.check`` of the file: held groups are given only when read from
    that same file. Waits for a group being read.
    """
    state = _state
    if state is None:
        return [None] * len(groups)
    return state.take(path, list(groups), list(columns), dict(check))


def close() -> None:
    """Stop reading ahead and let go of everything held."""
    global _state
    state, _state = _state, None
    if state is not None:
        state.stop()


def _budget() -> int:
    try:
        return int(os.environ.get(_BUDGET_ENV, str(512 << 20)))
    except ValueError:
        return 512 << 20


def _wanted(source: str, cache: ColumnCache | None) -> list[tuple[str, list[str]]]:
    """``(file, columns)`` to read, in order.

    For each keyed friend that is a list of local Parquet files whose columns
    the ``cache`` has no note of (:func:`remember`): the primary's keys (if it
    is Parquet), the friend's keys, then its columns. Then, if the primary is
    a list of local Parquet files, the request's columns (those a file lacks
    are left out when it is read). Empty unless the primary is a list of local
    files.
    """
    text = Path(source).read_text(encoding="utf-8")
    if source.endswith(".json"):
        data = json.loads(text)
    else:
        from columnhub import _yaml

        data = _yaml.load(text)
    if not isinstance(data, dict) or "samples" in data:
        return []
    folder = Path(source).resolve().parent

    def local(dataset: Any) -> list[str]:
        """The dataset's files when each is a plain local path, else ``[]``."""
        entries = dataset.get("files") if isinstance(dataset, dict) else None
        if not isinstance(entries, list):
            return []
        out = []
        for entry in entries:
            if not isinstance(entry, str) or "://" in entry or any(c in entry for c in "*?["):
                return []
            out.append(str(folder / entry))  # an absolute entry stays itself
        return out

    def files(dataset: Any) -> list[str]:
        """The dataset's files when each is a local Parquet file, else ``[]``."""
        paths = local(dataset)
        return paths if all(p.endswith(".parquet") for p in paths) else []

    def keys(dataset: Any, on: Any = None) -> list[str]:
        names = on if on is not None else dataset.get("keys", _CMS_KEYS)
        return [str(n) for n in names] if isinstance(names, list | tuple) else []

    dataset = data.get("dataset")
    friends = data.get("friends") or []
    keyed = [
        f
        for f in (friends if isinstance(friends, list) else [])
        if isinstance(f, dict)
        and f.get("match", "keyed") == "keyed"
        and isinstance(f.get("dataset"), dict)
    ]
    everything = local(dataset)  # ROOT or Parquet: what a note in the cache is about
    if not everything:  # several samples (a fileset), a dataset by name: none
        return []
    primary = files(dataset)
    primary_keys = keys(dataset)
    asked = [c for c in data.get("columns") or [] if isinstance(c, str)]
    first: list[tuple[str, list[str]]] = []
    then: list[tuple[str, list[str]]] = []
    for friend in keyed:
        paths = files(friend["dataset"])
        columns = [c for c in friend.get("columns", []) if isinstance(c, str)]
        noted = cache is not None and cache.contains(_exchanged_key(everything, paths, columns))
        if not paths or noted:
            continue
        names = keys(friend["dataset"], friend.get("on"))
        first += [(f, names) for f in paths]
        then += [(f, columns) for f in paths]
    reads = [(f, primary_keys) for f in primary] + first + then if then else []
    if primary and asked:  # the request's own columns (those in the files), read last
        # with a join, the keys were read first; alone, a chunk reads them with its columns
        own = [c for c in asked if c not in primary_keys] if then else [*primary_keys, *asked]
        reads += [(f, list(dict.fromkeys(own))) for f in primary]
    return reads


class _ReadAhead:
    def __init__(self, reads: list[tuple[str, list[str]]]) -> None:
        self.reads = reads
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        #: (path, group) -> what each pass over the file read of that group
        self.groups: dict[tuple[str, int], list[_Held]] = {}
        self.thread = threading.Thread(target=self._run, name="columnhub-readahead", daemon=True)

    def _run(self) -> None:
        try:  # reading ahead is only a guess: on any error the delivery reads (and reports)
            with contextlib.suppress(Exception):
                self._read(self._plan())
        finally:
            with self.lock:
                for passes in self.groups.values():
                    for held in passes:
                        held.done.set()

    def _plan(self) -> list[_Pass]:
        """Every pass, registered before any is read: a read that comes first waits for it."""
        import pyarrow.parquet as pq

        left = _budget()
        passes = []
        for path, wanted in self.reads:
            before = local_stamp(path)
            handle = pq.ParquetFile(path)
            present = set(handle.schema_arrow.names)
            columns = list(dict.fromkeys(c for c in wanted if c in present))
            meta = handle.metadata
            size = sum(
                meta.row_group(g).column(i).total_uncompressed_size
                for g in range(meta.num_row_groups)
                for i in range(meta.num_columns)
                if meta.schema.column(i).path.split(".")[0] in columns
            )
            if not columns or size > left:
                continue
            left -= size
            held = [_Held(columns) for _ in range(meta.num_row_groups)]
            with self.lock:
                for group, one in enumerate(held):
                    self.groups.setdefault((path, group), []).append(one)
            passes.append(_Pass(path, before, handle, columns, held))
        return passes

    def _read(self, passes: list[_Pass]) -> None:
        """Read the passes' groups that no read claimed; give each out with the file's stamp."""
        for one in passes:
            read = []
            for group, held in enumerate(one.held):
                with self.lock:
                    if self.stopping.is_set():
                        return
                    if held.state != "planned":  # a read claimed it: read there
                        continue
                    held.state = "reading"
                held.table = one.handle.read_row_group(
                    group, columns=one.columns, use_threads=False
                )
                read.append(held)
            stamp = local_stamp(one.path)
            if stamp != one.before:  # changed while read: none of it is given out
                return
            stamp["footer"] = footer_hash(one.path)
            for held in read:
                held.stamp = stamp
                held.done.set()

    def take(
        self, path: str, groups: list[int], columns: list[str], check: dict[str, Any]
    ) -> list[Any]:
        wanted = set(columns)
        with self.lock:
            found = [
                next((h for h in self.groups.get((path, g), []) if wanted <= set(h.columns)), None)
                for g in groups
            ]
            for held in found:
                if held is not None and held.state == "planned":  # not started: read it here
                    held.state = "claimed"
        tables = []
        for held in found:
            if held is None or held.state == "claimed":
                tables.append(None)
                continue
            held.done.wait()
            usable = held.table is not None and held.stamp is not None
            if usable and any(check.get(k) != v for k, v in held.stamp.items()):
                usable = False  # not the file the plan saw
            tables.append(held.table.select(columns) if usable else None)
        return tables

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.ident is not None:  # started
            self.thread.join()
        with self.lock:
            self.groups.clear()


@dataclass(eq=False)  # held by identity: two reads of a group are not "equal"
class _Held:
    """One row group read ahead: its table once read, and the file's stamp then."""

    columns: list[str]
    #: planned, reading (then done is set), or claimed by a read that came first
    state: str = "planned"
    done: threading.Event = field(default_factory=threading.Event)
    table: Any = None
    stamp: dict[str, Any] | None = None


@dataclass
class _Pass:
    """One file's groups to read with some columns (``before``: its stamp when opened)."""

    path: str
    before: dict[str, int]
    handle: Any
    columns: list[str]
    held: list[_Held]
