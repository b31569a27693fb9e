"""The OpenAI door's request validation and voice resolution, its answers while the model loads, and a
request that waits for admission (queue mode)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest
from aiohttp import ClientTimeout, web
from aiohttp.test_utils import TestClient, TestServer
from audio_decode import decode
from core_fakes import VOICE, GatedEngine, running_core

from speakd.protocol import WordTiming
from speakd.server import app as app_module
from speakd.server.audio.containers import DECODER_LEAD_SAMPLES, FORMATS, open_container_encoder
from speakd.server.audio.encoders import MODEL_RATE, Pcm16FrameEncoder
from speakd.server.config import load_config
from speakd.server.core.event_stream import EventStream
from speakd.server.core.synthesis import SynthesisCore
from speakd.server.core.utterance import Utterance
from speakd.server.engines.backend import SpeechBackend
from speakd.server.frontends.keys import CONFIG, LOADER
from speakd.server.frontends.openai_speech import (
    ApiError,
    SpeechRequest,
    add_routes,
    parse_speech_request,
    resolve_voice,
    words_event,
)
from speakd.server.pipeline.capacity import CapacityMeter

AppClient = TestClient[web.Request, web.Application]
VOICES = ["af_alloy", "am_echo", "jf_alpha", "jf_gongitsune"]


def parse(**fields: object) -> SpeechRequest:
    body = {"model": "tts-1", "voice": "alloy", "input": "Hello.", **fields}
    return parse_speech_request(
        json.dumps(body).encode(),
        max_input_chars=100,
        voices=VOICES,
        voice_map={"shimmer": "jf_alpha", "ash": "nobody"},
        default_voice="jf_gongitsune",
    )


def test_defaults_and_a_full_request() -> None:
    request = parse()
    assert request.voice == "af_alloy"  # a voice of the model named *_alloy
    assert (request.response_format, request.speed, request.stream_format) == ("mp3", 1.0, "audio")
    full = parse(
        voice={"id": "jf_alpha"}, response_format="pcm", speed=2, stream_format="sse", instructions="x"
    )
    assert (full.voice, full.response_format, full.speed, full.stream_format) == (
        "jf_alpha",
        "pcm",
        2.0,
        "sse",
    )


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("jf_alpha", "jf_alpha"),  # the model's own name first
        ("shimmer", "jf_alpha"),  # then the configured map
        ("echo", "am_echo"),  # then *_<name>
        ("nova", "jf_gongitsune"),  # then, for an OpenAI name, the default voice
        ("ash", None),  # a mapping to a voice the model lacks is not silently replaced
        ("nobody", None),
    ],
)
def test_voice_resolution(requested: str, expected: str | None) -> None:
    mapping = {"shimmer": "jf_alpha", "ash": "nobody"}
    assert resolve_voice(requested, VOICES, mapping, "jf_gongitsune") == expected


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"input": None}, "input", "missing_required_parameter"),
        ({"model": None}, "model", "missing_required_parameter"),
        ({"voice": None}, "voice", "missing_required_parameter"),
        ({"input": 5}, "input", "invalid_type"),
        ({"input": "   "}, "input", "empty_input"),
        ({"input": "x" * 101}, "input", "string_above_max_length"),
        ({"voice": "nobody"}, "voice", "invalid_voice"),
        ({"voice": 3}, "voice", "invalid_type"),
        ({"response_format": "ogg"}, "response_format", "invalid_value"),
        ({"speed": 0.2}, "speed", "invalid_value"),
        ({"speed": True}, "speed", "invalid_type"),
        ({"speed": "fast"}, "speed", "invalid_type"),
        ({"stream_format": "chunks"}, "stream_format", "invalid_value"),
        ({"instructions": "x" * 5000}, "instructions", "string_above_max_length"),
        ({"speakd_words": 1, "stream_format": "sse"}, "speakd_words", "invalid_type"),
        ({"speakd_words": "true", "stream_format": "sse"}, "speakd_words", "invalid_type"),
        ({"speakd_words": {"on": True}, "stream_format": "sse"}, "speakd_words", "invalid_type"),
        # Raw audio has no place for word events: asked for there, it is an error, not silence.
        ({"speakd_words": True}, "speakd_words", "invalid_value"),
        ({"speakd_words": True, "stream_format": "audio"}, "speakd_words", "invalid_value"),
    ],
)
def test_a_known_field_with_a_wrong_type_or_value_is_a_400(
    fields: dict[str, object], param: str, code: str
) -> None:
    with pytest.raises(ApiError) as raised:
        parse(**fields)
    assert (raised.value.status, raised.value.param, raised.value.code) == (400, param, code)


def test_word_timing_is_asked_for_with_a_boolean_and_sse() -> None:
    assert parse(speakd_words=True, stream_format="sse").words is True
    assert parse(speakd_words=False, stream_format="sse").words is False
    assert parse(speakd_words=False).words is False  # false asks for nothing, so raw audio is fine
    assert parse(speakd_words=None).words is False
    assert parse(stream_format="sse").words is False
    assert parse(words=True, stream_format="sse").words is False  # not speakd's name: ignored as before


def test_a_words_event_moves_times_onto_the_decoded_clock_and_keeps_char_spans() -> None:
    words = (WordTiming(word="Hello", start_ms=12.5, end_ms=300.0, char_start=0, char_end=5),)
    assert words_event(words, 46.04) == {
        "type": "speech.audio.words",
        "words": [{"word": "Hello", "start_ms": 58.5, "end_ms": 346.0, "char_start": 0, "char_end": 5}],
    }
    assert words_event(words)["words"][0]["start_ms"] == 12.5


@pytest.mark.parametrize("response_format", FORMATS)
def test_the_decoder_lead_is_where_a_real_decoder_puts_the_audio(response_format: str) -> None:
    """A click at 500 ms into the encoder is found by FFmpeg's decoder at 500 ms plus the lead the door
    adds to word times: the table matches the encoders as they are configured."""
    click_at = MODEL_RATE // 2
    audio = np.zeros(MODEL_RATE, np.float32)
    ramp = np.arange(240)
    audio[click_at : click_at + 240] = 0.8 * np.sin(2 * np.pi * ramp / 24) * np.hanning(240)
    encoder = open_container_encoder(response_format)
    # In two pieces, as the pipeline feeds it: the lead must not depend on how the audio arrives.
    frames = encoder.encode(audio[:7000], end_of_segment=False)
    frames += encoder.encode(audio[7000:], end_of_segment=True)
    body = b"".join(frame.data for frame in frames + encoder.finish())
    decoded = decode(body, response_format).astype(np.float32) / 32767
    probe = audio[click_at - 100 : click_at + 340]
    found = int(np.argmax(np.correlate(decoded, probe, "valid"))) + 100
    assert found - click_at == DECODER_LEAD_SAMPLES.get(response_format, 0)


def test_unknown_fields_are_ignored_and_bad_json_is_a_400() -> None:
    assert parse(stream=True, lang_code="a", extra={"x": 1}).voice == "af_alloy"
    with pytest.raises(ApiError) as raised:
        parse_speech_request(
            b"[1, 2]", max_input_chars=10, voices=VOICES, voice_map={}, default_voice="jf_alpha"
        )
    assert raised.value.code == "invalid_json"


@pytest.fixture
async def loading_app(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[AppClient, threading.Event]]:
    """The real app whose model never finishes loading until the test says so."""
    release = threading.Event()

    def never_loads(config: object) -> SpeechBackend:
        release.wait(30)
        raise RuntimeError("model load abandoned by the test")

    monkeypatch.setattr(app_module, "load_backend", never_loads)
    server = TestServer(app_module.create_app(load_config(None)))
    client = TestClient(server)
    await client.start_server()
    try:
        yield client, release
    finally:
        release.set()
        await client.close()


async def test_while_loading_the_api_answers_503_with_retry_after(
    loading_app: tuple[AppClient, threading.Event],
) -> None:
    client, _ = loading_app
    body = {"model": "tts-1", "voice": "alloy", "input": "Hello."}
    response = await client.post("/v1/audio/speech", json=body)
    assert response.status == 503 and response.headers["Retry-After"] == "1"
    error = (await response.json())["error"]
    assert error["code"] == "model_loading" and set(error) == {"message", "type", "param", "code"}
    voices = await client.get("/v1/audio/voices")
    assert voices.status == 503
    models = await client.get("/v1/models")
    assert models.status == 200 and {"tts-1"} <= {m["id"] for m in (await models.json())["data"]}
    too_big = await client.post("/v1/audio/speech", data=b"x" * 100_000)
    assert too_big.status == 503  # loading is said first: nothing else can be done yet


# -- admission in queue mode: the request waits for a place ------------------------------------------


@asynccontextmanager
async def speech_app(core: SynthesisCore) -> AsyncIterator[AppClient]:
    """The speech door alone, on a loaded core; a client that hangs up cancels its handler, as in
    the daemon."""

    async def loaded() -> SynthesisCore:
        return core

    app = web.Application()
    app[CONFIG] = core.config
    app[LOADER] = asyncio.create_task(loaded())
    await app[LOADER]
    add_routes(app)
    client = TestClient(TestServer(app, handler_cancellation=True))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def hold_a_stream(core: SynthesisCore) -> Utterance:
    """A stream playing: its work sits in the pipeline behind the held vocoder."""
    session = core.admit(EventStream(1 << 20, core.pipeline.wake))
    utterance = session.open(
        "playing",
        voice=VOICE,
        lang="en-us",
        speed=1.0,
        encoder=lambda: Pcm16FrameEncoder(24000, 20),
        sample_rate=24000,
    )
    utterance.feed("Held in the vocoder. ")
    for _ in range(1000):
        if utterance.active:
            return utterance
        await asyncio.sleep(0.005)
    raise AssertionError("the stream never became active")


SPEECH = {"model": "tts-1", "voice": VOICE, "input": "Waiting for my turn.", "response_format": "pcm"}
QUEUE = {"limits.admission": "queue", "limits.admission_headroom": 1.0}


@pytest.fixture
def room_for_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CapacityMeter, "streams", lambda self: 1.5)


@pytest.mark.usefixtures("room_for_one")
async def test_a_queued_request_waits_for_a_place_then_streams_its_audio() -> None:
    engine = GatedEngine()
    async with running_core(QUEUE, engine=engine) as core, speech_app(core) as client:
        playing = await hold_a_stream(core)
        request = asyncio.create_task(client.post("/v1/audio/speech", json=SPEECH))
        for _ in range(200):
            if core.admission.queued:
                break
            await asyncio.sleep(0.005)
        assert core.admission.queued == 1
        await asyncio.sleep(0.2)
        assert not request.done()
        playing.cancel()
        engine.gate.set()
        response = await asyncio.wait_for(request, 10)
        assert response.status == 200 and len(await response.read()) > 0


@pytest.mark.usefixtures("room_for_one")
async def test_a_request_that_waits_too_long_gets_503_with_retry_after() -> None:
    engine = GatedEngine()
    async with (
        running_core({**QUEUE, "limits.admission_queue_timeout_s": 0.2}, engine=engine) as core,
        speech_app(core) as client,
    ):
        await hold_a_stream(core)
        response = await client.post("/v1/audio/speech", json=SPEECH)
        assert response.status == 503 and int(response.headers["Retry-After"]) >= 1
        error = (await response.json())["error"]
        assert error["code"] == "overloaded" and "retry in" in error["message"]
        assert core.admission.queued == 0 and core.sessions == 1
        engine.gate.set()


@pytest.mark.usefixtures("room_for_one")
async def test_a_client_that_hangs_up_while_queued_leaves_the_queue() -> None:
    engine = GatedEngine()
    async with running_core(QUEUE, engine=engine) as core, speech_app(core) as client:
        await hold_a_stream(core)
        with pytest.raises(TimeoutError):
            await client.post("/v1/audio/speech", json=SPEECH, timeout=ClientTimeout(total=0.3))
        for _ in range(400):
            if core.admission.queued == 0 and core.sessions == 1:
                break
            await asyncio.sleep(0.005)
        assert core.admission.queued == 0 and core.sessions == 1  # only the stream playing is left
        engine.gate.set()
