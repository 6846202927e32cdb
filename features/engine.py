"""Point-in-time aggregation engine: one feature definition, a batch and an online executor.

A feature is declared once as an :class:`Agg` or :class:`Distinct` spec over a *source* table
(rows with a time). For a query row at time ``t`` the spec aggregates the source rows that share its
key and happened in ``[t - window, t)`` -- strictly before ``t``, so an event never sees itself,
later events or outcomes that were not yet known.

* Batch (training): :func:`batch_aggregate` answers all queries at once with sorted arrays,
  cumulative sums and ``np.searchsorted`` -- vectorised, ``O(n log n)``.
* Online (serving): :class:`OnlineAggregate` keeps per-key sorted time arrays and cumulative sums
  and answers one query with a binary search -- ``O(log n)``, no re-scan of history.

Both return identical columns; ``tests/test_feature_parity.py`` proves they agree.
Times are integer seconds since the epoch (:func:`to_seconds`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

_SPAN = np.int64(1) << np.int64(31)  # > 68 years of seconds: room for any key's time offsets


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

    def online(self) -> OnlineAggregate:
        return OnlineAggregate(self)


@dataclass(frozen=True)
class Distinct:
    """Number of distinct ``other`` values seen with the key strictly before the query time."""

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

    def online(self) -> OnlineDistinct:
        return OnlineDistinct(self)


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


def _window_sums(
    skey: np.ndarray, sts: np.ndarray, svals: np.ndarray, qkey: np.ndarray, qts: np.ndarray,
    window: int | None, t0: int,
):
    """Counts, value sums and prior-row times for each query from sorted-array searches."""
    order = np.lexsort((sts, skey))
    skey, sts, svals = skey[order], sts[order], svals[order]
    comb = skey * _SPAN + (sts - t0)
    qbase = qkey * _SPAN
    hi = np.searchsorted(comb, qbase + (qts - t0), side="left")
    start = np.searchsorted(comb, qbase, side="left")
    lo = start if window is None else np.searchsorted(comb, qbase + np.maximum(qts - window - t0, 0), "left")
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
    t0 = int(min(sts.min(initial=qts.min(initial=0)), qts.min(initial=0))) - (spec.window_s or 0) - 1
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
        pos = int(np.searchsorted(self.ts[: self.n], t, side="right"))
        if pos < self.n:  # out-of-order arrival: shift later rows right
            self.ts[pos + 1 : self.n + 1] = self.ts[pos : self.n]
            self.cum[pos + 2 : self.n + 2] = self.cum[pos + 1 : self.n + 1] + vals
        self.ts[pos] = t
        self.cum[pos + 1] = self.cum[pos] + vals
        self.n += 1


class OnlineAggregate:
    """Online executor of one :class:`Agg`: ingest source rows, answer queries at any time."""

    def __init__(self, spec: Agg):
        self.spec = spec
        self._series: dict[tuple, _KeySeries] = {}
        self._width = len(spec.values)

    def ingest(self, rows: pd.DataFrame, t_col: str = "_t") -> None:
        """Add source rows (any order; each key's history stays sorted)."""
        vals = rows[list(self.spec.values)].to_numpy(np.float64) if self._width else np.zeros((len(rows), 0))
        vals = np.nan_to_num(vals, nan=0.0)
        ts = rows[t_col].to_numpy(np.int64)
        keys = pd.MultiIndex.from_frame(rows[list(self.spec.keys)].astype(object))
        if not self._series and len(rows) > 1000:
            self._bulk_load(keys, ts, vals)
            return
        for key, t, v in zip(keys, ts, vals, strict=True):
            self.add(key, int(t), v)

    def _bulk_load(self, keys: pd.MultiIndex, ts: np.ndarray, vals: np.ndarray) -> None:
        codes, uniques = pd.factorize(keys)
        order = np.lexsort((ts, codes))
        codes, ts, vals = codes[order], ts[order], vals[order]
        bounds = np.flatnonzero(np.diff(codes)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(codes)]])
        for s, e in zip(starts, ends, strict=True):
            key = uniques[codes[s]]
            if any(pd.isna(k) for k in key):
                continue
            cum = np.zeros((e - s + 1, self._width))
            np.cumsum(vals[s:e], axis=0, out=cum[1:])
            self._series[key] = _KeySeries(ts=ts[s:e].copy(), cum=cum, n=e - s)

    def add(self, key: tuple, t: int, vals: np.ndarray) -> None:
        """Add one source row."""
        if any(pd.isna(k) for k in key):
            return
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _KeySeries(cum=np.zeros((1, self._width)))
        series.add(t, vals)

    def query(self, key: tuple, t: int) -> list[float]:
        """Feature values for one query row with key ``key`` at time ``t`` (same order as columns())."""
        spec = self.spec
        series = None if any(pd.isna(k) for k in key) else self._series.get(key)
        extra = 2 if spec.recency else 0
        if series is None or series.n == 0:
            return [0.0] * (1 + self._width) + [np.nan] * extra
        ts = series.ts[: series.n]
        hi = int(np.searchsorted(ts, t, side="left"))
        lo = 0 if spec.window_s is None else int(np.searchsorted(ts, t - spec.window_s, side="left"))
        out = [float(hi - lo), *(series.cum[hi] - series.cum[lo]).tolist()]
        if spec.recency:
            out += [float(t - ts[hi - 1]), float(t - ts[0])] if hi > 0 else [np.nan, np.nan]
        return out


_NO_VALUES = np.zeros(0)


class OnlineDistinct:
    """Online executor of one :class:`Distinct`: first time each (key, other) pair was seen."""

    def __init__(self, spec: Distinct):
        self.spec = spec
        self._first: dict[tuple, int] = {}
        self._agg = OnlineAggregate(Agg(spec.name, spec.source, spec.keys, window=spec.window))

    def ingest(self, rows: pd.DataFrame, t_col: str = "_t") -> None:
        cols = [*self.spec.keys, self.spec.other]
        for *key, other, t in rows[[*cols, t_col]].itertuples(index=False, name=None):
            if other is None or pd.isna(other) or any(pd.isna(k) for k in key):
                continue
            pair = (*key, other)
            prev = self._first.get(pair)
            t = int(t)
            if prev is None or t < prev:
                self._first[pair] = t
                if prev is not None:  # an earlier first sighting arrived late: move it
                    self._remove(tuple(key), prev)
                self._agg.add(tuple(key), t, _NO_VALUES)

    def _remove(self, key: tuple, t: int) -> None:
        series = self._agg._series[key]
        ts = series.ts[: series.n]
        pos = int(np.searchsorted(ts, t, side="left"))
        series.ts[pos : series.n - 1] = series.ts[pos + 1 : series.n]
        series.cum[pos + 1 : series.n] = series.cum[pos + 2 : series.n + 1]
        series.n -= 1

    def query(self, key: tuple, t: int) -> list[float]:
        return self._agg.query(key, t)[:1]
