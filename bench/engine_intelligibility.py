"""Does Whisper understand the torch engine as well as the ONNX engine? Same sentences, same voice.

Usage: .venv/bin/python bench/engine_intelligibility.py [--sentences 40] [--skip 0]

Renders each held-out sentence (bench/held_out_sentences.txt) whole with both engines (the torch one
on the KModel weights converted from the int8 ONNX graph), transcribes both with Whisper tiny.en and
prints word errors per engine, the sentences where they differ, and the durations each predicted
(int8 activation quantization makes ONNX Runtime's durations differ by a frame on a few tokens).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon import transcribe, word_errors
from held_out import held_out_sentences

from speakd.server.config import default_cache_dir
from speakd.server.engines.kokoro.assets import prepare_embedded_model
from speakd.server.engines.kokoro.engine import SAMPLE_RATE, AcousticRequest
from speakd.server.engines.kokoro.g2p import EnglishG2P
from speakd.server.engines.kokoro.onnx_engine import OnnxEngine
from speakd.server.engines.kokoro.torch_engine import TorchEngine
from speakd.server.engines.kokoro.torch_weights import ONNX_AUDIO_GAIN, load_kmodel
from speakd.server.engines.kokoro.voices import VoiceBank

VOICE = "jf_gongitsune"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip", type=int, default=0)
    parser.add_argument("--sentences", type=int, default=40)
    args = parser.parse_args()
    files = prepare_embedded_model(Path(os.environ.get("SPEAKD_CACHE_DIR") or default_cache_dir()))
    engines = {"onnx": OnnxEngine(files), "torch": TorchEngine(load_kmodel(files, "cpu"))}
    gain = {"onnx": 1.0, "torch": ONNX_AUDIO_GAIN}  # the same level for Whisper
    g2p = EnglishG2P(files.vocab())
    voices = VoiceBank.from_npz(files.voices_npz)
    texts = held_out_sentences()
    texts = texts[args.skip : args.skip + args.sentences]
    errors = dict.fromkeys(engines, 0)
    words = 0
    tokens = same_tokens = 0
    for text in texts:
        chunk = g2p(text)[0]
        request = AcousticRequest(chunk.tokens, voices.style(VOICE, len(chunk.tokens)), 1.0)
        heard: dict[str, tuple[int, str]] = {}
        durations = []
        for name, engine in engines.items():
            features = engine.acoustic([request])[0]
            durations.append(features.durations)
            audio = engine.vocode([features])[0] * gain[name]
            pcm = np.clip(audio * 32767, -32768, 32767).astype(np.int16)
            transcript = transcribe(pcm, SAMPLE_RATE)
            count_errors, count = word_errors(text, transcript)
            heard[name] = (count_errors, transcript)
            errors[name] += count_errors
        words += count
        tokens += len(durations[0])
        same_tokens += int((durations[0] == durations[1]).sum())
        if heard["onnx"][0] != heard["torch"][0]:
            print(f"{text!r}: onnx {heard['onnx']}, torch {heard['torch']}", flush=True)
    print(f"{len(texts)} sentences, {words} words, voice {VOICE}, whole renders")
    for name, count_errors in errors.items():
        print(f"{name:>5}: {count_errors}/{words} word errors = {100 * count_errors / words:.1f} %")
    print(
        f"token durations equal in both engines: {same_tokens}/{tokens} ({100 * same_tokens / tokens:.1f} %)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
