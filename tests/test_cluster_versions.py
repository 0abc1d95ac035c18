"""A flow refuses to run on Dask workers of another qsmdask version; the group level runs
on the external cluster; the flow timeout comes from configuration."""

from __future__ import annotations

import os

import pytest

from qsmdask.orchestration.cluster import (ClusterConfig, VersionMismatchError, check_worker_versions,
                                           cluster_client, flow_timeout_seconds, on_cluster, qsmdask_version)


def _pretend_old_version():  # runs inside one worker process
    import qsmdask
    qsmdask.__version__ = "0.0.9"
    return qsmdask.__version__


def _where():
    return os.getpid()


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=40) as c:
        yield c


def test_flow_refuses_workers_with_another_qsmdask_version(cluster):
    from distributed import Client

    with Client(cluster) as client:
        addresses = sorted(client.scheduler_info()["workers"])
        assert check_worker_versions(client) == {a: qsmdask_version() for a in addresses}
        client.run(_pretend_old_version, workers=[addresses[0]])   # one worker left on an old image
        try:
            with pytest.raises(VersionMismatchError) as err:
                check_worker_versions(client)
            msg = str(err.value)
            assert "refusing to start" in msg and f"qsmdask {qsmdask_version()}" in msg
            assert f"{addresses[0]} runs 0.0.9" in msg and addresses[1] not in msg
            assert "kubectl delete daskcluster qsmdask" in msg
        finally:
            client.run(lambda v=qsmdask_version(): __import__("qsmdask").__setattr__("__version__", v),
                       workers=[addresses[0]])
        assert check_worker_versions(client)


def test_group_work_runs_as_a_task_on_the_configured_cluster(cluster):
    cfg = ClusterConfig(kind="address", address=cluster.scheduler_address)
    with cluster_client(cfg) as client:
        pid = on_cluster(client, _where)
        assert pid != os.getpid()                       # ran in a worker process
    with cluster_client(ClusterConfig(kind="local")) as client:
        assert client is None and on_cluster(client, _where) == os.getpid()


def test_flow_timeout_from_configuration():
    assert flow_timeout_seconds({}) is None and flow_timeout_seconds({"QSMDASK_FLOW_TIMEOUT_S": "0"}) is None
    assert flow_timeout_seconds({"QSMDASK_FLOW_TIMEOUT_S": "79200"}) == 79200.0
    with pytest.raises(ValueError, match="QSMDASK_FLOW_TIMEOUT_S"):
        flow_timeout_seconds({"QSMDASK_FLOW_TIMEOUT_S": "1d"})
