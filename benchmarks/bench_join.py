"""Benchmark: in-memory left join on CMS event keys, columnhub vs pandas, polars, DuckDB.

A primary of N events and a shuffled friend (same events) with one flat float
column and one jagged float column (~5 items per event, Poisson); keys
(run, luminosityBlock, event): one run per 50M events, one lumi block per 1000
events; event numbers increase with the lumi block (each lumi block keeps 1000
of ~20000 event numbers, as a skim of a primary dataset does) unless
``--wide-events`` draws them uniformly from [0, 2**63) (keys then need more
than 64 bits with the row number and columnhub takes its general path).

``how=left, validate=one_to_one``. Outputs are checked to agree on the flat
column before timing; best of ``--repeat``.

    python benchmarks/bench_join.py --events 2000000
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import awkward as ak
import numpy as np
import pyarrow as pa

from columnhub.join import KeyIndex, join_arrays

__all__ = ["main"]

ON = ["run", "luminosityBlock", "event"]


def make_data(n: int, *, seed: int = 42, wide_events: bool = False) -> dict[str, Any]:
    """Primary keys, and a shuffled friend with a flat and a jagged column."""
    rng = np.random.default_rng(seed)
    i = np.arange(n, dtype=np.int64)
    run = (316000 + i // 50_000_000).astype(np.uint32)
    lumi = (1 + (i % 50_000_000) // 1000).astype(np.uint32)
    if wide_events:
        event = np.unique(rng.integers(0, 2**63, size=n + n // 100, dtype=np.uint64))
        event = rng.permutation(event)[:n]
    else:
        # within each lumi block, 1000 sorted distinct offsets out of 20000
        offs = np.sort(rng.random((n // 1000 + 1, 20000)).argpartition(1000, axis=1)[:, :1000], 1)
        event = lumi.astype(np.uint64) * 20000 + offs.reshape(-1)[:n].astype(np.uint64)
    perm = rng.permutation(n)
    x = rng.normal(size=n)
    counts = rng.poisson(5, size=n)
    jets = ak.unflatten(rng.normal(size=int(counts.sum())).astype(np.float64), counts)
    primary = {"run": run, "luminosityBlock": lumi, "event": event}
    friend = {
        "run": run[perm],
        "luminosityBlock": lumi[perm],
        "event": event[perm],
        "x": x[perm],
        "jets": jets[perm],
    }
    # materialise the shuffled jagged column (a plain ListOffsetArray, as read from a file)
    friend["jets"] = ak.to_packed(friend["jets"])
    return {"primary": primary, "friend": friend, "x_expected": x, "jets_expected": jets}


def best_of(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--wide-events", action="store_true")
    args = parser.parse_args(argv)
    n = args.events

    import duckdb
    import pandas as pd
    import polars as pl

    data = make_data(n, wide_events=args.wide_events)
    primary, friend, x_expected = data["primary"], data["friend"], data["x_expected"]

    # --- inputs in each engine's native in-memory form (built outside the timing)
    pdf_p = pd.DataFrame(primary)
    pdf_f = pd.DataFrame({k: friend[k] for k in [*ON, "x"]})
    arrow_f = pa.table(
        {
            **{k: friend[k] for k in [*ON, "x"]},
            "jets": ak.to_arrow(friend["jets"], extensionarray=False),
        }
    )
    arrow_p = pa.table(primary)
    pl_p = pl.from_arrow(arrow_p)
    pl_f = pl.from_arrow(arrow_f)
    con = duckdb.connect()
    con.register("p", arrow_p)
    con.register("f", arrow_f)
    fkeys = {k: friend[k] for k in ON}

    def run_columnhub() -> dict[str, ak.Array]:
        return join_arrays(primary, friend, on=ON, how="left", validate="one_to_one")

    index = KeyIndex.build(fkeys)

    def run_columnhub_prebuilt() -> dict[str, ak.Array]:
        return join_arrays(
            primary, friend, on=ON, how="left", validate="one_to_one", friend_index=index
        )

    def run_pandas() -> Any:
        return pdf_p.merge(pdf_f, on=ON, how="left", validate="one_to_one")

    def run_polars() -> Any:
        return pl_p.join(pl_f, on=ON, how="left", validate="1:1")

    def run_duckdb() -> Any:
        return con.sql(
            "SELECT p.*, f.x, f.jets FROM p LEFT JOIN f USING (run, luminosityBlock, event)"
        ).to_arrow_table()

    # --- correctness: every engine gives the primary's x per event
    def check(name: str, x: np.ndarray, keys: dict[str, np.ndarray]) -> None:
        ref = dict(zip(primary["event"].tolist(), x_expected.tolist(), strict=True))
        got = dict(zip(np.asarray(keys["event"]).tolist(), np.asarray(x).tolist(), strict=True))
        if got != ref:
            msg = f"{name} disagrees with the expected flat column"
            raise SystemExit(msg)

    out = run_columnhub()
    check("columnhub", out["x"].to_numpy(), {"event": out["event"].to_numpy()})
    if ak.any(ak.is_none(out["jets"])) or not ak.array_equal(
        ak.drop_none(out["jets"]), data["jets_expected"]
    ):
        msg = "columnhub disagrees with the expected jagged column"
        raise SystemExit(msg)
    out = run_columnhub_prebuilt()
    check("columnhub (prebuilt index)", out["x"].to_numpy(), {"event": out["event"].to_numpy()})
    r = run_pandas()
    check("pandas", r["x"].to_numpy(), {"event": r["event"].to_numpy()})
    r = run_polars()
    check("polars", r["x"].to_numpy(), {"event": r["event"].to_numpy()})
    r = run_duckdb()
    check("duckdb", r["x"].to_numpy(), {"event": r["event"].to_numpy()})

    rows = [
        ("columnhub join_arrays (from scratch: keys packed+sorted+validated)", run_columnhub),
        ("columnhub join_arrays (prebuilt friend index)", run_columnhub_prebuilt),
        ("pandas merge (flat column only)", run_pandas),
        ("polars join (with list column)", run_polars),
        ("duckdb LEFT JOIN via Arrow (with list column)", run_duckdb),
    ]
    times = {name: best_of(fn, args.repeat)[0] for name, fn in rows}
    peers = {k: v for k, v in times.items() if not k.startswith("columnhub")}
    fastest_peer = min(peers, key=peers.__getitem__)
    mode = "wide (uniform 63-bit) event numbers" if args.wide_events else "CMS-like event numbers"
    print(f"left join, validate=one_to_one, {n:,} events, {mode}, best of {args.repeat}")
    print(f"{'engine':66s} {'time [s]':>9s} {'Mrows/s':>8s} {'vs ' + fastest_peer.split()[0]:>12s}")
    for name, t in times.items():
        ratio = times[fastest_peer] / t
        print(f"{name:66s} {t:9.3f} {n / t / 1e6:8.2f} {ratio:11.2f}x")


if __name__ == "__main__":
    main()
