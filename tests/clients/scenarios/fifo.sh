# shellcheck shell=bash
# FIFO order per message group with the official clients (issue #4). Sourced by run.sh
# (which provides topic_create, group_create, py_run, node_run, rust_run, SDIR, HERE, PY).
#
# fifo_order_retry: a Python producer sends 60 messages over 6 message groups (round-robin,
# per-group sequence number in the user property "seq") to a FIFO topic with 4 queues.
# Three SimpleConsumers of one FIFO group (Python, Node.js, Rust), started before the
# sends, receive concurrently (batch 2, invisible time 8 s, 30 ms of "work" before each
# ack) and log every delivery (group, seq, attempt, receive and ack wall-clock times).
# Whoever first receives fifo-2#5 does not ack it: Python and Node.js shorten its
# invisible time to 2 s with ChangeInvisibleDuration, Rust (no such call in 5.0.0) lets
# the 8 s run out. `fifo.py verify` then merges the logs and requires: every message acked
# exactly once; per group acks in send order; no message received before its
# predecessor in the group was acked; fifo-2#5 delivered twice (attempts 1 then 2, the 2nd
# not before the hold ran out); groups served by more than one consumer, concurrently.
#
# fifo_no_group_rejected: a message without message group sent to a FIFO topic is
# refused: by the Rust client with the server's MESSAGE_PROPERTY_CONFLICT_WITH_TYPE
# (40014; this client does not check message types), by the Python and Node.js clients
# already client-side (they compare the message type with the route's accept_message_types
# because the server's settings set validate_message_type).

FIFO_GROUPS=6
FIFO_PER_GROUP=10
FIFO_RETRY_GROUP=fifo-2
FIFO_RETRY_SEQ=5

sc_fifo_order_retry() {
  local t=t_fifo g=g_fifo total=$((FIFO_GROUPS * FIFO_PER_GROUP))
  local stop="$SDIR/stop" ev_py="$SDIR/events.python" ev_node="$SDIR/events.node" ev_rust="$SDIR/events.rust"
  local retry=(--retry-group "$FIFO_RETRY_GROUP" --retry-seq "$FIFO_RETRY_SEQ")
  local pids=() p rc=0
  topic_create "$t" fifo 4
  group_create "$g" --fifo --max-attempts 5

  py_run "$SDIR/c_python.json" 150 fifo.py consume --topic "$t" --group "$g" --name python \
    --events "$ev_py" --stop-file "$stop" --invisible 8 --batch 2 --work-ms 30 --cid 2 "${retry[@]}" \
    2>"$SDIR/c_python.log" &
  pids+=($!)
  node_run "$SDIR/c_node.json" 150 fifo.mjs --mode consume --topic "$t" --group "$g" --name node \
    --events "$ev_node" --stop-file "$stop" --invisible-ms 8000 --batch 2 --work-ms 30 --cid-ms 2000 "${retry[@]}" \
    2>"$SDIR/c_node.log" &
  pids+=($!)
  rust_run "$SDIR/c_rust.json" 150 fifo-consume --topic "$t" --group "$g" --name rust \
    --events "$ev_rust" --stop-file "$stop" --invisible 8 --batch 2 --work-ms 30 "${retry[@]}" \
    2>"$SDIR/c_rust.log" &
  pids+=($!)

  # Send only once every consumer is polling, so that all of them can get work.
  py_run "$SDIR/ready.json" 60 fifo.py wait --events "$ev_py" "$ev_node" "$ev_rust" --ready 3 --wait 50 || rc=1
  if ((rc == 0)); then
    py_run "$SDIR/sent.json" 60 fifo.py produce --topic "$t" --groups "$FIFO_GROUPS" --per-group "$FIFO_PER_GROUP" || rc=1
  fi
  if ((rc == 0)); then
    # All acked (or give up), then linger 2 s so that extra deliveries would still be logged.
    py_run "$SDIR/acked.json" 90 fifo.py wait --events "$ev_py" "$ev_node" "$ev_rust" \
      --acked "$total" --linger 2 --wait 80 || rc=1
  fi
  echo "+ touch stop file; waiting for the consumers"
  touch "$stop"
  for p in "${pids[@]}"; do
    wait "$p" || { echo "consumer pid $p exited with status $?"; rc=1; }
  done
  for p in python node rust; do
    echo "---- consumer $p (stderr)"
    cat "$SDIR/c_$p.log"
  done
  if [[ -s "$SDIR/sent.json" ]]; then
    py_run "$SDIR/verified.json" 60 fifo.py verify --sent "$SDIR/sent.json" \
      --logs "$SDIR/c_python.json" "$SDIR/c_node.json" "$SDIR/c_rust.json" "${retry[@]}" --min-consumers 2 || rc=1
  fi
  return "$rc"
}

sc_fifo_no_group_rejected() {
  local t=t_fifo_nogroup
  topic_create "$t" fifo 2
  rust_run "$SDIR/rust.json" 60 fifo-no-group --topic "$t"
  py_run "$SDIR/python.json" 60 fifo.py no-group --topic "$t"
  node_run "$SDIR/node.json" 60 fifo.mjs --mode no-group --topic "$t"
}

EXTRA_SCENARIOS+=(fifo_order_retry fifo_no_group_rejected)
