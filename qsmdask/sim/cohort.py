"""Synthetic BIDS cohorts: participants, clinical data, multi-echo GRE, T1w and ground truth.

``simulate_cohort`` draws a cohort plan (participants, clinical variables, sessions, sites)
from one seed, simulates every subject-session with :mod:`qsmdask.sim.phantom` and writes

- ``OUT/dataset_description.json``, ``OUT/README``, ``OUT/participants.tsv`` and ``participants.json``;
- per subject ``sub-XX/sub-XX_sessions.tsv`` (when there are sessions);
- ``sub-XX[/ses-YY]/anat/sub-XX[_ses-YY]_echo-<n>_part-<mag|phase>_MEGRE.nii.gz`` (+ JSON
  with ``EchoTime`` in s, ``MagneticFieldStrength`` in T, ``EchoNumber``; phase with ``Units: rad``) and ``..._T1w.nii.gz``;
- ground truth in ``OUT/derivatives/qsmdask-sim/``: ``..._desc-truth_Chimap.nii.gz`` (ppm,
  brain only), ``..._desc-truth_mask.nii.gz``, ``..._desc-truth_dseg.nii.gz`` (AAL labels,
  table in ``desc-truth_dseg.tsv``), ``..._desc-truth_pose.json`` and, with
  ``write_fields``, ``..._desc-truthtotal_fieldmap.nii.gz`` / ``..._desc-truthlocal_fieldmap``
  (ppm), plus ``tissue_table.tsv`` (true region susceptibilities per subject-session) and
  ``participants_truth.tsv`` (planted effect and site SNR factor per participant).

Every subject-session draws its randomness from ``numpy.random.default_rng([seed, ...])`` keyed by
its indices, so results do not depend on the order or the parallelism of the runs.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from qsmdask import __version__
from qsmdask.io.nifti import atomic_write_bytes, atomic_write_json, save_nifti
from qsmdask.sim import phantom

__all__ = ["CohortInfo", "CohortPlan", "plan_cohort", "simulate_session_files",
           "simulate_subject_files", "simulate_cohort", "session_names"]

_DEFAULT_FOV = (224.0, 224.0, 160.0)
_SESSION_NAMES = ("pre", "post")


def session_names(n_sessions: int) -> list[str]:
    """BIDS session ids: [] for 1 session, then ses-pre, ses-post, ses-fu1, ses-fu2, ..."""
    if n_sessions == 1:
        return []
    return ["ses-" + (_SESSION_NAMES[k] if k < 2 else f"fu{k - 1}") for k in range(n_sessions)]


def _label(session_id: str) -> str:
    s = str(session_id or "")
    return s[4:] if s.startswith("ses-") else s


@dataclass
class CohortPlan:
    """Everything drawn before imaging: the participants table and per-session settings."""

    participants: pd.DataFrame
    sessions: pd.DataFrame   # participant_id, session_id ('' without sessions), hdrs, acq_time
    config: dict


@dataclass
class CohortInfo:
    """Paths and tables of a simulated cohort.

    Attributes
    ----------
    root : BIDS root.
    derivatives : ``root/derivatives/qsmdask-sim``.
    participants : the participants table (as written to participants.tsv).
    truth : participant_id, group, planted_effect_ppm, site_snr_factor (simulation truth, also
        in ``derivatives/qsmdask-sim/participants_truth.tsv``).
    sessions : participant_id, session_id, hdrs, acq_time per subject-session.
    session_ids : BIDS session labels ([] when the dataset has no session level).
    tissue_table : true region susceptibilities per subject-session.
    config : the resolved simulation settings (also in the derivatives' sim_config.json).
    """

    root: Path
    derivatives: Path
    participants: pd.DataFrame
    truth: pd.DataFrame
    sessions: pd.DataFrame
    session_ids: list
    tissue_table: pd.DataFrame
    config: dict = field(default_factory=dict)

    def anat_dir(self, participant_id: str, session_id: str = "") -> Path:
        return _anat_dir(self.root, participant_id, session_id)

    def gre_paths(self, participant_id: str, session_id: str = "") -> dict:
        """{'magnitude': [paths per echo], 'phase': [...], 't1w': path or None}."""
        return _gre_paths(self.root, participant_id, session_id,
                          len(self.config["echo_times_s"]), self.config["t1w"])

    def truth_paths(self, participant_id: str, session_id: str = "") -> dict:
        return _truth_paths(self.derivatives, participant_id, session_id)


# --------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------

def _prefix(participant_id: str, session_id: str) -> str:
    lab = _label(session_id)
    return f"{participant_id}_ses-{lab}" if lab else participant_id


def _anat_dir(root: Path, participant_id: str, session_id: str) -> Path:
    d = Path(root) / participant_id
    if _label(session_id):
        d = d / f"ses-{_label(session_id)}"
    return d / "anat"


def _gre_paths(root, participant_id, session_id, n_echoes, t1w):
    d = _anat_dir(root, participant_id, session_id)
    p = _prefix(participant_id, session_id)
    return {
        "magnitude": [d / f"{p}_echo-{e + 1}_part-mag_MEGRE.nii.gz" for e in range(n_echoes)],
        "phase": [d / f"{p}_echo-{e + 1}_part-phase_MEGRE.nii.gz" for e in range(n_echoes)],
        "t1w": d / f"{p}_T1w.nii.gz" if t1w else None,
    }


def _truth_paths(deriv, participant_id, session_id):
    d = _anat_dir(deriv, participant_id, session_id)
    p = _prefix(participant_id, session_id)
    return {
        "chi": d / f"{p}_desc-truth_Chimap.nii.gz",
        "mask": d / f"{p}_desc-truth_mask.nii.gz",
        "dseg": d / f"{p}_desc-truth_dseg.nii.gz",
        "pose": d / f"{p}_desc-truth_pose.json",
        "total_field": d / f"{p}_desc-truthtotal_fieldmap.nii.gz",
        "local_field": d / f"{p}_desc-truthlocal_fieldmap.nii.gz",
    }


# --------------------------------------------------------------------------------------
# the plan (participants, clinical variables, sessions)
# --------------------------------------------------------------------------------------

def _validate(n_subjects, n_sessions, n_sites, patient_fraction, effect_ppm, effect_regions,
              echo_times_s, b0_tesla, snr):
    if not isinstance(n_subjects, (int, np.integer)) or n_subjects < 1:
        raise ValueError(f"n_subjects must be an integer >= 1, got {n_subjects!r}")
    if not isinstance(n_sessions, (int, np.integer)) or not 1 <= n_sessions <= 6:
        raise ValueError(f"n_sessions must be an integer in 1..6, got {n_sessions!r}")
    if not isinstance(n_sites, (int, np.integer)) or not 1 <= n_sites <= n_subjects:
        raise ValueError(f"n_sites must be an integer in 1..n_subjects, got {n_sites!r}")
    if not 0.0 <= float(patient_fraction) <= 1.0:
        raise ValueError(f"patient_fraction must be in [0, 1], got {patient_fraction!r}")
    if not np.isfinite(effect_ppm) or abs(effect_ppm) > 1.0:
        raise ValueError(f"effect_ppm must be a finite value in [-1, 1] ppm, got {effect_ppm!r}")
    bad = [r for r in effect_regions if r not in phantom.REGION_LABELS]
    if bad:
        raise ValueError(f"effect_regions has unknown region(s) {bad}; allowed: "
                         f"{sorted(phantom.REGION_LABELS)}")
    tes = np.asarray(echo_times_s, dtype=float)
    if tes.ndim != 1 or tes.size < 1 or np.any(tes <= 0) or np.any(np.diff(tes) <= 0):
        raise ValueError(f"echo_times_s must be increasing positive seconds, got {echo_times_s!r}")
    if np.any(tes > 0.2):
        raise ValueError(f"echo_times_s must be in seconds (< 0.2), got {echo_times_s!r}")
    if not np.isfinite(b0_tesla) or not 0.1 <= b0_tesla <= 12:
        raise ValueError(f"b0_tesla must be in [0.1, 12] T, got {b0_tesla!r}")
    if not np.isfinite(snr) or snr <= 0:
        raise ValueError(f"snr must be > 0, got {snr!r}")


def plan_cohort(*, n_subjects: int, seed: int, n_sessions: int = 2, n_sites: int = 1,
                patient_fraction: float = 0.5, effect_ppm: float = 0.025,
                effect_regions=("putamen", "thalamus", "hippocampus"), snr: float = 50.0,
                config: dict | None = None) -> CohortPlan:
    """Draw participants, clinical variables, sites and sessions (no imaging).

    Patients get a planted susceptibility increase ``effect_ppm * severity`` in
    ``effect_regions``; severity (mean about 1) rises with disease duration and baseline
    HDRS, and the inflammatory markers rise with it, so clinical correlations exist.
    Controls have low HDRS, no disease history and lower inflammatory markers.

    Returns
    -------
    CohortPlan
    """
    _validate(n_subjects, n_sessions, n_sites, patient_fraction, effect_ppm, effect_regions,
              (0.01,), 3.0, snr)
    rng = np.random.default_rng([int(seed), 0])
    n_pat = int(round(patient_fraction * n_subjects))
    groups = np.array(["patient"] * n_pat + ["control"] * (n_subjects - n_pat))
    rng.shuffle(groups)
    width = max(2, len(str(n_subjects)))
    site_snr = {1: 1.0}
    srng = np.random.default_rng([int(seed), 3])
    for k in range(2, n_sites + 1):
        site_snr[k] = float(np.round(srng.uniform(0.75, 1.25), 3))
    # balanced sites within each group
    counters = {"patient": 0, "control": 0}
    rows, sess_rows = [], []
    sessions = session_names(n_sessions)
    for i in range(n_subjects):
        g = groups[i]
        site = counters[g] % n_sites + 1
        counters[g] += 1
        r = np.random.default_rng([int(seed), 1, i])
        age = float(np.round(r.uniform(20.0, 65.0), 1))
        sex = "F" if r.random() < 0.55 else "M"
        if g == "patient":
            disease_weeks = float(np.clip(np.round(np.exp(r.normal(np.log(150.0), 0.8))), 8, 2000))
            episode_weeks = float(np.round(r.uniform(4.0, 52.0)))
            episode_weeks = min(episode_weeks, disease_weeks)
            relapse = int(min(10, r.poisson(0.5 + disease_weeks / 200.0)))
            hdrs = float(np.clip(np.round(r.normal(22.0, 4.0)), 14, 38))
            medication = int(r.random() < 0.7)
            zd = (np.log(disease_weeks) - np.log(150.0)) / 0.8
            zh = (hdrs - 22.0) / 4.0
            severity = float(np.clip(1.0 + 0.3 * zd + 0.2 * zh, 0.3, 1.8))
            infl = 0.6 + 0.3 * (severity - 1.0)
        else:
            disease_weeks = episode_weeks = 0.0
            relapse = 0
            hdrs = float(np.clip(np.round(r.normal(2.0, 1.5)), 0, 7))
            medication = 0
            severity = 0.0
            infl = 0.0
        crp = float(np.round(np.exp(np.log(1.0) + infl + r.normal(0, 0.5)), 2))
        il6 = float(np.round(np.exp(np.log(1.5) + 0.9 * infl + r.normal(0, 0.4)), 2))
        tnfa = float(np.round(np.exp(np.log(6.0) + 0.4 * infl + r.normal(0, 0.25)), 2))
        il1b = float(np.round(np.exp(np.log(0.4) + 0.6 * infl + r.normal(0, 0.4)), 3))
        pid = f"sub-{i + 1:0{width}d}"
        rows.append({
            "participant_id": pid, "group": str(g), "age": age, "sex": sex,
            "site": f"site{site:02d}", "medication": medication, "hdrs": hdrs,
            "relapse_count": relapse, "episode_weeks": episode_weeks,
            "disease_weeks": disease_weeks, "crp": crp, "il6": il6, "tnfa": tnfa, "il1b": il1b,
            "planted_effect_ppm": float(np.round(effect_ppm * severity, 5)),
            "site_snr_factor": site_snr[site],
        })
        start = datetime(2024, 1, 8, 8, 0) + timedelta(days=int(r.integers(0, 365)),
                                                       minutes=int(r.integers(0, 600)))
        for k, ses in enumerate(sessions or [""]):
            if k == 0:
                h, t = hdrs, start
            else:
                t = start + timedelta(weeks=int(r.integers(6, 11)) * k,
                                      minutes=int(r.integers(-120, 120)))
                if g == "patient":
                    h = float(np.round(hdrs * r.uniform(0.35, 0.8) ** k))
                else:
                    h = float(np.clip(hdrs + np.round(r.normal(0, 1.0)), 0, 7))
            sess_rows.append({"participant_id": pid, "session_id": ses, "hdrs": h,
                              "acq_time": t.strftime("%Y-%m-%dT%H:%M:%S")})
    cfg = dict(config or {})
    cfg.update({"n_subjects": int(n_subjects), "seed": int(seed), "n_sessions": int(n_sessions),
                "n_sites": int(n_sites), "patient_fraction": float(patient_fraction),
                "effect_ppm": float(effect_ppm), "effect_regions": list(effect_regions),
                "snr": float(snr)})
    return CohortPlan(participants=pd.DataFrame(rows), sessions=pd.DataFrame(sess_rows),
                      config=cfg)


# --------------------------------------------------------------------------------------
# one subject-session
# --------------------------------------------------------------------------------------

def _subject_values(plan: CohortPlan, i: int) -> tuple[dict, dict]:
    cfg = plan.config
    row = plan.participants.iloc[i]
    r = np.random.default_rng([cfg["seed"], 2, i])
    values = phantom.sample_tissue_values(
        r, age_years=float(row["age"]), effect_ppm=float(row["planted_effect_ppm"]),
        effect_regions=tuple(cfg["effect_regions"]) if row["group"] == "patient" else ())
    shape = phantom.random_shape(r, shape_variation=cfg["shape_variation"])
    return values, shape


def _save_int12(path: Path, values: np.ndarray, step: float, affine, *, lo: int = 0,
                hi: int = 4095, sidecar: dict | None = None) -> None:
    """Save ``values`` as 12-bit integers round(values / step) in int16 with scl_slope = step.

    Scanner-like storage (small files); readers get ``k * step`` in physical units.
    Written like :func:`qsmdask.io.nifti.save_nifti` (qform = sform, gzip, atomic).
    """
    import gzip

    k = np.clip(np.round(np.asarray(values, dtype=np.float64) / step), lo, hi).astype(np.int16)
    img = nib.Nifti1Image(k, np.asarray(affine, dtype=float))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(float(step), 0.0)
    atomic_write_bytes(path, gzip.compress(img.to_bytes(), compresslevel=4, mtime=0))
    if sidecar is not None:
        atomic_write_json(Path(str(path)[: -len(".nii.gz")] + ".json"), sidecar)


def _model_resolutions(cfg) -> set:
    res = {1 if min(cfg["voxel_size_mm"]) < 1.5 else 2}
    if cfg["t1w"]:
        tvs = cfg["t1w_voxel_size_mm"] or [min(cfg["voxel_size_mm"])]
        res.add(1 if min(tvs) < 1.5 else 2)
    return res


def simulate_subject_files(out_dir, plan: CohortPlan, participant_id: str) -> pd.DataFrame:
    """Simulate and write all sessions of one participant (tissue maps built once).

    Returns the participant's rows of the tissue table.
    """
    ids = list(plan.participants["participant_id"])
    if participant_id not in ids:
        raise ValueError(f"participant_id {participant_id!r} is not in the plan")
    values, _ = _subject_values(plan, ids.index(participant_id))
    air = bool(plan.config.get("air_cavities", True))
    maps = {res: phantom.compose_tissue_maps(phantom.load_head_model(res, air_cavities=air), values,
                                             b0_tesla=plan.config["b0_tesla"])
            for res in _model_resolutions(plan.config)}
    sessions = session_names(plan.config["n_sessions"]) or [""]
    return pd.concat([simulate_session_files(out_dir, plan, participant_id, ses,
                                             tissue_maps=maps) for ses in sessions],
                     ignore_index=True)


def simulate_session_files(out_dir, plan: CohortPlan, participant_id: str,
                           session_id: str = "", *, tissue_maps: dict | None = None
                           ) -> pd.DataFrame:
    """Simulate one subject-session of ``plan`` and write its BIDS files and ground truth.

    Safe to run in parallel for different subject-sessions (one writer per file, atomic
    writes); the result depends only on the plan and the ids.  ``tissue_maps`` may carry
    the participant's model-space maps (see :func:`simulate_subject_files`).
    Returns the session's rows of the tissue table.
    """
    root = Path(out_dir)
    cfg = plan.config
    ids = list(plan.participants["participant_id"])
    if participant_id not in ids:
        raise ValueError(f"participant_id {participant_id!r} is not in the plan")
    sessions = session_names(cfg["n_sessions"])
    session_id = f"ses-{_label(session_id)}" if _label(session_id) else ""
    if (session_id or sessions) and session_id not in sessions:
        raise ValueError(f"session_id must be one of {sessions or ['']}, got {session_id!r}")
    i = ids.index(participant_id)
    k = sessions.index(session_id) if session_id else 0
    row = plan.participants.iloc[i]
    values, shape = _subject_values(plan, i)
    rng = np.random.default_rng([cfg["seed"], 4, i, k])
    pose = phantom.random_pose(rng, max_rotation_deg=cfg["max_rotation_deg"],
                               max_translation_mm=cfg["max_translation_mm"], shape=shape)
    sim = phantom.simulate_session(
        values=values, pose=pose, rng=rng, voxel_size_mm=cfg["voxel_size_mm"],
        fov_mm=cfg["fov_mm"], echo_times_s=cfg["echo_times_s"], b0_tesla=cfg["b0_tesla"],
        snr=cfg["snr"] * float(row["site_snr_factor"]), shim_order=cfg["shim_order"],
        t1w=cfg["t1w"], t1w_voxel_size_mm=cfg["t1w_voxel_size_mm"],
        local_field=cfg["write_fields"], tissue_maps=tissue_maps,
        air_cavities=bool(cfg.get("air_cavities", True)))

    paths = _gre_paths(root, participant_id, session_id, len(cfg["echo_times_s"]), cfg["t1w"])
    common = {"MagneticFieldStrength": cfg["b0_tesla"], "Manufacturer": "qsmdask-sim",
              "ManufacturersModelName": f"qsmdask-sim {__version__}",
              "InstitutionName": str(row["site"]), "MRAcquisitionType": "3D",
              "ImagingFrequency": round(phantom.GAMMA_HZ_PER_T * cfg["b0_tesla"] * 1e-6, 4),
              "FlipAngle": 15, "RepetitionTime": round(cfg["echo_times_s"][-1] + 0.008, 4)}
    # 12-bit values as scanners write them (magnitude 0..4095 on one scale for all echoes,
    # phase k * 2 pi / 8192 with k in -4096..4095, so always inside [-pi, pi))
    mag_step = max(float(sim.magnitude.max()), 1e-6) / 4095.0
    ph_step = float(np.float32(2 * np.pi / 8192))
    for e, te in enumerate(cfg["echo_times_s"]):
        meta = dict(common, EchoTime=float(te), EchoNumber=e + 1)
        _save_int12(paths["magnitude"][e], sim.magnitude[..., e], mag_step, sim.affine,
                    sidecar=dict(meta, ImageType=["ORIGINAL", "PRIMARY", "M"]))
        _save_int12(paths["phase"][e], sim.phase_rad[..., e], ph_step, sim.affine, lo=-4096,
                    sidecar=dict(meta, ImageType=["ORIGINAL", "PRIMARY", "P"], Units="rad"))
    if cfg["t1w"]:
        _save_int12(paths["t1w"], sim.t1w, max(float(sim.t1w.max()), 1e-6) / 4095.0,
                    sim.t1w_affine, sidecar=dict(common, EchoTime=0.003, RepetitionTime=2.3,
                                                 InversionTime=0.9, FlipAngle=9))

    deriv = root / "derivatives" / "qsmdask-sim"
    tp = _truth_paths(deriv, participant_id, session_id)
    chi_brain = np.where(sim.brain, sim.chi_ppm, 0).astype(np.float32)
    save_nifti(tp["chi"], chi_brain, sim.affine,
               sidecar={"Units": "ppm", "Description": "true susceptibility inside the brain mask, "
                        "relative to water/CSF"})
    save_nifti(tp["mask"], sim.brain.astype(np.uint8), sim.affine)
    save_nifti(tp["dseg"], sim.dseg.astype(np.uint8), sim.affine)
    if cfg["write_fields"]:
        head = sim.tissue != phantom.TISSUE["air"]
        save_nifti(tp["total_field"], np.where(head, sim.field_ppm, 0).astype(np.float32),
                   sim.affine,
                   sidecar={"Units": "ppm", "Description": "true total field after shimming "
                            "(phase = 2 pi gamma B0 TE field + offset), inside the head "
                            "(0 in air)"})
        save_nifti(tp["local_field"], sim.local_field_ppm, sim.affine,
                   sidecar={"Units": "ppm", "Description": "field of the susceptibility inside "
                            "the brain mask"})
    pose_doc = sim.pose.to_dict()
    pose_doc.update({"b0_dir": sim.b0_dir.tolist(), "affine": sim.affine.tolist(),
                     "t1w_affine": None if sim.t1w_affine is None else sim.t1w_affine.tolist(),
                     "voxel_size_mm": list(sim.voxel_size_mm),
                     "echo_times_s": list(sim.echo_times_s), "b0_tesla": sim.b0_tesla,
                     "convention": "field_ppm = IFFT(D FFT(chi_ppm)); phase = 2 pi gamma B0 TE "
                                   "field_ppm 1e-6 + offset; b0_dir in voxel axes",
                     **{k2: v for k2, v in sim.info.items()}})
    atomic_write_json(tp["pose"], pose_doc)

    # truth table: assigned values and the mean of the truth map in each labelled region
    rows = []
    for region, labels in phantom.REGION_LABELS.items():
        for lab, hemi in zip(labels, ("L", "R")):
            sel = sim.dseg == lab
            rows.append({"participant_id": participant_id, "session_id": session_id,
                         "group": row["group"], "region": region, "hemisphere": hemi,
                         "label": int(lab), "label_name": phantom.load_head_model(
                             sim.info["model_resolution_mm"]).aal_names.get(lab, ""),
                         "chi_ppm": values["chi_ppm"][region],
                         "baseline_chi_ppm": values["baseline_chi_ppm"][region],
                         "planted_effect_ppm": values["effect_ppm"][region],
                         "n_voxels": int(sel.sum()),
                         "mean_truth_ppm": float(sim.chi_ppm[sel].mean()) if sel.any() else np.nan})
    for region in ("wm", "gm", "csf"):
        rows.append({"participant_id": participant_id, "session_id": session_id,
                     "group": row["group"], "region": region, "hemisphere": "",
                     "label": -1, "label_name": "", "chi_ppm": values["chi_ppm"][region],
                     "baseline_chi_ppm": values["baseline_chi_ppm"][region],
                     "planted_effect_ppm": 0.0, "n_voxels": 0, "mean_truth_ppm": np.nan})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------
# the cohort
# --------------------------------------------------------------------------------------

_PARTICIPANTS_JSON = {
    "participant_id": {"Description": "participant label"},
    "group": {"Description": "diagnostic group", "Levels": {"patient": "patient",
                                                            "control": "healthy control"}},
    "age": {"Description": "age at the first session", "Units": "year"},
    "sex": {"Description": "sex", "Levels": {"M": "male", "F": "female"}},
    "site": {"Description": "acquisition site"},
    "medication": {"Description": "on antidepressant medication (patients)",
                   "Levels": {"0": "no", "1": "yes"}},
    "hdrs": {"Description": "Hamilton Depression Rating Scale (17 items) at the first session"},
    "relapse_count": {"Description": "number of previous depressive episodes"},
    "episode_weeks": {"Description": "duration of the current episode", "Units": "week"},
    "disease_weeks": {"Description": "duration of illness since onset", "Units": "week"},
    "crp": {"Description": "C-reactive protein (serum)", "Units": "mg/L"},
    "il6": {"Description": "interleukin 6 (serum)", "Units": "pg/mL"},
    "tnfa": {"Description": "tumour necrosis factor alpha (serum)", "Units": "pg/mL"},
    "il1b": {"Description": "interleukin 1 beta (serum)", "Units": "pg/mL"},
}
_TRUTH_COLUMNS = ("planted_effect_ppm", "site_snr_factor")
_TRUTH_JSON = {
    "planted_effect_ppm": {"Description": "susceptibility added to the effect regions of this "
                           "participant (0 for controls)", "Units": "ppm"},
    "site_snr_factor": {"Description": "SNR factor of the participant's site"},
}


_README = """qsmdask synthetic cohort (seed {seed})

Simulated multi-echo gradient-echo MRI (MEGRE, magnitude and phase per echo) of a patient /
control cohort, written by qsmdask.sim {version} for testing and demonstrating the qsmdask
pipeline. No real person's data: every image is computed from a numerical head model.
participants.tsv holds the simulated clinical variables; derivatives/qsmdask-sim holds the
ground truth (susceptibility in ppm, masks, labels, fields).
"""


def _write_tsv(path: Path, df: pd.DataFrame) -> None:
    atomic_write_bytes(path, df.to_csv(sep="\t", index=False, na_rep="n/a",
                                       lineterminator="\n").encode())


def simulate_cohort(out_dir, *, n_subjects: int, seed: int, n_sessions: int = 2,
                    n_sites: int = 1, voxel_size_mm=(2.0, 2.0, 2.0), fov_mm=_DEFAULT_FOV,
                    echo_times_s=(0.004, 0.012, 0.020), b0_tesla: float = 3.0,
                    effect_ppm: float = 0.025,
                    effect_regions=("putamen", "thalamus", "hippocampus"),
                    patient_fraction: float = 0.5, snr: float = 50.0, t1w: bool = True,
                    t1w_voxel_size_mm=None, max_rotation_deg: float = 12.0,
                    max_translation_mm: float = 10.0, shape_variation: float = 0.04,
                    shim_order: int = 2, write_fields: bool = True, air_cavities: bool = True,
                    executor: Executor | None = None) -> CohortInfo:
    """Simulate a BIDS cohort of multi-echo GRE (and T1w) with ground truth.

    Parameters
    ----------
    out_dir : BIDS root to create (existing files of the same names are replaced).
    n_subjects : number of participants (>= 1).
    seed : integer seed; the output is a deterministic function of it and the options.
    n_sessions : 1 (no session level), 2 (ses-pre, ses-post) or more (ses-fu1, ...).
    n_sites : number of sites (SNR differs per site), balanced within groups.
    voxel_size_mm : GRE voxel size, e.g. (2, 2, 2), (1, 1, 1), (1, 1, 2).
    fov_mm : GRE field of view in mm (matrix = round(fov_mm / voxel_size_mm)).
    echo_times_s : echo times in seconds.
    b0_tesla : field strength in tesla.
    effect_ppm : mean susceptibility increase of patients in ``effect_regions`` (ppm).
    effect_regions : subset of caudate, putamen, pallidum, thalamus, hippocampus (both
        hemispheres).
    patient_fraction : fraction of patients.
    snr : first-echo brain magnitude over noise SD (scaled per site).
    t1w : also write a T1w image (own grid, isotropic ``t1w_voxel_size_mm`` or the finest GRE
        voxel edge).
    max_rotation_deg, max_translation_mm : head pose ranges (pitch up to the full angle).
    shape_variation : relative head-size variation and smooth deformation strength.
    shim_order : 0, 1 or 2, harmonic shim of the field over the brain.
    write_fields : also write the true total and local fields (ppm).
    air_cavities : False simulates heads without sinuses and mastoid air cells (see
        :func:`qsmdask.sim.phantom.load_head_model`): no steep air-tissue fields next to the
        brain's base.
    executor : optional ``concurrent.futures.Executor`` (e.g. a process pool or
        ``distributed.Client.get_executor()``) to run subject-sessions in parallel.

    Returns
    -------
    CohortInfo

    References
    ----------
    BIDS specification 1.10 (MEGRE, part-mag/phase, sessions, derivatives).
    """
    _validate(n_subjects, n_sessions, n_sites, patient_fraction, effect_ppm, effect_regions,
              echo_times_s, b0_tesla, snr)
    vs = phantom._check_voxel_size("voxel_size_mm", voxel_size_mm)
    fov = phantom._check_voxel_size("fov_mm", fov_mm)
    tvs = (None if t1w_voxel_size_mm is None
           else list(phantom._check_voxel_size("t1w_voxel_size_mm", t1w_voxel_size_mm)))
    if not 0 <= float(max_rotation_deg) <= 45:
        raise ValueError(f"max_rotation_deg must be in [0, 45], got {max_rotation_deg!r}")
    if not 0 <= float(max_translation_mm) <= 50:
        raise ValueError(f"max_translation_mm must be in [0, 50], got {max_translation_mm!r}")
    if not 0 <= float(shape_variation) < 0.3:
        raise ValueError(f"shape_variation must be in [0, 0.3), got {shape_variation!r}")
    if shim_order not in (0, 1, 2):
        raise ValueError(f"shim_order must be 0, 1 or 2, got {shim_order!r}")
    cfg = {"voxel_size_mm": list(vs), "fov_mm": list(fov),
           "echo_times_s": [float(t) for t in echo_times_s], "b0_tesla": float(b0_tesla),
           "t1w": bool(t1w), "t1w_voxel_size_mm": tvs, "max_rotation_deg": float(max_rotation_deg),
           "max_translation_mm": float(max_translation_mm),
           "shape_variation": float(shape_variation), "shim_order": int(shim_order),
           "write_fields": bool(write_fields), "air_cavities": bool(air_cavities), "version": __version__}
    plan = plan_cohort(n_subjects=n_subjects, seed=seed, n_sessions=n_sessions, n_sites=n_sites,
                       patient_fraction=patient_fraction, effect_ppm=effect_ppm,
                       effect_regions=tuple(effect_regions), snr=snr, config=cfg)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    deriv = root / "derivatives" / "qsmdask-sim"
    sessions = session_names(n_sessions)

    atomic_write_json(root / "dataset_description.json", {
        "Name": f"qsmdask synthetic cohort (seed {seed})", "BIDSVersion": "1.10.0",
        "DatasetType": "raw", "License": "CC0",
        "GeneratedBy": [{"Name": "qsmdask.sim", "Version": __version__}],
        "Authors": ["qsmdask simulator"]})
    atomic_write_bytes(root / "README", _README.format(seed=seed, version=__version__).encode())
    participants = plan.participants.drop(columns=list(_TRUTH_COLUMNS))
    truth = plan.participants[["participant_id", "group", *_TRUTH_COLUMNS]]
    _write_tsv(root / "participants.tsv", participants)
    atomic_write_json(root / "participants.json", _PARTICIPANTS_JSON)
    if sessions:
        for pid, df in plan.sessions.groupby("participant_id", sort=True):
            out = df[["session_id", "acq_time", "hdrs"]]
            _write_tsv(root / pid / f"{pid}_sessions.tsv", out)
        atomic_write_json(root / "sessions.json", {
            "acq_time": {"Description": "acquisition time of the first image of the session"},
            "hdrs": {"Description": "Hamilton Depression Rating Scale at the session"}})
    atomic_write_json(deriv / "dataset_description.json", {
        "Name": "qsmdask-sim ground truth", "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "qsmdask.sim", "Version": __version__,
                         "Description": "simulated truth: susceptibility (ppm), brain mask, AAL "
                                        "labels, pose, fields"}],
        "SourceDatasets": [{"URL": "bids::"}]})
    model = phantom.load_head_model(2)
    dseg_table = pd.DataFrame({"index": sorted(model.aal_names),
                               "name": [model.aal_names[k] for k in sorted(model.aal_names)]})
    _write_tsv(deriv / "desc-truth_dseg.tsv", dseg_table)
    atomic_write_json(deriv / "sim_config.json", plan.config)
    _write_tsv(deriv / "participants_truth.tsv", truth)
    atomic_write_json(deriv / "participants_truth.json", _TRUTH_JSON)

    pids = list(plan.participants["participant_id"])
    if executor is None:
        tables = [simulate_subject_files(root, plan, pid) for pid in pids]
    else:
        futures = [executor.submit(simulate_subject_files, root, plan, pid) for pid in pids]
        tables = [f.result() for f in futures]
    tissue = pd.concat(tables, ignore_index=True)
    _write_tsv(deriv / "tissue_table.tsv", tissue)
    return CohortInfo(root=root, derivatives=deriv, participants=participants, truth=truth,
                      sessions=plan.sessions, session_ids=sessions, tissue_table=tissue,
                      config=plan.config)

