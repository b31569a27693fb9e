"""`audio` messages -> int16 mono PCM, ready for a sound card or a WAV file.

Opus packets are decoded in `seq` order by one stateful decoder per context, and the encoder's
look-ahead (`pre_skip` from `started`) is cut from the front, as an Ogg Opus player would.
"""

from typing import Any

import numpy as np
import numpy.typing as npt
import opuslib

from speakd.protocol import Audio, AudioCodec, Started

from .errors import StreamError

_MAX_OPUS_PACKET_MS = 120


class AudioDecoder:
    """Decodes one context's audio; build it from that context's `started` and feed every `audio`."""

    def __init__(self, started: Started) -> None:
        self.sample_rate = started.sample_rate
        self._to_skip = started.pre_skip
        self._next_seq = 0
        self._opus: Any = (
            opuslib.Decoder(started.sample_rate, 1) if started.codec is AudioCodec.OPUS else None
        )
        # Room for the longest packet Opus allows, so a frame of the wrong size is reported as such.
        self._max_opus_samples = started.sample_rate * _MAX_OPUS_PACKET_MS // 1000

    def decode(self, audio: Audio) -> npt.NDArray[np.int16]:
        """PCM for one frame, minus whatever part of it still falls in `pre_skip` (may be empty)."""
        if audio.seq != self._next_seq:
            # Opus decoding is stateful: a gap or reordering would corrupt everything after it.
            raise StreamError(f"audio seq {audio.seq} arrived where {self._next_seq} was expected")
        self._next_seq += 1
        pcm = self._decode_opus(audio) if self._opus is not None else self._decode_pcm16(audio)
        if len(pcm) != audio.samples:
            raise StreamError(f"audio seq {audio.seq} decoded to {len(pcm)} samples, not {audio.samples}")
        skipped = min(self._to_skip, len(pcm))
        self._to_skip -= skipped
        return pcm[skipped:]

    def _decode_opus(self, audio: Audio) -> npt.NDArray[np.int16]:
        try:
            raw = bytes(self._opus.decode(audio.data, self._max_opus_samples))
        except opuslib.OpusError as exc:
            raise StreamError(f"audio seq {audio.seq} is not a valid Opus packet: {exc}") from exc
        return np.frombuffer(raw, dtype=np.int16).copy()

    def _decode_pcm16(self, audio: Audio) -> npt.NDArray[np.int16]:
        if len(audio.data) % 2:
            raise StreamError(f"audio seq {audio.seq} has an odd number of pcm16 bytes")
        return np.frombuffer(audio.data, dtype="<i2").astype(np.int16)
