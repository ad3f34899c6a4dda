"""The TPM 2.0 backend: placeholder while the backend is written (#12)."""

from __future__ import annotations

from typing import Literal

from kleidi.backends.threaded import ThreadedBackend
from kleidi.settings.types import BackendSettingsBase


class TpmBackendSettings(BackendSettingsBase):
    """A KEK inside a TPM 2.0."""

    kind: Literal["tpm"] = "tpm"
    """Backend type."""


class TpmBackend(ThreadedBackend):
    kind = "tpm"
    settings_model = TpmBackendSettings
    requires = ("tpm2_pytss",)
