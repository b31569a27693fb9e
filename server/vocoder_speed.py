"""How long the vocoder takes for a window, learnt from its own calls, to size first windows.

A vocoder call costs a fixed part (ONNX Runtime walks ~2000 nodes whatever the length: ~25 ms on
2 cores) plus a part per frame (~7 ms). A single seconds-per-frame ratio, learnt from a mix of short
first windows and long segments, overestimates long windows and underestimates short ones, so the
first window would be sized too big (later audio) or too small (a gap). This fits both parts by
exponentially weighted least squares over recent calls, so it follows load changes within a few
calls; until the calls vary enough in length to separate the two, it falls back to the plain ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

DECAY = 0.9  # weight kept by the past at each new call: about the last 10 calls count
PRIOR_WEIGHT = 0.5  # the starting guess counts as half a call at each of two lengths
PRIOR_FRAMES = (10, 100)


@dataclass(frozen=True, slots=True)
class VocoderCost:
    """seconds(frames) = fixed_s + per_frame_s x frames."""

    fixed_s: float
    per_frame_s: float

    def seconds(self, frames: int) -> float:
        return self.fixed_s + self.per_frame_s * frames


class VocoderSpeed:
    """The vocoder's cost model, updated from the vocoder thread and read from the acoustic thread
    (the model is one immutable object, swapped whole)."""

    def __init__(self, guess: VocoderCost) -> None:
        self._sums = [0.0] * 5  # weight, x, y, x*x, x*y
        for frames in PRIOR_FRAMES:
            self._add(frames, guess.seconds(frames), PRIOR_WEIGHT)
        self.cost = guess

    def observe(self, frames: int, seconds: float) -> None:
        """One vocoder call rendered `frames` frames (all its items together) in `seconds`."""
        if frames <= 0 or seconds <= 0:
            return
        self._sums = [s * DECAY for s in self._sums]
        self._add(frames, seconds, 1.0)
        self.cost = self._fit()

    def _add(self, x: float, y: float, weight: float) -> None:
        for i, value in enumerate((1.0, x, y, x * x, x * y)):
            self._sums[i] += weight * value

    def _fit(self) -> VocoderCost:
        w, x, y, xx, xy = self._sums
        spread = w * xx - x * x
        if spread > 1e-9 * w * xx:
            per_frame = (w * xy - x * y) / spread
            fixed = (y - per_frame * x) / w
            if per_frame > 0 and fixed >= 0:
                return VocoderCost(fixed, per_frame)
        return VocoderCost(0.0, y / x)  # lengths too alike (or a fit that makes no sense): the ratio
