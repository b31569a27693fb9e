"""Protocol v1 message shapes: one frozen dataclass per message, plus the values their fields may take.

These are plain data; the codec checks untrusted input before building them. Constructors are
keyword-only so `context` can lead every message (as it does on the wire) while still defaulting.
"""

from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, TypeAlias

from .errors import ErrorCode

PATH = "/v1/stream"
# Minor versions only add: fields an older peer ignores and messages sent only when asked for.
PROTOCOL_VERSION = "1.2"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765

DEFAULT_CONTEXT = "default"
MAX_CONTEXT_ID_LENGTH = 128

SAMPLE_RATES: tuple[int, ...] = (8000, 12000, 16000, 24000, 48000)
FRAME_DURATIONS_MS: tuple[int, ...] = (10, 20, 40, 60)
MIN_SPEED = 0.5
MAX_SPEED = 2.0
CHANNELS = 1

DEFAULT_LANG = "en-us"
DEFAULT_SPEED = 1.0
DEFAULT_SAMPLE_RATE = 24000
DEFAULT_FRAME_MS = 20
DEFAULT_MAX_SPEED = 1.4  # a live context's ceiling when it catches up (`Start.max_speed`)


class AudioCodec(StrEnum):
    """How `audio` payloads are encoded; picked per context by `start`."""

    OPUS = "opus"
    PCM16 = "pcm16"


class DoneReason(StrEnum):
    """Why a context finished, so a client can tell a clean end from an interruption."""

    END = "end"
    CANCEL = "cancel"
    ERROR = "error"


DEFAULT_CODEC = AudioCodec.OPUS


# Client -> server


@dataclass(frozen=True, slots=True, kw_only=True)
class Start:
    """Opens a context; `voice=None` lets the server choose its default voice."""

    type: ClassVar[str] = "start"
    context: str = DEFAULT_CONTEXT
    voice: str | None = None
    lang: str = DEFAULT_LANG
    speed: float = DEFAULT_SPEED
    codec: AudioCodec = DEFAULT_CODEC
    sample_rate: int = DEFAULT_SAMPLE_RATE
    frame_ms: int = DEFAULT_FRAME_MS
    words: bool = False
    # A live source (protocol 1.2): keep the lag from text to its audio under `max_lag_ms`, speeding
    # up to `max_speed`, then skipping the oldest whole sentences (`Skipped`). None: not live.
    max_lag_ms: int | None = None
    max_speed: float = DEFAULT_MAX_SPEED


@dataclass(frozen=True, slots=True, kw_only=True)
class Text:
    """Appends text to a context's buffer; synthesis starts as sentences complete."""

    type: ClassVar[str] = "text"
    context: str = DEFAULT_CONTEXT
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Flush:
    """Synthesizes whatever is buffered now, even without a sentence end."""

    type: ClassVar[str] = "flush"
    context: str = DEFAULT_CONTEXT


@dataclass(frozen=True, slots=True, kw_only=True)
class End:
    """No more text: finish the buffer, then answer `done` with reason end."""

    type: ClassVar[str] = "end"
    context: str = DEFAULT_CONTEXT


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel:
    """Stop at once, dropping pending text and audio; answered by `done` with reason cancel."""

    type: ClassVar[str] = "cancel"
    context: str = DEFAULT_CONTEXT


# Server -> client


@dataclass(frozen=True, slots=True, kw_only=True)
class Started:
    """Confirms a `start` with the settings actually in force, so the client can set up its decoder."""

    type: ClassVar[str] = "started"
    context: str = DEFAULT_CONTEXT
    voice: str
    codec: AudioCodec = DEFAULT_CODEC
    sample_rate: int = DEFAULT_SAMPLE_RATE
    channels: int = CHANNELS
    frame_ms: int = DEFAULT_FRAME_MS
    pre_skip: int = 0
    words: bool = False
    max_lag_ms: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Segment:
    """Announces the text behind the audio that follows, for captions and progress; `speed` is what
    it is spoken at (since 1.2: a live context catching up speeds segments up)."""

    type: ClassVar[str] = "segment"
    context: str = DEFAULT_CONTEXT
    segment: int
    text: str
    start_ms: float
    speed: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class WordTiming:
    """One spoken word: when it is heard (ms on the context's audio timeline, the clock of
    `Segment.start_ms`) and where it is in the text (code points from the start of all the text sent
    to the context, end exclusive). Not a message: `Words` carries a list of them."""

    word: str
    start_ms: float
    end_ms: float
    char_start: int
    char_end: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Words:
    """The timing of every word a segment speaks; sent after its `Segment`, before its first `Audio`,
    to contexts started with `words=True` (protocol 1.1)."""

    type: ClassVar[str] = "words"
    context: str = DEFAULT_CONTEXT
    segment: int
    words: tuple[WordTiming, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Skipped:
    """A live context fell behind its source: this text (code points of all the text sent to the
    context, end exclusive), whole sentences, will not be spoken (protocol 1.2)."""

    type: ClassVar[str] = "skipped"
    context: str = DEFAULT_CONTEXT
    char_start: int
    char_end: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Audio:
    """One frame of audio: a single Opus packet, or raw little-endian int16 mono samples."""

    type: ClassVar[str] = "audio"
    context: str = DEFAULT_CONTEXT
    segment: int
    seq: int
    data: bytes
    samples: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Done:
    """The last message of a context; afterwards its id may be started again."""

    type: ClassVar[str] = "done"
    context: str = DEFAULT_CONTEXT
    reason: DoneReason
    audio_ms: float
    segments: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """Reports a `ProtocolError`; `context` is None when the error concerns no readable context.
    `retry_after_ms` is set when trying again later may succeed (`overloaded` at capacity)."""

    type: ClassVar[str] = "error"
    context: str | None = None
    code: ErrorCode
    message: str
    retry_after_ms: int | None = None


ClientMessage: TypeAlias = Start | Text | Flush | End | Cancel
ServerMessage: TypeAlias = Started | Segment | Words | Skipped | Audio | Done | Error
Message: TypeAlias = ClientMessage | ServerMessage
