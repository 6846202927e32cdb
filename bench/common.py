"""Shared helpers of the benchmarks: synthetic data, a trained bundle, timing, machine description.

Everything is written under a temporary (or given) work directory; nothing touches ``./.riskscore``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

LIBRARIES = ("numpy", "pandas", "pyarrow", "lightgbm", "shap", "scikit-learn", "mlflow", "bentoml", "httpx")


def machine() -> dict:
    """CPU count, memory, Python and library versions (for bench/RESULTS.md)."""
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            mem = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = "-"
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": mem, "python": platform.python_version(),
            "platform": platform.platform(), "load_1min": round(os.getloadavg()[0], 2),
            "python_probe_ms": python_probe_ms(), **versions}


def python_probe_ms() -> float:
    """Best of 5 of ``sum(range(10**6))`` in ms: how fast this (virtual) machine runs Python right now.

    The same VM type has shown phases about three times slower than others; absolute serving times only compare
    between runs with a similar probe (ratios inside one run do not need it)."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        sum(range(10**6))
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


@contextmanager
def timer(out: dict, key: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        out[key] = time.perf_counter() - start


def percentiles(samples_s: list[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds."""
    a = np.asarray(samples_s) * 1000.0
    return {"n": len(a), "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def dataset(domain: str, rows: int, work: Path, seed: int = 1) -> Path:
    """Synthetic data of ``domain`` (generated once per size/seed under ``work``)."""
    from features.synthetic import generate

    out = work / "data" / f"{domain}-{rows}-{seed}"
    if not (out / ".done").exists():
        generate(domain, rows, seed=seed, out_dir=out, positive_rate=0.08, progress=False)
        (out / ".done").write_text("ok")
    return out


def events_and_cases(domain: str, path: Path):
    from features.datasets import load_dataset
    from features.domains import events_of

    data = load_dataset(domain, path)
    return events_of(data), getattr(data, "cases", None)


def train_bundle(domain: str, data: Path, work: Path, num_threads: int = 1, rounds: int | None = None):
    """A trained :class:`~training.bundle.ModelBundle` of ``domain`` on ``data`` (cached; no MLflow)."""
    from training.bundle import ModelBundle

    path = work / "bundles" / f"{domain}-{data.name}-{rounds or 'default'}"
    if (path / ".done").exists():
        return ModelBundle.load(path)
    from dataclasses import replace

    from training.pipeline import TrainConfig, train

    config = TrainConfig(seed=0, quiet=True, num_threads=num_threads, register=False, track=False)
    if rounds:
        config = replace(config, lgbm=replace(config.lgbm, num_boost_round=rounds))
    bundle = train(domain, data, config=config).bundle
    bundle.save(path)
    (path / ".done").write_text("ok")
    return bundle


def api_items(domain: str, events: pd.DataFrame) -> list[dict]:
    """Events as API request items (labels dropped, JSON-ready values)."""
    drop = {"fraud", "critical_fraud", "revenue", "typology", "is_laundering"}
    keep = [c for c in events.columns if c not in drop]
    items = []
    for row in events[keep].to_dict("records"):
        item = {}
        for k, v in row.items():
            if v is pd.NA or v is None or (isinstance(v, float) and np.isnan(v)):
                v = None
            elif isinstance(v, pd.Timestamp):
                v = v.date().isoformat() if domain == "customs" else v.isoformat()
            elif isinstance(v, np.generic):
                v = v.item()
            item[k] = v
        items.append(item)
    return items


def write_json(path: Path | None, payload: dict) -> None:
    if path is not None:
        Path(path).write_text(json.dumps(payload, indent=1, default=str))


def quick_bundle(domain: str, events: pd.DataFrame, cases, rounds: int = 60, num_threads: int = 1):
    """A small bundle trained directly with LightGBM (seconds; for the regression guard, not for quality)."""
    import lightgbm as lgb

    from features.domains import feature_set
    from training.bundle import Calibrator, ModelBundle, model_matrix

    fs = feature_set(domain)
    feats = fs.build(events, cases)
    levels = {c: sorted(feats[c].dropna().astype(str).unique().tolist()) for c in fs.categorical}
    X = model_matrix(feats, fs.names, levels)
    y = events[fs.label_col].fillna(0).astype(int).to_numpy()
    params = {"objective": "binary", "num_leaves": 31, "learning_rate": 0.1, "verbosity": -1, "seed": 0,
              "num_threads": num_threads, "deterministic": True}
    booster = lgb.train(params, lgb.Dataset(X, y, categorical_feature=fs.categorical), num_boost_round=rounds)
    return ModelBundle(
        domain=domain, feature_names=fs.names, categorical=levels, feature_labels=fs.labels, booster=booster,
        calibrator=Calibrator(x=[-50.0, 0.0, 50.0], y=[0.0, 0.5, 1.0]), threshold=0.5,
        bands={"low": 0.0, "medium": 0.3, "high": 0.6}, feature_set_version=fs.version,
        label_delay_days=fs.label_delay.total_seconds() / 86_400,
    )
