#!/usr/bin/env bash
# Starts and stops the five Weir services as background processes on this machine.
#   services.sh start | stop | status
# Logs: .var/log/<service>.log (JSON lines). Pids: .var/run/<service>.pid.
# Each service also serves Prometheus metrics over HTTP (WEIR_<SERVICE>_METRICS_PORT, 9464-9468;
# docs/metrics.md): `start` prints where.
# Settings come from the environment (WEIR_*), see `python -m libs.config`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY="$ROOT/.venv/bin/python"
RUN="$ROOT/.var/run"
LOG="$ROOT/.var/log"
SERVICES=(router notifier executor_manager dispatcher gateway)
mkdir -p "$RUN" "$LOG"
# Spans go to the local Jaeger that engines.sh runs (WEIR_OTLP_ENDPOINT= turns export off).
export WEIR_OTLP_ENDPOINT=${WEIR_OTLP_ENDPOINT-127.0.0.1:${WEIR_JAEGER_OTLP_PORT:-4317}}

port_of() { "$PY" -c "from libs import config; print(config.load().port_of('$1'))"; }
# Where a service's metrics are, or that it serves none.
metrics_of() {
  "$PY" -c "from libs import config; c = config.load(); print(
    f'metrics on http://{c.internal_bind_host}:{c.metrics_port_of(\"$1\")}/metrics'
    if c.metrics_enabled else 'no metrics (WEIR_METRICS_ENABLED=false)')"
}
# Internal services answer only mutual TLS: their health is checked as the operator.
peer_of() { [[ $1 == gateway ]] || echo "--peer ${1//_/-}"; }
alive() { [[ -f "$RUN/$1.pid" ]] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

start() {
  cd "$ROOT"
  for s in "${SERVICES[@]}"; do
    if alive "$s"; then echo "$s: already running (pid $(cat "$RUN/$s.pid"))"; continue; fi
    rm -f "$RUN/$s.pid"
    nohup "$PY" -m "services.$s" >>"$LOG/$s.log" 2>&1 &
    echo $! >"$RUN/$s.pid"
  done
  for s in "${SERVICES[@]}"; do
    local port; port=$(port_of "$s")
    # shellcheck disable=SC2046  # peer_of prints nothing or two words on purpose
    if ! "$PY" -m libs.healthcheck "127.0.0.1:$port" --timeout 60 $(peer_of "$s"); then
      echo "$s did not become healthy; last log lines:" >&2
      tail -n 20 "$LOG/$s.log" >&2
      exit 1
    fi
    echo "$s: serving on 127.0.0.1:$port, $(metrics_of "$s") (pid $(cat "$RUN/$s.pid"))"
  done
}

stop() {
  for s in "${SERVICES[@]}"; do
    if alive "$s"; then
      local pid; pid=$(cat "$RUN/$s.pid")
      kill -TERM "$pid"
      for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
      echo "$s: stopped"
    fi
    rm -f "$RUN/$s.pid"
  done
}

status() {
  for s in "${SERVICES[@]}"; do
    if alive "$s"; then echo "$s: running (pid $(cat "$RUN/$s.pid"))"; else echo "$s: stopped"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
