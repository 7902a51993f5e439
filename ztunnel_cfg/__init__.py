"""Pure config/state model for nodeproxy: no asyncio, no sockets, no other project imports."""

from ztunnel_cfg.authz import ConnectionInfo, Decision, RequestInfo, authorize, authorize_request
from ztunnel_cfg.errors import ConfigError, ConfigIssue, NodeproxyError, SpiffeIdError
from ztunnel_cfg.issuance import IssuanceDecision, may_issue
from ztunnel_cfg.loader import load_config_file, load_config_text
from ztunnel_cfg.model import (
    Action,
    Config,
    HttpRoute,
    Match,
    MtlsMode,
    PeerAuthentication,
    Policy,
    Protocol,
    Scope,
    Service,
    TargetRef,
    TrafficPolicyConfig,
    WaypointConfig,
    WaypointRef,
    Workload,
)
from ztunnel_cfg.reload import ReloadState
from ztunnel_cfg.routing import Route, RouteKind, route
from ztunnel_cfg.snapshot import Snapshot, load_snapshot
from ztunnel_cfg.spiffe import DEFAULT_TRUST_DOMAIN, NodeId, SpiffeId

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "Action",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "ConnectionInfo",
    "Decision",
    "HttpRoute",
    "IssuanceDecision",
    "Match",
    "MtlsMode",
    "NodeId",
    "NodeproxyError",
    "PeerAuthentication",
    "Policy",
    "Protocol",
    "ReloadState",
    "RequestInfo",
    "Route",
    "RouteKind",
    "Scope",
    "Service",
    "Snapshot",
    "SpiffeId",
    "SpiffeIdError",
    "TargetRef",
    "TrafficPolicyConfig",
    "WaypointConfig",
    "WaypointRef",
    "Workload",
    "authorize",
    "authorize_request",
    "load_config_file",
    "load_config_text",
    "load_snapshot",
    "may_issue",
    "route",
]
