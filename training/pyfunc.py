"""MLflow pyfunc wrapper of a :class:`~training.bundle.ModelBundle` (the bundle directory is its artifact).

Input: a DataFrame of model features (``bundle.feature_names``; categoricals as strings). Output: one row per
input with ``score`` (calibrated probability), ``band`` and ``flagged`` (score >= threshold).
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import pandas as pd

from training.bundle import ModelBundle

BUNDLE_ARTIFACT = "bundle"


class RiskModel(mlflow.pyfunc.PythonModel):
    """pyfunc model: ``load_context`` reads the bundle artifact; ``predict`` scores feature rows."""

    def __init__(self) -> None:
        self.bundle: ModelBundle | None = None

    def load_context(self, context) -> None:
        self.bundle = ModelBundle.load(context.artifacts[BUNDLE_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if self.bundle is None:
            self.load_context(context)
        return predict_frame(self.bundle, pd.DataFrame(model_input))


def predict_frame(bundle: ModelBundle, features: pd.DataFrame) -> pd.DataFrame:
    """Score, band and flag of each feature row (what the pyfunc returns)."""
    scores = np.asarray(bundle.predict(features), dtype=float)
    return pd.DataFrame({
        "score": scores,
        "band": [bundle.band(float(s)) for s in scores],
        "flagged": scores >= bundle.threshold,
    }, index=features.index)


def signature_frame(features: pd.DataFrame, categorical: list[str]) -> pd.DataFrame:
    """Features as plain pandas types for MLflow schemas: categoricals object (None if missing), numerics float."""
    out = pd.DataFrame(index=features.index)
    for col in features.columns:
        if col in categorical:
            out[col] = features[col].astype("object").where(features[col].notna(), None)
        else:
            out[col] = pd.to_numeric(features[col], errors="coerce").astype(np.float64)
    return out
