"""Windowed vocoding: plans cover every frame once, and stitching is seamless for a local vocoder."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from speakd.server.engines.kokoro.engine import SAMPLES_PER_FRAME, AcousticFeatures
from speakd.server.engines.kokoro.vocoder_speed import VocoderCost
from speakd.server.engines.kokoro.windows import (
    CONTEXT_FRAMES,
    COST_MARGIN,
    CROSSFADE_SAMPLES,
    LEAD_CONTEXT_FRAMES,
    LEAD_KEEP_FRAMES,
    MAX_WINDOWS,
    MIN_WINDOW_FRAMES,
    RIGHT_CONTEXT_FRAMES,
    SECONDS_PER_FRAME,
    SPLIT_GAIN,
    TAIL_KEEP_FRAMES,
    Span,
    Stitcher,
    Window,
    expected_samples,
    next_window,
    plan_windows,
    segment_span,
)


def features(frames: int, lead: int = 20, unvoiced_at: tuple[int, ...] = ()) -> AcousticFeatures:
    rng = np.random.default_rng(frames)
    f0 = np.full((1, 2 * frames), 200.0, dtype=np.float32)
    f0[:, : 2 * lead] = 8.0
    for frame in unvoiced_at:
        f0[:, 2 * frame : 2 * frame + 2] = 8.0
    rest = frames - lead
    return AcousticFeatures(
        asr=rng.standard_normal((1, 4, frames)).astype(np.float32),
        f0=f0,
        energy=np.zeros((1, 2 * frames), np.float32),
        style=np.zeros((1, 256), np.float32),
        durations=np.array([lead, rest - 1, 1], dtype=np.int64),
    )


def local_vocoder(feats: AcousticFeatures) -> np.ndarray:
    """Each frame's samples depend on that frame alone, so any windowing must reproduce it exactly."""
    per_frame = feats.asr[0, 0, :]
    return np.repeat(per_frame, SAMPLES_PER_FRAME).astype(np.float32)


def render(feats: AcousticFeatures, windows: list[Window]) -> np.ndarray:
    stitcher = Stitcher()
    return np.concatenate([stitcher.add(w, local_vocoder(w.slice(feats))) for w in windows])


def speed(rtf: float) -> VocoderCost:
    """A vocoder that takes `rtf` seconds per second of audio, with no fixed cost."""
    return VocoderCost(0.0, rtf * SECONDS_PER_FRAME)


@pytest.mark.parametrize("frames", [30, 60, 122, 400])
@pytest.mark.parametrize("rtf", [0.05, 0.33, 1.0])
@pytest.mark.parametrize("slack_s", [0.0, 0.5, 10.0])
def test_plan_covers_each_frame_once_after_the_trimmed_lead(frames: int, rtf: float, slack_s: float) -> None:
    feats = features(frames)
    windows = plan_windows(feats, slack_s=slack_s, vocoder=speed(rtf))
    assert windows[0].start == 20 - LEAD_KEEP_FRAMES
    assert windows[-1].end == frames and windows[-1].last
    assert all(not w.last for w in windows[:-1])
    for before, after in itertools.pairwise(windows):
        assert before.end == after.start
        assert after.render_start == max(windows[0].start, after.start - CONTEXT_FRAMES)
    for w in windows:
        assert w.render_start <= w.start < w.end <= w.render_end <= frames
        assert w.end - w.start >= MIN_WINDOW_FRAMES or len(windows) == 1
        right = CONTEXT_FRAMES if w.last else RIGHT_CONTEXT_FRAMES
        assert w.render_end == min(frames, w.end + right)
    assert expected_samples(windows) == (frames - windows[0].start) * SAMPLES_PER_FRAME


def test_a_listener_with_audio_in_hand_hears_no_seam() -> None:
    feats = features(200)
    windows = plan_windows(feats, slack_s=10.0, vocoder=speed(0.33))
    assert len(windows) == 1
    assert windows[0].render_start == 20 - LEAD_KEEP_FRAMES - CONTEXT_FRAMES


def test_a_listener_short_of_time_gets_the_longest_window_that_fits() -> None:
    cost = VocoderCost(0.025, 0.0075)
    span = segment_span(features(300))
    window = next_window(span, span.start, 1.0, cost)
    assert not window.last
    assert COST_MARGIN * cost.seconds(window.render_end - window.render_start) <= 1.0
    assert COST_MARGIN * cost.seconds(window.render_end - window.render_start + 1) > 1.0 - 0.2  # near it


# This CPU's vocoder as the daemon learnt it on a busy day (25-30 ms a call, 10.5-12 ms a frame): a
# window that renders in the time its listener has left gains almost nothing over its ~20 frames of
# context, so windows planned only to fit would stay short, and the last would be a long wait.
SLOW_CPU = VocoderCost(0.03, 0.0115)


@pytest.mark.parametrize(
    "cost", [speed(0.33), VocoderCost(0.025, 0.0075), VocoderCost(0.05, 0.012), SLOW_CPU]
)
@pytest.mark.parametrize("frames", [80, 160, 213, 300])
def test_a_waiting_listener_gets_a_short_first_window_and_the_rest_keeps_up(
    cost: VocoderCost, frames: int
) -> None:
    feats = features(frames)
    windows = plan_windows(feats, slack_s=0.0, vocoder=cost)
    first = windows[0]
    assert first.render_start == first.start - LEAD_CONTEXT_FRAMES  # the trimmed lead-in is context
    whole_render = cost.seconds(frames - first.start + CONTEXT_FRAMES)
    assert cost.seconds(first.render_end - first.render_start) < SPLIT_GAIN * whole_render
    assert len(windows) <= MAX_WINDOWS
    # Each later window renders (with the margin) before the audio before it has played out, with no
    # credit for a client's pre-buffer (a window's audio arrives at once, so a player starts on it at
    # once): the listener never waits again.
    in_hand = 0.0
    for before, window in itertools.pairwise(windows):
        in_hand += (before.end - before.start) * SECONDS_PER_FRAME
        in_hand -= COST_MARGIN * cost.seconds(window.render_end - window.render_start)
        assert in_hand >= 0


def follow(span: Span, position: int, slack_s: float, cost: VocoderCost, windows_left: int) -> list[float]:
    """Plans a segment's windows one at a time, as the vocoder stage does, each render taking its
    predicted time with the margin: how long the listener waits before each window's audio."""
    waits: list[float] = []
    last = False
    while not last:
        window = next_window(span, position, slack_s, cost, windows_left - len(waits))
        render_s = COST_MARGIN * cost.seconds(window.render_end - window.render_start)
        waits.append(max(0.0, render_s - slack_s))
        slack_s = max(0.0, slack_s - render_s) + (window.end - window.start) * SECONDS_PER_FRAME
        position, last = window.end, window.last
    assert len(waits) <= windows_left
    return waits


@pytest.mark.parametrize("slack_s", [0.3, 0.575, 0.8])
def test_a_window_that_fits_but_leaves_the_rest_behind_is_lengthened(slack_s: float) -> None:
    """Mid-segment, the window the listener's audio in hand allows would leave the rest unable to keep
    up. One short wait now, with the rest then in time, beats a run of windows that each only just fit
    and a long wait at the end (seen on this CPU: six windows, then a 0.9 s stall)."""
    span = segment_span(features(233))
    position = span.start + 23
    waits = follow(span, position, slack_s, SLOW_CPU, MAX_WINDOWS - 1)
    assert sum(waits[1:]) == 0
    rest_whole_s = COST_MARGIN * SLOW_CPU.seconds(span.end - position + CONTEXT_FRAMES)
    assert waits[0] < 0.5 * (rest_whole_s - slack_s)


def test_a_vocoder_whose_cost_is_mostly_fixed_does_not_split() -> None:
    assert len(plan_windows(features(160), slack_s=0.0, vocoder=VocoderCost(0.03, 0.0001))) == 1


def test_a_short_segment_is_not_split() -> None:
    feats = features(20 + MIN_WINDOW_FRAMES)
    assert len(plan_windows(feats, slack_s=0.0, vocoder=speed(0.33))) == 1


def test_seam_moves_to_a_nearby_unvoiced_frame() -> None:
    plain = plan_windows(features(160), slack_s=0.0, vocoder=speed(0.33))[0].end
    moved = plan_windows(features(160, unvoiced_at=(plain + 2,)), slack_s=0.0, vocoder=speed(0.33))[0].end
    assert moved == plain + 2


@pytest.mark.parametrize("frames", [45, 122, 300])
def test_stitching_a_local_vocoder_reproduces_the_whole_render(frames: int) -> None:
    feats = features(frames)
    windows = plan_windows(feats, slack_s=0.0, vocoder=speed(0.33))
    assert len(windows) >= 2
    whole = local_vocoder(feats)[windows[0].start * SAMPLES_PER_FRAME :]
    stitched = render(feats, windows)
    assert stitched.shape == whole.shape
    np.testing.assert_allclose(stitched, whole, atol=1e-6)


def test_crossfade_blends_different_renders_smoothly() -> None:
    feats = features(122)
    first, second, *_ = plan_windows(feats, slack_s=0.0, vocoder=speed(0.33))
    stitcher = Stitcher()
    a = stitcher.add(first, np.ones((first.render_end - first.render_start) * SAMPLES_PER_FRAME, np.float32))
    b = stitcher.add(
        second, np.zeros((second.render_end - second.render_start) * SAMPLES_PER_FRAME, np.float32)
    )
    joined = np.concatenate([a, b])
    seam = (first.end - first.start) * SAMPLES_PER_FRAME
    ramp = joined[seam - CROSSFADE_SAMPLES // 2 : seam + CROSSFADE_SAMPLES // 2]
    assert np.all(np.diff(ramp) <= 0) and ramp[0] > 0.99 and ramp[-1] < 0.01
    assert np.all(joined[: seam - CROSSFADE_SAMPLES // 2] == 1.0)
    assert np.all(joined[seam + CROSSFADE_SAMPLES // 2 :] == 0.0)


def with_trailing_pause(frames: int, pause: int) -> AcousticFeatures:
    feats = features(frames)
    feats.f0[:, 2 * (frames - pause) :] = 8.0
    feats.energy[:, 2 * (frames - pause) :] = -8.0
    return feats


@pytest.mark.parametrize("slack_s", [0.0, 10.0])
def test_trailing_pause_is_emitted_as_zeros_not_rendered(slack_s: float) -> None:
    frames, pause = 160, 24
    feats = with_trailing_pause(frames, pause)
    windows = plan_windows(feats, slack_s=slack_s, vocoder=speed(0.33))
    last = windows[-1]
    assert last.end == frames - pause + TAIL_KEEP_FRAMES
    assert last.render_end == last.end
    assert last.pad_frames == pause - TAIL_KEEP_FRAMES
    assert expected_samples(windows) == (frames - windows[0].start) * SAMPLES_PER_FRAME
    out = render(feats, windows)
    assert out.shape == ((frames - windows[0].start) * SAMPLES_PER_FRAME,)
    assert not out[-last.pad_frames * SAMPLES_PER_FRAME :].any()
    kept = local_vocoder(feats)[windows[0].start * SAMPLES_PER_FRAME : last.end * SAMPLES_PER_FRAME]
    np.testing.assert_allclose(out[: kept.size], kept, atol=1e-6)


def test_a_pause_inside_the_segment_is_rendered() -> None:
    feats = features(160)
    feats.f0[:, 160:200] = 8.0
    feats.energy[:, 160:200] = -8.0  # frames 80..99 pause, speech resumes after
    windows = plan_windows(feats, slack_s=10.0, vocoder=speed(0.33))
    assert windows[-1].end == 160 and windows[-1].pad_frames == 0
