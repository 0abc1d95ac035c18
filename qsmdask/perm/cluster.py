"""Cluster-forming thresholds, connected-component labelling on masked voxels, cluster tables.

Voxel maps are handled as masked vectors ``values`` (n_voxels,) with their
integer voxel coordinates ``coords`` (n_voxels, 3). Labelling crops to the
bounding box of the supra-threshold voxels before calling
:func:`scipy.ndimage.label`, so sparse maps are labelled cheaply.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy import ndimage, stats

__all__ = [
    "connectivity_structure",
    "cluster_threshold_t",
    "label_voxels",
    "cluster_statistics",
    "max_cluster_statistics",
    "cluster_table",
]


def connectivity_structure(connectivity: int) -> np.ndarray:
    """3-D neighbourhood for face (6), face+edge (18) or full (26) connectivity."""
    rank = {6: 1, 18: 2, 26: 3}.get(connectivity)
    if rank is None:
        raise ValueError(f"connectivity must be one of 6, 18, 26, got {connectivity!r}")
    return ndimage.generate_binary_structure(3, rank)


def cluster_threshold_t(p: float, dof: int, *, two_sided: bool = True) -> float:
    """t threshold for a cluster-forming p-value (two-sided splits p over both tails, as nilearn).

    Parameters
    ----------
    p : float in (0, 1)
    dof : int, model residual degrees of freedom
    two_sided : bool
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"cluster_p must be in (0, 1), got {p!r}")
    if dof <= 0:
        raise ValueError("dof must be > 0")
    return float(stats.t.isf(p / 2.0 if two_sided else p, dof))


def label_voxels(coords: np.ndarray, structure: np.ndarray):
    """Connected components of a set of voxels given by coordinates.

    Parameters
    ----------
    coords : int array (m, 3)
    structure : bool array (3, 3, 3)

    Returns
    -------
    labels : int array (m,), values 1..n_clusters
    n_clusters : int
    """
    if coords.shape[0] == 0:
        return np.zeros(0, dtype=np.int32), 0
    lo = coords.min(axis=0)
    shape = coords.max(axis=0) - lo + 1
    local = tuple((coords - lo).T)
    vol = np.zeros(tuple(shape), dtype=bool)
    vol[local] = True
    lab, n = ndimage.label(vol, structure)
    return lab[local], int(n)


def _signed_sets(values, threshold, two_sided):
    sets = [(1, np.flatnonzero(values > threshold))]
    if two_sided:
        sets.append((-1, np.flatnonzero(values < -threshold)))
    return sets


def cluster_statistics(values, coords, *, threshold: float, two_sided: bool, structure,
                       min_size: int = 1):
    """Label supra-threshold clusters of a masked statistic map.

    Clusters are formed separately for positive (> threshold) and, when
    ``two_sided``, negative (< -threshold) values. Clusters smaller than
    ``min_size`` voxels are dropped. Mass is the sum of ``|value| - threshold``
    over the cluster (as nilearn / SnPM "cluster mass").

    Returns
    -------
    labels : int32 array (n_voxels,), 0 outside clusters, 1..K by decreasing size
    sizes : int array (K,)
    masses : float array (K,)
    signs : int array (K,)
    """
    values = np.asarray(values)
    labels = np.zeros(values.shape[0], dtype=np.int32)
    all_sizes, all_masses, all_signs, members = [], [], [], []
    for sign, idx in _signed_sets(values, threshold, two_sided):
        lab, n = label_voxels(coords[idx], structure)
        if n == 0:
            continue
        sizes = np.bincount(lab, minlength=n + 1)[1:]
        masses = np.bincount(lab, weights=np.abs(values[idx]).astype(np.float64) - threshold,
                             minlength=n + 1)[1:]
        keep = np.flatnonzero(sizes >= min_size)
        for k in keep:
            all_sizes.append(sizes[k])
            all_masses.append(masses[k])
            all_signs.append(sign)
        members.append((idx, lab, keep))
    order = np.lexsort((-np.asarray(all_masses), -np.asarray(all_sizes))) if all_sizes else []
    rank = np.empty(len(all_sizes), dtype=np.int32)
    rank[order] = np.arange(1, len(all_sizes) + 1)
    pos = 0
    for idx, lab, keep in members:
        remap = np.zeros(lab.max() + 1, dtype=np.int32)
        remap[keep + 1] = rank[pos:pos + keep.size]
        labels[idx] = remap[lab]
        pos += keep.size
    sizes = np.asarray(all_sizes, dtype=np.int64)[order] if all_sizes else np.zeros(0, np.int64)
    masses = np.asarray(all_masses, dtype=np.float64)[order] if all_sizes else np.zeros(0)
    signs = np.asarray(all_signs, dtype=np.int8)[order] if all_sizes else np.zeros(0, np.int8)
    return labels, sizes, masses, signs


def max_cluster_statistics(values, coords, *, threshold: float, two_sided: bool, structure,
                           min_size: int = 1):
    """Largest cluster size and largest cluster mass of one map (0 when no cluster).

    Same cluster definition as :func:`cluster_statistics`; used for every
    permutation, so it only computes the maxima.
    """
    max_size, max_mass = 0, 0.0
    for _, idx in _signed_sets(values, threshold, two_sided):
        if idx.size < min_size:
            continue
        lab, n = label_voxels(coords[idx], structure)
        sizes = np.bincount(lab, minlength=n + 1)[1:]
        masses = np.bincount(lab, weights=np.abs(values[idx]).astype(np.float64) - threshold,
                             minlength=n + 1)[1:]
        keep = sizes >= min_size
        if keep.any():
            max_size = max(max_size, int(sizes[keep].max()))
            max_mass = max(max_mass, float(masses[keep].max()))
    return max_size, max_mass


def cluster_table(labels, values, coords, *, affine, sizes, signs, p_size=None, p_mass=None,
                  masses=None, atlas_labels=None, atlas_names: Mapping[int, str] | None = None):
    """Cluster table (pandas DataFrame), one row per cluster.

    Parameters
    ----------
    labels : int array (n_voxels,) from :func:`cluster_statistics`
    values : statistic map (n_voxels,), e.g. t
    coords : int array (n_voxels, 3) voxel indices
    affine : (4, 4) voxel -> MNI (mm) affine
    sizes, signs, masses : per-cluster arrays from :func:`cluster_statistics`
    p_size, p_mass : per-cluster FWE-corrected p-values (optional)
    atlas_labels : int array (n_voxels,) atlas label per masked voxel (optional)
    atlas_names : mapping label -> name (optional)

    Returns
    -------
    DataFrame with columns ``cluster, sign, size_voxels, size_mm3, mass, peak_stat,
    peak_x_mm, peak_y_mm, peak_z_mm, peak_label, labels_covered, p_fwe_size, p_fwe_mass``.
    """
    import pandas as pd

    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError("affine must be 4x4")
    voxel_mm3 = abs(np.linalg.det(affine[:3, :3]))
    rows = []
    for k in range(1, len(sizes) + 1):
        idx = np.flatnonzero(labels == k)
        peak = idx[np.argmax(np.abs(values[idx]))]
        xyz = affine[:3, :3] @ coords[peak] + affine[:3, 3]
        peak_label, covered = "", ""
        if atlas_labels is not None:
            names = atlas_names or {}
            lab_ids, counts = np.unique(atlas_labels[idx], return_counts=True)
            order = np.argsort(-counts)
            pl = int(atlas_labels[peak])
            peak_label = names.get(pl, str(pl)) if pl != 0 else ""
            covered = "; ".join(f"{names.get(int(l), str(int(l)))} ({c})"
                                for l, c in zip(lab_ids[order], counts[order]) if l != 0)
        rows.append({
            "cluster": k,
            "sign": int(signs[k - 1]),
            "size_voxels": int(sizes[k - 1]),
            "size_mm3": float(sizes[k - 1] * voxel_mm3),
            "mass": float(masses[k - 1]) if masses is not None else np.nan,
            "peak_stat": float(values[peak]),
            "peak_x_mm": float(xyz[0]),
            "peak_y_mm": float(xyz[1]),
            "peak_z_mm": float(xyz[2]),
            "peak_label": peak_label,
            "labels_covered": covered,
            "p_fwe_size": float(p_size[k - 1]) if p_size is not None else np.nan,
            "p_fwe_mass": float(p_mass[k - 1]) if p_mass is not None else np.nan,
        })
    cols = ["cluster", "sign", "size_voxels", "size_mm3", "mass", "peak_stat", "peak_x_mm",
            "peak_y_mm", "peak_z_mm", "peak_label", "labels_covered", "p_fwe_size", "p_fwe_mass"]
    return pd.DataFrame(rows, columns=cols)
