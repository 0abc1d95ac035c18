"""Several subject-sessions per Prefect task run (issue 18 §1): the task runs stay few, every
subject-session of a batch is isolated (a failure is its own row, naming its stage), a batch run
again skips what it finished, and a resume skips what is done."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from .conftest import write_megre_subject
from qsmdask.orchestration import batching
from qsmdask.orchestration.cluster import ClusterConfig, make_task_runner
from .test_flow_chain import _fast_stages, _task_runs


@pytest.fixture
def five_bids(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "five", "BIDSVersion": "1.9.0"}))
    (root / "participants.tsv").write_text("participant_id\tgroup\n" + "".join(
        f"sub-0{i}\t{'patient' if i % 2 else 'control'}\n" for i in range(1, 6)))
    for i in range(1, 6):
        write_megre_subject(root, f"0{i}", "pre", seed=i, n_echoes=1)
    return root


def _run(bids, out, **kw):
    from flows.participant import participant_flow

    runner = make_task_runner(ClusterConfig(n_workers=1, threads_per_worker=2, processes=False,
                                            memory_limit="2GiB"))
    state = participant_flow.with_options(task_runner=runner)(str(bids), str(out), return_state=True, **kw)
    return state.state_details.flow_run_id, state.result()


def test_batches_isolate_a_failure_and_resume_skips_the_done(five_bids, tmp_path, prefect_api, monkeypatch,
                                                             capsys):
    _fast_stages(monkeypatch, fail_stage="standardise")  # sub-02 fails in standardise
    out = tmp_path / "out"
    flow_run_id, res = _run(five_bids, out, subject_sessions_per_task=2)
    err = capsys.readouterr().err
    # 5 subject-sessions, 2 per task run: 3 task runs (was 5), named by their batch
    runs = _task_runs(flow_run_id)
    assert len(runs) == 3 and all(r.state.is_completed() for r in runs)
    assert sorted(r.name for r in runs)[0] == "batch-0001-of-0003 sub-01_ses-pre..sub-02_ses-pre (2)"
    # the failing one is a failure row naming its stage; its batch-mate and the others are written
    assert sorted(d["key"] for d in res["done"]) == ["sub-01_ses-pre", "sub-03_ses-pre", "sub-04_ses-pre",
                                                     "sub-05_ses-pre"]
    assert [(f["participant_id"], f["stage"]) for f in res["failed"]] == [("sub-02", "standardise")]
    assert "registration diverged" in res["failed"][0]["message"]
    assert list(pd.read_parquet(out / "failures.parquet")["stage"]) == ["standardise"]
    from qsmdask.io.derivatives import DerivativesWriter
    w = DerivativesWriter(out)
    assert [w.read_manifest(f"0{i}", "pre")["status"] for i in range(1, 6)] == ["done", "failed", "done", "done",
                                                                               "done"]
    # per subject-session progress: console lines, stage counts, and each batch's table artifact
    assert "sub-02_ses-pre: FAILED at standardise" in err and "5/5  sub-05_ses-pre: done" in err
    assert "stages: ingest 0/5  reconstruct 0/5" in err and "reconstruct 5/5" in err  # the stage events
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as c:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterTaskRunId
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(
            task_run_id=ArtifactFilterTaskRunId(any_=[r.id for r in runs])))
    rows = [r for a in arts for r in (json.loads(a.data) if isinstance(a.data, str) else a.data)]
    assert {r["subject_session"]: (r["status"], r["stage"]) for r in rows} == {
        "sub-01_ses-pre": ("done", ""), "sub-02_ses-pre": ("failed", "standardise"),
        "sub-03_ses-pre": ("done", ""), "sub-04_ses-pre": ("done", ""), "sub-05_ses-pre": ("done", "")}

    # resume: the four done are skipped, only the failed one runs again (one task run)
    _fast_stages(monkeypatch)
    flow_run_id, res = _run(five_bids, out, subject_sessions_per_task=2)
    assert len(res["skipped"]) == 4 and [d["key"] for d in res["done"]] == ["sub-02_ses-pre"]
    assert [r.name for r in _task_runs(flow_run_id)] == ["sub-02_ses-pre"]  # one left: no batch needed


def test_a_batch_run_again_does_not_redo_what_it_finished(tiny_bids, tmp_path, monkeypatch):
    """What Dask does when a worker dies mid-batch: the batch runs again in the same flow run."""
    from qsmdask.config import PipelineConfig
    from qsmdask.io.bids import find_subject_sessions
    from qsmdask.io.derivatives import DerivativesWriter
    from qsmdask.workflows import participant as wf

    _fast_stages(monkeypatch, fail_stage="standardise")
    calls = []
    real_ingest = wf.ingest
    monkeypatch.setattr(wf, "ingest", lambda ss, paths: calls.append(ss.key) or real_ingest(ss, paths))
    cfg, out = PipelineConfig(), tmp_path / "out"
    batch = [(ss, wf.work_paths(ss, out, None), wf.resume_key(ss, cfg)) for ss in find_subject_sessions(tiny_bids)]
    token = batching.new_run_token()
    first = batching.run_batch(batch, out, cfg, run_token=token, retry_delay_s=0.0)
    assert [(o["key"], o["status"]) for o in first] == [("sub-01_ses-pre", "done"), ("sub-02_ses-pre", "failed")]
    assert first[1]["failure"]["stage"] == "standardise"
    # the worker's clock may differ from the flow's (pods on other nodes, a shared file system):
    # the manifest's time plays no part, its run token does
    manifest = DerivativesWriter(out).manifest_path("01", "pre")
    assert json.loads(manifest.read_text())["run_token"] == token
    os.utime(manifest, ns=(0, 0))
    again = batching.run_batch(batch, out, cfg, run_token=token, retry_delay_s=0.0)
    assert calls == ["sub-01_ses-pre", "sub-02_ses-pre", "sub-02_ses-pre"]  # sub-01 not run again
    assert [(o["key"], o["status"]) for o in again] == [("sub-01_ses-pre", "done"), ("sub-02_ses-pre", "failed")]
    assert again[0]["result"]["earlier_attempt"] and again[0]["result"]["n_files"] == 1
    # outputs of another run (a forced rerun submits a new token) are recomputed
    batching.run_batch(batch[:1], out, cfg, run_token=batching.new_run_token(), retry_delay_s=0.0)
    assert calls[-1] == "sub-01_ses-pre" and len(calls) == 4
    assert [r["status"] for r in batching.batch_table(again)] == ["done (earlier attempt)", "failed"]


def test_subject_sessions_per_task_default_and_setting():
    spt = batching.subject_sessions_per_task
    env: dict = {}
    assert spt(1, environ=env) == 1 and spt(200, environ=env) == 1  # small cohorts: one per task run
    assert spt(201, environ=env) == 2 and spt(1000, environ=env) == 5 and spt(10_000, environ=env) == 50
    assert spt(35_000, environ=env) == 175  # the number of task runs stays ~200
    assert spt(10_000, threads=1000, environ=env) == 3  # but >= 4 batches per worker thread
    assert spt(10_000, 7, environ=env) == 7 and spt(10_000, "auto", environ=env) == 50
    assert spt(10_000, environ={batching.ENV_VAR: "20"}) == 20
    assert spt(10_000, 0, environ={batching.ENV_VAR: "20"}) == 50  # 0: automatic
    for bad in (-1, "many", 2.5):
        with pytest.raises(ValueError, match="positive integer or 'auto'"):
            spt(10, bad, environ=env)
    assert [len(b) for b in batching.make_batches(list(range(11)), 4)] == [4, 4, 3]
    assert batching.batch_name(0, 3, ["a", "b"]) == "batch-0001-of-0003 a..b (2)"


def test_a_batch_lost_as_a_whole_fails_only_its_unfinished_subject_sessions(tiny_bids, tmp_path, monkeypatch):
    """The batch's worker was lost after its first subject-session was written: that one counts as
    done (from its manifest), the other fails at the stage it last started."""
    from prefect.states import Running

    from qsmdask.config import PipelineConfig
    from qsmdask.io.bids import find_subject_sessions
    from qsmdask.orchestration.submission import chain_outcomes
    from qsmdask.workflows import participant as wf

    _fast_stages(monkeypatch)
    cfg, out = PipelineConfig(), tmp_path / "out"
    batch = [(ss, wf.work_paths(ss, out, None), wf.resume_key(ss, cfg)) for ss in find_subject_sessions(tiny_bids)]
    token = batching.new_run_token()
    batching.run_batch(batch[:1], out, cfg, run_token=token)  # written before the worker died

    class LostFuture:  # a Prefect future whose task never reached a final state
        state = Running()
        wrapped_future = None

        def wait(self, timeout=None):
            return None

    outcomes = chain_outcomes(batch, LostFuture(), batched=True, stage_of={"sub-02_ses-pre": "reconstruct"}.get,
                              output_dir=out, config=cfg, run_token=token)
    assert [(o["key"], o["status"]) for o in outcomes] == [("sub-01_ses-pre", "done"), ("sub-02_ses-pre", "failed")]
    assert outcomes[0]["result"]["earlier_attempt"]
    row = outcomes[1]["failure"]
    assert row["stage"] == "reconstruct" and "worker or the scheduler connection was lost" in row["message"]
