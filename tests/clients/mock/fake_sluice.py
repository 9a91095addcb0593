#!/usr/bin/env python3
"""A deliberately small stand-in for the `sluice` binary, used ONLY to check
the client test harness itself (tests/clients/run.sh) while the real server is
not available. It is not a reference for Sluice's behaviour: one logical queue
per topic, a JSON snapshot as "storage", no performance to speak of.

It implements the same command line as the real binary:
  fake_sluice.py server --data-dir D --listen H:P --admin-listen H:P --flush sync|async
  fake_sluice.py topic create NAME --type normal|fifo|delay|transaction [--queues N] --admin URL
  fake_sluice.py group create NAME [--fifo] [--max-attempts N] --admin URL
The admin HTTP API between these commands is private to this file.
"""

import argparse
import base64
import hashlib
import json
import os
import signal
import sys
import threading
import time
import urllib.request
import uuid
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from rocketmq.grpc_protocol import definition_pb2 as d
from rocketmq.grpc_protocol import service_pb2 as s
from rocketmq.grpc_protocol import service_pb2_grpc as sg

TYPES = {"normal": d.NORMAL, "fifo": d.FIFO, "delay": d.DELAY, "transaction": d.TRANSACTION}
DEFAULT_MAX_ATTEMPTS = 17
# Fault injection, to check that the harness notices broken servers:
# comma-separated subset of lose_props, no_dlq, volatile, sigterm_exit1.
BUGS = set(filter(None, os.environ.get("FAKE_SLUICE_BUG", "").split(",")))
BACKOFF = [1, 5, 10, 30, 60, 120]


def status(code=d.OK, msg="OK"):
    return d.Status(code=code, message=msg)


def ts(ms):
    t = timestamp_pb2.Timestamp()
    t.FromMilliseconds(int(ms))
    return t


def dur(seconds):
    return duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))


def now_ms():
    return int(time.time() * 1000)


class Store:
    """All broker state, guarded by one condition variable."""

    def __init__(self, data_dir, sync):
        self.path = os.path.join(data_dir, "state.json")
        self.sync = sync
        self.cv = threading.Condition()
        self.topics = {}    # name -> {"type": int, "queues": n}
        self.groups = {}    # name -> {"fifo", "max_attempts", "from_seq"}
        self.messages = {}  # topic -> [ {"seq", "pb": b64, "store_ms"} ]
        self.subs = {}      # "group\ttopic" -> {"cursor": idx, "inflight": {idx: {...}}, "retry": {idx: attempt}}
        self.seq = 0
        if os.path.exists(self.path):
            with open(self.path) as f:
                st = json.load(f)
            self.topics, self.groups, self.messages = st["topics"], st["groups"], st["messages"]
            self.seq = st["seq"]
            for k, v in st["subs"].items():
                # In-flight state does not survive a restart: make it visible again.
                retry = {int(i): a for i, a in v.get("retry", {}).items()}
                for i, inf in v.get("inflight", {}).items():
                    retry[int(i)] = inf["attempt"]
                self.subs[k] = {"cursor": v["cursor"], "inflight": {}, "retry": retry}

    def persist(self):
        if "volatile" in BUGS:
            return
        st = {"topics": self.topics, "groups": self.groups, "messages": self.messages, "seq": self.seq,
              "subs": {k: {"cursor": v["cursor"], "retry": v["retry"],
                           "inflight": {str(i): {"attempt": x["attempt"]} for i, x in v["inflight"].items()}}
                       for k, v in self.subs.items()}}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(st, f)
            if self.sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def sub(self, group, topic):
        key = f"{group}\t{topic}"
        if key not in self.subs:
            g = self.groups.get(group, {"from_seq": 0})
            msgs = self.messages.get(topic, [])
            cursor = next((i for i, m in enumerate(msgs) if m["seq"] >= g["from_seq"]), len(msgs))
            self.subs[key] = {"cursor": cursor, "inflight": {}, "retry": {}}
        return self.subs[key]

    def append(self, topic, msg_pb):
        self.seq += 1
        lst = self.messages.setdefault(topic, [])
        lst.append({"seq": self.seq, "pb": base64.b64encode(msg_pb.SerializeToString()).decode(),
                    "store_ms": now_ms()})
        return len(lst) - 1

    def dead_letter(self, group, topic, idx):
        dlq = f"%DLQ%{group}"
        self.topics.setdefault(dlq, {"type": d.NORMAL, "queues": 1})
        m = self.load(topic, idx)
        m.topic.name = dlq
        self.append(dlq, m)

    def load(self, topic, idx):
        m = d.Message()
        m.ParseFromString(base64.b64decode(self.messages[topic][idx]["pb"]))
        return m

    def expire(self, group, topic, sub):
        """Move expired in-flight messages to retry (or to the DLQ)."""
        t = now_ms()
        changed = False
        for idx, inf in list(sub["inflight"].items()):
            if inf["visible_at"] <= t:
                del sub["inflight"][idx]
                maxa = self.groups.get(group, {}).get("max_attempts", DEFAULT_MAX_ATTEMPTS)
                if inf["attempt"] >= maxa and "no_dlq" not in BUGS:
                    self.dead_letter(group, topic, idx)
                else:
                    sub["retry"][idx] = inf["attempt"] + 1
                changed = True
        return changed

    def next_wakeup(self, sub):
        if not sub["inflight"]:
            return None
        return min(i["visible_at"] for i in sub["inflight"].values())

    def pop(self, group, topic, tags, batch, invisible_s):
        sub = self.sub(group, topic)
        changed = self.expire(group, topic, sub)
        out = []
        for idx in sorted(sub["retry"]):
            if len(out) >= batch:
                break
            out.append((idx, sub["retry"].pop(idx)))
        msgs = self.messages.get(topic, [])
        while len(out) < batch and sub["cursor"] < len(msgs):
            idx = sub["cursor"]
            sub["cursor"] += 1
            m = self.load(topic, idx)
            if tags is None or m.system_properties.tag in tags:
                out.append((idx, 1))
        result = []
        for idx, attempt in out:
            handle = f"{idx}:{uuid.uuid4().hex}"
            sub["inflight"][idx] = {"handle": handle, "attempt": attempt,
                                    "visible_at": now_ms() + int(invisible_s * 1000)}
            m = self.load(topic, idx)
            sp = m.system_properties
            sp.receipt_handle = handle
            sp.delivery_attempt = attempt
            sp.queue_id = 0
            sp.queue_offset = idx
            sp.store_timestamp.CopyFrom(ts(self.messages[topic][idx]["store_ms"]))
            sp.invisible_duration.CopyFrom(dur(invisible_s))
            sp.body_digest.type = d.MD5
            sp.body_digest.checksum = hashlib.md5(m.body).hexdigest().upper()
            if "lose_props" in BUGS:
                m.user_properties.clear()
            result.append(m)
        if result or changed:
            self.persist()
        return result

    def find_inflight(self, group, topic, handle):
        sub = self.sub(group, topic)
        try:
            idx = int(handle.split(":", 1)[0])
        except ValueError:
            return sub, None
        inf = sub["inflight"].get(idx)
        if inf is None or inf["handle"] != handle:
            return sub, None
        return sub, idx


def parse_tags(expr):
    if expr is None or not expr.expression or expr.expression.strip() == "*":
        return None
    return {t.strip() for t in expr.expression.split("||")}


class Service(sg.MessagingServiceServicer):
    def __init__(self, store):
        self.st = store

    def QueryRoute(self, req, ctx):
        with self.st.cv:
            t = self.st.topics.get(req.topic.name)
        if t is None:
            return s.QueryRouteResponse(status=status(d.TOPIC_NOT_FOUND, f"topic {req.topic.name} not found"))
        eps = d.Endpoints()
        eps.CopyFrom(req.endpoints)
        resp = s.QueryRouteResponse(status=status())
        for qid in range(t["queues"]):
            resp.message_queues.add(topic=req.topic, id=qid, permission=d.READ_WRITE,
                                    broker=d.Broker(name="fake-broker", id=0, endpoints=eps),
                                    accept_message_types=[t["type"]])
        return resp

    def Heartbeat(self, req, ctx):
        return s.HeartbeatResponse(status=status())

    def SendMessage(self, req, ctx):
        resp = s.SendMessageResponse(status=status())
        with self.st.cv:
            for m in req.messages:
                if m.topic.name not in self.st.topics:
                    resp.status.CopyFrom(status(d.TOPIC_NOT_FOUND, "topic not found"))
                    resp.entries.add(status=status(d.TOPIC_NOT_FOUND, "topic not found"))
                    continue
                if not m.body:
                    resp.status.CopyFrom(status(d.BAD_REQUEST, "empty body"))
                    resp.entries.add(status=status(d.BAD_REQUEST, "empty body"))
                    continue
                idx = self.st.append(m.topic.name, m)
                resp.entries.add(status=status(), message_id=m.system_properties.message_id,
                                 transaction_id=uuid.uuid4().hex, offset=idx)
            self.st.persist()
            self.st.cv.notify_all()
        return resp

    def QueryAssignment(self, req, ctx):
        route = self.QueryRoute(s.QueryRouteRequest(topic=req.topic, endpoints=req.endpoints), ctx)
        if route.status.code != d.OK:
            return s.QueryAssignmentResponse(status=route.status)
        resp = s.QueryAssignmentResponse(status=status())
        resp.assignments.add(message_queue=route.message_queues[0])
        return resp

    def ReceiveMessage(self, req, ctx):
        group, topic = req.group.name, req.message_queue.topic.name
        with self.st.cv:
            if topic not in self.st.topics:
                yield s.ReceiveMessageResponse(status=status(d.TOPIC_NOT_FOUND, "topic not found"))
                return
        invisible = req.invisible_duration.seconds + req.invisible_duration.nanos / 1e9 \
            if req.HasField("invisible_duration") else 60.0
        poll = req.long_polling_timeout.seconds if req.HasField("long_polling_timeout") else 20
        remaining = ctx.time_remaining()
        if remaining is not None:
            poll = min(poll, remaining - 2)
        deadline = time.monotonic() + max(0.0, min(poll, 20))
        tags = parse_tags(req.filter_expression)
        with self.st.cv:
            while True:
                msgs = self.st.pop(group, topic, tags, max(1, req.batch_size), invisible)
                left = deadline - time.monotonic()
                if msgs or left <= 0 or not ctx.is_active():
                    break
                wake = self.st.next_wakeup(self.st.sub(group, topic))
                wait = left if wake is None else max(0.01, min(left, (wake - now_ms()) / 1000))
                self.st.cv.wait(timeout=min(wait, 1.0))
        if msgs:
            yield s.ReceiveMessageResponse(status=status())
            for m in msgs:
                yield s.ReceiveMessageResponse(message=m)
        else:
            yield s.ReceiveMessageResponse(status=status(d.MESSAGE_NOT_FOUND, "no new message"))
        yield s.ReceiveMessageResponse(delivery_timestamp=ts(now_ms()))

    def AckMessage(self, req, ctx):
        resp = s.AckMessageResponse(status=status())
        with self.st.cv:
            for e in req.entries:
                sub, idx = self.st.find_inflight(req.group.name, req.topic.name, e.receipt_handle)
                if idx is None:
                    st = status(d.INVALID_RECEIPT_HANDLE, "receipt handle expired or unknown")
                    resp.status.CopyFrom(st)
                else:
                    del sub["inflight"][idx]
                    st = status()
                resp.entries.add(message_id=e.message_id, receipt_handle=e.receipt_handle, status=st)
            self.st.persist()
        return resp

    def ChangeInvisibleDuration(self, req, ctx):
        with self.st.cv:
            sub, idx = self.st.find_inflight(req.group.name, req.topic.name, req.receipt_handle)
            if idx is None:
                return s.ChangeInvisibleDurationResponse(
                    status=status(d.INVALID_RECEIPT_HANDLE, "receipt handle expired or unknown"))
            inf = sub["inflight"][idx]
            inf["handle"] = f"{idx}:{uuid.uuid4().hex}"
            secs = req.invisible_duration.seconds + req.invisible_duration.nanos / 1e9
            inf["visible_at"] = now_ms() + int(secs * 1000)
            self.st.cv.notify_all()
            return s.ChangeInvisibleDurationResponse(status=status(), receipt_handle=inf["handle"])

    def ForwardMessageToDeadLetterQueue(self, req, ctx):
        with self.st.cv:
            sub, idx = self.st.find_inflight(req.group.name, req.topic.name, req.receipt_handle)
            if idx is None:
                return s.ForwardMessageToDeadLetterQueueResponse(
                    status=status(d.INVALID_RECEIPT_HANDLE, "receipt handle expired or unknown"))
            del sub["inflight"][idx]
            self.st.dead_letter(req.group.name, req.topic.name, idx)
            self.st.persist()
        return s.ForwardMessageToDeadLetterQueueResponse(status=status())

    def EndTransaction(self, req, ctx):
        return s.EndTransactionResponse(status=status())

    def NotifyClientTermination(self, req, ctx):
        return s.NotifyClientTerminationResponse(status=status())

    def Telemetry(self, request_iterator, ctx):
        for cmd in request_iterator:
            if not cmd.HasField("settings"):
                continue
            st = cmd.settings
            reply = d.Settings()
            reply.CopyFrom(st)
            if st.client_type == d.PRODUCER:
                reply.backoff_policy.max_attempts = 3
                reply.backoff_policy.exponential_backoff.initial.CopyFrom(dur(0.01))
                reply.backoff_policy.exponential_backoff.max.CopyFrom(dur(1))
                reply.backoff_policy.exponential_backoff.multiplier = 2
                reply.publishing.max_body_size = 4 * 1024 * 1024
                reply.publishing.validate_message_type = True
            else:
                group = st.subscription.group.name
                with self.st.cv:
                    g = self.st.groups.get(group, {})
                reply.subscription.fifo = bool(g.get("fifo", False))
                reply.subscription.receive_batch_size = 32
                reply.subscription.long_polling_timeout.CopyFrom(dur(20))
                reply.backoff_policy.max_attempts = g.get("max_attempts", DEFAULT_MAX_ATTEMPTS)
                for b in BACKOFF:
                    reply.backoff_policy.customized_backoff.next.add(seconds=b)
            reply.metric.on = False
            yield s.TelemetryCommand(status=status(), settings=reply)


def serve(args):
    os.makedirs(args.data_dir, exist_ok=True)
    store = Store(args.data_dir, args.flush == "sync")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    sg.add_MessagingServiceServicer_to_server(Service(store), server)
    if server.add_insecure_port(args.listen) == 0:
        print(f"cannot bind {args.listen}", file=sys.stderr)
        sys.exit(1)

    class Admin(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/readyz":
                self.reply(200, {"ready": True})
            else:
                self.reply(404, {"error": "not found"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with store.cv:
                if self.path == "/topics":
                    store.topics[body["name"]] = {"type": TYPES[body["type"]], "queues": body.get("queues", 4)}
                elif self.path == "/groups":
                    store.groups[body["name"]] = {"fifo": body.get("fifo", False),
                                                  "max_attempts": body.get("max_attempts", DEFAULT_MAX_ATTEMPTS),
                                                  "from_seq": store.seq + 1}
                else:
                    self.reply(404, {"error": "not found"})
                    return
                store.persist()
            self.reply(200, {"ok": True})

    host, port = args.admin_listen.rsplit(":", 1)
    admin = ThreadingHTTPServer((host, int(port)), Admin)
    threading.Thread(target=admin.serve_forever, daemon=True).start()
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"fake sluice serving gRPC on {args.listen}, admin on {args.admin_listen}", file=sys.stderr, flush=True)
    stop.wait()
    admin.shutdown()
    server.stop(grace=2).wait()
    with store.cv:
        store.persist()
    sys.exit(1 if "sigterm_exit1" in BUGS else 0)


def admin_post(url, path, obj):
    req = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(obj).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        if r.status != 200:
            sys.exit(f"admin call failed: HTTP {r.status}")


def main():
    p = argparse.ArgumentParser(prog="fake-sluice")
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("server")
    sp.add_argument("--data-dir", required=True)
    sp.add_argument("--listen", required=True)
    sp.add_argument("--admin-listen", required=True)
    sp.add_argument("--flush", choices=["sync", "async"], default="sync")
    tp = sub.add_parser("topic")
    tp.add_argument("action", choices=["create"])
    tp.add_argument("name")
    tp.add_argument("--type", choices=list(TYPES), default="normal")
    tp.add_argument("--queues", type=int, default=4)
    tp.add_argument("--admin", required=True)
    gp = sub.add_parser("group")
    gp.add_argument("action", choices=["create"])
    gp.add_argument("name")
    gp.add_argument("--fifo", action="store_true")
    gp.add_argument("--max-attempts", type=int, default=DEFAULT_MAX_ATTEMPTS)
    gp.add_argument("--admin", required=True)
    args = p.parse_args()
    if args.cmd == "server":
        serve(args)
    elif args.cmd == "topic":
        admin_post(args.admin, "/topics", {"name": args.name, "type": args.type, "queues": args.queues})
    else:
        admin_post(args.admin, "/groups", {"name": args.name, "fifo": args.fifo, "max_attempts": args.max_attempts})


if __name__ == "__main__":
    main()
