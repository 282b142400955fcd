#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# Idempotent: re-running it on a ready environment only re-checks the install.
#   scripts/bootstrap.sh            # runtime + test extras
# Environment: NVSEG_VENV (default <repo>/.venv), PYTHON (default python3).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NVSEG_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.nvseg-bootstrap"
want="$(cat "$repo/pyproject.toml" "$repo/scripts/bootstrap.sh" | sha256sum | cut -c1-16)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[bootstrap] setting up $venv (first run takes a few minutes)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip setuptools wheel >&2
# torch first, CPU build: a plain 'torch' requirement would otherwise pull a multi-GB CUDA build.
"$venv/bin/python" -c 'import torch' 2>/dev/null || "${pip[@]}" install "torch==2.13.0" >&2
"${pip[@]}" install -e "$repo[test]" >&2
echo "$want" > "$stamp"
echo "[bootstrap] ready: $venv" >&2
