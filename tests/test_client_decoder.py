"""The client's audio decoder: real Opus packets in, aligned PCM out with `pre_skip` trimmed."""

from typing import Any

import numpy as np
import numpy.typing as npt
import opuslib
import pytest

from speakd.client import AudioDecoder, StreamError
from speakd.protocol import Audio, AudioCodec, Started

RATE = 24000
FRAME = RATE * 20 // 1000


def chirp(seconds: float) -> npt.NDArray[np.int16]:
    """A sweep rather than a steady tone, so a misalignment of even one sample shows."""
    t = np.arange(int(RATE * seconds)) / RATE
    return (np.sin(2 * np.pi * (200 * t + 1500 * t * t)) * 12000).astype(np.int16)


def opus_packets(pcm: npt.NDArray[np.int16]) -> tuple[list[bytes], int]:
    """20 ms packets the way the daemon makes them: zero-padded, then silence to flush the look-ahead."""
    encoder: Any = opuslib.Encoder(RATE, 1, opuslib.APPLICATION_AUDIO)
    # Full-band CELT: low bitrates switch to SILK, whose resampler adds a sample of delay of its own.
    encoder.bitrate = 64000
    pre_skip = int(encoder.lookahead)
    frames = -(-len(pcm) // FRAME) + -(-pre_skip // FRAME)
    padded = np.zeros(frames * FRAME, dtype=np.int16)
    padded[: len(pcm)] = pcm
    packets = [bytes(encoder.encode(chunk.tobytes(), FRAME)) for chunk in padded.reshape(frames, FRAME)]
    return packets, pre_skip


def audio(seq: int, data: bytes, samples: int = FRAME) -> Audio:
    return Audio(context="c", segment=0, seq=seq, data=data, samples=samples)


def started(codec: AudioCodec, pre_skip: int, sample_rate: int = RATE) -> Started:
    return Started(
        context="c", voice="v", codec=codec, sample_rate=sample_rate, frame_ms=20, pre_skip=pre_skip
    )


def test_opus_stream_decodes_to_the_input_length_and_alignment() -> None:
    source = chirp(0.5)
    packets, pre_skip = opus_packets(source)
    assert pre_skip > 0
    decoder = AudioDecoder(started(AudioCodec.OPUS, pre_skip))
    pcm = np.concatenate([decoder.decode(audio(seq, packet)) for seq, packet in enumerate(packets)])

    assert pcm.dtype == np.int16
    assert len(pcm) == len(packets) * FRAME - pre_skip
    assert len(pcm) >= len(source)  # the look-ahead flush brought the tail out
    heard = pcm[: len(source)].astype(np.float64)
    want = source.astype(np.float64)
    # Trimming pre_skip lines the output up with the input: best match at lag 0, and close in value.
    lags = range(-20, 21)
    errors = [np.mean((np.roll(heard, lag) - want)[50:-50] ** 2) for lag in lags]
    assert lags[int(np.argmin(errors))] == 0
    snr_db = 10 * np.log10(np.mean(want**2) / errors[20])
    assert snr_db > 30


def test_pre_skip_longer_than_a_packet_spans_packets() -> None:
    rate = 8000
    frame = rate * 10 // 1000  # 80 samples
    data = np.arange(1, 4 * frame + 1, dtype=np.int16)
    decoder = AudioDecoder(started(AudioCodec.PCM16, 200, sample_rate=rate))
    out = [decoder.decode(audio(i, data[i * frame : (i + 1) * frame].tobytes(), frame)) for i in range(4)]
    assert [len(chunk) for chunk in out] == [0, 0, 40, 80]
    np.testing.assert_array_equal(np.concatenate(out), data[200:])


def test_pcm16_passes_through_unchanged() -> None:
    samples = np.array([0, 1, -1, 32767, -32768] * 96, dtype="<i2")
    decoder = AudioDecoder(started(AudioCodec.PCM16, 0))
    np.testing.assert_array_equal(decoder.decode(audio(0, samples.tobytes(), len(samples))), samples)


def test_a_gap_in_seq_is_refused() -> None:
    decoder = AudioDecoder(started(AudioCodec.PCM16, 0))
    decoder.decode(audio(0, bytes(2 * FRAME)))
    with pytest.raises(StreamError, match="seq 2 arrived where 1 was expected"):
        decoder.decode(audio(2, bytes(2 * FRAME)))


def test_samples_must_match_what_the_frame_holds() -> None:
    decoder = AudioDecoder(started(AudioCodec.PCM16, 0))
    with pytest.raises(StreamError, match="decoded to 480 samples, not 960"):
        decoder.decode(audio(0, bytes(2 * FRAME), samples=960))


def test_garbage_is_not_an_opus_packet() -> None:
    decoder = AudioDecoder(started(AudioCodec.OPUS, 0))
    with pytest.raises(StreamError, match="not a valid Opus packet"):
        decoder.decode(audio(0, b"\xff" * 3))
