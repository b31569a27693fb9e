"""The playback jitter buffer, kept free of any audio library so its behaviour can be tested directly.

Audio arrives in bursts (a sentence at a time) while the sound card pulls samples at a steady rate from
its own thread. The buffer absorbs the difference: it holds playback until `prebuffer_ms` is queued,
plays silence and waits for the pre-buffer again when it runs dry (an underrun), and makes the writer
wait while it is full, so a long text is slowed down rather than cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import numpy as np
import numpy.typing as npt


class JitterBuffer:
    """A bounded ring of int16 mono samples: async writers on the event loop, one reader on any thread."""

    def __init__(self, sample_rate: int, *, prebuffer_ms: int = 100, capacity_s: float = 30.0) -> None:
        capacity = int(sample_rate * capacity_s)
        self._prebuffer = sample_rate * prebuffer_ms // 1000
        if not 0 < self._prebuffer <= capacity:
            raise ValueError(f"pre-buffer of {prebuffer_ms} ms must be positive and fit in {capacity_s} s")
        self._ring = np.zeros(capacity, dtype=np.int16)
        self._head = 0
        self._size = 0
        self._playing = False
        self._finished = False
        self._underruns = 0
        self._played = 0
        self._lock = threading.Lock()
        # Coroutines waiting for the reader to make progress (space freed, queue emptied).
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def underruns(self) -> int:
        """Times playback ran dry before the end of the stream and had to pre-buffer again."""
        with self._lock:
            return self._underruns

    @property
    def played(self) -> int:
        """Samples of the stream handed to the reader so far (the silence of underruns not counted):
        where in the stream playback is, give or take the device's own latency."""
        with self._lock:
            return self._played

    @property
    def buffered(self) -> int:
        """Samples queued and not yet handed to the reader."""
        with self._lock:
            return self._size

    async def put(self, pcm: npt.NDArray[np.int16]) -> None:
        """Queue samples, waiting for the reader to free space while the buffer is full."""
        done = 0
        while done < len(pcm):
            with self._lock:
                written = self._write_locked(pcm[done:])
                progress = None if written else self._wait_locked()
            done += written
            if progress is not None:
                await progress.wait()

    async def drain(self) -> None:
        """Mark the stream complete and wait until the reader has taken every queued sample.

        Completion lets a final stretch shorter than the pre-buffer play, and running dry after it is
        the end of the stream, not an underrun.
        """
        while True:
            with self._lock:
                self._finished = True
                if not self._size:
                    return
                progress = self._wait_locked()
            await progress.wait()

    def read(self, frames: int) -> npt.NDArray[np.int16]:
        """Exactly `frames` samples for the sound card: queued audio, padded with silence when short."""
        out = np.zeros(frames, dtype=np.int16)
        with self._lock:
            if not self._playing and self._size and (self._size >= self._prebuffer or self._finished):
                self._playing = True
            taken = min(frames, self._size) if self._playing else 0
            self._read_locked(out[:taken])
            self._played += taken
            if self._playing and taken < frames:
                self._playing = False
                if not self._finished:
                    self._underruns += 1
            woken: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
            if taken:
                woken, self._waiters = self._waiters, []
        for loop, progress in woken:
            # Runs on the audio thread, which must never raise: a closed loop has nobody left to wake.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(progress.set)
        return out

    def _write_locked(self, pcm: npt.NDArray[np.int16]) -> int:
        capacity = len(self._ring)
        count = min(len(pcm), capacity - self._size)
        start = (self._head + self._size) % capacity
        first = min(count, capacity - start)
        self._ring[start : start + first] = pcm[:first]
        self._ring[: count - first] = pcm[first:count]
        self._size += count
        return count

    def _read_locked(self, out: npt.NDArray[np.int16]) -> None:
        capacity = len(self._ring)
        count = len(out)
        first = min(count, capacity - self._head)
        out[:first] = self._ring[self._head : self._head + first]
        out[first:] = self._ring[: count - first]
        self._head = (self._head + count) % capacity
        self._size -= count

    def _wait_locked(self) -> asyncio.Event:
        """An event the next read that consumes anything will set; call with the lock held."""
        progress = asyncio.Event()
        self._waiters.append((asyncio.get_running_loop(), progress))
        return progress
