"""Kokoro-82M on PyTorch (hexgrad's KModel with the converted weights), cut where the ONNX engine is cut.

The acoustic stage is `KModel.forward_with_tokens` up to the aligned features, the vocoder stage is its
decoder call; run back to back on the same input they reproduce `forward_with_tokens` exactly. Features
cross the cut as float32 numpy arrays on the CPU, so the pipeline and its windowing are engine-agnostic.

Audio is KModel's own: 1/ONNX_AUDIO_GAIN (2/3) the level of the ONNX engine's (see torch_weights).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .engine import AcousticFeatures, AcousticRequest

if TYPE_CHECKING:
    import torch


class TorchEngine:
    """Runs each stage's items one by one (batching across contexts comes later)."""

    def __init__(self, kmodel: Any, device: str = "cpu", threads: int = 0) -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        # Process-wide: both stage threads share one intra-op pool (ONNX gives each stage `threads`).
        torch.set_num_threads(threads or os.cpu_count() or 1)
        self._kmodel = kmodel.to(self.device).eval()

    def acoustic(self, batch: Sequence[AcousticRequest]) -> list[AcousticFeatures]:
        with self._torch.inference_mode():
            return [self._acoustic_one(request) for request in batch]

    def vocode(self, batch: Sequence[AcousticFeatures]) -> list[npt.NDArray[np.float32]]:
        with self._torch.inference_mode():
            return [self._vocode_one(features) for features in batch]

    def _tensor(self, array: npt.NDArray[np.float32]) -> torch.Tensor:
        return self._torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)

    @staticmethod
    def _numpy(tensor: torch.Tensor) -> npt.NDArray[np.float32]:
        result: npt.NDArray[np.float32] = tensor.detach().float().cpu().numpy()
        return np.ascontiguousarray(result)

    def _acoustic_one(self, request: AcousticRequest) -> AcousticFeatures:
        torch, km, device = self._torch, self._kmodel, self.device
        style = np.ascontiguousarray(request.style, dtype=np.float32).reshape(1, -1)
        ref_s = self._tensor(style)
        input_ids = torch.tensor([[0, *request.tokens, 0]], dtype=torch.long, device=device)
        length = input_ids.shape[1]
        input_lengths = torch.full((1,), length, dtype=torch.long, device=device)
        # One unpadded sequence: the mask is all False, built as KModel builds it.
        text_mask = torch.gt(torch.arange(length, device=device).unsqueeze(0) + 1, input_lengths.unsqueeze(1))
        bert_dur = km.bert(input_ids, attention_mask=(~text_mask).int())
        d_en = km.bert_encoder(bert_dur).transpose(-1, -2)
        s = ref_s[:, 128:]
        d = km.predictor.text_encoder(d_en, s, input_lengths, text_mask)
        x, _ = km.predictor.lstm(d)
        duration = torch.sigmoid(km.predictor.duration_proj(x)).sum(axis=-1) / request.speed
        pred_dur = torch.round(duration).clamp(min=1).long().reshape(-1)
        indices = torch.repeat_interleave(torch.arange(length, device=device), pred_dur)
        aln = torch.zeros((length, indices.shape[0]), device=device)
        aln[indices, torch.arange(indices.shape[0], device=device)] = 1
        aln = aln.unsqueeze(0)
        en = d.transpose(-1, -2) @ aln
        f0, energy = km.predictor.F0Ntrain(en, s)
        t_en = km.text_encoder(input_ids, input_lengths, text_mask)
        asr = t_en @ aln
        return AcousticFeatures(
            asr=self._numpy(asr),
            f0=self._numpy(f0),
            energy=self._numpy(energy),
            style=style,
            durations=pred_dur.cpu().numpy().astype(np.int64),
        )

    def _vocode_one(self, features: AcousticFeatures) -> npt.NDArray[np.float32]:
        ref_s = self._tensor(features.style)
        audio = self._kmodel.decoder(
            self._tensor(features.asr),
            self._tensor(features.f0),
            self._tensor(features.energy),
            ref_s[:, :128],
        )
        return self._numpy(audio).reshape(-1)
