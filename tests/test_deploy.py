"""The deployment files in deploy/ against the daemon they deploy: ports, probe paths, metric names, the
drain arithmetic, the CLI arguments and the HAProxy settings. Nothing is started and nothing is fetched."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from speakd.server.app import PUBLIC_PATHS, create_app
from speakd.server.cli import _overrides, _parser
from speakd.server.config import CACHE_DIR_ENV, CONFIG_ENV, MODEL_DIR_ENV, Config, load_config
from speakd.server.errors import ConfigError
from speakd.server.frontends.auth import AccessTokens, check_bind
from speakd.server.frontends.keys import LOADER
from speakd.server.metrics import SpeakdMetrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBE = DEPLOY / "kubernetes"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
DEFAULTS = Config()
# `speakd serve` gives aiohttp shutdown_timeout = shutdown_grace_s + 5 (cli._serve): the time after SIGTERM
# that the daemon may take before it exits, beyond the grace itself.
RUNNER_MARGIN_S = 5.0
# Files in deploy/kubernetes that are not Kubernetes objects, or must not be applied with the rest.
NOT_APPLIED = {"prometheus-adapter-rules.yaml", "secret.example.yaml", "keda-scaledobject.yaml"}
METRIC_REFERENCE = re.compile(r"\bspeakd_[a-z0-9_]*[a-z0-9]")


# --- reading the files ------------------------------------------------------------------------------


def _documents(name: str) -> list[dict[str, Any]]:
    with (KUBE / name).open(encoding="utf-8") as file:
        documents = [doc for doc in yaml.safe_load_all(file) if doc is not None]
    assert documents, f"{name} holds no YAML document"
    for doc in documents:
        assert isinstance(doc, dict), f"{name}: a document is not a mapping"
    return documents


def _object(name: str, kind: str) -> dict[str, Any]:
    matches = [doc for doc in _documents(name) if doc.get("kind") == kind]
    assert len(matches) == 1, f"{name}: expected one {kind}, found {len(matches)}"
    return matches[0]


def _by_name(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    matches = [item for item in items if item.get("name") == name]
    assert len(matches) == 1, f"expected one entry named {name!r} in {[i.get('name') for i in items]}"
    return matches[0]


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return _object("deployment.yaml", "Deployment")


@pytest.fixture(scope="module")
def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.fixture(scope="module")
def http_port(container: dict[str, Any]) -> dict[str, Any]:
    return _by_name(container["ports"], "http")


@pytest.fixture(scope="module")
def config_toml() -> str:
    data: dict[str, str] = _object("configmap.yaml", "ConfigMap")["data"]
    return data["speakd.toml"]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_config reads $SPEAKD_CONFIG and $SPEAKD_MODEL_DIR: keep the caller's environment out of it."""
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.delenv(MODEL_DIR_ENV, raising=False)


def _deployed_config(config_toml: str, args: list[str], tmp_path: Path) -> Config:
    """The configuration the pod runs with: the ConfigMap's file, then the container's arguments."""
    path = tmp_path / "speakd.toml"
    path.write_text(config_toml, encoding="utf-8")
    return load_config(path, _overrides(_parser().parse_args(args)))


def _mount(container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mount that holds `path`, the deepest if several do."""
    holding = [
        mount
        for mount in container.get("volumeMounts", [])
        if PurePosixPath(path).is_relative_to(PurePosixPath(mount["mountPath"]))
    ]
    assert holding, f"{path} is on no volume mount"
    return max(holding, key=lambda mount: len(PurePosixPath(mount["mountPath"]).parts))


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def _quantity(value: object) -> float:
    """A Kubernetes quantity as used for fractions: 0.7, "0.7" or "700m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _registered_gets() -> set[str]:
    """The GET paths the daemon's app registers, read without starting it (the model loads on start)."""
    app = create_app(DEFAULTS)
    assert LOADER not in app, "create_app must not start loading the model"
    return {
        route.resource.canonical for route in app.router.routes() if route.method == "GET" and route.resource
    }


def _exported_metric_names() -> set[str]:
    """Every name a scrape of the daemon shows: families, and samples such as *_bucket and *_count."""
    names: set[str] = set()
    for line in SpeakdMetrics().registry.render().splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


# --- Kubernetes -------------------------------------------------------------------------------------


def test_every_manifest_parses_and_names_itself() -> None:
    files = sorted(KUBE.glob("*.yaml"))
    assert {"deployment.yaml", "service.yaml", "hpa.yaml", "configmap.yaml"} <= {f.name for f in files}
    for file in files:
        for doc in _documents(file.name):
            if file.name == "prometheus-adapter-rules.yaml":
                assert isinstance(doc.get("rules"), list)
                continue
            assert doc.get("apiVersion") and doc.get("kind"), f"{file.name}: apiVersion and kind"
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], f"{file.name}: metadata.name"


def test_kustomization_applies_the_objects_but_not_the_examples() -> None:
    resources = _object("kustomization.yaml", "Kustomization")["resources"]
    assert {"deployment.yaml", "service.yaml", "configmap.yaml", "hpa.yaml"} <= set(resources)
    assert not NOT_APPLIED & set(resources)
    for resource in resources:
        assert (KUBE / resource).is_file(), resource


def test_container_listens_on_the_daemon_port(container: dict[str, Any], http_port: dict[str, Any]) -> None:
    assert http_port["containerPort"] == DEFAULTS.server.port
    assert http_port.get("protocol", "TCP") == "TCP"


def test_service_targets_the_container_port_by_name(
    deployment: dict[str, Any], http_port: dict[str, Any]
) -> None:
    service = _object("service.yaml", "Service")
    port = _by_name(service["spec"]["ports"], "http")
    assert port["targetPort"] == http_port["name"] == "http"
    assert port["port"] == DEFAULTS.server.port
    assert service["spec"].get("sessionAffinity", "None") == "None"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_probes_hit_public_paths_the_daemon_serves(container: dict[str, Any]) -> None:
    served = _registered_gets()
    expected = {
        "readinessProbe": {"/readyz"},
        "livenessProbe": {"/healthz"},
        "startupProbe": {"/readyz", "/healthz"},
    }
    for probe, paths in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] in paths, f"{probe} checks {get['path']}"
        assert get["path"] in served, f"{probe}: the daemon registers no GET {get['path']}"
        # The kubelet sends no token: a probe of a path that needs one would always fail.
        assert get["path"] in PUBLIC_PATHS, f"{probe}: {get['path']} needs a token"
        assert get["port"] in ("http", DEFAULTS.server.port)
    startup = container["startupProbe"]
    # Room for a first start that assembles the model cache (up to about a minute).
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_grace_period_covers_prestop_and_drain(
    pod: dict[str, Any], container: dict[str, Any], config_toml: str, tmp_path: Path, clean_env: None
) -> None:
    config = _deployed_config(config_toml, container["args"], tmp_path)
    grace = config.server.shutdown_grace_s
    assert grace == tomllib.loads(config_toml)["server"]["shutdown_grace_s"]
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:  # Kubernetes 1.30+: lifecycle.preStop.sleep.seconds
        sleep_s = float(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] in ("sleep", "/bin/sleep") and len(command) == 2, command
        sleep_s = float(command[1])
    assert sleep_s > 0, "preStop must give endpoint removal time to reach the proxies"
    assert pod["terminationGracePeriodSeconds"] >= sleep_s + grace + RUNNER_MARGIN_S


def test_configuration_file_comes_from_the_configmap(pod: dict[str, Any], container: dict[str, Any]) -> None:
    path = _env(container)[CONFIG_ENV]
    mount = _mount(container, path)
    volume = _by_name(pod["volumes"], mount["name"])
    configmap = _object("configmap.yaml", "ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert PurePosixPath(path).relative_to(PurePosixPath(mount["mountPath"])).as_posix() in configmap["data"]


def test_cache_is_on_a_writable_per_pod_volume(pod: dict[str, Any], container: dict[str, Any]) -> None:
    mount = _mount(container, _env(container)[CACHE_DIR_ENV])
    assert not mount.get("readOnly", False)
    assert "emptyDir" in _by_name(pod["volumes"], mount["name"])


def test_args_parse_and_name_a_token_file_from_the_secret(
    pod: dict[str, Any],
    container: dict[str, Any],
    http_port: dict[str, Any],
    config_toml: str,
    tmp_path: Path,
    clean_env: None,
) -> None:
    assert PurePosixPath(container["command"][-1]).name == "speakd"
    args = _parser().parse_args(container["args"])
    assert args.command == "serve"
    config = _deployed_config(config_toml, container["args"], tmp_path)
    assert config.server.port == http_port["containerPort"]
    assert config.server.host == "0.0.0.0"
    # Off loopback the daemon refuses to start without tokens; with the token file it starts.
    assert not config.auth.allow_unauthenticated
    with pytest.raises(ConfigError):
        check_bind(config.server.host, False, config.auth.allow_unauthenticated)
    check_bind(config.server.host, True, config.auth.allow_unauthenticated)

    token_file = PurePosixPath(config.auth.token_file)
    mount = _mount(container, str(token_file))
    secret_volume = _by_name(pod["volumes"], mount["name"])["secret"]
    secret = _object("secret.example.yaml", "Secret")
    assert secret_volume["secretName"] == secret["metadata"]["name"]
    in_volume = token_file.relative_to(PurePosixPath(mount["mountPath"])).as_posix()
    # File in the volume -> key of the Secret: `items` when it picks keys, else every key as is.
    keys = {item["path"]: item["key"] for item in secret_volume.get("items", [])}
    keys = keys or {key: key for key in secret["stringData"]}
    assert in_volume in keys, f"{token_file} is not a file of the Secret volume"
    assert keys[in_volume] in secret["stringData"]
    # speakd warns about plain tokens that other users can read.
    assert secret_volume.get("defaultMode", 0o644) & 0o007 == 0


def test_example_secret_cannot_serve_as_it_is() -> None:
    # Applied unchanged, the daemon must refuse it (exit 2), not run with tokens published in the repository.
    tokens = _object("secret.example.yaml", "Secret")["stringData"]["tokens"]
    with pytest.raises(ConfigError):
        AccessTokens.from_lines(tokens.splitlines())


def test_prometheus_scrape_sends_a_token() -> None:
    monitor = _object("servicemonitor.yaml", "ServiceMonitor")
    [endpoint] = [e for e in monitor["spec"]["endpoints"] if e["port"] == "http"]
    assert endpoint["path"] in _registered_gets()
    # /metrics is not public: with tokens the scrape needs one, from the same Secret.
    assert endpoint["path"] not in PUBLIC_PATHS
    credentials = endpoint["authorization"]["credentials"]
    secret = _object("secret.example.yaml", "Secret")
    assert credentials["name"] == secret["metadata"]["name"]
    assert credentials["key"] in secret["stringData"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        _object("service.yaml", "Service")["metadata"]["labels"].items()
    )


def test_autoscalers_scale_the_deployment_on_speakd_load(deployment: dict[str, Any]) -> None:
    hpa = _object("hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "speakd_load"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 0 < _quantity(metric["pods"]["target"]["averageValue"]) <= 1

    [adapter] = _documents("prometheus-adapter-rules.yaml")
    [rule] = adapter["rules"]
    assert rule["name"]["as"] == "speakd_load"
    assert rule["seriesQuery"].startswith("speakd_load{")
    assert set(rule["resources"]["overrides"]) >= {"namespace", "pod"}

    keda = _object("keda-scaledobject.yaml", "ScaledObject")
    assert keda["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    [trigger] = keda["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert "speakd_load" in trigger["metadata"]["query"]
    # The query names the namespace kustomization.yaml deploys into.
    namespace = _object("kustomization.yaml", "Kustomization")["namespace"]
    assert f'namespace="{namespace}"' in trigger["metadata"]["query"]
    # An average over pods is compared as a Value; an AverageValue target would want the sum.
    if trigger["metadata"]["query"].startswith("avg("):
        assert trigger["metricType"] == "Value"
    assert 0 < float(trigger["metadata"]["threshold"]) <= 1


def _metric_references() -> Iterator[tuple[str, str]]:
    for file in [*sorted(KUBE.glob("*.yaml")), DEPLOY / "README.md"]:
        for name in METRIC_REFERENCE.findall(file.read_text(encoding="utf-8")):
            yield file.name, name


def test_every_metric_named_in_deploy_exists() -> None:
    exported = _exported_metric_names()
    references = list(_metric_references())
    assert ("hpa.yaml", "speakd_load") in references
    missing = sorted({f"{name} ({file})" for file, name in references if name not in exported})
    assert not missing, f"not exported by SpeakdMetrics (server/metrics.py): {', '.join(missing)}"


# --- HAProxy ----------------------------------------------------------------------------------------

_HAPROXY_UNITS = {"us": 1e-6, "ms": 1e-3, "": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _haproxy_seconds(value: str) -> float:
    """An HAProxy time such as `3s`, `1h` or `500` (milliseconds without a unit)."""
    match = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value)
    assert match, f"not an HAProxy time: {value!r}"
    return int(match[1]) * _HAPROXY_UNITS[match[2] or ""]


@pytest.fixture(scope="module")
def haproxy_raw() -> list[str]:
    return HAPROXY_CFG.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def haproxy(haproxy_raw: list[str]) -> list[list[str]]:
    """The configuration's statements as word lists, comments and blank lines dropped."""
    return [line.split("#", 1)[0].split() for line in haproxy_raw if line.split("#", 1)[0].strip()]


def _statements(haproxy: list[list[str]], *words: str) -> list[list[str]]:
    return [s for s in haproxy if s[: len(words)] == list(words)]


def test_haproxy_layout_for_rewriting(haproxy_raw: list[str], haproxy: list[list[str]]) -> None:
    # An end-to-end test rewrites the bind line and the server lines: keep them findable.
    assert len(_statements(haproxy, "bind")) == 1
    server_lines = [line for line in haproxy_raw if line.split("#", 1)[0].split()[:1] == ["server"]]
    assert len(server_lines) >= 2
    for line in server_lines:
        assert line.startswith("    server "), repr(line)


def test_haproxy_servers_are_checked_daemons_on_the_default_port(haproxy: list[list[str]]) -> None:
    servers = _statements(haproxy, "server")
    assert len({s[1] for s in servers}) == len(servers), "server names must be unique"
    for server in servers:
        assert int(server[2].rsplit(":", 1)[1]) == DEFAULTS.server.port, server
        assert "check" in server[3:], server


def test_haproxy_balances_long_sessions_and_follows_readiness(haproxy: list[list[str]]) -> None:
    assert ["mode", "http"] in haproxy
    assert ["balance", "leastconn"] in haproxy
    [httpchk] = _statements(haproxy, "option", "httpchk")
    assert httpchk[2:] == ["GET", "/readyz"]
    assert "/readyz" in _registered_gets() and "/readyz" in PUBLIC_PATHS
    assert ["http-check", "expect", "status", "200"] in haproxy
    # Marking a draining server down must not cut the sessions it is finishing.
    assert not any("shutdown-sessions" in statement for statement in haproxy)
    assert _statements(haproxy, "option", "redispatch")
    [retries] = _statements(haproxy, "retries")
    assert int(retries[1]) >= 1
    [defaults] = _statements(haproxy, "default-server")
    settings = dict(zip(defaults[1::2], defaults[2::2], strict=False))
    # A draining daemon leaves the rotation well within its grace period.
    detection = _haproxy_seconds(settings["inter"]) * int(settings["fall"])
    assert detection <= DEFAULTS.server.shutdown_grace_s
    assert int(settings["rise"]) >= 1


def test_haproxy_timeouts_suit_websockets(haproxy: list[list[str]]) -> None:
    timeouts = {s[1]: _haproxy_seconds(s[2]) for s in _statements(haproxy, "timeout")}
    assert {"connect", "client", "server", "tunnel"} <= set(timeouts)
    # The daemon closes idle connections itself; a shorter tunnel timeout would cut them first.
    assert timeouts["tunnel"] >= DEFAULTS.limits.idle_timeout_s
    assert timeouts["connect"] <= 10


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_accepts_the_file() -> None:
    haproxy = shutil.which("haproxy")
    assert haproxy is not None
    result = subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
