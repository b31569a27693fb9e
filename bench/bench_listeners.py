"""What a listener of LLM replies gets from the daemon, against the raw engine, in one run (issue 9).

Usage: SPEAKD_CACHE_DIR=~/.cache/speakd .venv/bin/python bench/bench_listeners.py [--rounds 2] [--json F]

The short sentences of bench_daemon.py flatter the first audio; a chat assistant's reply opens with a
15-word sentence and goes on for a minute. Starts a real `speakd serve` and measures, with realistic
text (bench/llm_openings.txt, bench/llm_replies.txt):

1. Whole-sentence time to first audio: each reply opening sent at once (`text` + `end`) on an idle
   daemon, one at a time; from sending the text to the first `audio` message. Beside it, the raw engine
   (bench_daemon.RawEngine: the daemon's G2P and segmentation, the unsplit ONNX graph, no daemon)
   rendering the same sentence whole: what a client would wait for without streaming.
2. Token-stream time to first audio: whole replies streamed as LLM-like tokens (words with their
   leading space, long words cut in pieces, punctuation apart; ~1.25 tokens a word), one `text` message
   per token at --tokens-per-s (40), then `end`. Timed from sending the token that ends the first
   sentence (its . ! or ?) to the first audio; negative when the daemon spoke a first clause before
   the sentence ended. Beside it, the raw engine rendering that first sentence whole.
3. Playback stalls of every streamed reply: a player that starts once it holds --prebuffer-ms (200) of
   audio (or at `done`), plays in real time, and re-buffers the same amount whenever it runs dry
   before the end: each re-buffering is a stall (`play` below).
4. Long listeners arriving one after another: a connection every --arrival-gap seconds, up to
   --listeners, each streaming ~60 s of replies at the same token pace and playing with the same
   player. A context refused with `overloaded` (admission) counts as refused, not as a failure. Beside
   it, the raw engine's capacity on the same text: 1 / its real-time factor, the streams this machine
   could keep in real time with no overhead at all; and the daemon's `speakd_load` from /metrics.

Scenarios 1 and 2 alternate daemon and raw engine item by item, so machine noise hits both alike;
scenario 4 runs once, after the raw engine's capacity is measured. Compare ratios across runs, not
absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from websockets.exceptions import ConnectionClosed, InvalidStatus

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_daemon import VOICE, RawEngine, pct
from daemon import Client, Daemon, Utterance, client

from speakd.protocol import Done, End, Error, ErrorCode, Start, Text
from speakd.server.config import default_cache_dir

HERE = Path(__file__).resolve().parent
OPENINGS = HERE / "llm_openings.txt"
REPLIES = HERE / "llm_replies.txt"

# An LLM-like token: a contraction, a word or number with its leading space, one punctuation mark (with
# its leading space), or a run of whitespace. Numbers come in groups of up to three digits.
TOKEN = re.compile(r"'(?:s|t|re|ve|m|ll|d)\b| ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]|\s+")
# Words longer than this many letters are cut into pieces of at most PIECE letters, as BPE
# vocabularies cut rarer words: this brings the count to ~1.25 tokens a word (printed).
LONG_WORD = 7
PIECE = 5
# Where a sentence ends: terminators, closing quotes or brackets, then whitespace or the end.
SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")
# The retry hint an `overloaded` refusal carries in its message ("...; retry in 3 s").
RETRY_HINT = re.compile(r"retry in (\d+(?:\.\d+)?) ?s\b")
METRIC_LOAD = re.compile(r"^speakd_load\s+(\S+)", re.MULTILINE)


def paragraphs(path: Path) -> list[str]:
    """Paragraphs of a text file (blank-line separated, `#` lines dropped), each joined into one line."""
    found: list[str] = []
    lines: list[str] = []
    for line in [*path.read_text().splitlines(), ""]:
        if line.startswith("#"):
            continue
        if line.strip():
            lines.append(line.strip())
        elif lines:
            found.append(" ".join(lines))
            lines = []
    return found


def openings() -> list[str]:
    return [line for line in OPENINGS.read_text().splitlines() if line.strip() and not line.startswith("#")]


def llm_tokens(text: str) -> list[str]:
    """Split text the way an LLM streams it; the tokens join back to `text` exactly."""
    tokens: list[str] = []
    for match in TOKEN.finditer(text):
        token = match.group()
        space = len(token) - len(token.lstrip())
        while len(token) - space > LONG_WORD and token.strip().isalpha():
            tokens.append(token[: space + PIECE])
            token, space = token[space + PIECE :], 0
        tokens.append(token)
    assert "".join(tokens) == text
    return tokens


def first_sentence_end(text: str) -> int:
    """Index just past the first sentence's terminator (or the end of `text` if it has none)."""
    match = SENTENCE_END.search(text)
    return match.end() if match else len(text)


def token_at(tokens: Sequence[str], index: int) -> int:
    """The index of the token holding character `index - 1` of the joined text: the one that ends
    the text up to `index`."""
    seen = 0
    for i, token in enumerate(tokens):
        seen += len(token)
        if seen >= index:
            return i
    return len(tokens) - 1


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def long_text(replies: Sequence[str], start: int, words: int) -> str:
    """Whole sentences from the replies, from reply `start` on and round again, until `words` words."""
    pool = [s for i in range(len(replies)) for s in sentences(replies[(start + i) % len(replies)])]
    taken: list[str] = []
    while sum(len(s.split()) for s in taken) < words:
        taken.append(pool[len(taken) % len(pool)])
    return " ".join(taken)


# -- the listener's player ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Playback:
    stalls: int  # times the player ran dry before the end while more audio was still to come
    stall_s: float  # seconds spent re-buffering after running dry
    wait_s: float  # from the first audio message to the start of playback (the first pre-buffer)
    audio_s: float


def play(frames: Sequence[tuple[float, float]], done_at: float | None, prebuffer_s: float) -> Playback:
    """A live player fed `frames` ((arrival time, seconds of audio), in order), `done` at `done_at`.

    It starts once it holds `prebuffer_s` of audio (or when `done` comes), plays in real time, and if it
    runs dry while more audio comes later, that is a stall: it waits until it holds `prebuffer_s` again
    (or `done` comes), then plays on. Running dry after the last frame is the end, not a stall.
    """
    stalls, stall_s = 0, 0.0
    playing = False
    buffered = 0.0  # seconds received and not yet played, as of `clock`
    clock = 0.0
    dry_at: float | None = None  # when the buffer ran dry, while re-buffering after a stall
    started_at: float | None = None

    def resume(now: float) -> None:
        nonlocal playing, stall_s, dry_at, started_at
        playing = True
        if dry_at is not None:
            stall_s += now - dry_at
            dry_at = None
        if started_at is None:
            started_at = now

    for arrival, seconds in frames:
        if playing:
            if arrival - clock > buffered + 1e-9:
                stalls += 1
                playing, dry_at = False, clock + buffered
                buffered = 0.0
            else:
                buffered -= arrival - clock
        clock = arrival
        buffered += seconds
        if not playing and buffered >= prebuffer_s - 1e-9:
            resume(arrival)
    if not playing and buffered > 0 and done_at is not None:
        resume(done_at)
    first = frames[0][0] if frames else 0.0
    return Playback(
        stalls=stalls,
        stall_s=stall_s,
        wait_s=(started_at - first) if started_at is not None else 0.0,
        audio_s=sum(seconds for _, seconds in frames),
    )


# -- one context over the WebSocket ------------------------------------------------------------------


@dataclass
class Heard:
    """One context as the client saw it, timed on the perf_counter clock."""

    sent_at: float = 0.0  # the first `text` sent
    mark_sent_at: float | None = None  # the token that ends the first sentence sent
    frames: list[tuple[float, float]] = field(default_factory=list)  # (arrival, seconds of audio)
    done_at: float | None = None
    done_reason: str | None = None
    refused: str | None = None  # why the daemon would not take the context (`overloaded`, HTTP 503)
    retry_hint: dict[str, Any] = field(default_factory=dict)  # from the message, or Retry-After
    cut: str | None = None  # an error code that stopped the context after its audio began
    other_errors: list[str] = field(default_factory=list)

    @property
    def first_audio(self) -> float | None:
        return self.frames[0][0] if self.frames else None


REFUSALS = (ErrorCode.OVERLOADED, ErrorCode.SHUTTING_DOWN)


async def receive(c: Client, context: str, heard: Heard, stop: asyncio.Event, quiet_s: float) -> None:
    """Collect the context's messages until `done`, or shortly after a refusal that brings none;
    `quiet_s` is the longest wait for the next message."""
    while heard.done_at is None:
        wait = 2.0 if stop.is_set() else quiet_s
        try:
            msg = await c.recv(wait)
        except TimeoutError:
            if stop.is_set():
                return
            raise
        if msg.context != context and not (isinstance(msg, Error) and msg.context is None):
            continue
        if isinstance(msg, Done):
            heard.done_at, heard.done_reason = time.perf_counter(), msg.reason.value
        elif isinstance(msg, Error):
            if msg.code in REFUSALS and not c.utterance(context).audio:
                heard.refused = f"{msg.code.value}: {msg.message}"
                if hint := RETRY_HINT.search(msg.message):
                    heard.retry_hint = {"retry_in_s": float(hint.group(1))}
                stop.set()
            elif msg.code in REFUSALS:
                heard.cut = f"{msg.code.value}: {msg.message}"
                stop.set()
            elif not stop.is_set():  # after a refusal, the texts still in flight are unknown_context
                heard.other_errors.append(f"{msg.code.value}: {msg.message}")


def frames(utterance: Utterance) -> list[tuple[float, float]]:
    """(arrival time, seconds of audio) of each `audio` message."""
    rate = utterance.started.sample_rate if utterance.started else 24000
    return [(at, a.samples / rate) for at, a in zip(utterance.audio_arrivals, utterance.audio, strict=True)]


async def speak(
    url: str, context: str, tokens: Sequence[str], interval_s: float, mark: int, quiet_s: float = 120.0
) -> Heard:
    """Send `tokens` one `text` each, `interval_s` apart on a fixed schedule, then `end`; collect the
    reply. `mark` is the index of the token whose send time is recorded (the first sentence's end)."""
    heard = Heard()
    stop = asyncio.Event()
    try:
        async with client(url) as c:
            reader = asyncio.create_task(receive(c, context, heard, stop, quiet_s))
            try:
                await c.send(Start(context=context, voice=VOICE))
                begun = time.perf_counter()
                for i, token in enumerate(tokens):
                    delay = begun + i * interval_s - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if stop.is_set():
                        break
                    now = time.perf_counter()
                    if i == 0:
                        heard.sent_at = now
                    if i == mark:
                        heard.mark_sent_at = now
                    await c.send(Text(context=context, text=token))
                if not stop.is_set():
                    await c.send(End(context=context))
                await reader
            except ConnectionClosed as exc:
                heard.cut = f"connection closed: {exc}"
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await reader
                heard.frames = frames(c.utterance(context))
    except InvalidStatus as exc:
        heard.refused = f"HTTP {exc.response.status_code} at the upgrade"
        retry = exc.response.headers.get("Retry-After")
        if retry is not None:
            heard.retry_hint = {"Retry-After": retry}
    return heard


def ms(seconds: float) -> float:
    return round(1000 * seconds, 1)


# -- the scenarios -----------------------------------------------------------------------------------


async def whole_sentences(url: str, raw: RawEngine, rounds: int, limit: int | None) -> dict[str, Any]:
    """Scenario 1: each opening at once, one at a time; the raw engine's whole render of it beside."""
    ttfa: list[float] = []
    raw_whole: list[float] = []
    for _ in range(rounds):
        for text in openings()[:limit]:
            heard = await speak(url, "s1", [text], 0.0, 0)
            assert heard.first_audio is not None and not heard.refused, heard
            ttfa.append(heard.first_audio - heard.sent_at)
            raw_whole.append(raw.speak(text)[1])
    return {
        "samples": len(ttfa),
        "ttfa_p50_ms": ms(pct(ttfa, 50)),
        "ttfa_p95_ms": ms(pct(ttfa, 95)),
        "raw_whole_sentence_p50_ms": ms(pct(raw_whole, 50)),
        "raw_whole_sentence_p95_ms": ms(pct(raw_whole, 95)),
        "ttfa_p50_vs_raw_p50": round(pct(ttfa, 50) / pct(raw_whole, 50), 3),
    }


async def streamed_replies(
    url: str, raw: RawEngine, rounds: int, limit: int | None, interval_s: float, prebuffer_s: float
) -> dict[str, Any]:
    """Scenarios 2 and 3: each reply streamed as tokens, one at a time; stalls of a live player."""
    replies = paragraphs(REPLIES)[:limit]
    from_mark: list[float] = []
    from_first_token: list[float] = []
    raw_first: list[float] = []
    per_reply: list[dict[str, Any]] = []
    for round_ in range(rounds):
        for index, reply in enumerate(replies):
            tokens = llm_tokens(reply)
            end = first_sentence_end(reply)
            heard = await speak(url, "s2", tokens, interval_s, token_at(tokens, end))
            assert heard.first_audio is not None and heard.mark_sent_at is not None and not heard.refused
            from_mark.append(heard.first_audio - heard.mark_sent_at)
            from_first_token.append(heard.first_audio - heard.sent_at)
            raw_first.append(raw.speak(reply[:end])[1])
            playback = play(heard.frames, heard.done_at, prebuffer_s)
            per_reply.append(
                {
                    "round": round_,
                    "reply": index,
                    "ttfa_from_sentence_end_ms": ms(from_mark[-1]),
                    "ttfa_from_first_token_ms": ms(from_first_token[-1]),
                    "raw_first_sentence_ms": ms(raw_first[-1]),
                    "stalls": playback.stalls,
                    "stall_s": round(playback.stall_s, 3),
                    "audio_s": round(playback.audio_s, 2),
                    "render_rtf": round(((heard.done_at or 0.0) - heard.sent_at) / playback.audio_s, 3),
                    "errors": heard.other_errors,
                }
            )
    words = sum(len(r.split()) for r in replies)
    return {
        "samples": len(from_mark),
        "tokens_per_word": round(sum(len(llm_tokens(r)) for r in replies) / words, 2),
        "ttfa_p50_ms": ms(pct(from_mark, 50)),
        "ttfa_p95_ms": ms(pct(from_mark, 95)),
        "ttfa_from_first_token_p50_ms": ms(pct(from_first_token, 50)),
        "raw_first_sentence_p50_ms": ms(pct(raw_first, 50)),
        "raw_first_sentence_p95_ms": ms(pct(raw_first, 95)),
        "stalls_total": sum(r["stalls"] for r in per_reply),
        "stall_s_total": round(sum(r["stall_s"] for r in per_reply), 3),
        "replies_with_stalls": sum(1 for r in per_reply if r["stalls"]),
        "replies": len(per_reply),
        "per_reply": per_reply,
    }


async def sample_load(http: str, into: list[tuple[float, float]], every_s: float) -> None:
    """Read `speakd_load` from /metrics every `every_s` until cancelled."""
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                into.append((time.perf_counter(), await read_load(session, http)))
            await asyncio.sleep(every_s)


async def read_load(session: aiohttp.ClientSession, http: str) -> float:
    async with session.get(f"{http}/metrics") as response:
        match = METRIC_LOAD.search(await response.text())
    return float(match.group(1)) if match else float("nan")


async def long_listeners(
    daemon: Daemon,
    raw: RawEngine,
    listeners: int,
    gap_s: float,
    words: int,
    interval_s: float,
    prebuffer_s: float,
) -> dict[str, Any]:
    """Scenario 4: a long listener every `gap_s`; the raw engine's capacity on the same text beside."""
    replies = paragraphs(REPLIES)
    texts = [long_text(replies, i, words) for i in range(listeners)]
    _, raw_total, raw_audio = raw.speak(texts[0])
    raw_rtf = raw_total / raw_audio

    async def listener(i: int) -> Heard:
        await asyncio.sleep(i * gap_s)
        tokens = llm_tokens(texts[i])
        return await speak(daemon.url, f"l{i}", tokens, interval_s, 0, quiet_s=300.0)

    loads: list[tuple[float, float]] = []
    sampler = asyncio.create_task(sample_load(daemon.http, loads, 1.0))
    begun = time.perf_counter()
    heard = await asyncio.gather(*(listener(i) for i in range(listeners)))
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    async with aiohttp.ClientSession() as session:
        load_at_end = await read_load(session, daemon.http)

    rows: list[dict[str, Any]] = []
    for i, h in enumerate(heard):
        playback = play(h.frames, h.done_at, prebuffer_s)
        rows.append(
            {
                "listener": i,
                "arrived_s": round(h.sent_at - begun, 2) if h.sent_at else round(i * gap_s, 2),
                "admitted": h.refused is None,
                "refused": h.refused,
                "retry_hint": h.retry_hint,
                "cut": h.cut,
                "done_reason": h.done_reason,
                "ttfa_ms": ms(h.first_audio - h.sent_at) if h.first_audio is not None else None,
                "wait_s": round(playback.wait_s, 3),
                "stalls": playback.stalls,
                "stall_s": round(playback.stall_s, 3),
                "audio_s": round(playback.audio_s, 2),
                "errors": h.other_errors,
            }
        )
    admitted = [r for r in rows if r["admitted"]]
    during = [load for _, load in loads if not math.isnan(load)]
    return {
        "listeners": listeners,
        "arrival_gap_s": gap_s,
        "words_per_listener": words,
        "admitted": len(admitted),
        "refused": len(rows) - len(admitted),
        "played_without_stalls": sum(1 for r in admitted if r["stalls"] == 0 and not r["cut"]),
        "all_admitted_stalled": bool(admitted) and all(r["stalls"] > 0 for r in admitted),
        "cut_mid_stream": sum(1 for r in admitted if r["cut"]),
        "raw_rtf": round(raw_rtf, 3),
        "raw_capacity_streams": round(1 / raw_rtf, 2),
        "raw_audio_s": round(raw_audio, 1),
        "speakd_load_peak": max(during) if during else None,
        "speakd_load_at_end": load_at_end,
        "per_listener": rows,
    }


# -- the report --------------------------------------------------------------------------------------


def report(figures: dict[str, Any]) -> None:
    rows: list[tuple[str, str]] = []
    if s1 := figures.get("whole_sentence"):
        rows += [
            ("1. whole sentence TTFA, p50 / p95", f"{s1['ttfa_p50_ms']:.0f} / {s1['ttfa_p95_ms']:.0f} ms"),
            (
                "   raw engine, whole sentence, p50 / p95",
                f"{s1['raw_whole_sentence_p50_ms']:.0f} / {s1['raw_whole_sentence_p95_ms']:.0f} ms",
            ),
            ("   TTFA p50 / raw p50", f"{s1['ttfa_p50_vs_raw_p50']:.2f}  ({s1['samples']} samples)"),
        ]
    if s2 := figures.get("token_stream"):
        rows += [
            (
                "2. token stream TTFA from 1st sentence end, p50 / p95",
                f"{s2['ttfa_p50_ms']:.0f} / {s2['ttfa_p95_ms']:.0f} ms",
            ),
            ("   same, from the first token, p50", f"{s2['ttfa_from_first_token_p50_ms']:.0f} ms"),
            (
                "   raw engine, first sentence whole, p50 / p95",
                f"{s2['raw_first_sentence_p50_ms']:.0f} / {s2['raw_first_sentence_p95_ms']:.0f} ms",
            ),
            ("   tokens per word", f"{s2['tokens_per_word']}  ({s2['samples']} samples)"),
            (
                "3. stalls: total / replies with >= 1 / seconds",
                f"{s2['stalls_total']} / {s2['replies_with_stalls']} of {s2['replies']} "
                f"/ {s2['stall_s_total']:.2f} s",
            ),
        ]
    if s4 := figures.get("long_listeners"):
        rows += [
            (
                "4. long listeners: admitted / refused / zero stalls",
                f"{s4['admitted']} / {s4['refused']} / {s4['played_without_stalls']} "
                f"of {s4['listeners']} (one every {s4['arrival_gap_s']} s)",
            ),
            ("   every admitted listener stalled", str(s4["all_admitted_stalled"])),
            (
                "   raw engine capacity (1 / RTF)",
                f"{s4['raw_capacity_streams']:.2f} streams (RTF {s4['raw_rtf']:.3f})",
            ),
            ("   speakd_load peak / at end", f"{s4['speakd_load_peak']} / {s4['speakd_load_at_end']}"),
        ]
    width = max((len(name) for name, _ in rows), default=0)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if s4:
        print()
        print("listener  arrived  admitted  ttfa ms  stalls  stall s  audio s  note")
        for r in s4["per_listener"]:
            ttfa = "-" if r["ttfa_ms"] is None else f"{r['ttfa_ms']:.0f}"
            note = r["refused"] or r["cut"] or ", ".join(r["errors"])
            print(
                f"{r['listener']:>8}  {r['arrived_s']:>7.1f}  {'yes' if r['admitted'] else 'no':>8}  "
                f"{ttfa:>7}  {r['stalls']:>6}  {r['stall_s']:>7.2f}  {r['audio_s']:>7.1f}  {note}"
            )


async def run(daemon: Daemon, raw: RawEngine, args: argparse.Namespace) -> dict[str, Any]:
    interval_s = 1 / args.tokens_per_s
    prebuffer_s = args.prebuffer_ms / 1000
    # One warm-up through the daemon: the first request of a process pays for lazy imports.
    await speak(daemon.url, "warm", [openings()[0]], 0.0, 0)
    figures: dict[str, Any] = {
        "cores": os.cpu_count(),
        "rounds": args.rounds,
        "tokens_per_s": args.tokens_per_s,
        "prebuffer_ms": args.prebuffer_ms,
    }
    if not args.skip_sentences:
        figures["whole_sentence"] = await whole_sentences(daemon.url, raw, args.rounds, args.limit)
    if not args.skip_stream:
        figures["token_stream"] = await streamed_replies(
            daemon.url, raw, args.rounds, args.limit, interval_s, prebuffer_s
        )
    if not args.skip_long:
        figures["long_listeners"] = await long_listeners(
            daemon, raw, args.listeners, args.arrival_gap, args.long_words, interval_s, prebuffer_s
        )
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of scenarios 1-3 (default 2)")
    parser.add_argument(
        "--limit", type=int, help="use only the first N openings and replies in scenarios 1-3 (default all)"
    )
    parser.add_argument("--listeners", type=int, default=5, help="long listeners (default 5)")
    parser.add_argument(
        "--arrival-gap", type=float, default=5.0, help="seconds between long listeners (default 5)"
    )
    parser.add_argument(
        "--long-words", type=int, default=130, help="words per long listener (default 130: ~60 s)"
    )
    parser.add_argument("--tokens-per-s", type=float, default=40.0, help="LLM token rate (default 40)")
    parser.add_argument("--prebuffer-ms", type=float, default=200.0, help="player pre-buffer (default 200)")
    parser.add_argument("--skip-sentences", action="store_true", help="skip scenario 1")
    parser.add_argument("--skip-stream", action="store_true", help="skip scenarios 2 and 3")
    parser.add_argument("--skip-long", action="store_true", help="skip scenario 4")
    parser.add_argument("--config", type=Path, help="a speakd.toml for the daemon")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    cache = Path(os.environ.get("SPEAKD_CACHE_DIR") or default_cache_dir())
    raw = RawEngine(cache)
    raw.speak("Warm up the raw engine.")
    config = args.config.read_text() if args.config else ""
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(Path(tmp), cache, config=config)
        try:
            daemon.wait_ready()
            figures = asyncio.run(run(daemon, raw, args))
        finally:
            daemon.stop()
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
