"""kleidi's own envelope format and key_id derivation (src/kleidi/_crypto)."""

from __future__ import annotations

import os

import pytest

from kleidi._crypto import aead, envelope
from kleidi._crypto.keyid import derive_key_id
from kleidi.errors import DecryptionFailed, InvalidRequest


def test_header_layout_is_magic_format_key_version() -> None:
    sealed = envelope.Envelope(format=1, key_version=0x01020304, payload=b"payload")
    assert sealed.to_bytes() == b"\x6b\x01\x01\x02\x03\x04payload"
    assert envelope.parse(sealed.to_bytes()) == sealed


@pytest.mark.parametrize("data, reason", [
    (b"", "too short"),
    (b"\x6b\x01\x00\x00\x00\x01", "too short"),
    (b"\x00\x01\x00\x00\x00\x01xx", "bad magic"),
    (b"\x6b\x03\x00\x00\x00\x01xx", "envelope format 3"),
    (b"\x6b\x00\x00\x00\x00\x01xx", "envelope format 0"),
])
def test_parse_refuses_what_it_cannot_read(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidRequest, match=reason):
        envelope.parse(data)


def test_associated_data_binds_every_field() -> None:
    base = dict(envelope_header=b"\x6b\x01\x00\x00\x00\x01", protocol="v2", key_id="k1",
                annotations={"envelope.kleidi.io": b"1"})
    reference = envelope.associated_data(**base)  # type: ignore[arg-type]
    variants = [
        {**base, "envelope_header": b"\x6b\x01\x00\x00\x00\x02"},
        {**base, "protocol": "v1beta1"},
        {**base, "key_id": "k2"},
        {**base, "annotations": {}},
        {**base, "annotations": {"envelope.kleidi.io": b"2"}},
        {**base, "annotations": {"envelope.kleidi.io": b"1", "other.kleidi.io": b""}},
        # length prefixes: moving bytes between adjacent fields changes the result
        {**base, "key_id": "k1", "annotations": {"nvelope.kleidi.io": b"1"}},
    ]
    for variant in variants:
        assert envelope.associated_data(**variant) != reference  # type: ignore[arg-type]
    reordered = {"b.example.io": b"2", "a.example.io": b"1"}
    assert envelope.associated_data(b"h", "v2", "k", reordered) == \
        envelope.associated_data(b"h", "v2", "k", dict(sorted(reordered.items())))


def test_aead_round_trip_and_integrity() -> None:
    key, aad = aead.new_key(), b"aad"
    sealed = aead.seal(key, b"seed" * 8, aad)
    assert len(sealed) == 32 + aead.OVERHEAD
    assert aead.open_sealed(key, sealed, aad) == b"seed" * 8
    assert aead.seal(key, b"seed" * 8, aad) != sealed  # fresh nonce every time
    for bad_key, bad_sealed, bad_aad in ((aead.new_key(), sealed, aad), (key, sealed, b"other"),
                                         (key, sealed[:-1], aad), (key, sealed[:10], aad),
                                         (key, bytes([sealed[0] ^ 1]) + sealed[1:], aad)):
        with pytest.raises(DecryptionFailed):
            aead.open_sealed(bad_key, bad_sealed, bad_aad)


def test_key_id_is_deterministic_distinct_and_within_limits() -> None:
    a = derive_key_id("local", "ring-1", 1, "2026-01-01T00:00:00Z")
    assert a == derive_key_id("local", "ring-1", 1, "2026-01-01T00:00:00Z")
    others = {derive_key_id("local", "ring-1", 2, "2026-01-01T00:00:00Z"),
              derive_key_id("local", "ring-2", 1, "2026-01-01T00:00:00Z"),
              derive_key_id("local", "ring-1", 1, "2026-01-01T00:00:01Z"),
              derive_key_id("vault", "ring-1", 1, "2026-01-01T00:00:00Z"),
              # field boundaries are length-prefixed, so shifting characters changes the id
              derive_key_id("local", "ring-11", 1, "2026-01-01T00:00:00Z")}
    assert a not in others and len(others) == 5
    assert a.startswith("kleidi:local:v1:")
    assert 0 < len(a.encode()) <= 1024


def test_key_id_reveals_no_key_material() -> None:
    key = os.urandom(32)
    key_id = derive_key_id("local", "ring", 1, "t")
    assert key.hex() not in key_id


def test_a_format_2_payload_splits_only_when_its_length_is_consistent() -> None:
    from kleidi._crypto.envelope import new_data_key, open_v2, seal_v2, split_v2
    from kleidi.errors import DecryptionFailed

    key = new_data_key()
    payload = seal_v2(key, b"wrapped", b"seed", b"aad")
    wrapped, sealed = split_v2(payload)
    assert wrapped == b"wrapped" and open_v2(key, sealed, b"aad") == b"seed"
    for bad in (b"", b"\x00", b"\x00\x00" + payload[2:], b"\xff\xff" + payload[2:], payload[:20]):
        with pytest.raises(DecryptionFailed):
            split_v2(bad)
    with pytest.raises(DecryptionFailed):
        open_v2(key, sealed, b"other aad")
    with pytest.raises(DecryptionFailed):
        open_v2(key[:16], sealed, b"aad")
