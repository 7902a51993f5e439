"""deploy/kubernetes/: every document validates (offline) against the Kubernetes JSON schemas
shipped in kubernetes-validate, strict mode (unknown fields are errors), plus the properties
the agent and the waypoint depend on.  Nothing here talks to a cluster."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

from nodeproxy.waypoint.app import WaypointOptions, choose_self
from ztunnel_cfg.loader import load_config_text
from ztunnel_cfg.snapshot import Snapshot

K8S = Path(__file__).resolve().parents[2] / "deploy/kubernetes"
# A current release; kubernetes-validate picks the newest schema set not newer than this.
K8S_VERSION = "1.37"


def _docs() -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return out


def _kind(kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for _, d in _docs()
              if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


DOCS = _docs()


@pytest.mark.parametrize(("name", "doc"), DOCS,
                         ids=[f"{n}:{d['kind']}/{d['metadata']['name']}" for n, d in DOCS])
def test_schema_valid(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validator_rejects_a_bad_manifest() -> None:
    # Guards the test above: the offline schemas really are applied (typo'd field, strict).
    ds = _kind("DaemonSet")
    broken = {**ds, "spec": {**ds["spec"], "updateStrateggy": {}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted({n for n, _ in DOCS})


def test_daemonset_properties() -> None:
    spec = _kind("DaemonSet")["spec"]
    pod = spec["template"]["spec"]
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    assert pod["hostNetwork"] is True
    assert pod["hostPID"] is False
    (agent,) = pod["containers"]
    sc = agent["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == {"SYS_ADMIN", "NET_ADMIN", "NET_RAW", "BPF",
                                              "PERFMON"}
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts["/var/run/netns"]["mountPropagation"] == "HostToContainer"
    assert {"/run/nodeproxy", "/sys/fs/bpf", "/run/xtables.lock"} <= set(mounts)
    assert agent["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert {p["containerPort"] for p in agent["ports"]} == {15020, 15021}
    # The agent's arguments must be accepted by `nodeproxy run` itself.
    from cli.run_cmd import command as run

    names = {opt for p in run.params for opt in p.opts}
    for arg in agent["args"][1:]:
        assert arg.split("=", 1)[0] in names, arg
    # Every mount has a volume, and the config mount matches --config.
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in agent["volumeMounts"]} <= volumes
    assert "--config=/etc/nodeproxy/config/config.yaml" in agent["args"]


def test_ca_args_match_the_cli() -> None:
    from cli.ca_cmd import command as ca

    serve = ca.commands["serve"]
    (container,) = _kind("Deployment", "nodeproxy-ca")["spec"]["template"]["spec"]["containers"]
    names = {opt for p in serve.params for opt in p.opts}
    for arg in container["args"][2:]:
        assert arg.split("=", 1)[0] in names, arg
    svc = _kind("Service", "nodeproxy-ca")
    assert svc["spec"]["ports"][0]["port"] == 15012


def test_configmap_config_loads_with_the_real_loader() -> None:
    text = _kind("ConfigMap")["data"]["config.yaml"]
    config = load_config_text(text, "configmap.yaml")
    assert config.trust_domain == "cluster.local"


# --- the waypoint (waypoint.yaml) ------------------------------------------------------------

def _waypoint_pod() -> dict[str, Any]:
    pod: dict[str, Any] = _kind("Deployment", "waypoint")["spec"]["template"]["spec"]
    return pod


def _waypoint_container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = _waypoint_pod()["containers"]
    (container,) = containers
    return container


def _kubelet_expand(arg: str, env: dict[str, str]) -> str:
    # The kubelet's $(VAR) substitution in args, with values the pod would see.
    return re.sub(r"\$\(([A-Z_]+)\)", lambda m: env[m.group(1)], arg)


def _parse_waypoint_args(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Parse the container's arguments with the real `nodeproxy waypoint run` (types, choices,
    required options, unknown options), without running it."""
    from cli.waypoint_cmd import command as waypoint

    assert args[:2] == ["waypoint", "run"]
    run = waypoint.commands["run"]
    with run.make_context("run", [_kubelet_expand(a, env) for a in args[2:]]) as ctx:
        return dict(ctx.params)


# The config the operator adds for this waypoint (docs/deploy.md shows the same shape): its
# workload is in the Deployment's namespace, with its service account, the pod's IP, and a
# node name of its own for which the nodeproxy-waypoint-pki Secret was issued.
WAYPOINT_CONFIG = """
trustDomain: cluster.local
workloads:
- uid: cluster1//v1/Pod/nodeproxy-system/waypoint
  name: waypoint
  namespace: nodeproxy-system
  serviceAccount: waypoint
  workloadIps: ["10.244.1.7"]
  node: waypoint-nodeproxy-system
  protocol: HBONE
  services: {"nodeproxy-system/waypoint.nodeproxy-system.svc.cluster.local": {15008: 15008}}
services:
- name: waypoint
  namespace: nodeproxy-system
  hostname: waypoint.nodeproxy-system.svc.cluster.local
  vips: ["/10.96.0.40"]
  ports: {15008: 15008}
waypoints:
- name: waypoint
  namespace: nodeproxy-system
  service: nodeproxy-system/waypoint.nodeproxy-system.svc.cluster.local
"""


def test_waypoint_args_are_accepted_by_the_real_command() -> None:
    container = _waypoint_container()
    params = _parse_waypoint_args(container["args"], {"POD_IP": "10.244.1.7"})
    assert params["listen_ip"] == "10.244.1.7"
    assert params["ca_address"] is not None  # production identity, as the DaemonSet
    assert params["dev_ca_dir"] is None
    assert params["config_path"] == "/etc/nodeproxy/config/config.yaml"


def test_arg_parsing_rejects_an_unknown_option() -> None:
    # Guards the test above: make_context really checks option names.
    with pytest.raises(click.NoSuchOption):
        _parse_waypoint_args(["waypoint", "run", "--config=c.yaml", "--name=a/b",
                              "--listen-addr=1.2.3.4"], {})


def test_waypoint_listens_on_the_pod_ip_from_the_downward_api() -> None:
    container = _waypoint_container()
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert "--listen-ip=$(POD_IP)" in container["args"]


def test_waypoint_args_pick_the_waypoint_and_identity_of_the_documented_config() -> None:
    # The Deployment's --name, namespace and service account agree with the config shape it
    # documents: the waypoint finds its workload, whose identity is the pod's service account.
    deployment = _kind("Deployment", "waypoint")
    params = _parse_waypoint_args(_waypoint_container()["args"], {"POD_IP": "10.244.1.7"})
    snapshot = Snapshot.build(load_config_text(WAYPOINT_CONFIG, "waypoint-config.yaml"))
    options = WaypointOptions(config=params["config_path"], name=params["name"],
                              node=params["node"], workload=params["workload"],
                              listen_ip=params["listen_ip"])
    _waypoint, me = choose_self(snapshot, options)
    namespace = deployment["metadata"]["namespace"]
    account = _waypoint_pod()["serviceAccountName"]
    assert str(me.identity) == f"spiffe://cluster.local/ns/{namespace}/sa/{account}"


def test_waypoint_uses_the_daemonsets_config_and_ca() -> None:
    agent_pod = _kind("DaemonSet")["spec"]["template"]["spec"]
    (agent,) = agent_pod["containers"]
    pod = _waypoint_pod()
    container = _waypoint_container()

    def config_map(pod_spec: dict[str, Any], mounts: list[dict[str, Any]]) -> tuple[str, str]:
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        (mount,) = [m for m in mounts if "configMap" in volumes[m["name"]]]
        return volumes[mount["name"]]["configMap"]["name"], mount["mountPath"]

    assert config_map(pod, container["volumeMounts"]) == config_map(
        agent_pod, agent["volumeMounts"])

    def option(args: list[str], name: str) -> str:
        (value,) = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
        return value

    assert option(container["args"], "--config") == option(agent["args"], "--config")
    assert option(container["args"], "--ca-address") == option(agent["args"], "--ca-address")
    ca_service = _kind("Service", "nodeproxy-ca")
    assert option(container["args"], "--ca-address") == (
        f"https://{ca_service['metadata']['name']}.{ca_service['metadata']['namespace']}.svc:"
        f"{ca_service['spec']['ports'][0]['port']}")


def test_waypoint_credentials_come_from_a_secret_readable_by_its_group_only() -> None:
    pod = _waypoint_pod()
    container = _waypoint_container()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert {m["name"] for m in container["volumeMounts"]} <= set(volumes)
    pki = volumes[mounts["/etc/nodeproxy/pki"]["name"]]
    assert pki["secret"]["secretName"] == "nodeproxy-waypoint-pki"
    assert pki["secret"]["defaultMode"] == 0o440
    assert mounts["/etc/nodeproxy/pki"]["readOnly"] is True
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    for flag in ("--node-cert", "--node-key", "--ca-bundle"):
        (arg,) = [a for a in container["args"] if a.startswith(flag + "=")]
        assert arg.split("=", 1)[1].startswith("/etc/nodeproxy/pki/"), arg
    # --state-dir must be writable although the root filesystem is read-only.
    (state,) = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--state-dir=")]
    assert "emptyDir" in volumes[mounts[state]["name"]]
    assert not mounts[state].get("readOnly", False)


def test_waypoint_security_context() -> None:
    pod = _waypoint_pod()
    sc = _waypoint_container()["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod.get("hostNetwork", False) is False
    assert pod["automountServiceAccountToken"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}  # and nothing added


def test_waypoint_probes_ports_and_resources() -> None:
    container = _waypoint_container()
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert container["livenessProbe"]["tcpSocket"] == {"port": 15021}
    assert {p["containerPort"] for p in container["ports"]} == {15008, 15020, 15021}
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    # The probes and the Service hit what the process binds.
    params = _parse_waypoint_args(container["args"], {"POD_IP": "10.244.1.7"})
    assert params["readiness_addr"].endswith(":15021")
    assert params["hbone_port"] == 15008


def test_waypoint_service_account_exists_without_a_token() -> None:
    account = _kind("ServiceAccount", _waypoint_pod()["serviceAccountName"])
    deployment = _kind("Deployment", "waypoint")
    assert account["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert account["automountServiceAccountToken"] is False


def test_waypoint_service_selects_the_pods_and_exposes_hbone() -> None:
    deployment = _kind("Deployment", "waypoint")
    service = _kind("Service", "waypoint")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {15008, 15021}
    assert ports[15008]["name"] == "tcp-hbone"
    assert ports[15008]["appProtocol"] == "hbone"
    container_ports = {p["name"]: p["containerPort"] for p in _waypoint_container()["ports"]}
    for port in ports.values():
        assert port["targetPort"] in container_ports.values()
