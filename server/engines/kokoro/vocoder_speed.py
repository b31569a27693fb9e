"""How long the vocoder takes for a window, learnt from its own calls, to size first windows.

A vocoder call costs a fixed part (ONNX Runtime walks ~2000 nodes whatever the length: ~25 ms on
2 cores) plus a part per frame (~7 ms). A single seconds-per-frame ratio, learnt from a mix of short
first windows and long segments, overestimates long windows and underestimates short ones, so the
first window would be sized too big (later audio) or too small (a gap). This fits both parts by
exponentially weighted least squares over recent calls, so it follows load changes within a few
calls. Where recent calls are too alike in length to separate the parts (their spread is small),
it keeps the last model's split between them and only rescales it to the recent calls' level.
"""

from __future__ import annotations

from dataclasses import dataclass

DECAY = 0.9  # weight kept by the past at each new call: about the last 10 calls count
# Fit both parts only if the calls' lengths vary by a coefficient of variation over ~0.22.
MIN_RELATIVE_VARIANCE = 0.05


@dataclass(frozen=True, slots=True)
class VocoderCost:
    """seconds(frames) = fixed_s + per_frame_s x frames."""

    fixed_s: float
    per_frame_s: float

    def seconds(self, frames: float) -> float:
        return self.fixed_s + self.per_frame_s * frames


class VocoderSpeed:
    """The vocoder's cost model, updated from the vocoder thread and read from the acoustic thread
    (the model is one immutable object, swapped whole)."""

    def __init__(self, guess: VocoderCost) -> None:
        self._sums = [0.0] * 5  # weight, x, y, x*x, x*y of recent calls, decayed
        self.cost = guess  # until calls tell apart the two parts, their split is the guess's

    def observe(self, frames: int, seconds: float) -> None:
        """One vocoder call rendered `frames` frames (all its items together) in `seconds`."""
        if frames <= 0 or seconds <= 0:
            return
        new = (1.0, frames, seconds, frames * frames, frames * seconds)
        self._sums = [DECAY * old + value for old, value in zip(self._sums, new, strict=True)]
        self.cost = self._fit()

    def _fit(self) -> VocoderCost:
        w, x, y, xx, xy = self._sums
        mean_x, mean_y = x / w, y / w
        variance = xx / w - mean_x * mean_x
        if variance > MIN_RELATIVE_VARIANCE * mean_x * mean_x:
            per_frame = (xy / w - mean_x * mean_y) / variance
            if per_frame > 0:
                fixed = mean_y - per_frame * mean_x
                # A negative fixed part makes no sense: the best line through zero instead.
                return VocoderCost(fixed, per_frame) if fixed >= 0 else VocoderCost(0.0, xy / xx)
        # Too alike (or longer calls faster, i.e. noise): the last model, rescaled to the recent level.
        scale = mean_y / self.cost.seconds(mean_x)
        return VocoderCost(self.cost.fixed_s * scale, self.cost.per_frame_s * scale)
