"""Metrics and health endpoints of a real `kleidi serve`, scraped over HTTP."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import keygen, run_kleidi
from tests.support import free_port


def get(proc: Any, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(proc: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(proc, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_a_known_sequence_of_calls(kleidi_factory: Any) -> None:
    proc = kleidi_factory()
    before = samples(proc)
    seeds = [os.urandom(32) for _ in range(3)]
    responses = [proc.encrypt(s, uid=f"uid-{i}") for i, s in enumerate(seeds)]
    for response, seed in zip(responses[:2], seeds[:2], strict=True):
        assert proc.decrypt(response.ciphertext, response.key_id, response.annotations) == seed
    with pytest.raises(grpc.RpcError):
        proc.decrypt(b"\x6b\x01\x00\x00\x00\x01junk", responses[0].key_id, responses[0].annotations)
    for _ in range(4):
        proc.status()
    after = samples(proc)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("kleidi_requests_total", method="Encrypt", code="OK") == 3
    assert delta("kleidi_requests_total", method="Decrypt", code="OK") == 2
    assert delta("kleidi_requests_total", method="Decrypt", code="INVALID_ARGUMENT") == 1
    assert delta("kleidi_requests_total", method="Status", code="OK") >= 4
    assert delta("kleidi_request_duration_seconds_count", method="Encrypt", code="OK") == 3
    assert delta("kleidi_backend_calls_total", backend="local", operation="wrap", outcome="ok") == 3
    assert delta("kleidi_backend_calls_total", backend="local", operation="unwrap", outcome="error") == 1
    assert value(after, "kleidi_healthy") == 1
    assert value(after, "kleidi_requests_in_flight") == 0
    key_id = responses[0].key_id
    assert value(after, "kleidi_current_key_info",
                 key_id_hash="sha256:" + hashlib.sha256(key_id.encode()).hexdigest()) == 1
    text = get(proc, "/metrics")[1]
    assert key_id not in text and "uid-0" not in text  # bounded labels: no raw key_id, no uid
    assert "process_resident_memory_bytes" in text


def test_rotation_is_counted(kleidi_factory: Any) -> None:
    proc = kleidi_factory()
    old = proc.status().key_id
    assert run_kleidi("rotate", "--keyring", str(proc.keyring)).returncode == 0
    proc.wait_for_key_id(lambda k: k != old)
    assert value(samples(proc), "kleidi_key_rotations_observed_total") == 1


def test_livez_stays_up_while_readyz_follows_the_backend(kleidi_factory: Any) -> None:
    proc = kleidi_factory()
    assert get(proc, "/livez") == (200, "ok\n")
    assert get(proc, "/readyz") == (200, "ok\n")
    good = proc.keyring.read_bytes()
    proc.keyring.write_text("{ not a keyring")  # the backend breaks; kleidi itself is fine
    deadline = time.monotonic() + 10
    while get(proc, "/readyz")[0] != 503:
        assert time.monotonic() < deadline, "readyz did not turn 503"
        time.sleep(0.1)
    assert "malformed" in get(proc, "/readyz")[1]
    assert get(proc, "/livez")[0] == 200  # a backend outage must not get kleidi restarted
    assert value(samples(proc), "kleidi_healthy") == 0
    proc.keyring.write_bytes(good)
    deadline = time.monotonic() + 10
    while get(proc, "/readyz")[0] != 200:
        assert time.monotonic() < deadline, "readyz did not recover"
        time.sleep(0.1)
    assert get(proc, "/nope")[0] == 404


def test_non_loopback_listener_is_refused_unless_allowed(short_dir: Path) -> None:
    config = short_dir / "k.yaml"
    config.write_text(yaml.safe_dump({"telemetry": {"address": "0.0.0.0:9464"}}))
    result = run_kleidi("config", "check", "--config", str(config))
    assert result.returncode == 2
    assert "telemetry" in result.stderr and "not a loopback address" in result.stderr
    assert "allow_non_loopback" in result.stderr
    config.write_text(yaml.safe_dump({"telemetry": {"address": "0.0.0.0:9464", "allow_non_loopback": True}}))
    assert run_kleidi("config", "check", "--config", str(config)).returncode == 0
    for good in ("127.0.0.1:9464", "localhost:9464", "[::1]:9464", "127.0.0.2:1"):
        config.write_text(yaml.safe_dump({"telemetry": {"address": good}}))
        assert run_kleidi("config", "check", "--config", str(config)).returncode == 0, good


def test_listener_can_be_turned_off(kleidi_factory: Any) -> None:
    proc = kleidi_factory(settings={"telemetry": {"address": None}})
    assert proc.status().healthz == "ok"
    with pytest.raises(urllib.error.URLError):
        get(proc, "/livez")


def test_busy_port_is_a_clean_start_up_error(short_dir: Path) -> None:
    keyring = short_dir / "ring.json"
    keygen(keyring)
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        result = run_kleidi("serve", "--keyring", str(keyring), "--endpoint", f"unix://{short_dir}/k.sock",
                            env={"KLEIDI_TELEMETRY__ADDRESS": f"127.0.0.1:{port}"})
    assert result.returncode == 2
    assert "telemetry.address" in result.stderr and "Traceback" not in result.stderr
    assert not (short_dir / "k.sock").exists()


def test_probes_that_arrive_together_share_one_status_call(kleidi_factory: Any) -> None:
    proc = kleidi_factory()
    count = 20  # under max_connections (32): more would be closed at the limit, by design
    started = time.monotonic()
    before = value(samples(proc), "kleidi_requests_total", method="Status", code="OK")
    barrier = threading.Barrier(count)
    answers: list[tuple[int, str]] = []

    def probe() -> None:
        barrier.wait(10)
        answers.append(get(proc, "/livez"))

    probes = [threading.Thread(target=probe) for _ in range(count)]
    for thread in probes:
        thread.start()
    for thread in probes:
        thread.join(30)
    after = value(samples(proc), "kleidi_requests_total", method="Status", code="OK")
    elapsed = time.monotonic() - started
    assert answers == [(200, "ok\n")] * count
    # One Status call in flight at most, and an answer is reused for a second.
    assert 1 <= after - before <= 1 + elapsed, (before, after, elapsed)


def read_all(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def raw_exchange(port: int, request: bytes, host: str = "127.0.0.1", timeout: float = 3) -> bytes:
    """Send ``request`` on a fresh connection and read until kleidi closes it (b"" if it closes at once)."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        try:
            conn.sendall(request)
            return read_all(conn)
        except ConnectionResetError:
            return b""


def test_at_the_limit_idle_connections_make_room_and_busy_ones_are_kept(kleidi_factory: Any) -> None:
    proc = kleidi_factory(settings={"telemetry": {"max_connections": 4, "request_timeout": "30s"}})
    port = proc.metrics_port

    # Connections that send nothing hold every slot; a probe takes the oldest one's.
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
    try:
        assert get(proc, "/readyz") == (200, "ok\n")
        idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        assert get(proc, "/livez") == (200, "ok\n")
        for conn in idle[:2]:
            assert conn.recv(100) == b""  # closed by kleidi long before request_timeout (30s)
        for conn in idle[2:]:
            conn.settimeout(0.2)
            with pytest.raises(TimeoutError):
                conn.recv(100)  # still open: younger than the two that made room
    finally:
        for conn in idle:
            conn.close()
    assert value(samples(proc), "kleidi_telemetry_connections_rejected_total", reason="limit") == 2

    # Four scrapes waiting for the next rendering (at most one a second) are busy: a fifth
    # connection is closed at once, and the four are answered.
    request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for _attempt in range(5):
        assert get(proc, "/metrics")[0] == 200
        busy = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
        try:
            for conn in busy:
                conn.sendall(request)
            time.sleep(0.1)  # let kleidi read the four requests (if it does not, this attempt proves nothing)
            fifth = raw_exchange(port, b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answers = [read_all(conn) for conn in busy]
        finally:
            for conn in busy:
                conn.close()
        if fifth == b"":
            assert all(answer.startswith(b"HTTP/1.1 200 OK\r\n") for answer in answers)
            break
    else:
        raise AssertionError("the fifth connection was answered every time: the four scrapes never kept it out")
    assert "Traceback" not in proc.log()


def test_listener_on_the_ipv6_loopback(kleidi_factory: Any) -> None:
    port = free_port()
    proc = kleidi_factory(settings={"telemetry": {"address": f"[::1]:{port}"}})
    answer = raw_exchange(port, b"GET /readyz HTTP/1.1\r\nHost: [::1]\r\n\r\n", host="::1")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok\n")
    assert proc.stop() == 0


def test_stop_closes_open_connections_and_the_listener(kleidi_factory: Any) -> None:
    proc = kleidi_factory()
    idle = [socket.create_connection(("127.0.0.1", proc.metrics_port), timeout=5) for _ in range(3)]
    try:
        assert get(proc, "/livez") == (200, "ok\n")  # the Status channel is open, and closed at stop
        assert proc.stop() == 0
        for conn in idle:
            assert conn.recv(100) == b""
    finally:
        for conn in idle:
            conn.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proc.metrics_port), timeout=5).close()
    assert "Traceback" not in proc.log() and '"stopped"' in proc.log()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_the_listener_behaves_the_same_on_either_event_loop(kleidi_factory: Any, event_loop: str) -> None:
    proc = kleidi_factory(settings={"server": {"event_loop": event_loop}, "telemetry": {"request_timeout": "1s"}})
    port, host = proc.metrics_port, b"Host: 127.0.0.1\r\n"
    assert get(proc, "/livez") == (200, "ok\n") and get(proc, "/readyz") == (200, "ok\n")
    assert "kleidi_metrics_renders_total" in get(proc, "/metrics")[1]
    assert raw_exchange(port, b"POST /livez HTTP/1.1\r\n" + host + b"\r\n").startswith(b"HTTP/1.1 405 ")
    assert raw_exchange(port, b"\x00\x01\x02\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    head = raw_exchange(port, b"HEAD /metrics HTTP/1.1\r\n" + host + b"\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET /readyz HTTP/1.1\r\n" + host + b"\r\n")
        conn.shutdown(socket.SHUT_WR)  # a client that half-closes after its request still gets the answer
        assert read_all(conn).endswith(b"\r\n\r\nok\n")
    assert raw_exchange(port, b"GET /readyz HTTP/1.1\r\n").startswith(b"HTTP/1.1 408 ")  # never finishes its head
    assert "Traceback" not in proc.log()
