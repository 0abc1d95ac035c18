"""Susceptibility referencing: which region's value is zero.

The dipole inversion leaves the mean of chi undetermined; background removal and the
inversion pin it to zero over the brain mask, so an increase planted in some regions lowers
every other region by the same amount (plus a local halo). Subtracting the value of a
reference region measured in the same map removes that per-subject offset.

Pure numpy/scipy: arrays and voxel sizes in, arrays out, no file IO. The pipeline
(``qsmdask.workflows.participant``) builds the reference mask in native space, subtracts
its median from chi and then uses the referenced map everywhere (native Chimap, template
maps, ROI tables, voxel-wise stack).

Reference kinds (``PipelineConfig.reference``):

- ``"csf"``: the lateral ventricles: a template prior (:func:`lateral_ventricle_prior`,
  the two largest high-CSF-probability components lateral to the midline) brought to native
  space, kept inside the brain mask, eroded by ``erode_mm`` and, when the magnitude has two
  or more echoes, restricted to voxels of low R2* (:func:`r2star_map`, CSF has R2* of a few
  1/s against ~20 1/s in tissue at 3 T);
- ``"whole_brain"``: the final brain mask;
- ``"white_matter"``: template white-matter probability > 0.9 brought to native space, eroded;
- ``"roi:<name>"``: an atlas ROI group (or label name), eroded;
- ``"none"``: no referencing (value 0).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["REFERENCE_KINDS", "validate_reference", "lateral_ventricle_prior", "r2star_map",
           "reference_mask", "reference_value", "describe_reference"]

REFERENCE_KINDS = ("csf", "whole_brain", "white_matter", "none")


def validate_reference(reference: str) -> str:
    """Return ``reference`` when it is one of :data:`REFERENCE_KINDS` or ``"roi:<name>"``."""
    if not isinstance(reference, str):
        raise ValueError(f"reference must be a string, got {reference!r}")
    if reference in REFERENCE_KINDS:
        return reference
    if reference.startswith("roi:") and reference[4:].strip():
        return reference
    raise ValueError(f"reference must be one of {list(REFERENCE_KINDS)} or 'roi:<atlas ROI "
                     f"group or label name>', got {reference!r}")


def describe_reference(reference: str, erode_mm: float) -> str:
    """One-line human description of a reference (for sidecars and the report)."""
    if reference == "none":
        return "none (chi has zero mean over the brain mask, as left by the inversion)"
    what = {"csf": "lateral ventricles (CSF; template prior, low R2*)",
            "whole_brain": "whole brain mask",
            "white_matter": "white matter (template probability > 0.9)"}.get(
        reference, f"atlas region {reference[4:]!r}")
    return f"median chi of the {what}, eroded by {erode_mm:g} mm, subtracted"


def _world(affine, shape):
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (np.asarray(affine, float)[:3, :3] @ ijk + np.asarray(affine, float)[:3, 3:4]).reshape(3, *shape)


def lateral_ventricle_prior(csf_probability: np.ndarray, affine, *, threshold: float = 0.7
                            ) -> np.ndarray:
    """Lateral ventricles of an MNI-space CSF probability map (bool, same grid).

    Voxels with CSF probability > ``threshold`` inside the box |x| < 30, -50 < y < 35,
    -5 < z < 35 mm (the ventricle bodies and frontal horns); of its connected components
    the two largest whose centroid lies more than 4 mm off the midline (left and right
    lateral ventricle; the third ventricle and the cisterns next to the thalamus are left out).
    """
    p = np.asarray(csf_probability, dtype=np.float64)
    if p.ndim != 3:
        raise ValueError(f"csf_probability must be 3-D, got shape {p.shape}")
    xyz = _world(affine, p.shape)
    box = ((np.abs(xyz[0]) < 30) & (xyz[1] > -50) & (xyz[1] < 35) & (xyz[2] > -5)
           & (xyz[2] < 35))
    lab, n = ndimage.label((p > threshold) & box)
    if n == 0:
        raise ValueError("lateral_ventricle_prior: no voxel above the CSF threshold in the "
                         "ventricle box (is the map in MNI space?)")
    sizes = np.bincount(lab.ravel())[1:]
    cx = ndimage.mean(xyz[0], lab, index=np.arange(1, n + 1))
    lateral = [k + 1 for k in np.argsort(sizes)[::-1] if abs(cx[k]) > 4.0][:2]
    return np.isin(lab, lateral)


def r2star_map(magnitude: np.ndarray, echo_times_s, mask: np.ndarray | None = None) -> np.ndarray:
    """R2* (1/s) by a log-linear least-squares fit over echoes, 0 outside ``mask``.

    ``magnitude`` is (x, y, z, echo) with at least two echoes.
    """
    mag = np.asarray(magnitude, dtype=np.float64)
    te = np.asarray(echo_times_s, dtype=np.float64).ravel()
    if mag.ndim != 4 or mag.shape[3] != te.size or te.size < 2:
        raise ValueError(f"magnitude must be (x, y, z, echo) with >= 2 echoes matching "
                         f"echo_times_s, got {mag.shape} and {te.size} echo times")
    sel = np.ones(mag.shape[:3], bool) if mask is None else np.asarray(mask, bool)
    y = np.log(np.maximum(mag[sel], 1e-6))
    tc = te - te.mean()
    slope = (y - y.mean(axis=1, keepdims=True)) @ tc / (tc @ tc)
    out = np.zeros(mag.shape[:3], dtype=np.float32)
    out[sel] = -slope
    return out


def _erode(m: np.ndarray, voxel_size_mm, erode_mm: float) -> np.ndarray:
    if erode_mm <= 0:
        return m
    from .roi import erode_labels

    return erode_labels(m.astype(np.int8), voxel_size_mm=voxel_size_mm, radius_mm=erode_mm) > 0


def reference_mask(reference: str, *, mask: np.ndarray, voxel_size_mm, erode_mm: float = 2.0,
                   prior: np.ndarray | None = None, labels: np.ndarray | None = None,
                   label_table=None, r2star_hz: np.ndarray | None = None,
                   max_r2star_hz: float = 10.0, min_voxels: int = 20
                   ) -> tuple[np.ndarray, dict]:
    """Native-space voxels of a reference region.

    Parameters
    ----------
    reference : see :func:`validate_reference`.
    mask : bool (x, y, z), the final brain mask of the reconstruction.
    voxel_size_mm : 3 floats.
    erode_mm : erosion radius (mm) applied to the region (inside ``mask``).
    prior : bool (x, y, z) in native space: the template prior of ``"csf"`` (lateral
        ventricles) or ``"white_matter"``; required for those kinds.
    labels, label_table : native atlas labels and their table (``index, name, roi``), for
        ``"roi:<name>"`` (a ROI group name, else a label name).
    r2star_hz : optional R2* map (1/s) for ``"csf"``: voxels above ``max_r2star_hz`` are
        dropped, unless fewer than ``min_voxels`` would remain.
    min_voxels : a reference with fewer voxels raises ValueError (it would be noise).

    Returns
    -------
    (bool array, info dict with ``reference``, ``n_voxels``, ``erode_mm``, ``r2star_refined``)
    """
    validate_reference(reference)
    mask = np.asarray(mask, dtype=bool)
    info = {"reference": reference, "erode_mm": float(erode_mm), "r2star_refined": False}
    if reference == "none":
        info["n_voxels"] = 0
        return np.zeros_like(mask), info
    if reference == "whole_brain":
        region = mask.copy()
    elif reference in ("csf", "white_matter"):
        if prior is None:
            raise ValueError(f"reference {reference!r} needs a native-space prior mask")
        prior = np.asarray(prior, dtype=bool)
        if prior.shape != mask.shape:
            raise ValueError(f"prior shape {prior.shape} differs from mask shape {mask.shape}")
        region = _erode(prior & mask, voxel_size_mm, erode_mm)
        if reference == "csf" and r2star_hz is not None:
            low = region & (np.asarray(r2star_hz) <= max_r2star_hz)
            if low.sum() >= min_voxels:
                region, info["r2star_refined"] = low, True
    else:
        name = reference[4:]
        if labels is None or label_table is None:
            raise ValueError(f"reference {reference!r} needs atlas labels and their table")
        t = label_table
        idx = t.loc[t["roi"].astype(str) == name, "index"].to_numpy()
        if idx.size == 0 and "name" in t.columns:
            idx = t.loc[t["name"].astype(str) == name, "index"].to_numpy()
        if idx.size == 0:
            groups = sorted(set(t["roi"].astype(str)) - {""})
            raise ValueError(f"reference {reference!r}: no atlas ROI group or label named "
                             f"{name!r}; ROI groups: {groups}")
        region = _erode(np.isin(labels, idx) & mask, voxel_size_mm, erode_mm)
    info["n_voxels"] = int(region.sum())
    if info["n_voxels"] < min_voxels:
        raise ValueError(f"reference {reference!r}: only {info['n_voxels']} voxels left "
                         f"(need >= {min_voxels}); reduce reference_erode_mm or choose "
                         f"another reference")
    return region, info


def reference_value(chi_ppm: np.ndarray, region: np.ndarray) -> float:
    """Median chi (ppm) over the reference voxels (0.0 for an empty region, i.e. ``"none"``)."""
    region = np.asarray(region, dtype=bool)
    if not region.any():
        return 0.0
    v = np.asarray(chi_ppm)[region]
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("reference region holds no finite chi value")
    return float(np.median(v))
