"""kokoro's model modules (KModel, the iSTFTNet decoder) without `kokoro/__init__`.

kokoro's package init imports KPipeline, which imports misaki, spaCy and phonemizer: the text side,
which speakd does itself. The model modules need only torch, transformers (ALBERT), huggingface_hub
and loguru. Loading them without the init lets the torch engine run where only those are installed,
such as a bare GPU machine (bench/GPU.md), and keeps the daemon from importing a second G2P stack.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

from speakd.server.errors import DependencyError

_INSTALL = "PyTorch weights need kokoro and torch: pip install kokoro==0.9.4"


def _kokoro_package() -> None:
    """Register the kokoro package in sys.modules without running its __init__ (unless something
    imported it whole already, which is just as good)."""
    if "kokoro" in sys.modules:
        return
    spec = importlib.util.find_spec("kokoro")
    if spec is None or spec.submodule_search_locations is None:
        raise DependencyError(_INSTALL)
    # A package module whose __path__ is set but whose code has not run: submodules import from it.
    sys.modules["kokoro"] = importlib.util.module_from_spec(spec)


def kokoro_module(name: str) -> ModuleType:
    """`kokoro.<name>` (model, istftnet, modules), imported offline without kokoro's text side."""
    # KModel falls back to the hub only when given no config or weights; this makes any slip fail offline.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        _kokoro_package()
        from loguru import logger

        # kokoro's own init silences its loguru records (KModel logs its whole config at debug level).
        logger.disable("kokoro")
        return importlib.import_module(f"kokoro.{name}")
    except ImportError as exc:
        raise DependencyError(f"{_INSTALL} ({exc})") from exc
