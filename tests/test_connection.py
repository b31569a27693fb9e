"""`Connection` driven through a fake WebSocket: typed errors, recovery, and bounded memory.

The core and its pipeline are the real ones on a fake model (tests/core_fakes.py), so audio really
flows (as PCM16) and a cancel really reaches the stages; only the socket and the model are stand-ins.
State is read through public API only: the connection's `open_contexts`, `buffered_bytes` and
`queued_messages()`, the events it took from the core, the metrics, and the pipeline's depths and jobs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest
from aiohttp import WSCloseCode, WSMessage, WSMsgType, web
from core_fakes import VOICE, FakeBackend, FakeEngine, fake_voices

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
    Flush,
    Segment,
    ServerMessage,
    Start,
    Started,
    Text,
    decode_server,
    encode,
)
from speakd.server.audio.encoders import Frame, make_encoder
from speakd.server.config import load_config
from speakd.server.core.errors import Busy
from speakd.server.core.events import AudioChunk, Event, Finished, SegmentStarted
from speakd.server.core.synthesis import SynthesisCore
from speakd.server.core.utterance import Utterance
from speakd.server.engines.kokoro.engine import AcousticFeatures, AcousticRequest
from speakd.server.frontends.websocket import Connection
from speakd.server.metrics import SpeakdMetrics
from speakd.server.pipeline.capacity import CapacityMeter
from speakd.server.pipeline.job import AudioEncoder, Job
from speakd.server.pipeline.pipeline import Pipeline
from speakd.server.pipeline.stage import StageSpec


def pcm_start(context: str) -> Start:
    """A start asking for PCM16 at 24 kHz in 20 ms frames: 480 samples, 960 bytes a frame."""
    return Start(context=context, codec=AudioCodec.PCM16, sample_rate=24000, frame_ms=20)


# -- fakes ------------------------------------------------------------------------------------------


class HeldEngine(FakeEngine):
    """The fake model, whose acoustic pass can be held (a model slower than any test): `hold()` makes
    every pass wait, and set `holding`, until `release()`."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = threading.Event()
        self._open = threading.Event()
        self._open.set()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def acoustic(self, batch: Sequence[AcousticRequest]) -> list[AcousticFeatures]:
        if not self._open.is_set():
            self.holding.set()
        assert self._open.wait(60), "the test left the engine held"
        return super().acoustic(batch)


class RecordingPipeline(Pipeline):
    """The real pipeline; it remembers every job a door hands it, so a test can check the job's
    `cancelled` flag: the proof that a cancel reached the stages."""

    def __init__(self, *, stages: Sequence[StageSpec], metrics: SpeakdMetrics, lane_limit: int) -> None:
        super().__init__(stages=stages, metrics=metrics, lane_limit=lane_limit)
        self.jobs: list[Job] = []

    def job(self, context: str) -> Job:
        """The latest job of `context`."""
        jobs = [job for job in self.jobs if job.context == context]
        assert jobs, f"the pipeline never saw context {context!r}"
        return jobs[-1]

    def _saw(self, job: Job) -> None:
        if all(seen is not job for seen in self.jobs):
            self.jobs.append(job)

    def submit(self, job: Job, text: str, offset: int = 0) -> None:
        self._saw(job)
        super().submit(job, text, offset)

    def end(self, job: Job) -> None:
        self._saw(job)
        super().end(job)

    def cancel(self, job: Job) -> None:
        self._saw(job)
        super().cancel(job)


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


class RecordingConnection(Connection):
    """A Connection that notes each event the core gives it (through `emit`, its public EventSink
    entry point) and the size of its send buffer right after taking it."""

    def __init__(self, ws: FakeWebSocket, transport: FakeTransport, *, core: SynthesisCore) -> None:
        self.events: list[tuple[str, Event]] = []
        self.buffer_sizes: list[int] = []
        super().__init__(cast(web.WebSocketResponse, ws), transport, core=core)

    def emit(self, utterance: Utterance, event: Event) -> bool:
        queued = super().emit(utterance, event)
        self.events.append((utterance.name, event))
        self.buffer_sizes.append(self.buffered_bytes)
        return queued

    def finished(self, context: str) -> bool:
        return any(name == context and isinstance(event, Finished) for name, event in self.events)


class PartCountingEncoder:
    """Wraps a context's encoder and notes, for each waveform part it encodes, whether the part
    ends its segment: a segment rendered in windows reaches the encoder in several parts."""

    def __init__(self, inner: AudioEncoder, ends: list[bool]) -> None:
        self._inner = inner
        self._ends = ends
        self.pre_skip = inner.pre_skip

    def encode(self, audio24k: npt.NDArray[np.float32], *, end_of_segment: bool) -> list[Frame]:
        self._ends.append(end_of_segment)
        return self._inner.encode(audio24k, end_of_segment=end_of_segment)

    def finish(self) -> list[Frame]:
        return self._inner.finish()


# -- the fixture ------------------------------------------------------------------------------------


@dataclass
class Client:
    ws: FakeWebSocket
    transport: FakeTransport
    conn: RecordingConnection
    task: asyncio.Task[None]
    cursor: int = 0

    def send(self, msg: ClientMessage) -> None:
        self.ws.inbox.put_nowait(_binary(msg))

    def send_frame(self, kind: WSMsgType, data: str | bytes) -> None:
        self.ws.inbox.put_nowait(WSMessage(kind, data, None))

    async def recv(self, limit_s: float = 10.0) -> ServerMessage:
        """The next message the connection sent, in order; the limit only fires on a hang."""
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
    """One pipeline on the fake model; each connection gets a core of its own configuration on it."""

    pipeline: RecordingPipeline
    backend: FakeBackend
    engine: HeldEngine
    metrics: SpeakdMetrics
    clients: list[Client] = field(default_factory=list)

    def core(self, overrides: dict[str, object] | None = None) -> SynthesisCore:
        """A core on the shared pipeline; `overrides` are configuration keys ("limits.send_timeout_s")."""
        config = load_config(overrides={"model.default_voice": VOICE, **(overrides or {})})
        return SynthesisCore(
            backend=self.backend, pipeline=self.pipeline, config=config, metrics=self.metrics
        )

    def connect(
        self,
        overrides: dict[str, object] | None = None,
        *,
        core: SynthesisCore | None = None,
        reads: bool = True,
        close_hangs: bool = False,
    ) -> Client:
        """A served connection, on `core` or on a new core configured with `overrides`."""
        ws = FakeWebSocket(reads=reads, close_hangs=close_hangs)
        transport = FakeTransport(ws)
        conn = RecordingConnection(ws, transport, core=core or self.core(overrides))
        client = Client(ws, transport, conn, asyncio.create_task(conn.serve()))
        self.clients.append(client)
        return client


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    metrics = SpeakdMetrics()
    engine = HeldEngine()
    backend = FakeBackend(engine, fake_voices())
    pipeline = RecordingPipeline(stages=backend.stages(), metrics=metrics, lane_limit=4)
    await pipeline.start()
    s = Server(pipeline, backend, engine, metrics)
    try:
        yield s
    finally:
        engine.release()
        for client in s.clients:
            client.ws.hang_up()
        await asyncio.wait_for(asyncio.gather(*(c.task for c in s.clients), return_exceptions=True), 10)
        await pipeline.close()


async def wait_until(condition: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Poll `condition`; the limit only fires on a hang."""
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
    burst: list[ClientMessage] = [pcm_start("hog"), *texts, End(context="hog")]
    hog.ws.script.extend(_binary(m) for m in burst)
    await wait_until(lambda: hog.conn.finished("hog"))
    assert not hog.conn.open_contexts

    # The buffer filled up to the limit, never past it but for the overloaded error itself.
    assert limit - 2000 < max(hog.conn.buffer_sizes) <= limit + 400, max(hog.conn.buffer_sizes)
    queued = [decode_server(data) for data in hog.conn.queued_messages()]
    assert len(queued) == 2, queued  # the context's segments and audio were taken back
    error, done = queued
    assert isinstance(error, Error) and (error.code, error.context) == (ErrorCode.OVERLOADED, "hog")
    assert isinstance(done, Done) and (done.context, done.reason) == ("hog", DoneReason.ERROR)
    assert hog.conn.buffered_bytes == sum(len(encode(m)) for m in queued)
    assert hog.ws.send_calls == 1  # only `started` ever reached the (stuck) socket
    assert server.pipeline.job("hog").cancelled  # the queued sentences left every stage
    await wait_until(lambda: server.pipeline.depths() == dict.fromkeys(server.pipeline.stage_names, 0))
    assert server.metrics.errors.labels(code="overloaded").value == 1.0
    assert server.metrics.contexts.value == 0.0

    # The shared pipeline goes on serving a client that reads.
    server.engine.frames = 4
    await assert_still_serves(server.connect())


async def test_stalled_send_closes_the_connection(server: Server) -> None:
    stuck = server.connect({"limits.send_timeout_s": 0.2}, reads=False, close_hangs=True)
    stuck.send(Start(context="a"))
    stuck.send(Text(context="a", text="Some words that will never be heard."))
    await asyncio.wait_for(stuck.task, 10)  # `close` hangs too, so the transport is aborted
    assert stuck.ws.close_codes == [WSCloseCode.POLICY_VIOLATION]
    assert stuck.transport.aborted
    assert server.pipeline.job("a").cancelled and not stuck.conn.open_contexts
    assert server.metrics.contexts.value == 0.0
    assert server.metrics.connections.value == 0.0


async def test_segment_in_parts_is_announced_once(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    server.engine.frames = 40  # long enough for the first segment to be vocoded in two windows
    ends: list[bool] = []  # per waveform part the encoder took: does it end its segment?

    def counting_encoder(*args: Any) -> PartCountingEncoder:
        return PartCountingEncoder(make_encoder(*args), ends)

    monkeypatch.setattr("speakd.server.frontends.websocket.make_encoder", counting_encoder)
    client = server.connect()
    got, done = await client.speak("a", "A first sentence. And a second one.")
    # Only a context's first segment is vocoded in windows: two parts, then one.
    assert ends == [False, True, True]
    segments = [m for m in got if isinstance(m, Segment)]
    assert [(s.segment, s.text) for s in segments] == [(0, "A first sentence."), (1, "And a second one.")]
    announced = [event.index for _, event in client.conn.events if isinstance(event, SegmentStarted)]
    assert announced == [0, 1]
    assert [s.start_ms for s in segments] == [0.0, 1000.0]
    audio = [m for m in got if isinstance(m, Audio)]
    assert [a.seq for a in audio] == list(range(100))
    assert [a.segment for a in audio] == [0] * 50 + [1] * 50
    chunks = [event.segment for _, event in client.conn.events if isinstance(event, AudioChunk)]
    assert chunks == [0] * 50 + [1] * 50
    # Each segment's audio directly follows its announcement.
    assert got.index(segments[1]) == got.index(audio[49]) + 1
    assert (done.reason, done.segments, done.audio_ms) == (DoneReason.END, 2, 2000.0)


async def test_cancel_withdraws_unsent_segment_and_audio(server: Server) -> None:
    """protocol/README.md: `cancel` drops the context's not-yet-sent `segment` and `audio` messages."""
    client = server.connect({"limits.send_timeout_s": 60.0}, reads=False)  # `started` sticks in the socket
    client.send(pcm_start("a"))
    client.send(Text(context="a", text="Never heard."))
    client.send(Flush(context="a"))
    await wait_until(lambda: any(isinstance(event, AudioChunk) for _, event in client.conn.events))
    client.send(Cancel(context="a"))
    await wait_until(lambda: client.conn.finished("a"))
    queued = [decode_server(data) for data in client.conn.queued_messages()]
    assert len(queued) == 1, queued
    assert isinstance(queued[0], Done) and queued[0].reason is DoneReason.CANCEL
    assert server.pipeline.job("a").cancelled


# -- admission and shutdown -------------------------------------------------------------------------


async def test_the_connection_limit_is_counted_at_admission(server: Server) -> None:
    """Regression: the limit was checked before the WebSocket upgrade but counted after it, so
    concurrent upgrades overshot. A Connection counts as soon as it exists, before it serves."""
    core = server.core({"limits.max_connections": 2})

    def upgrade() -> Connection:
        ws = FakeWebSocket()
        return Connection(cast(web.WebSocketResponse, ws), FakeTransport(ws), core=core)

    first, second = upgrade(), upgrade()  # neither serves yet: both upgrades are still in flight
    assert core.sessions == 2 and server.metrics.connections.value == 2.0
    with pytest.raises(Busy, match="at most 2"):
        upgrade()
    assert core.sessions == 2 and server.metrics.connections.value == 2.0

    first.close()
    first.close()  # idempotent: the place is given back once
    assert core.sessions == 1 and server.metrics.connections.value == 1.0
    third = upgrade()
    assert core.sessions == 2
    with pytest.raises(Busy):
        upgrade()
    second.close()
    third.close()
    assert core.sessions == 0 and server.metrics.connections.value == 0.0


async def playing_client(server: Server, core: SynthesisCore) -> Client:
    """A connection whose context "long" has work held in the model: a stream playing."""
    server.engine.hold()
    client = server.connect(core=core)
    client.send(pcm_start("long"))
    client.send(Text(context="long", text="A sentence the model is slow to say. "))
    await wait_until(server.engine.holding.is_set)
    assert isinstance(await client.recv(), Started)
    return client


async def test_a_refused_start_carries_retry_after_ms(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(CapacityMeter, "streams", lambda self: 1.5)  # room for one stream
    core = server.core({"limits.admission_headroom": 1.0})
    playing = await playing_client(server, core)
    late = server.connect(core=core)
    late.send(pcm_start("late"))
    error = await late.expect_error(ErrorCode.OVERLOADED, "late")
    assert (
        error.retry_after_ms is not None and error.retry_after_ms >= 1000 and error.retry_after_ms % 1000 == 0
    )
    assert not late.conn.open_contexts
    playing.send(Cancel(context="long"))
    server.engine.release()


async def test_in_queue_mode_a_start_is_answered_at_once_and_its_text_spoken_once_admitted(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(CapacityMeter, "streams", lambda self: 1.5)
    core = server.core({"limits.admission_headroom": 1.0, "limits.admission": "queue"})
    playing = await playing_client(server, core)
    late = server.connect(core=core)
    late.send(pcm_start("late"))
    late.send(Text(context="late", text="Queued words. "))
    late.send(End(context="late"))
    started = await late.recv()
    assert isinstance(started, Started) and started.context == "late"
    await wait_until(lambda: core.admission.queued == 1)
    assert late.conn.open_contexts == ["late"] and len(late.ws.received) == 1
    assert all(job.context != "late" for job in server.pipeline.jobs)  # nothing reached the pipeline

    playing.send(Cancel(context="long"))
    server.engine.release()
    got: list[ServerMessage] = []
    while not isinstance(msg := await late.recv(), Done):
        got.append(msg)
    assert msg.reason is DoneReason.END
    assert [m.text for m in got if isinstance(m, Segment)] == ["Queued words."]
    assert not [m for m in got if isinstance(m, Error)]


async def test_in_queue_mode_a_start_that_waits_too_long_ends_overloaded_with_retry_after_ms(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(CapacityMeter, "streams", lambda self: 1.5)
    overrides = {
        "limits.admission_headroom": 1.0,
        "limits.admission": "queue",
        "limits.admission_queue_timeout_s": 0.2,
    }
    core = server.core(overrides)
    playing = await playing_client(server, core)
    late = server.connect(core=core)
    late.send(pcm_start("late"))
    late.send(Text(context="late", text="Never spoken. "))
    assert isinstance(await late.recv(), Started)
    error = await late.expect_error(ErrorCode.OVERLOADED, "late")
    assert error.retry_after_ms is not None and error.retry_after_ms >= 1000
    assert "retry in" in error.message
    done = await late.recv()
    assert isinstance(done, Done) and (done.context, done.reason) == ("late", DoneReason.ERROR)
    assert done.audio_ms == 0.0 and not late.conn.open_contexts
    playing.send(Cancel(context="long"))
    server.engine.release()
    await assert_still_serves(late, "after")  # the refusal cost that context, not its connection


async def test_shutdown_ends_early_when_the_client_leaves(server: Server) -> None:
    """Regression: a client that left during the shutdown grace did not count as done, so shutdown
    waited out the whole grace period."""
    core = server.core()
    client = server.connect(core=core)
    client.send(pcm_start("a"))
    assert isinstance(await client.recv(), Started)
    server.engine.hold()  # the model is slower than the grace period
    client.send(Text(context="a", text="A sentence the model is slow to say."))
    client.send(End(context="a"))
    await wait_until(server.engine.holding.is_set)

    shutdown = asyncio.create_task(core.shutdown(grace_s=30.0))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not shutdown.done() and client.conn.open_contexts == ["a"]  # it waits for "a" to finish

    client.ws.hang_up()
    # The limit is far below the 30 s grace: it only fires if shutdown waits the grace out.
    await asyncio.wait_for(shutdown, 10)
    await asyncio.wait_for(client.task, 10)
    assert server.pipeline.job("a").cancelled
    assert core.sessions == 0
    assert server.metrics.contexts.value == 0.0
    assert server.metrics.connections.value == 0.0
    assert not client.conn.finished("a")  # the client was gone: nothing more was said to it


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
