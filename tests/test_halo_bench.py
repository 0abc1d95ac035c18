"""bench/halo.py's accuracy column on the rim-kept final mask (issue 14 benchmark)."""

from __future__ import annotations

import numpy as np

from .conftest import load_bench


def test_chi_corr_counts_only_the_brain_label():
    """A final mask with a rim outside the brain label, where the simulator's chi is bone (-1 ppm)
    and the estimate 0: the brain's correlation is what the column reports, not the rim's."""
    rng = np.random.default_rng(0)
    shape = (20, 20, 20)
    brain = np.zeros(shape, bool)
    brain[3:17, 3:17, 3:17] = True
    final = np.zeros(shape, bool)
    final[2:18, 2:18, 2:18] = True  # one voxel of rim outside the brain all round
    truth = np.where(brain, rng.normal(0, 0.03, shape), np.where(final, -1.0, 0)).astype(np.float32)
    chi = np.where(brain, truth + rng.normal(0, 0.01, shape), 0).astype(np.float32)
    got = load_bench("halo").brain_corr(chi, truth, final, brain)
    assert got > 0.9
    assert np.corrcoef(chi[final], truth[final])[0, 1] < 0.5  # what the column gave with the rim


def test_chains_option_goes_with_fix_and_never_writes_the_doc():
    """``--chains`` replaces FIX_CHAINS for a printed comparison only: without ``--fix`` or with
    ``--write-doc`` it is an argument error before anything is simulated."""
    import pytest

    halo = load_bench("halo")
    for argv in (["--chains", "{}"], ["--fix", "--chains", "{}", "--write-doc"]):
        with pytest.raises(SystemExit):
            halo.main(argv)
