"""Spatial standardisation of a subject's GRE data to a template (MNI152 by default)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qsmdask.registration._ants import check_affine
from qsmdask.registration.register import register
from qsmdask.registration.transform import Transform, apply_transform, compose

METHODS = ("affine", "syn")
FORMAT = "qsmdask-normalisation-1"


@dataclass
class SpatialNormalisation:
    """Native (GRE) space <-> template space mapping from ``standardise``.

    Attributes
    ----------
    native_to_template : Transform
        Composite native -> template transform (GRE -> T1w -> template when a T1w was
        used), so ``to_template`` interpolates once.
    native_shape, native_affine : grid of the GRE data.
    template_shape, template_affine : grid of the template.
    method : "affine" or "syn".
    """

    native_to_template: Transform
    native_shape: tuple[int, int, int]
    native_affine: np.ndarray
    template_shape: tuple[int, int, int]
    template_affine: np.ndarray
    method: str

    def to_template(self, native_array, interpolation: str = "linear"
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Resample a native-space map (e.g. chi_ppm) onto the template grid.

        Returns ``(array, template_affine)``. Voxels outside the native field of view are 0.
        """
        arr = np.asarray(native_array)
        if arr.shape != tuple(self.native_shape):
            raise ValueError(f"native_array shape {arr.shape} differs from the native grid "
                             f"{tuple(self.native_shape)}")
        out = apply_transform(arr, self.native_affine, self.native_to_template,
                              self.template_shape, self.template_affine,
                              interpolation=interpolation)
        return out, self.template_affine.copy()

    def labels_to_native(self, atlas_labels, atlas_affine, native_shape=None,
                         native_affine=None, *, interpolation: str = "nearest") -> np.ndarray:
        """Bring template-space (MNI) atlas labels to the native grid (inverse transform).
        The atlas may be on any grid in template space. ``interpolation`` is "nearest"
        (default) or "label" (ANTs genericLabel, per-label linear interpolation: in the
        registration benchmark ~10x slower with the 116 AAL labels for +0.003 Dice).

        Returns an integer array of ``native_shape`` (default: the GRE grid).
        """
        lab = np.asarray(atlas_labels)
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"atlas_labels must have an integer dtype, got {lab.dtype}")
        shape = tuple(self.native_shape) if native_shape is None else tuple(native_shape)
        aff = self.native_affine if native_affine is None else native_affine
        if interpolation not in ("label", "nearest"):
            raise ValueError(f"interpolation must be 'label' or 'nearest', got {interpolation!r}")
        out = apply_transform(lab.astype(np.int32), atlas_affine, self.native_to_template,
                              shape, aff, interpolation=interpolation, inverse=True)
        return out.astype(np.int32)

    def save(self, folder) -> list[Path]:
        """Write the transform files and ``normalisation.json`` (grids, method)."""
        from qsmdask.io.nifti import atomic_write_json

        folder = Path(folder)
        written = self.native_to_template.save(folder / "native_to_template")
        doc = {"format": FORMAT, "method": self.method,
               "native_shape": list(self.native_shape),
               "native_affine": np.asarray(self.native_affine).tolist(),
               "template_shape": list(self.template_shape),
               "template_affine": np.asarray(self.template_affine).tolist()}
        written.append(Path(atomic_write_json(folder / "normalisation.json", doc)))
        return written

    @classmethod
    def load(cls, folder) -> SpatialNormalisation:
        from qsmdask.io.nifti import InputError

        folder = Path(folder)
        jpath = folder / "normalisation.json"
        if not jpath.is_file():
            raise InputError(jpath, "normalisation description not found")
        doc = json.loads(jpath.read_text())
        if doc.get("format") != FORMAT:
            raise InputError(jpath, f"unknown format {doc.get('format')!r}")
        return cls(native_to_template=Transform.load(folder / "native_to_template"),
                   native_shape=tuple(doc["native_shape"]),
                   native_affine=np.asarray(doc["native_affine"]),
                   template_shape=tuple(doc["template_shape"]),
                   template_affine=np.asarray(doc["template_affine"]), method=doc["method"])


def _as_3d(image, name):
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 4:  # echoes: root-sum-of-squares combination
        a = np.sqrt(np.sum(a.astype(np.float64) ** 2, axis=3)).astype(np.float32)
    if a.ndim != 3:
        raise ValueError(f"{name} must be 3-D (or 4-D with echoes last), got shape {a.shape}")
    return a


def standardise(magnitude, magnitude_affine, *, t1w=None, t1w_affine=None, template=None,
                template_affine=None, method: str = "affine", magnitude_mask=None,
                t1w_mask=None, seed: int | None = 1, quick: bool = False,
                registration_mm: float | None = 2.0) -> SpatialNormalisation:
    """Estimate the native GRE -> template mapping.

    Parameters
    ----------
    magnitude : 3-D array, or 4-D (x, y, z, echo) combined by root-sum-of-squares.
    magnitude_affine : 4x4 NIfTI affine of the GRE data.
    t1w, t1w_affine : optional T1-weighted image of the same session. With it:
        GRE magnitude -> T1w rigid (mutual information), T1w -> template with
        ``method``; without it: magnitude -> template directly with ``method``
        (mutual information).
    template, template_affine : fixed image; default the nilearn MNI152 2009a T1
        (skull-stripped) at 2 mm (pass ``load_template(1)`` with ``registration_mm=None``
        for a full-resolution SyN).
    method : {"affine", "syn"}
        ``"syn"`` = affine then SyN (ANTs "SyN").
    magnitude_mask, t1w_mask : bool arrays, optional
        Brain masks; images are multiplied by them before registration (the default
        template is skull-stripped, so masking improves robustness). Without
        ``t1w_mask`` the magnitude mask, carried to the T1w by the rigid GRE -> T1w
        transform, strips the T1w.
    seed : int >= 1 or None, default 1
        Passed to every ``register`` call (reproducible with one ITK thread; see there).
    quick : bool
        ANTs' quick presets (the demo fast path: ``method="affine", quick=True``
        with the 2 mm template takes a few seconds).
    registration_mm : float or None, default 2.0
        Every stage registers copies of the images smoothed and resampled to this voxel
        size where finer (``register(resample_mm=...)``); the transforms are physical
        and apply to full-resolution data. None registers at the images' resolution.

    Returns
    -------
    SpatialNormalisation
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    mag = _as_3d(magnitude, "magnitude")
    check_affine(magnitude_affine, "magnitude_affine")
    if magnitude_mask is not None:
        mm = np.asarray(magnitude_mask, dtype=bool)
        if mm.shape != mag.shape:
            raise ValueError(f"magnitude_mask shape {mm.shape} differs from {mag.shape}")
        mag = mag * mm
    if (template is None) != (template_affine is None):
        raise ValueError("template and template_affine must be given together")
    if template is None:
        from qsmdask.atlas import load_template

        template, template_affine = load_template(2)
    tmpl = _as_3d(template, "template")
    check_affine(template_affine, "template_affine")
    if t1w is None:
        if t1w_affine is not None or t1w_mask is not None:
            raise ValueError("t1w_affine/t1w_mask given without t1w")
        native_to_template = register(mag, magnitude_affine, tmpl, template_affine,
                                      transform=method, seed=seed, metric="mi", quick=quick,
                                      resample_mm=registration_mm)
    else:
        if t1w_affine is None:
            raise ValueError("t1w_affine is required with t1w")
        t1 = _as_3d(t1w, "t1w")
        check_affine(t1w_affine, "t1w_affine")
        gre_to_t1 = register(mag, magnitude_affine, t1, t1w_affine, transform="rigid",
                             seed=seed, metric="mi", quick=quick, resample_mm=registration_mm)
        if t1w_mask is None and magnitude_mask is not None:
            # skull-strip the T1w with the GRE brain mask carried over by the rigid transform
            t1w_mask = apply_transform(np.asarray(magnitude_mask, dtype=np.uint8),
                                       magnitude_affine, gre_to_t1, t1.shape, t1w_affine,
                                       interpolation="nearest") > 0
        if t1w_mask is not None:
            tm = np.asarray(t1w_mask, dtype=bool)
            if tm.shape != t1.shape:
                raise ValueError(f"t1w_mask shape {tm.shape} differs from {t1.shape}")
            t1 = t1 * tm
        t1_to_template = register(t1, t1w_affine, tmpl, template_affine, transform=method,
                                  seed=seed, metric="mi", quick=quick,
                                  resample_mm=registration_mm)
        native_to_template = compose(gre_to_t1, t1_to_template)
    return SpatialNormalisation(native_to_template=native_to_template,
                                native_shape=tuple(int(s) for s in mag.shape),
                                native_affine=np.asarray(magnitude_affine, dtype=np.float64),
                                template_shape=tuple(int(s) for s in tmpl.shape),
                                template_affine=np.asarray(template_affine, dtype=np.float64),
                                method=method)
