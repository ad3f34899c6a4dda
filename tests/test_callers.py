"""Caller authentication on the socket: real processes of other users connect to a real kleidi.

Another user is a forked child that drops to that uid/gid and connects; the kernel records its
credentials (SO_PEERCRED) at connect time. The child hands the connected socket back over
SCM_RIGHTS, and the test's real gRPC client talks through it, so kleidi sees a caller of that uid
while the test process (root) drives the calls.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import grpc
import pytest

from kleidi._proto.kmsv2 import api_pb2 as v2_pb
from kleidi._proto.kmsv2 import api_pb2_grpc as v2_grpc
from tests.conftest import wait_for
from tests.hostile.support import NOBODY, audit_records, channel_through, connected_as, shared_kleidi
from tests.test_telemetry import get, samples, value

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")  # CI runs as root


def encrypt(stub: v2_grpc.KeyManagementServiceStub, uid: str) -> v2_pb.EncryptResponse:
    return stub.Encrypt(v2_pb.EncryptRequest(plaintext=os.urandom(32), uid=uid), timeout=5)


def test_another_user_is_refused_and_the_refusal_is_logged_audited_and_counted(kleidi_factory, short_dir):
    proc = shared_kleidi(kleidi_factory, short_dir)
    audit_log = short_dir / "audit.jsonl"

    with channel_through(connected_as(NOBODY, NOBODY, str(proc.socket_path)), short_dir) as stub:
        with pytest.raises(grpc.RpcError) as refused:
            encrypt(stub, "uid-from-nobody")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"caller uid {NOBODY} is not allowed" in refused.value.details()

    # The allowed caller (root, the test process) is served as before, and named in its records.
    sealed = proc.encrypt(os.urandom(32), uid="uid-from-root")
    assert sealed.key_id

    wait_for(lambda: "refused a caller" in proc.log(), 10, "the refusal in the log")
    line = next(json.loads(x) for x in proc.log().splitlines() if "refused a caller" in x)
    assert line["level"] == "warning" and line["caller_uid"] == NOBODY and line["caller_gid"] == NOBODY
    assert line["method"] == "/v2.KeyManagementService/Encrypt"
    assert "fix" in line["msg"]

    records = audit_records(audit_log)
    refusals = [r for r in records if r["event"] == "caller_refused"]
    assert len(refusals) == 1
    assert refusals[0]["caller_uid"] == NOBODY and refusals[0]["outcome"] == "PERMISSION_DENIED"
    assert refusals[0]["method"] == "/v2.KeyManagementService/Encrypt"
    assert not any(r.get("uid") == "uid-from-nobody" for r in records)  # the call never reached the service
    served = next(r for r in records if r.get("uid") == "uid-from-root")
    assert served["event"] == "Encrypt" and served["caller_uid"] == os.getuid()
    assert served["caller_pid"] == os.getpid()

    assert value(samples(proc), "kleidi_peer_credential_rejections_total") == 1
    assert value(samples(proc), "kleidi_requests_total", method="Encrypt", code="OK") == 1


def test_allowed_uid_is_served_and_everyone_else_refused(kleidi_factory, short_dir):
    proc = shared_kleidi(kleidi_factory, short_dir, wait=False, allowed_uids=["nobody"])

    with channel_through(connected_as(NOBODY, NOBODY, str(proc.socket_path)), short_dir) as stub:
        assert stub.Status(v2_pb.StatusRequest(), timeout=5).healthz == "ok"
        sealed = encrypt(stub, "uid-from-nobody")
        assert sealed.key_id.startswith("kleidi:local:v1:")

    # root is not on this allowlist; kleidi's own /livez probe still reaches its socket.
    with pytest.raises(grpc.RpcError) as refused:
        proc.status()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert get(proc, "/livez")[0] == 200

    records = audit_records(short_dir / "audit.jsonl")
    served = next(r for r in records if r.get("uid") == "uid-from-nobody")
    assert served["caller_uid"] == NOBODY and served["outcome"] == "OK"
    assert [r["caller_uid"] for r in records if r["event"] == "caller_refused"] == [os.getuid()]


def test_allowed_group_admits_any_uid_of_that_group(kleidi_factory, short_dir):
    proc = shared_kleidi(kleidi_factory, short_dir, wait=False, allowed_uids=[], allowed_gids=["nogroup"])

    with channel_through(connected_as(12345, NOBODY, str(proc.socket_path)), short_dir) as stub:
        assert encrypt(stub, "in-group").key_id
    with channel_through(connected_as(12345, 12345, str(proc.socket_path)), short_dir) as stub:
        with pytest.raises(grpc.RpcError) as refused:
            encrypt(stub, "not-in-group")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The refusal is logged by the gate's own task, which may run just after the caller has its answer.
    wait_for(lambda: "allowed: no uid or gid 65534" in proc.log(), 10, "the refusal's log line")


def test_abstract_socket_is_guarded_by_the_caller_check(kleidi_factory, short_dir):
    name = f"kleidi-test-{uuid.uuid4().hex}"
    proc = shared_kleidi(kleidi_factory, short_dir, wait=False, endpoint=f"unix:///@{name}")

    with channel_through(connected_as(NOBODY, NOBODY, f"\0{name}"), short_dir) as stub:
        with pytest.raises(grpc.RpcError) as refused:
            stub.Status(v2_pb.StatusRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with grpc.insecure_channel(f"unix-abstract:{name}") as channel:
        assert v2_grpc.KeyManagementServiceStub(channel).Status(v2_pb.StatusRequest(), timeout=5).healthz == "ok"
    assert proc.stop() == 0


def test_the_private_grpc_socket_cannot_be_used_to_go_around_the_check(kleidi_factory, short_dir):
    proc = shared_kleidi(kleidi_factory, short_dir)
    private = re.search(r"gRPC server behind it on (\S+?)\"", proc.log())
    assert private, proc.log()
    private_path = Path(private.group(1))
    assert private_path.parent.stat().st_mode & 0o777 == 0o700  # other users cannot even reach it

    with grpc.insecure_channel(f"unix://{private_path}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            v2_grpc.KeyManagementServiceStub(channel).Encrypt(
                v2_pb.EncryptRequest(plaintext=os.urandom(32), uid="direct"), timeout=5)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "public socket" in refused.value.details()

    assert proc.stop() == 0
    assert not private_path.parent.exists()  # removed at shutdown


def test_without_caller_authentication_file_permissions_decide(kleidi_factory, short_dir):
    proc = shared_kleidi(kleidi_factory, short_dir, authenticate_callers=False, socket_mode="0660",
                         socket_group="nogroup")
    with channel_through(connected_as(12345, NOBODY, str(proc.socket_path)), short_dir) as stub:
        assert encrypt(stub, "uid-from-nobody").key_id  # the socket's group let it in; nothing else checks
    record = next(r for r in audit_records(short_dir / "audit.jsonl") if r.get("uid") == "uid-from-nobody")
    assert "caller_uid" not in record
    assert "callers authenticated" not in proc.log()
