"""Bad inputs: one clear message naming the file and the fault (gaps not covered by test_io/test_cli),
output faults (unwritable location, full disk), the output lock, and safe configuration parsing."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qsmdask.cli import EXIT_ERROR, main
from qsmdask.io.bids import find_subject_sessions, load_megre, phase_to_radians, read_participants
from qsmdask.io.nifti import InputError, atomic_write_bytes, save_nifti

from .conftest import write_megre_subject

REPO = Path(__file__).resolve().parents[1]


def _bids(tmp_path, **kw):
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    write_megre_subject(root, "01", **kw)
    return root


# ----------------------------------------------------------------------------- MEGRE content
def test_echo_affine_mismatch_names_file(tmp_path):
    root = _bids(tmp_path)
    bad = root / "sub-01/anat/sub-01_echo-2_part-mag_MEGRE.nii.gz"
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    aff[0, 3] = 5.0  # shifted by 5 mm
    save_nifti(bad, np.ones((12, 12, 10), np.float32), aff)
    with pytest.raises(InputError, match="affine differs") as ei:
        load_megre(find_subject_sessions(root)[0])
    assert ei.value.path == str(bad)


def test_all_zero_magnitude_rejected(tmp_path):
    root = _bids(tmp_path)
    bad = root / "sub-01/anat/sub-01_echo-1_part-mag_MEGRE.nii.gz"
    save_nifti(bad, np.zeros((12, 12, 10), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(InputError, match="all zero") as ei:
        load_megre(find_subject_sessions(root)[0])
    assert ei.value.path == str(bad)


def test_inf_in_phase_names_file(tmp_path):
    root = _bids(tmp_path)
    bad = root / "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.nii.gz"
    x = np.zeros((12, 12, 10), np.float32)
    x[3, 3, 3] = np.inf
    save_nifti(bad, x, np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(InputError, match="1 NaN/inf") as ei:
        load_megre(find_subject_sessions(root)[0])
    assert ei.value.path == str(bad)


def test_vendor_integer_phase_rescaled_with_note_through_load(tmp_path):
    root = _bids(tmp_path, n_echoes=1)
    p = root / "sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz"
    ramp = np.linspace(0, 4095, 12 * 12 * 10).round().reshape(12, 12, 10).astype(np.int16)
    save_nifti(p, ramp, np.diag([1.0, 1.0, 2.0, 1.0]))
    d = load_megre(find_subject_sessions(root)[0])
    assert d.phase_rad.min() >= -np.pi - 1e-6 and d.phase_rad.max() < np.pi
    assert np.isclose(d.phase_rad.min(), -np.pi, atol=1e-5)
    assert any("rescaled" in n and p.name in n for n in d.notes)


def test_phase_encoding_detected_once_over_all_echoes(tmp_path):
    """A short first echo of 12-bit signed phase may hold only positive values; read alone it
    would pass as unsigned and get another offset than the later echoes."""
    root = _bids(tmp_path, n_echoes=2)
    true = [np.full((12, 12, 10), 0.2), np.linspace(-1.5, 2.5, 1440).reshape(12, 12, 10)]
    for k, t in enumerate(true, 1):
        enc = np.round(t * 2048 / np.pi).astype(np.int16)  # -2048..2047 per 2 pi
        enc.flat[0] = 300  # the first echo stays positive
        t.flat[0] = 300 * np.pi / 2048
        save_nifti(root / f"sub-01/anat/sub-01_echo-{k}_part-phase_MEGRE.nii.gz", enc, np.diag([1.0, 1.0, 2.0, 1.0]))
    d = load_megre(find_subject_sessions(root)[0])
    for k, t in enumerate(true):
        np.testing.assert_allclose(d.phase_rad[..., k], t, atol=2e-3)
    assert sum("12-bit signed" in n for n in d.notes) == 1  # one note for all echoes


@pytest.mark.parametrize("lo,hi", [(-180, 180), (0, 359)])
def test_phase_in_degrees_rejected(lo, hi):
    deg = np.arange(lo, hi + 1, dtype=np.float32)
    with pytest.raises(InputError, match="degrees"):
        phase_to_radians(deg, "p.nii")


def test_eight_bit_vendor_phase_still_rescaled():
    rad, note = phase_to_radians(np.arange(0, 256, dtype=np.float32), "p.nii")
    assert note and "256 levels" in note and rad.max() < np.pi


def test_corrupt_gzip_stream_names_file(tmp_path):
    root = _bids(tmp_path)
    bad = root / "sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz"
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # corrupt the deflate stream, keep the length
    bad.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="cannot read NIfTI") as ei:
        load_megre(find_subject_sessions(root)[0])
    assert ei.value.path == str(bad)


def test_four_d_magnitude_rejected(tmp_path):
    root = _bids(tmp_path)
    bad = root / "sub-01/anat/sub-01_echo-1_part-mag_MEGRE.nii.gz"
    save_nifti(bad, np.ones((12, 12, 10, 3), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(InputError, match="expected a 3-D image, got 4-D") as ei:
        load_megre(find_subject_sessions(root)[0])
    assert ei.value.path == str(bad)


# ----------------------------------------------------------------------------- sidecars / names
def test_missing_field_strength_names_sidecar(tmp_path):
    root = _bids(tmp_path, n_echoes=1)
    for side in (root / "sub-01/anat").glob("*.json"):
        meta = json.loads(side.read_text())
        meta.pop("MagneticFieldStrength")
        side.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="lacks MagneticFieldStrength") as ei:
        find_subject_sessions(root)
    assert ei.value.path.endswith("sub-01_echo-1_part-phase_MEGRE.json")


@pytest.mark.parametrize("value", [-0.005, 5.0, float("nan"), None, [0.005]])
def test_implausible_echo_time(tmp_path, value):
    root = _bids(tmp_path, n_echoes=1, sidecar_extra={"EchoTime": value})
    with pytest.raises(InputError, match="EchoTime"):
        find_subject_sessions(root)


def test_top_level_sidecar_inheritance_supplies_field_strength(tmp_path):
    root = _bids(tmp_path, n_echoes=1)
    for side in (root / "sub-01/anat").glob("*.json"):
        meta = json.loads(side.read_text())
        meta.pop("MagneticFieldStrength")
        side.write_text(json.dumps(meta))
    (root / "task-rest_MEGRE.json").write_text('{"MagneticFieldStrength": 7}')
    assert find_subject_sessions(root)[0].echoes[0].b0_tesla == 7.0


@pytest.mark.parametrize("name", ["sub-01_echo-1_part-mag_MEGRE_extra.nii.gz", "sub-01_echo-x-1_part-mag_MEGRE.nii",
                                  "sub-02_echo-1_part-mag_MEGRE.nii.gz", "sub-01_echo-1_part-real_MEGRE.nii"])
def test_bad_bids_names_in_subject_folder(tmp_path, name):
    root = _bids(tmp_path)
    save_nifti(root / "sub-01/anat" / name, np.ones((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(InputError) as ei:
        find_subject_sessions(root)
    assert ei.value.path.endswith(name)


@pytest.mark.parametrize("text,match", [
    ("", "cannot parse TSV"),
    ("participant_id\tgroup\n01\tpatient\n", "sub-<label>"),
    ("participant_id\tgroup\nsub-01\tpatient\nsub-../x\tcontrol\n", "sub-<label>"),
    ("participant_id\tgroup\tcrp\nsub-01\tpatient\t1.2mg\n", "non-numeric value '1.2mg'"),
    ("participant_id\tgroup\n\tpatient\n", "empty participant_id"),
])
def test_participants_tsv_faults(tmp_path, text, match):
    (tmp_path / "participants.tsv").write_text(text)
    with pytest.raises(InputError, match=match) as ei:
        read_participants(tmp_path)
    assert ei.value.path.endswith("participants.tsv")


def test_participants_tsv_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_participants(tmp_path)


@pytest.mark.parametrize("label", ["sub-../../etc", "..", "01/../02", "01\\02", "01\x00"])
def test_cli_rejects_path_labels_in_process(tmp_path, capsys, label):
    with pytest.raises(SystemExit) as ei:
        main(["run", str(tmp_path), str(tmp_path / "out"), "participant", "--participant-label", label])
    assert ei.value.code == 2 and "invalid participant label" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- output faults
def test_output_under_a_file_is_one_line_error(tmp_path, capsys):
    root = _bids(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["run", str(root), str(blocker / "out"), "participant"])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR and err.count("\n") == 1
    assert err.startswith("qsmdask: error:") and "cannot create the output folder" in err and str(blocker) in err
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_full_disk_leaves_no_partial_file_and_names_it(tmp_path, monkeypatch, where):
    from qsmdask.io.derivatives import DerivativesWriter
    from qsmdask.io.tables import write_parquet

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    if where == "write":
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: _Failing(fd))
    else:
        monkeypatch.setattr(os, where, enospc)
    w = DerivativesWriter(tmp_path)
    targets = []
    with pytest.raises(OSError) as ei:
        w.save_image("01", "", "Chimap", np.zeros((3, 3, 3), np.float32), np.eye(4))
    targets.append((ei.value, tmp_path / "sub-01/anat/sub-01_Chimap.nii.gz"))
    with pytest.raises(OSError) as ei:
        write_parquet(pd.DataFrame({"a": [1]}), tmp_path / "roi" / "x.parquet")
    targets.append((ei.value, tmp_path / "roi" / "x.parquet"))
    monkeypatch.undo()
    for err, target in targets:
        assert err.errno == errno.ENOSPC and str(target) in str(err)
        assert not target.exists()
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers


class _Failing:
    """A file object whose write fails like a full disk (closes its descriptor)."""

    def __init__(self, fd):
        self.fd = fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)
        return False

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_keeps_previous_version_on_failure(tmp_path, monkeypatch):
    target = atomic_write_bytes(tmp_path / "m.json", b"old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="m.json"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_second_run_refused_by_lock(tmp_path, capsys):
    from qsmdask.io.lock import OutputLock
    root = _bids(tmp_path)
    out = tmp_path / "out"
    with OutputLock(out):
        rc = main(["run", str(root), str(out), "participant"])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR and err.count("\n") == 1
    assert "another qsmdask run" in err and f"pid {os.getpid()}" in err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["logs", "logs/qsmdask.lock"]


def test_lock_released_by_a_killed_holder(tmp_path):
    import subprocess
    import sys
    import time

    from qsmdask.io.lock import OutputLock
    code = ("import sys, time; from qsmdask.io.lock import OutputLock\n"
            "with OutputLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                         cwd=REPO)
    try:
        assert p.stdout.readline().strip() == "held"
        from qsmdask.io.lock import OutputLockedError
        with pytest.raises(OutputLockedError, match=f"pid {p.pid}"):
            with OutputLock(tmp_path):
                pass
        p.kill()
        p.wait(10)
        t0 = time.monotonic()
        with OutputLock(tmp_path):  # a SIGKILLed run leaves no stale lock
            assert time.monotonic() - t0 < 5
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


# ----------------------------------------------------------------------------- security
def test_yaml_design_tags_not_executed(tmp_path, capsys):
    design = tmp_path / "d.yaml"
    design.write_text(f"!!python/object/apply:os.system ['touch {tmp_path}/pwned']\n")
    rc = main(["run", str(tmp_path), str(tmp_path / "out"), "group", "--design", str(design)])
    assert rc == EXIT_ERROR and "qsmdask: error:" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_json_config_with_code_not_executed(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"registration": f"__import__('os').system('touch {tmp_path}/pwned')",
                               "__class__": "os.system"}))
    rc = main(["run", str(tmp_path), str(tmp_path / "out"), "participant", "--config", str(cfg)])
    assert rc == EXIT_ERROR and "qsmdask: error:" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_dockerfile_runs_as_non_root():
    text = (REPO / "Dockerfile").read_text()
    users = [ln.split(None, 1)[1].strip() for ln in text.splitlines() if ln.strip().upper().startswith("USER ")]
    assert users, "Dockerfile has no USER instruction"
    final = users[-1].split(":")[0]
    assert final not in ("root", "0"), f"final USER is {users[-1]}"


# ----------------------------------------------------------------------------- per-subject discovery faults
def _two_subjects(tmp_path):
    root = _bids(tmp_path)
    write_megre_subject(root, "02", seed=3)
    write_megre_subject(root, "03", "pre", seed=4)
    return root


@pytest.mark.parametrize("fault", ["no EchoTime", "bad name", "no partner", "echo not a number"])
def test_discovery_collects_per_subject_faults(tmp_path, fault):
    root = _two_subjects(tmp_path)
    anat = root / "sub-02/anat"
    if fault == "no EchoTime":
        for side in anat.glob("*.json"):
            meta = json.loads(side.read_text())
            meta.pop("EchoTime")
            side.write_text(json.dumps(meta))
    elif fault == "bad name":
        (anat / "sub-02_echo-1_part-mag_MEGRE.nii.gz").rename(anat / "sub-02_echo-1_part-mag_MEGRE_x.nii.gz")
    elif fault == "no partner":
        (anat / "sub-02_echo-2_part-phase_MEGRE.nii.gz").unlink()
    else:
        (anat / "sub-02_echo-2_part-phase_MEGRE.nii.gz").rename(anat / "sub-02_echo-x_part-phase_MEGRE.nii.gz")
    with pytest.raises(InputError) as strict:  # default: the first fault stops discovery
        find_subject_sessions(root)
    assert "sub-02" in strict.value.path
    errors = []
    sss = find_subject_sessions(root, errors=errors)
    assert [s.key for s in sss] == ["sub-01", "sub-03_ses-pre"]
    assert len(errors) == 1 and isinstance(errors[0], InputError)
    assert errors[0].participant_id == "sub-02" and errors[0].session_id == ""
    assert "sub-02" in errors[0].path
    # a label filter still knows the faulty subject exists
    errs2 = []
    assert find_subject_sessions(root, ["02"], errors=errs2) == [] and len(errs2) == 1
