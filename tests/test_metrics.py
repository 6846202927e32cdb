"""Metrics and threshold choosers on hand-made arrays."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from training.metrics import (
    account_precision_recall_at_k,
    account_scores,
    capacity_key,
    edge_for_top_share,
    evaluate,
    precision_recall_at,
    revenue_share_at,
    threshold_for_capacity,
    threshold_for_precision,
    top_k,
    top_mask,
    typology_recall,
)

# 20 rows, scores descending with the row number; positives at ranks 1, 2, 4, 11, 20
Y = np.zeros(20)
Y[[0, 1, 3, 10, 19]] = 1
S = np.linspace(1.0, 0.05, 20)


def test_top_k_rounds_up_and_keeps_one():
    assert top_k(20, 0.05) == 1
    assert top_k(20, 0.10) == 2
    assert top_k(21, 0.10) == 3
    assert top_k(1000, 0.05) == 50
    assert top_k(10, 0.001) == 1
    assert top_k(0, 0.05) == 0


def test_precision_recall_at_top_fraction():
    assert precision_recall_at(Y, S, 0.05) == (1.0, 0.2)  # top 1 row
    assert precision_recall_at(Y, S, 0.10) == (1.0, 0.4)  # top 2
    p, r = precision_recall_at(Y, S, 0.20)  # top 4: ranks 1, 2, 4 positive
    assert p == pytest.approx(0.75) and r == pytest.approx(0.6)
    p, r = precision_recall_at(Y, S, 1.0)
    assert p == pytest.approx(0.25) and r == pytest.approx(1.0)


def test_ties_are_broken_by_row_order():
    y = np.array([0, 1, 0, 1])
    s = np.array([0.5, 0.5, 0.5, 0.5])
    assert top_mask(s, 0.5).tolist() == [True, True, False, False]
    assert precision_recall_at(y, s, 0.5) == (0.5, 0.5)


def test_revenue_share_at():
    revenue = np.zeros(20)
    revenue[[0, 3, 10]] = [50.0, 30.0, 20.0]
    assert revenue_share_at(revenue, S, 0.05) == pytest.approx(0.5)
    assert revenue_share_at(revenue, S, 0.20) == pytest.approx(0.8)
    assert revenue_share_at(revenue, S, 1.0) == pytest.approx(1.0)
    assert math.isnan(revenue_share_at(np.zeros(20), S, 0.1))
    with_nan = revenue.copy()
    with_nan[5] = np.nan
    assert revenue_share_at(with_nan, S, 0.05) == pytest.approx(0.5)


def test_account_scores_take_the_max_over_both_sides():
    tx = pd.DataFrame({"source_account": ["A", "A", "B", "C"], "target_account": ["B", "C", "D", None]})
    acc = account_scores(tx, [0.1, 0.9, 0.3, 0.2], ["source_account", "target_account"])
    assert acc.to_dict() == {"A": 0.9, "B": 0.3, "C": 0.9, "D": 0.3}


def test_account_precision_recall_at_k():
    acc = pd.Series({"A": 0.9, "B": 0.8, "C": 0.7, "D": 0.6, "E": 0.1})
    labels = pd.Series({"A": 1, "C": 1, "E": 1, "Z": 1, "B": 0})  # Z is not active; D has no label
    assert account_precision_recall_at_k(acc, labels, 1) == (1.0, pytest.approx(1 / 3))
    p, r = account_precision_recall_at_k(acc, labels, 3)
    assert p == pytest.approx(2 / 3) and r == pytest.approx(2 / 3)
    p, r = account_precision_recall_at_k(acc, labels, 5)
    assert p == pytest.approx(3 / 5) and r == pytest.approx(1.0)
    # ties on score: account id order decides, deterministically
    tied = pd.Series({"B": 0.5, "A": 0.5})
    assert account_precision_recall_at_k(tied, pd.Series({"A": 1}), 1) == (1.0, 1.0)


def test_typology_recall_at_capacity():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.3, 0.3, 0.3, 0.3])
    typ = pd.Series(["a", "a", "b", None, None, None, None, None, None, None], dtype="string")
    assert typology_recall(y, s, typ, 0.2) == {"a": 0.5, "b": 1.0}  # top 2 rows: 0 and 2


def test_edge_for_top_share_keeps_a_tie_across_the_cut_below_it():
    assert edge_for_top_share(S, 0.20) == pytest.approx(np.sort(S)[::-1][3])  # no ties: the k-th score
    tied = np.r_[0.9, 0.6, 0.6, np.full(17, 0.1)]  # isotonic-like: one long run at the bottom
    assert edge_for_top_share(tied, 0.20) == 0.6 and (tied >= 0.6).sum() == 3
    assert edge_for_top_share(tied, 0.10) == 0.9  # the 0.6 pair crosses the 2-row cut
    assert edge_for_top_share(np.full(5, 0.3), 0.2) == 0.3  # one group: nothing smaller to choose
    assert edge_for_top_share(tied, 1.0) == 0.1


def test_thresholds():
    assert threshold_for_capacity(S, 0.10) == pytest.approx(S[1])
    flagged = threshold_for_capacity(S, 0.20) <= S
    assert flagged.sum() == 4
    # precision of the top-n: 1, 1, 2/3, 3/4, 3/5 ... -> lowest threshold with precision >= 0.75 is rank 4
    assert threshold_for_precision(Y, S, 0.75) == pytest.approx(S[3])
    assert threshold_for_precision(Y, S, 1.0) == pytest.approx(S[1])
    assert threshold_for_precision(np.zeros(20), S, 0.5) == pytest.approx(S[0])  # unreachable: smallest queue
    # a threshold flags whole tie groups: one crossing the cut stays below it (it flagged 60% at capacity 30%)
    tied = np.array([0.9, 0.8, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1])
    assert threshold_for_capacity(tied, 0.3) == 0.8 and (tied >= 0.8).mean() <= 0.3
    assert threshold_for_capacity(tied, 0.6) == 0.5  # the cut falls after the tie group: all of it


def test_threshold_for_precision_flags_whole_tie_groups():
    y = np.array([1, 1, 0, 0])
    s = np.array([0.9, 0.5, 0.5, 0.1])
    # the first 0.5 row alone would keep precision 1, but a threshold of 0.5 flags the whole tie group (2/3)
    assert threshold_for_precision(y, s, 0.9) == pytest.approx(0.9)
    assert threshold_for_precision(y, s, 0.6) == pytest.approx(0.5)
    assert threshold_for_precision(y, s, 0.5) == pytest.approx(0.1)


def test_evaluate_keys_and_values():
    revenue = np.where(Y == 1, 10.0, 0.0)
    typ = pd.Series(np.where(Y == 1, "x", None))
    m = evaluate(Y, S, capacity=0.05, threshold=S[3], revenue=revenue, typology=typ)
    assert m["rows"] == 20 and m["positives"] == 5
    assert m["precision_at_5pct"] == 1.0 and m["recall_at_10pct"] == pytest.approx(0.4)
    assert m["revenue_share_at_5pct"] == pytest.approx(0.2)
    assert m["flag_rate"] == pytest.approx(0.2) and m["precision_at_threshold"] == pytest.approx(0.75)
    assert m["recall_x"] == pytest.approx(0.2)
    assert 0.5 < m["roc_auc"] <= 1 and 0 < m["pr_auc"] <= 1 and 0 <= m["brier"] <= 1
    assert capacity_key(0.05) == "precision_at_5pct" and capacity_key(0.025) == "precision_at_2_5pct"
    assert "precision_at_2_5pct" in evaluate(Y, S, capacity=0.025)


def test_evaluate_one_class_gives_nan_auc():
    m = evaluate(np.zeros(5), np.arange(5.0) / 5)
    assert math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"])
