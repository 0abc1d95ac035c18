"""Cohort flow: the participant level, then the group level, on one BIDS folder.

This is the flow a scheduled deployment runs (see ``prefect.yaml`` / ``flows/serve.py``):
new or changed subject-sessions are processed, the rest skipped, then statistics refreshed.
"""

from __future__ import annotations

from prefect import flow

from flows.group import group_flow
from flows.participant import participant_flow


@flow(name="qsmdask-cohort", log_prints=True)
def cohort_flow(bids_dir: str, output_dir: str, config: dict | None = None,
                design: dict | None = None, participant_labels: list[str] | None = None,
                tables_url: str | None = None) -> dict:
    part = participant_flow(bids_dir, output_dir, participant_labels=participant_labels, config=config,
                            tables_url=tables_url)
    group = {}
    if part["done"] or part["skipped"]:
        group = group_flow(bids_dir, output_dir, design=design, tables_url=tables_url)
    return {"participant": part, "group": group}
