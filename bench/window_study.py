"""How much context the first vocoder window needs: fidelity and intelligibility against render cost.

Usage: .venv/bin/python bench/window_study.py [--configs 8:12,4:8] [--sentences 60] [--no-whisper]

A segment for a waiting listener is vocoded in windows (server/engines/kokoro/windows.py) so its first
audio leaves early; every frame of context the first window renders delays that audio by ~7.5 ms on this CPU.
For each configuration LEAD:RIGHT (frames of context rendered before and after the first window)
this renders the first window with that context, stitches it to the later windows as the daemon
does, and compares the result with one whole render of the segment:
- log-mel distance in dB over the whole emitted audio, over the first window only, and around the
  seam (mean absolute difference of 80-band log-mel spectra, 25 ms frames; 0 = identical);
- Whisper tiny.en word errors of the stitched audio (the reference is the text);
- frames the first window renders (its cost).
Deterministic apart from Whisper; the same sentences are used for every configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon import transcribe, word_errors
from held_out import held_out_sentences

from speakd.server.config import default_cache_dir
from speakd.server.engines.kokoro.assets import prepare_embedded_model
from speakd.server.engines.kokoro.engine import (
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    AcousticFeatures,
    AcousticRequest,
)
from speakd.server.engines.kokoro.g2p import EnglishG2P
from speakd.server.engines.kokoro.onnx_engine import OnnxEngine
from speakd.server.engines.kokoro.vocoder_speed import VocoderCost
from speakd.server.engines.kokoro.voices import VoiceBank
from speakd.server.engines.kokoro.windows import CONTEXT_FRAMES, Stitcher, Window, plan_windows

VOICE = "jf_gongitsune"
# What the pipeline learns on this CPU (2 cores); fixes the seams for every configuration.
VOCODER = VocoderCost(fixed_s=0.025, per_frame_s=0.0075)
SEAM_FRAMES = 4  # frames each side of the seam scored as "seam"
FLOOR_DB = 60.0

F32 = npt.NDArray[np.float32]


def mel_matrix(n_fft: int = 1024, bands: int = 80) -> F32:
    """A triangular mel filterbank [bands, n_fft // 2 + 1] for 24 kHz audio."""
    hz = np.linspace(0, SAMPLE_RATE / 2, n_fft // 2 + 1)
    mel = 2595 * np.log10(1 + hz / 700)
    edges = np.linspace(0, mel[-1], bands + 2)
    bank = np.zeros((bands, hz.size), np.float32)
    for b in range(bands):
        lo, mid, hi = edges[b : b + 3]
        bank[b] = np.clip(np.minimum((mel - lo) / (mid - lo), (hi - mel) / (hi - mid)), 0, None)
    return bank


MEL = mel_matrix()


def log_mel(audio: F32) -> F32:
    """80-band log-mel (dB) per 25 ms frame (one acoustic frame), Hann window of 1024 samples."""
    frames = len(audio) // SAMPLES_PER_FRAME
    padded = np.pad(audio, (512, 512))
    window = np.hanning(1024).astype(np.float32)
    spectra = np.stack(
        [
            np.abs(np.fft.rfft(padded[i * SAMPLES_PER_FRAME : i * SAMPLES_PER_FRAME + 1024] * window))
            for i in range(frames)
        ]
    )
    return (10 * np.log10(MEL @ spectra.T**2 + 1e-8)).T.astype(np.float32)


@dataclasses.dataclass
class Scores:
    frames_rendered: list[int] = dataclasses.field(default_factory=list)
    whole_db: list[float] = dataclasses.field(default_factory=list)
    first_db: list[float] = dataclasses.field(default_factory=list)
    seam_db: list[float] = dataclasses.field(default_factory=list)
    errors: int = 0
    words: int = 0


def render(engine: OnnxEngine, features: AcousticFeatures, windows: list[Window]) -> F32:
    stitcher = Stitcher()
    parts = [stitcher.add(w, engine.vocode([w.slice(features)])[0]) for w in windows]
    return np.concatenate(parts)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="0:12,4:12,8:12,8:8,4:8,8:6", help="LEAD:RIGHT,... frames")
    parser.add_argument("--skip", type=int, default=0, help="start at this sentence of the file")
    parser.add_argument("--sentences", type=int, default=1000, help="at most this many sentences")
    parser.add_argument("--no-whisper", action="store_true", help="spectral distances only")
    args = parser.parse_args()
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]

    files = prepare_embedded_model(Path(os.environ.get("SPEAKD_CACHE_DIR") or default_cache_dir()))
    engine = OnnxEngine(files)
    g2p = EnglishG2P(files.vocab())
    voices = VoiceBank.from_npz(files.voices_npz)
    scores = {config: Scores() for config in configs}
    whole_scores = Scores()
    sentences = held_out_sentences()
    texts = sentences[args.skip : args.skip + args.sentences]
    for text in texts:
        chunk = g2p(text)[0]
        request = AcousticRequest(chunk.tokens, voices.style(VOICE, len(chunk.tokens)), 1.0)
        features = engine.acoustic([request])[0]
        planned = plan_windows(features, slack_s=0.0, vocoder=VOCODER)
        if len(planned) < 2:
            print(f"skipped (one window): {text}", flush=True)
            continue
        first, second, last = planned[0], planned[1], planned[-1]
        start = first.start
        single = Window(start, last.end, max(0, start - CONTEXT_FRAMES), last.end, True, last.pad_frames)
        reference = render(engine, features, [single])
        ref_mel = log_mel(reference)
        seam = first.end - start
        seam_rows = slice(seam - SEAM_FRAMES, seam + SEAM_FRAMES)
        if not args.no_whisper:
            errors, count = word_errors(text, transcribe(pcm16(reference), SAMPLE_RATE))
            whole_scores.errors += errors
            whole_scores.words += count
        for config in configs:
            lead, right = config
            w1 = dataclasses.replace(
                first, render_start=max(0, start - lead), render_end=min(second.end, first.end + right)
            )
            audio = render(engine, features, [w1, *planned[1:]])
            assert audio.shape == reference.shape
            # Floored 60 dB under the reference's peak: differences in near-silence are inaudible.
            floor = float(ref_mel.max()) - FLOOR_DB
            diff = np.abs(np.maximum(log_mel(audio), floor) - np.maximum(ref_mel, floor)).mean(axis=1)
            s = scores[config]
            s.frames_rendered.append(w1.render_end - w1.render_start)
            s.whole_db.append(float(diff.mean()))
            s.first_db.append(float(diff[:seam].mean()))
            s.seam_db.append(float(diff[seam_rows].mean()))
            if not args.no_whisper:
                errors, count = word_errors(text, transcribe(pcm16(audio), SAMPLE_RATE))
                s.errors += errors
                s.words += count

    print(f"{len(scores[configs[0]].whole_db)} sentences, voice {VOICE}, ONNX engine")
    print("lead:right  w1 frames  dB whole  dB first  dB seam  word errors")
    if whole_scores.words:
        print(f"whole        {'':9}  {'0':>8}  {'0':>8}  {'0':>7}  {wer(whole_scores)}")
    for config, s in scores.items():
        print(
            f"{config[0]:>4}:{config[1]:<6}  {np.mean(s.frames_rendered):9.1f}  {np.mean(s.whole_db):8.3f}"
            f"  {np.mean(s.first_db):8.3f}  {np.mean(s.seam_db):7.3f}  {wer(s) if s.words else 'n/a'}"
        )
    return 0


def pcm16(audio: F32) -> npt.NDArray[np.int16]:
    return np.asarray(np.clip(audio * 32767, -32768, 32767), dtype=np.int16)


def wer(s: Scores) -> str:
    return f"{s.errors}/{s.words} = {100 * s.errors / s.words:.1f} %"


if __name__ == "__main__":
    sys.exit(main())
