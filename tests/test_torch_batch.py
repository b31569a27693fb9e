"""Oracle for the batched torch engine: every item of a padded batch matches KModel's batch-1
`forward_with_tokens` on the same weights, stage by stage.

- Acoustic: durations exactly; aligned features, F0 and energy within 1e-5 x their peak.
- Vocoder: fed forward_with_tokens' own decoder inputs, the batched vocoder reproduces its audio within
  1e-4 x peak.

End-to-end audio is not compared sample by sample: KModel's SineGen integrates F0 into a float32 phase
of ~1e5 rad, so a 1e-7 relative change of F0 (float rounding: KModel against itself at 1 vs 2 threads)
moves its audio by ~4e-3 x peak. That sensitivity belongs to the model, not to batching.

SineGen draws a random initial phase and noise on every call; both are replaced by fixed tables indexed
by sample position, the same in the batched and the unbatched run (and non-zero in the padding, so a
leak from the padding would show).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from speakd.server.engines.kokoro.assets import ModelFiles
from speakd.server.engines.kokoro.engine import AcousticFeatures, AcousticRequest
from speakd.server.engines.kokoro.g2p import EnglishG2P
from speakd.server.engines.kokoro.torch_engine import TorchEngine
from speakd.server.engines.kokoro.torch_oracle import (
    AUDIO_TOLERANCE,
    FEATURE_TOLERANCE,
    HARMONIC_TOLERANCE,
    OracleRun,
    Reference,
    fixed_randomness,
    harmonic_check,
    relative_error,
    run_oracle,
)
from speakd.server.engines.kokoro.torch_weights import load_kmodel
from speakd.server.engines.kokoro.voices import VoiceBank

THREADS = 2
# (text, voice, speed). Short: fp32 torch vocodes at ~0.4x real time on a 2-core CPU.
MIXES: dict[str, list[tuple[str, str, float]]] = {
    "one item": [("Hello there.", "jf_alpha", 1.0)],
    "two very different lengths": [
        ("Hi.", "jf_alpha", 1.0),
        ("The sun is warm, and the sky is clear.", "jf_gongitsune", 1.0),
    ],
    "voices, speeds and a twin": [
        ("It is cold.", "jf_alpha", 1.0),
        ("A cat sat.", "jm_kumo", 1.2),
        ("It is cold.", "jf_alpha", 1.0),
        ("Fine, thanks.", "jf_nezumi", 0.8),
    ],
}


@pytest.fixture(scope="module")
def kmodel(torch_files: ModelFiles) -> Any:
    return load_kmodel(torch_files, "cpu")


@pytest.fixture(scope="module")
def runs(torch_files: ModelFiles, kmodel: Any) -> dict[str, OracleRun]:
    engine = TorchEngine(kmodel, "cpu", THREADS)
    g2p, voices = EnglishG2P(torch_files.vocab()), VoiceBank.from_npz(torch_files.voices_npz)
    references: dict[Any, Reference] = {}
    result = {}
    for name, mix in MIXES.items():
        requests = []
        for text, voice, speed in mix:
            (chunk,) = g2p(text)
            requests.append(AcousticRequest(chunk.tokens, voices.style(voice, len(chunk.tokens)), speed))
        result[name] = run_oracle(engine, kmodel, requests, references)
    return result


@pytest.mark.parametrize("mix", MIXES)
def test_batched_acoustic_matches_kmodel(runs: dict[str, OracleRun], mix: str) -> None:
    run = runs[mix]
    assert len(run.features) == len(run.requests)
    for request, features, reference in zip(run.requests, run.features, run.references, strict=True):
        expected = reference.features
        frames = int(expected.durations.sum())
        assert features.durations.dtype == np.int64
        assert features.durations.shape == (len(request.tokens) + 2,)
        np.testing.assert_array_equal(features.durations, expected.durations)
        assert features.frames == frames
        assert features.asr.shape == (1, 512, frames)
        assert features.f0.shape == features.energy.shape == (1, 2 * frames)
        for array in (features.asr, features.f0, features.energy, features.style):
            assert array.dtype == np.float32
        np.testing.assert_array_equal(features.style, request.style)
        for got, want in (
            (features.asr, expected.asr),
            (features.f0, expected.f0),
            (features.energy, expected.energy),
        ):
            assert relative_error(got, want) <= FEATURE_TOLERANCE


@pytest.mark.parametrize("mix", MIXES)
def test_batched_vocoder_matches_kmodel(runs: dict[str, OracleRun], mix: str) -> None:
    run = runs[mix]
    assert len(run.audio) == len(run.references)
    for audio, reference in zip(run.audio, run.references, strict=True):
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert audio.shape == (600 * reference.features.frames,) == reference.audio.shape
        assert np.abs(reference.audio).max() > 0.05
        assert relative_error(audio, reference.audio) <= AUDIO_TOLERANCE


def test_mixes_pad_every_item_but_the_longest(runs: dict[str, OracleRun]) -> None:
    """The oracle means something only if batches really are padded: lengths differ within mixes."""
    two = runs["two very different lengths"]
    assert len(two.requests[1].tokens) >= 5 * len(two.requests[0].tokens)
    assert two.features[1].frames >= 2.5 * two.features[0].frames
    mixed = runs["voices, speeds and a twin"]
    assert len({features.frames for features in mixed.features}) == 3
    twin, other = mixed.requests[0], mixed.requests[2]
    assert twin.tokens == other.tokens and twin.speed == other.speed
    np.testing.assert_array_equal(twin.style, other.style)
    assert len({request.speed for request in mixed.requests}) == 3


# -- the padding-aware pieces on random data: every sample, not only against the peak ----------------


def test_masked_adain_is_instance_norm_over_each_items_length() -> None:
    from kokoro.istftnet import AdaIN1d

    from speakd.server.engines.kokoro.torch_masked import masked_adain, time_mask

    generator = torch.Generator().manual_seed(2)
    adain = AdaIN1d(style_dim=8, num_features=4)
    lengths = torch.tensor([37, 5, 50])
    x = torch.randn(3, 4, 50, generator=generator) * 3 + 1  # padding holds garbage, as between blocks
    style = torch.randn(3, 8, generator=generator)
    with torch.inference_mode():
        out = masked_adain(adain, x, style, time_mask(lengths, 50, x.dtype))
        for i, n in enumerate(lengths.tolist()):
            alone = adain(x[i : i + 1, :, :n], style[i : i + 1])
            torch.testing.assert_close(out[i : i + 1, :, :n], alone, rtol=1e-5, atol=1e-5)
            assert (out[i, :, n:] == 0).all()


def test_per_item_istft_is_torch_istft_of_each_item() -> None:
    from kokoro.istftnet import TorchSTFT

    from speakd.server.engines.kokoro.torch_batch import per_item_istft
    from speakd.server.engines.kokoro.torch_masked import time_mask

    stft = TorchSTFT(filter_length=20, hop_length=5, win_length=20)
    generator = torch.Generator().manual_seed(3)
    frames = torch.tensor([121, 61, 241])  # 120·T + 1 spectrum frames for T = 1, 0.5, 2
    magnitude = torch.rand(3, 11, 241, generator=generator) + 0.1  # non-zero in the padding too
    phase = (torch.rand(3, 11, 241, generator=generator) - 0.5) * 6
    audio = per_item_istft(stft, magnitude, phase, time_mask(frames, 241, magnitude.dtype))
    assert audio.shape == (3, 5 * 240)
    for i, k in enumerate(frames.tolist()):
        alone = stft.inverse(magnitude[i : i + 1, :, :k], phase[i : i + 1, :, :k])[0, 0]
        assert alone.shape == (5 * (k - 1),)
        torch.testing.assert_close(audio[i, : alone.shape[0]], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mix", MIXES)
def test_oracle_report_passes(runs: dict[str, OracleRun], kmodel: Any, mix: str) -> None:
    """What bench/gpu_check.py reports on a GPU, here on the CPU."""
    report = runs[mix].report(kmodel)
    assert report.passed, report.as_dict()
    assert report.items == len(MIXES[mix])
    assert report.harmonic.phase_flips == 0


# -- the harmonic source: batched, and still each item's own -------------------------------------------


def _f0_curves() -> list[np.ndarray]:
    """Voiced stretches with gaps (F0 0 Hz: SineGen's unvoiced branch), three very different lengths."""
    curves = []
    for i, steps in enumerate((74, 302, 10, 160)):
        t = np.arange(steps, dtype=np.float32)
        curve = 120 + 60 * np.sin(t / 7 + i)
        curve[:3] = 0
        curve[steps // 2 : steps // 2 + 5] = 0
        curves.append(curve.astype(np.float32))
    return curves


def test_batched_harmonic_source_is_each_items_own(kmodel: Any) -> None:
    check = harmonic_check(kmodel, _f0_curves())
    assert check.phase_flips == 0
    assert check.max_error <= HARMONIC_TOLERANCE
    # Last-bit differences only, from the tail of vectorised atan2: a handful of ~1e6 elements.
    assert check.mismatched <= 8


def test_harmonic_check_catches_an_item_reflected_at_the_batchs_end(
    kmodel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutation check: the naive batched STFT (centre padding reflected at the batch's end, for every
    item) must fail the check, else the check proves nothing."""
    from speakd.server.engines.kokoro import torch_batch

    def naive(generator: Any, f0: torch.Tensor, f0_steps: list[int]) -> torch.Tensor:
        upsampled = generator.f0_upsamp(f0[:, None]).transpose(1, 2)
        source, _, _ = generator.m_source(upsampled)
        magnitude, phase = generator.stft.transform(source.transpose(1, 2).squeeze(1))
        return torch.cat([magnitude, phase], dim=1)

    monkeypatch.setattr(torch_batch, "_harmonic_spectrum", naive)
    check = harmonic_check(kmodel, _f0_curves())
    assert check.max_error > HARMONIC_TOLERANCE


def test_prepare_makes_the_window_a_buffer_and_folds_weight_norm(kmodel: Any) -> None:
    from torch.nn.utils.weight_norm import WeightNorm

    from speakd.server.engines.kokoro import torch_batch

    torch_batch.prepare(kmodel)  # again: idempotent (the engine fixture prepared it once)
    stft = kmodel.decoder.generator.stft
    assert "window" in stft._buffers and "window" not in stft.state_dict()
    moved = stft.to(torch.float64)
    assert moved.window.dtype == torch.float64  # the buffer moves with the module
    stft.to(torch.float32)
    hooks = [h for m in kmodel.modules() for h in m._forward_pre_hooks.values() if isinstance(h, WeightNorm)]
    assert hooks == []
    assert not any(name.endswith(("weight_g", "weight_v")) for name, _ in kmodel.named_parameters())


def test_bf16_autocast_vocoder_stays_close_to_fp32(runs: dict[str, OracleRun], kmodel: Any) -> None:
    """Under autocast only the convolutions drop to bf16: the audio keeps its shape and level. On
    16-frame windows (0.4 s): bf16 convolutions are slow on a CPU without bf16 units."""
    windows = [
        AcousticFeatures(
            f.asr[..., 8:24].copy(),
            f.f0[..., 16:48].copy(),
            f.energy[..., 16:48].copy(),
            f.style,
            f.durations,
        )
        for f in (ref.features for ref in runs["two very different lengths"].references)
    ]
    full = TorchEngine(kmodel, "cpu", THREADS)
    half = TorchEngine(kmodel, "cpu", THREADS, precision="bf16")
    with fixed_randomness():
        expected, got = full.vocode(windows), half.vocode(windows)
    for mine, reference in zip(got, expected, strict=True):
        assert mine.dtype == np.float32 and mine.shape == reference.shape == (600 * 16,)
        assert np.isfinite(mine).all()
        error = relative_error(mine, reference)
        assert 0 < error < 0.5, error  # bf16 has 8 bits of mantissa: not exact, not noise either
        ratio = float(np.sqrt(np.mean(mine**2) / np.mean(reference**2)))
        assert 0.8 < ratio < 1.25
