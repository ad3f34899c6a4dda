"""Fixtures shared by the deployment tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.cluster import Etcd, KubeAPIServer, cleanup, kube_apiserver_binary


@pytest.fixture(scope="module")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeAPIServer]:
    """A real kube-apiserver and etcd, without kleidi: for server-side dry runs of rendered objects."""
    workdir = tmp_path_factory.mktemp("dry-run-api")
    etcd = Etcd(workdir)
    api = KubeAPIServer(workdir, "api", etcd, kube_apiserver_binary(), None)
    try:
        etcd.start()
        api.start()
        yield api
    finally:
        api.stop()
        etcd.stop()
        cleanup(workdir)
