"""A domain's feature set: specs + row-wise steps, executed in batch (training) or online (serving).

A :class:`FeatureSet` is the single definition of a domain's features:

* ``prepare(events)``: row-wise columns computed from an event alone (log amount, HS chapter...);
* ``sources(events, labels, cases)``: the time-stamped tables that specs aggregate over, built by
  row-wise transforms only, so the online path can build them from increments;
* ``specs``: point-in-time aggregates (see :mod:`features.engine`, :mod:`features.graph`);
* ``derive(columns)``: row-wise features (numpy arrays by name) from the event's own columns and its
  aggregates -- plain numpy, so one online event costs microseconds, not pandas overhead.

:meth:`FeatureSet.build` runs it on a whole history; :class:`OnlineFeatures` holds incremental state
and answers single events in ``O(log n)``. ``tests/test_feature_parity.py`` proves both agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd

from features.engine import to_seconds

T_COL = "_t"


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
    def online(self) -> OnlineExecutor: ...


@dataclass(frozen=True)
class FeatureDef:
    """A model input: column name, human-readable label, and whether it is categorical."""

    name: str
    label: str
    categorical: bool = False


@dataclass
class FeatureSet:
    """The single definition of one domain's features (see module docstring)."""

    domain: str
    id_col: str
    time_col: str
    label_col: str
    entity_cols: tuple[str, ...]
    prepare: Callable[[pd.DataFrame], pd.DataFrame]
    sources: Callable[..., dict[str, pd.DataFrame]]
    specs: list[SpecLike]
    derive: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    features: list[FeatureDef]
    version: str = "1"
    label_delay: pd.Timedelta = field(default_factory=lambda: pd.Timedelta(0))

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def categorical(self) -> list[str]:
        return [f.name for f in self.features if f.categorical]

    @property
    def labels(self) -> dict[str, str]:
        return {f.name: f.label for f in self.features}

    def prepared_labels(self, events: pd.DataFrame) -> pd.DataFrame:
        """Prepared labelled events stamped with the time their outcome became known (time + delay)."""
        labelled = events[events[self.label_col].notna()] if self.label_col in events else events.iloc[:0]
        out = self.prepare(labelled)
        out[T_COL] = to_seconds(labelled[self.time_col] + self.label_delay)
        return out

    def build(
        self, events: pd.DataFrame, cases: pd.DataFrame | None = None, progress: Callable[[int], None] | None = None
    ) -> pd.DataFrame:
        """Point-in-time features for every event (batch executor), aligned with ``events``' rows."""
        prepared = self.prepare(events)
        sources = self.sources(events=prepared, labels=self.prepared_labels(events), cases=_empty_cases(cases))
        parts = [prepared]
        for spec in self.specs:
            parts.append(spec.batch(sources, prepared))
            if progress is not None:
                progress(1)
        columns = {c: p[c].to_numpy() for p in parts for c in p.columns}
        return self.frame(self.derive(columns), events.index)

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
        self.executors = [spec.online() for spec in fs.specs]
        self.events_seen = 0

    def _route(self, sources: dict[str, pd.DataFrame]) -> None:
        for spec, ex in zip(self.fs.specs, self.executors, strict=True):
            if isinstance(spec.source, str):
                rows = sources.get(spec.source)
                if rows is not None and len(rows):
                    ex.ingest(rows)
                continue
            for name in spec.source:  # multi-source spec: say where the rows come from
                rows = sources.get(name)
                if rows is not None and len(rows):
                    ex.ingest(rows, source=name)

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
