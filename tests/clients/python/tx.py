#!/usr/bin/env python3
"""Transactional messages with the official Python Producer (TransactionChecker).

usage:
  tx.py produce --endpoint H:P --topic T [--check-wait S]
      Sends five transactional messages: A committed, B rolled back, C, D and E never
      ended. The checker answers COMMIT for C, ROLLBACK for D and "unknown" for E. Waits
      until the server checked C and D once and E at least twice, checking what the
      server sent. Prints the send manifest of what must be delivered (A and C) plus
      "never": the ids that must never be delivered (B, D, E).
  tx.py half --endpoint H:P --topic T
      Sends one transactional message and exits without ending it (manifest on stdout).
  tx.py answer --endpoint H:P --topic T --expect-file HALF.json [--resolution commit]
      Starts a producer for T whose checker answers the given resolution for the ids in
      the manifest; waits until the server asked about every one of them.
  tx.py verify --endpoint H:P --topic T --group G --expect-file SENT.json [--linger S]
      SimpleConsumer: every message of the manifest arrives exactly once; then keeps
      receiving for --linger seconds: nothing else (in particular no "never" id) may come.
"""

import threading
import time

import rmqtest as rt
from rocketmq import (FilterExpression, Producer, SimpleConsumer, TransactionChecker,
                      TransactionResolution)

UNKNOWN = TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED


class Checker(TransactionChecker):
    """Answers from a table of message id -> resolution and records every call."""

    def __init__(self, topic):
        self.topic = topic
        self.answers = {}
        self.bodies = {}
        self.calls = {}
        self.errors = []
        self.lock = threading.Lock()

    def check(self, message):
        mid = message.message_id
        with self.lock:
            self.calls[mid] = self.calls.get(mid, 0) + 1
            if mid not in self.answers:
                self.errors.append(f"checked unknown message id {mid!r}")
                return TransactionResolution.ROLLBACK
            if message.topic != self.topic:
                self.errors.append(f"{mid}: check carries topic {message.topic!r}, not {self.topic!r}")
            body = message.body.decode("utf-8", "replace")
            if self.bodies.get(mid) is not None and body != self.bodies[mid]:
                self.errors.append(f"{mid}: check carries body {body[:60]!r}")
            rt.log(f"checked {mid} (call {self.calls[mid]}): answering {self.answers[mid]}")
            return self.answers[mid]

    def count(self, mid):
        with self.lock:
            return self.calls.get(mid, 0)


def wait_until(pred, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return pred()


def send_half(producer, topic, spec):
    tx = producer.begin_transaction()
    msg = rt.build_message(topic, spec)
    receipt = producer.send(msg, tx)
    if not receipt.transaction_id:
        raise AssertionError("send receipt carries no transaction id")
    if receipt.message_id != msg.message_id:
        raise AssertionError(f"receipt message id {receipt.message_id!r} != {msg.message_id!r}")
    spec["message_id"] = receipt.message_id
    return tx


def produce(args):
    run_id = rt.new_run_id()
    checker = Checker(args.topic)
    producer = Producer(rt.client_config(args), (args.topic,), checker)
    producer.startup()
    errors, delivered, never = [], [], []
    try:
        specs = {name: rt.message_spec(run_id, i, f"Tx{name}") for i, name in enumerate("ABCDE")}
        txs = {}
        for name, spec in specs.items():
            txs[name] = send_half(producer, args.topic, spec)
            checker.bodies[spec["message_id"]] = spec["body"]
        checker.answers.update({
            specs["C"]["message_id"]: TransactionResolution.COMMIT,
            specs["D"]["message_id"]: TransactionResolution.ROLLBACK,
            specs["E"]["message_id"]: UNKNOWN,
        })
        txs["A"].commit()
        txs["B"].rollback()
        rt.log("A committed, B rolled back; C, D, E left to the server's checks")
        ids = {n: specs[n]["message_id"] for n in "ABCDE"}
        ok = wait_until(lambda: checker.count(ids["C"]) >= 1 and checker.count(ids["D"]) >= 1
                        and checker.count(ids["E"]) >= 2, args.check_wait)
        if not ok:
            errors.append(f"server checks within {args.check_wait:.0f}s: "
                          f"{ {n: checker.count(ids[n]) for n in 'CDE'} } (want C>=1, D>=1, E>=2)")
        for n in "AB":
            if checker.count(ids[n]):
                errors.append(f"{n} ({ids[n]}) was checked although it was ended")
        # Let the answers (EndTransaction RPCs sent from the checker thread) complete.
        time.sleep(2)
        errors += checker.errors
        delivered = [specs["A"], specs["C"]]
        never = [ids["B"], ids["D"], ids["E"]]
        checks = {ids[n]: checker.count(ids[n]) for n in "ABCDE"}
    finally:
        rt.safe_shutdown(producer, "producer")
    return {"run_id": run_id, "messages": delivered, "never": never, "checks": checks}, errors


def half(args):
    run_id = rt.new_run_id()
    checker = Checker(args.topic)
    producer = Producer(rt.client_config(args), (args.topic,), checker)
    producer.startup()
    spec = rt.message_spec(run_id, 0, "TxHalf")
    send_half(producer, args.topic, spec)
    rt.log(f"half message {spec['message_id']} sent; not ending it")
    # Exit without ending the transaction (and without saying goodbye).
    return {"run_id": run_id, "messages": [spec], "never": []}, []


def answer(args):
    manifest = rt.load_manifest(args.expect_file)
    resolution = {"commit": TransactionResolution.COMMIT,
                  "rollback": TransactionResolution.ROLLBACK}[args.resolution]
    checker = Checker(args.topic)
    for m in manifest["messages"]:
        checker.answers[m["message_id"]] = resolution
        checker.bodies[m["message_id"]] = m["body"]
    producer = Producer(rt.client_config(args), (args.topic,), checker)
    producer.startup()
    errors = []
    try:
        ids = list(checker.answers)
        if not wait_until(lambda: all(checker.count(i) >= 1 for i in ids), args.check_wait):
            errors.append(f"not asked about every half message within {args.check_wait:.0f}s: "
                          f"{ {i: checker.count(i) for i in ids} }")
        time.sleep(2)
        errors += checker.errors
    finally:
        rt.safe_shutdown(producer, "producer")
    return {"checks": {i: checker.count(i) for i in checker.answers}}, errors


def verify(args):
    manifest = rt.load_manifest(args.expect_file)
    want = {m["message_id"]: m for m in manifest["messages"]}
    never = set(manifest.get("never", []))
    received, errors = {}, []
    consumer = SimpleConsumer(rt.client_config(args), args.group,
                              {args.topic: FilterExpression("*")}, await_duration=2)
    consumer.startup()
    try:
        deadline = time.monotonic() + args.wait
        linger_until = None
        while True:
            now = time.monotonic()
            if linger_until is None and (len(received) >= len(want) or now >= deadline):
                linger_until = now + args.linger
            if linger_until is not None and now >= linger_until:
                break
            try:
                msgs = consumer.receive(16, 30)
            except Exception as e:
                rt.log(f"receive raised {e!r}; retrying")
                time.sleep(1)
                continue
            for m in msgs or []:
                d = rt.view_to_dict(m)
                mid = d["message_id"]
                if mid in never:
                    errors.append(f"{mid} was delivered although it was rolled back or never committed")
                elif mid not in want:
                    errors.append(f"unexpected message {mid} body={d['body'][:60]!r}")
                elif mid in received:
                    errors.append(f"{mid} delivered twice")
                else:
                    received[mid] = d
                    errors.extend(rt.compare_message(want[mid], d))
                consumer.ack(m)
        missing = [mid for mid in want if mid not in received]
        if missing:
            errors.append(f"committed message(s) never delivered: {missing}")
    finally:
        rt.safe_shutdown(consumer, "simple consumer")
    return {"received": list(received.values())}, errors


def main():
    p = rt.base_parser(__doc__)
    p.add_argument("mode", choices=["produce", "half", "answer", "verify"])
    p.add_argument("--check-wait", type=float, default=45.0)
    p.add_argument("--expect-file")
    p.add_argument("--resolution", choices=["commit", "rollback"], default="commit")
    p.add_argument("--wait", type=float, default=60.0)
    p.add_argument("--linger", type=float, default=6.0)
    args = p.parse_args()
    rt.check_required(args, "endpoint", "topic")
    if args.mode == "verify":
        rt.check_required(args, "group", "expect_file")
    if args.mode == "answer":
        rt.check_required(args, "expect_file")
    rt.setup_client_logging()
    rt.start_watchdog(args.timeout, f"tx {args.mode}")
    try:
        out, errors = {"produce": produce, "half": half, "answer": answer, "verify": verify}[args.mode](args)
    except Exception as e:
        rt.log(f"FAIL: {args.mode} failed: {e!r}")
        rt.emit({"client": rt.LANG, "ok": False, "errors": [repr(e)]})
        rt.finish(1)
    for e in errors:
        rt.log("FAIL: " + e)
    rt.emit({"client": rt.LANG, "ok": not errors, "topic": args.topic, **out, "errors": errors})
    rt.finish(0 if not errors else 1)


if __name__ == "__main__":
    main()
