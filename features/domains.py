"""Domain registry: the feature set and event table of each domain."""

from __future__ import annotations

import importlib

import pandas as pd

from features.featureset import FeatureSet

DOMAINS = {"customs": "declarations", "finance": "transactions"}
DEFAULT_LABEL_DELAY_DAYS = {"customs": 0.0, "finance": 30.0}


def feature_set(domain: str, label_delay_days: float | None = None) -> FeatureSet:
    """The feature set of ``domain`` ("customs" or "finance")."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}: use one of {', '.join(DOMAINS)}")
    delay = DEFAULT_LABEL_DELAY_DAYS[domain] if label_delay_days is None else label_delay_days
    return importlib.import_module(f"features.{domain}").feature_set(label_delay_days=delay)


def events_of(data) -> pd.DataFrame:
    """The event table (declarations or transactions) of a loaded dataset."""
    return data.declarations if hasattr(data, "declarations") else data.transactions
