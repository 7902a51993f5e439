"""The loader on the L7 sections: every bad value located (line, key path) and explained.

Each case appends a fragment to BASE; the line marked ``# <-`` is where the issue must be
reported, with that key path and a message containing the fragment given.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import pytest

from ztunnel_cfg import ConfigError, load_config_text
from ztunnel_cfg.loader import validate_config_text

BASE = textwrap.dedent("""\
    workloads:
    - {name: reviews-v1, namespace: bookinfo, workloadIps: ["10.0.0.1"], node: n1,
       canonicalName: reviews, canonicalRevision: v1,
       services: {bookinfo/reviews.bookinfo.svc.cluster.local: {9080: 9080}}}
    - {name: reviews-v2, namespace: bookinfo, workloadIps: ["10.0.0.2"], node: n1,
       canonicalName: reviews, canonicalRevision: v2,
       services: {bookinfo/reviews.bookinfo.svc.cluster.local: {9080: 9080}}}
    services:
    - {name: reviews, namespace: bookinfo, vips: ["/10.96.0.1"], ports: {9080: 9080}}
    - {name: ratings, namespace: bookinfo, vips: ["/10.96.0.2"], ports: {9080: 9080}}
    waypoints:
    - {name: waypoint, namespace: bookinfo, service: bookinfo/reviews.bookinfo.svc.cluster.local}
    """)
SVC = "bookinfo/reviews.bookinfo.svc.cluster.local"


def route(rule: str, *, parent: str = f"[{{service: {SVC}}}]", name: str = "r") -> str:
    """A routes section with one route whose only rule is ``rule`` (YAML flow mapping)."""
    head = f"routes:\n- name: {name}\n  namespace: bookinfo\n  parentRefs: {parent}\n"
    return f"{head}  rules:\n{rule}"


def backend(extra: str = "") -> str:
    return f"[{{service: {SVC}, port: 9080{extra}}}]"


OK_RULE = f"  - backendRefs: {backend()}\n"


def matching(match: str) -> str:
    """A route whose rule has the one ``match`` (flow YAML), on the marked line."""
    return route(f"  - matches: [{match}]  # <-\n    backendRefs: {backend()}\n")


def redirecting(redirect: str) -> str:
    """A route whose rule only redirects with ``redirect`` (flow YAML), on the marked line."""
    return route(
        f"  - filters:\n    - {{type: RequestRedirect, requestRedirect: {redirect}}}  # <-\n"
    )


def with_backend(rest: str) -> str:
    """A route whose rule has a backend and then ``rest`` (block YAML lines of the rule)."""
    return route(f"  - backendRefs: {backend()}\n{rest}")


def policy(body: str, *, head: str = "scope: Namespace") -> str:
    return f"policies:\n- name: p\n  namespace: bookinfo\n  action: Allow\n  {head}\n{body}"


def traffic(body: str, *, name: str = "t", service: str = SVC) -> str:
    return f"trafficPolicies:\n- name: {name}\n  namespace: bookinfo\n  service: {service}\n{body}"


@dataclass(frozen=True)
class Case:
    id: str
    fragment: str
    path: str
    message: str


CASES = [
    # --- routes: shape and parentRefs
    Case(
        "parentRefs missing",
        "routes:\n- {name: r, namespace: bookinfo, rules: [{backendRefs: []}]}  # <-\n",
        "routes[0]",
        "missing required key 'parentRefs'",
    ),
    Case(
        "parentRefs empty",
        "routes:\n- {name: r, namespace: bookinfo, parentRefs: [],  # <-\n"
        f"   rules: [{{backendRefs: {backend()}}}]}}\n",
        "routes[0].parentRefs",
        "list at least one parentRef",
    ),
    Case(
        "parentRef unknown service, with did-you-mean",
        route(OK_RULE, parent="[{service: bookinfo/review.bookinfo.svc.cluster.local}]  # <-"),
        "routes[0].parentRefs[0].service",
        "parentRef service 'bookinfo/review.bookinfo.svc.cluster.local' is not a known service "
        f"(did you mean '{SVC}'?)",
    ),
    Case(
        "parentRef port not a port of the service",
        route(OK_RULE, parent=f"[{{service: {SVC}, port: 80}}]  # <-"),
        "routes[0].parentRefs[0].port",
        f"service '{SVC}' has no port 80 (its ports: 9080)",
    ),
    Case(
        "parentRef listed twice",
        route(OK_RULE, parent=f"[{{service: {SVC}}}, {{service: {SVC}}}]  # <-"),
        "routes[0].parentRefs[1]",
        f"parentRef '{SVC}' is listed twice",
    ),
    Case(
        "rules empty",
        f"routes:\n- {{name: r, namespace: bookinfo, parentRefs: [{{service: {SVC}}}],\n"
        "   rules: []}  # <-\n",
        "routes[0].rules",
        "list at least one rule",
    ),
    Case(
        "duplicate route",
        route(OK_RULE)
        + f"- {{name: r, namespace: bookinfo, parentRefs: [{{service: {SVC}}}],  # <-\n"
        + f"   rules: [{{backendRefs: {backend()}}}]}}\n",
        "routes[1]",
        "duplicate route 'bookinfo/r' (see routes[0])",
    ),
    # --- matches
    Case(
        "path type unknown",
        matching("{path: {type: Prefix, value: /a}}"),
        "routes[0].rules[0].matches[0].path.type",
        "'Prefix' is not a valid path match type ('Exact', 'PathPrefix', 'RegularExpression')",
    ),
    Case(
        "Exact path without leading slash",
        matching("{path: {type: Exact, value: api}}"),
        "routes[0].rules[0].matches[0].path.value",
        "'api' must start with '/'",
    ),
    Case(
        "PathPrefix with a query",
        matching("{path: {value: '/a?x=1'}}"),
        "routes[0].rules[0].matches[0].path.value",
        "must not contain '?' or '#' (match query parameters with 'queryParams')",
    ),
    Case(
        "path regex does not compile (shows re.error)",
        route(
            "  - matches: [{path: {type: RegularExpression, value: '/a(b'}}]  # <-\n"
            f"    backendRefs: {backend()}\n"
        ),
        "routes[0].rules[0].matches[0].path.value",
        "'/a(b' is not a valid regular expression: missing ), unterminated subpattern",
    ),
    Case(
        "header name invalid",
        matching("{headers: [{name: 'x y', value: a}]}"),
        "routes[0].rules[0].matches[0].headers[0].name",
        "'x y' is not a valid header name",
    ),
    Case(
        "header value a YAML number",
        matching("{headers: [{name: x-canary, value: 1}]}"),
        "routes[0].rules[0].matches[0].headers[0].value",
        'expected a string, got integer 1 (quote it: "1")',
    ),
    Case(
        "header match type unknown",
        route(
            "  - matches: [{headers: [{type: Prefix, name: a, value: b}]}]  # <-\n"
            f"    backendRefs: {backend()}\n"
        ),
        "routes[0].rules[0].matches[0].headers[0].type",
        "'Prefix' is not a valid match type ('Exact', 'RegularExpression')",
    ),
    Case(
        "header regex does not compile",
        route(
            "  - matches: [{headers: [{type: RegularExpression, name: a, value: '[z-a]'}]}]  # <-\n"
            f"    backendRefs: {backend()}\n"
        ),
        "routes[0].rules[0].matches[0].headers[0].value",
        "'[z-a]' is not a valid regular expression: bad character range z-a",
    ),
    Case(
        "header matched twice in one match (names compare lowercased)",
        route(
            "  - matches: [{headers: [{name: X-A, value: '1'}, {name: x-a, value: '2'}]}]  # <-\n"
            f"    backendRefs: {backend()}\n"
        ),
        "routes[0].rules[0].matches[0].headers[1].name",
        "header 'x-a' is matched twice in one match",
    ),
    Case(
        "query parameter name with '='",
        matching("{queryParams: [{name: 'a=b', value: c}]}"),
        "routes[0].rules[0].matches[0].queryParams[0].name",
        "'a=b' is not a valid query parameter name",
    ),
    Case(
        "query parameter regex does not compile",
        route(
            "  - matches: [{queryParams: [{type: RegularExpression, name: a, value: '*'}]}]  # <-\n"
            f"    backendRefs: {backend()}\n"
        ),
        "routes[0].rules[0].matches[0].queryParams[0].value",
        "'*' is not a valid regular expression: nothing to repeat",
    ),
    Case(
        "method in lower case",
        matching("{method: get}"),
        "routes[0].rules[0].matches[0].method",
        "'get' is not an HTTP method (upper case, e.g. GET)",
    ),
    # --- filters
    Case(
        "filter type unknown",
        route(f"  - filters: [{{type: Rewrite}}]  # <-\n    backendRefs: {backend()}\n"),
        "routes[0].rules[0].filters[0].type",
        "'Rewrite' is not a valid filter type",
    ),
    Case(
        "filter field does not match its type",
        route(
            f"  - backendRefs: {backend()}\n    filters:\n"
            "    - {type: URLRewrite, requestRedirect: {statusCode: 301}}  # <-\n"
        ),
        "routes[0].rules[0].filters[0].requestRedirect",
        "'requestRedirect' does not match the filter's type URLRewrite (set type: "
        "RequestRedirect, or move it to a filter of its own)",
    ),
    Case(
        "filter without its field",
        route("  - filters:\n    - {type: RequestRedirect}  # <-\n"),
        "routes[0].rules[0].filters[0]",
        "a RequestRedirect filter needs 'requestRedirect'",
    ),
    Case(
        "two RequestHeaderModifier filters",
        route(
            f"  - backendRefs: {backend()}\n    filters:\n"
            "    - {type: RequestHeaderModifier, requestHeaderModifier: {remove: [a]}}\n"
            "    - {type: RequestHeaderModifier, requestHeaderModifier: {remove: [b]}}  # <-\n"
        ),
        "routes[0].rules[0].filters[1].type",
        "a rule may have one RequestHeaderModifier filter (another is filters[0]): merge them",
    ),
    Case(
        "redirect and rewrite together",
        route(
            "  - filters:\n"
            "    - {type: RequestRedirect, requestRedirect: {scheme: https}}\n"
            "    - {type: URLRewrite, urlRewrite: {hostname: a.example}}  # <-\n"
        ),
        "routes[0].rules[0].filters[1].type",
        "a rule cannot both redirect and rewrite",
    ),
    Case(
        "redirect status code not a redirect",
        redirecting("{statusCode: 305}"),
        "routes[0].rules[0].filters[0].requestRedirect.statusCode",
        "redirect status code 305 is not one of 301, 302, 303, 307, 308",
    ),
    Case(
        "redirect scheme unknown",
        redirecting("{scheme: ftp}"),
        "routes[0].rules[0].filters[0].requestRedirect.scheme",
        "'ftp' is not a valid scheme ('http', 'https')",
    ),
    Case(
        "redirect port out of range",
        redirecting("{port: 0}"),
        "routes[0].rules[0].filters[0].requestRedirect.port",
        "port 0 is out of range (1-65535)",
    ),
    Case(
        "redirect hostname with a path",
        redirecting("{hostname: a/b}"),
        "routes[0].rules[0].filters[0].requestRedirect.hostname",
        "'a/b' must not contain '/'",
    ),
    Case(
        "path modifier field not of its type",
        route(
            "  - filters:\n    - type: RequestRedirect\n      requestRedirect:\n"
            "        path: {type: ReplaceFullPath, replacePrefixMatch: /x}  # <-\n"
        ),
        "routes[0].rules[0].filters[0].requestRedirect.path.replacePrefixMatch",
        "'replacePrefixMatch' does not go with type ReplaceFullPath",
    ),
    Case(
        "path modifier without its field",
        route(
            f"  - backendRefs: {backend()}\n    filters:\n    - type: URLRewrite\n"
            "      urlRewrite: {path: {type: ReplaceFullPath}}  # <-\n"
        ),
        "routes[0].rules[0].filters[0].urlRewrite.path",
        "type ReplaceFullPath needs 'replaceFullPath'",
    ),
    Case(
        "ReplacePrefixMatch with an Exact match",
        route(
            "  - matches: [{path: {type: Exact, value: /a}}, {path: {value: /b}}]\n"
            f"    backendRefs: {backend()}\n    filters:\n    - type: URLRewrite\n"
            "      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /c}}  # <-\n"
        ),
        "routes[0].rules[0].filters[0].urlRewrite.path.type",
        "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
    ),
    Case(
        "URLRewrite that changes nothing",
        with_backend("    filters:\n    - {type: URLRewrite, urlRewrite: {}}  # <-\n"),
        "routes[0].rules[0].filters[0].urlRewrite",
        "set 'hostname' or 'path'",
    ),
    Case(
        "header modifier sets a header twice",
        route(
            f"  - backendRefs: {backend()}\n    filters:\n    - type: ResponseHeaderModifier\n"
            "      responseHeaderModifier:\n"
            "        {set: [{name: a, value: '1'}, {name: A, value: '2'}]}  # <-\n"
        ),
        "routes[0].rules[0].filters[0].responseHeaderModifier.set[1].name",
        "header 'a' is listed twice in 'set'",
    ),
    Case(
        "header modifier removes an invalid name",
        route(
            f"  - backendRefs: {backend()}\n    filters:\n    - type: RequestHeaderModifier\n"
            "      requestHeaderModifier: {remove: ['a b']}  # <-\n"
        ),
        "routes[0].rules[0].filters[0].requestHeaderModifier.remove[0]",
        "'a b' is not a valid header name",
    ),
    Case(
        "mirror to an unknown service",
        route(
            f"  - backendRefs: {backend()}\n    filters:\n    - type: RequestMirror\n"
            "      requestMirror:\n        backendRef: {service: bookinfo/shadow, port: 80}  # <-\n"
        ),
        "routes[0].rules[0].filters[0].requestMirror.backendRef.service",
        "mirror service 'bookinfo/shadow' is not a known service",
    ),
    Case(
        "mirror to a port the service does not have",
        route(
            f"  - backendRefs: {backend()}\n    filters:\n    - type: RequestMirror\n"
            "      requestMirror:\n"
            "        backendRef: {service: bookinfo/ratings.bookinfo.svc.cluster.local,\n"
            "                     port: 80}  # <-\n"
        ),
        "routes[0].rules[0].filters[0].requestMirror.backendRef.port",
        "has no port 80 (its ports: 9080)",
    ),
    Case(
        "mirror percent over 100",
        route(
            f"  - backendRefs: {backend()}\n    filters:\n    - type: RequestMirror\n"
            f"      requestMirror: {{backendRef: {{service: {SVC}, port: 9080}},\n"
            "                      percent: 101}  # <-\n"
        ),
        "routes[0].rules[0].filters[0].requestMirror.percent",
        "percentage 101 is out of range (0-100)",
    ),
    # --- backendRefs
    Case(
        "no backendRefs and no redirect",
        route("  - matches: [{method: GET}]  # <-\n"),
        "routes[0].rules[0]",
        "list at least one backendRef (or add a RequestRedirect filter)",
    ),
    Case(
        "backendRefs next to a redirect",
        route(
            f"  - backendRefs: {backend()}  # <-\n"
            "    filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]\n"
        ),
        "routes[0].rules[0].backendRefs",
        "answers the redirect itself and sends nothing to backends: remove 'backendRefs'",
    ),
    Case(
        "backendRef unknown service, with did-you-mean",
        route(
            "  - backendRefs: [{service: bookinfo/rating.bookinfo.svc.cluster.local,  # <-\n"
            "                   port: 9080}]\n"
        ),
        "routes[0].rules[0].backendRefs[0].service",
        "(did you mean 'bookinfo/ratings.bookinfo.svc.cluster.local'?)",
    ),
    Case(
        "backendRef port not a port of the service",
        route(f"  - backendRefs: [{{service: {SVC}, port: 80}}]  # <-\n"),
        "routes[0].rules[0].backendRefs[0].port",
        f"service '{SVC}' has no port 80 (its ports: 9080)",
    ),
    Case(
        "backendRef weight too large",
        route(f"  - backendRefs: {backend(', weight: 1000001')}  # <-\n"),
        "routes[0].rules[0].backendRefs[0].weight",
        "weight 1000001 is out of range (0-1000000)",
    ),
    Case(
        "subset selects no workload",
        route(f"  - backendRefs: {backend(', subset: {version: v3}')}  # <-\n"),
        "routes[0].rules[0].backendRefs[0].subset",
        f"subset {{version: v3}} selects no workload of service '{SVC}' (its workloads have "
        "version: v1, v2)",
    ),
    Case(
        "subset of a service without workloads",
        route(
            "  - backendRefs: [{service: bookinfo/ratings.bookinfo.svc.cluster.local, port: 9080,\n"
            "                   subset: {version: v1}}]  # <-\n"
        ),
        "routes[0].rules[0].backendRefs[0].subset",
        "(it has no workloads)",
    ),
    Case(
        "subset label value invalid",
        route(f"  - backendRefs: {backend(', subset: {version: a b}')}  # <-\n"),
        'routes[0].rules[0].backendRefs[0].subset["version"]',
        "'a b' may contain only letters, digits",
    ),
    # --- timeouts and retry
    Case(
        "timeout not a duration",
        route(f"  - backendRefs: {backend()}\n    timeouts: {{request: 2x}}  # <-\n"),
        "routes[0].rules[0].timeouts.request",
        "'2x' is not a duration (e.g. 250ms, 2s, 1.5s, 1m, 1h, or a number of seconds)",
    ),
    Case(
        "negative timeout",
        route(f"  - backendRefs: {backend()}\n    timeouts: {{request: -1}}  # <-\n"),
        "routes[0].rules[0].timeouts.request",
        "duration -1 is out of range",
    ),
    Case(
        "backendRequest longer than request",
        with_backend("    timeouts: {request: 1s, backendRequest: 2s}  # <-\n"),
        "routes[0].rules[0].timeouts.backendRequest",
        "backendRequest (2s) is longer than request (1s)",
    ),
    Case(
        "retry attempts out of range",
        route(f"  - backendRefs: {backend()}\n    retry: {{attempts: 101}}  # <-\n"),
        "routes[0].rules[0].retry.attempts",
        "attempts 101 is out of range (0-100)",
    ),
    Case(
        "retryOn unknown condition",
        route(f"  - backendRefs: {backend()}\n    retry: {{retryOn: [5xx, 4xx]}}  # <-\n"),
        "routes[0].rules[0].retry.retryOn[1]",
        "'4xx' is not a valid retry condition",
    ),
    Case(
        "retry code out of range",
        route(f"  - backendRefs: {backend()}\n    retry: {{codes: [99]}}  # <-\n"),
        "routes[0].rules[0].retry.codes[0]",
        "status code 99 is out of range (100-599)",
    ),
    Case(
        "retry backoff zero",
        route(f"  - backendRefs: {backend()}\n    retry: {{backoff: 0s}}  # <-\n"),
        "routes[0].rules[0].retry.backoff",
        "duration 0s must be more than 0",
    ),
    Case(
        "per-try timeout set twice",
        route(
            f"  - backendRefs: {backend()}\n    timeouts: {{backendRequest: 1s}}\n"
            "    retry: {perTryTimeout: 1s}  # <-\n"
        ),
        "routes[0].rules[0].retry.perTryTimeout",
        "set the per-try timeout once: timeouts.backendRequest (Gateway API) or "
        "retry.perTryTimeout (Istio)",
    ),
    Case(
        "perTryTimeout longer than the request timeout",
        route(
            f"  - backendRefs: {backend()}\n    timeouts: {{request: 1s}}\n"
            "    retry: {perTryTimeout: 1.5s}  # <-\n"
        ),
        "routes[0].rules[0].retry.perTryTimeout",
        "perTryTimeout (1.5s) is longer than timeouts.request (1s)",
    ),
    # --- trafficPolicies
    Case(
        "trafficPolicy for an unknown service",
        traffic("", service="bookinfo/review.bookinfo.svc.cluster.local  # <-"),
        "trafficPolicies[0].service",
        f"(did you mean '{SVC}'?)",
    ),
    Case(
        "two trafficPolicies for one service",
        traffic("") + f"- {{name: u, namespace: bookinfo, service: {SVC}}}  # <-\n",
        "trafficPolicies[1].service",
        f"service '{SVC}' already has trafficPolicy 'bookinfo/t' (trafficPolicies[0]); "
        "'bookinfo/u' is a second one: merge them",
    ),
    Case(
        "duplicate trafficPolicy",
        traffic("") + "- {name: t, namespace: bookinfo,  # <-\n"
        "   service: bookinfo/ratings.bookinfo.svc.cluster.local}\n",
        "trafficPolicies[1]",
        "duplicate trafficPolicy 'bookinfo/t' (see trafficPolicies[0])",
    ),
    Case(
        "maxConnections zero",
        traffic("  connectionPool: {tcp: {maxConnections: 0}}  # <-\n"),
        "trafficPolicies[0].connectionPool.tcp.maxConnections",
        "limit 0 is out of range (1-4294967295)",
    ),
    Case(
        "http1MaxPendingRequests negative",
        traffic("  connectionPool: {http: {http1MaxPendingRequests: -1}}  # <-\n"),
        "trafficPolicies[0].connectionPool.http.http1MaxPendingRequests",
        "limit -1 is out of range",
    ),
    Case(
        "http2MaxRequests not a number",
        traffic("  connectionPool: {http: {http2MaxRequests: many}}  # <-\n"),
        "trafficPolicies[0].connectionPool.http.http2MaxRequests",
        "expected an integer, got string 'many'",
    ),
    Case(
        "maxRequestsPerConnection too large",
        traffic("  connectionPool: {http: {maxRequestsPerConnection: 4294967296}}  # <-\n"),
        "trafficPolicies[0].connectionPool.http.maxRequestsPerConnection",
        "out of range (0-4294967295)",
    ),
    Case(
        "maxRetries a float",
        traffic("  connectionPool: {http: {maxRetries: 1.5}}  # <-\n"),
        "trafficPolicies[0].connectionPool.http.maxRetries",
        "expected an integer, got number 1.5",
    ),
    Case(
        "connectionPool key typo",
        traffic("  connectionPool: {tcp: {maxConnection: 1}}  # <-\n"),
        "trafficPolicies[0].connectionPool.tcp.maxConnection",
        "did you mean 'maxConnections'?",
    ),
    Case(
        "consecutive5xxErrors not a number",
        traffic("  outlierDetection: {consecutive5xxErrors: x}  # <-\n"),
        "trafficPolicies[0].outlierDetection.consecutive5xxErrors",
        "expected an integer, got string 'x'",
    ),
    Case(
        "consecutiveGatewayErrors negative",
        traffic("  outlierDetection: {consecutiveGatewayErrors: -1}  # <-\n"),
        "trafficPolicies[0].outlierDetection.consecutiveGatewayErrors",
        "count -1 is out of range",
    ),
    Case(
        "outlier interval zero",
        traffic("  outlierDetection: {interval: 0s}  # <-\n"),
        "trafficPolicies[0].outlierDetection.interval",
        "duration 0s must be more than 0",
    ),
    Case(
        "baseEjectionTime not a duration",
        traffic("  outlierDetection: {baseEjectionTime: soon}  # <-\n"),
        "trafficPolicies[0].outlierDetection.baseEjectionTime",
        "'soon' is not a duration",
    ),
    Case(
        "maxEjectionPercent over 100",
        traffic("  outlierDetection: {maxEjectionPercent: 101}  # <-\n"),
        "trafficPolicies[0].outlierDetection.maxEjectionPercent",
        "percentage 101 is out of range (0-100)",
    ),
    Case(
        "minHealthPercent negative",
        traffic("  outlierDetection: {minHealthPercent: -5}  # <-\n"),
        "trafficPolicies[0].outlierDetection.minHealthPercent",
        "percentage -5 is out of range (0-100)",
    ),
    Case(
        "load balancer unknown",
        traffic("  loadBalancer: {simple: LEAST_CONN}  # <-\n"),
        "trafficPolicies[0].loadBalancer.simple",
        "'LEAST_CONN' is not a valid load balancer ('LEAST_REQUEST', 'ROUND_ROBIN', 'RANDOM')",
    ),
    # --- policies: targetRefs and HTTP fields
    Case(
        "targetRef kind unknown",
        policy("  targetRefs: [{kind: Pod, name: reviews}]  # <-\n", head="rules: []"),
        "policies[0].targetRefs[0].kind",
        "'Pod' is not a valid targetRef kind ('Service', 'Gateway')",
    ),
    Case(
        "targetRef Gateway unknown, with did-you-mean",
        policy("  targetRefs: [{kind: Gateway, name: waypont}]  # <-\n", head="rules: []"),
        "policies[0].targetRefs[0].name",
        "no waypoint 'waypont' in namespace 'bookinfo' (kind Gateway names an entry of "
        "'waypoints:' in the policy's namespace) (did you mean 'waypoint'?)",
    ),
    Case(
        "targetRef Service unknown, with did-you-mean",
        policy("  targetRefs: [{kind: Service, name: rating}]  # <-\n", head="rules: []"),
        "policies[0].targetRefs[0].name",
        "no service 'rating' in namespace 'bookinfo' (kind Service names a service of the "
        "policy's namespace) (did you mean 'ratings'?)",
    ),
    Case(
        "targetRefs with a selector",
        policy(
            "  targetRefs: [{kind: Service, name: reviews}]\n  selector: {app: reviews}  # <-\n",
            head="rules: []",
        ),
        "policies[0].selector",
        "'selector' cannot be used with targetRefs",
    ),
    Case(
        "targetRefs with scope Global",
        policy("  targetRefs: [{kind: Service, name: reviews}]\n", head="scope: Global  # <-"),
        "policies[0].scope",
        "scope Global does not apply to a policy with targetRefs",
    ),
    Case(
        "no scope and no targetRefs",
        "policies:\n- {name: p, namespace: bookinfo, action: Allow}  # <-\n",
        "policies[0]",
        "missing required key 'scope'",
    ),
    Case(
        "methods in lower case",
        policy("  rules: [[[{methods: [get]}]]]  # <-\n"),
        "policies[0].rules[0][0][0].methods[0]",
        "'get' is not an HTTP method",
    ),
    Case(
        "path without a leading slash",
        policy("  rules: [[[{paths: [api]}]]]  # <-\n"),
        "policies[0].rules[0][0][0].paths[0]",
        "'api' must start with '/' (or '*' for a suffix match)",
    ),
    Case(
        "notPaths: {**} not last",
        policy("  rules: [[[{notPaths: ['/a/{**}/b']}]]]  # <-\n"),
        "policies[0].rules[0][0][0].notPaths[0]",
        "'{**}' is allowed only as the last segment",
    ),
    Case(
        "path template operator inside a segment",
        policy("  rules: [[[{paths: ['/a/x{*}']}]]]  # <-\n"),
        "policies[0].rules[0][0][0].paths[0]",
        "must each be a whole segment",
    ),
    Case(
        "path '*' in the middle",
        policy("  rules: [[[{paths: ['/a*b']}]]]  # <-\n"),
        "policies[0].rules[0][0][0].paths[0]",
        "'*' is allowed only alone, at the start or at the end",
    ),
    Case(
        "hosts '*' in the middle",
        policy("  rules: [[[{hosts: ['a*.example']}]]]  # <-\n"),
        "policies[0].rules[0][0][0].hosts[0]",
        "'*' is allowed only alone, at the start or at the end",
    ),
    Case(
        "notHosts with a path",
        policy("  rules: [[[{notHosts: ['a.example/x']}]]]  # <-\n"),
        "policies[0].rules[0][0][0].notHosts[0]",
        "must not contain '/'",
    ),
    Case(
        "notMethods not a list",
        policy("  rules: [[[{notMethods: GET}]]]  # <-\n"),
        "policies[0].rules[0][0][0].notMethods",
        "expected a list, got string 'GET'",
    ),
    Case(
        "requestHeaders with no values",
        policy("  rules: [[[{requestHeaders: {x-user: []}}]]]  # <-\n"),
        'policies[0].rules[0][0][0].requestHeaders["x-user"]',
        "list at least one value ('*': the header is present)",
    ),
    Case(
        "requestHeaders name invalid",
        policy("  rules: [[[{requestHeaders: {'x user': [a]}}]]]  # <-\n"),
        'policies[0].rules[0][0][0].requestHeaders["x user"]',
        "'x user' is not a valid header name",
    ),
    Case(
        "notRequestHeaders value a number",
        policy("  rules: [[[{notRequestHeaders: {x-debug: [1]}}]]]  # <-\n"),
        'policies[0].rules[0][0][0].notRequestHeaders["x-debug"][0]',
        'expected a string, got integer 1 (quote it: "1")',
    ),
]


def _expected_line(fragment: str) -> int:
    marked = [n for n, line in enumerate(fragment.splitlines()) if "# <-" in line]
    assert len(marked) == 1, "each case marks exactly one line"
    return len(BASE.splitlines()) + marked[0] + 1


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_l7_error(case: Case) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(BASE + case.fragment, "l7.yaml")
    found = [(i.line, i.path, i.message) for i in info.value.issues]
    line = _expected_line(case.fragment)
    assert any(ln == line and p == case.path and case.message in m for ln, p, m in found), (
        f"expected line {line} {case.path}: ...{case.message}...; got {found}"
    )
    assert all(i.file == "l7.yaml" and i.column is not None for i in info.value.issues)


def test_every_case_id_is_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


VALID = route(
    "  - matches: [{path: {value: /a}}]\n"
    f"    backendRefs: {backend(', subset: {version: v1}')}\n"
    "    timeouts: {request: 1m30s, backendRequest: 250ms}\n"
    "    retry: {attempts: 0, backoff: 0.5}\n"
    "  - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 308}}]\n"
)


def test_valid_routes_load_with_parsed_durations_and_defaults() -> None:
    (r,) = load_config_text(BASE + VALID).routes
    first, second = r.rules
    assert first.timeouts is not None
    assert (first.timeouts.request, first.timeouts.backend_request) == (90.0, 0.25)
    assert first.retry is not None
    assert (first.retry.attempts, first.retry.backoff) == (0, 0.5)
    assert first.backend_refs[0].weight == 1
    assert first.backend_refs[0].subset == (("version", "v1"),)
    assert second.redirect is not None
    assert second.redirect.status_code == 308
    assert r.parent_refs[0].port is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("250ms", 0.25, id="milliseconds"),
        pytest.param("2s", 2.0, id="seconds"),
        pytest.param("1.5s", 1.5, id="fractional-seconds"),
        pytest.param("1m", 60.0, id="minutes"),
        pytest.param("1h", 3600.0, id="hours"),
        pytest.param("1m30s", 90.0, id="compound"),
        pytest.param("3", 3.0, id="integer-seconds"),
        pytest.param("0.05", 0.05, id="number-seconds"),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    config = load_config_text(BASE + traffic(f"  outlierDetection: {{interval: {text}}}\n"))
    (tp,) = config.traffic_policies
    assert tp.outlier_detection is not None
    assert tp.outlier_detection.interval == pytest.approx(seconds)


def test_zero_timeout_means_none_and_is_accepted() -> None:
    text = BASE + route(f"  - backendRefs: {backend()}\n    timeouts: {{request: 0s}}\n")
    (r,) = load_config_text(text).routes
    assert r.rules[0].timeouts is not None
    assert r.rules[0].timeouts.request == 0.0


def test_http_fields_without_target_refs_warn_with_policy_and_fields() -> None:
    text = BASE + policy(
        "  rules: [[[{namespaces: [a], methods: [GET]}, {paths: [/x], notHosts: [h]}]]]\n"
    )
    warnings = validate_config_text(text, "l7.yaml").warnings
    (warning,) = [w for w in warnings if w.path == "policies[0]"]
    assert warning.line == len(BASE.splitlines()) + 2
    assert "policy bookinfo/p has HTTP fields that a node agent cannot check" in warning.message
    assert "(methods, paths, notHosts)" in warning.message
    assert "an ALLOW match with these fields never matches" in warning.message
    assert "add targetRefs" in warning.message


def test_target_ref_policies_load_without_warnings() -> None:
    # Enforced by the waypoint they name; HTTP fields are what a waypoint checks.
    text = BASE + textwrap.dedent("""\
        policies:
        - name: p
          namespace: bookinfo
          action: Deny
          targetRefs: [{kind: Gateway, name: waypoint}]
          rules: [[[{paths: [/x]}]]]
        """)
    warnings = validate_config_text(text).warnings
    assert [w for w in warnings if w.path.startswith("policies")] == []


def test_scope_defaults_to_namespace_with_target_refs() -> None:
    text = BASE + policy("  targetRefs: [{kind: Service, name: reviews}]\n", head="rules: []")
    (p,) = load_config_text(text).policies
    assert p.scope.value == "Namespace"
    assert [(r.kind.value, r.name) for r in p.target_refs] == [("Service", "reviews")]
