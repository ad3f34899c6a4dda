"""The ``kleidi`` command. Thin: it parses arguments and calls the modules that do the work.

Exit codes, the same for every command (docs/cli.md):

* 0 (``EXIT_OK``) success;
* 1 (``EXIT_FAILED``) a check or an operation failed: the plugin is unhealthy or cannot be reached
  (``status``), a doctor check failed, an audit log does not verify, the key state refuses the
  operation (retiring the current version);
* 2 (``EXIT_USAGE``) bad usage or configuration: bad flags, a bad or missing config or keyring, a
  missing optional dependency, ``keygen`` onto an existing file.

Machine-readable output is ``--output json`` on every command that has any. Human output never
shows Python values (``None``, ``True``, ``[]``) and, when stdout is not a terminal, prints every
value in full. No command accepts a secret as an argument.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, TypeVar

import click

from kleidi import __version__
from kleidi.errors import ConfigError, KeyringError, KleidiError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _fail(message: str, fix: str | None, code: int) -> NoReturn:
    click.echo(f"kleidi: error: {message}", err=True)
    if fix:
        click.echo(f"  fix: {fix}", err=True)
    sys.exit(code)


def _first_sentence(text: str) -> str:
    text = " ".join(text.split("\n\n")[0].split())
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


class _Command(click.Command):
    """Lists itself in ``kleidi --help`` by its whole first sentence: click would cut it at 45 characters."""

    def get_short_help_str(self, limit: int = 45) -> str:
        return self.short_help or _first_sentence(self.help or "")


class _Group(click.Group):
    """Turns kleidi errors into a message, its fix and an exit code, never a traceback."""

    command_class = _Command
    group_class = type  # subgroups are _Groups too

    def get_short_help_str(self, limit: int = 45) -> str:
        return self.short_help or _first_sentence(self.help or "")

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, KeyringError) as exc:
            _fail(exc.message, exc.fix, EXIT_USAGE)
        except KleidiError as exc:
            _fail(exc.message, exc.fix, EXIT_FAILED)


# -- shared options and values --------------------------------------------------------------------


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


def config_option(func: F) -> F:
    """--config alone, for commands that read settings but never a keyring."""
    return click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                        envvar="KLEIDI_CONFIG", help="YAML config file (env KLEIDI_CONFIG).")(func)


def output_option(func: F) -> F:
    """The one switch between human and machine output, on every command that has both."""
    return click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text", show_default=True,
                        help="text for people; json for scripts (every field, in full).")(func)


class Duration(NamedTuple):
    text: str
    seconds: float


class DurationType(click.ParamType):  # type: ignore[type-arg]  # generic only from click 8.2 on
    """A Go duration (3s, 500ms, 1m30s), parsed by the same parser as the config's durations."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Duration:
        from kleidi.durations import DurationError, parse_duration

        if isinstance(value, Duration):
            return value
        try:
            seconds = parse_duration(str(value))
        except DurationError as exc:
            self.fail(f"{exc.message}; fix: {exc.fix}", param, ctx)
        if seconds <= 0:
            self.fail(f"{value!r} is not positive; fix: use e.g. 3s", param, ctx)
        return Duration(str(value).strip(), seconds)


class KeyVersionType(click.ParamType):  # type: ignore[type-arg]
    """A KEK version as ``kleidi keys`` and every key_id print it (``v2``), or as a number (``2``)."""

    name = "version"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        digits = text[1:] if text[:1] in ("v", "V") else text
        if not digits.isascii() or not digits.isdigit() or int(digits) < 1:
            self.fail(f"{text!r} is not a key version; fix: write it as `kleidi keys` shows it, e.g. v2 (or 2)",
                      param, ctx)
        return int(digits)


def _settings(config_file: Path | None, **overrides: Any) -> Any:
    from kleidi.config import load_settings

    return load_settings(config_file, overrides)


def _endpoint(value: str, flag: str = "--endpoint") -> str:
    """An endpoint as the apiserver writes it; a plain socket path (or @name) is taken as unix://."""
    from kleidi.endpoint import check_endpoint_flag

    value = value.strip()
    if value.startswith(("/", "@")):
        value = f"unix://{'/' if value.startswith('@') else ''}{value}"
    check_endpoint_flag(value, flag)
    return value


def _configured_endpoint(endpoint: str | None, config_file: Path | None) -> str:
    """--endpoint if given, else server.endpoint of the settings (--config, the environment, defaults)."""
    if endpoint is not None:
        return _endpoint(endpoint)
    return _endpoint(_settings(config_file).server.endpoint, "server.endpoint")


def _human(value: Any) -> str:
    """A value as people read it: never Python's None, True or []."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(_human(v) for v in value) or "none"
    return str(value)


def _print_table(title: str, columns: Sequence[str], rows: Iterator[Sequence[Any]] | Sequence[Sequence[Any]]) -> None:
    """A rich table whose cells are never read as markup ("kleidi[vault]" stays as it is) and never
    cut: on a terminal long values fold; through a pipe every value is printed whole, since people
    copy key_ids and fixes from there."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title), title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(Text(_human(value)) for value in row))
    tty = sys.stdout.isatty()
    console = Console(width=None if tty else 10_000, soft_wrap=not tty, highlight=False)
    console.print(table)


# -- the command group ----------------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(__version__, "--version", "-V", prog_name="kleidi", message="%(prog)s %(version)s")
def main() -> None:
    """kleidi: a KMS v2 provider plugin for Kubernetes (exit codes: 0 ok, 1 check or operation failed, 2 bad
    usage or configuration; docs/cli.md)."""


# -- serve ----------------------------------------------------------------------------------------


@main.command()
@config_options
@click.option("--endpoint", help="Socket to listen on, unix:///path or unix:///@name (server.endpoint).")
@click.option("--create-keyring", is_flag=True, default=None,
              help="Create the local keyring if it is missing (backend.create_if_missing); nothing is created if "
                   "start-up fails.")
@click.option("--enable-v1beta1", is_flag=True, default=None, help="Also serve KMS v1 (server.enable_v1beta1).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Lowest level logged; debug adds one line per request (logging.level, default info).")
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]),
              help="json: one object per line; console: for people; auto: console on a terminal, else json "
                   "(logging.format, default auto).")
def serve(config_file: Path | None, keyring: Path | None, endpoint: str | None, create_keyring: bool | None,
          enable_v1beta1: bool | None, log_level: str | None, log_format: str | None) -> None:
    """Serve KMS v2 to kube-apiserver until SIGTERM or SIGINT. SIGHUP, or a change to the config
    file, reloads the config and keys."""
    from kleidi import logs, server

    overrides = {"server.endpoint": endpoint, "server.enable_v1beta1": enable_v1beta1,
                 "backend.keyring": keyring, "backend.create_if_missing": create_keyring,
                 "logging.level": log_level, "logging.format": log_format}
    settings = _settings(config_file, **overrides)
    logs.configure(settings.logging.level, settings.logging.format)
    started = False

    def on_started() -> None:
        nonlocal started
        started = True

    with _created_keyring_removed_unless(lambda: started, settings.backend):
        server.serve(settings, reload_settings=lambda: _settings(config_file, **overrides), watch=config_file,
                     on_started=on_started)


class _Undo(NamedTuple):
    keyring: Path
    lock: Path | None
    directories: list[Path]


def _created_keyring_removed_unless(started: Callable[[], bool], backend: Any) -> Any:
    """A context in which a keyring that kleidi creates (backend.create_if_missing) is removed again,
    with the directories and lock file made for it, if start-up fails: a failed first try must
    leave nothing behind that a second try would silently reuse."""
    import contextlib

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        undo = _what_creating_makes(backend)
        try:
            yield
        except BaseException:
            if undo is not None and not started():
                _undo_creation(undo)
            raise

    return context()


def _what_creating_makes(backend: Any) -> _Undo | None:
    if backend.kind != "local" or not backend.create_if_missing or os.path.lexists(backend.keyring):
        return None
    path: Path = backend.keyring
    lock = path.with_name(f".{path.name}.lock")
    missing = []
    for parent in path.parents:
        if os.path.lexists(parent):
            break
        missing.append(parent)
    return _Undo(path, None if os.path.lexists(lock) else lock, missing)


def _undo_creation(undo: _Undo) -> None:
    import contextlib

    from kleidi.backends.local import read_keyring

    try:
        ring, _ = read_keyring(undo.keyring)
    except (KleidiError, OSError):
        return  # not created (or not a keyring kleidi would recognise): leave it alone
    if list(ring.versions) != [1]:
        return  # something rotated it meanwhile: it is no longer only what this run made
    for path in (undo.keyring, undo.lock):
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    for directory in undo.directories:  # deepest first
        with contextlib.suppress(OSError):
            directory.rmdir()
    click.echo(f"kleidi: start-up failed: removed the keyring {undo.keyring} that --create-keyring had just made",
               err=True)


# -- the local keyring ----------------------------------------------------------------------------


def _vault_lifecycle(command: str, backend: Any, version: int | None) -> str:
    """What to run in Vault/OpenBao instead of a local-keyring command (moves to the vault backend later)."""
    namespace = f" -namespace={backend.namespace}" if backend.namespace else ""
    key = f"{backend.transit_mount}/keys/{backend.key}"
    cli = "vault (or bao for OpenBao)"
    if command == "rotate":
        return (f"rotate the Transit key with {cli}: vault write{namespace} -f {key}/rotate; running kleidi servers "
                "pick up the new version within backend.refresh_interval")
    if command == "retire":
        floor = (version or 1) + 1
        return (f"raise the Transit key's min_decryption_version with {cli}: vault write{namespace} {key}/config "
                f"min_decryption_version={floor} (versions below {floor} stop decrypting)")
    if command == "keygen":
        return f"create the Transit key with {cli}: vault write{namespace} -f {key}"
    return (f"list the Transit key's versions with {cli}: vault read{namespace} {key}; `kleidi status --config ...` "
            "shows the key_id in use")


_LIFECYCLE_ELSEWHERE: dict[str, Callable[[str, Any, int | None], str]] = {"vault": _vault_lifecycle}


def _local_keyring_path(config_file: Path | None, keyring: Path | None, command: str,
                        version: int | None = None) -> Path:
    settings = _settings(config_file, **{"backend.keyring": keyring})
    backend = settings.backend
    if backend.kind != "local":
        elsewhere = _LIFECYCLE_ELSEWHERE.get(backend.kind)
        raise ConfigError(f"`kleidi {command}` manages the local backend's keyring; this config's backend is "
                          f"{backend.kind}", fix=elsewhere(command, backend, version) if elsewhere else
                          f"manage the keys with the {backend.kind} backend's own tools")
    path: Path = backend.keyring
    return path


@main.command()
@config_options
def keygen(config_file: Path | None, keyring: Path | None) -> None:
    """Create a new local keyring (mode 0600) with one KEK version."""
    from kleidi.backends.local import create_keyring

    path = _local_keyring_path(config_file, keyring, "keygen")
    created = create_keyring(path)
    click.echo(f"created keyring {path}\ncurrent version {created.current}, key_id {created.key_id(created.current)}"
               "\nBack this file up: without it nothing encrypted with it can be read.")


@main.command()
@config_options
def rotate(config_file: Path | None, keyring: Path | None) -> None:
    """Add a new KEK version to the local keyring and make it current."""
    from kleidi.backends.local import edit_keyring

    path = _local_keyring_path(config_file, keyring, "rotate")
    with edit_keyring(path) as ring:
        entry = ring.rotate()
    click.echo(f"rotated {path}: version {entry.version} is current, key_id {ring.key_id(entry.version)}\n"
               "Running servers pick it up within backend.refresh_interval (or at once on SIGHUP); older versions "
               "keep decrypting until you retire them.")


@main.command()
@config_options
@click.argument("version", type=KeyVersionType())
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def retire(config_file: Path | None, keyring: Path | None, version: int, yes: bool) -> None:
    """Destroy the key material of an old KEK VERSION (v1 or 1, as `kleidi keys` shows it). Ciphertexts
    wrapped with it stop decrypting."""
    from kleidi.backends.local import edit_keyring

    path = _local_keyring_path(config_file, keyring, "retire", version)
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
@output_option
def keys(config_file: Path | None, keyring: Path | None, output: str) -> None:
    """List the local keyring's versions and their key_ids (no key material)."""
    from kleidi.backends.local import read_keyring

    path = _local_keyring_path(config_file, keyring, "keys")
    ring, _ = read_keyring(path)
    rows = [{"version": v, "key_id": ring.key_id(v), "state": e.state, "current": v == ring.current,
             "created": e.created, "retired": e.retired} for v, e in sorted(ring.versions.items())]
    if output == "json":
        click.echo(json.dumps({"keyring": str(path), "keyring_id": ring.keyring_id, "versions": rows}, indent=2))
        return
    _print_table(f"keyring {path}", ("version", "state", "current", "created", "retired", "key_id"),
                 [(f"v{row['version']}", row["state"], "current" if row["current"] else "", row["created"],
                   row["retired"], row["key_id"]) for row in rows])


# -- talking to a running kleidi ------------------------------------------------------------------


@main.command()
@click.option("--endpoint", help="The plugin's socket: unix:///path, unix:///@name or the path alone "
              "(default: server.endpoint of --config).")
@config_option
@click.option("--timeout", type=DurationType(), default="3s", show_default=True,
              help="Deadline for the call, a duration such as 3s or 500ms (the apiserver uses 3s).")
@output_option
def status(endpoint: str | None, config_file: Path | None, timeout: Duration, output: str) -> None:
    """Call Status the way kube-apiserver does; exit 0 only if the plugin answers and is healthy."""
    from kleidi.client import check_status

    result = check_status(_configured_endpoint(endpoint, config_file), timeout.seconds)
    if output == "json":
        click.echo(json.dumps(result.as_dict(), indent=2))
    elif result.error is not None:
        click.echo(f"kleidi at {result.endpoint} cannot be reached: {result.error}")
        if result.fix:
            click.echo(f"  fix: {result.fix}")
    else:
        verdict = "healthy" if result.healthy else "unhealthy: the apiserver would refuse this answer"
        click.echo(f"kleidi at {result.endpoint} is {verdict}")
        for name, value in (("version", result.version), ("healthz", result.healthz), ("key_id", result.key_id)):
            click.echo(f"  {name}: {value or '(empty)'}")
        for problem in result.problems:
            click.echo(f"  problem: {problem}")
    if not result.healthy:
        sys.exit(EXIT_FAILED)


@main.command("encryption-config")
@click.option("--name", default="kleidi", show_default=True,
              help="Provider name; part of every stored prefix k8s:enc:kms:v2:<name>: and never to be changed.")
@click.option("--endpoint", help="kleidi's socket: unix:///path, unix:///@name or the path alone "
              "(default: server.endpoint of --config).")
@config_option
@click.option("--resources", default="secrets", show_default=True,
              help="Comma-separated plural resource names: secrets, configmaps, <plural>.<group>, '*.<group>', "
                   "'*.*'.")
@click.option("--timeout", default="3s", show_default=True,
              help="The apiserver's per-call KMS timeout, a duration such as 3s.")
@click.option("--identity-fallback/--no-identity-fallback", default=True, show_default=True,
              help="List identity after kms so objects written before encryption can still be read.")
def encryption_config(name: str, endpoint: str | None, config_file: Path | None, resources: str, timeout: str,
                      identity_fallback: bool) -> None:
    """Print an EncryptionConfiguration for kube-apiserver that uses kleidi."""
    from kleidi import encryption_config as ec

    config = ec.build(name, _configured_endpoint(endpoint, config_file),
                      [r.strip() for r in resources.split(",") if r.strip()], timeout, identity_fallback)
    click.echo(ec.render(config), nl=False)


@main.command("backends")
@output_option
def backends_command(output: str) -> None:
    """List the installed backends and whether each can be used here (its optional dependencies)."""
    from kleidi.registry import backend_status

    rows = backend_status()
    if output == "json":
        click.echo(json.dumps([row._asdict() for row in rows], indent=2))
        return
    _print_table("kleidi backends", ("backend", "usable", "provided by", "fix"),
                 [(row.name, row.usable, row.source, row.fix) for row in rows])


@main.command()
def version() -> None:
    """Print kleidi's version and the KMS API versions it serves."""
    import grpc

    click.echo(f"kleidi {__version__} (KMS v2, v1beta1; grpcio {grpc.__version__}; python "
               f"{sys.version.split()[0]})")


@main.command()
@config_option
@click.option("--encryption-config", type=click.Path(dir_okay=False, path_type=Path),
              help="The apiserver's EncryptionConfiguration, to check that it points at this kleidi.")
@output_option
def doctor(config_file: Path | None, encryption_config: Path | None, output: str) -> None:
    """Preflight: config, file permissions, backend, round trip, clock, socket; exit 1 on any failure."""
    import dataclasses

    from kleidi import doctor as checks_module

    checks = checks_module.run(config_file, encryption_config)
    failed = any(check.result == checks_module.FAIL for check in checks)
    if output == "json":
        click.echo(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
    else:
        _print_table("kleidi doctor", ("check", "result", "detail", "fix"),
                     [(c.name, c.result, c.detail, c.fix) for c in checks])
    if failed:
        sys.exit(EXIT_FAILED)


# -- audit ----------------------------------------------------------------------------------------


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
@output_option
def audit_verify(files: tuple[Path, ...], hmac_key_file: Path | None, allow_open: bool, anchor: Path | None,
                 allow_gaps: bool, allow_truncated: bool, output: str) -> None:
    """Check the hash chain of audit FILES (oldest first, e.g. audit.jsonl.2 audit.jsonl.1 audit.jsonl).

    Without --anchor, a log cut back to an earlier clean stop cannot be told from a whole one."""
    from kleidi import audit

    result = audit.verify(list(files), audit.read_hmac_key(hmac_key_file), allow_open=allow_open,
                          allow_gaps=allow_gaps, allow_truncated=allow_truncated, anchor=anchor)
    if output == "json":
        click.echo(json.dumps({"ok": result.ok, "records": result.records, "message": result.message}, indent=2))
    else:
        click.echo(("ok: " if result.ok else "FAILED: ") + result.message, err=not result.ok)
    if not result.ok:
        sys.exit(EXIT_FAILED)


# -- policy ---------------------------------------------------------------------------------------


@main.group()
def policy() -> None:
    """Print the least-privilege policy a backend needs."""


@policy.command("vault")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), envvar="KLEIDI_CONFIG",
              help="YAML config file with a vault backend (env KLEIDI_CONFIG).")
def policy_vault(config_file: Path | None) -> None:
    """The Vault/OpenBao policy for the configured Transit mount and key (HCL)."""
    from kleidi.registry import import_backend_module

    settings = _settings(config_file)
    if settings.backend.kind != "vault":
        raise ConfigError(f"backend.kind is {settings.backend.kind!r}; `kleidi policy vault` needs a vault backend",
                          fix="pass a config whose backend is kind: vault (--config)")
    vault = import_backend_module("vault", "kleidi.backends.vault")
    click.echo(vault.policy(settings.backend), nl=False)


# -- config ---------------------------------------------------------------------------------------


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
@output_option
def config_check(config_file: Path | None, keyring: Path | None, output: str) -> None:
    """Validate the settings (file, environment, flags) and that the backend can be loaded; print what
    kleidi would use."""
    import yaml

    from kleidi.registry import backend_class

    settings = _settings(config_file, **{"backend.keyring": keyring})
    backend_class(settings.backend.kind)  # a config whose backend cannot even be imported cannot run
    source = str(config_file) if config_file is not None else "the defaults and environment"
    dumped = settings.model_dump(mode="json")
    if output == "json":
        click.echo(json.dumps({"valid": True, "source": source, "settings": dumped}, indent=2))
        return
    # A comment, so that the output stays YAML.
    click.echo(f"# {source} is valid; the settings kleidi would use:")
    click.echo(yaml.safe_dump(dumped, sort_keys=False), nl=False)
