"""Configure kleidi for a real OpenBao: the policy kleidi itself prints, credentials in 0600 files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kleidi.backends.vault import VaultBackendSettings, policy

from .openbao import Namespace, OpenBao, unique, write_private


def kleidi_policy(admin: OpenBao | Namespace, key: str, mount: str = "transit") -> str:
    """Write the policy `kleidi policy vault` prints for this key, and return its name. Every test
    token gets only this policy, so a capability missing from it fails the tests."""
    settings = VaultBackendSettings.model_validate(
        {"address": "http://unused", "key": key, "transit_mount": mount,
         "auth": {"method": "token", "token_env": "UNUSED"}})
    return admin.write_policy(unique("kleidi-policy"), policy(settings))


def token_auth(admin: OpenBao | Namespace, key: str, workdir: Path, **token_options: Any) -> dict[str, Any]:
    token = admin.create_token([kleidi_policy(admin, key)], **token_options)
    return {"method": "token", "token_file": str(write_private(workdir / unique("token"), token))}


def backend(server: OpenBao, key: str, auth: dict[str, Any], *, tls: bool = False,
            namespace: str | None = None, **extra: Any) -> dict[str, Any]:
    """The `backend:` section of kleidi's config for this server and Transit key."""
    config: dict[str, Any] = {"kind": "vault", "address": server.https_addr if tls else server.http_addr,
                              "key": key, "auth": auth, "timeout": "2s"}
    if tls:
        config["tls"] = {"ca_file": str(server.ca_path)}
    if namespace:
        config["namespace"] = namespace
    config.update(extra)
    return config


def approle_auth(admin: OpenBao | Namespace, key: str, workdir: Path, *, policies: list[str] | None = None,
                 **approle_options: Any) -> dict[str, Any]:
    """An AppRole role (by default with kleidi's own policy) and kleidi's auth section, its role_id
    and secret_id in 0600 files."""
    role_id, secret_id = admin.approle(unique("role"), policies or [kleidi_policy(admin, key)], **approle_options)
    return {"method": "approle", "role_id_file": str(write_private(workdir / unique("role_id"), role_id)),
            "secret_id_file": str(write_private(workdir / unique("secret_id"), secret_id))}
