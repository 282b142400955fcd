#!/usr/bin/env bash
# The project's test command (README "Tests"; .ci/run calls exactly this).
# Sets up .venv on a fresh machine (CPU torch first, then the project with its test extras) and runs
# the suite. Servers the tests need (moto S3 on loopback, ...) are started and stopped by the tests'
# own fixtures. Extra arguments go to pytest, e.g. scripts/test.sh -k parity -x
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/scripts/bootstrap.sh"
cd "$repo"
exec "${NVSEG_VENV:-$repo/.venv}/bin/python" -m pytest -q "$@"
