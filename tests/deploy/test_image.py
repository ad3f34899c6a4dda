"""kleidi's container image (scripts/build-image.sh), checked as built and run as clusters run it.

Structure: the OCI archive is read directly (index, manifest, config, layers): user, labels, entrypoint,
what the root filesystem holds and who may write it, the SBOM against the Python distributions really in
the image. Behaviour: real podman runs the image as 10001:10001 with no capabilities, a read-only root
filesystem and no new privileges beside a real etcd and kube-apiserver; Secrets land encrypted in etcd;
the socket is reachable by a root apiserver and, through the socket group, a non-root one, and by no one
else.
"""

from __future__ import annotations

import base64
import errno
import gzip
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.utils import canonicalize_name

from tests.conftest import keygen, run_kleidi
from tests.deploy.images import (
    IMAGE_GID,
    IMAGE_UID,
    Container,
    ImageArtifacts,
    Podman,
    kleidi_image,
    podman_storage,
    run_container,
)
from tests.e2e.cluster import Etcd, KubeAPIServer, kube_apiserver_binary
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

SOCKET_GID = 10050  # the socket's group: a non-root apiserver's primary group
APISERVER_UID = 10002  # a non-root kube-apiserver, primary group SOCKET_GID
STRANGER_UID = 10003  # neither the user nor the group: the file mode refuses it
INSIDER_UID = 10004  # the socket group only as a supplementary group: caller authentication refuses it
SECRET_VALUE = "image-e2e-plaintext-9f3c"


@pytest.fixture(scope="module")
def image() -> ImageArtifacts:
    return kleidi_image()


# --- structure ------------------------------------------------------------------------------------

@dataclass
class Entry:
    mode: int  # permission bits incl. setuid/setgid/sticky
    kind: str  # "file", "dir", "symlink", "other"
    uid: int
    gid: int
    target: str = ""


@dataclass
class ImageContents:
    config: dict[str, Any]
    manifest: dict[str, Any]
    files: dict[str, Entry]  # "/usr/bin/kleidi" -> entry, after applying every layer
    texts: dict[str, bytes]  # the contents of the few files the tests read


def _read_image(archive: Path, wanted: tuple[str, ...]) -> ImageContents:
    with tarfile.open(archive) as outer:
        def blob(digest: str) -> bytes:
            member = outer.extractfile("./blobs/sha256/" + digest.removeprefix("sha256:"))
            assert member is not None
            return member.read()

        index_file = outer.extractfile("./index.json")
        assert index_file is not None
        index = json.load(index_file)
        assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == [VERSION]
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        files: dict[str, Entry] = {}
        texts: dict[str, bytes] = {}
        for layer in manifest["layers"]:
            data = blob(layer["digest"])
            if layer["mediaType"].endswith("gzip"):
                data = gzip.decompress(data)
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar:
                    path = "/" + member.name.removeprefix(".").lstrip("/").rstrip("/")
                    name = path.rsplit("/", 1)[-1]
                    if name.startswith(".wh."):  # whiteout: a later layer removed it
                        files.pop(path.rsplit("/", 1)[0] + "/" + name.removeprefix(".wh."), None)
                        continue
                    kind = ("file" if member.isreg() else "dir" if member.isdir() else
                            "symlink" if member.issym() else "other")
                    files[path] = Entry(member.mode, kind, member.uid, member.gid, member.linkname)
                    if path in wanted and member.isreg():
                        extracted = tar.extractfile(member)
                        assert extracted is not None
                        texts[path] = extracted.read()
    return ImageContents(config, manifest, files, texts)


@pytest.fixture(scope="module")
def contents(image: ImageArtifacts) -> ImageContents:
    return _read_image(image.archive, ("/usr/bin/kleidi", "/etc/passwd", "/etc/group"))


def test_config_user_entrypoint_and_labels(image: ImageArtifacts, contents: ImageContents) -> None:
    config = contents.config["config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_GID}"
    assert config["Entrypoint"] == ["/usr/bin/kleidi"]
    assert config["Cmd"] == ["serve", "--config", "/etc/kleidi/config.yaml"]
    assert config["WorkingDir"] == "/"
    assert "PATH=/usr/bin" in config["Env"]
    assert not any(var.startswith("KLEIDI_") for var in config["Env"])  # settings come from the mounted file
    assert contents.config["os"] == "linux" and contents.config["architecture"] == "amd64"
    labels = config["Labels"]
    prefix = "org.opencontainers.image."
    assert labels[prefix + "version"] == VERSION == image.version
    assert labels[prefix + "licenses"] == "Apache-2.0"
    assert labels[prefix + "source"].startswith("https://")
    revision = labels[prefix + "revision"]
    assert len(revision) == 40 and int(revision, 16) >= 0
    assert subprocess.run(["git", "cat-file", "-e", f"{revision}^{{commit}}"], cwd=ROOT, check=False).returncode == 0
    assert labels[prefix + "created"] == contents.config["created"].replace("+00:00", "Z")
    assert labels[prefix + "created"].endswith("Z")
    # The user exists by name inside (getpwuid works; logs and errors name it).
    assert b"kleidi:x:10001:10001:" in contents.texts["/etc/passwd"]
    assert b"kleidi:x:10001:" in contents.texts["/etc/group"]
    assert contents.texts["/usr/bin/kleidi"].startswith(b"#!/usr/bin/python3.11 -I\n")


SHELLS = {"sh", "bash", "dash", "ash", "zsh", "ksh", "mksh", "csh", "tcsh", "fish", "busybox", "toybox"}
PACKAGE_TOOLS = {"apt", "apt-get", "apt-cache", "apt-key", "aptitude", "dpkg", "dpkg-deb", "dpkg-query",
                 "pip", "pip3", "pip3.11", "easy_install", "ensurepip", "conda", "uv", "su", "sudo", "passwd"}
SCRATCH = {"/tmp"}  # sticky, world-writable by design (Python's tempfile)


def test_root_filesystem_has_no_shell_package_manager_setuid_or_writable_files(contents: ImageContents) -> None:
    files = contents.files
    # Every name something could execute: executable files and symlinks (wherever they are).
    names = {path.rsplit("/", 1)[-1]: path for path, entry in files.items()
             if entry.kind == "symlink" or (entry.kind == "file" and entry.mode & 0o111)}
    assert not SHELLS & names.keys(), f"shell in the image: {[names[n] for n in SHELLS & names.keys()]}"
    assert not PACKAGE_TOOLS & names.keys(), f"package tool in the image: {PACKAGE_TOOLS & names.keys()}"
    assert not [p for p in files if p.endswith("/ensurepip") or "/pip/" in p or p.endswith("/pip")]
    # The only programs: the interpreter and kleidi's entry point.
    programs = sorted(p for p in files if p.rsplit("/", 1)[0] in ("/usr/bin", "/bin", "/usr/sbin", "/sbin"))
    assert programs == ["/usr/bin/kleidi", "/usr/bin/python3", "/usr/bin/python3.11"], programs
    assert files["/usr/bin/python3"].kind == "symlink"
    setid = [p for p, e in files.items() if e.kind == "file" and e.mode & (stat.S_ISUID | stat.S_ISGID)]
    assert setid == []
    writable = []
    for path, entry in files.items():
        if entry.kind == "symlink" or path in SCRATCH:
            continue
        if (entry.uid == IMAGE_UID or entry.mode & stat.S_IWOTH
                or (entry.gid == IMAGE_GID and entry.mode & stat.S_IWGRP)):
            writable.append(f"{path} {entry.uid}:{entry.gid} {entry.mode:o}")
    assert writable == [], "writable by kleidi's user or by everyone"
    assert files["/tmp"].mode == 0o1777
    assert all(e.uid == 0 and e.gid == 0 for e in files.values())
    # The trust store the Vault backend uses without backend.tls.ca_file (OpenSSL's default paths).
    assert files["/usr/lib/ssl/cert.pem"].target == "/etc/ssl/certs/ca-certificates.crt"
    assert files["/etc/ssl/certs/ca-certificates.crt"].kind == "file"


def _distributions_in(contents: ImageContents) -> dict[str, str]:
    """name -> version of every *.dist-info directory in the image's dist-packages."""
    found: dict[str, str] = {}
    site = "/usr/lib/python3/dist-packages/"
    for path, entry in contents.files.items():
        if entry.kind == "dir" and path.startswith(site) and path.endswith(".dist-info") and path.count("/") == 5:
            name, version = path[len(site):].removesuffix(".dist-info").rsplit("-", 1)
            found[canonicalize_name(name)] = version
    return found


def test_sbom_lists_every_python_distribution_at_its_installed_version(image: ImageArtifacts,
                                                                       contents: ImageContents) -> None:
    sbom = json.loads(image.sbom.read_text())
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"].startswith("1.")
    listed = {canonicalize_name(c["name"]): c["version"] for c in sbom["components"]}
    installed = _distributions_in(contents)
    assert installed["kleidi"] == VERSION
    extras = {"aiohttp", "python-pkcs11", "tpm2-pytss"}  # vault, pkcs11, tpm
    assert {"grpcio", "protobuf", "cryptography", "pydantic", *extras} <= installed.keys()
    assert listed == installed
    for component in sbom["components"]:  # every third-party one is identified for vulnerability databases
        if canonicalize_name(component["name"]) != "kleidi":
            assert component["purl"] == f"pkg:pypi/{canonicalize_name(component['name'])}@{component['version']}"
    debs = dict(line.split(" ", 1) for line in image.debs.read_text().splitlines())
    assert {"python3.11-minimal", "libpython3.11-stdlib", "libc6", "libssl3", "ca-certificates"} <= debs.keys()
    assert debs["python3.11-minimal"].startswith("3.11.")
    installed_here = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libpython3.11-stdlib"],
                                    capture_output=True, text=True, check=False).stdout
    if installed_here:  # the build takes apt's candidate: the same Debian 12 release line as this host
        assert debs["libpython3.11-stdlib"].split("-")[0] == installed_here.split("-")[0]


# --- running it -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def podman(image: ImageArtifacts) -> Iterator[Podman]:
    with podman_storage(image) as storage:
        yield storage


def test_runs_as_its_user_without_capabilities(image: ImageArtifacts, podman: Podman) -> None:
    result = podman.run(image.reference, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"kleidi {VERSION}"
    # nothing on stderr from the interpreter itself, e.g. a .pth file naming a module the image trimmed
    assert "Traceback" not in result.stderr and "Error processing" not in result.stderr, result.stderr
    probe = textwrap.dedent("""
        import os, ssl
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        print(os.getuid(), os.getgid(), int(status["CapEff"], 16), int(status["CapBnd"], 16),
              int(status["NoNewPrivs"]), ssl.create_default_context().cert_store_stats()["x509_ca"])
        try:
            open("/usr/lib/kleidi-probe", "w")
        except OSError as exc:
            print(exc.errno)
    """)
    result = podman.run(image.reference, "-I", "-c", probe, options=["--entrypoint", "/usr/bin/python3.11"])
    assert result.returncode == 0, result.stderr
    uid, gid, effective, bounding, no_new_privs, cas, write_errno = map(int, result.stdout.split())
    assert (uid, gid, effective, bounding, no_new_privs) == (IMAGE_UID, IMAGE_GID, 0, 0, 1)
    assert cas > 100  # Debian's CA bundle: https to a Vault with a public CA works without ca_file
    assert write_errno == errno.EROFS


class _NonRootAPIServer(KubeAPIServer):
    """A kube-apiserver process as ``uid`` with primary group ``gid`` and no supplementary groups."""

    def __init__(self, *args: Any, uid: int, gid: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.uid, self.gid = uid, gid

    def start(self, wait: bool = True, ready_timeout: float = 120) -> KubeAPIServer:
        for path in [self.dir, *self.dir.rglob("*")]:
            os.chown(path, self.uid, self.gid)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.binary, *self.flags()], stdout=log, stderr=log,
                                     user=self.uid, group=self.gid, extra_groups=[])
        log.close()
        if wait:
            self.wait_ready(ready_timeout)
        return self


@dataclass
class Deployment:
    workdir: Path
    podman: Podman
    image: str  # its reference in podman's storage
    etcd: Etcd
    kleidi: Container
    health_port: int
    socket: Path  # on the host
    keyring: Path  # on the host
    encryption_config: Path
    binary: str  # kube-apiserver, where a non-root user may run it
    apiservers: list[KubeAPIServer]


def _health(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.fixture(scope="module")
def deployment(image: ImageArtifacts, podman: Podman) -> Iterator[Deployment]:
    """kleidi's image under podman as a node runs it: config and keyring from the host, read-only; the
    socket directory a bind mount shared with the host's kube-apiserver; the socket group SOCKET_GID."""
    workdir = Path(tempfile.mkdtemp(prefix="kl-img-", dir="/tmp"))
    workdir.chmod(0o755)  # the non-root apiserver and the stranger must reach the socket directory
    apiservers: list[KubeAPIServer] = []
    etcd: Etcd | None = None
    try:
        binary = workdir / "kube-apiserver"  # under /root the non-root apiserver could not execute it
        try:
            os.link(kube_apiserver_binary(), binary)
        except OSError:
            shutil.copy2(kube_apiserver_binary(), binary)
        etc, lib, run = workdir / "etc", workdir / "lib", workdir / "run"
        for directory in (etc, lib, run):
            directory.mkdir(mode=0o755)
        os.chown(run, IMAGE_UID, IMAGE_GID)  # kleidi creates its socket here
        os.chown(lib, IMAGE_UID, IMAGE_GID)  # key commands on the host run as 10001 and replace the file
        lib.chmod(0o700)
        keyring = lib / "keyring.json"
        keygen(keyring)  # on the host, as root here; then everything it made handed to 10001
        for path in lib.iterdir():  # the keyring and its lock file
            os.chown(path, IMAGE_UID, IMAGE_GID)
        keyring.chmod(0o600)
        health_port = free_port()
        config = etc / "config.yaml"
        config.write_text(yaml.safe_dump({
            "server": {"endpoint": "unix:///var/run/kleidi/kleidi.sock", "socket_mode": "0660",
                       "socket_group": SOCKET_GID, "allowed_gids": [SOCKET_GID]},
            "telemetry": {"address": f"127.0.0.1:{health_port}"},
            "backend": {"kind": "local", "keyring": "/var/lib/kleidi/keyring.json", "refresh_interval": "1s"},
        }))
        config.chmod(0o644)
        socket_path = run / "kleidi.sock"
        result = run_kleidi("encryption-config", "--name", "kleidi", "--endpoint", f"unix://{socket_path}",
                            "--resources", "secrets")
        assert result.returncode == 0, result.stderr
        encryption_config = etc / "encryption-config.yaml"
        encryption_config.write_text(result.stdout)
        encryption_config.chmod(0o644)
        etcd = Etcd(workdir).start()
        # The keyring's directory, not the file: rotation replaces the file (rename), which a bind mount of
        # the file itself would never show.
        volumes = [f"{config}:/etc/kleidi/config.yaml:ro", f"{lib}:/var/lib/kleidi:ro", f"{run}:/var/run/kleidi"]
        with run_container(podman, image.reference, volumes=volumes,
                           options=["--group-add", str(SOCKET_GID)]) as kleidi:
            kleidi.wait_for(lambda: _health(health_port, "/readyz") == 200, timeout=60, what="/readyz 200")
            deployment = Deployment(workdir, podman, image.reference, etcd, kleidi, health_port, socket_path, keyring,
                                    encryption_config, str(binary), apiservers)
            yield deployment
            for server in apiservers:
                server.stop()
    finally:
        for server in apiservers:
            server.stop()
        if etcd is not None:
            etcd.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, value in (line.split(":", 1) for line in lines if ":" in line)}


def _secrets_encrypted_in_etcd(etcd: Etcd, names: list[str]) -> None:
    stored = etcd.items("/registry/secrets/default/")
    for name in names:
        value = stored[f"/registry/secrets/default/{name}"]
        assert value.startswith(b"k8s:enc:kms:v2:kleidi:"), value[:40]
        assert SECRET_VALUE.encode() not in value


def test_rootless_container_encrypts_secrets_for_a_root_apiserver(deployment: Deployment) -> None:
    # kleidi runs as 10001:10001 (plus the socket group) with no capabilities.
    status = _proc_status(deployment.kleidi.pid())
    assert status["Uid"].split()[:2] == [str(IMAGE_UID)] * 2
    assert status["Gid"].split()[:2] == [str(IMAGE_GID)] * 2
    assert sorted(status["Groups"].split()) == sorted({str(IMAGE_GID), str(SOCKET_GID)})
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0 and status["NoNewPrivs"] == "1"
    st = deployment.socket.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (IMAGE_UID, SOCKET_GID)
    assert _health(deployment.health_port, "/livez") == 200 and _health(deployment.health_port, "/readyz") == 200

    api = KubeAPIServer(deployment.workdir, "apiserver-root", deployment.etcd, deployment.binary,
                        deployment.encryption_config)
    deployment.apiservers.append(api)
    api.start()
    api.kubectl("create", "secret", "generic", "from-root", f"--from-literal=value={SECRET_VALUE}")
    _secrets_encrypted_in_etcd(deployment.etcd, ["from-root"])
    read = json.loads(api.kubectl("get", "secret", "from-root", "-o", "json").stdout)
    assert read["data"]["value"] == base64.b64encode(SECRET_VALUE.encode()).decode()

    # Rotation on the host (as 10001) reaches kleidi through its read-only mount of the keyring's directory.
    before = _call_as(deployment.socket, 0, 0, [])
    assert before.startswith("status OK ")
    # With the image itself (no kleidi on the host needed), as 10001, the directory writable for this run only.
    result = deployment.podman.run(deployment.image, "rotate", "--keyring", "/var/lib/kleidi/keyring.json",
                                   options=["-v", f"{deployment.keyring.parent}:/var/lib/kleidi"])
    assert result.returncode == 0, result.stderr
    assert deployment.keyring.stat().st_uid == IMAGE_UID
    deployment.kleidi.wait_for(lambda: _call_as(deployment.socket, 0, 0, []) != before, timeout=30,
                               what="the rotated key in Status")
    api.kubectl("create", "secret", "generic", "after-rotation", f"--from-literal=value={SECRET_VALUE}")
    _secrets_encrypted_in_etcd(deployment.etcd, ["from-root", "after-rotation"])
    for name in ("from-root", "after-rotation"):  # the old key version still decrypts
        read = json.loads(api.kubectl("get", "secret", name, "-o", "json").stdout)
        assert read["data"]["value"] == base64.b64encode(SECRET_VALUE.encode()).decode()
    assert "refused a caller" not in deployment.kleidi.logs()


CALLER = textwrap.dedent("""
    # Runs as root, imports grpc and kleidi's stubs, then becomes the caller under test and calls Status.
    import errno, os, socket, sys
    import grpc
    from kleidi._proto.kmsv2 import api_pb2 as v2_pb2, api_pb2_grpc as v2_pb2_grpc
    path, uid, gid, groups = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [int(g) for g in sys.argv[4:]]
    os.setgroups(groups); os.setgid(gid); os.setuid(uid)
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except OSError as exc:
        print("connect", errno.errorcode[exc.errno]); sys.exit(0)
    probe.close()
    channel = grpc.insecure_channel("unix://" + path, options=[("grpc.default_authority", "localhost")])
    try:
        status = v2_pb2_grpc.KeyManagementServiceStub(channel).Status(v2_pb2.StatusRequest(), timeout=5)
        print("status OK", status.key_id)
    except grpc.RpcError as exc:
        print("status", exc.code().name)
""")


def _as_user(script: str, *args: object) -> str:
    """Run ``script`` with the test's Python as root; the script drops to the user under test itself
    (the venv's interpreter lives under /root, which other users cannot execute)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLEIDI_")}
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                            timeout=60, check=False, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _call_as(socket_path: Path, uid: int, gid: int, groups: list[int]) -> str:
    """What a Status call from that identity gets: "status OK <key id>", "connect EACCES", "status <code>"."""
    return _as_user(CALLER, socket_path, uid, gid, *groups)


def test_socket_group_admits_a_non_root_apiserver_and_no_one_else(deployment: Deployment) -> None:
    api = _NonRootAPIServer(deployment.workdir, "apiserver-nonroot", deployment.etcd, deployment.binary,
                            deployment.encryption_config, uid=APISERVER_UID, gid=SOCKET_GID)
    deployment.apiservers.append(api)
    for key in ("sa.key", "sa.pub"):  # made by the first apiserver object; root still reads them
        os.chown(deployment.workdir / key, APISERVER_UID, SOCKET_GID)
    api.start()  # /readyz includes the KMS provider's health: Status through the socket answered
    assert api.proc is not None
    status = _proc_status(api.proc.pid)
    assert status["Uid"].split()[:2] == [str(APISERVER_UID)] * 2
    assert status["Gid"].split()[:2] == [str(SOCKET_GID)] * 2
    assert status["Groups"].split() == []
    api.kubectl("create", "secret", "generic", "from-nonroot", f"--from-literal=value={SECRET_VALUE}")
    names = ["from-nonroot"]
    existing = api.kubectl("get", "secrets", "-o", "name").stdout.split()
    if "secret/from-root" in existing:  # written by the root apiserver: the non-root one decrypts it
        names.append("from-root")
    for name in names:
        read = json.loads(api.kubectl("get", "secret", name, "-o", "json").stdout)
        assert read["data"]["value"] == base64.b64encode(SECRET_VALUE.encode()).decode()
    _secrets_encrypted_in_etcd(deployment.etcd, names)

    # The same identity from a client of our own: allowed.
    assert _call_as(deployment.socket, APISERVER_UID, SOCKET_GID, []).startswith("status OK ")
    # Neither kleidi's user nor the socket group: the socket file's mode (0660) refuses the connection.
    assert _call_as(deployment.socket, STRANGER_UID, STRANGER_UID, []) == "connect EACCES"
    # The socket group only as a supplementary group: the file mode lets it connect, caller
    # authentication (uid and PRIMARY gid, from SO_PEERCRED) refuses it.
    assert _call_as(deployment.socket, INSIDER_UID, INSIDER_UID, [SOCKET_GID]) == "status PERMISSION_DENIED"
    logs = deployment.kleidi.logs()
    assert f"uid {INSIDER_UID} gid {INSIDER_UID} is not allowed" in logs
    assert f"uid {APISERVER_UID}" not in logs
    assert SECRET_VALUE not in logs
    assert deployment.kleidi.running()
