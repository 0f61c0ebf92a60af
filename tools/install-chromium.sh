#!/usr/bin/env bash
# Installs Debian's chromium for tests/test_app.py (Playwright drives it; Playwright's own
# browser download does not work offline). Idempotent: does nothing when `chromium` is on
# PATH. Needs apt-get and root or sudo; otherwise it says so and tests/test_app.py fails
# with a message naming the package.
set -uo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "warning: chromium is missing and apt-get is not available; tests/test_app.py will fail" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  SUDO="$(command -v sudo || true)"
  if [ -z "$SUDO" ]; then
    echo "warning: chromium is missing and neither root nor sudo; tests/test_app.py will fail" >&2
    exit 0
  fi
fi
$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium \
  || echo "warning: apt-get install chromium failed; tests/test_app.py will fail" >&2
