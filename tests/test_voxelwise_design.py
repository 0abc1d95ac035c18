"""Voxel-wise design choices (issue 14): baseline session, nested covariates."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qsmdask.workflows.voxelwise import _design_inputs, choose_session


def _files(sessions):
    return [Path(f"sub-{i:02d}_ses-{s}_space-MNI152NLin2009aSym_desc-smooth_Chimap.nii.gz")
            for i in range(1, 4) for s in sessions]


def test_voxelwise_uses_the_chronological_baseline():
    files = _files(["post", "pre"])
    # before the fix the alphabetically first session ("post", the follow-up) was analysed
    sid, how = choose_session(files, None, None)
    assert sid == "ses-pre" and "name" in how
    # acquisition times decide when present, whatever the names say
    ses = pd.DataFrame({"participant_id": ["sub-01", "sub-01"], "session_id": ["ses-a", "ses-b"],
                        "acq_time": ["2024-05-01T10:00:00", "2024-01-01T10:00:00"]})
    sid, how = choose_session(_files(["a", "b"]), ses, None)
    assert sid == "ses-b" and "acq_time" in how
    assert choose_session(files, None, "post") == ("ses-post", "configured")
    with pytest.raises(ValueError, match="ses-fu1"):
        choose_session(files, None, "ses-fu1")
    assert choose_session([Path("sub-01_space-X_Chimap.nii.gz")], None, None) == ("", "no sessions")


def test_voxelwise_leaves_out_covariate_nested_in_group():
    ids = [f"sub-{i:02d}" for i in range(16)]
    rng = np.random.default_rng(0)
    part = pd.DataFrame({"participant_id": ids, "group": ["patient"] * 8 + ["control"] * 8,
                         "age": rng.normal(40, 10, 16).round(), "sex": ["M", "F"] * 8,
                         "medication": [1] * 7 + [0] * 9})  # 7/8 patients, 0/8 controls
    group, cov, left_out, diag = _design_inputs(part, ids, ("age", "sex", "medication"))
    assert sorted(cov) == ["age", "sex"]
    assert [c for c, _ in left_out] == ["medication"] and "constant in group 'control'" in left_out[0][1]
    row = diag[diag.covariate == "medication"].iloc[0]
    assert row.left_out and row.vif > 4 and "control: 0/8" in row.coverage
    kept = _design_inputs(part, ids, ("age", "sex", "medication"), keep=("medication",))
    assert "medication" in kept[1] and not kept[2]
