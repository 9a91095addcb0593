#!/usr/bin/env python3
"""Python Producer -> Python SimpleConsumer round trip.

Sends N normal messages with tag, keys and user properties, then receives them
with a SimpleConsumer of GROUP (create the group BEFORE running this script),
checks body/tag/keys/properties/message id/delivery attempt, and acks them.

usage: send_receive.py --endpoint H:P --topic T --group G [--count N]
Prints {"ok", "sent": [...], "received": [...], "errors": [...]} on stdout.
"""

import rmqtest as rt
from receive_only import receive_and_verify
from send_only import send_messages


def main():
    p = rt.base_parser(__doc__)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--tag", default="TagA")
    p.add_argument("--wait", type=float, default=60.0)
    p.add_argument("--invisible", type=int, default=30)
    p.add_argument("--await-duration", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    rt.check_required(args, "endpoint", "topic", "group")
    # Options used by receive_and_verify.
    args.expect_count, args.filter, args.expect_attempt = None, args.tag, 1
    args.allow_duplicates, args.no_ack = False, False
    rt.setup_client_logging()
    rt.start_watchdog(args.timeout, "send_receive")
    run_id = rt.new_run_id()
    errors, sent, received = [], [], []
    try:
        sent, errors = send_messages(args, run_id)
        rt.log(f"sent {len(sent)} message(s)")
        ids = [m["message_id"] for m in sent]
        if len(set(ids)) != len(ids):
            errors.append("the producer returned duplicate message ids")
        received, rerrors = receive_and_verify(args, sent)
        errors += rerrors
        rt.log(f"received {len(received)} message(s)")
    except Exception as e:
        errors.append(f"client error: {e!r}")
    for e in errors:
        rt.log("FAIL: " + e)
    rt.emit({"client": rt.LANG, "ok": not errors, "topic": args.topic, "group": args.group,
             "sent_ids": [m["message_id"] for m in sent],
             "received": received, "errors": errors})
    rt.finish(0 if not errors else 1)


if __name__ == "__main__":
    main()
