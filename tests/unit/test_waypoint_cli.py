"""``nodeproxy routes`` and ``nodeproxy waypoint endpoints`` rendering (from admin dumps)."""

from __future__ import annotations

import textwrap

from cli.waypoint_cmd import endpoint_rows, route_rows
from ztunnel_cfg.dump import config_to_document
from ztunnel_cfg.loader import load_config_text

CONFIG = textwrap.dedent("""
    workloads:
    - {name: r1, namespace: default, workloadIps: ["10.0.0.1"], node: n1,
       canonicalRevision: v1, services: {default/reviews.default.svc.cluster.local: {80: 80}}}
    services:
    - {name: reviews, namespace: default, vips: ["/10.96.0.1"], ports: {80: 80}}
    routes:
    - name: reviews
      namespace: default
      parentRefs: [{service: default/reviews.default.svc.cluster.local, port: 80}]
      rules:
      - matches: [{method: GET, path: {type: Exact, value: /a},
                   headers: [{name: x-user, value: bob}]}]
        backendRefs: [{service: default/reviews.default.svc.cluster.local, port: 80,
                       subset: {version: v1}, weight: 7}]
        timeouts: {request: 1500ms}
        retry: {attempts: 4}
      - backendRefs: [{service: default/reviews.default.svc.cluster.local, port: 80}]
""")


def test_route_rows_one_per_rule() -> None:
    dump = config_to_document(load_config_text(CONFIG, "c.yaml"))
    assert route_rows(dump) == [
        ["default", "reviews", "reviews:80", "0", "GET Exact /a x-user=bob",
         "reviews:80[version=v1] w7", "1.5s", "4x"],
        ["default", "reviews", "reviews:80", "1", "*", "reviews:80 w1", "-", "default"],
    ]


def test_endpoint_rows_show_health_and_ejections() -> None:
    dump = {"clusters": [{"cluster": "default/reviews:80", "endpoints": [
        {"address": "10.0.0.1:80", "workload": "default/r1", "activeRequests": 2,
         "health": {"ejected": True, "seconds_left": 12.4, "times_ejected": 1}},
        {"address": "10.0.0.2:80", "workload": "default/r2", "activeRequests": 0},
    ]}]}
    assert endpoint_rows(dump) == [
        ["default/reviews:80", "10.0.0.1:80", "default/r1", "EJECTED", "12s", "1", "2"],
        ["default/reviews:80", "10.0.0.2:80", "default/r2", "HEALTHY", "-", "0", "0"],
    ]
