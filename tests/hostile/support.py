"""Helpers for hostile tests: code that runs as another, unprivileged user against a real kleidi.

Stable API (other hostile test modules build on it):

* :data:`NOBODY` -- uid and gid 65534.
* :func:`run_as` -- run a small Python script as that user, to completion, and get its
  :class:`Outcome` (exit code, output, and the JSON report the script printed last).
* :func:`started_as` -- the same, in the background: a context manager yielding the process, which
  is killed and reaped on exit.
* :func:`connected_as` / :func:`channel_through` -- a socket connected *by* another user, driven by a
  real gRPC client of the test's (the kernel records the other user as the caller).
* :func:`shared_kleidi` / :func:`audit_records` -- kleidi on a socket every user may connect to by
  file permissions (so only the caller gate decides), and its audit log.

A hostile script is bounded: it gets ``argv`` (its arguments) and ``deadline`` (a
``time.monotonic()`` value) as globals and must stop by itself, in count (loop a bounded number of
times) and in time (check ``deadline``); an alarm kills it anyway ``timeout`` seconds after start.
Scripts get only the standard library of Python 3.11 (``python -I``: no site packages, no kleidi), no
supplementary groups, ``/`` as working directory and an empty environment. Their traffic must stay
on unix sockets and 127.0.0.1.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from kleidi._proto.kmsv2 import api_pb2_grpc as v2_grpc
from tests.conftest import wait_for

NOBODY = 65534

_PREAMBLE = """\
import signal, sys, time
signal.alarm({alarm})
deadline = time.monotonic() + {budget}
argv = sys.argv[1:]
"""


@dataclass(frozen=True)
class Outcome:
    """What a script run as another user did."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def report(self) -> Any:
        """The last line the script printed, parsed as JSON (a script's summary of what it managed)."""
        lines = self.stdout.strip().splitlines()
        if not lines:
            raise AssertionError(f"the script printed no report (exit {self.returncode}): {self.stderr[-2000:]}")
        return json.loads(lines[-1])


@functools.cache
def interpreter(uid: int = NOBODY, gid: int = NOBODY) -> str:
    """A Python interpreter that ``uid`` can run: the test's own, unless its installation is out of
    that user's reach (e.g. under root's 0700 home), then the system's."""
    failures = []
    for candidate in (sys.executable, sys._base_executable, "/usr/bin/python3"):
        try:
            subprocess.run([candidate, "-I", "-c", "pass"], user=uid, group=gid, extra_groups=[], cwd="/", env={},
                           capture_output=True, check=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            failures.append(f"{candidate}: {exc}")
            continue
        return candidate
    raise AssertionError(f"no Python interpreter that uid {uid} can run: {failures}")


def _command(script: str, args: tuple[str, ...], timeout: float, uid: int, gid: int) -> list[str]:
    # The script's own deadline comes first; the alarm is the backstop if it ignores it.
    preamble = _PREAMBLE.format(alarm=math.ceil(timeout) + 2, budget=timeout)
    return [interpreter(uid, gid), "-I", "-c", preamble + script, *args]


T = TypeVar("T")


@contextmanager
def sampling(sample: Callable[[], T], interval: float = 0.0) -> Iterator[list[T]]:
    """Call ``sample`` in a thread, every ``interval`` seconds, while the block runs (and at least
    once); yields the list of what it returned, filled as it goes."""
    samples: list[T] = []
    done = threading.Event()

    def loop() -> None:
        while not done.is_set() or not samples:
            samples.append(sample())
            done.wait(interval)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join(60)


@contextmanager
def started_as(script: str, *args: str, uid: int = NOBODY, gid: int = NOBODY,
               timeout: float = 30) -> Iterator[subprocess.Popen[str]]:
    """Run ``script`` as ``uid``/``gid`` in the background (stdout and stderr piped, text); on exit
    the process is killed if still running, and reaped."""
    proc = subprocess.Popen(_command(script, args, timeout, uid, gid), user=uid, group=gid, extra_groups=[], cwd="/",
                            env={}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def run_as(script: str, *args: str, uid: int = NOBODY, gid: int = NOBODY, timeout: float = 30) -> Outcome:
    """Run ``script`` as ``uid``/``gid`` to completion (at most ``timeout`` seconds, plus a grace)."""
    with started_as(script, *args, uid=uid, gid=gid, timeout=timeout) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        return Outcome(proc.returncode, stdout, stderr)


def connected_as(uid: int, gid: int, address: str) -> socket.socket:
    """A unix socket connected to ``address`` (a path, or ``"\\0name"``) by a process running as
    uid/gid with no supplementary groups."""
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit (no gRPC, no Python clean-up)
        code = 1
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(address)
            socket.send_fds(there, [b"ok"], [conn.fileno()])
            code = 0
        except BaseException as exc:  # report to the parent, never run the parent's code
            there.sendall(repr(exc).encode()[:200])
        finally:
            os._exit(code)
    there.close()
    message, fds, _, _ = socket.recv_fds(here, 256, 1)
    os.waitpid(pid, 0)
    here.close()
    if not fds:
        raise AssertionError(f"the child could not connect as {uid}:{gid}: {message.decode()}")
    return socket.socket(fileno=fds[0])


@contextmanager
def channel_through(conn: socket.socket, workdir: Path) -> Iterator[v2_grpc.KeyManagementServiceStub]:
    """A gRPC stub whose one connection is ``conn`` (relayed through a private socket of the test's)."""
    path = workdir / f"relay-{uuid.uuid4().hex[:8]}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve() -> None:
        try:
            client, _ = listener.accept()  # grpc-python dials once; this is that connection
        except OSError:
            return
        with client:
            upward = threading.Thread(target=pump, args=(client, conn), daemon=True)
            upward.start()
            pump(conn, client)
            upward.join(5)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    channel = grpc.insecure_channel(f"unix://{path}", options=[("grpc.default_authority", "localhost"),
                                                             ("grpc.enable_retries", 0)])
    try:
        yield v2_grpc.KeyManagementServiceStub(channel)
    finally:
        channel.close()
        listener.close()
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        server.join(5)
        conn.close()


def audit_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def shared_kleidi(kleidi_factory: Any, short_dir: Path, wait: bool = True, **server: Any) -> Any:
    """kleidi on a socket other users can reach by file permissions, so that only the caller check
    decides; audit log at ``short_dir / "audit.jsonl"``. ``server`` adds server settings."""
    short_dir.chmod(0o711)
    proc = kleidi_factory(start=False, settings={
        "server": {"socket_mode": "0666", **server},
        "audit": {"path": str(short_dir / "audit.jsonl"), "fsync": "always"},
    })
    proc.start(wait=wait)
    if not wait:
        wait_for(lambda: "serving KMS" in proc.log(), 20, "kleidi serving")
    return proc
