"""The apiserver's field rules as kleidi implements them (kms-protocol.md §2.3)."""

from __future__ import annotations

import pytest

from kleidi.errors import InvalidRequest
from kleidi.service import validation


@pytest.mark.parametrize("name", ["version.encryption.remote.io", "envelope.kleidi.io", "a.b", "a-b.c-d",
                                  "trailing.dot.io.", "x" * 63 + ".io", "1.2"])
def test_fqdn_accepted(name: str) -> None:
    assert validation.is_fqdn(name)


@pytest.mark.parametrize("name", ["example", "Example.com", "", ".", "a..b", "-a.b", "a-.b", "a_b.c",
                                  "x" * 64 + ".io", ("a" * 62 + ".") * 4 + "io", "kleidi.io/format", "a.b/c"])
def test_fqdn_refused(name: str) -> None:
    assert not validation.is_fqdn(name)


def test_limits_at_the_boundary() -> None:
    validation.check_ciphertext(b"x" * 1024)
    validation.check_key_id("k" * 1024)
    validation.check_annotations({"a.example.io": b"x" * (32768 - len("a.example.io"))})
    validation.check_plaintext(b"x" * validation.MAX_PLAINTEXT_SIZE)
    for check, value in ((validation.check_ciphertext, b"x" * 1025), (validation.check_key_id, "k" * 1025),
                         (validation.check_key_id, "é" * 513),  # bytes, not characters, count
                         (validation.check_annotations, {"a.example.io": b"x" * (32769 - len("a.example.io"))}),
                         (validation.check_plaintext, b""), (validation.check_ciphertext, b"")):
        with pytest.raises(InvalidRequest):
            check(value)  # type: ignore[operator]
