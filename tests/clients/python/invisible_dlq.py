#!/usr/bin/env python3
"""Invisible-duration expiry and dead-letter test with the official Python client.

1. send one message to TOPIC;
2. SimpleConsumer(GROUP) receives it with --invisible seconds and does NOT ack;
3. after the invisible time it is received again with delivery_attempt 2
   (not earlier than the invisible time), still not acked;
4. GROUP was created with `--max-attempts 2`, so the server must then move it to
   the dead-letter topic %DLQ%GROUP: a SimpleConsumer of DLQ_GROUP subscribed to
   that topic receives it (retrying while the DLQ topic does not exist yet);
5. GROUP (polled meanwhile) does not get the message a third time.

The reference proxy rejects SimpleConsumer invisible durations below 10 s
(ILLEGAL_INVISIBLE_TIME); the Python client itself enforces no minimum. The
default here is therefore 10 s.

usage: invisible_dlq.py --endpoint H:P --topic T --group G --dlq-group DG
Create G (--max-attempts 2) and DG BEFORE running this script.
"""

import threading
import time

import rmqtest as rt
from rocketmq import FilterExpression, SimpleConsumer
from send_only import send_messages


def receive_one(consumer, mid, body, invisible, deadline, what):
    """Receive until message `mid` shows up; returns (view dict, message, others)."""
    others = []
    while time.monotonic() < deadline:
        try:
            msgs = consumer.receive(4, invisible)
        except Exception as e:
            rt.log(f"{what}: receive raised {e!r}; retrying in 1s")
            time.sleep(1)
            continue
        for m in msgs or []:
            d = rt.view_to_dict(m)
            if d["message_id"] == mid or d["body"] == body:
                return d, m, others
            others.append(d)
    return None, None, others



def main():
    p = rt.base_parser(__doc__)
    p.add_argument("--dlq-group", required=False, default=None,
                   help="group used to read %%DLQ%%GROUP (create it beforehand)")
    p.add_argument("--invisible", type=int, default=10, help="invisible duration, seconds")
    p.add_argument("--await-duration", type=int, default=10)
    p.add_argument("--tag", default="TagA")
    p.add_argument("--dlq-wait", type=float, default=60.0,
                   help="max seconds (after the 2nd delivery) for the message to reach the DLQ")
    args = p.parse_args()
    args.count = 1
    rt.check_required(args, "endpoint", "topic", "group", "dlq_group")
    rt.setup_client_logging()
    rt.start_watchdog(args.timeout, "invisible_dlq")
    dlq_topic = f"%DLQ%{args.group}"
    errors, notes = [], []
    consumer = dlq_consumer = None
    report = {}
    try:
        sent, errors = send_messages(args, rt.new_run_id())
        exp = sent[0]
        mid = exp["message_id"]
        rt.log(f"sent {mid}")
        consumer = SimpleConsumer(rt.client_config(args), args.group,
                                  {args.topic: FilterExpression("*")},
                                  await_duration=args.await_duration)
        consumer.startup()

        # 1st delivery
        d1, _, others = receive_one(consumer, mid, exp["body"], args.invisible, time.monotonic() + 40, "1st receive")
        t1 = time.monotonic()
        if others:
            errors.append(f"unexpected messages on {args.topic}: {[o['message_id'] for o in others]}")
        if d1 is None:
            raise RuntimeError("message not received (1st delivery) within 40s")
        errors.extend(rt.compare_message(exp, d1))
        if d1["delivery_attempt"] != 1:
            errors.append(f"1st delivery has delivery_attempt {d1['delivery_attempt']}, expected 1")
        rt.log(f"1st delivery attempt={d1['delivery_attempt']}; not acking, waiting for redelivery")

        # 2nd delivery, only after the invisible duration expired
        d2, _, _ = receive_one(consumer, mid, exp["body"], args.invisible,
                               time.monotonic() + args.invisible + 40, "2nd receive")
        t2 = time.monotonic()
        if d2 is None:
            raise RuntimeError(f"message not redelivered within {args.invisible + 40}s after "
                               f"its invisible duration ({args.invisible}s)")
        gap = t2 - t1
        report["redelivery_after_s"] = round(gap, 2)
        rt.log(f"2nd delivery attempt={d2['delivery_attempt']} after {gap:.1f}s")
        if gap < args.invisible - 1.5:
            errors.append(f"redelivered after {gap:.1f}s, before the invisible duration of {args.invisible}s")
        if d2["delivery_attempt"] != 2:
            errors.append(f"2nd delivery has delivery_attempt {d2['delivery_attempt']}, expected 2")
        errors.extend(rt.compare_message(exp, d2))

        # Keep polling the original group meanwhile, as a live consumer would (a
        # server may dead-letter lazily, when the group polls); it must not get
        # the message a 3rd time.
        stop = threading.Event()
        third = []

        def watch_original():
            while not stop.is_set():
                try:
                    for m in consumer.receive(4, args.invisible) or []:
                        d = rt.view_to_dict(m)
                        if d["message_id"] == mid or d["body"] == exp["body"]:
                            third.append(d)
                            rt.log(f"original group got the message again, attempt={d['delivery_attempt']}")
                except Exception as e:
                    rt.log(f"watch receive raised {e!r}")
                    time.sleep(1)

        watcher = threading.Thread(target=watch_original, daemon=True)
        watcher.start()

        # Dead-letter queue: the topic may only appear once the message is dead-lettered.
        deadline = time.monotonic() + args.invisible + args.dlq_wait
        found = None
        while time.monotonic() < deadline and found is None:
            try:
                if dlq_consumer is None:
                    dlq_consumer = SimpleConsumer(rt.client_config(args), args.dlq_group,
                                                  {dlq_topic: FilterExpression("*")},
                                                  await_duration=args.await_duration)
                    dlq_consumer.startup()
                msgs = dlq_consumer.receive(4, 30)
            except Exception as e:
                rt.log(f"DLQ receive raised {e!r} (topic may not exist yet); retrying in 1s")
                time.sleep(1)
                continue
            for m in msgs or []:
                d = rt.view_to_dict(m)
                if d["message_id"] == mid or d["body"] == exp["body"]:
                    found = d
                else:
                    errors.append(f"unexpected message in {dlq_topic}: {d['message_id']}")
                dlq_consumer.ack(m)
        if found is None:
            errors.append(f"message {mid} did not reach {dlq_topic} within "
                          f"{args.invisible + args.dlq_wait:.0f}s after its 2nd delivery")
        else:
            report["dlq_after_s"] = round(time.monotonic() - t2, 2)
            rt.log(f"found in {dlq_topic} after {report['dlq_after_s']}s: id={found['message_id']}")
            if found["message_id"] != mid:
                notes.append(f"DLQ copy has message id {found['message_id']!r}, original {mid!r}")
            if found["body"] != exp["body"]:
                errors.append("DLQ copy: body differs")
            if (found["tag"] or None) != exp["tag"]:
                errors.append(f"DLQ copy: tag {found['tag']!r} != {exp['tag']!r}")
            if sorted(found["keys"]) != sorted(exp["keys"]):
                errors.append(f"DLQ copy: keys {found['keys']} != {exp['keys']}")
            missing = {k: v for k, v in exp["properties"].items() if found["properties"].get(k) != v}
            if missing:
                errors.append(f"DLQ copy: user properties lost/changed: {missing}")
            if found["topic"] != dlq_topic:
                notes.append(f"DLQ copy reports topic {found['topic']!r}")

        stop.set()
        watcher.join(timeout=args.await_duration + args.request_timeout + 5)
        if third:
            errors.append(f"message delivered again to {args.group} (attempts "
                          f"{[d['delivery_attempt'] for d in third]}) although max attempts is 2")
    except Exception as e:
        errors.append(f"client error: {e!r}")
    finally:
        rt.safe_shutdown(consumer, "consumer")
        rt.safe_shutdown(dlq_consumer, "dlq consumer")
    for n in notes:
        rt.log("note: " + n)
    for e in errors:
        rt.log("FAIL: " + e)
    rt.emit({"client": rt.LANG, "ok": not errors, "topic": args.topic, "group": args.group,
             "dlq_topic": dlq_topic, "report": report, "notes": notes, "errors": errors})
    rt.finish(0 if not errors else 1)


if __name__ == "__main__":
    main()
