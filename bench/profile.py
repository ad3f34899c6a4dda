"""Where kleidi's time goes during a scenario that missed its target: py-spy attached to the process while
the load generator replays the scenario; the collapsed stacks are summarised as top self and total time."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import VENV_BIN, log, run_json

PY_SPY = VENV_BIN / "py-spy"


def ensure_py_spy() -> bool:
    if PY_SPY.exists():
        return True
    log("installing py-spy into the virtualenv (profiles of missed targets)")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                             "py-spy"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        log(f"py-spy could not be installed: {result.stderr[-500:]}")
    return PY_SPY.exists()


def _frame_name(frame: str) -> str:
    """``handler (kleidi/service/grpc_api.py:63)`` -> ``handler (kleidi/service/grpc_api.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/src/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1].lstrip("/")
            if marker == "/lib/python3":
                path = "stdlib:" + path.split("/", 1)[-1]
            break
    return f"{name} ({path})" if path else name


def summarise(collapsed: str, top: int = 12) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        samples += count
        self_time[frames[-1]] += count
        for name in set(frames):
            total_time[name] += count

    def table(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": name, "percent": round(100 * n / samples, 1)} for name, n in counter.most_common(top)]

    # Leave out the main thread's chain of callers (the CLI, asyncio.run, the event loop itself): they
    # hold nearly every sample and say nothing about where the time goes.
    root_chain = max(total_time.values(), default=0) * 0.95
    below = Counter({name: n for name, n in total_time.items() if n < root_chain})
    return {"samples": samples, "top_self": table(self_time), "top_total": table(below)}


def profile_scenario(pid: int, load_args: list[str], seconds: float, out_file: Path) -> dict[str, Any]:
    """Run the load generator for ``seconds`` while py-spy samples ``pid`` (100 Hz, non-blocking)."""
    if not ensure_py_spy():
        return {"error": "py-spy is not available"}
    record = [str(PY_SPY), "record", "--pid", str(pid), "--format", "raw", "--rate", "100", "--nonblocking",
              "--duration", str(int(seconds) + 1), "--output", str(out_file)]
    spy = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    result: dict[str, Any] = {}

    def load() -> None:
        result.update(run_json([*load_args, "-duration", f"{seconds}s", "-warmup", "0.5s"]))

    thread = threading.Thread(target=load)
    thread.start()
    thread.join()
    _, err = spy.communicate(timeout=60)
    if not out_file.exists():
        return {"error": f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}"}
    summary = summarise(out_file.read_text())
    summary["file"] = str(out_file)
    summary["load_during_profile"] = {k: result.get(k) for k in ("op", "concurrency", "throughput", "p50_ms",
                                                                  "p99_ms")}
    return summary
