"""The loaded speech model: voices, G2P and engine, built once in a worker thread at start-up."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from speakd.server.config import Config
from speakd.server.engines.kokoro.assets import ModelFiles, prepare_embedded_model
from speakd.server.engines.kokoro.engine import SAMPLE_RATE, AcousticRequest, Engine
from speakd.server.engines.kokoro.g2p import LANGUAGES, EnglishG2P
from speakd.server.engines.kokoro.onnx_engine import OnnxEngine
from speakd.server.engines.kokoro.stages import KokoroStages
from speakd.server.engines.kokoro.torch_weights import ModelDir, load_kmodel, load_official_kmodel
from speakd.server.engines.kokoro.voices import VoiceBank
from speakd.server.errors import ConfigError, DependencyError
from speakd.server.pipeline.pipeline import WarmUpStep
from speakd.server.pipeline.stage import StageSpec

logger = logging.getLogger(__name__)

WARM_UP_TEXT = "Hello, this warms the model up."


@dataclass(frozen=True, slots=True)
class Speech:
    """Everything the pipeline's stages call into; immutable once loaded."""

    voices: VoiceBank
    g2p: EnglishG2P
    engine: Engine
    max_batch: int  # segments per acoustic/vocoder batch this engine does well with

    @classmethod
    def load(cls, config: Config) -> Speech:
        """Blocking: the official weights in model.dir, else the embedded model (assembled and cut if
        needed); then sessions or KModel, and G2P (a few seconds)."""
        started = time.perf_counter()
        model: ModelFiles | ModelDir
        model_dir = config.resolved_model_dir
        if model_dir is None:
            model = prepare_embedded_model(config.resolved_cache_dir)
            voices, vocab = VoiceBank.from_npz(model.voices_npz), model.vocab()
        else:
            model = ModelDir.open(model_dir)
            voices, vocab = VoiceBank.from_pt_files(model.voices), model.vocab
        if config.model.default_voice not in voices:
            raise ConfigError(
                f"model.default_voice {config.model.default_voice!r} is not a voice of this model; "
                f"choose one of {', '.join(voices.names)}"
            )
        engine, max_batch = _engine(config, model)
        speech = cls(voices=voices, g2p=EnglishG2P(vocab), engine=engine, max_batch=max_batch)
        logger.info(
            "model loaded in %.1f s from %s (voices: %s; default %s)",
            time.perf_counter() - started,
            model_dir or "the embedded int8 ONNX model",
            ", ".join(voices.names),
            config.model.default_voice,
        )
        return speech

    model_id = "kokoro"
    attribution = ("hexgrad (Kokoro-82M)", "https://huggingface.co/hexgrad/Kokoro-82M")
    sample_rate = SAMPLE_RATE
    languages = LANGUAGES

    @property
    def voice_names(self) -> list[str]:
        return self.voices.names

    def language_for(self, voice: str) -> str:
        """Kokoro names voices by language: "b…" British English; the rest read American English for
        now (the embedded Japanese voices too, until a Japanese G2P is wired up)."""
        return "en-gb" if voice.startswith("b") else "en-us"

    def stages(self) -> list[StageSpec]:
        return KokoroStages(self.g2p, self.engine, self.voices).specs()

    def warm_up_requests(self, voice: str) -> list[AcousticRequest]:
        """A short sentence in `voice`, for Pipeline.warm_up: the first client then does not pay for
        lazy allocations."""
        return [
            AcousticRequest(chunk.tokens, self.voices.style(voice, len(chunk.tokens)), 1.0)
            for chunk in self.g2p(WARM_UP_TEXT)
        ]

    def warm_up(self, voice: str) -> tuple[list[WarmUpStep], Any]:
        """One synthesis of a short sentence through the acoustic and vocoder stages."""
        steps: list[WarmUpStep] = [("acoustic", self.engine.acoustic), ("vocoder", self.engine.vocode)]
        return steps, self.warm_up_requests(voice)


def _torch_cuda_available() -> bool:
    """Whether PyTorch is installed and sees a CUDA GPU; False without PyTorch."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def choose_engine(engine: str, device: str, model_dir: bool = False) -> tuple[str, str]:
    """(engine, device) with "auto" resolved; the device is "cpu" for the onnx engine.

    engine "auto" is torch when PyTorch sees a GPU or the weights come from a model dir (only torch runs
    them, on the CPU too), else onnx; device "auto" is "cuda" when PyTorch sees a GPU, else "cpu". A
    CUDA device PyTorch cannot see is a ConfigError."""
    if engine == "auto":
        engine = "torch" if model_dir or _torch_cuda_available() else "onnx"
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


def default_max_batch(engine: str, device: str) -> int:
    """Batch size for pipeline.max_batch 0: many on a GPU, one on a CPU. On a CPU the convolutions are
    compute-bound already, so a batch only adds padding and delays its first item (bench_engines on 2
    cores: torch vocoder per item 1.80x slower at batch 4 than at 1, 1.08x with glibc's mmap threshold
    raised); ONNX Runtime runs items one by one anyway."""
    return 64 if engine == "torch" and device.startswith("cuda") else 1


def _engine(config: Config, model: ModelFiles | ModelDir) -> tuple[Engine, int]:
    """The engine, and the batch size it does well with (pipeline.max_batch, or its default)."""
    # ModelSection refuses engine "onnx" with a model dir, so a ModelDir always gets torch here.
    engine, device = choose_engine(config.model.engine, config.model.device, isinstance(model, ModelDir))
    max_batch = config.pipeline.max_batch or default_max_batch(engine, device)
    if engine == "onnx" and isinstance(model, ModelFiles):
        if config.model.precision != "fp32":
            raise ConfigError(
                f"model.precision {config.model.precision!r} needs the torch engine; the onnx engine "
                "runs the embedded int8 model as it is (leave model.precision at 'fp32')"
            )
        logger.info("engine: onnx (ONNX Runtime, CPU), batches of %d", max_batch)
        return OnnxEngine(model, config.model.threads), max_batch
    from speakd.server.engines.kokoro.torch_engine import TorchEngine

    if isinstance(model, ModelDir):
        kmodel, weights = load_official_kmodel(model, device), f"official weights from {model.root}"
    else:
        kmodel, weights = load_kmodel(model, device), "weights converted from the embedded model"
    logger.info("engine: torch (PyTorch KModel) on %s, %s, batches of %d", device, weights, max_batch)
    return TorchEngine(kmodel, device, config.model.threads, config.model.precision), max_batch
