"""Backends are found through the ``kleidi.backends`` entry-point group and chosen explicitly by
``backend.kind``: there is no automatic pick and no fallback."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from kleidi.backends.base import Backend
from kleidi.errors import ConfigError

GROUP = "kleidi.backends"


def available() -> dict[str, str]:
    """Backend kind -> ``module:Class`` for every registered backend."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def create_backend(settings: Any) -> Backend:
    kind = settings.kind
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == kind]
    if not matches:
        raise ConfigError(f"backend.kind: no backend named {kind!r} is installed; installed: "
                          f"{', '.join(sorted(available())) or 'none'}")
    try:
        cls = matches[0].load()
    except ImportError as exc:
        raise ConfigError(f"backend.kind: the {kind!r} backend cannot be loaded ({exc.name} is missing); "
                          f"fix: pip install 'kleidi[{kind}]'") from None
    backend: Backend = cls(settings)
    return backend
