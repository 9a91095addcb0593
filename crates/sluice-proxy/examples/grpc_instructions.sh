#!/usr/bin/env bash
# Server instructions per unary SendMessage, counted by callgrind: a figure that does not
# move with the machine's load or clock, so two server binaries can be compared exactly.
#
#   cargo build --release -p sluice --bin sluice -p sluice-proxy --example grpc_bench
#   bash crates/sluice-proxy/examples/grpc_instructions.sh [SERVER_BINARY] [SECONDS]
#
# Starts SERVER_BINARY (default target/release/sluice) under `valgrind --tool=callgrind`
# with instrumentation off, creates the topic `bench` (8 queues) and the group
# `bench-group`, warms up with 3 s of load, then switches instrumentation on for SECONDS
# (default 6) of `grpc_bench --only many --client raw --connections 2` (64 unbatched 1 KiB
# sends in flight) and divides the instructions executed by the SendMessage calls the
# server counted meanwhile (its /metrics). Needs valgrind (Debian package `valgrind`) and
# curl. Ports 7711/7712 on 127.0.0.1 must be free.
set -euo pipefail
cd "$(dirname "$0")/../../.."
BIN=${1:-target/release/sluice}
SECS=${2:-6}
BENCH=target/release/examples/grpc_bench
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
OUT=$WORK/callgrind.out
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT" \
  "$BIN" server --flush async --data-dir "$WORK/data" \
  --listen 127.0.0.1:7711 --admin-listen 127.0.0.1:7712 >"$WORK/server.log" 2>&1 &
PID=$!
for _ in $(seq 300); do
  curl -fs -o /dev/null http://127.0.0.1:7712/readyz && break
  sleep 0.2
done
"$BIN" --admin http://127.0.0.1:7712 topic create bench --type normal --queues 8 >/dev/null
"$BIN" --admin http://127.0.0.1:7712 group create bench-group >/dev/null
load() {
  "$BENCH" --target 127.0.0.1:7711 --workers 1 --flush async --seconds "$1" \
    --client raw --connections 2 --only many >>"$WORK/bench.log" 2>&1
}
sends() {
  curl -fs http://127.0.0.1:7712/metrics |
    awk '/^sluice_grpc_requests_total\{rpc="SendMessage"\}/ { print $2 }'
}
load 3
before=$(sends)
callgrind_control -i on "$PID" >/dev/null
load "$SECS"
callgrind_control -i off "$PID" >/dev/null
after=$(sends)
callgrind_control -d "$PID" >/dev/null
kill -TERM "$PID"
wait "$PID" || true
# awk reads to the end: an early exit would fail the pipeline (pipefail) with SIGPIPE.
total=$(callgrind_annotate "$OUT.1" | awk '/PROGRAM TOTALS/ && !t { gsub(",", "", $1); t = $1 } END { print t }')
calls=$((after - before))
echo "SendMessage calls: $calls; server instructions: $total; per call: $((total / calls))"
