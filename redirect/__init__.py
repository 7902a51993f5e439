"""Traffic capture for pod network namespaces: plan, install, verify, remove.

Never imports ``nodeproxy``; the agent is handed these functions by the wiring code.
"""

from redirect.errors import RedirectError
from redirect.ops import (
    Drift,
    InstallReport,
    RemoveReport,
    install,
    make_backend,
    remove,
    show,
    verify,
)
from redirect.plan import IptablesPlan, plan_iptables, plan_nft
from redirect.spec import RedirectSpec

__all__ = [
    "Drift",
    "InstallReport",
    "IptablesPlan",
    "RedirectError",
    "RedirectSpec",
    "RemoveReport",
    "install",
    "make_backend",
    "plan_iptables",
    "plan_nft",
    "remove",
    "show",
    "verify",
]
