"""Planning: a request becomes a :class:`Plan` of independent chunk tasks.

The plan resolves every column name to the provider that makes it (a source
branch, an expression, a friend join, a model), checks that everything exists
*before* any work starts, and splits the primary dataset into chunks (entry
ranges aligned to basket boundaries). It reads metadata only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from columnhub.datasets import ResolvedDataset, resolve
from columnhub.errors import ColumnNotFoundError, JoinError, KeyMismatchError, SpecError, closest
from columnhub.expressions import Expression, parse
from columnhub.spec import FriendSpec, Request

__all__ = [
    "MAX_BASKET_SPLIT",
    "Chunk",
    "ColumnDef",
    "Friend",
    "Model",
    "Plan",
    "make_plan",
    "split_entries",
]

#: Bumped whenever a provider's output for the same inputs could change; part
#: of every cache key, so old cache entries are never served by newer code.
PROVIDER_VERSIONS = {"source": 1, "define": 1, "where": 1, "friend": 1, "model": 1}

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
    """

    request: Request
    dataset: ResolvedDataset
    chunks: tuple[Chunk, ...]
    columns: dict[str, ColumnDef]
    outputs: tuple[str, ...]
    where: Expression | None
    friends: tuple[Friend, ...] = ()

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
    [(0, 334), (334, 667), (667, 1000)]
    >>> len(split_entries([0, 10_000], 1))
    64
    """
    b = np.unique(np.asarray(list(boundaries), dtype=np.int64))
    ranges: list[tuple[int, int]] = []
    start = int(b[0])
    prev = start
    for edge in b[1:]:
        edge = int(edge)
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


def make_plan(request: Request) -> Plan:
    """Resolve ``request`` into a :class:`Plan` (metadata I/O only)."""
    dataset = resolve(request.dataset)
    friends = tuple(_resolve_friend(request, dataset, spec) for spec in request.friends)
    _check_friends(request, dataset, friends)
    models = _load_models(request)
    resolver = _Resolver(request, dataset, friends, models)
    for name in request.dataset.keys:
        if name not in dataset.columns:
            hint = closest(name, dataset.columns)
            msg = (
                f"event-key column {name!r} is not in dataset {request.dataset.name!r}"
                + (f"; closest names: {', '.join(hint)}" if hint else "")
                + "; set dataset.keys to the dataset's key columns"
            )
            raise ColumnNotFoundError(msg)
    wanted = list(request.columns)
    if request.output.include_keys:
        wanted = [k for k in request.dataset.keys if k not in wanted] + wanted
    for name in wanted:
        resolver.resolve(name, context="columns")
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
    chunks: list[Chunk] = []
    for i, info in enumerate(dataset.files):
        for start, stop in split_entries(info.boundaries, request.chunk_size):
            chunks.append(Chunk(index=len(chunks), file_index=i, start=start, stop=stop))
    _warn_coarsened(request, dataset, chunks)
    return Plan(
        request=request,
        dataset=dataset,
        chunks=tuple(chunks),
        columns=dict(resolver.done),
        outputs=tuple(wanted),
        where=where,
        friends=friends,
    )


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


def _resolve_friend(request: Request, primary: ResolvedDataset, spec: FriendSpec) -> Friend:
    dataset = resolve(spec.dataset)
    keys = spec.friend_keys
    if len(keys) != len(request.dataset.keys):
        msg = (
            f"friend {spec.name!r}: joins on {len(keys)} key column(s) {list(keys)} but the "
            f"primary dataset has {len(request.dataset.keys)}: {list(request.dataset.keys)}; "
            "set the friend's 'on' to one column per primary key, in the same order"
        )
        raise JoinError(msg)
    dataset.require(keys, what=f"friend {spec.name!r} key column")
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


def _check_friends(request: Request, primary: ResolvedDataset, friends: tuple[Friend, ...]) -> None:
    owner: dict[str, str] = {name: "the primary dataset" for name in primary.columns}
    owner.update({name: "define" for name in request.define})
    for friend in friends:
        names = [friend.spec.output_name(c) for c in friend.spec.columns]
        names.append(friend.spec.matched_name)
        for name in names:
            if name in owner:
                msg = (
                    f"friend {friend.spec.name!r}: column name {name!r} clashes with a column "
                    f"of {owner[name]}; give the friend a 'prefix' (e.g. prefix: "
                    f"{friend.spec.name}_) so its columns get other names"
                )
                raise JoinError(msg)
            owner[name] = f"friend {friend.spec.name!r}"
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
    ) -> None:
        self.request = request
        self.dataset = dataset
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
        self.done: dict[str, ColumnDef] = {}
        self.active: list[str] = []

    def known_names(self) -> list[str]:
        return [
            *self.request.define,
            *self.model_columns,
            *self.friend_columns,
            *self.dataset.columns,
        ]

    def resolve(self, name: str, *, context: str) -> ColumnDef:
        if name in self.done:
            return self.done[name]
        if name in self.active:
            cycle = " -> ".join([*self.active[self.active.index(name) :], name])
            msg = f"define: the definitions are circular ({cycle}); break the cycle"
            raise SpecError(msg)
        self.active.append(name)
        try:
            column = self._make(name, context=context)
        finally:
            self.active.pop()
        self.done[name] = column
        return column

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
            keys = [self.resolve(k, context=context).fingerprint for k in request.dataset.keys]
            fp = fingerprint("friend", friend.fingerprint, column, keys)
            source = {"friend": friend.spec.name, "column": column}
            return ColumnDef(name, "friend", tuple(request.dataset.keys), fp, source=source)
        if name in self.dataset.columns:
            fp = fingerprint("source", PROVIDER_VERSIONS["source"], name)
            return ColumnDef(name, "source", (), fp, source={"branch": name})
        hint = closest(name, self.known_names())
        msg = (
            f"{context}: column {name!r} is neither a branch of dataset "
            f"{request.dataset.name!r}, nor a friend's or model's column, nor defined in 'define'"
        )
        msg += f"; closest names: {', '.join(hint)}" if hint else ""
        raise ColumnNotFoundError(msg)
