"""CapacityMeter: compute seconds per second of audio lately, and the real-time streams that makes."""

from __future__ import annotations

import math

from fake_clock import Clock

from speakd.server.pipeline.capacity import HALF_LIFE_S, MIN_AUDIO_S, CapacityMeter


def test_unknown_until_enough_audio_was_measured() -> None:
    meter = CapacityMeter(clock=Clock())
    meter.computed(0.5)
    meter.produced(MIN_AUDIO_S / 2)
    assert meter.cost() is None and meter.streams() is None
    meter.computed(0.5)
    meter.produced(MIN_AUDIO_S / 2)
    assert meter.cost() is not None and math.isclose(meter.cost() or 0, 1.0 / MIN_AUDIO_S)


def test_stages_add_up_and_parallel_workers_share_their_cost() -> None:
    meter = CapacityMeter(clock=Clock())
    for _ in range(4):
        meter.computed(0.3)  # the vocoder
        meter.computed(0.04, workers=4)  # the encoder, 4 threads
        meter.produced(1.0)
    assert math.isclose(meter.cost() or 0, 0.31)
    assert math.isclose(meter.streams() or 0, 1 / 0.31)


def test_the_recent_cost_outweighs_the_old_one() -> None:
    clock = Clock()
    meter = CapacityMeter(clock=clock)
    for _ in range(10):
        meter.computed(0.2)
        meter.produced(1.0)
    clock.now += 3 * HALF_LIFE_S  # the machine got busier since: the old figures count 1/8
    for _ in range(10):
        meter.computed(0.6)
        meter.produced(1.0)
    assert 0.5 < (meter.cost() or 0) < 0.6


def test_a_long_idle_box_keeps_its_last_figure_then_starts_afresh() -> None:
    clock = Clock()
    meter = CapacityMeter(clock=clock)
    for _ in range(5):
        meter.computed(0.25)
        meter.produced(1.0)
    clock.now += 1000 * HALF_LIFE_S
    assert math.isclose(meter.cost() or 0, 0.25)
    meter.computed(0.5)
    meter.produced(1.0)
    assert math.isclose(meter.cost() or 0, 0.5)
