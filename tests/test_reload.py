"""SIGHUP reloads the configuration: a good one is applied without dropping calls, a bad one is refused."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import HELPERS, KleidiProcess, keygen


def rewrite(proc: KleidiProcess, **sections: dict[str, Any]) -> None:
    config = yaml.safe_load(proc.config_path.read_text())
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    proc.config_path.write_text(yaml.safe_dump(config))


def wait_log(proc: KleidiProcess, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.log():
        assert time.monotonic() < deadline, f"{text!r} not logged"
        time.sleep(0.05)


def test_a_new_keyring_is_applied(kleidi_factory: Any, short_dir: Path) -> None:
    proc: KleidiProcess = kleidi_factory()
    before = proc.status().key_id
    other = short_dir / "other-keyring.json"
    keygen(other)
    rewrite(proc, backend={"keyring": str(other)}, logging={"level": "info"})
    proc.send_signal(signal.SIGHUP)
    proc.wait_for_key_id(lambda k: k != before)
    wait_log(proc, "configuration reloaded")
    sealed = proc.encrypt(b"n" * 32, uid="after-reload")
    assert proc.decrypt(sealed.ciphertext, sealed.key_id, sealed.annotations) == b"n" * 32
    assert "after-reload" not in proc.log()  # the new log level (info) is in force: no request lines


def test_an_invalid_config_is_refused_and_the_old_one_stays(kleidi_factory: Any) -> None:
    proc: KleidiProcess = kleidi_factory()
    before = proc.status().key_id
    proc.config_path.write_text("server: [this is not valid\n")
    proc.send_signal(signal.SIGHUP)
    wait_log(proc, "config reload refused")
    assert proc.status().key_id == before and proc.status().healthz == "ok"
    rewrite_target = proc.config_path
    rewrite_target.write_text(yaml.safe_dump({**proc.config, "backend": {**proc.config["backend"], "kind": "nope"}}))
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while proc.log().count("config reload refused") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert proc.status().healthz == "ok"
    sealed = proc.encrypt(b"o" * 32)
    assert sealed.key_id == before


def test_a_changed_config_file_is_applied_without_a_signal(kleidi_factory: Any, short_dir: Path) -> None:
    proc: KleidiProcess = kleidi_factory()
    before = proc.status().key_id
    proc.config_path.write_text("backend: [half-written\n")  # an editor's partial save: refused, nothing lost
    wait_log(proc, "config reload refused")
    assert proc.status().key_id == before and proc.status().healthz == "ok"

    other = short_dir / "other-keyring.json"
    keygen(other)
    proc.config_path.write_text(yaml.safe_dump({**proc.config, "backend": {**proc.config["backend"],
                                                                          "keyring": str(other)}}))
    after = proc.wait_for_key_id(lambda k: k != before)
    wait_log(proc, "configuration reloaded")
    assert f"config file {proc.config_path} changed: reloading" in proc.log()
    assert proc.encrypt(b"w" * 32).key_id == after


def test_a_new_backend_that_does_not_work_is_refused(kleidi_factory: Any, short_dir: Path) -> None:
    proc: KleidiProcess = kleidi_factory()
    before = proc.status().key_id
    rewrite(proc, backend={"keyring": str(short_dir / "missing.json")})
    proc.send_signal(signal.SIGHUP)
    wait_log(proc, "the new backend does not work")
    assert proc.status().key_id == before and proc.status().healthz == "ok"


def test_settings_bound_at_start_up_need_a_restart(kleidi_factory: Any) -> None:
    proc: KleidiProcess = kleidi_factory()
    rewrite(proc, server={"shutdown_timeout": "3s"})
    proc.send_signal(signal.SIGHUP)
    wait_log(proc, "changes to server take effect only after a restart")
    assert proc.status().healthz == "ok"


def test_a_call_in_flight_survives_a_backend_swap(short_dir: Path, kleidi_factory: Any) -> None:
    """The slow helper server is real kleidi with a backend that sleeps in unwrap; the reload swaps
    in the plain local backend while a Decrypt is still inside the old one."""
    proc = KleidiProcess(short_dir, "slow", command=None)
    keygen(proc.keyring)
    proc.command = [sys.executable, str(HELPERS / "slow_server.py"), str(proc.config_path)]
    os.environ["SLOW_SERVER_UNWRAP_DELAY"] = "1.2"  # under backend.timeout (2 s)
    try:
        proc.start()
    finally:
        del os.environ["SLOW_SERVER_UNWRAP_DELAY"]
    try:
        seed = os.urandom(32)
        sealed = proc.encrypt(seed)
        from kleidi._proto.kmsv2 import api_pb2 as pb
        future = proc.stub.Decrypt.future(pb.DecryptRequest(ciphertext=sealed.ciphertext, key_id=sealed.key_id,
                                                            annotations=sealed.annotations, uid="in-flight"),
                                          timeout=20)
        marker = proc.config_path.with_name(proc.config_path.name + ".unwrapping")
        deadline = time.monotonic() + 10
        while not marker.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        rewrite(proc, backend={"probe_interval": "2s"})  # a backend change: a new backend is built
        proc.send_signal(signal.SIGHUP)
        wait_log(proc, "configuration reloaded")
        assert future.result().plaintext == seed
    finally:
        assert proc.stop() == 0


def test_a_sighup_during_a_file_triggered_reload_waits_for_it(short_dir: Path) -> None:
    """SIGHUP and the file watcher each call reload_config; two at once could apply two backends in
    either order. In-process: the second reload must start only after the first has finished."""
    import asyncio

    from kleidi.config import load_settings
    from kleidi.server import Server

    keyrings = []
    for name in ("a", "b", "c"):
        keyrings.append(short_dir / f"{name}.json")
        keygen(keyrings[-1])
    versions = iter(keyrings[1:])

    def next_settings() -> Any:
        return load_settings(overrides={"backend.keyring": str(next(versions)),
                                        "server.endpoint": f"unix://{short_dir}/unused.sock"}, environ={})

    first = load_settings(overrides={"backend.keyring": str(keyrings[0]),
                                     "server.endpoint": f"unix://{short_dir}/unused.sock"}, environ={})
    server = Server(first, reload_settings=next_settings)
    running, most, applied = 0, 0, []
    tried = server.reloader.tried_backend

    async def slow_tried_backend(settings: Any) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.3)  # a slow new backend: the window in which a second reload used to start
            result = await tried(settings)
            applied.append(settings.backend.keyring)
            return result
        finally:
            running -= 1

    server.reloader.tried_backend = slow_tried_backend  # type: ignore[method-assign]

    async def scenario() -> list[bool]:
        outcomes = await asyncio.gather(server.reload_config(), server.reload_config())
        await server.backend.close()
        return list(outcomes)

    assert asyncio.run(scenario()) == [True, True]
    assert most == 1, "two reloads ran at once"
    assert applied == keyrings[1:] and server.settings.backend.keyring == keyrings[2]
