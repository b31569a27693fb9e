"""What a live utterance holds back: its cut segments with their arrival times, until each is due.

A live context (`Pace` set) hands the pipeline one segment at a time, when the listener's audio ahead
drops under a horizon, so that until then a segment can still be skipped, and its speed is chosen as
late as possible (`pace.decide`). Everything here is bounded by the text not yet spoken: arrival
records are dropped once the segments they date are cut, and held segments once handed over or
skipped. The text budget counts the held text, and skipping keeps it down.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

from speakd.server.core.pace import Decision, HeldSegment, Pace, decide
from speakd.server.core.segmenter import Located

# Hand the next segment over once the audio ahead of the listener drops under this (a segment takes
# about half its length to synthesize on a small CPU), or under this share of the lag bound: a
# segment handed over is spoken, so the audio ahead of it is lag that skipping can no longer remove.
HORIZON_S = 3.0
HORIZON_SHARE = 0.5
# Until measured on this context's audio: the embedded voice reads about 14 characters a second.
INITIAL_CHARS_PER_S = 14.0


@dataclass(frozen=True, slots=True)
class Handover:
    """The next segment to synthesize (None: all held were too late), its speed, and the held
    segments skipped before it."""

    segment: HeldSegment | None
    speed: float
    skipped: tuple[HeldSegment, ...]


class LiveHold:
    """A live utterance's held segments and the arrival times of its text."""

    def __init__(self, pace: Pace, base_speed: float) -> None:
        self.pace = pace
        self._base_speed = base_speed
        self._arrivals: deque[tuple[int, float]] = deque()  # (text fed up to this offset, arrived at)
        self._fed = 0
        self._held: deque[HeldSegment] = deque()
        self._chars_per_s = INITIAL_CHARS_PER_S
        self.mid_sentence = False  # the last segment handed over does not end its sentence
        self._sentence_from = 0.0  # when the sentence being spoken was handed over (its first part)

    def __bool__(self) -> bool:
        return bool(self._held)

    @property
    def chars(self) -> int:
        return sum(len(segment.text) for segment in self._held)

    def arrived(self, text: str, now: float) -> None:
        """`text` was fed now."""
        self._fed += len(text)
        self._arrivals.append((self._fed, now))

    def arrival_of(self, offset: int) -> float:
        """When the character at `offset` (fed, not yet in a held segment's past) arrived."""
        for fed, at in self._arrivals:
            if fed > offset:
                return at
        return self._arrivals[-1][1] if self._arrivals else 0.0

    def hold(self, segment: Located) -> None:
        """A segment was cut: it waits here, dated by the arrival of its last character, when it could
        first be spoken (a clause is never spoken before it is complete)."""
        while len(self._arrivals) > 1 and self._arrivals[0][0] <= segment.offset:
            self._arrivals.popleft()
        arrival = self.arrival_of(segment.offset + len(segment.text) - 1)
        self._held.append(HeldSegment(segment.text, segment.offset, arrival, segment.ends_sentence))

    def cut_due(self, waiting_offset: int | None, now: float) -> float | None:
        """Seconds until the text waiting in the segmenter since `waiting_offset` must be cut (<= 0:
        now), so that a live source without sentence ends, or a sentence longer than the bound, is
        not held back past it; None: nothing waits."""
        if waiting_offset is None:
            return None
        return self.arrival_of(waiting_offset) + self.pace.max_lag_s - now

    @property
    def horizon_s(self) -> float:
        """Audio ahead of the listener under which the next segment is handed over."""
        return min(HORIZON_S, HORIZON_SHARE * self.pace.max_lag_s)

    def seconds(self, segment: HeldSegment) -> float:
        """A segment's predicted length at speed 1."""
        return len(segment.text) / self._chars_per_s

    def observe(self, chars: int, seconds: float, speed: float) -> None:
        """A segment of `chars` characters lasted `seconds` at `speed`: learn the voice's rate."""
        if chars > 0 and seconds > 0:
            measured = chars / (seconds * speed)
            self._chars_per_s += 0.3 * (measured - self._chars_per_s)

    def next(self, now: float, ahead_s: float) -> Handover:
        """Take the next segment to synthesize (held must not be empty), after the skips `decide` asks."""
        held: Sequence[HeldSegment] = self._held
        mid_sentence = self.mid_sentence
        if mid_sentence and now - self._sentence_from > self.pace.max_lag_s:
            # A sentence that has been spoken for longer than the bound has no end in sight (a source
            # without sentence ends): its parts may be skipped, each whole, like sentences.
            mid_sentence = False
            held = [replace(segment, ends_sentence=True) for segment in held]
        decision: Decision = decide(
            self.pace, self._base_speed, now, ahead_s, held, self.seconds, mid_sentence=mid_sentence
        )
        skipped = tuple(self._held.popleft() for _ in range(decision.skip))
        if not self._held:
            return Handover(None, decision.speed, skipped)
        segment = self._held.popleft()
        if not self.mid_sentence or decision.skip:
            self._sentence_from = now
        self.mid_sentence = not segment.ends_sentence
        return Handover(segment, decision.speed, skipped)

    def clear(self) -> None:
        self._held.clear()
        self._arrivals.clear()
