"""Voice packs: one style vector per utterance length, as Kokoro was trained."""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from speakd.server.errors import DependencyError, ModelError

STYLE_DIM = 256
MAX_PHONEMES = 510
# The default voice for official weights: Kokoro's best-rated voice, else any English one (Kokoro names
# voices by language first: a = American, b = British English).
PREFERRED_VOICE = "af_heart"
ENGLISH_PREFIXES = ("a", "b")


def preferred_voice(names: Sequence[str]) -> str:
    """af_heart if present, else the first English voice, else the first voice (in sorted order)."""
    ordered = sorted(names)
    if not ordered:
        raise ModelError("no voices to choose a default from")
    if PREFERRED_VOICE in ordered:
        return PREFERRED_VOICE
    return next((name for name in ordered if name.startswith(ENGLISH_PREFIXES)), ordered[0])


class VoiceBank:
    """The voices a model can speak with; picks the style row for a phoneme count."""

    def __init__(self, packs: dict[str, npt.NDArray[np.float32]]) -> None:
        for name, pack in packs.items():
            if pack.ndim != 2 or pack.shape[1] != STYLE_DIM or pack.shape[0] < 1:
                raise ModelError(f"voice {name!r} has shape {pack.shape}, expected [N, {STYLE_DIM}]")
        self._packs = packs

    @classmethod
    def from_npz(cls, path: Path) -> VoiceBank:
        """Load packs shaped [510, 1, 256] (or [510, 256]) from an npz archive."""
        with np.load(path) as archive:
            packs = {
                name: np.ascontiguousarray(
                    archive[name].reshape(archive[name].shape[0], -1), dtype=np.float32
                )
                for name in archive.files
            }
        return cls(packs)

    @classmethod
    def from_pt_files(cls, files: Mapping[str, Path]) -> VoiceBank:
        """Load Kokoro's own voice files (voice name → .pt path), each a torch tensor [510, 1, 256].

        Checked exactly: reshaping alone would let e.g. [510, 2, 128] through as a garbled voice."""
        try:
            import torch
        except ImportError as exc:
            raise DependencyError("voices/*.pt files need PyTorch: pip install kokoro==0.9.4") from exc
        packs = {}
        for name, path in files.items():
            try:
                tensor = torch.load(path, map_location="cpu", weights_only=True)
            except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
                raise ModelError(f"cannot read voice file {path}: {exc}") from exc
            expected = f"[{MAX_PHONEMES}, 1, {STYLE_DIM}]"
            if not isinstance(tensor, torch.Tensor):
                kind = type(tensor).__name__
                raise ModelError(f"voice file {path} holds a {kind}, not a tensor {expected}")
            if tensor.ndim != 3 or tuple(tensor.shape[1:]) != (1, STYLE_DIM):
                raise ModelError(f"voice file {path} has shape {list(tensor.shape)}, expected {expected}")
            packs[name] = np.ascontiguousarray(tensor.float().reshape(-1, STYLE_DIM).numpy())
        return cls(packs)

    @property
    def names(self) -> list[str]:
        return sorted(self._packs)

    def __contains__(self, name: object) -> bool:
        return name in self._packs

    def style(self, voice: str, phoneme_count: int) -> npt.NDArray[np.float32]:
        """Row `phoneme_count - 1` of the pack, shaped [1, 256] (Kokoro's `pack[len(ps) - 1]`)."""
        pack = self._packs[voice]
        row = min(max(phoneme_count, 1), pack.shape[0]) - 1
        return pack[row : row + 1]
