"""`Connection` driven through a fake WebSocket: typed errors, recovery, and bounded memory.

The pipeline is the real one with a fake G2P and engine, so audio really flows (as PCM16) and a
cancel really reaches the stages; only the socket and the model are stand-ins.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest
from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from speakd.protocol import (
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
    Segment,
    ServerMessage,
    Start,
    Started,
    Text,
    decode_server,
    encode,
)
from speakd.server.config import load_config
from speakd.server.engines.kokoro.engine import SAMPLES_PER_FRAME, AcousticFeatures, AcousticRequest
from speakd.server.engines.kokoro.g2p import EnglishG2P, PhonemeChunk
from speakd.server.engines.kokoro.voices import STYLE_DIM, VoiceBank
from speakd.server.frontends.websocket import Connection
from speakd.server.metrics import SpeakdMetrics
from speakd.server.pipeline.pipeline import EncodedSegment, Job, Pipeline

VOICE = "af_fake"


def pcm_start(context: str) -> Start:
    """A start asking for PCM16 at 24 kHz in 20 ms frames: 480 samples, 960 bytes a frame."""
    return Start(context=context, codec=AudioCodec.PCM16, sample_rate=24000, frame_ms=20)


# -- fakes ------------------------------------------------------------------------------------------


def _g2p(text: str, lang: str = "en-us") -> list[PhonemeChunk]:
    return [PhonemeChunk(text, text, tuple(range(1, len(text) + 1)))]


class FakeEngine:
    """Every segment is `frames` acoustic frames (600 samples each) of a quiet constant tone."""

    def __init__(self, frames: int = 4) -> None:
        self.frames = frames

    def acoustic(self, batch: Sequence[AcousticRequest]) -> list[AcousticFeatures]:
        out = []
        for request in batch:
            durations = np.zeros(len(request.tokens) + 2, np.int64)
            durations[1] = self.frames
            curve = np.zeros((1, 2 * self.frames), np.float32)
            asr = np.zeros((1, 1, self.frames), np.float32)
            out.append(AcousticFeatures(asr, curve, curve, request.style, durations))
        return out

    def vocode(self, batch: Sequence[AcousticFeatures]) -> list[npt.NDArray[np.float32]]:
        return [np.full(f.frames * SAMPLES_PER_FRAME, 0.1, np.float32) for f in batch]


def _binary(msg: ClientMessage) -> WSMessage:
    return WSMessage(WSMsgType.BINARY, encode(msg), None)


class FakeWebSocket:
    """The part of `web.WebSocketResponse` a Connection uses.

    `script` is handed out without suspending (a client that bursts its messages), then `inbox` is
    awaited. With `reads=False` no `send_bytes` ever completes; with `close_hangs` neither does `close`.
    """

    def __init__(self, *, reads: bool = True, close_hangs: bool = False) -> None:
        self.script: deque[WSMessage] = deque()
        self.inbox: asyncio.Queue[WSMessage] = asyncio.Queue()
        self.received: list[ServerMessage] = []
        self.send_calls = 0
        self.close_codes: list[int] = []
        self._reads = reads
        self._close_hangs = close_hangs
        self._never = asyncio.Event()

    async def receive(self, timeout: float | None = None) -> WSMessage:  # aiohttp's signature
        if self.script:
            return self.script.popleft()
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def send_bytes(self, data: bytes) -> None:
        self.send_calls += 1
        if not self._reads:
            await self._never.wait()
        self.received.append(decode_server(data))

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"") -> bool:
        self.close_codes.append(code)
        if self._close_hangs:
            await self._never.wait()
        self.hang_up()
        return True

    def exception(self) -> BaseException | None:
        return None

    def hang_up(self) -> None:
        self.inbox.put_nowait(WSMessage(WSMsgType.CLOSED, None, None))


class FakeTransport(asyncio.Transport):
    def __init__(self, ws: FakeWebSocket) -> None:
        super().__init__()
        self.ws = ws
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        self.ws.hang_up()


@dataclass
class Client:
    ws: FakeWebSocket
    conn: Connection
    task: asyncio.Task[None]
    outbound_sizes: list[int]
    cursor: int = 0

    def send(self, msg: ClientMessage) -> None:
        self.ws.inbox.put_nowait(_binary(msg))

    def send_frame(self, kind: WSMsgType, data: str | bytes) -> None:
        self.ws.inbox.put_nowait(WSMessage(kind, data, None))

    async def recv(self, limit_s: float = 5.0) -> ServerMessage:
        """The next message the connection sent, in order."""
        deadline = time.monotonic() + limit_s
        while len(self.ws.received) <= self.cursor:
            assert time.monotonic() < deadline, f"nothing arrived; so far {self.ws.received}"
            await asyncio.sleep(0.002)
        self.cursor += 1
        return self.ws.received[self.cursor - 1]

    async def until(self, kind: type[ServerMessage], context: str) -> Any:
        """Skip ahead to the next message of `kind` for `context`."""
        while True:
            msg = await self.recv()
            if isinstance(msg, kind) and msg.context == context:
                return msg

    async def expect_error(self, code: ErrorCode, context: str | None) -> Error:
        msg = await self.recv()
        assert isinstance(msg, Error), msg
        assert (msg.code, msg.context) == (code, context), msg
        assert msg.message
        return msg

    async def speak(self, context: str, text: str) -> tuple[list[ServerMessage], Done]:
        """Start `context`, say `text`, end it; the messages that came for it and its `done`."""
        self.send(pcm_start(context))
        started = await self.recv()
        assert isinstance(started, Started) and started.context == context, started
        assert started.voice == VOICE
        self.send(Text(context=context, text=text))
        self.send(End(context=context))
        got: list[ServerMessage] = []
        while not isinstance(msg := await self.recv(), Done) or msg.context != context:
            if msg.context == context:
                got.append(msg)
        return got, msg


@dataclass
class Server:
    pipeline: Pipeline
    engine: FakeEngine
    metrics: SpeakdMetrics
    voices: VoiceBank
    clients: list[Client]

    def connect(
        self, overrides: dict[str, object] | None = None, *, reads: bool = True, close_hangs: bool = False
    ) -> Client:
        config = load_config(overrides={"model.default_voice": VOICE, **(overrides or {})})
        ws = FakeWebSocket(reads=reads, close_hangs=close_hangs)
        conn = Connection(
            cast(web.WebSocketResponse, ws),
            FakeTransport(ws),
            pipeline=self.pipeline,
            voices=self.voices,
            config=config,
            metrics=self.metrics,
        )
        sizes: list[int] = []
        send = conn._send

        def recording_send(owner: Job | None, msg: ServerMessage) -> bool:
            queued = send(owner, msg)
            sizes.append(conn._outbound.size)
            return queued

        conn._send = recording_send  # type: ignore[method-assign]
        client = Client(ws, conn, asyncio.create_task(conn.serve()), sizes)
        self.clients.append(client)
        return client


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    metrics = SpeakdMetrics()
    rng = np.random.default_rng(3)
    voices = VoiceBank(
        {name: rng.standard_normal((4, STYLE_DIM)).astype(np.float32) for name in (VOICE, "x")}
    )
    engine = FakeEngine()
    pipeline = Pipeline(
        g2p=cast(EnglishG2P, _g2p), engine=engine, voices=voices, metrics=metrics, lane_limit=4
    )
    await pipeline.start()
    s = Server(pipeline, engine, metrics, voices, [])
    try:
        yield s
    finally:
        for client in s.clients:
            client.ws.hang_up()
        await asyncio.wait_for(asyncio.gather(*(c.task for c in s.clients), return_exceptions=True), 5)
        await pipeline.close()


async def wait_until(condition: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


async def assert_still_serves(client: Client, context: str = "after") -> None:
    """A fresh context on the same connection is started, spoken and ended normally."""
    got, done = await client.speak(context, "Still working fine.")
    assert not [m for m in got if isinstance(m, Error)]
    assert done.reason is DoneReason.END and done.segments == 1
    assert [m.text for m in got if isinstance(m, Segment)] == ["Still working fine."]
    audio = [m for m in got if isinstance(m, Audio)]
    assert [a.seq for a in audio] == list(range(5)) and all(len(a.data) == 960 for a in audio)
    assert done.audio_ms == pytest.approx(100.0)


# -- bounded memory ---------------------------------------------------------------------------------


async def test_non_reading_client_overflows_into_overloaded(server: Server) -> None:
    limit = 20_000
    server.engine.frames = 40  # a second per segment: 50 PCM frames of ~1 kB each
    hog = server.connect({"limits.max_outbound_bytes": limit, "limits.send_timeout_s": 60.0}, reads=False)
    texts = [Text(context="hog", text=f"Sentence number {i} is right here. ") for i in range(40)]
    hog.ws.script.extend(_binary(m) for m in [pcm_start("hog"), *texts, End(context="hog")])
    await wait_until(lambda: "hog" in hog.conn._contexts)
    job = hog.conn._contexts["hog"].job
    await wait_until(lambda: not hog.conn._contexts)

    # The buffer filled up to the limit, never past it but for the overloaded error itself.
    assert limit - 2000 < max(hog.outbound_sizes) <= limit + 400, max(hog.outbound_sizes)
    queued = [decode_server(data) for _, _, data in hog.conn._outbound.frames]
    assert len(queued) == 2, queued  # the context's audio was taken back
    error, done = queued
    assert isinstance(error, Error) and (error.code, error.context) == (ErrorCode.OVERLOADED, "hog")
    assert isinstance(done, Done) and (done.context, done.reason) == ("hog", DoneReason.ERROR)
    assert hog.conn._outbound.size == sum(len(encode(m)) for m in queued)
    assert hog.ws.send_calls == 1  # only `started` ever reached the (stuck) socket
    assert job.cancelled
    await wait_until(lambda: server.pipeline.depths() == dict.fromkeys(Pipeline.STAGES, 0))
    assert server.metrics.errors.labels(code="overloaded").value == 1.0
    assert server.metrics.contexts.value == 0.0

    # The shared pipeline goes on serving a client that reads.
    server.engine.frames = 4
    await assert_still_serves(server.connect())


async def test_stalled_send_closes_the_connection(server: Server) -> None:
    stuck = server.connect({"limits.send_timeout_s": 0.2}, reads=False, close_hangs=True)
    stuck.send(Start(context="a"))
    stuck.send(Text(context="a", text="Some words that will never be heard."))
    await wait_until(lambda: "a" in stuck.conn._contexts)
    job = stuck.conn._contexts["a"].job
    await asyncio.wait_for(stuck.task, 5)  # `close` hangs too, so the transport is aborted
    assert stuck.ws.close_codes == [WSCloseCode.POLICY_VIOLATION]
    transport = stuck.conn._transport
    assert isinstance(transport, FakeTransport) and transport.aborted
    assert job.cancelled and not stuck.conn._contexts
    assert server.metrics.contexts.value == 0.0


async def test_segment_in_parts_is_announced_once(server: Server) -> None:
    server.engine.frames = 40  # long enough for the first segment to be vocoded in two windows
    client = server.connect()
    parts: list[int] = []
    deliver = client.conn.deliver

    def counting_deliver(job: Job, segment: EncodedSegment) -> None:
        parts.append(segment.index)
        deliver(job, segment)

    client.conn.deliver = counting_deliver  # type: ignore[method-assign]
    got, done = await client.speak("a", "A first sentence. And a second one.")
    assert parts == [0, 0, 1]  # only a context's first segment is vocoded in windows
    segments = [m for m in got if isinstance(m, Segment)]
    assert [(s.segment, s.text) for s in segments] == [(0, "A first sentence."), (1, "And a second one.")]
    assert [s.start_ms for s in segments] == [0.0, 1000.0]
    audio = [m for m in got if isinstance(m, Audio)]
    assert [a.seq for a in audio] == list(range(100))
    assert [a.segment for a in audio] == [0] * 50 + [1] * 50
    # Each segment's audio directly follows its announcement.
    assert got.index(segments[1]) == got.index(audio[49]) + 1
    assert (done.reason, done.segments, done.audio_ms) == (DoneReason.END, 2, 2000.0)


# -- typed errors, each leaving the connection usable ---------------------------------------------------


async def test_text_frame_is_a_bad_message(server: Server) -> None:
    client = server.connect()
    client.send_frame(WSMsgType.TEXT, '{"type": "start"}')
    error = await client.expect_error(ErrorCode.BAD_MESSAGE, None)
    assert error.message == TEXT_FRAME_MESSAGE
    await assert_still_serves(client)
    assert server.metrics.errors.labels(code="bad_message").value == 1.0


async def test_unknown_or_ended_context(server: Server) -> None:
    client = server.connect()
    client.send(Text(context="ghost", text="Boo."))
    await client.expect_error(ErrorCode.UNKNOWN_CONTEXT, "ghost")
    client.send(Cancel(context="ghost"))
    await client.expect_error(ErrorCode.UNKNOWN_CONTEXT, "ghost")
    # After `end`, the context takes no more text, though it is still open until `done`.
    client.send(pcm_start("a"))
    client.send(Text(context="a", text="Last words."))
    client.send(End(context="a"))
    client.send(Text(context="a", text="Too late."))
    assert isinstance(await client.recv(), Started)
    error = await client.expect_error(ErrorCode.UNKNOWN_CONTEXT, "a")
    assert "ended" in error.message
    done = await client.until(Done, "a")
    assert done.reason is DoneReason.END and done.segments == 1
    await assert_still_serves(client)


async def test_duplicate_start_keeps_the_original_context(server: Server) -> None:
    client = server.connect()
    client.send(pcm_start("a"))
    assert isinstance(await client.recv(), Started)
    client.send(Start(context="a", voice="x"))
    await client.expect_error(ErrorCode.DUPLICATE_CONTEXT, "a")
    client.send(Text(context="a", text="The first one goes on."))
    client.send(End(context="a"))
    segment = await client.until(Segment, "a")
    assert segment.text == "The first one goes on."
    done = await client.until(Done, "a")
    assert done.reason is DoneReason.END and done.segments == 1
    await assert_still_serves(client)


async def test_too_many_contexts(server: Server) -> None:
    client = server.connect({"limits.max_contexts_per_connection": 2})
    for name in ("a", "b"):
        client.send(Start(context=name))
        assert isinstance(await client.recv(), Started)
    client.send(Start(context="c"))
    error = await client.expect_error(ErrorCode.TOO_MANY_CONTEXTS, "c")
    assert "2" in error.message
    client.send(Cancel(context="a"))
    done = await client.recv()
    assert isinstance(done, Done) and (done.context, done.reason) == ("a", DoneReason.CANCEL)
    await assert_still_serves(client, "c")


async def test_text_over_the_buffer_limit_is_refused(server: Server) -> None:
    client = server.connect({"limits.max_buffered_text_chars": 40})
    client.send(pcm_start("a"))
    assert isinstance(await client.recv(), Started)
    first = "twenty nine characters of it"  # no sentence end: stays buffered in the segmenter
    client.send(Text(context="a", text=first))
    client.send(Text(context="a", text=" and twelve more"))
    error = await client.expect_error(ErrorCode.TEXT_TOO_LONG, "a")
    assert "40" in error.message
    # The refused text is dropped, the rest of the context is intact.
    client.send(Text(context="a", text=" ok."))
    client.send(End(context="a"))
    segment = await client.until(Segment, "a")
    assert segment.text == first + " ok."
    done = await client.until(Done, "a")
    assert done.reason is DoneReason.END
    await assert_still_serves(client)


async def test_oversized_message_is_refused(server: Server) -> None:
    client = server.connect({"limits.max_message_bytes": 256})
    client.send(Text(context="a", text="x" * 300))
    error = await client.expect_error(ErrorCode.MESSAGE_TOO_LARGE, None)
    assert "256" in error.message
    await assert_still_serves(client)


async def test_unknown_voice(server: Server) -> None:
    client = server.connect()
    client.send(Start(context="v", voice="nobody"))
    error = await client.expect_error(ErrorCode.UNKNOWN_VOICE, "v")
    assert VOICE in error.message
    await assert_still_serves(client, "v")


async def test_unsupported_language(server: Server) -> None:
    client = server.connect()
    client.send(Start(context="v", lang="fr"))
    error = await client.expect_error(ErrorCode.INVALID_PARAM, "v")
    assert "fr" in error.message
    await assert_still_serves(client, "v")


async def test_idle_connection_is_closed(server: Server) -> None:
    client = server.connect({"limits.idle_timeout_s": 0.05})
    await client.expect_error(ErrorCode.IDLE_TIMEOUT, None)
    await asyncio.wait_for(client.task, 5)
    assert client.ws.close_codes == [WSCloseCode.POLICY_VIOLATION]


async def test_a_bug_while_handling_a_request_costs_only_that_request(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = server.connect()

    def broken_encoder(*args: object, **kwargs: object) -> None:
        raise RuntimeError("encoder bug")

    with monkeypatch.context() as patch:
        patch.setattr("speakd.server.frontends.websocket.make_encoder", broken_encoder)
        client.send(Start(context="v"))
        error = await client.expect_error(ErrorCode.INTERNAL, "v")
    assert "encoder bug" not in error.message  # internals stay in the log
    await assert_still_serves(client, "v")
