#!/usr/bin/env bash
# Real Kafka (KRaft, one combined broker+controller) and Cassandra 5.0 (one node) as local
# processes on 127.0.0.1, from Maven Central jars — no Docker; and Jaeger, the trace backend
# (built by `make tools` into .tools/bin, traces in memory).
#
#   engines.sh fetch                                resolve the jars into .cache/engines/ (once)
#   engines.sh start  [kafka|cassandra|jaeger|all]  start and wait until each really answers
#   engines.sh stop   [kafka|cassandra|jaeger|all]  SIGTERM by recorded pid, SIGKILL after 30 s
#   engines.sh status [kafka|cassandra|jaeger|all]
#   engines.sh reset  [kafka|cassandra|jaeger|all]  stop and delete the data
#
# Data and logs: .var/<engine>/{data,logs}; pids: .var/run/<engine>.pid (all git-ignored).
# Environment: JAVA_HOME (a Java 17), WEIR_KAFKA_PORT (9092), WEIR_KAFKA_CONTROLLER_PORT (9093),
# WEIR_CASSANDRA_PORT (9042), WEIR_CASSANDRA_STORAGE_PORT (7000), WEIR_KAFKA_HEAP (1g),
# WEIR_CASSANDRA_HEAP (1g), WEIR_JAEGER_OTLP_PORT (4317), WEIR_JAEGER_UI_PORT (16686),
# WEIR_JAEGER_QUERY_GRPC_PORT (16685), WEIR_JAEGER_HEALTH_PORT (13133).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/deploy/local"
CACHE="$ROOT/.cache/engines"
VAR="$ROOT/.var"
RUN="$VAR/run"
PY="$ROOT/.venv/bin/python"
KAFKA_PORT=${WEIR_KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${WEIR_KAFKA_CONTROLLER_PORT:-9093}
CASSANDRA_PORT=${WEIR_CASSANDRA_PORT:-9042}
CASSANDRA_STORAGE_PORT=${WEIR_CASSANDRA_STORAGE_PORT:-7000}
JAEGER="$ROOT/.tools/bin/jaeger"
export WEIR_JAEGER_OTLP_PORT=${WEIR_JAEGER_OTLP_PORT:-4317} WEIR_JAEGER_UI_PORT=${WEIR_JAEGER_UI_PORT:-16686}
export WEIR_JAEGER_QUERY_GRPC_PORT=${WEIR_JAEGER_QUERY_GRPC_PORT:-16685}
export WEIR_JAEGER_HEALTH_PORT=${WEIR_JAEGER_HEALTH_PORT:-13133}
JAEGER_TIMEOUT=30
KAFKA_TIMEOUT=90
CASSANDRA_TIMEOUT=180
T0=$(date +%s.%N)

say() { printf '[engines %5.1fs] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN { print a - b }')" "$*"; }
die() { echo "engines: $*" >&2; exit 1; }
since() { awk -v a="$(date +%s.%N)" -v b="$1" 'BEGIN { printf "%.1f", a - b }'; }

is_java17() { [[ -x "$1" ]] && "$1" -version 2>&1 | head -1 | grep -qE '"17[."]'; }
find_java() {
  if [[ -n "${JAVA_HOME:-}" ]]; then
    is_java17 "$JAVA_HOME/bin/java" && { echo "$JAVA_HOME/bin/java"; return; }
    echo "engines: JAVA_HOME=$JAVA_HOME is not a Java 17; looking for one elsewhere" >&2
  fi
  local j
  for j in /usr/lib/jvm/java-17-openjdk-amd64/bin/java /usr/lib/jvm/java-17-openjdk-arm64/bin/java \
           /usr/lib/jvm/temurin-17-jdk-*/bin/java "$(command -v java || true)"; do
    is_java17 "$j" && { echo "$j"; return; }
  done
  die "Java 17 is required (Cassandra 5.0 runs on 11 or 17 only, Kafka 4 needs 17+) and none was
  found. Install it (Debian: apt-get install openjdk-17-jdk-headless) or point JAVA_HOME at one."
}

# One start/stop/reset at a time: two concurrent starts would launch two JVMs on one data
# directory, and a second Cassandra on a live data dir corrupts the first one's flushes.
# The engines are launched with fd 9 closed (9>&-), or they would hold the lock forever.
# They also get a session of their own (setsid): a Ctrl-C or a kill of the caller's process
# group (make, pytest) must not take the engines down with it.
lock() { mkdir -p "$RUN"; exec 9>"$RUN/engines.lock"; flock 9; }

fetch_one() {
  local engine=$1 pom="$HERE/$1/pom.xml" dir="$CACHE/$1"
  local sum; sum=$(sha256sum "$pom" | cut -d' ' -f1)
  if [[ -f "$dir/stamp" && "$(cat "$dir/stamp")" == "$sum" ]]; then return; fi
  command -v mvn >/dev/null || die "Maven is required to fetch $engine (Debian: apt-get install maven)"
  local t; t=$(date +%s.%N)
  say "fetching $engine jars from Maven Central"
  rm -rf "$dir/lib.new"; mkdir -p "$dir"
  # Maven's output goes to a file (even -q -Dstyle.color=never leaves ANSI resets behind);
  # it is shown when the fetch fails.
  if ! mvn -B -q -Dstyle.color=never -f "$pom" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$dir/lib.new" >"$dir/fetch.log" 2>&1; then
    tail -n 40 "$dir/fetch.log" >&2; die "fetching $engine failed (Maven's output: ${dir#"$ROOT"/}/fetch.log)"
  fi
  rm -rf "$dir/lib"; mv "$dir/lib.new" "$dir/lib"  # a failed fetch leaves the old lib/ intact
  echo "$sum" >"$dir/stamp"
  say "$engine: $(ls "$dir/lib" | wc -l) jars in ${dir#"$ROOT"/}/lib ($(since "$t")s)"
}

fetch() { find_java >/dev/null; fetch_one kafka; fetch_one cassandra; }

pid_of() { [[ -f "$RUN/$1.pid" ]] && cat "$RUN/$1.pid" || true; }
main_class() { case $1 in kafka) echo kafka.Kafka ;; cassandra) echo CassandraDaemon ;; jaeger) echo "$JAEGER" ;; esac; }
# Alive and still our engine: a recycled pid belonging to another program does not count.
running() {
  local pid; pid=$(pid_of "$1")
  [[ -n "$pid" ]] && ps -ww -o args= -p "$pid" 2>/dev/null | grep -q "$(main_class "$1")"
}

probe() {
  case $1 in
    kafka) "$PY" "$HERE/probe.py" kafka "127.0.0.1:$KAFKA_PORT" 2>/dev/null ;;
    cassandra) "$PY" "$HERE/probe.py" cassandra 127.0.0.1 "$CASSANDRA_PORT" 2>/dev/null ;;
    jaeger) "$PY" "$HERE/probe.py" jaeger "127.0.0.1:$WEIR_JAEGER_HEALTH_PORT" 2>/dev/null ;;
  esac
}

launch_kafka() {
  local java=$1 dir="$VAR/kafka" lib="$CACHE/kafka/lib"
  mkdir -p "$dir/data" "$dir/logs"
  sed -e "s|@PORT@|$KAFKA_PORT|g" -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
      -e "s|@DATA_DIR@|$dir/data|g" "$HERE/kafka/server.properties" >"$dir/server.properties"
  local logopts=(-Dlog4j2.configurationFile="$HERE/kafka/log4j2.properties" -Dkafka.logs.dir="$dir/logs")
  if [[ ! -f "$dir/data/meta.properties" ]]; then
    # The cluster id is kept beside the data, so a restart reuses the formatted directory.
    say "kafka: formatting storage in ${dir#"$ROOT"/}/data"
    [[ -f "$dir/cluster-id" ]] || "$PY" -c 'import base64, uuid; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))' >"$dir/cluster-id"
    "$java" -Xmx256m "${logopts[@]}" -cp "$lib/*" kafka.tools.StorageTool format \
        -t "$(cat "$dir/cluster-id")" -c "$dir/server.properties" --ignore-formatted \
        >>"$dir/logs/format.log" 2>&1 || { tail -20 "$dir/logs/format.log" >&2; die "formatting Kafka storage failed"; }
  fi
  setsid nohup "$java" -Xms256m -Xmx"${WEIR_KAFKA_HEAP:-1g}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
      -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true "${logopts[@]}" \
      -cp "$lib/*" kafka.Kafka "$dir/server.properties" >>"$dir/logs/stdout.log" 2>&1 9>&- &
  echo $! >"$RUN/kafka.pid"
}

launch_cassandra() {
  local java=$1 dir="$VAR/cassandra" lib="$CACHE/cassandra/lib"
  mkdir -p "$dir/data" "$dir/logs" "$dir/tmp" "$dir/triggers"
  local heap=${WEIR_CASSANDRA_HEAP:-1g}
  local opts=(
    -Xms"$heap" -Xmx"$heap" -Xss256k
    -ea -XX:+UseThreadPriorities -XX:+HeapDumpOnOutOfMemoryError -XX:HeapDumpPath="$dir/logs"
    -XX:+UseTLAB -XX:+ResizeTLAB -XX:+PerfDisableSharedMem -XX:+ExitOnOutOfMemoryError
    -Djava.net.preferIPv4Stack=true -Dchronicle.analytics.disable=true
    -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1 -XX:G1HeapRegionSize=16m
    -XX:G1RSetUpdatingPauseTimePercent=5 -XX:MaxGCPauseMillis=300 -XX:InitiatingHeapOccupancyPercent=70
    -Djdk.attach.allowAttachSelf=true
    --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
    --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
    --add-exports java.management/com.sun.jmx.remote.security=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
    --add-exports java.sql/java.sql=ALL-UNNAMED
    --add-exports java.base/java.lang.ref=ALL-UNNAMED
    --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
    --add-opens java.base/java.lang.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
    --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
    --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
    --add-opens java.base/jdk.internal.math=ALL-UNNAMED
    --add-opens java.base/jdk.internal.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
    --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
    --add-opens java.base/sun.nio.ch=ALL-UNNAMED
    --add-opens java.base/java.io=ALL-UNNAMED
    --add-opens java.base/java.lang.reflect=ALL-UNNAMED
    --add-opens java.base/java.lang=ALL-UNNAMED
    --add-opens java.base/java.util=ALL-UNNAMED
    --add-opens java.base/java.nio=ALL-UNNAMED
    -Dio.netty.tryReflectionSetAccessible=true
    -Dio.netty.allocator.useCacheForAllThreads=true
    -Dio.netty.allocator.maxOrder=11
    -javaagent:"$(ls "$lib"/jamm-*.jar | head -1)"
    -Dcassandra.config=file://"$HERE/cassandra/cassandra.yaml"
    -Dcassandra.native_transport_port="$CASSANDRA_PORT"
    -Dcassandra.storage_port="$CASSANDRA_STORAGE_PORT"
    -Dcassandra.storagedir="$dir/data"
    -Dcassandra.triggers_dir="$dir/triggers"
    -Dcassandra.logdir="$dir/logs"
    -Dlogback.configurationFile="$HERE/cassandra/logback.xml"
    -Dcassandra-foreground=yes
    -Dcassandra.skip_wait_for_gossip_to_settle=0
    -Djna.tmpdir="$dir/tmp" -Djava.io.tmpdir="$dir/tmp"
  )
  setsid nohup "$java" "${opts[@]}" -cp "$lib/*" org.apache.cassandra.service.CassandraDaemon \
      >>"$dir/logs/stdout.log" 2>&1 9>&- &
  echo $! >"$RUN/cassandra.pid"
}

launch_jaeger() {
  local dir="$VAR/jaeger"
  [[ -x "$JAEGER" ]] || die "jaeger: $JAEGER is missing: run 'make tools' first"
  mkdir -p "$dir/logs"
  setsid nohup "$JAEGER" --config "$HERE/jaeger/config.yaml" >>"$dir/logs/jaeger.log" 2>&1 9>&- &
  echo $! >"$RUN/jaeger.pid"
}

wait_ready() {
  local engine=$1 timeout=$2 log=$3 started; started=$(date +%s)
  until probe "$engine"; do
    if ! running "$engine"; then
      echo "--- last lines of $log" >&2; tail -n 30 "$log" >&2 || true
      die "$engine exited while starting"
    fi
    if (( $(date +%s) - started > timeout )); then
      echo "--- last lines of $log" >&2; tail -n 30 "$log" >&2 || true
      die "$engine did not answer within ${timeout}s"
    fi
    sleep 1
  done
  say "$engine: ready on 127.0.0.1:$(case $engine in kafka) echo "$KAFKA_PORT" ;; cassandra) echo "$CASSANDRA_PORT" ;; jaeger) echo "$WEIR_JAEGER_OTLP_PORT (OTLP), UI and API on 127.0.0.1:$WEIR_JAEGER_UI_PORT" ;; esac) (pid $(pid_of "$engine"))"
}

engines_of() { case ${1:-all} in all) echo kafka cassandra jaeger ;; kafka|cassandra|jaeger) echo "$1" ;; *) die "unknown engine: $1" ;; esac; }

start() {
  [[ -x "$PY" ]] || die "the Python venv is missing: run 'make venv' first"
  local java; java=$(find_java)
  fetch
  lock
  local to_wait=()
  for engine in $(engines_of "${1:-all}"); do
    if running "$engine"; then
      if probe "$engine"; then say "$engine: already running (pid $(pid_of "$engine"))"; continue; fi
    else
      [[ -f "$RUN/$engine.pid" ]] && say "$engine: removing stale pid file"
      rm -f "$RUN/$engine.pid"
      # An engine we did not start (another checkout, a container) would make ours fail to
      # bind while the probe still answered: refuse instead of pretending.
      probe "$engine" && die "$engine: something not started by this checkout already answers on its port"
      say "$engine: starting"
      "launch_$engine" "$java"
    fi
    to_wait+=("$engine")
  done
  for engine in "${to_wait[@]}"; do
    case $engine in
      kafka) wait_ready kafka "$KAFKA_TIMEOUT" "$VAR/kafka/logs/server.log" ;;
      cassandra) wait_ready cassandra "$CASSANDRA_TIMEOUT" "$VAR/cassandra/logs/system.log" ;;
      jaeger) wait_ready jaeger "$JAEGER_TIMEOUT" "$VAR/jaeger/logs/jaeger.log" ;;
    esac
  done
}

stop() {
  lock
  for engine in $(engines_of "${1:-all}"); do
    if running "$engine"; then
      local pid t; pid=$(pid_of "$engine"); t=$(date +%s.%N)
      say "$engine: stopping (SIGTERM to pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true; say "$engine: still alive after 30 s, killed (SIGKILL)"
      else say "$engine: stopped in $(since "$t")s"; fi
    else
      say "$engine: not running"
    fi
    rm -f "$RUN/$engine.pid"
  done
}

status() {
  for engine in $(engines_of "${1:-all}"); do
    if running "$engine"; then
      local rss; rss=$(ps -o rss= -p "$(pid_of "$engine")" | awk '{printf "%.0f MiB", $1/1024}')
      if probe "$engine"; then echo "$engine: running, answering (pid $(pid_of "$engine"), $rss)"
      else echo "$engine: running, not answering (pid $(pid_of "$engine"))"; fi
    else
      echo "$engine: stopped"
    fi
  done
}

reset() {
  stop "${1:-all}"
  for engine in $(engines_of "${1:-all}"); do rm -rf "${VAR:?}/$engine"; say "$engine: data deleted"; done
}

case "${1:-}" in
  fetch) fetch ;;
  start|stop|status|reset) "$1" "${2:-all}" ;;
  *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
