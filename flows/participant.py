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
from qsmdask.orchestration.cluster import (ClusterConfig, check_worker_versions, current_client, dashboard_link,
                                           make_task_runner, memory_annotation, worker_memory_capacity)
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


#: The progress artifact is updated at most this often (one API call each).
PROGRESS_EVERY_S = 5.0


def _progress_line(i: int, n: int, key: str, status: str, elapsed_s: float) -> None:
    """One line per finished subject-session on stderr: count, ETA, outcome."""
    eta = elapsed_s / i * (n - i)
    bar = "#" * int(20 * i / n) + "." * (20 - int(20 * i / n))
    # written to the stream, not print(): the flow's log_prints would turn it into a log record
    sys.stderr.write(f"[{bar}] {i}/{n}  {key}: {status}  (elapsed {_hms(elapsed_s)}, ETA {_hms(eta)})\n")
    sys.stderr.flush()


STAGES = wf.STAGES


class _StageProgress:
    """Stage counts on stderr while subject-sessions run, so that a long first subject shows life.

    Fed by the tasks' stage events (:data:`STAGE_TOPIC`, on the Dask client's thread) and by the
    flow when a chain finishes. A line when a stage finishes for one more subject-session, at
    most every ``every_s`` seconds (always when a stage is complete for all of them). Only the
    chains in flight are remembered (stage done, last stage started), so memory does not grow
    with the cohort; a stage reported twice (a task re-run by Dask) counts once.
    """

    def __init__(self, n: int, t0: float, every_s: float = 10.0):
        import threading
        self.n, self.t0, self.every_s = n, t0, every_s
        self.counts = dict.fromkeys(STAGES, 0)
        self.seconds = {k: [0, 0.0, 0.0] for k in STAGES}  # count, sum, max of the stage timings
        self._inflight: dict[str, dict] = {}  # key -> {"done": set of stages, "current": stage}
        self._lock = threading.Lock()
        self._last = -1e9

    def submitted(self, key: str) -> None:
        with self._lock:
            self._inflight[key] = {"done": set(), "current": None}

    def event(self, msg: dict) -> None:
        """A stage event of a task: ``{"key", "stage", "event": "start"|"done", "seconds"}``."""
        with self._lock:
            chain = self._inflight.get(msg.get("key"))
            stage = msg.get("stage")
            if chain is None or stage not in self.counts:
                return  # a late event of a finished chain
            if msg.get("event") == "start":
                chain["current"] = stage
                return
            if stage in chain["done"]:
                return
            chain["done"].add(stage)
            self._count(stage)

    def current(self, key: str) -> str | None:
        """The stage the chain of ``key`` last started (None: no event arrived)."""
        with self._lock:
            chain = self._inflight.get(key)
            return chain["current"] if chain else None

    def finish(self, key: str, completed: bool, stage_seconds: dict | None = None) -> None:
        """The chain of ``key`` has finished: a completed one counts every stage."""
        with self._lock:
            chain = self._inflight.pop(key, None)
            if completed:
                for stage in STAGES:
                    if chain is None or stage not in chain["done"]:
                        self._count(stage)
            for stage, sec in (stage_seconds or {}).items():
                if stage in self.seconds:
                    agg = self.seconds[stage]
                    agg[0], agg[1], agg[2] = agg[0] + 1, agg[1] + float(sec), max(agg[2], float(sec))

    def timings(self) -> list[dict]:
        """Per stage: subject-sessions timed, mean and max wall seconds."""
        return [{"stage": k, "subject_sessions": c, "mean_s": round(t / c, 3) if c else None,
                 "max_s": round(m, 3) if c else None} for k, (c, t, m) in self.seconds.items()]

    def _count(self, stage: str) -> None:
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


def _chain_error(fut, key: str = "", stage: str | None = None):
    """The exception of a subject-session task that did not complete.

    A task that never reached a final state (its Dask client or worker was lost, so the
    Prefect state stays PENDING or RUNNING) has no result to read: it becomes a
    :class:`StageError` naming ``stage`` (the stage it last started, from the stage events;
    ``"orchestration"`` when none arrived), so the subject-session is one failure row instead
    of a crash of the whole flow.
    """
    fut.wait()  # the state then comes from the worker, with its exception attached
    state = fut.state
    if not state.is_final():
        where = stage or "orchestration"
        cause = _dask_error(fut)
        return wf.StageError(key, where, RuntimeError(
            f"the {where} stage did not finish (Prefect state {state.type.value}): "
            + (f"the Dask task raised {cause}" if cause else
               "its Dask worker or the scheduler connection was lost")))
    res = state.result(raise_on_failure=False)
    if isinstance(res, BaseException):
        return res
    return RuntimeError(f"subject-session did not complete (Prefect state {state.type.value})")


def _dask_error(fut) -> str:
    """``"Type: message"`` of the Dask task behind a Prefect future that raised outside the
    Prefect task engine (e.g. the task could not be unpickled on the worker), else ``""``."""
    inner = getattr(fut, "wrapped_future", None)
    try:
        if inner is not None and inner.status == "error":
            e = inner.exception(timeout=5)
            return f"{type(e).__name__}: {e}"
    except Exception:  # noqa: BLE001 - the scheduler may be gone too
        pass
    return ""


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
    t0 = time.monotonic()
    n_chains = len(runnable)
    stages = _StageProgress(n_chains, t0)

    def submit(ss, key, need):
        paths = wf.work_paths(ss, output_dir, work_root)
        if not keep_work:
            active_work.register(paths["work_url"])  # removed by the CLI if the run is interrupted
        stages.submitted(ss.key)
        with memory_annotation(need):  # at most MEMORY / need of these at once on a worker
            fut = subject_session_task.submit(ss, paths, output_dir, cfg, key, tables_url, keep_work)
        return ss, [fut], paths

    window = int(max_in_flight or in_flight_window(current_client()))
    log.info("at most %d subject-session tasks in flight", window)

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
        for (ss, futs, paths), _ in bounded_completion(runnable, submit, window):
            fut = futs[0]
            i += 1
            fut.wait()
            if fut.state.is_completed():
                res = dict(fut.result())
                stages.finish(ss.key, True, res.pop("stage_seconds", None))
                done.append(res)
                status = "done"
            else:
                row = wf.failure_row(ss, _chain_error(fut, ss.key, stages.current(ss.key)))
                stages.finish(ss.key, False)
                failed.append(row)
                status = f"FAILED at {row['stage']}"
                log.error("%s failed at %s: %s", ss.key, row["stage"], row["message"])
                if not keep_work:  # the task removes it; not when its worker was lost
                    wf.discard_work(paths)
            active_work.release(paths["work_url"])
            now = time.monotonic()
            if now - last_progress >= PROGRESS_EVERY_S or i == n_chains:  # one API call per interval
                update_progress_artifact(progress, progress=100.0 * i / n_chains)
                last_progress = now
            _progress_line(i, n_chains, ss.key, status, now - t0)
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

