"""The vocoder's cost model: fixed and per-frame parts learnt from its calls."""

from __future__ import annotations

import random

import pytest

from speakd.server.engines.kokoro.vocoder_speed import VocoderCost, VocoderSpeed

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


def test_calls_of_one_length_keep_the_split_and_take_their_level() -> None:
    speed = VocoderSpeed(GUESS)
    for _ in range(200):
        speed.observe(50, 0.4)  # nothing tells a fixed part apart here
    assert speed.cost.seconds(50) == pytest.approx(0.4, rel=0.01)
    assert speed.cost.fixed_s / speed.cost.per_frame_s == pytest.approx(GUESS.fixed_s / GUESS.per_frame_s)


def test_noisy_calls_of_alike_lengths_still_predict_a_short_window() -> None:
    """Long segments only (200-210 frames, 3 % noise): the 30-frame first window is still predicted
    from the guess's split, not from a wild fit of the fixed part."""
    rng = random.Random(3)
    truth = VocoderCost(fixed_s=0.025, per_frame_s=0.007)
    speed = VocoderSpeed(GUESS)
    for _ in range(60):
        frames = rng.randint(200, 210)
        speed.observe(frames, truth.seconds(frames) * rng.uniform(0.97, 1.03))
        assert speed.cost.seconds(30) == pytest.approx(truth.seconds(30), rel=0.2)


def test_longer_calls_faster_keeps_the_last_model_at_the_recent_level() -> None:
    speed = VocoderSpeed(GUESS)
    for frames in [20, 200] * 20:  # no sensible line through these
        speed.observe(frames, 0.3 if frames == 20 else 0.1)
    assert speed.cost.fixed_s / speed.cost.per_frame_s == pytest.approx(GUESS.fixed_s / GUESS.per_frame_s)
    assert speed.cost.seconds(110) == pytest.approx(0.2, rel=0.1)  # recent calls weigh more


def test_a_line_with_a_negative_fixed_part_goes_through_zero() -> None:
    speed = VocoderSpeed(GUESS)
    for frames in [20, 200] * 20:
        speed.observe(frames, 0.1 if frames == 20 else 2.0)  # slope 10.6 ms, fixed part -0.11 s
    assert speed.cost.fixed_s == 0.0
    assert speed.cost.seconds(200) == pytest.approx(2.0, rel=0.02)


def test_empty_calls_are_ignored() -> None:
    speed = VocoderSpeed(GUESS)
    speed.observe(0, 0.01)
    speed.observe(10, 0.0)
    assert speed.cost == GUESS
