"""The metrics and health listener against another local user (uid 65534) that floods it.

Every hostile script runs as a real process of uid 65534 and talks only to kleidi's listener on
127.0.0.1. The test (root, as kubelet and Prometheus would be) watches kleidi meanwhile: its thread
count, its answers, its counters and its log. Nothing here times kleidi's speed: durations appear
only as bounds that a slower machine can only loosen.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.hostile.support import run_as, sampling, started_as
from tests.test_telemetry import get, samples, value

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")  # CI runs as root

REQUEST_TIMEOUT = 2.0

# Opens up to argv[1] connections, sends nothing, and watches each until kleidi closes it. Prints a
# "settled" line once at most argv[2] are open (or after 5 s), then a "done" line.
IDLE_FLOOD = r"""
import json, select, socket
port, count, keep, hold = int(argv[0]), int(argv[1]), int(argv[2]), float(argv[3])
conns, refused = {}, 0
for _ in range(count):
    if time.monotonic() > deadline - hold - 5:
        break
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect(("127.0.0.1", port))
    except OSError:
        refused += 1
        s.close()
        continue
    s.setblocking(False)
    conns[s.fileno()] = {"sock": s, "at": time.monotonic(), "data": b"", "answered": None, "closed": None}
opened_at = time.monotonic()
poller = select.poll()
for fd in conns:
    poller.register(fd, select.POLLIN)
live, settled = set(conns), False
while live and time.monotonic() < min(opened_at + hold, deadline - 1):
    for fd, _ in poller.poll(100):
        c = conns[fd]
        try:
            data = c["sock"].recv(4096)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if data:
            c["data"] += data
            c["answered"] = c["answered"] or time.monotonic() - c["at"]
            continue
        c["closed"] = time.monotonic() - c["at"]
        poller.unregister(fd)
        c["sock"].close()
        live.discard(fd)
    if not settled and (len(live) <= keep or time.monotonic() > opened_at + 5):
        settled = True
        print(json.dumps({"phase": "settled", "opened": len(conns), "refused": refused, "open": len(live)}),
              flush=True)
answers = [[c["data"][:12].decode("latin-1"), c["answered"]] for c in conns.values() if c["data"]]
print(json.dumps({"phase": "done", "opened": len(conns), "still_open": len(live), "answers": answers,
                  "silently_closed": sum(1 for c in conns.values() if c["closed"] is not None and not c["data"])}),
      flush=True)
"""

# Opens argv[1] connections, then sends GET /metrics on all of them at once and reads every answer.
METRICS_BURST = r"""
import json, socket
port, count = int(argv[0]), int(argv[1])
socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
for s in socks:
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
statuses = []
for s in socks:
    data = b""
    s.settimeout(max(0.5, deadline - time.monotonic() - 1))
    try:
        while chunk := s.recv(65536):
            data += chunk
    except OSError:
        pass
    statuses.append(data.split(b"\r\n", 1)[0].decode("latin-1"))
    s.close()
print(json.dumps({"statuses": statuses}))
"""

# Plays each case of argv[1] ({name: [chunks, pause between chunks, half-close after]}) on its own
# connection; stops sending as soon as kleidi answers or closes; reports the answer and how it ended.
MALFORMED = r"""
import json, select, socket
port, cases = int(argv[0]), json.loads(argv[1])
results = {}
for name, (chunks, pause, half_close) in cases.items():
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    started, data, end = time.monotonic(), b"", "open"
    try:
        for chunk in chunks:
            s.sendall(chunk.encode("latin-1"))
            if select.select([s], [], [], pause)[0]:
                break
        if half_close:
            s.shutdown(socket.SHUT_WR)
        s.settimeout(max(0.5, min(8, deadline - time.monotonic() - 1)))
        while part := s.recv(65536):
            data += part
        end = "closed"
    except TimeoutError:
        end = "open"
    except OSError as exc:
        end = type(exc).__name__
    s.close()
    results[name] = {"answer": data.decode("latin-1"), "end": end, "seconds": time.monotonic() - started}
print(json.dumps(results))
"""


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


@contextmanager
def thread_watch(pid: int) -> Iterator[list[int]]:
    """Samples kleidi's thread count every 20 ms while the block runs."""
    with sampling(lambda: threads_of(pid), 0.02) as seen:
        yield seen


def telemetry_lines(log: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "kleidi.telemetry"]


def warmed_up(proc: Any) -> int:
    """kleidi's thread count once every endpoint has been used (gRPC starts some threads lazily)."""
    assert get(proc, "/livez") == (200, "ok\n")
    assert get(proc, "/metrics")[0] == 200
    proc.status()
    return threads_of(proc.proc.pid)


def test_idle_connections_from_another_user_cost_no_threads_and_are_closed(kleidi_factory: Any) -> None:
    max_connections, count = 32, 500
    proc = kleidi_factory(settings={"telemetry": {"max_connections": max_connections,
                                                  "request_timeout": f"{REQUEST_TIMEOUT}s"}})
    baseline = warmed_up(proc)
    before = samples(proc)

    with thread_watch(proc.proc.pid) as seen, \
            started_as(IDLE_FLOOD, str(proc.metrics_port), str(count), str(max_connections),
                       str(REQUEST_TIMEOUT + 8), timeout=40) as flood:
        assert flood.stdout is not None
        settled = json.loads(flood.stdout.readline() or "{}")
        assert settled.get("phase") == "settled", flood.stderr.read() if flood.stderr else ""
        assert settled["opened"] > max_connections * 4, settled  # the flood really outnumbered the limit
        assert settled["open"] <= max_connections, settled

        # While uid 65534 holds every slot it can: probes and scrapes (each takes the slot of the
        # oldest idle connection) and gRPC from root are answered.
        assert get(proc, "/readyz") == (200, "ok\n")
        assert get(proc, "/livez") == (200, "ok\n")
        assert proc.status().healthz == "ok"
        during = samples(proc)
        assert value(during, "kleidi_telemetry_connections_open") <= max_connections
        assert (value(during, "kleidi_telemetry_connections_rejected_total", reason="limit")
                - value(before, "kleidi_telemetry_connections_rejected_total", reason="limit")
                >= settled["opened"] - max_connections)

        done = json.loads(flood.stdout.readline() or "{}")
        assert done.get("phase") == "done", done
    # Slack for the executor threads of the background key refresh, which Python starts lazily.
    assert max(seen) <= baseline + 8, (baseline, max(seen))

    assert done["still_open"] == 0  # every idle connection was closed by kleidi, none left hanging
    timed_out = [answered for status, answered in done["answers"] if status.startswith("HTTP/1.1 408")]
    assert timed_out, done  # the idle connections kleidi kept were answered 408, then closed
    assert len(timed_out) == len(done["answers"])  # nothing else was ever sent to them
    assert min(timed_out) >= REQUEST_TIMEOUT * 0.9  # ... and not before request_timeout
    assert done["silently_closed"] + len(timed_out) == done["opened"]

    after = samples(proc)
    assert (value(after, "kleidi_telemetry_connections_rejected_total", reason="timeout")
            - value(before, "kleidi_telemetry_connections_rejected_total", reason="timeout") >= len(timed_out))
    log = proc.log()
    assert "Traceback" not in log
    lines = telemetry_lines(log)
    assert not [line for line in lines if line["level"] in ("error", "critical")]
    assert len([line for line in lines if "closed at the limit" in line["msg"]]) == 1  # one warning a minute
    assert len(lines) <= done["opened"] + 5  # a debug line per connection at most
    assert get(proc, "/readyz") == (200, "ok\n")


def test_a_burst_of_scrapes_from_another_user_renders_metrics_at_most_once_a_second(kleidi_factory: Any) -> None:
    count = 200
    proc = kleidi_factory(settings={"telemetry": {"max_connections": 256, "request_timeout": "10s"}})
    baseline = warmed_up(proc)
    started = time.monotonic()
    before = value(samples(proc), "kleidi_metrics_renders_total")
    with thread_watch(proc.proc.pid) as seen:
        outcome = run_as(METRICS_BURST, str(proc.metrics_port), str(count), timeout=40)
    after = value(samples(proc), "kleidi_metrics_renders_total")
    elapsed = time.monotonic() - started

    assert outcome.returncode == 0, outcome.stderr
    assert [status.split(" ")[1:2] for status in outcome.report["statuses"]] == [["200"]] * count
    # Renderings start at least a second apart, and each answer is rendered after its request came.
    assert before >= 1
    assert 2 <= after - before <= 1 + elapsed, (before, after, elapsed)
    assert max(seen) <= baseline + 8, (baseline, max(seen))
    assert "Traceback" not in proc.log()


def malformed_cases() -> dict[str, tuple[list[str], float, bool]]:
    host = "Host: 127.0.0.1\r\n"
    one = "GET /metrics HTTP/1.1\r\n" + host
    return {
        "tls_hello": (["\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + "\x00" * 40 + "\r\n\r\n"], 0, False),
        "garbage": (["hello there\r\n\r\n"], 0, False),
        "http2_preface": (["PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], 0, False),
        "post": (["POST /metrics HTTP/1.1\r\n" + host + "Content-Length: 4\r\n\r\nabcd"], 0, False),
        "delete": (["DELETE /livez HTTP/1.1\r\n" + host + "\r\n"], 0, False),
        "not_found": (["GET /debug/pprof HTTP/1.1\r\n" + host + "\r\n"], 0, False),
        "absolute_target": (["GET http://127.0.0.1/metrics HTTP/1.1\r\n" + host + "\r\n"], 0, False),
        "no_host": (["GET /metrics HTTP/1.1\r\n\r\n"], 0, False),
        "two_hosts": ([one + host + "\r\n"], 0, False),
        "space_before_colon": ([one + "X-A : b\r\n\r\n"], 0, False),
        "folded_header": ([one + "X-A: b\r\n c\r\n\r\n"], 0, False),
        "nul_in_header": ([one + "X-A: b\x00c\r\n\r\n"], 0, False),
        "chunked_body": ([one + "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"], 0, False),
        "huge_header": ([one + "X-Pad: " + "a" * 9000 + "\r\n\r\n"], 0, False),
        "many_headers": ([one + "".join(f"X-{i}: v\r\n" for i in range(150)) + "\r\n"], 0, False),
        "huge_request_line": (["GET /" + "a" * 9000 + " HTTP/1.1\r\n" + host + "\r\n"], 0, False),
        "endless_line": (["GET /" + "a" * 4000] * 4, 0, False),
        "slowloris": ([one] + ["X-Slow: b\r\n"] * 40, 0.2, False),
        "gives_up_half_way": (["GET /metr"], 0, True),
        # Well-formed, if unusual: answered.
        "http10_without_host": (["GET /readyz HTTP/1.0\r\n\r\n"], 0, False),
        "bare_newlines": (["GET /readyz HTTP/1.1\nHost: 127.0.0.1\n\n"], 0, False),
        "head": (["HEAD /readyz HTTP/1.1\r\n" + host + "\r\n"], 0, False),
        "half_close_after_request": (["GET /readyz HTTP/1.1\r\n" + host + "\r\n"], 0, True),
        "pipelined": (["GET /readyz HTTP/1.1\r\n" + host + "\r\n" + "GET /livez HTTP/1.1\r\n" + host + "\r\n"],
                      0, False),
    }


EXPECTED = {
    "tls_hello": 400, "garbage": 400, "http2_preface": 505, "post": 405, "delete": 405, "not_found": 404,
    "absolute_target": 400, "no_host": 400, "two_hosts": 400, "space_before_colon": 400, "folded_header": 400,
    "nul_in_header": 400, "chunked_body": 400, "huge_header": 431, "many_headers": 431, "huge_request_line": 414,
    "endless_line": 414, "slowloris": 408, "gives_up_half_way": None, "http10_without_host": 200,
    "bare_newlines": 200, "head": 200, "half_close_after_request": 200, "pipelined": 200,
}


def test_malformed_requests_from_another_user_get_their_status_and_are_closed(kleidi_factory: Any) -> None:
    proc = kleidi_factory(settings={"telemetry": {"request_timeout": f"{REQUEST_TIMEOUT}s"}})
    cases = malformed_cases()
    outcome = run_as(MALFORMED, str(proc.metrics_port), json.dumps(cases), timeout=60)
    assert outcome.returncode == 0, outcome.stderr
    results = outcome.report

    for name, expected in EXPECTED.items():
        result = results[name]
        status = re.match(r"HTTP/1\.[01] (\d{3}) ", result["answer"])
        assert (int(status.group(1)) if status else None) == expected, (name, result)
        assert result["end"] == "closed", (name, result)  # one request per connection, then kleidi closes
        head, _, body = result["answer"].partition("\r\n\r\n")
        if expected is not None:
            assert "\r\nConnection: close\r\n" in head + "\r\n", (name, head)
            length = re.search(r"\r\nContent-Length: (\d+)", head)
            assert length, (name, head)
            assert name == "head" or int(length.group(1)) == len(body), (name, result)
    assert "Allow: GET, HEAD" in results["post"]["answer"]
    assert results["head"]["answer"].endswith("\r\n\r\n")  # headers only
    assert results["pipelined"]["answer"].count("HTTP/1.1") == 1  # the second request is not served
    assert results["slowloris"]["seconds"] >= REQUEST_TIMEOUT * 0.9  # trickling bytes does not extend the time

    log = proc.log()
    assert "Traceback" not in log
    lines = telemetry_lines(log)
    assert not [line for line in lines if line["level"] != "debug"], lines
    assert len(lines) <= len(cases)  # one debug line per broken client at most
    metrics = samples(proc)
    bad_requests = sum(1 for status in EXPECTED.values() if status == 400)
    assert value(metrics, "kleidi_telemetry_requests_total", endpoint="other", code="400") == bad_requests
    assert value(metrics, "kleidi_telemetry_connections_rejected_total", reason="timeout") == 1
    assert get(proc, "/readyz") == (200, "ok\n")
