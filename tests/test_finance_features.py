"""Finance (AML) features: point-in-time correctness, no label leakage, batch/online parity, graph specs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features import finance
from features.finance import feature_set
from features.graph import ConfirmedLinks, Cycle
from features.schemas import validate_table

T0 = pd.Timestamp("2024-03-01")
DELAY_DAYS = 1.0


def transfers(n: int = 420, n_accounts: int = 30, days: int = 12, seed: int = 7) -> pd.DataFrame:
    """Random transfers (skewed accounts, ties in time, structuring amounts, labels) plus a planted cycle."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_accounts + 1)
    src = rng.choice(n_accounts, n, p=weights / weights.sum())
    dst = rng.choice(n_accounts, n, p=weights[::-1] / weights.sum())
    seconds = np.sort(rng.integers(0, days * 86_400, n))
    seconds[10:14] = seconds[10]  # simultaneous transfers
    amount = np.round(rng.lognormal(7.5, 1.2, n), 2)
    amount[rng.random(n) < 0.1] = 9_500.0
    amount[rng.random(n) < 0.1] = 3_000.0
    countries = np.array(["US", "GB", "DE", "AE"])
    df = pd.DataFrame({
        "transaction_id": [f"t{i}" for i in range(n)],
        "timestamp": T0 + pd.to_timedelta(seconds, unit="s"),
        "source_account": [f"A{i}" for i in src],
        "target_account": [f"A{i}" for i in dst],
        "amount": amount,
        "currency": rng.choice(["USD", "EUR"], n),
        "channel": rng.choice(["wire", "cash", "card"], n),
        "source_country": countries[src % 4],
        "target_country": countries[dst % 4],
        "is_laundering": pd.array((rng.random(n) < 0.15).astype(int), dtype="Int8"),
    })
    cycle = pd.DataFrame({  # C1 -> C2 -> C3 -> C1 over three days
        "transaction_id": ["c1", "c2", "c3"],
        "timestamp": T0 + pd.to_timedelta([2.5, 3.5, 4.5], unit="D"),
        "source_account": ["A1", "A2", "A3"], "target_account": ["A2", "A3", "A1"],
        "amount": [9_000.0, 8_900.0, 8_800.0], "currency": "USD", "channel": "wire",
        "source_country": "US", "target_country": "GB", "is_laundering": pd.array([1, 1, 1], dtype="Int8"),
    })
    df = pd.concat([df, cycle], ignore_index=True).sort_values("timestamp", kind="stable").reset_index(drop=True)
    for col in ("transaction_id", "source_account", "target_account", "currency", "channel", "source_country",
                "target_country"):
        df[col] = df[col].astype("string")
    df.loc[df.sample(frac=0.2, random_state=1).index, "is_laundering"] = pd.NA  # unlabelled transfers
    return df


def cases_for(events: pd.DataFrame, seed: int = 3) -> pd.DataFrame:
    """Closed account cases at random times, confirmed and cleared."""
    rng = np.random.default_rng(seed)
    accounts = sorted(set(events["source_account"]) | set(events["target_account"]))
    pick = rng.choice(accounts, 10, replace=False)
    opened = T0 + pd.to_timedelta(rng.integers(0, 10 * 86_400, len(pick)), unit="s")
    return pd.DataFrame({
        "case_id": pd.array([f"k{i}" for i in range(len(pick))], dtype="string"),
        "entity_kind": pd.array(["account"] * len(pick), dtype="string"),
        "entity_id": pd.array(list(pick), dtype="string"),
        "opened_at": opened,
        "closed_at": opened + pd.to_timedelta(rng.integers(3_600, 3 * 86_400, len(pick)), unit="s"),
        "outcome": pd.array(rng.choice(["confirmed", "confirmed", "cleared"], len(pick)), dtype="string"),
    })


@pytest.fixture(scope="module")
def data():
    events = transfers()
    cases = cases_for(events)
    validate_table(events, "transactions", "fixture")
    validate_table(cases, "cases", "fixture")
    return events, cases


@pytest.fixture(scope="module")
def batch(data):
    events, cases = data
    return feature_set(DELAY_DAYS).build(events, cases)


def assert_same(a: pd.DataFrame, b: pd.DataFrame, categorical: list[str]) -> None:
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        if col in categorical:
            assert a[col].astype(object).fillna("<na>").tolist() == b[col].astype(object).fillna("<na>").tolist(), col
        else:
            np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-9, atol=1e-9,
                                       equal_nan=True, err_msg=col)


def test_one_row_per_event_and_labelled_features(data, batch):
    events, _ = data
    fs = feature_set(DELAY_DAYS)
    assert len(batch) == len(events) and list(batch.columns) == fs.names
    assert batch.index.equals(events.index)
    assert len(set(fs.names)) == len(fs.names)
    assert set(fs.categorical) == {"currency", "channel", "source_country", "target_country"}
    assert all(fs.labels[n] for n in fs.names)
    assert not {"is_laundering", "typology"} & set(fs.names)
    numeric = batch.drop(columns=fs.categorical).to_numpy(float)
    assert not np.isinf(numeric).any()
    # the planted cycle: A3 -> A1 closes A1 -> A2 -> A3
    row = batch.loc[events.index[events["transaction_id"] == "c3"][0]]
    assert row["cycle3_count"] >= 1 and row["below_threshold"] == 1.0


def test_future_rows_and_cases_do_not_change_past_features(data, batch):
    events, cases = data
    fs = feature_set(DELAY_DAYS)
    for q in (0.3, 0.7):
        cut = events["timestamp"].quantile(q)
        past = events[events["timestamp"] < cut]
        only_past = fs.build(past, cases[cases["closed_at"] < cut])
        assert_same(batch.loc[past.index], only_past, fs.categorical)


def test_own_and_later_labels_never_leak(data, batch):
    events, cases = data
    fs = feature_set(DELAY_DAYS)
    for i in (60, 250):
        t = events["timestamp"].iloc[i]
        flipped = events.copy()
        later = flipped["timestamp"] >= t
        flipped.loc[later, "is_laundering"] = (1 - flipped.loc[later, "is_laundering"].fillna(0)).astype("Int8")
        after = fs.build(flipped, cases)
        unaffected = events["timestamp"] <= t + pd.Timedelta(days=DELAY_DAYS)
        assert unaffected.iloc[i]
        assert_same(batch[unaffected], after[unaffected], fs.categorical)
        assert not batch.equals(after)  # the flip is visible once those outcomes are known


def test_online_matches_batch_event_by_event(data, batch):
    """A service: seed with history, score each event, then ingest it; labels and cases as they become known."""
    events, cases = data
    fs = feature_set(DELAY_DAYS)
    cut = events["timestamp"].iloc[len(events) * 3 // 5]
    history, stream = events[events["timestamp"] < cut], events[events["timestamp"] >= cut]
    state = fs.online(history, cases[cases["closed_at"] < cut])
    pending_cases = cases[cases["closed_at"] >= cut].sort_values("closed_at")
    pending_labels: list[pd.DataFrame] = []
    delay = pd.Timedelta(days=DELAY_DAYS)
    rows = []
    for idx in stream.index:
        event = stream.loc[[idx]]
        now = event["timestamp"].iloc[0]
        due = pending_cases["closed_at"] <= now
        if due.any():
            state.ingest_cases(pending_cases[due])
            pending_cases = pending_cases[~due]
        known = [p for p in pending_labels if p["timestamp"].iloc[0] + delay <= now]
        if known:
            state.ingest_labels(pd.concat(known))
            pending_labels = [p for p in pending_labels if p["timestamp"].iloc[0] + delay > now]
        rows.append(state.features(event.drop(columns=["is_laundering"])))
        state.ingest(event.drop(columns=["is_laundering"]))
        pending_labels.append(event)
    online = pd.concat(rows)
    assert_same(online, batch.loc[stream.index], fs.categorical)
    assert online["src_confirmed_links"].sum() + online["dst_confirmed_links"].sum() > 0
    assert online["cycle3_count"].sum() > 0


# --- graph specs on hand-made graphs -------------------------------------------------------------------------

def test_build_in_chunks_and_float32_equal_the_reference_build(data, batch):
    """The memory-lean build (derive in row slices, float32 training frame) changes no value: the reference is
    ``frame(derive(...))`` over all rows at once, and float32 features are those float64 values rounded once."""
    from features.featureset import _empty_cases

    events, cases = data
    fs = feature_set(DELAY_DAYS)
    prepared = fs.prepare(events)
    sources = fs.sources(events=prepared, labels=fs.prepared_labels(events), cases=_empty_cases(cases))
    parts = [prepared, *(spec.batch(sources, prepared) for spec in fs.specs)]
    reference = fs.frame(fs.derive({c: p[c].to_numpy() for p in parts for c in p.columns}), events.index)
    pd.testing.assert_frame_equal(batch, reference, check_exact=True)
    pd.testing.assert_frame_equal(fs.build(events, cases, chunk_rows=37), reference, check_exact=True)
    small = fs.build(events, cases, dtype=np.float32, chunk_rows=100)
    numeric = [n for n in fs.names if n not in fs.categorical]
    assert list(small.columns) == fs.names and (small[numeric].dtypes == np.float32).all()
    assert np.array_equal(small[numeric].to_numpy(), reference[numeric].to_numpy().astype(np.float32), equal_nan=True)
    pd.testing.assert_frame_equal(small[fs.categorical], reference[fs.categorical])


def edges(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["source_account", "target_account", "_t"]).astype(
        {"source_account": object, "target_account": object})


def case_rows(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    return finance.sources(cases=pd.DataFrame({
        "entity_kind": "account", "entity_id": [r[0] for r in rows], "outcome": [r[1] for r in rows],
        "closed_at": pd.to_datetime([r[2] for r in rows], unit="s"),
    }))["cases:account"]


def both_paths(spec, ev: pd.DataFrame, cases: pd.DataFrame | None = None) -> pd.DataFrame:
    """Batch answer for every row of ``ev``; asserts the online executor gives the same."""
    sources = {"events": ev, "cases:account": cases if cases is not None else case_rows([])}
    out = spec.batch(sources, ev)
    ex = spec.online()
    if isinstance(spec.source, tuple):
        ex.ingest(ev, source="events")
        ex.ingest(sources["cases:account"], source="cases:account")
    else:
        ex.ingest(ev)
    keys = ev[list(spec.qkeys)].itertuples(index=False, name=None)
    online = pd.DataFrame([ex.query(k, int(t)) for k, t in zip(keys, ev["_t"], strict=True)],
                          columns=spec.columns(), index=ev.index)
    pd.testing.assert_frame_equal(out, online, check_dtype=False)
    return out


def test_cycle_three_cycles_and_ties():
    ev = edges([
        ("A", "B", 10), ("B", "C", 20), ("C", "A", 20),  # same time as the second leg: not yet a cycle
        ("C", "A", 30),  # closes A -> B -> C
        ("A", "E", 31), ("E", "C", 33),  # E -> C closes E -> C -> A -> E (path C -> A -> E formed at 31)
        ("C", "A", 35),  # now via B (path time 20) and E (33)
        ("D", "A", 40), ("A", "A", 41), ("A", "C", 42),
    ]).sort_values("_t", kind="stable")
    out = both_paths(Cycle("cyc"), ev).sort_index()
    assert out["cyc_n"].tolist() == [0, 0, 0, 1, 0, 1, 2, 0, 0, 0]
    assert out.loc[3, "cyc_since_last"] == 10 and out.loc[6, "cyc_since_last"] == 2
    assert out.loc[6, "cyc_since_first"] == 15 and np.isnan(out.loc[0, "cyc_since_last"])


def test_cycle_hub_cap_ranks():
    ev = edges([("X1", "H", 1), ("X2", "H", 2), ("A", "H", 3), ("H", "C", 4), ("C", "A", 5)])
    assert both_paths(Cycle("cyc", max_rank=2), ev)["cyc_n"].tolist() == [0, 0, 0, 0, 0]
    assert both_paths(Cycle("cyc", max_rank=3), ev)["cyc_n"].tolist() == [0, 0, 0, 0, 1]
    # the second leg is capped by the intermediate's distinct receivers
    ev = edges([("A", "H", 1), ("H", "Y1", 2), ("H", "Y2", 3), ("H", "C", 4), ("C", "A", 5)])
    assert both_paths(Cycle("cyc", max_rank=2), ev)["cyc_n"].iloc[-1] == 0
    assert both_paths(Cycle("cyc", max_rank=3), ev)["cyc_n"].iloc[-1] == 1


def test_fan_in_star_and_pass_through():
    hour = pd.Timedelta(hours=1)
    rows = [(f"S{i}", "HUB", T0 + i * hour, 9_000.0 + i) for i in range(1, 6)]
    rows.append(("HUB", "OUT", T0 + 7 * hour, 40_000.0))
    tx = pd.DataFrame(rows, columns=["source_account", "target_account", "timestamp", "amount"])
    tx = tx.assign(transaction_id=[f"x{i}" for i in range(len(tx))], currency="USD", channel="wire",
                   source_country="US", target_country="US")
    f = feature_set().build(tx)
    assert f["dst_fanin"].tolist() == [0, 1, 2, 3, 4, 0]
    assert f["dst_in_count_24h"].tolist() == [0, 1, 2, 3, 4, 0]
    assert f["dst_in_count_1h"].tolist() == [0, 1, 1, 1, 1, 0]
    assert f["below_threshold"].tolist() == [1, 1, 1, 1, 1, 0]
    last = f.iloc[-1]
    assert last["src_fanin"] == 5 and last["src_in_count_24h"] == 5 and last["src_fanout"] == 0
    assert last["pass_through_24h"] == pytest.approx(40_000.0 / sum(9_000.0 + i for i in range(1, 6)))
    assert last["src_hours_since_last_in"] == pytest.approx(2.0)


def test_confirmed_links_mule_and_case_timing():
    ev = edges([
        ("W", "M", 10),  # W's case is cleared: never a link
        ("X", "M", 100),  # X's case is confirmed at 500
        ("M", "Y", 300),
        ("M", "Q", 500),  # case closes at the same second: not known yet
        ("M", "Y", 600),
        ("M", "X", 650),
    ])
    cases = case_rows([("X", "confirmed", 500), ("W", "cleared", 20)])
    out = both_paths(ConfirmedLinks("links"), ev, cases)
    assert out["src_links_1hop"].tolist() == [0, 0, 0, 0, 1, 1]
    assert out["dst_links_1hop"].tolist() == [0, 0, 0, 0, 0, 0]
    # Y's counterparty M is linked to X (not Y) from 500 on; X's own links through M do not count for X
    assert out["dst_links_2hop"].tolist() == [0, 0, 0, 0, 1, 0]
    assert out["src_links_2hop"].tolist() == [0, 0, 0, 0, 0, 0]
    # adding the case later (online, as a service would) gives the same answers
    ex = ConfirmedLinks("links").online()
    ex.ingest(ev, source="events")
    assert ex.query(("M", "Y"), 600) == [0.0, 0.0, 0.0, 0.0]
    ex.ingest(cases, source="cases:account")
    assert ex.query(("M", "Y"), 600) == [1.0, 0.0, 0.0, 1.0]
    assert ex.query(("M", "Y"), 500) == [0.0, 0.0, 0.0, 0.0]


def test_cycle_legs_do_not_depend_on_arrival_order():
    """Hub ranks follow first-contact time: an older edge arriving late (another replica's events, a backdated
    transfer) takes its rank and pushes the last sender or receiver out of the legs, as in batch."""
    from features.featureset import T_COL
    from features.graph import Cycle

    for seed in range(60):
        rng = np.random.default_rng(seed)
        n = 60
        ev = pd.DataFrame({"source_account": [f"A{i}" for i in rng.integers(0, 8, n)],
                           "target_account": [f"A{i}" for i in rng.integers(0, 8, n)],
                           T_COL: rng.permutation(n) * 10})  # distinct times: ties rank by row order in batch
        spec = Cycle("cy", max_rank=2)
        batch = spec.batch({"events": ev}, ev).to_numpy()
        online = spec.online()
        for j in rng.permutation(n):
            online.ingest(ev.iloc[[j]])
        got = np.array([online.query((s, d), t)
                        for s, d, t in ev[["source_account", "target_account", T_COL]].itertuples(index=False)])
        np.testing.assert_allclose(got, batch, equal_nan=True, err_msg=f"seed {seed}")


def test_self_transfers_are_in_no_history():
    """A -> A moves no money between parties: earlier self-transfers made a later one look like a 2-cycle (they
    were its own "back" transfers), counted A as its own receiver and sender and added to its in- and outflow at
    once. Batch, the online state and the service's path agree."""
    import copy

    from serving.fast_path import feature_columns_in_time_order

    hour = pd.Timedelta(hours=1)
    rows = [("A", "B", 1, 100.0), ("A", "A", 2, 1_000.0), ("B", "A", 3, 50.0), ("A", "A", 4, 2_000.0),
            ("A", "A", 5, 500.0), ("A", "C", 6, 70.0)]
    tx = pd.DataFrame([(s, d, T0 + h * hour, a) for s, d, h, a in rows],
                      columns=["source_account", "target_account", "timestamp", "amount"])
    tx = tx.assign(transaction_id=[f"s{i}" for i in range(len(tx))], currency="USD", channel="wire",
                   source_country="US", target_country="US")
    fs = feature_set()
    f = fs.build(tx)
    self_row, last = f.iloc[4], f.iloc[5]
    assert self_row["self_transfer"] == 1 and self_row["back_count"] == 0 and self_row["pair_count"] == 0
    assert self_row["src_out_count"] == 1 and self_row["src_in_count_24h"] == 1  # A -> B and B -> A only
    assert last["src_fanout"] == 1 and last["src_fanin"] == 1 and last["src_out_count_24h"] == 1
    assert last["pass_through_24h"] == pytest.approx((100.0 + 70.0) / 50.0)
    empty = fs.online()
    served = feature_columns_in_time_order(copy.deepcopy(empty), tx)
    plain = feature_columns_in_time_order(copy.deepcopy(empty), {  # the service's plain columns, no frame
        col: tx[col].to_numpy("datetime64[ns]" if col == "timestamp" else object if tx[col].dtype == object
                              else np.float64) for col in tx.columns})
    state, online = copy.deepcopy(empty), []
    for i in range(len(tx)):
        online.append(state.features(tx.iloc[[i]]))
        state.ingest(tx.iloc[[i]])
    assert_same(pd.concat(online), f, fs.categorical)
    assert_same(fs.frame(served, tx.index), f, fs.categorical)
    assert_same(fs.frame(plain, tx.index), f, fs.categorical)
