"""``python -m bench [--quick]``: every figure of docs/benchmarks.md in one run (see bench/README.md)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench import apiserver, kms, report
from bench.common import RESULTS, ROOT, build_loadgen, command_output, find_peer, log
from bench.plugins import Plugin
from bench.profile import profile_scenario
from bench.targets import evaluate


@dataclass(frozen=True)
class Mode:
    load: kms.LoadSettings
    secrets: int  # Secrets created per apiserver mode
    api_rounds: int  # rounds of the apiserver view (modes alternate; the median round is kept)
    idle_seconds: float  # window for the plugins' own background requests to OpenBao
    profile_seconds: float
    profiles_per_section: int
    api_modes: tuple[str, ...]  # apiserver view: identity, kms-noop (the no-op Go plugin), kleidi-local, -openbao


FULL = Mode(kms.LoadSettings(duration=10.0, warmup=2.0, concurrencies=(1, 8, 64), pool=1024, counted_calls=1000,
                             startup_samples=5),
            secrets=5000, api_rounds=3, idle_seconds=30.0, profile_seconds=8.0, profiles_per_section=6,
            api_modes=("identity", "kms-noop", "kleidi-local", "kleidi-openbao"))
QUICK = Mode(kms.LoadSettings(duration=1.5, warmup=0.3, concurrencies=(1, 64), pool=256, counted_calls=100,
                              startup_samples=2),
             secrets=300, api_rounds=1, idle_seconds=3.0, profile_seconds=3.0, profiles_per_section=0,
             api_modes=("identity", "kms-noop", "kleidi-local"))


def machine() -> dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), 0)
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory": f"{mem_kb / 2**20:.1f} GiB", "kernel": platform.release(),
            "loadavg_before": " ".join(Path("/proc/loadavg").read_text().split()[:3])}


def versions(peer: Any, apiserver_binary: str | None) -> dict[str, str]:
    from tests.e2e.cluster import ETCD
    from tests.vault.openbao import BAO

    gomod = (ROOT / "bench" / "loadgen" / "go.mod").read_text()
    grpc_go = next((line.split()[1] for line in gomod.splitlines() if "google.golang.org/grpc " in line), "?")
    import kleidi

    source = Path(kleidi.__file__).resolve().parents[1]
    git = command_output(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12"])
    where = f"git {git}" if source == ROOT / "src" else f"source {source}, not the work tree"
    return {
        "kleidi": f"{version('kleidi')} ({where})",
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "openbao": command_output([BAO, "version"]).split(" (")[0],
        "peer": f"vault-kubernetes-kms {peer.version}" if peer.kind == "vault-kubernetes-kms" else
                "go-transit-ref (bench/loadgen), standing in for vault-kubernetes-kms v1.4.0",
        "kube-apiserver": command_output([apiserver_binary, "--version"]) if apiserver_binary else "not run",
        "etcd": command_output([ETCD, "--version"]).splitlines()[0].replace("etcd Version: ", ""),
        "go": command_output(["go", "version"]).replace("go version ", ""),
        "load generator": f"bench/loadgen, grpc-go {grpc_go}",
    }


def make_profiler(results: dict[str, Any], seconds: float, limit: int, runner: kms.Runner) -> kms.Profiler:
    """Profile, while kleidi is still running, the scenarios behind the targets it has missed so far."""

    def profiler(plugin: Plugin, section: str, partial: dict[str, Any]) -> dict[str, Any]:
        missed = [t for t in evaluate({**results, section: partial}) if t.ok is False and t.profile
                  and t.profile[0] == plugin.name]
        wanted: list[tuple[str, str, int]] = []
        for t in missed:
            assert t.profile is not None
            if t.profile not in wanted:
                wanted.append(t.profile)
        out: dict[str, Any] = {}
        for name, op, concurrency in wanted[:limit]:
            key = f"{name}/{op}/{concurrency}"
            log(f"  profiling {key} (missed target)")
            path = RESULTS / "profiles" / f"{name}-{op}-c{concurrency}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            out[key] = profile_scenario(plugin.pid, runner.load_args(plugin, op, concurrency), seconds, path)
            out[key]["file"] = str(path.relative_to(ROOT))
        return out

    return profiler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench.sh", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short run for development (under 2 minutes)")
    parser.add_argument("--skip", action="append", default=[], choices=["ceiling", "local", "openbao", "apiserver"],
                        help="leave a section out (repeatable)")
    parser.add_argument("--no-profile", action="store_true", help="do not profile missed targets")
    parser.add_argument("--output", type=Path, help="results JSON (default bench/results/latest.json, or "
                        "quick.json with --quick); the Markdown report is written next to it")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md (full mode)")
    parser.add_argument("--render", action="store_true", help="measure nothing: regenerate docs/benchmarks.md "
                        "from bench/results/latest.json and the tools' results (scan, recover, resources)")
    args = parser.parse_args(argv)
    if args.render:
        stored = json.loads((RESULTS / "latest.json").read_text())
        (ROOT / "docs" / "benchmarks.md").write_text(report.render(stored))
        log("wrote docs/benchmarks.md from bench/results/latest.json and the tools' results")
        return 0
    conf = QUICK if args.quick else FULL
    began = time.monotonic()
    command = os.environ.get("BENCH_COMMAND", "python -m bench") + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))

    loadgen = build_loadgen()
    peer = find_peer(loadgen)
    binary = None
    if "apiserver" not in args.skip:
        from tests.e2e.cluster import kube_apiserver_binary
        binary = kube_apiserver_binary()
    settings = conf.load
    results: dict[str, Any] = {
        "meta": {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
                 "mode": "quick" if args.quick else "full", "machine": machine(),
                 "versions": versions(peer, binary), "concurrencies": list(settings.concurrencies),
                 "api_medians": True,
                 "load": {"duration": settings.duration, "warmup": settings.warmup, "pool": settings.pool,
                          "counted_calls": settings.counted_calls}},
        "peer": {"name": "vault-kubernetes-kms" if peer.kind == "vault-kubernetes-kms" else "go-transit-ref",
                 "kind": peer.kind, "version": peer.version, "note": peer.note},
    }
    workdir = Path(tempfile.mkdtemp(prefix="klb-", dir="/tmp"))
    workdir.chmod(0o700)
    runner = kms.Runner(loadgen, settings, workdir)
    profiler = None
    if not args.no_profile and conf.profiles_per_section:
        profiler = make_profiler(results, conf.profile_seconds, conf.profiles_per_section, runner)
    bao: kms.Bao | None = None
    try:
        if "ceiling" not in args.skip:
            results["ceiling"] = kms.ceiling(runner)
        if "local" not in args.skip:
            results["local"] = kms.local(runner, profiler)
        if "openbao" not in args.skip or binary is not None:
            bao = kms.Bao(workdir)
        if "openbao" not in args.skip and bao is not None:
            results["transit"] = kms.transit(runner, bao, peer, conf.idle_seconds, profiler)
        if binary is not None:
            results["apiserver"] = apiserver.apiserver_view(
                conf.secrets, 16, loadgen, binary,
                [m for m in conf.api_modes if m != "kleidi-openbao" or bao], bao.kleidi_backend if bao else None,
                rounds=conf.api_rounds)
    finally:
        if bao is not None:
            bao.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    results["meta"]["machine"]["loadavg_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    results["meta"]["elapsed_s"] = round(time.monotonic() - began, 1)
    results["targets"] = [t.as_dict() for t in evaluate(results)]
    output = args.output or RESULTS / ("quick.json" if args.quick else "latest.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    markdown = report.render(results)
    output.with_suffix(".md").write_text(markdown)
    if not args.quick and not args.no_docs and args.output is None:
        (ROOT / "docs" / "benchmarks.md").write_text(markdown)
        log("wrote docs/benchmarks.md")
    log(f"wrote {output} and {output.with_suffix('.md')} in {results['meta']['elapsed_s'] / 60:.1f} minutes")
    for t in evaluate(results):
        state = "met" if t.ok else ("not measured" if t.ok is None else f"MISSED ({t.gap})")
        print(f"{t.text:75} {t.goal:>16}  {t.measured:55} {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
