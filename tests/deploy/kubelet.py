"""A real Kubernetes node for the deployment tests: containerd, a kubelet, and the control plane around it.

What users run on a kubeadm-style control-plane node is a kubelet that starts kube-apiserver and kleidi
as static pods. This harness builds that on one machine, in one private directory, on loopback:

- containerd 1.6 (Debian) with its own root, state and socket, the CRI plugin on the native snapshotter
  and runc with cgroupfs, ``restrict_oom_score_adj`` (runc cannot lower a sandbox's oom_score_adj
  otherwise), a minimal CNI config so the runtime reports its network ready (hostNetwork pods never call
  a CNI plugin, so no plugin binary is installed);
- images made here with umoci and imported with ctr: the pause image (``build/pause/linux/pause.c`` of
  the k8s.io/kubernetes module, compiled statically) and a kube-apiserver image (the cached binary
  plus the two glibc files it links); kleidi's image comes from tests/deploy/images.py;
- etcd as a host process (tests/e2e/cluster.py), as an external etcd;
- a kubelet (cgroupfs, ``failCgroupV1: false``: these hosts run hybrid cgroups) registered with the
  apiserver it runs, as kubeadm sets one up; kube-scheduler and kube-controller-manager as host
  processes, so that a DaemonSet gets a pod on this node.

Everything is stopped by pid, containers killed through ctr, mounts under the directory unmounted,
and the directory removed, also when a test fails.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization  # noqa: TID251
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: TID251
from cryptography.x509.oid import NameOID

from tests.conftest import wait_for
from tests.e2e.cluster import KUBE_VERSION, ROOT, Etcd, KubeAPIServer
from tests.support import free_port, stop_process

CACHE = Path(os.environ.get("KUBE_APISERVER_CACHE", str(Path.home() / ".cache" / "kleidi")))
PAUSE_IMAGE = "registry.k8s.io/pause:3.10.2"
APISERVER_IMAGE = f"localhost/kube-apiserver:{KUBE_VERSION}"
NODE_NAME = "kleidi-node"
NAMESPACE = "k8s.io"  # containerd's namespace for the CRI plugin
KLEIDI_UID = 10001


def run(*args: str, timeout: float = 300, check: bool = True, env: dict[str, str] | None = None,
        cwd: Path | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False,
                            env=env, cwd=cwd, input=input)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """tests.conftest.wait_for, polling less often: most predicates here run kubectl, crictl or ctr."""
    return wait_for(predicate, timeout, what, interval)


def kube_binaries() -> dict[str, str]:
    """The four Kubernetes binaries at KUBE_VERSION, built once per machine by scripts/build-kube.sh."""
    names = ["kube-apiserver", "kubelet", "kube-scheduler", "kube-controller-manager"]
    result = run("bash", str(ROOT / "scripts" / "build-kube.sh"), KUBE_VERSION, *names, timeout=3000)
    return dict(zip(names, result.stdout.strip().splitlines()[-len(names):], strict=True))


def pause_binary() -> Path:
    """The pause container's binary, compiled from the k8s.io/kubernetes module's own source."""
    out = CACHE / f"pause-{KUBE_VERSION}"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "GOFLAGS": "-mod=mod"}
        info = json.loads(run("go", "mod", "download", "-json", f"k8s.io/kubernetes@{KUBE_VERSION}", env=env,
                              cwd=Path(work), timeout=1800).stdout)
        source = Path(info["Dir"]) / "build" / "pause" / "linux" / "pause.c"
        CACHE.mkdir(parents=True, exist_ok=True)
        run("gcc", "-Os", "-static", "-Wall", "-Werror", f"-DVERSION={KUBE_VERSION}", "-o", f"{out}.tmp",
            str(source))
        os.replace(f"{out}.tmp", out)
    return out


def build_oci_archive(out: Path, files: dict[str, Path], entrypoint: list[str], user: str) -> Path:
    """An OCI archive (one tag, "image") holding exactly ``files`` (path in the image -> host file)."""
    with tempfile.TemporaryDirectory() as work:
        layout, bundle = Path(work) / "layout", Path(work) / "bundle"
        ref = f"{layout}:image"
        run("umoci", "init", "--layout", str(layout))
        run("umoci", "new", "--image", ref)
        run("umoci", "unpack", "--rootless", "--image", ref, str(bundle))
        rootfs = bundle / "rootfs"
        for target, source in files.items():
            dest = rootfs / target.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest, follow_symlinks=True)
        run("umoci", "repack", "--image", ref, str(bundle))
        config = ["--config.user", user]
        for arg in entrypoint:
            config += ["--config.entrypoint", arg]
        run("umoci", "config", "--image", ref, *config)
        run("umoci", "gc", "--layout", str(layout))
        run("tar", "-C", str(layout), "-cf", f"{out}.tmp", ".")
        os.replace(f"{out}.tmp", out)
    return out


def pause_image() -> Path:
    out = CACHE / f"pause-image-{KUBE_VERSION}.oci.tar"
    if not out.exists():
        build_oci_archive(out, {"/pause": pause_binary()}, ["/pause"], "65535:65535")
    return out


def apiserver_image(binary: str) -> Path:
    """kube-apiserver in an image: the binary and the dynamic loader and libc it links (ldd), nothing else."""
    out = CACHE / f"kube-apiserver-image-{KUBE_VERSION}.oci.tar"
    if out.exists() and out.stat().st_mtime >= Path(binary).stat().st_mtime:
        return out
    files = {"/usr/local/bin/kube-apiserver": Path(binary)}
    for line in run("ldd", binary).stdout.splitlines():
        parts = line.split()
        path = next((p for p in parts if p.startswith("/")), None)
        if path is not None:
            files[path] = Path(path)
            files[str(Path(path).resolve())] = Path(path)
    build_oci_archive(out, files, ["/usr/local/bin/kube-apiserver"], "0:0")
    return out


class Containerd:
    """containerd with a private root, state and socket; the CRI plugin set up for this host."""

    def __init__(self, workdir: Path, pause: str) -> None:
        self.dir = workdir / "containerd"
        self.socket = self.dir / "c.sock"
        self.config = self.dir / "config.toml"
        self.log_path = workdir / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        cni = self.dir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "bin").mkdir(exist_ok=True)
        # The CRI plugin reports NetworkReady once it has loaded a network config; hostNetwork pods never
        # call the plugin, so none is installed.
        (cni / "net.d" / "10-hostnetwork-only.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "hostnetwork-only",
            "plugins": [{"type": "bridge", "bridge": "kleidi0", "ipam": {}}]}))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        self.config.write_text(f"""version = 2
root = "{self.dir / 'root'}"
state = "{self.dir / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.dir / 'opt'}"
[{cri}]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "{free_port()}"
  enable_selinux = false
[{cri}.containerd]
  snapshotter = "native"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  BinaryName = "{shutil.which('runc') or '/usr/sbin/runc'}"
[{cri}.cni]
  bin_dir = "{cni / 'bin'}"
  conf_dir = "{cni / 'net.d'}"
""")

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["containerd", "--config", str(self.config)], stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()
        wait_until(lambda: self.ctr("version", check=False).returncode == 0, 30, "containerd to answer")

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run("ctr", "--address", str(self.socket), "--namespace", NAMESPACE, *args, check=check,
                   timeout=timeout)

    def import_image(self, archive: Path, name: str) -> None:
        """Import an OCI archive under exactly ``name`` (ctr also adds an import-<date> name: dropped)."""
        self.ctr("images", "import", "--index-name", name, str(archive), timeout=600)
        for ref in self.ctr("images", "list", "--quiet").stdout.split():
            if ref.startswith("import-"):
                self.ctr("images", "remove", ref)

    def shim_pids(self) -> list[int]:
        """The runc shims serving this containerd (their command line names our socket)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and str(self.socket).encode() in argv:
                pids.append(int(proc.name))
        return pids

    def container_pids(self) -> list[int]:
        """Every process inside a container of this containerd: the shims' descendants."""
        shims = set(self.shim_pids())
        children: dict[int, list[int]] = {}
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    stat = (proc / "stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(proc.name))
        found: list[int] = []
        todo = [c for shim in shims for c in children.get(shim, [])]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def crash(self) -> None:
        """A power cut, as far as one host allows: every container, shim and containerd itself SIGKILLed."""
        for pid in self.container_pids() + self.shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """Kill every task, then containerd, then any shim left behind."""
        if self.proc is not None and self.proc.poll() is None:
            tasks = self.ctr("tasks", "list", "--quiet", check=False).stdout.split()
            for task in tasks:
                self.ctr("tasks", "kill", "--signal", "SIGKILL", task, check=False, timeout=30)
            stop_process(self.proc, 30)
        for pid in self.container_pids() + self.shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class Process:
    """One host process with its log, stopped by pid."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name, self.argv, self.log_path = name, argv, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, start_new_session=True)
        log.close()
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class StaticAPIServer(KubeAPIServer):
    """kube-apiserver run by the kubelet from a static pod manifest, with the e2e suite's flags.

    Its directory (certs, tokens, service-account keys, encryption config) is mounted into the pod at
    the same path, so the flags name the same files inside and out.
    """

    def __init__(self, workdir: Path, etcd: Etcd, encryption_config: Path, socket_dir: Path,
                 socket_mount: str) -> None:
        super().__init__(workdir, "apiserver", etcd, "/usr/local/bin/kube-apiserver", encryption_config,
                         automatic_reload=False)
        self.socket_dir, self.socket_mount = socket_dir, socket_mount

    def manifest(self) -> dict[str, Any]:
        shared = str(self.dir.parent)
        probe = {"httpGet": {"host": "127.0.0.1", "port": self.port, "path": "/livez", "scheme": "HTTPS"},
                 "initialDelaySeconds": 10, "periodSeconds": 10, "timeoutSeconds": 15, "failureThreshold": 8}
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "kube-apiserver", "namespace": "kube-system",
                         "labels": {"component": "kube-apiserver", "tier": "control-plane"}},
            "spec": {
                "hostNetwork": True, "priorityClassName": "system-node-critical",
                "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "kube-apiserver", "image": APISERVER_IMAGE, "imagePullPolicy": "Never",
                    "command": ["/usr/local/bin/kube-apiserver", *self.flags()],
                    "livenessProbe": probe,
                    "volumeMounts": [{"name": "control-plane", "mountPath": shared},
                                     {"name": "kleidi-socket", "mountPath": self.socket_mount}],
                }],
                "volumes": [{"name": "control-plane", "hostPath": {"path": shared, "type": "Directory"}},
                            {"name": "kleidi-socket", "hostPath": {"path": str(self.socket_dir),
                                                                   "type": "DirectoryOrCreate"}}],
            },
        }

    def start(self, wait: bool = True, ready_timeout: float = 120) -> KubeAPIServer:
        raise NotImplementedError("the kubelet starts this apiserver from its manifest")

    def wait_ready(self, timeout: float = 120, path: str = "/readyz") -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                if (self.dir / "certs" / "apiserver.crt").exists():
                    status, last = self.get(path, timeout=5)
                    if status == 200:
                        self._write_kubeconfig()
                        return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.5)
        raise AssertionError(f"kube-apiserver (static pod) not ready after {timeout:.0f}s: {last}")

    def get_or_none(self, path: str) -> tuple[int, str] | None:
        """The answer to a GET, or None when nothing answers on the apiserver's port."""
        try:
            return self.get(path, timeout=3)
        except OSError:
            return None

    def stop(self) -> None:
        pass  # the kubelet owns it


class Node:
    """One control-plane node: containerd, a kubelet with a static pod directory, and the control plane."""

    def __init__(self, workdir: Path, binaries: dict[str, str]) -> None:
        self.workdir = workdir
        self.binaries = binaries
        self.manifests = workdir / "manifests"
        self.manifests.mkdir()
        self.control = workdir / "control-plane"
        self.control.mkdir()
        self.containerd = Containerd(workdir, PAUSE_IMAGE)
        self.etcd = Etcd(self.control)
        self.kubelet_root = workdir / "kubelet"
        self.kubelet_root.mkdir()
        self.pod_logs = workdir / "pod-logs"
        self.pod_logs.mkdir()
        self.kubelet_config = workdir / "kubelet.yaml"
        self.kubelet: Process | None = None
        self.others: list[Process] = []
        self.apiserver: StaticAPIServer | None = None

    # containerd and images

    def start_containerd(self) -> None:
        self.containerd.start()

    def import_images(self, images: dict[str, Path]) -> None:
        """Import images (name -> OCI archive); containerd restarts so that the CRI plugin sees the names."""
        for name, archive in images.items():
            self.containerd.import_image(archive, name)
        self.containerd.stop()
        self.containerd.start()

    # the kubelet

    def write_kubelet_config(self) -> None:
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "staticPodPath": str(self.manifests), "fileCheckFrequency": "2s", "syncFrequency": "10s",
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [], "failSwapOn": False,
            "containerRuntimeEndpoint": self.containerd.endpoint, "podLogsDir": str(self.pod_logs),
            "address": "127.0.0.1", "port": free_port(), "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "nodeStatusUpdateFrequency": "5s", "nodeStatusReportFrequency": "10s",
            "registerNode": True, "makeIPTablesUtilChains": False,
        }
        self.kubelet_config.write_text(json.dumps(config))

    def start_kubelet(self) -> None:
        assert self.apiserver is not None
        self.write_kubelet_config()
        self.kubelet = Process("kubelet", [
            self.binaries["kubelet"], f"--config={self.kubelet_config}", f"--root-dir={self.kubelet_root}",
            f"--kubeconfig={self.apiserver.kubeconfig}", f"--hostname-override={NODE_NAME}",
            "--node-ip=127.0.0.1", f"--cert-dir={self.kubelet_root / 'pki'}", "--v=2",
        ], self.workdir / "kubelet.log").start()

    def stop_kubelet(self, sig: int = signal.SIGTERM) -> None:
        if self.kubelet is not None:
            self.kubelet.stop(sig)

    # the control plane around the node

    def prepare_apiserver(self, encryption_config: Path, socket_dir: Path, socket_mount: str) -> StaticAPIServer:
        """The apiserver's files and its kubeconfig, written before the kubelet first starts (as kubeadm does)."""
        self.apiserver = StaticAPIServer(self.control, self.etcd, encryption_config, socket_dir, socket_mount)
        write_serving_cert(self.apiserver.dir / "certs")
        self.apiserver._write_kubeconfig()
        return self.apiserver

    def start_controllers(self) -> None:
        """kube-scheduler and kube-controller-manager on loopback, with the admin kubeconfig."""
        assert self.apiserver is not None
        kubeconfig = str(self.apiserver.kubeconfig)
        self.others = [
            Process("kube-scheduler", [
                self.binaries["kube-scheduler"], f"--kubeconfig={kubeconfig}", "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}", "--leader-elect=false",
                f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            ], self.workdir / "kube-scheduler.log").start(),
            Process("kube-controller-manager", [
                self.binaries["kube-controller-manager"], f"--kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--leader-elect=false",
                f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
                "--controllers=daemonset,nodelifecycle,serviceaccount,garbagecollector",
                f"--service-account-private-key-file={self.control / 'sa.key'}",
            ], self.workdir / "kube-controller-manager.log").start(),
        ]

    # static pods

    def write_static_pod(self, name: str, manifest: dict[str, Any] | str) -> Path:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        path = self.manifests / f"{name}.yaml"
        tmp = self.workdir / f".{name}.yaml.tmp"
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def crictl_pods(self) -> list[dict[str, Any]]:
        """The CRI's view of the pod sandboxes (read from containerd with ctr, as no crictl is installed)."""
        out = self.containerd.ctr("containers", "list", "--quiet", check=False).stdout.split()
        return [{"id": c} for c in out]

    def container_pid(self, pod_prefix: str, container: str, namespace: str = "kube-system") -> int | None:
        """The host pid of a running container, found by its Kubernetes labels in containerd."""
        result = self.containerd.ctr("containers", "list", "--quiet", check=False)
        for cid in result.stdout.split():
            info = self.containerd.ctr("containers", "info", cid, check=False)
            if info.returncode != 0:
                continue
            labels = json.loads(info.stdout).get("Labels") or {}
            if (labels.get("io.kubernetes.container.name") == container
                    and labels.get("io.kubernetes.pod.namespace") == namespace
                    and labels.get("io.kubernetes.pod.name", "").startswith(pod_prefix)):
                task = self.containerd.ctr("tasks", "list", check=False).stdout
                for line in task.splitlines()[1:]:
                    parts = line.split()
                    if parts and parts[0] == cid and parts[2] == "RUNNING":
                        return int(parts[1])
        return None

    # power cut and boot

    def crash(self) -> None:
        """A power cut, as near as one host allows: every daemon and container SIGKILLed, then what a
        reboot clears: the mounts the containers left and containerd's state directory (a tmpfs under
        /run on a real node). Persistent state stays: containerd's root, the kubelet's root-dir, etcd's data."""
        for proc in [*self.others, *([self.kubelet] if self.kubelet else [])]:
            proc.stop(signal.SIGKILL)
        self.containerd.crash()
        if self.etcd.proc is not None and self.etcd.proc.poll() is None:
            self.etcd.proc.kill()
            self.etcd.proc.wait()
        unmount_under(self.workdir)
        shutil.rmtree(self.containerd.dir / "state", ignore_errors=True)

    def boot(self) -> None:
        """The node's daemons in systemd's order: etcd, containerd, the kubelet; then the controllers."""
        self.etcd.start()
        self.containerd.start()
        self.start_kubelet()
        for proc in self.others:
            proc.start()

    # teardown

    def stop(self) -> None:
        """Everything down, in the order a clean shutdown takes: pods first, then the node's daemons."""
        for proc in self.others:
            proc.stop()
        if self.kubelet is not None:
            self.kubelet.stop()
        self.containerd.stop()
        self.etcd.stop()
        unmount_under(self.workdir)

    def logs(self) -> str:
        parts = []
        for proc in [*( [self.kubelet] if self.kubelet else []), *self.others]:
            parts.append(f"--- {proc.name} ---\n{proc.log_tail()}")
        for path in sorted(self.pod_logs.rglob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-30:]
            parts.append(f"--- {path.relative_to(self.pod_logs)} ---\n" + "\n".join(text))
        return "\n".join(parts)


def write_serving_cert(cert_dir: Path) -> None:
    """A self-signed serving certificate for 127.0.0.1 where --cert-dir looks for one, so that the
    kubelet's kubeconfig can name its CA before the apiserver first runs."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_dir.mkdir(parents=True, exist_ok=True)
    (cert_dir / "apiserver.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (cert_dir / "apiserver.key").chmod(0o600)
    (cert_dir / "apiserver.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def unmount_under(path: Path) -> None:
    """Unmount everything mounted under ``path`` (deepest first): sandbox shm, kubelet volumes, rootfs."""
    prefix = str(path.resolve()) + "/"
    for _ in range(3):
        mounts = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                mounts.append(point)
        if not mounts:
            return
        for point in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


@contextlib.contextmanager
def node_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kl-node-", dir="/tmp"))
    path.chmod(0o700)
    try:
        yield path
    finally:
        unmount_under(path)
        shutil.rmtree(path, ignore_errors=True)
