"""Node-restricted certificate issuance: a pure check over the snapshot (DESIGN §5)."""

from __future__ import annotations

from dataclasses import dataclass

from ztunnel_cfg.snapshot import Snapshot
from ztunnel_cfg.spiffe import SpiffeId

__all__ = ["IssuanceDecision", "may_issue"]


@dataclass(frozen=True, slots=True)
class IssuanceDecision:
    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


def may_issue(snapshot: Snapshot, node: str, identity: SpiffeId) -> IssuanceDecision:
    """Node ``node`` may obtain a certificate for ``identity`` only if a workload with that
    identity is scheduled on it, in the snapshot's trust domain."""
    if identity.trust_domain != snapshot.trust_domain:
        return IssuanceDecision(
            False,
            f"{identity} is in trust domain {identity.trust_domain!r}, but this mesh's trust "
            f"domain is {snapshot.trust_domain!r}",
        )
    if identity in snapshot.identities_on_node(node):
        names = ", ".join(w.key for w in snapshot.workloads_on_node(node) if w.identity == identity)
        return IssuanceDecision(True, f"{identity} is used by {names} on node {node!r}")
    if not snapshot.workloads_on_node(node):
        return IssuanceDecision(
            False, f"node {node!r} has no workloads in the config: check the agent's node name"
        )
    elsewhere = sorted({w.node for w in snapshot.config.workloads if w.identity == identity})
    if elsewhere:
        return IssuanceDecision(
            False,
            f"no workload with identity {identity} is scheduled on node {node!r} "
            f"(it runs on {', '.join(elsewhere)})",
        )
    return IssuanceDecision(
        False,
        f"no workload in the config has identity {identity}: check its namespace and "
        "service account",
    )
