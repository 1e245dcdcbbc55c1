"""Planning: a request becomes a :class:`Plan` of independent chunk tasks.

The plan resolves every column name to the provider that makes it (a source
branch, an expression, a friend join, a model), checks that everything exists
*before* any work starts, and splits the primary dataset into chunks (entry
ranges aligned to basket boundaries). It reads metadata only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

# PROVIDER_VERSIONS: bumped whenever a provider's output for the same inputs could
# change (part of every cache key); kept apart so a cache hit reads it without numpy
from columnhub._versions import PROVIDER_VERSIONS
from columnhub.datasets import ResolvedDataset, resolve
from columnhub.errors import ColumnNotFoundError, JoinError, KeyMismatchError, SpecError, closest
from columnhub.expressions import Expression, parse
from columnhub.join.collection import collection_of, counter_of
from columnhub.keys import check_key_type
from columnhub.spec import FriendSpec, Request

if TYPE_CHECKING:
    from columnhub.cache import ColumnCache

__all__ = [
    "MAX_BASKET_SPLIT",
    "Chunk",
    "ColumnDef",
    "Friend",
    "Model",
    "Part",
    "Plan",
    "group_evenly",
    "group_parts",
    "make_plan",
    "min_part_count",
    "split_entries",
]

Kind = Literal["source", "define", "friend", "model"]


@dataclass(frozen=True)
class Chunk:
    """An entry range ``[start, stop)`` of one file of the primary dataset."""

    index: int
    file_index: int
    start: int
    stop: int

    @property
    def entries(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Part:
    """One output part: a run of consecutive chunks written to one file by one task.

    Attributes:
        index: the part's number (its file is ``part-<index>``, before empty
            parts are dropped).
        chunks: the indices of its chunks in :attr:`Plan.chunks`, consecutive.
        tail: the rows of a right/outer friend without a primary partner
            (a part of its own, with no chunks).
    """

    index: int
    chunks: tuple[int, ...]
    tail: bool = False


@dataclass(frozen=True)
class ColumnDef:
    """How one column is made.

    Attributes:
        name: the column's name in the request.
        kind: its provider.
        deps: the columns it is computed from.
        fingerprint: a digest of its full definition, its dependencies'
            definitions included (the column part of a cache key).
        expression: for ``define`` columns.
        source: provider details (branch name, friend name, model output...).
    """

    name: str
    kind: Kind
    deps: tuple[str, ...]
    fingerprint: str
    expression: Expression | None = None
    source: dict[str, Any] = field(default_factory=dict)
    model: Model | None = None


@dataclass(frozen=True)
class Model:
    """A model of the request with its card and parsed input expressions.

    Attributes:
        card: the model card (picklable).
        inputs: the card's input expressions, parsed.
        columns: card output name -> column name in the request.
        backend: ``auto``, ``local`` or ``remote``.
    """

    card: Any
    inputs: tuple[Expression, ...]
    columns: dict[str, str]
    backend: Literal["auto", "local", "remote"]


@dataclass(frozen=True)
class Friend:
    """A friend dataset of the request, resolved.

    Attributes:
        spec: the friend as requested.
        dataset: its files.
        fingerprint: its full definition with its files' identity (part of the
            address of every column it provides).
    """

    spec: FriendSpec
    dataset: ResolvedDataset
    fingerprint: str

    @property
    def expands(self) -> bool:
        """True when a primary event may produce several output rows."""
        return self.spec.validate_ == "one_to_many"

    @property
    def filters(self) -> bool:
        """True when primary events without a partner are dropped."""
        return self.spec.how in ("inner", "right")

    @property
    def has_tail(self) -> bool:
        """True when friend rows without a primary partner are delivered too."""
        return self.spec.how in ("right", "outer")


@dataclass(frozen=True)
class Plan:
    """Everything a chunk task needs, resolved; immutable and picklable.

    Attributes:
        request: the request.
        dataset: the primary dataset with its files.
        chunks: the chunk tasks, in output order.
        columns: every column needed, in an order where dependencies come first.
        outputs: the columns written (keys first when requested).
        where: the selection, if any.
        friends: the friends, resolved.
        collections: NanoAOD collections among the outputs: counter name
            (``nJet``) -> the output columns of the collection (``Jet_pt``...).
            Every list among them has the counter's length in every event.
        parts: the part tasks, in output order (consecutive chunks grouped
            toward ``output.target_part_bytes``; a right/outer tail last).
        bytes_per_event: the estimated output bytes per event (from the
            files' metadata) the parts were sized with.
    """

    request: Request
    dataset: ResolvedDataset
    chunks: tuple[Chunk, ...]
    columns: dict[str, ColumnDef]
    outputs: tuple[str, ...]
    where: Expression | None
    friends: tuple[Friend, ...] = ()
    collections: dict[str, tuple[str, ...]] = field(default_factory=dict)
    parts: tuple[Part, ...] = ()
    bytes_per_event: float = 0.0

    @property
    def rows_tag(self) -> str:
        """What one output row is: a primary event, or a (primary, friend) pair.

        Part of the address of every computed column, so a one-to-many join's
        expanded columns never collide with per-event ones.
        """
        return next((f.fingerprint for f in self.friends if f.expands), "")

    def friend(self, name: str) -> Friend:
        return next(f for f in self.friends if f.spec.name == name)

    @property
    def where_fingerprint(self) -> str:
        """The selection mask's definition, dependencies included (its cache address)."""
        if self.where is None:
            return ""
        deps = [self.columns[n].fingerprint for n in sorted(self.where.names)]
        return fingerprint("where", PROVIDER_VERSIONS["where"], self.where.canonical, deps)


#: A basket (row group) is split into at most this many chunks, whatever
#: ``chunk_size``: every chunk of a basket decompresses the whole basket, and
#: every chunk costs a task, a cache entry per column and a row group, so
#: ``chunk_size=1`` on a 10k-event file took 98 s and wrote 70,000 cache files.
MAX_BASKET_SPLIT = 64


def split_entries(boundaries: Iterable[int], chunk_size: int) -> list[tuple[int, int]]:
    """Entry ranges of about ``chunk_size`` entries that start on ``boundaries``.

    Boundaries (basket or row-group starts, first 0, last the entry count) are
    kept where a range would otherwise exceed ``chunk_size``; a single basket
    larger than ``chunk_size`` is split evenly, into at most
    :data:`MAX_BASKET_SPLIT` chunks (the floor on tiny chunks).

    >>> split_entries([0, 100, 200, 300], 150)
    [(0, 100), (100, 200), (200, 300)]
    >>> split_entries([0, 1000], 400)
    [(0, 333), (333, 667), (667, 1000)]
    >>> len(split_entries([0, 10_000], 1))
    64
    """
    # sorted(set()), not np.unique: numpy 2's imports numpy.ma (6-12 ms, every request)
    b = sorted({int(edge) for edge in boundaries})
    ranges: list[tuple[int, int]] = []
    start = b[0]
    prev = start
    for edge in b[1:]:
        if edge - start > chunk_size and prev > start:
            ranges.append((start, prev))
            start = prev
        prev = edge
    ranges.append((start, prev))
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:  # split oversized baskets evenly
        n = min(-(-(hi - lo) // chunk_size), MAX_BASKET_SPLIT)
        if n <= 1:
            out.append((lo, hi))
        else:
            edges = np.linspace(lo, hi, n + 1).round().astype(np.int64)
            out.extend((int(a), int(c)) for a, c in itertools.pairwise(edges))
    return [r for r in out if r[1] > r[0]]


#: the smallest part :func:`min_part_count` makes to reach ``output.min_parts``
MIN_PART_BYTES = 8 * 1024**2


def min_part_count(total_bytes: float, target_bytes: int, *, min_parts: int) -> int | None:
    """How many parts ``output.min_parts`` asks of a result of ``total_bytes``, or ``None``.

    Parts are the unit of parallel work (each is read, computed and encoded
    by one task), so a result that ``target_bytes`` would cut into fewer
    than ``min_parts`` parts is cut into ``min_parts`` instead, as long as
    each stays at least :data:`MIN_PART_BYTES` (a small result stays one
    file). ``None``: the target gives as many parts or more by itself (the
    rule only ever adds parts).
    A function of the plan's numbers only: the same request gives the same
    parts on any machine and any number of workers.

    >>> min_part_count(64e6, 256 * 1024**2, min_parts=4)
    4
    >>> min_part_count(20e6, 256 * 1024**2, min_parts=4)  # 8 MiB each at most twice
    2
    >>> min_part_count(1e6, 256 * 1024**2, min_parts=4) is None  # one part either way
    True
    >>> min_part_count(64e9, 256 * 1024**2, min_parts=4) is None
    True
    >>> min_part_count(64e6, 1024**2, min_parts=4) is None  # a small target: more parts
    True
    """
    by_target = math.ceil(total_bytes / target_bytes)
    wanted = min(min_parts, int(total_bytes // MIN_PART_BYTES))
    return wanted if wanted > max(by_target, 1) else None


def group_evenly(entries: Sequence[int], parts: int) -> list[tuple[int, ...]]:
    """Consecutive chunk indices grouped into ``parts`` parts of about equal entries.

    Each cut falls on the chunk boundary nearest its share of the entries; a
    chunk is never split, so uneven chunks can give fewer parts.

    >>> group_evenly([100] * 8, 4)
    [(0, 1), (2, 3), (4, 5), (6, 7)]
    >>> group_evenly([100, 100, 100, 500], 4)  # the last chunk is half of it all
    [(0, 1), (2,), (3,)]
    >>> group_evenly([100] * 3, 1)
    [(0, 1, 2)]
    """
    n = len(entries)
    ends = np.cumsum(np.asarray(entries, dtype=np.float64))
    total = float(ends[-1]) if n else 0.0
    cuts: set[int] = set()
    if total > 0:
        for i in range(1, max(1, parts)):
            j = int(np.argmin(np.abs(ends - total * i / parts)))  # cut after chunk j
            if 0 < j + 1 < n:
                cuts.add(j + 1)
    edges = [0, *sorted(cuts), n]
    return [tuple(range(a, b)) for a, b in itertools.pairwise(edges) if b > a]


def group_parts(
    entries: Iterable[int], *, bytes_per_event: float, target_bytes: int
) -> list[tuple[int, ...]]:
    """Consecutive chunk indices grouped into parts of about ``target_bytes``.

    A part takes chunks while it stays within 1.5x the target; a part
    under half the target at the end joins the one before when that stays
    within 2x. Pure arithmetic on the plan's numbers, so the same plan
    always gives the same parts (however many workers run them).

    >>> group_parts([100] * 6, bytes_per_event=1.0, target_bytes=200)
    [(0, 1), (2, 3), (4, 5)]
    >>> group_parts([100, 100, 10], bytes_per_event=1.0, target_bytes=200)
    [(0, 1, 2)]
    """
    sizes = [max(0.0, n * bytes_per_event) for n in entries]
    parts: list[list[int]] = []
    size = 0.0
    for i, chunk_bytes in enumerate(sizes):
        if parts and (size >= target_bytes or size + chunk_bytes > 1.5 * target_bytes):
            parts.append([i])
            size = chunk_bytes
        elif parts:
            parts[-1].append(i)
            size += chunk_bytes
        else:
            parts.append([i])
            size = chunk_bytes
    if len(parts) > 1 and size < 0.5 * target_bytes:
        before = sum(sizes[i] for i in parts[-2])
        if before + size <= 2 * target_bytes:
            parts[-2].extend(parts.pop())
    return [tuple(p) for p in parts]


def _warn_coarsened(request: Request, dataset: ResolvedDataset, chunks: list[Chunk]) -> None:
    """Say so (one log line) when tiny chunks were coarsened to the floor."""
    biggest = max(chunks, key=lambda c: c.entries, default=None)
    if biggest is None or biggest.entries <= request.chunk_size:
        return
    # larger than chunk_size: either a basket kept whole between boundaries
    # (normal), or a basket split into MAX_BASKET_SPLIT pieces (the floor)
    file = dataset.files[biggest.file_index]
    edges = [b for b in file.boundaries if b <= biggest.start]
    basket = min((b for b in file.boundaries if b > biggest.start), default=file.entries) - edges[-1]
    if -(-basket // request.chunk_size) > MAX_BASKET_SPLIT:
        import logging

        logging.getLogger(__name__).warning(
            "chunk_size %d is below the floor for %s: its baskets of %d entries are split "
            "into at most %d chunks, so chunks of up to %d entries are used (tiny chunks "
            "decompress a whole basket each and write a cache entry per column each)",
            request.chunk_size, file.path, basket, MAX_BASKET_SPLIT, biggest.entries,
        )


def make_plan(request: Request, *, cache: ColumnCache | None = None) -> Plan:
    """Resolve ``request`` into a :class:`Plan` (metadata I/O only).

    With a ``cache``, what the plan reads of each input file (entries,
    boundaries, columns, branch types and sizes) is kept in it, so a file
    planned before is planned with a ``stat`` and a header read, without
    opening it (:mod:`columnhub.sources._metadata`).
    """
    dataset = resolve(request.dataset, cache=cache)
    friends = tuple(
        _resolve_friend(request, dataset, spec, cache=cache) for spec in request.friends
    )
    _check_defines(request, dataset)
    models = _load_models(request)
    _check_friends(request, dataset, friends, models)
    resolver = _Resolver(request, dataset, friends, models, cache=cache)
    for name in request.dataset.keys:
        if name not in dataset.columns:
            hint = closest(name, dataset.columns)
            msg = (
                f"event-key column {name!r} is not in dataset {request.dataset.name!r}"
                + (f"; closest names: {', '.join(hint)}" if hint else "")
                + "; set dataset.keys to the dataset's key columns"
            )
            raise ColumnNotFoundError(msg)
    _check_key_types(request.dataset.name, dataset, request.dataset.keys, cache=cache)
    wanted = list(request.columns)
    if request.output.include_keys:
        wanted = [k for k in request.dataset.keys if k not in wanted] + wanted
    for name in wanted:
        resolver.resolve(name, context="columns")
    wanted, collections = _add_counters(wanted, resolver)
    for friend in friends:  # joins need the primary keys, inner/right their match flag
        for name in request.dataset.keys:
            resolver.resolve(name, context=f"friend {friend.spec.name!r}")
        if friend.filters or friend.has_tail:
            resolver.resolve(friend.spec.matched_name, context=f"friend {friend.spec.name!r}")
    where = None
    if request.where is not None:
        where = parse(request.where)
        for name in sorted(where.names):
            resolver.resolve(name, context="where")
    from columnhub.sources import check_readable

    check_readable(
        dataset.files[0],
        request.dataset,
        [n for n, c in resolver.done.items() if c.kind == "source"],
        cache=cache,
    )
    chunks: list[Chunk] = []
    for i, info in enumerate(dataset.files):
        for start, stop in split_entries(info.boundaries, request.chunk_size):
            chunks.append(Chunk(index=len(chunks), file_index=i, start=start, stop=stop))
    _warn_coarsened(request, dataset, chunks)
    per_event = _bytes_per_event(
        dataset, wanted, resolver.done, compressed=request.output.compression != "none",
        cache=cache, friends=friends,
    )
    entries = [c.entries for c in chunks]
    count = min_part_count(
        sum(entries) * per_event,
        request.output.target_part_bytes,
        min_parts=request.output.min_parts,
    )
    grouped = (
        group_parts(
            entries, bytes_per_event=per_event, target_bytes=request.output.target_part_bytes
        )
        if count is None
        else group_evenly(entries, count)
    )
    parts = [Part(index=i, chunks=g) for i, g in enumerate(grouped)]
    if any(f.has_tail for f in friends):
        parts.append(Part(index=len(parts), chunks=(), tail=True))
    return Plan(
        request=request,
        dataset=dataset,
        chunks=tuple(chunks),
        columns=dict(resolver.done),
        outputs=tuple(wanted),
        where=where,
        friends=friends,
        collections=collections,
        parts=tuple(parts),
        bytes_per_event=per_event,
    )


#: the output bytes per event assumed for a column whose size the metadata
#: does not tell (a definition, a friend's or a model's column)
_GUESS_BYTES = 4.0


def _bytes_per_event(
    dataset: ResolvedDataset,
    outputs: list[str],
    columns: dict[str, ColumnDef],
    *,
    compressed: bool = True,
    cache: ColumnCache | None = None,
    friends: Iterable[Friend] = (),
) -> float:
    """Estimated output bytes per event: the size of the outputs in the first file.

    Branches of the primary count their compressed bytes per entry (ROOT
    ``fBasketBytes``, Parquet column chunk sizes), or their uncompressed
    bytes for an output written without compression; a friend's column
    counts its bytes per entry in the friend's first file (one partner an
    event); other columns count as :data:`_GUESS_BYTES`. Metadata only; a
    file whose sizes cannot be read counts its columns as guesses. The
    selection is not known yet, so a ``where`` that keeps few events gives
    smaller parts.
    """
    sized: dict[str, float] = {}
    by_friend = {f.spec.name: f for f in friends}
    groups: dict[str, list[str]] = {}  # "" : the primary's branches
    for n in outputs:
        column = columns.get(n)
        if column is None:
            continue
        if column.kind == "source":
            groups.setdefault("", []).append(n)
        elif column.kind == "friend" and column.source.get("friend") in by_friend:
            groups.setdefault(column.source["friend"], []).append(n)
    for owner, names in groups.items():
        source = dataset if not owner else by_friend[owner].dataset
        if not source.files or not source.files[0].entries:
            continue
        branches = names if not owner else [columns[n].source["column"] for n in names]
        try:
            got = _branch_bytes(source, branches, compressed=compressed, cache=cache)
        except Exception:  # noqa: BLE001, S112 - an estimate: sizes unknown count as guesses
            continue
        sized.update({n: got[b] for n, b in zip(names, branches, strict=True) if b in got})
    total = sum(sized.get(n, _GUESS_BYTES) for n in outputs)
    return max(float(total), 1.0)


def _branch_bytes(
    dataset: ResolvedDataset,
    names: list[str],
    *,
    compressed: bool,
    cache: ColumnCache | None = None,
) -> dict[str, float]:
    """(Un)compressed bytes per entry of each of ``names`` in the dataset's first file."""
    info = dataset.files[0]
    if info.format == "parquet":
        from columnhub.sources.parquet import _open

        meta = _open(info.path).metadata
        totals: dict[str, float] = {}
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                top = column.path_in_schema.split(".", 1)[0]
                if top in names:
                    size = (
                        column.total_compressed_size
                        if compressed
                        else column.total_uncompressed_size
                    )
                    totals[top] = totals.get(top, 0.0) + size
        return {n: b / info.entries for n, b in totals.items()}
    if cache is not None:
        from columnhub.sources import branch_facts

        facts = branch_facts(info, dataset.spec, names, cache=cache)
        size = "zbytes" if compressed else "bytes"
        if all(n in facts for n in names):  # else the tree names the problem
            return {n: float(facts[n][size]) / info.entries for n in names}
    from columnhub.sources.root import _cached_tree

    tree = _cached_tree(info, dataset.spec)
    return {
        n: float(tree[n].compressed_bytes if compressed else tree[n].uncompressed_bytes)
        / info.entries
        for n in names
    }


def _add_counters(
    wanted: list[str], resolver: _Resolver
) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """Every delivered NanoAOD collection with its counter, as NanoAOD writes it.

    A collection's counter ``n<collection>`` is delivered even when not asked
    for, just before the collection's first column (unless the request
    lists it elsewhere): the column of that name when there is one (the
    primary's ``nJet`` branch, a friend's or a definition), else, for the
    lists of a file without counters or of one friend (``JetPFCands_*``, a
    prefixed friend's ``jesup_Jet_*``), computed from the lists. Columns of
    no collection, and collections of flat columns only (``MET_pt``), get none.
    """
    members: dict[str, list[str]] = {}
    for name in wanted:
        collection = collection_of(name)
        if collection is not None:
            members.setdefault(collection, []).append(name)
        elif counter_of(name) in resolver.dataset.columns:  # a list singleton (LHEPdfWeight)
            members.setdefault(name, []).append(name)
    out = list(wanted)
    collections: dict[str, tuple[str, ...]] = {}
    for collection, names in members.items():
        counter = counter_of(collection)
        if counter not in resolver.known_names() and not resolver.add_counter(counter, names):
            continue
        if counter not in out:
            out.insert(out.index(names[0]), counter)
        resolver.resolve(counter, context=f"the counter of collection {collection!r}")
        collections[counter] = tuple(names)
    return out, collections


def _load_models(request: Request) -> tuple[Model, ...]:
    if not request.models:
        return ()
    import os

    from columnhub.inference import ModelRegistry

    location = request.registry or os.environ.get("COLUMNHUB_MODELS")
    if not location:
        msg = (
            "the request uses models but names no model registry; set 'registry' in the "
            "request (a directory of model cards) or the COLUMNHUB_MODELS environment variable"
        )
        raise SpecError(msg)
    registry = ModelRegistry(location)
    models = []
    for spec in request.models:
        card = registry.get(spec.model, spec.version)
        names = {o.name: o.name for o in card.outputs}
        for output, column in (spec.outputs or {}).items():
            if output not in names:
                msg = (
                    f"model {spec.model!r} version {spec.version!r} has no output {output!r}; "
                    f"its outputs are: {', '.join(names)}"
                )
                raise SpecError(msg)
            names[output] = column
        inputs = tuple(parse(text) for text in card.inputs)
        models.append(Model(card=card, inputs=inputs, columns=names, backend=spec.backend))
    return tuple(models)


def _resolve_friend(
    request: Request,
    primary: ResolvedDataset,
    spec: FriendSpec,
    *,
    cache: ColumnCache | None = None,
) -> Friend:
    dataset = resolve(spec.dataset, cache=cache)
    keys = spec.friend_keys
    if len(keys) != len(request.dataset.keys):
        msg = (
            f"friend {spec.name!r}: joins on {len(keys)} key column(s) {list(keys)} but the "
            f"primary dataset has {len(request.dataset.keys)}: {list(request.dataset.keys)}; "
            "set the friend's 'on' to one column per primary key, in the same order"
        )
        raise JoinError(msg)
    dataset.require(keys, what=f"friend {spec.name!r} key column")
    _check_key_types(spec.dataset.name, dataset, keys, cache=cache)
    dataset.require(spec.columns, what=f"friend {spec.name!r} column")
    if spec.match == "aligned":
        counts = [f.entries for f in dataset.files]
        want = [f.entries for f in primary.files]
        if counts != want:
            msg = (
                f"friend {spec.name!r} is 'aligned' but its files hold {counts} entries where "
                f"the primary's hold {want}; aligned friends need the same files and order "
                "(use match: keyed for any other layout)"
            )
            raise KeyMismatchError(msg)
    fp = fingerprint("friend", PROVIDER_VERSIONS["friend"], spec.canonical(), dataset.identity)
    return Friend(spec=spec, dataset=dataset, fingerprint=fp)


def _check_key_types(
    name: str,
    dataset: ResolvedDataset,
    keys: tuple[str, ...],
    *,
    cache: ColumnCache | None = None,
) -> None:
    """Key columns of a type that cannot be a key fail here, before any data is read.

    From the first file's branch or Parquet types: float, boolean and jagged
    key columns are a :class:`KeyTypeError` whether or not the dataset is
    joined. Negative values are found when the keys are read.
    """
    from columnhub.sources import column_types

    first = dataset.files[0]
    for column, type_name in column_types(first, dataset.spec, keys, cache=cache).items():
        check_key_type(column, type_name, where=f"dataset {name!r} ({first.path})")


def _check_defines(request: Request, primary: ResolvedDataset) -> None:
    """A ``define`` may not take the name of a branch of the primary dataset."""
    for name in request.define:
        if name in primary.columns:
            msg = (
                f"define {name!r}: {name!r} is already a branch of dataset "
                f"{request.dataset.name!r}, and a definition may not replace a branch; "
                f"choose another name (e.g. {name + '_new'!r})"
            )
            raise SpecError(msg)


def _check_friends(
    request: Request,
    primary: ResolvedDataset,
    friends: tuple[Friend, ...],
    models: tuple[Model, ...] = (),
) -> None:
    owner: dict[str, str] = {name: f"dataset {request.dataset.name!r}" for name in primary.columns}
    owner.update({name: f"define {name!r}" for name in request.define})
    for model in models:
        owner.update({column: f"model {model.card.name!r}" for column in model.columns.values()})
    for friend in friends:
        spec = friend.spec
        pairs = [(spec.output_name(c), f"column {c!r}", c) for c in spec.columns]
        pairs.append((spec.matched_name, "match flag", None))
        for name, what, column in pairs:
            if name in owner:
                if column is None:
                    fix = "give the friend another name (its match flag is '<name>_matched')"
                else:
                    fix = (
                        f"give the friend a 'prefix' (e.g. prefix: {spec.name}_ names it "
                        f"{spec.name + '_' + column!r})"
                    )
                msg = (
                    f"friend {spec.name!r}: its {what} is named {name!r}, a name already "
                    f"taken by {owner[name]}; {fix}"
                )
                raise JoinError(msg)
            owner[name] = f"friend {spec.name!r}"
    if sum(f.expands for f in friends) > 1:
        msg = "at most one friend may use validate: one_to_many (several would multiply rows)"
        raise JoinError(msg)
    if sum(f.has_tail for f in friends) > 1 or (
        any(f.has_tail for f in friends) and any(f.expands and not f.has_tail for f in friends)
    ):
        msg = (
            "a request may have at most one right/outer friend, and not together with a "
            "one_to_many friend; split the request"
        )
        raise JoinError(msg)


def fingerprint(*parts: Any) -> str:
    """A short stable digest of JSON-able parts (the cache's own key function)."""
    from columnhub.cache import entry_key

    return entry_key(parts=list(parts))


class _Resolver:
    """Depth-first resolution of column names to providers (dependencies first)."""

    def __init__(
        self,
        request: Request,
        dataset: ResolvedDataset,
        friends: tuple[Friend, ...],
        models: tuple[Model, ...] = (),
        *,
        cache: ColumnCache | None = None,
    ) -> None:
        self.request = request
        self.dataset = dataset
        self.cache = cache  # file metadata kept there (sources._metadata)
        self.model_columns: dict[str, tuple[Model, str]] = {}
        for model in models:
            for output, column in model.columns.items():
                if (
                    column in self.model_columns
                    or column in dataset.columns
                    or column in request.define
                ):
                    msg = (
                        f"model {model.card.name!r}: output column {column!r} clashes with another "
                        "column; rename it in the request's models: outputs: {output: new_name}"
                    )
                    raise SpecError(msg)
                self.model_columns[column] = (model, output)
        self.friend_columns: dict[str, tuple[Friend, str | None]] = {}
        for friend in friends:
            for column in friend.spec.columns:
                self.friend_columns[friend.spec.output_name(column)] = (friend, column)
            self.friend_columns[friend.spec.matched_name] = (friend, None)
        self.counters: dict[str, str] = {}  # computed counter -> the list it counts
        self.done: dict[str, ColumnDef] = {}
        self.active: list[str] = []

    def add_counter(self, counter: str, names: list[str]) -> bool:
        """Compute ``counter`` from the lists of a collection whose file lacks it.

        Only for a collection whose columns all come from one place: branches
        of the primary dataset, or one friend and one of its collections
        (``JetPFCands_*``; ``jesup_Jet_*`` with ``prefix: jesup_``), with at
        least one list among them. The count of its first list is the counter.
        """
        if all(n in self.dataset.columns and self._plain_branch(n) for n in names):
            dataset, columns = self.dataset, list(names)
        else:
            origin = [self.friend_columns.get(n, (None, None)) for n in names]
            friend = origin[0][0]
            if friend is None or any(f is not friend or c is None for f, c in origin):
                return False
            columns = [c for _, c in origin if c is not None]
            if len({collection_of(c) or c for c in columns}) != 1:
                return False  # jesup_Jet_pt with jesup_Muon_pt: not one collection
            dataset = friend.dataset
        for name, column in zip(names, columns, strict=True):
            if _is_list_column(dataset, column, cache=self.cache):
                self.counters[counter] = name
                return True
        return False

    def _plain_branch(self, name: str) -> bool:
        """True when ``name`` is the primary's branch, not shadowed by another column."""
        return name not in self.friend_columns and name not in self.model_columns

    def primary_counter(self, friend: Friend, column: str) -> str | None:
        """The primary's counter of the collection an unprefixed friend column joins."""
        collection = collection_of(column)
        if friend.spec.prefix is not None or collection is None:
            return None
        counter = counter_of(collection)
        return counter if counter in self.dataset.columns else None

    def known_names(self) -> list[str]:
        return [
            *self.request.define,
            *self.model_columns,
            *self.friend_columns,
            *self.dataset.columns,
        ]

    def resolve(self, name: str, *, context: str) -> ColumnDef:
        """The definition of ``name``, with every column it depends on resolved first.

        Depth first with an explicit stack, not recursion: a chain of
        thousands of ``define`` s resolves like a short one.
        """
        if name in self.done:
            return self.done[name]
        depth = len(self.active)
        path: list[tuple[str, str, Iterator[tuple[str, str]]]] = []

        def enter(column: str, where: str) -> None:
            if column in self.active:
                cycle = " -> ".join([*self.active[self.active.index(column) :], column])
                msg = f"define: the definitions are circular ({cycle}); break the cycle"
                raise SpecError(msg)
            self.active.append(column)
            path.append((column, where, iter(self._deps(column, context=where))))

        try:
            enter(name, context)
            while path:
                current, where, deps = path[-1]
                for dep, dep_context in deps:
                    if dep not in self.done:
                        enter(dep, dep_context)
                        break
                else:  # every dependency is resolved: _make finds them in self.done
                    path.pop()
                    self.active.pop()
                    self.done[current] = self._make(current, context=where)
        finally:
            del self.active[depth:]
        return self.done[name]

    def _deps(self, name: str, *, context: str) -> list[tuple[str, str]]:
        """The columns ``name`` is made from, each with the context for its messages."""
        if name in self.request.define:
            label = f"define {name!r}"
            return [(d, label) for d in sorted(parse(self.request.define[name]).names)]
        if name in self.model_columns:
            model, _ = self.model_columns[name]
            label = f"model {model.card.name!r} input"
            return [(d, label) for d in sorted({n for e in model.inputs for n in e.names})]
        if name in self.friend_columns:
            return [(k, context) for k in self.request.dataset.keys]
        return []

    def _make(self, name: str, *, context: str) -> ColumnDef:
        request = self.request
        if name in request.define:
            expr = parse(request.define[name])
            deps = tuple(sorted(expr.names))
            dep_prints = [self.resolve(d, context=f"define {name!r}").fingerprint for d in deps]
            fp = fingerprint("define", PROVIDER_VERSIONS["define"], expr.canonical, dep_prints)
            return ColumnDef(name, "define", deps, fp, expression=expr)
        if name in self.model_columns:
            model, output = self.model_columns[name]
            label = f"model {model.card.name!r} input"
            deps = tuple(sorted({n for e in model.inputs for n in e.names}))
            by_dep = {d: self.resolve(d, context=label).fingerprint for d in deps}
            inputs = [e.canonical for e in model.inputs]
            fp = fingerprint(
                "model", PROVIDER_VERSIONS["model"], model.card.identity, output, inputs, by_dep
            )
            return ColumnDef(name, "model", deps, fp, source={"output": output}, model=model)
        if name in self.friend_columns:
            friend, column = self.friend_columns[name]
            deps = tuple(request.dataset.keys)
            source: dict[str, Any] = {"friend": friend.spec.name, "column": column}
            counter = self.primary_counter(friend, column) if column is not None else None
            if counter is not None:  # joins a primary collection: checked, filled to nJet
                deps = (*deps, counter)
                source["counter"] = counter
            keys = [self.resolve(k, context=context).fingerprint for k in deps]
            fp = fingerprint("friend", friend.fingerprint, column, keys)
            return ColumnDef(name, "friend", deps, fp, source=source)
        if name in self.counters:
            expr = parse(f"num({self.counters[name]})")
            dep = self.resolve(self.counters[name], context=context).fingerprint
            fp = fingerprint("define", PROVIDER_VERSIONS["define"], expr.canonical, [dep])
            return ColumnDef(
                name, "define", tuple(sorted(expr.names)), fp, expression=expr,
                source={"counts": self.counters[name]},
            )
        if name in self.dataset.columns:
            self.dataset.require_everywhere(name, what=f"{context}: branch")
            fp = fingerprint("source", PROVIDER_VERSIONS["source"], name)
            return ColumnDef(name, "source", (), fp, source={"branch": name})
        hint = closest(name, self.known_names())
        msg = (
            f"{context}: column {name!r} is neither a branch of dataset "
            f"{request.dataset.name!r}, nor a friend's or model's column, nor defined in 'define'"
        )
        msg += f"; closest names: {', '.join(hint)}" if hint else ""
        raise ColumnNotFoundError(msg)


def _is_list_column(
    dataset: ResolvedDataset, name: str, *, cache: ColumnCache | None = None
) -> bool:
    """True when column ``name`` of ``dataset`` holds a list per event (metadata only)."""
    info = dataset.files[0]
    typename = dataset.columns.get(name, "")
    if info.format == "parquet":
        return typename.startswith(("list", "large_list"))
    if typename:  # an RNTuple field's C++ type
        return typename.startswith(("std::vector<", "ROOT::RVec<", "ROOT::VecOps::RVec<"))
    if cache is not None:
        from columnhub.sources import branch_facts

        facts = branch_facts(info, dataset.spec, [name], cache=cache)
        if name in facts:
            return bool(facts[name]["list"])
    from columnhub.sources.root import is_list

    return is_list(info, dataset.spec, name)
