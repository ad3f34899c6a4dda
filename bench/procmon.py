"""Peak resident memory and CPU time of a process and its descendants, read from /proc."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name is in parentheses and may hold spaces: split after the last ')'
    return raw[raw.rindex(")") + 2:].split()


def tree(root: int) -> list[int]:
    """``root`` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_seconds(root: int) -> float:
    """User + system CPU of the tree, including children it has reaped."""
    total = 0.0
    for pid in tree(root):
        fields = _stat(pid)
        if fields is None:
            continue
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        if pid == root:
            ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
        total += ticks / _TICK
    return total


def rss_bytes(root: int, pids: list[int] | None = None) -> int:
    total = 0
    for pid in pids if pids is not None else tree(root):
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[21]) * _PAGE  # rss, pages
    return total


def _reset_peak(pid: int) -> None:
    try:  # "5" resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0)
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def _hwm_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Usage:
    peak_rss_mb: float
    cpu_seconds: float


class Monitor:
    """Sample the tree's RSS every ``interval`` seconds between ``start()`` and ``stop()``. The peak is the
    larger of the sampled tree total and the kernel's own peak (VmHWM, reset at start) of the root."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self._stop = threading.Event()
        self._peak = 0
        self._cpu0 = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> Monitor:
        _reset_peak(self.pid)
        self._cpu0 = cpu_seconds(self.pid)
        self._peak = rss_bytes(self.pid)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        pids, samples = tree(self.pid), 0
        while not self._stop.wait(self.interval):
            samples += 1
            if samples % 20 == 0:  # look for new children once a second; scanning /proc costs CPU
                pids = tree(self.pid)
            self._peak = max(self._peak, rss_bytes(self.pid, pids))

    def stop(self) -> Usage:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        peak = max(self._peak, rss_bytes(self.pid), _hwm_bytes(self.pid))
        return Usage(peak_rss_mb=peak / 2**20, cpu_seconds=cpu_seconds(self.pid) - self._cpu0)
