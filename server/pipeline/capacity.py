"""How many real-time streams this box can keep up with, measured from the work it has just done.

Every second a listener plays, the pipeline must make a second of audio. What that costs is measured,
not modelled: the compute seconds all stages spent, per second of audio they made, over the last
half minute or so (decayed). All stages share the machine's cores, so their costs add up; the
number of real-time streams the box sustains is the inverse. Admission compares the streams open
now with it, so one more listener is refused before it would make all of them stall.
"""

from __future__ import annotations

import time
from collections.abc import Callable

HALF_LIFE_S = 30.0
MIN_AUDIO_S = 3.0  # measured audio below this says too little to refuse anyone on


class CapacityMeter:
    """Compute seconds per second of audio made, decayed with a half-life of `half_life_s`."""

    def __init__(self, half_life_s: float = HALF_LIFE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._half_life_s = half_life_s
        self._clock = clock
        self._at = clock()
        self._compute_s = 0.0
        self._audio_s = 0.0
        self._measured_s = 0.0  # all audio ever made, not decayed
        self._last: float | None = None

    def computed(self, seconds: float, workers: int = 1) -> None:
        """A stage computed for `seconds`; with several workers in parallel, each costs its share."""
        self._decay()
        self._compute_s += seconds / workers

    def produced(self, seconds: float) -> None:
        """The engine's last stage made `seconds` of audio."""
        self._decay()
        self._audio_s += seconds
        self._measured_s += seconds
        if self._measured_s >= MIN_AUDIO_S:
            self._last = self._compute_s / self._audio_s

    def cost(self) -> float | None:
        """Compute seconds per second of audio lately (as of the last audio made); None until
        MIN_AUDIO_S of audio were measured. An idle box keeps its last figure."""
        return self._last

    def streams(self) -> float | None:
        """Real-time streams the box keeps up with at the cost measured lately (None: not known yet)."""
        cost = self._last
        if cost is None:
            return None
        return float("inf") if cost <= 0 else 1.0 / cost

    def _decay(self) -> None:
        now = self._clock()
        factor = 0.5 ** ((now - self._at) / self._half_life_s)
        self._at = now
        if factor < 1e-6:  # long idle: start afresh rather than divide vanishing numbers
            self._compute_s = self._audio_s = 0.0
        else:
            self._compute_s *= factor
            self._audio_s *= factor
