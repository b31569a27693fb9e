"""A WAV file as the audio sink: for machines without speakers, for keeping the speech, and for tests."""

from __future__ import annotations

import os
import wave

import numpy as np
import numpy.typing as npt


class WavWriter:
    """Writes 16-bit mono PCM to a WAV file as it arrives, so an interrupted run keeps what it got."""

    def __init__(self, path: str | os.PathLike[str], sample_rate: int) -> None:
        self._wav = wave.open(os.fspath(path), "wb")  # noqa: SIM115 - held open across writes; close() ends it
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(sample_rate)
        self._sample_rate = sample_rate
        self._written = 0
        self._closed = False

    async def write(self, pcm: npt.NDArray[np.int16]) -> None:
        """Append samples (little-endian, as WAV requires)."""
        self._wav.writeframes(pcm.astype("<i2").tobytes())
        self._written += len(pcm)

    @property
    def position_s(self) -> float:
        """Seconds of the stream in the file so far: a file "plays" as fast as it is written."""
        return self._written / self._sample_rate

    async def drain(self) -> None:
        """Nothing is queued: every write went straight to the file."""

    @property
    def underruns(self) -> None:
        """A file is never starved: writes just wait for the network."""

    def close(self) -> None:
        """Finish the header with the final length; safe to call again."""
        if not self._closed:
            self._closed = True
            self._wav.close()
