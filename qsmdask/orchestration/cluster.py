"""Dask cluster configuration for the Prefect task runner (configuration, not code).

Memory-aware scheduling: every worker declares a Dask resource ``MEMORY`` (bytes it may
use, equal to its memory limit) and the participant flow annotates its heavy tasks with
their estimated peak (:func:`memory_annotation`); the scheduler then runs at most as many
of them on a worker at once as fit in its ``MEMORY``, whatever its thread count.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

__all__ = ["ClusterConfig", "make_task_runner", "task_runner_kwargs", "MEMORY_RESOURCE", "WORKER_ENV",
           "memory_annotation", "worker_memory_capacity", "current_client", "dashboard_link", "DEFAULT_DASHBOARD_ADDRESS",
           "VersionMismatchError", "qsmdask_version", "check_worker_versions", "cluster_client", "on_cluster",
           "flow_timeout_seconds"]

MEMORY_RESOURCE = "MEMORY"
# Environment of every worker: one thread per library inside each task (Dask owns the
# parallelism), and one ITK thread so that seeded ANTs registration is bit-identical from one
# run to the next (it must be set before ANTs starts in the worker process).
WORKER_ENV = {"ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "OMP_NUM_THREADS": "1",
              "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
KUBE_WORKER_MEMORY = "8GiB"  # the worker container limit of deploy/base/dask-cluster.yaml
#: The local Dask dashboard shows logs and tracebacks: only this machine may see it by default.
DEFAULT_DASHBOARD_ADDRESS = "127.0.0.1:0"


@dataclass(frozen=True)
class ClusterConfig:
    """Where tasks run.

    kind : "local" (a LocalCluster), "address" (an existing scheduler) or "kubernetes"
        (``dask_kubernetes.operator.KubeCluster`` with adaptive scaling).
    memory_limit : memory of one worker: "auto" (local: total memory / n_workers;
        kubernetes: 8 GiB, as the deploy/ manifests), bytes or a string like "4GiB".
        Local and Kubernetes workers get it as their memory limit and as the ``MEMORY``
        resource; the workers of an existing scheduler declare their own.
    dashboard_address : where a local cluster's Dask dashboard listens, ``HOST:PORT``
        (default ``127.0.0.1:0``: this machine only, a free port; ``:0`` or
        ``0.0.0.0:8787`` expose it to the network, logs and tracebacks included).
    """

    kind: str = "local"
    n_workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str | int = "auto"
    processes: bool = True
    address: str | None = None
    kube_name: str = "qsmdask"
    kube_image: str = "ghcr.io/qsmdask/qsmdask:latest"
    adapt_min: int = 0
    adapt_max: int = 10
    dashboard_address: str = DEFAULT_DASHBOARD_ADDRESS

    @classmethod
    def from_env(cls, environ=None) -> "ClusterConfig":
        """From ``QSMDASK_CLUSTER`` (local|address|kubernetes), ``QSMDASK_DASK_ADDRESS``,
        ``QSMDASK_N_WORKERS``, ``QSMDASK_WORKER_MEMORY``, ``QSMDASK_KUBE_IMAGE``,
        ``QSMDASK_ADAPT_MAX`` (deployments), ``QSMDASK_DASHBOARD_ADDRESS``."""
        env = os.environ if environ is None else environ
        address = env.get("QSMDASK_DASK_ADDRESS") or None
        kind = env.get("QSMDASK_CLUSTER") or ("address" if address else "local")
        return cls(kind=kind, address=address, n_workers=int(env.get("QSMDASK_N_WORKERS", 2)),
                   memory_limit=env.get("QSMDASK_WORKER_MEMORY") or "auto",
                   kube_image=env.get("QSMDASK_KUBE_IMAGE", cls.kube_image),
                   adapt_max=int(env.get("QSMDASK_ADAPT_MAX", cls.adapt_max)),
                   dashboard_address=env.get("QSMDASK_DASHBOARD_ADDRESS") or DEFAULT_DASHBOARD_ADDRESS)

    def __post_init__(self):
        if self.kind not in ("local", "address", "kubernetes"):
            raise ValueError(f"cluster kind must be local, address or kubernetes, got {self.kind!r}")
        if self.kind == "address" and not self.address:
            raise ValueError("cluster kind 'address' needs address='tcp://host:8786'")
        if self.n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {self.n_workers}")
        if not isinstance(self.dashboard_address, str) or ":" not in self.dashboard_address:
            raise ValueError(f"dashboard_address must be HOST:PORT (e.g. 127.0.0.1:0), got {self.dashboard_address!r}")
        if self.memory_limit != "auto":
            from dask.utils import parse_bytes
            try:
                ok = parse_bytes(self.memory_limit) > 0
            except (ValueError, TypeError):
                ok = False
            if not ok:
                raise ValueError(f"memory_limit must be 'auto', a number of bytes or a size like '4GiB', "
                                 f"got {self.memory_limit!r}")

    def worker_memory_bytes(self) -> int | None:
        """Memory of one worker in bytes (None for an existing scheduler: its workers say)."""
        from dask.utils import parse_bytes

        if self.memory_limit != "auto":
            return int(parse_bytes(self.memory_limit))
        if self.kind == "local":
            from distributed.system import MEMORY_LIMIT  # total memory, cgroup limits honoured
            return int(MEMORY_LIMIT // self.n_workers)
        if self.kind == "kubernetes":
            return int(parse_bytes(KUBE_WORKER_MEMORY))
        return None


def _worker_log_level() -> int:
    """Console level of the local Dask workers' own logs.

    Their stderr is the console. A subject-session's failure already reaches the failure table
    and the Prefect UI, so the workers' teardown chatter when a run is stopped (cancelled
    tasks, heartbeats to a closed scheduler) stays off the console: CRITICAL only, unless this
    process logs at DEBUG (``--debug``), where WARNING and above are shown as before.
    """
    return logging.WARNING if logging.getLogger().isEnabledFor(logging.DEBUG) else logging.CRITICAL


def task_runner_kwargs(cfg: ClusterConfig) -> dict:
    """Keyword arguments of ``prefect_dask.DaskTaskRunner`` for ``cfg``."""
    if cfg.kind == "address":
        return {"address": cfg.address}
    memory = cfg.worker_memory_bytes()
    if cfg.kind == "kubernetes":
        env = {**WORKER_ENV,
               **{k: v for k, v in os.environ.items() if k in ("PREFECT_API_URL", "PREFECT_API_KEY")}}
        return {"cluster_class": "dask_kubernetes.operator.KubeCluster",
                "cluster_kwargs": {"name": cfg.kube_name, "image": cfg.kube_image, "env": env,
                                   "resources": {"requests": {"memory": str(memory)},
                                                 "limits": {"memory": str(memory)}},
                                   "worker_command": ["dask-worker", "--memory-limit", str(memory),
                                                      "--resources", f"{MEMORY_RESOURCE}={memory}"]},
                "adapt_kwargs": {"minimum": cfg.adapt_min, "maximum": cfg.adapt_max}}
    kwargs = {"n_workers": cfg.n_workers, "threads_per_worker": cfg.threads_per_worker,
              "processes": cfg.processes, "dashboard_address": cfg.dashboard_address,
              "silence_logs": _worker_log_level(),
              "resources": {MEMORY_RESOURCE: memory}}
    if cfg.processes:
        kwargs["memory_limit"] = memory
        # worker processes start with these (values already set in this process win)
        kwargs["env"] = {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
    return {"cluster_class": "distributed.LocalCluster", "cluster_kwargs": kwargs}


def make_task_runner(cfg: ClusterConfig):
    """A prefect_dask.DaskTaskRunner for ``cfg``; workers inherit PREFECT_API_URL from this process."""
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(**task_runner_kwargs(cfg))


def memory_annotation(nbytes: int | None):
    """Context in which submitted Dask tasks (Prefect ``task.submit`` included) need ``nbytes``
    of the worker resource ``MEMORY``; a no-op for None."""
    if not nbytes:
        return contextlib.nullcontext()
    import dask
    return dask.annotate(resources={MEMORY_RESOURCE: int(nbytes)})


def worker_memory_capacity(client, fallback: int | None = None) -> int | None:
    """The largest ``MEMORY`` resource any worker of ``client`` declares.

    ``fallback`` (the configured worker memory) stands in while an adaptive cluster has no
    worker yet; None when the workers declare no ``MEMORY`` (then tasks are not annotated,
    since a task asking for a resource no worker has would never run).
    """
    workers = (client.scheduler_info(n_workers=-1) or {}).get("workers", {})
    if not workers:
        return fallback
    values = [w.get("resources", {}).get(MEMORY_RESOURCE) for w in workers.values()]
    values = [v for v in values if v]
    return int(max(values)) if values else None


def current_client():
    """The Dask client of the running flow's task runner, or None (no flow, not on Dask)."""
    try:
        from prefect.context import FlowRunContext
        ctx = FlowRunContext.get()
        runner = getattr(ctx, "task_runner", None) if ctx else None
        return getattr(runner, "client", None) if runner is not None else None
    except Exception:  # noqa: BLE001 - a missing dashboard must never break a run
        return None


def dashboard_link(client) -> str | None:
    """The scheduler's dashboard URL, or None when it has none."""
    try:
        return client.dashboard_link or None
    except Exception:  # noqa: BLE001
        return None


class VersionMismatchError(RuntimeError):
    """Dask workers run another qsmdask than the flow (e.g. a DaskCluster left on the old
    image after an upgrade: the dask-kubernetes operator does not roll its pods)."""


def qsmdask_version() -> str:
    """The qsmdask version of this process (runs on workers through ``client.run``)."""
    import qsmdask
    return str(qsmdask.__version__)


def check_worker_versions(client, expected: str | None = None) -> dict[str, str]:
    """``{worker address: qsmdask version}``; raises :class:`VersionMismatchError` naming
    every worker whose version differs from ``expected`` (default: this process's)."""
    expected = expected or qsmdask_version()
    try:
        versions = client.run(qsmdask_version)
    except Exception as e:  # an old worker may not even have this function
        raise VersionMismatchError(
            f"could not read the qsmdask version of the Dask workers ({type(e).__name__}: {e}); "
            f"this flow runs qsmdask {expected}. Recreate the Dask cluster on the flow's image "
            "(Kubernetes: kubectl delete daskcluster qsmdask, then kubectl apply -k; see deploy/README.md)") from e
    bad = {w: v for w, v in versions.items() if v != expected}
    if bad:
        listing = ", ".join(f"{w} runs {v}" for w, v in sorted(bad.items()))
        raise VersionMismatchError(
            f"refusing to start: this flow runs qsmdask {expected} but {len(bad)} of {len(versions)} "
            f"Dask worker(s) run another version ({listing}). Results of mixed versions are not "
            "comparable. Recreate the Dask cluster on the flow's image (Kubernetes: kubectl delete "
            "daskcluster qsmdask, then kubectl apply -k deploy/overlays/<site>; see deploy/README.md, "
            "'Upgrade').")
    return versions


@contextlib.contextmanager
def cluster_client(cfg: ClusterConfig | None = None):
    """A ``distributed.Client`` of the configured external scheduler (kind "address"), else
    None (work then runs in this process)."""
    cfg = ClusterConfig.from_env() if cfg is None else cfg
    if cfg.kind != "address":
        yield None
        return
    from distributed import Client

    client = Client(cfg.address, timeout="120s", set_as_default=False)
    try:
        yield client
    finally:
        client.close()


def on_cluster(client, fn, /, *args, **kwargs):
    """``fn(*args, **kwargs)`` as one Dask task when ``client`` is given, else here."""
    if client is None:
        return fn(*args, **kwargs)
    return client.submit(fn, *args, pure=False, **kwargs).result()


def flow_timeout_seconds(environ=None) -> float | None:
    """``QSMDASK_FLOW_TIMEOUT_S`` (seconds) as a flow timeout; None when unset or 0."""
    env = os.environ if environ is None else environ
    raw = env.get("QSMDASK_FLOW_TIMEOUT_S") or ""
    try:
        value = float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"QSMDASK_FLOW_TIMEOUT_S must be a number of seconds, got {raw!r}") from None
    return value if value > 0 else None
