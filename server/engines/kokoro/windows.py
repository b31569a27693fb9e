"""Vocoding a context's first segment in two windows, so its first audio leaves early, gap-free.

The vocoder costs about 0.3 s per second of audio on a 2-core CPU, so a 2 s first sentence would
keep a listener waiting 600 ms. Rendered as two consecutive windows, the first audio leaves after
the first, short window; the first window is made just long enough that, at the vocoder's measured
speed, the second window is rendered before the first has finished playing, so no gap follows.
Each window is rendered with context frames beyond its edges (the trimmed lead-in included) so its
convolutions see what a whole render sees, and the two are joined with a short
crossfade at an unvoiced frame when one is near: the harmonic source's phase restarts in each
window, which is inaudible where that source is silent. More, smaller windows do not pay on a CPU:
every window re-renders 2 x CONTEXT_FRAMES, which at this speed costs as much as it gains.

The leading pause Kokoro puts before every utterance (~0.5 s of near-silence, the BOS token's
duration) is trimmed to LEAD_KEEP_FRAMES in every segment: rendering it costs time and delays the
first word. The trailing pause (final punctuation and EOS, ~0.5 s) is kept as a pause between
sentences, but only its first TAIL_KEEP_FRAMES are rendered: the rest is emitted as exact zeros,
which costs nothing. (Measured on 30 held-out sentences: Whisper word error rate unchanged.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from speakd.server.engines.kokoro.engine import SAMPLE_RATE, SAMPLES_PER_FRAME, AcousticFeatures
from speakd.server.engines.kokoro.vocoder_speed import VocoderCost

CONTEXT_FRAMES = 12
# Context the first window renders before it (the trimmed lead-in) and after its seam: every frame of
# it delays the first audio by ~7.5 ms here. Measured with bench/window_study.py on 120 held-out
# sentences (924 words; Whisper tiny.en word errors, and log-mel distance of the first window to a
# whole render): 8:12 frames 87 errors / 2.24 dB, 8:8 85 / 2.41 dB, 4:8 97 / 2.55 dB; on the first
# 60 alone 0:12 60 errors against 47 for 8:12. Lead-in context pays, right context beyond 8 does not.
LEAD_CONTEXT_FRAMES = 8
FIRST_RIGHT_CONTEXT_FRAMES = 8
LEAD_KEEP_FRAMES = 4
TAIL_KEEP_FRAMES = 4
PAUSE_ENERGY = -2.5  # the energy curve sits near -5..-10 in pauses and above -2 in speech
MIN_FIRST_FRAMES = 12  # 0.3 s
PREBUFFER_FRAMES = 4  # the 100 ms a client buffers before it starts playing
SECONDS_PER_FRAME = SAMPLES_PER_FRAME / SAMPLE_RATE
COST_MARGIN = 1.25  # the second window's render is planned at 1.25x its predicted time
SPLIT_GAIN = 0.75  # split only if the first window renders in under 3/4 of the whole's time
CROSSFADE_SAMPLES = 240  # 10 ms at 24 kHz; must stay well inside the context
UNVOICED_HZ = 30.0
SEAM_SEARCH_FRAMES = 4


@dataclass(frozen=True, slots=True)
class Window:
    """Frames [start, end) of a segment are emitted from a render of [render_start, render_end)."""

    start: int
    end: int
    render_start: int
    render_end: int
    last: bool
    pad_frames: int = 0  # silent frames emitted as zeros after the last window, never rendered

    def slice(self, features: AcousticFeatures) -> AcousticFeatures:
        """The features this window's render needs (views, no copies)."""
        a, b = self.render_start, self.render_end
        return AcousticFeatures(
            asr=features.asr[:, :, a:b],
            f0=features.f0[:, 2 * a : 2 * b],
            energy=features.energy[:, 2 * a : 2 * b],
            style=features.style,
            durations=features.durations,
        )


def _unvoiced(f0: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """Per acoustic frame: is the F0 curve (two points per frame) below the voicing floor?"""
    points = f0.reshape(-1)
    return np.asarray((points[0::2] < UNVOICED_HZ) & (points[1::2] < UNVOICED_HZ))


def _speech_end(features: AcousticFeatures, unvoiced: npt.NDArray[np.bool_]) -> int:
    """The frame after the speech plus TAIL_KEEP_FRAMES of the trailing pause."""
    energy = features.energy.reshape(-1)
    quiet = unvoiced & (np.maximum(energy[0::2], energy[1::2]) < PAUSE_ENERGY)
    pause = len(quiet) - int(np.flatnonzero(~quiet)[-1]) - 1 if (~quiet).any() else 0
    return len(quiet) - max(0, pause - TAIL_KEEP_FRAMES)


def _seam(target: int, unvoiced: npt.NDArray[np.bool_], low: int, high: int) -> int:
    """The unvoiced frame nearest `target` within SEAM_SEARCH_FRAMES, else `target` itself."""
    for offset in range(SEAM_SEARCH_FRAMES + 1):
        for frame in (target - offset, target + offset):
            if low < frame < high and unvoiced[frame]:
                return frame
    return target


def _first_frames(frames: int, vocoder: VocoderCost) -> int:
    """The fewest frames (at least MIN_FIRST_FRAMES) the first window must emit so that the second
    window, rendered after it, is ready before the first one and the client's pre-buffer have played."""
    first = MIN_FIRST_FRAMES
    while first < frames:
        second_render = COST_MARGIN * vocoder.seconds(frames - first + CONTEXT_FRAMES)
        if second_render <= (first + PREBUFFER_FRAMES) * SECONDS_PER_FRAME:
            break
        first += 1
    return first


def plan_windows(features: AcousticFeatures, *, progressive: bool, vocoder: VocoderCost) -> list[Window]:
    """One window after the trimmed lead; two if `progressive` and the split pays.

    `vocoder` predicts a render's time (learnt by the pipeline); the first window is sized so that the
    second one's render fits in the first one's playback plus the client's pre-buffer. The first
    window renders LEAD_CONTEXT_FRAMES of the trimmed lead-in before it and FIRST_RIGHT_CONTEXT_FRAMES
    after it (see there for what they buy). The split pays only where the first window renders in
    under SPLIT_GAIN of the whole's time: not where a call's fixed cost dominates (a GPU).
    """
    total = features.frames
    lead = int(features.durations[0]) if features.durations.size else 0
    start = max(0, min(lead - LEAD_KEEP_FRAMES, total - 1))
    unvoiced = _unvoiced(features.f0)
    end = max(start + 1, _speech_end(features, unvoiced))
    pad = total - end
    frames = end - start
    if progressive:
        first = _first_frames(frames, vocoder)
        if frames - first >= MIN_FIRST_FRAMES:
            seam = _seam(start + first, unvoiced, start + MIN_FIRST_FRAMES // 2, end - 1)
            head = Window(
                start,
                seam,
                max(0, start - LEAD_CONTEXT_FRAMES),
                min(end, seam + FIRST_RIGHT_CONTEXT_FRAMES),
                last=False,
            )
            whole = vocoder.seconds(end - max(0, start - CONTEXT_FRAMES))
            if vocoder.seconds(head.render_end - head.render_start) < SPLIT_GAIN * whole:
                tail = Window(seam, end, max(start, seam - CONTEXT_FRAMES), end, last=True, pad_frames=pad)
                return [head, tail]
    return [Window(start, end, max(0, start - CONTEXT_FRAMES), end, last=True, pad_frames=pad)]


class Stitcher:
    """Joins the renders of one segment's windows into one continuous waveform, window by window."""

    def __init__(self) -> None:
        self._held: npt.NDArray[np.float32] | None = None
        ramp = (np.arange(CROSSFADE_SAMPLES, dtype=np.float32) + 0.5) / CROSSFADE_SAMPLES
        self._fade_in = np.sin(0.5 * np.pi * ramp).astype(np.float32) ** 2
        self._fade_out = 1.0 - self._fade_in

    def add(self, window: Window, rendered: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The samples of `window` that can be played now (the seam's crossfade waits for the next)."""
        half = CROSSFADE_SAMPLES // 2
        begin = (window.start - window.render_start) * SAMPLES_PER_FRAME
        finish = (window.end - window.render_start) * SAMPLES_PER_FRAME
        parts: list[npt.NDArray[np.float32]] = []
        if self._held is not None:
            head = rendered[begin - half : begin + half]
            parts.append(self._held * self._fade_out + head * self._fade_in)
            begin += half
            self._held = None
        if window.last:
            parts.append(rendered[begin:finish])
            parts.append(np.zeros(window.pad_frames * SAMPLES_PER_FRAME, np.float32))
        else:
            parts.append(rendered[begin : finish - half])
            self._held = rendered[finish - half : finish + half].copy()
        return np.concatenate(parts).astype(np.float32, copy=False)


def expected_samples(windows: Sequence[Window]) -> int:
    """Samples a segment's windows emit in all: every planned frame, once."""
    return (windows[-1].end + windows[-1].pad_frames - windows[0].start) * SAMPLES_PER_FRAME
