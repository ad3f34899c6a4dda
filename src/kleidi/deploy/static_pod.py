"""The static pod manifest for kubeadm control planes (/etc/kubernetes/manifests/kleidi.yaml).

Rendered from the user's own kleidi settings, so that it mounts exactly what that config reads:
the config file's directory and the backend's files read-only, the socket directory (shared with
kube-apiserver) read-write, and nothing else writable but what kleidi itself must write (the audit
log, the TPM key store's lock). Host paths are mounted at the same paths inside the container, so
the config file works unchanged in both. docs/deploy/static-pod.md explains every setting.

kleidi must never need the apiserver to start: the pod uses no Secret, no ConfigMap, no
ServiceAccount token (automountServiceAccountToken: false) and no API call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from kleidi.errors import ConfigError

DEFAULT_IMAGE = "localhost/kleidi:0.1.0"
DEFAULT_CONFIG = Path("/etc/kleidi/config.yaml")
DEFAULT_NAME = "kleidi"
# A DNS label short enough for the mirror pod's name, <name>-<node name>, to stay a valid one too.
POD_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,38}[a-z0-9])?")
KLEIDI_UID = 10001
KLEIDI_GID = 10001

# Measured by `python -m bench.resources` (docs/deploy/static-pod.md#resources): kleidi serve holds 82-85 MiB
# (peak VmHWM at most 88.3 MiB, in kleidi's image, over start-up, idle and bursts of 5000 Encrypt/Decrypt/Status
# calls; local and Vault backends), uses 1-2 millicores at idle and 0.2-0.6 CPU seconds per 1000 calls. Memory
# request: steady RSS + 25 %; limit: twice the peak, at least 256Mi (PKCS#11 and TPM libraries were not measured;
# an OOM kill stops every Secret read on the node). CPU request 50m: kleidi's share when the node is busiest
# (apiserver start). No CPU limit: throttling a KMS plugin stalls every apiserver call that needs it.
REQUESTS = {"cpu": "50m", "memory": "112Mi"}
LIMITS = {"memory": "256Mi"}


def default_config_exists() -> bool:
    """Whether the default config file is on this host (else ``kleidi deploy static-pod`` uses the defaults)."""
    return DEFAULT_CONFIG.exists()


@dataclass(frozen=True)
class Mount:
    """One host path mounted into the container at the same path."""

    path: str
    host_type: str  # hostPath type: Directory, DirectoryOrCreate, File, CharDevice
    writable: bool = False
    why: str = ""


@dataclass
class _Plan:
    mounts: list[Mount] = field(default_factory=list)
    privileged: bool = False
    notes: list[str] = field(default_factory=list)

    def add(self, mount: Mount) -> None:
        for i, existing in enumerate(self.mounts):
            if existing.path == mount.path:
                if mount.writable and not existing.writable:
                    self.mounts[i] = mount
                return
        self.mounts.append(mount)


def _socket_dir(endpoint: str) -> str:
    path = endpoint.removeprefix("unix://")
    if not endpoint.startswith("unix:///") or path.startswith("/@"):
        raise ConfigError(f"server.endpoint {endpoint} is not a socket file; a static pod shares its socket with "
                          "kube-apiserver through a host directory",
                          fix="set server.endpoint to a path, e.g. unix:///var/run/kleidi/kleidi.sock")
    return str(PurePosixPath(path).parent)


def _health_port(address: str | None) -> int:
    if address is None:
        raise ConfigError("telemetry.address is null, so kleidi serves no /livez or /readyz for the kubelet's probes",
                          fix='set telemetry.address, e.g. "127.0.0.1:9464"')
    return int(address.rpartition(":")[2])


def _backend_mounts(plan: _Plan, backend: Any) -> None:
    kind = backend.kind
    if kind == "vault":
        auth = backend.auth
        if auth.method == "kubernetes":
            raise ConfigError("backend.auth.method kubernetes needs a ServiceAccount token, which a static pod "
                              "cannot have; kleidi must also never need the apiserver to start",
                              fix="use the token, approle or cert auth method with files on the host "
                                  "(docs/backends/vault.md)")
        for name in ("token_file", "role_id_file", "secret_id_file"):
            value = getattr(auth, name, None)
            if value is not None:
                plan.add(Mount(str(Path(value).parent), "Directory", why=f"backend.auth.{name}"))
    if kind == "pkcs11":
        if backend.pin_env is not None:
            raise ConfigError("backend.pin_env names an environment variable; a static pod could only set it in "
                              "the manifest, in the clear",
                              fix="set backend.pin_file to a file readable by uid 10001 only (mode 0600)")
        plan.add(Mount(str(backend.library), "File", why="backend.library (the PKCS#11 module)"))
        plan.notes.append("the PKCS#11 module must find its own libraries and token files inside the image or in "
                          "the mounts: add them with --mount")
    if kind == "tpm":
        # kleidi takes a lock file next to the key store (it creates it), so that directory is writable.
        plan.add(Mount(str(backend.key_store.parent), "Directory", writable=True,
                       why="backend.key_store (kleidi creates its lock file there)"))
        if backend.tcti.startswith("device"):
            device = backend.tcti.partition(":")[2] or "/dev/tpmrm0"
            plan.add(Mount(device, "CharDevice", writable=True, why="backend.tcti (the TPM device)"))
            plan.privileged = True
    # Every other file the backend reads (keyring, CA, client certificates, auth values, PINs):
    # its directory, read-only, so that a file replaced on the host (rotation) is seen at once.
    for name, value in _path_fields(backend):
        if kind == "pkcs11" and name == "library":
            continue
        plan.add(Mount(str(value.parent), "Directory", why=f"backend.{name}"))


def _path_fields(model: Any, prefix: str = "") -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path):
            found.append((prefix + name, value))
        elif hasattr(type(value), "model_fields"):
            found.extend(_path_fields(value, f"{prefix}{name}."))
    return found


def plan_mounts(settings: Any, config_file: Path, extra_mounts: tuple[str, ...] = ()) -> tuple[list[Mount], bool]:
    """The host paths a kleidi with these settings needs, and whether it must run privileged (a TPM device)."""
    plan = _Plan()
    plan.add(Mount(_socket_dir(settings.server.endpoint), "DirectoryOrCreate", writable=True,
                   why="server.endpoint (the socket shared with kube-apiserver)"))
    if settings.server.runtime_dir is not None:
        plan.add(Mount(str(settings.server.runtime_dir), "DirectoryOrCreate", writable=True,
                       why="server.runtime_dir"))
    plan.add(Mount(str(config_file.parent), "Directory", why="the config file"))
    _backend_mounts(plan, settings.backend)
    audit = settings.audit
    if audit.path is not None:
        plan.add(Mount(str(audit.path.parent), "DirectoryOrCreate", writable=True, why="audit.path"))
    if audit.anchor_path is not None:
        plan.add(Mount(str(audit.anchor_path.parent), "DirectoryOrCreate", writable=True, why="audit.anchor_path"))
    if audit.hmac_key_file is not None:
        plan.add(Mount(str(audit.hmac_key_file.parent), "Directory", why="audit.hmac_key_file"))
    for extra in extra_mounts:
        path, _, mode = extra.partition(":")
        if not path.startswith("/") or mode not in ("", "ro", "rw"):
            raise ConfigError(f"--mount {extra} is not PATH, PATH:ro or PATH:rw with an absolute PATH",
                              fix="e.g. --mount /etc/softhsm2.conf:ro")
        plan.add(Mount(path, "", writable=mode == "rw", why="--mount"))
    return plan.mounts, plan.privileged


def _volume_name(path: str, used: set[str]) -> str:
    base = "-".join(part for part in path.strip("/").lower().replace("_", "-").replace(".", "-").split("/") if part)
    base = ("host-" + base)[:55].rstrip("-") or "host-root"
    name, n = base, 2
    while name in used:
        name, n = f"{base}-{n}", n + 1
    used.add(name)
    return name


def render_manifest(settings: Any, config_file: Path = DEFAULT_CONFIG, image: str = DEFAULT_IMAGE,
                    namespace: str = "kube-system", extra_mounts: tuple[str, ...] = (),
                    supplemental_groups: tuple[int, ...] = (), pod_name: str = DEFAULT_NAME) -> dict[str, Any]:
    """The static pod, as a dict, for kleidi with ``settings`` read from ``config_file`` on the host."""
    if not POD_NAME.fullmatch(pod_name):
        raise ConfigError(f"--name {pod_name!r} is not a valid pod name",
                          fix="use lower-case letters, digits and '-', starting and ending with a letter or digit, "
                              "at most 40 characters (the kubelet appends the node's name), e.g. kleidi-vault")
    if not config_file.is_absolute():
        raise ConfigError(f"--config {config_file} is relative; the kubelet mounts host paths by absolute path",
                          fix=f"pass the absolute path, e.g. --config {DEFAULT_CONFIG}")
    if settings.server.lock_memory:
        raise ConfigError("server.lock_memory needs CAP_IPC_LOCK or a large RLIMIT_MEMLOCK, which this "
                          "rootless pod (no capabilities) does not have",
                          fix="set server.lock_memory: false for the static pod (and disable swap on the node), "
                              "or run kleidi from the systemd unit with LimitMEMLOCK=")
    port = _health_port(settings.telemetry.address)
    mounts, privileged = plan_mounts(settings, config_file, extra_mounts)

    def probe(path: str, **extra: int) -> dict[str, Any]:
        return {"httpGet": {"host": "127.0.0.1", "port": port, "path": path, "scheme": "HTTP"},
                "timeoutSeconds": 3, **extra}

    used: set[str] = set()
    volumes, volume_mounts = [], []
    for mount in mounts:
        name = _volume_name(mount.path, used)
        host_path: dict[str, Any] = {"path": mount.path}
        if mount.host_type:
            host_path["type"] = mount.host_type
        volumes.append({"name": name, "hostPath": host_path})
        volume_mounts.append({"name": name, "mountPath": mount.path, "readOnly": not mount.writable})

    container_security: dict[str, Any] = {
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    if privileged:
        # The kubelet has no device-cgroup rule for a static pod (no device plugins, no DRA claims): only
        # privileged opens /dev/tpmrm0. kleidi still runs as uid 10001 with no capabilities.
        container_security = {"privileged": True, "readOnlyRootFilesystem": True,
                              "capabilities": {"drop": ["ALL"]}}
    pod_security: dict[str, Any] = {
        "runAsNonRoot": True, "runAsUser": KLEIDI_UID, "runAsGroup": KLEIDI_GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if supplemental_groups:
        pod_security["supplementalGroups"] = list(supplemental_groups)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "kleidi", "app.kubernetes.io/component": "kms-plugin",
                       "tier": "control-plane"},
        },
        "spec": {
            "hostNetwork": True,
            "dnsPolicy": "Default",  # the node's resolv.conf: cluster DNS may not run yet
            "priorityClassName": "system-node-critical",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "securityContext": pod_security,
            "containers": [{
                "name": "kleidi",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "args": ["serve", "--config", str(config_file)],
                "securityContext": container_security,
                "resources": {"requests": dict(REQUESTS), "limits": dict(LIMITS)},
                "startupProbe": probe("/livez", periodSeconds=1, failureThreshold=60),
                "livenessProbe": probe("/livez", periodSeconds=10, failureThreshold=3),
                "readinessProbe": probe("/readyz", periodSeconds=10, failureThreshold=1),
                "volumeMounts": volume_mounts,
            }],
            "volumes": volumes,
        },
    }


HEADER = """\
# kleidi as a static pod: copy to /etc/kubernetes/manifests/{name}.yaml on each control-plane node.
# Made by `kleidi deploy static-pod{args}`; run it again for your own config
# (it mounts exactly the paths that config reads). docs/deploy/static-pod.md explains every field.
"""


def render_yaml(settings: Any, config_file: Path = DEFAULT_CONFIG, image: str = DEFAULT_IMAGE,
                namespace: str = "kube-system", extra_mounts: tuple[str, ...] = (),
                supplemental_groups: tuple[int, ...] = (), args: str = "", pod_name: str = DEFAULT_NAME) -> str:
    """The manifest as YAML, with a header comment naming the command that made it."""
    manifest = render_manifest(settings, config_file, image, namespace, extra_mounts, supplemental_groups, pod_name)
    return HEADER.format(args=args, name=pod_name) + yaml.safe_dump(manifest, sort_keys=False, width=120)
