"""Cohort bookkeeping shared by the flows and the CLI (no Prefect): plan, failures, summaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..config import PipelineConfig
from ..io.bids import SubjectSession, find_subject_sessions, read_participants, read_sessions
from ..io.derivatives import DerivativesWriter
from ..io.tables import read_parquet_folder, write_parquet
from .participant import is_up_to_date, resume_key

__all__ = ["CohortPlan", "plan_participants", "write_failures", "summarise", "load_group_inputs",
           "participant_atlas"]

FAILURE_COLUMNS = ["participant_id", "session_id", "stage", "file", "error_type", "message"]


@dataclass
class CohortPlan:
    todo: list[tuple[SubjectSession, str]] = field(default_factory=list)  # (subject-session, resume key)
    skipped: list[SubjectSession] = field(default_factory=list)
    invalid: list[dict] = field(default_factory=list)  # failure rows of subjects whose files do not parse


def plan_participants(bids_dir, output_dir, config: PipelineConfig, participant_labels=None, *,
                      force: bool = False) -> CohortPlan:
    """Split the cohort into subject-sessions to (re)compute and ones already up to date."""
    plan = CohortPlan()
    errors: list = []
    found = find_subject_sessions(bids_dir, participant_labels, errors=errors)
    for e in errors:
        plan.invalid.append({"participant_id": getattr(e, "participant_id", ""),
                             "session_id": getattr(e, "session_id", ""), "stage": "discover",
                             "file": str(getattr(e, "path", "")), "error_type": type(e).__name__,
                             "message": str(e)})
    for ss in found:
        key = resume_key(ss, config)
        if not force and is_up_to_date(ss, output_dir, config, key):
            plan.skipped.append(ss)
        else:
            plan.todo.append((ss, key))
    return plan


def write_failures(output_dir, rows: list[dict], *, attempted: list[SubjectSession]) -> Path:
    """Update ``OUTPUT_DIR/failures.parquet``: drop attempted subject-sessions, add this run's failures."""
    path = Path(output_dir) / "failures.parquet"
    old = pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=FAILURE_COLUMNS)
    tried = {(s.participant_id, s.session_id) for s in attempted}
    tried |= {(r["participant_id"], r["session_id"]) for r in rows}
    if len(old):
        keep = [(p, s) not in tried for p, s in zip(old["participant_id"], old["session_id"])]
        old = old[keep]
    new = pd.DataFrame(rows, columns=FAILURE_COLUMNS)
    df = pd.concat([old, new], ignore_index=True) if len(old) else new
    return write_parquet(df.astype(str), path)


def summarise(done: list[dict], skipped: list[SubjectSession], failed: list[dict],
              participants: pd.DataFrame | None = None) -> pd.DataFrame:
    """Counts of done / skipped / failed subject-sessions per site and session."""
    rows = ([{"participant_id": d["participant_id"], "session_id": d["session_id"], "status": "done"}
             for d in done]
            + [{"participant_id": s.participant_id, "session_id": s.session_id, "status": "skipped"}
               for s in skipped]
            + [{"participant_id": f["participant_id"], "session_id": f["session_id"], "status": "failed"}
               for f in failed])
    df = pd.DataFrame(rows, columns=["participant_id", "session_id", "status"])
    if participants is not None and "site" in participants.columns:
        df = df.merge(participants[["participant_id", "site"]], on="participant_id", how="left")
    else:
        df["site"] = ""
    df["site"] = df["site"].fillna("").astype(str)
    out = (df.groupby(["site", "session_id", "status"]).size().unstack("status", fill_value=0)
           .reindex(columns=["done", "skipped", "failed"], fill_value=0).reset_index())
    return out


def load_group_inputs(bids_dir, output_dir):
    """ROI table (all subject-sessions), participants and sessions for the group level."""
    roi_dir = Path(output_dir) / "roi"
    roi = read_parquet_folder(roi_dir)
    if roi.empty:
        raise FileNotFoundError(f"{roi_dir}: no ROI tables; run the participant level first")
    return roi, read_participants(bids_dir), read_sessions(bids_dir)


def writer_for(output_dir, bids_dir, config: PipelineConfig) -> DerivativesWriter:
    w = DerivativesWriter(output_dir)
    w.write_dataset_description(source_dataset=bids_dir)
    return w


def participant_atlas(output_dir):
    """The atlas the participant level used (from its recorded configuration), else the default."""
    import json

    from ..atlas import load_atlas

    try:
        c = json.loads((Path(output_dir) / "logs" / "qsmdask_config.json").read_text())["config"]
    except (OSError, KeyError, ValueError):
        c = {}
    return load_atlas(c.get("atlas", "aal"), labels_tsv=c.get("atlas_labels_tsv"),
                      groups_tsv=c.get("atlas_groups_tsv"))
