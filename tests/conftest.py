"""Shared test helpers. `../shared` (beside the checkout) holds the read-only fixtures and data."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found beside the checkout ({SHARED})")
    return SHARED
