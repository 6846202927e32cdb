"""End-to-end training: load -> point-in-time features -> time split -> baseline, raw-column and full LightGBM ->
isotonic calibration -> threshold -> evaluation -> MLflow run -> registry (challenger / champion).

Features are built once over all events: they are point-in-time, so one pass serves every window. With an
evaluation file (``config.eval_path``), both files are concatenated for the features (evaluation-period
features see the training history and earlier evaluation-period outcomes only); the training file is split
into train / validation / calibration by time and the evaluation file is the test window.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from features.datasets import (
    EVENTS,
    derive_cases,
    given_cases,
    load_dataset,
    load_datasets,
    merge_cases,
    read_table,
)
from features.domains import events_of
from features.domains import feature_set as domain_feature_set
from features.featureset import FeatureSet
from training.baseline import fit_baseline
from training.bundle import Calibrator, ModelBundle
from training.calibrate import brier_report, fit_calibrator, sigmoid
from training.drift import reference_profile
from training.lgbm import LGBMConfig, LGBMModel, fit_lgbm, random_search
from training.metrics import (
    account_precision_recall_at_k,
    account_scores,
    capacity_key,
    edge_for_top_share,
    evaluate,
    threshold_for_capacity,
    threshold_for_precision,
    top_k,
)
from training.outcomes import read_reviewer_outcomes
from training.split import DEFAULT_FRACTIONS, Split, time_split

log = logging.getLogger(__name__)

MODELS = ("baseline", "lgbm_raw", "full")
MODEL_TITLES = {"baseline": "Logistic regression (all features)", "lgbm_raw": "LightGBM, raw columns only",
                "full": "LightGBM, full pipeline"}
EVAL_WINDOWS = ("validation", "test")
ACCOUNT_COLS = ("source_account", "target_account")
UNBOUNDED_TRIALS = 10_000  # --search-seconds without --search-trials: as many trials as the time allows


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run besides the data (same data + config -> same metrics)."""

    seed: int = 0
    capacity: float = 0.05  # review capacity: share of events reviewers can inspect
    target_precision: float | None = None  # threshold by precision instead of capacity
    label_delay_days: float | None = None  # None: the domain default
    cases_path: str | None = None  # extra reviewer outcomes (cases parquet/CSV)
    reviewer_outcomes: bool = True  # read outcomes recorded through the service from the audit store
    audit_url: str | None = None  # None: $RISKSCORE_AUDIT_URL or <RISKSCORE_HOME>/audit.db
    eval_path: str | None = None  # separate evaluation file = test window
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS  # train, validation, calibration, test
    split_dates: tuple[str, ...] | None = None  # explicit starts of validation, calibration, test
    # events in the first days of the data are history only: there every entity looks new, unlike in service
    warmup_days: float = 0.0
    eval_fractions: tuple[float, ...] = (0.7, 0.15, 0.15)  # train, validation, calibration of the train file
    search_trials: int = 0
    search_seconds: float | None = None
    num_threads: int = 2
    lgbm: LGBMConfig = field(default_factory=LGBMConfig)
    register: bool = True
    track: bool = True  # False: no MLflow run at all (quick experiments); implies no registration
    shuffle_labels: bool = False  # sanity check: permute labels before features; every metric should be chance
    shap_sample: int = 1000
    quiet: bool = False
    engine: str = "pandas"  # "dask": features and the full LightGBM on a Dask cluster (features.dask_engine)
    scheduler: str | None = None  # Dask scheduler address (tcp://host:8786); None: an in-process LocalCluster
    # numeric training features: float64 = exactly the values the service computes online (no train/serve skew);
    # "float32" halves the feature memory for very large runs (bench/train_scale.py uses it at 10^7 rows)
    feature_dtype: str = "float64"
    baseline_max_rows: int = 1_000_000  # logistic regression fitted on a seeded sample of at most this many rows

    def __post_init__(self) -> None:
        if not 0 < self.capacity <= 1:
            raise ValueError(f"capacity is a share of the events: 0 < capacity <= 1 (got {self.capacity})")
        if self.target_precision is not None and not 0 < self.target_precision <= 1:
            raise ValueError(f"target precision must be in (0, 1] (got {self.target_precision})")
        if self.search_trials < 0 or self.num_threads < 1 or (self.search_seconds is not None
                                                              and self.search_seconds <= 0):
            raise ValueError("search_trials must be >= 0, num_threads >= 1 and search_seconds > 0")
        if self.warmup_days < 0:
            raise ValueError(f"warmup_days must be >= 0 (got {self.warmup_days})")
        if self.engine not in ("pandas", "dask"):
            raise ValueError(f"engine must be pandas or dask, not {self.engine!r}")
        if self.scheduler and self.engine != "dask":
            raise ValueError("a Dask scheduler is only used with engine = dask (--engine dask)")

    @property
    def registers(self) -> bool:
        """Whether the run registers its model: tracked, ``register`` and not a shuffled-label check (a model of
        permuted labels must never become a challenger, let alone the first champion)."""
        return self.track and self.register and not self.shuffle_labels

    def lgbm_config(self) -> LGBMConfig:
        return replace(self.lgbm, seed=self.seed, num_threads=self.num_threads)

    def flat(self) -> dict[str, object]:
        """Config as flat ``key: value`` pairs (MLflow params; ``quiet`` is output, not a setting of the run)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("lgbm", "quiet")}
        out.update({f"lgbm.{k}": v for k, v in asdict(self.lgbm).items()})
        return out


NOT_CONFIG = ("domain", "data", "train")  # run inputs that may sit in the same TOML file


def read_toml(path: str | Path) -> dict:
    """Settings from a TOML file with keys normalised (``target-precision`` -> ``target_precision``)."""
    with open(path, "rb") as fh:
        try:
            raw = tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: {err}") from None
    out = {k.replace("-", "_"): v for k, v in raw.items()}
    if isinstance(out.get("lgbm"), dict):
        out["lgbm"] = {k.replace("-", "_"): v for k, v in out["lgbm"].items()}
    return out


def load_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from a TOML file (the CLI flags' keys; a ``[lgbm]`` table for LightGBM) with
    ``overrides`` that are not None applied on top. ``domain`` / ``data`` / ``train`` keys are ignored here;
    unknown keys raise ``ValueError``."""
    raw = read_toml(path) if path is not None else {}
    raw.update({k.replace("-", "_"): v for k, v in overrides.items() if v is not None})
    for key in NOT_CONFIG:
        raw.pop(key, None)
    if "no_register" in raw:
        raw["register"] = not raw.pop("no_register")
    for short, full in (("eval", "eval_path"), ("cases", "cases_path")):
        if short in raw:
            raw[full] = raw.pop(short)
    lgbm_raw = dict(raw.pop("lgbm", None) or {})
    unknown = sorted(set(raw) - {f.name for f in fields(TrainConfig)})
    unknown += sorted(f"lgbm.{k}" for k in set(lgbm_raw) - {f.name for f in fields(LGBMConfig)})
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
    _check_types(TrainConfig, raw)
    _check_types(LGBMConfig, lgbm_raw, "lgbm.")
    for key in ("fractions", "eval_fractions", "split_dates"):
        if raw.get(key) is not None:
            raw[key] = tuple(raw[key])
    return TrainConfig(lgbm=LGBMConfig(**lgbm_raw), **raw)


_KINDS = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,), "tuple": (list, tuple)}


def _check_types(cls, values: dict, prefix: str = "") -> None:
    """``ValueError`` naming the key when a setting (from a TOML file) has the wrong type for ``cls``'s field."""
    types = {f.name: str(f.type) for f in fields(cls)}
    for key, value in values.items():
        if value is None:
            continue
        kinds = ["tuple"] if types[key].startswith("tuple") else [k for k in _KINDS if k in types[key]]
        allowed = [_KINDS[k] for k in kinds]
        if not allowed:
            continue
        ok = any(isinstance(value, kind) for kind in allowed)
        if isinstance(value, bool) and bool not in sum(allowed, ()):
            ok = False
        if not ok:
            expected = " or ".join("a list" if k == "tuple" else k for k in kinds)
            raise ValueError(f"config key {prefix}{key} must be {expected}, not {value!r}")


@dataclass
class TrainData:
    """All events of the run (train file then eval file), cases, accounts and where each row came from."""

    events: pd.DataFrame
    cases: pd.DataFrame
    accounts: pd.DataFrame | None
    from_eval: np.ndarray  # True for rows of the evaluation file
    paths: list[str]
    reviewed: int = 0  # scored events added from the audit store (last rows; labelled where a reviewer decided)
    reviewed_labels: int = 0  # of which reviewer-labelled
    overlap: int = 0  # events of the data dropped for ids that the evaluation file gives to events at other times

    def reviewer_rows(self) -> np.ndarray:
        """True for the scored events added from the audit store (labelled where a reviewer decided)."""
        return np.arange(len(self.events)) >= len(self.events) - self.reviewed


@dataclass
class ModelResult:
    """One fitted model: calibrated scores per window, threshold and metrics per window."""

    name: str
    calibrator: Calibrator
    threshold: float
    scores: dict[str, np.ndarray]  # calibrated, per window
    margins: dict[str, np.ndarray]  # uncalibrated score (raw margin / logit), per window
    metrics: dict[str, dict[str, float]]
    features: list[str]


@dataclass
class TrainResult:
    """What :func:`train` produced; ``run_id`` / ``model_version`` / ``promotion`` are set when tracked."""

    domain: str
    config: TrainConfig
    bundle: ModelBundle
    models: dict[str, ModelResult]
    table: pd.DataFrame
    split: Split
    features: pd.DataFrame  # full feature frame, aligned with data.events
    data: TrainData
    fs: FeatureSet
    lgbm: LGBMModel
    search_log: list[dict]
    fingerprint: str
    timings: dict[str, float]
    run_id: str | None = None
    model_version: str | None = None
    promotion: dict | None = None

    @property
    def metrics(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{model: {window: {metric: value}}}``."""
        return {name: m.metrics for name, m in self.models.items()}

    def window(self, name: str) -> tuple[pd.DataFrame, np.ndarray]:
        """Features and labels of one window."""
        pos = self.split[name]
        return self.features.iloc[pos], _labels(self.data.events, self.fs).iloc[pos].to_numpy(float)


# ---------------------------------------------------------------------------------------------- data


def load_training_data(domain: str, data_path: str | Path | Sequence[str | Path], config: TrainConfig, *,
                       drop_overlap: bool = False) -> TrainData:
    """Load the training data (and evaluation file, extra cases) onto the contracts.

    ``data_path`` may be several datasets read as one (:func:`~features.datasets.load_datasets`). An event id in
    both the data and the evaluation file is an error, unless ``drop_overlap``: then the data's copy is dropped
    (the data is only history that the evaluation file's features look back on).
    """
    data_paths = [data_path] if isinstance(data_path, str | Path) else list(data_path)
    first = load_datasets(domain, data_paths, config.label_delay_days)
    datasets = [first]
    overlap = 0
    fs_id = EVENTS[domain][2]
    if config.eval_path:
        datasets.append(load_dataset(domain, config.eval_path, config.label_delay_days))
    if len(datasets) == 1:  # no concat copy: the loaded frame is ours
        events = events_of(first)
        events.index = pd.RangeIndex(len(events))
        n_first = len(events)
    else:
        earlier = events_of(first)
        if drop_overlap:
            later = events_of(datasets[1])
            same = earlier[fs_id].isin(later[fs_id])
            if same.any():  # the same id at another time: another event, not a copy of it
                fs_time = EVENTS[domain][1]
                was = earlier.loc[same].drop_duplicates(fs_id).set_index(fs_id)[fs_time]
                now = later.drop_duplicates(fs_id).set_index(fs_id)[fs_time].reindex(was.index)
                overlap = int((was != now).sum())
            earlier = earlier[~same]
        events = pd.concat([earlier] + [events_of(d) for d in datasets[1:]], ignore_index=True)
        n_first = len(earlier)
    dup = events[fs_id].duplicated()
    if dup.any():
        raise ValueError(f"event id {events.loc[dup, fs_id].iloc[0]!r} occurs in both the train and eval data")
    if len(datasets) == 1:
        cases = first.cases
    else:  # as load_datasets: cases implied by labels come from the events kept (a dropped copy's do not survive)
        given = pd.concat([given_cases(d.cases) for d in datasets], ignore_index=True)
        cases = merge_cases(given.drop_duplicates("case_id", keep="last", ignore_index=True),
                            derive_cases(domain, events, config.label_delay_days))
    if config.cases_path:
        reviewer = read_table(Path(config.cases_path), "cases")
        cases = merge_cases(reviewer, cases)
    n_reviewed = n_labels = 0
    if config.reviewer_outcomes and (reviewed := read_reviewer_outcomes(
            domain, config.audit_url, skip_event_ids=set(events[fs_id].astype(str)))) is not None:
        cases = merge_cases(reviewed.cases, cases)  # events of the data keep the data's label and cases
        if len(reviewed.events):
            events = pd.concat([events, reviewed.events], ignore_index=True)
        n_reviewed, n_labels = len(reviewed.events), reviewed.labelled
    accounts = None
    if domain == "finance":
        accounts = pd.concat([d.accounts for d in datasets], ignore_index=True).drop_duplicates(
            "account_id", keep="last", ignore_index=True)  # the evaluation file's copy wins (as load_datasets)
    from_eval = np.r_[np.zeros(n_first, bool), np.ones(len(events) - n_first - n_reviewed, bool),
                      np.zeros(n_reviewed, bool)]
    paths = [str(Path(p).resolve()) for p in data_paths]
    paths += [str(Path(config.eval_path).resolve())] if config.eval_path else []
    return TrainData(events=events, cases=cases, accounts=accounts, from_eval=from_eval, paths=paths,
                     reviewed=n_reviewed, reviewed_labels=n_labels, overlap=overlap)


def shuffle_labels(domain: str, data: TrainData, label_col: str, seed: int, delay: float | None) -> TrainData:
    """Labels permuted among labelled events, and every case derived from the permuted labels (leakage guard):
    cases of other sources (reviewer outcomes, ``--cases``, the dataset's own) carry the true outcomes and are
    dropped."""
    events = data.events.copy()
    labelled = np.flatnonzero(events[label_col].notna().to_numpy())
    rng = np.random.default_rng([seed, 7])
    values = events[label_col].to_numpy(copy=True)
    values[labelled] = values[rng.permutation(labelled)]
    events[label_col] = pd.array(values, dtype=events[label_col].dtype)
    return replace(data, events=events, cases=derive_cases(domain, events, delay))


def fingerprint(events: pd.DataFrame, fs: FeatureSet) -> str:
    """sha256 of event ids, times and labels (identifies the training data of a run)."""
    h = hashlib.sha256()
    h.update("\x1f".join(events[fs.id_col].astype(str)).encode())
    h.update(pd.to_datetime(events[fs.time_col]).to_numpy("datetime64[ns]").astype(np.int64).tobytes())
    h.update(_labels(events, fs).fillna(-1.0).to_numpy(np.float64).tobytes())
    return h.hexdigest()


def _labels(events: pd.DataFrame, fs: FeatureSet) -> pd.Series:
    if fs.label_col not in events:
        return pd.Series(np.nan, index=events.index)
    return events[fs.label_col].astype("Float64").astype(float)


def own_columns(fs: FeatureSet, events: pd.DataFrame) -> list[str]:
    """Features computed from the event's own columns (no history): the raw-column ablation's inputs."""
    prepared = fs.prepare(events.head(50))
    return [n for n in fs.names if n in prepared.columns]


def make_split(data: TrainData, fs: FeatureSet, config: TrainConfig) -> Split:
    """Time windows over the labelled events (row positions into ``data.events``).

    The windows are cut over the data's labels. Reviewer-labelled events (outcomes recorded through the service)
    were chosen for review by a model, mostly flagged ones, so they would bias calibration, the threshold and the
    test metrics: they fit the train and validation windows (by time) and, from the calibration window's start
    on, stay history for features only. Events of the first ``config.warmup_days`` of the data fit nothing either:
    their entities have almost no history yet, which the service never sees once seeded with the data. Nor do
    events whose outcome was known only after the test window starts (:func:`_known_before_test`)."""
    times = pd.to_datetime(data.events[fs.time_col])
    labels = _labels(data.events, fs).notna().to_numpy()
    if config.warmup_days:
        warm = labels & (times >= times.min() + pd.Timedelta(days=config.warmup_days)).to_numpy()
        if labels.any() and not warm.any():
            raise ValueError(f"the warm-up of {config.warmup_days:g} days covers every labelled event "
                             f"(the data spans {times.max() - times.min()})")
        labels = warm
    by_reviewer = labels & data.reviewer_rows()
    labelled = labels & ~by_reviewer
    known = fs.label_known_at(data.events).to_numpy("datetime64[ns]")
    if not config.eval_path:
        pos = np.flatnonzero(labelled)
        sp = time_split(times.iloc[pos], fractions=config.fractions, dates=config.split_dates)
        windows = {k: pos[v] for k, v in sp.windows.items()}
        fit_fractions, fit_dates = config.fractions[:3], (config.split_dates or ())[:2] or None
    else:
        test = np.flatnonzero(labelled & data.from_eval)
        if not len(test):
            raise ValueError("the evaluation file has no labelled events")
        # Fitting windows end before the test window starts: labelled events of the other data at or after it
        # stay history for features but fit nothing.
        before_test = (times < times.iloc[test].min()).to_numpy()
        pos = np.flatnonzero(labelled & ~data.from_eval & before_test)
        if not len(pos):
            raise ValueError("no labelled training events before the evaluation file's first event")
        sp = time_split(times.iloc[pos], fractions=config.eval_fractions, dates=config.split_dates,
                        names=FIT_WINDOWS)
        windows = {k: pos[v] for k, v in sp.windows.items()}
        windows["test"] = test
        fit_fractions, fit_dates = config.eval_fractions, config.split_dates
    test_start = times.iloc[windows["test"]].min().to_datetime64()
    windows, embargoed = _known_before_test(windows, known, test_start, times, fit_fractions, fit_dates,
                                            fs.label_delay)
    split = _with_reviewer_labels(windows, by_reviewer & (known < test_start), times, config.split_dates)
    return replace(split, embargoed=embargoed)


FIT_WINDOWS = ("train", "validation", "calibration")


def _known_before_test(windows: dict[str, np.ndarray], known: np.ndarray, test_start: np.datetime64,
                       times: pd.Series, fractions: Sequence[float], dates: Sequence[str] | None,
                       delay: pd.Timedelta) -> tuple[dict[str, np.ndarray], int]:
    """The fitting windows cut again over the labelled events whose outcome was known before the test window
    starts, and how many were left out. A model deployed then could not have fitted on the others (a finance
    outcome arrives 30 days after the transfer): fitting, calibrating and choosing the threshold on them made
    the test metrics optimistic. With outcomes known at event time (customs' default) nothing changes."""
    fit = np.sort(np.concatenate([windows[w] for w in FIT_WINDOWS]))
    late = known[fit] >= test_start
    if not late.any():
        return windows, 0
    keep = fit[~late]
    why = (f"{int(late.sum())} of {len(fit)} labelled fitting events have outcomes known only after the test "
           f"window starts ({pd.Timestamp(test_start)}; label delay {delay.total_seconds() / 86_400:g} days)")
    if not len(keep):
        raise ValueError(f"{why}: nothing is left to fit; give more history before the test window or a shorter "
                         "--label-delay-days")
    try:
        sp = time_split(times.iloc[keep], fractions=fractions, dates=dates, names=FIT_WINDOWS)
    except ValueError as err:
        raise ValueError(f"{why}, and without them {err}") from None
    return {**{w: keep[v] for w, v in sp.windows.items()}, "test": windows["test"]}, int(late.sum())


def _with_reviewer_labels(windows: dict[str, np.ndarray], by_reviewer: np.ndarray, times: pd.Series,
                          dates: tuple | list | None = None) -> Split:
    """``windows`` plus the reviewer-labelled rows dated before the calibration window: those before the validation
    window's start in train, the rest in validation. The starts are the split ``dates`` when given (the first two
    are the validation and calibration starts), else the windows' first events. Time ranges from the final rows."""
    t = times.to_numpy("datetime64[ns]")
    reviewer = np.flatnonzero(by_reviewer)
    if len(reviewer):
        if dates:
            start = {w: np.datetime64(pd.Timestamp(d), "ns")
                     for w, d in zip(("validation", "calibration"), dates, strict=False)}
        else:
            start = {w: t[windows[w]].min() for w in ("validation", "calibration")}
        fits = reviewer[t[reviewer] < start["calibration"]]
        late = t[fits] >= start["validation"]
        windows = dict(windows, train=np.sort(np.r_[windows["train"], fits[~late]]),
                       validation=np.sort(np.r_[windows["validation"], fits[late]]))
    ranges = {w: (pd.Timestamp(t[pos].min()), pd.Timestamp(t[pos].max())) for w, pos in windows.items()}
    return Split(windows, ranges)


# ---------------------------------------------------------------------------------------------- training

SCORE_CHUNK_ROWS = 500_000  # rows per predict call when scoring a window (bounds the model-matrix copies)


def rows_of(frame: pd.DataFrame, pos: np.ndarray) -> pd.DataFrame:
    """``frame.iloc[pos]``; a slice (no copy of the rows) when ``pos`` is a contiguous ascending run."""
    if len(pos) and pos[-1] - pos[0] + 1 == len(pos) and (len(pos) == 1 or np.all(np.diff(pos) == 1)):
        return frame.iloc[int(pos[0]) : int(pos[-1]) + 1]
    return frame.iloc[pos]


def chunked(fn, X: pd.DataFrame, rows: int = SCORE_CHUNK_ROWS) -> np.ndarray:
    """``fn(X)`` (one value per row) computed on slices of ``rows`` rows."""
    if len(X) <= rows:
        return np.asarray(fn(X))
    return np.concatenate([np.asarray(fn(X.iloc[i : i + rows])) for i in range(0, len(X), rows)])


def baseline_sample(n: int, max_rows: int | None, seed: int) -> np.ndarray | None:
    """Sorted positions of a seeded random sample of ``max_rows`` of ``n`` train rows (None: use them all)."""
    if not max_rows or n <= max_rows:
        return None
    return np.sort(np.random.default_rng([seed, 11]).choice(n, size=max_rows, replace=False))


# The drift reference: the latest window the model was fitted on (its calibration) and that its trees never saw.
# In-sample training-window scores are more extreme than any later window's, and entity-history features
# (days since first seen, counts) grow through the training window: on public customs data a training-window
# reference called the very next window drifted (score PSI 0.46, 27 of 74 features >= 0.25); this one gives
# score PSI 0.01.
DRIFT_WINDOW = "calibration"


def _bands(threshold: float, cal_scores: np.ndarray, capacity: float) -> dict[str, float]:
    """low / medium / high lower edges: high = threshold, medium = at most the top ``4 x capacity`` of the
    calibration window (a tie across that cut stays low)."""
    medium = min(edge_for_top_share(cal_scores, min(1.0, 4 * capacity)), threshold)
    bands = {"low": 0.0, "high": float(threshold)}
    if medium < threshold:
        bands["medium"] = float(medium)
    return dict(sorted(bands.items(), key=lambda kv: kv[1]))


def _window_metrics(
    name: str, data: TrainData, fs: FeatureSet, split: Split, scores: dict[str, np.ndarray],
    margins: dict[str, np.ndarray], threshold: float, config: TrainConfig,
) -> dict[str, dict[str, float]]:
    y_all = _labels(data.events, fs)
    out = {}
    for window in EVAL_WINDOWS:
        pos = split[window]
        ev = data.events.iloc[pos]
        y = y_all.iloc[pos].to_numpy(float)
        m = evaluate(
            y, scores[window], capacity=config.capacity, threshold=threshold,
            revenue=ev["revenue"].to_numpy(float, na_value=0.0) if "revenue" in ev else None,
            typology=ev.get("typology", None),
        )
        if name != "baseline":
            m["brier_uncalibrated"] = float(np.mean((sigmoid(margins[window]) - y) ** 2))
        m.update(account_metrics(ev, scores[window], data.accounts, config.capacity))
        out[window] = m
    return out


def account_metrics(transfers: pd.DataFrame, scores: np.ndarray, accounts: pd.DataFrame | None,
                    capacity: float) -> dict[str, float]:
    """Finance: precision and recall of the top ``capacity`` share of accounts active in ``transfers`` (account
    score = its highest transfer score; labels from the accounts table's ``is_fraud``). Empty without them."""
    if accounts is None or "is_fraud" not in accounts or not all(c in transfers for c in ACCOUNT_COLS):
        return {}
    acc = account_scores(transfers, scores, ACCOUNT_COLS)
    labels = accounts.set_index(accounts["account_id"].astype(str))["is_fraud"].astype(float)
    k = top_k(len(acc), capacity)
    precision, recall = account_precision_recall_at_k(acc, labels, k)
    return {"account_k": float(k), "account_precision_at_k": precision, "account_recall_at_k": recall}


def _finish_model(
    name: str, margins: dict[str, np.ndarray], y_cal: np.ndarray, data: TrainData, fs: FeatureSet, split: Split,
    config: TrainConfig, features: list[str],
) -> ModelResult:
    """Calibrate on the calibration window, choose the threshold there, evaluate on validation and test."""
    calibrator = fit_calibrator(margins["calibration"], y_cal)
    scores = {w: calibrator(m) for w, m in margins.items()}
    if config.target_precision is not None:
        threshold = threshold_for_precision(y_cal, scores["calibration"], config.target_precision)
        reached = float(np.mean(y_cal[scores["calibration"] >= threshold]))
        if reached < config.target_precision and name == "full":
            log.warning("no threshold reaches precision %.3f on the calibration window (%.3f at the highest "
                        "score); the threshold is that highest score", config.target_precision, reached)
    else:
        threshold = threshold_for_capacity(scores["calibration"], config.capacity)
    metrics = _window_metrics(name, data, fs, split, scores, margins, threshold, config)
    return ModelResult(name, calibrator, float(threshold), scores, margins, metrics, features)


TRAIN_STAGES = ("load", "features", "baseline", "lgbm_full", "lgbm_raw", "calibrate_evaluate", "tracking",
                "registry")


def train(domain: str, data_path: str | Path, *, config: TrainConfig | None = None,
          progress: Callable[[str], None] | None = None,
          evaluated: Callable[[TrainResult], None] | None = None) -> TrainResult:
    """Train, evaluate and (unless ``config.register`` is False) track and register a model of ``domain``.

    ``progress`` is called with the name of each stage of :data:`TRAIN_STAGES` as it ends (a progress bar);
    ``evaluated`` with the result once its metrics exist, before tracking (a caller can still show them when
    tracking fails)."""
    config = config or TrainConfig()
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now
        if progress is not None:
            progress(name)

    fs = domain_feature_set(domain, config.label_delay_days)
    client = None
    if config.engine == "dask":  # before the data: an unreachable cluster fails at once
        from training.dask_train import connect

        client = connect(config.scheduler)
    data = load_training_data(domain, data_path, config)
    if fs.label_col not in data.events:
        raise ValueError(f"the data has no label column {fs.label_col!r}: cannot train")
    if config.shuffle_labels:
        data = shuffle_labels(domain, data, fs.label_col, config.seed, config.label_delay_days)
    lap("load")
    if config.engine == "dask":
        from features import dask_engine
        from training.dask_train import workers_required

        workers = max(1, len(client.scheduler_info()["workers"]))  # every worker gets rows and key buckets
        parts = max(workers, math.ceil(len(data.events) / dask_engine.ROWS_PER_PARTITION))
        with workers_required(client):
            features = dask_engine.build(fs, data.events, data.cases, client=client, partitions=parts,
                                         buckets=max(2 * workers, parts))
        numeric = [n for n in fs.names if n not in set(fs.categorical)]
        features = features.astype(dict.fromkeys(numeric, np.dtype(config.feature_dtype)))  # as fs.build(dtype=)
    else:
        features = fs.build(data.events, data.cases, dtype=np.dtype(config.feature_dtype))
    lap("features")
    split = make_split(data, fs, config)
    y_all = _labels(data.events, fs).to_numpy(float)
    for window, pos in split.windows.items():
        if len(np.unique(y_all[pos])) < 2:
            raise ValueError(f"the {window} window has only one class ({len(pos)} rows): use more data or "
                             "other split fractions")
    y = {w: y_all[p] for w, p in split.windows.items()}
    X = {w: rows_of(features, p) for w, p in split.windows.items()}
    windows = ("calibration", *EVAL_WINDOWS)
    models: dict[str, ModelResult] = {}

    sample = baseline_sample(len(y["train"]), config.baseline_max_rows, config.seed)
    baseline = fit_baseline(X["train"] if sample is None else X["train"].iloc[sample],
                            y["train"] if sample is None else y["train"][sample], fs.categorical, seed=config.seed)
    margins = {w: chunked(baseline.decision_function, X[w]) for w in windows}
    models["baseline"] = _finish_model("baseline", margins, y["calibration"], data, fs, split, config, fs.names)
    lap("baseline")

    lcfg = config.lgbm_config()
    trials = config.search_trials or (UNBOUNDED_TRIALS if config.search_seconds else 0)  # time-bounded only
    if config.engine == "dask":
        from training.dask_train import random_search_dask

        full, search_log = random_search_dask(X["train"], y["train"], X["validation"], y["validation"],
                                              fs.categorical, lcfg, trials=trials, seconds=config.search_seconds,
                                              client=client)
    else:
        full, search_log = random_search(X["train"], y["train"], X["validation"], y["validation"], fs.categorical,
                                         lcfg, trials=trials, seconds=config.search_seconds)
    margins = {w: chunked(full.raw_margin, X[w]) for w in windows}
    models["full"] = _finish_model("full", margins, y["calibration"], data, fs, split, config, fs.names)
    lap("lgbm_full")

    raw_cols = own_columns(fs, data.events)
    raw = fit_lgbm(X["train"][raw_cols], y["train"], X["validation"][raw_cols], y["validation"], fs.categorical,
                   full.config)
    margins = {w: chunked(raw.raw_margin, X[w][raw_cols]) for w in windows}
    models["lgbm_raw"] = _finish_model("lgbm_raw", margins, y["calibration"], data, fs, split, config, raw_cols)
    models = {name: models[name] for name in MODELS}
    lap("lgbm_raw")

    best = models["full"]
    test_metrics = dict(best.metrics["test"])
    test_metrics.update(brier_report(best.margins["test"], y["test"], best.calibrator))
    bundle = ModelBundle(
        domain=domain, feature_names=list(fs.names), categorical=full.levels, feature_labels=fs.labels,
        booster=full.booster, calibrator=best.calibrator, threshold=best.threshold,
        bands=_bands(best.threshold, best.scores["calibration"], config.capacity), feature_set_version=fs.version,
        label_delay_days=float(fs.label_delay.total_seconds() / 86_400), metrics=test_metrics,
        reference=reference_profile(X[DRIFT_WINDOW] if list(X[DRIFT_WINDOW].columns) == fs.names
                                    else X[DRIFT_WINDOW][fs.names], best.scores[DRIFT_WINDOW], fs.categorical,
                                    window=DRIFT_WINDOW, learned_rates=fs.learned_rates),
        data_path=data.paths[0],
        data_paths=list(data.paths),
        fitted_until=max(split.ranges[w][1] for w in ("train", "validation", "calibration")).isoformat(),
    )
    table = metric_table(models)
    lap("calibrate_evaluate")
    result = TrainResult(
        domain=domain, config=config, bundle=bundle, models=models, table=table, split=split, features=features,
        data=data, fs=fs, lgbm=full, search_log=search_log, fingerprint=fingerprint(data.events, fs),
        timings=timings,
    )
    if evaluated is not None:
        evaluated(result)
    if config.track:
        from training import tracking  # heavy imports (mlflow, shap) only when tracking

        result.run_id, result.model_version = tracking.log_run(result)
        lap("tracking")
    if config.registers and result.model_version is not None:
        from training import registry

        result.promotion = registry.decide_promotion(result)
        lap("registry")
    timings["total"] = round(sum(timings.values()), 3)
    if not config.quiet:
        print(summary(result))
    return result


def summary(result: TrainResult) -> str:
    """The metric table and, when registered, the version and the promotion decision (what ``train`` prints)."""
    text = format_table(result)
    if (p := result.promotion) is not None:
        text += f"\nregistered {p['model_name']} v{p['version']}: {p['decision']} ({p['reason']})"
    return text


# ---------------------------------------------------------------------------------------------- reporting

TABLE_METRICS = ("roc_auc", "pr_auc", "precision_at_1pct", "precision_at_2pct", "precision_at_5pct",
                 "precision_at_10pct", "recall_at_5pct", "brier")


def metric_table(models: dict[str, ModelResult], window: str = "test") -> pd.DataFrame:
    """Models x headline metrics on one window."""
    rows = {name: {k: m.metrics[window].get(k, np.nan) for k in TABLE_METRICS} for name, m in models.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def format_table(result: TrainResult) -> str:
    """Compact text table: baseline vs raw-column LightGBM vs full pipeline on validation and test."""
    cap = capacity_key(result.config.capacity)
    cols = ["roc_auc", "pr_auc", "precision_at_1pct", "precision_at_2pct", "precision_at_5pct",
            "precision_at_10pct", "brier"]
    if cap not in cols:
        cols.insert(-1, cap)
    heads = {"roc_auc": "ROC-AUC", "pr_auc": "PR-AUC", "brier": "Brier"}
    lines = []
    for window in EVAL_WINDOWS:
        sizes = result.models["full"].metrics[window]
        lines.append(f"{window} window: {result.split.describe()[window]}, {int(sizes['positives'])} positives")
        header = f"  {'model':10s}" + "".join(
            f"{heads.get(c, 'P@' + c.removeprefix('precision_at_').removesuffix('pct') + '%'):>9s}" for c in cols)
        lines.append(header)
        for name, model in result.models.items():
            vals = "".join(f"{model.metrics[window].get(c, np.nan):9.4f}" for c in cols)
            lines.append(f"  {name:10s}{vals}")
    full = result.models["full"]
    lines.append(f"threshold {full.threshold:.4g} (flag rate on test {full.metrics['test']['flag_rate']:.3f}), "
                 f"LightGBM {result.lgbm.best_iteration} trees")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class HistoryFeatures:
    """Events of a file and their point-in-time features over a history (:func:`features_over_history`)."""

    fs: FeatureSet
    events: pd.DataFrame  # the file's events, in file order
    features: pd.DataFrame  # their model-input features, same rows
    history_events: int  # events of the history that the features looked back on
    replaced: int = 0  # history events dropped because the file gives their ids to events at other times
    accounts: pd.DataFrame | None = None  # finance: the accounts table (account labels), when the data has one


def features_over_history(
    bundle: ModelBundle, domain: str, data_path: str | Path, *, history: Sequence[str | Path] = (),
    cases_path: str | Path | None = None, progress: Callable[[int], None] | None = None,
) -> HistoryFeatures:
    """Features of the events of ``data_path``, point-in-time over the ``history`` datasets followed by the data.

    The history (e.g. the model's training and evaluation data, which the service starts from) is not scored; its
    events that are also in the data count once, as data. Labels in either are outcomes known after the bundle's
    label delay, as in training: they reach later events' features, never the event's own. ``progress`` is
    called once per feature spec computed (:meth:`FeatureSet.build`).
    """
    fs = domain_feature_set(domain, bundle.label_delay_days)
    if bundle.feature_set_version != fs.version:
        raise ValueError(f"the model was trained with feature set {bundle.feature_set_version!r} but this code "
                         f"computes {fs.version!r}")
    config = TrainConfig(label_delay_days=bundle.label_delay_days, cases_path=str(cases_path) if cases_path else None,
                         eval_path=str(data_path) if history else None, reviewer_outcomes=False)
    data = load_training_data(domain, list(history) or data_path, config, drop_overlap=True)
    rows = np.flatnonzero(data.from_eval) if history else np.arange(len(data.events))
    features = fs.build(data.events, data.cases, progress=progress).iloc[rows]
    return HistoryFeatures(fs=fs, events=data.events.iloc[rows], features=features,
                           history_events=len(data.events) - len(rows), accounts=data.accounts,
                           replaced=data.overlap)


def evaluate_bundle(
    bundle: ModelBundle, domain: str, data_path: str | Path, *, history: Sequence[str | Path] = (),
    cases_path: str | Path | None = None, capacity: float = 0.05, fitted_until: pd.Timestamp | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Metrics of a bundle on the labelled events of ``data_path``, features as :func:`features_over_history`
    (``history_events`` in the result: how many history events they looked back on; ``in_sample``: how many of
    the labelled events are not later than ``fitted_until``, the end of the data the model was fitted on)."""
    hf = features_over_history(bundle, domain, data_path, history=history, cases_path=cases_path, progress=progress)
    y_all = _labels(hf.events, hf.fs).to_numpy(float)
    pos = np.flatnonzero(~np.isnan(y_all))
    if not len(pos):
        raise ValueError(f"no labelled events ({hf.fs.label_col}) in {data_path}")
    scores = bundle.predict(hf.features.iloc[pos])
    ev = hf.events.iloc[pos]
    metrics = evaluate(
        y_all[pos], scores, capacity=capacity, threshold=bundle.threshold,
        revenue=ev["revenue"].to_numpy(float, na_value=0.0) if "revenue" in ev else None,
        typology=ev.get("typology", None),
    )
    metrics.update(account_metrics(ev, scores, hf.accounts, capacity))
    metrics["history_events"] = hf.history_events
    metrics["history_replaced"] = hf.replaced
    if fitted_until is not None:
        metrics["in_sample"] = int((pd.to_datetime(ev[hf.fs.time_col]) <= fitted_until).sum())
    return metrics
