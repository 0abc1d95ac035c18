"""Whole-brain voxel-wise analysis of the template-space chi maps (the study's SnPM analysis).

Adds every subject-session's smoothed MNI-space Chimap to the cohort stack (a zarr array
keyed by subject-session, chunked subject blocks x voxel blocks, written one subject block per
task and never held in memory whole), selects one session's rows, fits the GLM ``chi ~ group + age + sex + medication [+ site]``
and runs permutation inference (Huh-Jhun by default, or Freedman-Lane; max-T, cluster extent/mass, optional TFCE) over
the stack's voxel blocks, distributed over a Dask client when one is given. Saves the NIfTI maps under
``OUTPUT_DIR/group/`` (``perm_*.nii.gz``) and the cluster table with the other Parquet
tables (``<tables>/group/perm_clusters.parquet``; tables default to ``OUTPUT_DIR``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..io.derivatives import DerivativesWriter
from ..io.nifti import load_nifti, save_nifti

__all__ = ["VoxelwiseOptions", "run_voxelwise", "update_voxelwise_stack", "load_template_map"]

SPACE = "MNI152NLin2009aSym"


@dataclass(frozen=True)
class VoxelwiseOptions:
    """Options of the whole-brain analysis (defaults follow the reference study).

    n_perm : permutations (study: 20,000).
    cluster_p : cluster-forming p; two-sided tests split it over the tails, so 0.01 means
        0.005 per tail as in the study's one-sided SnPM contrasts.
    min_cluster_voxels : clusters smaller than this are not reported (study: 10).
    inference : any of "voxel", "cluster", "tfce".
    covariates : participants.tsv columns used as covariates when present and not constant.
    mask_fraction : a voxel enters the analysis when inside at least this fraction of the
        subjects' template-space brain masks.
    session : session analysed (``"ses-pre"`` or ``"pre"``); None: the chronological
        baseline (``qsmdask.stats._common.order_sessions``: sessions.tsv ``acq_time``, else
        names such as pre/baseline before post/follow-up).
    keep_covariates : covariates kept even when nearly nested in group (VIF > 5 or constant
        in one group; ``qsmdask.stats.diagnostics.screen_covariates``); by default they are
        left out with a warning.
    scheme : permutation scheme with nuisance covariates, "huh_jhun" (default: one product
        of length n - k per permutation and voxel) or "freedman_lane" (1 + k - 1 products);
        both exact for Gaussian errors, see :mod:`qsmdask.perm.permute`.
    """

    n_perm: int = 1000
    seed: int = 0
    cluster_p: float = 0.01
    min_cluster_voxels: int = 10
    inference: tuple[str, ...] = ("voxel", "cluster")
    covariates: tuple[str, ...] = ("age", "sex", "medication", "site")
    connectivity: int = 26
    mask_fraction: float = 0.9
    session: str | None = None
    groups: tuple[str, str] = ("patient", "control")
    keep_covariates: tuple[str, ...] = ()
    scheme: str = "huh_jhun"

    def __post_init__(self):
        from ..perm.permute import SCHEMES
        if self.scheme not in SCHEMES:
            raise ValueError(f"voxelwise scheme must be one of {SCHEMES}, got {self.scheme!r}")


def _design_inputs(participants: pd.DataFrame, ids: list[str], covariates,
                   groups=("patient", "control"), keep=()
                   ) -> tuple[np.ndarray, dict, list, pd.DataFrame]:
    """Group indicator, covariates, [(covariate, reason)] left out, design diagnostics."""
    from ..stats.diagnostics import screen_covariates

    p = participants.set_index("participant_id").loc[ids]
    group = (p["group"].astype(str) == str(groups[0])).astype(float).to_numpy()
    usable = [c for c in covariates if c in p.columns and not p[c].isna().any() and p[c].nunique() >= 2]
    gname = f"group[{groups[0]}]"
    frame = p.reset_index().assign(**{gname: group})
    kept, dropped, diag = screen_covariates(frame, model="voxelwise", tested=gname,
                                            covariates=usable, group_column="group", keep=keep)
    cov = {}
    for c in kept:
        col = p[c]
        cov[c] = col.to_numpy() if col.dtype == object or c in ("sex", "site") else col.astype(float).to_numpy()
    return group, cov, dropped, diag


def _session_of(f) -> str:
    """``ses-<s>`` of a derivatives path or a stack row key (``sub-01_ses-pre``), else ``""``."""
    name = getattr(f, "name", str(f))
    return "ses-" + name.split("_ses-")[1].split("_")[0] if "_ses-" in name else ""


def choose_session(files, sessions: pd.DataFrame | None, session: str | None) -> tuple[str, str]:
    """(session id analysed, how it was chosen); ``""`` when the dataset has no sessions.

    ``files``: derivatives paths or stack row keys of the available subject-sessions.
    """
    from ..stats._common import order_sessions

    present = sorted({_session_of(f) for f in files} - {""})
    if not present:
        return "", "no sessions"
    if session:
        sid = "ses-" + str(session).removeprefix("ses-")
        if sid not in present:
            raise ValueError(f"voxelwise session {session!r} not found; sessions with "
                             f"template-space maps: {present}")
        return sid, "configured"
    order = order_sessions(present, sessions)
    how = ("chronological baseline (sessions.tsv acq_time)"
           if sessions is not None and "acq_time" in sessions.columns else
           "baseline by session name (no acq_time)")
    return order[0], how


def _estimable_design(make, group, cov: dict):
    """Drop covariates (last first) until the design has full rank and >= 2 residual dof."""
    names = list(cov)
    dropped = []
    while True:
        try:
            d = make(group, covariates={k: cov[k] for k in names} or None)
        except ValueError:
            d = None
        if d is not None and d.matrix.shape[0] - d.matrix.shape[1] >= 2:
            return d, dropped
        if not names:
            return None, dropped
        dropped.append(names.pop())


def _template_map_source(path: Path) -> tuple[str, tuple[str, str]]:
    """(fingerprint, source) of one smoothed template-space Chimap and its brain mask."""
    mask_path = Path(str(path).replace("_desc-smooth_Chimap", "_desc-brain_mask"))
    parts = []
    for f in (path, mask_path):
        st = f.stat()
        parts.append(f"{st.st_size}-{st.st_mtime_ns}")
    return "/".join(parts), (str(path), str(mask_path))


def load_template_map(source) -> tuple[np.ndarray, np.ndarray]:
    """Loader of the cohort stack: (smoothed chi map, brain mask) of one subject-session."""
    chi_path, mask_path = source
    values, _, _ = load_nifti(chi_path)
    inside = load_nifti(mask_path)[0] > 0
    return values, inside


def _stack_voxels(shape, affine) -> np.ndarray:
    """The stack's voxel set: the MNI template brain mask on that grid, else the whole grid."""
    from ..atlas import load_template_mask
    for res in (2, 1):
        try:
            m, a = load_template_mask(res)
        except Exception:  # noqa: BLE001 - template data missing: use the whole grid
            break
        if m.shape == tuple(shape) and np.allclose(a, affine, atol=1e-3):
            return m
    return np.ones(shape, bool)


def _session_key(path: Path) -> tuple[str, str]:
    """(participant_id, acquisition key) from a derivatives file name.

    The key is the subject-session's with its acquisition entities:
    ``sub-01[_ses-pre][_acq-<a>][_run-<n>]`` (as :attr:`qsmdask.io.bids.SubjectSession.key`),
    so two runs of one subject-session are two rows of the stack.
    """
    from ..io.bids import ACQUISITION_ENTITIES, parse_bids_name
    ents = parse_bids_name(path)[0]
    sub = f"sub-{ents['sub']}"
    parts = [sub] + ([f"ses-{ents['ses']}"] if ents.get("ses") else [])
    parts += [f"{k}-{ents[k]}" for k in ACQUISITION_ENTITIES if ents.get(k)]
    return sub, "_".join(parts)


def _key_entities(key: str) -> dict[str, str]:
    """``{"sub": "01", "ses": "pre", "run": "2"}`` of a stack key."""
    return dict(part.split("-", 1) for part in key.split("_") if "-" in part)


def _one_acquisition_per_subject(keys: list[str], acq=None, run="lowest") -> list[str]:
    """Apply the group level's acquisition rule to stack keys of one session (one per subject)."""
    from ..io.bids import ACQUISITION_ENTITIES
    from .cohort import select_acquisitions

    if not keys:
        return keys
    rows = []
    for k in keys:
        ents = _key_entities(k)
        rows.append({"participant_id": f"sub-{ents['sub']}", "session_id": ents.get("ses", ""),
                     **{e: ents.get(e, "") for e in ACQUISITION_ENTITIES}, "key": k})
    table, _ = select_acquisitions(pd.DataFrame(rows), acq=acq, run=run)
    return sorted(table["key"])


def update_voxelwise_stack(output_dir, *, client=None) -> tuple[str, dict]:
    """Add or replace every subject-session's template-space map in the cohort stack.

    The stack (``voxelwise_stack.zarr`` in the work folder of OUTPUT_DIR) is keyed by subject-session and
    chunked by subject blocks x voxel blocks; one task per changed subject block writes it
    (on the Dask ``client`` when given), so the cohort is never held in memory and a rerun
    writes only new or changed subject-sessions. Returns (store, update summary).
    """
    from ..perm.stack import create_cohort_stack, update_cohort_stack
    out = Path(output_dir)
    files = sorted(out.glob(f"sub-*/**/anat/*_space-{SPACE}_desc-smooth_Chimap.nii.gz"))
    store = str(out / "work" / "voxelwise_stack.zarr")
    if not files:
        return store, {"blocks": 0, "rows": 0, "failed": {}}
    entries = {}
    for f in files:
        try:
            entries[_session_key(f)[1]] = _template_map_source(f)
        except OSError:
            continue  # a map without its brain mask is not stacked
    import nibabel as nib
    img = nib.load(str(files[0]))
    shape, affine = img.shape[:3], img.affine
    voxels = _stack_voxels(shape, affine)
    try:
        create_cohort_stack(store, voxels, affine=affine)
    except ValueError:  # another grid than the stack's: rebuild it
        import shutil
        shutil.rmtree(store, ignore_errors=True)
        create_cohort_stack(store, voxels, affine=affine)
    return store, update_cohort_stack(store, entries, load_template_map, client=client)


def run_voxelwise(output_dir, participants: pd.DataFrame, *, options: VoxelwiseOptions = VoxelwiseOptions(),
                  client=None, atlas=None, tables_url=None, acquisition: dict | None = None,
                  sessions: pd.DataFrame | None = None) -> dict:
    """Run the voxel-wise group comparison; returns paths of what it wrote and a summary.

    ``acquisition``: ``{"acq": ..., "run": ...}``, the rule that picks one acquisition per
    subject-session (:func:`qsmdask.workflows.cohort.select_acquisitions`; default: the
    default ``acq``, lowest run).

    Out of core: the maps go into the cohort stack (:func:`update_voxelwise_stack`), and the
    GLM and permutations run over its voxel blocks (:func:`qsmdask.perm.distributed.permutation_test_stack`).
    The session analysed is ``options.session`` or else the chronological baseline
    (``sessions``: the sessions.tsv rows with ``acq_time``); it is named in the cluster
    table (``session_id``), the run record and the returned summary (``session_id``,
    ``session_choice``). Covariates nearly nested in group are left out
    (``covariates_left_out`` with reasons) unless ``options.keep_covariates`` keeps them.
    """
    import logging
    log = logging.getLogger("qsmdask.voxelwise")
    from ..perm import two_group_design
    from ..perm.distributed import permutation_test_stack, stack_analysis_mask
    from ..perm.stack import stack_rows

    out = Path(output_dir)
    store, update = update_voxelwise_stack(out, client=client)
    if not Path(store).exists():
        return {"skipped": "voxel-wise analysis needs >= 4 subjects with template-space maps, found 0"}
    rows = stack_rows(store)
    by_session = {}
    for key in rows:
        by_session.setdefault(_key_entities(key).get("ses", ""), []).append(key)
    session_id, how = choose_session(rows, sessions, options.session)
    ses = session_id.removeprefix("ses-")
    in_groups = participants["group"].astype(str).isin([str(g) for g in options.groups]) \
        if "group" in participants.columns else pd.Series(False, index=participants.index)
    known = set(participants.loc[in_groups, "participant_id"])
    parsed = {k: _key_entities(k) for k in by_session.get(ses, [])}
    keys = [k for k, ents in parsed.items() if f"sub-{ents['sub']}" in known]
    keys = _one_acquisition_per_subject(keys, **(acquisition or {}))
    if len(keys) < 4:
        return {"skipped": f"voxel-wise analysis needs >= 4 subjects with template-space maps, found {len(keys)}"
                           + (f" in {session_id}" if session_id else ""), "session_id": session_id}
    ids = [f"sub-{parsed[k]['sub']}" for k in keys]
    group, cov, left_out, diag = _design_inputs(participants, ids, options.covariates, options.groups,
                                                options.keep_covariates)
    for _, why in left_out:
        log.warning(why)
    if group.sum() < 2 or (1 - group).sum() < 2:
        return {"skipped": "voxel-wise analysis needs >= 2 patients and >= 2 controls"}
    design, dropped = _estimable_design(two_group_design, group, cov)
    if design is None:
        return {"skipped": f"voxel-wise design not estimable with {len(ids)} subjects"}
    cov = {k: v for k, v in cov.items() if k not in dropped}
    _, _, keep = stack_analysis_mask(store, keys, mask_fraction=options.mask_fraction, client=client)
    if not keep.any():
        return {"skipped": f"no voxel inside {options.mask_fraction:.0%} of the subjects' brain masks"}
    import zarr
    root = zarr.open_group(store, mode="r")
    stack_mask = np.asarray(root["mask"][...], dtype=bool)
    affine = np.asarray(root.attrs["affine"])
    atlas_labels = atlas_names = None
    if atlas is not None:
        from ..registration import Transform, apply_transform
        atlas_labels = apply_transform(atlas.labels, atlas.affine, Transform.identity(), stack_mask.shape, affine,
                                       interpolation="nearest").astype(np.int32)
        atlas_names = dict(zip(atlas.table["index"].astype(int), atlas.table["name"].astype(str)))
    res = permutation_test_stack(store, design, keys=keys, voxel_keep=keep, client=client,
                                 n_perm=options.n_perm, seed=options.seed, inference=options.inference,
                                 cluster_p=options.cluster_p, min_cluster_voxels=options.min_cluster_voxels,
                                 connectivity=options.connectivity, atlas=atlas_labels, atlas_names=atlas_names,
                                 scheme=options.scheme)
    mask = res.mask
    gdir = out / "group"
    written = {}
    for name in ("t", "z", "logp_unc", "logp_fwe_t", "logp_fwe_size", "logp_fwe_mass", "logp_fwe_tfce",
                 "cluster_labels"):
        if getattr(res, name, None) is None:
            continue
        vol = res.to_volume(name)
        if name == "cluster_labels":
            vol = vol.astype(np.int16)
        written[name] = str(save_nifti(gdir / f"perm_{name}.nii.gz", vol.astype(vol.dtype), affine))
    clusters = res.clusters if res.clusters is not None else pd.DataFrame()
    clusters = clusters.copy()
    clusters.insert(0, "session_id", session_id)
    writer = DerivativesWriter(out, tables_url=tables_url)
    written["design_diagnostics"] = str(writer.save_group_table(
        "perm_design_diagnostics", diag.assign(session_id=session_id)))
    written["clusters"] = str(writer.save_group_table(
        "perm_clusters", clusters.astype({c: str for c in clusters.columns if clusters[c].dtype == object})))
    # what the analysis could detect: the voxel-level FWE threshold of its own permutation null
    # and the group difference (in within-group SDs) found there with 80 % power
    power = {}
    null_t = np.asarray(res.null.get("max_t", []), dtype=np.float64)
    if null_t.size:
        from ..perm.permute import detectable_effect_size, fwe_t_threshold

        t_fwe = fwe_t_threshold(null_t, 0.05)
        power = {"fwe_alpha": 0.05, "fwe_t_threshold": t_fwe, "n_permutations": int(null_t.size),
                 "dof": int(res.dof)}
        if np.isfinite(t_fwe):
            d80 = detectable_effect_size(t_fwe, int(group.sum()), int((1 - group).sum()), dof=int(res.dof))
            # inf: no difference reaches the threshold with 80 % probability at this n (JSON has no inf)
            power["detectable_d_power80"] = d80 if np.isfinite(d80) else None
            power["undetectable_at_this_n"] = not np.isfinite(d80)
    writer.write_run_config(
        {"level": "group-voxelwise", "session_id": session_id, "session_choice": how,
         "subjects": ids, "n_patients": int(group.sum()), "power": power,
         "covariates": sorted(cov), "covariates_dropped": dropped,
         "covariates_left_out": [{"covariate": c, "reason": r} for c, r in left_out],
         "n_voxels": int(mask.sum()),
         "stack": {"store": store, "rows_written": update["rows"], "failed": update["failed"]},
         "options": options.__dict__},
        name="qsmdask_voxelwise_config.json")
    n_sig = int((clusters.get("p_fwe_size", pd.Series(dtype=float)) < 0.05).sum()) if len(clusters) else 0
    return {"written": written, "n_subjects": len(ids), "n_voxels": int(mask.sum()),
            "n_significant_clusters": n_sig, "session_id": session_id, "session_choice": how,
            "covariates_left_out": left_out}


def run_voxelwise_on_worker(output_dir, participants: pd.DataFrame, **kwargs) -> dict:
    """:func:`run_voxelwise` as a Dask task: the permutation batches fan out from this worker
    to the whole cluster (``worker_client`` secedes this task's thread while it waits)."""
    from distributed import worker_client

    with worker_client() as client:
        return run_voxelwise(output_dir, participants, client=client, **kwargs)
