"""The interface ops.py drives; implemented by iptables.py and nftables.py.

A backend's state is a tuple of :class:`~redirect.ruleset.Rule` (only ours).  ``restore``
makes the namespace hold exactly the given rules, atomically: it is used to install
(``restore(desired(spec))``), to roll back (``restore(captured_before)``) and to remove
(``restore(())``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from redirect.ruleset import Rule
from redirect.spec import RedirectSpec


class Backend(Protocol):
    name: str

    def preflight(self, netns: str) -> None:
        """Raise RedirectError if installing here would mix rule flavours or backends."""

    def desired(self, spec: RedirectSpec) -> tuple[Rule, ...]: ...

    def capture(self, netns: str) -> tuple[Rule, ...]: ...

    def restore(self, netns: str, rules: Sequence[Rule]) -> None: ...

    def present(self, netns: str) -> bool:
        """Whether any rule of ours (from this backend) is installed."""

    def show(self, netns: str) -> str: ...
