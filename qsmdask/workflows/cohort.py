"""Cohort bookkeeping shared by the flows and the CLI (no Prefect): plan, failures, summaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..config import PipelineConfig
from ..io.bids import (ACQUISITION_ENTITIES, InputChecksums, SubjectSession, check_output_location, find_subject_sessions,
                       read_participants, read_sessions)
from ..io.derivatives import DerivativesWriter
from ..io.tables import read_parquet_folder
from .participant import estimate_subject_memory_bytes, is_up_to_date, resume_key

__all__ = ["CohortPlan", "plan_participants", "input_checksums_path", "apply_validation_errors", "select_acquisitions", "check_memory", "write_failures", "summarise",
           "load_group_inputs", "participant_atlas"]

FAILURE_COLUMNS = ["participant_id", "session_id", "acquisition", "stage", "file", "error_type", "message"]


@dataclass
class CohortPlan:
    todo: list[tuple[SubjectSession, str]] = field(default_factory=list)  # (subject-session, resume key)
    skipped: list[SubjectSession] = field(default_factory=list)
    invalid: list[dict] = field(default_factory=list)  # failure rows of subjects whose files do not parse
    checksums_read: int = 0  # subject-sessions whose inputs were read to checksum them
    checksums_cached: int = 0  # ... whose checksum came from the cache (inputs unchanged)


def plan_participants(bids_dir, output_dir, config: PipelineConfig, participant_labels=None, *,
                      force: bool = False, tables_url=None, session_labels=None,
                      validation_errors: list[dict] | None = None) -> CohortPlan:
    """Split the cohort into subject-sessions to (re)compute and ones already up to date.

    ``session_labels``: keep only these sessions (BIDS-App ``--session_label``; with or
    without ``ses-``); a label no subject has is an error naming the sessions found.
    ``validation_errors``: the BIDS validator's errors confined to files
    (:func:`qsmdask.io.validation.validate_bids`); an acquisition whose input files have one
    fails at stage ``validate``, errors in files qsmdask does not read are logged.
    """
    plan = CohortPlan()
    errors: list = []
    found = find_subject_sessions(bids_dir, participant_labels, errors=errors)
    if session_labels:
        from ..io.bids import validate_label
        wanted = {validate_label(s, what="session label") for s in session_labels}
        present = {ss.session for ss in found}
        missing = sorted(wanted - present)
        if missing:
            have = ", ".join(sorted(f"ses-{s}" for s in present if s)) or "none (no session level)"
            raise ValueError(f"{bids_dir}: session label(s) {', '.join('ses-' + m for m in missing)} not found; "
                             f"sessions present: {have}")
        found = [ss for ss in found if ss.session in wanted]
        errors = [e for e in errors if getattr(e, "session_id", "")[4:] in wanted
                  or not getattr(e, "session_id", "")]
    for e in errors:
        plan.invalid.append({"participant_id": getattr(e, "participant_id", ""),
                             "session_id": getattr(e, "session_id", ""),
                             "acquisition": getattr(e, "acquisition", ""), "stage": "discover",
                             "file": str(getattr(e, "path", "")), "error_type": type(e).__name__,
                             "message": str(e)})
    if validation_errors:
        found, rows = apply_validation_errors(bids_dir, found, validation_errors)
        plan.invalid += rows
    checksums = InputChecksums(input_checksums_path(output_dir))
    fingerprint = config.fingerprint()  # once, not per subject-session
    writer = DerivativesWriter(output_dir, tables_url=tables_url)
    for ss in found:
        key = resume_key(ss, config, checksums, fingerprint=fingerprint)
        if not force and is_up_to_date(ss, output_dir, config, key, tables_url=tables_url, writer=writer):
            plan.skipped.append(ss)
        else:
            plan.todo.append((ss, key))
    checksums.save()
    plan.checksums_read, plan.checksums_cached = checksums.misses, checksums.hits
    return plan


def input_checksums_path(output_dir) -> Path:
    """Where planning keeps the input checksums of the subject-sessions it has seen."""
    return Path(output_dir) / "logs" / "input_checksums.json"


def check_memory(todo: list[tuple[SubjectSession, str]], capacity_bytes: int | None, *,
                 template_resolution_mm: int = 2
                 ) -> tuple[list[tuple[SubjectSession, str, int | None]], list[dict]]:
    """Split ``todo`` into runnable ``(ss, key, estimate)`` and failure rows (stage "plan").

    ``capacity_bytes`` is the largest ``MEMORY`` resource of any worker (None: the workers
    declare none, so nothing is checked and nothing is annotated). A subject-session whose
    estimate (:func:`qsmdask.workflows.participant.estimate_subject_memory_bytes`) exceeds it
    would wait for a worker forever; it fails here instead. An unreadable header gives no
    estimate: ingest then reports the file properly.
    """
    from dask.utils import format_bytes

    runnable, rows = [], []
    for ss, key in todo:
        need = (estimate_subject_memory_bytes(ss, template_resolution_mm=template_resolution_mm)
                if capacity_bytes else None)
        if need is not None and need > capacity_bytes:
            rows.append({"participant_id": ss.participant_id, "session_id": ss.session_id,
                         "acquisition": ss.acquisition, "stage": "plan",
                         "file": str(ss.echoes[0].magnitude), "error_type": "MemoryError",
                         "message": (f"estimated peak memory {format_bytes(need)} for the GRE grid of "
                                     f"{ss.echoes[0].magnitude.name} exceeds the largest worker's MEMORY "
                                     f"resource {format_bytes(capacity_bytes)}; give workers more memory "
                                     "(--worker-memory, fewer workers per machine) to process it")})
        else:
            runnable.append((ss, key, need))
    return runnable, rows


def write_failures(output_dir, rows: list[dict], *, attempted: list[SubjectSession],
                   tables_url=None) -> Path | str:
    """Update ``failures.parquet`` (under ``tables_url``, default ``OUTPUT_DIR``): drop attempted
    subject-sessions, add this run's failures."""
    writer = DerivativesWriter(output_dir, tables_url=tables_url)
    old = writer.read_failures()
    old = pd.DataFrame(columns=FAILURE_COLUMNS) if old is None else old
    if "acquisition" not in old.columns:  # written by an older version
        old.insert(2, "acquisition", "")
    tried = {(s.participant_id, s.session_id, s.acquisition) for s in attempted}
    tried |= {(r["participant_id"], r["session_id"], r.get("acquisition", "")) for r in rows}
    if len(old):
        keep = [(p, s, a) not in tried
                for p, s, a in zip(old["participant_id"], old["session_id"], old["acquisition"].fillna(""))]
        old = old[keep]
    new = pd.DataFrame(rows, columns=FAILURE_COLUMNS)
    df = pd.concat([old, new], ignore_index=True) if len(old) else new
    return writer.save_failures(df.astype(str))


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


def load_group_inputs(bids_dir, output_dir, tables_url=None):
    """ROI table (all subject-sessions), participants and sessions for the group level."""
    roi_dir = DerivativesWriter(output_dir, tables_url=tables_url).roi_folder()
    roi = read_parquet_folder(roi_dir)
    if roi.empty:
        raise FileNotFoundError(f"{roi_dir}: no ROI tables; run the participant level first")
    return roi, read_participants(bids_dir), read_sessions(bids_dir)


def writer_for(output_dir, bids_dir, config: PipelineConfig, tables_url=None) -> DerivativesWriter:
    check_output_location(bids_dir, output_dir)  # before anything is written
    w = DerivativesWriter(output_dir, tables_url=tables_url)
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


def apply_validation_errors(bids_dir, found: list[SubjectSession], issues: list[dict]
                            ) -> tuple[list[SubjectSession], list[dict]]:
    """Fail every acquisition one of whose input files has a BIDS-validator error.

    ``issues``: dicts with ``location`` (``/sub-01/anat/...``, relative to the dataset) and
    ``message``. Returns the acquisitions left and one failure row (stage ``validate``) per
    failed acquisition; errors in files no acquisition reads are logged as warnings.
    """
    import logging

    log = logging.getLogger(__name__)
    root = Path(bids_dir).resolve()
    by_file: dict[str, list[dict]] = {}
    for i in issues:
        by_file.setdefault(i["location"].lstrip("/"), []).append(i)
    used: set[str] = set()
    keep, rows = [], []
    for ss in found:
        rel = []
        for f in ss.input_files():
            try:
                rel.append(Path(f).resolve().relative_to(root).as_posix())
            except ValueError:
                continue
        used.update(rel)
        hits = [(f, i) for f in rel for i in by_file.get(f, [])]
        if not hits:
            keep.append(ss)
            continue
        f, first = hits[0]
        more = f" (and {len(hits) - 1} more)" if len(hits) > 1 else ""
        rows.append({"participant_id": ss.participant_id, "session_id": ss.session_id,
                     "acquisition": ss.acquisition, "stage": "validate", "file": str(root / f),
                     "error_type": "BIDSValidationError",
                     "message": f"BIDS validator: {first['message']}{more}"})
    for loc, found_issues in sorted(by_file.items()):
        if loc not in used:
            log.warning("BIDS validator: /%s: %s (not an input of qsmdask; ignored)", loc,
                        found_issues[0]["message"])
    return keep, rows


def _run_order(v: str):
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


def select_acquisitions(roi: pd.DataFrame, *, acq: str | None = None, run: str = "lowest"
                        ) -> tuple[pd.DataFrame, list[str]]:
    """Keep one acquisition per subject-session of the ROI table (the group level's rule).

    Among the acquisitions of a subject-session (the ROI table's ``acq``, ``ce``, ``rec``,
    ``dir`` and ``run`` columns):

    1. ``acq``: keep this ``acq`` label; ``None`` keeps the default acquisition: no ``acq``
       entity when the subject-session has one without, else the first label in sort order.
       A subject-session without the requested label is left out (and named in the result).
    2. ``ce``, ``rec``, ``dir``: the one without the entity when present, else the first.
    3. ``run``: ``"lowest"`` (default) or ``"highest"`` run number (no ``run`` entity counts
       as lowest), or a run number to keep exactly that run.

    Returns ``(table, notes)``: the filtered table and one line per subject-session left
    out or reduced, for the logs.
    """
    cols = [c for c in ACQUISITION_ENTITIES if c in roi.columns]
    if not cols or roi.empty:
        return roi, []
    if run not in ("lowest", "highest") and not str(run).isdigit():
        raise ValueError(f"run must be 'lowest', 'highest' or a run number, got {run!r}")
    df = roi.copy()
    for c in cols:
        df[c] = df[c].fillna("").astype(str)
    keep_index, notes = [], []
    for (pid, sid), g in df.groupby(["participant_id", "session_id"], sort=True):
        cand = g[cols].drop_duplicates()
        if len(cand) == 1:
            keep_index.append(g.index)
            continue
        if "acq" in cols:
            labels = sorted(cand["acq"].unique())
            want = acq if acq is not None else ("" if "" in labels else labels[0])
            cand = cand[cand["acq"] == want]
            if cand.empty:
                notes.append(f"{pid} {sid}: no acquisition acq-{acq} (found {labels}); left out")
                continue
        for c in ("ce", "rec", "dir"):
            if c in cols:
                vals = sorted(cand[c].unique())
                cand = cand[cand[c] == ("" if "" in vals else vals[0])]
        if "run" in cols:
            runs = sorted(cand["run"].unique(), key=_run_order)
            if run == "lowest":
                pick = runs[0]
            elif run == "highest":
                pick = runs[-1]
            else:
                pick = str(run)
            cand = cand[cand["run"] == pick]
            if cand.empty:
                notes.append(f"{pid} {sid}: no run-{run} (found {runs}); left out")
                continue
        chosen = cand.iloc[0]
        sel = (g[cols] == chosen[cols]).all(axis=1)
        keep_index.append(g.index[sel.to_numpy()])
        label = "_".join(f"{c}-{chosen[c]}" for c in cols if chosen[c]) or "(no entities)"
        notes.append(f"{pid} {sid}: {len(g[cols].drop_duplicates())} acquisitions, the group level uses {label}")
    idx = keep_index[0].append(keep_index[1:]) if keep_index else df.index[:0]
    return roi.loc[roi.index.isin(idx)], notes
