"""Shared fixtures: one model cache per test session, so the model is assembled and cut once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$SPEAKD_CACHE_DIR if set (CI reuses it between runs), else a fresh directory."""
    configured = os.environ.get("SPEAKD_CACHE_DIR")
    return Path(configured) if configured else tmp_path_factory.mktemp("model-cache")
