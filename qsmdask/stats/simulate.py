"""Synthetic ROI cohorts with planted effects, for tests, power analysis and demos."""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["simulate_roi_cohort", "DEFAULT_ROIS"]

#: Deep grey matter ROIs with typical susceptibility (ppm) of healthy adults.
DEFAULT_ROIS = {"caudate": 0.06, "putamen": 0.05, "globus_pallidus": 0.15, "thalamus": 0.01}


def simulate_roi_cohort(*, n_patients: int = 20, n_controls: int = 20, rois=None,
                        hemispheres=("L", "R"), sessions=("",), group_effect_ppm=0.0,
                        sd_ppm: float = 0.01, subject_sd_ppm: float = 0.0, n_sites: int = 1,
                        site_offset_ppm=None, site_scale=None, age_slope_ppm_per_year: float = 0.0,
                        hemisphere_effect_ppm: float = 0.0, time_effect_ppm: float = 0.0,
                        marker_effect_ppm: float = 0.0, marker: str = "crp",
                        symptom_effect: float = 0.0, measure: str = "chi",
                        seed: int | None = 0):
    """Simulate a cohort's ROI table, participants.tsv and sessions.tsv.

    Model, per subject i, session s, ROI r, hemisphere h::

        value = base[r] + group_effect[r] * patient_i + site_offset[site_i]
                + age_slope * (age_i - 40) + hemisphere_effect * (h == "L")
                + time_effect * patient_i * (s is the last session)
                + marker_effect * z(marker_i) + u_i + site_scale[site_i] * e_isrh

    with ``u_i ~ N(0, subject_sd)`` and ``e ~ N(0, sd)``. The symptom ``hdrs`` of patients is
    ``15 + symptom_effect * mean_r(value - base[r]) / sd + N(0, 3)`` (so that mediation
    marker -> ROI -> symptom can be planted); controls get ``hdrs`` near 2.

    Parameters
    ----------
    n_patients, n_controls : int
        Group sizes.
    rois : dict[str, float] or None
        ROI names and baseline chi in ppm (None: :data:`DEFAULT_ROIS`).
    hemispheres : sequence of str
        Hemisphere codes.
    sessions : sequence of str
        Session ids (``("",)`` for a dataset without sessions).
    group_effect_ppm : float or dict[str, float]
        Patient minus control difference, for all ROIs or per ROI name.
    sd_ppm, subject_sd_ppm : float
        Residual and subject random-intercept SD.
    n_sites : int
        Number of sites (participants assigned in turn).
    site_offset_ppm, site_scale : sequence of float or None
        Additive offset and residual scale per site (None: 0 and 1).
    age_slope_ppm_per_year, hemisphere_effect_ppm, time_effect_ppm, marker_effect_ppm : float
        Planted covariate, left-right, patient-by-time and marker effects.
    marker : str
        Marker column that carries ``marker_effect_ppm``.
    symptom_effect : float
        Effect of the ROI deviation (in SD units) on hdrs of patients.
    measure : str
        Value of the ``measure`` column.
    seed : int or None
        Random seed.

    Returns
    -------
    (roi_table, participants, sessions_table) : tuple of DataFrame
    """
    for name, v in (("n_patients", n_patients), ("n_controls", n_controls), ("n_sites", n_sites)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v!r}")
    if sd_ppm <= 0:
        raise ValueError(f"sd_ppm must be > 0, got {sd_ppm!r}")
    rng = np.random.default_rng(seed)
    rois = dict(DEFAULT_ROIS if rois is None else rois)
    n = int(n_patients) + int(n_controls)
    pid = [f"sub-{i + 1:03d}" for i in range(n)]
    group = np.array(["patient"] * int(n_patients) + ["control"] * int(n_controls))
    patient = (group == "patient").astype(float)
    site_idx = np.arange(n) % int(n_sites)
    offs = np.zeros(n_sites) if site_offset_ppm is None else np.asarray(site_offset_ppm, float)
    scales = np.ones(n_sites) if site_scale is None else np.asarray(site_scale, float)
    if offs.shape != (n_sites,) or scales.shape != (n_sites,):
        raise ValueError("site_offset_ppm and site_scale need one value per site")
    age = rng.uniform(20, 60, n).round(1)
    sex = rng.choice(["M", "F"], n)
    markers = {m: np.exp(rng.normal(0.0, 0.5, n)) for m in ("crp", "il6", "tnfa", "il1b")}
    if marker not in markers:
        raise ValueError(f"marker must be one of {sorted(markers)}, got {marker!r}")
    zmark = (np.log(markers[marker]) - np.log(markers[marker]).mean()) / np.log(
        markers[marker]).std()
    subj_u = rng.normal(0.0, subject_sd_ppm, n) if subject_sd_ppm > 0 else np.zeros(n)
    if isinstance(group_effect_ppm, dict):
        geff = {r: float(group_effect_ppm.get(r, 0.0)) for r in rois}
    else:
        geff = {r: float(group_effect_ppm) for r in rois}
    sessions = list(sessions)
    rows = []
    dev = np.zeros(n)
    for si, ses in enumerate(sessions):
        last = float(len(sessions) > 1 and si == len(sessions) - 1)
        for r, base in rois.items():
            for h in hemispheres:
                mean = (base + geff[r] * patient + offs[site_idx]
                        + age_slope_ppm_per_year * (age - 40.0)
                        + hemisphere_effect_ppm * (h == "L") + time_effect_ppm * patient * last
                        + marker_effect_ppm * zmark + subj_u)
                val = mean + scales[site_idx] * rng.normal(0.0, sd_ppm, n)
                if si == 0:
                    dev += (val - base) / sd_ppm
                for i in range(n):
                    rows.append(dict(participant_id=pid[i], session_id=ses, atlas="sim",
                                     roi=r, hemisphere=h, level="group", label=0,
                                     measure=measure, n_voxels=500, mean_ppm=val[i],
                                     median_ppm=val[i], std_ppm=sd_ppm, iqr_ppm=1.35 * sd_ppm))
    dev /= len(rois) * len(hemispheres)
    hdrs = np.where(patient > 0, 15 + symptom_effect * dev + rng.normal(0, 3, n),
                    np.abs(rng.normal(2, 1, n))).round(2)
    participants = pd.DataFrame(dict(
        participant_id=pid, group=group, age=age, sex=sex,
        site=[f"site{k + 1}" for k in site_idx],
        medication=(patient * (rng.random(n) < 0.5)).astype(int), hdrs=hdrs,
        relapse_count=(patient * rng.poisson(2, n)).astype(int),
        episode_weeks=(patient * rng.uniform(2, 30, n)).round(1),
        disease_weeks=(patient * rng.uniform(30, 500, n)).round(1),
        **{m: v.round(4) for m, v in markers.items()}))
    ses_rows = []
    for i in range(n):
        for si, ses in enumerate(sessions):
            if ses == "":
                continue
            ses_rows.append(dict(participant_id=pid[i], session_id=ses,
                                 hdrs=float(max(hdrs[i] - 3 * si * patient[i]
                                                + rng.normal(0, 1), 0)),
                                 acq_time=f"2025-0{1 + 3 * si}-15T10:00:00"))
    sessions_table = pd.DataFrame(ses_rows, columns=["participant_id", "session_id", "hdrs",
                                                     "acq_time"])
    return pd.DataFrame(rows), participants, sessions_table
