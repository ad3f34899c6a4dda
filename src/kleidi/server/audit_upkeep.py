"""The audit log of a running server: opened first (so a backend's start-up login is audited too),
then kept up in the background (fsync, anchor, recovery after a write failure)."""

from __future__ import annotations

import asyncio
import logging

from kleidi import audit
from kleidi.errors import ConfigError
from kleidi.settings.sections import AuditSettings

log = logging.getLogger("kleidi.server")


def open_audit(settings: AuditSettings) -> audit.AuditLog | None:
    """Open and activate the audit log ``settings`` describe; None if it is off."""
    if settings.path is None:
        return None
    try:
        log_file = audit.AuditLog(settings.path, hmac_key=audit.read_hmac_key(settings.hmac_key_file),
                                  fsync=settings.fsync, max_bytes=settings.max_bytes, keep=settings.keep,
                                  on_failure=settings.on_failure, anchor_path=settings.anchor_path)
    except OSError as exc:
        raise ConfigError(f"audit.path: cannot open {settings.path}: {exc.strerror}",
                          fix="create the directory and let kleidi's user write it") from None
    audit.activate(log_file)
    return log_file


def close_audit(audit_log: audit.AuditLog | None) -> None:
    if audit_log is not None:
        audit.activate(None)
        audit_log.close()


async def keep_up(audit_log: audit.AuditLog) -> None:
    """Every second: recovery after a failure, fsync, anchor. Runs until cancelled."""
    while True:
        await asyncio.sleep(1.0)
        try:
            await asyncio.to_thread(audit_log.tick)
        except Exception:  # this task is what brings the log back: no one failure may end it
            log.exception("audit log upkeep failed; trying again in a second")
