"""IO layer: BIDS parsing and validation, NIfTI, zarr volumes, Parquet, derivatives writer."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qsmdask.io import zarrstore
from qsmdask.io.bids import (find_subject_sessions, load_megre, parse_bids_name, phase_to_radians,
                             read_participants, validate_label)
from qsmdask.io.derivatives import DerivativesWriter, bids_stem
from qsmdask.io.nifti import InputError, atomic_write_bytes, load_nifti, save_nifti
from qsmdask.io.tables import read_parquet_folder, write_parquet

from .conftest import write_megre_subject


def test_parse_bids_name():
    ents, suffix, ext = parse_bids_name("sub-01_ses-pre_echo-3_part-mag_MEGRE.nii.gz")
    assert ents == {"sub": "01", "ses": "pre", "echo": "3", "part": "mag"}
    assert (suffix, ext) == ("MEGRE", ".nii.gz")
    for bad in ("01_MEGRE.nii.gz", "sub-01_echo_MEGRE.nii", "sub-01_echo-1_echo-2_MEGRE.nii", "sub-01.txt"):
        with pytest.raises(InputError):
            parse_bids_name(bad)


@pytest.mark.parametrize("label", ["../x", "a/b", "..", "sub-a_b", "", "x y"])
def test_labels_with_path_separators_rejected(label):
    with pytest.raises(ValueError, match="invalid participant label"):
        validate_label(label)


def test_discovery_and_load(tiny_bids):
    sss = find_subject_sessions(tiny_bids)
    assert [s.key for s in sss] == ["sub-01_ses-pre", "sub-02_ses-pre"]
    assert [e.echo_time_s for e in sss[0].echoes] == [0.005, 0.010]
    d = load_megre(sss[0])
    assert d.magnitude.shape == (12, 12, 10, 2) and d.phase_rad.dtype == np.float32
    assert d.b0_tesla == 3.0 and np.allclose(d.affine, np.diag([1, 1, 2, 1]))
    only = find_subject_sessions(tiny_bids, ["sub-02"])
    assert [s.subject for s in only] == ["02"]
    with pytest.raises(InputError, match="no MEGRE data for participant"):
        find_subject_sessions(tiny_bids, ["03"])


def test_checksum_changes_with_input(tiny_bids):
    ss = find_subject_sessions(tiny_bids)[0]
    before = ss.checksum()
    f = ss.echoes[0].phase.with_name(ss.echoes[0].phase.name.replace(".nii.gz", ".json"))
    meta = json.loads(f.read_text())
    meta["EchoTime"] = 0.006
    f.write_text(json.dumps(meta))
    assert find_subject_sessions(tiny_bids)[0].checksum() != before


def test_missing_sidecar_field(tmp_path):
    (tmp_path / "dataset_description.json").write_text("{}")
    write_megre_subject(tmp_path, "01", sidecar_extra={"MagneticFieldStrength": "three"})
    with pytest.raises(InputError, match="MagneticFieldStrength is not a number"):
        find_subject_sessions(tmp_path)


def test_missing_echo_time(tmp_path):
    (tmp_path / "dataset_description.json").write_text("{}")
    paths = write_megre_subject(tmp_path, "01", n_echoes=1)
    for p in paths:
        j = p.with_name(p.name.replace(".nii.gz", ".json"))
        meta = json.loads(j.read_text())
        meta.pop("EchoTime")
        j.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="lacks EchoTime") as ei:
        find_subject_sessions(tmp_path)
    assert "sub-01_echo-1_part-" in str(ei.value)


def test_not_bids(tmp_path):
    with pytest.raises(InputError, match="dataset_description.json"):
        find_subject_sessions(tmp_path)


def test_echo_shape_mismatch(tmp_path):
    (tmp_path / "dataset_description.json").write_text("{}")
    write_megre_subject(tmp_path, "01", n_echoes=2)
    p = tmp_path / "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.nii.gz"
    save_nifti(p, np.zeros((12, 12, 9), np.float32), np.diag([1, 1, 2, 1.0]))
    with pytest.raises(InputError, match="shape .* differs"):
        load_megre(find_subject_sessions(tmp_path)[0])


def test_vendor_phase_rescaled_and_garbage_rejected():
    x = np.array([-4096, 0, 4095], dtype=np.float32)
    rad, note = phase_to_radians(x, "p.nii")
    assert note and "4096" in note
    assert rad.min() >= -np.pi - 1e-6 and rad.max() < np.pi
    assert np.isclose(rad[1], 0.0, atol=1e-3)
    ge = np.array([-3141, -1000, 0, 2000, 3141], dtype=np.float32)
    rad, note = phase_to_radians(ge, "ge.nii")
    assert "milliradians" in note and np.allclose(rad, ge / 1000)
    with pytest.raises(InputError, match="neither radians"):
        phase_to_radians(np.array([0.5, 7.3, 12.1], np.float32), "p.nii")


def test_nifti_faults(tmp_path):
    good = save_nifti(tmp_path / "a.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    data, aff, _ = load_nifti(good)
    assert data.shape == (4, 4, 4)
    trunc = tmp_path / "t.nii.gz"
    trunc.write_bytes(good.read_bytes()[:60])
    with pytest.raises(InputError, match="cannot read NIfTI"):
        load_nifti(trunc)
    nan = save_nifti(tmp_path / "n.nii", np.full((4, 4, 4), np.nan, np.float32), np.eye(4))
    with pytest.raises(InputError, match="NaN/inf"):
        load_nifti(nan)
    two_d = save_nifti(tmp_path / "2d.nii", np.ones((4, 4), np.float32), np.eye(4))
    with pytest.raises(InputError, match="expected a 3-D image, got 2-D"):
        load_nifti(two_d)
    five_d = save_nifti(tmp_path / "5d.nii", np.ones((2, 2, 2, 2, 2), np.float32), np.eye(4))
    with pytest.raises(InputError, match="got 5-D"):
        load_nifti(five_d)
    assert gzip.decompress(good.read_bytes())[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c")


def test_participants_validation(tmp_path):
    (tmp_path / "participants.tsv").write_text("participant_id\tgroup\thdrs\nsub-01\tpatient\t20\nsub-02\tcontrol\tn/a\n")
    df = read_participants(tmp_path)
    assert df["hdrs"].iloc[0] == 20.0 and np.isnan(df["hdrs"].iloc[1])
    (tmp_path / "participants.tsv").write_text("participant_id\tgroup\thdrs\nsub-01\tpatient\ttwenty\n")
    with pytest.raises(InputError, match="non-numeric value 'twenty'"):
        read_participants(tmp_path)
    (tmp_path / "participants.tsv").write_text("participant_id\tgroup\nsub-01\tpatient\nsub-01\tcontrol\n")
    with pytest.raises(InputError, match="duplicate participant_id"):
        read_participants(tmp_path)
    (tmp_path / "participants.tsv").write_text("participant_id\tage\nsub-01\t3\n")
    with pytest.raises(InputError, match="missing column"):
        read_participants(tmp_path)


@pytest.mark.parametrize("url", ["file", "memory://qsmdask-test.zarr"])
def test_zarr_roundtrip_keeps_geometry(tmp_path, url):
    if url == "file":
        url = (tmp_path / "v.zarr").as_uri()
    aff = np.array([[0, -1.0, 0, 10], [1.0, 0, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]])
    x = np.random.default_rng(0).normal(size=(70, 9, 5, 2)).astype(np.float32)
    zarrstore.write_volume(url, "x", x, aff, chunk_edge=32)
    y, a = zarrstore.read_volume(url, "x")
    assert np.array_equal(x, y) and np.allclose(a, aff)
    assert np.allclose(zarrstore.read_affine(url, "x"), aff)
    assert zarrstore.has_volume(url, "x") and not zarrstore.has_volume(url, "nope")


def test_parquet_folder_unifies_schemas(tmp_path):
    write_parquet(pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}), tmp_path / "1.parquet")
    write_parquet(pd.DataFrame({"a": [3], "c": [1.5]}), tmp_path / "2.parquet")
    df = read_parquet_folder(tmp_path)
    assert len(df) == 3 and set(df.columns) == {"a", "b", "c"} and df["c"].iloc[2] == 1.5
    assert not list(tmp_path.glob("*.tmp"))


def test_derivatives_writer_names_and_manifest(tmp_path):
    w = DerivativesWriter(tmp_path)
    w.write_dataset_description()
    assert json.loads((tmp_path / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert bids_stem("01", "pre", space="MNI", desc="smooth") == "sub-01_ses-pre_space-MNI_desc-smooth"
    p = w.save_image("01", "", "Chimap", np.zeros((3, 3, 3), np.float32), np.eye(4), sidecar={"Units": "ppm"})
    assert p == tmp_path / "sub-01/anat/sub-01_Chimap.nii.gz"
    side = json.loads(p.with_name("sub-01_Chimap.json").read_text())
    assert side["Units"] == "ppm" and side["GeneratedBy"][0]["Name"] == "qsmdask"
    m = w.write_manifest("01", "", [p], config={"a": 1}, status={"status": "done"})
    man = json.loads(m.read_text())
    assert w.manifest_intact(man)
    p.write_bytes(b"corrupted")
    assert not w.manifest_intact(man)


def test_output_lock_excludes_a_second_run(tmp_path):
    from qsmdask.io.lock import OutputLock, OutputLockedError
    with OutputLock(tmp_path):
        with pytest.raises(OutputLockedError, match="another qsmdask run"):
            with OutputLock(tmp_path):
                pass
    with OutputLock(tmp_path):  # released after the first run
        pass


def test_lock_sweeps_temporary_files_of_killed_writes(tmp_path):
    """A write killed before its rename leaves .<name>.<random>.tmp; the next run's lock removes it."""
    import tempfile

    from qsmdask.io.lock import OutputLock

    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    done = atomic_write_bytes(anat / "sub-01_Chimap.nii.gz", b"complete")
    fd, left = tempfile.mkstemp(prefix=".sub-01_roi.parquet.", suffix=".tmp", dir=anat)  # as the writer names it
    os.write(fd, b"half a file")
    os.close(fd)
    hidden = anat / ".keep"  # other dot files are not ours: kept
    hidden.write_text("x")
    with OutputLock(tmp_path) as lock:
        assert lock.swept == [Path(left)]
    assert not Path(left).exists() and done.read_bytes() == b"complete" and hidden.exists()


def test_single_echo_t2starw_discovered(tmp_path):
    """Single-echo GRE as BIDS names it (``part-mag|phase_T2starw``, echo entity optional, as
    qsm-forward writes it) is read as a one-echo acquisition; a T2starw magnitude without phase
    is not GRE phase data, and MEGRE files of the same acquisition take precedence."""
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t2s", "BIDSVersion": "1.9.0"}))
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    meta = {"EchoTime": 0.02, "MagneticFieldStrength": 3.0}
    rng = np.random.default_rng(0)
    anat = root / "sub-se" / "anat"
    save_nifti(anat / "sub-se_part-mag_T2starw.nii", rng.uniform(1, 2, (10, 10, 8)).astype(np.float32), aff,
               sidecar=meta)
    save_nifti(anat / "sub-se_part-phase_T2starw.nii", rng.uniform(-3, 3, (10, 10, 8)).astype(np.float32), aff,
               sidecar={**meta, "Units": "rad"})
    # magnitude-only T2starw (no phase) next to MEGRE data; and a T2starw copy of the MEGRE acquisition
    write_megre_subject(root, "me", n_echoes=2)
    save_nifti(root / "sub-me" / "anat" / "sub-me_acq-swi_part-mag_T2starw.nii.gz",
               np.ones((12, 12, 10), np.float32), aff, sidecar=meta)
    save_nifti(root / "sub-me" / "anat" / "sub-me_part-mag_T2starw.nii.gz", np.ones((12, 12, 10), np.float32),
               aff, sidecar=meta)
    save_nifti(root / "sub-me" / "anat" / "sub-me_part-phase_T2starw.nii.gz", np.zeros((12, 12, 10), np.float32),
               aff, sidecar={**meta, "Units": "rad"})
    found = {s.key: s for s in find_subject_sessions(root)}
    assert sorted(found) == ["sub-me", "sub-se"]
    assert [e.phase.name for e in found["sub-me"].echoes] == [
        "sub-me_echo-1_part-phase_MEGRE.nii.gz", "sub-me_echo-2_part-phase_MEGRE.nii.gz"]
    se = found["sub-se"]
    assert len(se.echoes) == 1 and se.echoes[0].echo_time_s == 0.02
    data = load_megre(se)
    assert data.phase_rad.shape == (10, 10, 8, 1)
