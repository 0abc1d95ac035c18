"""Participant-level Prefect flow: subject-sessions fanned out as Dask tasks.

Thin by design: discovery, resume decisions and every computation come from
``qsmdask.workflows``; this module only wires tasks, states and artifacts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)

from qsmdask.config import PipelineConfig
from qsmdask.io.bids import read_participants
from qsmdask.io.nifti import InputError
from qsmdask.orchestration.cluster import (ClusterConfig, check_worker_versions, current_client, dashboard_link,
                                           make_task_runner, memory_annotation, worker_memory_capacity)
from qsmdask.workflows import active as active_work
from qsmdask.workflows import participant as wf
from qsmdask.workflows.cohort import check_memory, plan_participants, summarise, write_failures, writer_for


@task(name="ingest", task_run_name="ingest-{ss.key}")
def ingest_task(ss, paths):
    return wf.ingest(ss, paths)


@task(name="reconstruct", task_run_name="reconstruct-{meta[key]}")
def reconstruct_task(meta, config):
    return wf.reconstruct(meta, config)


@task(name="standardise", task_run_name="standardise-{meta[key]}")
def standardise_task(meta, config):
    return wf.standardise_and_measure(meta, config)


@task(name="write", task_run_name="write-{ss.key}", retries=2, retry_delay_seconds=2,
      retry_condition_fn=lambda task, run, state: _transient(state))
def write_task(ss, meta, output_dir, config, key, tables_url=None, keep_work=False):
    return wf.write_outputs(ss, meta, output_dir, config, resume=key, tables_url=tables_url,
                            keep_work=keep_work)


@task(name="write-partial", task_run_name="write-partial-{ss.key}")
def write_partial_task(ss, recon_meta, output_dir, config, failed_stage, message):
    return wf.write_partial_outputs(ss, recon_meta, output_dir, config, failed_stage=failed_stage,
                                    message=message)


def _transient(state) -> bool:
    """Retry only transient IO errors (not bad data, not bugs)."""
    try:
        state.result()
    except (InputError, ValueError):
        return False
    except wf.StageError as e:
        return e.error_type in ("OSError", "TimeoutError", "ConnectionError", "BlockingIOError")
    except (OSError, TimeoutError):
        return True
    except Exception:
        return False
    return False


def _progress_line(i: int, n: int, key: str, status: str, elapsed_s: float) -> None:
    """One line per finished subject-session on stderr: count, ETA, outcome."""
    eta = elapsed_s / i * (n - i)
    bar = "#" * int(20 * i / n) + "." * (20 - int(20 * i / n))
    # written to the stream, not print(): the flow's log_prints would turn it into a log record
    sys.stderr.write(f"[{bar}] {i}/{n}  {key}: {status}  (elapsed {_hms(elapsed_s)}, ETA {_hms(eta)})\n")
    sys.stderr.flush()


STAGES = ("ingest", "reconstruct", "standardise", "write")


class _StageProgress:
    """Stage counts on stderr while subject-sessions run, so that a long first subject shows life.

    A line when a stage finishes for one more subject-session, at most every ``every_s``
    seconds (always when a stage is complete for all of them).
    """

    def __init__(self, n: int, t0: float, every_s: float = 10.0):
        self.n, self.t0, self.every_s = n, t0, every_s
        self.counts = dict.fromkeys(STAGES, 0)
        self._last = -1e9

    def update(self, stage: str) -> None:
        self.counts[stage] += 1
        now = time.monotonic()
        if now - self._last < self.every_s and self.counts[stage] != self.n:
            return
        self._last = now
        parts = "  ".join(f"{k} {v}/{self.n}" for k, v in self.counts.items())
        sys.stderr.write(f"  stages: {parts}  (elapsed {_hms(now - self.t0)})\n")
        sys.stderr.flush()


def _say(log, msg: str) -> None:
    """One line on the console (stderr) and in the flow-run log."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()
    log.info(msg)


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _first_error(futures, key: str = ""):
    """The original exception of the first failed stage of a subject-session's chain.

    A stage that never reached a final state (its Dask client or worker was lost, so the
    Prefect state stays PENDING or RUNNING) has no result to read: it becomes a
    :class:`StageError` naming that stage, so the subject-session is one failure row
    instead of a crash of the whole flow.
    """
    for stage, fut in zip(STAGES, futures):
        fut.wait()  # the state then comes from the worker, with its exception attached
        state = fut.state
        if state.is_completed():
            continue
        if not state.is_final():
            return wf.StageError(key, stage, RuntimeError(
                f"the {stage} stage did not finish (Prefect state {state.type.value}): "
                "its Dask worker or the scheduler connection was lost"))
        res = state.result(raise_on_failure=False)
        if isinstance(res, BaseException):
            return res
    return RuntimeError("subject-session did not complete")


def in_flight_window(client, per_thread: int = 4, minimum: int = 64) -> int:
    """Default bound on the chains in flight: ``per_thread`` per worker thread, at least ``minimum``."""
    try:
        threads = sum(client.nthreads().values()) if client is not None else 0
    except Exception:  # noqa: BLE001 - no scheduler answer: the minimum
        threads = 0
    return max(minimum, per_thread * threads)


def bounded_completion(items, submit, window: int):
    """Submit ``submit(*item)`` for each item with at most ``window`` chains in flight.

    ``submit`` returns a chain ``(ss, futures, ...)``. Yields ``(chain, j)`` each time future
    ``j`` of a chain finishes; a chain leaves the window when its last future finishes, and the
    next item is submitted then. Completion is watched on the Dask futures behind the Prefect
    futures (``distributed.as_completed``, to which new chains are added); without Dask
    futures the futures are awaited in submission order.
    """
    if int(window) < 1:
        raise ValueError(f"window must be >= 1, got {window!r}")
    from distributed import Future as DaskFuture, as_completed as dask_as_completed
    pending = iter(items)
    watched: dict = {}   # Dask key -> (chain, index of the future in the chain)
    ordered: list = []   # (chain, j) awaited in order (no Dask future behind)
    n_open = 0
    watcher = None       # created with the first Dask future (on that future's client loop)

    def fill():
        nonlocal watcher, n_open
        while n_open < window:
            try:
                item = next(pending)
            except StopIteration:
                return
            chain = submit(*item)
            n_open += 1
            for j, fut in enumerate(chain[1]):
                inner = getattr(fut, "wrapped_future", None)
                if isinstance(inner, DaskFuture):
                    watched[inner.key] = (chain, j)
                    if watcher is None:
                        watcher = dask_as_completed([inner], loop=inner.client.loop)
                    else:
                        watcher.add(inner)
                else:
                    ordered.append((chain, j))

    fill()
    while watched or ordered:
        if ordered:
            chain, j = ordered.pop(0)
            chain[1][j].wait()
        else:
            chain, j = watched.pop(next(watcher).key)
        yield chain, j
        if j == len(chain[1]) - 1:
            n_open -= 1
            fill()


def _cluster(log):
    """Dashboard link and the largest worker MEMORY of the flow's Dask cluster (started here)."""
    client = current_client()
    if client is None:
        return None, None
    link = dashboard_link(client)
    if link:
        _say(log, f"Dask dashboard: {link} (while this command runs)")
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
                     max_in_flight: int | None = None) -> dict:
    """Reconstruct and measure every subject-session that is new or changed.

    ``session_labels``: only these sessions (labels with or without ``ses-``; None: all).

    ``tables_url``: where the Parquet tables go (path or fsspec URL; default ``output_dir``).
    ``keep_work``: keep the zarr work stores (of failed subject-sessions too).
    ``validation_errors``: per-file BIDS-validator errors (``qsmdask.io.validation``).
    ``max_in_flight``: subject-session chains submitted at once (default: 4 per worker thread,
    at least 64); the next chain is submitted when one finishes, so the flow holds a bounded
    number of futures however large the cohort.
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
    _say(log, f"participant level: {len(plan.todo)} subject-session(s) to process, {len(plan.skipped)} "
              f"up to date, {len(plan.invalid)} unreadable")
    progress = create_progress_artifact(progress=0.0, description="subject-sessions finished (%)")

    link, capacity = _cluster(log) if plan.todo else (None, None)
    runnable, too_big = check_memory(plan.todo, capacity, template_resolution_mm=cfg.template_resolution_mm)
    def submit(ss, key, need):
        paths = wf.work_paths(ss, output_dir, work_root)
        if not keep_work:
            active_work.register(paths["work_url"])  # removed by the CLI if the run is interrupted
        m = ingest_task.submit(ss, paths)
        with memory_annotation(need):  # at most MEMORY / need of these at once on a worker
            r = reconstruct_task.submit(m, cfg)
            s = standardise_task.submit(r, cfg)
        w = write_task.submit(ss, s, output_dir, cfg, key, tables_url, keep_work)
        return ss, [m, r, s, w], paths["work_url"]

    window = int(max_in_flight or in_flight_window(current_client()))
    log.info("at most %d subject-session chains in flight", window)

    done, failed = [], list(plan.invalid) + too_big
    for row in plan.invalid:
        log.error("%s %s %s cannot be read: %s", row["participant_id"], row["session_id"], row["acquisition"],
                  row["message"])
    for row in too_big:
        key = "_".join(x for x in (row["participant_id"], row["session_id"], row["acquisition"]) if x)
        log.error("%s not submitted: %s", key, row["message"])
    t0 = time.monotonic()
    n_chains = len(runnable)
    if runnable:
        sys.stderr.write(f"  stages: {'  '.join(f'{k} 0/{n_chains}' for k in STAGES)}  (started)\n")
    stages = _StageProgress(n_chains, t0)
    i = 0
    for (ss, futs, url), j in bounded_completion(runnable, submit, window):
        fut = futs[j]
        if j < len(futs) - 1:  # a stage of a chain still in flight
            fut.wait()
            if fut.state.is_completed():
                stages.update(STAGES[j])
            continue
        i += 1
        fut.wait()
        if fut.state.is_completed():
            stages.update(STAGES[-1])
            done.append(fut.result())
            status = "done"
        else:
            row = wf.failure_row(ss, _first_error(futs, ss.key))
            failed.append(row)
            status = f"FAILED at {row['stage']}"
            log.error("%s failed at %s: %s", ss.key, row["stage"], row["message"])
            if row["stage"] in wf.AFTER_RECONSTRUCT and futs[1].state.is_completed():
                # the reconstruction finished: write the native maps (status failed) anyway,
                # before the work area is discarded
                part = write_partial_task.submit(ss, futs[1], output_dir, cfg, row["stage"], row["message"])
                part.wait()
                if part.state.is_completed():
                    log.warning("%s: native Chimap written (partial outputs, manifest status failed)", ss.key)
                else:
                    log.error("%s: the partial outputs could not be written either", ss.key)
            if not keep_work:  # a failed subject-session's volumes must not keep the disk full
                wf.discard_work(wf.work_paths(ss, output_dir, work_root))
        active_work.release(url)
        update_progress_artifact(progress, progress=100.0 * i / n_chains)
        _progress_line(i, n_chains, ss.key, status, time.monotonic() - t0)
    if not runnable:
        update_progress_artifact(progress, progress=100.0)

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

