"""Process hardening at start-up: no core dumps, not dumpable, optionally no swapping."""

from __future__ import annotations

import ctypes
import logging
import os
import resource

from kleidi.errors import ConfigError

log = logging.getLogger("kleidi.server")  # the start-up log, as before the move

_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4
_MCL_CURRENT, _MCL_FUTURE, _MCL_ONFAULT = 1, 2, 4


def harden_process(lock_memory: bool = False) -> None:
    """No core dumps (they would hold seeds and keys), and no ptrace or /proc/<pid>/mem access by
    other processes of the same user: the process is marked non-dumpable. With ``lock_memory``,
    every page is locked in RAM so none reaches swap."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        libc = None
    if lock_memory:
        # ONFAULT: lock pages as they are touched, rather than faulting in every thread's whole stack now.
        if libc is None or libc.mlockall(_MCL_CURRENT | _MCL_FUTURE | _MCL_ONFAULT) != 0:
            errno_text = os.strerror(ctypes.get_errno()) if libc is not None else "no libc"
            raise ConfigError(f"server.lock_memory: cannot lock memory ({errno_text})",
                              fix="give kleidi CAP_IPC_LOCK (in a pod: securityContext.capabilities.add: [IPC_LOCK]) "
                              "or raise its RLIMIT_MEMLOCK (systemd: LimitMEMLOCK=infinity), or set "
                              "server.lock_memory: false")
        log.info("memory locked in RAM (mlockall): no page of kleidi's is swapped out")
    if libc is None or not hasattr(libc, "prctl"):
        log.warning("prctl is not available: the process stays dumpable")
        return
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not mark the process non-dumpable (errno %d)", ctypes.get_errno())
    dumpable = libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0)  # read back what the kernel now holds
    log.info("process hardened: core dumps off (RLIMIT_CORE 0), dumpable=%d", dumpable)
