"""Live playback: a `JitterBuffer` drained by a PortAudio callback stream (via sounddevice).

Everything that decides what to play lives in the jitter buffer; this module only opens the device
and copies samples into PortAudio's buffers, so it stays thin enough to trust without a sound card.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import NoAudioDevice
from .jitter import JitterBuffer

logger = logging.getLogger(__name__)

_HINT = "write the audio to a file instead with --out FILE.wav"


class Player:
    """Plays int16 mono PCM on the default output device as it is written; `drain` waits for the end."""

    def __init__(self, sample_rate: int, *, prebuffer_ms: int = 100, capacity_s: float = 30.0) -> None:
        self._sample_rate = sample_rate
        self._buffer = JitterBuffer(sample_rate, prebuffer_ms=prebuffer_ms, capacity_s=capacity_s)
        self._stream = _open_output_stream(sample_rate, self._callback)
        self._closed = False

    @property
    def underruns(self) -> int:
        """Times playback ran dry mid-stream (the network or the synthesizer fell behind)."""
        return self._buffer.underruns

    @property
    def position_s(self) -> float:
        """Seconds of the stream heard so far: handed to PortAudio, less what its buffers still hold."""
        return max(0.0, self._buffer.played / self._sample_rate - float(self._stream.latency))

    async def write(self, pcm: npt.NDArray[np.int16]) -> None:
        """Queue audio; waits while the buffer is full instead of dropping anything."""
        await self._buffer.put(pcm)

    async def drain(self) -> None:
        """Return once everything written has been heard, including what PortAudio still holds."""
        await self._buffer.drain()
        await asyncio.sleep(float(self._stream.latency))

    def close(self) -> None:
        """Stop at once (queued audio is dropped); safe to call again."""
        if self._closed:
            return
        self._closed = True
        self._stream.abort()
        self._stream.close()

    def _callback(self, outdata: Any, frames: int, time: Any, status: Any) -> None:
        """PortAudio's thread asks for `frames` samples; never block here, never raise."""
        if status.output_underflow:
            logger.debug("PortAudio output underflow")
        outdata[:, 0] = self._buffer.read(frames)


def _open_output_stream(sample_rate: int, callback: Any) -> Any:
    """A started sounddevice.OutputStream, or `NoAudioDevice` saying how to do without one."""
    try:
        # Imported here: loading PortAudio fails with OSError on machines without it, and only
        # live playback needs it.
        import sounddevice
    except OSError as exc:
        raise NoAudioDevice(f"cannot load the PortAudio library ({exc}); {_HINT}") from exc
    try:
        stream = sounddevice.OutputStream(
            samplerate=sample_rate, channels=1, dtype="int16", callback=callback
        )
    except (sounddevice.PortAudioError, ValueError) as exc:
        raise NoAudioDevice(f"no usable audio output device ({exc}); {_HINT}") from exc
    try:
        stream.start()
    except sounddevice.PortAudioError as exc:
        stream.close(ignore_errors=True)
        raise NoAudioDevice(f"cannot start audio output ({exc}); {_HINT}") from exc
    return stream
