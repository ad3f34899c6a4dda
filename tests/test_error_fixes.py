"""Every error kleidi can produce for a user carries its fix as a field, and the fix is an action.

Two halves: every raise site in src/kleidi of a user-facing error is read (so a new one without a
fix fails here), and every setting of every backend and auth method is fed wrong values, rendered
as ``kleidi config check`` renders them, and checked: a fix that is an action and not the setting's
description (issue #11: ``logging.level ... fix: Lowest level written...``).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from kleidi import config, registry
from kleidi.backends.local import LocalBackendSettings
from kleidi.backends.vault import VaultBackendSettings, VaultTLSSettings
from kleidi.settings.fields import models_in, tag_of

SRC = Path(__file__).parents[1] / "src" / "kleidi"

# Errors whose text reaches a person who can act on it (the CLI, doctor, start-up). Request errors
# (InvalidRequest, DecryptionFailed, ...) go to the apiserver, which cannot act on a fix.
USER_FACING = {"ConfigError", "KeyringError", "InvalidValue", "DurationError"}

# What a fix may start with: a verb the user can carry out (or a command to run).
ACTIONS = {"add", "check", "chmod", "correct", "create", "delete", "find", "give", "if", "install", "keep", "let",
           "list", "lower", "move", "name", "pass", "pip", "point", "put", "quote", "raise", "remove", "rename",
           "restore", "rotate", "run", "save", "set", "start", "use", "write", "manage", "free", "stop", "wait",
           "mount", "make", "choose", "drop", "ask", "grant", "renew", "fix", "re-create", "unset", "close", "re-run"}


def _raise_sites() -> Iterator[tuple[str, ast.Call]]:
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if name in USER_FACING or name == "PydanticCustomError":
                    yield f"{path.relative_to(SRC)}:{node.lineno} {name}", node


def _literal_text(node: ast.AST) -> str:
    return " ".join(n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))


def test_every_user_facing_error_is_raised_with_its_fix_as_a_field() -> None:
    sites = list(_raise_sites())
    assert len(sites) > 80, "the scan found too few raise sites: it no longer reads the code"
    missing, in_message = [], []
    for where, call in sites:
        if where.endswith("PydanticCustomError"):
            ctx = call.args[2] if len(call.args) >= 3 else None
            has_fix = isinstance(ctx, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "fix"
                                                        for k in ctx.keys)
        else:
            has_fix = any(k.arg == "fix" for k in call.keywords) or len(call.args) >= 2
        if not has_fix:
            missing.append(where)
        if call.args and "fix:" in _literal_text(call.args[0]):
            in_message.append(where)  # a fix inside the message cannot be shown as a fix
    assert not missing, f"raised without fix=: {missing}"
    assert not in_message, f"a 'fix:' written into the message instead of fix=: {in_message}"


def test_no_renderer_parses_a_fix_out_of_a_message() -> None:
    offenders = [str(path.relative_to(SRC)) for path in SRC.rglob("*.py")
                 if re.search(r"partition\(\s*['\"]; fix: ", path.read_text())]
    assert not offenders


# -- every setting, rendered ----------------------------------------------------------------------

VAULT = {"kind": "vault", "address": "https://vault.example.com:8200", "key": "k",
         "auth": {"method": "token", "token_env": "VAULT_TOKEN"}}
AUTH_REQUIRED = {"token": {"token_env": "VAULT_TOKEN"}, "approle": {"role_id_env": "R", "secret_id_env": "S"},
                 "jwt": {"role": "r"}, "kubernetes": {"role": "r"}, "cert": {}}
WRONG_VALUES: list[Any] = [{"a": ["mapping"]}, ["a", "list"], "not-a-value-of-this-kind", -5, 10**9, "3", True]

Build = Callable[[str, Any], dict[str, Any]]


def _sections() -> Iterator[tuple[str, type[BaseModel], Build]]:
    for name in ("server", "logging", "telemetry", "audit"):
        model = config.KleidiSettings.model_fields[name].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        yield name, model, lambda field, value, name=name: {name: {field: value}}
    for kind, backend in registry.settings_models().items():  # every installed backend, new ones included
        required = VAULT if kind == "vault" else {"kind": kind, **_required_examples(backend)}
        yield "backend", backend, lambda f, v, r=required: {"backend": {**r, f: v}}
    yield "backend.tls", VaultTLSSettings, lambda f, v: {"backend": {**VAULT, "tls": {f: v}}}
    for model in models_in(VaultBackendSettings.model_fields["auth"].annotation):
        method = str(tag_of(model))
        yield "backend.auth", model, lambda f, v, m=method: {
            "backend": {**VAULT, "auth": {"method": m, **AUTH_REQUIRED[m], f: v}}}


def _required_examples(model: type[BaseModel]) -> dict[str, Any]:
    """A backend section with only its required settings, each set to its documented example."""
    values: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if info.is_required():
            assert info.examples, f"{model.__name__}.{name} is required: give it an example (Field(examples=...))"
            values[name] = info.examples[0]
    return values


def _words(text: str | None) -> str:
    return " ".join((text or "").lower().split())


def _rendered(data: dict[str, Any]) -> list[config.Problem]:
    try:
        config.KleidiSettings.model_validate(data)
    except ValidationError as exc:
        return config.validation_problems(exc)
    return []


def _check(problem: config.Problem, description: str | None) -> None:
    fix = problem.fix
    assert fix and fix.strip() == fix, problem
    assert _words(fix) != _words(description) and _words(fix) not in _words(description), problem
    assert fix.split()[0].lower().rstrip(",:") in ACTIONS, f"the fix does not start with an action: {problem}"
    assert "give a value of type" not in fix, f"no fix derived for this kind of setting yet: {problem}"
    assert not re.search(r"\b(None|True|False)\b|<class ", problem.message + fix), problem


def test_every_wrong_value_of_every_setting_renders_an_action_as_its_fix() -> None:
    rendered = 0
    for section, model, build in _sections():
        for field, info in model.model_fields.items():
            if field in ("kind", "method"):
                continue
            refused = 0
            for value in WRONG_VALUES:
                for problem in _rendered(build(field, value)):
                    # A rule across settings (token_file with token_env) is the section's error.
                    assert problem.where.startswith((f"{section}.{field}", f"{section}:")) or \
                        problem.where == section, (section, field, value, problem)
                    _check(problem, info.description)
                    refused += 1
            assert refused, f"{section}.{field} accepted every one of {WRONG_VALUES}: the test lost its point"
            rendered += refused
    assert rendered > 200


def test_unknown_fields_and_missing_required_settings_render_their_fix() -> None:
    for section, _, build in _sections():
        (problem,) = _rendered(build("no_such_setting", 1))
        assert problem.where == f"{section}.no_such_setting" and problem.message.startswith("unknown field")
        _check(problem, None)
    problems = _rendered({"backend": {"kind": "vault"}})
    assert {p.where for p in problems} == {"backend.address", "backend.key", "backend.auth"}
    for problem in problems:
        assert problem.message == "required, and not set" and problem.fix.startswith("set it, e.g. `")
        _check(problem, None)
    (tag,) = _rendered({"backend": {"kind": "hsm"}})
    assert tag.where == "backend.kind" and tag.fix == f"use one of: {', '.join(sorted(registry.available()))}"


def test_a_typo_suggests_only_fields_of_the_chosen_backend() -> None:
    """Issue #11 item 13: `keyfile:` under kind local suggested `backend.key`, a Vault-only field."""
    (typo,) = _rendered({"backend": {"kind": "local", "keyfile": "/etc/kleidi/keyring.json"}})
    assert typo.where == "backend.keyfile"
    vault_only = set(VaultBackendSettings.model_fields) - set(LocalBackendSettings.model_fields)
    suggested = set(re.findall(r"[a-z_]+", typo.fix.partition("(")[2]))
    assert not suggested & vault_only, typo
    assert "keyring" in suggested, typo

    (misplaced,) = _rendered({"backend": {"kind": "local", "transit_mount": "transit"}})
    assert misplaced.message == "unknown field for kind: local (it is a setting of kind vault)", misplaced
    assert misplaced.fix.startswith("remove it"), misplaced

    (auth,) = _rendered({"backend": {**VAULT, "auth": {"method": "token", "token_env": "T", "role": "r"}}})
    assert "it is a setting of method jwt, kubernetes or cert" in auth.message, auth
    assert "role_id" not in auth.fix, auth


@pytest.mark.parametrize("text, fix", [
    ("logging:\n  level: loud\n", "use one of: debug, info, warning, error"),
    ("server:\n  shutdown_timeout: 10\n", "write it with a unit, e.g. 3s"),
    ("server:\n  socket_mode: 0600\n", 'quote it: "0600"'),
    ("audit:\n  keep: 0\n", "use a whole number from 1 to 1000"),
])
def test_one_mistake_in_a_file_is_rendered_with_its_fix(tmp_path: Path, text: str, fix: str) -> None:
    path = tmp_path / "kleidi.yaml"
    path.write_text(text)
    with pytest.raises(config.InvalidSettings) as caught:
        config.load_settings(path, environ={})
    assert caught.value.fix == fix
    assert str(caught.value).endswith(f"; fix: {fix}")
    assert len(caught.value.problems) == 1 and caught.value.problems[0].fix == fix


# -- the registry ---------------------------------------------------------------------------------


def _entry_points(*values: tuple[str, str]) -> Any:
    from importlib.metadata import EntryPoint

    return lambda group: [EntryPoint(name, value, group) for name, value in values]


def test_two_backends_with_one_name_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from kleidi import registry
    from kleidi.errors import ConfigError

    monkeypatch.setattr(registry, "entry_points", _entry_points(
        ("local", "kleidi.backends.local:LocalBackend"), ("local", "other_package.backend:Impostor")))
    with pytest.raises(ConfigError) as caught:
        registry.backend_class("local")
    assert "two installed backends are named 'local'" in caught.value.message
    assert "other_package.backend:Impostor" in caught.value.message and caught.value.fix


def test_an_entry_point_that_is_not_a_backend_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from kleidi import registry
    from kleidi.errors import ConfigError

    monkeypatch.setattr(registry, "entry_points", _entry_points(("odd", "kleidi.config:KleidiSettings")))
    with pytest.raises(ConfigError) as caught:
        registry.backend_class("odd")
    assert "is not a kleidi Backend class" in caught.value.message and caught.value.fix
    monkeypatch.setattr(registry, "entry_points", _entry_points(("local", "kleidi.backends.local:LocalBackend")))
    assert registry.backend_class("local").__name__ == "LocalBackend"
