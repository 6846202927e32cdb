"""Point-in-time features on ``dask.dataframe`` partitions, identical to :meth:`FeatureSet.build`.

The feature definitions are the domain's :class:`~features.featureset.FeatureSet` (``prepare``, ``sources``,
``specs``, ``derive`` in ``features/customs.py`` / ``features/finance.py``); this module only decides which
rows each spec's batch executor sees, so the pandas and Dask paths cannot drift apart.

Why the result is exact
-----------------------
A spec answers a query row at time ``t`` from the source rows that share its key and happened before ``t``.
The batch executors sort the source rows by (key, time), ties in row order (stable sorts), and sum values
sequentially per key. Each spec is therefore computed on a subset of rows chosen so that, for every query,
the rows it can see form the same per-key sequence in the same order as in the full table. Every partition
is sorted back into the original row order (the row number travels in the index) before a spec runs, so
sums are bit-identical, not merely close.

Two ways of cutting the data, both exact:

* **Key partitioning** (``Agg`` and ``Distinct`` specs: everything keyed by an entity, a pair, a country,
  an HS code...). A spec with source keys ``(k1, k2, ...)`` and query keys ``(q1, q2, ...)`` only ever
  matches a query with source rows whose ``k1`` equals the query's ``q1``. Source rows are hash-partitioned
  on ``k1`` and query rows on ``q1`` into the same buckets, so each bucket holds every source row any of
  its queries can match; the spec runs per bucket. (Case tables are small and go whole to every bucket:
  rows of other keys never match.) This is what makes multi-entity features work:
  ``dst_out`` (transfers *sent* by the *receiver*) is a source partitioned by ``source_account`` joined to
  queries partitioned by ``target_account``. Every source/key pair is shuffled once and every query key
  once, and all specs that share a query key run in one task per bucket. Work is the same as in pandas
  (each row is sorted once per spec), split over the buckets.
* **Time partitioning** (graph specs ``Cycle`` and ``ConfirmedLinks``, and any spec that is not keyed: they
  walk paths across accounts, so no key partitioning is exact). The events are cut into time ranges
  ``[start_i, end_i)``; part ``i`` answers its own events as queries with *all* events strictly before
  ``end_i`` (and outcomes of those events, and all cases) as sources. A query at ``t < end_i`` only uses
  rows before ``t``; first-contact edges, per-account ranks of first contacts (time, then row order) and
  link times of rows before ``end_i`` do not depend on later rows, so each part equals the full
  computation on its rows. The cost is that part ``i`` re-reads the history before it, so the last part is
  as large as the whole table: time parts bound the query side and run in parallel with the key buckets,
  but do not shorten the critical path. ``time_parts=1`` (the default) runs each such spec as one task.
  ``mode="time"`` runs *every* spec this way (the simple design; useful as a cross-check).

Text id columns (the keys, the ``Distinct`` values, the graph's account columns) are first encoded as float codes
of one dictionary shared by all sources (NaN = missing): the specs only test them for equality and
missingness, so the results are unchanged while shuffles move and hash numbers instead of strings.

Cases are small and are given to every task (they are known from their closing time, which the specs
compare with the query time). Row-wise steps (``prepare``, label stamping, ``derive``) run per partition.

Usage::

    from distributed import Client
    client = Client("tcp://scheduler:8786")   # or a LocalCluster; the default client is used
    features = build(feature_set, events, cases)   # pandas frame aligned with ``events``, == fs.build(...)

``events`` may be a pandas frame or a ``dask.dataframe`` (any partitioning; row order = the order of its
partitions). :func:`build_dask` returns the lazy Dask frame (index = row number) instead.
"""

from __future__ import annotations

import math
from collections import defaultdict
from itertools import pairwise

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd

from features.engine import Agg, Distinct, to_seconds
from features.featureset import T_COL, FeatureSet, _empty_cases

ROW = "_row"  # index name: position of the event in the input (restores row order in every task)
KEY = "_k"  # hash-partitioning key (object strings)
T_EVENT = "_tev"  # event time of a labelled event (the label's own time is event time + delay)
MODES = ("hybrid", "time")
_KEEP: dict[int, tuple] = {}  # persisted inputs of the last build per client (time tasks read them by key)
DASK_CONFIG = {"dataframe.convert-string": False, "dataframe.shuffle.method": "tasks"}
ROWS_PER_PARTITION = 250_000  # default partition size of a pandas input


def _keyed(spec) -> bool:
    return isinstance(spec, Agg | Distinct)


def _spec_columns(spec) -> list[str]:
    cols = [*spec.keys, T_COL]
    if isinstance(spec, Agg):
        cols += list(spec.values)
    else:
        cols.append(spec.other)
    return list(dict.fromkeys(cols))


def _float_meta(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=np.float64) for c in columns},
                        index=pd.Index([], dtype=np.int64, name=ROW))


# ------------------------------------------------------------------------------------------ row-wise steps


def _with_rows(part: pd.DataFrame, offset: int) -> pd.DataFrame:
    out = part.copy()
    out.index = pd.RangeIndex(offset, offset + len(part), name=ROW)
    return out


def _prepare(part: pd.DataFrame, fs: FeatureSet) -> pd.DataFrame:
    out = fs.prepare(part)
    out.index = part.index
    return out


def _labels(part: pd.DataFrame, fs: FeatureSet) -> pd.DataFrame:
    part = part[part[fs.label_col].notna().to_numpy(bool)] if fs.label_col in part else part.iloc[:0]
    out = fs.prepared_labels(part)
    out.index = part.index
    out[T_EVENT] = to_seconds(part[fs.time_col])
    return out


def _source(part: pd.DataFrame, fs: FeatureSet, name: str, kind: str) -> pd.DataFrame:
    out = fs.sources(**{"events": None, "labels": None, "cases": None, kind: part})[name]
    if not out.index.isin(part.index).all():
        raise ValueError(f"source {name!r} must keep the row index of its {kind} rows")
    return out


def _bucketed(part: pd.DataFrame, key: str, columns: list[str]) -> pd.DataFrame:
    out = part[columns].copy()
    values = part[key]
    if pd.api.types.is_float_dtype(values.dtype):  # encoded ids
        out[KEY] = np.nan_to_num(values.to_numpy(np.float64), nan=-1.0) + 0.0  # -0.0 -> 0.0: one key, one bucket
    else:
        out[KEY] = values.to_numpy(dtype=object, na_value="").astype(str).astype(object)
    return out


def _id_columns(specs) -> set[str] | None:
    """Columns the specs only compare for equality (ids, codes, countries); None if a spec type is unknown."""
    from features.graph import ConfirmedLinks, Cycle

    cols: set[str] = set()
    for s in specs:
        if isinstance(s, Agg):
            cols |= {*s.keys, *s.qkeys}
        elif isinstance(s, Distinct):
            cols |= {*s.keys, *s.qkeys, s.other}
        elif isinstance(s, Cycle):
            cols |= set(s.edge)
        elif isinstance(s, ConfirmedLinks):
            cols |= {*s.edge, s.case_key, *s.query_keys}
        else:
            return None
    return cols


def _uniques(part: pd.DataFrame, cols: list[str]) -> pd.Series:
    values = [part[c].dropna().to_numpy(dtype=object) for c in cols if c in part]
    return pd.Series(pd.unique(np.concatenate(values)) if values else [], dtype=object)


def _encode(part: pd.DataFrame, ids: pd.Index, cols: list[str]) -> pd.DataFrame:
    """Id columns as float codes of one shared dictionary (NaN = missing): equality and missingness are all the
    specs use of them, so results are unchanged, while hashing, shuffling and factorising get cheap."""
    out = part.copy(deep=False)
    for c in cols:
        if c in out:
            codes = ids.get_indexer(out[c].to_numpy(dtype=object, na_value=None)).astype(np.float64)
            codes[codes < 0] = np.nan
            out[c] = codes
    return out


# ------------------------------------------------------------------------------------------ tasks


def _ordered(part: pd.DataFrame) -> pd.DataFrame:
    return part.drop(columns=[KEY], errors="ignore").sort_index(kind="stable")


def _bucket_task(query: pd.DataFrame, *sources: pd.DataFrame, plan: tuple) -> pd.DataFrame:
    """All keyed specs sharing a query key on one hash bucket; ``plan`` = ((source name, specs), ...)."""
    query = _ordered(query)
    columns = [c for _, specs in plan for spec in specs for c in spec.columns()]
    if not len(query):
        return _float_meta(columns)
    parts = []
    for (name, specs), source in zip(plan, sources, strict=True):
        src = {name: _ordered(source)}
        parts += [spec.batch(src, query) for spec in specs]
    out = pd.concat(parts, axis=1)
    out.index.name = ROW
    return out[columns]


def _time_task(
    events: list[pd.DataFrame], labels: list[pd.DataFrame], cases: dict[str, pd.DataFrame],
    start: float, end: float, fs: FeatureSet, specs: tuple,
) -> pd.DataFrame:
    """Specs for the events in ``[start, end)`` with all events (and their outcomes) before ``end`` as history."""
    columns = [c for spec in specs for c in spec.columns()]
    history = pd.concat(events).sort_index(kind="stable")
    history = history[history[T_COL].to_numpy() < end]
    query = history[history[T_COL].to_numpy() >= start]
    if not len(query):
        return _float_meta(columns)
    known = pd.concat(labels).sort_index(kind="stable")
    known = known[known[T_EVENT].to_numpy() < end].drop(columns=[T_EVENT])
    sources = {**fs.sources(events=history, labels=known, cases=None), **cases}
    out = pd.concat([spec.batch(sources, query) for spec in specs], axis=1)
    out.index.name = ROW
    return out[columns]


def _derive_task(prepared: pd.DataFrame, *aggregates: pd.DataFrame, fs: FeatureSet) -> pd.DataFrame:
    columns = {c: prepared[c].to_numpy() for c in prepared.columns}
    for agg in aggregates:
        if not agg.index.equals(prepared.index):
            raise RuntimeError("aggregate rows are not aligned with the events (internal error)")
        columns.update({c: agg[c].to_numpy() for c in agg.columns})
    return fs.frame(fs.derive(columns), prepared.index)


# ------------------------------------------------------------------------------------------ graph


def _events_frame(events: pd.DataFrame | dd.DataFrame, partitions: int | None, client=None) -> dd.DataFrame:
    """Events as a Dask frame indexed by row number ``ROW`` with known divisions.

    A pandas frame is cut into row ranges; with a ``client`` they are scattered to the workers (not embedded
    in the task graph).
    """
    if isinstance(events, pd.DataFrame):
        frame = events.reset_index(drop=True)
        frame.index = pd.RangeIndex(len(frame), name=ROW)
        n = max(1, min(partitions or math.ceil(len(frame) / ROWS_PER_PARTITION), len(frame)))
        if client is None:
            return dd.from_pandas(frame, npartitions=n, sort=True)
        cuts = np.linspace(0, len(frame), n + 1).astype(int)
        parts = [frame.iloc[a:b] for a, b in pairwise(cuts) if b > a]
        futures = client.scatter(parts)
        divisions = (*(int(p.index[0]) for p in parts), len(frame) - 1)
        return dd.from_delayed(futures, meta=frame.iloc[:0], divisions=divisions, verify_meta=False)
    lengths = events.map_partitions(len).compute().tolist()
    parts = [p for p, n in zip(events.to_delayed(), lengths, strict=True) if n]
    kept = [n for n in lengths if n]
    offsets = np.r_[0, np.cumsum(kept)].astype(int).tolist()
    meta = _with_rows(events._meta, 0)
    delayed = [dask.delayed(_with_rows)(p, off) for p, off in zip(parts, offsets, strict=False)]
    divisions = (*offsets[:-1], offsets[-1] - 1)
    frame = dd.from_delayed(delayed, meta=meta, divisions=divisions)
    return frame.repartition(npartitions=partitions) if partitions else frame


def _sample(events: pd.DataFrame | dd.DataFrame) -> pd.DataFrame:
    head = events.head(20) if isinstance(events, pd.DataFrame) else events.head(20, npartitions=-1)
    head = head.reset_index(drop=True)
    head.index = pd.RangeIndex(len(head), name=ROW)
    return head


def build_dask(
    fs: FeatureSet, events: pd.DataFrame | dd.DataFrame, cases: pd.DataFrame | None = None, *,
    partitions: int | None = None, buckets: int | None = None, time_parts: int = 1, mode: str = "hybrid",
    client=None,
) -> dd.DataFrame:
    """Lazy Dask frame of the model inputs (columns :attr:`FeatureSet.names`, index ``ROW`` = row number).

    ``partitions``: row partitions of the events (default: input's, or 250k rows each); ``buckets``: hash
    buckets of key-partitioned specs (default: ``partitions``); ``time_parts``: time ranges of the
    time-partitioned specs; ``mode``: ``"hybrid"`` (keyed specs by key, graph specs by time) or ``"time"``
    (every spec by time); ``client``: scatter pandas input to its workers. See the module docstring for why
    both give exactly :meth:`FeatureSet.build`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if time_parts < 1:
        raise ValueError("time_parts must be >= 1")
    sample = _sample(events)
    if not len(sample):
        raise ValueError("no events to build features for")
    ev = _events_frame(events, partitions, client)
    n_buckets = buckets or max(2, ev.npartitions)
    prepared_meta = _prepare(sample, fs)
    labels_meta = _labels(sample, fs)
    prepared = ev.map_partitions(_prepare, fs, meta=prepared_meta.iloc[:0])
    labels = ev.map_partitions(_labels, fs, meta=labels_meta.iloc[:0])
    case_sources = {
        name: frame.reset_index(drop=True).rename_axis(ROW)
        for name, frame in fs.sources(events=None, labels=None, cases=_empty_cases(cases)).items()
    }
    if client is not None:
        prepared, labels = client.persist([prepared, labels])
        _KEEP[id(client)] = (prepared, labels)  # the persisted data lives while the client does
    prepared_raw = prepared
    id_cols = _id_columns(fs.specs)
    if id_cols:  # text columns only: numbers used as keys (e.g. an exact price) are also values elsewhere
        id_cols = {c for c in id_cols if c in prepared_meta and not pd.api.types.is_numeric_dtype(prepared_meta[c])}
        id_cols |= {c for frame in case_sources.values() for c in frame.columns if c in (_id_columns(fs.specs) or ())
                    and not pd.api.types.is_numeric_dtype(frame[c])}
    if id_cols:  # encode ids once (a shared dictionary) so every later step moves and hashes numbers
        cols = sorted(id_cols)
        found = dd.concat([prepared.map_partitions(_uniques, cols, meta=pd.Series(dtype=object)),
                           labels.map_partitions(_uniques, cols, meta=pd.Series(dtype=object))]).compute()
        known = [found.to_numpy(dtype=object)]
        known += [_uniques(frame, cols).to_numpy(dtype=object) for frame in case_sources.values()]
        ids = pd.Index(pd.unique(np.concatenate(known)), dtype=object)
        ids_d = dask.delayed(ids, pure=True)
        prepared = prepared.map_partitions(_encode, ids_d, cols, meta=_encode(prepared_meta, ids[:0], cols).iloc[:0])
        labels = labels.map_partitions(_encode, ids_d, cols, meta=_encode(labels_meta, ids[:0], cols).iloc[:0])
        prepared_meta, labels_meta = _encode(prepared_meta, ids, cols), _encode(labels_meta, ids, cols)
        case_sources = {name: _encode(frame, ids, cols) for name, frame in case_sources.items()}
    kind_of = {name: "events" for name in fs.sources(events=prepared_meta, labels=None, cases=None)}
    kind_of.update({name: "labels" for name in fs.sources(events=None, labels=labels_meta, cases=None)})
    rowwise = {"events": (prepared, prepared_meta), "labels": (labels, labels_meta)}

    keyed = [s for s in fs.specs if _keyed(s) and mode == "hybrid"]
    timed = [s for s in fs.specs if not (_keyed(s) and mode == "hybrid")]
    aggregates: list[dd.DataFrame] = []

    # key partitioning: one shuffle per (source, first key) and per first query key
    by_query: dict[str, dict[tuple[str, str], list]] = defaultdict(lambda: defaultdict(list))
    source_cols: dict[tuple[str, str], set[str]] = defaultdict(set)
    query_cols: dict[str, set[str]] = defaultdict(set)
    for spec in keyed:
        by_query[spec.qkeys[0]][(spec.source, spec.keys[0])].append(spec)
        source_cols[(spec.source, spec.keys[0])].update(_spec_columns(spec))
        query_cols[spec.qkeys[0]].update([*spec.qkeys, T_COL])
    shuffled: dict[tuple[str, str], dd.DataFrame] = {}
    for (name, key), cols in source_cols.items():
        cols = sorted(cols)
        if name in case_sources:  # small: every bucket gets all of it (extra keys never match)
            shuffled[(name, key)] = dask.delayed(case_sources[name][cols], pure=True)
            continue
        else:
            kind = kind_of.get(name)
            if kind is None:
                raise ValueError(f"spec source {name!r} is not produced by the feature set's sources()")
            base, base_meta = rowwise[kind]
            src_meta = _source(base_meta, fs, name, kind)
            frame = base.map_partitions(_source, fs, name, kind, meta=src_meta.iloc[:0])
            frame = frame.map_partitions(_bucketed, key, cols, meta=_bucketed(src_meta, key, cols).iloc[:0])
        shuffled[(name, key)] = frame.shuffle(on=KEY, npartitions=n_buckets)
    for qkey, groups in by_query.items():
        cols = sorted(query_cols[qkey])
        query = prepared.map_partitions(_bucketed, qkey, cols, meta=_bucketed(prepared_meta, qkey, cols).iloc[:0])
        query = query.shuffle(on=KEY, npartitions=n_buckets)
        plan = tuple((name, tuple(specs)) for (name, _), specs in groups.items())
        meta = _float_meta([c for _, specs in plan for s in specs for c in s.columns()])
        aggregates.append(dd.map_partitions(
            _bucket_task, query, *(shuffled[k] for k in groups), plan=plan, meta=meta, align_dataframes=False,
        ))

    # time partitioning: every part sees all events before its end
    if timed:
        bounds = [-np.inf, np.inf]
        if time_parts > 1:
            qs = prepared[T_COL].quantile(np.linspace(0, 1, time_parts + 1)[1:-1]).compute()
            bounds = [-np.inf, *sorted(set(np.asarray(qs, dtype=float).tolist())), np.inf]
        ev_parts, lab_parts = prepared.to_delayed(), labels.to_delayed()
        cases_d = dask.delayed(case_sources, traverse=True)
        tasks = [
            dask.delayed(_time_task)(ev_parts, lab_parts, cases_d, lo, hi, fs, tuple(timed))
            for lo, hi in pairwise(bounds)
        ]
        meta = _float_meta([c for s in timed for c in s.columns()])
        aggregates.append(dd.from_delayed(tasks, meta=meta, verify_meta=False))

    # back to row order (known divisions of ``prepared``), then the row-wise derive step
    divisions = prepared_raw.divisions
    aligned = [agg.reset_index().set_index(ROW, divisions=list(divisions)) for agg in aggregates]
    return dd.map_partitions(_derive_task, prepared_raw, *aligned, fs=fs, meta=_derive_meta(fs, sample),
                             align_dataframes=False)


def _derive_meta(fs: FeatureSet, sample: pd.DataFrame) -> pd.DataFrame:
    out = fs.build(sample).iloc[:0]
    out.index = pd.Index([], dtype=np.int64, name=ROW)
    return out


def build(
    fs: FeatureSet, events: pd.DataFrame | dd.DataFrame, cases: pd.DataFrame | None = None, *,
    partitions: int | None = None, buckets: int | None = None, time_parts: int = 1, mode: str = "hybrid",
    client=None, timeout: float | None = None,
) -> pd.DataFrame:
    """The same frame as ``fs.build(events, cases)`` (pandas, aligned with ``events``' rows), computed by Dask.

    Uses ``client`` (a ``distributed.Client``; ``timeout`` seconds at most) or the current default scheduler.
    See :func:`build_dask`.
    """
    with dask.config.set(DASK_CONFIG):
        lazy = build_dask(fs, events, cases, partitions=partitions, buckets=buckets, time_parts=time_parts,
                          mode=mode, client=client)
        try:
            out = client.compute(lazy).result(timeout=timeout) if client is not None else lazy.compute()
        finally:
            _KEEP.pop(id(client), None)
    out = out.sort_index()
    n = len(events) if isinstance(events, pd.DataFrame) else len(out)
    if len(out) != n or not np.array_equal(out.index.to_numpy(), np.arange(n)):
        raise RuntimeError(f"Dask feature build returned {len(out)} rows for {n} events (internal error)")
    out.index = events.index if isinstance(events, pd.DataFrame) else pd.RangeIndex(n)
    return out
