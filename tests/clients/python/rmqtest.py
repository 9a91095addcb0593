"""Shared helpers for the Python client system tests.

Every script in this directory prints exactly one JSON document on stdout and
human-readable diagnostics on stderr. The JSON "manifest" format is shared by
the Python, Node.js and Rust test programs so that one language can send and
another can receive and verify:

    {"client": "python", "topic": "...", "messages": [
        {"message_id": "...", "body": "...", "tag": "...",
         "keys": ["..."], "properties": {"k": "v"}}]}
"""

import argparse
import json
import logging
import os
import sys
import threading
import time
import uuid

from rocketmq import ClientConfiguration, Credentials, Message

LANG = "python"


def log(*args):
    print(f"[{LANG} {time.strftime('%H:%M:%S')}]", *args, file=sys.stderr, flush=True)


def finish(code: int):
    """Exit without waiting for the client's non-daemon threads."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_watchdog(seconds: float, what: str):
    """Hard deadline for the whole script: no hang may survive it."""

    def fire():
        log(f"FAIL: {what}: overall timeout of {seconds:.0f}s exceeded, aborting")
        emit({"client": LANG, "ok": False, "errors": [f"timeout after {seconds:.0f}s"]})
        finish(3)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t


def setup_client_logging():
    """The client logs to ~/logs/rocketmq_python only; mirror warnings to stderr."""
    lg = logging.getLogger("rocketmq-python-client")
    h = logging.StreamHandler(sys.stderr)
    h.setLevel(logging.DEBUG if os.environ.get("RMQ_TEST_VERBOSE") else logging.WARNING)
    h.setFormatter(logging.Formatter("[python-client %(levelname)s] %(message)s"))
    lg.addHandler(h)


def base_parser(description: str, group: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--endpoint", default=os.environ.get("SLUICE_ENDPOINT"),
                   help="host:port of the gRPC endpoint (env SLUICE_ENDPOINT)")
    p.add_argument("--topic", default=os.environ.get("SLUICE_TOPIC"),
                   help="topic name (env SLUICE_TOPIC)")
    if group:
        p.add_argument("--group", default=os.environ.get("SLUICE_GROUP"),
                       help="consumer group (env SLUICE_GROUP)")
    p.add_argument("--namespace", default=os.environ.get("SLUICE_NAMESPACE", ""),
                   help="client namespace (env SLUICE_NAMESPACE; default none)")
    p.add_argument("--access-key", default=os.environ.get("SLUICE_ACCESS_KEY", ""),
                   help="access key to sign requests with (default: none)")
    p.add_argument("--secret-key", default=os.environ.get("SLUICE_SECRET_KEY", ""))
    p.add_argument("--timeout", type=float, default=120.0,
                   help="hard deadline for the whole script, seconds")
    p.add_argument("--request-timeout", type=int, default=5,
                   help="client request timeout, seconds")
    return p


def check_required(args, *names):
    missing = [n for n in names if not getattr(args, n, None)]
    if missing:
        log("missing required argument(s): " + ", ".join("--" + m.replace("_", "-") for m in missing))
        finish(2)


def client_config(args) -> ClientConfiguration:
    # No access key: the server runs without authentication.
    creds = Credentials(args.access_key or "", args.secret_key or "")
    return ClientConfiguration(args.endpoint, creds, namespace=args.namespace or "",
                               request_timeout=args.request_timeout)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def message_spec(run_id: str, index: int, tag: str, lang: str = LANG) -> dict:
    """Deterministic, self-describing test message content."""
    body = f"sluice-test {lang} run={run_id} index={index} unicode=h\u00e9llo-\u2713"
    if index % 5 == 4:
        # A few larger bodies (about 8 KiB) to exercise more than one tiny frame.
        body += " " + ("0123456789abcdef" * 512)
    return {
        "body": body,
        "tag": tag,
        "keys": [f"key-{run_id}-{index}", f"order-{index}"],
        "properties": {
            "index": str(index),
            "lang": lang,
            "run": run_id,
            "note": "\u00fcnicode \u2713 value",
        },
    }


def build_message(topic: str, spec: dict) -> Message:
    msg = Message()
    msg.topic = topic
    msg.body = spec["body"].encode("utf-8")
    if spec.get("tag"):
        msg.tag = spec["tag"]
    # The `keys` property setter adds one key per assignment.
    for k in spec.get("keys", []):
        msg.keys = k
    for k, v in spec.get("properties", {}).items():
        msg.add_property(k, v)
    return msg


def view_to_dict(msg) -> dict:
    try:
        body = msg.body.decode("utf-8")
    except Exception:  # keep going, the comparison will flag it
        body = repr(msg.body)
    return {
        "message_id": msg.message_id,
        "body": body,
        "tag": msg.tag,
        "keys": sorted(msg.keys or []),
        "properties": dict(msg.properties or {}),
        "delivery_attempt": msg.delivery_attempt,
        "corrupted": bool(msg.corrupted),
        "topic": msg.topic,
    }


def compare_message(expected: dict, got: dict) -> list:
    """Return a list of human-readable differences (empty = identical)."""
    errs = []
    mid = expected.get("message_id")
    if got.get("message_id") != mid:
        errs.append(f"{mid}: message_id {got.get('message_id')!r} != {mid!r}")
    if got.get("body") != expected["body"]:
        errs.append(f"{mid}: body differs (got {got.get('body', '')[:80]!r}..., "
                    f"want {expected['body'][:80]!r}...)")
    if (got.get("tag") or None) != (expected.get("tag") or None):
        errs.append(f"{mid}: tag {got.get('tag')!r} != {expected.get('tag')!r}")
    if sorted(got.get("keys") or []) != sorted(expected.get("keys") or []):
        errs.append(f"{mid}: keys {sorted(got.get('keys') or [])} != {sorted(expected.get('keys') or [])}")
    if (got.get("properties") or {}) != (expected.get("properties") or {}):
        errs.append(f"{mid}: properties {got.get('properties')} != {expected.get('properties')}")
    if got.get("corrupted"):
        errs.append(f"{mid}: client flagged the message as corrupted (body digest mismatch)")
    return errs


def load_manifest(path: str) -> dict:
    with open(path, "r", encoding="utf-8") as f:
        data = json.load(f)
    if "messages" not in data:
        raise ValueError(f"{path}: not a send manifest (no 'messages')")
    return data


def emit(obj: dict):
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def safe_shutdown(client, what: str):
    if client is None:
        return
    try:
        client.shutdown()
    except Exception as e:  # shutdown problems are reported but not fatal
        log(f"warning: {what} shutdown raised: {e!r}")
