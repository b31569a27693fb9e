"""The OpenAI-compatible door and access tokens, end to end: a real daemon, the official `openai` SDK,
real decoders (FFmpeg through PyAV) and Whisper scoring what was said."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from audio_decode import RATE, decode
from daemon import Daemon, client, transcribe, word_errors
from websockets.exceptions import InvalidStatus

from speakd.protocol import AudioCodec, End, Start, Text

pytestmark = pytest.mark.e2e

TOKEN = "e2e-token-7Yq.Zr_4~k"
FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
# Harvard sentences, one per format and mode: the same text twice would hide a mix-up.
SENTENCES = [
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
    "The small pup gnawed a hole in the sock.",
    "The fish twisted and turned on the bent hook.",
]
LONG_TEXT = " ".join(SENTENCES * 3)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("openai")
    tokens = tmp / "tokens"
    # One plain token and one given only as its digest: both must work.
    tokens.write_text(f"# speakd tokens\n{TOKEN}\nsha256:{_sha256('second-token')}\n")
    tokens.chmod(0o600)
    config = f"""
[limits]
max_connections = 3
# Streams through both doors at once on purpose (fairness); admission has its own test.
admission_headroom = 0

[auth]
token_file = "{tokens}"
"""
    d = Daemon(tmp, model_cache, config)
    d.wait_ready()
    yield d
    assert d.stop() == 0, "".join(d.log)
    log = "".join(d.log)
    assert TOKEN not in log and "second-token" not in log and "wrong-token" not in log


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def sdk(daemon: Daemon, token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.http + "/v1", api_key=token, max_retries=0, timeout=120)


def raw(
    daemon: Daemon, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(daemon.http + path, data=body, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def assert_says(pcm: np.ndarray, text: str) -> None:
    assert len(pcm) > RATE // 2, len(pcm)
    heard = transcribe(pcm, RATE)
    errors, total = word_errors(text, heard)
    assert errors <= max(1, total // 4), (text, heard)


def assert_ends_cleanly(pcm: np.ndarray) -> None:
    """No click at the end: the last 10 ms are near silence, as the model's audio ends."""
    tail = np.abs(pcm[-RATE // 100 :].astype(np.int32))
    assert int(tail.max()) < 1500, int(tail.max())


def gauge(daemon: Daemon, name: str) -> float:
    status, _, body = raw(daemon, "GET", "/metrics")
    assert status == 200
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for_idle(daemon: Daemon, limit_s: float = 30.0) -> None:
    """Until no context, session or queued item is left; the limit only fires on a leak."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        names = ("speakd_contexts", "speakd_connections", "speakd_stage_queue_depth")
        if all(gauge(daemon, name) == 0 for name in names):
            return
        time.sleep(0.1)
    raise AssertionError({name: gauge(daemon, name) for name in names})


# -- every format, whole and streamed ---------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(FORMATS)), ids=FORMATS)
def test_each_format_whole_is_decodable_and_intelligible(daemon: Daemon, index: int) -> None:
    response_format, text = FORMATS[index], SENTENCES[index]
    speech = sdk(daemon).audio.speech.create(
        model="tts-1",
        voice="alloy",
        input=text,
        response_format=response_format,  # type: ignore[arg-type]
    )
    assert speech.response.headers["content-type"] == CONTENT_TYPES[response_format]
    pcm = decode(speech.content, response_format)
    assert_says(pcm, text)
    assert_ends_cleanly(pcm)


@pytest.mark.parametrize("index", range(len(FORMATS)), ids=FORMATS)
def test_each_format_streamed_arrives_in_pieces_and_joins_up(daemon: Daemon, index: int) -> None:
    response_format = FORMATS[index]
    text = SENTENCES[6 + index] + " " + SENTENCES[index]
    with sdk(daemon).audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts",
        voice="jf_gongitsune",  # a speakd voice by its own name
        input=text,
        response_format=response_format,  # type: ignore[arg-type]
        instructions="Speak calmly.",  # accepted; Kokoro has no instruction control
    ) as response:
        assert response.headers["content-type"] == CONTENT_TYPES[response_format]
        assert response.headers.get("transfer-encoding") == "chunked"
        pieces = list(response.iter_bytes())
    body = b"".join(pieces)
    assert len(pieces) >= 2, "the body should arrive as the audio is made, not in one piece"
    if response_format == "wav":
        assert body[:4] == b"RIFF" and body[8:16] == b"WAVEfmt "
        assert body[4:8] == b"\xff\xff\xff\xff" and body[40:44] == b"\xff\xff\xff\xff"
    pcm = decode(body, response_format)
    assert_says(pcm, text)
    assert_ends_cleanly(pcm)


def test_sse_events_carry_the_audio_and_end_with_usage(daemon: Daemon) -> None:
    text = "The stray cat gave birth to kittens. The young girl gave no clear response."
    events = []
    with sdk(daemon).audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=text, response_format="pcm", stream_format="sse"
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    kinds = [event["type"] for event in events]
    assert kinds[-1] == "speech.audio.done" and set(kinds[:-1]) == {"speech.audio.delta"}
    assert len(kinds) > 2
    pcm = np.frombuffer(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]), "<i2")
    assert_says(pcm, text)
    usage = events[-1]["usage"]
    assert usage["input_tokens"] == len(text)
    assert usage["output_tokens"] == round(len(pcm) / 480)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


# -- speakd's extension: word timing in the SSE stream -------------------------------------------------

WORDS_TEXT = "Rice is often served in round bowls, isn't it? The juice of lemons makes fine punch."


def sse_events(daemon: Daemon, text: str, response_format: str, **extra: object) -> list[dict[str, Any]]:
    """Every event of an SSE speech response, in order, read through the SDK's streaming response."""
    events = []
    with sdk(daemon).audio.speech.with_streaming_response.create(
        model="tts-1",
        voice="alloy",
        input=text,
        response_format=response_format,  # type: ignore[arg-type]
        stream_format="sse",
        extra_body=extra,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    return events


def delta_bytes(events: list[dict[str, Any]]) -> bytes:
    return b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")


def test_sse_word_timing_comes_before_each_segments_audio_and_matches_the_input(daemon: Daemon) -> None:
    events = sse_events(daemon, WORDS_TEXT, "pcm", speakd_words=True)
    assert events[0]["type"] == "speech.audio.words", "the first segment's words come before any audio"
    assert events[-1]["type"] == "speech.audio.done"
    pcm = np.frombuffer(delta_bytes(events), "<i2")
    duration_ms = len(pcm) * 1000 / RATE
    assert_says(pcm, WORDS_TEXT)
    groups: list[list[dict[str, Any]]] = []
    heard_ms = 0.0  # pcm audio received so far, by its length
    for event in events:
        if event["type"] == "speech.audio.delta":
            heard_ms += len(base64.b64decode(event["audio"])) / 2 * 1000 / RATE
        elif event["type"] == "speech.audio.words":
            words = event["words"]
            assert words and set(event) == {"type", "words"}
            # Between segments: the previous segment's audio is all here, none of this one's yet.
            if groups:
                assert groups[-1][-1]["end_ms"] <= heard_ms + 0.1, (groups[-1][-1], heard_ms)
            assert heard_ms <= words[0]["start_ms"] + 0.1, (words[0], heard_ms)
            groups.append(words)
    assert len(groups) >= 2, "two sentences are two segments, each with its words"
    words = [word for group in groups for word in group]
    assert all(set(w) == {"word", "start_ms", "end_ms", "char_start", "char_end"} for w in words)
    for word in words:
        assert WORDS_TEXT[word["char_start"] : word["char_end"]] == word["word"], word
        assert 0 <= word["start_ms"] < word["end_ms"] <= duration_ms + 0.1, (word, duration_ms)
    for before, after in itertools.pairwise(words):
        assert before["end_ms"] <= after["start_ms"] and before["char_end"] <= after["char_start"]
    # Every word of the input once, in order, punctuation left out ("bowls," is "bowls").
    spans = [(m.start(), m.end()) for m in re.finditer(r"[\w']+", WORDS_TEXT)]
    assert [(w["char_start"], w["char_end"]) for w in words] == spans


def test_sse_word_times_are_on_each_formats_decoded_clock(daemon: Daemon) -> None:
    """The same words in pcm and in a compressed format: where a decoder's audio is late (mp3's and
    aac's priming), the words are late by as much; Ogg Opus's pre-skip is removed by the decoder."""
    text = "The juice of lemons makes fine punch."
    reference = sse_events(daemon, text, "pcm", speakd_words=True)
    reference_pcm = decode(delta_bytes(reference), "pcm").astype(np.float64)
    reference_starts = [w["start_ms"] for e in reference if "words" in e for w in e["words"]]
    for response_format in ("mp3", "aac", "opus"):
        events = sse_events(daemon, text, response_format, speakd_words=True)
        pcm = decode(delta_bytes(events), response_format).astype(np.float64)
        assert_says(pcm.astype(np.int16), text)
        lag_ms = _lag(pcm, reference_pcm) * 1000 / RATE  # how late this format's decoded audio is
        starts = [w["start_ms"] for e in events if "words" in e for w in e["words"]]
        assert len(starts) == len(reference_starts)
        shift = float(np.median(np.subtract(starts, reference_starts)))
        assert abs(shift - lag_ms) <= 1.0, (response_format, shift, lag_ms)
        assert all(0 <= start < len(pcm) * 1000 / RATE for start in starts)


def _lag(audio: np.ndarray, reference: np.ndarray, within: int = RATE // 5) -> int:
    """Samples by which `audio` trails `reference` (negative: leads), by cross-correlation."""
    size = 1 << (len(audio) + len(reference)).bit_length()
    spectrum = np.fft.rfft(audio, size) * np.conj(np.fft.rfft(reference, size))
    correlation = np.fft.irfft(spectrum, size)
    lags = np.concatenate([np.arange(0, within + 1), np.arange(-within, 0)])
    return int(lags[np.argmax(correlation[lags])])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"speakd_words": "yes", "stream_format": "sse"}, "expected a boolean"),
        ({"speakd_words": 1, "stream_format": "sse"}, "expected a boolean"),
        ({"speakd_words": True}, "needs 'stream_format': 'sse'"),
        ({"speakd_words": True, "stream_format": "audio"}, "needs 'stream_format': 'sse'"),
    ],
)
def test_bad_word_timing_requests_get_openai_errors(
    daemon: Daemon, extra: dict[str, object], message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(daemon).audio.speech.create(model="tts-1", voice="alloy", input="Hello.", extra_body=extra)
    assert raised.value.status_code == 400 and message in raised.value.message
    body = raised.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error" and body["param"] == "speakd_words"


def test_without_the_extension_sse_has_no_word_events(daemon: Daemon) -> None:
    events = sse_events(daemon, "Smoky fires lack flame and heat.", "pcm", speakd_words=False)
    assert {e["type"] for e in events} == {"speech.audio.delta", "speech.audio.done"}


def test_unknown_fields_from_other_clients_are_ignored(daemon: Daemon) -> None:
    speech = sdk(daemon).audio.speech.create(
        model="kokoro",
        voice="jm_kumo",
        input="Open the crate but don't break the glass.",
        response_format="pcm",
        speed=1.25,
        extra_body={"stream": True, "lang_code": "a", "normalization_options": {}},
    )
    assert_says(decode(speech.content, "pcm"), "Open the crate but don't break the glass.")


# -- errors, as the SDK's typed exceptions -------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"input": ""}, "'input' is empty"),
        ({"input": "x" * 4097}, "the limit is 4096"),
        ({"voice": "nobody"}, "unknown voice 'nobody'; valid voices: jf_alpha"),
        ({"response_format": "ogg"}, "use one of mp3, opus, aac, flac, wav, pcm"),
        ({"speed": 4.5}, "between 0.25 and 4.0"),
        ({"stream_format": "chunks"}, "'audio' or 'sse'"),
    ],
)
def test_bad_requests_raise_bad_request_error_with_speakds_message(
    daemon: Daemon, fields: dict[str, object], message: str
) -> None:
    request: dict[str, object] = {"model": "tts-1", "voice": "alloy", "input": "Hello.", **fields}
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(daemon).audio.speech.create(**request)  # type: ignore[arg-type]
    assert raised.value.status_code == 400
    assert message in raised.value.message
    body = raised.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error"


def test_a_body_that_is_not_json_or_too_big_gets_openai_errors(daemon: Daemon) -> None:
    status, headers, body = raw(daemon, "POST", "/v1/audio/speech", b"{not json")
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "invalid_json"
    with pytest.raises(openai.APIStatusError) as raised:
        sdk(daemon).audio.speech.create(
            model="tts-1", voice="alloy", input="Hi.", extra_body={"padding": "x" * 100_000}
        )
    assert raised.value.status_code == 413 and "larger than" in raised.value.message


def test_a_full_daemon_answers_429_with_retry_after(daemon: Daemon) -> None:
    async def hold_all_places() -> openai.RateLimitError:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with (
            client(daemon.url, additional_headers=headers),
            client(daemon.url, additional_headers=headers),
            client(daemon.url, additional_headers=headers),
        ):
            try:
                await asyncio.to_thread(
                    sdk(daemon).audio.speech.create, model="tts-1", voice="alloy", input="Hi."
                )
            except openai.RateLimitError as exc:
                return exc
        raise AssertionError("a fourth session was admitted past limits.max_connections = 3")

    error = asyncio.run(hold_all_places())
    assert error.status_code == 429 and error.response.headers["retry-after"] == "1"
    assert "busy" in error.message


# -- disconnects --------------------------------------------------------------------------------------


def test_a_reader_that_hangs_up_mid_stream_leaves_no_work_behind(daemon: Daemon) -> None:
    with sdk(daemon).audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=LONG_TEXT, response_format="pcm"
    ) as response:
        pieces = response.iter_bytes()  # kept: a dropped generator closes the response
        assert next(pieces)
        assert gauge(daemon, "speakd_contexts") == 1
        # The load signal sees the stream: one of the few this box keeps real time.
        assert 0 < gauge(daemon, "speakd_load") <= 1
    wait_for_idle(daemon)
    # and the daemon still serves
    speech = sdk(daemon).audio.speech.create(
        model="tts-1", voice="alloy", input="Still here.", response_format="pcm"
    )
    assert len(speech.content) > 0


# -- access tokens ------------------------------------------------------------------------------------


def test_http_needs_a_right_token_except_health_and_listings(daemon: Daemon) -> None:
    for token in (None, "wrong-token"):
        status, headers, body = raw(daemon, "POST", "/v1/audio/speech", b"{}", token=token)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
        assert raw(daemon, "GET", "/metrics", token=token)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        sdk(daemon, "wrong-token").audio.speech.create(model="tts-1", voice="alloy", input="Hi.")
    speech = sdk(daemon, "second-token").audio.speech.create(
        model="tts-1", voice="alloy", input="Hi there.", response_format="wav"
    )
    assert speech.content[:4] == b"RIFF"
    for path in ("/healthz", "/readyz", "/v1/models", "/v1/audio/voices", "/v1/audio/models"):
        assert raw(daemon, "GET", path, token=None)[0] == 200, path
    _, _, voices = raw(daemon, "GET", "/v1/audio/voices", token=None)
    assert {"id": "jf_alpha", "name": "jf_alpha"} in json.loads(voices)["voices"]
    models = sdk(daemon).models.list()
    assert {"kokoro", "tts-1"} <= {model.id for model in models}


async def _speak_over(url: str, **kwargs: object) -> str:
    async with client(url, **kwargs) as c:
        await c.send(Start(context="a", codec=AudioCodec.PCM16))
        await c.send(Text(context="a", text="The wide road shimmered in the hot sun."))
        await c.send(End(context="a"))
        await c.until_done("a")
        c.utterance("a").assert_complete("The wide road shimmered in the hot sun.", 1)
        return str(c.ws.subprotocol)


async def test_websockets_take_the_token_as_a_header_or_a_subprotocol(daemon: Daemon) -> None:
    assert await _speak_over(daemon.url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) == "None"
    assert await _speak_over(daemon.url, subprotocols=["speakd.v1", f"speakd.auth.{TOKEN}"]) == "speakd.v1"
    for kwargs in (
        {},
        {"additional_headers": {"Authorization": "Bearer wrong-token"}},
        {"subprotocols": ["speakd.v1", "speakd.auth.wrong-token"]},
    ):
        with pytest.raises(InvalidStatus) as refused:
            async with client(daemon.url, **kwargs):
                pass
        assert refused.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as cross_site:
        async with client(
            daemon.url,
            origin="https://evil.example",
            subprotocols=["speakd.v1", f"speakd.auth.{TOKEN}"],
        ):
            pass
    assert cross_site.value.response.status_code == 403


async def test_no_token_ever_reaches_the_log(daemon: Daemon) -> None:
    """Tokens right and wrong, in headers and subprotocols (alone, without speakd.v1, too): the log
    records the refusals and never a token."""
    offers = [[f"speakd.auth.{TOKEN}"], ["speakd.v1", "speakd.auth.wrong-token"], ["speakd.auth.wrong-token"]]
    for offer in offers:
        with contextlib.suppress(InvalidStatus):
            async with client(daemon.url, subprotocols=offer):
                pass
    raw(daemon, "POST", "/v1/audio/speech", b"{}", token="wrong-token")
    await asyncio.sleep(0.5)  # the log is read by a thread
    log = "".join(daemon.log)
    assert "wrong token" in log
    assert re.search(re.escape(TOKEN) + "|wrong-token|second-token", log) is None


async def test_a_long_http_request_does_not_starve_a_websocket_first_segment(daemon: Daemon) -> None:
    """Both doors share one pipeline and its fair queues: a WebSocket context that starts while a long
    speech request is being synthesized is spoken whole long before that request ends."""

    def long_request() -> int:
        with sdk(daemon).audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=LONG_TEXT, response_format="pcm"
        ) as response:
            return sum(len(piece) for piece in response.iter_bytes())

    long_task = asyncio.create_task(asyncio.to_thread(long_request))
    try:
        for _ in range(600):  # until the long request is being spoken; the bound only stops a hang
            if gauge(daemon, "speakd_contexts") >= 1:
                break
            await asyncio.sleep(0.05)
        text = "The wide road shimmered in the hot sun."
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with client(daemon.url, additional_headers=headers) as c:
            await c.send(Start(context="a", codec=AudioCodec.PCM16))
            await c.send(Text(context="a", text=text))
            await c.send(End(context="a"))
            await c.until_done("a")
            c.utterance("a").assert_complete(text, 1)
        assert not long_task.done(), "the long request should still be speaking"
    finally:
        body_bytes = await long_task
    assert body_bytes > 2 * 24000 * 60  # over a minute of audio: the whole long text


def test_listening_beyond_loopback_without_a_token_is_refused(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "speakd.server.cli", "serve", "--host", "0.0.0.0", "--port", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "refusing to listen on '0.0.0.0' without an access token" in result.stderr
    assert "--token-file" in result.stderr and "--allow-unauthenticated" in result.stderr
