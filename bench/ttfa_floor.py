"""The floor under time to first audio on this machine: what the first segment of a reply must cost
before any of it can be heard, with no daemon, no queue and no socket (issue 9).

Usage: SPEAKD_CACHE_DIR=~/.cache/speakd .venv/bin/python bench/ttfa_floor.py [--repeats 3]

For each opening of bench/llm_openings.txt, sent whole, the daemon's own segmenter gives the first
segment (a short first clause when there is one). Then, in this process, on the ONNX engine the daemon
runs, each step timed alone (median of --repeats):
- G2P of that segment (misaki and spaCy, as the daemon's G2P stage runs them);
- the acoustic stage on its tokens (the whole segment: durations need every token);
- the vocoder on the smallest first window the daemon ever renders: MIN_WINDOW_FRAMES (0.3 s) emitted,
  with LEAD_CONTEXT_FRAMES before it and RIGHT_CONTEXT_FRAMES after.

Their sum is a floor: the daemon adds its queues, its stage hand-offs, Opus and the socket, and plans
a longer first window when a short one would leave the listener without audio before the next. A
time-to-first-audio target under this floor cannot be met by scheduling on this machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon import VOICE

from speakd.server.config import default_cache_dir
from speakd.server.core.segmenter import Segmenter
from speakd.server.engines.kokoro.assets import prepare_embedded_model
from speakd.server.engines.kokoro.engine import AcousticRequest
from speakd.server.engines.kokoro.g2p import EnglishG2P
from speakd.server.engines.kokoro.onnx_engine import OnnxEngine
from speakd.server.engines.kokoro.voices import VoiceBank
from speakd.server.engines.kokoro.windows import (
    LEAD_CONTEXT_FRAMES,
    MIN_WINDOW_FRAMES,
    RIGHT_CONTEXT_FRAMES,
    Window,
    segment_span,
)

HERE = Path(__file__).resolve().parent


def openings() -> list[str]:
    lines = (HERE / "llm_openings.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def timed(work: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(median seconds over `repeats` calls, the last call's result)."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per step (median; default 3)")
    args = parser.parse_args()
    files = prepare_embedded_model(Path(os.environ.get("SPEAKD_CACHE_DIR") or default_cache_dir()))
    engine = OnnxEngine(files)
    g2p = EnglishG2P(files.vocab())
    voices = VoiceBank.from_npz(files.voices_npz)
    g2p("Warm up the tagger and the lexicon.")  # spaCy's first call loads its pipeline
    rows = []
    print(f"{'g2p ms':>7} {'acoustic':>9} {'window':>7} {'floor':>6}  words  first segment")
    for text in openings():
        segmenter = Segmenter()
        first = (segmenter.feed(text) + segmenter.flush())[0]
        g2p_s, chunks = timed(lambda first=first: g2p(first), args.repeats)
        tokens = chunks[0].tokens
        request = AcousticRequest(tokens, voices.style(VOICE, len(tokens)), 1.0)
        acoustic_s, (features,) = timed(lambda request=request: engine.acoustic([request]), args.repeats)
        span = segment_span(features)
        end = min(span.start + MIN_WINDOW_FRAMES, features.frames)
        window = Window(
            span.start,
            end,
            max(0, span.start - LEAD_CONTEXT_FRAMES),
            min(features.frames, end + RIGHT_CONTEXT_FRAMES),
            False,
        )
        sliced = window.slice(features)
        vocoder_s, _ = timed(lambda sliced=sliced: engine.vocode([sliced]), args.repeats)
        floor_s = g2p_s + acoustic_s + vocoder_s
        rows.append((g2p_s, acoustic_s, vocoder_s, floor_s))
        print(
            f"{g2p_s * 1e3:7.0f} {acoustic_s * 1e3:9.0f} {vocoder_s * 1e3:7.0f} {floor_s * 1e3:6.0f}"
            f"  {len(first.split()):5d}  {first[:60]}",
            flush=True,
        )
    columns = list(zip(*rows, strict=True))
    names = ("G2P", "acoustic", "smallest first window", "floor (sum)")
    print(f"\np50 over {len(rows)} openings (median of {args.repeats} calls each):")
    for name, values in zip(names, columns, strict=True):
        print(f"  {name:<22} {statistics.median(values) * 1e3:6.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
