"""The friend-join column provider: a friend's columns for one primary chunk.

Keyed joins look the chunk's keys up in the friend's :class:`KeyIndex` (built
once per dataset, kept in the column cache and in memory per process), read
only the friend entry ranges that hold partners, and gather; aligned joins
read the same entry range of the friend and verify the keys row by row.

Next to each key index the cache holds its :class:`~columnhub.join.index.IndexFacts`
(uniqueness and the first duplicates, a few hundred bytes): validating a
request needs only those, so a request whose chunks find the friend's
columns in the cache never loads an index (tens of MB each).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import awkward as ak
import numpy as np

from columnhub import sources
from columnhub.datasets import ResolvedDataset
from columnhub.errors import CacheError, JoinError
from columnhub.join.collection import fill_to_counts
from columnhub.join.gather import compact, gather
from columnhub.join.index import IndexFacts, KeyIndex
from columnhub.join.match import Match, fetch_plan, match, unmatched_rows
from columnhub.join.validate import Side, check_aligned, check_unique

if TYPE_CHECKING:
    from columnhub.cache import ColumnCache
    from columnhub.execute.dask import Tasks
    from columnhub.plan import Friend, Plan

__all__ = [
    "FriendRows",
    "Prepared",
    "dataset_index",
    "friend_chunk",
    "prepare",
    "tail_rows",
    "wait_stored",
]

_INDEX_VERSION = 1
_FACTS_VERSION = 1
#: key indexes kept in memory by a process, least recently used out first,
#: at most this many bytes together (the newest is always kept)
_MEMO_BYTES = int(os.environ.get("COLUMNHUB_INDEX_MEMORY", str(1 << 30)))
_memo: OrderedDict[str, KeyIndex] = OrderedDict()
#: facts of the indexes a process has met (small: no bound needed beyond a count)
_facts: OrderedDict[str, IndexFacts] = OrderedDict()
_FACTS_KEPT = 1024
_memo_lock = threading.Lock()
_build_locks: dict[str, threading.Lock] = {}


def _forget_after_fork() -> None:
    # a lock held by another thread at the fork would never be released in the
    # child; the indexes themselves are plain arrays, kept
    global _memo_lock, _build_locks
    _memo_lock = threading.Lock()
    _build_locks = {}


os.register_at_fork(after_in_child=_forget_after_fork)


def _index_key(dataset: ResolvedDataset, keys: Sequence[str]) -> str:
    from columnhub.cache import entry_key

    return entry_key(
        kind="key-index",
        files=dataset.identity,
        tree=dataset.spec.tree,
        keys=list(keys),
        version=_INDEX_VERSION,
    )


def _facts_key(dataset: ResolvedDataset, keys: Sequence[str]) -> str:
    from columnhub.cache import entry_key

    return entry_key(
        kind="key-index-facts",
        files=dataset.identity,
        tree=dataset.spec.tree,
        keys=list(keys),
        version=(_INDEX_VERSION, _FACTS_VERSION),
    )


def _remember_facts(key: str, facts: IndexFacts) -> None:
    with _memo_lock:
        _facts[key] = facts
        _facts.move_to_end(key)
        while len(_facts) > _FACTS_KEPT:
            _facts.popitem(last=False)


#: ``report(dataset_name, files_read, files)`` while a key index is built
IndexProgress = Callable[[str, int, int], None]


#: the key columns of every file of a dataset, in file order (what an index is built from)
KeyReader = Callable[[], list[dict[str, np.ndarray]]]


def _read_keys(
    dataset: ResolvedDataset, keys: Sequence[str], report: IndexProgress | None
) -> list[dict[str, np.ndarray]]:
    parts = []
    for i, file in enumerate(dataset.files):
        read = sources.read(file, dataset.spec, list(keys), start=0, stop=file.entries)
        parts.append({k: np.asarray(ak.to_numpy(read[k])) for k in keys})
        if report is not None:
            report(dataset.spec.name, i + 1, len(dataset.files))
    return parts


#: index stores under way (:func:`_store_later`), waited for by :func:`wait_stored`
_pending: list[Future[CacheError | None]] = []
_pending_lock = threading.Lock()
_store_pool: ThreadPoolExecutor | None = None


def _store_later(cache: ColumnCache, key: str, index: KeyIndex) -> None:
    """Write ``index`` into ``cache`` under ``key`` on a thread of its own.

    Writing a 2M-event index (32 MB) takes 0.03-0.07 s that the request's
    critical path need not wait for: this process holds the index in memory
    (the cache entry serves later processes), so the friend exchange goes on
    while it is written. :func:`wait_stored` waits for the writes (a
    delivery does, before it finishes).
    """
    global _store_pool

    def store() -> CacheError | None:
        try:
            cache.put_bytes(key, index.to_chunks())
        except CacheError as err:  # a full or unwritable cache never fails a request
            return err
        return None

    with _pending_lock:
        if _store_pool is None:
            _store_pool = ThreadPoolExecutor(1, thread_name_prefix="columnhub-index-store")
        _pending.append(_store_pool.submit(store))


def wait_stored() -> list[CacheError]:
    """Wait until every key index built by this process is written to its cache.

    Returns:
        The writes' errors (a full or unwritable cache): the indexes are
        then rebuilt by the next request instead of loaded.
    """
    with _pending_lock:
        pending = list(_pending)
        _pending.clear()
    return [err for err in (f.result() for f in pending) if err is not None]


def dataset_index(
    dataset: ResolvedDataset,
    keys: Sequence[str],
    *,
    cache: ColumnCache | None = None,
    report: IndexProgress | None = None,
    read: KeyReader | None = None,
    persist: bool = True,
) -> KeyIndex:
    """The key index of a whole dataset: from memory, else the cache, else built.

    Building reads only the key columns, file by file (``report`` hears of
    each file read), or takes them from ``read``. A built index is stored in
    the cache unless ``persist`` is false; a built or loaded one leaves its
    :class:`IndexFacts` there.
    """
    key = _index_key(dataset, keys)
    with _memo_lock:
        if key in _memo:
            _memo.move_to_end(key)
            return _memo[key]
        lock = _build_locks.setdefault(key, threading.Lock())
    with lock:  # one build per process even when many chunk tasks ask at once
        if key in _memo:
            return _memo[key]
        index = None
        if cache is not None:
            blob = cache.get_bytes(key)
            if blob is not None:
                index = KeyIndex.from_bytes(blob)
        if index is None:
            parts = read() if read is not None else _read_keys(dataset, keys, report)
            index = KeyIndex.from_files(parts, file_names=[f.path for f in dataset.files])
            del parts
            if cache is not None and persist:
                _store_later(cache, key, index)
        facts_key = _facts_key(dataset, keys)
        if facts_key not in _facts:
            facts = IndexFacts.of(index)
            _remember_facts(facts_key, facts)
            if cache is not None and not cache.contains(facts_key):
                cache.put_bytes(facts_key, facts.to_bytes())
        _remember(key, index)
        with _memo_lock:
            _build_locks.pop(key, None)
        return index


def index_facts(
    dataset: ResolvedDataset,
    keys: Sequence[str],
    *,
    cache: ColumnCache | None = None,
    report: IndexProgress | None = None,
    read: KeyReader | None = None,
    persist: bool = True,
) -> IndexFacts:
    """What validation needs of a dataset's key index, loading the index only if need be.

    From memory, else from the facts stored in the cache next to the index
    (a few hundred bytes), else from the index itself (:func:`dataset_index`:
    loaded, or built with ``read`` / ``report`` / ``persist`` as there).
    """
    key = _facts_key(dataset, keys)
    with _memo_lock:
        known = _facts.get(key)
    if known is not None:
        return known
    if cache is not None:
        blob = cache.get_bytes(key)
        if blob is not None:
            facts = IndexFacts.from_bytes(blob)
            _remember_facts(key, facts)
            return facts
    index = dataset_index(dataset, keys, cache=cache, report=report, read=read, persist=persist)
    with _memo_lock:
        known = _facts.get(key)
    if known is None:  # the index was in memory, its facts no longer
        known = IndexFacts.of(index)
        _remember_facts(key, known)
    return known


def _primary_keys(
    plan: Plan,
    cache: ColumnCache,
    fresh: dict[int, set[str]],
    report: IndexProgress | None,
) -> list[dict[str, np.ndarray]] | None:
    """The primary's key columns per file, read chunk by chunk as the chunk tasks read them.

    Each chunk's key columns land in the column cache under the addresses the
    chunk tasks (and the friend exchange) look up, so the keys are read once
    per request; the addresses stored are added to ``fresh`` (per chunk
    index: the chunk tasks count them as computed for this request, not as
    hits). ``None`` when the chunks do not tile the files (then the index
    reads the files itself).
    """
    from columnhub._concurrency import threads
    from columnhub.execute.chunk import _ChunkWork
    from columnhub.execute.local import run_ordered

    dataset, names = plan.dataset, list(plan.request.dataset.keys)
    by_file: list[list[Any]] = [[] for _ in dataset.files]
    for chunk in plan.chunks:
        by_file[chunk.file_index].append(chunk)
    for info, chunks in zip(dataset.files, by_file, strict=True):
        edges = [0, *(c.stop for c in chunks)]
        if [c.start for c in chunks] != edges[:-1] or edges[-1] != info.entries:
            return None

    def one(chunk: Any) -> tuple[Any, dict[str, np.ndarray], list[str]]:
        work = _ChunkWork(plan, chunk, cache)
        work.resolve(names)
        work.compute()  # reads (and stores) what the cache misses
        columns = {k: np.asarray(ak.to_numpy(work.values[k])) for k in names}
        return chunk, columns, [work.key(n) for n in work.to_read]

    pieces: list[list[dict[str, np.ndarray]]] = [[] for _ in dataset.files]
    done = 0
    for chunk, columns, stored in run_ordered(one, plan.chunks, workers=threads()):
        pieces[chunk.file_index].append(columns)
        if stored:
            fresh.setdefault(chunk.index, set()).update(stored)
        if chunk.stop == dataset.files[chunk.file_index].entries:
            done += 1
            if report is not None:
                report(dataset.spec.name, done, len(dataset.files))
    return [
        {k: np.concatenate([p[k] for p in file_pieces]) if file_pieces else np.zeros(0, np.uint64)
         for k in names}
        for file_pieces in pieces
    ]


def prepare(
    plan: Plan,
    *,
    cache: ColumnCache | None = None,
    report: IndexProgress | None = None,
    tasks: Tasks | None = None,
) -> Prepared:
    """Build (or load) every key index the request needs and validate duplicates.

    Run once per request before the chunk tasks, so a cardinality violation is
    reported before any work and the indexes are warm for the tasks.
    ``report`` hears of every file read while an index is built.

    Given the request's Dask :class:`~columnhub.execute.dask.Tasks` and a
    writable cache (which every worker sees), the indexes are built on the
    cluster instead (:func:`_prepare_on_cluster`): nothing of them passes
    through this process. The friends' indexes are then ready when this
    returns; the primary's (needed only for its duplicate check, and for the
    unmatched rows of right and outer joins) may still be building: call
    :meth:`Prepared.wait` before any part is written.

    On this process only the facts of an index already in the cache are
    loaded (a task that needs the index loads it; none does when the
    friend's columns are cached), and every check is done when this returns.
    The primary's index is built from its key columns read chunk by chunk
    into the column cache, where the chunk tasks find them; it is stored in
    the cache only for a right or outer join (whose tail looks keys up in it).
    ``Prepared.fresh`` holds, per chunk index, the cache addresses stored
    here for this request (the chunk tasks count them as misses, not hits).
    """
    fresh: dict[int, set[str]] = {}
    primary_needed = any(
        f.has_tail or f.spec.validate_ in ("one_to_one", "one_to_many")
        for f in plan.friends
        if f.spec.match == "keyed"
    )
    if tasks is not None and cache is not None and not cache.read_only:
        return _prepare_on_cluster(plan, cache, tasks, primary=primary_needed)
    writable = cache is not None and not cache.read_only

    def primary_facts() -> IndexFacts:
        def read() -> list[dict[str, np.ndarray]]:
            assert cache is not None
            parts = _primary_keys(plan, cache, fresh, report)
            return parts if parts is not None else _read_keys(plan.dataset, keys, report)

        keys = plan.request.dataset.keys
        return index_facts(
            plan.dataset,
            keys,
            cache=cache,
            report=report,
            read=read if writable else None,
            persist=any(f.has_tail for f in plan.friends),
        )

    # the primary's index is built on a thread of its own while the friends' are
    with ThreadPoolExecutor(1, thread_name_prefix="columnhub-index") as pool:
        primary = pool.submit(primary_facts) if primary_needed else None
        try:
            for friend in plan.friends:
                if friend.spec.match != "keyed":
                    continue
                facts = index_facts(
                    friend.dataset, friend.spec.friend_keys, cache=cache, report=report
                )
                check_unique(
                    facts, side="friend", validate=friend.spec.validate_, dataset=friend.spec.name
                )
        except BaseException:
            if primary is not None:
                primary.cancel()  # leaving the pool waits for a build already running
            raise
        if primary is not None:
            found = primary.result()
            for friend in plan.friends:
                check_unique(
                    found,
                    side="primary",
                    validate=friend.spec.validate_,
                    dataset=plan.request.dataset.name,
                )
    return Prepared(fresh=fresh)

# the same on a Dask cluster: key pieces read as tasks, merged and checked on a worker

#: ``(side, validate, dataset name)`` of each uniqueness check an index must pass
_Check = tuple[Side, str, str]


def _key_piece(
    dataset: ResolvedDataset, keys: Sequence[str], file: int, start: int, stop: int
) -> dict[str, np.ndarray]:
    """Task: the key columns of entries ``[start, stop)`` of file number ``file``."""
    read = sources.read(dataset.files[file], dataset.spec, list(keys), start=start, stop=stop)
    return {k: np.asarray(ak.to_numpy(read[k])) for k in keys}


def _remember(key: str, index: KeyIndex) -> None:
    """Keep ``index`` in this process's memory (a worker's next tasks find it there)."""
    with _memo_lock:
        _memo[key] = index
        _memo.move_to_end(key)
        while len(_memo) > 1 and sum(i.nbytes for i in _memo.values()) > _MEMO_BYTES:
            _memo.popitem(last=False)


def _merge_index(
    dataset: ResolvedDataset,
    keys: Sequence[str],
    files: Sequence[int],
    cache: ColumnCache,
    *pieces: dict[str, np.ndarray],
) -> KeyIndex:
    """Task: the dataset's key index from its pieces (in file and entry order).

    ``files`` is the file number of each piece; without pieces the index is
    loaded from ``cache``. The index is kept in this worker's memory and
    returned: the tasks that match against it take it as an argument (it
    travels worker to worker), while :func:`_store_index` stores it in the
    cache and checks it.
    """
    key = _index_key(dataset, keys)
    index = None
    blob = cache.get_bytes(key)  # a retry, or another request, may have stored it
    if blob is not None:
        index = KeyIndex.from_bytes(blob)
    else:
        per_file: list[list[dict[str, np.ndarray]]] = [[] for _ in dataset.files]
        for f, piece in zip(files, pieces, strict=True):
            per_file[f].append(piece)
        parts = [
            {k: np.concatenate([p[k] for p in ps]) for k in keys} if len(ps) > 1 else ps[0]
            for ps in per_file
        ]
        index = KeyIndex.from_files(parts, file_names=[f.path for f in dataset.files])
    _remember(key, index)
    return index


def _store_index(
    dataset: ResolvedDataset,
    keys: Sequence[str],
    cache: ColumnCache,
    checks: Sequence[_Check],
    index: KeyIndex,
) -> Exception | None:
    """Task: store ``index`` (:func:`_merge_index`'s) in ``cache``, and check it.

    Stored under the address :func:`dataset_index` looks up. A failed check is
    *returned* (the client raises it): an error raised here would be retried
    as if a worker had died.
    """
    key = _index_key(dataset, keys)
    if not cache.contains(key):
        cache.put_bytes(key, index.to_chunks())
    for side, validate, name in checks:
        try:
            check_unique(index, side=side, validate=validate, dataset=name)
        except JoinError as err:
            return err
    return None


def _adopt(indexes: Mapping[str, KeyIndex]) -> None:
    """Keep the indexes a task was given (by cache address) in this worker's memory."""
    for key, index in indexes.items():
        with _memo_lock:
            known = _memo.get(key)
        if known is not index:
            _remember(key, index)


class Prepared:
    """Key index checks still running on a cluster (see :func:`prepare`).

    Attributes:
        fresh: per chunk index, the cache addresses stored for this request.
        indexes: the friends' key indexes being built on the cluster, by cache
            address (futures): the exchange's tasks take them as arguments,
            so they start as soon as the index exists, before it is stored.
    """

    def __init__(
        self,
        tasks: Tasks | None = None,
        checks: Sequence[Any] = (),
        held: Sequence[Any] = (),
        *,
        fresh: dict[int, set[str]] | None = None,
        indexes: Mapping[str, Any] | None = None,
        friends: int = 0,
    ) -> None:
        #: per chunk index, the cache addresses stored for this request (counted as misses)
        self.fresh: dict[int, set[str]] = fresh if fresh is not None else {}
        self.indexes: dict[str, Any] = dict(indexes or {})
        self._tasks = tasks
        self._checks = list(checks)  # futures of the store tasks (a failed check or None)
        self._friends = friends  # the first ``friends`` checks are the friends'
        self._held = list(held)  # those and the tasks they take

    def wait_friends(self) -> None:
        """Wait for the friends' checks; the first that failed is raised here."""
        if self._tasks is None or not self._friends:
            return
        friends, self._friends = self._checks[: self._friends], 0
        for error in self._tasks.gather(friends):
            if error is not None:
                raise error

    def wait(self) -> None:
        """Wait for the checks (the friends' first); the first that failed is raised here."""
        if self._tasks is None:
            return
        try:
            self.wait_friends()
            for error in self._tasks.gather(self._checks):
                if error is not None:
                    raise error
        finally:
            self.release()

    def release(self) -> None:
        """Drop what the checks hold, cancelling what still runs (after an error elsewhere)."""
        if self._tasks is not None:
            self._tasks.release(self._held)
            self._tasks = None
        self._held = []
        self.indexes = {}


def _prepare_on_cluster(
    plan: Plan, cache: ColumnCache, tasks: Tasks, *, primary: bool
) -> Prepared:
    """:func:`prepare` on the cluster: each index from key pieces read in parallel.

    A dataset's keys are read as one task per run of baskets (row groups) of
    about ``chunk_size`` entries, and merged into the index by one task per
    dataset, which keeps it (a future: the friend exchange's tasks take it);
    one more task per dataset stores it in the column cache and checks
    duplicates. An index already in the cache is loaded (on a worker, which
    keeps it in memory) and checked. Nothing is waited for here: the
    exchange waits for the friends' checks before it gathers anything
    (:meth:`Prepared.wait_friends`), and :meth:`Prepared.wait` for the rest.
    """
    from columnhub.plan import split_entries

    wanted: list[tuple[ResolvedDataset, tuple[str, ...], list[_Check]]] = []
    for friend in plan.friends:
        if friend.spec.match == "keyed":
            wanted.append(
                (
                    friend.dataset,
                    tuple(friend.spec.friend_keys),
                    [("friend", friend.spec.validate_, friend.spec.name)],
                )
            )
    friends = len(wanted)
    if primary:
        wanted.append(
            (
                plan.dataset,
                tuple(plan.request.dataset.keys),
                [("primary", f.spec.validate_, plan.request.dataset.name) for f in plan.friends],
            )
        )
    checks = []
    indexes: dict[str, Any] = {}
    held: list[Any] = []
    size = max(1, plan.request.chunk_size)
    try:
        for n, (dataset, keys, checked) in enumerate(wanted):
            key = _index_key(dataset, keys)
            # a friend's index first (the exchange waits for it), its store and the
            # primary's index (waited for only before the parts) after the exchange's tasks
            first = {"priority": 1} if n < friends else {"priority": -1}
            pieces: list[Any] = []
            files: list[int] = []
            if not cache.contains(key):
                for f, info in enumerate(dataset.files):
                    ranges = split_entries(info.boundaries, size) or [(0, info.entries)]
                    for start, stop in ranges:
                        pieces.append(
                            tasks.submit(
                                _key_piece, dataset, keys, f, start, stop,
                                key=f"index-{n}-read-{f:05d}-{start}", **first,
                            )
                        )
                        files.append(f)
            merged = tasks.submit(
                _merge_index, dataset, keys, files, cache, *pieces, key=f"index-{n}-merge",
                **first,
            )
            if n < friends:
                indexes[key] = merged
            checks.append(
                tasks.submit(
                    _store_index, dataset, keys, cache, checked, merged, key=f"index-{n}-store",
                    priority=-1,
                )
            )
            # the pieces are not held: the merge, until it has run, keeps them
            held += [merged, checks[-1]]
    except BaseException:
        tasks.release(held)
        raise
    return Prepared(tasks, checks, held, indexes=indexes, friends=friends)


@dataclass(frozen=True)
class FriendRows:
    """A friend's part of one primary chunk.

    Attributes:
        match: the row pairs (primary rows per output row; ``-1``-free unless
            the chunk is a right/outer tail).
        columns: friend column name (as in the request) -> array per output row.
        entries_read: friend entries read.
        bytes_read: bytes of the friend columns read (arrays in memory).
    """

    match: Match
    columns: dict[str, ak.Array]
    entries_read: int
    bytes_read: int = 0


def _read_ranges(
    dataset: ResolvedDataset, columns: list[str], ranges: Sequence[tuple[int, int, int]]
) -> dict[str, ak.Array]:
    from columnhub.errors import ColumnhubError
    from columnhub.sources._identity import verify_unchanged

    pieces: dict[str, list[ak.Array]] = {c: [] for c in columns}
    for file, start, stop in ranges:
        info = dataset.files[file]
        try:
            read = sources.read(info, dataset.spec, columns, start=start, stop=stop, verify=False)
        except ColumnhubError as err:  # a file rewritten under an open tree reads as corrupt
            verify_unchanged(info, dataset.spec, cause=err)
            raise
        for c in columns:
            pieces[c].append(read[c])
    for file in sorted({r[0] for r in ranges}):  # once per file, after its last read
        verify_unchanged(dataset.files[file], dataset.spec)
    return {
        c: (ak.concatenate(p) if len(p) > 1 else p[0]) if p else ak.Array(np.zeros(0))
        for c, p in pieces.items()
    }


def _fetch(
    friend: Friend, index: KeyIndex, rows: np.ndarray, names: list[str]
) -> tuple[dict[str, ak.Array], int, int]:
    # Friend columns are always option-typed (None where a row has no partner),
    # whatever ``how`` and whatever the chunk: one schema for every part.
    if not names:
        return {}, 0, 0
    plan = fetch_plan(index, rows)
    ranges = plan.ranges or ((0, 0, 0),)  # no partner at all: an empty, typed read
    raw = _read_ranges(friend.dataset, names, ranges)
    read_bytes = sum(int(a.nbytes) for a in raw.values())
    # packed: a view would keep (and cache) the whole friend read in every chunk
    gathered = {c: compact(gather(raw[c], plan.rows, optional=True)) for c in names}
    return gathered, plan.entries_read, read_bytes


def friend_chunk(
    plan: Plan,
    friend: Friend,
    keys: Mapping[str, Any],
    *,
    chunk_file: int,
    chunk_start: int,
    wanted: Sequence[str],
    cache: ColumnCache | None = None,
) -> FriendRows:
    """The friend columns ``wanted`` (request names) for one primary chunk.

    Args:
        plan: the request's plan.
        friend: the friend.
        keys: the primary chunk's key columns (primary names, primary rows).
        chunk_file: the chunk's file number in the primary dataset.
        chunk_start: the chunk's first entry in that file.
        wanted: friend columns to provide, by their names in the request
            (``<name>_matched`` included).
        cache: where key indexes are kept.
    """
    spec = friend.spec
    columns = {spec.output_name(c): c for c in spec.columns}
    names = list(dict.fromkeys(columns[w] for w in wanted if w in columns))  # each read once
    primary_keys = [np.asarray(ak.to_numpy(keys[k])) for k in plan.request.dataset.keys]
    n = len(primary_keys[0])
    if spec.match == "aligned":
        info = friend.dataset.files[chunk_file]
        read = sources.read(
            info,
            friend.dataset.spec,
            [*spec.friend_keys, *[c for c in names if c not in spec.friend_keys]],
            start=chunk_start,
            stop=chunk_start + n,
        )
        check_aligned(
            dict(zip(plan.request.dataset.keys, primary_keys, strict=True)),
            {k: np.asarray(ak.to_numpy(read[k])) for k in spec.friend_keys},
            primary_file=plan.dataset.files[chunk_file].path,
            primary_start=chunk_start,
            friend_file=info.path,
            friend_start=chunk_start,
        )
        out = {w: read[columns[w]] for w in wanted if w in columns}
        rows = np.arange(n, dtype=np.int64)
        read_bytes = sum(int(a.nbytes) for a in read.values())
        result = FriendRows(Match(rows, rows, primary_identity=True), out, n, read_bytes)
    else:
        index = dataset_index(friend.dataset, spec.friend_keys, cache=cache)
        m = match(
            dict(zip(spec.friend_keys, primary_keys, strict=True)),
            index,
            how="left",
            validate=spec.validate_,
        )
        fetched, read_n, read_bytes = _fetch(friend, index, m.friend_rows, names)
        out = {spec.output_name(c): a for c, a in fetched.items()}
        result = FriendRows(m, out, read_n, read_bytes)
    if spec.matched_name in wanted:
        result.columns[spec.matched_name] = ak.Array(result.match.friend_rows >= 0)
    return result


def tail_rows(
    plan: Plan, friend: Friend, *, wanted: Sequence[str], cache: ColumnCache | None = None
) -> tuple[dict[str, ak.Array], dict[str, ak.Array]]:
    """Friend rows with no primary partner (right and outer joins).

    Returns:
        ``(keys, columns)``: the rows' keys under the *primary* key names, and
        the wanted friend columns (request names, ``matched`` all false).
    """
    spec = friend.spec
    index = dataset_index(friend.dataset, spec.friend_keys, cache=cache)
    primary = dataset_index(plan.dataset, plan.request.dataset.keys, cache=cache)
    friend_keys = index.key_columns()
    rows = unmatched_rows(friend_keys, primary)
    keys = {
        p: ak.Array(friend_keys[f][rows])
        for p, f in zip(plan.request.dataset.keys, spec.friend_keys, strict=True)
    }
    columns = {spec.output_name(c): c for c in spec.columns}
    names = [columns[w] for w in wanted if w in columns]
    fetched, _, _ = _fetch(friend, index, rows, names)
    out = {spec.output_name(c): a for c, a in fetched.items()}
    for name, array in out.items():  # the type a primary collection's member has in chunks
        if plan.columns[name].source.get("counter") is not None:
            out[name] = fill_to_counts(array, ak.fill_none(ak.num(array, axis=1), 0))
    if spec.matched_name in wanted:
        out[spec.matched_name] = ak.Array(np.zeros(len(rows), dtype=bool))
    return keys, out
