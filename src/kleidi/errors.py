"""kleidi's one exception tree.

::

    KleidiError
    ├── ConfigError            bad or missing configuration; start-up stops with the field and the fix
    │   └── InvalidValue       (also a ValueError) one setting's value refused by a settings validator;
    │                          pydantic keeps it, and the ConfigError built from it keeps its fix
    ├── InvalidRequest         the caller sent something kleidi refuses (gRPC INVALID_ARGUMENT)
    ├── CallerRefused          the call did not come through the checked public socket (PERMISSION_DENIED)
    ├── UnknownKey             a key_id kleidi never produced (gRPC NOT_FOUND)
    ├── RetiredKey             a key_id whose KEK version was retired (gRPC FAILED_PRECONDITION)
    ├── DecryptionFailed       integrity failure: tampered ciphertext, wrong key_id or annotations
    │                          (gRPC INVALID_ARGUMENT; deliberately says nothing more)
    ├── BackendUnavailable     the KEK cannot be used right now; retry later (gRPC UNAVAILABLE)
    ├── AuditUnavailable       the audit log cannot be written and audit.on_failure is fail_closed
    │                          (gRPC UNAVAILABLE)
    ├── KeyringError           the local keyring file is missing, unsafe or malformed
    └── ServiceUnavailable     a service a command reads (etcd for scan/recover, kube-apiserver for
                               migrate) cannot be reached or refuses it (gRPC UNAVAILABLE, were it ever
                               raised while serving)

Messages never hold plaintext, seeds, keys, tokens or passwords: they are logged and sent to the
apiserver as they are.
"""

from __future__ import annotations


class KleidiError(Exception):
    """Base of every error kleidi raises on purpose.

    ``message`` says what is wrong; ``fix``, when the user can act on it, says what to do. The two
    travel as fields, so that every renderer (CLI, doctor, logs, Status) can show the fix as a fix;
    ``str()`` joins them as ``"<message>; fix: <fix>"``.
    """

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(f"{message}; fix: {fix}" if fix else message)


class ConfigError(KleidiError):
    """The configuration is invalid; the message names the field and the fix."""


class InvalidValue(ConfigError, ValueError):
    """A value a settings validator refuses, with the fix as a field.

    A ValueError, so that pydantic reports it as the field's error (and keeps the instance in the
    error's ``ctx``), and so that code which parses the same values outside the settings (CLI
    flags) can catch it as one.
    """


class InvalidRequest(KleidiError):
    """A request kleidi refuses; the message gives the reason."""


class CallerRefused(KleidiError):
    """The calling process is not allowed, or its call bypassed the caller check."""


class UnknownKey(KleidiError):
    """The request names a key_id that this kleidi never produced."""


class RetiredKey(KleidiError):
    """The request names a key_id whose KEK version has been retired."""


class DecryptionFailed(KleidiError):
    """The ciphertext did not authenticate. Opaque by design: no detail helps an attacker."""

    def __init__(self, message: str = "ciphertext failed authentication: tampered, truncated, "
                 "or bound to another key_id or annotations", fix: str | None = None) -> None:
        super().__init__(message, fix)


class BackendUnavailable(KleidiError):
    """The backend cannot be used now; the operation may succeed later."""


class AuditUnavailable(KleidiError):
    """A record could not be written to the audit log, and the policy is to refuse unrecorded calls."""


class KeyringError(KleidiError):
    """The local keyring file is missing, has unsafe permissions, or is malformed."""


class ServiceUnavailable(KleidiError):
    """A service one of kleidi's commands reads (etcd, kube-apiserver) cannot be reached or refuses it."""
