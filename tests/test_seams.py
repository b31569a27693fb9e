"""The seam carry: the harmonic phase and the pooled norm statistics as arithmetic, and on the real
embedded vocoder, that a window given the segment's phase and statistics renders what a whole render
does, where a window on its own does not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from speakd.server.engines.kokoro.assets import ModelFiles, prepare_embedded_model
from speakd.server.engines.kokoro.engine import SAMPLES_PER_FRAME, AcousticFeatures, AcousticRequest
from speakd.server.engines.kokoro.g2p import EnglishG2P
from speakd.server.engines.kokoro.onnx_engine import OnnxEngine
from speakd.server.engines.kokoro.seams import (
    PRIOR_FRAMES,
    NormPrior,
    NormStats,
    SeamCarry,
    harmonic_phase,
)
from speakd.server.engines.kokoro.voices import VoiceBank
from speakd.server.engines.kokoro.windows import Window

F32 = npt.NDArray[np.float32]
SENTENCES = (
    "Sure, here's a quick overview of how photosynthesis works in most plants.",
    "Okay, I have set a timer for ten minutes, starting now.",
)


# -- arithmetic ---------------------------------------------------------------------------------------


def test_phase_starts_at_zero_and_sums_the_increments_before_the_frame() -> None:
    f0 = np.full((1, 40), 220.0, np.float32)
    assert not harmonic_phase(f0, 0).any()
    phase = harmonic_phase(f0, 7).reshape(-1)
    harmonics = np.arange(1, 10)
    # 14 F0 points of 300 samples each, every sample advancing harmonic h by h * 220 / 24000 cycles.
    expected = np.mod(14 * 300 * np.mod(harmonics * 220.0 / 24000, 1.0), 1.0) / 300
    gap = np.abs(phase - expected) % (1 / 300)  # phases on a circle of 1/300
    assert (np.minimum(gap, 1 / 300 - gap) < 1e-6).all()
    assert ((phase >= 0) & (phase < 1 / 300)).all()


def test_phase_ignores_the_f0_after_the_frame() -> None:
    rng = np.random.default_rng(1)
    f0 = rng.uniform(80, 300, (1, 60)).astype(np.float32)
    changed = f0.copy()
    changed[0, 20:] = 0.0
    assert np.array_equal(harmonic_phase(f0, 10), harmonic_phase(changed, 10))
    assert not np.array_equal(harmonic_phase(f0, 11), harmonic_phase(changed, 11))


def _stats(x: F32) -> NormStats:
    return NormStats((x.mean(axis=2, keepdims=True),), (x.var(axis=2, keepdims=True),))


def test_pooled_statistics_are_those_of_the_whole_sequence() -> None:
    x = np.random.default_rng(2).normal(3.0, 2.0, (1, 5, 70)).astype(np.float32)
    a, b = x[:, :, :20], x[:, :, 20:]
    pooled = _stats(a).pooled(20 / 70, _stats(b))
    whole = _stats(x)
    assert np.allclose(pooled.means[0], whole.means[0], atol=1e-5)
    assert np.allclose(pooled.variances[0], whole.variances[0], atol=1e-4)


def test_the_prior_starts_empty_then_follows_whole_renders() -> None:
    prior = NormPrior()
    assert prior.stats is None and prior.first_window_weight(40) == 0.0
    first = NormStats((np.zeros((1, 2, 1), np.float32),), (np.ones((1, 2, 1), np.float32),))
    prior.observe(first)
    assert prior.stats is first
    assert prior.first_window_weight(PRIOR_FRAMES) == 0.5
    prior.observe(NormStats((np.full((1, 2, 1), 10, np.float32),), (np.ones((1, 2, 1), np.float32),)))
    assert prior.stats is not None
    assert 0 < float(prior.stats.means[0][0, 0, 0]) < 10  # moved toward the new render, not replaced


# -- the real vocoder ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(model_cache: Path) -> ModelFiles:
    return prepare_embedded_model(model_cache)


@pytest.fixture(scope="module")
def segments(files: ModelFiles) -> list[AcousticFeatures]:
    g2p, voices, engine = EnglishG2P(files.vocab()), VoiceBank.from_npz(files.voices_npz), OnnxEngine(files)
    requests = [
        AcousticRequest(chunk.tokens, voices.style("jf_alpha", len(chunk.tokens)), 1.0)
        for text in SENTENCES
        for chunk in g2p(text)
    ]
    return engine.acoustic(requests)


def _log_spectral_db(got: F32, reference: F32) -> float:
    """Mean absolute difference of log-magnitude spectra (1024-sample Hann frames, hop 256), floored
    60 dB under the reference's peak: differences in near-silence are not heard."""

    def spectrum(x: F32) -> F32:
        frames = np.lib.stride_tricks.sliding_window_view(x, 1024)[::256] * np.hanning(1024)
        return (20 * np.log10(np.abs(np.fft.rfft(frames)) + 1e-4)).astype(np.float32)

    a, b = spectrum(got), spectrum(reference)
    floor = float(b.max()) - 60.0
    return float(np.abs(np.maximum(a, floor) - np.maximum(b, floor)).mean())


def _snr_db(got: F32, reference: F32) -> float:
    return float(10 * np.log10(np.sum(reference**2) / (np.sum((got - reference) ** 2) + 1e-12)))


def test_a_window_with_the_segments_phase_and_statistics_renders_what_a_whole_render_does(
    files: ModelFiles, segments: list[AcousticFeatures]
) -> None:
    engine = OnnxEngine(files)  # no prior yet: a first window keeps its own statistics
    for features in segments:
        frames = features.frames
        whole = Window(0, frames, 0, frames, last=False)
        seam = SeamCarry()
        (reference,) = engine.vocode([whole.slice(features, seam)])
        assert seam.stats is not None  # the segment's statistics, for its later windows
        start = frames // 2
        later = Window(start, frames, start, frames, last=True)
        (carried,) = engine.vocode([later.slice(features, seam)])
        alone = later.slice(features)
        (own,) = engine.vocode(
            [AcousticFeatures(alone.asr, alone.f0, alone.energy, alone.style, alone.durations)]
        )
        # Past the window's first 8 frames (its convolutions see no context before it).
        tail = slice(8 * SAMPLES_PER_FRAME, None)
        expected = reference[start * SAMPLES_PER_FRAME :][tail]
        carried_db, own_db = _snr_db(carried[tail], expected), _snr_db(own[tail], expected)
        # The waveform comes closer, but not equal on every segment (5-16 dB SNR on these two); the
        # spectrum, what is heard, comes about twice as close as a window's own (1.1-1.4 dB against
        # 2.3-2.4 dB of log-spectral distance, measured 2026-12-04).
        assert carried_db >= own_db + 3.0, (carried_db, own_db)
        carried_lsd, own_lsd = (
            _log_spectral_db(carried[tail], expected),
            _log_spectral_db(own[tail], expected),
        )
        assert carried_lsd <= 1.6 and carried_lsd <= 0.65 * own_lsd, (carried_lsd, own_lsd)
        engine = OnnxEngine(files)


def test_a_render_on_its_own_teaches_the_prior_and_a_first_window_pools_with_it(
    files: ModelFiles, segments: list[AcousticFeatures]
) -> None:
    engine = OnnxEngine(files)
    first, second = segments
    (whole,) = engine.vocode([first])
    assert np.isfinite(whole).all()
    frames = second.frames
    window = Window(0, frames // 2, 0, frames // 2 + 8, last=False)
    seam = SeamCarry()
    engine.vocode([window.slice(second, seam)])
    fresh, fresh_seam = OnnxEngine(files), SeamCarry()
    fresh.vocode([window.slice(second, fresh_seam)])
    assert seam.stats is not None and fresh_seam.stats is not None
    # With a prior the window's statistics are pooled with it; without, they are the window's own.
    assert not np.allclose(seam.stats.means[0], fresh_seam.stats.means[0])
