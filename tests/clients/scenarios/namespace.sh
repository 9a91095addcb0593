# Namespaces with the official clients. Sourced by run.sh.
#
# A client configured with namespace "prod" that names topic t_ns and group g_ns uses the
# server's prod%t_ns and prod%g_ns (created with the CLI under those names). Python fills
# the namespace into every resource and the header, Node.js sends only the header for
# most calls, Rust cannot set one. Both namespaces hold a topic and group of the same
# short names: each receiver must get exactly its own namespace's messages (receive_only
# fails on any message it was not told to expect).

sc_namespace_isolation() {
  topic_create 'prod%t_ns' normal
  group_create 'prod%g_ns'
  topic_create t_ns normal
  group_create g_ns
  py_run "$SDIR/sent_prod.json" 90 send_only.py --namespace prod --topic t_ns --count 6
  rust_run "$SDIR/sent_plain.json" 90 send --topic t_ns --count 6
  node_run "$SDIR/received_prod.json" 120 receive_only.mjs --namespace prod --topic t_ns \
    --group g_ns --expect-file "$SDIR/sent_prod.json" --wait 60
  py_run "$SDIR/received_plain.json" 120 receive_only.py --topic t_ns --group g_ns \
    --expect-file "$SDIR/sent_plain.json" --wait 60
  # And the other way round: Node.js sends in prod, Python receives in prod.
  node_run "$SDIR/sent_prod2.json" 90 send_only.mjs --namespace prod --topic t_ns --count 4
  py_run "$SDIR/received_prod2.json" 120 receive_only.py --namespace prod --topic t_ns \
    --group g_ns --expect-file "$SDIR/sent_prod2.json" --wait 60
}

EXTRA_SCENARIOS+=(namespace_isolation)
