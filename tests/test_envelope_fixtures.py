"""Ciphertexts written by kleidi 0.1.0 (envelope format 1) keep decrypting, and keep their key_ids.

tests/fixtures/envelope_format_1 holds what that kleidi returned to the apiserver (and so what etcd
stores) for the local backend and for Vault Transit, with the key material to read them: a keyring
and a Transit key backup made for these fixtures only. Every later kleidi must decrypt each one, and
report the same key_ids for the same keys (stored objects name them). A changed key_id, annotation
or envelope byte must still fail.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest

from kleidi._proto.kmsv1beta1 import api_pb2 as v1
from kleidi._proto.kmsv1beta1 import api_pb2_grpc as v1_grpc
from tests.conftest import KleidiProcess
from tests.fixtures.envelope_format_1.make import VAULT_KEY
from tests.vault import kleidi_vault
from tests.vault.openbao import OpenBao

FIXTURES = Path(__file__).parent / "fixtures" / "envelope_format_1"


def _calls(name: str) -> list[dict[str, Any]]:
    doc = json.loads((FIXTURES / name).read_text())
    assert doc["envelope_format"] == 1 and doc["written_by"] == "kleidi 0.1.0"
    calls: list[dict[str, Any]] = doc["calls"]
    return calls


def _v2(call: dict[str, Any]) -> tuple[bytes, str, dict[str, bytes], bytes]:
    return (base64.b64decode(call["ciphertext"]), call["key_id"],
            {k: base64.b64decode(v) for k, v in call["annotations"].items()}, base64.b64decode(call["plaintext"]))


def _reads_every_fixture(proc: KleidiProcess, calls: list[dict[str, Any]]) -> None:
    v2_calls = [c for c in calls if c["protocol"] == "v2"]
    assert {c["key_id"].split(":")[2] for c in v2_calls} == {"v1", "v2"}  # both versions are covered
    # The current key_id is the one 0.1.0 reported for the same key: derived the same way.
    assert proc.status().key_id == v2_calls[-1]["key_id"]
    for call in v2_calls:
        ciphertext, key_id, annotations, plaintext = _v2(call)
        assert proc.decrypt(ciphertext, key_id, annotations) == plaintext, call
    with grpc.insecure_channel(proc.endpoint, options=[("grpc.default_authority", "localhost")]) as channel:
        stub = v1_grpc.KeyManagementServiceStub(channel)
        for call in (c for c in calls if c["protocol"] == "v1beta1"):
            cipher = base64.b64decode(call["ciphertext"])
            plain = stub.Decrypt(v1.DecryptRequest(version="v1beta1", cipher=cipher), timeout=3).plain
            assert plain == base64.b64decode(call["plaintext"])


def _refuses_every_change(proc: KleidiProcess, calls: list[dict[str, Any]]) -> None:
    ciphertext, key_id, annotations, _ = _v2(next(c for c in calls if c["protocol"] == "v2" and
                                                 len(base64.b64decode(c["plaintext"])) == 32))
    other_key_id = next(c["key_id"] for c in calls if c["protocol"] == "v2" and c["key_id"] != key_id)
    changed: list[tuple[bytes, str, dict[str, bytes]]] = [
        (ciphertext, other_key_id, annotations),
        (ciphertext, key_id, {**annotations, "extra.kleidi.io": b"x"}),
        (ciphertext, key_id, {k: v + b"x" for k, v in annotations.items()}),
    ]
    for offset in (0, 1, 5, 6, len(ciphertext) - 1):  # magic, format, key version, payload start and end
        flipped = bytearray(ciphertext)
        flipped[offset] ^= 0x01
        changed.append((bytes(flipped), key_id, annotations))
    for bad_ciphertext, bad_key_id, bad_annotations in changed:
        with pytest.raises(grpc.RpcError) as caught:
            proc.decrypt(bad_ciphertext, bad_key_id, bad_annotations)
        assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), \
            (caught.value.code(), caught.value.details())


def test_local_fixtures_decrypt_with_the_same_key_ids(kleidi_factory: Any, short_dir: Path) -> None:
    keyring = short_dir / "keyring.json"
    shutil.copy(FIXTURES / "keyring.json", keyring)
    keyring.chmod(0o600)
    proc = kleidi_factory(keyring=keyring, settings={"server": {"enable_v1beta1": True}})
    calls = _calls("local.json")
    _reads_every_fixture(proc, calls)
    _refuses_every_change(proc, calls)


def test_vault_fixtures_decrypt_with_the_same_key_ids(fresh_openbao: OpenBao, kleidi_factory: Any,
                                                      short_dir: Path) -> None:
    """The Transit key comes back from its backup (creation times included, which the key_id binds)."""
    fresh_openbao.enable_transit()
    fresh_openbao.write(f"transit/restore/{VAULT_KEY}", backup=(FIXTURES / "transit-backup.txt").read_text().strip())
    auth = kleidi_vault.token_auth(fresh_openbao, VAULT_KEY, short_dir)
    proc = kleidi_factory(backend=kleidi_vault.backend(fresh_openbao, VAULT_KEY, auth),
                          settings={"server": {"enable_v1beta1": True}}, create_keyring=False)
    calls = _calls("vault.json")
    _reads_every_fixture(proc, calls)
    _refuses_every_change(proc, calls)
