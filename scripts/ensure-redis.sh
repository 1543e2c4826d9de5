#!/usr/bin/env bash
# Make sure redis-server and redis-cli are on PATH (the tests start private servers).
set -euo pipefail
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "redis-server missing: installing it with apt-get" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  # Debian starts a system service on 6379; we only need the binaries.
  exit 0
fi
cat >&2 <<'MSG'
redis-server is not installed and this script cannot install it (not root, or no apt-get).
Install Redis 7 (for example `sudo apt-get install redis-server`, or `brew install redis`),
make sure `redis-server` and `redis-cli` are on PATH, then run the command again.
MSG
exit 1
