"""The systemd unit (deploy/systemd: kleidi.service, kleidi.sysusers, kleidi.tmpfiles).

systemd is not PID 1 on the test machines, so no test starts the unit through systemd. What is tested:

- ``systemd-analyze verify`` accepts the unit without a warning (in a temporary root that has the
  user from kleidi.sysusers, the ExecStart binary and systemd's own units), and flags a broken copy;
- ``systemd-analyze security --offline=true`` scores it at most EXPOSURE (the score docs/deploy/systemd.md gives);
- ``systemd-sysusers --root`` and ``systemd-tmpfiles --root --create`` make the user, group and
  directories the docs describe;
- every directive docs/deploy/systemd.md lists in its table is in the unit, with that value;
- kleidi really runs in the unit's sandbox, built here from the unit's own directives without systemd
  (see :func:`_enter_sandbox`): User/Group (uid/gid from kleidi.sysusers), no supplementary groups,
  CapabilityBoundingSet= and AmbientCapabilities= (empty), NoNewPrivileges, UMask, LimitCORE,
  ProtectSystem=strict (every mount read-only), PrivateTmp, ProtectHome, RuntimeDirectory (the only
  writable path, mode RuntimeDirectoryMode, $RUNTIME_DIRECTORY set), MemoryDenyWriteExecute (the
  kernel's PR_SET_MDWE, which refuses the same mappings), SystemCallFilter/SystemCallErrorNumber/
  SystemCallArchitectures (a seccomp allow-list of exactly the names systemd-analyze lists for the
  unit's groups, loaded through libseccomp) and RestrictAddressFamilies (socket() for the unit's
  families only; systemd answers others with EAFNOSUPPORT, this filter with EPERM).
  Callers over the socket: a process whose primary group is
  kleidi's gets Status/Encrypt/Decrypt; one with kleidi's group only as a supplementary group reaches
  the socket but is refused (caller authentication checks the primary gid); one without it cannot
  connect at all.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
UNIT_DIR = ROOT / "deploy" / "systemd"
UNIT = UNIT_DIR / "kleidi.service"
DOC = ROOT / "docs" / "deploy" / "systemd.md"
VENV_BIN = Path(sys.executable).parent
EXPOSURE = 1.2  # systemd-analyze security's overall exposure level for the unit, as docs/deploy/systemd.md says


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> every value given, in order (systemd keeps all of a list setting's lines)."""
    section, values = "", dict[str, list[str]]()
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return values


def service(key: str) -> str:
    """The last value of a [Service] key (what systemd uses for a single-valued setting)."""
    return parse_unit(UNIT)[f"Service.{key}"][-1]


def syscall_group(name: str) -> set[str]:
    """The system calls of a systemd-analyze syscall-filter group, nested groups expanded."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager", name], capture_output=True, text=True,
                         check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        calls |= syscall_group(word) if word.startswith("@") else {word}
    return calls


def allowed_syscalls(filters: list[str]) -> list[str]:
    """systemd's reading of SystemCallFilter= lines that start with an allow-list: later ~ lines remove."""
    allowed: set[str] = set()
    for line in filters:
        deny = line.startswith("~")
        names: set[str] = set()
        for word in line.lstrip("~").split():
            names |= syscall_group(word) if word.startswith("@") else {word}
        allowed = allowed - names if deny else allowed | names
    return sorted(allowed)


# ------------------------------------------------------------------------------------------------ the sandbox

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC = 1, 2, 4, 32, 4096, 16384
_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS, _PR_SET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN = 24, 38, 65, 1
_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_EQ = 4


class _ScmpArgCmp(ctypes.Structure):
    """libseccomp's struct scmp_arg_cmp: argument index, comparison, two operands."""

    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _enter_sandbox(spec: dict[str, Any]) -> None:
    """Run as root in a private mount namespace (``unshare --mount --propagation private``): apply the
    unit's sandbox as systemd would (mounts, user, capabilities, no_new_privs, umask, rlimits, MDWE,
    seccomp) and exec ``spec["argv"]``. Only what the spec lists, which the test reads from the unit."""
    import resource

    libc = ctypes.CDLL(None, use_errno=True)

    def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        _check(libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                          ctypes.c_ulong(flags), data.encode() if data else None), f"mount {target}")

    # Directories the service sees at their own paths (the test's stand-ins for /etc/kleidi,
    # /var/lib/kleidi, /run/kleidi): held open, so they can be bound back once /tmp is private.
    binds = [(os.open(path, os.O_PATH | os.O_DIRECTORY), path, writable) for path, writable in spec["binds"]]
    if spec["private_tmp"]:
        for tmp in ("/tmp", "/var/tmp"):
            mount("tmpfs", tmp, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777")
    if spec["protect_home"]:
        for home in ("/home", "/root", "/run/user"):
            if os.path.isdir(home):
                mount("tmpfs", home, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0000")  # read-only below
    for fd, path, _writable in binds:
        for home in ("/home", "/root"):
            if spec["protect_home"] and path.startswith(home + "/"):
                os.chmod(home, 0o711)  # only to reach what is bound back (BindReadOnlyPaths=)
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND)
        os.close(fd)
    if spec["protect_system_strict"]:  # every mount read-only, but the writable binds
        writable = {path for _fd, path, w in binds if w} | ({"/tmp", "/var/tmp"} if spec["private_tmp"] else set())
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for target in mounts:
            if target in writable or target.startswith(("/proc", "/sys", "/dev")):
                continue  # systemd handles these with ProtectKernel*/PrivateDevices, which this does not emulate
            try:
                mount("none", target.replace("\\040", " "), None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)
            except FileNotFoundError:
                continue  # a mount under the host's /tmp, hidden by PrivateTmp
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    if spec["bounding_set_empty"]:
        for cap in range(last_cap + 1):
            _check(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    os.setgroups([])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])  # clears the permitted, effective and ambient sets (no keep-caps)
    if spec["no_new_privs"]:
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.umask(spec["umask"])
    resource.setrlimit(resource.RLIMIT_CORE, (spec["limit_core"], spec["limit_core"]))
    if spec["mdwe"]:
        _check(libc.prctl(_PR_SET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0), "PR_SET_MDWE")
    if spec["syscalls"] is not None:
        seccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        seccomp.seccomp_init.restype = ctypes.c_void_p
        seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        seccomp.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
        seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
        seccomp.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                                   ctypes.POINTER(_ScmpArgCmp)]
        families = spec["address_families"]
        # Everything else fails with SystemCallErrorNumber=; only the native architecture's table
        # (libseccomp's default, as SystemCallArchitectures=native).
        ctx = seccomp.seccomp_init(0x00050000 | spec["errno"])
        for name in spec["syscalls"]:
            number = seccomp.seccomp_syscall_resolve_name(name.encode())
            if name == "socket" and families is not None:  # RestrictAddressFamilies=: socket() of these only
                for family in families:
                    cmp = _ScmpArgCmp(0, _SCMP_CMP_EQ, family, 0)
                    _check(seccomp.seccomp_rule_add_array(ctx, _SCMP_ACT_ALLOW, number, 1, ctypes.byref(cmp)),
                           f"allow socket({family})")
            elif number >= 0:  # a name this architecture does not have is skipped, as systemd does
                _check(seccomp.seccomp_rule_add(ctx, _SCMP_ACT_ALLOW, number, 0), f"allow {name}")
        _check(seccomp.seccomp_load(ctx), "seccomp_load")
    os.execve(spec["argv"][0], spec["argv"], spec["env"])


if __name__ == "__main__":  # the sandbox: python test_systemd.py SPEC-JSON
    _enter_sandbox(json.loads(sys.argv[1]))

# ------------------------------------------------------------------------------------------------ the tests

import pytest  # noqa: E402  (the sandbox above runs before any of these are imported)
import yaml  # noqa: E402

from tests.support import free_port, stop_process  # noqa: E402


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the systemd tests run as root (as CI does): they chown to the unit's user and mount")


@dataclass
class UnitRoot:
    """A temporary root with the unit installed as docs/deploy/systemd.md says."""

    path: Path

    @property
    def unit(self) -> Path:
        return self.path / "etc/systemd/system/kleidi.service"

    def ids(self, name: str) -> tuple[int, int]:
        for line in (self.path / "etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return int(fields[2]), int(fields[3])
        raise AssertionError(f"no user {name} in {self.path}/etc/passwd")

    def verify(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["systemd-analyze", "verify", "--no-pager", f"--root={self.path}", "kleidi.service"],
                              capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def unit_root(tmp_path: Path) -> UnitRoot:
    _need_root()
    root = tmp_path / "root"
    for directory in ("etc/systemd/system", "etc/sysusers.d", "etc/tmpfiles.d", "usr/local/bin", "usr/lib/systemd",
                      "bin", "var/lib", "run"):
        (root / directory).mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system/kleidi.service")
    shutil.copy(UNIT_DIR / "kleidi.sysusers", root / "etc/sysusers.d/kleidi.conf")
    shutil.copy(UNIT_DIR / "kleidi.tmpfiles", root / "etc/tmpfiles.d/kleidi.conf")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    # verify checks that ExecStart's and ExecReload's programs exist and are executable in the root
    shutil.copy(VENV_BIN / "kleidi", root / "usr/local/bin/kleidi")
    shutil.copy("/bin/kill", root / "bin/kill")
    for command in (["systemd-sysusers", f"--root={root}"], ["systemd-tmpfiles", f"--root={root}", "--create"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"{command}: {done.stderr}"
    return UnitRoot(root)


def test_unit_verifies_without_warnings(unit_root: UnitRoot) -> None:
    done = unit_root.verify()
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    # ...and the same check flags a broken copy (a bad value is only a warning, so stderr is what counts)
    unit_root.unit.write_text(unit_root.unit.read_text().replace("ProtectProc=invisible", "ProtectProc=invisibel")
                              .replace("ExecStart=/usr/local/bin/kleidi", "ExecStart=/usr/local/bin/kleidi-missing"))
    broken = unit_root.verify()
    assert "invisibel" in broken.stderr and "kleidi-missing" in broken.stderr, broken.stderr


def test_security_exposure_is_at_most_the_documented_score() -> None:
    done = subprocess.run(["systemd-analyze", "security", "--no-pager", "--offline=true",
                           f"--threshold={EXPOSURE * 10:.0f}", str(UNIT)],
                          capture_output=True, text=True, timeout=120, check=False)
    score = re.search(r"Overall exposure level for kleidi\.service: ([0-9.]+)", done.stdout)
    assert score, done.stdout + done.stderr
    assert float(score.group(1)) <= EXPOSURE and done.returncode == 0, done.stdout
    assert f"**{EXPOSURE}**" in DOC.read_text(), f"docs/deploy/systemd.md does not give the score {EXPOSURE}"


def test_sysusers_and_tmpfiles_make_the_user_and_directories(unit_root: UnitRoot) -> None:
    uid, gid = unit_root.ids("kleidi")
    assert (uid, gid) == (10001, 10001)  # the image's and the static pod's ids
    passwd = next(line for line in (unit_root.path / "etc/passwd").read_text().splitlines()
                  if line.startswith("kleidi:"))
    assert passwd.endswith(":/var/lib/kleidi:/usr/sbin/nologin"), passwd
    assert "kleidi:x:10001:" in (unit_root.path / "etc/group").read_text()
    expected = {"etc/kleidi": (0o750, 0, gid), "var/lib/kleidi": (0o700, uid, gid)}
    for path, (mode, owner, group) in expected.items():
        st = (unit_root.path / path).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, owner, group), path
    assert service("User") == "kleidi" and service("Group") == "kleidi"


def _documented_directives() -> list[tuple[str, str]]:
    """The directives docs/deploy/systemd.md's table promises: rows that start with | `Key=value` |."""
    rows = re.findall(r"^\| `([A-Za-z]+)=([^`]*)` \|", DOC.read_text(), re.M)
    assert len(rows) >= 30, f"docs/deploy/systemd.md lists only {len(rows)} directives in its table"
    return rows


def test_every_documented_directive_is_in_the_unit() -> None:
    unit = parse_unit(UNIT)
    missing = [f"{key}={value}" for key, value in _documented_directives()
               if value not in unit.get(f"Service.{key}", []) + unit.get(f"Unit.{key}", [])]
    assert not missing, f"docs/deploy/systemd.md promises these, kleidi.service lacks them: {missing}"
    keys = {key.partition(".")[2] for key in unit if key.startswith("Service.")}
    documented = {key for key, _ in _documented_directives()}
    assert not keys - documented, f"undocumented directives in kleidi.service: {sorted(keys - documented)}"


def test_the_unit_has_no_dynamic_user_and_no_private_users() -> None:
    # DynamicUser would give the keyring no stable owner; PrivateUsers would map every caller's uid
    # to nobody, so caller authentication (SO_PEERCRED) could not tell the apiserver from anyone.
    unit = parse_unit(UNIT)
    assert "Service.DynamicUser" not in unit and "Service.PrivateUsers" not in unit


# -- kleidi in the unit's sandbox

CALLER = r"""
import sys, grpc
from kleidi._proto.kmsv2 import api_pb2 as pb, api_pb2_grpc as rpc
with grpc.insecure_channel(sys.argv[1], options=[("grpc.default_authority", "localhost")]) as channel:
    stub = rpc.KeyManagementServiceStub(channel)
    try:
        status = stub.Status(pb.StatusRequest(), timeout=10)
        sealed = stub.Encrypt(pb.EncryptRequest(uid="systemd-test", plaintext=b"p" * 32), timeout=10)
        opened = stub.Decrypt(pb.DecryptRequest(uid="systemd-test", ciphertext=sealed.ciphertext,
                                                key_id=sealed.key_id, annotations=sealed.annotations), timeout=10)
    except grpc.RpcError as exc:
        print(exc.code().name)
        sys.exit(1)
    assert opened.plaintext == b"p" * 32 and sealed.key_id == status.key_id
    print("ok", status.healthz)
"""


def _call_as(uid: int, gid: int, groups: list[int], endpoint: str) -> tuple[int, str]:
    command = ["setpriv", f"--reuid={uid}", f"--regid={gid}",
               f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
               sys.executable, "-c", CALLER, endpoint]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"})
    return done.returncode, (done.stdout + done.stderr).strip()


@dataclass
class Sandboxed:
    proc: subprocess.Popen[bytes]
    log: Path
    socket: Path


def _unit_sandbox(uid: int, gid: int, binds: list[tuple[str, bool]], argv: list[str],
                  env: dict[str, str]) -> dict[str, Any]:
    """The sandbox spec for :func:`_enter_sandbox`, from the unit's directives."""
    # This machine's Python lives under /root (pyenv), which ProtectHome hides: it is bound back
    # read-only, as a BindReadOnlyPaths= drop-in would do.
    python = [(sys.base_prefix, False) for home in ("/root/", "/home/") if sys.base_prefix.startswith(home)]
    return {
        "binds": [*binds, *python],
        "private_tmp": service("PrivateTmp") == "yes",
        "protect_home": service("ProtectHome") == "yes",
        "protect_system_strict": service("ProtectSystem") == "strict",
        "bounding_set_empty": service("CapabilityBoundingSet") == "" and service("AmbientCapabilities") == "",
        "no_new_privs": service("NoNewPrivileges") == "yes",
        "uid": uid, "gid": gid,
        "umask": int(service("UMask"), 8),
        "limit_core": int(service("LimitCORE")),
        "mdwe": service("MemoryDenyWriteExecute") == "yes",
        "syscalls": allowed_syscalls(parse_unit(UNIT)["Service.SystemCallFilter"]),
        "errno": {"EPERM": 1}[service("SystemCallErrorNumber")],
        "address_families": [int(getattr(socket, name)) for name in service("RestrictAddressFamilies").split()],
        "argv": argv, "env": env,
    }


def _sandboxed(spec: dict[str, Any], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(["unshare", "--mount", "--propagation", "private", sys.executable, __file__,
                                 json.dumps(spec)], stdout=out, stderr=subprocess.STDOUT, cwd="/")


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """Stands for /: etc/kleidi, var/lib/kleidi, run/kleidi. Outside pytest's 0700 directory, so
    that callers of other uids can reach the socket."""
    state = Path(tempfile.mkdtemp(prefix="kleidi-systemd-"))
    try:
        state.chmod(0o755)
        yield state
    finally:
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def sandboxed_kleidi(unit_root: UnitRoot, state_dir: Path, tmp_path: Path) -> Iterator[Sandboxed]:
    uid, gid = unit_root.ids(service("User"))
    etc, lib, run = state_dir / "etc/kleidi", state_dir / "var/lib/kleidi", state_dir / "run/kleidi"
    run_mode = int(service("RuntimeDirectoryMode"), 8)
    for directory, mode, owner in ((etc, 0o750, 0), (lib, 0o700, uid), (run, run_mode, uid)):
        directory.mkdir(parents=True)
        os.chown(directory, owner, gid)
        directory.chmod(mode)
    keyring, socket = lib / "keyring.json", run / "kleidi.sock"
    subprocess.run([str(VENV_BIN / "kleidi"), "keygen", "--keyring", str(keyring)], check=True, capture_output=True)
    for made in lib.iterdir():  # the keyring and its lock file, as `chown -R kleidi:kleidi /var/lib/kleidi`
        os.chown(made, uid, gid)
    config = etc / "config.yaml"
    config.write_text(yaml.safe_dump({
        # a non-root apiserver: the socket is group-shared, and callers whose primary group is kleidi's are allowed
        "server": {"endpoint": f"unix://{socket}", "socket_mode": "0660", "allowed_gids": [gid]},
        "backend": {"kind": "local", "keyring": str(keyring)},
        "telemetry": {"address": f"127.0.0.1:{free_port()}"},
    }))
    os.chown(config, 0, gid)
    config.chmod(0o640)
    exec_start = service("ExecStart").split()
    assert exec_start[:2] == ["/usr/local/bin/kleidi", "serve"], exec_start
    # the unit's ExecStart, with this checkout's kleidi and the test's config path; RuntimeDirectory
    # is the one writable path
    spec = _unit_sandbox(uid, gid, [(str(etc), False), (str(lib), False), (str(run), True)],
                         [str(VENV_BIN / "kleidi"), *exec_start[1:-1], str(config)],
                         {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "RUNTIME_DIRECTORY": str(run)})
    log = tmp_path / "kleidi.log"
    proc = _sandboxed(spec, log)
    try:
        deadline = time.monotonic() + 60
        while "serving KMS" not in log.read_text():
            assert proc.poll() is None, f"kleidi in the sandbox exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"kleidi in the sandbox did not start:\n{log.read_text()}"
            time.sleep(0.2)
        yield Sandboxed(proc, log, socket)
    finally:
        stop_process(proc, 20)


PROBE = r"""
import mmap, os, socket
def attempt(what, call):
    try:
        call()
        print(what, "allowed")
    except OSError as exc:
        print(what, os.strerror(exc.errno))
attempt("write-exec-mapping", lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC))
attempt("nice", lambda: os.nice(1))  # setpriority: @resources
attempt("setaffinity", lambda: os.sched_setaffinity(0, os.sched_getaffinity(0)))  # @resources
attempt("write-etc", lambda: open("/etc/kleidi-probe", "w"))
attempt("write-tmp", lambda: open("/tmp/probe", "w").close())
attempt("read-home", lambda: os.listdir("/home"))
attempt("netlink-socket", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close())
attempt("inet6-socket", lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close())
print("umask", oct(os.umask(0)))
"""


def test_the_sandbox_refuses_what_the_unit_forbids(unit_root: UnitRoot, state_dir: Path, tmp_path: Path) -> None:
    """The same sandbox around a probe: what kleidi does not do, the sandbox refuses."""
    uid, gid = unit_root.ids(service("User"))
    log = tmp_path / "probe.log"
    proc = _sandboxed(_unit_sandbox(uid, gid, [], [sys.executable, "-c", PROBE], {"PATH": "/usr/bin:/bin"}), log)
    assert proc.wait(60) == 0, log.read_text()
    assert log.read_text().splitlines() == [
        "write-exec-mapping Permission denied",  # MemoryDenyWriteExecute
        "nice Operation not permitted",  # ~@resources, SystemCallErrorNumber=EPERM
        "setaffinity Operation not permitted",
        "write-etc Read-only file system",  # ProtectSystem=strict
        "write-tmp allowed",  # PrivateTmp
        "read-home Permission denied",  # ProtectHome (an empty, inaccessible /home)
        "netlink-socket Operation not permitted",  # RestrictAddressFamilies (systemd answers EAFNOSUPPORT)
        "inet6-socket allowed",
        "umask 0o77",  # UMask=0077
    ], log.read_text()
    # outside the sandbox, the same probe is allowed what the sandbox refuses (so the probe can tell)
    try:
        free = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    finally:
        Path("/etc/kleidi-probe").unlink(missing_ok=True)
        Path("/tmp/probe").unlink(missing_ok=True)
    assert "nice allowed" in free.stdout and "write-exec-mapping allowed" in free.stdout, free.stdout
    assert "netlink-socket allowed" in free.stdout, free.stdout


def _status_fields(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def test_kleidi_serves_in_the_units_sandbox(sandboxed_kleidi: Sandboxed, unit_root: UnitRoot) -> None:
    uid, gid = unit_root.ids("kleidi")
    pid = sandboxed_kleidi.proc.pid
    status = _status_fields(pid)
    assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [str(gid)] * 4
    assert status["Groups"].strip() == ""
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, caps
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"  # 2: a filter is loaded
    assert status["Umask"].strip() == service("UMask")
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert re.search(r"^Max core file size\s+0\s+0\s", limits, re.M), limits
    mounts = {fields[4]: fields[5].split(",") for fields in
              (line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines())}
    assert "ro" in mounts["/"] and "rw" in mounts[str(sandboxed_kleidi.socket.parent)]
    assert "ro" in mounts[str(sandboxed_kleidi.socket.parent.parent.parent / "etc/kleidi")]
    st = sandboxed_kleidi.socket.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (uid, gid, 0o660)

    endpoint = f"unix://{sandboxed_kleidi.socket}"
    # the apiserver's user with kleidi's group as its primary group: Status, Encrypt, Decrypt
    code, out = _call_as(20002, gid, [], endpoint)
    assert code == 0 and out == "ok ok", out
    # kleidi's group only as a supplementary group: the socket is reachable, the caller check refuses
    code, out = _call_as(20003, 20003, [gid], endpoint)
    assert code == 1 and out == "PERMISSION_DENIED", out
    # not in the group: the socket directory (RuntimeDirectoryMode 0750) keeps it out
    code, out = _call_as(20004, 20004, [], endpoint)
    assert code == 1 and out == "UNAVAILABLE", out
    # root (a kubeadm apiserver) is allowed by default
    code, out = _call_as(0, 0, [], endpoint)
    assert code == 0 and out == "ok ok", out

    # SIGHUP (ExecReload) reloads, SIGTERM stops and removes the socket
    assert service("ExecReload") == "/bin/kill -HUP $MAINPID"
    sandboxed_kleidi.proc.send_signal(1)
    deadline = time.monotonic() + 30
    while "SIGHUP" not in sandboxed_kleidi.log.read_text():
        assert time.monotonic() < deadline, sandboxed_kleidi.log.read_text()
        time.sleep(0.2)
    sandboxed_kleidi.proc.terminate()
    assert sandboxed_kleidi.proc.wait(30) == 0, sandboxed_kleidi.log.read_text()
    assert not sandboxed_kleidi.socket.exists()
    assert "Traceback" not in sandboxed_kleidi.log.read_text(), sandboxed_kleidi.log.read_text()
