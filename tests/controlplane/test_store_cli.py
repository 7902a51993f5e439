"""`nodeproxy config apply|get|diff|delete --store` against a real etcd (TLS + roles)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from cli.main import cli
from nodeproxy.controlplane.endpoint import parse_store_url
from nodeproxy.controlplane.errors import StoreConflictError, StoreError
from nodeproxy.controlplane.store import Store
from tests.helpers.etcd import EtcdCluster
from ztunnel_cfg.dump import config_to_document
from ztunnel_cfg.loader import load_config_file

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "l7.yaml"


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def keys(etcd: EtcdCluster, prefix: str = "/nodeproxy/v1/") -> list[str]:
    out = etcd.etcdctl(["get", "--prefix", "--keys-only", prefix]).stdout
    return [line for line in out.splitlines() if line]


def test_apply_writes_one_key_per_resource_and_get_gives_it_back(store: EtcdCluster) -> None:
    url = store.url("admin")
    res = run("config", "apply", str(EXAMPLE), "--store", url)
    assert res.exit_code == 0, res.output
    stored = keys(store)
    assert "/nodeproxy/v1/workloads/bookinfo/productpage-0" in stored
    assert "/nodeproxy/v1/waypoints/bookinfo/waypoint" in stored
    assert "/nodeproxy/v1/trafficpolicies/bookinfo/reviews" in stored
    assert all(k.count("/") == 5 for k in stored)  # /nodeproxy/v1/<kind>/<ns>/<name>
    got = run("config", "get", "--store", url, "-o", "yaml")
    assert got.exit_code == 0, got.output
    want = config_to_document(load_config_file(EXAMPLE))
    doc = yaml.safe_load(got.stdout)
    assert {k: sorted(map(json.dumps, v)) if isinstance(v, list) else v
            for k, v in doc.items()} == {
        k: sorted(map(json.dumps, v)) if isinstance(v, list) else v for k, v in want.items()}
    again = run("config", "apply", str(EXAMPLE), "--store", url)
    assert again.exit_code == 0
    assert "no changes" in again.stderr
    table = run("config", "get", "workloads/bookinfo", "--store", url)
    assert "productpage-0" in table.stdout
    assert "KIND" in table.stdout
    one = run("config", "get", "policies/bookinfo/no-admin", "--store", url, "-o", "json")
    assert json.loads(one.stdout)["/nodeproxy/v1/policies/bookinfo/no-admin"]["action"] == "Deny"


def test_invalid_desired_state_writes_nothing_and_names_file_line_key(
        store: EtcdCluster, tmp_path: Path) -> None:
    url = store.url("admin")
    assert run("config", "apply", str(EXAMPLE), "--store", url).exit_code == 0
    before = store.etcdctl(["get", "--prefix", "/nodeproxy/", "-w", "json"]).stdout
    text = EXAMPLE.read_text().replace("name: productpage-0", "name: productpage-0\n  bogus: 1")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    res = run("config", "apply", str(bad), "--store", url)
    assert res.exit_code == 1
    assert f"{bad}" in res.stderr
    assert "/nodeproxy/v1/workloads/bookinfo/productpage-0" in res.stderr
    assert "bogus" in res.stderr
    # Cross references: a workload naming a missing service.
    broken = tmp_path / "xref.yaml"
    broken.write_text(EXAMPLE.read_text().replace("bookinfo/reviews.bookinfo.svc.cluster.local",
                                                   "bookinfo/nope.bookinfo.svc.cluster.local"))
    res = run("config", "apply", str(broken), "--store", url)
    assert res.exit_code == 1, res.output
    assert "nope" in res.stderr
    assert ":" in res.stderr
    after = store.etcdctl(["get", "--prefix", "/nodeproxy/", "-w", "json"]).stdout
    assert json.loads(before)["kvs"] == json.loads(after)["kvs"]


def test_dry_run_and_diff_show_changes_without_writing(store: EtcdCluster, tmp_path: Path) -> None:
    url = store.url("admin")
    assert run("config", "apply", str(EXAMPLE), "--store", url).exit_code == 0
    changed = tmp_path / "changed.yaml"
    changed.write_text(EXAMPLE.read_text().replace("paths: [\"/admin*\"]", "paths: [\"/root*\"]"))
    assert changed.read_text() != EXAMPLE.read_text()
    dry = run("config", "apply", str(changed), "--store", url, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "+++ /nodeproxy/v1/policies/bookinfo/no-admin" in dry.stdout
    assert "-      - /admin*" in dry.stdout
    assert "+      - /root*" in dry.stdout
    assert "nothing written" in dry.stderr
    diff = run("config", "diff", str(changed), "--store", url)
    assert diff.exit_code == 1
    assert "/root*" in diff.stdout
    assert run("config", "diff", str(EXAMPLE), "--store", url).exit_code == 0
    value = store.etcdctl(["get", "--print-value-only",
                           "/nodeproxy/v1/policies/bookinfo/no-admin"]).stdout
    assert "/admin*" in value


def test_delete_refuses_to_leave_an_invalid_state(store: EtcdCluster) -> None:
    url = store.url("admin")
    assert run("config", "apply", str(EXAMPLE), "--store", url).exit_code == 0
    refused = run("config", "delete", "services/bookinfo/reviews", "--store", url)
    assert refused.exit_code == 1
    assert "/nodeproxy/v1/services/bookinfo/reviews" in keys(store)
    ok = run("config", "delete", "policies/bookinfo/no-admin", "--store", url)
    assert ok.exit_code == 0, ok.output
    assert "/nodeproxy/v1/policies/bookinfo/no-admin" not in keys(store)


def test_concurrent_writes_cannot_interleave(store: EtcdCluster) -> None:
    """Two writers read the same revision: the second CAS fails and writes nothing."""
    spec = parse_store_url(store.url("admin"))
    from cli.config_store import desired_state

    _r, desired = desired_state((str(EXAMPLE),))
    other = {k: v for k, v in desired.items() if "/policies/" not in k}

    async def race() -> None:
        async with Store(spec) as a, Store(spec) as b:
            seen_a = await a.listing()
            seen_b = await b.listing()
            await a.write(seen_a, desired)
            with pytest.raises(StoreConflictError):
                await b.write(seen_b, other)
            # A hand-made edit after a read also makes the write fail.
            seen = await a.listing()
            store.etcdctl(["put", "/nodeproxy/v1/policies/bookinfo/no-admin",
                           seen.values["/nodeproxy/v1/policies/bookinfo/no-admin"].decode()])
            with pytest.raises(StoreConflictError):
                await a.write(seen, other)

    asyncio.run(race())
    assert any("/policies/" in k for k in keys(store))


def test_a_node_identity_may_read_config_but_not_write_it(store: EtcdCluster) -> None:
    assert run("config", "apply", str(EXAMPLE), "--store", store.url("admin")).exit_code == 0
    node = store.url("node1")
    got = run("config", "get", "workloads", "--store", node)
    assert got.exit_code == 1
    assert "permission denied" in got.stderr
    res = run("config", "apply", str(EXAMPLE), "--store", node)
    assert res.exit_code == 1
    assert "permission denied" in res.stderr

    async def write_other_nodes_key() -> None:
        async with Store(parse_store_url(node)) as s:
            await s.client.put(b"/nodeproxy/nodes/v1/node1", b"{}")  # its own: allowed
            with pytest.raises(Exception, match="permission denied"):
                await s.client.put(b"/nodeproxy/nodes/v1/node2", b"{}")

    asyncio.run(write_other_nodes_key())


def test_unreachable_store_is_one_clear_error(tmp_path: Path) -> None:
    res = run("config", "apply", str(EXAMPLE), "--store", "etcd://127.0.0.1:1?timeout=1")
    assert res.exit_code == 1
    assert "error: etcd at etcd://127.0.0.1:1" in res.stderr
    with pytest.raises(StoreError, match="bad endpoint"):
        parse_store_url("etcd://nohost")
