"""Configuration: defaults, TOML file, overrides, and strict validation with messages that name the key."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from speakd.server.config import (
    AudioSection,
    Config,
    LimitsSection,
    ModelSection,
    PipelineSection,
    ServerSection,
    default_cache_dir,
    load_config,
)
from speakd.server.engines.kokoro.speech import default_max_batch
from speakd.server.errors import ConfigError, SpeakdError

EXAMPLE = Path(__file__).resolve().parent.parent / "speakd.example.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own SPEAKD_* / XDG settings must not leak into these tests."""
    for name in ("SPEAKD_CONFIG", "SPEAKD_CACHE_DIR", "SPEAKD_MODEL_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "speakd.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path | None = None, overrides: dict[str, object] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_defaults_without_file() -> None:
    config = load_config()
    assert config == Config()
    assert config.server == ServerSection(
        host="127.0.0.1", port=8765, shutdown_grace_s=10.0, log_level="info"
    )
    assert config.limits == LimitsSection(
        max_message_bytes=65536,
        max_buffered_text_chars=20000,
        max_contexts_per_connection=16,
        max_connections=256,
        idle_timeout_s=300.0,
        max_outbound_bytes=4 * 1024 * 1024,
        send_timeout_s=10.0,
    )
    assert (config.limits.admission, config.limits.admission_queue_timeout_s) == ("refuse", 30.0)
    assert config.limits.admission_queue_max == 16
    assert config.model == ModelSection(
        engine="onnx", device="auto", dir="", cache_dir="", default_voice="jf_gongitsune", threads=0
    )
    assert config.resolved_model_dir is None
    assert config.pipeline == PipelineSection(
        max_queued_per_context=4,
        first_clause_min_words=4,
        max_segment_chars=300,
        max_batch=0,
        max_batch_frames=12000,
        batch_linger_ms=4.0,
        encoder_threads=0,
    )
    assert config.audio == AudioSection(opus_bitrate=0, opus_complexity=5)


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc,unused-ignore]


def test_file_values_are_read_and_the_rest_stay_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        host = "0.0.0.0"
        port = 9000
        shutdown_grace_s = 2.5
        log_level = "debug"

        [limits]
        idle_timeout_s = 60        # an int is fine for a float key
        max_connections = 8

        [model]
        cache_dir = "/var/cache/speakd"
        default_voice = "jm_kumo"
        threads = 4

        [pipeline]
        first_clause_min_words = 0

        [audio]
        opus_bitrate = 24000
        opus_complexity = 10
        """,
    )
    config = load_config(path)
    assert config.server == ServerSection(host="0.0.0.0", port=9000, shutdown_grace_s=2.5, log_level="debug")
    assert config.limits == dataclasses.replace(LimitsSection(), idle_timeout_s=60.0, max_connections=8)
    assert isinstance(config.limits.idle_timeout_s, float)
    assert config.model == ModelSection(
        engine="onnx", cache_dir="/var/cache/speakd", default_voice="jm_kumo", threads=4
    )
    assert config.pipeline == dataclasses.replace(PipelineSection(), first_clause_min_words=0)
    assert config.audio == AudioSection(opus_bitrate=24000, opus_complexity=10)
    assert config.resolved_cache_dir == Path("/var/cache/speakd")


def test_overrides_win_over_file_and_none_means_not_given(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 9000\nhost = "::1"\n[model]\nthreads = 2\n')
    config = load_config(
        path, {"server.port": 9100, "server.host": None, "model.threads": None, "server.log_level": "error"}
    )
    assert config.server.port == 9100
    assert config.server.host == "::1"
    assert config.server.log_level == "error"
    assert config.model.threads == 2


def test_overrides_without_file() -> None:
    config = load_config(None, {"model.default_voice": "af_heart", "pipeline.max_queued_per_context": 4})
    assert config.model.default_voice == "af_heart"
    assert config.pipeline.max_queued_per_context == 4
    assert config.server == ServerSection()


def test_speakd_config_env_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[server]\nport = 4242\n")
    monkeypatch.setenv("SPEAKD_CONFIG", str(path))
    assert load_config().server.port == 4242
    other = tmp_path / "other.toml"
    other.write_text("[server]\nport = 4343\n", encoding="utf-8")
    assert load_config(other).server.port == 4343  # an explicit path beats the environment


def test_speakd_config_env_pointing_nowhere_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope.toml"
    monkeypatch.setenv("SPEAKD_CONFIG", str(missing))
    assert str(missing) in error_of()


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    message = error_of(missing)
    assert str(missing) in message
    assert "does not exist" in message


def test_unreadable_path_is_a_config_error(tmp_path: Path) -> None:
    assert str(tmp_path) in error_of(tmp_path)  # a directory, not a file


def test_invalid_toml_is_chained(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not valid TOML" in str(info.value)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, tomllib.TOMLDecodeError)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[model]\ndefault_voice = "\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert isinstance(info.value.__cause__, UnicodeDecodeError)


def test_config_error_is_a_speakd_error() -> None:
    assert issubclass(ConfigError, SpeakdError)


def test_unknown_section_suggests_the_close_one(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[sever]\nport = 1\n"))
    assert "unknown section [sever]" in message
    assert "did you mean 'server'?" in message


def test_unknown_section_without_close_match_lists_sections(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[tls]\ncert = 'x'\n"))
    assert "unknown section [tls]" in message
    assert "server, limits, model, pipeline, audio" in message


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nmax_conections = 3\n")
    message = error_of(path)
    assert message.startswith(f"{path}: ")
    assert "unknown key 'limits.max_conections'" in message
    assert "did you mean 'limits.max_connections'?" in message


def test_key_in_the_wrong_section_points_to_the_right_one(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[limits]\nport = 3\n"))
    assert "unknown key 'limits.port'; did you mean 'server.port'?" in message


def test_unknown_key_without_close_match_lists_the_section(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[audio]\nzzz = 3\n"))
    assert "unknown key 'audio.zzz'" in message
    assert "opus_bitrate, opus_complexity" in message


def test_unknown_override_key() -> None:
    assert "did you mean 'server.port'?" in error_of(overrides={"server.prot": 1})
    assert "unknown section 'sevrer'" in error_of(overrides={"sevrer.port": 1})


def test_top_level_value_instead_of_table(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "server = 1\n"))
    assert "server must be a table" in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("server.port", True, "an integer, got bool True"),
        ("server.port", "8080", "an integer, got str '8080'"),
        ("server.port", 80.0, "an integer, got float 80.0"),
        ("model.threads", False, "an integer, got bool False"),
        ("server.shutdown_grace_s", True, "a finite number, got bool True"),
        ("server.shutdown_grace_s", "1", "a finite number, got str '1'"),
        ("limits.idle_timeout_s", float("inf"), "a finite number, got float inf"),
        ("limits.send_timeout_s", float("nan"), "a finite number, got float nan"),
        ("server.host", 1, "a string, got int 1"),
        ("model.default_voice", ["a"], "a string, got list ['a']"),
    ],
)
def test_wrong_type_names_key_and_expected_type(key: str, value: object, expected: str) -> None:
    assert error_of(overrides={key: value}) == f"{key} must be {expected}"


def test_admission_modes_from_a_file_and_their_wrong_types(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[limits]\nadmission = "queue"\nadmission_queue_timeout_s = 5\nadmission_queue_max = 2\n'
    )
    limits = load_config(path).limits
    assert (limits.admission, limits.admission_queue_timeout_s, limits.admission_queue_max) == (
        "queue",
        5.0,
        2,
    )
    assert error_of(overrides={"limits.admission": "later"}) == (
        "limits.admission must be one of 'refuse', 'queue', got 'later'"
    )
    assert (
        error_of(overrides={"limits.admission": True}) == "limits.admission must be a string, got bool True"
    )
    assert error_of(overrides={"limits.admission_queue_max": 2.5}).startswith(
        "limits.admission_queue_max must be an integer"
    )
    assert error_of(overrides={"limits.admission_queue_timeout_s": 0}) == (
        "limits.admission_queue_timeout_s must be greater than 0, got 0.0"
    )


def test_bool_in_file_is_not_an_int(tmp_path: Path) -> None:
    path = write(tmp_path, "[audio]\nopus_complexity = true\n")
    assert error_of(path) == f"{path}: audio.opus_complexity must be an integer, got bool True"


def test_int_accepted_for_float_override() -> None:
    assert load_config(None, {"server.shutdown_grace_s": 0}).server.shutdown_grace_s == 0.0


@pytest.mark.parametrize(
    ("key", "bad", "good"),
    [
        ("server.port", -1, 0),
        ("server.port", 65536, 65535),
        ("server.host", "", "localhost"),
        ("server.shutdown_grace_s", -0.5, 0.0),
        ("server.log_level", "verbose", "warning"),
        ("server.log_level", "INFO", "info"),
        ("limits.max_message_bytes", 0, 1),
        ("limits.max_buffered_text_chars", -5, 1),
        ("limits.max_contexts_per_connection", 0, 1),
        ("limits.max_connections", 0, 1),
        ("limits.idle_timeout_s", 0.0, 0.1),
        ("limits.max_outbound_bytes", 0, 1),
        ("limits.send_timeout_s", -1.0, 0.5),
        ("limits.admission", "wait", "queue"),
        ("limits.admission", "Queue", "refuse"),
        ("limits.admission_queue_timeout_s", 0.0, 0.5),
        ("limits.admission_queue_timeout_s", -1.0, 120.0),
        ("limits.admission_queue_max", 0, 1),
        ("limits.admission_queue_max", -3, 1000),
        ("model.engine", "tensorrt", "torch"),
        ("model.default_voice", "", "af_heart"),
        ("model.threads", -1, 0),
        ("model.precision", "half", "fp16"),
        ("model.precision", "FP32", "bf16"),
        ("pipeline.max_queued_per_context", 0, 1),
        ("pipeline.first_clause_min_words", -1, 0),
        ("pipeline.max_segment_chars", 0, 1),
        ("pipeline.max_batch", -1, 0),
        ("pipeline.max_batch", 1025, 1024),
        ("pipeline.max_batch_frames", 0, 1),
        ("pipeline.batch_linger_ms", -1.0, 0.0),
        ("pipeline.batch_linger_ms", 1000.5, 1000.0),
        ("pipeline.encoder_threads", -1, 0),
        ("pipeline.encoder_threads", 65, 64),
        ("audio.opus_bitrate", 5999, 6000),
        ("audio.opus_bitrate", 510001, 510000),
        ("audio.opus_bitrate", -1, 0),
        ("audio.opus_complexity", 11, 10),
        ("audio.opus_complexity", -1, 0),
    ],
)
def test_range_is_checked(key: str, bad: object, good: object) -> None:
    message = error_of(overrides={key: bad})
    assert message.startswith(f"{key} must be ")
    assert message.endswith(f"got {bad!r}")
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, {key: good}), section), name) == good


def test_range_message_says_what_is_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 70000\n")
    assert (
        error_of(path) == f"{path}: server.port must be between 0 and 65535 (0 picks a free port), got 70000"
    )
    assert (
        error_of(overrides={"model.engine": "gpu"})
        == "model.engine must be one of 'auto', 'onnx', 'torch', got 'gpu'"
    )
    assert "'debug', 'info', 'warning', 'error'" in error_of(overrides={"server.log_level": "loud"})


def test_values_in_messages_are_shortened_only_when_very_long() -> None:
    path_like = "/srv/models/" + "kokoro-82m-" * 9  # a path must not lose its middle
    assert error_of(overrides={"server.log_level": path_like}).endswith(f"got {path_like!r}")
    message = error_of(overrides={"server.log_level": "x" * 10000})
    assert "..." in message and len(message) < 300


def test_bad_override_does_not_hide_behind_a_good_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9000\n")
    assert error_of(path, {"server.port": -3}).startswith("server.port must be")


def test_default_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "speakd"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "speakd"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "speakd"
    monkeypatch.setenv("SPEAKD_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"


def test_resolved_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPEAKD_CACHE_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Config().resolved_cache_dir == tmp_path / "env"
    assert (
        load_config(None, {"model.cache_dir": "~/models"}).resolved_cache_dir == tmp_path / "home" / "models"
    )


def test_example_file_lists_every_key_and_loads_as_the_defaults() -> None:
    with EXAMPLE.open("rb") as file:
        example = tomllib.load(file)
    expected = {
        section.name: {key.name for key in dataclasses.fields(getattr(Config(), section.name))}
        for section in dataclasses.fields(Config)
    }
    assert {section: set(table) for section, table in example.items()} == expected
    assert load_config(EXAMPLE) == Config()


def test_max_batch_zero_is_the_engines_choice() -> None:
    assert load_config(None).pipeline.max_batch == 0
    assert default_max_batch("onnx", "cpu") == 1  # ONNX Runtime on a CPU: batches only add padding
    assert default_max_batch("torch", "cpu") == 1  # compute-bound on a CPU: batches only add padding
    assert default_max_batch("torch", "cuda") == 64
    assert default_max_batch("torch", "cuda:1") == 64


def test_auth_and_openai_sections_take_lists_booleans_and_tables(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[auth]
token_file = "/etc/speakd/tokens"
allowed_origins = ["https://chat.example.com", "*"]
allow_unauthenticated = true

[openai]
voices = { alloy = "jf_alpha" }
""",
    )
    config = load_config(path)
    assert config.auth.allowed_origins == ("https://chat.example.com", "*")
    assert config.auth.allow_unauthenticated is True
    assert config.openai.voices == {"alloy": "jf_alpha"}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("auth.allow_unauthenticated", 1, "must be true or false"),
        ("auth.allowed_origins", "https://a.example", "must be a list of strings"),
        ("auth.allowed_origins", [""], "a list of origins"),
        ("openai.voices", {"alloy": 3}, "must be a table of strings"),
        ("openai.max_body_bytes", 10, "at least 1024"),
    ],
)
def test_new_value_types_are_checked(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {key: value})
