# shellcheck shell=bash
# Transactional messages with the official clients. Sourced by run.sh (which provides
# topic_create, group_create, py_run, node_run, receive_with, kill_server, start_server,
# SDIR, RUST_BIN).
#
# The server checks orphaned transactions after [broker] transaction_check_interval
# (30s by default). This file is sourced before run.sh starts the server, so the exported
# variable below shortens the interval for the whole run; only transactional topics are
# affected. Override it by setting the variable before running run.sh.
export SLUICE_BROKER__TRANSACTION_CHECK_INTERVAL="${SLUICE_BROKER__TRANSACTION_CHECK_INTERVAL:-2s}"

rust_tx_run() { # OUT TIMEOUT ARGS...
  local out="$1" t="$2"
  shift 2
  echo "+ rmq-rust-tx $*"
  timeout -k 10 "$t" "$(dirname "$RUST_BIN")/rmq-rust-tx" --endpoint "$(ENDPOINT)" --timeout "$((t - 5))" "$@" >"$out"
}

# tx_flow LANG: LANG's producer sends five transactional messages: A committed, B rolled
# back, C, D and E never ended; its checker answers COMMIT for C, ROLLBACK for D and
# "unknown" for E when the server asks (E at least twice). Then LANG's consumer receives
# A and C intact, and a Python consumer in a second group receives A and C and, lingering,
# nothing else: B, D (rolled back) and E (unresolved) are never delivered.
tx_flow() {
  local lang="$1" t="t_tx_$1" g="g_tx_$1" g2="g_tx_$1_all"
  topic_create "$t" transaction 2
  group_create "$g"
  group_create "$g2"
  case "$lang" in
    python) py_run "$SDIR/sent.json" 120 tx.py produce --topic "$t" ;;
    node) node_run "$SDIR/sent.json" 120 tx.mjs --topic "$t" ;;
    rust) rust_tx_run "$SDIR/sent.json" 120 --topic "$t" ;;
  esac
  receive_with "$lang" "$SDIR/received.json" "$t" "$g" "$SDIR/sent.json"
  py_run "$SDIR/verified.json" 120 tx.py verify --topic "$t" --group "$g2" \
    --expect-file "$SDIR/sent.json" --linger 6
}

sc_python_transactions() { tx_flow python; }
sc_node_transactions() { tx_flow node; }
sc_rust_transactions() { tx_flow rust; }

# A half message outlives a SIGKILL of the server: after the restart the server asks a new
# producer of the topic (the sender is gone), which answers COMMIT; a Node.js consumer
# then receives it intact.
sc_python_tx_restart() {
  topic_create t_tx_restart transaction 1
  group_create g_tx_restart
  py_run "$SDIR/half.json" 60 tx.py half --topic t_tx_restart
  echo "+ SIGKILL server (pid $(server_pid)) with one transaction pending"
  kill_server
  echo "+ restart server on the same data dir and ports"
  start_server
  py_run "$SDIR/answered.json" 90 tx.py answer --topic t_tx_restart \
    --expect-file "$SDIR/half.json" --resolution commit
  receive_with node "$SDIR/received.json" t_tx_restart g_tx_restart "$SDIR/half.json"
}

EXTRA_SCENARIOS+=(python_transactions node_transactions rust_transactions python_tx_restart)
