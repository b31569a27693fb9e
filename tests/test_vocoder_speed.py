"""The vocoder's cost model: fixed and per-frame parts learnt from its calls."""

from __future__ import annotations

import pytest

from speakd.server.vocoder_speed import VocoderCost, VocoderSpeed

GUESS = VocoderCost(fixed_s=0.025, per_frame_s=0.010)


def test_before_any_call_it_is_the_guess() -> None:
    cost = VocoderSpeed(GUESS).cost
    assert cost == GUESS
    assert cost.seconds(30) == pytest.approx(0.325)


def test_it_learns_both_parts_from_calls_of_different_lengths() -> None:
    speed = VocoderSpeed(GUESS)
    truth = VocoderCost(fixed_s=0.040, per_frame_s=0.007)
    for frames in [28, 60, 33, 120, 45, 28, 90, 150, 30, 70] * 4:
        speed.observe(frames, truth.seconds(frames))
    assert speed.cost.fixed_s == pytest.approx(0.040, rel=0.02)
    assert speed.cost.per_frame_s == pytest.approx(0.007, rel=0.02)


def test_it_follows_a_slowdown_within_a_few_calls() -> None:
    speed = VocoderSpeed(GUESS)
    fast, slow = VocoderCost(0.025, 0.007), VocoderCost(0.050, 0.014)
    lengths = [28, 60, 33, 120, 45]
    for frames in lengths * 6:
        speed.observe(frames, fast.seconds(frames))
    for frames in lengths * 4:
        speed.observe(frames, slow.seconds(frames))
    assert speed.cost.seconds(60) == pytest.approx(slow.seconds(60), rel=0.15)


def test_calls_of_one_length_give_the_plain_ratio() -> None:
    speed = VocoderSpeed(VocoderCost(0.0, 0.010))
    for _ in range(200):
        speed.observe(50, 0.5)  # 10 ms a frame, and nothing tells a fixed part apart
    assert speed.cost.seconds(50) == pytest.approx(0.5, rel=0.01)


def test_a_fit_with_a_negative_part_falls_back_to_the_ratio() -> None:
    speed = VocoderSpeed(GUESS)
    for frames in [20, 200] * 20:  # longer calls faster than shorter ones: no sensible line
        speed.observe(frames, 0.3 if frames == 20 else 0.1)
    assert speed.cost.fixed_s == 0.0
    assert speed.cost.per_frame_s > 0


def test_empty_calls_are_ignored() -> None:
    speed = VocoderSpeed(GUESS)
    speed.observe(0, 0.01)
    speed.observe(10, 0.0)
    assert speed.cost == GUESS
