"""Resampler and frame encoders, checked against real libopus decoding (no mocks)."""

import math
import struct
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import numpy as np
import numpy.typing as npt
import opuslib
import pytest

from speakd.server.audio.encoders import (
    FRAME_MS,
    OPUS_RATES,
    Frame,
    FrameEncoder,
    OpusFrameEncoder,
    Pcm16FrameEncoder,
    default_opus_bitrate,
    make_encoder,
)
from speakd.server.audio.resample import StreamingResampler, _design, resample

SRC = 24000
RATES = sorted(OPUS_RATES)
FRAMES = sorted(FRAME_MS)

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]


def _tone(freq: float, seconds: float, amplitude: float = 0.5, rate: int = SRC) -> F32:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _speech_like(seconds: float) -> F32:
    """Voiced-speech stand-in: gliding 140 Hz pitch, harmonics to 4 kHz, syllable envelope ending loud.

    Ending at the envelope's peak makes a lost tail show up as a large energy drop.
    """
    t = np.arange(round(seconds * SRC)) / SRC
    f0 = 140 + 15 * np.sin(2 * np.pi * 2.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SRC
    k = np.arange(1, 28)[:, None]  # 27 * 140 Hz ~ 3.8 kHz
    envelope = 0.6 + 0.4 * np.cos(2 * np.pi * 3.5 * (t[-1] - t))
    y: F64 = (np.sin(k * phase) / k).sum(axis=0) * envelope
    return (0.5 / float(np.abs(y).max()) * y).astype(np.float32)


def _rms_db(x: F64 | F32) -> float:
    return 10 * math.log10(float(np.mean(np.square(x, dtype=np.float64))))


def _level_db(x: F32, start: int, stop: int) -> float:
    """RMS level of the steady middle of a block, away from the filter's start/end transients."""
    return _rms_db(x[start:stop])


def _decode_opus(frames: list[Frame], rate: int, frame_samples: int) -> F64:
    decoder = opuslib.Decoder(rate, 1)
    chunks = []
    for frame in frames:
        pcm = np.frombuffer(decoder.decode(frame.data, frame_samples), dtype=np.int16)
        assert len(pcm) == frame_samples
        chunks.append(pcm)
    return np.concatenate(chunks).astype(np.float64) / 32767


def _decode_pcm(frames: list[Frame]) -> npt.NDArray[np.int16]:
    return np.concatenate([np.frombuffer(f.data, dtype="<i2") for f in frames]).astype(np.int16)


# --- resample ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dst", RATES)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 1000, 24001, 29616])
def test_resample_length_is_exact(dst: int, n: int) -> None:
    out = resample(np.zeros(n, dtype=np.float32), SRC, dst)
    assert out.dtype == np.float32
    assert len(out) == round(n * dst / SRC)


@pytest.mark.parametrize("dst", RATES)
def test_resample_keeps_frequency_and_amplitude(dst: int) -> None:
    x = _tone(440, 1.0)
    y = resample(x, SRC, dst)
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    peak_hz = np.argmax(spectrum) * dst / len(y)
    assert abs(peak_hz - 440) <= 1.0
    margin = dst // 10
    level = _level_db(y, margin, len(y) - margin) - _level_db(x, SRC // 10, SRC - SRC // 10)
    assert abs(level) <= 1.0
    assert abs(level) <= 0.05  # well inside the passband the filter is flat to a few mdB


@pytest.mark.parametrize(
    ("dst", "freq"), [(16000, 10000.0), (8000, 5000.0), (12000, 6500.0), (16000, 8200.0)]
)
def test_resample_rejects_content_above_new_nyquist(dst: int, freq: float) -> None:
    """Tones above the output Nyquist would alias back into the band; they must vanish instead."""
    x = _tone(freq, 1.0)
    y = resample(x, SRC, dst)
    margin = dst // 10
    attenuation = _level_db(x, SRC // 10, SRC - SRC // 10) - _level_db(y, margin, len(y) - margin)
    assert attenuation >= 40
    assert attenuation >= 60  # the design target, not just the floor


@pytest.mark.parametrize("dst", [8000, 12000, 16000, 48000])
def test_resample_passband_is_flat_to_ninety_percent_of_nyquist(dst: int) -> None:
    freq = 0.9 * min(SRC, dst) / 2
    x = _tone(freq, 1.0)
    y = resample(x, SRC, dst)
    margin = dst // 10
    level = _level_db(y, margin, len(y) - margin) - _level_db(x, SRC // 10, SRC - SRC // 10)
    assert abs(level) <= 0.1


def test_resample_to_48k_suppresses_images() -> None:
    """Upsampling must not leave a mirror of a 5 kHz tone at 19 kHz."""
    y = resample(_tone(5000, 1.0), SRC, 48000).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    freqs = np.fft.rfftfreq(len(y), 1 / 48000)
    signal = spectrum[np.abs(freqs - 5000) < 50].max()
    image = spectrum[np.abs(freqs - 19000) < 50].max()
    assert 20 * math.log10(signal / image) >= 60


def test_resample_identity_returns_input() -> None:
    x = _speech_like(0.3)
    y = resample(x, SRC, SRC)
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("dst", RATES)
@pytest.mark.parametrize("at", [1200, 1201, 1202])
def test_resample_impulse_is_not_shifted(dst: int, at: int) -> None:
    x = np.zeros(2400, dtype=np.float32)
    x[at] = 1.0
    y = resample(x, SRC, dst)
    expected = at * dst / SRC
    assert abs(int(np.argmax(np.abs(y))) - expected) <= 1.0
    # zero phase: the response is symmetric about the impulse, so its centroid sits on it
    energy = np.square(y, dtype=np.float64)
    centroid = float(np.sum(np.arange(len(y)) * energy) / np.sum(energy))
    assert abs(centroid - expected) <= 0.5


def test_resample_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        resample(np.zeros(10, dtype=np.float32), 0, 16000)
    with pytest.raises(ValueError, match="mono"):
        resample(np.zeros((2, 10), dtype=np.float32), SRC, 16000)


def _python_lines(run: Callable[[], object]) -> int:
    """Lines of the resampler's Python that `run` executes: its interpreted work (numpy's loops in C
    are not counted). Deterministic, unlike a stopwatch; how fast it runs is bench/'s business."""
    module = resample.__code__.co_filename
    lines = 0

    def line_tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal lines
        lines += event == "line"
        return line_tracer

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        return line_tracer if frame.f_code.co_filename == module else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        run()
    finally:
        sys.settrace(previous)
    return lines


@pytest.mark.parametrize("dst", [8000, 16000, 48000])
def test_resample_python_work_does_not_grow_with_the_audio(dst: int) -> None:
    """A per-sample Python loop would take seconds on 10 s of audio; the per-tap strided path runs
    the same interpreted steps (per filter tap and branch) for 10 s as for 1 s, ~10 ms in all."""
    x = np.random.default_rng(0).uniform(-0.5, 0.5, 10 * SRC).astype(np.float32)
    resample(x[:SRC], SRC, dst)  # filter design is cached after the first call
    one_second = _python_lines(lambda: resample(x[:SRC], SRC, dst))
    ten_seconds = _python_lines(lambda: resample(x, SRC, dst))
    assert ten_seconds <= 2 * one_second, (one_second, ten_seconds)
    assert ten_seconds < 10 * dst // 10  # a per-sample loop runs at least one step per output sample


@pytest.mark.parametrize("dst", [8000, 12000, 16000, 48000])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 50, 997])
def test_resample_matches_direct_convolution(dst: int, n: int) -> None:
    """The polyphase bookkeeping against the textbook form: zero-stuff, filter, drop the delay, decimate."""
    x = np.random.default_rng(n).uniform(-1, 1, n).astype(np.float32)
    g = math.gcd(SRC, dst)
    up, down = dst // g, SRC // g
    polyphase, delay = _design(up, down)
    h = polyphase.T.reshape(-1).astype(np.float64)  # the prototype filter, zero-padded at the end
    stuffed = np.zeros(n * up)
    stuffed[::up] = x
    filtered = np.pad(np.convolve(stuffed, h), (0, down * n))
    expected = filtered[delay + down * np.arange(round(n * dst / SRC))]
    np.testing.assert_allclose(resample(x, SRC, dst), expected, rtol=0, atol=1e-5)


# --- streaming resample -----------------------------------------------------------------------


def _split(x: F32, rng: np.random.Generator, cuts: int = 12) -> list[F32]:
    """`x` in random consecutive parts, among them empty and one-sample ones."""
    at = rng.integers(0, len(x) + 1, cuts)
    at = np.concatenate([at, at[:3], np.minimum(at[3:6] + 1, len(x))])  # repeats: empty parts
    return np.split(x, np.sort(at))


def _stream(resampler: StreamingResampler, parts: list[F32]) -> F32:
    return np.concatenate([resampler.process(part) for part in parts] + [resampler.flush()])


@pytest.mark.parametrize("dst", RATES)
@pytest.mark.parametrize("seed", range(4))
def test_streaming_equals_block_for_any_split(dst: int, seed: int) -> None:
    """Consecutive segments through one resampler: flush must end each one and start the next afresh.

    The contract is 1e-5; by construction (each output summed tap by tap in a fixed order) the
    streamed segment is the block result bit for bit, which keeps encoder frames split-independent.
    """
    rng = np.random.default_rng(seed)
    resampler = StreamingResampler(SRC, dst)
    segments = [_speech_like(0.517), rng.uniform(-1, 1, int(rng.integers(0, 4000))).astype(np.float32)]
    segments += [np.zeros(0, dtype=np.float32), np.ones(1, dtype=np.float32), _tone(300, 0.2)]
    for segment in segments:
        out = _stream(resampler, _split(segment, rng))
        expected = resample(segment, SRC, dst)
        assert out.dtype == np.float32
        assert len(out) == len(expected) == round(len(segment) * dst / SRC)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dst", RATES)
def test_streaming_one_sample_parts(dst: int) -> None:
    x = _speech_like(0.02)
    resampler = StreamingResampler(SRC, dst)
    np.testing.assert_array_equal(_stream(resampler, np.split(x, len(x))), resample(x, SRC, dst))
    # a lone sample (shorter than one output at 8 kHz) is a segment too, and resets like any other
    np.testing.assert_array_equal(_stream(resampler, [x[:1]]), resample(x[:1], SRC, dst))
    np.testing.assert_array_equal(_stream(resampler, [x[:2], x[2:3]]), resample(x[:3], SRC, dst))


@pytest.mark.parametrize("dst", [8000, 12000, 16000, 48000])
def test_streaming_holds_back_only_the_filter_support(dst: int) -> None:
    """Everything whose filter support has arrived comes out at once: at most 5 ms stays behind."""
    x = _speech_like(1.0)
    resampler = StreamingResampler(SRC, dst)
    received = emitted = 0
    for part in np.split(x, [1, 100, 5000, 5001, 12000]):
        emitted += len(resampler.process(part))
        received += len(part)
        held = round(received * dst / SRC) - emitted
        assert 0 <= held <= dst // 200 + 1
    assert emitted + len(resampler.flush()) == round(len(x) * dst / SRC)


def test_streaming_identity_passes_parts_straight_through() -> None:
    resampler = StreamingResampler(SRC, SRC)
    x = _speech_like(0.1)
    for part in _split(x, np.random.default_rng(0)):
        assert resampler.process(part) is part
    assert len(resampler.flush()) == 0


def test_streaming_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        StreamingResampler(SRC, 0)
    with pytest.raises(ValueError, match="mono"):
        StreamingResampler(SRC, 16000).process(np.zeros((2, 10), dtype=np.float32))


@pytest.mark.parametrize("dst", [8000, 16000, 48000])
def test_streaming_python_work_does_not_grow_with_the_audio(dst: int) -> None:
    """Streamed in five parts, 10 s of audio costs the same interpreted steps as 1 s: the work per
    part is per filter tap and branch, never per sample."""
    x = np.random.default_rng(0).uniform(-0.5, 0.5, 10 * SRC).astype(np.float32)
    resampler = StreamingResampler(SRC, dst)
    one_second = _python_lines(lambda: _stream(resampler, np.array_split(x[:SRC], 5)))
    ten_seconds = _python_lines(lambda: _stream(resampler, np.array_split(x, 5)))
    assert ten_seconds <= 2 * one_second, (one_second, ten_seconds)
    assert ten_seconds < 10 * dst // 10


# --- opus -------------------------------------------------------------------------------------


def test_default_opus_bitrate() -> None:
    assert [default_opus_bitrate(r) for r in RATES] == [16000, 16000, 24000, 32000, 32000]


@pytest.mark.parametrize("rate", RATES)
def test_opus_pre_skip_is_the_encoder_lookahead(rate: int) -> None:
    """6.5 ms at every rate: the 312 samples at 48 kHz that Ogg Opus files carry as pre-skip."""
    encoder = OpusFrameEncoder(rate, 20, default_opus_bitrate(rate))
    assert encoder.pre_skip == 312 * rate // 48000
    assert encoder.frame_samples == rate // 50


@pytest.mark.parametrize("frame_ms", FRAMES)
@pytest.mark.parametrize("rate", RATES)
def test_opus_round_trip(rate: int, frame_ms: int) -> None:
    x = _speech_like(1.234)
    encoder = make_encoder("opus", rate, frame_ms, 0)
    assert isinstance(encoder, OpusFrameEncoder)
    fs = encoder.frame_samples
    assert fs == rate * frame_ms // 1000

    body = encoder.encode(x, end_of_segment=True)
    tail = encoder.finish()
    reference = resample(x, SRC, rate).astype(np.float64)
    assert len(body) == math.ceil(len(reference) / fs)
    assert len(tail) == math.ceil(encoder.pre_skip / fs) == 1
    assert all(f.samples == fs and 0 < len(f.data) <= 2 * fs for f in body + tail)

    decoded = _decode_opus(body + tail, rate, fs)
    assert len(decoded) - encoder.pre_skip >= len(reference)

    # pre_skip is the right alignment: no other small shift matches the input better
    lags = range(-20, 21)
    scores = [np.dot(decoded[encoder.pre_skip + lag :][: len(reference)], reference) for lag in lags]
    assert abs(lags[int(np.argmax(scores))]) <= max(1, rate // 10000)

    y = decoded[encoder.pre_skip :][: len(reference)]
    snr = 10 * math.log10(np.sum(reference**2) / np.sum((reference - y) ** 2))
    assert snr >= 10
    assert np.corrcoef(reference, y)[0, 1] >= 0.9

    n_tail = rate // 20  # the last 50 ms of the input must come out, at its level
    assert abs(_rms_db(y[-n_tail:]) - _rms_db(reference[-n_tail:])) <= 3.0


@pytest.mark.parametrize("frame_ms", [10, 60])
@pytest.mark.parametrize("rate", RATES)
def test_opus_finish_carries_the_lookahead(rate: int, frame_ms: int) -> None:
    """A segment ending on a frame boundary leaves its last pre_skip samples inside the encoder.

    Only the finish() frame can deliver them; its decoded start must hold that audio.
    """
    x = _speech_like(1.2)  # a whole number of frames at every rate and frame size
    encoder = OpusFrameEncoder(rate, frame_ms, default_opus_bitrate(rate))
    body = encoder.encode(x, end_of_segment=True)
    reference = resample(x, SRC, rate).astype(np.float64)
    assert len(body) * encoder.frame_samples == len(reference)

    decoded = _decode_opus(body + encoder.finish(), rate, encoder.frame_samples)
    flushed = decoded[len(reference) : len(reference) + encoder.pre_skip]
    assert abs(_rms_db(flushed) - _rms_db(reference[-encoder.pre_skip :])) <= 3.0
    # it is the tail itself, not codec noise of the same level
    assert np.corrcoef(flushed, reference[-encoder.pre_skip :])[0, 1] >= 0.9


@pytest.mark.parametrize("rate", [16000, 48000])
def test_opus_segments_of_one_context_follow_each_other(rate: int) -> None:
    encoder = OpusFrameEncoder(rate, 20, default_opus_bitrate(rate))
    fs = encoder.frame_samples
    segments = [_speech_like(0.517), _speech_like(0.3), _speech_like(0.81)]
    frames: list[Frame] = []
    expected_pcm: list[F64] = []
    for seg in segments:
        out = encoder.encode(seg, end_of_segment=True)
        ref = resample(seg, SRC, rate).astype(np.float64)
        assert len(out) == math.ceil(len(ref) / fs)
        frames += out
        expected_pcm.append(np.pad(ref, (0, len(out) * fs - len(ref))))
    frames += encoder.finish()
    reference = np.concatenate(expected_pcm)
    y = _decode_opus(frames, rate, fs)[encoder.pre_skip :][: len(reference)]
    assert len(y) == len(reference)
    assert np.corrcoef(reference, y)[0, 1] >= 0.9


def test_opus_empty_segment_yields_no_frames() -> None:
    encoder = OpusFrameEncoder(48000, 20, 32000)
    assert encoder.encode(np.zeros(0, dtype=np.float32), end_of_segment=True) == []


def test_opus_over_range_input_saturates() -> None:
    """A +-3 full-scale tone must come out as a clipped tone, not as int16 wrap-around noise."""
    x = _tone(300, 0.5, amplitude=3.0)
    encoder = OpusFrameEncoder(16000, 20, 24000)
    frames = encoder.encode(x, end_of_segment=True) + encoder.finish()
    reference = np.clip(resample(x, SRC, 16000), -1, 1).astype(np.float64)
    y = _decode_opus(frames, 16000, encoder.frame_samples)[encoder.pre_skip :][: len(reference)]
    assert np.corrcoef(reference, y)[0, 1] >= 0.9


@pytest.mark.parametrize(
    ("rate", "frame_ms", "bitrate", "match"),
    [(44100, 20, 32000, "Hz"), (48000, 30, 32000, "frame"), (48000, 20, 0, "bitrate")],
)
def test_opus_rejects_bad_arguments(rate: int, frame_ms: int, bitrate: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OpusFrameEncoder(rate, frame_ms, bitrate)


# --- pcm16 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("frame_ms", FRAMES)
@pytest.mark.parametrize("rate", RATES)
def test_pcm16_round_trip(rate: int, frame_ms: int) -> None:
    x = _speech_like(1.234)
    encoder = make_encoder("pcm16", rate, frame_ms, 0)
    assert isinstance(encoder, Pcm16FrameEncoder)
    fs = encoder.frame_samples
    assert encoder.pre_skip == 0

    frames = encoder.encode(x, end_of_segment=True)
    reference = resample(x, SRC, rate).astype(np.float64) * 32767
    assert len(frames) == math.ceil(len(reference) / fs)
    assert all(f.samples == fs and len(f.data) == 2 * fs for f in frames)
    assert encoder.finish() == []

    pcm = _decode_pcm(frames)
    assert np.max(np.abs(pcm[: len(reference)] - reference)) <= 1.0
    assert not pcm[len(reference) :].any()  # the last frame is padded with silence
    assert len(pcm) - len(reference) < fs


def test_pcm16_is_little_endian_and_exact_at_model_rate() -> None:
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 1 / 32767], dtype=np.float32)
    frames = Pcm16FrameEncoder(SRC, 10).encode(x, end_of_segment=True)
    assert len(frames) == 1
    assert struct.unpack("<6h", frames[0].data[:12]) == (0, 16384, -16384, 32767, -32767, 1)
    assert frames[0].data[12:] == bytes(2 * 240 - 12)


@pytest.mark.parametrize("rate", RATES)
def test_pcm16_over_range_input_saturates(rate: int) -> None:
    x = np.concatenate([_tone(200, 0.2, amplitude=4.0), np.full(2400, 1.5), np.full(2400, -7.0)])
    pcm = _decode_pcm(Pcm16FrameEncoder(rate, 20).encode(x.astype(np.float32), end_of_segment=True))
    reference = np.clip(resample(x.astype(np.float32), SRC, rate), -1, 1) * 32767
    assert np.max(np.abs(pcm[: len(reference)] - reference)) <= 1.0
    assert pcm.max() == 32767 and pcm.min() == -32767


def test_make_encoder_dispatch() -> None:
    encoder: FrameEncoder = make_encoder("opus", 24000, 40, 20000)
    assert isinstance(encoder, OpusFrameEncoder)
    assert (encoder.sample_rate, encoder.frame_samples) == (24000, 960)
    assert isinstance(make_encoder("pcm16", 8000, 60, 0), Pcm16FrameEncoder)
    with pytest.raises(ValueError, match="codec"):
        make_encoder("mp3", 24000, 20, 0)


# --- segments in parts ------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["pcm16", "opus"])
@pytest.mark.parametrize("frame_ms", [20, 60])
@pytest.mark.parametrize("rate", RATES)
def test_segment_in_parts_encodes_like_the_whole_segment(codec: str, rate: int, frame_ms: int) -> None:
    """Byte for byte, for every segment of a context and for the tail; parts leave as they come."""
    rng = np.random.default_rng(rate + frame_ms)
    whole = make_encoder(codec, rate, frame_ms, 0)
    in_parts = make_encoder(codec, rate, frame_ms, 0)
    fs = whole.frame_samples
    for segment in [_speech_like(1.234), _tone(220, 0.05), _speech_like(0.517)]:
        expected = whole.encode(segment, end_of_segment=True)
        frames: list[Frame] = []
        received = 0
        parts = _split(segment, rng, cuts=6)
        for i, part in enumerate(parts):
            frames += in_parts.encode(part, end_of_segment=i == len(parts) - 1)
            received += len(part)
            if i < len(parts) - 1:  # all but the filter's 5 ms and a partial frame are out already
                assert len(frames) * fs >= round(received * rate / SRC) - rate // 200 - fs
        assert frames == expected
    assert in_parts.finish() == whole.finish()


@pytest.mark.parametrize("codec", ["pcm16", "opus"])
@pytest.mark.parametrize("rate", [8000, 24000, 48000])
def test_part_shorter_than_a_frame_waits_for_the_next(codec: str, rate: int) -> None:
    x = _speech_like(0.3)
    whole = make_encoder(codec, rate, 20, 0).encode(x, end_of_segment=True)
    encoder = make_encoder(codec, rate, 20, 0)
    assert encoder.encode(x[:300], end_of_segment=False) == []  # 12.5 ms: not a whole frame yet
    assert encoder.encode(x[300:], end_of_segment=True) == whole


def test_part_completing_a_frame_releases_it_at_once() -> None:
    """At the model rate nothing is held but the partial frame: sample 480 completes frame one."""
    x = _speech_like(0.1)
    encoder = Pcm16FrameEncoder(SRC, 20)
    assert encoder.encode(x[:479], end_of_segment=False) == []
    [frame] = encoder.encode(x[479:480], end_of_segment=False)
    np.testing.assert_array_equal(_decode_pcm([frame]), np.rint(x[:480] * 32767).astype(np.int16))


@pytest.mark.parametrize("codec", ["pcm16", "opus"])
@pytest.mark.parametrize("rate", RATES)
def test_empty_last_part_ends_the_segment(codec: str, rate: int) -> None:
    x = _speech_like(0.517)
    reference = make_encoder(codec, rate, 20, 0)
    encoder = make_encoder(codec, rate, 20, 0)
    head = encoder.encode(x, end_of_segment=False)
    tail = encoder.encode(np.zeros(0, dtype=np.float32), end_of_segment=True)
    assert len(tail) >= 1  # the resampler's held-back samples and the padded partial frame
    assert head + tail == reference.encode(x, end_of_segment=True)
    assert encoder.finish() == reference.finish()


@pytest.mark.parametrize("codec", ["pcm16", "opus"])
def test_finish_refuses_an_open_segment(codec: str) -> None:
    """Its held-back tail would be lost without a word."""
    encoder = make_encoder(codec, 16000, 20, 0)
    encoder.encode(_speech_like(0.1), end_of_segment=False)
    with pytest.raises(RuntimeError, match="open"):
        encoder.finish()
    encoder.encode(np.zeros(0, dtype=np.float32), end_of_segment=True)
    encoder.finish()
