#!/usr/bin/env bash
# The one command on a bare GPU machine (Python, PyTorch, numpy, transformers; no network), run from the
# repository root: installs the carry set (.carry/*.whl, built beforehand where PyPI is reachable with
# `.venv/bin/python bench/gpu_carry.py`) into a directory of its own, then runs bench/gpu_check.py.
# Extra arguments go to gpu_check.py. Results go to $OUT (the device's result folder) or bench/gpu-out.
#
# The site directory is NOT put on PYTHONPATH: that would shadow the machine's own torch-matched
# transformers and numpy with the carried ones. gpu_check.py's --site appends it to sys.path instead, so
# the machine's packages win and the carried ones only fill the gaps (kokoro, loguru, speakd, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
carry="${SPEAKD_CARRY:-.carry}"
site="${SPEAKD_SITE:-/tmp/speakd-site}"
python="${PYTHON:-python3}"

shopt -s nullglob
wheels=("$carry"/*.whl)
if ((${#wheels[@]} == 0)); then
  echo "gpu_run: no wheels in $carry/: build the carry set first, where PyPI is reachable:" >&2
  echo "gpu_run:   .venv/bin/python bench/gpu_carry.py        (for the GPU machine's Python 3.12)" >&2
  exit 2
fi
# The speakd wheel must come from this very tree, or the run measures other code than the one carried.
"$python" bench/gpu_carry.py --check --out "$carry"

echo "gpu_run: installing ${#wheels[@]} wheels from $carry into $site" >&2
start=$SECONDS
rm -rf "$site"
"$python" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target "$site" "${wheels[@]}"
echo "gpu_run: installed in $((SECONDS - start)) s; running bench/gpu_check.py" >&2

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing outside can be reached
exec "$python" bench/gpu_check.py --site "$site" --out "${OUT:-bench/gpu-out}" "$@"
