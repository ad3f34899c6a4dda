"""Settings: one YAML file, overridden by ``KLEIDI_*`` environment variables, overridden by CLI flags.

Every setting is a field of a frozen pydantic model, grouped by concern and composed into
:class:`KleidiSettings`. ``kleidi config schema`` prints the JSON Schema; docs/configuration.md is
generated from the same models (``kleidi config docs``) and a test keeps the two in sync.
Secrets are never accepted on the command line: backends read them from files.

This module is the public entry point; the parts live in :mod:`kleidi.settings`, one concern each:

- :mod:`kleidi.settings.types`: value types every section uses (durations, modes, URLs);
- :mod:`kleidi.settings.sections`: the core sections (server, logging, audit, telemetry);
- :mod:`kleidi.settings.model`: :class:`KleidiSettings`, whose ``backend`` section is one of the
  installed backends' models (each backend's settings live in its own module);
- :mod:`kleidi.settings.loading`: the file < environment < flags layering;
- :mod:`kleidi.settings.problems`: error messages that name the field and the fix.
"""

from kleidi.settings.loading import ENV_CONFIG_FILE, ENV_PREFIX, ENV_SEPARATOR, load_settings, load_yaml_file
from kleidi.settings.model import BACKEND_KINDS, DEFAULT_BACKEND, BackendSettings, KleidiSettings, json_schema
from kleidi.settings.problems import InvalidSettings, Problem, validation_problems
from kleidi.settings.sections import AuditSettings, LoggingSettings, ServerSettings, TelemetrySettings

__all__ = [
    "BACKEND_KINDS",
    "DEFAULT_BACKEND",
    "ENV_CONFIG_FILE",
    "ENV_PREFIX",
    "ENV_SEPARATOR",
    "AuditSettings",
    "BackendSettings",
    "InvalidSettings",
    "KleidiSettings",
    "LoggingSettings",
    "Problem",
    "ServerSettings",
    "TelemetrySettings",
    "json_schema",
    "load_settings",
    "load_yaml_file",
    "validation_problems",
]
