"""Smoke test of bench/recon.py (--quick: one small phantom, no simulated head, no docs update)."""

from __future__ import annotations

from .conftest import load_bench


def test_bench_recon_quick(capsys):
    mod = load_bench("recon")
    assert mod.main(["--quick", "--skip-timing", "--skip-heads"]) == 0
    out = capsys.readouterr().out
    assert "## recon" in out
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| small: 1 mm iso 64^3")]
    assert len(rows) == 4  # noise-free and SNR 100, default and study chains
    by = {(r[1], r[2].split(":")[0]): r for r in rows}
    for cells in rows:
        nrmse, max_err, dice = float(cells[3]), float(cells[5]), float(cells[7])
        assert dice > 0.95 and nrmse < 100 and max_err < 80
    # the default chain keeps deep-grey contrast that the study's V-SHARP + TKD loses
    assert float(by[("inf", "default")][5]) < 20 < float(by[("inf", "study")][5])
    assert float(by[("inf", "default")][3]) < float(by[("inf", "study")][3])


def test_refit_start_rows_are_valid_chain_configurations():
    """Every row of --refit-start is a ChainConfig the chain accepts (the correction from the start
    with tv_outside_weight was an error before session 8) and puts the correction where it says."""
    from qsmdask.chain import ChainConfig

    mod = load_bench("recon")
    for name, opts in {**mod.REFIT_START_2016, **mod.REFIT_START_CHAINS}.items():
        cfg = ChainConfig.from_dict(opts)
        early = cfg.lbv_boundary_estimate_iter > 0
        assert cfg.boundary_correction_stage == ("start" if early else
                                                 None if cfg.lbv_boundary_depth_mm == 0 else "bregman"), name
    early = ChainConfig.preset("tv_refit_early")
    assert (early.boundary_correction_stage, early.tv_outside_weight, early.tv_debias) == ("start", 1.0, "refit")


def test_refit_shape_rows_are_valid_chain_configurations():
    """Every row of --refit-shape is a ChainConfig the chain accepts; the rows named "no amplitude" or
    "without amplitude" (and the "the same" rows after them) switch the amplitude step off."""
    from qsmdask.chain import ChainConfig

    mod = load_bench("recon")
    previous = None
    for name, opts in {**mod.REFIT_SHAPE_2016, **mod.REFIT_SHAPE_CHAINS}.items():
        cfg = ChainConfig.from_dict(opts)
        off = ("no amplitude" in name or "without amplitude" in name
               or (name.startswith("the same, lambda") and previous is False))
        assert cfg.tv_refit_amplitude is not off or cfg.tv_debias == "none", name
        previous = cfg.tv_refit_amplitude if cfg.tv_debias == "refit" else None


def test_pass2_rows_are_the_chains_their_names_say():
    """Every row of --pass2 is a ChainConfig the chain accepts, and the band threshold in a row's
    name is the one it runs (the preset's row included)."""
    import re

    from qsmdask.chain import ChainConfig

    mod = load_bench("recon")
    for name, opts in mod.PASS2_2016.items():
        cfg = ChainConfig.from_dict(opts)
        m = re.search(r"pass 2, (\d+) mm, band threshold ([\d.]+) ppm", name)
        if m is None:
            assert name.startswith("single_pass") and cfg.boundary_pass2_depth_mm == 0
            continue
        assert cfg.boundary_correction_stage == "bregman", name
        assert (cfg.boundary_pass2_depth_mm, cfg.lbv_boundary_pass2_threshold_ppm) == (
            float(m.group(1)), float(m.group(2))), name
    assert mod.PASS2_CHAINS == mod.PASS2_2016
