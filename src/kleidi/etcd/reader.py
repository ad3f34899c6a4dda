"""Read-only, paged access to etcd with the connection flags kube-apiserver uses.

The client is etcd3gw, which talks to etcd's JSON gateway (``POST /v3/kv/range``): etcd serves it on
the same client port as gRPC, it is maintained, typed, and needs no generated stubs (the older
``etcd3`` package breaks with protobuf 7). Every read is a range with a ``limit`` (one page) at one
``revision``: the first request pins the revision and every later page reads that same snapshot, so a
scan counts each object exactly once even while the apiserver writes. Nothing here writes to etcd.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kleidi.errors import ConfigError, ServiceUnavailable

DEFAULT_PAGE_SIZE = 500
_CONNECTION_FIX = ("check --etcd-endpoints (kube-apiserver's --etcd-servers) and that etcd is up; for TLS give "
                   "--etcd-cert, --etcd-key and --etcd-ca as kube-apiserver's --etcd-certfile, --etcd-keyfile and "
                   "--etcd-cafile")


class EtcdUnavailable(ServiceUnavailable):
    """etcd cannot be read: no endpoint answers, TLS is refused, or the pinned revision was compacted."""


@dataclass(frozen=True)
class EtcdOptions:
    """How to reach etcd, as kube-apiserver's ``--etcd-servers/--etcd-certfile/--etcd-keyfile/--etcd-cafile``."""

    endpoints: tuple[str, ...]
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    timeout: float = 30.0


@dataclass(frozen=True)
class _Endpoint:
    url: str
    protocol: str
    host: str
    port: int


def _parse_endpoints(options: EtcdOptions) -> list[_Endpoint]:
    if not options.endpoints:
        raise ConfigError("no etcd endpoint given", fix="pass --etcd-endpoints https://127.0.0.1:2379")
    if (options.cert is None) != (options.key is None):
        raise ConfigError("--etcd-cert and --etcd-key go together", fix="pass both, or neither")
    for flag, path in (("--etcd-cert", options.cert), ("--etcd-key", options.key), ("--etcd-ca", options.ca)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag} {path} is not a readable file",
                              fix=f"pass the file kube-apiserver uses for {flag}")
    parsed = []
    for raw in options.endpoints:
        url = raw.strip().rstrip("/")
        parts = urlsplit(url if "://" in url else f"http://{url}")
        try:
            port = parts.port or 2379
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port < 0 or parts.path:
            raise ConfigError(f"etcd endpoint {raw!r} is not http(s)://host:port",
                              fix="write it as kube-apiserver's --etcd-servers does, e.g. https://10.0.0.1:2379")
        if parts.scheme == "http" and (options.cert or options.ca):
            raise ConfigError(f"etcd endpoint {raw!r} is plain http but TLS files were given",
                              fix="use https:// endpoints with --etcd-cert/--etcd-key/--etcd-ca")
        parsed.append(_Endpoint(url, parts.scheme, parts.hostname, port))
    return parsed


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key after every key that starts with ``prefix`` (etcd's ``range_end`` for a prefix)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # every key


class EtcdReader:
    """Pages through key ranges of one etcd cluster, trying each endpoint in turn when one fails."""

    def __init__(self, options: EtcdOptions) -> None:
        self._endpoints = _parse_endpoints(options)
        self._options = options
        self._index = 0
        self._client: Any = None
        # Per request, since requests lets $REQUESTS_CA_BUNDLE/$CURL_CA_BUNDLE override a session's CA.
        self._tls: dict[str, Any] = {"verify": str(options.ca)} if options.ca else {}

    @property
    def endpoint(self) -> str:
        """The endpoint that answered last."""
        return self._endpoints[self._index].url

    def _connect(self, index: int) -> Any:
        from etcd3gw.client import Etcd3Client

        ep, opts = self._endpoints[index], self._options
        return Etcd3Client(host=ep.host, port=ep.port, protocol=ep.protocol, timeout=opts.timeout, api_path="/v3/",
                           ca_cert=str(opts.ca) if opts.ca else None, cert_key=str(opts.key) if opts.key else None,
                           cert_cert=str(opts.cert) if opts.cert else None)

    def _range(self, payload: dict[str, Any]) -> dict[str, Any]:
        from etcd3gw import exceptions

        errors = []
        for attempt in range(len(self._endpoints)):
            index = (self._index + attempt) % len(self._endpoints)
            if self._client is None or index != self._index:
                self._client, self._index = self._connect(index), index
            try:
                result: dict[str, Any] = self._client.post(self._client.get_url("/kv/range"), json=payload,
                                                           **self._tls)
                return result
            except (exceptions.ConnectionFailedError, exceptions.ConnectionTimeoutError) as exc:
                errors.append(f"{self._endpoints[index].url}: {_reason(exc)}")
                self._client = None
            except exceptions.Etcd3Exception as exc:
                detail = _reason(exc)
                if "compacted" in detail:
                    raise EtcdUnavailable(f"etcd compacted revision {payload.get('revision')} during the scan",
                                          fix="run the scan again (a larger --page-size finishes sooner)") from None
                raise EtcdUnavailable(f"etcd at {self._endpoints[index].url} refused the read: {detail}",
                                      fix=_CONNECTION_FIX) from None
        raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(errors), fix=_CONNECTION_FIX)

    def snapshot(self, prefix: bytes) -> tuple[int, int]:
        """Pin a snapshot: ``(revision, number of keys under prefix at that revision)``."""
        result = self._range({"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)), "count_only": True})
        return int(result["header"]["revision"]), int(result.get("count", 0))

    def count(self, prefix: bytes, revision: int) -> int:
        """How many keys start with ``prefix`` at ``revision``."""
        result = self._range({"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)), "count_only": True,
                              "revision": revision})
        return int(result.get("count", 0))

    def pages(self, prefix: bytes, revision: int, page_size: int = DEFAULT_PAGE_SIZE
              ) -> Iterator[list[tuple[bytes, bytes]]]:
        """Every ``(key, value)`` under ``prefix`` at ``revision``, in key order, ``page_size`` at a time."""
        if page_size < 1:
            raise ConfigError(f"page size {page_size} is not positive", fix="use e.g. --page-size 500")
        start, end = prefix, _b64(prefix_end(prefix))
        while True:
            result = self._range({"key": _b64(start), "range_end": end, "limit": page_size, "revision": revision})
            kvs = result.get("kvs") or []
            page = [(base64.b64decode(kv["key"]), base64.b64decode(kv.get("value", ""))) for kv in kvs]
            if page:
                yield page
            if not result.get("more") or not page:
                return
            start = page[-1][0] + b"\x00"


def _reason(exc: BaseException) -> str:
    """etcd3gw puts the server's or requests' text in ``detail_text``; keep it short."""
    text = getattr(exc, "detail_text", None) or str(exc) or type(exc).__name__
    text = " ".join(str(text).split())
    for marker in ("certificate required", "CERTIFICATE_VERIFY_FAILED", "Connection refused", "timed out",
                   "bad certificate", "unknown ca"):
        if marker.lower() in text.lower():
            return marker
    return text[:300]
