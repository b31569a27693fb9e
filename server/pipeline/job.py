"""A job is one utterance as the pipeline sees it: settings, encoder, cancel flag and where results go.

Every stage checks `cancelled` and the fair queues use the job as the lane key, so a cancel reaches
queued work in every stage. The items that flow between stages all carry their job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from speakd.server.audio.encoders import Frame
from speakd.server.errors import SynthesisError
from speakd.server.pipeline.playback import PlaybackClock


class AudioEncoder(Protocol):
    """Turns a job's waveform parts into bytes for its door: wire frames or a container stream."""

    pre_skip: int

    def encode(self, audio24k: npt.NDArray[np.float32], *, end_of_segment: bool) -> list[Frame]: ...

    def finish(self) -> list[Frame]: ...


class JobSink(Protocol):
    """Where a job's results land, on the event loop (the utterance that owns the job)."""

    def has_room(self) -> bool:
        """Whether the reader can take more audio now; when not, the last stage holds this job's
        items (its lanes fill and the stages before it stop taking its work too)."""
        ...

    def deliver(self, job: Job, segment: EncodedSegment) -> None: ...

    def finish(self, job: Job, tail: Sequence[Frame]) -> None: ...

    def fail(self, job: Job, error: SynthesisError) -> None: ...


class Job:
    """One utterance's synthesis: its settings, its encoder, and the cancel flag every stage checks."""

    def __init__(
        self, *, context: str, voice: str, lang: str, speed: float, encoder: AudioEncoder, sink: JobSink
    ) -> None:
        self.context = context
        self.voice = voice
        self.lang = lang
        self.speed = speed
        self.encoder = encoder
        self.sink = sink
        self.cancelled = False
        self.playback = PlaybackClock()
        # Each counter has one writer (the loop or the first stage's thread), so reads elsewhere are safe.
        self.texts_submitted = 0
        self.submitted_chars = 0
        self.segments_made = 0
        self.retired_chars = 0

    @property
    def pending_chars(self) -> int:
        """Text submitted but not yet through the first stage: part of the utterance's text budget."""
        return self.submitted_chars - self.retired_chars

    def __repr__(self) -> str:
        return f"Job({self.context!r}, cancelled={self.cancelled})"


@dataclass(frozen=True, slots=True)
class TimedWord:
    """A word a segment speaks: seconds from the segment's first sample (after any trimmed lead-in),
    and its place in the job's text (code points from the start of all the text the job was fed)."""

    word: str
    start_s: float
    end_s: float
    char_start: int
    char_end: int


@dataclass(slots=True)
class TextItem:
    """Text the pipeline hands to the engine's first stage; `first` marks the job's first text, and
    `offset` is where `text` starts in all the text the job was fed (for word positions)."""

    job: Job
    text: str
    first: bool
    offset: int = 0
    speed: float | None = None  # this text's own speed (a live context catching up); None: the job's

    @property
    def effective_speed(self) -> float:
        return self.job.speed if self.speed is None else self.speed


@dataclass(slots=True)
class WaveformItem:
    """What the engine's last stage yields: 24 kHz audio of one segment, or of one part of it."""

    job: Job
    index: int
    text: str
    audio: npt.NDArray[np.float32]
    last_part: bool
    # The timing of the segment's words, on its first part only; () where the engine has none.
    words: tuple[TimedWord, ...] = ()
    speed: float = 1.0  # what it was spoken at


@dataclass(slots=True)
class EncodedSegment:
    """Frames of one segment, or of one part of it when it was rendered in parts."""

    job: Job
    index: int
    text: str
    frames: list[Frame]
    words: tuple[TimedWord, ...] = ()
    last_part: bool = True
    speed: float = 1.0


@dataclass(slots=True)
class EndMarker:
    """Follows a job's last segment through every stage; the encoder stage fills in the tail."""

    job: Job
    tail: Sequence[Frame] = ()
