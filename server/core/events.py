"""What an utterance tells its door, in order: segments, audio, at most one error, then done.

Codes and reasons are protocol v1's (`speakd.protocol` is pure, so the core may speak its vocabulary);
each door maps them to its own convention: a protocol message, an HTTP status, a Wyoming event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from speakd.protocol import DoneReason, ErrorCode, WordTiming

if TYPE_CHECKING:
    from speakd.server.core.utterance import Utterance


@dataclass(frozen=True, slots=True)
class SegmentStarted:
    """A segment's first audio follows; `start_ms` is where it starts in the utterance's audio, and
    `speed` what it is spoken at (a live context catching up speeds some segments up)."""

    index: int
    text: str
    start_ms: float
    speed: float = 1.0


@dataclass(frozen=True, slots=True)
class SegmentWords:
    """The timing of the segment just started, for utterances opened with `words`: follows its
    `SegmentStarted`, precedes its audio. Times are on the utterance's audio timeline (ms), and
    character spans count from the start of all the text fed to the utterance."""

    segment: int
    words: tuple[WordTiming, ...]


@dataclass(frozen=True, slots=True)
class Skipped:
    """A live utterance fell too far behind its source: this text (code points of all the text fed,
    end exclusive), whole sentences, will not be spoken. Comes before the next `SegmentStarted`."""

    char_start: int
    char_end: int


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """Encoded audio of the current segment: a wire frame, or container bytes (maybe empty at first)."""

    segment: int
    seq: int
    data: bytes
    samples: int


@dataclass(frozen=True, slots=True)
class Failed:
    """Why the utterance stops early; a `Finished` with reason error or cancel follows. `retry_after_s`
    is set when a later retry may succeed (`overloaded` after waiting for admission)."""

    code: ErrorCode
    message: str
    retry_after_s: int | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of an utterance."""

    reason: DoneReason
    audio_ms: float
    segments: int


Event = SegmentStarted | SegmentWords | Skipped | AudioChunk | Failed | Finished


class EventSink(Protocol):
    """A door's side of an utterance: takes its events on the event loop."""

    def has_room(self, utterance: Utterance) -> bool:
        """Whether more audio may be produced for `utterance` now (back-pressure)."""
        ...

    def emit(self, utterance: Utterance, event: Event) -> bool:
        """Queue `event`; False when audio was refused (the door may have aborted the utterance)."""
        ...

    def retract(self, utterance: Utterance) -> None:
        """Withdraw `utterance`'s audio not yet sent (it was cancelled)."""
        ...
