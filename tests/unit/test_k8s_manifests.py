"""deploy/kubernetes/: every document validates (offline) against the Kubernetes JSON schemas
shipped in kubernetes-validate, strict mode (unknown fields are errors), plus the properties
the agent depends on.  Nothing here talks to a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ztunnel_cfg.loader import load_config_text

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


def _kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in _docs() if d["kind"] == kind]
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
    (container,) = _kind("Deployment")["spec"]["template"]["spec"]["containers"]
    names = {opt for p in serve.params for opt in p.opts}
    for arg in container["args"][2:]:
        assert arg.split("=", 1)[0] in names, arg
    svc = _kind("Service")
    assert svc["spec"]["ports"][0]["port"] == 15012


def test_configmap_config_loads_with_the_real_loader() -> None:
    text = _kind("ConfigMap")["data"]["config.yaml"]
    config = load_config_text(text, "configmap.yaml")
    assert config.trust_domain == "cluster.local"
