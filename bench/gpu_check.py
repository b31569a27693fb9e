"""The batched torch engine on a GPU: per-stage latency, throughput and peak memory by batch size.

Usage: .venv/bin/python bench/gpu_check.py [--device cuda] [--sizes 1,8,64,256] [--rounds 3]
       .venv/bin/python bench/gpu_check.py --device cpu --sizes 1,2 --rounds 1   (smoke run)

Loads KModel with the weights converted from the embedded int8 ONNX model (offline), turns realistic
English sentences into segments (misaki G2P, the voice pack's style row), and for each size runs that
many segments as one acoustic batch and one vocoder batch, as the pipeline would. Latency is the median
over rounds after one warm-up; throughput is seconds of audio per second of both stages together; peak
memory is torch.cuda.max_memory_allocated during the size's rounds (reset per size).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from speakd.server.config import default_cache_dir
from speakd.server.engine import SAMPLE_RATE, AcousticRequest
from speakd.server.g2p import EnglishG2P
from speakd.server.model_assets import prepare_embedded_model
from speakd.server.torch_engine import TorchEngine
from speakd.server.torch_weights import load_kmodel
from speakd.server.voices import VoiceBank

# Harvard sentences: everyday lengths, 1.5 to 3.5 s of speech each.
SENTENCES = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
)
VOICES = ("jf_alpha", "jf_gongitsune", "jm_kumo")


@dataclass(frozen=True)
class Row:
    size: int
    acoustic_s: float
    vocoder_s: float
    audio_s: float
    fill: float  # valid frames / padded frames in the vocoder batch
    peak_bytes: int | None


def segments(cache_dir: Path, count: int) -> list[AcousticRequest]:
    """`count` segments cycling through the sentences and voices."""
    files = prepare_embedded_model(cache_dir)
    g2p, voices = EnglishG2P(files.vocab()), VoiceBank.from_npz(files.voices_npz)
    chunks = [chunk for text in SENTENCES for chunk in g2p(text)]
    pairs = zip(itertools.cycle(chunks), itertools.cycle(VOICES), strict=False)
    return [
        AcousticRequest(chunk.tokens, voices.style(voice, len(chunk.tokens)), 1.0)
        for chunk, voice in itertools.islice(pairs, count)
    ]


def measure(engine: TorchEngine, batch: list[AcousticRequest], rounds: int) -> Row:
    """One warm-up, then `rounds` timed acoustic + vocoder passes over the whole batch."""
    cuda = engine.device.type == "cuda"
    engine.vocode(engine.acoustic(batch))
    if cuda:
        torch.cuda.reset_peak_memory_stats(engine.device)
    acoustic_times, vocoder_times = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        features = engine.acoustic(batch)  # returns numpy: the device work is done
        middle = time.perf_counter()
        engine.vocode(features)
        vocoder_times.append(time.perf_counter() - middle)
        acoustic_times.append(middle - started)
    frames = [f.frames for f in features]
    return Row(
        size=len(batch),
        acoustic_s=statistics.median(acoustic_times),
        vocoder_s=statistics.median(vocoder_times),
        audio_s=sum(frames) * 600 / SAMPLE_RATE,
        fill=sum(frames) / (len(frames) * max(frames)),
        peak_bytes=int(torch.cuda.max_memory_allocated(engine.device)) if cuda else None,
    )


def report(rows: list[Row]) -> None:
    print(
        f"{'segments':>8}{'audio s':>9}{'fill':>6}{'acoustic ms':>13}{'vocoder ms':>12}"
        f"{'audio s/s':>11}{'peak MiB':>10}"
    )
    for row in rows:
        peak = f"{row.peak_bytes / 2**20:.0f}" if row.peak_bytes is not None else "n/a"
        throughput = row.audio_s / (row.acoustic_s + row.vocoder_s)
        print(
            f"{row.size:>8}{row.audio_s:>9.1f}{row.fill:>6.2f}{row.acoustic_s * 1e3:>13.1f}"
            f"{row.vocoder_s * 1e3:>12.1f}{throughput:>11.2f}{peak:>10}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--sizes", default="1,8,64,256", help="comma-separated segment counts")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per size, after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: speakd's)")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    if args.rounds < 1 or min(sizes) < 1:
        parser.error("--rounds and every size must be at least 1")
    cache_dir = args.cache_dir or default_cache_dir()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("PyTorch sees no CUDA device: try --device cpu")
    engine = TorchEngine(
        load_kmodel(prepare_embedded_model(cache_dir), args.device), args.device, args.threads
    )
    requests = segments(cache_dir, max(sizes))
    name = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, rounds: {args.rounds} (median), fp32")
    report([measure(engine, requests[:size], args.rounds) for size in sizes])
    return 0


if __name__ == "__main__":
    sys.exit(main())
