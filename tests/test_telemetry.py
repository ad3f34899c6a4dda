"""Metrics and health endpoints of a real `kleidi serve`, scraped over HTTP."""

from __future__ import annotations

import hashlib
import os
import socket
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
