"""The loaded speech model: voices, G2P and engine, built once in a worker thread at start-up."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .config import Config
from .engine import AcousticRequest
from .g2p import EnglishG2P
from .model_assets import prepare_embedded_model
from .onnx_engine import OnnxEngine
from .voices import VoiceBank

logger = logging.getLogger(__name__)

WARM_UP_TEXT = "Hello, this warms the model up."


@dataclass(frozen=True, slots=True)
class Speech:
    """Everything the pipeline's stages call into; immutable once loaded."""

    voices: VoiceBank
    g2p: EnglishG2P
    engine: OnnxEngine

    @classmethod
    def load(cls, config: Config) -> Speech:
        """Blocking: assemble/cut the model if needed, open sessions, load G2P (a few seconds)."""
        started = time.perf_counter()
        files = prepare_embedded_model(config.resolved_cache_dir)
        voices = VoiceBank.from_npz(files.voices_npz)
        if config.model.default_voice not in voices:
            from .errors import ConfigError

            raise ConfigError(
                f"model.default_voice {config.model.default_voice!r} is not a voice of this model; "
                f"choose one of {', '.join(voices.names)}"
            )
        speech = cls(
            voices=voices, g2p=EnglishG2P(files.vocab()), engine=OnnxEngine(files, config.model.threads)
        )
        logger.info(
            "model loaded in %.1f s (voices: %s)", time.perf_counter() - started, ", ".join(voices.names)
        )
        return speech

    def warm_up(self, voice: str) -> None:
        """One full synthesis, so the first client does not pay for lazy allocations."""
        started = time.perf_counter()
        for chunk in self.g2p(WARM_UP_TEXT):
            style = self.voices.style(voice, len(chunk.tokens))
            features = self.engine.acoustic([AcousticRequest(chunk.tokens, style, 1.0)])
            self.engine.vocode(features)
        logger.info("model warmed up in %.2f s", time.perf_counter() - started)
