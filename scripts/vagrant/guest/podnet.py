#!/usr/bin/python3
"""Pod test app for the Vagrant suite (stdlib only; runs inside pod network namespaces).

  podnet.py serve PORT                 echo server (one thread per connection)
  podnet.py echo HOST PORT MESSAGE     send MESSAGE, half-close, print what came back
  podnet.py hold HOST PORT SECONDS     one connection for SECONDS: a line every 0.5 s, each
                                       echoed back intact; prints the number of round trips
  podnet.py http PORT NAME RECORD [FAIL_EVERY]
                                       HTTP/1.1 server (keep-alive) that names itself: answers
                                       200 {"pod": NAME, "n": N, "path": PATH}; with FAIL_EVERY
                                       = k the 1st of every k requests (n = 1, 1+k, ...) gets
                                       503 instead.  Every request is appended to RECORD as a
                                       JSON line {"n", "path", "status", "peer"}
  podnet.py get URL COUNT              COUNT sequential GETs of URL ("{i}" in it becomes the
                                       request's index) on one keep-alive connection, reopened
                                       only if the server closes it; prints one JSON object
                                       {"statuses", "pods", "connections", "errors"}
Exit status: 0 ok, 2 connect/transfer failure (printed), 3 wrong echo.
"""

import json
import socket
import socketserver
import sys
import time


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve_http(port: int, name: str, record_path: str, fail_every: int) -> None:
    # Imported here: the echo server (every pod's app) starts faster without them (TCG).
    import http.server
    import threading

    lock = threading.Lock()
    count = 0
    record = open(record_path, "a", buffering=1)  # noqa: SIM115 (lives as long as we do)

    class Named(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            nonlocal count
            with lock:
                count += 1
                n = count
                fail = fail_every > 0 and (n - 1) % fail_every == 0
                status = 503 if fail else 200
                record.write(json.dumps({"n": n, "path": self.path, "status": status,
                                         "peer": self.client_address[0]}) + "\n")
            body = (json.dumps({"pod": name, "n": n, "path": self.path}) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class HttpServer(http.server.ThreadingHTTPServer):
        allow_reuse_address = True
        daemon_threads = True

    HttpServer(("0.0.0.0", port), Named).serve_forever()


def http_get(url: str, count: int) -> None:
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    conn = None
    connections = 0
    statuses: dict[str, int] = {}
    pods: dict[str, int] = {}
    errors: list[str] = []
    for i in range(1, count + 1):
        path = (parts.path or "/").replace("{i}", str(i))
        try:
            if conn is None:
                conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80,
                                                  timeout=10)
                conn.connect()
                connections += 1
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            statuses[str(resp.status)] = statuses.get(str(resp.status), 0) + 1
            try:
                pod = json.loads(body)["pod"]
            except (ValueError, KeyError, TypeError):
                pod = "?"
            pods[pod] = pods.get(pod, 0) + 1
            if resp.will_close:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"request {i}: {exc!r}")
            if conn is not None:
                conn.close()
            conn = None
    print(json.dumps({"statuses": statuses, "pods": pods, "connections": connections,
                      "errors": errors}), flush=True)


def fail(code: int, what: str) -> None:
    print(what, flush=True)
    sys.exit(code)


def main(argv: list[str]) -> None:
    cmd = argv[0]
    if cmd == "serve":
        Server(("0.0.0.0", int(argv[1])), Echo).serve_forever()
    if cmd == "http":
        fail_every = int(argv[4]) if len(argv) > 4 else 0
        serve_http(int(argv[1]), argv[2], argv[3], fail_every)
    if cmd == "get":
        http_get(argv[1], int(argv[2]))
        return
    host, port = argv[1], int(argv[2])
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        fail(2, f"connect failed: {exc!r}")
    try:
        if cmd == "echo":
            sock.sendall(argv[3].encode())
            sock.shutdown(socket.SHUT_WR)
            got = b""
            while data := sock.recv(65536):
                got += data
            print(got.decode(errors="replace"), flush=True)
            if got != argv[3].encode():
                sys.exit(3)
        elif cmd == "hold":
            deadline = time.monotonic() + float(argv[3])
            n = 0
            while time.monotonic() < deadline:
                line = f"line {n} {time.time():.3f}\n".encode()
                sock.sendall(line)
                got = b""
                while len(got) < len(line):
                    data = sock.recv(len(line) - len(got))
                    if not data:
                        fail(2, f"connection closed after {n} round trips")
                    got += data
                if got != line:
                    fail(3, f"bad echo after {n} round trips: {got!r}")
                n += 1
                time.sleep(0.5)
            print(n, flush=True)
    except OSError as exc:
        fail(2, f"transfer failed: {exc!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
