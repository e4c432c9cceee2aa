#!/usr/bin/env bash
# Start, stop and watch N baby-discord instances on consecutive ports that
# behave as one chat.
#
#   scripts/cluster.sh start [-n N] [--db URL] [--bus SPEC] [--cluster NAME] [--poll-interval MS] [--debug]
#   scripts/cluster.sh status
#   scripts/cluster.sh logs [I]      # all instances, or instance I (1..N), followed
#   scripts/cluster.sh stop
#
# Instance I listens on TCP 9000+I and HTTP 3000+I (so 9001-9003 / 3001-3003 by
# default) and is called iI. Defaults: 3 instances, --bus poll, and one SQLite
# file shared by all of them, so nothing needs installing. For PostgreSQL:
#
#   scripts/cluster.sh start --db postgres://postgres@127.0.0.1:5432/postgres
#
# On the redis bus (Redis or Valkey orders the rooms and carries the messages;
# the database only stores them), as docker-compose.yml does with containers:
#
#   scripts/cluster.sh start --bus redis://127.0.0.1:6379 --db postgres://postgres@127.0.0.1:5432/postgres
#
# State (pids, logs, the shared SQLite file) lives in .cluster/ at the top of
# the repository; `stop` leaves the logs and the database there.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
state="$root/.cluster"
base_tcp=9000
base_http=3000

usage() {
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

pids() {
  ls "$state"/*.pid 2>/dev/null || true
}

start() {
  local n=3 db="" bus="poll" interval="" cluster="" profile="release"
  while [ $# -gt 0 ]; do
    case "$1" in
      -n) n="$2"; shift 2 ;;
      --db) db="$2"; shift 2 ;;
      --bus) bus="$2"; shift 2 ;;
      --cluster) cluster="$2"; shift 2 ;;
      --poll-interval) interval="$2"; shift 2 ;;
      --debug) profile="debug"; shift ;;
      *) usage ;;
    esac
  done
  if [ -n "$(pids)" ]; then
    echo "a cluster is already running (scripts/cluster.sh stop first)" >&2
    exit 1
  fi
  mkdir -p "$state"
  [ -n "$db" ] || db="sqlite://$state/cluster.db"

  local flags=()
  [ "$profile" = release ] && flags+=(--release)
  echo "building ($profile)..."
  (cd "$root" && cargo build -q "${flags[@]}")
  local bin="${CARGO_TARGET_DIR:-$root/target}/$profile/baby-discord"

  # One after the other: the first one creates and migrates the database.
  for i in $(seq 1 "$n"); do
    local log="$state/i$i.log" args
    args=(--tcp "127.0.0.1:$((base_tcp + i))" --http "127.0.0.1:$((base_http + i))"
          --db "$db" --bus "$bus" --instance "i$i")
    [ -n "$interval" ] && args+=(--poll-interval "$interval")
    [ -n "$cluster" ] && args+=(--cluster "$cluster")
    : >"$log"
    "$bin" "${args[@]}" >>"$log" 2>&1 &
    echo $! >"$state/i$i.pid"
    # Wait for the "listening" line, or for the instance to die.
    for _ in $(seq 1 100); do
      grep -q "listening tcp=" "$log" && break
      if ! kill -0 "$(cat "$state/i$i.pid")" 2>/dev/null; then
        echo "instance i$i failed to start:" >&2
        tail -n 20 "$log" >&2
        stop >/dev/null
        exit 1
      fi
      sleep 0.1
    done
    grep -q "listening tcp=" "$log" || { echo "instance i$i did not start in 10 s" >&2; stop; exit 1; }
    echo "i$i: nc 127.0.0.1 $((base_tcp + i))   http://127.0.0.1:$((base_http + i))/"
  done
  echo "bus=$bus db=$db   logs: scripts/cluster.sh logs   stop: scripts/cluster.sh stop"
}

# Prints "NAME PID" for every instance started and not yet stopped.
instances() {
  for f in $(pids); do
    echo "$(basename "$f" .pid) $(cat "$f")"
  done
}

stop() {
  local name pid
  [ -n "$(pids)" ] || { echo "no cluster is running"; return; }
  while read -r name pid; do
    if kill -TERM "$pid" 2>/dev/null; then
      # A graceful stop flushes the writer; give it 10 s, then insist.
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null && echo "$name: killed after 10 s" || echo "$name: stopped"
    else
      echo "$name: was not running"
    fi
    rm -f "$state/$name.pid"
  done < <(instances)
}

status() {
  local name pid
  [ -n "$(pids)" ] || { echo "no cluster is running"; return; }
  while read -r name pid; do
    if kill -0 "$pid" 2>/dev/null; then
      echo "$name: running (pid $pid) $(grep -o 'listening tcp=[^ ]* http=[^ ]*' "$state/$name.log" | head -n1)"
    else
      echo "$name: dead (see $state/$name.log)"
    fi
  done < <(instances)
}

logs() {
  if [ $# -gt 0 ]; then
    exec tail -n 50 -F "$state/i$1.log"
  fi
  exec tail -n 20 -F "$state"/i*.log
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  start) start "$@" ;;
  stop) stop ;;
  status) status ;;
  logs) logs "$@" ;;
  *) usage ;;
esac
