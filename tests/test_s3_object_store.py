"""Object storage end to end: the CLI's zarr work area (``--work-dir``) and Parquet tables
(``--tables-url``) on ``s3://`` URLs, through s3fs (pinned, in the image) against a real S3
HTTP endpoint (moto's server mode), with credentials and endpoint from the environment as
in the Kubernetes deployment (ConfigMap ``AWS_ENDPOINT_URL``, Secret ``qsmdask-object-store``).
"""

from __future__ import annotations

import socket

import pandas as pd
import pytest

from qsmdask.cli import EXIT_OK, main

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)  # Dask worker processes inherit them, as pods get them
    import s3fs
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    fs.mkdir("qsmdask-test")
    import boto3  # versioning keeps what the run wrote and later removed (the work area)
    boto3.client("s3", endpoint_url=endpoint).put_bucket_versioning(
        Bucket="qsmdask-test", VersioningConfiguration={"Status": "Enabled"})
    fs.endpoint = endpoint
    try:
        yield fs
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from qsmdask.sim import simulate_cohort
    root = tmp_path_factory.mktemp("s3cohort") / "bids"
    simulate_cohort(root, n_subjects=2, seed=5, n_sessions=1, voxel_size_mm=(4.0, 4.0, 4.0), t1w=False)
    return root


def test_work_dir_and_tables_on_s3(cohort, tmp_path, s3, prefect_api, capsys):
    out = tmp_path / "derivatives"
    work, tables = "s3://qsmdask-test/work", "s3://qsmdask-test/tables"
    rc = main(["run", str(cohort), str(out), "participant", "--n-workers", "1",
               "--work-dir", work, "--tables-url", tables])
    assert rc == EXIT_OK, capsys.readouterr().err
    s3.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in s3.ls("qsmdask-test/tables/roi")) == \
        ["sub-01_roi.parquet", "sub-02_roi.parquet"]
    # the zarr volumes went through S3 (and were removed once each manifest was written)
    import boto3
    versions = boto3.client("s3", endpoint_url=s3.endpoint).list_object_versions(
        Bucket="qsmdask-test", Prefix="work/")
    written = {v["Key"] for v in versions.get("Versions", [])}
    assert any(k.endswith("zarr.json") for k in written), sorted(written)[:20]
    assert any(k.startswith("work/sub-01") for k in written) and any(k.startswith("work/sub-02") for k in written)
    assert not [k for k in s3.find("qsmdask-test/work") if k.endswith("zarr.json")]  # removed after the manifests
    assert not (out / "roi").exists()  # the tables went to S3 only
    assert (out / "sub-01/anat/sub-01_Chimap.nii.gz").exists()
    with s3.open("qsmdask-test/tables/roi/sub-01_roi.parquet", "rb") as f:
        roi = pd.read_parquet(f)
    assert len(roi) > 0 and set(roi["participant_id"]) == {"sub-01"}

    rc = main(["run", str(cohort), str(out), "group", "--n-perm", "0", "--tables-url", tables])
    assert rc == EXIT_OK, capsys.readouterr().err
    s3.invalidate_cache()
    assert s3.ls("qsmdask-test/tables/group")
