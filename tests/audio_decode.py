"""Decode what the OpenAI door returns with a real decoder (FFmpeg through PyAV) to 24 kHz PCM16."""

from __future__ import annotations

import io
from typing import Any

import av
import numpy as np

RATE = 24000
DEMUXERS = {"mp3": "mp3", "opus": "ogg", "aac": "aac", "flac": "flac", "wav": "wav"}


def decode(data: bytes, response_format: str) -> np.ndarray[Any, np.dtype[np.int16]]:
    """Mono 24 kHz PCM16 of a whole response body in `response_format`."""
    if response_format == "pcm":
        return np.frombuffer(data, dtype="<i2").copy()
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    chunks: list[np.ndarray[Any, np.dtype[np.int16]]] = []
    with av.open(io.BytesIO(data), mode="r", format=DEMUXERS[response_format]) as container:
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1).astype(np.int16))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1).astype(np.int16))
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
