"""kleidi on a real kubelet: kube-apiserver and kleidi as static pods, the Helm chart's DaemonSet, cold starts.

One node per module (tests/deploy/kubelet.py): containerd, a kubelet registered with the apiserver it
runs from a static pod, etcd on the host, kube-scheduler and kube-controller-manager. The tests run in
order on that node; each leaves it serving for the next.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from kleidi._proto.kmsv2 import api_pb2 as v2_pb
from kleidi._proto.kmsv2 import api_pb2_grpc as v2_grpc
from tests.conftest import keygen, run_kleidi
from tests.deploy.helm import CHART, helm
from tests.deploy.images import ImageArtifacts, kleidi_image
from tests.deploy.kubelet import (
    APISERVER_IMAGE,
    KLEIDI_UID,
    NODE_NAME,
    PAUSE_IMAGE,
    Node,
    StaticAPIServer,
    apiserver_image,
    kube_binaries,
    node_dir,
    pause_image,
    wait_until,
)
from tests.e2e.test_kube_apiserver import assert_encrypted, assert_reads_back, create_secrets
from tests.support import free_port

pytestmark = pytest.mark.e2e

DAEMONSET_NAMESPACE = "kleidi-system"
DAEMONSET_SELECTOR = "app.kubernetes.io/name=kleidi"


def kleidi_status(socket: Path, timeout: float = 3) -> v2_pb.StatusResponse:
    """KMS v2 Status over kleidi's socket, called from the host as root (an allowed caller)."""
    with grpc.insecure_channel(f"unix://{socket}", options=[("grpc.default_authority", "localhost")]) as channel:
        stub = v2_grpc.KeyManagementServiceStub(channel)  # type: ignore[no-untyped-call]
        response: v2_pb.StatusResponse = stub.Status(v2_pb.StatusRequest(), timeout=timeout)
        return response


def serving(socket: Path) -> bool:
    try:
        return bool(socket.exists() and kleidi_status(socket, timeout=2).healthz == "ok")
    except grpc.RpcError:
        return False


class KleidiHost:
    """kleidi's host side, kubeadm-style but under the node's directory: a config directory, a keyring
    directory (owned by 10001, mode 0700) and the socket directory shared with kube-apiserver. Host paths
    are mounted at the same paths in the container, so the config names host paths."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.etc = workdir / f"{name}-etc"
        self.lib = workdir / f"{name}-lib"
        self.run = workdir / f"{name}-run"
        for path in (self.etc, self.lib, self.run):
            path.mkdir()
        self.port = free_port()
        keygen(self.lib / "keyring.json")
        for path in (self.lib, self.lib / "keyring.json", self.run):
            os.chown(path, KLEIDI_UID, KLEIDI_UID)
        self.lib.chmod(0o700)
        self.run.chmod(0o750)
        self.config = self.etc / "config.yaml"
        self.config.write_text(yaml.safe_dump(self.settings()))

    def settings(self) -> dict[str, Any]:
        return {"server": {"endpoint": self.endpoint},
                "telemetry": {"address": f"127.0.0.1:{self.port}"},
                "backend": {"kind": "local", "keyring": str(self.lib / "keyring.json")}}

    @property
    def socket(self) -> Path:
        return self.run / "kleidi.sock"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"


def kleidi_manifest(host: KleidiHost, image: str) -> str:
    """kleidi's static pod exactly as `kleidi deploy static-pod` renders it for this config and image."""
    result = run_kleidi("deploy", "static-pod", "--config", str(host.config), "--image", image)
    assert result.returncode == 0, result.stderr
    return result.stdout


def chart_objects(host: KleidiHost, image: ImageArtifacts) -> str:
    """The Helm chart's objects from a real `helm template`, with values for a second kleidi on the node:
    its own socket directory, keyring directory and health port, the same image."""
    values = {
        "image": {"repository": image.reference.rsplit(":", 1)[0], "tag": image.version},
        "config": host.settings(),
        "socketHostPath": str(host.run),
        "hostMounts": [{"name": "keyring", "path": str(host.lib), "type": "Directory"}],
    }
    values_file = host.etc / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    return helm("template", "kleidi", str(CHART), "--namespace", DAEMONSET_NAMESPACE, "-f", str(values_file)).stdout


class Cluster:
    """The node with its two static pods, as the tests see it."""

    def __init__(self, node: Node, api: StaticAPIServer, kleidi: KleidiHost, kleidi_pod: str,
                 image: ImageArtifacts) -> None:
        self.node, self.api, self.kleidi, self.kleidi_pod, self.image = node, api, kleidi, kleidi_pod, image
        self.secrets: dict[str, dict[str, bytes]] = {}
        self.daemonset: KleidiHost | None = None  # set once the Helm chart's DaemonSet runs

    def daemonset_pod(self, not_container: str | None = None) -> dict[str, Any] | None:
        """The DaemonSet's one pod once it is Running and Ready (in a container other than
        ``not_container``, so that a status from before a crash does not count), else None."""
        result = self.api.kubectl("get", "pods", "-n", DAEMONSET_NAMESPACE, "-l", DAEMONSET_SELECTOR,
                                  "-o", "json", check=False)
        if result.returncode != 0:
            return None
        pods = json.loads(result.stdout)["items"]
        if len(pods) == 1 and pods[0]["status"].get("phase") == "Running" and self.ready(pods[0]):
            if container_id(pods[0]) != not_container:
                return dict(pods[0])
        return None

    def pod(self, name: str, namespace: str = "kube-system") -> dict[str, Any]:
        result = self.api.kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else {}

    def ready(self, pod: dict[str, Any]) -> bool:
        conditions = pod.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def node_ready(self) -> bool:
        result = self.api.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        if result.returncode != 0:
            return False
        return self.ready(json.loads(result.stdout))

    def kleidi_pid(self) -> int | None:
        return self.node.container_pid("kleidi", "kleidi")

    def wait_serving(self, timeout: float = 120) -> None:
        wait_until(lambda: serving(self.kleidi.socket), timeout, "kleidi serving Status on its socket")
        self.api.wait_ready(timeout)

    def fail(self, message: str) -> str:
        return f"{message}\n{self.node.logs()}"


def container_id(pod: dict[str, Any]) -> str | None:
    statuses = pod.get("status", {}).get("containerStatuses") or [{}]
    value = statuses[0].get("containerID")
    return str(value) if value else None


def process_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def assert_rootless(pid: int) -> None:
    """uid and gid 10001 (all four ids), no capabilities at all, no_new_privs, seccomp filtering."""
    status = process_status(pid)
    assert status["Uid"].split() == [str(KLEIDI_UID)] * 4
    assert status["Gid"].split() == [str(KLEIDI_UID)] * 4
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    binaries = kube_binaries()
    image = kleidi_image()
    images = {PAUSE_IMAGE: pause_image(), APISERVER_IMAGE: apiserver_image(binaries["kube-apiserver"]),
              image.reference: image.archive}
    with node_dir() as workdir:
        node = Node(workdir, binaries)
        try:
            node.start_containerd()
            node.import_images(images)
            kleidi = KleidiHost(workdir, "kleidi")
            encryption = node.control / "encryption-config.yaml"
            result = run_kleidi("encryption-config", "--name", "kleidi", "--endpoint", kleidi.endpoint,
                                "--resources", "secrets")
            assert result.returncode == 0, result.stderr
            encryption.write_text(result.stdout)
            node.etcd.start()
            api = node.prepare_apiserver(encryption, kleidi.run, str(kleidi.run))
            kleidi_pod = kleidi_manifest(kleidi, image.reference)
            node.write_static_pod("kleidi", kleidi_pod)
            node.write_static_pod("kube-apiserver", api.manifest())
            node.start_kubelet()
            cluster = Cluster(node, api, kleidi, kleidi_pod, image)
            try:
                cluster.wait_serving(180)
            except AssertionError as exc:
                raise AssertionError(cluster.fail(str(exc))) from None
            node.start_controllers()
            yield cluster
        finally:
            node.stop()


def test_static_pods_encrypt_secrets_in_etcd(cluster: Cluster) -> None:
    """kube-apiserver and kleidi (kleidi's image, the manifest from `kleidi deploy static-pod`) run as
    static pods; Secrets written through that apiserver are encrypted in etcd by kleidi and read back;
    kleidi runs as 10001 with no capabilities."""
    api, node = cluster.api, cluster.node
    wait_until(lambda: all(cluster.ready(cluster.pod(f"{name}-{NODE_NAME}")) for name in ("kleidi", "kube-apiserver")),
               60, "both mirror pods Ready")
    mirror = cluster.pod(f"kleidi-{NODE_NAME}")
    assert mirror["spec"]["containers"][0]["image"] == cluster.image.reference
    cluster.secrets = create_secrets(api, [f"static-{i}" for i in range(5)])
    key_id = kleidi_status(cluster.kleidi.socket).key_id
    for name, data in cluster.secrets.items():
        assert_encrypted(node.etcd.get(f"/registry/secrets/default/{name}"), data, key_id)
    assert_reads_back(api, cluster.secrets)
    pid = cluster.kleidi_pid()
    assert pid is not None
    assert_rootless(pid)


def test_kubelet_restarts_a_killed_kleidi(cluster: Cluster) -> None:
    """kleidi's process SIGKILLed: the kubelet restarts its container, kleidi serves again, and the
    apiserver keeps reading and writing Secrets."""
    api = cluster.api
    pid = cluster.kleidi_pid()
    assert pid is not None
    before = cluster.pod(f"kleidi-{NODE_NAME}")["status"]["containerStatuses"][0]["restartCount"]
    os.kill(pid, signal.SIGKILL)
    new_pid = wait_until(lambda: (p := cluster.kleidi_pid()) is not None and p != pid and p, 60,
                         "a new kleidi container")
    wait_until(lambda: serving(cluster.kleidi.socket), 60, "the restarted kleidi serving")
    assert new_pid != pid
    wait_until(lambda: cluster.pod(f"kleidi-{NODE_NAME}")["status"]["containerStatuses"][0]["restartCount"] > before,
               60, "the mirror pod counting the restart")
    assert_reads_back(api, cluster.secrets)
    more = create_secrets(api, ["after-kill"])
    assert_reads_back(api, more)
    cluster.secrets.update(more)


def test_helm_chart_daemonset_serves_on_the_node(cluster: Cluster) -> None:
    """The Helm chart's DaemonSet (real `helm template`, applied with kubectl) gets a pod on the
    control-plane node through the scheduler and the DaemonSet controller; the pod runs kleidi's image
    rootless, turns Ready on kleidi's own /readyz and its socket answers a KMS v2 Status."""
    api, node = cluster.api, cluster.node
    try:
        wait_until(cluster.node_ready, 90, f"node {NODE_NAME} Ready")
    except AssertionError as exc:
        raise AssertionError(cluster.fail(str(exc))) from None
    # What kubeadm does for a control-plane node; the chart's default nodeSelector needs it.
    api.kubectl("label", "node", NODE_NAME, "node-role.kubernetes.io/control-plane=", "--overwrite")
    api.kubectl("create", "namespace", DAEMONSET_NAMESPACE)
    host = KleidiHost(node.workdir, "ds")
    api.kubectl("apply", "-f", "-", input=chart_objects(host, cluster.image))
    try:
        pod = wait_until(cluster.daemonset_pod, 180, "the DaemonSet's pod Running and Ready")
        wait_until(lambda: serving(host.socket), 30, "the DaemonSet's kleidi serving Status")
    except AssertionError as exc:
        raise AssertionError(cluster.fail(str(exc))) from None
    assert pod["spec"]["nodeName"] == NODE_NAME
    assert pod["spec"]["containers"][0]["image"] == cluster.image.reference
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet"
    status = kleidi_status(host.socket)
    assert status.key_id and status.key_id != kleidi_status(cluster.kleidi.socket).key_id  # its own keyring
    pid = node.container_pid("kleidi", "kleidi", namespace=DAEMONSET_NAMESPACE)
    assert pid is not None
    assert_rootless(pid)
    cluster.daemonset = host


@pytest.mark.parametrize("order", ["together", "kleidi-first", "apiserver-first"])
def test_cold_start_of_the_whole_node(cluster: Cluster, order: str) -> None:
    """Power cut: kubelet, containerd, every container, etcd and the controllers killed. The node's
    daemons come back (etcd, containerd, then the kubelet, as systemd orders them) with the static pod
    manifests in place and the node recovers by itself: apiserver Ready, every Secret readable (its
    cache is empty, so each read needs kleidi's Decrypt), the DaemonSet's pod running again.

    ``together``: both manifests present at boot. ``kleidi-first``: the apiserver's manifest comes back
    only once kleidi serves, so kleidi is shown to start with no apiserver anywhere. ``apiserver-first``:
    kleidi's manifest comes back only once the apiserver's container runs and answers HTTPS (its KMS
    provider not ready), and the apiserver recovers in that same container, without a restart."""
    node, api = cluster.node, cluster.api
    held: tuple[str, dict[str, Any] | str] | None = None
    if order == "kleidi-first":
        held = ("kube-apiserver", api.manifest())
    elif order == "apiserver-first":
        held = ("kleidi", cluster.kleidi_pod)
    before = None
    if cluster.daemonset is not None:
        before = wait_until(cluster.daemonset_pod, 60, "the DaemonSet's pod Ready before the power cut")
    node.crash()
    if held is not None:
        (node.manifests / f"{held[0]}.yaml").unlink()
    assert not cluster.kleidi.socket.exists() or not serving(cluster.kleidi.socket)
    node.boot()
    apiserver_pid: int | None = None
    try:
        if order == "kleidi-first":
            wait_until(lambda: serving(cluster.kleidi.socket), 120, "kleidi serving with no apiserver")
            assert api.get_or_none("/livez") is None, "an apiserver answered while its manifest was held back"
        elif order == "apiserver-first":
            # Answering at all is enough: /livez itself stays 500 until its storage is ready, which
            # waits on the KMS provider (docs/e2e.md).
            wait_until(lambda: api.get_or_none("/readyz/kms-providers") is not None, 120,
                       "the apiserver answering HTTPS with no kleidi")
            status, body = api.get("/readyz/kms-providers")
            assert status != 200, body
            assert not serving(cluster.kleidi.socket)
            apiserver_pid = node.container_pid("kube-apiserver", "kube-apiserver")
            assert apiserver_pid is not None
        if held is not None:
            node.write_static_pod(*held)
        cluster.wait_serving(180)
    except AssertionError as exc:
        raise AssertionError(cluster.fail(str(exc))) from None
    if apiserver_pid is not None:
        assert node.container_pid("kube-apiserver", "kube-apiserver") == apiserver_pid, "the apiserver restarted"
    assert_reads_back(api, cluster.secrets)
    more = create_secrets(api, [f"after-cold-start-{order}"])
    key_id = kleidi_status(cluster.kleidi.socket).key_id
    for name, data in more.items():
        assert_encrypted(node.etcd.get(f"/registry/secrets/default/{name}"), data, key_id)
    cluster.secrets.update(more)
    daemonset = cluster.daemonset
    if daemonset is not None:
        try:
            old = container_id(before or {})
            wait_until(lambda: cluster.daemonset_pod(not_container=old), 120,
                       "the DaemonSet's pod Running and Ready again, in a new container")
            wait_until(lambda: serving(daemonset.socket), 30, "the DaemonSet's kleidi serving again")
        except AssertionError as exc:
            raise AssertionError(cluster.fail(str(exc))) from None
