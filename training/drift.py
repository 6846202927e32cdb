"""Drift monitoring: population stability index (PSI) of features and scores against a reference window (the
model's calibration window, stored in its bundle)."""

from __future__ import annotations

import numpy as np
import pandas as pd

BINS = 10
PSI_WATCH = 0.1
PSI_RETRAIN = 0.25
MIN_ITEMS = 200  # below this many recent items PSI is mostly sampling noise (empty bins): no drift verdict
_EPS = 1e-4


def reference_profile(features: pd.DataFrame, scores: np.ndarray, categorical: list[str], *, window: str,
                      learned_rates: list[str] | tuple = ()) -> dict:
    """Bins and shares of every feature and of the score on a reference window (stored in the bundle).

    ``learned_rates`` (``FeatureSet.learned_rates``) are marked ``watch_only``: their drift is reported up to
    ``watch``, never ``retrain``.
    """
    profile: dict = {"features": {}, "rows": len(features), "window": window}
    for col in features.columns:
        profile["features"][col] = _profile(features[col], col in categorical)
        if col in learned_rates:
            profile["features"][col]["watch_only"] = True
    profile["score"] = _profile(pd.Series(scores), False)
    return profile


def _profile(values: pd.Series, categorical: bool) -> dict:
    if categorical:
        shares = values.astype("object").fillna("<missing>").value_counts(normalize=True)
        top = shares.head(50)
        return {"kind": "categorical", "levels": [str(k) for k in top.index], "shares": top.tolist()}
    numeric = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
    finite = numeric[np.isfinite(numeric)]
    points = _mass_points(finite)
    rest = finite[_point_of(finite, points) < 0]
    edges = np.unique(np.quantile(rest, np.linspace(0, 1, BINS + 1)[1:-1])) if len(rest) else np.array([])
    return {"kind": "numeric", "points": points.tolist(), "edges": edges.tolist(),
            "shares": _numeric_shares(numeric, edges, points).tolist()}


def _mass_points(finite: np.ndarray) -> np.ndarray:
    """Values holding at least 1/BINS of the reference (a flag's 0 and 1, a count that is mostly 0): each gets
    its own bin. Quantile edges alone put all of a feature that is 0 in 90% of rows into one bin with everything
    above it, so a move of its mass went unseen."""
    if not len(finite):
        return np.array([])
    values, counts = np.unique(finite, return_counts=True)
    return values[counts >= len(finite) / BINS]


POINT_RTOL = 1e-6  # a mass point matches within float32 precision: a reference built from float32 features
# (``feature_dtype = "float32"``) holds 0.2 as 0.20000000298, which the service's float64 0.2 must still match


def _point_of(values: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Index of the mass point (sorted) each value equals within :data:`POINT_RTOL`, else -1."""
    if not len(points) or not len(values):
        return np.full(len(values), -1)
    right = np.clip(np.searchsorted(points, values), 0, len(points) - 1)
    left = np.clip(right - 1, 0, len(points) - 1)
    nearest = np.where(np.abs(points[left] - values) <= np.abs(points[right] - values), left, right)
    close = np.abs(points[nearest] - values) <= POINT_RTOL * np.maximum(1.0, np.abs(points[nearest]))
    return np.where(close, nearest, -1)


def _numeric_shares(values: np.ndarray, edges: np.ndarray, points: np.ndarray | None = None) -> np.ndarray:
    """Shares of: each mass point, the ranges between ``edges`` of the other values, missing (in that order)."""
    points = np.array([]) if points is None else np.asarray(points, dtype=np.float64)
    missing = ~np.isfinite(values)
    finite = values[~missing]
    point = _point_of(finite, points)
    at_point = point >= 0
    point_counts = np.bincount(point[at_point], minlength=len(points))
    bins = np.searchsorted(edges, finite[~at_point], side="right")
    counts = np.concatenate([point_counts, np.bincount(bins, minlength=len(edges) + 1), [missing.sum()]])
    return counts.astype(float) / max(len(values), 1)


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index between two share vectors."""
    e = np.clip(np.asarray(expected, float), _EPS, None)
    a = np.clip(np.asarray(actual, float), _EPS, None)
    return float(np.sum((a - e) * np.log(a / e)))


def feature_psi(profile: dict, values: pd.Series) -> float:
    """PSI of current values of one feature against its reference profile."""
    if profile["kind"] == "categorical":
        current = values.astype("object").fillna("<missing>").astype(str).value_counts(normalize=True)
        expected = np.append(profile["shares"], max(0.0, 1 - sum(profile["shares"])))
        actual = [current.get(level, 0.0) for level in profile["levels"]]
        actual.append(max(0.0, 1 - sum(actual)))
        return psi(expected, np.array(actual))
    numeric = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
    edges = np.asarray(profile["edges"], np.float64)
    points = np.asarray(profile.get("points", []), np.float64)  # profiles of older bundles have none
    expected = np.asarray(profile["shares"])
    if len(expected) == len(points) + len(edges) + 1:  # profiles without a missing bucket
        expected = np.append(expected, 0.0)
    return psi(expected, _numeric_shares(numeric, edges, points))


def drift_report(profile: dict, features: pd.DataFrame, scores: np.ndarray | None) -> pd.DataFrame:
    """PSI per feature and for the score (unless ``scores`` is None: another model's), with a status: ok, watch
    (>= 0.1) or retrain (>= 0.25; ``watch`` for the profile's ``watch_only`` features, the learned outcome rates of
    :func:`reference_profile`)."""
    rows = [
        {"name": col, "psi": feature_psi(prof, features[col]), "watch_only": bool(prof.get("watch_only"))}
        for col, prof in profile["features"].items()
        if col in features.columns
    ]
    if scores is not None:
        rows.append({"name": "score", "psi": feature_psi(profile["score"], pd.Series(scores)), "watch_only": False})
    report = pd.DataFrame(rows)
    report["status"] = np.select(
        [(report["psi"] >= PSI_RETRAIN) & ~report["watch_only"], report["psi"] >= PSI_WATCH], ["retrain", "watch"],
        "ok",
    )
    report = report.drop(columns="watch_only")
    return report.sort_values("psi", ascending=False, ignore_index=True)


def drift_summary(report: pd.DataFrame, top: int = 5, items: int | None = None, min_items: int = MIN_ITEMS) -> dict:
    """Worst status, whether retraining is due (the score or any feature at ``retrain``) and the worst names.

    With fewer than ``min_items`` recent ``items`` the status is ``insufficient`` and retraining is never due: a
    few dozen rows leave most bins empty, and a sample of the reference window itself reads as drifted.
    """
    status = report["status"].tolist()
    worst = "retrain" if "retrain" in status else "watch" if "watch" in status else "ok"
    if items is not None and items < min_items:
        worst = "insufficient"
    score = report.loc[report["name"] == "score", "psi"]
    return {
        "status": worst,
        "retrain_due": worst == "retrain",
        "score_psi": float(score.iloc[0]) if len(score) else None,
        "worst": [{"name": n, "psi": round(float(v), 4)} for n, v in zip(report["name"][:top], report["psi"][:top],
                                                                       strict=True)],
    }
