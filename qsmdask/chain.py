"""The QSM reconstruction chain: magnitude + wrapped multi-echo phase -> susceptibility.

Steps: brain mask -> phase-quality refinement of the mask (aliased voxels next to
air and bone out) -> phase unwrapping (default: echo-difference phase in space,
echoes in time) -> magnitude-weighted linear fit over echo time (with phase
offset) -> field in ppm -> background field removal -> dipole inversion.  Pure numpy/scipy; all options live in :class:`ChainConfig`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from qsmdask import bgremove, inversion, mask as maskmod, unwrap
from qsmdask.config import require_number
from qsmdask.kernels import PaddedFFT, check_b0_dir, check_voxel_size, dipole_kernel, distance_to_edge_mm

__all__ = ["ChainConfig", "PRESETS", "ReconResult", "reconstruct", "boundary_correction", "invert_tv", "MASK_METHODS",
           "UNWRAP_METHODS", "BGREMOVE_METHODS", "INVERSION_METHODS"]

MASK_METHODS = ("threshold", "bet")
UNWRAP_METHODS = ("temporal", "laplacian", "region_growing")
BGREMOVE_METHODS = ("lbv", "vsharp", "sharp", "pdf")
INVERSION_METHODS = ("tkd", "tv", "iterative_tkd", "tv_laplacian", "tgv")


#: the second pass's depth where ``lbv_boundary_pass2_depth_mm`` is null (automatic): 10 mm
#: (docs/benchmarks.md, recon-pass2: 8, 10, 12 and 14 mm measured on 8 null heads)
PASS2_DEPTH_MM = 10.0


@dataclass(frozen=True)
class ChainConfig:
    """Method choices and parameters of :func:`reconstruct` (immutable, serialisable).

    Attributes
    ----------
    mask_method : "threshold" (fast) or "bet" (surface model, FSL BET-like).
    mask_threshold_fraction : None for Otsu, else a fraction of the robust maximum
        magnitude ("threshold" method).
    bet_fraction : fractional intensity threshold of the surface-model mask
        (the reference study used 0.2).
    mask_open_mm : radius (mm) of the morphological opening/closing of the mask.
    quality_mask : drop voxels with aliased wrapped phase from the mask before
        unwrapping (:func:`qsmdask.mask.phase_quality_mask`, on the phase that is
        unwrapped in space); without it a Laplacian unwrapper spreads their error
        over the brain.
    quality_max_gradient_rad : largest trusted wrapped neighbour difference (rad).
    quality_single_echo_gradient_rad : the same for single-echo data, whose one echo is
        unwrapped in space (it spans the whole echo time, not one echo spacing: at TE 20 ms
        the field of iron-rich nuclei alone exceeds 1 rad per voxel, and a 1 rad limit cut
        them out of the mask, underestimating them by a third).
    quality_pairs : "all" (every face neighbour, also outside the mask: removes about two
        voxels at the whole mask surface) or "inside" (only pairs inside the mask: keeps the
        cortex; see :func:`qsmdask.mask.phase_quality_mask` and docs/benchmarks.md for
        which is more accurate on which data).
    quality_dilate_voxels : dilation (6-connected steps) of the voxels the quality mask removes
        (aliased differences can wrap back to small values next to them); 0 keeps more of the
        brain but lets aliased voxels in (docs/benchmarks.md, recon-coverage).
    quality_dilate_min_gradient_rad : the dilation takes only neighbours whose own largest
        wrapped difference exceeds this (rad, below ``quality_max_gradient_rad``); 0 takes all
        (0.5 gave back 2.5 % of simulated brains but lost accuracy next to air on one of two
        heads; docs/benchmarks.md, recon-coverage).
    keep_boundary_layer : null (default: automatic), true or false. The background removal's
        boundary layer (LBV: the quality mask's one-voxel rim, where the local field is 0 by its
        boundary condition) stays in the final mask: the inversion fits the field only inside the
        eroded mask, as always, and reports the susceptibility it estimates on the rim from the
        field that the rim's sources make inside and the regularisation (no data on the rim: on a
        simulated head a fifth of it lies outside the brain, with bone partial volumes, and LBV on a
        mask one voxel larger, fitted on the rim, lowered chi corr in the brain from 0.90 to 0.84;
        docs/benchmarks.md, recon-coverage). False: the final mask is the eroded mask.
        Null: kept where the inversion estimates it ("tv" with ``tv_mask_data``, "tgv" with
        ``tgv_mask_data``) and the background removal is "lbv"; the eroded mask otherwise (other
        inversions have no estimate there; V-SHARP erodes up to its largest radius). Since issue 15
        the default chain keeps it: on simulated heads without air cavities it covers 95 % of the
        true brain instead of 89 % at the same accuracy on the voxels covered before; the rim's own
        values are less accurate than the brain's average but more than the eroded mask's outer
        layer (docs/benchmarks.md, recon-coverage). True with an inversion that has no estimate on
        the rim (another inversion, or ``tv_mask_data`` / ``tgv_mask_data`` false, whose data term
        takes the field as 0 outside its mask) is an error. Read the resolved value from
        :attr:`ChainConfig.boundary_layer_kept`.
    unwrap_method : "temporal" (echo-difference phase Laplacian-unwrapped, echoes
        unwrapped in time: fewest spatial wraps, no phase offset;
        :func:`qsmdask.unwrap.temporal_unwrap`), "laplacian" (every echo by
        Schofield & Zhu 2003) or "region_growing" (quality-guided path following;
        exact for strong but valid wraps).
    laplacian_form : "gradient" (wrapped differences: exact below pi per voxel, which the
        quality mask ensures) or "sincos" (Schofield & Zhu; underestimates steep phase)
        (see :func:`qsmdask.unwrap.wrapped_laplacian`).
    fit_offset : fit a phase offset (intercept) in the multi-echo fit (always fitted
        with "temporal" unwrapping, whose echoes carry the first echo's wrapped phase).
    bgremove_method : "lbv" (default; Laplacian boundary value, one voxel eroded, no
        k-space truncation: keeps the slowly varying local field that sets deep-grey ROI
        means), "vsharp" (variable radius, as the reference study), "sharp" or "pdf"
        (projection onto dipole fields; no erosion).
    single_echo_offset_fit : single-echo data only: after background removal, fit and remove
        the field whose Laplacian is constant over the brain (the RF transceive phase, which
        one echo cannot separate from the field and which is not harmonic; one parameter,
        magnitude-weighted least squares; :func:`qsmdask.bgremove.remove_constant_laplacian`;
        not applied with "tv_laplacian", which has no separate background removal).
        Simulated heads with a physical transceive phase: chi corr 0.35 -> 0.93 at TE 20 ms
        (docs/benchmarks.md, single-echo).
    sharp_radius_mm : SMV radius (mm) of SHARP, and the largest radius of V-SHARP
        (radii from the voxel size up to it); the reference study used up to 6 mm.
    sharp_threshold : truncation level of the SHARP deconvolution.
    inversion_method : "tv" (default; total variation, ADMM, with Bregman debiasing),
        "tv_laplacian" (background removal and TV inversion in one step: the data term is the
        Laplacian of the total field inside the mask, so harmonic background fields drop out
        and no boundary condition is imposed on the local field; ``bgremove_method`` is then
        unused and the final mask is the quality mask without its one-voxel boundary, as LBV's;
        ``tv_laplacian_lambda``; same iterations and Bregman step as "tv"),
        "tgv" (second-order total generalised variation, ADMM: smooth variations are not turned
        into staircases; ``tgv_*`` options; :func:`qsmdask.inversion.tgv_admm`),
        "tkd" or "iterative_tkd"
        (Tang et al. 2013: TKD start, cone re-estimated from the image-domain
        estimate constrained to the mask and the structures of the initial estimate;
        ``iterative_tkd_*`` options).
    iterative_tkd_threshold : |D| below which "iterative_tkd" re-estimates k-space (Tang et
        al. 2013: 0.1); separate from ``tkd_threshold``.
    iterative_tkd_max_iter : largest number of iterations of "iterative_tkd" (Tang et al.
        2013: about 4 were enough).
    iterative_tkd_tol : stopping rule of "iterative_tkd": relative change of the map in the
        mask between two iterations.
    iterative_tkd_structure_n_sd : geometry constraint of "iterative_tkd" derived from the
        initial TKD estimate (structures: voxels more than this many robust SDs from the
        median, :func:`qsmdask.inversion.structure_mask_from_estimate`); 0 disables it
        (support constraint only).
    tkd_threshold : truncation level of |D| for TKD (not the iterative TKD); 0.4 (2016 challenge nrmse vs COSMOS 62.9,
        and lower NRMSE than 0.19 on noisy phantoms) at the price of a larger
        underestimation of deep-grey ROI means (consistent across subjects, so group
        contrasts scale but keep their sign and rank).
    tv_lambda : regularisation weight of "tv".
    tv_max_iter : ADMM iterations of the first "tv" solve.
    tv_bregman_iterations : Bregman (debiasing) steps of "tv" after the first solve
        (:func:`qsmdask.inversion.tv_admm`).
    tv_bregman_max_iter : ADMM iterations of each Bregman step.
    tv_bregman_fraction : share of the field residual each Bregman step adds back to the data,
        in [0, 1] (default 1). 0: the step only solves again with the boundary-field correction
        (``lbv_boundary_depth_mm``) added to the data, so that correction works without a Bregman
        step (preset ``tv_refit_mask``).
    tv_debias : "none" or "refit": least-squares amplitude and Tikhonov-regularised data
        refit of the TV solution (``tv_admm(debias="refit")``); with ``tv_mask_data`` it refits
        the field inside the mask only (conjugate gradients).
    tv_refit_mu : closeness weight of that data refit (> 0).
    tv_refit_amplitude : with ``tv_debias="refit"``: True (default) fits the least-squares amplitude
        (one factor for the whole map) before the data refit; False refits the data only
        (``tv_admm(refit_amplitude=False)``). The amplitude is what moves a deep-nuclei increase into
        the rest of the map (adjacent ROIs 12.5 -> 3.6 % of the effect without it on head 101), and
        it is what lifts the 2016 ROI slope (docs/benchmarks.md, recon-refit-shape).

    The defaults (LBV, TV lambda 2e-3 with one Bregman step of 15 + 15 iterations) were
    chosen on ROI accuracy over the benchmark's phantoms and simulated heads together
    (``bench/recon.py``): deep-grey ROI means within 15 % of truth there, against
    40-50 % underestimation for the study's V-SHARP + TKD.  On the 2016 challenge data
    this less smoothed default scores nrmse 67.7 vs COSMOS (ROI slope 0.95); plain TV (no
    Bregman step, lambda 1e-3 to 1.5e-3) scores 58.7-57.6 there (slope 0.88-0.84) and TV with
    ``tv_debias="refit"`` (preset ``tv_refit``) 57.1 (slope 0.95), but both are less accurate
    than the default on the simulated heads.  See docs/benchmarks.md (recon-debias).  Since issue 14 TV fits the
    field inside the mask only and gets LBV's boundary field of the deep sources back
    (``tv_mask_data``, ``lbv_boundary_depth_mm``): on 8 simulated heads a deep-nuclei increase
    moves the non-adjacent ROIs by at most 1.47 % of itself (white-matter reference, LBV's rim
    kept; 4.2 % before), and null cohorts stay inside their binomial band (docs/benchmarks.md, "Null
    cohorts from distinct heads"); the 2016 numbers above are from before that change (with
    the field fitted inside the mask TV + Bregman scores nrmse 74.6 there, not 67.7).
    tv_outside_weight : "tv" only. With ``tv_mask_data``: weight in [0, 1] (default 0) of the data
        term outside the mask, on the solver's grid (the mask's bounding box plus ``pad_voxels``),
        where the field is taken as 0 until the boundary-field correction (``lbv_boundary_depth_mm``)
        and then as the field of the deep sources' estimate (:func:`qsmdask.inversion.tv_admm`,
        ``outside_weight``). 0: the field is fitted inside the mask only. 1: the data term of
        ``tv_mask_data: false`` (field 0 outside the mask), except that the deep sources' field
        outside the mask is not forced to 0: docs/benchmarks.md, recon-accuracy. With the correction
        in the data from the start (``lbv_boundary_estimate_iter`` > 0) the early estimate's field
        outside the mask is the data there from the first iteration. With ``tv_mask_data`` false
        (whose data term already covers the grid with weight 1 and field 0) only 1 is allowed, and
        only with ``lbv_boundary_estimate_iter`` > 0: the field outside the mask is then the early
        estimate's own field instead of 0.
    tv_outside_reg_weight : "tv" with ``tv_mask_data`` only: weight in [0, 1] (default 1) of the
        TV penalty on the solver's grid outside the mask (:func:`qsmdask.inversion.tv_admm`,
        ``outside_reg_weight``). Below 1, sources outside the mask are cheap, so the part of the field
        that is harmonic inside the mask (what LBV's boundary condition removes from the field of deep
        sources, and any residual background) is explained by them instead of by a broad halo of chi
        inside the mask: the exterior sources of a total field inversion, on LBV's output. Needs
        ``tv_outside_weight`` 0; docs/benchmarks.md, recon-exterior.
    tv_rho_data : ADMM penalty of "tv"'s data split (with ``tv_mask_data`` only; default 1; > 0). With free
        exterior sources 0.1 converges them in about half the iterations.
    tv_laplacian_lambda : regularisation weight of "tv_laplacian" (its data term is in
        ppm/mm^2, so the weight is not comparable with ``tv_lambda``).
    tv_mask_data : "tv" fits the field only inside the mask (``tv_admm(mask_data=True)``)
        instead of taking it as 0 outside. A focal source's field does not stop at the mask
        edge; forcing it to 0 there makes the inversion add a broad negative halo around
        every focal increase (measured in ``bench/reference.py``: a deep-nuclei increase
        moved the cingulum by -3.2 % of itself with False, -0.8 % with True). Default True
        (with ``lbv_boundary_depth_mm``, issue 14).
    lbv_boundary_depth_mm : "lbv" + "tv" only; 0 disables (default 20). LBV imposes local field = 0 on the
        brain's boundary, but the field of deep sources is not 0 there: LBV's output lacks the
        harmonic function with those boundary values, and the inversion turns it into a broad
        halo of the opposite sign around every deep increase (``bench/halo.py``). With a depth
        d > 0, before TV's Bregman step the field of the first TV estimate inside the region
        deeper than d mm (distance to the mask edge) is computed and the part of it that LBV
        removes (:func:`qsmdask.bgremove.lbv_boundary_field`) is added to the data; the
        returned ``local_field_ppm`` includes it. It costs one dipole convolution and one more
        LBV solve. Sources shallower than d keep LBV's boundary condition: their boundary
        field cannot be told apart from a halo of the same estimate (any estimate is a fixed
        point of the correction over the whole mask; docs/benchmarks.md, "Where the halo comes
        from"). Needs ``tv_bregman_iterations >= 1`` unless ``lbv_boundary_estimate_iter`` > 0.
    lbv_boundary_estimate_iter : with ``lbv_boundary_depth_mm`` > 0, where the correction's
        sources come from and when it enters the data. 0 (the correction of issue 14's first
        version): the deep part of the first TV (or TGV) solve, added before the Bregman step,
        which then starts from that solve's state. k > 0: a separate TV solve of only k ADMM
        iterations (the chain's lambda, field inside the mask) gives the sources, and the
        inversion then starts from scratch on LBV's output plus their boundary field (no Bregman
        step needed). Why: ADMM builds the broad halo (a low spatial frequency) slowly, so an
        early-stopped estimate has the deep nuclei but little halo and can take its sources
        closer to the edge without the halo's feedback; and a correction added only at the
        Bregman step, warm-started from a solve that already holds the halo, left -3 % in the
        frontal lobe even with the EXACT boundary field on a simulated head (1.4 % when the
        exact field is in the data from the start; docs/benchmarks.md, "How far the correction
        is from a perfect one"). Costs k more ADMM iterations. Combines with ``tv_outside_weight``
        (the early estimate's field outside the mask as the data there) and the refit presets.
    lbv_boundary_shell_mm : with ``lbv_boundary_estimate_iter`` > 0: 0 (default) takes every source
        from the early-stopped estimate (deeper than ``lbv_boundary_depth_mm``). s > 0 (below
        ``lbv_boundary_depth_mm``): two estimates. The sources deeper than
        ``lbv_boundary_depth_mm`` come from a full TV solve (``tv_max_iter`` iterations, threshold
        ``lbv_boundary_threshold_ppm``), which holds the broad negative white matter that an
        early-stopped solve has not built yet; those of the shell between s and
        ``lbv_boundary_depth_mm`` mm come from the early-stopped one (threshold
        ``lbv_boundary_shell_threshold_ppm``), which has little of the halo there. The boundary
        field of both is in the data from the first iteration. Costs ``tv_max_iter`` more ADMM
        iterations. Not the default: on two simulated heads it halves the halo without a
        reference (2.9 -> 1.4-1.6 % of a deep increase), but both estimates lack the shell's
        broad negative white matter, and chi correlation falls by 0.008-0.012 on the recon heads
        (docs/benchmarks.md, "How far the correction is from a perfect one", session 8).
    lbv_boundary_shell_threshold_ppm : with ``lbv_boundary_shell_mm`` > 0, the shell's voxels whose
        early-stopped estimate differs from the shell's median by more than this count as sources.
    lbv_boundary_pass2_depth_mm : the second pass of the boundary-field correction. null (default:
        automatic) is 10 mm wherever the chain has the "bregman" correction stage of "tv"
        (``boundary_correction_stage``), ``tv_outside_weight`` 0 and ``lbv_boundary_depth_mm``
        above 10 mm (the default chain), else 0; 0 disables (preset ``single_pass``: the default
        chain up to commit 98887c8); d2 > 0 (below ``lbv_boundary_depth_mm``, with that
        correction stage) adds it: the sources are taken again from the FINAL estimate, down to
        d2 mm from the edge (deeper than ``lbv_boundary_depth_mm``: threshold
        ``lbv_boundary_threshold_ppm``; the band between: ``lbv_boundary_pass2_threshold_ppm``;
        deviations from one median over both), their boundary field replaces the first
        correction in LBV's output and the inversion runs again from scratch (first solve and
        Bregman step, no further correction). Costs a second inversion. On 8 simulated null heads
        it takes the worst non-adjacent shift of a planted deep increase from 1.47 % to 0.62 %
        (white-matter reference) and puts every null rate in its band, at 0.012 lower chi
        correlation and a caudate mean 6 points higher on the recon heads (docs/benchmarks.md,
        recon-pass2).
    lbv_boundary_pass2_threshold_ppm : with ``lbv_boundary_pass2_depth_mm`` > 0, the band's voxels
        whose final estimate differs from the median by more than this count as sources.
    lbv_boundary_threshold_ppm : with ``lbv_boundary_depth_mm`` > 0, only deep voxels whose
        estimate differs from the deep region's median by more than this count as sources
        (the halo of the first estimate is broad and faint; counted, it cancels most of a deep
        increase's boundary field: on a simulated head the deep region's summed increase was
        25 % of the truth without the threshold). 0: every deep voxel.
    tv_edge_fraction : fraction of the magnitude's strongest gradients left
        unpenalised by "tv" (MEDI-like edge mask; 0 disables).
    tgv_alpha1 : "tgv": weight of the first-order term ||grad chi - w|| (field ppm units, as
        ``tv_lambda``).
    tgv_alpha0 : "tgv": weight of the second-order term ||E w|| (E: symmetrised gradient, per
        mm^2); alpha0 / alpha1 (mm) is the scale below which a smooth variation costs less as a
        ramp than as a jump.
    tgv_max_iter : ADMM iterations of the first "tgv" solve.
    tgv_mask_data : "tgv" fits the field only inside the mask (as ``tv_mask_data``).
    tgv_bregman_iterations : Bregman steps of "tgv" after the first solve (0: none); with "lbv"
        and ``lbv_boundary_depth_mm`` > 0 the boundary-field correction is applied before them,
        as for "tv".
    tgv_bregman_max_iter : ADMM iterations of each "tgv" Bregman step.
    tgv_edge_fraction : fraction of the magnitude's strongest gradients left unpenalised by the
        first-order term of "tgv" (0 disables).
    phase_sign : +1 for the right-handed convention (positive chi -> positive phase,
        as qsm-forward), -1 for the reference study's left-handed convention.
    pad_voxels : zero padding (voxels per side) for dipole-inversion FFTs.
    fft_workers : FFT threads; 1 by default because Dask owns the parallelism.
    """

    mask_method: str = "threshold"
    mask_threshold_fraction: float | None = None
    bet_fraction: float = 0.2
    mask_open_mm: float = 2.0
    quality_mask: bool = True
    quality_max_gradient_rad: float = 1.0
    quality_single_echo_gradient_rad: float = 2.0
    quality_pairs: str = "all"
    quality_dilate_voxels: int = 1
    quality_dilate_min_gradient_rad: float = 0.0
    keep_boundary_layer: bool | None = None
    unwrap_method: str = "temporal"
    laplacian_form: str = "gradient"
    fit_offset: bool = True
    bgremove_method: str = "lbv"
    single_echo_offset_fit: bool = True
    sharp_radius_mm: float = 6.0
    sharp_threshold: float = 0.05
    inversion_method: str = "tv"
    tkd_threshold: float = 0.4
    iterative_tkd_threshold: float = 0.1
    iterative_tkd_max_iter: int = 4
    iterative_tkd_tol: float = 1e-2
    iterative_tkd_structure_n_sd: float = 2.0
    tv_lambda: float = 2e-3
    tv_max_iter: int = 15
    tv_bregman_iterations: int = 1
    tv_bregman_max_iter: int = 15
    tv_bregman_fraction: float = 1.0
    tv_debias: str = "none"
    tv_refit_mu: float = 0.1
    tv_refit_amplitude: bool = True
    tv_edge_fraction: float = 0.0
    tv_mask_data: bool = True
    tv_outside_weight: float = 0.0
    tv_outside_reg_weight: float = 1.0
    tv_rho_data: float = 1.0
    tv_laplacian_lambda: float = 2e-4
    lbv_boundary_depth_mm: float = 20.0
    lbv_boundary_threshold_ppm: float = 0.01
    lbv_boundary_estimate_iter: int = 0
    lbv_boundary_shell_mm: float = 0.0
    lbv_boundary_shell_threshold_ppm: float = 0.02
    lbv_boundary_pass2_depth_mm: float | None = None
    lbv_boundary_pass2_threshold_ppm: float = 0.08
    tgv_alpha1: float = 1e-3
    tgv_alpha0: float = 4e-3
    tgv_max_iter: int = 30
    tgv_mask_data: bool = True
    tgv_bregman_iterations: int = 0
    tgv_bregman_max_iter: int = 15
    tgv_edge_fraction: float = 0.0
    phase_sign: int = 1
    pad_voxels: tuple[int, int, int] = (16, 16, 16)
    fft_workers: int = 1

    def __post_init__(self):
        self._check_types()
        choices = {"mask_method": MASK_METHODS, "unwrap_method": UNWRAP_METHODS,
                   "bgremove_method": BGREMOVE_METHODS, "inversion_method": INVERSION_METHODS,
                   "laplacian_form": ("sincos", "gradient"), "quality_pairs": maskmod.PAIRS,
                   "tv_debias": ("none", "refit")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.phase_sign not in (1, -1):
            raise ValueError(f"phase_sign must be 1 or -1, got {self.phase_sign!r}")
        f = self.mask_threshold_fraction
        if f is not None and not (0 < f < 1):
            raise ValueError(f"mask_threshold_fraction must be None or in (0, 1), got {f!r}")
        if not (0 < self.bet_fraction < 1):
            raise ValueError(f"bet_fraction must be in (0, 1), got {self.bet_fraction!r}")
        for name in ("quality_max_gradient_rad", "quality_single_echo_gradient_rad"):
            q = getattr(self, name)
            if not (np.isfinite(q) and 0 < q < np.pi):
                raise ValueError(f"{name} must be in (0, pi), got {q!r}")
        if not (isinstance(self.quality_dilate_voxels, (int, np.integer)) and self.quality_dilate_voxels >= 0):
            raise ValueError(f"quality_dilate_voxels must be an int >= 0, got {self.quality_dilate_voxels!r}")
        q = self.quality_dilate_min_gradient_rad
        if not (np.isfinite(q) and 0 <= q < self.quality_max_gradient_rad):
            raise ValueError(f"quality_dilate_min_gradient_rad must be in [0, quality_max_gradient_rad), got {q!r}")
        if self.keep_boundary_layer is not None and bool(self.keep_boundary_layer) and not self._estimates_the_rim:
            raise ValueError("keep_boundary_layer needs inversion_method 'tv' with tv_mask_data true or 'tgv' "
                             "with tgv_mask_data true (only they estimate chi on the rim without data there), "
                             f"got inversion_method {self.inversion_method!r}, tv_mask_data "
                             f"{self.tv_mask_data!r}, tgv_mask_data {self.tgv_mask_data!r}")
        if self.mask_open_mm < 0:
            raise ValueError(f"mask_open_mm must be >= 0, got {self.mask_open_mm!r}")
        if not self.sharp_radius_mm > 0:
            raise ValueError(f"sharp_radius_mm must be > 0, got {self.sharp_radius_mm!r}")
        if not (0 < self.sharp_threshold < 1):
            raise ValueError(f"sharp_threshold must be in (0, 1), got {self.sharp_threshold!r}")
        if not (self.tv_lambda > 0):
            raise ValueError(f"tv_lambda must be > 0, got {self.tv_lambda!r}")
        if not (np.isfinite(self.tv_laplacian_lambda) and self.tv_laplacian_lambda > 0):
            raise ValueError(f"tv_laplacian_lambda must be > 0, got {self.tv_laplacian_lambda!r}")
        if int(self.iterative_tkd_max_iter) < 1:
            raise ValueError(f"iterative_tkd_max_iter must be >= 1, got {self.iterative_tkd_max_iter!r}")
        if int(self.tv_bregman_iterations) < 0:
            raise ValueError(f"tv_bregman_iterations must be >= 0, got {self.tv_bregman_iterations!r}")
        if int(self.tv_bregman_max_iter) < 1:
            raise ValueError(f"tv_bregman_max_iter must be >= 1, got {self.tv_bregman_max_iter!r}")
        if int(self.tv_max_iter) < 1:
            raise ValueError(f"tv_max_iter must be >= 1, got {self.tv_max_iter!r}")
        if not isinstance(self.single_echo_offset_fit, (bool, np.bool_)):
            raise ValueError(f"single_echo_offset_fit must be true or false, got {self.single_echo_offset_fit!r}")
        if not (np.isfinite(self.lbv_boundary_depth_mm) and self.lbv_boundary_depth_mm >= 0):
            raise ValueError(f"lbv_boundary_depth_mm must be >= 0, got {self.lbv_boundary_depth_mm!r}")
        if not (np.isfinite(self.lbv_boundary_threshold_ppm) and self.lbv_boundary_threshold_ppm >= 0):
            raise ValueError(f"lbv_boundary_threshold_ppm must be >= 0, got {self.lbv_boundary_threshold_ppm!r}")
        if not (isinstance(self.lbv_boundary_estimate_iter, (int, np.integer))
                and self.lbv_boundary_estimate_iter >= 0):
            raise ValueError(f"lbv_boundary_estimate_iter must be an int >= 0, got {self.lbv_boundary_estimate_iter!r}")
        if not (np.isfinite(self.lbv_boundary_shell_mm) and self.lbv_boundary_shell_mm >= 0):
            raise ValueError(f"lbv_boundary_shell_mm must be >= 0, got {self.lbv_boundary_shell_mm!r}")
        if not (np.isfinite(self.lbv_boundary_shell_threshold_ppm) and self.lbv_boundary_shell_threshold_ppm >= 0):
            raise ValueError("lbv_boundary_shell_threshold_ppm must be >= 0, got "
                             f"{self.lbv_boundary_shell_threshold_ppm!r}")
        if self.lbv_boundary_shell_mm > 0 and not (self.lbv_boundary_estimate_iter > 0
                                                   and self.lbv_boundary_shell_mm < self.lbv_boundary_depth_mm):
            raise ValueError("lbv_boundary_shell_mm > 0 takes the sources between it and lbv_boundary_depth_mm from "
                             "the early-stopped estimate: it needs lbv_boundary_estimate_iter > 0 and "
                             f"lbv_boundary_shell_mm < lbv_boundary_depth_mm, got lbv_boundary_shell_mm "
                             f"{self.lbv_boundary_shell_mm!r}, lbv_boundary_estimate_iter "
                             f"{self.lbv_boundary_estimate_iter!r}, lbv_boundary_depth_mm {self.lbv_boundary_depth_mm!r}")
        if self.lbv_boundary_pass2_depth_mm is not None and not (
                np.isfinite(self.lbv_boundary_pass2_depth_mm) and self.lbv_boundary_pass2_depth_mm >= 0):
            raise ValueError("lbv_boundary_pass2_depth_mm must be >= 0 or null (automatic), got "
                             f"{self.lbv_boundary_pass2_depth_mm!r}")
        if not (np.isfinite(self.lbv_boundary_pass2_threshold_ppm) and self.lbv_boundary_pass2_threshold_ppm >= 0):
            raise ValueError("lbv_boundary_pass2_threshold_ppm must be >= 0, got "
                             f"{self.lbv_boundary_pass2_threshold_ppm!r}")
        if self.lbv_boundary_pass2_depth_mm is not None and self.lbv_boundary_pass2_depth_mm > 0 and not (
                self._pass2_applies(self.lbv_boundary_pass2_depth_mm)):
            raise ValueError("lbv_boundary_pass2_depth_mm > 0 needs inversion_method 'tv' with the correction "
                             "before the Bregman step (lbv_boundary_depth_mm > 0, lbv_boundary_estimate_iter 0, "
                             "tv_bregman_iterations >= 1, bgremove_method 'lbv'), tv_outside_weight 0 and "
                             f"lbv_boundary_pass2_depth_mm < lbv_boundary_depth_mm; got "
                             f"lbv_boundary_pass2_depth_mm {self.lbv_boundary_pass2_depth_mm!r}")
        if not (np.isfinite(self.tv_refit_mu) and self.tv_refit_mu > 0):
            raise ValueError(f"tv_refit_mu must be > 0, got {self.tv_refit_mu!r}")
        if not self.tv_refit_amplitude and self.tv_debias != "refit":
            raise ValueError("tv_refit_amplitude false needs tv_debias 'refit' (it is a step of that refit)")
        if not (np.isfinite(self.tv_outside_weight) and 0 <= self.tv_outside_weight <= 1):
            raise ValueError(f"tv_outside_weight must be in [0, 1], got {self.tv_outside_weight!r}")
        if self.tv_outside_weight > 0 and self.inversion_method != "tv":
            raise ValueError(f"tv_outside_weight needs inversion_method 'tv', got {self.inversion_method!r}")
        if self.tv_outside_weight > 0 and not self.tv_mask_data and not (
                self.tv_outside_weight == 1 and self.boundary_correction_stage == "start"):
            raise ValueError("with tv_mask_data false the data term already takes the field as 0 outside the mask "
                             "with weight 1; tv_outside_weight then can only be 1 with the boundary-field correction "
                             "in the data from the start (lbv_boundary_estimate_iter > 0, lbv_boundary_depth_mm > 0, "
                             "bgremove_method 'lbv'), meaning the field outside the mask is the deep estimate's own "
                             f"field instead of 0; got tv_outside_weight {self.tv_outside_weight!r}, "
                             f"lbv_boundary_estimate_iter {self.lbv_boundary_estimate_iter!r}, lbv_boundary_depth_mm "
                             f"{self.lbv_boundary_depth_mm!r}, bgremove_method {self.bgremove_method!r}")
        w = self.tv_outside_reg_weight
        if not (np.isfinite(w) and 0 <= w <= 1):
            raise ValueError(f"tv_outside_reg_weight must be in [0, 1], got {w!r}")
        if w < 1 and not (self.inversion_method == "tv" and self.tv_mask_data and self.tv_outside_weight == 0):
            raise ValueError("tv_outside_reg_weight < 1 frees the sources outside the mask to explain the field inside "
                             "it: it needs inversion_method 'tv', tv_mask_data true and tv_outside_weight 0 (no data "
                             f"outside the mask), got inversion_method {self.inversion_method!r}, tv_mask_data "
                             f"{self.tv_mask_data!r}, tv_outside_weight {self.tv_outside_weight!r}")
        if not (np.isfinite(self.tv_rho_data) and self.tv_rho_data > 0):
            raise ValueError(f"tv_rho_data must be > 0, got {self.tv_rho_data!r}")
        if self.tv_rho_data != 1 and not (self.inversion_method == "tv" and self.tv_mask_data):
            raise ValueError("tv_rho_data is the ADMM penalty of the data split of 'tv' with tv_mask_data true (no other "
                             f"inversion has it), got inversion_method {self.inversion_method!r}, tv_mask_data "
                             f"{self.tv_mask_data!r}")
        if not (np.isfinite(self.tv_bregman_fraction) and 0 <= self.tv_bregman_fraction <= 1):
            raise ValueError(f"tv_bregman_fraction must be in [0, 1], got {self.tv_bregman_fraction!r}")
        if not (0 <= self.tv_edge_fraction < 1):
            raise ValueError(f"tv_edge_fraction must be in [0, 1), got {self.tv_edge_fraction!r}")
        for name in ("tgv_alpha1", "tgv_alpha0"):
            if not (np.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("tgv_max_iter", "tgv_bregman_max_iter"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if int(self.tgv_bregman_iterations) < 0:
            raise ValueError(f"tgv_bregman_iterations must be >= 0, got {self.tgv_bregman_iterations!r}")
        if not (0 <= self.tgv_edge_fraction < 1):
            raise ValueError(f"tgv_edge_fraction must be in [0, 1), got {self.tgv_edge_fraction!r}")
        if not (0 < self.iterative_tkd_threshold < 2 / 3):
            raise ValueError(f"iterative_tkd_threshold must be in (0, 2/3), got {self.iterative_tkd_threshold!r}")
        if not (self.iterative_tkd_tol > 0):
            raise ValueError(f"iterative_tkd_tol must be > 0, got {self.iterative_tkd_tol!r}")
        if not (self.iterative_tkd_structure_n_sd >= 0):
            raise ValueError("iterative_tkd_structure_n_sd must be >= 0, got "
                             f"{self.iterative_tkd_structure_n_sd!r}")
        if not (0 < self.tkd_threshold < 2 / 3):
            raise ValueError(f"tkd_threshold must be in (0, 2/3), got {self.tkd_threshold!r}")
        raw = self.pad_voxels
        ok = (isinstance(raw, (list, tuple, np.ndarray)) and len(raw) == 3
              and all(isinstance(p, (int, np.integer, float, np.floating)) and not isinstance(p, (bool, np.bool_))
                      and np.isfinite(p) and float(p) == int(p) and p >= 0 for p in raw))
        if not ok:  # text ("16" read as 1, 6) or 1.5 (read as 1) were taken before
            raise ValueError(f"pad_voxels must be a list of three whole numbers >= 0 (voxels per side), "
                             f"e.g. [16, 16, 16], got {raw!r}")
        object.__setattr__(self, "pad_voxels", tuple(int(p) for p in raw))
        if int(self.fft_workers) < 1:
            raise ValueError(f"fft_workers must be >= 1, got {self.fft_workers!r}")

    @property
    def _estimates_the_rim(self) -> bool:
        """Whether the inversion estimates chi on the background removal's boundary layer (no
        data there): "tv" or "tgv" with the field fitted inside the mask."""
        return bool((self.inversion_method == "tv" and self.tv_mask_data)
                    or (self.inversion_method == "tgv" and self.tgv_mask_data))

    @property
    def boundary_correction_stage(self) -> str | None:
        """Where the boundary-field correction (``lbv_boundary_depth_mm``) enters the "tv" or "tgv"
        inversion: "start" (``lbv_boundary_estimate_iter`` > 0: in the data from the first
        iteration), "bregman" (before the Bregman step), or None (no correction: depth 0, another
        background removal or inversion, or neither an early estimate nor a Bregman step)."""
        if not (self.lbv_boundary_depth_mm > 0 and self.bgremove_method == "lbv"
                and self.inversion_method in ("tv", "tgv")):
            return None
        if self.lbv_boundary_estimate_iter > 0:
            return "start"
        breg = self.tgv_bregman_iterations if self.inversion_method == "tgv" else self.tv_bregman_iterations
        return "bregman" if breg > 0 else None

    def _pass2_applies(self, depth_mm: float) -> bool:
        """Whether a second correction pass down to ``depth_mm`` fits this chain: "tv" with the
        correction before the Bregman step, no data term outside the mask, and ``depth_mm`` above
        0 and below the first pass's depth."""
        return bool(self.boundary_correction_stage == "bregman" and self.inversion_method == "tv"
                    and self.tv_outside_weight == 0 and 0 < depth_mm < self.lbv_boundary_depth_mm)

    @property
    def boundary_pass2_depth_mm(self) -> float:
        """``lbv_boundary_pass2_depth_mm`` resolved: null (the default) is
        :data:`PASS2_DEPTH_MM` wherever the second pass fits the chain, else 0 (no second pass)."""
        if self.lbv_boundary_pass2_depth_mm is None:
            return PASS2_DEPTH_MM if self._pass2_applies(PASS2_DEPTH_MM) else 0.0
        return float(self.lbv_boundary_pass2_depth_mm)

    @property
    def boundary_layer_kept(self) -> bool:
        """``keep_boundary_layer`` resolved: None (the default) keeps LBV's one-voxel layer wherever
        the inversion estimates it (``_estimates_the_rim``), and no other background removal's
        (V-SHARP erodes up to its largest radius)."""
        if self.keep_boundary_layer is None:
            return self._estimates_the_rim and self.bgremove_method == "lbv"
        return bool(self.keep_boundary_layer)

    def _check_types(self):
        """Numbers where numbers belong and true/false for the switches, so that a text such as
        YAML 1.1's ``1e-3`` (no decimal point: a string) or ``"false"`` (truthy) is an error that
        names the option instead of a numpy or comparison error, or a step silently switched on."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "bool" and not isinstance(v, (bool, np.bool_)):
                raise ValueError(f"{f.name} must be true or false, got {v!r}")
            if f.type == "bool | None" and not (v is None or isinstance(v, (bool, np.bool_))):
                raise ValueError(f"{f.name} must be true, false or null (automatic), got {v!r}")
            if f.type not in ("float", "int", "float | None") or (v is None and f.type == "float | None"):
                continue
            require_number(f.name, v)
            if f.type == "int" and np.isfinite(v) and int(v) != v:
                raise ValueError(f"{f.name} must be a whole number, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["pad_voxels"] = list(d["pad_voxels"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChainConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError.  A ``"preset"`` key
        (see :data:`PRESETS`) sets the starting values that the other keys then change."""
        d = dict(d)
        preset = d.pop("preset", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ChainConfig keys: {sorted(unknown)}")
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
            d = {**PRESETS[preset], **d}
        if isinstance(d.get("pad_voxels"), list):  # JSON/YAML lists; anything else is checked by the class
            d["pad_voxels"] = tuple(d["pad_voxels"])
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **changes) -> "ChainConfig":
        """The configuration named ``name`` in :data:`PRESETS`, with ``changes`` applied."""
        return cls.from_dict({"preset": name, **changes})

    def replace(self, **changes) -> "ChainConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


# Named starting configurations (``chain: {preset: study}`` in the pipeline configuration).
# The phase sign is a property of the data, not of a method: set ``phase_sign`` beside a preset.
# "The default" in the measurements quoted below before tv_pass2's second pass became the default
# (the commit after 98887c8) is the chain now named single_pass.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # the default chain up to commit 98887c8: one pass of the boundary-field correction (sources of
    # the first estimate deeper than 20 mm). Better chi correlation and deep-grey means on the
    # simulated heads (caudate +2.4 % against +8.2 %), but 1.47 % of a planted deep increase in
    # the worst non-adjacent ROI on 8 null heads (white-matter reference; the default: 0.62 %) and
    # about two thirds of the time at 256x256x80 (docs/benchmarks.md, recon-pass2)
    "single_pass": {"lbv_boundary_pass2_depth_mm": 0.0},
    # the reference study's methods: BET mask (f = 0.2), V-SHARP up to 6 mm, and the iterative
    # threshold-based inversion of Tang et al. 2013 as published (threshold 0.1, geometry
    # constraint from the initial TKD estimate, at most 4 iterations, stop at 1 % change)
    "study": {"mask_method": "bet", "bet_fraction": 0.2, "bgremove_method": "vsharp",
              "sharp_radius_mm": 6.0, "inversion_method": "iterative_tkd",
              "iterative_tkd_threshold": 0.1, "iterative_tkd_max_iter": 4,
              "iterative_tkd_tol": 1e-2, "iterative_tkd_structure_n_sd": 2.0},
    # plain TV with the least-squares refit instead of the Bregman step: best on the 2016 in-vivo
    # challenge data (nrmse 57 vs COSMOS, ROI slope 0.95) but below the default on the piecewise-
    # constant simulator heads (docs/benchmarks.md, recon-debias)
    "tv_refit": {"inversion_method": "tv", "tv_lambda": 2e-3, "tv_max_iter": 30, "tv_bregman_iterations": 0,
                 "tv_debias": "refit", "tv_refit_mu": 0.1, "tv_mask_data": False},
    # the refit with the field fitted inside the mask and the boundary-field correction (issue 14):
    # first solve, a second solve on the corrected data (no residual added back), then the refit of
    # the field inside the mask. Between the default and tv_refit on the 2016 data, below the default
    # on the simulator heads (docs/benchmarks.md, recon-refit-mask)
    "tv_refit_mask": {"inversion_method": "tv", "tv_lambda": 2e-3, "tv_max_iter": 15, "tv_bregman_iterations": 1,
                      "tv_bregman_max_iter": 15, "tv_bregman_fraction": 0.0, "tv_debias": "refit",
                      "tv_refit_mu": 0.1, "tv_mask_data": True, "lbv_boundary_pass2_depth_mm": 0.0},
    # tv_refit_mask with the boundary-field correction in the data from the start (sources from a
    # 5-iteration TV estimate, 15 mm, 0.02 ppm) and that estimate's field outside the mask as the data
    # there (tv_outside_weight 1), lambda 2.2e-3: meets issue 15's 2016 bar (nrmse 57.5, ROI slope
    # 0.956) with the field fitted as issue 14 needs it and no larger worst non-adjacent halo than the
    # default on heads 101 and 102, but lower chi correlation in the brain, a caudate bias on the
    # simulated heads and a larger shift on 8 null heads (docs/benchmarks.md, recon-refit-start)
    "tv_refit_early": {"inversion_method": "tv", "tv_lambda": 2.2e-3, "tv_max_iter": 15, "tv_bregman_iterations": 1,
                       "tv_bregman_max_iter": 15, "tv_bregman_fraction": 0.0, "tv_debias": "refit",
                       "tv_refit_mu": 0.1, "tv_mask_data": True, "tv_outside_weight": 1.0,
                       "lbv_boundary_depth_mm": 15.0, "lbv_boundary_threshold_ppm": 0.02,
                       "lbv_boundary_estimate_iter": 5},
    # free exterior sources (issue 14's halo): TV on LBV's output with no penalty on chi outside the
    # mask, so the part of a deep source's field that LBV's boundary condition removed is explained by
    # sources outside the mask instead of a halo inside it; no boundary-field correction; the data
    # split's penalty 0.1 and 30 + 15 iterations converge the exterior sources. Removes most of the halo
    # on simulated heads 101 and 102 and raises the chi correlation on the recon heads, but on 8 other
    # heads the white-matter-referenced shift stays at 1.44 % (single_pass 1.47 %, the default 0.62 %), ROIs
    # next to the planted ones take more of the effect, and the 2016 challenge score drops to 79.7 / slope
    # 0.90 (single_pass 75.2 / 0.91, the default 75.5 / 0.92): docs/benchmarks.md, recon-exterior
    "tv_exterior": {"inversion_method": "tv", "tv_mask_data": True, "tv_outside_weight": 0.0,
                    "tv_outside_reg_weight": 0.0, "tv_rho_data": 0.1, "tv_max_iter": 30, "tv_bregman_iterations": 1,
                    "tv_bregman_max_iter": 15, "lbv_boundary_depth_mm": 0.0},
    # the default chain's second pass of the boundary-field correction spelled out (10 mm, the 10-20 mm
    # band above 0.08 ppm; the preset under which it was measured before it became the default, kept so
    # that configurations naming it run the same chain)
    "tv_pass2": {"inversion_method": "tv", "tv_mask_data": True, "lbv_boundary_depth_mm": 20.0,
                 "lbv_boundary_threshold_ppm": 0.01, "lbv_boundary_pass2_depth_mm": 10.0,
                 "lbv_boundary_pass2_threshold_ppm": 0.08},
}


@dataclass
class ReconResult:
    """Outputs of :func:`reconstruct` (all (x, y, z) arrays).

    chi_ppm : float32 susceptibility, 0 outside ``mask``.
    mask : bool, the final mask: the eroded mask, or the quality mask with
        ``keep_boundary_layer``.
    local_field_ppm : float32 background-removed field, 0 outside the eroded mask (the
        background removal's boundary condition on the rim that ``keep_boundary_layer`` keeps).
    field_ppm : float32 total field from the echo fit, 0 outside the brain mask.
    brain_mask : bool, the brain mask (from the magnitude, or as given).
    quality_mask : bool, ``brain_mask`` without the voxels of unreliable phase: the
        region that was unwrapped and background-corrected (``mask`` is its erosion).
    qc : dict of floats (volumes, field ranges, fit residual, timings).
    config : the :class:`ChainConfig` used.
    """

    chi_ppm: np.ndarray
    mask: np.ndarray
    local_field_ppm: np.ndarray
    field_ppm: np.ndarray
    qc: dict[str, float]
    config: ChainConfig
    brain_mask: np.ndarray | None = field(default=None, repr=False)
    quality_mask: np.ndarray | None = field(default=None, repr=False)


def boundary_correction(eroded, brain, voxel_size_mm, b0_dir, config: ChainConfig, store: dict, *,
                        exterior: bool = False):
    """The boundary-field correction of the "tv" and "tgv" inversions (``lbv_boundary_depth_mm``).

    Returns None when no voxel of ``eroded`` (LBV's eroded mask) lies deeper than
    ``config.lbv_boundary_depth_mm``, else a function of a chi estimate that returns the part of
    the field of its deep sources (voxels deeper than that, away from their median by more than
    ``lbv_boundary_threshold_ppm``) that LBV on ``brain`` removed
    (:func:`qsmdask.bgremove.lbv_boundary_field`; with ``exterior`` also their field outside
    ``eroded``, for ``tv_outside_weight``), and keeps the last one in ``store["h"]``. The
    inversions' ``data_correction``; bench/recon.py uses it to score given local fields as the
    chain inverts its own."""
    cfg = config
    vs = check_voxel_size(voxel_size_mm)
    b = check_b0_dir(b0_dir)
    deep = eroded & (distance_to_edge_mm(eroded, vs) > cfg.lbv_boundary_depth_mm)
    if not deep.any():
        return None

    def correction(x):  # LBV's missing boundary part of the deep estimate's field
        src = _boundary_sources(x, deep, cfg.lbv_boundary_threshold_ppm)
        store["h"] = bgremove.lbv_boundary_field(src, deep, brain, vs, b0_dir=b, pad_voxels=cfg.pad_voxels,
                                                 fft_workers=cfg.fft_workers, exterior=exterior)[0]
        return store["h"]

    return correction


def _boundary_sources(x, region, threshold_ppm):
    """The voxels of ``region`` whose estimate ``x`` differs from its median over ``region`` by
    more than ``threshold_ppm``, as that difference (0 elsewhere): the sources of the correction."""
    d = np.where(region, x - np.median(x[region]), 0)
    return np.where(np.abs(d) > threshold_ppm, d, 0).astype(np.float32)


def start_correction(local, eroded, brain, voxel_size_mm, b0_dir, config: ChainConfig, store: dict, *,
                     exterior: bool = False):
    """The boundary-field correction of the "start" stage (``lbv_boundary_estimate_iter`` > 0):
    the part of the field of sources estimated by separate TV solves of LBV's output ``local``
    (field fitted inside ``eroded``, the chain's lambda, no Bregman step) that LBV on ``brain``
    removed, to be added to ``local`` before the inversion's first iteration; also kept in
    ``store["h"]`` (with ``exterior`` also their field outside ``eroded``, as
    :func:`boundary_correction`). None when no voxel of ``eroded`` lies deep enough.

    ``lbv_boundary_shell_mm`` 0: the sources are the voxels deeper than ``lbv_boundary_depth_mm``
    of a ``lbv_boundary_estimate_iter``-iteration solve (threshold ``lbv_boundary_threshold_ppm``).
    ``lbv_boundary_shell_mm`` s > 0: those deeper than ``lbv_boundary_depth_mm`` come from a
    solve of ``tv_max_iter`` iterations (threshold ``lbv_boundary_threshold_ppm``), those of the
    shell between s and ``lbv_boundary_depth_mm`` from the early-stopped one (threshold
    ``lbv_boundary_shell_threshold_ppm``, median of the shell)."""
    cfg = config
    vs = check_voxel_size(voxel_size_mm)
    b = check_b0_dir(b0_dir)

    def solve(n):
        return inversion.tv_admm(local, eroded, vs, b0_dir=b, lam=cfg.tv_lambda, max_iter=int(n), edge_fraction=0.0,
                                 mask_data=True, pad_voxels=cfg.pad_voxels, fft_workers=cfg.fft_workers)

    shell_mm = float(cfg.lbv_boundary_shell_mm)
    if shell_mm == 0:  # the Bregman stage's correction, of the early-stopped estimate
        correction = boundary_correction(eroded, brain, vs, b, cfg, store, exterior=exterior)
        return None if correction is None else correction(solve(cfg.lbv_boundary_estimate_iter))
    dist = distance_to_edge_mm(eroded, vs)
    deep = eroded & (dist > cfg.lbv_boundary_depth_mm)
    region = eroded & (dist > shell_mm)
    if not region.any():
        return None
    shell = region & ~deep
    src = np.zeros(region.shape, dtype=np.float32)
    if shell.any():
        src += _boundary_sources(solve(cfg.lbv_boundary_estimate_iter), shell, cfg.lbv_boundary_shell_threshold_ppm)
    if deep.any():
        src += _boundary_sources(solve(cfg.tv_max_iter), deep, cfg.lbv_boundary_threshold_ppm)
    store["h"] = bgremove.lbv_boundary_field(src, region, brain, vs, b0_dir=b, pad_voxels=cfg.pad_voxels,
                                             fft_workers=cfg.fft_workers, exterior=exterior)[0]
    return store["h"]


def pass2_correction(chi, eroded, brain, voxel_size_mm, b0_dir, config: ChainConfig):
    """The second pass's boundary-field correction (``lbv_boundary_pass2_depth_mm`` > 0): the part of
    the field of the sources of the estimate ``chi`` deeper than that depth in ``eroded`` (threshold
    ``lbv_boundary_threshold_ppm`` deeper than ``lbv_boundary_depth_mm``,
    ``lbv_boundary_pass2_threshold_ppm`` in the band between; deviations from one median over the
    region) that LBV on ``brain`` removed; None when no voxel lies deep enough."""
    cfg = config
    vs = check_voxel_size(voxel_size_mm)
    b = check_b0_dir(b0_dir)
    dist = distance_to_edge_mm(eroded, vs)
    region = eroded & (dist > cfg.boundary_pass2_depth_mm)
    if not region.any():
        return None
    deep = region & (dist > cfg.lbv_boundary_depth_mm)
    d = np.where(region, chi - np.median(chi[region]), 0)
    thr = np.where(deep, cfg.lbv_boundary_threshold_ppm, cfg.lbv_boundary_pass2_threshold_ppm)
    src = np.where(region & (np.abs(d) > thr), d, 0).astype(np.float32)
    return bgremove.lbv_boundary_field(src, region, brain, vs, b0_dir=b, pad_voxels=cfg.pad_voxels,
                                       fft_workers=cfg.fft_workers)[0]


def invert_tv(local_field_ppm, eroded, brain, voxel_size_mm, b0_dir, config: ChainConfig, *, magnitude=None):
    """The "tv" / "tgv" inversion stage of :func:`reconstruct` on LBV's (or another background
    removal's) output, with the boundary-field correction where configured
    (:attr:`ChainConfig.boundary_correction_stage`), ``tv_outside_weight`` and LBV's rim kept
    (:attr:`ChainConfig.boundary_layer_kept`). bench/recon.py calls it to score a given local
    field as the chain inverts its own.

    Parameters
    ----------
    local_field_ppm : (x, y, z) local field, 0 outside ``eroded``.
    eroded : bool, the background removal's output mask (LBV's eroded mask).
    brain : bool, the mask the background removal ran on (the quality mask).
    voxel_size_mm, b0_dir : geometry.
    config : :class:`ChainConfig` with ``inversion_method`` "tv" or "tgv".
    magnitude : (x, y, z) first-echo magnitude (edge weights), or None.

    Returns
    -------
    (chi_ppm, local_field_ppm, final_mask, boundary_rms_ppm): the local field with the correction
    in it (counted once), the final mask (``brain`` with the rim kept, else ``eroded``) and the RMS
    of the correction on ``eroded`` (0 without it).
    """
    cfg = config
    if cfg.inversion_method not in ("tv", "tgv"):
        raise ValueError(f"invert_tv needs inversion_method 'tv' or 'tgv', got {cfg.inversion_method!r}")
    vs, b = check_voxel_size(voxel_size_mm), check_b0_dir(b0_dir)
    local = np.asarray(local_field_ppm, dtype=np.float32)
    tgv = cfg.inversion_method == "tgv"
    mask_data = bool(cfg.tgv_mask_data if tgv else cfg.tv_mask_data)
    boundary = {}
    correction = None
    outside = 0.0 if tgv else cfg.tv_outside_weight
    # the field outside the mask is the deep estimate's own field (not 0): tv_outside_weight > 0
    # (with tv_mask_data false the data term is already on the whole grid, with weight 1)
    exterior = outside > 0
    outside_field = None
    stage = cfg.boundary_correction_stage
    final = eroded
    boundary_rms = 0.0
    if stage == "bregman":
        correction = boundary_correction(eroded, brain, vs, b, cfg, boundary, exterior=exterior)
    elif stage == "start":
        # sources from separate TV solves (an early-stopped one; with lbv_boundary_shell_mm a full
        # one for the deep part); the corrected field is the data of the whole inversion, from its
        # first iteration (lbv_boundary_estimate_iter)
        h = start_correction(local, eroded, brain, vs, b, cfg, boundary, exterior=exterior)
        if h is not None:
            local = np.where(eroded, local + h, 0).astype(np.float32)
            if exterior:  # the data outside the mask: the estimate's field there
                outside_field = np.where(eroded, 0, h).astype(np.float32)
        del h
    support, lam, weight = eroded, cfg.tv_lambda, None
    scale = 1.0  # of the regularisation weights (and of the refit's closeness weight)
    if cfg.boundary_layer_kept and mask_data:
        # the data term stays on the eroded mask (weight 0 on the rim, whose field LBV set to
        # 0); tv_admm normalises the weights to mean 1 over its mask, i.e. 1/p on the eroded
        # part (p its share of the mask): lam / p^2 (and the refit's mu / p^2, the weight
        # beside the same data term) is the same problem as before
        p = float(eroded.sum()) / float(brain.sum())
        support, lam, weight = brain, cfg.tv_lambda / (p * p), eroded.astype(np.float32)
        scale = 1.0 / (p * p)  # (and outside_weight by 1/p, the data weight inside)
        final = brain
    mag = magnitude if (cfg.tgv_edge_fraction if tgv else cfg.tv_edge_fraction) > 0 else None
    if tgv:
        chi = inversion.tgv_admm(local, support, vs, b0_dir=b, alpha1=cfg.tgv_alpha1 * scale,
                                 alpha0=cfg.tgv_alpha0 * scale, max_iter=cfg.tgv_max_iter,
                                 magnitude=mag, data_weight=weight, edge_fraction=cfg.tgv_edge_fraction,
                                 mask_data=mask_data, bregman_iterations=cfg.tgv_bregman_iterations,
                                 bregman_max_iter=cfg.tgv_bregman_max_iter, data_correction=correction,
                                 pad_voxels=cfg.pad_voxels, fft_workers=cfg.fft_workers)
    else:
        def solve(data, corr):
            return inversion.tv_admm(data, support, vs, b0_dir=b, lam=lam, max_iter=cfg.tv_max_iter,
                                     magnitude=mag, data_weight=weight,
                                     edge_fraction=cfg.tv_edge_fraction, mask_data=mask_data,
                                     bregman_iterations=cfg.tv_bregman_iterations,
                                     bregman_max_iter=cfg.tv_bregman_max_iter, data_correction=corr,
                                     bregman_fraction=cfg.tv_bregman_fraction,
                                     debias=cfg.tv_debias, refit_mu=cfg.tv_refit_mu * scale,
                                     refit_amplitude=bool(cfg.tv_refit_amplitude),
                                     outside_weight=outside * np.sqrt(scale) if mask_data else 0.0,
                                     outside_field_ppm=outside_field,
                                     outside_reg_weight=cfg.tv_outside_reg_weight, rho_data=cfg.tv_rho_data,
                                     pad_voxels=cfg.pad_voxels, fft_workers=cfg.fft_workers)

        chi = solve(local, correction)
        if cfg.boundary_pass2_depth_mm > 0 and "h" in boundary:
            # second pass: sources from the final estimate down to the pass-2 depth; their boundary
            # field replaces the first correction and the inversion starts again from scratch
            h2 = pass2_correction(chi, eroded, brain, vs, b, cfg)
            if h2 is not None:
                boundary["h"] = h2
                chi = solve(np.where(eroded, local + h2, 0).astype(np.float32), None)
            del h2
    if "h" in boundary:
        if stage == "bregman":  # ("start": it is in `local` already)
            local = np.where(eroded, local + boundary["h"], 0).astype(np.float32)
        boundary_rms = float(np.sqrt(np.mean(boundary["h"][eroded] ** 2)))
    return chi, local, final, boundary_rms


def _as4d(x, name):
    a = np.asarray(x)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise ValueError(f"{name} must be (x, y, z) or (x, y, z, echo), got shape {a.shape}")
    return a.astype(np.float32, copy=False)


def reconstruct(magnitude, phase_rad, echo_times_s, voxel_size_mm, *, b0_dir, b0_tesla: float,
                config: ChainConfig = ChainConfig(), mask=None) -> ReconResult:
    """Reconstruct a susceptibility map from magnitude and wrapped phase.

    Parameters
    ----------
    magnitude : (x, y, z, echo) or (x, y, z) array (float32 preferred).
    phase_rad : wrapped phase in radians, same shape as ``magnitude``.
    echo_times_s : echo times in seconds, one per echo.
    voxel_size_mm : 3 floats.
    b0_dir : unit B0 vector in voxel-axis coordinates
        (:func:`qsmdask.kernels.b0_direction_from_affine`).
    b0_tesla : field strength in tesla (> 0).
    config : :class:`ChainConfig`.
    mask : optional precomputed brain mask (x, y, z) bool; computed from the
        first-echo magnitude when None.

    Returns
    -------
    :class:`ReconResult`.

    References
    ----------
    Schofield & Zhu, Opt Lett 2003 (unwrapping); Schweser et al., NeuroImage 2011
    (SHARP); Wu et al., MRM 2012 (V-SHARP); Shmueli et al., MRM 2009 (TKD).
    """
    if not isinstance(config, ChainConfig):
        raise ValueError(f"config must be a ChainConfig, got {type(config).__name__}")
    mag = _as4d(magnitude, "magnitude")
    phs = _as4d(phase_rad, "phase_rad")
    if mag.shape != phs.shape:
        raise ValueError(f"magnitude shape {mag.shape} differs from phase_rad shape {phs.shape}")
    te = np.asarray(echo_times_s, dtype=float).reshape(-1)
    if te.size != phs.shape[3]:
        raise ValueError(f"echo_times_s has {te.size} entries for {phs.shape[3]} echoes")
    if np.any(~np.isfinite(te)) or np.any(te <= 0):
        raise ValueError(f"echo_times_s must be positive seconds, got {te.tolist()}")
    vs = check_voxel_size(voxel_size_mm)
    b = check_b0_dir(b0_dir)
    if not (np.isfinite(b0_tesla) and b0_tesla > 0):
        raise ValueError(f"b0_tesla must be > 0, got {b0_tesla!r}")
    cfg = config
    timings = {}
    t0 = time.perf_counter()

    # 1. brain mask
    if mask is None and cfg.mask_method == "bet":
        brain = maskmod.bet_mask(mag[..., 0], vs, fractional_threshold=cfg.bet_fraction)
    elif mask is None:
        brain = maskmod.threshold_mask(mag[..., 0], vs, threshold_fraction=cfg.mask_threshold_fraction,
                                       open_mm=cfg.mask_open_mm)
    else:
        brain = np.asarray(mask, dtype=bool)
        if brain.shape != mag.shape[:3]:
            raise ValueError(f"mask shape {brain.shape} differs from image shape {mag.shape[:3]}")
    if not brain.any():
        raise ValueError("the brain mask is empty (check the magnitude image)")
    # 1b. phase-quality refinement: voxels whose wrapped phase is aliased (steep field next
    # to air and bone) would spread their error over the brain through the unwrapping
    temporal = cfg.unwrap_method == "temporal" and phs.shape[3] > 1
    whole_brain = brain
    if cfg.quality_mask:
        if temporal:
            qphase = unwrap.echo_difference_phase(phs, te, magnitude=mag)[0]
        else:
            qphase = phs[..., int(np.argmax(te))]  # the echo with the most wraps
        max_grad = cfg.quality_max_gradient_rad if phs.shape[3] > 1 else cfg.quality_single_echo_gradient_rad
        brain = maskmod.phase_quality_mask(qphase, whole_brain, max_gradient_rad=max_grad,
                                           pairs=cfg.quality_pairs, dilate_voxels=cfg.quality_dilate_voxels,
                                           dilate_min_gradient_rad=min(cfg.quality_dilate_min_gradient_rad,
                                                                       0.999 * max_grad))
        del qphase
        if not brain.any():
            raise ValueError("no voxel of reliable phase is left in the brain mask "
                             "(quality_max_gradient_rad too small, or phase is noise)")
    timings["time_mask_s"] = time.perf_counter() - t0

    # 2. unwrap
    t1 = time.perf_counter()
    if cfg.unwrap_method == "temporal":
        unwrapped = unwrap.temporal_unwrap(phs, te, vs, magnitude=mag, mask=brain,
                                           laplacian_form=cfg.laplacian_form, fft_workers=cfg.fft_workers)
    else:
        unwrapped = np.empty(phs.shape, dtype=np.float32)
        for e in range(phs.shape[3]):
            if cfg.unwrap_method == "region_growing":
                unwrapped[..., e] = unwrap.region_growing_unwrap(phs[..., e], magnitude=mag[..., e], mask=brain)
            else:
                unwrapped[..., e] = unwrap.laplacian_unwrap(phs[..., e], vs, mask=brain,
                                                            method=cfg.laplacian_form,
                                                            fft_workers=cfg.fft_workers)
    if cfg.unwrap_method == "region_growing" and phs.shape[3] > 1:
        # echoes are grown from different seeds: remove their relative 2 pi offsets using
        # the wrapped echo-to-echo phase evolution (unambiguous when < pi per echo step)
        for e in range(1, phs.shape[3]):
            step = np.angle(np.exp(1j * (phs[..., e][brain] - phs[..., e - 1][brain])))
            diff = unwrapped[..., e][brain] - unwrapped[..., e - 1][brain]
            k = np.round(np.median(diff - step) / (2 * np.pi))
            unwrapped[..., e] -= np.float32(2 * np.pi * k)
    timings["time_unwrap_s"] = time.perf_counter() - t1

    # 3. echo fit -> field in ppm
    t2 = time.perf_counter()
    slope, offset, resid = unwrap.fit_phase_slope(unwrapped, te, magnitude=mag, mask=brain,
                                                  fit_offset=cfg.fit_offset or temporal)
    field_ppm = unwrap.phase_slope_to_ppm(slope, b0_tesla=b0_tesla, phase_sign=cfg.phase_sign)
    del unwrapped
    timings["time_fit_s"] = time.perf_counter() - t2

    # 4. background removal
    t3 = time.perf_counter()

    def remove_background(f, m):
        if cfg.bgremove_method == "sharp":
            return bgremove.sharp(f, m, vs, radius_mm=cfg.sharp_radius_mm, threshold=cfg.sharp_threshold,
                                  fft_workers=cfg.fft_workers)
        if cfg.bgremove_method == "pdf":
            return bgremove.pdf(f, m, vs, b0_dir=b, fft_workers=cfg.fft_workers)
        if cfg.bgremove_method == "lbv":
            return bgremove.lbv(f, m, vs, fft_workers=cfg.fft_workers)
        return bgremove.vsharp(f, m, vs, max_radius_mm=cfg.sharp_radius_mm, threshold=cfg.sharp_threshold,
                               fft_workers=cfg.fft_workers)

    offset_laplacian = 0.0
    if cfg.inversion_method == "tv_laplacian":  # background removal is part of the inversion
        eroded = ndi.binary_erosion(brain, structure=ndi.generate_binary_structure(3, 1), border_value=0)
        local = None
    else:
        local, eroded = remove_background(field_ppm, brain)
        if phs.shape[3] == 1 and cfg.single_echo_offset_fit:
            # one echo: the non-harmonic (transceive) part of the phase offset is still in `local`
            local, offset_laplacian = bgremove.remove_constant_laplacian(
                local, eroded, brain, vs, remove_background, weight=np.square(mag[..., 0]))
    timings["time_bgremove_s"] = time.perf_counter() - t3

    # 5. dipole inversion
    t4 = time.perf_counter()
    boundary_rms = 0.0
    final = eroded  # the final mask (keep_boundary_layer: the quality mask)
    if cfg.inversion_method == "tv_laplacian":
        chi = inversion.tv_admm(np.where(brain, field_ppm, 0).astype(np.float32), brain, vs, b0_dir=b,
                                lam=cfg.tv_laplacian_lambda, max_iter=cfg.tv_max_iter,
                                magnitude=mag[..., 0] if cfg.tv_edge_fraction > 0 else None,
                                edge_fraction=cfg.tv_edge_fraction, laplacian_data=True,
                                bregman_iterations=cfg.tv_bregman_iterations,
                                bregman_max_iter=cfg.tv_bregman_max_iter,
                                bregman_fraction=cfg.tv_bregman_fraction,
                                pad_voxels=cfg.pad_voxels, fft_workers=cfg.fft_workers)
        # the local field this chi explains (its dipole field inside the final mask)
        fft = PaddedFFT(chi.shape, cfg.pad_voxels, workers=cfg.fft_workers)
        local = fft.inverse(fft.forward(chi) * dipole_kernel(fft.padded_shape, vs, b, real=True))
        local = np.where(eroded, local, 0).astype(np.float32)
    elif cfg.inversion_method in ("tv", "tgv"):
        chi, local, final, boundary_rms = invert_tv(local, eroded, brain, vs, b, cfg,
                                                    magnitude=mag[..., 0])
    elif cfg.inversion_method == "iterative_tkd":
        n_sd = cfg.iterative_tkd_structure_n_sd
        chi = inversion.iterative_tkd(local, eroded, vs, b0_dir=b, threshold=cfg.iterative_tkd_threshold,
                                      max_iter=cfg.iterative_tkd_max_iter, tol=cfg.iterative_tkd_tol,
                                      structure_mask="initial" if n_sd > 0 else None,
                                      structure_n_sd=n_sd if n_sd > 0 else 2.0,
                                      pad_voxels=cfg.pad_voxels, fft_workers=cfg.fft_workers)
    else:
        chi = inversion.tkd(local, eroded, vs, b0_dir=b, threshold=cfg.tkd_threshold,
                            pad_voxels=cfg.pad_voxels, fft_workers=cfg.fft_workers)
    timings["time_inversion_s"] = time.perf_counter() - t4
    timings["time_total_s"] = time.perf_counter() - t0

    voxel_ml = float(np.prod(vs)) / 1000.0
    fb = field_ppm[brain]
    lf = local[eroded]
    cv = chi[final]
    qc = {
        "mask_volume_ml": float(whole_brain.sum()) * voxel_ml,
        "quality_mask_volume_ml": float(brain.sum()) * voxel_ml,
        "eroded_mask_volume_ml": float(eroded.sum()) * voxel_ml,
        "n_echoes": float(phs.shape[3]),
        "field_p01_ppm": float(np.percentile(fb, 1)),
        "field_p99_ppm": float(np.percentile(fb, 99)),
        "field_range_ppm": float(fb.max() - fb.min()),
        "fit_residual_rad": float(np.median(resid[brain])) if phs.shape[3] > 2 else 0.0,
        "phase_offset_std_rad": float(np.std(offset[brain])),
        # single echo: Laplacian of the removed offset as phase (rad/m^2; about 2 mu0 omega sigma,
        # ~1000 for brain tissue at 3 T if it is the transceive phase)
        "single_echo_offset_laplacian_rad_per_m2": float(
            offset_laplacian * 1e6 * cfg.phase_sign * 2 * np.pi * unwrap.GAMMA_HZ_PER_T * b0_tesla * 1e-6 * te[0]),
        "local_field_std_ppm": float(lf.std()) if lf.size else 0.0,
        # RMS of the boundary part of the deep estimate's field added back (lbv_boundary_depth_mm)
        "lbv_boundary_field_rms_ppm": boundary_rms,
        "local_field_p01_ppm": float(np.percentile(lf, 1)) if lf.size else 0.0,
        "local_field_p99_ppm": float(np.percentile(lf, 99)) if lf.size else 0.0,
        "chi_mean_ppm": float(cv.mean()) if cv.size else 0.0,
        "chi_std_ppm": float(cv.std()) if cv.size else 0.0,
        "chi_p01_ppm": float(np.percentile(cv, 1)) if cv.size else 0.0,
        "chi_p99_ppm": float(np.percentile(cv, 99)) if cv.size else 0.0,
    }
    qc.update({k: float(v) for k, v in timings.items()})
    return ReconResult(chi_ppm=chi, mask=final, local_field_ppm=local,
                       field_ppm=np.where(brain, field_ppm, 0).astype(np.float32), qc=qc,
                       config=cfg, brain_mask=whole_brain, quality_mask=brain)
