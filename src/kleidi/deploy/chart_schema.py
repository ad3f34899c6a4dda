"""values.schema.json of the Helm chart (charts/kleidi): kleidi's own config schema under `config`, plus the
chart's values, every object closed (an unknown key is refused by helm, naming it).

Regenerate with ``python -m kleidi.deploy.chart_schema > charts/kleidi/values.schema.json``; a test fails
when the committed file drifts.
"""

from __future__ import annotations

import json
from typing import Any

from kleidi.config import json_schema

_STR: dict[str, Any] = {"type": "string"}
_BOOL: dict[str, Any] = {"type": "boolean"}
_ABS_PATH: dict[str, Any] = {"type": "string", "pattern": "^/"}
_LABELS: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}
_HOST_PATH_TYPES = ["", "Directory", "DirectoryOrCreate", "File", "FileOrCreate", "Socket", "CharDevice",
                    "BlockDevice"]


def _closed(properties: dict[str, Any], required: list[str] | None = None, description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = required
    if description:
        out["description"] = description
    return out


def _host_mounts(description: str) -> dict[str, Any]:
    return {
        "type": "array",
        "description": description,
        "items": _closed({
            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 50},
            "path": _ABS_PATH,
            "mountPath": _ABS_PATH,
            "type": {"enum": _HOST_PATH_TYPES},
        }, ["name", "path"]),
    }


def _monitor(kind: str) -> dict[str, Any]:
    return _closed({
        "enabled": _BOOL,
        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
        "labels": _LABELS,
    }, description=f"A {kind} (monitoring.coreos.com/v1) for the Prometheus operator; off by default.")


def chart_values_schema() -> dict[str, Any]:
    """The JSON Schema of the chart's values."""
    config = json_schema()
    defs = config.pop("$defs", {})
    config["description"] = "kleidi's config file (docs/configuration.md), rendered into a ConfigMap."
    schema = _closed({
        "image": _closed({
            "repository": _STR,
            "tag": _STR,
            "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        }, ["repository", "tag", "pullPolicy"]),
        "config": config,
        "configSource": {"enum": ["configMap", "hostPath"],
                         "description": "configMap: `config` in a ConfigMap; hostPath: configHostPath/config.yaml."},
        "configHostPath": _ABS_PATH,
        "socketHostPath": _ABS_PATH,
        "hostMounts": _host_mounts("Read-only host paths with what the backend reads."),
        "writableHostMounts": _host_mounts("Host paths kleidi writes to (TPM key store, audit log)."),
        "secretCredentials": _closed({"secretName": _STR, "mountPath": _ABS_PATH}),
        "acknowledgeSecretDependency": _BOOL,
        "tpm": _closed({
            "deviceAccess": {"enum": ["none", "privileged", "devicePlugin"]},
            "devicePath": _ABS_PATH,
            "resourceName": {"type": "string", "pattern": "^[a-z0-9.-]+/[A-Za-z0-9._-]+$"},
        }),
        "supplementalGroups": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "nodeSelector": _LABELS,
        "tolerations": {"type": "array", "items": {"type": "object"}},
        "priorityClassName": _STR,
        "resources": _closed({
            "requests": {"type": "object"},
            "limits": {"type": "object"},
        }),
        "updateStrategy": _closed({"maxUnavailable": {"type": ["integer", "string"]}}),
        "podAnnotations": _LABELS,
        "podLabels": _LABELS,
        "serviceMonitor": _monitor("ServiceMonitor"),
        "podMonitor": _monitor("PodMonitor"),
        "global": {"type": "object", "description": "Helm's own (set for subcharts)."},
    })
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "kleidi chart values", **schema}
    schema["$defs"] = defs
    return schema


def render() -> str:
    return json.dumps(chart_values_schema(), indent=2) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(render(), end="")
