"""Does the daemon's audio stay as intelligible as the raw engine's, idle and with three other streams?

Usage: .venv/bin/python bench/bench_intelligibility_load.py [--sentences 60] [--skip 0] [--json out.json]

Issue 9 asks for a Whisper word error rate on held-out sentences within 1 point of the raw engine's on
the same sentences, on an idle machine and with three other streams running. The daemon vocodes
segments in windows sized from its listener's slack and the vocoder's learnt cost
(server/engines/kokoro/windows.py); under load the cost rises and other listeners compete, so the
windows, and the seams between them, change with the load. This script synthesizes each held-out
sentence (bench/held_out_sentences.txt) three ways:
- raw: the unsplit Kokoro ONNX graph on the whole sentence in this process (bench_daemon.RawEngine),
  no daemon, before the daemon starts;
- daemon, idle: a real `speakd serve`, one connection, each sentence its own context sent at once
  (`start`, `text`, `end`), PCM16 at 24 kHz (no codec loss), one sentence after another;
- daemon, loaded: the same, while three other connections keep the daemon busy: each feeds a long
  reply (a dozen held-out sentences not being measured, sent at once, Opus as clients get by
  default) and starts the next as soon as one is done, from before the first measured sentence to
  after the last. The daemon serves the earliest deadline first but never idles, so the load takes
  all the CPU the measured stream leaves.
Admission control is off (limits.admission_headroom = 0) unless --admission-headroom says otherwise:
on two cores the daemon keeps about three real-time streams and would refuse the fourth.
Audio is collected first; the load and the daemon are stopped before Whisper tiny.en (the same
model, settings and word-error count as bench/engine_intelligibility.py and bench/window_study.py,
from tests/daemon.py) transcribes anything. Prints word errors and WER per condition, the daemon's
differences from the raw engine in points, and the mean time to first audio of each daemon condition
(text sent to first `audio` frame).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_daemon import RawEngine
from daemon import Client, Daemon, client, transcribe, word_errors
from held_out import held_out_sentences

from speakd.protocol import Audio, AudioCodec, Done, DoneReason, End, Error, ErrorCode, Start, Text
from speakd.server.config import default_cache_dir

VOICE = "jf_gongitsune"
SAMPLE_RATE = 24000
LOAD_STREAMS = 3
LOAD_REPLY_SENTENCES = 12  # sentences per background reply: ~45 s of audio, few restarts
CONDITIONS = ("raw", "daemon_idle", "daemon_loaded")

PCM = npt.NDArray[np.int16]


@dataclass
class Take:
    """One sentence through the daemon: its audio, time to first audio, and segments made."""

    pcm: PCM
    ttfa_s: float
    segments: int


@dataclass
class Load:
    """The background streams' connections, kept to read what they received once they stop."""

    clients: list[Client] = field(default_factory=list)
    replies_done: int = 0
    refused: int = 0  # starts the daemon refused (`overloaded`: admission control), each retried in 1 s
    not_ended: list[str] = field(default_factory=list)

    def during(self, start: float, end: float) -> tuple[float, float]:
        """(seconds of audio the streams received between `start` and `end`, the longest time within
        it that any one stream received none): how much load there was, and whether it was steady."""
        audio_s = 0.0
        longest_gap = 0.0
        for c in self.clients:
            arrivals = [start]
            for utterance in c.contexts.values():
                if utterance.started is None:
                    continue
                for at, frame in zip(utterance.audio_arrivals, utterance.audio, strict=True):
                    if start <= at <= end:
                        audio_s += frame.samples / utterance.started.sample_rate
                        arrivals.append(at)
            arrivals.append(end)
            longest_gap = max(longest_gap, float(np.diff(np.sort(arrivals)).max()))
        return audio_s, longest_gap


def raw_render(raw: RawEngine, text: str) -> PCM:
    """The whole sentence through the unsplit graph: G2P chunks (one, for these sentences), joined."""
    parts = []
    for chunk in raw.g2p(text):
        feeds = {
            "tokens": np.array([[0, *chunk.tokens, 0]], dtype=np.int64),
            "style": raw.voices.style(VOICE, len(chunk.tokens)),
            "speed": np.array([1.0], dtype=np.float32),
        }
        parts.append(np.asarray(raw.session.run(None, feeds)[0], dtype=np.float32).reshape(-1))
    audio = np.concatenate(parts)
    return np.asarray(np.clip(audio * 32767, -32768, 32767), dtype=np.int16)


async def first_audio(c: Client, context: str, within_s: float = 300.0) -> Audio | Error:
    """The context's first `audio` message, or the `error` that refused it (a refused `start`,
    `overloaded` by admission control, gets no audio and no `done`)."""
    deadline = time.monotonic() + within_s
    while True:
        msg = await c.recv(max(0.1, deadline - time.monotonic()))
        if isinstance(msg, Audio | Error) and msg.context == context:
            return msg


async def speak(url: str, texts: list[str], label: str) -> list[Take]:
    """Each text as its own context on one connection, one after another, PCM16 at 24 kHz."""
    takes = []
    async with client(url) as c:
        for i, text in enumerate(texts):
            context = f"{label}{i}"
            await c.send(Start(context=context, voice=VOICE, codec=AudioCodec.PCM16, sample_rate=SAMPLE_RATE))
            started = time.perf_counter()
            await c.send(Text(context=context, text=text))
            await c.send(End(context=context))
            first = await first_audio(c, context)
            ttfa = time.perf_counter() - started
            if isinstance(first, Error):
                raise RuntimeError(f"{text!r}: refused: {first.code} {first.message}")
            await c.until_done(context, timeout=300)
            utterance = c.utterance(context)
            done = utterance.done
            assert done is not None and utterance.started is not None
            assert utterance.started.codec is AudioCodec.PCM16
            assert utterance.started.sample_rate == SAMPLE_RATE
            if done.reason is not DoneReason.END or utterance.errors:
                raise RuntimeError(f"{text!r}: done {done.reason}, errors {utterance.errors}")
            takes.append(Take(utterance.pcm(), ttfa, done.segments))
            del c.contexts[context]
    return takes


async def load_stream(url: str, replies: list[str], offset: int, ready: asyncio.Event, load: Load) -> None:
    """Feeds long replies one after another, each a new context, until cancelled."""
    async with client(url) as c:
        load.clients.append(c)
        n = 0
        while True:
            context = f"load{n}"
            await c.send(Start(context=context, voice=VOICE))
            await c.send(Text(context=context, text=replies[(offset + n) % len(replies)]))
            await c.send(End(context=context))
            n += 1
            first = await first_audio(c, context)
            if isinstance(first, Error):
                if first.code is not ErrorCode.OVERLOADED:
                    raise RuntimeError(f"load stream refused: {first.code} {first.message}")
                load.refused += 1
                await asyncio.sleep(1.0)
                continue
            ready.set()
            await c.until_done(context, timeout=900)
            done = c.utterance(context).done
            assert isinstance(done, Done)
            load.replies_done += 1
            if done.reason is not DoneReason.END:
                load.not_ended.append(f"{context}: {done.reason}")


async def speak_loaded(url: str, texts: list[str], replies: list[str]) -> tuple[list[Take], dict[str, Any]]:
    """`speak` while LOAD_STREAMS connections stream replies; (takes, what the load did meanwhile)."""
    load = Load()
    readies = [asyncio.Event() for _ in range(LOAD_STREAMS)]
    tasks = [
        asyncio.create_task(load_stream(url, replies, i * len(replies) // LOAD_STREAMS, readies[i], load))
        for i in range(LOAD_STREAMS)
    ]
    all_ready = asyncio.ensure_future(asyncio.gather(*(r.wait() for r in readies)))
    try:
        # Every stream synthesizing before the first measured sentence (a load task only ends by failing).
        watched: list[asyncio.Future[Any]] = [all_ready, *tasks]
        await asyncio.wait(watched, timeout=300, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                task.result()  # a stream that failed to start raises here
        if not all(r.is_set() for r in readies):
            raise RuntimeError("the load streams did not start in time")
        started = time.perf_counter()
        takes = await speak(url, texts, "loaded")
        ended = time.perf_counter()
        for task in tasks:
            if task.done():
                task.result()  # a stream that died during the measurement would leave it partly idle
    finally:
        all_ready.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(all_ready, *tasks, return_exceptions=True)
    audio_s, longest_gap = load.during(started, ended)
    figures: dict[str, Any] = {
        "load_streams": LOAD_STREAMS,
        "loaded_measurement_wall_s": round(ended - started, 1),
        # Seconds of audio the load streams received per second of measurement. Nothing paces the
        # daemon to real time (a client's player does not either), so this is what the machine had
        # left beside the measured stream, not LOAD_STREAMS: under it, the load streams would stall.
        "load_audio_s_per_wall_s": round(audio_s / (ended - started), 2),
        "load_longest_gap_s": round(longest_gap, 2),
        "load_replies_done": load.replies_done,
        "load_starts_refused": load.refused,
    }
    if load.not_ended:
        figures["load_not_ended"] = load.not_ended
    return takes, figures


def load_replies(sentences: list[str], measured: list[str]) -> list[str]:
    """Long replies from the sentences not measured (all of them if every one is measured)."""
    skipped = set(measured)
    pool = [s for s in sentences if s not in skipped] or sentences
    return [" ".join(pool[i : i + LOAD_REPLY_SENTENCES]) for i in range(0, len(pool), LOAD_REPLY_SENTENCES)]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sentences", type=int, default=60, help="how many held-out sentences (60)")
    parser.add_argument("--skip", type=int, default=0, help="start at this sentence of the file")
    parser.add_argument(
        "--admission-headroom",
        type=float,
        default=0.0,
        help="the daemon's limits.admission_headroom (default here 0: admit every stream; the daemon's "
        "own 0.85 refuses a 4th stream where the box keeps fewer than ~4.7 in real time, 2 cores among them)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures and per-sentence results here")
    args = parser.parse_args()

    cache = Path(os.environ.get("SPEAKD_CACHE_DIR") or default_cache_dir())
    sentences = held_out_sentences()
    texts = sentences[args.skip : args.skip + args.sentences]
    if not texts:
        parser.error("no sentences in that slice")
    replies = load_replies(sentences, texts)

    raw = RawEngine(cache)
    raw_render(raw, "Warm up the raw engine.")
    audio: dict[str, list[PCM]] = {"raw": [raw_render(raw, text) for text in texts]}
    del raw
    takes: dict[str, list[Take]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = f"[limits]\nadmission_headroom = {args.admission_headroom}\n"
        daemon = Daemon(Path(tmp), cache, config=config)
        try:
            daemon.wait_ready()
            asyncio.run(speak(daemon.url, ["Warm up the daemon, please."], "warmup"))
            takes["daemon_idle"] = asyncio.run(speak(daemon.url, texts, "idle"))
            takes["daemon_loaded"], load = asyncio.run(speak_loaded(daemon.url, texts, replies))
        finally:
            daemon.stop()
    for name, condition_takes in takes.items():
        audio[name] = [take.pcm for take in condition_takes]

    errors = dict.fromkeys(CONDITIONS, 0)
    words = 0
    per_sentence: list[dict[str, Any]] = []
    for i, text in enumerate(texts):
        row: dict[str, Any] = {"text": text}
        for name in CONDITIONS:
            transcript = transcribe(audio[name][i], SAMPLE_RATE)
            count_errors, count = word_errors(text, transcript)
            errors[name] += count_errors
            row[name] = {"errors": count_errors, "transcript": transcript}
        for name, condition_takes in takes.items():
            row[name]["ttfa_ms"] = round(1000 * condition_takes[i].ttfa_s, 1)
            row[name]["segments"] = condition_takes[i].segments
        words += count
        per_sentence.append(row)
        if len({row[name]["errors"] for name in CONDITIONS}) > 1:
            heard = ", ".join(
                f"{name} {row[name]['errors']} {row[name]['transcript']!r}" for name in CONDITIONS
            )
            print(f"{text!r}: {heard}", flush=True)

    wer = {name: 100 * errors[name] / words for name in CONDITIONS}
    figures: dict[str, Any] = {
        "sentences": len(texts),
        "skip": args.skip,
        "words": words,
        "cores": os.cpu_count(),
        "admission_headroom": args.admission_headroom,
    }
    for name in CONDITIONS:
        figures[f"{name}_word_errors"] = errors[name]
        figures[f"{name}_wer_pct"] = round(wer[name], 2)
    figures["daemon_idle_minus_raw_points"] = round(wer["daemon_idle"] - wer["raw"], 2)
    figures["daemon_loaded_minus_raw_points"] = round(wer["daemon_loaded"] - wer["raw"], 2)
    figures["daemon_loaded_minus_idle_points"] = round(wer["daemon_loaded"] - wer["daemon_idle"], 2)
    for name, condition_takes in takes.items():
        ttfa = [1000 * take.ttfa_s for take in condition_takes]
        figures[f"{name}_ttfa_mean_ms"] = round(statistics.fmean(ttfa), 1)
        figures[f"{name}_ttfa_p50_ms"] = round(statistics.median(ttfa), 1)
        # Sentences the daemon cut at a first clause: their second part renders whole, not windowed.
        figures[f"{name}_sentences_in_two_segments"] = sum(take.segments > 1 for take in condition_takes)
    # The daemon's windows follow the vocoder speed it measures: under load the first window moves.
    figures["sentences_loaded_audio_differs_from_idle"] = sum(
        not np.array_equal(idle, loaded)
        for idle, loaded in zip(audio["daemon_idle"], audio["daemon_loaded"], strict=True)
    )
    figures.update(load)

    print(f"{len(texts)} sentences from {args.skip}, {words} words, voice {VOICE}, Whisper tiny.en")
    for name in CONDITIONS:
        print(f"{name:>13}: {errors[name]}/{words} word errors = {wer[name]:.1f} %")
    print(
        f"daemon idle - raw: {figures['daemon_idle_minus_raw_points']:+.2f} points; "
        f"loaded - raw: {figures['daemon_loaded_minus_raw_points']:+.2f}; "
        f"loaded - idle: {figures['daemon_loaded_minus_idle_points']:+.2f}"
    )
    for name in takes:
        print(
            f"{name:>13}: TTFA mean {figures[f'{name}_ttfa_mean_ms']:.0f} ms, "
            f"p50 {figures[f'{name}_ttfa_p50_ms']:.0f} ms, "
            f"{figures[f'{name}_sentences_in_two_segments']} sentences cut at a first clause"
        )
    print(
        f"daemon audio differs between idle and loaded in "
        f"{figures['sentences_loaded_audio_differs_from_idle']} of {len(texts)} sentences"
    )
    print(
        f"load: {LOAD_STREAMS} streams over {load['loaded_measurement_wall_s']:.0f} s of measurement, "
        f"{load['load_audio_s_per_wall_s']:.2f} s of audio received per second, longest gap of one "
        f"stream {load['load_longest_gap_s']:.2f} s, {load['load_replies_done']} replies finished"
        + (f"; not ended: {load['load_not_ended']}" if "load_not_ended" in load else "")
    )
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "sentences": per_sentence}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
