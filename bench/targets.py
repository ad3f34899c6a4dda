"""The targets of issue #6, evaluated on a results document. Each target says what it compares, the goal,
the measured value, whether it is met, by how much it is missed, and which scenario to profile if missed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

KLEIDI_LOCAL = "kleidi-local"
KLEIDI_OPENBAO = "kleidi-openbao"


@dataclass
class Target:
    id: str
    text: str
    goal: str
    measured: str
    ok: bool | None  # None: not measured in this run
    gap: str = ""
    profile: tuple[str, str, int] | None = None  # (kleidi plugin, op, concurrency) to profile when missed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_row(results: dict[str, Any], plugin: str, op: str, concurrency: int) -> dict[str, Any] | None:
    for section in ("local", "transit", "ceiling"):
        block = results.get(section)
        rows = block if isinstance(block, list) else (block or {}).get("rows", [])
        for row in rows:
            if row["plugin"] == plugin and row["op"] == op and row["concurrency"] == concurrency:
                return dict(row)
    return None


def _pct(x: float) -> str:
    return f"{x:.1f}%" if x < 10 else f"{x:.0f}%"


def _ratio_gap(value: float, limit: float, higher_is_better: bool) -> str:
    if higher_is_better:
        return f"{_pct(100 * (1 - value / limit))} short" if value < limit else ""
    return f"{_pct(100 * (value / limit - 1))} over" if value > limit else ""


def _floor(results: dict[str, Any], op: str, concurrency: int) -> str:
    """The same scenario against the no-op plugin: no plugin can do better on this machine."""
    noop = find_row(results, "noop", op, concurrency)
    return f" (no-op plugin: {noop['p99_ms']:.2f} ms)" if noop and concurrency > 1 else ""


def evaluate(results: dict[str, Any]) -> list[Target]:
    out: list[Target] = []
    peer = (results.get("peer") or {}).get("name", "peer")
    concurrencies = results.get("meta", {}).get("concurrencies", [1, 8, 64])
    top = max(concurrencies) if concurrencies else 64

    # -- OpenBao side by side
    for op in ("encrypt", "decrypt"):
        k, p = find_row(results, KLEIDI_OPENBAO, op, top), find_row(results, peer, op, top)
        if k and p and p["throughput"] > 0:
            ratio = k["throughput"] / p["throughput"]
            out.append(Target(f"openbao-{op}-c{top}-throughput",
                              f"OpenBao, {op.capitalize()} c={top}: kleidi throughput vs {peer}", ">= 1.50x",
                              f"{ratio:.2f}x ({k['throughput']:.0f}/s vs {p['throughput']:.0f}/s)", ratio >= 1.5,
                              _ratio_gap(ratio, 1.5, True), (KLEIDI_OPENBAO, op, top)))
        else:
            out.append(Target(f"openbao-{op}-c{top}-throughput", f"OpenBao, {op.capitalize()} c={top}: kleidi "
                              f"throughput vs {peer}", ">= 1.50x", "not measured", None))
        k, p = find_row(results, KLEIDI_OPENBAO, op, 1), find_row(results, peer, op, 1)
        if k and p and p["p50_ms"] > 0:
            ratio = k["p50_ms"] / p["p50_ms"]
            out.append(Target(f"openbao-{op}-c1-p50", f"OpenBao, {op.capitalize()} c=1: kleidi p50 vs {peer}",
                              "<= 1.10x", f"{ratio:.2f}x ({k['p50_ms']:.2f} ms vs {p['p50_ms']:.2f} ms)",
                              ratio <= 1.1, _ratio_gap(ratio, 1.1, False), (KLEIDI_OPENBAO, op, 1)))
        else:
            out.append(Target(f"openbao-{op}-c1-p50", f"OpenBao, {op.capitalize()} c=1: kleidi p50 vs {peer}",
                              "<= 1.10x", "not measured", None))

    # -- Status
    calls = ((results.get("transit") or {}).get("backend_calls") or {})
    kleidi_status = (calls.get("kleidi") or {}).get("status")
    peer_status = (calls.get("peer") or {}).get("status")
    if kleidi_status:
        peer_note = f"; {peer}: {peer_status['per_call']:.2f}" if peer_status else ""
        out.append(Target("status-backend-calls", "Status: OpenBao requests per Status call (kleidi)", "0",
                          f"{kleidi_status['per_call']:.3f} ({kleidi_status['requests']} in "
                          f"{kleidi_status['calls']}){peer_note}", kleidi_status["requests"] == 0,
                          "" if kleidi_status["requests"] == 0 else
                          f"{kleidi_status['requests']} requests: {kleidi_status['paths']}"))
    else:
        out.append(Target("status-backend-calls", "Status: OpenBao requests per Status call (kleidi)", "0",
                          "not measured", None))
    for plugin in (KLEIDI_LOCAL, KLEIDI_OPENBAO):
        for c in concurrencies:
            row = find_row(results, plugin, "status", c)
            if row:
                out.append(Target(f"status-p99-{plugin}-c{c}", f"Status p99, {plugin}, c={c}", "<= 2 ms",
                                  f"{row['p99_ms']:.2f} ms{_floor(results, 'status', c)}", row["p99_ms"] <= 2.0,
                                  _ratio_gap(row["p99_ms"], 2.0, False), (plugin, "status", c)))

    # -- local backend
    for op in ("encrypt", "decrypt"):
        row = find_row(results, KLEIDI_LOCAL, op, top)
        if row:
            out.append(Target(f"local-{op}-c{top}-throughput", f"Local backend, {op.capitalize()} c={top}: throughput",
                              ">= 3,000/s", f"{row['throughput']:,.0f}/s", row["throughput"] >= 3000,
                              _ratio_gap(row["throughput"], 3000, True), (KLEIDI_LOCAL, op, top)))
            out.append(Target(f"local-{op}-c{top}-p99", f"Local backend, {op.capitalize()} c={top}: p99", "<= 10 ms",
                              f"{row['p99_ms']:.2f} ms{_floor(results, op, top)}", row["p99_ms"] <= 10.0,
                              _ratio_gap(row["p99_ms"], 10.0, False),
                              (KLEIDI_LOCAL, op, top)))

    # -- footprint
    kleidi_rows = [r for r in (results.get("local") or {}).get("rows", []) + (results.get("transit") or {}).get(
        "rows", []) if r["plugin"] in (KLEIDI_LOCAL, KLEIDI_OPENBAO)]
    if kleidi_rows:
        worst = max(kleidi_rows, key=lambda r: r["peak_rss_mb"])
        out.append(Target("rss", "kleidi peak RSS under load (all scenarios)", "<= 80 MB",
                          f"{worst['peak_rss_mb']:.1f} MB ({worst['plugin']} {worst['op']} c={worst['concurrency']})",
                          worst["peak_rss_mb"] <= 80, _ratio_gap(worst["peak_rss_mb"], 80, False)))
    for section, plugin in (("local", KLEIDI_LOCAL), ("transit", KLEIDI_OPENBAO)):
        startup = (results.get(section) or {}).get("startup")
        if startup:
            out.append(Target(f"startup-{plugin}", f"Start to ready ({plugin}, worst of {len(startup['samples'])})",
                              "<= 1 s", f"{startup['max_s']:.2f} s (median {startup['median_s']:.2f} s)",
                              startup["max_s"] <= 1.0, _ratio_gap(startup["max_s"], 1.0, False)))

    # -- apiserver view
    api = results.get("apiserver") or {}
    identity = api.get("identity")
    noop = api.get("kms-noop")

    def noop_ratio(metric: Any) -> str:
        return f"; no-op KMS plugin: {metric(noop) / metric(identity):.2f}x" if noop and identity else ""

    for mode in (KLEIDI_LOCAL, KLEIDI_OPENBAO):
        run = api.get(mode)
        if not run or not identity:
            continue
        ratio = run["create"]["seconds"] / identity["create"]["seconds"]
        out.append(Target(f"api-create-{mode}", f"Apiserver: create {run['secrets']:,} Secrets, {mode} vs identity",
                          "<= 1.05x", f"{ratio:.2f}x ({run['create']['seconds']:.2f} s vs "
                          f"{identity['create']['seconds']:.2f} s{noop_ratio(lambda r: r['create']['seconds'])})",
                          ratio <= 1.05, _ratio_gap(ratio, 1.05, False)))
        ratio = run["list"]["seconds"] / identity["list"]["seconds"]
        out.append(Target(f"api-list-{mode}", f"Apiserver: first LIST after restart, {mode} vs identity",
                          "<= 1.10x", f"{ratio:.2f}x ({1000 * run['list']['seconds']:.0f} ms vs "
                          f"{1000 * identity['list']['seconds']:.0f} ms"
                          f"{noop_ratio(lambda r: r['list']['seconds'])})", ratio <= 1.1,
                          _ratio_gap(ratio, 1.1, False)))
        total, base = run["restart_ready_s"] + run["list"]["seconds"], (
            identity["restart_ready_s"] + identity["list"]["seconds"])
        out.append(Target(f"api-restart-list-{mode}", f"Apiserver: restart to ready + first LIST, {mode} vs identity "
                          "(the watch cache decrypts everything before ready)", "<= 1.10x",
                          f"{total / base:.2f}x ({total:.2f} s vs {base:.2f} s"
                          f"{noop_ratio(lambda r: r['restart_ready_s'] + r['list']['seconds'])})", total / base <= 1.1,
                          _ratio_gap(total / base, 1.1, False)))
        k = run.get("kleidi", {})
        decrypts, seeds = k.get("decrypt_calls_restart_and_list", 0), k.get("encrypt_calls_total", 0)
        out.append(Target(f"api-decrypts-{mode}", f"Apiserver: kleidi Decrypt calls on restart + LIST, {mode}",
                          "<= seeds written", f"{decrypts} Decrypt, {seeds} seeds written (Encrypt calls)",
                          decrypts <= seeds, "" if decrypts <= seeds else f"{decrypts - seeds} too many"))

    # -- the generator is not the bottleneck
    for op in ("status", "encrypt", "decrypt"):
        ceiling = find_row(results, "noop", op, top)
        best = max((r["throughput"] for r in kleidi_rows if r["op"] == op and r["concurrency"] == top), default=0.0)
        if ceiling and best:
            ratio = ceiling["throughput"] / best
            out.append(Target(f"ceiling-{op}", f"Load generator ceiling (no-op plugin) vs best kleidi, {op} c={top}",
                              ">= 2x", f"{ratio:.1f}x ({ceiling['throughput']:,.0f}/s vs {best:,.0f}/s)", ratio >= 2,
                              _ratio_gap(ratio, 2, True)))
    return out
