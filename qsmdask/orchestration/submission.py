"""Submission plumbing of the participant flow: the bounded in-flight window, the console's
progress lines and stage counts, and the failure of a task that never finished.

Prefect-free except for the futures it is handed (``flows.participant`` stays thin).
"""

from __future__ import annotations

import sys
import time

from qsmdask.workflows import participant as wf

#: The progress artifact is updated at most this often (one API call each).
PROGRESS_EVERY_S = 5.0


def progress_line(i: int, n: int, key: str, status: str, elapsed_s: float) -> None:
    """One line per finished subject-session on stderr: count, ETA, outcome."""
    eta = elapsed_s / i * (n - i)
    bar = "#" * int(20 * i / n) + "." * (20 - int(20 * i / n))
    # written to the stream, not print(): the flow's log_prints would turn it into a log record
    sys.stderr.write(f"[{bar}] {i}/{n}  {key}: {status}  (elapsed {hms(elapsed_s)}, ETA {hms(eta)})\n")
    sys.stderr.flush()


STAGES = wf.STAGES


class StageProgress:
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
        sys.stderr.write(f"  stages: {parts}  (elapsed {hms(now - self.t0)})\n")
        sys.stderr.flush()


def say(log, msg: str) -> None:
    """One line on the console (stderr) and in the flow-run log."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()
    log.info(msg)


def hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def chain_error(fut, key: str = "", stage: str | None = None):
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
        cause = dask_error(fut)
        return wf.StageError(key, where, RuntimeError(
            f"the {where} stage did not finish (Prefect state {state.type.value}): "
            + (f"the Dask task raised {cause}" if cause else
               "its Dask worker or the scheduler connection was lost")))
    res = state.result(raise_on_failure=False)
    if isinstance(res, BaseException):
        return res
    return RuntimeError(f"subject-session did not complete (Prefect state {state.type.value})")


def dask_error(fut) -> str:
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


def chain_outcomes(batch: list, fut, *, batched: bool, stage_of, output_dir, config, tables_url=None,
                   run_token: str | None = None) -> list[dict]:
    """Per-subject-session outcomes of a finished task (:func:`qsmdask.orchestration.batching.run_batch`'s
    shape: ``{"key", "status": "done", "result"}`` or ``{"key", "status": "failed", "failure"}``).

    ``batch``: the task's ``(ss, paths, key)`` entries; ``batched``: the task ran
    ``run_batch`` (else it is one subject-session's task, which raises on failure).
    A task that did not complete as a whole (its worker or the scheduler connection was lost,
    or it could not start) fails each of its subject-sessions at the stage it last started
    (``stage_of(key)``) unless that subject-session was already written in this flow run.
    """
    from qsmdask.orchestration.batching import done_from_manifest, finished_in_this_run
    fut.wait()
    if fut.state.is_completed():
        res = fut.result()
        if batched:
            return list(res)
        return [{"key": batch[0][0].key, "status": "done", "result": dict(res)}]
    out = []
    for ss, _paths, key in batch:
        if batched and finished_in_this_run(ss, output_dir, config, key, run_token, tables_url=tables_url):
            out.append({"key": ss.key, "status": "done", "result": done_from_manifest(ss, output_dir,
                                                                                      tables_url=tables_url)})
            continue
        out.append({"key": ss.key, "status": "failed",
                    "failure": wf.failure_row(ss, chain_error(fut, ss.key, stage_of(ss.key)))})
    return out
