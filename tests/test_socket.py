"""The unix socket: its permissions, what kleidi refuses to replace, and a clean shutdown.

Every test runs the real ``kleidi serve`` (or, for the in-flight shutdown test, the real
:class:`kleidi.server.Server` with a slow backend) on a real unix socket.
"""

from __future__ import annotations

import grp
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from kleidi._proto.kmsv2 import api_pb2 as v2_pb
from kleidi._proto.kmsv2 import api_pb2_grpc as v2_grpc
from tests.conftest import HELPERS, KleidiProcess, keygen, run_kleidi, wait_for

SEED = bytes(range(32))


def _serve_once(keyring: Path, socket_path: Path | str) -> tuple[int, str]:
    """Run ``kleidi serve`` expecting it to refuse to start (it exits by itself). Its runtime
    directory is the keyring's, so that what is refused is the socket path."""
    result = run_kleidi("serve", "--keyring", str(keyring), "--endpoint", f"unix://{socket_path}",
                        "--log-format", "json", env={"KLEIDI_SERVER__RUNTIME_DIR": str(keyring.parent)}, timeout=30)
    return result.returncode, result.stderr




# -- permissions ----------------------------------------------------------------------------------


def test_socket_is_0600_by_default(kleidi_factory):
    k = kleidi_factory()
    st = os.stat(k.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert k.status().healthz == "ok"


def test_socket_mode_and_group_from_config(kleidi_factory):
    group = grp.getgrgid(os.getgid()).gr_name
    k = kleidi_factory(settings={"server": {"socket_mode": "0660", "socket_group": group}})
    st = os.stat(k.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == grp.getgrnam(group).gr_gid
    assert k.status().healthz == "ok"


def test_socket_group_by_gid_other_than_own(kleidi_factory):
    """A numeric socket_group is applied (root can pick any group; others one of their own)."""
    own = os.getgid()
    if os.geteuid() == 0:
        candidates = [g.gr_gid for g in grp.getgrall() if g.gr_gid != own]
    else:
        candidates = [g for g in os.getgroups() if g != own]
    gid = candidates[0] if candidates else own
    k = kleidi_factory(settings={"server": {"socket_mode": "0640", "socket_group": gid}})
    st = os.stat(k.socket_path)
    assert st.st_gid == gid
    assert stat.S_IMODE(st.st_mode) == 0o640


def test_unknown_socket_group_is_a_clean_config_error(kleidi_factory, short_dir):
    k = kleidi_factory(start=False, settings={"server": {"socket_group": "no-such-group-kleidi"}})
    result = run_kleidi("serve", "--config", str(k.config_path), timeout=30)
    assert result.returncode == 2, result.stderr
    assert "server.socket_group" in result.stderr
    assert "fix" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # A refused start leaves nothing behind: no socket file for the next start to trip over.
    assert not os.path.lexists(k.socket_path)


# -- what is at the path before kleidi starts -----------------------------------------------------


def test_stale_socket_is_removed(kleidi_factory):
    k = kleidi_factory(start=False)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(k.socket_path))
    stale.close()
    assert stat.S_ISSOCK(os.lstat(k.socket_path).st_mode)

    k.start()
    assert k.status().healthz == "ok"
    assert stat.S_ISSOCK(os.lstat(k.socket_path).st_mode)
    assert k.stop() == 0
    assert not os.path.lexists(k.socket_path)


def test_regular_file_at_path_is_refused(short_dir):
    keyring = short_dir / "keyring.json"
    keygen(keyring)
    path = short_dir / "kleidi.sock"
    path.write_text("precious data\n")

    code, stderr = _serve_once(keyring, path)
    assert code == 2, stderr
    assert "server.endpoint" in stderr
    assert "not a socket" in stderr
    assert "Traceback" not in stderr
    assert path.is_file()
    assert path.read_text() == "precious data\n"


def test_symlink_at_path_is_refused(short_dir):
    keyring = short_dir / "keyring.json"
    keygen(keyring)
    target = short_dir / "target"
    target.write_text("target\n")
    for name, points_to in (("to-file.sock", target), ("dangling.sock", short_dir / "nowhere")):
        link = short_dir / name
        link.symlink_to(points_to)
        code, stderr = _serve_once(keyring, link)
        assert code == 2, stderr
        assert "server.endpoint" in stderr
        assert "symbolic link" in stderr
        assert "Traceback" not in stderr
        assert link.is_symlink()
        assert os.readlink(link) == str(points_to)
    assert target.read_text() == "target\n"
    assert not (short_dir / "nowhere").exists()


def test_live_socket_of_another_kleidi_is_refused(kleidi_factory):
    first = kleidi_factory()
    inode = os.lstat(first.socket_path).st_ino
    encrypted = first.encrypt(SEED)

    code, stderr = _serve_once(first.keyring, first.socket_path)
    assert code == 2, stderr
    assert "server.endpoint" in stderr
    assert "another process" in stderr
    assert "Traceback" not in stderr

    # The first kleidi is untouched: same socket file, still serving.
    assert os.lstat(first.socket_path).st_ino == inode
    assert first.proc is not None and first.proc.poll() is None
    assert first.status().healthz == "ok"
    assert first.decrypt(encrypted.ciphertext, encrypted.key_id, encrypted.annotations) == SEED
    assert first.stop() == 0


def test_unbindable_path_is_a_clean_config_error(short_dir):
    """A path the kernel cannot bind (longer than sun_path) stops kleidi with a message, not a traceback."""
    keyring = short_dir / "keyring.json"
    keygen(keyring)
    path = short_dir / ("s" * 120 + ".sock")
    code, stderr = _serve_once(keyring, path)
    assert code == 2, stderr
    assert "server.endpoint" in stderr
    assert "Traceback" not in stderr, stderr
    assert not os.path.lexists(path)


def test_unbindable_directory_is_a_clean_config_error(short_dir):
    """bind() itself fails (/proc takes no new files): a message, exit 2, no traceback."""
    keyring = short_dir / "keyring.json"
    keygen(keyring)
    path = Path("/proc") / f"kleidi-{uuid.uuid4().hex[:8]}.sock"
    code, stderr = _serve_once(keyring, path)
    assert code == 2, stderr
    assert "server.endpoint" in stderr
    assert "fix" in stderr
    assert "Traceback" not in stderr, stderr


def test_parent_that_is_a_file_is_a_clean_config_error(short_dir):
    keyring = short_dir / "keyring.json"
    keygen(keyring)
    not_a_dir = short_dir / "run"
    not_a_dir.write_text("a file\n")
    for path in (not_a_dir / "kleidi.sock", not_a_dir / "sub" / "kleidi.sock"):
        code, stderr = _serve_once(keyring, path)
        assert code == 2, stderr
        assert "server.endpoint" in stderr
        assert "fix" in stderr
        assert "Traceback" not in stderr, stderr
    assert not_a_dir.read_text() == "a file\n"


def test_abstract_socket(kleidi_factory):
    name = f"kleidi-test-{uuid.uuid4().hex}"
    k = kleidi_factory(start=False, settings={"server": {"endpoint": f"unix:///@{name}"}})
    k.start(wait=False)
    request = v2_pb.StatusRequest()
    with grpc.insecure_channel(f"unix-abstract:{name}", options=[("grpc.default_authority", "localhost")]) as ch:
        stub = v2_grpc.KeyManagementServiceStub(ch)

        def healthy() -> bool:
            assert k.proc is not None
            if k.proc.poll() is not None:
                raise AssertionError(f"kleidi exited with {k.proc.returncode}:\n{k.log()}")
            try:
                return stub.Status(request, timeout=1).healthz == "ok"
            except grpc.RpcError:
                return False

        wait_for(healthy, 20, "Status ok on the abstract socket")
        response = stub.Status(request, timeout=3)
        assert response.version == "v2"
        assert response.key_id.startswith("kleidi:local:v1:")

    # The CLI reaches it by the same endpoint string the apiserver would use.
    result = run_kleidi("status", "--endpoint", f"unix:///@{name}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert response.key_id in result.stdout
    # No file was created for an abstract socket.
    assert not os.path.lexists(f"/@{name}")
    assert not k.socket_path.exists()
    # An abstract socket has no file permissions: the caller check is what guards it.
    assert "callers authenticated by SO_PEERCRED" in k.log()
    assert k.stop() == 0


def test_abstract_socket_without_caller_authentication_is_warned_about(kleidi_factory):
    name = f"kleidi-test-{uuid.uuid4().hex}"
    k = kleidi_factory(start=False, settings={"server": {"endpoint": f"unix:///@{name}",
                                                          "authenticate_callers": False}})
    k.start(wait=False)
    wait_for(lambda: "serving KMS" in k.log(), 20, "kleidi serving")
    assert "abstract socket" in k.log() and "any process" in k.log()
    assert k.stop() == 0


def test_missing_parent_directory_is_created_0700(kleidi_factory, short_dir):
    socket_path = short_dir / "run" / "kleidi" / "kleidi.sock"
    k = kleidi_factory(start=False, settings={"server": {"endpoint": f"unix://{socket_path}"}})
    k.socket_path, k.endpoint = socket_path, f"unix://{socket_path}"
    assert not socket_path.parent.exists()
    k.start()
    parent = os.stat(socket_path.parent)
    assert stat.S_ISDIR(parent.st_mode)
    assert stat.S_IMODE(parent.st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(socket_path).st_mode)
    assert k.status().healthz == "ok"
    assert k.stop() == 0
    assert not socket_path.exists()


# -- shutdown -------------------------------------------------------------------------------------


def test_sigterm_lets_an_in_flight_call_finish(short_dir, monkeypatch):
    monkeypatch.setenv("SLOW_SERVER_UNWRAP_DELAY", "1.5")
    keygen(short_dir / "keyring.json")
    k = KleidiProcess(short_dir, "slow")
    k.command = [sys.executable, str(HELPERS / "slow_server.py"), str(k.config_path)]
    marker = k.config_path.with_name(k.config_path.name + ".unwrapping")
    try:
        k.start()
        encrypted = k.encrypt(SEED)
        request = v2_pb.DecryptRequest(ciphertext=encrypted.ciphertext, key_id=encrypted.key_id,
                                       annotations=dict(encrypted.annotations), uid="in-flight")
        future = k.stub.Decrypt.future(request, timeout=15)
        wait_for(marker.exists, 10, "the Decrypt call reaching the backend")
        time.sleep(0.3)
        assert not future.done()
        k.send_signal(signal.SIGTERM)

        assert future.result(timeout=15).plaintext == SEED
        assert k.proc is not None
        assert k.proc.wait(20) == 0, k.log()
        assert not os.path.lexists(k.socket_path)
        log = k.log()
        assert "shutting down" in log
        assert "stopped" in log
    finally:
        if k.proc is not None and k.proc.poll() is None:
            k.proc.kill()
            k.proc.wait()


def test_sigint_stops_cleanly(kleidi_factory):
    k = kleidi_factory()
    assert k.socket_path.exists()
    assert k.stop(signal.SIGINT) == 0
    assert not os.path.lexists(k.socket_path)
    assert "shutting down" in k.log()


def test_sigterm_stops_cleanly_and_a_restart_works(kleidi_factory):
    k = kleidi_factory()
    key_id = k.status().key_id
    assert k.stop(signal.SIGTERM) == 0
    assert not os.path.lexists(k.socket_path)
    k.start()
    assert k.status().key_id == key_id
    assert k.stop() == 0


def test_socket_directory_writable_by_others_is_refused(short_dir: Path) -> None:
    """Whoever can write the directory could swap the socket and receive the apiserver's seeds."""
    open_dir = short_dir / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    keyring = short_dir / "ring.json"
    keygen(keyring)
    result = run_kleidi("serve", "--keyring", str(keyring), "--endpoint", f"unix://{open_dir}/k.sock")
    assert result.returncode == 2
    assert "writable by others" in result.stderr and "chmod go-w" in result.stderr
    assert "Traceback" not in result.stderr
    open_dir.chmod(0o777 | stat.S_ISVTX)  # sticky, like /tmp: others cannot remove our socket
    sticky = KleidiProcess(short_dir, "sticky", keyring=keyring)
    sticky.socket_path = open_dir / "k.sock"
    sticky.endpoint = f"unix://{sticky.socket_path}"
    sticky.config["server"]["endpoint"] = sticky.endpoint
    sticky.config_path.write_text(__import__("yaml").safe_dump(sticky.config))
    try:
        sticky.start()
        assert sticky.status().healthz == "ok"
    finally:
        assert sticky.stop() == 0


def test_the_server_process_cannot_dump_core(kleidi_factory: Any) -> None:
    """Core dumps would hold seeds and keys: kleidi sets RLIMIT_CORE to 0 and marks itself non-dumpable."""
    proc = kleidi_factory()
    limits = Path(f"/proc/{proc.proc.pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
    # The kernel's own answer to PR_GET_DUMPABLE, read back by kleidi after setting it.
    assert "dumpable=0" in proc.log()


def test_lock_memory_keeps_every_page_in_ram(kleidi_factory: Any) -> None:
    proc = kleidi_factory(settings={"server": {"lock_memory": True}})
    status = Path(f"/proc/{proc.proc.pid}/status").read_text()
    locked_kb = int(next(line for line in status.splitlines() if line.startswith("VmLck:")).split()[1])
    size_kb = int(next(line for line in status.splitlines() if line.startswith("VmSize:")).split()[1])
    assert locked_kb > 0.9 * size_kb, status  # every mapping (a few may come and go between the reads)
    assert "memory locked in RAM" in proc.log()
    assert proc.encrypt(os.urandom(32)).key_id


@pytest.mark.skipif(os.geteuid() != 0, reason="drops CAP_IPC_LOCK from root's bounding set")  # CI runs as root
def test_lock_memory_that_cannot_be_had_stops_start_up_with_the_fix(kleidi_factory: Any) -> None:
    proc = kleidi_factory(start=False, settings={"server": {"lock_memory": True}})
    # Without CAP_IPC_LOCK and with RLIMIT_MEMLOCK 0, mlockall must fail.
    result = subprocess.run(["prlimit", "--memlock=0:0", "setpriv", "--bounding-set", "-ipc_lock", "--inh-caps",
                             "-ipc_lock", *proc.command], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "server.lock_memory: cannot lock memory" in result.stderr
    assert "CAP_IPC_LOCK" in result.stderr and "fix" in result.stderr
    assert not proc.socket_path.exists()


def test_the_standard_library_event_loop_serves_too(kleidi_factory: Any) -> None:
    """uvloop is the default; server.event_loop: asyncio must serve the same protocol."""
    proc = kleidi_factory(settings={"server": {"event_loop": "asyncio"}})
    seed = os.urandom(32)
    sealed = proc.encrypt(seed)
    assert proc.decrypt(sealed.ciphertext, sealed.key_id, sealed.annotations) == seed
    assert proc.stop() == 0


# -- every directory above the socket -------------------------------------------------------------

_STEAL = """
import json, os, socket
grandparent = argv[0]
report = {}
try:
    os.rename(f"{grandparent}/run", f"{grandparent}/moved-away")  # kleidi's 0700 directory, by its 0777 parent
except OSError as exc:
    print(json.dumps({"rename": type(exc).__name__}))
    raise SystemExit(0)
os.mkdir(f"{grandparent}/run", 0o755)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(f"{grandparent}/run/k.sock")
listener.listen(1)
print("listening", flush=True)
listener.settimeout(max(0.1, deadline - time.monotonic()))
conn, _ = listener.accept()
print(json.dumps({"rename": "done", "received": conn.recv(100).decode()}))
"""


def _layout(short_dir: Path, grandparent_mode: int) -> tuple[Path, Path]:
    """The review's layout: the socket's own directory is kleidi's (0700), its parent is not."""
    short_dir.chmod(0o711)  # the other user must reach the grandparent, as on a real node
    grandparent = short_dir / "open"
    grandparent.mkdir()
    grandparent.chmod(grandparent_mode)
    (grandparent / "run").mkdir(mode=0o700)
    return grandparent, grandparent / "run" / "k.sock"


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a process as uid 65534")  # CI runs as root
def test_socket_under_a_writable_grandparent_is_refused_and_that_layout_is_exploitable(short_dir: Path) -> None:
    """Only the parent used to be checked: under a 0777 grandparent another user renamed kleidi's 0700
    directory away, bound its own socket at the configured path and received what the apiserver sent."""
    from tests.hostile.support import started_as

    grandparent, socket_path = _layout(short_dir, 0o777)
    keyring = short_dir / "ring.json"
    keygen(keyring)
    code, stderr = _serve_once(keyring, socket_path)
    assert code == 2, stderr
    assert f"server.endpoint: directory {grandparent} is writable by others (mode 0777" in stderr
    assert f"fix: chmod go-w {grandparent}" in stderr
    assert "Traceback" not in stderr
    assert not socket_path.exists()

    # Why: in exactly this layout a real unprivileged process takes the path over.
    with started_as(_STEAL, str(grandparent), timeout=20) as attacker:
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == "listening", attacker.stderr.read() if attacker.stderr else ""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as apiserver:
            apiserver.connect(str(socket_path))
            apiserver.sendall(b"a seed for kleidi")
        report = __import__("json").loads(attacker.stdout.readline())
    assert report == {"rename": "done", "received": "a seed for kleidi"}
    assert os.stat(socket_path.parent).st_uid == 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a process as uid 65534")  # CI runs as root
def test_socket_under_a_sticky_grandparent_is_served_and_the_rename_fails(short_dir: Path) -> None:
    """A sticky world-writable directory (1777, like /tmp) lets only an entry's owner rename it."""
    from tests.hostile.support import run_as

    grandparent, socket_path = _layout(short_dir, 0o1777)
    outcome = run_as(_STEAL, str(grandparent), timeout=20)
    assert outcome.report == {"rename": "PermissionError"}, outcome.stderr
    keygen(short_dir / "ring.json")
    proc = KleidiProcess(short_dir, "sticky", keyring=short_dir / "ring.json")
    proc.socket_path, proc.endpoint = socket_path, f"unix://{socket_path}"
    proc.config["server"]["endpoint"] = proc.endpoint
    proc.config_path.write_text(__import__("yaml").safe_dump(proc.config))
    try:
        proc.start()
        assert proc.status().healthz == "ok"
    finally:
        assert proc.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="chowns a directory to uid 65534")  # CI runs as root
def test_an_ancestor_owned_by_another_user_is_refused(short_dir: Path) -> None:
    theirs = short_dir / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    (theirs / "run").mkdir(mode=0o700)
    keyring = short_dir / "ring.json"
    keygen(keyring)
    code, stderr = _serve_once(keyring, theirs / "run" / "k.sock")
    assert code == 2, stderr
    assert f"server.endpoint: directory {theirs} is owned by nobody (uid 65534), not by root" in stderr
    assert f"fix: chown root {theirs}" in stderr
    assert "Traceback" not in stderr
    # Nothing was created below it either, when the directories are missing.
    code, stderr = _serve_once(keyring, theirs / "new" / "k.sock")
    assert code == 2 and f"directory {theirs} is owned by nobody" in stderr, stderr
    assert not (theirs / "new").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chowns a symlink to uid 65534")  # CI runs as root
def test_symlinks_on_the_way_are_checked_then_followed(short_dir: Path) -> None:
    """Like /var/run -> /run: a link is fine if its owner and its target's directories are."""
    keyring = short_dir / "ring.json"
    keygen(keyring)
    open_dir = short_dir / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    (short_dir / "to-open").symlink_to("open")  # relative, resolved from the link's directory
    code, stderr = _serve_once(keyring, short_dir / "to-open" / "k.sock")
    assert code == 2 and f"directory {open_dir} is writable by others" in stderr, stderr

    safe = short_dir / "safe"
    safe.mkdir(mode=0o700)
    theirs = short_dir / "their-link"
    theirs.symlink_to(safe)
    os.lchown(theirs, 65534, 65534)
    code, stderr = _serve_once(keyring, theirs / "k.sock")
    assert code == 2 and f"symbolic link {theirs} is owned by nobody (uid 65534)" in stderr, stderr
    assert f"fix: chown -h root {theirs}" in stderr

    (short_dir / "sub").mkdir(mode=0o700)
    (short_dir / "ours").symlink_to(f"{short_dir}/sub/../safe")  # .. from the target's real directory
    proc = KleidiProcess(short_dir, "linked", keyring=keyring)
    proc.socket_path, proc.endpoint = short_dir / "ours" / "k.sock", f"unix://{short_dir}/ours/k.sock"
    proc.config["server"]["endpoint"] = proc.endpoint
    proc.config_path.write_text(__import__("yaml").safe_dump(proc.config))
    try:
        proc.start()
        assert proc.status().healthz == "ok"
        assert stat.S_ISSOCK(os.lstat(safe / "k.sock").st_mode)
    finally:
        assert proc.stop() == 0
