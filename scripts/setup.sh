#!/usr/bin/env bash
# Prepare a fresh Debian/Ubuntu machine for speakd: system libraries, a venv, pinned packages.
# Usage: scripts/setup.sh [extra]   (extra: "client" or "test"; idempotent, fast when already done)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-client}"

need_libs=()
# No `grep -q`: it stops reading early, ldconfig dies of SIGPIPE, and pipefail reads that as "missing".
libs=$(ldconfig -p 2>/dev/null || true)
grep 'libopus\.so\.0' >/dev/null <<<"$libs" || need_libs+=(libopus0)
grep 'libportaudio\.so\.2' >/dev/null <<<"$libs" || need_libs+=(libportaudio2)
# The tests put three daemons behind a real HAProxy (tests/test_e2e_haproxy.py).
if [ "$extra" = test ] && ! PATH="$PATH:/usr/sbin" command -v haproxy >/dev/null; then need_libs+=(haproxy); fi
# The browser page's tests drive Debian's chromium through Playwright (tests/test_e2e_browser.py).
if [ "$extra" = test ] && ! command -v chromium >/dev/null; then need_libs+=(chromium); fi
if ((${#need_libs[@]})); then
  echo "setup: installing system libraries: ${need_libs[*]}" >&2
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q "${need_libs[@]}" >/dev/null 2>&1 ||
    { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "${need_libs[@]}" >/dev/null; }
fi

python="${PYTHON:-python3}"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  { echo "setup: speakd needs Python 3.11 or newer ($python is $("$python" --version 2>&1))" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv

stamp=".venv/.speakd-setup-$extra"
inputs=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ]; then
  echo "setup: installing Python packages into .venv ($extra)" >&2
  pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
  # misaki[en] pulls torch in through spaCy; pin the CPU build first so pip never fetches a CUDA one.
  torch_source=()
  [ -d /opt/wheels ] || torch_source=(--extra-index-url https://download.pytorch.org/whl/cpu)
  "${pip[@]}" "${torch_source[@]}" -c constraints.txt torch
  "${pip[@]}" -c constraints.txt -e ".[$extra]"
  echo "$inputs" > "$stamp"
fi
