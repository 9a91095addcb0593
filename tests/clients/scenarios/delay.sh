# Delay (timer) messages and RecallMessage with the official clients. Sourced by run.sh.
#
# Each delay scenario checks with the client's own clock (same host as the server) that
# every message arrives not before its delivery time and at most 1 s after it, that the
# delivery_timestamp it carries is exactly the one sent (python: whole seconds, node:
# milliseconds), and that recalled messages never arrive.

sc_python_delay_recall() {
  topic_create t_delay_py delay
  group_create g_delay_py
  py_run "$SDIR/result.json" 90 delay.py --topic t_delay_py --group g_delay_py \
    --count 3 --recall 1 --delay 4
}

sc_node_delay_recall() {
  topic_create t_delay_node delay
  group_create g_delay_node
  node_run "$SDIR/result.json" 90 delay.mjs --topic t_delay_node --group g_delay_node \
    --count 3 --recall 1 --delay-ms 3500
}

# Python sends (and recalls one), the server is SIGKILLed and restarted while the messages
# wait, node receives: pending timers and the recall survive, nothing arrives early or
# twice. Leaves the server running.
sc_delay_restart_kill9() {
  topic_create t_delay_restart delay
  group_create g_delay_restart
  py_run "$SDIR/sent.json" 60 delay.py --mode send --topic t_delay_restart \
    --count 2 --recall 1 --delay 12
  echo "+ SIGKILL server (pid $(server_pid)) with delay messages pending"
  kill_server
  echo "+ restart server on the same data dir and ports"
  start_server
  node_run "$SDIR/received.json" 90 delay.mjs --mode receive --topic t_delay_restart \
    --group g_delay_restart --expect-file "$SDIR/sent.json"
}

# The Rust client (whole seconds, no recall in 5.0.0) sends; Python receives and checks.
sc_rust_to_python_delay() {
  topic_create t_delay_rust delay
  group_create g_delay_rust
  echo "+ rmq-rust-delay --topic t_delay_rust --count 3 --delay 6"
  timeout -k 10 60 "$(dirname "$RUST_BIN")/rmq-rust-delay" --endpoint "$(ENDPOINT)" --timeout 55 \
    --topic t_delay_rust --count 3 --delay 6 >"$SDIR/sent.json"
  py_run "$SDIR/received.json" 60 delay.py --mode receive --topic t_delay_rust \
    --group g_delay_rust --expect-file "$SDIR/sent.json"
}

EXTRA_SCENARIOS+=(python_delay_recall node_delay_recall rust_to_python_delay delay_restart_kill9)
