"""Chain options of this session (keep_boundary_layer, quality_dilate_min_gradient_rad,
tv_bregman_fraction, preset tv_refit_mask) as a user sets them: the error a bad value gives,
and what the methods text and the Chimap sidecar's Method say about them."""
import numpy as np
import pytest

from qsmdask.chain import ChainConfig, reconstruct
from qsmdask.config import PipelineConfig
from qsmdask.sim.geometric import make_phantom


@pytest.mark.parametrize("key", ["tv_bregman_fraction", "quality_dilate_min_gradient_rad", "tv_lambda",
                                 "tv_refit_mu", "lbv_boundary_depth_mm", "tv_max_iter", "mask_threshold_fraction"])
@pytest.mark.parametrize("value", ["abc", "1e-3", True, [0.5]])
def test_a_non_numeric_value_names_the_option(key, value):
    """A text (YAML 1.1 reads 1e-3, without a decimal point, as text), a bool or a list where a
    number belongs: the error names the option, not numpy's ufunc or a comparison of str and int."""
    with pytest.raises(ValueError, match=key) as e:
        PipelineConfig.from_dict({"chain": {key: value}}).chain_config()
    if value == "1e-3":
        assert "1.0e-3" in str(e.value)  # how to write it


@pytest.mark.parametrize("key", ["quality_mask", "fit_offset"])
def test_a_non_bool_switch_names_the_option(key):
    """'false' as text is truthy: it would have switched the step on."""
    with pytest.raises(ValueError, match=key):
        ChainConfig.from_dict({key: "false"})


@pytest.mark.parametrize("chain", [{"inversion_method": "tkd"}, {"preset": "study"},
                                   {"inversion_method": "tv_laplacian"}, {"tv_mask_data": False},
                                   {"preset": "tv_refit"}, {"inversion_method": "tgv", "tgv_mask_data": False}])
def test_keep_boundary_layer_where_no_inversion_can_use_it_is_an_error(chain):
    """It used to be dropped without a word (the final mask stayed the eroded mask): the user
    asked for the rim and got neither it nor a message."""
    with pytest.raises(ValueError, match="keep_boundary_layer"):
        ChainConfig.from_dict({**chain, "keep_boundary_layer": True})
    ChainConfig.from_dict({**chain, "keep_boundary_layer": False})
    # the default (null: automatic) stays valid and keeps no layer there
    assert not ChainConfig.from_dict(chain).boundary_layer_kept


def test_keep_boundary_layer_accepted_with_tv_refit_mask():
    c = ChainConfig.preset("tv_refit_mask", keep_boundary_layer=True)
    assert c.keep_boundary_layer and c.tv_mask_data
    assert ChainConfig(inversion_method="tgv", keep_boundary_layer=True).keep_boundary_layer


def test_tv_laplacian_uses_tv_bregman_fraction():
    """The methods text of tv_laplacian says 'adding back 0.5 of the field residual' for
    tv_bregman_fraction 0.5; the chain used to drop the option for that inversion (full step)."""
    p = make_phantom(shape=(40, 40, 36), snr=60, seed=2)
    args = (p["magnitude"], p["phase_rad"], p["echo_times_s"], p["voxel_size_mm"])
    kw = dict(b0_dir=p["b0_dir"], b0_tesla=p["b0_tesla"])
    base = ChainConfig(inversion_method="tv_laplacian", tv_max_iter=8, tv_bregman_max_iter=8)
    full = reconstruct(*args, **kw, config=base).chi_ppm
    half = reconstruct(*args, **kw, config=base.replace(tv_bregman_fraction=0.5)).chi_ppm
    none = reconstruct(*args, **kw, config=base.replace(tv_bregman_iterations=0)).chi_ppm
    step = np.abs(full - none).max()
    assert step > 0
    # the half step lies between no step and the full one
    assert 0.1 * step < np.abs(half - none).max() < 0.9 * step, (np.abs(half - none).max(), step)


def test_methods_text_and_sidecar_method_say_the_rim_is_kept():
    """keep_boundary_layer changes what the final mask holds (a layer whose chi is not fitted to
    data); the report's methods paragraph and the Chimap sidecar's Method said nothing of it."""
    from qsmdask.report.html import methods_paragraph
    from qsmdask.report.references import chain_method

    text, _ = methods_paragraph({"chain": {"keep_boundary_layer": True}})
    assert "boundary layer" in text and "without data" in text
    assert methods_paragraph({"chain": {}})[0] == text  # the default keeps it (automatic)
    plain, _ = methods_paragraph({"chain": {"keep_boundary_layer": False}})
    assert "boundary layer" not in plain
    for chain in ({"inversion_method": "tkd"}, {"preset": "study"}, {"bgremove_method": "vsharp"}):
        assert "boundary layer" not in methods_paragraph({"chain": chain})[0]  # automatic: not kept
    meth = chain_method({"keep_boundary_layer": True})["Method"]
    assert "boundary layer kept" in meth and chain_method({})["Method"] == meth
    assert "boundary layer" not in chain_method({"keep_boundary_layer": False})["Method"]
    # tv_refit_mask: the second solve on the corrected data is named in the sidecar too
    meth = chain_method({"preset": "tv_refit_mask"})["Method"]
    assert "second solve of 15 iterations on the data with the boundary-field correction" in meth
    assert "Bregman" not in meth and "data refit (mu 0.1" in meth
    lap = chain_method({"inversion_method": "tv_laplacian", "tv_bregman_fraction": 0.5})["Method"]
    assert "residual fraction 0.5" in lap


def test_methods_text_describes_the_quality_mask_dilation():
    from qsmdask.report.html import methods_paragraph

    text, _ = methods_paragraph({"chain": {"quality_dilate_min_gradient_rad": 0.5}})
    assert "neighbours within 1 voxel" in text and "exceeded 0.5 rad" in text
    text, _ = methods_paragraph({"chain": {}})
    assert "neighbours within 1 voxel" in text and "exceeded" not in text
    text, _ = methods_paragraph({"chain": {"quality_dilate_voxels": 0}})
    assert "neighbours" not in text.split("excluded")[0].split("aliased")[1]


def test_methods_text_gives_the_iterative_tkd_threshold():
    """The study preset's iterative TKD uses iterative_tkd_threshold 0.1; the methods paragraph
    printed tkd_threshold (0.4, the plain TKD's)."""
    from qsmdask.report.html import methods_paragraph

    text, _ = methods_paragraph({"chain": {"preset": "study"}})
    assert "Tang et al." in text and "threshold 0.1," in text and "threshold 0.4" not in text
    assert "at most 4 iterations" in text


def test_keep_boundary_layer_scales_the_refit_weight_like_lambda(monkeypatch):
    """keep_boundary_layer solves on the quality mask with data weight 1 on the eroded part, which
    tv_admm normalises to 1/p (p: the eroded share); the chain divides lambda by p^2 so that the
    problem is the default mask's. The refit's closeness weight mu sits beside the same data term
    and needs the same scaling, or tv_refit_mask with the rim refits with mu * p^2."""
    import qsmdask.chain as chainmod

    calls = []
    real = chainmod.inversion.tv_admm

    def spy(*a, **kw):
        calls.append((a[1], kw))
        return real(*a, **kw)

    monkeypatch.setattr(chainmod.inversion, "tv_admm", spy)
    p = make_phantom(shape=(36, 36, 32), snr=60, seed=2)
    args = (p["magnitude"], p["phase_rad"], p["echo_times_s"], p["voxel_size_mm"])
    kw = dict(b0_dir=p["b0_dir"], b0_tesla=p["b0_tesla"])
    cfg = ChainConfig.preset("tv_refit_mask", tv_max_iter=4, tv_bregman_max_iter=4, keep_boundary_layer=False)
    r0 = reconstruct(*args, **kw, config=cfg)
    r1 = reconstruct(*args, **kw, config=cfg.replace(keep_boundary_layer=True))
    (m0, k0), (m1, k1) = calls
    assert m0.sum() == r0.mask.sum() and m1.sum() == r1.mask.sum() > m0.sum()
    share = float(m0.sum()) / float(m1.sum())
    assert k1["lam"] == pytest.approx(k0["lam"] / share ** 2)
    assert k1["refit_mu"] == pytest.approx(k0["refit_mu"] / share ** 2)


def test_methods_text_and_sidecar_describe_tgv():
    """inversion_method tgv (merged this session) fell through to the TKD branch of the methods
    paragraph and of the sidecar's Method: 'thresholded k-space division ... threshold 0.4'."""
    from qsmdask.report.html import methods_paragraph
    from qsmdask.report.references import REFERENCES, chain_method

    text, cited = methods_paragraph({"chain": {"inversion_method": "tgv", "keep_boundary_layer": True}})
    assert "k-space division" not in text and "total generalised variation" in text
    assert "alpha1 0.001" in text and "alpha0 0.004" in text and "30 iterations" in text
    assert "bredies2010" in cited and "langkammer2015" in cited and "boundary layer" in text
    assert "boundary-field" not in text and "Bregman" not in text  # no Bregman step by default
    text, cited = methods_paragraph({"chain": {"inversion_method": "tgv", "tgv_bregman_iterations": 1}})
    assert "1 Bregman debiasing step(s)" in text and "deeper than 20 mm" in text and "osher2005" in cited
    m = chain_method({"inversion_method": "tgv"})
    assert "TKD" not in m["Method"] and "total generalised variation" in m["Method"]
    assert REFERENCES["bredies2010"] in m["MethodReferences"]


def _manifest(writer, subject, chain, status="done"):
    writer.write_manifest(subject, "", [], config={"chain": chain, "atlas": "aal"},
                          status={"status": status, "key": f"sub-{subject}"})


def test_group_level_names_subject_sessions_reconstructed_with_another_configuration(tmp_path):
    """A participant run of one subject with a changed option (keep_boundary_layer here) leaves
    the cohort reconstructed two ways; the group level compared them without a word and the
    report's methods text described the last run's configuration only."""
    from qsmdask.io.derivatives import DerivativesWriter, configuration_differences
    from qsmdask.report.html import build_cohort_report

    out = tmp_path / "derivatives"
    w = DerivativesWriter(out)
    _manifest(w, "01", {"keep_boundary_layer": True})
    _manifest(w, "02", {"preset": "tv_refit_mask", "fft_workers": 4})
    _manifest(w, "03", {"preset": "tv_refit_mask"})
    _manifest(w, "04", {"inversion_method": "tkd"}, status="failed")  # partial outputs: not compared
    w.write_run_config({"level": "participant", "config": {"chain": {"keep_boundary_layer": True}}})
    lines = configuration_differences(out)
    text = "\n".join(lines)
    assert "chain.keep_boundary_layer" in text and "chain.tv_debias" in text
    assert "sub-01" in text and "sub-02" in text and "sub-04" not in text
    assert "fft_workers" not in text and "tkd" not in text  # same results / not a finished output
    report = build_cohort_report(out).read_text()
    methods = report.split('<section id="methods">')[1]
    assert "different configurations" in methods and "keep_boundary_layer" in methods
    # one configuration (presets resolved: the preset's keys or the same values spelled out)
    same = tmp_path / "same"
    w = DerivativesWriter(same)
    _manifest(w, "01", {"preset": "tv_refit_mask"})
    _manifest(w, "02", ChainConfig.preset("tv_refit_mask").to_dict())
    assert configuration_differences(same) == []


@pytest.mark.parametrize("key", ["erode_mm", "min_voxels", "smoothing_fwhm_mm", "reference_erode_mm"])
@pytest.mark.parametrize("value", ["abc", "1e1", True, [1]])
def test_pipeline_numbers_name_the_option(key, value):
    """The same for the pipeline configuration's numbers: 'could not convert string to float'
    named no key, and true was taken as 1 (mm or voxels)."""
    with pytest.raises(ValueError, match=key):
        PipelineConfig.from_dict({key: value})


def test_tv_laplacian_methods_text_claims_no_boundary_correction():
    """tv_laplacian has no LBV and no boundary-field correction (the chain applies it to "tv" and
    "tgv" only), but with tv_bregman_fraction 0 its methods text said '15 more iterations on the
    data with the boundary-field correction' (the default bgremove_method is still "lbv")."""
    from qsmdask.report.html import methods_paragraph

    text, _ = methods_paragraph({"chain": {"inversion_method": "tv_laplacian", "tv_bregman_fraction": 0}})
    assert "then 15 more iterations" in text and "boundary-field correction" not in text


@pytest.mark.parametrize("value", ["abc", "161616", 16, [16, 16], [1.5, 16, 16], [True, 16, 16], [16, -1, 16],
                                   [16, "x", 16]])
def test_pad_voxels_that_is_not_three_whole_numbers_names_the_option(value):
    """Text was split into digits ("161616" gave (1, 6, 1)... or an error about int()), 1.5 became 1."""
    with pytest.raises(ValueError, match="pad_voxels must be a list of three whole numbers"):
        PipelineConfig.from_dict({"chain": {"pad_voxels": value}}).chain_config()


def test_pad_voxels_accepts_three_whole_numbers():
    assert ChainConfig(pad_voxels=[8, 8.0, 0]).pad_voxels == (8, 8, 0)
    assert ChainConfig.from_dict(ChainConfig(pad_voxels=(4, 4, 4)).to_dict()).pad_voxels == (4, 4, 4)
