"""The point-in-time engine against a brute-force reference: batch and online, any epoch, bulk and row ingest."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.engine import Agg, Distinct, batch_aggregate

Y2040 = int(pd.Timestamp("2040-06-01").timestamp())  # > 2**31: past the 32-bit epoch limit


def _rows(n: int, t_start: int, seed: int, span: int = 40 * 86_400) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    keys = np.array(["a", "b", "c", "d", None], dtype=object)
    return pd.DataFrame({
        "k": keys[rng.integers(0, len(keys), n)],
        "k2": np.array(["x", "y", None], dtype=object)[rng.integers(0, 3, n)],
        "other": np.array(["p", "q", "r", "s", None], dtype=object)[rng.integers(0, 5, n)],
        "v": np.where(rng.random(n) < 0.1, np.nan, rng.normal(100, 30, n)),
        "_t": t_start + rng.integers(0, span, n),
    })


def _brute(spec: Agg, source: pd.DataFrame, query: pd.DataFrame) -> pd.DataFrame:
    """Row-by-row reference: source rows with the same key in ``[t - window, t)``."""
    out = []
    for _, q in query.iterrows():
        qk = [q[k] for k in spec.qkeys]
        if any(v is None for v in qk):
            mask = np.zeros(len(source), bool)
        else:
            mask = np.ones(len(source), bool)
            for k, v in zip(spec.keys, qk, strict=True):
                mask &= (source[k] == v).to_numpy()
        lo = -np.inf if spec.window_s is None else q["_t"] - spec.window_s
        mask &= (source["_t"] < q["_t"]).to_numpy()
        hit = source[mask & (source["_t"] >= lo).to_numpy()]
        row = {f"{spec.name}_n": float(len(hit))}
        for v in spec.values:
            row[f"{spec.name}_{v}"] = float(hit[v].fillna(0).sum())
        if spec.recency:  # recency ignores the window: last and first earlier row of the key
            before = source[mask]
            row[f"{spec.name}_since_last"] = q["_t"] - before["_t"].max() if len(before) else np.nan
            row[f"{spec.name}_since_first"] = q["_t"] - before["_t"].min() if len(before) else np.nan
        out.append(row)
    return pd.DataFrame(out, index=query.index, dtype=float)


SPECS = [
    Agg("all", "s", ("k",), values=("v",), recency=True),
    Agg("w", "s", ("k",), values=("v",), window=pd.Timedelta(days=3), recency=True),
    Agg("pair", "s", ("k", "k2"), values=("v",), window=pd.Timedelta(days=10)),
]


@pytest.mark.parametrize("t_start", [int(pd.Timestamp("2024-01-01").timestamp()), Y2040], ids=["2024", "2040"])
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_batch_and_online_match_brute_force_in_any_epoch(spec: Agg, t_start: int):
    source = _rows(400, t_start, seed=1)
    query = _rows(150, t_start, seed=2).sample(frac=1.0, random_state=3)  # unsorted queries
    expected = _brute(spec, source, query)
    batch = batch_aggregate(spec, source, query)
    pd.testing.assert_frame_equal(batch, expected, check_exact=False, rtol=1e-9)
    for bulk in (True, False):
        ex = spec.online()
        if bulk:
            src = pd.concat([source] * 3).iloc[: 400 + 700]
            ex.ingest(src)  # > 1000 rows on an empty state: bulk load
            ex2 = spec.online()
            for i in range(0, len(src), 500):  # same rows, row by row, in reverse (out of time order)
                ex2.ingest(src.iloc[::-1].iloc[i : i + 500])
            ref = _brute(spec, src, query)
            for e in (ex, ex2):
                got = pd.DataFrame([e.query(tuple(q[k] for k in spec.qkeys), int(q["_t"]))
                                    for _, q in query.iterrows()], index=query.index, columns=spec.columns())
                pd.testing.assert_frame_equal(got, ref, check_exact=False, rtol=1e-9)
        else:
            for i in range(0, len(source), 37):  # small chunks: row-by-row path
                ex.ingest(source.iloc[i : i + 37])
            got = pd.DataFrame([ex.query(tuple(q[k] for k in spec.qkeys), int(q["_t"])) for _, q in query.iterrows()],
                               index=query.index, columns=spec.columns())
            pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-9)


def test_times_after_2038_do_not_spill_into_the_next_key():
    """Packed (key, time) must not overflow: a key's rows after 2038 stay its own."""
    t = Y2040
    source = pd.DataFrame({"k": ["a", "a", "b"], "_t": [t - 10, t + 3 * 86_400 * 365, t - 5]})
    query = pd.DataFrame({"k": ["b", "a", "c"], "_t": [t + 10 * 86_400 * 365, t, t + 10 * 86_400 * 365]})
    out = batch_aggregate(Agg("x", "s", ("k",), recency=True), source, query)
    assert out["x_n"].tolist() == [1.0, 1.0, 0.0]
    assert out["x_since_last"].tolist()[:2] == [10 * 86_400 * 365 + 5, 10]


def test_distinct_online_equals_batch_with_late_arrivals():
    spec = Distinct("d", "s", ("k",), "other", window=pd.Timedelta(days=5))
    source = _rows(300, Y2040, seed=4)
    query = _rows(80, Y2040, seed=5)
    batch = batch_aggregate(spec, source, query)
    ex = spec.online()
    for i in range(0, len(source), 50):  # chunks out of time order: earlier first sightings arrive late
        ex.ingest(source.iloc[::-1].iloc[i : i + 50])
    got = [ex.query(tuple(q[k] for k in spec.qkeys), int(q["_t"]))[0] for _, q in query.iterrows()]
    np.testing.assert_array_equal(np.array(got), batch["d"].to_numpy())
    cols = {c: source[c].tolist() for c in source.columns}
    ex2 = spec.online()
    ex2.ingest_columns(cols, range(len(source)))
    got2 = [ex2.query(tuple(q[k] for k in spec.qkeys), int(q["_t"]))[0] for _, q in query.iterrows()]
    assert got2 == got


def test_specs_over_one_source_and_keys_share_one_history_with_the_same_answers():
    """One KeyHistory per (source, keys) and one DistinctHistory per (source, keys, other): a row is ingested once,
    and every spec answers exactly as its own executor would, in any ingest order and value-column order."""
    from features.engine import DistinctHistory, KeyHistory

    source = _rows(400, Y2040, seed=7).assign(w2=lambda f: f["v"] * 3.0)
    specs = [
        Agg("a", "s", ("k",), values=("v",), recency=True),
        Agg("b", "s", ("k",), values=("w2",), window=pd.Timedelta(days=3)),
        Agg("c", "s", ("k",), query_keys=("k2",), values=("w2", "v"), window=pd.Timedelta(days=9)),
        Agg("d", "s", ("k2",), window=pd.Timedelta(days=1)),
        Distinct("e", "s", ("k",), "other"),
        Distinct("f", "s", ("k",), "other", query_keys=("k2",), window=pd.Timedelta(days=4)),
    ]
    shared: dict = {}
    executors = [spec.online(shared) for spec in specs]
    feeds = {id(ex.feed): ex.feed for ex in executors}
    assert sorted(type(f).__name__ for f in feeds.values()) == ["DistinctHistory", "KeyHistory", "KeyHistory"]
    assert executors[0].feed is executors[1].feed is executors[2].feed and executors[0].feed.values == ["v", "w2"]
    assert isinstance(executors[4].feed, DistinctHistory) and executors[4].feed is executors[5].feed
    alone = [spec.online() for spec in specs]
    for feed in feeds.values():
        feed.ingest(source.iloc[:300])  # bulk path for KeyHistory
        feed.ingest(source.iloc[300:][::-1])  # late rows one by one, out of time order
    for ex in alone:
        ex.ingest(source.iloc[:300])
        ex.ingest(source.iloc[300:][::-1])
    query = _rows(60, Y2040, seed=8).assign(k2=lambda f: f["k"].where(f.index % 2 == 0, f["k2"]))
    for spec, ex, ref in zip(specs, executors, alone, strict=True):
        for _, q in query.iterrows():
            key = tuple(q[k] for k in spec.qkeys)
            np.testing.assert_array_equal(ex.query(key, int(q["_t"])), ref.query(key, int(q["_t"])))
    with pytest.raises(RuntimeError, match="already holds rows"):
        executors[0].feed.track(["new"])
    assert isinstance(executors[3].feed, KeyHistory)
