"""Bytes <-> messages: msgpack framing, and dispatch on `type` to a checked message builder.

Decoding is the boundary with untrusted peers, so `decode_client` and `decode_server` raise nothing
but `ProtocolError`, whatever the bytes. Frame-size limits are the server's business, not the codec's.
"""

import dataclasses
from collections.abc import Callable, Mapping
from enum import Enum
from typing import TypeVar

import msgpack

from .errors import ErrorCode, ProtocolError
from .fields import Fields, is_context_id
from .messages import (
    CHANNELS,
    DEFAULT_CODEC,
    DEFAULT_CONTEXT,
    DEFAULT_FRAME_MS,
    DEFAULT_LANG,
    DEFAULT_MAX_SPEED,
    DEFAULT_SAMPLE_RATE,
    DEFAULT_SPEED,
    FRAME_DURATIONS_MS,
    MAX_SPEED,
    MIN_SPEED,
    SAMPLE_RATES,
    Audio,
    AudioCodec,
    Cancel,
    ClientMessage,
    Done,
    DoneReason,
    End,
    Error,
    Flush,
    Message,
    Segment,
    ServerMessage,
    Skipped,
    Start,
    Started,
    Text,
    Words,
    WordTiming,
)

# A v1 message has under a dozen keys; its one array (`words`) holds a segment's words, fewer than one
# per two of the model's 510 phonemes. These caps leave room for extension fields while stopping a
# small frame from declaring huge containers.
_MAX_CONTAINER_LEN = 1024

M = TypeVar("M", bound=Message)


def _wire(value: object) -> object:
    """A field's value as msgpack takes it: enums by value, nested records as maps, tuples as arrays."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return [_wire(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _wire(getattr(value, field.name)) for field in dataclasses.fields(value)}
    return value


def encode(msg: Message) -> bytes:
    """One msgpack map: `type` first, then every field in declaration order (None as nil)."""
    body: dict[str, object] = {"type": msg.type}
    for field in dataclasses.fields(msg):
        body[field.name] = _wire(getattr(msg, field.name))
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def _unpack(frame: bytes) -> object:
    try:
        value: object = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=False,
            max_array_len=_MAX_CONTAINER_LEN,
            max_map_len=_MAX_CONTAINER_LEN,
        )
    # Untrusted bytes can make msgpack raise many things (ValueError subclasses, TypeError for
    # unhashable keys, bad timestamp ext data...); all of them mean the same to the peer.
    except Exception as exc:
        detail = str(exc) or type(exc).__name__
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"frame is not a single msgpack value: {detail}") from exc
    return value


def _open(frame: bytes) -> Fields:
    """Unpack a frame down to its `type` tag and its fields, addressed to its context if readable."""
    value = _unpack(frame)
    if not isinstance(value, dict):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"frame must hold a msgpack map, got {type(value).__name__}"
        )
    context = value.get("context", DEFAULT_CONTEXT)
    address = context if is_context_id(context) else None
    if not all(isinstance(key, str) for key in value):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "message map keys must all be strings", address)
    kind = value.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "message must have a string 'type' field", address)
    return Fields(value, kind, address)


def _decode(
    frame: bytes,
    builders: Mapping[str, Callable[[Fields], M]],
    other_side: Mapping[str, object],
    sender: str,
) -> M:
    f = _open(frame)
    build = builders.get(f.kind)
    if build is None:
        if f.kind in other_side:
            detail = f"{f.kind!r} is not a message the {sender} sends"
        else:
            detail = f"unknown message type {f.kind!r}"
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, detail, f.address)
    return build(f)


def _start(f: Fields) -> Start:
    return Start(
        context=f.context(),
        voice=f.optional_string("voice"),
        lang=f.string("lang", DEFAULT_LANG, non_empty=True),
        speed=f.number("speed", DEFAULT_SPEED, minimum=MIN_SPEED, maximum=MAX_SPEED),
        codec=f.choice("codec", AudioCodec, DEFAULT_CODEC),
        sample_rate=f.integer("sample_rate", DEFAULT_SAMPLE_RATE, allowed=SAMPLE_RATES),
        frame_ms=f.integer("frame_ms", DEFAULT_FRAME_MS, allowed=FRAME_DURATIONS_MS),
        words=f.boolean("words", False),
        max_lag_ms=f.optional_integer("max_lag_ms", minimum=1),
        max_speed=f.number("max_speed", DEFAULT_MAX_SPEED, minimum=MIN_SPEED, maximum=MAX_SPEED),
    )


def _text(f: Fields) -> Text:
    return Text(context=f.context(), text=f.string("text"))


def _flush(f: Fields) -> Flush:
    return Flush(context=f.context())


def _end(f: Fields) -> End:
    return End(context=f.context())


def _cancel(f: Fields) -> Cancel:
    return Cancel(context=f.context())


def _started(f: Fields) -> Started:
    return Started(
        context=f.context(),
        voice=f.string("voice"),
        codec=f.choice("codec", AudioCodec),
        sample_rate=f.integer("sample_rate", allowed=SAMPLE_RATES),
        channels=f.integer("channels", allowed=(CHANNELS,)),
        frame_ms=f.integer("frame_ms", allowed=FRAME_DURATIONS_MS),
        pre_skip=f.integer("pre_skip"),
        # Added in 1.1: a server from before leaves it out, and sends no `words`.
        words=f.boolean("words", False),
        max_lag_ms=f.optional_integer("max_lag_ms", minimum=1),  # 1.2
    )


def _segment(f: Fields) -> Segment:
    return Segment(
        context=f.context(),
        segment=f.integer("segment"),
        text=f.string("text"),
        start_ms=f.number("start_ms"),
        speed=f.number("speed", 1.0, minimum=MIN_SPEED, maximum=MAX_SPEED),  # 1.2
    )


def _word(f: Fields) -> WordTiming:
    return WordTiming(
        word=f.string("word"),
        start_ms=f.number("start_ms"),
        end_ms=f.number("end_ms"),
        char_start=f.integer("char_start"),
        char_end=f.integer("char_end"),
    )


def _words(f: Fields) -> Words:
    return Words(context=f.context(), segment=f.integer("segment"), words=tuple(f.records("words", _word)))


def _skipped(f: Fields) -> Skipped:
    return Skipped(context=f.context(), char_start=f.integer("char_start"), char_end=f.integer("char_end"))


def _audio(f: Fields) -> Audio:
    return Audio(
        context=f.context(),
        segment=f.integer("segment"),
        seq=f.integer("seq"),
        data=f.binary("data"),
        samples=f.integer("samples"),
    )


def _done(f: Fields) -> Done:
    return Done(
        context=f.context(),
        reason=f.choice("reason", DoneReason),
        audio_ms=f.number("audio_ms"),
        segments=f.integer("segments"),
    )


def _error(f: Fields) -> Error:
    return Error(
        context=f.optional_context(),
        code=f.choice("code", ErrorCode),
        message=f.string("message"),
        retry_after_ms=f.optional_integer("retry_after_ms"),
    )


_CLIENT_BUILDERS: dict[str, Callable[[Fields], ClientMessage]] = {
    Start.type: _start,
    Text.type: _text,
    Flush.type: _flush,
    End.type: _end,
    Cancel.type: _cancel,
}

_SERVER_BUILDERS: dict[str, Callable[[Fields], ServerMessage]] = {
    Started.type: _started,
    Segment.type: _segment,
    Words.type: _words,
    Skipped.type: _skipped,
    Audio.type: _audio,
    Done.type: _done,
    Error.type: _error,
}


def decode_client(frame: bytes) -> ClientMessage:
    """Decode and check a frame a client sent; raises only `ProtocolError`."""
    return _decode(frame, _CLIENT_BUILDERS, _SERVER_BUILDERS, "client")


def decode_server(frame: bytes) -> ServerMessage:
    """Decode and check a frame a server sent; raises only `ProtocolError`."""
    return _decode(frame, _SERVER_BUILDERS, _CLIENT_BUILDERS, "server")
