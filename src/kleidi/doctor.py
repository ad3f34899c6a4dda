"""``kleidi doctor``: a preflight of the configuration, files, backend and socket, with the fix for each failure."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from kleidi.checks import FAIL, PASS, SKIP, Check
from kleidi.config import KleidiSettings, load_settings, load_yaml_file
from kleidi.endpoint import check_ancestors, parse_endpoint
from kleidi.errors import ConfigError, KleidiError
from kleidi.service.keys import round_trip

__all__ = ["FAIL", "PASS", "SKIP", "Check", "run"]


def _config(config_file: Path | None) -> tuple[KleidiSettings | None, Check]:
    try:
        settings = load_settings(config_file)
    except KleidiError as exc:
        return None, Check("config", FAIL, *_split(exc))
    return settings, Check("config", PASS, f"{config_file or 'defaults and environment'} is valid")


def _files(settings: KleidiSettings) -> list[Check]:
    from kleidi.registry import registered_class

    try:
        cls = registered_class(settings.backend.kind)
    except KleidiError:
        return []  # the backend check reports it
    return cls.file_checks(settings.backend)


async def _backend(settings: KleidiSettings) -> list[Check]:
    from kleidi.registry import create_backend

    try:
        backend = create_backend(settings.backend)
    except KleidiError as exc:
        return [Check("backend", FAIL, *_split(exc))]
    checks: list[Check] = []
    try:
        checks += await backend.preflight()
        try:
            async with asyncio.timeout(settings.backend.timeout + 5):
                keys = await backend.load_keys()
        except (KleidiError, TimeoutError) as exc:
            return [*checks, Check("backend reachable", FAIL, _detail(exc),
                                   _fix(exc, "check the backend's address, credentials and policy (docs/backends/)"))]
        checks.append(Check("backend reachable", PASS, f"{backend.describe()}: current key_id {keys.current.key_id}"))
        try:
            async with asyncio.timeout(settings.backend.timeout + 5):
                await round_trip(backend, keys.current)
            checks.append(Check("encrypt/decrypt round trip", PASS, "the KEK wraps and unwraps"))
        except (KleidiError, TimeoutError) as exc:
            checks.append(Check("encrypt/decrypt round trip", FAIL, _detail(exc),
                                _fix(exc, "check that kleidi may both encrypt and decrypt with the key "
                                          "(see the backend's page in docs/backends/)")))
    finally:
        await backend.close()
    return checks


def _split(exc: KleidiError) -> tuple[str, str]:
    """(detail, fix) of an error: its two fields, for the detail and fix columns."""
    return exc.message, exc.fix or ""


def _detail(exc: BaseException) -> str:
    return exc.message if isinstance(exc, KleidiError) else "no answer in time"


def _fix(exc: BaseException, default: str) -> str:
    """The error's own fix when it has one (it knows more), else the check's general advice."""
    return (exc.fix if isinstance(exc, KleidiError) else None) or default


def _socket(settings: KleidiSettings, expected_key_id: str | None) -> list[Check]:
    from kleidi.client import check_status

    endpoint = parse_endpoint(settings.server.endpoint)
    checks = []
    if endpoint.path is not None:
        checks.append(_ancestors(endpoint.path, "server.endpoint", "socket directory"))
    if settings.server.runtime_dir is not None:
        checks.append(_ancestors(settings.server.runtime_dir, "server.runtime_dir", "runtime directory"))
    if endpoint.path is not None:
        try:
            st = os.lstat(endpoint.path)
        except FileNotFoundError:
            return [*checks, Check("socket", FAIL, f"{endpoint.path} does not exist: kleidi is not running",
                                   "start kleidi (kleidi serve --config ...)")]
        if not stat.S_ISSOCK(st.st_mode):
            return [*checks, Check("socket", FAIL, f"{endpoint.path} is not a socket",
                                   "remove it; kleidi creates the socket")]
        mode = stat.S_IMODE(st.st_mode)
        if mode != settings.server.socket_mode:
            checks.append(Check("socket permissions", FAIL, f"{endpoint.path} has mode {mode:04o}, the config says "
                                f"{settings.server.socket_mode:04o}", "restart kleidi with this config"))
        elif mode & 0o007 and not settings.server.authenticate_callers:
            checks.append(Check("socket permissions", FAIL, f"mode {mode:04o} lets every user call Decrypt",
                                "set server.socket_mode to 0600 (or 0660 with socket_group)"))
        else:
            checks.append(Check("socket permissions", PASS, f"{endpoint.path}: mode {mode:04o}"))
    status = check_status(settings.server.endpoint, 3.0)
    if status.error is not None:
        checks.append(Check("kleidi answers", FAIL, status.error, status.fix or "see kleidi's log"))
    elif status.problems:
        checks.append(Check("kleidi answers", FAIL, "; ".join(status.problems), "see kleidi's log"))
    elif expected_key_id is not None and status.key_id != expected_key_id:
        checks.append(Check("kleidi answers", FAIL, f"the running kleidi reports key_id {status.key_id}, the backend's "
                            f"current one is {expected_key_id}", "it has not refreshed yet, or uses another config"))
    else:
        checks.append(Check("kleidi answers", PASS, f"healthz ok, key_id {status.key_id}"))
    return checks


def _ancestors(path: Path, what: str, name: str) -> Check:
    try:
        check_ancestors(path, what)
    except ConfigError as exc:
        return Check(name, FAIL, *_split(exc))
    return Check(name, PASS, f"{path}: every directory above it is writable only by root or kleidi's user")


def _encryption_config(settings: KleidiSettings, path: Path) -> Check:
    try:
        doc = load_yaml_file(path, "EncryptionConfiguration")
    except ConfigError as exc:
        return Check("EncryptionConfiguration", FAIL, _detail(exc),
                     _fix(exc, "generate it with kleidi encryption-config"))
    try:
        providers = [p["kms"] for r in doc["resources"] for p in r["providers"] if "kms" in p]
    except (KeyError, TypeError) as exc:
        return Check("EncryptionConfiguration", FAIL, f"cannot read {path}: {type(exc).__name__}: {exc}",
                     "generate it with kleidi encryption-config")
    mine = [p for p in providers if p.get("endpoint") == settings.server.endpoint]
    if not mine:
        found = ", ".join(str(p.get("endpoint")) for p in providers) or "no kms provider"
        return Check("EncryptionConfiguration", FAIL, f"{path} points at {found}, not at {settings.server.endpoint}",
                     "use the same endpoint in both (kleidi encryption-config --endpoint ...)")
    if any(p.get("apiVersion") != "v2" for p in mine):
        return Check("EncryptionConfiguration", FAIL, "the kms provider for kleidi is not apiVersion: v2",
                     "set apiVersion: v2 (the default is v1)")
    return Check("EncryptionConfiguration", PASS, f"{path}: kms v2 provider {mine[0].get('name')!r} uses this socket")


def run(config_file: Path | None, encryption_config: Path | None) -> list[Check]:
    settings, check = _config(config_file)
    checks = [check]
    if settings is None:
        return checks
    checks += _files(settings)
    backend_checks = asyncio.run(_backend(settings))
    checks += backend_checks
    key_id = next((c.detail.rsplit("key_id ", 1)[1] for c in backend_checks
                   if c.name == "backend reachable" and c.result == PASS), None)
    checks += _socket(settings, key_id)
    if encryption_config is not None:
        checks.append(_encryption_config(settings, encryption_config))
    return checks
