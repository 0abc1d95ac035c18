"""Bounded submission window of the participant flow (issue 18: the flow must not hold every
future of a 10,000 subject-session cohort at once)."""

import threading
import time

import pytest


class _Wrapped:
    """Stand-in for a Prefect future: ``wrapped_future`` and ``wait()`` as PrefectDaskFuture."""

    def __init__(self, fut):
        self.wrapped_future = fut

    def wait(self):
        self.wrapped_future.result()


def _work(i):
    time.sleep(0.01 * (i % 3))
    return i


@pytest.fixture(scope="module")
def client():
    """A client that is not the default one (the flow's task runner does not set one)."""
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=1, threads_per_worker=4, processes=False, dashboard_address=None) as lc, \
            Client(lc, set_as_default=False) as c:
        yield c


@pytest.mark.parametrize("dask_futures", [True, False])
def test_bounded_completion_never_exceeds_window(client, dask_futures):
    from flows.participant import bounded_completion, in_flight_window
    lock = threading.Lock()
    state = {"in_flight": 0, "peak": 0}
    assert in_flight_window(client) == 64 and in_flight_window(client, per_thread=20) == 80

    def submit(i):
        with lock:
            state["in_flight"] += 1
            state["peak"] = max(state["peak"], state["in_flight"])
        first = client.submit(_work, i, pure=False)
        last = client.submit(_work, first, pure=False)
        wrap = _Wrapped if dask_futures else _Done
        return i, [wrap(first), wrap(last)]

    seen, stages = [], []
    for (i, futs), j in bounded_completion([(k,) for k in range(40)], submit, 5):
        futs[j].wait()
        if j == 0:
            stages.append(i)
            continue
        seen.append(i)
        with lock:
            state["in_flight"] -= 1
    assert sorted(seen) == list(range(40)) and sorted(stages) == list(range(40))
    assert state["peak"] == 5


class _Done:
    """A future without a Dask future behind it (awaited in submission order)."""

    def __init__(self, fut):
        self.fut = fut

    def wait(self):
        self.fut.result()


def test_bounded_completion_rejects_empty_window():
    from flows.participant import bounded_completion
    with pytest.raises(ValueError, match="window"):
        list(bounded_completion([(1,)], lambda i: (i, []), 0))


class _StateFuture:
    """Stand-in for a Prefect future whose state is fixed (as after a lost Dask client)."""

    def __init__(self, state):
        self.state = state

    def wait(self):
        return None


def test_unfinished_chain_is_a_failure_row_not_a_flow_crash():
    """A subject-session task left PENDING (its Dask client disconnected under load, seen in the
    pods run of issue 17) used to raise ``UnfinishedRun`` out of the flow: it must be one
    failure row naming the stage the task was in (from its stage events)."""
    from prefect.states import Failed, Pending

    from flows.participant import _chain_error
    from qsmdask.workflows.participant import StageError
    err = _chain_error(_StateFuture(Pending()), "sub-01_ses-pre", "reconstruct")
    assert isinstance(err, StageError)
    assert err.stage == "reconstruct" and err.key == "sub-01_ses-pre"
    assert "PENDING" in err.message and "did not finish" in err.message
    assert _chain_error(_StateFuture(Pending()), "sub-01_ses-pre", None).stage == "orchestration"
    # a Dask task that raised outside the Prefect engine: its error is in the row
    from distributed import Client, LocalCluster

    def unpicklable_on_worker():
        raise ModuleNotFoundError("No module named 'flows'")

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as lc, \
            Client(lc, set_as_default=False) as c:
        inner = c.submit(unpicklable_on_worker, pure=False)
        try:
            inner.result()
        except ModuleNotFoundError:
            pass
        fut = _StateFuture(Pending())
        fut.wrapped_future = inner
        err = _chain_error(fut, "sub-01_ses-pre", None)
    assert err.stage == "orchestration" and "ModuleNotFoundError: No module named 'flows'" in err.message
    boom = StageError("sub-01_ses-pre", "write", OSError("disk full"))
    assert _chain_error(_StateFuture(Failed(data=boom)), "sub-01_ses-pre", "write") is boom


def test_stage_progress_counts_each_stage_once_and_forgets_finished_chains(capsys):
    from flows.participant import _StageProgress
    sp = _StageProgress(2, 0.0, every_s=0.0)
    sp.submitted("a")
    sp.submitted("b")
    for ev in ("start", "done", "done"):  # a stage reported twice (task re-run) counts once
        sp.event({"key": "a", "stage": "ingest", "event": ev})
    sp.event({"key": "a", "stage": "reconstruct", "event": "start"})
    assert sp.counts["ingest"] == 1 and sp.current("a") == "reconstruct"
    sp.finish("a", True, {"ingest": 0.5, "reconstruct": 1.5, "standardise": 1.0, "write": 0.25})
    sp.event({"key": "a", "stage": "write", "event": "done"})  # late event of a finished chain
    assert sp.counts == {"ingest": 1, "reconstruct": 1, "standardise": 1, "write": 1}
    sp.finish("b", False)
    assert sp._inflight == {} and sp.current("a") is None
    t = {r["stage"]: r for r in sp.timings()}
    assert t["reconstruct"]["mean_s"] == 1.5 and t["write"]["subject_sessions"] == 1
    assert "write 1/2" in capsys.readouterr().err
