"""Kokoro-82M on ONNX Runtime (CPU): the embedded default engine, one session per stage."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from speakd.server.engines.kokoro.assets import ACOUSTIC_OUTPUTS, ASR, ENERGY, F0, ModelFiles
from speakd.server.engines.kokoro.engine import AcousticFeatures, AcousticRequest
from speakd.server.errors import DependencyError, ModelError

logger = logging.getLogger(__name__)


def _session(path: Path, threads: int) -> object:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise DependencyError("the Python package 'onnxruntime' is missing: pip install onnxruntime") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Two stage sessions share the cores; spinning threads would steal them from each other.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"ONNX Runtime could not load {path}: {exc}") from exc


class OnnxEngine:
    """Runs each stage's items one by one: on a CPU, batching buys nothing but padding."""

    def __init__(self, files: ModelFiles, threads: int = 0) -> None:
        threads = threads or os.cpu_count() or 1
        self._acoustic: object = _session(files.acoustic, threads)
        self._vocoder: object = _session(files.vocoder, threads)

    def acoustic(self, batch: Sequence[AcousticRequest]) -> list[AcousticFeatures]:
        return [self._acoustic_one(request) for request in batch]

    def vocode(self, batch: Sequence[AcousticFeatures]) -> list[npt.NDArray[np.float32]]:
        return [self._vocode_one(features) for features in batch]

    def _acoustic_one(self, request: AcousticRequest) -> AcousticFeatures:
        style = np.ascontiguousarray(request.style, dtype=np.float32)
        feeds = {
            "tokens": np.array([[0, *request.tokens, 0]], dtype=np.int64),
            "style": style,
            "speed": np.array([request.speed], dtype=np.float32),
        }
        asr, f0, energy, durations = self._acoustic.run(list(ACOUSTIC_OUTPUTS), feeds)  # type: ignore[attr-defined]
        return AcousticFeatures(
            asr=asr, f0=f0, energy=energy, style=style, durations=durations.astype(np.int64).reshape(-1)
        )

    def _vocode_one(self, features: AcousticFeatures) -> npt.NDArray[np.float32]:
        feeds = {ASR: features.asr, F0: features.f0, ENERGY: features.energy, "style": features.style}
        (audio,) = self._vocoder.run(None, feeds)  # type: ignore[attr-defined]
        return np.asarray(audio, dtype=np.float32).reshape(-1)
