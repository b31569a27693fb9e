"""Streaming container encoders: each format's bytes flow before the end, decode to the input, end cleanly.

Every format is fed the same speech-like signal in deliberately uneven pieces (including empty and
one-sample ones) and the concatenated bytes are decoded with PyAV (numpy for `pcm`): the rate, the
channel count, the duration (lossy codecs may add priming and padding, never lose the tail), the
waveform after aligning away the codec delay, and the quiet ending are all checked.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from itertools import cycle

import av
import numpy as np
import numpy.typing as npt
import pytest

from speakd.server.audio.containers import (
    CONTENT_TYPES,
    FORMATS,
    ContainerEncoder,
    ContainerError,
    open_container_encoder,
)
from speakd.server.audio.resample import resample

RATE = 24000
PIECES = (1000, 7, 4800, 0, 12345, 1, 333, 2400, 9999, 480, 0, 2047)
"""Uneven piece lengths, cycled: empty and one-sample pieces, none aligned to any codec frame."""

LOSSY = ("mp3", "opus", "aac")
LOSSLESS = ("flac", "wav", "pcm")
DEMUXERS = {"mp3": "mp3", "opus": "ogg", "aac": "aac", "flac": "flac", "wav": "wav"}
"""Demuxer per format. Short ADTS streams do not probe reliably, so the format is always named."""

MAX_EXTRA_S = 0.100
"""Decoded audio may exceed the input by codec priming and padding (mp3, aac: up to ~85 ms), no more."""


def speech_like(seconds: float = 2.5) -> npt.NDArray[np.float32]:
    """Harmonics of a gliding pitch under a syllable-rate envelope; the last 200 ms are silent."""
    n = round(seconds * RATE)
    t = np.arange(n) / RATE
    f0 = 150.0 + 40.0 * np.sin(2 * np.pi * 0.7 * t) + 15.0 * np.sin(2 * np.pi * 2.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    voice = sum(np.sin(k * phase + 0.4 * k) / k for k in range(1, 16))
    syllables = 0.35 + 0.65 * np.sin(np.pi * 3.5 * t) ** 2
    fade = np.clip((seconds - 0.2 - t) / 0.3, 0.0, 1.0)  # fades out over 0.3 s, then silence
    signal: npt.NDArray[np.float64] = voice * syllables * fade
    peak = float(np.max(np.abs(signal)))
    return (0.6 / peak * signal).astype(np.float32)


@dataclass
class Streamed:
    data: bytes
    first_bytes_at: int | None
    """Input samples fed when the first non-empty bytes came back (None: only at finish)."""
    samples_reported: int


def stream(
    encoder: ContainerEncoder, audio: npt.NDArray[np.float32], pieces: tuple[int, ...] = PIECES
) -> Streamed:
    """Feed `audio` in `pieces` (cycled), the last piece ending the segment, then finish."""
    out = bytearray()
    fed = reported = 0
    first: int | None = None
    sizes = cycle(pieces)
    while fed < len(audio):
        piece = audio[fed : fed + next(sizes)]
        fed += len(piece)
        frames = encoder.encode(piece, end_of_segment=fed == len(audio))
        assert len(frames) <= 1
        if not len(piece):
            assert all(f.samples == 0 for f in frames)
        for frame in frames:
            assert frame.samples == len(piece)
            reported += frame.samples
            if frame.data and first is None:
                first = fed
            out += frame.data
    tail = encoder.finish()
    assert all(f.samples == 0 and f.data for f in tail)
    out += b"".join(f.data for f in tail)
    return Streamed(bytes(out), first, reported)


@dataclass
class Decoded:
    samples: npt.NDArray[np.generic]
    rate: int
    channels: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate

    def as_float24k(self) -> npt.NDArray[np.float32]:
        x = self.samples.astype(np.float32)
        if self.samples.dtype == np.int16:
            x /= np.float32(32767.0)
        return x if self.rate == RATE else resample(x, self.rate, RATE)


def decode(data: bytes, fmt: str) -> Decoded:
    if fmt == "pcm":
        return Decoded(np.frombuffer(data, dtype="<i2").astype(np.int16), RATE, 1)
    with av.open(io.BytesIO(data), "r", format=DEMUXERS[fmt]) as container:
        audio = container.streams.audio[0]
        rate, channels = audio.codec_context.sample_rate, audio.codec_context.channels
        chunks = [frame.to_ndarray().reshape(-1) for frame in container.decode(audio)]
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return Decoded(samples, rate, channels)


def best_alignment(decoded: npt.NDArray[np.float32], reference: npt.NDArray[np.float32]) -> float:
    """Normalized correlation of `reference` with `decoded` at the lag (the codec delay) that fits best."""
    size = 1 << (len(decoded) + len(reference)).bit_length()
    xcorr = np.fft.irfft(np.fft.rfft(decoded, size) * np.conj(np.fft.rfft(reference, size)), size)
    lags = np.r_[0:4800, size - 240 : size]  # up to 200 ms late, 10 ms early
    lag = int(lags[np.argmax(xcorr[lags])])
    lag = lag - size if lag > size // 2 else lag
    padded = np.concatenate([np.zeros(max(0, -lag)), decoded, np.zeros(len(reference))])
    window = padded[max(0, lag) : max(0, lag) + len(reference)]
    return float(np.dot(window, reference) / (np.linalg.norm(window) * np.linalg.norm(reference)))


def to_int16(audio: npt.NDArray[np.float32]) -> npt.NDArray[np.int16]:
    scaled: npt.NDArray[np.float32] = np.rint(np.clip(audio, -1.0, 1.0) * np.float32(32767.0))
    return scaled.astype(np.int16)


@pytest.fixture(scope="module")
def audio() -> npt.NDArray[np.float32]:
    return speech_like()


@pytest.fixture(scope="module", params=FORMATS)
def streamed(request: pytest.FixtureRequest, audio: npt.NDArray[np.float32]) -> tuple[str, Streamed]:
    fmt: str = request.param
    encoder = open_container_encoder(fmt)
    try:
        return fmt, stream(encoder, audio)
    finally:
        encoder.close()


def test_formats_and_content_types() -> None:
    assert FORMATS == ("mp3", "opus", "aac", "flac", "wav", "pcm")
    assert CONTENT_TYPES == {
        "mp3": "audio/mpeg",
        "opus": "audio/ogg",
        "aac": "audio/aac",
        "flac": "audio/flac",
        "wav": "audio/wav",
        "pcm": "audio/pcm",
    }
    for fmt in FORMATS:
        encoder = open_container_encoder(fmt)
        assert (encoder.format, encoder.content_type, encoder.sample_rate, encoder.pre_skip) == (
            fmt,
            CONTENT_TYPES[fmt],
            RATE,
            0,
        )
        encoder.close()


def test_bytes_flow_before_finish(streamed: tuple[str, Streamed], audio: npt.NDArray[np.float32]) -> None:
    _fmt, result = streamed
    assert result.first_bytes_at is not None
    assert result.first_bytes_at <= RATE // 2
    assert result.samples_reported == len(audio)


@pytest.mark.parametrize("fmt", FORMATS)
def test_audio_decodes_from_what_came_back_after_half_a_second(
    fmt: str, audio: npt.NDArray[np.float32]
) -> None:
    """Not just a header: the bytes returned for 0.5 s of input already decode to most of it."""
    encoder = open_container_encoder(fmt)
    prefix = b"".join(
        frame.data
        for start in range(0, RATE // 2, 2400)
        for frame in encoder.encode(audio[start : start + 2400], end_of_segment=False)
    )
    encoder.close()
    # Still held back: up to a codec frame (flac: 96 ms), the codec's lookahead, the open Ogg page.
    assert decode(prefix, fmt).seconds >= 0.3


def test_decodes_mono_at_the_rate_with_the_whole_duration(
    streamed: tuple[str, Streamed], audio: npt.NDArray[np.float32]
) -> None:
    fmt, result = streamed
    decoded = decode(result.data, fmt)
    assert decoded.channels == 1
    assert decoded.rate == (48000 if fmt == "opus" else RATE)  # Opus always decodes at 48 kHz
    extra = decoded.seconds - len(audio) / RATE
    if fmt in LOSSLESS:
        assert extra == 0
    else:
        assert -0.001 <= extra <= MAX_EXTRA_S


def test_waveform_survives(streamed: tuple[str, Streamed], audio: npt.NDArray[np.float32]) -> None:
    fmt, result = streamed
    decoded = decode(result.data, fmt)
    if fmt in LOSSLESS:
        assert decoded.samples.dtype == np.int16
        difference = decoded.samples.astype(np.int32) - to_int16(audio)
        assert np.max(np.abs(difference)) <= 1
        assert best_alignment(decoded.as_float24k(), audio) > 0.999
    else:
        assert best_alignment(decoded.as_float24k(), audio) > 0.9


def test_no_click_at_the_end(streamed: tuple[str, Streamed], audio: npt.NDArray[np.float32]) -> None:
    fmt, result = streamed
    assert np.max(np.abs(audio[-RATE // 5 :])) == 0  # the input ends in 200 ms of silence
    decoded = decode(result.data, fmt).as_float24k()
    assert np.max(np.abs(decoded[-RATE // 50 :])) < 0.003


def streamed_alone(fmt: str, audio: npt.NDArray[np.float32]) -> bytes:
    encoder = open_container_encoder(fmt)
    return stream(encoder, audio).data


def test_wav_header_says_pcm_of_unknown_length(audio: npt.NDArray[np.float32]) -> None:
    data = streamed_alone("wav", audio)
    header = data[:44]
    assert header[:4] == b"RIFF" and header[8:12] == b"WAVE"
    assert struct.unpack("<I", header[4:8])[0] == 0xFFFFFFFF
    assert header[12:16] == b"fmt " and struct.unpack("<I", header[16:20])[0] == 16
    assert struct.unpack("<HHIIHH", header[20:36]) == (1, 1, RATE, 2 * RATE, 2, 16)  # PCM, mono, s16
    assert header[36:40] == b"data" and struct.unpack("<I", header[40:44])[0] == 0xFFFFFFFF
    assert data[44:] == to_int16(audio).astype("<i2").tobytes()


def test_pcm_is_bare_s16le(audio: npt.NDArray[np.float32]) -> None:
    assert streamed_alone("pcm", audio) == to_int16(audio).astype("<i2").tobytes()


def test_flac_streaminfo_says_length_unknown(audio: npt.NDArray[np.float32]) -> None:
    """Written before the length is known and never patched (the sink cannot seek): 0 = unknown."""
    data = streamed_alone("flac", audio)
    assert data[:4] == b"fLaC"
    assert data[4] & 0x7F == 0  # STREAMINFO first
    streaminfo = data[8:42]
    assert struct.unpack(">I", b"\0" + streaminfo[10:13])[0] >> 4 == RATE
    assert int.from_bytes(streaminfo[13:18], "big") & ((1 << 36) - 1) == 0
    assert streaminfo[18:34] == bytes(16)  # no MD5 either


def test_mp3_is_bare_frames(audio: npt.NDArray[np.float32]) -> None:
    data = streamed_alone("mp3", audio)
    assert data[:2] == b"\xff\xf3"  # MPEG-2 Layer III frame sync: no ID3 tag, no Xing frame to patch
    assert b"Xing" not in data and b"Info" not in data[:1000]


def test_opus_is_ogg(audio: npt.NDArray[np.float32]) -> None:
    data = streamed_alone("opus", audio)
    assert data[:4] == b"OggS" and data[28:36] == b"OpusHead"
    assert struct.unpack("<I", data[40:44])[0] == RATE  # the input rate, as OpusHead records it


@pytest.mark.parametrize("fmt", LOSSLESS)
def test_split_does_not_change_lossless_output(fmt: str, audio: npt.NDArray[np.float32]) -> None:
    """Ending segments anywhere pads nothing: the bytes equal a one-piece encode's."""
    whole = open_container_encoder(fmt)
    one_piece = b"".join(f.data for f in [*whole.encode(audio, end_of_segment=True), *whole.finish()])
    split = open_container_encoder(fmt)
    parts = np.array_split(audio, [5, 1234, 30000, 30001])
    many = b"".join(f.data for part in parts for f in split.encode(part, end_of_segment=True))
    many += b"".join(f.data for f in split.finish())
    assert many == one_piece


@pytest.mark.parametrize("fmt", FORMATS)
def test_encode_after_finish_raises(fmt: str) -> None:
    encoder = open_container_encoder(fmt)
    encoder.encode(np.zeros(100, dtype=np.float32), end_of_segment=True)
    encoder.finish()
    with pytest.raises(RuntimeError, match="finished"):
        encoder.encode(np.zeros(100, dtype=np.float32), end_of_segment=False)
    with pytest.raises(RuntimeError, match="finished"):
        encoder.finish()
    encoder.close()  # harmless after finish


@pytest.mark.parametrize("fmt", FORMATS)
def test_close_without_finish(fmt: str, audio: npt.NDArray[np.float32]) -> None:
    encoder = open_container_encoder(fmt)
    encoder.encode(audio[:5000], end_of_segment=False)
    encoder.close()
    encoder.close()
    with pytest.raises(RuntimeError, match="closed"):
        encoder.encode(audio[:100], end_of_segment=False)
    with pytest.raises(RuntimeError, match="closed"):
        encoder.finish()


def test_unknown_format_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="ogg") as caught:
        open_container_encoder("ogg")
    for fmt in FORMATS:
        assert fmt in str(caught.value)


def test_rejects_a_rate_the_codec_cannot_encode() -> None:
    with pytest.raises(ValueError, match="44100"):
        open_container_encoder("opus", 44100)
    with pytest.raises(ValueError):
        open_container_encoder("wav", 0)


def test_rejects_multichannel_blocks() -> None:
    encoder = open_container_encoder("pcm")
    with pytest.raises(ValueError, match="1-D"):
        encoder.encode(np.zeros((2, 10), dtype=np.float32), end_of_segment=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_audio_gives_a_valid_near_empty_stream(fmt: str) -> None:
    """Decided: a stream with no audio still decodes. flac and wav are a bare header, pcm is empty;
    mp3, aac and opus cannot exist without a packet and carry one codec frame of silence (with the
    codec's priming and padding: at most 100 ms of silence)."""
    encoder = open_container_encoder(fmt)
    first = encoder.encode(np.zeros(0, dtype=np.float32), end_of_segment=True)
    data = b"".join(f.data for f in [*first, *encoder.finish()])
    assert all(f.samples == 0 for f in first)
    if fmt == "pcm":
        assert data == b""
        return
    decoded = decode(data, fmt)
    assert decoded.channels == 1
    if fmt in LOSSLESS:
        assert len(decoded.samples) == 0
    else:
        assert 0 < decoded.seconds <= MAX_EXTRA_S
        assert np.max(np.abs(decoded.as_float24k())) < 1e-3


class _FailingStream:
    def encode(self, frame: object = None) -> list[object]:
        raise av.error.InvalidDataError(1, "simulated codec failure")


def test_ffmpeg_errors_close_the_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = open_container_encoder("aac")
    monkeypatch.setattr(encoder, "_stream", _FailingStream())  # no real input makes FFmpeg fail
    with pytest.raises(ContainerError, match=r"aac encoder failed: .*simulated") as caught:
        encoder.encode(np.zeros(100, dtype=np.float32), end_of_segment=False)
    assert isinstance(caught.value.__cause__, av.error.FFmpegError)
    with pytest.raises(RuntimeError, match="closed"):
        encoder.encode(np.zeros(100, dtype=np.float32), end_of_segment=False)
    encoder.close()


def test_clips_instead_of_wrapping() -> None:
    encoder = open_container_encoder("pcm")
    loud = np.array([1.5, -1.5, 1.0, -1.0, 0.5], dtype=np.float32)
    data = b"".join(f.data for f in encoder.encode(loud, end_of_segment=True))
    assert np.frombuffer(data, dtype="<i2").tolist() == [32767, -32767, 32767, -32767, 16384]


@pytest.mark.parametrize(("fmt", "rate"), [("mp3", 16000), ("wav", 16000), ("flac", 48000)])
def test_other_rates_resample_the_24k_input(fmt: str, rate: int, audio: npt.NDArray[np.float32]) -> None:
    encoder = open_container_encoder(fmt, rate)
    result = stream(encoder, audio)
    assert result.samples_reported == len(audio)  # Frame.samples counts 24 kHz input samples
    decoded = decode(result.data, fmt)
    assert decoded.rate == rate
    extra = decoded.seconds - len(audio) / RATE
    assert -0.001 <= extra <= MAX_EXTRA_S
    assert best_alignment(decoded.as_float24k(), audio) > 0.9
