"""Group-level Prefect flow: cohort statistics on the ROI table, written as Parquet."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from qsmdask.io.derivatives import DerivativesWriter, configuration_differences
from qsmdask.orchestration.cluster import check_worker_versions, cluster_client, on_cluster
from qsmdask.report import build_cohort_report
from qsmdask.workflows.voxelwise import VoxelwiseOptions, run_voxelwise, run_voxelwise_on_worker
from qsmdask.stats import run_group_analysis
from qsmdask.stats.design import GroupDesign
from qsmdask.workflows.cohort import load_group_inputs, participant_atlas, select_acquisitions


@flow(name="qsmdask-group", log_prints=True)
def group_flow(bids_dir: str, output_dir: str, design: dict | None = None,
               voxelwise: dict | None = None, tables_url: str | None = None) -> dict:
    """Run every applicable analysis of ``design`` and write ``<tables>/group/<name>.parquet``.

    ``voxelwise``: options of :class:`qsmdask.workflows.voxelwise.VoxelwiseOptions`
    (``{"enabled": False}`` skips the whole-brain permutation analysis).
    ``tables_url``: where the ROI tables are read and the group tables written (path or
    fsspec URL; default ``output_dir``).
    """
    log = get_run_logger()
    # With an external Dask cluster (QSMDASK_CLUSTER=address: Kubernetes), the statistics and
    # the voxel-wise permutations run on its workers, not in this (small) flow-run process.
    with cluster_client() as client:
        if client is not None:
            check_worker_versions(client)
            log.info("group level on the Dask cluster %s", client.scheduler.address)
        return _group(log, client, bids_dir, output_dir, design, voxelwise, tables_url)


def _group(log, client, bids_dir, output_dir, design, voxelwise, tables_url) -> dict:
    t0 = time.monotonic()

    def stage(msg):  # progress on the console (and in the run's log file), and in the flow-run log
        sys.stderr.write(f"  group level: {msg}  (elapsed {time.monotonic() - t0:.0f} s)\n")
        sys.stderr.flush()
        log.info(msg)

    roi, participants, sessions = load_group_inputs(bids_dir, output_dir, tables_url)
    gd = GroupDesign.from_dict(design) if design else GroupDesign()
    participants = gd.label_groups(participants, source=f"{Path(bids_dir) / 'participants.tsv'}")
    roi, notes = select_acquisitions(roi, acq=gd.acq, run=gd.run)  # one acquisition per subject-session
    for line in notes:
        log.info("acquisition: %s", line)
    for line in configuration_differences(output_dir):  # e.g. one subject rerun with a changed option
        log.warning("subject-sessions reconstructed with different configurations (rerun the participant "
                    "level of the others with --force before comparing them): %s", line)
    writer = DerivativesWriter(output_dir, tables_url=tables_url)
    writer.write_run_config(
        {"level": "group", "bids_dir": str(bids_dir), "design": gd.to_dict(),
         "tables_url": tables_url}, name="qsmdask_group_config.json")
    stage(f"ROI statistics on {roi[['participant_id', 'session_id']].drop_duplicates().shape[0]} "
          f"subject-session(s)")
    tables = on_cluster(client, run_group_analysis, roi, participants, sessions, design=gd)
    written = {}
    for name, df in tables.items():
        written[name] = str(writer.save_group_table(name, df))
        log.info("%s: %d rows -> %s", name, len(df), written[name])
    if "group_wilcoxon" in tables:
        t = tables["group_wilcoxon"]
        sig = t[t["p_corrected"] < 0.05]
        create_table_artifact(key="qsmdask-group-significant",
                              table=sig.astype(str).to_dict("records"),
                              description="Patients vs controls, Bonferroni-significant ROIs")
    vw = dict(voxelwise or {})
    if vw.pop("enabled", True):
        vw.setdefault("groups", gd.groups)
        opts = VoxelwiseOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in vw.items()})
        stage(f"{len(tables) - ('skipped' in tables)} table(s) written; voxel-wise analysis with "
              f"{opts.n_perm} permutations")
        try:
            kwargs = dict(options=opts, atlas=participant_atlas(output_dir), tables_url=tables_url,
                          acquisition={"acq": gd.acq, "run": gd.run}, sessions=sessions)
            res = (on_cluster(client, run_voxelwise_on_worker, output_dir, participants, **kwargs)
                   if client is not None else run_voxelwise(output_dir, participants, **kwargs))
        except Exception as e:  # the ROI statistics above stand on their own
            log.error("voxel-wise analysis failed: %s: %s", type(e).__name__, e)
            res = {"skipped": f"failed: {type(e).__name__}: {e}"}
            written["voxelwise_failed"] = f"{type(e).__name__}: {e}"
        if "skipped" in res:
            log.warning("voxel-wise analysis skipped: %s", res["skipped"])
        else:
            log.info("voxel-wise (%s, %s): %d subjects, %d voxels, %d FWE-significant cluster(s)",
                     res["session_id"] or "no sessions", res["session_choice"], res["n_subjects"],
                     res["n_voxels"], res["n_significant_clusters"])
            written.update({f"perm_{k}": v for k, v in res["written"].items()})
        # listed with the other analyses not run: the voxel-wise analysis itself when it was
        # skipped or failed, and the covariates it left out
        rows = ([("voxelwise", res["skipped"])] if "skipped" in res else []) + [
            ("voxelwise", why) for _, why in res.get("covariates_left_out", [])]
        if rows:
            extra = pd.DataFrame(rows, columns=["test", "reason"])
            tables["skipped"] = pd.concat([tables.get("skipped"), extra], ignore_index=True)
            written["skipped"] = str(writer.save_group_table("skipped", tables["skipped"]))
    removed = writer.prune_group_outputs([v for k, v in written.items() if k != "voxelwise_failed"])
    if removed:  # an earlier run's results must not be read (by the report) as this run's
        log.info("removed %d group output(s) of an earlier run that this run did not produce: %s",
                 len(removed), ", ".join(Path(str(r)).name for r in removed))
    stage("cohort report")
    report = build_cohort_report(output_dir, bids_dir, tables_url=tables_url)
    log.info("cohort report: %s", report)
    create_markdown_artifact(key="qsmdask-report", markdown=(
        f"# qsmdask cohort report\n\n[{report}]({Path(report).resolve().as_uri()})\n\n"
        f"Group tables: {', '.join(sorted(written))}\n"))
    written["report"] = str(report)
    return written


