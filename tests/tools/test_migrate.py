"""``kleidi migrate`` (#14): thousands of Secrets re-encrypted through a real kube-apiserver after a rotation,
interrupted and resumed, with conflicts and deletions meanwhile, proven by reading etcd.

The cluster is the e2e suite's (tests/e2e: real etcd, real kube-apiserver built from k8s.io/kubernetes,
kleidi serving KMS v2 from a local keyring). The real ``kleidi migrate`` command runs as a subprocess
against the apiserver's kubeconfig; every assertion about storage reads the raw values in etcd.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from kleidi.tools import migrate as mig
from tests.conftest import KLEIDI, run_kleidi, wait_for
from tests.e2e.cluster import ETCDCTL
from tests.e2e.conftest import ControlPlane
from tests.e2e.test_kube_apiserver import create_secrets, key_id_of, provoke_status_poll, stored

pytestmark = pytest.mark.e2e

SECRETS = 2000
CHUNK = 500


def key_ids(plane: ControlPlane, namespace: str = "default") -> dict[str, int]:
    """How many Secrets of ``namespace`` etcd holds on each key_id."""
    counts: dict[str, int] = {}
    for value in plane.etcd.items(f"/registry/secrets/{namespace}/").values():
        key_id = key_id_of(value)
        counts[key_id] = counts.get(key_id, 0) + 1
    return counts


def secrets_as_read(api: Any, namespace: str = "default") -> dict[str, dict[str, Any]]:
    """Every Secret of ``namespace`` as the apiserver serves it, without its resourceVersion."""
    listing = json.loads(api.kubectl("get", "secrets", "-n", namespace, "-o", "json", timeout=180).stdout)
    objects = {}
    for item in listing["items"]:
        item["metadata"].pop("resourceVersion")
        objects[item["metadata"]["name"]] = item
    return objects


def rotate(plane: ControlPlane, kleidi: Any, api: Any) -> str:
    """``kleidi rotate`` the local keyring; wait until the apiserver writes with the new key_id, which it
    takes up when it next calls Status (its kms-providers health probe runs at most every 20 s)."""
    old_key_id = kleidi.status().key_id
    assert run_kleidi("rotate", "--keyring", str(kleidi.keyring)).returncode == 0
    new_key_id: str = kleidi.wait_for_key_id(lambda k: k != old_key_id)

    def apiserver_uses_new_key() -> bool:
        provoke_status_poll(api)
        probe = create_secrets(api, [f"probe-{time.monotonic_ns()}"], namespace="kube-public")
        return key_id_of(stored(plane, next(iter(probe)), "kube-public")) == new_key_id

    wait_for(apiserver_uses_new_key, 90, "the apiserver to write with the new key_id", interval=2)
    return new_key_id


def migrate_args(api: Any, plane: ControlPlane, state: Path, *extra: str) -> list[str]:
    return ["migrate", "--kubeconfig", str(api.kubeconfig), "--state-file", str(state), "--qps", "400",
            "--concurrency", "8", "--etcd-endpoints", plane.etcd.url, "--output", "json", *extra]


def test_thousands_of_secrets_move_to_the_new_key_interrupted_and_resumed(cluster: Any) -> None:
    plane, kleidi, api = cluster
    old_key_id = kleidi.status().key_id
    names = [f"s{i:04d}" for i in range(SECRETS)]
    with ThreadPoolExecutor(SECRETS // CHUNK) as pool:
        list(pool.map(lambda chunk: create_secrets(api, chunk), [names[i:i + CHUNK] for i in range(0, SECRETS, CHUNK)]))
    assert key_ids(plane) == {old_key_id: SECRETS}

    new_key_id = rotate(plane, kleidi, api)
    before = secrets_as_read(api)
    state = plane.workdir / "migrate.state.json"

    # 1. A batch: --stop-after stops with the progress saved (exit 3), part of the Secrets moved.
    first = run_kleidi(*migrate_args(api, plane, state, "--stop-after", "600"), timeout=120)
    assert first.returncode == mig.EXIT_STOPPED, first.stderr
    report = json.loads(first.stdout)
    assert report["finished"] is False and report["stopped"] == "--stop-after 600 reached"
    assert report["totals"]["rewritten"] == 600 and report["proof"] is None
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert key_ids(plane) == {new_key_id: 600, old_key_id: SECRETS - 600}

    # A continue token expires when etcd has compacted past the list's revision (the apiserver compacts
    # every 5 minutes) and the apiserver's watch cache no longer holds that revision either. Age the saved
    # token so (its revision set back to 2, etcd compacted to now): the resumed run gets the apiserver's
    # real 410 answer, lists again from the start and skips what was done.
    revision = json.loads(subprocess.run([ETCDCTL, "--endpoints", plane.etcd.url, "-w", "json", "get", "x"],
                                         capture_output=True, check=True).stdout)["header"]["revision"]
    subprocess.run([ETCDCTL, "--endpoints", plane.etcd.url, "compact", str(revision)], capture_output=True, check=True)
    saved = json.loads(state.read_text())
    token = json.loads(base64.urlsafe_b64decode(saved["progress"][0]["continue_token"] + "=="))
    saved["progress"][0]["continue_token"] = base64.urlsafe_b64encode(
        json.dumps({**token, "rv": 2}, separators=(",", ":")).encode()).decode().rstrip("=")
    state.write_text(json.dumps(saved))

    # 2. Resumed, then interrupted by SIGINT part-way: it stops after the requests in flight (exit 3).
    proc = subprocess.Popen([KLEIDI, *migrate_args(api, plane, state, "--resume", "--qps", "100")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if not k.startswith("KLEIDI_")})
    try:
        wait_for(lambda: key_ids(plane).get(new_key_id, 0) >= 800, 60, "the resumed run to make progress",
                 interval=0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == mig.EXIT_STOPPED, err
    report = json.loads(out)
    assert report["stopped"] == "interrupted", report
    moved = key_ids(plane).get(new_key_id, 0)
    assert 800 <= moved < SECRETS, moved
    saved = json.loads(state.read_text())["progress"][0]
    assert saved["counts"]["rewritten"] == moved, saved  # the state counts exactly what reached etcd
    assert saved["counts"]["restarts"] == 1, saved  # the expired continue token was met, and handled

    # 3. Resumed to the end: every Secret is on the new key_id, proven by the command's own scan of etcd.
    last = run_kleidi(*migrate_args(api, plane, state, "--resume", "--old-key-id", old_key_id), timeout=120)
    assert last.returncode == mig.EXIT_OK, last.stdout + last.stderr
    report = json.loads(last.stdout)
    assert report["finished"] and report["failures"] == []
    assert report["totals"]["rewritten"] >= SECRETS  # and the probes the test wrote in kube-public
    assert report["proof"]["checked"] and report["proof"]["passed"] and report["proof"]["left"] == 0
    assert report["proof"]["old_key_ids"] == [old_key_id] and set(report["proof"]["key_ids"]) == {new_key_id}
    assert not state.exists(), "a finished run leaves no state to resume"
    # Read etcd ourselves too: every Secret of every namespace is on the new key_id.
    assert key_ids(plane) == {new_key_id: SECRETS}
    assert {key_id_of(v) for v in plane.etcd.items("/registry/secrets/").values()} == {new_key_id}
    # Written back unchanged: the objects read the same, only their resourceVersion moved.
    assert secrets_as_read(api) == before


class RacingApi(mig.KubeApi):
    """The real apiserver, with another writer who changes or deletes an object between kleidi migrate's
    list and its update (the first time only)."""

    def __init__(self, inner: mig.KubeApi, api: Any) -> None:
        super().__init__(inner._client, mig.RateLimiter(1000))
        self.kubectl = api.kubectl
        self.raced: set[str] = set()
        self.lock = threading.Lock()

    def request(self, method: str, path: str, query: Any = None, body: Any = None) -> mig.Response:
        name = path.rsplit("/", 1)[-1]
        with self.lock:
            first = method == "PUT" and name not in self.raced
            self.raced.add(name)
        if first and name.startswith("changed"):
            self.kubectl("label", "secret", name, "-n", "racing", f"touched={name}")
        if first and name.startswith("deleted"):
            self.kubectl("delete", "secret", name, "-n", "racing")
        return super().request(method, path, query, body)


def test_conflicts_are_retried_and_deleted_objects_skipped(cluster: Any) -> None:
    plane, kleidi, api = cluster
    api.kubectl("create", "namespace", "racing")
    names = [f"changed{i}" for i in range(3)] + [f"deleted{i}" for i in range(2)] + [f"plain{i}" for i in range(5)]
    create_secrets(api, names, namespace="racing")
    new_key_id = rotate(plane, kleidi, api)
    options = mig.Options(namespace="racing", state_file=plane.workdir / "racing.json", page_size=4)
    racing = RacingApi(mig.KubeApi.connect(api.kubeconfig, None, options.qps, options.concurrency), api)
    result = mig.Migration(racing, options).run()
    assert result.finished and result.failures == []
    counts = result.state.progress["secrets"].counts
    assert (counts.rewritten, counts.conflicts, counts.deleted) == (8, 3, 2)
    assert key_ids(plane, "racing") == {new_key_id: 8}
    for i in range(3):  # the other writer's change was kept: the retry re-read the object
        labels = json.loads(api.kubectl("get", "secret", f"changed{i}", "-n", "racing", "-o", "json").stdout)
        assert labels["metadata"]["labels"] == {"touched": f"changed{i}"}

    # Several resources, one of a named group (discovered through /apis); without etcd access the run
    # still rewrites, but says the proof was skipped (exit 4).
    api.kubectl("create", "configmap", "settings", "-n", "racing", "--from-literal=mode=strict")
    skipped = run_kleidi("migrate", "--kubeconfig", str(api.kubeconfig), "-n", "racing", "--state-file",
                         str(plane.workdir / "unproven.json"), "--resources",
                         "secrets,configmaps,leases.coordination.k8s.io")
    assert skipped.returncode == mig.EXIT_UNPROVEN, skipped.stderr
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in skipped.stdout.splitlines()]
    rows = {row[0]: row[1:] for row in cells if row and row[0] != "resource"}
    # done, listed, rewritten, conflicts retried, deleted meanwhile, failed
    assert rows == {"secrets": ["yes", "8", "8", "0", "0", "0"], "configmaps": ["yes", "1", "1", "0", "0", "0"],
                    "leases.coordination.k8s.io": ["yes", "0", "0", "0", "0", "0"]}, skipped.stdout
    assert "not proven: no etcd access" in skipped.stdout
    cluster_wide = run_kleidi("migrate", "--kubeconfig", str(api.kubeconfig), "-n", "racing", "--state-file",
                              str(plane.workdir / "refused.json"), "--resources",
                              "clusterroles.rbac.authorization.k8s.io")
    assert cluster_wide.returncode == mig.EXIT_USAGE and "is not namespaced" in cluster_wide.stderr, cluster_wide.stderr


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{closed_port()}",
                                               "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "not-a-real-token-value"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    state = tmp_path / "state.json"
    cases = {
        "unreachable apiserver": (["--kubeconfig", str(kubeconfig)], "cannot be reached"),
        "missing kubeconfig": (["--kubeconfig", str(tmp_path / "nope")], "does not exist"),
        "a singular resource": (["--kubeconfig", str(kubeconfig), "--resources", "secret"], "fix: use secrets"),
        "a wildcard": (["--kubeconfig", str(kubeconfig), "--resources", "*.*"], "takes no wildcards"),
        "unreachable etcd": (["--kubeconfig", str(kubeconfig), "--etcd-endpoints", f"http://127.0.0.1:{closed_port()}"],
                             "no etcd endpoint answered"),
        "TLS flags without etcd": (["--kubeconfig", str(kubeconfig), "--old-key-id", "x"], "add --etcd-endpoints"),
        "resume without a state": (["--kubeconfig", str(kubeconfig), "--resume"], "there is no state file"),
    }
    for what, (args, expected) in cases.items():
        result = run_kleidi("migrate", "--state-file", str(state), *args, timeout=60)
        assert result.returncode == mig.EXIT_USAGE, (what, result.stderr)
        assert expected in result.stderr, (what, result.stderr)
        assert "Traceback" not in result.stderr and "not-a-real-token-value" not in result.stderr, what
        assert not state.exists(), what
    state.write_text("{}")
    result = run_kleidi("migrate", "--state-file", str(state), "--kubeconfig", str(kubeconfig))
    assert result.returncode == mig.EXIT_USAGE and "add --resume to continue it" in result.stderr, result.stderr
