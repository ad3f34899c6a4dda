"""Configuration: every mistake stops kleidi with the field and the fix; precedence; schema; docs.

Errors are checked through the real ``kleidi`` binary: exit code 2, a message naming the setting by
its dotted path (or the file / variable at fault) and saying how to fix it, and never a traceback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from kleidi import registry
from kleidi.config import KleidiSettings
from kleidi.config_docs import render_reference
from tests.conftest import keygen, run_kleidi

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "configuration.md"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _assert_config_error(result: Any, *needles: str) -> str:
    """Exit 2, every needle in stderr, a fix, no traceback; returns stderr."""
    stderr: str = result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {stderr}"
    for needle in needles:
        assert needle in stderr, f"{needle!r} not in:\n{stderr}"
    assert "fix" in stderr, f"no fix in:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    return stderr


def _check(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``kleidi config check`` -> the settings it prints."""
    result = run_kleidi("config", "check", *args, env=env)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert isinstance(printed, dict)
    return printed


# -- invalid settings in the file ----------------------------------------------------------------

BAD_SETTINGS = [
    pytest.param("server:\n  endpont: unix:///tmp/x.sock\n", ["server.endpont", "did you mean 'server.endpoint'"],
                 id="unknown-field-suggests"),
    pytest.param("sever:\n  endpoint: unix:///tmp/x.sock\n", ["sever", "did you mean 'server'"],
                 id="unknown-section-suggests"),
    pytest.param("backend:\n  keyrin: /tmp/k.json\n", ["backend.keyrin", "did you mean 'backend.keyring'"],
                 id="unknown-backend-field-suggests"),
    pytest.param("server:\n  socket_mode: abc\n", ["server.socket_mode", "octal"], id="bad-mode"),
    pytest.param("server:\n  socket_mode: '99999'\n", ["server.socket_mode"], id="mode-out-of-range"),
    pytest.param("server:\n  endpoint: tcp://x\n", ["server.endpoint", "unix://"], id="tcp-endpoint"),
    pytest.param("server:\n  endpoint: http://localhost/x.sock\n", ["server.endpoint", "unix://"], id="http-endpoint"),
    pytest.param("server:\n  endpoint: unix://tmp/x\n", ["server.endpoint", "host part", "unix:///tmp/x"],
                 id="endpoint-with-host"),
    pytest.param("server:\n  endpoint: 'unix:///'\n", ["server.endpoint"], id="endpoint-without-path"),
    pytest.param("server:\n  endpoint: 'unix:///@'\n", ["server.endpoint"], id="empty-abstract-name"),
    pytest.param("backend:\n  refresh_interval: soon\n", ["backend.refresh_interval", "duration"],
                 id="bad-duration"),
    pytest.param("backend:\n  refresh_interval: 0\n", ["backend.refresh_interval"], id="zero-duration"),
    pytest.param("backend:\n  refresh_interval: 0s\n", ["backend.refresh_interval"], id="zero-duration-unit"),
    pytest.param("backend:\n  probe_interval: -1\n", ["backend.probe_interval"], id="negative-duration"),
    pytest.param("backend:\n  timeout: -5s\n", ["backend.timeout"], id="negative-duration-unit"),
    pytest.param("server:\n  shutdown_timeout: true\n", ["server.shutdown_timeout"], id="bool-duration"),
    pytest.param("backend:\n  kind: hsm9000\n", ["backend.kind", "'hsm9000'", ", ".join(sorted(registry.available()))],
                 id="unknown-backend"),
    pytest.param("logging:\n  level: verbose\n", ["logging.level"], id="bad-log-level"),
    pytest.param("server:\n  enable_v1beta1: perhaps\n", ["server.enable_v1beta1"], id="bad-bool"),
    pytest.param("server: unix:///tmp/x.sock\n", ["server"], id="section-not-a-mapping"),
    pytest.param("server:\n  allowed_uids: [no-such-user-kleidi]\n",
                 ["server.allowed_uids", "no user named 'no-such-user-kleidi'", "fix"], id="unknown-allowed-user"),
    pytest.param("server:\n  allowed_gids: [no-such-group-kleidi]\n",
                 ["server.allowed_gids", "no group named 'no-such-group-kleidi'", "fix"], id="unknown-allowed-group"),
    # A YAML integer used to be read as octal digits: 600 became 0o1130 (group may connect) and the
    # YAML 1.1 octal 0600 became 0o600 by luck; both are refused, with the quoting fix.
    pytest.param("server:\n  socket_mode: 600\n", ["server.socket_mode", 'quote it: "0600"'], id="mode-as-integer"),
    pytest.param("server:\n  socket_mode: 0600\n", ["server.socket_mode", 'quote it: "0600"'],
                 id="mode-as-yaml-octal-integer"),
    pytest.param("server:\n  socket_mode: '0o7777'\n", ["server.socket_mode", "setuid, setgid or sticky"],
                 id="mode-with-special-bits"),
    pytest.param("server:\n  socket_mode: '1660'\n", ["server.socket_mode", "setuid, setgid or sticky"],
                 id="mode-sticky"),
    pytest.param("server:\n  socket_mode: '0700'\n", ["server.socket_mode", "execute bits"], id="mode-with-exec"),
    pytest.param("server:\n  socket_mode: '0666'\n  authenticate_callers: false\n",
                 ["server: socket_mode 0666 lets every user", "authenticate_callers: true"],
                 id="mode-for-others-without-caller-check"),
    pytest.param("server:\n  socket_mode: '0604'\n  authenticate_callers: false\n",
                 ["socket_mode 0604", '"0660" with socket_group'], id="mode-read-for-others-without-caller-check"),
    pytest.param("telemetry:\n  address: alice:pw@127.0.0.1:9464\n", ["telemetry.address", "user name or password"],
                 id="telemetry-address-with-credentials"),
    pytest.param("server:\n  endpoint: unix://alice:pw@host/x.sock\n", ["server.endpoint", "user name or password"],
                 id="endpoint-with-credentials"),
    pytest.param("backend:\n  kind: vault\n  address: https://vault:8200/?token=x\n  key: k\n"
                 "  auth: {method: token, token_env: T}\n", ["backend.address", "without ?query"],
                 id="vault-address-with-query"),
    pytest.param("backend:\n  kind: vault\n  address: vault.example.com:8200\n  key: k\n"
                 "  auth: {method: token, token_env: T}\n", ["backend.address", "http:// or https://"],
                 id="vault-address-without-scheme"),
    pytest.param("server:\n  shutdown_timeout: .inf\n", ["server.shutdown_timeout", "at most 30 days"],
                 id="infinite-duration"),
    pytest.param("backend:\n  refresh_interval: " + "9" * 400 + "\n", ["backend.refresh_interval", "at most 30 days"],
                 id="huge-duration"),
    pytest.param("backend:\n  probe_interval: 1000000h\n", ["backend.probe_interval", "at most 30 days"],
                 id="duration-over-30-days"),
]


@pytest.mark.parametrize(("text", "needles"), BAD_SETTINGS)
def test_invalid_setting_names_field_and_fix(tmp_path, text, needles):
    config = _write(tmp_path / "kleidi.yaml", text)
    stderr = _assert_config_error(run_kleidi("serve", "--config", str(config)), *needles)
    assert str(config) in stderr  # which file was wrong


@pytest.mark.parametrize(("given", "octal"), [("0600", 0o600), ("600", 0o600), ("0o660", 0o660), ("0660", 0o660),
                                               (" 0640 ", 0o640), ("0666", 0o666)])
def test_socket_modes_as_octal_strings(tmp_path, given, octal):
    config = _write(tmp_path / "kleidi.yaml", f"server:\n  socket_mode: '{given}'\n")
    assert _check(tmp_path, "--config", str(config))["server"]["socket_mode"] == f"{octal:04o}"
    # The environment gives strings, read the same way.
    assert _check(tmp_path, env={"KLEIDI_SERVER__SOCKET_MODE": given})["server"]["socket_mode"] == f"{octal:04o}"


def test_several_mistakes_are_all_reported(tmp_path):
    config = _write(tmp_path / "kleidi.yaml",
                    "server:\n  endpont: x\n  socket_mode: abc\nbackend:\n  refresh_interval: soon\n")
    _assert_config_error(run_kleidi("serve", "--config", str(config)),
                         "server.endpont", "server.socket_mode", "backend.refresh_interval")


def test_relative_socket_path_is_refused(tmp_path):
    keyring = tmp_path / "keyring.json"
    keygen(keyring)
    config = _write(tmp_path / "kleidi.yaml", f"server:\n  endpoint: unix:relative.sock\n"
                                              f"backend:\n  keyring: {keyring}\n")
    _assert_config_error(run_kleidi("serve", "--config", str(config)), "server.endpoint", "absolute")
    assert not (tmp_path / "relative.sock").exists()


# -- the file itself -----------------------------------------------------------------------------


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    _assert_config_error(run_kleidi("serve", "--config", str(missing)), str(missing), "does not exist")


def test_missing_config_file_named_by_env(tmp_path):
    missing = tmp_path / "nope.yaml"
    _assert_config_error(run_kleidi("serve", env={"KLEIDI_CONFIG": str(missing)}), str(missing), "KLEIDI_CONFIG")


def test_invalid_yaml(tmp_path):
    config = _write(tmp_path / "kleidi.yaml", "server:\n  endpoint: [unclosed\n")
    _assert_config_error(run_kleidi("serve", "--config", str(config)), str(config), "not valid YAML", "line")


@pytest.mark.parametrize("text", ["- server\n- backend\n", "just a string\n"], ids=["list", "scalar"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    config = _write(tmp_path / "kleidi.yaml", text)
    _assert_config_error(run_kleidi("serve", "--config", str(config)), str(config), "mapping")


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys silently; another tool reading the file may keep the first."""
    config = _write(tmp_path / "kleidi.yaml", "server:\n  endpoint: unix:///run/a.sock\n  socket_mode: '0600'\n"
                                              "  endpoint: unix:///run/b.sock\n")
    for command in (("serve",), ("config", "check")):
        stderr = _assert_config_error(run_kleidi(*command, "--config", str(config)), str(config),
                                      "duplicate key 'endpoint'", "line 4", "first at line 2", "keep one of them")
        assert "b.sock" not in stderr
    sections = _write(tmp_path / "sections.yaml", "logging:\n  level: debug\nserver: {}\nlogging:\n  level: error\n")
    _assert_config_error(run_kleidi("config", "check", "--config", str(sections)), "duplicate key 'logging'", "line 4")


def test_equal_keys_in_different_sections_and_merge_keys_are_fine(tmp_path):
    config = _write(tmp_path / "kleidi.yaml", "x-common: &t {timeout: 1s}\nbackend:\n  <<: *t\n  timeout: 2s\n"
                                              "server:\n  shutdown_timeout: 3s\n")
    text = config.read_text().replace("x-common: &t {timeout: 1s}\n", "")
    plain = _write(tmp_path / "plain.yaml", text.replace("  <<: *t\n", ""))
    assert _check(tmp_path, "--config", str(plain))["backend"]["timeout"] == "2s"
    # An explicit key next to a merge key (<<) overrides it: that is not a duplicate.
    merged = _write(tmp_path / "merged.yaml", "backend:\n  <<: {timeout: 1s}\n  timeout: 2s\n")
    assert _check(tmp_path, "--config", str(merged))["backend"]["timeout"] == "2s"


def _pathological(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A config file that used to crash the loader (or be read whole), and what the refusal must say."""
    path = tmp_path / f"{kind}.yaml"
    if kind == "deep":
        path.write_text("server: " + "[" * 50_000 + "\n")  # RecursionError in PyYAML's composer
        return path, "nested more than 32 levels deep"
    if kind == "not-utf8":
        path.write_bytes(b"server:\n  endpoint: unix:///run/k\xe9.sock\n")  # Latin-1
        return path, "is not UTF-8 text (byte 0xe9 at offset 33)"
    if kind == "long-int":
        path.write_text("audit:\n  keep: " + "9" * 5000 + "\n")  # ValueError: exceeds the limit ... conversion
        return path, "line 2, column 9: a number with 5000 digits"
    assert kind == "too-big"
    path.write_text("logging:\n  level: info\n" + "# padding\n" * 120_000)  # valid YAML, 1.2 MB
    return path, "is larger than 1024 KiB"


@pytest.mark.parametrize("kind", ["deep", "not-utf8", "long-int", "too-big"])
@pytest.mark.parametrize("command", ["serve", "config check", "doctor"])
def test_pathological_config_files_are_config_errors_not_tracebacks(tmp_path, kind, command):
    path, needle = _pathological(tmp_path, kind)
    result = run_kleidi(*command.split(), "--config", str(path), *(["--output", "json"] if command == "doctor" else []))
    assert "Traceback" not in result.stderr, result.stderr
    if command == "doctor":  # doctor reports the refusal as its failed config check, the fix in its own field
        assert result.returncode == 1, result.stdout + result.stderr
        check = json.loads(result.stdout)[0]
        assert check["name"] == "config" and check["result"] == "FAIL"
        assert str(path) in check["detail"] and needle in check["detail"] and check["fix"], check
        assert "fix:" not in check["detail"], check
    else:
        _assert_config_error(result, str(path), needle)


def test_pathological_json_in_an_environment_variable(tmp_path):
    for value in ("[" + "9" * 5000 + "]", "[" * 100_000):
        result = run_kleidi("config", "check", env={"KLEIDI_SERVER__ALLOWED_GIDS": value})
        _assert_config_error(result, "environment variable KLEIDI_SERVER__ALLOWED_GIDS", "[0, 1000]")


def test_a_long_value_is_cut_short_in_the_error(tmp_path):
    result = run_kleidi("config", "check", env={"KLEIDI_AUDIT__KEEP": "9" * 5000})
    stderr = _assert_config_error(result, "audit.keep", "(5000 characters)")
    assert len(stderr) < 1000, stderr


def test_empty_file_means_defaults(tmp_path):
    config = _write(tmp_path / "kleidi.yaml", "")
    assert _check(tmp_path, "--config", str(config)) == KleidiSettings().model_dump(mode="json")


# -- environment and flags -----------------------------------------------------------------------


def test_unknown_env_section_is_an_error(tmp_path):
    result = run_kleidi("serve", env={"KLEIDI_SERVR__ENDPOINT": "unix:///tmp/x.sock"})
    stderr = _assert_config_error(result, "servr", "did you mean 'server'")
    # The user must learn which variable is wrong: no file was given, the variable is the culprit.
    assert "KLEIDI_SERVR__ENDPOINT" in stderr, stderr


def test_unknown_env_field_is_an_error(tmp_path):
    result = run_kleidi("serve", env={"KLEIDI_SERVER__ENDPONT": "unix:///tmp/x.sock"})
    _assert_config_error(result, "server.endpont", "KLEIDI_SERVER__ENDPONT", "did you mean 'server.endpoint'")


def test_bad_env_value_names_the_variable(tmp_path):
    result = run_kleidi("serve", env={"KLEIDI_BACKEND__REFRESH_INTERVAL": "soon"})
    _assert_config_error(result, "backend.refresh_interval", "environment variable KLEIDI_BACKEND__REFRESH_INTERVAL")


def test_env_var_that_is_not_a_path(tmp_path):
    result = run_kleidi("serve", env={"KLEIDI_SERVER____ENDPOINT": "unix:///tmp/x.sock"})
    _assert_config_error(result, "KLEIDI_SERVER____ENDPOINT", "KLEIDI_SECTION__FIELD")


def test_bad_flag_value_names_the_flag(tmp_path):
    result = run_kleidi("serve", "--endpoint", "tcp://127.0.0.1:9000")
    _assert_config_error(result, "server.endpoint", "command-line flag")


def test_null_in_the_environment_is_null_where_a_setting_accepts_it(tmp_path):
    """docs: "null turns the listener off"; from the environment that used to be the string "null", refused."""
    printed = _check(tmp_path, env={"KLEIDI_TELEMETRY__ADDRESS": "null", "KLEIDI_SERVER__SOCKET_GROUP": "null",
                                    "KLEIDI_AUDIT__PATH": "null", "KLEIDI_SERVER__ALLOWED_UIDS": "null"})
    assert printed["telemetry"]["address"] is None
    assert printed["server"]["socket_group"] is None
    assert printed["audit"]["path"] is None
    assert printed["server"]["allowed_uids"] is None
    # Where null is not allowed, "null" stays a string and is checked as one (a Transit key may be named null).
    vault = {"KLEIDI_BACKEND__KIND": "vault", "KLEIDI_BACKEND__ADDRESS": "https://vault:8200",
             "KLEIDI_BACKEND__KEY": "null", "KLEIDI_BACKEND__AUTH__METHOD": "token",
             "KLEIDI_BACKEND__AUTH__TOKEN_ENV": "VAULT_TOKEN"}
    assert _check(tmp_path, env=vault)["backend"]["key"] == "null"
    _assert_config_error(run_kleidi("config", "check", env={"KLEIDI_SERVER__ENDPOINT": "null"}),
                         "server.endpoint", "unix://", "KLEIDI_SERVER__ENDPOINT")
    # An empty value is an empty value, not null: the setting says what is wrong with it.
    _assert_config_error(run_kleidi("config", "check", env={"KLEIDI_TELEMETRY__ADDRESS": ""}),
                         "telemetry.address", "host:port")


KUBERNETES_SERVICE_LINKS = {  # what the kubelet injects for `kind: Service, name: kleidi` with two ports
    "KLEIDI_SERVICE_HOST": "10.96.0.12",
    "KLEIDI_SERVICE_PORT": "9464",
    "KLEIDI_SERVICE_PORT_METRICS": "9464",
    "KLEIDI_SERVICE_PORT_GRPC_PROXY": "8443",
    "KLEIDI_PORT": "tcp://10.96.0.12:9464",
    "KLEIDI_PORT_9464_TCP": "tcp://10.96.0.12:9464",
    "KLEIDI_PORT_9464_TCP_PROTO": "tcp",
    "KLEIDI_PORT_9464_TCP_PORT": "9464",
    "KLEIDI_PORT_9464_TCP_ADDR": "10.96.0.12",
    "KLEIDI_PORT_8443_UDP": "udp://10.96.0.12:8443",
    "KLEIDI_PORT_8443_SCTP_ADDR": "10.96.0.12",
}


def test_kubernetes_service_link_variables_are_ignored(tmp_path):
    printed = _check(tmp_path, env={**KUBERNETES_SERVICE_LINKS, "KLEIDI_LOGGING__LEVEL": "debug"})
    assert printed["logging"]["level"] == "debug"
    assert printed == {**KleidiSettings().model_dump(mode="json"), "logging": printed["logging"]}


@pytest.mark.parametrize("name", ["KLEIDI_PORTS", "KLEIDI_SERVICE", "KLEIDI_PORT_X_TCP", "KLEIDI_PORT_9464_HTTP",
                                  "KLEIDI_SERVICE_HOSTNAME", "KLEIDI_PORT_9464_TCP_HOST", "KLEIDI_SERVICE_PORT__X"])
def test_other_unknown_variables_still_fail(tmp_path, name):
    _assert_config_error(run_kleidi("config", "check", env={name: "1"}), f"environment variable {name}")


def test_env_overrides_take_effect(tmp_path):
    config = _write(tmp_path / "kleidi.yaml", "logging:\n  level: warning\nserver:\n  socket_mode: '0600'\n")
    printed = _check(tmp_path, "--config", str(config), env={
        "KLEIDI_SERVER__SOCKET_MODE": "0660",
        "KLEIDI_SERVER__ENDPOINT": "unix:///run/kleidi/env.sock",
        "KLEIDI_SERVER__ENABLE_V1BETA1": "true",
        "KLEIDI_BACKEND__REFRESH_INTERVAL": "2s",
        "KLEIDI_BACKEND__TIMEOUT": "500ms",
        "KLEIDI_LOGGING__LEVEL": "debug",
    })
    assert printed["server"]["socket_mode"] == "0660"
    assert printed["server"]["endpoint"] == "unix:///run/kleidi/env.sock"
    assert printed["server"]["enable_v1beta1"] is True
    assert printed["backend"]["refresh_interval"] == "2s"
    assert printed["backend"]["timeout"] == "500ms"
    assert printed["logging"]["level"] == "debug"
    # Untouched settings keep their defaults.
    assert printed["backend"]["probe_interval"] == "30s"


def test_precedence_defaults_file_env_flag(tmp_path):
    config = _write(tmp_path / "kleidi.yaml", "backend:\n  keyring: /from/file.json\n  probe_interval: 7s\n")
    env = {"KLEIDI_BACKEND__KEYRING": "/from/env.json"}

    def keyring(*args: str, env: dict[str, str] | None = None) -> str:
        return str(_check(tmp_path, *args, env=env)["backend"]["keyring"])

    assert keyring() == "/var/lib/kleidi/keyring.json"
    assert keyring(env=env) == "/from/env.json"
    assert keyring("--config", str(config)) == "/from/file.json"
    assert keyring("--config", str(config), env=env) == "/from/env.json"
    assert keyring("--config", str(config), "--keyring", "/from/flag.json", env=env) == "/from/flag.json"
    # Layers merge field by field: the file's other settings survive an env override of one field.
    assert _check(tmp_path, "--config", str(config), env=env)["backend"]["probe_interval"] == "7s"


def test_config_file_from_env_and_flag(tmp_path):
    by_env = _write(tmp_path / "env.yaml", "logging:\n  level: error\n")
    by_flag = _write(tmp_path / "flag.yaml", "logging:\n  level: debug\n")
    assert _check(tmp_path, env={"KLEIDI_CONFIG": str(by_env)})["logging"]["level"] == "error"
    assert _check(tmp_path, "--config", str(by_flag), env={"KLEIDI_CONFIG": str(by_env)})["logging"]["level"] == "debug"


# -- the keyring, checked at start-up ------------------------------------------------------------


def test_missing_keyring_says_keygen(short_dir):
    keyring = short_dir / "missing.json"
    sock = short_dir / "k.sock"
    result = run_kleidi("serve", "--keyring", str(keyring), "--endpoint", f"unix://{sock}")
    _assert_config_error(result, str(keyring), "kleidi keygen")
    assert not keyring.exists()
    assert not sock.exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_keyring_readable_by_others_is_refused(short_dir, mode):
    keyring = short_dir / "keyring.json"
    keygen(keyring)
    keyring.chmod(mode)
    sock = short_dir / "k.sock"
    result = run_kleidi("serve", "--keyring", str(keyring), "--endpoint", f"unix://{sock}")
    _assert_config_error(result, str(keyring), f"{mode:04o}", f"chmod 600 {keyring}")
    assert not sock.exists()


# -- schema, reference docs, defaults ------------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    """What `kleidi config schema` prints."""
    result = run_kleidi("config", "schema")
    assert result.returncode == 0, result.stderr
    printed: dict[str, Any] = json.loads(result.stdout)
    return printed


def test_schema_is_valid_json_schema(schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["properties"]) == {"server", "logging", "telemetry", "audit", "backend"}


def test_default_settings_validate_against_schema(schema):
    validator = jsonschema.Draft202012Validator(schema)
    defaults = KleidiSettings().model_dump(mode="json")
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(defaults)]
    assert errors == []


def test_every_default_in_the_schema_is_valid_for_its_own_property(schema):
    """An editor fills in the schema's defaults: socket_mode's used to be 384, which kleidi refuses."""
    checked = 0
    for model in [schema, *schema["$defs"].values()]:
        for name, prop in model.get("properties", {}).items():
            if "default" not in prop:
                continue
            sub = {"$defs": schema["$defs"], **{k: v for k, v in prop.items() if k != "default"}}
            errors = list(jsonschema.Draft202012Validator(sub).iter_errors(prop["default"]))
            assert errors == [], f"{name}: default {prop['default']!r}: {errors[0].message}"
            checked += 1
    assert checked > 30


def test_documented_value_forms_validate_against_schema(schema):
    """What docs/configuration.md tells people to write (durations with units, octal strings) is valid."""
    validator = jsonschema.Draft202012Validator(schema)
    config = {
        "server": {"endpoint": "unix:///run/kleidi.sock", "socket_mode": "0660", "socket_group": "kube",
                   "shutdown_timeout": "10s"},
        "logging": {"level": "debug", "format": "json"},
        "backend": {"kind": "local", "keyring": "/var/lib/kleidi/keyring.json", "refresh_interval": "500ms",
                    "probe_interval": "1m", "timeout": "2s"},
    }
    KleidiSettings.model_validate(config)  # kleidi accepts it ...
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(config)]
    assert errors == []  # ... and so must the schema


@pytest.mark.parametrize("config", [
    {"server": {"endpont": "unix:///x.sock"}},
    {"backend": {"kind": "vault"}},
    {"logging": {"level": "verbose"}},
    {"backend": {"refresh_interval": -1}},
    {"backend": {"timeout": 0}},
    {"server": {"socket_mode": 99999}},
], ids=["unknown-field", "unknown-kind", "bad-level", "negative-duration", "zero-duration", "mode-too-big"])
def test_schema_rejects_what_kleidi_rejects(schema, config):
    with pytest.raises(ValidationError):
        KleidiSettings.model_validate(config)
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(config)) != []


def test_configuration_reference_is_up_to_date():
    assert DOCS.exists(), "generate it: kleidi config docs > docs/configuration.md"
    assert DOCS.read_text() == render_reference(), \
        "docs/configuration.md is out of date; regenerate it: kleidi config docs > docs/configuration.md"


def test_config_docs_command_prints_the_reference():
    result = run_kleidi("config", "docs")
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_reference()


EXPECTED_DEFAULTS: dict[str, Any] = {
    "server": {
        "endpoint": "unix:///var/run/kleidi/kleidi.sock",
        "socket_mode": 0o600,
        "socket_group": None,
        "enable_v1beta1": False,
        "status_version": "v2",
        "shutdown_timeout": 10.0,
        "envelope_format": 1,
        "authenticate_callers": True,
        "allowed_uids": None,
        "allowed_gids": [],
        "event_loop": "uvloop",
        "lock_memory": False,
        "runtime_dir": None,
        "max_refused_connections": 64,
        "refused_timeout": 2.0,
        "refusal_report_interval": 60.0,
    },
    "logging": {
        "level": "info",
        "format": "auto",
    },
    "telemetry": {
        "address": "127.0.0.1:9464",
        "allow_non_loopback": False,
        "max_connections": 32,
        "request_timeout": 5.0,
    },
    "audit": {
        "path": None,
        "hmac_key_file": None,
        "fsync": "interval",
        "max_bytes": 100 * 1024 * 1024,
        "keep": 5,
        "on_failure": "fail_closed",
        "anchor_path": None,
    },
    "backend": {
        "kind": "local",
        "refresh_interval": 5.0,
        "probe_interval": 30.0,
        "timeout": 2.0,
        "keyring": Path("/var/lib/kleidi/keyring.json"),
        "create_if_missing": False,
    },
}


def test_every_default_is_pinned():
    """Changing a default is a user-visible change: it must be made here on purpose, too."""
    settings = KleidiSettings()
    actual = {section: {name: getattr(getattr(settings, section), name)
                        for name in type(getattr(settings, section)).model_fields}
              for section in type(settings).model_fields}
    assert actual == EXPECTED_DEFAULTS


def test_every_default_is_documented():
    """Each setting's line in docs/configuration.md shows its default and its environment variable."""
    text = DOCS.read_text()
    defaults = KleidiSettings().model_dump(mode="json")
    for section, fields in EXPECTED_DEFAULTS.items():
        for name in fields:
            env = f"KLEIDI_{section.upper()}__{name.upper()}"
            default = re.escape(json.dumps(defaults[section][name]))
            pattern = rf"### `{section}\.{name}`\n\n[^\n]* · default `{default}` · env `{env}`"
            assert re.search(pattern, text), f"{section}.{name}: default or env var not documented"
