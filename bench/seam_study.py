"""What a seam costs, with and without the seam carry: Whisper word errors and log-mel distance of
segments vocoded in windows, against the same segments rendered whole.

Usage: .venv/bin/python bench/seam_study.py [--max-windows 2,4,6] [--sentences 40] [--skip 0]

Each held-out sentence is planned as the vocoder stage plans it for a listener waiting for its first
audio (slack 0) at this CPU's usual vocoder cost, with at most M windows, and rendered three ways:
- whole: one render, as a listener with audio in hand gets it;
- carried: windows that share the seam carry (server/engines/kokoro/seams.py), as the daemon renders;
- plain: the same windows, each rendered on its own (harmonics from phase 0, its own norm statistics),
  as the daemon did before the carry.
Carried windows are rendered before the whole render, with one engine for the whole study, so that
the norm prior holds what it would in the daemon (warm-up and earlier whole renders), never the
sentence itself. Deterministic apart from Whisper.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon import transcribe, word_errors
from held_out import held_out_sentences
from window_study import FLOOR_DB, VOCODER, log_mel, pcm16

from speakd.server.config import default_cache_dir
from speakd.server.engines.kokoro import windows
from speakd.server.engines.kokoro.assets import prepare_embedded_model
from speakd.server.engines.kokoro.engine import SAMPLE_RATE, AcousticFeatures, AcousticRequest
from speakd.server.engines.kokoro.g2p import EnglishG2P
from speakd.server.engines.kokoro.onnx_engine import OnnxEngine
from speakd.server.engines.kokoro.seams import SeamCarry
from speakd.server.engines.kokoro.speech import WARM_UP_TEXT
from speakd.server.engines.kokoro.voices import VoiceBank
from speakd.server.engines.kokoro.windows import CONTEXT_FRAMES, Stitcher, Window, plan_windows

VOICE = "jf_gongitsune"
SEAM_FRAMES = 4  # frames each side of a seam scored as "seam"

F32 = npt.NDArray[np.float32]


def render(engine: OnnxEngine, features: AcousticFeatures, planned: list[Window], *, carry: bool) -> F32:
    """The windows joined as the vocoder stage joins them; `carry` False renders each on its own."""
    stitcher, seam = Stitcher(), SeamCarry()
    parts = []
    for w in planned:
        sliced = w.slice(features, seam) if carry else _alone(w.slice(features))
        parts.append(stitcher.add(w, engine.vocode([sliced])[0]))
    return np.concatenate(parts)


def _alone(features: AcousticFeatures) -> AcousticFeatures:
    """A window as the daemon rendered it before the carry: harmonics from 0, its own statistics."""
    return AcousticFeatures(features.asr, features.f0, features.energy, features.style, features.durations)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-windows", default="2,4,6", help="MAX_WINDOWS values, comma-separated")
    parser.add_argument("--skip", type=int, default=0, help="start at this sentence of the file")
    parser.add_argument("--sentences", type=int, default=40, help="at most this many sentences")
    args = parser.parse_args()
    caps = [int(x) for x in args.max_windows.split(",")]

    files = prepare_embedded_model(Path(os.environ.get("SPEAKD_CACHE_DIR") or default_cache_dir()))
    engine, plain_engine = OnnxEngine(files), OnnxEngine(files)  # the plain one never teaches the prior
    g2p = EnglishG2P(files.vocab())
    voices = VoiceBank.from_npz(files.voices_npz)

    def features_of(text: str) -> AcousticFeatures:
        chunk = g2p(text)[0]
        request = AcousticRequest(chunk.tokens, voices.style(VOICE, len(chunk.tokens)), 1.0)
        return engine.acoustic([request])[0]

    engine.vocode([features_of(WARM_UP_TEXT)])  # as the daemon's warm-up: the first prior
    names = ["whole", *(f"{kind} <={cap}" for cap in caps for kind in ("plain", "carried"))]
    errors = dict.fromkeys(names, 0)
    distances: dict[str, list[float]] = {name: [] for name in names[1:]}
    seam_distances: dict[str, list[float]] = {name: [] for name in names[1:]}
    window_counts: dict[int, list[int]] = {cap: [] for cap in caps}
    words = 0
    for text in held_out_sentences()[args.skip : args.skip + args.sentences]:
        features = features_of(text)
        audio: dict[str, F32] = {}
        seams: dict[int, list[int]] = {}
        for cap in caps:
            windows.MAX_WINDOWS = cap
            planned = plan_windows(features, slack_s=0.0, vocoder=VOCODER)
            window_counts[cap].append(len(planned))
            seams[cap] = [w.end - planned[0].start for w in planned[:-1]]
            audio[f"carried <={cap}"] = render(engine, features, planned, carry=True)
            audio[f"plain <={cap}"] = render(plain_engine, features, planned, carry=False)
        first, last = planned[0], planned[-1]
        whole = Window(
            first.start, last.end, max(0, first.start - CONTEXT_FRAMES), last.end, True, last.pad_frames
        )
        audio["whole"] = render(engine, features, [whole], carry=False)
        reference = log_mel(audio["whole"])
        floor = float(reference.max()) - FLOOR_DB
        for name in names:
            wrong, count = word_errors(text, transcribe(pcm16(audio[name]), SAMPLE_RATE))
            errors[name] += wrong
            if name == "whole":
                words += count
                continue
            assert audio[name].shape == audio["whole"].shape
            diff = np.abs(np.maximum(log_mel(audio[name]), floor) - np.maximum(reference, floor)).mean(axis=1)
            distances[name].append(float(diff.mean()))
            cap = int(name.rsplit("=", 1)[1])
            rows = [diff[max(0, s - SEAM_FRAMES) : s + SEAM_FRAMES].mean() for s in seams[cap]]
            if rows:
                seam_distances[name].append(float(np.mean(rows)))
        print(f"{words} words: " + ", ".join(f"{n} {e}" for n, e in errors.items()), flush=True)

    count = len(window_counts[caps[0]])
    print(f"\n{count} held-out sentences ({words} words), voice {VOICE}, ONNX engine, planned for a waiting")
    print(f"listener at {VOCODER.fixed_s * 1000:.0f} ms + {VOCODER.per_frame_s * 1000:.1f} ms a frame")
    print("render        windows  dB whole  dB seam  word errors")
    print(f"whole         {1.0:7.1f}  {0:8.3f}  {0:7.3f}  {wer(errors['whole'], words)}")
    for name in names[1:]:
        cap = int(name.rsplit("=", 1)[1])
        print(
            f"{name:<12}  {np.mean(window_counts[cap]):7.1f}  {np.mean(distances[name]):8.3f}"
            f"  {np.mean(seam_distances[name] or [0.0]):7.3f}  {wer(errors[name], words)}"
        )
    return 0


def wer(errors: int, words: int) -> str:
    return f"{errors}/{words} = {100 * errors / max(1, words):.1f} %"


if __name__ == "__main__":
    sys.exit(main())
