"""The agent never proxies to its own capture ports, outbound side (pure rule).

A connection to ``<pod>:15006`` (or 15001, or an HBONE CONNECT whose authority names one of
them) would make the agent dial its own listener, which accepts it and dials again: one client
connection became an unbounded chain of agent sockets. The capture ports only ever receive
redirected traffic, so they are never a legitimate destination (Linkerd's PreventLoop is the
same rule). Outbound, 15008 is refused only towards mesh workloads: apps never originate HBONE
to a captured pod, while a non-mesh host may well listen on 15008. The inbound side is part of
:func:`ztunnel_cfg.admission.admit_inbound`.
"""

from __future__ import annotations

from nodeproxy.proxy.env import Ports


def outbound_refusal(ports: Ports, port: int, *, mesh_destination: bool) -> str | None:
    """Why an outbound connection to ``port`` is refused, or None."""
    if port in (ports.outbound, ports.inbound_plaintext) or (
            mesh_destination and port == ports.inbound_hbone):
        return (f"destination port {port} is an agent capture port of the destination; "
                "applications cannot connect to it")
    return None
