"""The Wyoming door: Home Assistant's text-to-speech protocol over TCP, streaming included.

A thin adapter over the synthesis core, like the OpenAI door: one TCP connection is one session; a
`synthesize` (whole text) or a `synthesize-start` … `synthesize-chunk`s … `synthesize-stop` stream is
one utterance. The core cuts text into sentences and clauses as it does for every door, so audio
flows while Home Assistant's LLM is still writing. Audio is raw PCM (s16le, mono, the model's rate):
one `audio-start` when the first audio is ready, an `audio-chunk` per piece, `audio-stop` at the end,
then `synthesize-stopped` for a stream.

Home Assistant 2025.7+ sends, inside a stream, a plain `synthesize` with the whole text for servers
that do not stream; it is ignored there, or the reply would be spoken twice. Unknown event types are
ignored (answering them with a disconnect broke other servers); an event without data counts as one
with empty data. A malformed or oversized event gets an `error` event, then the connection closes.
A connection that drops cancels its work in every stage.

Wyoming has no word-timing event. A peer that wants one sets `"speakd_words": true` in the data of its
`synthesize` or `synthesize-start` (Home Assistant never does): it then gets, after `audio-start` and
before each segment's first `audio-chunk`, a `speakd-words` event whose `words` are timed in ms on the
clock of the chunks' `timestamp`, with code-point spans into the text sent.

A live source (captions, a transcript) streams with `"speakd_max_lag_ms": N` (and optionally
`"speakd_max_speed"`, default 1.4) in the data of its `synthesize-start`: the core then keeps the lag
from a chunk's arrival to its audio playing under N ms, speeding segments up and then skipping the
oldest whole sentences, each skip told by a `speakd-skipped` event `{char_start, char_end}` (code
points of all the text sent in the stream) before the audio that follows it. See protocol/README.md,
"Live sources": the rules are the core's, the same as on the WebSocket.

Wyoming has no authentication: the door listens on loopback unless `wyoming.allow_remote` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass

from wyoming.audio import AudioChunk as WyomingAudioChunk
from wyoming.audio import AudioStart, AudioStop
from wyoming.error import Error as WyomingError
from wyoming.event import Event as WyomingEvent
from wyoming.event import async_write_event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from speakd.protocol import DEFAULT_MAX_SPEED, ErrorCode
from speakd.server.audio.containers import open_container_encoder
from speakd.server.core.errors import Busy, RequestRefused
from speakd.server.core.event_stream import EventStream
from speakd.server.core.events import AudioChunk, Event, Failed, Finished, SegmentWords, Skipped
from speakd.server.core.pace import Pace
from speakd.server.core.synthesis import Session, SynthesisCore
from speakd.server.frontends.wyoming_wire import MAX_HEADER_BYTES, WyomingWireError, read_event

logger = logging.getLogger(__name__)

PROGRAM = "speakd"
PROGRAM_URL = ""  # no public home yet: an empty URL rather than a made-up one
VERSION = "0.1.0"
SAMPLE_WIDTH = 2  # s16le
CHANNELS = 1
# Audio held for a reader that has not taken it yet: past this the pipeline holds this connection's work.
STREAM_BUFFER_BYTES = 256 * 1024
REFUSED = ""  # the stream whose start was refused: its chunks and stop are dropped quietly
WORDS_FIELD = "speakd_words"  # speakd's extension: not Wyoming's, so prefixed
WORDS_EVENT = "speakd-words"
MAX_LAG_FIELD = "speakd_max_lag_ms"  # a live source: in synthesize-start only
MAX_SPEED_FIELD = "speakd_max_speed"
SKIPPED_EVENT = "speakd-skipped"


def bcp47(lang: str) -> str:
    """The engine's language code ("en-us") as Home Assistant's pipelines name languages ("en-US")."""
    base, _, region = lang.partition("-")
    return f"{base.lower()}-{region.upper()}" if region else base.lower()


def describe_info(core: SynthesisCore) -> Info:
    """One TTS program with every voice of the model and the language each really speaks."""
    backend = core.backend
    model = Attribution(*backend.attribution)
    voices = [
        TtsVoice(
            name=name,
            attribution=model,
            installed=True,
            description=f"{name} ({bcp47(backend.language_for(name))})",
            version=None,
            languages=[bcp47(backend.language_for(name))],
        )
        for name in backend.voice_names
    ]
    program = TtsProgram(
        name=PROGRAM,
        attribution=Attribution(name="speakd", url=PROGRAM_URL),
        installed=True,
        description=f"speakd: streaming speech from {backend.model_id}",
        version=VERSION,
        voices=voices,
        supports_synthesize_streaming=True,
    )
    return Info(tts=[program])


@dataclass
class _Reply:
    """What the peer gets back for one utterance."""

    name: str
    stream: bool  # a synthesize-start stream: ends with synthesize-stopped
    audio_started: bool = False
    position_ms: float = 0.0


def _pace(data: dict[str, object], *, stream: bool) -> Pace | None:
    """The live-source extension's fields, checked for type (the core checks their range); None when
    absent. A whole text (`synthesize`) has no pace to keep: the fields belong to streams."""
    max_lag_ms, max_speed = data.get(MAX_LAG_FIELD), data.get(MAX_SPEED_FIELD, DEFAULT_MAX_SPEED)
    if max_lag_ms is None:
        if MAX_SPEED_FIELD in data:
            raise ValueError(f"{MAX_SPEED_FIELD} needs {MAX_LAG_FIELD}")
        return None
    if not stream:
        raise ValueError(f"{MAX_LAG_FIELD} is for streams (synthesize-start), not synthesize")
    if isinstance(max_lag_ms, bool) or not isinstance(max_lag_ms, int):
        raise ValueError(f"{MAX_LAG_FIELD} must be an integer number of milliseconds")
    if isinstance(max_speed, bool) or not isinstance(max_speed, int | float) or not math.isfinite(max_speed):
        raise ValueError(f"{MAX_SPEED_FIELD} must be a number")
    return Pace(max_lag_ms / 1000, float(max_speed))


class WyomingConnection:
    """One TCP peer: reads events, drives one utterance at a time, writes its audio back."""

    def __init__(
        self, core: SynthesisCore, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._core = core
        self._reader = reader
        self._writer = writer
        self._events = EventStream(STREAM_BUFFER_BYTES, core.pipeline.wake)
        self._session: Session | None = None
        self._streaming: str | None = None  # the open stream's utterance, between start and stop
        self._replies: deque[_Reply] = deque()  # opened utterances whose Finished has not come yet
        self._count = 0
        self._write_lock = asyncio.Lock()
        self._max_data_bytes = core.config.limits.max_message_bytes
        self._send_timeout_s = core.config.limits.send_timeout_s
        self._idle_timeout_s = core.config.limits.idle_timeout_s
        self._active_at = time.monotonic()  # the last event either way

    async def serve(self) -> None:
        """Until the peer leaves, sends garbage, stops reading, or the daemon stops."""
        try:
            self._session = self._core.admit(self._events, max_utterances=1)
        except Busy as exc:
            code = ErrorCode.SHUTTING_DOWN if self._core.closing else ErrorCode.OVERLOADED
            await self._error(f"the daemon is busy: {exc}", code)
            return
        reading = asyncio.create_task(self._read(), name="wyoming-read")
        pumping = asyncio.create_task(self._pump(), name="wyoming-pump")
        idling = asyncio.create_task(self._idle_watch(), name="wyoming-idle")
        tasks = {reading, pumping, idling}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                with contextlib.suppress(ConnectionError, TimeoutError):
                    task.result()  # a peer that left or stopped reading: nothing more to say
        finally:
            self._session.close()  # its utterances leave every stage now
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _idle_watch(self) -> None:
        """A peer that neither asks nor is being answered for limits.idle_timeout_s gives its place back."""
        assert self._session is not None
        while True:
            idle_s = time.monotonic() - self._active_at
            if not len(self._session) and idle_s >= self._idle_timeout_s:
                await self._error(
                    f"no request for {self._idle_timeout_s:g} s; closing the connection",
                    ErrorCode.IDLE_TIMEOUT,
                )
                return
            await asyncio.sleep(max(0.5, min(5.0, self._idle_timeout_s - idle_s)))

    async def _read(self) -> None:
        while True:
            try:
                event = await read_event(self._reader, self._max_data_bytes, self._max_data_bytes)
            except WyomingWireError as exc:
                logger.info("wyoming: a peer sent a bad event: %s", exc)
                await self._error(str(exc), exc.code)
                return
            if event is None:
                return  # the peer left: closing the session cancels its work
            self._active_at = time.monotonic()
            await self._handle(event)

    # -- what the peer asks ------------------------------------------------------------------------------

    async def _handle(self, event: WyomingEvent) -> None:
        if Describe.is_type(event.type):
            await self._write(describe_info(self._core).event())
        elif SynthesizeStart.is_type(event.type):
            if self._streaming is not None:
                await self._error("a stream is already open on this connection", ErrorCode.BAD_MESSAGE)
                return
            voice = event.data.get("voice")
            self._streaming = await self._open(voice, event.data, stream=True) or REFUSED
        elif SynthesizeChunk.is_type(event.type):
            if self._streaming == REFUSED:
                return
            if self._streaming is None:
                await self._error("synthesize-chunk outside a stream", ErrorCode.BAD_MESSAGE)
                return
            text = event.data.get("text")
            if not isinstance(text, str):
                await self._error("synthesize-chunk needs a text string", ErrorCode.BAD_MESSAGE)
                return
            await self._feed(self._streaming, text, end=False)
        elif SynthesizeStop.is_type(event.type):
            if self._streaming is None:
                await self._error("synthesize-stop outside a stream", ErrorCode.BAD_MESSAGE)
                return
            name, self._streaming = self._streaming, None
            if name != REFUSED:
                await self._feed(name, "", end=True)
        elif Synthesize.is_type(event.type):
            if self._streaming is not None:
                return  # the whole text again, for servers that do not stream: it is being spoken
            text = event.data.get("text")
            if not isinstance(text, str):
                await self._error("synthesize needs a text string", ErrorCode.BAD_MESSAGE)
                return
            opened = await self._open(event.data.get("voice"), event.data, stream=False)
            if opened is not None:
                await self._feed(opened, text, end=True)
        else:
            logger.debug("wyoming: ignoring an event of type %r", event.type)

    async def _open(self, voice: object, data: dict[str, object], *, stream: bool) -> str | None:
        """A new utterance, or None after an `error`; an unknown or missing voice name falls back to
        the default voice (Home Assistant may send a voice from another server's list)."""
        assert self._session is not None
        words = data.get(WORDS_FIELD)
        if words is not None and not isinstance(words, bool):
            await self._error(f"{WORDS_FIELD} must be true or false", ErrorCode.BAD_MESSAGE)
            return None
        try:
            pace = _pace(data, stream=stream)
        except ValueError as exc:
            await self._error(str(exc), ErrorCode.BAD_MESSAGE)
            return None
        backend = self._core.backend
        wanted = voice.get("name") if isinstance(voice, dict) else None
        chosen = wanted if isinstance(wanted, str) and wanted in backend.voice_names else None
        if wanted and chosen is None:
            logger.info("wyoming: unknown voice %r; speaking with the default voice", wanted)
        self._count += 1
        name = f"wyoming-{self._count}"
        try:
            self._session.open(
                name,
                voice=chosen,
                lang=backend.language_for(chosen or self._core.default_voice),
                speed=1.0,
                encoder=lambda: open_container_encoder("pcm", backend.sample_rate),
                sample_rate=backend.sample_rate,
                words=bool(words),
                pace=pace,
            )
        except RequestRefused as exc:
            await self._error(exc.message, exc.code)
            return None
        self._replies.append(_Reply(name, stream))
        return name

    async def _feed(self, name: str, text: str, *, end: bool) -> None:
        assert self._session is not None
        utterance = self._session.get(name)
        if utterance is None:
            return  # ended already (an error cut it off); the peer has its error
        try:
            if text:
                utterance.feed(text)
            if end:
                utterance.end()
        except RequestRefused as exc:
            await self._error(exc.message, exc.code)
            utterance.cancel()

    # -- what the core says ------------------------------------------------------------------------------

    async def _pump(self) -> None:
        """Core events → Wyoming events, in order: the session holds one utterance at a time."""
        rate = self._core.backend.sample_rate
        audio = {"rate": rate, "width": SAMPLE_WIDTH, "channels": CHANNELS}
        while True:
            event = await self._events.next()
            if not self._replies:
                continue  # an utterance refused before it was counted: nothing was promised
            reply = self._replies[0]
            await self._deliver(reply, event, audio)
            if isinstance(event, Finished):
                self._replies.popleft()

    async def _deliver(self, reply: _Reply, event: Event, audio: dict[str, int]) -> None:
        if isinstance(event, SegmentWords):
            await self._start_audio(reply, audio)
            await self._write(WyomingEvent(WORDS_EVENT, {"words": [asdict(w) for w in event.words]}))
        elif isinstance(event, Skipped):
            await self._write(
                WyomingEvent(SKIPPED_EVENT, {"char_start": event.char_start, "char_end": event.char_end})
            )
        elif isinstance(event, AudioChunk):
            if not event.data:
                return
            await self._start_audio(reply, audio)
            chunk = WyomingAudioChunk(audio=event.data, timestamp=int(reply.position_ms), **audio)
            reply.position_ms += 1000 * event.samples / audio["rate"]
            await self._write(chunk.event())
        elif isinstance(event, Failed):
            await self._error(event.message, event.code)
        elif isinstance(event, Finished):
            if not reply.audio_started:  # one format announced even for no audio: the peer builds a WAV
                await self._write(AudioStart(timestamp=0, **audio).event())
            await self._write(AudioStop(timestamp=int(reply.position_ms)).event())
            if reply.stream:
                await self._write(SynthesizeStopped().event())

    async def _start_audio(self, reply: _Reply, audio: dict[str, int]) -> None:
        if not reply.audio_started:
            reply.audio_started = True
            await self._write(AudioStart(timestamp=0, **audio).event())

    async def _error(self, text: str, code: ErrorCode) -> None:
        await self._write(WyomingError(text=text, code=code.value).event())

    async def _write(self, event: WyomingEvent) -> None:
        async with self._write_lock, asyncio.timeout(self._send_timeout_s):
            await async_write_event(event, self._writer)
        self._active_at = time.monotonic()


class WyomingServer:
    """The TCP listener; one `WyomingConnection` per peer, all closed when the daemon stops."""

    def __init__(self, core: SynthesisCore) -> None:
        self._core = core
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (port 0 picks a free one)."""
        self._server = await asyncio.start_server(self._accept, host, port, limit=MAX_HEADER_BYTES)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await WyomingConnection(self._core, reader, writer).serve()
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def close(self) -> None:
        """Stop listening and end every connection (their sessions are closed with them)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
