"""Isotonic calibration of the LightGBM raw margin, fitted on the calibration window only.

The isotonic steps are made *strictly* increasing by a negligible tilt (at most ``2 * TILT`` in probability)
so that calibration never creates ties: ranking, top-n% queues and capacity thresholds stay those of the
raw margin. Tails are extended linearly to 0 and 1 far outside the fitted margin range.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import brier_score_loss

from training.bundle import Calibrator

TILT = 1e-4
TAIL = 50.0  # margin distance at which the extended tails reach 0 and 1


def sigmoid(margin) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(margin, dtype=float)))


def fit_calibrator(margin, y) -> Calibrator:
    """Isotonic map raw margin -> probability from the calibration window (strictly increasing)."""
    margin = np.asarray(margin, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(np.unique(y)) < 2:
        raise ValueError("calibration window needs both classes")
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(margin, y)
    x = np.asarray(iso.X_thresholds_, dtype=float)
    p = np.asarray(iso.y_thresholds_, dtype=float)
    if len(x) == 1:
        x, p = np.array([x[0] - 1.0, x[0] + 1.0]), np.array([p[0], p[0]])
    span = x[-1] - x[0]
    p = TILT + (1.0 - 3.0 * TILT) * p + TILT * (x - x[0]) / span
    x = np.r_[x[0] - TAIL, x, x[-1] + TAIL]
    p = np.r_[0.0, p, 1.0]
    return Calibrator(x=x.tolist(), y=p.tolist())


def brier_report(margin, y, calibrator: Calibrator) -> dict[str, float]:
    """Brier score of the uncalibrated sigmoid(margin) and of the calibrated probability."""
    y = np.asarray(y, dtype=float)
    return {
        "brier_uncalibrated": float(brier_score_loss(y, sigmoid(margin))),
        "brier_calibrated": float(brier_score_loss(y, calibrator(margin))),
    }


def reliability_plot(margin, y, calibrator: Calibrator, path: str | Path, bins: int = 10, title: str = "") -> Path:
    """Reliability diagram (observed rate vs predicted, quantile bins) before and after calibration (PNG)."""
    y = np.asarray(y, dtype=float)
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect")
    for name, prob in (("sigmoid(raw margin)", sigmoid(margin)), ("isotonic", calibrator(margin))):
        frac_pos, mean_pred = calibration_curve(y, prob, n_bins=bins, strategy="quantile")
        brier = brier_score_loss(y, prob)
        ax.plot(mean_pred, frac_pos, marker="o", label=f"{name} (Brier {brier:.4f})")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed positive rate")
    ax.set_title(title or "Reliability")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
