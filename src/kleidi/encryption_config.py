"""The EncryptionConfiguration that points kube-apiserver at kleidi (kms-protocol.md §5.1)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from kleidi.endpoint import parse_endpoint

_INVALID_RESOURCES = {"apiserveripinfo", "serviceipallocations", "servicenodeportallocations"}


def check_resource(resource: str) -> None:
    """The apiserver's resource-name rules, so a bad list fails here and not at apiserver start."""
    if not resource:
        raise ValueError("empty resource name")
    if resource != resource.lower():
        raise ValueError(f"resource {resource!r} must be lowercase")
    if resource == "*":
        raise ValueError("bare '*' is not allowed; use '*.' for the core group or '*.*' for everything")
    name, _, group = resource.partition(".")
    if name != "*" and group == "*":
        raise ValueError(f"{resource!r}: 'resource.*' is not allowed")
    if group in ("events.k8s.io", "extensions"):
        raise ValueError(f"{resource!r}: group {group!r} is not allowed (use 'events' for events)")
    if name in _INVALID_RESOURCES:
        raise ValueError(f"{resource!r} cannot be encrypted")
    if not re.fullmatch(r"(\*|[a-z0-9][-a-z0-9]*)(\.(\*|[a-z0-9][-a-z0-9.]*))?", resource):
        raise ValueError(f"{resource!r} is not a resource name")


def build(name: str, endpoint: str, resources: list[str], timeout: str = "3s",
          identity_fallback: bool = True) -> dict[str, Any]:
    if not name or ":" in name:
        raise ValueError(f"provider name {name!r} must be non-empty and contain no ':' (it becomes part of "
                         "every stored value's prefix k8s:enc:kms:v2:<name>:)")
    parse_endpoint(endpoint)
    if not resources:
        raise ValueError("list at least one resource")
    for resource in resources:
        check_resource(resource)
    if len(set(resources)) != len(resources):
        raise ValueError("a resource is listed twice")
    providers: list[dict[str, Any]] = [
        {"kms": {"apiVersion": "v2", "name": name, "endpoint": endpoint, "timeout": timeout}}]
    if identity_fallback:
        providers.append({"identity": {}})
    return {"apiVersion": "apiserver.config.k8s.io/v1", "kind": "EncryptionConfiguration",
            "resources": [{"resources": list(resources), "providers": providers}]}


def render(config: dict[str, Any]) -> str:
    header = "# kube-apiserver --encryption-provider-config=<this file>\n"
    if any("identity" in p for r in config["resources"] for p in r["providers"]):
        header += ("# The kms provider encrypts new writes; identity reads objects written before encryption was\n"
                   "# enabled. Remove identity once every object has been re-encrypted (docs/quickstart.md).\n")
    else:
        header += ("# No identity fallback: objects not yet encrypted cannot be read through this config.\n")
    return header + yaml.safe_dump(config, sort_keys=False)
