"""LightGBM with native categoricals, early stopping on the validation window and a bounded random search.

Categoricals become pandas categories with the levels seen in the train window (the same encoding the
bundle applies at serving time, :func:`training.bundle.model_matrix`). Training is deterministic for a
given seed and thread count (``deterministic=True``, row-wise histograms).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import lightgbm as lgb
import numpy as np
import pandas as pd

from training.bundle import model_matrix

IMBALANCE = ("scale_pos_weight", "is_unbalance", "none")


@dataclass(frozen=True)
class LGBMConfig:
    """LightGBM hyper-parameters plus imbalance handling, seed and threads."""

    learning_rate: float = 0.05
    # Shallow trees: every served item carries its exact TreeSHAP contributions, whose cost grows with
    # leaves x depth^2 per tree. Unbounded depth with 63 leaves cost about 7 ms p50 / 11 ms p99 per finance row
    # (predict + pred_contrib, one thread); depth 6 with 31 leaves costs about 1 ms with the same quality on public
    # customs, AMLSim and the synthetic typologies (bench/RESULTS.md, "Where the time goes").
    num_leaves: int = 31
    max_depth: int = 6
    min_child_samples: int = 20
    feature_fraction: float = 0.9
    bagging_fraction: float = 0.8
    bagging_freq: int = 1
    lambda_l2: float = 1.0
    cat_smooth: float = 10.0
    cat_l2: float = 10.0
    min_data_per_group: int = 20
    max_cat_threshold: int = 32
    max_bin: int = 1023
    num_boost_round: int = 3000
    early_stopping_rounds: int = 150
    imbalance: str = "scale_pos_weight"  # "scale_pos_weight" | "is_unbalance" | "none"
    pos_weight_power: float = 0.5  # scale_pos_weight = (negatives / positives) ** power
    seed: int = 0
    num_threads: int = 2

    def params(self, y_train: np.ndarray) -> dict:
        """LightGBM ``params`` for a train window with labels ``y_train``."""
        if self.imbalance not in IMBALANCE:
            raise ValueError(f"imbalance must be one of {', '.join(IMBALANCE)}, not {self.imbalance!r}")
        params = {
            "objective": "binary",
            "metric": ["average_precision", "auc"],
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "max_depth": self.max_depth,
            "min_child_samples": self.min_child_samples,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": self.bagging_freq,
            "lambda_l2": self.lambda_l2,
            "cat_smooth": self.cat_smooth,
            "cat_l2": self.cat_l2,
            "min_data_per_group": self.min_data_per_group,
            "max_cat_threshold": self.max_cat_threshold,
            "max_bin": self.max_bin,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": self.num_threads,
            "verbosity": -1,
        }
        pos = float(np.sum(y_train))
        if self.imbalance == "is_unbalance":
            params["is_unbalance"] = True
        elif self.imbalance == "scale_pos_weight" and pos > 0:
            params["scale_pos_weight"] = ((len(y_train) - pos) / pos) ** self.pos_weight_power
        return params


@dataclass
class LGBMModel:
    """A fitted booster (trimmed to the best iteration) with its encoding and validation score."""

    booster: lgb.Booster
    feature_names: list[str]
    levels: dict[str, list[str]]
    config: LGBMConfig
    best_iteration: int
    valid_pr_auc: float
    params: dict

    def matrix(self, features: pd.DataFrame) -> pd.DataFrame:
        return model_matrix(features, self.feature_names, self.levels)

    def raw_margin(self, features: pd.DataFrame) -> np.ndarray:
        return self.booster.predict(self.matrix(features), raw_score=True)


def categorical_levels(frame: pd.DataFrame, categorical: list[str]) -> dict[str, list[str]]:
    """Sorted string levels of each categorical column present in ``frame`` (the train window)."""
    return {
        col: sorted(frame[col].dropna().astype(str).unique().tolist())
        for col in frame.columns
        if col in categorical
    }


def fit_lgbm(
    X_train: pd.DataFrame,
    y_train,
    X_valid: pd.DataFrame,
    y_valid,
    categorical: list[str],
    config: LGBMConfig = LGBMConfig(),
) -> LGBMModel:
    """Train with early stopping on the validation window (first metric: average precision)."""
    names = list(X_train.columns)
    levels = categorical_levels(X_train, categorical)
    y_train = np.asarray(y_train, dtype=float)
    y_valid = np.asarray(y_valid, dtype=float)
    params = config.params(y_train)
    cats = list(levels)
    dtrain = lgb.Dataset(model_matrix(X_train, names, levels), y_train, categorical_feature=cats or "auto",
                         free_raw_data=False)
    dvalid = lgb.Dataset(model_matrix(X_valid, names, levels), y_valid, reference=dtrain,
                         categorical_feature=cats or "auto", free_raw_data=False)
    booster = lgb.train(
        params, dtrain, num_boost_round=config.num_boost_round, valid_sets=[dvalid], valid_names=["validation"],
        callbacks=[lgb.early_stopping(config.early_stopping_rounds, first_metric_only=True, verbose=False)],
    )
    best = booster.best_iteration or booster.current_iteration()
    score = booster.best_score.get("validation", {}).get("average_precision", float("nan"))
    trimmed = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
    return LGBMModel(booster=trimmed, feature_names=names, levels=levels, config=config, best_iteration=best,
                     valid_pr_auc=float(score), params=params)


def sample_config(base: LGBMConfig, rng: np.random.Generator) -> LGBMConfig:
    """One random configuration around ``base`` (bounded ranges, log-uniform where it matters)."""

    def loguniform(lo: float, hi: float) -> float:
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    return replace(
        base,
        learning_rate=loguniform(0.01, 0.1),
        num_leaves=round(loguniform(8, 128)),
        min_child_samples=round(loguniform(5, 200)),
        feature_fraction=float(rng.uniform(0.4, 1.0)),
        bagging_fraction=float(rng.uniform(0.6, 1.0)),
        lambda_l2=loguniform(1e-3, 30.0),
        cat_smooth=loguniform(1.0, 100.0),
        min_data_per_group=round(loguniform(5, 200)),
        max_bin=int(rng.choice([255, 1023, 4095])),
    )


def random_search(
    X_train: pd.DataFrame,
    y_train,
    X_valid: pd.DataFrame,
    y_valid,
    categorical: list[str],
    base: LGBMConfig = LGBMConfig(),
    *,
    trials: int = 0,
    seconds: float | None = None,
) -> tuple[LGBMModel, list[dict]]:
    """Best of ``base`` and up to ``trials`` random configurations by validation PR-AUC.

    Stops early when ``seconds`` have elapsed (after at least the base fit). Trial configurations depend
    only on the seed, so a search bounded by ``trials`` alone is reproducible; a time bound may cut it short.
    Returns the best model and one log row per trial.
    """
    rng = np.random.default_rng(base.seed)
    start = time.monotonic()
    best = fit_lgbm(X_train, y_train, X_valid, y_valid, categorical, base)
    log = [{"trial": 0, "valid_pr_auc": best.valid_pr_auc, "best_iteration": best.best_iteration, **asdict(base)}]
    for trial in range(1, trials + 1):
        if seconds is not None and time.monotonic() - start >= seconds:
            break
        config = sample_config(base, rng)
        model = fit_lgbm(X_train, y_train, X_valid, y_valid, categorical, config)
        log.append({"trial": trial, "valid_pr_auc": model.valid_pr_auc, "best_iteration": model.best_iteration,
                    **asdict(config)})
        if model.valid_pr_auc > best.valid_pr_auc:
            best = model
    return best, log
