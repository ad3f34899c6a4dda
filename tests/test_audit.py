"""The tamper-evident audit log, written by a real `kleidi serve` and checked by `kleidi audit verify`."""

from __future__ import annotations

import json
import os
import signal
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


def test_rotation_that_deletes_the_oldest_file_leaves_a_checkpoint(kleidi_factory: Any, short_dir: Path) -> None:
    log = short_dir / "audit.jsonl"
    proc = kleidi_factory(settings={"audit": {"path": str(log), "max_bytes": 4096, "keep": 2}})
    for _ in range(60):
        proc.encrypt(os.urandom(32))
    assert proc.stop() == 0
    files = [log.with_name("audit.jsonl.2"), log.with_name("audit.jsonl.1"), log]
    assert not log.with_name("audit.jsonl.3").exists()
    entries = [e for f in files for e in records(f)]
    first_seq = entries[0]["seq"]
    assert first_seq > 1  # records were rotated out
    checkpoints = [e for e in entries if e["event"] == "audit_rotated_out"]
    assert checkpoints and all(c["file"] == "audit.jsonl.3" for c in checkpoints)
    latest = next(c for c in checkpoints if c["through_seq"] == first_seq - 1)
    assert latest["through_hash"] == entries[0]["prev"]
    result = verify(*files)
    assert result.returncode == 0, result.stderr
    assert f"records 1..{first_seq - 1} rotated out (checkpoint at seq {latest['seq']})" in result.stdout
    # Without the oldest file, the chain starts where no checkpoint says records were rotated out.
    later = records(files[1])[0]["seq"]
    result = verify(*files[1:])
    assert result.returncode == 1
    assert f"the chain starts at seq {later}: earlier records are missing" in result.stderr


def test_a_tail_cut_back_to_an_earlier_stop_is_caught_by_the_anchor(kleidi_factory: Any, short_dir: Path) -> None:
    # The attacker can write the audit directory but neither the anchor's directory nor the HMAC key.
    key_file = short_dir / "audit.key"
    key_file.write_bytes(os.urandom(32).hex().encode())
    key_file.chmod(0o600)
    log = short_dir / "audit" / "audit.jsonl"
    anchor = short_dir / "protected" / "audit.anchor"
    settings = {"audit": {"path": str(log), "hmac_key_file": str(key_file), "anchor_path": str(anchor)}}
    keyring = short_dir / "keyring.json"
    keyed = ("--hmac-key-file", str(key_file))
    for run in range(2):
        proc = kleidi_factory(f"run{run}", settings=settings, keyring=keyring)
        proc.encrypt(os.urandom(32), uid=f"run{run}")
        assert proc.stop() == 0
    assert os.stat(anchor).st_mode & 0o777 == 0o600
    assert list(anchor.parent.iterdir()) == [anchor]  # replaced by rename: no temporary file left
    assert verify(log, extra=(*keyed, "--anchor", str(anchor))).returncode == 0

    lines = log.read_text().splitlines(keepends=True)
    anchored_seq = len(lines)
    cut_seq = next(i for i, line in enumerate(lines, start=1) if json.loads(line)["event"] == "stop")
    log.write_text("".join(lines[:cut_seq]))  # the attack: cut right after the first run's stop record
    # Without the anchor this cut cannot be seen: the chain is intact and ends with a clean stop.
    assert verify(log, extra=keyed).returncode == 0
    result = verify(log, extra=(*keyed, "--anchor", str(anchor)))
    assert result.returncode == 1
    assert (f"log ends at seq {cut_seq} but the anchor records seq {anchored_seq}: records were removed from the "
            "end") in result.stderr

    proc = kleidi_factory("run2", settings=settings, keyring=keyring)  # restarted on the cut log
    proc.encrypt(os.urandom(32), uid="run2")
    assert proc.stop() == 0
    assert "records were removed from the end" in proc.log()
    truncated = records(log)[cut_seq]
    assert truncated["event"] == "audit_truncated" and truncated["seq"] == cut_seq + 1
    assert truncated["expected_seq"] == anchored_seq and truncated["found_seq"] == cut_seq
    result = verify(log, extra=(*keyed, "--anchor", str(anchor)))
    assert result.returncode == 1
    assert (f"record {cut_seq + 1} (audit_truncated): at start-up the log ended at seq {cut_seq} but the anchor "
            f"records seq {anchored_seq}: records were removed from the end") in result.stderr
    assert verify(log, extra=(*keyed, "--anchor", str(anchor), "--allow-truncated")).returncode == 0
    # The record of the cut cannot be cut away in turn: the anchor has moved past it.
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:cut_seq]))
    assert "records were removed from the end" in verify(log, extra=(*keyed, "--anchor", str(anchor))).stderr
    # Nor can the anchor be forged without the key (were its directory writable after all).
    body = json.loads(anchor.read_text())
    anchor.write_text(json.dumps({**body, "seq": cut_seq, "hash": records(log)[-1]["hash"]}))
    assert "not authentic" in verify(log, extra=(*keyed, "--anchor", str(anchor))).stderr


def test_every_record_is_bounded_and_one_plain_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(path)
    log.write("Encrypt", uid="u" * 200_000, outcome="OK")
    log.write("Decrypt", key_id="k" * 5000, uid="a\x1b[31mb\u2028c\x00d\u202ee", raw=b"0123456789ab")
    log.write("Encrypt", outcome="OK", **{f"field{i}": "v" * 256 for i in range(100)})
    log.close()
    lines = path.read_bytes().splitlines()
    assert all(len(line) <= audit.MAX_RECORD_BYTES for line in lines)
    huge, odd, many = (json.loads(line) for line in lines[:3])
    assert huge["uid"] == "u" * audit.FIELD_CHARS + "...[cut: 200000 chars]"
    assert odd["key_id"] == "k" * 1024 + "...[cut: 5000 chars]"
    assert odd["uid"] == "a\\u001b[31mb\\u2028c\\u0000d\\u202ee"  # visible, not interpreted by a terminal
    assert odd["raw"] == "<12 bytes>"  # bytes are never written, whatever they hold
    assert many["event"] == "Encrypt" and many["outcome"] == "OK" and many["dropped_fields"] > 0
    assert audit.verify([path]).ok


def test_after_a_crash_the_chain_continues_from_a_last_record_of_any_size(kleidi_factory: Any,
                                                                         short_dir: Path) -> None:
    log = short_dir / "audit.jsonl"
    settings = {"audit": {"path": str(log), "fsync": "always"}}
    keyring = short_dir / "keyring.json"
    proc = kleidi_factory("run0", settings=settings, keyring=keyring)
    proc.encrypt(os.urandom(32))
    proc.stop(signal.SIGKILL)  # a crash: no stop record
    # An older kleidi wrote unbounded records: the last one holds a 200 KB field ...
    last = records(log)[-1]
    big: dict[str, Any] = {"time": last["time"], "event": "Encrypt", "uid": "x" * 200_000, "outcome": "OK",
                           "seq": last["seq"] + 1, "prev": last["hash"]}
    big["hash"] = audit.chain_hash(last["hash"], big, None)
    with open(log, "ab") as handle:
        handle.write(json.dumps(big).encode() + b"\n")
        handle.write(b'{"time":"2026-01-01T00:00:00+00:00","event":"Encr')  # ... and a crash cut the next one
    proc = kleidi_factory("run1", settings=settings, keyring=keyring)
    proc.encrypt(os.urandom(32))
    assert proc.stop() == 0
    entries = records(log)
    after = entries[big["seq"]:]
    assert [e["event"] for e in after[:2]] == ["audit_gap", "start"] and after[0]["seq"] == big["seq"] + 1
    assert after[0]["lost"] == 1
    result = verify(log, extra=("--allow-gaps",))
    assert result.returncode == 0, result.stderr
    assert "started 1 time(s) after no clean stop" in result.stdout
    result = verify(log)
    assert result.returncode == 1
    assert f"gap: 1 records lost at seq {big['seq'] + 1} (a record cut short" in result.stderr


def test_the_log_is_never_written_through_a_link_or_into_a_fifo(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("precious\n")
    path = tmp_path / "audit" / "audit.jsonl"
    path.parent.mkdir()
    for plant in (lambda: path.symlink_to(target), lambda: os.link(target, path), lambda: os.mkfifo(path)):
        plant()
        with pytest.raises(OSError):
            audit.AuditLog(path)  # refused at once: not followed, not appended to, no blocking open
        path.unlink()
    os.mkfifo(path.with_name("audit.jsonl.1"))  # nor does start-up hang reading a planted rotated file
    with pytest.raises(OSError):
        audit.AuditLog(path)
    assert target.read_text() == "precious\n"
