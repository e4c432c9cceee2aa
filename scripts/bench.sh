#!/usr/bin/env bash
# Runs the standard benchmark points against release builds of the daemon and
# writes docs/benchmarks.md (tables, medians of RUNS runs) and
# docs/benchmarks.svg (latency by rate; poll-bus latency by poll interval).
#
# The daemons run pinned to CPU 0 and the load generator to CPU 1 (taskset),
# everything on loopback, each daemon on free ports with its own database in
# a temporary directory. Every daemon is killed on exit, whatever happens.
#
#   scripts/bench.sh              # the full set, about 10 minutes
#   RUNS=1 QUICK=1 scripts/bench.sh   # a smaller smoke run
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/bench.sh [-h|--help]

Builds the daemon in release, runs the standard benchmark points on loopback
and REWRITES docs/benchmarks.md and docs/benchmarks.svg (about 10 minutes).
It takes no arguments; settings come from the environment:

  RUNS=N     runs per point, the median is reported (default 3)
  QUICK=1    smaller loads and shorter runs, for a smoke test (default 0)
  OUT=FILE   the Markdown report (default docs/benchmarks.md)
  SVG=FILE   the latency chart (default docs/benchmarks.svg)

example: RUNS=1 QUICK=1 OUT=/tmp/b.md SVG=/tmp/b.svg scripts/bench.sh
USAGE
}

# Any argument is either a request for help or a mistake: never start a run
# (and overwrite the docs) because of one.
case "${1-}" in
  "") ;;
  -h|--help|help) usage; exit 0 ;;
  *) echo "scripts/bench.sh: unexpected argument '$1'" >&2; usage >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
QUICK=${QUICK:-0}
OUT=${OUT:-docs/benchmarks.md}
SVG=${SVG:-docs/benchmarks.svg}
WORK=$(mktemp -d)
RESULTS=$WORK/results.jsonl
COMMANDS=$WORK/commands.txt
PENDING=$WORK/pending.txt
DAEMONS=()
STARTED=$(date +%s)

cleanup() {
  for pid in "${DAEMONS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${DAEMONS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$QUICK" = 1 ]; then
  FAN_MEMBERS=200; IDLE_CONNS=1000; ROOMS_CLIENTS=1000; ROOMS_ROOMS=100; DURATION=3
  SAT_MAX=400; CLUSTER_MEMBERS=60; SSE_MEMBERS=50; SSE_RATE=200
  PEER_IDLE=2000; PEER_BIG=200; PEER_SAT_MAX=3000
else
  FAN_MEMBERS=1000; IDLE_CONNS=10000; ROOMS_CLIENTS=10000; ROOMS_ROOMS=1000; DURATION=10
  SAT_MAX=5000; CLUSTER_MEMBERS=300; SSE_MEMBERS=100; SSE_RATE=500
  PEER_IDLE=10000; PEER_BIG=1000; PEER_SAT_MAX=90000
fi

# Pin the server and the generator to different cores when there are two.
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  SERVER_CPU=(taskset -c 0); CLIENT_CPU=(taskset -c 1)
else
  SERVER_CPU=(); CLIENT_CPU=()
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "== building in release"
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/baby-discord

# start_daemon ARGS...: starts a daemon on free ports; sets PID, TCP, HTTP.
# Each daemon gets a log of its own: a reused name could still hold the last
# daemon's "listening" line when it is read, before the new daemon truncates it.
STARTS=0
start_daemon() {
  STARTS=$((STARTS + 1))
  local log=$WORK/daemon-$STARTS.log
  RUST_LOG=warn,baby_discord::server=info "${SERVER_CPU[@]}" "$BIN" \
    --tcp 127.0.0.1:0 --http 127.0.0.1:0 "$@" 2>"$log" &
  PID=$!
  DAEMONS+=("$PID")
  local line=""
  for _ in $(seq 300); do
    line=$(grep -m1 -o 'listening tcp=[^ ]* http=[0-9.:]*' "$log" 2>/dev/null || true)
    [ -n "$line" ] && break
    kill -0 "$PID" 2>/dev/null || { cat "$log" >&2; echo "daemon died" >&2; exit 1; }
    sleep 0.1
  done
  [ -n "$line" ] || { cat "$log" >&2; echo "daemon did not start" >&2; exit 1; }
  TCP=$(echo "$line" | sed -E 's/listening tcp=([^ ]*) .*/\1/')
  HTTP=$(echo "$line" | sed -E 's/.*http=([0-9.:]*).*/\1/')
}

stop_daemons() {
  for pid in "${DAEMONS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${DAEMONS[@]}"; do wait "$pid" 2>/dev/null || true; done
  DAEMONS=()
}

# note_command TEXT: records a command for the report (addresses shown as ADDR).
note_command() {
  echo "$1" | sed -E 's/127\.0\.0\.1:[0-9]+/ADDR/g; s/--server-pid [0-9]+/--server-pid PID/g' >>"$COMMANDS"
}

# bench ARGS...: one load-generator run, appended to the results. A failed run
# is listed in the report rather than ending the script.
bench() {
  if ! "${CLIENT_CPU[@]}" "$BIN" bench "$@" --json >>"$RESULTS" 2>"$WORK/bench.err"; then
    cat "$WORK/bench.err" >&2
    echo "failed run: baby-discord bench $1 ($(grep -m1 '^Error' "$WORK/bench.err" | cut -c1-200))" \
      | sed -E 's/127\.0\.0\.1:[0-9]+/ADDR/g' >>"$PENDING"
    return 1
  fi
}

# A member of a 1,000-member room is sent ~1,000 join events while the room
# fills: at the default --queue 1024 a member is one hiccup away from being
# dropped as a slow consumer before the first message. Rooms that large run
# with --queue 4096; every other limit is the default.
echo "== fanout: $FAN_MEMBERS members at 200 msg/s, local bus, default limits but --queue 4096"
for run in $(seq "$RUNS"); do
  start_daemon --db "sqlite://$WORK/fanout-$run.db" --queue 4096
  args=(fanout --target "$TCP" --members "$FAN_MEMBERS" --rate 200 --duration "$DURATION"
        --server-pid "$PID" --label "fanout $FAN_MEMBERS members @ 200 msg/s")
  [ "$run" = 1 ] && note_command "baby-discord serve --db sqlite://FILE --queue 4096  # pinned: taskset -c 0" \
    && note_command "baby-discord bench $(printf '%q ' "${args[@]}")"
  bench "${args[@]}" || true
  stop_daemons
done

echo "== rooms: $ROOMS_CLIENTS clients in $ROOMS_ROOMS rooms at 1,000 msg/s"
for run in $(seq "$RUNS"); do
  start_daemon --db "sqlite://$WORK/rooms-$run.db"
  args=(rooms --target "$TCP" --clients "$ROOMS_CLIENTS" --rooms "$ROOMS_ROOMS" --rate 1000
        --duration "$DURATION" --server-pid "$PID"
        --label "rooms $ROOMS_CLIENTS clients / $ROOMS_ROOMS rooms @ 1000 msg/s")
  [ "$run" = 1 ] && note_command "baby-discord bench $(printf '%q ' "${args[@]}")"
  bench "${args[@]}" || true
  stop_daemons
done

echo "== idle: $IDLE_CONNS TCP connections, then $IDLE_CONNS SSE"
SSE_PENDING=0
for run in $(seq "$RUNS"); do
  start_daemon --db "sqlite://$WORK/idle-$run.db"
  args=(idle --target "$TCP" --tcp "$IDLE_CONNS" --sse 0 --server-pid "$PID" --label "idle")
  [ "$run" = 1 ] && note_command "baby-discord bench $(printf '%q ' "${args[@]}")"
  bench "${args[@]}" || true
  stop_daemons
  [ "$SSE_PENDING" = 1 ] && continue
  start_daemon --db "sqlite://$WORK/idle-sse-$run.db"
  args=(idle --http-target "$HTTP" --tcp 0 --sse "$IDLE_CONNS" --server-pid "$PID" --label "idle")
  [ "$run" = 1 ] && note_command "baby-discord bench $(printf '%q ' "${args[@]}")"
  if ! "${CLIENT_CPU[@]}" "$BIN" bench "${args[@]}" --json >>"$RESULTS" 2>"$WORK/sse.err"; then
    if grep -q 503 "$WORK/sse.err"; then
      echo "idle SSE: pending HTTP adapter (the daemon answers 503)" | tee -a "$PENDING"
      stop_daemons
      SSE_PENDING=1
      continue
    fi
    cat "$WORK/sse.err" >&2
    echo "failed run: idle SSE" >>"$PENDING"
  fi
  stop_daemons
done

# SSE fan-out against a Node 20 hub built on better-sse (bench/node-sse), the
# same load on both, interleaved run by run: SSE_MEMBERS streams in one room,
# 10 senders, SSE_RATE msg/s. baby-discord's receivers are HTTP sessions
# (GET /events) and its senders TCP members; the Node hub's members are all
# streams and its senders POST. Deliveries per server CPU-second are 10^6 over
# the median CPU µs per delivery.
SSE_COSTS=$WORK/sse-costs.txt
if command -v node >/dev/null && command -v npm >/dev/null \
    && [ "$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)" -ge 20 ] \
    && (cd bench/node-sse && npm ci --silent --no-audit --no-fund >/dev/null 2>&1); then
  echo "== SSE fan-out: $SSE_MEMBERS streams at $SSE_RATE msg/s, baby-discord and Node better-sse"
  for run in $(seq "$RUNS"); do
    start_daemon --db "sqlite://$WORK/sse-fanout-$run.db" --rate 0 --queue 4096
    args=(fanout --receivers sse --target "$TCP" --http-target "$HTTP" --members "$SSE_MEMBERS"
          --senders 10 --rate "$SSE_RATE" --duration "$DURATION" --server-pid "$PID"
          --label "sse fanout baby-discord, $SSE_MEMBERS streams @ $SSE_RATE msg/s")
    [ "$run" = 1 ] && note_command "baby-discord serve --db sqlite://FILE --rate 0 --queue 4096" \
      && note_command "baby-discord bench $(printf '%q ' "${args[@]}")"
    bench "${args[@]}" || true
    stop_daemons
    log=$WORK/node-$run.log
    (cd bench/node-sse && PORT=0 exec "${SERVER_CPU[@]}" node server.js) >"$log" 2>&1 &
    PID=$!
    DAEMONS+=("$PID")
    for _ in $(seq 100); do grep -q '^listening' "$log" && break; sleep 0.1; done
    NODE_HTTP=$(grep -m1 -o 'http=[0-9.:]*' "$log" | cut -d= -f2)
    if [ -z "$NODE_HTTP" ]; then
      echo "failed run: the Node SSE hub did not start ($(head -c 200 "$log"))" >>"$PENDING"
      stop_daemons
      continue
    fi
    args=(fanout --receivers sse-peer --http-target "$NODE_HTTP" --members "$SSE_MEMBERS"
          --senders 10 --rate "$SSE_RATE" --duration "$DURATION" --server-pid "$PID"
          --label "sse fanout node better-sse, $SSE_MEMBERS streams @ $SSE_RATE msg/s")
    [ "$run" = 1 ] && note_command "(cd bench/node-sse && npm ci && PORT=0 node server.js)  # pinned: taskset -c 0" \
      && note_command "baby-discord bench $(printf '%q ' "${args[@]}")"
    bench "${args[@]}" || true
    stop_daemons
  done
  for who in "baby-discord" "node better-sse"; do
    jq -r --arg who "sse fanout $who," 'select((.label // "") | startswith($who))
      | .outcome.server.cpu_us_per_delivery // empty' "$RESULTS" | sort -g \
      | awk -v who="$who" '{ v[NR] = $1 } END { if (NR) printf "%s %.0f\n", who, 1e6 / v[int((NR + 1) / 2)] }' \
      >>"$SSE_COSTS"
  done
else
  echo "SSE fan-out against Node better-sse: needs node >= 20 and npm (bench/node-sse)" | tee -a "$PENDING"
fi

echo "== saturate: $FAN_MEMBERS members, server --rate 0, p99 bound 5 ms"
for run in $(seq "$RUNS"); do
  start_daemon --db "sqlite://$WORK/saturate-$run.db" --rate 0 --queue 4096
  args=(saturate --target "$TCP" --members "$FAN_MEMBERS" --senders 20 --start 50 --factor 1.5
        --max-rate "$SAT_MAX" --p99-ms 5 --duration 3 --server-pid "$PID"
        --label "saturate $FAN_MEMBERS members, p99 < 5 ms")
  [ "$run" = 1 ] && note_command "baby-discord serve --db sqlite://FILE --rate 0 --queue 4096" \
    && note_command "baby-discord bench $(printf '%q ' "${args[@]}")"
  bench "${args[@]}" || true
  stop_daemons
done

for interval in 20 100; do
  echo "== cluster: 3 instances, poll bus every $interval ms, shared SQLite"
  for run in $(seq "$RUNS"); do
    db="sqlite://$WORK/cluster-$interval-$run.db"
    targets=(); pids=()
    for i in 1 2 3; do
      start_daemon --db "$db" --bus poll --poll-interval "$interval" --instance "i$i"
      targets+=(--target "$TCP"); pids+=(--server-pid "$PID")
    done
    args=(cluster "${targets[@]}" --members "$CLUSTER_MEMBERS" --rate 50 --duration "$DURATION"
          "${pids[@]}" --poll-interval-ms "$interval"
          --label "cluster 3 x poll $interval ms, $CLUSTER_MEMBERS members @ 50 msg/s")
    [ "$run" = 1 ] && note_command \
      "baby-discord serve --db sqlite://SHARED --bus poll --poll-interval $interval --instance iN  # x3" \
      && note_command "baby-discord bench $(printf '%q ' "${args[@]}")"
    bench "${args[@]}" || true
    stop_daemons
  done
done

# The redis bus under the same load: the machine's Redis (REDIS_URL), each run
# under its own --cluster name, its keys deleted afterwards. Redis's command
# counters before and after each run say what the whole run cost it (the
# members' joins included).
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
REDIS_COSTS=$WORK/redis-costs.txt
redis_stat() { # redis_stat FIELD: a counter from INFO commandstats / stats
  redis-cli -u "$REDIS_URL" info all | tr -d '\r' | awk -F'[:=,]' -v f="$1" '
    $1 == "total_commands_processed" && f == "total" { print $2 }
    $1 == "cmdstat_evalsha" && f == "evalsha" { print $3 }' | head -n1
}
if command -v redis-cli >/dev/null && redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1; then
  echo "== cluster: 3 instances, redis bus, shared SQLite"
  for run in $(seq "$RUNS"); do
    cluster="bench-$$-$run"
    db="sqlite://$WORK/cluster-redis-$run.db"
    targets=(); pids=()
    for i in 1 2 3; do
      start_daemon --db "$db" --bus "$REDIS_URL" --cluster "$cluster" --instance "i$i"
      targets+=(--target "$TCP"); pids+=(--server-pid "$PID")
    done
    args=(cluster "${targets[@]}" --members "$CLUSTER_MEMBERS" --rate 50 --duration "$DURATION"
          "${pids[@]}" --label "cluster 3 x redis, $CLUSTER_MEMBERS members @ 50 msg/s")
    [ "$run" = 1 ] && note_command \
      "baby-discord serve --db sqlite://SHARED --bus redis://127.0.0.1:6379 --cluster NAME --instance iN  # x3" \
      && note_command "baby-discord bench $(printf '%q ' "${args[@]}")"
    total=$(redis_stat total); evalsha=$(redis_stat evalsha)
    bench "${args[@]}" || true
    echo "$(( $(redis_stat total) - total )) $(( $(redis_stat evalsha) - ${evalsha:-0} ))" >>"$REDIS_COSTS"
    stop_daemons
    redis-cli -u "$REDIS_URL" --scan --pattern "*$cluster*" | xargs -r redis-cli -u "$REDIS_URL" del >/dev/null
  done
else
  echo "cluster on the redis bus: no Redis answers at $REDIS_URL" >>"$PENDING"
fi

# Persistence on the redis bus alone: a backlog drained into PostgreSQL
# (PG_URL, a server where a fresh database can be created for each run).
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
if command -v psql >/dev/null && psql "$PG_URL" -qAtc 'select 1' >/dev/null 2>&1 \
    && redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1; then
  echo "== persist: a backlog of 100,000 messages drained into PostgreSQL"
  for persisters in 1 3; do
    for run in $(seq "$RUNS"); do
      name="bench_persist_$$_${persisters}_$run"
      psql "$PG_URL" -qc "CREATE DATABASE $name"
      args=(persist --redis "$REDIS_URL" --db "${PG_URL%/*}/$name" --messages 100000 --rooms 100
            --persisters "$persisters" --label "persist 100000 messages, $persisters persister(s)")
      [ "$run" = 1 ] && note_command "baby-discord bench $(printf '%q ' "${args[@]}" | sed -E 's#postgres://[^ ]*#postgres://FRESH_DB#')"
      bench "${args[@]}" || true
      psql "$PG_URL" -qc "DROP DATABASE $name"
    done
  done
else
  echo "persist: needs PostgreSQL at $PG_URL and Redis at $REDIS_URL" >>"$PENDING"
fi

# The delivery path beside ngircd, a C IRC server (bench/ngircd), the same
# load on both, runs interleaved: baby-discord's members read its text lines
# (about as long as IRC's), ngircd's speak IRC. Labels are "POINT | SERVER", which bench report
# draws side by side. baby-discord runs with --rate 0 (10 senders send more
# than the default 10 msg/s each) and --queue 4096 (a 1,000-member room).
# start_ngircd: starts ngircd on a free port; sets PID and IRC. The port is
# drawn below the ephemeral range, where no client connection holds one, and
# a start that finds it taken anyway is tried again on another.
start_ngircd() {
  local attempt
  for attempt in 1 2 3; do
    start_ngircd_once && return 0
  done
  return 1
}
start_ngircd_once() {
  STARTS=$((STARTS + 1))
  local dir=$WORK/ngircd-$STARTS port
  local lowest_ephemeral
  lowest_ephemeral=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  mkdir -p "$dir" && chmod 777 "$dir" # it drops root for an unprivileged user
  for _ in $(seq 50); do
    port=$((10000 + RANDOM % (lowest_ephemeral - 10000)))
    [ -z "$(ss -Hltn "sport = :$port" 2>/dev/null)" ] && break
  done
  sed -e "s/@PORT@/$port/" -e "s#@RUN@#$dir#" bench/ngircd/ngircd.conf.in >"$dir/ngircd.conf"
  "${SERVER_CPU[@]}" ngircd --nodaemon --config "$dir/ngircd.conf" >"$dir/ngircd.log" 2>&1 &
  PID=$!
  DAEMONS+=("$PID")
  for _ in $(seq 100); do
    grep -qs "Now listening" "$dir/ngircd.log" && break
    kill -0 "$PID" 2>/dev/null || break
    sleep 0.1
  done
  if ! grep -q 'Now listening' "$dir/ngircd.log"; then
    tail -n 3 "$dir/ngircd.log" >&2
    stop_daemons
    return 1
  fi
  IRC=127.0.0.1:$port
}

# peer_point NAME ARGS...: one run of a load point on baby-discord, then on
# ngircd; ARGS are the bench arguments after the workload's receivers.
peer_point() {
  local name=$1 workload=$2; shift 2
  start_daemon --db "sqlite://$WORK/peer-$STARTS.db" --rate 0 --queue 4096
  local text=(--format text)
  [ "$workload" = idle ] && text=()
  args=("$workload" "${text[@]}" --target "$TCP" "$@" --server-pid "$PID" --label "$name | baby-discord")
  [ "$run" = 1 ] && note_command "baby-discord bench $(printf '%q ' "${args[@]}")"
  bench "${args[@]}" || true
  stop_daemons
  if start_ngircd; then
    local irc=(--receivers irc)
    [ "$workload" = idle ] && irc=(--irc)
    args=("$workload" "${irc[@]}" --target "$IRC" "$@" --server-pid "$PID" --label "$name | ngircd")
    [ "$run" = 1 ] && note_command "baby-discord bench $(printf '%q ' "${args[@]}")"
    bench "${args[@]}" || true
  else
    echo "failed run: ngircd did not start" >>"$PENDING"
  fi
  stop_daemons
}

# ngircd's accept queue holds 10 connections: more opened at once are
# dropped and retried by the kernel seconds later, so every peer point opens
# 16 at a time, on both servers.
if command -v ngircd >/dev/null; then
  echo "== delivery path beside ngircd: fan-out, saturation, idle connections"
  note_command "baby-discord serve --db sqlite://FILE --rate 0 --queue 4096  # pinned: taskset -c 0"
  note_command "ngircd --nodaemon --config bench/ngircd/ngircd.conf.in  # port filled in; pinned: taskset -c 0"
  for run in $(seq "$RUNS"); do
    peer_point "M=100 R=100" fanout --members 100 --senders 10 --rate 100 --duration "$DURATION" --concurrency 16
    peer_point "M=100 R=1000" fanout --members 100 --senders 10 --rate 1000 --duration "$DURATION" --concurrency 16
    peer_point "M=$PEER_BIG R=200" fanout --members "$PEER_BIG" --senders 10 --rate 200 --duration "$DURATION" --concurrency 16
    peer_point "saturate M=100" saturate --members 100 --senders 10 --start 200 --factor 1.5 \
      --max-rate "$PEER_SAT_MAX" --p99-ms 2 --duration 3 --concurrency 16
    peer_point "idle $PEER_IDLE" idle --tcp "$PEER_IDLE" --sse 0 --concurrency 16
  done
else
  echo "the delivery path beside ngircd: needs ngircd (apt-get install ngircd)" | tee -a "$PENDING"
fi

# med LABEL JQ: the median of JQ over the runs labelled LABEL ("-" if none).
med() {
  jq -r --arg l "$1" "select(.label == \$l) | $2 // empty" "$RESULTS" | sort -g \
    | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "-" }'
}
# fmt N VALUE: VALUE with N decimals, or "-".
fmt() { [ "$2" = - ] && echo - || printf "%.${1}f" "$2"; }
# meets EXPR: "yes" or "no" from an awk comparison of numbers ("-" if missing).
meets() { case "$*" in *-*) echo "-" ;; *) awk "BEGIN { print ($*) ? \"yes\" : \"no\" }" ;; esac; }
SERVER_JQ='.outcome.server.cpu_us_per_delivery'
USER_JQ='.outcome.server.user_us_per_delivery'
IDLE_JQ='.outcome.results[] | select(.transport == "tcp") | .kib_per_connection'
TARGETS=$WORK/targets.md
if command -v ngircd >/dev/null; then
  B="| baby-discord"; N="| ngircd"
  cpu=$(med "M=100 R=1000 $B" "$SERVER_JQ"); cpu_n=$(med "M=100 R=1000 $N" "$SERVER_JQ")
  user=$(med "M=100 R=1000 $B" "$USER_JQ"); user_n=$(med "M=100 R=1000 $N" "$USER_JQ")
  p50=$(med "M=100 R=1000 $B" .outcome.latency.p50_ms); p50_n=$(med "M=100 R=1000 $N" .outcome.latency.p50_ms)
  p99=$(med "M=100 R=1000 $B" .outcome.latency.p99_ms); p99_n=$(med "M=100 R=1000 $N" .outcome.latency.p99_ms)
  dpr=$(med "M=100 R=1000 $B" .outcome.deliveries_per_read); dpr_n=$(med "M=100 R=1000 $N" .outcome.deliveries_per_read)
  p99s=$(med "M=100 R=100 $B" .outcome.latency.p99_ms); p99s_n=$(med "M=100 R=100 $N" .outcome.latency.p99_ms)
  big="M=$PEER_BIG R=200"
  cpub=$(med "$big $B" "$SERVER_JQ"); cpub_n=$(med "$big $N" "$SERVER_JQ")
  p99b=$(med "$big $B" .outcome.latency.p99_ms); p99b_n=$(med "$big $N" .outcome.latency.p99_ms)
  sat=$(med "saturate M=100 $B" .outcome.highest_keeping_up_deliveries_per_s)
  sat_n=$(med "saturate M=100 $N" .outcome.highest_keeping_up_deliveries_per_s)
  idle=$(med "idle $PEER_IDLE $B" "$IDLE_JQ"); idle_n=$(med "idle $PEER_IDLE $N" "$IDLE_JQ")
  sse=$(med idle '.outcome.results[] | select(.transport == "sse") | .kib_per_connection')
  sse_b=$(awk '$1 == "baby-discord" { print $2 }' "$SSE_COSTS" 2>/dev/null); sse_b=${sse_b:--}
  sse_n=$(awk '$1 == "node" { print $3 }' "$SSE_COSTS" 2>/dev/null); sse_n=${sse_n:--}
  ratio() { [ "$1" = - ] || [ "$2" = - ] && echo - || awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
  {
    echo "| target (M members, R msg/s, 10 senders) | when set (2026-11) | goal | baby-discord now | baseline, same run | met |"
    echo "|---|---|---|---|---|---|"
    echo "| M=100 R=1000: server CPU µs per delivery | 8.1-8.4 | ≤ 0.75 × ngircd | $(fmt 2 "$cpu") ($(ratio "$cpu" "$cpu_n") × ngircd) | ngircd $(fmt 2 "$cpu_n") | $(meets "$cpu <= 0.75 * $cpu_n") |"
    echo "| same: user-space CPU µs per delivery | 2.05 | ≤ 0.5 | $(fmt 2 "$user") | ngircd $(fmt 2 "$user_n") | $(meets "$user <= 0.5") |"
    echo "| same: p50 / p99 ms | 1.2 / 11-13 | ≤ 0.5 / 2 | $(fmt 2 "$p50") / $(fmt 2 "$p99") | ngircd $(fmt 2 "$p50_n") / $(fmt 2 "$p99_n") | $(meets "$p50 <= 0.5 && $p99 <= 2") |"
    echo "| same: deliveries per read (no goal) | 1.62 | - | $(fmt 2 "$dpr") | ngircd $(fmt 2 "$dpr_n") | - |"
    echo "| M=100 R=100: p99 ms | - | < 1 | $(fmt 2 "$p99s") | ngircd $(fmt 2 "$p99s_n") | $(meets "$p99s < 1") |"
    echo "| $big: CPU µs per delivery, p99 ms | 4.95, 23.6 | ≤ 3.5, ≤ 10 | $(fmt 2 "$cpub"), $(fmt 2 "$p99b") | ngircd $(fmt 2 "$cpub_n"), $(fmt 2 "$p99b_n") | $(meets "$cpub <= 3.5 && $p99b <= 10") |"
    echo "| saturated deliveries/s (M=100), highest rate keeping up | 1.01 × ngircd | ≥ 1.5 × ngircd | $(fmt 0 "$sat") ($(ratio "$sat" "$sat_n") × ngircd) | ngircd $(fmt 0 "$sat_n") | $(meets "$sat >= 1.5 * $sat_n") |"
    echo "| idle TCP KiB per connection, at $PEER_IDLE | 4.56 | ≤ 2.5 (at 50,000; a process here holds at most 20,000) | $(fmt 2 "$idle") | ngircd $(fmt 2 "$idle_n") | $(meets "$idle <= 2.5") |"
    echo "| idle SSE KiB per session, at $IDLE_CONNS | 30 | ≤ 8 | $(fmt 2 "$sse") | - | $(meets "$sse <= 8") |"
    echo "| SSE fan-out, deliveries per server CPU-second | - | ≥ 5 × Node better-sse | $sse_b ($(ratio "$sse_b" "$sse_n") × Node) | Node $sse_n | $(meets "$sse_b >= 5 * $sse_n") |"
  } >"$TARGETS"
fi

echo "== report"
mkdir -p "$(dirname "$OUT")"
ELAPSED=$(( $(date +%s) - STARTED ))
TABLES=$("$BIN" bench report "$RESULTS" --svg "$SVG")
MEM_GIB=$(awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo)
CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || echo unknown)
{
  echo "# Benchmarks"
  echo
  echo "Generated by \`scripts/bench.sh\` on $(date -u +%Y-%m-%d) in ${ELAPSED} s (medians of $RUNS runs)."
  echo "Do not edit by hand: run the script again. Hand-written analysis is in"
  echo "[benchmarks-notes.md](benchmarks-notes.md)."
  echo
  echo "## Machine"
  echo
  echo "- $(nproc)-core $(uname -m), ${MEM_GIB} GiB memory, $CPU_MODEL"
  echo "- $(uname -s), $(rustc --version 2>/dev/null | cut -d" " -f1-2 || echo rustc)"
  echo "- release build; daemons pinned to CPU 0, the load generator to CPU 1; loopback only"
  echo
  echo "## Commands"
  echo
  echo "Each point starts fresh daemons (on port 0, with a new SQLite file), then runs:"
  echo
  echo '```sh'
  cat "$COMMANDS"
  echo '```'
  echo
  echo "## Results"
  echo
  echo "Latency is send-to-receive, measured by the load generator from a timestamp in"
  echo "each message (one clock, one process). Deliveries are distinct messages received"
  echo "by members; \"lost\" are expected deliveries that never came, \"duplicates\" are"
  echo "messages a member received twice."
  echo
  if [ -s "$TARGETS" ]; then
    echo "### The delivery path against its targets"
    echo
    echo "Medians of the same run, baby-discord beside ngircd (a C IRC server, bench/ngircd)"
    echo "under the same load, and beside a Node 20 better-sse hub for SSE. \"When set\" is"
    echo "what the targets were set against (2026-11, an independent load generator)."
    echo "The targets name 50,000 idle connections; a process here may hold $(ulimit -Hn) descriptors"
    echo "(\`ulimit -Hn\`), and ngircd takes about 50 s to accept 10,000, so both hold $PEER_IDLE."
    echo
    cat "$TARGETS"
    echo
    echo "### Every point"
    echo
  fi
  echo "$TABLES"
  if [ -s "$REDIS_COSTS" ]; then
    echo
    echo "Redis commands per redis-bus cluster run, all of the run's commands: the"
    echo "members' joins and the heartbeats included. EVALSHA runs the scripts: the"
    echo "publish script (one per message) and the directory's (nick claims, joins)."
    echo
    echo "| run | Redis commands | EVALSHA | messages offered |"
    echo "|---|---|---|---|"
    n=0; while read -r total eval; do n=$((n + 1));
      echo "| $n | $total | $eval | $(awk -v d="$DURATION" 'BEGIN { print 50 * d }') |"; done <"$REDIS_COSTS"
    echo
  fi
  if [ -s "$SSE_COSTS" ]; then
    echo
    echo "SSE fan-out, deliveries per server CPU-second (10^6 / median CPU µs per delivery)"
    echo "for the same load on each server, runs interleaved:"
    echo
    echo "| server | deliveries per CPU-second |"
    echo "|---|---|"
    while read -r line; do echo "| ${line% *} | ${line##* } |"; done <"$SSE_COSTS"
    echo
  fi
  if [ -s "$PENDING" ]; then
    echo "Pending or failed:"
    echo
    sed 's/^/- /' "$PENDING"
    echo
  fi
  echo "![latency by rate, and poll-bus latency by poll interval]($(basename "$SVG"))"
} >"$OUT"
echo "wrote $OUT and $SVG in ${ELAPSED} s"
