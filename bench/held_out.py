"""The held-out sentences (bench/held_out_sentences.txt) that the studies and the GPU data share."""

from __future__ import annotations

from pathlib import Path

SENTENCES_FILE = Path(__file__).resolve().parent / "held_out_sentences.txt"


def held_out_sentences() -> list[str]:
    """The file's sentences in order, without its comment lines and blank lines."""
    lines = SENTENCES_FILE.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]
