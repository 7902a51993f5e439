"""The config as store resources (pure): key layout, split/join round trip, errors by key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ztunnel_cfg.dump import config_to_document
from ztunnel_cfg.errors import ConfigError, ConfigIssue
from ztunnel_cfg.loader import load_config_file
from ztunnel_cfg.store_layout import (
    Item,
    config_to_resources,
    decode_value,
    diff_resources,
    join_resources,
    parse_key,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _items(resources: dict[str, bytes]) -> list[Item]:
    out = [decode_value(k, v) for k, v in resources.items()]
    assert all(isinstance(i, Item) for i in out)
    return [i for i in out if isinstance(i, Item)]


@pytest.mark.parametrize("name", ["cluster.yaml", "l7.yaml"])
def test_split_then_join_gives_the_same_config(name: str) -> None:
    config = load_config_file(EXAMPLES / name)
    resources = config_to_resources(config)
    joined = join_resources(_items(resources)).config
    assert config_to_resources(joined) == resources
    doc, want = config_to_document(joined), config_to_document(config)
    assert {k: len(v) if isinstance(v, list) else v for k, v in doc.items()} == {
        k: len(v) if isinstance(v, list) else v for k, v in want.items()}


@pytest.mark.parametrize(("key", "problem"), [
    ("/other/v1/workloads/a/b", "not under"),
    ("/nodeproxy/v1/workloads/a", "want /nodeproxy/v1/<kind>/<namespace>/<name>"),
    ("/nodeproxy/v1/gadgets/a/b", "unknown kind 'gadgets'"),
    ("/nodeproxy/v1/workloads/a/b/c", "want"),
])
def test_bad_keys_are_named(key: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_key(key)
    issue = decode_value(key, b"{}")
    assert isinstance(issue, ConfigIssue)
    assert issue.file == key


def test_a_hand_written_bad_value_is_reported_against_its_key() -> None:
    resources = config_to_resources(load_config_file(EXAMPLES / "l7.yaml"))
    key = "/nodeproxy/v1/workloads/bookinfo/productpage-0"
    data = json.loads(resources[key])
    data["workloadIps"] = ["not-an-ip"]
    resources[key] = json.dumps(data).encode()
    with pytest.raises(ConfigError) as err:
        join_resources(_items(resources))
    issue = err.value.issues[0]
    assert issue.file == key
    assert issue.path.startswith("workloadIps")
    # Unparsable, and a key that does not match its resource.
    assert isinstance(decode_value(key, b"{not json"), ConfigIssue)
    mismatch = decode_value("/nodeproxy/v1/workloads/bookinfo/other", resources[key])
    assert isinstance(mismatch, ConfigIssue)
    assert "does not match" in mismatch.message


def test_cross_reference_errors_name_keys_not_indices() -> None:
    resources = config_to_resources(load_config_file(EXAMPLES / "cluster.yaml"))
    workloads = sorted(k for k in resources if "/workloads/" in k)
    first, second = json.loads(resources[workloads[0]]), json.loads(resources[workloads[1]])
    second["workloadIps"] = first["workloadIps"]
    resources[workloads[1]] = json.dumps(second).encode()
    with pytest.raises(ConfigError) as err:
        join_resources(_items(resources))
    text = str(err.value)
    assert workloads[1] in text
    assert "workloads[" not in text


def test_an_empty_store_is_never_no_workloads() -> None:
    with pytest.raises(ConfigError, match="no config resources"):
        join_resources([])


def test_diff() -> None:
    d = diff_resources({"a": b'{"x":1}', "b": b"1", "c": b"2"},
                       {"a": b'{ "x": 1 }', "b": b"3", "d": b"4"})
    assert (d.added, d.changed, d.removed) == (("d",), ("b",), ("c",))
    assert d.summary() == "1 added, 1 changed, 1 removed"


@pytest.mark.parametrize("name", ["cluster.yaml", "l7.yaml"])
def test_the_fast_path_agrees_with_the_located_one(name: str) -> None:
    import yaml

    from ztunnel_cfg.loader import validate_config_data, validate_config_text

    text = (EXAMPLES / name).read_text()
    fast = validate_config_data(yaml.safe_load(text))
    assert fast is not None
    assert config_to_document(fast.config) == config_to_document(
        validate_config_text(text).config)
    broken = yaml.safe_load(text)
    broken["workloads"][0]["workloadIps"] = ["nope"]
    assert validate_config_data(broken) is None  # the caller then locates the issue
    dup = yaml.safe_load(text)
    dup["workloads"].append(dict(dup["workloads"][0]))
    assert validate_config_data(dup) is None  # cross-reference issues too


def test_the_entry_cache_revalidates_only_what_changed() -> None:
    from ztunnel_cfg.store_layout import EntryCache

    resources = config_to_resources(load_config_file(EXAMPLES / "l7.yaml"))
    items = _items(resources)
    cache = EntryCache()
    first = join_resources(items, cache).config
    assert config_to_document(first) == config_to_document(join_resources(items).config)
    again = join_resources(items, cache).config
    assert again.workloads[0] is first.workloads[0]  # reused, not validated again
    # A changed value is validated (and a bad one still reported against its key).
    key = "/nodeproxy/v1/workloads/bookinfo/productpage-0"
    bad = json.loads(resources[key])
    bad["workloadIps"] = ["nope"]
    changed = [i if i.key != key else Item(key, bad, key) for i in items]
    with pytest.raises(ConfigError) as err:
        join_resources(changed, cache)
    assert err.value.issues[0].file == key
