"""Dask fan-out of the permutation test: permutation batches as tasks.

The reduced-model residuals (m x V float32) are computed once on the client
from the stacked zarr array and broadcast to the workers; each task runs a
deterministic batch (seeded by ``(seed, batch_index)``), so the result does
not depend on the number of workers or on task placement.
"""

from __future__ import annotations

import numpy as np

from qsmdask.perm.glm import Design
from qsmdask.perm.permute import (NullAccumulator, PermutationOptions, PermutationResult, batch_sizes,
                                  finalize, null_batches, prepare_model,
                                  product_group_batches)

__all__ = ["permutation_test_dask"]


def _run_batches(prepared, options, jobs):
    """Run consecutive batches on one thread (Dask owns the parallelism); return their
    maxima (concatenated) and summed counts."""
    return null_batches(prepared, options, jobs, n_threads=1)


def _load(data):
    """numpy (n, V) float32 from a numpy/zarr/dask array or a zarr stack path."""
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        from qsmdask.perm.stack import open_stack
        arr, _, _ = open_stack(data)
        return np.asarray(arr[...], dtype=np.float32)
    if hasattr(data, "compute"):
        return np.asarray(data.compute(), dtype=np.float32)
    return np.asarray(data[...], dtype=np.float32)


def permutation_test_dask(data, design: Design, *, mask=None, client=None, n_perm: int = 5000,
                          seed: int = 0, two_sided: bool = True, inference=("voxel",),
                          cluster_p: float = 0.005, min_cluster_voxels: int = 10,
                          connectivity: int = 6, tfce_E: float = 0.5, tfce_H: float = 2.0,
                          tfce_dh="auto", batch_size: int = 32, batches_per_task: int = 4,
                          affine=None, atlas=None, atlas_names=None) -> PermutationResult:
    """Permutation test distributed over a Dask cluster (same result as ``permutation_test``).

    Parameters
    ----------
    data : zarr array / dask array / ndarray (n_subjects, n_voxels), or the path of a
        stack written by :func:`qsmdask.perm.stack.stack_maps_to_zarr` (then ``mask``
        and ``affine`` default to the stored ones)
    design : Design
    mask : 3-D bool array (``n_voxels`` True voxels)
    client : ``distributed.Client``; None uses the current client if any, else the
        local threaded scheduler
    batches_per_task : permutation batches per Dask task (task granularity only;
        results are identical for any value; voxel-only inference rounds it up to whole
        product groups, :func:`qsmdask.perm.permute.product_group_batches`)
    other parameters : as :func:`qsmdask.perm.permute.permutation_test`

    Returns
    -------
    PermutationResult
    """
    if int(batches_per_task) != batches_per_task or batches_per_task < 1:
        raise ValueError(f"batches_per_task must be a positive integer, got {batches_per_task!r}")
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        from qsmdask.perm.stack import open_stack
        _, stored_mask, stored_affine = open_stack(data)
        mask = stored_mask if mask is None else mask
        affine = stored_affine if affine is None else affine
    if mask is None:
        raise ValueError("mask is required unless data is a zarr stack path")
    options = PermutationOptions(n_perm=n_perm, seed=seed, batch_size=batch_size, two_sided=two_sided,
                                 inference=inference, cluster_p=cluster_p,
                                 min_cluster_voxels=min_cluster_voxels, connectivity=connectivity,
                                 tfce_E=tfce_E, tfce_H=tfce_H, tfce_dh=tfce_dh)
    y = _load(data)
    prepared = prepare_model(y, design, mask=mask, options=options)
    del y
    jobs = list(enumerate(batch_sizes(options.n_perm, options.batch_size)))
    if options.inference == ("voxel",):
        # whole product groups per task, so every permutation goes through the same product
        per = product_group_batches(options.batch_size)
        batches_per_task = -(-int(batches_per_task) // per) * per
    groups = [jobs[i:i + batches_per_task] for i in range(0, len(jobs), batches_per_task)]
    if client is None:
        try:
            from distributed import get_client
            client = get_client()
        except (ImportError, ValueError):
            client = None
    acc = NullAccumulator()
    if client is not None:
        from distributed import as_completed
        prep_f = client.scatter(prepared, broadcast=True)
        futures = [client.submit(_run_batches, prep_f, options, g, pure=False) for g in groups]
        index = {f.key: k for k, f in enumerate(futures)}
        for fut in as_completed(futures):  # reduce as results arrive: memory O(V + n_perm)
            acc.add(index[fut.key], fut.result())
            fut.release()
    else:
        import dask
        tasks = [dask.delayed(_run_batches)(prepared, options, g) for g in groups]
        for k, part in enumerate(dask.compute(*tasks, scheduler="threads")):
            acc.add(k, part)
    return finalize(prepared, options, acc.result(), mask=mask, affine=affine,
                    atlas=atlas, atlas_names=atlas_names)
