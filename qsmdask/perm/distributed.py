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
                                  product_group_batches, resolve_scheme)

__all__ = ["permutation_test_dask", "permutation_test_stack", "stack_analysis_mask"]


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
                          affine=None, atlas=None, atlas_names=None,
                          scheme: str | None = None) -> PermutationResult:
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
                                 tfce_E=tfce_E, tfce_H=tfce_H, tfce_dh=tfce_dh,
                                 scheme=resolve_scheme(design, scheme))
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


# --------------------------------------------------------------------------------------------
# Out of core: the GLM and the permutations over voxel blocks of a cohort stack
# --------------------------------------------------------------------------------------------

def _stack_block(store, rows, c0, c1, keep):
    """(n_rows_selected, n_kept) float32 data of stack voxel columns c0:c1, ``keep`` (bool)."""
    import zarr
    root = zarr.open_group(store, mode="r")
    y = root["data"].get_orthogonal_selection((np.asarray(rows), slice(c0, c1)))
    if keep is not None and not np.all(keep):
        y = y[:, keep]
    return np.ascontiguousarray(y, dtype=np.float32)


def _coverage_task(store, rows, c0, c1):
    import zarr
    root = zarr.open_group(store, mode="r")
    return root["inside"].get_orthogonal_selection((np.asarray(rows), slice(c0, c1))).sum(axis=0, dtype=np.int64)


def _prepare_block(y, design, options):
    """:func:`qsmdask.perm.permute.prepare_model` of one voxel block without an n x n object.

    Freedman-Lane: ``prepare_model`` expresses the residuals in an orthonormal basis Q
    (n x (n - k)) of the complement of the nuisance space: n^2 float64 (800 MB at 10,000
    subjects, 9.8 GB at 35,000) and an O(n^2 k) decomposition in every task. Here
    ``R = (I - H_Z) Y`` (n x V) is used as is, which the kernel supports (same t; memory
    O(n V)). Huh-Jhun: the reduced-space data come from the k Householder reflectors of Z
    (O(n k V), the same Q as in memory), so the block is already (n - k) x V.
    """
    from scipy import linalg

    from qsmdask.perm.cluster import cluster_threshold_t
    from qsmdask.perm.permute import PreparedModel, _nuisance_and_basis, batch_t, huh_jhun_model
    scheme = resolve_scheme(design, options.scheme)
    if scheme == "huh_jhun":
        w, ss, x = huh_jhun_model(y, design)
        v = w.shape[1]
        prepared = PreparedModel(residuals=w, basis=x, ss=ss, dof=design.dof, design=design,
                                 coords=np.zeros((v, 3), np.int32), t_obs=np.zeros(0, np.float32),
                                 cluster_t=cluster_threshold_t(options.cluster_p, design.dof,
                                                               two_sided=options.two_sided),
                                 scheme=scheme)
        prepared.floor = (np.float32(1e-12) * ss + np.float32(1e-30)).astype(np.float32)
        prepared.t_obs = batch_t(prepared, np.arange(prepared.n_exchangeable)[None, :])[0]
        return prepared
    z, basis = _nuisance_and_basis(design)
    r = np.array(y, dtype=np.float64)
    if z.shape[1]:
        zq = linalg.orth(z)
        r -= zq @ (zq.T @ r)
    scale = np.sqrt(np.einsum("ij,ij->j", r, r))
    scale[scale == 0] = 1.0
    r /= scale
    r32 = np.ascontiguousarray(r, dtype=np.float32)
    del r
    ss = np.einsum("ij,ij->j", r32, r32, dtype=np.float64).astype(np.float32)
    v = r32.shape[1]
    prepared = PreparedModel(residuals=r32, basis=basis.astype(np.float32), ss=ss, dof=design.dof,
                             design=design, coords=np.zeros((v, 3), np.int32), t_obs=np.zeros(0, np.float32),
                             cluster_t=cluster_threshold_t(options.cluster_p, design.dof,
                                                           two_sided=options.two_sided),
                             complement=None, scheme=scheme)
    prepared.floor = (np.float32(1e-12) * ss + np.float32(1e-30)).astype(np.float32)
    ident = np.arange(design.n_subjects)[None, :]
    prepared.t_obs = batch_t(prepared, ident if not design.sign_flip else np.ones_like(ident, np.float32))[0]
    return prepared


def _voxel_block_task(store, rows, c0, c1, keep, design, options, glm_only, scratch, perm_block):
    """GLM and permutation nulls of one voxel block; returns t_obs, per-permutation maxima, counts.

    With cluster or TFCE inference the permuted t maps of the block are written to the
    ``scratch`` zarr array (n_perm, n_stack_voxels), columns ``c0:c1`` (zero where not kept),
    ``perm_block`` rows at a time: this task is the only writer of those chunks.
    """
    from dataclasses import replace
    from qsmdask.perm.permute import batch_t, random_permutations, tie_lowered_t
    y = _stack_block(store, rows, c0, c1, keep)
    v = y.shape[1]
    out = {"v": v}
    if v == 0:
        return out
    voxel_opts = replace(options, inference=("voxel",))
    prepared = _prepare_block(y, design, voxel_opts)
    del y
    out["t_obs"] = prepared.t_obs
    if glm_only:
        return out
    acc = NullAccumulator()
    sizes = batch_sizes(options.n_perm, options.batch_size)
    if scratch is None:  # canonical stacked products (qsmdask.perm.permute.null_batches)
        res = null_batches(prepared, voxel_opts, list(enumerate(sizes)))
        out["max_t"], out["count_unc"] = res["max_t"], res["count_unc"]
        return out
    else:
        import zarr
        arr = zarr.open_array(scratch, mode="r+")
        # the tie rule of null_batch (qsmdask.perm.permute.tie_lowered_t)
        obs = tie_lowered_t(np.abs(prepared.t_obs) if options.two_sided else prepared.t_obs)
        buf = np.zeros((perm_block, c1 - c0), np.float32)
        p0 = filled = 0
        for i, b in enumerate(sizes):  # the permutations of null_batch, t kept for the cluster pass
            perms = random_permutations(design, b, np.random.default_rng((int(options.seed), i)),
                                        size=prepared.n_exchangeable)
            t = batch_t(prepared, perms)
            stat = np.abs(t) if options.two_sided else t
            acc.add(i, {"max_t": stat.max(axis=1).astype(np.float64),
                        "count_unc": (stat >= obs[None, :]).sum(axis=0, dtype=np.int32)})
            buf[filled:filled + b][:, keep] = t
            filled += b
            if filled == perm_block or i == len(sizes) - 1:
                arr[p0:p0 + filled, c0:c1] = buf[:filled]
                p0 += filled
                filled = 0
    res = acc.result()
    out["max_t"], out["count_unc"] = res["max_t"], res["count_unc"]
    return out


def _cluster_task(scratch, p0, p1, keep, coords, cluster_t, options, pairs):
    """Maximum cluster size / mass and TFCE of permutations p0:p1 from the scratch t maps."""
    import zarr
    from qsmdask.perm.cluster import connectivity_structure, max_cluster_statistics
    from qsmdask.perm.tfce import tfce_values
    t = zarr.open_array(scratch, mode="r")[p0:p1][:, keep]
    structure = connectivity_structure(options.connectivity)
    out = {}
    if "cluster" in options.inference:
        sz, ms = np.zeros(p1 - p0), np.zeros(p1 - p0)
        for b in range(p1 - p0):
            sz[b], ms[b] = max_cluster_statistics(t[b], coords, threshold=cluster_t,
                                                  two_sided=options.two_sided, structure=structure,
                                                  min_size=options.min_cluster_voxels)
        out["max_size"], out["max_mass"] = sz, ms
    if "tfce" in options.inference:
        mt = np.zeros(p1 - p0)
        for b in range(p1 - p0):
            tf = tfce_values(t[b], coords, structure=structure, two_sided=options.two_sided,
                             E=options.tfce_E, H=options.tfce_H, dh=options.tfce_dh, pairs=pairs)
            mt[b] = np.abs(tf).max()
        out["max_tfce"] = mt
    return out


def _run_tasks(client, calls, max_in_flight):
    """Run ``calls`` [(fn, args)] on the client (bounded window) or in this process; yield
    (index, result) as they finish."""
    if client is None:
        for k, (fn, args) in enumerate(calls):
            yield k, fn(*args)
        return
    from distributed import wait
    pending = list(enumerate(calls))
    running = {}
    while pending or running:
        while pending and len(running) < max_in_flight:
            k, (fn, args) = pending.pop(0)
            running[client.submit(fn, *args, pure=False)] = k
        done, _ = wait(list(running), return_when="FIRST_COMPLETED")
        for f in done:
            k = running.pop(f)
            yield k, f.result()
            f.release()


def _selected_rows(store, keys=None) -> tuple:
    """``(keys, rows)``: the committed stack rows of ``keys`` (default: every committed row,
    in stack order); a key without a committed row is an error naming the store."""
    from qsmdask.perm.stack import stack_rows
    committed = stack_rows(store)
    if keys is None:
        keys = sorted(committed, key=committed.get)
    missing = [k for k in keys if k not in committed]
    if missing:
        raise ValueError(f"{store}: no committed row for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return list(keys), np.array([committed[k] for k in keys], dtype=np.int64)


def stack_analysis_mask(store, keys=None, *, mask_fraction: float = 0.9, client=None) -> tuple:
    """Rows and voxels of an analysis on a cohort stack.

    Returns ``(rows, keys, voxel_keep)``: the stack rows (int array) of ``keys`` (default:
    every committed row, in stack order), their keys, and the bool vector over the stack's
    voxels inside at least ``mask_fraction`` of those rows' brain masks.
    """
    import zarr
    keys, rows = _selected_rows(store, keys)
    root = zarr.open_group(store, mode="r")
    v = root["data"].shape[1]
    vb = int(root.attrs["voxel_block"])
    calls = [(_coverage_task, (store, rows, c0, min(c0 + vb, v))) for c0 in range(0, v, vb)]
    cover = np.zeros(v, np.int64)
    for k, part in _run_tasks(client, calls, 16):
        c0 = calls[k][1][2]
        cover[c0:c0 + part.size] = part
    return rows, keys, cover >= float(mask_fraction) * rows.size


def permutation_test_stack(store, design: Design, *, keys=None, voxel_keep=None, client=None,
                           n_perm: int = 1000, seed: int = 0, two_sided: bool = True,
                           inference=("voxel",), cluster_p: float = 0.005,
                           min_cluster_voxels: int = 10, connectivity: int = 6, tfce_E: float = 0.5,
                           tfce_H: float = 2.0, tfce_dh="auto", batch_size: int = 32,
                           perm_block: int | None = None, max_in_flight: int = 16, scratch=None,
                           atlas=None, atlas_names=None, scheme: str | None = None) -> PermutationResult:
    """Permutation test on a cohort stack, out of core: one Dask task per voxel block.

    Each task reads its voxel block of the selected rows (``n x voxel_block`` float32),
    residualises it, computes the observed t and the permuted statistics of every
    permutation of the run (permutation batch ``i`` uses ``default_rng((seed, i))`` as in
    :func:`qsmdask.perm.permute.permutation_test`); the client combines per-permutation
    maxima (max over blocks) and exceedance counts. Memory per task is about
    ``4 * n * voxel_block`` bytes times three, independent of the voxel count.
    Cluster and TFCE inference need each permuted t map whole: the voxel tasks write their
    t values to a scratch zarr array (``n_perm x n_voxels`` float32, removed at the end)
    and one task per ``perm_block`` permutations computes the cluster / TFCE maxima.

    Parameters
    ----------
    store : path or URL of a cohort stack (:func:`qsmdask.perm.stack.create_cohort_stack`)
    design : Design whose rows follow ``keys``
    keys : subject-session keys of the analysis (default: all committed rows, stack order)
    voxel_keep : bool vector over the stack voxels (default: all; see :func:`stack_analysis_mask`)
    n_perm : permutations (0: GLM only: t, z and parametric p maps)
    perm_block : permutations per cluster/TFCE task, rounded up to whole batches (default ``4 * batch_size``)
    scratch : path/URL for the scratch t maps (default ``<store>/scratch_t_<seed>``)
    other parameters : as :func:`qsmdask.perm.permute.permutation_test`

    Returns
    -------
    PermutationResult over the analysis voxels (``mask``: the stack mask restricted to them).
    """
    import zarr
    from qsmdask.perm.cluster import cluster_threshold_t, connectivity_structure
    from qsmdask.perm.permute import PreparedModel
    from qsmdask.perm.tfce import neighbour_pairs

    glm_only = int(n_perm) == 0
    options = PermutationOptions(n_perm=max(int(n_perm), 1), seed=seed, batch_size=batch_size,
                                 two_sided=two_sided, inference=("voxel",) if glm_only else inference,
                                 cluster_p=cluster_p, min_cluster_voxels=min_cluster_voxels,
                                 connectivity=connectivity, tfce_E=tfce_E, tfce_H=tfce_H, tfce_dh=tfce_dh,
                                 scheme=resolve_scheme(design, scheme))
    root = zarr.open_group(store, mode="r")
    stack_mask = np.asarray(root["mask"][...], dtype=bool)
    affine = root.attrs.get("affine")
    affine = None if affine is None else np.asarray(affine)
    keys, rows = _selected_rows(store, keys)
    if len(keys) != design.n_subjects:
        raise ValueError(f"design has {design.n_subjects} rows but {len(keys)} keys were selected")
    v_stack = root["data"].shape[1]
    vb = int(root.attrs["voxel_block"])
    keep = np.ones(v_stack, bool) if voxel_keep is None else np.asarray(voxel_keep, dtype=bool)
    if keep.shape != (v_stack,):
        raise ValueError(f"voxel_keep must have shape ({v_stack},), got {keep.shape}")
    if not keep.any():
        raise ValueError("voxel_keep selects no voxel")
    blocks = [(c0, min(c0 + vb, v_stack)) for c0 in range(0, v_stack, vb)]
    col0 = np.concatenate([[0], np.cumsum([keep[a:b].sum() for a, b in blocks])]).astype(int)
    n_vox = int(col0[-1])
    spatial = not glm_only and any(i in options.inference for i in ("cluster", "tfce"))
    bs = int(options.batch_size)
    pb = -(-int(perm_block or 4 * bs) // bs) * bs  # whole batches per scratch chunk
    if spatial:
        scratch = scratch or f"{str(store).rstrip('/')}/scratch_t_{int(seed)}"
        zarr.create_array(scratch, shape=(options.n_perm, v_stack), dtype="float32", overwrite=True,
                          chunks=(pb, vb), fill_value=0.0)
    calls = [(_voxel_block_task, (store, rows, a, b, keep[a:b], design, options, glm_only,
                                  scratch if spatial else None, pb))
             for a, b in blocks]
    t_obs = np.zeros(n_vox, np.float32)
    count = np.zeros(n_vox, np.int64)
    max_t = None
    for k, part in _run_tasks(client, calls, int(max_in_flight)):
        if part["v"] == 0:
            continue
        s = slice(col0[k], col0[k] + part["v"])
        t_obs[s] = part["t_obs"]
        if not glm_only:
            count[s] = part["count_unc"]
            max_t = part["max_t"] if max_t is None else np.maximum(max_t, part["max_t"])
    mask = np.zeros_like(stack_mask)
    mask[tuple(np.argwhere(stack_mask)[keep].T)] = True
    coords = np.argwhere(mask).astype(np.int32)
    cluster_t = cluster_threshold_t(options.cluster_p, design.dof, two_sided=options.two_sided)
    pairs = (neighbour_pairs(coords, connectivity_structure(options.connectivity))
             if "tfce" in options.inference else None)
    if glm_only:
        null = {"max_t": np.zeros(0), "count_unc": np.zeros(n_vox, np.int64)}
    else:
        null = {"max_t": max_t, "count_unc": count}
    if spatial:
        perm_calls = [(_cluster_task, (scratch, p0, min(p0 + pb, options.n_perm), keep, coords,
                                       cluster_t, options, pairs)) for p0 in range(0, options.n_perm, pb)]
        parts = dict(_run_tasks(client, perm_calls, int(max_in_flight)))
        for key in ("max_size", "max_mass", "max_tfce"):
            if key in parts[0]:
                null[key] = np.concatenate([parts[k][key] for k in range(len(perm_calls))])
        _remove(scratch)
    prepared = PreparedModel(residuals=np.zeros((design.n_subjects, 0), np.float32),
                             basis=np.zeros((design.n_subjects, 1), np.float32),
                             ss=np.zeros(0, np.float32), dof=design.dof, design=design, coords=coords,
                             t_obs=t_obs, cluster_t=cluster_t, pairs=pairs)
    res = finalize(prepared, options, null, mask=mask, affine=affine, atlas=atlas, atlas_names=atlas_names)
    res.extras["keys"] = list(keys)
    if glm_only:
        res.logp_unc = res.logp_fwe_t = None
    return res


def _remove(url):
    """Delete a zarr array/group at a path or fsspec URL."""
    import fsspec
    fs, path = fsspec.core.url_to_fs(str(url))
    if fs.exists(path):
        fs.rm(path, recursive=True)
