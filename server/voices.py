"""Voice packs: one style vector per utterance length, as Kokoro was trained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from .errors import ModelError

STYLE_DIM = 256
MAX_PHONEMES = 510


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
