"""Loops over event keys and columns: packing, matching, gathering, selecting.

Every kernel a delivery needs has two implementations that give the same
arrays: vectorised numpy (a few passes, each over a block of rows small
enough to stay in the CPU cache) and a loop compiled with numba (one pass,
with prefetching for the random reads). The numpy one runs unless numba is
already loaded in the process (:func:`numba_loaded`): loading numba costs a
new process about 0.75 s before the first kernel runs, more than the compiled
loops save on a request, so a delivery (plain, or with a keyed or aligned
friend join) never loads it. The in-memory join of two tables
(:func:`pair_runs`, :func:`merge_runs`, for :func:`columnhub.join.join_arrays`)
has only a compiled implementation and loads numba on its first call; from
then on the process takes the compiled loops everywhere.

Every kernel is compiled with ``nogil=True``, and numpy releases the GIL in
the operations used here, so the large ones are split into row ranges and run
on :func:`kernel_pool` threads in parallel (plain Python threads: safe to call
from several chunk tasks at once, unlike numba's own ``parallel=True``
threading layers). Kernels are compiled on first use and cached on disk
(``cache=True``).

numba itself (and llvmlite) is imported on the first call of any compiled
kernel, not when this module is imported: ``numba`` and ``intrinsic`` below
start as stand-ins that record each kernel, and the first call imports numba,
makes every recorded kernel a real dispatcher in this module's namespace
(where compiled code looks other kernels up) and runs. A process that never
runs a compiled kernel (``columnhub --help``, a result served from the cache,
a delivery) never pays for numba.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = [
    "Sorted",
    "argsort_runs",
    "compose_keys",
    "first_difference",
    "gather_flat",
    "gather_lists",
    "kernel_pool",
    "kernel_pool_size",
    "merge_runs",
    "merge_sorted",
    "merge_unique",
    "minmax",
    "numba_loaded",
    "or_shifted",
    "pair_runs",
    "select_lists",
    "sort_runs",
    "split_composites",
]

#: below this many rows a kernel runs in the calling thread
PARALLEL_MIN_ROWS = 1 << 18
#: how many rows ahead the random-access kernels prefetch
PREFETCH_DISTANCE = 16
#: the same for copying whole lists, whose reads take longer (measured: 32 is
#: 2x faster than 16 for a shuffled 80 MB jagged column, no gain beyond)
LIST_PREFETCH_DISTANCE = 32


class _Deferred:
    """A kernel recorded by a stand-in decorator; the first call makes every kernel real."""

    def __init__(self, name: str, make: Callable[[Any], Any]) -> None:
        self.name = name
        self.make = make  # the real numba module -> the dispatcher (or intrinsic)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _load_numba()
        return globals()[self.name](*args, **kwargs)


_deferred: list[_Deferred] = []
_numba_lock = threading.Lock()
# what the compiled code and the intrinsic's code generation use, set by _load_numba
llvm: Any = None
ir: Any = None
literal_unroll: Any = None
types: Any = None
cgutils: Any = None
_PREFETCH = ""


def _defer(make: Callable[[Any, Callable[..., Any]], Any]) -> Callable[[Callable[..., Any]], Any]:
    def record(func: Callable[..., Any]) -> _Deferred:
        kernel = _Deferred(func.__name__, lambda real: make(real, func))
        _deferred.append(kernel)
        return kernel

    return record


class _NumbaStandIn:
    """``numba`` until the first kernel runs: ``@numba.njit(...)`` records the kernel."""

    def njit(self, *args: Any, **options: Any) -> Any:
        if len(args) == 1 and callable(args[0]) and not options:  # bare @numba.njit
            return _defer(lambda real, f: real.njit(f))(args[0])
        return _defer(lambda real, f: real.njit(*args, **options)(f))


def numba_loaded() -> bool:
    """True once this process has loaded numba (the first kernel call does).

    Loading it costs about 0.6 s per process (and 0.4 s more at exit), so a
    path with a cheap numpy alternative takes the kernel only when it is here.
    """
    return not isinstance(globals()["numba"], _NumbaStandIn)


def _load_numba() -> None:
    """Import numba and turn every recorded kernel into a real one (once, thread-safe)."""
    g = globals()
    with _numba_lock:
        if not isinstance(g["numba"], _NumbaStandIn):
            return
        import numba as real
        from llvmlite import binding as llvm
        from llvmlite import ir
        from numba import literal_unroll, types
        from numba.core import cgutils

        g.update(
            llvm=llvm, ir=ir, literal_unroll=literal_unroll, types=types, cgutils=cgutils,
            _PREFETCH="llvm.prefetch.p0" if llvm.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8",
        )
        for kernel in _deferred:  # compiled (or loaded from numba's cache) when first called
            if g.get(kernel.name) is kernel:
                g[kernel.name] = kernel.make(real)
        g["numba"] = real


numba: Any = _NumbaStandIn()
intrinsic: Any = _defer(lambda real, f: real.extending.intrinsic(f))


@intrinsic
def _prefetch(typingctx, array, index):  # pragma: no cover - compiled
    """A hint to load ``array[index]`` into the cache (LLVM's ``prefetch``; never faults)."""
    sig = types.void(array, index)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i8p = builder.bitcast(ptr, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, _PREFETCH)
        # read, keep in all cache levels, data cache
        builder.call(fn, [i8p, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


_pool: ThreadPoolExecutor | None = None
_pool_size = 1
_pool_lock = threading.Lock()


def _forget_after_fork() -> None:
    # a forked child inherits the pool object but not its threads
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def kernel_pool() -> ThreadPoolExecutor:
    """The process's pool for the kernels (:func:`columnhub._concurrency.threads` threads)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None:
            from columnhub._concurrency import threads

            _pool_size = threads()
            _pool = ThreadPoolExecutor(_pool_size, thread_name_prefix="columnhub-kernel")
        return _pool


def kernel_pool_size() -> int:
    """How many threads :func:`kernel_pool` has."""
    kernel_pool()
    return _pool_size


def _ranges(n: int) -> list[tuple[int, int]]:
    if n < PARALLEL_MIN_ROWS:
        parts = 1
    else:
        kernel_pool()
        parts = _pool_size
    bounds = np.linspace(0, n, parts + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


def _run_all(
    fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], *, parallel: bool = True
) -> list[Any]:
    """``fn(*job)`` for every job, in order; on the kernel pool when there are several."""
    if len(jobs) <= 1 or not parallel:
        return [fn(*job) for job in jobs]
    futures = [kernel_pool().submit(fn, *job) for job in jobs]
    return [f.result() for f in futures]


def _split(fn: Callable[[int, int], Any], n: int) -> list[Any]:
    """``fn(start, stop)`` over row ranges covering ``0..n``, in parallel when large."""
    return _run_all(fn, _ranges(n))


#: rows per block of the numpy kernels: their temporaries stay in the CPU cache
BLOCK_ROWS = 1 << 16


def _blocks(start: int, stop: int) -> list[tuple[int, int]]:
    return [(a, min(a + BLOCK_ROWS, stop)) for a in range(start, stop, BLOCK_ROWS)]


def minmax(values: np.ndarray) -> tuple[int, int]:
    """``(min, max)`` of a non-empty integer array (numpy's vectorised reductions).

    Two SIMD passes beat one scalar compiled pass here.
    """
    return int(values.min()), int(values.max())


@numba.njit(nogil=True, cache=True)
def _or_shifted(words, column, offset, shift, start, stop):  # pragma: no cover - compiled
    for i in range(start, stop):
        words[i] |= (np.uint64(column[i]) - offset) << shift


def _or_shifted_np(
    words: np.ndarray, column: np.ndarray, offset: np.uint64, shift: np.uint64, start: int, stop: int
) -> None:
    for a, b in _blocks(start, stop):
        val = np.subtract(column[a:b], offset, dtype=np.uint64)
        np.left_shift(val, shift, out=val)
        np.bitwise_or(words[a:b], val, out=words[a:b])


def or_shifted(words: np.ndarray, column: np.ndarray, offset: int, shift: int) -> None:
    """``words |= (column - offset) << shift`` in place (``uint64``, wrapping like C)."""
    off, sh = np.uint64(offset), np.uint64(shift)
    kernel = _or_shifted if numba_loaded() else _or_shifted_np
    _split(lambda a, b: kernel(words, column, off, sh, a, b), len(words))


@numba.njit(nogil=True, cache=True)
def _compose_keys(columns, rowbits, out, start, stop):  # pragma: no cover - compiled
    rowmask = (np.uint64(1) << rowbits) - np.uint64(1)  # 0: no row numbers
    ascending = True
    prev = np.uint64(0)
    for i in range(start, stop):
        word = np.uint64(0)
        for column in literal_unroll(columns):
            values, offset, shift = column
            word |= (np.uint64(values[i]) - offset) << shift
        word = (word << rowbits) | (np.uint64(i) & rowmask)
        out[i] = word
        if i > start and word < prev:
            ascending = False
        prev = word
    return ascending


def _compose_keys_np(
    columns: tuple[tuple[np.ndarray, np.uint64, np.uint64], ...],
    rowbits: np.uint64,
    out: np.ndarray,
    start: int,
    stop: int,
) -> bool:
    rowmask = (np.uint64(1) << rowbits) - np.uint64(1)
    ascending = True
    spare = np.empty(min(BLOCK_ROWS, stop - start), dtype=np.uint64)
    for a, b in _blocks(start, stop):
        word = out[a:b]
        for i, (values, offset, shift) in enumerate(columns):
            val = word if i == 0 else spare[: b - a]
            if offset:
                np.subtract(values[a:b], offset, out=val, dtype=np.uint64)
            else:
                np.copyto(val, values[a:b], casting="unsafe")  # unsigned (or checked) integers
            if shift + rowbits:
                np.left_shift(val, shift + rowbits, out=val)
            if i:
                np.bitwise_or(word, val, out=word)
        if rowbits:
            rows = np.arange(a, b, dtype=np.uint64)
            if b - 1 > rowmask:
                np.bitwise_and(rows, rowmask, out=rows)
            np.bitwise_or(word, rows, out=word)
        if ascending:
            lo = a - 1 if a > start else a  # the block's first row against the one before
            ascending = bool(np.all(out[lo + 1 : b] >= out[lo : b - 1]))
    return ascending


def compose_keys(columns: list[tuple[np.ndarray, int, int]], rowbits: int, out: np.ndarray) -> bool:
    """``out[i] = (key of row i) << rowbits | i`` over the key columns.

    With ``rowbits`` 0, ``out`` holds the packed keys alone. ``columns`` are
    ``(values, offset, shift)``: the key is the OR of every ``(values -
    offset) << shift``. ``values`` keep their own integer type (no ``uint64``
    copy is made); the caller guarantees that everything fits. Returns
    whether ``out`` came out sorted (a primary in key order then needs no
    sort).
    """
    n = len(out)
    if not columns:  # every key column is constant: the row number alone
        out[:] = np.arange(n, dtype=np.uint64) if rowbits else 0
        return True
    packed = tuple((values, np.uint64(off), np.uint64(shift)) for values, off, shift in columns)
    rb = np.uint64(rowbits)
    ranges = _ranges(n)
    kernel = _compose_keys if numba_loaded() else _compose_keys_np
    parts = _run_all(lambda a, b: kernel(packed, rb, out, a, b), ranges)
    return all(parts) and all(out[a - 1] <= out[a] for a, _ in ranges[1:])


@numba.njit(nogil=True, cache=True)
def _first_difference(pairs, start, stop):  # pragma: no cover - compiled
    for i in range(start, stop):
        for pair in literal_unroll(pairs):
            a, b = pair
            if np.uint64(a[i]) != np.uint64(b[i]):
                return i
    return -1


def _first_difference_np(
    pairs: tuple[tuple[np.ndarray, np.ndarray], ...], start: int, stop: int
) -> int:
    for a, b in _blocks(start, stop):
        differ = np.zeros(b - a, dtype=np.bool_)
        for x, y in pairs:
            # as uint64, as the compiled loop compares (int64 against uint64 in
            # numpy would go through float64 and lose precision above 2**53)
            differ |= x[a:b].astype(np.uint64, copy=False) != y[a:b].astype(np.uint64, copy=False)
        if differ.any():
            return a + int(np.argmax(differ))
    return -1


def first_difference(pairs: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """The first row where any pair of integer columns differs, or ``-1``.

    Every pair at once, columns in their own integer types (non-negative
    values: they are compared as ``uint64``), block by block, stopping at the
    first block with a difference.
    """
    if not pairs:
        return -1
    packed = tuple((np.asarray(a), np.asarray(b)) for a, b in pairs)
    kernel = _first_difference if numba_loaded() else _first_difference_np
    found = _split(lambda a, b: kernel(packed, a, b), len(packed[0][0]))
    return next((int(i) for i in found if i >= 0), -1)


def _split_composites(
    comp: np.ndarray, rowbits: np.uint64, order: np.ndarray, start: int, stop: int
) -> None:
    rowmask = (np.uint64(1) << rowbits) - np.uint64(1)
    for a, b in _blocks(start, stop):
        np.bitwise_and(comp[a:b], rowmask, out=order[a:b].view(np.uint64))
        np.right_shift(comp[a:b], rowbits, out=comp[a:b])


def split_composites(comp: np.ndarray, rowbits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, keys)`` of composites ``key << rowbits | row`` (numpy, two SIMD passes).

    The keys replace the composites in ``comp`` (returned as ``keys``): a
    20M-row index then needs one array fewer at its peak.
    """
    n = len(comp)
    order = np.empty(n, dtype=np.int64)
    rb = np.uint64(rowbits)
    _split(lambda a, b: _split_composites(comp, rb, order, a, b), n)
    return order, comp


def sort_runs(*arrays: tuple[np.ndarray, int]) -> list[np.ndarray]:
    """Sort arrays in place, each ``(array, runs)`` in up to ``runs`` pieces, all at once.

    Returns the boundaries of each array's sorted runs (``int64``, first 0,
    last its length). The pieces are sorted on the kernel pool, the largest
    first: cutting a side in pieces lets every core sort, and
    :func:`pair_runs` merges the runs as it walks.
    """
    bounds = []
    jobs = []
    for a, runs in arrays:
        k = max(1, min(runs, len(a) // max(1, PARALLEL_MIN_ROWS // 2)))
        b = np.linspace(0, len(a), k + 1).astype(np.int64)
        bounds.append(b)
        jobs.extend(a[x:y] for x, y in itertools.pairwise(b) if y > x)
    jobs.sort(key=len, reverse=True)
    big = sum(len(j) for j in jobs) >= PARALLEL_MIN_ROWS
    _run_all(np.ndarray.sort, [(j,) for j in jobs], parallel=big)
    return bounds


@numba.njit(nogil=True, cache=True)
def _first_at_least(values, start, stop, target):  # pragma: no cover - compiled
    a, b = start, stop
    while a < b:
        mid = (a + b) >> 1
        if values[mid] < target:
            a = mid + 1
        else:
            b = mid
    return a


@numba.njit(nogil=True, cache=True)
def _pair_runs(
    fkeys, frows, heads, stops, pkeys, prows, pstart, pstop, keyshift, rowmask, friend
):  # pragma: no cover - compiled
    nruns = heads.shape[0]
    j = pstart
    pprev = np.uint64(0)
    fprev = np.uint64(0)
    first = True
    while True:
        # the smallest head of the friend runs: the friend in key order
        best = -1
        bkey = np.uint64(0)
        for r in range(nruns):
            if heads[r] < stops[r]:
                k = fkeys[heads[r]] >> keyshift
                if best < 0 or k < bkey:
                    best = r
                    bkey = k
        if best < 0:
            break
        if not first and bkey == fprev:  # a repeated friend key
            return False
        first = False
        fprev = bkey
        frow = np.int64(frows[heads[best]] & rowmask)
        heads[best] += 1
        while j < pstop:
            key = pkeys[j] >> keyshift
            if key > bkey:
                break
            if j > pstart and key == pprev:  # a repeated primary key
                return False
            pprev = key
            # every primary row is passed once: its partner, or -1
            friend[np.int64(prows[j] & rowmask)] = frow if key == bkey else -1
            j += 1
    while j < pstop:
        key = pkeys[j] >> keyshift
        if j > pstart and key == pprev:
            return False
        pprev = key
        friend[np.int64(prows[j] & rowmask)] = -1
        j += 1
    return True


#: sorted keys and their rows: ``(keys, rows, rowbits)``. With ``rowbits`` > 0
#: ``keys`` and ``rows`` are one array of composites ``key << rowbits | row``;
#: with 0 they are separate ``uint64`` arrays.
Sorted = tuple[np.ndarray, np.ndarray, int]
#: words sorted in pieces: ``(sorted_words, rows, bounds)``
Sorted_runs = tuple[np.ndarray, np.ndarray, np.ndarray]


def pair_runs(friend: Sorted, friend_bounds: np.ndarray, primary: Sorted) -> np.ndarray | None:
    """Friend row per primary row; the friend in sorted runs, the primary sorted.

    The friend's runs are merged on the fly while walking the primary; large
    inputs are split into key ranges, one per thread (a key never straddles
    two ranges). Returns ``None`` when a key repeats on either side (the
    caller takes the general path).
    """
    fkeys, frows, rowbits = friend
    pkeys, prows, prowbits = primary
    if rowbits != prowbits:
        msg = "pair_runs: both sides need the same row bits"
        raise ValueError(msg)
    shift = np.uint64(rowbits)
    rowmask = (np.uint64(1) << shift) - np.uint64(1) if rowbits else np.uint64(2**64 - 1)
    out = np.empty(len(pkeys), dtype=np.int64)  # the walk writes every row
    starts = np.asarray(friend_bounds[:-1], dtype=np.int64)
    stops = np.asarray(friend_bounds[1:], dtype=np.int64)
    np_ = len(pkeys)
    pieces = _ranges(max(np_, len(fkeys)))

    def first_at_least(values: np.ndarray, a: int, b: int, bound: int | None) -> int:
        return b if bound is None else int(_first_at_least(values, a, b, np.uint64(bound)))

    # cut at keys (a key never straddles two pieces): the key at each piece's start
    cuts: list[int | None] = [0]
    cuts += [int(pkeys[a] >> shift) << rowbits for a, _ in pieces[1:] if a < np_]
    cuts.append(None)
    jobs = []
    for lo, hi in itertools.pairwise(cuts):
        runs = list(zip(starts, stops, strict=True))
        h = np.array([first_at_least(fkeys, a, b, lo) for a, b in runs], dtype=np.int64)
        e = np.array([first_at_least(fkeys, a, b, hi) for a, b in runs], dtype=np.int64)
        pa = first_at_least(pkeys, 0, np_, lo)
        jobs.append((h, e, pa, first_at_least(pkeys, pa, np_, hi)))

    def run(h: np.ndarray, e: np.ndarray, a: int, b: int) -> bool:
        return bool(_pair_runs(fkeys, frows, h, e, pkeys, prows, a, b, shift, rowmask, out))

    return out if all(_run_all(run, jobs)) else None


def argsort_runs(*arrays: tuple[np.ndarray, int]) -> list[Sorted_runs]:
    """Arg-sort words, each ``(words, runs)`` in up to ``runs`` pieces, all at once.

    For keys too wide to carry their row number in the same ``uint64``.
    Returns per array ``(sorted_words, rows, bounds)``: ``rows`` (``uint64``)
    are the original row of each sorted word, ``bounds`` the pieces' limits.
    The pieces are arg-sorted by numpy's vectorised ``argsort`` (which
    releases the GIL) on the kernel pool, the largest first.
    """
    results: list[Sorted_runs] = []
    jobs: list[tuple[np.ndarray, np.ndarray, np.ndarray, int, int]] = []
    for words, runs in arrays:
        n = len(words)
        k = max(1, min(runs, n // max(1, PARALLEL_MIN_ROWS // 2)))
        bounds = np.linspace(0, n, k + 1).astype(np.int64)
        keys = np.empty(n, dtype=np.uint64)
        rows = np.empty(n, dtype=np.uint64)
        results.append((keys, rows, bounds))
        jobs += [
            (words, keys, rows, int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a
        ]

    def one(words: np.ndarray, keys: np.ndarray, rows: np.ndarray, a: int, b: int) -> None:
        order = np.argsort(words[a:b])
        np.take(words[a:b], order, out=keys[a:b])
        np.add(order.view(np.uint64), np.uint64(a), out=rows[a:b])

    jobs.sort(key=lambda job: job[4] - job[3], reverse=True)
    big = sum(job[4] - job[3] for job in jobs) >= PARALLEL_MIN_ROWS
    _run_all(one, jobs, parallel=big)
    return results


@numba.njit(nogil=True, cache=True)
def _merge_runs(keys, rows, heads, stops, out_keys, out_rows, pos):  # pragma: no cover
    nruns = heads.shape[0]
    while True:
        best = -1
        bkey = np.uint64(0)
        for r in range(nruns):  # ties: the earlier run first
            if heads[r] < stops[r]:
                k = keys[heads[r]]
                if best < 0 or k < bkey:
                    best = r
                    bkey = k
        if best < 0:
            return
        out_keys[pos] = bkey
        out_rows[pos] = rows[heads[best]]
        heads[best] += 1
        pos += 1


def merge_runs(
    keys: np.ndarray, rows: np.ndarray, bounds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Merge sorted runs ``keys[bounds[i]:bounds[i + 1]]`` (with their ``rows``) into one.

    Cut into key ranges, one per thread: each range of the output is merged
    from the same key range of every run. Equal keys come run by run.
    """
    n = len(keys)
    out_keys = np.empty(n, dtype=keys.dtype)
    out_rows = np.empty(n, dtype=rows.dtype)
    starts = np.asarray(bounds[:-1], dtype=np.int64)
    stops = np.asarray(bounds[1:], dtype=np.int64)
    pieces = _ranges(n)
    a0, b0 = int(starts[0]), int(stops[0])
    cuts: list[np.uint64 | None] = [None]
    for a, _ in pieces[1:]:  # cut keys taken evenly from the first run
        cuts.append(keys[a0 + (b0 - a0) * a // n] if b0 > a0 else None)
    cuts = [cuts[0], *[c for c in cuts[1:] if c is not None]]
    jobs = []
    for i in range(len(cuts)):
        lo, hi = cuts[i], cuts[i + 1] if i + 1 < len(cuts) else None
        h = np.array(
            [
                a if lo is None else _first_at_least(keys, a, b, lo)
                for a, b in zip(starts, stops, strict=True)
            ],
            dtype=np.int64,
        )
        e = np.array(
            [
                b if hi is None else _first_at_least(keys, a, b, hi)
                for a, b in zip(starts, stops, strict=True)
            ],
            dtype=np.int64,
        )
        jobs.append((h, e, int((h - starts).sum())))
    _run_all(lambda h, e, pos: _merge_runs(keys, rows, h, e, out_keys, out_rows, pos), jobs)
    return out_keys, out_rows


@numba.njit(nogil=True, cache=True)
def _take(values, rows, out, valid, start, stop, ahead):  # pragma: no cover - compiled
    missing = 0
    for i in range(start, stop):
        if i + ahead < stop and rows[i + ahead] >= 0:
            _prefetch(values, rows[i + ahead])
        r = rows[i]
        if r >= 0:
            out[i] = values[r]
            valid[i] = True
        else:
            out[i] = 0
            valid[i] = False
            missing += 1
    return missing


def _valid_rows(rows: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, int]:
    """``valid[:] = rows >= 0``; the rows with ``-1`` replaced by 0, and how many there were."""
    np.greater_equal(rows, 0, out=valid)
    missing = len(rows) - int(np.count_nonzero(valid))
    return (np.where(valid, rows, 0) if missing else rows), missing


def _take_np(
    values: np.ndarray, rows: np.ndarray, out: np.ndarray, valid: np.ndarray, start: int, stop: int
) -> int:
    missing = 0
    for a, b in _blocks(start, stop):
        safe, absent = _valid_rows(rows[a:b], valid[a:b])
        if absent == b - a:  # no row at all (``values`` may be empty)
            out[a:b] = 0
        else:
            np.take(values, safe, out=out[a:b])
            if absent:
                out[a:b][~valid[a:b]] = 0
        missing += absent
    return missing


def gather_flat(values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``(values[rows], valid, n_missing)``; rows ``-1`` give ``valid=False`` (value 0)."""
    n = len(rows)
    out = np.empty(n, dtype=values.dtype)
    valid = np.empty(n, dtype=np.bool_)
    if numba_loaded():
        missing = _split(lambda a, b: _take(values, rows, out, valid, a, b, PREFETCH_DISTANCE), n)
    else:
        missing = _split(lambda a, b: _take_np(values, rows, out, valid, a, b), n)
    return out, valid, int(sum(missing))


@numba.njit(nogil=True, cache=True)
def _list_counts(
    starts, stops, rows, counts, sources, valid, start, stop, ahead
):  # pragma: no cover
    missing = 0
    for i in range(start, stop):
        if i + ahead < stop and rows[i + ahead] >= 0:
            _prefetch(starts, rows[i + ahead])
        r = rows[i]
        if r >= 0:
            s = starts[r]
            sources[i] = s
            counts[i + 1] = stops[r] - s
            valid[i] = True
        else:
            sources[i] = 0
            counts[i + 1] = 0
            valid[i] = False
            missing += 1
    return missing


@numba.njit(nogil=True, cache=True)
def _list_copy(sources, content, offsets, out, start, stop, ahead):  # pragma: no cover - compiled
    for i in range(start, stop):
        k = i + ahead
        if k < stop:
            size = offsets[k + 1] - offsets[k]
            if size > 0:  # both ends: a list often straddles two cache lines
                _prefetch(content, sources[k])
                _prefetch(content, sources[k] + size - 1)
        src = sources[i]
        dst = offsets[i]
        for j in range(offsets[i + 1] - dst):
            out[dst + j] = content[src + j]


def gather_lists(
    starts: np.ndarray, stops: np.ndarray, content: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Lists ``rows`` of a list column given by ``starts``/``stops`` into ``content``.

    Returns ``(offsets, new_content, valid, n_missing)``: a packed list column
    (rows ``-1`` become empty lists with ``valid=False``). The first pass
    notes where each list starts, so the copy pass touches each source row's
    ``starts`` once and reads sequentially otherwise (the random reads are
    what a shuffled friend costs).
    """
    n = len(rows)
    offsets = np.empty(n + 1, dtype=np.int64)
    offsets[0] = 0
    sources = np.empty(n, dtype=np.int64)
    valid = np.empty(n, dtype=np.bool_)
    compiled = numba_loaded()
    if compiled:
        missing = _split(
            lambda a, b: _list_counts(
                starts, stops, rows, offsets, sources, valid, a, b, PREFETCH_DISTANCE
            ),
            n,
        )
    else:
        missing = _split(
            lambda a, b: _list_counts_np(starts, stops, rows, offsets, sources, valid, a, b), n
        )
    np.cumsum(offsets, out=offsets)
    out = np.empty(int(offsets[-1]), dtype=content.dtype)
    if compiled:
        _split(
            lambda a, b: _list_copy(sources, content, offsets, out, a, b, LIST_PREFETCH_DISTANCE),
            n,
        )
    else:
        _split(lambda a, b: _list_copy_np(sources, content, offsets, out, a, b), n)
    return offsets, out, valid, int(sum(missing))


def _list_counts_np(
    starts: np.ndarray,
    stops: np.ndarray,
    rows: np.ndarray,
    counts: np.ndarray,
    sources: np.ndarray,
    valid: np.ndarray,
    start: int,
    stop: int,
) -> int:
    missing = 0
    for a, b in _blocks(start, stop):
        safe, absent = _valid_rows(rows[a:b], valid[a:b])
        if absent == b - a:  # no row at all (``starts`` may be empty)
            sources[a:b] = 0
            counts[a + 1 : b + 1] = 0
        else:
            sources[a:b] = starts.take(safe)  # starts and stops of any integer type
            ends = stops.take(safe).astype(np.int64, copy=False)
            np.subtract(ends, sources[a:b], out=counts[a + 1 : b + 1])
            if absent:
                invalid = ~valid[a:b]
                sources[a:b][invalid] = 0
                counts[a + 1 : b + 1][invalid] = 0
        missing += absent
    return missing


def _list_copy_np(
    sources: np.ndarray, content: np.ndarray, offsets: np.ndarray, out: np.ndarray, start: int, stop: int
) -> None:
    for a, b in _blocks(start, stop):
        lo, hi = int(offsets[a]), int(offsets[b])
        if hi == lo:
            continue
        # the source position of every item: its list's start, then one by one
        where = np.repeat(sources[a:b] - offsets[a:b], np.diff(offsets[a : b + 1]))
        where += np.arange(lo, hi, dtype=np.int64)
        np.take(content, where, out=out[lo:hi])


@numba.njit(nogil=True, cache=True)
def _kept_sizes(offsets, mask):  # pragma: no cover - compiled
    rows = 0
    items = 0
    for i in range(mask.shape[0]):
        if mask[i]:
            rows += 1
            items += offsets[i + 1] - offsets[i]
    return rows, items


@numba.njit(nogil=True, cache=True)
def _copy_kept_runs(offsets, content, mask, new_offsets, out):  # pragma: no cover - compiled
    n = mask.shape[0]
    new_offsets[0] = 0
    k = 0
    dst = 0
    i = 0
    while i < n:
        if not mask[i]:
            i += 1
            continue
        j = i
        while j < n and mask[j]:  # a run of kept rows: contiguous in content
            k += 1
            new_offsets[k] = dst + offsets[j + 1] - offsets[i]
            j += 1
        src = offsets[i]
        size = offsets[j] - src
        out[dst : dst + size] = content[src : src + size]
        dst += size
        i = j


def select_lists(
    offsets: np.ndarray, content: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The lists of a list column (``offsets`` into ``content``) where ``mask`` is true.

    Returns packed ``(new_offsets, new_content)``. One pass sizes the result,
    one copies each run of consecutive kept rows as a block (callers select
    several columns at once, one per thread).
    """
    rows, items = _kept_sizes(offsets, mask)
    new_offsets = np.empty(rows + 1, dtype=np.int64)
    out = np.empty(items, dtype=content.dtype)
    _copy_kept_runs(offsets, content, mask, new_offsets, out)
    return new_offsets, out


@numba.njit(nogil=True, cache=True)
def _merge_sorted(keys, queries, lo, found, start, stop):  # pragma: no cover - compiled
    m = keys.shape[0]
    # the first position of this range by binary search, then one linear walk
    j = _first_at_least(keys, 0, m, queries[start])
    for i in range(start, stop):
        v = queries[i]
        while j < m and keys[j] < v:
            j += 1
        lo[i] = j
        found[i] = j < m and keys[j] == v


@numba.njit(nogil=True, cache=True)
def _merge_unique(keys, rows, queries, query_rows, friend, start, stop):  # pragma: no cover
    m = keys.shape[0]
    j = _first_at_least(keys, 0, m, queries[start])
    for i in range(start, stop):
        v = queries[i]
        while j < m and keys[j] < v:
            j += 1
        friend[query_rows[i]] = rows[j] if j < m and keys[j] == v else -1


def _merge_sorted_np(
    keys: np.ndarray, queries: np.ndarray, lo: np.ndarray, found: np.ndarray, start: int, stop: int
) -> None:
    m = len(keys)
    for a, b in _blocks(start, stop):
        q = queries[a:b]
        here = np.searchsorted(keys, q, side="left")
        lo[a:b] = here
        if m:
            np.equal(keys.take(np.minimum(here, m - 1)), q, out=found[a:b])
            found[a:b] &= here < m
        else:
            found[a:b] = False


def _merge_unique_np(
    keys: np.ndarray,
    rows: np.ndarray,
    queries: np.ndarray,
    query_rows: np.ndarray,
    friend: np.ndarray,
    start: int,
    stop: int,
) -> None:
    m = len(keys)
    for a, b in _blocks(start, stop):
        q = queries[a:b]
        if not m:
            friend[query_rows[a:b]] = -1
            continue
        at = np.minimum(np.searchsorted(keys, q, side="left"), m - 1)
        partner = rows.take(at).astype(np.int64, copy=False)
        np.putmask(partner, keys.take(at) != q, -1)
        friend[query_rows[a:b]] = partner


def merge_unique(
    keys: np.ndarray, rows: np.ndarray, queries: np.ndarray, query_rows: np.ndarray
) -> np.ndarray:
    """Per query row, the row of its key among unique sorted ``keys`` (``-1``: absent).

    ``friend[query_rows[i]] = rows[k]`` where ``keys[k] == queries[i]``; both
    ``keys`` and ``queries`` sorted ``uint64``. Compiled: one linear walk per
    row range (what :func:`merge_sorted` does), writing the answer in place;
    numpy: a binary search per query, block by block.
    """
    n = len(queries)
    friend = np.empty(n, dtype=np.int64)
    kernel = _merge_unique if numba_loaded() else _merge_unique_np
    _split(lambda a, b: kernel(keys, rows, queries, query_rows, friend, a, b), n)
    return friend


def merge_sorted(keys: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.searchsorted(keys, queries)`` for sorted ``queries``, with ``keys[lo] == q``.

    Both arrays sorted ``uint64``. Compiled: one linear walk per row range
    instead of a binary search per query (which misses the cache at every
    step); numpy: ``searchsorted`` block by block.
    """
    n = len(queries)
    lo = np.empty(n, dtype=np.int64)
    found = np.empty(n, dtype=np.bool_)
    kernel = _merge_sorted if numba_loaded() else _merge_sorted_np
    _split(lambda a, b: kernel(keys, queries, lo, found, a, b), n)
    return lo, found
