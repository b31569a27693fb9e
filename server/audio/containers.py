"""Streaming encoders for the OpenAI speech API's `response_format`s: audio in as synthesized, bytes out.

An HTTP client asking for `mp3`, `opus`, `aac`, `flac`, `wav` or `pcm` expects one ordinary file, but
speakd renders speech window by window and should send each window as soon as it exists. So every
encoder here takes the model's 24 kHz float audio in pieces of any length and returns, after each
piece, the container bytes that piece completed: the response body can be streamed while the rest of
the text is still being synthesized, and the concatenated bytes are a valid file of that format.

The compressed formats run PyAV (FFmpeg) muxers on a write-only, non-seekable sink. Non-seekable is
deliberate: muxers that would seek back to patch a header (FLAC's STREAMINFO totals, MP3's Xing
frame) then leave it as written at the start, which is valid for streaming (lengths "unknown"),
instead of rewriting bytes that have already gone out on the wire. `wav` and `pcm` need no codec:
WAV gets a hand-written header whose sizes say "unknown" (0xFFFFFFFF), as a stream's must.
"""

from __future__ import annotations

import abc
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Final

import av
import av.error
import numpy as np
import numpy.typing as npt
from av.audio.stream import AudioStream
from av.container import OutputContainer

from speakd.server.audio.encoders import MODEL_RATE, Frame
from speakd.server.audio.resample import StreamingResampler

__all__ = [
    "CONTENT_TYPES",
    "FORMATS",
    "ContainerEncoder",
    "ContainerError",
    "open_container_encoder",
]

_log = logging.getLogger(__name__)

CONTENT_TYPES: Final[dict[str, str]] = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
"""Content-Type of each `response_format`."""

FORMATS: Final[tuple[str, ...]] = ("mp3", "opus", "aac", "flac", "wav", "pcm")
DECODER_LEAD_SAMPLES: Final[dict[str, int]] = {"mp3": 1105, "aac": 1024}
"""Codec priming, in 24 kHz samples, that decoders play before the audio because the stream cannot
say to skip it: LAME's encoder delay plus its decoder's 529 samples (a stream has no Xing/LAME frame)
and AAC's 1024 (ADTS has no field for it). Ogg Opus records its pre-skip, which decoders remove; pcm,
wav and flac have none. Measured with FFmpeg's decoders (tests/test_openai_speech.py checks them)."""
"""The `response_format`s offered, in the order the OpenAI API lists them."""

_INT16_SCALE = 32767.0
_UNKNOWN_SIZE = 0xFFFFFFFF


class ContainerError(RuntimeError):
    """The codec or muxer failed (an FFmpeg error); the encoder is closed and the stream is unusable."""


@dataclass(frozen=True, slots=True)
class _AvSpec:
    """How one compressed format is made with PyAV: which muxer, which codec, which settings."""

    muxer: str
    codec: str
    sample_format: str
    """Sample format the frames are handed to the codec in (one it takes natively, so no conversion)."""
    bit_rate: int
    """Target bit/s; 0 for a lossless codec."""
    codec_options: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))
    muxer_options: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))
    needs_a_packet: bool = False
    """A stream without a single audio packet does not decode (no frame to sync on or probe), so an
    encoder that received no audio at all encodes one codec frame of silence at `finish`."""


_FLUSH_EACH_PACKET = {"flush_packets": "1"}
"""FFmpeg's I/O layer buffers 32 KiB before it writes; these are streams, so every packet goes out."""

_AV_SPECS: Final[dict[str, _AvSpec]] = {
    # MPEG-2 Layer III at 24 kHz: 576-sample frames, constant 64 kbit/s. No ID3v2 tag (it would only
    # carry "Lavf"), so the stream is bare frames that can be cut or concatenated anywhere. The Xing/LAME
    # frame needs the total length up front; it is off anyway on a non-seekable sink, and off here by
    # name. Without it, decoders do not trim LAME's priming (about 47 ms of leading silence).
    "mp3": _AvSpec(
        muxer="mp3",
        codec="libmp3lame",
        sample_format="fltp",
        bit_rate=64000,
        muxer_options=MappingProxyType({**_FLUSH_EACH_PACKET, "id3v2_version": "0", "write_xing": "0"}),
        needs_a_packet=True,
    ),
    # Ogg Opus, 20 ms frames at a 32 kbit/s VBR target. "audio" rather than "voip": VOIP's high-pass
    # is meant for microphone rumble and only costs waveform fidelity on synthetic speech (see
    # OpusFrameEncoder). A page is cut once it holds 60 ms of packets: a page header costs ~28 bytes,
    # 11 kbit/s at one page per 20 ms packet but under 4 kbit/s at 60 ms, and at most 60 ms of encoded
    # audio then waits in the muxer between calls. The trailer closes the last page (EOS).
    "opus": _AvSpec(
        muxer="ogg",
        codec="libopus",
        sample_format="flt",
        bit_rate=32000,
        codec_options=MappingProxyType({"application": "audio", "vbr": "on", "frame_duration": "20"}),
        muxer_options=MappingProxyType({**_FLUSH_EACH_PACKET, "page_duration": "60000"}),
        needs_a_packet=True,
    ),
    # FFmpeg's native AAC-LC in ADTS: every 1024-sample frame carries its own header, the usual way to
    # stream AAC without MP4. Decoders do not trim the 1024-sample priming ADTS cannot describe.
    "aac": _AvSpec(
        muxer="adts",
        codec="aac",
        sample_format="fltp",
        bit_rate=64000,
        muxer_options=MappingProxyType(_FLUSH_EACH_PACKET),
        needs_a_packet=True,
    ),
    # FLAC from the same s16 samples `wav` and `pcm` carry. STREAMINFO goes out before the length and
    # MD5 are known and, the sink being non-seekable, stays that way (0 = unknown, which the format
    # allows). No padding block: 8 KiB reserved for tags that could never be written back.
    "flac": _AvSpec(
        muxer="flac",
        codec="flac",
        sample_format="s16",
        bit_rate=0,
        muxer_options=MappingProxyType({**_FLUSH_EACH_PACKET, "metadata_header_padding": "0"}),
    ),
}


def _to_int16(samples: npt.NDArray[np.float32]) -> npt.NDArray[np.int16]:
    """Clip first so overshoot saturates instead of wrapping; the same scale as the wire's pcm16."""
    scaled: npt.NDArray[np.float32] = np.rint(np.clip(samples, -1.0, 1.0) * np.float32(_INT16_SCALE))
    return scaled.astype(np.int16)


def _wav_header(sample_rate: int) -> bytes:
    """44-byte RIFF/WAVE header for mono s16le of unknown length: both sizes are 0xFFFFFFFF."""
    fmt_chunk = struct.pack("<HHIIHH", 1, 1, sample_rate, sample_rate * 2, 2, 16)
    return b"".join(
        [
            b"RIFF",
            struct.pack("<I", _UNKNOWN_SIZE),
            b"WAVE",
            b"fmt ",
            struct.pack("<I", len(fmt_chunk)),
            fmt_chunk,
            b"data",
            struct.pack("<I", _UNKNOWN_SIZE),
        ]
    )


class _ByteSink:
    """The muxer's output file: appends what FFmpeg writes until `drain` hands it out.

    It has `write` only: PyAV treats a file object without `seek`/`tell` as non-seekable, so FFmpeg
    never tries to rewrite bytes that have already been returned (see the module docstring).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        return len(data)

    def drain(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


class ContainerEncoder(abc.ABC):
    """One response body in one format: 24 kHz float audio in pieces, the file's bytes out as they exist.

    Each `encode` returns the bytes its piece completed (codecs hold back up to a frame plus their
    lookahead, and Ogg up to a page, until later audio or `finish` pushes it out); `finish` flushes
    the codec and writes the container's trailer. The bytes of all calls, concatenated, are the
    file. Not thread-safe: one thread at a time per encoder, as the pipeline's encoder stage calls it.

    The input is always the model's 24 kHz audio; `sample_rate` is the file's rate, and audio is
    resampled to it if it differs. `Frame.samples` counts input (24 kHz) samples consumed.
    """

    format: str
    content_type: str
    sample_rate: int
    pre_skip: int = 0
    """Kept for duck-typing with FrameEncoder: containers carry their own delay information, if any."""

    def __init__(self, fmt: str, sample_rate: int) -> None:
        self.format = fmt
        self.content_type = CONTENT_TYPES[fmt]
        self.sample_rate = sample_rate
        self._resampler = StreamingResampler(MODEL_RATE, sample_rate)
        self._state = "open"

    def encode(self, audio24k: npt.NDArray[np.float32], *, end_of_segment: bool) -> list[Frame]:
        """Feed the next piece (any length, possibly empty); returns the bytes that are ready, if any.

        `end_of_segment` only lets the resampler (if any) emit the segment's tail now; nothing is
        padded, so how the audio was cut into segments and pieces does not change the file.
        """
        self._check_open("encode")
        samples = np.asarray(audio24k, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"expected a mono 1-D block, got shape {samples.shape}")
        resampled = self._resampler.process(samples)
        if end_of_segment:
            resampled = np.concatenate([resampled, self._resampler.flush()])
        self._guarded(lambda: self._write(np.clip(resampled, -1.0, 1.0)))
        data = self._drain()
        return [Frame(data, len(samples))] if data or len(samples) else []

    def finish(self) -> list[Frame]:
        """Flush the codec and write the trailer: the rest of the file (one frame of 0 samples, or none).

        The encoder is spent afterwards: `encode` and `finish` raise, `close` does nothing.
        """
        self._check_open("finish")
        tail = np.clip(self._resampler.flush(), -1.0, 1.0)
        self._guarded(lambda: self._finish(tail))
        data = self._drain()
        self._state = "finished"
        return [Frame(data, 0)] if data else []

    def close(self) -> None:
        """Drop the stream without producing its end (a cancelled response); idempotent."""
        if self._state == "open":
            self._state = "closed"
        self._release()

    def _check_open(self, what: str) -> None:
        if self._state != "open":
            raise RuntimeError(f"{what}() on the {self.format} encoder, which is already {self._state}")

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run a codec step; on an FFmpeg error, release everything and raise a ContainerError."""
        try:
            step()
        except av.error.FFmpegError as exc:
            self._state = "closed"
            self._release()
            raise ContainerError(f"{self.format} encoder failed: {exc}") from exc

    @abc.abstractmethod
    def _write(self, samples: npt.NDArray[np.float32]) -> None:
        """Encode samples at `sample_rate`, already clipped to [-1, 1]."""

    @abc.abstractmethod
    def _finish(self, tail: npt.NDArray[np.float32]) -> None:
        """Encode the resampler's tail, then flush the codec and close the container."""

    @abc.abstractmethod
    def _drain(self) -> bytes:
        """The bytes produced since the last drain."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Free codec and muxer resources, if any, without producing anything more; idempotent."""


class _RawEncoder(ContainerEncoder):
    """`pcm` (bare s16le) and `wav` (the same after a 44-byte header): no codec, nothing held back."""

    def __init__(self, fmt: str, sample_rate: int) -> None:
        super().__init__(fmt, sample_rate)
        self._pending = bytearray(_wav_header(sample_rate) if fmt == "wav" else b"")

    def _write(self, samples: npt.NDArray[np.float32]) -> None:
        self._pending += _to_int16(samples).astype("<i2", copy=False).tobytes()

    def _finish(self, tail: npt.NDArray[np.float32]) -> None:
        """No trailer: the header already says the length is unknown."""
        self._write(tail)

    def _drain(self) -> bytes:
        data = bytes(self._pending)
        self._pending.clear()
        return data

    def _release(self) -> None:
        self._pending.clear()


class _AvEncoder(ContainerEncoder):
    """A PyAV codec and muxer writing into a `_ByteSink`; see `_AV_SPECS` for each format's settings.

    The container is opened, and its header written into the sink, at construction: a bad setting
    fails there, and the header goes out with the first audio. PyAV's encoder cuts the audio into the
    codec's fixed frame size (576 mp3, 480 opus, 1024 aac, 2304 flac samples at 24 kHz) and keeps the
    remainder for the next call; `finish` encodes that remainder as a short last frame.
    """

    def __init__(self, fmt: str, sample_rate: int, spec: _AvSpec) -> None:
        super().__init__(fmt, sample_rate)
        self._spec = spec
        self._sink = _ByteSink()
        self._time_base = Fraction(1, sample_rate)
        self._pts = 0  # samples handed to the codec so far, at `sample_rate`
        try:
            options = dict(spec.muxer_options)
            container = av.open(self._sink, "w", format=spec.muxer, container_options=options)
        except av.error.FFmpegError as exc:
            raise ContainerError(f"cannot open a {spec.muxer} muxer for {fmt}: {exc}") from exc
        try:
            stream = container.add_stream(spec.codec, rate=sample_rate, options=dict(spec.codec_options))
            if not isinstance(stream, AudioStream):
                raise ContainerError(f"{spec.codec} is not an audio codec")
            stream.layout = "mono"
            stream.format = spec.sample_format
            if spec.bit_rate:
                stream.bit_rate = spec.bit_rate
            container.start_encoding()  # opens the codec and writes the header into the sink
        except av.error.FFmpegError as exc:
            container.close()
            raise ContainerError(f"cannot set up {spec.codec} for {fmt} at {sample_rate} Hz: {exc}") from exc
        except BaseException:
            container.close()
            raise
        self._container: OutputContainer | None = container
        self._stream: AudioStream | None = stream

    def _write(self, samples: npt.NDArray[np.float32]) -> None:
        if not len(samples):
            return
        container, stream = self._open_parts()
        pcm = _to_int16(samples) if self._spec.sample_format == "s16" else samples
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format=self._spec.sample_format, layout="mono")
        frame.sample_rate = self.sample_rate
        frame.time_base = self._time_base
        frame.pts = self._pts
        self._pts += len(samples)
        container.mux(stream.encode(frame))

    def _finish(self, tail: npt.NDArray[np.float32]) -> None:
        """Encode the tail, flush the codec (its held-back frame and lookahead), write the trailer."""
        self._write(tail)
        container, stream = self._open_parts()
        if self._pts == 0 and self._spec.needs_a_packet:
            self._write(np.zeros(max(1, stream.codec_context.frame_size), dtype=np.float32))
        container.mux(stream.encode(None))
        self._container = self._stream = None
        container.close()

    def _drain(self) -> bytes:
        return self._sink.drain()

    def _release(self) -> None:
        """Close the container (its trailer goes into the sink, which is then emptied) and drop the codec."""
        container, self._container, self._stream = self._container, None, None
        if container is None:
            return
        try:
            container.close()
        except av.error.FFmpegError as exc:
            _log.debug("closing a %s encoder: %s", self.format, exc)
        self._sink.drain()

    def _open_parts(self) -> tuple[OutputContainer, AudioStream]:
        if self._container is None or self._stream is None:
            raise RuntimeError(f"the {self.format} encoder's container is closed")
        return self._container, self._stream


def open_container_encoder(fmt: str, sample_rate: int = MODEL_RATE) -> ContainerEncoder:
    """A fresh encoder for one response body in `fmt` (one of FORMATS), at `sample_rate` Hz.

    Raises ValueError for an unknown format or a rate the format's codec cannot encode, and
    ContainerError if this PyAV build lacks the codec or muxer.
    """
    if fmt not in CONTENT_TYPES:
        raise ValueError(f"unknown response format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if sample_rate <= 0:
        raise ValueError(f"sample rate must be positive, got {sample_rate}")
    spec = _AV_SPECS.get(fmt)
    if spec is None:
        return _RawEncoder(fmt, sample_rate)
    try:
        rates = av.Codec(spec.codec, "w").audio_rates
    except (ValueError, av.error.FFmpegError) as exc:  # PyAV's UnknownCodecError is a ValueError
        raise ContainerError(f"this PyAV build has no {spec.codec} encoder for {fmt}: {exc}") from exc
    if rates is not None and sample_rate not in rates:
        raise ValueError(f"{fmt} cannot be encoded at {sample_rate} Hz; use one of {sorted(rates)}")
    return _AvEncoder(fmt, sample_rate, spec)
