"""Tests of the rotation and recovery tools (#14), and what they share: writing raw values into etcd."""

from __future__ import annotations

import base64
from collections.abc import Iterable

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops


def put_raw(etcd_url: str, items: Iterable[tuple[str, bytes]], batch: int = MAX_TXN_OPS) -> int:
    """Write raw values straight into etcd, ``batch`` puts per transaction (as the apiserver would have
    stored them; nothing goes through an apiserver). Returns how many were written."""
    from urllib.parse import urlsplit

    from etcd3gw.client import Etcd3Client

    parts = urlsplit(etcd_url)
    client = Etcd3Client(host=parts.hostname or "127.0.0.1", port=parts.port or 2379, api_path="/v3/")
    ops: list[dict[str, dict[str, str]]] = []
    written = 0

    def flush() -> None:
        if ops:
            client.transaction({"compare": [], "success": ops, "failure": []})
            ops.clear()

    for key, value in items:
        ops.append({"request_put": {"key": base64.b64encode(key.encode()).decode(),
                                    "value": base64.b64encode(value).decode()}})
        written += 1
        if len(ops) >= batch:
            flush()
    flush()
    return written
