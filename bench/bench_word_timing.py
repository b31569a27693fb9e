"""How close are speakd's word timestamps to a forced alignment of the same audio?

Usage: .venv/bin/python bench/bench_word_timing.py [--sentences 40] [--per-reply 4] [--json out.json]

Issue 11's target: over held-out sentences, the mean absolute difference between speakd's word starts
and a forced alignment of the same audio is at most 50 ms, and no word is off by more than 150 ms.
A real `speakd serve` speaks the held-out sentences (bench/held_out_sentences.txt), `--per-reply` of
them per context, streamed the way an LLM writes (4-character pieces, 40 pieces a second), with
`words: true`, PCM16 at 24 kHz. Each reply's audio, exactly as received (its `seq` order, segments
back to back), is then aligned by Whisper tiny.en's word timestamps (faster-whisper, cross-attention
DTW), after the daemon has stopped. Whisper's words are matched to speakd's by their normalized text
(longest matching runs, difflib); a word either side misheard is left out and counted. Prints, for the
matched words: the mean, median, 95th percentile and largest absolute difference of the starts, the
mean signed difference (speakd minus Whisper), and the same for the ends; and the words off by more
than 150 ms. Whisper's own timing error is part of every figure: it is the reference the issue names,
not ground truth.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import re
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon import Daemon, client, whisper
from held_out import held_out_sentences

from speakd.protocol import Audio, AudioCodec, Done, End, Segment, Start, Text, Words, WordTiming
from speakd.server.config import default_cache_dir

SAMPLE_RATE = 24000
PIECE_CHARS = 4
PIECES_PER_S = 40.0
LIMIT_MS = 150.0
SHIFTS_MS = (0, 5, 10, 15)
SILENCE_DB = -55.0
ONSET_DB = -40.0
PAUSE_MS = 100.0
ONSET_MATCH_MS = 250.0


@dataclass
class Reply:
    text: str
    pcm: list[bytes] = field(default_factory=list)
    words: list[WordTiming] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)


def reply_sentences() -> list[str]:
    """bench/llm_replies.txt cut into sentences (at '. ', '? ', '! ')."""
    text = (Path(__file__).resolve().parent / "llm_replies.txt").read_text(encoding="utf-8")
    lines = " ".join(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return [s.strip() for s in re.split(r"(?<=[.?!])\s+", lines) if s.strip()]


def normalize(word: str) -> str:
    return re.sub(r"[^a-z0-9']", "", word.lower().replace("\u2019", "'"))


async def speak(url: str, reply: Reply, context: str) -> None:
    async with client(url) as c:
        await c.send(Start(context=context, codec=AudioCodec.PCM16, sample_rate=SAMPLE_RATE, words=True))
        for i in range(0, len(reply.text), PIECE_CHARS):
            await c.send(Text(context=context, text=reply.text[i : i + PIECE_CHARS]))
            await asyncio.sleep(1 / PIECES_PER_S)
        await c.send(End(context=context))
        while True:
            msg = await c.recv(timeout=120)
            if isinstance(msg, Audio):
                reply.pcm.append(msg.data)
            elif isinstance(msg, Segment):
                reply.segments.append(msg)
            elif isinstance(msg, Words):
                reply.words.extend(msg.words)
            elif isinstance(msg, Done):
                return


def to_16k(pcm16: bytes) -> npt.NDArray[np.float32]:
    pcm = np.frombuffer(pcm16, dtype=np.int16).astype(np.float32) / 32768.0
    positions = np.arange(0, len(pcm), SAMPLE_RATE / 16000)
    return np.interp(positions, np.arange(len(pcm)), pcm).astype(np.float32)


def forced_alignment(audio: npt.NDArray[np.float32], text: str) -> list[tuple[str, float, float]]:
    """Whisper's word timing for `text` known in advance (its DTW over cross-attention, as its word
    timestamps use, without the transcription's mistakes): (word, start s, end s), audio <= 30 s."""
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.tokenizer import Tokenizer

    model = whisper()
    features = model.feature_extractor(audio)
    frames = min(features.shape[-1], model.feature_extractor.nb_max_frames)
    encoded = model.encode(pad_or_trim(features[:, :frames]))
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language="en")
    (timing,) = model.find_alignment(tokenizer, [tokenizer.encode(" " + text.strip())], encoded, frames)
    return [(t["word"], float(t["start"]), float(t["end"])) for t in timing]


def forced_reference(reply: Reply) -> list[tuple[str, float, float]]:
    """Each segment's audio (from its start to the next one's) aligned with its text, at SHIFTS_MS of
    leading silence each; the median over the shifts, less the shift, on the reply's timeline (ms).
    Whisper's alignment steps in 20 ms frames: the shifts sample between them and damp its jitter."""
    pcm = b"".join(reply.pcm)
    out: list[tuple[str, float, float]] = []
    bounds = [s.start_ms for s in reply.segments] + [len(pcm) / 2 / SAMPLE_RATE * 1000]
    for segment, begin, end in zip(reply.segments, bounds, bounds[1:], strict=False):
        clip = to_16k(pcm[int(begin * SAMPLE_RATE / 1000) * 2 : int(end * SAMPLE_RATE / 1000) * 2])
        runs = [
            forced_alignment(np.concatenate([np.zeros(int(16 * shift), np.float32), clip]), segment.text)
            for shift in SHIFTS_MS
        ]
        for i, (word, _, _) in enumerate(runs[0]):
            starts = [1000 * run[i][1] - shift for run, shift in zip(runs, SHIFTS_MS, strict=True)]
            ends = [1000 * run[i][2] - shift for run, shift in zip(runs, SHIFTS_MS, strict=True)]
            out.append((word, begin + statistics.median(starts), begin + statistics.median(ends)))
    return out


def match(
    ours: list[WordTiming], theirs: list[tuple[str, float, float]]
) -> list[tuple[WordTiming, float, float]]:
    """Pairs of a speakd word and a reference word with the same normalized text, in order."""
    ours = [w for w in ours if normalize(w.word)]
    theirs = [w for w in theirs if normalize(w[0])]
    matcher = difflib.SequenceMatcher(
        a=[normalize(w.word) for w in ours], b=[normalize(w[0]) for w in theirs], autojunk=False
    )
    return [
        (ours[block.a + k], theirs[block.b + k][1], theirs[block.b + k][2])
        for block in matcher.get_matching_blocks()
        for k in range(block.size)
    ]


def transcribed_reference(reply: Reply) -> list[tuple[str, float, float]]:
    """Whisper's word timestamps of its own transcription of the whole reply, in ms."""
    segments, _ = whisper().transcribe(
        to_16k(b"".join(reply.pcm)), language="en", beam_size=1, vad_filter=False, word_timestamps=True
    )
    return [(w.word, 1000 * w.start, 1000 * w.end) for s in segments for w in (s.words or [])]


def compare(
    replies: list[Reply], reference: Callable[[Reply], list[tuple[str, float, float]]]
) -> dict[str, Any]:
    """speakd's words against a reference's, over all replies: start and end differences (speakd
    minus reference), words unmatched, and the words whose start is off by more than LIMIT_MS."""
    starts: list[float] = []
    ends: list[float] = []
    off: list[str] = []
    ours_at_onsets: list[float] = []
    theirs_at_onsets: list[float] = []
    ours_total = theirs_total = 0
    for reply in replies:
        theirs = reference(reply)
        pairs = match(reply.words, theirs)
        onsets = onset_words(reply)
        index = {id(w): i for i, w in enumerate(reply.words)}
        for word, start, _ in pairs:
            onset = onsets.get(index[id(word)])
            if onset is not None:
                ours_at_onsets.append(word.start_ms - onset)
                theirs_at_onsets.append(start - onset)
        ours_total += sum(1 for w in reply.words if normalize(w.word))
        theirs_total += sum(1 for w in theirs if normalize(w[0]))
        for word, start, end in pairs:
            starts.append(word.start_ms - start)
            ends.append(word.end_ms - end)
            if abs(starts[-1]) > LIMIT_MS:
                off.append(f"{word.word!r} at {word.start_ms:.0f} ms, reference {start:.0f} ms")
    return {
        "matched_words": len(starts),
        "speakd_words_unmatched": ours_total - len(starts),
        "reference_words_unmatched": theirs_total - len(starts),
        "start": summary(starts),
        "end": summary(ends),
        f"starts_off_over_{LIMIT_MS:.0f}_ms": off,
        # The same words where a pause onset pins the truth: how far each is from it.
        "at_pause_onsets": {
            "words": len(ours_at_onsets),
            "speakd_minus_onset": summary(ours_at_onsets) if ours_at_onsets else None,
            "reference_minus_onset": summary(theirs_at_onsets) if theirs_at_onsets else None,
        },
    }


def pause_onsets(pcm16: bytes) -> list[float]:
    """Where speech resumes after a pause (ms): the first 2.5 ms step at which the 10 ms RMS level
    rises above ONSET_DB after at least PAUSE_MS below SILENCE_DB. A reference that needs no model,
    precise where it exists: at the start of every word that follows a pause."""
    pcm = np.frombuffer(pcm16, dtype=np.int16).astype(np.float64) / 32768.0
    hop, window = SAMPLE_RATE // 400, SAMPLE_RATE // 100
    power = np.convolve(pcm**2, np.ones(window) / window, mode="same")[::hop]
    level = 10 * np.log10(power + 1e-12)
    onsets: list[float] = []
    quiet = 0
    for i, db in enumerate(level):
        if db < SILENCE_DB:
            quiet += 1
        elif db > ONSET_DB:
            if quiet * 2.5 >= PAUSE_MS:
                onsets.append(i * 2.5)
            quiet = 0
    return onsets


def onset_words(reply: Reply) -> dict[int, float]:
    """Pause onsets, keyed by the index in `reply.words` of the word starting nearest each (within
    ONSET_MATCH_MS; a pause inside a word, before a plosive's burst, may match nothing)."""
    indices = [i for i, w in enumerate(reply.words) if normalize(w.word)]
    starts = np.array([reply.words[i].start_ms for i in indices])
    found: dict[int, float] = {}
    for onset in pause_onsets(b"".join(reply.pcm)):
        if starts.size:
            nearest = int(np.argmin(np.abs(starts - onset)))
            if abs(starts[nearest] - onset) <= ONSET_MATCH_MS:
                found[indices[nearest]] = onset
    return found


def summary(values: list[float]) -> dict[str, float]:
    absolute = sorted(abs(v) for v in values)
    return {
        "mean_abs_ms": statistics.fmean(absolute),
        "median_abs_ms": statistics.median(absolute),
        "p95_abs_ms": absolute[min(len(absolute) - 1, int(0.95 * len(absolute)))],
        "max_abs_ms": absolute[-1],
        "mean_signed_ms": statistics.fmean(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sentences", type=int, default=40)
    parser.add_argument("--skip", type=int, default=0)
    parser.add_argument("--per-reply", type=int, default=4)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--source",
        choices=("held-out", "replies"),
        default="held-out",
        help="held-out sentences (the figure to report), or the LLM replies (to study and tune with)",
    )
    args = parser.parse_args()
    sentences = (held_out_sentences() if args.source == "held-out" else reply_sentences())[
        args.skip : args.skip + args.sentences
    ]
    replies = [
        Reply(" ".join(sentences[i : i + args.per_reply])) for i in range(0, len(sentences), args.per_reply)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(Path(tmp), default_cache_dir(), "[limits]\nadmission_headroom = 0\n")
        try:
            daemon.wait_ready()
            for n, reply in enumerate(replies):
                asyncio.run(speak(daemon.url, reply, f"reply-{n}"))
        finally:
            daemon.stop()
    onsets = [reply.words[i].start_ms - onset for reply in replies for i, onset in onset_words(reply).items()]
    result = {
        "source": args.source,
        "sentences": len(sentences),
        "replies": len(replies),
        "speakd_words": sum(len(reply.words) for reply in replies),
        "whisper_forced_alignment": compare(replies, forced_reference),
        "whisper_transcription_timestamps": compare(replies, transcribed_reference),
        "pause_onsets": {"matched": len(onsets), **summary(onsets)} if onsets else None,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
