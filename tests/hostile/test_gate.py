"""The caller gate against hostile local users: real kleidi processes, real unprivileged processes
(uid 65534) attacking its sockets and directories, and root's calls that must keep being served.

Each attack is bounded (a fixed number of connections, a deadline) and stops by itself.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from kleidi import callers
from kleidi._proto.kmsv2 import api_pb2 as v2_pb
from kleidi._proto.kmsv2 import api_pb2_grpc as v2_grpc
from kleidi.callers import CallerPolicy, SocketGate
from kleidi.endpoint import parse_endpoint
from tests.conftest import wait_for
from tests.hostile.support import NOBODY, audit_records, connected_as, sampling, shared_kleidi, started_as
from tests.test_telemetry import get, samples, value

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")  # CI runs as root


# ------------------------------------------------------------------------------------------- helpers

def private_dir_of(proc: Any) -> Path:
    found = re.findall(r"gRPC server behind it on (\S+?)\"", proc.log())
    assert found, proc.log()
    return Path(found[-1]).parent  # the latest start (a restarted process appends to the same log)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def fresh_call(proc: Any) -> str:
    """Status and Encrypt on a new connection (so through a new relay connection of the gate)."""
    # A local subchannel pool: else grpc reuses another channel's connection to the same address.
    with grpc.insecure_channel(proc.endpoint, options=[("grpc.default_authority", "localhost"),
                                                       ("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = v2_grpc.KeyManagementServiceStub(channel)
        # wait_for_ready: a connect that finds the listen backlog full (a flood fills it faster than
        # any process accepts) is retried within the deadline, as the apiserver's client does.
        request = v2_pb.EncryptRequest(plaintext=os.urandom(32), uid="root-call")
        assert stub.Encrypt(request, timeout=10, wait_for_ready=True).key_id
        return str(stub.Status(v2_pb.StatusRequest(), timeout=10, wait_for_ready=True).healthz)


@contextmanager
def calling_throughout(proc: Any) -> Iterator[list[str]]:
    """Root calls kleidi on fresh connections, in a loop, while the block runs; yields the outcomes
    (``"ok"`` or the failure) and checks at the end that there were some and all were ``"ok"``."""
    def call() -> str:
        try:
            return fresh_call(proc)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"

    with sampling(call) as outcomes:
        yield outcomes
    errors = [line for line in proc.log().splitlines() if '"level": "error"' in line]
    assert outcomes and set(outcomes) == {"ok"}, ([o for o in outcomes if o != "ok"][:3], errors[:5])


def listen_backlog(path: Path) -> int:
    """The backlog the kernel holds for the listening unix socket bound to ``path``, read over
    NETLINK_SOCK_DIAG (what ``ss -xl`` shows as Send-Q): UNIX_DIAG_RQLEN's second field."""
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)  # NETLINK_SOCK_DIAG
    try:
        # struct unix_diag_req: family, protocol, pad, states (1 << TCP_LISTEN), ino, show (NAME | RQLEN), cookie
        request = struct.pack("=BBHIII8s", socket.AF_UNIX, 0, 0, 1 << 10, 0, 0x01 | 0x10, b"\xff" * 8)
        nl.send(struct.pack("=IHHII", 16 + len(request), 20, 0x301, 1, 0) + request)  # SOCK_DIAG_BY_FAMILY, dump
        while True:
            data = nl.recv(1 << 20)
            offset = 0
            while offset < len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind in (2, 3):  # NLMSG_ERROR, NLMSG_DONE
                    raise AssertionError(f"no listening socket on {path}")
                body, offset = data[offset + 16:offset + length], offset + ((length + 3) & ~3)
                name, backlog, attr = None, None, 16  # after struct unix_diag_msg
                while attr + 4 <= len(body):
                    alen, atype = struct.unpack_from("=HH", body, attr)
                    value_ = body[attr + 4:attr + alen]
                    if atype == 0:  # UNIX_DIAG_NAME
                        name = value_.rstrip(b"\0")
                    elif atype == 4:  # UNIX_DIAG_RQLEN: (queued, max_ack_backlog)
                        backlog = struct.unpack("=II", value_)[1]
                    attr += (alen + 3) & ~3
                if name == os.fsencode(path) and backlog is not None:
                    return backlog
    finally:
        nl.close()


# ---------------------------------------------------------------------------------------- the attacks

SQUAT = r"""
import errno, json, os, re, resource, socket
pid, public, private = argv
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
held, report = [], {"seen": [], "bound": 0, "private": {}, "refused_connects": 0}

def take(address):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(address)
    except OSError:
        s.close()
        return False
    held.append(s)
    return True

# Every name kleidi's process has bound is public: take the next ones in every pattern it might use.
with open("/proc/net/unix") as table:
    names = [line.split()[7] for line in list(table)[1:] if len(line.split()) >= 8]
report["seen"] = [n for n in names if "kleidi" in n or n.startswith(public.rsplit("/", 1)[0])]
for name in report["seen"]:
    take("\0" + name.lstrip("@"))
    stem = re.fullmatch(r"(.*?)([0-9]+)", name)
    if stem is None:
        continue
    for n in range(int(stem.group(2)) + 1, int(stem.group(2)) + 3001):  # well beyond any client's retries
        for guess in {stem.group(1) + str(n), stem.group(1) + format(n, "x")}:
            report["bound"] += take("\0" + guess.lstrip("@")) + (guess.startswith("/") and take(guess))
for n in range(1, 301):  # the pre-fix pattern, with any suffix it could have
    report["bound"] += take(f"\0kleidi-relay-{pid}-{n}")

# kleidi's private directory: nothing there may be reachable.
def attempt(what, action):
    try:
        action()
        report["private"][what] = "allowed"
    except OSError as exc:
        report["private"][what] = errno.errorcode.get(exc.errno, str(exc.errno))

attempt("list", lambda: os.listdir(private))
attempt("create", lambda: open(os.path.join(private, "x"), "w").close())
attempt("bind", lambda: socket.socket(socket.AF_UNIX).bind(os.path.join(private, "r-1000")))
attempt("connect", lambda: socket.socket(socket.AF_UNIX).connect(os.path.join(private, "grpc.sock")))
attempt("mkdir beside", lambda: os.mkdir(os.path.join(os.path.dirname(private), ".kleidi-1-squatted")))
print(json.dumps(report), flush=True)

# Then flood the public socket (refused connections) until done, holding every name taken.
for _ in range(1000):
    if time.monotonic() > deadline - 2:
        break
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(public)
        report["refused_connects"] += 1
    except OSError:
        pass
    s.close()
while time.monotonic() < deadline - 1:
    time.sleep(0.05)
"""


def test_no_local_user_can_stop_new_connections(kleidi_factory, short_dir):
    """Relay connections used to be bound to abstract names (readable in /proc/net/unix, bindable by
    anyone): a user who took the next ones made every new connection fail. Now nothing they can
    bind or create matters, and kleidi's private directory is out of their reach."""
    proc = shared_kleidi(kleidi_factory, short_dir)
    private = private_dir_of(proc)
    assert proc.status().healthz == "ok"  # this connection stays open: its relay's name is in /proc/net/unix

    with started_as(SQUAT, str(proc.proc.pid), str(proc.socket_path), str(private), timeout=40) as squatter:
        assert squatter.stdout is not None
        line = squatter.stdout.readline()
        assert line, squatter.stderr.read() if squatter.stderr else ""
        report = json.loads(line)
        with calling_throughout(proc) as outcomes:  # while the names are held and the flood runs
            wait_for(lambda: len(outcomes) >= 20, 60, "20 calls on fresh connections")
        assert get(proc, "/livez")[0] == 200
        assert report["seen"], "the attacker saw none of kleidi's socket names"
        assert set(report["private"].values()) == {"EACCES"}, report["private"]
    assert proc.status().healthz == "ok"
    assert not any(p.name.startswith(".kleidi-1-") for p in private.parent.iterdir())


def test_junk_from_an_allowed_caller_leaks_no_file_descriptors(kleidi_factory):
    """gRPC closes a connection that does not speak HTTP/2, then the caller closes: both relay sides
    have seen EOF, and the gate must close them (it used to keep both, two fds per connection)."""
    proc = kleidi_factory()
    pid = proc.proc.pid

    def junk(times: int) -> None:
        for _ in range(times):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(20)
                conn.connect(str(proc.socket_path))
                conn.sendall(b"GET / HTTP/1.1\r\nHost: kleidi\r\n\r\n" * 8)
                while conn.recv(65536):  # gRPC answers junk by closing
                    pass

    junk(10)
    assert proc.status().healthz == "ok"
    baseline = open_fds(pid)
    junk(300)
    wait_for(lambda: open_fds(pid) <= baseline, 30, f"kleidi's open fds back to {baseline} (now {open_fds(pid)})")
    assert fresh_call(proc) == "ok"


def test_out_of_file_descriptors_the_gate_pauses_and_recovers(kleidi_factory):
    """At the fd limit the gate stops accepting for a moment (it used to spin on accept4 and never
    recover); once connections close, calls are served again."""
    proc = kleidi_factory()
    pid = proc.proc.pid
    assert fresh_call(proc) == "ok"
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    limit = open_fds(pid) + 30
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, old[1]))
    held: list[socket.socket] = []
    try:
        for _ in range(60):  # each allowed connection costs kleidi up to three fds
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(str(proc.socket_path))
            held.append(conn)
        wait_for(lambda: "cannot take more connections" in proc.log() or open_fds(pid) >= limit - 3, 30,
                 "kleidi to reach its fd limit")
        threading.Event().wait(0.5)  # let the gate meet EMFILE
        before = cpu_seconds(pid)
        threading.Event().wait(2)
        assert cpu_seconds(pid) - before < 1.0, "kleidi spins while out of file descriptors"
        for conn in held:
            conn.close()
        held.clear()
        wait_for(lambda: _answers(proc), 30, "calls served again")
        assert "cannot take more connections" in proc.log() and "accepting connections again" in proc.log()
    finally:
        for conn in held:
            conn.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, old)


def _answers(proc: Any) -> bool:
    try:
        return fresh_call(proc) == "ok"
    except grpc.RpcError:
        return False


FLOOD = r"""
import json, socket
public, flood, hold = argv[0], int(argv[1]), int(argv[2])
connected = 0
for _ in range(flood):  # connect and leave at once
    if time.monotonic() > deadline - 10:
        break
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(public)
        connected += 1
    except OSError:
        pass
    s.close()
held = []
for _ in range(hold):  # connect and stay, sending nothing
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(public)
        held.append(s)
        connected += 1
    except OSError:
        s.close()
print(json.dumps({"connected": connected, "held": len(held)}), flush=True)
closed = 0
for s in held:  # kleidi must close each (at once beyond its limit, else after refused_timeout)
    s.settimeout(max(0.1, deadline - time.monotonic() - 1))
    try:
        while s.recv(65536):
            pass
        closed += 1
    except ConnectionResetError:
        closed += 1
    except OSError:
        pass
    s.close()
print(json.dumps({"connected": connected, "held": len(held), "closed": closed}), flush=True)
"""


def test_a_flood_of_refused_connections_is_bounded_and_reported_once(kleidi_factory, short_dir):
    """A refused user floods the socket and holds connections open: every refusal is counted, the log
    and audit log get O(1) lines, kleidi's fds stay bounded, and root is served throughout."""
    limit = 16
    proc = shared_kleidi(kleidi_factory, short_dir, max_refused_connections=limit, refused_timeout="1s",
                         refusal_report_interval="2s")
    pid = proc.proc.pid
    assert fresh_call(proc) == "ok"
    baseline = open_fds(pid)
    peak = 0

    with calling_throughout(proc):
        with started_as(FLOOD, str(proc.socket_path), "3000", "400", timeout=60) as flood:
            assert flood.stdout is not None
            first = flood.stdout.readline()
            assert first, flood.stderr.read() if flood.stderr else ""
            while flood.poll() is None:  # while the batch is held open
                peak = max(peak, open_fds(pid))
                threading.Event().wait(0.05)
            report = json.loads(flood.stdout.readline())
    connected = report["connected"]
    assert connected > 3000 * 0.9 and report["closed"] == report["held"] == 400, report
    # Root's own relay connections come and go meanwhile; refused ones add at most `limit`.
    assert peak <= baseline + limit + 20, (peak, baseline)

    wait_for(lambda: value(samples(proc), "kleidi_peer_credential_rejections_total") == connected, 30,
             "every refused connection counted")

    def reported() -> int:
        lines = [json.loads(x) for x in proc.log().splitlines() if "refused a caller" in x]
        return sum(line.get("count", 1) for line in lines)

    wait_for(lambda: reported() == connected, 30, "the summaries to account for every refusal")
    lines = [json.loads(x) for x in proc.log().splitlines() if "refused a caller" in x]
    assert 2 <= len(lines) <= 40, len(lines)  # one per interval of 2s, not one per connection
    assert all(line["caller_uid"] == NOBODY for line in lines)
    refusals = [r for r in audit_records(short_dir / "audit.jsonl") if r["event"] == "caller_refused"]
    assert len(refusals) == len(lines)
    assert sum(r.get("count", 1) for r in refusals) == connected
    assert refusals[0].get("count") is None and refusals[0]["caller_uid"] == NOBODY  # the first one, at once
    assert fresh_call(proc) == "ok"


def test_the_listen_backlog_is_the_one_asked_for(kleidi_factory):
    """uvloop listened again with its own backlog of 100; the gate keeps 1024."""
    proc = kleidi_factory()
    assert proc.config["server"].get("event_loop", "uvloop") == "uvloop"
    assert listen_backlog(proc.socket_path) == 1024


# -------------------------------------------------------------------------------- the private directory

def test_private_directories_of_killed_kleidis_are_removed_at_the_next_start(kleidi_factory, short_dir):
    first = kleidi_factory("a")
    second = kleidi_factory("b")
    first_dir, second_dir = private_dir_of(first), private_dir_of(second)
    assert first_dir.parent == second_dir.parent == short_dir  # the socket's directory, by default
    assert first_dir.exists()  # the second kleidi left the live one's alone
    assert first_dir.stat().st_mode & 0o777 == 0o700

    second.send_signal(signal.SIGKILL)
    second.proc.wait()
    assert second_dir.exists()

    # Look-alikes that must survive: a symlink, another user's directory, a plain file.
    outside = short_dir / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    (short_dir / ".kleidi-1-symlinkd").symlink_to(outside)
    others = short_dir / ".kleidi-2-othruser"
    others.mkdir()
    os.chown(others, NOBODY, NOBODY)
    (short_dir / ".kleidi-3-aplainfi").write_text("keep")
    # A dead kleidi's directory with a symlink inside: removing it must not follow the link.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = short_dir / f".kleidi-{dead.pid}-deadpid1"
    stale.mkdir(mode=0o700)
    (stale / "link").symlink_to(outside)
    (stale / "grpc.sock").write_text("")

    restarted = kleidi_factory("b")
    assert not second_dir.exists() and not stale.exists()
    assert (outside / "precious").read_text() == "keep"
    assert (short_dir / ".kleidi-1-symlinkd").is_symlink() and others.is_dir()
    assert (short_dir / ".kleidi-3-aplainfi").read_text() == "keep"
    assert first_dir.exists() and fresh_call(first) == "ok"
    assert private_dir_of(restarted).exists()
    assert "removed the private directory" in restarted.log()

    assert restarted.stop() == 0 and first.stop() == 0
    assert not any(p.name.startswith(".kleidi-") and p.is_dir() and not p.is_symlink() and p.owner() == "root"
                   for p in short_dir.iterdir())


def test_runtime_dir_holds_the_private_directory(kleidi_factory, short_dir, monkeypatch):
    run = short_dir / "run"
    run.mkdir(mode=0o700)
    proc = kleidi_factory(settings={"server": {"runtime_dir": str(run)}})
    assert private_dir_of(proc).parent == run
    assert proc.stop() == 0
    assert list(run.iterdir()) == []

    systemd = short_dir / "sd"
    systemd.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(systemd))
    proc = kleidi_factory("via-env")
    assert private_dir_of(proc).parent == systemd


def test_a_runtime_dir_too_long_for_socket_paths_is_a_clean_config_error(kleidi_factory, short_dir):
    long_dir = short_dir / ("d" * 80)
    long_dir.mkdir()
    proc = kleidi_factory(start=False, settings={"server": {"runtime_dir": str(long_dir)}})
    proc.start(wait=False)
    assert proc.proc.wait(30) == 2
    assert "server.runtime_dir" in proc.log() and "fix" in proc.log() and "Traceback" not in proc.log()
    assert list(long_dir.iterdir()) == []
    assert not proc.socket_path.exists()


# ----------------------------------------------------------------------- foreign exceptions, in process

class _Injected(RuntimeError):
    pass


def _fail_once(real: Callable[..., Any]) -> Callable[..., Any]:
    state = {"armed": True}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if state["armed"]:
            state["armed"] = False
            raise _Injected("secret-relayed-bytes")  # the gate must never log this text
        return real(*args, **kwargs)

    return wrapper


INJECTIONS: dict[str, tuple[Any, str, bool]] = {  # where: (object, attribute, whether the victim is refused)
    "peer credentials": (callers.PeerCredentials, "of", False),
    "relay data": (callers._Relay, "_forward", False),
    "upstream connect": (callers, "_relay_socket", False),
    "refusal protocol": (callers.h2.connection.H2Connection, "receive_data", True),
    "refusal report": (callers.audit, "note", True),
}


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("where", list(INJECTIONS))
def test_a_foreign_exception_closes_one_connection_and_the_gate_serves_on(where, loop, short_dir, monkeypatch,
                                                                          caplog):
    owner, attribute, refused = INJECTIONS[where]
    monkeypatch.setattr(callers.audit, "note", lambda event, **fields: None)  # no audit log in this process
    monkeypatch.setattr(owner, attribute, _fail_once(getattr(owner, attribute)))
    short_dir.chmod(0o711)
    caplog.set_level("INFO", logger="kleidi.callers")

    async def scenario() -> None:
        gate = SocketGate(parse_endpoint(f"unix://{short_dir}/gate.sock"), CallerPolicy(frozenset({0})),
                          refused_timeout=5)
        gate.prepare()

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
            writer.close()

        upstream = await asyncio.start_unix_server(echo, path=str(gate.private_path))
        await gate.start(0o666, None)
        loop_ = asyncio.get_running_loop()
        public = str(short_dir / "gate.sock")
        try:
            async with asyncio.timeout(30):
                # The victim: its connection is closed (or refused), nothing more.
                victim = connected_as(NOBODY, NOBODY, public) if refused else socket.socket(socket.AF_UNIX)
                victim.setblocking(False)
                if not refused:
                    await loop_.sock_connect(victim, public)
                await loop_.sock_sendall(victim, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0" * 64)
                try:
                    while await loop_.sock_recv(victim, 65536):
                        pass
                except ConnectionResetError:
                    pass
                victim.close()
                # The next caller is served.
                for _ in range(3):
                    with socket.socket(socket.AF_UNIX) as caller:
                        caller.setblocking(False)
                        await loop_.sock_connect(caller, public)
                        await loop_.sock_sendall(caller, b"hello")
                        assert await loop_.sock_recv(caller, 5) == b"hello"
                while gate._pairs or gate._refused:  # every connection closed, nothing held
                    await asyncio.sleep(0.01)
        finally:
            await gate.close()
            upstream.close()

    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(scenario())
    else:
        asyncio.run(scenario())
    gc.collect()  # a socket the gate dropped without closing warns now, in this test (warnings are errors)
    assert f"internal error ({_Injected.__name__})" in caplog.text
    assert "secret-relayed-bytes" not in caplog.text
