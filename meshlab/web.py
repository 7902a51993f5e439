"""HTTP in the lab: curl as the client inside a pod, and a handle on the HTTP app
(``python -m meshlab.apps http``) running inside another.

The pure half (:func:`curl_argv`, :func:`parse_curl_results`, :func:`parse_http_reply`)
builds curl command lines and reads what curl printed; :class:`HttpApp` talks to a running
app through its stdin/stdout and reads its record file.  :class:`meshlab.build.Cluster`
runs them inside namespaces (``serve_http``, ``curl``, ``fetch``).
"""

from __future__ import annotations

import json
import select
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlab.topology import LabError

# One line per transfer, fields split by tabs (none of them can hold a tab or a newline but
# the error text, which comes last and is cut at the line's end).
_WRITE_OUT = ("%{http_code}\\t%header{x-served-by}\\t%{time_total}\\t%{exitcode}\\t"
              "%{num_connects}\\t%{url}\\t%{errormsg}\\n")
# Marks where the response ends in ``fetch`` output (after headers and body).
_END = "\n--meshlab-curl-end--\t%{http_code}\t%{exitcode}\t%{errormsg}\n"
SERVED_BY = "x-served-by"


@dataclass(frozen=True, slots=True)
class CurlResult:
    """One transfer as curl saw it.  ``status`` 0: no HTTP answer (see ``exit_code``)."""

    status: int
    served_by: str  # the x-served-by header of the answer ("" when absent)
    seconds: float
    exit_code: int  # curl's: 0 ok, 7 connect failed, 28 timeout, 52 empty reply, 56 recv ...
    url: str
    error: str = ""
    connects: int = 0  # new connections curl opened for this transfer (0: it reused one)


@dataclass(frozen=True, slots=True)
class HttpReply:
    """One response with its head and body, as curl received it."""

    status: int
    headers: Mapping[str, str]  # lower-case names; a repeated name keeps the last value
    body: bytes
    exit_code: int = 0
    error: str = ""

    def text(self) -> str:
        return self.body.decode(errors="replace")


def curl_argv(urls: Sequence[str], *, parallel: int = 0, method: str = "GET",
              headers: Sequence[str] = (), max_time: float = 10.0,
              write_out: str = _WRITE_OUT, discard_body: bool = True) -> list[str]:
    """curl's command line: every URL in one process (sequential requests reuse one
    keep-alive connection); ``parallel`` > 0 runs that many transfers at once, each on its
    own connection.  A URL may use curl's globbing (``/canary/[1-1000]``)."""
    argv = ["curl", "--silent", "--show-error", "--noproxy", "*", "--max-time", f"{max_time:g}",
            "--request", method, "--write-out", write_out]
    for header in headers:
        argv += ["--header", header]
    if parallel:
        argv += ["--parallel", "--parallel-immediate", "--parallel-max", str(parallel)]
    for url in urls:
        argv += [url, *(["--output", "/dev/null"] if discard_body else [])]
    return argv


def parse_curl_results(text: str) -> list[CurlResult]:
    """The transfers in curl's ``--write-out`` output of :func:`curl_argv` (other lines, such
    as ``--show-error`` messages, are skipped)."""
    results = []
    for line in text.splitlines():
        parts = line.split("\t", 6)
        if len(parts) < 6 or not parts[0].isdigit() or not parts[3].isdigit() or \
                not parts[4].isdigit():
            continue
        try:
            seconds = float(parts[2])
        except ValueError:
            continue
        results.append(CurlResult(int(parts[0]), parts[1], seconds, int(parts[3]), parts[5],
                                  parts[6] if len(parts) > 6 else "", connects=int(parts[4])))
    return results


def parse_http_reply(raw: bytes) -> HttpReply:
    """Split ``curl --include`` output of one request (with the ``_END`` trailer) into
    status, headers and body.  Interim 1xx heads are skipped."""
    data, sep, tail = raw.rpartition(b"\n--meshlab-curl-end--\t")
    if not sep:
        raise LabError(f"curl printed no result line: {raw[-300:]!r}")
    fields = tail.decode(errors="replace").rstrip("\n").split("\t", 2)
    code, exit_code, error = [*fields, "", ""][:3]
    headers: dict[str, str] = {}
    body = b""
    while data.startswith(b"HTTP/"):
        head, blank, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        data = body
        status_line = lines[0].split()
        if not blank or len(status_line) < 2 or not status_line[1].startswith("1"):
            break
    return HttpReply(int(code) if code.isdigit() else 0, headers, body,
                     int(exit_code) if exit_code.isdigit() else 0, error)


def fetch_argv(url: str, *, method: str = "GET", headers: Sequence[str] = (),
               max_time: float = 10.0) -> list[str]:
    """curl's command line for one request whose head and body are wanted."""
    return [*curl_argv([url], method=method, headers=headers, max_time=max_time,
                       write_out=_END, discard_body=False), "--include"]


class HttpApp:
    """A running ``meshlab.apps http`` server: change its behaviour, read its record.

    Made by :meth:`meshlab.build.Cluster.serve_http` once the app listens; the cluster ends
    the process on destroy, :meth:`stop` ends it earlier."""

    def __init__(self, proc: subprocess.Popen[str], *, pod: str, port: int, tag: str,
                 record: Path) -> None:
        self.proc, self.pod, self.port, self.tag, self.record = proc, pod, port, tag, record

    def set(self, timeout: float = 5.0, **settings: int) -> dict[str, int]:
        """Change ``fail_percent``, ``fail_status`` or ``delay_ms``; returns once the app
        has applied them (its answer on stdout), with the settings now in force."""
        if self.proc.stdin is None or self.proc.stdout is None:
            raise LabError(f"HTTP app {self.tag} in {self.pod} was started without pipes")
        self.proc.stdin.write(json.dumps(settings) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if not ready:
                raise LabError(f"HTTP app {self.tag} in {self.pod} did not apply {settings} "
                               f"within {timeout:g} s", hint="is it still running?")
            line = self.proc.stdout.readline()
            if not line:
                raise LabError(f"HTTP app {self.tag} in {self.pod} exited "
                               f"(status {self.proc.poll()})")
            answer = json.loads(line)
            if "error" in answer:
                raise LabError(f"HTTP app {self.tag} refused {settings}: {answer['error']}")
            if "applied" in answer:
                return dict(answer["applied"])

    def requests(self) -> list[dict[str, Any]]:
        """What the app answered so far, one dict per request (``n``, ``status``, ``path``,
        ``method``, ``peer``, ``delay_ms``), in order."""
        if not self.record.exists():
            return []
        # The last piece is "" or a line being appended right now (no newline yet).
        lines = self.record.read_text().split("\n")[:-1]
        return [json.loads(line) for line in lines if line]

    def statuses(self) -> list[int]:
        return [int(r["status"]) for r in self.requests()]

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
