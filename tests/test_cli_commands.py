"""Issue 11's CLI items, each through the real ``kleidi`` console script: exit codes of every command,
``--output json``, durations, resources, endpoints from ``--config``, versions as printed, the
lifecycle commands under a Vault config, ``serve --create-keyring`` that fails, help and version."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import kleidi
from kleidi import registry
from kleidi.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from tests.conftest import keygen, run_kleidi
from tests.support import free_port

ENDPOINT = "unix:///var/run/kleidi/kleidi.sock"
PYTHON_VALUES = re.compile(r"\b(None|True|False)\b|\[\]")


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


def _vault_config(path: Path, **backend: Any) -> Path:
    config = {"backend": {"kind": "vault", "address": "http://127.0.0.1:1", "key": "orders",
                          "transit_mount": "kms/transit", "auth": {"method": "token", "token_env": "T"}, **backend}}
    path.write_text(yaml.safe_dump(config))
    return path


# -- exit codes: one table, every command ---------------------------------------------------------


def test_exit_codes_are_the_documented_ones():
    assert (EXIT_OK, EXIT_FAILED, EXIT_USAGE) == (0, 1, 2)
    table = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    for code, meaning in ((0, "success"), (1, "failed"), (2, "usage")):
        assert re.search(rf"^ *\| {code} \|[^\n]*{meaning}", table, re.MULTILINE | re.IGNORECASE), code


def test_exit_codes_of_every_command(tmp_path: Path, short_dir: Path, kleidi_factory: Any) -> None:
    keyring = tmp_path / "ring.json"
    missing = tmp_path / "missing.json"
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("server:\n  endpont: x\n")
    vault = _vault_config(tmp_path / "vault.yaml")
    proc = kleidi_factory(settings={"audit": {"path": str(short_dir / "audit.jsonl")}})
    cases: list[tuple[int, list[str]]] = [
        (0, ["--help"]), (0, ["--version"]), (0, ["version"]), (0, ["backends"]),
        (2, ["no-such-command"]), (2, ["--no-such-flag"]),
        (0, ["keygen", "--keyring", str(keyring)]),
        (2, ["keygen", "--keyring", str(keyring)]),  # never onto an existing file
        (0, ["rotate", "--keyring", str(keyring)]),
        (2, ["rotate", "--keyring", str(missing)]),
        (2, ["rotate", "--config", str(vault)]),
        (1, ["retire", "v2", "--yes", "--keyring", str(keyring)]),  # the current version: refused by the key state
        (1, ["retire", "v9", "--yes", "--keyring", str(keyring)]),
        (2, ["retire", "version1", "--yes", "--keyring", str(keyring)]),
        (2, ["retire", "v1", "--keyring", str(keyring)]),  # no --yes and no terminal
        (0, ["retire", "v1", "--yes", "--keyring", str(keyring)]),
        (1, ["retire", "1", "--yes", "--keyring", str(keyring)]),  # already retired
        (0, ["keys", "--keyring", str(keyring)]), (0, ["keys", "--keyring", str(keyring), "--output", "json"]),
        (2, ["keys", "--keyring", str(keyring), "--output", "yaml"]), (2, ["keys", "--keyring", str(missing)]),
        (0, ["status", "--endpoint", proc.endpoint]), (1, ["status", "--endpoint", str(short_dir / "none.sock")]),
        (2, ["status", "--endpoint", "http://localhost"]),
        (2, ["status", "--endpoint", proc.endpoint, "--timeout", "3"]),
        (2, ["status", "--config", str(bad_config)]),
        (0, ["encryption-config", "--endpoint", ENDPOINT]),
        (2, ["encryption-config", "--endpoint", ENDPOINT, "--resources", "secret"]),
        (2, ["encryption-config", "--config", str(bad_config)]),
        (0, ["doctor", "--config", str(proc.config_path)]),
        (1, ["doctor", "--config", str(bad_config)]),  # the config check fails: doctor reports it
        (2, ["doctor", "--output", "xml"]),
        (0, ["audit", "verify", "--allow-open", str(short_dir / "audit.jsonl")]),
        (1, ["audit", "verify", str(short_dir / "audit.jsonl")]),  # still running: no clean stop yet
        (2, ["audit", "verify", str(missing)]),
        (0, ["policy", "vault", "--config", str(vault)]), (2, ["policy", "vault", "--keyring", str(keyring)]),
        (2, ["policy", "vault"]),  # the defaults are a local backend
        (0, ["config", "check", "--keyring", str(keyring)]), (2, ["config", "check", "--config", str(bad_config)]),
        (2, ["config", "check", "--config", str(missing)]),
        (0, ["config", "schema"]), (0, ["config", "docs"]),
        (2, ["serve", "--config", str(bad_config)]), (2, ["serve", "--log-level", "verbose"]),
    ]
    wrong = []
    for code, args in cases:
        result = run_kleidi(*args)
        if result.returncode != code or "Traceback" in result.stderr:
            wrong.append(f"kleidi {' '.join(args)}: exit {result.returncode}, expected {code}: {result.stderr[-300:]}")
    assert not wrong, "\n".join(wrong)


# -- --output json everywhere, --json nowhere -----------------------------------------------------


def test_every_machine_readable_command_takes_output_json(tmp_path: Path, short_dir: Path,
                                                          kleidi_factory: Any) -> None:
    proc = kleidi_factory(settings={"audit": {"path": str(short_dir / "audit.jsonl")}})
    commands = {
        "status": ["status", "--endpoint", proc.endpoint],
        "keys": ["keys", "--keyring", str(proc.keyring)],
        "doctor": ["doctor", "--config", str(proc.config_path)],
        "config check": ["config", "check", "--config", str(proc.config_path)],
        "audit verify": ["audit", "verify", "--allow-open", str(short_dir / "audit.jsonl")],
        "backends": ["backends"],
    }
    for name, args in commands.items():
        as_json = _ok(run_kleidi(*args, "--output", "json"))
        json.loads(as_json.stdout)  # one JSON document, nothing else on stdout
        _ok(run_kleidi(*args, "-o", "json"))
        assert run_kleidi(*args, "--json").returncode == EXIT_USAGE, name  # one convention: --json is gone
        text = _ok(run_kleidi(*args))
        if name != "config check":  # its text output is YAML, where [] is an empty list
            assert not PYTHON_VALUES.search(text.stdout), f"{name}: {text.stdout}"
    # Every command with --output (the backends' own included) offers the same choices, the same way.
    outputs = {path: p for path, command in _commands(main) for p in command.params if "--output" in p.opts}
    assert set(commands) <= set(outputs), set(outputs)
    for path, option in outputs.items():
        assert option.opts == ["--output", "-o"] and list(option.type.choices) == ["text", "json"], path


def _commands_with_owner(group: Any, contributed: dict[int, str], prefix: str = "",
                         owner: str | None = None) -> list[tuple[str, Any, str | None]]:
    """Every command under ``group``, with the backend whose cli_commands added it (or its group)."""
    found = []
    for name, command in group.commands.items():
        path = f"{prefix} {name}".strip()
        mine = contributed.get(id(command), owner)
        found += (_commands_with_owner(command, contributed, path, mine) if hasattr(command, "commands")
                  else [(path, command, mine)])
    return found


def _commands(group: Any, prefix: str = "") -> list[tuple[str, Any]]:
    found = []
    for name, command in group.commands.items():
        path = f"{prefix} {name}".strip()
        found += _commands(command, path) if hasattr(command, "commands") else [(path, command)]
    return found


# -- human output: full values, escaped, no Python ------------------------------------------------


def test_keys_prints_full_key_ids_through_a_pipe_on_a_narrow_terminal_setting(tmp_path: Path) -> None:
    keyring = tmp_path / "[bold]ring[/bold].json"  # rich markup in user text must be printed as it is
    keygen(keyring)
    _ok(run_kleidi("rotate", "--keyring", str(keyring)))
    listing = json.loads(_ok(run_kleidi("keys", "--keyring", str(keyring), "-o", "json")).stdout)
    table = _ok(run_kleidi("keys", "--keyring", str(keyring), env={"COLUMNS": "40"}))
    assert "…" not in table.stdout and "..." not in table.stdout
    for row in listing["versions"]:
        line = next(line for line in table.stdout.splitlines() if row["key_id"] in line)
        assert f"v{row['version']}" in line
    assert str(keyring) in table.stdout
    assert not PYTHON_VALUES.search(table.stdout), table.stdout


def test_status_human_output_has_no_python_values(kleidi_factory: Any) -> None:
    proc = kleidi_factory()
    text = _ok(run_kleidi("status", "--endpoint", proc.endpoint)).stdout
    assert text.startswith(f"kleidi at {proc.endpoint} is healthy\n")
    assert not PYTHON_VALUES.search(text), text


# -- durations (item 9) ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["3", "3xyz", "0", "3 s", "s", "-3s", "1d"])
def test_encryption_config_timeout_must_be_a_go_duration(value: str) -> None:
    result = run_kleidi("encryption-config", "--endpoint", ENDPOINT, "--timeout", value)
    assert result.returncode == EXIT_USAGE, result.stdout
    assert result.stdout == ""
    assert "--timeout" in result.stderr and "fix:" in result.stderr
    if value in ("3", "0"):
        assert "fix: write it with a unit, e.g. 3s" in result.stderr


@pytest.mark.parametrize("value", ["3s", "500ms", "1m30s", "2h45m", "1.5s", "250us", "10µs"])
def test_go_durations_are_written_as_given(value: str) -> None:
    result = _ok(run_kleidi("encryption-config", "--endpoint", ENDPOINT, "--timeout", value))
    assert yaml.safe_load(result.stdout)["resources"][0]["providers"][0]["kms"]["timeout"] == value


def test_status_timeout_is_a_go_duration_too(short_dir: Path) -> None:
    for value in ("3", "3xyz"):
        result = run_kleidi("status", "--endpoint", str(short_dir / "x.sock"), "--timeout", value)
        assert result.returncode == EXIT_USAGE and "--timeout" in result.stderr, result.stderr
    assert "write it with a unit, e.g. 3s" in run_kleidi("status", "--timeout", "3").stderr
    assert run_kleidi("status", "--endpoint", str(short_dir / "x.sock"), "--timeout", "1m30s").returncode == 1


@pytest.mark.parametrize("text", ["backend:\n  timeout: 2\n", "backend:\n  timeout: '2'\n",
                                  "server:\n  shutdown_timeout: 10.5\n"])
def test_a_bare_number_in_the_config_is_refused_with_the_fix(tmp_path: Path, text: str) -> None:
    config = tmp_path / "k.yaml"
    config.write_text(text)
    result = run_kleidi("config", "check", "--config", str(config))
    assert result.returncode == EXIT_USAGE
    assert "the unit is missing" in result.stderr and "write it with a unit, e.g. 3s" in result.stderr


def test_a_bare_number_from_the_environment_is_refused(tmp_path: Path) -> None:
    result = run_kleidi("config", "check", env={"KLEIDI_BACKEND__REFRESH_INTERVAL": "5"})
    assert result.returncode == EXIT_USAGE and "write it with a unit" in result.stderr
    assert _ok(run_kleidi("config", "check", "-o", "json", env={"KLEIDI_BACKEND__REFRESH_INTERVAL": "1m30s"}))


def test_the_duration_parser_follows_go() -> None:
    from kleidi.durations import DurationError, format_duration, parse_duration

    for text, seconds in (("3s", 3), ("500ms", 0.5), ("1m30s", 90), ("2h45m", 9900), ("1h", 3600), (".5s", 0.5),
                          ("1.5h", 5400), ("100ns", 1e-7), ("3us", 3e-6), ("3µs", 3e-6), ("1h1m1s1ms", 3661.001)):
        assert parse_duration(text) == pytest.approx(seconds), text
    for bad in ("3", "3.0", 3, 3.5, True, None, "", "s", "3x", "3 s", "3S", "1d", "++3s", "3s3", "720h1s", ".inf"):
        with pytest.raises(DurationError):
            parse_duration(bad)
    assert [format_duration(s) for s in (10, 90, 0.2, 2592000)] == ["10s", "1m30s", "200ms", "720h"]


# -- resources (item 8) ---------------------------------------------------------------------------


@pytest.mark.parametrize(("resources", "fix"), [
    ("secret", "fix: use secrets"), ("configmap", "fix: use configmaps"), ("Secret", "fix: use secrets"),
    ("deployments", "fix: use deployments.apps"), ("deployment", "fix: use deployments.apps"),
    ("deployment.apps", "fix: use deployments.apps"), ("ingress", "fix: use ingresses.networking.k8s.io"),
    ("widgets", "fix: use"), ("secrets.*", "'*.*'"), ("*", "'*.'"), ("events.events.k8s.io", "fix: use events"),
    ("deployments.extensions", "deployments.apps"), ("serviceipallocations", "fix: remove it"),
    ("secrets,*.", "already covers"), ("*.*,secrets", "already covers"), ("*.apps,deployments.apps", "already covers"),
    ("secrets,secrets", "listed twice"), (",", "at least one"),
])
def test_resources_that_would_encrypt_nothing_are_refused(resources: str, fix: str) -> None:
    result = run_kleidi("encryption-config", "--endpoint", ENDPOINT, "--resources", resources)
    assert result.returncode == EXIT_USAGE, result.stdout
    assert result.stdout == ""
    assert "--resources" in result.stderr and fix in result.stderr, result.stderr


@pytest.mark.parametrize("resources", ["secrets", "secrets,configmaps", "*.*", "*.", "*.apps", "deployments.apps",
                                       "widgets.example.com", "events", "secrets,deployments.apps,*.example.com"])
def test_resources_the_apiserver_documents_are_accepted(resources: str) -> None:
    result = _ok(run_kleidi("encryption-config", "--endpoint", ENDPOINT, "--resources", resources))
    assert yaml.safe_load(result.stdout)["resources"][0]["resources"] == resources.split(",")


# -- endpoints from --config, plain paths (item 19) -----------------------------------------------


def test_status_and_encryption_config_read_the_endpoint_from_the_config(kleidi_factory: Any) -> None:
    proc = kleidi_factory()
    status = _ok(run_kleidi("status", "--config", str(proc.config_path)))
    assert f"kleidi at {proc.endpoint} is healthy" in status.stdout
    _ok(run_kleidi("status", env={"KLEIDI_CONFIG": str(proc.config_path)}))
    written = yaml.safe_load(_ok(run_kleidi("encryption-config", "--config", str(proc.config_path))).stdout)
    assert written["resources"][0]["providers"][0]["kms"]["endpoint"] == proc.endpoint
    # --endpoint wins over the config, as every flag does.
    other = yaml.safe_load(_ok(run_kleidi("encryption-config", "--config", str(proc.config_path),
                                          "--endpoint", ENDPOINT)).stdout)
    assert other["resources"][0]["providers"][0]["kms"]["endpoint"] == ENDPOINT


def test_a_plain_socket_path_is_an_endpoint(kleidi_factory: Any) -> None:
    proc = kleidi_factory()
    _ok(run_kleidi("status", "--endpoint", str(proc.socket_path)))
    written = yaml.safe_load(_ok(run_kleidi("encryption-config", "--endpoint", "/run/kleidi/k.sock")).stdout)
    assert written["resources"][0]["providers"][0]["kms"]["endpoint"] == "unix:///run/kleidi/k.sock"
    abstract = yaml.safe_load(_ok(run_kleidi("encryption-config", "--endpoint", "@kleidi")).stdout)
    assert abstract["resources"][0]["providers"][0]["kms"]["endpoint"] == "unix:///@kleidi"


# -- versions as printed (item 16) ----------------------------------------------------------------


@pytest.mark.parametrize("written", ["v1", "1", "V1", " v1 "])
def test_retire_takes_the_version_as_keys_prints_it(tmp_path: Path, written: str) -> None:
    keyring = tmp_path / "ring.json"
    keygen(keyring)
    _ok(run_kleidi("rotate", "--keyring", str(keyring)))
    _ok(run_kleidi("retire", written, "--yes", "--keyring", str(keyring)))
    listing = json.loads(_ok(run_kleidi("keys", "--keyring", str(keyring), "-o", "json")).stdout)
    assert [r["state"] for r in listing["versions"]] == ["retired", "active"]


@pytest.mark.parametrize("written", ["v0", "0", "-1", "vv1", "1.0", "one", "v"])
def test_retire_refuses_what_is_not_a_version(tmp_path: Path, written: str) -> None:
    keyring = tmp_path / "ring.json"
    keygen(keyring)
    result = run_kleidi("retire", "--yes", "--keyring", str(keyring), "--", written)
    assert result.returncode == EXIT_USAGE
    assert "e.g. v2" in result.stderr


# -- lifecycle commands under another backend (item 17) -------------------------------------------


def test_lifecycle_commands_with_a_vault_config_say_what_to_run(tmp_path: Path) -> None:
    config = _vault_config(tmp_path / "vault.yaml", namespace="team-a")
    expected = {
        ("rotate",): "vault write -namespace=team-a -f kms/transit/keys/orders/rotate",
        ("retire", "v3", "--yes"): "vault write -namespace=team-a kms/transit/keys/orders/config "
                                   "min_decryption_version=4",
        ("keys",): "vault read -namespace=team-a kms/transit/keys/orders",
        ("keygen",): "vault write -namespace=team-a -f kms/transit/keys/orders",
    }
    for args, command in expected.items():
        result = run_kleidi(*args, "--config", str(config))
        assert result.returncode == EXIT_USAGE, result.stderr
        assert f"`kleidi {args[0]}` manages the local backend's keyring; this config's backend is vault" \
            in result.stderr
        assert "fix:" in result.stderr and command in result.stderr, result.stderr
    plain = _vault_config(tmp_path / "plain.yaml")  # no namespace: no -namespace flag
    assert "vault write -f kms/transit/keys/orders/rotate" in run_kleidi("rotate", "--config", str(plain)).stderr


# -- serve --create-keyring that fails (item 10) --------------------------------------------------


def _serve_config(short_dir: Path, keyring: Path, port: int) -> Path:
    config = short_dir / "serve.yaml"
    config.write_text(yaml.safe_dump({"server": {"endpoint": f"unix://{short_dir}/k.sock"},
                                      "telemetry": {"address": f"127.0.0.1:{port}"},
                                      "backend": {"kind": "local", "keyring": str(keyring)}}))
    return config


def test_serve_create_keyring_leaves_nothing_when_start_up_fails(short_dir: Path) -> None:
    keyring = short_dir / "new" / "deeper" / "ring.json"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = _serve_config(short_dir, keyring, busy.getsockname()[1])
        result = run_kleidi("serve", "--config", str(config), "--create-keyring")
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "telemetry.address" in result.stderr
    assert f"removed the keyring {keyring}" in result.stderr
    assert not (short_dir / "new").exists()  # nor the directories made for it
    assert not (short_dir / "k.sock").exists()


def test_serve_create_keyring_never_removes_a_keyring_it_did_not_make(short_dir: Path) -> None:
    keyring = short_dir / "ring.json"
    keygen(keyring)
    before = keyring.read_bytes()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run_kleidi("serve", "--config", str(_serve_config(short_dir, keyring, busy.getsockname()[1])),
                            "--create-keyring")
    assert result.returncode == EXIT_USAGE
    assert keyring.read_bytes() == before and "removed" not in result.stderr


def test_serve_create_keyring_keeps_the_keyring_once_started(short_dir: Path) -> None:
    import signal
    import time

    from tests.conftest import KLEIDI

    keyring = short_dir / "made" / "ring.json"
    config = _serve_config(short_dir, keyring, free_port())
    proc = subprocess.Popen([KLEIDI, "serve", "--config", str(config), "--create-keyring"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while run_kleidi("status", "--config", str(config)).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, output
    assert keyring.exists() and "removed" not in output


# -- audit verify --allow-open (item 18) ----------------------------------------------------------


def test_audit_verify_does_not_ask_for_the_flag_it_was_given(short_dir: Path, kleidi_factory: Any) -> None:
    log = short_dir / "audit.jsonl"
    kleidi_factory(settings={"audit": {"path": str(log)}})
    without = run_kleidi("audit", "verify", str(log))
    assert without.returncode == EXIT_FAILED and "(then pass --allow-open)" in without.stderr
    given = _ok(run_kleidi("audit", "verify", "--allow-open", str(log)))
    assert "not a clean stop" in given.stdout and "--allow-open" not in given.stdout


# -- help, version, config check (item 20) --------------------------------------------------------


def test_top_level_help_lists_every_command_uncut() -> None:
    text = _ok(run_kleidi("--help", env={"COLUMNS": "80"})).stdout
    for name, command in main.commands.items():
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        assert not line.rstrip().endswith("..."), line
        assert command.get_short_help_str().split()[-1] in text, name  # the sentence's last word is there
    assert "exit codes" in text.lower()


def test_version_flag_and_command() -> None:
    assert _ok(run_kleidi("--version")).stdout == f"kleidi {kleidi.__version__}\n"
    assert _ok(run_kleidi("-V")).stdout == f"kleidi {kleidi.__version__}\n"
    assert _ok(run_kleidi("version")).stdout.startswith(f"kleidi {kleidi.__version__} ")


def test_log_flags_have_real_help() -> None:
    text = " ".join(_ok(run_kleidi("serve", "--help")).stdout.split())
    assert "--log-level [debug|info|warning|error] Lowest level logged" in text
    assert "--log-format [auto|json|console] json: one object per line" in text


def test_config_check_says_the_file_is_valid(tmp_path: Path) -> None:
    keyring = tmp_path / "ring.json"
    config = tmp_path / "k.yaml"
    config.write_text(f"backend:\n  keyring: {keyring}\n  refresh_interval: 1m30s\n")
    text = _ok(run_kleidi("config", "check", "--config", str(config))).stdout
    assert text.startswith(f"# {config} is valid; the settings kleidi would use:\n")
    assert yaml.safe_load(text)["backend"]["keyring"] == str(keyring)
    doc = json.loads(_ok(run_kleidi("config", "check", "--config", str(config), "-o", "json")).stdout)
    assert doc["valid"] is True and doc["source"] == str(config)
    assert doc["settings"]["backend"]["refresh_interval"] == "1m30s"


def test_what_config_check_prints_is_a_config_kleidi_accepts(tmp_path: Path) -> None:
    """Durations used to be printed as seconds (10.0), which kleidi then refuses: a bare number."""
    printed = _ok(run_kleidi("config", "check")).stdout
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    assert _ok(run_kleidi("config", "check", "--config", str(again))).stdout.splitlines()[1:] == \
        printed.splitlines()[1:]
    assert "shutdown_timeout: 10s" in printed


# -- docs/cli.md covers the CLI -------------------------------------------------------------------


def test_docs_cli_md_documents_every_command_and_flag() -> None:
    """Core commands in docs/cli.md; a backend's own commands in cli.md or in its page, docs/backends/<kind>.md."""
    docs = Path(__file__).parents[1] / "docs"
    text = (docs / "cli.md").read_text()
    contributed = {id(command): kind for kind in registry.available()
                   for _, command in registry.registered_class(kind).cli_commands()}
    missing = []
    for path, command, owner in [("", main, None), *_commands_with_owner(main, contributed)]:
        page = docs / "backends" / f"{owner}.md"
        where = text + (page.read_text() if owner and page.exists() else "")
        if path and f"kleidi {path}" not in where:
            missing.append(f"kleidi {path}")
        for param in command.params:
            for opt in param.opts + param.secondary_opts:
                if opt.startswith("-") and f"`{opt}" not in where:
                    missing.append(f"kleidi {path} {opt}".replace("  ", " "))
    assert not missing, "docs/cli.md does not mention: " + ", ".join(missing)
