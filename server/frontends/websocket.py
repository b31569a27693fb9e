"""The native door: protocol v1 over one WebSocket, an adapter over the synthesis core.

The reader and the writer are separate tasks, so a client that stops reading stalls only its own
writer. Protocol v1 promises `overloaded` rather than a stall: audio that would push the send buffer
past `limits.max_outbound_bytes` aborts the connection's contexts with that error, so this door
always has room (it never holds the pipeline back) and its buffer stays bounded in bytes.

A `start` is answered at once with `started`, also when the core queues the context for admission
(`limits.admission = "queue"`): the reader never waits on it, the client streams its text as usual
(the core holds it), and the audio simply starts later, or the context ends with `overloaded` and a
retry hint (`retry_after_ms`) like any context the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
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
    Skipped,
    Start,
    Started,
    Text,
    Words,
    decode_client,
    encode,
    text_frame_error,
)
from speakd.server.audio.encoders import make_encoder
from speakd.server.core.errors import RequestRefused
from speakd.server.core.events import (
    AudioChunk,
    Event,
    Failed,
    Finished,
    SegmentStarted,
    SegmentWords,
)
from speakd.server.core.events import Skipped as SkippedText
from speakd.server.core.pace import Pace
from speakd.server.core.synthesis import Session, SynthesisCore
from speakd.server.core.utterance import Utterance

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Outbound:
    """Encoded messages waiting for the socket; audio of a cancelled context can be taken back."""

    frames: deque[tuple[Utterance | None, bytes]] = field(default_factory=deque)
    size: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    empty: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.empty.set()

    def push(self, owner: Utterance | None, data: bytes) -> None:
        """`owner` is set for audio only: that is what a cancel withdraws."""
        self.frames.append((owner, data))
        self.size += len(data)
        self.ready.set()
        self.empty.clear()

    def retract(self, owner: Utterance) -> None:
        kept = deque(entry for entry in self.frames if entry[0] is not owner)
        self.size = sum(len(entry[1]) for entry in kept)
        self.frames = kept
        if not kept:
            self.ready.clear()
            self.empty.set()

    def pop(self) -> bytes:
        _, data = self.frames.popleft()
        self.size -= len(data)
        if not self.frames:
            self.ready.clear()
            self.empty.set()
        return data


class Connection:
    """Runs one client's session: decode, validate, drive the core, send its events in order."""

    def __init__(
        self, ws: web.WebSocketResponse, transport: asyncio.BaseTransport | None, *, core: SynthesisCore
    ) -> None:
        """Admits the session at once (raises `Busy`), so a door counts it before answering."""
        self._ws = ws
        self._transport = transport
        self._core = core
        self._config = core.config
        self._limits = core.config.limits
        self._metrics = core.metrics
        self._outbound = _Outbound()
        self._aborting: asyncio.Task[None] | None = None
        self._idle_timer: asyncio.Timeout | None = None
        self._session: Session = core.admit(self, on_shutdown=self._close_for_shutdown)

    @property
    def open_contexts(self) -> list[str]:
        """Names of the contexts open now."""
        return [utterance.name for utterance in self._session]

    @property
    def buffered_bytes(self) -> int:
        """Encoded messages waiting for the socket, in bytes."""
        return self._outbound.size

    def queued_messages(self) -> list[bytes]:
        """Encoded messages waiting for the socket, oldest first (a copy, for inspection)."""
        return [data for _, data in self._outbound.frames]

    # -- lifecycle --------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Read until the client goes; the writer runs beside the reader."""
        writer = asyncio.create_task(self._write_loop(), name="speakd-writer")
        try:
            await self._read_loop()
        finally:
            self._session.close()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    def close(self) -> None:
        """Give the session back (idempotent): for an upgrade that failed before `serve`."""
        self._session.close()

    async def _close_for_shutdown(self) -> None:
        """After the core let contexts finish (or cut them off): flush what is queued, close with 1001."""
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
            except RequestRefused as exc:
                self._error(exc.context, exc.code, exc.message, exc.retry_after_s)
            except Exception:
                # A bug must cost one request, not the connection (or the daemon).
                logger.exception("internal error handling %r", request)
                context = request.context if request is not None else None
                self._error(context, ErrorCode.INTERNAL, "internal error; see the daemon's log")

    def _rearm_idle_timer(self) -> None:
        """Idle time counts from the last client message or the last context's end, whichever is later."""
        if self._idle_timer is not None:
            loop = asyncio.get_running_loop()
            idle = not len(self._session)
            self._idle_timer.reschedule(loop.time() + self._limits.idle_timeout_s if idle else None)

    def _handle(self, msg: ClientMessage) -> None:
        if isinstance(msg, Start):
            self._start(msg)
            return
        utterance = self._session.get(msg.context)
        if utterance is None:
            raise ProtocolError(ErrorCode.UNKNOWN_CONTEXT, f"no open context {msg.context!r}", msg.context)
        if isinstance(msg, Cancel):
            utterance.cancel()
        elif isinstance(msg, Text):
            utterance.feed(msg.text)
        elif isinstance(msg, Flush):
            utterance.flush()
        elif isinstance(msg, End):
            utterance.end()

    def _start(self, msg: Start) -> None:
        audio = self._config.audio
        utterance = self._session.open(
            msg.context,
            voice=msg.voice,
            lang=msg.lang,
            speed=msg.speed,
            encoder=lambda: make_encoder(
                msg.codec, msg.sample_rate, msg.frame_ms, audio.opus_bitrate, audio.opus_complexity
            ),
            sample_rate=msg.sample_rate,
            words=msg.words,
            pace=None if msg.max_lag_ms is None else Pace(msg.max_lag_ms / 1000, msg.max_speed),
        )
        self._send(
            None,
            Started(
                context=msg.context,
                voice=utterance.voice,
                codec=msg.codec,
                sample_rate=msg.sample_rate,
                frame_ms=msg.frame_ms,
                pre_skip=utterance.encoder.pre_skip,
                words=msg.words,
                max_lag_ms=msg.max_lag_ms,
            ),
        )

    # -- events from the core (EventSink) -----------------------------------------------------------

    def has_room(self, utterance: Utterance) -> bool:
        return True

    def emit(self, utterance: Utterance, event: Event) -> bool:
        name = utterance.name
        if isinstance(event, AudioChunk):
            audio = Audio(
                context=name, segment=event.segment, seq=event.seq, data=event.data, samples=event.samples
            )
            return self._send(utterance, audio)
        if isinstance(event, SegmentStarted):
            # Owned like audio: a cancel takes an unsent announcement back with its frames.
            return self._send(
                utterance,
                Segment(
                    context=name,
                    segment=event.index,
                    text=event.text,
                    start_ms=event.start_ms,
                    speed=event.speed,
                ),
            )
        if isinstance(event, SegmentWords):
            return self._send(utterance, Words(context=name, segment=event.segment, words=event.words))
        if isinstance(event, SkippedText):
            skipped = Skipped(context=name, char_start=event.char_start, char_end=event.char_end)
            return self._send(utterance, skipped)
        if isinstance(event, Failed):
            error = Error(
                context=name, code=event.code, message=event.message, retry_after_ms=_ms(event.retry_after_s)
            )
            return self._send(None, error)
        assert isinstance(event, Finished)
        sent = self._send(
            None, Done(context=name, reason=event.reason, audio_ms=event.audio_ms, segments=event.segments)
        )
        self._rearm_idle_timer()
        return sent

    def retract(self, utterance: Utterance) -> None:
        self._outbound.retract(utterance)

    # -- writing ----------------------------------------------------------------------------------

    def _error(
        self, context: str | None, code: ErrorCode, message: str, retry_after_s: int | None = None
    ) -> None:
        self._metrics.errors.labels(code=code.value).inc()
        self._send(
            None, Error(context=context, code=code, message=message, retry_after_ms=_ms(retry_after_s))
        )

    def _send(self, owner: Utterance | None, msg: ServerMessage) -> bool:
        """Queue a message; audio (owner set) that would overflow the buffer overloads the connection."""
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
        self._outbound.push(owner, data)
        return True

    def _overload(self) -> None:
        logger.warning("client not reading: %d bytes buffered; cancelling its contexts", self._outbound.size)
        self._session.abort_all(
            ErrorCode.OVERLOADED,
            f"the client is not reading audio fast enough ({self._limits.max_outbound_bytes} bytes buffered)",
            DoneReason.ERROR,
        )

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
        for utterance in self._session:
            utterance.drop()
        try:
            await asyncio.wait_for(self._ws.close(code=WSCloseCode.POLICY_VIOLATION), 1.0)
        except (TimeoutError, ConnectionError):
            # The peer takes nothing, not even a close frame: drop the TCP connection.
            if isinstance(self._transport, asyncio.Transport):
                self._transport.abort()


def _ms(seconds: int | None) -> int | None:
    """A core retry hint (whole seconds) as the wire's `retry_after_ms`."""
    return None if seconds is None else seconds * 1000
