"""The two model stages every engine provides, and the data that flows between them.

The acoustic stage (text encoder, prosody, durations) is cheap; the vocoder is where 90% of the
FLOPs go. Keeping them separate lets the pipeline overlap one segment's vocoding with the next
segment's acoustic pass, and lets batched engines group each stage on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from speakd.server.engines.kokoro.seams import SeamCarry

SAMPLE_RATE = 24000
SAMPLES_PER_FRAME = 600  # one acoustic frame is 25 ms of 24 kHz audio


@dataclass(frozen=True, slots=True)
class AcousticRequest:
    """One segment's phoneme token ids (without the BOS/EOS pads) and its voice."""

    tokens: Sequence[int]
    style: npt.NDArray[np.float32]  # [1, 256]
    speed: float


@dataclass(frozen=True, slots=True)
class AcousticFeatures:
    """What crosses the stage cut: aligned features, F0 and energy curves, style and durations."""

    asr: npt.NDArray[np.float32]  # [1, 512, T]
    f0: npt.NDArray[np.float32]  # [1, 2T]
    energy: npt.NDArray[np.float32]  # [1, 2T]
    style: npt.NDArray[np.float32]  # [1, 256]
    durations: npt.NDArray[np.int64]  # [L] frames per token, BOS/EOS included
    # For a window of a segment (see `seams`): the harmonic source's phase at its first frame
    # ([1, 1, 9], None: 0), and the state its segment's windows share (None: a render on its own).
    harmonic_phase: npt.NDArray[np.float32] | None = None
    seam: SeamCarry | None = None

    @property
    def frames(self) -> int:
        return int(self.asr.shape[-1])


class Engine(Protocol):
    """A model split at the stage cut. Both calls take batches so GPU engines can group work."""

    def acoustic(self, batch: Sequence[AcousticRequest]) -> list[AcousticFeatures]:
        """Tokens → features for each request, in order."""
        ...

    def vocode(self, batch: Sequence[AcousticFeatures]) -> list[npt.NDArray[np.float32]]:
        """Features → 24 kHz mono waveform for each item, in order."""
        ...
