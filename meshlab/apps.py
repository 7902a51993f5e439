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
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any


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
        self._path = path
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        if self._path is None:
            return
        with self._lock, open(self._path, "ab") as fh:
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
    return run_client(args.connect, args.send, args.timeout, args.count)


if __name__ == "__main__":
    sys.exit(main())
