"""PlaybackClock: when a listener runs out of audio, from what was produced for it and when."""

from __future__ import annotations

import math

from speakd.server.pipeline.playback import PlaybackClock


def test_a_new_listener_is_due_from_its_first_text() -> None:
    clock = PlaybackClock()
    assert clock.deadline == math.inf  # nobody waits yet
    clock.submitted(now=10.0)
    clock.submitted(now=10.5)  # still the same wait
    assert clock.deadline == 10.0
    assert clock.slack(now=10.6) == 0.0
    assert not clock.playing(now=10.6)


def test_audio_produced_moves_the_deadline_to_when_it_runs_out() -> None:
    clock = PlaybackClock()
    clock.submitted(now=10.0)
    clock.produced(0.3, now=10.25)
    assert clock.deadline == 10.55
    clock.produced(2.0, now=10.4)  # queued behind what is still playing
    assert math.isclose(clock.deadline, 12.55)
    assert math.isclose(clock.slack(now=11.55), 1.0)
    assert clock.playing(now=12.0) and not clock.playing(now=12.6)
    clock.submitted(now=11.0)  # more text while audio is in hand: still due when it runs out
    assert math.isclose(clock.deadline, 12.55)


def test_a_listener_that_ran_dry_waits_from_its_next_text_and_plays_from_its_next_audio() -> None:
    clock = PlaybackClock()
    clock.submitted(now=0.0)
    clock.produced(1.0, now=0.2)  # plays until 1.2
    clock.submitted(now=5.0)  # the next sentence comes long after
    assert clock.deadline == 5.0
    clock.produced(1.0, now=5.3)
    assert math.isclose(clock.deadline, 6.3)
    assert math.isclose(clock.produced_s, 2.0)
