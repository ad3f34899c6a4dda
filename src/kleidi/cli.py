"""The ``kleidi`` command. Thin: it parses arguments and calls the modules that do the work.

Exit codes: 0 success; 1 the operation failed or the plugin is unhealthy; 2 bad usage or
configuration (also: the plugin could not be reached, for ``status``).
No command accepts a secret as an argument.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from kleidi import __version__
from kleidi.errors import ConfigError, KeyringError, KleidiError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILED = 1
EXIT_USAGE = 2


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"kleidi: error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Turns kleidi errors into a one-paragraph message and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, KeyringError) as exc:
            _fail(str(exc), EXIT_USAGE)
        except KleidiError as exc:
            _fail(str(exc), EXIT_FAILED)


def config_options(func: F) -> F:
    """--config and --keyring, shared by every command that reads the settings."""

    @click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                  envvar="KLEIDI_CONFIG", help="YAML config file (env KLEIDI_CONFIG).")
    @click.option("--keyring", type=click.Path(dir_okay=False, path_type=Path),
                  help="Local backend keyring file (overrides backend.keyring).")
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _settings(config_file: Path | None, **overrides: Any) -> Any:
    from kleidi.config import load_settings

    return load_settings(config_file, overrides)


def _local_keyring_path(config_file: Path | None, keyring: Path | None) -> Path:
    settings = _settings(config_file, **{"backend.keyring": keyring})
    if settings.backend.kind != "local":
        raise ConfigError(f"backend.kind is {settings.backend.kind!r}; keygen, rotate, retire and keys manage "
                          "the local backend's keyring only")
    path: Path = settings.backend.keyring
    return path


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """kleidi: a KMS v2 provider plugin for Kubernetes."""


@main.command()
@config_options
@click.option("--endpoint", help="Socket to listen on, unix:///path or unix:///@name (server.endpoint).")
@click.option("--create-keyring", is_flag=True, default=None,
              help="Create the local keyring if it is missing (backend.create_if_missing).")
@click.option("--enable-v1beta1", is_flag=True, default=None, help="Also serve KMS v1 (server.enable_v1beta1).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="logging.level")
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]), help="logging.format")
def serve(config_file: Path | None, keyring: Path | None, endpoint: str | None, create_keyring: bool | None,
          enable_v1beta1: bool | None, log_level: str | None, log_format: str | None) -> None:
    """Serve KMS v2 to kube-apiserver until SIGTERM or SIGINT (SIGHUP, or a change to the config
    file, reloads the config and keys)."""
    from kleidi import logs, server

    overrides = {"server.endpoint": endpoint, "server.enable_v1beta1": enable_v1beta1,
                 "backend.keyring": keyring, "backend.create_if_missing": create_keyring,
                 "logging.level": log_level, "logging.format": log_format}
    settings = _settings(config_file, **overrides)
    logs.configure(settings.logging.level, settings.logging.format)
    server.serve(settings, reload_settings=lambda: _settings(config_file, **overrides), watch=config_file)


@main.command()
@config_options
def keygen(config_file: Path | None, keyring: Path | None) -> None:
    """Create a new local keyring (mode 0600) with one KEK version."""
    from kleidi.backends.local import create_keyring

    path = _local_keyring_path(config_file, keyring)
    created = create_keyring(path)
    click.echo(f"created keyring {path}\ncurrent version {created.current}, key_id {created.key_id(created.current)}"
               "\nBack this file up: without it nothing encrypted with it can be read.")


@main.command()
@config_options
def rotate(config_file: Path | None, keyring: Path | None) -> None:
    """Add a new KEK version to the local keyring and make it current."""
    from kleidi.backends.local import edit_keyring

    path = _local_keyring_path(config_file, keyring)
    with edit_keyring(path) as ring:
        entry = ring.rotate()
    click.echo(f"rotated {path}: version {entry.version} is current, key_id {ring.key_id(entry.version)}\n"
               "Running servers pick it up within backend.refresh_interval (or at once on SIGHUP); older versions "
               "keep decrypting until you retire them.")


@main.command()
@config_options
@click.argument("version", type=int)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def retire(config_file: Path | None, keyring: Path | None, version: int, yes: bool) -> None:
    """Destroy the key material of an old KEK VERSION. Ciphertexts wrapped with it stop decrypting."""
    from kleidi.backends.local import edit_keyring

    path = _local_keyring_path(config_file, keyring)
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("retiring destroys a key; pass --yes to confirm when not at a terminal")
        click.confirm(f"Destroy version {version} of {path}? Data still encrypted with it becomes unreadable",
                      abort=True)
    with edit_keyring(path) as ring:
        ring.retire(version)
    click.echo(f"retired version {version} of {path} (key_id {ring.key_id(version)})")


@main.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys(config_file: Path | None, keyring: Path | None, as_json: bool) -> None:
    """List the local keyring's versions and their key_ids (no key material)."""
    from rich.console import Console
    from rich.table import Table

    from kleidi.backends.local import read_keyring

    path = _local_keyring_path(config_file, keyring)
    ring, _ = read_keyring(path)
    rows = [{"version": v, "key_id": ring.key_id(v), "state": e.state, "current": v == ring.current,
             "created": e.created, "retired": e.retired} for v, e in sorted(ring.versions.items())]
    if as_json:
        click.echo(json.dumps({"keyring": str(path), "keyring_id": ring.keyring_id, "versions": rows}, indent=2))
        return
    table = Table(title=f"keyring {path}")
    for column in ("version", "state", "current", "created", "key_id"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["version"]), str(row["state"]), "*" if row["current"] else "", str(row["created"]),
                      str(row["key_id"]))
    Console().print(table)


@main.command()
@click.option("--endpoint", required=True, help="The plugin's socket, unix:///path or unix:///@name.")
@click.option("--timeout", default="3s", show_default=True, help="Deadline for the call (the apiserver uses 3s).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(endpoint: str, timeout: str, as_json: bool) -> None:
    """Call Status the way kube-apiserver does; exit 0 only if the plugin is healthy."""
    from kleidi.client import StatusCheck, check_status
    from kleidi.config import _parse_duration

    try:
        result: StatusCheck = check_status(endpoint, float(_parse_duration(timeout)))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        for key, value in result.as_dict().items():
            click.echo(f"{key}: {value}")
    if result.error is not None:
        sys.exit(EXIT_USAGE)
    if result.problems:
        sys.exit(EXIT_FAILED)


@main.command("encryption-config")
@click.option("--name", default="kleidi", show_default=True,
              help="Provider name; part of every stored prefix k8s:enc:kms:v2:<name>: and never to be changed.")
@click.option("--endpoint", required=True, help="kleidi's socket, as in server.endpoint.")
@click.option("--resources", default="secrets", show_default=True, help="Comma-separated resources to encrypt.")
@click.option("--timeout", default="3s", show_default=True, help="The apiserver's per-call KMS timeout.")
@click.option("--identity-fallback/--no-identity-fallback", default=True, show_default=True,
              help="List identity after kms so objects written before encryption can still be read.")
def encryption_config(name: str, endpoint: str, resources: str, timeout: str, identity_fallback: bool) -> None:
    """Print an EncryptionConfiguration for kube-apiserver that uses kleidi."""
    from kleidi import encryption_config as ec

    try:
        config = ec.build(name, endpoint, [r.strip() for r in resources.split(",") if r.strip()], timeout,
                          identity_fallback)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(ec.render(config), nl=False)


@main.command()
def version() -> None:
    """Print kleidi's version and the KMS API versions it serves."""
    import grpc

    click.echo(f"kleidi {__version__} (KMS v2, v1beta1; grpcio {grpc.__version__}; python "
               f"{sys.version.split()[0]})")


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), envvar="KLEIDI_CONFIG",
              help="YAML config file (env KLEIDI_CONFIG).")
@click.option("--encryption-config", type=click.Path(dir_okay=False, path_type=Path),
              help="The apiserver's EncryptionConfiguration, to check that it points at this kleidi.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def doctor(config_file: Path | None, encryption_config: Path | None, as_json: bool) -> None:
    """Preflight: config, file permissions, backend, round trip, clock, socket; exit 1 on any failure."""
    import dataclasses

    from rich.console import Console
    from rich.table import Table

    from kleidi import doctor as checks_module

    checks = checks_module.run(config_file, encryption_config)
    failed = any(check.result == checks_module.FAIL for check in checks)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
        sys.exit(EXIT_FAILED if failed else 0)
    table = Table(title="kleidi doctor")
    for column in ("check", "result", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for check in checks:
        table.add_row(check.name, check.result, check.detail, check.fix)
    Console(width=max(120, Console().width)).print(table)
    if failed:
        sys.exit(EXIT_FAILED)


@main.group("audit")
def audit_group() -> None:
    """Work with the tamper-evident audit log."""


@audit_group.command("verify")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--hmac-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The audit.hmac_key_file the log was written with (for a keyed chain).")
@click.option("--allow-open", is_flag=True, help="Accept a log that does not end with a clean stop (kleidi running).")
@click.option("--anchor", "anchor", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The audit.anchor_path file: check that the log still reaches the anchored record.")
@click.option("--allow-gaps", is_flag=True, help="Accept audit_gap records (records kleidi could not write, e.g. "
              "on a full disk); they are still listed.")
@click.option("--allow-truncated", is_flag=True, help="Accept audit_truncated and audit_anchor_invalid records "
              "(a cut of the log that kleidi found and recorded at start-up); they are still listed.")
def audit_verify(files: tuple[Path, ...], hmac_key_file: Path | None, allow_open: bool, anchor: Path | None,
                 allow_gaps: bool, allow_truncated: bool) -> None:
    """Check the hash chain of audit FILES (oldest first, e.g. audit.jsonl.2 audit.jsonl.1 audit.jsonl).

    Without --anchor, a log cut back to an earlier clean stop cannot be told from a whole one."""
    from kleidi import audit

    result = audit.verify(list(files), audit.read_hmac_key(hmac_key_file), allow_open=allow_open,
                          allow_gaps=allow_gaps, allow_truncated=allow_truncated, anchor=anchor)
    click.echo(("ok: " if result.ok else "FAILED: ") + result.message, err=not result.ok)
    if not result.ok:
        sys.exit(EXIT_FAILED)


@main.group()
def policy() -> None:
    """Print the least-privilege policy a backend needs."""


@policy.command("vault")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), envvar="KLEIDI_CONFIG",
              help="YAML config file with a vault backend (env KLEIDI_CONFIG).")
def policy_vault(config_file: Path | None) -> None:
    """The Vault/OpenBao policy for the configured Transit mount and key (HCL)."""
    from kleidi.backends.vault import policy as vault_policy

    settings = _settings(config_file)
    if settings.backend.kind != "vault":
        raise ConfigError(f"backend.kind is {settings.backend.kind!r}; `kleidi policy vault` needs a vault backend "
                          "in the config (--config)")
    click.echo(vault_policy(settings.backend), nl=False)


@main.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of the config file."""
    from kleidi.config import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@config.command("docs")
def config_docs() -> None:
    """Print the configuration reference in Markdown (docs/configuration.md)."""
    from kleidi.config_docs import render_reference

    click.echo(render_reference(), nl=False)


@config.command("check")
@config_options
def config_check(config_file: Path | None, keyring: Path | None) -> None:
    """Validate the settings (file, environment, flags) and print what kleidi would use."""
    import yaml

    settings = _settings(config_file, **{"backend.keyring": keyring})
    click.echo(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False), nl=False)
