"""Envelope format 2 (server.envelope_format: 2): kleidi binds key_id, annotations and protocol itself.

Per backend, over the real socket: what Encrypt writes is format 2; a changed key_id, annotation or
envelope byte fails Decrypt; a format-1 kleidi on the same keys reads it, and it reads format 1.
On a Transit key that cannot bind associated data (RSA), format 1 lets a v2 ciphertext be replayed
through v1beta1 Decrypt; format 2 does not: the binding no longer depends on the backend.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest

from kleidi._proto.kmsv1beta1 import api_pb2 as v1
from kleidi._proto.kmsv1beta1 import api_pb2_grpc as v1_grpc
from tests.conftest import KleidiProcess, run_kleidi
from tests.test_envelope_fixtures import FIXTURES, _calls, _reads_every_fixture
from tests.vault import kleidi_vault
from tests.vault.openbao import OpenBao, unique

FORMAT_2 = {"server": {"envelope_format": 2, "enable_v1beta1": True}}


def _v1_decrypt(proc: KleidiProcess, cipher: bytes) -> bytes:
    with grpc.insecure_channel(proc.endpoint, options=[("grpc.default_authority", "localhost")]) as channel:
        stub = v1_grpc.KeyManagementServiceStub(channel)
        return bytes(stub.Decrypt(v1.DecryptRequest(version="v1beta1", cipher=cipher), timeout=3).plain)


def _refused(proc: KleidiProcess, ciphertext: bytes, key_id: str, annotations: dict[str, bytes]) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        proc.decrypt(ciphertext, key_id, annotations)
    assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), \
        (caught.value.code(), caught.value.details())


def _format_2_holds(proc: KleidiProcess, rotate: Any) -> None:
    seed = os.urandom(32)
    sealed = proc.encrypt(seed)
    ciphertext, key_id, annotations = sealed.ciphertext, sealed.key_id, dict(sealed.annotations)
    assert ciphertext[:2] == b"k\x02" and annotations == {"envelope.kleidi.io": b"2"}
    assert proc.decrypt(ciphertext, key_id, annotations) == seed
    assert _v1_decrypt(proc, _v1_encrypt(proc, seed)) == seed

    rotate()
    other = proc.wait_for_key_id(lambda k: k != key_id)
    assert proc.decrypt(ciphertext, key_id, annotations) == seed  # the old version still reads
    _refused(proc, ciphertext, other, annotations)
    for changed in ({"envelope.kleidi.io": b"1"}, {**annotations, "extra.kleidi.io": b"x"}, {}):
        _refused(proc, ciphertext, key_id, changed)
    # magic, format, key version, the wrapped key's length, the wrapped key, the sealed seed, its tag
    for offset in (0, 1, 5, 6, 7, 8, len(ciphertext) - 40, len(ciphertext) - 1):
        flipped = bytearray(ciphertext)
        flipped[offset] ^= 0x01
        _refused(proc, bytes(flipped), key_id, annotations)
    _refused(proc, ciphertext[:-1], key_id, annotations)


def _v1_encrypt(proc: KleidiProcess, seed: bytes) -> bytes:
    with grpc.insecure_channel(proc.endpoint, options=[("grpc.default_authority", "localhost")]) as channel:
        stub = v1_grpc.KeyManagementServiceStub(channel)
        cipher = bytes(stub.Encrypt(v1.EncryptRequest(version="v1beta1", plain=seed), timeout=3).cipher)
    assert cipher[:2] == b"k\x02"
    return cipher


def test_local_format_2_binds_everything_and_both_formats_read_each_other(kleidi_factory: Any,
                                                                           short_dir: Path) -> None:
    writer = kleidi_factory("writer", settings=FORMAT_2)
    _format_2_holds(writer, lambda: run_kleidi("rotate", "--keyring", str(writer.keyring)))
    seed = os.urandom(32)
    sealed = writer.encrypt(seed)
    reader = kleidi_factory("reader", keyring=writer.keyring)  # the default, format 1, on the same keyring
    assert reader.decrypt(sealed.ciphertext, sealed.key_id, sealed.annotations) == seed
    old = reader.encrypt(seed)
    assert old.ciphertext[:2] == b"k\x01"
    assert writer.decrypt(old.ciphertext, old.key_id, old.annotations) == seed

    keyring = short_dir / "fixture-keyring.json"  # and kleidi 0.1.0's own ciphertexts
    shutil.copy(FIXTURES / "keyring.json", keyring)
    keyring.chmod(0o600)
    _reads_every_fixture(kleidi_factory("fixtures", keyring=keyring, settings=FORMAT_2), _calls("local.json"))


def test_vault_format_2_binds_everything(openbao: OpenBao, kleidi_factory: Any, short_dir: Path) -> None:
    key = openbao.create_key(unique("format2"), "aes256-gcm96")
    auth = kleidi_vault.token_auth(openbao, key, short_dir)
    proc = kleidi_factory(backend=kleidi_vault.backend(openbao, key, auth), settings=FORMAT_2, create_keyring=False)
    _format_2_holds(proc, lambda: openbao.rotate_key(key))


@pytest.mark.parametrize("envelope_format, replay_works", [(1, True), (2, False)])
def test_an_rsa_transit_key_is_bound_only_by_format_2(openbao: OpenBao, kleidi_factory: Any, short_dir: Path,
                                                      envelope_format: int, replay_works: bool) -> None:
    """Transit takes no associated data for RSA keys: in format 1 nothing binds the protocol, so a
    KMS v2 ciphertext decrypts through v1beta1 too; format 2 refuses it."""
    key = openbao.create_key(unique("rsa"), "rsa-2048")
    auth = kleidi_vault.token_auth(openbao, key, short_dir)
    proc = kleidi_factory(backend=kleidi_vault.backend(openbao, key, auth), create_keyring=False,
                          settings={"server": {"envelope_format": envelope_format, "enable_v1beta1": True}})
    seed = os.urandom(32)
    sealed = proc.encrypt(seed)
    if replay_works:
        assert _v1_decrypt(proc, sealed.ciphertext) == seed
        assert "cannot bind associated data" in proc.log()
    else:
        with pytest.raises(grpc.RpcError) as caught:
            _v1_decrypt(proc, sealed.ciphertext)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert proc.decrypt(sealed.ciphertext, sealed.key_id, sealed.annotations) == seed
        assert "cannot bind associated data" not in proc.log()  # format 2 binds it: nothing to warn about
