"""The official Kokoro weights from a directory (model.dir / --model-dir / $SPEAKD_MODEL_DIR).

The official files are not available offline, so the directory is built in their layout from the
embedded model: config.json from kokoro_config, kokoro-v1_0.pth from the converted checkpoint with the
"module." key prefix the real file has, voices/*.pt from the embedded voices. Checks: the configuration
(precedence, engine, default voice), every layout and loading error, the same audio as the converted
weights, and a real daemon started with --model-dir."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from daemon import Daemon, client, transcribe, word_errors

from speakd.protocol import AudioCodec, End, Start, Started, Text
from speakd.server.cli import _overrides, _parser
from speakd.server.config import Config, load_config
from speakd.server.engines.kokoro.assets import ModelFiles
from speakd.server.engines.kokoro.g2p import EnglishG2P
from speakd.server.engines.kokoro.model_config import KMODEL_KEYS, kokoro_config
from speakd.server.engines.kokoro.speech import choose_engine
from speakd.server.engines.kokoro.torch_weights import (
    MODULE_PREFIX,
    PARTS,
    ModelDir,
    load_kmodel,
    load_official_kmodel,
    prepare_torch_weights,
)
from speakd.server.engines.kokoro.voices import VoiceBank, preferred_voice
from speakd.server.errors import ConfigError, ModelError

THREADS = 2
EMBEDDED_VOICES = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")
# Short: fp32 torch vocoding on this 2-core CPU is slow.
SENTENCE = "It is easy to tell the depth of a well."


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own SPEAKD_* settings must not leak into these tests."""
    for name in ("SPEAKD_CONFIG", "SPEAKD_MODEL_DIR"):
        monkeypatch.delenv(name, raising=False)


def layout(root: Path, voices: tuple[str, ...] = EMBEDDED_VOICES) -> Path:
    """The official file names with placeholder contents: enough for the checks that load no tensor."""
    (root / "voices").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(kokoro_config({"a": 1})), encoding="utf-8")
    (root / "kokoro-v1_0.pth").write_bytes(b"")
    for name in voices:
        (root / "voices" / f"{name}.pt").write_bytes(b"")
    return root


def config_error(overrides: dict[str, object] | None = None, path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    return str(caught.value)


# -- configuration: precedence, engine, default voice ----------------------------------------------


def test_without_a_model_dir_nothing_changes() -> None:
    config = load_config()
    assert config == Config()
    assert (config.model.dir, config.resolved_model_dir) == ("", None)
    assert (config.model.engine, config.model.default_voice) == ("onnx", "jf_gongitsune")


def test_cli_beats_config_file_beats_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli, file, env = (layout(tmp_path / name) for name in ("cli", "file", "env"))
    toml = tmp_path / "speakd.toml"
    toml.write_text(f'[model]\ndir = "{file}"\n', encoding="utf-8")
    args = _parser().parse_args(["serve", "--model-dir", str(cli)])

    monkeypatch.setenv("SPEAKD_MODEL_DIR", str(env))
    assert load_config().resolved_model_dir == env
    assert load_config(toml).resolved_model_dir == file
    assert load_config(toml, _overrides(args)).resolved_model_dir == cli
    # An explicit empty dir in the file means the embedded model, whatever the environment says.
    toml.write_text('[model]\ndir = ""\n', encoding="utf-8")
    assert load_config(toml).resolved_model_dir is None
    # The environment is not even looked at when the file or the command line names a directory.
    monkeypatch.setenv("SPEAKD_MODEL_DIR", str(tmp_path / "gone"))
    assert load_config(None, _overrides(args)).resolved_model_dir == cli


def test_tilde_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    layout(tmp_path / "kokoro")
    assert load_config(None, {"model.dir": "~/kokoro"}).resolved_model_dir == tmp_path / "kokoro"


def test_a_missing_directory_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope"
    expected = f"model.dir must be an existing directory (\"\" for the embedded model), got '{missing}'"
    assert config_error({"model.dir": str(missing)}) == expected
    toml = tmp_path / "speakd.toml"
    toml.write_text(f'[model]\ndir = "{missing}"\n', encoding="utf-8")
    assert config_error(path=toml) == f"{toml}: {expected}"
    monkeypatch.setenv("SPEAKD_MODEL_DIR", str(missing))
    assert config_error() == f"$SPEAKD_MODEL_DIR: {expected}"
    (tmp_path / "file").write_text("")
    assert config_error({"model.dir": str(tmp_path / "file")}).startswith("model.dir must be an existing dir")
    with pytest.raises(ConfigError, match="is not a directory"):
        ModelDir.open(missing)


def test_engine_auto_by_default_and_onnx_refused(tmp_path: Path) -> None:
    root = str(layout(tmp_path / "kokoro"))
    assert load_config(None, {"model.dir": root}).model.engine == "auto"
    assert load_config(None, {"model.dir": root, "model.engine": "torch"}).model.engine == "torch"
    message = config_error({"model.dir": root, "model.engine": "onnx"})
    assert message.startswith(f"model.engine 'onnx' cannot run the weights in model.dir '{root}'")
    assert "only the torch engine runs" in message
    toml = tmp_path / "speakd.toml"
    toml.write_text(f'[model]\nengine = "onnx"\ndir = "{root}"\n', encoding="utf-8")
    assert "cannot run the weights in model.dir" in config_error(path=toml)


def test_auto_is_torch_with_a_model_dir_even_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_engine("auto", "auto") == ("onnx", "cpu")
    assert choose_engine("auto", "auto", model_dir=True) == ("torch", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert choose_engine("auto", "auto", model_dir=True) == ("torch", "cuda")


@pytest.mark.parametrize(
    ("voices", "expected"),
    [
        (("jf_alpha", "bf_emma", "af_heart", "am_adam"), "af_heart"),
        (("jf_alpha", "bm_george", "zf_xiaobei", "am_adam"), "am_adam"),
        (("jf_alpha", "bm_george", "zf_xiaobei"), "bm_george"),
        (("zf_xiaobei", "jm_kumo", "jf_alpha"), "jf_alpha"),
    ],
)
def test_default_voice_of_a_model_dir(tmp_path: Path, voices: tuple[str, ...], expected: str) -> None:
    assert preferred_voice(voices) == expected
    root = str(layout(tmp_path / "kokoro", voices))
    assert load_config(None, {"model.dir": root}).model.default_voice == expected


def test_a_configured_default_voice_is_kept(tmp_path: Path) -> None:
    root = layout(tmp_path / "kokoro", ("af_heart", "bf_emma"))
    toml = tmp_path / "speakd.toml"
    toml.write_text(f'[model]\ndir = "{root}"\ndefault_voice = "bf_emma"\n', encoding="utf-8")
    assert load_config(toml).model.default_voice == "bf_emma"
    assert load_config(toml, {"model.default_voice": "af_sky"}).model.default_voice == "af_sky"


# -- the layout, checked before any tensor is loaded ----------------------------------------------


def open_error(root: Path) -> str:
    """The ModelError of ModelDir.open, which load_config raises just the same (the daemon exits 2)."""
    with pytest.raises(ModelError) as caught:
        ModelDir.open(root)
    with pytest.raises(ModelError) as again:
        load_config(None, {"model.dir": str(root)})
    assert str(again.value) == str(caught.value)
    return str(caught.value)


def test_a_complete_layout_opens(tmp_path: Path) -> None:
    root = layout(tmp_path / "kokoro", ("bf_emma", "af_heart"))
    (root / "voices" / "README.md").write_text("not a voice")
    model_dir = ModelDir.open(root)
    assert model_dir.checkpoint == root / "kokoro-v1_0.pth"
    assert model_dir.voices == {
        "af_heart": root / "voices/af_heart.pt",
        "bf_emma": root / "voices/bf_emma.pt",
    }
    assert model_dir.vocab == {"a": 1}
    assert set(KMODEL_KEYS) <= set(model_dir.config)


def test_config_json_missing(tmp_path: Path) -> None:
    root = layout(tmp_path / "kokoro")
    (root / "config.json").unlink()
    message = open_error(root)
    assert message.startswith(f"{root} has no config.json")
    assert "kokoro-v1_0.pth" in message and "hexgrad/Kokoro-82M" in message


def test_config_json_invalid(tmp_path: Path) -> None:
    root = layout(tmp_path / "kokoro")
    (root / "config.json").write_text('{"vocab": ', encoding="utf-8")
    assert open_error(root).startswith(f"{root / 'config.json'} is not valid JSON: ")
    with pytest.raises(ModelError) as caught:
        ModelDir.open(root)
    assert isinstance(caught.value.__cause__, json.JSONDecodeError)
    (root / "config.json").write_text("[1, 2]", encoding="utf-8")
    assert open_error(root) == f"{root / 'config.json'} holds a JSON list, not an object"


def test_config_json_missing_keys(tmp_path: Path) -> None:
    root = layout(tmp_path / "kokoro")
    config = kokoro_config({"a": 1})
    del config["n_token"], config["istftnet"]
    (root / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert open_error(root) == f"{root / 'config.json'} lacks keys KModel needs: n_token, istftnet"


def test_config_json_bad_vocab(tmp_path: Path) -> None:
    root = layout(tmp_path / "kokoro")
    config = kokoro_config({})
    for vocab in ({"a": "1"}, ["a"], {"a": True}):
        config["vocab"] = vocab
        (root / "config.json").write_text(json.dumps(config), encoding="utf-8")
        assert open_error(root) == (
            f"{root / 'config.json'}: vocab must map phoneme symbols to integer token ids"
        )


def test_checkpoint_missing(tmp_path: Path) -> None:
    root = layout(tmp_path / "kokoro")
    (root / "kokoro-v1_0.pth").unlink()
    assert open_error(root).startswith(f"{root} has no kokoro-v1_0.pth (expected: config.json, ")


@pytest.mark.parametrize("voices_dir", ["empty", "absent"])
def test_no_voices(tmp_path: Path, voices_dir: str) -> None:
    root = layout(tmp_path / "kokoro", ())
    if voices_dir == "absent":
        (root / "voices").rmdir()
    assert open_error(root).startswith(f"{root / 'voices'} holds no voice files (*.pt)")


# -- loading: voices and checkpoint ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (torch.zeros(510, 256), "has shape [510, 256], expected [510, 1, 256]"),
        (torch.zeros(510, 2, 128), "has shape [510, 2, 128], expected [510, 1, 256]"),
        ({"style": torch.zeros(510, 1, 256)}, "holds a dict, not a tensor [510, 1, 256]"),
    ],
    ids=["flat", "split", "dict"],
)
def test_a_voice_file_of_the_wrong_shape(tmp_path: Path, content: object, problem: str) -> None:
    good, bad = tmp_path / "af_good.pt", tmp_path / "af_bad.pt"
    torch.save(torch.zeros(510, 1, 256), good)
    torch.save(content, bad)
    assert VoiceBank.from_pt_files({"af_good": good}).names == ["af_good"]
    with pytest.raises(ModelError) as caught:
        VoiceBank.from_pt_files({"af_good": good, "af_bad": bad})
    assert str(caught.value) == f"voice file {bad} {problem}"


def test_a_voice_file_that_is_no_torch_file(tmp_path: Path) -> None:
    garbage = tmp_path / "af_garbage.pt"
    garbage.write_bytes(b"not a tensor")
    with pytest.raises(ModelError) as caught:
        VoiceBank.from_pt_files({"af_garbage": garbage})
    assert str(caught.value).startswith(f"cannot read voice file {garbage}: ")
    assert caught.value.__cause__ is not None


@pytest.fixture(scope="module")
def converted(torch_files: ModelFiles) -> dict[str, dict[str, torch.Tensor]]:
    checkpoint: dict[str, dict[str, torch.Tensor]] = torch.load(
        prepare_torch_weights(torch_files), weights_only=True, mmap=True
    )
    return checkpoint


@pytest.fixture(scope="module")
def official(
    torch_files: ModelFiles,
    converted: dict[str, dict[str, torch.Tensor]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The embedded model in the official layout, with the official checkpoint's "module." prefixes."""
    root = tmp_path_factory.mktemp("kokoro-82m")
    (root / "config.json").write_text(json.dumps(kokoro_config(torch_files.vocab())), encoding="utf-8")
    prefixed = {
        part: {MODULE_PREFIX + key: t for key, t in state.items()} for part, state in converted.items()
    }
    torch.save(prefixed, root / "kokoro-v1_0.pth")
    (root / "voices").mkdir()
    with np.load(torch_files.voices_npz) as archive:
        for name in archive.files:
            torch.save(torch.from_numpy(archive[name].copy()), root / "voices" / f"{name}.pt")
    return root


def test_pt_voices_match_the_embedded_ones(official: Path, torch_files: ModelFiles) -> None:
    from_pt = VoiceBank.from_pt_files(ModelDir.open(official).voices)
    from_npz = VoiceBank.from_npz(torch_files.voices_npz)
    assert from_pt.names == from_npz.names == list(EMBEDDED_VOICES)
    for name in EMBEDDED_VOICES:
        for phonemes in (1, 37, 510, 600):
            np.testing.assert_array_equal(from_pt.style(name, phonemes), from_npz.style(name, phonemes))


def test_official_kmodel_speaks_like_the_converted_one(official: Path, torch_files: ModelFiles) -> None:
    from_dir = load_official_kmodel(ModelDir.open(official))
    converted = load_kmodel(torch_files)
    for part in PARTS:
        expected = getattr(converted, part).state_dict()
        loaded = getattr(from_dir, part).state_dict()
        assert loaded.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(loaded[key], tensor), f"{part}.{key}"

    (chunk,) = EnglishG2P(torch_files.vocab())("Hello there.")
    style = torch.from_numpy(
        VoiceBank.from_npz(torch_files.voices_npz).style("jf_gongitsune", len(chunk.tokens))
    )
    ids = torch.tensor([[0, *chunk.tokens, 0]], dtype=torch.long)
    outputs = []
    for kmodel in (from_dir, converted):
        torch.manual_seed(1234)  # SineGen draws a random phase and noise
        with torch.inference_mode():
            outputs.append(kmodel.forward_with_tokens(ids, style))
    (audio, durations), (expected_audio, expected_durations) = outputs
    np.testing.assert_array_equal(durations.numpy(), expected_durations.numpy())
    assert audio.shape == expected_audio.shape and audio.shape[0] > 24000 * 0.4
    np.testing.assert_allclose(audio.numpy(), expected_audio.numpy(), rtol=1e-5, atol=1e-6)
    assert float(audio.abs().max()) > 0.05


def write_checkpoint(root: Path, checkpoint: object) -> ModelDir:
    """`root` in the official layout with `checkpoint` as its kokoro-v1_0.pth."""
    layout(root)
    torch.save(checkpoint, root / "kokoro-v1_0.pth")
    return ModelDir.open(root)


def load_error(model_dir: ModelDir) -> str:
    with pytest.raises(ModelError) as caught:
        load_official_kmodel(model_dir)
    return str(caught.value)


def test_a_checkpoint_that_does_not_fit_names_parts_and_keys(
    tmp_path: Path, converted: dict[str, dict[str, torch.Tensor]]
) -> None:
    broken = {part: dict(state) for part, state in converted.items() if part != "text_encoder"}
    del broken["bert"]["embeddings.word_embeddings.weight"]
    broken["decoder"]["generator.extra.weight"] = torch.zeros(3)
    broken["predictor"]["duration_proj.linear_layer.bias"] = torch.zeros(7)
    broken["vocoder"] = {}
    model_dir = write_checkpoint(tmp_path / "kokoro", broken)
    assert load_error(model_dir) == (
        f"{model_dir.checkpoint} does not fit kokoro's KModel: unknown part 'vocoder'; "
        "bert: missing keys embeddings.word_embeddings.weight; "
        "predictor: shape mismatches duration_proj.linear_layer.bias [7] ≠ [50]; "
        "part 'text_encoder' is missing; "
        "decoder: unexpected keys generator.extra.weight"
    )


def test_a_checkpoint_that_is_no_checkpoint(tmp_path: Path) -> None:
    model_dir = write_checkpoint(tmp_path / "list", [1, 2])
    assert load_error(model_dir) == f"{model_dir.checkpoint} holds a list, not {{part: state dict}}"
    model_dir = write_checkpoint(tmp_path / "parts", {part: [] for part in PARTS})
    assert "part 'bert' is not a state dict" in load_error(model_dir)
    (model_dir.checkpoint).write_bytes(b"garbage")
    assert load_error(model_dir).startswith(f"cannot read the checkpoint {model_dir.checkpoint} (")


def test_a_config_json_that_does_not_describe_a_kmodel(tmp_path: Path) -> None:
    model_dir = write_checkpoint(tmp_path / "kokoro", {})
    config = kokoro_config({"a": 1})
    del config["istftnet"]["gen_istft_n_fft"]
    (model_dir.root / "config.json").write_text(json.dumps(config), encoding="utf-8")
    message = load_error(ModelDir.open(model_dir.root))
    assert message.startswith(f"{model_dir.root / 'config.json'} does not describe a KModel (TypeError(")
    assert "gen_istft_n_fft" in message


# -- the daemon, started with --model-dir --------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(official: Path, model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    # The layout with an af_heart: the real one's is not here, so it speaks with jf_gongitsune's style.
    root = tmp_path_factory.mktemp("with-af-heart")
    for name in ("config.json", "kokoro-v1_0.pth"):
        (root / name).symlink_to(official / name)
    shutil.copytree(official / "voices", root / "voices")
    shutil.copy(official / "voices" / "jf_gongitsune.pt", root / "voices" / "af_heart.pt")
    d = Daemon(
        tmp_path_factory.mktemp("daemon"),
        model_cache,
        args=["--model-dir", str(root), "--threads", str(THREADS)],
    )
    d.wait_ready(timeout=300)
    yield d
    assert d.stop() == 0, "".join(d.log)


@pytest.mark.e2e
async def test_daemon_speaks_with_the_weights_of_a_model_dir(daemon: Daemon) -> None:
    log = "".join(daemon.log)
    assert "engine: torch (PyTorch KModel) on cpu, official weights from" in log, log
    assert "default af_heart" in log
    status, body = daemon.get("/v1/voices")
    assert status == 200
    voices: list[dict[str, Any]] = json.loads(body)
    assert [v["name"] for v in voices] == ["af_heart", *EMBEDDED_VOICES]
    assert [v["name"] for v in voices if v["default"]] == ["af_heart"]

    async with client(daemon.url) as c:
        await c.send(Start(context="talk", codec=AudioCodec.PCM16))
        started = await c.until("talk", Started)
        assert isinstance(started, Started) and started.voice == "af_heart"
        await c.send(Text(context="talk", text=SENTENCE))
        await c.send(End(context="talk"))
        await c.until_done("talk", timeout=180)
    u = c.utterance("talk")
    u.assert_complete(SENTENCE, min_segments=1)
    pcm = u.pcm()
    assert len(pcm) > 24000 * 1.5
    assert np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 300  # speech, not silence
    heard = transcribe(pcm, 24000)
    errors, total = word_errors(SENTENCE, heard)
    assert errors / total <= 0.25, heard
