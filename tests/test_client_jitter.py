"""The playback jitter buffer: pre-buffering, underrun and recovery, back-pressure, drain."""

import asyncio
import threading

import numpy as np
import numpy.typing as npt
import pytest

from speakd.client import JitterBuffer

RATE = 1000  # 1 sample per ms keeps the arithmetic readable


def ramp(start: int, count: int) -> npt.NDArray[np.int16]:
    """Distinct, recognisable samples, so every test can check order and identity, not just counts."""
    return np.arange(start, start + count, dtype=np.int16)


async def test_plays_silence_until_the_prebuffer_is_full() -> None:
    buf = JitterBuffer(RATE, prebuffer_ms=100)
    await buf.put(ramp(1, 60))
    assert not buf.read(20).any()
    assert buf.buffered == 60  # waiting consumed nothing
    await buf.put(ramp(61, 40))
    np.testing.assert_array_equal(buf.read(30), ramp(1, 30))
    assert buf.underruns == 0


async def test_underrun_pads_with_silence_then_prebuffers_again_before_resuming() -> None:
    buf = JitterBuffer(RATE, prebuffer_ms=100)
    await buf.put(ramp(1, 100))
    np.testing.assert_array_equal(buf.read(80), ramp(1, 80))
    out = buf.read(50)  # only 20 left: the rest of the block is silence
    np.testing.assert_array_equal(out[:20], ramp(81, 20))
    assert not out[20:].any()
    assert buf.underruns == 1

    await buf.put(ramp(101, 50))  # half a pre-buffer: still not enough to resume
    assert not buf.read(10).any()
    assert buf.underruns == 1  # waiting for the pre-buffer is not a second underrun
    await buf.put(ramp(151, 50))
    np.testing.assert_array_equal(buf.read(100), ramp(101, 100))  # resumes exactly where it stopped
    assert buf.underruns == 1


async def test_the_tail_after_drain_plays_without_a_full_prebuffer_and_is_no_underrun() -> None:
    buf = JitterBuffer(RATE, prebuffer_ms=100)
    await buf.put(ramp(1, 30))
    drained = asyncio.create_task(buf.drain())
    await asyncio.sleep(0)
    assert not drained.done()
    out = buf.read(50)
    np.testing.assert_array_equal(out[:30], ramp(1, 30))
    assert not out[30:].any()
    await asyncio.wait_for(drained, 1.0)
    assert buf.underruns == 0
    assert buf.buffered == 0


async def test_drain_returns_at_once_when_nothing_is_queued() -> None:
    buf = JitterBuffer(RATE)
    await asyncio.wait_for(buf.drain(), 1.0)


async def test_a_full_buffer_makes_the_writer_wait_and_loses_nothing() -> None:
    buf = JitterBuffer(RATE, prebuffer_ms=50, capacity_s=0.2)
    writer = asyncio.create_task(buf.put(ramp(1, 500)))
    await asyncio.sleep(0.05)
    assert not writer.done()
    assert buf.buffered == 200  # filled to capacity, not beyond

    played: list[npt.NDArray[np.int16]] = []
    while not writer.done():
        played.append(buf.read(70))
        assert buf.buffered <= 200
        await asyncio.sleep(0.001)  # let the woken writer refill
    await writer
    drained = asyncio.create_task(buf.drain())
    while not drained.done():
        played.append(buf.read(70))
        await asyncio.sleep(0.001)
    audio = np.concatenate(played)
    np.testing.assert_array_equal(audio[audio != 0], ramp(1, 500))


async def test_a_reader_thread_wakes_the_writer_and_drain() -> None:
    """The sound card reads on its own thread; wake-ups must cross into the event loop."""
    buf = JitterBuffer(RATE, prebuffer_ms=20, capacity_s=0.05)
    played: list[npt.NDArray[np.int16]] = []
    stop = threading.Event()

    def sound_card() -> None:
        while not stop.is_set():
            played.append(buf.read(10))
            stop.wait(0.001)

    card = threading.Thread(target=sound_card)
    card.start()
    try:
        await asyncio.wait_for(buf.put(ramp(1, 400)), 5.0)
        await asyncio.wait_for(buf.drain(), 5.0)
    finally:
        stop.set()
        card.join()
    audio = np.concatenate(played)
    # Silence (pre-buffering, any underrun) aside, every sample came out once and in order.
    np.testing.assert_array_equal(audio[audio != 0], ramp(1, 400))
    assert buf.buffered == 0


def test_a_prebuffer_larger_than_the_buffer_is_refused() -> None:
    with pytest.raises(ValueError, match="pre-buffer"):
        JitterBuffer(RATE, prebuffer_ms=500, capacity_s=0.1)
