"""``kleidi serve``: one kleidi instance, split by concern.

- :mod:`kleidi.server.instance`: :class:`Server`, which starts the parts in order, runs until a signal
  and cleans up whatever started;
- :mod:`kleidi.server.listener`: the gRPC server on the unix socket, either behind the caller gate
  (SO_PEERCRED) or on the socket itself;
- :mod:`kleidi.server.reload`: SIGHUP and config-file reloads, one at a time;
- :mod:`kleidi.server.health`: /livez and /readyz on the telemetry listener;
- :mod:`kleidi.server.audit_upkeep`: opening the audit log and its background fsync and recovery.

Process hardening lives in :mod:`kleidi.hardening`.
"""

from kleidi.server.instance import Server, serve

__all__ = ["Server", "serve"]
