"""Dask fan-out: identical results for any worker count; zarr stacking round trip."""

import numpy as np
import pytest
from distributed import Client, LocalCluster
from scipy import ndimage

from qsmdask.perm import permutation_test, two_group_design
from qsmdask.perm.distributed import permutation_test_dask
from qsmdask.perm.stack import open_stack, stack_maps_to_zarr

OPTS = dict(n_perm=120, seed=11, inference=("voxel", "cluster", "tfce"), cluster_p=0.01,
            min_cluster_voxels=2, batch_size=16, tfce_dh=0.25)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    rng = np.random.default_rng(0)
    shape = (12, 12, 10)
    mask = np.zeros(shape, bool)
    mask[1:11, 1:11, 1:9] = True
    n = 16
    group = np.r_[np.zeros(8), np.ones(8)]
    maps = [ndimage.gaussian_filter(rng.standard_normal(shape), 0.8).astype(np.float32) for _ in range(n)]
    for i in np.flatnonzero(group):
        maps[i][3:7, 3:7, 3:6] += 0.5
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    path = tmp_path_factory.mktemp("perm") / "stack.zarr"
    stack_maps_to_zarr(maps, mask, path, affine=affine, subjects=[f"sub-{i:02d}" for i in range(n)],
                       chunk_voxels=256)
    design = two_group_design(group, covariates={"age": rng.normal(60, 8, n)})
    return maps, mask, affine, path, design


def test_stack_round_trip(cohort):
    maps, mask, affine, path, _ = cohort
    data, m, a = open_stack(path)
    assert data.shape == (16, int(mask.sum())) and data.chunks == (16, 256)
    np.testing.assert_array_equal(m, mask)
    np.testing.assert_array_equal(a, affine)
    np.testing.assert_array_equal(data[3], maps[3][mask])


def test_stack_validation(tmp_path):
    mask = np.ones((3, 3, 3), bool)
    with pytest.raises(ValueError, match="maps\\[1\\]"):
        stack_maps_to_zarr([np.zeros((3, 3, 3)), np.zeros((3, 3, 2))], mask, tmp_path / "x.zarr")
    with pytest.raises(ValueError, match="mask"):
        stack_maps_to_zarr([np.zeros((3, 3, 3))] * 2, np.ones((3, 3)), tmp_path / "x.zarr")


def _same(r1, r2):
    for key in ("max_t", "max_size", "max_mass", "max_tfce", "count_unc"):
        np.testing.assert_array_equal(r1.null[key], r2.null[key])
    for name in ("t", "logp_fwe_t", "logp_unc", "logp_fwe_size", "logp_fwe_mass", "logp_fwe_tfce",
                 "cluster_labels"):
        np.testing.assert_array_equal(getattr(r1, name), getattr(r2, name))


def test_one_and_two_workers_identical(cohort):
    maps, mask, affine, path, design = cohort
    results = []
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=False,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            results.append(permutation_test_dask(path, design, client=client, batches_per_task=workers,
                                                 **OPTS))
    _same(results[0], results[1])
    local = permutation_test(np.stack([m[mask] for m in maps]), design, mask=mask, affine=affine, **OPTS)
    _same(results[0], local)
    # threaded scheduler fallback (no client) gives the same too
    _same(permutation_test_dask(path, design, client=None, **OPTS), local)
    assert list(results[0].clusters.columns[:4]) == ["cluster", "sign", "size_voxels", "size_mm3"]


def test_dask_argument_validation(cohort):
    _, _, _, path, design = cohort
    with pytest.raises(ValueError, match="batches_per_task"):
        permutation_test_dask(path, design, batches_per_task=0)
    with pytest.raises(ValueError, match="mask is required"):
        permutation_test_dask(np.zeros((16, 10)), design)


def test_voxel_only_identical_for_any_task_split(cohort):
    """Max-T alone goes through the stacked product kernel: any task granularity and the
    in-process threads give bit-identical nulls."""
    maps, mask, affine, path, design = cohort
    opts = dict(n_perm=300, seed=5, batch_size=16)
    a = permutation_test_dask(path, design, client=None, batches_per_task=1, **opts)
    b = permutation_test_dask(path, design, client=None, batches_per_task=7, **opts)
    local = permutation_test(np.stack([m[mask] for m in maps]), design, mask=mask, n_threads=2, **opts)
    for r in (b, local):
        np.testing.assert_array_equal(a.null["max_t"], r.null["max_t"])
        np.testing.assert_array_equal(a.null["count_unc"], r.null["count_unc"])
        np.testing.assert_array_equal(a.logp_fwe_t, r.logp_fwe_t)
