"""Shared test fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_megre_subject(root: Path, sub: str, ses: str = "", *, n_echoes=2, shape=(12, 12, 10),
                        affine=None, seed=0, phase_scale=1.0, sidecar_extra=None, entities=""):
    """A tiny but valid MEGRE subject-session (random data) for IO tests.

    ``entities``: acquisition entities placed after the session, e.g. ``"acq-fast_run-2"``.
    """
    from qsmdask.io.nifti import save_nifti
    rng = np.random.default_rng(seed)
    affine = np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine
    anat = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + (f"_{entities}" if entities else "")
    paths = []
    for e in range(1, n_echoes + 1):
        meta = {"EchoTime": 0.005 * e, "MagneticFieldStrength": 3.0, "EchoNumber": e}
        meta.update(sidecar_extra or {})
        mag = rng.uniform(10, 100, shape).astype(np.float32)
        ph = (rng.uniform(-np.pi, np.pi, shape) * phase_scale).astype(np.float32)
        paths.append(save_nifti(anat / f"{stem}_echo-{e}_part-mag_MEGRE.nii.gz", mag, affine, sidecar=meta))
        paths.append(save_nifti(anat / f"{stem}_echo-{e}_part-phase_MEGRE.nii.gz", ph, affine,
                                sidecar={"Units": "rad", **meta}))  # Units: required by BIDS for phase
    return paths


@pytest.fixture
def tiny_bids(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    (root / "participants.tsv").write_text("participant_id\tgroup\tage\nsub-01\tpatient\t30\nsub-02\tcontrol\t31\n")
    write_megre_subject(root, "01", "pre", seed=1)
    write_megre_subject(root, "02", "pre", seed=2)
    return root


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One real Prefect server (with its scheduler service) for the whole test session.

    Started like the CLI does, so Dask worker processes reach it through PREFECT_API_URL.
    """
    from qsmdask.orchestration.server import _free_port, ensure_prefect_api

    saved = os.environ.pop("PREFECT_API_URL", None)
    os.environ["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "2"
    api = ensure_prefect_api(port=_free_port(), home=tmp_path_factory.mktemp("prefect"), timeout_s=240)
    from prefect.settings import PREFECT_API_URL, temporary_settings
    try:
        with temporary_settings(updates={PREFECT_API_URL: api.url}):
            yield api
    finally:
        api.stop()
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved


def load_bench(name: str):
    """The script ``bench/<name>.py`` as a module (bench/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def halo_head_shifts(chains: dict, seed: int = 101) -> tuple[dict, dict]:
    """Head ``seed`` of bench/halo.py (2 mm, 3 echoes, noise-free) reconstructed by each of ``chains``
    (name -> ChainConfig options) without and with +0.05 ppm in putamen, thalamus and hippocampus:
    per chain the worst non-adjacent shift (% of the effect, no reference) and the chi correlation
    with the truth in the brain label."""
    from qsmdask.atlas import load_atlas

    halo = load_bench("halo")
    atlas = load_atlas("aal")
    rows = halo.fix_table(seed, "noise-free", 1e6, atlas, halo._adjacent_rois(atlas), chains=chains)
    return ({r["chain"]: r["non-adjacent max abs %"] for r in rows},
            {r["chain"]: r["chi corr with truth (brain label)"] for r in rows})


def rfft_ops(shape):
    """The (forward, inverse) real-FFT pair on an unpadded grid of ``shape``, as the inversions'
    private solvers (e.g. ``tv_admm._refit``) take them."""
    import scipy.fft as sfft

    def fwd(x):
        return sfft.rfftn(x)

    def inv(x):
        return sfft.irfftn(x, s=shape).astype(np.float32)

    return fwd, inv
