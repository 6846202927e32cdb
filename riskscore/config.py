"""Paths and service locations with embedded defaults, overridable by environment variables."""

from __future__ import annotations

import os
from pathlib import Path

DOMAINS = ("customs", "finance")


def home() -> Path:
    """Working folder for local state (MLflow store, audit DB, data): $RISKSCORE_HOME or ./.riskscore."""
    path = Path(os.environ.get("RISKSCORE_HOME", ".riskscore")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def tracking_uri() -> str:
    """MLflow tracking/registry URI: $MLFLOW_TRACKING_URI or a SQLite store under the working folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def artifact_root() -> str:
    """Where new MLflow experiments keep artifacts when the tracking store is the local default."""
    return os.environ.get("RISKSCORE_ARTIFACT_ROOT") or (home() / "mlartifacts").as_uri()


def audit_url() -> str:
    """SQLAlchemy URL of the audit store: $RISKSCORE_AUDIT_URL or SQLite under the working folder."""
    return os.environ.get("RISKSCORE_AUDIT_URL") or f"sqlite:///{home() / 'audit.db'}"


def model_name(domain: str) -> str:
    """Registered model name of a domain: $RISKSCORE_MODEL_<DOMAIN> or riskscore-<domain>."""
    return os.environ.get(f"RISKSCORE_MODEL_{domain.upper()}", f"riskscore-{domain}")
