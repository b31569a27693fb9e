"""The bare GPU machine's path, on this CPU: bench/gpu_check.py from the carry set alone.

A fresh venv holding only torch (and torch's own dependencies) stands in for the GPU machine: none of
speakd's text side (misaki, spaCy), no ONNX Runtime, no aiohttp, not even transformers. The carry set
(bench/gpu_carry.py, for this interpreter) goes through bench/gpu_run.sh itself, the command the GPU
machine runs: it installs the set into a directory of its own and runs gpu_check.py on it, offline.
Set SPEAKD_CACHE_DIR to keep the venv (~45 s to build here) and the carry set between runs; the venv is
checked to be bare on every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
# Imported by the daemon or the test tooling, never by the torch engine: must be absent before the carry
# set is installed (transformers comes with the carry set; the GPU machine has its own).
ABSENT = ("misaki", "spacy", "onnxruntime", "aiohttp", "transformers")
SECTIONS = ("smoke", "oracle", "sizes", "overlap", "autocast")
SETUP_TIMEOUT_S = 10 * 60
CHECK_TIMEOUT_S = 15 * 60  # a hang fails the test instead of blocking CI
VENV_STAMP = ".speakd-torch-only"

# The carry set holds manylinux x86_64 wheels: the GPU machine's platform.
pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64", reason="the carry set is for x86_64 Linux"
)


def _run(command: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
    )


def _bare_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would put other packages on the venv's path, offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    # No network on the GPU machine: the hub stays offline, and any other request fails at once.
    env |= {"HF_HUB_OFFLINE": "1", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    return env | extra


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("SPEAKD_CACHE_DIR")
    if configured:
        root = Path(configured) / "gpu-bare"
        root.mkdir(parents=True, exist_ok=True)
        return root
    return tmp_path_factory.mktemp("gpu-bare")


@pytest.fixture(scope="module")
def carry(cache_root: Path) -> Path:
    """The carry set for this interpreter (gpu_carry.py keeps what is already there and up to date)."""
    out = cache_root / f"carry-py{PYTHON_VERSION}"
    command = [sys.executable, str(ROOT / "bench" / "gpu_carry.py"), "--out", str(out)]
    result = _run([*command, "--python-version", PYTHON_VERSION], SETUP_TIMEOUT_S)
    assert result.returncode == 0, _output(result)
    return out


@pytest.fixture(scope="module")
def torch_venv(cache_root: Path) -> Path:
    """A venv with only torch, pinned as scripts/setup.sh pins it; its python."""
    key = hashlib.sha256(CONSTRAINTS.read_bytes() + sys.version.encode()).hexdigest()[:16]
    venv = cache_root / f"torch-venv-{key}"
    python = venv / "bin" / "python"
    if not (venv / VENV_STAMP).is_file():
        shutil.rmtree(venv, ignore_errors=True)
        result = _run([sys.executable, "-m", "venv", str(venv)], SETUP_TIMEOUT_S)
        assert result.returncode == 0, _output(result)
        torch_source = (
            []
            if Path("/opt/wheels").is_dir()
            else ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
        )
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        result = _run([*pip, *torch_source, "-c", str(CONSTRAINTS), "torch"], SETUP_TIMEOUT_S)
        assert result.returncode == 0, _output(result)
        (venv / VENV_STAMP).write_text("torch only\n")
    return python


def _importable(python: Path, names: tuple[str, ...]) -> list[str]:
    """Which of `names` `python` imports (in a bare environment, from a neutral directory)."""
    code = (
        "import importlib, sys\n"
        "ok = []\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    ok.append(name)\n"
        "print(' '.join(ok))\n"
    )
    result = _run([str(python), "-c", code, *names], SETUP_TIMEOUT_S, env=_bare_env(), cwd="/")
    assert result.returncode == 0, _output(result)
    return result.stdout.split()


def test_gpu_check_runs_from_the_carry_set_alone(carry: Path, torch_venv: Path, tmp_path: Path) -> None:
    assert _importable(torch_venv, ("torch",)) == ["torch"]
    assert _importable(torch_venv, ABSENT) == [], "the torch venv must hold torch alone"

    # The very command the GPU machine runs: it checks the carried speakd wheel against this tree,
    # installs the carry set into a directory of its own and runs gpu_check.py with --site.
    site, out = tmp_path / "site", tmp_path / "out"
    env = _bare_env(PYTHON=str(torch_venv), SPEAKD_CARRY=str(carry), SPEAKD_SITE=str(site), OUT=str(out))
    # A generous budget: the sections' shares must not run out on a slow CI machine.
    command = ["bash", "bench/gpu_run.sh", "--device", "cpu", "--quick", "--budget-s", "900"]
    result = _run(command, CHECK_TIMEOUT_S, env=env, cwd=ROOT)
    assert result.returncode == 0, _output(result)
    assert (site / "speakd" / "server").is_dir()
    assert not (site / "misaki").exists() and not (site / "spacy").exists()

    lines = (out / "gpu_check.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    sections = {record["section"]: record for record in records}
    header = sections.pop("header")
    assert header["device"] and header["torch"].startswith("2."), header
    assert sorted(sections) == sorted(SECTIONS), records
    assert {name: record["status"] for name, record in sections.items()} == dict.fromkeys(SECTIONS, "ok")
    assert sections["oracle"]["passed"] is True, sections["oracle"]
    smoke = sections["smoke"]
    # Random weights calibrated to the real model: about 3.3 frames per token, not ~25.
    assert abs(smoke["frames_per_token"] / smoke["frames_per_token_real"] - 1) < 0.1, smoke
    assert smoke["finite"] and 0.5 < smoke["voiced_share"] < 1, smoke
    for mix in sections["oracle"]["tf32_off"].values():
        assert mix["passed"] and mix["harmonic_phase_flips"] == 0, mix
    sizes = sections["sizes"]
    assert [row["size"] for row in sizes["rows"]] == sizes["sizes"] == [1, 2], sizes
    for row in sizes["rows"]:
        assert row["audio_s"] > 1 and row["vocoder_ms"] > 0 and row["audio_s_per_s"] > 0, row
    assert sections["overlap"]["overlap"] > 0, sections["overlap"]
    bf16 = sections["autocast"]["bf16"]
    assert bf16["finite"] and 0 < bf16["max_error_vs_fp32"] < 0.5 and bf16["snr_db_vs_fp32"] > 10, bf16
