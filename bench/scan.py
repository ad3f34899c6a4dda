"""``python -m bench.scan``: how fast ``kleidi scan`` reads a large etcd, and how much memory it needs (issue #14).

A real etcd (the e2e suite's harness, tests/e2e/cluster.py) is filled straight through its JSON gateway,
``MAX_TXN_OPS`` puts per transaction (tests/tools.put_raw), with ``--objects`` values shaped like a cluster in the
middle of a rotation: 70% Secrets as KMS v2 EncryptedObjects on kleidi's current key_id, 20% on the previous one
(built with kleidi's own storage code, kleidi._crypto.kmsv2_storage, around a ``--size``-byte object), 10%
ConfigMaps in plaintext protobuf. Then the real ``kleidi scan --output json`` runs against it ``--runs`` times,
each a fresh process, and must count exactly what was written. Reported: objects per second (wall time of the
whole command, start-up included), CPU seconds, and peak RSS of the scan process (the kernel's own accounting of the
child: wait4's ru_maxrss and CPU times). Not run in CI; the figure is in docs/benchmarks.md (bench/results/scan.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import throughput
from kleidi._crypto import kmsv2_storage as storage
from kleidi._crypto.keyid import derive_key_id
from tests.conftest import KLEIDI
from tests.e2e.cluster import Etcd
from tests.tools import put_raw


def _values(count: int, size: int, key_ids: tuple[str, str]) -> tuple[list[tuple[str, bytes]], dict[str, int]]:
    current, previous = key_ids
    expected = {current: 0, previous: 0, "plaintext": 0}
    items: list[tuple[str, bytes]] = []
    seed, dek_source = os.urandom(32), os.urandom(92)  # one seed per apiserver generation, as 1.29+ does
    for i in range(count):
        bucket = i % 10
        if bucket == 9:
            key = f"/registry/configmaps/ns-{i % 200}/cm-{i}"
            items.append((key, b"k8s\x00\n\x0f\n\x02v1\x12\tConfigMap" + os.urandom(size)))
            expected["plaintext"] += 1
            continue
        key_id = previous if bucket >= 7 else current
        key = f"/registry/secrets/ns-{i % 200}/secret-{i}"
        items.append((key, storage.encrypt_object(seed, b"k8s\x00" + os.urandom(size), key, provider="kleidi",
                                                  key_id=key_id, encrypted_dek_source=dek_source)))
        expected[key_id] += 1
    return items, expected


def _fill(url: str, count: int, size: int, key_ids: tuple[str, str]) -> dict[str, int]:
    items, expected = _values(count, size, key_ids)
    put_raw(url, items)
    return expected


def _scan(url: str, page_size: int) -> dict[str, Any]:
    """One ``kleidi scan`` process; its peak RSS and CPU from the kernel's accounting of it (wait4)."""
    started = time.monotonic()
    proc = subprocess.Popen([KLEIDI, "scan", "--etcd-endpoints", url, "--page-size", str(page_size), "-o", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={k: v for k, v in os.environ.items() if not k.startswith("KLEIDI_")})
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"kleidi scan exited {proc.returncode}")
    report: dict[str, Any] = json.loads(out)
    return {"seconds": round(seconds, 2), "scan_seconds": report["seconds"],
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "report": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=512, help="bytes of each stored object before encryption")
    parser.add_argument("--page-size", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="kl-bench-scan-", dir="/tmp"))
    etcd = Etcd(workdir).start()
    try:
        key_ids = (derive_key_id("local", "bench", 2, "2026-12-01T00:00:00Z"),
                   derive_key_id("local", "bench", 1, "2026-11-01T00:00:00Z"))
        # Filled from a child process: a forked child's peak RSS (wait4) counts the parent's pages at fork,
        # so this process must stay smaller than the scan it measures (launcher_rss_mb says by how much).
        started = time.monotonic()
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            expected = pool.submit(_fill, etcd.url, args.objects, args.size, key_ids).result()
        load_seconds = time.monotonic() - started
        launcher_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        runs = [_scan(etcd.url, args.page_size) for _ in range(args.runs)]
        for run in runs:
            report = run.pop("report")
            got = {**report["key_ids"], "plaintext": report["totals"]["plaintext"]}
            if report["objects"] != args.objects or {k: got.get(k, 0) for k in expected} != expected:
                raise RuntimeError(f"scan miscounted: {got} != {expected}")
            run["objects"] = report["objects"]
        best, measured = throughput(args.objects, runs)
        figures = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                   "objects": args.objects, "value_bytes": args.size, "page_size": args.page_size,
                   "load_seconds": round(load_seconds, 1), "launcher_rss_mb": launcher_rss_mb, **measured}
    finally:
        etcd.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"kleidi scan of {args.objects} objects ({args.size}-byte values, page size {args.page_size}) in a real "
          f"etcd: best of {args.runs} runs {best['seconds']:.1f} s wall = {figures['objects_per_second']} objects/s; "
          f"peak RSS {figures['peak_rss_mb']} MiB (launcher {launcher_rss_mb} MiB); CPU {best['cpu_seconds']:.1f} s; "
          f"load took {load_seconds:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
