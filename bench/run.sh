#!/bin/sh
# npm run bench [-- --streams 5000 --events 1000 --only gateway|nchan|publish --profile]
# 10,000 streams need as many file descriptors in the gateway, in nginx and
# in the load generator: raise the soft limit as far as the hard one allows.
set -e
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cd "$(dirname "$0")/.."
npm run -s build
exec node --import tsx bench/main.ts "$@"
