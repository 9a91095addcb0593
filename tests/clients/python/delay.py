#!/usr/bin/env python3
"""Delay messages with the official Python client: send with a delivery time, recall
some, and check that each of the others arrives not before its time and at most
--max-late-ms after it, and that recalled ones never arrive.

usage: delay.py --endpoint H:P --topic T --group G [--mode roundtrip|send|receive]
                [--count N] [--recall N] [--delay S] [--expect-file SENT.json]

  roundtrip  start a SimpleConsumer, send, recall, receive and check (default)
  send       send and recall only; print the manifest (for a restart in between)
  receive    receive and check against the manifest of a `send`

The Python client sends delivery times in whole seconds. Prints one JSON document.
"""

import time

import rmqtest as rt
from rocketmq import FilterExpression, Producer, SimpleConsumer


def now_ms() -> int:
    return int(time.time() * 1000)


def send_and_recall(args, run_id):
    """Sends --count + --recall delay messages; recalls the last --recall of them."""
    producer = Producer(rt.client_config(args), (args.topic,))
    producer.startup()
    sent, errors = [], []
    try:
        # Whole seconds, like the client itself sends them.
        at_s = int(time.time()) + args.delay
        for i in range(args.count + args.recall):
            spec = rt.message_spec(run_id, i, "delay")
            msg = rt.build_message(args.topic, spec)
            msg.delivery_timestamp = at_s
            receipt = producer.send(msg)
            if receipt.message_id != msg.message_id:
                errors.append(f"send #{i}: receipt id {receipt.message_id!r} != {msg.message_id!r}")
            if not receipt.recall_handle:
                errors.append(f"send #{i}: no recall handle for a delay message")
            spec.update(message_id=receipt.message_id, delivery_timestamp_ms=at_s * 1000,
                        recall_handle=receipt.recall_handle, recalled=False)
            sent.append(spec)
        for spec in sent[args.count:]:
            got = producer.recall_message(args.topic, spec["recall_handle"])
            if got != spec["message_id"]:
                errors.append(f"recall returned {got!r}, expected {spec['message_id']!r}")
            spec["recalled"] = True
        rt.log(f"sent {len(sent)} delay message(s) due at {at_s}, recalled {args.recall}")
    finally:
        rt.safe_shutdown(producer, "producer")
    return sent, errors


def receive_and_check(args, consumer, sent):
    """Receives until every expected message arrived and the latest due time of a
    recalled one is 2 s past; checks timing and content."""
    want = {m["message_id"]: m for m in sent if not m["recalled"]}
    recalled = {m["message_id"] for m in sent if m["recalled"]}
    quiet_until = max([m["delivery_timestamp_ms"] for m in sent if m["recalled"]] or [0]) + 2000
    received, errors, lateness = {}, [], []
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline and (len(received) < len(want) or now_ms() < quiet_until):
        try:
            msgs = consumer.receive(16, 30)
        except Exception as e:
            rt.log(f"receive raised {e!r}; retrying in 1s")
            time.sleep(1)
            continue
        at = now_ms()
        for m in msgs or []:
            consumer.ack(m)
            d = rt.view_to_dict(m)
            mid = d["message_id"]
            if mid in recalled:
                errors.append(f"{mid}: recalled but delivered")
                continue
            if mid not in want:
                errors.append(f"unexpected message {mid}")
                continue
            if mid in received:
                errors.append(f"{mid}: delivered twice")
                continue
            received[mid] = d
            exp = want[mid]
            errors.extend(rt.compare_message(exp, d))
            due = exp["delivery_timestamp_ms"]
            if m.delivery_timestamp != due:
                errors.append(f"{mid}: delivery_timestamp {m.delivery_timestamp} != sent {due}")
            late = at - due
            lateness.append(late)
            if late < 0:
                errors.append(f"{mid}: received {-late} ms BEFORE its delivery time")
            elif late > args.max_late_ms:
                errors.append(f"{mid}: received {late} ms after its delivery time "
                              f"(limit {args.max_late_ms} ms)")
    missing = [mid for mid in want if mid not in received]
    if missing:
        errors.append(f"missing {len(missing)} of {len(want)} message(s): {missing[:5]}")
    rt.log(f"received {len(received)} delay message(s); lateness ms: {sorted(lateness)}")
    return list(received.values()), lateness, errors


def main():
    p = rt.base_parser(__doc__)
    p.add_argument("--mode", choices=["roundtrip", "send", "receive"], default="roundtrip")
    p.add_argument("--count", type=int, default=3, help="delay messages to deliver")
    p.add_argument("--recall", type=int, default=1, help="further delay messages to recall")
    p.add_argument("--delay", type=int, default=4, help="seconds from now (whole seconds)")
    p.add_argument("--expect-file", help="manifest of a --mode send run")
    p.add_argument("--wait", type=float, default=40.0)
    p.add_argument("--max-late-ms", type=int, default=1000)
    args = p.parse_args()
    need = ["endpoint", "topic"] + ([] if args.mode == "send" else ["group"])
    rt.check_required(args, *need)
    rt.setup_client_logging()
    rt.start_watchdog(args.timeout, f"delay {args.mode}")
    run_id = rt.new_run_id()
    out = {"client": rt.LANG, "topic": args.topic, "mode": args.mode}
    errors = []
    consumer = None
    try:
        if args.mode != "send":
            consumer = SimpleConsumer(rt.client_config(args), args.group,
                                      {args.topic: FilterExpression("*")}, await_duration=5)
            consumer.startup()
        if args.mode == "receive":
            sent = rt.load_manifest(args.expect_file)["messages"]
        else:
            sent, errs = send_and_recall(args, run_id)
            errors += errs
        out["messages"] = sent
        if consumer is not None:
            received, lateness, errs = receive_and_check(args, consumer, sent)
            errors += errs
            out["lateness_ms"] = lateness
            if args.mode == "roundtrip" and received:
                # Recalling a message that was delivered already must fail clearly.
                prod = Producer(rt.client_config(args), (args.topic,))
                prod.startup()
                try:
                    first = next(m for m in sent if not m["recalled"])
                    prod.recall_message(args.topic, first["recall_handle"])
                    errors.append("recall after delivery succeeded")
                except Exception as e:
                    rt.log(f"recall after delivery refused as expected: {e!r}")
                finally:
                    rt.safe_shutdown(prod, "producer")
    except Exception as e:
        errors.append(f"client error: {e!r}")
    finally:
        rt.safe_shutdown(consumer, "simple consumer")
    for e in errors:
        rt.log("FAIL: " + e)
    out.update(ok=not errors, errors=errors)
    rt.emit(out)
    rt.finish(0 if not errors else 1)


if __name__ == "__main__":
    main()
