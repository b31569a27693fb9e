"""The converted KModel weights on the real embedded model: complete, finite, cached once, and
behaving like the ONNX graph (durations, and the vocoder on the same features). Offline, no fakes;
conversion runs once per module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from speakd.server.engines.kokoro.assets import ModelFiles
from speakd.server.engines.kokoro.engine import AcousticFeatures, AcousticRequest
from speakd.server.engines.kokoro.g2p import EnglishG2P
from speakd.server.engines.kokoro.onnx_engine import OnnxEngine
from speakd.server.engines.kokoro.torch_weights import (
    ONNX_AUDIO_GAIN,
    PARTS,
    load_kmodel,
    prepare_torch_weights,
)
from speakd.server.engines.kokoro.voices import VoiceBank
from speakd.server.errors import ModelError

VOICE = "jf_gongitsune"
# Short: fp32 torch vocoding runs about 3x slower than real time on a CPU.
SENTENCES = ("Hello there.", "The sun is warm today.", "Can you hear me?")
THREADS = 2
# int8 activation noise moves a few tokens by one frame; a mapping bug moves totals by 100s of frames.
TOTAL_FRAMES_TOLERANCE = 0.02
TOTAL_FRAMES_SLACK = 3
# STFT-magnitude spectral convergence, KModel's decoder (x1.5) vs the ONNX vocoder on the same features:
# measured 0.065-0.078 here, about ONNX's int8 activation noise. Mapping bugs measured well above:
# ConvTranspose kernels reversed 0.24-0.26, Snake alphas left at 1 0.32-0.35, weight_g = 1 1.0-5.0.
SPECTRAL_CONVERGENCE_BOUND = 0.15

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Pair:
    onnx: AcousticFeatures
    onnx_audio: F32
    kmodel_durations: I64
    kmodel_audio: F32  # already scaled by ONNX_AUDIO_GAIN


@pytest.fixture(scope="module")
def weights(torch_files: ModelFiles) -> Path:
    return prepare_torch_weights(torch_files)


@pytest.fixture(scope="module")
def checkpoint(weights: Path) -> dict[str, dict[str, torch.Tensor]]:
    loaded: dict[str, dict[str, torch.Tensor]] = torch.load(weights, weights_only=True, mmap=True)
    return loaded


@pytest.fixture(scope="module")
def kmodel(torch_files: ModelFiles, weights: Path) -> Any:
    return load_kmodel(torch_files)


@torch.no_grad()
def kmodel_durations(kmodel: Any, tokens: tuple[int, ...], style: F32, speed: float) -> I64:
    """Frames per token: KModel.forward_with_tokens' acoustic half, without its costly vocoder."""
    ids = torch.tensor([[0, *tokens, 0]], dtype=torch.long)
    lengths = torch.tensor([ids.shape[1]], dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)  # one unpadded sequence
    encoded = kmodel.bert_encoder(kmodel.bert(ids, attention_mask=(~mask).int())).transpose(-1, -2)
    prosody = kmodel.predictor.text_encoder(encoded, torch.from_numpy(style)[:, 128:], lengths, mask)
    hidden, _ = kmodel.predictor.lstm(prosody)
    raw = torch.sigmoid(kmodel.predictor.duration_proj(hidden)).sum(dim=-1) / speed
    durations: I64 = torch.round(raw).clamp(min=1).long().reshape(-1).numpy()
    return durations


@torch.no_grad()
def kmodel_vocode(kmodel: Any, features: AcousticFeatures) -> F32:
    """KModel's decoder on ONNX's own features, scaled to ONNX's loudness.

    The ONNX graph's sine source has no random phase or noise; zero torch's so the two compare."""
    zeros, zeros_like = torch.zeros, torch.zeros_like
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "rand", lambda *size, **kw: zeros(*size, device=kw.get("device")))
        patch.setattr(torch, "randn_like", lambda t, **kw: zeros_like(t))
        audio = kmodel.decoder(
            *(torch.from_numpy(x) for x in (features.asr, features.f0, features.energy)),
            torch.from_numpy(features.style)[:, :128],
        )
    scaled: F32 = audio.reshape(-1).numpy() * np.float32(ONNX_AUDIO_GAIN)
    return scaled


def spectral_convergence(reference: F32, other: F32, n_fft: int = 1024, hop: int = 256) -> float:
    """‖|S_ref| - |S_other|‖ / ‖|S_ref|‖ over STFT magnitudes: blind to phase, sensitive to timbre."""
    n = min(len(reference), len(other))
    window = torch.hann_window(n_fft)
    ref, oth = (
        torch.stft(torch.from_numpy(x[:n]), n_fft, hop, window=window, return_complex=True).abs()
        for x in (reference, other)
    )
    return float(torch.linalg.norm(ref - oth) / torch.linalg.norm(ref))


@pytest.fixture(scope="module")
def pairs(torch_files: ModelFiles, kmodel: Any) -> list[Pair]:
    g2p = EnglishG2P(torch_files.vocab())
    voices = VoiceBank.from_npz(torch_files.voices_npz)
    engine = OnnxEngine(torch_files, threads=THREADS)
    result = []
    for sentence in SENTENCES:
        (chunk,) = g2p(sentence)
        style = voices.style(VOICE, len(chunk.tokens))
        (features,) = engine.acoustic([AcousticRequest(tokens=chunk.tokens, style=style, speed=1.0)])
        (onnx_audio,) = engine.vocode([features])
        result.append(
            Pair(
                onnx=features,
                onnx_audio=onnx_audio,
                kmodel_durations=kmodel_durations(kmodel, chunk.tokens, style, 1.0),
                kmodel_audio=kmodel_vocode(kmodel, features),
            )
        )
    return result


def test_every_kmodel_key_is_filled_and_loads_strictly(
    checkpoint: dict[str, dict[str, torch.Tensor]], kmodel: Any
) -> None:
    assert set(checkpoint) == set(PARTS)
    for part in PARTS:
        module = getattr(kmodel, part)
        assert set(checkpoint[part]) == set(module.state_dict())
        module.load_state_dict(checkpoint[part], strict=True)


def test_weights_are_finite_even_after_weight_norm(checkpoint: dict[str, dict[str, torch.Tensor]]) -> None:
    for part, state in checkpoint.items():
        for key, tensor in state.items():
            assert torch.isfinite(tensor).all(), f"{part}.{key}"
            if key.endswith(".weight_v"):
                # What torch's weight_norm computes: an all-zero v would give 0/0 here.
                norm = tensor.flatten(1).norm(dim=1).reshape(-1, *[1] * (tensor.ndim - 1))
                gain = state[key.removesuffix("_v") + "_g"]
                assert torch.isfinite(gain * tensor / norm).all(), f"{part}.{key}"


def test_conversion_is_cached(torch_files: ModelFiles, weights: Path) -> None:
    before = weights.stat().st_mtime_ns
    assert prepare_torch_weights(torch_files) == weights
    assert weights.stat().st_mtime_ns == before
    assert weights.parent == torch_files.whole.parent


def test_durations_match_onnx_within_a_frame(pairs: list[Pair]) -> None:
    for pair in pairs:
        onnx_durations = pair.onnx.durations
        assert pair.kmodel_durations.shape == onnx_durations.shape
        assert np.abs(pair.kmodel_durations - onnx_durations).max() <= 1
        total, kmodel_total = int(onnx_durations.sum()), int(pair.kmodel_durations.sum())
        assert abs(kmodel_total - total) <= max(TOTAL_FRAMES_TOLERANCE * total, TOTAL_FRAMES_SLACK)


def test_decoder_matches_onnx_vocoder_spectrally(pairs: list[Pair]) -> None:
    for pair in pairs:
        assert len(pair.kmodel_audio) == len(pair.onnx_audio)
        assert np.isfinite(pair.kmodel_audio).all()
        assert spectral_convergence(pair.onnx_audio, pair.kmodel_audio) < SPECTRAL_CONVERGENCE_BOUND


@pytest.mark.parametrize("content", [b"not a checkpoint", None], ids=["garbage", "partial"])
def test_a_cache_that_does_not_fit_kmodel_is_a_model_error(
    torch_files: ModelFiles, tmp_path: Path, content: bytes | None
) -> None:
    stale = ModelFiles(
        whole=tmp_path / "model.onnx",
        acoustic=torch_files.acoustic,
        vocoder=torch_files.vocoder,
        vocab_json=torch_files.vocab_json,
        voices_npz=torch_files.voices_npz,
    )
    cached = tmp_path / "kmodel.pth"
    if content is None:
        torch.save({part: {} for part in PARTS}, cached)
    else:
        cached.write_bytes(content)
    with pytest.raises(ModelError, match="delete it"):
        load_kmodel(stale)
