"""The OpenAI-compatible speech door: `POST /v1/audio/speech` and the listings clients read.

A thin adapter over the synthesis core: one request is one session with one utterance. The whole
input goes in at once and the core cuts it as it cuts any stream, so the first sentence (its first
clause) is spoken first; the body streams as the audio is produced. Headers wait for the first audio,
so a request that fails before any audio still gets OpenAI's error JSON with a fitting status; a
request queued for admission (`limits.admission = "queue"`) just waits longer for them, and gets a
503 with Retry-After if no place frees up in time.

One speakd extension: `"speakd_words": true` with `stream_format: "sse"` adds a
`speech.audio.words` event before each segment's audio deltas, the timing of the words it speaks.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from speakd.protocol import DoneReason, ErrorCode, WordTiming
from speakd.server.audio.containers import (
    CONTENT_TYPES,
    DECODER_LEAD_SAMPLES,
    FORMATS,
    open_container_encoder,
)
from speakd.server.audio.encoders import MODEL_RATE
from speakd.server.core.errors import Busy, RequestRefused
from speakd.server.core.event_stream import EventStream
from speakd.server.core.events import AudioChunk, Event, Failed, Finished, SegmentWords
from speakd.server.core.synthesis import SPEED_RANGE, SynthesisCore
from speakd.server.frontends.keys import CONFIG, loaded_core

logger = logging.getLogger(__name__)

OPENAI_VOICES = (
    "alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage", "shimmer",
    "verse",
)  # fmt: skip
"""The voice names OpenAI's API documents; each resolves to one of the model's voices."""
MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
"""OpenAI's model names, listed beside the backend's own: any `model` string is accepted."""
STREAM_FORMATS = ("audio", "sse")
MAX_INSTRUCTIONS_CHARS = 4096
# Audio held for a reader that has not taken it yet: past this the pipeline holds the request's work.
STREAM_BUFFER_BYTES = 256 * 1024
UTTERANCE = "speech"
WORDS_FIELD = "speakd_words"
"""The request field that asks for word timing: prefixed, since OpenAI's API has no such field and
may one day add a differently shaped one under a plain name (`timestamps`, `words`)."""


class ApiError(Exception):
    """An error in OpenAI's shape: the status, and the body's message, type, param and code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def response(self) -> web.Response:
        headers = {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status, headers=headers)


@dataclass(frozen=True, slots=True)
class SpeechRequest:
    """A validated `CreateSpeechRequest`; `voice` is already a voice of the model."""

    model: str
    input: str
    voice: str
    response_format: str
    speed: float
    stream_format: str
    instructions: str | None
    words: bool = False
    """speakd's extension: `speech.audio.words` events in the SSE stream."""


def resolve_voice(
    requested: str, voices: Sequence[str], mapping: Mapping[str, str], default: str
) -> str | None:
    """The model's voice for `requested`: itself if the model has it, else the configured mapping,
    else a voice named `*_<requested>` (Kokoro has af_alloy, am_echo, …), else for an OpenAI name the
    default voice. None when nothing fits."""
    if requested in voices:
        return requested
    mapped = mapping.get(requested)
    if mapped is not None:
        return mapped if mapped in voices else None
    if requested in OPENAI_VOICES:
        named = sorted(voice for voice in voices if voice.partition("_")[2] == requested)
        return named[0] if named else default
    return None


def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], required: bool) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(
                400, f"missing required parameter: '{name}'", param=name, code="missing_required_parameter"
            )
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        kind_name = "a number" if kind == (int, float) else "a string"
        raise ApiError(
            400, f"invalid type for '{name}': expected {kind_name}", param=name, code="invalid_type"
        )
    return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
    """A JSON boolean, absent or null meaning false; 1 and "true" are not booleans."""
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"invalid type for '{name}': expected a boolean", param=name, code="invalid_type")
    return value


def parse_speech_request(
    raw: bytes,
    *,
    max_input_chars: int,
    voices: Sequence[str],
    voice_map: Mapping[str, str],
    default_voice: str,
) -> SpeechRequest:
    """Validate a request body; unknown fields are ignored (clients written for other servers send
    extras such as `stream` or `lang_code`), a known field with a wrong type or value is an ApiError."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    model = _field(body, "model", str, True)
    text = _field(body, "input", str, True)
    if not text.strip():
        raise ApiError(400, "'input' is empty: give some text to speak", param="input", code="empty_input")
    if len(text) > max_input_chars:
        raise ApiError(
            400,
            f"'input' is {len(text)} characters; the limit is {max_input_chars}",
            param="input",
            code="string_above_max_length",
        )
    voice_value = body.get("voice")
    if isinstance(voice_value, dict):  # the newer spec's custom voice object: {"id": "..."}
        voice_value = voice_value.get("id")
    if voice_value is None:
        raise ApiError(
            400, "missing required parameter: 'voice'", param="voice", code="missing_required_parameter"
        )
    if not isinstance(voice_value, str):
        raise ApiError(400, "invalid type for 'voice': expected a string", param="voice", code="invalid_type")
    voice = resolve_voice(voice_value, voices, voice_map, default_voice)
    if voice is None:
        raise ApiError(
            400,
            f"unknown voice {voice_value!r}; valid voices: {', '.join(voices)} "
            f"(or an OpenAI name: {', '.join(OPENAI_VOICES)})",
            param="voice",
            code="invalid_voice",
        )
    response_format = _field(body, "response_format", str, False) or "mp3"
    if response_format not in FORMATS:
        raise ApiError(
            400,
            f"invalid 'response_format' {response_format!r}; use one of {', '.join(FORMATS)}",
            param="response_format",
            code="invalid_value",
        )
    speed = _field(body, "speed", (int, float), False)
    speed = 1.0 if speed is None else float(speed)
    low, high = SPEED_RANGE
    if not (math.isfinite(speed) and low <= speed <= high):
        raise ApiError(400, f"'speed' must be between {low} and {high}", param="speed", code="invalid_value")
    stream_format = _field(body, "stream_format", str, False) or "audio"
    if stream_format not in STREAM_FORMATS:
        raise ApiError(
            400,
            f"invalid 'stream_format' {stream_format!r}; use 'audio' or 'sse'",
            param="stream_format",
            code="invalid_value",
        )
    instructions = _field(body, "instructions", str, False)
    if instructions is not None and len(instructions) > MAX_INSTRUCTIONS_CHARS:
        raise ApiError(
            400,
            f"'instructions' is longer than {MAX_INSTRUCTIONS_CHARS} characters",
            param="instructions",
            code="string_above_max_length",
        )
    words = _flag(body, WORDS_FIELD)
    if words and stream_format != "sse":
        # Silently dropping them would look like speech without words; a raw body has no room for them.
        raise ApiError(
            400,
            f"'{WORDS_FIELD}' needs 'stream_format': 'sse': word timing comes as events, and a raw "
            "audio body has no place for them",
            param=WORDS_FIELD,
            code="invalid_value",
        )
    return SpeechRequest(model, text, voice, response_format, speed, stream_format, instructions, words)


def _core(request: web.Request) -> SynthesisCore:
    core = loaded_core(request.app)
    if core is None:
        raise ApiError(
            503,
            "the model is still loading; retry shortly",
            type_="server_error",
            code="model_loading",
            retry_after_s=1,
        )
    return core


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    return body


def _shutting_down(message: str) -> ApiError:
    """The daemon is draining: a balancer or the SDK retries elsewhere or later."""
    return ApiError(503, message, type_="server_error", code="shutting_down", retry_after_s=5)


def _refused(exc: RequestRefused) -> ApiError:
    if exc.code is ErrorCode.SHUTTING_DOWN:
        return _shutting_down(exc.message)
    if exc.code is ErrorCode.OVERLOADED:
        return _overloaded(exc.message, exc.retry_after_s)
    return ApiError(400, exc.message, code=exc.code.value)


def _overloaded(message: str, retry_after_s: int | None) -> ApiError:
    """At measured capacity: a balancer or the SDK's retries try again later or elsewhere."""
    return ApiError(503, message, type_="server_error", code="overloaded", retry_after_s=retry_after_s or 1)


async def create_speech(request: web.Request) -> web.StreamResponse:
    try:
        return await _create_speech(request)
    except ApiError as exc:
        return exc.response()


async def _create_speech(request: web.Request) -> web.StreamResponse:
    core = _core(request)
    settings = request.app[CONFIG].openai
    speech = parse_speech_request(
        await _read_body(request, settings.max_body_bytes),
        # The whole input is taken at once, so the text budget bounds it too.
        max_input_chars=min(settings.max_input_chars, core.config.limits.max_buffered_text_chars),
        voices=core.backend.voice_names,
        voice_map=settings.voices,
        default_voice=core.default_voice,
    )
    stream = EventStream(STREAM_BUFFER_BYTES, core.pipeline.wake)
    try:
        session = core.admit(stream, max_utterances=1)
    except Busy as exc:
        if core.closing:
            raise _shutting_down(str(exc)) from exc
        raise ApiError(
            429,
            f"the daemon is busy: {exc}",
            type_="rate_limit_error",
            code="overloaded",
            retry_after_s=exc.retry_after_s,
        ) from exc
    try:
        try:
            utterance = session.open(
                UTTERANCE,
                voice=speech.voice,
                lang=core.backend.language_for(speech.voice),
                speed=speech.speed,
                encoder=lambda: open_container_encoder(speech.response_format),  # 24 kHz, as OpenAI documents
                sample_rate=core.backend.sample_rate,
                words=speech.words,
            )
            utterance.feed(speech.input)
            utterance.end()
        except RequestRefused as exc:
            raise _refused(exc) from exc
        return await _respond(request, speech, stream, core.config.limits.send_timeout_s)
    finally:
        session.close()  # a reader that left mid-stream: its work leaves every stage now


async def _first_audio(events: EventStream) -> list[Event]:
    """Events up to the first audio bytes, or to the end: headers wait for them."""
    pending: list[Event] = []
    while True:
        event = await events.next()
        pending.append(event)
        if isinstance(event, Finished) or (isinstance(event, AudioChunk) and event.data):
            return pending


async def _respond(
    request: web.Request, speech: SpeechRequest, events: EventStream, send_timeout_s: float
) -> web.StreamResponse:
    pending = await _first_audio(events)
    failure = next((event for event in pending if isinstance(event, Failed)), None)
    if failure is not None:
        if failure.code is ErrorCode.SHUTTING_DOWN:
            raise _shutting_down(failure.message)
        if failure.code is ErrorCode.OVERLOADED:
            # Waited for admission (limits.admission = "queue") and got no place in time.
            raise _overloaded(failure.message, failure.retry_after_s)
        raise ApiError(500, failure.message, type_="server_error", code=failure.code.value)
    sse = speech.stream_format == "sse"
    content_type = "text/event-stream" if sse else CONTENT_TYPES[speech.response_format]
    response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    samples = 0
    # Word times on the decoded audio's clock: decoders play the codec's priming first.
    lead_ms = DECODER_LEAD_SAMPLES.get(speech.response_format, 0) * 1000 / MODEL_RATE

    async def send(data: bytes) -> None:
        # A reader that takes nothing for this long is gone: give its place back.
        async with asyncio.timeout(send_timeout_s):
            await response.write(data)

    async def handle(event: Event) -> bool:
        nonlocal samples
        if isinstance(event, AudioChunk):
            samples += event.samples
            if event.data:
                await send(
                    _sse({"type": "speech.audio.delta", "audio": _b64(event.data)}) if sse else event.data
                )
        elif isinstance(event, SegmentWords):
            if sse and event.words:  # a segment with nothing to time gets no event
                await send(_sse(words_event(event.words, lead_ms)))
        elif isinstance(event, Failed):
            logger.warning("speech request failed after its first audio: %s", event.message)
            if sse:
                await send(
                    _sse({"type": "error", "error": {"message": event.message, "code": event.code.value}})
                )
        elif isinstance(event, Finished):
            return event.reason is DoneReason.END
        return True

    finished_cleanly = True
    try:
        for event in pending:
            finished_cleanly = await handle(event)
        if not isinstance(pending[-1], Finished):
            async for event in events:
                finished_cleanly = await handle(event)
    except (TimeoutError, ConnectionError) as exc:
        # A reader that stopped reading, or left: nothing more can reach it.
        logger.info("speech response abandoned: %s", exc.__class__.__name__)
        finished_cleanly = False
    if not finished_cleanly:
        # Cut off: a body that ends cleanly would pass for the whole speech.
        if request.transport is not None:
            request.transport.close()
        return response
    if sse:
        input_tokens = len(speech.input)
        output_tokens = round(samples / 480)  # 20 ms of 24 kHz audio per output token
        usage = {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        }
        await send(_sse({"type": "speech.audio.done", "usage": usage}))
    await response.write_eof()
    return response


def words_event(words: Sequence[WordTiming], lead_ms: float = 0.0) -> dict[str, Any]:
    """The SSE event for one segment's words: times moved by `lead_ms` onto the decoded audio's clock,
    character spans as the core gives them (code points of `input`)."""
    return {
        "type": "speech.audio.words",
        "words": [
            {
                "word": w.word,
                "start_ms": round(w.start_ms + lead_ms, 1),
                "end_ms": round(w.end_ms + lead_ms, 1),
                "char_start": w.char_start,
                "char_end": w.char_end,
            }
            for w in words
        ],
    }


def _sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _model_ids(request: web.Request) -> list[str]:
    """The backend's own name (once loaded), then OpenAI's: any of them is accepted as `model`."""
    core = loaded_core(request.app)
    return ([core.backend.model_id] if core else []) + list(MODEL_ALIASES)


async def list_models(request: web.Request) -> web.Response:
    data = [{"id": i, "object": "model", "created": 0, "owned_by": "speakd"} for i in _model_ids(request)]
    return web.json_response({"object": "list", "data": data})


async def list_audio_models(request: web.Request) -> web.Response:
    return web.json_response({"models": [{"id": i, "name": i} for i in _model_ids(request)]})


async def list_voices(request: web.Request) -> web.Response:
    try:
        core = _core(request)
    except ApiError as exc:
        return exc.response()
    return web.json_response({"voices": [{"id": name, "name": name} for name in core.backend.voice_names]})


PUBLIC_PATHS = frozenset({"/v1/models", "/v1/audio/models", "/v1/audio/voices"})
"""Listings Open WebUI fetches without credentials; they reveal nothing but voice and model names."""


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/audio/speech", create_speech)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/audio/models", list_audio_models)
    app.router.add_get("/v1/audio/voices", list_voices)
