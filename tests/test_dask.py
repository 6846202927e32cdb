"""Scale-out on Dask: the Dask feature path equals the pandas one exactly; DaskLGBMClassifier is as good.

A 2-worker ``LocalCluster`` (worker processes, as LightGBM's network needs one per worker) runs for the module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("dask.dataframe")
pytest.importorskip("distributed")
pytest.importorskip("lightgbm.dask")

import dask
import dask.dataframe as dd
from distributed import Client, LocalCluster

from features import dask_engine
from features.datasets import load_dataset
from features.domains import events_of, feature_set
from features.synthetic import generate
from training.dask_train import best_iteration, fit_lgbm_dask
from training.lgbm import LGBMConfig, fit_lgbm
from training.metrics import safe_auc
from training.pipeline import TrainConfig, _labels, load_training_data, make_split, train

TIMEOUT = 120  # seconds for any one computation on the cluster
FAST = LGBMConfig(learning_rate=0.1, num_leaves=31, max_bin=255, num_boost_round=300, early_stopping_rounds=30)


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      timeout=TIMEOUT) as cluster, Client(cluster, timeout=TIMEOUT) as c:
        yield c


def _data(domain: str, rows: int, seed: int, out: Path):
    data = load_dataset(domain, generate(domain, rows, seed=seed, out_dir=out, positive_rate=0.1, progress=False),
                        None)
    return data, events_of(data)


@pytest.fixture(scope="module")
def finance(tmp_path_factory):
    return _data("finance", 4000, 5, tmp_path_factory.mktemp("finance"))


@pytest.fixture(scope="module")
def customs(tmp_path_factory):
    return _data("customs", 3000, 6, tmp_path_factory.mktemp("customs"))


@pytest.mark.parametrize(("domain", "mode", "time_parts"), [
    ("finance", "hybrid", 3),  # entity specs by key buckets, graph specs (cycles, links) by 3 time parts
    ("customs", "hybrid", 1),
    ("customs", "time", 2),  # every spec by time parts
])
def test_dask_features_equal_pandas(request, client, domain, mode, time_parts):
    data, events = request.getfixturevalue(domain)
    fs = feature_set(domain)
    expected = fs.build(events, data.cases)
    got = dask_engine.build(fs, events, data.cases, partitions=3, buckets=4, time_parts=time_parts, mode=mode,
                            client=client, timeout=TIMEOUT)
    pd.testing.assert_frame_equal(got, expected, check_exact=True)


def test_dask_self_transfers_equal_pandas(client, finance):
    """Self-transfers are in no history (features/finance.py): the Dask sources drop them as pandas does."""
    data, events = finance
    events = events.copy()
    own = np.arange(len(events)) % 10 == 3
    events.loc[own, "target_account"] = events.loc[own, "source_account"]
    fs = feature_set("finance")
    expected = fs.build(events, data.cases)
    got = dask_engine.build(fs, events, data.cases, partitions=3, buckets=4, time_parts=2, client=client,
                            timeout=TIMEOUT)
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    assert expected.loc[own, "self_transfer"].eq(1).all()


def test_dask_input_frame_and_shuffled_index(client, finance):
    """A dask.dataframe input (any index) gives the pandas features of the same rows in the same order."""
    data, events = finance
    fs = feature_set("finance")
    events = events.set_axis(np.arange(len(events))[::-1] * 7)  # index values carry no meaning
    expected = fs.build(events, data.cases)
    ddf = dd.from_pandas(events, npartitions=4, sort=False)
    got = dask_engine.build(fs, ddf, data.cases, buckets=3, client=client, timeout=TIMEOUT)
    pd.testing.assert_frame_equal(got, expected.reset_index(drop=True), check_exact=True)


def test_time_parts_cut_the_history(finance, monkeypatch):
    """time_parts > 1 really runs several parts, each with a different history (not a one-part tautology)."""
    data, events = finance
    calls = []

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(len(out))
        return out

    real = dask_engine._time_task
    monkeypatch.setattr(dask_engine, "_time_task", spy)
    with dask.config.set(scheduler="sync"):
        got = dask_engine.build(feature_set("finance"), events.iloc[:1500], data.cases, partitions=2, time_parts=3)
    assert len(calls) == 3 and all(n > 0 for n in calls) and sum(calls) == len(got) == 1500


def test_negative_zero_keys_land_in_one_bucket(customs):
    """0.0 and -0.0 are one key for pandas' grouping; the Dask shuffle must bucket them together too."""
    data, events = customs
    events = events.copy()
    events.loc[events.index[:150:2], "item_price"] = 0.0
    events.loc[events.index[1:150:2], "item_price"] = -0.0
    fs = feature_set("customs")
    with dask.config.set(scheduler="sync"):
        got = dask_engine.build(fs, events, data.cases, partitions=3, buckets=4)
    pd.testing.assert_frame_equal(got, fs.build(events, data.cases), check_dtype=False)


def test_best_iteration_sums_tree_ranges(finance):
    """Tree-range predictions add up to the full margin (how the best iteration is chosen on the client)."""
    import lightgbm as lgb

    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(500, 4)), columns=list("abcd"))
    y = (X["a"] + rng.normal(size=500) > 1).astype(float)
    booster = lgb.train({"objective": "binary", "verbosity": -1, "num_threads": 1}, lgb.Dataset(X, y), 35)
    best, ap = best_iteration(booster, X, y.to_numpy(), step=10)
    assert best in (10, 20, 30, 35) and 0.0 < ap <= 1.0
    full = sum(booster.predict(X, raw_score=True, start_iteration=s, num_iteration=min(10, 35 - s))
               for s in range(0, 35, 10))
    np.testing.assert_allclose(full, booster.predict(X, raw_score=True), rtol=0, atol=1e-9)


@pytest.fixture(scope="module")
def finance_dir(tmp_path_factory) -> Path:
    return generate("finance", 20_000, seed=11, out_dir=tmp_path_factory.mktemp("finance_train"), positive_rate=0.1,
                    progress=False)


def test_training_data_goes_to_the_workers_once_not_through_the_graph(client):
    """Each worker gets one contiguous block, scattered to it; the task graph LightGBM's fit submits only refers to
    them (the matrix used to travel inside it, through the scheduler, on every fit of a search)."""
    import pickle

    from training.dask_train import _to_dask

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(20_000, 20)), columns=[f"f{i}" for i in range(20)])
    X, y = _to_dask(client, frame, (rng.random(20_000) < 0.1).astype(float))
    assert len(pickle.dumps(dict(X.__dask_graph__()))) < 10_000 < frame.memory_usage().sum()
    workers = sorted(client.scheduler_info()["workers"])
    blocks = X.to_delayed()
    assert len(blocks) == len(workers) == 2
    pd.testing.assert_frame_equal(pd.concat(client.compute(blocks, sync=True)), frame)
    assert np.array_equal(pd.concat(client.compute(y.to_delayed(), sync=True)).index, frame.index)
    held = {next(iter(w)) for w in client.who_has().values() if w}
    assert held <= set(workers)


def test_dask_lgbm_quality_matches_pandas(client, finance_dir):
    config = TrainConfig(seed=0, quiet=True, lgbm=FAST)
    fs = feature_set("finance")
    data = load_training_data("finance", finance_dir, config)
    features = dask_engine.build(fs, data.events, data.cases, client=client, timeout=TIMEOUT)
    split = make_split(data, fs, config)
    y = _labels(data.events, fs).to_numpy(float)
    X = {w: features.iloc[p] for w, p in split.windows.items()}
    Y = {w: y[p] for w, p in split.windows.items()}
    local = fit_lgbm(X["train"], Y["train"], X["validation"], Y["validation"], fs.categorical, FAST)
    dist = fit_lgbm_dask(X["train"], Y["train"], X["validation"], Y["validation"], fs.categorical, FAST,
                         client=client, max_rounds=300)
    assert dist.params["engine"] == "dask" and 0 < dist.best_iteration <= 300
    assert dist.booster.current_iteration() == dist.best_iteration
    _, pr_local = safe_auc(Y["test"], local.raw_margin(X["test"]))
    _, pr_dask = safe_auc(Y["test"], dist.raw_margin(X["test"]))
    assert pr_dask > 0.3, pr_dask  # far above the ~0.1 base rate
    assert abs(pr_dask - pr_local) < 0.05, (pr_local, pr_dask)


def test_train_engine_dask_end_to_end(client, finance_dir):
    """``train(engine="dask")`` gives the same features and a ModelBundle that scores like the pandas one."""
    base = TrainConfig(seed=0, quiet=True, lgbm=FAST, track=False, register=False)
    pandas_run = train("finance", finance_dir, config=base)
    dask_run = train("finance", finance_dir, config=TrainConfig(**{**base.__dict__, "engine": "dask",
                                                                   "scheduler": client.scheduler.address}))
    pd.testing.assert_frame_equal(dask_run.features, pandas_run.features, check_exact=True)
    X, _ = dask_run.window("test")
    scores = dask_run.bundle.predict(X)
    assert scores.shape == (len(X),) and np.all((scores >= 0) & (scores <= 1))
    pr = {name: r.metrics["full"]["test"]["pr_auc"] for name, r in (("pandas", pandas_run), ("dask", dask_run))}
    assert abs(pr["dask"] - pr["pandas"]) < 0.05, pr


def test_training_gives_up_when_every_worker_left():
    """Dask keeps a task that no worker can run waiting for one for ever: a training whose workers all left hung.
    Now the block's computations are cancelled after the grace period without workers and it fails with one
    line; the client's other work is left alone, and a block that completes is never failed."""
    import time

    from training.dask_train import DaskClusterError, workers_required

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      timeout=TIMEOUT) as cluster, Client(cluster, timeout=TIMEOUT, set_as_default=False) as c:
        other = c.submit(time.sleep, 600, pure=False)  # the caller's own work, started before
        with workers_required(c, grace=1.0, every=0.2):  # workers present: nothing happens
            c.wait_for_workers(1, timeout=TIMEOUT)
            time.sleep(1.0)
        started = time.monotonic()
        with pytest.raises(DaskClusterError, match=r"every Dask worker left the cluster; gave up after 1s"), \
                workers_required(c, grace=1.0, every=0.2):
            future = c.submit(time.sleep, 600, pure=False)
            cluster.scale(0)
            future.result(timeout=TIMEOUT)
        assert time.monotonic() - started < TIMEOUT / 2
        assert future.status == "cancelled" and other.status == "pending"
        with workers_required(c, grace=0.2, every=0.1):  # no workers, but nothing waits on them: completes
            time.sleep(1.0)
