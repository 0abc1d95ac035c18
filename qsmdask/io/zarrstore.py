"""Chunked zarr volumes that carry their NIfTI geometry.

Each subject-session gets one zarr group (``<work>/<key>.zarr``); each volume is an array
in it, chunked in space (default 64^3, echoes in separate chunks), with the NIfTI-1 header
kept as ``attrs["nifti"]["base64"]`` (NIfTI-Zarr convention) plus the affine in plain JSON.
Works with local paths and fsspec URLs (``file://``, ``memory://``, ``s3://``).
One writer per array: every volume is written whole by exactly one task.
"""

from __future__ import annotations

import base64

import nibabel as nib
import numpy as np
import zarr

__all__ = ["write_volume", "read_volume", "read_affine", "open_group", "has_volume", "remove_group"]


def open_group(url: str, mode: str = "a") -> zarr.Group:
    """Open (or create) the zarr group at a path or fsspec URL; ``file://`` maps to a local path."""
    url = str(url)
    if url.startswith("file://"):
        from urllib.parse import unquote, urlparse
        url = unquote(urlparse(url).path)
    return zarr.open_group(url, mode=mode)


def _chunks(shape, chunk_edge: int):
    return tuple(min(chunk_edge, s) for s in shape[:3]) + tuple(1 for _ in shape[3:])


def write_volume(url: str, name: str, data: np.ndarray, affine, *, chunk_edge: int = 64,
                 attrs: dict | None = None) -> str:
    """Write ``data`` as array ``name`` of the group at ``url`` (overwrites); returns ``url/name``."""
    data = np.asarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    g = open_group(url, mode="a")
    arr = g.create_array(name, shape=data.shape, dtype=data.dtype,
                         chunks=_chunks(data.shape, chunk_edge), overwrite=True)
    arr[...] = data
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(data.dtype)
    hdr.set_qform(np.asarray(affine, float), code=1)
    hdr.set_sform(np.asarray(affine, float), code=1)
    arr.attrs.update({
        "nifti": {"base64": base64.b64encode(hdr.binaryblock).decode()},
        "affine": np.asarray(affine, float).tolist(),
        **(attrs or {}),
    })
    return f"{url}/{name}"


def has_volume(url: str, name: str) -> bool:
    try:
        g = open_group(url, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return False
    return name in g


def read_volume(url: str, name: str, *, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Read array ``name``; returns ``(data, affine)``."""
    g = open_group(url, mode="r")
    arr = g[name]
    data = arr[...]
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return data, np.asarray(arr.attrs["affine"], float)


def read_affine(url: str, name: str) -> np.ndarray:
    """Affine from the stored NIfTI header (the source of truth), checked against the JSON copy."""
    g = open_group(url, mode="r")
    raw = base64.b64decode(g[name].attrs["nifti"]["base64"])
    hdr = nib.Nifti1Header(binaryblock=raw)
    return hdr.get_best_affine()


def remove_group(url: str) -> None:
    """Delete a zarr group (local path or fsspec URL); missing groups are fine."""
    import fsspec

    url = str(url)
    if "://" not in url:
        url = "file://" + str(url)
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
