"""The Bento (``bentoml build``) carries what the installed project carries."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_bentofile_lists_every_project_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    bento = yaml.safe_load((REPO / "bentofile.yaml").read_text())["python"]["packages"]
    missing = [dep for dep in project if dep not in bento]
    assert not missing, f"bentofile.yaml lacks {missing}: a built Bento would fail to import the service"
    included = yaml.safe_load((REPO / "bentofile.yaml").read_text())["include"]
    for package in ("features", "training", "serving", "riskscore"):
        assert f"{package}/**/*.py" in included
