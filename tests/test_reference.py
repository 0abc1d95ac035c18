"""Susceptibility referencing (issue 14): reference regions, values, configuration."""

import numpy as np
import pandas as pd
import pytest

from qsmdask.config import PipelineConfig
from qsmdask.reference import (lateral_ventricle_prior, r2star_map, reference_mask,
                               reference_value, validate_reference)


def test_validate_reference_and_config():
    for ok in ("csf", "whole_brain", "white_matter", "none", "roi:occipital"):
        assert validate_reference(ok) == ok
        assert PipelineConfig(reference=ok).reference == ok
    for bad in ("CSF", "ventricles", "roi:", 3):
        with pytest.raises(ValueError, match="reference must be"):
            PipelineConfig(reference=bad)
    with pytest.raises(ValueError, match="reference_erode_mm"):
        PipelineConfig(reference_erode_mm=-1)
    # the reference is part of the resume key: changing it recomputes the subject-session
    assert PipelineConfig(reference="none").fingerprint() != PipelineConfig().fingerprint()


def test_r2star_map_recovers_decay():
    te = np.array([0.004, 0.012, 0.020])
    r2 = np.full((4, 4, 4), 20.0)
    r2[0] = 4.0
    mag = 100 * np.exp(-te[None, None, None, :] * r2[..., None])
    est = r2star_map(mag, te)
    np.testing.assert_allclose(est, r2, rtol=1e-6)


def test_planted_offset_is_removed_by_each_reference():
    """A map = tissue + per-subject offset: every reference removes the offset exactly."""
    shape = (30, 30, 30)
    mask = np.zeros(shape, bool)
    mask[3:27, 3:27, 3:27] = True
    labels = np.zeros(shape, np.int32)
    labels[5:12, 5:25, 5:25] = 1
    labels[14:25, 5:25, 5:25] = 2
    table = pd.DataFrame({"index": [1, 2], "name": ["A_L", "B_L"], "roi": ["a", "b"],
                          "hemisphere": ["L", "L"]})
    prior = np.zeros(shape, bool)
    prior[12:15, 8:22, 8:22] = True  # the "ventricle" between the two regions
    tissue = np.where(labels == 1, 0.05, np.where(labels == 2, -0.02, 0.0))
    r2 = np.where(prior, 4.0, 20.0)
    for offset in (0.0, -0.013):
        chi = (tissue + offset) * mask
        for ref in ("csf", "roi:b"):
            region, info = reference_mask(ref, mask=mask, voxel_size_mm=(1, 1, 1), erode_mm=1.0,
                                          prior=prior, labels=labels, label_table=table,
                                          r2star_hz=r2)
            value = reference_value(chi, region)
            expect = offset + (0.0 if ref == "csf" else -0.02)
            assert value == pytest.approx(expect, abs=1e-12)
            assert info["n_voxels"] == region.sum() > 20
        assert reference_mask("none", mask=mask, voxel_size_mm=1)[0].sum() == 0
        assert reference_value(chi, np.zeros(shape, bool)) == 0.0
    with pytest.raises(ValueError, match="no atlas ROI group or label named 'c'"):
        reference_mask("roi:c", mask=mask, voxel_size_mm=1, labels=labels, label_table=table)
    with pytest.raises(ValueError, match="voxels left"):
        reference_mask("csf", mask=mask, voxel_size_mm=1, prior=prior, erode_mm=3.0)


def test_lateral_ventricle_prior_of_the_template():
    from qsmdask.atlas import load_template_tissue

    csf, aff = load_template_tissue("csf", 2)
    vent = lateral_ventricle_prior(csf, aff)
    ijk = np.argwhere(vent)
    xyz = ijk @ aff[:3, :3].T + aff[:3, 3]
    left, right = xyz[xyz[:, 0] < 0], xyz[xyz[:, 0] > 0]
    # two lateral ventricles of a few ml each, off the midline, above the thalamus level
    assert 3000 < len(left) * 8 < 12000 and 3000 < len(right) * 8 < 12000
    assert abs(left[:, 0].mean()) > 8 and abs(right[:, 0].mean()) > 8
    assert xyz[:, 2].mean() > 5
