"""All of kleidi's settings in one model: the core sections, and the ``backend`` section, which is
one of the installed backends' models (found through the registry) chosen by ``kind``."""

from __future__ import annotations

import typing
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from kleidi import registry
from kleidi.durations import format_duration
from kleidi.settings.sections import AuditSettings, LoggingSettings, ServerSettings, TelemetrySettings
from kleidi.settings.types import BackendSettingsBase, Settings

DEFAULT_BACKEND = "local"
BACKEND_MODELS: dict[str, type[BackendSettingsBase]] = registry.settings_models()
"""Each installed backend's settings model, by kind: the ``backend`` section is one of them."""
BACKEND_KINDS = tuple(BACKEND_MODELS)


def _default_backend_kind(value: Any) -> Any:
    # The local backend is the embedded default: a backend section without `kind` means local.
    if isinstance(value, dict) and "kind" not in value:
        return {"kind": DEFAULT_BACKEND, **value}
    return value


if typing.TYPE_CHECKING:  # what every backend's settings have; the code that needs more is the backend's own
    BackendSettings = BackendSettingsBase
else:  # the installed backends' models, discriminated by kind: built at run time from the registry
    BackendSettings = Annotated[typing.Union[tuple(BACKEND_MODELS.values())],  # noqa: UP007
                                Field(discriminator="kind"), BeforeValidator(_default_backend_kind)]


class KleidiSettings(Settings):
    """All of kleidi's settings."""

    server: ServerSettings = ServerSettings()
    """The gRPC server that kube-apiserver calls."""

    logging: LoggingSettings = LoggingSettings()
    """Log output."""

    telemetry: TelemetrySettings = TelemetrySettings()
    """Prometheus metrics and health endpoints."""

    audit: AuditSettings = AuditSettings()
    """The tamper-evident audit log."""

    backend: BackendSettings = typing.cast(Any, BACKEND_MODELS[DEFAULT_BACKEND])()
    """Where the KEK lives. `kind` selects the backend; the other fields depend on it."""


def json_schema() -> dict[str, Any]:
    schema = KleidiSettings.model_json_schema(mode="validation")
    # pydantic writes a field's own default as the Python value (5.0): write it as a file would ("5s").
    for definition in [schema, *schema.get("$defs", {}).values()]:
        for prop in definition.get("properties", {}).values():
            if prop.get("x-kleidi-type") == "duration" and isinstance(prop.get("default"), int | float):
                prop["default"] = format_duration(prop["default"])
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kleidi configuration"
    return schema
