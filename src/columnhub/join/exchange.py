"""The friend exchange: a scattered keyed friend read once per request.

A keyed friend whose rows lie in another order than the primary's (shuffled,
re-sorted, regrouped into other files) makes every primary chunk need rows
from the same friend row groups: read chunk by chunk, the whole friend would be
read and decoded once per chunk. The exchange (the shuffle of a distributed
hash join) runs once per request, before the chunk tasks:

1. :func:`match_chunk`, one task per primary chunk: the chunk's key columns
   are read (and stored in the column cache exactly as the chunk task stores
   them) and matched against the friend's key index.
2. :func:`route`, pure: the friend's *blocks* (row groups, or ROOT basket
   ranges, merged up to about a chunk's size and never split, so no basket or
   row group is in two blocks) and, per block, which chunk rows take which of
   its entries. The exchange runs only when some block is needed by several
   chunks (:attr:`Routing.repeated`); otherwise reading per chunk reads each
   block once anyway.
3. :func:`read_block`, one task per block: the block's needed entry range is
   read once and its rows are cut into one piece per chunk that needs them.
4. :func:`assemble_chunk`, one task per chunk: the chunk's pieces become its
   friend columns in primary-row order (``None`` where no partner, lists of a
   primary collection filled to the counter and checked), stored under the
   address the chunk task looks up. The chunk task then finds them and never
   touches the friend, and so does any later request over those chunks: the
   columns are read like an aligned friend's.

Pieces stay in memory while they fit ``$COLUMNHUB_EXCHANGE_MEMORY`` bytes
(default 1 GiB); beyond it, the pieces read so far are concatenated per chunk
and spilled as one round to a temporary store under the request's staging
directory, and each chunk is assembled from its rounds at the end. Without a
writable column cache the assembled columns go to that temporary store too
(:attr:`Exchanged.store`, which the chunk tasks then read), and it is deleted
after the request.

``$COLUMNHUB_EXCHANGE=0`` turns the exchange off (for comparisons).

Every task is a module-level function of picklable arguments that writes only
content-addressed entries (idempotent, retryable). :func:`exchange` runs them
on the local thread pool, or, given the request's Dask
:class:`~columnhub.execute.dask.Tasks`, on the cluster's workers: one match
task and one locate task (:func:`locate_rows`) per primary chunk, one small
route task per friend (:func:`combine_routes`), one read task per friend
block (given its block's routing alone, so reads spread over the workers) and one assemble task per chunk, each waiting for the futures it takes
(reads for the routing, an assembly for the reads of its chunk's blocks).
There the pieces travel through a spill store under the staging directory
(which every worker sees) and only small metadata comes back to the client:
block counts, reads, bytes and cache addresses.

One-to-many friends (rows expand) and the unmatched friend rows of right and
outer joins (the tail, read once after the chunks) stay on the per-chunk path.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import awkward as ak
import numpy as np

from columnhub import sources
from columnhub.errors import CacheError, JoinError, SpecError
from columnhub.join.gather import compact, gather
from columnhub.join.match import Match, match

if TYPE_CHECKING:
    from columnhub.cache import ColumnCache, ColumnLookup
    from columnhub.execute.dask import Tasks
    from columnhub.join.index import KeyIndex
    from columnhub.join.provider import Prepared
    from columnhub.plan import Chunk, Friend, Plan

__all__ = [
    "MEMORY_ENV",
    "SWITCH_ENV",
    "Block",
    "ChunkMatch",
    "ChunkRoute",
    "Exchanged",
    "FriendExchange",
    "Pieces",
    "Routing",
    "assemble_chunk",
    "blocks",
    "combine_routes",
    "exchange",
    "locate_rows",
    "match_chunk",
    "memory_budget",
    "read_block",
    "route",
]

#: bytes of friend pieces held in memory before a round is spilled
MEMORY_ENV = "COLUMNHUB_EXCHANGE_MEMORY"
_DEFAULT_MEMORY = 1 << 30
#: ``0`` / ``off`` turns the exchange off (friends read chunk by chunk, as before it)
SWITCH_ENV = "COLUMNHUB_EXCHANGE"
_SPILL_VERSION = 1
#: test hook: seconds each block read sleeps before it starts (tests kill a
#: worker while it reads); never set it outside tests
_SLEEP_ENV = "COLUMNHUB_TEST_EXCHANGE_SLEEP"


def memory_budget() -> int:
    """The exchange's memory budget in bytes (``$COLUMNHUB_EXCHANGE_MEMORY``, default 1 GiB).

    Raises:
        SpecError: the variable is not a positive integer.
    """
    raw = os.environ.get(MEMORY_ENV)
    if raw is None or not raw.strip():
        return _DEFAULT_MEMORY
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        msg = (
            f"{MEMORY_ENV}={raw!r} is not a positive whole number of bytes; set it to e.g. "
            f"{_DEFAULT_MEMORY} (1 GiB) or unset it"
        )
        raise SpecError(msg)
    return value


@dataclass(frozen=True)
class Block:
    """Entries ``[start, stop)`` of friend file ``file``: whole row groups or basket ranges."""

    file: int
    start: int
    stop: int


def blocks(boundaries: Sequence[Sequence[int]], target: int) -> list[Block]:
    """A dataset's blocks: consecutive row groups of each file merged up to ``target`` entries.

    A row group (basket range) is never split, so no row group is in two blocks.

    >>> [(b.file, b.start, b.stop) for b in blocks([[0, 10, 20, 30], [0, 50]], 20)]
    [(0, 0, 20), (0, 20, 30), (1, 0, 50)]
    """
    out: list[Block] = []
    for f, edges in enumerate(boundaries):
        edges = [int(e) for e in edges]
        start = edges[0]
        for lo, hi in itertools.pairwise(edges):
            if hi - start > target and lo > start:
                out.append(Block(f, start, lo))
                start = lo
        if edges[-1] > start:
            out.append(Block(f, start, edges[-1]))
    return out


@dataclass(frozen=True)
class ChunkMatch:
    """One primary chunk matched against the exchanged friends.

    Attributes:
        chunk: the chunk.
        rows: friend name -> ``int64`` friend dataset row per chunk row (``-1``: none).
        values: the chunk's key columns and the counters friend lists fill.
        fresh: addresses of the columns read (not found) and stored.
    """

    chunk: Chunk
    rows: dict[str, np.ndarray]
    values: dict[str, Any]
    fresh: tuple[str, ...] = ()


@dataclass(frozen=True)
class Routing:
    """Where a friend's needed rows are, block by block.

    Attributes:
        blocks: the blocks holding needed rows, in file and entry order.
        ranges: per block, the entry range ``[start, stop)`` to read (within it).
        targets: per block, ``(chunk, positions, entries)`` for every chunk
            needing rows of it: the chunk's number among the matches routed,
            its rows, and the entries they take (relative to the range start).
    """

    blocks: tuple[Block, ...]
    ranges: tuple[tuple[int, int], ...]
    targets: tuple[tuple[tuple[int, np.ndarray, np.ndarray], ...], ...]

    @property
    def repeated(self) -> int:
        """Block reads saved: pairs of (chunk, block) beyond one read per block."""
        return sum(len(t) for t in self.targets) - len(self.blocks)


def _friend_names(plan: Plan, friend: Friend) -> list[str]:
    return [
        n for n, c in plan.columns.items()
        if c.kind == "friend" and c.source["friend"] == friend.spec.name
    ]


def _read_names(plan: Plan, friend: Friend) -> list[str]:
    names = (plan.columns[n].source["column"] for n in _friend_names(plan, friend))
    return list(dict.fromkeys(c for c in names if c is not None))


def _counters(plan: Plan, friends: Iterable[Friend]) -> list[str]:
    counters = (
        plan.columns[n].source.get("counter") for f in friends for n in _friend_names(plan, f)
    )
    return list(dict.fromkeys(c for c in counters if c is not None))


def _index(plan: Plan, friend: Friend, cache: ColumnCache | None) -> KeyIndex:
    from columnhub.join.provider import dataset_index

    return dataset_index(friend.dataset, friend.spec.friend_keys, cache=cache)


def match_chunk(
    plan: Plan,
    chunk: Chunk,
    *,
    friends: Sequence[str],
    store: ColumnCache | None = None,
    cache: ColumnCache | None = None,
    held: HeldColumns | None = None,
) -> ChunkMatch:
    """Task: read one chunk's keys (and counters) and match them against each friend.

    Args:
        plan: the request's plan.
        chunk: the primary chunk.
        friends: names of the friends to match.
        store: where the key columns go (and are looked up first), under the
            addresses the chunk task uses: the column cache, or the request's
            temporary store.
        cache: where key indexes are kept.
        held: (same process only) where the key columns read are handed to
            the chunk tasks in memory, stored behind them, instead of being
            stored in ``store`` first.
    """
    from columnhub.execute.chunk import _ChunkWork

    chosen = [plan.friend(n) for n in friends]
    names = [*plan.request.dataset.keys, *_counters(plan, chosen)]
    work = _ChunkWork(plan, chunk, store)
    work.resolve(names)
    if held is not None:
        work.cache = None  # what is read goes to ``held`` below, not to the store now
    work.compute()  # reads and stores what it misses; no friend is joined for these names
    if held is not None:
        for name in [*work.to_read, *work.to_compute]:
            value = work.values[name]
            held.hold(work.key(name), value if isinstance(value, ak.Array) else ak.Array(value))
    keys = [np.asarray(ak.to_numpy(work.values[k])) for k in plan.request.dataset.keys]
    rows = {}
    for friend in chosen:
        found = match(
            dict(zip(friend.spec.friend_keys, keys, strict=True)),
            _index(plan, friend, cache),
            how="left",
            validate=friend.spec.validate_,
        )
        rows[friend.spec.name] = found.friend_rows
    fresh = tuple(work.key(n) for n in [*work.to_read, *work.to_compute])
    counters = _counters(plan, chosen)
    # keys are kept only for the messages of a collection check (memory: all chunks are held)
    kept = names if counters else counters
    return ChunkMatch(chunk, rows, {n: work.values[n] for n in kept}, fresh)


def route(
    index: KeyIndex, friend: str, matches: Sequence[ChunkMatch], layout: Sequence[Block]
) -> Routing:
    """Pure: which chunk rows take which entries of which block.

    Args:
        index: the friend's key index.
        friend: the friend's name (its rows in each :class:`ChunkMatch`).
        matches: the matched chunks, by chunk number.
        layout: every block of the friend (:func:`blocks`).
    """
    return combine_routes(
        [locate_rows(index, m.rows[friend], layout) for m in matches], layout
    )


#: one chunk's rows by block: block number (in the layout) -> ``(positions, entries)``
ChunkRoute = dict[int, tuple[np.ndarray, np.ndarray]]


def locate_rows(index: KeyIndex, rows: np.ndarray, layout: Sequence[Block]) -> ChunkRoute:
    """Pure: the blocks one chunk's friend ``rows`` lie in (:func:`route` for one chunk).

    Args:
        index: the friend's key index.
        rows: friend dataset row per chunk row (``-1``: none).
        layout: every block of the friend (:func:`blocks`).

    Returns:
        Per block holding some of the rows (in block order): the chunk rows
        (positions) it serves and the entries (within its file) they take.
    """
    n_files = max((b.file for b in layout), default=-1) + 1
    starts = [
        np.array([b.start for b in layout if b.file == f], dtype=np.int64) for f in range(n_files)
    ]
    first = np.cumsum([0, *(len(s) for s in starts)])
    out: ChunkRoute = {}
    positions = np.flatnonzero(rows >= 0)
    if not positions.size:
        return out
    file, entry = index.locate(rows[positions])
    block = np.empty(len(positions), dtype=np.int64)
    for f in np.unique(file):
        sel = file == f
        block[sel] = first[f] + np.searchsorted(starts[f], entry[sel], side="right") - 1
    # numpy sorts 16-bit numbers stably by radix (linear): 4-5x faster than int64's sort
    keys = block.astype(np.uint16) if len(layout) <= np.iinfo(np.uint16).max else block
    order = np.argsort(keys, kind="stable")
    block = block[order]
    cut = np.flatnonzero(np.diff(block)) + 1
    for a, b in zip(np.r_[0, cut], np.r_[cut, len(block)], strict=True):
        take = order[a:b]
        out[int(block[a])] = (positions[take], entry[take])
    return out


def combine_routes(chunks: Sequence[ChunkRoute], layout: Sequence[Block]) -> Routing:
    """Pure: the :class:`Routing` of the chunks' own routes (:func:`locate_rows`), in chunk order."""
    per_block: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for number, located in enumerate(chunks):
        for b, (positions, entries) in located.items():
            per_block.setdefault(b, []).append((number, positions, entries))
    chosen = sorted(per_block)
    ranges = []
    targets = []
    for b in chosen:
        lo = min(int(e.min()) for _, _, e in per_block[b])
        hi = max(int(e.max()) for _, _, e in per_block[b]) + 1
        ranges.append((lo, hi))
        targets.append(tuple((c, p, e - lo) for c, p, e in per_block[b]))
    return Routing(tuple(layout[b] for b in chosen), tuple(ranges), tuple(targets))


@dataclass(frozen=True)
class Pieces:
    """What one block read gives each chunk that needs it.

    Attributes:
        read: ``(file path, start, stop)`` of the entries read.
        bytes_read: bytes of the columns read (as arrays in memory).
        chunks: the chunks served (numbers among the matches routed).
        positions: per chunk, its rows that take the values.
        columns: per chunk, friend column (file name) -> values, one per position.
    """

    read: tuple[str, int, int]
    bytes_read: int
    chunks: tuple[int, ...]
    positions: tuple[np.ndarray, ...]
    columns: tuple[dict[str, ak.Array], ...]

    @property
    def nbytes(self) -> int:
        """Bytes the pieces hold."""
        return sum(
            p.nbytes + sum(a.nbytes for a in c.values())
            for p, c in zip(self.positions, self.columns, strict=True)
        )


def _piece(array: ak.Array, entries: np.ndarray) -> ak.Array:
    """Rows ``entries`` of ``array`` as a compact copy (never a view of the whole block)."""
    return compact(gather(array, entries, optional=False))


def read_block(
    plan: Plan,
    friend: str,
    block: Block,
    entries: tuple[int, int],
    targets: Sequence[tuple[int, np.ndarray, np.ndarray]],
    *,
    columns: Sequence[str],
) -> Pieces:
    """Task: read entries ``entries`` of ``block`` once and cut them into per-chunk pieces."""
    delay = os.environ.get(_SLEEP_ENV)
    if delay:
        time.sleep(float(delay))
    dataset = plan.friend(friend).dataset
    file = dataset.files[block.file]
    start, stop = entries
    raw = sources.read(file, dataset.spec, list(columns), start=start, stop=stop)
    bytes_read = sum(int(a.nbytes) for a in raw.values())
    return Pieces(
        read=(file.path, start, stop),
        bytes_read=bytes_read,
        chunks=tuple(c for c, _, _ in targets),
        positions=tuple(p for _, p, _ in targets),
        columns=tuple(
            {c: _piece(raw[c], e) for c in columns} for _, _, e in targets
        ),
    )


def assemble_chunk(
    plan: Plan,
    friend: str,
    chunk_match: ChunkMatch,
    pieces: Sequence[tuple[np.ndarray, dict[str, ak.Array]]],
    *,
    empty: dict[str, ak.Array],
    store: ColumnCache,
) -> tuple[int, tuple[str, ...]]:
    """Task: a chunk's friend columns from its pieces, stored where the chunk task looks.

    Values are those the chunk task computes itself (:func:`~columnhub.join.provider.friend_chunk`
    and its collection filling): same gather, same checks, same addresses.

    Args:
        plan: the request's plan.
        friend: the friend's name.
        chunk_match: the chunk's match.
        pieces: ``(positions, columns)`` pieces for the chunk, from any blocks.
        empty: a zero-row array of each read column (for a chunk without partners).
        store: the column cache, or the request's temporary store.

    Returns:
        Bytes of the columns stored, and their addresses.
    """
    spec = plan.friend(friend)
    rows = chunk_match.rows[friend]
    n = len(rows)
    if pieces:
        where = np.concatenate([p for p, _ in pieces]) if len(pieces) > 1 else pieces[0][0]
        values = {
            c: ak.concatenate([v[c] for _, v in pieces]) if len(pieces) > 1 else pieces[0][1][c]
            for c in empty
        }
    else:
        where, values = np.zeros(0, dtype=np.int64), dict(empty)
    inverse = np.full(n, -1, dtype=np.int64)
    inverse[where] = np.arange(len(where), dtype=np.int64)
    stored = 0
    keys = []
    for key, value in _joined(
        plan, spec, chunk_match, lambda c: gather(values[c], inverse, optional=True), store
    ):
        keys.append(key)
        stored += int(value.nbytes)
    # a column that could not be stored (a full cache) is joined by the chunk task
    # itself, as without the exchange: a full cache never fails a request
    return stored, tuple(keys)


def _joined(
    plan: Plan,
    spec: Friend,
    chunk_match: ChunkMatch,
    gathered: Callable[[str], ak.Array],
    store: ColumnCache | None,
) -> list[tuple[str, ak.Array]]:
    """A chunk's friend columns, as the chunk task computes them, with their addresses.

    ``gathered(column)`` gives the friend column's values in the chunk's row
    order (``None`` where no partner); lists of a primary collection are then
    filled to the counter and checked, and every column is stored in
    ``store`` (if any) under the address the chunk task looks up.
    """
    from columnhub.execute.chunk import _ChunkWork

    rows = chunk_match.rows[spec.spec.name]
    n = len(rows)
    work = _ChunkWork(plan, chunk_match.chunk, store)
    work.values.update(chunk_match.values)
    pairs = Match(np.arange(n, dtype=np.int64), rows, primary_identity=True)
    out = []
    for name in _friend_names(plan, spec):
        source = plan.columns[name].source
        if source["column"] is None:  # <friend>_matched
            value = ak.Array(rows >= 0)
        else:
            value = gathered(source["column"])
            if source.get("counter") is not None:
                value = work._join_collection(name, value, pairs, spec)
        value = value if isinstance(value, ak.Array) else ak.Array(value)
        work._store(name, value)
        out.append((work.key(name), value))
    return out


class HeldColumns:
    """A request's exchanged friend columns held in memory, written to the cache behind.

    The chunk tasks look their friend columns up here (:meth:`get`) the
    moment the exchange has made them, without waiting for them to be stored:
    each column is handed to one background thread that stores it in
    ``target`` (the column cache) while the chunk tasks run. A column that
    cannot be stored (a full cache) only misses the next request; this one
    has it in memory. :meth:`close` waits for every write (a request ends
    with its columns stored) and lets the memory go.

    Args:
        target: where the columns are stored for later requests (``None``:
            nowhere, e.g. no writable cache).
        fallback: looked up for columns not held here (the request's
            temporary store of key columns when there is no writable cache).
    """

    def __init__(self, target: ColumnCache | None, fallback: ColumnCache | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.target = target
        self.fallback = fallback
        self.failed_writes = 0
        self._values: dict[str, ak.Array] = {}
        self._writes: list[Any] = []
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="columnhub-cache-write")
            if target is not None
            else None
        )
        self._makers: Any = None
        self._pending: dict[str, Any] = {}

    def __len__(self) -> int:
        """Columns held or promised."""
        return len(self._values) + len(self._pending)

    def promise(self, keys: Sequence[str], make: Callable[[], None], *, workers: int) -> None:
        """Run ``make`` (which holds ``keys``) in the background; a :meth:`get` of one waits.

        The chunk tasks start while the exchange still assembles later chunks;
        an error of ``make`` is raised where one of its columns is looked up.
        """
        if self._makers is None:
            from concurrent.futures import ThreadPoolExecutor

            self._makers = ThreadPoolExecutor(
                max(1, workers), thread_name_prefix="columnhub-exchange"
            )
        from columnhub._concurrency import in_context

        future = self._makers.submit(in_context(make))
        for key in keys:
            self._pending[key] = future

    def hold(self, key: str, value: ak.Array) -> None:
        """Hold ``value`` under ``key`` and store it in the target in the background."""
        self._values[key] = value
        if self._pool is not None:
            self._writes.append(self._pool.submit(self._write, key, value))

    def _write(self, key: str, value: ak.Array) -> None:
        assert self.target is not None
        try:
            self.target.put(key, value)
        except CacheError:  # a full or unwritable cache never fails a request
            self.failed_writes += 1

    def get(self, key: str) -> ak.Array | None:
        """The column held under ``key`` (else the fallback's, else ``None``).

        A promised column is waited for; the error of the task making it, if
        any, is raised here.
        """
        found = self._values.get(key)
        if found is None:
            making = self._pending.get(key)
            if making is not None:
                making.result()
                found = self._values.get(key)
        if found is None and self.fallback is not None:
            return self.fallback.get(key)
        return found

    def settle(self) -> None:
        """Wait until every promised column is made (errors are raised by :meth:`get`)."""
        for making in set(self._pending.values()):
            making.exception()

    def wait(self) -> None:
        """Wait until every column handed so far is stored (or failed to be)."""
        writes, self._writes = self._writes, []
        for write in writes:
            write.result()

    def close(self) -> None:
        """Wait for the columns promised and their writes, then let the held columns go."""
        try:
            self.settle()
            if self._makers is not None:
                self._makers.shutdown(wait=True)
                self._makers = None
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._values.clear()


def _take(array: Any, rows: np.ndarray) -> Any:
    """Rows ``rows`` of the Arrow array ``array`` (``-1``: null), as ``pc.take`` gives them.

    Numbers, and lists of numbers, without nulls are taken with numpy and a
    take of the lists' items (Arrow's take of a list column copies list by
    list: 2-3x the CPU); anything else goes to ``pyarrow.compute.take``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from columnhub._arrow import arrow_of, numpy_of

    missing = rows < 0
    mask = missing if missing.any() else None
    safe = np.where(missing, 0, rows) if mask is not None else rows
    kind = array.type
    if len(array) == 0:  # every row is -1
        return pc.take(array, arrow_of(rows, missing))
    plain = pa.types.is_integer(kind) or pa.types.is_floating(kind)
    if array.null_count == 0 and plain:
        return arrow_of(numpy_of(array)[safe], mask)
    listed = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if array.null_count == 0 and listed:
        child = array.values  # not sliced: the offsets index it directly
        inner = child.type
        if child.null_count == 0 and (pa.types.is_integer(inner) or pa.types.is_floating(inner)):
            large = pa.types.is_large_list(kind)
            offsets = numpy_of(array.offsets)
            starts = offsets[safe]
            lengths = offsets[safe + 1] - starts
            if mask is not None:
                lengths[missing] = 0
            out = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum(lengths, out=out[1:])
            total = int(out[-1])
            if large or total < 2**31:
                # each item's source: its list's start + its place in the list; int32
                # where it fits (half the memory to write)
                width = np.int64 if len(child) >= 2**31 else np.int32
                items = np.repeat((starts - out[:-1]).astype(width), lengths)
                items += np.arange(total, dtype=width)
                cls = pa.LargeListArray if large else pa.ListArray
                return cls.from_arrays(
                    arrow_of(out if large else out.astype(np.int32)),
                    pc.take(child, arrow_of(items)),
                    type=kind,
                    mask=None if mask is None else arrow_of(mask),
                )
    return pc.take(array, arrow_of(rows, missing))


def _optional_like(layout: Any, form: Any) -> Any:
    """``layout`` (taken by :func:`_take`) as an option type over ``form``'s options.

    Arrow leaves out a validity buffer where nothing is missing, so a take
    without ``None`` reads back without an option type; the per-chunk path's
    values always have one (a join's choice, not the data's), and inside lists
    the options ``form`` (the column as read) has. Wrapping in
    ``UnmaskedArray`` adds them without a copy.
    """
    top = layout if layout.is_option else ak.contents.UnmaskedArray(layout)
    return _options_below(top, form)


def _options_below(layout: Any, form: Any) -> Any:
    """``layout``'s contents given the options ``form`` has at each depth (no copy)."""
    if form.is_option:
        form = form.content
    if layout.is_option:
        inner = layout.content
        fixed = _options_below(inner, form)
        return layout if fixed is inner else layout.copy(content=fixed)
    if layout.is_list and form.is_list:
        content = layout.content
        if form.content.is_option and not content.is_option:
            content = ak.contents.UnmaskedArray(content)
        fixed = _options_below(content, form.content)
        return layout if fixed is layout.content else layout.copy(content=fixed)
    return layout


def _parquet_bytes(friend: Friend, routing: Routing, columns: Sequence[str]) -> int | None:
    """Uncompressed bytes of ``columns`` in the row groups the routing reads (``None``: not
    every friend file is Parquet)."""
    from columnhub.sources import parquet

    files = friend.dataset.files
    if any(files[b.file].format != "parquet" for b in routing.blocks):
        return None
    wanted = set(columns)
    total = 0
    for number in sorted({b.file for b in routing.blocks}):
        meta = parquet._open(files[number].path).metadata
        bounds = np.asarray(files[number].boundaries)
        for block, (start, stop) in zip(routing.blocks, routing.ranges, strict=True):
            if block.file != number:
                continue
            first = int(np.searchsorted(bounds, start, side="right") - 1)
            last = int(np.searchsorted(bounds, stop, side="left"))
            for g in range(first, max(last, first + 1)):
                group = meta.row_group(g)
                for c in range(group.num_columns):
                    chunk = group.column(c)
                    if chunk.path_in_schema.split(".", 1)[0] in wanted:
                        total += int(chunk.total_uncompressed_size)
    return total


def _read_table(
    friend: Friend, block: Block, entries: tuple[int, int], columns: Sequence[str]
) -> Any:
    """Entries ``entries`` of a Parquet friend's ``block`` as one Arrow table (read once)."""
    from columnhub.errors import ColumnhubError, CorruptFileError
    from columnhub.sources import parquet
    from columnhub.sources._identity import verify_unchanged

    delay = os.environ.get(_SLEEP_ENV)
    if delay:
        time.sleep(float(delay))
    file = friend.dataset.files[block.file]
    start, stop = entries
    try:
        table = parquet.read_table(file, columns, start=start, stop=stop)
    except ColumnhubError as err:
        verify_unchanged(file, friend.dataset.spec, cause=err)
        raise
    except Exception as err:
        verify_unchanged(file, friend.dataset.spec, cause=err)
        msg = f"reading rows {start}-{stop} of {file.path!r} failed ({err})"
        raise CorruptFileError(msg) from err
    verify_unchanged(file, friend.dataset.spec)
    return table


def _exchange_held(
    plan: Plan,
    friend: Friend,
    matches: list[ChunkMatch],
    routing: Routing,
    columns: list[str],
    *,
    held: HeldColumns,
    workers: int,
    report: FriendExchange,
    fresh: dict[int, set[str]],
) -> None:
    """The exchange in memory, Arrow-native: each block read once, one take per chunk.

    The blocks' tables are laid end to end; each chunk's friend rows become
    positions in them (from the routing), and each column is taken once per
    chunk in primary-row order (``None`` where no partner). Returns once the
    blocks are read: each chunk is assembled in the background and handed to
    ``held`` (the chunk tasks, started meanwhile, wait only for their own
    chunk), and its cache writes happen behind the chunk tasks.
    """
    import functools
    import threading

    import pyarrow as pa

    from columnhub.execute.local import run_ordered

    name = friend.spec.name
    report.in_memory = True
    t0 = time.perf_counter()
    tables = list(
        run_ordered(
            lambda b: _read_table(friend, routing.blocks[b], routing.ranges[b], columns),
            range(len(routing.blocks)),
            workers=workers,
        )
    )
    for block, (start, stop), table in zip(routing.blocks, routing.ranges, tables, strict=True):
        report.reads.append((friend.dataset.files[block.file].path, start, stop))
        report.entries_read += stop - start
        report.bytes_read += int(table.nbytes)
    # the blocks' tables end to end: block k's read range starts at row placed[k]
    placed = np.concatenate([[0], np.cumsum([t.num_rows for t in tables])]).astype(np.int64)
    positions_of = [np.full(len(m.rows[name]), -1, dtype=np.int64) for m in matches]
    for k, targets in enumerate(routing.targets):
        for local, where, entries in targets:  # entries: relative to the range's start
            positions_of[local][where] = placed[k] + entries
    together = pa.concat_tables(tables)  # no copy: the blocks' chunks side by side
    combined = {c: together.column(c).combine_chunks() for c in columns}
    del tables, together
    # the types the per-chunk path gives (an option over the column as read): the
    # same in every chunk and every path, whatever the data holds
    like = {c: ak.to_layout(ak.from_arrow(combined[c].slice(0, 1))).form for c in columns}
    expected = {  # gather(..., optional=True)'s type: an option over the column's
        c: ak.contents.IndexedOptionArray.simplified(
            ak.index.Index64(np.array([0, -1], dtype=np.int64)),
            ak.to_layout(ak.from_arrow(combined[c].slice(0, 1))),
        ).form.type
        for c in columns
    }
    report.seconds["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lock = threading.Lock()
    left = [len(matches)]

    def assemble(local: int) -> None:
        positions = positions_of[local]

        def gathered(column: str) -> ak.Array:
            taken = _optional_like(
                ak.to_layout(ak.from_arrow(_take(combined[column], positions))), like[column]
            )
            if taken.form.type != expected[column]:  # a layout _take does not give as gather does
                return gather(ak.from_arrow(combined[column]), positions, optional=True)
            return ak.Array(taken)

        stored = 0
        for key, value in _joined(plan, friend, matches[local], gathered, None):
            held.hold(key, value)
            stored += int(value.nbytes)
        with lock:
            report.bytes_stored += stored
            left[0] -= 1
            if not left[0]:
                report.seconds["assemble"] = time.perf_counter() - t0

    # the chunk tasks start now: each waits only for its own chunk's columns
    for local, chunk_match in enumerate(matches):
        keys = _friend_keys(plan, friend, chunk_match.chunk)
        fresh.setdefault(chunk_match.chunk.index, set()).update(keys)
        held.promise(keys, functools.partial(assemble, local), workers=workers)
    report.settle = held.settle


def _friend_keys(plan: Plan, friend: Friend, chunk: Chunk) -> list[str]:
    """The addresses of a chunk's columns of ``friend`` (what :func:`_joined` stores)."""
    from columnhub.execute.chunk import _ChunkWork

    work = _ChunkWork(plan, chunk, None)
    return [work.key(name) for name in _friend_names(plan, friend)]


@dataclass
class FriendExchange:
    """What the exchange did for one friend (the manifest's ``friend_exchange``).

    Attributes:
        ran: whether the friend's columns were exchanged.
        reason: why (or why not).
        blocks: blocks of the friend holding needed rows.
        chunks: primary chunks exchanged.
        reads: ``(file, start, stop)`` of every read, each block once.
        entries_read: friend entries read.
        bytes_read: bytes of friend columns read (arrays in memory).
        bytes_stored: bytes of the friend's columns stored in primary-chunk order.
        rounds: spilled rounds (0: everything fitted in memory; on a Dask
            cluster 1: every piece went through the shared spill store).
        in_memory: exchanged in memory (a Parquet friend whose needed
            columns fit the budget): blocks read as Arrow tables, one take
            per chunk, the columns handed to the chunk tasks in memory.
        memory_budget: the budget in bytes.
        seconds: wall time of the exchange's match, read and assemble steps.
    """

    ran: bool
    reason: str
    blocks: int = 0
    chunks: int = 0
    reads: list[tuple[str, int, int]] = field(default_factory=list)
    entries_read: int = 0
    bytes_read: int = 0
    bytes_stored: int = 0
    rounds: int = 0
    in_memory: bool = False
    memory_budget: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    #: waits for the chunks still being assembled in the background (in memory)
    settle: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (once every chunk is assembled)."""
        if self.settle is not None:
            self.settle()
        return {
            "ran": self.ran,
            "reason": self.reason,
            "blocks": self.blocks,
            "chunks": self.chunks,
            "reads": [list(r) for r in self.reads],
            "entries_read": self.entries_read,
            "bytes_read": self.bytes_read,
            "bytes_stored": self.bytes_stored,
            "rounds": self.rounds,
            "in_memory": self.in_memory,
            "memory_budget": self.memory_budget,
            "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
        }


@dataclass
class Exchanged:
    """The exchange of one request.

    Attributes:
        friends: friend name -> what the exchange did.
        store: where the chunk tasks find exchanged columns that are not in
            the column cache (no cache, or a read-only one), else ``None``.
        scratch: the temporary directory to delete after the request.
        fresh: per chunk (``Chunk.index``), the addresses the exchange
            stored for this request (the chunk task counts them as misses,
            not as cache hits).
        held: the columns exchanged in memory (their cache writes running
            behind), else ``None``.
    """

    friends: dict[str, FriendExchange]
    store: ColumnCache | None = None
    scratch: Path | None = None
    fresh: dict[int, set[str]] = field(default_factory=dict)
    held: HeldColumns | None = None

    @property
    def lookup(self) -> ColumnLookup | None:
        """What the chunk tasks look exchanged columns up in (``exchanged=`` of a part task)."""
        if self.held is not None and len(self.held):
            return self.held
        return self.store

    def close(self) -> None:
        """Wait for the cache writes, delete the temporary store (the chunks are done)."""
        if self.held is not None:
            self.held.close()
        if self.store is not None:
            self.store.close()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


def _why_not(plan: Plan, friend: Friend) -> str | None:
    if os.environ.get(SWITCH_ENV, "1").strip().lower() in ("0", "off", "false", "no"):
        return f"turned off (${SWITCH_ENV}={os.environ[SWITCH_ENV]})"
    if friend.spec.match != "keyed":
        return "aligned friend: read in the primary's order"
    if any(f.expands for f in plan.friends):
        return "one_to_many: rows expand, joined chunk by chunk"
    if len(plan.chunks) < 2:
        return "one chunk: its friend rows are read once"
    if not _read_names(plan, friend):
        return "no friend column to read"
    return None


def _missing(plan: Plan, friend: Friend, cache: ColumnCache | None) -> list[int]:
    """Chunk numbers whose friend columns are not all in the column cache."""
    from columnhub.execute.chunk import _ChunkWork

    names = _friend_names(plan, friend)
    if cache is None:
        return list(range(len(plan.chunks)))
    return [
        i for i, chunk in enumerate(plan.chunks)
        if not all(cache.contains(_ChunkWork(plan, chunk, cache).key(n)) for n in names)
    ]


def exchange(
    plan: Plan,
    *,
    cache: ColumnCache | None = None,
    staging: Path | None = None,
    workers: int = 1,
    tasks: Tasks | None = None,
    prepared: Prepared | None = None,
) -> Exchanged:
    """Run the exchange for every keyed friend that needs it, before the chunk tasks.

    Args:
        plan: the request's plan (key indexes already prepared).
        cache: the column cache (``None``: none).
        staging: the request's staging directory (temporary stores go under it;
            default: the system's temporary directory; on a cluster it must be
            a directory every worker sees).
        workers: tasks run at once on the local thread pool.
        tasks: the request's Dask tasks: run the stage on the cluster's
            workers (``None``: on the local thread pool).
        prepared: :func:`~columnhub.join.provider.prepare`'s result, on a
            cluster: the friends' key indexes still being built there (the
            match tasks wait for them, not this process), and their checks,
            waited for here before anything is gathered.

    Returns:
        What ran; call :meth:`Exchanged.close` once the chunk tasks are done.
    """
    from columnhub.cache import ColumnCache
    from columnhub.execute.local import run_ordered

    result = Exchanged({})
    todo: dict[str, list[int]] = {}
    for friend in plan.friends:
        reason = _why_not(plan, friend)
        if reason is None:
            todo[friend.spec.name] = _missing(plan, friend, cache)
            if not todo[friend.spec.name]:
                reason = "cached: every chunk's friend columns are in the column cache"
                del todo[friend.spec.name]
        if reason is not None:
            result.friends[friend.spec.name] = FriendExchange(False, reason)
    if not todo:
        if prepared is not None:
            prepared.wait_friends()
        return result
    budget = memory_budget()

    def scratch() -> Path:
        if result.scratch is None:
            if staging is not None:
                result.scratch = Path(staging).resolve() / ".exchange"
                result.scratch.mkdir(parents=True, exist_ok=True)
            else:
                result.scratch = Path(tempfile.mkdtemp(prefix="columnhub-exchange-"))
        return result.scratch

    if cache is None or cache.read_only:
        result.store = ColumnCache(scratch() / "columns")
    target = result.store if result.store is not None else cache
    assert target is not None
    chunks = sorted({i for numbers in todo.values() for i in numbers})
    if tasks is not None:
        try:
            _on_cluster(plan, todo, chunks, tasks, cache=cache, target=target, scratch=scratch,
                        result=result, budget=budget, prepared=prepared)
        except BaseException:
            result.close()
            raise
        if result.store is None and result.scratch is not None:
            result.close()
        return result
    t0 = time.perf_counter()
    try:
        held = result.held = HeldColumns(
            target if result.store is None else None, fallback=result.store
        )
        layouts = {name: _layout(plan, name) for name in todo}

        def match_and_locate(i: int) -> tuple[ChunkMatch, dict[str, ChunkRoute]]:
            found = match_chunk(
                plan, plan.chunks[i], friends=list(todo), store=target, cache=cache, held=held
            )
            located = {  # the chunk's part of the routing, on the pool (numpy sorts)
                name: locate_rows(
                    _index(plan, plan.friend(name), cache), found.rows[name], layouts[name]
                )
                for name in todo
            }
            return found, located

        matched = dict(
            zip(chunks, run_ordered(match_and_locate, chunks, workers=workers), strict=True)
        )
        for chunk_match, _ in matched.values():
            result.fresh.setdefault(chunk_match.chunk.index, set()).update(chunk_match.fresh)
        t_match = time.perf_counter() - t0
        for name, numbers in todo.items():
            report = _exchange_friend(
                plan,
                plan.friend(name),
                [matched[i][0] for i in numbers],
                target=target,
                workers=workers,
                spill=_Rounds(budget, scratch),
                held=held,
                fresh=result.fresh,
                located=[matched[i][1][name] for i in numbers],
                layout=layouts[name],
            )
            report.seconds["match"] = t_match
            result.friends[name] = report
    except BaseException:
        result.close()
        raise
    if result.store is None and result.scratch is not None:  # spilled rounds: done with them
        shutil.rmtree(result.scratch, ignore_errors=True)
        result.scratch = None
    return result


class _Rounds:
    """Pieces held per chunk in memory; beyond the budget, spilled as rounds.

    A round is every piece held, concatenated per chunk and written to a
    temporary store under the scratch directory; a chunk's pieces are then
    its rounds, read back.
    """

    def __init__(self, budget: int, scratch: Callable[[], Path]) -> None:
        self.budget = budget
        self.scratch = scratch
        self.held: dict[int, list[tuple[np.ndarray, dict[str, ak.Array]]]] = {}
        self.held_bytes = 0
        self.rounds = 0
        self.spilled: dict[int, list[int]] = {}
        self.store: ColumnCache | None = None

    def _key(self, friend: Friend, local: int, round_: int, column: str) -> str:
        from columnhub.cache import entry_key

        return entry_key(
            kind="exchange-piece", friend=friend.fingerprint, chunk=local, round=round_,
            column=column, version=_SPILL_VERSION,
        )

    def add(self, friend: Friend, pieces: Pieces, columns: Sequence[str]) -> None:
        for local, where, values in zip(
            pieces.chunks, pieces.positions, pieces.columns, strict=True
        ):
            self.held.setdefault(local, []).append((where, values))
        self.held_bytes += pieces.nbytes
        if self.held_bytes > self.budget:
            self.spill(friend, columns)

    def spill(self, friend: Friend, columns: Sequence[str]) -> None:
        """Write what is held as one round."""
        from columnhub.cache import ColumnCache

        if self.store is None:
            self.store = ColumnCache(self.scratch() / f"spill-{os.getpid()}")
        for local, parts in self.held.items():
            where = np.concatenate([p for p, _ in parts])
            self.store.put(self._key(friend, local, self.rounds, "\0rows"), ak.Array(where))
            for c in columns:
                self.store.put(
                    self._key(friend, local, self.rounds, c),
                    ak.concatenate([v[c] for _, v in parts]),
                )
            self.spilled.setdefault(local, []).append(self.rounds)
        self.held.clear()
        self.held_bytes = 0
        self.rounds += 1

    def take(
        self, friend: Friend, local: int, columns: Sequence[str]
    ) -> list[tuple[np.ndarray, dict[str, ak.Array]]]:
        """The pieces of chunk ``local`` (from memory, or its spilled rounds)."""
        if not self.rounds:
            return self.held.pop(local, [])
        assert self.store is not None
        out = []
        for r in self.spilled.get(local, []):
            where = self.store.get(self._key(friend, local, r, "\0rows"))
            values = {c: self.store.get(self._key(friend, local, r, c)) for c in columns}
            if where is None or any(v is None for v in values.values()):
                msg = (
                    f"a spilled piece of friend {friend.spec.name!r} was lost from "
                    f"{self.store.location}; deliver again"
                )
                raise CacheError(msg)
            kept = {c: v for c, v in values.items() if v is not None}
            out.append((np.asarray(ak.to_numpy(where), dtype=np.int64), kept))
        return out

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            shutil.rmtree(Path(self.store.location), ignore_errors=True)
            self.store = None


def _exchange_friend(
    plan: Plan,
    friend: Friend,
    matches: list[ChunkMatch],
    *,
    target: ColumnCache,
    workers: int,
    spill: _Rounds,
    fresh: dict[int, set[str]],
    located: list[ChunkRoute],
    layout: list[Block],
    held: HeldColumns | None = None,
) -> FriendExchange:
    """Route, read and assemble one friend for the matched chunks (local thread pool).

    ``located``: each chunk's rows by block of ``layout`` (:func:`locate_rows`,
    run with the match).

    In memory (:func:`_exchange_held`) when the friend is Parquet and its
    needed columns, read and taken per chunk, fit the memory budget; else
    through per-chunk pieces, spilled beyond the budget.
    """
    from columnhub.execute.local import run_ordered

    name = friend.spec.name
    t0 = time.perf_counter()
    routing = combine_routes(located, layout)
    report = FriendExchange(
        False, "", blocks=len(routing.blocks), chunks=len(matches), memory_budget=spill.budget
    )
    if routing.repeated <= 0:
        report.reason = "each friend block is needed by one chunk: read chunk by chunk"
        return report
    report.ran = True
    report.reason = (
        f"scattered: {len(routing.blocks)} friend block(s) needed "
        f"{len(routing.blocks) + routing.repeated} times by {len(matches)} chunk(s)"
    )
    columns = _read_names(plan, friend)
    if held is not None:
        needed = _parquet_bytes(friend, routing, columns)
        # the columns read, and as much again taken in primary-chunk order
        if needed is not None and 2 * needed <= spill.budget:
            _exchange_held(
                plan, friend, matches, routing, columns, held=held, workers=workers,
                report=report, fresh=fresh,
            )
            return report
    empty: dict[str, ak.Array] = {}
    try:
        tasks = list(zip(routing.blocks, routing.ranges, routing.targets, strict=True))
        for pieces in run_ordered(
            lambda t: read_block(plan, name, t[0], t[1], t[2], columns=columns),
            tasks,
            workers=workers,
        ):
            report.reads.append(pieces.read)
            report.entries_read += pieces.read[2] - pieces.read[1]
            report.bytes_read += pieces.bytes_read
            if not empty:
                empty = {c: pieces.columns[0][c][:0] for c in columns}
            spill.add(friend, pieces, columns)
        if spill.rounds and spill.held:
            spill.spill(friend, columns)
        report.rounds = spill.rounds
        report.seconds["read"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        assembled = run_ordered(
            lambda i: assemble_chunk(
                plan, name, matches[i], spill.take(friend, i, columns), empty=empty, store=target
            ),
            range(len(matches)),
            workers=workers,
        )
        for local, (stored, keys) in enumerate(assembled):
            report.bytes_stored += stored
            fresh.setdefault(matches[local].chunk.index, set()).update(keys)
        report.seconds["assemble"] = time.perf_counter() - t0
    finally:
        spill.close()
    return report


# ---------------------------------------------------------------------------
# the same stage on a Dask cluster: tasks and futures, pieces through a shared store


def _piece_key(friend: Friend, block: int, local: int, column: str) -> str:
    from columnhub.cache import entry_key

    return entry_key(
        kind="exchange-block-piece", friend=friend.fingerprint, block=block, chunk=local,
        column=column, version=_SPILL_VERSION,
    )


def _layout(plan: Plan, friend: str) -> list[Block]:
    """The blocks of friend ``friend``, of about a chunk each (:func:`blocks`)."""
    spec = plan.friend(friend)
    return blocks([f.boundaries for f in spec.dataset.files], max(1, plan.request.chunk_size))


def _match_task(
    plan: Plan,
    chunk: Chunk,
    *,
    friends: Sequence[str],
    store: ColumnCache | None,
    cache: ColumnCache | None,
    indexes: dict[str, KeyIndex],
) -> ChunkMatch | None:
    """Task: :func:`match_chunk` against the friends' ``indexes`` (by cache address).

    The indexes come from the tasks that built them (futures), not from the
    cache, which they may not have reached yet. ``None`` when a friend's
    index fails its own uniqueness check: the client raises that check's
    error (an error raised here would be retried as if a worker had died).
    """
    from columnhub.join.provider import _adopt
    from columnhub.join.validate import check_unique

    _adopt(indexes)
    for name in friends:
        spec = plan.friend(name)
        try:
            check_unique(_index(plan, spec, cache), side="friend", validate=spec.spec.validate_)
        except JoinError:
            return None
    return match_chunk(plan, chunk, friends=friends, store=store, cache=cache)


def _locate_task(
    plan: Plan,
    friend: str,
    index_cache: ColumnCache | None,
    chunk_match: ChunkMatch | None,
    indexes: dict[str, KeyIndex] | None = None,
) -> ChunkRoute:
    """Task: :func:`locate_rows` for one matched chunk (the routing's work, chunk by chunk)."""
    from columnhub.join.provider import _adopt

    if chunk_match is None:  # the friend's index failed its check: see _match_task
        return {}
    _adopt(indexes or {})
    spec = plan.friend(friend)
    return locate_rows(
        _index(plan, spec, index_cache), chunk_match.rows[friend], _layout(plan, friend)
    )


def _route_task(plan: Plan, friend: str, *located: ChunkRoute) -> Routing:
    """Task: :func:`combine_routes` of the chunks' routes (the routing stays on the cluster)."""
    return combine_routes(located, _layout(plan, friend))


def _routing_summary(routing: Routing, *matches: ChunkMatch | None) -> dict[str, Any]:
    """Task: the small part of a routing and its matches the client needs."""
    return {
        "blocks": len(routing.blocks),
        "repeated": routing.repeated,
        "targets": [[c for c, _, _ in t] for t in routing.targets],
        "fresh": {m.chunk.index: m.fresh for m in matches if m is not None},
    }


#: one block of a :class:`Routing`: the block, its entry range and its targets
_BlockRoute = tuple[Block, tuple[int, int], tuple[tuple[int, np.ndarray, np.ndarray], ...]]


def _layout_block_task(routing: Routing, block: Block) -> tuple[_BlockRoute, int] | None:
    """Task: layout block ``block``'s routing and its number in ``routing``.

    A read task takes this small piece rather than the whole routing, so the
    scheduler can run the reads on every worker instead of on the one that
    holds the routing. ``None`` when no chunk needs the block, or when the exchange does not run
    (no block is needed twice): the read tasks are submitted for every block
    of the layout together with the routing, before it is known.
    """
    if routing.repeated <= 0:
        return None
    for number, routed in enumerate(routing.blocks):
        if routed == block:
            return (routed, routing.ranges[number], routing.targets[number]), number
    return None


def _blocks_of_chunks(routing: Routing, layout: Sequence[Block]) -> list[list[int]] | None:
    """Task: per chunk (number among the matches routed), the layout blocks it takes rows of.

    ``None`` when the exchange does not run (see :func:`_layout_block_task`).
    """
    if routing.repeated <= 0:
        return None
    where = {b: n for n, b in enumerate(layout)}
    out: dict[int, list[int]] = {}
    for block, targets in zip(routing.blocks, routing.targets, strict=True):
        for chunk, _, _ in targets:
            out.setdefault(chunk, []).append(where[block])
    return [out.get(c, []) for c in range(max(out, default=-1) + 1)]


def _read_layout_task(
    plan: Plan,
    friend: str,
    block: tuple[_BlockRoute, int] | None,
    number: int,
    *,
    columns: Sequence[str],
    pieces: ColumnCache,
) -> tuple[tuple[str, int, int], int] | None:
    """Task: :func:`_read_task` of layout block ``number`` (``None``: not read, see above).

    The pieces are stored under the layout block's number; the first block
    of the routing also stores the zero-row arrays.
    """
    if block is None:
        return None
    route, routed = block
    return _read_task(plan, friend, route, number, columns=columns, pieces=pieces, first=routed == 0)


def _assemble_layout_task(
    plan: Plan,
    friend: str,
    chunk_match: ChunkMatch | None,
    local: int,
    of_chunks: list[list[int]] | None,
    *reads: Any,
    columns: Sequence[str],
    pieces: ColumnCache,
    store: ColumnCache,
) -> tuple[int, tuple[str, ...]] | None:
    """Task: :func:`_assemble_task` with its blocks from ``of_chunks`` (``None``: not run)."""
    if of_chunks is None or chunk_match is None:
        return None
    blocks = of_chunks[local] if local < len(of_chunks) else []
    return _assemble_task(
        plan, friend, chunk_match, local, *reads, blocks=blocks, columns=columns, pieces=pieces,
        store=store,
    )


def _read_task(
    plan: Plan,
    friend: str,
    block: _BlockRoute,
    number: int,
    *,
    columns: Sequence[str],
    pieces: ColumnCache,
    first: bool | None = None,
) -> tuple[tuple[str, int, int], int]:
    """Task: read block ``number`` (``block``: its routing) once and store its pieces in ``pieces``.

    The first block (``first``; default: block 0) also stores a zero-row
    array of each column (for chunks without partners). Returns the read
    ``(file, start, stop)`` and the bytes read.
    """
    spec = plan.friend(friend)
    got = read_block(plan, friend, *block, columns=columns)
    for local, where, values in zip(got.chunks, got.positions, got.columns, strict=True):
        pieces.put(_piece_key(spec, number, local, "\0rows"), ak.Array(where))
        for c in columns:
            pieces.put(_piece_key(spec, number, local, c), values[c])
    if number == 0 if first is None else first:
        for c in columns:
            pieces.put(_piece_key(spec, -1, -1, c), got.columns[0][c][:0])
    return got.read, got.bytes_read


def _assemble_task(
    plan: Plan,
    friend: str,
    chunk_match: ChunkMatch,
    local: int,
    *reads: Any,
    blocks: Sequence[int],
    columns: Sequence[str],
    pieces: ColumnCache,
    store: ColumnCache,
) -> tuple[int, tuple[str, ...]]:
    """Task: :func:`assemble_chunk` from the pieces the reads of ``blocks`` stored.

    ``reads`` are those reads' results: passed as futures, they make the task
    wait for them.
    """
    del reads
    spec = plan.friend(friend)

    def get(block: int, chunk: int, column: str) -> ak.Array:
        value = pieces.get(_piece_key(spec, block, chunk, column))
        if value is None:
            msg = (
                f"a piece of friend {friend!r} (block {block}) was lost from "
                f"{pieces.location}; deliver again"
            )
            raise CacheError(msg)
        return value

    got = [
        (
            np.asarray(ak.to_numpy(get(b, local, "\0rows")), dtype=np.int64),
            {c: get(b, local, c) for c in columns},
        )
        for b in blocks
    ]
    empty = (
        {c: got[0][1][c][:0] for c in columns} if got else {c: get(-1, -1, c) for c in columns}
    )
    return assemble_chunk(plan, friend, chunk_match, got, empty=empty, store=store)


def _on_cluster(
    plan: Plan,
    todo: dict[str, list[int]],
    chunks: list[int],
    tasks: Tasks,
    *,
    cache: ColumnCache | None,
    target: ColumnCache,
    scratch: Callable[[], Path],
    result: Exchanged,
    budget: int,
    prepared: Prepared | None = None,
) -> None:
    """The exchange's tasks on a Dask cluster; fills ``result`` from their metadata.

    Only small metadata comes back here: the routing's block counts, each
    read's range and bytes, each assembly's bytes and addresses. The match
    results and the routing stay on the workers (futures), the pieces go
    through a store under the staging directory.
    """
    from columnhub.join.provider import _index_key

    index_cache = cache
    # the friends' indexes, by cache address, where prepare builds them on the cluster
    building = prepared.indexes if prepared is not None else {}
    indexes = {
        key: building[key]
        for key in (
            _index_key(plan.friend(n).dataset, plan.friend(n).spec.friend_keys) for n in todo
        )
        if key in building
    }
    if result.store is not None:  # no writable cache: the indexes reach workers through it
        for name in todo:
            friend = plan.friend(name)
            key = _index_key(friend.dataset, friend.spec.friend_keys)
            result.store.put_bytes(key, _index(plan, friend, cache).to_chunks())
        index_cache = result.store
    held: list[Any] = []
    try:
        t0 = time.perf_counter()
        matched = {
            i: tasks.submit(
                _match_task, plan, plan.chunks[i], friends=list(todo), store=target,
                cache=index_cache, indexes=indexes, key=f"exchange-match-{i:05d}",
                # spread: else every match would run where the index was built
                **tasks.spread(n),
            )
            for n, i in enumerate(chunks)
        }
        spread = {i: n for n, i in enumerate(chunks)}
        held += matched.values()
        routed: dict[str, Any] = {}
        summaries: dict[str, Any] = {}
        for name, numbers in todo.items():
            mine = [matched[i] for i in numbers]
            located = [  # the routing's work, chunk by chunk; combined by one small task
                tasks.submit(
                    _locate_task, plan, name, index_cache, matched[i], indexes,
                    key=f"exchange-locate-{name}-{plan.chunks[i].index:05d}",
                    **tasks.spread(spread[i]),  # where its match ran
                )
                for i in numbers
            ]
            held += located
            routed[name] = tasks.submit(
                _route_task, plan, name, *located, key=f"exchange-route-{name}"
            )
            summaries[name] = tasks.submit(
                _routing_summary, routed[name], *mine, key=f"exchange-routed-{name}"
            )
        held += [*routed.values(), *summaries.values()]
        # the reads and assemblies too, before the routing is known: one read task per
        # block of the layout (a block no chunk needs is not read) and one assembly per
        # chunk, so no round trip through this process separates them from the routing
        from columnhub.cache import ColumnCache

        staged: dict[str, tuple[list[Any], list[Any], Path, ColumnCache]] = {}
        for name, numbers in todo.items():
            friend = plan.friend(name)
            layout = _layout(plan, name)
            columns = _read_names(plan, friend)
            where = scratch() / f"pieces-{friend.fingerprint[:16]}"
            pieces = ColumnCache(where)
            staged[name] = ([], [], where, pieces)
            of_chunks = tasks.submit(
                _blocks_of_chunks, routed[name], layout, key=f"exchange-routed-chunks-{name}"
            )
            routes = [
                tasks.submit(
                    _layout_block_task, routed[name], block, key=f"exchange-block-{name}-{b:05d}"
                )
                for b, block in enumerate(layout)
            ]
            reads = [
                tasks.submit(
                    _read_layout_task, plan, name, routes[b], b, columns=columns,
                    pieces=pieces, key=f"exchange-read-{name}-{b:05d}", **tasks.spread(b),
                )
                for b in range(len(layout))
            ]
            assembled = [
                tasks.submit(
                    _assemble_layout_task, plan, name, matched[numbers[local]], local, of_chunks,
                    *reads, columns=columns, pieces=pieces, store=target,
                    key=f"exchange-assemble-{name}-{plan.chunks[numbers[local]].index:05d}",
                    **tasks.spread(local),
                )
                for local in range(len(numbers))
            ]
            staged[name][0].extend(reads)
            staged[name][1].extend(assembled)
            held += [of_chunks, *routes, *reads, *assembled]
        if prepared is not None:  # a friend's failed check first, as without the cluster
            prepared.wait_friends()
        try:
            summary = dict(zip(summaries, tasks.gather(list(summaries.values())), strict=True))
            for info in summary.values():
                for index, fresh in info["fresh"].items():
                    result.fresh.setdefault(index, set()).update(fresh)
            t_match = time.perf_counter() - t0
            for name, numbers in todo.items():
                friend = plan.friend(name)
                info = summary[name]
                report = FriendExchange(
                    False, "", blocks=info["blocks"], chunks=len(numbers), memory_budget=budget
                )
                report.seconds["match"] = t_match
                result.friends[name] = report
                reads, assembled, _, _ = staged[name]
                if info["repeated"] <= 0:  # its read and assembly tasks do nothing
                    report.reason = "each friend block is needed by one chunk: read chunk by chunk"
                    continue
                report.ran = True
                report.reason = (
                    f"scattered: {info['blocks']} friend block(s) needed "
                    f"{info['blocks'] + info['repeated']} times by {len(numbers)} chunk(s)"
                )
                report.rounds = 1  # every piece goes through the shared spill store
                t0 = time.perf_counter()
                for got in tasks.gather(reads):
                    if got is None:
                        continue
                    read, bytes_read = got
                    report.reads.append(read)
                    report.entries_read += read[2] - read[1]
                    report.bytes_read += bytes_read
                report.seconds["read"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                for local, got in enumerate(tasks.gather(assembled)):
                    stored, keys = got
                    report.bytes_stored += stored
                    result.fresh.setdefault(plan.chunks[numbers[local]].index, set()).update(keys)
                report.seconds["assemble"] = time.perf_counter() - t0
        finally:
            for _, _, where, pieces in staged.values():
                pieces.close()
                shutil.rmtree(where, ignore_errors=True)
    finally:
        tasks.release(held)
