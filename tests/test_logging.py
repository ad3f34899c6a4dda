"""Logs: one JSON object per line, the apiserver's uid on every request line, nothing secret."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import grpc
import pytest


def _records(proc: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.log().splitlines() if line.strip()]


def test_every_line_is_json_and_requests_carry_the_uid(kleidi_factory: Any) -> None:
    proc = kleidi_factory()
    seed = os.urandom(32)
    enc_uid, dec_uid, bad_uid = (str(uuid.uuid4()) for _ in range(3))
    response = proc.encrypt(seed, uid=enc_uid)
    assert proc.decrypt(response.ciphertext, response.key_id, response.annotations, uid=dec_uid) == seed
    with pytest.raises(grpc.RpcError):
        proc.decrypt(response.ciphertext[:-1], response.key_id, response.annotations, uid=bad_uid)
    proc.stop()
    records = _records(proc)  # raises if any line is not JSON
    assert all({"time", "level", "logger", "msg"} <= set(r) for r in records)
    by_uid = {r.get("uid"): r for r in records if r.get("uid")}
    assert by_uid[enc_uid]["method"] == "Encrypt" and by_uid[enc_uid]["code"] == "OK"
    assert by_uid[dec_uid]["method"] == "Decrypt" and by_uid[dec_uid]["code"] == "OK"
    assert by_uid[bad_uid]["code"] == "INVALID_ARGUMENT" and by_uid[bad_uid]["level"] == "warning"
    text = proc.log()
    for form in (seed.hex(), seed.hex().upper(), __import__("base64").b64encode(seed).decode(), repr(seed)):
        assert form not in text


def test_keyring_material_never_reaches_the_log(kleidi_factory: Any) -> None:
    proc = kleidi_factory()
    proc.encrypt(os.urandom(32))
    proc.stop()
    keyring = json.loads(proc.keyring.read_text())
    keys = [v["key"] for v in keyring["versions"] if "key" in v]
    assert keys
    log = proc.log()
    for key in keys:
        raw = __import__("base64").b64decode(key)
        assert key not in log and raw.hex() not in log


def test_info_level_logs_no_request_lines(kleidi_factory: Any) -> None:
    proc = kleidi_factory(settings={"logging": {"level": "info"}})
    proc.encrypt(os.urandom(32), uid="quiet-uid")
    proc.stop()
    assert not [r for r in _records(proc) if r.get("uid") == "quiet-uid"]
    assert any("serving KMS v2" in r["msg"] for r in _records(proc))


def test_the_suite_wide_secret_scan_does_catch_a_leak(tmp_path: Any) -> None:
    """Every kleidi_factory test ends with assert_no_secret_written; make sure it can fail."""
    from tests.conftest import assert_no_secret_written

    seed = os.urandom(32)
    (tmp_path / "audit.jsonl").write_text(json.dumps({"oops": __import__("base64").b64encode(seed).decode()}))
    with pytest.raises(AssertionError, match="a seed reached"):
        assert_no_secret_written(tmp_path, [seed])
    assert_no_secret_written(tmp_path, [os.urandom(32)])  # an unrelated seed is not reported
