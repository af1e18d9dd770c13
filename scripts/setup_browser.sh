#!/usr/bin/env bash
# Installs Debian's chromium for the report test, which opens report/index.html in headless Chromium
# (tests/helpers/browser.py) to check that every inlined plot decodes. Idempotent: a no-op, and
# silent, when /usr/bin/chromium is there. A machine where it cannot be installed still runs the
# other tests: the report's browser tests then fail, naming what to install.
set -euo pipefail
[ -x /usr/bin/chromium ] && exit 0
need="the report test opens report/index.html in headless Chromium: install Debian's \`chromium\` package"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup_browser] no apt-get on this machine; $need" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "[setup_browser] not root and no sudo; $need (as root: apt-get install chromium)" >&2
    exit 0
  fi
  sudo="sudo"
fi
echo "[setup_browser] installing Debian's chromium (once)"
if ! log=$($sudo apt-get update -q 2>&1 && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium 2>&1); then
  echo "$log" | tail -20 >&2
  echo "[setup_browser] apt-get failed; $need" >&2
  exit 0
fi
