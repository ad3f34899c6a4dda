"""The Helm chart (charts/kleidi) with a real helm and a real kube-apiserver: lint and render every example
values file, the schema (generated from kleidi's own) refuses bad values naming the field, the rendered config
passes `kleidi config check`, the DaemonSet keeps the security settings, credentials from a Secret are refused
without the acknowledgement, and every rendered object (ServiceMonitor and PodMonitor included, with the
prometheus-operator CRDs installed) is accepted by the apiserver in a server-side dry run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from kleidi.cli import main
from kleidi.deploy import chart_schema, static_pod
from tests.deploy.helm import CHART, helm, prometheus_operator_crds, render, template
from tests.e2e.cluster import KubeAPIServer

EXAMPLES = sorted(CHART.glob("ci/*-values.yaml"))
BACKENDS = {"local", "vault", "pkcs11", "tpm"}


def _by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


def _daemonset(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return _by_kind(objects)["DaemonSet"]


@pytest.fixture(scope="module")
def apiserver(apiserver: KubeAPIServer) -> KubeAPIServer:
    """The shared dry-run apiserver (tests/deploy/conftest.py), with the ServiceMonitor and PodMonitor CRDs."""
    for crd in prometheus_operator_crds().values():
        apiserver.kubectl("apply", "--server-side", "-f", str(crd))
    apiserver.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                      "crd/servicemonitors.monitoring.coreos.com", "crd/podmonitors.monitoring.coreos.com")
    return apiserver


def test_examples_cover_every_backend() -> None:
    kinds = set()
    for path in EXAMPLES:
        backend = yaml.safe_load(path.read_text())["config"].get("backend", {"kind": "local"})
        kinds.add(backend["kind"])
    assert kinds == BACKENDS


def test_values_schema_is_generated() -> None:
    committed = (CHART / "values.schema.json").read_text()
    assert committed == chart_schema.render(), (
        "charts/kleidi/values.schema.json is stale: python -m kleidi.deploy.chart_schema > "
        "charts/kleidi/values.schema.json")


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda p: p.name if p else "defaults")
def test_lint_strict(values: Path | None) -> None:
    args = ["-f", str(values)] if values else []
    result = helm("lint", "--strict", str(CHART), *args)
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", EXAMPLES, ids=lambda p: p.name)
def test_rendered_config_passes_kleidi_config_check(values: Path, tmp_path: Path) -> None:
    config = _by_kind(render({}, values))["ConfigMap"]["data"]["config.yaml"]
    assert yaml.safe_load(config) == yaml.safe_load(values.read_text())["config"] | {
        "telemetry": yaml.safe_load(values.read_text())["config"].get("telemetry", {"address": "127.0.0.1:9464"})}
    path = tmp_path / "config.yaml"
    path.write_text(config)
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("KLEIDI_")}
    result = CliRunner().invoke(main, ["config", "check", "--config", str(path), "-o", "json"], env=env)
    assert result.exit_code == 0, result.output
    checked = yaml.safe_load(result.stdout)
    assert checked["valid"] is True
    assert checked["settings"]["backend"]["kind"] == yaml.safe_load(config).get("backend", {}).get(
        "kind", "local")


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda p: p.name if p else "defaults")
def test_daemonset_security_settings(values: Path | None) -> None:
    objects = render({}, *([values] if values else []))
    ds = _daemonset(objects)
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "Default"
    assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["nodeSelector"] == {"node-role.kubernetes.io/control-plane": ""}
    assert {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists",
            "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (10001, 10001)
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    [container] = pod["containers"]
    assert container["image"] == "localhost/kleidi:0.1.0" and container["imagePullPolicy"] == "IfNotPresent"
    assert container["args"] == ["serve", "--config", "/etc/kleidi/config.yaml"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    privileged = values is not None and values.name == "tpm-privileged-values.yaml"
    assert sc.get("privileged", False) is privileged
    assert sc.get("allowPrivilegeEscalation") is (None if privileged else False)
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"host": "127.0.0.1", "port": 9464, "path": path, "scheme": "HTTP"}
    # the chart's defaults are the static pod's measured figures (one measurement, bench/resources.py)
    assert container["resources"]["requests"] == static_pod.REQUESTS
    assert container["resources"]["limits"]["memory"] == static_pod.LIMITS["memory"]
    assert "cpu" not in container["resources"]["limits"]  # throttling would stall the apiserver's calls
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes["socket-dir"]["hostPath"] == {"path": "/var/run/kleidi", "type": "DirectoryOrCreate"}
    assert not mounts["/var/run/kleidi"].get("readOnly", False)
    assert mounts["/etc/kleidi"]["readOnly"] is True and "configMap" in volumes["config"]
    assert not any("secret" in v or "projected" in v for v in volumes.values())
    # every host path the example names is mounted at the same path: read-only unless listed as writable
    example = yaml.safe_load(values.read_text()) if values else yaml.safe_load((CHART / "values.yaml").read_text())
    for entry in example.get("hostMounts", []):
        assert volumes[f"host-{entry['name']}"]["hostPath"]["path"] == entry["path"]
        assert mounts[entry["path"]]["readOnly"] is True
    for entry in example.get("writableHostMounts", []):
        assert not mounts[entry["path"]].get("readOnly", False)


def test_tpm_device_access() -> None:
    plugin = _daemonset(render({}, CHART / "ci" / "tpm-values.yaml"))["spec"]["template"]["spec"]
    assert plugin["containers"][0]["resources"]["limits"]["squat.ai/tpm"] == "1"
    assert not any(v["name"] == "tpm-device" for v in plugin["volumes"])
    privileged = _daemonset(render({}, CHART / "ci" / "tpm-privileged-values.yaml"))["spec"]["template"]["spec"]
    assert {"name": "tpm-device", "hostPath": {"path": "/dev/tpmrm0", "type": "CharDevice"}} in privileged["volumes"]
    assert {"name": "tpm-device", "mountPath": "/dev/tpmrm0"} in privileged["containers"][0]["volumeMounts"]
    # a TPM config without device access would start a pod that cannot see the TPM: refused with the fix
    result = template("-f", str(CHART / "ci" / "tpm-values.yaml"), "--set", "tpm.deviceAccess=none", check=False)
    assert result.returncode != 0 and "tpm.deviceAccess" in result.stderr and "devicePlugin" in result.stderr


def test_secret_credentials_refused_without_acknowledgement() -> None:
    result = template("--set", "secretCredentials.secretName=vault-approle", check=False)
    assert result.returncode != 0
    assert "secretCredentials.secretName" in result.stderr and "acknowledgeSecretDependency" in result.stderr
    assert "cold boot" in result.stderr
    objects = render({"secretCredentials": {"secretName": "vault-approle"}, "acknowledgeSecretDependency": True})
    pod = _daemonset(objects)["spec"]["template"]["spec"]
    assert {"name": "secret-credentials", "secret": {"secretName": "vault-approle", "defaultMode": 0o400}} in (
        pod["volumes"])


def test_endpoint_outside_socket_dir_refused() -> None:
    result = template("--set", "config.server.endpoint=unix:///tmp/kleidi.sock", check=False)
    assert result.returncode != 0 and "socketHostPath" in result.stderr and "config.server.endpoint" in result.stderr


def test_host_mount_without_type() -> None:
    pod = _daemonset(render({"hostMounts": [{"name": "keys", "path": "/srv/keys"}]}))["spec"]["template"]["spec"]
    assert {"name": "host-keys", "hostPath": {"path": "/srv/keys"}} in pod["volumes"]
    assert {"name": "host-keys", "mountPath": "/srv/keys", "readOnly": True} in pod["containers"][0]["volumeMounts"]


def test_host_path_config() -> None:
    objects = render({"configSource": "hostPath"})
    assert "ConfigMap" not in _by_kind(objects)
    volumes = {v["name"]: v for v in _daemonset(objects)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"] == {"name": "config", "hostPath": {"path": "/etc/kleidi", "type": "Directory"}}


@pytest.mark.parametrize(("args", "field", "why"), [
    (["--set", "config.backend.kind=nope"], "/config/backend/kind", "value must be"),
    (["--set", "config.server.socket_mode=600"], "/config/server/socket_mode", "got number, want string"),
    (["--set", "bogus=1"], "'bogus' not allowed", "additional properties"),
    (["--set", "config.telemetry.bogus=1"], "/config/telemetry", "'bogus' not allowed"),
    (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy", "value must be one of"),
    (["--set", "tpm.deviceAccess=maybe"], "/tpm/deviceAccess", "value must be one of"),
    (["--set", "hostMounts[0].name=x,hostMounts[0].path=relative"], "/hostMounts/0/path", "does not match"),
])
def test_schema_refuses_bad_values_naming_the_field(args: list[str], field: str, why: str) -> None:
    result = template(*args, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert field in result.stderr and why in result.stderr, result.stderr


def test_monitoring_objects() -> None:
    kinds = _by_kind(render({}, CHART / "ci" / "monitoring-values.yaml"))
    assert kinds["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "metrics"
    assert kinds["ServiceMonitor"]["metadata"]["labels"]["release"] == "prometheus"
    assert kinds["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert kinds["Service"]["spec"]["clusterIP"] == "None"
    assert not {"ServiceMonitor", "PodMonitor", "Service"} & set(_by_kind(render({})))


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda p: p.name if p else "defaults")
def test_every_object_is_accepted_by_the_apiserver(values: Path | None, apiserver: KubeAPIServer) -> None:
    out = template(*(["-f", str(values)] if values else [])).stdout
    rendered = [doc for doc in yaml.safe_load_all(out) if doc]
    result = apiserver.kubectl("apply", "--dry-run=server", "-o", "yaml", "-f", "-", input=out)
    accepted = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    items = accepted[0]["items"] if len(accepted) == 1 and accepted[0]["kind"] == "List" else accepted
    assert sorted(o["kind"] for o in items) == sorted(o["kind"] for o in rendered)
    ds = next(o for o in items if o["kind"] == "DaemonSet")
    want = _daemonset(rendered)["spec"]["template"]["spec"]
    got = ds["spec"]["template"]["spec"]
    assert got["securityContext"] == want["securityContext"]
    assert got["containers"][0]["securityContext"] == want["containers"][0]["securityContext"]
    assert got["hostNetwork"] is True and got["enableServiceLinks"] is False
