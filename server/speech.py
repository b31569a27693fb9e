"""The loaded speech model: voices, G2P and engine, built once in a worker thread at start-up."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .config import Config
from .engine import AcousticRequest, Engine
from .errors import ConfigError, DependencyError
from .g2p import EnglishG2P
from .model_assets import ModelFiles, prepare_embedded_model
from .onnx_engine import OnnxEngine
from .voices import VoiceBank

logger = logging.getLogger(__name__)

WARM_UP_TEXT = "Hello, this warms the model up."


@dataclass(frozen=True, slots=True)
class Speech:
    """Everything the pipeline's stages call into; immutable once loaded."""

    voices: VoiceBank
    g2p: EnglishG2P
    engine: Engine

    @classmethod
    def load(cls, config: Config) -> Speech:
        """Blocking: assemble/cut the model if needed, open sessions, load G2P (a few seconds)."""
        started = time.perf_counter()
        files = prepare_embedded_model(config.resolved_cache_dir)
        voices = VoiceBank.from_npz(files.voices_npz)
        if config.model.default_voice not in voices:
            raise ConfigError(
                f"model.default_voice {config.model.default_voice!r} is not a voice of this model; "
                f"choose one of {', '.join(voices.names)}"
            )
        speech = cls(voices=voices, g2p=EnglishG2P(files.vocab()), engine=_engine(config, files))
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


def _torch_cuda_available() -> bool:
    """Whether PyTorch is installed and sees a CUDA GPU; False without PyTorch."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def choose_engine(engine: str, device: str) -> tuple[str, str]:
    """(engine, device) with "auto" resolved; the device is "cpu" for the onnx engine.

    engine "auto" is torch when PyTorch sees a GPU, else onnx; device "auto" is "cuda" when PyTorch sees
    a GPU, else "cpu". A CUDA device PyTorch cannot see is a ConfigError."""
    if engine == "auto":
        engine = "torch" if _torch_cuda_available() else "onnx"
    if engine == "onnx":
        return engine, "cpu"
    try:
        import torch
    except ImportError as exc:
        raise DependencyError(
            "model.engine 'torch' needs PyTorch and kokoro: pip install kokoro==0.9.4"
        ) from exc
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            raise ConfigError(f"model.device is {device!r}, but PyTorch sees {count} CUDA device(s)")
    return engine, device


def _engine(config: Config, files: ModelFiles) -> Engine:
    engine, device = choose_engine(config.model.engine, config.model.device)
    if engine == "onnx":
        logger.info("engine: onnx (ONNX Runtime, CPU)")
        return OnnxEngine(files, config.model.threads)
    from .torch_engine import TorchEngine
    from .torch_weights import load_kmodel, prepare_torch_weights

    prepare_torch_weights(files)
    logger.info("engine: torch (PyTorch KModel) on %s", device)
    return TorchEngine(load_kmodel(files, device), device, config.model.threads)
