"""Synthetic generator: determinism, chunking, contracts, planted typologies and honest background."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from features.datasets import CustomsData, FinanceData, load_dataset
from features.synthetic import customs as syn_customs
from features.synthetic import finance as syn_finance
from features.synthetic import generate

RATE = 0.03
CUSTOMS_ROWS, FINANCE_ROWS = 20_000, 30_000


@pytest.fixture(scope="module")
def customs_dir(tmp_path_factory) -> Path:
    return generate("customs", CUSTOMS_ROWS, 11, tmp_path_factory.mktemp("customs"), positive_rate=RATE,
                    chunk_rows=7_000, progress=False)


@pytest.fixture(scope="module")
def finance_dir(tmp_path_factory) -> Path:
    return generate("finance", FINANCE_ROWS, 11, tmp_path_factory.mktemp("finance"), positive_rate=RATE,
                    chunk_rows=12_000, progress=False)


@pytest.fixture(scope="module")
def customs(customs_dir: Path) -> CustomsData:
    return load_dataset("customs", customs_dir)


@pytest.fixture(scope="module")
def finance(finance_dir: Path) -> FinanceData:
    return load_dataset("finance", finance_dir)


def _history(cases: pd.DataFrame) -> pd.DataFrame:
    return cases[(cases["source"] == "history") & (cases["outcome"] == "confirmed")]


# ------------------------------------------------------------------------------------------ mechanics


@pytest.mark.parametrize("domain", ["customs", "finance"])
def test_deterministic(tmp_path: Path, domain: str) -> None:
    a = generate(domain, 3_000, 5, tmp_path / "a", chunk_rows=1_000, progress=False)
    b = generate(domain, 3_000, 5, tmp_path / "b", chunk_rows=1_000, progress=False)
    c = generate(domain, 3_000, 6, tmp_path / "c", chunk_rows=1_000, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.parquet"))
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    da, dc = load_dataset(domain, a), load_dataset(domain, c)
    pd.testing.assert_frame_equal(da.cases, load_dataset(domain, b).cases)
    table = "declarations" if domain == "customs" else "transactions"
    assert not getattr(da, table).drop(columns=[getattr(da, table).columns[0]]).equals(
        getattr(dc, table).drop(columns=[getattr(dc, table).columns[0]]))


@pytest.mark.parametrize(("domain", "path_fixture", "rows", "chunk", "time_col", "id_col"), [
    ("customs", "customs_dir", CUSTOMS_ROWS, 7_000, "date", "declaration_id"),
    ("finance", "finance_dir", FINANCE_ROWS, 12_000, "timestamp", "transaction_id"),
])
def test_chunks_time_ordered(request, domain, path_fixture, rows, chunk, time_col, id_col) -> None:
    out = request.getfixturevalue(path_fixture)
    table = "declarations" if domain == "customs" else "transactions"
    parts = sorted((out / table).glob("part-*.parquet"))
    assert len(parts) == -(-rows // chunk)
    frames = [pq.read_table(p).to_pandas() for p in parts]
    assert sum(len(f) for f in frames) == rows
    allrows = pd.concat(frames, ignore_index=True)
    assert allrows[time_col].is_monotonic_increasing and allrows[id_col].is_monotonic_increasing
    assert allrows[id_col].is_unique
    span = allrows[time_col].max() - allrows[time_col].min()
    assert pd.Timedelta(days=365) <= span <= pd.Timedelta(days=730)
    for earlier, later in pairwise(frames):
        assert earlier[time_col].max() <= later[time_col].min()


@pytest.mark.parametrize("domain", ["customs", "finance"])
@pytest.mark.parametrize("rate", [0.01, 0.05])
def test_positive_rate_configurable(tmp_path: Path, domain: str, rate: float) -> None:
    data = load_dataset(domain, generate(domain, 10_000, 3, tmp_path, positive_rate=rate, progress=False))
    label = data.declarations["fraud"] if domain == "customs" else data.transactions["is_laundering"]
    assert 0.75 * rate <= label.mean() <= 1.25 * rate


def test_generate_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown domain"):
        generate("weather", 1_000, 1, tmp_path, progress=False)
    with pytest.raises(ValueError):
        generate("customs", 0, 1, tmp_path, progress=False)


# ------------------------------------------------------------------------------------------ customs


def test_customs_contract_and_rate(customs: CustomsData) -> None:
    decl = customs.declarations
    assert len(decl) == CUSTOMS_ROWS
    fraud = decl["fraud"] == 1
    assert 0.7 * RATE <= fraud.mean() <= 1.3 * RATE
    assert (decl["typology"].notna() == fraud).all()
    assert (decl.loc[~fraud, "revenue"] == 0).all() and (decl.loc[fraud, "revenue"] > 0).mean() > 0.5
    assert set(decl.loc[~fraud, "critical_fraud"]) == {0} and set(decl.loc[fraud, "critical_fraud"]) <= {1, 2}
    assert decl["seller_id"].isna().any() and decl["courier_id"].notna().any()
    top = decl["country_origin"].value_counts().index[:3]
    assert "CN" in top
    # Zipf-like importers: the busiest 1% of importers file a large share of declarations
    counts = decl["importer_id"].value_counts()
    assert counts.iloc[: max(1, len(counts) // 100)].sum() > 0.05 * len(decl)


def test_customs_typologies_planted(customs: CustomsData) -> None:
    decl = customs.declarations
    counts = decl["typology"].value_counts()
    for typology, weight in syn_customs.TYPOLOGY_WEIGHTS.items():
        expected = CUSTOMS_ROWS * RATE * weight
        assert 0.4 * expected <= counts.get(typology, 0) <= 2.0 * expected, typology


def test_customs_patterns_are_real(customs: CustomsData) -> None:
    decl = customs.declarations
    unit = np.log(decl["item_price"] + 1) - np.log(decl["net_mass"] + 1)
    rel = unit - unit.groupby(decl["hs6"]).transform("median")
    normal = decl["fraud"] == 0
    under = decl["typology"] == "undervaluation"
    assert rel[under].median() < rel[normal].median() - 0.8
    origin = decl[decl["typology"] == "origin_misdeclaration"]
    assert (origin["country_departure"] != origin["country_origin"]).all()
    assert origin["country_origin"].isin(list(syn_customs.COVER_ORIGINS)).all()
    assert (decl.loc[normal, "country_departure"] != decl.loc[normal, "country_origin"]).mean() > 0.03  # honest noise
    risky = decl[decl["typology"] == "risky_hs_chapter"]
    chapters = risky["hs6"].str[:2]
    assert chapters.nunique() <= 3
    in_risky = decl["hs6"].str[:2].isin(set(chapters))
    assert decl.loc[in_risky, "fraud"].mean() > 2 * decl.loc[~in_risky, "fraud"].mean()
    assert (decl.loc[in_risky, "fraud"] == 0).sum() > len(risky)  # those chapters are mostly legitimate


def test_new_importers_ship_soon_after_first_appearance(customs: CustomsData) -> None:
    decl = customs.declarations
    first = decl.groupby("importer_id")["date"].transform("min")
    new = decl[decl["typology"] == "new_importer_volume"]
    assert ((new["date"] - first[new.index]) <= pd.Timedelta(days=21)).all()
    mass = np.log(decl["net_mass"])
    assert mass[new.index].median() > mass[decl["fraud"] == 0].median() + 1.0
    assert (decl.loc[first.index[first > decl["date"].min() + pd.Timedelta(days=60)], "fraud"] == 0).any()


def test_repeat_offenders_have_earlier_closed_cases(customs: CustomsData) -> None:
    decl, hist = customs.declarations, _history(customs.cases)
    assert (hist["closed_at"] > hist["opened_at"]).all()
    importer = hist[hist["entity_kind"] == "importer"].groupby("entity_id")["closed_at"].min()
    rep = decl[decl["typology"] == "repeat_offender"]
    assert len(rep) and rep["importer_id"].isin(importer.index).all()
    assert (importer[rep["importer_id"]].to_numpy() < rep["date"].to_numpy()).all()
    # known offenders also file legitimate declarations, and some never offend again
    offenders = decl["importer_id"].isin(importer.index)
    assert (decl.loc[offenders, "fraud"] == 0).any()
    assert len(set(importer.index) - set(rep["importer_id"])) > 0


def test_linked_entities_share_partners_with_offenders(customs: CustomsData) -> None:
    decl, hist = customs.declarations, _history(customs.cases)
    sellers = set(hist.loc[hist["entity_kind"] == "seller", "entity_id"])
    declarants = set(hist.loc[hist["entity_kind"] == "declarant", "entity_id"])
    linked = decl[decl["typology"] == "linked_entity"]
    shares = linked["seller_id"].isin(sellers) | linked["declarant_id"].isin(declarants)
    assert shares.mean() > 0.5
    assert not linked["importer_id"].isin(set(hist.loc[hist["entity_kind"] == "importer", "entity_id"])).any()


# ------------------------------------------------------------------------------------------ finance


def test_finance_contract_and_rate(finance: FinanceData) -> None:
    tx, acc = finance.transactions, finance.accounts
    assert len(tx) == FINANCE_ROWS
    bad = tx["is_laundering"] == 1
    assert 0.7 * RATE <= bad.mean() <= 1.3 * RATE
    assert (tx["typology"].notna() == bad).all()
    assert (tx["source_country"] == tx["target_country"]).mean() > 0.7  # many domestic transfers
    assert tx["currency"].nunique() >= 5 and tx["channel"].nunique() >= 5
    # no channel or currency only used by launderers
    assert set(tx.loc[bad, "channel"]) <= set(tx.loc[~bad, "channel"])
    assert set(tx.loc[bad, "currency"]) <= set(tx.loc[~bad, "currency"])
    involved = set(tx.loc[bad, "source_account"]) | set(tx.loc[bad, "target_account"])
    assert set(acc.loc[acc["is_fraud"] == 1, "account_id"]) == involved
    assert set(tx["source_account"]) | set(tx["target_account"]) <= set(acc["account_id"])


def test_finance_typologies_planted(finance: FinanceData) -> None:
    counts = finance.transactions["typology"].value_counts()
    for typology, weight in syn_finance.TYPOLOGY_WEIGHTS.items():
        expected = FINANCE_ROWS * RATE * weight
        assert 0.4 * expected <= counts.get(typology, 0) <= 2.0 * expected, typology


def test_finance_patterns_are_real(finance: FinanceData) -> None:
    tx = finance.transactions
    normal = tx["is_laundering"] == 0
    st = tx[tx["typology"] == "structuring"]
    assert st["amount"].between(8_000, syn_finance.THRESHOLD, inclusive="left").all()
    assert (st.groupby("source_account").size() >= 3).mean() > 0.8
    assert tx.loc[normal, "amount"].between(9_000, syn_finance.THRESHOLD, inclusive="left").sum() > 5  # honest noise
    fan_in = tx[tx["typology"] == "fan_in"]
    assert fan_in.groupby("target_account")["source_account"].nunique().max() >= 8
    fan_out = tx[tx["typology"] == "fan_out"]
    assert fan_out.groupby("source_account")["target_account"].nunique().max() >= 8
    payroll = tx[normal].groupby(["source_account", tx["timestamp"].dt.date])["target_account"].nunique()
    assert payroll.max() >= 10  # normal fan-out exists too
    cyc = tx[tx["typology"] == "cycle"]
    assert set(cyc["source_account"]) == set(cyc["target_account"])  # every sender also receives: closed loops
    corridor = tx[tx["typology"] == "high_risk_corridor"]
    high = set(syn_finance.HIGH_RISK)
    assert (corridor["source_country"].isin(high) | corridor["target_country"].isin(high)).all()
    hr_normal = normal & (tx["source_country"].isin(high) | tx["target_country"].isin(high))
    assert hr_normal.sum() > 0
    hr_rate = tx.loc[tx["source_country"].isin(high) | tx["target_country"].isin(high), "is_laundering"].mean()
    assert hr_rate > 2 * tx["is_laundering"].mean()


def test_pass_through_leaves_within_hours(finance: FinanceData) -> None:
    pt = finance.transactions[finance.transactions["typology"] == "pass_through"].reset_index(drop=True)
    legs = pd.DataFrame({"row": pt.index, "t": pt["timestamp"], "src": pt["source_account"].astype(object),
                         "tgt": pt["target_account"].astype(object)}).sort_values("t")
    arrivals = legs[["t", "tgt"]].rename(columns={"tgt": "acct", "t": "t_in"})
    departures = legs[["t", "src"]].rename(columns={"src": "acct", "t": "t_out"})
    # an outgoing leg follows money that arrived at its source within 12 hours, or an incoming leg is
    # forwarded by its target within 12 hours
    out_leg = pd.merge_asof(legs, arrivals, left_on="t", right_on="t_in", left_by="src", right_by="acct",
                            tolerance=pd.Timedelta(hours=12), allow_exact_matches=False)
    in_leg = pd.merge_asof(legs, departures, left_on="t", right_on="t_out", left_by="tgt", right_by="acct",
                           tolerance=pd.Timedelta(hours=12), direction="forward", allow_exact_matches=False)
    explained = out_leg.set_index("row")["t_in"].notna() | in_leg.set_index("row")["t_out"].notna()
    assert len(pt) and explained.all()
    n_in = in_leg["t_out"].notna().sum()
    assert 0.3 * len(pt) <= n_in <= 0.6 * len(pt)


def test_mules_have_earlier_closed_cases(finance: FinanceData) -> None:
    tx, hist = finance.transactions, _history(finance.cases)
    closed = hist.groupby("entity_id")["closed_at"].min()
    mule = tx[tx["typology"] == "mule"]
    assert len(mule)
    src_known = mule["source_account"].map(closed)
    tgt_known = mule["target_account"].map(closed)
    earliest = pd.concat([src_known, tgt_known], axis=1).min(axis=1)
    assert earliest.notna().all() and (earliest < mule["timestamp"]).all()
    assert (finance.cases.loc[finance.cases["source"] == "history", "closed_at"] < tx["timestamp"].min()).all()


def test_generated_events_are_valid_api_items(tmp_path: Path) -> None:
    """What the generator writes can be posted to the scoring API as is (the demo and the load test do): this seed
    wrote a transfer of 0.00, which the API refuses (amounts must be positive), so scoring its latest events
    failed with a 422."""
    from bench.common import api_items
    from serving.models import parse_batch

    for domain, rows in (("finance", 100_000), ("customs", 20_000)):
        data = load_dataset(domain, generate(domain, rows, 1, tmp_path / domain, positive_rate=0.08, progress=False))
        events = data.transactions if domain == "finance" else data.declarations
        for start in range(0, len(events), 1000):
            parse_batch(domain, {"items": api_items(domain, events.iloc[start:start + 1000])})
