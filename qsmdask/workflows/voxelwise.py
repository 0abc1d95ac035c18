"""Whole-brain voxel-wise analysis of the template-space chi maps (the study's SnPM analysis).

Loads every subject's smoothed MNI-space Chimap of one session, stacks them into a chunked
zarr array (subjects x voxels), fits the GLM ``chi ~ group + age + sex + medication [+ site]``
and runs Freedman-Lane permutation inference (max-T, cluster extent/mass, optional TFCE),
distributed over a Dask client when one is given. Saves the NIfTI maps under
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

__all__ = ["VoxelwiseOptions", "run_voxelwise"]

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


def _design_inputs(participants: pd.DataFrame, ids: list[str], covariates) -> tuple[np.ndarray, dict]:
    p = participants.set_index("participant_id").loc[ids]
    group = (p["group"].astype(str).str.lower() == "patient").astype(float).to_numpy()
    cov = {}
    for c in covariates:
        if c not in p.columns:
            continue
        col = p[c]
        if col.isna().any() or col.nunique() < 2:
            continue
        if c == "medication" and np.array_equal((col.astype(float) > 0).to_numpy(), group > 0):
            continue  # collinear with group (every patient medicated): not estimable
        cov[c] = col.to_numpy() if col.dtype == object or c in ("sex", "site") else col.astype(float).to_numpy()
    return group, cov


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


def run_voxelwise(output_dir, participants: pd.DataFrame, *, options: VoxelwiseOptions = VoxelwiseOptions(),
                  client=None, atlas=None, tables_url=None) -> dict:
    """Run the voxel-wise group comparison; returns paths of what it wrote and a summary."""
    from ..perm import two_group_design
    from ..perm.distributed import permutation_test_dask
    from ..perm.stack import stack_maps_to_zarr

    out = Path(output_dir)
    pattern = f"sub-*/**/anat/*_space-{SPACE}_desc-smooth_Chimap.nii.gz"
    files = sorted(out.glob(pattern))
    if options.session:
        files = [f for f in files if f"_ses-{options.session.removeprefix('ses-')}_" in f.name]
    elif files and "_ses-" in files[0].name:
        first = sorted({f.name.split("_ses-")[1].split("_")[0] for f in files})[0]
        files = [f for f in files if f"_ses-{first}_" in f.name]
    known = set(participants["participant_id"])
    files = [f for f in files if f.name.split("_")[0] in known]
    if len(files) < 4:
        return {"skipped": f"voxel-wise analysis needs >= 4 subjects with template-space maps, found {len(files)}"}
    ids = [f.name.split("_")[0] for f in files]
    group, cov = _design_inputs(participants, ids, options.covariates)
    if group.sum() < 2 or (1 - group).sum() < 2:
        return {"skipped": "voxel-wise analysis needs >= 2 patients and >= 2 controls"}
    maps, masks, affine = [], [], None
    for f in files:
        d, a, _ = load_nifti(f)
        maps.append(d)
        masks.append(load_nifti(Path(str(f).replace("_desc-smooth_Chimap", "_desc-brain_mask")))[0] > 0)
        affine = a if affine is None else affine
    mask = np.mean(masks, axis=0) >= options.mask_fraction
    store = out / "work" / "voxelwise_stack.zarr"
    stack_maps_to_zarr(maps, mask, str(store), affine=affine, subjects=ids)
    design, dropped = _estimable_design(two_group_design, group, cov)
    if design is None:
        return {"skipped": f"voxel-wise design not estimable with {len(ids)} subjects"}
    cov = {k: v for k, v in cov.items() if k not in dropped}
    atlas_labels = atlas_names = None
    if atlas is not None:
        from ..registration import Transform, apply_transform
        atlas_labels = apply_transform(atlas.labels, atlas.affine, Transform.identity(), mask.shape, affine,
                                       interpolation="nearest").astype(np.int32)
        atlas_names = dict(zip(atlas.table["index"].astype(int), atlas.table["name"].astype(str)))
    res = permutation_test_dask(str(store), design, mask=mask, client=client, n_perm=options.n_perm,
                                seed=options.seed, inference=options.inference, cluster_p=options.cluster_p,
                                min_cluster_voxels=options.min_cluster_voxels,
                                connectivity=options.connectivity, affine=affine, atlas=atlas_labels,
                                atlas_names=atlas_names)
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
    writer = DerivativesWriter(out, tables_url=tables_url)
    written["clusters"] = str(writer.save_group_table(
        "perm_clusters", clusters.astype({c: str for c in clusters.columns if clusters[c].dtype == object})))
    writer.write_run_config(
        {"level": "group-voxelwise", "subjects": ids, "n_patients": int(group.sum()),
         "covariates": sorted(cov), "covariates_dropped": dropped, "n_voxels": int(mask.sum()), "options": options.__dict__},
        name="qsmdask_voxelwise_config.json")
    n_sig = int((clusters.get("p_fwe_size", pd.Series(dtype=float)) < 0.05).sum()) if len(clusters) else 0
    return {"written": written, "n_subjects": len(ids), "n_voxels": int(mask.sum()),
            "n_significant_clusters": n_sig}
