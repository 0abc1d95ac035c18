"""Interoperability benchmark (section "interop" of docs/benchmarks.md, issue 15 defect 5).

Data written by another tool, reconstructed as a user would: the QSMxT team's forward model
``qsm-forward`` (pip, GPLv3; used here and in the tests only) simulates BIDS magnitude and
phase from a susceptibility model, and ``qsmdask run BIDS_DIR OUT participant`` (the real
command line, a Prefect server and a local Dask cluster) reconstructs it.

Head model: the 2016 QSM challenge's COSMOS map (``../shared/data/qsm2016``) with its brain
mask and evaluation labels (the ROIs), block-averaged by ``--factor`` (2: 80^3 voxels of
2.125 x 2.125 x 2.143 mm; 1: the native 160^3 at 1.06 mm). M0 is 1 in the brain, R2* =
15 /s + 80 /s/ppm * |chi| (about 3 T values), R1 = 1 /s. qsm-forward adds its own
second-order shim of the field over the mask and its receiver phase offset (a quadratic of
pi radians over the brain), and writes the affine rotated so that B0 is oblique to the
voxel axes (``diag(voxel) @ R``: a small shear when the voxels are anisotropic, which
qsmdask orthogonalises at ingest).

Acquisitions, one subject each: ``sub-me`` 4 echoes (TE 4/12/20/28 ms, ``MEGRE``) and
``sub-se`` a single echo (TE 20 ms; qsm-forward names it ``_part-phase_T2starw``).

Scores of the native Chimap against the model (downsampled as qsm-forward saved it in
``derivatives/qsm-forward``), inside the model's brain mask: qsm-ci ``score_arrays``
(demeaned NRMSE in percent, HFEN, XSIM, correlation; voxels the pipeline leaves out of its
final mask count as 0), the voxel correlation inside the final mask, the final mask's
coverage of the brain, and the ROI slope (least squares of ROI mean - mask mean of the
estimate on that of the model over the evaluation labels).

``--presets default tv_refit`` runs ``qsmdask run`` once per chain preset (``chain: {preset: ...}``)
on the same generated data.

Usage: python bench/interop.py [--factor 2] [--b0-dir 0.1 0.15 0.98] [--presets default ...] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "qsm2016"
sys.path.insert(0, str(ROOT / "bench"))

B0_OBLIQUE = (0.1, 0.15, 0.98)  # about 10.4 degrees from the voxel z axis
ECHOES_MULTI_S = (0.004, 0.012, 0.020, 0.028)
ECHO_SINGLE_S = (0.020,)


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    s = tuple((n // f) * f for n in a.shape)
    a = a[: s[0], : s[1], : s[2]]
    return a.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5))


def _block_labels(lab: np.ndarray, f: int) -> np.ndarray:
    """Majority label of each block (0 unless one label fills at least half of it)."""
    out = np.zeros(_block_mean(lab == 0, f).shape, dtype=np.int16)
    for k in np.unique(lab):
        if k == 0:
            continue
        out[_block_mean(lab == k, f) >= 0.5] = k
    return out


def write_head_model(model_dir, *, factor: int = 2, data_dir=DATA) -> Path:
    """Write the qsm-forward head model (chi, mask, seg, M0, R1, R2* NIfTIs) from the 2016 data.

    ``factor`` block-averages the 160^3 challenge grid (1: as it is).
    """
    import nibabel as nib

    data_dir = Path(data_dir)
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    img = nib.load(data_dir / "chi_cosmos.nii.gz")
    chi = img.get_fdata(dtype=np.float32)
    mask = nib.load(data_dir / "mask.nii.gz").get_fdata() > 0
    lab = np.rint(nib.load(data_dir / "evaluation_labels.nii.gz").get_fdata()).astype(np.int16)
    aff = img.affine.copy()
    if factor > 1:
        chi = _block_mean(chi * mask, factor).astype(np.float32)
        mask = _block_mean(mask.astype(np.float32), factor) >= 0.5
        lab = _block_labels(lab, factor)
        aff[:3, :3] = img.affine[:3, :3] * factor
        aff[:3, 3] = img.affine[:3, 3] + img.affine[:3, :3] @ np.full(3, (factor - 1) / 2.0)
    chi = np.where(mask, chi, 0).astype(np.float32)
    lab = np.where(mask, lab, 0).astype(np.int16)
    maps = {"chi": chi, "mask": mask.astype(np.float32), "seg": lab.astype(np.float32),
            "M0": mask.astype(np.float32),
            "R1": mask.astype(np.float32),
            "R2star": np.where(mask, 15.0 + 80.0 * np.abs(chi), 0).astype(np.float32)}
    for name, a in maps.items():
        nib.save(nib.Nifti1Image(a, aff), model_dir / f"{name}.nii.gz")
    return model_dir


def generate_dataset(bids_dir, model_dir, *, b0_dir=B0_OBLIQUE, b0_tesla: float = 3.0,
                     peak_snr: float = 100.0, seed: int = 1, multi=True, single=True) -> Path:
    """Run qsm-forward's ``generate_bids`` on the head model: ``sub-me`` (4 echoes) and/or
    ``sub-se`` (one echo), B0 along ``b0_dir`` (voxel axes of the model)."""
    import contextlib
    import io

    import nibabel as nib
    from qsm_forward import ReconParams, TissueParams, generate_bids

    bids_dir = Path(bids_dir)
    model_dir = Path(model_dir)
    vs = np.array(nib.load(model_dir / "chi.nii.gz").header.get_zooms()[:3], dtype=float)
    b = np.asarray(b0_dir, dtype=float)
    b = b / np.linalg.norm(b)
    acqs = ([("me", ECHOES_MULTI_S)] if multi else []) + ([("se", ECHO_SINGLE_S)] if single else [])
    for sub, tes in acqs:
        tissue = TissueParams(root_dir=str(model_dir), chi="chi.nii.gz", mask="mask.nii.gz",
                              seg="seg.nii.gz", M0="M0.nii.gz", R1="R1.nii.gz", R2star="R2star.nii.gz")
        recon = ReconParams(subject=sub, TEs=np.array(tes), TR=0.05, flip_angle=15, B0=b0_tesla,
                            B0_dir=b, voxel_size=vs, peak_snr=peak_snr, random_seed=seed)
        with contextlib.redirect_stdout(io.StringIO()):  # qsm-forward prints every step
            generate_bids(tissue, recon, str(bids_dir))
    return bids_dir


def run_qsmdask(bids_dir, out_dir, *, extra_args=(), config: dict | None = None, env=None,
                timeout_s: float = 1800) -> tuple[int, float, str]:
    """``qsmdask run BIDS_DIR OUT_DIR participant`` in a subprocess: (exit code, seconds, output)."""
    out_dir = Path(out_dir)
    args = [sys.executable, "-m", "qsmdask.cli", "run", str(bids_dir), str(out_dir), "participant",
            *extra_args]
    if config is not None:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        cfg = out_dir.parent / f"{out_dir.name}_config.json"
        cfg.write_text(json.dumps(config))
        args += ["--config", str(cfg)]
    e = dict(os.environ if env is None else env)
    if not e.get("PREFECT_API_URL") and "--prefect-port" not in extra_args:
        args += ["--prefect-port", str(_free_port())]  # not the default 4200 of a shared machine
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True, env=e, timeout=timeout_s)
    return p.returncode, time.perf_counter() - t0, p.stdout + p.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def roi_slope(est: np.ndarray, ref: np.ndarray, labels: np.ndarray, mask: np.ndarray,
              min_voxels: int = 2) -> tuple[float, int]:
    """Least-squares slope of (ROI mean - mask mean) of ``est`` on that of ``ref``."""
    e, r = [], []
    for k in np.unique(labels[mask]):
        sel = (labels == k) & mask
        if k == 0 or sel.sum() < min_voxels:
            continue
        e.append(est[sel].mean() - est[mask].mean())
        r.append(ref[sel].mean() - ref[mask].mean())
    if len(e) < 3:
        return float("nan"), len(e)
    return float(np.polyfit(r, e, 1)[0]), len(e)


def score_subject(bids_dir, out_dir, sub: str) -> dict:
    """Scores of ``OUT/sub-<sub>/anat/sub-<sub>_Chimap.nii.gz`` against qsm-forward's model."""
    import nibabel as nib
    from qsm_ci.qsm_eval import score_arrays

    truth_dir = Path(bids_dir) / "derivatives" / "qsm-forward" / f"sub-{sub}" / "anat"
    chi_t = nib.load(truth_dir / f"sub-{sub}_Chimap.nii").get_fdata(dtype=np.float32)
    mask_t = nib.load(truth_dir / f"sub-{sub}_mask.nii").get_fdata() > 0.5
    lab = np.rint(nib.load(truth_dir / f"sub-{sub}_dseg.nii").get_fdata()).astype(int)
    anat = Path(out_dir) / f"sub-{sub}" / "anat"
    chi = nib.load(anat / f"sub-{sub}_Chimap.nii.gz").get_fdata(dtype=np.float32)
    final = nib.load(anat / f"sub-{sub}_desc-brain_mask.nii.gz").get_fdata() > 0
    if chi.shape != chi_t.shape:
        raise ValueError(f"sub-{sub}: Chimap shape {chi.shape} differs from the model's {chi_t.shape}")
    s, _ = score_arrays(np.where(final, chi, 0), chi_t, mask_t, kind="chi")
    both = final & mask_t
    x = chi[both] - chi[both].mean()
    y = chi_t[both] - chi_t[both].mean()
    slope, n_roi = roi_slope(chi, chi_t, lab, both)
    side = json.loads((anat / f"sub-{sub}_Chimap.json").read_text())
    notes = side.get("Notes", [])
    return {"qsm-ci nrmse": float(s["nrmse"]), "hfen": float(s["hfen"]), "xsim": float(s["xsim"]),
            "qsm-ci corr": float(s["correlation"]),
            "voxel r in final mask": float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum())),
            "coverage %": 100.0 * float(both.sum() / mask_t.sum()),
            "ROI slope": slope, "n ROIs": n_roi,
            "notes": "; ".join(_short(n) for n in (notes if isinstance(notes, list) else [notes]))}


def _short(note: str) -> str:
    """A sidecar note without its file-name prefix, cut at the first parenthesis or semicolon."""
    text = note.split(": ", 1)[1] if note.startswith("sub-") and ": " in note else note
    return text.split(" (")[0].split(";")[0].split(": ")[0]


def affine_facts(bids_dir, sub: str) -> dict:
    """B0 direction qsm-forward used vs the one qsmdask reads from the written affine."""
    import nibabel as nib

    from qsmdask.geometry import affine_shear_deg
    from qsmdask.kernels import b0_direction_from_affine

    anat = Path(bids_dir) / f"sub-{sub}" / "anat"
    f = sorted(anat.glob(f"sub-{sub}*_part-phase_*.json"))[0]
    b_qf = np.asarray(json.loads(f.read_text())["B0_dir"], dtype=float)
    b_qf /= np.linalg.norm(b_qf)
    aff = nib.load(f.with_suffix(".nii")).affine
    b_q = b0_direction_from_affine(aff)
    return {"shear deg": float(affine_shear_deg(aff)),
            "B0 angle to z deg": float(np.degrees(np.arccos(abs(b_qf[2])))),
            "B0 read vs written deg": float(np.degrees(np.arccos(min(1.0, abs(float(b_q @ b_qf))))))}


def main(argv=None):
    from _report import machine_description, markdown_table, update_section

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factor", type=int, nargs="+", default=[2], help="block-average factors of the model")
    ap.add_argument("--b0-dir", type=float, nargs=3, default=B0_OBLIQUE)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--presets", nargs="+", default=["default"], help="chain presets, one qsmdask run each")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args(argv)
    from qsmdask.chain import PRESETS

    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        ap.error(f"unknown presets {unknown}; choose from {sorted(PRESETS)}")
    if not (DATA / "chi_cosmos.nii.gz").exists():
        print(f"{DATA} not found: nothing to do")
        return 0
    machine = machine_description()
    print(machine, flush=True)
    rows, geo = [], []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for f in args.factor:
            base = Path(tmp) / f"f{f}"
            t0 = time.perf_counter()
            model = write_head_model(base / "model", factor=f)
            bids = generate_dataset(base / "bids", model, b0_dir=args.b0_dir)
            t_gen = time.perf_counter() - t0
            for preset in args.presets:
                out = base / f"out-{preset}"
                rc, dt, log = run_qsmdask(bids, out, config={"registration_quick": True, "chain": {"preset": preset}},
                                          extra_args=["--nprocs", str(args.nprocs), "--skip-bids-validation"])
                print(log[-3000:], flush=True)
                for sub, what in (("me", "4 echoes (4/12/20/28 ms), MEGRE"), ("se", "1 echo (20 ms), T2starw")):
                    row = {"model voxel mm": f"{1.0625 * f:.3g}", "chain preset": preset, "acquisition": what,
                           "exit code": rc, "qsmdask run s (both)": dt, "qsm-forward s (both)": t_gen}
                    try:
                        row.update(score_subject(bids, out, sub))
                    except (OSError, ValueError) as e:
                        row["notes"] = f"not scored: {e}"
                    rows.append(row)
                    print(rows[-1], flush=True)
            for sub in ("me", "se"):
                geo.append({"model voxel mm": f"{1.0625 * f:.3g}", "sub": sub, **affine_facts(bids, sub)})
    body = (f"## interop\n\nMachine: {machine} (shared machine, loaded by other "
            "jobs: times are inflated)\n\nCommand: `python bench/interop.py "
            f"--factor {' '.join(map(str, args.factor))} --b0-dir {' '.join(map(str, args.b0_dir))}"
            f"{' --presets ' + ' '.join(args.presets) if args.presets != ['default'] else ''}`\n\n"
            "qsm-forward " + _qsm_forward_version() + " writes the BIDS data from the 2016 challenge COSMOS "
            "map (B0 oblique, its own shim and phase offset, peak SNR 100); `qsmdask run BIDS OUT "
            "participant --config {registration_quick: true, chain: {preset: P}}` reconstructs both "
            "subjects with each chain preset P. Scored inside the model's brain mask (see the script's docstring).\n\n"
            + markdown_table(rows, floatfmt=".3g") + "\n\nGeometry as written and as read:\n\n"
            + markdown_table(geo, floatfmt=".3g"))
    print(body)
    if not args.no_write:
        update_section("interop", body)
    return 0


def _qsm_forward_version() -> str:
    from importlib.metadata import version

    return version("qsm-forward")


if __name__ == "__main__":
    sys.exit(main())
