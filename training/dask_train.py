"""LightGBM on a Dask cluster (``lightgbm.dask.DaskLGBMClassifier``), returning the same :class:`LGBMModel`.

``riskscore train --engine dask [--scheduler tcp://host:8786]`` builds the features with
:mod:`features.dask_engine` and trains the full LightGBM model data-parallel on the cluster's workers. The
trained booster (``booster_``, i.e. the model of ``to_local()``) is trimmed to its best iteration and wrapped
in the :class:`~training.lgbm.LGBMModel` the pandas path produces, so calibration, threshold, SHAP, MLflow
logging, the model bundle and the registry are unchanged.

Early stopping: LightGBM's early-stopping callback would stop each Dask worker on its *local* share of the
validation data, at possibly different iterations (a distributed deadlock). Instead the model trains a fixed
budget of ``min(num_boost_round, max_rounds)`` trees and the best iteration is chosen on the client from the
validation window (average precision after every ``step`` trees, accumulated from tree-range predictions),
which is what early stopping selects, minus the stop.

Categoricals use the train window's levels (:func:`training.bundle.model_matrix`), exactly as in the pandas
path. Distributed tree learning (``tree_learner="data"``) is not bit-identical to single-machine training;
``tests/test_dask.py`` checks the quality is equivalent.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
import warnings
from dataclasses import asdict

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

from training.bundle import model_matrix
from training.lgbm import LGBMConfig, LGBMModel, categorical_levels, sample_config

MAX_ROUNDS = 1000  # tree budget of a distributed fit (no early stopping across workers)
STEP = 10  # best iteration chosen on a grid of this many trees
_OWNED: list = []  # clusters/clients started here, closed at exit


CONNECT_TIMEOUT_S = 30.0  # longest wait for a scheduler to answer (and for its workers to report)
WORKERS_GONE_S = 60.0  # how long a computation waits for workers once every worker has left the cluster


class DaskClusterError(RuntimeError):
    """The Dask cluster cannot be used: no scheduler answers, or its workers cannot run the project."""


def connect(scheduler: str | None = None, n_workers: int = 2, threads_per_worker: int = 1,
            timeout: float = CONNECT_TIMEOUT_S):
    """A ``distributed.Client``: to ``scheduler`` (``tcp://host:8786``), else the current default client, else a
    ``LocalCluster`` of ``n_workers`` processes started in-process (closed when the process exits).

    A scheduler must answer within ``timeout`` seconds (an address that accepts connections but does not speak
    Dask's protocol, such as its dashboard, hangs the client otherwise) and its workers must import this project
    with the same versions of it and of LightGBM (:func:`check_workers`); else :class:`DaskClusterError`.
    """
    from distributed import Client, LocalCluster, default_client

    try:
        client = default_client()
        if scheduler is None or client.scheduler.address == scheduler:
            return client
    except ValueError:
        pass
    if scheduler:
        client = _within(timeout, lambda: Client(scheduler, timeout=timeout),
                         f"no Dask scheduler answered at {scheduler} within {timeout:g}s")
        _OWNED.insert(0, client)
        check_workers(client, timeout)
    else:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                               dashboard_address=None)
        _OWNED.append(cluster)
        client = Client(cluster)
        _OWNED.insert(0, client)
    return client


def _within(timeout: float, make, message: str):
    """``make()`` in a daemon thread, waited for at most ``timeout`` seconds (a hung connect is left behind)."""
    done: dict = {}

    def run() -> None:
        try:
            done["value"] = make()
        except BaseException as err:  # handed to the caller
            done["error"] = err

    thread = threading.Thread(target=run, name="riskscore-dask-connect", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    if "error" in done:
        raise DaskClusterError(f"{message}: {done['error']}") from done["error"]
    if "value" not in done:
        raise DaskClusterError(message)
    return done["value"]


@contextlib.contextmanager
def workers_required(client, grace: float = WORKERS_GONE_S, every: float = 1.0):
    """Run the block on ``client``'s cluster, giving up when it has had no workers for ``grace`` seconds.

    Dask keeps tasks that no worker can run waiting for one for ever, so a training whose workers all left
    (a cluster shut down, workers killed) would hang. A daemon thread asks the scheduler for its workers every
    ``every`` seconds; after ``grace`` seconds without any (or without an answer), it cancels the computations the
    block started (not the client's others) and the block's failure becomes :class:`DaskClusterError`. Workers
    that come back in time are waited for; a block that completes is never failed.
    """
    from distributed import Future

    before = set(client.futures)
    stop, gone = threading.Event(), threading.Event()

    def watch() -> None:
        since = None
        while not stop.wait(every):
            try:
                workers = len(client.scheduler_info()["workers"])
            except Exception:  # the scheduler does not answer either
                workers = 0
            if workers:
                since = None
                continue
            since = since or time.monotonic()
            if time.monotonic() - since >= grace:
                gone.set()
                with contextlib.suppress(Exception):
                    client.cancel([Future(key, client) for key in set(client.futures) - before])
                return

    thread = threading.Thread(target=watch, name="riskscore-dask-workers", daemon=True)
    thread.start()
    try:
        yield
    except Exception as err:
        stop.set()
        thread.join(every + CONNECT_TIMEOUT_S)
        if gone.is_set():
            raise DaskClusterError(f"every Dask worker left the cluster; gave up after {grace:g}s without "
                                   "workers") from err
        raise
    finally:
        stop.set()


def _worker_versions() -> dict[str, str]:
    """Run on each worker: import what the Dask path runs there and report the versions that must match."""
    import importlib
    from importlib.metadata import version

    for module in ("features.dask_engine", "training.dask_train"):
        importlib.import_module(module)
    return {"riskscore": version("riskscore"), "lightgbm": version("lightgbm")}


def check_workers(client, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """:class:`DaskClusterError` unless the cluster has workers that import this project with the versions of this
    process (the features and LightGBM's network run there)."""
    try:
        client.wait_for_workers(1, timeout=timeout)
    except Exception as err:
        raise DaskClusterError(f"the Dask scheduler has no workers (waited {timeout:g}s)") from err
    found = client.run(_worker_versions, on_error="return")
    mine = _worker_versions()
    for worker, versions in sorted(found.items()):
        if isinstance(versions, BaseException):
            raise DaskClusterError(f"Dask worker {worker} cannot run riskscore ({type(versions).__name__}: "
                                   f"{versions}): install this project with its dask extra on every worker")
        if versions != mine:
            raise DaskClusterError(f"Dask worker {worker} has {versions}, this process {mine}: install the same "
                                   "versions on every worker")


@atexit.register
def _close() -> None:
    while _OWNED:
        with contextlib.suppress(Exception):  # already gone
            _OWNED.pop(0).close()


def _to_dask(client, frame: pd.DataFrame, y: np.ndarray):
    """``frame`` and ``y`` as Dask collections of one contiguous row block per worker, each scattered to its worker
    (workers by address): the data goes to the workers once, not through the scheduler inside the task graph
    (15.6 MiB of graph for 25,000 rows), and block *i* always lands on the *i*-th worker."""
    import dask.dataframe as dd

    workers = sorted(client.scheduler_info()["workers"])
    n = max(1, min(len(workers), len(frame)))
    bounds = np.linspace(0, len(frame), n + 1).astype(int)
    xs, ys = [], []
    for i in range(n):
        part = frame.iloc[bounds[i]:bounds[i + 1]]
        label = pd.Series(y[bounds[i]:bounds[i + 1]], index=part.index, name="label")
        where = [workers[i]] if workers else None
        xs.append(client.scatter(part, workers=where))
        ys.append(client.scatter(label, workers=where))
    return (dd.from_delayed(xs, meta=frame.iloc[:0], verify_meta=False),
            dd.from_delayed(ys, meta=pd.Series([], dtype=float, name="label"), verify_meta=False))


def best_iteration(booster: lgb.Booster, X_valid: pd.DataFrame, y_valid: np.ndarray, step: int = STEP):
    """(iteration, validation average precision) of the best prefix of ``booster`` on a grid of ``step`` trees."""
    total = booster.current_iteration()
    margin = np.zeros(len(X_valid))
    best, best_ap = total, -np.inf
    for start in range(0, total, step):
        k = min(step, total - start)
        margin += booster.predict(X_valid, raw_score=True, start_iteration=start, num_iteration=k)
        ap = float(average_precision_score(y_valid, margin)) if len(np.unique(y_valid)) > 1 else float("nan")
        if ap > best_ap:
            best, best_ap = start + k, ap
    return best, best_ap


def fit_lgbm_dask(
    X_train: pd.DataFrame, y_train, X_valid: pd.DataFrame, y_valid, categorical: list[str],
    config: LGBMConfig | None = None, *, client=None, max_rounds: int = MAX_ROUNDS, step: int = STEP,
) -> LGBMModel:
    """Like :func:`training.lgbm.fit_lgbm`, trained by ``DaskLGBMClassifier`` on ``client``'s workers."""
    from lightgbm.dask import DaskLGBMClassifier

    config = config or LGBMConfig()
    client = client or connect()
    names = list(X_train.columns)
    levels = categorical_levels(X_train, categorical)
    y_train = np.asarray(y_train, dtype=float)
    y_valid = np.asarray(y_valid, dtype=float)
    params = config.params(y_train)
    rounds = min(config.num_boost_round, max_rounds)
    local = {k: v for k, v in params.items() if k not in ("num_threads", "metric")}  # threads: per worker
    workers = max(1, len(client.scheduler_info()["workers"]))
    model = DaskLGBMClassifier(client=client, n_estimators=rounds, **local)
    with workers_required(client), warnings.catch_warnings():
        X, y = _to_dask(client, model_matrix(X_train, names, levels), y_train)
        # the sklearn wrapper always passes n_jobs, which lightgbm.dask then drops
        warnings.filterwarnings("ignore", message="Parameter n_jobs will be ignored", category=UserWarning)
        model.fit(X, y, categorical_feature=list(levels) or "auto")
    booster = model.booster_
    best, score = best_iteration(booster, model_matrix(X_valid, names, levels), y_valid, step)
    trimmed = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
    chosen = {**params, "engine": "dask", "dask_workers": workers, "n_estimators": rounds}
    return LGBMModel(booster=trimmed, feature_names=names, levels=levels, config=config, best_iteration=best,
                     valid_pr_auc=score, params=chosen)


def random_search_dask(
    X_train: pd.DataFrame, y_train, X_valid: pd.DataFrame, y_valid, categorical: list[str],
    base: LGBMConfig | None = None, *, trials: int = 0, seconds: float | None = None, client=None,
) -> tuple[LGBMModel, list[dict]]:
    """:func:`training.lgbm.random_search` with every fit on the cluster (same trial configurations)."""
    base = base or LGBMConfig()
    rng = np.random.default_rng(base.seed)
    start = time.monotonic()
    best = fit_lgbm_dask(X_train, y_train, X_valid, y_valid, categorical, base, client=client)
    log = [{"trial": 0, "valid_pr_auc": best.valid_pr_auc, "best_iteration": best.best_iteration, **asdict(base)}]
    for trial in range(1, trials + 1):
        if seconds is not None and time.monotonic() - start >= seconds:
            break
        config = sample_config(base, rng)
        model = fit_lgbm_dask(X_train, y_train, X_valid, y_valid, categorical, config, client=client)
        log.append({"trial": trial, "valid_pr_auc": model.valid_pr_auc, "best_iteration": model.best_iteration,
                    **asdict(config)})
        if model.valid_pr_auc > best.valid_pr_auc:
            best = model
    return best, log
