#!/usr/bin/env bash
# Runs a command with Kafka and Cassandra up, then stops the engines it started itself
# (also when the command fails); engines that were already running stay running.
#   with-engines.sh pytest ...
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ENGINES="$ROOT/deploy/local/engines.sh"
alive() { "$ENGINES" status "$1" | grep -q ': running'; }

started=()
for engine in kafka cassandra jaeger; do alive "$engine" || started+=("$engine"); done
cleanup() { for engine in "${started[@]}"; do "$ENGINES" stop "$engine"; done; }
trap cleanup EXIT
"$ENGINES" start all || exit 1
"$@"
