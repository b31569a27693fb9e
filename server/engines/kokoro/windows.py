"""Vocoding a segment in windows sized by its listener's deadline, so no listener waits for a
whole render: the first audio leaves early, and a listener about to run dry is served in time.

The vocoder costs about 0.3 s per second of audio on a 2-core CPU, so a 5 s first sentence would
keep a listener waiting 1.5 s. The vocoder stage plans one window at a time, when it takes the
segment up (`next_window`), from the time its listener still has audio for (its playback clock) and
the vocoder's learnt cost: the rest of the segment whole when that fits in time (a listener with
audio in hand never hears a seam), else the longest window that fits, else (a listener waiting
already, or one whose rest could not keep up after the longest window that fits) the shortest
window after which the rest can keep up in MAX_WINDOWS windows in all. The
rest of the segment goes back to the stage's queue, where other listeners due sooner may go first.
Each window is rendered with context frames beyond its edges (the trimmed lead-in included) so its
convolutions see what a whole render sees; it starts its harmonics at the segment's phase and
normalises with the statistics its segment's windows share (`seams`), and windows are joined with a
short crossfade, at an unvoiced frame when one is near. Every window re-renders its context (about
20 frames, ~150 ms on this CPU), which is why windows are as long as the deadline allows and a split
must pay (SPLIT_GAIN).

The leading pause Kokoro puts before every utterance (~0.5 s of near-silence, the BOS token's
duration) is trimmed to LEAD_KEEP_FRAMES in every segment: rendering it costs time and delays the
first word. The trailing pause (final punctuation and EOS, ~0.5 s) is kept as a pause between
sentences, but only its first TAIL_KEEP_FRAMES are rendered: the rest is emitted as exact zeros,
which costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from speakd.server.engines.kokoro.engine import SAMPLE_RATE, SAMPLES_PER_FRAME, AcousticFeatures
from speakd.server.engines.kokoro.seams import SeamCarry, harmonic_phase
from speakd.server.engines.kokoro.vocoder_speed import VocoderCost

CONTEXT_FRAMES = 12
# Context the first window renders before it (the trimmed lead-in) and after its seam: every frame of
# it delays the first audio by ~7.5 ms here. Measured with bench/window_study.py on 120 held-out
# sentences (924 words; Whisper tiny.en word errors, and log-mel distance of the first window to a
# whole render): 8:12 frames 87 errors / 2.24 dB, 8:8 85 / 2.41 dB, 4:8 97 / 2.55 dB; on the first
# 60 alone 0:12 60 errors against 47 for 8:12. Lead-in context pays, right context beyond 8 does not.
LEAD_CONTEXT_FRAMES = 8
RIGHT_CONTEXT_FRAMES = 8
LEAD_KEEP_FRAMES = 4
# Of the trailing pause, 300 ms are rendered (the rest is zeros): with 100 ms, word-final sounds were
# cut short (Whisper word errors on 40 held-out sentences: raw engine 14/288, whole render with 4
# frames kept 21, with 12 frames 15, with 24 frames 15).
TAIL_KEEP_FRAMES = 12
PAUSE_ENERGY = -2.5  # the energy curve sits near -5..-10 in pauses and above -2 in speech
MIN_WINDOW_FRAMES = 12  # 0.3 s: no window emits less
SECONDS_PER_FRAME = SAMPLES_PER_FRAME / SAMPLE_RATE
COST_MARGIN = 1.25  # a window is planned to render in 1.25x its predicted time
# At most this many windows per segment: each re-renders its context, which an overloaded box cannot
# afford. Seams no longer cost words since windows share their segment's harmonic phase and norm
# statistics (`seams`): bench/seam_study.py, 40 held-out sentences (288 words, Whisper tiny.en), planned
# for a waiting listener at this CPU's usual vocoder cost (25 ms + 7.5 ms a frame): whole renders 15
# word errors; at most 2 windows 11 (21 without the carry), at most 4 15 (27), at most 6 15 (36).
MAX_WINDOWS = 6
# A waiting listener's segment is split only if its first window renders in under 3/4 of the whole's
# time and at least 50 ms sooner; a listener with audio in hand gets a split whenever the whole would
# not render before that audio runs out.
SPLIT_GAIN = 0.75
MIN_SPLIT_GAIN_S = 0.05
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

    def slice(self, features: AcousticFeatures, seam: SeamCarry | None = None) -> AcousticFeatures:
        """The features this window's render needs (views, no copies); the windows of a split
        segment share `seam`, and each starts its harmonics where the segment's phase stands."""
        a, b = self.render_start, self.render_end
        return AcousticFeatures(
            asr=features.asr[:, :, a:b],
            f0=features.f0[:, 2 * a : 2 * b],
            energy=features.energy[:, 2 * a : 2 * b],
            style=features.style,
            durations=features.durations,
            harmonic_phase=harmonic_phase(features.f0, a),
            seam=seam,
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


@dataclass(frozen=True, slots=True)
class Span:
    """The frames of a segment to emit: the trimmed lead and tail cut off, the tail's rest as zeros."""

    start: int
    end: int
    pad_frames: int
    unvoiced: npt.NDArray[np.bool_]


def segment_span(features: AcousticFeatures) -> Span:
    """What of a segment is rendered: from LEAD_KEEP_FRAMES before its first word to TAIL_KEEP_FRAMES
    into its trailing pause; the rest of that pause is emitted as zeros."""
    total = features.frames
    lead = int(features.durations[0]) if features.durations.size else 0
    start = max(0, min(lead - LEAD_KEEP_FRAMES, total - 1))
    unvoiced = _unvoiced(features.f0)
    end = max(start + 1, _speech_end(features, unvoiced))
    return Span(start, end, total - end, unvoiced)


def _render_start(span: Span, position: int, *, whole: bool) -> int:
    """Where a window from `position` starts rendering: context before it, the trimmed lead-in
    included for a segment's first window (LEAD_CONTEXT_FRAMES when it is split off, else
    CONTEXT_FRAMES), never before the segment's own start after that."""
    if position == span.start:
        return max(0, span.start - (CONTEXT_FRAMES if whole else LEAD_CONTEXT_FRAMES))
    return max(span.start, position - CONTEXT_FRAMES)


def _largest_fitting(seconds: float, context: int, vocoder: VocoderCost) -> int:
    """The most frames a window with `context` extra frames may emit to render within `seconds`."""
    if vocoder.per_frame_s <= 0:
        return 1 << 30
    return int((seconds / COST_MARGIN - vocoder.fixed_s) / vocoder.per_frame_s) - context


def _keeps_up(remaining: int, slack_s: float, vocoder: VocoderCost, windows: int) -> bool:
    """Whether `remaining` frames can follow in at most `windows` windows, each as long as the
    listener's audio in hand allows, without it running dry (at the predicted speed, with the margin)."""
    for _ in range(windows):
        if COST_MARGIN * vocoder.seconds(remaining + CONTEXT_FRAMES) <= slack_s:
            return True
        # As next_window cuts: never leaving less than a window behind.
        most = remaining - MIN_WINDOW_FRAMES
        frames = min(_largest_fitting(slack_s, CONTEXT_FRAMES + RIGHT_CONTEXT_FRAMES, vocoder), most)
        if frames < MIN_WINDOW_FRAMES:
            return False
        render = COST_MARGIN * vocoder.seconds(frames + CONTEXT_FRAMES + RIGHT_CONTEXT_FRAMES)
        slack_s += frames * SECONDS_PER_FRAME - render
        remaining -= frames
    return False


def next_window(
    span: Span, position: int, slack_s: float, vocoder: VocoderCost, windows_left: int = MAX_WINDOWS
) -> Window:
    """The next window of a segment, from `position`, for a listener with `slack_s` seconds of audio
    in hand, rendered now by a vocoder that costs `vocoder`; at most `windows_left` windows, this one
    included, may finish the segment.

    The rest of the segment is rendered whole if that fits in the time the listener has: a seam costs
    some intelligibility, so a listener with audio in hand never hears a seam. Otherwise the window is
    as long as fits in that time, so later windows can grow and the seams stay few, provided the rest
    can then keep up. Where it cannot (every window re-renders ~20 frames of context, so windows that
    only just fit gain nothing on a slow vocoder, and the last one would be a long wait), or where the
    listener waits already, the window is the shortest after which the rest keeps up: one short wait
    now instead of a long one later. No split where it does not pay: where the window would render in
    nearly the whole's time (a fixed cost per call dominates, as on a GPU)."""
    whole_start = _render_start(span, position, whole=True)
    whole = Window(position, span.end, whole_start, span.end, last=True, pad_frames=span.pad_frames)
    remaining = span.end - position
    whole_s = COST_MARGIN * vocoder.seconds(span.end - whole_start)
    if whole_s <= slack_s or remaining < 2 * MIN_WINDOW_FRAMES or windows_left <= 1:
        return whole
    render_start = _render_start(span, position, whole=False)
    context = position - render_start + RIGHT_CONTEXT_FRAMES

    def rest_keeps_up(frames: int) -> bool:
        render_s = COST_MARGIN * vocoder.seconds(frames + context)
        after_s = max(0.0, slack_s - render_s) + frames * SECONDS_PER_FRAME
        return _keeps_up(remaining - frames, after_s, vocoder, windows_left - 1)

    most = remaining - MIN_WINDOW_FRAMES
    frames = min(_largest_fitting(slack_s, context, vocoder), most)
    waiting = frames < MIN_WINDOW_FRAMES or not rest_keeps_up(frames)
    if waiting:
        # The listener will wait whatever is chosen: the shortest window after which the rest keeps up.
        frames = next(
            (n for n in range(MIN_WINDOW_FRAMES, most + 1) if rest_keeps_up(n)),
            _two_windows(remaining, slack_s, vocoder),
        )
    seam = _seam(position + frames, span.unvoiced, position + MIN_WINDOW_FRAMES // 2, span.end - 1)
    if seam != position + frames and not rest_keeps_up(seam - position):
        seam = position + frames  # an unvoiced seam, but not at the price of a wait later
    head = Window(position, seam, render_start, min(span.end, seam + RIGHT_CONTEXT_FRAMES), last=False)
    if waiting:
        # A seam for a wait barely shorter does not pay (a call's fixed cost dominates, as on a GPU).
        head_s, whole_s = _seconds(head, vocoder), vocoder.seconds(span.end - whole_start)
        if head_s >= SPLIT_GAIN * whole_s or whole_s - head_s < MIN_SPLIT_GAIN_S:
            return whole
    return head


def _two_windows(remaining: int, slack_s: float, vocoder: VocoderCost) -> int:
    """Where no run of windows keeps up (a slow machine): the first of two, long enough that the
    second renders while it plays, so there is one wait rather than many."""
    first = MIN_WINDOW_FRAMES
    while first < remaining - MIN_WINDOW_FRAMES:
        second = COST_MARGIN * vocoder.seconds(remaining - first + CONTEXT_FRAMES)
        if second <= slack_s + first * SECONDS_PER_FRAME:
            break
        first += 1
    return first


def plan_windows(features: AcousticFeatures, *, slack_s: float, vocoder: VocoderCost) -> list[Window]:
    """Every window `next_window` gives for a segment if each render takes its predicted time (and
    the margin) and nothing else runs, with the listener's audio in hand tracked as the playback clock
    tracks it: for studies and tests; the vocoder plans one at a time."""
    span = segment_span(features)
    windows: list[Window] = []
    position = span.start
    while not windows or not windows[-1].last:
        window = next_window(span, position, slack_s, vocoder, MAX_WINDOWS - len(windows))
        render_s = COST_MARGIN * _seconds(window, vocoder)
        slack_s = max(0.0, slack_s - render_s) + (window.end - window.start) * SECONDS_PER_FRAME
        windows.append(window)
        position = window.end
    return windows


def _seconds(window: Window, vocoder: VocoderCost) -> float:
    return vocoder.seconds(window.render_end - window.render_start)


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
