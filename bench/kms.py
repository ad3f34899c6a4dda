"""Plugin-level scenarios over the unix socket: the generator's ceiling, kleidi on the local backend,
kleidi and the Go peer side by side on one OpenBao Transit key, and backend calls per operation."""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procmon
from bench.common import PeerBinary, log, run_json
from bench.plugins import GoPlugin, Kleidi, Plugin, noop_plugin, peer_plugin

OPS = ("status", "encrypt", "decrypt")


@dataclass
class LoadSettings:
    duration: float  # measured seconds per scenario
    warmup: float
    concurrencies: tuple[int, ...]
    pool: int  # seeds wrapped beforehand for the Decrypt scenarios
    counted_calls: int  # calls per operation when counting backend requests
    startup_samples: int


class Runner:
    """Runs the load generator against plugins and records each scenario with the plugin's usage."""

    def __init__(self, loadgen: Path, settings: LoadSettings, workdir: Path) -> None:
        self.loadgen = loadgen
        self.settings = settings
        self.workdir = workdir
        self.pools: dict[str, Path] = {}

    def pool(self, plugin: Plugin) -> Path:
        if plugin.name not in self.pools:
            path = self.workdir / f"{plugin.name}-pool.jsonl"
            run_json([str(self.loadgen), "pool", "-target", plugin.endpoint, "-n", str(self.settings.pool),
                      "-c", "8", "-out", str(path)])
            self.pools[plugin.name] = path
        return self.pools[plugin.name]

    def load_args(self, plugin: Plugin, op: str, concurrency: int) -> list[str]:
        args = [str(self.loadgen), "load", "-target", plugin.endpoint, "-op", op, "-c", str(concurrency)]
        if op == "decrypt":
            args += ["-pool-file", str(self.pool(plugin))]
        return args

    def measure(self, plugin: Plugin, op: str, concurrency: int) -> dict[str, Any]:
        s = self.settings
        args = [*self.load_args(plugin, op, concurrency), "-duration", f"{s.duration}s", "-warmup", f"{s.warmup}s"]
        monitor = procmon.Monitor(plugin.pid).start()
        began = time.monotonic()
        result: dict[str, Any] = run_json(args)
        wall = time.monotonic() - began
        usage = monitor.stop()
        result.update(plugin=plugin.name, peak_rss_mb=round(usage.peak_rss_mb, 1),
                      cpu_seconds=round(usage.cpu_seconds, 2), cpu_percent=round(100 * usage.cpu_seconds / wall, 1))
        log(f"  {plugin.name:22} {op:8} c={concurrency:<3} {result['throughput']:9.0f}/s  "
            f"p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  errors {result['errors']}  "
            f"rss {usage.peak_rss_mb:5.1f} MB  cpu {result['cpu_percent']:5.1f}%")
        return result

    def scenarios(self, plugins: list[Plugin]) -> list[dict[str, Any]]:
        """Every op x concurrency; with several plugins, alternating between them (ABBA) cell by cell, so
        that drift in machine noise hits all of them alike."""
        rows = []
        cell = 0
        for op in OPS:
            for concurrency in self.settings.concurrencies:
                order = plugins if cell % 2 == 0 else list(reversed(plugins))
                for plugin in order:
                    rows.append(self.measure(plugin, op, concurrency))
                cell += 1
        return rows


def startup(make: Callable[[str], Plugin], samples: int) -> dict[str, Any]:
    """Spawn-to-first-ok-Status of fresh processes (each stopped before the next starts)."""
    seconds = []
    for i in range(samples):
        plugin = make(f"startup{i}")
        try:
            seconds.append(plugin.start())  # type: ignore[attr-defined]
        finally:
            plugin.stop()
    return {"samples": [round(x, 3) for x in seconds], "median_s": round(statistics.median(seconds), 3),
            "max_s": round(max(seconds), 3)}


def ceiling(runner: Runner) -> list[dict[str, Any]]:
    log("load generator ceiling against a no-op Go plugin")
    plugin = noop_plugin(runner.workdir, runner.loadgen)
    plugin.start()
    try:
        return runner.scenarios([plugin])
    finally:
        plugin.stop()


Profiler = Callable[[Plugin, str, dict[str, Any]], dict[str, Any]]


def local(runner: Runner, profiler: Profiler | None = None) -> dict[str, Any]:
    log("kleidi, local backend")
    out: dict[str, Any] = {"startup": startup(lambda n: Kleidi(runner.workdir, f"kl-local-{n}"),
                                                runner.settings.startup_samples)}
    log(f"  start to ready: {out['startup']}")
    kleidi = Kleidi(runner.workdir, "kleidi-local")
    # The same kleidi without the SO_PEERCRED gate (the gRPC server on the socket itself): what the
    # caller check costs.
    unchecked = Kleidi(runner.workdir, "kleidi-local-no-caller-auth", server={"authenticate_callers": False})
    kleidi.start()
    unchecked.start()
    try:
        out["rows"] = runner.scenarios([kleidi, unchecked])
        out["metrics"] = kleidi.metrics()
        if profiler is not None:
            out["profiles"] = profiler(kleidi, "local", out)
    finally:
        unchecked.stop()
        kleidi.stop()
    return out


# ---------------------------------------------------------------------------------------------- OpenBao


class AuditCounter:
    """Requests in OpenBao's file audit device since a mark, attributed to one token by its audit HMAC."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def since_mark(self) -> list[dict[str, Any]]:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        entries = []
        for line in data.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("type") == "request":
                entries.append(entry)
        return entries


def _token_of(entry: dict[str, Any]) -> str:
    return str((entry.get("auth") or {}).get("client_token") or (entry.get("request") or {}).get("client_token", ""))


class Bao:
    """One OpenBao server (the test suite's harness: raft storage, file audit device) with one Transit key,
    a token for kleidi (kleidi's own policy) and one for the peer (Transit policy + default)."""

    def __init__(self, workdir: Path) -> None:
        from tests.vault.openbao import OpenBao

        self.server = OpenBao(log_level="warn")
        try:
            self._setup(workdir)
        except BaseException:
            self.server.cleanup()
            raise

    def _setup(self, workdir: Path) -> None:
        from tests.vault import kleidi_vault
        from tests.vault.openbao import transit_policy, write_private

        self.server.start()
        self.key = self.server.create_key("bench-kms")
        self.kleidi_auth = kleidi_vault.token_auth(self.server, self.key, workdir)
        self.kleidi_backend = kleidi_vault.backend(self.server, self.key, self.kleidi_auth)
        policy = self.server.write_policy("bench-peer", transit_policy(self.key))
        self.peer_token_file = write_private(workdir / "peer-token", self.server.create_token([policy]))
        assert self.server.audit_path is not None
        self.audit = AuditCounter(self.server.audit_path)
        self.hashes = {
            "kleidi": self.audit_hash(Path(self.kleidi_auth["token_file"]).read_text().strip()),
            "peer": self.audit_hash(self.peer_token_file.read_text().strip()),
        }

    def audit_hash(self, value: str) -> str:
        with self.server.connect() as client:
            return str(client.sys.calculate_hash("harness-file", value)["data"]["hash"])

    def version(self) -> str:
        from bench.common import command_output
        from tests.vault.openbao import BAO
        return command_output([BAO, "version"]).split(" (")[0]

    def stop(self) -> None:
        self.server.cleanup()


def count_backend_calls(runner: Runner, bao: Bao, plugin: Plugin, who: str) -> dict[str, Any]:
    """OpenBao requests made with the plugin's token while it answers N Status, N Encrypt, N Decrypt calls."""
    n = runner.settings.counted_calls
    out: dict[str, Any] = {}
    for op in OPS:
        args = runner.load_args(plugin, op, 8)  # builds the Decrypt pool first, outside the window
        bao.audit.mark()
        began = time.monotonic()
        result = run_json([*args, "-count", str(n)])
        time.sleep(0.3)  # let the audit device flush the last lines
        window = time.monotonic() - began
        mine = [e for e in bao.audit.since_mark() if _token_of(e) == bao.hashes[who]]
        paths = Counter(str((e.get("request") or {}).get("path", "?")) for e in mine)
        out[op] = {"calls": n, "errors": result["errors"], "requests": len(mine),
                   "per_call": round(len(mine) / n, 3), "per_1000": round(1000 * len(mine) / n, 1),
                   "window_s": round(window, 2), "paths": dict(paths)}
        log(f"  {plugin.name:22} {n} {op:8} -> {len(mine)} OpenBao requests {dict(paths)}")
    return out


def idle_background(bao: Bao, seconds: float) -> dict[str, Any]:
    """Requests each plugin makes on its own, with no load (background refresh, probes, token checks)."""
    bao.audit.mark()
    time.sleep(seconds)
    entries = bao.audit.since_mark()
    out: dict[str, Any] = {"seconds": seconds}
    for who, digest in bao.hashes.items():
        mine = [e for e in entries if _token_of(e) == digest]
        out[who] = {"requests": len(mine), "per_minute": round(60 * len(mine) / seconds, 1),
                    "paths": dict(Counter(str((e.get("request") or {}).get("path", "?")) for e in mine))}
    return out


def transit(runner: Runner, bao: Bao, peer: PeerBinary, idle_seconds: float,
            profiler: Profiler | None = None) -> dict[str, Any]:
    log(f"kleidi and {peer.kind} on one OpenBao Transit key")
    out: dict[str, Any] = {"openbao_version": bao.version()}
    out["startup"] = startup(lambda n: Kleidi(runner.workdir, f"kl-vault-{n}", bao.kleidi_backend),
                             runner.settings.startup_samples)
    log(f"  kleidi (vault) start to ready: {out['startup']}")
    kleidi = Kleidi(runner.workdir, "kleidi-openbao", bao.kleidi_backend)
    other = peer_plugin(runner.workdir, peer, bao.server.http_addr, bao.key, bao.peer_token_file)
    try:
        kleidi.start()
        out["peer_startup_s"] = round(other.start(), 3)
        out["rows"] = runner.scenarios([kleidi, other])
        log("backend calls per operation")
        out["backend_calls"] = {"kleidi": count_backend_calls(runner, bao, kleidi, "kleidi"),
                                "peer": count_backend_calls(runner, bao, other, "peer")}
        out["idle"] = idle_background(bao, idle_seconds)
        log(f"  idle: {out['idle']}")
        out["kleidi_metrics"] = kleidi.metrics()
        if profiler is not None:
            out["profiles"] = profiler(kleidi, "transit", out)
    finally:
        kleidi.stop()
        other.stop()
    return out


__all__ = ["GoPlugin", "LoadSettings", "Runner", "ceiling", "local", "transit"]
