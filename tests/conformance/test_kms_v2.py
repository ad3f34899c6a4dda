"""KMS v2 conformance: kleidi checked against every rule kube-apiserver applies (kms-protocol.md §2).

The test plays the apiserver: it dials the unix socket with ``:authority`` localhost, sends random
32-byte seeds with UUIDv4 uids, and applies the apiserver's checks to every response.
"""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from kleidi._proto.kmsv2 import api_pb2 as pb
from kleidi.service.validation import is_fqdn
from tests.conformance.conftest import PluginUnderTest

MAX = 1024


def seed(plugin: PluginUnderTest) -> bytes:
    value = os.urandom(32)
    plugin.seeds_sent.append(value)
    return value


def uid() -> str:
    return str(uuid.uuid4())


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def assert_apiserver_accepts(plugin: PluginUnderTest, response: pb.EncryptResponse) -> None:
    """The checks of GenerateTransformer/ValidateEncryptedObject and config.go (§2.3)."""
    assert 0 < len(response.ciphertext) <= MAX
    assert 0 < len(response.key_id.encode()) <= MAX
    total = 0
    for key, value in response.annotations.items():
        assert is_fqdn(key), key
        total += len(key.encode()) + len(value)
    assert total <= 32 * 1024
    assert response.key_id == plugin.status().key_id


# ---------------------------------------------------------------------------------------------- §2.1


def test_status_is_what_the_apiserver_requires(plugin: PluginUnderTest) -> None:
    status = plugin.status()
    assert status.version == "v2"
    assert status.healthz == "ok"
    assert 0 < len(status.key_id.encode()) <= MAX


def test_status_is_stable_between_polls(plugin: PluginUnderTest) -> None:
    key_ids = {plugin.status().key_id for _ in range(20)}
    assert len(key_ids) == 1


# ---------------------------------------------------------------------------------------------- §2.2-2.4


def test_round_trip_returns_the_exact_seed(plugin: PluginUnderTest) -> None:
    value = seed(plugin)
    response = plugin.encrypt(value, uid=uid())
    assert_apiserver_accepts(plugin, response)
    assert value not in response.ciphertext
    assert plugin.decrypt(response.ciphertext, response.key_id, response.annotations, uid=uid()) == value


def test_annotation_keys_are_lowercase_fqdns(plugin: PluginUnderTest) -> None:
    response = plugin.encrypt(seed(plugin))
    assert response.annotations, "kleidi marks its envelopes with at least one annotation"
    assert all(is_fqdn(key) for key in response.annotations)


def test_same_seed_twice_gives_different_ciphertexts(plugin: PluginUnderTest) -> None:
    value = seed(plugin)
    first, second = plugin.encrypt(value), plugin.encrypt(value)
    assert first.ciphertext != second.ciphertext
    for response in (first, second):
        assert plugin.decrypt(response.ciphertext, response.key_id, response.annotations) == value


@pytest.mark.parametrize("size", [1, 16, 32, 64, 512])
def test_plaintext_sizes_that_are_accepted(plugin: PluginUnderTest, size: int) -> None:
    value = os.urandom(size)
    plugin.seeds_sent.append(value)
    response = plugin.encrypt(value)
    assert_apiserver_accepts(plugin, response)
    assert plugin.decrypt(response.ciphertext, response.key_id, response.annotations) == value


@pytest.mark.parametrize("size", [0, 513, 4096])
def test_empty_or_oversized_plaintext_is_invalid_argument(plugin: PluginUnderTest, size: int) -> None:
    error = rpc_error(plugin.encrypt, os.urandom(size))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "plaintext" in error.details()


def test_decrypt_ciphertext_limit_is_1024_bytes(plugin: PluginUnderTest) -> None:
    good = plugin.encrypt(seed(plugin))
    at_limit = good.ciphertext + b"\x00" * (MAX - len(good.ciphertext))
    assert len(at_limit) == MAX
    error = rpc_error(plugin.decrypt, at_limit, good.key_id, good.annotations)
    # 1024 bytes passes the size rule; it then fails authentication, not the size check.
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "authentication" in error.details()
    error = rpc_error(plugin.decrypt, at_limit + b"\x00", good.key_id, good.annotations)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1025 bytes" in error.details()


def test_decrypt_key_id_limit_is_1024_bytes(plugin: PluginUnderTest) -> None:
    good = plugin.encrypt(seed(plugin))
    error = rpc_error(plugin.decrypt, good.ciphertext, "k" * MAX, good.annotations)
    assert error.code() == grpc.StatusCode.NOT_FOUND  # legal size, unknown key_id
    error = rpc_error(plugin.decrypt, good.ciphertext, "k" * (MAX + 1), good.annotations)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1025 bytes" in error.details()
    error = rpc_error(plugin.decrypt, good.ciphertext, "", good.annotations)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "key_id is empty" in error.details()


def test_decrypt_empty_ciphertext_is_invalid_argument(plugin: PluginUnderTest) -> None:
    good = plugin.encrypt(seed(plugin))
    error = rpc_error(plugin.decrypt, b"", good.key_id, good.annotations)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ciphertext is empty" in error.details()


@pytest.mark.parametrize("key", ["example", "Example.com", "UPPER.example.io", "-bad.example.io", "a_b.example.io",
                                 "x" * 64 + ".example.io", ""])
def test_decrypt_refuses_annotation_keys_the_apiserver_would_refuse(plugin: PluginUnderTest, key: str) -> None:
    good = plugin.encrypt(seed(plugin))
    annotations = dict(good.annotations)
    annotations[key] = b"1"
    error = rpc_error(plugin.decrypt, good.ciphertext, good.key_id, annotations)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fully qualified domain name" in error.details()


def test_annotations_limit_is_32_kib(plugin: PluginUnderTest) -> None:
    good = plugin.encrypt(seed(plugin))
    used = sum(len(k) + len(v) for k, v in good.annotations.items())
    key = "padding.example.io"
    at_limit = dict(good.annotations)
    at_limit[key] = b"x" * (32 * 1024 - used - len(key))
    error = rpc_error(plugin.decrypt, good.ciphertext, good.key_id, at_limit)
    # 32768 bytes passes the size rule; the extra annotation is then refused as not kleidi's.
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "annotations differ" in error.details()
    over = dict(at_limit)
    over[key] += b"x"
    error = rpc_error(plugin.decrypt, good.ciphertext, good.key_id, over)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "32769 bytes" in error.details()


def test_decrypt_checks_annotations_are_the_ones_returned(plugin: PluginUnderTest) -> None:
    value = seed(plugin)
    good = plugin.encrypt(value)
    (name, content), = good.annotations.items()
    for wrong in ({}, {name: content + b"x"}, {name: b""}, {**good.annotations, "extra.example.io": b"1"}):
        error = rpc_error(plugin.decrypt, good.ciphertext, good.key_id, wrong)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_key_id_is_refused_before_any_decryption(plugin: PluginUnderTest) -> None:
    good = plugin.encrypt(seed(plugin))
    forged = good.key_id[:-1] + ("A" if good.key_id[-1] != "A" else "B")
    error = rpc_error(plugin.decrypt, good.ciphertext, forged, good.annotations)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "not produced by this kleidi" in error.details()


def test_every_tampered_byte_is_caught(plugin: PluginUnderTest) -> None:
    value = seed(plugin)
    good = plugin.encrypt(value)
    for index in range(len(good.ciphertext)):
        tampered = bytearray(good.ciphertext)
        tampered[index] ^= 0x01
        error = rpc_error(plugin.decrypt, bytes(tampered), good.key_id, good.annotations)
        assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), index


@pytest.mark.parametrize("cut", [1, 16, 17, 40])
def test_truncated_ciphertext_is_caught(plugin: PluginUnderTest, cut: int) -> None:
    good = plugin.encrypt(seed(plugin))
    error = rpc_error(plugin.decrypt, good.ciphertext[:-cut], good.key_id, good.annotations)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_ciphertext_that_is_not_a_kleidi_envelope(plugin: PluginUnderTest) -> None:
    good = plugin.encrypt(seed(plugin))
    for junk in (b"vault:v1:abcdef", os.urandom(64), b"\x6b\x09" + os.urandom(60)):
        error = rpc_error(plugin.decrypt, junk, good.key_id, good.annotations)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_ciphertext_is_bound_to_its_key_id(plugin: PluginUnderTest) -> None:
    """A ciphertext presented with another valid key_id (another KEK version) never decrypts."""
    old = plugin.encrypt(seed(plugin))
    plugin.rotate()
    plugin.proc.wait_for_key_id(lambda k: k != old.key_id)
    new = plugin.encrypt(seed(plugin))
    assert new.key_id != old.key_id
    for ciphertext, key_id in ((old.ciphertext, new.key_id), (new.ciphertext, old.key_id)):
        error = rpc_error(plugin.decrypt, ciphertext, key_id, new.annotations)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------------------------------------- rotation


def test_rotation_new_key_id_old_ciphertexts_still_decrypt_retired_refused(plugin: PluginUnderTest) -> None:
    first_seed = seed(plugin)
    first = plugin.encrypt(first_seed)
    plugin.rotate()
    new_key_id = plugin.proc.wait_for_key_id(lambda k: k != first.key_id)
    second_seed = seed(plugin)
    second = plugin.encrypt(second_seed)
    assert second.key_id == new_key_id == plugin.status().key_id
    assert plugin.decrypt(first.ciphertext, first.key_id, first.annotations) == first_seed
    assert plugin.decrypt(second.ciphertext, second.key_id, second.annotations) == second_seed

    plugin.retire(first.key_id)
    deadline_error = None
    for _ in range(100):
        try:
            plugin.decrypt(first.ciphertext, first.key_id, first.annotations)
        except grpc.RpcError as exc:
            deadline_error = exc
            break
        __import__("time").sleep(0.05)
    assert deadline_error is not None, "a retired version kept decrypting"
    assert deadline_error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "retired" in deadline_error.details()
    assert plugin.decrypt(second.ciphertext, second.key_id, second.annotations) == second_seed
    assert plugin.status().healthz == "ok"


def test_key_ids_are_never_reused_across_rotations(plugin: PluginUnderTest) -> None:
    seen = [plugin.status().key_id]
    for _ in range(3):
        plugin.rotate()
        seen.append(plugin.proc.wait_for_key_id(lambda k: k != seen[-1]))
    assert len(set(seen)) == len(seen)


def test_second_instance_reports_the_same_key_id_and_decrypts(plugin: PluginUnderTest) -> None:
    value = seed(plugin)
    written = plugin.encrypt(value)
    peer = plugin.start_peer()
    assert peer.status().key_id == plugin.status().key_id
    assert peer.decrypt(written.ciphertext, written.key_id, written.annotations) == value
    back = peer.encrypt(value)
    assert plugin.decrypt(back.ciphertext, back.key_id, back.annotations) == value


# ---------------------------------------------------------------------------------------------- load


def test_hundreds_of_concurrent_calls_are_all_correct(plugin: PluginUnderTest) -> None:
    seeds = [seed(plugin) for _ in range(400)]
    futures = [plugin.stub.Encrypt.future(pb.EncryptRequest(plaintext=s, uid=uid()), timeout=30) for s in seeds]
    responses = [f.result() for f in futures]
    key_id = plugin.status().key_id
    assert all(r.key_id == key_id for r in responses)
    decrypts = [plugin.stub.Decrypt.future(pb.DecryptRequest(ciphertext=r.ciphertext, key_id=r.key_id,
                                                             annotations=r.annotations, uid=uid()), timeout=30)
                for r in responses]
    assert [f.result().plaintext for f in decrypts] == seeds


def test_concurrent_calls_from_many_channels(plugin: PluginUnderTest) -> None:
    """Separate connections, as several apiserver goroutines and health checks would make."""

    def worker(index: int) -> bool:
        with grpc.insecure_channel(plugin.endpoint) as channel:
            from kleidi._proto.kmsv2 import api_pb2_grpc
            stub = api_pb2_grpc.KeyManagementServiceStub(channel)
            value = os.urandom(32)
            response = stub.Encrypt(pb.EncryptRequest(plaintext=value, uid=uid()), timeout=30)
            request = pb.DecryptRequest(ciphertext=response.ciphertext, key_id=response.key_id,
                                        annotations=response.annotations, uid=uid())
            return stub.Decrypt(request, timeout=30).plaintext == value

    with ThreadPoolExecutor(max_workers=32) as pool:
        assert all(pool.map(worker, range(128)))


def test_a_burst_of_thousands_of_decrypts_is_served_in_full(plugin: PluginUnderTest) -> None:
    """After an apiserver restart every cache miss is a Decrypt; none may be dropped (grpc-core
    cancels calls queued beyond 1000 unless the server raises that limit)."""
    import asyncio

    from kleidi._proto.kmsv2 import api_pb2_grpc

    written = plugin.encrypt(seed(plugin))

    async def burst() -> list[bytes]:
        async with grpc.aio.insecure_channel(plugin.endpoint) as channel:
            stub = api_pb2_grpc.KeyManagementServiceStub(channel)
            request = pb.DecryptRequest(ciphertext=written.ciphertext, key_id=written.key_id,
                                        annotations=written.annotations, uid=uid())
            responses = await asyncio.gather(*(stub.Decrypt(request, timeout=60) for _ in range(3000)))
            return [r.plaintext for r in responses]

    plaintexts = asyncio.run(burst())
    assert len(plaintexts) == 3000 and set(plaintexts) == {plugin.seeds_sent[-1]}
