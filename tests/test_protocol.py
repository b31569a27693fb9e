"""Wire protocol v1: round trips, exact error codes for malformed input, and decode robustness."""

import dataclasses
import math
import pickle
import random
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from speakd.protocol import (
    DEFAULT_CONTEXT,
    MAX_CONTEXT_ID_LENGTH,
    TEXT_FRAME_MESSAGE,
    Audio,
    AudioCodec,
    Cancel,
    ClientMessage,
    Done,
    DoneReason,
    End,
    Error,
    ErrorCode,
    Flush,
    Message,
    ProtocolError,
    Segment,
    ServerMessage,
    Skipped,
    Start,
    Started,
    Text,
    Words,
    WordTiming,
    decode_client,
    decode_server,
    encode,
    text_frame_error,
)

Decoder = Callable[[bytes], Message]

CLIENT_MESSAGES: list[ClientMessage] = [
    Start(),
    Start(
        context="ctx-1",
        voice="af_heart",
        lang="ja",
        speed=1.25,
        codec=AudioCodec.PCM16,
        sample_rate=48000,
        frame_ms=60,
    ),
    Start(context="c", speed=0.5, sample_rate=8000, frame_ms=10),
    Start(context="w", words=True),
    Start(context="live", max_lag_ms=5000, max_speed=1.6),
    Start(context="c", speed=2.0, sample_rate=12000, frame_ms=40),
    Text(text="Hello there. How are you?"),
    Text(context="x" * MAX_CONTEXT_ID_LENGTH, text=""),
    Text(context="ü", text="日本語のテキスト"),
    Flush(),
    Flush(context="a"),
    End(context="a"),
    Cancel(context="a"),
]

SERVER_MESSAGES: list[ServerMessage] = [
    Started(voice="af_heart"),
    Started(context="a", voice="v", codec=AudioCodec.PCM16, sample_rate=16000, frame_ms=10, pre_skip=0),
    Started(context="a", voice="v", codec=AudioCodec.OPUS, sample_rate=48000, frame_ms=20, pre_skip=312),
    Segment(context="a", segment=0, text="Hello there.", start_ms=0.0),
    Segment(context="a", segment=3, text="Next.", start_ms=1234.5, speed=1.25),
    Started(context="w", voice="v", words=True),
    Started(context="live", voice="v", max_lag_ms=5000),
    Skipped(context="live", char_start=120, char_end=240),
    Words(context="a", segment=0, words=()),
    Words(
        context="a",
        segment=4,
        words=(
            WordTiming(word="Hello", start_ms=75.0, end_ms=375.5, char_start=0, char_end=5),
            WordTiming(word="$12.50", start_ms=400.0, end_ms=1800.0, char_start=10, char_end=16),
        ),
    ),
    Audio(context="a", segment=0, seq=0, data=b"\x00\xff" * 40, samples=480),
    Audio(context="a", segment=2, seq=17, data=b"", samples=0),
    Done(context="a", reason=DoneReason.END, audio_ms=2500.0, segments=2),
    Done(reason=DoneReason.CANCEL, audio_ms=0.0, segments=0),
    Done(context="a", reason=DoneReason.ERROR, audio_ms=20.0, segments=1),
    Error(code=ErrorCode.BAD_MESSAGE, message="frame must hold a msgpack map"),
    Error(context="a", code=ErrorCode.SHUTTING_DOWN, message="daemon stopping"),
    Error(
        context="late", code=ErrorCode.OVERLOADED, message="at capacity; retry in 3 s", retry_after_ms=3000
    ),
    Error(code=ErrorCode.OVERLOADED, message="now", retry_after_ms=0),
]


def pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


@pytest.mark.parametrize("msg", CLIENT_MESSAGES, ids=repr)
def test_client_round_trip(msg: ClientMessage) -> None:
    decoded = decode_client(encode(msg))
    assert decoded == msg
    assert type(decoded) is type(msg)


@pytest.mark.parametrize("msg", SERVER_MESSAGES, ids=repr)
def test_server_round_trip(msg: ServerMessage) -> None:
    decoded = decode_server(encode(msg))
    assert decoded == msg
    assert type(decoded) is type(msg)


def test_every_message_type_is_covered_and_tags_are_unique() -> None:
    client_types = {m.type for m in CLIENT_MESSAGES}
    server_types = {m.type for m in SERVER_MESSAGES}
    assert client_types == {"start", "text", "flush", "end", "cancel"}
    assert server_types == {"started", "segment", "words", "skipped", "audio", "done", "error"}


def test_encode_writes_type_first_and_every_field_with_none_as_nil() -> None:
    raw = msgpack.unpackb(encode(Start(context="a")), raw=False)
    assert list(raw) == [
        "type",
        "context",
        "voice",
        "lang",
        "speed",
        "codec",
        "sample_rate",
        "frame_ms",
        "words",
        "max_lag_ms",
        "max_speed",
    ]
    assert raw == {
        "type": "start",
        "context": "a",
        "voice": None,
        "lang": "en-us",
        "speed": 1.0,
        "codec": "opus",
        "sample_rate": 24000,
        "frame_ms": 20,
        "words": False,
        "max_lag_ms": None,
        "max_speed": 1.4,
    }
    assert type(raw["codec"]) is str


def test_encode_uses_bin_for_bytes_and_plain_strings_for_enums() -> None:
    raw = msgpack.unpackb(encode(Audio(segment=1, seq=2, data=b"abc", samples=3)), raw=False)
    assert raw["data"] == b"abc"
    raw = msgpack.unpackb(encode(Error(code=ErrorCode.OVERLOADED, message="slow")), raw=False)
    assert raw == {
        "type": "error",
        "context": None,
        "code": "overloaded",
        "message": "slow",
        "retry_after_ms": None,
    }
    assert type(raw["code"]) is str


def test_retry_after_ms_is_written_as_an_integer_and_optional_for_older_peers() -> None:
    hint = Error(context="a", code=ErrorCode.OVERLOADED, message="retry in 2 s", retry_after_ms=2000)
    raw = msgpack.unpackb(encode(hint), raw=False)
    assert list(raw) == ["type", "context", "code", "message", "retry_after_ms"]
    assert raw["retry_after_ms"] == 2000 and type(raw["retry_after_ms"]) is int
    # A server from before the field never writes it; nil means the same: no hint.
    older = decode_server(msg("error", context="a", code="overloaded", message="m"))
    assert isinstance(older, Error) and older.retry_after_ms is None
    nil = decode_server(msg("error", code="overloaded", message="m", retry_after_ms=None))
    assert isinstance(nil, Error) and nil.retry_after_ms is None


def test_absent_optional_fields_take_defaults() -> None:
    assert decode_client(pack({"type": "start"})) == Start()
    assert decode_client(pack({"type": "text", "text": "hi"})) == Text(context=DEFAULT_CONTEXT, text="hi")
    assert decode_client(pack({"type": "start", "voice": None})) == Start(voice=None)
    assert decode_server(pack({"type": "error", "code": "internal", "message": "m"})).context is None


def test_integer_speed_is_accepted_as_float() -> None:
    decoded = decode_client(pack({"type": "start", "speed": 2}))
    assert isinstance(decoded, Start)
    assert decoded.speed == 2.0
    assert type(decoded.speed) is float


def test_integer_start_ms_is_accepted_as_float() -> None:
    decoded = decode_server(pack({"type": "segment", "segment": 0, "text": "t", "start_ms": 40}))
    assert isinstance(decoded, Segment)
    assert type(decoded.start_ms) is float


def test_unknown_extra_keys_are_ignored() -> None:
    frame = pack({"type": "text", "context": "a", "text": "hi", "future": [1, {"x": b"y"}], "z": None})
    assert decode_client(frame) == Text(context="a", text="hi")


def test_decoded_enums_are_enum_members() -> None:
    decoded = decode_client(pack({"type": "start", "codec": "pcm16"}))
    assert isinstance(decoded, Start)
    assert decoded.codec is AudioCodec.PCM16


def test_messages_are_frozen() -> None:
    msg = Text(context="a", text="hi")
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.text = "changed"


def test_text_frame_error() -> None:
    err = text_frame_error()
    assert err.code is ErrorCode.BAD_MESSAGE
    assert err.message == TEXT_FRAME_MESSAGE
    assert err.context is None


def test_protocol_error_str_and_pickle() -> None:
    err = ProtocolError(ErrorCode.INVALID_PARAM, "start.speed must be between 0.5 and 2.0", "a")
    assert str(err) == "invalid_param: start.speed must be between 0.5 and 2.0"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.code, copy.message, copy.context) == (err.code, err.message, err.context)


BAD = ErrorCode.BAD_MESSAGE
UNKNOWN = ErrorCode.UNKNOWN_TYPE
INVALID = ErrorCode.INVALID_PARAM
D = DEFAULT_CONTEXT
C: Decoder = decode_client
S: Decoder = decode_server


def msg(kind: str, **fields: object) -> bytes:
    return pack({"type": kind, **fields})


STARTED = {"voice": "v", "codec": "opus", "sample_rate": 24000, "channels": 1, "frame_ms": 20, "pre_skip": 0}
NO_VOICE = {k: v for k, v in STARTED.items() if k != "voice"}
WORD = {"word": "a", "start_ms": 0.0, "end_ms": 25.0, "char_start": 0, "char_end": 1}
LONG_CONTEXT = "x" * (MAX_CONTEXT_ID_LENGTH + 1)

# (id, decoder, frame, expected code, expected error context, substring the message must contain)
MALFORMED: list[tuple[str, Decoder, bytes, ErrorCode, str | None, str]] = [
    ("garbage bytes", C, b"\xc1\xc1\xc1", BAD, None, "msgpack"),
    ("empty frame", C, b"", BAD, None, "msgpack"),
    ("truncated map", C, msg("flush")[:-2], BAD, None, "msgpack"),
    ("trailing bytes", C, msg("flush") + b"\x00", BAD, None, "msgpack"),
    ("invalid utf-8", C, b"\x81\xa4type\xa2\xff\xfe", BAD, None, "msgpack"),
    ("msgpack array", C, pack(["type", "flush"]), BAD, None, "map"),
    ("msgpack int", C, pack(7), BAD, None, "map"),
    ("msgpack str", C, pack("start"), BAD, None, "map"),
    ("top-level ext", C, pack(msgpack.ExtType(5, b"x")), BAD, None, "map"),
    ("bad timestamp ext", C, b"\xc7\x03\xff\x00\x00\x00", BAD, None, "msgpack"),
    ("missing type", C, pack({"context": "a"}), BAD, "a", "type"),
    ("type not str", C, pack({"type": 1, "context": "a"}), BAD, "a", "type"),
    ("type is bin", C, pack({"type": b"flush"}), BAD, D, "type"),
    ("non-str keys", C, pack({"type": "flush", 1: "x"}), BAD, D, "keys"),
    ("unhashable key", C, b"\x82\xa4type\xa5flush\x91\x01\x01", BAD, None, "msgpack"),
    ("unknown type", C, msg("speak", context="a"), UNKNOWN, "a", "speak"),
    ("server type to client", C, msg("started", context="a", **STARTED), UNKNOWN, "a", "started"),
    ("client type to server", S, msg("start"), UNKNOWN, D, "start"),
    ("missing text", C, msg("text", context="a"), BAD, "a", "text"),
    ("text as bytes", C, msg("text", text=b"hi"), BAD, D, "text"),
    ("text as nil", C, msg("text", text=None), BAD, D, "text"),
    ("bool sample_rate", C, msg("start", sample_rate=True), BAD, D, "sample_rate"),
    ("float sample_rate", C, msg("start", sample_rate=24000.0), BAD, D, "sample_rate"),
    ("speed 0.1", C, msg("start", speed=0.1), INVALID, D, "between 0.5 and 2.0"),
    ("speed 2.5", C, msg("start", speed=2.5), INVALID, D, "between 0.5 and 2.0"),
    ("speed nan", C, msg("start", speed=math.nan), INVALID, D, "speed"),
    ("speed inf", C, msg("start", speed=math.inf), INVALID, D, "speed"),
    ("speed fast", C, msg("start", speed="fast"), BAD, D, "speed"),
    ("speed bool", C, msg("start", speed=True), BAD, D, "speed"),
    ("sample_rate 44100", C, msg("start", sample_rate=44100), INVALID, D, "8000, 12000, 16000, 24000, 48000"),
    ("frame_ms 25", C, msg("start", frame_ms=25), INVALID, D, "10, 20, 40, 60"),
    ("codec mp3", C, msg("start", codec="mp3"), INVALID, D, "opus, pcm16"),
    ("codec nil", C, msg("start", codec=None), BAD, D, "codec"),
    ("lang empty", C, msg("start", lang=""), INVALID, D, "lang"),
    ("lang int", C, msg("start", lang=5), BAD, D, "lang"),
    ("voice int", C, msg("start", voice=5), BAD, D, "voice"),
    ("context empty", C, msg("flush", context=""), BAD, None, "context"),
    ("context int", C, msg("flush", context=5), BAD, None, "context"),
    ("context nil", C, msg("flush", context=None), BAD, None, "context"),
    ("context too long", C, msg("flush", context=LONG_CONTEXT), BAD, None, "context"),
    ("nested garbage", C, msg("text", text={"a": [1, {"b": b"x"}]}), BAD, D, "text"),
    ("deep nesting", C, b"\x91" * 5000, BAD, None, "msgpack"),
    ("huge container", C, b"\xdf\xff\xff\xff\xff", BAD, None, "msgpack"),
    ("huge int", C, msg("start", sample_rate=2**64 - 1), INVALID, D, "sample_rate"),
    ("ext as text", C, msg("text", text=msgpack.ExtType(5, b"x")), BAD, D, "text"),
    ("negative segment", S, msg("segment", segment=-(2**63), text="t", start_ms=0), INVALID, D, "segment"),
    ("negative start_ms", S, msg("segment", segment=0, text="t", start_ms=-1.0), INVALID, D, "start_ms"),
    ("audio data as str", S, msg("audio", segment=0, seq=0, data="x", samples=1), BAD, D, "data"),
    ("audio missing seq", S, msg("audio", segment=0, data=b"", samples=1), BAD, D, "seq"),
    ("started 2 channels", S, msg("started", **(STARTED | {"channels": 2})), INVALID, D, "channels"),
    ("started no voice", S, msg("started", **NO_VOICE), BAD, D, "voice"),
    ("start words as int", C, msg("start", words=1), BAD, D, "words"),
    ("max_lag_ms float", C, msg("start", max_lag_ms=2000.5), BAD, D, "max_lag_ms"),
    ("max_lag_ms zero", C, msg("start", max_lag_ms=0), INVALID, D, "max_lag_ms"),
    ("max_speed 3", C, msg("start", max_speed=3.0), INVALID, D, "max_speed"),
    ("max_speed str", C, msg("start", max_speed="fast"), BAD, D, "max_speed"),
    ("skipped no end", S, msg("skipped", char_start=0), BAD, D, "char_end"),
    ("start words as str", C, msg("start", words="yes"), BAD, D, "words"),
    ("started words nil", S, msg("started", **(STARTED | {"words": None})), BAD, D, "words"),
    ("words missing list", S, msg("words", segment=0), BAD, D, "words"),
    ("words not a list", S, msg("words", segment=0, words={"word": "a"}), BAD, D, "words"),
    ("words item not a map", S, msg("words", segment=0, words=["a"]), BAD, D, "words[0]"),
    (
        "word missing end_ms",
        S,
        msg("words", segment=0, words=[{"word": "a", "start_ms": 0, "char_start": 0, "char_end": 1}]),
        BAD,
        D,
        "words[0] is missing required field 'end_ms'",
    ),
    (
        "word negative char_start",
        S,
        msg("words", segment=0, words=[WORD | {"char_start": -1}]),
        INVALID,
        D,
        "words[0].char_start",
    ),
    ("word as bytes", S, msg("words", segment=0, words=[WORD | {"word": b"a"}]), BAD, D, "words[0].word"),
    (
        "done bad reason",
        S,
        msg("done", reason="oops", audio_ms=0, segments=0),
        INVALID,
        D,
        "end, cancel, error",
    ),
    ("error unknown code", S, msg("error", code="nope", message="m"), INVALID, D, "code"),
    (
        "retry_after_ms str",
        S,
        msg("error", code="overloaded", message="m", retry_after_ms="1"),
        BAD,
        D,
        "retry",
    ),
    (
        "retry_after_ms float",
        S,
        msg("error", code="overloaded", message="m", retry_after_ms=1.5),
        BAD,
        D,
        "retry",
    ),
    (
        "retry_after_ms bool",
        S,
        msg("error", code="overloaded", message="m", retry_after_ms=True),
        BAD,
        D,
        "retry",
    ),
    (
        "retry_after_ms < 0",
        S,
        msg("error", code="overloaded", message="m", retry_after_ms=-1),
        INVALID,
        D,
        "retry",
    ),
]


@pytest.mark.parametrize(
    ("decoder", "frame", "code", "context", "fragment"),
    [row[1:] for row in MALFORMED],
    ids=[row[0] for row in MALFORMED],
)
def test_malformed_input_raises_exact_code(
    decoder: Decoder, frame: bytes, code: ErrorCode, context: str | None, fragment: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        decoder(frame)
    assert info.value.code is code
    assert info.value.context == context
    assert fragment in info.value.message


def _random_scalar(rng: random.Random) -> object:
    choices: list[Callable[[], object]] = [
        lambda: None,
        lambda: rng.choice([True, False]),
        lambda: rng.randint(-(2**63), 2**64 - 1),
        lambda: rng.choice([0, 1, 20, 24000, 44100, -1]),
        lambda: rng.uniform(-10.0, 10.0),
        lambda: rng.choice([math.nan, math.inf, -math.inf, 0.5, 2.0]),
        lambda: "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(0, 8))),
        lambda: rng.choice(["start", "text", "opus", "pcm16", "end", "", "default", "x" * 200]),
        lambda: rng.randbytes(rng.randint(0, 8)),
        lambda: msgpack.ExtType(rng.randint(0, 127), rng.randbytes(rng.randint(0, 4))),
    ]
    return rng.choice(choices)()


def _random_object(rng: random.Random, depth: int = 0) -> object:
    roll = rng.random()
    if depth < 3 and roll < 0.15:
        return [_random_object(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if depth < 3 and roll < 0.3:
        return {_random_scalar(rng) if rng.random() < 0.2 else "k": _random_object(rng, depth + 1)}
    return _random_scalar(rng)


FIELD_NAMES = [
    "context", "voice", "lang", "speed", "codec", "sample_rate", "frame_ms", "text", "channels",
    "pre_skip", "segment", "start_ms", "seq", "data", "samples", "reason", "audio_ms", "segments",
    "code", "message", "retry_after_ms", "words", "word", "end_ms", "char_start", "char_end",
    "max_lag_ms", "max_speed",
]  # fmt: skip
TYPE_NAMES = [
    "start", "text", "flush", "end", "cancel", "started", "segment", "words", "skipped", "audio", "done",
    "error",
]  # fmt: skip


def _random_message_map(rng: random.Random) -> dict[object, object]:
    """A map shaped like a message with random field values, so decoding gets past the framing."""
    body: dict[object, object] = {"type": rng.choice(TYPE_NAMES)}
    for name in rng.sample(FIELD_NAMES, rng.randint(0, len(FIELD_NAMES))):
        body[name] = _random_object(rng)
    return body


def _assert_only_protocol_errors(frame: bytes) -> int:
    """Decode with both decoders; returns how many succeeded. Any non-ProtocolError fails the test."""
    successes = 0
    for decoder in (decode_client, decode_server):
        try:
            msg = decoder(frame)
        except ProtocolError as err:
            assert isinstance(err.code, ErrorCode)
            assert err.context is None or isinstance(err.context, str)
        else:
            assert decoder(encode(msg)) == msg
            successes += 1
    return successes


def test_fuzz_random_bytes_raise_only_protocol_error() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        _assert_only_protocol_errors(rng.randbytes(rng.randint(0, 64)))


def test_fuzz_random_msgpack_objects_raise_only_protocol_error() -> None:
    rng = random.Random(5678)
    successes = 0
    for i in range(2000):
        obj = _random_message_map(rng) if i % 2 else _random_object(rng)
        successes += _assert_only_protocol_errors(pack(obj))
    # Some random maps are valid messages; make sure the fuzz reaches the builders, not just the framing.
    assert successes > 0


def test_fuzz_mutated_valid_frames_raise_only_protocol_error() -> None:
    rng = random.Random(91011)
    frames = [encode(m) for m in [*CLIENT_MESSAGES, *SERVER_MESSAGES]]
    for _ in range(2000):
        frame = bytearray(rng.choice(frames))
        for _ in range(rng.randint(1, 3)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        if rng.random() < 0.3:
            del frame[rng.randrange(len(frame)) :]
        _assert_only_protocol_errors(bytes(frame))
