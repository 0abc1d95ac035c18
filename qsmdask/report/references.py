"""References of the methods qsmdask implements or uses (one list for the report and docs).

Keys are short names used by :func:`qsmdask.report.html.methods_paragraph`; values are
full citations (authors, year, title, journal, volume:pages).
"""

from __future__ import annotations

__all__ = ["REFERENCES", "chain_method"]

REFERENCES: dict[str, str] = {
    "otsu1979": "Otsu N (1979). A threshold selection method from gray-level histograms. "
                "IEEE Trans Syst Man Cybern 9(1):62-66.",
    "schofield2003": "Schofield MA, Zhu Y (2003). Fast phase unwrapping algorithm for "
                     "interferometric applications. Opt Lett 28(14):1194-1196.",
    "schweser2011": "Schweser F, Deistung A, Lehr BW, Reichenbach JR (2011). Quantitative imaging "
                    "of intrinsic magnetic tissue properties using MRI signal phase: an approach to "
                    "in vivo brain iron metabolism? NeuroImage 54(4):2789-2807.",
    "wu2012": "Wu B, Li W, Guidon A, Liu C (2012). Whole brain susceptibility mapping using "
              "compressed sensing. Magn Reson Med 67(1):137-147.",
    "shmueli2009": "Shmueli K, de Zwart JA, van Gelderen P, Li TQ, Dodd SJ, Duyn JH (2009). "
                   "Magnetic susceptibility mapping of brain tissue in vivo using MRI phase data. "
                   "Magn Reson Med 62(6):1510-1522.",
    "tang2013": "Tang J, Liu S, Neelavalli J, Cheng YCN, Buch S, Haacke EM (2013). Improving "
                "susceptibility mapping using a threshold-based K-space/image domain iterative "
                "reconstruction approach. Magn Reson Med 69(5):1396-1407.",
    "fonov2011": "Fonov V, Evans AC, Botteron K, Almli CR, McKinstry RC, Collins DL (2011). "
                 "Unbiased average age-appropriate atlases for pediatric studies. "
                 "NeuroImage 54(1):313-327.",
    "avants2008": "Avants BB, Epstein CL, Grossman M, Gee JC (2008). Symmetric diffeomorphic image "
                  "registration with cross-correlation: evaluating automated labeling of elderly "
                  "and neurodegenerative brain. Med Image Anal 12(1):26-41.",
    "tzouriomazoyer2002": "Tzourio-Mazoyer N, Landeau B, Papathanassiou D, Crivello F, Etard O, "
                          "Delcroix N, Mazoyer B, Joliot M (2002). Automated anatomical labeling of "
                          "activations in SPM using a macroscopic anatomical parcellation of the MNI "
                          "MRI single-subject brain. NeuroImage 15(1):273-289.",
    "fan2016": "Fan L, Li H, Zhuo J, et al. (2016). The Human Brainnetome Atlas: a new brain atlas "
               "based on connectional architecture. Cereb Cortex 26(8):3508-3526.",
    "mannwhitney1947": "Mann HB, Whitney DR (1947). On a test of whether one of two random "
                       "variables is stochastically larger than the other. Ann Math Stat 18:50-60.",
    "kerby2014": "Kerby DS (2014). The simple difference formula: an approach to teaching "
                 "nonparametric correlation. Compr Psychol 3:11.IT.3.1.",
    "holm1979": "Holm S (1979). A simple sequentially rejective multiple test procedure. "
                "Scand J Stat 6(2):65-70.",
    "benjamini1995": "Benjamini Y, Hochberg Y (1995). Controlling the false discovery rate: a "
                     "practical and powerful approach to multiple testing. J R Stat Soc B "
                     "57(1):289-300.",
    "johnson2007": "Johnson WE, Li C, Rabinovic A (2007). Adjusting batch effects in microarray "
                   "expression data using empirical Bayes methods. Biostatistics 8(1):118-127.",
    "nichols2002": "Nichols TE, Holmes AP (2002). Nonparametric permutation tests for functional "
                   "neuroimaging: a primer with examples. Hum Brain Mapp 15(1):1-25.",
    "freedman1983": "Freedman D, Lane D (1983). A nonstochastic interpretation of reported "
                    "significance levels. J Bus Econ Stat 1(4):292-298.",
    "huh2001": "Huh MH, Jhun M (2001). Random permutation testing in multiple linear regression. "
               "Commun Stat Theory Methods 30(10):2023-2032.",
    "winkler2014": "Winkler AM, Ridgway GR, Webster MA, Smith SM, Nichols TE (2014). Permutation "
                   "inference for the general linear model. NeuroImage 92:381-397.",
    "smith2009": "Smith SM, Nichols TE (2009). Threshold-free cluster enhancement: addressing "
                 "problems of smoothing, threshold dependence and localisation in cluster "
                 "inference. NeuroImage 44(1):83-98.",
    "hallgren1958": "Hallgren B, Sourander P (1958). The effect of age on the non-haemin iron in "
                    "the human brain. J Neurochem 3(1):41-51.",
    "smith2002": "Smith SM (2002). Fast robust automated brain extraction. Hum Brain Mapp "
                 "17(3):143-155.",
    "zhou2014": "Zhou D, Liu T, Spincemaille P, Wang Y (2014). Background field removal by solving "
                "the Laplacian boundary value problem. NMR Biomed 27(3):312-319.",
    "liu2011": "Liu T, Khalidov I, de Rochefort L, et al. (2011). A novel background field removal "
               "method for MRI using projection onto dipole fields (PDF). NMR Biomed 24(9):1129-1136.",
    "bilgic2014": "Bilgic B, Fan AP, Polimeni JR, et al. (2014). Fast quantitative susceptibility "
                  "mapping with L1-regularization and automatic parameter selection. Magn Reson Med "
                  "72(5):1444-1459.",
    "langkammer2015": "Langkammer C, Bredies K, Poser BA, et al. (2015). Fast quantitative "
                      "susceptibility mapping using 3D EPI and total generalized variation. "
                      "NeuroImage 111:622-630.",
    "bredies2010": "Bredies K, Kunisch K, Pock T (2010). Total generalized variation. SIAM J "
                   "Imaging Sci 3(3):492-526.",
    "osher2005": "Osher S, Burger M, Goldfarb D, Xu J, Yin W (2005). An iterative regularization "
                 "method for total variation-based image restoration. Multiscale Model Simul "
                 "4(2):460-489.",
    "deledalle2015": "Deledalle C-A, Papadakis N, Salmon J (2015). On debiasing restoration "
                     "algorithms: applications to total-variation and nonlocal-means. Scale Space "
                     "and Variational Methods in Computer Vision, LNCS 9087:129-141.",
    "liu2017": "Liu Z, Kee Y, Zhou D, Wang Y, Spincemaille P (2017). Preconditioned total field inversion "
               "(TFI) method for quantitative susceptibility mapping. Magnetic Resonance in Medicine "
               "78(1):303-315.",
}


def _short(key: str) -> str:
    """'Zhou et al. 2014' from a reference's author list and year."""
    ref = REFERENCES[key]
    authors, _, rest = ref.partition(" (")
    year = rest[:4]
    names = [a.strip().split(" ")[0] for a in authors.replace(", et al.", "").split(",")]
    if len(names) == 1:
        return f"{names[0]} {year}"
    if len(names) == 2:
        return f"{names[0]} & {names[1]} {year}"
    return f"{names[0]} et al. {year}"


def chain_method(chain: dict | None) -> dict:
    """Sidecar fields naming the reconstruction methods of ``chain`` and their references.

    Returns ``{"Method": "...", "MethodReferences": [...]}``: ``Method`` names each step
    with a short citation (brain mask, phase unwrapping, field fit, background removal,
    dipole inversion), ``MethodReferences`` the full citations in that order.
    """
    from ..chain import ChainConfig

    ch = ChainConfig.from_dict(chain or {})
    steps, keys = [], []

    def step(text, *refs):
        for k in refs:
            if k not in keys:
                keys.append(k)
        cites = "; ".join(_short(k) for k in refs)
        steps.append(f"{text} ({cites})" if refs else text)

    if ch.mask_method == "bet":
        step(f"brain mask: BET surface model, fractional threshold {ch.bet_fraction:g}", "smith2002")
    elif ch.mask_threshold_fraction is None:
        step("brain mask: Otsu threshold of the first-echo magnitude", "otsu1979")
    else:
        step(f"brain mask: first-echo magnitude above {ch.mask_threshold_fraction:g} of its robust maximum")
    if ch.unwrap_method in ("laplacian", "temporal"):
        how = "of echo differences, then temporal" if ch.unwrap_method == "temporal" else "per echo"
        step(f"phase unwrapping: Laplacian {how}", "schofield2003")
    else:
        step("phase unwrapping: quality-guided region growing")
    step("field: magnitude-weighted linear fit over echo time" + (" with phase offset" if ch.fit_offset else ""))
    bg = {"lbv": ("background field removal: LBV", ("zhou2014",)),
          "vsharp": (f"background field removal: V-SHARP, radius up to {ch.sharp_radius_mm:g} mm",
                     ("wu2012", "schweser2011")),
          "pdf": ("background field removal: PDF", ("liu2011",))}.get(
        ch.bgremove_method, (f"background field removal: SHARP, radius {ch.sharp_radius_mm:g} mm", ("schweser2011",)))
    if ch.inversion_method == "tv_laplacian":
        refs = ("langkammer2015", "bilgic2014") + (("osher2005",) if ch.tv_bregman_iterations else ())
        step("background removal and dipole inversion in one step: total variation (ADMM) fitted to the "
             f"Laplacian of the field, lambda {ch.tv_laplacian_lambda:g}"
             + (f", {ch.tv_bregman_iterations} Bregman step(s)" if ch.tv_bregman_iterations else "")
             + (f" (residual fraction {ch.tv_bregman_fraction:g})"
                if ch.tv_bregman_iterations and ch.tv_bregman_fraction < 1 else ""), *refs)
    else:
        step(bg[0], *bg[1])
    if ch.inversion_method == "tv_laplacian":
        pass
    elif ch.inversion_method == "tv":
        bregman = ch.tv_bregman_iterations and ch.tv_bregman_fraction > 0
        refs = ("bilgic2014", "osher2005") if bregman else ("bilgic2014",)
        refit = ch.tv_debias == "refit"
        early, corrected = ch.boundary_correction_stage == "start", ch.boundary_correction_stage == "bregman"
        second = ch.tv_bregman_iterations and ch.tv_bregman_fraction == 0
        step(f"dipole inversion: total variation (ADMM), lambda {ch.tv_lambda:g}"
             + (f", {ch.tv_bregman_iterations} Bregman step(s)" if bregman else "")
             + (f" (residual fraction {ch.tv_bregman_fraction:g})" if bregman and ch.tv_bregman_fraction < 1 else "")
             + (f", a second solve of {ch.tv_bregman_max_iter} iterations" if second else "")
             + ((" on the data with the boundary-field correction" if second else
                 ", boundary-field correction") + f" (sources deeper than {ch.lbv_boundary_depth_mm:g} mm)"
                if corrected else "")
             + (f", then a second pass (the correction from the final estimate's sources deeper than "
                f"{ch.boundary_pass2_depth_mm:g} mm, the inversion repeated)"
                if corrected and ch.boundary_pass2_depth_mm > 0 else "")
             + (", field fitted inside the mask" if ch.tv_mask_data and not ch.tv_outside_weight else "")
             + (f", field also fitted outside the mask (weight {ch.tv_outside_weight:g}; 0 there"
                + (" plus the deep sources' field" if ch.boundary_correction_stage else "") + ")" if ch.tv_outside_weight else "")
             + (_early_step(ch) if early else "")
             + (f", exterior sources penalised with weight {ch.tv_outside_reg_weight:g}"
                if ch.tv_outside_reg_weight < 1 else "")
             + ((", least-squares amplitude and data refit" if ch.tv_refit_amplitude else ", least-squares data refit "
                 "(no amplitude step)") + f" (mu {ch.tv_refit_mu:g})" if refit else ""),
             *refs, *(("deledalle2015",) if refit else ()), *(("liu2017",) if ch.tv_outside_reg_weight < 1 else ()))
    elif ch.inversion_method == "tgv":
        early, corrected = ch.boundary_correction_stage == "start", ch.boundary_correction_stage == "bregman"
        step(f"dipole inversion: second-order total generalised variation (ADMM), alpha1 {ch.tgv_alpha1:g}, "
             f"alpha0 {ch.tgv_alpha0:g}"
             + (f", {ch.tgv_bregman_iterations} Bregman step(s)" if ch.tgv_bregman_iterations else "")
             + (f", boundary-field correction (sources deeper than {ch.lbv_boundary_depth_mm:g} mm)"
                if corrected else "")
             + (", field fitted inside the mask" if ch.tgv_mask_data else "")
             + (_early_step(ch) if early else ""),
             "bredies2010", "langkammer2015", *(("osher2005",) if ch.tgv_bregman_iterations else ()))
    elif ch.inversion_method == "iterative_tkd":
        step(f"dipole inversion: iterative TKD, threshold {ch.iterative_tkd_threshold:g}, "
             f"up to {ch.iterative_tkd_max_iter} iterations", "tang2013")
    else:
        step(f"dipole inversion: TKD, threshold {ch.tkd_threshold:g}", "shmueli2009")
    if ch.boundary_layer_kept:
        step("final mask: the background removal's boundary layer kept (chi there not fitted to data)")
    return {"Method": "qsmdask QSM chain: " + "; ".join(steps) + ".",
            "MethodReferences": [REFERENCES[k] for k in keys]}


def _early_step(ch) -> str:
    """The boundary-field correction with sources from an early-stopped TV estimate
    (``lbv_boundary_estimate_iter``; with ``lbv_boundary_shell_mm`` the deep ones from a full TV
    solve), as a step of the sidecar's Method."""
    if ch.lbv_boundary_shell_mm > 0:
        return (f", boundary-field correction in the data from the start (sources deeper than "
                f"{ch.lbv_boundary_depth_mm:g} mm of a {ch.tv_max_iter}-iteration TV estimate and "
                f"{ch.lbv_boundary_shell_mm:g} to {ch.lbv_boundary_depth_mm:g} mm deep of a "
                f"{ch.lbv_boundary_estimate_iter}-iteration one)")
    return (f", boundary-field correction in the data from the start (sources deeper than "
            f"{ch.lbv_boundary_depth_mm:g} mm of a {ch.lbv_boundary_estimate_iter}-iteration TV estimate)")
