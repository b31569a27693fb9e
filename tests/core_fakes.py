"""A synthesis core on a fake model, for component tests of the core and the doors.

The pipeline is the real one (real queues, stage threads and encoders) running Kokoro's real stage
code over a fake G2P and engine, so audio really flows and a cancel really reaches the stages; only
the model is a stand-in: every segment is `frames` acoustic frames (600 samples each) of a quiet tone.
"""

from __future__ import annotations

import re
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from speakd.server.config import load_config
from speakd.server.core.synthesis import SynthesisCore
from speakd.server.engines.kokoro.engine import (
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    AcousticFeatures,
    AcousticRequest,
)
from speakd.server.engines.kokoro.g2p import LANGUAGES, EnglishG2P, PhonemeChunk
from speakd.server.engines.kokoro.stages import KokoroStages
from speakd.server.engines.kokoro.voices import STYLE_DIM, VoiceBank
from speakd.server.engines.kokoro.word_timing import WordTokens
from speakd.server.metrics import SpeakdMetrics
from speakd.server.pipeline.pipeline import Pipeline, WarmUpStep
from speakd.server.pipeline.stage import StageSpec

VOICE = "af_fake"
OTHER_VOICE = "x"


def fake_g2p(text: str, lang: str = "en-us") -> list[PhonemeChunk]:
    """One token per character; every run of non-spaces is a word, its tokens those of its characters."""
    words = tuple(
        WordTokens(m.group(), m.start(), m.end(), m.start(), m.end()) for m in re.finditer(r"\S+", text)
    )
    return [PhonemeChunk(text, text, tuple(range(1, len(text) + 1)), words)]


class FakeEngine:
    """Every segment is `frames` acoustic frames (600 samples each) of a quiet constant tone."""

    def __init__(self, frames: int = 4) -> None:
        self.frames = frames

    def acoustic(self, batch: Sequence[AcousticRequest]) -> list[AcousticFeatures]:
        out = []
        for request in batch:
            durations = np.zeros(len(request.tokens) + 2, np.int64)
            durations[1] = self.frames
            curve = np.zeros((1, 2 * self.frames), np.float32)
            asr = np.zeros((1, 1, self.frames), np.float32)
            out.append(AcousticFeatures(asr, curve, curve, request.style, durations))
        return out

    def vocode(self, batch: Sequence[AcousticFeatures]) -> list[npt.NDArray[np.float32]]:
        return [np.full(f.frames * SAMPLES_PER_FRAME, 0.1, np.float32) for f in batch]


class TokenFrameEngine(FakeEngine):
    """One acoustic frame per token (none for BOS and EOS): a word's time follows from its characters."""

    def acoustic(self, batch: Sequence[AcousticRequest]) -> list[AcousticFeatures]:
        out = []
        for request in batch:
            frames = len(request.tokens)
            durations = np.array([0, *([1] * frames), 0], np.int64)
            curve = np.zeros((1, 2 * frames), np.float32)
            asr = np.zeros((1, 1, frames), np.float32)
            out.append(AcousticFeatures(asr, curve, curve, request.style, durations))
        return out


class GatedEngine(FakeEngine):
    """Holds every vocoder call until `gate` opens: work piles up behind it."""

    def __init__(self, frames: int = 4) -> None:
        super().__init__(frames)
        self.gate = threading.Event()

    def vocode(self, batch: Sequence[AcousticFeatures]) -> list[npt.NDArray[np.float32]]:
        assert self.gate.wait(10), "test left the vocoder gate closed"
        return super().vocode(batch)


@dataclass
class FakeBackend:
    """A `SpeechBackend` on the fake engine, with Kokoro's stage code."""

    engine: FakeEngine
    voices: VoiceBank
    model_id: str = "fake"
    attribution: tuple[str, str] = ("speakd tests", "https://example.invalid/fake")
    sample_rate: int = SAMPLE_RATE
    languages: tuple[str, ...] = LANGUAGES
    max_batch: int = 1

    @property
    def voice_names(self) -> list[str]:
        return self.voices.names

    def language_for(self, voice: str) -> str:
        return "en-us"

    def stages(self) -> list[StageSpec]:
        return KokoroStages(cast(EnglishG2P, fake_g2p), cast(Any, self.engine), self.voices).specs()

    def warm_up(self, voice: str) -> tuple[list[WarmUpStep], Any]:
        return [], None


def fake_voices() -> VoiceBank:
    rng = np.random.default_rng(3)
    return VoiceBank(
        {name: rng.standard_normal((4, STYLE_DIM)).astype(np.float32) for name in (VOICE, OTHER_VOICE)}
    )


@asynccontextmanager
async def running_core(
    overrides: dict[str, object] | None = None, engine: FakeEngine | None = None, lane_limit: int = 4
) -> AsyncIterator[SynthesisCore]:
    """A started core on the fake model; `overrides` are configuration keys ("limits.max_connections")."""
    config = load_config(overrides={"model.default_voice": VOICE, **(overrides or {})})
    metrics = SpeakdMetrics()
    backend = FakeBackend(engine or FakeEngine(), fake_voices())
    pipeline = Pipeline(stages=backend.stages(), metrics=metrics, lane_limit=lane_limit)
    await pipeline.start()
    try:
        yield SynthesisCore(backend=backend, pipeline=pipeline, config=config, metrics=metrics)
    finally:
        await pipeline.close()
