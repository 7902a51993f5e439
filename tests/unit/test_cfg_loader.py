"""The strict loader: every error category, with its position; fuzzing; round trip."""

from __future__ import annotations

import ipaddress
import re
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztunnel_cfg import (
    ConfigError,
    ConfigIssue,
    MtlsMode,
    Protocol,
    Scope,
    load_config_file,
    load_config_text,
)
from ztunnel_cfg.dump import config_to_document
from ztunnel_cfg.model import Config, Doc


def _all_docs(cls: type) -> list[type]:
    subs: list[type] = cls.__subclasses__()
    return [sub for c in subs for sub in (c, *_all_docs(c))]


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

BASE = """\
services:
- name: echo
  namespace: default
  vips: ["/10.96.0.10"]
  ports: {80: 8080}
workloads:
- name: echo-0
  namespace: default
  workloadIps: ["10.10.1.3"]
  node: node1
  services: {"default/echo.default.svc.cluster.local": {80: 8080}}
"""


def issues_of(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config_text(textwrap.dedent(text), "t.yaml")
    return [(i.line, i.path, i.message) for i in info.value.issues]


def test_example_cluster_loads_with_expected_shape() -> None:
    config = load_config_file(EXAMPLES / "cluster.yaml")
    namespaces = {w.namespace for w in config.workloads}
    assert len(config.workloads) >= 5
    assert {"default", "shop", "legacy"} <= namespaces
    assert {w.node for w in config.workloads} == {"node1", "node2"}
    assert any(w.protocol is Protocol.TCP for w in config.workloads)
    assert sum(1 for s in config.services if s.vips) >= 2
    assert len(config.policies) >= 3
    assert any(p.action.value == "Deny" for p in config.policies)
    for w in config.workloads:
        net = "10.10.1.0/24" if w.node == "node1" else "10.10.2.0/24"
        assert all(ip in ipaddress.ip_network(net) for ip in w.workload_ips)
        assert w.netns == f"/var/run/netns/{w.name}"


def test_broken_example_reports_every_marked_line() -> None:
    path = EXAMPLES / "broken.yaml"
    expected = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if "# expect: " in line and not line.startswith("#"):
            expected.append((number, line.split("# expect: ", 1)[1].strip()))
    assert len(expected) >= 20
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    issues = info.value.issues
    for number, text in expected:
        hits = [i for i in issues if i.line == number and text in i.message]
        assert hits, f"line {number}: no issue containing {text!r}; got {[str(i) for i in issues]}"
    # Nothing reported that the file does not announce.
    assert len(issues) == len(expected)
    assert all(i.file == str(path) and i.column is not None for i in issues)


def test_issue_has_file_line_column_and_key_path() -> None:
    text = BASE.replace('["10.10.1.3"]', '["10.10.1.3", "10.0.0.300"]')
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "cluster.yaml")
    (issue,) = info.value.issues
    assert (issue.file, issue.line, issue.column) == ("cluster.yaml", 9, 30)
    assert issue.path == "workloads[0].workloadIps[1]"
    assert issue.message == "'10.0.0.300' is not an IP address"
    assert str(issue) == (
        "cluster.yaml:9:30: workloads[0].workloadIps[1]: '10.0.0.300' is not an IP address"
    )


@pytest.mark.parametrize(
    ("text", "line", "path", "message"),
    [
        pytest.param(
            "workload: []\n", 1, "workload", "did you mean 'workloads'?", id="unknown-top"
        ),
        pytest.param("[1, 2]\n", 1, "", "the document must be a mapping", id="top-not-mapping"),
        pytest.param(
            "workloads: {a: 1}\n",
            1,
            "workloads",
            "expected a list, got a mapping",
            id="section-not-list",
        ),
        pytest.param("trustDomain: Bad_TD\n", 1, "trustDomain", "trust domain", id="trust-domain"),
        pytest.param("a: 1\na: 2\n", 2, "a", "duplicate key 'a'", id="duplicate-key"),
        pytest.param(
            "services:\n- name: x\n  namespace: default\n  ports: {80: 'http'}\n",
            4,
            "services[0].ports[80]",
            "expected an integer, got string 'http'",
            id="wrong-type",
        ),
        pytest.param(
            "services:\n- {name: x, namespace: default, ports: {80: 8080, 80: 81}}\n",
            2,
            "services[0].ports[80]",
            "duplicate key 80",
            id="duplicate-port",
        ),
        pytest.param(
            "services:\n- {name: x, namespace: default, vips: [1.2.3.4/8]}\n",
            2,
            "services[0].vips[0]",
            "is not a VIP",
            id="bad-vip",
        ),
        pytest.param(
            "services:\n- {name: x, namespace: default, ports: {80: -1}}\n",
            2,
            "services[0].ports[80]",
            "port -1 is out of range",
            id="negative-port",
        ),
        pytest.param(
            "services:\n- {name: x, namespace: default}\n- {name: x, namespace: default}\n",
            3,
            "services[1]",
            "duplicate service 'default/x.default.svc.cluster.local'",
            id="duplicate-service",
        ),
        pytest.param(
            "policies:\n- {name: p, namespace: default, scope: Global, action: Allow,\n"
            "   rules: [[[{principals: ['spiffe://cluster.local/ns/a']}]]]}\n",
            3,
            "policies[0].rules[0][0][0].principals[0]",
            "is not of the form",
            id="malformed-principal",
        ),
        pytest.param(
            "policies:\n- {name: p, namespace: default, scope: Global, action: Allow,\n"
            "   rules: [[[{principals: ['ns/a*']}]]]}\n",
            3,
            "policies[0].rules[0][0][0].principals[0]",
            "must start with 'spiffe://'",
            id="principal-prefix-not-spiffe",
        ),
        pytest.param(
            "policies:\n- {name: p, namespace: default, scope: Global, action: Allow,\n"
            "   rules: [[[{destinationIps: ['10.0.0.0/33']}]]]}\n",
            3,
            "policies[0].rules[0][0][0].destinationIps[0]",
            "is not an IP address or CIDR",
            id="bad-cidr",
        ),
        pytest.param(
            "policies:\n- {name: p, namespace: default, scope: Global, action: Allow,\n"
            "   rules: [[[{namespace: [a]}]]]}\n",
            3,
            "policies[0].rules[0][0][0].namespace",
            "did you mean 'namespaces'?",
            id="match-typo",
        ),
        pytest.param(
            "policies:\n- {name: p, namespace: default, scope: Namespace, action: Allow,\n"
            "   selector: {app: x}}\n",
            3,
            "policies[0].selector",
            "only valid with scope WorkloadSelector",
            id="selector-wrong-scope",
        ),
        pytest.param(
            "policies:\n- {name: p, namespace: default, scope: WorkloadSelector,\n"
            "   action: Allow, workloadUids: [nope]}\n",
            3,
            "policies[0].workloadUids[0]",
            "'nope' is not a known workload",
            id="unknown-uid",
        ),
        pytest.param(
            "policies:\n- {name: p, namespace: default, action: Allow}\n",
            2,
            "policies[0]",
            "missing required key 'scope'",
            id="missing-key",
        ),
        pytest.param(
            "peerAuthentication:\n- {mode: STRICT}\n- {mode: PERMISSIVE}\n",
            3,
            "peerAuthentication[1]",
            "the whole mesh",
            id="duplicate-peer-auth",
        ),
        pytest.param(
            "peerAuthentication:\n- {mode: STRICT, selector: {app: a}}\n",
            2,
            "peerAuthentication[0]",
            "needs a 'namespace'",
            id="peer-auth-selector-ns",
        ),
        pytest.param(
            "waypoints:\n- {name: w, namespace: a, service: a/w.a.svc.cluster.local}\n",
            2,
            "waypoints[0].service",
            "is not a known service",
            id="unknown-waypoint",
        ),
        pytest.param(
            "routes:\n- {name: r, namespace: a, parentRefs: [{service: a/x}],\n"
            "   rules: [{backendRefs: [{service: a/x, port: 80}]}]}\n",
            2,
            "routes[0].parentRefs[0].service",
            "parentRef service 'a/x' is not a known service",
            id="route-parent",
        ),
        pytest.param(
            "trustDomain: !!binary 'not base64 %%%'\n",
            1,
            "trustDomain",
            "cannot read",
            id="bad-tagged-scalar",
        ),
        pytest.param(
            "trustDomain: !custom x\n", 1, "trustDomain", "cannot read value", id="unknown-tag"
        ),
    ],
)
def test_error_categories(text: str, line: int, path: str, message: str) -> None:
    found = issues_of(text)
    assert any(ln == line and p == path and message in msg for ln, p, msg in found), (
        f"expected line {line} {path}: ...{message}...; got {found}"
    )


def test_workload_cross_references() -> None:
    text = BASE + textwrap.dedent("""\
    - name: other
      namespace: default
      workloadIps: ["10.10.1.3"]
      node: node1
      waypoint: {destination: "default/nope"}
      services: {"default/echo.default.svc.cluster.local": {81: 8080}}
    """)
    found = issues_of(text)
    messages = [m for _, _, m in found]
    assert any("IP 10.10.1.3 is already used by workloads[0]" in m for m in messages)
    assert any("waypoint 'default/nope' is not a known service" in m for m in messages)
    assert any(
        "service 'default/echo.default.svc.cluster.local' has no port 81" in m for m in messages
    )
    assert len(found) == 3


def test_vip_conflict_only_on_same_port() -> None:
    text = textwrap.dedent("""\
    workloads: []
    services:
    - {name: a, namespace: default, vips: ["/10.96.0.10"], ports: {80: 8080}}
    - {name: b, namespace: default, vips: ["net1/10.96.0.10"], ports: {443: 8443}}
    """)
    config = load_config_text(text)
    assert [s.vips for s in config.services] == [(ipaddress.ip_address("10.96.0.10"),)] * 2
    found = issues_of(text.replace("443: 8443", "80: 8443"))
    assert found == [
        (
            4,
            "services[1].vips[0]",
            "VIP 10.96.0.10 port 80 is already used by service "
            "'default/a.default.svc.cluster.local'",
        )
    ]


def test_all_errors_collected_in_one_pass() -> None:
    text = textwrap.dedent("""\
    workloads:
    - {name: a, namespace: default, workloadIps: [x], node: n1}
    - {name: b, namespace: default, workloadIps: [y], node: n1}
    - {name: c, namespace: default, workloadIps: [z], node: n1, color: red}
    """)
    found = issues_of(text)
    assert [(ln, p) for ln, p, _ in found] == [
        (2, "workloads[0].workloadIps[0]"),
        (3, "workloads[1].workloadIps[0]"),
        (4, "workloads[2].workloadIps[0]"),
        (4, "workloads[2].color"),
    ]


def test_defaults_and_optional_fields() -> None:
    config = load_config_text(BASE)
    (w,) = config.workloads
    assert w.uid == "Kubernetes//v1/Pod/default/echo-0"
    assert w.service_account == "default"
    assert w.protocol is Protocol.HBONE
    assert w.canonical_name == "echo-0"
    assert w.healthy
    assert w.trust_domain == "cluster.local"
    assert str(w.identity) == "spiffe://cluster.local/ns/default/sa/default"
    (s,) = config.services
    assert s.hostname == "echo.default.svc.cluster.local"
    assert s.key == f"default/{s.hostname}"


def test_policy_shapes_and_wildcards() -> None:
    text = textwrap.dedent("""\
    workloads: []
    policies:
    - name: p
      namespace: default
      scope: Global
      action: Deny
      rules:
      - - - principals: ["*", "spiffe://cluster.local/ns/a/*", "*/sa/client"]
            notNamespaces: ["kube-*", "*-system"]
            sourceIps: ["10.0.0.0/8", "fd00::/8", "192.168.1.1"]
            destinationPorts: [80, "443"]
    peerAuthentication:
    - {namespace: default, mode: STRICT}
    - {namespace: default, selector: {app: legacy}, mode: PERMISSIVE}
    """)
    config = load_config_text(text)
    (policy,) = config.policies
    (match,) = policy.rules[0][0]
    assert policy.scope is Scope.GLOBAL
    assert [str(m) for m in match.principals] == [
        "*",
        "spiffe://cluster.local/ns/a/*",
        "*/sa/client",
    ]
    assert [str(n) for n in match.source_ips] == ["10.0.0.0/8", "fd00::/8", "192.168.1.1/32"]
    assert match.destination_ports == (80, 443)
    assert [pa.mode for pa in config.peer_authentications] == [MtlsMode.STRICT, MtlsMode.PERMISSIVE]


def test_routes_section() -> None:
    text = BASE + textwrap.dedent("""\
    routes:
    - name: split
      namespace: default
      parentRefs: [{service: default/echo.default.svc.cluster.local, port: 80}]
      rules:
      - matches: [{path: {value: /api}, method: GET, headers: [{name: X-User, value: alice}]}]
        backendRefs: [{service: default/echo.default.svc.cluster.local, port: 80, weight: 90}]
        timeouts: {request: 2.5s}
        retry: {attempts: 3, perTryTimeout: 1}
    """)
    (route,) = load_config_text(text).routes
    (rule,) = route.rules
    assert rule.matches[0].headers[0].name == "x-user"
    assert rule.timeouts is not None
    assert rule.timeouts.request == 2.5
    assert rule.retry is not None
    assert rule.retry.attempts == 3
    bad = text.replace("value: /api", "value: api").replace("port: 80,", "port: 0,")
    messages = [m for _, _, m in issues_of(bad)]
    assert any("'api' must start with '/'" in m for m in messages)
    assert any("port 0 is out of range" in m for m in messages)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_file(tmp_path / "missing.yaml")
    (issue,) = info.value.issues
    assert "cannot read config file" in issue.message
    assert issue.file.endswith("missing.yaml")
    with pytest.raises(ConfigError):
        load_config_file(tmp_path)  # a directory


@pytest.mark.parametrize(
    ("data", "line"),
    [
        ("workloads: [\n", 2),
        ("a: b: c\n", 1),
        ("\tfoo: 1\n", 1),
        (b"\xff\xfe\x00garbage\xc3\x28", None),
        ("[" * 5000, None),
        ("a: &x [*x]\n", None),
        ("--- a\n--- b\n", 2),
    ],
)
def test_syntax_errors_are_config_errors(data: str | bytes, line: int | None) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(data, "junk.yaml")
    issues = info.value.issues
    assert issues
    assert all(i.file == "junk.yaml" for i in issues)
    if line is not None:
        assert issues[0].line == line


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param("", "is empty", id="empty"),
        pytest.param(" \n\t\n  \n", "is empty", id="whitespace-only"),
        pytest.param("# only a comment\n# and another\n", "is empty", id="comment-only"),
        pytest.param("---\n", "is empty", id="bare-document-marker"),
        pytest.param("~\n", "is empty", id="null-document"),
        pytest.param("{}\n", "has no top-level 'workloads' list", id="empty-mapping"),
        pytest.param(
            "services: []\npolicies: []\n", "has no top-level 'workloads' list", id="no-workloads"
        ),
        # A truncated rewrite can stop right after the key: that is not "no workloads" either.
        pytest.param("workloads:\n", "has no top-level 'workloads' list", id="workloads-null"),
    ],
)
def test_empty_or_workload_less_document_is_rejected(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    (issue,) = info.value.issues
    assert issue.file == str(path)
    assert f"config {path} {problem}" in issue.message
    assert "to remove every workload write `workloads: []`" in issue.message
    assert issue.line == 1
    assert issue.column is not None
    assert str(path) in str(info.value)


def test_missing_workloads_is_reported_with_the_other_issues() -> None:
    found = issues_of("services:\n- {name: x, namespace: default, ports: {80: -1}}\n")
    assert [(ln, p) for ln, p, _ in found] == [(1, "workloads"), (2, "services[0].ports[80]")]


def test_explicit_empty_workloads_loads_with_no_workloads() -> None:
    config = load_config_text("workloads: []\n", "t.yaml")
    assert config.workloads == ()
    assert config.services == ()
    assert load_config_text("# intentionally empty mesh\nworkloads: []\nservices: []\n") == config


def test_dump_round_trips_the_example() -> None:
    config = load_config_file(EXAMPLES / "cluster.yaml")
    text = yaml.safe_dump(config_to_document(config), sort_keys=False)
    assert load_config_text(text) == config


# --- fuzzing: nothing but ConfigError (or success), ever -------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "10.0.0.1",
            "10.0.0.300",
            "/10.96.0.1",
            "::1",
            "10.0.0.0/8",
            "HBONE",
            "TCP",
            "Allow",
            "Deny",
            "Global",
            "WorkloadSelector",
            "STRICT",
            "*",
            "spiffe://cluster.local/ns/a/sa/b",
            "default/echo.default.svc.cluster.local",
            "node1",
            "default",
            80,
            15008,
            65536,
            "PathPrefix",
            "RegularExpression",
            "RequestRedirect",
            "ReplacePrefixMatch",
            "(unclosed",
            "250ms",
            "Gateway",
            "Service",
            "/api/{*}/x",
            "/a/{**}",
        ]
    ),
)
# Every key of every document, from the models themselves.
_ALL_KEYS = sorted(
    {
        info.alias or name
        for cls in (Config, *_all_docs(Doc))
        for name, info in cls.__pydantic_fields__.items()  # type: ignore[attr-defined]
    }
)
_keys = (
    st.sampled_from(_ALL_KEYS)
    | st.text(max_size=8)
    | st.integers(0, 70000)
)
_docs = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=6),
    max_leaves=40,
)


def _only_config_errors(data: str | bytes) -> None:
    issues: tuple[ConfigIssue, ...] = ()
    try:
        load_config_text(data, "fuzz.yaml")
    except ConfigError as exc:  # anything else propagates and fails the test
        issues = exc.issues
        assert issues, "a ConfigError must carry at least one issue"
    for issue in issues:
        assert issue.file == "fuzz.yaml"
        assert issue.message


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "workloads",
                "services",
                "policies",
                "waypoints",
                "routes",
                "trafficPolicies",
                "peerAuthentication",
                "trustDomain",
            ]
        ),
        _docs,
        max_size=5,
    )
)
def test_fuzz_structured_documents(doc: dict[str, object]) -> None:
    try:
        text = yaml.safe_dump(doc)
    except (yaml.YAMLError, ValueError, OverflowError):
        return
    _only_config_errors(text)


@settings(max_examples=300, deadline=None)
@given(_docs)
def test_fuzz_any_yaml_value(doc: object) -> None:
    _only_config_errors(yaml.safe_dump(doc))


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from([*list("ab:-[]{}&*!|>'\"#%@`,? \n\t.0129/"), "\\"]), max_size=80
    )
)
def test_fuzz_yaml_ish_text(text: str) -> None:
    _only_config_errors(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_bytes(data: bytes) -> None:
    _only_config_errors(data)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_fuzz_mutated_example(data: st.DataObject) -> None:
    # Damage the real example line by line; positions must still be inside the file.
    lines = (EXAMPLES / "cluster.yaml").read_text().splitlines()
    index = data.draw(st.integers(0, len(lines) - 1))
    junk = data.draw(st.sampled_from(["", "  bogus: 1", "- x", "{", "  name: 7", "\t", "  :"]))
    lines[index] = junk
    text = "\n".join(lines)
    try:
        load_config_text(text, "m.yaml")
    except ConfigError as exc:
        for issue in exc.issues:
            assert issue.line is None or 1 <= issue.line <= len(lines) + 1


def test_no_other_exception_for_anchor_bombs() -> None:
    bomb = 'a: &a ["x","x"]\nb: &b [*a,*a]\nc: &c [*b,*b]\nworkloads: [*c, *c]\n'
    with pytest.raises(ConfigError) as info:
        load_config_text(bomb)
    assert any(re.search(r"unknown key 'a'", str(i)) for i in info.value.issues)
