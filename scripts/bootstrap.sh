#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# Idempotent: re-running it on a ready environment only re-checks the install.
#   scripts/bootstrap.sh            # runtime + test extras
# Run as root on Debian/Ubuntu, it also installs the system packages some tests use when they are missing
# (orthanc, orthanc-dicomweb, dicom3tools, chromium, chromium-driver); otherwise it says once which tests will skip.
# Environment: NVSEG_VENV (default <repo>/.venv), PYTHON (default python3).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NVSEG_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.nvseg-bootstrap"

# System tools some tests need (Debian packages): Orthanc with its DICOMweb plugin (a real DICOMweb server on
# loopback, tests/orthanc.py), dciodvfy (dicom3tools, the DICOM validator the SEG tests run) and headless Chromium
# with its chromedriver (chromium, chromium-driver: the run report's browser test, tests/test_run_report.py, drives
# it through Selenium). Tests that need a missing one skip, saying why. Their presence is part of the stamp, so
# this script looks again (once) when it changes, and stays quiet on every later run.
orthanc_plugin=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
system_tools() {
  local orthanc=missing dciodvfy=missing chromium=missing
  if { command -v Orthanc || [ -x /usr/sbin/Orthanc ]; } >/dev/null 2>&1 && [ -f "$orthanc_plugin" ]; then
    orthanc=present
  fi
  command -v dciodvfy >/dev/null 2>&1 && dciodvfy=present
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    chromium=present
  fi
  echo "orthanc=$orthanc dciodvfy=$dciodvfy chromium=$chromium"
}
policy=/usr/sbin/policy-rc.d
policy_saved=""
restore_policy() {
  rm -f "$policy"
  if [ -n "$policy_saved" ]; then mv -f "$policy_saved" "$policy"; policy_saved=""; fi
}
# apt-get install the given packages (after an apt-get update if the first try fails); says so when it cannot.
apt_install() {
  local log
  log="$(mktemp)"
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@")
  if ! "${apt[@]}" >"$log" 2>&1; then
    if ! { apt-get update -qq && "${apt[@]}"; } >>"$log" 2>&1; then
      echo "[bootstrap] apt-get could not install $* (the tests that need them will skip); last lines:" >&2
      tail -n 5 "$log" >&2
    fi
  fi
  rm -f "$log"
}
install_system_tools() {
  local tools
  tools="$(system_tools)"
  case "$tools" in *missing*) ;; *) return 0 ;; esac
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] $tools (needs root + apt-get to install orthanc orthanc-dicomweb dicom3tools chromium" \
      "chromium-driver): the Orthanc DICOMweb tests (tests/test_dicomweb.py and other DICOMweb cases), the dciodvfy" \
      "SEG checks and the run report's browser test (tests/test_run_report.py) will skip" >&2
    return 0
  fi
  # one apt transaction per group, only for what is missing: a distribution without one of them (Ubuntu ships
  # chromium as a snap) still gets the others
  local groups=()
  case "$tools" in *orthanc=missing*|*dciodvfy=missing*) groups+=("orthanc orthanc-dicomweb dicom3tools") ;; esac
  case "$tools" in *chromium=missing*) groups+=("chromium chromium-driver") ;; esac
  echo "[bootstrap] installing ${groups[*]} (apt; no service is started)" >&2
  # policy-rc.d exiting 101 tells the package scripts not to start the orthanc system service
  if [ -e "$policy" ]; then policy_saved="$policy.nvseg-saved.$$"; mv -f "$policy" "$policy_saved"; fi
  trap restore_policy EXIT
  trap 'exit 130' INT TERM  # so that the EXIT trap restores the policy on Ctrl-C too
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod 755 "$policy"
  local group
  for group in "${groups[@]}"; do
    # shellcheck disable=SC2086 # a group is a space-separated package list
    apt_install $group
  done
  restore_policy
  trap - EXIT INT TERM
}
stamp_value() {
  { cat "$repo/pyproject.toml" "$repo/scripts/bootstrap.sh"; system_tools; } | sha256sum | cut -c1-16
}
want="$(stamp_value)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
install_system_tools
want="$(stamp_value)"
echo "[bootstrap] setting up $venv (first run takes a few minutes)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip setuptools wheel >&2
# torch first, CPU build: a plain 'torch' requirement would otherwise pull a multi-GB CUDA build.
"$venv/bin/python" -c 'import torch' 2>/dev/null || "${pip[@]}" install "torch==2.13.0" >&2
"${pip[@]}" install -e "$repo[test]" >&2
echo "$want" > "$stamp"
echo "[bootstrap] ready: $venv" >&2
