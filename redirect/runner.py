"""The command-runner seam: backends build argv, a runner executes it.

Production uses :func:`subprocess_runner`; unit tests pass a fake that records calls and
returns scripted results.  Commands run inside a namespace via ``nsenter --net=PATH``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from redirect.errors import RedirectError

COMMAND_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], *, stdin: str | None = None) -> CommandResult: ...


def subprocess_runner(argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
    try:
        proc = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=COMMAND_TIMEOUT,
        )
    except FileNotFoundError as exc:
        return CommandResult(tuple(argv), 127, "", f"{exc.filename or argv[0]}: not found")
    except subprocess.TimeoutExpired:
        return CommandResult(tuple(argv), 124, "", f"timed out after {COMMAND_TIMEOUT:.0f}s")
    return CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    return ["nsenter", f"--net={netns}", *argv]


def run_in(
    runner: Runner,
    netns: str,
    argv: Sequence[str],
    *,
    stdin: str | None = None,
    hint: str | None = None,
) -> str:
    """Run ``argv`` inside ``netns``; return stdout or raise a RedirectError naming it all."""
    result = runner(in_netns(netns, argv), stdin=stdin)
    if result.returncode != 0:
        err = result.stderr.strip() or result.stdout.strip() or "(no output)"
        if result.returncode == 127:
            hint = hint or f"is '{argv[0]}' installed? (apt-get install iptables nftables)"
        raise RedirectError(
            f"'{' '.join(argv)}' failed in netns {netns} (exit {result.returncode}): {err}",
            netns=netns,
            hint=hint or "check that the namespace exists and that we run as root",
        )
    return result.stdout
