"""``python -m bench.recover``: how fast ``kleidi recover`` turns an etcd snapshot into YAML (issue #14).

A real etcd (the e2e suite's harness, tests/e2e/cluster.py) is filled straight through its JSON gateway
(tests/tools.put_raw) with ``--objects`` Secrets in Kubernetes' protobuf storage encoding, each sealed as a
KMS v2 value exactly as a 1.29+ apiserver seals it: one seed, wrapped once by kleidi's real Encrypt on a local
keyring, and per object HKDF + AES-GCM under its etcd key (kleidi._crypto.kmsv2_storage). ``etcdctl snapshot
save`` writes the backup, etcd stops, and the real ``kleidi recover --snapshot`` runs ``--runs`` times (each a
fresh process into a new directory) and must write every Secret. Reported: objects per second (wall time of
the whole command: snapshot restore, throwaway etcd, decryption, files), CPU seconds and peak RSS of the
recover process (wait4). Not run in CI; the figure is in docs/benchmarks.md (bench/results/recover.json).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import throughput
from tests.conftest import KLEIDI, keygen
from tests.e2e.cluster import ETCDCTL, Etcd
from tests.tools import put_raw


def _fill(url: str, config: Path, count: int, size: int) -> None:
    from kleidi._crypto import kmsv2_storage as storage
    from kleidi._proto.k8s import storage_pb2 as k8s
    from kleidi.config import load_settings
    from kleidi.tools.recover import Decryptor

    async def sealed_seed() -> tuple[bytes, Any]:
        decryptor = Decryptor(load_settings(config, {}))
        await decryptor.start()
        try:
            seed = os.urandom(32)
            return seed, await decryptor.service.encrypt(seed)
        finally:
            await decryptor.close()

    seed, sealed = asyncio.run(sealed_seed())
    items = []
    for i in range(count):
        namespace, name = f"ns-{i % 200}", f"secret-{i}"
        secret = k8s.Secret(metadata=k8s.ObjectMeta(name=name, namespace=namespace), type="Opaque",
                            data={"value": os.urandom(size)})
        plaintext = b"k8s\x00" + k8s.Unknown(typeMeta=k8s.TypeMeta(apiVersion="v1", kind="Secret"),
                                              raw=secret.SerializeToString()).SerializeToString()
        key = f"/registry/secrets/{namespace}/{name}"
        items.append((key, storage.encrypt_object(seed, plaintext, key, provider="kleidi", key_id=sealed.key_id,
                                                  encrypted_dek_source=sealed.ciphertext,
                                                  annotations=dict(sealed.annotations))))
    put_raw(url, items)


def _recover(config: Path, snapshot: Path, out: Path) -> dict[str, Any]:
    started = time.monotonic()
    proc = subprocess.Popen([KLEIDI, "recover", "--config", str(config), "--snapshot", str(snapshot),
                             "--output-dir", str(out), "-o", "json"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env={k: v for k, v in os.environ.items()
                                                            if not k.startswith("KLEIDI_")})
    assert proc.stdout is not None
    report = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"kleidi recover exited {os.waitstatus_to_exitcode(status)}")
    seconds = time.monotonic() - started
    return {"seconds": round(seconds, 2), "recovered": json.loads(report)["recovered"],
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=256, help="bytes of each Secret's data")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="kl-bench-recover-", dir="/tmp"))
    workdir.chmod(0o700)
    etcd = Etcd(workdir).start()
    try:
        keyring, config = workdir / "keyring.json", workdir / "kleidi.yaml"
        keygen(keyring)
        config.write_text(f"backend:\n  kind: local\n  keyring: {keyring}\n")
        started = time.monotonic()
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(_fill, etcd.url, config, args.objects, args.size).result()
        snapshot = workdir / "etcd.snapshot"
        subprocess.run([ETCDCTL, "--endpoints", etcd.url, "snapshot", "save", str(snapshot)], check=True,
                       capture_output=True, env={**os.environ, "ETCDCTL_API": "3"})
        etcd.stop()
        load_seconds = time.monotonic() - started
        runs = []
        for i in range(args.runs):
            run = _recover(config, snapshot, workdir / f"out-{i}")
            if run["recovered"] != args.objects:
                raise RuntimeError(f"recover wrote {run['recovered']} of {args.objects}")
            shutil.rmtree(workdir / f"out-{i}")
            runs.append(run)
        best, measured = throughput(args.objects, runs)
        figures = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                   "objects": args.objects, "secret_bytes": args.size, "load_seconds": round(load_seconds, 1),
                   "snapshot_mb": round(snapshot.stat().st_size / 2**20, 1), **measured}
    finally:
        etcd.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"kleidi recover of {args.objects} Secrets from a {figures['snapshot_mb']} MiB snapshot: best of "
          f"{args.runs} runs {best['seconds']:.1f} s wall = {figures['objects_per_second']} objects/s; peak RSS "
          f"{figures['peak_rss_mb']} MiB; CPU {best['cpu_seconds']:.1f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
