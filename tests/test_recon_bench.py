"""Smoke test of bench/recon.py (--quick: one small phantom, no simulated head, no docs update)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_bench_recon_quick(capsys):
    path = Path(__file__).resolve().parents[1] / "bench" / "recon.py"
    spec = importlib.util.spec_from_file_location("bench_recon", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick", "--skip-timing", "--skip-heads"]) == 0
    out = capsys.readouterr().out
    assert "## recon" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 1 mm iso 64^3")]
    assert len(rows) == 2  # noise-free and SNR 40
    for cells in rows:
        nrmse, roi_err, dice = (float(c) for c in cells[3:6])
        assert dice > 0.95 and nrmse < 100 and roi_err < 80
    clean = [c for c in rows if c[1].strip() == "inf"][0]
    assert float(clean[3]) < 60
