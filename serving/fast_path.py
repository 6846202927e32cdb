"""Scoring a batch without pandas per item: online features in time order, the model matrix, explanations.

The service's hot path (:meth:`serving.scorer.DomainScorer.score`); the benchmarks in ``bench/`` time it against
raw LightGBM. Everything here gives the same values as the pandas reference (``OnlineFeatures.features`` per
distinct time, ``ModelBundle.explain``): ``bench/quick.py`` and the tests check that parity.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.featureset import T_COL, Columns, OnlineFeatures

DEFAULT_TOP_N = 5


def _row_adder(feed, name: str, multi: bool) -> Callable:
    """``add(cols, rows, source)``: ingest rows ``rows`` of source ``name`` (plain columns ``cols``, the source
    frame ``source`` for targets without a plain-column path) into one ingest target (``OnlineFeatures.feeds``)."""
    from features.engine import DistinctHistory, KeyHistory
    from features.graph import OnlineConfirmedLinks, OnlineCycle, _missing

    if isinstance(feed, KeyHistory | DistinctHistory):
        return lambda cols, rows, _source: feed.ingest_columns(cols, rows)
    if isinstance(feed, OnlineCycle):
        return _edge_adder(feed.spec.edge, feed.add)
    if isinstance(feed, OnlineConfirmedLinks):
        if name == feed.spec.sources[1]:
            def add_cases(cols, rows, _source):
                ts = cols[T_COL]
                for i in rows:
                    key = cols[feed.spec.case_key][i]
                    if cols["confirmed"][i] > 0 and not _missing(key):
                        feed.add_case(key, int(ts[i]))
            return add_cases
        return _edge_adder(feed.spec.edge, feed.add_edge)
    # any other executor: its own (pandas) ingest, given the rows as a frame (the service passes plain columns)
    def add_frame(cols, rows, source):
        rows = list(rows)
        frame = (source.iloc[rows] if isinstance(source, pd.DataFrame)
                 else pd.DataFrame({c: [v[i] for i in rows] for c, v in cols.items()}))
        feed.ingest(frame, **({"source": name} if multi else {}))
    return add_frame


def _edge_adder(edge: tuple[str, str], add: Callable) -> Callable:
    """Ingest function of a graph executor: ``add(source, target, t)`` for each row's edge (no self-loops or
    missing ends)."""
    from features.graph import _missing

    s_col, d_col = edge

    def add_edges(cols, rows, _source):
        ts = cols[T_COL]
        for i in rows:
            s, d = cols[s_col][i], cols[d_col][i]
            if not (_missing(s) or _missing(d) or s == d):
                add(s, d, int(ts[i]))
    return add_edges


@dataclass
class _Plan:
    """What a batch does with one online state, worked out once per state: each spec's query (function, query
    key columns, output columns) and each source's ingest functions (one per ingest target, not per spec)."""

    queries: list[tuple[Callable, tuple[str, ...], list[str]]]
    adders: dict[str, list[Callable]]


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # OnlineFeatures -> _Plan


def _plan(online: OnlineFeatures) -> _Plan:
    plan = _PLANS.get(online)
    if plan is None:
        fs = online.fs
        queries = [(ex.query, tuple(spec.qkeys), list(spec.columns()))
                   for spec, ex in zip(fs.specs, online.executors, strict=True)]
        adders: dict[str, list[Callable]] = {}
        for names, multi, feed in online.feeds:
            for name in names:
                adders.setdefault(name, []).append(_row_adder(feed, name, multi))
        plan = _PLANS[online] = _Plan(queries, adders)
    return plan


def _prepared_and_ingest(online: OnlineFeatures, plan: _Plan, frame: Columns):
    """Row-wise columns of a batch and where its rows go: ``(prepared, arrays, as_list, ingest)``, ``ingest``
    holding per source (source row of each batch row (None = the same row), columns, source, adders)."""
    fs = online.fs
    if isinstance(frame, pd.DataFrame):
        if not frame.index.is_unique:
            frame = frame.reset_index(drop=True)
        prepared = fs.prepare(frame)
        arrays = {c: s.to_numpy() for c, s in prepared.items()}
    else:  # plain columns (serving.models.item_columns): no pandas per request
        prepared = arrays = fs.prepare_columns(frame)
    n = len(arrays[T_COL])
    plain: dict[str, list] = {}

    def as_list(col: str) -> list:
        if col not in plain:
            plain[col] = arrays[col].tolist()
        return plain[col]

    ingest = []
    for name, source in fs.sources(events=prepared, labels=None, cases=None).items():
        if source is None or not len(source) or name not in plan.adders:
            continue
        if source is prepared:
            pos = None  # row i of the batch is row i of the source
            src_cols = {c: as_list(c) if arrays[c].dtype == object or c == T_COL else arrays[c] for c in arrays}
        else:
            index = prepared.index if isinstance(prepared, pd.DataFrame) else pd.RangeIndex(n)
            pos = source.index.get_indexer(index)
            src_cols = {c: source[c].to_numpy(dtype=object).tolist() if source[c].dtype == object
                        else source[c].to_numpy() for c in source.columns}  # keys as Python values, numbers as arrays
        ingest.append((pos, src_cols, source, plan.adders[name]))
    return prepared, arrays, as_list, ingest


def ingest_columns(online: OnlineFeatures, frame: Columns) -> None:
    """Add events (plain contract columns or a frame) to the state in time order, computing no features: the
    few events that other workers or replicas scored (:meth:`serving.scorer.DomainScorer.catch_up`), without
    the pandas cost of ``online.ingest`` per call. Same state as ``online.ingest``."""
    plan = _plan(online)
    _prepared, arrays, _as_list, ingest = _prepared_and_ingest(online, plan, frame)
    n = len(arrays[T_COL])
    order = np.argsort(arrays[T_COL].astype(np.int64), kind="stable")
    for pos, src_cols, source, adders in ingest:
        rows = order.tolist() if pos is None else [p for p in pos[order].tolist() if p >= 0]
        if rows:
            for add in adders:
                add(src_cols, rows, source)
    online.events_seen += n


def feature_columns_in_time_order(online: OnlineFeatures, frame: Columns,
                                  ingest_rows: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
    """Model-input columns (``fs.names`` -> array, rows of ``frame``) of a batch, batch-training semantics.

    ``frame`` is an events frame, or plain contract columns (:func:`serving.models.item_columns`, what the
    service passes: the same values without a pandas frame per request).

    Items are taken in time order; the items of one distinct time get their features from the state, then are
    ingested, so a later item sees an earlier one and items of the same time do not see each other -- the same
    result as ``online.features(group); online.ingest(group)`` per distinct time, but the row-wise work
    (``prepare``, ``sources``, ``derive``) runs once per batch and the per-time steps touch plain Python values
    only (no pandas per distinct time, which cost ~20-40 ms each).

    ``ingest_rows`` (one flag per row, default all) leaves the rows flagged ``False`` out of the state: events it
    holds already (a second scoring of an event id), whose features are computed but which must count once.
    """
    fs = online.fs
    plan = _plan(online)
    _prepared, arrays, as_list, ingest = _prepared_and_ingest(online, plan, frame)
    n = len(arrays[T_COL])
    times = arrays[T_COL].astype(np.int64)
    if n == 1:
        groups = [[0]]
    else:
        order = np.argsort(times, kind="stable")
        groups = [g.tolist() for g in np.split(order, np.flatnonzero(np.diff(times[order])) + 1)] if n else []
    t_list = times.tolist()
    key_tuples: dict[tuple[str, ...], list[tuple]] = {}  # query key columns -> one key tuple per row
    for _query, qkeys, _cols in plan.queries:
        if qkeys not in key_tuples:
            key_tuples[qkeys] = list(zip(*(as_list(k) for k in qkeys), strict=True))
    outputs = [(query, key_tuples[qkeys], [None] * n) for query, qkeys, _cols in plan.queries]
    ingested = n
    for group in groups:
        for query, keys, out in outputs:
            for i in group:
                out[i] = query(keys[i], t_list[i])
        if ingest_rows is not None:
            ingested -= len(group)
            group = [i for i in group if ingest_rows[i]]
            ingested += len(group)
        for pos, src_cols, source, adders in ingest:
            rows = group if pos is None else [p for p in pos[group].tolist() if p >= 0]
            if rows:
                for add in adders:
                    add(src_cols, rows, source)
    columns = dict(arrays)
    for (_query, _qkeys, cols), (_q, _k, out) in zip(plan.queries, outputs, strict=True):
        values = np.array(out, dtype=np.float64).reshape(n, len(cols))
        for j, col in enumerate(cols):
            columns[col] = values[:, j]
    online.events_seen += ingested
    derived = fs.derive(columns)
    return {name: np.asarray(derived[name]) for name in fs.names}


def features_in_time_order(online: OnlineFeatures, frame: pd.DataFrame) -> pd.DataFrame:
    """:func:`feature_columns_in_time_order` as the model-input frame (``fs.frame``), index of ``frame``."""
    columns = feature_columns_in_time_order(online, frame)
    return online.fs.frame(columns, frame.index)


_LEVELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # booster -> {column: {level: code}}


def _level_codes(bundle) -> dict[str, dict]:
    """Categorical column -> {level: code} as LightGBM encodes them (the booster's own training categories)."""
    key = bundle.booster
    if key not in _LEVELS:
        cats = getattr(bundle.booster, "pandas_categorical", None)
        cat_cols = [c for c in bundle.feature_names if c in bundle.categorical]
        if cats is None or len(cats) != len(cat_cols):
            cats = [bundle.categorical[c] for c in cat_cols]
        _LEVELS[key] = {c: {lvl: i for i, lvl in enumerate(levels)} for c, levels in zip(cat_cols, cats, strict=True)}
    return _LEVELS[key]


def model_array(bundle, features) -> np.ndarray:
    """The float64 matrix LightGBM builds from ``bundle.matrix(features)`` (categorical codes, NaN = unseen or
    missing), built directly from columns (a dict of arrays or a frame): no categorical frame, no conversion
    inside ``booster.predict``."""
    levels = _level_codes(bundle)
    names = bundle.feature_names
    n = len(features[names[0]]) if names else 0
    X = np.empty((n, len(names)), np.float64)
    for j, col in enumerate(names):
        values = features[col]
        if col in levels:
            codes = levels[col]
            X[:, j] = [codes.get(v, np.nan) for v in np.asarray(values, dtype=object).tolist()]
        else:
            X[:, j] = np.asarray(values, dtype=np.float64)
    return X


def contrib_threads(rows: int) -> int:
    """LightGBM threads for ``rows`` predictions: 1 for small requests (OpenMP start-up and contention cost more
    than they save: a single-row pred_contrib takes about twice the CPU with 2 threads), all cores for batches."""
    return 1 if rows < 64 else (os.cpu_count() or 1)


def explain(bundle, features, top_n: int = DEFAULT_TOP_N) -> list:
    """``bundle.explain(features, top_n)`` with the same results, from columns (dict of arrays or frame),
    without per-row pandas access."""
    from training.bundle import Explanation, Reason, _plain

    X = model_array(bundle, features)
    contrib = bundle.booster.predict(X, pred_contrib=True, num_threads=contrib_threads(len(X)))
    margins = contrib.sum(axis=1)
    scores = bundle.calibrator(margins)
    names = bundle.feature_names
    labels = [bundle.feature_labels.get(n, n) for n in names]
    values: dict[int, list] = {}
    shap = contrib[:, :-1]
    top = np.argsort(-np.abs(shap), axis=1, kind="stable")[:, :top_n].tolist()  # one call for the batch
    rows, margins, bases, scores = shap.tolist(), margins.tolist(), contrib[:, -1].tolist(), scores.tolist()
    threshold = bundle.threshold
    out = []
    for i, row in enumerate(rows):
        reasons = []
        for j in top[i]:
            c = row[j]
            if c == 0.0:
                continue
            if j not in values:
                values[j] = np.asarray(features[names[j]]).tolist()
            reasons.append(Reason(feature=names[j], label=labels[j], value=_plain(values[j][i]), contribution=c,
                                  direction="raises risk" if c > 0 else "lowers risk"))
        score = scores[i]
        out.append(Explanation(
            score=score, raw_margin=margins[i], base_value=bases[i], flagged=score >= threshold,
            band=bundle.band(score), reasons=reasons, contributions=dict(zip(names, row, strict=True)),
        ))
    return out


def feature_records(columns: dict[str, np.ndarray], names: list[str]) -> list[dict]:
    """One ``{feature: plain value}`` dict per row (what ``frame.iloc[i].to_dict()`` gave, without pandas)."""
    lists = [np.asarray(columns[n]).tolist() for n in names]
    return [dict(zip(names, row, strict=True)) for row in zip(*lists, strict=True)]

