"""The shipped systemd unit: runs `speakd serve` sandboxed, and gives a graceful stop enough time."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import pytest

from speakd.server.config import CACHE_DIR_ENV, CONFIG_ENV, Config

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "speakd.service"

HARDENING = {
    "DynamicUser": "yes",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
}

_TIME_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "ms": 0.001, "h": 3600.0}


def _parser(strict: bool) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=strict, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read(UNIT, encoding="utf-8")
    return parser


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    return _parser(strict=False)


def _environment(unit: configparser.ConfigParser) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(unit["Service"]["Environment"]))


def _seconds(value: str) -> float:
    """A systemd time span such as `30`, `30s`, `1min 30s` or `1.5min`, in seconds."""
    total = 0.0
    for number, suffix in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip()):
        assert suffix in _TIME_UNITS, f"unexpected time unit {suffix!r} in {value!r}"
        total += float(number) * _TIME_UNITS[suffix]
    return total


def test_every_key_appears_once() -> None:
    # configparser keeps only the last of repeated keys when strict=False; make sure none is hidden.
    _parser(strict=True)


def test_sections(unit: configparser.ConfigParser) -> None:
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    assert "network-online.target" in unit["Unit"]["After"].split()
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_execstart_runs_speakd_serve_from_the_install_location(unit: configparser.ConfigParser) -> None:
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv == ["/opt/speakd/.venv/bin/speakd", "serve"]


def test_configuration_and_cache_come_from_the_environment(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    env = _environment(unit)
    assert service["ConfigurationDirectory"] == "speakd"
    assert service["CacheDirectory"] == "speakd"
    assert env[CONFIG_ENV] == "/etc/speakd/speakd.toml"
    assert env[CACHE_DIR_ENV] == "/var/cache/speakd"


def test_restart_and_graceful_stop(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert _seconds(service["RestartSec"]) == 2
    assert service["KillSignal"] == "SIGTERM"
    # aiohttp's own shutdown_timeout is shutdown_grace_s + 5; systemd must not SIGKILL before that.
    assert _seconds(service["TimeoutStopSec"]) >= Config().server.shutdown_grace_s + 5
    # `speakd serve` exits 2 on a configuration error: restarting cannot fix that.
    assert "2" in service.get("RestartPreventExitStatus", "").split()


def test_hardening(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    for key, value in HARDENING.items():
        assert key in service, f"{key}= is missing"
        assert service[key] == value, f"{key}={service[key]}, expected {value!r}"
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert service.get("MemoryDenyWriteExecute", "no") == "no"


def test_logs_go_to_the_journal(unit: configparser.ConfigParser) -> None:
    assert unit["Service"]["StandardError"] == "journal"


@pytest.mark.parametrize("span, seconds", [("30", 30), ("30s", 30), ("1min 30s", 90), ("500ms", 0.5)])
def test_time_span_parsing(span: str, seconds: float) -> None:
    assert _seconds(span) == pytest.approx(seconds)


def test_systemd_waits_for_ready_and_watches_the_event_loop(unit: configparser.ConfigParser) -> None:
    """speakd sends READY=1 after warm-up and WATCHDOG=1 every WatchdogSec / 2 (server/sd_notify.py)."""
    service = unit["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert _seconds(service["WatchdogSec"]) >= 10
    assert _seconds(service["TimeoutStartSec"]) >= 120  # the first start assembles the model cache
    assert "AF_UNIX" in service["RestrictAddressFamilies"].split()  # the notify socket
