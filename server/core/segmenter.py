"""Incremental text segmenter: cuts streamed LLM text into segments that are safe to synthesize early.

Every cut is decided from text already seen plus a bounded lookahead; when that lookahead has not arrived
the scanner waits at a saved position.  The result is therefore the same however the text is fragmented,
and each character is examined a bounded number of times.

Decisions (see ``Segmenter``):

* A sentence ends at ``.`` ``!`` ``?`` ``…`` (or a run such as ``?!`` / ``...``), optionally followed by
  closing quotes/brackets, then whitespace.  CJK ``。！？`` end a sentence without whitespace, after any
  closing quotes/brackets that follow them.  Newlines always cut.
* Ellipses, and terminators followed by a closing quote/bracket, do not end the sentence when the next
  word starts lowercase (``"Wait... what?" she asked.`` stays whole); likewise 「…」 followed by と/って.
  The next word is looked for at most 16 characters ahead; a longer gap counts as a cut.
* Titles and Latin abbreviations (Dr. Mr. Mrs. Ms. Prof. St. vs. e.g. i.e. approx. ...) and single-letter
  initials (J. R. R. Tolkien; so "Plan B. Next" is not cut either) never end a sentence.  Abbreviations
  that often end one too (etc. Inc. Ltd. Jr. a.m. p.m. and dotted acronyms such as U.S. or U.S.A.) end it
  only if the next word starts uppercase (so "the U.S. Army" is cut, "the U.S. army" is not).
  No. Fig. Vol. pp. ... do not end it before a number.  A number alone at the start of a segment ("1.") is
  a list marker, not a sentence.
* Only the very first segment of a context may be a clause: it is cut at ``,`` ``;`` ``:`` + whitespace,
  an em/en dash, a spaced hyphen, or CJK ``，、；：`` once it holds ``first_clause_min_words`` words.
* No segment exceeds ``max_chars``: it is cut at the last clause break, else the last whitespace, else
  hard (never inside an emoji/combining sequence).
* Segments are stripped; those without a letter or digit are dropped.
"""

# ruff: noqa: RUF001, RUF002, RUF003  -- full-width and typographic punctuation is what this module parses

from __future__ import annotations

import enum
import re
import unicodedata
from dataclasses import dataclass

_NEWLINES = frozenset("\n\r\v\f\x85\u2028\u2029")
_CJK_TERMINATORS = frozenset("。！？｡")
_TERMINATORS = frozenset(".!?…") | _CJK_TERMINATORS
_CLOSERS = frozenset("\"'”’»›」』｣)]}）】〕〉》〗〙〛*_`")
_OPENER_CHARS = "\"'“‘«‹([{（【「『*_`¿¡"
_OPENERS = frozenset(_OPENER_CHARS)
_CLAUSE = frozenset(",;:")
_CJK_CLAUSE = frozenset("，、；：")
_DASHES = frozenset("—–")
_JA_QUOTATIVE = frozenset("とっ")  # と / って after a closing quote attribute it: 「はい」と言った
_JOINING_CATEGORIES = frozenset({"Mn", "Mc", "Me", "Sk"})
_ZWJ = "\u200d"

# How far past a terminator the scanner may look for the next word before treating the gap as a pause.
_LOOKAHEAD = 16

# Lowercased, without the final period.
_TITLES = frozenset({"mr", "mrs", "ms", "mx", "dr", "prof", "st", "mt", "rev", "hon", "messrs", "mme"})
_RANKS = frozenset({"gen", "col", "lt", "sgt", "capt", "gov", "sen", "rep"})
_NEVER_END = _TITLES | _RANKS | {"vs", "e.g", "i.e", "cf", "viz", "approx"}
_END_BEFORE_UPPER = frozenset({"etc", "al", "jr", "sr", "esq", "ph.d", "inc", "ltd", "co", "corp", "llc"})
_NOT_BEFORE_NUMBER = frozenset({"no", "nos", "fig", "figs", "vol", "pp", "ch", "sec", "art", "eq", "op"})
_DOTTED_ACRONYM = re.compile(r"(?:[a-z]\.)+[a-z]")


class _NextWord(enum.Enum):
    """What the word after a candidate terminator must look like for the cut to happen."""

    NOT_LOWER = enum.auto()
    UPPER = enum.auto()
    NOT_DIGIT = enum.auto()


def _is_cjk(ch: str) -> bool:
    return "\u3040" <= ch <= "\u30ff" or "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff"


def _count_words(text: str) -> int:
    """Whitespace-separated words; CJK characters count one each since CJK text has no spaces."""
    words = 0
    for token in text.split():
        cjk = sum(1 for ch in token if _is_cjk(ch))
        if cjk:
            words += cjk
        elif any(ch.isalnum() for ch in token):
            words += 1
    return words


def _joins_previous(ch: str, prev: str) -> bool:
    """Whether a hard cut before ``ch`` would split a grapheme (combining mark, emoji modifier, ZWJ)."""
    return prev == _ZWJ or ch == _ZWJ or unicodedata.category(ch) in _JOINING_CATEGORIES


def _period_rule(token: str, at_segment_start: bool) -> _NextWord | bool | None:
    """Classify the word before a single ``.``: False never ends, a _NextWord waits, None is a plain end."""
    low = token.lower()
    if low in _NEVER_END:
        return False
    if len(token) == 1 and token.isalpha() and ord(token) < 0x250:
        return False
    if at_segment_start and token.isdecimal():
        return False
    if low in _END_BEFORE_UPPER or _DOTTED_ACRONYM.fullmatch(low):
        return _NextWord.UPPER
    if low in _NOT_BEFORE_NUMBER:
        return _NextWord.NOT_DIGIT
    return None


@dataclass(frozen=True, slots=True)
class Located:
    """A segment and where it starts in all the text the context was fed (code points), so word
    positions can point into the client's own text."""

    text: str
    offset: int
    # Whether the segment ends a sentence (or the text): false for a first clause cut early and a
    # long sentence cut at `max_chars`, whose rest follows in the next segment.
    ends_sentence: bool = True


class Segmenter:
    """Per-context incremental segmenter; feed it fragments, get back segments as soon as they are safe."""

    def __init__(self, *, first_clause_min_words: int = 4, max_chars: int = 300) -> None:
        if max_chars < 1:
            raise ValueError("max_chars must be at least 1")
        if first_clause_min_words < 0:
            raise ValueError("first_clause_min_words must not be negative")
        self._min_words = first_clause_min_words
        self._max_chars = max_chars
        self._buf = ""
        self._start = 0  # first character of the pending segment
        self._pos = 0  # next position whose "does a segment end right after it?" question is open
        self._first = True  # no segment emitted yet in this context
        self._dropped = 0  # characters already cut off the front of `_buf`

    @property
    def buffered_chars(self) -> int:
        """Characters received but not yet emitted, so the server can bound what a client holds back."""
        return len(self._buf) - self._start

    @property
    def waiting_offset(self) -> int | None:
        """Where the first buffered character that is not whitespace is in the context's text: the
        oldest text waiting for its segment to end (None: none waits)."""
        rest = self._buf[self._start :]
        kept = rest.lstrip()
        return self._dropped + self._start + len(rest) - len(kept) if kept else None

    def cut_waiting(self) -> list[Located]:
        """Cut what is buffered now at its last clause break, else after its last complete word (one
        whitespace follows), keeping the rest: for a live source whose sentence has waited too long
        (text without sentence ends, or a very long sentence). [] when no word is complete yet."""
        buf, start = self._buf, self._start
        out: list[Located] = []
        end = next(
            (j + 1 for j in range(len(buf) - 2, start - 1, -1) if self._clause_ends_after(j, final=False)), 0
        )
        if not end:
            end = next(
                (j for j in range(len(buf) - 1, start, -1) if buf[j].isspace() and not buf[j - 1].isspace()),
                0,
            )
        if end:
            self._cut(end, out, sentence=False)
            self._pos = max(self._pos, self._start)
            self._buf = self._buf[self._start :]
            self._dropped += self._start
            self._pos -= self._start
            self._start = 0
        return out

    def feed(self, text: str) -> list[str]:
        """Add a fragment; return the segments it completed."""
        return [segment.text for segment in self.feed_located(text)]

    def flush(self) -> list[str]:
        """Release everything buffered; the first-clause rule stays spent for the rest of the context."""
        return [segment.text for segment in self.flush_located()]

    def feed_located(self, text: str) -> list[Located]:
        """`feed`, with where each segment starts in the context's text."""
        self._buf += text
        out = self._scan(final=False)
        self._buf = self._buf[self._start :]
        self._dropped += self._start
        self._pos -= self._start
        self._start = 0
        return out

    def flush_located(self) -> list[Located]:
        """`flush`, with where each segment starts in the context's text."""
        out = self._scan(final=True)
        self._cut(len(self._buf), out, sentence=True)
        self._dropped += len(self._buf)
        self._buf = ""
        self._start = self._pos = 0
        return out

    def _scan(self, *, final: bool) -> list[Located]:
        out: list[Located] = []
        buf = self._buf
        p = self._pos
        while p < len(buf):
            if p == self._start and buf[p].isspace():
                self._start += 1
                p += 1
            elif p - self._start >= self._max_chars:
                p = self._force_cut(p, out)
            else:
                ends = self._ends_after(p, final=final)
                if ends is None:
                    break
                p += 1
                if ends:
                    last = buf[p - 1]
                    self._cut(p, out, sentence=last in _NEWLINES or last in _TERMINATORS or last in _CLOSERS)
        self._pos = p
        return out

    def _cut(self, end: int, out: list[Located], *, sentence: bool) -> int:
        raw = self._buf[self._start : end]
        segment = raw.strip()
        if any(ch.isalnum() for ch in segment):
            lead = len(raw) - len(raw.lstrip())
            out.append(Located(segment, self._dropped + self._start + lead, sentence))
            self._first = False
        self._start = end
        return end

    def _force_cut(self, p: int, out: list[Located]) -> int:
        """Cut a segment that reached max_chars, using only ``buf[start : p + 1]``."""
        buf, start = self._buf, self._start
        for j in range(p - 1, start - 1, -1):
            if self._clause_ends_after(j, final=False):
                return self._cut(j + 1, out, sentence=False)
        for j in range(p, start, -1):
            if buf[j].isspace():
                return self._cut(j, out, sentence=False)
        while p > start + 1 and _joins_previous(buf[p], buf[p - 1]):
            p -= 1
        return self._cut(p, out, sentence=False)

    def _ends_after(self, p: int, *, final: bool) -> bool | None:
        """Whether a segment ends right after ``p``; None means the lookahead has not arrived yet."""
        ch = self._buf[p]
        if ch in _NEWLINES:
            return True
        if ch in _TERMINATORS or ch in _CLOSERS:
            return self._sentence_ends_after(p, final=final)
        if not self._first:
            return False
        ends = self._clause_ends_after(p, final=final)
        if not ends:
            return ends
        return _count_words(self._buf[self._start : p + 1]) >= self._min_words

    def _sentence_ends_after(self, p: int, *, final: bool) -> bool | None:
        """Decided at the last char of a terminator/closer run, once the run and its follower are known."""
        buf, start = self._buf, self._start
        if p + 1 >= len(buf):
            return True if final else None
        follower = buf[p + 1]
        if follower in _TERMINATORS or follower in _CLOSERS:
            return False  # decided at the end of the punctuation run
        i = p
        while i >= start and buf[i] in _CLOSERS:
            i -= 1
        closed = i < p
        j = i
        while j >= start and buf[j] in _TERMINATORS:
            j -= 1
        run = buf[j + 1 : i + 1]
        if not run:
            return False
        if any(c in _CJK_TERMINATORS for c in run):
            return not (closed and follower in _JA_QUOTATIVE)  # 「本当？」と言った stays whole
        if not follower.isspace():
            return False  # 3.14, example.com, a?b
        rule: _NextWord | bool | None
        if "!" in run or "?" in run:
            rule = None
        elif run != ".":
            rule = _NextWord.NOT_LOWER  # ellipsis
        else:
            k = j
            while k >= start and not buf[k].isspace():
                k -= 1
            token = buf[k + 1 : j + 1].lstrip(_OPENER_CHARS)
            rule = _period_rule(token, k + 1 == start)
        if rule is None:
            rule = _NextWord.NOT_LOWER if closed else True
        if isinstance(rule, bool):
            return rule
        return self._next_word_allows_end(p + 1, rule, final=final)

    def _next_word_allows_end(self, j: int, rule: _NextWord, *, final: bool) -> bool | None:
        """Peek at the next word's first letter, within a bounded window so waiting can never run away."""
        buf = self._buf
        for i in range(j, j + _LOOKAHEAD):
            if i >= len(buf):
                return True if final else None
            ch = buf[i]
            if ch in _NEWLINES:
                return True
            if ch.isspace() or ch in _OPENERS:
                continue
            if rule is _NextWord.NOT_LOWER:
                return not ch.islower()
            if rule is _NextWord.UPPER:
                return ch.isupper()
            return not ch.isdecimal()
        return True

    def _clause_ends_after(self, p: int, *, final: bool) -> bool | None:
        """Clause breaks serve the first segment's latency and the max_chars fallback."""
        buf = self._buf
        ch = buf[p]
        if ch in _CJK_CLAUSE:
            return True
        if ch not in _CLAUSE and ch not in _DASHES and ch != "-":
            return False
        if p + 1 >= len(buf):
            return True if final else None
        follower = buf[p + 1]
        if ch in _CLAUSE:
            return follower.isspace()  # not 1,000 or 3:45
        if follower in _DASHES or follower == "-":
            return False  # decided at the end of the dash run
        if ch in _DASHES:
            return True
        i = p
        while i > self._start and buf[i - 1] == "-":
            i -= 1
        return follower.isspace() and i > self._start and buf[i - 1].isspace()  # spaced hyphen only
