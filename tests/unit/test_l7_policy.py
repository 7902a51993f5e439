"""retry_policy, timeouts and traffic_policy: Istio's defaults filled in."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from pydantic import TypeAdapter

from ztunnel_cfg import Snapshot, load_config_text
from ztunnel_cfg.l7 import RetryPolicy, TrafficPolicy, retry_policy, timeouts, traffic_policy
from ztunnel_cfg.model import (
    UNLIMITED,
    ConnectionPool,
    HttpPoolSettings,
    LoadBalancerPolicy,
    OutlierDetection,
    RouteRule,
    TcpPoolSettings,
)

ISTIO_DEFAULT_RETRY_ON = frozenset(
    {"connect-failure", "refused-stream", "unavailable", "cancelled"}
)
BACKEND = "backendRefs: [{service: a/b, port: 80}]"


def rule(extra: str = "") -> RouteRule:
    data = yaml.safe_load(f"{{{BACKEND}{', ' + extra if extra else ''}}}")
    result: RouteRule = TypeAdapter(RouteRule).validate_python(data, by_alias=True, by_name=False)
    return result


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param(
            None,
            RetryPolicy(2, ISTIO_DEFAULT_RETRY_ON, frozenset(), 0.025, None),
            id="no-rule-istio-default",
        ),
        pytest.param(
            "",
            RetryPolicy(2, ISTIO_DEFAULT_RETRY_ON, frozenset(), 0.025, None),
            id="rule-without-retry-istio-default-503-not-retried",
        ),
        pytest.param(
            "retry: {attempts: 5}",
            RetryPolicy(5, ISTIO_DEFAULT_RETRY_ON, frozenset(), 0.025, None),
            id="attempts-only-keeps-default-conditions",
        ),
        pytest.param(
            "retry: {attempts: 0}",
            RetryPolicy(0, ISTIO_DEFAULT_RETRY_ON, frozenset(), 0.025, None),
            id="attempts-zero-disables",
        ),
        pytest.param(
            "retry: {retryOn: [5xx, reset]}",
            RetryPolicy(2, frozenset({"5xx", "reset"}), frozenset(), 0.025, None),
            id="retry-on-replaces-the-default",
        ),
        pytest.param(
            "retry: {retryOn: [], codes: [503, 429]}",
            RetryPolicy(
                2, frozenset({"retriable-status-codes"}), frozenset({503, 429}), 0.025, None
            ),
            id="codes-imply-retriable-status-codes",
        ),
        pytest.param(
            "retry: {codes: [503]}",
            RetryPolicy(
                2,
                ISTIO_DEFAULT_RETRY_ON | {"retriable-status-codes"},
                frozenset({503}),
                0.025,
                None,
            ),
            id="codes-add-to-default-conditions",
        ),
        pytest.param(
            "retry: {backoff: 100ms, perTryTimeout: 2s}",
            RetryPolicy(2, ISTIO_DEFAULT_RETRY_ON, frozenset(), 0.1, 2.0),
            id="backoff-and-per-try",
        ),
        pytest.param(
            "timeouts: {backendRequest: 500ms}",
            RetryPolicy(2, ISTIO_DEFAULT_RETRY_ON, frozenset(), 0.025, 0.5),
            id="gateway-api-backend-request-is-per-try",
        ),
    ],
)
def test_retry_policy(extra: str | None, expected: RetryPolicy) -> None:
    assert retry_policy(None if extra is None else rule(extra)) == expected


def test_backoff_is_capped_at_ten_times_its_base() -> None:
    assert retry_policy(rule("retry: {backoff: 50ms}")).backoff_max == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param(None, (None, None), id="no-rule"),
        pytest.param("", (None, None), id="no-route-timeout-unless-set"),
        pytest.param("timeouts: {request: 2s}", (2.0, None), id="request"),
        pytest.param("timeouts: {request: 0s}", (None, None), id="zero-is-no-timeout"),
        pytest.param("timeouts: {request: 2s, backendRequest: 250ms}", (2.0, 0.25), id="both"),
        pytest.param("timeouts: {backendRequest: 0}", (None, None), id="zero-per-try"),
        pytest.param("retry: {perTryTimeout: 1s}", (None, 1.0), id="istio-per-try"),
    ],
)
def test_timeouts(extra: str | None, expected: tuple[float | None, float | None]) -> None:
    assert timeouts(None if extra is None else rule(extra)) == expected


# --- traffic_policy ---------------------------------------------------------------------------

SVC = "shop/cart.shop.svc.cluster.local"
BASE = textwrap.dedent(f"""\
    workloads: []
    services:
    - {{name: cart, namespace: shop, ports: {{80: 8080}}}}
    - {{name: other, namespace: shop, ports: {{80: 8080}}}}
    trafficPolicies:
    - name: cart
      namespace: shop
      service: {SVC}
    """)


def snapshot(body: str) -> Snapshot:
    return Snapshot.build(load_config_text(BASE + textwrap.indent(body, "  ")))


DEFAULT_POOL = ConnectionPool(
    tcp=TcpPoolSettings(max_connections=UNLIMITED),
    http=HttpPoolSettings(
        http1_max_pending_requests=UNLIMITED,
        http2_max_requests=UNLIMITED,
        max_requests_per_connection=0,
        max_retries=UNLIMITED,
    ),
)
ISTIO_OUTLIER = OutlierDetection(
    consecutive5xxErrors=5,
    consecutive_gateway_errors=0,
    interval=10.0,
    base_ejection_time=30.0,
    max_ejection_percent=10,
    min_health_percent=0,
)


@pytest.mark.parametrize(
    ("body", "pool", "outlier", "lb"),
    [
        pytest.param("", DEFAULT_POOL, None, LoadBalancerPolicy.LEAST_REQUEST, id="all-defaults"),
        pytest.param(
            "connectionPool: {tcp: {maxConnections: 100}, http: {maxRetries: 3}}\n",
            ConnectionPool(
                tcp=TcpPoolSettings(max_connections=100),
                http=HttpPoolSettings(max_retries=3),
            ),
            None,
            LoadBalancerPolicy.LEAST_REQUEST,
            id="pool-partly-set",
        ),
        pytest.param(
            "outlierDetection: {}\n",
            DEFAULT_POOL,
            ISTIO_OUTLIER,
            LoadBalancerPolicy.LEAST_REQUEST,
            id="outlier-given-empty-takes-istio-defaults",
        ),
        pytest.param(
            "outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 1m}\n",
            DEFAULT_POOL,
            OutlierDetection(consecutive5xxErrors=2, base_ejection_time=60.0),
            LoadBalancerPolicy.LEAST_REQUEST,
            id="outlier-partly-set",
        ),
        pytest.param(
            "loadBalancer: {simple: ROUND_ROBIN}\n",
            DEFAULT_POOL,
            None,
            LoadBalancerPolicy.ROUND_ROBIN,
            id="round-robin",
        ),
        pytest.param(
            "loadBalancer: {}\n",
            DEFAULT_POOL,
            None,
            LoadBalancerPolicy.LEAST_REQUEST,
            id="load-balancer-default",
        ),
    ],
)
def test_traffic_policy(
    body: str,
    pool: ConnectionPool,
    outlier: OutlierDetection | None,
    lb: LoadBalancerPolicy,
) -> None:
    snap = snapshot(body)
    service = snap.service_by_key(SVC)
    assert service is not None
    expected = TrafficPolicy(SVC, "shop/cart", pool, outlier, lb)
    assert traffic_policy(snap, service) == expected
    assert traffic_policy(snap, SVC) == expected


def test_service_without_a_traffic_policy_gets_istio_defaults() -> None:
    snap = snapshot("")
    other = "shop/other.shop.svc.cluster.local"
    assert traffic_policy(snap, other) == TrafficPolicy(
        other, None, DEFAULT_POOL, None, LoadBalancerPolicy.LEAST_REQUEST
    )
