"""systemd readiness / status / watchdog notifications (the ``sd_notify(3)`` protocol).

The protocol is one datagram of newline-separated ``KEY=VALUE`` lines sent to the AF_UNIX
socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket).  It is small and
stable, so it is implemented here rather than taken from PyPI: the maintained bindings
(python-systemd) need libsystemd and a C build, and the pure-Python ones are thin, mostly
unmaintained wrappers of these same ~40 lines.  Every call is a no-op when ``NOTIFY_SOCKET`` is
unset (not started by systemd, or ``Type=simple``), and a failed send is logged, never raised:
notification must not be able to take the agent down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("nodeproxy.sdnotify")
_EXTRA = {"component": "sdnotify"}


def _address(value: str) -> str | bytes:
    # "@name" is Linux's abstract namespace: the kernel wants a leading NUL byte instead.
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends notifications to the service manager named by an (injected) environment."""

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        pid: int | None = None,
        clock_usec: Callable[[], int] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self.socket_path: str | None = env.get("NOTIFY_SOCKET") or None
        self._pid = os.getpid() if pid is None else pid
        self._clock_usec = clock_usec or (lambda: time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                                          // 1000)
        self.watchdog_usec = self._watchdog_usec(env)
        self._sock: socket.socket | None = None
        self._warned = False

    def _watchdog_usec(self, env: Mapping[str, str]) -> int | None:
        # WATCHDOG_PID, when set, names the process the watchdog is meant for (as in
        # sd_watchdog_enabled(3)).
        usec, for_pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0:
            return None
        if for_pid and (not for_pid.isdigit() or int(for_pid) != self._pid):
            return None
        return int(usec)

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    @property
    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or None when systemd armed no watchdog for us."""
        return None if self.watchdog_usec is None or not self.enabled else self.watchdog_usec / 1e6

    def notify(self, *lines: str) -> bool:
        """Send one datagram; True if it was sent (False when disabled or on error)."""
        if self.socket_path is None:
            return False
        payload = "\n".join(lines).encode()
        try:
            if self._sock is None:
                # Non-blocking: a stalled service manager must never stall the event loop.
                self._sock = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                           | socket.SOCK_NONBLOCK)
            self._sock.sendto(payload, _address(self.socket_path))
        except OSError as exc:
            if not self._warned:  # once: a missing socket would otherwise flood the log
                log.warning("sd_notify to %s failed: %s", self.socket_path, exc, extra=_EXTRA)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1"] + ([f"STATUS={_one_line(status)}"] if status is not None else [])
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=draining connections")

    def reloading(self) -> bool:
        # MONOTONIC_USEC is required by Type=notify-reload (systemd >= 253) and harmless before.
        # The caller must send ready() again when the reload is done.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={self._clock_usec()}",
                           "STATUS=reloading config")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment in the datagram.
    return " ".join(text.split("\n"))


async def run_watchdog(
    notifier: Notifier, healthy: Callable[[], bool], stop: asyncio.Event
) -> None:
    """Ping ``WATCHDOG=1`` every half interval while ``healthy()`` holds, until ``stop``.

    The pings come from the event loop itself, so a loop that is blocked (a stuck syscall, a
    busy handler) stops pinging and systemd restarts the agent: that is the point.  An
    unhealthy agent stops pinging too.  Returns at once when no watchdog is armed.
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    period = interval / 2
    while not stop.is_set():
        try:
            ok = healthy()
        except Exception:  # a broken health check is an unhealthy agent, not a crash
            log.exception("watchdog health check failed", extra=_EXTRA)
            ok = False
        if ok:
            notifier.watchdog()
        else:
            log.warning("unhealthy: withholding watchdog ping", extra=_EXTRA)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=period)


async def supervise(
    notifier: Notifier,
    is_ready: Callable[[], bool],
    status_text: Callable[[], str],
    stop: asyncio.Event,
    *,
    poll: float = 0.5,
) -> None:
    """Send ``READY=1`` once ``is_ready()`` first holds, and ``STATUS=`` whenever it changes."""
    if not notifier.enabled:
        return
    sent_ready = False
    last: str | None = None
    while not stop.is_set():
        text = _one_line(status_text())
        if not sent_ready and is_ready():
            notifier.ready(text)
            sent_ready, last = True, text
        elif text != last:
            notifier.status(text)
            last = text
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=poll)
