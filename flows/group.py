"""Group-level Prefect flow: cohort statistics on the ROI table, written as Parquet."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from qsmdask.io.tables import write_parquet
from qsmdask.stats import run_group_analysis
from qsmdask.stats.design import GroupDesign
from qsmdask.workflows.cohort import load_group_inputs


@flow(name="qsmdask-group", log_prints=True)
def group_flow(bids_dir: str, output_dir: str, design: dict | None = None) -> dict:
    """Run every applicable analysis of ``design`` and write ``OUTPUT_DIR/group/<name>.parquet``."""
    log = get_run_logger()
    roi, participants, sessions = load_group_inputs(bids_dir, output_dir)
    gd = GroupDesign.from_dict(design) if design else GroupDesign()
    tables = run_group_analysis(roi, participants, sessions, design=gd)
    out = Path(output_dir) / "group"
    written = {}
    for name, df in tables.items():
        written[name] = str(write_parquet(df, out / f"{name}.parquet"))
        log.info("%s: %d rows -> %s", name, len(df), written[name])
    if "group_wilcoxon" in tables:
        t = tables["group_wilcoxon"]
        sig = t[t["p_corrected"] < 0.05]
        create_table_artifact(key="qsmdask-group-significant",
                              table=sig.astype(str).to_dict("records"),
                              description="Patients vs controls, Bonferroni-significant ROIs")
    return written
