"""Group labels mapped by the design file (issue 16): any two values of participants.group,
and an unmapped value is an error naming the column and the values found."""

from __future__ import annotations

import pandas as pd
import pytest

from qsmdask.stats import GroupDesign, group_wilcoxon, run_group_analysis
from qsmdask.stats.simulate import simulate_roi_cohort

WILCOXON = dict(tests=("group_wilcoxon",), ci_method="analytic", rois=None, hemispheres=None)


@pytest.fixture(scope="module")
def cohort():
    return simulate_roi_cohort(n_patients=12, n_controls=13, group_effect_ppm={"putamen": 0.02}, seed=5)


def _relabel(part, mapping):
    p = part.copy()
    p["group"] = p["group"].map(mapping)
    return p


@pytest.mark.parametrize("mapping, design_groups", [
    ({"patient": "MDD", "control": "HC"}, {"patient": "MDD", "control": "HC"}),
    ({"patient": 1, "control": 0}, {"patient": 1, "control": 0}),
    ({"patient": "MDD", "control": "HC"}, ["MDD", "HC"]),  # the list form names them as written
])
def test_any_two_values_give_the_same_result(cohort, mapping, design_groups):
    roi, part, ses = cohort
    expected = group_wilcoxon(roi, part, ci_method="analytic")
    design = GroupDesign.from_dict({"groups": design_groups, **WILCOXON})
    out = run_group_analysis(roi, _relabel(part, mapping), ses, design=design)
    got = out["group_wilcoxon"]
    assert len(got) == len(expected) and got["n"].tolist() == expected["n"].tolist()
    pd.testing.assert_series_equal(got["p"], expected["p"])
    pd.testing.assert_series_equal(got["effect_size"], expected["effect_size"])


def test_numeric_values_read_as_floats_still_map(cohort):
    roi, part, ses = cohort
    p = _relabel(part, {"patient": 1.0, "control": 0.0})
    p.loc[p.index[0], "group"] = float("nan")  # an empty cell: left out, not an error
    design = GroupDesign.from_dict({"groups": {"patient": 1, "control": 0}, **WILCOXON})
    labelled = design.label_groups(p)
    assert set(labelled["group"].dropna()) == {"patient", "control"} and labelled["group"].isna().sum() == 1
    assert "group_wilcoxon" in run_group_analysis(roi, p, ses, design=design)


def test_unmapped_values_are_an_error_naming_column_and_values(cohort):
    roi, part, ses = cohort
    p = _relabel(part, {"patient": "MDD", "control": "HC"})
    # before: the default design (patient/control) skipped every group test silently
    with pytest.raises(ValueError) as e:
        run_group_analysis(roi, p, ses, design=GroupDesign(**WILCOXON))
    msg = str(e.value)
    assert "column 'group'" in msg and "['HC', 'MDD']" in msg and "groups: {patient: <value>, control: <value>}" in msg
    # a third value is an error too, even when the other two are mapped
    p.loc[p.index[0], "group"] = "excluded"
    with pytest.raises(ValueError, match=r"value\(s\) \['excluded'\].*values found: \['HC', 'MDD', 'excluded'\]"):
        GroupDesign.from_dict({"groups": {"patient": "MDD", "control": "HC"}}).label_groups(p)


def test_design_mapping_round_trips_and_is_validated():
    d = GroupDesign.from_dict({"groups": {"patient": "MDD", "control": "HC"}})
    assert d.groups == ("patient", "control") and d.group_values == ("MDD", "HC")
    assert GroupDesign.from_dict(d.to_dict()) == d
    with pytest.raises(ValueError, match="two group names"):
        GroupDesign.from_dict({"groups": {"patient": "MDD"}})
    with pytest.raises(ValueError, match="two distinct values"):
        GroupDesign.from_dict({"groups": {"patient": "X", "control": "X"}})
    # clinical analyses follow group 1 when the list form renames the groups
    assert GroupDesign(groups=("MDD", "HC")).clinical_group == "MDD"
    with pytest.raises(ValueError, match="clinical_group"):
        GroupDesign(groups=("MDD", "HC"), clinical_group="nobody")
