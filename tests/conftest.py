"""Shared fixtures: every test gets its own empty COVIDTRACK_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"  # present in CI and dev, absent in a user's clone


@pytest.fixture(autouse=True)
def covidtrack_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "covidtrack-home"
    monkeypatch.setenv("COVIDTRACK_HOME", str(home))
    monkeypatch.setenv("COVIDTRACK_THREADS", os.environ.get("COVIDTRACK_THREADS", "2"))
    return home


@pytest.fixture
def shared_data() -> Path:
    """Optional real data beside the repo; tests that need it skip in a fresh clone."""
    if not SHARED.is_dir():
        pytest.skip("../shared/data not present (fresh clone)")
    return SHARED
