#!/usr/bin/env python3
"""FIFO order per message group with the official Python client (issue #4).

usage:
  fifo.py produce  --endpoint H:P --topic T [--groups K] [--per-group M]
  fifo.py consume  --endpoint H:P --topic T --group G --name NAME --events FILE --stop-file F
                   [--invisible S] [--batch N] [--work-ms MS]
                   [--retry-group MG --retry-seq N] [--cid S]
  fifo.py no-group --endpoint H:P --topic T
  fifo.py wait     --events FILE... (--ready N | --acked N) [--linger S] [--wait S]
  fifo.py verify   --sent SENT.json --logs C1.json C2.json ... [--retry-group MG --retry-seq N]

produce   sends M messages to each of K message groups "fifo-0".."fifo-{K-1}", round-robin
          over the groups, one send at a time (so the send order within a group is the
          sequence number, in the user property "seq" and in the body).
consume   a SimpleConsumer that records, for every delivery, the message group, sequence,
          delivery attempt, wall-clock receive time (after receive() returned) and ack time
          (just before ack() was called, and when it returned), as one JSON line per delivery
          in --events and as the "deliveries" list of the final JSON document. The first
          delivery of the message (--retry-group, --retry-seq) is not acked: with --cid S the
          consumer shortens its invisible time to S seconds with ChangeInvisibleDuration,
          otherwise the --invisible time runs out. It stops when --stop-file exists.
no-group  sends a message without a message group to the FIFO topic: it must be refused.
wait      waits until N consumers wrote their "ready" line, or until N distinct messages
          were acked (then lingers --linger seconds so that late extra deliveries show up).
verify    merges the consumers' documents and checks FIFO order (see check_logs).

Times are milliseconds since the epoch (float) from the wall clock of this host; the Node.js
and Rust consumers record the same clock (Node.js in whole milliseconds).
"""

import json
import os
import sys
import time

import rmqtest as rt

# Node.js records whole milliseconds (Date.now() truncates), so a Node.js receive time may
# read up to 1 ms earlier than the instant it stands for.
CLOCK_SLACK_MS = 1.0
# The first delivery's receive time is recorded by the client after the server fixed the
# message's invisible deadline, so the redelivery may come that much "early" relative to it.
EXPIRE_SLACK_MS = 500.0


def now_ms() -> float:
    return time.time() * 1000.0


def group_name(k: int) -> str:
    return f"fifo-{k}"


# ------------------------------------------------------------------- produce ---

def produce(args):
    from rocketmq import Producer

    run_id = rt.new_run_id()
    producer = Producer(rt.client_config(args), (args.topic,))
    producer.startup()
    sent, errors = [], []
    try:
        for seq in range(args.per_group):
            for k in range(args.groups):
                g = group_name(k)
                spec = {
                    "body": f"fifo run={run_id} group={g} seq={seq}",
                    "tag": "fifo",
                    "keys": [f"{run_id}-{g}-{seq}"],
                    "properties": {"seq": str(seq), "mgroup": g, "run": run_id},
                }
                msg = rt.build_message(args.topic, spec)
                msg.message_group = g
                t0 = now_ms()
                receipt = producer.send(msg)
                if receipt.message_id != msg.message_id:
                    errors.append(f"{g}#{seq}: receipt id {receipt.message_id!r} != {msg.message_id!r}")
                spec.update(message_id=receipt.message_id, message_group=g, seq=seq,
                            send_ms=round(t0, 3))
                sent.append(spec)
    finally:
        rt.safe_shutdown(producer, "producer")
    rt.log(f"sent {len(sent)} FIFO message(s) over {args.groups} message group(s) to {args.topic}")
    return {"run_id": run_id, "messages": sent}, errors


# ------------------------------------------------------------------- consume ---

def append_event(path, obj):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")


def consume(args):
    from rocketmq import FilterExpression, SimpleConsumer

    deliveries, errors = [], []
    consumer = SimpleConsumer(rt.client_config(args), args.group,
                              {args.topic: FilterExpression("*")},
                              await_duration=args.await_duration)
    consumer.startup()
    append_event(args.events, {"event": "ready", "consumer": args.name, "lang": rt.LANG})
    rt.log(f"{args.name}: consuming {args.topic} as {args.group}")
    try:
        deadline = time.monotonic() + args.wait
        while not os.path.exists(args.stop_file) and time.monotonic() < deadline:
            try:
                msgs = consumer.receive(args.batch, args.invisible)
            except Exception as e:
                rt.log(f"receive raised {e!r}; retrying in 1s")
                time.sleep(1)
                continue
            recv = now_ms()
            for m in msgs or []:
                props = dict(m.properties or {})
                d = {
                    "consumer": args.name, "lang": rt.LANG,
                    "message_id": m.message_id, "message_group": m.message_group,
                    "seq": int(props["seq"]) if props.get("seq", "").isdigit() else None,
                    "attempt": m.delivery_attempt, "recv_ms": round(recv, 3),
                    "ack_ms": None, "ack_done_ms": None, "acked": False, "held": None,
                }
                if m.message_group == args.retry_group and d["seq"] == args.retry_seq \
                        and m.delivery_attempt == 1:
                    # The forced retry: not acked on its first delivery.
                    if args.cid is not None:
                        d["cid_ms"] = round(now_ms(), 3)
                        try:
                            consumer.change_invisible_duration(m, args.cid)
                            d["held"] = f"cid:{args.cid * 1000}"
                        except Exception as e:
                            d["held"] = f"expire:{args.invisible * 1000}"
                            d["cid_error"] = repr(e)
                            errors.append(f"ChangeInvisibleDuration of {m.message_id} failed: {e!r}")
                    else:
                        d["held"] = f"expire:{args.invisible * 1000}"
                    rt.log(f"{args.name}: holding {m.message_group}#{d['seq']} (attempt 1) unacked: {d['held']}")
                else:
                    if args.work_ms:
                        time.sleep(args.work_ms / 1000.0)
                    d["ack_ms"] = round(now_ms(), 3)
                    try:
                        consumer.ack(m)
                        d["acked"] = True
                    except Exception as e:
                        d["ack_error"] = repr(e)
                    d["ack_done_ms"] = round(now_ms(), 3)
                deliveries.append(d)
                append_event(args.events, dict(d, event="delivery"))
    finally:
        rt.safe_shutdown(consumer, "simple consumer")
    rt.log(f"{args.name}: {len(deliveries)} deliveries, "
           f"{sum(1 for d in deliveries if d['acked'])} acked")
    return {"name": args.name, "deliveries": deliveries}, errors


# ------------------------------------------------------------------ no-group ---

def no_group(args):
    """A message without message group on a FIFO topic must be refused. The Python client
    validates the message type against the route's accept_message_types (when the server's
    settings ask for it) and refuses before sending; a server would answer
    MESSAGE_PROPERTY_CONFLICT_WITH_TYPE (40014)."""
    from rocketmq import Producer

    producer = Producer(rt.client_config(args), (args.topic,))
    producer.startup()
    errors, out = [], {}
    try:
        spec = {"body": "fifo message without a message group", "tag": "fifo", "keys": [],
                "properties": {"case": "no-group"}}
        msg = rt.build_message(args.topic, spec)
        try:
            receipt = producer.send(msg)
            errors.append(f"send without message group to a FIFO topic succeeded: {receipt.message_id}")
        except Exception as e:
            text = f"{type(e).__name__}: {e}"
            out["error"] = text
            out["code_visible"] = "40014" in text or "CONFLICT_WITH_TYPE" in text
            out["refused_by"] = "server" if out["code_visible"] else "client"
            rt.log(f"refused as expected ({out['refused_by']}): {text}")
            if not out["code_visible"] and "message type not match" not in text:
                errors.append(f"refused for an unexpected reason: {text}")
    finally:
        rt.safe_shutdown(producer, "producer")
    return out, errors


# ---------------------------------------------------------------------- wait ---

def read_events(paths):
    events = []
    for p in paths:
        try:
            with open(p, "r", encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line.endswith("}"):
                        try:
                            events.append(json.loads(line))
                        except ValueError:
                            pass  # a line still being written
        except FileNotFoundError:
            pass
    return events


def wait(args):
    deadline = time.monotonic() + args.wait
    got = 0
    while time.monotonic() < deadline:
        ev = read_events(args.events)
        if args.ready is not None:
            got = len({e["consumer"] for e in ev if e.get("event") == "ready"})
            if got >= args.ready:
                rt.log(f"{got} consumer(s) ready")
                return {"ready": got}, []
        else:
            got = len({e["message_id"] for e in ev if e.get("event") == "delivery" and e.get("acked")})
            if got >= args.acked:
                rt.log(f"{got} distinct message(s) acked; lingering {args.linger:.0f}s")
                time.sleep(args.linger)
                return {"acked": got}, []
        time.sleep(0.2)
    what = "consumer(s) ready" if args.ready is not None else "distinct message(s) acked"
    want = args.ready if args.ready is not None else args.acked
    return {}, [f"only {got} of {want} {what} after {args.wait:.0f}s"]


# -------------------------------------------------------------------- verify ---

def check_logs(sent, docs, retry_group, retry_seq, min_consumers):
    """Returns (errors, summary lines)."""
    errors, summary = [], []
    by_id = {m["message_id"]: m for m in sent}
    order = {m["message_id"]: i for i, m in enumerate(sent)}  # send order
    groups = sorted({m["message_group"] for m in sent})
    deliveries = []
    for doc in docs:
        name = doc.get("name") or doc.get("client")
        if not doc.get("ok"):
            errors.append(f"consumer {name} reported errors: {doc.get('errors')}")
        deliveries.extend(doc.get("deliveries") or [])
    deliveries.sort(key=lambda d: d["recv_ms"])

    # Every delivery is one of ours and carries its group and sequence intact.
    per_msg = {}
    for d in deliveries:
        mid = d["message_id"]
        exp = by_id.get(mid)
        if exp is None:
            errors.append(f"unexpected message {mid} (group {d.get('message_group')}) delivered to {d['consumer']}")
            continue
        if d.get("message_group") != exp["message_group"] or d.get("seq") != exp["seq"]:
            errors.append(f"{mid}: delivered as group {d.get('message_group')!r} seq {d.get('seq')!r}, "
                          f"sent as {exp['message_group']!r} seq {exp['seq']}")
        if d.get("ack_error"):
            errors.append(f"{mid}: ack by {d['consumer']} failed: {d['ack_error']}")
        per_msg.setdefault(mid, []).append(d)

    retry_id = next((m["message_id"] for m in sent
                     if m["message_group"] == retry_group and m["seq"] == retry_seq), None)
    if retry_group is not None and retry_id is None:
        errors.append(f"no sent message {retry_group}#{retry_seq} to retry")

    # Acked exactly once; delivered once (attempt 1), the forced retry twice (attempts 1, 2).
    final_ack = {}
    for m in sent:
        mid, tag = m["message_id"], f"{m['message_group']}#{m['seq']}"
        ds = per_msg.get(mid, [])
        acks = [d for d in ds if d["acked"]]
        if len(acks) != 1:
            errors.append(f"{tag} ({mid}): acked {len(acks)} times (deliveries: "
                          f"{[(d['consumer'], d['attempt']) for d in ds]})")
        if acks:
            final_ack[mid] = acks[0]
        attempts = [d["attempt"] for d in ds]
        if mid == retry_id:
            if attempts != [1, 2]:
                errors.append(f"forced retry {tag}: delivery attempts {attempts}, expected [1, 2]")
            if ds and (ds[0]["acked"] or not ds[0].get("held")):
                errors.append(f"forced retry {tag}: the first delivery was acked / not held")
            if len(ds) >= 2:
                first, second = ds[0], ds[1]
                kind, _, dur = (first.get("held") or "expire:0").partition(":")
                dur = float(dur)
                if kind == "cid":
                    earliest = first["cid_ms"] + dur - CLOCK_SLACK_MS
                else:
                    earliest = first["recv_ms"] + dur - EXPIRE_SLACK_MS
                gap = second["recv_ms"] - first["recv_ms"]
                summary.append(f"forced retry {tag}: attempt 1 to {first['consumer']} (held: {first['held']}), "
                               f"attempt 2 to {second['consumer']} {gap:.0f} ms later, "
                               f"acked {'yes' if second['acked'] else 'NO'}")
                if second["recv_ms"] < earliest:
                    errors.append(f"forced retry {tag}: redelivered {gap:.0f} ms after the first delivery, "
                                  f"before its invisible time ({first['held']}) ran out")
        elif attempts != [1]:
            errors.append(f"{tag} ({mid}): delivery attempts {attempts}, expected exactly one delivery with attempt 1")

    # Per message group: acks in send order, and nothing received before its predecessor's ack.
    min_gap = None
    for g in groups:
        msgs = [m for m in sent if m["message_group"] == g]  # in send order
        acked = sorted((final_ack[m["message_id"]] for m in msgs if m["message_id"] in final_ack),
                       key=lambda d: d["ack_ms"])
        ack_order = [d["seq"] for d in acked]
        want_order = [m["seq"] for m in msgs if m["message_id"] in final_ack]
        if ack_order != want_order:
            errors.append(f"group {g}: acks in order {ack_order}, sent in order {want_order}")
        for prev, cur in zip(msgs, msgs[1:]):
            pa = final_ack.get(prev["message_id"])
            for d in per_msg.get(cur["message_id"], []):
                if pa is None:
                    errors.append(f"{g}#{cur['seq']} delivered to {d['consumer']} although "
                                  f"{g}#{prev['seq']} was never acked")
                    continue
                gap = d["recv_ms"] - pa["ack_ms"]
                min_gap = gap if min_gap is None else min(min_gap, gap)
                if gap < -CLOCK_SLACK_MS:
                    errors.append(f"{g}#{cur['seq']} (attempt {d['attempt']}) received by {d['consumer']} "
                                  f"{-gap:.1f} ms BEFORE {g}#{prev['seq']} was acked by {pa['consumer']}")
                if cur["message_id"] == retry_id or prev["message_id"] == retry_id:
                    summary.append(f"  {g}#{cur['seq']} attempt {d['attempt']} received by {d['consumer']} "
                                   f"{gap:.1f} ms after {g}#{prev['seq']} was acked (attempt "
                                   f"{pa['attempt']}, by {pa['consumer']})")
    # Ordering within the send order overall: a group's messages are received in send order.
    for g in groups:
        firsts = [ds[0] for m in sent if m["message_group"] == g
                  for ds in [per_msg.get(m["message_id"], [])] if ds]
        recv_order = [d["seq"] for d in sorted(firsts, key=lambda d: (d["recv_ms"], order[d["message_id"]]))]
        if recv_order != sorted(recv_order):
            errors.append(f"group {g}: first deliveries in order {recv_order}")

    # Parallelism: several consumers served groups, and their work overlapped in time.
    consumers = sorted({d["consumer"] for d in deliveries if d["acked"]})
    per_consumer = {c: sum(1 for d in deliveries if d["consumer"] == c and d["acked"]) for c in consumers}
    served = {g: sorted({final_ack[m["message_id"]]["consumer"] for m in sent
                         if m["message_group"] == g and m["message_id"] in final_ack}) for g in groups}
    overlaps = 0
    acked = [d for d in deliveries if d["acked"]]
    for i, a in enumerate(acked):
        for b in acked[i + 1:]:
            if b["recv_ms"] > a["ack_done_ms"]:
                break
            if b["consumer"] != a["consumer"] and b["message_group"] != a["message_group"]:
                overlaps += 1
    if len(consumers) < min_consumers:
        errors.append(f"only {len(consumers)} consumer(s) acked messages ({consumers}); "
                      f"expected at least {min_consumers}")
    if min_consumers >= 2:  # parallelism is required
        if len({c for cs in served.values() for c in cs}) < 2:
            errors.append("all message groups were served by one consumer (no parallelism)")
        if overlaps == 0:
            errors.append("no two consumers ever held messages of different groups at the same time")

    summary.insert(0, f"{len(sent)} message(s) in {len(groups)} group(s); {len(deliveries)} deliveries; "
                      f"acks per consumer: {per_consumer}")
    summary.insert(1, "consumers per group: " + ", ".join(f"{g}={'+'.join(cs)}" for g, cs in served.items()))
    summary.insert(2, f"concurrent in-flight pairs (different consumers and groups): {overlaps}; "
                      f"smallest gap from a group's ack to its next receive: "
                      f"{'n/a' if min_gap is None else f'{min_gap:.1f} ms'}")
    return errors, summary


def verify(args):
    sent = rt.load_manifest(args.sent)["messages"]
    docs = []
    errors = []
    for p in args.logs:
        try:
            with open(p, "r", encoding="utf-8") as f:
                text = f.read().strip()
            docs.append(json.loads(text.splitlines()[-1]) if text else {"name": p, "ok": False,
                                                                        "errors": ["empty output"]})
        except Exception as e:
            errors.append(f"{p}: unreadable consumer document: {e!r}")
    errs, summary = check_logs(sent, docs, args.retry_group, args.retry_seq, args.min_consumers)
    errors += errs
    for line in summary:
        rt.log(line)
    return {"summary": summary}, errors


# ---------------------------------------------------------------------- main ---

def main():
    # The subcommand may follow options (run.sh's py_run puts --endpoint/--timeout first).
    cmds = ("produce", "consume", "no-group", "wait", "verify")
    cmd = next((a for a in sys.argv[1:] if a in cmds), None)
    if cmd is None:
        print(__doc__, file=sys.stderr)
        rt.finish(2)
    sys.argv.remove(cmd)
    p = rt.base_parser(__doc__, group=(cmd == "consume"))
    p.add_argument("--groups", type=int, default=6)
    p.add_argument("--per-group", type=int, default=10)
    p.add_argument("--name", default="python")
    p.add_argument("--events", nargs="+", default=[])
    p.add_argument("--stop-file")
    p.add_argument("--invisible", type=int, default=8)
    p.add_argument("--await-duration", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--work-ms", type=int, default=30)
    p.add_argument("--retry-group")
    p.add_argument("--retry-seq", type=int)
    p.add_argument("--cid", type=int, default=None,
                   help="ChangeInvisibleDuration of the held message to S seconds")
    p.add_argument("--wait", type=float, default=90.0)
    p.add_argument("--ready", type=int)
    p.add_argument("--acked", type=int)
    p.add_argument("--linger", type=float, default=2.0)
    p.add_argument("--sent")
    p.add_argument("--logs", nargs="+", default=[])
    p.add_argument("--min-consumers", type=int, default=2,
                   help="consumers that must have acked messages; >= 2 also requires that "
                        "they worked on different groups at the same time")
    args = p.parse_args()
    if cmd in ("produce", "no-group"):
        rt.check_required(args, "endpoint", "topic")
    elif cmd == "consume":
        rt.check_required(args, "endpoint", "topic", "group", "events", "stop_file")
        args.events = args.events[0]
    elif cmd == "wait":
        rt.check_required(args, "events")
    else:
        rt.check_required(args, "sent", "logs")
    rt.setup_client_logging()
    rt.start_watchdog(args.timeout, f"fifo {cmd}")
    fn = {"produce": produce, "consume": consume, "no-group": no_group, "wait": wait,
          "verify": verify}[cmd]
    try:
        out, errors = fn(args)
    except Exception as e:
        out, errors = {}, [f"client error: {e!r}"]
    for e in errors:
        rt.log("FAIL: " + e)
    rt.emit({"client": rt.LANG, "ok": not errors, "topic": args.topic, **out, "errors": errors})
    rt.finish(0 if not errors else 1)


if __name__ == "__main__":
    main()
