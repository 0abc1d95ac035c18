"""End to end: BIDS in -> Chimap, ROI Parquet, group tables out, through the CLI, Prefect and Dask."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from qsmdask.cli import EXIT_ANALYSIS_FAILED, EXIT_OK, EXIT_SUBJECTS_FAILED, main
from qsmdask.io.nifti import save_nifti
from qsmdask.kernels import b0_direction_from_affine, dipole_kernel

ROI_COLUMNS = {"participant_id", "session_id", "atlas", "roi", "hemisphere", "n_voxels", "mean_ppm",
               "median_ppm", "std_ppm"}


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    from qsmdask.sim import simulate_cohort
    root = tmp_path_factory.mktemp("cohort") / "bids"
    simulate_cohort(root, n_subjects=4, seed=7, n_sessions=1, voxel_size_mm=(4.0, 4.0, 4.0), t1w=False)
    return root


def test_participant_group_resume_and_failure(tiny_cohort, tmp_path, prefect_api, capsys, monkeypatch):
    out = tmp_path / "derivatives"
    monkeypatch.setenv("QSMDASK_SUBJECT_SESSIONS_PER_TASK", "2")  # the real pipeline in batches
    rc = main(["run", str(tiny_cohort), str(out), "participant", "--n-workers", "2"])
    monkeypatch.delenv("QSMDASK_SUBJECT_SESSIONS_PER_TASK")
    first = capsys.readouterr()
    assert rc == EXIT_OK, first.err
    # each batch's manifests carry its run token (what a retried batch checks; no clock compared)
    tokens = [json.loads(p.read_text()).get("run_token")
              for p in sorted((out / "logs" / "manifests").glob("sub-0*_manifest.json"))]
    assert len(tokens) == 4 and all(tokens) and tokens[0] == tokens[1] != tokens[2] == tokens[3]
    # console: stage progress before the first subject-session finishes, no shutdown noise
    err = first.err
    assert "stages: ingest 0/4" in err and err.index("stages:") < err.index("] 1/4 ")
    assert "still alive" not in err and "distributed.nanny" not in err, err
    # the run's log file: the console lines and the INFO logs
    logs = list((out / "logs").glob("qsmdask_participant_*.log"))
    assert len(logs) == 1
    log_text = logs[0].read_text()
    assert "participant level: 4 done" in log_text and "] 4/4 " in log_text and "stages:" in log_text
    assert "still alive" not in log_text

    chi_img = nib.load(out / "sub-01/anat/sub-01_Chimap.nii.gz")
    src = nib.load(tiny_cohort / "sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz")
    assert chi_img.shape == src.shape and np.allclose(chi_img.affine, src.affine, atol=1e-4)
    side = json.loads((out / "sub-01/anat/sub-01_Chimap.json").read_text())
    assert side["Units"] == "ppm" and side["GeneratedBy"][0]["Version"]
    assert "inversion_method" in side["Chain"]
    # issue 14: one reference for every map and table, named in every sidecar
    tside = json.loads((out / "sub-01/anat/sub-01_space-MNI152NLin2009aSym_desc-smooth_Chimap.json").read_text())
    from qsmdask.config import PipelineConfig
    default_ref = PipelineConfig().reference
    assert side["Reference"] == tside["Reference"] == default_ref and side["ReferenceVoxels"] > 0
    assert side["ReferenceValue_ppm"] == tside["ReferenceValue_ppm"]
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert (out / "sub-01/anat/sub-01_desc-brain_mask.nii.gz").exists()
    assert (out / "sub-01/anat/sub-01_space-MNI152NLin2009aSym_desc-smooth_Chimap.nii.gz").exists()

    roi = pd.read_parquet(out / "roi")  # the folder reads as one dataset
    assert ROI_COLUMNS | {"reference", "reference_ppm"} <= set(roi.columns)
    assert (roi["reference"] == default_ref).all() and np.isfinite(roi["reference_ppm"]).all()
    one = roi[roi.participant_id == "sub-01"]
    assert one["reference_ppm"].nunique() == 1
    assert one["reference_ppm"].iloc[0] == pytest.approx(side["ReferenceValue_ppm"])
    assert sorted(roi["participant_id"].unique()) == ["sub-01", "sub-02", "sub-03", "sub-04"]
    put = roi[(roi["roi"] == "putamen") & (roi["hemisphere"] == "L") & (roi["level"] == "group")]
    assert len(put) == 4 and (put["n_voxels"] > 0).all()

    rc = main(["run", str(tiny_cohort), str(out), "group"])
    assert rc == EXIT_OK
    g = pd.read_parquet(out / "group" / "group_wilcoxon.parquet")
    assert {"roi", "hemisphere", "p", "p_corrected", "statistic"} <= set(g.columns)
    assert (g["p_corrected"] >= g["p"] - 1e-12).all()
    html = (out / "report.html").read_text()
    assert "http://" not in html and "<script src" not in html
    png = out / "sub-01/anat/sub-01_desc-recon_qc.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a group rerun whose voxel-wise analysis fails: exit 4, the reason in skipped.parquet, and
    # the first run's voxel-wise maps and clusters gone (before: left in place, and the report
    # showed them as this run's results)
    assert (out / "group" / "perm_t.nii.gz").exists() and (out / "group" / "perm_clusters.parquet").exists()
    assert "No voxel-wise permutation results" not in html

    def broken(*a, **k):
        raise RuntimeError("simulated failure of the voxel-wise analysis")

    monkeypatch.setattr("flows.group.run_voxelwise", broken)
    capsys.readouterr()
    rc = main(["run", str(tiny_cohort), str(out), "group", "--n-perm", "10"])
    assert rc == EXIT_ANALYSIS_FAILED
    assert "voxel-wise analysis failed: RuntimeError: simulated failure" in capsys.readouterr().err
    assert not list((out / "group").glob("perm_*")) and not (out / "logs/qsmdask_voxelwise_config.json").exists()
    sk = pd.read_parquet(out / "group" / "skipped.parquet")
    assert sk[sk["test"] == "voxelwise"]["reason"].str.contains("failed: RuntimeError").any()
    html = (out / "report.html").read_text()
    assert "No voxel-wise permutation results" in html and "simulated failure" in html
    assert (out / "group" / "group_wilcoxon.parquet").exists()  # the ROI statistics stand
    monkeypatch.undo()

    # rerun: nothing to do
    capsys.readouterr()
    rc = main(["run", str(tiny_cohort), str(out), "participant"])
    assert rc == EXIT_OK and "0 done, 4 up to date" in capsys.readouterr().out

    # a corrupt subject fails alone; the others stay done; exit code 3; failure row names the file
    bad = tiny_cohort / "sub-03/anat/sub-03_echo-2_part-phase_MEGRE.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    rc = main(["run", str(tiny_cohort), str(out), "participant"])
    assert rc == EXIT_SUBJECTS_FAILED
    fails = pd.read_parquet(out / "failures.parquet")
    assert list(fails["participant_id"]) == ["sub-03"]
    # the official BIDS validator (when installed) finds the truncated header before ingest does
    from qsmdask.io.validation import validator_available
    assert fails["stage"].iloc[0] == ("validate" if validator_available() else "ingest")
    assert bad.name in fails["file"].iloc[0]
    assert "sub-03" in capsys.readouterr().err


def _oblique_phantom(shape=(64, 64, 48), voxel_mm=(1.5, 1.5, 2.0), angle_deg=20.0):
    """A head-like ellipsoid phantom written independently of the simulator."""
    ang = np.deg2rad(angle_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(ang), -np.sin(ang)], [0, np.sin(ang), np.cos(ang)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(voxel_mm)
    aff[:3, 3] = -aff[:3, :3] @ (np.array(shape) / 2)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    mm = (idx - np.array(shape) / 2) * voxel_mm
    def ell(c, r):
        return (((mm - c) / r) ** 2).sum(-1) <= 1
    brain = ell((0, 0, 0), (38, 40, 36))
    chi = np.zeros(shape, np.float32)
    chi[brain] = -0.01
    for c, r, v in [((-14, 5, 0), (6, 8, 6), 0.09), ((14, 5, 0), (6, 8, 6), 0.09), ((0, -12, 4), (8, 6, 6), 0.05),
                    ((-10, 18, -8), (5, 5, 5), 0.15), ((12, -20, 10), (7, 5, 6), -0.05)]:
        chi[ell(c, r)] = v
    return chi, brain, aff


@pytest.mark.slow
def test_foreign_oblique_multiecho_bids_recovers_chi(tmp_path):
    """A BIDS dataset not made by qsmdask's simulator: oblique affine, 3 echoes, vendor phase range."""
    from qsmdask.config import PipelineConfig
    from qsmdask.io.bids import find_subject_sessions
    from qsmdask.workflows.participant import process_subject_session

    chi, brain, aff = _oblique_phantom()
    vs = np.linalg.norm(aff[:3, :3], axis=0)
    b0 = b0_direction_from_affine(aff)
    assert abs(b0[2]) < 0.95  # oblique in voxel space
    pad = [(s // 2, s // 2) for s in chi.shape]
    big = np.pad(chi, pad)
    field = np.real(np.fft.ifftn(dipole_kernel(big.shape, vs, b0) * np.fft.fftn(big)))
    field = field[tuple(slice(p[0], p[0] + s) for p, s in zip(pad, chi.shape))]
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "foreign", "BIDSVersion": "1.8.0"}))
    (root / "participants.tsv").write_text("participant_id\tgroup\nsub-ph01\tcontrol\n")
    anat = root / "sub-ph01" / "anat"
    for e, te in enumerate((0.005, 0.010, 0.015), 1):
        phase = 2 * np.pi * 42.576e6 * 3.0 * te * field * 1e-6 + 0.3
        wrapped = np.angle(np.exp(1j * phase))
        vendor = np.round((wrapped + np.pi) / (2 * np.pi) * 4096 - 2048).clip(-2048, 2047)
        mag = np.where(brain, 100.0 * np.exp(-te / 0.04), 0.0)
        meta = {"EchoTime": te, "MagneticFieldStrength": 3.0}
        save_nifti(anat / f"sub-ph01_echo-{e}_part-mag_MEGRE.nii", mag.astype(np.float32), aff, sidecar=meta)
        save_nifti(anat / f"sub-ph01_echo-{e}_part-phase_MEGRE.nii", vendor.astype(np.int16), aff, sidecar=meta)
    ss = find_subject_sessions(root)
    out = tmp_path / "out"
    process_subject_session(ss[0], out, PipelineConfig())
    rec = nib.load(out / "sub-ph01/anat/sub-ph01_Chimap.nii.gz")
    assert rec.shape == chi.shape and np.allclose(rec.affine, aff, atol=1e-4)
    side = json.loads((out / "sub-ph01/anat/sub-ph01_Chimap.json").read_text())
    assert any("rescaled" in n for n in side["Notes"])
    m = nib.load(out / "sub-ph01/anat/sub-ph01_desc-brain_mask.nii.gz").get_fdata() > 0
    r = np.corrcoef(rec.get_fdata()[m], chi[m])[0, 1]
    assert r >= 0.8, f"corr(chi, truth) = {r:.3f}"
