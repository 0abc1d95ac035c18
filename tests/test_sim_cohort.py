"""The BIDS cohort writer (qsmdask.sim.simulate_cohort): tree, sidecars, truth, determinism."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from qsmdask.io.nifti import load_nifti
from qsmdask.kernels import b0_direction_from_affine
from qsmdask.sim import plan_cohort, simulate_cohort, simulate_session_files
from qsmdask.sim import phantom as P

SMALL = dict(voxel_size_mm=(4.0, 4.0, 4.0), echo_times_s=(0.004, 0.012, 0.020))
NAME = re.compile(r"^(?P<sub>sub-[0-9]+)(_(?P<ses>ses-[a-z0-9]+))?"
                  r"(_echo-(?P<echo>[0-9]+)_part-(?P<part>mag|phase)_MEGRE|_T1w)\.(nii\.gz|json)$")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("bids")
    return simulate_cohort(out, n_subjects=3, seed=11, n_sessions=2, n_sites=2,
                           effect_ppm=0.03, patient_fraction=0.67, **SMALL)


def _read_tsv(path):
    return pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False)


def test_bids_tree_names_and_sidecars(cohort):
    root = cohort.root
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] and desc["Name"]
    files = sorted(p for p in root.rglob("*") if p.is_file() and "derivatives" not in p.parts)
    anat = [p for p in files if p.parent.name == "anat"]
    assert len(anat) == 3 * 2 * (3 * 2 + 1) * 2   # subjects x sessions x images x (nii+json)
    for p in anat:
        m = NAME.match(p.name)
        assert m, p.name
        assert p.parts[-4] == m["sub"] and p.parts[-3] == m["ses"]
        if p.name.endswith(".json") and m["echo"]:
            side = json.loads(p.read_text())
            te = cohort.config["echo_times_s"][int(m["echo"]) - 1]
            assert side["EchoTime"] == pytest.approx(te)
            assert side["EchoNumber"] == int(m["echo"])
            assert side["MagneticFieldStrength"] == pytest.approx(3.0)
    part = _read_tsv(root / "participants.tsv")
    cols = {"participant_id", "group", "age", "sex", "site", "medication", "hdrs",
            "relapse_count", "episode_weeks", "disease_weeks", "crp", "il6", "tnfa", "il1b"}
    assert cols <= set(part.columns)
    assert list(part["participant_id"]) == ["sub-01", "sub-02", "sub-03"]
    assert set(part["group"]) == {"patient", "control"} and set(part["sex"]) <= {"M", "F"}
    described = json.loads((root / "participants.json").read_text())
    assert cols <= set(described)
    for pid in part["participant_id"]:
        ses = _read_tsv(root / pid / f"{pid}_sessions.tsv")
        assert list(ses["session_id"]) == ["ses-pre", "ses-post"]
        assert ses["acq_time"].str.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$").all()
        assert pd.Timestamp(ses["acq_time"][1]) > pd.Timestamp(ses["acq_time"][0])
    deriv = json.loads((cohort.derivatives / "dataset_description.json").read_text())
    assert deriv["DatasetType"] == "derivative"


def test_clinical_plausibility_and_treatment_response():
    plan = plan_cohort(n_subjects=40, seed=5, n_sessions=2)
    p = plan.participants
    pat, con = p[p["group"] == "patient"], p[p["group"] == "control"]
    assert len(pat) == 20
    assert pat["hdrs"].min() > con["hdrs"].max()
    assert (con[["relapse_count", "episode_weeks", "disease_weeks", "medication"]] == 0).all().all()
    for marker in ("crp", "il6", "tnfa", "il1b"):
        assert np.median(pat[marker]) > np.median(con[marker])
    # planted effect tracks disease duration (for clinical correlations)
    r = np.corrcoef(np.log(pat["disease_weeks"]), pat["planted_effect_ppm"])[0, 1]
    assert r > 0.5
    s = plan.sessions.merge(p[["participant_id", "group"]], on="participant_id")
    wide = s.pivot(index="participant_id", columns="session_id", values="hdrs")
    improved = (wide["ses-post"] < wide["ses-pre"])[pat["participant_id"]]
    assert improved.all()


def test_images_load_with_oblique_b0_matching_truth_pose(cohort):
    for pid in cohort.participants["participant_id"]:
        for ses in cohort.session_ids:
            paths = cohort.gre_paths(pid, ses)
            truth = cohort.truth_paths(pid, ses)
            pose = json.loads(truth["pose"].read_text())
            phase, aff, _ = load_nifti(paths["phase"][-1])
            assert phase.min() >= -np.pi and phase.max() < np.pi
            np.testing.assert_allclose(aff, pose["affine"], atol=1e-4)
            b0 = b0_direction_from_affine(aff)
            np.testing.assert_allclose(b0, pose["b0_dir"], atol=1e-5)
            assert np.degrees(np.arccos(abs(b0[2]))) > 0.5
            mag, _, _ = load_nifti(paths["magnitude"][0])
            mask, maff, _ = load_nifti(truth["mask"])
            assert mag.shape == phase.shape == mask.shape
            np.testing.assert_allclose(maff, aff, atol=1e-4)
            brain = mask > 0
            assert np.median(mag[brain]) > 10 * np.median(mag[~brain & (mag < np.median(mag))])
            t1, t1aff, _ = load_nifti(paths["t1w"])
            assert t1.ndim == 3 and not np.allclose(t1aff, aff)


def test_phase_file_consistent_with_truth_field(cohort):
    pid, ses = "sub-01", "ses-pre"
    paths, truth = cohort.gre_paths(pid, ses), cohort.truth_paths(pid, ses)
    field, _, _ = load_nifti(truth["total_field"])
    mask = load_nifti(truth["mask"])[0] > 0
    p1, p2 = (load_nifti(paths["phase"][e])[0] for e in (0, 1))
    te = cohort.config["echo_times_s"]
    w = 2 * np.pi * P.GAMMA_HZ_PER_T * 3.0e-6
    # the echo difference removes the offset: it must equal the true field's phase
    d = np.angle(np.exp(1j * (p2 - p1 - w * (te[1] - te[0]) * field)))[mask]
    assert np.median(np.abs(d)) < 0.05


def test_planted_effect_in_truth(cohort):
    tt = cohort.tissue_table
    part = cohort.truth.set_index("participant_id")
    assert "planted_effect_ppm" not in cohort.participants.columns  # truth stays out of raw
    written = _read_tsv(cohort.derivatives / "participants_truth.tsv").set_index("participant_id")
    pd.testing.assert_series_equal(written["planted_effect_ppm"], part["planted_effect_ppm"])
    for _, row in tt[tt["label"] > 0].iterrows():
        assert row["chi_ppm"] - row["baseline_chi_ppm"] == pytest.approx(row["planted_effect_ppm"])
        expected = part.loc[row["participant_id"], "planted_effect_ppm"] \
            if row["region"] in ("putamen", "thalamus", "hippocampus") else 0.0
        assert row["planted_effect_ppm"] == pytest.approx(expected, abs=1e-9)
        if row["n_voxels"] >= 20:
            assert row["mean_truth_ppm"] == pytest.approx(row["chi_ppm"], abs=0.03)
    assert (part.loc[part["group"] == "patient", "planted_effect_ppm"] > 0).all()
    # the truth map itself: putamen of patients up by their planted effect vs. baseline values
    pid = part.index[part["group"] == "patient"][0]
    chi, _, _ = load_nifti(cohort.truth_paths(pid, "ses-pre")["chi"])
    dseg, _, _ = load_nifti(cohort.truth_paths(pid, "ses-pre")["dseg"])
    put = np.isin(dseg, P.REGION_LABELS["putamen"])
    row = tt[(tt["participant_id"] == pid) & (tt["region"] == "putamen")].iloc[0]
    assert np.median(chi[put]) == pytest.approx(row["chi_ppm"], abs=0.01)
    assert (cohort.derivatives / "tissue_table.tsv").exists()


def test_deterministic_by_seed(cohort, tmp_path):
    plan = plan_cohort(n_subjects=3, seed=11, n_sessions=2, n_sites=2, effect_ppm=0.03,
                       patient_fraction=0.67, config=cohort.config)
    pd.testing.assert_frame_equal(plan.participants[cohort.participants.columns],
                                  cohort.participants)
    simulate_session_files(tmp_path, plan, "sub-02", "ses-post")
    for name in ("phase", "magnitude"):
        a = cohort.gre_paths("sub-02", "ses-post")[name][1]
        b = tmp_path / a.relative_to(cohort.root)
        assert a.read_bytes() == b.read_bytes()
    other = plan_cohort(n_subjects=3, seed=12, n_sessions=2, config=cohort.config)
    assert not other.participants["age"].equals(cohort.participants["age"])


def test_single_session_has_no_session_level(tmp_path):
    info = simulate_cohort(tmp_path, n_subjects=1, seed=2, n_sessions=1, t1w=False,
                           write_fields=False, **SMALL)
    assert info.session_ids == []
    assert not list(tmp_path.glob("sub-01/ses-*"))
    assert not (tmp_path / "sub-01" / "sub-01_sessions.tsv").exists()
    names = sorted(p.name for p in (tmp_path / "sub-01" / "anat").iterdir())
    assert "sub-01_echo-1_part-mag_MEGRE.nii.gz" in names and len(names) == 12
    assert info.truth_paths("sub-01")["chi"].exists()
    assert (info.tissue_table["session_id"] == "").all()


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="n_subjects"):
        simulate_cohort(tmp_path, n_subjects=0, seed=1)
    with pytest.raises(ValueError, match="effect_regions"):
        simulate_cohort(tmp_path, n_subjects=2, seed=1, effect_regions=("cerebellum",))
    with pytest.raises(ValueError, match="echo_times_s"):
        simulate_cohort(tmp_path, n_subjects=2, seed=1, echo_times_s=(4, 12))
    with pytest.raises(ValueError, match="voxel_size_mm"):
        simulate_cohort(tmp_path, n_subjects=2, seed=1, voxel_size_mm=(0, 1, 1))
    assert not list(tmp_path.iterdir())


def test_cohort_without_air_cavities(tmp_path):
    """air_cavities=False reaches the head model: the same brain, pose and draws, but no sinus or
    mastoid air next to the brain's base, so the background field in the brain is less steep."""
    kw = dict(n_subjects=1, seed=2, n_sessions=1, t1w=False, write_fields=True, **SMALL)
    a = simulate_cohort(tmp_path / "air", **kw)
    b = simulate_cohort(tmp_path / "no_air", air_cavities=False, **kw)

    def background_steps(info):
        p = info.truth_paths("sub-01")
        brain = load_nifti(p["mask"])[0] > 0
        bg = load_nifti(p["total_field"])[0] - load_nifti(p["local_field"])[0]
        n = brain.shape
        steps = [np.abs(np.diff(bg, axis=k))[np.take(brain, range(1, n[k]), axis=k)
                                             & np.take(brain, range(n[k] - 1), axis=k)]
                 for k in range(3)]  # steps between neighbours both in the brain
        return brain, np.percentile(np.concatenate(steps), 99)

    brain_a, step_a = background_steps(a)
    brain_b, step_b = background_steps(b)
    np.testing.assert_array_equal(brain_a, brain_b)
    assert step_b < 0.8 * step_a, (step_a, step_b)
    assert json.loads((tmp_path / "no_air" / "derivatives" / "qsmdask-sim" / "sim_config.json").read_text())[
        "air_cavities"] is False
