"""A domain's feature set: specs + row-wise steps, executed in batch (training) or online (serving).

A :class:`FeatureSet` is the single definition of a domain's features:

* ``prepare_columns(events)``: row-wise columns computed from an event alone (log amount, HS chapter...), from
  a frame or from plain column arrays (the serving path: no pandas per request); ``prepare`` gives them as a frame;
* ``sources(events, labels, cases)``: the time-stamped tables that specs aggregate over, built by
  row-wise transforms only, so the online path can build them from increments;
* ``specs``: point-in-time aggregates (see :mod:`features.engine`, :mod:`features.graph`);
* ``derive(columns)``: row-wise features (numpy arrays by name) from the event's own columns and its
  aggregates -- plain numpy, so one online event costs microseconds, not pandas overhead.

:meth:`FeatureSet.build` runs it on a whole history; :class:`OnlineFeatures` holds incremental state
and answers single events in ``O(log n)``. The online-vs-batch tests of ``tests/test_finance_features.py`` and
``tests/test_customs_features.py`` prove both agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd

from features.engine import to_seconds

T_COL = "_t"
LABEL_KNOWN_AT = "label_known_at"  # optional event column: when its label was decided (reviewer outcomes)
# Event columns by name: a frame, or plain arrays / lists (strings with None for missing, datetimes, floats)
Columns = pd.DataFrame | Mapping[str, "np.ndarray | pd.Series | list"]
BUILD_CHUNK_ROWS = 500_000  # rows per derive() call in FeatureSet.build


class OnlineExecutor(Protocol):
    """Executors of multi-source specs also accept ``source=<name>`` telling which source ``rows`` came from."""

    def ingest(self, rows: pd.DataFrame, t_col: str = T_COL) -> None: ...
    def query(self, key: tuple, t: int) -> list[float]: ...


class SpecLike(Protocol):
    """A point-in-time spec; ``source`` is one source name, or a tuple of names for a multi-source spec."""

    name: str
    source: str | tuple[str, ...]

    @property
    def qkeys(self) -> tuple[str, ...]: ...
    def columns(self) -> list[str]: ...
    def batch(self, sources: dict[str, pd.DataFrame], query: pd.DataFrame) -> pd.DataFrame: ...
    def online(self, shared: dict | None = None) -> OnlineExecutor:
        """Online executor; specs may share state through ``shared`` (one dict per :class:`OnlineFeatures`)."""
        ...


@dataclass(frozen=True)
class FeatureDef:
    """A model input: column name, human-readable label, whether it is categorical, and whether it is a rate
    learned from outcomes for a category that is itself an input (``learned_rate``: its values move by design as
    outcomes accrue, so drift monitoring shows its shift but never calls for retraining on it alone)."""

    name: str
    label: str
    categorical: bool = False
    learned_rate: bool = False


@dataclass
class FeatureSet:
    """The single definition of one domain's features (see module docstring)."""

    domain: str
    id_col: str
    time_col: str
    label_col: str
    entity_cols: tuple[str, ...]
    prepare_columns: Callable[[Columns], dict[str, np.ndarray]]
    sources: Callable[..., dict[str, pd.DataFrame]]
    specs: list[SpecLike]
    derive: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    features: list[FeatureDef]
    version: str = "1"
    label_delay: pd.Timedelta = field(default_factory=lambda: pd.Timedelta(0))

    def __post_init__(self) -> None:
        if not self.label_delay >= pd.Timedelta(0):  # a negative delay shows each event its own label
            raise ValueError(f"the label delay must be >= 0 days (got {self.label_delay})")

    def prepare(self, events: pd.DataFrame) -> pd.DataFrame:
        """Row-wise columns of ``events`` (:attr:`prepare_columns`) as a frame with the events' index."""
        return pd.DataFrame(self.prepare_columns(events), index=events.index)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def categorical(self) -> list[str]:
        return [f.name for f in self.features if f.categorical]

    @property
    def learned_rates(self) -> list[str]:
        return [f.name for f in self.features if f.learned_rate]

    @property
    def labels(self) -> dict[str, str]:
        return {f.name: f.label for f in self.features}

    def label_known_at(self, labelled: pd.DataFrame) -> pd.Series:
        """When the outcomes of ``labelled`` events became known (:func:`label_known_at`)."""
        return label_known_at(labelled, labelled[self.time_col], self.label_delay)

    def prepared_labels(self, events: pd.DataFrame) -> pd.DataFrame:
        """Prepared labelled events stamped with the time their outcome became known (:meth:`label_known_at`)."""
        labelled = events[events[self.label_col].notna()] if self.label_col in events else events.iloc[:0]
        out = self.prepare(labelled)
        out[T_COL] = to_seconds(self.label_known_at(labelled))
        return out

    def build(
        self, events: pd.DataFrame, cases: pd.DataFrame | None = None, progress: Callable[[int], None] | None = None,
        dtype: np.dtype | type | None = None, chunk_rows: int = BUILD_CHUNK_ROWS,
    ) -> pd.DataFrame:
        """Point-in-time features for every event (batch executor), aligned with ``events``' rows.

        Numeric features are float64 (the values the online path gives) unless ``dtype`` says otherwise:
        ``dtype=np.float32`` halves the frame (training: LightGBM bins the values anyway). They are always computed
        in float64 and cast at the end, so float32 features are exactly the float64 ones rounded once. Memory stays
        near one float64 copy of the aggregates: each spec's output is kept as plain column arrays, ``derive`` (row
        wise) runs on slices of ``chunk_rows`` rows and writes into one preallocated numeric block.
        """
        prepared = self.prepare(events)
        labels = self._labels_from_prepared(events, prepared)
        sources = self.sources(events=prepared, labels=labels, cases=_empty_cases(cases))
        del labels
        columns = {c: prepared[c].to_numpy() for c in prepared.columns}
        narrowed: set[str] = set()  # aggregates stored as float32 because that holds them exactly (counts)
        for spec in self.specs:
            part = spec.batch(sources, prepared)
            for c in part.columns:
                columns[c], exact = _narrow(part[c].to_numpy())
                if exact:
                    narrowed.add(c)
            del part
            if progress is not None:
                progress(1)
        del sources
        return self._frame_chunked(columns, narrowed, events.index, np.dtype(dtype or np.float64), chunk_rows)

    def _labels_from_prepared(self, events: pd.DataFrame, prepared: pd.DataFrame) -> pd.DataFrame:
        """:meth:`prepared_labels` from the already prepared rows (``prepare`` is row-wise: same frame)."""
        if self.label_col not in events:
            return self.prepared_labels(events)
        mask = events[self.label_col].notna().to_numpy()
        out = prepared.take(np.flatnonzero(mask)) if not mask.all() else prepared.copy()
        if LABEL_KNOWN_AT in events:
            out[T_COL] = to_seconds(self.label_known_at(events[mask]).to_numpy())
        else:
            out[T_COL] = to_seconds((events[self.time_col] + self.label_delay).to_numpy()[mask])
        return out

    def _frame_chunked(self, columns: dict[str, np.ndarray], narrowed: set[str], index: pd.Index, dtype: np.dtype,
                       chunk_rows: int) -> pd.DataFrame:
        """:meth:`frame` of ``derive(columns)`` computed ``chunk_rows`` rows at a time into one numeric block."""
        n = len(index)
        cats = set(self.categorical)
        numeric = [name for name in self.names if name not in cats]
        block = np.empty((len(numeric), n), dtype=dtype)  # row j = feature numeric[j] (pandas' block layout)
        objects: dict[str, list[np.ndarray]] = {name: [] for name in self.names if name in cats}
        for start in range(0, max(n, 1), max(chunk_rows, 1)):
            stop = min(n, start + chunk_rows)
            derived = self.derive({c: a[start:stop].astype(np.float64) if c in narrowed else a[start:stop]
                                   for c, a in columns.items()})
            for j, name in enumerate(numeric):
                block[j, start:stop] = derived[name]
            for name, parts in objects.items():
                parts.append(np.asarray(derived[name]))
            del derived
        columns.clear()
        frame = pd.DataFrame(block.T, index=index, columns=numeric, copy=False)
        for name, parts in objects.items():
            values = np.concatenate(parts) if parts else np.empty(0, dtype=object)
            frame.insert(self.names.index(name), name, values)
        return frame

    def frame(self, derived: dict[str, np.ndarray], index: pd.Index) -> pd.DataFrame:
        """Model-input frame (feature order of :attr:`names`) from ``derive``'s columns."""
        return pd.DataFrame({n: derived[n] for n in self.names}, index=index)

    def online(self, events: pd.DataFrame | None = None, cases: pd.DataFrame | None = None) -> OnlineFeatures:
        """Online state seeded with a history of events (with their labels) and cases."""
        state = OnlineFeatures(self)
        if events is not None and len(events):
            state.ingest(events)
            state.ingest_labels(events)
        if cases is not None and len(cases):
            state.ingest_cases(cases)
        return state


def label_known_at(labelled: pd.DataFrame, times: pd.Series, delay: pd.Timedelta) -> pd.Series:
    """When the outcomes of ``labelled`` events (at ``times``) became known: event time + ``delay``, or the decision
    time in :data:`LABEL_KNOWN_AT` when that is later (a reviewer's outcome is known from its decision)."""
    known = (times + delay).astype("datetime64[ns]")
    if LABEL_KNOWN_AT in labelled:
        decided = pd.to_datetime(labelled[LABEL_KNOWN_AT]).astype("datetime64[ns]")
        known = known.where(~(decided > known), decided)
    return known


def rows_where(events: Columns, keep: np.ndarray) -> Columns:
    """The prepared rows of ``events`` where ``keep`` holds, as a source of specs: ``events`` itself when it holds
    everywhere, else a frame of those rows keeping their index (row positions for plain columns), which every
    executor (batch, online, the service's path, Dask) takes as a subset of the events."""
    if keep.all():
        return events
    rows = np.flatnonzero(keep)
    if isinstance(events, pd.DataFrame):
        return events.iloc[rows]
    return pd.DataFrame({col: np.asarray(values)[rows] for col, values in events.items()}, index=rows)


def _narrow(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """A float64 aggregate as float32 when that is exact (counts, flags), else an own float64 copy (so the spec's
    whole output block can be freed); ``(array, narrowed)``."""
    if values.dtype != np.float64:
        return values, False
    small = values.astype(np.float32)
    if np.array_equal(small, values, equal_nan=True):
        return small, True
    return np.array(values, copy=True), False


def _empty_cases(cases: pd.DataFrame | None) -> pd.DataFrame:
    if cases is not None:
        return cases
    return pd.DataFrame({
        "case_id": pd.Series(dtype="string"), "entity_kind": pd.Series(dtype="string"),
        "entity_id": pd.Series(dtype="string"), "opened_at": pd.Series(dtype="datetime64[ns]"),
        "closed_at": pd.Series(dtype="datetime64[ns]"), "outcome": pd.Series(dtype="string"),
    })


class OnlineFeatures:
    """Incremental feature state for serving: ingest history, answer new events one by one."""

    def __init__(self, fs: FeatureSet):
        self.fs = fs
        shared: dict = {}
        self.executors = [spec.online(shared) for spec in fs.specs]
        self.feeds = _feeds(fs.specs, self.executors)
        self.events_seen = 0

    def _route(self, sources: dict[str, pd.DataFrame]) -> None:
        for names, multi, feed in self.feeds:
            for name in names:
                rows = sources.get(name)
                if rows is not None and len(rows):
                    if multi:  # multi-source spec: say where the rows come from
                        feed.ingest(rows, source=name)
                    else:
                        feed.ingest(rows)

    def ingest(self, events: pd.DataFrame) -> None:
        """Add events (e.g. each scored item) to the history."""
        prepared = self.fs.prepare(events)
        self._route(self.fs.sources(events=prepared, labels=None, cases=None))
        self.events_seen += len(events)

    def ingest_labels(self, events: pd.DataFrame) -> None:
        """Add outcomes of events (label column set), known from event time + the label delay."""
        labels = self.fs.prepared_labels(events)
        if len(labels):
            self._route(self.fs.sources(events=None, labels=labels, cases=None))

    def ingest_cases(self, cases: pd.DataFrame) -> None:
        """Add closed cases (known from their closing time)."""
        self._route(self.fs.sources(events=None, labels=None, cases=cases))

    def features(self, events: pd.DataFrame) -> pd.DataFrame:
        """Features of new events given the state (events are not added; call :meth:`ingest`)."""
        prepared = self.fs.prepare(events)
        columns = {c: prepared[c].to_numpy() for c in prepared.columns}
        times = columns[T_COL].tolist()
        for spec, ex in zip(self.fs.specs, self.executors, strict=True):
            keys = zip(*(columns[k].tolist() for k in spec.qkeys), strict=True)
            values = np.array([ex.query(key, t) for key, t in zip(keys, times, strict=True)], dtype=np.float64)
            values = values.reshape(len(times), len(spec.columns()))
            for i, col in enumerate(spec.columns()):
                columns[col] = values[:, i]
        return self.fs.frame(self.fs.derive(columns), events.index)


def _feeds(specs: list[SpecLike], executors: list) -> list[tuple[tuple[str, ...], bool, object]]:
    """Where source rows go: each distinct ingest target once (an executor's shared ``feed``, or the executor),
    as (its source names, whether the spec has several sources, target)."""
    out, seen = [], set()
    for spec, ex in zip(specs, executors, strict=True):
        feed = getattr(ex, "feed", ex)
        if id(feed) in seen:
            continue
        seen.add(id(feed))
        multi = not isinstance(spec.source, str)
        out.append((tuple(spec.source) if multi else (spec.source,), multi, feed))
    return out
