#!/usr/bin/env bash
# Installs Debian's chromium for the browser test (tests/test_app_browser.py) when it is missing.
# Playwright drives this system browser; `playwright install` (which downloads its own build) is never
# run. Without root and without chromium, the browser test skips and says why.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "browser-setup: installing chromium (apt-get) for the browser test" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
else
  echo "browser-setup: /usr/bin/chromium is missing and this is not root: the browser test will skip" >&2
fi
