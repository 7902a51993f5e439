"""Pure L7 decisions for waypoints: route selection, backends, rewrites, retries, policies.

Like the rest of ztunnel_cfg: no I/O, immutable inputs, every decision a function of a
:class:`~ztunnel_cfg.snapshot.Snapshot` and a request.  L7 authorization is
:func:`ztunnel_cfg.authz.authorize_request` (it shares the L4 evaluator).
"""

from ztunnel_cfg.l7.policy import RetryPolicy, TrafficPolicy, retry_policy, timeouts, traffic_policy
from ztunnel_cfg.l7.request import HeaderList, Request, header_value
from ztunnel_cfg.l7.rewrite import (
    Redirect,
    apply_header_modifier,
    mirrors,
    redirect_location,
    replace_prefix,
    response_headers,
    rewrite_request,
)
from ztunnel_cfg.l7.select import RouteSelection, backend_endpoints, choose_backend, select_route
from ztunnel_cfg.l7.table import RouteCandidate, ValueMatcher, build_route_table

__all__ = [
    "HeaderList",
    "Redirect",
    "Request",
    "RetryPolicy",
    "RouteCandidate",
    "RouteSelection",
    "TrafficPolicy",
    "ValueMatcher",
    "apply_header_modifier",
    "backend_endpoints",
    "build_route_table",
    "choose_backend",
    "header_value",
    "mirrors",
    "redirect_location",
    "replace_prefix",
    "response_headers",
    "retry_policy",
    "rewrite_request",
    "select_route",
    "timeouts",
    "traffic_policy",
]
