"""Kokoro-82M on PyTorch (hexgrad's KModel with the converted weights), cut where the ONNX engine is cut.

Each stage runs a whole batch in one padded forward (torch_batch); every item matches KModel's own
batch-1 `forward_with_tokens` (tests/test_torch_batch.py is the oracle). Features cross the cut as
float32 numpy arrays on the CPU, so the pipeline and its windowing are engine-agnostic.

On CUDA each calling thread (the acoustic and the vocoder stage) gets its own stream, so the two stages
overlap on the GPU; inputs go up from pinned memory without blocking, and each call synchronises once,
when its results are read. The vocoder may run under bf16/fp16 autocast (bench/gpu_check.py measures
the error); CUDA graphs are left out until measured on a GPU.

Audio is KModel's own: 1/ONNX_AUDIO_GAIN (2/3) the level of the ONNX engine's (see torch_weights).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from speakd.server.config import PRECISIONS
from speakd.server.engines.kokoro.engine import SAMPLES_PER_FRAME, AcousticFeatures, AcousticRequest

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def _padded(arrays: Sequence[npt.NDArray[np.float32]]) -> npt.NDArray[np.float32]:
    """[B, ..., max T] from arrays shaped [1, ..., T_i], zero beyond each item's length."""
    longest = max(a.shape[-1] for a in arrays)
    out = np.zeros((len(arrays), *arrays[0].shape[1:-1], longest), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, ..., : a.shape[-1]] = a[0]
    return out


class TorchEngine:
    """Both stages batched: items of different lengths share one padded forward pass.

    `precision` bf16 or fp16 runs the vocoder's convolutions under autocast (the harmonic source and
    both STFTs stay in fp32, as do AdaIN statistics); the acoustic stage always runs in fp32: it is ~5 %
    of the FLOPs, and its durations are rounded, so half precision would move frames for nothing."""

    def __init__(self, kmodel: Any, device: str = "cpu", threads: int = 0, precision: str = "fp32") -> None:
        import torch

        from speakd.server.engines.kokoro import torch_batch

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self._torch = torch
        self._batch = torch_batch
        self.device = torch.device(device)
        self.precision = precision
        self._cuda = self.device.type == "cuda"
        self._autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # Process-wide: both stage threads share one intra-op pool (ONNX gives each stage `threads`).
        torch.set_num_threads(threads or os.cpu_count() or 1)
        torch_batch.prepare(kmodel)  # before the move: it turns the STFT window into a buffer
        self._kmodel = kmodel.to(self.device).eval()
        for module in self._kmodel.modules():
            if isinstance(module, torch.nn.RNNBase):
                # .to() leaves LSTM weights uncompacted: cuDNN would compact them on every call (and
                # kokoro's encoders do it on their first call, on a stage's stream, racing the upload).
                module.flatten_parameters()
        self._local = threading.local()
        if self._cuda:
            torch.cuda.synchronize(self.device)  # weights uploaded before other streams read them
        logger.info("batched torch engine on %s, vocoder in %s", self.device, precision)

    @contextlib.contextmanager
    def _running(self, autocast: bool = False) -> Iterator[None]:
        """No autograd; on CUDA, this thread's own stream: the acoustic and vocoder stages each call
        from one thread of their own, so they overlap on the GPU. Every tensor a call uses is made on
        its thread's stream (weights were synchronised at load), so no memory crosses streams."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._torch.inference_mode())
            if self._cuda:
                stream = getattr(self._local, "stream", None)
                if stream is None:
                    stream = self._torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
                    self._local.stream = stream
                stack.enter_context(self._torch.cuda.stream(stream))
            if autocast and self._autocast_dtype is not None:
                stack.enter_context(self._torch.autocast(self.device.type, dtype=self._autocast_dtype))
            yield

    def _tensor(self, array: npt.NDArray[Any]) -> torch.Tensor:
        """Host → device; on CUDA from pinned memory, without waiting (the stream orders the copy)."""
        return self._batch.to_device(self._torch.from_numpy(np.ascontiguousarray(array)), self.device)

    def _fetch(self, *tensors: torch.Tensor) -> list[npt.NDArray[Any]]:
        """Device → host; on CUDA all copies are queued into pinned memory, then one synchronisation."""
        if not self._cuda:
            return [tensor.numpy() for tensor in tensors]
        hosts = [self._torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for host, tensor in zip(hosts, tensors, strict=True):
            host.copy_(tensor, non_blocking=True)
        self._torch.cuda.current_stream(self.device).synchronize()
        return [host.numpy() for host in hosts]

    def acoustic(self, batch: Sequence[AcousticRequest]) -> list[AcousticFeatures]:
        if not batch:
            return []
        lengths = [len(request.tokens) + 2 for request in batch]
        ids = np.zeros((len(batch), max(lengths)), dtype=np.int64)  # 0 is the BOS/EOS and padding id
        for i, request in enumerate(batch):
            ids[i, 1 : lengths[i] - 1] = request.tokens
        styles = [np.ascontiguousarray(r.style, dtype=np.float32).reshape(1, -1) for r in batch]
        speeds = np.array([r.speed for r in batch], dtype=np.float32)
        with self._running():
            out = self._batch.acoustic(
                self._kmodel,
                self._tensor(ids),
                self._torch.tensor(lengths, dtype=self._torch.long),
                self._tensor(np.concatenate(styles)),
                self._tensor(speeds),
            )
            asr, f0, energy, durations = self._fetch(
                out.asr.float(), out.f0.float(), out.energy.float(), out.durations
            )
        frames = out.frames.tolist()
        return [
            AcousticFeatures(
                asr=asr[i : i + 1, :, : frames[i]].copy(),
                f0=f0[i : i + 1, : 2 * frames[i]].copy(),
                energy=energy[i : i + 1, : 2 * frames[i]].copy(),
                style=styles[i],
                durations=durations[i, : lengths[i]].astype(np.int64),
            )
            for i in range(len(batch))
        ]

    def vocode(self, batch: Sequence[AcousticFeatures]) -> list[npt.NDArray[np.float32]]:
        if not batch:
            return []
        frames = [features.frames for features in batch]
        styles = np.concatenate([np.asarray(f.style, dtype=np.float32).reshape(1, -1) for f in batch])
        with self._running(autocast=True):
            audio = self._batch.vocode(
                self._kmodel,
                self._tensor(_padded([f.asr for f in batch])),
                self._tensor(_padded([f.f0 for f in batch])),
                self._tensor(_padded([f.energy for f in batch])),
                self._tensor(styles[:, :128]),
                self._torch.tensor(frames, dtype=self._torch.long),
            )
            (host,) = self._fetch(audio.float())
        return [host[i, : SAMPLES_PER_FRAME * n].copy() for i, n in enumerate(frames)]
