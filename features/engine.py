"""Point-in-time aggregation engine: one feature definition, a batch and an online executor.

A feature is declared once as an :class:`Agg` or :class:`Distinct` spec over a *source* table
(rows with a time). For a query row at time ``t`` the spec aggregates the source rows that share its
key and happened in ``[t - window, t)`` -- strictly before ``t``, so an event never sees itself,
later events or outcomes that were not yet known.

* Batch (training): :func:`batch_aggregate` answers all queries at once with sorted arrays,
  cumulative sums and ``np.searchsorted`` -- vectorised, ``O(n log n)``.
* Online (serving): :class:`KeyHistory` keeps per-key sorted time arrays and cumulative sums (one history
  for all specs over the same source and keys) and :class:`OnlineAggregate` answers one query with a binary
  search -- ``O(log n)``, no re-scan of history.

Both return identical columns; ``tests/test_engine.py`` (against a brute-force reference) and the online-vs-batch
tests of ``tests/test_finance_features.py`` and ``tests/test_customs_features.py`` prove they agree.
Times are integer seconds since the epoch (:func:`to_seconds`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

_SPAN = np.int64(1) << np.int64(31)  # > 68 years of seconds: room for any key's time offsets


def text_values(values) -> np.ndarray:
    """Object array of strings with None for missing values, from a pandas column or plain values."""
    if isinstance(values, pd.Series | pd.Index | pd.api.extensions.ExtensionArray):
        return values.to_numpy(dtype=object, na_value=None)
    return np.asarray(values, dtype=object)


def float_values(values) -> np.ndarray:
    """float64 array with NaN for missing values, from a pandas column or plain values."""
    if isinstance(values, pd.Series | pd.Index | pd.api.extensions.ExtensionArray):
        return values.to_numpy(np.float64, na_value=np.nan)
    return np.asarray(values, dtype=np.float64)


def to_seconds(ts: pd.Series | pd.DatetimeIndex | np.ndarray) -> np.ndarray:
    """Datetimes -> int64 seconds since the epoch."""
    values = np.asarray(ts, dtype="datetime64[ns]").astype("datetime64[s]")
    return values.astype(np.int64)


@dataclass(frozen=True)
class Agg:
    """Count, sums and recency of prior source rows sharing a key with the query row.

    Output columns (``p`` = ``name``): ``p_n`` (row count), ``p_<value>`` (sum of each value column),
    ``p_since_last`` / ``p_since_first`` in seconds (NaN when there is no prior row) if ``recency``.
    """

    name: str
    source: str
    keys: tuple[str, ...]
    query_keys: tuple[str, ...] | None = None
    values: tuple[str, ...] = ()
    window: pd.Timedelta | None = None
    recency: bool = False

    @property
    def qkeys(self) -> tuple[str, ...]:
        return self.query_keys or self.keys

    @property
    def window_s(self) -> int | None:
        return None if self.window is None else int(self.window.total_seconds())

    def columns(self) -> list[str]:
        cols = [f"{self.name}_n", *(f"{self.name}_{v}" for v in self.values)]
        return cols + ([f"{self.name}_since_last", f"{self.name}_since_first"] if self.recency else [])

    def batch(self, sources: dict[str, pd.DataFrame], query: pd.DataFrame) -> pd.DataFrame:
        return batch_aggregate(self, sources[self.source], query)

    def online(self, shared: dict | None = None) -> OnlineAggregate:
        """Online executor; with ``shared`` (one dict per feature set), specs over the same source and keys
        share one :class:`KeyHistory`."""
        if shared is None:
            return OnlineAggregate(self)
        return OnlineAggregate(self, shared.setdefault(("agg", self.source, self.keys), KeyHistory(self.keys)))


@dataclass(frozen=True)
class Distinct:
    """Number of distinct ``other`` values seen with the key strictly before the query time; with a ``window``,
    those first seen with the key within it (new counterparties, not all the window's distinct ones)."""

    name: str
    source: str
    keys: tuple[str, ...]
    other: str
    query_keys: tuple[str, ...] | None = None
    window: pd.Timedelta | None = None

    @property
    def qkeys(self) -> tuple[str, ...]:
        return self.query_keys or self.keys

    def columns(self) -> list[str]:
        return [self.name]

    def batch(self, sources: dict[str, pd.DataFrame], query: pd.DataFrame) -> pd.DataFrame:
        return batch_aggregate(self, sources[self.source], query)

    def online(self, shared: dict | None = None) -> OnlineDistinct:
        """Online executor; with ``shared``, specs over the same source, keys and other share their state."""
        if shared is None:
            return OnlineDistinct(self)
        key = ("distinct", self.source, self.keys, self.other)
        return OnlineDistinct(self, shared.setdefault(key, DistinctHistory(self.keys, self.other)))


Spec = Agg | Distinct


def _key_codes(src: pd.DataFrame, keys: tuple[str, ...], query: pd.DataFrame, qkeys: tuple[str, ...]):
    """Integer codes for composite keys, shared between source and query rows (-1 = missing)."""
    n = len(src)
    parts = []
    for k, qk in zip(keys, qkeys, strict=True):
        both = pd.concat([src[k], query[qk]], ignore_index=True)
        codes, _ = pd.factorize(both, use_na_sentinel=True)
        parts.append(codes.astype(np.int64))
    if len(parts) == 1:
        codes = parts[0]
    else:
        frame = pd.DataFrame({i: p for i, p in enumerate(parts)})
        codes = frame.groupby(list(frame.columns), sort=False).ngroup().to_numpy(np.int64)
        missing = np.any(np.column_stack(parts) < 0, axis=1)
        codes[missing] = -1
    return codes[:n], codes[n:]


def _origin(sts: np.ndarray, qts: np.ndarray, window: int | None) -> int:
    """Time origin of the packed ``key * _SPAN + (t - t0)`` keys: below every source and query time (and window
    start), so offsets stay in ``[0, _SPAN)`` whatever the epoch (also after 2038, when ``t > 2**31``)."""
    lows = [int(a.min()) for a in (sts, qts) if len(a)]
    return (min(lows) if lows else 0) - (window or 0) - 1


def _missing(value) -> bool:
    """A missing key part (None, NA, NaN) -- a cheap scalar test for the online hot path."""
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and value != value


def _has_missing(key: tuple) -> bool:
    """Whether any part of a composite key is missing (:func:`_missing`), without a generator per call."""
    for k in key:  # noqa: SIM110 - a plain loop: any() over a generator costs more on this hot path
        if k is None or k is pd.NA or (isinstance(k, float) and k != k):
            return True
    return False


def _window_sums(
    skey: np.ndarray, sts: np.ndarray, svals: np.ndarray, qkey: np.ndarray, qts: np.ndarray,
    window: int | None, t0: int,
):
    """Counts, value sums and prior-row times for each query from sorted-array searches."""
    order = np.lexsort((sts, skey))
    skey, sts, svals = skey[order], sts[order], svals[order]
    comb = skey * _SPAN + (sts - t0)
    # Sorted needles: searchsorted walks the haystack once (cache friendly) instead of jumping around.
    qorder = np.lexsort((qts, qkey))
    qbase = qkey[qorder] * _SPAN
    qoff = qts[qorder] - t0
    hi, start = np.empty(len(qts), np.int64), np.empty(len(qts), np.int64)
    hi[qorder] = np.searchsorted(comb, qbase + qoff, side="left")
    start[qorder] = np.searchsorted(comb, qbase, side="left")
    if window is None:
        lo = start
    else:
        lo = np.empty(len(qts), np.int64)
        lo[qorder] = np.searchsorted(comb, qbase + np.maximum(qoff - window, 0), side="left")
    # Per-key running sums (sequential, like the online executor) keep both paths bit-identical.
    group_cum = pd.DataFrame(svals).groupby(skey).cumsum().to_numpy(np.float64) if len(skey) else svals

    def prefix(idx: np.ndarray) -> np.ndarray:
        """Sum of a key's rows before sorted position ``idx`` (0 at the key's first row)."""
        vals = group_cum[np.clip(idx - 1, 0, None)] if len(group_cum) else np.zeros((len(idx), svals.shape[1]))
        return np.where((idx > start)[:, None], vals, 0.0)

    counts = hi - lo
    sums = prefix(hi) - prefix(lo)
    return counts, sums, hi, start, lo, sts


def batch_aggregate(spec: Spec, source: pd.DataFrame, query: pd.DataFrame, t_col: str = "_t") -> pd.DataFrame:
    """Answer ``spec`` for every query row (batch executor). Both frames carry int seconds in ``t_col``."""
    if isinstance(spec, Distinct):
        first = source.dropna(subset=[*spec.keys, spec.other]).groupby(
            [*spec.keys, spec.other], sort=False, observed=True
        )[t_col].min().reset_index()
        inner = Agg(spec.name, spec.source, spec.keys, spec.qkeys, window=spec.window)
        return batch_aggregate(inner, first, query, t_col).rename(columns={f"{spec.name}_n": spec.name})
    skey, qkey = _key_codes(source, spec.keys, query, spec.qkeys)
    keep = skey >= 0
    sts = source[t_col].to_numpy(np.int64)[keep]
    svals = source.loc[keep, list(spec.values)].to_numpy(np.float64) if spec.values else np.zeros((keep.sum(), 0))
    svals = np.nan_to_num(svals, nan=0.0)
    qts = query[t_col].to_numpy(np.int64)
    t0 = _origin(sts, qts, spec.window_s)
    counts, sums, hi, start, _lo, sorted_ts = _window_sums(skey[keep], sts, svals, qkey, qts, spec.window_s, t0)
    counts = np.where(qkey >= 0, counts, 0)
    out = {f"{spec.name}_n": counts.astype(np.float64)}
    for i, v in enumerate(spec.values):
        out[f"{spec.name}_{v}"] = np.where(qkey >= 0, sums[:, i], 0.0)
    if spec.recency:
        has = (hi > start) & (qkey >= 0)
        last = sorted_ts[np.clip(hi - 1, 0, None)] if len(sorted_ts) else np.zeros(len(qts), np.int64)
        first = sorted_ts[np.clip(start, 0, max(len(sorted_ts) - 1, 0))] if len(sorted_ts) else last
        out[f"{spec.name}_since_last"] = np.where(has, qts - last, np.nan)
        out[f"{spec.name}_since_first"] = np.where(has, qts - first, np.nan)
    return pd.DataFrame(out, index=query.index)


@dataclass
class _KeySeries:
    """Sorted times and cumulative sums of one key's source rows (online state)."""

    ts: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    cum: np.ndarray = field(default_factory=lambda: np.zeros((1, 0)))
    n: int = 0

    def add(self, t: int, vals: np.ndarray) -> None:
        if self.n == len(self.ts):
            cap = max(4, 2 * self.n)
            ts = np.empty(cap, np.int64)
            ts[: self.n] = self.ts[: self.n]
            cum = np.zeros((cap + 1, len(vals)))
            cum[: self.n + 1] = self.cum[: self.n + 1] if self.cum.shape[1] == len(vals) else 0.0
            self.ts, self.cum = ts, cum
        n = self.n
        if n == 0 or t >= self.ts[n - 1]:  # in time order: append
            pos = n
        else:  # out-of-order arrival: shift later rows right
            pos = int(self.ts[:n].searchsorted(t, side="right"))
            self.ts[pos + 1 : n + 1] = self.ts[pos:n]
            if vals.size:
                self.cum[pos + 2 : n + 2] = self.cum[pos + 1 : n + 1] + vals
        self.ts[pos] = t
        if vals.size:  # counts only: the cumulative sums have no columns
            np.add(self.cum[pos], vals, out=self.cum[pos + 1])
        self.n = n + 1


def _key_tuples(rows: pd.DataFrame, keys: tuple[str, ...]) -> list[tuple]:
    """Composite keys of ``rows`` as tuples of plain Python values (no pandas index building)."""
    return list(zip(*(rows[k].to_numpy(dtype=object).tolist() for k in keys), strict=True))


def _group_codes(rows: pd.DataFrame, keys: tuple[str, ...]) -> np.ndarray:
    """One integer per distinct composite key of ``rows`` (-1 where any part is missing)."""
    parts = [pd.factorize(rows[k], use_na_sentinel=True)[0].astype(np.int64) for k in keys]
    if len(parts) == 1:
        return parts[0]
    frame = pd.DataFrame({i: p for i, p in enumerate(parts)})
    codes = frame.groupby(list(frame.columns), sort=False).ngroup().to_numpy(np.int64)
    codes[np.any(np.column_stack(parts) < 0, axis=1)] = -1
    return codes


class KeyHistory:
    """Online state of one (source, key columns): each key's sorted times and running sums of value columns.

    The specs over one source and one set of key columns (an account's 1h, 24h and 7d flows, its history
    overall) share a history, so a source row is ingested once whatever the windows and values asked of it.
    ``track`` adds the value columns a spec needs before any row arrives.
    """

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys
        self.values: list[str] = []
        self._series: dict[tuple, _KeySeries] = {}

    def track(self, values: Sequence[str]) -> list[int]:
        """Positions of ``values`` in the running sums, adding the missing ones (only while the history is empty)."""
        new = [v for v in values if v not in self.values]
        if new and self._series:
            raise RuntimeError(f"value columns {new} added to a history that already holds rows")
        self.values += new
        return [self.values.index(v) for v in values]

    def _values(self, rows: pd.DataFrame) -> np.ndarray:
        vals = rows[self.values].to_numpy(np.float64) if self.values else np.zeros((len(rows), 0))
        return np.nan_to_num(vals, nan=0.0)

    def ingest(self, rows: pd.DataFrame, t_col: str = "_t") -> None:
        """Add source rows (any order; each key's history stays sorted)."""
        vals = self._values(rows)
        ts = rows[t_col].to_numpy(np.int64)
        if not self._series and len(rows) > 1000:
            self._bulk_load(rows, ts, vals)
            return
        for key, t, v in zip(_key_tuples(rows, self.keys), ts.tolist(), vals, strict=True):
            self.add(key, t, v)

    def ingest_columns(self, columns: Mapping[str, Sequence], rows: Sequence[int]) -> None:
        """Add source rows ``rows`` given as plain columns (lists/arrays by name, times in ``"_t"``).

        The pandas-free path for serving, where a few rows are added at a time.
        """
        keys = [columns[k] for k in self.keys]
        ts = columns["_t"]
        rows = list(rows)
        if not self.values:
            for i in rows:
                self.add(tuple(k[i] for k in keys), int(ts[i]), _NO_VALUES)
            return
        if len(rows) == 1:  # one row (single items, most batch steps): plain Python beats numpy calls here
            i = rows[0]
            row = [float(columns[v][i]) for v in self.values]
            if not all(map(math.isfinite, row)):  # as np.nan_to_num(nan=0.0): NaN -> 0, +-inf -> +-max float
                row = np.nan_to_num(np.array(row), nan=0.0).tolist()
            self.add(tuple(k[i] for k in keys), int(ts[i]), np.array(row))
            return
        vals = np.column_stack([np.asarray(columns[v], dtype=np.float64)[rows] for v in self.values])
        if not np.isfinite(vals).all():  # the check is cheaper than nan_to_num for a few rows
            vals = np.nan_to_num(vals, nan=0.0)
        for i, v in zip(rows, vals, strict=True):
            self.add(tuple(k[i] for k in keys), int(ts[i]), v)

    def _bulk_load(self, rows: pd.DataFrame, ts: np.ndarray, vals: np.ndarray) -> None:
        width = len(self.values)
        codes = _group_codes(rows, self.keys)
        keep = np.flatnonzero(codes >= 0)
        order = keep[np.lexsort((ts[keep], codes[keep]))]
        codes, ts, vals = codes[order], ts[order], vals[order]
        bounds = np.flatnonzero(np.diff(codes)) + 1
        starts = np.concatenate([[0], bounds]).astype(np.int64) if len(codes) else np.zeros(0, np.int64)
        ends = np.concatenate([bounds, [len(codes)]]).astype(np.int64) if len(codes) else starts
        cum = np.zeros((len(codes) + len(starts), width))  # each key: a 0 row, then its running sums
        if len(codes) and width:
            # per-key running sums, sequential like _KeySeries.add (bit-identical to row-by-row ingestion)
            grouped = pd.DataFrame(vals).groupby(codes, sort=False).cumsum().to_numpy(np.float64)
            cum[np.arange(len(codes)) + np.repeat(np.arange(len(starts)) + 1, ends - starts)] = grouped
        firsts = _key_tuples(rows.iloc[order[starts]], self.keys)
        for j, (key, s, e) in enumerate(zip(firsts, starts.tolist(), ends.tolist(), strict=True)):
            self._series[key] = _KeySeries(ts=ts[s:e].copy(), cum=cum[s + j : e + j + 1].copy(), n=e - s)

    def add(self, key: tuple, t: int, vals: np.ndarray) -> None:
        """Add one source row (rows with a missing key part are not counted, so no stored key has one)."""
        series = self._series.get(key)
        if series is None:
            if _has_missing(key):
                return
            series = self._series[key] = _KeySeries(cum=np.zeros((1, len(self.values))))
        series.add(t, vals)


class OnlineAggregate:
    """Online executor of one :class:`Agg`: answers queries from a :class:`KeyHistory` (its own, or one shared
    with the other specs over the same source and keys; rows are ingested into :attr:`feed`)."""

    def __init__(self, spec: Agg, history: KeyHistory | None = None):
        self.spec = spec
        self.feed = history if history is not None else KeyHistory(spec.keys)
        cols = self.feed.track(spec.values)
        contiguous = bool(cols) and cols == list(range(cols[0], cols[-1] + 1))
        self._pick: slice | list[int] = slice(cols[0], cols[-1] + 1) if contiguous else cols
        self._width = len(cols)
        self._empty = [0.0] * (1 + self._width) + ([np.nan, np.nan] if spec.recency else [])
        self._window_s = spec.window_s  # per query: a property computing Timedelta.total_seconds() showed up

    def ingest(self, rows: pd.DataFrame, t_col: str = "_t") -> None:
        """Add source rows to the history (see :meth:`KeyHistory.ingest`)."""
        self.feed.ingest(rows, t_col)

    def ingest_columns(self, columns: Mapping[str, Sequence], rows: Sequence[int]) -> None:
        """Add source rows given as plain columns (see :meth:`KeyHistory.ingest_columns`)."""
        self.feed.ingest_columns(columns, rows)

    def query(self, key: tuple, t: int) -> list[float]:
        """Feature values for one query row with key ``key`` at time ``t`` (same order as columns())."""
        series = self.feed._series.get(key)  # a key with a missing part is never stored: no match
        if series is None or series.n == 0:
            return list(self._empty)
        n = series.n
        ts = series.ts[:n]
        hi = n if ts[n - 1] < t else int(ts.searchsorted(t, side="left"))  # new events come after the history
        window = self._window_s
        lo = 0 if window is None else int(ts.searchsorted(t - window, side="left"))
        out = [float(hi - lo)]
        if self._width:
            out += (series.cum[hi] - series.cum[lo])[self._pick].tolist()
        if self.spec.recency:
            out += [float(t - ts[hi - 1]), float(t - ts[0])] if hi > 0 else [np.nan, np.nan]
        return out


_NO_VALUES = np.zeros(0)


class DistinctHistory:
    """Online state of one (source, keys, other): the first time each (key, other) pair was seen, and per key the
    sorted times of those first sightings (shared by the :class:`Distinct` specs over the same columns)."""

    def __init__(self, keys: tuple[str, ...], other: str):
        self.keys, self.other = keys, other
        self._first: dict[tuple, int] = {}
        self.firsts = KeyHistory(keys)

    def ingest(self, rows: pd.DataFrame, t_col: str = "_t") -> None:
        """Add source rows (any order: an earlier first sighting arriving late replaces the later one)."""
        cols = [*self.keys, self.other]
        for *key, other, t in zip(*(rows[c].to_numpy(dtype=object).tolist() for c in cols),
                                  rows[t_col].to_numpy(np.int64).tolist(), strict=True):
            self.add(tuple(key), other, t)

    def ingest_columns(self, columns: Mapping[str, Sequence], rows: Sequence[int]) -> None:
        """Add source rows ``rows`` given as plain columns (see :meth:`KeyHistory.ingest_columns`)."""
        keys, other, ts = [columns[k] for k in self.keys], columns[self.other], columns["_t"]
        for i in rows:
            self.add(tuple(k[i] for k in keys), other[i], int(ts[i]))

    def add(self, key: tuple, other, t: int) -> None:
        """Add one source row: ``other`` seen with ``key`` at ``t``."""
        pair = (*key, other)
        prev = self._first.get(pair)
        if prev is None and (_missing(other) or _has_missing(key)):  # never stored, so only new pairs are checked
            return
        if prev is None or t < prev:
            self._first[pair] = t
            if prev is not None:  # an earlier first sighting arrived late: move it
                self._remove(key, prev)
            self.firsts.add(key, t, _NO_VALUES)

    def _remove(self, key: tuple, t: int) -> None:
        series = self.firsts._series[key]
        ts = series.ts[: series.n]
        pos = int(np.searchsorted(ts, t, side="left"))
        series.ts[pos : series.n - 1] = series.ts[pos + 1 : series.n]
        series.cum[pos + 1 : series.n] = series.cum[pos + 2 : series.n + 1]
        series.n -= 1


class OnlineDistinct:
    """Online executor of one :class:`Distinct`: counts first sightings in a :class:`DistinctHistory` (its
    own or a shared one; rows are ingested into :attr:`feed`)."""

    def __init__(self, spec: Distinct, history: DistinctHistory | None = None):
        self.spec = spec
        self.feed = history if history is not None else DistinctHistory(spec.keys, spec.other)
        self._count = OnlineAggregate(Agg(spec.name, spec.source, spec.keys, window=spec.window), self.feed.firsts)

    def ingest(self, rows: pd.DataFrame, t_col: str = "_t") -> None:
        self.feed.ingest(rows, t_col)

    def ingest_columns(self, columns: Mapping[str, Sequence], rows: Sequence[int]) -> None:
        """Add source rows given as plain columns (see :meth:`DistinctHistory.ingest_columns`)."""
        self.feed.ingest_columns(columns, rows)

    def query(self, key: tuple, t: int) -> list[float]:
        return self._count.query(key, t)
