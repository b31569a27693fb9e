"""What one vocoder window of a segment hands to the next, so that the seam between them is not heard.

Kokoro's vocoder is not streaming: a window rendered alone restarts the harmonic source's phase and
normalises every AdaIN layer by the window's own statistics over time. Both change the sound at a
seam, and Whisper heard it (bench/window_study.py: every seam in voiced speech cost words). So a
split segment's windows share:
- **the phase**, which follows from the F0 curve alone (`harmonic_phase`): each window starts its
  harmonics where a whole render would have them;
- **one set of norm statistics** (`NormStats`), fixed at the first window: later windows normalise
  with them, so the seam joins two renders of the same normalisation. The first window's own
  statistics cover a few words only, so they are pooled with a prior: the statistics of earlier
  whole renders (`NormPrior`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from speakd.server.engines.kokoro.engine import SAMPLE_RATE

F32 = npt.NDArray[np.float32]

HARMONICS = 9  # SineGen: the fundamental and 8 overtones
F0_POINTS_PER_FRAME = 2
SAMPLES_PER_F0_POINT = 300
# The prior counts as this many frames beside a first window's own (measured: see NormPrior).
PRIOR_FRAMES = 80
# Each whole render moves the prior by this share: recent voices and texts weigh most.
PRIOR_RATE = 0.2


def harmonic_phase(f0: F32, frame: int) -> F32:
    """The harmonic source's phase at `frame` of a segment, as SineGen counts it (cycles per sample,
    per harmonic, [1, 1, 9]): the sum of its per-sample increments over the F0 points before, in
    float64 and wrapped, so that float32 holds it exactly enough."""
    points = np.asarray(f0, dtype=np.float32).reshape(-1)[: F0_POINTS_PER_FRAME * frame]
    harmonics = np.arange(1, HARMONICS + 1, dtype=np.float32)
    # As the graph computes it: each point's increment per sample, in float32, wrapped to [0, 1).
    increments = np.mod(points[:, None] * harmonics / np.float32(SAMPLE_RATE), np.float32(1.0))
    cycles = increments.astype(np.float64).sum(axis=0) * SAMPLES_PER_F0_POINT
    phase: F32 = (np.mod(cycles, 1.0) / SAMPLES_PER_F0_POINT).astype(np.float32)
    return phase.reshape(1, 1, HARMONICS)


@dataclass(frozen=True, slots=True)
class NormStats:
    """Mean and variance over time, per channel, of every instance norm's input ([1, C, 1] each)."""

    means: tuple[F32, ...]
    variances: tuple[F32, ...]

    def pooled(self, weight: float, other: NormStats) -> NormStats:
        """These statistics and `other`'s as if over one sequence: `weight` is this one's share of
        the frames (the parallel-variance formula, as the graph computes it)."""
        means, variances = [], []
        for m0, v0, m1, v1 in zip(self.means, self.variances, other.means, other.variances, strict=True):
            mean = weight * m0 + (1 - weight) * m1
            var = weight * (v0 + (m0 - mean) ** 2) + (1 - weight) * (v1 + (m1 - mean) ** 2)
            means.append(mean.astype(np.float32))
            variances.append(var.astype(np.float32))
        return NormStats(tuple(means), tuple(variances))

    @classmethod
    def from_outputs(cls, outputs: Sequence[F32]) -> NormStats:
        """From the graph's outputs in order: mean, variance, mean, variance, ..."""
        return cls(
            tuple(np.asarray(x, np.float32) for x in outputs[0::2]),
            tuple(np.asarray(x, np.float32) for x in outputs[1::2]),
        )


@dataclass(slots=True)
class SeamCarry:
    """A split segment's state from window to window: the statistics all its windows normalise with,
    set by the engine when it renders the first window. Engines that need none leave it None."""

    stats: NormStats | None = None


class NormPrior:
    """What the first window of a split segment pools its own statistics with: a running average of
    the statistics of whole renders (warm-up included), so the first window, a few words long, is
    normalised about as a whole sentence would be.

    Measured on the first 57 words of the held-out sentences (Whisper tiny.en, windows planned for a
    waiting listener): with later windows normalised by the first window's own statistics alone, 17
    word errors at up to 2 windows and 34 at up to 4; pooled with this prior, none (a one-off study
    script; bench/seam_study.py measures the design as built). One prior
    serves every voice, following whatever was rendered last; a prior per voice is not measured."""

    def __init__(self) -> None:
        self.stats: NormStats | None = None

    def observe(self, stats: NormStats) -> None:
        """Fold one whole render's statistics in (the first one is taken as it is)."""
        self.stats = stats if self.stats is None else self.stats.pooled(1 - PRIOR_RATE, stats)

    def first_window_weight(self, frames: int) -> float:
        """The prior's share beside a first window of `frames` frames; 0 without a prior."""
        return 0.0 if self.stats is None else PRIOR_FRAMES / (PRIOR_FRAMES + frames)
