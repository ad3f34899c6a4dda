"""Prometheus metrics and the /livez, /readyz and /metrics endpoints.

Label values are bounded by construction: gRPC method names, gRPC status code names, backend kinds
and operation names. No uid, error text, raw key name or key_id is ever a label; the current key
is exposed only as a hash (``kleidi_current_key_info{key_id_hash="sha256:..."}``), as the apiserver
does for its own metrics.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger("kleidi.telemetry")

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

REQUESTS = Counter("kleidi_requests_total", "gRPC calls answered, by method and gRPC status code.",
                   ["method", "code"], registry=REGISTRY)
REQUEST_SECONDS = Histogram("kleidi_request_duration_seconds", "Time to answer a gRPC call.",
                            ["method", "code"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
IN_FLIGHT = Gauge("kleidi_requests_in_flight", "gRPC calls being answered now.", registry=REGISTRY)
BACKEND_CALLS = Counter("kleidi_backend_calls_total", "Calls to the KEK backend, by operation and outcome.",
                        ["backend", "operation", "outcome"], registry=REGISTRY)
BACKEND_SECONDS = Histogram("kleidi_backend_call_duration_seconds", "Time of one call to the KEK backend.",
                            ["backend", "operation"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
HEALTHY = Gauge("kleidi_healthy", "1 when Status reports healthz ok, else 0.", registry=REGISTRY)
CURRENT_KEY = Gauge("kleidi_current_key_info", "The current KEK, by the SHA-256 of its key_id.",
                    ["key_id_hash"], registry=REGISTRY)
ROTATIONS = Counter("kleidi_key_rotations_observed_total", "Changes of the current key_id seen at refresh.",
                    registry=REGISTRY)
PEER_REJECTIONS = Counter("kleidi_peer_credential_rejections_total",
                          "Connections refused because the caller's uid/gid (SO_PEERCRED) is not allowed.",
                          registry=REGISTRY)
AUDIT_RECORDS = Counter("kleidi_audit_records_total", "Records written to the audit log.", registry=REGISTRY)
AUDIT_WRITE_FAILURES = Counter("kleidi_audit_write_failures_total",
                               "Audit records that could not be written (lost; counted in the next audit_gap record).",
                               registry=REGISTRY)
AUDIT_HEALTHY = Gauge("kleidi_audit_healthy", "1 when audit records are written (or there is no audit log), "
                      "0 while they are being lost.", registry=REGISTRY)
AUDIT_HEALTHY.set(1)
VAULT_LOGINS = Counter("kleidi_vault_logins_total", "Logins to Vault (first, after expiry or refusal).",
                       registry=REGISTRY)
VAULT_RENEWALS = Counter("kleidi_vault_token_renewals_total", "Vault token renewals.", registry=REGISTRY)
VAULT_TOKEN_EXPIRY = Gauge("kleidi_vault_token_expiry_timestamp_seconds",
                           "Unix time at which the current Vault token expires (0: never).", registry=REGISTRY)


def key_id_hash(key_id: str) -> str:
    return "sha256:" + hashlib.sha256(key_id.encode()).hexdigest()


def set_current_key(key_id: str) -> None:
    CURRENT_KEY.clear()
    CURRENT_KEY.labels(key_id_hash(key_id)).set(1)


@contextmanager
def backend_call(backend: str, operation: str) -> Iterator[None]:
    started = time.perf_counter()
    outcome = "error"
    try:
        yield
        outcome = "ok"
    finally:
        BACKEND_SECONDS.labels(backend, operation).observe(time.perf_counter() - started)
        BACKEND_CALLS.labels(backend, operation, outcome).inc()


class HealthServer:
    """Plain HTTP on a loopback address: /livez, /readyz, /metrics."""

    def __init__(self, address: str, live: Callable[[], tuple[bool, str]],
                 ready: Callable[[], tuple[bool, str]]) -> None:
        host, _, port = address.rpartition(":")
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                elif path in ("/livez", "/readyz"):
                    ok, detail = (outer.live if path == "/livez" else outer.ready)()
                    self._send(200 if ok else 503, (detail + "\n").encode(), "text/plain; charset=utf-8")
                else:
                    self._send(404, b"not found: try /metrics, /livez or /readyz\n", "text/plain; charset=utf-8")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes every few seconds would flood the log

        self.live, self.ready = live, ready
        self._server = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="kleidi-health", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
