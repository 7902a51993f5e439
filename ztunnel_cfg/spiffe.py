"""SPIFFE IDs: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`` exactly.

Node identities (used by agents to authenticate to the CA) have the documented shape
``spiffe://<trust-domain>/node/<node-name>``; they are a different type so that a node
certificate can never be mistaken for a workload identity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ztunnel_cfg.errors import SpiffeIdError

DEFAULT_TRUST_DOMAIN = "cluster.local"

# Trust domain per the SPIFFE spec: lowercase letters, digits, '.', '-', '_'.
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
# Kubernetes-style names (DNS-1123 labels / subdomains) for namespace, SA and node.
_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


def check_trust_domain(trust_domain: str) -> str:
    if not trust_domain:
        raise SpiffeIdError("trust domain is empty")
    if len(trust_domain) > 255 or not _TRUST_DOMAIN.match(trust_domain):
        raise SpiffeIdError(
            f"trust domain {trust_domain!r} is invalid: "
            "use lowercase letters, digits, '.', '-', '_'"
        )
    return trust_domain


def _check_name(kind: str, value: str, whole: str) -> None:
    if not value:
        raise SpiffeIdError(f"{whole!r}: {kind} is empty")
    if not _NAME.match(value):
        raise SpiffeIdError(
            f"{whole!r}: {kind} {value!r} is not a valid name "
            "(lowercase letters, digits, '-' and '.', starting and ending alphanumeric)"
        )


def _split(text: str) -> tuple[str, list[str]]:
    if not isinstance(text, str):
        raise SpiffeIdError(f"{text!r} is not a string")
    if not text.startswith("spiffe://"):
        raise SpiffeIdError(f"{text!r} does not start with 'spiffe://'")
    rest = text[len("spiffe://") :]
    if any(c in rest for c in "?#%"):
        raise SpiffeIdError(f"{text!r}: query, fragment and percent-encoding are not allowed")
    trust_domain, _, path = rest.partition("/")
    try:
        check_trust_domain(trust_domain)
    except SpiffeIdError as exc:
        raise SpiffeIdError(f"{text!r}: {exc.message}") from None
    return trust_domain, path.split("/") if path else []


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A workload identity.  ``str()`` gives the URI."""

    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        trust_domain, segments = _split(text)
        if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
            raise SpiffeIdError(
                f"{text!r} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            )
        _check_name("namespace", segments[1], text)
        _check_name("service account", segments[3], text)
        return cls(trust_domain, segments[1], segments[3])

    @classmethod
    def of(
        cls, namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN
    ) -> SpiffeId:
        """Build and validate from parts."""
        return cls.parse(f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True, slots=True, order=True)
class NodeId:
    """An agent's node identity: ``spiffe://<trust-domain>/node/<node-name>``."""

    trust_domain: str
    node: str

    @classmethod
    def parse(cls, text: str) -> NodeId:
        trust_domain, segments = _split(text)
        if len(segments) != 2 or segments[0] != "node":
            raise SpiffeIdError(f"{text!r} is not of the form spiffe://<trust-domain>/node/<node-name>")
        _check_name("node name", segments[1], text)
        return cls(trust_domain, segments[1])

    @classmethod
    def of(cls, node: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> NodeId:
        return cls.parse(f"spiffe://{trust_domain}/node/{node}")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/node/{self.node}"

    def __str__(self) -> str:
        return self.uri
