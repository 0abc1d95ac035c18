"""Dask cluster configuration for the Prefect task runner (configuration, not code)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

__all__ = ["ClusterConfig", "make_task_runner"]


@dataclass(frozen=True)
class ClusterConfig:
    """Where tasks run.

    kind : "local" (a LocalCluster), "address" (an existing scheduler) or "kubernetes"
        (``dask_kubernetes.operator.KubeCluster`` with adaptive scaling).
    """

    kind: str = "local"
    n_workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    processes: bool = True
    address: str | None = None
    kube_name: str = "qsmdask"
    kube_image: str = "ghcr.io/qsmdask/qsmdask:latest"
    adapt_min: int = 0
    adapt_max: int = 10

    @classmethod
    def from_env(cls, environ=None) -> "ClusterConfig":
        """From ``QSMDASK_CLUSTER`` (local|address|kubernetes), ``QSMDASK_DASK_ADDRESS``,
        ``QSMDASK_N_WORKERS``, ``QSMDASK_KUBE_IMAGE``, ``QSMDASK_ADAPT_MAX`` (deployments)."""
        env = os.environ if environ is None else environ
        address = env.get("QSMDASK_DASK_ADDRESS") or None
        kind = env.get("QSMDASK_CLUSTER") or ("address" if address else "local")
        return cls(kind=kind, address=address, n_workers=int(env.get("QSMDASK_N_WORKERS", 2)),
                   kube_image=env.get("QSMDASK_KUBE_IMAGE", cls.kube_image),
                   adapt_max=int(env.get("QSMDASK_ADAPT_MAX", cls.adapt_max)))

    def __post_init__(self):
        if self.kind not in ("local", "address", "kubernetes"):
            raise ValueError(f"cluster kind must be local, address or kubernetes, got {self.kind!r}")
        if self.kind == "address" and not self.address:
            raise ValueError("cluster kind 'address' needs address='tcp://host:8786'")
        if self.n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {self.n_workers}")


def make_task_runner(cfg: ClusterConfig):
    """A prefect_dask.DaskTaskRunner for ``cfg``; workers inherit PREFECT_API_URL from this process."""
    from prefect_dask import DaskTaskRunner

    if cfg.kind == "address":
        return DaskTaskRunner(address=cfg.address)
    if cfg.kind == "kubernetes":
        env = {k: v for k, v in os.environ.items() if k in ("PREFECT_API_URL", "PREFECT_API_KEY")}
        return DaskTaskRunner(
            cluster_class="dask_kubernetes.operator.KubeCluster",
            cluster_kwargs={"name": cfg.kube_name, "image": cfg.kube_image, "env": env},
            adapt_kwargs={"minimum": cfg.adapt_min, "maximum": cfg.adapt_max})
    kwargs = {"n_workers": cfg.n_workers, "threads_per_worker": cfg.threads_per_worker,
              "processes": cfg.processes, "dashboard_address": ":0", "silence_logs": logging.WARNING}
    if cfg.processes:
        kwargs["memory_limit"] = cfg.memory_limit
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)
