"""Scheduled cohort runs: a Prefect deployment of the cohort flow with a cron schedule.

Serve it from any machine that sees the BIDS folder (``qsmdask serve`` calls :func:`serve`),
or deploy it to a work pool with ``prefect deploy`` and the repository's ``prefect.yaml``.
"""

from __future__ import annotations

from flows.cohort import cohort_flow

DEFAULT_CRON = "0 2 * * *"  # every night at 02:00


def cohort_deployment(bids_dir: str, output_dir: str, *, cron: str = DEFAULT_CRON,
                      config: dict | None = None, design: dict | None = None,
                      tables_url: str | None = None, name: str = "qsmdask-cohort-nightly"):
    """A RunnerDeployment that runs :func:`flows.cohort.cohort_flow` on ``bids_dir`` on ``cron``."""
    return cohort_flow.to_deployment(
        name=name, cron=cron, tags=["qsmdask"],
        parameters={"bids_dir": str(bids_dir), "output_dir": str(output_dir),
                    "config": config or {}, "design": design or {},
                    **({"tables_url": str(tables_url)} if tables_url else {})},
        description="Process new or changed subject-sessions, then refresh the cohort statistics.")


def serve(bids_dir: str, output_dir: str, *, cron: str = DEFAULT_CRON, config=None, design=None,
          tables_url: str | None = None):
    """Register the deployment and run it on schedule in this process (blocks)."""
    from prefect import serve as prefect_serve
    prefect_serve(cohort_deployment(bids_dir, output_dir, cron=cron, config=config, design=design,
                                    tables_url=tables_url))
