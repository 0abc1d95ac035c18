"""Registration and spatial standardisation with ANTs (antspyx).

Arrays plus 4x4 NIfTI (RAS) affines in; ``Transform`` objects and resampled arrays out.
ANTs works in LPS physical space; the conversion is done once in
``qsmdask.registration._ants`` and tested with known shifts and rotations.

Typical use in a participant workflow::

    from qsmdask.atlas import load_atlas
    from qsmdask.registration import standardise
    from qsmdask.roi import roi_statistics

    atlas = load_atlas("aal")
    norm = standardise(magnitude, affine, t1w=t1w, t1w_affine=t1w_affine,
                       magnitude_mask=mask, method="affine")   # or "syn"
    labels = norm.labels_to_native(atlas.labels, atlas.affine)
    table = roi_statistics(chi_ppm, labels, atlas.table, voxel_size_mm=voxel_size_mm,
                           mask=mask, atlas_name=atlas.name)
    chi_mni, mni_affine = norm.to_template(chi_ppm)
    norm.save(out_dir / "xfm")

Reproducibility: for a given ``seed`` (>= 1; ANTs reads 0 as a clock seed) the transforms
and everything resampled with them are bit-identical across processes and reruns only
with one ITK thread: set ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1`` in the environment of
the process (e.g. the Dask worker) before ANTs first runs; Dask then provides the
parallelism. ``register`` logs a warning once when the variable is not 1.
"""

from qsmdask.registration.register import TRANSFORMS, register
from qsmdask.registration.standardise import METHODS, SpatialNormalisation, standardise
from qsmdask.registration.transform import Transform, apply_transform, compose

__all__ = ["METHODS", "SpatialNormalisation", "standardise", "TRANSFORMS", "Transform", "apply_transform", "compose", "register"]
