"""Stack a cohort's 3-D maps into one chunked zarr array (subjects x masked voxels).

Layout of the zarr group: ``data`` (n_subjects, n_voxels) float32 chunked
``(n_subjects, chunk_voxels)`` (one writer per chunk: each voxel block is
written once with all subjects), ``mask`` (x, y, z) bool, attributes
``affine`` (4x4 list) and ``subjects`` (ids).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import zarr

__all__ = ["stack_maps_to_zarr", "open_stack"]


def stack_maps_to_zarr(maps: Sequence[np.ndarray], mask: np.ndarray, store, *, affine=None,
                       subjects: Sequence[str] | None = None, chunk_voxels: int = 65536):
    """Write ``maps[i][mask]`` as row i of a zarr array.

    Parameters
    ----------
    maps : sequence of 3-D arrays (one per subject, same shape as ``mask``)
    mask : 3-D bool array
    store : path or zarr store (overwritten)
    affine : (4, 4) voxel -> mm affine, stored as attribute (optional)
    subjects : subject ids (optional)
    chunk_voxels : voxels per chunk

    Returns
    -------
    zarr.Group with arrays ``data`` and ``mask``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3 or mask.dtype != bool:
        raise ValueError("mask must be a 3-D bool array")
    if len(maps) < 2:
        raise ValueError("maps must hold at least 2 subjects")
    if int(chunk_voxels) < 1:
        raise ValueError("chunk_voxels must be >= 1")
    n, v = len(maps), int(mask.sum())
    rows = np.empty((n, v), dtype=np.float32)
    for i, m in enumerate(maps):
        m = np.asarray(m)
        if m.shape != mask.shape:
            raise ValueError(f"maps[{i}] has shape {m.shape}, mask has {mask.shape}")
        rows[i] = m[mask]
    if not np.all(np.isfinite(rows)):
        raise ValueError("maps contain NaN/inf inside the mask")
    root = zarr.open_group(store, mode="w")
    cv = int(min(chunk_voxels, v))
    arr = root.create_array("data", shape=(n, v), chunks=(n, cv), dtype="float32")
    for start in range(0, v, cv):
        arr[:, start:start + cv] = rows[:, start:start + cv]
    root.create_array("mask", shape=mask.shape, chunks=mask.shape, dtype="bool")[...] = mask
    if affine is not None:
        root.attrs["affine"] = np.asarray(affine, dtype=float).tolist()
    if subjects is not None:
        if len(subjects) != n:
            raise ValueError(f"subjects must have {n} ids")
        root.attrs["subjects"] = [str(s) for s in subjects]
    return root


def open_stack(store):
    """Open a stack written by :func:`stack_maps_to_zarr`: returns (data zarr array, mask, affine or None)."""
    root = zarr.open_group(store, mode="r")
    affine = root.attrs.get("affine")
    return root["data"], np.asarray(root["mask"][...], dtype=bool), (None if affine is None else np.asarray(affine))
