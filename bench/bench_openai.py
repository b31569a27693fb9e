"""Time to first byte of the OpenAI speech API against the WebSocket's time to first audio, in one run.

Usage: .venv/bin/python bench/bench_openai.py [--rounds 3] [--json out.json]

Starts a real `speakd serve` and sends each reply opening of bench/llm_openings.txt (first sentences
as chat assistants write them) through three doors, rotating their order every round so machine
noise hits all alike:
- WebSocket (protocol v1, Opus, the default): the text in one `text` + `end`; time from sending the
  text to the first `audio` message;
- `POST /v1/audio/speech`, `response_format` pcm, then mp3, body streamed: time from sending the
  request to the first byte of the body (what a player can start on).
Each request waits for the previous one to finish, so every figure is one listener on an idle box.
Ratios to the WebSocket are of the medians measured side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon import Daemon, client

from speakd.protocol import Audio, End, Start, Text
from speakd.server.config import default_cache_dir

OPENINGS = Path(__file__).resolve().parent / "llm_openings.txt"
VOICE = "jf_gongitsune"
DOORS = ("websocket", "http_pcm", "http_mp3")


def openings() -> list[str]:
    lines = OPENINGS.read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


async def websocket_first_audio(url: str, text: str) -> float:
    async with client(url) as c:
        await c.send(Start(context="b", voice=VOICE))
        started = time.perf_counter()
        await c.send(Text(context="b", text=text))
        await c.send(End(context="b"))
        await c.until("b", Audio)
        first = time.perf_counter() - started
        await c.until_done("b")
        return first


async def http_first_byte(
    session: aiohttp.ClientSession, base: str, text: str, response_format: str
) -> float:
    body = {"model": "tts-1", "voice": VOICE, "input": text, "response_format": response_format}
    started = time.perf_counter()
    async with session.post(f"{base}/v1/audio/speech", json=body) as response:
        assert response.status == 200, await response.text()
        first_chunk = await response.content.readany()
        first = time.perf_counter() - started
        assert first_chunk
        await response.read()  # the rest, so the next request finds an idle daemon
    return first


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


async def run(daemon: Daemon, rounds: int) -> dict[str, Any]:
    texts = openings()
    times: dict[str, list[float]] = {door: [] for door in DOORS}
    async with aiohttp.ClientSession() as session:
        # One warm-up of each door: the first request of a process pays for lazy imports.
        await websocket_first_audio(daemon.url, texts[0])
        await http_first_byte(session, daemon.http, texts[0], "mp3")
        for round_ in range(rounds):
            for i, text in enumerate(texts):
                shift = (round_ + i) % len(DOORS)
                for door in DOORS[shift:] + DOORS[:shift]:
                    if door == "websocket":
                        seconds = await websocket_first_audio(daemon.url, text)
                    else:
                        seconds = await http_first_byte(
                            session, daemon.http, text, door.removeprefix("http_")
                        )
                    times[door].append(seconds)
    figures: dict[str, Any] = {"samples_per_door": len(times["websocket"]), "texts": len(texts)}
    ws_p50 = statistics.median(times["websocket"])
    for door in DOORS:
        figures[f"{door}_p50_ms"] = round(1000 * statistics.median(times[door]), 1)
        figures[f"{door}_p95_ms"] = round(1000 * pct(times[door], 95), 1)
        figures[f"{door}_p50_vs_websocket"] = round(statistics.median(times[door]) / ws_p50, 3)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(Path(tmp), default_cache_dir())
        try:
            daemon.wait_ready()
            figures = asyncio.run(run(daemon, args.rounds))
        finally:
            daemon.stop()
    for key, value in figures.items():
        print(f"{key:32} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
