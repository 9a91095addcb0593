#!/usr/bin/env bash
# System tests: the OFFICIAL RocketMQ 5 clients (Python 5.1.2, Node.js 1.0.8,
# Rust crate 5.0.0) against a real Sluice server.
#
#   SLUICE_BIN=target/debug/sluice tests/clients/run.sh
#
# Environment:
#   SLUICE_BIN     path of the sluice binary (default: <repo>/target/debug/sluice)
#   SLUICE_FLUSH   --flush mode of the server (default: sync)
#   ONLY           extended regex: run only the scenarios whose name matches
#   KEEP_WORK=1    keep the work directory (logs, data, JSON) even when all pass
#   RMQ_TEST_VERBOSE=1  client INFO/DEBUG logs on stderr (Python/Node)
#
# Starts the server on free loopback ports with a temporary data dir, creates
# topics/groups with the CLI, runs each scenario, prints PASS/FAIL per scenario
# and ends with the line "N passed, M failed" (exit status 1 if any failed).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SLUICE_BIN="${SLUICE_BIN:-$REPO/target/debug/sluice}"
# A relative path containing "/" is taken relative to the current directory.
[[ "$SLUICE_BIN" == */* && "$SLUICE_BIN" != /* ]] && SLUICE_BIN="$PWD/$SLUICE_BIN"
FLUSH="${SLUICE_FLUSH:-sync}"
ONLY="${ONLY:-}"
READY_TIMEOUT="${READY_TIMEOUT:-60}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sluice-clients.XXXXXX")"
DATA="$WORK/data"
SERVER_LOG="$WORK/server.log"
PIDFILE="$WORK/server.pid"
EXITFILE="$WORK/server.exit"
PY="$HERE/python/.venv/bin/python"
RUST_BIN=""
GRPC_PORT=""
ADMIN_PORT=""
PASSED=0
FAILED=0
FAILED_NAMES=()

say() { printf '[run.sh %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die_setup() {
  say "SETUP FAILED: $*"
  echo "0 passed, 1 failed"
  exit 1
}

# ---------------------------------------------------------------- server ----

server_pid() { cat "$PIDFILE" 2>/dev/null || true; }

server_alive() {
  local pid
  pid="$(server_pid)"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

pick_ports() {
  read -r GRPC_PORT ADMIN_PORT < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(2):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(*[s.getsockname()[1] for s in socks])
EOF
)
  [[ -n "$GRPC_PORT" && -n "$ADMIN_PORT" ]] || die_setup "could not pick free ports"
}

# start_server: launch in the background; a wrapper records the exit status.
start_server() {
  rm -f "$PIDFILE" "$EXITFILE"
  echo "---- start $(date +%T) ----" >>"$SERVER_LOG"
  (
    set +e # may be called from a scenario running under `set -e`
    "$SLUICE_BIN" server --data-dir "$DATA" --listen "127.0.0.1:$GRPC_PORT" \
      --admin-listen "127.0.0.1:$ADMIN_PORT" --flush "$FLUSH" >>"$SERVER_LOG" 2>&1 &
    echo $! >"$PIDFILE"
    wait $!
    echo $? >"$EXITFILE"
  ) >/dev/null 2>&1 &
  local i
  for i in $(seq 50); do [[ -s "$PIDFILE" ]] && break; sleep 0.1; done
  wait_ready
}

wait_ready() {
  local deadline=$((SECONDS + READY_TIMEOUT))
  while ((SECONDS < deadline)); do
    if ! server_alive; then
      say "server exited before becoming ready (exit status $(cat "$EXITFILE" 2>/dev/null || echo '?'))"
      tail -n 40 "$SERVER_LOG" | sed 's/^/  server| /'
      return 1
    fi
    if python3 - "$ADMIN_PORT" <<'EOF' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
    then
      return 0
    fi
    sleep 0.3
  done
  say "server not ready after ${READY_TIMEOUT}s (GET /readyz on port $ADMIN_PORT)"
  tail -n 40 "$SERVER_LOG" | sed 's/^/  server| /'
  return 1
}

# wait_server_exit SECONDS: wait for the server process to disappear.
wait_server_exit() {
  local deadline=$((SECONDS + $1))
  while ((SECONDS < deadline)); do
    server_alive || return 0
    sleep 0.2
  done
  return 1
}

# The wrapper writes the exit status just after the process is reaped.
server_exit_status() {
  local i
  for i in $(seq 50); do [[ -s "$EXITFILE" ]] && break; sleep 0.1; done
  cat "$EXITFILE" 2>/dev/null || echo "unknown"
}

kill_server() { # SIGKILL, no grace
  local pid
  pid="$(server_pid)"
  [[ -n "$pid" ]] && kill -KILL "$pid" 2>/dev/null
  wait_server_exit 10
}

cleanup() {
  local pid
  pid="$(server_pid)"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    wait_server_exit 10 || kill -KILL "$pid" 2>/dev/null
  fi
  if ((FAILED > 0)) || [[ -n "${KEEP_WORK:-}" ]]; then
    say "logs and data kept in $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------------ CLI -----

admin_url() { echo "http://127.0.0.1:$ADMIN_PORT"; }

topic_create() { # NAME TYPE [QUEUES]
  echo "+ sluice topic create $1 --type $2 --queues ${3:-4}"
  timeout -k 5 30 "$SLUICE_BIN" topic create "$1" --type "$2" --queues "${3:-4}" --admin "$(admin_url)"
}

group_create() { # NAME [extra args...]
  local name="$1"
  shift
  echo "+ sluice group create $name $*"
  timeout -k 5 30 "$SLUICE_BIN" group create "$name" "$@" --admin "$(admin_url)"
}

# --------------------------------------------------------------- clients ----

ENDPOINT() { echo "127.0.0.1:$GRPC_PORT"; }

# Each client call: hard timeout, JSON stdout to OUT, stderr to the scenario log.
py_run() { # OUT TIMEOUT SCRIPT ARGS...
  local out="$1" t="$2" script="$3"
  shift 3
  echo "+ python $script $*"
  timeout -k 10 "$t" "$PY" "$HERE/python/$script" --endpoint "$(ENDPOINT)" --timeout "$((t - 5))" "$@" >"$out"
}

node_run() { # OUT TIMEOUT SCRIPT ARGS...
  local out="$1" t="$2" script="$3"
  shift 3
  echo "+ node $script $*"
  timeout -k 10 "$t" node "$HERE/node/$script" --endpoint "$(ENDPOINT)" --timeout "$((t - 5))" "$@" >"$out"
}

rust_run() { # OUT TIMEOUT SUBCOMMAND ARGS...
  local out="$1" t="$2" sub="$3"
  shift 3
  echo "+ rmq-rust-client $sub $*"
  timeout -k 10 "$t" "$RUST_BIN" "$sub" --endpoint "$(ENDPOINT)" --timeout "$((t - 5))" "$@" >"$out"
}

# send_with LANG OUT TOPIC COUNT / receive_with LANG OUT TOPIC GROUP MANIFEST
send_with() {
  case "$1" in
    python) py_run "$2" 90 send_only.py --topic "$3" --count "$4" ;;
    node) node_run "$2" 90 send_only.mjs --topic "$3" --count "$4" ;;
    rust) rust_run "$2" 90 send --topic "$3" --count "$4" ;;
  esac
}

receive_with() {
  case "$1" in
    python) py_run "$2" 120 receive_only.py --topic "$3" --group "$4" --expect-file "$5" --wait 90 ;;
    node) node_run "$2" 120 receive_only.mjs --topic "$3" --group "$4" --expect-file "$5" --wait 90 ;;
    rust) rust_run "$2" 120 receive --topic "$3" --group "$4" --expect-file "$5" --wait 90 ;;
  esac
}

# -------------------------------------------------------------- scenarios ---
# Each scenario runs in a subshell with `set -e`; SDIR is its own directory.

sc_python_send_receive() {
  topic_create t_py_sr normal
  group_create g_py_sr
  py_run "$SDIR/result.json" 120 send_receive.py --topic t_py_sr --group g_py_sr --count 10
}

# pair SENDER RECEIVER: SENDER sends 10 messages, RECEIVER receives + verifies.
pair() {
  local t="t_${1}_${2}" g="g_${1}_${2}"
  topic_create "$t" normal
  group_create "$g"
  send_with "$1" "$SDIR/sent.json" "$t" 10
  receive_with "$2" "$SDIR/received.json" "$t" "$g" "$SDIR/sent.json"
}

sc_node_to_node() { pair node node; }
sc_rust_to_rust() { pair rust rust; }
sc_python_to_node() { pair python node; }
sc_node_to_rust() { pair node rust; }
sc_rust_to_python() { pair rust python; }

sc_python_push_nack() {
  topic_create t_py_push normal
  group_create g_py_push --max-attempts 5
  py_run "$SDIR/result.json" 120 push_nack.py --topic t_py_push --group g_py_push --count 5
}

sc_node_push_nack() {
  topic_create t_node_push normal
  group_create g_node_push --max-attempts 5
  node_run "$SDIR/result.json" 120 push_nack.mjs --topic t_node_push --group g_node_push --count 5
}

sc_python_invisible_dlq() {
  topic_create t_dlq normal
  group_create g_dlq --max-attempts 2
  # The reader group of %DLQ%g_dlq must exist before the message lands there.
  group_create g_dlq_reader
  py_run "$SDIR/result.json" 200 invisible_dlq.py --topic t_dlq --group g_dlq --dlq-group g_dlq_reader
}

sc_restart_kill9() {
  topic_create t_restart normal
  group_create g_restart
  send_with python "$SDIR/sent.json" t_restart 100
  echo "+ SIGKILL server (pid $(server_pid)) after 100 acknowledged sends"
  kill_server
  echo "+ restart server on the same data dir and ports"
  start_server
  node_run "$SDIR/received.json" 150 receive_only.mjs --topic t_restart --group g_restart \
    --expect-file "$SDIR/sent.json" --wait 120
}

sc_sigterm_graceful() {
  local status
  echo "+ SIGTERM server (pid $(server_pid))"
  kill -TERM "$(server_pid)"
  if ! wait_server_exit 30; then
    echo "server still running 30s after SIGTERM"
    return 1
  fi
  status="$(server_exit_status)"
  echo "server exit status: $status"
  [[ "$status" == "0" ]]
}

SCENARIOS=(
  python_send_receive
  node_to_node
  rust_to_rust
  python_to_node
  node_to_rust
  rust_to_python
  python_push_nack
  node_push_nack
  python_invisible_dlq
  restart_kill9
  sigterm_graceful
)

# Further scenario groups live in scenarios/*.sh: each defines sc_<name> functions and
# appends its names to EXTRA_SCENARIOS. They run before the restart scenarios.
EXTRA_SCENARIOS=()
for f in "$HERE"/scenarios/*.sh; do
  [[ -e "$f" ]] || continue
  # shellcheck source=/dev/null
  source "$f"
done
if ((${#EXTRA_SCENARIOS[@]} > 0)); then
  SCENARIOS=("${SCENARIOS[@]:0:9}" "${EXTRA_SCENARIOS[@]}" "${SCENARIOS[@]:9}")
fi

run_scenario() {
  local name="$1" start rc
  if [[ -n "$ONLY" && ! "$name" =~ $ONLY ]]; then
    return 0
  fi
  SDIR="$WORK/$name"
  mkdir -p "$SDIR"
  if ! server_alive && [[ "$name" != sigterm_graceful ]]; then
    say "server not running before $name; restarting it"
    start_server >>"$SDIR/log" 2>&1 || true
  fi
  start=$SECONDS
  (
    set -e
    "sc_$name"
  ) >>"$SDIR/log" 2>&1
  rc=$?
  if ((rc == 0)); then
    PASSED=$((PASSED + 1))
    say "PASS $name ($((SECONDS - start))s)"
  else
    FAILED=$((FAILED + 1))
    FAILED_NAMES+=("$name")
    say "FAIL $name ($((SECONDS - start))s, status $rc); last lines of $SDIR/log:"
    tail -n 60 "$SDIR/log" | cut -c1-400 | sed 's/^/  | /'
    echo "  server log (last 20 lines):"
    tail -n 20 "$SERVER_LOG" 2>/dev/null | cut -c1-400 | sed 's/^/  server| /'
  fi
}

# ------------------------------------------------------------------ setup ---

setup_python() {
  if [[ -x "$PY" ]] && "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('rocketmq-python-client') != '5.1.2')" 2>/dev/null; then
    return 0
  fi
  say "installing the Python client into tests/clients/python/.venv"
  rm -rf "$HERE/python/.venv"
  python3 -m venv "$HERE/python/.venv" || return 1
  "$PY" -m pip install --quiet --disable-pip-version-check -r "$HERE/python/requirements.txt" || return 1
}

setup_node() {
  if [[ -f "$HERE/node/node_modules/rocketmq-client-nodejs/package.json" ]] &&
    [[ "$(node -p "require('$HERE/node/node_modules/rocketmq-client-nodejs/package.json').version" 2>/dev/null)" == "1.0.8" ]]; then
    return 0
  fi
  say "installing the Node.js client (npm ci)"
  (cd "$HERE/node" && npm ci --no-audit --no-fund --loglevel=error) || return 1
}

setup_rust() {
  say "building the Rust client test program (cargo build --locked)"
  (cd "$HERE/rust" && cargo build --locked --quiet) || return 1
  local target="${CARGO_TARGET_DIR:-target}"
  [[ "$target" == /* ]] || target="$HERE/rust/$target"
  RUST_BIN="$target/debug/rmq-rust-client"
  [[ -x "$RUST_BIN" ]] || { say "missing $RUST_BIN after build"; return 1; }
}

main() {
  say "work directory: $WORK"
  [[ -x "$SLUICE_BIN" ]] || die_setup "sluice binary not found or not executable: $SLUICE_BIN (set SLUICE_BIN)"
  command -v python3 >/dev/null || die_setup "python3 not found"
  command -v node >/dev/null || die_setup "node not found"
  command -v cargo >/dev/null || die_setup "cargo not found"
  setup_python || die_setup "Python client installation failed"
  setup_node || die_setup "Node.js client installation failed"
  setup_rust || die_setup "Rust client build failed"

  mkdir -p "$DATA"
  pick_ports
  say "starting $SLUICE_BIN (gRPC 127.0.0.1:$GRPC_PORT, admin 127.0.0.1:$ADMIN_PORT, flush $FLUSH)"
  start_server || die_setup "server did not start (log: $SERVER_LOG)"

  local name
  for name in "${SCENARIOS[@]}"; do
    run_scenario "$name"
  done

  if ((FAILED > 0)); then
    say "failed: ${FAILED_NAMES[*]}"
  fi
  echo "$PASSED passed, $FAILED failed"
  ((FAILED == 0))
}

main "$@"
