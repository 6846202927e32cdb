"""Time split of events into train / validation / calibration / test windows (never random).

Windows are contiguous in time and in this order. Boundaries are timestamps: every event at or after a
boundary belongs to the later window, so one timestamp is never split across two windows.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

WINDOWS = ("train", "validation", "calibration", "test")
DEFAULT_FRACTIONS = (0.6, 0.15, 0.1, 0.15)


@dataclass(frozen=True)
class Split:
    """Row positions of each window plus its time range (first, last event time)."""

    windows: dict[str, np.ndarray]
    ranges: dict[str, tuple[pd.Timestamp, pd.Timestamp]]
    embargoed: int = 0  # labelled events left out of the fitting windows: outcome known only after the test start

    def __getitem__(self, name: str) -> np.ndarray:
        return self.windows[name]

    def sizes(self) -> dict[str, int]:
        return {name: len(pos) for name, pos in self.windows.items()}

    def describe(self) -> dict[str, str]:
        """``{window: "first .. last (n rows)"}`` for logs and tags."""
        return {
            name: f"{self.ranges[name][0]} .. {self.ranges[name][1]} ({len(self.windows[name])} rows)"
            for name in self.windows
        }


def time_split(
    times: pd.Series | pd.DatetimeIndex | np.ndarray,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    dates: Sequence[str | pd.Timestamp] | None = None,
    names: Sequence[str] = WINDOWS,
) -> Split:
    """Split rows by time into ``names`` windows.

    ``fractions`` (one per window, summing to 1) place boundaries at row-count quantiles of time;
    ``dates`` (one per boundary, i.e. ``len(names) - 1``) give the start of each later window explicitly.
    A boundary is a timestamp, so all rows sharing a timestamp land in the same window. Raises
    ``ValueError`` if a window comes out empty.
    """
    t = pd.to_datetime(pd.Series(np.asarray(times))).to_numpy("datetime64[ns]")
    if len(t) == 0:
        raise ValueError("cannot split an empty table")
    if np.isnat(t).any():
        raise ValueError("event times contain missing values")
    order = np.argsort(t, kind="stable")
    sorted_t = t[order]
    if dates is not None:
        if len(dates) != len(names) - 1:
            raise ValueError(f"need {len(names) - 1} boundary dates for windows {', '.join(names)}")
        bounds = [np.datetime64(pd.Timestamp(d), "ns") for d in dates]
    else:
        if len(fractions) != len(names) or any(f <= 0 for f in fractions):
            raise ValueError(f"need {len(names)} positive fractions for windows {', '.join(names)}")
        cum = np.cumsum(np.asarray(fractions, float) / float(sum(fractions)))[:-1]
        bounds = [sorted_t[min(round(c * len(t)), len(t) - 1)] for c in cum]
    if any(b2 < b1 for b1, b2 in itertools.pairwise(bounds)):
        raise ValueError("split boundaries must be increasing")
    cuts = np.searchsorted(sorted_t, bounds, side="left")
    edges = [0, *cuts.tolist(), len(t)]
    windows, ranges = {}, {}
    for i, name in enumerate(names):
        pos = np.sort(order[edges[i]:edges[i + 1]])
        if len(pos) == 0:
            raise ValueError(f"time split leaves the {name} window empty (too few distinct timestamps?)")
        windows[name] = pos
        ranges[name] = (pd.Timestamp(sorted_t[edges[i]]), pd.Timestamp(sorted_t[edges[i + 1] - 1]))
    return Split(windows=windows, ranges=ranges)
