"""Several subject-sessions per Prefect task run (issue 18: orchestration at cohort scale).

Prefect's cost is fixed per task run (its engine builds a settings context, an API client
and the run's states for every task run: ~0.6 CPU s on a loaded 2-core machine, measured in
docs/benchmarks.md), so a cohort of 10,000 subject-sessions run as 10,000 task runs spends
more on orchestration than a quick pipeline spends on compute. A *batch* runs several
subject-sessions one after the other in one task run, each isolated exactly like its own
task run would be:

- a failure marks that subject-session failed at the stage that failed (the failure row of
  :func:`qsmdask.workflows.participant.failure_row`) and the batch goes on;
- a batch run again in the same flow run (Dask re-runs a task whose worker died) skips the
  subject-sessions it already finished: their manifest is done, has their resume key and
  carries the batch's run token (a random token drawn when the flow submitted the batch; no
  clock is compared, so the flow's and the workers' clocks may differ);
- each subject-session still reports its stages (the ``on_stage`` callback: Dask events).

:func:`subject_sessions_per_task` chooses the batch size: one subject-session per task run for
small cohorts, and for large ones as many as keep the number of task runs at about
:data:`TASK_RUNS_TARGET` (but at least four batches per worker thread, so that every thread
stays busy).
"""

from __future__ import annotations

import logging
import math
import os
import uuid

from qsmdask.workflows import participant as wf

__all__ = ["TASK_RUNS_TARGET", "ENV_VAR", "subject_sessions_per_task", "make_batches", "batch_name",
           "run_batch", "finished_in_this_run", "done_from_manifest", "batch_table", "new_run_token"]

#: The automatic batch size keeps a participant flow run near this many Prefect task runs.
TASK_RUNS_TARGET = 200
#: Environment variable of the batch size (a number, or ``auto``); the flow parameter wins.
ENV_VAR = "QSMDASK_SUBJECT_SESSIONS_PER_TASK"
#: At least this many batches per Dask worker thread under the automatic size.
BATCHES_PER_THREAD = 4


def subject_sessions_per_task(n: int, setting=None, *, threads: int | None = None, environ=None) -> int:
    """Subject-sessions per Prefect task run for a run of ``n`` subject-sessions.

    ``setting``: a positive number (used as is), or ``None``/``"auto"``/``0`` (then the
    environment variable :data:`ENV_VAR`, then automatic). Automatic: 1 while ``n`` <=
    :data:`TASK_RUNS_TARGET`, else ``ceil(n / TASK_RUNS_TARGET)``, lowered so that there are at
    least :data:`BATCHES_PER_THREAD` batches per worker thread when ``threads`` is known.
    """
    env = os.environ if environ is None else environ
    for source, value in (("subject_sessions_per_task", setting), (ENV_VAR, env.get(ENV_VAR))):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
            continue
        try:
            size = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source} must be a positive integer or 'auto', got {value!r}") from None
        if size < 0 or (isinstance(value, float) and value != size):
            raise ValueError(f"{source} must be a positive integer or 'auto', got {value!r}")
        if size > 0:
            return size
        break  # 0: automatic
    n = int(n)
    if n <= TASK_RUNS_TARGET:
        return 1
    size = math.ceil(n / TASK_RUNS_TARGET)
    if threads:
        size = min(size, max(1, math.ceil(n / (BATCHES_PER_THREAD * int(threads)))))
    return max(1, size)


def make_batches(items: list, size: int) -> list[list]:
    """``items`` in order, cut into consecutive batches of ``size`` (the last may be smaller)."""
    if int(size) < 1:
        raise ValueError(f"batch size must be >= 1, got {size!r}")
    return [items[i:i + size] for i in range(0, len(items), int(size))]


def batch_name(index: int, n_batches: int, keys: list[str]) -> str:
    """Task-run name of a batch: ``batch-0003-of-0250 sub-01_ses-1..sub-20_ses-2 (20)``."""
    w = max(4, len(str(n_batches)))
    span = keys[0] if len(keys) == 1 else f"{keys[0]}..{keys[-1]}"
    return f"batch-{index + 1:0{w}d}-of-{n_batches:0{w}d} {span} ({len(keys)})"


def finished_in_this_run(ss, output_dir, config, key: str | None, run_token: str | None, *,
                         tables_url=None) -> bool:
    """True when ``ss`` is done with ``key`` and its manifest carries ``run_token`` (the token
    the flow drew when it submitted the batch): an earlier attempt of the same batch finished
    it. Outputs of any other run (a forced rerun's old outputs) do not count."""
    if not run_token or not key:
        return False
    from qsmdask.io.derivatives import DerivativesWriter
    manifest = DerivativesWriter(output_dir, tables_url=tables_url).read_manifest(ss.subject, ss.session,
                                                                                  **ss.entities)
    if not manifest or manifest.get("run_token") != run_token:
        return False
    return wf.is_up_to_date(ss, output_dir, config, key, tables_url=tables_url)


def done_from_manifest(ss, output_dir, *, tables_url=None) -> dict:
    """The result row of a subject-session finished earlier, rebuilt from its manifest."""
    from qsmdask.io.derivatives import DerivativesWriter
    writer = DerivativesWriter(output_dir, tables_url=tables_url)
    manifest = writer.read_manifest(ss.subject, ss.session, **ss.entities) or {}
    return {"participant_id": ss.participant_id, "session_id": ss.session_id, "acquisition": ss.acquisition,
            "key": ss.key, "manifest": str(writer.manifest_path(ss.subject, ss.session, **ss.entities)),
            "n_files": len(manifest.get("files", [])), "qc": manifest.get("qc", {}), "earlier_attempt": True}


def run_batch(batch: list, output_dir, config, *, tables_url=None, keep_work: bool = False,
              run_token: str | None = None, reporter=None, log=None, write_retries: int = 2,
              retry_delay_s: float = 2.0) -> list[dict]:
    """Run the subject-sessions of ``batch`` (``(ss, paths, resume_key)`` each) one after the other.

    Returns one outcome per subject-session, in order: ``{"key", "status": "done", "result"}``
    (:func:`~qsmdask.workflows.participant.run_subject_session`'s result, ``stage_seconds``
    included) or ``{"key", "status": "failed", "failure"}`` (a failures-table row naming the
    stage). A failure never stops the batch; a subject-session finished by an earlier attempt
    of this batch in this flow run (:func:`finished_in_this_run`: its manifest carries
    ``run_token``, which every subject-session written here records) is not run again.
    ``reporter(key)`` gives the ``on_stage`` callback of a subject-session (or None).
    """
    log = log or logging.getLogger("qsmdask.orchestration")
    out = []
    for ss, paths, key in batch:
        try:
            if finished_in_this_run(ss, output_dir, config, key, run_token, tables_url=tables_url):
                log.info("%s: finished by an earlier attempt of this batch, not run again", ss.key)
                out.append({"key": ss.key, "status": "done", "result": done_from_manifest(
                    ss, output_dir, tables_url=tables_url)})
                continue
            res = wf.run_subject_session(ss, paths, output_dir, config, resume=key, tables_url=tables_url,
                                         keep_work=keep_work, on_stage=reporter(ss.key) if reporter else None,
                                         write_retries=write_retries, retry_delay_s=retry_delay_s, log=log,
                                         run_token=run_token)
            log.info("%s done: %s", ss.key, ", ".join(f"{k} {v:.2f} s" for k, v in res["stage_seconds"].items()))
            out.append({"key": ss.key, "status": "done", "result": res})
        except Exception as e:  # noqa: BLE001 - one subject-session's failure never stops the others
            row = wf.failure_row(ss, e)
            log.error("%s failed at %s: %s", ss.key, row["stage"], row["message"])
            out.append({"key": ss.key, "status": "failed", "failure": row})
    return out


def batch_table(outcomes: list[dict]) -> list[dict]:
    """Rows of a batch's table artifact: subject-session, status, stage, seconds, message."""
    rows = []
    for o in outcomes:
        if o["status"] == "done":
            sec = (o["result"].get("stage_seconds") or {})
            rows.append({"subject_session": o["key"], "status": "done" if sec else "done (earlier attempt)",
                         "stage": "", "seconds": round(sum(sec.values()), 2), "message": ""})
        else:
            f = o["failure"]
            rows.append({"subject_session": o["key"], "status": "failed", "stage": f.get("stage", ""),
                         "seconds": None, "message": str(f.get("message", ""))[:300]})
    return rows


def new_run_token() -> str:
    """A random token for one submission of a batch (recorded in the manifests it writes)."""
    return uuid.uuid4().hex
