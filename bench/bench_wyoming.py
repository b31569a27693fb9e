"""The Wyoming door against the native WebSocket, on the same LLM replies, in one run (issue 10).

Usage: SPEAKD_CACHE_DIR=~/.cache/speakd .venv/bin/python bench/bench_wyoming.py [--replies 10] [--json F]

Starts one real `speakd serve` with its Wyoming door on, then streams each reply of
bench/llm_replies.txt as LLM-like tokens at --tokens-per-s (40), one reply at a time, alternating doors
reply by reply so machine noise hits both alike:
- Wyoming, as Home Assistant 2025.7+ sends it (the `wyoming` package's client): `synthesize-start`, a
  `synthesize-chunk` per token, the whole text again as a plain `synthesize` (for servers that do not
  stream), `synthesize-stop`; read until `synthesize-stopped`;
- the native WebSocket (protocol v1): `start`, a `text` per token, `end`; read until `done`.

For each: the time from sending the token that completes the first sentence to the first audio
(negative when a first clause was spoken before the sentence ended), and the reply's real-time factor
(from the first token sent to the last audio, over the audio's length). Wyoming audio is raw PCM, the
WebSocket's Opus (the daemon's default), so the encoder differs; both come from the same pipeline.
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
from pathlib import Path
from typing import Any

from wyoming.audio import AudioChunk
from wyoming.client import AsyncTcpClient
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_listeners import REPLIES, first_sentence_end, llm_tokens, paragraphs, speak, token_at
from daemon import Daemon

from speakd.server.config import default_cache_dir


async def wyoming_reply(
    port: int, reply: str, tokens: list[str], mark: int, interval_s: float
) -> dict[str, float]:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        first_audio: float | None = None
        audio_s = 0.0
        stopped = asyncio.Event()
        last_audio = 0.0

        async def read() -> None:
            nonlocal first_audio, audio_s, last_audio
            while True:
                event = await client.read_event()
                if event is None:
                    raise RuntimeError("the Wyoming connection closed early")
                if AudioChunk.is_type(event.type):
                    chunk = AudioChunk.from_event(event)
                    last_audio = time.perf_counter()
                    first_audio = first_audio or last_audio
                    audio_s += len(chunk.audio) / (chunk.width * chunk.channels * chunk.rate)
                elif SynthesizeStopped.is_type(event.type):
                    stopped.set()
                    return
                elif event.type == "error":
                    raise RuntimeError(f"Wyoming error: {event.data}")

        reader = asyncio.create_task(read())
        await client.write_event(SynthesizeStart().event())
        begun = time.perf_counter()
        mark_at = begun
        for i, token in enumerate(tokens):
            delay = begun + i * interval_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if i == mark:
                mark_at = time.perf_counter()
            await client.write_event(SynthesizeChunk(text=token).event())
        await client.write_event(Synthesize(text=reply).event())
        await client.write_event(SynthesizeStop().event())
        await asyncio.wait_for(reader, 300)
    assert first_audio is not None
    return {
        "ttfa_ms": (first_audio - mark_at) * 1e3,
        "rtf": (last_audio - begun) / audio_s,
        "audio_s": audio_s,
    }


async def websocket_reply(url: str, tokens: list[str], mark: int, interval_s: float) -> dict[str, float]:
    heard = await speak(url, "bench", tokens, interval_s, mark)
    assert heard.first_audio is not None and heard.mark_sent_at is not None
    audio_s = sum(seconds for _, seconds in heard.frames)
    last = heard.frames[-1][0]
    return {
        "ttfa_ms": (heard.first_audio - heard.mark_sent_at) * 1e3,
        "rtf": (last - heard.sent_at) / audio_s,
        "audio_s": audio_s,
    }


async def run(daemon: Daemon, replies: list[str], interval_s: float) -> dict[str, Any]:
    port = daemon.wyoming_port()
    results: dict[str, list[dict[str, float]]] = {"wyoming": [], "websocket": []}
    await websocket_reply(daemon.url, llm_tokens(replies[0])[:8], 0, 0.0)  # warm-up
    for index, reply in enumerate(replies):
        tokens = llm_tokens(reply)
        mark = token_at(tokens, first_sentence_end(reply))
        order = ("wyoming", "websocket") if index % 2 == 0 else ("websocket", "wyoming")
        for door in order:
            if door == "wyoming":
                row = await wyoming_reply(port, reply, tokens, mark, interval_s)
            else:
                row = await websocket_reply(daemon.url, tokens, mark, interval_s)
            results[door].append(row)
            print(
                f"reply {index} {door:9}: {json.dumps({k: round(v, 3) for k, v in row.items()})}", flush=True
            )
    summary: dict[str, Any] = {}
    for door, rows in results.items():
        summary[door] = {
            "replies": len(rows),
            "ttfa_after_first_sentence_p50_ms": statistics.median(r["ttfa_ms"] for r in rows),
            "rtf_p50": statistics.median(r["rtf"] for r in rows),
            "audio_s_total": sum(r["audio_s"] for r in rows),
            "rows": rows,
        }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--replies", type=int, default=10, help="replies of bench/llm_replies.txt (default 10)"
    )
    parser.add_argument("--tokens-per-s", type=float, default=40.0, help="LLM token rate (default 40)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    cache = Path(os.environ.get("SPEAKD_CACHE_DIR") or default_cache_dir())
    replies = paragraphs(REPLIES)[: args.replies]
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(Path(tmp), cache, "[limits]\nadmission_headroom = 0\n", args=["--wyoming", "0"])
        try:
            daemon.wait_ready()
            summary = asyncio.run(run(daemon, replies, 1 / args.tokens_per_s))
        finally:
            daemon.stop()
    print(f"\n{len(replies)} replies at {args.tokens_per_s:g} tokens/s, doors alternating reply by reply")
    print("door       first audio after the first sentence ends, p50   RTF p50")
    for door, figures in summary.items():
        ttfa, rtf = figures["ttfa_after_first_sentence_p50_ms"], figures["rtf_p50"]
        print(f"{door:10} {ttfa:8.0f} ms {'':36} {rtf:.3f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
