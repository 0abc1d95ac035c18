"""Reports: the QC figure (PNG) and the self-contained cohort HTML report."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qsmdask.report import build_cohort_report, qc_figure, qc_numbers
from qsmdask.report.html import methods_paragraph

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAILED_MESSAGE = "phase image sub-099_ses-pre_echo-2_part-phase_MEGRE.nii.gz has 3 echoes, magnitude 4"


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG_MAGIC
    assert png[12:16] == b"IHDR"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


# ---------------------------------------------------------------------------------- QC figure
def _phantom(shape=(40, 36, 20), voxel_size_mm=(1.0, 1.0, 2.5)):
    """Ellipsoidal 'brain' with a paramagnetic 'pallidum' and its dipole field."""
    from qsmdask.kernels import dipole_kernel
    vs = np.asarray(voxel_size_mm)
    grid = np.stack(np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * v for n, v in zip(shape, vs)],
                                indexing="ij"), axis=-1)
    brain = ((grid / np.array([17.0, 15.0, 22.0])) ** 2).sum(-1) <= 1.0
    blob = ((grid - np.array([5.0, 0.0, 0.0])) ** 2).sum(-1) <= 16.0
    chi = np.where(blob, 0.15, 0.0).astype(np.float32) * brain
    field = np.real(np.fft.ifftn(dipole_kernel(shape, vs) * np.fft.fftn(chi))).astype(np.float32)
    labels = np.zeros(shape, np.int16)
    labels[blob] = 3
    labels[brain & (grid[..., 0] < -8)] = 7
    mag = np.where(brain, 100.0, 5.0).astype(np.float32)
    return mag, brain, field + 0.05 * brain, field * brain, chi, labels, vs


def test_qc_figure_is_a_png_with_sensible_size():
    mag, brain, total, local, chi, labels, vs = _phantom()
    png = qc_figure(mag, brain, total, local, chi, voxel_size_mm=vs, labels=labels,
                    title="sub-01 ses-pre")
    w, h = _png_size(png)
    assert (w, h) == (900, 1150)  # 9 x 11.5 in at 100 dpi
    assert 20_000 < len(png) < 2_000_000
    from matplotlib.image import imread
    img = imread(io.BytesIO(png))
    # the figure is not blank: the red mask outline and coloured field maps are drawn
    assert img[..., :3].std() > 0.1
    red = (img[..., 0] > 0.8) & (img[..., 1] < 0.3) & (img[..., 2] < 0.3)
    assert red.sum() > 50


def test_qc_figure_validates_inputs_and_accepts_4d_magnitude():
    mag, brain, total, local, chi, labels, vs = _phantom(shape=(24, 24, 12))
    png = qc_figure(np.stack([mag, mag], -1), brain, total, local, chi, voxel_size_mm=vs)
    assert png[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="chi_ppm"):
        qc_figure(mag, brain, total, local, chi[:-1], voxel_size_mm=vs)
    with pytest.raises(ValueError, match="voxel_size_mm"):
        qc_figure(mag, brain, total, local, chi, voxel_size_mm=(1, 1))
    # empty mask still draws (slices through the volume centre)
    assert qc_figure(mag, np.zeros_like(brain), total, local, chi, voxel_size_mm=vs)[:8] == PNG_MAGIC


def test_qc_slices_are_drawn_in_millimetres():
    """Anisotropic voxels: each view spans the field of view in mm, not in voxels."""
    from qsmdask.report.qc import _extent, mask_centroid
    shape, vs = (40, 36, 20), np.array([1.0, 1.0, 2.5])
    assert _extent(shape, vs, 2) == (0.0, 40.0, 0.0, 36.0)   # axial: x by y
    assert _extent(shape, vs, 1) == (0.0, 40.0, 0.0, 50.0)   # coronal: x by z (20 x 2.5 mm)
    assert _extent(shape, vs, 0) == (0.0, 36.0, 0.0, 50.0)   # sagittal: y by z
    assert mask_centroid(np.zeros(shape, bool)) == (20, 18, 10)


def test_qc_numbers_against_construction():
    shape, vs = (20, 20, 10), (1.0, 1.5, 2.0)
    mask = np.zeros(shape, bool)
    mask[5:15, 4:12, 2:8] = True            # 10 x 8 x 6 voxels
    chi = np.zeros(shape, np.float32)
    chi[5:15, 4:12, 2:3] = 0.5             # one of six planes outside the window
    labels = np.zeros(shape, np.int32)
    labels[0:10, 4:12, 2:8] = 1            # half inside the mask
    labels[10:15, 4:12, 2:8] = 2
    q = qc_numbers(mask, chi, voxel_size_mm=vs, labels=labels)
    assert q["mask_extent_x_mm"] == 10.0 and q["mask_extent_y_mm"] == 12.0
    assert q["mask_extent_z_mm"] == 12.0
    assert q["chi_outside_window_fraction"] == pytest.approx(1 / 6)
    assert (q["mask_centroid_x"], q["mask_centroid_y"], q["mask_centroid_z"]) == (10.0, 8.0, 5.0)
    assert q["atlas_in_mask_fraction"] == pytest.approx(10 / 15)
    assert q["atlas_labels_present"] == 2.0


# ------------------------------------------------------------------------------- cohort report
def _synthetic_output(tmp_path: Path, *, with_perm: bool = False) -> tuple[Path, Path]:
    from qsmdask.io.derivatives import DerivativesWriter
    from qsmdask.io.tables import write_parquet
    from qsmdask.stats import GroupDesign, run_group_analysis
    from qsmdask.stats.correlation import clinical_correlation
    from qsmdask.stats.simulate import simulate_roi_cohort

    roi, participants, sessions = simulate_roi_cohort(
        n_patients=8, n_controls=8, rois={"putamen": 0.05, "caudate": 0.06, "pallidum": 0.15},
        hemispheres=("L", "R", "B"), sessions=("ses-pre", "ses-post"),
        group_effect_ppm={"putamen": 0.04}, sd_ppm=0.01, n_sites=2, seed=3)
    bids, out = tmp_path / "bids", tmp_path / "derivatives"
    bids.mkdir()
    participants.to_csv(bids / "participants.tsv", sep="\t", index=False)
    for pid, s in sessions.groupby("participant_id"):
        (bids / pid).mkdir()
        s.drop(columns="participant_id").to_csv(bids / pid / f"{pid}_sessions.tsv", sep="\t",
                                                index=False)
    roi["qc_mask_volume_ml"] = 1200.0
    roi["qc_fit_residual_rad"] = 0.05
    for (pid, ses), t in roi.groupby(["participant_id", "session_id"]):
        t = t.copy()
        t["qc_mask_volume_ml"] = 1200.0 + 10 * (int(pid[-3:]) % 5)
        if pid == "sub-004" and ses == "ses-post":
            t["qc_mask_volume_ml"] = 300.0  # a QC outlier
        write_parquet(t, out / "roi" / f"{pid}_{ses}_roi.parquet")
    tables = run_group_analysis(roi, participants, sessions,
                                design=GroupDesign(tests=("group_wilcoxon",), ci_method="analytic"))
    tables["clinical_correlation"] = clinical_correlation(roi, participants, sessions)
    for name, df in tables.items():
        write_parquet(df, out / "group" / f"{name}.parquet")
    failures = pd.DataFrame([{"participant_id": "sub-099", "session_id": "ses-pre",
                              "stage": "ingest", "file": "sub-099/ses-pre/anat/x.nii.gz",
                              "error_type": "InputError", "message": FAILED_MESSAGE}])
    write_parquet(failures, out / "failures.parquet")
    DerivativesWriter(out).write_run_config(
        {"level": "participant", "bids_dir": str(bids),
         "config": {"chain": {"bgremove_method": "sharp", "inversion_method": "tkd", "tkd_threshold": 0.2},
                    "registration": "syn", "atlas": "aal"}})
    if with_perm:
        # the workflow's QC figure of the QC outlier (inlined by the report's QC section)
        mag, brain, total, local, chi, labels, vs = _phantom(shape=(24, 24, 12))
        DerivativesWriter(out).save_bytes("004", "post", "qc", qc_figure(
            mag, brain, total, local, chi, voxel_size_mm=vs, title="sub-004 ses-post"),
            ext=".png", desc="recon")
        from qsmdask.io.nifti import save_nifti
        shape = (16, 18, 14)
        t = np.zeros(shape, np.float32)
        t[2:14, 2:16, 2:12] = 0.5
        t[5:9, 6:10, 5:8] = 6.0
        logp = np.where(t > 5, 2.5, 0.1).astype(np.float32)
        aff = np.diag([2.0, 2.0, 2.0, 1.0])
        save_nifti(out / "group" / "perm_t.nii.gz", t, aff)
        save_nifti(out / "group" / "perm_logp_fwe_t.nii.gz", logp, aff)
        write_parquet(pd.DataFrame([{"cluster": 1, "sign": 1, "size_voxels": 48, "size_mm3": 384.0,
                                     "peak_stat": 6.0, "peak_x_mm": 10.0, "peak_y_mm": 14.0,
                                     "peak_z_mm": 12.0, "peak_label": "Putamen_L",
                                     "p_fwe_size": 0.004, "p_fwe_mass": 0.002}]),
                      out / "group" / "perm_clusters.parquet")
    return out, bids


def _assert_self_contained(text: str):
    low = text.lower()
    for bad in ('src="http', "src='http", 'href="http', "href='http", "@import", "<script",
                "url(", "<link"):
        assert bad not in low, bad


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """The synthetic output folder (with voxel-wise results) and its report, built once."""
    out, bids = _synthetic_output(tmp_path_factory.mktemp("report"), with_perm=True)
    return out, build_cohort_report(out, bids)


@pytest.mark.slow
def test_report_builds_with_sections_and_failures(full_report):
    out, path = full_report
    assert path == out / "report.html"
    text = path.read_text()
    _assert_self_contained(text)
    for sid in ("findings", "cohort", "group", "course", "voxelwise", "postmortem", "failures",
                "qc", "methods", "versions"):
        assert f'<section id="{sid}">' in text
    assert "could not be built" not in text
    # figures are inline PNG
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(imgs) >= 6
    # the planted putamen effect is reported as a finding, the null ROIs are not
    findings = text.split('<section id="findings">')[1].split("</section>")[0]
    differs = next(li for li in findings.split("<li>") if "differs between groups" in li)
    assert "<b>putamen</b>" in differs and "pallidum" not in differs and "caudate" not in differs
    assert "patient higher than control" in differs
    # the failed subject and its reason
    assert "sub-099" in text and FAILED_MESSAGE in text
    # the QC outlier is flagged
    qc = text.split('<section id="qc">')[1].split("</section>")[0]
    assert "sub-004" in qc and "QC figure sub-004_ses-post" in qc
    # cohort counts: 16 participants x 2 sessions, two sites
    cohort = text.split('<section id="cohort">')[1].split("</section>")[0]
    assert "<b>32</b> from <b>16</b>" in cohort and "site2" in cohort
    # methods generated from the recorded configuration, with references
    methods = text.split('<section id="methods">')[1].split("</section>")[0]
    assert "SHARP" in methods and "V-SHARP" not in methods and "threshold 0.2" in methods
    assert "symmetric diffeomorphic (SyN)" in methods and "Tzourio-Mazoyer" in methods
    assert "Shmueli" in methods and "Nichols" in methods  # voxel-wise results present
    # the cluster table
    assert "Putamen_L" in text
    for pkg in ("numpy", "scipy", "nibabel", "dask", "prefect"):
        assert f"<td>{pkg}</td>" in text


def test_report_survives_missing_inputs(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    text = build_cohort_report(out).read_text()
    _assert_self_contained(text)
    assert "could not be built" not in text
    assert "No ROI tables" in text
    assert "No voxel-wise permutation results" in text
    assert "No failures table" in text
    assert "defaults shown" in text


def test_report_voxelwise_from_perm_results_argument(tmp_path):
    """perm_results given directly: MIPs, peak slices and the cluster table; only FWE voxels shown."""
    shape = (12, 14, 10)
    t = np.zeros(shape, np.float32)
    t[1:11, 1:13, 1:9] = 0.3
    t[3:6, 4:8, 3:6] = -5.0                  # significant negative cluster (36 voxels)
    logp = np.where(t < -4, 3.0, 0.2).astype(np.float32)
    clusters = pd.DataFrame({"cluster": [1], "sign": [-1], "size_voxels": [36], "peak_stat": [-5.0],
                             "peak_label": ["Caudate_R"], "p_fwe_size": [0.001]})
    text = build_cohort_report(tmp_path, perm_results={"t": t, "logp_fwe_t": logp, "clusters": clusters,
                                                       "affine": np.diag([2.0, 2, 2, 1])}).read_text()
    _assert_self_contained(text)
    vox = text.split('<section id="voxelwise">')[1].split("</section>")[0]
    assert "<b>36</b> voxel(s) significant" in vox
    assert vox.count("data:image/png;base64,") == 2
    assert "Caudate_R" in vox and 'class="sig"' in vox
    assert "Nichols" in text  # methods cite the permutation references


def test_report_reads_group_design_and_runs_from_command_line(tmp_path, capsys):
    import json

    from qsmdask.report.__main__ import main
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "qsmdask_group_config.json").write_text(json.dumps(
        {"design": {"alpha": 0.01, "correction": "holm", "combat": True}}))
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.html")
    methods = (tmp_path / "report.html").read_text().split('<section id="methods">')[1]
    assert "alpha = 0.01" in methods and "Holm" in methods and "ComBat" in methods
    assert main([str(tmp_path / "missing")]) == 1


def test_methods_paragraph_follows_configuration():
    text, cited = methods_paragraph({"chain": {}, "atlas": "/data/BN_Atlas_274_noCb_uint16.nii.gz"})
    assert "Laplacian boundary value" in text and "Brainnetome" in text
    assert "total-variation" in text and "Bregman" in text and "lambda 0.002" in text
    assert cited[:5] == ["otsu1979", "schofield2003", "zhou2014", "bilgic2014", "osher2005"]
    study, cited = methods_paragraph({"chain": {"mask_method": "bet", "unwrap_method": "laplacian",
                                                "bgremove_method": "vsharp", "inversion_method": "tkd"}})
    assert "V-SHARP" in study and "thresholded k-space division" in study and "0.2" in study
    assert cited[:4] == ["smith2002", "schofield2003", "wu2012", "schweser2011"]
    numbers = [int(n) for n in re.findall(r"\[(\d+)", text)]
    assert numbers == sorted(numbers)  # references numbered in order of first citation
    assert "deeper than 20 mm" in text and "boundary condition had removed" in text  # the default
    off, _ = methods_paragraph({"chain": {"lbv_boundary_depth_mm": 0.0}})
    assert "boundary condition had removed" not in off


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium")
                                        else None)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_report_renders_in_headless_chromium(full_report, tmp_path):
    _, path = full_report
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
           "--v=0", f"--screenshot={shot}", "--window-size=1280,2000", path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    assert shot.exists(), log[-2000:]
    w, h = _png_size(shot.read_bytes())
    assert (w, h) == (1280, 2000)
    assert "Uncaught" not in log and "ERROR:CONSOLE" not in log
    from matplotlib.image import imread
    img = imread(str(shot))
    assert img[..., :3].std() > 0.05  # not a blank page


# -- issue 16: datasets without sessions, findings, figure labels -------------------------------------
def _no_session_output(tmp_path: Path) -> tuple[Path, Path]:
    from qsmdask.io.tables import write_parquet
    from qsmdask.stats import GroupDesign, run_group_analysis
    from qsmdask.stats.correlation import clinical_correlation
    from qsmdask.stats.simulate import simulate_roi_cohort

    roi, participants, sessions = simulate_roi_cohort(
        n_patients=12, n_controls=12, rois={"putamen": 0.05, "caudate": 0.06},
        hemispheres=("L", "R", "B"), sessions=("",), group_effect_ppm={"putamen": 0.04}, sd_ppm=0.01,
        seed=4)
    assert set(roi["session_id"]) == {""}
    bids, out = tmp_path / "bids", tmp_path / "derivatives"
    bids.mkdir()
    participants.to_csv(bids / "participants.tsv", sep="\t", index=False)
    for pid, t in roi.groupby("participant_id"):
        write_parquet(t, out / "roi" / f"{pid}_roi.parquet")
    tables = run_group_analysis(roi, participants, None,
                                design=GroupDesign(tests=("group_wilcoxon",), ci_method="analytic"))
    tables["clinical_correlation"] = clinical_correlation(roi, participants, None)
    for name, df in tables.items():
        write_parquet(df, out / "group" / f"{name}.parquet")
    return out, bids


@pytest.fixture(scope="module")
def no_session_report(tmp_path_factory):
    """Report of a dataset without sessions, with the clinical panels' titles and axis labels."""
    from qsmdask.report import html as rh
    out, bids = _no_session_output(tmp_path_factory.mktemp("nosession"))
    panels, real = [], rh._scatter_figure

    def spy(*a, **k):
        fig = real(*a, **k)
        if fig is not None:
            fig.canvas.draw()
            renderer, box = fig.canvas.get_renderer(), fig.bbox
            for ax in fig.axes:
                tb = ax.get_tightbbox(renderer)
                inside = (tb.x0 >= box.x0 - 1 and tb.y0 >= box.y0 - 1 and tb.x1 <= box.x1 + 1
                          and tb.y1 <= box.y1 + 1)
                panels.append({"variable": a[1], "title": ax.get_title(), "xlabel": ax.get_xlabel(),
                               "ylabel": ax.get_ylabel(), "inside": inside})
        return fig

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rh, "_scatter_figure", spy)
        text = build_cohort_report(out, bids).read_text()
    return text, panels


def test_report_without_sessions_builds_the_disease_course(no_session_report):
    text, _ = no_session_report
    assert "could not be built" not in text  # was: IndexError in the disease-course section
    course = text.split('<section id="course">')[1].split("</section>")[0]
    assert "ROI susceptibility vs hdrs" in course and ", session" not in course


def test_intercepts_and_small_strata_are_never_findings():
    from qsmdask.report.html import _finding
    t = pd.DataFrame({"term": ["Intercept", "group", "group", "const"],
                      "stratum": ["", "", "F", ""], "n": [40, 40, 6, 40],
                      "p_corrected": [1e-9, 0.01, 0.001, 1e-5]})
    assert _finding(t, 0.05).tolist() == [False, True, False, False]
    # a correlation within 8 patients is not a finding either; a 8-vs-8 comparison is
    cc = pd.DataFrame({"variable": ["hdrs", "hdrs"], "n": [8, 24], "p_corrected": [0.01, 0.01]})
    assert _finding(cc, 0.05).tolist() == [False, True]
    gw = pd.DataFrame({"n1": [8], "n2": [8], "p_corrected": [0.001]})
    assert _finding(gw, 0.05).tolist() == [True]


def test_clinical_panel_titles_carry_r_and_corrected_p_and_units(no_session_report):
    _, panels = no_session_report
    hdrs = [p for p in panels if p["variable"] == "hdrs"]
    assert len(hdrs) == 2  # putamen and caudate, pooled hemispheres
    for p in hdrs:  # clinical_correlation has these rows: r and corrected p in the title
        assert re.search(r"n = 12\nr = -?\d\.\d\d, p_corr = \d", p["title"]), p["title"]
        assert (p["xlabel"], p["ylabel"]) == ("HDRS-17 score (points)", "chi (ppm)")
    crp = [p for p in panels if p["variable"] == "crp"]  # no partial_correlation table written
    assert crp and all(re.search(r"r = -?\d\.\d\d, p_corr n/a", p["title"]) for p in crp)
    assert crp[0]["xlabel"] == "CRP (mg/L)"
    assert all(p["inside"] for p in panels), [p["title"] for p in panels if not p["inside"]]


def test_qc_figure_directions_common_fov_outlines_and_outside_colour():
    from matplotlib.colors import to_rgba
    from matplotlib.image import AxesImage

    from qsmdask.report.qc import OUTSIDE_MASK_COLOUR, qc_figure, qc_figure_object
    mag, brain, total, local, chi, labels, vs = _phantom(shape=(56, 48, 24))  # a margin around the head
    affine = np.diag([-vs[0], vs[1], vs[2], 1.0])  # LAS: the first voxel axis points left
    fig = qc_figure_object(mag, brain, total, local, chi, voxel_size_mm=vs, labels=labels, affine=affine)
    panels = [ax for ax in fig.axes if ax.images and ax.get_xticks().size == 0]
    assert len(panels) == 12  # 4 rows x 3 views
    rows = [panels[i:i + 3] for i in range(0, 12, 3)]
    for col in range(3):  # the same field of view in every row, tighter than the volume
        assert len({(r[col].get_xlim(), r[col].get_ylim()) for r in rows}) == 1
    assert rows[0][0].get_xlim()[1] - rows[0][0].get_xlim()[0] < brain.shape[0] * vs[0]
    letters = {t.get_text() for t in rows[0][0].texts}
    assert letters == {"L", "R", "A", "P"}
    right_edge = next(t for t in rows[0][0].texts if t.get_position() == (0.99, 0.5))
    assert right_edge.get_text() == "L"  # voxel x increases to the left in this affine
    assert {t.get_text() for t in rows[0][2].texts} == {"A", "P", "S", "I"}
    # chi under the atlas: one image (chi) and thin line outlines, no opaque overlay
    chi_axial = rows[3][0]
    assert sum(isinstance(a, AxesImage) for a in chi_axial.get_children()) == 1 and chi_axial.collections
    # outside the mask: its own colour in the field and chi rows
    for r in rows[1:]:
        cmap = r[0].images[0].get_cmap()
        assert np.allclose(cmap(np.ma.masked)[:3], to_rgba(OUTSIDE_MASK_COLOUR)[:3])
        assert np.ma.is_masked(r[0].images[0].get_array())
    png = qc_figure(mag, brain, total, local, chi, voxel_size_mm=vs, labels=labels, affine=affine)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_sidecar_method_names_the_chain_and_its_references():
    from qsmdask.report.references import REFERENCES, chain_method
    m = chain_method({"mask_method": "bet", "bgremove_method": "vsharp", "inversion_method": "iterative_tkd"})
    assert "BET" in m["Method"] and "V-SHARP" in m["Method"] and "iterative TKD" in m["Method"]
    assert "Tang et al. 2013" in m["Method"] and "Smith 2002" in m["Method"]
    assert REFERENCES["tang2013"] in m["MethodReferences"] and REFERENCES["wu2012"] in m["MethodReferences"]
    d = chain_method(None)  # the defaults: LBV + TV with a Bregman step
    assert "LBV (Zhou et al. 2014)" in d["Method"] and REFERENCES["osher2005"] in d["MethodReferences"]


def test_citation_cff_matches_the_package():
    import tomllib

    import yaml
    root = Path(__file__).resolve().parents[1]
    cff = yaml.safe_load((root / "CITATION.cff").read_text())
    for key in ("cff-version", "message", "title", "authors", "version", "license"):
        assert cff.get(key), key
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert str(cff["version"]) == project["version"] and cff["license"] == "BSD-3-Clause"


def test_methods_paragraph_names_the_permutation_scheme():
    from qsmdask.report.references import REFERENCES

    hj, cited = methods_paragraph(None, voxelwise=True)
    assert "Huh-Jhun" in hj and "Freedman-Lane" not in hj and "huh2001" in cited
    fl, cited = methods_paragraph(None, voxelwise=True, voxelwise_scheme="freedman_lane")
    assert "Freedman-Lane" in fl and "Huh-Jhun" not in fl and "freedman1983" in cited
    assert REFERENCES["huh2001"].startswith("Huh MH, Jhun M (2001)")


def test_methods_cites_only_the_correction_used_and_names_reference_and_seed():
    """Holm and Benjamini-Hochberg were cited (and listed) even when Bonferroni was used; the
    reference and the registration seed must be named."""
    from qsmdask.stats.design import GroupDesign

    text, cited = methods_paragraph({"chain": {}, "reference": "white_matter", "registration_seed": 7},
                                    design=GroupDesign(correction="bonferroni"))
    assert "holm1979" not in cited and "benjamini1995" not in cited
    assert "Holm" not in text and "Benjamini" not in text and "Bonferroni correction" in text
    assert "white matter" in text.lower() and "seed 7" in text
    numbers = sorted({int(n) for n in re.findall(r"\[(\d+)", text)})
    assert numbers == list(range(1, len(cited) + 1))  # every listed reference is cited in the text
    text, cited = methods_paragraph({"chain": {}}, design=GroupDesign(correction="holm"))
    assert "holm1979" in cited and "benjamini1995" not in cited


def test_methods_and_sidecar_describe_the_single_step_inversion():
    from qsmdask.report.references import chain_method

    text, cited = methods_paragraph({"chain": {"inversion_method": "tv_laplacian"}})
    assert "one step" in text and "Laplacian of the field" in text and "LBV" not in text
    assert "langkammer2015" in cited and "zhou2014" not in cited
    m = chain_method({"inversion_method": "tv_laplacian"})["Method"]
    assert "one step" in m and "LBV" not in m and "TKD" not in m


def _voxelwise_section_without_findings(tmp_path, subjects, n_patients, power) -> str:
    """The voxel-wise section of a report whose analysis (baseline ses-pre) found nothing:
    a recorded voxel-wise configuration with ``power`` and a flat t map below threshold."""
    import json

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "qsmdask_voxelwise_config.json").write_text(json.dumps({
        "session_id": "ses-pre", "session_choice": "chronological baseline",
        "subjects": subjects, "n_patients": n_patients, "power": power}))
    t = np.zeros((12, 14, 10), np.float32)
    t[1:11, 1:13, 1:9] = 1.5
    logp = np.full(t.shape, 0.1, np.float32)
    text = build_cohort_report(tmp_path, perm_results={"t": t, "logp_fwe_t": logp,
                                                       "affine": np.diag([2.0, 2, 2, 1])}).read_text()
    return text.split('<section id="voxelwise">')[1].split("</section>")[0]


def test_report_voxelwise_nothing_significant_says_not_detected_with_power(tmp_path):
    """Issue 14 section 4: an empty voxel-wise result says 'not detected at n = ...' and what
    the analysis could have detected (FWE threshold and detectable effect at 80 % power)."""
    from qsmdask.perm.permute import detectable_effect_size, fwe_t_threshold

    null = np.random.default_rng(3).normal(5.0, 0.5, size=499)
    t_fwe = fwe_t_threshold(null, 0.05)
    d = detectable_effect_size(t_fwe, 8, 8, dof=13)
    assert 2.5 < d < 5  # 8 vs 8 at a whole-brain threshold: only very large differences
    vox = _voxelwise_section_without_findings(
        tmp_path, [f"sub-{i:02d}" for i in range(16)], 8,
        {"fwe_alpha": 0.05, "fwe_t_threshold": t_fwe, "n_permutations": 499, "dof": 13,
         "detectable_d_power80": d})
    assert "ses-pre" in vox and "<b>Not detected</b>" in vox and "n = 16 (8 patients, 8 controls)" in vox
    assert f"t &ge; {t_fwe:.2f}" in vox and f"{d:.2f} within-group standard deviations" in vox


def test_report_voxelwise_undetectable_at_this_n(tmp_path):
    """2 vs 2 subjects: no difference reaches the FWE threshold with 80 % power; the report says
    so instead of 'too few permutations' (the config stores null, JSON has no inf)."""
    vox = _voxelwise_section_without_findings(
        tmp_path, ["sub-01", "sub-02", "sub-03", "sub-04"], 2,
        {"fwe_alpha": 0.05, "fwe_t_threshold": 1e9, "n_permutations": 199, "dof": 1,
         "detectable_d_power80": None, "undetectable_at_this_n": True})
    assert "which no group difference reaches with 80 % probability at this n" in vox
    assert "Too few permutations" not in vox
