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

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from speakd.server.engine import AcousticFeatures, AcousticRequest
from speakd.server.g2p import EnglishG2P
from speakd.server.model_assets import ModelFiles
from speakd.server.torch_engine import TorchEngine
from speakd.server.torch_weights import load_kmodel
from speakd.server.voices import VoiceBank

THREADS = 2
FEATURE_TOLERANCE = 1e-5  # x peak of each curve (measured worst: 2.2e-6)
AUDIO_TOLERANCE = 1e-4  # x peak of the reference audio (measured worst: 4.3e-6)
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

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Reference:
    """forward_with_tokens' audio and durations, and the features it handed its decoder."""

    audio: F32
    features: AcousticFeatures


@dataclass(frozen=True)
class Run:
    requests: list[AcousticRequest]
    features: list[AcousticFeatures]  # the batched acoustic stage
    audio: list[F32]  # the batched vocoder on the references' features
    references: list[Reference]


def _fixed_randomness(patch: pytest.MonkeyPatch) -> None:
    """torch.rand / torch.randn_like (SineGen's phase and noise) from fixed tables, row-independent."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(600 * 400, 9, generator=generator)  # up to 10 s at 24 kHz, 9 harmonics
    phase = torch.rand(9, generator=generator)

    def rand(*size: int, device: Any = None, **_: Any) -> torch.Tensor:
        rows, columns = size
        return phase[:columns].expand(rows, columns).to(device).clone()

    def randn_like(like: torch.Tensor, **_: Any) -> torch.Tensor:
        batch, samples, columns = like.shape
        return noise[:samples, :columns].expand(batch, samples, columns).to(like).clone()

    patch.setattr(torch, "rand", rand)
    patch.setattr(torch, "randn_like", randn_like)


def _reference(kmodel: Any, request: AcousticRequest) -> Reference:
    captured: dict[str, tuple[torch.Tensor, ...]] = {}

    def capture(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
        captured["args"] = args

    handle = kmodel.decoder.register_forward_pre_hook(capture)
    try:
        ids = torch.tensor([[0, *request.tokens, 0]], dtype=torch.long)
        audio, durations = kmodel.forward_with_tokens(ids, torch.from_numpy(request.style), request.speed)
    finally:
        handle.remove()
    asr, f0, energy, _ = (t.numpy() for t in captured["args"])
    features = AcousticFeatures(asr, f0, energy, request.style, durations.numpy().astype(np.int64))
    return Reference(audio.numpy(), features)


@pytest.fixture(scope="module")
def runs(torch_files: ModelFiles) -> dict[str, Run]:
    kmodel = load_kmodel(torch_files, "cpu")
    engine = TorchEngine(kmodel, "cpu", THREADS)
    g2p, voices = EnglishG2P(torch_files.vocab()), VoiceBank.from_npz(torch_files.voices_npz)
    references: dict[tuple[str, str, float], Reference] = {}
    result = {}
    with pytest.MonkeyPatch.context() as patch:
        _fixed_randomness(patch)
        for name, mix in MIXES.items():
            requests = []
            for text, voice, speed in mix:
                (chunk,) = g2p(text)
                requests.append(AcousticRequest(chunk.tokens, voices.style(voice, len(chunk.tokens)), speed))
                if (text, voice, speed) not in references:
                    references[text, voice, speed] = _reference(kmodel, requests[-1])
            mine = [references[key] for key in mix]
            features = engine.acoustic(requests)
            audio = engine.vocode([r.features for r in mine])
            result[name] = Run(requests, features, audio, mine)
    return result


def _relative_error(actual: F32, expected: F32) -> float:
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("mix", MIXES)
def test_batched_acoustic_matches_kmodel(runs: dict[str, Run], mix: str) -> None:
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
            assert _relative_error(got, want) <= FEATURE_TOLERANCE


@pytest.mark.parametrize("mix", MIXES)
def test_batched_vocoder_matches_kmodel(runs: dict[str, Run], mix: str) -> None:
    run = runs[mix]
    assert len(run.audio) == len(run.references)
    for audio, reference in zip(run.audio, run.references, strict=True):
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert audio.shape == (600 * reference.features.frames,) == reference.audio.shape
        assert np.abs(reference.audio).max() > 0.05
        assert _relative_error(audio, reference.audio) <= AUDIO_TOLERANCE


def test_mixes_pad_every_item_but_the_longest(runs: dict[str, Run]) -> None:
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

    from speakd.server.torch_masked import masked_adain, time_mask

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

    from speakd.server.torch_batch import per_item_istft
    from speakd.server.torch_masked import time_mask

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
