"""A listener's playback clock: when will it run out of audio? That moment is its job's deadline.

The pipeline cannot see a client's player, but it knows what it has produced for it and when. A
listener that starts playing as audio arrives and plays in real time runs dry at `dry_at`: each
part produced extends it by its duration, counted from now if the listener had already run dry
(it stalled, or waited between sentences). Work for a listener that is waiting for audio it has
asked for is due since it started waiting; work for one with seconds of audio in hand is due only
when that audio runs out. Stages serve the earliest deadline first, and the vocoder sizes its
windows by the time left (`slack`).

Written on the event loop (`submitted`) and in the last engine stage's thread (`produced`); read in
stage threads. Each update is a few float assignments, so readers at worst see a value one update
old, which only shifts a priority by one part's length.
"""

from __future__ import annotations

import math
import time


class PlaybackClock:
    """When a job's listener runs out of audio, from what was produced for it and when."""

    def __init__(self) -> None:
        self.dry_at: float | None = None  # monotonic time the audio produced so far runs out
        self.waiting_since: float | None = None  # asked for more while dry, and still waiting
        self.produced_s = 0.0

    def submitted(self, now: float | None = None) -> None:
        """New text for this job: if its listener has nothing left to play, it waits from now."""
        now = time.monotonic() if now is None else now
        if self.waiting_since is None and (self.dry_at is None or self.dry_at <= now):
            self.waiting_since = now

    def produced(self, seconds: float, now: float | None = None) -> None:
        """`seconds` more audio is ready for the listener now."""
        if seconds <= 0:
            return
        now = time.monotonic() if now is None else now
        start = now if self.dry_at is None else max(self.dry_at, now)
        self.dry_at = start + seconds
        self.waiting_since = None
        self.produced_s += seconds

    @property
    def deadline(self) -> float:
        """When this job's next audio is needed (earlier is more urgent); +inf if nobody waits."""
        if self.waiting_since is not None:
            return self.waiting_since
        return math.inf if self.dry_at is None else self.dry_at

    def slack(self, now: float | None = None) -> float:
        """Seconds of audio the listener still has in hand (0 when it is dry or waiting)."""
        now = time.monotonic() if now is None else now
        if self.dry_at is None:
            return 0.0
        return max(0.0, self.dry_at - now)

    def playing(self, now: float | None = None) -> bool:
        """Whether the listener still has audio in hand."""
        return self.slack(now) > 0
