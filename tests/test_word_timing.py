"""Word timing from G2P's tokens and the acoustic model's durations (server/engines/kokoro/word_timing.py).

Pure functions on made-up tokens; tests/test_engine.py runs the real G2P on tricky text.
"""

from __future__ import annotations

import numpy as np
import pytest

from speakd.server.engines.kokoro.word_timing import (
    FRAME_S,
    ONSET_LEAD_FRAMES,
    Piece,
    WordTokens,
    chunk_words,
    locate,
    time_words,
)

SPACE = 16


def pieces(text: str, tokens: list[tuple[str, str, str]]) -> tuple[list[Piece], list[int]]:
    """Pieces for (token text, phonemes, whitespace) triples, one model token per phoneme character,
    and each piece's first token in the joined token ids."""
    spans = locate(text, [t for t, _, _ in tokens])
    out: list[Piece] = []
    offsets: list[int] = []
    at = 0
    for (token, phonemes, whitespace), (start, end) in zip(tokens, spans, strict=True):
        ids = tuple(range(100, 100 + len(phonemes))) + ((SPACE,) if whitespace else ())
        out.append(Piece(token, start, end, whitespace, phonemes, ids, len(phonemes)))
        offsets.append(at)
        at += len(ids)
    return out, offsets


def test_locate_finds_each_token_in_order_and_survives_one_it_cannot_find() -> None:
    text = "  Hi, Hi there [Kokoro](/kOkoro/)!"
    spans = locate(text, ["Hi", ",", "Hi", "there", "Kokoro", "???", "!"])
    assert [text[a:b] for a, b in spans] == ["Hi", ",", "Hi", "there", "Kokoro", "", "!"]
    assert spans[1] == (4, 5) and spans[2] == (6, 8)  # the second "Hi" is not the first one again


def test_a_word_is_a_run_of_tokens_without_spaces_with_punctuation_trimmed_from_its_ends() -> None:
    text = 'He paid $12.50, didn\'t he? "Really," she said.'
    tokens = [
        ("He", "hi", " "),
        ("paid", "pAd", " "),
        ("$", "", ""),
        ("12.50", "twelv dalerz", ""),
        (",", ",", " "),
        ("did", "dId", ""),
        ("n't", "ent", " "),
        ("he", "hi", ""),
        ("?", "?", " "),
        ('"', "“", ""),
        ("Really", "rili", ""),
        (",", ",", ""),
        ('"', "”", " "),
        ("she", "Si", " "),
        ("said", "sEd", ""),
        (".", ".", ""),
    ]
    ps, offsets = pieces(text, tokens)
    words = chunk_words(ps, offsets, limit=10_000)
    assert [w.text for w in words] == ["He", "paid", "$12.50", "didn't", "he", "Really", "she", "said"]
    assert [text[w.char_start : w.char_end] for w in words] == [w.text for w in words]
    money = words[2]
    # "$" says nothing; the word's tokens are the number's phonemes, without the space after the comma.
    assert (money.token_start, money.token_end) == (offsets[3], offsets[3] + len("twelv dalerz"))
    didnt = words[3]
    assert (didnt.token_start, didnt.token_end) == (offsets[5], offsets[6] + 3)


def test_separating_punctuation_splits_words_written_without_spaces() -> None:
    text = "yes—no U.S.A. state-of-the-art"
    tokens = [
        ("yes", "jEs", ""),
        ("—", "—", ""),
        ("no", "nO", " "),
        ("U.S.A.", "jUEsA", " "),
        ("state", "stAt", ""),
        ("-", "", ""),
        ("of", "Av", ""),
        ("-", "", ""),
        ("the", "Di", ""),
        ("-", "", ""),
        ("art", "Art", ""),
    ]
    ps, offsets = pieces(text, tokens)
    words = chunk_words(ps, offsets, limit=10_000)
    assert [w.text for w in words] == ["yes", "no", "U.S.A.", "state-of-the-art"]


def test_tokens_cut_at_the_model_limit_drop_or_shorten_the_words_past_it() -> None:
    text = "one two three"
    ps, offsets = pieces(text, [("one", "wAn", " "), ("two", "tU", " "), ("three", "Tri", "")])
    words = chunk_words(ps, offsets, limit=6)  # "wAn" + space + "tU": "three" is cut off, "two" whole
    assert [(w.text, w.token_start, w.token_end) for w in words] == [("one", 0, 3), ("two", 4, 6)]
    words = chunk_words(ps, offsets, limit=5)
    assert [(w.text, w.token_end) for w in words] == [("one", 3), ("two", 5)]


def test_a_stripped_leading_space_shifts_token_offsets() -> None:
    ps = [Piece("hi", 0, 2, "", "hI", (101, 102), 2)]
    (word,) = chunk_words(ps, [-1], limit=1)  # the chunk lost its first token: the word keeps the rest
    assert (word.token_start, word.token_end) == (0, 1)


def test_times_come_from_cumulative_durations_after_the_first_played_frame() -> None:
    # BOS 10 frames, then tokens: "hi" 2+3, space 1, "yo" 4+4, EOS 20.
    durations = np.array([10, 2, 3, 1, 4, 4, 20], np.int64)
    words = [WordTokens("hi", 0, 2, 0, 2), WordTokens("yo", 3, 5, 3, 5)]
    first_frame = 6  # the lead-in before it is trimmed
    hi, yo = time_words(words, durations, first_frame, offset=100)
    lead = ONSET_LEAD_FRAMES
    assert hi.start_s == pytest.approx((10 - lead - first_frame) * FRAME_S)
    assert hi.end_s == pytest.approx((15 - lead - first_frame) * FRAME_S)
    assert yo.start_s == pytest.approx((16 - lead - first_frame) * FRAME_S)
    assert yo.end_s == pytest.approx((24 - lead - first_frame) * FRAME_S)
    assert (hi.char_start, hi.char_end, yo.char_start, yo.char_end) == (100, 102, 103, 105)
    assert hi.end_s <= yo.start_s


def test_a_word_never_starts_before_the_audio_does() -> None:
    (word,) = time_words([WordTokens("a", 0, 1, 0, 1)], np.array([0, 3, 0], np.int64), 0, offset=0)
    assert word.start_s == 0.0 and word.end_s == pytest.approx((3 - ONSET_LEAD_FRAMES) * FRAME_S)
