"""PSF-fit photometry: flux and position of every source with the image's PSF model.

For each source the PSF model of :mod:`ps1mpi.algorithms.psf` (shape taken at the source's
input position) is fitted to the pixels within the fit radius:

* free mode: flux and centre ``(x, y)`` by Levenberg-Marquardt (a linear flux solve first,
  then Gauss-Newton steps with descent checks), vectorised over batches of sources
  (``numpy.matmul`` on stamps, the profile rendered in single precision);
* forced mode: centre fixed, flux only (linear; used for forced photometry on warps);
* the sky is fixed (the image is background-subtracted; a per-source offset may be given) or,
  optionally, a constant local sky is fitted with the flux;
* sources closer than the blend radius are grouped (friends of friends) and each group is
  fitted simultaneously, with a shared pixel set; then every source's fitted model is
  subtracted from a model image and groups whose pixels received light from other groups are
  refitted with that light removed (``neighbour_passes``);
* weights: ``1 / variance``; with ``gain`` the Poisson part of the variance is taken from the
  model instead of the data (:func:`ps1mpi.algorithms.psf.weight_variance`), which avoids the
  flux bias of data-derived weights and gives errors at the Cramer-Rao bound;
* errors from the inverse of the Fisher matrix ``J^T W J`` at the solution (X_PSF_SIG,
  Y_PSF_SIG, PSF_INST_FLUX_SIG); reduced chi-square over the source's fit pixels;
* ``psf_qf``: PSF-weighted fraction of the fit pixels that are unmasked (psphot's PSF_QF);
* ``ext_nsigma``: how many sigma more light the source has in an aperture (radius
  ``ext_radius_fwhm`` FWHM) than the fitted PSF predicts there.  The difference
  ``F_ap - c F_psf`` (``c`` the model's own fraction of the flux in the aperture pixels) is a
  linear function of the pixels, so its variance is computed exactly; a systematic floor of
  ``hypot(ext_sys, ap_sys_err)`` of the aperture flux is added in quadrature (psphot's
  EXT_NSIGMA uses Kron minus PSF magnitude with the same kind of floor).  Point sources give
  ``ext_nsigma ~ N(0, 1)`` (narrower where the floor dominates), extended ones large
  positive values.
* the model's aperture correction is applied to the reported flux (``apply_apcorr``).

The fluxes are in image units (e.g. electrons) within the model's normalisation radius (see
:mod:`ps1mpi.algorithms.psf`).  Catalog column names (IPP CMF) are given by
:meth:`PSFPhotometry.columns`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ps1mpi.algorithms import maskbits

try:  # numba is a project dependency; the numpy path computes the same results without it
    import numba as _numba
except ImportError:  # pragma: no cover - exercised only where numba is absent
    _numba = None

HAVE_NUMBA = _numba is not None
"""Single-source groups with a fixed sky are fitted by a compiled kernel when True."""
from ps1mpi.algorithms.psf import (PSFModel, PSFParams, _validate_images,
                                   _validate_positions, extract_boxes)

__all__ = [
    "PHOT_FIT_FAILED",
    "PHOT_POS_FAILED",
    "PHOT_NOT_CONVERGED",
    "PHOT_EDGE",
    "PHOT_MASKED",
    "PHOT_BLENDED",
    "PHOT_POS_FIXED",
    "PHOT_BIG_GROUP",
    "PHOT_SKY_FIT",
    "PHOT_BAD",
    "PSFPhotometry",
    "fit_psf_photometry",
]

PHOT_FIT_FAILED = 0x0001     # no measurement: no usable pixels or a singular fit
PHOT_POS_FAILED = 0x0002     # centre fit diverged or moved too far: flux at the input position
PHOT_NOT_CONVERGED = 0x0004  # iteration limit reached
PHOT_EDGE = 0x0008           # the fit radius extends beyond the image
PHOT_MASKED = 0x0010         # psf_qf below min_qf
PHOT_BLENDED = 0x0020        # fitted simultaneously with neighbours
PHOT_POS_FIXED = 0x0040      # centre held fixed (forced mode, or too faint to fit a centre)
PHOT_BIG_GROUP = 0x0080      # blend group too large: fitted alone after neighbour subtraction
PHOT_SKY_FIT = 0x0100        # a local sky level was fitted
PHOT_BAD = PHOT_FIT_FAILED | PHOT_POS_FAILED | PHOT_NOT_CONVERGED
"""Flags that make a measurement unsuitable as a reference (e.g. for PSF or zero points)."""



@dataclass
class PSFPhotometry:
    """Result of :func:`fit_psf_photometry`, one element per input source.

    Attributes
    ----------
    x, y : ndarray
        Fitted centre (pixels); the input position where it was held fixed.
    x_sig, y_sig : ndarray
        Centre errors (pixels); 0 where held fixed.
    flux, flux_sig : ndarray
        PSF flux and error (image units; aperture correction applied if requested).
    sky, sky_sig : ndarray
        Local sky of the fit (image units per pixel; fixed value and 0 unless fitted).
    chi2_dof : ndarray
        Reduced chi-square over the source's fit pixels.
    n_pix, n_dof : ndarray of int
        Number of fit pixels and degrees of freedom.
    psf_qf : ndarray
        PSF-weighted unmasked fraction of the fit pixels.
    ext_nsigma : ndarray
        Significance of light in excess of the PSF in the extendedness aperture.
    ap_flux, ap_flux_sig : ndarray
        Flux in that aperture (neighbours and sky removed) and its error (image units).
    psf_major, psf_minor, psf_theta : ndarray
        PSF FWHM (pixels) and angle (degrees) at the source.
    group : ndarray of int
        Blend group id (sources fitted together share it).
    flags : ndarray of uint16
        ``PHOT_*`` bits.
    """

    x: np.ndarray
    y: np.ndarray
    x_sig: np.ndarray
    y_sig: np.ndarray
    flux: np.ndarray
    flux_sig: np.ndarray
    sky: np.ndarray
    sky_sig: np.ndarray
    chi2_dof: np.ndarray
    n_pix: np.ndarray
    n_dof: np.ndarray
    psf_qf: np.ndarray
    ext_nsigma: np.ndarray
    ap_flux: np.ndarray
    ap_flux_sig: np.ndarray
    psf_major: np.ndarray
    psf_minor: np.ndarray
    psf_theta: np.ndarray
    group: np.ndarray
    flags: np.ndarray

    def __len__(self) -> int:
        return int(self.x.size)

    def columns(self) -> dict[str, np.ndarray]:
        """The measurements under IPP CMF column names (X_PSF, Y_PSF, X_PSF_SIG, Y_PSF_SIG,
        PSF_INST_FLUX, PSF_INST_FLUX_SIG, PSF_INST_MAG, PSF_INST_MAG_SIG, SKY, SKY_SIGMA,
        PSF_CHISQ, PSF_NDOF, PSF_NPIX, PSF_QF, EXT_NSIGMA, PSF_MAJOR, PSF_MINOR, PSF_THETA,
        PHOT_FLAGS).  Magnitudes are ``-2.5 log10(flux)`` (NaN for non-positive flux)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            mag = np.where(self.flux > 0, -2.5 * np.log10(self.flux), np.nan)
            dmag = np.where(self.flux > 0, 2.5 / np.log(10.0) * self.flux_sig / self.flux,
                            np.nan)
        return {
            "X_PSF": self.x, "Y_PSF": self.y, "X_PSF_SIG": self.x_sig, "Y_PSF_SIG": self.y_sig,
            "PSF_INST_FLUX": self.flux, "PSF_INST_FLUX_SIG": self.flux_sig,
            "PSF_INST_MAG": mag, "PSF_INST_MAG_SIG": dmag,
            "SKY": self.sky, "SKY_SIGMA": self.sky_sig, "PSF_CHISQ": self.chi2_dof,
            "PSF_NDOF": self.n_dof, "PSF_NPIX": self.n_pix, "PSF_QF": self.psf_qf,
            "EXT_NSIGMA": self.ext_nsigma, "PSF_MAJOR": self.psf_major,
            "PSF_MINOR": self.psf_minor, "PSF_THETA": self.psf_theta, "PHOT_FLAGS": self.flags,
        }


@dataclass
class _Ctx:
    image: np.ndarray
    variance: np.ndarray
    bad: np.ndarray
    psf: PSFModel
    params: PSFParams          # at the input positions, (N,)
    x_in: np.ndarray
    y_in: np.ndarray
    sky_fixed: np.ndarray
    gain: float | None
    r_fit: float
    r_ext: float
    hb: int
    forced: bool
    fit_sky: bool
    max_iter: int
    max_shift: float
    min_pos_snr: float
    chunk_pixels: int
    ext_sys: float
    tol: float
    use_numba: bool = False


@dataclass
class _Out:
    """Per-source fit results (internal, before the aperture correction)."""

    x: np.ndarray
    y: np.ndarray
    xs: np.ndarray
    ys: np.ndarray
    f: np.ndarray
    fs: np.ndarray
    sky: np.ndarray
    skys: np.ndarray
    chi2: np.ndarray
    npix: np.ndarray
    ndof: np.ndarray
    qf: np.ndarray
    ext: np.ndarray
    apf: np.ndarray
    apfs: np.ndarray
    flags: np.ndarray

    @classmethod
    def empty(cls, n: int, x: np.ndarray, y: np.ndarray, sky: np.ndarray) -> "_Out":
        nan = np.full(n, np.nan)
        return cls(x.copy(), y.copy(), nan.copy(), nan.copy(), nan.copy(), nan.copy(),
                   sky.copy(), np.zeros(n), nan.copy(), np.zeros(n, np.int64),
                   np.zeros(n, np.int64), nan.copy(), nan.copy(), nan.copy(), nan.copy(),
                   np.zeros(n, np.uint16))


def _groups(x: np.ndarray, y: np.ndarray, radius: float, max_group: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Friends-of-friends groups; returns labels and a 'too big' flag per source (members of
    oversize groups become their own single-source group)."""
    n = x.size
    if radius <= 0 or n < 2:
        return np.arange(n), np.zeros(n, dtype=bool)
    pairs = cKDTree(np.column_stack([x, y])).query_pairs(radius, output_type="ndarray")
    if pairs.size == 0:
        return np.arange(n), np.zeros(n, dtype=bool)
    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, lab = connected_components(g, directed=False)
    counts = np.bincount(lab)
    big = counts[lab] > max_group
    lab = np.where(big, n + np.arange(n), lab)
    _, lab = np.unique(lab, return_inverse=True)
    return lab, big


def _render_at(psf: PSFModel, pp: PSFParams, xg: np.ndarray, yg: np.ndarray,
               x0: np.ndarray, y0: np.ndarray, derivatives: bool):
    """Member models on group boxes: xg (G,1,1,W), yg (G,1,H,1), x0/y0 (G,n).

    Evaluated in single precision (offsets formed in double precision first): the profile's
    fractional power dominates the cost and float32 keeps 1e-7 relative accuracy."""
    dx = (xg - x0[:, :, None, None]).astype(np.float32)
    dy = (yg - y0[:, :, None, None]).astype(np.float32)
    p32 = PSFParams(*(np.asarray(a, dtype=np.float32) for a in pp))
    return psf.render(dx, dy, p32, derivatives=derivatives)


def _inv(a: np.ndarray) -> np.ndarray:
    """Batched inverse with a pseudo-inverse fallback for singular matrices."""
    try:
        return np.linalg.inv(a)
    except np.linalg.LinAlgError:
        return np.stack([np.linalg.pinv(x) for x in a])


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched solve with a least-squares fallback."""
    try:
        return np.linalg.solve(a, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return np.stack([np.linalg.lstsq(x, y, rcond=None)[0] for x, y in zip(a, b)])


def _linear_solve(P: np.ndarray, w: np.ndarray, d: np.ndarray, fit_sky: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weighted linear least squares for member fluxes (and a sky) at fixed centres.
    P: (G, n, H, W); w, d: (G, npx).  Returns fluxes (G, n), sky (G,), ok (G,), errors
    (G, npar)."""
    g_n, n = P.shape[:2]
    jac = P.reshape(g_n, n, -1)
    if fit_sky:
        jac = np.concatenate([jac, np.ones((g_n, 1, jac.shape[2]))], axis=1)
    jac = jac.astype(np.float32, copy=False)
    jw = jac * w.astype(np.float32)[:, None, :]
    a = (jw @ jac.transpose(0, 2, 1)).astype(np.float64)
    b = np.einsum("gpk,gk->gp", jw, d.astype(np.float32), dtype=np.float64)
    ok = np.all(np.einsum("gii->gi", a) > 0, axis=1)
    a = np.where(ok[:, None, None], a, np.eye(a.shape[1]))
    sol = _solve(a, b)
    ok &= np.all(np.isfinite(sol), axis=1)
    sig = np.sqrt(np.abs(np.einsum("gii->gi", _inv(a))))
    sky = sol[:, n] if fit_sky else np.zeros(g_n)
    return np.where(ok[:, None], sol[:, :n], 0.0), np.where(ok, sky, 0.0), ok, sig


def _normal(P: np.ndarray, dpx: np.ndarray | None, dpy: np.ndarray | None, f: np.ndarray,
            fixed: np.ndarray, w: np.ndarray, r: np.ndarray | None, fit_sky: bool
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """Normal matrix ``J W J^T`` (and ``J W r``) for parameters [fluxes, x, y, (sky)];
    the centres are left out when ``dpx`` is None.  Frozen centres get a unit diagonal and
    no coupling.  The products run in single precision (the Jacobian is a float32 render)
    and are returned in double.  Returns A (G, p, p) and b (G, p) or None."""
    g_n, n = P.shape[:2]
    npx = w.shape[1]
    npar = (n if dpx is None else 3 * n) + (1 if fit_sky else 0)
    jac = np.empty((g_n, npar, npx), dtype=np.float32)
    jac[:, :n] = P.reshape(g_n, n, npx)
    fz = np.zeros((g_n, npar), dtype=bool)
    if dpx is not None:
        live = (~fixed * f).astype(np.float32)[:, :, None]   # 0 for frozen centres
        jac[:, n:2 * n] = dpx.reshape(g_n, n, npx) * live
        jac[:, 2 * n:3 * n] = dpy.reshape(g_n, n, npx) * live
        fz[:, n:2 * n] = fixed
        fz[:, 2 * n:3 * n] = fixed
    if fit_sky:
        jac[:, -1] = 1.0
    jw = jac * w.astype(np.float32)[:, None, :]
    a = (jw @ jac.transpose(0, 2, 1)).astype(np.float64)
    a += fz[:, :, None] * np.eye(npar)
    b = None if r is None else np.einsum("gpk,gk->gp", jw, r.astype(np.float32),
                                          dtype=np.float64)
    return a, b


def _fit_chunk_single(ctx: _Ctx, mem: np.ndarray, posfix: np.ndarray,
                      contam: np.ndarray | None, out: _Out, group_flag: np.ndarray,
                      start: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """:func:`_fit_chunk` for groups of one source and a fixed sky, by the compiled kernel
    :func:`_fit_single_nb` (same steps, double precision)."""
    g_n = mem.shape[0]
    idx = mem[:, 0]
    psf = ctx.psf
    x_in = ctx.x_in[idx]
    y_in = ctx.y_in[idx]
    hb = ctx.hb
    ox = np.rint(x_in).astype(np.int64) - hb
    oy = np.rint(y_in).astype(np.int64) - hb
    if contam is not None:
        h_box, w_box = contam.shape[1:]
        cont = np.ascontiguousarray(contam, dtype=np.float64)
    else:
        h_box = w_box = 2 * hb + 1
        cont = np.zeros((1, 1, 1))
    fixed0 = np.asarray(posfix[:, 0], dtype=np.bool_)
    if start is None or ctx.forced:
        xs0, ys0 = x_in, y_in
    else:
        xs0 = np.where(fixed0, x_in, start[0][:, 0])
        ys0 = np.where(fixed0, y_in, start[1][:, 0])
    pp = ctx.params
    tab = np.zeros((0, 0)) if psf.residual is None else np.ascontiguousarray(psf.residual,
                                                                             np.float64)
    tscale = 1.0 if psf.residual is None else 1.0 / (1.0 + float(psf.residual.sum()))
    res_f = np.empty((g_n, 11))
    res_i = np.empty((g_n, 2), dtype=np.int64)
    res_b = np.empty((g_n, 5), dtype=np.bool_)
    inv_gain = 0.0 if ctx.gain is None else 1.0 / ctx.gain
    _fit_single_nb(ctx.image, ctx.variance, ctx.bad, ox, oy, int(h_box), int(w_box),
                   np.ascontiguousarray(x_in, np.float64), np.ascontiguousarray(y_in, np.float64),
                   np.ascontiguousarray(xs0, np.float64), np.ascontiguousarray(ys0, np.float64),
                   fixed0, np.asarray(pp.qxx[idx], np.float64), np.asarray(pp.qyy[idx], np.float64),
                   np.asarray(pp.qxy[idx], np.float64), np.asarray(pp.k[idx], np.float64),
                   np.asarray(pp.norm[idx], np.float64), float(psf.alpha), tab, tscale, cont,
                   contam is not None, np.asarray(ctx.sky_fixed[idx], np.float64), inv_gain,
                   float(ctx.r_fit), float(ctx.r_ext), int(ctx.max_iter), float(ctx.tol),
                   float(ctx.max_shift), float(ctx.min_pos_snr), float(ctx.ext_sys),
                   bool(ctx.forced), res_f, res_i, res_b)
    out.x[idx], out.y[idx] = res_f[:, 0], res_f[:, 1]
    out.xs[idx], out.ys[idx] = res_f[:, 2], res_f[:, 3]
    out.f[idx], out.fs[idx] = res_f[:, 4], res_f[:, 5]
    out.sky[idx] = ctx.sky_fixed[idx]
    out.skys[idx] = 0.0
    out.chi2[idx] = res_f[:, 6]
    out.npix[idx], out.ndof[idx] = res_i[:, 0], res_i[:, 1]
    out.qf[idx], out.ext[idx] = res_f[:, 7], res_f[:, 8]
    out.apf[idx], out.apfs[idx] = res_f[:, 9], res_f[:, 10]
    fl = np.zeros(g_n, dtype=np.uint16)
    fl |= np.where(~res_b[:, 0], PHOT_FIT_FAILED, 0).astype(np.uint16)
    fl |= np.where(res_b[:, 1], PHOT_NOT_CONVERGED, 0).astype(np.uint16)
    fl |= np.where(res_b[:, 2], PHOT_EDGE, 0).astype(np.uint16)
    fl |= np.where(res_b[:, 3], PHOT_POS_FIXED, 0).astype(np.uint16)
    fl |= group_flag[idx].astype(np.uint16)
    out.flags[idx] = fl
    return res_b[:, 4:5].copy()


def _fit_chunk(ctx: _Ctx, mem: np.ndarray, posfix: np.ndarray, contam: np.ndarray | None,
               out: _Out, group_flag: np.ndarray,
               start: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Fit a chunk of groups of equal size n (mem: (G, n) source indices).  ``posfix``
    (G, n) holds centres at their input positions, ``contam`` (G, H, W) is light of other
    sources to remove, ``start`` optional starting centres.  Writes results into ``out``;
    returns a (G, n) bool array of members whose centre fit failed."""
    g_n, n = mem.shape
    if n == 1 and not ctx.fit_sky and ctx.use_numba:
        return _fit_chunk_single(ctx, mem, posfix, contam, out, group_flag, start)
    psf = ctx.psf
    x_in = ctx.x_in[mem]
    y_in = ctx.y_in[mem]
    ixr = np.rint(x_in).astype(np.int64)
    iyr = np.rint(y_in).astype(np.int64)
    hb = ctx.hb
    ox = ixr.min(axis=1) - hb
    oy = iyr.min(axis=1) - hb
    if contam is not None:  # boxes of the chunk the contamination was computed for
        h_box, w_box = contam.shape[1:]
    else:
        w_box = int((ixr.max(axis=1) - ixr.min(axis=1)).max()) + 2 * hb + 1
        h_box = int((iyr.max(axis=1) - iyr.min(axis=1)).max()) + 2 * hb + 1
    npx = h_box * w_box
    d_orig, inside = extract_boxes(ctx.image, ox, oy, h_box, w_box, fill=0)
    d_orig = d_orig.astype(np.float64)
    var, _ = extract_boxes(ctx.variance, ox, oy, h_box, w_box, fill=1)
    var = var.astype(np.float64)
    bad, _ = extract_boxes(ctx.bad, ox, oy, h_box, w_box, fill=True)
    good = inside & ~bad
    data = d_orig if contam is None else d_orig - contam
    xg = (ox[:, None] + np.arange(w_box)[None, :]).astype(np.float64)[:, None, None, :]
    yg = (oy[:, None] + np.arange(h_box)[None, :]).astype(np.float64)[:, None, :, None]
    region = ((xg - x_in[:, :, None, None]) ** 2 + (yg - y_in[:, :, None, None]) ** 2
              <= ctx.r_fit ** 2)                             # (G, n, H, W)
    fitmask = np.any(region, axis=1) & good                  # (G, H, W)
    npix_g = fitmask.reshape(g_n, -1).sum(axis=1)
    # background part of the weighting variance (see weight_variance), floored at a quarter
    # of its median along the top and bottom rows of the box (background-dominated); the
    # model's Poisson term is added to it
    base = var if ctx.gain is None else var - d_orig / ctx.gain
    rim = np.concatenate([np.where(good[:, 0], base[:, 0], np.inf),
                          np.where(good[:, -1], base[:, -1], np.inf)], axis=1)
    rim.sort(axis=1)
    n_rim = np.isfinite(rim).sum(axis=1)
    floor = rim[np.arange(g_n), np.minimum(n_rim // 2, rim.shape[1] - 1)]
    floor = 0.25 * np.where(np.isfinite(floor) & (floor > 0), floor,
                            np.nanmedian(np.where(good, var, np.nan)) if np.any(good) else 1.0)
    base = np.maximum(base, floor[:, None, None]).reshape(g_n, npx)
    fm = fitmask.reshape(g_n, npx)
    inv_gain = 0.0 if ctx.gain is None else 1.0 / ctx.gain
    cflat = None if contam is None else contam.reshape(g_n, npx)

    def weights(idx: np.ndarray, model: np.ndarray | None) -> np.ndarray:
        """Fit weights of groups ``idx`` for a model (G', npx) of their own sources."""
        if model is None or inv_gain == 0.0:
            return np.where(fm[idx], 1.0 / base[idx], 0.0)
        tot = model if cflat is None else model + cflat[idx]
        return np.where(fm[idx], 1.0 / (base[idx] + np.maximum(tot, 0.0) * inv_gain), 0.0)

    pp = ctx.params.take(mem).expand(2)                      # (G, n, 1, 1)
    sky0 = ctx.sky_fixed[mem].mean(axis=1)                   # (G,)
    dflat = data.reshape(g_n, npx) - sky0[:, None]           # data minus the fixed sky
    fit_sky = ctx.fit_sky
    npar = (n if ctx.forced else 3 * n) + (1 if fit_sky else 0)
    fixed = np.ones((g_n, n), dtype=bool) if ctx.forced else posfix.copy()
    if start is None or ctx.forced:
        xc = x_in.copy()
        yc = y_in.copy()
    else:
        xc = np.where(fixed, x_in, start[0])
        yc = np.where(fixed, y_in, start[1])
    ok = npix_g > npar
    all_g = np.arange(g_n)

    def model_of(idx: np.ndarray, fl: np.ndarray, pv: np.ndarray, sk: np.ndarray) -> np.ndarray:
        """Own-source model (without the fixed sky) of groups idx, (G', npx)."""
        mdl = np.einsum("gn,gnk->gk", fl, pv.reshape(idx.size, n, npx))
        return mdl + sk[:, None] if fit_sky else mdl

    # 1. flux (and sky) at the starting centres: linear; with model-dependent weights one
    #    more solve (free mode; the centre fit refreshes them again) or iterated to
    #    convergence (forced mode)
    if ctx.forced:
        P = _render_at(psf, pp, xg, yg, xc, yc, False)
        dpx = dpy = None
    else:
        P, dpx, dpy = _render_at(psf, pp, xg, yg, xc, yc, True)
    w = weights(all_g, None)
    f, sky, lin_ok, sig_lin = _linear_solve(P, w, dflat, fit_sky)
    ok &= lin_ok
    not_conv = np.zeros(g_n, dtype=bool)
    if inv_gain > 0.0:
        act = np.flatnonzero(ok)
        for _ in range(ctx.max_iter if ctx.forced else 1):
            if act.size == 0:
                break
            w[act] = weights(act, model_of(act, f[act], P[act], sky[act]))
            f_n, s_n, ok_n, sig_n = _linear_solve(P[act], w[act], dflat[act], fit_sky)
            conv = np.all(np.abs(f_n - f[act]) <= ctx.tol * sig_n[:, :n], axis=1)
            f[act], sky[act], sig_lin[act] = f_n, s_n, sig_n
            ok[act] &= ok_n
            act = act[~conv & ok_n]
        if ctx.forced:
            not_conv[act] = True

    # 2. centres: Levenberg-Marquardt on flux, centres (and sky); the weights are refreshed
    #    from the model once, after a group's first accepted step (the centre has then moved
    #    most of the way from the start), and frozen otherwise
    failed_pos = np.zeros((g_n, n), dtype=bool)
    if not ctx.forced:
        snr = f / np.maximum(sig_lin[:, :n], 1e-300)
        fixed |= ~(snr >= ctx.min_pos_snr)
        r = dflat - model_of(all_g, f, P, sky)
        chi2 = np.einsum("gk,gk->g", w, r * r)
        amat, bvec = _normal(P, dpx, dpy, f, fixed, w, r, fit_sky)
        lam = np.zeros(g_n)
        active = ok & ~np.all(fixed, axis=1)
        refreshed = np.full(g_n, inv_gain == 0.0)
        eye = np.eye(npar)
        for _ in range(ctx.max_iter):
            act = np.flatnonzero(active)
            if act.size == 0:
                break
            a = amat[act]
            a_inv = _inv(a)
            sig = np.sqrt(np.abs(np.einsum("gii->gi", a_inv)))
            # converged when the undamped (Gauss-Newton) step is below tol of every error
            gn = np.einsum("gij,gj->gi", a_inv, bvec[act])
            small = np.all(np.abs(gn) <= ctx.tol * np.maximum(sig, 1e-300), axis=1)
            active[act[small]] = False
            act, a = act[~small], a[~small]
            if act.size == 0:
                continue
            dg = np.einsum("gii->gi", a)
            step = _solve(a + lam[act, None, None] * (dg[:, :, None] * eye), bvec[act])
            sxs = step[:, n:2 * n]
            sys_ = step[:, 2 * n:3 * n]
            scale = np.minimum(1.0, 1.0 / np.maximum(np.hypot(sxs, sys_), 1e-12))
            f_t = f[act] + step[:, :n]
            x_t = xc[act] + sxs * scale
            y_t = yc[act] + sys_ * scale
            sky_t = sky[act] + (step[:, -1] if fit_sky else 0.0)
            wander = (np.hypot(x_t - x_in[act], y_t - y_in[act]) > ctx.max_shift) & ~fixed[act]
            P_t, dx_t, dy_t = _render_at(psf, pp.take(act), xg[act], yg[act], x_t, y_t, True)
            r_t = dflat[act] - model_of(act, f_t, P_t, sky_t)
            chi2_t = np.einsum("gk,gk->g", w[act], r_t * r_t)
            # accept descent (with a margin for single-precision rounding of the model)
            better = (chi2_t <= chi2[act] * (1.0 + 1e-7) + 1e-9) & np.all(np.isfinite(step),
                                                                           axis=1)
            acc = act[better]
            f[acc], xc[acc], yc[acc] = f_t[better], x_t[better], y_t[better]
            if fit_sky:
                sky[acc] = sky_t[better]
            P[acc], dpx[acc], dpy[acc] = P_t[better], dx_t[better], dy_t[better]
            r_a = r_t[better]
            ref = ~refreshed[acc]
            if np.any(ref):
                ra = acc[ref]
                w[ra] = weights(ra, model_of(ra, f[ra], P[ra], sky[ra]))
                refreshed[ra] = True
            chi2[acc] = np.einsum("gk,gk->g", w[acc], r_a * r_a)
            amat[acc], bvec[acc] = _normal(P[acc], dpx[acc], dpy[acc], f[acc], fixed[acc],
                                           w[acc], r_a, fit_sky)
            lam[acc] *= 0.1
            rej = act[~better]
            lam[rej] = np.maximum(lam[rej] * 10.0, 1e-3)
            active[rej[lam[rej] > 1e6]] = False  # no descent possible: at the minimum
            # a centre that wanders off: stop, the caller refits it at its input position
            wmask = np.any(wander & better[:, None], axis=1)
            failed_pos[act[wmask]] |= wander[wmask]
            active[act[wmask]] = False
        not_conv = active & ok

    # 3. final quantities at the solution
    own_m = model_of(all_g, f, P, sky)
    w = weights(all_g, own_m)
    vw = np.where(w > 0, 1.0 / np.where(w > 0, w, 1.0), base)  # weighting variance
    amat, _ = _normal(P, dpx, dpy, f, fixed, w, None, fit_sky)
    diag_ok = np.all(np.einsum("gii->gi", amat) > 0, axis=1)
    ok &= diag_ok
    cov = _inv(np.where(diag_ok[:, None, None], amat, np.eye(npar)))
    dvar = np.abs(np.einsum("gii->gi", cov))
    ok &= np.all(np.isfinite(dvar), axis=1) & np.all(np.isfinite(f), axis=1)

    resid = dflat - own_m
    chi_pix = (w * resid * resid).reshape(g_n, 1, npx)
    reg = region.reshape(g_n, n, npx)
    memfit = reg & fm[:, None]
    chi2_m = np.where(memfit, chi_pix, 0.0).sum(axis=2)
    npix_m = memfit.sum(axis=2)
    npar_m = np.where(fixed, 1, 3) + (1.0 / n if fit_sky else 0.0)
    ndof_m = np.maximum(npix_m - npar_m, 1)
    Pf = P.reshape(g_n, n, npx)
    # psf_qf over the member's region (bad and off-image pixels count as lost)
    p_reg = np.where(reg, Pf, 0.0)
    qf = (p_reg * good.reshape(g_n, 1, npx)).sum(axis=2) / np.maximum(p_reg.sum(axis=2),
                                                                      1e-300)
    edge = np.any(reg & ~inside.reshape(g_n, 1, npx), axis=2)

    # extendedness: aperture flux of each member with the others (and sky) removed, against
    # the PSF's prediction; the variance of the difference is exact for the linear estimator
    aper = ((xg - xc[:, :, None, None]) ** 2 + (yg - yc[:, :, None, None]) ** 2
            <= ctx.r_ext ** 2).reshape(g_n, n, npx) & good.reshape(g_n, 1, npx)
    own = f[:, :, None] * Pf
    dm = resid[:, None, :] + own                              # (G, n, npx)
    a_f = np.where(aper, dm, 0.0).sum(axis=2)
    cfrac = np.where(aper, Pf, 0.0).sum(axis=2)
    pw = Pf * w[:, None, :]
    spp = np.maximum((pw * Pf).sum(axis=2), 1e-300)
    coef = aper - (cfrac / spp)[:, :, None] * pw
    var_diff = (coef * coef * vw[:, None, :]).sum(axis=2)
    var_ap = np.where(aper, vw[:, None, :], 0.0).sum(axis=2)
    den = np.sqrt(var_diff + (ctx.ext_sys * cfrac * np.maximum(f, 0.0)) ** 2)
    ext = np.where(den > 0, (a_f - cfrac * f) / np.where(den > 0, den, 1.0), np.nan)

    # write back
    idx = mem.ravel()
    okm = np.repeat(ok, n)
    out.x[idx] = xc.ravel()
    out.y[idx] = yc.ravel()
    if not ctx.forced:
        out.xs[idx] = np.where(fixed, 0.0, np.sqrt(dvar[:, n:2 * n])).ravel()
        out.ys[idx] = np.where(fixed, 0.0, np.sqrt(dvar[:, 2 * n:3 * n])).ravel()
    else:
        out.xs[idx] = 0.0
        out.ys[idx] = 0.0
    out.f[idx] = np.where(okm, f.ravel(), np.nan)
    out.fs[idx] = np.where(okm, np.sqrt(dvar[:, :n]).ravel(), np.nan)
    out.sky[idx] = np.repeat(sky + sky0, n)
    out.skys[idx] = np.repeat(np.sqrt(dvar[:, -1]) if fit_sky else np.zeros(g_n), n)
    out.chi2[idx] = np.where(okm, (chi2_m / ndof_m).ravel(), np.nan)
    out.npix[idx] = npix_m.ravel()
    out.ndof[idx] = np.round(ndof_m).astype(np.int64).ravel()
    out.qf[idx] = qf.ravel()
    out.ext[idx] = np.where(okm, ext.ravel(), np.nan)
    out.apf[idx] = np.where(okm, a_f.ravel(), np.nan)
    out.apfs[idx] = np.sqrt(var_ap).ravel()
    fl = np.zeros((g_n, n), dtype=np.uint16)
    fl |= np.where(~ok[:, None], PHOT_FIT_FAILED, 0).astype(np.uint16)
    fl |= np.where(not_conv[:, None], PHOT_NOT_CONVERGED, 0).astype(np.uint16)
    fl |= np.where(edge, PHOT_EDGE, 0).astype(np.uint16)
    fl |= np.where(fixed, PHOT_POS_FIXED, 0).astype(np.uint16)
    if n > 1:
        fl |= np.uint16(PHOT_BLENDED)
    if fit_sky:
        fl |= np.uint16(PHOT_SKY_FIT)
    fl |= group_flag[mem].astype(np.uint16)
    out.flags[idx] = fl.ravel()
    # centre failures: wandered off (see the iteration) or non-finite
    shift = np.hypot(xc - x_in, yc - y_in)
    failed = ~fixed & ok[:, None] & (failed_pos | ~np.isfinite(shift)
                                     | (shift > ctx.max_shift))
    return failed


def _run_groups(ctx: _Ctx, labels: np.ndarray, posfix: np.ndarray,
                model_img: np.ndarray | None, own_stamps: "_Stamps | None", out: _Out,
                group_flag: np.ndarray, tol: float) -> int:
    """One pass over all groups, bucketed by size and chunked.  Without a model image every
    group is fitted from its input positions; with one, only the groups whose fit pixels
    receive light from other sources (``sqrt(sum c^2 / var) > tol``) are refitted, with that
    light removed, starting from the previous solution.  Returns the number of groups
    fitted."""
    order = np.argsort(labels, kind="stable")
    lab_sorted = labels[order]
    groups = np.unique(labels)
    starts = np.searchsorted(lab_sorted, groups, side="left")
    sizes = np.searchsorted(lab_sorted, groups, side="right") - starts
    n_fit = 0
    for n in np.unique(sizes):
        gsel = np.flatnonzero(sizes == n)
        mem = np.stack([order[starts[gsel] + i] for i in range(n)], axis=1)
        # chunk so that arrays of (G, n, H, W) x parameters stay modest
        ext = np.ptp(np.rint(ctx.x_in[mem]), axis=1) + np.ptp(np.rint(ctx.y_in[mem]), axis=1)
        box = (2 * ctx.hb + 1 + ext.max()) ** 2
        per = max(1, int(ctx.chunk_pixels // (box * n * max(3 * n, 4))))
        for s in range(0, mem.shape[0], per):
            mc = mem[s:s + per]
            contam = None
            start = None
            if model_img is not None:
                contam, energy = _contamination(ctx, mc, model_img, own_stamps, out)
                need = np.sqrt(energy) > tol
                if not np.any(need):
                    continue
                mc, contam = mc[need], contam[need]
                # previous solution, except where the centre failed: input position again
                prev = np.isfinite(out.x[mc]) & np.isfinite(out.y[mc]) \
                    & ((out.flags[mc] & PHOT_POS_FAILED) == 0)
                start = (np.where(prev, out.x[mc], ctx.x_in[mc]),
                         np.where(prev, out.y[mc], ctx.y_in[mc]))
            pf0 = posfix[mc]
            n_fit += mc.shape[0]
            failed = _fit_chunk(ctx, mc, pf0, contam, out, group_flag, start)
            if np.any(failed) and not ctx.forced:
                rows = np.flatnonzero(np.any(failed, axis=1))
                pf = pf0[rows] | failed[rows]
                contam_r = contam[rows] if contam is not None else None
                st_r = None if start is None else (start[0][rows], start[1][rows])
                _fit_chunk(ctx, mc[rows], pf, contam_r, out, group_flag, st_r)
                out.flags[mc[rows][failed[rows]]] |= PHOT_POS_FAILED
    return n_fit


@dataclass
class _Stamps:
    """Per-source model stamp extents used to build the model image."""

    half: np.ndarray   # half-size per source (pixels)
    cx: np.ndarray     # integer centre per source
    cy: np.ndarray


def _model_image(ctx: _Ctx, out: _Out) -> tuple[np.ndarray, _Stamps]:
    """Image of all fitted source models (float32), each on a square stamp reaching where the
    model falls below 0.2% of the background noise per pixel (at least the fit box, at most
    64 px; fainter and farther wings are left to the background model): summed over a
    neighbour's fit pixels, even from several bright neighbours, what is left out moves its
    flux by well under 0.1 sigma."""
    ny, nx = ctx.image.shape
    model = np.zeros((ny, nx), dtype=np.float32)
    f = np.where(np.isfinite(out.f), out.f, 0.0)
    # background noise level near each source
    ix = np.clip(np.rint(out.x).astype(np.int64), 0, nx - 1)
    iy = np.clip(np.rint(out.y).astype(np.int64), 0, ny - 1)
    sig_bg = np.sqrt(np.maximum(np.asarray(ctx.variance[iy, ix], dtype=np.float64), 1e-30))
    p = ctx.params
    mxx, myy = p.qyy / (p.qxx * p.qyy - p.qxy ** 2), p.qxx / (p.qxx * p.qyy - p.qxy ** 2)
    smaj = np.sqrt(np.maximum(mxx, myy))
    ratio = np.maximum(np.abs(f) * p.norm / (0.002 * sig_bg), 1.0)
    rad = smaj * np.sqrt(2.0 * ratio ** (1.0 / ctx.psf.alpha))
    half = np.clip(np.ceil(rad), ctx.hb, 64).astype(np.int64)
    half = (np.ceil(half / 4.0) * 4).astype(np.int64)
    cx = np.rint(out.x).astype(np.int64)
    cy = np.rint(out.y).astype(np.int64)
    valid = np.isfinite(out.f) & np.isfinite(out.x) & np.isfinite(out.y)
    if ctx.use_numba:
        psf = ctx.psf
        tab = np.zeros((0, 0)) if psf.residual is None else np.ascontiguousarray(
            psf.residual, np.float64)
        tscale = 1.0 if psf.residual is None else 1.0 / (1.0 + float(psf.residual.sum()))
        _add_stamps_nb(model, cx, cy, half, f, np.asarray(out.x, np.float64),
                       np.asarray(out.y, np.float64), valid, np.asarray(p.qxx, np.float64),
                       np.asarray(p.qyy, np.float64), np.asarray(p.qxy, np.float64),
                       np.asarray(p.k, np.float64), np.asarray(p.norm, np.float64),
                       float(psf.alpha), tab, tscale)
        return model, _Stamps(half, cx, cy)
    colour = _colour_stamps(cx, cy, half, valid)
    mflat = model.ravel()
    for h, col in sorted({(int(a), int(b)) for a, b in zip(half[valid], colour[valid])}):
        # stamps of one colour do not overlap: plain fancy-index accumulation is exact
        sel = np.flatnonzero(valid & (half == h) & (colour == col))
        s = 2 * h + 1
        per = max(1, 2_000_000 // (s * s))
        for a in range(0, sel.size, per):
            ss = sel[a:a + per]
            g = np.arange(-h, h + 1)
            xi = cx[ss, None] + g[None, :]
            yi = cy[ss, None] + g[None, :]
            st = f[ss, None, None, None] * _render_at(
                ctx.psf, p.take(ss).expand(3), xi[:, None, None, :].astype(np.float64),
                yi[:, None, :, None].astype(np.float64), out.x[ss, None], out.y[ss, None],
                False)
            st = st[:, 0]
            okx = (xi >= 0) & (xi < nx)
            oky = (yi >= 0) & (yi < ny)
            okp = oky[:, :, None] & okx[:, None, :]
            flat = yi[:, :, None] * nx + xi[:, None, :]
            mflat[flat[okp]] += st[okp].astype(np.float32)
    return model, _Stamps(half, cx, cy)


def _colour_stamps(cx: np.ndarray, cy: np.ndarray, half: np.ndarray, valid: np.ndarray
                   ) -> np.ndarray:
    """Greedy colouring of square stamps (centre ``(cx, cy)``, half-size ``half``) such that
    stamps of one colour never overlap."""
    n = cx.size
    colour = np.zeros(n, dtype=np.int64)
    idx = np.flatnonzero(valid)
    if idx.size < 2:
        return colour
    tree = cKDTree(np.column_stack([cx[idx], cy[idx]]).astype(np.float64))
    pairs = tree.query_pairs(2.0 * float(half[idx].max()), p=np.inf, output_type="ndarray")
    if pairs.size == 0:
        return colour
    a, b = idx[pairs[:, 0]], idx[pairs[:, 1]]
    reach = half[a] + half[b]
    hit = (np.abs(cx[a] - cx[b]) <= reach) & (np.abs(cy[a] - cy[b]) <= reach)
    a, b = a[hit], b[hit]
    nb: list[list[int]] = [[] for _ in range(n)]
    for i, j in zip(a.tolist(), b.tolist()):
        nb[i].append(j)
        nb[j].append(i)
    colour[:] = -1
    for i in idx[np.argsort(-half[idx], kind="stable")].tolist():
        used = {colour[j] for j in nb[i]}
        c = 0
        while c in used:
            c += 1
        colour[i] = c
    colour[colour < 0] = 0
    return colour


def _contamination(ctx: _Ctx, mem: np.ndarray, model_img: np.ndarray, st: _Stamps,
                   out: _Out) -> tuple[np.ndarray, np.ndarray]:
    """Light of all other sources on the boxes of groups ``mem``: the model image minus the
    group members' own stamps (recomputed exactly as they were added); and its energy
    ``sum c^2 / var`` over the group's fit pixels (the square of the largest flux shift, in
    sigma, it can cause)."""
    g_n = mem.shape[0]
    hb = ctx.hb
    ixr = np.rint(ctx.x_in[mem]).astype(np.int64)
    iyr = np.rint(ctx.y_in[mem]).astype(np.int64)
    ox = ixr.min(axis=1) - hb
    oy = iyr.min(axis=1) - hb
    w_box = int((ixr.max(axis=1) - ixr.min(axis=1)).max()) + 2 * hb + 1
    h_box = int((iyr.max(axis=1) - iyr.min(axis=1)).max()) + 2 * hb + 1
    mi, _ = extract_boxes(model_img, ox, oy, h_box, w_box, fill=0)
    xg = ox[:, None] + np.arange(w_box)[None, :]
    yg = oy[:, None] + np.arange(h_box)[None, :]
    f = np.where(np.isfinite(out.f[mem]), out.f[mem], 0.0)
    own = f[:, :, None, None] * _render_at(ctx.psf, ctx.params.take(mem).expand(2),
                                           xg[:, None, None, :], yg[:, None, :, None],
                                           out.x[mem], out.y[mem], False)
    h = st.half[mem][:, :, None, None]
    inside = ((np.abs(xg[:, None, None, :] - st.cx[mem][:, :, None, None]) <= h)
              & (np.abs(yg[:, None, :, None] - st.cy[mem][:, :, None, None]) <= h))
    valid = np.isfinite(out.f[mem])[:, :, None, None]
    own = np.where(inside & valid, own, 0.0).astype(np.float32)
    c = mi.astype(np.float64) - own.sum(axis=1, dtype=np.float64)
    var, _ = extract_boxes(ctx.variance, ox, oy, h_box, w_box, fill=1)
    bad, ins = extract_boxes(ctx.bad, ox, oy, h_box, w_box, fill=True)
    r2 = ((xg[:, None, None, :] - ctx.x_in[mem][:, :, None, None]) ** 2
          + (yg[:, None, :, None] - ctx.y_in[mem][:, :, None, None]) ** 2)
    fm = np.any(r2 <= ctx.r_fit ** 2, axis=1) & ~bad & ins
    energy = np.sum(np.where(fm, c * c / np.maximum(var, 1e-30), 0.0).reshape(g_n, -1), axis=1)
    return c, energy


def fit_psf_photometry(image: np.ndarray, variance: np.ndarray, mask: np.ndarray,
                       psf: PSFModel, x: np.ndarray, y: np.ndarray, *, forced: bool = False,
                       fit_sky: bool = False, sky: np.ndarray | float = 0.0,
                       gain: float | None = None, fit_radius: float | None = None,
                       fit_radius_fwhm: float = 3.0, blend_radius: float | None = None,
                       blend_fwhm: float = 3.0, max_group: int = 8, neighbour_passes: int = 1,
                       contamination_tol: float = 0.05, max_iter: int = 25, tol: float = 0.01,
                       max_shift_fwhm: float = 1.0, min_position_snr: float = 5.0,
                       min_qf: float = 0.85, apply_apcorr: bool = True,
                       ext_radius_fwhm: float = 2.0, ext_sys: float = 0.02,
                       mask_bits: int = maskbits.BAD, chunk_pixels: int = 4_000_000
                       ) -> PSFPhotometry:
    """Fit the PSF model to sources: flux and centre (or flux only), with blends and errors.

    Parameters
    ----------
    image : ndarray, float, shape (ny, nx)
        Background-subtracted image (image units, e.g. electrons).
    variance : ndarray, shape (ny, nx)
        Variance (image units squared); non-positive or non-finite values mark bad pixels.
    mask : ndarray of uint16, shape (ny, nx)
        Mask bits; pixels with any of ``mask_bits`` are ignored.
    psf : PSFModel
        The image's PSF model.
    x, y : ndarray, shape (N,)
        Initial (free mode) or fixed (forced mode) positions (pixels).
    forced : bool
        Hold every centre fixed and fit the flux only.
    fit_sky : bool
        Fit a constant local sky with the flux (one per blend group).
    sky : float or ndarray, shape (N,)
        Fixed local sky offset added to the model (image units per pixel); 0 for a
        background-subtracted image.  A blend group uses the mean of its members' values.
    gain : float, optional
        Counts per image unit of the Poisson term in ``variance`` (1 for images in
        electrons).  When given, the weights take the source's Poisson noise from the model
        (unbiased fluxes, Cramer-Rao errors); when None the variance is used as given.
    fit_radius : float, optional
        Radius of the fit pixels around each source (pixels); default ``fit_radius_fwhm``
        times the largest FWHM of the model.
    fit_radius_fwhm : float
        See ``fit_radius``.
    blend_radius : float, optional
        Friends-of-friends linking length for simultaneous fits (pixels); default
        ``blend_fwhm`` times the FWHM; 0 disables grouping.
    blend_fwhm : float
        See ``blend_radius``.
    max_group : int
        Largest group fitted simultaneously; members of larger groups are fitted alone after
        neighbour subtraction (flag ``PHOT_BIG_GROUP``).
    neighbour_passes : int
        Number of refits of groups with the light of all other sources subtracted.
    contamination_tol : float
        A group is refitted when the light of other sources on its fit pixels could move its
        flux by more than this many sigma (``sqrt(sum w c^2)``).
    max_iter : int
        Maximum Gauss-Newton iterations.
    tol : float
        Convergence: every parameter step below ``tol`` times its error.
    max_shift_fwhm : float
        Largest allowed move of a centre from its input position (FWHM); beyond it the flux
        is refitted at the input position (flag ``PHOT_POS_FAILED``).
    min_position_snr : float
        Sources whose initial flux S/N is below this keep their input centre
        (``PHOT_POS_FIXED``).
    min_qf : float
        ``psf_qf`` below this sets ``PHOT_MASKED`` (psphot 0.85).
    apply_apcorr : bool
        Multiply fluxes and errors by the model's aperture correction.
    ext_radius_fwhm : float
        Radius of the extendedness aperture (FWHM).
    ext_sys : float
        Fractional systematic floor of the extendedness test, added in quadrature to the
        model's ``ap_sys_err``.
    mask_bits : int
        Mask bits that make a pixel unusable.
    chunk_pixels : int
        Batch size control (pixels x parameters per batch).

    Returns
    -------
    PSFPhotometry

    Raises
    ------
    ValueError
        On inconsistent inputs.
    """
    who = "fit_psf_photometry"
    image, variance, mask = _validate_images(image, variance, mask, who)
    x, y = _validate_positions(x, y, who)
    if not isinstance(psf, PSFModel):
        raise ValueError(f"{who}: psf must be a PSFModel, got {type(psf).__name__}")
    if psf.image_shape != image.shape:
        raise ValueError(f"{who}: psf describes an image of shape {psf.image_shape}, the image "
                         f"is {image.shape}")
    if gain is not None and not gain > 0:
        raise ValueError(f"{who}: gain must be positive, got {gain}")
    n = x.size
    sky_arr = np.broadcast_to(np.asarray(sky, dtype=np.float64), (n,)).copy() \
        if np.ndim(sky) == 0 else np.asarray(sky, dtype=np.float64)
    if sky_arr.shape != (n,):
        raise ValueError(f"{who}: sky must be a scalar or have shape ({n},), got "
                         f"{sky_arr.shape}")
    fwhm = psf.fwhm_max
    r_fit = float(fit_radius) if fit_radius is not None else max(fit_radius_fwhm * fwhm, 3.0)
    if not r_fit > 0:
        raise ValueError(f"{who}: fit_radius must be positive, got {fit_radius}")
    r_ext = ext_radius_fwhm * fwhm
    b_rad = blend_fwhm * fwhm if blend_radius is None else float(blend_radius)
    hb = int(math.ceil(max(r_fit, r_ext))) + 1

    out = _Out.empty(n, x, y, sky_arr)
    if n == 0:
        return _finish(psf, out, np.zeros(0, np.int64), apply_apcorr)
    bad = ((mask & mask_bits) != 0) | ~np.isfinite(variance) | ~(variance > 0) \
        | ~np.isfinite(image)
    params = psf.source_params(x, y)
    sys_frac = math.hypot(ext_sys, psf.ap_sys_err * math.log(10.0) / 2.5)
    ctx = _Ctx(image, variance, bad, psf, params, x, y, sky_arr, gain, r_fit, r_ext, hb,
               forced, fit_sky, max_iter, max_shift_fwhm * fwhm, min_position_snr,
               chunk_pixels, sys_frac, tol, HAVE_NUMBA)
    labels, big = _groups(x, y, b_rad, max_group)
    group_flag = np.where(big, PHOT_BIG_GROUP, 0).astype(np.uint16)
    posfix = np.zeros(n, dtype=bool)
    _run_groups(ctx, labels, posfix, None, None, out, group_flag, contamination_tol)
    passes = neighbour_passes + (2 if np.any(big) else 0)
    for _ in range(max(passes, 0) if n > 1 else 0):
        model_img, stamps = _model_image(ctx, out)
        if _run_groups(ctx, labels, posfix, model_img, stamps, out, group_flag,
                       contamination_tol) == 0:
            break
    out.flags |= np.where(out.qf < min_qf, PHOT_MASKED, 0).astype(np.uint16)
    return _finish(psf, out, labels, apply_apcorr)


def _finish(psf: PSFModel, out: _Out, labels: np.ndarray, apply_apcorr: bool) -> PSFPhotometry:
    n = out.x.size
    if n:
        shp = psf.shape_at(np.where(np.isfinite(out.x), out.x, 0.0),
                           np.where(np.isfinite(out.y), out.y, 0.0))
        maj, mnr, th = shp
    else:
        maj = mnr = th = np.zeros(0)
    ap = psf.ap_corr if apply_apcorr else 1.0
    return PSFPhotometry(
        x=out.x, y=out.y, x_sig=out.xs, y_sig=out.ys, flux=out.f * ap, flux_sig=out.fs * ap,
        sky=out.sky, sky_sig=out.skys, chi2_dof=out.chi2, n_pix=out.npix, n_dof=out.ndof,
        psf_qf=out.qf, ext_nsigma=out.ext, ap_flux=out.apf, ap_flux_sig=out.apfs,
        psf_major=np.asarray(maj, dtype=np.float64), psf_minor=np.asarray(mnr, dtype=np.float64),
        psf_theta=np.asarray(th, dtype=np.float64), group=np.asarray(labels, dtype=np.int64),
        flags=out.flags)


# ---------------------------------------------------------------------------------------------
# Compiled path for single-source groups (numba)
# ---------------------------------------------------------------------------------------------

def _njit(fn):
    return _numba.njit(cache=True, nogil=True)(fn) if _numba is not None else fn


@_njit
def _psf_pixel(dx, dy, qxx, qyy, qxy, k, norm, alpha, tab, tscale, out):  # pragma: no cover
    """Unit-flux PSF (analytic part plus residual table) at offset (dx, dy) and its
    derivatives with respect to the centre: out = (P, dP/dx0, dP/dy0).  The residual table
    is interpolated bilinearly (zero beyond it), as :meth:`PSFModel.render`."""
    z = 0.5 * (qxx * dx * dx + qyy * dy * dy) + qxy * dx * dy
    zp = 0.0
    if z > 0.0:
        if alpha == 2.25:          # QGAUSS: z**1.25 with square roots (faster than pow)
            zp = z * math.sqrt(math.sqrt(z))
        else:                      # single-precision power, as the numpy path renders
            zp = float(np.float32(z) ** np.float32(alpha - 1.0))
    else:
        z = 0.0
    f = 1.0 / (1.0 + k * z + z * zp)
    g = norm * (k + alpha * zp) * f * f
    p = norm * f
    dpx = g * (qxx * dx + qxy * dy)
    dpy = g * (qyy * dy + qxy * dx)
    nt = tab.shape[0]
    if nt > 0:
        rr = nt // 2
        u = dx + rr
        v = dy + rr
        if u >= -1.0 and u < nt and v >= -1.0 and v < nt:
            i0 = int(math.floor(u))
            j0 = int(math.floor(v))
            fx = u - i0
            fy = v - j0
            t00 = tab[j0, i0] if (j0 >= 0 and i0 >= 0) else 0.0
            t01 = tab[j0, i0 + 1] if (j0 >= 0 and i0 + 1 < nt) else 0.0
            t10 = tab[j0 + 1, i0] if (j0 + 1 < nt and i0 >= 0) else 0.0
            t11 = tab[j0 + 1, i0 + 1] if (j0 + 1 < nt and i0 + 1 < nt) else 0.0
            p += tscale * ((1 - fy) * ((1 - fx) * t00 + fx * t01)
                           + fy * ((1 - fx) * t10 + fx * t11))
            dpx -= tscale * ((1 - fy) * (t01 - t00) + fy * (t11 - t10))
            dpy -= tscale * ((1 - fx) * (t10 - t00) + fx * (t11 - t01))
    out[0] = p
    out[1] = dpx
    out[2] = dpy


@_njit
def _render_box(ox, oy, xc, yc, qxx, qyy, qxy, k, norm, alpha, tab, tscale, pr, dpx, dpy,
                tmp, need, use_need):  # pragma: no cover - compiled
    """PSF and its centre derivatives on a box (only where ``need`` with ``use_need``;
    zero elsewhere)."""
    h, w = pr.shape
    for j in range(h):
        dy = oy + j - yc
        for i in range(w):
            if use_need and not need[j, i]:
                pr[j, i] = 0.0
                dpx[j, i] = 0.0
                dpy[j, i] = 0.0
                continue
            _psf_pixel(ox + i - xc, dy, qxx, qyy, qxy, k, norm, alpha, tab, tscale, tmp)
            pr[j, i] = tmp[0]
            dpx[j, i] = tmp[1]
            dpy[j, i] = tmp[2]


@_njit
def _weights_box(fm, base, pr, flux, contam, inv_gain, use_model, wt):  # pragma: no cover
    h, w = wt.shape
    for j in range(h):
        for i in range(w):
            if not fm[j, i]:
                wt[j, i] = 0.0
            elif use_model and inv_gain > 0.0:
                tot = flux * pr[j, i] + contam[j, i]
                wt[j, i] = 1.0 / (base[j, i] + max(tot, 0.0) * inv_gain)
            else:
                wt[j, i] = 1.0 / base[j, i]


@_njit
def _normal3(wt, d, pr, dpx, dpy, flux, fixed, amat, bvec):  # pragma: no cover - compiled
    """Normal equations of (flux, x, y) for one source (``fixed``: flux only, unit diagonal
    for the centre); returns the chi-square of the residual ``d - flux P``."""
    amat[:, :] = 0.0
    bvec[:] = 0.0
    chi2 = 0.0
    h, w = wt.shape
    for j in range(h):
        for i in range(w):
            ww = wt[j, i]
            if ww == 0.0:
                continue
            r = d[j, i] - flux * pr[j, i]
            chi2 += ww * r * r
            j0 = pr[j, i]
            amat[0, 0] += ww * j0 * j0
            bvec[0] += ww * j0 * r
            if not fixed:
                j1 = flux * dpx[j, i]
                j2 = flux * dpy[j, i]
                amat[0, 1] += ww * j0 * j1
                amat[0, 2] += ww * j0 * j2
                amat[1, 1] += ww * j1 * j1
                amat[1, 2] += ww * j1 * j2
                amat[2, 2] += ww * j2 * j2
                bvec[1] += ww * j1 * r
                bvec[2] += ww * j2 * r
    if fixed:
        amat[1, 1] = 1.0
        amat[2, 2] = 1.0
    amat[1, 0] = amat[0, 1]
    amat[2, 0] = amat[0, 2]
    amat[2, 1] = amat[1, 2]
    return chi2


@_njit
def _inv3(a, out):  # pragma: no cover - compiled
    """Inverse of a 3x3 matrix by cofactors; False if singular or not finite."""
    c00 = a[1, 1] * a[2, 2] - a[1, 2] * a[2, 1]
    c01 = a[1, 2] * a[2, 0] - a[1, 0] * a[2, 2]
    c02 = a[1, 0] * a[2, 1] - a[1, 1] * a[2, 0]
    det = a[0, 0] * c00 + a[0, 1] * c01 + a[0, 2] * c02
    if not (math.isfinite(det) and det != 0.0):
        return False
    out[0, 0] = c00 / det
    out[1, 0] = c01 / det
    out[2, 0] = c02 / det
    out[0, 1] = (a[0, 2] * a[2, 1] - a[0, 1] * a[2, 2]) / det
    out[1, 1] = (a[0, 0] * a[2, 2] - a[0, 2] * a[2, 0]) / det
    out[2, 1] = (a[0, 1] * a[2, 0] - a[0, 0] * a[2, 1]) / det
    out[0, 2] = (a[0, 1] * a[1, 2] - a[0, 2] * a[1, 1]) / det
    out[1, 2] = (a[0, 2] * a[1, 0] - a[0, 0] * a[1, 2]) / det
    out[2, 2] = (a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0]) / det
    return True


@_njit
def _fit_single_nb(image, variance, bad, ox, oy, hbox, wbox, x_in, y_in, xs0, ys0, posfix,
                   qxx, qyy, qxy, kk, norm, alpha, tab, tscale, contam, has_contam, sky0,
                   inv_gain, r_fit, r_ext, max_iter, tol, max_shift, min_pos_snr, ext_sys,
                   forced, res_f, res_i, res_b):  # pragma: no cover - compiled
    """PSF fit of single-source groups: the steps of :func:`_fit_chunk` for ``n == 1`` and a
    fixed sky.  Writes per source ``res_f`` (x, y, x_sig, y_sig, flux, flux_sig, chi2/dof,
    psf_qf, ext_nsigma, ap_flux, ap_flux_sig), ``res_i`` (npix, ndof) and ``res_b`` (ok,
    not converged, edge, centre fixed, centre failed)."""
    ny, nx = image.shape
    ng = ox.size
    d = np.empty((hbox, wbox))
    base = np.empty((hbox, wbox))
    good = np.empty((hbox, wbox), dtype=np.bool_)
    inside = np.empty((hbox, wbox), dtype=np.bool_)
    reg = np.empty((hbox, wbox), dtype=np.bool_)
    fm = np.empty((hbox, wbox), dtype=np.bool_)
    cbox = np.zeros((hbox, wbox))
    pr = np.empty((hbox, wbox))
    dpx = np.empty((hbox, wbox))
    dpy = np.empty((hbox, wbox))
    pt = np.empty((hbox, wbox))
    dxt = np.empty((hbox, wbox))
    dyt = np.empty((hbox, wbox))
    wt = np.empty((hbox, wbox))
    rim = np.empty(2 * wbox)
    tmp = np.empty(3)
    amat = np.empty((3, 3))
    bvec = np.empty(3)
    ainv = np.empty((3, 3))
    al = np.empty((3, 3))
    step = np.empty(3)
    r2fit = r_fit * r_fit
    r2ext = r_ext * r_ext
    npar = 1 if forced else 3
    for g in range(ng):
        gx0 = ox[g]
        gy0 = oy[g]
        # pixels, fit region, weights' background part
        for j in range(hbox):
            yy = gy0 + j
            for i in range(wbox):
                xx = gx0 + i
                ins = yy >= 0 and yy < ny and xx >= 0 and xx < nx
                inside[j, i] = ins
                dval = 0.0
                vval = 1.0
                bd = True
                if ins:
                    dval = image[yy, xx]
                    vval = variance[yy, xx]
                    bd = bad[yy, xx]
                good[j, i] = ins and not bd
                c = contam[g, j, i] if has_contam else 0.0
                cbox[j, i] = c
                d[j, i] = dval - c - sky0[g]
                base[j, i] = vval - dval * inv_gain if inv_gain > 0.0 else vval
                ddx = gx0 + i - x_in[g]
                ddy = yy - y_in[g]
                reg[j, i] = ddx * ddx + ddy * ddy <= r2fit
                fm[j, i] = reg[j, i] and good[j, i]
        # floor: a quarter of the median of the top and bottom rows (good pixels)
        n_rim = 0
        for i in range(wbox):
            rim[i] = base[0, i] if good[0, i] else np.inf
            rim[wbox + i] = base[hbox - 1, i] if good[hbox - 1, i] else np.inf
        for i in range(2 * wbox):
            if math.isfinite(rim[i]):
                n_rim += 1
        rim.sort()
        fl = rim[min(n_rim // 2, 2 * wbox - 1)]
        if not (math.isfinite(fl) and fl > 0.0):
            vals = np.empty(hbox * wbox)
            nv = 0
            for j in range(hbox):
                for i in range(wbox):
                    if good[j, i]:
                        yy = gy0 + j
                        xx = gx0 + i
                        vals[nv] = variance[yy, xx]
                        nv += 1
            fl = np.median(vals[:nv]) if nv > 0 else 1.0
        fl *= 0.25
        npix = 0
        for j in range(hbox):
            for i in range(wbox):
                if base[j, i] < fl:
                    base[j, i] = fl
                if fm[j, i]:
                    npix += 1
        ok = npix > npar
        fixed = forced or posfix[g]
        xc = x_in[g]
        yc = y_in[g]
        if not forced and not posfix[g]:
            xc = xs0[g]
            yc = ys0[g]
        _render_box(gx0, gy0, xc, yc, qxx[g], qyy[g], qxy[g], kk[g], norm[g], alpha, tab,
                    tscale, pr, dpx, dpy, tmp, fm, True)
        # 1. flux at the starting centre (linear), weights refreshed from the model
        _weights_box(fm, base, pr, 0.0, cbox, inv_gain, False, wt)
        _normal3(wt, d, pr, dpx, dpy, 0.0, True, amat, bvec)
        lin_ok = amat[0, 0] > 0.0
        ok = ok and lin_ok
        flux = bvec[0] / amat[0, 0] if lin_ok else 0.0
        sig = math.sqrt(1.0 / amat[0, 0]) if lin_ok else 1.0
        if not math.isfinite(flux):
            ok = False
            flux = 0.0
        not_conv = False
        if inv_gain > 0.0 and ok:
            n_lin = max_iter if forced else 1
            conv = False
            for _ in range(n_lin):
                _weights_box(fm, base, pr, flux, cbox, inv_gain, True, wt)
                _normal3(wt, d, pr, dpx, dpy, 0.0, True, amat, bvec)
                ok_n = amat[0, 0] > 0.0
                f_n = bvec[0] / amat[0, 0] if ok_n else 0.0
                s_n = math.sqrt(1.0 / amat[0, 0]) if ok_n else 1.0
                if not math.isfinite(f_n):
                    ok_n = False
                if not ok_n:
                    f_n = 0.0
                conv = abs(f_n - flux) <= tol * s_n
                flux = f_n
                sig = s_n
                ok = ok and ok_n
                if conv or not ok_n:
                    break
            if forced and not conv and ok:
                not_conv = True
        # 2. centre: Levenberg-Marquardt on flux and centre
        failed_pos = False
        if not forced:
            if not (flux / max(sig, 1e-300) >= min_pos_snr):
                fixed = True
            chi2 = _normal3(wt, d, pr, dpx, dpy, flux, fixed, amat, bvec)
            lam = 0.0
            active = ok and not fixed
            refreshed = inv_gain == 0.0
            it = 0
            while active and it < max_iter:
                it += 1
                if not _inv3(amat, ainv):
                    small = False
                    for u in range(3):
                        step[u] = np.nan
                else:
                    small = True
                    for u in range(3):
                        s_u = math.sqrt(abs(ainv[u, u]))
                        gn = ainv[u, 0] * bvec[0] + ainv[u, 1] * bvec[1] + ainv[u, 2] * bvec[2]
                        if not abs(gn) <= tol * max(s_u, 1e-300):
                            small = False
                if small:
                    active = False
                    break
                for u in range(3):
                    for v in range(3):
                        al[u, v] = amat[u, v]
                    al[u, u] = amat[u, u] * (1.0 + lam)
                fin = _inv3(al, ainv)
                for u in range(3):
                    step[u] = (ainv[u, 0] * bvec[0] + ainv[u, 1] * bvec[1]
                               + ainv[u, 2] * bvec[2]) if fin else np.nan
                fin = fin and math.isfinite(step[0]) and math.isfinite(step[1]) \
                    and math.isfinite(step[2])
                better = False
                wander = False
                if fin:
                    sc = min(1.0, 1.0 / max(math.hypot(step[1], step[2]), 1e-12))
                    f_t = flux + step[0]
                    x_t = xc + step[1] * sc
                    y_t = yc + step[2] * sc
                    wander = math.hypot(x_t - x_in[g], y_t - y_in[g]) > max_shift
                    _render_box(gx0, gy0, x_t, y_t, qxx[g], qyy[g], qxy[g], kk[g], norm[g],
                                alpha, tab, tscale, pt, dxt, dyt, tmp, fm, True)
                    chi2_t = 0.0
                    for j in range(hbox):
                        for i in range(wbox):
                            if wt[j, i] != 0.0:
                                r = d[j, i] - f_t * pt[j, i]
                                chi2_t += wt[j, i] * r * r
                    better = chi2_t <= chi2 * (1.0 + 1e-12)   # strict descent (float64)
                if better:
                    flux = f_t
                    xc = x_t
                    yc = y_t
                    pr[:, :] = pt
                    dpx[:, :] = dxt
                    dpy[:, :] = dyt
                    if not refreshed:
                        _weights_box(fm, base, pr, flux, cbox, inv_gain, True, wt)
                        refreshed = True
                    chi2 = _normal3(wt, d, pr, dpx, dpy, flux, fixed, amat, bvec)
                    lam *= 0.1
                else:
                    lam = max(lam * 10.0, 1e-3)
                    if lam > 1e6:
                        active = False
                if wander and better:
                    failed_pos = True
                    active = False
            not_conv = active and ok
        # 3. final quantities at the solution (the PSF on the whole box: the aperture and
        #    psf_qf reach beyond the fit pixels)
        _render_box(gx0, gy0, xc, yc, qxx[g], qyy[g], qxy[g], kk[g], norm[g], alpha, tab,
                    tscale, pr, dpx, dpy, tmp, fm, False)
        _weights_box(fm, base, pr, flux, cbox, inv_gain, True, wt)
        _normal3(wt, d, pr, dpx, dpy, flux, fixed, amat, bvec)
        diag_ok = amat[0, 0] > 0.0 and amat[1, 1] > 0.0 and amat[2, 2] > 0.0
        ok = ok and diag_ok
        if forced:
            amat[1, 1] = 1.0
            amat[2, 2] = 1.0
            amat[0, 1] = amat[0, 2] = amat[1, 0] = amat[2, 0] = amat[1, 2] = amat[2, 1] = 0.0
        if not diag_ok:
            for u in range(3):
                for v in range(3):
                    amat[u, v] = 1.0 if u == v else 0.0
        if not _inv3(amat, ainv):
            ok = False
            for u in range(3):
                ainv[u, u] = np.nan
        dv0 = abs(ainv[0, 0])
        dv1 = abs(ainv[1, 1])
        dv2 = abs(ainv[2, 2])
        ok = ok and math.isfinite(dv0) and math.isfinite(dv1) and math.isfinite(dv2) \
            and math.isfinite(flux)
        chi2_m = 0.0
        p_reg = 0.0
        p_good = 0.0
        edge = False
        a_f = 0.0
        cfrac = 0.0
        spp = 0.0
        var_ap = 0.0
        for j in range(hbox):
            for i in range(wbox):
                ww = wt[j, i]
                if ww != 0.0:
                    r = d[j, i] - flux * pr[j, i]
                    chi2_m += ww * r * r
                    spp += pr[j, i] * ww * pr[j, i]
                if reg[j, i]:
                    p_reg += pr[j, i]
                    if good[j, i]:
                        p_good += pr[j, i]
                    if not inside[j, i]:
                        edge = True
        spp = max(spp, 1e-300)
        for j in range(hbox):
            ddy = gy0 + j - yc
            for i in range(wbox):
                ddx = gx0 + i - xc
                ww = wt[j, i]
                vw = 1.0 / ww if ww > 0.0 else base[j, i]
                if good[j, i] and ddx * ddx + ddy * ddy <= r2ext:
                    a_f += d[j, i]
                    cfrac += pr[j, i]
                    var_ap += vw
        var_diff = 0.0
        for j in range(hbox):
            ddy = gy0 + j - yc
            for i in range(wbox):
                ddx = gx0 + i - xc
                ww = wt[j, i]
                vw = 1.0 / ww if ww > 0.0 else base[j, i]
                a = 1.0 if (good[j, i] and ddx * ddx + ddy * ddy <= r2ext) else 0.0
                cf = a - (cfrac / spp) * pr[j, i] * ww
                var_diff += cf * cf * vw
        npar_m = 1 if fixed else 3
        ndof = max(npix - npar_m, 1)
        den = math.sqrt(var_diff + (ext_sys * cfrac * max(flux, 0.0)) ** 2)
        ext = (a_f - cfrac * flux) / den if den > 0.0 else np.nan
        shift = math.hypot(xc - x_in[g], yc - y_in[g])
        failed = (not fixed) and ok and (failed_pos or not math.isfinite(shift)
                                         or shift > max_shift)
        res_f[g, 0] = xc
        res_f[g, 1] = yc
        res_f[g, 2] = 0.0 if fixed else math.sqrt(dv1)
        res_f[g, 3] = 0.0 if fixed else math.sqrt(dv2)
        res_f[g, 4] = flux if ok else np.nan
        res_f[g, 5] = math.sqrt(dv0) if ok else np.nan
        res_f[g, 6] = chi2_m / ndof if ok else np.nan
        res_f[g, 7] = p_good / max(p_reg, 1e-300)
        res_f[g, 8] = ext if ok else np.nan
        res_f[g, 9] = a_f if ok else np.nan
        res_f[g, 10] = math.sqrt(var_ap)
        res_i[g, 0] = npix
        res_i[g, 1] = ndof
        res_b[g, 0] = ok
        res_b[g, 1] = not_conv
        res_b[g, 2] = edge
        res_b[g, 3] = fixed
        res_b[g, 4] = failed


@_njit
def _add_stamps_nb(model, cx, cy, half, flux, xc, yc, valid, qxx, qyy, qxy, kk, norm, alpha,
                   tab, tscale):  # pragma: no cover - compiled
    """Add each valid source's model ``flux P`` on its square stamp (centre pixel
    ``(cx, cy)``, half-size ``half``) into the float32 image ``model``; the analytic profile in
    single precision (as the numpy path renders it), the residual table where it reaches."""
    ny, nx = model.shape
    nt = tab.shape[0]
    rr = nt // 2
    am1 = np.float32(alpha - 1.0)
    one = np.float32(1.0)
    half32 = np.float32(0.5)
    for s in range(cx.size):
        if not valid[s]:
            continue
        h = half[s]
        a = np.float32(flux[s] * norm[s])
        qx = np.float32(qxx[s])
        qy = np.float32(qyy[s])
        qc = np.float32(qxy[s])
        k = np.float32(kk[s])
        x0 = xc[s]
        y0 = yc[s]
        for j in range(max(cy[s] - h, 0), min(cy[s] + h + 1, ny)):
            dy = np.float32(j - y0)
            for i in range(max(cx[s] - h, 0), min(cx[s] + h + 1, nx)):
                dx = np.float32(i - x0)
                z = half32 * (qx * dx * dx + qy * dy * dy) + qc * dx * dy
                if z > 0:
                    model[j, i] += a / (one + k * z + z * z ** am1)
                else:
                    model[j, i] += a
        if nt > 0:
            ftab = flux[s] * tscale
            for j in range(max(cy[s] - rr - 1, 0), min(cy[s] + rr + 2, ny)):
                v = j - y0 + rr
                if v < -1.0 or v >= nt:
                    continue
                j0 = int(math.floor(v))
                fy = v - j0
                for i in range(max(cx[s] - rr - 1, 0), min(cx[s] + rr + 2, nx)):
                    if abs(i - cx[s]) > h or abs(j - cy[s]) > h:
                        continue
                    u = i - x0 + rr
                    if u < -1.0 or u >= nt:
                        continue
                    i0 = int(math.floor(u))
                    fx = u - i0
                    t00 = tab[j0, i0] if (j0 >= 0 and i0 >= 0) else 0.0
                    t01 = tab[j0, i0 + 1] if (j0 >= 0 and i0 + 1 < nt) else 0.0
                    t10 = tab[j0 + 1, i0] if (j0 + 1 < nt and i0 >= 0) else 0.0
                    t11 = tab[j0 + 1, i0 + 1] if (j0 + 1 < nt and i0 + 1 < nt) else 0.0
                    model[j, i] += np.float32(ftab * ((1 - fy) * ((1 - fx) * t00 + fx * t01)
                                                      + fy * ((1 - fx) * t10 + fx * t11)))
