"""Quality-control figure and numbers of one reconstructed subject-session.

:func:`qc_figure` draws orthogonal slices through the brain-mask centroid of the magnitude
(with the mask outline), the unwrapped total field, the local field and the susceptibility
map (fixed window, with atlas label outlines when labels are given), in millimetre
coordinates so anisotropic voxels keep their true aspect. It returns PNG bytes, so a
workflow can store it with the derivatives writer
(``writer.save_bytes(sub, ses, "qc", png, ext=".png", desc="recon")``).

:func:`qc_numbers` adds what ``ReconResult.qc`` (mask volume, field percentiles and range,
echo-fit residual, local-field spread, chi percentiles, timings) does not carry: the
mask's extent and centroid, the fraction of brain voxels outside the display window
(streaking or a wrong sign convention shows here), and the atlas coverage of the mask
(a failed registration shows here).
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from scipy import ndimage

from ..kernels import check_voxel_size

__all__ = ["CHI_WINDOW_PPM", "OUTSIDE_MASK_COLOUR", "qc_figure", "qc_figure_object", "qc_numbers", "view_directions"]

#: Display window of susceptibility maps (ppm): deep grey matter iron stays in range.
CHI_WINDOW_PPM = (-0.15, 0.25)
#: Colour of voxels outside the brain mask in the field and susceptibility rows: in neither
#: the grey nor the red-blue scale, so "outside" never reads as "0 ppm".
OUTSIDE_MASK_COLOUR = "#6a3d9a"
#: Margin around the brain mask of the common field of view (mm).
FOV_MARGIN_MM = 6.0

_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}

_VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def _volume(x, name: str, shape=None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 4 and name == "magnitude":
        a = a[..., 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must be a 3-D (x, y, z) array, got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape} like magnitude")
    return a


def mask_centroid(mask: np.ndarray) -> tuple[int, int, int]:
    """Voxel index of the centroid of ``mask`` (halves round up; the volume centre when empty)."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return tuple(int(s // 2) for s in m.shape)
    c = ndimage.center_of_mass(m)
    return tuple(int(np.clip(np.floor(v + 0.5), 0, s - 1)) for v, s in zip(c, m.shape))


def _slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2-D slice, transposed so rows are the second remaining axis (shown bottom-up)."""
    return np.take(vol, index, axis=axis).T


def _extent(shape, vs, axis):
    a, b = [i for i in range(3) if i != axis]
    return (0.0, shape[a] * vs[a], 0.0, shape[b] * vs[b])


def _boundaries(labels2d: np.ndarray) -> np.ndarray:
    """Label image with only the voxels on a label's border kept (0 elsewhere)."""
    lab = np.asarray(labels2d)
    edge = (ndimage.grey_dilation(lab, size=3) != ndimage.grey_erosion(lab, size=3)) & (lab > 0)
    return np.where(edge, lab, 0)


def view_directions(affine) -> tuple[str, str, str]:
    """Anatomical direction (R/L, A/P, S/I) in which each voxel axis of ``affine`` increases."""
    from nibabel.orientations import aff2axcodes
    return tuple(aff2axcodes(np.asarray(affine, dtype=float)))


def _fov(mask: np.ndarray, vs, axis: int, shape) -> tuple[tuple[float, float], tuple[float, float]]:
    """(x limits, y limits) in mm of a view: the mask's bounding box plus a margin, clipped."""
    a, b = [i for i in range(3) if i != axis]
    if not mask.any():
        return (0.0, shape[a] * vs[a]), (0.0, shape[b] * vs[b])
    idx = np.nonzero(mask)
    lims = []
    for k in (a, b):
        lo = max(0.0, idx[k].min() * vs[k] - FOV_MARGIN_MM)
        hi = min(shape[k] * vs[k], (idx[k].max() + 1) * vs[k] + FOV_MARGIN_MM)
        lims.append((lo, hi))
    return lims[0], lims[1]


def _symmetric_window(values: np.ndarray, pct: float = 99.0) -> float:
    v = np.abs(values[np.isfinite(values)])
    if v.size == 0:
        return 1.0
    w = float(np.percentile(v, pct))
    return w if w > 0 else 1.0


def qc_figure(magnitude, mask, field_ppm, local_field_ppm, chi_ppm, *, voxel_size_mm,
              labels=None, title: str = "", dpi: int = 100, affine=None) -> bytes:
    """Orthogonal-slice QC figure of one reconstruction, as PNG bytes.

    Rows: magnitude with the brain-mask outline (red); unwrapped total field (ppm, window
    +/- the 99th percentile of |field| in the mask); local field (ppm, likewise);
    susceptibility (ppm, fixed window :data:`CHI_WINDOW_PPM`) with thin atlas label
    outlines over it when ``labels`` is given. Voxels outside the mask are drawn in
    :data:`OUTSIDE_MASK_COLOUR` in the field and susceptibility rows. Columns: axial,
    coronal and sagittal slices through the mask centroid, every row with the same field
    of view (the mask's bounding box plus :data:`FOV_MARGIN_MM`). Slices are drawn in
    millimetres, so anisotropic voxels keep their aspect; images are shown in voxel-axis
    orientation (first axis to the right, second or third axis up), not re-oriented, and
    with ``affine`` every panel's edges carry the anatomical direction letters (L/R, A/P,
    S/I) so that left and right are never guessed.

    Parameters
    ----------
    magnitude : (x, y, z) or (x, y, z, echo) array
        Magnitude image (the first echo is shown when 4-D).
    mask : (x, y, z) array
        Brain mask (non-zero inside); its centroid chooses the slices.
    field_ppm, local_field_ppm, chi_ppm : (x, y, z) arrays
        Total field, background-removed field and susceptibility, in ppm.
    voxel_size_mm : 3 floats
        Voxel size in mm.
    labels : (x, y, z) int array or None
        Atlas labels in the same (native) space; their outlines are drawn over chi.
    title : str
        Figure title (e.g. ``"sub-01 ses-pre"``).
    dpi : int
        Resolution (the figure is 9 x 11.5 inches).
    affine : (4, 4) array or None
        Voxel-to-world (RAS+ mm) affine of the volumes; gives the direction letters.

    Returns
    -------
    bytes
        The PNG file.
    """
    fig = qc_figure_object(magnitude, mask, field_ppm, local_field_ppm, chi_ppm, voxel_size_mm=voxel_size_mm,
                           labels=labels, title=title, dpi=dpi, affine=affine)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=int(dpi))
    return buf.getvalue()


def qc_figure_object(magnitude, mask, field_ppm, local_field_ppm, chi_ppm, *, voxel_size_mm,
                     labels=None, title: str = "", dpi: int = 100, affine=None) -> Figure:
    """The matplotlib Figure of :func:`qc_figure` (same arguments)."""
    vs = check_voxel_size(voxel_size_mm)
    mag = _volume(magnitude, "magnitude")
    shape = mag.shape
    m = _volume(mask, "mask", shape).astype(bool)
    fld = _volume(field_ppm, "field_ppm", shape).astype(np.float32, copy=False)
    loc = _volume(local_field_ppm, "local_field_ppm", shape).astype(np.float32, copy=False)
    chi = _volume(chi_ppm, "chi_ppm", shape).astype(np.float32, copy=False)
    lab = None if labels is None else _volume(labels, "labels", shape).astype(np.int64)
    if int(dpi) < 20:
        raise ValueError(f"dpi must be >= 20, got {dpi!r}")
    centre = mask_centroid(m)
    dirs = view_directions(affine) if affine is not None else None

    inside = m if m.any() else np.ones(shape, dtype=bool)
    outside = ~inside
    fld = np.ma.masked_array(fld, mask=outside)
    loc = np.ma.masked_array(loc, mask=outside)
    chi = np.ma.masked_array(chi, mask=outside)
    mag_hi = float(np.percentile(mag[inside], 99.5)) or 1.0
    fw = _symmetric_window(np.asarray(fld)[inside])
    lw = _symmetric_window(np.asarray(loc)[inside])
    rows = [
        ("magnitude + mask", mag, "gray", Normalize(0.0, mag_hi), "a.u."),
        ("total field", fld, "RdBu_r", Normalize(-fw, fw), "ppm"),
        ("local field", loc, "RdBu_r", Normalize(-lw, lw), "ppm"),
        ("susceptibility" + (" + atlas" if lab is not None else ""), chi, "gray",
         Normalize(*CHI_WINDOW_PPM), "ppm"),
    ]

    # widths of the three views in mm decide the column ratios
    widths = [_extent(shape, vs, ax)[1] for _, ax in _VIEWS]
    fig = Figure(figsize=(9.0, 11.5), dpi=int(dpi))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(rows), 4, width_ratios=widths + [0.05 * sum(widths)],
                            wspace=0.08, hspace=0.18, left=0.08, right=0.93, top=0.93, bottom=0.03)
    from matplotlib import colormaps
    fovs = [_fov(inside, vs, ax_i, shape) for _, ax_i in _VIEWS]
    for r, (name, vol, cmap, norm, unit) in enumerate(rows):
        im = None
        cm = colormaps[cmap].with_extremes(bad=OUTSIDE_MASK_COLOUR)
        for c, (view, ax_i) in enumerate(_VIEWS):
            ax = fig.add_subplot(grid[r, c])
            ext = _extent(shape, vs, ax_i)
            im = ax.imshow(_slice(vol, ax_i, centre[ax_i]), cmap=cm, norm=norm, origin="lower",
                           extent=ext, interpolation="nearest", aspect="equal")
            if r == 0:
                sl = _slice(m, ax_i, centre[ax_i]).astype(float)
                if sl.any() and not sl.all():
                    ax.contour(sl, levels=[0.5], colors="red", linewidths=0.8, origin="lower",
                               extent=ext)
                ax.set_title(f"{view} ({'xyz'[ax_i]}={centre[ax_i]})", fontsize=9)
            if r == len(rows) - 1 and lab is not None:
                _label_outlines(ax, _slice(lab, ax_i, centre[ax_i]), ext)
            ax.set_xlim(*fovs[c][0])
            ax.set_ylim(*fovs[c][1])
            if dirs is not None:
                _direction_letters(ax, dirs, ax_i)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
        cax = fig.add_subplot(grid[r, 3])
        cb = fig.colorbar(im, cax=cax)
        cb.set_label(unit, fontsize=8)
        cb.ax.tick_params(labelsize=7)
    fig.suptitle(title or "QSM quality control", fontsize=11)
    from matplotlib.patches import Patch
    fig.legend(handles=[Patch(facecolor=OUTSIDE_MASK_COLOUR, label="outside the brain mask"),
                        Patch(facecolor="none", edgecolor="red", label="brain mask outline")],
               loc="upper right", fontsize=7, frameon=False, ncol=2, bbox_to_anchor=(0.97, 0.965))
    return fig


def _label_outlines(ax, lab2d: np.ndarray, ext) -> None:
    """Thin outlines of each atlas label (chi stays visible between and under them)."""
    ids = np.unique(lab2d[lab2d > 0])
    if ids.size == 0:
        return
    colours = _tab20()
    h, w = lab2d.shape
    xs = np.linspace(ext[0], ext[1], w, endpoint=False) + (ext[1] - ext[0]) / (2 * w)
    ys = np.linspace(ext[2], ext[3], h, endpoint=False) + (ext[3] - ext[2]) / (2 * h)
    for k, i in enumerate(ids):
        sl = (lab2d == i).astype(float)
        if sl.sum() < 2:
            continue
        ax.contour(xs, ys, sl, levels=[0.5], colors=[colours[k % 20]], linewidths=0.6, alpha=0.9)


def _direction_letters(ax, dirs, axis: int) -> None:
    """Anatomical letters at the panel edges: where each displayed voxel axis points."""
    a, b = [i for i in range(3) if i != axis]
    style = dict(fontsize=8, fontweight="bold", color="white", transform=ax.transAxes,
                 bbox=dict(boxstyle="round,pad=0.15", facecolor="black", alpha=0.6, linewidth=0))
    ax.text(0.99, 0.5, dirs[a], ha="right", va="center", **style)
    ax.text(0.01, 0.5, _OPPOSITE[dirs[a]], ha="left", va="center", **style)
    ax.text(0.5, 0.99, dirs[b], ha="center", va="top", **style)
    ax.text(0.5, 0.01, _OPPOSITE[dirs[b]], ha="center", va="bottom", **style)


def _tab20():
    from matplotlib import colormaps
    return [colormaps["tab20"](i)[:3] for i in range(20)]


def qc_numbers(mask, chi_ppm, *, voxel_size_mm, labels=None,
               chi_window_ppm: tuple[float, float] = CHI_WINDOW_PPM) -> dict[str, float]:
    """QC numbers that complement ``ReconResult.qc``.

    Parameters
    ----------
    mask : (x, y, z) array
        Brain (or final, eroded) mask.
    chi_ppm : (x, y, z) array
        Susceptibility in ppm.
    voxel_size_mm : 3 floats
        Voxel size in mm.
    labels : (x, y, z) int array or None
        Atlas labels in native space.
    chi_window_ppm : (low, high)
        Plausible susceptibility range of brain tissue.

    Returns
    -------
    dict of float
        ``mask_extent_{x,y,z}_mm`` (bounding box), ``mask_centroid_{x,y,z}`` (voxel index),
        ``chi_outside_window_fraction`` (fraction of mask voxels outside ``chi_window_ppm``),
        and with labels ``atlas_in_mask_fraction`` (labelled voxels inside the mask /
        labelled voxels) and ``atlas_labels_present`` (distinct labels inside the mask).
    """
    vs = check_voxel_size(voxel_size_mm)
    m = _volume(mask, "mask").astype(bool)
    chi = _volume(chi_ppm, "chi_ppm", m.shape)
    lo, hi = (float(v) for v in chi_window_ppm)
    if not lo < hi:
        raise ValueError(f"chi_window_ppm must be (low, high) with low < high, got {chi_window_ppm!r}")
    out: dict[str, float] = {}
    if m.any():
        idx = np.nonzero(m)
        for k, ax in enumerate("xyz"):
            out[f"mask_extent_{ax}_mm"] = float((idx[k].max() - idx[k].min() + 1) * vs[k])
        v = chi[m]
        out["chi_outside_window_fraction"] = float(np.mean((v < lo) | (v > hi)))
    else:
        for ax in "xyz":
            out[f"mask_extent_{ax}_mm"] = 0.0
        out["chi_outside_window_fraction"] = float("nan")
    for ax, c in zip("xyz", mask_centroid(m)):
        out[f"mask_centroid_{ax}"] = float(c)
    if labels is not None:
        lab = _volume(labels, "labels", m.shape).astype(np.int64)
        labelled = lab > 0
        n = int(labelled.sum())
        out["atlas_in_mask_fraction"] = float((labelled & m).sum() / n) if n else float("nan")
        out["atlas_labels_present"] = float(np.unique(lab[labelled & m]).size)
    return out
