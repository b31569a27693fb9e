"""`speak()`: the text/audio pipeline, its report, and stopping at each stage."""

import asyncio
from collections.abc import AsyncIterator, Callable

import numpy as np
import numpy.typing as npt
from websockets.asyncio.server import ServerConnection, serve

from speakd.client import Connection
from speakd.client.speak import SpeechReport, speak
from speakd.protocol import (
    PATH,
    Audio,
    AudioCodec,
    Cancel,
    ClientMessage,
    Done,
    DoneReason,
    End,
    Segment,
    Start,
    Started,
    Text,
    Words,
    WordTiming,
    decode_client,
    encode,
)

FRAME = 480
WORDS = (
    WordTiming(word="Hi", start_ms=5.0, end_ms=20.0, char_start=0, char_end=2),
    WordTiming(word="there", start_ms=40.0, end_ms=55.0, char_start=3, char_end=8),
)


class RecordingSink:
    """Keeps what it is given; `drain` can be made to hang like a long tail of speech still playing."""

    def __init__(self, drain_forever: bool = False) -> None:
        self.pcm: list[npt.NDArray[np.int16]] = []
        self.drain_forever = drain_forever
        self.draining = asyncio.Event()
        self.drained = False
        self.closed = False
        self.position_s = 0.0  # where "playback" is: tests move it

    async def write(self, pcm: npt.NDArray[np.int16]) -> None:
        self.pcm.append(pcm)

    async def drain(self) -> None:
        self.draining.set()
        if self.drain_forever:
            await asyncio.Event().wait()
        self.drained = True

    def close(self) -> None:
        self.closed = True

    @property
    def underruns(self) -> int:
        return 0


async def daemon(ws: ServerConnection, received: list[ClientMessage]) -> None:
    """pcm16 speech after `end`: one segment of three frames of value 1, 2, 3; `cancel` answered."""
    async for frame in ws:
        assert isinstance(frame, bytes)
        msg = decode_client(frame)
        received.append(msg)
        if isinstance(msg, Start):
            words = msg.words
            await ws.send(encode(Started(voice="v", codec=AudioCodec.PCM16, words=words)))
        elif isinstance(msg, End):
            await ws.send(encode(Segment(segment=0, text="Hi there.", start_ms=0.0)))
            if words:
                await ws.send(encode(Words(segment=0, words=WORDS)))
            for seq in range(3):
                data = np.full(FRAME, seq + 1, dtype="<i2").tobytes()
                await ws.send(encode(Audio(segment=0, seq=seq, data=data, samples=FRAME)))
            await ws.send(encode(Done(reason=DoneReason.END, audio_ms=60.0, segments=1)))
        elif isinstance(msg, Cancel):
            await ws.send(encode(Done(reason=DoneReason.CANCEL, audio_ms=0.0, segments=0)))


async def run(
    text: AsyncIterator[str],
    sink: RecordingSink,
    stop: asyncio.Event,
    on_word: Callable[[WordTiming], None] | None = None,
) -> tuple[list[ClientMessage], SpeechReport]:
    received: list[ClientMessage] = []

    async def handler(ws: ServerConnection) -> None:
        await daemon(ws, received)

    async with serve(handler, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}{PATH}"
        async with await Connection.open(url) as conn:
            report = await speak(
                conn,
                text,
                lambda started: sink,
                stop,
                voice=None,
                lang="en-us",
                speed=1.0,
                codec=AudioCodec.PCM16,
                sample_rate=24000,
                on_word=on_word,
            )
    return received, report


async def chunks(*parts: str) -> AsyncIterator[str]:
    for part in parts:
        yield part


async def test_speaks_reports_and_drains() -> None:
    sink = RecordingSink()
    received, report = await run(chunks("Hi", "."), sink, asyncio.Event())
    assert received == [Start(codec=AudioCodec.PCM16), Text(text="Hi"), Text(text="."), End()]
    np.testing.assert_array_equal(np.concatenate(sink.pcm), np.repeat(np.arange(1, 4, dtype=np.int16), FRAME))
    assert sink.drained
    assert not report.interrupted
    assert report.samples == 3 * FRAME
    assert report.audio_s == 0.06
    assert report.time_to_first_audio_ms is not None and report.time_to_first_audio_ms >= 0
    assert report.real_time_factor is not None


async def test_stopping_while_text_is_still_coming_cancels_the_context() -> None:
    stop = asyncio.Event()

    async def endless() -> AsyncIterator[str]:
        yield "Once upon a time"
        stop.set()
        await asyncio.Event().wait()
        yield "never"

    sink = RecordingSink()
    received, report = await asyncio.wait_for(run(endless(), sink, stop), 5.0)
    assert received == [Start(codec=AudioCodec.PCM16), Text(text="Once upon a time"), Cancel()]
    assert report.interrupted
    assert sink.closed


async def test_stopping_while_the_tail_plays_stops_playback_without_cancelling() -> None:
    stop = asyncio.Event()
    sink = RecordingSink(drain_forever=True)
    task = asyncio.create_task(run(chunks("Hi."), sink, stop))
    await asyncio.wait_for(sink.draining.wait(), 5.0)
    assert len(np.concatenate(sink.pcm)) == 3 * FRAME
    stop.set()
    received, report = await asyncio.wait_for(task, 5.0)
    assert report.interrupted
    assert sink.closed
    assert not any(isinstance(msg, Cancel) for msg in received)  # the context was already done


async def test_words_are_announced_as_playback_reaches_them_and_unplayed_ones_never() -> None:
    stop = asyncio.Event()
    sink = RecordingSink(drain_forever=True)
    heard: list[str] = []
    task = asyncio.create_task(run(chunks("Hi there."), sink, stop, on_word=lambda w: heard.append(w.word)))
    await asyncio.wait_for(sink.draining.wait(), 5.0)
    await asyncio.sleep(0.1)
    assert heard == []  # nothing played yet
    sink.position_s = 0.030  # past "Hi" (5 ms), before "there" (40 ms)
    for _ in range(100):
        if heard:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert heard == ["Hi"]
    stop.set()  # the listener barges in: "there" was never heard
    received, report = await asyncio.wait_for(task, 5.0)
    assert isinstance(received[0], Start) and received[0].words
    assert [w.word for w in report.words_heard] == ["Hi"] and report.interrupted


async def test_without_on_word_no_words_are_asked_for() -> None:
    received, report = await run(chunks("Hi."), RecordingSink(), asyncio.Event())
    assert isinstance(received[0], Start) and not received[0].words
    assert report.words_heard == []
