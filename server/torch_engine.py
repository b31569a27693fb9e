"""Kokoro-82M on PyTorch (hexgrad's KModel with the converted weights), cut where the ONNX engine is cut.

Each stage runs a whole batch in one padded forward (torch_batch); every item matches KModel's own
batch-1 `forward_with_tokens` (tests/test_torch_batch.py is the oracle). Features cross the cut as
float32 numpy arrays on the CPU, so the pipeline and its windowing are engine-agnostic.

On CUDA each calling thread (the acoustic and the vocoder stage) gets its own stream, so the two stages
overlap on the GPU. fp32 throughout: half precision and CUDA graphs are left out until measured on a GPU.

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

from .engine import SAMPLES_PER_FRAME, AcousticFeatures, AcousticRequest

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
    """Both stages batched: items of different lengths share one padded forward pass."""

    def __init__(self, kmodel: Any, device: str = "cpu", threads: int = 0) -> None:
        import torch

        from . import torch_batch

        self._torch = torch
        self._batch = torch_batch
        self.device = torch.device(device)
        # Process-wide: both stage threads share one intra-op pool (ONNX gives each stage `threads`).
        torch.set_num_threads(threads or os.cpu_count() or 1)
        self._kmodel = kmodel.to(self.device).eval()
        torch_batch.check_supported(self._kmodel)
        self._local = threading.local()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # weights uploaded before other streams read them
        logger.info("batched torch engine on %s", self.device)

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """No autograd; on CUDA, this thread's own stream."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._torch.inference_mode())
            if self.device.type == "cuda":
                stream = getattr(self._local, "stream", None)
                if stream is None:
                    stream = self._torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
                    self._local.stream = stream
                stack.enter_context(self._torch.cuda.stream(stream))
            yield

    def _tensor(self, array: npt.NDArray[Any]) -> torch.Tensor:
        return self._torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    @staticmethod
    def _numpy(tensor: torch.Tensor) -> npt.NDArray[np.float32]:
        """One device-to-host copy per batch tensor (synchronous on this thread's stream)."""
        result: npt.NDArray[np.float32] = tensor.float().cpu().numpy()
        return result

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
            asr, f0, energy = self._numpy(out.asr), self._numpy(out.f0), self._numpy(out.energy)
            durations = out.durations.cpu().numpy()
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
        with self._running():
            audio = self._numpy(
                self._batch.vocode(
                    self._kmodel,
                    self._tensor(_padded([f.asr for f in batch])),
                    self._tensor(_padded([f.f0 for f in batch])),
                    self._tensor(_padded([f.energy for f in batch])),
                    self._tensor(styles[:, :128]),
                    self._torch.tensor(frames, dtype=self._torch.long),
                )
            )
        return [audio[i, : SAMPLES_PER_FRAME * n].copy() for i, n in enumerate(frames)]
