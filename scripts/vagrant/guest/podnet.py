#!/usr/bin/python3
"""Pod test app for the Vagrant suite (stdlib only; runs inside pod network namespaces).

  podnet.py serve PORT                 echo server (one thread per connection)
  podnet.py echo HOST PORT MESSAGE     send MESSAGE, half-close, print what came back
  podnet.py hold HOST PORT SECONDS     one connection for SECONDS: a line every 0.5 s, each
                                       echoed back intact; prints the number of round trips
Exit status: 0 ok, 2 connect/transfer failure (printed), 3 wrong echo.
"""

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


def fail(code: int, what: str) -> None:
    print(what, flush=True)
    sys.exit(code)


def main(argv: list[str]) -> None:
    cmd = argv[0]
    if cmd == "serve":
        Server(("0.0.0.0", int(argv[1])), Echo).serve_forever()
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
