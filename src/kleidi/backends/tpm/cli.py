"""`kleidi tpm ...`: the key store's lifecycle and the enrolment of other nodes (docs/backends/tpm.md)."""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from kleidi.backends.tpm import TpmBackendSettings, check_primary, open_tpm
from kleidi.backends.tpm.store import (
    ACTIVE,
    DOCS,
    ENROL_REQUEST_FORMAT,
    ENROLMENT_FORMAT,
    FORMAT_VERSION,
    KekEntry,
    KeyStore,
    create_store,
    edit_store,
    entries,
    malformed,
    now,
    parse_document,
    read_store,
)
from kleidi.cli_support import KeyVersionType, config_option, load, output_option, print_table
from kleidi.errors import ConfigError, KeyringError

ROTATION_ORDER = ("With several control-plane nodes, make a version current only once every node holds it: rotate "
                  f"with --stage, enrol it on every other node, then `kleidi tpm make-current` ({DOCS}#rotation).")


def _settings(config_file: Path | None, key_store: Path | None, command: str) -> TpmBackendSettings:
    settings = load(config_file, **{"backend.key_store": key_store})
    backend = settings.backend
    if backend.kind != "tpm":
        raise ConfigError(f"`kleidi tpm {command}` manages the TPM backend's key store; this config's backend is "
                          f"{backend.kind}", fix="give the config of the node's tpm backend (--config)")
    assert isinstance(backend, TpmBackendSettings)
    return backend


def _options(func: Any) -> Any:
    func = click.option("--key-store", type=click.Path(dir_okay=False, path_type=Path),
                        help="TPM key store file (overrides backend.key_store).")(func)
    return config_option(func)


def _create_version(settings: TpmBackendSettings, store: KeyStore | None, version: int) -> tuple[str, KekEntry]:
    """A new KEK in this node's TPM, as (storage primary name, key store entry)."""
    from kleidi.backends.tpm.device import primary_name

    with open_tpm(settings).transaction() as tx:
        primary, public = tx.primary()
        if store is not None:
            check_primary(store, public)
        entry = tx.create_kek(primary, version, now(), settings.mechanism, tuple(settings.pcrs), settings.pcr_bank)
    return primary_name(public), entry


@click.group()
def tpm() -> None:
    """Manage the TPM backend's key store and enrol other control-plane nodes."""


@tpm.command()
@_options
def init(config_file: Path | None, key_store: Path | None) -> None:
    """Create the first KEK version in this node's TPM and a new key store (first node only)."""
    settings = _settings(config_file, key_store, "init")
    path = settings.key_store
    if os.path.lexists(path):  # checked again under the lock when writing; this spares the TPM a key
        raise KeyringError(f"TPM key store {path} already exists; kleidi never overwrites a key store",
                               fix="use `kleidi tpm rotate` to add a version, or choose another backend.key_store")
    primary, entry = _create_version(settings, None, 1)
    store = KeyStore.new(primary, entry)
    create_store(path, store)
    click.echo(f"created TPM key store {path}\ncurrent version 1 ({entry.mechanism}), key_id "
               f"{store.key_version(1).key_id}\nEnrol at least one other TPM (another node or an offline spare): a "
               "version exists only in the TPMs that hold it.")


@tpm.command()
@_options
@click.option("--stage", is_flag=True, help="Add the version for decryption only; make it current later "
              "(with make-current) once every node holds it.")
def rotate(config_file: Path | None, key_store: Path | None, stage: bool) -> None:
    """Create a new KEK version in this node's TPM (current unless --stage)."""
    settings = _settings(config_file, key_store, "rotate")
    with edit_store(settings.key_store) as store:
        _, entry = _create_version(settings, store, store.next_version())
        store.versions[entry.version] = entry
        if not stage:
            store.current = entry.version
    state = "staged (decrypts, not yet current)" if stage else "current"
    click.echo(f"rotated {settings.key_store}: version {entry.version} is {state}, key_id "
               f"{store.key_version(entry.version).key_id}\n{ROTATION_ORDER}")


@tpm.command("make-current")
@_options
@click.argument("version", type=KeyVersionType())
def make_current(config_file: Path | None, key_store: Path | None, version: int) -> None:
    """Make an active VERSION the one new seeds are wrapped with."""
    settings = _settings(config_file, key_store, "make-current")
    with edit_store(settings.key_store) as store:
        store.make_current(version)
    click.echo(f"version {version} of {settings.key_store} is current, key_id {store.key_version(version).key_id}")


@tpm.command()
@_options
@click.argument("version", type=KeyVersionType())
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def retire(config_file: Path | None, key_store: Path | None, version: int, yes: bool) -> None:
    """Drop an old KEK VERSION's blob from this node's key store; its ciphertexts stop decrypting here."""
    settings = _settings(config_file, key_store, "retire")
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("retiring destroys a key; pass --yes to confirm when not at a terminal")
        click.confirm(f"Drop version {version} from {settings.key_store}? Data still encrypted with it becomes "
                      "unreadable on this node", abort=True)
    with edit_store(settings.key_store) as store:
        store.retire(version)
    click.echo(f"retired version {version} of {settings.key_store} (key_id {store.key_version(version).key_id}); "
               "retire it on every other node too, and drop it from key store backups to destroy it")


@tpm.command()
@_options
@output_option
def keys(config_file: Path | None, key_store: Path | None, output: str) -> None:
    """List the key store's versions and their key_ids (the same on every enrolled node)."""
    settings = _settings(config_file, key_store, "keys")
    store, _ = read_store(settings.key_store)
    rows = [{"version": v, "key_id": store.key_version(v).key_id, "state": e.state, "current": v == store.current,
             "mechanism": e.mechanism, "pcrs": list(e.pcrs), "created": e.created, "retired": e.retired}
            for v, e in sorted(store.versions.items())]
    if output == "json":
        click.echo(json.dumps({"key_store": str(settings.key_store), "store_id": store.store_id, "versions": rows},
                              indent=2))
        return
    print_table(f"TPM key store {settings.key_store}", ("version", "state", "current", "mechanism", "pcrs",
                                                        "created", "retired", "key_id"),
                [(f"v{r['version']}", r["state"], "current" if r["current"] else "", r["mechanism"], r["pcrs"],
                  r["created"], r["retired"], r["key_id"]) for r in rows])


# -- enrolment ---------------------------------------------------------------------------------------


@tpm.command("enrol-request")
@_options
def enrol_request(config_file: Path | None, key_store: Path | None) -> None:
    """Print this node's storage key (public part) for an enrolled node's `kleidi tpm enrol`."""
    from kleidi.backends.tpm.device import primary_name

    settings = _settings(config_file, key_store, "enrol-request")
    with open_tpm(settings).transaction() as tx:
        _, public = tx.primary()
    click.echo(json.dumps({"format": ENROL_REQUEST_FORMAT, "format_version": FORMAT_VERSION,
                           "storage_public": base64.b64encode(public).decode(), "storage_name": primary_name(public)},
                          indent=2))


def _read_document(source: Path, expected: str, what: str, fix: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if str(source) == "-" else source.read_text()
    except OSError as exc:
        raise KeyringError(f"{what} {source} cannot be read: {exc.strerror}", fix="give the file's path") from None
    return parse_document(text, expected, f"{what} {source}", fix)


@tpm.command()
@_options
@click.argument("request", type=click.Path(dir_okay=False, path_type=Path, allow_dash=True))
def enrol(config_file: Path | None, key_store: Path | None, request: Path) -> None:
    """Duplicate every active version to the TPM that made REQUEST; print the enrolment for its `kleidi tpm import`."""
    from kleidi.backends.tpm.device import primary_name

    settings = _settings(config_file, key_store, "enrol")
    doc = _read_document(request, ENROL_REQUEST_FORMAT, "enrol request", "make it again with "
                         "`kleidi tpm enrol-request` on the new node")
    try:
        target = base64.b64decode(doc["storage_public"], validate=True)
        target_name = primary_name(target)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise malformed(f"enrol request {request}", f"invalid storage_public ({type(exc).__name__})",
                        "make it again with `kleidi tpm enrol-request` on the new node") from None
    store, _ = read_store(settings.key_store)
    versions = []
    with open_tpm(settings).transaction() as tx:
        primary, public = tx.primary()
        check_primary(store, public)
        if target_name == store.storage_primary:
            raise KeyringError("the enrol request comes from this node's own TPM",
                               fix="run `kleidi tpm enrol-request` on the node to enrol")
        for _, entry in sorted(store.versions.items()):
            item = entry.to_dict(blobs=False)
            if entry.state == ACTIVE:
                inner, duplicate, seed = tx.duplicate(primary, entry, target)
                item.update(inner_key=base64.b64encode(inner).decode(),
                            duplicate=base64.b64encode(duplicate).decode(), seed=base64.b64encode(seed).decode())
            versions.append(item)
    click.echo(json.dumps({"format": ENROLMENT_FORMAT, "format_version": FORMAT_VERSION, "store_id": store.store_id,
                           "current": store.current, "target_name": target_name, "versions": versions}, indent=2))


@tpm.command("import")
@_options
@click.argument("enrolment", type=click.Path(dir_okay=False, path_type=Path, allow_dash=True))
def import_(config_file: Path | None, key_store: Path | None, enrolment: Path) -> None:
    """Import an ENROLMENT made by `kleidi tpm enrol` into this node's TPM and key store."""
    settings = _settings(config_file, key_store, "import")
    fix = "make it again with `kleidi tpm enrol` from this node's enrol request"
    doc = _read_document(enrolment, ENROLMENT_FORMAT, "enrolment", fix)
    try:
        offered = entries(doc["versions"], blobs=False)
        wrapped = {int(item["version"]): tuple(base64.b64decode(item[k], validate=True)
                                               for k in ("inner_key", "duplicate", "seed"))
                   for item in doc["versions"] if item["state"] == ACTIVE}
        store_id, current, target_name = str(doc["store_id"]), int(doc["current"]), str(doc["target_name"])
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise malformed(f"enrolment {enrolment}", f"missing or invalid field ({type(exc).__name__})", fix) from None
    path = settings.key_store
    existing = read_store(path)[0] if path.exists() else None
    if existing is not None and existing.store_id != store_id:
        raise KeyringError(f"the enrolment is for key store {store_id}, but {path} is key store {existing.store_id}",
                           fix="give another backend.key_store, or enrol from a node of this node's key store")
    from kleidi.backends.tpm.device import primary_name

    known = set(existing.versions) if existing is not None else set()
    with open_tpm(settings).transaction() as tx:
        primary, public = tx.primary()
        if primary_name(public) != target_name:
            raise KeyringError("the enrolment was made for another TPM (or this TPM was cleared since its enrol "
                               "request)", fix="run `kleidi tpm enrol-request` on this node and enrol that request")
        for version, entry in offered.items():
            if version in known:
                continue
            if entry.state == ACTIVE:
                inner, duplicate, seed = wrapped[version]
                entry.private = tx.import_kek(primary, entry, inner, duplicate, seed)
    new = {v: e for v, e in offered.items() if v not in known}
    if existing is None:
        store = KeyStore(store_id=store_id, current=current, storage_primary=primary_name(public), versions=new)
        create_store(path, store)
    else:
        with edit_store(path) as store:
            store.versions.update(new)
    added = ", ".join(f"v{v}" for v in sorted(new)) or "none (this node holds every version already)"
    click.echo(f"imported into {path}: {added}; current version {store.current}, key_id "
               f"{store.key_version(store.current).key_id}")
