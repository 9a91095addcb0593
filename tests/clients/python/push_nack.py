#!/usr/bin/env python3
"""PushConsumer nack/redelivery test with the official Python client.

Sends N messages, then runs a PushConsumer whose listener returns FAILURE the
first time it sees a message and SUCCESS the second time. Verifies that every
message is delivered exactly twice, with delivery attempts 1 then 2, intact,
and not a third time within a grace period after the successful consumption.

usage: push_nack.py --endpoint H:P --topic T --group G [--count N]
Create the group (max attempts >= 2) BEFORE running this script.
"""

import threading
import time

import rmqtest as rt
from rocketmq import (ConsumeResult, FilterExpression, MessageListener,
                      PushConsumer)
from send_only import send_messages


class NackOnceListener(MessageListener):
    def __init__(self):
        self.lock = threading.Lock()
        self.deliveries = {}  # message id -> [view dict, ...]

    def consume(self, message):
        d = rt.view_to_dict(message)
        d["at"] = time.monotonic()
        with self.lock:
            seen = self.deliveries.setdefault(d["message_id"], [])
            seen.append(d)
            first = len(seen) == 1
        rt.log(f"consume {d['message_id']} attempt={d['delivery_attempt']} -> "
               f"{'FAILURE' if first else 'SUCCESS'}")
        return ConsumeResult.FAILURE if first else ConsumeResult.SUCCESS


def main():
    p = rt.base_parser(__doc__)
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--tag", default="TagA")
    p.add_argument("--wait", type=float, default=60.0, help="max seconds for all second deliveries")
    p.add_argument("--grace", type=float, default=5.0, help="seconds to watch for extra deliveries")
    args = p.parse_args()
    rt.check_required(args, "endpoint", "topic", "group")
    rt.setup_client_logging()
    rt.start_watchdog(args.timeout, "push_nack")
    run_id = rt.new_run_id()
    errors = []
    listener = NackOnceListener()
    consumer = None
    sent = []
    try:
        sent, errors = send_messages(args, run_id)
        want = {m["message_id"]: m for m in sent}
        rt.log(f"sent {len(sent)} message(s); starting push consumer")
        consumer = PushConsumer(rt.client_config(args), args.group, listener,
                                {args.topic: FilterExpression("*")})
        try:
            consumer.startup()
        except Exception as e:
            # 5.1.2 may mask the real cause (no Settings reply within 10 s).
            raise RuntimeError(f"push consumer startup failed (did the server answer the Telemetry "
                               f"settings with status OK within 10 s?): {e!r}") from e
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            with listener.lock:
                done = all(len(listener.deliveries.get(mid, [])) >= 2 for mid in want)
            if done:
                break
            time.sleep(0.2)
        time.sleep(args.grace)
        with listener.lock:
            deliveries = {k: list(v) for k, v in listener.deliveries.items()}
        for mid, exp in want.items():
            got = deliveries.get(mid, [])
            attempts = [g["delivery_attempt"] for g in got]
            if len(got) != 2:
                errors.append(f"{mid}: delivered {len(got)} time(s) (attempts {attempts}), expected 2")
            if attempts[:2] != [1, 2][:len(attempts[:2])]:
                errors.append(f"{mid}: delivery attempts {attempts}, expected [1, 2]")
            for g in got:
                errors.extend(rt.compare_message(exp, g))
        for mid in deliveries:
            if mid not in want:
                errors.append(f"unexpected message {mid}")
    except Exception as e:
        errors.append(f"client error: {e!r}")
    finally:
        rt.safe_shutdown(consumer, "push consumer")
    summary = {mid: [g["delivery_attempt"] for g in v] for mid, v in listener.deliveries.items()}
    for e in errors:
        rt.log("FAIL: " + e)
    rt.emit({"client": rt.LANG, "ok": not errors, "topic": args.topic, "group": args.group,
             "sent_ids": [m["message_id"] for m in sent], "attempts": summary, "errors": errors})
    rt.finish(0 if not errors else 1)


if __name__ == "__main__":
    main()
