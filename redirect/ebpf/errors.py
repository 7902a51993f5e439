"""Errors of the eBPF backend, in the redirect package's family (:class:`RedirectError`)."""

from __future__ import annotations

from redirect.errors import RedirectError

FALLBACK_HINT = "or run the agent with '--redirect iptables' (or nftables)"


class EbpfError(RedirectError):
    """Loading, attaching, pinning or detaching the eBPF capture failed."""


class EbpfUnsupportedError(EbpfError):
    """This kernel or machine lacks something eBPF capture needs (named in the message)."""

    def __init__(self, feature: str, detail: str, *, netns: str | None = None,
                 hint: str | None = None) -> None:
        super().__init__(f"eBPF redirection needs {feature}: {detail}", netns=netns,
                         hint=f"{hint + '; ' if hint else ''}{FALLBACK_HINT}")
        self.feature = feature


class VerifierError(EbpfError):
    """The kernel's verifier refused a program; ``log`` is what it said."""

    def __init__(self, program: str, reason: str, log: str, *,
                 source: str = "nodeproxy_redirect.c") -> None:
        text = log.strip() or "(no verifier log)"
        super().__init__(f"the kernel refused BPF program {program}: {reason}\n"
                         f"verifier log:\n{text}",
                         hint=f"this kernel's verifier rejects bpf/{source}; {FALLBACK_HINT}")
        self.program = program
        self.log = log
