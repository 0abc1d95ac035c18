"""Out-of-core voxel-wise inference: cohort stack keyed by subject-session, voxel-block tasks."""

import numpy as np
import pytest
import zarr
from scipy import ndimage

from qsmdask.perm import glm_t, permutation_test, t_to_z, two_group_design
from qsmdask.perm.distributed import permutation_test_stack, stack_analysis_mask
from qsmdask.perm.stack import create_cohort_stack, stack_rows, update_cohort_stack

SHAPE = (12, 12, 10)


def _mask():
    m = np.zeros(SHAPE, bool)
    m[1:11, 1:11, 1:9] = True
    return m


def _map(seed):
    """Loader for the tests: a smooth random map (patients: seed >= 100, a planted blob)."""
    if seed == "bad":
        raise ValueError("unreadable map")
    rng = np.random.default_rng(seed)
    m = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 0.8).astype(np.float32)
    if seed >= 100:
        m[3:7, 3:7, 3:6] += 0.5
    inside = _mask()
    inside[1, 1, 1] = seed % 3 != 0  # a few rows miss one voxel: coverage below 1
    return m, inside


@pytest.fixture()
def cohort(tmp_path):
    seeds = [1, 2, 3, 4, 5, 6, 7, 8, 101, 102, 103, 104, 105, 106, 107, 108]
    keys = [f"sub-{s:03d}_ses-1" for s in seeds]
    store = str(tmp_path / "stack.zarr")
    create_cohort_stack(store, _mask(), affine=np.diag([2.0, 2.0, 2.0, 1.0]), subject_block=5,
                        voxel_block=96)
    res = update_cohort_stack(store, {k: (f"v{s}", s) for k, s in zip(keys, seeds)}, _map)
    assert res == {"blocks": 4, "rows": 16, "failed": {}}
    group = np.array([s >= 100 for s in seeds], float)
    age = np.random.default_rng(0).normal(60, 8, len(seeds))
    return store, keys, seeds, two_group_design(group, covariates={"age": age})


def test_stack_rows_keyed_rerun_replaces_never_duplicates(cohort):
    store, keys, seeds, _ = cohort
    rows = stack_rows(store)
    assert sorted(rows) == sorted(keys) and sorted(rows.values()) == list(range(16))
    # nothing changed: nothing written
    entries = {k: (f"v{s}", s) for k, s in zip(keys, seeds)}
    assert update_cohort_stack(store, entries, _map)["rows"] == 0
    # one source changed and one new subject-session: its block is rewritten, the new row appended
    entries[keys[3]] = ("v-new", 99)
    entries["sub-200_ses-1"] = ("v200", 200)
    res = update_cohort_stack(store, entries, _map)
    assert res["failed"] == {} and res["blocks"] == 2
    rows2 = stack_rows(store)
    assert len(rows2) == 17 and rows2[keys[3]] == rows[keys[3]] and rows2["sub-200_ses-1"] == 16
    root = zarr.open_group(store, mode="r")
    for key, seed in ((keys[3], 99), (keys[0], seeds[0])):
        values, inside = _map(seed)
        np.testing.assert_array_equal(root["data"][rows2[key]], np.where(inside, values, 0)[_mask()])
        np.testing.assert_array_equal(root["inside"][rows2[key]], inside[_mask()])
    assert root["data"].shape[0] == 17


def test_bad_source_keeps_the_block_other_rows(cohort):
    store, keys, seeds, _ = cohort
    entries = {k: (f"v{s}", s) for k, s in zip(keys, seeds)}
    entries["sub-300_ses-1"] = ("v300", "bad")
    res = update_cohort_stack(store, entries, _map)
    assert list(res["failed"]) == ["sub-300_ses-1"] and "unreadable map" in res["failed"]["sub-300_ses-1"]
    rows = stack_rows(store)
    assert "sub-300_ses-1" not in rows and len(rows) == 16


def test_interrupted_block_is_rewritten_on_rerun(cohort):
    store, keys, seeds, _ = cohort
    root = zarr.open_group(store, mode="r+")
    root["blocks/b000001"].attrs["rows"] = {}  # as a block task killed mid-write leaves it
    assert len(stack_rows(store)) == 11
    res = update_cohort_stack(store, {k: (f"v{s}", s) for k, s in zip(keys, seeds)}, _map)
    assert res == {"blocks": 1, "rows": 5, "failed": {}}
    assert len(stack_rows(store)) == 16


@pytest.mark.parametrize("scheme", ["huh_jhun", "freedman_lane"])
def test_stack_inference_equals_in_memory(cohort, scheme):
    """GLM, parametric maps, max-T, cluster and TFCE from voxel blocks == the in-memory path."""
    store, keys, seeds, design = cohort
    rows, sel_keys, keep = stack_analysis_mask(store, keys, mask_fraction=0.9)
    assert sel_keys == keys and keep.sum() == _mask().sum() - 1  # voxel (1,1,1) covered by 10/16
    maps = [_map(s)[0] for s in seeds]
    mask = _mask()
    mask[1, 1, 1] = False
    y = np.stack([m[mask] for m in maps])
    opts = dict(n_perm=96, seed=5, inference=("voxel", "cluster", "tfce"), cluster_p=0.01,
                min_cluster_voxels=2, batch_size=16, tfce_dh=0.25, scheme=scheme)
    ref = permutation_test(y, design, mask=mask, **opts)
    assert ref.options.scheme == scheme
    got = permutation_test_stack(store, design, keys=keys, voxel_keep=keep, perm_block=40, **opts)
    np.testing.assert_array_equal(got.mask, mask)
    t_ref, dof = glm_t(y, design)
    np.testing.assert_allclose(got.t, t_ref, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(got.z, t_to_z(t_ref, dof), atol=1e-6, rtol=1e-6)
    for name in ("t", "z", "logp_unc_param", "logp_unc", "logp_fwe_t", "logp_fwe_size", "logp_fwe_mass",
                 "logp_fwe_tfce", "tfce"):
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), atol=1e-6, rtol=1e-6, err_msg=name)
    for key in ("max_t", "max_size"):
        np.testing.assert_allclose(got.null[key], ref.null[key], atol=1e-6, rtol=1e-6, err_msg=key)
    # cluster mass and TFCE sum (|t| - threshold) over many voxels: float32 rounding of t adds up
    for key in ("max_mass", "max_tfce"):
        np.testing.assert_allclose(got.null[key], ref.null[key], atol=1e-5, rtol=1e-6, err_msg=key)
    np.testing.assert_array_equal(got.null["count_unc"], ref.null["count_unc"])
    np.testing.assert_array_equal(got.cluster_labels, ref.cluster_labels)
    assert not any(k.startswith("scratch") for k in zarr.open_group(store, mode="r").array_keys())
    # max-T only: the voxel blocks run the stacked max-T kernel
    ref_v = permutation_test(y, design, mask=mask, n_perm=96, seed=5, batch_size=16, scheme=scheme)
    got_v = permutation_test_stack(store, design, keys=keys, voxel_keep=keep, n_perm=96, seed=5, batch_size=16,
                                   scheme=scheme)
    assert got_v.options.scheme == scheme
    np.testing.assert_allclose(got_v.null["max_t"], ref_v.null["max_t"], atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(got_v.null["count_unc"], ref_v.null["count_unc"])
    np.testing.assert_allclose(got_v.logp_fwe_t, ref_v.logp_fwe_t, atol=1e-6)
    # GLM only (n_perm=0): the parametric maps
    glm = permutation_test_stack(store, design, keys=keys, voxel_keep=keep, n_perm=0)
    np.testing.assert_allclose(glm.t, t_ref, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(glm.logp_unc_param, ref.logp_unc_param, atol=1e-6, rtol=1e-6)
    assert glm.logp_fwe_t is None


def test_stack_inference_on_dask_workers(cohort):
    """Same result on a 2-worker Dask cluster (tasks read the stack themselves)."""
    from distributed import Client, LocalCluster
    store, keys, seeds, design = cohort
    opts = dict(n_perm=64, seed=2, inference=("voxel", "cluster"), cluster_p=0.01, min_cluster_voxels=2,
                batch_size=16)
    local = permutation_test_stack(store, design, keys=keys, **opts)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as lc, \
            Client(lc) as client:
        dist = permutation_test_stack(store, design, keys=keys, client=client, **opts)
    for key in ("max_t", "max_size", "max_mass", "count_unc"):
        np.testing.assert_array_equal(dist.null[key], local.null[key])
    np.testing.assert_array_equal(dist.t, local.t)


def test_stack_errors(cohort, tmp_path):
    store, keys, _, design = cohort
    with pytest.raises(ValueError, match="no committed row"):
        permutation_test_stack(store, design, keys=keys[:-1] + ["sub-x"])
    with pytest.raises(ValueError, match="another mask"):
        create_cohort_stack(store, np.ones(SHAPE, bool), subject_block=5, voxel_block=96)
    with pytest.raises(ValueError, match="not a cohort stack"):
        update_cohort_stack(str(tmp_path / "none.zarr"), {}, _map)


def test_run_voxelwise_stacks_once_and_matches_in_memory(tmp_path):
    """The group level's voxel-wise run goes through the cohort stack; a rerun writes no row."""
    import pandas as pd
    from qsmdask.io.nifti import save_nifti
    from qsmdask.workflows.voxelwise import VoxelwiseOptions, run_voxelwise
    out = tmp_path / "deriv"
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    ids, groups, maps = [], [], []
    for i, seed in enumerate([1, 2, 3, 4, 5, 101, 102, 103, 104, 105]):
        sub = f"sub-{i:02d}"
        values, inside = _map(seed)
        anat = out / sub / "ses-a" / "anat"
        save_nifti(anat / f"{sub}_ses-a_space-MNI152NLin2009aSym_desc-smooth_Chimap.nii.gz", values, aff)
        save_nifti(anat / f"{sub}_ses-a_space-MNI152NLin2009aSym_desc-brain_mask.nii.gz", inside, aff)
        ids.append(sub)
        groups.append("patient" if seed >= 100 else "control")
        maps.append(values)
    participants = pd.DataFrame({"participant_id": ids, "group": groups})
    opts = VoxelwiseOptions(n_perm=48, inference=("voxel",), covariates=())
    first = run_voxelwise(out, participants, options=opts)
    assert first["n_subjects"] == 10
    import json
    cfg = json.loads((out / "logs" / "qsmdask_voxelwise_config.json").read_text())
    assert cfg["stack"]["rows_written"] == 10
    # what the analysis could detect is recorded (issue 14: "not detected at n = ..." with power)
    pw = cfg["power"]
    assert pw["n_permutations"] >= 48 and pw["dof"] == 8 and pw["fwe_t_threshold"] > 2
    assert pw["detectable_d_power80"] > 1.0
    run_voxelwise(out, participants, options=opts)
    cfg = json.loads((out / "logs" / "qsmdask_voxelwise_config.json").read_text())
    assert cfg["stack"]["rows_written"] == 0
    mask = np.mean([_map(s)[1] for s in [1, 2, 3, 4, 5, 101, 102, 103, 104, 105]], axis=0) >= 0.9
    y = np.stack([m[mask] for m in maps])
    design = two_group_design(np.array([g == "patient" for g in groups], float))
    ref = permutation_test(y, design, mask=mask, n_perm=48, seed=0)
    from qsmdask.io.nifti import load_nifti
    t = load_nifti(out / "group" / "perm_t.nii.gz")[0]
    np.testing.assert_allclose(t[mask], ref.t, atol=1e-5)
    assert np.all(t[~mask] == 0)


@pytest.mark.parametrize("scheme", ["freedman_lane", "huh_jhun"])
def test_voxel_block_preparation_is_linear_in_subjects(scheme):
    """A voxel-block task holds O(n x V), not the n x (n - k) complement basis of the in-memory
    Freedman-Lane preparation (9.8 GB of float64 at 35,000 subject-sessions); Huh-Jhun uses the
    k Householder reflectors of the nuisance space, in memory and in the blocks alike."""
    from qsmdask.perm.distributed import _prepare_block
    from qsmdask.perm.permute import PermutationOptions, prepare_model
    rng = np.random.default_rng(3)
    n, v = 400, 50
    y = rng.standard_normal((n, v)).astype(np.float32)
    design = two_group_design(np.arange(n) % 2, covariates={"age": rng.normal(60, 8, n)})
    opts = PermutationOptions(n_perm=10, scheme=scheme)
    block = _prepare_block(y, design, opts)
    ref = prepare_model(y, design, mask=np.ones((v, 1, 1), bool), options=opts)
    assert block.complement is None
    if scheme == "freedman_lane":
        assert block.residuals.shape == (n, v)
        assert ref.complement is not None and ref.complement.shape[0] == n  # the n^2 object avoided
    else:
        assert block.residuals.shape == (n - 2, v) and ref.complement is None
        np.testing.assert_array_equal(block.residuals, ref.residuals)
    np.testing.assert_allclose(block.t_obs, ref.t_obs, atol=1e-5)


def test_voxelwise_options_scheme():
    from qsmdask.workflows.voxelwise import VoxelwiseOptions
    assert VoxelwiseOptions().scheme == "huh_jhun"
    assert VoxelwiseOptions(scheme="freedman_lane").scheme == "freedman_lane"
    with pytest.raises(ValueError, match="voxelwise scheme must be one of"):
        VoxelwiseOptions(scheme="kennedy")
