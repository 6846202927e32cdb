"""Property tests (hypothesis) of the request models, JSON parsing, rate limits and the online feature code.

Whatever a client sends, parsing ends in a value or a :class:`RequestError` with a 4xx status and a message:
never another exception (which the service would turn into a 500). Valid but hostile values (extreme
amounts, unicode ids, far-apart dates) go through the feature code to finite-or-missing model inputs.
The same properties over HTTP, against a running server, are in ``tests/test_reliability.py``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from serving import auth
from serving.audit import events_frame, jsonable
from serving.models import (
    MAX_QUANTITY,
    MAX_YEAR,
    MIN_YEAR,
    OutcomeIn,
    RequestError,
    parse_batch,
    parse_json,
    parse_model,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

DECLARATION = {
    "declaration_id": "D1", "date": "2021-03-01", "office_id": "O1", "process_type": "P1", "import_type": "I1",
    "import_use": "U1", "payment_type": "Y1", "transport_mode": "M1", "declarant_id": "DC1", "importer_id": "IM1",
    "seller_id": "S1", "courier_id": None, "hs6": "392690", "country_departure": "CN", "country_origin": "CN",
    "tax_rate": 8.0, "tax_type": "T1", "origin_indicator": "G1", "net_mass": 12.5, "item_price": 1500.0,
}
TRANSFER = {
    "transaction_id": "X1", "timestamp": "2021-03-01T10:00:00Z", "source_account": "A1", "target_account": "A2",
    "amount": 9500.0, "currency": "EUR", "channel": "wire", "source_country": "NL", "target_country": "DE",
}
BASE = {"customs": DECLARATION, "finance": TRANSFER}

# hostile JSON values: NaN/inf never arrive as JSON (parse_json rejects the literals) but huge numbers do
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.just(1e308), st.just(-0.0), st.just(5e-324),
    st.text(max_size=80), st.just(""), st.just(" "), st.just("\x00"), st.just("\u202e\u0000"),
    st.just("ß" * 65), st.just("😀"), st.just("2021-02-30"), st.just("0001-01-01"), st.just("9999-12-31T23:59:59Z"),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=20)


def _assert_client_error(err: RequestError) -> None:
    assert 400 <= err.status < 500
    assert err.error and isinstance(err.error, str)
    for d in err.detail:
        assert set(d) == {"loc", "msg", "type"} and all(isinstance(v, str) and v for v in d.values())
    json.dumps(err.body(), allow_nan=False)  # the error body itself is plain JSON


@SETTINGS
@given(body=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass"))))
def test_parse_json_never_raises_anything_but_400(body: bytes):
    try:
        parse_json(body)
    except RequestError as err:
        assert err.status == 400
        _assert_client_error(err)


@pytest.mark.parametrize("depth", [64, 5_000, 200_000])
def test_deeply_nested_json_is_a_400_or_a_validation_error(depth: int):
    body = b'{"items": ' + b"[" * depth + b"]" * depth + b"}"
    try:
        parse_batch("customs", parse_json(body))
    except RequestError as err:
        _assert_client_error(err)
    else:  # pragma: no cover
        pytest.fail("a nested list is not a batch")


@pytest.mark.parametrize("domain", ["customs", "finance"])
@SETTINGS
@given(payload=json_values)
def test_arbitrary_json_bodies_are_4xx(domain: str, payload):
    with pytest.raises(RequestError) as err:
        parse_batch(domain, payload)
    _assert_client_error(err.value)


@pytest.mark.parametrize("domain", ["customs", "finance"])
@SETTINGS
@given(data=st.data())
def test_one_hostile_field_is_either_valid_or_a_422_at_that_field(domain: str, data):
    item = dict(BASE[domain])
    field = data.draw(st.sampled_from(sorted(item)), label="field")
    value = data.draw(json_values, label="value")
    item[field] = value
    try:
        (parsed,) = parse_batch(domain, {"items": [item]})
    except RequestError as err:
        assert err.status == 422
        _assert_client_error(err)
        assert f"items.0.{field}" in [d["loc"] for d in err.detail], err.detail
        return
    dumped = parsed.model_dump(mode="json")
    json.dumps(dumped, allow_nan=False)  # what the audit store and the response carry
    for key, v in dumped.items():
        if isinstance(v, float):
            assert math.isfinite(v) and v >= 0, key
        if isinstance(v, str):
            assert v == v.strip() and not any(ord(c) < 32 for c in v), key


@SETTINGS
@given(extra=st.dictionaries(st.text(min_size=1, max_size=10), scalars, min_size=1, max_size=3))
def test_unknown_fields_are_rejected_by_name(extra: dict):
    assume(not set(extra) & set(TRANSFER))
    with pytest.raises(RequestError) as err:
        parse_batch("finance", {"items": [{**TRANSFER, **extra}]})
    assert {f"items.0.{k}" for k in extra} <= {d["loc"] for d in err.value.detail}


@pytest.mark.parametrize("n", [1001, 50_000])
def test_huge_batches_are_refused_before_validation(n: int):
    with pytest.raises(RequestError) as err:
        parse_batch("finance", {"items": [TRANSFER] * n})
    assert err.value.status == 422 and "at most 1000 items" in err.value.detail[0]["msg"]


@SETTINGS
@given(payload=json_values | st.fixed_dictionaries({"score_id": scalars, "outcome": scalars, "note": scalars}))
def test_outcome_bodies_are_valid_or_4xx(payload):
    try:
        body = parse_model(OutcomeIn, payload)
    except RequestError as err:
        _assert_client_error(err)
    else:
        assert body.outcome in ("confirmed", "cleared") and body.score_id.strip()


# ---------------------------------------------------------------------------------------------- feature code

codes = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=64).filter(
    lambda s: s.strip() != "")
amounts = st.one_of(st.floats(min_value=0, max_value=MAX_QUANTITY, allow_nan=False, allow_infinity=False),
                    st.sampled_from([0.0, 5e-324, 1e-300, 9999.99, MAX_QUANTITY]))  # the largest accepted
days = st.dates(min_value=pd.Timestamp(f"{MIN_YEAR}-01-01").date(), max_value=pd.Timestamp(f"{MAX_YEAR}-12-31").date())


@st.composite
def declarations(draw, n=3):
    out = []
    for i in range(draw(st.integers(1, n))):
        item = dict(DECLARATION, declaration_id=f"H{i}-{draw(codes)}"[:64], importer_id=draw(codes),
                    declarant_id=draw(codes), seller_id=draw(st.none() | codes), office_id=draw(codes),
                    date=draw(days).isoformat(), item_price=draw(amounts), net_mass=draw(amounts),
                    tax_rate=draw(amounts))
        out.append(item)
    return out


@st.composite
def transfers(draw, n=3):
    out = []
    for i in range(draw(st.integers(1, n))):
        when = pd.Timestamp(draw(days)) + pd.Timedelta(seconds=draw(st.integers(0, 86_399)))
        out.append(dict(TRANSFER, transaction_id=f"H{i}-{draw(codes)}"[:64], source_account=draw(codes),
                        target_account=draw(codes), amount=draw(amounts.filter(lambda a: a > 0)),
                        timestamp=when.isoformat() + "Z", channel=draw(codes)))
    return out


@pytest.fixture(scope="module")
def online_states():
    from features.domains import feature_set
    from tests.customs_data import cases_from
    from tests.customs_data import declarations as history

    decl = history(400, seed=3)
    customs = feature_set("customs")
    return {"customs": (customs, customs.online(decl, cases_from(decl))),
            "finance": (feature_set("finance"), feature_set("finance").online())}


def _features(fs, online, items_frame: pd.DataFrame) -> pd.DataFrame:
    parts = [online.features(group) for _, group in items_frame.groupby(fs.time_col, sort=True)]
    return pd.concat(parts).loc[items_frame.index]


@pytest.mark.parametrize("domain", ["customs", "finance"])
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_hostile_valid_items_give_finite_or_missing_features(domain: str, data, online_states):
    from training.bundle import model_matrix

    fs, online = online_states[domain]
    items = data.draw(declarations() if domain == "customs" else transfers(), label="items")
    rows = [i.model_dump(mode="json") for i in parse_batch(domain, {"items": items})]
    feats = _features(fs, online, events_frame(domain, rows))
    assert list(feats.columns) == fs.names and len(feats) == len(rows)
    categorical = {c: sorted(feats[c].dropna().astype(str).unique()) for c in fs.categorical}
    X = model_matrix(feats, fs.names, categorical)
    numeric_cols = [c for c in fs.names if c not in categorical]
    infinite = np.isinf(X[numeric_cols].to_numpy(np.float64)).any(axis=0)
    assert not infinite.any(), [c for c, bad in zip(numeric_cols, infinite, strict=True) if bad]
    json.dumps(jsonable(feats.to_dict(orient="records")), allow_nan=False)  # the audit row stays plain JSON


@pytest.mark.parametrize("domain", ["customs", "finance"])
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_service_path_equals_pandas_reference(domain: str, data, online_states):
    """The service's path (validated items -> plain columns -> :mod:`serving.fast_path`) gives the features of
    the pandas reference: contract frame, ``OnlineFeatures.features`` per distinct time, then ``ingest``."""
    import copy

    from serving.fast_path import feature_columns_in_time_order
    from serving.models import item_columns

    fs, online = online_states[domain]
    items = parse_batch(domain, {"items": data.draw(declarations() if domain == "customs" else transfers())})
    frame = events_frame(domain, [i.model_dump(mode="json") for i in items])
    reference, parts = copy.deepcopy(online), []
    for _, group in frame.groupby(fs.time_col, sort=True):
        parts.append(reference.features(group))
        reference.ingest(group)
    expected = pd.concat(parts).loc[frame.index]
    served = feature_columns_in_time_order(copy.deepcopy(online), item_columns(domain, items))
    for name in fs.names:
        got, want = served[name], expected[name].to_numpy()
        if name in fs.categorical:
            assert list(got) == list(want), name
        else:
            np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64), err_msg=name)


class _PandasOnlySpec:
    """A spec whose online executor has no plain-column ingest (only ``ingest(frame)``), like a user's own."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.source, self.qkeys = inner.name, inner.source, inner.qkeys

    def columns(self):
        return self.inner.columns()

    def batch(self, sources, query):
        return self.inner.batch(sources, query)

    def online(self, shared=None):
        ex = self.inner.online()  # its own state, not shared

        class Executor:
            ingest, query = ex.ingest, ex.query
        return Executor()


def test_service_path_ingests_executors_without_a_plain_column_path():
    """An executor with only a pandas ``ingest`` still gets the batch's rows on the service path (plain columns),
    and the features equal those of the built-in executors."""
    import dataclasses

    from features.domains import feature_set
    from serving.fast_path import feature_columns_in_time_order
    from serving.models import item_columns

    fs = feature_set("finance")
    custom = dataclasses.replace(fs, specs=[_PandasOnlySpec(s) if s.name.startswith(("src_out", "pair")) else s
                                            for s in fs.specs])
    raw = [dict(TRANSFER, transaction_id=f"P{i}", timestamp=f"2021-03-01T10:0{i}:00Z", amount=100.0 * (i + 1),
                source_account="A1" if i % 2 else "A2", target_account="A3") for i in range(6)]
    items = parse_batch("finance", {"items": raw})
    expected = feature_columns_in_time_order(fs.online(), item_columns("finance", items))
    got = feature_columns_in_time_order(custom.online(), item_columns("finance", items))
    assert expected["src_out_count"].tolist() == [0, 0, 1, 1, 2, 2]  # later items see earlier ones
    for name in fs.names:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(expected[name]), err_msg=name)


# ---------------------------------------------------------------------------------------------- rate limits


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@SETTINGS
@given(rate=st.floats(0.1, 1000), burst=st.integers(1, 50), steps=st.lists(st.floats(0, 5), max_size=40))
def test_token_bucket_never_exceeds_rate_plus_burst(rate: float, burst: int, steps: list[float]):
    clock = FakeClock()
    limiter = auth.RateLimiter(rate=rate, burst=burst, clock=clock)
    caller = auth.Caller("k1", "customs", "A")
    allowed, start = 0, clock.now
    for step in [0.0, *steps]:
        clock.now += step
        for _ in range(3):
            try:
                limiter.take(caller)
                allowed += 1
            except auth.AuthError as err:
                assert err.status == 429 and err.retry_after >= 1 and "rate limit" in str(err)
    assert allowed <= burst + rate * (clock.now - start) + 1e-9
    other = auth.Caller("k2", "customs", "A")  # buckets are per key
    limiter.take(other)


@SETTINGS
@given(rate=st.floats(0.1, 100), burst=st.integers(1, 20),
       steps=st.lists(st.tuples(st.integers(0, 2), st.floats(0, 2)), max_size=60))
@example(rate=0.1, burst=2, steps=[(0, 0.0), (1, 0.0), (2, 0.0), (0, 0.5), (1, 0.1), (2, 0.1)])
def test_shared_buckets_hold_the_limit_across_processes(rate: float, burst: int, steps: list[tuple[int, float]]):
    """Three workers, each charging the others' accepted requests before it checks one of its own (what
    serving.usage does): together they never accept more than one bucket would."""
    clock = FakeClock()
    workers = [auth.RateLimiter(rate=rate, burst=burst, clock=clock) for _ in range(3)]
    caller = auth.Caller("k1", "financial", "A")
    accepted: list[tuple[int, float]] = []  # (worker, time)
    seen = [0, 0, 0]  # how much of ``accepted`` each worker has charged
    start = clock.now
    for worker, step in steps:
        clock.now += step
        for who, at in accepted[seen[worker]:]:
            if who != worker:
                workers[worker].charge(caller, at)
        seen[worker] = len(accepted)
        try:
            workers[worker].take(caller)
            accepted.append((worker, clock.now))
        except auth.AuthError as err:
            assert err.status == 429 and err.retry_after >= 1
    assert len(accepted) <= burst + rate * (clock.now - start) + 1e-6


def test_charges_of_requests_made_long_ago_are_refilled():
    """An idle worker learning of another's earlier requests charges them at the time they were made: a key that
    stayed under its rate overall is not refused."""
    clock = FakeClock()
    limiter = auth.RateLimiter(rate=1, burst=5, clock=clock)
    caller = auth.Caller("k", "financial", "A")
    for i in range(5):  # five requests 10..6 s ago through another worker: under 1/s overall
        limiter.charge(caller, clock.now - 10 + i)
    limiter.take(caller)
    for _ in range(5):  # five just now elsewhere: the bucket is empty
        limiter.charge(caller, clock.now)
    with pytest.raises(auth.AuthError) as err:
        limiter.take(caller)
    assert err.value.status == 429
    limiter.charge(caller, clock.now + 60)  # a clock ahead of this one: charged now, not in the future
    clock.now += 3.5  # -2 tokens + 3.5 refilled
    limiter.take(caller)
    unlimited = auth.Caller("u", "admin", "A", rate=0)
    limiter.charge(unlimited, clock.now)
    limiter.take(unlimited)


def test_rate_limit_from_env_and_per_key_override(monkeypatch):
    monkeypatch.setenv("RISKSCORE_RATE_LIMIT", "2")
    monkeypatch.setenv("RISKSCORE_RATE_BURST", "3")
    clock = FakeClock()
    limiter = auth.RateLimiter(clock=clock)
    caller = auth.Caller("k", "customs", "A")
    for _ in range(3):
        limiter.take(caller)
    with pytest.raises(auth.AuthError) as err:
        limiter.take(caller)
    assert err.value.status == 429 and err.value.retry_after == 1
    clock.now += 0.5
    limiter.take(caller)  # one token back after 1/rate seconds
    unlimited = auth.Caller("u", "admin", "A", rate=0)
    for _ in range(100):
        limiter.take(unlimited)
    monkeypatch.setenv("RISKSCORE_RATE_LIMIT", "fast")
    with pytest.raises(ValueError, match="RISKSCORE_RATE_LIMIT"):
        auth.RateLimiter()
    with pytest.raises(ValueError, match="rate"):
        auth.KeyEntry(sha256="0" * 64, role="admin", agency="A", rate=-1)


@SETTINGS
@given(presented=st.text(max_size=80))
def test_unknown_keys_are_401_and_every_entry_is_compared(presented: str):
    key = "rsk_known"
    entries = [auth.KeyEntry(sha256=auth.hash_key(key), role="reviewer", agency="A"),
               auth.KeyEntry(sha256=auth.hash_key(key + "2"), role="admin", agency="B")]
    store = auth.KeyStore(entries, "test")
    calls = []
    original = auth.hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return original(a, b)

    auth.hmac.compare_digest = counting
    try:
        if presented in (key, key + "2"):
            assert store.authenticate(presented).key_id
        else:
            with pytest.raises(auth.AuthError) as err:
                store.authenticate(presented)
            assert err.value.status == 401 and str(err.value).split(":")[0] in ("invalid API key", "missing API key")
    finally:
        auth.hmac.compare_digest = original
    assert len(calls) in (0, len(entries))  # 0 only for an empty key (rejected before hashing)
