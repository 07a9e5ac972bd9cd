#!/bin/sh
# The browser runtime (stages/runtimes/browser.py): Debian's Chromium and onnxruntime-web (pinned
# in web/package-lock.json). Idempotent: does nothing when both are present. Downloads no browser
# build of its own: Chromium comes from apt, onnxruntime-web from the npm registry. The Python
# side needs no extra package (it speaks the DevTools protocol over a pipe with the stdlib).
set -eu
cd "$(dirname "$0")"

if [ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi

# npm ci again only when the lock file changed since the last install
if [ ! -f node_modules/.package-lock.json ] || ! cmp -s package-lock.json node_modules/.install-stamp; then
    npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
    cp package-lock.json node_modules/.install-stamp
fi
