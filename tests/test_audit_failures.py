"""The audit log when its disk is full: on a real, small tmpfs, in-process and under a real `kleidi serve`.

No torn record is ever left, lost records are counted and recorded in a chained ``audit_gap`` record
when writing works again, ``kleidi audit verify`` reports the gap (not tampering), and the policy
decides whether calls are refused (fail_closed) or served (fail_open) meanwhile.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kleidi import audit, telemetry
from kleidi.errors import AuditUnavailable
from tests.conftest import assert_no_secret_written, run_kleidi, wait_for
from tests.support import private_dir

NO_SPACE = os.strerror(errno.ENOSPC)


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 256 KiB tmpfs of its own, unmounted afterwards (CI runs as root)."""
    with private_dir("kl-disk-") as mount_point:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount_point)], check=True)
        try:
            yield mount_point
        finally:
            if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(mount_point)], check=True)  # a kleidi left by a failed test


def fill(disk: Path) -> Path:
    """Take every free byte of the disk with one file; returns it (unlink it to free the space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


def lines_are_whole(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "a torn record was left at the end of the log"
    return [json.loads(line) for line in data.splitlines()]


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def scrape(proc: Any) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def sample(name: str) -> float:
    return telemetry.REGISTRY.get_sample_value(name) or 0.0


def gaps(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["event"] == "audit_gap"]


def test_a_write_cut_short_by_a_full_disk_leaves_no_torn_record(small_disk: Path) -> None:
    log_path = small_disk / "audit.jsonl"
    log = audit.AuditLog(log_path, on_failure="fail_open")
    log.write("start")
    filler = fill(small_disk)
    before = log_path.read_bytes()
    for number in range(500):  # the log's last page has room for a few records; then one is cut short
        log.write("Encrypt", uid=f"u{number:03d}-" + "x" * 200, outcome="OK")
        if log.problem is not None:
            break
        before = log_path.read_bytes()
    assert log.problem is not None, "the disk never filled up"
    assert log_path.read_bytes() == before  # the part that was written is gone again
    lost_uid = f"u{number:03d}-".encode()
    assert lost_uid not in log_path.read_bytes()
    filler.unlink()
    assert log.retry()
    log.close()
    entries = lines_are_whole(log_path)
    assert [e["event"] for e in entries[-2:]] == ["audit_gap", "stop"]
    assert audit.verify([log_path], allow_gaps=True).ok


def test_fail_closed_refuses_while_records_are_lost_then_records_the_gap(small_disk: Path) -> None:
    log_path = small_disk / "audit.jsonl"
    filler = fill(small_disk)  # full before the log's first byte: no write can succeed, not even in a last page
    log = audit.AuditLog(log_path, fsync="always", on_failure="fail_closed")
    audit.activate(log)
    failures_before = sample("kleidi_audit_write_failures_total")
    try:
        assert audit.problem() is None and not audit.fails_closed()
        refused = []
        for event in ("Encrypt", "Decrypt", "Encrypt"):
            with pytest.raises(AuditUnavailable) as raised:
                audit.emit(event, uid="during", outcome="OK")
            refused.append(str(raised.value))
        assert refused[0] == (f"audit log cannot be written: {NO_SPACE}; calls are refused until it can "
                              "(audit.on_failure: fail_closed)")
        assert audit.problem() == f"audit log cannot be written: {NO_SPACE} (records lost: 3)"
        assert audit.fails_closed()
        assert sample("kleidi_audit_write_failures_total") == failures_before + 3
        assert sample("kleidi_audit_healthy") == 0
        assert not log.retry()  # still full: the gap record cannot be written either
        assert log_path.read_bytes() == b""

        filler.unlink()
        assert log.retry()
        assert audit.problem() is None and not audit.fails_closed()
        assert sample("kleidi_audit_healthy") == 1
        audit.emit("Encrypt", uid="after", outcome="OK")
    finally:
        audit.activate(None)
        log.close()
    entries = lines_are_whole(log_path)
    assert [e["event"] for e in entries] == ["audit_gap", "Encrypt", "stop"]
    gap = entries[0]
    assert gap["lost"] == 3 and gap["lost_by_event"] == {"Encrypt": 2, "Decrypt": 1} and gap["reason"] == NO_SPACE
    assert gap["first_lost"] <= gap["last_lost"] < entries[1]["time"]

    refused_verify = run_kleidi("audit", "verify", str(log_path))
    assert refused_verify.returncode == 1
    assert f"gap: 3 records lost at seq 1 ({NO_SPACE})" in refused_verify.stderr
    assert "altered" not in refused_verify.stderr and "--allow-gaps" in refused_verify.stderr
    allowed = run_kleidi("audit", "verify", "--allow-gaps", str(log_path))
    assert allowed.returncode == 0, allowed.stderr
    assert f"gap: 3 records lost at seq 1 ({NO_SPACE})" in allowed.stdout


def test_fail_open_serves_and_the_next_record_ends_the_gap(small_disk: Path) -> None:
    log_path = small_disk / "audit.jsonl"
    filler = fill(small_disk)
    log = audit.AuditLog(log_path, fsync="interval", on_failure="fail_open")
    audit.activate(log)
    try:
        audit.emit("Decrypt", uid="lost", outcome="OK")  # never raises in fail_open
        assert log.problem == f"audit log cannot be written: {NO_SPACE} (records lost: 1)"
        assert not audit.fails_closed()
        audit.emit("Decrypt", uid="lost-too", outcome="OK")
        log.tick()  # the upkeep on a full disk: must not raise
        filler.unlink()
        audit.emit("Encrypt", uid="after", outcome="OK")  # no upkeep ran: the next record ends the episode
        assert log.problem is None
    finally:
        audit.activate(None)
        log.close()
    entries = lines_are_whole(log_path)
    assert [e["event"] for e in entries] == ["audit_gap", "Encrypt", "stop"]
    assert entries[0]["lost"] == 2 and entries[0]["lost_by_event"] == {"Decrypt": 2}
    assert audit.verify([log_path], allow_gaps=True).ok
    assert not audit.verify([log_path]).ok


def test_the_upkeep_survives_fsync_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    # A real fsync error (EIO) needs a failing block device; the kernel's answer is what is replaced here.
    log = audit.AuditLog(tmp_path / "audit.jsonl", fsync="interval", anchor_path=tmp_path / "anchor" / "a")
    log.write("Encrypt", uid="one")

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(audit.os, "fsync", failing_fsync)
    for _ in range(3):
        log.tick()  # never raises
    assert [r.getMessage() for r in caplog.records].count(
        f"audit log {tmp_path / 'audit.jsonl'} cannot be synced to disk ({os.strerror(errno.EIO)}): records "
        "written since the last sync may be lost in a crash") == 1  # once per episode, not once a second
    assert not (tmp_path / "anchor" / "a").exists()  # the anchor never names a record not known on disk
    monkeypatch.undo()
    log.tick()
    assert audit.read_anchor(tmp_path / "anchor" / "a", None).seq == 1
    log.close()
    assert audit.verify([tmp_path / "audit.jsonl"]).ok


def test_fail_closed_under_a_real_server(kleidi_factory: Any, short_dir: Path, small_disk: Path) -> None:
    # A ciphertext to decrypt later, from a kleidi whose audit log is on a disk with room.
    first = kleidi_factory("first", settings={"audit": {"path": str(short_dir / "first.jsonl")}})
    seed = os.urandom(32)
    sealed = first.encrypt(seed, uid="elsewhere")
    assert first.stop() == 0

    log_path = small_disk / "audit.jsonl"
    filler = fill(small_disk)  # full before kleidi starts: it starts anyway, and refuses unrecorded calls
    proc = kleidi_factory(start=False,
                          settings={"audit": {"path": str(log_path), "fsync": "always", "on_failure": "fail_closed"}})
    proc.start(wait=False)
    wait_for(lambda: "serving KMS" in proc.log(), 20, "kleidi to start")
    assert proc.status().healthz.startswith(f"audit log cannot be written: {NO_SPACE}")  # and it says so
    for call in (lambda: proc.encrypt(os.urandom(32), uid="refused"),
                 lambda: proc.decrypt(sealed.ciphertext, sealed.key_id, sealed.annotations, uid="refused")):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert refused.value.details() == (f"audit log cannot be written: {NO_SPACE}; calls are refused until it "
                                           "can (audit.on_failure: fail_closed)")
    metrics = scrape(proc)
    assert metric(metrics, "kleidi_audit_healthy") == 0
    assert metric(metrics, "kleidi_audit_write_failures_total") == 3  # start, Encrypt, Decrypt

    filler.unlink()
    assert proc.decrypt(sealed.ciphertext, sealed.key_id, sealed.annotations, uid="after") == seed
    assert metric(scrape(proc), "kleidi_audit_healthy") == 1
    assert proc.stop() == 0
    entries = lines_are_whole(log_path)
    gap = entries[0]
    assert gap["event"] == "audit_gap" and gap["lost"] == 3 and gap["reason"] == NO_SPACE
    assert gap["lost_by_event"] == {"start": 1, "Encrypt": 1, "Decrypt": 1}
    assert "refused" not in json.dumps(entries) and entries[-1]["event"] == "stop"
    errors = [line for line in map(json.loads, proc.log().splitlines())
              if line["logger"] == "kleidi.audit" and line["level"] == "error"]
    assert len(errors) == 1 and "cannot be written" in errors[0]["msg"]  # once per episode, not per record
    result = run_kleidi("audit", "verify", str(log_path))
    assert result.returncode == 1 and f"gap: 3 records lost at seq 1 ({NO_SPACE})" in result.stderr
    assert run_kleidi("audit", "verify", "--allow-gaps", str(log_path)).returncode == 0
    assert_no_secret_written(small_disk, proc.plaintexts_sent + first.plaintexts_sent)


def test_fail_open_under_a_real_server(kleidi_factory: Any, small_disk: Path) -> None:
    log_path = small_disk / "audit.jsonl"
    proc = kleidi_factory(settings={"audit": {"path": str(log_path), "on_failure": "fail_open"}})
    seed = os.urandom(32)
    sealed = proc.encrypt(seed, uid="before")
    filler = fill(small_disk)
    for number in range(500):  # every call is served, through the write that is cut short and after it
        assert proc.decrypt(sealed.ciphertext, sealed.key_id, sealed.annotations, uid=f"during-{number}") == seed
        if metric(scrape(proc), "kleidi_audit_write_failures_total") >= 1:
            break
    assert metric(scrape(proc), "kleidi_audit_healthy") == 0
    proc.encrypt(os.urandom(32), uid="served")
    lines_are_whole(log_path)
    filler.unlink()
    # No call needed: the once-a-second upkeep writes the gap record.
    wait_for(lambda: metric(scrape(proc), "kleidi_audit_healthy") == 1, what="the audit log to recover")
    failures = metric(scrape(proc), "kleidi_audit_write_failures_total")
    assert proc.stop() == 0
    entries = lines_are_whole(log_path)
    # A gap record may fit in the room a cut-short record left, so one episode can end and another begin.
    assert sum(g["lost"] for g in gaps(entries)) == failures >= 2
    assert entries[-1]["event"] == "stop"
    result = run_kleidi("audit", "verify", str(log_path))
    assert result.returncode == 1
    for gap in gaps(entries):
        assert f"gap: {gap['lost']} records lost at seq {gap['seq']} ({NO_SPACE})" in result.stderr
    assert run_kleidi("audit", "verify", "--allow-gaps", str(log_path)).returncode == 0
    assert_no_secret_written(small_disk, proc.plaintexts_sent)


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
def test_status_readyz_and_metrics_tell_the_truth_about_a_full_audit_disk(kleidi_factory: Any, small_disk: Path,
                                                                         policy: str) -> None:
    from tests.test_telemetry import get

    proc = kleidi_factory(settings={"audit": {"path": str(small_disk / "audit.jsonl"), "on_failure": policy}})
    filler = fill(small_disk)
    refused = served = 0
    for n in range(500):  # until a record is lost: a cut-short write may still have found room
        try:
            proc.encrypt(os.urandom(32), uid=f"n{n}")
            served += 1
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            refused += 1
            break
        if metric(scrape(proc), "kleidi_audit_write_failures_total") >= 1:
            break
    text = scrape(proc)
    assert metric(text, "kleidi_audit_write_failures_total") >= 1 and metric(text, "kleidi_audit_healthy") == 0
    healthz = proc.status().healthz
    code, body = get(proc, "/readyz")
    assert code == 503 and f"audit log cannot be written: {NO_SPACE}" in body
    if policy == "fail_closed":
        assert refused == 1 and "audit log cannot be written" in healthz  # the apiserver is told
        assert metric(text, "kleidi_healthy") == 0
        assert 'kleidi_requests_total{code="UNAVAILABLE",method="Encrypt"} 1.0' in text
    else:
        assert refused == 0 and healthz == "ok"  # served, and Status must not fail the apiserver's readiness
        assert metric(text, "kleidi_healthy") == 1
        assert f'kleidi_requests_total{{code="OK",method="Encrypt"}} {float(served)}' in text
    filler.unlink()
    wait_for(lambda: proc.status().healthz == "ok" and get(proc, "/readyz")[0] == 200, 10, "recovery")
    assert metric(scrape(proc), "kleidi_audit_healthy") == 1 and metric(scrape(proc), "kleidi_healthy") == 1
    assert proc.stop() == 0
