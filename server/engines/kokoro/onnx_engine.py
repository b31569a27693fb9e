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
from speakd.server.engines.kokoro.seam_graph import HARMONIC_PHASE, NORM_WEIGHT, norm_mean, norm_var
from speakd.server.engines.kokoro.seams import HARMONICS, NormPrior, NormStats
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
    """Runs each stage's items one by one: on a CPU, batching buys nothing but padding.

    The vocoder graph has seam inputs (`seam_graph`): a window of a split segment starts at its
    harmonic phase and normalises with the statistics its segment's windows share (`seams`)."""

    def __init__(self, files: ModelFiles, threads: int = 0) -> None:
        threads = threads or os.cpu_count() or 1
        self._acoustic: object = _session(files.acoustic, threads)
        self._vocoder: object = _session(files.vocoder, threads)
        inputs = {i.name for i in self._vocoder.get_inputs()}  # type: ignore[attr-defined]
        self._norms = sum(1 for name in inputs if name.endswith("_mean") and name.startswith("norm"))
        if HARMONIC_PHASE not in inputs or not self._norms:
            raise ModelError(f"{files.vocoder} has no seam inputs; delete it, and it is cut again")
        self._stat_outputs = [name for k in range(self._norms) for name in (norm_mean(k), norm_var(k))]
        self._outputs = ["audio", *(name + "_out" for name in self._stat_outputs)]
        self._unset: dict[str, object] = dict.fromkeys(self._stat_outputs, np.zeros((1, 1, 1), np.float32))
        self._prior = NormPrior()  # touched by the vocoder stage's one thread only

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
        phase = features.harmonic_phase
        feeds: dict[str, object] = {
            ASR: features.asr,
            F0: features.f0,
            ENERGY: features.energy,
            "style": features.style,
            HARMONIC_PHASE: np.zeros((1, 1, HARMONICS), np.float32) if phase is None else phase,
        }
        seam, frames = features.seam, features.frames
        # A render on its own uses its own statistics (and teaches the prior); a split segment's
        # first window pools its own with the prior, and its later windows reuse what that gave.
        given, weight = self._unset, 0.0
        if seam is not None and seam.stats is not None:
            given, weight = self._feeds(seam.stats), 1.0
        elif seam is not None and self._prior.stats is not None:
            given, weight = self._feeds(self._prior.stats), self._prior.first_window_weight(frames)
        feeds.update(given)
        feeds[NORM_WEIGHT] = np.array(weight, np.float32)
        audio, *stats = self._vocoder.run(self._outputs, feeds)  # type: ignore[attr-defined]
        own = NormStats.from_outputs(stats)
        if seam is None:
            self._prior.observe(own)
        elif seam.stats is None:
            seam.stats = own if self._prior.stats is None else self._prior.stats.pooled(weight, own)
        return np.asarray(audio, dtype=np.float32).reshape(-1)

    def _feeds(self, stats: NormStats) -> dict[str, object]:
        pairs = zip(stats.means, stats.variances, strict=True)
        return dict(zip(self._stat_outputs, (x for pair in pairs for x in pair), strict=True))
