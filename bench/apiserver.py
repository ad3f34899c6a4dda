"""The apiserver's view: Secrets created through a real kube-apiserver on a real etcd (the e2e harness),
with kleidi (local backend, then OpenBao Transit) and with the ``identity`` provider; then the apiserver
is restarted (etcd and kleidi keep running) and the first full LIST is timed."""

from __future__ import annotations

import shutil
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import procmon
from bench.common import log, run_json
from bench.plugins import GoPlugin, Kleidi, noop_plugin
from tests.conftest import wait_for

IDENTITY_CONFIG = """\
apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - identity: {}
"""


def _start_and_wait(api: Any) -> float:
    """Start kube-apiserver and poll /readyz every 50 ms (the e2e harness polls every 0.5 s); return seconds."""
    began = time.monotonic()
    api.start(wait=False)

    def ready() -> bool:
        if api.proc.poll() is not None:
            raise RuntimeError(f"kube-apiserver exited with {api.proc.returncode}:\n{api.log_tail()}")
        try:
            return bool(api.get("/readyz", timeout=2)[0] == 200)
        except (OSError, ssl.SSLError):
            return False

    wait_for(ready, 120, "kube-apiserver /readyz", interval=0.05)
    return time.monotonic() - began


def _delta(after: dict[str, float], before: dict[str, float], key: str) -> int:
    return int(after.get(key, 0.0) - before.get(key, 0.0))


def run_mode(mode: str, secrets: int, concurrency: int, loadgen: Path, binary: str,
             vault_backend: dict[str, Any] | None = None) -> dict[str, Any]:
    """One fresh control plane (own etcd); ``mode`` is identity, kms-noop (the no-op Go KMS v2 plugin: the
    apiserver's own cost of KMS v2 envelope encryption, with a plugin that costs nothing), kleidi-local or
    kleidi-openbao."""
    from tests.conftest import run_kleidi
    from tests.e2e.cluster import TOKEN
    from tests.e2e.conftest import ControlPlane

    workdir = Path(tempfile.mkdtemp(prefix="klb-api-", dir="/tmp"))
    workdir.chmod(0o700)
    plane = ControlPlane(workdir, binary)
    kleidi: Kleidi | None = None
    noop: GoPlugin | None = None
    out: dict[str, Any] = {"mode": mode, "secrets": secrets, "concurrency": concurrency}
    try:
        if mode == "identity":
            config = workdir / "identity-encryption-config.yaml"
            config.write_text(IDENTITY_CONFIG)
        elif mode == "kms-noop":
            noop = noop_plugin(workdir, loadgen)
            noop.start()
            result = run_kleidi("encryption-config", "--name", "kleidi", "--endpoint", noop.endpoint,
                                "--resources", "secrets")
            if result.returncode != 0:
                raise RuntimeError(result.stderr)
            config = workdir / "noop-encryption-config.yaml"
            config.write_text(result.stdout)
        else:
            kleidi = Kleidi(workdir, "kleidi", vault_backend if mode == "kleidi-openbao" else None)
            kleidi.start()
            config = plane.encryption_config(kleidi.process)
        api = plane.apiserver(config=config, start=False)
        out["start_ready_s"] = round(_start_and_wait(api), 2)
        wait_for(lambda: api.get("/api/v1/namespaces/default")[0] == 200, 60, "the default namespace")
        kube = ["-server", api.url, "-token", TOKEN, "-ca", str(api.dir / "certs" / "apiserver.crt")]
        m0 = kleidi.metrics() if kleidi else {}
        monitor = procmon.Monitor(kleidi.pid).start() if kleidi else None
        out["create"] = run_json([str(loadgen), "secrets-create", *kube, "-n", str(secrets), "-c", str(concurrency)])
        if monitor is not None:
            out["create"]["kleidi_cpu_seconds"] = round(monitor.stop().cpu_seconds, 3)
        if out["create"]["errors"]:
            raise RuntimeError(f"{mode}: {out['create']['errors']} creates failed: {out['create'].get('first_error')}")
        m1 = kleidi.metrics() if kleidi else {}

        api.stop()
        monitor = procmon.Monitor(kleidi.pid).start() if kleidi else None
        out["restart_ready_s"] = round(_start_and_wait(api), 2)
        out["list"] = run_json([str(loadgen), "secrets-list", *kube])
        if monitor is not None:
            out["list"]["kleidi_cpu_seconds"] = round(monitor.stop().cpu_seconds, 3)
        if out["list"]["items"] < secrets:
            raise RuntimeError(f"{mode}: the LIST returned {out['list']['items']} of {secrets} Secrets")
        out["second_list"] = run_json([str(loadgen), "secrets-list", *kube])
        if kleidi is not None:
            m2 = kleidi.metrics()
            out["kleidi"] = {
                "encrypt_calls_total": int(m2.get("Encrypt", 0)),
                "encrypt_calls_during_create": _delta(m1, m0, "Encrypt"),
                "decrypt_calls_during_create": _delta(m1, m0, "Decrypt"),
                "decrypt_calls_restart_and_list": _delta(m2, m1, "Decrypt"),
                "status_calls_total": int(m2.get("Status", 0)),
                "backend_calls_total": {k.split(":", 1)[1]: int(v) for k, v in m2.items() if k.startswith("backend:")},
            }
        log(f"  {mode:15} create {secrets} in {out['create']['seconds']:.2f}s "
            f"({out['create']['per_second']:.0f}/s), restart-to-ready {out['restart_ready_s']}s, "
            f"first list {out['list']['seconds']:.3f}s, kleidi {out.get('kleidi', {})}")
        return out
    finally:
        plane.stop_all()
        if kleidi is not None:
            kleidi.stop()
        if noop is not None:
            noop.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def apiserver_view(secrets: int, concurrency: int, loadgen: Path, binary: str, modes: list[str],
                   vault_backend: dict[str, Any] | None, rounds: int = 1) -> dict[str, Any]:
    """Each mode on its own control plane; with ``rounds`` > 1 the modes alternate and the median is kept."""
    log(f"apiserver view: {secrets} Secrets per mode, modes {modes}, {rounds} round(s)")
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for round_no in range(rounds):
        order = modes if round_no % 2 == 0 else list(reversed(modes))
        for mode in order:
            runs[mode].append(run_mode(mode, secrets, concurrency, loadgen, binary, vault_backend))
    out: dict[str, Any] = {}
    for mode, results in runs.items():
        # Each figure is the median over the rounds (the create details come from the median-create round).
        results.sort(key=lambda r: r["create"]["seconds"])
        chosen = dict(results[len(results) // 2])
        chosen["list"] = dict(chosen["list"], seconds=statistics.median(r["list"]["seconds"] for r in results))
        chosen["restart_ready_s"] = statistics.median(r["restart_ready_s"] for r in results)
        chosen["all_create_s"] = [round(r["create"]["seconds"], 3) for r in runs[mode]]
        chosen["all_first_list_s"] = [round(r["list"]["seconds"], 3) for r in runs[mode]]
        chosen["all_restart_ready_s"] = [r["restart_ready_s"] for r in runs[mode]]
        out[mode] = chosen
    return out
