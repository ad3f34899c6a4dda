"""The chart under test (charts/kleidi) and a real helm: the binary built by scripts/build-go-tool.sh (cached in
~/.cache/kleidi/bin, so only the first call on a machine builds it) and ``render(values)``."""

from __future__ import annotations

import functools
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kleidi"
HELM_MODULE = "helm.sh/helm/v3@v3.22.0"
HELM_PACKAGE = "helm.sh/helm/v3/cmd/helm"
PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"


@functools.cache
def helm_binary() -> str:
    result = subprocess.run([str(ROOT / "scripts" / "build-go-tool.sh"), "helm", HELM_MODULE, HELM_PACKAGE],
                            capture_output=True, text=True, timeout=900, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"building helm failed: {result.stderr}")
    return result.stdout.strip().splitlines()[-1]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs helm with a private home (no repositories, no plugins, nothing from the machine)."""
    with tempfile.TemporaryDirectory(prefix="helm-home-") as home:
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "HELM_CACHE_HOME": f"{home}/cache",
               "HELM_CONFIG_HOME": f"{home}/config", "HELM_DATA_HOME": f"{home}/data"}
        result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120, env=env,
                                check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {result.stderr}")
    return result


def template(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return helm("template", "kleidi", str(CHART), "--namespace", "kube-system", *args, check=check)


def render(values: dict[str, Any] | None = None, *values_files: Path) -> list[dict[str, Any]]:
    """The objects `helm template` renders for these values (files first, then ``values`` on top)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as extra:
        yaml.safe_dump(values or {}, extra)
        extra.flush()
        args = [arg for path in values_files for arg in ("-f", str(path))]
        out = template(*args, "-f", extra.name).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@functools.cache
def prometheus_operator_crds() -> dict[str, Path]:
    """ServiceMonitor and PodMonitor CRDs from prometheus-operator's published manifests, through the Go module
    proxy (`go mod download`, cached in the Go module cache)."""
    result = subprocess.run(["go", "mod", "download", "-json", PROMETHEUS_OPERATOR], capture_output=True,
                            text=True, timeout=600, check=False, cwd=tempfile.gettempdir())
    if result.returncode != 0:
        raise RuntimeError(f"go mod download {PROMETHEUS_OPERATOR} failed: {result.stdout} {result.stderr}")
    directory = Path(json.loads(result.stdout)["Dir"]) / "example" / "prometheus-operator-crd"
    return {kind: directory / f"monitoring.coreos.com_{kind.lower()}s.yaml" for kind in ("ServiceMonitor",
                                                                                         "PodMonitor")}
