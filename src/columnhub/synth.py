"""Synthetic NanoAOD-like ROOT files, and re-layouts of existing ones.

This module owns test and benchmark data at scale:

- :func:`synthesize` writes ``events`` NanoAOD-like events, bootstrap-resampled
  from a small template file (``like``): flat branches by resampling whole
  template events, collections (``nX`` + ``X_*``) by resampling multiplicities
  and whole template objects, so correlations inside an object are kept.
- :func:`regroup` rewrites existing ROOT files into another file grouping,
  event order or random subset, with the same events and values.

Every random number of :func:`synthesize` is a counter-based hash (SplitMix64)
of ``(seed, stream, event index[, object index])``; nothing depends on batch
sizes, file counts or order. Hence an event's values are a pure function of
``(like, seed, first_event + i)``: a shuffled / regrouped / subset output holds
exactly the values of the plain output, event by event, and a run that selects
other branches agrees on the branches both runs hold. The event keys ``run``,
``luminosityBlock``, ``event`` depend only on the event index (see
:func:`event_keys`), never on the seed, so two runs of the same ``events`` can
be joined by key.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import pathlib
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import awkward as ak
import numpy as np
import numpy.typing as npt
import uproot

from columnhub.errors import (
    ColumnNotFoundError,
    CorruptFileError,
    DatasetError,
    DatasetFileNotFoundError,
    OutputError,
    SpecError,
    TreeNotFoundError,
    closest,
)

__all__ = [
    "DEFAULT_BRANCHES",
    "EVENTS_PER_LUMI",
    "KEY_BRANCHES",
    "LUMIS_PER_RUN",
    "Collection",
    "Template",
    "event_keys",
    "read_template",
    "regroup",
    "synthesize",
]

log = logging.getLogger(__name__)

TREE = "Events"
KEY_BRANCHES: tuple[str, ...] = ("run", "luminosityBlock", "event")
"""The CMS event-key branches; always written."""

DEFAULT_BRANCHES: tuple[str, ...] = (
    "MET_*",
    "PuppiMET_*",
    "PV_npvs",
    "genWeight",
    "Jet_*",
    "Muon_*",
    "Electron_*",
    "Photon_*",
    "Tau_*",
)
"""Branch patterns of the default NanoAOD core (keys are always added)."""

EVENTS_PER_LUMI = 1000
"""Synthetic events per luminosity block."""
LUMIS_PER_RUN = 1000
"""Synthetic luminosity blocks per run."""

_DEFAULT_BASKET_EVENTS = 100_000
_COMPRESSIONS = {"zstd": "ZSTD", "zlib": "ZLIB", "lz4": "LZ4", "lzma": "LZMA"}
_IDX_FIELD = re.compile(r"^(?P<target>[A-Za-z0-9]+?)Idx(?:\d+|[A-Z].*)?$")
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


# ---------------------------------------------------------------- templates


@dataclass(frozen=True)
class Collection:
    """A NanoAOD collection: counter ``nX`` and jagged branches ``X_*``.

    Attributes:
        name: the collection name ``X``.
        counter_dtype: dtype of the counter branch ``nX`` in the template.
        fields: field names (branch ``X_<field>``); ``""`` is a field-less
            jagged branch named ``X`` itself (e.g. ``LHEPdfWeight``).
        dtypes: dtype of each field's values.
        sorted_by_pt: whether every template event has descending ``pt``.
    """

    name: str
    counter_dtype: np.dtype[Any]
    fields: tuple[str, ...]
    dtypes: dict[str, np.dtype[Any]]
    sorted_by_pt: bool = False

    @property
    def counter(self) -> str:
        """The counter branch name ``nX``."""
        return "n" + self.name

    def branch(self, field_name: str) -> str:
        """The branch name of a field."""
        return self.name if field_name == "" else f"{self.name}_{field_name}"


@dataclass(frozen=True)
class Template:
    """The branch structure of a NanoAOD-like tree (see :func:`read_template`).

    Attributes:
        path: the file.
        num_entries: entries of its ``Events`` tree.
        branches: every branch name, in file order.
        flat: flat (one value per event) branches and their dtypes; collection
            counters are not in it.
        collections: collections by name.
        aliases: per-branch counters that uproot-written files carry
            (``nJet_pt`` counting ``Jet_pt``), mapped to their collection.
        skipped: branches that cannot be written back, with the reason.
    """

    path: pathlib.Path
    num_entries: int
    branches: tuple[str, ...]
    flat: dict[str, np.dtype[Any]]
    collections: dict[str, Collection]
    aliases: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _open_tree(path: str | os.PathLike[str]) -> tuple[Any, Any]:
    p = pathlib.Path(path)
    if not p.is_file():
        sibling = [c.name for c in p.parent.glob("*.root")] if p.parent.is_dir() else []
        hint = f"; files there: {', '.join(closest(p.name, sibling))}" if sibling else ""
        msg = f"ROOT file {str(p)!r} does not exist{hint}; pass an existing NanoAOD file"
        raise DatasetFileNotFoundError(msg)
    try:
        f = uproot.open(p)
    except Exception as err:
        msg = f"cannot open {str(p)!r} as a ROOT file ({err}); pass a readable ROOT file"
        raise CorruptFileError(msg) from err
    if TREE not in f:
        f.close()
        trees = [k.split(";")[0] for k in f.keys()]  # noqa: SIM118
        msg = f"{str(p)!r} has no tree {TREE!r} (it has: {trees}); pass a NanoAOD file"
        raise TreeNotFoundError(msg)
    return f, f[TREE]


def read_template(path: str | os.PathLike[str]) -> Template:
    """Analyse the ``Events`` tree of a NanoAOD-like file (metadata only).

    A jagged branch ``B`` belongs to collection ``X`` for the shortest
    ``_``-separated prefix ``X`` of ``B`` that has a scalar integer branch
    ``nX``. Jagged branches without such a counter, and branches whose type
    uproot cannot write, are listed in :attr:`Template.skipped`.

    Args:
        path: the ROOT file.

    Returns:
        The template description.
    """
    f, tree = _open_tree(path)
    with f:
        names = tuple(tree.keys(recursive=False))
        flat: dict[str, np.dtype[Any]] = {}
        jagged: dict[str, np.dtype[Any]] = {}
        skipped: dict[str, str] = {}
        for name in names:
            interp = tree[name].interpretation
            kind = type(interp).__name__
            if kind == "AsDtype":
                flat[name] = interp.to_dtype.newbyteorder("=")
            elif kind == "AsJagged" and type(interp.content).__name__ == "AsDtype":
                dt = interp.content.to_dtype
                if dt.subdtype is not None:
                    skipped[name] = f"jagged array of fixed-size arrays ({interp})"
                else:
                    jagged[name] = dt.newbyteorder("=")
            else:
                skipped[name] = f"interpretation {interp} cannot be written by uproot"
        counters = {n for n, dt in flat.items() if dt.kind in "iu" and dt.subdtype is None}
        members: dict[str, list[str]] = {}
        for name in jagged:
            parts = name.split("_")
            for i in range(1, len(parts) + 1):
                prefix = "_".join(parts[:i])
                if "n" + prefix in counters:
                    members.setdefault(prefix, []).append(name)
                    break
            else:
                skipped[name] = "jagged branch without a counter branch n<Collection>"
        collections: dict[str, Collection] = {}
        for cname, branches in members.items():
            fields = tuple("" if b == cname else b[len(cname) + 1 :] for b in branches)
            collections[cname] = Collection(
                name=cname,
                counter_dtype=flat.pop("n" + cname),
                fields=fields,
                dtypes={fd: jagged[b] for fd, b in zip(fields, branches, strict=True)},
            )
        aliases = {}
        for c in collections.values():
            for fd in c.fields:
                alias = "n" + c.branch(fd)
                if alias in flat and fd != "":
                    aliases[alias] = c.name
        return Template(
            path=pathlib.Path(path),
            num_entries=int(tree.num_entries),
            branches=names,
            flat=flat,
            collections=collections,
            aliases=aliases,
            skipped=skipped,
        )


@dataclass(frozen=True)
class _Selection:
    """The branches one run writes: flat branches and collections' fields."""

    flat: tuple[str, ...]
    collections: dict[str, tuple[str, ...]]
    order: tuple[str, ...]  # output order: flat names and collection names


def _select(
    tpl: Template,
    patterns: Sequence[str] | None,
    *,
    default: Sequence[str],
    strict: bool,
) -> _Selection:
    """Resolve glob ``patterns`` against the template's branches."""
    pats = list(default if patterns is None else patterns)
    if isinstance(patterns, str):
        msg = f"branches must be a list of glob patterns, not the string {patterns!r}"
        raise SpecError(msg)
    writable = [b for b in tpl.branches if b not in tpl.skipped]
    chosen: set[str] = set()
    for pat in pats:
        hit = {b for b in writable if fnmatch.fnmatchcase(b, pat)}
        if not hit and strict and patterns is not None:
            near = closest(pat, writable)
            hint = f"; closest branches: {', '.join(near)}" if near else ""
            msg = f"branch pattern {pat!r} matches no branch of {str(tpl.path)!r}{hint}"
            raise ColumnNotFoundError(msg)
        chosen |= hit
    coll_fields: dict[str, list[str]] = {}
    for c in tpl.collections.values():
        picked = [fd for fd in c.fields if c.branch(fd) in chosen]
        if picked:
            coll_fields[c.name] = picked
    order: list[str] = [k for k in KEY_BRANCHES]
    flat: list[str] = []
    seen: set[str] = set(order)
    for b in tpl.branches:
        owner = _owner(tpl, b)
        if owner is not None and owner in coll_fields:
            if owner not in seen:
                seen.add(owner)
                order.append(owner)
        elif b in chosen and b not in seen and b not in KEY_BRANCHES:
            if b in tpl.aliases and tpl.aliases[b] not in coll_fields:
                continue  # a per-branch counter of an unselected collection
            seen.add(b)
            order.append(b)
            flat.append(b)
    return _Selection(
        flat=tuple(flat),
        collections={k: tuple(v) for k, v in coll_fields.items()},
        order=tuple(order),
    )


def _owner(tpl: Template, branch: str) -> str | None:
    """The collection a branch (counter or field) belongs to, if any."""
    if branch.startswith("n") and branch[1:] in tpl.collections:
        return branch[1:]
    for c in tpl.collections.values():
        if branch == c.name or branch.startswith(c.name + "_"):
            fd = "" if branch == c.name else branch[len(c.name) + 1 :]
            if fd in c.dtypes:
                return c.name
    return None


# ---------------------------------------------------------------- batches


@dataclass
class _Batch:
    """Events in columnar form: flat arrays, and per collection counts + fields."""

    flat: dict[str, npt.NDArray[Any]]
    colls: dict[str, tuple[npt.NDArray[np.int64], dict[str, npt.NDArray[Any]]]]

    def __len__(self) -> int:
        for v in self.flat.values():
            return len(v)
        for counts, _ in self.colls.values():
            return len(counts)
        return 0

    def take(self, index: npt.NDArray[np.int64]) -> _Batch:
        """Events at ``index`` (any order)."""
        flat = {k: v[index] for k, v in self.flat.items()}
        colls = {}
        for name, (counts, fields) in self.colls.items():
            offsets = np.zeros(len(counts) + 1, np.int64)
            np.cumsum(counts, out=offsets[1:])
            sub = counts[index]
            rows = _ranges(offsets[:-1][index], sub)
            colls[name] = (sub, {k: v[rows] for k, v in fields.items()})
        return _Batch(flat, colls)

    def slice(self, start: int, stop: int) -> _Batch:
        """Events ``start:stop`` (cheap views)."""
        flat = {k: v[start:stop] for k, v in self.flat.items()}
        colls = {}
        for name, (counts, fields) in self.colls.items():
            lo = int(counts[:start].sum())
            hi = lo + int(counts[start:stop].sum())
            colls[name] = (counts[start:stop], {k: v[lo:hi] for k, v in fields.items()})
        return _Batch(flat, colls)

    @staticmethod
    def concat(parts: Sequence[_Batch]) -> _Batch:
        first = parts[0]
        flat = {k: np.concatenate([p.flat[k] for p in parts]) for k in first.flat}
        colls = {}
        for name, (_, fields) in first.colls.items():
            counts = np.concatenate([p.colls[name][0] for p in parts])
            colls[name] = (
                counts,
                {k: np.concatenate([p.colls[name][1][k] for p in parts]) for k in fields},
            )
        return _Batch(flat, colls)


def _ranges(starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]) -> Any:
    """Concatenation of ``arange(s, s + n)`` for each start/length, vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    out = np.arange(total, dtype=np.int64)
    out -= np.repeat(offsets[:-1] - starts, lengths)
    return out


# ---------------------------------------------------------------- randomness


def _stream(seed: int, name: str) -> int:
    """A 64-bit offset for one named random stream of one seed."""
    z = (int(seed) * _GOLDEN + zlib.crc32(name.encode()) * 0xD1B54A32D192ED03) & _MASK64
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = ((z ^ (z >> shift)) * mult) & _MASK64
    return z ^ (z >> 31)


def _hash(counter: npt.NDArray[np.uint64], offset: int) -> npt.NDArray[np.uint64]:
    """SplitMix64 output number ``counter`` of the stream at ``offset``."""
    z = counter * np.uint64(_GOLDEN)
    z += np.uint64(offset)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def _below(h: npt.NDArray[np.uint64], m: int) -> npt.NDArray[np.int64]:
    """Map 64-bit hashes to integers in ``[0, m)`` (multiply-shift, m < 2**32)."""
    return (((h >> np.uint64(32)) * np.uint64(m)) >> np.uint64(32)).astype(np.int64)


def _unit(h: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
    """Map 64-bit hashes to floats in ``[0, 1)``."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def event_keys(index: npt.ArrayLike) -> dict[str, npt.NDArray[Any]]:
    """The synthetic event keys of event indices (independent of any seed).

    ``run = 1 + index // (EVENTS_PER_LUMI * LUMIS_PER_RUN)``,
    ``luminosityBlock = 1 + index // EVENTS_PER_LUMI % LUMIS_PER_RUN``,
    ``event = index + 1``: unique per index, as in data where event numbers
    increase within a run.

    >>> {k: v.tolist() for k, v in event_keys([0, 999, 1000, 1_000_000]).items()}
    {'run': [1, 1, 1, 2], 'luminosityBlock': [1, 1, 2, 1], 'event': [1, 1000, 1001, 1000001]}
    """
    idx = np.asarray(index, dtype=np.int64)
    return {
        "run": (1 + idx // (EVENTS_PER_LUMI * LUMIS_PER_RUN)).astype(np.uint32),
        "luminosityBlock": (1 + idx // EVENTS_PER_LUMI % LUMIS_PER_RUN).astype(np.uint32),
        "event": (idx + 1).astype(np.uint64),
    }


# ---------------------------------------------------------------- generator


@dataclass(frozen=True)
class _Pool:
    """Template values to resample: flat rows and per-collection objects."""

    flat: dict[str, npt.NDArray[Any]]
    counts: dict[str, npt.NDArray[np.int64]]
    objects: dict[str, dict[str, npt.NDArray[Any]]]
    sorted_by_pt: dict[str, bool]
    pt: dict[str, npt.NDArray[Any]]  # pt of the objects of pt-sorted collections
    idx_targets: dict[tuple[str, str], str]  # (collection, field) -> target collection


def _load_pool(tpl: Template, sel: _Selection) -> _Pool:
    f, tree = _open_tree(tpl.path)
    with f:
        names = [b for b in sel.flat if b not in tpl.aliases]
        flat = {}
        if names:
            arrays = tree.arrays(names, library="np")
            flat = {b: np.ascontiguousarray(arrays[b], dtype=tpl.flat[b]) for b in names}
        counts: dict[str, npt.NDArray[np.int64]] = {}
        objects: dict[str, dict[str, npt.NDArray[Any]]] = {}
        sorted_by_pt: dict[str, bool] = {}
        pts: dict[str, npt.NDArray[Any]] = {}
        for cname, fields in sel.collections.items():
            coll = tpl.collections[cname]
            need = list(fields)
            if "pt" in coll.fields and "pt" not in need:
                need.append("pt")
            data = tree.arrays([coll.branch(fd) for fd in need], how=dict)
            first = data[coll.branch(need[0])]
            counts[cname] = np.asarray(ak.num(first, axis=1), dtype=np.int64)
            objects[cname] = {}
            for fd in need:
                arr = data[coll.branch(fd)]
                if not np.array_equal(np.asarray(ak.num(arr, axis=1)), counts[cname]):
                    msg = (
                        f"{str(tpl.path)!r}: {coll.branch(fd)!r} and {coll.branch(need[0])!r} "
                        f"have different lengths per event, so they are not one collection"
                    )
                    raise DatasetError(msg)
                objects[cname][fd] = np.asarray(ak.flatten(arr), dtype=coll.dtypes[fd])
            pt = objects[cname].get("pt")
            is_sorted = False
            if pt is not None and len(pt) > 1 and counts[cname].max() > 1:
                same_event = np.repeat(np.arange(len(counts[cname])), counts[cname])
                step = np.diff(pt)
                inner = same_event[1:] == same_event[:-1]
                is_sorted = bool(np.all(step[inner] <= 0))
            sorted_by_pt[cname] = is_sorted
            if is_sorted and pt is not None:
                pts[cname] = pt
            if "pt" not in fields:
                objects[cname].pop("pt", None)
        lowered = {c.lower(): c for c in sel.collections}
        idx_targets = {}
        for cname, fields in sel.collections.items():
            for fd in fields:
                m = _IDX_FIELD.match(fd)
                dt = tpl.collections[cname].dtypes[fd]
                if m and dt.kind == "i":
                    target = lowered.get(m.group("target").lower())
                    if target is not None:
                        idx_targets[(cname, fd)] = target
    return _Pool(flat, counts, objects, sorted_by_pt, pts, idx_targets)


def _generate(
    pool: _Pool,
    sel: _Selection,
    tpl: Template,
    index: npt.NDArray[np.int64],
    seed: int,
) -> _Batch:
    """Synthesize the events with absolute indices ``index`` (any order)."""
    uidx = index.astype(np.uint64)
    flat: dict[str, npt.NDArray[Any]] = dict(event_keys(index))
    if pool.flat:
        row = _below(_hash(uidx, _stream(seed, "flat")), tpl.num_entries)
        for b, values in pool.flat.items():
            flat[b] = values[row]
    colls: dict[str, tuple[npt.NDArray[np.int64], dict[str, npt.NDArray[Any]]]] = {}
    for cname, fields in sel.collections.items():
        tcounts = pool.counts[cname]
        counts = tcounts[_below(_hash(uidx, _stream(seed, "n" + cname)), len(tcounts))]
        total = int(counts.sum())
        nobj = len(next(iter(pool.objects[cname].values())))
        if total == 0 or nobj == 0:
            counts = np.zeros(len(index), np.int64) if nobj == 0 else counts
            colls[cname] = (counts, {fd: pool.objects[cname][fd][:0] for fd in fields})
            continue
        width = int(tcounts.max())
        offsets = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        local = np.arange(total, dtype=np.int64) - np.repeat(offsets[:-1], counts)
        ctr = np.repeat(uidx, counts) * np.uint64(width) + local.astype(np.uint64)
        obj = _below(_hash(ctr, _stream(seed, cname)), nobj)
        if pool.sorted_by_pt[cname]:
            parent = np.repeat(np.arange(len(counts)), counts)
            obj = obj[np.lexsort((-pool.pt[cname][obj], parent))]
        colls[cname] = (counts, {fd: pool.objects[cname][fd][obj] for fd in fields})
    for (cname, fd), target in pool.idx_targets.items():
        ncounts, nfields = colls[cname]
        values = nfields[fd].copy()
        limit = np.repeat(colls[target][0], ncounts)
        values[values >= limit] = -1
        nfields[fd] = values
    for alias, cname in tpl.aliases.items():
        if alias in sel.flat:
            flat[alias] = colls[cname][0].astype(tpl.flat[alias])
    return _Batch(flat, colls)


# ---------------------------------------------------------------- writing


def _compression(text: str) -> Any:
    algo, _, level = str(text).partition(":")
    algo = algo.strip().lower()
    if algo in ("none", ""):
        return None
    if algo not in _COMPRESSIONS:
        msg = (
            f"unknown compression {text!r}; use one of {', '.join(_COMPRESSIONS)} "
            f"with an optional level (e.g. 'zstd:1'), or 'none'"
        )
        raise SpecError(msg)
    try:
        lvl = int(level) if level else 1
    except ValueError:
        lvl = -1
    if not 0 <= lvl <= 9 + 13 * (algo == "zstd"):
        msg = f"compression level in {text!r} must be an integer 0-9 (zstd: 0-22), e.g. 'zstd:1'"
        raise SpecError(msg)
    return getattr(uproot, _COMPRESSIONS[algo])(lvl)


def _to_uproot(batch: _Batch, order: Sequence[str]) -> dict[str, Any]:
    """The ``extend`` payload: flat numpy arrays and ``ak.zip``-like records."""
    out: dict[str, Any] = {}
    for name in order:
        if name in batch.flat:
            out[name] = batch.flat[name]
            continue
        counts, fields = batch.colls[name]
        offsets = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        idx = ak.index.Index64(offsets)
        if list(fields) == [""]:
            content: Any = ak.contents.NumpyArray(fields[""])
        else:
            content = ak.contents.RecordArray(
                [ak.contents.NumpyArray(v) for v in fields.values()],
                list(fields),
                length=int(offsets[-1]),
            )
        out[name] = ak.Array(ak.contents.ListOffsetArray(idx, content))
    return out


class _Sink:
    """Writes batches, in output order, into files of planned sizes."""

    def __init__(
        self,
        paths: Sequence[pathlib.Path],
        sizes: Sequence[int],
        *,
        schema: _Batch,
        order: Sequence[str],
        counter_dtypes: dict[str, np.dtype[Any]],
        compression: Any,
        basket_events: int,
        extra_baskets: int = 0,
    ) -> None:
        self.paths = list(paths)
        self.sizes = list(sizes)
        self.schema = schema
        self.order = [n for n in order if n in schema.flat or n in schema.colls]
        self.counter_dtypes = counter_dtypes
        self.compression = compression
        self.current = -1
        self.filled = 0
        self.file: Any = None
        self.tree: Any = None
        self.retyped: list[str] = []
        self.basket_events = basket_events
        self.extra_baskets = extra_baskets

    def baskets_hint(self, size: int) -> int:
        """Basket slots to reserve, so uproot need not rewrite the tree metadata
        (which costs time quadratic in the number of branches) while filling."""
        return max(10, -(-size // self.basket_events) + 3 + self.extra_baskets)

    def _open(self, k: int) -> None:
        self._close()
        self.current = k
        self.filled = 0
        tmp = self.paths[k].with_name("." + self.paths[k].name + ".tmp")
        self.file = uproot.recreate(tmp, compression=self.compression)
        payload = _to_uproot(self.schema.slice(0, 0), self.order)
        types = {k2: (v.type if isinstance(v, ak.Array) else v.dtype) for k2, v in payload.items()}
        self.tree = self.file.mktree(
            TREE, types, initial_basket_capacity=self.baskets_hint(self.sizes[k])
        )
        self._retype_counters()

    def _retype_counters(self) -> None:
        """Give counters the template's integer type (uproot writes int32).

        uproot's writer has no option for the counter type; its per-branch
        metadata is adjusted before the first basket, which changes the TLeaf
        type (e.g. ``nJet/i``, unsigned, as CMS writes it), and the metadata
        is rewritten. If uproot's internals differ, the int32 counter is kept.
        """
        cascading = getattr(self.tree, "_cascading", None)
        data = getattr(cascading, "_branch_data", None)
        lookup = getattr(cascading, "_branch_lookup", None)
        if not isinstance(data, list) or not isinstance(lookup, dict):
            return
        for cname in self.schema.colls:
            want = self.counter_dtypes.get(cname)
            counter = "n" + cname
            if want is None or counter not in lookup:
                continue
            datum = data[lookup[counter]]
            big = want.newbyteorder(">")
            letter = {">i4": "I", ">u4": "i"}.get(big.str)
            if datum.get("kind") != "counter" or letter is None or datum.get("dtype") == big:
                continue
            datum["dtype"] = big
            datum["fTitle"] = f"{counter}/{letter}"
            self.retyped.append(counter)
        wfile = getattr(self.tree, "_file", None)
        relocate = getattr(cascading, "_relocate", None)
        if self.retyped and relocate is not None and wfile is not None:
            # mktree already wrote the metadata: rewrite it with the new leaf types
            relocate(wfile, wfile.sink)

    def _close(self) -> None:
        if self.file is not None:
            self.file.close()
            tmp = self.paths[self.current].with_name("." + self.paths[self.current].name + ".tmp")
            tmp.replace(self.paths[self.current])
            self.file = None

    def write(self, batch: _Batch) -> None:
        start = 0
        n = len(batch)
        while start < n:
            if self.file is None or self.filled >= self.sizes[self.current]:
                self._open(self.current + 1)
                continue
            take = min(n - start, self.sizes[self.current] - self.filled)
            if take > 0:
                self.tree.extend(_to_uproot(batch.slice(start, start + take), self.order))
                self.filled += take
                start += take

    def finish(self) -> list[pathlib.Path]:
        while self.current < len(self.paths) - 1:
            self._open(self.current + 1)
        self._close()
        return self.paths

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        for p in self.paths:
            tmp = p.with_name("." + p.name + ".tmp")
            tmp.unlink(missing_ok=True)


def _output_paths(output: str | os.PathLike[str], files: int) -> list[pathlib.Path]:
    out = pathlib.Path(output)
    if out.suffix == ".root":
        if files != 1:
            msg = (
                f"output {str(out)!r} is a single .root file but files={files}; "
                f"pass a directory as output, or files=1"
            )
            raise SpecError(msg)
        if out.is_dir():
            msg = f"output {str(out)!r} is a directory; pass a file name or another directory"
            raise OutputError(msg)
        out.parent.mkdir(parents=True, exist_ok=True)
        return [out]
    if out.exists() and not out.is_dir():
        msg = f"output {str(out)!r} exists and is not a directory; pass a directory or a .root name"
        raise OutputError(msg)
    out.mkdir(parents=True, exist_ok=True)
    return [out / f"part-{k:05d}.root" for k in range(files)]


def _split(n: int, files: int) -> list[int]:
    """Near-equal file sizes (they differ by at most one event)."""
    return [n // files + (1 if k < n % files else 0) for k in range(files)]


def _check_layout(files: int, subset: float, basket_events: int, *, seed: int) -> None:
    """Validate the options ``synthesize`` and ``regroup`` share (SpecError naming the bad one)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        msg = f"seed must be an integer >= 0, got {seed!r}"
        raise SpecError(msg)
    if isinstance(files, bool) or not isinstance(files, int) or files < 1:
        msg = f"files must be an integer >= 1, got {files!r}"
        raise SpecError(msg)
    if not isinstance(subset, int | float) or not 0.0 < float(subset) <= 1.0:
        msg = f"subset must be a fraction in (0, 1], got {subset!r}; e.g. 0.9 keeps 90% of events"
        raise SpecError(msg)
    if isinstance(basket_events, bool) or not isinstance(basket_events, int) or basket_events < 1:
        msg = f"basket_events must be an integer >= 1, got {basket_events!r}"
        raise SpecError(msg)


# ---------------------------------------------------------------- public API


def synthesize(
    like: str | os.PathLike[str],
    *,
    events: int,
    output: str | os.PathLike[str],
    seed: int = 0,
    files: int = 1,
    shuffle: bool = False,
    subset: float = 1.0,
    branches: Sequence[str] | None = None,
    first_event: int = 0,
    compression: str = "zstd:1",
    basket_events: int = _DEFAULT_BASKET_EVENTS,
) -> list[pathlib.Path]:
    """Write NanoAOD-like ROOT files resampled from a template file.

    Event ``i`` has index ``first_event + i``; its keys come from
    :func:`event_keys` and its values are a pure function of ``(like, seed,
    index)``, whatever ``files``, ``shuffle``, ``subset`` or ``basket_events``.

    Args:
        like: the template NanoAOD file (tree ``Events``).
        events: number of event indices to generate (before ``subset``).
        output: a directory (files ``part-00000.root``, ...) or, with
            ``files=1``, a file name ending in ``.root``.
        seed: random seed of the values (not of the keys).
        files: number of output files, of near-equal event counts.
        shuffle: write the events in a random order (across all files).
        subset: keep each event with this probability (its keys unchanged).
        branches: glob patterns of template branches to write (keys always;
            a collection field brings its counter ``nX``); default
            :data:`DEFAULT_BRANCHES`; ``["*"]`` writes every writable branch.
        first_event: index of the first event.
        compression: ``"zstd:1"``, ``"lz4:4"``, ``"zlib:6"``, ``"lzma:1"`` or
            ``"none"``.
        basket_events: events generated and written per batch (one basket per
            branch); bounds the memory.

    Returns:
        The written files, in order.

    Raises:
        SpecError: a bad argument value.
        DatasetFileNotFoundError: ``like`` does not exist.
        ColumnNotFoundError: a pattern of ``branches`` matches nothing.
    """
    if isinstance(events, bool) or not isinstance(events, int) or events <= 0:
        msg = f"events must be a positive integer, got {events!r}"
        raise SpecError(msg)
    if isinstance(first_event, bool) or not isinstance(first_event, int) or first_event < 0:
        msg = f"first_event must be an integer >= 0, got {first_event!r}"
        raise SpecError(msg)
    _check_layout(files, subset, basket_events, seed=seed)
    comp = _compression(compression)
    tpl = read_template(like)
    if tpl.num_entries == 0:
        msg = f"template {str(tpl.path)!r} has no events to resample; pass a non-empty file"
        raise SpecError(msg)
    sel = _select(tpl, branches, default=DEFAULT_BRANCHES, strict=True)
    if branches is not None and tpl.skipped:
        skipped = [b for b in tpl.skipped if any(fnmatch.fnmatchcase(b, p) for p in branches)]
        if skipped:
            log.info("synth: skipping branches uproot cannot write: %s", ", ".join(skipped))
    pool = _load_pool(tpl, sel)

    index = np.arange(first_event, first_event + events, dtype=np.int64)
    if subset < 1.0:
        keep = np.empty(events, dtype=bool)
        offset = _stream(seed, "subset")
        for lo in range(0, events, 1 << 22):
            part = index[lo : lo + (1 << 22)]
            keep[lo : lo + len(part)] = _unit(_hash(part.astype(np.uint64), offset)) < subset
        index = index[keep]
    if shuffle:
        index = np.random.default_rng([seed, 0x5EED]).permutation(index)

    paths = _output_paths(output, files)
    sink = _Sink(
        paths,
        _split(len(index), files),
        schema=_generate(pool, sel, tpl, index[:0], seed),
        order=sel.order,
        counter_dtypes={c: tpl.collections[c].counter_dtype for c in sel.collections},
        compression=comp,
        basket_events=basket_events,
    )
    try:
        for lo in range(0, len(index), basket_events):
            sink.write(_generate(pool, sel, tpl, index[lo : lo + basket_events], seed))
        return sink.finish()
    except BaseException:
        sink.abort()
        raise


def _read_batches(
    inputs: Sequence[pathlib.Path], tpl: Template, sel: _Selection, step: int
) -> Iterator[_Batch]:
    """Read selected branches of the inputs in order, ``step`` entries at a time."""
    for path in inputs:
        f, tree = _open_tree(path)
        with f:
            missing = [b for b in _branch_names(tpl, sel) if b not in tree]
            if missing:
                msg = (
                    f"input {str(path)!r} lacks branches {missing[:5]} that "
                    f"{str(inputs[0])!r} has; regroup files of one dataset"
                )
                raise DatasetError(msg)
            for lo in range(0, int(tree.num_entries), step):
                hi = min(lo + step, int(tree.num_entries))
                yield _read_range(tree, tpl, sel, lo, hi, path)


def _branch_names(tpl: Template, sel: _Selection) -> list[str]:
    names = list(sel.flat)
    for cname, fields in sel.collections.items():
        names += [tpl.collections[cname].branch(fd) for fd in fields]
    return names


def _read_range(
    tree: Any, tpl: Template, sel: _Selection, lo: int, hi: int, path: pathlib.Path
) -> _Batch:
    data = tree.arrays(_branch_names(tpl, sel), entry_start=lo, entry_stop=hi, how=dict)
    flat = {b: np.asarray(data[b], dtype=tpl.flat[b]) for b in sel.flat}
    colls = {}
    for cname, fields in sel.collections.items():
        coll = tpl.collections[cname]
        counts: npt.NDArray[np.int64] | None = None
        values = {}
        for fd in fields:
            arr = data[coll.branch(fd)]
            num = np.asarray(ak.num(arr, axis=1), dtype=np.int64)
            if counts is None:
                counts = num
            elif not np.array_equal(num, counts):
                msg = (
                    f"{str(path)!r} entries {lo}-{hi}: {coll.branch(fd)!r} has other lengths "
                    f"than {coll.branch(fields[0])!r}; the file's collection is inconsistent"
                )
                raise CorruptFileError(msg)
            values[fd] = np.asarray(ak.flatten(arr, axis=1), dtype=coll.dtypes[fd])
        assert counts is not None
        colls[cname] = (counts, values)
    return _Batch(flat, colls)


def regroup(
    inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    output: str | os.PathLike[str],
    files: int = 1,
    shuffle: bool = False,
    subset: float = 1.0,
    seed: int = 0,
    branches: Sequence[str] | None = None,
    compression: str = "zstd:1",
    basket_events: int = _DEFAULT_BASKET_EVENTS,
) -> list[pathlib.Path]:
    """Rewrite existing ROOT files into another file grouping, order or subset.

    The events and their values are copied unchanged; only which events are
    kept (``subset``), their order (``shuffle``) and the files they go to
    (``files``, near-equal counts) change. Memory stays bounded: a shuffle
    goes through temporary bucket files next to the output.

    Args:
        inputs: the input ROOT files (tree ``Events``), read in this order.
        output: a directory, or a ``.root`` file name when ``files=1``.
        files: number of output files.
        shuffle: random order across the whole output.
        subset: keep each event with this probability.
        seed: random seed of ``subset`` and ``shuffle``.
        branches: glob patterns of branches to copy (event keys always);
            default every branch uproot can write.
        compression: as in :func:`synthesize`.
        basket_events: events per written batch.

    Returns:
        The written files, in order.

    Raises:
        SpecError: a bad argument value.
        DatasetFileNotFoundError: an input does not exist.
        DatasetError: inputs with different branches.
    """
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    paths_in = [pathlib.Path(p) for p in inputs]
    if not paths_in:
        msg = "regroup needs at least one input file"
        raise SpecError(msg)
    _check_layout(files, subset, basket_events, seed=seed)
    comp = _compression(compression)
    out_resolved = {p.resolve() for p in _planned_outputs(output, files)}
    clash = [str(p) for p in paths_in if p.resolve() in out_resolved]
    if clash:
        msg = f"regroup would overwrite its input {clash[0]!r}; choose another output"
        raise OutputError(msg)
    tpl = read_template(paths_in[0])
    sel = _select(tpl, branches, default=("*",), strict=True)
    sel = _Selection(
        flat=tuple(b for b in KEY_BRANCHES if b in tpl.flat)
        + tuple(b for b in sel.flat if b not in KEY_BRANCHES),
        collections=sel.collections,
        order=sel.order,
    )
    if tpl.skipped:
        log.info("regroup: skipping branches uproot cannot write: %s", ", ".join(tpl.skipped))
    sizes_in = []
    for p in paths_in:
        f, tree = _open_tree(p)
        with f:
            sizes_in.append(int(tree.num_entries))
    total = sum(sizes_in)
    rng = np.random.default_rng([seed, 0xC0FFEE])
    keep = rng.random(total) < subset if subset < 1.0 else np.ones(total, dtype=bool)
    nkept = int(keep.sum())
    position = np.full(total, -1, dtype=np.int64)
    position[keep] = rng.permutation(nkept) if shuffle else np.arange(nkept)

    f, tree = _open_tree(paths_in[0])
    with f:
        schema = _read_range(tree, tpl, sel, 0, 0, paths_in[0])
    paths = _output_paths(output, files)
    sink = _Sink(
        paths,
        _split(nkept, files),
        schema=schema,
        order=sel.order,
        counter_dtypes={c: tpl.collections[c].counter_dtype for c in sel.collections},
        compression=comp,
        basket_events=basket_events,
        extra_baskets=len(paths_in),
    )
    try:
        if not shuffle:
            start = 0
            for batch in _read_batches(paths_in, tpl, sel, basket_events):
                mask = keep[start : start + len(batch)]
                start += len(batch)
                sink.write(batch if mask.all() else batch.take(np.flatnonzero(mask)))
        else:
            _shuffle_through_buckets(
                paths_in, tpl, sel, sink, position, nkept, basket_events, paths[0].parent
            )
        return sink.finish()
    except BaseException:
        sink.abort()
        raise


def _planned_outputs(output: str | os.PathLike[str], files: int) -> list[pathlib.Path]:
    out = pathlib.Path(output)
    if out.suffix == ".root":
        return [out]
    return [out / f"part-{k:05d}.root" for k in range(files)]


def _shuffle_through_buckets(
    inputs: Sequence[pathlib.Path],
    tpl: Template,
    sel: _Selection,
    sink: _Sink,
    position: npt.NDArray[np.int64],
    nkept: int,
    bucket_events: int,
    workdir: pathlib.Path,
) -> None:
    """External shuffle: scatter events into buckets of output positions, then
    write the buckets in order, each sorted by position."""
    nbuckets = max(1, -(-nkept // bucket_events))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".regroup-", dir=workdir))
    try:
        start = 0
        for part, batch in enumerate(_read_batches(inputs, tpl, sel, bucket_events)):
            pos = position[start : start + len(batch)]
            start += len(batch)
            kept = np.flatnonzero(pos >= 0)
            bucket = pos[kept] // bucket_events
            order = np.argsort(bucket, kind="stable")
            kept = kept[order]
            bounds = np.flatnonzero(np.diff(bucket[order])) + 1
            for rows in np.split(kept, bounds):
                if len(rows) == 0:
                    continue
                bid = int(pos[rows[0]] // bucket_events)
                _save(tmp / f"b{bid:07d}-{part:07d}.npz", batch.take(rows), pos[rows])
        for bid in range(nbuckets):
            parts = sorted(tmp.glob(f"b{bid:07d}-*.npz"))
            if not parts:
                continue
            loaded = [_load(p) for p in parts]
            batch = _Batch.concat([b for b, _ in loaded])
            pos = np.concatenate([q for _, q in loaded])
            sink.write(batch.take(np.argsort(pos, kind="stable")))
            for p in parts:
                p.unlink()
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)


def _save(path: pathlib.Path, batch: _Batch, pos: npt.NDArray[np.int64]) -> None:
    arrays: dict[str, npt.NDArray[Any]] = {"__pos__": pos}
    for k, v in batch.flat.items():
        arrays[f"f/{k}"] = v
    for c, (counts, fields) in batch.colls.items():
        arrays[f"n/{c}"] = counts
        for k, v in fields.items():
            arrays[f"c/{c}/{k}"] = v
    with path.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]


def _load(path: pathlib.Path) -> tuple[_Batch, npt.NDArray[np.int64]]:
    with np.load(path) as z:
        flat = {}
        colls: dict[str, tuple[npt.NDArray[np.int64], dict[str, npt.NDArray[Any]]]] = {}
        for key in z.files:
            kind, _, rest = key.partition("/")
            if kind == "f":
                flat[rest] = z[key]
            elif kind == "n":
                colls.setdefault(rest, (z[key], {}))
        for key in z.files:
            kind, _, rest = key.partition("/")
            if kind == "c":
                c, _, k = rest.partition("/")
                colls[c][1][k] = z[key]
        return _Batch(flat, colls), z["__pos__"]
