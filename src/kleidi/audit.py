"""Tamper-evident audit log: one JSON line per operation, each carrying the hash of the one before.

Every record holds ``seq`` (1, 2, 3, ...), ``prev`` (the previous record's ``hash``, or 64 zeros for
the first record ever) and ``hash`` = SHA-256 (or HMAC-SHA256 with a separate key, so that whoever
can write the file cannot forge a consistent chain) over ``prev`` and the record's canonical JSON
without ``hash``. Editing, deleting, inserting or reordering a record breaks the chain at that
point; ``kleidi audit verify`` names the first broken record. A clean shutdown writes a ``stop``
record, so a log cut short at its end is reported too, unless it is cut back to an earlier ``stop``:
that only the anchor (``audit.anchor_path``, a file holding the last seq and hash, kept where the
log's writers cannot write) reveals.

Records never hold plaintext, seeds, ciphertext, keys or tokens: operation, apiserver uid,
key_id, backend, outcome, latency. Every field is bounded (strings cut, control characters escaped,
the whole record at most ``MAX_RECORD_BYTES``), so no caller-supplied value can bloat or garble it.

A record is never left torn: a failed or short write is cut back off the file (``ftruncate``) and
the chain does not advance. Records that could not be written are counted, and when writing works
again a chained ``audit_gap`` record says how many were lost, of which events, when and why.
``audit.on_failure`` decides whether calls are refused meanwhile (``fail_closed``: ``emit`` raises
``AuditUnavailable``) or served (``fail_open``).

Files are rotated by size without breaking the chain: ``audit.jsonl`` becomes ``audit.jsonl.1``
(older ones shift to ``.2`` ...) and the new file continues the sequence and the chain. When the
oldest file is deleted, a chained ``audit_rotated_out`` record first says through which seq and
hash records were removed, so that ``verify`` can tell rotation from deletion.

Other record types kleidi writes about the log itself: ``audit_truncated`` (at start-up the log
ended before the anchor's seq: records were removed from its end) and ``audit_anchor_invalid``
(the anchor could not be read or is not authentic).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from kleidi import telemetry
from kleidi.errors import AuditUnavailable, ConfigError

log = logging.getLogger("kleidi.audit")

GENESIS = "0" * 64
GAP, TRUNCATED, ROTATED_OUT, ANCHOR_INVALID = "audit_gap", "audit_truncated", "audit_rotated_out", \
    "audit_anchor_invalid"

MAX_RECORD_BYTES = 8 * 1024
"""No record line is longer (the largest legitimate one is well under 2 KiB)."""
FIELD_CHARS = 256
"""Default bound of a string field (apiserver uids are 36-character UUIDs)."""
_FIELD_LIMITS = {"key_id": 1024, "previous_key_id": 1024, "reason": 512, "endpoint": 512}  # KMS v2: key_id <= 1 KiB
_NAME_CHARS = 64
_MAX_ITEMS = 32
_CHAIN_KEYS = 200  # room kept under MAX_RECORD_BYTES for seq, prev and hash
_READ_CHUNK = 64 * 1024
_MAX_LINE = 16 * 1024 * 1024  # a "line" longer than this, found while reading backwards, is not a record
_ANCHOR_MAX = 4096
_ANCHOR_DOMAIN = b"kleidi audit anchor\n"  # an anchor MAC can never pass for a chain hash, nor the reverse


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
            raise ConfigError(f"audit.hmac_key_file {path} is readable by others", fix=f"chmod 600 {path}")
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"audit.hmac_key_file: cannot read {path}: {exc.strerror}",
                          fix="check the path, and that kleidi's user may read the file") from None
    if len(key) < 16:
        raise ConfigError(f"audit.hmac_key_file {path} holds {len(key)} bytes",
                          fix="use at least 32 random bytes (e.g. head -c 32 /dev/urandom | base64 > FILE)")
    return key


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return f"internal error ({type(exc).__name__})"  # never a foreign exception's text: it may quote data


# ------------------------------------------------------------------------------------------------ bounds


def _escape(text: str) -> str:
    """Control, format and separator characters as visible escapes: a record reads as one plain line
    in any viewer, whatever a caller put in its uid (ANSI sequences, U+2028, bidi overrides, NUL)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else (f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
                   for ch in text)


def _bounded_text(text: str, limit: int) -> str:
    head = _escape(text[:limit])
    if len(text) <= limit and len(head) <= limit:
        return head
    return f"{head[:limit]}...[cut: {len(text)} chars]"


def _bounded(name: str, value: Any, nested: bool = False) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else _bounded_text(str(value), _NAME_CHARS)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _bounded_text(value, _FIELD_LIMITS.get(name, FIELD_CHARS))
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"  # never the bytes themselves: they could be a seed or a key
    if isinstance(value, dict) and not nested:
        items = list(value.items())[:_MAX_ITEMS]
        return {_bounded_text(str(k), _NAME_CHARS): _bounded(name, v, True) for k, v in items}
    if isinstance(value, list | tuple) and not nested:
        return [_bounded(name, v, True) for v in list(value)[:_MAX_ITEMS]]
    return _bounded_text(str(value), FIELD_CHARS)


def bounded_record(event: str, fields: dict[str, Any], when: str | None = None) -> dict[str, Any]:
    """The record body (without seq, prev, hash), every field bounded and the whole under the cap."""
    record: dict[str, Any] = {"time": when or _now(), "event": _bounded_text(str(event), _NAME_CHARS)}
    for name, value in fields.items():
        if value is not None and name not in ("time", "event", "seq", "prev", "hash"):
            record[_bounded_text(str(name), _NAME_CHARS)] = _bounded(name, value)
    if len(_canonical(record)) > MAX_RECORD_BYTES - _CHAIN_KEYS:
        # Too many fields: drop the largest until it fits, and say how many went.
        droppable = sorted((k for k in record if k not in ("time", "event", "outcome")),
                           key=lambda k: len(_canonical({k: record[k]})), reverse=True)
        dropped = 0
        for name in droppable:
            del record[name]
            dropped += 1
            if len(_canonical({**record, "dropped_fields": dropped})) <= MAX_RECORD_BYTES - _CHAIN_KEYS:
                break
        record["dropped_fields"] = dropped
    return record


# ------------------------------------------------------------------------------------------------ files


def _open_regular(path: Path, flags: int, mode: int = 0o600) -> int:
    """Open without following a symlink, without blocking on a FIFO, and only a plain file with one
    link: whoever can write the audit directory cannot point kleidi's writes at another file."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if st.st_nlink > 1:
            raise OSError(errno.EMLINK, "has more than one hard link", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lines_backwards(fd: int, end: int) -> Iterator[bytes]:
    """The lines of the file before offset ``end``, last first, read in chunks from the end: a record
    of any size is found whole (the first line is yielded even if the file does not start with one)."""
    buf, pos, skipping = b"", end, False
    while pos > 0:
        step = min(_READ_CHUNK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        lines = buf.split(b"\n")
        buf = lines[0]
        for line in reversed(lines[1:]):
            if skipping:
                skipping = False  # the tail end of the over-long line
            elif line:
                yield line
        if len(buf) > _MAX_LINE:
            buf, skipping = b"", True
    if buf and not skipping:
        yield buf


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if isinstance(record, dict) and isinstance(record.get("seq"), int) and isinstance(record.get("hash"), str):
        return record
    return None


def _tail_record(path: Path) -> dict[str, Any] | None:
    """The last complete record of one file, however long it is; None if it holds none."""
    try:
        fd = _open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        for line in _lines_backwards(fd, os.fstat(fd).st_size):
            record = _parse(line)
            if record is not None:
                return record
    finally:
        os.close(fd)
    return None


def _last_record(path: Path) -> dict[str, Any] | None:
    """The last complete record of the newest file holding one, to continue the chain after a restart."""
    for candidate in (path, path.with_name(path.name + ".1")):
        record = _tail_record(candidate)
        if record is not None:
            return record
    return None


# ------------------------------------------------------------------------------------------------ anchor


@dataclass(frozen=True)
class Anchor:
    seq: int
    hash: str
    time: str


class AnchorError(ValueError):
    """The anchor file cannot be read, is malformed, or is not authentic."""


def _anchor_mac(key: bytes, body: dict[str, Any]) -> str:
    return hmac.new(key, _ANCHOR_DOMAIN + _canonical(body), hashlib.sha256).hexdigest()


def write_anchor(path: Path, seq: int, chain: str, key: bytes | None) -> None:
    """Replace the anchor atomically (temporary file, fsync, rename, fsync of the directory), mode 0600."""
    body: dict[str, Any] = {"seq": seq, "hash": chain, "time": _now()}
    if key is not None:
        body["mac"] = _anchor_mac(key, body)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        os.unlink(tmp)  # left by a crash mid-update
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        data = memoryview(_canonical(body) + b"\n")
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_anchor(path: Path, key: bytes | None) -> Anchor:
    """The anchor in ``path``; raises FileNotFoundError if there is none, AnchorError if it is unusable."""
    try:
        fd = _open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise AnchorError(f"cannot read the anchor {path}: {_reason(exc)}") from None
    try:
        data = os.read(fd, _ANCHOR_MAX + 1)
    finally:
        os.close(fd)
    try:
        body = json.loads(data) if len(data) <= _ANCHOR_MAX else None
    except ValueError:
        body = None
    if not (isinstance(body, dict) and isinstance(body.get("seq"), int) and isinstance(body.get("hash"), str)
            and isinstance(body.get("time"), str)):
        raise AnchorError(f"the anchor {path} is not an anchor (no seq, hash and time)")
    if key is not None:
        mac = body.pop("mac", None)
        if not isinstance(mac, str) or not hmac.compare_digest(mac, _anchor_mac(key, body)):
            raise AnchorError(f"the anchor {path} is not authentic (its MAC does not match the HMAC key)")
    return Anchor(body["seq"], body["hash"], body["time"])


# ------------------------------------------------------------------------------------------------ writer


@dataclass
class _Failure:
    reason: str
    first: str
    last: str = ""
    lost: int = 0
    by_event: dict[str, int] = field(default_factory=dict)


class AuditLog:
    """Appends chained records; thread-safe; fsync policy ``always``, ``interval`` or ``never``."""

    def __init__(self, path: Path, *, hmac_key: bytes | None = None, fsync: str = "interval",
                 max_bytes: int = 100 * 1024 * 1024, keep: int = 5,
                 on_failure: Literal["fail_closed", "fail_open"] = "fail_closed",
                 anchor_path: Path | None = None) -> None:
        self.path, self.key, self.fsync_policy = path, hmac_key, fsync
        self.max_bytes, self.keep = max_bytes, keep
        self.on_failure, self.anchor_path = on_failure, anchor_path
        self._lock = threading.Lock()
        self._anchor_lock = threading.Lock()
        self._failure: _Failure | None = None
        self._sync_error: str | None = None
        self._anchor_error: str | None = None
        self._anchored: tuple[int, str] | None = None
        self._rotation_error: str | None = None
        self._dirty = False
        self.records_written = 0
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd: int | None = _open_regular(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            torn = self._repair_tail(self._fd)
            last = _last_record(path)
        except BaseException:
            os.close(self._fd)
            raise
        self._seq = int(last["seq"]) if last else 0
        self._prev = str(last["hash"]) if last else GENESIS
        self._size = os.fstat(self._fd).st_size
        telemetry.AUDIT_HEALTHY.set(1)
        with self._lock:
            if torn:
                log.error("audit log %s ended in a record cut short (%d bytes; kleidi stopped in the middle of a "
                          "write): removed it; an audit_gap record counts it", path, torn)
                self._failure = _Failure("a record cut short at the end of the log was removed at start-up", _now())
                self._failure.lost, self._failure.by_event = 1, {"unknown": 1}
                self._recover_locked()
            if anchor_path is not None:
                self._check_anchor_locked(anchor_path)

    def _repair_tail(self, fd: int) -> int:
        """Cut off bytes after the last complete line (a write interrupted by a crash); returns how many.
        A whole record that only lacks its newline keeps its place and gets the newline."""
        end = os.fstat(fd).st_size
        if end == 0 or os.pread(fd, 1, end - 1) == b"\n":
            return 0
        tail = next(_lines_backwards(fd, end))
        if _parse(tail) is not None:
            os.write(fd, b"\n")
            return 0
        os.ftruncate(fd, end - len(tail))
        return len(tail)

    def _check_anchor_locked(self, anchor_path: Path) -> None:
        """At start-up: a log ending before the anchored record was cut; record it before going on."""
        if anchor_path.parent.resolve() == self.path.parent.resolve():
            log.warning("audit.anchor_path %s is in the audit log's directory: whoever can cut the log there can "
                        "rewrite the anchor too; fix: keep it in a directory only kleidi can write", anchor_path)
        try:
            anchor = read_anchor(anchor_path, self.key)
        except FileNotFoundError:
            return  # the first start with an anchor
        except AnchorError as exc:
            log.error("audit anchor unusable: %s; writing an audit_anchor_invalid record", exc)
            self._record_locked(bounded_record(ANCHOR_INVALID, {"reason": str(exc), "found_seq": self._seq}))
            return
        if anchor.seq > self._seq or (anchor.seq == self._seq and anchor.hash != self._prev):
            log.error("audit log %s ends at seq %d but the anchor %s records seq %d: records were removed from the "
                      "end; writing an audit_truncated record", self.path, self._seq, anchor_path, anchor.seq)
            self._record_locked(bounded_record(TRUNCATED, {
                "expected_seq": anchor.seq, "expected_hash": anchor.hash, "anchor_time": anchor.time,
                "found_seq": self._seq, "found_hash": self._prev}))
        self._anchored = (anchor.seq, anchor.hash)

    # -------------------------------------------------------------------------------------------- writing

    def write(self, event: str, **fields: Any) -> None:
        """Append a record; if it cannot be written, it is counted as lost and, under fail_closed,
        AuditUnavailable is raised (never OSError)."""
        self._write(bounded_record(event, fields), refuse=True)

    def _write(self, body: dict[str, Any], refuse: bool) -> None:
        rotated: tuple[int, str] | None = None
        with self._lock:
            written = self._record_locked(body)
            if written and self._size >= self.max_bytes:
                rotated = self._rotate_locked()
            reason = self._failure.reason if self._failure is not None else "unknown error"
        if rotated is not None:
            self._update_anchor(rotated)
        if not written and refuse and self.on_failure == "fail_closed":
            raise AuditUnavailable(f"audit log cannot be written: {reason}; calls are refused until it can "
                                   "(audit.on_failure: fail_closed)")

    def _record_locked(self, body: dict[str, Any]) -> bool:
        if self._failure is not None and not self._recover_locked():
            self._lose_locked(body, None)
            return False
        try:
            self._append_locked(body)
        except Exception as exc:  # a bug is a lost record too: counted, reported, never a torn line
            self._lose_locked(body, exc)
            return False
        return True

    def _append_locked(self, body: dict[str, Any]) -> None:
        if self._fd is None:
            self._fd = _open_regular(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        fd = self._fd
        record = dict(body)
        record["seq"] = self._seq + 1
        record["prev"] = self._prev
        record["hash"] = chain_hash(self._prev, record, self.key)
        data = _canonical(record) + b"\n"
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                view = view[written:]
            if self.fsync_policy == "always":
                os.fsync(fd)
        except OSError:
            # No torn record: a partial line would read as tampering to `audit verify` forever.
            try:
                os.ftruncate(fd, start)
            except OSError as exc:
                log.error("audit log %s: cannot remove a partly written record (%s); it is removed at the next "
                          "start", self.path, _reason(exc))
            raise
        self._seq, self._prev = record["seq"], record["hash"]
        self._size = start + len(data)
        self._dirty = self._dirty or self.fsync_policy != "always"
        self.records_written += 1
        telemetry.AUDIT_RECORDS.inc()

    def _lose_locked(self, body: dict[str, Any], exc: Exception | None) -> None:
        event = str(body["event"])
        if self._failure is None:
            reason = _reason(exc) if exc is not None else "unknown error"
            self._failure = _Failure(reason, body["time"])
            telemetry.AUDIT_HEALTHY.set(0)
            log.error("audit log %s cannot be written (%s): records are being lost and counted; %s; an audit_gap "
                      "record will say how many once writing works again", self.path, reason,
                      "Encrypt and Decrypt are refused meanwhile (audit.on_failure: fail_closed)"
                      if self.on_failure == "fail_closed" else "calls are still served (audit.on_failure: fail_open)")
        failure = self._failure
        failure.lost += 1
        failure.last = body["time"]
        if event not in failure.by_event and len(failure.by_event) >= _MAX_ITEMS - 1:
            event = "other"
        failure.by_event[event] = failure.by_event.get(event, 0) + 1
        telemetry.AUDIT_WRITE_FAILURES.inc()

    def _recover_locked(self) -> bool:
        """Write the chained audit_gap record for the failure episode; True if it is over."""
        failure = self._failure
        assert failure is not None
        try:
            self._append_locked(bounded_record(GAP, {
                "lost": failure.lost, "lost_by_event": failure.by_event, "first_lost": failure.first,
                "last_lost": failure.last or failure.first, "reason": failure.reason}))
        except OSError:
            return False
        self._failure = None
        telemetry.AUDIT_HEALTHY.set(1)
        log.warning("audit log %s can be written again: %d records were lost (%s); recorded in the audit_gap "
                    "record at seq %d", self.path, failure.lost, failure.reason, self._seq)
        return True

    def _rotate_locked(self) -> tuple[int, str] | None:
        """Rename the files one step older; the chain goes on in a new file; returns the (seq, hash) now
        on disk. A failure leaves kleidi writing on (into whichever file it can) and is logged once; the
        next record tries again."""
        try:
            self._evict_locked()  # one left by an earlier failed eviction, before it would be overwritten
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
            for index in range(self.keep, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if os.path.lexists(older):
                    os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            self._fd = _open_regular(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
            self._size = 0
            self._evict_locked()
            os.fsync(self._fd)  # the checkpoint too, before the anchor names it
        except OSError as exc:
            if self._rotation_error is None:
                log.error("audit log %s cannot be rotated (%s); writing on", self.path, _reason(exc))
            self._rotation_error = _reason(exc)
            if self._fd is None:
                try:
                    self._fd = _open_regular(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
                except OSError:
                    pass  # the next record reopens it, or is counted as lost
            return None
        if self._rotation_error is not None:
            log.info("audit log %s rotated again", self.path)
            self._rotation_error = None
        return self._seq, self._prev

    def _evict_locked(self) -> None:
        """Delete the file rotated past ``keep``, after a chained checkpoint says which records go with it."""
        stale = self.path.with_name(f"{self.path.name}.{self.keep + 1}")
        if not os.path.lexists(stale):
            return
        try:
            last = _tail_record(stale)
        except OSError:
            last = None
        if last is not None:
            self._append_locked(bounded_record(ROTATED_OUT, {
                "through_seq": last["seq"], "through_hash": last["hash"], "file": stale.name}))
        else:
            log.warning("audit log: %s holds no record; deleting it", stale)
        os.unlink(stale)

    # -------------------------------------------------------------------------------------------- upkeep

    @property
    def problem(self) -> str | None:
        """None while records are written; else why not, and how many were lost (nothing secret)."""
        failure = self._failure
        if failure is None:
            return None
        return f"audit log cannot be written: {failure.reason} (records lost: {failure.lost})"

    def retry(self) -> bool:
        """If records are being lost, try to end the episode with its audit_gap record; True when healthy."""
        with self._lock:
            return self._failure is None or self._recover_locked()

    def sync(self) -> None:
        """fsync if anything was written since the last sync (the ``interval`` policy calls this), then
        move the anchor to the last record on disk. Never raises OSError: it is logged once per episode."""
        with self._lock:
            # The anchor names only records already on disk: a power cut must not make it look ahead.
            durable: tuple[int, str] | None = (self._seq, self._prev) if not self._dirty else None
            if self._dirty and self.fsync_policy != "never" and self._fd is not None:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    if self._sync_error is None:
                        log.error("audit log %s cannot be synced to disk (%s): records written since the last sync "
                                  "may be lost in a crash", self.path, _reason(exc))
                    self._sync_error = _reason(exc)
                else:
                    self._dirty = False
                    durable = (self._seq, self._prev)
                    if self._sync_error is not None:
                        log.info("audit log %s syncs to disk again", self.path)
                        self._sync_error = None
            elif self.fsync_policy == "never":
                durable = (self._seq, self._prev)  # the OS decides: as durable as kleidi can know
        if durable is not None:
            self._update_anchor(durable)

    def tick(self) -> None:
        """The once-a-second upkeep: end a failure episode if writing works again, fsync, anchor."""
        self.retry()
        self.sync()

    def _update_anchor(self, current: tuple[int, str]) -> None:
        if self.anchor_path is None:
            return
        with self._anchor_lock:
            if current[0] == 0 or current == self._anchored:
                return
            try:
                write_anchor(self.anchor_path, current[0], current[1], self.key)
            except OSError as exc:
                if self._anchor_error is None:
                    log.error("audit anchor %s cannot be written (%s): a log cut short would go unnoticed until it "
                              "can", self.anchor_path, _reason(exc))
                self._anchor_error = _reason(exc)
                return
            self._anchored = current
            if self._anchor_error is not None:
                log.info("audit anchor %s written again", self.anchor_path)
                self._anchor_error = None

    def close(self) -> None:
        self._write(bounded_record("stop", {}), refuse=False)
        durable: tuple[int, str] | None = None
        with self._lock:
            if self._failure is not None:
                log.error("kleidi stops with %d audit records lost (%s) and no audit_gap record written: the log "
                          "ends without a clean stop", self._failure.lost, self._failure.reason)
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                    durable = (self._seq, self._prev)
                except OSError as exc:
                    log.error("audit log %s cannot be synced to disk at stop (%s)", self.path, _reason(exc))
                os.close(self._fd)
                self._fd = None
        if durable is not None:
            self._update_anchor(durable)


_active: AuditLog | None = None


def activate(log: AuditLog | None) -> None:
    global _active
    _active = log


def emit(event: str, **fields: Any) -> None:
    """Write a record to the active audit log, if there is one. A record that cannot be written never
    raises OSError: it is counted, and under fail_closed AuditUnavailable is raised (refuse the call)."""
    if _active is not None:
        _active.write(event, **fields)


def note(event: str, **fields: Any) -> None:
    """Like ``emit``, but never raises: for records of kleidi's own events (start, key rotation, login,
    reload, a refused caller), whose work must go on when the record is lost (the audit_gap counts it)."""
    if _active is not None:
        _active._write(bounded_record(event, fields), refuse=False)


def problem() -> str | None:
    """The active log's problem (see ``AuditLog.problem``); None if it works or there is none."""
    return _active.problem if _active is not None else None


def fails_closed() -> bool:
    """Whether calls must be refused now: the policy is fail_closed and records cannot be written."""
    return _active is not None and _active.on_failure == "fail_closed" and _active.problem is not None


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


def _int(record: dict[str, Any], name: str) -> int | None:
    value = record.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def verify(files: list[Path], key: bytes | None = None, allow_open: bool = False, *, allow_gaps: bool = False,
           allow_truncated: bool = False, anchor: Path | None = None) -> VerifyResult:
    """Check the chain across ``files`` given oldest first; report the first broken record, then what
    the intact chain itself records: gaps, a cut found at start-up, rotated-out records, the anchor."""
    prev: str | None = None
    seq: int | None = None
    first: dict[str, Any] | None = None
    last_event = None
    count = 0
    gaps: list[str] = []
    cuts: list[str] = []
    checkpoints: dict[int, tuple[str, int]] = {}
    unclean_starts: list[int] = []
    anchored: Anchor | None = None
    anchored_hash: str | None = None
    if anchor is not None:
        try:
            anchored = read_anchor(anchor, key)
        except (OSError, AnchorError) as exc:
            return VerifyResult(False, 0, str(exc) if isinstance(exc, AnchorError)
                                else f"cannot read the anchor {anchor}: {_reason(exc)}")
    for path, number, line in _records(files):
        where = f"{path}:{number}"
        if not line.endswith(b"\n"):
            return VerifyResult(False, count, f"{where}: record is cut short (no end of line): truncated file")
        try:
            record = json.loads(line)
        except ValueError:
            return VerifyResult(False, count, f"{where}: not a JSON record (edited or truncated)")
        if not isinstance(record, dict) or not {"seq", "prev", "hash"} <= set(record) \
                or _int(record, "seq") is None:
            return VerifyResult(False, count, f"{where}: not an audit record (no seq/prev/hash)")
        if seq is not None and record["seq"] != seq + 1:
            why = "missing records" if record["seq"] > seq + 1 else "reordered or replayed"
            return VerifyResult(False, count, f"{where}: record {record['seq']} follows record {seq}: {why}")
        if prev is not None and record["prev"] != prev:
            return VerifyResult(False, count, f"{where}: record {record['seq']} does not follow the previous one "
                                              "(prev hash mismatch): a record was removed, inserted or reordered")
        if prev is None and record["seq"] == 1 and record["prev"] != GENESIS:
            return VerifyResult(False, count, f"{where}: the first record does not start the chain")
        if prev is None and record["seq"] < 1:
            return VerifyResult(False, count, f"{where}: record {record['seq']} cannot start a chain")
        expected = chain_hash(str(record["prev"]), record, key)
        if not hmac.compare_digest(expected, str(record["hash"])):
            return VerifyResult(False, count, f"{where}: record {record['seq']} was altered (hash mismatch"
                                              f"{'' if key is None else '; or the HMAC key is wrong'})")
        event = record.get("event")
        if event == GAP:
            gaps.append(f"gap: {record.get('lost')} records lost at seq {record['seq']} ({record.get('reason')})")
        elif event == TRUNCATED:
            cuts.append(f"record {record['seq']} (audit_truncated): at start-up the log ended at seq "
                        f"{record.get('found_seq')} but the anchor records seq {record.get('expected_seq')}: "
                        "records were removed from the end")
        elif event == ANCHOR_INVALID:
            cuts.append(f"record {record['seq']} (audit_anchor_invalid): at start-up the anchor could not be trusted "
                        f"({record.get('reason')}): a cut of the log's end may have gone unnoticed")
        elif event == ROTATED_OUT and _int(record, "through_seq") is not None:
            checkpoints[record["through_seq"]] = (str(record.get("through_hash")), record["seq"])
        elif event == "start" and last_event not in (None, "stop"):
            unclean_starts.append(record["seq"])
        if anchored is not None and record["seq"] == anchored.seq:
            anchored_hash = record["hash"]
        if first is None:
            first = record
        prev, seq, last_event = record["hash"], record["seq"], event
        count += 1
    if first is None or seq is None:
        return VerifyResult(False, 0, "no records")

    problems: list[str] = []
    notes: list[str] = []
    start = first["seq"]
    if start > 1:
        checkpoint = checkpoints.get(start - 1)
        if checkpoint is None:
            problems.append(f"the chain starts at seq {start}: earlier records are missing (no audit_rotated_out "
                            f"checkpoint for records 1..{start - 1}; if older files exist, pass them too)")
        elif not hmac.compare_digest(checkpoint[0], str(first["prev"])):
            problems.append(f"the chain starts at seq {start}, but the checkpoint at seq {checkpoint[1]} says "
                            f"record {start - 1} had another hash: earlier records were replaced")
        else:
            notes.append(f"records 1..{start - 1} rotated out (checkpoint at seq {checkpoint[1]})")
    if anchored is not None:
        if anchored.seq > seq:
            problems.append(f"log ends at seq {seq} but the anchor records seq {anchored.seq}: records were removed "
                            "from the end")
        elif anchored.seq < start:
            problems.append(f"the anchor records seq {anchored.seq}, before the first record given (seq {start}): "
                            "pass the older files too")
        elif anchored_hash is None or not hmac.compare_digest(anchored_hash, anchored.hash):
            problems.append(f"record {anchored.seq} is not the one the anchor records (hash mismatch): the log was "
                            "rewritten")
        else:
            notes.append(f"the log reaches the anchored record (seq {anchored.seq}, anchored {anchored.time})")
    (notes if allow_truncated else problems).extend(cuts)
    (notes if allow_gaps else problems).extend(gaps)
    if last_event != "stop":
        open_message = (f"the last record (seq {seq}) is not a clean stop: the end was cut off, kleidi crashed, or "
                        "it is still running" + ("" if allow_open else " (then pass --allow-open)"))
        (notes if allow_open else problems).append(open_message)
    if unclean_starts:
        notes.append(f"kleidi started {len(unclean_starts)} time(s) after no clean stop (a crash, or a cut): at seq "
                     + ", ".join(map(str, unclean_starts[:10])) + (" ..." if len(unclean_starts) > 10 else ""))
    hints = [flag for flag, needed in (("--allow-gaps", gaps and not allow_gaps),
                                       ("--allow-truncated", cuts and not allow_truncated)) if needed]
    if problems:
        summary = f"{count} records verified, chain intact, but:"
        if hints:
            notes.append(f"(to accept what kleidi itself recorded, pass {' '.join(hints)})")
        return VerifyResult(False, count, "\n".join([summary, *("  " + p for p in problems),
                                                     *("  " + n for n in notes)]))
    ending = "ends with a clean stop" if last_event == "stop" else f"ends at seq {seq} without a clean stop"
    return VerifyResult(True, count, "\n".join([f"{count} records verified, chain intact, {ending}",
                                                *("  " + n for n in notes)]))


def now_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
