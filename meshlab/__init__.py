"""A multi-node cluster made of network namespaces, for tests and ``nodeproxy demo``.

See docs/lab.md.  ``topology`` plans (pure), ``build`` creates and tears down, ``capture``
records the node-to-node link, ``config`` renders a nodeproxy config for the cluster (waypoints
included), ``mesh`` runs the CA service, the agents and waypoint proxies on it, ``apps`` are
the tiny traffic programs run inside pods (an echo server and client, an HTTP server that can
fail or be slow) and ``web`` drives curl in a pod and reads what it printed.

Names are imported lazily so that ``python -m meshlab.apps`` (started many times per
test inside pods) does not pay for importing the rest of the project.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshlab.build import Cluster, sweep
    from meshlab.capture import Capture, CaptureResult, Packet
    from meshlab.config import (
        PodRole,
        ServiceDef,
        WaypointDef,
        captured_workloads,
        dump_config,
        render_config,
    )
    from meshlab.topology import (
        ClusterPlan,
        ClusterSpec,
        LabError,
        NodePlan,
        PodPlan,
        plan_cluster,
        random_prefix,
    )
    from meshlab.web import CurlResult, HttpApp, HttpReply

_WHERE = {
    "Cluster": "build", "sweep": "build",
    "Capture": "capture", "CaptureResult": "capture", "Packet": "capture",
    "PodRole": "config", "ServiceDef": "config", "dump_config": "config",
    "render_config": "config", "WaypointDef": "config", "captured_workloads": "config",
    "CurlResult": "web", "HttpApp": "web", "HttpReply": "web",
    "ClusterPlan": "topology", "ClusterSpec": "topology", "LabError": "topology",
    "NodePlan": "topology", "PodPlan": "topology", "plan_cluster": "topology",
    "random_prefix": "topology",
}

__all__ = [
    "Capture",
    "CaptureResult",
    "Cluster",
    "ClusterPlan",
    "ClusterSpec",
    "CurlResult",
    "HttpApp",
    "HttpReply",
    "LabError",
    "NodePlan",
    "Packet",
    "PodPlan",
    "PodRole",
    "ServiceDef",
    "WaypointDef",
    "captured_workloads",
    "dump_config",
    "plan_cluster",
    "random_prefix",
    "render_config",
    "sweep",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"meshlab.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'meshlab' has no attribute {name!r}")
