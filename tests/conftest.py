"""Shared test fixtures: paths to in-repo fixtures and to the optional ../shared data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's shared data folder; skips the test when it is not beside the repo."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present beside the repo")
    return SHARED_DATA
