from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FORENSICS_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: tests on real data need the project's data folder beside it."""
    if not (DATA / "manifest.csv").exists():
        pytest.skip(f"../shared/data not found at {DATA} (set FORENSICS_DATA)")
    return DATA
