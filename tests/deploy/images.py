"""kleidi's container image for the deployment tests: built once per session through
scripts/build-image.sh (which itself returns at once when nothing changed since the last build on this
machine), shared by the image, kubelet and supply-chain tests.

Also a rootless podman runner (:func:`podman_storage`, :func:`run_container`): podman as root, but
the container as kleidi's user 10001:10001 with no capabilities, a read-only root filesystem, no new
privileges and the host network, as a static pod runs it. What works on these hosts: runc with the
cgroupfs manager (crun fails on hybrid cgroups), the vfs storage driver in a private ``--root`` and
``--runroot`` (no overlay mounts to leak), and ``--ulimit`` set to the caller's own limits (runc cannot
raise RLIMIT_NOFILE above the hard limit podman would otherwise ask for).
"""

from __future__ import annotations

import contextlib
import functools
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "scripts" / "build-image.sh"

# The image's fixed user and group (scripts/build-image.sh, the static pod, the chart).
IMAGE_UID = 10001
IMAGE_GID = 10001


@dataclass(frozen=True)
class ImageArtifacts:
    archive: Path  # OCI archive, one tag: the version
    sbom: Path  # CycloneDX JSON
    wheel: Path
    debs: Path  # Debian packages in the image, "name version" per line
    version: str

    @property
    def reference(self) -> str:
        """The name the manifests and the chart use by default."""
        return f"localhost/kleidi:{self.version}"


@functools.cache
def kleidi_image() -> ImageArtifacts:
    """Build (or take from the cache) kleidi's image; fail with the build's own output if it breaks."""
    result = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=1200, check=False, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"scripts/build-image.sh failed ({result.returncode}):\n{result.stderr[-4000:]}")
    archive = Path(result.stdout.strip().splitlines()[-1])
    version = archive.name.removeprefix("kleidi-").removesuffix(".oci.tar")
    dist = archive.parent
    artifacts = ImageArtifacts(archive=archive, sbom=dist / f"kleidi-{version}.sbom.cdx.json",
                               wheel=dist / f"kleidi-{version}-py3-none-any.whl",
                               debs=dist / f"kleidi-{version}.debs.txt", version=version)
    for path in (artifacts.archive, artifacts.sbom, artifacts.wheel, artifacts.debs):
        if not path.is_file():
            raise RuntimeError(f"scripts/build-image.sh reported success but {path} is missing")
    return artifacts


# Container runtime flags of every run: kleidi's fixed user, nothing it does not need.
HARDENING = ("--user", f"{IMAGE_UID}:{IMAGE_GID}", "--cap-drop", "ALL", "--read-only", "--read-only-tmpfs=false",
             "--security-opt", "no-new-privileges", "--network", "host")


def _ulimits() -> list[str]:
    """Explicit limits: podman's defaults (1048576 open files, 4194304 processes) exceed what runc may set
    on these hosts. Open files: the caller's own; processes (threads count, per uid): 4096."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1048576
    soft = hard if soft == resource.RLIM_INFINITY else soft
    return ["--ulimit", f"nofile={soft}:{hard}", "--ulimit", f"nproc={NPROC}:{NPROC}"]


NPROC = 4096


@dataclass
class Podman:
    """podman with its own storage in ``directory`` (vfs, runc, cgroupfs): nothing touches the host's."""

    directory: Path

    def command(self, *args: str) -> list[str]:
        return ["podman", "--root", str(self.directory / "root"), "--runroot", str(self.directory / "run"),
                "--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs",
                "--events-backend", "none", *args]

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)} exited with {result.returncode}:\n{result.stderr[-3000:]}")
        return result

    def load(self, image: ImageArtifacts) -> str:
        """Put the OCI archive into this storage under ``image.reference``; return the image id."""
        image_id = self("pull", "-q", f"oci-archive:{image.archive}", timeout=300).stdout.strip().splitlines()[-1]
        self("tag", image_id, image.reference)
        return image_id

    def run(self, reference: str, *args: str, options: Sequence[str] = (),
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """One hardened container in the foreground (``--rm``); returns podman's completed process."""
        return self("run", "--rm", *HARDENING, *_ulimits(), *options, reference, *args, check=False, timeout=timeout)


@contextlib.contextmanager
def podman_storage(image: ImageArtifacts) -> Iterator[Podman]:
    """A private podman storage holding kleidi's image (loading the 47 MB archive into vfs costs a few
    seconds: share one per test module). Every container is removed and the storage deleted at the end,
    also when a test fails."""
    directory = Path(tempfile.mkdtemp(prefix="kl-podman-", dir="/tmp"))
    podman = Podman(directory)
    try:
        podman.load(image)
        yield podman
    finally:
        with contextlib.suppress(Exception):
            podman("rm", "--all", "--force", "--time", "0", check=False, timeout=60)
        _unmount_below(directory)
        shutil.rmtree(directory, ignore_errors=True)


def _unmount_below(directory: Path) -> None:
    """Whatever podman or runc left mounted under ``directory`` (shm, the container's rootfs)."""
    prefix = str(directory) + "/"
    with open("/proc/self/mounts") as mounts:
        targets = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for target in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)


@dataclass
class Container:
    podman: Podman
    id: str

    def running(self) -> bool:
        result = self.podman("inspect", "--format", "{{.State.Running}}", self.id, check=False)
        return result.stdout.strip() == "true"

    def logs(self) -> str:
        result = self.podman("logs", self.id, check=False)
        return result.stdout + result.stderr

    def pid(self) -> int:
        """The host pid of the container's main process (kleidi)."""
        return int(self.podman("inspect", "--format", "{{.State.Pid}}", self.id).stdout.strip())

    def wait_for(self, predicate: Callable[[], object], timeout: float = 30, what: str = "condition") -> None:
        """Poll ``predicate()`` until true; fail with the container's log if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if not self.running():
                raise AssertionError(f"the container exited before {what}:\n{self.logs()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no {what} after {timeout}s:\n{self.logs()[-4000:]}")


@contextlib.contextmanager
def run_container(podman: Podman, reference: str, *args: str, volumes: Sequence[str] = (),
                  options: Sequence[str] = ()) -> Iterator[Container]:
    """A hardened container in the background (``podman run -d``); stopped (SIGTERM, then SIGKILL after
    10 s) and removed at the end, also when the test fails. ``volumes``: ``HOST:CTR[:ro]``."""
    mounts = [flag for volume in volumes for flag in ("-v", volume)]
    container_id = podman("run", "-d", *HARDENING, *_ulimits(), *mounts, *options, reference, *args).stdout.strip()
    container = Container(podman, container_id)
    try:
        yield container
    finally:
        podman("rm", "--force", "--time", "10", container_id, check=False, timeout=60)
