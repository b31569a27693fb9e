"""Word timestamps end to end: a real `speakd serve`, a real WebSocket, real Opus, the real sample client.

The words must point into the client's own text, arrive between each `segment` and its audio, follow
the audio's own clock whatever the codec and rate, and start where the speech does: where a word
follows a pause, its start must be where the audio's level rises again.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from daemon import Daemon, Utterance, client, token_pieces

from speakd.protocol import AudioCodec, End, Start, Text, WordTiming

pytestmark = pytest.mark.e2e

# A reply as an LLM writes one, with words G2P expands ($12.50, Dr., 7:30) and a mid-sentence dash.
REPLY = (
    "Sure! Dr. Patel's clinic opens at 7:30 on weekdays. A visit costs $12.50, and you don't need an "
    "appointment. Bring your card — it saves time at the desk."
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("words"), model_cache, "[limits]\nadmission_headroom = 0\n")
    d.wait_ready()
    yield d
    assert d.stop() == 0, "".join(d.log)


async def speak(url: str, text: str, **start: object) -> Utterance:
    async with client(url) as c:
        await c.send(Start(context="w", **start))  # type: ignore[arg-type]
        for piece in token_pieces(text, 4):
            await c.send(Text(context="w", text=piece))
        await c.send(End(context="w"))
        await c.until_done("w")
        return c.utterance("w")


def timed(utterance: Utterance) -> list[WordTiming]:
    return [word for message in utterance.words for word in message.words]


def pause_onsets_ms(pcm: np.ndarray, sample_rate: int) -> list[float]:
    """Where the level (10 ms RMS) rises above -40 dBFS after at least 150 ms below -55 dBFS."""
    x = pcm.astype(np.float64) / 32768.0
    hop, window = sample_rate // 400, sample_rate // 100
    level = 10 * np.log10(np.convolve(x**2, np.ones(window) / window, mode="same")[::hop] + 1e-12)
    onsets, quiet = [], 0
    for i, db in enumerate(level):
        if db < -55:
            quiet += 1
        elif db > -40:
            if quiet * 2.5 >= 150:
                onsets.append(i * 2.5)
            quiet = 0
    return onsets


def test_words_point_into_the_text_sent_and_come_between_each_segment_and_its_audio(daemon: Daemon) -> None:
    u = asyncio.run(speak(daemon.url, REPLY, words=True, codec=AudioCodec.OPUS, sample_rate=48000))
    u.assert_complete(REPLY, min_segments=3)
    assert u.started is not None and u.started.words
    # Protocol order: segment, then its words, then its audio.
    order = u.order
    for i, kind in enumerate(order):
        if kind == "segment":
            assert order[i + 1] == "words" and order[i + 2] == "audio", order[i : i + 3]
    assert [m.segment for m in u.words] == [s.segment for s in u.segments]
    words = timed(u)
    # Each word is the client's own text, and together they are every word of it, in order.
    assert all(REPLY[w.char_start : w.char_end] == w.word for w in words)
    assert [w.word for w in words] == [
        "Sure", "Dr.", "Patel's", "clinic", "opens", "at", "7:30", "on", "weekdays", "A", "visit", "costs",
        "$12.50", "and", "you", "don't", "need", "an", "appointment", "Bring", "your", "card", "it", "saves",
        "time", "at", "the", "desk",
    ]  # fmt: skip
    # On the audio's clock: in order, never overlapping, each inside its own segment's audio.
    assert all(a.end_ms <= b.start_ms for a, b in itertools.pairwise(words))
    assert all(w.start_ms < w.end_ms for w in words)
    bounds = [s.start_ms for s in u.segments] + [u.done.audio_ms if u.done else 0.0]
    for message in u.words:
        begin, end = bounds[message.segment], bounds[message.segment + 1]
        assert all(begin <= w.start_ms and w.end_ms <= end for w in message.words)


def test_word_times_follow_the_audio_clock_whatever_the_codec_and_rate(daemon: Daemon) -> None:
    opus = asyncio.run(speak(daemon.url, REPLY, words=True, codec=AudioCodec.OPUS, sample_rate=48000))
    pcm = asyncio.run(speak(daemon.url, REPLY, words=True, codec=AudioCodec.PCM16, sample_rate=16000))
    a, b = timed(opus), timed(pcm)
    assert [w.word for w in a] == [w.word for w in b]
    assert [w.start_ms for w in a] == pytest.approx([w.start_ms for w in b], abs=0.5)
    # And the words start where the speech does: wherever the audio resumes after a pause, a word
    # starts there (measured over many replies: 24 ms off on average, bench/bench_word_timing.py).
    for u, rate in ((opus, 48000), (pcm, 16000)):
        words = timed(u)
        starts = np.array([w.start_ms for w in words])
        # A pause inside a word G2P expanded ("$12.50": "twelve dollars and fifty cents") starts none.
        onsets = [
            onset
            for onset in pause_onsets_ms(u.pcm(), rate)
            if not any(w.start_ms + 150 < onset < w.end_ms for w in words)
        ]
        assert len(onsets) >= 4, onsets
        off = [float(np.min(np.abs(starts - onset))) for onset in onsets]
        assert np.median(off) <= 50.0, off
        assert max(off) <= 150.0, off


def test_speed_shortens_the_word_times_with_the_audio(daemon: Daemon) -> None:
    text = "The birch canoe slid on the smooth planks."
    normal = asyncio.run(speak(daemon.url, text, words=True, codec=AudioCodec.PCM16))
    fast = asyncio.run(speak(daemon.url, text, words=True, codec=AudioCodec.PCM16, speed=1.5))
    span = [timed(u)[-1].end_ms - timed(u)[0].start_ms for u in (normal, fast)]
    assert span[1] == pytest.approx(span[0] / 1.5, rel=0.15)
    assert fast.done is not None and timed(fast)[-1].end_ms <= fast.done.audio_ms


def test_without_words_none_are_sent(daemon: Daemon) -> None:
    u = asyncio.run(speak(daemon.url, "Just audio, please.", codec=AudioCodec.PCM16))
    assert u.started is not None and not u.started.words
    assert u.words == [] and "words" not in u.order
    u.assert_complete("Just audio, please.", min_segments=1)


def test_speakd_say_prints_each_word_as_it_is_played(daemon: Daemon, tmp_path: Path) -> None:
    text = "Here's the plan: first, we check the logs. Then we fix it."
    say = str(Path(sys.executable).with_name("speakd-say"))
    result = subprocess.run(
        [say, "--url", daemon.url, "--words", "--quiet", "--out", str(tmp_path / "out.wav"), text],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [line[2] for line in lines] == re.findall(r"[\w']+", text)
    starts = [float(line[0]) for line in lines]
    assert starts == sorted(starts) and all(float(e) > float(s) for s, e, _ in lines)
