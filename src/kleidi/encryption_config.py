"""The EncryptionConfiguration that points kube-apiserver at kleidi (kms-protocol.md §5.1).

Everything written here is checked first, by the apiserver's own rules and more: the apiserver
accepts some values that then do nothing (a singular ``secret`` matches no resource, so new Secrets
are stored in plaintext), and refuses others only at start-up (``timeout: 3``).
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import yaml

from kleidi.durations import DurationError, parse_duration
from kleidi.endpoint import check_endpoint_flag
from kleidi.errors import ConfigError

_INVALID_RESOURCES = {"apiserveripinfo", "serviceipallocations", "servicenodeportallocations"}

# The apiserver's built-in resources that are stored in etcd (Kubernetes 1.36), by API group; "" is
# the core group. Core names are checked against this list, since the apiserver accepts any name and a
# wrong one silently encrypts nothing; names in other groups may be custom resources and are only
# checked for an obvious singular.
BUILTIN_RESOURCES: dict[str, frozenset[str]] = {group: frozenset(names.split()) for group, names in {
    "": "configmaps endpoints events limitranges namespaces nodes persistentvolumeclaims persistentvolumes pods "
        "podtemplates replicationcontrollers resourcequotas secrets serviceaccounts services",
    "admissionregistration.k8s.io": "mutatingwebhookconfigurations validatingwebhookconfigurations "
        "validatingadmissionpolicies validatingadmissionpolicybindings mutatingadmissionpolicies "
        "mutatingadmissionpolicybindings",
    "apiextensions.k8s.io": "customresourcedefinitions",
    "apiregistration.k8s.io": "apiservices",
    "apps": "controllerrevisions daemonsets deployments replicasets statefulsets",
    "autoscaling": "horizontalpodautoscalers",
    "batch": "cronjobs jobs",
    "certificates.k8s.io": "certificatesigningrequests clustertrustbundles podcertificaterequests",
    "coordination.k8s.io": "leases leasecandidates",
    "discovery.k8s.io": "endpointslices",
    "flowcontrol.apiserver.k8s.io": "flowschemas prioritylevelconfigurations",
    "internal.apiserver.k8s.io": "storageversions",
    "networking.k8s.io": "ingressclasses ingresses ipaddresses networkpolicies servicecidrs",
    "node.k8s.io": "runtimeclasses",
    "policy": "poddisruptionbudgets",
    "rbac.authorization.k8s.io": "clusterrolebindings clusterroles rolebindings roles",
    "resource.k8s.io": "deviceclasses devicetaintrules resourceclaims resourceclaimtemplates resourceslices",
    "scheduling.k8s.io": "priorityclasses",
    "storage.k8s.io": "csidrivers csinodes csistoragecapacities storageclasses volumeattachments "
        "volumeattributesclasses",
    "storagemigration.k8s.io": "storageversionmigrations",
}.items()}

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_GROUP = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _plural_of(name: str, known: frozenset[str]) -> str | None:
    """The known plural that ``name`` (a singular or a Kind) stands for, if there is one."""
    for candidate in (f"{name}s", f"{name}es", f"{name[:-1]}ies"):
        if candidate in known:
            return candidate
    return None


def _group_of(name: str) -> str | None:
    """The non-core group that has a resource ``name`` (or its plural), e.g. deployments -> apps."""
    for group, names in BUILTIN_RESOURCES.items():
        if group and (name in names or _plural_of(name, names)):
            return group
    return None


def check_resource(resource: str) -> None:
    """The apiserver's resource-name rules, and built-in core names, so that a bad list fails here."""
    if not resource:
        raise ConfigError("--resources: an empty resource name", fix="list names separated by commas, e.g. secrets")
    if resource != resource.lower():
        hint = resource.lower() if "." in resource else _hint(resource.lower())
        raise ConfigError(f"--resources: {resource!r} must be lowercase (resources are named by their plural, not "
                          "their Kind)", fix=f"use {hint}")
    if resource == "*":
        raise ConfigError("--resources: a bare '*' is not allowed",
                          fix="use '*.' for every resource of the core group or '*.*' for every resource")
    name, dot, group = resource.partition(".")
    if resource == "*.*" or (name == "*" and dot):
        if group not in ("", "*") and not _GROUP.fullmatch(group):
            raise ConfigError(f"--resources: {resource!r} names no API group", fix="write '*.<group>', e.g. '*.apps'")
        if group in ("events.k8s.io", "extensions"):
            _refuse_group(resource, group)
        return
    if not _NAME.fullmatch(name) or (dot and not _GROUP.fullmatch(group)):
        if group == "*":
            raise ConfigError(f"--resources: {resource!r}: 'resource.*' (one resource in every group) is not allowed",
                              fix=f"name the group, e.g. {name}.apps, or use '*.*'")
        raise ConfigError(f"--resources: {resource!r} is not a resource name",
                          fix="write <plural> for the core group or <plural>.<group>, e.g. secrets or deployments.apps")
    if group in ("events.k8s.io", "extensions"):
        _refuse_group(resource, group)
    if name in _INVALID_RESOURCES:
        raise ConfigError(f"--resources: {resource!r} has no REST API and cannot be encrypted", fix="remove it")
    known = BUILTIN_RESOURCES.get(group)
    if not group:
        if name not in BUILTIN_RESOURCES[""]:
            raise ConfigError(f"--resources: {resource!r} is not a built-in resource of the core API group, so the "
                              "apiserver would encrypt nothing for it", fix=f"use {_hint(name)}")
    elif known is not None and name not in known and _plural_of(name, known):
        raise ConfigError(f"--resources: {resource!r} is not a resource of {group}: resources are named by their "
                          "plural", fix=f"use {_plural_of(name, known)}.{group}")


def _hint(name: str) -> str:
    """What a user most likely meant by a core name that is not a built-in resource."""
    core = BUILTIN_RESOURCES[""]
    if name in core:
        return name
    plural = _plural_of(name, core)
    if plural:
        return plural
    group = _group_of(name)
    if group:
        names = BUILTIN_RESOURCES[group]
        return f"{name if name in names else _plural_of(name, names)}.{group}"
    close = difflib.get_close_matches(name, sorted(core), n=1)
    if close:
        return close[0]
    return "<plural>.<group> for a resource outside the core group (e.g. widgets.example.com), or '*.*' for all"


def _refuse_group(resource: str, group: str) -> None:
    if group == "events.k8s.io":
        raise ConfigError(f"--resources: {resource!r}: events.k8s.io objects are stored as core events",
                          fix="use events")
    raise ConfigError(f"--resources: {resource!r}: the extensions group was removed and cannot be encrypted",
                      fix="use the resource's current group, e.g. deployments.apps or ingresses.networking.k8s.io")


def _group_resource(resource: str) -> tuple[str, str]:
    name, _, group = resource.partition(".")  # as the apiserver's schema.ParseGroupResource
    return name, group


def check_resources(resources: list[str]) -> None:
    if not resources:
        raise ConfigError("--resources: no resource listed", fix="list at least one, e.g. --resources secrets")
    for resource in resources:
        check_resource(resource)
    parsed = [_group_resource(r) for r in resources]
    for i, (name, group) in enumerate(parsed):
        if parsed.index((name, group)) != i:
            raise ConfigError(f"--resources: {resources[i]!r} is listed twice", fix="list each resource once")
    # The apiserver refuses a list in which a wildcard covers another entry (the later one is masked).
    for i, (name, group) in enumerate(parsed):
        for j, (_, other_group) in enumerate(parsed):
            if i != j and ((name, group) == ("*", "*") or (group == other_group and name == "*")):
                raise ConfigError(f"--resources: {resources[i]!r} already covers {resources[j]!r}",
                                  fix=f"list only {resources[i]!r}, or drop it and list each resource")


def check_timeout(timeout: str) -> str:
    """The timeout as a Go duration the apiserver accepts (it refuses a bare number at start-up)."""
    try:
        seconds = parse_duration(timeout)
    except DurationError as exc:
        raise ConfigError(f"--timeout: {exc.message}", fix=exc.fix) from None
    if seconds <= 0:
        raise ConfigError(f"--timeout: {timeout!r} is not positive", fix="use e.g. 3s (the apiserver's default)")
    return timeout.strip()


def _check_name(name: str, flag: str, example: str) -> None:
    if not name or ":" in name:
        raise ConfigError(f"{flag}: provider name {name!r} must be non-empty and contain no ':' (it becomes part of "
                          "every stored value's prefix k8s:enc:kms:v2:<name>:)", fix=f"use e.g. {example}")


def parse_previous(text: str) -> tuple[str, str]:
    """``NAME=ENDPOINT`` of ``--previous`` as (name, endpoint); the endpoint is checked by :func:`build`."""
    name, equals, endpoint = text.partition("=")
    if not equals or not endpoint.strip():
        raise ConfigError(f"--previous: {text!r} is not NAME=ENDPOINT",
                          fix="give the old provider's name and its kleidi's socket, e.g. "
                              "--previous kleidi-vault=unix:///run/kleidi-vault/kleidi.sock")
    name = name.strip()
    _check_name(name, "--previous", "--previous kleidi-old=unix:///run/kleidi-old/kleidi.sock")
    return name, endpoint.strip()


def build(name: str, endpoint: str, resources: list[str], timeout: str = "3s",
          identity_fallback: bool = True, previous: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """One resources entry: the kms provider ``name`` (it encrypts every write), then each ``previous``
    (name, endpoint) in order (they only decrypt what is stored with them), then identity if asked."""
    _check_name(name, "--name", "--name kleidi")
    check_endpoint_flag(endpoint, "--endpoint")
    check_resources(resources)
    timeout = check_timeout(timeout)
    kms = [(name, endpoint), *(previous or [])]
    for i, (provider, provider_endpoint) in enumerate(kms[1:], start=1):
        _check_name(provider, "--previous", "--previous kleidi-old=unix:///run/kleidi-old/kleidi.sock")
        check_endpoint_flag(provider_endpoint, "--previous")
        if any(provider == earlier for earlier, _ in kms[:i]):
            raise ConfigError(
                f"--previous: provider name {provider!r} is listed twice (kube-apiserver refuses duplicate kms "
                "provider names)",
                fix="give each provider its own name, and never reuse a name for another KEK: the name is in "
                    "every stored value's prefix k8s:enc:kms:v2:<name>: and picks the provider that decrypts it")
    providers: list[dict[str, Any]] = [
        {"kms": {"apiVersion": "v2", "name": provider, "endpoint": provider_endpoint, "timeout": timeout}}
        for provider, provider_endpoint in kms]
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
    if sum("kms" in p for r in config["resources"] for p in r["providers"]) > 1:
        header += ("# The other kms providers only decrypt what is stored with them: remove each once `kleidi scan`\n"
                   "# finds nothing stored with it (docs/rotation.md, Moving to another backend).\n")
    return header + yaml.safe_dump(config, sort_keys=False)
