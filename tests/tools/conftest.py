"""The e2e suite's fixtures (tests/e2e/conftest.py: a real etcd, kube-apiserver and kleidi), shared by the
tools' tests that need an apiserver."""

from tests.e2e.conftest import apiserver_binary, cluster, control_plane

__all__ = ["apiserver_binary", "cluster", "control_plane"]
