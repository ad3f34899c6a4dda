"""A real software TPM (swtpm) for the TPM backend's tests: its own state directory and free ports,
started and stopped by its own process id; restarting on the same state is a reboot."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support import free_port, stop_process

SWTPM = shutil.which("swtpm")


class Swtpm:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = self._free_pair()
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _free_pair() -> int:
        for _ in range(50):
            port = free_port()
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
        raise RuntimeError("no two free adjacent ports")

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> Swtpm:
        assert SWTPM is not None, "swtpm is not installed (scripts/system-packages.sh installs it)"
        log = open(self.state_dir.parent / f"{self.state_dir.name}.log", "ab")  # the child writes to it
        self._proc = subprocess.Popen(
            [SWTPM, "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir}",
             "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1", "--flags", "not-need-init,startup-clear"],
            stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self._proc.poll() is None, f"swtpm exited: see {log.name}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return self
            time.sleep(0.02)
        raise RuntimeError("swtpm did not start listening")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, 5)

    def restart(self) -> None:
        self.stop()
        self.start()

    @contextlib.contextmanager
    def esapi(self) -> Iterator[Any]:
        """A direct ESAPI connection, for what an operator or an attacker would do to the TPM."""
        os.environ.setdefault("TSS2_LOG", "all+none")
        from tpm2_pytss import ESAPI

        ctx = ESAPI(self.tcti)
        try:
            yield ctx
        finally:
            ctx.close()

    def clear(self) -> None:
        """TPM2_Clear with the platform hierarchy (as `tpm2_clear`): new owner seed, every owner key gone."""
        from tpm2_pytss.constants import ESYS_TR

        with self.esapi() as ctx:
            ctx.clear(ESYS_TR.RH_PLATFORM)

    def extend_pcr(self, pcr: int) -> None:
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
        from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

        with self.esapi() as ctx:
            ctx.pcr_extend(ESYS_TR.parse(f"pcr{pcr}"), TPML_DIGEST_VALUES([
                TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=os.urandom(32)))]))


@contextlib.contextmanager
def running_swtpm(state_dir: Path) -> Iterator[Swtpm]:
    tpm = Swtpm(state_dir).start()
    try:
        yield tpm
    finally:
        tpm.stop()
