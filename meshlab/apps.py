"""Tiny traffic apps run inside lab pods (no nodeproxy imports: they stand for user apps).

``python -m meshlab.apps server --port P [--tag NAME] [--record FILE]``
    Answers every connection with ``<tag> from <ip>:<port>\\n`` (the peer address it saw,
    which proves source-IP preservation), then echoes what it receives until the client
    half-closes.  With ``--record`` every received byte is appended to FILE (proof of
    whether a marker arrived).  Prints ``{"listening": [ip, port]}`` once bound.

``python -m meshlab.apps client --connect IP:PORT --send TEXT [--timeout S] [--count N]``
    For each of N sequential connections prints one JSON line:
    ``{"ok", "tag", "seen_from", "reply", "echo", "bytes_sent", "bytes_received",
    "error", "ms"}``; ``ok`` means the greeting arrived and the full text was echoed.
    Exit status 0 when every connection was ok, else 1.

``python -m meshlab.apps http --port P [--tag NAME] [--fail-percent N] [--fail-status S]
[--delay-ms D] [--record FILE]``
    An HTTP/1.1 server (keep-alive) that says who it is: every answer carries
    ``x-served-by: <tag>`` and a JSON body ``{"tag", "n", "status", "method", "path",
    "peer"}``.  It fails exactly N% of its requests with status S (503), spread evenly and
    failure first (N=50: fail, ok, fail, ...), so that tests are deterministic; each answer
    waits D ms first.  With ``--record`` one JSON line per request is appended to FILE
    (the backend's own record of what it answered).  Prints ``{"listening": [ip, port]}``
    once bound.  Settings change at run time with one JSON line on stdin, e.g.
    ``{"fail_percent": 0, "delay_ms": 0}``; it answers ``{"applied": {...}}`` on stdout.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar


def greeting(tag: str, peer: tuple[str, int]) -> bytes:
    return f"{tag} from {peer[0]}:{peer[1]}\n".encode()


def parse_reply(data: bytes) -> tuple[str | None, str | None, bytes]:
    """Split a server reply into (tag, seen_from, echoed bytes)."""
    line, sep, rest = data.partition(b"\n")
    if not sep:
        return None, None, b""
    tag, _, seen = line.decode(errors="replace").partition(" from ")
    return tag, seen or None, rest


# -- server ------------------------------------------------------------------------------


class _Recorder:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        if self.path is None:
            return
        with self._lock, open(self.path, "ab") as fh:
            fh.write(data)


def _serve_conn(conn: socket.socket, peer: tuple[str, int], tag: str, rec: _Recorder) -> None:
    with conn:
        try:
            conn.sendall(greeting(tag, peer))
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                rec.write(data)
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve(host: str, port: int, tag: str, record: str | None) -> None:
    rec = _Recorder(record)
    if record is not None:
        open(record, "ab").close()  # exists (empty) from the start
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(512)
    print(json.dumps({"listening": list(srv.getsockname()), "tag": tag}), flush=True)
    while True:
        conn, peer = srv.accept()
        threading.Thread(target=_serve_conn, args=(conn, peer, tag, rec), daemon=True).start()


# -- http server -------------------------------------------------------------------------


def should_fail(n: int, percent: int) -> bool:
    """Whether request number ``n`` (from 1) is one of the ``percent``% that fail: exactly
    ceil(n * percent / 100) of the first n requests fail, the first one included."""
    return -(-n * percent // 100) > -(-(n - 1) * percent // 100)


class HttpBehaviour:
    """What the HTTP app does, shared by its request threads and changed from stdin."""

    KEYS: ClassVar[tuple[str, ...]] = ("fail_percent", "fail_status", "delay_ms")

    def __init__(self, tag: str, fail_percent: int, fail_status: int, delay_ms: int,
                 record: str | None) -> None:
        self.tag = tag
        self.settings = {"fail_percent": fail_percent, "fail_status": fail_status,
                         "delay_ms": delay_ms}
        self.record = _Recorder(record)
        self.count = 0
        self.lock = threading.Lock()

    def apply(self, changes: Mapping[str, Any]) -> dict[str, int]:
        unknown = sorted(set(changes) - set(self.KEYS))
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; use {self.KEYS}")
        with self.lock:
            self.settings.update({k: int(v) for k, v in changes.items()})
            return dict(self.settings)

    def next_answer(self) -> tuple[int, int, int]:
        """(request number, status, delay in ms) for the next request."""
        with self.lock:
            self.count += 1
            n, s = self.count, self.settings
            status = s["fail_status"] if should_fail(n, s["fail_percent"]) else 200
            return n, status, s["delay_ms"]


class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the waypoint pools its upstream connections
    disable_nagle_algorithm = True  # head and body are two writes; no 40 ms delayed-ACK stall
    behaviour: ClassVar[HttpBehaviour]

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        b = self.behaviour
        n, status, delay_ms = b.next_answer()
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        doc = {"tag": b.tag, "n": n, "status": status, "method": self.command,
               "path": self.path, "peer": peer}
        b.record.write((json.dumps({**doc, "delay_ms": delay_ms}) + "\n").encode())
        if delay_ms:
            time.sleep(delay_ms / 1000)  # the behaviour under test: a slow backend
        body = (json.dumps(doc) + "\n").encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-served-by", b.tag)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the record file is the log


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away (a proxy's timeout, a circuit breaker) is routine here.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def _control(behaviour: HttpBehaviour) -> None:
    """Apply JSON settings lines from stdin; acknowledge each on stdout."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            applied: dict[str, Any] = {"applied": behaviour.apply(json.loads(line))}
        except (ValueError, TypeError, AttributeError) as exc:
            applied = {"error": str(exc)}
        print(json.dumps(applied), flush=True)


def serve_http(host: str, port: int, behaviour: HttpBehaviour) -> None:
    if behaviour.record.path is not None:
        open(behaviour.record.path, "ab").close()  # exists (empty) from the start
    handler = type("Handler", (_HttpHandler,), {"behaviour": behaviour})
    srv = _HttpServer((host, port), handler)
    print(json.dumps({"listening": list(srv.server_address), "tag": behaviour.tag}),
          flush=True)
    threading.Thread(target=_control, args=(behaviour,), daemon=True).start()
    srv.serve_forever()


# -- client ------------------------------------------------------------------------------


def connect_once(host: str, port: int, text: bytes, timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    result: dict[str, Any] = {
        "ok": False, "tag": None, "seen_from": None, "reply": "", "echo": "",
        "bytes_sent": 0, "bytes_received": 0, "error": None,
    }
    received = b""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(text)
            result["bytes_sent"] = len(text)
            sock.shutdown(socket.SHUT_WR)
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
    except OSError as exc:
        result["error"] = type(exc).__name__ + (f": {exc.strerror}" if exc.strerror else "")
    tag, seen, echo = parse_reply(received)
    result.update(
        tag=tag, seen_from=seen, reply=received.decode(errors="replace"),
        echo=echo.decode(errors="replace"), bytes_received=len(received),
        ms=round((time.monotonic() - started) * 1000, 2),
    )
    if result["error"] is None and tag is None:
        result["error"] = "closed without a reply"
    elif result["error"] is None and echo != text:
        result["error"] = f"echo mismatch ({len(echo)} of {len(text)} bytes)"
    result["ok"] = result["error"] is None
    return result


def run_client(target: str, text: str, timeout: float, count: int) -> int:
    host, _, port = target.rpartition(":")
    failures = 0
    for _ in range(count):
        res = connect_once(host, int(port), text.encode(), timeout)
        failures += not res["ok"]
        print(json.dumps(res), flush=True)
    return 0 if failures == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m meshlab.apps")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server", help="greet with tag and peer address, then echo")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--tag", default=socket.gethostname())
    s.add_argument("--record", default=None, help="append received bytes to this file")
    h = sub.add_parser("http", help="HTTP/1.1 server that names itself, fails N%%, is slow")
    h.add_argument("--host", default="0.0.0.0")
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--tag", default=socket.gethostname())
    h.add_argument("--fail-percent", type=int, default=0, choices=range(101), metavar="0-100")
    h.add_argument("--fail-status", type=int, default=503)
    h.add_argument("--delay-ms", type=int, default=0)
    h.add_argument("--record", default=None, help="append one JSON line per request here")
    c = sub.add_parser("client", help="connect, send, print one JSON line per connection")
    c.add_argument("--connect", required=True, metavar="IP:PORT")
    c.add_argument("--send", default="hello")
    c.add_argument("--timeout", type=float, default=5.0)
    c.add_argument("--count", type=int, default=1)
    args = ap.parse_args(argv)
    if args.cmd == "server":
        try:
            serve(args.host, args.port, args.tag, args.record)
        except KeyboardInterrupt:
            return 0
        return 0
    if args.cmd == "http":
        behaviour = HttpBehaviour(args.tag, args.fail_percent, args.fail_status, args.delay_ms,
                                  args.record)
        try:
            serve_http(args.host, args.port, behaviour)
        except KeyboardInterrupt:
            return 0
        return 0
    return run_client(args.connect, args.send, args.timeout, args.count)


if __name__ == "__main__":
    sys.exit(main())
