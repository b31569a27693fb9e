"""Build the carry set: the wheels bench/gpu_run.sh installs on a bare GPU machine.

Usage: .venv/bin/python bench/gpu_carry.py [--out DIR] [--python-version 3.12] [--budget-mib 56]
       python3 bench/gpu_carry.py --check [--out DIR]   (is DIR's speakd wheel built from this tree?)

The GPU machine has Python, PyTorch (CUDA), numpy, transformers and huggingface_hub, but none of speakd's
other dependencies, no network, and at most 64 MiB of files carried to it, repository included. So this
writes, into DIR (default .carry/ in the repository root): a wheel of speakd built from this tree, and the
wheels of the torch engine's import closure at the versions pinned in constraints.txt: kokoro's model
modules (without kokoro's text side: no misaki, spaCy or phonemizer, see server/engines/kokoro/modules.py) and
what they and transformers import, found by importing the engine in a venv holding only torch. The
machine's own packages come first on its sys.path; the carried ones only fill the gaps.

Fast when already built: wheels already there are kept, stale ones removed, speakd's wheel rebuilt only
when its sources change. Fails if the set outgrows the budget (the rest of the 64 MiB is the working tree).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from packaging.tags import Tag

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"

# The torch engine's import closure besides torch (and torch's own dependencies, such as filelock),
# found empirically in a venv holding only torch: build KModel, run it, import speakd.server's torch side.
CLOSURE = (
    "kokoro",  # model.py, istftnet.py, modules.py, custom_stft.py: KModel and the iSTFTNet decoder
    "transformers",  # AlbertModel for KModel's phoneme encoder
    "huggingface_hub",  # kokoro.model imports hf_hub_download; transformers imports it too
    "loguru",  # kokoro's logger
    "attrs",  # kokoro/custom_stft.py: `from attr import attr`
    "numpy",  # speakd.server, transformers
    # transformers' import-time requirements (it checks their installed versions, too)
    "packaging",
    "regex",
    "tqdm",
    "PyYAML",
    "safetensors",
    # huggingface_hub's HTTP client, imported at import time even offline
    "httpx2",
    "httpcore2",
    "h11",
    "idna",
    "truststore",
)

# What the GPU machine's pip accepts for a CPython wheel (glibc 2.28 or newer, x86_64).
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)

_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
SPEAKD_WHEEL = f"speakd-{_VERSION}-py3-none-any.whl"  # the name setuptools gives it (checked after a build)
SPEAKD_SOURCES = ("pyproject.toml", "README.md", "protocol", "server", "client")
PACKAGED = ("py.typed", "README.md")  # the package data pyproject.toml ships, besides the .py files
SPEAKD_STAMP = ".speakd-sources.sha256"  # in DIR: the sources SPEAKD_WHEEL was built from
BUILD_COMMAND = ".venv/bin/python bench/gpu_carry.py (in the repository, where PyPI is reachable)"

DEFAULT_BUDGET_MIB = 56.0
MIB = 1024 * 1024


class CarryError(Exception):
    pass


def pins(names: Iterable[str], constraints: Path = CONSTRAINTS) -> dict[str, str]:
    """Canonical name → pinned version, for each of `names`, from constraints.txt."""
    from packaging.utils import canonicalize_name

    pinned: dict[str, str] = {}
    for line in constraints.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)\s*(?:#.*)?", line)
        if match:
            pinned[canonicalize_name(match[1])] = match[2]
    wanted = {canonicalize_name(name): name for name in names}
    missing = sorted(name for key, name in wanted.items() if key not in pinned)
    if missing:
        raise CarryError(f"{constraints.name} pins no version of: {', '.join(missing)}")
    return {key: pinned[key] for key in wanted}


def target_tags(python_version: str, platforms: Iterable[str]) -> set[Tag]:
    """Every tag a CPython `python_version` on `platforms` installs, as pip computes them."""
    from packaging.tags import compatible_tags, cpython_tags

    version = tuple(int(part) for part in python_version.split("."))
    platforms = list(platforms)
    return set(cpython_tags(version, platforms=platforms)) | set(
        compatible_tags(version, interpreter=f"cp{version[0]}{version[1]}", platforms=platforms)
    )


def _quiet_run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise CarryError(f"{what} failed ({' '.join(command)}):\n{output}")


def speakd_sources(root: Path = ROOT) -> list[Path]:
    """The files speakd's wheel is built from (the .py files, py.typed and README.md of each package)."""
    files: list[Path] = []
    for name in SPEAKD_SOURCES:
        top = root / name
        if top.is_file():
            files.append(top)
            continue
        for path in sorted(top.rglob("*")):
            if (
                path.is_file()
                and "__pycache__" not in path.parts
                and (path.suffix == ".py" or path.name in PACKAGED)
            ):
                files.append(path)
    return files


def sources_digest(root: Path = ROOT) -> str:
    """sha256 over speakd's packaged sources, paths and contents."""
    digest = hashlib.sha256()
    for path in speakd_sources(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def check(out: Path) -> None:
    """Raise CarryError unless `out` holds speakd's wheel built from this tree's sources (stdlib only:
    bench/gpu_run.sh runs this on the GPU machine before installing)."""
    stamp = out / SPEAKD_STAMP
    if not (out / SPEAKD_WHEEL).is_file() or not stamp.is_file():
        raise CarryError(f"{out} holds no speakd wheel: build the carry set with {BUILD_COMMAND}")
    if stamp.read_text().strip() != sources_digest():
        raise CarryError(
            f"{out / SPEAKD_WHEEL} was built from other sources than this tree's: "
            f"rebuild it with {BUILD_COMMAND}"
        )


def build_speakd(out: Path) -> bool:
    """Build speakd's wheel into `out` unless it is there from the same sources; True if built.

    Built from a copy of the sources, so a stale build/ in the tree cannot leak old modules into it."""
    digest = sources_digest()
    stamp = out / SPEAKD_STAMP
    wheel = out / SPEAKD_WHEEL
    if wheel.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return False
    stamp.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="speakd-wheel-") as temp:
        source = Path(temp) / "src"
        source.mkdir()
        for path in speakd_sources():
            copy = source / path.relative_to(ROOT)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, copy)
        built = Path(temp) / "dist"
        command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(built), str(source)]
        _quiet_run(command, "building speakd's wheel")
        wheels = list(built.glob("*.whl"))
        if [w.name for w in wheels] != [SPEAKD_WHEEL]:
            raise CarryError(f"expected {SPEAKD_WHEEL} from the build, got {[w.name for w in wheels]}")
        shutil.copy2(wheels[0], wheel)
    stamp.write_text(digest + "\n")
    return True


def download(out: Path, wanted: dict[str, str], tags: set[Tag], python_version: str) -> list[str]:
    """Download the wheels of `wanted` (canonical name → version) that `out` lacks; remove stale wheels.
    Returns the requirements downloaded."""
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version

    kept: dict[str, list[Path]] = {}
    for path in sorted(out.glob("*.whl")):
        if path.name == SPEAKD_WHEEL:
            continue
        try:
            name, version, _, wheel_tags = parse_wheel_filename(path.name)
        except ValueError:
            name, version, wheel_tags = canonicalize_name(path.stem), None, frozenset()
        if name in wanted and version == Version(wanted[name]) and wheel_tags & tags:
            kept.setdefault(name, []).append(path)
        else:
            print(f"gpu_carry: removing stale {path.name}", file=sys.stderr)
            path.unlink()
    for paths in kept.values():
        if len(paths) > 1:  # two builds of one pin: keep neither, fetch one afresh
            for path in paths:
                path.unlink()
    missing = [f"{name}=={version}" for name, version in wanted.items() if len(kept.get(name, ())) != 1]
    if missing:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        command += ["--python-version", python_version, "--implementation", "cp"]
        for platform in PLATFORMS:
            command += ["--platform", platform]
        command += ["-d", str(out), *missing]
        _quiet_run(command, "downloading wheels")
    return missing


def build(out: Path, python_version: str, budget_mib: float) -> int:
    """Build the carry set into `out`; returns its size in bytes. Raises CarryError."""
    from packaging.utils import canonicalize_name, parse_wheel_filename

    out.mkdir(parents=True, exist_ok=True)
    wanted = pins(CLOSURE)
    tags = target_tags(python_version, PLATFORMS)
    if build_speakd(out):
        print(f"gpu_carry: built {SPEAKD_WHEEL}", file=sys.stderr)
    fetched = download(out, wanted, tags, python_version)
    if fetched:
        print(f"gpu_carry: downloaded {', '.join(fetched)}", file=sys.stderr)
    wheels = sorted(out.glob("*.whl"))
    # Check what is there, not what pip said: one wheel per pin, each installable on the target.
    names = sorted(parse_wheel_filename(w.name)[0] for w in wheels)
    expected = sorted([*wanted, canonicalize_name("speakd")])
    if names != expected:
        raise CarryError(f"{out} holds wheels of {names}, expected {expected}")
    for wheel in wheels:
        if not parse_wheel_filename(wheel.name)[3] & tags:
            raise CarryError(f"{wheel.name} does not install on CPython {python_version} ({PLATFORMS[0]})")
    others = [p.name for p in out.iterdir() if p.suffix != ".whl" and p.name != SPEAKD_STAMP]
    if others:
        print(f"gpu_carry: warning: {out} also holds {others}; they travel too", file=sys.stderr)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    for wheel in wheels:
        print(f"{wheel.stat().st_size / MIB:8.2f} MiB  {wheel.name}")
    print(f"{total / MIB:8.2f} MiB  total in {out} ({len(wheels)} wheels, CPython {python_version})")
    if total > budget_mib * MIB:
        raise CarryError(
            f"the carry set is {total / MIB:.1f} MiB, over its budget of {budget_mib:g} MiB: the device "
            "takes at most 64 MiB of carried files, the working tree included"
        )
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / ".carry", help="directory (default: .carry/)")
    parser.add_argument(
        "--python-version", default="3.12", help="the GPU machine's Python, MAJOR.MINOR (default: 3.12)"
    )
    parser.add_argument(
        "--budget-mib", type=float, default=DEFAULT_BUDGET_MIB, help="fail above this size (default: 56)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="build nothing: fail unless DIR's speakd wheel was built from this tree (stdlib only)",
    )
    args = parser.parse_args(argv)
    if args.check:
        try:
            check(args.out)
        except CarryError as exc:
            print(f"gpu_carry: error: {exc}", file=sys.stderr)
            return 1
        return 0
    if not re.fullmatch(r"3\.\d+", args.python_version):
        parser.error(f"--python-version must be 3.N, not {args.python_version!r}")
    try:
        build(args.out, args.python_version, args.budget_mib)
    except CarryError as exc:
        print(f"gpu_carry: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
