"""Real BIDS datasets, safely: acquisition entities, input/output separation, stray entries,
file modes, full disk and the official BIDS validator (issue 16, data integrity and BIDS parts)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qsmdask.cli import EXIT_ERROR, main
from qsmdask.config import PipelineConfig
from qsmdask.io.bids import check_output_location, find_subject_sessions
from qsmdask.io.derivatives import DerivativesWriter, bids_stem, bids_uri
from qsmdask.io.nifti import atomic_write_bytes, save_nifti
from qsmdask.io.tables import write_parquet
from qsmdask.io.validation import validate_bids, validator_available
from qsmdask.workflows import participant as wf
from qsmdask.workflows.cohort import plan_participants, select_acquisitions, write_failures

from .conftest import write_megre_subject

needs_validator = pytest.mark.skipif(not validator_available(), reason="bids-validator-deno not installed")


def _dataset(tmp_path, name="bids"):
    root = tmp_path / name
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "t", "BIDSVersion": "1.9.0", "Authors": ["A", "B"], "License": "CC0"}))
    return root


def validator_errors(path) -> list[dict]:
    res = validate_bids(path)
    return res.dataset + res.files


# ------------------------------------------------------------------------ acquisition entities
def test_runs_and_acquisitions_are_separate_subject_sessions(tmp_path):
    root = _dataset(tmp_path)
    for ents, seed in (("run-1", 1), ("run-2", 2), ("acq-fast_run-1", 3), ("run-10", 4)):
        write_megre_subject(root, "01", entities=ents, seed=seed)
    sss = find_subject_sessions(root)
    assert [s.key for s in sss] == ["sub-01_run-1", "sub-01_run-2", "sub-01_run-10", "sub-01_acq-fast_run-1"]
    assert sss[0].entities == {"run": "1"} and sss[3].acquisition == "acq-fast_run-1"
    for ss in sss:  # every echo file of an acquisition carries its own entities
        assert all(f"_{ss.acquisition}_" in e.phase.name for e in ss.echoes)
    cfg = PipelineConfig()
    out = tmp_path / "out"
    assert len({wf.work_paths(s, out)["work_url"] for s in sss}) == 4
    assert len({wf.work_paths(s, out)["transform_dir"] for s in sss}) == 4
    assert len({wf.resume_key(s, cfg) for s in sss}) == 4
    w = DerivativesWriter(out)
    assert len({w.roi_path(s.subject, s.session, **s.entities) for s in sss}) == 4
    assert len({w.manifest_path(s.subject, s.session, **s.entities) for s in sss}) == 4
    assert bids_stem("01", "pre", acq="fast", run="2", space="MNI", desc="smooth") == \
        "sub-01_ses-pre_acq-fast_run-2_space-MNI_desc-smooth"


def test_group_level_takes_one_acquisition_per_subject_session():
    rows = []
    for pid, acq, run, v in [("sub-01", "", "2", 2.0), ("sub-01", "", "1", 1.0), ("sub-01", "fast", "1", 9.0),
                             ("sub-02", "", "", 5.0), ("sub-03", "fast", "3", 7.0), ("sub-03", "fast", "10", 8.0)]:
        rows.append({"participant_id": pid, "session_id": "", "acq": acq, "ce": "", "rec": "", "dir": "",
                     "run": run, "mean_ppm": v})
    roi = pd.DataFrame(rows)
    picked, notes = select_acquisitions(roi)
    assert sorted(picked["mean_ppm"]) == [1.0, 5.0, 7.0]  # default acq, lowest run (3 before 10)
    assert any("sub-01" in n and "run-1" in n for n in notes)
    assert sorted(select_acquisitions(roi, run="highest")[0]["mean_ppm"]) == [2.0, 5.0, 8.0]
    fast, notes = select_acquisitions(roi, acq="fast")
    assert sorted(fast["mean_ppm"]) == [5.0, 7.0, 9.0]
    from qsmdask.stats.design import GroupDesign
    assert GroupDesign.from_dict({"acq": "fast", "run": "highest"}).run == "highest"
    with pytest.raises(ValueError, match="run must be"):
        GroupDesign.from_dict({"run": "first"})


# ------------------------------------------------------------------------ input vs output
def test_output_in_input_dataset_refused_before_writing(tmp_path, capsys):
    root = _dataset(tmp_path)
    write_megre_subject(root, "01")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    for out in (root, root / "out", root / "sub-01", root / "derivatives"):
        rc = main(["run", str(root), str(out), "participant", "--skip-bids-validation"])
        err = capsys.readouterr().err
        assert rc == EXIT_ERROR and "never writes into its input dataset" in err, err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert json.loads((root / "dataset_description.json").read_text())["Authors"] == ["A", "B"]
    check_output_location(root, root / "derivatives" / "qsmdask")  # the BIDS-App place is fine
    check_output_location(root, tmp_path / "elsewhere")
    check_output_location(root, "s3://bucket/prefix")
    with pytest.raises(ValueError, match="work folder"):
        check_output_location(root, root / "work", what="work folder (--work-dir)")


# ------------------------------------------------------------------------ stray entries
def test_stray_entries_are_ignored_or_one_failure_row(tmp_path, caplog):
    root = _dataset(tmp_path)
    write_megre_subject(root, "01", seed=1)
    write_megre_subject(root, "02", seed=2)
    (root / "sub-01_old").mkdir()
    (root / "sub-01_old" / "notes.txt").write_text("old scans")
    (root / "sub-02.txt").write_text("x")
    shutil.copytree(root / "sub-02", root / "sub-0 2")  # images under an unparsable subject folder
    with caplog.at_level(logging.WARNING, logger="qsmdask.io.bids"):
        errors: list = []
        sss = find_subject_sessions(root, errors=errors)
    assert [s.key for s in sss] == ["sub-01", "sub-02"]
    assert len(errors) == 1 and errors[0].path.endswith("sub-0 2") and errors[0].participant_id == "sub-0 2"
    assert "sub-01_old" in caplog.text and "sub-02.txt" in caplog.text
    assert [s.key for s in find_subject_sessions(root, ["01"], errors=[])] == ["sub-01"]
    # without an error list (library use) a label selection still is not stopped by them
    assert [s.key for s in find_subject_sessions(root, ["02"])] == ["sub-02"]
    plan = plan_participants(root, tmp_path / "out", PipelineConfig())
    assert [r["participant_id"] for r in plan.invalid] == ["sub-0 2"]
    assert plan.invalid[0]["stage"] == "discover" and len(plan.todo) == 2
    if validator_available():  # the official validator does not stop the cohort either
        (root / "participants.tsv").write_text("participant_id\tgroup\nsub-01\tpatient\nsub-02\tcontrol\n")
        res = validate_bids(root)
        assert res.dataset == [], res.dataset  # e.g. PARTICIPANT_ID_MISMATCH caused by sub-01_old
        plan = plan_participants(root, tmp_path / "out", PipelineConfig(), validation_errors=res.files)
        assert [s.key for s, _ in plan.todo] == ["sub-01", "sub-02"]
        assert [r["participant_id"] for r in plan.invalid] == ["sub-0 2"]


# ------------------------------------------------------------------------ file modes
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_honour_the_umask(tmp_path, umask, mode):
    from qsmdask.sim import simulate_cohort

    old = os.umask(umask)
    try:
        files = [atomic_write_bytes(tmp_path / "a" / "x.bin", b"1"),
                 save_nifti(tmp_path / "b.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4), sidecar={}),
                 tmp_path / "b.json",
                 write_parquet(pd.DataFrame({"a": [1]}), tmp_path / "t.parquet")]
        sim = tmp_path / "sim"
        simulate_cohort(sim, n_subjects=1, seed=3, n_sessions=1, voxel_size_mm=(6.0, 6.0, 6.0), t1w=False,
                        write_fields=False)
        files += [p for p in sim.rglob("*") if p.is_file()]
    finally:
        os.umask(old)
    assert len(files) > 10
    bad = {str(p): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != mode}
    assert not bad, bad


# ------------------------------------------------------------------------ full disk, work stores
def test_full_disk_failure_row_names_the_file(tmp_path, monkeypatch):
    root = _dataset(tmp_path)
    write_megre_subject(root, "01", entities="run-2")
    ss = find_subject_sessions(root)[0]
    w = DerivativesWriter(tmp_path / "out")

    def enospc(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(wf.StageError) as ei:
        with wf._stage(ss.key, "write"):
            w.save_image("01", "", "Chimap", np.zeros((3, 3, 3), np.float32), np.eye(4), run="2")
    monkeypatch.undo()
    row = wf.failure_row(ss, ei.value)
    assert row["file"].endswith("sub-01/anat/sub-01_run-2_Chimap.nii.gz"), row
    assert row["acquisition"] == "run-2" and row["error_type"] == "OSError"
    write_failures(tmp_path / "out", [row], attempted=[ss])
    t = pd.read_parquet(tmp_path / "out" / "failures.parquet")
    assert t["file"].iloc[0] == row["file"] and t["acquisition"].iloc[0] == "run-2"


@pytest.mark.parametrize("keep", [False, True])
def test_failed_subject_work_store_removed_unless_keep_work(tmp_path, keep):
    root = _dataset(tmp_path)
    write_megre_subject(root, "01", shape=(16, 16, 12))
    t1 = np.ones((16, 16, 12), np.float32)
    t1[2, 2, 2] = np.nan  # read after the MEGRE volumes are in the work store
    save_nifti(root / "sub-01/anat/sub-01_T1w.nii.gz", t1, np.eye(4))
    ss = find_subject_sessions(root)[0]
    out = tmp_path / "out"
    with pytest.raises(wf.StageError) as ei:
        wf.process_subject_session(ss, out, PipelineConfig(), keep_work=keep)
    assert ei.value.stage == "ingest" and ei.value.file.endswith("sub-01_T1w.nii.gz")
    store = Path(wf.work_paths(ss, out)["work_url"])
    assert store.exists() == keep


# ------------------------------------------------------------------------ official validator
@needs_validator
def test_simulated_raw_dataset_passes_the_official_validator(tmp_path):
    from qsmdask.sim import simulate_cohort

    root = tmp_path / "raw"
    simulate_cohort(root, n_subjects=2, seed=5, n_sessions=2, voxel_size_mm=(6.0, 6.0, 6.0), t1w=True,
                    write_fields=False)
    assert validator_errors(root) == []
    side = json.loads(next(root.glob("sub-*/ses-*/anat/*_part-phase_MEGRE.json")).read_text())
    assert side["Units"] == "rad" and "PhaseUnits" not in side


@needs_validator
def test_input_validation_dataset_errors_stop_file_errors_fail_one_subject(tmp_path, capsys):
    root = _dataset(tmp_path)
    (root / "README").write_text("test dataset\n")
    (root / "participants.tsv").write_text("participant_id\tgroup\nsub-01\tpatient\nsub-02\tcontrol\n")
    for sub in ("01", "02"):
        write_megre_subject(root, sub, seed=int(sub))
    bad = root / "sub-02/anat/sub-02_echo-2_part-phase_MEGRE.json"
    meta = json.loads(bad.read_text())
    del meta["Units"]  # required for part-phase files
    bad.write_text(json.dumps(meta))
    res = validate_bids(root)
    assert res.dataset == [] and res.files and all(f["location"].startswith("/sub-02/") for f in res.files)
    plan = plan_participants(root, tmp_path / "out", PipelineConfig(), validation_errors=res.files)
    assert [s.key for s, _ in plan.todo] == ["sub-01"]
    assert [(r["participant_id"], r["stage"]) for r in plan.invalid] == [("sub-02", "validate")]
    assert plan.invalid[0]["file"].endswith(bad.name.replace(".json", ".nii.gz")) or \
        plan.invalid[0]["file"].endswith(bad.name)

    (root / "dataset_description.json").write_text(json.dumps({"Name": "t"}))  # BIDSVersion required
    rc = main(["run", str(root), str(tmp_path / "out"), "participant"])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR and "BIDS validator" in err and "dataset_description.json" in err
    assert "--skip-bids-validation" in err
    assert not (tmp_path / "out" / "dataset_description.json").exists()


def test_bids_uri_and_dataset_link(tmp_path):
    assert bids_uri(tmp_path / "bids/sub-01/ses-a/anat/sub-01_ses-a_echo-1_part-mag_MEGRE.nii.gz") == \
        "bids:raw:sub-01/ses-a/anat/sub-01_ses-a_echo-1_part-mag_MEGRE.nii.gz"
    w = DerivativesWriter(tmp_path / "bids" / "derivatives" / "qsmdask")
    desc = json.loads(w.write_dataset_description(tmp_path / "bids").read_text())
    assert desc["DatasetLinks"] == {"raw": "../.."} and desc["SourceDatasets"] == [{"URL": "bids:raw:"}]
    assert "roi" in (w.root / ".bidsignore").read_text().split()
