#!/usr/bin/env bash
# The dashboard's browser tests drive Debian's Chromium. Install it when it is missing and this
# machine can (root with apt); otherwise say so: those tests then skip (and fail under CI=true).
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the dashboard's browser tests..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "note: chromium is not installed; the dashboard's browser tests will be skipped" >&2
fi
exit 0
