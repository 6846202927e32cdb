"""The model bundle: everything serving needs to score and explain, in one MLflow artifact.

A bundle holds the LightGBM booster (native text format), the calibrator (isotonic steps as JSON),
the decision threshold, the categorical levels seen in training, feature labels and the drift
reference. Nothing is pickled: a bundle directory is plain text/JSON, safe to load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

BOOSTER_FILE = "booster.txt"
META_FILE = "bundle.json"


@dataclass
class Calibrator:
    """Monotone map from LightGBM raw margin to a calibrated probability (isotonic steps)."""

    x: list[float]
    y: list[float]
    method: str = "isotonic"

    def __call__(self, margin: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(margin, dtype=float), self.x, self.y)


@dataclass
class Reason:
    """One reason code: a feature, its value and its signed SHAP contribution (log-odds)."""

    feature: str
    label: str
    value: float | str | None
    contribution: float
    direction: str


@dataclass
class Explanation:
    """Score and its explanation for one item; ``base_value + sum(contributions) == raw_margin``."""

    score: float
    raw_margin: float
    base_value: float
    flagged: bool
    band: str
    reasons: list[Reason]
    contributions: dict[str, float] = field(repr=False)


@dataclass
class ModelBundle:
    """Booster + calibrator + threshold + metadata; see module docstring."""

    domain: str
    feature_names: list[str]
    categorical: dict[str, list[str]]
    feature_labels: dict[str, str]
    booster: lgb.Booster
    calibrator: Calibrator
    threshold: float
    bands: dict[str, float]
    feature_set_version: str
    label_delay_days: float = 0.0
    reference: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    data_path: str = ""  # the training data (first of data_paths; bundles before data_paths have only this)
    data_paths: list[str] = field(default_factory=list)  # every dataset the run read: training, then evaluation
    fitted_until: str = ""  # latest event time (ISO) of the windows it was fitted on: train, validation, calibration

    def history_paths(self) -> list[str]:
        """The data the model's features looked back on, which the service's entity history starts from."""
        return list(getattr(self, "data_paths", None) or ([self.data_path] if self.data_path else []))

    def matrix(self, features: pd.DataFrame) -> pd.DataFrame:
        """Model input frame: columns in training order, categoricals with the training levels."""
        return model_matrix(features, self.feature_names, self.categorical)

    def raw_margin(self, features: pd.DataFrame) -> np.ndarray:
        return self.booster.predict(self.matrix(features), raw_score=True)

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        """Calibrated probabilities."""
        return self.calibrator(self.raw_margin(features))

    def band(self, score: float) -> str:
        """Risk band name of a calibrated score (highest band whose lower edge it reaches)."""
        name = "low"
        for band, edge in sorted(self.bands.items(), key=lambda kv: kv[1]):
            if score >= edge:
                name = band
        return name

    def explain(self, features: pd.DataFrame, top_n: int = 5) -> list[Explanation]:
        """Scores with TreeSHAP contributions (LightGBM ``pred_contrib``), top reasons by |contribution|."""
        X = self.matrix(features)
        contrib = self.booster.predict(X, pred_contrib=True)
        margins = contrib.sum(axis=1)
        scores = self.calibrator(margins)
        out = []
        for i in range(len(X)):
            row = contrib[i, :-1]
            order = np.argsort(-np.abs(row), kind="stable")[:top_n]
            reasons = [
                Reason(
                    feature=self.feature_names[j],
                    label=self.feature_labels.get(self.feature_names[j], self.feature_names[j]),
                    value=_plain(features.iloc[i][self.feature_names[j]]),
                    contribution=float(row[j]),
                    direction="raises risk" if row[j] > 0 else "lowers risk",
                )
                for j in order
                if row[j] != 0.0
            ]
            score = float(scores[i])
            out.append(Explanation(
                score=score, raw_margin=float(margins[i]), base_value=float(contrib[i, -1]),
                flagged=score >= self.threshold, band=self.band(score), reasons=reasons,
                contributions={n: float(v) for n, v in zip(self.feature_names, row, strict=True)},
            ))
        return out

    def save(self, path: str | Path) -> Path:
        """Write the bundle as plain files (booster text + JSON)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(path / BOOSTER_FILE))
        meta = {k: v for k, v in asdict(self).items() if k not in ("booster", "calibrator")}
        meta["calibrator"] = asdict(self.calibrator)
        (path / META_FILE).write_text(json.dumps(meta, indent=1, default=_json_default))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelBundle:
        """Read a bundle written by :meth:`save`; raises a clear error if files are missing or corrupt."""
        path = Path(path)
        try:
            meta = json.loads((path / META_FILE).read_text())
            booster = lgb.Booster(model_file=str(path / BOOSTER_FILE))
        except (OSError, ValueError, lgb.basic.LightGBMError) as err:
            raise ValueError(f"model bundle at {path.name!r} is missing or corrupt: {err}") from err
        meta["calibrator"] = Calibrator(**meta["calibrator"])
        bundle = cls(booster=booster, **meta)
        if booster.feature_name() != bundle.feature_names:
            raise ValueError("model bundle is inconsistent: booster features differ from the bundle's list")
        return bundle


def model_matrix(features: pd.DataFrame, feature_names: list[str], categorical: dict[str, list[str]]) -> pd.DataFrame:
    """Model input frame: ``feature_names`` in order, categoricals with the given levels, numerics as float64
    (float32 columns are kept as they are).

    Shared by training and :meth:`ModelBundle.matrix` so both feed LightGBM the same encoding.
    """
    missing = [c for c in feature_names if c not in features.columns]
    if missing:
        raise ValueError(f"features missing for the model: {', '.join(missing)}")
    out = features[feature_names].copy()
    for col, levels in categorical.items():
        out[col] = pd.Categorical(out[col].astype("object"), categories=levels)
    for col in feature_names:
        if col not in categorical and out[col].dtype not in (np.float64, np.float32):
            out[col] = pd.to_numeric(out[col], errors="raise").astype(np.float64)
    return out


def _plain(value):
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
