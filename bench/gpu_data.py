"""Writes bench/gpu_sentences.json: what bench/gpu_check.py needs to know of the real model, as data.

The GPU machine has no G2P (misaki pulls spaCy) and cannot take the weights (over the 64 MiB carry
limit), so gpu_check runs random weights of Kokoro-82M's shapes on fixed token sequences. This script
makes both realistic, here, with the full environment:
- the phoneme token ids of bench/held_out_sentences.txt (assistant openers and Harvard sentences), as
  misaki gives them with the embedded model's vocabulary;
- the real weights' statistics on those sentences, which gpu_check calibrates its random weights to:
  frames per token (durations), F0 and energy (mean, spread, voiced share), and the style vectors.

Usage: .venv/bin/python bench/gpu_data.py [--out bench/gpu_sentences.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from held_out import held_out_sentences

from speakd.server.config import default_cache_dir
from speakd.server.engines.kokoro.assets import prepare_embedded_model
from speakd.server.engines.kokoro.engine import AcousticRequest
from speakd.server.engines.kokoro.g2p import EnglishG2P
from speakd.server.engines.kokoro.torch_engine import TorchEngine
from speakd.server.engines.kokoro.torch_weights import load_kmodel
from speakd.server.engines.kokoro.voices import VoiceBank

HERE = Path(__file__).resolve().parent
VOICE = "jf_gongitsune"  # the daemon's default voice
VOICED_HZ = 10.0  # SineGen's voiced threshold


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=HERE / "gpu_sentences.json")
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: speakd's)")
    args = parser.parse_args()
    files = prepare_embedded_model(args.cache_dir or default_cache_dir())
    g2p, voices = EnglishG2P(files.vocab()), VoiceBank.from_npz(files.voices_npz)
    sentences = held_out_sentences()
    segments = [(text, list(chunk.tokens)) for text in sentences for chunk in g2p(text)]

    engine = TorchEngine(load_kmodel(files, "cpu"), "cpu")
    requests = [AcousticRequest(tokens, voices.style(VOICE, len(tokens)), 1.0) for _, tokens in segments]
    features = [f for request in requests for f in engine.acoustic([request])]
    tokens = sum(len(t) + 2 for _, t in segments)
    frames = sum(f.frames for f in features)
    f0 = np.concatenate([f.f0[0] for f in features])
    energy = np.concatenate([f.energy[0] for f in features])
    voiced = f0[f0 > VOICED_HZ]
    styles = np.concatenate([r.style for r in requests])
    data = {
        "about": "bench/gpu_data.py: misaki token ids of bench/held_out_sentences.txt, and the embedded "
        f"model's statistics on them (torch engine, fp32, voice {VOICE}, speed 1)",
        "n_token": 178,
        "segments": [{"text": text, "tokens": t} for text, t in segments],
        "real": {
            "frames_per_token": frames / tokens,  # BOS/EOS included, as the durations count them
            "f0_voiced_mean": float(voiced.mean()),
            "f0_voiced_std": float(voiced.std()),
            "voiced_share": float(len(voiced) / len(f0)),
            "energy_mean": float(energy.mean()),
            "energy_std": float(energy.std()),
            "style_mean": float(styles.mean()),
            "style_std": float(styles.std()),
        },
    }
    args.out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    real = data["real"]
    assert isinstance(real, dict)
    print(f"{len(segments)} segments, {tokens} tokens, {frames} frames -> {args.out}")
    print(", ".join(f"{key} {value:.3f}" for key, value in real.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
