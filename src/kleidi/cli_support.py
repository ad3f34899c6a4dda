"""What the ``kleidi`` command and the backends' own commands share: options, value types, output.

A backend's CLI commands (:meth:`kleidi.backends.base.Backend.cli_commands`) are built from these,
so that every command reads settings, takes durations and versions, and prints tables the same way.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def config_option(func: F) -> F:
    """--config, on every command that reads the settings."""
    return click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                        envvar="KLEIDI_CONFIG", help="YAML config file (env KLEIDI_CONFIG).")(func)


def backend_flags(command: str) -> Callable[[F], F]:
    """Add every installed backend's flags for ``command`` (e.g. the local backend's ``--keyring`` on
    ``serve``) to a core command. Each flag sets ``backend.<its name>``; the command receives them all
    as one ``backend_overrides`` mapping, so the core never names a backend's settings."""

    def decorate(func: F) -> F:
        from kleidi.registry import available, registered_class

        options: dict[str, click.Option] = {}
        for kind in sorted(available()):
            for option in registered_class(kind).setting_flags(command):
                assert option.name is not None
                if option.name in options:  # a second backend may not redefine a flag's meaning
                    raise RuntimeError(f"two backends define the flag for backend.{option.name}")
                options[option.name] = option

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            overrides = {f"backend.{name}": kwargs.pop(name) for name in options}
            return func(*args, backend_overrides=overrides, **kwargs)

        wrapper.__click_params__ = [*getattr(func, "__click_params__", []), *reversed(options.values())]  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


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


def load(config_file: Path | None, **overrides: Any) -> Any:
    from kleidi.config import load_settings

    return load_settings(config_file, overrides)


def human(value: Any) -> str:
    """A value as people read it: never Python's None, True or []."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(human(v) for v in value) or "none"
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Iterator[Sequence[Any]] | Sequence[Sequence[Any]]) -> None:
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
        table.add_row(*(Text(human(value)) for value in row))
    tty = sys.stdout.isatty()
    console = Console(width=None if tty else 10_000, soft_wrap=not tty, highlight=False)
    console.print(table)
