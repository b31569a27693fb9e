"""Segmenter: exact cuts on tricky text, identical however the text is fragmented."""

# ruff: noqa: RUF001  -- full-width punctuation is the point of the CJK cases

import random
from typing import Any

import pytest

from speakd.server.core.segmenter import Located, Segmenter


def _whole(text: str, **kwargs: Any) -> list[str]:
    seg = Segmenter(**kwargs)
    return seg.feed(text) + seg.flush()


def _by_char(text: str, **kwargs: Any) -> list[str]:
    seg = Segmenter(**kwargs)
    out: list[str] = []
    for ch in text:
        out += seg.feed(ch)
    return out + seg.flush()


def _by_chunks(text: str, seed: int, **kwargs: Any) -> list[str]:
    rng = random.Random(seed)
    seg = Segmenter(**kwargs)
    out: list[str] = []
    i = 0
    while i < len(text):
        n = rng.randint(1, 9)
        out += seg.feed(text[i : i + n])
        i += n
    return out + seg.flush()


def _three_ways(text: str, **kwargs: Any) -> list[str]:
    """Segment ``text`` whole, char by char and in random chunks; all must agree."""
    whole = _whole(text, **kwargs)
    assert _by_char(text, **kwargs) == whole
    for seed in range(3):
        assert _by_chunks(text, seed, **kwargs) == whole
    return whole


CASES: list[tuple[str, str, list[str], dict[str, Any]]] = [
    ("plain", "Hello world. This is a test.", ["Hello world.", "This is a test."], {}),
    (
        "titles",
        "Dr. Smith went to Washington. He met Mr. and Mrs. Jones.",
        ["Dr. Smith went to Washington.", "He met Mr. and Mrs. Jones."],
        {},
    ),
    (
        "initials",
        "J. R. R. Tolkien wrote The Hobbit. It is good.",
        ["J. R. R. Tolkien wrote The Hobbit.", "It is good."],
        {},
    ),
    (
        "dotted acronyms",
        "I live in the U.S.A. It is big. The U.S. government is big.",
        ["I live in the U.S.A.", "It is big.", "The U.S. government is big."],
        {},
    ),
    (
        "a.m. p.m.",
        "We met at 10 a.m. and left at 3 p.m. Then we ate.",
        ["We met at 10 a.m. and left at 3 p.m.", "Then we ate."],
        {},
    ),
    (
        "etc",
        "Apples, pears, etc. are fruit. I like fruit, etc. Do you?",
        ["Apples, pears, etc. are fruit.", "I like fruit, etc.", "Do you?"],
        {},
    ),
    (
        "company and et al",
        "He works at Acme Inc. The firm is big. Acme Inc. makes things. Smith et al. found it.",
        ["He works at Acme Inc.", "The firm is big.", "Acme Inc. makes things.", "Smith et al. found it."],
        {},
    ),
    (
        "latin abbreviations",
        "It costs approx. 5 dollars, i.e. cheap, e.g. candy. Prof. X agrees.",
        ["It costs approx. 5 dollars,", "i.e. cheap, e.g. candy.", "Prof. X agrees."],
        {},
    ),
    (
        "number abbreviations",
        "See Fig. 3 for details. No. 5 is next. No. I refuse.",
        ["See Fig. 3 for details.", "No. 5 is next.", "No.", "I refuse."],
        {},
    ),
    ("list markers", "1. Buy milk. 2. Sell eggs.", ["1. Buy milk.", "2. Sell eggs."], {}),
    (
        "decimals and money",
        "Pi is 3.14 and it costs $12.50 today. It was 12. Nice.",
        ["Pi is 3.14 and it costs $12.50 today.", "It was 12.", "Nice."],
        {},
    ),
    (
        "times",
        "Meet me at 3:45 or 10:30:15 please. Ok.",
        ["Meet me at 3:45 or 10:30:15 please.", "Ok."],
        {},
    ),
    ("versions", "Upgrade to v1.2.3 now. Then v2.0.1.", ["Upgrade to v1.2.3 now.", "Then v2.0.1."], {}),
    (
        "urls and e-mail at sentence end",
        "Visit https://example.com/a.b?x=1 or www.example.com. Then mail a.b@example.co.uk. Bye.",
        ["Visit https://example.com/a.b?x=1 or www.example.com.", "Then mail a.b@example.co.uk.", "Bye."],
        {},
    ),
    (
        "ellipsis inside quotes",
        '"Wait... what?" she asked. He left.',
        ['"Wait... what?" she asked.', "He left."],
        {},
    ),
    (
        "ellipsis before lower and upper",
        "Well... I don't know. Hmm… maybe not. It was the ... end.",
        ["Well...", "I don't know.", "Hmm… maybe not.", "It was the ... end."],
        {},
    ),
    ("?! runs", "Really?! Yes!!! No way...", ["Really?!", "Yes!!!", "No way..."], {}),
    (
        "closing quotes and brackets",
        "He said \"Stop.\" Then he left. 'Go!' she said. (See above.) It (went away.) and so on.",
        ['He said "Stop."', "Then he left.", "'Go!' she said.", "(See above.)", "It (went away.) and so on."],
        {},
    ),
    (
        "markdown emphasis",
        "**Note.** This is bold. _Yes._ Fine.",
        ["**Note.**", "This is bold.", "_Yes._", "Fine."],
        {},
    ),
    (
        "newlines and paragraphs",
        "Line one\nLine two\r\n\r\n\nParagraph two. Dr.\nWho",
        ["Line one", "Line two", "Paragraph two.", "Dr.", "Who"],
        {},
    ),
    ("internal whitespace kept", "Hello  \t  world.   \n  Bye.", ["Hello  \t  world.", "Bye."], {}),
    (
        "cjk",
        "今日は晴れです。明日は雨でしょう！「本当？」と彼は言った。「はい。」次です。",
        ["今日は晴れです。", "明日は雨でしょう！", "「本当？」と彼は言った。", "「はい。」", "次です。"],
        {},
    ),
    (
        "cjk first clause",
        "我们今天去公园玩，然后回家吃饭。好吗？",
        ["我们今天去公园玩，", "然后回家吃饭。", "好吗？"],
        {},
    ),
    ("mixed scripts", "Hello world. 你好世界。 Done.", ["Hello world.", "你好世界。", "Done."], {}),
    (
        "first clause",
        "Well, I think that we should go now, really. Next, we go, and we go on.",
        ["Well, I think that we should go now,", "really.", "Next, we go, and we go on."],
        {},
    ),
    (
        "first clause too few words",
        "Well, hi. Then, we go home now, ok.",
        ["Well, hi.", "Then, we go home now, ok."],
        {},
    ),
    (
        "first clause decimal comma",
        "In 2023, 1,500 people attended the big event. There were 1,000,000 people, they said, at the show.",
        [
            "In 2023, 1,500 people attended the big event.",
            "There were 1,000,000 people, they said, at the show.",
        ],
        {},
    ),
    (
        "first clause dashes",
        "The first part is long — the second is short. A - b.",
        ["The first part is long —", "the second is short.", "A - b."],
        {},
    ),
    (
        "first clause spaced hyphen",
        "Note: the following items - eggs and milk - are needed.",
        ["Note: the following items -", "eggs and milk - are needed."],
        {},
    ),
    (
        "first clause min words setting",
        "Hi, hello, how are you, my friend; all good?",
        ["Hi, hello,", "how are you, my friend; all good?"],
        {"first_clause_min_words": 2},
    ),
    (
        "long sentence split at clause",
        "This sentence is quite long and it keeps going, and going; it never stops at all until here.",
        [
            "This sentence is quite long and it keeps",
            "going, and going;",
            "it never stops at all until here.",
        ],
        {"max_chars": 40},
    ),
    (
        "long sentence split at words",
        "This sentence is quite long and it keeps going and going and it never stops at all until here.",
        [
            "This sentence is quite long and it keeps",
            "going and going and it never stops at",
            "all until here.",
        ],
        {"max_chars": 40},
    ),
    ("long word hard cut", "x" * 2000, ["x" * 300] * 6 + ["x" * 200], {}),
    ("hard cut keeps emoji whole", "xxxx👍🏽yy", ["xxxx", "👍🏽yy"], {"max_chars": 5}),
    ("emoji", "I love it 😀. Great! 👍🏽👍🏽 👨‍👩‍👧", ["I love it 😀.", "Great!"], {}),
    ("empty", "", [], {}),
    ("whitespace only", "   \n\t  \r\n ", [], {}),
    ("punctuation only", "... — !!! ?", [], {}),
    ("no terminator", "just some words", ["just some words"], {}),
]


@pytest.mark.parametrize(("text", "expected", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_segments(text: str, expected: list[str], kwargs: dict[str, Any]) -> None:
    assert _three_ways(text, **kwargs) == expected


def test_random_text_is_fragmentation_independent() -> None:
    alphabet = [*"aAbZ 1 2.,;:!?…\"')(」「。！？，、—-\n e U.S. 3.14 😀🏽\u200d", "Mr. ", "etc. ", "... "]
    rng = random.Random(1234)
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        max_chars = rng.choice([1, 7, 30, 300])
        segments = _three_ways(text, max_chars=max_chars, first_clause_min_words=rng.choice([0, 4]))
        pos = 0
        for segment in segments:
            assert segment == segment.strip()
            assert 0 < len(segment) <= max_chars
            assert any(ch.isalnum() for ch in segment)
            pos = text.index(segment, pos) + len(segment)
        assert sum(ch.isalnum() for ch in text) == sum(ch.isalnum() for s in segments for ch in s)


def test_decision_waits_for_whitespace_and_next_word() -> None:
    seg = Segmenter()
    assert seg.feed("Hello.") == []
    assert seg.feed(" ") == ["Hello."]
    assert seg.feed("Wait...") == []
    assert seg.feed("  ") == []
    assert seg.feed("what") == []
    assert seg.feed("? ") == ["Wait...  what?"]
    assert seg.feed("「はい。") == []
    assert seg.feed("」") == []
    assert seg.feed("次") == ["「はい。」"]
    assert seg.flush() == ["次"]


def test_buffered_chars_tracks_holding() -> None:
    seg = Segmenter()
    assert seg.buffered_chars == 0
    assert seg.feed("Hello") == []
    assert seg.buffered_chars == 5
    assert seg.feed(" world.") == []
    assert seg.buffered_chars == 12
    assert seg.feed(" Next") == ["Hello world."]
    assert seg.buffered_chars == 4
    assert seg.feed("   ") == []
    assert seg.buffered_chars == 7
    assert seg.flush() == ["Next"]
    assert seg.buffered_chars == 0
    assert seg.feed("   ") == []
    assert seg.buffered_chars == 0


def test_buffer_stays_bounded() -> None:
    seg = Segmenter(max_chars=50)
    for ch in "word " * 200 + "Wait..." + " " * 200 + "x" * 200:
        seg.feed(ch)
        assert seg.buffered_chars <= 50 + 17


def test_first_clause_rule_applies_once_even_across_flush() -> None:
    seg = Segmenter()
    assert seg.feed("One two three four, five six, ") == ["One two three four,"]
    assert seg.flush() == ["five six,"]
    assert seg.feed("Seven eight nine ten, eleven. ") == ["Seven eight nine ten, eleven."]


def test_first_clause_waits_for_a_real_first_segment() -> None:
    seg = Segmenter()
    assert seg.feed("... One two three four, five.") == ["One two three four,"]  # "..." is dropped
    assert seg.flush() == ["five."]


def test_flush_releases_several_segments_when_over_limit() -> None:
    seg = Segmenter(max_chars=10)
    assert seg.feed("aaaa bbbb") == []
    assert seg.feed(" cccc dddd eeee") == ["aaaa bbbb", "cccc dddd"]
    assert seg.feed(" ff") == []
    assert seg.flush() == ["eeee ff"]


def test_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        Segmenter(max_chars=0)
    with pytest.raises(ValueError):
        Segmenter(first_clause_min_words=-1)


def test_twenty_thousand_chars_one_at_a_time() -> None:
    unit = 'Dr. Smith said, "Wait... what?" at 3:45 p.m. The U.S. grew 3.5% in Q1, i.e. fast. 今日は。\n'
    text = (unit * (20_000 // len(unit) + 1))[:20_000] + "x" * 1000
    segments = _by_char(text)
    assert segments == _whole(text)
    assert len(segments) > 600
    assert max(map(len, segments)) == 300


@pytest.mark.parametrize("seed", range(5))
def test_each_segment_knows_where_it_starts_in_all_the_text_fed(seed: int) -> None:
    text = (
        "  Sure, here it is.  First, open the file!\nThen   type: hello world. Done?  Yes — all done… "
        "A very long clause without any stop " * 3
    )
    rng = random.Random(seed)
    segmenter = Segmenter(max_chars=60)
    located = []
    i = 0
    while i < len(text):
        n = rng.randint(1, 9)
        located += segmenter.feed_located(text[i : i + n])
        i += n
    located += segmenter.flush_located()
    assert [s.text for s in located] == _whole(text, max_chars=60)
    offsets = [s.offset for s in located]
    assert offsets == sorted(offsets)
    for segment in located:
        assert text[segment.offset : segment.offset + len(segment.text)] == segment.text


def test_cut_waiting_cuts_at_the_last_clause_else_after_the_last_whole_word() -> None:
    """A live source's text waiting too long for its sentence to end is cut where the rest can follow."""
    s = Segmenter(first_clause_min_words=100)
    s.feed_located("and so we met the team on monday, then we went ho")
    assert s.waiting_offset == 0
    assert s.cut_waiting() == [Located("and so we met the team on monday,", 0, False)]
    assert s.waiting_offset == 34
    assert s.cut_waiting() == [Located("then we went", 34, False)]  # "ho" may be half a word
    assert s.waiting_offset == 47 and s.cut_waiting() == []
    assert s.feed_located("me. Then ") == [Located("home.", 47, True)]
    assert s.flush_located() == [Located("Then", 53, True)]
    assert s.waiting_offset is None and s.cut_waiting() == []


def test_cut_waiting_keeps_later_sentences_whole() -> None:
    s = Segmenter(first_clause_min_words=100)
    s.feed_located("   no punctuation at all here ")
    assert s.waiting_offset == 3
    assert s.cut_waiting() == [Located("no punctuation at all here", 3, False)]
    assert s.waiting_offset is None
    assert s.feed_located("Next one. And more") == [Located("Next one.", 30, True)]
    assert s.flush_located() == [Located("And more", 40, True)]
