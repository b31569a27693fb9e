"""Kokoro's stages for the pipeline: G2P → acoustic → vocoder, and the items between them.

The acoustic stage (text encoder, prosody, durations) is cheap; the vocoder is where 90 % of the
FLOPs go. Keeping them apart lets the pipeline overlap one segment's vocoding with the next one's
acoustic pass, and lets a batched engine group each on its own. The vocoder renders a segment
in windows sized by its listener's deadline (see `windows`), one window per turn.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from speakd.server.engines.kokoro.engine import AcousticFeatures, AcousticRequest, Engine
from speakd.server.engines.kokoro.g2p import EnglishG2P
from speakd.server.engines.kokoro.seams import SeamCarry
from speakd.server.engines.kokoro.vocoder_speed import VocoderCost, VocoderSpeed
from speakd.server.engines.kokoro.voices import VoiceBank
from speakd.server.engines.kokoro.windows import (
    CONTEXT_FRAMES,
    MAX_WINDOWS,
    Span,
    Stitcher,
    next_window,
    segment_span,
)
from speakd.server.engines.kokoro.word_timing import WordTokens, time_words
from speakd.server.pipeline.job import EndMarker, Job, TextItem, TimedWord, WaveformItem
from speakd.server.pipeline.stage import Again, StageSpec

# A little slower than the ONNX vocoder on 2 CPU cores, until measured here.
INITIAL_VOCODER_COST = VocoderCost(fixed_s=0.025, per_frame_s=0.010)
# Frames per phoneme token, to bound acoustic batches before their durations are known: about 2.5-3
# in running speech, more in short segments (the BOS/EOS pauses).
FRAMES_PER_TOKEN = 3


@dataclass(slots=True)
class PhonemesItem:
    job: Job
    index: int
    text: str
    tokens: tuple[int, ...]
    words: tuple[WordTokens, ...] = ()
    offset: int = 0  # where the G2P input starts in the job's text: word spans are relative to it
    speed: float = 1.0


@dataclass(slots=True)
class FeaturesItem:
    """A segment to vocode from frame `position` on; its windows share one stitcher."""

    job: Job
    index: int
    text: str
    features: AcousticFeatures
    span: Span
    position: int
    stitcher: Stitcher
    seam: SeamCarry
    words: tuple[TimedWord, ...] = ()
    windows_done: int = 0
    speed: float = 1.0


def _phoneme_frames(item: PhonemesItem | EndMarker) -> int:
    """An acoustic item's batch cost: the frames it will probably make (BOS/EOS included)."""
    if isinstance(item, EndMarker):
        return 0
    return math.ceil(FRAMES_PER_TOKEN * (len(item.tokens) + 2) / item.speed)


def _window_frames(item: FeaturesItem | EndMarker) -> int:
    """A vocoder item's batch cost: at most the frames the rest of its segment renders."""
    return 0 if isinstance(item, EndMarker) else item.span.end - item.position + CONTEXT_FRAMES


class KokoroStages:
    """The work of Kokoro's three stages, each run in its stage's thread."""

    def __init__(self, g2p: EnglishG2P, engine: Engine, voices: VoiceBank) -> None:
        self._g2p = g2p
        self._engine = engine
        self._voices = voices
        # Learnt in the vocoder thread, read by the acoustic thread to size first windows.
        self._vocoder_speed = VocoderSpeed(INITIAL_VOCODER_COST)

    def specs(self) -> list[StageSpec]:
        return [
            StageSpec("g2p", self._phonemize),
            StageSpec("acoustic", self._acoustic, _phoneme_frames, batched=True),
            StageSpec("vocoder", self._vocode, _window_frames, batched=True),
        ]

    def _phonemize(self, items: list[TextItem]) -> list[PhonemesItem]:
        out = []
        for item in items:
            chunks = self._g2p(item.text, item.job.lang)
            for chunk in chunks:
                out.append(
                    PhonemesItem(
                        item.job,
                        item.job.segments_made,
                        chunk.text,
                        chunk.tokens,
                        chunk.words,
                        item.offset,
                        item.effective_speed,
                    )
                )
                item.job.segments_made += 1
            item.job.retired_chars += len(item.text)
        return out

    def _acoustic(self, items: list[PhonemesItem]) -> list[FeaturesItem]:
        requests = [
            AcousticRequest(item.tokens, self._voices.style(item.job.voice, len(item.tokens)), item.speed)
            for item in items
        ]
        out: list[FeaturesItem] = []
        for item, feats in zip(items, self._engine.acoustic(requests), strict=True):
            span = segment_span(feats)
            # Timed from the first frame played: the lead-in before `span.start` is trimmed.
            words = time_words(item.words, feats.durations, span.start, item.offset)
            out.append(
                FeaturesItem(
                    item.job,
                    item.index,
                    item.text,
                    feats,
                    span,
                    span.start,
                    Stitcher(),
                    SeamCarry(),
                    words,
                    speed=item.speed,
                )
            )
        return out

    def _vocode(self, items: list[FeaturesItem]) -> list[WaveformItem | Again]:
        # Each segment's next window is planned now, from the time its listener has left; a segment
        # has MAX_WINDOWS windows at most (an overloaded box would otherwise cut ever smaller windows,
        # each re-rendering its context: more work, when there is least time).
        cost = self._vocoder_speed.cost
        windows = [
            next_window(
                item.span, item.position, item.job.playback.slack(), cost, MAX_WINDOWS - item.windows_done
            )
            for item in items
        ]
        started = time.perf_counter()
        # A segment rendered whole is a render on its own; a split one's windows share its seam.
        rendered = self._engine.vocode(
            [
                w.slice(item.features, None if w.last and not item.windows_done else item.seam)
                for item, w in zip(items, windows, strict=True)
            ]
        )
        # A batch costs what its padded size does: its items, each as long as the longest.
        longest = max(w.render_end - w.render_start for w in windows)
        self._vocoder_speed.observe(len(items) * longest, time.perf_counter() - started)
        out: list[WaveformItem | Again] = []
        for item, window, wave in zip(items, windows, rendered, strict=True):
            audio = item.stitcher.add(window, wave)
            words = item.words if not item.windows_done else ()
            out.append(WaveformItem(item.job, item.index, item.text, audio, window.last, words, item.speed))
            if not window.last:
                item.position = window.end
                item.windows_done += 1
                out.append(Again(item))
        return out
