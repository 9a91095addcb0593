# Authentication and permissions with the official clients. Sourced by run.sh.
#
# Starts a second server of its own (own ports and data dir, [proxy] acl_file set through
# the environment) and stops it at the end. Python signs as a producer allowed to publish
# to t_auth; Node signs as a consumer allowed to subscribe to t_auth as g_auth and receives
# exactly what Python sent. Rust signs as the producer, then as the consumer, and gets back
# its own 3 messages. A wrong secret key is refused (Python: UNAUTHORIZED; Rust: its Telemetry
# stream, UNAUTHENTICATED),
# and the consumer's key may not publish (Node gets FORBIDDEN); none of these stores
# anything.

sc_auth_acl() {
  cat >"$SDIR/acl.toml" <<'ACL'
[[users]]
access_key = "producer-app"
secret_key = "p-secret-1"
publish = ["t_auth"]

[[users]]
access_key = "consumer-app"
secret_key = "c-secret-2"
subscribe = ["t_auth"]
groups = ["g_auth"]
ACL
  # This subshell's own server: the variables below shadow the main server's.
  DATA="$SDIR/data" SERVER_LOG="$SDIR/server.log" PIDFILE="$SDIR/server.pid" EXITFILE="$SDIR/server.exit"
  pick_ports
  export SLUICE_PROXY__ACL_FILE="$SDIR/acl.toml"
  trap 'kill_server >/dev/null 2>&1 || true' EXIT
  start_server
  unset SLUICE_PROXY__ACL_FILE
  grep -q "authentication on" "$SERVER_LOG"
  topic_create t_auth normal
  group_create g_auth
  py_run "$SDIR/sent.json" 90 send_only.py --access-key producer-app --secret-key p-secret-1 \
    --topic t_auth --count 5
  node_run "$SDIR/received.json" 120 receive_only.mjs --access-key consumer-app \
    --secret-key c-secret-2 --topic t_auth --group g_auth --expect-file "$SDIR/sent.json" --wait 60
  rust_run "$SDIR/rust_sent.json" 90 send --access-key producer-app --secret-key p-secret-1 \
    --topic t_auth --count 3
  rust_run "$SDIR/rust_received.json" 120 receive --access-key consumer-app \
    --secret-key c-secret-2 --topic t_auth --group g_auth --expect-file "$SDIR/rust_sent.json" \
    --wait 60
  # Refusals: the scripts must fail, with the server's code in their output or client log.
  if rust_run "$SDIR/rust_wrong.json" 60 send --access-key producer-app --secret-key nope \
    --topic t_auth --count 1 2>"$SDIR/rust_wrong.err"; then
    echo "a Rust send signed with a wrong secret key succeeded"
    return 1
  fi
  cat "$SDIR/rust_wrong.err"
  # Rust opens its Telemetry stream first: refused with the gRPC status UNAUTHENTICATED.
  cat "$SDIR/rust_wrong.json" "$SDIR/rust_wrong.err" | grep -Eiq "unauthenticated|unauthorized|40100"
  if py_run "$SDIR/wrong_secret.json" 60 send_only.py --access-key producer-app --secret-key nope \
    --topic t_auth --count 1 2>"$SDIR/wrong_secret.err"; then
    echo "a send signed with a wrong secret key succeeded"
    return 1
  fi
  cat "$SDIR/wrong_secret.err"
  cat "$SDIR/wrong_secret.json" "$SDIR/wrong_secret.err" | grep -Eiq "unauthorized|40100"
  if node_run "$SDIR/forbidden.json" 60 send_only.mjs --access-key consumer-app \
    --secret-key c-secret-2 --topic t_auth --count 1 2>"$SDIR/forbidden.err"; then
    echo "a send by a user without publish permission succeeded"
    return 1
  fi
  cat "$SDIR/forbidden.err"
  cat "$SDIR/forbidden.json" "$SDIR/forbidden.err" | grep -Eiq "forbidden|40300"
  # Nothing of the refused sends was stored: the topic holds the 5 + 3 allowed ones.
  local stored
  stored="$("$SLUICE_BIN" topic describe t_auth --json --admin "$(admin_url)")"
  echo "$stored"
  python3 - "$stored" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
total = d["stored_messages"]
assert total == 8, f"t_auth holds {total} messages, expected the 8 allowed sends"
PY
}

EXTRA_SCENARIOS+=(auth_acl)
