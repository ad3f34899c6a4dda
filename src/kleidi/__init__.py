"""kleidi: a security-first KMS v2 provider plugin for Kubernetes."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from kleidi.errors import (
    BackendUnavailable,
    ConfigError,
    DecryptionFailed,
    InvalidRequest,
    KeyringError,
    KleidiError,
    RetiredKey,
    UnknownKey,
)

try:
    __version__ = version("kleidi")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BackendUnavailable",
    "ConfigError",
    "DecryptionFailed",
    "InvalidRequest",
    "KeyringError",
    "KleidiError",
    "RetiredKey",
    "UnknownKey",
    "__version__",
]
