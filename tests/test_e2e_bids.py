"""End to end on a real-looking BIDS dataset: two runs of one subject, a subject that fails after
its work store was written, the BIDS-App output location, file modes, and the official BIDS
validator on the derivatives (issue 16)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from qsmdask.cli import EXIT_SUBJECTS_FAILED, main
from qsmdask.io.derivatives import bids_uri
from qsmdask.io.nifti import save_nifti
from qsmdask.io.validation import validate_bids, validator_available


def _rename_run(src_dir, src_stem, dst_dir, dst_stem):
    for f in sorted(src_dir.glob(f"{src_stem}_echo-*")):
        f.rename(dst_dir / f.name.replace(src_stem, dst_stem, 1))


@pytest.fixture(scope="module")
def two_run_dataset(tmp_path_factory):
    from qsmdask.sim import simulate_cohort

    root = tmp_path_factory.mktemp("bids2run") / "bids"
    simulate_cohort(root, n_subjects=3, seed=11, n_sessions=1, voxel_size_mm=(4.0, 4.0, 4.0), t1w=False,
                    write_fields=False)
    anat1 = root / "sub-01" / "anat"
    _rename_run(anat1, "sub-01", anat1, "sub-01_run-1")
    _rename_run(root / "sub-03" / "anat", "sub-03", anat1, "sub-01_run-2")  # other voxels as run 2
    for f in sorted((root / "sub-03").rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    (root / "sub-03").rmdir()
    p = pd.read_csv(root / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    p[p["participant_id"] != "sub-03"].to_csv(root / "participants.tsv", sep="\t", index=False)
    # sub-02's T1w is a valid NIfTI header with a NaN voxel: it fails at ingest, after its
    # MEGRE volumes are in the work store
    t1 = np.ones((20, 20, 20), np.float32)
    t1[5, 5, 5] = np.nan
    save_nifti(root / "sub-02" / "anat" / "sub-02_T1w.nii.gz", t1, np.diag([4.0, 4.0, 4.0, 1.0]))
    return root


def test_two_runs_distinct_outputs_failed_store_removed_modes_and_validator(two_run_dataset, prefect_api,
                                                                              capsys):
    root = two_run_dataset
    out = root / "derivatives" / "qsmdask"  # the BIDS-App place inside the input dataset is allowed
    raw_desc = (root / "dataset_description.json").read_bytes()
    old = os.umask(0o022)
    try:
        rc = main(["run", str(root), str(out), "participant", "--n-workers", "2"])
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    assert rc == EXIT_SUBJECTS_FAILED, err
    assert (root / "dataset_description.json").read_bytes() == raw_desc

    # two runs: two reconstructions, each with its own sources
    anat = out / "sub-01" / "anat"
    chi = {r: nib.load(anat / f"sub-01_run-{r}_Chimap.nii.gz").get_fdata() for r in (1, 2)}
    assert not np.allclose(chi[1], chi[2])
    for r in (1, 2):
        side = json.loads((anat / f"sub-01_run-{r}_Chimap.json").read_text())
        own = sorted(root.glob(f"sub-01/anat/sub-01_run-{r}_echo-*_MEGRE.nii.gz"))
        assert sorted(side["Sources"]) == sorted(bids_uri(f) for f in own) and len(own) == 6
        assert side["SkullStripped"] is True
        assert (anat / f"sub-01_run-{r}_space-MNI152NLin2009aSym_desc-smooth_Chimap.nii.gz").exists()
        assert (out / "logs" / "manifests" / f"sub-01_run-{r}_manifest.json").exists()
    roi = pd.read_parquet(out / "roi")
    assert sorted(roi["run"].unique()) == ["1", "2"] and set(roi["acq"]) == {""}
    assert sorted(p.name for p in (out / "roi").iterdir()) == ["sub-01_run-1_roi.parquet",
                                                                "sub-01_run-2_roi.parquet"]

    # the failed subject: one row naming the file, and no work store left behind
    fails = pd.read_parquet(out / "failures.parquet")
    assert list(fails["participant_id"]) == ["sub-02"] and fails["stage"].iloc[0] == "ingest"
    assert fails["file"].iloc[0].endswith("sub-02_T1w.nii.gz")
    assert not list((out / "work").glob("*.zarr")), list((out / "work").iterdir())

    # umask 022: everything readable by the group and others
    modes = {str(p): oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()
             and p.name != "qsmdask.lock"}
    assert modes and all(m == "0o644" for m in modes.values()), modes

    if validator_available():
        res = validate_bids(out)
        assert res.dataset + res.files == [], res.dataset + res.files

    # resume: both runs are up to date, the failed subject is tried again
    rc = main(["run", str(root), str(out), "participant", "--skip-bids-validation"])
    assert rc == EXIT_SUBJECTS_FAILED
    assert "0 done, 2 up to date" in capsys.readouterr().out
