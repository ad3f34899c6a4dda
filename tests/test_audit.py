"""The tamper-evident audit log, written by a real `kleidi serve` and checked by `kleidi audit verify`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from kleidi import audit
from tests.conftest import run_kleidi


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def verify(*files: Path, extra: tuple[str, ...] = ()) -> Any:
    return run_kleidi("audit", "verify", *map(str, files), *extra)


@pytest.fixture
def audited(kleidi_factory: Any, short_dir: Path) -> Any:
    """A kleidi that wrote a known sequence of records and stopped cleanly."""
    log = short_dir / "audit" / "audit.jsonl"
    proc = kleidi_factory(settings={"audit": {"path": str(log), "fsync": "always"}})
    seed = os.urandom(32)
    sealed = proc.encrypt(seed, uid="enc-uid")
    assert proc.decrypt(sealed.ciphertext, sealed.key_id, sealed.annotations, uid="dec-uid") == seed
    with pytest.raises(grpc.RpcError):
        proc.decrypt(sealed.ciphertext[:-1], sealed.key_id, sealed.annotations, uid="bad-uid")
    old = proc.status().key_id
    assert run_kleidi("rotate", "--keyring", str(proc.keyring)).returncode == 0
    proc.wait_for_key_id(lambda k: k != old)
    assert proc.stop() == 0
    return proc, log, seed, sealed


def test_records_describe_each_operation_and_nothing_secret(audited: Any) -> None:
    _, log, seed, sealed = audited
    assert os.stat(log).st_mode & 0o777 == 0o600
    entries = records(log)
    by_uid = {e.get("uid"): e for e in entries}
    assert by_uid["enc-uid"]["event"] == "Encrypt" and by_uid["enc-uid"]["outcome"] == "OK"
    assert by_uid["enc-uid"]["key_id"] == sealed.key_id
    assert by_uid["dec-uid"]["event"] == "Decrypt" and by_uid["dec-uid"]["outcome"] == "OK"
    assert by_uid["bad-uid"]["outcome"] == "INVALID_ARGUMENT"
    events = [e["event"] for e in entries]
    assert events[0] == "start" and events[-1] == "stop" and "key_rotation" in events
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    text = log.read_text()
    for secret in (seed.hex(), __import__("base64").b64encode(seed).decode(),
                   __import__("base64").b64encode(sealed.ciphertext).decode(), sealed.ciphertext.hex()):
        assert secret not in text
    result = verify(log)
    assert result.returncode == 0 and "chain intact" in result.stdout


def _rewrite(log: Path, lines: list[str]) -> None:
    log.write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize("tamper, reason", [
    ("edit", "was altered"),
    ("delete", "missing records"),
    ("reorder", "follows record"),
    ("truncate-tail", "not a clean stop"),
    ("cut-line", "cut short"),
    ("insert", "follows record"),
])
def test_every_kind_of_tampering_is_caught(audited: Any, tamper: str, reason: str) -> None:
    _, log, _, _ = audited
    lines = log.read_text().splitlines()
    middle = len(lines) // 2
    if tamper == "edit":
        record = json.loads(lines[middle])
        record["outcome"] = "OK" if record.get("outcome") != "OK" else "UNAVAILABLE"
        lines[middle] = json.dumps(record)
        _rewrite(log, lines)
    elif tamper == "delete":
        _rewrite(log, lines[:middle] + lines[middle + 1:])
    elif tamper == "reorder":
        lines[middle], lines[middle + 1] = lines[middle + 1], lines[middle]
        _rewrite(log, lines)
    elif tamper == "truncate-tail":
        _rewrite(log, lines[:-2])
    elif tamper == "cut-line":
        log.write_text("\n".join(lines) + "\n" + lines[-1][:20])
    elif tamper == "insert":
        _rewrite(log, [*lines[:middle], lines[middle - 1], *lines[middle:]])
    result = verify(log)
    assert result.returncode == 1, result.stdout
    assert reason in result.stderr


def test_a_keyed_chain_cannot_be_rebuilt_without_the_key(kleidi_factory: Any, short_dir: Path) -> None:
    key_file = short_dir / "audit.key"
    key_file.write_bytes(os.urandom(32).hex().encode())
    key_file.chmod(0o600)
    log = short_dir / "audit.jsonl"
    proc = kleidi_factory(settings={"audit": {"path": str(log), "hmac_key_file": str(key_file)}})
    proc.encrypt(os.urandom(32), uid="real")
    proc.stop()
    assert verify(log, extra=("--hmac-key-file", str(key_file))).returncode == 0
    assert verify(log).returncode == 1  # an unkeyed check cannot pass a keyed chain
    # A forger who can write the file edits a record and re-hashes the whole chain, without the key.
    entries, prev = records(log), audit.GENESIS
    for entry in entries:
        if entry.get("uid") == "real":
            entry["uid"] = "forged"
        entry["prev"] = prev
        entry["hash"] = audit.chain_hash(prev, entry, None)
        prev = entry["hash"]
    _rewrite(log, [json.dumps(e) for e in entries])
    result = verify(log, extra=("--hmac-key-file", str(key_file)))
    assert result.returncode == 1 and "altered" in result.stderr


def test_rotation_by_size_and_restarts_keep_one_chain(kleidi_factory: Any, short_dir: Path) -> None:
    log = short_dir / "audit.jsonl"
    settings = {"audit": {"path": str(log), "max_bytes": 4096, "keep": 50}}
    for run in range(2):
        proc = kleidi_factory(f"run{run}", settings=settings, keyring=short_dir / "keyring.json")
        for _ in range(30):
            proc.encrypt(os.urandom(32))
        assert proc.stop() == 0
    rotated = sorted(short_dir.glob("audit.jsonl.*"), key=lambda p: int(p.suffix[1:]), reverse=True)
    assert len(rotated) >= 3
    files = [*rotated, log]
    result = verify(*files)
    assert result.returncode == 0, result.stderr
    assert sum(len(records(f)) for f in files) == 2 * (30 + 2)  # start, 30 Encrypts, stop; twice
    assert verify(*reversed(files)).returncode == 1  # out of order is not the same chain
