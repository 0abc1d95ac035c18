"""Total-variation regularised dipole inversion by ADMM with closed-form FFT updates."""

from __future__ import annotations

import numpy as np

from qsmdask.inversion._ops import check_admm_options, corrected_data, edge_weights, gradient, gradient_adjoint
from qsmdask.inversion.tkd import check_inversion_inputs
from qsmdask.kernels import PaddedFFT, dipole_kernel, laplacian_kernel

__all__ = ["tv_admm"]


def tv_admm(local_field_ppm, mask, voxel_size_mm, *, b0_dir=(0.0, 0.0, 1.0), lam: float = 1e-3,
            magnitude=None, data_weight=None, edge_fraction: float = 0.3, rho: float | None = None,
            max_iter: int = 30, tol: float = 1e-3, mask_data: bool = False, bregman_iterations: int = 0,
            bregman_max_iter: int | None = None, bregman_fraction: float = 1.0, laplacian_data: bool = False,
            data_correction=None, debias: str = "none", refit_mu: float = 0.1, refit_amplitude: bool = True,
            outside_weight: float = 0.0, outside_field_ppm=None, outside_reg_weight: float = 1.0,
            rho_data: float = 1.0, pad_voxels=(16, 16, 16), fft_workers: int = 1) -> np.ndarray:
    """Weighted total-variation dipole inversion (ADMM, every update closed form).

    Solves  min_chi  1/2 || W (IFFT(D FFT(chi)) - f) ||^2 + lam || E grad(chi) ||_{2,1}
    where W is the data weight (the brain mask, times ``data_weight`` if given, e.g.
    a normalised magnitude: only voxels inside the brain constrain the solution) and
    E the gradient weights (0 on the strongest ``edge_fraction`` of the magnitude's
    gradients, as the MEDI edge mask; all 1 when ``magnitude`` is None).  Splitting
    y = D chi and z = grad chi makes every ADMM step a pointwise formula or one
    division in k-space.

    Parameters
    ----------
    local_field_ppm : (x, y, z) local field in ppm.
    mask : (x, y, z) bool brain mask (data support); the result is 0 outside.
    voxel_size_mm : 3 floats.
    b0_dir : B0 in voxel-axis coordinates.
    lam : regularisation weight (ppm units of the field; > 0).
    magnitude : optional (x, y, z) magnitude for edge weights.
    data_weight : optional (x, y, z) non-negative data weights (e.g. magnitude or
        inverse noise); normalised to mean 1 in the mask.
    edge_fraction : fraction of gradients treated as edges (0 disables), in [0, 1).
    mask_data : False (default): the field is taken as 0 outside the mask and the
        data term is solved exactly in k-space (2 FFTs per iteration;
        ``data_weight`` unused; better on the 2016 data and phantoms here);
        True: data term only inside the (weighted) mask (extra splitting,
        4 FFTs per iteration).
    bregman_iterations : Bregman (debiasing) steps after the first solve (>= 0): the field
        residual inside the mask, f - D chi, is added back to the data and the problem
        is solved again from the previous state.  Total variation shrinks the contrast
        of compact structures by an amount proportional to ``lam``; one step restores
        most of it (deep-grey ROI means) at the price of some noise and streaking.
    bregman_max_iter : ADMM iterations of each Bregman step (default ``max_iter``).
    bregman_fraction : share of the residual added back at each Bregman step, in [0, 1]
        (default 1, the Bregman iteration). 0: the step only solves again, from the previous
        state, with the data plus ``data_correction`` (the boundary-field correction without
        refitting the residual; used with ``debias="refit"``).
    laplacian_data : single-step background removal and inversion: ``local_field_ppm`` is
        then the TOTAL field (background included) inside ``mask``, and the data term is its
        7-point Laplacian on the mask's interior (voxels whose six neighbours are in the mask),
        modelled as the Laplacian of ``D chi``: background fields are harmonic there and drop
        out exactly, with no boundary condition on the local field. A separate background
        removal (LBV, SHARP) imposes one (LBV: local field 0 at the mask edge) and so removes
        the part of a deep source's field that is harmonic in the brain, which the inversion
        turns into a broad halo (``bench/halo.py``). Implies ``mask_data``; ``data_weight``
        applies to the interior. The result is 0 outside the interior.
    data_correction : None, or a function of the current estimate (full-size array, 0 outside
        the mask) that returns a field (ppm, full size) to add to the data inside the mask
        before each Bregman step (it replaces the previous step's correction). The chain
        passes the part of the field of the deep susceptibility that LBV removed
        (:func:`qsmdask.bgremove.lbv_boundary_field`). Needs ``bregman_iterations >= 1``.
    outside_weight : with ``mask_data=True`` only: weight (>= 0, default 0) of the data term on
        the voxels of the solver's grid outside the mask (the mask's bounding box plus
        ``pad_voxels``), where the field is taken as 0 plus what ``data_correction`` returns there
        (its values outside the mask are then kept). 0: the field is fitted inside the mask only;
        1: the data term of ``mask_data=False`` (field 0 outside), except that a correction for
        the boundary field of the deep sources also gives their field outside the mask instead of
        leaving it forced to 0 there (the chain: ``ChainConfig.tv_outside_weight``).
    outside_field_ppm : None (default: the field outside the mask is 0), or a full-size field (ppm)
        whose values outside the mask are the data there, on the solver's grid (the mask's bounding
        box; 0 in the padding beyond it): with ``outside_weight`` > 0, or with ``mask_data=False``
        (whose data term covers the whole grid with weight 1). The chain passes the field outside
        the mask of the deep sources' estimate when the boundary-field correction is in the data
        from the start (``ChainConfig.lbv_boundary_estimate_iter`` with ``tv_outside_weight``).
    outside_reg_weight : weight in [0, 1] (default 1) of the regularisation on the voxels of the
        solver's grid outside the mask (the mask's bounding box plus ``pad_voxels``), where chi is
        an auxiliary unknown (the result is 0 there). 1: the same TV everywhere. With
        ``mask_data=True`` (the field fitted inside the mask only) and a smaller weight, sources
        outside the mask become cheap, so a field that is harmonic inside the mask (what a
        background removal with a boundary condition, e.g. LBV's local field = 0 on the mask's edge,
        takes away from the field of deep sources; any residual background) is explained by them
        instead of by a broad change of chi inside the mask: the exterior sources of a total field
        inversion (Liu et al. 2017), here on a background-removed field. 0: no penalty outside.
        Needs ``mask_data=True``, no ``laplacian_data`` and ``outside_weight`` 0.
    rho_data : ADMM penalty of the data split (``mask_data=True``; default 1). The free exterior
        sources converge slowly; 0.1 converged them in about half the iterations on simulated
        heads (docs/benchmarks.md, recon-exterior).
    debias : "none" (default) or "refit": two least-squares corrections of the TV solution
        against the data term, after the last solve (one FFT pair each):

        1. amplitude: chi is multiplied by the scalar k that best explains the field,
           k = <D chi, f> / ||D chi||^2 (least squares refit on the span of the solution,
           the simplest model subspace of Deledalle et al. 2015).  Total variation shrinks
           every contrast by an amount set by ``lam``; the data fix the amplitude again.
        2. data refit: chi <- argmin_x ||D x - f||^2 + refit_mu ||x - chi||^2, closed form
           chi + IFFT(D R / (D^2 + refit_mu)) with R the spectrum of the residual f - D chi:
           the well-conditioned part of the residual (|D|^2 >> refit_mu) goes back into chi,
           the ill-conditioned cone stays with the TV solution (no streaks; noise gain at most
           1 / (2 sqrt(refit_mu))).

        Both use the data term of the solve.  With ``mask_data=False`` (the field inside the
        mask, 0 outside it) step 2 is the closed form above; with ``mask_data=True`` the data
        term is || W (D x - f) ||^2 (the field inside the mask only, W the data weights), the
        amplitude is weighted the same way and step 2 solves its normal equations
        (D W^2 D + refit_mu) dx = D W^2 (f - D chi) by conjugate gradients (at most 30
        iterations of two FFT pairs; the condition number is at most
        (4/9 + refit_mu) / refit_mu, 5.4 at 0.1).  Measured in docs/benchmarks.md
        (recon-debias, recon-refit-mask).
    refit_mu : weight of the closeness to the TV solution in the data refit (> 0; in units
        of D^2, which lies in [0, 4/9]).
    refit_amplitude : with ``debias="refit"``: True (default) runs step 1 (the least-squares
        amplitude k); False skips it (k = 1) and runs the data refit only. k is one number for the
        whole map, fitted to the whole field: a change confined to some structures (a deep-nuclei
        increase the TV solution shrinks) changes k and so rescales every other structure of the map
        too. Without it the refit is linear in the residual: on simulated heads with +0.05 ppm planted
        in deep nuclei the adjacent ROIs moved by 3.6 % of the effect instead of 12.5 %
        (docs/benchmarks.md, recon-refit-shape).
    rho : ADMM penalty (default 100 * lam for the gradient split; the data split uses 1).
    max_iter : maximum iterations (>= 1); 30 and 50 scored the same on the 2016 data.
    tol : stop when the relative change of chi falls below this.
    pad_voxels : zero padding on each side.
    fft_workers : FFT threads (>= 1).

    Returns
    -------
    float32 (x, y, z) susceptibility (ppm), 0 outside the mask.  The problem is solved on
    the mask's bounding box plus ``pad_voxels`` (not the whole field of view).

    References
    ----------
    Langkammer C et al. Fast quantitative susceptibility mapping using 3D EPI and total
    generalized variation. NeuroImage 2015;111:622-630 (Laplacian-of-phase data term).
    Bilgic B et al. Fast quantitative susceptibility mapping with L1-regularization and
    automatic parameter selection. Magn Reson Med 2014;72:1444-1459.
    Liu Z, Kee Y, Zhou D, Wang Y, Spincemaille P. Preconditioned total field inversion (TFI)
    method for quantitative susceptibility mapping. Magn Reson Med 2017;78:303-315.
    Milovic C et al. Fast nonlinear susceptibility inversion with variational
    regularization (FANSI). Magn Reson Med 2018;80:814-821.
    Liu T et al. Morphology enabled dipole inversion (MEDI). Magn Reson Med 2012;67:137-147.
    Deledalle C-A, Papadakis N, Salmon J. On debiasing restoration algorithms: applications
    to total-variation and nonlocal-means. SSVM 2015, LNCS 9087:129-141.
    """
    f, m, vs, b = check_inversion_inputs(local_field_ppm, mask, voxel_size_mm, b0_dir)
    if not (np.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be > 0, got {lam!r}")
    step_iter = check_admm_options(edge_fraction=edge_fraction, max_iter=max_iter,
                                   bregman_iterations=bregman_iterations, bregman_max_iter=bregman_max_iter,
                                   data_correction=data_correction, debias=debias, refit_mu=refit_mu)
    if not (np.isfinite(bregman_fraction) and 0 <= bregman_fraction <= 1):
        raise ValueError(f"bregman_fraction must be in [0, 1], got {bregman_fraction!r}")
    if not isinstance(refit_amplitude, (bool, np.bool_)):
        raise ValueError(f"refit_amplitude must be True or False, got {refit_amplitude!r}")
    if debias == "refit" and laplacian_data:
        raise ValueError("debias='refit' is not available with laplacian_data")
    if data_correction is not None and laplacian_data:
        raise ValueError("data_correction cannot be combined with laplacian_data")
    if not (np.isfinite(outside_weight) and outside_weight >= 0):
        raise ValueError(f"outside_weight must be >= 0, got {outside_weight!r}")
    if outside_weight > 0 and (not mask_data or laplacian_data):
        raise ValueError("outside_weight needs mask_data=True and no laplacian_data (mask_data=False already "
                         "takes the field as 0 outside the mask with weight 1)")
    if outside_field_ppm is not None:
        if laplacian_data or (mask_data and not outside_weight > 0):
            raise ValueError("outside_field_ppm needs outside_weight > 0 (with mask_data=True) or mask_data=False, "
                             "and no laplacian_data: otherwise no data term reaches outside the mask")
        if np.shape(outside_field_ppm) != f.shape:
            raise ValueError(f"outside_field_ppm shape {np.shape(outside_field_ppm)} differs from the field's {f.shape}")
    if not (np.isfinite(outside_reg_weight) and 0 <= outside_reg_weight <= 1):
        raise ValueError(f"outside_reg_weight must be in [0, 1], got {outside_reg_weight!r}")
    if outside_reg_weight < 1 and (not mask_data or laplacian_data or outside_weight > 0):
        raise ValueError("outside_reg_weight < 1 frees the sources outside the mask to explain the field inside it: "
                         "it needs mask_data=True, no laplacian_data and outside_weight 0 (no data outside the mask)")
    if not (np.isfinite(rho_data) and rho_data > 0):
        raise ValueError(f"rho_data must be > 0, got {rho_data!r}")
    rho1 = float(rho) if rho is not None else 100.0 * lam
    if rho1 <= 0:
        raise ValueError(f"rho must be > 0, got {rho!r}")
    for name, arr in (("data_weight", data_weight), ("magnitude", magnitude)):
        if arr is not None and np.shape(arr) != f.shape:
            raise ValueError(f"{name} shape {np.shape(arr)} differs from the field's {f.shape}")
    # work on the mask's bounding box (everything outside the mask is zero data): the
    # padded FFT grid then follows the brain, not the field of view
    full_shape = f.shape
    if not m.any():
        return np.zeros(full_shape, dtype=np.float32)
    if laplacian_data:
        import scipy.ndimage as ndi

        from qsmdask.kernels import finite_difference_laplacian

        mask_data = True
        inner = ndi.binary_erosion(m, structure=ndi.generate_binary_structure(3, 1), border_value=0)
        if not inner.any():
            raise ValueError("laplacian_data: the mask has no interior voxels (thinner than 3 voxels?)")
        fz = np.where(m, f, 0).astype(np.float32)
        inv_h2 = tuple(np.float32(1.0 / (h * h)) for h in vs)
        f = np.where(inner, finite_difference_laplacian(fz, inv_h2, np.empty_like(fz)), 0).astype(np.float32)
        m = inner
    idx = np.nonzero(m)
    bb = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    f, m = f[bb], m[bb]
    if outside_field_ppm is not None:  # the data outside the mask (inside the box)
        f = np.where(m, f, np.asarray(outside_field_ppm, dtype=np.float32)[bb]).astype(np.float32)
    if data_weight is not None:
        data_weight = np.asarray(data_weight)[bb]
    if magnitude is not None:
        magnitude = np.asarray(magnitude)[bb]
    rho2 = float(rho_data)
    fft = PaddedFFT(f.shape, pad_voxels, workers=fft_workers)
    d = dipole_kernel(fft.padded_shape, vs, b, real=True)
    g2 = -laplacian_kernel(fft.padded_shape, vs, real=True)
    if laplacian_data:  # model: the Laplacian of the dipole field (the 7-point stencil's symbol)
        d = (d * -g2).astype(np.float32)
    denom = (rho2 * d * d + rho1 * g2).astype(np.float32)
    denom[0, 0, 0] = 1.0  # the mean is undetermined: keep it at 0
    # data weights on the padded grid
    w = m.astype(np.float32)
    if data_weight is not None:
        dw = np.asarray(data_weight, dtype=np.float32)
        if np.any(dw < 0):
            raise ValueError("data_weight must be non-negative")
        w = w * dw / max(float(dw[m].mean()), 1e-12)
    w = fft.pad(w)
    inside = fft.pad(m.astype(np.float32))  # the mask on the padded grid (1 inside, 0 outside)
    if outside_weight > 0:  # the solver's grid outside the mask: field 0 (+ the correction there)
        w += np.float32(outside_weight) * (1.0 - inside)
    w2 = w * w
    fp = fft.pad(f)
    if magnitude is not None:
        mag = np.asarray(magnitude, dtype=np.float32)
        e = edge_weights(fft.pad(mag * m), inside > 0, vs,
                         edge_fraction=edge_fraction)
    else:
        e = None
    shape = fft.padded_shape
    import scipy.fft as sfft

    def fwd(x):
        return sfft.rfftn(x, workers=fft.workers)

    def inv(x):
        return sfft.irfftn(x, s=shape, workers=fft.workers).astype(np.float32, copy=False)

    chi = np.zeros(shape, dtype=np.float32)
    z = np.zeros((3,) + shape, dtype=np.float32)
    u = np.zeros_like(z)
    q = np.empty_like(z)
    nrm = np.empty(shape, dtype=np.float32)
    adj = np.empty(shape, dtype=np.float32)
    y = fp.copy()
    v = np.zeros(shape, dtype=np.float32)
    thr = np.float32(lam / rho1)
    if outside_reg_weight < 1:  # the shrinkage threshold outside the mask: the exterior sources' penalty
        thr = np.where(inside > 0, thr, np.float32(thr * outside_reg_weight))
    del inside
    w2f = (w2 * fp).astype(np.float32)
    wden = (1.0 / (w2 + rho2)).astype(np.float32)
    d_r2 = (rho2 * d).astype(np.float32)
    inv_denom = (1.0 / denom).astype(np.float32)
    inv_denom[0, 0, 0] = 0.0
    if not mask_data:
        dfp = (d * fwd(fp)).astype(np.complex64)
        den0 = (d * d + rho1 * g2).astype(np.float32)
        den0[0, 0, 0] = 1.0
        inv_denom = (1.0 / den0).astype(np.float32)
        inv_denom[0, 0, 0] = 0.0
    target = fp  # the data of the current Bregman step (the field plus added-back residuals)
    base = fp  # the field the residual is measured against (plus the data correction)
    corr = np.zeros_like(fp)
    for outer in range(int(bregman_iterations) + 1):
        if outer > 0 and data_correction is not None:
            target, base, corr = corrected_data(data_correction, chi, m, bb, fft, full_shape, fp, target, corr,
                                                outside=outside_weight > 0)
        if outer > 0:  # add the residual inside the mask back to the data
            spec = fwd(chi)
            spec *= d
            resid = np.where(w > 0, base - inv(spec), 0).astype(np.float32)
            if bregman_fraction != 1:
                resid *= np.float32(bregman_fraction)

            target = (target + resid).astype(np.float32)
            w2f = (w2 * target).astype(np.float32)
            if not mask_data:
                dfp = (d * fwd(target)).astype(np.complex64)
        for it in range(int(max_iter) if outer == 0 else step_iter):
            np.subtract(z, u, out=q)
            gradient_adjoint(q, vs, out=adj)
            if mask_data:
                spec = fwd(y - v)
                spec *= d_r2
                spec += np.float32(rho1) * fwd(adj)
            else:
                spec = fwd(adj)
                spec *= np.float32(rho1)
                spec += dfp
            spec *= inv_denom
            chi_new = inv(spec)
            if mask_data:
                spec *= d
                dchi = inv(spec)
            change = float(np.linalg.norm(chi_new - chi) / max(np.linalg.norm(chi_new), 1e-12))
            chi = chi_new
            # gradient split: isotropic shrinkage (per-axis, edge-weighted with a magnitude prior)
            gradient(chi, vs, out=q)
            q += u
            if e is None:
                np.sqrt(np.einsum("a...,a...->...", q, q), out=nrm)
                scale = np.maximum(nrm - thr, 0)
                scale /= np.maximum(nrm, np.float32(1e-12))
                np.multiply(q, scale, out=z)
            else:
                np.multiply(np.sign(q), np.maximum(np.abs(q) - thr * e, 0), out=z)
            np.subtract(q, z, out=u)
            if mask_data:  # data split: pointwise weighted least squares
                y = (w2f + rho2 * (dchi + v)) * wden
                v += dchi
                v -= y
            if it > 0 and change < tol:
                break
    if debias == "refit":
        if mask_data:  # the data term of the solve: the (weighted) field inside the mask only
            chi = _refit_masked(chi, base, w2, d, np.float32(refit_mu), fwd, inv, amplitude=refit_amplitude)
        else:
            chi = _refit(chi, base, d, np.float32(refit_mu), fwd, inv,  # the field (+ data correction)
                         amplitude=refit_amplitude)
    out = np.zeros(full_shape, dtype=np.float32)
    out[bb] = np.where(m, chi[fft.slices], 0)
    return out


def _refit(chi, field, d, mu, fwd, inv, *, amplitude: bool = True):
    """Amplitude then Tikhonov-regularised data refit of a TV solution (see ``tv_admm(debias=)``).

    ``field`` is the data on the padded grid (0 outside the mask), ``d`` the real dipole
    kernel on its rfft grid; ``fwd``/``inv`` the matching transforms; ``amplitude`` False: k = 1.
    """
    dchi = inv(fwd(chi) * d)
    d64 = dchi.ravel().astype(np.float64)
    den = float(d64 @ d64)
    k = float(d64 @ field.ravel()) / den if den > 0 else 1.0
    del d64
    if not (amplitude and np.isfinite(k) and k > 0):  # (anti-correlated with its data: leave its amplitude)
        k = 1.0
    chi = chi * np.float32(k)
    resid = (field - np.float32(k) * dchi).astype(np.float32)
    spec = fwd(resid)
    spec *= (d / (d * d + mu)).astype(np.float32)
    return (chi + inv(spec)).astype(np.float32)


def _refit_masked(chi, field, w2, d, mu, fwd, inv, *, amplitude: bool = True, max_iter: int = 30,
                  tol: float = 1e-3):
    """:func:`_refit` for the data term inside the mask, || W (D x - f) ||^2.

    Amplitude k = <W D chi, W f> / ||W D chi||^2; then the data refit
    x = argmin ||W (D x - f)||^2 + mu ||x - k chi||^2, whose normal equations
    (D W^2 D + mu) dx = D W^2 (f - k D chi) have no closed form with a mask and are solved by
    conjugate gradients (condition number at most (max D^2 + mu) / mu: 5.4 at mu 0.1, so a
    few iterations; two FFT pairs each).
    """
    dchi = inv(fwd(chi) * d)
    wd = (w2 * dchi).ravel().astype(np.float64)
    den = float(wd @ dchi.ravel().astype(np.float64))
    k = float(wd @ field.ravel().astype(np.float64)) / den if den > 0 else 1.0
    del wd
    if not (amplitude and np.isfinite(k) and k > 0):  # (amplitude False: the data refit only)
        k = 1.0
    chi = chi * np.float32(k)
    resid = (w2 * (field - np.float32(k) * dchi)).astype(np.float32)

    def normal(x):  # (D W^2 D + mu) x
        return (inv(fwd(w2 * inv(fwd(x) * d)) * d) + mu * x).astype(np.float32)

    b = inv(fwd(resid) * d)
    x = np.zeros_like(chi)
    r = b.copy()
    p = r.copy()
    rr = float(np.vdot(r, r))
    stop = (tol * tol) * rr
    for _ in range(int(max_iter)):
        if rr <= stop or rr == 0:
            break
        ap = normal(p)
        alpha = rr / float(np.vdot(p, ap))
        x += np.float32(alpha) * p
        r -= np.float32(alpha) * ap
        rr_new = float(np.vdot(r, r))
        p = (r + np.float32(rr_new / rr) * p).astype(np.float32)
        rr = rr_new
    return (chi + x).astype(np.float32)
