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
    FIRST_RIGHT_CONTEXT_FRAMES,
    LEAD_CONTEXT_FRAMES,
    LEAD_KEEP_FRAMES,
    MIN_FIRST_FRAMES,
    SECONDS_PER_FRAME,
    TAIL_KEEP_FRAMES,
    Stitcher,
    Window,
    expected_samples,
    plan_windows,
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
def test_plan_covers_each_frame_once_after_the_trimmed_lead(frames: int, rtf: float) -> None:
    feats = features(frames)
    for progressive in (False, True):
        windows = plan_windows(feats, progressive=progressive, vocoder=speed(rtf))
        assert windows[0].start == 20 - LEAD_KEEP_FRAMES
        assert windows[-1].end == frames and windows[-1].last
        assert all(not w.last for w in windows[:-1])
        for before, after in itertools.pairwise(windows):
            assert before.end == after.start
        for w in windows:
            assert w.render_start <= w.start < w.end <= w.render_end <= frames
            right = CONTEXT_FRAMES if w.last else FIRST_RIGHT_CONTEXT_FRAMES
            assert w.render_end == min(frames, w.end + right)
        assert expected_samples(windows) == (frames - windows[0].start) * SAMPLES_PER_FRAME


def test_single_window_is_used_unless_progressive() -> None:
    windows = plan_windows(features(200), progressive=False, vocoder=speed(0.33))
    assert len(windows) == 1
    assert windows[0].render_start == 20 - LEAD_KEEP_FRAMES - CONTEXT_FRAMES


@pytest.mark.parametrize("cost", [speed(0.33), VocoderCost(0.025, 0.007), VocoderCost(0.05, 0.012)])
def test_first_window_is_short_and_the_second_fits_in_its_playback(cost: VocoderCost) -> None:
    feats = features(160)
    first, second = plan_windows(feats, progressive=True, vocoder=cost)
    assert first.render_start == first.start - LEAD_CONTEXT_FRAMES  # the trimmed lead-in is context
    first_render = cost.seconds(first.render_end - first.render_start)
    whole_render = cost.seconds(160 - first.start + CONTEXT_FRAMES)
    assert first_render < 0.6 * whole_render
    # Rendering the second window (with the margin) takes no longer than playing the first plus the
    # 4-frame pre-buffer, and one frame less in the first window would not leave that time.
    second_render = COST_MARGIN * cost.seconds(second.render_end - second.render_start)
    assert second_render <= (first.end - first.start + 4) * SECONDS_PER_FRAME
    shorter = COST_MARGIN * cost.seconds(second.render_end - second.render_start + 1)
    assert (
        first.end - first.start == MIN_FIRST_FRAMES
        or shorter > (first.end - first.start + 3) * SECONDS_PER_FRAME
    )


def test_a_short_segment_is_not_split() -> None:
    feats = features(20 + MIN_FIRST_FRAMES)
    assert len(plan_windows(feats, progressive=True, vocoder=speed(0.33))) == 1


def test_seam_moves_to_a_nearby_unvoiced_frame() -> None:
    plain = plan_windows(features(160), progressive=True, vocoder=speed(0.33))[0].end
    moved = plan_windows(features(160, unvoiced_at=(plain + 2,)), progressive=True, vocoder=speed(0.33))[
        0
    ].end
    assert moved == plain + 2


@pytest.mark.parametrize("frames", [45, 122, 300])
def test_stitching_a_local_vocoder_reproduces_the_whole_render(frames: int) -> None:
    feats = features(frames)
    windows = plan_windows(feats, progressive=True, vocoder=speed(0.33))
    assert len(windows) == 2
    whole = local_vocoder(feats)[windows[0].start * SAMPLES_PER_FRAME :]
    stitched = render(feats, windows)
    assert stitched.shape == whole.shape
    np.testing.assert_allclose(stitched, whole, atol=1e-6)


def test_crossfade_blends_different_renders_smoothly() -> None:
    feats = features(122)
    first, second = plan_windows(feats, progressive=True, vocoder=speed(0.33))
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


@pytest.mark.parametrize("progressive", [False, True])
def test_trailing_pause_is_emitted_as_zeros_not_rendered(progressive: bool) -> None:
    frames, pause = 160, 24
    feats = with_trailing_pause(frames, pause)
    windows = plan_windows(feats, progressive=progressive, vocoder=speed(0.33))
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
    windows = plan_windows(feats, progressive=False, vocoder=speed(0.33))
    assert windows[-1].end == 160 and windows[-1].pad_frames == 0
