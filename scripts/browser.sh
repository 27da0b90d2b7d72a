#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver for the serve page's test (tests/test_serve_page.py),
# when they are missing and apt can be used (as root). Quiet; says one line when it cannot, and
# exits 0 either way: the test then skips with the reason.
set -uo pipefail

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "browser.sh: chromium/chromedriver missing and apt-get is not usable here (needs root); the page test will skip"
    exit 0
fi
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get install -y -q --no-install-recommends chromium chromium-driver \
       || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium chromium-driver; }; } >"$log" 2>&1
then
    echo "browser.sh: could not install chromium (last lines of apt below); the page test will skip"
    tail -n 5 "$log"
fi
rm -f "$log"
exit 0
