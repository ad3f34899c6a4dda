"""kleidi's container image for the deployment tests: built once per session through
scripts/build-image.sh (which itself returns at once when nothing changed since the last build on this
machine), shared by the image, kubelet and supply-chain tests."""

from __future__ import annotations

import functools
import subprocess
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
