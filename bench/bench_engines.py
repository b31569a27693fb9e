"""The torch engine against the ONNX engine, and torch batched against one at a time, on this machine.

Usage: .venv/bin/python bench/bench_engines.py [--rounds 3] [--threads 0] [--batch 4]

Both engines are loaded in this process from the embedded model (the torch one from the int8 graph
converted to KModel weights). Each round runs every text through each engine in turn (G2P once,
then acoustic and vocoder stages, items one at a time), so machine noise hits both alike. Figures
are seconds of compute per second of audio (real-time factor), per stage, and torch ÷ onnx.

Then the torch engine on `--batch` segments of other contexts (BATCH_TEXTS, similar lengths): one at a
time against all in one call per stage, interleaved round by round. Per-item figures: compute seconds
per second of the items' own audio (padding is paid for, not counted), and batched ÷ one at a time.
glibc's malloc maps tensors over 32 MB afresh on each allocation, so batches also pay page faults;
MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 in the environment avoids them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from speakd.server.config import default_cache_dir
from speakd.server.engines.kokoro.assets import prepare_embedded_model
from speakd.server.engines.kokoro.engine import SAMPLE_RATE, AcousticRequest, Engine
from speakd.server.engines.kokoro.g2p import EnglishG2P
from speakd.server.engines.kokoro.onnx_engine import OnnxEngine
from speakd.server.engines.kokoro.torch_engine import TorchEngine
from speakd.server.engines.kokoro.torch_weights import load_kmodel, prepare_torch_weights
from speakd.server.engines.kokoro.voices import VoiceBank

TEXTS = (
    "Hello there!",
    "The birch canoe slid on the smooth planks.",
    "Rice is often served in round bowls, and the juice of lemons makes fine punch.",
)
VOICE = "jf_gongitsune"
# Segments the pipeline would batch: one sentence each from different contexts, a few seconds long.
BATCH_TEXTS = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "These days a chicken leg is a rare dish.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "Four hours of steady work faced us.",
    "A rod is used to catch pink salmon.",
    "Help the woman get back to her feet.",
)


def run(engine: Engine, requests: list[AcousticRequest]) -> tuple[float, float, float]:
    """(acoustic seconds, vocoder seconds, audio seconds) for the requests, one at a time."""
    acoustic_s = vocoder_s = audio_s = 0.0
    for request in requests:
        started = time.perf_counter()
        (features,) = engine.acoustic([request])
        middle = time.perf_counter()
        (audio,) = engine.vocode([features])
        vocoder_s += time.perf_counter() - middle
        acoustic_s += middle - started
        audio_s += audio.size / SAMPLE_RATE
    return acoustic_s, vocoder_s, audio_s


def run_batch(engine: Engine, requests: list[AcousticRequest]) -> tuple[float, float, float]:
    """(acoustic seconds, vocoder seconds, audio seconds) for the requests as one batch per stage."""
    started = time.perf_counter()
    features = engine.acoustic(requests)
    middle = time.perf_counter()
    audio = engine.vocode(features)
    vocoder_s = time.perf_counter() - middle
    return middle - started, vocoder_s, sum(a.size for a in audio) / SAMPLE_RATE


def table(title: str, columns: tuple[str, str], figures: dict[str, dict[str, list[float]]]) -> None:
    """Median real-time factor per stage for two runs, and their ratio (second ÷ first)."""
    first, second = columns
    ratio = f"{second} / {first}"
    print(title)
    print(f"{'stage':<10}{first:>10}{second:>10}{ratio:>{len(ratio) + 3}}")
    for stage in ("acoustic", "vocoder", "total"):
        a = statistics.median(figures[first][stage])
        b = statistics.median(figures[second][stage])
        print(f"{stage:<10}{a:>10.3f}{b:>10.3f}{b / a:>{len(ratio) + 3}.2f}")


def record(figures: dict[str, list[float]], acoustic_s: float, vocoder_s: float, audio_s: float) -> None:
    figures["acoustic"].append(acoustic_s / audio_s)
    figures["vocoder"].append(vocoder_s / audio_s)
    figures["total"].append((acoustic_s + vocoder_s) / audio_s)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="threads per engine (default: all cores)")
    parser.add_argument("--batch", type=int, default=4, help="torch batch size to compare with 1 (1-8)")
    args = parser.parse_args()
    if not 1 <= args.batch <= len(BATCH_TEXTS):
        parser.error(f"--batch must be from 1 to {len(BATCH_TEXTS)}")

    files = prepare_embedded_model(Path(os.environ.get("SPEAKD_CACHE_DIR") or default_cache_dir()))
    prepare_torch_weights(files)
    voices = VoiceBank.from_npz(files.voices_npz)
    g2p = EnglishG2P(files.vocab())

    def segments(texts: tuple[str, ...]) -> list[AcousticRequest]:
        return [
            AcousticRequest(chunk.tokens, voices.style(VOICE, len(chunk.tokens)), 1.0)
            for text in texts
            for chunk in g2p(text)
        ]

    requests = segments(TEXTS)
    batch = segments(BATCH_TEXTS[: args.batch])
    engines: dict[str, Engine] = {
        "onnx": OnnxEngine(files, args.threads),
        "torch": TorchEngine(load_kmodel(files, "cpu"), "cpu", args.threads),
    }
    for engine in engines.values():
        run(engine, requests[:1])  # warm-up
    one, all_at_once = "batch 1", f"batch {len(batch)}"
    figures: dict[str, dict[str, list[float]]] = {
        name: {"acoustic": [], "vocoder": [], "total": []} for name in (*engines, one, all_at_once)
    }
    for _ in range(args.rounds):
        for name, engine in engines.items():
            record(figures[name], *run(engine, requests))
        record(figures[one], *run(engines["torch"], batch))
        record(figures[all_at_once], *run_batch(engines["torch"], batch))
    print(f"rounds: {args.rounds}, cores: {os.cpu_count()} (real-time factor, median)")
    table(f"engines, {len(TEXTS)} texts one at a time", ("onnx", "torch"), figures)
    print()
    table(f"torch, {len(batch)} segments: one at a time vs one batch (per item)", (one, all_at_once), figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
