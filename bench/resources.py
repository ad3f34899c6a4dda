"""``python -m bench.resources``: the memory and CPU of ``kleidi serve`` driven as kube-apiserver drives it, for the
static pod's and the Helm chart's resource requests and limits (issue #13; docs/deploy/static-pod.md).

Per backend (the local keyring; OpenBao Transit through the test suite's harness), one fresh ``kleidi serve`` with
production settings (bench/plugins.py) goes through the steps below; ``--backend image`` runs the local backend in
kleidi's own image instead (scripts/build-image.sh, under podman with the test suite's hardening and private storage,
tests/deploy/images.py), measured from the host through the container's main process:

1. start: spawn to the first ``ok`` Status; RSS then;
2. idle: one Status every ``--status-every`` seconds on one long-lived connection (kube-apiserver's health checks),
   nothing else, for ``--idle`` seconds: CPU (millicores) and RSS at the end;
3. bursts, as an apiserver that starts and re-seeds and then reads many Secrets: ``--calls`` Encrypt calls (32-byte
   seeds, 8 in flight), then ``--calls`` Decrypt calls of as many distinct ciphertexts (32 in flight: an informer
   list of Secrets each under its own DEK, the worst case), then ``--calls`` Status calls: CPU seconds per 1000 calls;
4. settle: idle with Status again for ``--settle`` seconds: the steady RSS after load (CPython keeps most of what it
   once allocated, so this is what a long-running pod holds).

Peak RSS is the kernel's own high-water mark (VmHWM in /proc/PID/status, never reset, so it covers start-up and
every burst) and the largest sampled RSS of the process tree (kleidi serve starts no children; the tree is checked).
The load comes from bench/loadgen (``kleidi-bench load``, dialled as kube-apiserver dials). The tables go to stdout
in Markdown; ``--json`` also writes the figures. Suggested requests and limits follow the rule printed with them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

import grpc
import yaml

from bench import procmon
from bench.common import build_loadgen, log, run_json
from bench.plugins import KLEIDI_INTERVALS, KLEIDI_SETTINGS, Kleidi, status_ok
from kleidi._proto.kmsv2 import api_pb2 as v2_pb
from kleidi._proto.kmsv2 import api_pb2_grpc as v2_grpc

MIB = 2**20


def _status_field(pid: int, name: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM) in bytes; 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class StatusTicker:
    """One Status call every ``every`` seconds on one connection, as kube-apiserver's KMS health check does."""

    def __init__(self, endpoint: str, every: float) -> None:
        self.every = every
        self.channel = grpc.insecure_channel(endpoint, options=[("grpc.default_authority", "localhost")])
        self.stub = v2_grpc.KeyManagementServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.calls = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            try:
                ok = self.stub.Status(v2_pb.StatusRequest(), timeout=3).healthz == "ok"
            except grpc.RpcError:
                ok = False
            self.calls += 1
            self.failures += 0 if ok else 1
            if self._stop.wait(self.every):
                return

    def start(self) -> StatusTicker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.channel.close()


class Sampler:
    """The largest RSS of the process tree, sampled every ``interval`` seconds (VmHWM covers the root alone)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.most_processes = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            pids = procmon.tree(self.pid)
            self.most_processes = max(self.most_processes, len(pids))
            self.peak = max(self.peak, procmon.rss_bytes(self.pid, pids))

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Served(Protocol):
    """A running kleidi serve: started, stopped, its socket and its host pid."""

    @property
    def endpoint(self) -> str: ...

    @property
    def pid(self) -> int: ...

    def start(self, timeout: float = 30) -> float: ...

    def stop(self) -> None: ...


class ImageKleidi:
    """``kleidi serve`` (local backend) in kleidi's image under podman: the image's user (10001), no capabilities,
    read-only root, host network; config, keyring and socket directory mounted at the static pod's paths."""

    def __init__(self, workdir: Path, podman: Any, reference: str) -> None:
        from tests.conftest import keygen
        from tests.deploy.images import IMAGE_GID, IMAGE_UID
        from tests.support import free_port

        self.podman, self.reference = podman, reference
        etc, lib, run = workdir / "image-etc", workdir / "image-lib", workdir / "image-run"
        for directory in (etc, lib, run):
            directory.mkdir(mode=0o755)
        keygen(lib / "keyring.json")
        for path in (lib, lib / "keyring.json", run):
            os.chown(path, IMAGE_UID, IMAGE_GID)
        lib.chmod(0o700)
        run.chmod(0o750)
        settings = {**KLEIDI_SETTINGS, "server": {"endpoint": "unix:///var/run/kleidi/kleidi.sock"},
                    "telemetry": {"address": f"127.0.0.1:{free_port()}"},
                    "backend": {"kind": "local", "keyring": "/var/lib/kleidi/keyring.json", **KLEIDI_INTERVALS}}
        (etc / "config.yaml").write_text(yaml.safe_dump(settings))
        (etc / "config.yaml").chmod(0o644)
        self.volumes = [f"{etc}:/etc/kleidi:ro", f"{lib}:/var/lib/kleidi:ro", f"{run}:/var/run/kleidi"]
        self.socket_path = run / "kleidi.sock"
        self._running: contextlib.ExitStack | None = None
        self._container: Any = None
        self._pid = 0

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int:
        return self._pid

    def start(self, timeout: float = 60) -> float:
        from tests.deploy.images import run_container

        began = time.perf_counter()
        self._running = contextlib.ExitStack()
        container = self._running.enter_context(run_container(
            self.podman, self.reference, "serve", "--config", "/etc/kleidi/config.yaml", volumes=self.volumes))
        container.wait_for(lambda: status_ok(self.socket_path), timeout=timeout, what="an ok Status")
        seconds = time.perf_counter() - began
        self._pid = container.pid()
        self._container = container
        return seconds

    def stop(self) -> None:
        if self._container is not None and not self._container.running():
            log(f"  the container had exited:\n{self._container.logs()[-3000:]}")
        if self._running is not None:
            self._running.close()
            self._running = None


@dataclass
class Burst:
    op: str
    calls: int
    concurrency: int
    errors: int
    seconds: float
    cpu_seconds: float

    @property
    def cpu_per_1000(self) -> float:
        return 1000 * self.cpu_seconds / self.calls

    @property
    def cpu_cores(self) -> float:
        """Cores kept busy during the burst (CPU seconds over wall seconds)."""
        return self.cpu_seconds / self.seconds if self.seconds else 0.0


@dataclass
class Figures:
    backend: str
    start_seconds: float
    start_rss_mib: float
    idle_seconds: float
    idle_millicores: float
    idle_rss_mib: float
    bursts: list[Burst]
    settled_rss_mib: float
    peak_rss_mib: float  # max(VmHWM of kleidi serve, sampled tree RSS)
    processes: int
    status_failures: int


def _burst(loadgen: Path, kleidi: Served, op: str, calls: int, concurrency: int, pool: Path | None) -> Burst:
    args = [str(loadgen), "load", "-target", kleidi.endpoint, "-op", op, "-c", str(concurrency), "-count", str(calls),
            "-timeout", "10s"]
    if pool is not None:
        args += ["-pool-file", str(pool)]
    cpu0, began = procmon.cpu_seconds(kleidi.pid), time.monotonic()
    result = run_json(args)
    wall, cpu = time.monotonic() - began, procmon.cpu_seconds(kleidi.pid) - cpu0
    errors = int(result.get("errors", 0))
    burst = Burst(op, calls, concurrency, errors, round(wall, 2), round(cpu, 2))
    log(f"  {op:8} {calls} calls, {concurrency} in flight: {wall:6.2f} s, {cpu:6.2f} CPU s "
        f"({burst.cpu_per_1000:.2f} per 1000), errors {errors}")
    return burst


def measure(backend: str, kleidi: Served, loadgen: Path, workdir: Path, args: argparse.Namespace) -> Figures:
    log(f"kleidi serve, {backend} backend")
    start_seconds = kleidi.start()
    pid = kleidi.pid
    sampler = Sampler(pid).start()
    start_rss = _status_field(pid, "VmRSS")
    log(f"  ready in {start_seconds:.2f} s, RSS {start_rss / MIB:.1f} MiB; idle {args.idle:.0f} s")
    ticker = StatusTicker(kleidi.endpoint, args.status_every).start()
    try:
        cpu0, began = procmon.cpu_seconds(pid), time.monotonic()
        time.sleep(args.idle)
        idle_cpu, idle_wall = procmon.cpu_seconds(pid) - cpu0, time.monotonic() - began
        idle_rss = _status_field(pid, "VmRSS")
        if not idle_rss:
            raise RuntimeError(f"kleidi serve (pid {pid}) is gone after the idle window")
        log(f"  idle: {1000 * idle_cpu / idle_wall:.1f} millicores, RSS {idle_rss / MIB:.1f} MiB")
        pool = workdir / f"{backend}-pool.jsonl"
        bursts = [_burst(loadgen, kleidi, "encrypt", args.calls, 8, None)]
        run_json([str(loadgen), "pool", "-target", kleidi.endpoint, "-n", str(args.calls), "-c", "8",
                  "-out", str(pool)])  # the ciphertexts the Decrypt burst reads (more Encrypt calls, not counted)
        bursts.append(_burst(loadgen, kleidi, "decrypt", args.calls, 32, pool))
        bursts.append(_burst(loadgen, kleidi, "status", args.calls, 8, None))
        log(f"  settle {args.settle:.0f} s")
        time.sleep(args.settle)
        settled_rss = _status_field(pid, "VmRSS")
    finally:
        ticker.stop()
        sampler.stop()
    peak = max(_status_field(pid, "VmHWM"), sampler.peak)
    figures = Figures(backend=backend, start_seconds=round(start_seconds, 2), start_rss_mib=round(start_rss / MIB, 1),
                      idle_seconds=round(idle_wall, 1), idle_millicores=round(1000 * idle_cpu / idle_wall, 1),
                      idle_rss_mib=round(idle_rss / MIB, 1), bursts=bursts,
                      settled_rss_mib=round(settled_rss / MIB, 1), peak_rss_mib=round(peak / MIB, 1),
                      processes=sampler.most_processes, status_failures=ticker.failures)
    log(f"  settled RSS {figures.settled_rss_mib} MiB, peak RSS {figures.peak_rss_mib} MiB, "
        f"{figures.processes} process(es), {ticker.calls} idle Status calls ({ticker.failures} not ok)")
    return figures


def _up(value: float, step: int) -> int:
    return int(math.ceil(value / step) * step)


def suggestion(all_figures: list[Figures]) -> dict[str, str]:
    """Memory request: the largest settled RSS + 25 %, up to a multiple of 16 Mi. Memory limit: twice the largest
    peak, up to a multiple of 64 Mi, and at least 256 Mi (room for what was not measured: a PKCS#11 module or the
    TPM's tss2 libraries, a large keyring, a slow backend holding many calls in flight; an OOM kill stops every
    Secret read on the node, and a limit reserves nothing). CPU request: twice the idle use, and at least 50m (the
    bursts come when the node is busiest, at apiserver start, and under contention the request is kleidi's share).
    No CPU limit: throttling would stall the apiserver's calls."""
    settled = max(f.settled_rss_mib for f in all_figures)
    peak = max(f.peak_rss_mib for f in all_figures)
    idle = max(f.idle_millicores for f in all_figures)
    return {"requests.memory": f"{_up(settled * 1.25, 16)}Mi", "limits.memory": f"{max(256, _up(peak * 2, 64))}Mi",
            "requests.cpu": f"{max(50, _up(idle * 2, 5))}m"}


def table(all_figures: list[Figures]) -> str:
    head = "| | " + " | ".join(f.backend for f in all_figures) + " |"
    rows = [head, "|---" * (len(all_figures) + 1) + "|"]

    def row(name: str, cells: list[str]) -> None:
        rows.append(f"| {name} | " + " | ".join(cells) + " |")

    row("start to first ok Status", [f"{f.start_seconds:.2f} s" for f in all_figures])
    row("RSS when ready", [f"{f.start_rss_mib:.1f} MiB" for f in all_figures])
    row("CPU at idle (Status every few s)", [f"{f.idle_millicores:.1f} m" for f in all_figures])
    row("RSS at idle", [f"{f.idle_rss_mib:.1f} MiB" for f in all_figures])
    for i, b in enumerate(all_figures[0].bursts):
        cells = []
        for f in all_figures:
            burst = f.bursts[i]
            errors = f", {burst.errors} errors" if burst.errors else ""
            cells.append(f"{burst.cpu_per_1000:.2f} s ({burst.cpu_cores:.2f} cores for {burst.seconds:.1f} s{errors})")
        row(f"{b.op.capitalize()} burst: CPU s per 1000 calls ({b.calls} calls, {b.concurrency} in flight)", cells)
    row("RSS after the bursts (steady)", [f"{f.settled_rss_mib:.1f} MiB" for f in all_figures])
    row("peak RSS (VmHWM)", [f"{f.peak_rss_mib:.1f} MiB" for f in all_figures])
    return "\n".join(rows)


def meta() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "kleidi": version("kleidi"),
            "python": platform.python_version(), "grpcio": version("grpcio"), "nproc": os.cpu_count(), "cpu": cpu,
            "loadavg_before": " ".join(Path("/proc/loadavg").read_text().split()[:3])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resources", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=["local", "vault", "image"],
                        help="what to measure, repeatable: local, vault, image (the local backend in kleidi's "
                             "image under podman); default: all three")
    parser.add_argument("--idle", type=float, default=60.0, help="idle window in seconds (default 60)")
    parser.add_argument("--status-every", type=float, default=5.0, help="seconds between idle Status calls")
    parser.add_argument("--calls", type=int, default=5000, help="calls per burst (default 5000)")
    parser.add_argument("--settle", type=float, default=20.0, help="idle seconds after the bursts (default 20)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    backends = args.backend or ["local", "vault", "image"]
    info = meta()
    loadgen = build_loadgen()
    workdir = Path(tempfile.mkdtemp(prefix="klres-", dir="/tmp"))
    all_figures: list[Figures] = []
    try:
        for backend in backends:
            if backend == "local":
                kleidi = Kleidi(workdir, "kleidi-local")
                try:
                    all_figures.append(measure(backend, kleidi, loadgen, workdir, args))
                finally:
                    kleidi.stop()
            elif backend == "image":
                from tests.deploy.images import kleidi_image, podman_storage

                image = kleidi_image()
                with podman_storage(image) as podman:
                    served = ImageKleidi(workdir, podman, image.reference)
                    try:
                        all_figures.append(measure("local, in the image (podman)", served, loadgen, workdir, args))
                    finally:
                        served.stop()
            else:
                from bench.kms import Bao

                bao = Bao(workdir)
                try:
                    kleidi = Kleidi(workdir, "kleidi-vault", bao.kleidi_backend)
                    try:
                        all_figures.append(measure("vault (OpenBao Transit)", kleidi, loadgen, workdir, args))
                    finally:
                        kleidi.stop()
                finally:
                    bao.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    suggested = suggestion(all_figures)
    print(f"kleidi {info['kleidi']}, Python {info['python']} (host), grpcio {info['grpcio']}; "
          f"{info['nproc']} x {info['cpu']}; {info['date']}; load average before: {info['loadavg_before']}\n")
    print(table(all_figures))
    print("\nSuggested: " + ", ".join(f"{k} {v}" for k, v in suggested.items()) + ".")
    print("Rule: " + " ".join((suggestion.__doc__ or "").split()))
    if args.json is not None:
        document = {"meta": info, "settings": {k: v for k, v in vars(args).items() if k != "json"},
                    "figures": [{**asdict(f), "bursts": [{**asdict(b), "cpu_per_1000": round(b.cpu_per_1000, 3)}
                                                         for b in f.bursts]} for f in all_figures],
                    "suggested": suggested}
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
