"""Daemon configuration: a TOML file plus command-line overrides, validated strictly at startup.

A typo or an out-of-range value stops the daemon with a message naming the key, instead of being
ignored and surfacing later as a confusing runtime failure.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import reprlib
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from speakd.server.engines.kokoro.torch_weights import ModelDir
from speakd.server.engines.kokoro.voices import preferred_voice
from speakd.server.errors import ConfigError

CONFIG_ENV = "SPEAKD_CONFIG"
CACHE_DIR_ENV = "SPEAKD_CACHE_DIR"
MODEL_DIR_ENV = "SPEAKD_MODEL_DIR"
LOG_LEVELS = ("debug", "info", "warning", "error")
# model.engine: "auto" picks torch when PyTorch sees a GPU or model.dir is set, else onnx.
ENGINES = frozenset({"onnx", "torch", "auto"})
# model.device (torch engine only): "auto" picks "cuda" when PyTorch sees a GPU, else "cpu".
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
# model.precision: the torch engine's vocoder in fp32, or under bf16/fp16 autocast.
PRECISIONS = ("fp32", "bf16", "fp16")
# limits.admission: what a context beyond the measured capacity gets (see server/core/admission.py).
ADMISSION_MODES = ("refuse", "queue")
OPUS_MIN_BITRATE = 6000
OPUS_MAX_BITRATE = 510000
# Values in error messages are shortened, but not so much that a path (model.dir) loses its middle.
_SHORT = reprlib.Repr()
_SHORT.maxstring = 160


@dataclass(frozen=True)
class ServerSection:
    """Where the daemon listens and how it stops."""

    host: str = "127.0.0.1"
    port: int = 8765
    shutdown_grace_s: float = 10.0
    log_level: str = "info"


@dataclass(frozen=True)
class LimitsSection:
    """Per-connection and global bounds that keep one client from exhausting the daemon."""

    max_message_bytes: int = 65536
    max_buffered_text_chars: int = 20000
    max_contexts_per_connection: int = 16
    max_connections: int = 256
    idle_timeout_s: float = 300.0
    max_outbound_bytes: int = 4 * 1024 * 1024
    send_timeout_s: float = 10.0
    # The kernel's send buffer per client socket: Linux would otherwise grow it to ~4 MiB for a reader
    # that stalls, on top of speakd's own buffer.
    socket_send_buffer_bytes: int = 256 * 1024
    # A new context is refused (`overloaded`, with a retry hint) when the streams playing would use
    # more than this share of the real-time capacity measured lately; 0 admits every one.
    admission_headroom: float = 0.85
    # What happens to that context: "refuse" answers at once; "queue" opens it and holds its text until
    # a place frees up (first come, first served), refusing it after admission_queue_timeout_s, or at
    # once when admission_queue_max contexts are already waiting.
    admission: str = "refuse"
    admission_queue_timeout_s: float = 30.0
    admission_queue_max: int = 16


@dataclass(frozen=True)
class ModelSection:
    """Which weights, engine and voice to use; empty dir means the embedded model, empty cache_dir
    `default_cache_dir()`, threads 0 all cores."""

    engine: str = "onnx"
    device: str = "auto"
    dir: str = ""
    cache_dir: str = ""
    default_voice: str = "jf_gongitsune"
    threads: int = 0
    # The torch engine's vocoder under autocast: "bf16" or "fp16" (its error: bench/gpu_check.py).
    precision: str = "fp32"

    def __post_init__(self) -> None:
        # Checked here rather than in _RULES because it spans two keys, and so no Config can hold it.
        if self.dir and self.engine == "onnx":
            raise ConfigError(
                f"model.engine 'onnx' cannot run the weights in model.dir {self.dir!r}: they are a PyTorch "
                "checkpoint, which only the torch engine runs; set model.engine to 'torch' or 'auto', "
                "or leave it unset"
            )


@dataclass(frozen=True)
class PipelineSection:
    """Queue bounds and segmentation knobs trading first-audio latency against prosody."""

    max_queued_per_context: int = 4
    first_clause_min_words: int = 4
    max_segment_chars: int = 300
    # Acoustic and vocoder batches across contexts: 0 = the engine's choice (64 for torch on a GPU, 1 on a
    # CPU, where batches only add padding).
    max_batch: int = 0
    max_batch_frames: int = 12000  # padded frames per batch (x largest item): bounds (GPU) memory
    batch_linger_ms: float = 4.0  # wait for batch-mates; never for a context's first segment
    encoder_threads: int = 0  # Opus encoder threads; 0 = min(4, cores)


@dataclass(frozen=True)
class AudioSection:
    """Opus encoder settings; bitrate 0 picks one per sample rate."""

    opus_bitrate: int = 0
    opus_complexity: int = 5


@dataclass(frozen=True)
class OpenAISection:
    """The OpenAI-compatible speech API: request bounds, and OpenAI voice names mapped to ours."""

    max_input_chars: int = 4096
    max_body_bytes: int = 65536
    # OpenAI voice name -> speakd voice, e.g. {alloy = "af_alloy"}; names not here resolve as the
    # README says (a voice of the model named *_<name>, else the default voice).
    voices: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AuthSection:
    """Access tokens and the browser Origin allow-list; see frontends/auth.py."""

    token_file: str = ""
    allowed_origins: tuple[str, ...] = ()
    # Listen on a non-loopback address with no token: only when something in front authenticates.
    allow_unauthenticated: bool = False


def parse_listen(value: str) -> tuple[str, int]:
    """`[HOST:]PORT` (IPv6 hosts in brackets) as (host, port); the host defaults to loopback."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]") if sep else "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535 or (sep and not host):
        raise ValueError(f"{value!r} is not [HOST:]PORT")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WyomingSection:
    """Home Assistant's Wyoming protocol on a TCP port of its own: off unless `listen` is set (another
    Wyoming server may hold 10200, the usual port). Wyoming has no authentication, so an address other
    than loopback needs allow_remote."""

    listen: str = ""  # "[HOST:]PORT"; the host defaults to 127.0.0.1
    allow_remote: bool = False
    # Announce the door over mDNS (_wyoming._tcp.local.) so Home Assistant discovers it.
    zeroconf: bool = False
    zeroconf_name: str = ""  # the service name; "" = "speakd on <host name>"

    def __post_init__(self) -> None:
        host = parse_listen(self.listen)[0] if self.listen else ""
        if self.listen and not self.allow_remote and not is_loopback(host):
            raise ConfigError(
                f"wyoming.listen {self.listen!r} is not a loopback address, and Wyoming has no "
                "authentication: anyone who reaches the port can use it; set wyoming.allow_remote = true "
                "(or --wyoming-allow-remote) to listen there anyway"
            )
        if self.zeroconf and (not self.listen or is_loopback(host)):
            raise ConfigError(
                "wyoming.zeroconf announces the Wyoming door to the local network, so wyoming.listen must "
                'be an address other hosts reach, such as "0.0.0.0:10200"'
            )
        if self.zeroconf and host not in ("0.0.0.0", "::") and ":" in host:
            raise ConfigError(f"wyoming.zeroconf announces IPv4 addresses; {host} is IPv6")


@dataclass(frozen=True)
class Config:
    """The whole configuration; `Config()` is the built-in defaults."""

    server: ServerSection = field(default_factory=ServerSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    model: ModelSection = field(default_factory=ModelSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    audio: AudioSection = field(default_factory=AudioSection)
    openai: OpenAISection = field(default_factory=OpenAISection)
    auth: AuthSection = field(default_factory=AuthSection)
    wyoming: WyomingSection = field(default_factory=WyomingSection)

    @property
    def resolved_cache_dir(self) -> Path:
        """model.cache_dir with `~` expanded, or `default_cache_dir()` when it is empty."""
        return Path(self.model.cache_dir).expanduser() if self.model.cache_dir else default_cache_dir()

    @property
    def resolved_model_dir(self) -> Path | None:
        """model.dir with `~` expanded, or None for the embedded model."""
        return Path(self.model.dir).expanduser() if self.model.dir else None


def default_cache_dir() -> Path:
    """$SPEAKD_CACHE_DIR, else $XDG_CACHE_HOME/speakd (if absolute, as XDG asks), else ~/.cache/speakd."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "speakd"
    return Path.home() / ".cache" / "speakd"


# Section name -> section class, and section name -> {key: declared type}, both taken from the dataclasses
# so that adding a field is all it takes to accept a new key.
_SECTIONS: dict[str, type[Any]] = {f.name: get_type_hints(Config)[f.name] for f in fields(Config)}
_KEY_TYPES: dict[str, dict[str, type[Any]]] = {name: get_type_hints(cls) for name, cls in _SECTIONS.items()}
_TYPE_NAMES: dict[Any, str] = {
    str: "a string",
    int: "an integer",
    float: "a finite number",
    bool: "true or false",
    tuple[str, ...]: "a list of strings",
    dict[str, str]: "a table of strings",
}


def _conform(value: object, expected: Any) -> object | None:
    """`value` as the declared type (a list becomes a tuple, an int a float), or None if it is not one."""
    if expected is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if expected is float and isinstance(value, int):
        value = float(value)
    if expected == tuple[str, ...]:
        if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
            return tuple(value)
        return None
    if expected == dict[str, str]:
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            return {str(k): str(v) for k, v in value.items()}
        return None
    if not isinstance(value, expected) or (isinstance(value, float) and not math.isfinite(value)):
        return None
    conformed: object = value
    return conformed


def _positive(value: Any) -> bool:
    return bool(value > 0)


def _non_negative(value: Any) -> bool:
    return bool(value >= 0)


def _non_empty(value: Any) -> bool:
    return bool(value != "")


def _listen_ok(value: Any) -> bool:
    if value == "":
        return True
    try:
        parse_listen(value)
    except ValueError:
        return False
    return True


_Rule = tuple[Callable[[Any], bool], str]
_POSITIVE: _Rule = (_positive, "greater than 0")
_RULES: dict[str, _Rule] = {
    "server.host": (_non_empty, "a non-empty string"),
    "server.port": (lambda v: 0 <= v <= 65535, "between 0 and 65535 (0 picks a free port)"),
    "server.shutdown_grace_s": (_non_negative, "at least 0"),
    "server.log_level": (lambda v: v in LOG_LEVELS, f"one of {', '.join(map(repr, LOG_LEVELS))}"),
    **{f"limits.{key}": _POSITIVE for key in _KEY_TYPES["limits"]},
    "limits.admission_headroom": (lambda v: 0 <= v <= 4, "between 0 (admit every stream) and 4"),
    "limits.admission": (lambda v: v in ADMISSION_MODES, f"one of {', '.join(map(repr, ADMISSION_MODES))}"),
    "model.engine": (lambda v: v in ENGINES, f"one of {', '.join(map(repr, sorted(ENGINES)))}"),
    "model.device": (
        lambda v: DEVICE_PATTERN.fullmatch(v) is not None,
        "'auto', 'cpu', 'cuda' or 'cuda:N'",
    ),
    "model.dir": (
        lambda v: v == "" or Path(v).expanduser().is_dir(),
        'an existing directory ("" for the embedded model)',
    ),
    "model.default_voice": (_non_empty, "a non-empty string"),
    "model.threads": (_non_negative, "at least 0 (0 = all cores)"),
    "model.precision": (lambda v: v in PRECISIONS, f"one of {', '.join(map(repr, PRECISIONS))}"),
    "pipeline.max_queued_per_context": _POSITIVE,
    "pipeline.first_clause_min_words": (_non_negative, "at least 0"),
    "pipeline.max_segment_chars": _POSITIVE,
    "pipeline.max_batch": (lambda v: 0 <= v <= 1024, "between 0 (the engine's choice) and 1024"),
    "pipeline.max_batch_frames": _POSITIVE,
    "pipeline.batch_linger_ms": (lambda v: 0 <= v <= 1000, "between 0 and 1000"),
    "pipeline.encoder_threads": (lambda v: 0 <= v <= 64, "between 0 (automatic) and 64"),
    "audio.opus_bitrate": (
        lambda v: v == 0 or OPUS_MIN_BITRATE <= v <= OPUS_MAX_BITRATE,
        f"0 (automatic) or between {OPUS_MIN_BITRATE} and {OPUS_MAX_BITRATE}",
    ),
    "audio.opus_complexity": (lambda v: 0 <= v <= 10, "between 0 and 10"),
    "openai.max_input_chars": _POSITIVE,
    "openai.max_body_bytes": (lambda v: v >= 1024, "at least 1024"),
    "openai.voices": (lambda v: all(k and t for k, t in v.items()), "a table of non-empty voice names"),
    "auth.allowed_origins": (lambda v: all(v), "a list of origins such as 'https://chat.example.com' or '*'"),
    "wyoming.listen": (_listen_ok, '"" (off) or [HOST:]PORT, such as "10200" or "0.0.0.0:10200"'),
}


def load_config(path: Path | None = None, overrides: Mapping[str, object] | None = None) -> Config:
    """Defaults, then the TOML file, then `overrides`; raises `ConfigError` on anything questionable.

    With `path` None, the file named by $SPEAKD_CONFIG is read if that is set, else none. `overrides`
    maps dotted keys ("server.port") to values; None values are skipped, so argparse options left
    unset (default None) do not override the file. model.dir, when neither sets it, comes from
    $SPEAKD_MODEL_DIR; a model.dir is checked at once (`ModelError` for a bad layout) and changes two
    defaults, see `_model_dir_defaults`.
    """
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    values: dict[str, dict[str, object]] = {section: {} for section in _SECTIONS}
    if path is not None:
        for dotted, value in _read_file(path).items():
            _apply(values, dotted, value, f"{path}: ")
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _apply(values, dotted, value, "")
    if "dir" not in values["model"] and os.environ.get(MODEL_DIR_ENV):
        _apply(values, "model.dir", os.environ[MODEL_DIR_ENV], f"${MODEL_DIR_ENV}: ")
    if values["model"].get("dir"):
        _model_dir_defaults(values["model"])
    sections: dict[str, Any] = {name: cls(**values[name]) for name, cls in _SECTIONS.items()}
    return Config(**sections)


def _model_dir_defaults(model: dict[str, object]) -> None:
    """Defaults for the official weights, for the keys the user left unset: engine "auto" (torch runs
    them), and the model dir's preferred voice instead of the embedded model's jf_gongitsune."""
    model_dir = ModelDir.open(Path(str(model["dir"])).expanduser())
    model.setdefault("engine", "auto")
    model.setdefault("default_voice", preferred_voice(list(model_dir.voices)))


def _read_file(path: Path) -> dict[str, object]:
    """The file's settings as dotted keys; only the section level is checked here."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError as exc:
        raise ConfigError(f"configuration file {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    flat: dict[str, object] = {}
    for section, table in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]{_section_hint(section)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section} must be a table ([{section}]), got {_describe(table)}")
        flat.update({f"{section}.{key}": value for key, value in table.items()})
    return flat


def _apply(values: dict[str, dict[str, object]], dotted: str, value: object, where: str) -> None:
    """Check one setting completely (name, type, range) and store it; `where` prefixes error messages."""
    section, _, key = dotted.partition(".")
    if section not in _SECTIONS:
        raise ConfigError(f"{where}unknown section {section!r}{_section_hint(section)}")
    expected = _KEY_TYPES[section].get(key)
    if expected is None:
        raise ConfigError(f"{where}unknown key {dotted!r}{_key_hint(section, key)}")
    conformed = _conform(value, expected)
    if conformed is None:
        raise ConfigError(f"{where}{dotted} must be {_TYPE_NAMES[expected]}, got {_describe(value)}")
    value = conformed
    rule = _RULES.get(dotted)
    if rule is not None and not rule[0](value):
        raise ConfigError(f"{where}{dotted} must be {rule[1]}, got {_SHORT.repr(value)}")
    values[section][key] = value


def _section_hint(name: str) -> str:
    match = difflib.get_close_matches(name, list(_SECTIONS), n=1)
    return f"; did you mean {match[0]!r}?" if match else f" (sections: {', '.join(_SECTIONS)})"


def _key_hint(section: str, key: str) -> str:
    """The same key in another section, else a close match in this one, else this section's keys."""
    candidates = [f"{other}.{key}" for other, keys in _KEY_TYPES.items() if key in keys]
    candidates += [
        f"{section}.{close}" for close in difflib.get_close_matches(key, list(_KEY_TYPES[section]), n=1)
    ]
    if candidates:
        return f"; did you mean {candidates[0]!r}?"
    return f" (keys of [{section}]: {', '.join(_KEY_TYPES[section])})"


def _describe(value: object) -> str:
    return f"{type(value).__name__} {_SHORT.repr(value)}"
