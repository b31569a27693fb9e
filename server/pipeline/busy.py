"""How busy a stage has been lately: the load signal autoscalers read (`speakd_load`).

A stage whose workers compute all the time cannot take more without queueing, so the busiest stage's
busy fraction over the last few seconds is the fraction of real-time synthesis capacity in use:
about 0 idle, 1 saturated (new work waits). It is measured, not modelled, so it holds for any engine
and any machine.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 10.0


class BusyMeter:
    """Compute intervals of one stage's workers, kept for the last `window_s` seconds."""

    def __init__(
        self, workers: int = 1, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._workers = workers
        self._window_s = window_s
        self._clock = clock
        self._intervals: deque[tuple[float, float]] = deque()
        self._running: dict[int, float] = {}  # starts of computations not finished yet, by token
        self._tokens = itertools.count()

    def start(self) -> int:
        """A computation begins now; returns the token to `stop` it with."""
        token = next(self._tokens)
        self._running[token] = self._clock()
        return token

    def stop(self, token: int) -> None:
        started = self._running.pop(token)
        self._intervals.append((started, self._clock()))
        self._trim()

    def fraction(self) -> float:
        """Busy time in the last window / (window * workers), counting computations still running."""
        now = self._clock()
        since = now - self._window_s
        self._trim()
        busy = sum(min(end, now) - max(start, since) for start, end in self._intervals if end > since)
        busy += sum(now - max(start, since) for start in self._running.values())
        return max(0.0, busy) / (self._window_s * self._workers)

    def _trim(self) -> None:
        since = self._clock() - self._window_s
        while self._intervals and self._intervals[0][1] <= since:
            self._intervals.popleft()
