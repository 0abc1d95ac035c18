"""Participant-level Prefect flow: subject-sessions fanned out as Dask tasks.

Thin by design: discovery, resume decisions and every computation come from
``qsmdask.workflows``; this module only wires tasks, states and artifacts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)

from qsmdask.config import PipelineConfig
from qsmdask.io.bids import read_participants
from qsmdask.io.nifti import InputError
from qsmdask.orchestration import batching
from qsmdask.orchestration.cluster import (ClusterConfig, check_worker_versions, current_client, dashboard_link,
                                           make_task_runner, memory_annotation, worker_memory_capacity)
from qsmdask.orchestration.submission import (PROGRESS_EVERY_S, STAGES, StageProgress, bounded_completion,
                                              chain_error, chain_outcomes, dask_error, hms, in_flight_window,
                                              progress_line, say)
from qsmdask.workflows import active as active_work
from qsmdask.workflows import participant as wf
from qsmdask.workflows.cohort import check_memory, plan_participants, summarise, write_failures, writer_for


#: Dask event topic of the stage reports that subject-session tasks send to the flow.
STAGE_TOPIC = "qsmdask-stage"


@task(name="subject-session", task_run_name="{ss.key}", cache_policy=NO_CACHE, persist_result=False)
def subject_session_task(ss, paths, output_dir, config, key, tables_url=None, keep_work=False):
    """One Prefect task run per subject-session: its four stages run here, one after the other.

    Each stage start and end is reported to the flow as a Dask event (``STAGE_TOPIC``: the
    console's stage counts, and the stage a lost task was in); the stage timings go to this
    task run's log, one line, and to the result (``stage_seconds``). A failure raises the
    :class:`~qsmdask.workflows.participant.StageError` naming the stage, after the partial
    outputs are written (a stage after the reconstruction failed). Transient IO errors of the
    write stage are retried twice.
    """
    log = get_run_logger()
    res = wf.run_subject_session(ss, paths, output_dir, config, resume=key, tables_url=tables_url,
                                 keep_work=keep_work, on_stage=_stage_reporter(ss.key), write_retries=2,
                                 retry_delay_s=2.0, log=log)
    log.info("%s done: %s", ss.key, ", ".join(f"{k} {v:.2f} s" for k, v in res["stage_seconds"].items()))
    return res


@task(name="subject-session-batch", task_run_name="{name}", cache_policy=NO_CACHE, persist_result=False)
def subject_session_batch_task(name, batch, output_dir, config, tables_url=None, keep_work=False, run_token=None):
    """One Prefect task run for several subject-sessions (``batch``: ``(ss, paths, key)`` each).

    Each runs as :func:`subject_session_task` would, isolated
    (:func:`qsmdask.orchestration.batching.run_batch`: a failure is that subject-session's
    failure row, the others go on; one finished by an earlier attempt of this batch is not
    run again); stage events as above. The task run's table artifact lists every
    subject-session with its status, failed stage and seconds. Returns the outcomes.
    """
    log = get_run_logger()
    outcomes = batching.run_batch(batch, output_dir, config, tables_url=tables_url, keep_work=keep_work,
                                  run_token=run_token, reporter=_stage_reporter, log=log)
    n_failed = sum(o["status"] == "failed" for o in outcomes)
    try:
        create_table_artifact(table=batching.batch_table(outcomes),
                              description=f"{name}: {len(outcomes) - n_failed} done, {n_failed} failed")
    except Exception as e:  # noqa: BLE001 - the outcomes matter more than their artifact
        log.warning("batch table artifact not written: %s", e)
    return outcomes


def _stage_reporter(key: str):
    """``on_stage`` callback that sends stage events to the flow's Dask client (None off Dask)."""
    try:
        from distributed import get_worker
        worker = get_worker()
    except (ImportError, ValueError):
        return None

    def report(stage, event, seconds):
        try:
            worker.log_event(STAGE_TOPIC, {"key": key, "stage": stage, "event": event, "seconds": seconds})
        except Exception:  # noqa: BLE001 - progress reports never fail a subject-session
            pass
    return report


# the submission plumbing lives in qsmdask.orchestration.submission (old names kept)
_StageProgress, _chain_error, _dask_error, _progress_line, _say, _hms = (
    StageProgress, chain_error, dask_error, progress_line, say, hms)


def _threads(client) -> int | None:
    """Worker threads of the flow's Dask cluster (None: unknown)."""
    try:
        return sum(client.nthreads().values()) if client is not None else None
    except Exception:  # noqa: BLE001 - no scheduler answer
        return None


def _cluster(log):
    """Dashboard link and the largest worker MEMORY of the flow's Dask cluster (started here)."""
    client = current_client()
    if client is None:
        return None, None
    link = dashboard_link(client)
    if link:
        say(log, f"Dask dashboard: {link} (while this command runs)")
    capacity = worker_memory_capacity(client, fallback=ClusterConfig.from_env().worker_memory_bytes())
    if capacity is None:
        log.warning("the Dask workers declare no MEMORY resource: tasks are not limited by memory")
    return link, capacity


@flow(name="qsmdask-participant", log_prints=True,
      task_runner=make_task_runner(ClusterConfig.from_env()))
def participant_flow(bids_dir: str, output_dir: str, participant_labels: list[str] | None = None,
                     config: dict | None = None, force: bool = False,
                     work_root: str | None = None, tables_url: str | None = None,
                     session_labels: list[str] | None = None, keep_work: bool = False,
                     validation_errors: list[dict] | None = None,
                     max_in_flight: int | None = None,
                     subject_sessions_per_task: int | str | None = None) -> dict:
    """Reconstruct and measure every subject-session that is new or changed.

    ``session_labels``: only these sessions (labels with or without ``ses-``; None: all).

    ``tables_url``: where the Parquet tables go (path or fsspec URL; default ``output_dir``).
    ``keep_work``: keep the zarr work stores (of failed subject-sessions too).
    ``validation_errors``: per-file BIDS-validator errors (``qsmdask.io.validation``).
    ``max_in_flight``: subject-session chains submitted at once (default: 4 per worker thread,
    at least 64); the next chain is submitted when one finishes, so the flow holds a bounded
    number of futures however large the cohort.
    ``subject_sessions_per_task``: subject-sessions per Prefect task run (a number, or
    None/"auto": ``QSMDASK_SUBJECT_SESSIONS_PER_TASK``, else one per task run up to 200 and
    about 200 task runs above, :func:`qsmdask.orchestration.batching.subject_sessions_per_task`).
    Each subject-session of a batch is isolated: its failure is its own failure row.
    """
    log = get_run_logger()
    client = current_client()
    if client is not None:  # refuse to mix qsmdask versions (e.g. workers left on an old image)
        check_worker_versions(client)
    cfg = PipelineConfig.from_dict(config or {})
    writer = writer_for(output_dir, bids_dir, cfg, tables_url)
    writer.write_run_config({"level": "participant", "bids_dir": str(bids_dir), "config": cfg.to_dict(),
                             "tables_url": tables_url})
    plan = plan_participants(bids_dir, output_dir, cfg, participant_labels, force=force, tables_url=tables_url,
                             session_labels=session_labels, validation_errors=validation_errors)
    say(log, f"participant level: {len(plan.todo)} subject-session(s) to process, {len(plan.skipped)} "
              f"up to date, {len(plan.invalid)} unreadable")
    progress = create_progress_artifact(progress=0.0, description="subject-sessions finished (%)")

    link, capacity = _cluster(log) if plan.todo else (None, None)
    runnable, too_big = check_memory(plan.todo, capacity, template_resolution_mm=cfg.template_resolution_mm)
    t0 = time.monotonic()
    n_chains = len(runnable)
    stages = StageProgress(n_chains, t0)

    per_task = batching.subject_sessions_per_task(n_chains, subject_sessions_per_task,
                                                  threads=_threads(current_client()))
    per_task = max(1, min(per_task, n_chains))  # one subject-session left: its own task run
    batches = batching.make_batches(runnable, per_task)

    def submit(index, batch):
        entries = []
        for ss, key, _need in batch:
            paths = wf.work_paths(ss, output_dir, work_root)
            if not keep_work:
                active_work.register(paths["work_url"])  # removed by the CLI if the run is interrupted
            stages.submitted(ss.key)
            entries.append((ss, paths, key))
        needs = [n for _, _, n in batch if n is not None]
        need = max(needs) if needs else None  # the batch's subject-sessions run one at a time
        run_token = batching.new_run_token()
        with memory_annotation(need):  # at most MEMORY / need of these at once on a worker
            if per_task == 1:
                ss, paths, key = entries[0]
                fut = subject_session_task.submit(ss, paths, output_dir, cfg, key, tables_url, keep_work)
            else:
                name = batching.batch_name(index, len(batches), [e[0].key for e in entries])
                fut = subject_session_batch_task.submit(name, entries, output_dir, cfg, tables_url, keep_work,
                                                        run_token)
        return entries, [fut], run_token

    window = int(max_in_flight or in_flight_window(current_client()))
    log.info("%d subject-session(s) per task run (%d task runs), at most %d in flight", per_task, len(batches),
             window)

    done, failed = [], list(plan.invalid) + too_big
    for row in plan.invalid:
        log.error("%s %s %s cannot be read: %s", row["participant_id"], row["session_id"], row["acquisition"],
                  row["message"])
    for row in too_big:
        key = "_".join(x for x in (row["participant_id"], row["session_id"], row["acquisition"]) if x)
        log.error("%s not submitted: %s", key, row["message"])
    if runnable:
        sys.stderr.write(f"  stages: {'  '.join(f'{k} 0/{n_chains}' for k in STAGES)}  (started)\n")
    client = current_client()
    subscribed = False
    if client is not None and runnable:
        try:
            client.subscribe_topic(STAGE_TOPIC, lambda event: stages.event(event[1]))
            subscribed = True
        except Exception as e:  # noqa: BLE001 - without stage events the console shows finished chains only
            log.warning("no stage progress from the Dask workers: %s", e)
    i, last_progress = 0, -1e9
    try:
        for (entries, futs, run_token), _ in bounded_completion(enumerate(batches), submit, window):
            outcomes = chain_outcomes(entries, futs[0], batched=per_task > 1, stage_of=stages.current,
                                      output_dir=output_dir, config=cfg, tables_url=tables_url, run_token=run_token)
            for (ss, paths, _key), outcome in zip(entries, outcomes):
                i += 1
                if outcome["status"] == "done":
                    res = dict(outcome["result"])
                    stages.finish(ss.key, True, res.pop("stage_seconds", None))
                    done.append(res)
                    status = "done"
                else:
                    row = outcome["failure"]
                    stages.finish(ss.key, False)
                    failed.append(row)
                    status = f"FAILED at {row['stage']}"
                    log.error("%s failed at %s: %s", ss.key, row["stage"], row["message"])
                    if not keep_work:  # the task removes it; not when its worker was lost
                        wf.discard_work(paths)
                active_work.release(paths["work_url"])
                progress_line(i, n_chains, ss.key, status, time.monotonic() - t0)
            now = time.monotonic()
            if now - last_progress >= PROGRESS_EVERY_S or i == n_chains:  # one API call per interval
                update_progress_artifact(progress, progress=100.0 * i / n_chains)
                last_progress = now
    finally:
        if subscribed:
            try:
                client.unsubscribe_topic(STAGE_TOPIC)
            except Exception:  # noqa: BLE001 - the client may be closing
                pass
    if not runnable:
        update_progress_artifact(progress, progress=100.0)
    if done:
        create_table_artifact(key="qsmdask-stage-timings", table=stages.timings(),
                              description="Wall seconds per stage of the subject-sessions done in this run")

    write_failures(output_dir, failed, attempted=[ss for ss, _ in plan.todo], tables_url=tables_url)
    try:
        participants = read_participants(bids_dir)
    except InputError:
        participants = None
    summary = summarise(done, plan.skipped, failed, participants)
    create_table_artifact(key="qsmdask-participant-summary", table=summary.to_dict("records"),
                          description="Subject-sessions per site and session: done, skipped, failed")
    if failed:
        create_table_artifact(key="qsmdask-failures", table=failed,
                              description="Failed subject-sessions with the stage and error")
    dashboard = f"<{link}>" if link else ("(none)" if plan.todo else "(no cluster started: nothing to compute)")
    create_markdown_artifact(key="qsmdask-outputs", markdown=(
        f"# qsmdask participant level\n\nOutputs: `{Path(output_dir).resolve()}`\n\n"
        f"Tables: `{writer.tables_root}`\n\nDask dashboard: {dashboard}\n\n"
        f"done {len(done)}, skipped {len(plan.skipped)}, failed {len(failed)}, "
        f"{time.monotonic() - t0:.1f} s\n"))
    return {"done": done, "skipped": [s.key for s in plan.skipped], "failed": failed,
            "summary": summary.to_dict("records")}

