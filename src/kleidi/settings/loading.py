"""Loading the settings: defaults < one YAML file < ``KLEIDI_*`` environment variables < CLI flags.

Environment variables name a setting by its path, upper-cased, with ``__`` between levels:
``KLEIDI_SERVER__ENDPOINT``, ``KLEIDI_BACKEND__KEYRING``. ``KLEIDI_CONFIG`` names the file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kleidi.errors import ConfigError
from kleidi.settings.fields import accepts_null
from kleidi.settings.model import KleidiSettings
from kleidi.settings.problems import InvalidSettings, validation_problems

ENV_PREFIX = "KLEIDI_"
ENV_CONFIG_FILE = "KLEIDI_CONFIG"
ENV_SEPARATOR = "__"


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


_SERVICE_LINK = re.compile(r"KLEIDI_(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9]+)*|PORT"
                           r"|PORT_\d+_(?:TCP|UDP|SCTP)(?:_(?:PROTO|PORT|ADDR))?)")
"""The variables Kubernetes injects into every Pod of a namespace with a Service named kleidi
(enableServiceLinks): not settings, so they are ignored; any other unknown KLEIDI_* is an error."""

MAX_CONFIG_BYTES = 1024 * 1024
"""A config file is a few kilobytes; a bound keeps a wrong --config (a log, /dev/zero) from eating memory."""

_MAX_DEPTH = 32
"""kleidi's settings nest 4 levels (backend.auth.method, lists); far deeper is a mistake or an attack."""


def _env_value(name: str, raw: str, nullable: bool) -> Any:
    """Environment values are strings; JSON lists and objects are decoded so they can set lists, and
    ``null`` is null for the settings that accept it (as in YAML; an empty value stays empty)."""
    stripped = raw.strip()
    if nullable and stripped == "null":
        return None
    if stripped[:1] in "[{":
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return raw
        except (ValueError, RecursionError):  # a number past int's 4300 digits, or nesting past the stack
            raise ConfigError(f"environment variable {name} holds JSON with a number too long or nesting too "
                              "deep", fix=f"set {name} to a short list such as [0, 1000]") from None
    return raw


class _Refused(yaml.MarkedYAMLError):
    """A document PyYAML would load but kleidi refuses; carries its own fix."""

    def __init__(self, problem: str, mark: Any, fix: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.fix = fix


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently), nesting deeper
    than _MAX_DEPTH (PyYAML recurses until RecursionError) and integers too long to convert."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                raise _Refused(f"nested more than {_MAX_DEPTH} levels deep",
                               self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                               "kleidi's settings nest a few levels (see docs/configuration.md); remove the "
                               "extra brackets or indentation")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base constructor reports it
                continue
            if first is not key_node:
                raise _Refused(f"duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                               key_node.start_mark, "keep one of them: YAML loaders disagree on which one wins")
        return super().construct_mapping(node, deep)


def _construct_int(loader: yaml.SafeLoader, node: Any) -> Any:
    try:
        return yaml.SafeLoader.construct_yaml_int(loader, node)
    except ValueError:  # past Python's 4300-digit limit for int(str)
        raise _Refused(f"a number with {len(node.value)} digits", node.start_mark,
                       "no setting takes a number that long; correct the value") from None


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load_yaml_file(path: Path, what: str) -> Any:
    """Parse a YAML file kleidi reads (``what``: "config file"), or raise ConfigError naming it and the fix."""
    try:
        with open(path, "rb") as stream:
            raw = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}",
                          fix="check the path, and that kleidi's user may read the file") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB",
                          fix="point at the right file (a config file is a few kilobytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
                          fix="save it as UTF-8, or point at the right file") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        if isinstance(exc, _Refused):
            raise ConfigError(f"{what} {path} is refused{at}: {exc.problem}", fix=exc.fix) from None
        raise ConfigError(f"{what} {path} is not valid YAML{at}: {getattr(exc, 'problem', exc)}",
                          fix="correct the YAML syntax there (indentation, quoting, brackets)") from None
    except RecursionError:  # a backstop: _MAX_DEPTH should stop any nesting first
        raise ConfigError(f"{what} {path} is nested too deeply", fix="remove the extra nesting") from None


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist", fix="create it (see docs/configuration.md) or "
                          f"point --config / {ENV_CONFIG_FILE} at the right file")
    loaded = load_yaml_file(path, "config file")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not a {type(loaded).__name__}",
                          fix="write sections at the top level, e.g. `server:` then `  endpoint: ...` "
                          "(see docs/configuration.md)")
    return loaded


def load_settings(config_file: str | os.PathLike[str] | None = None,
                  overrides: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> KleidiSettings:
    """Build the settings: defaults < YAML file < ``KLEIDI_*`` environment < ``overrides`` (CLI flags).

    ``overrides`` maps dotted paths (``server.endpoint``) to values; ``None`` values are ignored.
    Raises :class:`ConfigError` for a file or variable that cannot be used, and
    :class:`InvalidSettings` (a ConfigError) with one line per problem, each naming the field and its fix.
    """
    environ = os.environ if environ is None else environ
    origins: dict[tuple[str, ...], str] = {}
    data: dict[str, Any] = {}
    file_label = "defaults"
    if config_file is None and environ.get(ENV_CONFIG_FILE):
        config_file = environ[ENV_CONFIG_FILE]
    if config_file is not None:
        path = Path(config_file)
        data = _read_file(path)
        file_label = str(path)
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_FILE or _SERVICE_LINK.fullmatch(name):
            continue
        parts = tuple(p.lower() for p in name[len(ENV_PREFIX):].split(ENV_SEPARATOR))
        if not all(parts):
            raise ConfigError(f"environment variable {name} is not a setting path",
                              fix=f"use {ENV_PREFIX}SECTION{ENV_SEPARATOR}FIELD, e.g. KLEIDI_SERVER__ENDPOINT")
        _set_path(data, parts, _env_value(name, raw, accepts_null(parts)))
        origins[parts] = f"environment variable {name}"
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        parts = tuple(dotted.split("."))
        _set_path(data, parts, value)
        origins[parts] = "command-line flag"
    try:
        return KleidiSettings.model_validate(data)
    except ValidationError as exc:
        raise InvalidSettings(file_label, validation_problems(exc, origins)) from None
