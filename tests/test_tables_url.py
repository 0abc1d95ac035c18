"""Parquet tables on fsspec URLs: the table functions, the writer's manifest, and a CLI run
with ``--tables-url file://...`` (participant, group, rerun).

``memory://`` is per process: tested through the functions here, never through the CLI
(whose Dask workers are processes; it refuses the URL).
"""

from __future__ import annotations

import json
import logging
import uuid

import fsspec
import numpy as np
import pandas as pd
import pytest

from qsmdask.cli import EXIT_OK, EXIT_USAGE, main
from qsmdask.io.derivatives import DerivativesWriter
from qsmdask.io.tables import file_digest, read_parquet, read_parquet_folder, table_exists, write_parquet


@pytest.fixture(params=["file", "memory"])
def table_root(request, tmp_path):
    if request.param == "file":
        yield (tmp_path / "tables").as_uri()
        return
    root = f"memory://qsmdask-{uuid.uuid4().hex}"
    yield root
    fs, path = fsspec.core.url_to_fs(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_write_read_tables_on_urls(table_root):
    a = write_parquet(pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}), f"{table_root}/roi/1.parquet",
                      metadata={"qsmdask_version": "t"})
    write_parquet(pd.DataFrame({"a": [3], "c": [1.5]}), f"{table_root}/roi/2.parquet")
    df = read_parquet_folder(f"{table_root}/roi")
    assert len(df) == 3 and set(df.columns) == {"a", "b", "c"} and df["c"].iloc[2] == 1.5
    assert list(read_parquet(a)["a"]) == [1, 2]
    assert table_exists(a) and not table_exists(f"{table_root}/roi/3.parquet")
    assert read_parquet_folder(f"{table_root}/nothing-here").empty
    digest = file_digest(a)
    assert digest is not None and len(digest[0]) == 64 and digest[1] > 0
    assert file_digest(f"{table_root}/roi/3.parquet") is None
    if table_root.startswith("file://"):  # local: atomic temporary file + rename, nothing left over
        from qsmdask.io.tables import local_path
        folder = local_path(f"{table_root}/roi")
        assert sorted(p.name for p in folder.iterdir()) == ["1.parquet", "2.parquet"]
        assert not isinstance(a, str)  # a local Path comes back


def test_group_outputs_of_an_earlier_run_are_pruned(tmp_path, table_root):
    """A group rerun leaves only what it wrote: an earlier run's voxel-wise maps, cluster table,
    TFCE map and voxel-wise config would otherwise be read by the report as current results."""
    from qsmdask.io.nifti import save_nifti
    from qsmdask.io.tables import list_tables

    out = tmp_path / "out"
    w = DerivativesWriter(out, tables_url=table_root)
    df = pd.DataFrame({"a": [1]})
    for n in ("group_wilcoxon", "paired_ttest", "perm_clusters"):  # an earlier run's tables
        w.save_group_table(n, df)
    maps = [save_nifti(out / "group" / f"perm_{n}.nii.gz", np.zeros((2, 2, 2), np.float32), np.eye(4))
            for n in ("t", "logp_fwe_tfce")]
    w.write_run_config({"level": "group-voxelwise"}, name="qsmdask_voxelwise_config.json")
    (out / "group" / "notes.txt").write_text("a user's file")

    # this run: ROI statistics only, voxel-wise failed (nothing perm_* written)
    now = [w.save_group_table("group_wilcoxon", df), w.save_group_table("skipped", df)]
    removed = w.prune_group_outputs(now)
    left = sorted(str(f).rsplit("/", 1)[-1] for f in list_tables(w.group_folder()))
    assert left == ["group_wilcoxon.parquet", "skipped.parquet"]
    assert not any(m.exists() for m in maps) and not (out / "logs/qsmdask_voxelwise_config.json").exists()
    assert (out / "group" / "notes.txt").exists()  # only the group level's own outputs go
    assert {str(f).rsplit("/", 1)[-1] for f in removed} == {
        "paired_ttest.parquet", "perm_clusters.parquet", "perm_t.nii.gz", "perm_logp_fwe_tfce.nii.gz",
        "qsmdask_voxelwise_config.json"}

    # a run whose voxel-wise analysis wrote maps keeps them and its config
    t = save_nifti(out / "group" / "perm_t.nii.gz", np.zeros((2, 2, 2), np.float32), np.eye(4))
    w.write_run_config({"level": "group-voxelwise"}, name="qsmdask_voxelwise_config.json")
    assert w.prune_group_outputs(now + [t, w.save_group_table("perm_clusters", df)]) == []
    assert t.exists() and (out / "logs/qsmdask_voxelwise_config.json").exists()


def test_writer_manifest_records_and_verifies_remote_roi_table(tmp_path, table_root):
    w = DerivativesWriter(tmp_path / "out", tables_url=table_root)
    img = w.save_image("01", "", "Chimap", np.zeros((3, 3, 3), np.float32), np.eye(4))
    roi = w.save_roi_table("01", "", pd.DataFrame({"roi": ["putamen"], "mean_ppm": [0.1]}))
    assert str(roi).replace("\\", "/").endswith("roi/sub-01_roi.parquet")
    assert not (tmp_path / "out" / "roi").exists()  # tables are not under OUTPUT_DIR
    m = json.loads(w.write_manifest("01", "", [img, roi], config={}, status={"status": "done"}).read_text())
    refs = [set(e) & {"path", "url"} for e in m["files"]]
    assert {"path"} in refs and {"url"} in refs  # image relative to OUTPUT_DIR, table by URL
    assert w.manifest_intact(m) and w.manifest_lists(m, w.roi_path("01", ""))
    assert not DerivativesWriter(tmp_path / "out").manifest_lists(m, DerivativesWriter(tmp_path / "out")
                                                                  .roi_path("01", ""))
    write_parquet(pd.DataFrame({"roi": ["putamen"], "mean_ppm": [0.2]}), w.roi_path("01", ""))
    assert not w.manifest_intact(m)  # the table changed at its URL: recompute


def test_default_tables_stay_under_output_dir(tmp_path):
    w = DerivativesWriter(tmp_path)
    assert w.roi_path("01", "pre") == tmp_path / "roi" / "sub-01_ses-pre_roi.parquet"
    assert w.failures_path() == tmp_path / "failures.parquet"
    p = w.save_roi_table("01", "pre", pd.DataFrame({"a": [1]}))
    m = json.loads(w.write_manifest("01", "pre", [p], config={}).read_text())
    assert m["files"][0]["path"] == "roi/sub-01_ses-pre_roi.parquet"


def test_cli_refuses_memory_and_unknown_table_urls(tmp_path, tiny_bids, capsys):
    for url, msg in (("memory://x", "one process"), ("nosuchfs://x", "unknown storage protocol")):
        with pytest.raises(SystemExit) as e:
            main(["run", str(tiny_bids), str(tmp_path / "o"), "participant", "--tables-url", url])
        assert e.value.code == EXIT_USAGE and msg in capsys.readouterr().err


def _dashboard_log_line(timeout_s: float = 20.0) -> str:
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["qsmdask-participant"])))
        log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs]))
        while True:  # logs reach the server in batches
            logs = client.read_logs(log_filter=log_filter)
            lines = [log.message for log in logs if log.message.startswith("Dask dashboard: ")]
            if lines or time.monotonic() > deadline:
                assert lines, "no 'Dask dashboard: ...' flow-run log on the Prefect server"
                return lines[-1]
            time.sleep(0.5)


@pytest.fixture(scope="module")
def two_subject_cohort(tmp_path_factory):
    from qsmdask.sim import simulate_cohort
    root = tmp_path_factory.mktemp("cohort2") / "bids"
    simulate_cohort(root, n_subjects=2, seed=11, n_sessions=1, voxel_size_mm=(4.0, 4.0, 4.0), t1w=False)
    return root


def test_cli_tables_url_participant_group_rerun(two_subject_cohort, tmp_path, prefect_api, capsys, caplog):
    import flows.participant  # noqa: F401 - configures Prefect's logging before the level is raised

    out, tables = tmp_path / "derivatives", tmp_path / "elsewhere" / "tables"
    url = tables.as_uri()
    caplog.set_level(logging.INFO, logger="prefect")  # the suite runs Prefect at WARNING, the CLI at INFO
    rc = main(["run", str(two_subject_cohort), str(out), "participant", "--n-workers", "1", "--tables-url", url])
    assert rc == EXIT_OK, capsys.readouterr().err
    # the Dask dashboard link is in the flow run's logs on the Prefect server (the UI shows them)
    assert "http" in _dashboard_log_line()

    assert sorted(p.name for p in (tables / "roi").iterdir()) == ["sub-01_roi.parquet", "sub-02_roi.parquet"]
    assert not (out / "roi").exists() and (out / "sub-01/anat/sub-01_Chimap.nii.gz").exists()
    assert (tables / "failures.parquet").exists() and not (out / "failures.parquet").exists()
    man = json.loads((out / "logs/manifests/sub-01_manifest.json").read_text())
    assert any(e.get("url") == f"{url}/roi/sub-01_roi.parquet" for e in man["files"])
    assert json.loads((out / "logs/qsmdask_config.json").read_text())["tables_url"] == url

    rc = main(["run", str(two_subject_cohort), str(out), "group", "--n-perm", "0", "--tables-url", url])
    assert rc == EXIT_OK, capsys.readouterr().err
    assert (tables / "group" / "skipped.parquet").exists() and not (out / "group").exists()
    html = (out / "report.html").read_text()
    assert "no ROI tables" not in html and "could not be read" not in html  # the report found them

    capsys.readouterr()
    rc = main(["run", str(two_subject_cohort), str(out), "participant", "--n-workers", "1", "--tables-url", url])
    assert rc == EXIT_OK and "0 done, 2 up to date" in capsys.readouterr().out
