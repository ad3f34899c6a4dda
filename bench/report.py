"""docs/benchmarks.md, generated from a results document (bench/results/latest.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import RESULTS
from bench.targets import Target, evaluate, find_row

OP_TITLE = {"status": "Status", "encrypt": "Encrypt", "decrypt": "Decrypt"}
# The tools' own benchmarks, each run by its own command into bench/results/<name>.json (not by scripts/bench.sh).
TOOL_RESULTS = ("scan", "recover", "resources")


# Measured by hand while the TPM backend was written; bench/ does not drive the hardware backends yet.
HARDWARE_BACKENDS = """\
## Hardware backends (measured by hand, not yet in bench/)

Sequential calls straight through each backend (no gRPC), 32-byte seeds, 200 calls after 10 warm-up
calls, on the 2-core test machine (2026-12-02). These were measured with a one-off script while the
backends were written; the bench harness (bench/targets.py) does not run these backends yet, so
they are not part of this run's tables and `scripts/bench.sh` does not reproduce them.

| backend | Encrypt p50 / p99 | Decrypt p50 / p99 |
|---|---|---|
| tpm, `mechanism: aes-cfb`, swtpm 0.7.1 | 2.5 ms / 7.0 ms | 2.5 ms / 6.9 ms |
| tpm, `mechanism: rsa-oaep`, swtpm 0.7.1 | 3.5 ms / 6.8 ms | 6.1 ms / 11.1 ms |

A hardware TPM is far slower than swtpm (see [backends/tpm.md](backends/tpm.md#performance)).
Status makes no TPM (or other backend) call whatever the backend: the service layer answers it from
the key state refreshed in the background, and never calls the backend for it
(tests/test_status_is_cheap.py counts backend calls with a local backend; the service code it
exercises is the same for every backend). Envelope format 2 adds one AES-256-GCM seal of the seed in kleidi (a few
microseconds) to every call; its effect on the socket-level numbers above has not been measured yet."""

def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def _result(t: Target) -> str:
    if t.ok is None:
        return "not measured"
    return "met" if t.ok else f"**MISSED** ({t.gap})"


def _rows_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| plugin | op | c | calls/s | p50 ms | p99 ms | max ms | errors | peak RSS MB | plugin CPU % |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        errors = str(r["errors"]) + (f" {r['error_codes']}" if r["errors"] else "")
        lines.append(f"| {r['plugin']} | {OP_TITLE[r['op']]} | {r['concurrency']} | {r['throughput']:,.0f} | "
                     f"{_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r['max_ms'])} | {errors} | "
                     f"{_fmt(r['peak_rss_mb'], 1)} | {_fmt(r['cpu_percent'], 0)} |")
    return lines


def load_tools(directory: Path = RESULTS) -> dict[str, Any]:
    """The committed results of the tools' benchmarks (bench/results/scan.json, recover.json, resources.json)."""
    return {name: json.loads(path.read_text()) for name in TOOL_RESULTS
            if (path := directory / f"{name}.json").is_file()}


def _load(loadavg: list[float] | str) -> str:
    values = loadavg.split() if isinstance(loadavg, str) else loadavg
    return " / ".join(f"{float(v):.2f}" for v in values)


def _tools_section(tools: dict[str, Any]) -> list[str]:
    """Tools and resources: kleidi scan, kleidi recover and kleidi serve's footprint, each from its own results file."""
    out = ["## Tools and resources\n",
           "Measured apart from the run above, each by its own command (below) into its own file in `bench/results/`; "
           "`scripts/bench.sh` does not run them, and `scripts/bench.sh --render` renders them from those files. "
           "Objects per second is the wall time of the whole command (start-up included), best of the runs; CPU is "
           "the tool process's user + system seconds in that run; peak RSS is the largest over all runs (the "
           "kernel's accounting of the child, wait4).\n"]
    w = out.append
    rows, commands, loads = [], [], []
    for doc, what, command in (
            (tools.get("scan"), "`kleidi scan` of a real etcd, {value_bytes}-byte values, page size {page_size}",
             "python -m bench.scan --objects {objects} --size {value_bytes} --page-size {page_size} --runs {runs} "
             "--json bench/results/scan.json"),
            (tools.get("recover"), "`kleidi recover --snapshot` of Secrets ({secret_bytes} bytes of data each) from a "
             "{snapshot_mb} MiB snapshot into YAML files",
             "python -m bench.recover --objects {objects} --size {secret_bytes} --runs {runs} "
             "--json bench/results/recover.json")):
        if doc is None:
            continue
        best = min(doc["runs"], key=lambda r: r["seconds"])
        fields = {**doc, "runs": len(doc["runs"])}
        machine = doc["machine"]
        rows.append(f"| {what.format(**fields)} | {doc['objects']:,} | {doc['objects_per_second']:,} | "
                    f"{best['seconds']:.1f} s | {doc['peak_rss_mb']:.1f} MiB | {best['cpu_seconds']:.1f} s | "
                    f"{doc.get('date', '?')}, {machine['nproc']} cores, Python {machine['python']} | "
                    f"{_load(machine['loadavg'])} |")
        commands.append(command.format(**fields))
        loads.append((float(machine["loadavg"][0]), int(machine["nproc"])))
    if rows:
        w("| what | objects | objects/s | wall (best run) | peak RSS | CPU (best run) | when, where | "
          "load average (1 / 5 / 15 min, at the end) |")
        w("|---|---:|---:|---:|---:|---:|---|---|")
        out.extend(rows)
        w("")
    resources = tools.get("resources")
    if resources:
        from bench.resources import Burst, Figures, table

        meta, settings = resources["meta"], resources["settings"]
        figures = [Figures(**{**f, "bursts": [Burst(**{k: v for k, v in b.items() if k != "cpu_per_1000"})
                                              for b in f["bursts"]]}) for f in resources["figures"]]
        w("### kleidi serve's memory and CPU\n")
        w(f"`kleidi serve` with production settings, driven over its socket as kube-apiserver drives it: "
          f"{settings['idle']:.0f} s idle with a Status call every {settings['status_every']:.0f} s, then bursts of "
          f"{settings['calls']:,} Encrypt, Decrypt and Status calls, then {settings['settle']:.0f} s idle again "
          "(the steps are in [deploy/static-pod.md](deploy/static-pod.md#resources), whose requests and limits come "
          f"from these figures). {meta['date']}, kleidi {meta['kleidi']}, Python {meta['python']}, grpcio "
          f"{meta['grpcio']}, {meta['nproc']} x {meta['cpu']}, load average before {_load(meta['loadavg_before'])}.\n")
        w(table(figures) + "\n")
        w("Suggested by the script's rule: " + ", ".join(f"`{k}` {v}" for k, v in resources["suggested"].items())
          + ".\n")
        backends = settings.get("backend") or ["local", "vault", "image"]
        commands.append("python -m bench.resources " + " ".join(f"--backend {b}" for b in backends)
                        + f" --idle {settings['idle']:g} --status-every {settings['status_every']:g} "
                        f"--calls {settings['calls']} --settle {settings['settle']:g} "
                        "--json bench/results/resources.json")
        loads.append((float(meta["loadavg_before"].split()[0]), int(meta["nproc"])))
        if "image" not in backends:
            w("The image column (`--backend image`: the local backend in kleidi's image under podman) was not part "
              "of this run; [deploy/static-pod.md](deploy/static-pod.md#resources) has a measured one.\n")
    busy = [load for load, cores in loads if load >= 0.5]
    if busy:
        w(f"Other work shared the machine's {loads[0][1]} cores while these were measured (1-minute load average "
          f"up to {max(busy):.2f}; each figure's is shown with it): wall times and objects per second are "
          "pessimistic; CPU seconds and RSS are the least affected.\n")
    w("Reproduce, from the repository root with the test venv (`scripts/setup.sh test`; they start a real etcd "
      "and, for Vault, the test suite's OpenBao):\n")
    w("```sh\n" + "\n".join(f".venv/bin/{c}" for c in commands) + "\n```\n")
    return out


def render(results: dict[str, Any], tools: dict[str, Any] | None = None) -> str:
    """The page: the run in ``results`` (latest.json), then the tools' results (``load_tools()`` when None)."""
    meta = results["meta"]
    peer = results.get("peer") or {}
    targets = evaluate(results)
    out: list[str] = []
    w = out.append
    w("# Benchmarks\n")
    w("kleidi side by side with a Go plugin on the same OpenBao Transit key, kleidi on its local backend, and a "
      "real kube-apiserver's view of the cost of encryption, all measured in one run on one machine by "
      "`bench/` (issue #6). The figures below are generated by the harness: do not edit them by hand.\n")
    w("## Reproduce\n")
    w("```sh\nscripts/bench.sh            # the full run that produced this page (about 13 minutes on 2 cores)\n"
      "scripts/bench.sh --quick    # the same scenarios, shorter (under 2 minutes), written to "
      "bench/results/quick.{json,md} only\n"
      "scripts/bench.sh --render   # rewrite this page from bench/results/latest.json without measuring\n```\n")
    w(f"This page: `{meta['command']}`, {meta['date']}, mode `{meta['mode']}`, {meta['elapsed_s'] / 60:.1f} minutes. "
      f"Machine-readable results: [bench/results/latest.json](../bench/results/latest.json).\n")

    w("## Machine and versions\n")
    w("| | |\n|---|---|")
    machine = meta["machine"]
    for key in ("nproc", "cpu", "memory", "kernel", "loadavg_before", "loadavg_after"):
        w(f"| {key} | {machine.get(key, '?')} |")
    shown = dict(meta["versions"])
    if peer.get("kind") == "transit-ref":
        shown["peer"] = "go-transit-ref (bench/loadgen), standing in for vault-kubernetes-kms v1.4.0"
    for key, value in shown.items():
        w(f"| {key} | {value} |")
    w("")

    w("## Targets\n")
    if peer.get("name") != "vault-kubernetes-kms":
        w(f"> **The peer is not vault-kubernetes-kms.** {peer.get('note', '')} The comparison uses "
          f"`{peer.get('name')}` instead: a Go plugin in `bench/loadgen` that makes, per KMS call, the same "
          "Vault requests as vault-kubernetes-kms v1.4.0 (Encrypt: encrypt + read key; Decrypt: decrypt; Status: "
          "read key + an encrypt/decrypt round trip), through the same client library "
          "(`github.com/hashicorp/vault/api`), logging one JSON line per call as that plugin does. Put a "
          "vault-kubernetes-kms binary at `~/.cache/kleidi/bin/vault-kubernetes-kms` (or set `BENCH_VKK`) "
          "and the harness compares with it instead.\n")
    w("| target | goal | measured | result |\n|---|---|---|---|")
    for t in targets:
        w(f"| {t.text} | {t.goal} | {t.measured} | {_result(t)} |")
    w("\nThe load is a closed loop: c callers, each sending its next call when the last returns. By Little's law "
      "the mean latency is then c / throughput, so at c=64 a p99 of 2 ms needs more than 32,000 calls/s and a p99 "
      "of 10 ms more than 6,400/s; the no-op Go plugin's p99 at the same c, shown beside those figures, is the "
      "floor on this machine. kube-apiserver itself calls Status about once a minute, and Encrypt/Decrypt only "
      "on a new seed or a cache miss.")
    missed = [t for t in targets if t.ok is False]
    w(f"\n{len([t for t in targets if t.ok])} met, {len(missed)} missed"
      + (f", {len([t for t in targets if t.ok is None])} not measured" if any(t.ok is None for t in targets)
         else "") + ". Where a target is missed, [Profiles](#profiles-of-missed-targets) shows where kleidi's "
      "time goes.\n")

    w("## KMS v2 calls over the unix socket\n")
    s = meta["load"]
    w(f"Closed loop: `c` callers each send their next call when the last one returns, over one gRPC connection "
      f"(as kube-apiserver uses), {s['warmup']} s warm-up then {s['duration']} s measured per row. Encrypt sends a "
      "fresh random 32-byte seed and a UUIDv4 uid; Decrypt replays a pool of "
      f"{s['pool']} seeds that the same plugin wrapped, with their key_id and annotations, and checks the "
      "plaintext. Peak RSS and CPU are the plugin's (process tree, /proc) over the row.\n")
    w("### Load generator ceiling (no-op Go plugin)\n")
    w("\n".join(_rows_table(results.get("ceiling", []))) + "\n")
    w("### kleidi, local backend\n")
    w("\n".join(_rows_table((results.get("local") or {}).get("rows", []))) + "\n")
    transit = results.get("transit") or {}
    w(f"### kleidi and {peer.get('name', 'the peer')} on one OpenBao Transit key (alternating, row by row)\n")
    bao_version = str(transit.get("openbao_version", "?")).removeprefix("OpenBao ")
    w(f"OpenBao {bao_version}, raft storage, file audit device on, plain HTTP on loopback; "
      "both plugins use a token; kleidi with its defaults (refresh 5 s, probe 30 s, 32 connections).\n")
    rows = transit.get("rows", [])
    w("\n".join(_rows_table(rows)) + "\n")
    ratios = ["| op | c | kleidi calls/s | peer calls/s | throughput ratio | kleidi p50 / peer p50 |",
              "|---|---:|---:|---:|---:|---:|"]
    for op in OP_TITLE:
        for c in meta.get("concurrencies", []):
            k, p = find_row(results, "kleidi-openbao", op, c), find_row(results, peer.get("name", ""), op, c)
            if k and p and p["throughput"] and p["p50_ms"]:
                ratios.append(f"| {OP_TITLE[op]} | {c} | {k['throughput']:,.0f} | {p['throughput']:,.0f} | "
                              f"{k['throughput'] / p['throughput']:.2f}x | {k['p50_ms'] / p['p50_ms']:.2f}x |")
    w("\n".join(ratios) + "\n")

    w("### OpenBao requests per operation\n")
    calls = transit.get("backend_calls") or {}
    w(f"Requests in OpenBao's audit log made with each plugin's token while it answered "
      f"{meta['load']['counted_calls']:,} calls of one kind (c=8); the plugin's own background work in that "
      "window counts too.\n")
    w("| plugin | per 1,000 Status | per 1,000 Encrypt | per 1,000 Decrypt | paths (Status / Encrypt / Decrypt) |")
    w("|---|---:|---:|---:|---|")
    for who, name in (("kleidi", "kleidi-openbao"), ("peer", peer.get("name", "peer"))):
        c = calls.get(who)
        if c:
            w(f"| {name} | {c['status']['per_1000']:,.0f} | {c['encrypt']['per_1000']:,.0f} | "
              f"{c['decrypt']['per_1000']:,.0f} | {c['status']['paths'] or '-'} / {c['encrypt']['paths']} / "
              f"{c['decrypt']['paths']} |")
    idle = transit.get("idle")
    if idle:
        w(f"\nWith no load for {idle['seconds']:.0f} s: kleidi made {idle['kleidi']['requests']} requests "
          f"({idle['kleidi']['paths'] or 'none'}), {peer.get('name')} {idle['peer']['requests']} "
          f"({idle['peer']['paths'] or 'none'}). kube-apiserver calls Status once a minute per apiserver, so "
          "per hour the peer's Status alone costs 60 x its per-Status requests; kleidi's background refresh "
          "(every 5 s) and probe (every 30 s) cost the same whatever the apiserver does.\n")

    w("### Start to ready\n")
    w("From spawning `kleidi serve` until Status answers `healthz: ok` on the socket.\n")
    w("| plugin | samples (s) | median | worst |\n|---|---|---:|---:|")
    for section, name in (("local", "kleidi-local"), ("transit", "kleidi-openbao")):
        st = (results.get(section) or {}).get("startup")
        if st:
            w(f"| {name} | {', '.join(f'{x:.2f}' for x in st['samples'])} | {st['median_s']:.2f} | {st['max_s']:.2f} |")
    if transit.get("peer_startup_s") is not None:
        w(f"| {peer.get('name')} | {transit['peer_startup_s']:.2f} | | |")
    w("")

    api = results.get("apiserver") or {}
    if api:
        w("## The apiserver's view\n")
        first = next(iter(api.values()))
        w(f"Each mode runs on its own fresh control plane (etcd {meta['versions'].get('etcd', '?')}, "
          f"kube-apiserver {meta['versions'].get('kube-apiserver', '?')}, the e2e harness `tests/e2e/cluster.py`). "
          f"{first['secrets']:,} Secrets (256 random bytes each) are created through the API by "
          f"{first['concurrency']} concurrent callers on one HTTP/2 connection; then the apiserver is restarted "
          "(etcd and kleidi keep running) and one unpaginated LIST of all of them is timed. With several rounds "
          "the modes alternate; " + ("create, first LIST and restart figures are each the median over the rounds.\n"
                                     if meta.get("api_medians") else "the median round (by create time) is shown.\n"))
        w("| mode | create s | creates/s | create p99 ms | restart to ready s | first LIST ms | second LIST ms | "
          "kleidi Encrypt (seeds) | kleidi Decrypt on restart + LIST | kleidi CPU s (create / restart+LIST) |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for mode, run in api.items():
            k = run.get("kleidi")
            kcpu = (f"{run['create'].get('kleidi_cpu_seconds', 0):.2f} / {run['list'].get('kleidi_cpu_seconds', 0):.2f}"
                    if k else "")
            w(f"| {mode} | {run['create']['seconds']:.2f} | {run['create']['per_second']:,.0f} | "
              f"{run['create']['p99_ms']:.1f} | {run['restart_ready_s']:.2f} | {1000 * run['list']['seconds']:.0f} | "
              f"{1000 * run['second_list']['seconds']:.0f} | {k['encrypt_calls_total'] if k else ''} | "
              f"{k['decrypt_calls_restart_and_list'] if k else ''} | {kcpu} |")
        w("\nAll rounds (create s / first LIST s / restart to ready s):\n")
        for mode, run in api.items():
            w(f"- {mode}: {run['all_create_s']} / {run['all_first_list_s']} / {run['all_restart_ready_s']}")
        w("\n`kms-noop` is the no-op Go KMS v2 plugin from the socket tables as the apiserver's provider: a plugin "
          "that costs nothing. kleidi is called once per seed, not per object: KMS v2 wraps one seed per "
          "apiserver start (and per key_id change) and derives a per-object key from it inside the apiserver. "
          "So the gap between `identity` and `kms-noop` is the apiserver's own envelope encryption (key "
          "derivation and AES-GCM per object, on write and on read), which any KMS v2 plugin pays; the gap "
          "between `kms-noop` and kleidi is kleidi's (see also the kleidi CPU column).\n")

    w("## Profiles of missed targets\n")
    profiles: dict[str, Any] = {}
    for section in ("local", "transit"):
        profiles.update((results.get(section) or {}).get("profiles") or {})
    if not missed:
        w("No target was missed.\n")
    for key, prof in profiles.items():
        related = [t.text for t in missed if t.profile and "/".join(map(str, t.profile)) == key]
        w(f"### {key}\n")
        if related:
            w("Missed: " + "; ".join(related) + ".\n")
        if "error" in prof:
            w(f"Profile not taken: {prof['error']}\n")
            continue
        load = prof.get("load_during_profile", {})
        w(f"py-spy, 100 Hz, {prof['samples']} samples of kleidi's Python threads while the scenario ran again "
          f"({load.get('throughput', 0):,.0f} calls/s, p99 {load.get('p99_ms') or 0:.1f} ms under the profiler). "
          "Self time of `Handle._run` is spent in gRPC's Cython/C core (completion-queue callbacks, message "
          "(de)serialisation, HTTP/2 framing) called from asyncio callbacks, which have no Python frame of their "
          "own; self time of `Thread.run` is a thread running native code, most likely grpc.aio's completion-queue "
          "poller thread; `EpollSelector.select` is the event loop waiting for I/O (py-spy's idle detection is "
          "approximate with --nonblocking, so some waiting is counted). Raw stacks: `"
          + str(prof.get("file", "")) + "` (collapsed format, git-ignored).\n")
        w("| top self time | % | | top total time (below the event loop) | % |\n|---|---:|---|---|---:|")
        selfs, totals = prof["top_self"], prof["top_total"]
        for i in range(max(len(selfs), len(totals))):
            a = selfs[i] if i < len(selfs) else {"function": "", "percent": ""}
            b = totals[i] if i < len(totals) else {"function": "", "percent": ""}
            w(f"| `{a['function']}` | {a['percent']} | | `{b['function']}` | {b['percent']} |")
        w("")
    w(HARDWARE_BACKENDS)
    w("## What was tried to make kleidi faster\n")
    w("Measured by hand on the same machine while the harness was built (2026-11-23), with the same load "
      "generator; not part of this run's figures, and noisy (another job shared the machine).\n")
    w("| change | measured | kept |\n|---|---|---|")
    w("| Python gRPC server alone, no kleidi code (Status, c=64): grpc.aio on asyncio / sync server on a "
      "4-thread pool / grpc.aio on uvloop | about 1,900 / 2,500 / 2,700 calls/s (the no-op Go plugin: over "
      "20,000) | uvloop: `server.event_loop`, default `uvloop` |")
    w("| kleidi local, Encrypt c=64, asyncio loop vs uvloop | about 1,070/s vs 1,640/s in the same minute | "
      "uvloop |")
    w("| Transit `batch_input` coalescing, `max_in_flight` 1 / 2 / 4 (OpenBao, Encrypt c=64, ratio to the Go "
      "reference plugin) | 1.87x / 1.34x / 1.34x; Decrypt 1.26x / 0.97x / 0.92x | 1 (the default) |")
    w("| SO_PEERCRED caller gate in front of gRPC | see `kleidi-local` vs `kleidi-local-no-caller-auth` in the "
      "tables above: the relay costs up to about a fifth of the throughput at c=64 | on by default: refusing "
      "other users is worth it; `server.authenticate_callers: false` removes it |")
    w("\nWhat is left is gRPC itself: in every profile below, kleidi's own code (validation, envelope, "
      "metrics, audit) is a few percent; the rest is grpc.aio's C core, its poller thread and the event loop. "
      "A Python gRPC server on this 2-core machine tops out near 2,700 trivial calls/s, so targets that need "
      "more (p99 of 10 ms at c=64 needs 6,400/s by Little's law) are out of reach for any Python plugin here.\n")
    w("## Method and caveats\n")
    w("- One machine runs everything: the plugin, the load generator, OpenBao, etcd and kube-apiserver share "
      f"{machine.get('nproc')} cores, so absolute numbers are lower than on a dedicated node, and the side-by-side "
      "rows alternate (kleidi first in one cell, the peer first in the next) so that drifting noise hits both. "
      "The load average before and after the run is in the machine table: a busy machine makes every figure "
      "noisier.\n"
      "- The load generator is `bench/loadgen` (Go, `k8s.io/kms/apis/v2` stubs, grpc-go dialled as kube-apiserver "
      "dials: insecure unix socket, authority `localhost`, WaitForReady, 3 s deadline). ghz was not used: it "
      "cannot feed each Decrypt the ciphertext, key_id and annotations an Encrypt returned, nor send a fresh "
      "random seed per call. Its ceiling against a no-op plugin is the first table; the generator's CPU is in the "
      "JSON (`loadgen_cpu_seconds`).\n"
      "- kleidi runs as `kleidi serve` with production defaults (log level info, refresh 5 s, probe 30 s, "
      "metrics listener on, audit log off), started through the test suite's `KleidiProcess`.\n"
      "- Targets are report figures, not test assertions.\n")
    tools = load_tools() if tools is None else tools
    if tools:
        out.extend(_tools_section(tools))
    return "\n".join(out)
