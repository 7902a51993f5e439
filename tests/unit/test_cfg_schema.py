"""The schema declared once: JSON Schema shipped and current, docs tables = models, locate()."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cli.main import cli
from ztunnel_cfg import model
from ztunnel_cfg.dump import config_json_schema, config_json_schema_text, config_to_document
from ztunnel_cfg.loader import Key, locate, validate_config_text
from ztunnel_cfg.model import Config, Doc, Workload

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "docs" / "config.schema.json"
REFERENCE = ROOT / "docs" / "config-reference.md"


def test_shipped_schema_is_up_to_date() -> None:
    assert SCHEMA_FILE.read_text() == config_json_schema_text(), (
        "regenerate: nodeproxy config schema > docs/config.schema.json"
    )


def test_schema_command_prints_the_schema() -> None:
    result = CliRunner().invoke(cli, ["config", "schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == config_json_schema()


def test_schema_requires_workloads_and_forbids_unknown_keys() -> None:
    schema = config_json_schema()
    assert schema["required"] == ["workloads"]
    assert schema["additionalProperties"] is False
    assert all(
        d.get("additionalProperties") is False
        for d in schema["$defs"].values()
        if d.get("type") == "object" and "properties" in d
    )


# --- docs/config-reference.md key tables vs the models --------------------------------------

# Section heading -> the document class its first key table describes.
SECTIONS: dict[str, type[Doc]] = {
    "Top level": Config,
    "workloads": Workload,
    "WaypointRef": model.WaypointRef,
    "services": model.Service,
    "policies": model.Policy,
    "peerAuthentication": model.PeerAuthentication,
    "waypoints": model.WaypointConfig,
    "routes": model.HttpRoute,
    "trafficPolicies": model.TrafficPolicyConfig,
}


def _aliases(cls: type[Doc]) -> set[str]:
    fields = cls.__pydantic_fields__  # type: ignore[attr-defined]
    return {info.alias or name for name, info in fields.items()}


def _documented_keys() -> dict[str, set[str]]:
    # The first table under each heading; later ones (match fields) are checked separately.
    out: dict[str, set[str]] = {}
    section = None
    for line in REFERENCE.read_text().splitlines():
        heading = re.match(r"^#{2,3} (.+)$", line)
        if heading:
            section = heading.group(1).strip()
            continue
        if section in out and not line.startswith("|"):
            section = None  # that table has ended
        if section in SECTIONS and line.startswith("| `"):
            cell = line.split("|")[1]
            keys = out.setdefault(section, set())
            for key in re.findall(r"`([A-Za-z]+)", cell):
                keys.add(key)
    return out


def test_reference_documents_exactly_the_model_keys() -> None:
    documented = _documented_keys()
    assert set(documented) == set(SECTIONS)
    for section, cls in SECTIONS.items():
        keys = documented[section]
        if cls is model.HttpRoute:  # rules[] is documented by its nested keys
            keys = {k for k in keys if k != "rules"} | {"rules"}
        assert keys == _aliases(cls), f"{section}: docs {sorted(keys)} vs model"


def test_match_fields_documented() -> None:
    text = REFERENCE.read_text()
    for alias in _aliases(model.Match):
        assert f"`{alias}`" in text, alias


# --- locate: pydantic locations -> YAML nodes --------------------------------------------------

DOC = textwrap.dedent("""\
    workloads:
    - name: a
      services: {"ns/h": {80: 8080}}
    policies:
    - rules: [[[{principals: [x]}]]]
    """)


@pytest.mark.parametrize(
    ("loc", "line", "column", "path", "rest"),
    [
        (("workloads",), 2, 1, "workloads", 0),
        (("workloads", 0), 2, 3, "workloads[0]", 0),
        (("workloads", 0, "name"), 2, 9, "workloads[0].name", 0),
        (("workloads", 0, "services", 0), 3, 22, 'workloads[0].services["ns/h"]', 0),
        (("workloads", 0, "services", 0, 0), 3, 14, 'workloads[0].services["ns/h"]', 0),
        (("workloads", 0, "services", 0, 1, 0, 1), 3, 27, 'workloads[0].services["ns/h"][80]', 0),
        (
            ("workloads", 0, "services", Key("ns/h"), 1, Key(80)),
            3,
            27,
            'workloads[0].services["ns/h"][80]',
            0,
        ),
        (
            ("policies", 0, "rules", 0, 0, 0, "principals", 0),
            5,
            27,
            "policies[0].rules[0][0][0].principals[0]",
            0,
        ),
        (("workloads", 0, "node"), 2, 3, "workloads[0]", 1),
        (("workloads", 5), 2, 1, "workloads", 1),  # no such item: stops at the list
    ],
)
def test_locate(loc: tuple[object, ...], line: int, column: int, path: str, rest: int) -> None:
    from ztunnel_cfg.loader import _Doc, _to_data

    root = yaml.compose(DOC, Loader=yaml.SafeLoader)
    assert root is not None
    doc = _Doc("t.yaml", root)
    _to_data(doc, root, "", {})
    where = locate(doc.entries, root, loc)  # type: ignore[arg-type]
    assert (where.node.start_mark.line + 1, where.node.start_mark.column + 1) == (line, column)
    assert (where.path, where.rest) == (path, rest)


# --- models: frozen, hashable, dump round trip ---------------------------------------------


def test_models_are_frozen_slotted_and_hashable() -> None:
    config = validate_config_text(
        "workloads: [{name: a, namespace: default, workloadIps: [10.0.0.1], node: n}]\n"
    ).config
    (w,) = config.workloads
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.name = "b"  # type: ignore[misc]
    assert not hasattr(w, "__dict__")
    assert hash(w) == hash(dataclasses.replace(w))
    assert w == dataclasses.replace(w)
    assert w.workload_ips == (ipaddress.ip_address("10.0.0.1"),)
    assert w.uid == "Kubernetes//v1/Pod/default/a"


def test_dump_round_trips_every_section() -> None:
    text = (ROOT / "examples" / "cluster.yaml").read_text() + textwrap.dedent("""\
        routes:
        - name: r
          namespace: default
          parentRefs: [{service: default/echo.default.svc.cluster.local, port: 80}]
          rules:
          - matches: [{path: {value: /a}, headers: [{name: X-A, value: b}]}]
            filters:
            - type: URLRewrite
              urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}
            - type: RequestHeaderModifier
              requestHeaderModifier: {set: [{name: x-a, value: c}], remove: [x-b]}
            backendRefs: [{service: default/echo.default.svc.cluster.local, port: 80}]
            retry: {attempts: 2, perTryTimeout: 1, retryOn: [5xx], codes: [503]}
            timeouts: {request: 2s}
          - matches: [{path: {type: Exact, value: /old}}]
            filters:
            - type: RequestRedirect
              requestRedirect: {scheme: https, statusCode: 301}
        trafficPolicies:
        - name: echo
          namespace: default
          service: default/echo.default.svc.cluster.local
          connectionPool: {tcp: {maxConnections: 10}, http: {http1MaxPendingRequests: 1}}
          outlierDetection: {consecutive5xxErrors: 3, interval: 1m}
          loadBalancer: {simple: ROUND_ROBIN}
        """)
    config = validate_config_text(text).config
    assert config.waypoints
    assert config.routes
    assert config.traffic_policies
    _assert_round_trip(config)


def test_dump_round_trips_the_l7_example() -> None:
    config = validate_config_text((ROOT / "examples" / "l7.yaml").read_text()).config
    assert any(p.target_refs for p in config.policies)
    assert any(m.paths for p in config.policies for r in p.rules for c in r for m in c)
    assert any(f.request_redirect for r in config.routes for rule in r.rules for f in rule.filters)
    _assert_round_trip(config)


def _assert_round_trip(config: Config) -> None:
    again = yaml.safe_dump(config_to_document(config), sort_keys=False)
    assert validate_config_text(again).config == config
    as_json = json.dumps(config_to_document(config))
    assert validate_config_text(as_json).config == config


# --- waypoint keys are implemented: no "no effect" warnings (issue 12) ---------------------


@pytest.mark.parametrize("key", ["waypoints", "routes", "trafficPolicies"])
def test_waypoint_keys_load_without_warnings(key: str) -> None:
    body = {
        "waypoints": "waypoints:\n- {name: w, namespace: a, service: a/s.a.svc.cluster.local}\n",
        "routes": "routes:\n- {name: r, namespace: a,\n"
        "   parentRefs: [{service: a/s.a.svc.cluster.local}],\n"
        "   rules: [{backendRefs: [{service: a/s.a.svc.cluster.local, port: 80}]}]}\n",
        "trafficPolicies": "trafficPolicies:\n"
        "- {name: t, namespace: a, service: a/s.a.svc.cluster.local}\n",
    }[key]
    text = "workloads: []\nservices: [{name: s, namespace: a, ports: {80: 80}}]\n" + body
    assert validate_config_text(text, "m.yaml").warnings == ()
