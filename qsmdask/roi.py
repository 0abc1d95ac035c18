"""ROI statistics of scalar maps (susceptibility in ppm by default) in atlas labels.

Pure numpy/scipy/pandas: arrays and voxel sizes in, tidy tables out, no file IO.

- ``erode_labels``: per-label erosion by a sphere in mm (anisotropic voxels aware).
- ``roi_statistics``: per-label and per-group (left, right, midline and bilateral)
  voxel counts, mean, median, standard deviation and interquartile range.
- ``hemisphere_average``: the "median averaged across hemispheres" of the study.
- Referencing (subtracting a reference region's chi) happens on the maps, before any ROI
  statistic, in :mod:`qsmdask.reference` (``PipelineConfig.reference``), so maps, ROI tables
  and the voxel-wise stack share one reference.
- ``smooth_gaussian``: Gaussian smoothing given as FWHM in mm (3 mm for the voxel-wise
  analyses), optionally mask-aware (normalised convolution).
- ``postmortem_iron_validation``: regression of control ROI susceptibility on the
  post-mortem iron of Hallgren & Sourander (1958).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage, stats

__all__ = ["STAT_COLUMNS", "ROI_COLUMNS", "SUBJECT_KEYS", "sphere_offsets", "erode_labels",
           "roi_statistics", "hemisphere_average", "smooth_gaussian",
           "postmortem_iron_validation"]

STAT_COLUMNS = ["mean_ppm", "median_ppm", "std_ppm", "iqr_ppm"]
ROI_COLUMNS = ["atlas", "roi", "hemisphere", "level", "label", "name", "n_voxels", *STAT_COLUMNS]
#: identification columns a combined (many-subject) ROI table may carry
SUBJECT_KEYS = ("participant_id", "session_id", "measure", "atlas")
_HEMI_ORDER = {"L": 0, "R": 1, "": 2, "B": 3}


def _voxel_size(voxel_size_mm) -> np.ndarray:
    vs = np.asarray(voxel_size_mm, dtype=np.float64).ravel()
    if vs.size == 1:
        vs = np.repeat(vs, 3)
    if vs.size != 3 or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(f"voxel_size_mm must be 3 positive numbers, got {voxel_size_mm!r}")
    return vs


def sphere_offsets(radius_mm: float, voxel_size_mm) -> np.ndarray:
    """Integer voxel offsets (n, 3) inside a sphere of ``radius_mm``, centre excluded.

    A voxel offset ``o`` is inside when ``sum((o * voxel_size_mm)**2) <= radius_mm**2``
    (with a relative tolerance of 1e-9), so a 1 mm radius at 1 mm isotropic voxels is
    the 6-neighbourhood and a radius smaller than every voxel size gives no offsets.
    """
    vs = _voxel_size(voxel_size_mm)
    if not np.isfinite(radius_mm) or radius_mm < 0:
        raise ValueError(f"radius_mm must be a finite number >= 0, got {radius_mm!r}")
    n = np.floor(radius_mm / vs + 1e-9).astype(int)
    grids = np.meshgrid(*[np.arange(-k, k + 1) for k in n], indexing="ij")
    off = np.stack([g.ravel() for g in grids], axis=1)
    d2 = ((off * vs) ** 2).sum(axis=1)
    keep = (d2 <= radius_mm**2 * (1 + 1e-9)) & (d2 > 0)
    return off[keep]


def erode_labels(labels: np.ndarray, *, voxel_size_mm, radius_mm: float = 1.0) -> np.ndarray:
    """Erode every label of a label volume by a sphere of ``radius_mm``.

    A labelled voxel keeps its label only when every voxel within ``radius_mm`` (in mm,
    using the voxel size of each axis) carries the same label; voxels outside the array
    count as background. This equals ``scipy.ndimage.binary_erosion`` of each label's
    mask with an ellipsoidal structuring element, done for all labels at once.

    Parameters
    ----------
    labels : integer array (x, y, z); 0 is background.
    voxel_size_mm : 3 floats (or one for isotropic voxels).
    radius_mm : float >= 0, default 1.0. 0 returns a copy.

    Returns
    -------
    numpy.ndarray
        New label array of the same shape and dtype.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
    off = sphere_offsets(radius_mm, voxel_size_mm)
    if len(off) == 0:
        return labels.copy()
    pad = np.abs(off).max(axis=0)
    padded = np.pad(labels, [(p, p) for p in pad], mode="constant", constant_values=0)
    keep = labels != 0
    shape = labels.shape
    for o in off:
        sl = tuple(slice(p + d, p + d + s) for p, d, s in zip(pad, o, shape))
        keep &= padded[sl] == labels
    return np.where(keep, labels, 0).astype(labels.dtype, copy=False)


def _stats(v: np.ndarray, min_voxels: int) -> tuple[int, float, float, float, float]:
    n = int(v.size)
    if n < max(min_voxels, 1):
        return n, np.nan, np.nan, np.nan, np.nan
    q25, q50, q75 = np.percentile(v, [25, 50, 75])
    std = float(np.std(v, ddof=1)) if n > 1 else 0.0
    return n, float(np.mean(v)), float(q50), std, float(q75 - q25)


def _check_table(label_table: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(label_table, pd.DataFrame):
        raise ValueError("label_table must be a pandas DataFrame with columns index, roi, hemisphere")
    missing = [c for c in ("index", "roi", "hemisphere") if c not in label_table.columns]
    if missing:
        raise ValueError(f"label_table is missing columns {missing}")
    t = label_table.copy()
    if "name" not in t.columns:
        t["name"] = t["index"].astype(str)
    t["roi"] = t["roi"].fillna("").astype(str)
    t["hemisphere"] = t["hemisphere"].fillna("").astype(str)
    bad = set(t["hemisphere"]) - {"L", "R", ""}
    if bad:
        raise ValueError(f"label_table: hemisphere must be 'L', 'R' or '', got {sorted(bad)}")
    t["index"] = t["index"].astype(np.int64)
    if t["index"].duplicated().any():
        raise ValueError("label_table: duplicate values in column 'index'")
    if (t["index"] <= 0).any():
        raise ValueError("label_table: label indices must be > 0 (0 is background)")
    return t.sort_values("index").reset_index(drop=True)


def roi_statistics(values: np.ndarray, labels: np.ndarray, label_table: pd.DataFrame, *,
                   voxel_size_mm, erode_mm: float = 1.0, min_voxels: int = 10,
                   mask: np.ndarray | None = None, atlas_name: str = "") -> pd.DataFrame:
    """Per-label and per-group statistics of a scalar map.

    Parameters
    ----------
    values : float array (x, y, z)
        The map (susceptibility in ppm; any scalar map works, the ``_ppm`` column names
        stay). Non-finite voxels are ignored.
    labels : integer array, same shape
        Atlas labels in the space of ``values`` (0 = background).
    label_table : pandas.DataFrame
        Columns ``index``, ``roi``, ``hemisphere`` (``"L"``, ``"R"``, ``""``), optional
        ``name`` (e.g. ``Atlas.table``). Labels in the volume but not in the table are
        ignored; table labels absent from the volume get ``n_voxels = 0``.
    voxel_size_mm : 3 floats
    erode_mm : float, default 1.0
        Each label is eroded by a sphere of this radius in mm before statistics
        (``erode_labels``); 0 disables erosion.
    min_voxels : int, default 10
        Rows with fewer (eroded, finite, in-mask) voxels are KEPT with their
        ``n_voxels`` and NaN statistics, so every subject has the same rows.
    mask : bool array, optional
        Voxels outside are treated as background *before* erosion, so ROIs are also
        eroded away from the mask edge.
    atlas_name : str
        Written to the ``atlas`` column.

    Returns
    -------
    pandas.DataFrame
        Columns ``atlas, roi, hemisphere, level, label, name, n_voxels, mean_ppm,
        median_ppm, std_ppm, iqr_ppm``. ``level == "label"``: one row per table label
        (``roi`` is its group, possibly ``""``). ``level == "group"``: one row per
        (group, hemisphere present among its labels: ``"L"``, ``"R"``, ``""`` for
        midline labels) and one bilateral row with hemisphere ``"B"`` pooling all voxels
        of the group; ``label = -1`` and ``name = roi``. Groups are unions of the eroded
        labels. ``std_ppm`` is the sample standard deviation (ddof=1), ``iqr_ppm`` the
        75th minus 25th percentile (linear interpolation).
    """
    values = np.asarray(values)
    labels = np.asarray(labels)
    if values.ndim != 3:
        raise ValueError(f"values must be 3-D, got shape {values.shape}")
    if labels.shape != values.shape:
        raise ValueError(f"labels shape {labels.shape} differs from values shape {values.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
    if not isinstance(min_voxels, (int, np.integer)) or min_voxels < 0:
        raise ValueError(f"min_voxels must be an integer >= 0, got {min_voxels!r}")
    if not np.isfinite(erode_mm) or erode_mm < 0:
        raise ValueError(f"erode_mm must be a finite number >= 0, got {erode_mm!r}")
    table = _check_table(label_table)
    work = labels
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != values.shape:
            raise ValueError(f"mask shape {mask.shape} differs from values shape {values.shape}")
        work = np.where(mask.astype(bool), labels, 0).astype(labels.dtype, copy=False)
    eroded = erode_labels(work, voxel_size_mm=voxel_size_mm, radius_mm=erode_mm)

    vals = np.asarray(values, dtype=np.float64).ravel()
    lab = eroded.ravel()
    sel = (lab > 0) & np.isfinite(vals)
    lab, vals = lab[sel], vals[sel]
    order = np.argsort(lab, kind="stable")
    lab, vals = lab[order], vals[order]
    idx = table["index"].to_numpy()
    starts = np.searchsorted(lab, idx, side="left")
    stops = np.searchsorted(lab, idx, side="right")
    seg = {int(i): vals[a:b] for i, a, b in zip(idx, starts, stops)}

    rows = []
    for r in table.itertuples(index=False):
        rows.append((atlas_name, r.roi, r.hemisphere, "label", int(r.index), str(r.name),
                     *_stats(seg[int(r.index)], min_voxels)))
    grouped = table[table["roi"] != ""]
    for roi, g in grouped.groupby("roi", sort=True):
        hemis = sorted(set(g["hemisphere"]), key=_HEMI_ORDER.get)
        for h in [*hemis, "B"]:
            members = g["index"] if h == "B" else g.loc[g["hemisphere"] == h, "index"]
            v = np.concatenate([seg[int(i)] for i in members])
            rows.append((atlas_name, roi, h, "group", -1, roi, *_stats(v, min_voxels)))
    out = pd.DataFrame(rows, columns=ROI_COLUMNS)
    out["label"] = out["label"].astype(np.int64)
    out["n_voxels"] = out["n_voxels"].astype(np.int64)
    return out


def _keys(table: pd.DataFrame) -> list[str]:
    return [k for k in SUBJECT_KEYS if k in table.columns]


def hemisphere_average(table: pd.DataFrame, *, statistic: str = "median_ppm",
                       require_both: bool = True) -> pd.DataFrame:
    """Average of the left and right group values (the study's "median averaged
    across hemispheres").

    Parameters
    ----------
    table : pandas.DataFrame
        Output of ``roi_statistics``, possibly many subjects concatenated with any of
        the columns ``participant_id, session_id, measure, atlas``.
    statistic : str, default "median_ppm"
        One of ``STAT_COLUMNS``.
    require_both : bool, default True
        When a hemisphere's value is NaN or missing the average is NaN; with False the
        available hemisphere is used.

    Returns
    -------
    pandas.DataFrame
        The identification columns present, ``roi``, ``<statistic>`` and
        ``n_hemispheres`` (hemispheres that contributed), one row per group with both
        an ``L`` and/or ``R`` row.
    """
    if statistic not in STAT_COLUMNS:
        raise ValueError(f"statistic must be one of {STAT_COLUMNS}, got {statistic!r}")
    g = table[(table["level"] == "group") & table["hemisphere"].isin(["L", "R"])]
    keys = [*_keys(table), "roi"]
    wide = g.pivot_table(index=keys, columns="hemisphere", values=statistic,
                         aggfunc="first", dropna=False)
    wide = wide.reindex(columns=["L", "R"])
    n = wide.notna().sum(axis=1)
    avg = wide.mean(axis=1, skipna=not require_both)
    out = pd.DataFrame({statistic: avg, "n_hemispheres": n.astype(np.int64)}).reset_index()
    return out


def smooth_gaussian(values: np.ndarray, *, voxel_size_mm, fwhm_mm: float = 3.0,
                    mask: np.ndarray | None = None) -> np.ndarray:
    """Gaussian smoothing with a kernel given by its FWHM in mm.

    Parameters
    ----------
    values : float array (x, y, z). Non-finite voxels are treated as outside the mask.
    voxel_size_mm : 3 floats.
    fwhm_mm : float > 0, default 3.0
        Full width at half maximum; sigma = fwhm / (2 sqrt(2 ln 2)) per axis in mm.
    mask : bool array, optional
        Mask-aware smoothing (normalised convolution): only voxels inside the mask
        contribute, ``out = G*(values*mask) / G*mask`` inside the mask and 0 outside, so a
        constant map stays constant up to the mask edge instead of being dimmed by the
        zeros outside the brain.

    Returns
    -------
    float32 array of the same shape (the input is not modified).
    """
    vals = np.asarray(values, dtype=np.float64)
    if vals.ndim != 3:
        raise ValueError(f"values must be 3-D, got shape {vals.shape}")
    vs = _voxel_size(voxel_size_mm)
    if not np.isfinite(fwhm_mm) or fwhm_mm <= 0:
        raise ValueError(f"fwhm_mm must be a positive number, got {fwhm_mm!r}")
    sigma_vox = fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / vs
    finite = np.isfinite(vals)
    if mask is None and finite.all():
        return ndimage.gaussian_filter(vals, sigma_vox, mode="constant").astype(np.float32)
    m = finite if mask is None else (np.asarray(mask, dtype=bool) & finite)
    if m.shape != vals.shape:
        raise ValueError(f"mask shape {m.shape} differs from values shape {vals.shape}")
    num = ndimage.gaussian_filter(np.where(m, vals, 0.0), sigma_vox, mode="constant")
    den = ndimage.gaussian_filter(m.astype(np.float64), sigma_vox, mode="constant")
    out = np.zeros_like(vals)
    ok = m & (den > 1e-6)
    out[ok] = num[ok] / den[ok]
    return out.astype(np.float32)


def postmortem_iron_validation(roi_table: pd.DataFrame, *, statistic: str = "mean_ppm",
                               hemisphere: str = "B", participants=None,
                               reference: pd.DataFrame | None = None) -> dict:
    """Regress control ROI susceptibility on post-mortem brain iron.

    Per ROI group, the subject values (``statistic`` of the ``level == "group"`` rows of
    ``hemisphere``) are averaged over subjects and regressed (ordinary least squares) on
    the non-haem iron of Hallgren & Sourander (1958); a slope near 1 ppm per
    ~1 mg Fe/g wet tissue magnitude and a high correlation indicate plausible maps.

    Parameters
    ----------
    roi_table : pandas.DataFrame
        ``roi_statistics`` output, one subject or many (``participant_id`` column).
    statistic : str, default "mean_ppm"
    hemisphere : str, default "B" (bilateral group rows)
    participants : sequence of str, optional
        Only these ``participant_id`` values (e.g. the controls).
    reference : pandas.DataFrame, optional
        Columns ``roi``, ``iron_mg_per_100g``; default
        ``qsmdask.atlas.load_iron_reference()``.

    Returns
    -------
    dict with ``r``, ``p`` (two-sided, Pearson), ``slope`` (ppm per mg/100 g),
    ``intercept`` (ppm), ``n`` (ROIs), ``table`` (roi, iron_mg_per_100g, chi_ppm,
    n_subjects). With fewer than 3 ROIs r, p, slope and intercept are NaN.

    References
    ----------
    Hallgren B., Sourander P. J Neurochem 1958;3:41-51.
    """
    if statistic not in STAT_COLUMNS:
        raise ValueError(f"statistic must be one of {STAT_COLUMNS}, got {statistic!r}")
    if reference is None:
        from qsmdask.atlas import load_iron_reference

        reference = load_iron_reference()
    missing = [c for c in ("roi", "iron_mg_per_100g") if c not in reference.columns]
    if missing:
        raise ValueError(f"reference is missing columns {missing}")
    t = roi_table[(roi_table["level"] == "group") & (roi_table["hemisphere"] == hemisphere)]
    if participants is not None:
        if "participant_id" not in t.columns:
            raise ValueError("participants given but roi_table has no participant_id column")
        t = t[t["participant_id"].isin(list(participants))]
    t = t[np.isfinite(t[statistic].to_numpy(dtype=float))]
    per_roi = t.groupby("roi")[statistic].agg(["mean", "size"]).rename(
        columns={"mean": "chi_ppm", "size": "n_subjects"}).reset_index()
    ref = reference[reference["roi"].astype(str) != ""][["roi", "iron_mg_per_100g"]]
    table = ref.merge(per_roi, on="roi", how="inner").sort_values("iron_mg_per_100g",
                                                                   ascending=False)
    table = table.reset_index(drop=True)
    n = len(table)
    if n < 3:
        r = p = slope = intercept = float("nan")
    else:
        fit = stats.linregress(table["iron_mg_per_100g"].to_numpy(float),
                               table["chi_ppm"].to_numpy(float))
        r, p, slope, intercept = (float(fit.rvalue), float(fit.pvalue), float(fit.slope),
                                  float(fit.intercept))
    return {"r": r, "p": p, "slope": slope, "intercept": intercept, "n": n, "table": table}
