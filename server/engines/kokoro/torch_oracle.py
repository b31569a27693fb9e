"""The batched torch engine checked against KModel's own batch-1 `forward_with_tokens`, stage by stage.

tests/test_torch_batch.py asserts on it on the CPU; bench/gpu_check.py runs it on a GPU (with TF32 off
and on) and under autocast. Each item of a padded batch must give what KModel gives for it alone:
- acoustic: the same durations, and aligned features, F0 and energy within a tolerance of their peak;
- vocoder: fed the features KModel handed its own decoder, the same audio within a tolerance;
- harmonic source: the STFT of the excitation, which runs batched, equal element by element but for
  last-bit differences (a vectorised transcendental's tail), and no ±π flip of a phase.

End-to-end audio is not compared sample by sample: KModel's SineGen integrates F0 into a float32 phase
of ~1e5 rad, so a 1e-7 relative change of F0 (float rounding: KModel against itself at 1 vs 2 threads)
moves its audio by ~4e-3 x peak. That sensitivity belongs to the model, not to batching.

SineGen draws a random initial phase and noise on every call; `fixed_randomness` replaces both with
fixed tables indexed by sample position, the same in the batched and the unbatched run (and non-zero in
the padding, so a leak from the padding would show).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from speakd.server.engines.kokoro.engine import AcousticFeatures, AcousticRequest

if TYPE_CHECKING:
    import torch

    from speakd.server.engines.kokoro.torch_engine import TorchEngine

F32 = npt.NDArray[np.float32]
FEATURE_TOLERANCE = 1e-5  # x peak of each curve (worst on a CPU: 4.7e-6; 6.5e-6 random weights)
AUDIO_TOLERANCE = 1e-4  # x peak of the reference audio (worst on a CPU: 1.2e-5)
HARMONIC_TOLERANCE = 1e-5  # absolute, on magnitudes (~1) and phases (±π): a few float32 ulps
MAX_SAMPLES = 600 * 800  # the fixed noise table: 20 s at 24 kHz


@contextlib.contextmanager
def fixed_randomness() -> Iterator[None]:
    """torch.rand and torch.randn_like (SineGen's initial phase and noise) from fixed tables, the same
    for every row: an item draws the same numbers alone and in a batch. Process-wide while it lasts."""
    import torch

    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(MAX_SAMPLES, 9, generator=generator)  # 9 harmonics
    phase = torch.rand(9, generator=generator)
    real_rand, real_randn_like = torch.rand, torch.randn_like

    def rand(*size: int, device: Any = None, **_: Any) -> torch.Tensor:
        rows, columns = size
        return phase[:columns].expand(rows, columns).to(device).clone()

    def randn_like(like: torch.Tensor, **_: Any) -> torch.Tensor:
        if like.ndim != 3 or like.shape[1] > MAX_SAMPLES:
            return real_randn_like(like)  # not SineGen's
        batch, samples, columns = like.shape
        return noise[:samples, :columns].expand(batch, samples, columns).to(like).clone()

    setattr(torch, "rand", rand)  # noqa: B010 (assigning would not type-check: torch's are overloaded)
    setattr(torch, "randn_like", randn_like)  # noqa: B010
    try:
        yield
    finally:
        setattr(torch, "rand", real_rand)  # noqa: B010
        setattr(torch, "randn_like", real_randn_like)  # noqa: B010


@dataclass(frozen=True)
class Reference:
    """forward_with_tokens' audio and durations, and the features it handed its decoder."""

    audio: F32
    features: AcousticFeatures


def reference(kmodel: Any, request: AcousticRequest) -> Reference:
    """KModel alone on one request, on the model's device (fp32, no autocast)."""
    import torch

    captured: dict[str, tuple[torch.Tensor, ...]] = {}

    def capture(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
        captured["args"] = args

    device = kmodel.device
    handle = kmodel.decoder.register_forward_pre_hook(capture)
    try:
        ids = torch.tensor([[0, *request.tokens, 0]], dtype=torch.long, device=device)
        style = torch.from_numpy(request.style).to(device)
        audio, durations = kmodel.forward_with_tokens(ids, style, request.speed)
    finally:
        handle.remove()
    asr, f0, energy, _ = (t.float().cpu().numpy() for t in captured["args"])
    features = AcousticFeatures(asr, f0, energy, request.style, durations.cpu().numpy().astype(np.int64))
    return Reference(audio.float().cpu().numpy(), features)


def relative_error(actual: F32, expected: F32) -> float:
    """max |actual - expected| / max |expected| (inf when the shapes differ)."""
    if actual.shape != expected.shape:
        return math.inf
    return float(np.abs(actual - expected).max() / max(float(np.abs(expected).max()), 1e-30))


@dataclass(frozen=True)
class HarmonicCheck:
    """The batched harmonic source's spectrum against each item's alone."""

    mismatched: int  # elements not bitwise equal
    max_error: float  # the largest absolute difference among them
    phase_flips: int  # phases that differ by about 2π: a real spectrum whose sign of zero differs


def harmonic_check(kmodel: Any, f0s: Sequence[F32]) -> HarmonicCheck:
    """Batched `_harmonic_spectrum` on F0 curves [S_i] against KModel's own code for each alone, under
    fixed randomness."""
    import torch

    from speakd.server.engines.kokoro.torch_batch import _harmonic_spectrum

    generator = kmodel.decoder.generator
    device = kmodel.device
    steps = [len(f0) for f0 in f0s]
    padded = torch.zeros(len(f0s), max(steps), device=device)
    for i, f0 in enumerate(f0s):
        padded[i, : len(f0)] = torch.from_numpy(np.asarray(f0, dtype=np.float32)).to(device)
    with torch.inference_mode(), fixed_randomness():
        batched = _harmonic_spectrum(generator, padded, steps)
        mismatched, max_error, flips = 0, 0.0, 0
        bins = generator.post_n_fft // 2 + 1
        for i, n in enumerate(steps):
            # Generator.forward's own first lines, on the item alone.
            upsampled = generator.f0_upsamp(padded[i : i + 1, None, :n]).transpose(1, 2)
            source, _, _ = generator.m_source(upsampled)
            magnitude, phase = generator.stft.transform(source.transpose(1, 2).squeeze(1))
            alone = torch.cat([magnitude, phase], dim=1)[0]
            mine = batched[i, :, : alone.shape[-1]]
            differ = mine != alone
            mismatched += int(differ.sum()) + int((batched[i, :, alone.shape[-1] :] != 0).sum())
            if differ.any():
                max_error = max(max_error, float((mine - alone).abs().max()))
            flips += int(((mine[bins:] - alone[bins:]).abs() > math.pi).sum())
    return HarmonicCheck(mismatched, max_error, flips)


@dataclass(frozen=True)
class OracleReport:
    """Worst errors over a batch's items; `passed` when each is within its tolerance."""

    items: int
    durations_equal: bool
    feature_error: float  # x peak
    audio_error: float  # x peak
    harmonic: HarmonicCheck

    @property
    def passed(self) -> bool:
        return (
            self.durations_equal
            and self.feature_error <= FEATURE_TOLERANCE
            and self.audio_error <= AUDIO_TOLERANCE
            and self.harmonic.max_error <= HARMONIC_TOLERANCE
            and self.harmonic.phase_flips == 0
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "durations_equal": self.durations_equal,
            "feature_error": self.feature_error,
            "audio_error": self.audio_error,
            "harmonic_mismatched": self.harmonic.mismatched,
            "harmonic_max_error": self.harmonic.max_error,
            "harmonic_phase_flips": self.harmonic.phase_flips,
            "passed": self.passed,
        }


@dataclass(frozen=True)
class OracleRun:
    """One padded batch through the engine, next to KModel alone on each of its items."""

    requests: list[AcousticRequest]
    features: list[AcousticFeatures]  # the batched acoustic stage
    audio: list[F32]  # the batched vocoder on the references' features
    references: list[Reference]

    def report(self, kmodel: Any) -> OracleReport:
        durations_equal, feature_error, audio_error = True, 0.0, 0.0
        for mine, expected, audio in zip(self.features, self.references, self.audio, strict=True):
            if not np.array_equal(mine.durations, expected.features.durations):
                durations_equal = False
                continue  # other frame counts: the curves cannot be compared
            for got, want in (
                (mine.asr, expected.features.asr),
                (mine.f0, expected.features.f0),
                (mine.energy, expected.features.energy),
            ):
                feature_error = max(feature_error, relative_error(got, want))
            audio_error = max(audio_error, relative_error(audio, expected.audio))
        harmonic = harmonic_check(kmodel, [ref.features.f0[0] for ref in self.references])
        return OracleReport(len(self.requests), durations_equal, feature_error, audio_error, harmonic)


def run_oracle(
    engine: TorchEngine, kmodel: Any, requests: Sequence[AcousticRequest], cache: dict[Any, Reference]
) -> OracleRun:
    """`requests` as one batch through both stages, and through KModel one by one (under fixed
    randomness). `cache` keeps references across runs, keyed by tokens, style and speed."""
    with fixed_randomness():
        references = []
        for request in requests:
            key = (tuple(request.tokens), request.style.tobytes(), request.speed)
            if key not in cache:
                cache[key] = reference(kmodel, request)
            references.append(cache[key])
        features = engine.acoustic(requests)
        audio = engine.vocode([ref.features for ref in references])
    return OracleRun(list(requests), features, audio, references)
