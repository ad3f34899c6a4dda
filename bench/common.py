"""Paths, the Go tool, the peer plugin, and small process helpers shared by the benchmark modules."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
LOADGEN_SRC = BENCH / "loadgen"
RESULTS = BENCH / "results"
CACHE = Path(os.environ.get("KUBE_APISERVER_CACHE", Path.home() / ".cache" / "kleidi"))
BIN = CACHE / "bin"
VENV_BIN = Path(sys.executable).parent

PEER_MODULE = "github.com/FalcoSuessgott/vault-kubernetes-kms"
PEER_VERSION = "v1.4.0"


def log(message: str) -> None:
    """Progress on stderr, with a wall-clock stamp."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GOFLAGS", "-mod=mod")
    return env


def build_loadgen() -> Path:
    """Build bench/loadgen once per source change into the cache; return the binary."""
    digest = hashlib.sha256()
    for path in sorted(LOADGEN_SRC.glob("*")):
        if path.suffix in (".go", ".mod", ".sum"):
            digest.update(path.name.encode() + path.read_bytes())
    out = BIN / f"kleidi-bench-{digest.hexdigest()[:12]}"
    if out.exists():
        return out
    if shutil.which("go") is None:
        raise SystemExit("bench: Go is needed to build bench/loadgen (https://go.dev/dl/)")
    BIN.mkdir(parents=True, exist_ok=True)
    log(f"building the load generator into {out}")
    subprocess.run(["go", "build", "-trimpath", "-o", str(out) + ".tmp", "."], cwd=LOADGEN_SRC, env=go_env(),
                   check=True)
    os.replace(str(out) + ".tmp", out)
    return out


@dataclass
class PeerBinary:
    """The Go plugin that kleidi is compared with on the Transit backend."""

    kind: str  # "vault-kubernetes-kms" or "transit-ref"
    path: Path
    version: str
    note: str


def find_peer(loadgen: Path) -> PeerBinary:
    """vault-kubernetes-kms v1.4.0 if it can be had (``$BENCH_VKK``, the cache, or ``go install``);
    otherwise the Go reference plugin in bench/loadgen that makes the same Vault calls per request."""
    candidates = [Path(p) for p in [os.environ.get("BENCH_VKK", "")] if p]
    candidates.append(BIN / "vault-kubernetes-kms")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return PeerBinary("vault-kubernetes-kms", path, PEER_VERSION, f"{path}")
    reason = "go is not installed"
    if shutil.which("go") is not None:
        result = subprocess.run(["go", "install", f"{PEER_MODULE}@{PEER_VERSION}"], capture_output=True, text=True,
                                env={**go_env(), "GOBIN": str(BIN)}, check=False, timeout=900)
        if result.returncode == 0 and (BIN / "vault-kubernetes-kms").exists():
            return PeerBinary("vault-kubernetes-kms", BIN / "vault-kubernetes-kms", PEER_VERSION,
                              f"go install {PEER_MODULE}@{PEER_VERSION}")
        reason = " ".join(result.stderr.split())
        if "403" in reason:  # the proxy's answer, without the URL it repeats
            reason = "the Go module proxy answers 403 Forbidden: " + reason.rsplit("server response:", 1)[-1].strip()
        reason = reason[-300:]
    log(f"vault-kubernetes-kms {PEER_VERSION} unavailable ({reason}); using the Go reference plugin instead")
    return PeerBinary("transit-ref", loadgen, "bench/loadgen transit-ref",
                      f"`go install {PEER_MODULE}@{PEER_VERSION}` failed on this machine: {reason}")


def run_json(args: list[str], timeout: float = 900, env: dict[str, str] | None = None) -> Any:
    """Run a command that prints one JSON document; fail with its stderr otherwise."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed ({result.returncode}): {result.stderr[-2000:]}")
    return json.loads(result.stdout)


def command_output(args: list[str]) -> str:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (result.stdout or result.stderr).strip()


def throughput(objects: int, runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The best of several timed runs (each with ``seconds`` and ``peak_rss_mb``) and the figures every
    object-count benchmark reports: objects per second of the best run, the peak RSS of all, the machine."""
    best = min(runs, key=lambda r: r["seconds"])
    return best, {"runs": runs, "objects_per_second": round(objects / best["seconds"]),
                  "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
                  "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                              "loadavg": os.getloadavg()}}
