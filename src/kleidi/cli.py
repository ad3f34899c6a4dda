"""The ``kleidi`` command. Thin: it parses arguments and calls the modules that do the work.

Exit codes, the same for every command (docs/cli.md):

* 0 (``EXIT_OK``) success;
* 1 (``EXIT_FAILED``) a check or an operation failed: the plugin is unhealthy or cannot be reached
  (``status``), a doctor check failed, an audit log does not verify, the key state refuses the
  operation (retiring the current version);
* 2 (``EXIT_USAGE``) bad usage or configuration: bad flags, a bad or missing config or keyring, a
  missing optional dependency, ``keygen`` onto an existing file;
* ``migrate`` only: 3 stopped early (run again with ``--resume``), 4 done but the proof was skipped.

Machine-readable output is ``--output json`` on every command that has any. Human output never
shows Python values (``None``, ``True``, ``[]``) and, when stdout is not a terminal, prints every
value in full. No command accepts a secret as an argument.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from kleidi import __version__
from kleidi.cli_support import (
    Duration,
    DurationType,
    backend_flags,
    config_option,
    load,
    output_option,
    print_table,
)
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


class _WholeFirstSentence(click.Command):
    """Lists itself in ``kleidi --help`` by its whole first sentence: click would cut it at 45 characters."""

    def get_short_help_str(self, limit: int = 45) -> str:
        return self.short_help or _first_sentence(self.help or "")


class _Group(_WholeFirstSentence, click.Group):
    """Turns kleidi errors into a message, its fix and an exit code, never a traceback."""

    command_class = _WholeFirstSentence
    group_class = type  # subgroups are _Groups too

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, KeyringError) as exc:
            _fail(exc.message, exc.fix, EXIT_USAGE)
        except KleidiError as exc:
            _fail(exc.message, exc.fix, EXIT_FAILED)


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
    return _endpoint(load(config_file).server.endpoint, "server.endpoint")


# -- the command group ----------------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(__version__, "--version", "-V", prog_name="kleidi", message="%(prog)s %(version)s")
def main() -> None:
    """kleidi: a KMS v2 provider plugin for Kubernetes (exit codes: 0 ok, 1 check or operation failed, 2 bad
    usage or configuration; docs/cli.md)."""


# -- serve ----------------------------------------------------------------------------------------


@main.command()
@config_option
@backend_flags("serve")
@click.option("--endpoint", help="Socket to listen on, unix:///path or unix:///@name (server.endpoint).")
@click.option("--enable-v1beta1", is_flag=True, default=None, help="Also serve KMS v1 (server.enable_v1beta1).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Lowest level logged; debug adds one line per request (logging.level, default info).")
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]),
              help="json: one object per line; console: for people; auto: console on a terminal, else json "
                   "(logging.format, default auto).")
def serve(config_file: Path | None, backend_overrides: dict[str, Any], endpoint: str | None,
          enable_v1beta1: bool | None, log_level: str | None, log_format: str | None) -> None:
    """Serve KMS v2 to kube-apiserver until SIGTERM or SIGINT. SIGHUP, or a change to the config
    file, reloads the config and keys."""
    from kleidi import logs, server

    overrides = {"server.endpoint": endpoint, "server.enable_v1beta1": enable_v1beta1,
                 "logging.level": log_level, "logging.format": log_format, **backend_overrides}
    settings = load(config_file, **overrides)
    logs.configure(settings.logging.level, settings.logging.format)
    server.serve(settings, reload_settings=lambda: load(config_file, **overrides), watch=config_file)


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
@click.option("--previous", multiple=True, metavar="NAME=ENDPOINT",
              help="An old kms provider listed after this one, only to decrypt what is stored with it (moving to "
                   "another backend); repeatable, in order. Not contacted.")
def encryption_config(name: str, endpoint: str | None, config_file: Path | None, resources: str, timeout: str,
                      identity_fallback: bool, previous: tuple[str, ...]) -> None:
    """Print an EncryptionConfiguration for kube-apiserver that uses kleidi."""
    from kleidi import encryption_config as ec

    old = [(old_name, _endpoint(old_endpoint, "--previous"))
           for old_name, old_endpoint in map(ec.parse_previous, previous)]
    config = ec.build(name, _configured_endpoint(endpoint, config_file),
                      [r.strip() for r in resources.split(",") if r.strip()], timeout, identity_fallback, old)
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
    print_table("kleidi backends", ("backend", "usable", "provided by", "fix"),
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
        print_table("kleidi doctor", ("check", "result", "detail", "fix"),
                     [(c.name, c.result, c.detail, c.fix) for c in checks])
    if failed:
        sys.exit(EXIT_FAILED)


# -- scan -----------------------------------------------------------------------------------------


@main.command()
@click.option("--etcd-endpoints", required=True, metavar="URLS",
              help="Comma-separated etcd client URLs, as kube-apiserver's --etcd-servers (https://10.0.0.1:2379).")
@click.option("--etcd-cert", type=click.Path(dir_okay=False, path_type=Path),
              help="Client certificate, as kube-apiserver's --etcd-certfile.")
@click.option("--etcd-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Its private key, as kube-apiserver's --etcd-keyfile.")
@click.option("--etcd-ca", type=click.Path(dir_okay=False, path_type=Path),
              help="CA bundle that signed etcd's serving certificate, as kube-apiserver's --etcd-cafile.")
@click.option("--prefix", default="/registry", show_default=True, help="kube-apiserver's --etcd-prefix.")
@click.option("--resources", default="", help="Comma-separated plural resource names to scan (secrets,configmaps,"
              "widgets.example.com); default: everything under --prefix.")
@click.option("--page-size", type=click.IntRange(min=1, max=100_000), default=500, show_default=True,
              help="Keys read per etcd request.")
@click.option("--endpoint", help="A running kleidi's socket: compare key_ids with the current one its Status "
              "reports.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="kleidi's config file: compare key_ids with every version of its backend (old, retired).")
@click.option("--fail-if", "fail_if", multiple=True, metavar="CONDITION",
              help="Exit 1 if any object is stored so: `plaintext`, or `key-id=<key_id>`. Repeatable.")
@output_option
def scan(etcd_endpoints: str, etcd_cert: Path | None, etcd_key: Path | None, etcd_ca: Path | None, prefix: str,
         resources: str, page_size: int, endpoint: str | None, config_file: Path | None, fail_if: tuple[str, ...],
         output: str) -> None:
    """Count how every object in etcd is stored (plaintext, aescbc, aesgcm, secretbox, KMS v1, KMS v2 per
    provider and key_id), read-only from one etcd revision; exit 1 if a --fail-if condition is met, 2 if etcd
    cannot be read (docs/rotation.md)."""
    from kleidi.etcd import EtcdOptions, EtcdReader, EtcdUnavailable
    from kleidi.tools import scan as scanning

    conditions = [scanning.Condition.parse(text) for text in fail_if]
    reader = EtcdReader(EtcdOptions(tuple(e for e in etcd_endpoints.split(",") if e.strip()), etcd_cert, etcd_key,
                                    etcd_ca))
    reference = (scanning.reference_from_config(config_file) if config_file is not None
                 else scanning.reference_from_endpoint(_endpoint(endpoint)) if endpoint is not None else None)
    try:
        with scanning.progress_bar(sys.stderr.isatty()) as progress:
            result = scanning.scan(reader, prefix, resources.split(","), page_size, reference, conditions, progress)
    except EtcdUnavailable as exc:
        _fail(exc.message, exc.fix, EXIT_USAGE)
    if output == "json":
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        print_table(f"kleidi scan of {result.prefix}/ at revision {result.revision}",
                    ("resource", "stored as", "provider", "key_id", "kleidi version", "key state", "objects"),
                    scanning.table_rows(result))
        for line in scanning.summary(result):
            click.echo(line)
    if result.failed:
        sys.exit(EXIT_FAILED)


# -- migrate --------------------------------------------------------------------------------------


@main.command()
@click.option("--kubeconfig", type=click.Path(dir_okay=False, path_type=Path),
              help="The kubeconfig to use (default: KUBECONFIG, then ~/.kube/config, then in-cluster).")
@click.option("--context", help="The kubeconfig context (default: its current context).")
@click.option("--resources", default="secrets", show_default=True,
              help="Comma-separated plural resource names to rewrite: secrets,configmaps,widgets.example.com.")
@click.option("--namespace", "-n", help="Only this namespace (default: every namespace).")
@click.option("--qps", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="At most this many apiserver requests a second.")
@click.option("--concurrency", type=click.IntRange(min=1, max=64), default=4, show_default=True,
              help="At most this many updates in flight.")
@click.option("--page-size", type=click.IntRange(min=1, max=10_000), default=250, show_default=True,
              help="Objects per list request.")
@click.option("--retries", type=click.IntRange(min=0, max=100), default=5, show_default=True,
              help="Re-read and retry an object this many times when it changed meanwhile (409).")
@click.option("--state-file", type=click.Path(dir_okay=False, path_type=Path),
              default="kleidi-migrate.state.json", show_default=True,
              help="Where progress is kept (0600) until the run ends.")
@click.option("--resume", is_flag=True, help="Continue the run whose progress is in --state-file.")
@click.option("--stop-after", type=click.IntRange(min=1), metavar="N",
              help="Stop (progress saved, exit 3) after N objects: migrate in batches.")
@click.option("--etcd-endpoints", metavar="URLS",
              help="etcd client URLs, as kube-apiserver's --etcd-servers: prove with a scan that nothing is left "
                   "on an old key_id.")
@click.option("--etcd-cert", type=click.Path(dir_okay=False, path_type=Path),
              help="As kube-apiserver's --etcd-certfile.")
@click.option("--etcd-key", type=click.Path(dir_okay=False, path_type=Path), help="As kube-apiserver's --etcd-keyfile.")
@click.option("--etcd-ca", type=click.Path(dir_okay=False, path_type=Path), help="As kube-apiserver's --etcd-cafile.")
@click.option("--prefix", default="/registry", show_default=True, help="kube-apiserver's --etcd-prefix.")
@click.option("--old-key-id", "old_key_ids", multiple=True, metavar="KEY_ID",
              help="The key_id to prove empty (repeatable); default: every key_id but the current one.")
@click.option("--endpoint", help="A running kleidi's socket: its Status names the current key_id for the proof.")
@output_option
def migrate(kubeconfig: Path | None, context: str | None, resources: str, namespace: str | None, qps: float,
            concurrency: int, page_size: int, retries: int, state_file: Path, resume: bool, stop_after: int | None,
            etcd_endpoints: str | None, etcd_cert: Path | None, etcd_key: Path | None, etcd_ca: Path | None,
            prefix: str, old_key_ids: tuple[str, ...], endpoint: str | None, output: str) -> None:
    """Rewrite every selected object through kube-apiserver so that it is stored with the current key, then
    prove with a scan of etcd that nothing is left on the old key_id (docs/rotation.md)."""
    from kleidi.etcd import EtcdUnavailable
    from kleidi.tools import migrate as mig

    try:
        code = mig.main(mig.CliArgs(
            kubeconfig, context, resources, namespace, qps, concurrency, page_size, retries, state_file, resume,
            stop_after, etcd_endpoints, etcd_cert, etcd_key, etcd_ca, prefix, old_key_ids,
            _endpoint(endpoint) if endpoint is not None else None, output))
    except mig.ApiLost as exc:
        _fail(exc.message, exc.fix, mig.EXIT_STOPPED)
    except (mig.ApiUnavailable, EtcdUnavailable) as exc:
        _fail(exc.message, exc.fix, EXIT_USAGE)
    sys.exit(code)


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


# -- the backends' own commands --------------------------------------------------------------------


def _add_backend_commands() -> None:
    """Each installed backend adds its commands (the local keyring's lifecycle, ``policy vault``)."""
    from kleidi.registry import available, registered_class

    for kind in sorted(available()):
        try:
            cls = registered_class(kind)
        except KleidiError:
            continue  # `kleidi backends` says what is wrong with it
        for group, command in cls.cli_commands():
            command.short_help = command.short_help or _first_sentence(command.help or "")  # uncut, as ours
            target = main if not group else main.commands[group]
            assert isinstance(target, click.Group), group
            target.add_command(command)


# -- deploy ---------------------------------------------------------------------------------------


@main.group("deploy")
def deploy_group() -> None:
    """Print deployment artifacts made for your own config (docs/deploy/)."""


@deploy_group.command("static-pod")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), envvar="KLEIDI_CONFIG",
              help="kleidi's config file on the node, absolute (env KLEIDI_CONFIG) [default: /etc/kleidi/config.yaml; "
                   "the built-in defaults if that file does not exist].")
@click.option("--image", default="localhost/kleidi:0.1.0", show_default=True, help="kleidi's container image.")
@click.option("--namespace", default="kube-system", show_default=True, help="The mirror pod's namespace.")
@click.option("--name", default="kleidi", show_default=True,
              help="The pod's name, e.g. kleidi-vault for a second kleidi while moving to another backend.")
@click.option("--mount", "mounts", multiple=True, metavar="PATH[:ro|:rw]",
              help="Also mount this host path (read-only unless :rw), e.g. a PKCS#11 module's own files. Repeatable.")
@click.option("--supplemental-group", "groups", multiple=True, type=click.IntRange(min=0), metavar="GID",
              help="Add this gid to kleidi's groups, e.g. the group of /dev/tpmrm0. Repeatable.")
def deploy_static_pod(config_file: Path | None, image: str, namespace: str, name: str, mounts: tuple[str, ...],
                      groups: tuple[int, ...]) -> None:
    """Print the static pod manifest for /etc/kubernetes/manifests/kleidi.yaml: kleidi as uid 10001 with no
    capabilities, mounting read-only exactly the files its config reads."""
    from kleidi.deploy.static_pod import DEFAULT_CONFIG, default_config_exists, render_yaml

    args = "".join(f" {flag} {value}" for flag, value in (
        ("--config", config_file), ("--image", None if image == "localhost/kleidi:0.1.0" else image),
        ("--namespace", None if namespace == "kube-system" else namespace),
        ("--name", None if name == "kleidi" else name)) if value is not None)
    args += "".join(f" --mount {m}" for m in mounts) + "".join(f" --supplemental-group {g}" for g in groups)
    path = config_file if config_file is not None else DEFAULT_CONFIG
    settings = load(config_file if config_file is not None or default_config_exists() else None)
    click.echo(render_yaml(settings, path, image, namespace, mounts, groups, args, name), nl=False)


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
@config_option
@backend_flags("config check")
@output_option
def config_check(config_file: Path | None, backend_overrides: dict[str, Any], output: str) -> None:
    """Validate the settings (file, environment, flags) and that the backend can be loaded; print what
    kleidi would use."""
    import yaml

    from kleidi.registry import backend_class

    settings = load(config_file, **backend_overrides)
    backend_class(settings.backend.kind)  # a config whose backend cannot even be imported cannot run
    source = str(config_file) if config_file is not None else "the defaults and environment"
    dumped = settings.model_dump(mode="json")
    if output == "json":
        click.echo(json.dumps({"valid": True, "source": source, "settings": dumped}, indent=2))
        return
    # A comment, so that the output stays YAML.
    click.echo(f"# {source} is valid; the settings kleidi would use:")
    click.echo(yaml.safe_dump(dumped, sort_keys=False), nl=False)


# -- recover --------------------------------------------------------------------------------------


@main.command()
@click.option("--snapshot", type=click.Path(path_type=Path), help="An etcd snapshot file (etcdctl snapshot save).")
@click.option("--data-dir", type=click.Path(path_type=Path), help="An etcd data directory (copied; never touched).")
@click.option("--value-file", type=click.File("rb"),
              help="One raw value as `etcdctl get --print-value-only` writes it ('-' for stdin); needs --key.")
@click.option("--key", help="The etcd key of --value-file, e.g. /registry/secrets/default/db-password.")
@config_option
@click.option("--output-dir", required=True,
              help="A new directory for the objects (created 0700, files 0600); '-' writes them to stdout.")
@click.option("--resource", help="Only this resource: secrets, configmaps, <plural>.<group>.")
@click.option("--namespace", help="Only this namespace.")
@click.option("--name", help="Only objects of this name.")
@click.option("--provider", help="Only values of this KMS v2 provider name (default: every KMS v2 value).")
@click.option("--prefix", default="/registry", show_default=True, help="kube-apiserver's --etcd-prefix.")
@click.option("--reencrypt-to", type=click.Path(dir_okay=False, path_type=Path),
              help="Another kleidi's config: write etcd-ready values sealed for its KEK instead of YAML.")
@click.option("--reencrypt-provider", help="Provider name for --reencrypt-to values (default: each value's own).")
@output_option
def recover(snapshot: Path | None, data_dir: Path | None, value_file: Any, key: str | None, config_file: Path | None,
            output_dir: str, resource: str | None, namespace: str | None, name: str | None, provider: str | None,
            prefix: str, reencrypt_to: Path | None, reencrypt_provider: str | None, output: str) -> None:
    """Decrypt objects from an etcd backup offline with kleidi's backend and write them as Kubernetes YAML.

    No apiserver is needed: a snapshot, a data directory or one raw value, and kleidi's config. The drill
    is docs/disaster-recovery.md."""
    import asyncio
    import signal

    from kleidi.tools import recover as rec

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: stop etcd, delete the partial output

    given = [flag for flag, value in (("--snapshot", snapshot), ("--data-dir", data_dir),
                                      ("--value-file", value_file)) if value is not None]
    if len(given) != 1:
        _fail("give exactly one of --snapshot, --data-dir, --value-file", "see kleidi recover --help", EXIT_USAGE)
    if (key is not None) != (value_file is not None):
        _fail("--key goes with --value-file (and only with it)", "pass both, or use --snapshot/--data-dir", EXIT_USAGE)
    source = rec.SNAPSHOT if snapshot else rec.DATA_DIR if data_dir else rec.VALUE
    report = asyncio.run(rec.recover(
        load(config_file), source=source, path=snapshot or data_dir, key=key,
        value=value_file.read() if value_file is not None else None, output_to=output_dir,
        selection=rec.Selection(resource, namespace, name, provider), prefix=prefix,
        progress=sys.stderr.isatty() and output == "text",
        reencrypt_to=load(reencrypt_to) if reencrypt_to is not None else None, reencrypt_provider=reencrypt_provider))
    if output == "json":
        click.echo(json.dumps(report.as_dict(), indent=2), err=output_dir == rec.STDOUT)
        return
    click.echo(f"recovered {len(report.objects)} objects into {report.output} in {report.seconds:.1f}s", err=True)
    for reason, count in sorted(report.skipped.items()):
        click.echo(f"  skipped {count} ({reason})", err=True)
    if output_dir != rec.STDOUT:
        print_table("kleidi recover", ("resource", "written as", "objects"), report.by_resource())


_add_backend_commands()
