"""Keeping a live context's lag bounded: speed up the next segment, or skip the oldest whole sentences.

A live source (captions, a transcript) sends text at the speaker's pace, which may outrun the voice.
The lag of a segment is the time from its text's arrival to when its audio starts playing at the
client. Each time a live utterance hands its next segment to the pipeline it asks `decide`: with the
audio still ahead of the listener and the segments it holds (not yet handed over, so still skippable),
how many of them to drop from the front, and at what speed to speak the next one. Pure functions, so
the policy is tested on its own (tests/test_pace.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from speakd.protocol import ErrorCode
from speakd.server.core.errors import RequestRefused

# Speeding up starts when the next segment's lag passes this share of the bound, and reaches the
# ceiling at the bound; the backlog is planned to play out within TARGET of the bound.
RAMP_FROM = 0.6
TARGET = 0.8
# A bound under about one sentence would skip everything but the newest text.
MIN_LAG_S = 1.5
# The fastest the acoustic model is asked to speak to catch up (the speed a context may ask for itself
# is a separate, wider range).
MAX_CATCH_UP_SPEED = 2.0


@dataclass(frozen=True, slots=True)
class Pace:
    """A context's opt-in: keep the lag under `max_lag_s`, speeding up to at most `max_speed`."""

    max_lag_s: float
    max_speed: float


def check_pace(pace: Pace, speed: float, context: str) -> None:
    """Refuse a bound too tight to keep, or a ceiling under the context's own speed or too fast."""
    if pace.max_lag_s < MIN_LAG_S:
        raise RequestRefused(
            ErrorCode.INVALID_PARAM, f"max_lag_ms must be at least {MIN_LAG_S * 1000:.0f}", context
        )
    if not speed <= pace.max_speed <= max(speed, MAX_CATCH_UP_SPEED):
        raise RequestRefused(
            ErrorCode.INVALID_PARAM,
            f"max_speed must be between the context's speed ({speed}) and {MAX_CATCH_UP_SPEED}",
            context,
        )


@dataclass(frozen=True, slots=True)
class HeldSegment:
    """A segment cut but not yet handed to the pipeline: its place in the context's text, when its
    first character arrived, and whether it ends its sentence (so skips take whole sentences)."""

    text: str
    offset: int
    arrival: float
    ends_sentence: bool

    @property
    def end(self) -> int:
        return self.offset + len(self.text)


@dataclass(frozen=True, slots=True)
class Decision:
    skip: int  # held segments to drop from the front, whole sentences only
    speed: float  # for the next segment


def _lags(
    now: float, ahead_s: float, held: Sequence[HeldSegment], seconds: Sequence[float], speed: float
) -> list[float]:
    """Each held segment's lag if all play in order from `now + ahead_s` at `speed`."""
    lags, start = [], now + ahead_s
    for segment, duration in zip(held, seconds, strict=True):
        lags.append(start - segment.arrival)
        start += duration / speed
    return lags


def _first_sentence(held: Sequence[HeldSegment]) -> int:
    """How many segments the first held sentence spans."""
    for i, segment in enumerate(held):
        if segment.ends_sentence:
            return i + 1
    return len(held)


def decide(
    pace: Pace,
    base_speed: float,
    now: float,
    ahead_s: float,
    held: Sequence[HeldSegment],
    seconds: Callable[[HeldSegment], float],
    *,
    mid_sentence: bool,
) -> Decision:
    """Skips and speed for the next of `held` (not empty). `ahead_s` is the audio that plays before
    it; `seconds(segment)` its length at speed 1. Nothing is skipped while a sentence already begun
    continues (`mid_sentence`). When even the newest sentence would play too late, all are skipped
    (`skip == len(held)`): the listener waits for newer text rather than hear stale text."""
    assert held, "decide needs a segment to decide for"
    held = list(held)
    bound = pace.max_lag_s
    ceiling = max(base_speed, pace.max_speed)
    lengths = [seconds(segment) for segment in held]
    skip = 0
    if not mid_sentence:
        while skip < len(held):
            rest, rest_lengths = held[skip:], lengths[skip:]
            if max(_lags(now, ahead_s, rest, rest_lengths, ceiling)) <= bound:
                break
            skip += _first_sentence(rest)
    if skip == len(held):
        return Decision(skip=skip, speed=base_speed)
    if skip:
        return Decision(skip=skip, speed=ceiling)  # behind even at full speed: stay at full speed
    rest, rest_lengths = held[skip:], lengths[skip:]
    # The speed that plays the backlog out within TARGET of the bound: each segment i starts after
    # the ones before it, so it needs speed >= before_i / (target - (now + ahead - arrival_i)).
    target = TARGET * bound
    needed = base_speed
    before = 0.0
    for segment, duration in zip(rest, rest_lengths, strict=True):
        room = target - (now + ahead_s - segment.arrival)
        if before > 0:
            needed = max(needed, before / room if room > 0 else ceiling)
        before += duration
    # And a ramp on the next segment's own lag, so speed rises smoothly as the bound nears.
    lag = now + ahead_s - rest[0].arrival
    ramp = min(1.0, max(0.0, (lag - RAMP_FROM * bound) / ((1 - RAMP_FROM) * bound)))
    speed = max(needed, base_speed + ramp * (ceiling - base_speed))
    return Decision(skip=skip, speed=min(ceiling, max(base_speed, speed)))
