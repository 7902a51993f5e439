"""The demo's story (pure): who runs where, the service, the policies, and the connections to
make with what each is meant to show.  Nothing here touches the system."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshlab.config import PodRole, ServiceDef
from meshlab.topology import LabError

DEMO_STEM = "npd"  # demo prefixes look like npd3fa9- (tests use np3fa9-: no overlap)
DEMO_GLOB = "npd????-"
WORKDIR_STEM = "nodeproxy-demo-"
TRUST_DOMAIN = "cluster.local"
HBONE_PORT = 15008
CA_PORT = 15012


class DemoError(LabError):
    """The demo could not run, or the mesh did not behave as its config says."""



class Intent(enum.Enum):
    MESH = "mesh"  # pod -> mesh pod: must go through HBONE mTLS
    SERVICE = "service"  # pod -> service VIP: HBONE to an endpoint, spread over endpoints
    DENY = "deny"  # must be refused by an authorization policy; nothing reaches the app
    PASSTHROUGH = "passthrough"  # to a pod outside the mesh: plain TCP


@dataclass(frozen=True, slots=True)
class Step:
    title: str
    src: str  # pod short name (n1p1)
    dst: str  # pod short name, or the service name for Intent.SERVICE
    port: int
    intent: Intent
    count: int = 1


@dataclass(frozen=True, slots=True)
class Scenario:
    nodes: int
    pods_per_node: int
    roles: Mapping[str, PodRole]
    services: tuple[ServiceDef, ...]
    policies: tuple[Mapping[str, Any], ...]
    servers: tuple[tuple[str, int], ...]  # echo servers to start: (pod, port)
    steps: tuple[Step, ...]

    def without_policy(self, name: str) -> Scenario:
        """The same intent with one policy missing from the config (a sabotaged mesh, used to
        prove that the demo judges by what it observes)."""
        kept = tuple(p for p in self.policies if p.get("name") != name)
        return Scenario(self.nodes, self.pods_per_node, self.roles, self.services, kept,
                        self.servers, self.steps)


CATALOG_VIP = "10.96.0.20"
CATALOG_PORT = 80
APP_PORT = 8080
DB_PORT = 5432
LEDGER_PORT = 9090


def build_scenario(nodes: int = 2) -> Scenario:
    """The demo story.  node1: frontend (client), catalog-2 (an endpoint of the catalog
    service on the client's node), old-client (denied by policy).  node2: catalog, an
    inventory database outside the mesh, ledger (only frontend may call it).  Every further
    node adds one more catalog endpoint."""
    if nodes < 2:
        raise DemoError("the demo needs at least 2 nodes", hint="use --nodes 2 or more")
    roles: dict[str, PodRole] = {
        "n1p1": PodRole("default", "frontend", name="frontend"),
        "n1p2": PodRole("shop", "catalog", name="catalog-2"),
        "n1p3": PodRole("legacy", "old-client", name="old-client"),
        "n2p1": PodRole("shop", "catalog", name="catalog"),
        "n2p2": PodRole("data", "inventory-db", mesh=False, name="inventory-db"),
        "n2p3": PodRole("payments", "ledger", name="ledger"),
    }
    endpoints = ["catalog", "catalog-2"]
    for i in range(3, nodes + 1):
        roles[f"n{i}p1"] = PodRole("shop", "catalog", name=f"catalog-{i}")
        roles[f"n{i}p2"] = PodRole("default", "batch", name=f"batch-{i}")
        roles[f"n{i}p3"] = PodRole("default", "batch", name=f"batch-{i}b")
        endpoints.append(f"catalog-{i}")
    services = (ServiceDef("catalog", CATALOG_VIP, {CATALOG_PORT: APP_PORT}, endpoints,
                           namespace="shop"),)
    policies: tuple[Mapping[str, Any], ...] = (
        {"name": "deny-legacy", "namespace": "shop", "scope": "Namespace", "action": "Deny",
         "rules": [[[{"namespaces": ["legacy"]}]]]},
        {"name": "allow-frontend", "namespace": "payments", "scope": "Namespace",
         "action": "Allow",
         "rules": [[[{"principals": [f"spiffe://{TRUST_DOMAIN}/ns/default/sa/frontend"]}]]]},
    )
    servers = [("n2p1", APP_PORT), ("n1p2", APP_PORT), ("n2p2", DB_PORT), ("n2p3", LEDGER_PORT)]
    servers += [(f"n{i}p1", APP_PORT) for i in range(3, nodes + 1)]
    steps = (
        Step("cross-node call", "n1p1", "n2p1", APP_PORT, Intent.MESH),
        Step("allowed by an ALLOW policy", "n1p1", "n2p3", LEDGER_PORT, Intent.MESH),
        Step("service VIP, load-balanced", "n1p1", "catalog", CATALOG_PORT, Intent.SERVICE,
             count=3 * len(endpoints)),
        Step("denied by a DENY policy", "n1p3", "n2p1", APP_PORT, Intent.DENY),
        Step("to a pod outside the mesh", "n1p1", "n2p2", DB_PORT, Intent.PASSTHROUGH),
    )
    return Scenario(nodes, 3, roles, services, policies, tuple(servers), steps)


def marker_for(prefix: str, seq: int, step: Step) -> str:
    """A payload marker unique to one connection of one run."""
    tag = prefix.rstrip("-").removeprefix(DEMO_STEM) or "x"
    return f"NPDEMO-{tag}-{seq:02d}-{step.intent.value}"
