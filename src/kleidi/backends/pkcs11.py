"""The PKCS#11 backend (an HSM or token): placeholder while the backend is written (#12)."""

from __future__ import annotations

from typing import Literal

from kleidi.backends.threaded import ThreadedBackend
from kleidi.settings.types import BackendSettingsBase


class Pkcs11BackendSettings(BackendSettingsBase):
    """A KEK on a PKCS#11 token."""

    kind: Literal["pkcs11"] = "pkcs11"
    """Backend type."""


class Pkcs11Backend(ThreadedBackend):
    kind = "pkcs11"
    settings_model = Pkcs11BackendSettings
    requires = ("pkcs11",)
