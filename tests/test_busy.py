"""The load signal: a stage's busy fraction over a sliding window, on a fake clock."""

from __future__ import annotations

import pytest
from fake_clock import Clock

from speakd.server.pipeline.busy import BusyMeter


def test_idle_is_zero_and_a_stage_busy_all_the_time_is_one() -> None:
    clock = Clock()
    meter = BusyMeter(window_s=10.0, clock=clock)
    assert meter.fraction() == 0.0
    for _ in range(10):
        token = meter.start()
        clock.now += 1.0
        meter.stop(token)
    assert meter.fraction() == pytest.approx(1.0)


def test_busy_time_is_counted_within_the_window_only() -> None:
    clock = Clock()
    meter = BusyMeter(window_s=10.0, clock=clock)
    token = meter.start()
    clock.now += 4.0
    meter.stop(token)  # busy 100..104
    clock.now = 110.0
    assert meter.fraction() == pytest.approx(0.4)
    clock.now = 112.0  # the window is 102..112: 2 s of it were busy
    assert meter.fraction() == pytest.approx(0.2)
    clock.now = 120.0
    assert meter.fraction() == 0.0


def test_a_computation_still_running_counts_and_workers_share_the_capacity() -> None:
    clock = Clock()
    meter = BusyMeter(workers=2, window_s=10.0, clock=clock)
    first = meter.start()
    clock.now += 5.0
    assert meter.fraction() == pytest.approx(0.25)  # one of two workers busy for half the window
    second = meter.start()
    clock.now += 5.0
    meter.stop(first)
    assert meter.fraction() == pytest.approx(0.75)
    meter.stop(second)
    assert meter.fraction() == pytest.approx(0.75)
