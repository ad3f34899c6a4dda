"""Tamper-evident audit log: one JSON line per operation, each carrying the hash of the one before.

Every record holds ``seq`` (1, 2, 3, ...), ``prev`` (the previous record's ``hash``, or 64 zeros for
the first record ever) and ``hash`` = SHA-256 (or HMAC-SHA256 with a separate key, so that whoever
can write the file cannot forge a consistent chain) over ``prev`` and the record's canonical JSON
without ``hash``. Editing, deleting, inserting or reordering a record breaks the chain at that
point; ``kleidi audit verify`` names the first broken record. A clean shutdown writes a ``stop``
record, so a log cut short at its end is reported too.

Records never hold plaintext, seeds, ciphertext, keys or tokens: operation, apiserver uid,
key_id, backend, outcome, latency.

Files are rotated by size without breaking the chain: ``audit.jsonl`` becomes ``audit.jsonl.1``
(older ones shift to ``.2`` ...) and the new file continues the sequence and the chain.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kleidi import telemetry
from kleidi.errors import ConfigError

GENESIS = "0" * 64


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev: str, record: dict[str, Any], key: bytes | None) -> str:
    body = prev.encode() + b"\n" + _canonical({k: v for k, v in record.items() if k != "hash"})
    if key is not None:
        return hmac.new(key, body, hashlib.sha256).hexdigest()
    return hashlib.sha256(body).hexdigest()


def read_hmac_key(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
        if st.st_mode & 0o077:
            raise ConfigError(f"audit.hmac_key_file {path} is readable by others; fix: chmod 600 {path}")
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"audit.hmac_key_file: cannot read {path}: {exc.strerror}") from None
    if len(key) < 16:
        raise ConfigError(f"audit.hmac_key_file {path} holds {len(key)} bytes; fix: use at least 32 random bytes "
                          "(e.g. head -c 32 /dev/urandom | base64 > FILE)")
    return key


def _last_record(path: Path) -> dict[str, Any] | None:
    """The last complete record of the newest existing file, to continue the chain after a restart."""
    for candidate in (path, path.with_name(path.name + ".1")):
        if not candidate.exists():
            continue
        with open(candidate, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 65536))
            lines = handle.read().splitlines()
        for line in reversed(lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn last line from a crash: the verifier will report it
            if isinstance(record, dict) and "hash" in record:
                return record
    return None


class AuditLog:
    """Appends chained records; thread-safe; fsync policy ``always``, ``interval`` or ``never``."""

    def __init__(self, path: Path, *, hmac_key: bytes | None = None, fsync: str = "interval",
                 max_bytes: int = 100 * 1024 * 1024, keep: int = 5) -> None:
        self.path, self.key, self.fsync_policy = path, hmac_key, fsync
        self.max_bytes, self.keep = max_bytes, keep
        self._lock = threading.Lock()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        last = _last_record(path)
        self._seq = int(last["seq"]) if last else 0
        self._prev = str(last["hash"]) if last else GENESIS
        self._file = self._open()
        self._dirty = False
        self.records_written = 0

    def _open(self) -> Any:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        return os.fdopen(fd, "ab", buffering=0)

    def write(self, event: str, **fields: Any) -> None:
        record: dict[str, Any] = {"time": datetime.now(UTC).isoformat(timespec="microseconds"), "event": event}
        record.update({k: v for k, v in fields.items() if v is not None})
        with self._lock:
            self._seq += 1
            record["seq"] = self._seq
            record["prev"] = self._prev
            record["hash"] = chain_hash(self._prev, record, self.key)
            self._prev = record["hash"]
            self._file.write(_canonical(record) + b"\n")
            self.records_written += 1
            telemetry.AUDIT_RECORDS.inc()
            if self.fsync_policy == "always":
                os.fsync(self._file.fileno())
            else:
                self._dirty = True
            if self._file.tell() >= self.max_bytes:
                self._rotate()

    def _rotate(self) -> None:
        os.fsync(self._file.fileno())
        self._file.close()
        for index in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        stale = self.path.with_name(f"{self.path.name}.{self.keep + 1}")
        if stale.exists():
            stale.unlink()
        self._file = self._open()

    def sync(self) -> None:
        """fsync if anything was written since the last sync (the ``interval`` policy calls this)."""
        with self._lock:
            if self._dirty and self.fsync_policy != "never":
                os.fsync(self._file.fileno())
                self._dirty = False

    def close(self) -> None:
        self.write("stop")
        with self._lock:
            os.fsync(self._file.fileno())
            self._file.close()


_active: AuditLog | None = None


def activate(log: AuditLog | None) -> None:
    global _active
    _active = log


def emit(event: str, **fields: Any) -> None:
    """Write a record to the active audit log, if there is one."""
    if _active is not None:
        _active.write(event, **fields)


# ------------------------------------------------------------------------------------------------ verify


@dataclass
class VerifyResult:
    ok: bool
    records: int
    message: str


def _records(files: Iterable[Path]) -> Iterator[tuple[Path, int, bytes]]:
    for path in files:
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                yield path, number, line


def verify(files: list[Path], key: bytes | None = None, allow_open: bool = False) -> VerifyResult:
    """Check the chain across ``files`` given oldest first; report the first broken record."""
    prev: str | None = None
    seq: int | None = None
    last_event = None
    count = 0
    for path, number, line in _records(files):
        where = f"{path}:{number}"
        if not line.endswith(b"\n"):
            return VerifyResult(False, count, f"{where}: record is cut short (no end of line): truncated file")
        try:
            record = json.loads(line)
        except ValueError:
            return VerifyResult(False, count, f"{where}: not a JSON record (edited or truncated)")
        if not isinstance(record, dict) or not {"seq", "prev", "hash"} <= set(record):
            return VerifyResult(False, count, f"{where}: not an audit record (no seq/prev/hash)")
        if seq is not None and record["seq"] != seq + 1:
            why = "missing records" if record["seq"] > seq + 1 else "reordered or replayed"
            return VerifyResult(False, count, f"{where}: record {record['seq']} follows record {seq}: {why}")
        if prev is not None and record["prev"] != prev:
            return VerifyResult(False, count, f"{where}: record {record['seq']} does not follow the previous one "
                                              "(prev hash mismatch): a record was removed, inserted or reordered")
        if prev is None and record["seq"] == 1 and record["prev"] != GENESIS:
            return VerifyResult(False, count, f"{where}: the first record does not start the chain")
        expected = chain_hash(record["prev"], record, key)
        if not hmac.compare_digest(expected, str(record["hash"])):
            return VerifyResult(False, count, f"{where}: record {record['seq']} was altered (hash mismatch"
                                              f"{'' if key is None else '; or the HMAC key is wrong'})")
        prev, seq, last_event = record["hash"], record["seq"], record.get("event")
        count += 1
    if count == 0:
        return VerifyResult(False, 0, "no records")
    if last_event != "stop":
        message = (f"{count} records verified, but the last one (seq {seq}) is not a clean stop: the end was cut "
                   "off, kleidi crashed, or it is still running (then pass --allow-open)")
        return VerifyResult(allow_open, count, message)
    return VerifyResult(True, count, f"{count} records verified, chain intact, ends with a clean stop")


def now_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
