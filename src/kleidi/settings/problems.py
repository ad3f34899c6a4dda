"""Error messages for settings that fail validation: each names the setting, what set it, and the fix."""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from kleidi.errors import ConfigError
from kleidi.settings.fields import allows_none, members_of, models_in, tag_field, tag_of
from kleidi.settings.model import KleidiSettings
from kleidi.settings.types import MODE_FIX, NO_INPUT_ERRORS, check_env_name, check_url, parse_mode


class _Located(NamedTuple):
    """Where a pydantic error location points, in the settings as the user writes them."""

    path: tuple[str, ...]
    """The setting's path, without the union tags pydantic inserts ("local", "approle") or list indexes."""
    shown: str
    """The dotted path shown in the message, list items as ``[0]``."""
    info: FieldInfo | None
    """The field there; None for an unknown field."""
    siblings: list[str]
    """The fields valid next to it: of the chosen backend or auth method only, not of the others."""
    chosen: type[BaseModel] | None
    """The backend or auth method chosen where the path ends in one's fields, else None."""
    others: list[type[BaseModel]]
    """The other members of that union (the backends or methods not chosen)."""
    in_union: bool
    """The location goes past the field into the members of a union of plain types (``int | str``)."""
    item: bool
    """The location is an item of the list the field holds."""


def _locate(loc: tuple[int | str, ...]) -> _Located:
    candidates: list[type[BaseModel]] = [KleidiSettings]
    path: list[str] = []
    shown = ""
    info: FieldInfo | None = None
    siblings = sorted(KleidiSettings.model_fields)
    chosen: type[BaseModel] | None = None
    others: list[type[BaseModel]] = []
    for part in loc:
        if isinstance(part, int):  # an item of a list setting: the error is the list's
            shown += f"[{part}]"
            continue
        tagged = [m for m in candidates if tag_of(m) == part]
        if tagged and len(candidates) > 1:  # the tag of the discriminated union member pydantic chose
            chosen, others = tagged[0], [m for m in candidates if m is not tagged[0]]
            candidates = tagged
            continue
        if info is not None and not candidates:  # past a plain field: the members of a union such as int | str
            return _Located(tuple(path), shown, info, siblings, chosen, others, True, shown.endswith("]"))
        siblings = sorted({name for model in candidates for name in model.model_fields})
        found = [model.model_fields[part] for model in candidates if part in model.model_fields]
        path.append(part)
        shown = f"{shown}.{part}" if shown else part
        if not found:
            return _Located(tuple(path), shown, None, siblings, chosen, others, False, False)
        info = found[0]
        candidates = [m for f in found for m in models_in(f.annotation)]
        chosen, others = None, []  # inside the field now, no longer among the chosen member's fields
    return _Located(tuple(path), shown, info, siblings, chosen, others, False, shown.endswith("]"))


def _inline(value: Any) -> str:
    """A value as it is written in the YAML file, on one line."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _example(info: FieldInfo) -> Any:
    """A valid value for the field: its first example, else its default when that is a plain value."""
    if info.examples:
        return info.examples[0]
    default = info.get_default(call_default_factory=True)
    return default if isinstance(default, str | Path | int) and not isinstance(default, bool) else None


def _bounds(metadata: list[Any]) -> tuple[Any, Any]:
    low = next((m.ge for m in metadata if hasattr(m, "ge")), None)
    if low is None:
        low = next((m.gt + 1 for m in metadata if hasattr(m, "gt")), None)
    high = next((m.le for m in metadata if hasattr(m, "le")), None)
    return low, high


def _type_fix(info: FieldInfo, item: bool = False) -> str:
    """What to write instead, derived from the field's type and constraints (never from its description);
    ``item``: for one item of the list the field holds."""
    validators = {getattr(m, "func", None) for m in info.metadata}
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    or_null = ", or null" if allows_none(info.annotation) else ""
    if extra.get("x-kleidi-type") == "duration":
        return "write a duration greater than 0, such as 500ms, 5s or 1m"
    if parse_mode in validators:
        return MODE_FIX
    if check_url in validators:
        return "write the server's URL such as https://vault.example.com:8200"
    if check_env_name in validators:
        return f"give the name of an environment variable, such as VAULT_TOKEN{or_null}"
    members = members_of(info.annotation)
    models = models_in(info.annotation)
    if len(models) > 1:
        tags = [t for t in map(tag_of, models) if t]
        tag = tag_field(models[0])
        return f"write it as a mapping that starts with `{tag}:` ({', '.join(tags)}) and that {tag}'s settings"
    if models:
        first, field = next(iter(models[0].model_fields.items()))
        value = _example(field)
        shown = f"`{first}: {_inline(value)}`" if value is not None else f"`{first}: ...`"
        return f"write it as a mapping, with its settings indented below it (e.g. {shown})"
    example = _example(info)
    such_as = f", such as {_inline(example)}" if example is not None else ""
    if len(members) == 1:
        member = members[0]
        if typing.get_origin(member) is Literal:
            return f"use one of: {', '.join(map(str, typing.get_args(member)))}{or_null}"
        if member is bool:
            return "use true or false"
        if member is int:
            low, high = _bounds(info.metadata)
            if low is not None and high is not None:
                return f"use a whole number from {low} to {high}"
            if low is not None:
                return f"use a whole number of at least {low}{such_as}"
            return f"use a whole number{such_as}"
        if member is Path:
            return f"give an absolute path{such_as}{or_null}"
        if member is str:
            return f"write it as a single string{such_as}{or_null}"
        if typing.get_origin(member) is list:
            inner = {m for arg in typing.get_args(member) for m in members_of(arg)}
            if item:
                return "give each item as a number or a name" if inner == {int, str} else "correct the item"
            items = "numbers or names, such as [0, 1000]" if inner == {int, str} else "values"
            return f"give a list of {items}{or_null}"
    if set(members) == {int, str}:
        return f"give a name or a number{or_null}"
    return f"give a value of type {info.annotation}{or_null}"  # a new kind of setting: a test asks for a better one


_USERINFO = re.compile(r"(^|://|\s)[^\s/?#@]+@")


def _shown(value: str) -> str:
    """A value fit for an error message: any user:password@ cut out, and at most 60 characters."""
    value = _USERINFO.sub(r"\1***@", value)
    return value if len(value) <= 60 else f"{value[:40]}... ({len(value)} characters)"


class Problem(NamedTuple):
    """One mistake in the settings."""

    where: str
    """The setting's dotted path, and what set it if not the file: ``server.endpoint (from environment
    variable KLEIDI_SERVER__ENDPOINT)``."""
    message: str
    """What is wrong with it."""
    fix: str
    """What to do about it: an action, from the validator that refused the value or derived from the
    setting's type and constraints."""


class InvalidSettings(ConfigError):
    """Settings that fail validation: every mistake at once, one :class:`Problem` each.

    ``problems`` holds each problem with its own fix, for renderers that show them one by one.
    ``message`` starts with ``invalid configuration (<source>):``, then one line per problem.
    With one problem, its fix is ``fix``, and ``str()`` is ``"<message>; fix: <fix>"`` as for any
    kleidi error. With several, each line of ``message`` ends with its own ``; fix: ...``, ``fix``
    says to correct each of them, and ``str()`` is ``message`` alone: a last ``; fix:`` for all of
    them would read as the last line's.
    """

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        head = f"invalid configuration ({source}):"
        if len(self.problems) == 1:
            only = self.problems[0]
            super().__init__(f"{head}\n  {only.where}: {only.message}", fix=only.fix)
            return
        lines = "".join(f"\n  {p.where}: {p.message}; fix: {p.fix}" for p in self.problems)
        super().__init__(f"{head}{lines}", fix=f"correct each of the {len(self.problems)} settings above as its "
                         "line says")
        self.args = (self.message,)


def validation_problems(exc: ValidationError, origins: Mapping[tuple[str, ...], str] | None = None) -> list[Problem]:
    """One :class:`Problem` per mistake pydantic found, each with a fix; ``origins`` maps setting
    paths to what set them (an environment variable, a flag)."""
    origins = origins or {}
    problems: list[Problem] = []
    for err in exc.errors():
        at = _locate(err["loc"])
        # An unknown section set from the environment fails at the section ("servr"), not at the
        # variable's full path ("servr", "endpoint"): find the origin by prefix too.
        origin = origins.get(at.path) or next((o for p, o in origins.items() if p[:len(at.path)] == at.path), None)
        where = (at.shown or "(top level)") + (f" (from {origin})" if origin else "")
        problem = _problem(err, at, where)
        if problem not in problems:  # the members of a union (int | str) each report the same mistake
            problems.append(problem)
    return problems


def _problem(err: Any, at: _Located, where: str) -> Problem:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        name = at.path[-1]
        close = difflib.get_close_matches(name, at.siblings, n=1)
        hint = f"did you mean {'.'.join((*at.path[:-1], close[0]))!r}?" if close else \
            f"valid fields here: {', '.join(at.siblings)}"
        owners = [str(tag_of(m)) for m in at.others if name in m.model_fields]
        if at.chosen is not None and owners:
            # Suggestions come from the chosen backend or method only; say where the field belongs.
            tag = tag_field(at.chosen)
            return Problem(where, f"unknown field for {tag}: {tag_of(at.chosen)} (it is a setting of {tag} "
                           f"{', '.join(owners[:-1]) + ' or ' if len(owners) > 1 else ''}{owners[-1]})",
                           f"remove it ({hint})")
        return Problem(where, "unknown field", f"remove it ({hint})")
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # pydantic names the field and the choices
        tag = str(ctx.get("discriminator", "kind")).strip("'")
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", ""))) or (
            [str(tag_of(m)) for m in models_in(at.info.annotation)] if at.info is not None else [])
        if kind == "union_tag_not_found":
            return Problem(where, f"missing `{tag}`", f"set {tag} to one of: {', '.join(choices)}")
        given = err["input"].get(tag) if isinstance(err["input"], dict) else None
        return Problem(where.replace(at.shown, f"{at.shown}.{tag}", 1), f"unknown {tag} {_shown(str(given))!r}",
                       f"use one of: {', '.join(choices)}")
    error = ctx.get("error")
    own_fix, own_message = getattr(error, "fix", None), getattr(error, "message", None)
    if isinstance(own_fix, str) and isinstance(own_message, str):
        message, fix = own_message, own_fix  # the validator's own (InvalidValue, DurationError)
    elif isinstance(ctx.get("fix"), str):
        message, fix = str(err["msg"]), ctx["fix"]  # a PydanticCustomError's
    elif kind == "missing":
        message = "required, and not set"
        example = _example(at.info) if at.info is not None else None
        fix = f"set it, e.g. `{at.path[-1]}: {_inline(example)}`" if example is not None else f"set {at.path[-1]}"
    elif at.info is not None:
        message, fix = str(err["msg"]), _type_fix(at.info, at.item)
        if at.in_union:  # "Input should be a valid integer" for one member, "... string" for the other
            message = "not a value of the expected type"
        elif kind == "path_type":  # pydantic's own names a Python class
            message = "not a path"
    else:
        message, fix = str(err["msg"]), "correct the value (see docs/configuration.md)"
    message = _USERINFO.sub(r"\1***@", message.removeprefix("Value error, "))
    given = err.get("input")
    if kind not in NO_INPUT_ERRORS and isinstance(given, str | int | float | bool) and repr(given) not in message:
        message += f" (got {_shown(given)!r})" if isinstance(given, str) else f" (got {_shown(_inline(given))})"
    return Problem(where, message, fix)
