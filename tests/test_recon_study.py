"""Issue 15 item 4: the study's inversion as published (Tang et al. 2013) and the `study` preset."""

from __future__ import annotations

import numpy as np
import pytest

from qsmdask import inversion
from qsmdask.chain import PRESETS, ChainConfig, reconstruct
from qsmdask.config import PipelineConfig
from qsmdask.sim.geometric import make_phantom


def test_study_preset_resolves_and_overrides():
    c = ChainConfig.preset("study")
    assert (c.mask_method, c.bgremove_method, c.inversion_method) == ("bet", "vsharp", "iterative_tkd")
    assert (c.iterative_tkd_threshold, c.iterative_tkd_max_iter) == (0.1, 4)
    assert c.iterative_tkd_structure_n_sd > 0
    c2 = ChainConfig.from_dict({"preset": "study", "phase_sign": -1})
    assert c2.phase_sign == -1 and c2.inversion_method == "iterative_tkd"
    # the pipeline configuration stores the resolved options (the fingerprint does not depend
    # on how they were written)
    a = PipelineConfig.from_dict({"chain": {"preset": "study"}})
    b = PipelineConfig.from_dict({"chain": {k: v for k, v in PRESETS["study"].items()}})
    assert a.to_dict() == b.to_dict() and a.fingerprint() == b.fingerprint()
    with pytest.raises(ValueError, match="preset must be one of"):
        ChainConfig.from_dict({"preset": "fast"})
    with pytest.raises(ValueError, match="iterative_tkd_threshold"):
        ChainConfig(iterative_tkd_threshold=0.9)


def test_structure_mask_from_the_initial_estimate_helps():
    """Tang 2013's geometry constraint: structures from the TKD start; it lowers the error of
    the threshold-0.1 iteration, and the iteration stops by its rule within 4 steps."""
    p = make_phantom(shape=(64, 64, 64), snr=100, seed=5)
    m, f, vs, b = p["brain_mask"], p["local_field_ppm"], p["voxel_size_mm"], p["b0_dir"]
    truth = p["chi_ppm"][m] - p["chi_ppm"][m].mean()

    def nrmse(c):
        x = c[m] - c[m].mean()
        return np.linalg.norm(x - truth) / np.linalg.norm(truth)

    sm = inversion.structure_mask_from_estimate(inversion.tkd(f, m, vs, b0_dir=b, threshold=0.1), m)
    assert sm.any() and not (sm & ~m).any()
    assert sm[p["labels"] == 3].mean() > 0.5  # the pallidum-like structure is found
    plain = inversion.iterative_tkd(f, m, vs, b0_dir=b, threshold=0.1, max_iter=4)
    struct = inversion.iterative_tkd(f, m, vs, b0_dir=b, threshold=0.1, max_iter=4, structure_mask="initial")
    assert nrmse(struct) < nrmse(plain) - 0.02, (nrmse(struct), nrmse(plain))
    with pytest.raises(ValueError, match="structure_mask"):
        inversion.iterative_tkd(f, m, vs, structure_mask="veins")


def test_study_preset_chain_runs_on_a_phantom():
    p = make_phantom(shape=(48, 48, 48), voxel_size_mm=(1.3, 1.3, 1.3), snr=80, seed=4,
                     echo_times_s=(0.005, 0.01, 0.015))
    r = reconstruct(p["magnitude"], p["phase_rad"], p["echo_times_s"], p["voxel_size_mm"],
                    b0_dir=p["b0_dir"], b0_tesla=3.0, config=ChainConfig.preset("study"))
    m = r.mask
    assert np.corrcoef(r.chi_ppm[m], p["chi_ppm"][m])[0, 1] >= 0.7


def test_study_preset_sidecar_names_its_own_threshold():
    """The Method sidecar of the iterative TKD names iterative_tkd_threshold (0.1 in the study
    preset), not TKD's threshold (0.4)."""
    from qsmdask.report.references import chain_method

    method = chain_method({"preset": "study"})["Method"]
    assert "iterative TKD, threshold 0.1, up to 4 iterations" in method
    assert "threshold 0.4" not in method
