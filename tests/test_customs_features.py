"""Customs features: point-in-time correctness and batch/online parity."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.customs import PRIOR, feature_set
from features.schemas import validate_table
from tests.customs_data import cases_from, declarations


@pytest.fixture(scope="module")
def data():
    decl = declarations()
    validate_table(decl, "declarations", "fixture")
    return decl, cases_from(decl, delay_days=3)


def assert_same(a: pd.DataFrame, b: pd.DataFrame, categorical: list[str]) -> None:
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        if col in categorical:
            assert a[col].astype(object).fillna("<na>").tolist() == b[col].astype(object).fillna("<na>").tolist(), col
        else:
            np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-9, atol=1e-9,
                                       equal_nan=True, err_msg=col)


def test_one_row_per_event_and_named_features(data):
    decl, cases = data
    fs = feature_set(3)
    feats = fs.build(decl, cases)
    assert len(feats) == len(decl) and list(feats.columns) == fs.names
    assert set(fs.categorical) <= set(fs.names)
    assert all(fs.labels[n] for n in fs.names)


def test_future_rows_and_cases_do_not_change_past_features(data):
    decl, cases = data
    fs = feature_set(3)
    cut = decl["date"].quantile(0.6)
    past = decl[decl["date"] < cut]
    full = fs.build(decl, cases).loc[past.index]
    only_past = fs.build(past, cases[cases["closed_at"] < cut])
    assert_same(full, only_past, fs.categorical)


def test_own_and_later_labels_never_leak(data):
    decl, cases = data
    fs = feature_set(3)
    base = fs.build(decl, cases)
    flipped = decl.copy()
    later = flipped["date"] >= flipped["date"].iloc[700]
    flipped.loc[later, "fraud"] = 1 - flipped.loc[later, "fraud"]
    flipped_cases = cases_from(flipped, delay_days=3)
    after = fs.build(flipped, flipped_cases)
    # rows before the first flipped outcome became known are identical
    known_from = flipped.loc[later, "date"].min() + pd.Timedelta(days=3)
    unaffected = decl["date"] <= known_from
    assert_same(base[unaffected], after[unaffected], fs.categorical)
    assert not np.allclose(base.loc[~unaffected, "risk_origin"], after.loc[~unaffected, "risk_origin"])


def test_price_norm_uses_only_earlier_declarations(data):
    decl, _cases = data
    fs = feature_set()
    feats = fs.build(decl)
    first_of_day = decl.groupby("hs6")["date"].transform("min") == decl["date"]
    assert feats.loc[first_of_day, "hs6_count_90d"].eq(0).all()
    assert feats.loc[first_of_day, "unit_price_dev_hs6"].isna().all()


def test_online_equals_batch_for_each_new_event(data):
    decl, cases = data
    fs = feature_set(3)
    batch = fs.build(decl, cases)
    days = decl["date"].sort_values().unique()
    start_day = days[int(len(days) * 0.8)]
    history = decl[decl["date"] < start_day]
    state = fs.online(history, cases[cases["closed_at"] < start_day])
    labelled_until = start_day
    for day in days[days >= start_day]:
        # outcomes and cases whose time has come are ingested before the day's events are scored
        state.ingest_cases(cases[(cases["closed_at"] >= labelled_until) & (cases["closed_at"] < day)])
        known = decl["date"] + pd.Timedelta(days=3)  # history's outcomes were ingested with the seed
        newly_known = decl[(decl["date"] >= start_day) & (known >= labelled_until) & (known < day)]
        state.ingest_labels(newly_known)
        labelled_until = day
        todays = decl[decl["date"] == day]
        for i in range(len(todays)):
            event = todays.iloc[i : i + 1]
            assert_same(state.features(event), batch.loc[event.index], fs.categorical)
        state.ingest(todays)


def test_exact_value_rates_count_only_outcomes_known_before(data):
    """seen_/risk_ of exact declared values = earlier same-value declarations whose outcome was already known."""
    decl, cases = data
    delay = pd.Timedelta(days=3)
    fs = feature_set(3)
    feats = fs.build(decl, cases)
    price, mass, hs6 = decl["item_price"].to_numpy(), decl["net_mass"].to_numpy(), decl["hs6"].astype(str).to_numpy()
    known = (decl["date"] + delay).to_numpy()
    fraud = decl["fraud"].to_numpy(float)
    keys = {"price": lambda i: price == price[i], "hs6_price": lambda i: (price == price[i]) & (hs6 == hs6[i]),
            "price_mass": lambda i: (price == price[i]) & (mass == mass[i])}
    assert feats["seen_price"].gt(0).sum() > 100  # the fixture repeats prices: the path is exercised
    rng = np.random.default_rng(0)
    for i in rng.choice(len(decl), 150, replace=False):
        before = known < decl["date"].to_numpy()[i]
        for name, same in keys.items():
            hit = same(i) & before
            assert feats[f"seen_{name}"].iloc[i] == hit.sum(), (name, i)
            expected = (fraud[hit].sum() + PRIOR * 2) / (hit.sum() + 2)
            assert feats[f"risk_{name}"].iloc[i] == pytest.approx(expected), (name, i)


def test_smoothed_rates_use_a_fixed_prior(data):
    """Without any history a rate is the fixed prior, whatever happened elsewhere before."""
    decl, cases = data
    feats = feature_set(3).build(decl, cases)
    unseen = feats["seen_price"].eq(0)
    assert unseen.any() and feats.loc[unseen, "risk_price"].eq(PRIOR).all()
    late_new = feats["declarant_label_rate"].notna() & (decl["date"] > decl["date"].quantile(0.5))
    first = ~decl.duplicated("declarant_id")
    assert feats.loc[late_new & first, "declarant_label_rate"].eq(PRIOR).all()


def test_negative_label_delay_is_refused(tmp_path):
    """A negative delay would show an event its own label (outcomes known before the event happened)."""
    from click.testing import CliRunner

    from features.domains import feature_set
    from riskscore.cli import cli

    with pytest.raises(ValueError, match="label delay must be >= 0"):
        feature_set("customs", -1.0)
    assert feature_set("customs", 0.0).label_delay == pd.Timedelta(0)
    result = CliRunner().invoke(cli, ["train", "--domain", "customs", "--data", str(tmp_path),
                                      "--label-delay-days", "-1"])
    assert result.exit_code == 2 and "--label-delay-days" in result.output


def test_an_outcome_is_never_seen_by_its_own_declaration(tmp_path):
    """Customs dates are midnight UTC; a decision a few hours into that day in an office east of UTC carries an
    earlier UTC time. Its case closed before the declaration, so the declaration's own case features counted its
    own outcome (reviewer cases), and cases derived from labels closed at date + delay even when the label was
    decided later (``label_known_at``). Both now close no earlier than the outcome could be known."""
    import datetime as dt

    from bench.common import api_items
    from features.datasets import derive_cases
    from serving.audit import AuditStore

    events = declarations(100, seed=5)
    own = events.iloc[[-1]].copy()
    own["importer_id"] = pd.array(["IMX"], dtype="string")
    own["fraud"] = pd.array([pd.NA], dtype="Int8")
    day = own["date"].iloc[0].to_pydatetime()
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}")
    request = {"request_id": "r1", "created_at": day - dt.timedelta(hours=2), "domain": "customs",
               "caller_key_id": "k1", "agency": "A", "idempotency_key": None, "body_sha256": "0" * 64, "items": 1}
    store.record_scores(request, [{
        "score_id": "s1", "request_id": "r1", "item_index": 0, "created_at": day - dt.timedelta(hours=2),
        "domain": "customs", "event_id": own["declaration_id"].iloc[0], "caller_key_id": "k1", "agency": "A",
        "model_name": "m", "model_version": "1", "input_json": api_items("customs", own)[0], "features_json": {},
        "score": 0.9, "band": "high", "flagged": True, "threshold": 0.5, "explanation_json": {}}], {})
    store.record_outcome("s1", "confirmed", None, "k1", "A", decided_at=day - dt.timedelta(hours=1))
    reviewer = store.replay("customs").cases
    store.close()
    assert (reviewer["closed_at"] == pd.Timestamp(day)).all()
    fs = feature_set(0.0)
    f = fs.build(own, reviewer)
    assert f["importer_confirmed_cases_90d"].iloc[0] == 0 and f["importer_fraud_rate"].iloc[0] == pytest.approx(PRIOR)

    first = own.assign(declaration_id=pd.array(["K0"], dtype="string"), fraud=pd.array([1], dtype="Int8"))
    later = own.assign(declaration_id=pd.array(["K1"], dtype="string"), date=own["date"] + pd.Timedelta(days=4))
    both = pd.concat([first, later], ignore_index=True)
    both["label_known_at"] = [own["date"].iloc[0] + pd.Timedelta(days=19), pd.NaT]  # decided after K1
    f = fs.build(both, derive_cases("customs", both, 0.0))
    assert f["importer_label_rate"].iloc[1] == pytest.approx(PRIOR)  # the label waits for its decision ...
    assert f["importer_confirmed_cases_90d"].iloc[1] == 0  # ... and now so does its case
    assert f["importer_fraud_rate"].iloc[1] == pytest.approx(PRIOR)


def test_unit_price_is_per_kg_and_zero_values_carry_no_price_signal():
    """The unit price was log1p(price) - log1p(mass): far from log(price / kg) below a few kg (7% of the public
    declarations) and finite at zero mass, so a zero-mass row looked 11 times overvalued and shifted the HS6 norm
    for the rows after it. And every zero price shared one exact-value key, a "repeated consignment" across
    importers and goods. Now the unit price is missing without a positive price and mass, norms hold only priced
    declarations, and a zero price has no exact-value key."""
    template = declarations(100, seed=7).iloc[[0]]

    def row(i: int, day: int, price: float, mass: float, **other) -> pd.DataFrame:
        out = template.assign(declaration_id=pd.array([f"U{i}"], dtype="string"), item_price=price, net_mass=mass,
                              date=pd.Timestamp("2021-01-01") + pd.Timedelta(days=day), fraud=pd.array([0], "Int8"))
        for col, value in other.items():
            out[col] = pd.array([value], dtype=out[col].dtype)
        return out

    frames = [row(i, 1, 1000.0, 10.0) for i in range(5)]
    frames += [row(5, 2, 1000.0, 0.0), row(6, 3, 1000.0, 10.0), row(7, 3, 1000.0, 0.5)]
    frames += [row(8 + i, 4, 0.0, 10.0, importer_id=f"Z{i}", hs6=f"{100000 + i}", fraud=1) for i in range(3)]
    frames += [row(11, 5, 0.0, 10.0, importer_id="Z9", hs6="199999")]
    events = pd.concat(frames, ignore_index=True)
    f = feature_set(0.0).build(events)
    assert np.isnan(f["log_unit_price"].iloc[5]) and np.isnan(f["unit_price_z_hs6"].iloc[5])  # zero mass
    assert f["log_unit_price"].iloc[6] == pytest.approx(np.log(100.0))
    assert f["unit_price_dev_hs6"].iloc[6] == pytest.approx(0.0) and f["unit_price_z_hs6"].iloc[6] == pytest.approx(0)
    assert f["log_unit_price"].iloc[7] == pytest.approx(np.log(2000.0))  # 0.5 kg: price per kg, not log1p's
    assert f["seen_price"].iloc[11] == 0 and f["risk_price"].iloc[11] == pytest.approx(PRIOR)
    online = feature_set(0.0).online(events.iloc[:11])
    assert_same(online.features(events.iloc[[11]]), f.iloc[[11]], feature_set(0.0).categorical)
