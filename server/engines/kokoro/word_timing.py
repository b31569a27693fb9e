"""Word timing from what Kokoro already computes: G2P's word-to-phoneme map and the predicted durations.

G2P (misaki) gives tokens: words, punctuation, pieces of words ("$" + "12.50", "did" + "n't"), each
with its phonemes and whether whitespace follows. A spoken word is a run of tokens with no whitespace
between them, split at separating punctuation (dashes, commas, quotes...) and with punctuation trimmed
from its ends; it keeps the span of its original text, however G2P expanded it ("$12.50" is spoken as
"twelve dollars and fifty cents"). The acoustic model gives every phoneme token a whole number of
25 ms frames, so a word lasts from its first phoneme's first frame to its last phoneme's last frame.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from speakd.server.engines.kokoro.engine import SAMPLE_RATE, SAMPLES_PER_FRAME
from speakd.server.pipeline.job import TimedWord

FRAME_S = SAMPLES_PER_FRAME / SAMPLE_RATE
# Sound leads its phonemes' frames a little (the vocoder's convolutions spread each frame's features
# over its neighbours): where a word follows a pause, its audible onset came 29 ms before its first
# frame on average (bench/bench_word_timing.py --source replies, 213 onsets). Words are timed one
# frame earlier. Kokoro's own `KPipeline.join_timestamps` moves them 3 frames.
ONSET_LEAD_FRAMES = 1
# Punctuation that may sit inside one word (U.S.A., state-of-the-art, don't, 12:30, a/b); any other
# punctuation between two tokens with no space between them still separates two words (yes—no).
_INNER = frozenset(".-'/:_@#&\u2010\u2019")  # U+2010 hyphen, U+2019 apostrophe


@dataclass(frozen=True, slots=True)
class Piece:
    """One G2P token of a segment's text: its span in that text, the whitespace after it, its
    phonemes, its model tokens (a trailing word space included) and how many are its own phonemes."""

    text: str
    char_start: int
    char_end: int
    whitespace: str
    phonemes: str
    tokens: tuple[int, ...]
    phoneme_tokens: int

    @property
    def spaced(self) -> bool:
        return bool(self.whitespace)

    @property
    def spoken(self) -> bool:
        return is_spoken(self.phonemes)

    @property
    def punctuation(self) -> bool:
        """Nothing but punctuation, and nothing spoken: never part of a word's span."""
        return not self.spoken and all(unicodedata.category(ch).startswith("P") for ch in self.text)


@dataclass(frozen=True, slots=True)
class WordTokens:
    """A word of a phoneme chunk: its span in the G2P input and its tokens [token_start, token_end)
    in the chunk's token ids (BOS not counted)."""

    text: str
    char_start: int
    char_end: int
    token_start: int
    token_end: int


def locate(text: str, token_texts: Sequence[str]) -> list[tuple[int, int]]:
    """Each token's span in `text`, found in order. G2P tokens are pieces of its input; one it
    rewrote (a Markdown link's label) is looked for as is, and where it is not found it gets an
    empty span at the current position, so later tokens still line up."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for token in token_texts:
        at = text.find(token, cursor) if token else -1
        if at < 0:
            spans.append((cursor, cursor))
            continue
        spans.append((at, at + len(token)))
        cursor = at + len(token)
    return spans


def is_spoken(phonemes: str) -> bool:
    """Whether phonemes say something: letters, not just the punctuation Kokoro reads as pauses."""
    return any(ch.isalpha() for ch in phonemes)


def _groups(pieces: Sequence[Piece]) -> list[list[int]]:
    """Indices of pieces joined without whitespace, split at separating punctuation."""
    groups: list[list[int]] = []
    current: list[int] = []
    for i, piece in enumerate(pieces):
        separator = piece.punctuation and not (set(piece.text) <= _INNER)
        if separator:
            if current:
                groups.append(current)
            groups.append([i])
            current = []
        else:
            current.append(i)
        if piece.spaced and current:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def chunk_words(pieces: Sequence[Piece], token_offsets: Sequence[int], limit: int) -> list[WordTokens]:
    """The words of a chunk made of `pieces`, whose tokens start at `token_offsets` in the chunk's
    token ids (negative where the chunk stripped a leading space); tokens from `limit` on were cut."""
    words: list[WordTokens] = []
    for group in _groups(pieces):
        while group and pieces[group[0]].punctuation:
            group = group[1:]
        while group and pieces[group[-1]].punctuation:
            group = group[:-1]
        if not group or not any(pieces[i].spoken for i in group):
            continue
        spoken = [i for i in group if pieces[i].phoneme_tokens]
        start = max(0, token_offsets[spoken[0]])
        end = min(limit, token_offsets[spoken[-1]] + pieces[spoken[-1]].phoneme_tokens)
        if end <= start:
            continue
        first, last = pieces[group[0]], pieces[group[-1]]
        words.append(
            WordTokens(
                text="".join(pieces[i].text for i in group),
                char_start=first.char_start,
                char_end=last.char_end,
                token_start=start,
                token_end=end,
            )
        )
    return words


def time_words(
    words: Sequence[WordTokens], durations: npt.NDArray[np.int64], first_frame: int, offset: int
) -> tuple[TimedWord, ...]:
    """Seconds from a segment's first emitted frame (`first_frame`: the trimmed lead-in is not
    played) for each word, from the acoustic model's `durations` (frames per token, BOS first);
    `offset` moves character spans from the segment's text to the job's."""
    # Frame where model token k starts; chunk token i is model token i + 1 (after BOS).
    starts = np.concatenate([[0], np.cumsum(durations)]) - ONSET_LEAD_FRAMES
    last = len(starts) - 1
    out = []
    for word in words:
        begin = int(starts[min(word.token_start + 1, last)])
        end = int(starts[min(word.token_end + 1, last)])
        out.append(
            TimedWord(
                word=word.text,
                start_s=max(0, begin - first_frame) * FRAME_S,
                end_s=max(0, end - first_frame) * FRAME_S,
                char_start=offset + word.char_start,
                char_end=offset + word.char_end,
            )
        )
    return tuple(out)
