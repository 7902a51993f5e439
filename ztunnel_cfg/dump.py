"""Config -> plain document and JSON Schema, both from the models of :mod:`ztunnel_cfg.model`.

``load_config_text(yaml.safe_dump(config_to_document(c)))`` gives back an equal Config;
used by ``config show -o json|yaml`` and the admin API's config dump.  Defaults are left out.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter

from ztunnel_cfg.model import Config, Doc, Policy, Service, Workload

__all__ = [
    "config_json_schema",
    "config_to_document",
    "policy_to_document",
    "service_to_document",
    "workload_to_document",
]

_ADAPTERS: dict[type[Doc], TypeAdapter[Any]] = {}


def _adapter(cls: type[Doc]) -> TypeAdapter[Any]:
    if cls not in _ADAPTERS:
        _ADAPTERS[cls] = TypeAdapter(cls)
    return _ADAPTERS[cls]


def _plain(value: Any) -> Any:
    # Lists, not tuples: yaml.safe_dump cannot write tuples.
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _document(obj: Doc) -> dict[str, Any]:
    out: dict[str, Any] = _plain(
        _adapter(type(obj)).dump_python(obj, by_alias=True, exclude_defaults=True)
    )
    return out


def workload_to_document(w: Workload) -> dict[str, Any]:
    return _document(w)


def service_to_document(s: Service) -> dict[str, Any]:
    return _document(s)


def policy_to_document(p: Policy) -> dict[str, Any]:
    return _document(p)


def config_to_document(config: Config) -> dict[str, Any]:
    out = _document(config)
    # Always written: a document without it is rejected (it must never mean "no workloads").
    return {"workloads": [], **out} if "workloads" not in out else out


def config_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a config document, for editors and CI checks."""
    schema: dict[str, Any] = _adapter(Config).json_schema(by_alias=True, mode="validation")
    schema["required"] = ["workloads"]  # optional in Python (tests build Config()), not in files
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "nodeproxy config"
    return schema


def config_json_schema_text() -> str:
    return json.dumps(config_json_schema(), indent=2, sort_keys=True) + "\n"
