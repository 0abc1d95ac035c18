"""Issue 15 defect 2: scanner geometry checked once at ingest (small shears orthogonalised with a
note, large ones refused naming the file), and a finished reconstruction kept when a later stage
fails."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qsmdask.config import PipelineConfig
from qsmdask.geometry import SHEAR_TOLERANCE_DEG, affine_shear_deg, orthogonalise_affine
from qsmdask.io.bids import find_subject_sessions, load_megre
from qsmdask.io.nifti import InputError
from qsmdask.registration._ants import check_affine

from .conftest import write_megre_subject


def _rot(deg_x, deg_z):
    ax, az = np.radians(deg_x), np.radians(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rx @ rz


def _qsm_forward_like(vs=(1.0, 1.0, 2.0), deg=(0.1, 0.05)):
    """qsm-forward writes diag(voxel) @ R: sheared when the voxels are anisotropic (here 0.15 deg)."""
    a = np.eye(4)
    a[:3, :3] = np.diag(vs) @ _rot(*deg)
    a[:3, 3] = (-10.0, 5.0, 3.0)
    return a


def _bids(tmp_path, **kw):
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    write_megre_subject(root, "01", **kw)
    return root


def test_orthogonalise_small_shear_keeps_voxel_sizes_and_origin():
    a = _qsm_forward_like()
    shear = affine_shear_deg(a)
    assert 0.01 < shear < SHEAR_TOLERANCE_DEG
    with pytest.raises(ValueError, match="shear"):
        check_affine(a)  # what failed the subject at registration before
    out, measured = orthogonalise_affine(a)
    assert measured == pytest.approx(shear)
    check_affine(out)
    assert affine_shear_deg(out) < 1e-6
    np.testing.assert_allclose(np.linalg.norm(out[:3, :3], axis=0), np.linalg.norm(a[:3, :3], axis=0))
    np.testing.assert_allclose(out[:3, 3], a[:3, 3])
    # an orthogonal affine is returned as it is
    b = np.eye(4)
    b[:3, :3] = _rot(10, 20) * 1.5
    np.testing.assert_array_equal(orthogonalise_affine(b)[0], b)


def test_large_shear_refused():
    a = np.eye(4)
    a[0, 1] = np.tan(np.radians(3.0))
    assert affine_shear_deg(a) == pytest.approx(3.0, rel=1e-3)
    with pytest.raises(ValueError, match="3 degrees from orthogonal"):
        orthogonalise_affine(a)


def test_ingest_orthogonalises_small_shear_with_a_note(tmp_path, caplog):
    root = _bids(tmp_path, affine=_qsm_forward_like())
    with caplog.at_level("WARNING", logger="qsmdask.io"):
        d = load_megre(find_subject_sessions(root)[0])
    check_affine(d.affine)
    assert any("orthogonalised" in n and "echo-1_part-mag" in n for n in d.notes), d.notes
    assert "orthogonalised" in caplog.text


def test_ingest_refuses_large_shear_naming_the_file(tmp_path):
    a = np.diag([1.0, 1.0, 2.0, 1.0])
    a[0, 2] = 0.1  # 2.9 degrees
    root = _bids(tmp_path, affine=a)
    with pytest.raises(InputError, match="degrees from orthogonal") as ei:
        load_megre(find_subject_sessions(root)[0])
    assert ei.value.path.endswith("sub-01_echo-1_part-mag_MEGRE.nii.gz")


def test_failed_standardise_keeps_the_native_chimap(tmp_path, monkeypatch):
    """A subject whose registration fails still gets its native Chimap (status failed)."""
    from qsmdask.workflows import participant as wf

    from qsmdask.io.nifti import save_nifti
    from qsmdask.sim.geometric import make_phantom

    root = _bids(tmp_path, shape=(32, 32, 32))
    p = make_phantom(shape=(32, 32, 32), echo_times_s=(0.005, 0.010), snr=100, seed=1)
    for e in range(2):
        for part, arr in (("mag", p["magnitude"]), ("phase", p["phase_rad"])):
            save_nifti(root / f"sub-01/anat/sub-01_echo-{e + 1}_part-{part}_MEGRE.nii.gz",
                       arr[..., e], np.eye(4))
    out = tmp_path / "out"

    def broken(meta, config):
        with wf._stage(meta["key"], "standardise"):
            raise RuntimeError("registration diverged")

    monkeypatch.setattr(wf, "standardise_and_measure", broken)
    ss = find_subject_sessions(root)[0]
    with pytest.raises(wf.StageError, match="standardise failed"):
        wf.process_subject_session(ss, out, PipelineConfig())
    anat = out / "sub-01" / "anat"
    chimap = anat / "sub-01_Chimap.nii.gz"
    assert chimap.exists()
    side = json.loads(chimap.with_name("sub-01_Chimap.json").read_text())
    assert side["Status"] == "partial" and side["FailedStage"] == "standardise"
    manifest = wf.DerivativesWriter(out).read_manifest("01", "")
    assert manifest["status"] == "failed" and manifest["failed_stage"] == "standardise"
    assert not wf.is_up_to_date(ss, out, PipelineConfig())
