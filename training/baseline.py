"""Baseline: logistic regression in a scikit-learn Pipeline (impute + scale numerics, one-hot categoricals)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

MISSING = "<missing>"


def _clean(frame: pd.DataFrame, categorical: list[str]) -> pd.DataFrame:
    """Categoricals as plain strings (missing -> a level), numerics as float with inf -> NaN."""
    out = pd.DataFrame(index=frame.index)
    for col in frame.columns:
        if col in categorical:
            out[col] = frame[col].astype("string").fillna(MISSING).astype(object)
        else:
            out[col] = pd.to_numeric(frame[col], errors="coerce").astype(float).replace([np.inf, -np.inf], np.nan)
    return out


def make_baseline(
    feature_names: list[str], categorical: list[str], *, min_frequency: int = 20, C: float = 1.0, seed: int = 0
) -> Pipeline:
    """Unfitted pipeline: clean -> [median impute + indicator + scale | one-hot (min frequency)] -> LR (balanced)."""
    cats = [c for c in feature_names if c in categorical]
    nums = [c for c in feature_names if c not in categorical]
    numeric = Pipeline([
        ("impute", SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True)),
        ("scale", StandardScaler()),
    ])
    onehot = OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=min_frequency, sparse_output=True)
    columns = ColumnTransformer([("num", numeric, nums), ("cat", onehot, cats)], sparse_threshold=1.0)
    return Pipeline([
        ("clean", FunctionTransformer(_clean, kw_args={"categorical": cats})),
        ("columns", columns),
        ("model", LogisticRegression(class_weight="balanced", C=C, max_iter=2000, random_state=seed)),
    ])


def fit_baseline(
    X: pd.DataFrame, y, categorical: list[str], *, min_frequency: int = 20, C: float = 1.0, seed: int = 0
) -> Pipeline:
    """Fit the baseline on a feature frame; score with ``pipeline.predict_proba(X)[:, 1]``."""
    pipe = make_baseline(list(X.columns), categorical, min_frequency=min_frequency, C=C, seed=seed)
    return pipe.fit(X, np.asarray(y, dtype=int))
