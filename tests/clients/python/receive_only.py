#!/usr/bin/env python3
"""Receive messages with the official Python SimpleConsumer, ack them and
verify them against a send manifest.

usage: receive_only.py --endpoint H:P --topic T --group G --expect-file SENT.json
                       [--expect-count N] [--wait S] [--invisible S]
Prints {"ok": bool, "received": [...], "errors": [...]} on stdout.
Exit code 0 only if every expected message arrived intact, exactly once.
"""

import time

import rmqtest as rt
from rocketmq import FilterExpression, SimpleConsumer


def receive_and_verify(args, expected):
    """Receive until every expected id arrived (or --wait elapses)."""
    want = {m["message_id"]: m for m in expected}
    expect_count = args.expect_count if args.expect_count is not None else len(want)
    received, errors = {}, []
    unexpected, duplicates = [], []
    consumer = SimpleConsumer(rt.client_config(args), args.group,
                              {args.topic: FilterExpression(args.filter)},
                              await_duration=args.await_duration)
    consumer.startup()
    try:
        deadline = time.monotonic() + args.wait
        while len(received) < expect_count and time.monotonic() < deadline:
            try:
                msgs = consumer.receive(args.batch, args.invisible)
            except Exception as e:
                rt.log(f"receive raised {e!r}; retrying in 1s")
                time.sleep(1)
                continue
            for m in msgs or []:
                d = rt.view_to_dict(m)
                mid = d["message_id"]
                if mid in received:
                    duplicates.append(mid)
                elif want and mid not in want:
                    unexpected.append(d)
                else:
                    received[mid] = d
                if not args.no_ack:
                    consumer.ack(m)
        missing = [mid for mid in want if mid not in received]
        if len(received) < expect_count:
            errors.append(f"received {len(received)} of {expect_count} expected message(s) within "
                          f"{args.wait:.0f}s; missing ids (first 10): {missing[:10]}")
        for mid, d in received.items():
            if mid in want:
                errors.extend(rt.compare_message(want[mid], d))
            if args.expect_attempt and d.get("delivery_attempt") != args.expect_attempt:
                errors.append(f"{mid}: delivery_attempt {d.get('delivery_attempt')} != {args.expect_attempt}")
        if unexpected:
            errors.append(f"{len(unexpected)} unexpected message(s), e.g. {unexpected[0]['message_id']!r} "
                          f"body={unexpected[0]['body'][:60]!r}")
        if duplicates and not args.allow_duplicates:
            errors.append(f"{len(duplicates)} duplicate deliveries of already received message(s): {duplicates[:5]}")
    finally:
        rt.safe_shutdown(consumer, "simple consumer")
    return list(received.values()), errors


def main():
    p = rt.base_parser(__doc__)
    p.add_argument("--expect-file", help="send manifest (JSON) to verify against")
    p.add_argument("--expect-count", type=int, default=None,
                   help="number of messages to wait for (default: size of the manifest)")
    p.add_argument("--wait", type=float, default=60.0, help="max seconds to wait for the messages")
    p.add_argument("--invisible", type=int, default=30, help="invisible duration, seconds")
    p.add_argument("--await-duration", type=int, default=10, help="long polling time, seconds")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--filter", default="*", help="tag filter expression")
    p.add_argument("--expect-attempt", type=int, default=1,
                   help="required delivery_attempt of every message (0 = do not check)")
    p.add_argument("--allow-duplicates", action="store_true")
    p.add_argument("--no-ack", action="store_true")
    args = p.parse_args()
    rt.check_required(args, "endpoint", "topic", "group")
    if not args.expect_file and args.expect_count is None:
        rt.log("need --expect-file or --expect-count")
        rt.finish(2)
    rt.setup_client_logging()
    rt.start_watchdog(args.timeout, "receive_only")
    expected = rt.load_manifest(args.expect_file)["messages"] if args.expect_file else []
    try:
        received, errors = receive_and_verify(args, expected)
    except Exception as e:
        rt.log(f"FAIL: consumer failed: {e!r}")
        rt.emit({"client": rt.LANG, "ok": False, "errors": [repr(e)]})
        rt.finish(1)
    for e in errors:
        rt.log("FAIL: " + e)
    rt.log(f"received {len(received)} message(s) from {args.topic} as {args.group}")
    rt.emit({"client": rt.LANG, "ok": not errors, "topic": args.topic, "group": args.group,
             "received": received, "errors": errors})
    rt.finish(0 if not errors else 1)


if __name__ == "__main__":
    main()
