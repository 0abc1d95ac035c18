"""Image registration with ANTs (antspyx): arrays and NIfTI affines in, Transform out."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading

import numpy as np

from qsmdask.registration._ants import check_affine, to_ants
from qsmdask.registration.transform import Transform

TRANSFORMS = ("rigid", "affine", "syn")
_ANTS_TYPE = {("rigid", False): "Rigid", ("rigid", True): "QuickRigid",
              ("affine", False): "Affine", ("affine", True): "AffineFast",
              ("syn", False): "SyN", ("syn", True): "SyN"}
_SEED_LOCK = threading.Lock()
ITK_THREADS_VAR = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
log = logging.getLogger(__name__)
_warned = False


def _check_single_thread():
    """Warn once per process when ITK may run several threads (results then vary run to run)."""
    global _warned
    if os.environ.get(ITK_THREADS_VAR) != "1" and not _warned:
        _warned = True
        log.warning("%s is %r, not '1': ANTs registration is then not reproducible from one run to "
                    "the next; set it to 1 before ANTs is first used in the process",
                    ITK_THREADS_VAR, os.environ.get(ITK_THREADS_VAR))


def _validate_image(arr, affine, name):
    a = np.asarray(arr)
    if a.ndim != 3:
        raise ValueError(f"{name} must be a 3-D array, got shape {a.shape}")
    if min(a.shape) < 4:
        raise ValueError(f"{name} is too small for registration: shape {a.shape}")
    check_affine(affine, f"{name}_affine")
    return a


def _coarsen(img, resample_mm, mask: bool = False):
    """Smooth and resample an ANTs image to isotropic ``resample_mm`` voxels if finer."""
    import ants

    if resample_mm is None or min(img.spacing) >= resample_mm * 0.999:
        return img
    spacing = tuple(max(float(s), float(resample_mm)) for s in img.spacing)
    if not mask:
        img = ants.smooth_image(img, 0.4 * float(resample_mm), sigma_in_physical_coordinates=True)
    # interp_type: 0 linear (images), 1 nearest neighbour (masks)
    return ants.resample_image(img, spacing, use_voxels=False, interp_type=1 if mask else 0)


def register(moving, moving_affine, fixed, fixed_affine, *, transform: str = "rigid",
             seed: int | None = 1, metric: str = "mattes", moving_mask=None, fixed_mask=None,
             quick: bool = False, syn_iterations: tuple[int, ...] = (40, 20, 0),
             resample_mm: float | None = None) -> Transform:
    """Estimate the transform that maps ``moving`` onto ``fixed`` (ANTs).

    Parameters
    ----------
    moving, fixed : 3-D arrays (x, y, z) with their 4x4 NIfTI (RAS) affines. The
        arrays are converted to ANTs images in LPS physical space (see
        ``qsmdask.registration._ants``); the images' world positions initialise the
        registration together with a centre-of-mass alignment.
    transform : {"rigid", "affine", "syn"}
        ``"syn"`` is affine followed by symmetric normalisation (ANTs "SyN").
    seed : int >= 1 or None, default 1
        Seed of ANTs' metric sampling (``--random-seed``; the linear stages sample 20 %
        of the voxels on a regular grid with a random jitter). ANTs reads 0 as "seed
        from the clock", so 0 is refused; None explicitly asks for a clock seed (results
        then differ between processes). With a seed and one ITK thread
        (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1`` set before ANTs first runs in the
        process, e.g. in the Dask worker's environment) the transform is bit-identical
        across processes and reruns; with several threads it can differ between runs.
    metric : {"mattes", "mi", "cc", "meansquares"}
        Similarity metric of the linear stages (mutual information variants suit
        different contrasts, e.g. GRE magnitude vs T1w).
    moving_mask, fixed_mask : bool arrays, optional
        Restrict the metric to these voxels.
    quick : bool
        Fewer iterations ("QuickRigid", "AffineFast"; SyN with ``syn_iterations``).
    syn_iterations : tuple of int
        Iterations per SyN resolution level.
    resample_mm : float, optional
        Register copies of both images smoothed (Gaussian, sigma = 0.4 * resample_mm)
        and resampled to isotropic voxels of this size where they are finer, e.g. 2.0
        to register a 1 mm T1w several times faster. The transform lives in physical
        space, so it applies to the full-resolution images unchanged.

    Returns
    -------
    Transform
        moving -> fixed; ``meta`` records the type, seed and the two grids.

    References
    ----------
    Avants B.B. et al., A reproducible evaluation of ANTs similarity metric performance
    in brain image registration. NeuroImage 2011;54:2033-2044.
    """
    import ants

    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    metrics = {"mattes": "mattes", "mi": "mattes", "cc": "CC", "meansquares": "meansquares"}
    if metric not in metrics:
        raise ValueError(f"metric must be one of {sorted(metrics)}, got {metric!r}")
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool)
                             or not 1 <= seed < 2**31):
        raise ValueError(f"seed must be an integer in [1, 2**31) (ANTs reads 0 as 'seed from the "
                         f"clock') or None, got {seed!r}")
    _check_single_thread()
    mov = _validate_image(moving, moving_affine, "moving")
    fix = _validate_image(fixed, fixed_affine, "fixed")
    if resample_mm is not None and (not np.isfinite(resample_mm) or resample_mm <= 0):
        raise ValueError(f"resample_mm must be a positive number, got {resample_mm!r}")
    m_img = _coarsen(to_ants(mov, moving_affine, "moving"), resample_mm)
    f_img = _coarsen(to_ants(fix, fixed_affine, "fixed"), resample_mm)
    kwargs = {}
    if fixed_mask is not None:
        fm = np.asarray(fixed_mask)
        if fm.shape != fix.shape:
            raise ValueError(f"fixed_mask shape {fm.shape} differs from fixed {fix.shape}")
        kwargs["mask"] = _coarsen(to_ants(fm.astype(np.float32), fixed_affine, "fixed_mask"),
                                  resample_mm, mask=True)
    if moving_mask is not None:
        mm = np.asarray(moving_mask)
        if mm.shape != mov.shape:
            raise ValueError(f"moving_mask shape {mm.shape} differs from moving {mov.shape}")
        kwargs["moving_mask"] = _coarsen(
            to_ants(mm.astype(np.float32), moving_affine, "moving_mask"), resample_mm, mask=True)
    ants_type = _ANTS_TYPE[(transform, bool(quick))]
    tmp = tempfile.mkdtemp(prefix="qsmdask-reg-")
    try:
        with _SEED_LOCK:
            old = ants.config._random_seed
            ants.config._random_seed = None if seed is None else int(seed)
            try:
                res = ants.registration(
                    fixed=f_img, moving=m_img, type_of_transform=ants_type,
                    outprefix=os.path.join(tmp, "reg_"), aff_metric=metrics[metric],
                    syn_metric="mattes" if metric in ("mattes", "mi") else metrics[metric],
                    reg_iterations=tuple(syn_iterations), verbose=False, **kwargs)
            finally:
                ants.config._random_seed = old
        meta = {"transform": transform, "ants_type": ants_type, "seed": seed, "metric": metric,
                "itk_threads": os.environ.get(ITK_THREADS_VAR, "default"),
                "resample_mm": resample_mm, "moving_shape": list(mov.shape),
                "moving_affine": np.asarray(moving_affine, float).tolist(),
                "fixed_shape": list(fix.shape),
                "fixed_affine": np.asarray(fixed_affine, float).tolist(),
                "antspyx": getattr(ants, "__version__", "?")}
        return Transform.from_ants_files(list(res["fwdtransforms"]), list(res["invtransforms"]),
                                         meta=meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
