"""One WebSocket connection: its contexts, their segmenters, and a send buffer bounded in bytes.

The reader and the writer are separate tasks, so a client that stops reading stalls only its own
writer; its buffer then overflows into an `overloaded` error instead of growing without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiohttp import WSCloseCode, WSMsgType, web

from speakd.protocol import (
    Audio,
    Cancel,
    ClientMessage,
    Done,
    DoneReason,
    End,
    Error,
    ErrorCode,
    Flush,
    ProtocolError,
    Segment,
    ServerMessage,
    Start,
    Started,
    Text,
    decode_client,
    encode,
    text_frame_error,
)
from speakd.server.audio.encoders import Frame, make_encoder
from speakd.server.config import Config
from speakd.server.core.segmenter import Segmenter
from speakd.server.engines.kokoro.g2p import LANGUAGES
from speakd.server.engines.kokoro.voices import VoiceBank
from speakd.server.errors import SynthesisError
from speakd.server.metrics import SpeakdMetrics
from speakd.server.pipeline.pipeline import EncodedSegment, Job, Pipeline

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Context:
    """What the connection keeps per open context, beside the pipeline's job."""

    job: Job
    segmenter: Segmenter
    sample_rate: int
    ending: bool = False
    segments: int = 0
    samples: int = 0
    seq: int = 0
    last_segment: int = -1
    first_submit_at: float | None = None
    audio_started: bool = False

    @property
    def audio_ms(self) -> float:
        return self.samples * 1000.0 / self.sample_rate


@dataclass(slots=True)
class _Outbound:
    """Encoded frames waiting for the socket; audio of a cancelled context can be taken back."""

    frames: deque[tuple[Job | None, bool, bytes]] = field(default_factory=deque)
    size: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    empty: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.empty.set()

    def push(self, owner: Job | None, retractable: bool, data: bytes) -> None:
        self.frames.append((owner, retractable, data))
        self.size += len(data)
        self.ready.set()
        self.empty.clear()

    def retract(self, owner: Job) -> None:
        kept = deque(entry for entry in self.frames if not (entry[0] is owner and entry[1]))
        self.size = sum(len(entry[2]) for entry in kept)
        self.frames = kept
        if not kept:
            self.ready.clear()
            self.empty.set()

    def pop(self) -> bytes:
        _, _, data = self.frames.popleft()
        self.size -= len(data)
        if not self.frames:
            self.ready.clear()
            self.empty.set()
        return data


class Connection:
    """Runs one client's session: decode, validate, feed the pipeline, send results in order."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.BaseTransport | None,
        *,
        pipeline: Pipeline,
        voices: VoiceBank,
        config: Config,
        metrics: SpeakdMetrics,
    ) -> None:
        self._ws = ws
        self._transport = transport
        self._pipeline = pipeline
        self._voices = voices
        self._config = config
        self._limits = config.limits
        self._metrics = metrics
        self._contexts: dict[str, _Context] = {}
        self._outbound = _Outbound()
        self._closing = False
        self._aborting: asyncio.Task[None] | None = None
        self._idle_timer: asyncio.Timeout | None = None
        self._all_done = asyncio.Event()
        self._all_done.set()

    # -- lifecycle --------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Read until the client goes; the writer runs beside the reader."""
        writer = asyncio.create_task(self._write_loop(), name="speakd-writer")
        try:
            await self._read_loop()
        finally:
            for ctx in list(self._contexts.values()):
                self._drop(ctx)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def shutdown(self, grace_s: float) -> None:
        """Daemon stop: let open contexts finish within `grace_s`, cancel the rest, close with 1001."""
        self._closing = True
        try:
            await asyncio.wait_for(self._all_done.wait(), grace_s)
        except TimeoutError:
            for ctx in list(self._contexts.values()):
                self._error(ctx.job.context, ErrorCode.SHUTTING_DOWN, "the daemon is stopping")
                self._cancel(ctx, DoneReason.CANCEL)
        await self._drain(min(2.0, self._limits.send_timeout_s))
        await self._ws.close(code=WSCloseCode.GOING_AWAY, message=b"daemon stopping")

    async def _drain(self, limit_s: float) -> None:
        """Give queued messages (errors, done) a bounded chance to reach the client before closing."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._outbound.empty.wait(), limit_s)

    # -- reading ----------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            try:
                # Our own deadline, not receive(timeout=): aiohttp restarts that on every pong, so a
                # client whose library answers pings would never time out.
                async with asyncio.timeout(None) as timer:
                    self._idle_timer = timer
                    self._rearm_idle_timer()
                    msg = await self._ws.receive()
            except TimeoutError:
                self._error(None, ErrorCode.IDLE_TIMEOUT, f"no message for {self._limits.idle_timeout_s:g} s")
                await self._drain(1.0)
                await self._ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"idle timeout")
                return
            finally:
                self._idle_timer = None  # a Timeout cannot be rescheduled once its block is left
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if msg.type is WSMsgType.ERROR:
                logger.info("connection error: %s", self._ws.exception())
                return
            request: ClientMessage | None = None
            try:
                if msg.type is WSMsgType.TEXT:
                    raise text_frame_error()
                if msg.type is not WSMsgType.BINARY:
                    continue
                if len(msg.data) > self._limits.max_message_bytes:
                    raise ProtocolError(
                        ErrorCode.MESSAGE_TOO_LARGE,
                        f"message of {len(msg.data)} bytes exceeds the limit of "
                        f"{self._limits.max_message_bytes}",
                    )
                request = decode_client(msg.data)
                self._handle(request)
            except ProtocolError as exc:
                self._error(exc.context, exc.code, exc.message)
            except Exception:
                # A bug must cost one request, not the connection (or the daemon).
                logger.exception("internal error handling %r", request)
                context = request.context if request is not None else None
                self._error(context, ErrorCode.INTERNAL, "internal error; see the daemon's log")

    def _rearm_idle_timer(self) -> None:
        """Idle time counts from the last client message or the last context's end, whichever is later."""
        if self._idle_timer is not None:
            loop = asyncio.get_running_loop()
            idle = not self._contexts
            self._idle_timer.reschedule(loop.time() + self._limits.idle_timeout_s if idle else None)

    def _handle(self, msg: ClientMessage) -> None:
        if isinstance(msg, Start):
            self._start(msg)
            return
        ctx = self._contexts.get(msg.context)
        if ctx is None:
            raise ProtocolError(ErrorCode.UNKNOWN_CONTEXT, f"no open context {msg.context!r}", msg.context)
        if isinstance(msg, Cancel):
            self._cancel(ctx, DoneReason.CANCEL)
            return
        if ctx.ending:
            raise ProtocolError(
                ErrorCode.UNKNOWN_CONTEXT, f"context {msg.context!r} has ended; wait for done", msg.context
            )
        if isinstance(msg, Text):
            self._text(ctx, msg.text)
        elif isinstance(msg, Flush):
            self._submit(ctx, ctx.segmenter.flush())
        elif isinstance(msg, End):
            self._submit(ctx, ctx.segmenter.flush())
            ctx.ending = True
            self._pipeline.end(ctx.job)

    def _start(self, msg: Start) -> None:
        name = msg.context
        if self._closing:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the daemon is stopping; no new contexts", name)
        if name in self._contexts:
            raise ProtocolError(ErrorCode.DUPLICATE_CONTEXT, f"context {name!r} is already open", name)
        if len(self._contexts) >= self._limits.max_contexts_per_connection:
            raise ProtocolError(
                ErrorCode.TOO_MANY_CONTEXTS,
                f"at most {self._limits.max_contexts_per_connection} open contexts per connection",
                name,
            )
        voice = msg.voice or self._config.model.default_voice
        if voice not in self._voices:
            raise ProtocolError(
                ErrorCode.UNKNOWN_VOICE,
                f"unknown voice {voice!r}; known: {', '.join(self._voices.names)}",
                name,
            )
        if msg.lang not in LANGUAGES:
            raise ProtocolError(
                ErrorCode.INVALID_PARAM,
                f"lang {msg.lang!r} is not supported; use one of {', '.join(LANGUAGES)}",
                name,
            )
        audio = self._config.audio
        encoder = make_encoder(
            msg.codec, msg.sample_rate, msg.frame_ms, audio.opus_bitrate, audio.opus_complexity
        )
        job = Job(context=name, voice=voice, lang=msg.lang, speed=msg.speed, encoder=encoder, sink=self)
        pipeline_cfg = self._config.pipeline
        segmenter = Segmenter(
            first_clause_min_words=pipeline_cfg.first_clause_min_words,
            max_chars=pipeline_cfg.max_segment_chars,
        )
        self._contexts[name] = _Context(job=job, segmenter=segmenter, sample_rate=msg.sample_rate)
        self._all_done.clear()
        self._metrics.contexts.inc()
        self._send(
            None,
            Started(
                context=name,
                voice=voice,
                codec=msg.codec,
                sample_rate=msg.sample_rate,
                frame_ms=msg.frame_ms,
                pre_skip=encoder.pre_skip,
            ),
        )

    def _text(self, ctx: _Context, text: str) -> None:
        held = ctx.segmenter.buffered_chars + ctx.job.pending_chars
        if held + len(text) > self._limits.max_buffered_text_chars:
            raise ProtocolError(
                ErrorCode.TEXT_TOO_LONG,
                f"context {ctx.job.context!r} would hold {held + len(text)} characters not yet synthesized; "
                f"the limit is {self._limits.max_buffered_text_chars}: wait for audio, then send more",
                ctx.job.context,
            )
        self._submit(ctx, ctx.segmenter.feed(text))

    def _submit(self, ctx: _Context, segments: Sequence[str]) -> None:
        for segment in segments:
            if ctx.first_submit_at is None:
                ctx.first_submit_at = time.perf_counter()
            self._pipeline.submit(ctx.job, segment)

    def _cancel(self, ctx: _Context, reason: DoneReason) -> None:
        self._pipeline.cancel(ctx.job)
        self._outbound.retract(ctx.job)
        self._finish_context(ctx, reason)

    # -- results from the pipeline (JobSink) --------------------------------------------------------

    def _live(self, job: Job) -> _Context | None:
        ctx = self._contexts.get(job.context)
        return ctx if ctx is not None and ctx.job is job else None

    def deliver(self, job: Job, segment: EncodedSegment) -> None:
        ctx = self._live(job)
        if ctx is None or not segment.frames:
            return
        if not ctx.audio_started and ctx.first_submit_at is not None:
            ctx.audio_started = True
            self._metrics.time_to_first_audio.observe(time.perf_counter() - ctx.first_submit_at)
        if segment.index != ctx.last_segment:
            # A segment vocoded in windows arrives in parts: announce it before its first frame only.
            name = job.context
            self._send(
                job, Segment(context=name, segment=segment.index, text=segment.text, start_ms=ctx.audio_ms)
            )
            ctx.last_segment = segment.index
            ctx.segments += 1
            self._metrics.segments.inc()
        self._send_frames(ctx, segment.frames)

    def finish(self, job: Job, tail: Sequence[Frame]) -> None:
        ctx = self._live(job)
        if ctx is None:
            return
        if ctx.segments:
            self._send_frames(ctx, tail)
        self._finish_context(ctx, DoneReason.END)

    def fail(self, job: Job, error: SynthesisError) -> None:
        ctx = self._live(job)
        if ctx is None:
            return
        self._outbound.retract(job)
        self._error(job.context, ErrorCode.INTERNAL, str(error))
        self._finish_context(ctx, DoneReason.ERROR)

    def _send_frames(self, ctx: _Context, frames: Sequence[Frame]) -> None:
        for frame in frames:
            audio = Audio(
                context=ctx.job.context,
                segment=ctx.last_segment,
                seq=ctx.seq,
                data=frame.data,
                samples=frame.samples,
            )
            if not self._send(ctx.job, audio):
                return
            ctx.seq += 1
            ctx.samples += frame.samples
            self._metrics.audio_seconds.inc(frame.samples / ctx.sample_rate)

    def _finish_context(self, ctx: _Context, reason: DoneReason) -> None:
        name = ctx.job.context
        self._send(None, Done(context=name, reason=reason, audio_ms=ctx.audio_ms, segments=ctx.segments))
        del self._contexts[name]
        self._metrics.contexts.dec()
        if not self._contexts:
            self._all_done.set()
            self._rearm_idle_timer()

    def _drop(self, ctx: _Context) -> None:
        """The client left: stop its work, send nothing."""
        self._pipeline.cancel(ctx.job)
        del self._contexts[ctx.job.context]
        self._metrics.contexts.dec()

    # -- writing ----------------------------------------------------------------------------------

    def _error(self, context: str | None, code: ErrorCode, message: str) -> None:
        self._metrics.errors.labels(code=code.value).inc()
        self._send(None, Error(context=context, code=code, message=message))

    def _send(self, owner: Job | None, msg: ServerMessage) -> bool:
        """Queue a message; audio (owner set) that would overflow the buffer overloads the connection."""
        if owner is not None and owner.cancelled:
            return False
        data = encode(msg)
        limit = self._limits.max_outbound_bytes
        if owner is not None and self._outbound.size + len(data) > limit:
            self._overload()
            return False
        if owner is None and self._outbound.size + len(data) > 2 * limit:
            # A client that keeps sending but never reads: even its error replies must stay bounded.
            if self._aborting is None:
                logger.warning("client not reading its replies; closing the connection")
                self._aborting = asyncio.create_task(self._abort())
            return False
        self._outbound.push(owner, owner is not None, data)
        return True

    def _overload(self) -> None:
        logger.warning("client not reading: %d bytes buffered; cancelling its contexts", self._outbound.size)
        for ctx in list(self._contexts.values()):
            self._error(
                ctx.job.context,
                ErrorCode.OVERLOADED,
                "the client is not reading audio fast enough "
                f"({self._limits.max_outbound_bytes} bytes buffered)",
            )
            self._cancel(ctx, DoneReason.ERROR)

    async def _write_loop(self) -> None:
        while True:
            await self._outbound.ready.wait()
            data = self._outbound.pop()
            try:
                # Not wait_for: on Python 3.11 it swallows a cancel that lands as the send completes,
                # and `serve` would then wait for this task forever.
                async with asyncio.timeout(self._limits.send_timeout_s):
                    await self._ws.send_bytes(data)
            except TimeoutError:
                logger.warning("send stalled for %.1f s; closing the connection", self._limits.send_timeout_s)
                await self._abort()
                return
            except ConnectionError:
                return

    async def _abort(self) -> None:
        for ctx in list(self._contexts.values()):
            self._drop(ctx)
        try:
            await asyncio.wait_for(self._ws.close(code=WSCloseCode.POLICY_VIOLATION), 1.0)
        except (TimeoutError, ConnectionError):
            # The peer takes nothing, not even a close frame: drop the TCP connection.
            if isinstance(self._transport, asyncio.Transport):
                self._transport.abort()
