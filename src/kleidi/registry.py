"""Backends are found through the ``kleidi.backends`` entry-point group and chosen explicitly by
``backend.kind``: there is no automatic pick and no fallback."""

from __future__ import annotations

import importlib.util
import typing
from importlib.metadata import entry_points
from typing import Any, NamedTuple

from kleidi import __version__
from kleidi.backends.base import Backend
from kleidi.errors import ConfigError

GROUP = "kleidi.backends"


def available() -> dict[str, str]:
    """Backend kind -> ``module:Class`` for every registered backend."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def missing_extra(kind: str, module: str | None = None) -> ConfigError:
    """The one error for a backend whose optional dependencies are not installed.

    ``kleidi`` is not published on an index, so the fix also says how to add the extra to an
    install from a checkout or a wheel."""
    what = f" ({module} is not installed)" if module else ""
    return ConfigError(
        f"the {kind} backend needs the optional dependencies of kleidi[{kind}]{what}",
        fix=f"pip install 'kleidi[{kind}]' (from a checkout: pip install '/path/to/kleidi[{kind}]'; from a wheel: "
            f"pip install 'kleidi-{__version__}-py3-none-any.whl[{kind}]')")


def registered_class(kind: str) -> type[Backend]:
    """The class registered for ``kind``, imported, whether or not its extra is installed (a backend
    module imports without it; only using the backend needs it)."""
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == kind]
    if not matches:
        raise ConfigError(f"backend.kind: no backend named {kind!r} is installed; installed: "
                          f"{', '.join(sorted(available())) or 'none'}",
                          fix=f"set backend.kind to one of: {', '.join(sorted(available())) or 'none'}")
    sources = sorted({ep.value for ep in matches})
    if len(sources) > 1:  # two distributions claim one name: which one runs must not depend on install order
        raise ConfigError(f"backend.kind: two installed backends are named {kind!r}: {', '.join(sources)}",
                          fix="uninstall the package that should not provide it (pip show, pip uninstall)")
    try:
        loaded = matches[0].load()
    except ImportError as exc:
        if (exc.name or "kleidi").partition(".")[0] == "kleidi":
            raise
        raise missing_extra(kind, exc.name) from None
    if not (isinstance(loaded, type) and issubclass(loaded, Backend)):
        raise ConfigError(f"backend.kind: the entry point {kind!r} ({sources[0]}) is not a kleidi Backend class",
                          fix="fix or uninstall the package that provides it")
    return loaded


def backend_class(kind: str) -> type[Backend]:
    """The class registered for ``kind``, ready to use: fails if the backend or its extra is missing."""
    cls = registered_class(kind)
    for module in cls.requires:
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # a finder may refuse the name outright
            found = False
        if not found:
            raise missing_extra(kind, module)
    return cls


class BackendStatus(NamedTuple):
    name: str
    source: str
    """The entry point's ``module:Class``."""
    usable: bool
    problem: str | None
    fix: str | None


def backend_status() -> list[BackendStatus]:
    """Every installed backend, by name, with whether it loads here and, if not, why and the fix."""
    out = []
    for name, source in sorted(available().items()):
        try:
            backend_class(name)
        except ConfigError as exc:
            out.append(BackendStatus(name, source, False, exc.message, exc.fix))
        else:
            out.append(BackendStatus(name, source, True, None, None))
    return out


def settings_models() -> dict[str, Any]:
    """Each installed backend's settings model, by kind, for the config's ``backend`` union.

    A backend module imports without its optional dependencies (only using it needs them), so the
    schema, the docs and ``kleidi backends`` work on a machine that has some extras only."""
    models: dict[str, Any] = {}
    for name in sorted(available()):
        cls = registered_class(name)
        model = getattr(cls, "settings_model", None)
        tag = getattr(model, "model_fields", {}).get("kind")
        if tag is None or typing.get_args(tag.annotation) != (name,):
            raise ConfigError(f"backend {name!r}: its settings_model has no `kind: Literal[{name!r}]`",
                              fix="fix or uninstall the package that provides it")
        models[name] = model
    return models


def create_backend(settings: Any) -> Backend:
    return backend_class(settings.kind)(settings)  # type: ignore[call-arg]  # each class takes its settings
