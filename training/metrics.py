"""Evaluation metrics for review queues and the decision threshold.

Top-n% metrics rank by score (ties broken by row order, so results are deterministic) and take the first
``ceil(frac * n)`` rows: the queue a reviewer team with that capacity would work through.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

TOP_FRACTIONS = (0.01, 0.02, 0.05, 0.10)


def _arrays(y, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=float)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length ({len(y)} vs {len(s)})")
    return y, s


def top_k(n: int, frac: float) -> int:
    """Queue length for a capacity fraction: ``ceil(frac * n)``, at least 1 when ``n > 0``."""
    return min(n, max(1 if n else 0, math.ceil(frac * n - 1e-9)))


def top_mask(scores, frac: float) -> np.ndarray:
    """Boolean mask of the top ``frac`` rows by score (stable: earlier rows win ties)."""
    s = np.asarray(scores, dtype=float)
    order = np.argsort(-s, kind="stable")
    mask = np.zeros(len(s), dtype=bool)
    mask[order[: top_k(len(s), frac)]] = True
    return mask


def precision_recall_at(y, scores, frac: float) -> tuple[float, float]:
    """Precision and recall of the top ``frac`` rows by score."""
    y, s = _arrays(y, scores)
    mask = top_mask(s, frac)
    hits = float(y[mask].sum())
    precision = hits / float(mask.sum()) if mask.any() else float("nan")
    recall = hits / float(y.sum()) if y.sum() > 0 else float("nan")
    return precision, recall


def revenue_share_at(revenue, scores, frac: float) -> float:
    """Share of the total revenue (e.g. recovered duty) found in the top ``frac`` rows by score."""
    r = np.nan_to_num(np.asarray(revenue, dtype=float), nan=0.0)
    total = r.sum()
    return float(r[top_mask(scores, frac)].sum() / total) if total > 0 else float("nan")


def account_scores(transfers: pd.DataFrame, scores, account_cols: Sequence[str]) -> pd.Series:
    """Account score = max score of the transfers it takes part in (in any of ``account_cols``)."""
    s = np.asarray(scores, dtype=float)
    parts = [pd.DataFrame({"account": transfers[c].astype("string").to_numpy(), "score": s}) for c in account_cols]
    long = pd.concat(parts, ignore_index=True).dropna(subset=["account"])
    return long.groupby("account", sort=True)["score"].max()


def account_precision_recall_at_k(account_score: pd.Series, account_label: pd.Series, k: int) -> tuple[float, float]:
    """Precision and recall of the ``k`` highest-scored accounts.

    ``account_score`` covers the accounts active in the window; ``account_label`` (1 = fraud) is indexed by
    account id; accounts without a label count as negatives. Recall is over the positive accounts active
    in the window (an account with no transfer cannot be found by any transfer model).
    """
    labels = account_label.reindex(account_score.index).fillna(0).astype(float)
    order = np.lexsort((account_score.index.astype(str), -account_score.to_numpy(float)))
    top = labels.to_numpy()[order[:k]]
    positives = labels.sum()
    precision = float(top.mean()) if k > 0 and len(top) else float("nan")
    recall = float(top.sum() / positives) if positives > 0 else float("nan")
    return precision, recall


def typology_recall(y, scores, typology, frac: float) -> dict[str, float]:
    """Recall of each planted typology among the top ``frac`` rows (positives of that typology only)."""
    y, s = _arrays(y, scores)
    mask = top_mask(s, frac)
    typ = pd.Series(typology).astype("string").fillna("").to_numpy(object)
    out = {}
    for name in sorted({t for t in typ[y == 1] if t and t.lower() not in ("none", "normal", "nan")}):
        pos = (y == 1) & (typ == name)
        out[name] = float(mask[pos].mean())
    return out


def safe_auc(y, scores) -> tuple[float, float]:
    """ROC-AUC and PR-AUC (average precision); NaN when only one class is present."""
    y, s = _arrays(y, scores)
    if len(np.unique(y)) < 2:
        return float("nan"), float("nan")
    return float(roc_auc_score(y, s)), float(average_precision_score(y, s))


def evaluate(
    y,
    scores,
    *,
    capacity: float = 0.05,
    threshold: float | None = None,
    revenue=None,
    typology=None,
    calibrated: bool = True,
    fractions: Sequence[float] = TOP_FRACTIONS,
) -> dict[str, float]:
    """Standard metric dict of one model on one window.

    Keys: ``roc_auc``, ``pr_auc``, ``precision_at_{p}pct`` / ``recall_at_{p}pct`` for each fraction,
    ``brier`` (if ``calibrated``), ``revenue_share_at_{p}pct`` (if ``revenue``), ``flag_rate`` /
    ``precision_at_threshold`` / ``recall_at_threshold`` (if ``threshold``), ``recall_<typology>`` (if
    ``typology``), plus ``rows`` and ``positives``.
    """
    y, s = _arrays(y, scores)
    out: dict[str, float] = {"rows": float(len(y)), "positives": float(y.sum())}
    out["roc_auc"], out["pr_auc"] = safe_auc(y, s)
    for frac in sorted({*fractions, capacity}):
        p = pct_label(frac)
        out[f"precision_at_{p}pct"], out[f"recall_at_{p}pct"] = precision_recall_at(y, s, frac)
        if revenue is not None:
            out[f"revenue_share_at_{p}pct"] = revenue_share_at(revenue, s, frac)
    if calibrated:
        out["brier"] = float(brier_score_loss(y, np.clip(s, 0.0, 1.0))) if len(y) else float("nan")
    if threshold is not None:
        flagged = s >= threshold
        out["flag_rate"] = float(flagged.mean()) if len(y) else float("nan")
        out["precision_at_threshold"] = float(y[flagged].mean()) if flagged.any() else float("nan")
        out["recall_at_threshold"] = float(y[flagged].sum() / y.sum()) if y.sum() > 0 else float("nan")
    if typology is not None:
        for name, rec in typology_recall(y, s, typology, capacity).items():
            out[f"recall_{_slug(name)}"] = rec
    return out


def pct_label(frac: float) -> str:
    """0.05 -> "5", 0.025 -> "2_5" (metric-name safe)."""
    text = f"{frac * 100:.4f}".rstrip("0").rstrip(".")
    return text.replace(".", "_")


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in str(name).lower()).strip("_")


def capacity_key(capacity: float) -> str:
    """Metric name of precision at a review capacity, e.g. ``precision_at_5pct``."""
    return f"precision_at_{pct_label(capacity)}pct"


def threshold_for_capacity(scores, capacity: float = 0.05) -> float:
    """Score threshold flagging at most the top ``capacity`` share (``ceil(capacity*n)`` rows): the score of that
    row, or above it when a tie group crosses the cut (a threshold flags whole tie groups, and the review team
    cannot take more than its capacity); see :func:`edge_for_top_share`."""
    if len(np.asarray(scores)) == 0:
        raise ValueError("no scores to choose a threshold from")
    return edge_for_top_share(scores, capacity)


def edge_for_top_share(scores, share: float) -> float:
    """Lowest score edge at or above which at most the top ``share`` of rows lies (``ceil(share*n)`` rows),
    counting whole tie groups: a tie across the cut (isotonic calibration gives long runs of one score) stays
    below the edge. When the top tie group alone is larger, its score."""
    s = np.sort(np.asarray(scores, dtype=float))[::-1]
    if len(s) == 0:
        raise ValueError("no scores to choose an edge from")
    k = top_k(len(s), share)
    if k == len(s) or s[k] != s[k - 1]:
        return float(s[k - 1])
    first_of_tie = int(np.searchsorted(-s, -s[k - 1], side="left"))
    return float(s[max(first_of_tie - 1, 0)])


def threshold_for_precision(y, scores, target: float) -> float:
    """Lowest threshold whose flagged set (score >= threshold) reaches ``target`` precision.

    Falls back to the highest score (the smallest queue) when no threshold reaches the target.
    """
    y, s = _arrays(y, scores)
    if len(s) == 0:
        raise ValueError("no scores to choose a threshold from")
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order], s[order]
    last_of_tie = np.r_[ss[1:] != ss[:-1], True]  # a threshold flags whole tie groups
    precision = np.cumsum(ys) / np.arange(1, len(ys) + 1)
    ok = np.flatnonzero(last_of_tie & (precision >= target))
    return float(ss[ok[-1]]) if len(ok) else float(ss[0])
