"""Planning and resume without re-reading unchanged files (issue 18: a resume of 10,000
subject-sessions read every input and every output byte, ~1 TB)."""

from __future__ import annotations

import os
import time

import numpy as np

from qsmdask.config import PipelineConfig
from qsmdask.io.bids import InputChecksums, find_subject_sessions


def _age(files, seconds=60):
    """Modification times in the past (files written just now are not cached: racy)."""
    t = time.time_ns() - int(seconds * 1e9)
    for f in files:
        os.utime(f, ns=(t, t))


def _count_reads(monkeypatch):
    from qsmdask.io import bids
    reads, real = [], bids._checksum_files

    def counting(files):
        reads.append(len(files))
        return real(files)

    monkeypatch.setattr(bids, "_checksum_files", counting)
    return reads


def test_unchanged_inputs_are_not_reread_and_a_change_is_seen(tiny_bids, tmp_path, monkeypatch):
    ss = find_subject_sessions(tiny_bids)[0]
    _age(ss.input_files())
    reads = _count_reads(monkeypatch)
    cache_file = tmp_path / "checksums.json"
    cache = InputChecksums(cache_file)
    first = ss.checksum(cache)
    assert first == ss.checksum() and len(reads) == 2  # computed once with the cache, once without
    cache.save()
    reads.clear()
    again = InputChecksums(cache_file)  # a later run
    assert ss.checksum(again) == first and reads == [] and again.hits == 1
    # same size, new content, mtime moved on: re-read, new checksum
    f = ss.echoes[0].phase
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert f.stat().st_size == st.st_size
    changed = ss.checksum(again)
    assert changed != first and changed == ss.checksum() and again.misses == 1
    # same size, new content, mtime put back to the cached value (cp -p, rsync -t): ctime differs
    time.sleep(0.01)
    again.save()
    data[-11] ^= 0xFF
    before = f.stat()
    f.write_bytes(bytes(data))
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert f.stat().st_mtime_ns == before.st_mtime_ns
    assert ss.checksum(InputChecksums(cache_file)) == ss.checksum() != changed


def test_file_modified_just_now_is_not_cached(tiny_bids):
    ss = find_subject_sessions(tiny_bids)[0]  # written by the fixture a moment ago
    cache = InputChecksums(None)
    ss.checksum(cache)
    assert cache.entries == {}  # racy: a write in the same mtime tick could go unseen
    _age(ss.input_files())
    ss.checksum(cache)
    assert len(cache.entries) == 1


def test_corrupt_cache_file_means_recompute(tiny_bids, tmp_path):
    (tmp_path / "c.json").write_text("{not json")
    ss = find_subject_sessions(tiny_bids)[0]
    assert ss.checksum(InputChecksums(tmp_path / "c.json")) == ss.checksum()


def test_replan_reads_no_input_and_no_output(tiny_bids, tmp_path, monkeypatch):
    """Second plan of a finished cohort: same resume keys, every subject-session up to date,
    no input file and no output file read."""
    from qsmdask.io import derivatives
    from qsmdask.io.derivatives import DerivativesWriter
    from qsmdask.workflows.cohort import plan_participants

    out = tmp_path / "out"
    for ss in find_subject_sessions(tiny_bids):
        _age(ss.input_files())
    cfg = PipelineConfig()
    plan = plan_participants(tiny_bids, out, cfg)
    assert plan.checksums_read == 2 and plan.checksums_cached == 0
    w = DerivativesWriter(out)
    for ss, key in plan.todo:  # what write_outputs leaves: outputs, then the manifest
        img = w.save_image(ss.subject, ss.session, "Chimap", np.zeros((3, 3, 3), np.float32), np.eye(4))
        roi = w.save_roi_table(ss.subject, ss.session, __import__("pandas").DataFrame({"roi": ["putamen"]}))
        w.write_manifest(ss.subject, ss.session, [img, roi], config=cfg.to_dict(),
                         status={"status": "done", "resume_key": key})
    reads = _count_reads(monkeypatch)
    digests = []
    real_digest = derivatives.file_digest
    monkeypatch.setattr(derivatives, "file_digest", lambda p: digests.append(p) or real_digest(p))
    again = plan_participants(tiny_bids, out, cfg)
    assert [s.key for s in again.skipped] == [s.key for s, _ in plan.todo] and not again.todo
    assert again.checksums_cached == 2 and reads == [] and digests == []


def test_manifest_intact_checks_size_and_mtime_then_reads_on_change(tmp_path, monkeypatch):
    from qsmdask.io import derivatives
    from qsmdask.io.derivatives import DerivativesWriter

    w = DerivativesWriter(tmp_path)
    p = w.save_image("01", "", "Chimap", np.zeros((3, 3, 3), np.float32), np.eye(4))
    man = __import__("json").loads(w.write_manifest("01", "", [p], config={}, status={"status": "done"})
                                   .read_text())
    digests = []
    real_digest = derivatives.file_digest
    monkeypatch.setattr(derivatives, "file_digest", lambda q: digests.append(q) or real_digest(q))
    assert w.manifest_intact(man) and digests == []
    assert w.manifest_intact(man, verify=True) and len(digests) == 1
    # same size, other bytes, other mtime: read, and found changed
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[20] ^= 0xFF
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert not w.manifest_intact(man) and len(digests) == 2
    # an older manifest without recorded mtimes: every file is read
    for e in man["files"]:
        e.pop("mtime_ns", None)
    assert not w.manifest_intact(man) and len(digests) == 3


def test_discovery_lists_the_dataset_root_once(tmp_path, monkeypatch):
    """Discovery listed the dataset folder (one entry per subject) for every echo: quadratic in
    the cohort (10,000 subject-sessions: 40,000 listings of 5,000 entries). Once now, and a
    top-level sidecar still applies to every subject-session."""
    import json
    from pathlib import Path

    from tests.conftest import write_megre_subject

    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    for i in range(6):
        write_megre_subject(root, f"{i:02d}", "pre", seed=i, shape=(4, 4, 4))
    (root / "echo-1_MEGRE.json").write_text(json.dumps({"Manufacturer": "Acme"}))
    calls = []
    real_glob = Path.glob

    def counting_glob(self, pattern, *a, **k):
        if pattern.endswith("MEGRE.json"):
            calls.append(pattern)
        return real_glob(self, pattern, *a, **k)

    monkeypatch.setattr(Path, "glob", counting_glob)
    found = find_subject_sessions(root)
    assert len(found) == 6 and len(calls) == 1


def test_plan_fingerprints_the_configuration_once(tmp_path, monkeypatch):
    """The plan hashed the whole configuration for every subject-session (about a third of a
    10,000 resume plan); once per plan now, with the same resume keys."""
    import json

    from tests.conftest import write_megre_subject
    from qsmdask.workflows.cohort import plan_participants
    from qsmdask.workflows.participant import resume_key

    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    for i in range(5):
        write_megre_subject(root, f"{i:02d}", "pre", seed=i, shape=(4, 4, 4))
    cfg = PipelineConfig()
    calls = []
    real = PipelineConfig.fingerprint
    monkeypatch.setattr(PipelineConfig, "fingerprint", lambda self: calls.append(1) or real(self))
    plan = plan_participants(root, tmp_path / "out", cfg)
    assert len(plan.todo) == 5 and len(calls) == 1
    assert [k for _, k in plan.todo] == [resume_key(ss, cfg) for ss, _ in plan.todo]


def test_discovery_lists_nifti_names_like_rglob(tmp_path):
    """Discovery walks each subject folder once (rglob stat'ed every file): same files, same
    order, symlinked folders not followed, folders named like NIfTI files left out."""
    from qsmdask.io.bids import _nifti_files_under

    sub = tmp_path / "sub-01"
    for rel in ("ses-b/anat/sub-01_ses-b_echo-1_part-mag_MEGRE.nii.gz", "ses-a/anat/x_T1w.nii",
                "ses-a/anat/x_T1w.json", "ses-a/anat/y.nii.gz", "ses-a/func/z.nii.gz"):
        (sub / rel).parent.mkdir(parents=True, exist_ok=True)
        (sub / rel).write_bytes(b"x")
    (sub / "ses-a" / "anat" / "dir.nii").mkdir()
    (sub / "linked").symlink_to(sub / "ses-a", target_is_directory=True)
    expected = sorted(p for p in sub.rglob("*") if p.is_file() and p.name.endswith((".nii.gz", ".nii")))
    assert _nifti_files_under(sub) == expected and len(expected) == 4
