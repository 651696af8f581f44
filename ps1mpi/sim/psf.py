"""The simulator's PSF: a Moffat core plus a faint wide Moffat wing, varying over the focal plane.

This is deliberately *not* the pipeline's PS1_V1 model, so that the pipeline is tested on a
PSF it has to approximate. For one exposure the PSF at focal-plane position ``(X, Y)`` is

``P(u) = (1 - f_w) M(u; alpha, beta, shape) + f_w M(u; s_w alpha, beta_w, shape)``

with ``M`` an elliptical Moffat profile of unit integral,
``M = (beta - 1) / (pi a b) (1 + (u_a / a)^2 + (u_b / b)^2)^-beta``. The core FWHM grows
quadratically with the field radius ``rho = r / r_field`` (``fwhm_core (1 + c_r rho^2)``); the
ellipticity is a constant term (wind shake, tracking) plus an astigmatism-like term
``astig rho^2 (cos 2 phi, sin 2 phi)`` (phi the focal-plane polar angle; positive = radial
elongation). Ellipticity ``e = (a - b) / (a + b)`` with ``e1 = e cos 2theta``, ``e2 = e sin 2theta``
and ``theta`` measured from +X towards +Y. ``seeing`` is the FWHM of the whole profile
(core + wing) at the field centre, in arcsec.

Rendering integrates the profile over pixels: 5x5 sub-samples in the inner 9x9 pixels, the
pixel-centre value outside (where the profile is smooth).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import fft as sfft
from scipy.optimize import brentq
from scipy.special import gammaincinv

__all__ = [
    "ExposurePSF", "moffat_alpha", "composite_fwhm", "core_fwhm_for_seeing",
    "shape_to_chip", "psf_profile", "render_point_stamps", "render_points_into", "add_stamps", "stamp_radius",
    "render_galaxy_stamps", "galaxy_radius", "sersic_bn", "psf_image", "RADIUS_TIERS", "GALAXY_TIERS",
]

_INNER = 4        # inner half-width (pixels) integrated with sub-samples
_NSUB = 5         # sub-samples per pixel side in the inner region
RADIUS_TIERS = (12, 20, 32, 50, 80, 128, 200, 320)
GALAXY_TIERS = (16, 24, 32, 48, 64, 96, 128)


def moffat_alpha(fwhm: float | np.ndarray, beta: float) -> float | np.ndarray:
    """Moffat scale ``alpha`` for a FWHM: ``fwhm = 2 alpha sqrt(2^(1/beta) - 1)``."""
    return np.asarray(fwhm) / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _radial(r, alpha, beta, wing_frac, wing_scale, wing_beta):
    core = (beta - 1) / (np.pi * alpha ** 2) * (1 + (r / alpha) ** 2) ** (-beta)
    aw = alpha * wing_scale
    wing = (wing_beta - 1) / (np.pi * aw ** 2) * (1 + (r / aw) ** 2) ** (-wing_beta)
    return (1 - wing_frac) * core + wing_frac * wing


def composite_fwhm(core_fwhm: float, *, beta: float, wing_frac: float, wing_scale: float,
                   wing_beta: float) -> float:
    """FWHM of the circular core + wing profile for a core FWHM (same unit)."""
    a = float(moffat_alpha(core_fwhm, beta))
    peak = _radial(0.0, a, beta, wing_frac, wing_scale, wing_beta)
    f = lambda r: _radial(r, a, beta, wing_frac, wing_scale, wing_beta) - 0.5 * peak  # noqa: E731
    return 2.0 * brentq(f, 1e-6 * core_fwhm, 10 * core_fwhm)


def core_fwhm_for_seeing(seeing: float, *, beta: float, wing_frac: float, wing_scale: float,
                         wing_beta: float) -> float:
    """Core FWHM giving a composite FWHM of ``seeing`` (same unit)."""
    g = lambda c: composite_fwhm(c, beta=beta, wing_frac=wing_frac, wing_scale=wing_scale,  # noqa: E731
                                 wing_beta=wing_beta) - seeing
    return brentq(g, 0.3 * seeing, 1.0001 * seeing)


@dataclass
class ExposurePSF:
    """PSF of one exposure.

    Attributes
    ----------
    seeing : float
        FWHM of the full profile at the field centre (arcsec).
    beta : float
        Moffat index of the core.
    e1, e2 : float
        Constant ellipticity (focal-plane frame).
    astig : float
        Ellipticity at the field edge (rho = 1) from the field-dependent term.
    fwhm_radial : float
        Fractional growth of the core FWHM at rho = 1.
    wing_frac : float
        Fraction of the flux in the wide wing.
    wing_scale : float
        Wing alpha / core alpha.
    wing_beta : float
        Moffat index of the wing.
    field_radius : float
        Radius of the field, rho = 1 (focal-plane pixels).
    pixel_scale : float
        Arcsec per pixel.
    """

    seeing: float
    beta: float = 3.0
    e1: float = 0.0
    e2: float = 0.0
    astig: float = 0.03
    fwhm_radial: float = 0.10
    wing_frac: float = 0.06
    wing_scale: float = 2.5
    wing_beta: float = 2.5
    field_radius: float = 1000.0
    pixel_scale: float = 0.258

    def __post_init__(self) -> None:
        if not 0.2 < self.seeing < 10:
            raise ValueError(f"ExposurePSF: seeing {self.seeing} arcsec outside (0.2, 10)")
        if not self.beta > 1.5 or not self.wing_beta > 1.5:
            raise ValueError("ExposurePSF: Moffat indices must exceed 1.5 (finite flux)")
        if not 0 <= self.wing_frac < 0.5:
            raise ValueError(f"ExposurePSF: wing_frac {self.wing_frac} outside [0, 0.5)")
        self._core = core_fwhm_for_seeing(self.seeing, beta=self.beta, wing_frac=self.wing_frac,
                                          wing_scale=self.wing_scale, wing_beta=self.wing_beta)

    @property
    def core_fwhm(self) -> float:
        """Core FWHM at the field centre (arcsec)."""
        return self._core

    def to_dict(self) -> dict:
        """Plain values (for headers and tables)."""
        return asdict(self)

    def at_focal(self, X, Y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Core FWHM (pixels) and ellipticity (focal frame) at focal-plane positions.

        Parameters
        ----------
        X, Y : array
            Focal-plane coordinates (pixels, relative to the optical axis).

        Returns
        -------
        fwhm, e1, e2 : ndarray
            Geometric-mean core FWHM sqrt(FWHM_major FWHM_minor) in pixels and the ellipticity
            components in the focal-plane frame.
        """
        X = np.asarray(X, dtype=np.float64)
        Y = np.asarray(Y, dtype=np.float64)
        rho2 = (X * X + Y * Y) / self.field_radius ** 2
        fwhm = self._core / self.pixel_scale * (1.0 + self.fwhm_radial * rho2)
        phi2 = 2.0 * np.arctan2(Y, X)
        e1 = self.e1 + self.astig * rho2 * np.cos(phi2)
        e2 = self.e2 + self.astig * rho2 * np.sin(phi2)
        return fwhm, e1, e2

    def composite_fwhm_px(self, core_fwhm_px) -> np.ndarray:
        """Composite FWHM (pixels) for core FWHM values (pixels): the ratio is constant."""
        ratio = self.seeing / self._core
        return np.asarray(core_fwhm_px) * ratio


def shape_to_chip(e1, e2, xparity: int, yparity: int):
    """Ellipticity from the focal-plane frame to a chip frame with the given parities."""
    return np.asarray(e1), np.asarray(e2) * (xparity * yparity)


def _quad_coeffs(fwhm, e1, e2, beta):
    """Quadratic-form coefficients (A, B, C) of the Moffat radius and the norm 1/(a b)."""
    e = np.clip(np.hypot(e1, e2), 0.0, 0.9)
    theta = 0.5 * np.arctan2(e2, e1)
    alpha = moffat_alpha(fwhm, beta)
    a = alpha * np.sqrt((1 + e) / (1 - e))
    b = alpha * np.sqrt((1 - e) / (1 + e))
    c, s = np.cos(theta), np.sin(theta)
    A = c * c / a ** 2 + s * s / b ** 2
    C = s * s / a ** 2 + c * c / b ** 2
    B = c * s * (1 / a ** 2 - 1 / b ** 2)
    return A, B, C, 1.0 / (a * b)


def psf_profile(dx, dy, fwhm, e1, e2, *, beta: float, wing_frac: float, wing_scale: float,
                wing_beta: float) -> np.ndarray:
    """Surface density (per pixel^2, unit total flux) of the core + wing PSF at offsets (dx, dy).

    ``fwhm``, ``e1``, ``e2`` broadcast against ``dx``/``dy`` (pixels; core FWHM).
    """
    A, B, C, inv_ab = _quad_coeffs(np.asarray(fwhm, dtype=np.float64), np.asarray(e1, dtype=np.float64),
                                   np.asarray(e2, dtype=np.float64), beta)
    f32 = np.float32
    dx = np.asarray(dx, dtype=f32)
    dy = np.asarray(dy, dtype=f32)
    t = f32(1.0) + (A.astype(f32) * dx * dx + f32(2.0) * B.astype(f32) * dx * dy + C.astype(f32) * dy * dy)
    w2 = wing_scale * wing_scale
    out = _inv_pow(t, beta)
    out *= f32((1 - wing_frac) * (beta - 1) / np.pi)
    tw = t
    tw -= f32(1.0)
    tw *= f32(1.0 / w2)
    tw += f32(1.0)
    out += f32(wing_frac * (wing_beta - 1) / (np.pi * w2)) * _inv_pow(tw, wing_beta)
    out *= inv_ab.astype(f32)
    return out


def _inv_pow(t: np.ndarray, beta: float) -> np.ndarray:
    """t ** -beta, fast for integer and half-integer beta."""
    twice = 2.0 * beta
    if abs(twice - round(twice)) < 1e-12 and 0 < beta <= 8:
        k = int(beta)
        out = np.reciprocal(t)
        base = out.copy() if k > 1 else None
        for _ in range(k - 1):
            out *= base
        if round(twice) % 2 == 1:
            out /= np.sqrt(t)
        return out
    out = np.log(t)
    out *= np.float32(-beta)
    return np.exp(out, out=out)


def stamp_radius(flux, fwhm, *, psf: ExposurePSF, threshold: float) -> np.ndarray:
    """Stamp half-size (pixels, one of :data:`RADIUS_TIERS`) beyond which the PSF wing of a
    source of ``flux`` (e-) falls below ``threshold`` (e- per pixel)."""
    alpha = moffat_alpha(np.asarray(fwhm, dtype=np.float64), psf.beta) * psf.wing_scale
    norm = psf.wing_frac * (psf.wing_beta - 1) / (np.pi * alpha ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.maximum(np.asarray(flux, dtype=np.float64) * norm / max(threshold, 1e-6), 1.0)
    r = alpha * np.sqrt(np.maximum(ratio ** (1.0 / psf.wing_beta) - 1.0, 0.0))
    tiers = np.asarray(RADIUS_TIERS)
    idx = np.searchsorted(tiers, r)
    return tiers[np.minimum(idx, tiers.size - 1)]


def render_point_stamps(x, y, fwhm, e1, e2, *, psf: ExposurePSF, radius: int):
    """Pixel-integrated unit-flux PSF stamps for point sources.

    Parameters
    ----------
    x, y : ndarray
        Source positions (chip pixels).
    fwhm, e1, e2 : ndarray
        Core FWHM (pixels) and ellipticity in the chip frame, per source.
    psf : ExposurePSF
        Supplies the profile's fixed parameters.
    radius : int
        Stamp half-size R; stamps are (2R+1)^2.

    Returns
    -------
    stamps : ndarray
        ``(n, 2R+1, 2R+1)`` float32, each the fraction of the source flux per pixel.
    ix, iy : ndarray
        Integer pixel of each stamp's centre.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    fx, fy = x - ix, y - iy
    g = np.arange(-radius, radius + 1, dtype=np.float64)
    kw = dict(beta=psf.beta, wing_frac=psf.wing_frac, wing_scale=psf.wing_scale, wing_beta=psf.wing_beta)
    fw = np.asarray(fwhm, dtype=np.float64).reshape(n, 1, 1)
    a1 = np.asarray(e1, dtype=np.float64).reshape(n, 1, 1)
    a2 = np.asarray(e2, dtype=np.float64).reshape(n, 1, 1)
    dx = g[None, None, :] - fx[:, None, None]
    dy = g[None, :, None] - fy[:, None, None]
    stamps = psf_profile(dx, dy, fw, a1, a2, **kw)
    # outer pixels: pixel integral ~ f + lap(f) / 24 (midpoint rule plus its curvature term)
    lap = np.zeros_like(stamps)
    lap[:, 1:-1, 1:-1] = (stamps[:, 2:, 1:-1] + stamps[:, :-2, 1:-1] + stamps[:, 1:-1, 2:]
                          + stamps[:, 1:-1, :-2] - 4.0 * stamps[:, 1:-1, 1:-1])
    stamps += lap / 24.0
    # inner pixels: average of NSUB x NSUB sub-samples
    k = min(_INNER, radius)
    gi = np.arange(-k, k + 1, dtype=np.float64)
    sub = (np.arange(_NSUB) + 0.5) / _NSUB - 0.5
    px = (gi[:, None] + sub[None, :]).ravel()                    # (m*NSUB,)
    dxi = px[None, None, :] - fx[:, None, None]
    dyi = px[None, :, None] - fy[:, None, None]
    inner = psf_profile(dxi, dyi, fw, a1, a2, **kw)
    m = gi.size
    inner = inner.reshape(n, m, _NSUB, m, _NSUB).mean(axis=(2, 4))
    stamps[:, radius - k:radius + k + 1, radius - k:radius + k + 1] = inner
    return stamps.astype(np.float32), ix, iy


def render_points_into(image: np.ndarray, x, y, flux, fwhm, e1, e2, *, psf: ExposurePSF, radius: int,
                       max_pixels: float = 4e6) -> tuple[np.ndarray, np.ndarray]:
    """Render point sources into ``image`` in chunks of at most ``max_pixels`` stamp pixels.

    Returns each source's stamp sum (fraction of its flux drawn) and stamp maximum (fraction of
    its flux in its brightest pixel).
    """
    n = np.size(x)
    frac = np.zeros(n)
    peak = np.zeros(n)
    per_source = (2 * radius + 1) ** 2 + ((2 * min(_INNER, radius) + 1) * _NSUB) ** 2
    chunk = max(1, int(max_pixels // per_source))
    for a in range(0, n, chunk):
        sl = slice(a, a + chunk)
        st, ix, iy = render_point_stamps(np.asarray(x)[sl], np.asarray(y)[sl], np.asarray(fwhm)[sl],
                                         np.asarray(e1)[sl], np.asarray(e2)[sl], psf=psf, radius=radius)
        add_stamps(image, st, ix, iy, np.asarray(flux)[sl])
        frac[sl] = st.sum(axis=(1, 2))
        peak[sl] = st.max(axis=(1, 2))
    return frac, peak


def add_stamps(image: np.ndarray, stamps: np.ndarray, ix, iy, scale) -> None:
    """Add ``scale[k] * stamps[k]`` centred at pixel (ix[k], iy[k]) into ``image`` (clipped)."""
    ny, nx = image.shape
    r = stamps.shape[1] // 2
    for k in range(stamps.shape[0]):
        x0, y0 = int(ix[k]) - r, int(iy[k]) - r
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + 2 * r + 1, nx), min(y0 + 2 * r + 1, ny)
        if xa >= xb or ya >= yb:
            continue
        image[ya:yb, xa:xb] += np.float32(scale[k]) * stamps[k, ya - y0:yb - y0, xa - x0:xb - x0]


def sersic_bn(n):
    """Sersic b_n such that r_e encloses half the light (exact, via the incomplete gamma)."""
    return gammaincinv(2.0 * np.asarray(n, dtype=np.float64), 0.5)


def galaxy_radius(n_s, r_e, fwhm, *, psf: ExposurePSF) -> np.ndarray:
    """Stamp half-size (one of :data:`GALAXY_TIERS`) holding a galaxy truncated at (4 + n) r_e
    (pixels) plus 2.5 PSF FWHM; the largest tier for bigger galaxies (truncated to fit)."""
    reach = 2.5 * np.asarray(fwhm) * psf.seeing / psf.core_fwhm + 2.0
    need = (4.0 + np.asarray(n_s)) * np.asarray(r_e) + reach
    tiers = np.asarray(GALAXY_TIERS)
    return tiers[np.minimum(np.searchsorted(tiers, need), tiers.size - 1)]


def render_galaxy_stamps(x, y, n_s, r_e, q, theta, fwhm, e1, e2, *, psf: ExposurePSF,
                         radius: int, oversample: int = 3):
    """PSF-convolved, pixel-integrated Sersic stamps (unit intrinsic flux).

    The Sersic profile ``exp(-b_n (rho / r_e)^(1/n))`` with elliptical radius
    ``rho^2 = u_a^2 + (u_b / q)^2`` (``r_e`` the semi-major half-light radius, ``theta`` the
    major-axis angle from +x towards +y) is sampled on an ``oversample``-times finer grid,
    truncated smoothly at ``(4 + n) r_e`` (or the stamp), normalised to unit sum, convolved with
    the PSF sampled on the same grid (FFT), and binned to pixels. The stamp's sum is the
    fraction of the flux that falls inside the stamp. Galaxies whose PSFs agree to 0.25% in
    FWHM and 0.002 in ellipticity share one PSF kernel.

    Parameters
    ----------
    x, y : ndarray
        Centres (chip pixels).
    n_s, r_e, q, theta : ndarray
        Sersic index, half-light radius (pixels), axis ratio, position angle (radians).
    fwhm, e1, e2 : ndarray
        PSF core FWHM (pixels) and ellipticity (chip frame) at each galaxy.
    psf : ExposurePSF
    radius : int
        Stamp half-size (pixels).
    oversample : int
        Sub-samples per pixel side (odd).

    Returns
    -------
    stamps : ndarray
        ``(n, 2R+1, 2R+1)`` float32.
    ix, iy : ndarray
        Integer centre pixels.
    trunc : ndarray
        Truncation radius used (pixels).
    """
    if oversample % 2 != 1:
        raise ValueError("oversample must be odd")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    o = oversample
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    fx, fy = x - ix, y - iy
    size = 2 * radius + 1
    N = size * o
    p = -radius - 0.5 + (np.arange(N) + 0.5) / o              # fine-sample positions (pixels)
    n_s = np.asarray(n_s, dtype=np.float64)
    r_e = np.maximum(np.asarray(r_e, dtype=np.float64), 0.05)
    q = np.clip(np.asarray(q, dtype=np.float64), 0.05, 1.0)
    theta = np.asarray(theta, dtype=np.float64)
    fw = np.asarray(fwhm, dtype=np.float64)
    psf_reach = 2.5 * fw * psf.seeing / psf.core_fwhm + 2.0
    trunc = np.minimum((4.0 + n_s) * r_e, np.maximum(radius - psf_reach, 1.0))
    bn = sersic_bn(n_s)
    out = np.empty((n, size, size), np.float32)
    kw = dict(beta=psf.beta, wing_frac=psf.wing_frac, wing_scale=psf.wing_scale, wing_beta=psf.wing_beta)
    # FFT size: at least the fine grid, of small prime factors; the PSF kernel is centred on
    # index 0 with wrap-around, so out[j] = sum_i prof[i] psf(p_j - p_i) needs no shift
    Nf = sfft.next_fast_len(N, real=True)
    kofs = (((np.arange(Nf) + Nf // 2) % Nf - Nf // 2) / o).astype(np.float32)
    # galaxies share a PSF kernel when their PSFs agree to 0.25% in FWHM and 0.002 in e1, e2
    # (the PSF varies slowly across a chip)
    key = np.stack([np.round(np.log(fw) / 0.0025), np.round(np.asarray(e1) / 0.002),
                    np.round(np.asarray(e2) / 0.002)], axis=1).astype(np.int64)
    _, group = np.unique(key, axis=0, return_inverse=True)
    group = group.ravel()
    kcache: dict[int, np.ndarray] = {}
    pf = p.astype(np.float32)
    chunk = max(1, int(4e6 // (Nf * Nf)))
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        sl = slice(a, b)
        m = b - a
        dx = pf[None, None, :] - fx[sl, None, None].astype(np.float32)
        dy = pf[None, :, None] - fy[sl, None, None].astype(np.float32)
        c = np.cos(theta[sl]).astype(np.float32)[:, None, None]
        s_ = np.sin(theta[sl]).astype(np.float32)[:, None, None]
        ua = dx * c + dy * s_
        ub = (dy * c - dx * s_) / q[sl].astype(np.float32)[:, None, None]
        rho = np.sqrt(ua * ua + ub * ub)
        del ua, ub, dx, dy
        x_ = rho / r_e[sl].astype(np.float32)[:, None, None]
        prof = np.exp(-bn[sl].astype(np.float32)[:, None, None]
                      * x_ ** (1.0 / n_s[sl]).astype(np.float32)[:, None, None])
        tr = trunc[sl].astype(np.float32)[:, None, None]
        # smooth truncation over the last 10% of the truncation radius
        prof *= np.clip((np.float32(1.05) * tr - rho) / (np.float32(0.1) * tr), 0.0, 1.0)
        tot = prof.sum(axis=(1, 2), keepdims=True)
        prof /= np.where(tot > 0, tot, 1.0)
        fprof = sfft.rfft2(prof, s=(Nf, Nf), axes=(1, 2))
        del prof, rho, x_
        for k in range(m):
            gk = int(group[a + k])
            if gk not in kcache:
                j = a + k
                kern = psf_profile(kofs[None, :], kofs[:, None], fw[j], e1[j], e2[j], **kw) / np.float32(o * o)
                kcache[gk] = sfft.rfft2(kern)
            fprof[k] *= kcache[gk]
        conv = sfft.irfft2(fprof, s=(Nf, Nf), axes=(1, 2))[:, :N, :N]
        out[sl] = conv.reshape(m, size, o, size, o).sum(axis=(2, 4))
    return out, ix, iy, trunc


def psf_image(psf: ExposurePSF, X: float, Y: float, *, size: int = 51, xparity: int = 1,
              yparity: int = 1, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """The true PSF (pixel-integrated, unit total flux) at focal-plane position (X, Y), as seen
    in a chip with the given parities, centred at pixel (size // 2 + dx, size // 2 + dy)."""
    fw, a1, a2 = psf.at_focal(X, Y)
    a1, a2 = shape_to_chip(a1, a2, xparity, yparity)
    r = size // 2
    st, _, _ = render_point_stamps(np.array([r + dx]), np.array([r + dy]), np.atleast_1d(fw),
                                   np.atleast_1d(a1), np.atleast_1d(a2), psf=psf, radius=r)
    return st[0]
