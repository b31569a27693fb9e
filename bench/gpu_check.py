"""The batched torch engine on a GPU, in one command on a bare machine: oracle, sizes, overlap, autocast,
compile.

Usage (on the GPU machine, see bench/GPU.md):   bash bench/gpu_run.sh
       (here, in CPU mode):   .venv/bin/python bench/gpu_check.py --device cpu --quick

The GPU machine has PyTorch, numpy and transformers but none of speakd's other dependencies, and takes
at most 64 MiB of files. So this script needs only torch and the carry set (bench/gpu_carry.py: speakd,
kokoro's model modules, loguru; `--site DIR` appends their directory to sys.path, so the machine's own
packages win). It runs random weights of Kokoro-82M's real shapes (seeded), calibrated to the real
weights' statistics so that segments have realistic lengths and pitch: the duration projection's bias
is shifted until segments get the real model's frames per token (raw random weights give ~25, eight
times too many), and F0 and energy are rescaled to the real curves' mean and spread. Token sequences
are real sentences (bench/gpu_sentences.json, made by bench/gpu_data.py).

Sections, each printed and appended to OUT/gpu_check.jsonl as it finishes (one JSON object a line;
"sizes" also after each row), each guarded against out-of-memory errors and its share of --budget-s:
1. smoke: one segment through both stages; calibration figures;
2. oracle: batches of mixed lengths, voices and speeds against KModel's own batch-1 forward
   (speakd.server.engines.kokoro.torch_oracle), with TF32 off and then on;
3. sizes: per-stage latency, audio seconds per second and peak memory at each batch size;
4. overlap: the acoustic and the vocoder stage in two threads at once (each its own CUDA stream);
5. autocast: the vocoder under bf16 and fp16 autocast, its error against fp32 and its speed;
6. compile (CUDA only): the vocoder through torch.compile, without and with CUDA graphs, against eager.
Exit status 0 when every section ends "ok", "oom" or "timeout" (limits of the machine), else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SEED = 1234
VOICES = 3  # random style vectors standing in for voices
MIB = 2**20


class SectionTimeout(Exception):
    """A section ran out of its share of the time budget."""


def is_oom(exc: BaseException) -> bool:
    """The device's memory ran out: PyTorch's own error, or a library's allocation failure (cuDNN,
    cuBLAS and cuFFT raise plain RuntimeErrors)."""
    text = str(exc)
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text or "ALLOC_FAILED" in text


class Report:
    """Prints figures and appends them to OUT/gpu_check.jsonl as they come, so a crash keeps them."""

    def __init__(self, out: Path | None) -> None:
        self.path = None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            self.path = out / "gpu_check.jsonl"
            self.path.write_text("", encoding="utf-8")
        self.statuses: dict[str, str] = {}

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as file:
                file.write(json.dumps(record, default=float) + "\n")

    @contextlib.contextmanager
    def section(self, name: str, budget_s: float, torch: Any) -> Iterator[dict[str, Any]]:
        """Runs one section: its figures go in the yielded dict; its status is ok, oom (the device's
        memory), timeout (its budget), skipped (no budget left) or failed (anything else)."""
        record: dict[str, Any] = {"section": name}
        started = time.perf_counter()
        print(f"\n== {name} (budget {budget_s:.0f} s)", flush=True)
        status = "ok"
        try:
            yield record
        except SectionTimeout as exc:
            status, record["error"] = "timeout", str(exc)
        except Exception as exc:
            status = "oom" if is_oom(exc) else "failed"
            record["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
        self.end(name, record, status, started)

    def skip(self, name: str) -> None:
        """A section left no time by those before it."""
        print(f"\n== {name}: skipped, no time left", flush=True)
        self.end(name, {"section": name}, "skipped", time.perf_counter())

    def end(self, name: str, record: dict[str, Any], status: str, started: float) -> None:
        if status == "ok" and record.get("oom"):
            status = "oom"
        record["status"] = status
        record["seconds"] = round(time.perf_counter() - started, 2)
        self.statuses[name] = status
        self.write(record)
        shown = {k: v for k, v in record.items() if k not in ("rows", "section")}
        print(f"-- {name}: {json.dumps(shown, default=float)}", flush=True)


class Budget:
    """The whole run's time, shared out among sections: a section may use its share of what is left."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def share(self, fraction: float) -> float:
        return max(0.0, (self.end - time.perf_counter()) * fraction)

    @staticmethod
    def deadline(seconds: float) -> Callable[[str], None]:
        """A check to call between steps: raises SectionTimeout once `seconds` have passed."""
        end = time.perf_counter() + seconds

        def check(step: str) -> None:
            if time.perf_counter() > end:
                raise SectionTimeout(f"out of time before {step}")

        return check


class Bench:
    """The random-weight KModel, its engines, and the calibrated segments."""

    def __init__(self, args: argparse.Namespace) -> None:
        import numpy as np
        import torch

        from speakd.server.engines.kokoro.model_config import kokoro_config
        from speakd.server.engines.kokoro.torch_engine import TorchEngine
        from speakd.server.engines.kokoro.torch_weights import _bare_kmodel

        self.np, self.torch = np, torch
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.data = json.loads((HERE / "gpu_sentences.json").read_text(encoding="utf-8"))
        if args.quick:  # the CPU test: the shortest sentences first
            self.data["segments"].sort(key=lambda segment: len(segment["tokens"]))
        torch.manual_seed(SEED)
        self.kmodel = _bare_kmodel(kokoro_config({}))  # KModel reads the vocabulary only for text input
        self.engine = TorchEngine(self.kmodel, args.device, args.threads)  # prepares and moves kmodel
        generator = torch.Generator().manual_seed(SEED)
        real = self.data["real"]
        self.styles = [
            (torch.randn(1, 256, generator=generator) * real["style_std"] + real["style_mean"]).numpy()
            for _ in range(VOICES)
        ]

    def requests(self, count: int, speeds: tuple[float, ...] = (1.0,), offset: int = 0) -> list[Any]:
        """`count` segments cycling through the sentences, the voices and `speeds`."""
        from speakd.server.engines.kokoro.engine import AcousticRequest

        segments = self.data["segments"]
        return [
            AcousticRequest(
                segments[(offset + i) % len(segments)]["tokens"],
                self.styles[(offset + i) % VOICES],
                speeds[i % len(speeds)],
            )
            for i in range(count)
        ]

    def calibrate(self, sample: int) -> dict[str, float]:
        """Shift the duration projection's bias to the real frames per token, then rescale the F0 and
        energy projections to the real curves' mean and spread (in that order: the curves' lengths
        follow the durations)."""
        torch = self.torch
        real = self.data["real"]
        predictor = self.kmodel.predictor
        batch = self.requests(sample)
        logits: list[Any] = []
        hook = predictor.duration_proj.register_forward_hook(lambda _m, _i, out: logits.append(out))
        try:
            self.engine.acoustic(batch)
        finally:
            hook.remove()
        lengths = torch.tensor([len(r.tokens) + 2 for r in batch], device=logits[0].device)
        valid = torch.arange(logits[0].shape[1], device=lengths.device)[None, :] < lengths[:, None]

        def frames_per_token(shift: float) -> float:
            frames = torch.round(torch.sigmoid(logits[0] + shift).sum(dim=-1)).clamp(min=1)
            return float((frames * valid).sum() / valid.sum())

        low, high = -30.0, 10.0
        for _ in range(40):  # frames per token grows with the shift
            middle = (low + high) / 2
            low, high = (
                (middle, high) if frames_per_token(middle) < real["frames_per_token"] else (low, middle)
            )
        shift = (low + high) / 2
        with torch.no_grad():
            predictor.duration_proj.linear_layer.bias += shift
        self.synchronize()  # edited on this thread's stream; the engine reads on its own
        features = self.engine.acoustic(batch)
        f0_all = real["voiced_share"] * real["f0_voiced_mean"]
        f0_square = real["voiced_share"] * (real["f0_voiced_std"] ** 2 + real["f0_voiced_mean"] ** 2)
        targets = {
            "F0_proj": ([f.f0[0] for f in features], f0_all, math.sqrt(f0_square - f0_all**2)),
            "N_proj": ([f.energy[0] for f in features], real["energy_mean"], real["energy_std"]),
        }
        for name, (curves, mean, std) in targets.items():
            projection = getattr(predictor, name)
            raw = self.np.concatenate(curves) - float(projection.bias.detach())  # the projection's w·h
            scale = std / max(float(raw.std()), 1e-12)
            with torch.no_grad():
                projection.weight *= scale
                projection.bias.fill_(mean - scale * float(raw.mean()))
        self.synchronize()
        features = self.engine.acoustic(batch)
        f0 = self.np.concatenate([f.f0[0] for f in features])
        tokens = sum(len(r.tokens) + 2 for r in batch)
        return {
            "duration_bias_shift": shift,
            "frames_per_token": sum(f.frames for f in features) / tokens,
            "frames_per_token_real": real["frames_per_token"],
            "f0_mean": float(f0.mean()),
            "voiced_share": float((f0 > 10).mean()),
            "voiced_share_real": real["voiced_share"],
        }

    def synchronize(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def peak_reset(self) -> None:
        if self.cuda:
            self.synchronize()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated(self.device) / MIB if self.cuda else None


def tf32_flags(torch: Any) -> tuple[bool, bool]:
    """(matmul, cuDNN) TF32: PyTorch's defaults are off and on, which is what the daemon runs with."""
    return bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)


def set_tf32(torch: Any, flags: tuple[bool, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def smoke(bench: Bench, record: dict[str, Any]) -> None:
    record.update(bench.calibrate(16 if not bench.args.quick else 4))
    (request,) = bench.requests(1)
    started = time.perf_counter()
    (features,) = bench.engine.acoustic([request])
    (audio,) = bench.engine.vocode([features])
    record["first_call_s"] = time.perf_counter() - started
    record["frames"] = features.frames
    record["audio_s"] = len(audio) / 24000
    record["finite"] = bool(bench.np.isfinite(audio).all())
    record["peak_abs"] = float(bench.np.abs(audio).max())
    if not record["finite"] or len(audio) != 600 * features.frames:
        raise RuntimeError("the smoke run's audio is not finite or not 600 samples per frame")


def oracle(bench: Bench, record: dict[str, Any], check: Callable[[str], None]) -> None:
    from speakd.server.engines.kokoro.torch_oracle import run_oracle

    torch = bench.torch
    mixes = {
        "one item": bench.requests(1),
        "short and long": [
            bench.requests(1, offset=3)[0],
            max(bench.requests(12 if bench.args.quick else 120), key=lambda r: len(r.tokens)),
        ],
        "voices and speeds": bench.requests(3 if bench.args.quick else 8, speeds=(1.0, 1.2, 0.8), offset=7),
    }
    record["passed"] = False  # the fp32 tolerances, judged on the TF32-off run; TF32's are reported
    settings = (("tf32_off", False), ("tf32_on", True)) if bench.cuda else (("tf32_off", False),)
    defaults = tf32_flags(torch)
    try:
        for label, enabled in settings:  # TF32 is a CUDA setting: on a CPU one run says it all
            set_tf32(torch, (enabled, enabled))
            cache: dict[Any, Any] = {}  # references too: TF32 changes KModel's own results
            record[label] = reports = {}  # filled as it goes: a timeout keeps what was done
            for name, requests in mixes.items():
                check(f"{label} {name}")
                run = run_oracle(bench.engine, bench.kmodel, requests, cache)
                reports[name] = run.report(bench.kmodel).as_dict()
            worst = {key: max(r[key] for r in reports.values()) for key in ("feature_error", "audio_error")}
            print(
                f"   {label}: {json.dumps(worst)}; all passed: {all(r['passed'] for r in reports.values())}"
            )
            if not enabled:
                record["passed"] = all(r["passed"] for r in reports.values())
    finally:
        set_tf32(torch, defaults)


def time_stages(bench: Bench, batch: list[Any], rounds: int) -> tuple[list[float], list[float], list[Any]]:
    acoustic_times, vocoder_times = [], []
    features: list[Any] = []
    for _ in range(rounds):
        started = time.perf_counter()
        features = bench.engine.acoustic(batch)  # numpy out: the device work is done
        middle = time.perf_counter()
        bench.engine.vocode(features)
        vocoder_times.append(time.perf_counter() - middle)
        acoustic_times.append(middle - started)
    return acoustic_times, vocoder_times, features


def sizes(bench: Bench, record: dict[str, Any], report: Report, check: Callable[[str], None]) -> None:
    record["sizes"] = bench.args.sizes
    record["rows"] = rows = []
    requests = bench.requests(max(bench.args.sizes))
    columns = ("segments", 8), ("audio s", 9), ("fill", 6), ("acoustic ms", 13), ("vocoder ms", 12)
    print("".join(f"{name:>{width}}" for name, width in (*columns, ("audio s/s", 11), ("peak MiB", 10))))
    for size in bench.args.sizes:
        check(f"size {size}")
        batch = requests[:size]
        try:
            bench.engine.vocode(bench.engine.acoustic(batch))  # warm-up: allocator, kernel choices
            bench.peak_reset()
            acoustic_times, vocoder_times, features = time_stages(bench, batch, bench.args.rounds)
        except Exception as exc:
            if not is_oom(exc):
                raise
            rows.append({"size": size, "oom": str(exc).splitlines()[0]})
            record["oom"] = f"at {size} segments"
            print(f"{size:>8}  out of memory")
            break
        frames = [f.frames for f in features]
        acoustic_s, vocoder_s = statistics.median(acoustic_times), statistics.median(vocoder_times)
        row = {
            "size": size,
            "audio_s": sum(frames) * 600 / 24000,
            "fill": sum(frames) / (len(frames) * max(frames)),  # valid / padded frames
            "acoustic_ms": acoustic_s * 1e3,
            "vocoder_ms": vocoder_s * 1e3,
            "audio_s_per_s": sum(frames) * 600 / 24000 / (acoustic_s + vocoder_s),
            "vocoder_audio_s_per_s": sum(frames) * 600 / 24000 / vocoder_s,
            "peak_mib": bench.peak_mib(),
        }
        rows.append(row)
        peak = f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None else "n/a"
        print(
            f"{size:>8}{row['audio_s']:>9.1f}{row['fill']:>6.2f}{row['acoustic_ms']:>13.1f}"
            f"{row['vocoder_ms']:>12.1f}{row['audio_s_per_s']:>11.1f}{peak:>10}",
            flush=True,
        )
        report.write({"section": "sizes", "status": "running", "rows": rows})


def overlap(bench: Bench, record: dict[str, Any], check: Callable[[str], None]) -> None:
    """The pipeline's shape: one thread runs acoustic batches while another vocodes, each on its own
    stream, both threads warmed up first (as the daemon's stage threads are). overlap = (acoustic
    alone + vocoder alone) / both at once: 1 is none, 2 is perfect."""
    from concurrent.futures import ThreadPoolExecutor

    size = bench.args.overlap_size
    repeats = 1 if bench.args.quick else 5
    first, second = bench.requests(size), bench.requests(size, offset=size)
    with (
        ThreadPoolExecutor(1, thread_name_prefix="acoustic") as acoustic,
        ThreadPoolExecutor(1, thread_name_prefix="vocoder") as vocoder,
    ):
        features = acoustic.submit(bench.engine.acoustic, second).result()
        vocoder.submit(bench.engine.vocode, features).result()  # warm-ups, each on its own thread

        def acoustic_work() -> None:
            for _ in range(repeats):
                bench.engine.acoustic(first)

        def vocoder_work() -> None:
            for _ in range(repeats):
                bench.engine.vocode(features)

        check("solo runs")
        acoustic_s = _timed(lambda: acoustic.submit(acoustic_work).result())
        vocoder_s = _timed(lambda: vocoder.submit(vocoder_work).result())
        check("the overlapped run")
        started = time.perf_counter()
        for future in [acoustic.submit(acoustic_work), vocoder.submit(vocoder_work)]:
            future.result()
        both_s = time.perf_counter() - started
    record.update(
        size=size,
        repeats=repeats,
        acoustic_alone_s=acoustic_s,
        vocoder_alone_s=vocoder_s,
        both_s=both_s,
        overlap=(acoustic_s + vocoder_s) / both_s,
    )


def autocast(bench: Bench, record: dict[str, Any], report: Report, check: Callable[[str], None]) -> None:
    """The vocoder under autocast against fp32 on the same features (fixed randomness): error, both on
    short windows here and through the oracle (against KModel's fp32 forward), and speed."""
    from speakd.server.engines.kokoro.engine import AcousticFeatures
    from speakd.server.engines.kokoro.torch_engine import TorchEngine
    from speakd.server.engines.kokoro.torch_oracle import fixed_randomness, run_oracle

    np = bench.np
    dtypes = ("bf16",) if not bench.cuda else ("bf16", "fp16")
    size = bench.args.autocast_size
    features = bench.engine.acoustic(bench.requests(size, offset=11))
    if bench.args.quick:  # bf16 convolutions crawl on a CPU without bf16 units: 8-frame windows
        features = [
            AcousticFeatures(f.asr[..., :8], f.f0[..., :16], f.energy[..., :16], f.style, f.durations)
            for f in features
        ]
    with fixed_randomness():
        expected = bench.engine.vocode(features)
    one = features[:1]  # batch 1 too: autocast re-casts every weight on each call, which a batch hides
    fp32_s = min(_timed(lambda: bench.engine.vocode(features)) for _ in range(bench.args.rounds))
    fp32_one_s = min(_timed(lambda: bench.engine.vocode(one)) for _ in range(bench.args.rounds))
    record["size"], record["fp32_vocoder_ms"], record["fp32_vocoder_one_ms"] = (
        size,
        fp32_s * 1e3,
        fp32_one_s * 1e3,
    )
    for dtype in dtypes:
        check(dtype)
        engine = TorchEngine(bench.kmodel, bench.args.device, bench.args.threads, precision=dtype)
        try:
            with fixed_randomness():
                got = engine.vocode(features)
            errors = [np.abs(g - e).max() / np.abs(e).max() for g, e in zip(got, expected, strict=True)]
            noise = sum(float(((g - e) ** 2).sum()) for g, e in zip(got, expected, strict=True))
            signal = sum(float((e**2).sum()) for e in expected)
            engine.vocode(features)  # warm-up
            half_s = min(
                _timed(lambda engine=engine: engine.vocode(features)) for _ in range(bench.args.rounds)
            )
            half_one_s = min(
                _timed(lambda engine=engine: engine.vocode(one)) for _ in range(bench.args.rounds)
            )
            oracle_error = None  # skipped on a CPU: whole segments in bf16 would take minutes there
            if not bench.args.quick:
                run = run_oracle(engine, bench.kmodel, bench.requests(2, offset=5), {})
                oracle_error = run.report(bench.kmodel).audio_error
            record[dtype] = {
                "max_error_vs_fp32": float(max(errors)),  # x peak, worst item
                "snr_db_vs_fp32": 10 * math.log10(signal / max(noise, 1e-30)),
                "finite": bool(all(np.isfinite(g).all() for g in got)),
                "vocoder_ms": half_s * 1e3,
                "speedup_vs_fp32": fp32_s / half_s,
                "vocoder_one_ms": half_one_s * 1e3,
                "speedup_vs_fp32_one": fp32_one_s / half_one_s,
                "oracle_audio_error": oracle_error,  # against KModel's fp32 forward
            }
        except Exception as exc:  # one dtype failing (say fp16 on an old GPU) must not hide the other
            record[dtype] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        print(f"   {dtype}: {json.dumps(record[dtype], default=float)}", flush=True)
        report.write({**record, "status": "running"})
    if any("error" in record[dtype] or not record[dtype]["finite"] for dtype in dtypes):
        raise RuntimeError(f"autocast failed: {[d for d in dtypes if 'error' in record[d]]}")


def compiled(bench: Bench, record: dict[str, Any], report: Report, check: Callable[[str], None]) -> None:
    """The vocoder through torch.compile (Inductor), then with CUDA graphs ("reduce-overhead"), against
    eager on the same fixed-shape batches: compile time, speed-up and error. Inductor draws random
    numbers its own way, so fallback_random keeps eager's (fixed tables) for a fair error figure."""
    import types

    import torch._inductor.config as inductor_config

    from speakd.server.engines.kokoro import torch_batch
    from speakd.server.engines.kokoro.torch_oracle import fixed_randomness

    np = bench.np
    inductor_config.fallback_random = True
    # Host-to-device copies go through pinned memory, which Dynamo cannot trace: they stay eager.
    # So does the harmonic source: per-item lengths (.tolist()) and a phase summed over ~1e5 rad, which
    # another summation order would move; only the convolution stack is compiled.
    eager_to_device, eager_source = torch_batch.to_device, torch_batch._harmonic_spectrum
    torch_batch.to_device = bench.torch.compiler.disable(eager_to_device)
    if not bench.args.compile_source:
        torch_batch._harmonic_spectrum = bench.torch.compiler.disable(eager_source)
    batches = {
        size: bench.engine.acoustic(bench.requests(size, offset=23)) for size in bench.args.compile_sizes
    }
    eager_batch = bench.engine._batch
    record["sizes"] = bench.args.compile_sizes
    modes = bench.args.compile_modes  # Inductor's kernels ("default"); with CUDA graphs ("reduce-overhead")
    try:
        for mode in modes:
            check(mode)
            function = bench.torch.compile(torch_batch.vocode, mode=mode, dynamic=False)
            bench.engine._batch = types.SimpleNamespace(**{**vars(torch_batch), "vocode": function})
            rows: dict[str, Any] = {}
            record[mode] = rows
            for size, features in batches.items():
                check(f"{mode} at {size}")
                bench.engine._batch = eager_batch
                with fixed_randomness():
                    expected = bench.engine.vocode(features)
                eager_s = min(
                    _timed(lambda f=features: bench.engine.vocode(f)) for _ in range(bench.args.rounds)
                )
                bench.engine._batch = types.SimpleNamespace(**{**vars(torch_batch), "vocode": function})
                try:
                    with fixed_randomness():
                        compile_s = _timed(lambda f=features: bench.engine.vocode(f))
                        got = bench.engine.vocode(features)
                    for _ in range(2):  # CUDA graphs record on a later call than the first
                        bench.engine.vocode(features)
                    compiled_s = min(
                        _timed(lambda f=features: bench.engine.vocode(f)) for _ in range(bench.args.rounds)
                    )
                    errors = [
                        np.abs(g - e).max() / np.abs(e).max() for g, e in zip(got, expected, strict=True)
                    ]
                    rows[str(size)] = {
                        "spectral_error_vs_eager": max(
                            _spectral_error(np, g, e) for g, e in zip(got, expected, strict=True)
                        ),
                        "first_call_s": compile_s,
                        "eager_ms": eager_s * 1e3,
                        "compiled_ms": compiled_s * 1e3,
                        "speedup": eager_s / compiled_s,
                        "max_error_vs_eager": float(max(errors)),
                    }
                except Exception as exc:  # one mode failing must not hide the other
                    if is_oom(exc):
                        raise
                    rows[str(size)] = {"error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"}
                    traceback.print_exc()
                print(f"   {mode} at {size}: {json.dumps(rows[str(size)], default=float)}", flush=True)
                report.write({**record, "status": "running"})
    finally:
        bench.engine._batch = eager_batch
        torch_batch.to_device, torch_batch._harmonic_spectrum = eager_to_device, eager_source
    failed = [f"{mode} at {size}" for mode in modes for size, row in record[mode].items() if "error" in row]
    if failed:
        raise RuntimeError(f"compile failed: {', '.join(failed)}")


def _spectral_error(np: Any, got: Any, expected: Any) -> float:
    """‖|STFT(got)| - |STFT(expected)|‖ / ‖|STFT(expected)|‖ (1024-sample Hann frames, hop 256). The
    harmonic source's phase is a running sum of ~1e5 rad: another summation order moves it by a few
    mrad, which a sample-wise error shows as large while the spectrum, what is heard, stays put."""
    frames = np.lib.stride_tricks.sliding_window_view(np.stack([got, expected]), 1024, axis=-1)[:, ::256]
    got_mag, expected_mag = np.abs(np.fft.rfft(frames * np.hanning(1024), axis=-1))
    return float(np.linalg.norm(got_mag - expected_mag) / max(np.linalg.norm(expected_mag), 1e-12))


def _timed(work: Callable[[], Any]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--quick", action="store_true", help="small sizes and one round (the CPU test)")
    parser.add_argument("--sizes", default=None, help="comma-separated batch sizes (default 1,8,64,256)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per size (default 3)")
    parser.add_argument("--budget-s", type=float, default=240, help="time for all sections (default 240)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    parser.add_argument("--compile", action="store_true", help="the compile section on a CPU too")
    parser.add_argument("--compile-sizes", default=None, help="batch sizes to compile (default 1,8,64)")
    parser.add_argument("--compile-modes", default="default,reduce-overhead", help="torch.compile modes")
    parser.add_argument(
        "--compile-source", action="store_true", help="compile the harmonic source too (moves its phase)"
    )
    parser.add_argument("--site", type=Path, default=None, help="carry set directory, appended to sys.path")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.jsonl")
    args = parser.parse_args()
    if args.site is not None:
        sys.path.append(str(args.site.resolve()))  # before torch: it looks for numpy when imported
    args.sizes = [int(s) for s in (args.sizes or ("1,2" if args.quick else "1,8,64,256")).split(",")]
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.overlap_size = 1 if args.quick else 64
    args.autocast_size = 1 if args.quick else 64
    args.compile_sizes = [
        int(s) for s in (args.compile_sizes or ("1,2" if args.quick else "1,8,64")).split(",")
    ]
    args.compile_modes = args.compile_modes.split(",")
    if args.rounds < 1 or min(args.sizes) < 1:
        parser.error("--rounds and every size must be at least 1")

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("PyTorch sees no CUDA device: try --device cpu")
    report = Report(args.out)
    budget = Budget(args.budget_s)
    header: dict[str, Any] = {
        "section": "header",
        "device": torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32_matmul_cudnn": tf32_flags(
            torch
        ),  # as sizes, overlap and autocast run (the oracle sets its own)
        "quick": args.quick,
    }
    with contextlib.suppress(Exception):
        import transformers

        header["transformers"] = transformers.__version__
    print(json.dumps(header))
    report.write(header)

    bench: Bench | None = None
    with report.section("smoke", budget.share(0.2), torch) as record:
        bench = Bench(args)
        smoke(bench, record)
    if bench is None or report.statuses["smoke"] != "ok":
        print("the smoke run failed: nothing else can run", file=sys.stderr)
        return 1
    plan: list[tuple[str, float, Callable[..., None]]] = [
        ("oracle", 0.2, lambda r, c: oracle(bench, r, c)),
        ("sizes", 0.55, lambda r, c: sizes(bench, r, report, c)),
        ("overlap", 0.3, lambda r, c: overlap(bench, r, c)),
        ("autocast", 0.5 if bench.cuda else 1.0, lambda r, c: autocast(bench, r, report, c)),
    ]
    if bench.cuda or args.compile:  # Inductor on a 2-core CPU would take the CPU test's whole time
        plan.append(("compile", 1.0, lambda r, c: compiled(bench, r, report, c)))
    for name, share, run in plan:
        seconds = budget.share(share)
        if seconds < 5:
            report.skip(name)
            continue
        with report.section(name, seconds, torch) as record:
            run(record, Budget.deadline(seconds))
    print(f"\nstatuses: {json.dumps(report.statuses)}")
    return 0 if all(s in ("ok", "oom", "timeout") for s in report.statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
