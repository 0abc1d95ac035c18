"""Cohort flow: the participant level, then the group level, on one BIDS folder.

This is the flow a scheduled deployment runs (see ``prefect.yaml`` / ``flows/serve.py``):
new or changed subject-sessions are processed, the rest skipped, then statistics refreshed.
"""

from __future__ import annotations

from prefect import flow

from flows.group import group_flow
from flows.participant import participant_flow
from qsmdask.orchestration.cluster import flow_timeout_seconds


# QSMDASK_FLOW_TIMEOUT_S (Kubernetes ConfigMap): a hung run ends as TimedOut and frees the
# deployment's concurrency slot, before the Job's activeDeadlineSeconds kills the pod.
@flow(name="qsmdask-cohort", log_prints=True, timeout_seconds=flow_timeout_seconds())
def cohort_flow(bids_dir: str, output_dir: str, config: dict | None = None,
                design: dict | None = None, participant_labels: list[str] | None = None,
                tables_url: str | None = None, work_root: str | None = None,
                voxelwise: dict | None = None) -> dict:
    """``tables_url``/``work_root``: Parquet tables and zarr work area (paths or fsspec URLs
    such as ``s3://bucket/prefix``, credentials from the environment); default under
    ``output_dir``. ``voxelwise``: options of the group level's voxel-wise analysis."""
    part = participant_flow(bids_dir, output_dir, participant_labels=participant_labels, config=config,
                            tables_url=tables_url, work_root=work_root)
    group = {}
    if part["done"] or part["skipped"]:
        group = group_flow(bids_dir, output_dir, design=design, voxelwise=voxelwise, tables_url=tables_url)
    return {"participant": part, "group": group}
