"""One utterance end to end: text chunks in, decoded audio out to a sink, with the timings users ask for.

Text is sent and audio received concurrently, so speech starts while text is still arriving. Stopping
(Ctrl-C) cancels the context politely and waits briefly for the server to confirm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from speakd.protocol import Audio, AudioCodec, Done, DoneReason, Segment, Started, Words, WordTiming

from .connection import Connection
from .decoder import AudioDecoder
from .errors import SpeakdClientError, StreamError

logger = logging.getLogger(__name__)

CANCEL_GRACE_S = 2.0
"""How long an interrupted run waits for the server's `done` before hanging up anyway."""
WORD_POLL_S = 0.02
"""How often the playback position is checked for words reached (one audio frame)."""


class AudioSink(Protocol):
    """Where decoded speech goes: the live `Player` or a `WavWriter`."""

    async def write(self, pcm: npt.NDArray[np.int16]) -> None:
        """Take samples; may wait (back-pressure) but must not drop them."""

    async def drain(self) -> None:
        """Wait until everything written is out (heard, or on disk)."""

    def close(self) -> None:
        """Stop now and release the device or file; called again later must be harmless."""

    @property
    def underruns(self) -> int | None:
        """Times live playback ran dry mid-stream; None for sinks that cannot run dry (files)."""

    @property
    def position_s(self) -> float:
        """Seconds of the stream played so far (a file: written so far)."""


@dataclass(slots=True)
class SpeechReport:
    """What happened (times in `time.monotonic()` seconds), for the summary `speakd-say` prints."""

    began_at: float
    sample_rate: int = 0
    samples: int = 0
    first_text_at: float | None = None
    first_audio_at: float | None = None
    done_at: float | None = None
    ended_at: float | None = None
    interrupted: bool = False
    underruns: int | None = None
    words_heard: list[WordTiming] = field(default_factory=list)

    @property
    def time_to_first_audio_ms(self) -> float | None:
        """From the first text sent to the first audio received: the latency a listener notices."""
        if self.first_text_at is None or self.first_audio_at is None:
            return None
        return (self.first_audio_at - self.first_text_at) * 1000.0

    @property
    def audio_s(self) -> float:
        """Duration of the speech received (after `pre_skip`)."""
        return self.samples / self.sample_rate if self.sample_rate else 0.0

    @property
    def wall_s(self) -> float:
        """The whole run, playback included."""
        return (self.ended_at or time.monotonic()) - self.began_at

    @property
    def real_time_factor(self) -> float | None:
        """Synthesis time (first text to `done`) per second of audio; below 1 keeps up with playback."""
        if self.first_text_at is None or self.done_at is None or not self.samples:
            return None
        return (self.done_at - self.first_text_at) / self.audio_s


async def speak(
    conn: Connection,
    text: AsyncIterator[str],
    open_sink: Callable[[Started], AudioSink],
    stop: asyncio.Event,
    *,
    voice: str | None,
    lang: str,
    speed: float,
    codec: AudioCodec,
    sample_rate: int,
    on_word: Callable[[WordTiming], None] | None = None,
) -> SpeechReport:
    """Speak `text` on a new context of `conn`; setting `stop` cancels it (the report says `interrupted`).

    The sink is opened once the server has accepted the context (so a rejected `start` leaves no empty
    file behind) and is closed before returning. With `on_word`, the server times every word and
    `on_word` hears of each as playback reaches it; words never played (after a stop) are never
    announced, so `report.words_heard` is what the listener actually heard.
    """
    report = SpeechReport(began_at=time.monotonic())
    started = await conn.start(
        voice=voice, lang=lang, speed=speed, codec=codec, sample_rate=sample_rate, words=on_word is not None
    )
    if on_word is not None and not started.words:
        logger.warning("the server does not time words (it predates protocol 1.1)")
    report.sample_rate = started.sample_rate
    decoder = AudioDecoder(started)
    sink = open_sink(started)
    timeline = _WordTimeline(sink, on_word, report)
    announcer = asyncio.create_task(timeline.run())
    try:
        if not await _stream(conn, text, decoder, sink, stop, report, timeline):
            report.interrupted = True
            sink.close()
            await _cancel(conn)
        elif not await _drain(sink, stop):
            report.interrupted = True  # the context is done already; only playback needs stopping
        else:
            timeline.announce()  # the last words, reached as the drain finished
    finally:
        announcer.cancel()
        await asyncio.gather(announcer, return_exceptions=True)
        report.underruns = sink.underruns
        sink.close()
    report.ended_at = time.monotonic()
    return report


class _WordTimeline:
    """Words received, announced as playback reaches each one's start."""

    def __init__(
        self, sink: AudioSink, on_word: Callable[[WordTiming], None] | None, report: SpeechReport
    ) -> None:
        self._sink = sink
        self._on_word = on_word
        self._report = report
        self._pending: deque[WordTiming] = deque()

    def add(self, words: Words) -> None:
        if self._on_word is not None:
            self._pending.extend(words.words)

    def announce(self) -> None:
        """Announce every pending word whose start playback has reached."""
        if self._on_word is None:
            return
        position_ms = self._sink.position_s * 1000.0
        while self._pending and self._pending[0].start_ms <= position_ms:
            word = self._pending.popleft()
            self._report.words_heard.append(word)
            self._on_word(word)

    async def run(self) -> None:
        if self._on_word is None:
            return
        while True:
            self.announce()
            await asyncio.sleep(WORD_POLL_S)


async def _stream(
    conn: Connection,
    text: AsyncIterator[str],
    decoder: AudioDecoder,
    sink: AudioSink,
    stop: asyncio.Event,
    report: SpeechReport,
    timeline: _WordTimeline,
) -> bool:
    """Send text and play audio concurrently until `done` (True) or `stop` (False)."""
    sender = asyncio.create_task(_send(conn, text, report))
    receiver = asyncio.create_task(_receive(conn, decoder, sink, report, timeline))
    stopped = asyncio.create_task(stop.wait())
    try:
        return await _race(sender, receiver, stopped)
    finally:
        for task in (sender, receiver, stopped):
            task.cancel()
        await asyncio.gather(sender, receiver, stopped, return_exceptions=True)


async def _race(
    sender: asyncio.Task[None], receiver: asyncio.Task[None], stopped: asyncio.Task[bool]
) -> bool:
    """True once the context is done, False if stopped first; a failing sender or receiver raises."""
    pending: set[asyncio.Task[None] | asyncio.Task[bool]] = {sender, receiver, stopped}
    while True:
        finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in finished - {stopped}:
            task.result()
        if receiver in finished:
            return True
        if stopped in finished:
            return False


async def _drain(sink: AudioSink, stop: asyncio.Event) -> bool:
    """Let the sink play out what it holds (possibly many seconds); False if stopped first."""
    drained = asyncio.create_task(sink.drain())
    stopped = asyncio.create_task(stop.wait())
    try:
        finished, _ = await asyncio.wait({drained, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (drained, stopped):
            task.cancel()
        await asyncio.gather(drained, stopped, return_exceptions=True)
    if drained not in finished:
        return False
    drained.result()
    return True


async def _send(conn: Connection, text: AsyncIterator[str], report: SpeechReport) -> None:
    async for chunk in text:
        if report.first_text_at is None:
            report.first_text_at = time.monotonic()
        await conn.send_text(chunk)
    await conn.end()


async def _receive(
    conn: Connection, decoder: AudioDecoder, sink: AudioSink, report: SpeechReport, timeline: _WordTimeline
) -> None:
    async for msg in conn:
        if isinstance(msg, Audio):
            if report.first_audio_at is None:
                report.first_audio_at = time.monotonic()
            pcm = decoder.decode(msg)
            report.samples += len(pcm)
            await sink.write(pcm)
        elif isinstance(msg, Segment):
            logger.info("segment %d: %s", msg.segment, msg.text)
        elif isinstance(msg, Words):
            timeline.add(msg)
        elif isinstance(msg, Done):
            report.done_at = time.monotonic()
            if msg.reason is not DoneReason.END:
                raise StreamError(f"the server ended the context early (reason {msg.reason.value})")


async def _cancel(conn: Connection) -> None:
    """Ask the server to stop, and read until its `done` (or give up after a grace period)."""
    try:
        await conn.cancel()
        async with asyncio.timeout(CANCEL_GRACE_S):
            async for _ in conn:
                pass
    except TimeoutError:
        logger.warning("no confirmation from the server within %.0f s of cancelling", CANCEL_GRACE_S)
    except SpeakdClientError as exc:
        # The context may have finished just before the cancel arrived; either way we are done with it.
        logger.debug("while cancelling: %s", exc)
