"""kleidi under a read-only root filesystem, as the container image runs it.

The test starts the real `kleidi serve` in a mount namespace of its own (CI runs as root) where `/`
is remounted read-only and only a small tmpfs is writable: `server.runtime_dir`, as a pod's
`emptyDir` would be. The socket is abstract (network namespaces, not mount namespaces, hold those),
so the test reaches it from outside. kleidi must start, serve, and stop cleanly without writing
anywhere else.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

import grpc

from kleidi._proto.kmsv2 import api_pb2 as v2_pb
from tests.conftest import KLEIDI, wait_for
from tests.test_telemetry import get

_IN_READ_ONLY_ROOT = (
    'mount -o remount,bind,ro / && mount -t tmpfs -o size=4m,mode=0700 tmpfs "$0" && '
    # the precondition, checked where kleidi runs: its keyring's directory is not writable
    'if touch "$1/write-probe" 2>/dev/null; then echo "the root filesystem is still writable" >&2; exit 99; fi; '
    'shift; exec "$@"'
)


def test_kleidi_serves_from_a_read_only_root_with_only_its_runtime_dir_writable(kleidi_factory: Any,
                                                                                 short_dir: Path) -> None:
    run_dir = short_dir / "run"
    run_dir.mkdir(mode=0o700)
    name = f"kleidi-ro-{uuid.uuid4().hex[:12]}"
    proc = kleidi_factory(start=False, settings={"server": {"endpoint": f"unix:///@{name}",
                                                            "runtime_dir": str(run_dir)}})
    proc.command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _IN_READ_ONLY_ROOT,
                    str(run_dir), str(short_dir), KLEIDI, "serve", "--config", str(proc.config_path)]
    proc.endpoint = f"unix-abstract:{name}"
    proc.start(wait=False)

    def serving() -> bool:
        try:
            return bool(proc.status(timeout=1).healthz == "ok")
        except grpc.RpcError:
            assert proc.proc.poll() is None, proc.log()
            return False

    wait_for(serving, 20, "kleidi to serve from a read-only root")
    private = re.search(r"gRPC server behind it on (\S+?)\"", proc.log())
    assert private and Path(private.group(1)).parent.parent == run_dir, proc.log()  # on the tmpfs
    seed = os.urandom(32)
    sealed = proc.encrypt(seed)
    assert proc.decrypt(sealed.ciphertext, sealed.key_id, sealed.annotations) == seed
    assert get(proc, "/readyz")[0] == 200 and get(proc, "/livez")[0] == 200
    assert proc.stub.Status(v2_pb.StatusRequest(), timeout=3).key_id == sealed.key_id
    assert proc.stop() == 0
    assert "Read-only file system" not in proc.log() and '"level": "error"' not in proc.log()
    assert not (short_dir / "write-probe").exists()
