"""Shared fixtures: one model cache per test session, so the model is assembled and cut once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from speakd.server.engines.kokoro.assets import ModelFiles, prepare_embedded_model

TORCH_THREADS = 2


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$SPEAKD_CACHE_DIR if set (CI reuses it between runs), else a fresh directory."""
    configured = os.environ.get("SPEAKD_CACHE_DIR")
    return Path(configured) if configured else tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def torch_files(model_cache: Path) -> Iterator[ModelFiles]:
    """The embedded model for a module of torch tests: the hub kept offline (KModel would fall back to
    it on a slip), torch on TORCH_THREADS threads, its thread count restored afterwards."""
    import torch

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        threads = torch.get_num_threads()
        torch.set_num_threads(TORCH_THREADS)
        yield prepare_embedded_model(model_cache)
        torch.set_num_threads(threads)
