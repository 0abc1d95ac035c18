"""One Prefect task run per subject-session (issue 18): the four stages run inside it, their
timings stay visible, a failure row still names the failed stage and a later-stage failure
still writes the partial outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from qsmdask.orchestration.cluster import ClusterConfig, make_task_runner


def _fast_stages(monkeypatch, fail_stage: str | None = None):
    """Real ingest and write_partial_outputs; a quick synthetic reconstruct that writes the
    volumes the later stages read; a synthetic standardise/write (or a failing one)."""
    from qsmdask.io import zarrstore
    from qsmdask.io.derivatives import DerivativesWriter
    from qsmdask.workflows import participant as wf

    def reconstruct(meta, config):
        with wf._stage(meta["key"], "reconstruct"):
            mag, aff = zarrstore.read_volume(meta["work_url"], "magnitude", dtype=np.float32)
            vol = np.zeros(mag.shape[:3], np.float32)
            for name in ("chi_ppm", "local_field_ppm", "field_ppm"):
                zarrstore.write_volume(meta["work_url"], name, vol, aff)
            zarrstore.write_volume(meta["work_url"], "mask", vol > -1, aff)
            return {**meta, "qc": {}, "b0_dir": [0.0, 0.0, 1.0]}

    def standardise(meta, config):
        with wf._stage(meta["key"], "standardise"):
            if fail_stage == "standardise" and meta["key"].startswith("sub-02"):
                raise RuntimeError("registration diverged")
            return meta

    def write(ss, meta, output_dir, config, *, resume=None, keep_work=False, tables_url=None, run_token=None):
        with wf._stage(ss.key, "write"):
            w = DerivativesWriter(output_dir, tables_url=tables_url)
            roi = pd.DataFrame({"participant_id": [ss.participant_id], "session_id": [ss.session_id],
                                "roi": ["putamen"], "mean_ppm": [0.05]})
            files = [w.save_roi_table(ss.subject, ss.session, roi)]
            man = w.write_manifest(ss.subject, ss.session, files, config=config.to_dict(),
                                   status={"status": "done", "resume_key": resume or "", "run_token": run_token})
            if not keep_work:
                zarrstore.remove_group(meta["work_url"])
            return {"participant_id": ss.participant_id, "session_id": ss.session_id, "key": ss.key,
                    "manifest": str(man), "n_files": 1, "qc": {}}

    monkeypatch.setattr(wf, "reconstruct", reconstruct)
    monkeypatch.setattr(wf, "standardise_and_measure", standardise)
    monkeypatch.setattr(wf, "write_outputs", write)


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        return c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _run(bids, out, capsys):
    from prefect.context import FlowRunContext  # noqa: F401 - imported before the flow
    from flows.participant import participant_flow

    runner = make_task_runner(ClusterConfig(n_workers=1, threads_per_worker=2, processes=False,
                                            memory_limit="2GiB"))
    state = participant_flow.with_options(task_runner=runner)(str(bids), str(out), return_state=True)
    return state.state_details.flow_run_id, state.result(), capsys.readouterr().err


def test_one_task_run_per_subject_session_with_stage_timings(tiny_bids, tmp_path, prefect_api, monkeypatch,
                                                              capsys):
    _fast_stages(monkeypatch)
    flow_run_id, res, err = _run(tiny_bids, tmp_path / "out", capsys)
    assert sorted(d["key"] for d in res["done"]) == ["sub-01_ses-pre", "sub-02_ses-pre"] and not res["failed"]
    runs = _task_runs(flow_run_id)
    # one task run per subject-session, named by its key (was four: ingest, reconstruct, ...)
    assert sorted(r.name for r in runs) == ["sub-01_ses-pre", "sub-02_ses-pre"]
    assert all(r.state.is_completed() for r in runs)
    # the stages' progress reaches the console through the workers' stage events
    assert "stages: ingest 0/2  reconstruct 0/2  standardise 0/2  write 0/2" in err
    assert "stages: ingest 2/2  reconstruct 2/2  standardise 2/2  write 2/2" in err
    # stage timings: a table artifact of the flow run
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["qsmdask-stage-timings"])))
    table = [a for a in arts if a.flow_run_id == flow_run_id][0].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["stage"] for r in rows] == ["ingest", "reconstruct", "standardise", "write"]
    assert all(r["subject_sessions"] == 2 and r["mean_s"] >= 0 for r in rows)


def test_later_stage_failure_names_stage_and_writes_partial_outputs(tiny_bids, tmp_path, prefect_api,
                                                                    monkeypatch, capsys):
    _fast_stages(monkeypatch, fail_stage="standardise")
    out = tmp_path / "out"
    flow_run_id, res, err = _run(tiny_bids, out, capsys)
    assert [d["key"] for d in res["done"]] == ["sub-01_ses-pre"]
    assert [(f["participant_id"], f["stage"]) for f in res["failed"]] == [("sub-02", "standardise")]
    assert "registration diverged" in res["failed"][0]["message"] and "FAILED at standardise" in err
    fails = pd.read_parquet(out / "failures.parquet")
    assert list(fails["stage"]) == ["standardise"]
    # the reconstruction finished: its native maps are written, status failed
    side = json.loads((out / "sub-02/ses-pre/anat/sub-02_ses-pre_Chimap.json").read_text())
    assert side["Status"] == "partial" and side["FailedStage"] == "standardise"
    from qsmdask.io.derivatives import DerivativesWriter
    assert DerivativesWriter(out).read_manifest("02", "pre")["status"] == "failed"
    assert not (out / "work" / "sub-02_ses-pre.zarr").exists()  # the failed work area is removed
    runs = {r.name: r for r in _task_runs(flow_run_id)}
    assert set(runs) == {"sub-01_ses-pre", "sub-02_ses-pre"} and runs["sub-02_ses-pre"].state.is_failed()


def test_transient_write_error_is_retried_inside_the_task(tiny_bids, tmp_path, monkeypatch):
    """The write stage's transient IO errors are retried (it was a Prefect retry of the write task)."""
    from qsmdask.config import PipelineConfig
    from qsmdask.io.bids import find_subject_sessions
    from qsmdask.workflows import participant as wf

    _fast_stages(monkeypatch)
    real_write, calls = wf.write_outputs, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            with wf._stage(a[0].key, "write"):
                raise OSError(5, "Input/output error", "/nfs/out/x.nii.gz")
        return real_write(*a, **k)

    monkeypatch.setattr(wf, "write_outputs", flaky)
    ss = find_subject_sessions(tiny_bids)[0]
    seen = []
    res = wf.run_subject_session(ss, wf.work_paths(ss, tmp_path, None), tmp_path, PipelineConfig(),
                                 write_retries=2, retry_delay_s=0.0, on_stage=lambda *e: seen.append(e[:2]))
    assert len(calls) == 2 and set(res["stage_seconds"]) == {"ingest", "reconstruct", "standardise", "write"}
    assert seen[:2] == [("ingest", "start"), ("ingest", "done")] and seen[-1] == ("write", "done")
    # bad data is not retried
    calls.clear()

    def bad(*a, **k):
        calls.append(1)
        with wf._stage(a[0].key, "write"):
            raise ValueError("not finite")

    monkeypatch.setattr(wf, "write_outputs", bad)
    with pytest.raises(wf.StageError, match="write failed"):
        wf.run_subject_session(ss, wf.work_paths(ss, tmp_path, None), tmp_path, PipelineConfig(),
                               write_retries=2, retry_delay_s=0.0)
    assert len(calls) == 1
