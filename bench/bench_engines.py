"""The torch engine against the ONNX engine on this machine: same texts, same run, as ratios.

Usage: .venv/bin/python bench/bench_engines.py [--rounds 3] [--threads 0]

Both engines are loaded in this process from the embedded model (the torch one from the int8 graph
converted to KModel weights). Each round runs every text through each engine in turn (G2P once,
then acoustic and vocoder stages, items one at a time), so machine noise hits both alike. Figures
are seconds of compute per second of audio (real-time factor), per stage, and torch ÷ onnx.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from speakd.server.config import default_cache_dir
from speakd.server.engine import SAMPLE_RATE, AcousticRequest, Engine
from speakd.server.g2p import EnglishG2P
from speakd.server.model_assets import prepare_embedded_model
from speakd.server.onnx_engine import OnnxEngine
from speakd.server.torch_engine import TorchEngine
from speakd.server.torch_weights import load_kmodel, prepare_torch_weights
from speakd.server.voices import VoiceBank

TEXTS = (
    "Hello there!",
    "The birch canoe slid on the smooth planks.",
    "Rice is often served in round bowls, and the juice of lemons makes fine punch.",
)
VOICE = "jf_gongitsune"


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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="threads per engine (default: all cores)")
    args = parser.parse_args()

    files = prepare_embedded_model(Path(os.environ.get("SPEAKD_CACHE_DIR") or default_cache_dir()))
    prepare_torch_weights(files)
    voices = VoiceBank.from_npz(files.voices_npz)
    g2p = EnglishG2P(files.vocab())
    requests = [
        AcousticRequest(chunk.tokens, voices.style(VOICE, len(chunk.tokens)), 1.0)
        for text in TEXTS
        for chunk in g2p(text)
    ]
    engines: dict[str, Engine] = {
        "onnx": OnnxEngine(files, args.threads),
        "torch": TorchEngine(load_kmodel(files, "cpu"), "cpu", args.threads),
    }
    for engine in engines.values():
        run(engine, requests[:1])  # warm-up
    figures: dict[str, dict[str, list[float]]] = {
        name: {"acoustic": [], "vocoder": [], "total": []} for name in engines
    }
    for _ in range(args.rounds):
        for name, engine in engines.items():
            acoustic_s, vocoder_s, audio_s = run(engine, requests)
            figures[name]["acoustic"].append(acoustic_s / audio_s)
            figures[name]["vocoder"].append(vocoder_s / audio_s)
            figures[name]["total"].append((acoustic_s + vocoder_s) / audio_s)
    print(f"rounds: {args.rounds}, cores: {os.cpu_count()}, texts: {len(TEXTS)} (real-time factor, median)")
    print(f"{'stage':<10}{'onnx':>10}{'torch':>10}{'torch/onnx':>12}")
    for stage in ("acoustic", "vocoder", "total"):
        onnx = statistics.median(figures["onnx"][stage])
        torch = statistics.median(figures["torch"][stage])
        print(f"{stage:<10}{onnx:>10.3f}{torch:>10.3f}{torch / onnx:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
