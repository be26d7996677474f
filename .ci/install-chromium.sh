#!/usr/bin/env bash
# Install Debian's chromium for the dashboard's browser test (tests/bench/test_report.py).
# Idempotent and quiet: does nothing when `chromium` is already on PATH.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium.sh: chromium is missing and there is no apt-get (not Debian/Ubuntu)" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-chromium.sh: chromium is missing and this user cannot run apt-get (not root, no sudo)" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium >/dev/null 2>&1 || { echo "install-chromium.sh: chromium still not on PATH" >&2; exit 1; }
