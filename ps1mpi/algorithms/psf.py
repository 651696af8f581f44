"""The PS1_V1 point-spread-function model and its fit to the PSF stars of an image.

The model follows psphot's ``PS_MODEL_PS1_V1``: a power law with a fitted linear term,

    f(x, y) = I0 / (1 + k z + z**1.666),
    z = x**2 / (2 sx**2) + y**2 / (2 sy**2) + sxy x y,

with ``(x, y)`` the offset from the source centre in pixels.  The elliptical contour is kept
internally as the 2x2 "shape matrix" ``M`` with ``z = 0.5 u^T M^-1 u`` (for a Gaussian ``M``
would be the covariance; pixels squared), so that ``1/sx**2 = (M^-1)_xx``,
``1/sy**2 = (M^-1)_yy`` and ``sxy = (M^-1)_xy``.  The model is an *effective* PSF: it is
sampled at pixel centres (the pixel response is part of what is fitted), as in psphot.

Normalisation: :meth:`PSFModel.evaluate` returns the PSF scaled to unit flux within the
ellipse of the PSF's own shape whose area equals that of a circle of radius ``norm_radius``
(25 pixels by default, psphot's ``PSF_REF_RADIUS``).  The PS1_V1 wings fall as r**-3.33 and
hold several per cent of the light beyond 25 pixels, so the radius is part of the definition
of the flux.  The aperture correction (PSF flux against a measured aperture, scaled to the
reference radius with the model's own curve of growth) is measured on the PSF stars and
recorded in the model; :mod:`ps1mpi.algorithms.psfphot` applies it.

Spatial variation: the shape parameters ``(Mxx, Myy, Mxy, k)`` are stored on a grid of up to
6x6 nodes (cell centres of an even division of the image, psphot's ``PSF.TREND.MODE MAP``)
and interpolated bilinearly, extrapolated linearly to the image edges.  Interpolating the
shape matrix (rather than ``sx``, ``sy``, ``sxy``) keeps it positive definite between nodes.
The grid size is chosen from the number of PSF stars as the IPP does (3 stars for a constant
model, 16 for 2x2, 54 for 3x3, 128 for 4x4, 300 for 5x5, more than 576 for 6x6) and, among the
sizes the stars allow, by 5-fold cross-validation of the star-by-star shape measurements (the
smallest grid within one standard error of the best score).

An optional pixel residual table (psphot's ``PSF.RESIDUALS``: radius 8 pixels, one table
sample per pixel, bilinear interpolation) corrects what the analytic form misses.  It is
built from the residuals of the PSF stars and kept only if it lowers the cross-validated
chi-square of the stars by a measurable amount.

No MPI, no files: :func:`fit_psf_model` takes arrays and returns a :class:`PSFModel`; the
model converts itself to and from a FITS HDU list (:meth:`PSFModel.to_hdulist`,
:meth:`PSFModel.from_hdulist`).  :meth:`PSFModel.to_fits` / :meth:`PSFModel.from_fits` are
thin conveniences around those for callers that do their own product I/O elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from astropy.io import fits
from scipy import stats as _stats
from scipy.spatial import cKDTree

from ps1mpi.algorithms import maskbits

try:  # numba is a project dependency; the numpy paths compute the same results without it
    import numba as _numba
except ImportError:  # pragma: no cover - exercised only where numba is absent
    _numba = None

HAVE_NUMBA = _numba is not None

__all__ = [
    "ALPHA",
    "MODEL_ALPHA",
    "K_LIMITS",
    "PSFParams",
    "PSFShape",
    "PSFModel",
    "fit_psf_model",
    "ps1v1_integral",
    "ps1v1_half_max_z",
    "ps1v1_params",
    "ps1v1_profile",
    "grid_weights",
    "weight_variance",
    "shape_matrix",
    "shape_params",
    "extract_boxes",
    "adaptive_moments",
    "grid_order_for_stars",
]

ALPHA = 1.666
"""Power-law index of the PS1_V1 profile in ``z`` (r**3.33)."""

MODEL_ALPHA: dict[str, float] = {"PS1_V1": ALPHA, "QGAUSS": 2.25}
"""The analytic model families ``f = I0 / (1 + k z + z**alpha)`` and their power-law index:
psphot's ``PS_MODEL_PS1_V1`` (wings fall as r**-3.33) and ``PS_MODEL_QGAUSS`` (r**-4.5)."""

K_LIMITS = (-1.0, 20.0)
"""Allowed range of the linear term ``k`` (psphot's lax limits; the profile stays positive)."""

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_GL_T, _GL_W = np.polynomial.legendre.leggauss(48)
_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Profile helpers
# ---------------------------------------------------------------------------------------------

def ps1v1_integral(k: np.ndarray | float, zmax: np.ndarray | float, *,
                   alpha: float = ALPHA) -> np.ndarray:
    """``int_0^zmax dz / (1 + k z + z**alpha)``, vectorised.

    Together with ``2 pi sqrt(det M)`` this is the flux of the unit-peak profile inside the
    contour ``z = zmax``.  Gauss-Legendre quadrature in ``z`` below 1 and in ``s = log(z)``
    above (48 nodes per segment); relative accuracy better than 1e-7 for ``k`` in
    :data:`K_LIMITS`.

    Parameters
    ----------
    k : array_like
        Linear term of the profile (dimensionless).
    zmax : array_like
        Upper limit of the integral in ``z`` (dimensionless), ``>= 0``.
    alpha : float
        Power-law index of the family (:data:`MODEL_ALPHA`; PS1_V1 by default).

    Returns
    -------
    ndarray
        The integral, shape of the broadcast inputs.
    """
    k = np.asarray(k, dtype=np.float64)
    zmax = np.asarray(zmax, dtype=np.float64)
    k, zmax = np.broadcast_arrays(k, zmax)
    out = np.zeros(k.shape)
    # segment 1: z in [0, min(zmax, 1)], plain in z (the profile is smooth there but for the
    # weak z**alpha cusp at 0); segment 2: [1, zmax] in s = log(z).
    z1 = np.minimum(zmax, 1.0)
    zz = 0.5 * z1[..., None] * (_GL_T + 1.0)
    f = 1.0 / (1.0 + k[..., None] * zz + zz ** alpha)
    out += 0.5 * z1 * np.sum(_GL_W * f, axis=-1)
    hi = zmax > 1.0
    if np.any(hi):
        s1 = np.log(np.where(hi, zmax, 1.0))
        s = 0.5 * s1[..., None] * (_GL_T + 1.0)
        zz = np.exp(s)
        f = zz / (1.0 + k[..., None] * zz + zz ** alpha)
        out += np.where(hi, 0.5 * s1 * np.sum(_GL_W * f, axis=-1), 0.0)
    return out


def ps1v1_half_max_z(k: np.ndarray | float, *, alpha: float = ALPHA) -> np.ndarray:
    """Value of ``z`` at which the unit-peak profile falls to one half.

    Solves ``k z + z**alpha = 1`` by Newton's method from the right (the left side is convex
    and increasing beyond its minimum, so the iteration converges monotonically).

    Parameters
    ----------
    k : array_like
        Linear term of the profile.
    alpha : float
        Power-law index of the family (:data:`MODEL_ALPHA`; PS1_V1 by default).

    Returns
    -------
    ndarray
        ``z_half`` (dimensionless); the half-maximum radius along an axis of Gaussian-like
        scale ``s`` is ``s * sqrt(2 z_half)``.
    """
    k = np.asarray(k, dtype=np.float64)
    z = np.where(k >= 0, 1.0, (1.0 + np.abs(k)) ** (1.0 / (alpha - 1.0)))
    for _ in range(60):
        zp = z ** (alpha - 1.0)
        h = k * z + z * zp - 1.0
        dh = k + alpha * zp
        step = h / dh
        z = z - step
        if np.all(np.abs(step) < 1e-13 * np.maximum(z, 1e-300)):
            break
    return z


def shape_matrix(sigma_x: np.ndarray | float, sigma_y: np.ndarray | float,
                 sxy: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shape matrix ``(Mxx, Myy, Mxy)`` (pixels squared) from psphot's ``(sx, sy, sxy)``.

    ``M`` is the inverse of ``[[1/sx**2, sxy], [sxy, 1/sy**2]]``.

    Parameters
    ----------
    sigma_x, sigma_y : array_like
        ``sx`` and ``sy`` (pixels), positive.
    sxy : array_like
        Cross term (pixels**-2); ``|sxy| < 1/(sx sy)``.

    Returns
    -------
    (Mxx, Myy, Mxy) : tuple of ndarray
        Shape matrix elements (pixels squared).

    Raises
    ------
    ValueError
        If the contour is not an ellipse (non-positive ``sx``/``sy`` or too large ``sxy``).
    """
    sx = np.asarray(sigma_x, dtype=np.float64)
    sy = np.asarray(sigma_y, dtype=np.float64)
    c = np.asarray(sxy, dtype=np.float64)
    a = 1.0 / sx ** 2
    b = 1.0 / sy ** 2
    det = a * b - c * c
    if np.any(~(sx > 0)) or np.any(~(sy > 0)) or np.any(~(det > 0)):
        raise ValueError("shape_matrix: (sigma_x, sigma_y, sxy) must describe an ellipse "
                         "(sigma_x, sigma_y > 0 and |sxy| < 1/(sigma_x sigma_y))")
    return b / det, a / det, -c / det


def shape_params(mxx: np.ndarray | float, myy: np.ndarray | float,
                 mxy: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """psphot's ``(sx, sy, sxy)`` from the shape matrix ``(Mxx, Myy, Mxy)`` (inverse of
    :func:`shape_matrix`).

    Parameters
    ----------
    mxx, myy, mxy : array_like
        Shape matrix elements (pixels squared), positive definite.

    Returns
    -------
    (sigma_x, sigma_y, sxy) : tuple of ndarray
        ``sx``, ``sy`` in pixels and ``sxy`` in pixels**-2.
    """
    mxx = np.asarray(mxx, dtype=np.float64)
    myy = np.asarray(myy, dtype=np.float64)
    mxy = np.asarray(mxy, dtype=np.float64)
    det = mxx * myy - mxy * mxy
    qxx = myy / det
    qyy = mxx / det
    qxy = -mxy / det
    return 1.0 / np.sqrt(qxx), 1.0 / np.sqrt(qyy), qxy


def _axes(mxx: np.ndarray, myy: np.ndarray, mxy: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Major/minor scale (sqrt of the eigenvalues of M, pixels) and position angle of the
    major axis (radians, counter-clockwise from +x, in (-pi/2, pi/2])."""
    tr = 0.5 * (mxx + myy)
    dd = np.sqrt(np.maximum(0.25 * (mxx - myy) ** 2 + mxy ** 2, 0.0))
    lam1 = tr + dd
    lam2 = np.maximum(tr - dd, 0.0)
    theta = 0.5 * np.arctan2(2.0 * mxy, mxx - myy)
    return np.sqrt(lam1), np.sqrt(lam2), theta


class PSFParams(NamedTuple):
    """Per-source parameters of the power-law profile ``1 / (1 + k z + z**alpha)`` (arrays of
    one shape).

    Attributes
    ----------
    qxx, qyy, qxy : ndarray
        Inverse shape matrix ``M^-1`` (pixels**-2): ``z = 0.5 qxx dx^2 + 0.5 qyy dy^2 +
        qxy dx dy``.
    k : ndarray
        Linear term.
    norm : ndarray
        Peak value of the unit-flux PSF (pixels**-2).
    alpha : ndarray or float
        Power-law index of the model family (:data:`MODEL_ALPHA`; PS1_V1 by default).
    """

    qxx: np.ndarray
    qyy: np.ndarray
    qxy: np.ndarray
    k: np.ndarray
    norm: np.ndarray
    alpha: np.ndarray | float = ALPHA

    def expand(self, *axes: int) -> "PSFParams":
        """The same parameters with trailing length-1 axes appended (for broadcasting
        against pixel grids): ``axes`` is the number of axes to add."""
        n = axes[0] if axes else 1
        sl = (Ellipsis,) + (None,) * n
        return PSFParams(*(np.asarray(a)[sl] for a in self))

    def take(self, index: np.ndarray) -> "PSFParams":
        """The parameters of a subset of sources (fancy index on the first axis)."""
        return PSFParams(*(np.asarray(a)[index] for a in self))


class PSFShape(NamedTuple):
    """PSF size and orientation at given positions (psphot PSF_MAJOR, PSF_MINOR, PSF_THETA).

    Attributes
    ----------
    fwhm_major, fwhm_minor : ndarray
        Full width at half maximum along the major and minor axes (pixels).
    theta : ndarray
        Position angle of the major axis, degrees counter-clockwise from +x, in (-90, 90].
    """

    fwhm_major: np.ndarray
    fwhm_minor: np.ndarray
    theta: np.ndarray


def _params_from_moments(mxx: np.ndarray, myy: np.ndarray, mxy: np.ndarray, k: np.ndarray,
                         norm_radius: float, alpha: float = ALPHA) -> PSFParams:
    det = mxx * myy - mxy * mxy
    sdet = np.sqrt(det)
    zmax = norm_radius ** 2 / (2.0 * sdet)
    flux_unit_peak = 2.0 * math.pi * sdet * ps1v1_integral(k, zmax, alpha=alpha)
    return PSFParams(myy / det, mxx / det, -mxy / det, k, 1.0 / flux_unit_peak,
                     np.full(np.shape(k), float(alpha)))


def ps1v1_params(sigma_x: np.ndarray | float, sigma_y: np.ndarray | float,
                 sxy: np.ndarray | float, k: np.ndarray | float, *,
                 norm_radius: float = 25.0, alpha: float = ALPHA) -> PSFParams:
    """Profile parameters of unit-flux PS1_V1 (or QGAUSS) sources from psphot's shape
    parameters.

    Parameters
    ----------
    sigma_x, sigma_y : array_like
        ``sx``, ``sy`` (pixels).
    sxy : array_like
        Cross term (pixels**-2).
    k : array_like
        Linear term.
    norm_radius : float
        Normalisation radius (pixels), see the module docstring.
    alpha : float
        Power-law index of the family (:data:`MODEL_ALPHA`).

    Returns
    -------
    PSFParams
        For :func:`ps1v1_profile` (arrays of the broadcast input shape).
    """
    mxx, myy, mxy = shape_matrix(sigma_x, sigma_y, sxy)
    mxx, myy, mxy, kk = np.broadcast_arrays(mxx, myy, mxy, np.asarray(k, dtype=np.float64))
    return _params_from_moments(mxx, myy, mxy, kk, norm_radius, alpha)


def ps1v1_profile(dx: np.ndarray, dy: np.ndarray, p: PSFParams, *, derivatives: bool = False
                  ) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-flux PS1_V1 (or QGAUSS: ``p.alpha``) profile at offsets ``(dx, dy)`` from the
    centre (pixels).

    Parameters
    ----------
    dx, dy : ndarray
        Pixel-centre offsets from the source centre (pixels), broadcastable with ``p``.
    p : PSFParams
        Profile parameters (broadcastable).
    derivatives : bool
        Also return the derivatives with respect to the centre ``(x0, y0)``.

    Returns
    -------
    P : ndarray
        Profile (flux per pixel for unit flux).
    dP/dx0, dP/dy0 : ndarray
        Only with ``derivatives``.
    """
    z = np.asarray(0.5 * (p.qxx * dx * dx + p.qyy * dy * dy) + p.qxy * dx * dy)
    if z.ndim:
        np.maximum(z, 0.0, out=z)
    else:
        z = np.maximum(z, 0.0)
    zp = z ** (p.alpha - 1.0)
    d = 1.0 + p.k * z + z * zp
    f = 1.0 / d
    if not derivatives:
        return p.norm * f
    # dP/dz = -norm (k + alpha z^(alpha-1)) f^2 ; dz/d(dx) = qxx dx + qxy dy ; d(dx)/dx0 = -1
    g = p.norm * (p.k + p.alpha * zp) * f * f
    dpdx0 = g * (p.qxx * dx + p.qxy * dy)
    dpdy0 = g * (p.qyy * dy + p.qxy * dx)
    return p.norm * f, dpdx0, dpdy0


def _grid_axis(t: np.ndarray, n: int, clamp: bool) -> tuple[np.ndarray, np.ndarray]:
    """Lower node index and fractional offset along one grid axis (``t`` in node units)."""
    if n == 1:
        return np.zeros(t.shape, dtype=np.intp), np.zeros(t.shape)
    t = np.clip(t, -0.5, n - 0.5)  # never extrapolate beyond the image edge
    if clamp:
        t = np.clip(t, 0.0, n - 1.0)
    i0 = np.clip(np.floor(t).astype(np.intp), 0, n - 2)
    return i0, t - i0


def grid_weights(x: np.ndarray, y: np.ndarray, image_shape: tuple[int, int],
                 grid_shape: tuple[int, int], *, clamp: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear interpolation weights of grid nodes at positions ``(x, y)``.

    Nodes sit at the centres of an even ``gy x gx`` division of the image; beyond the
    outermost centres the interpolation is extrapolated linearly up to the image edges
    (clamped to the outermost values with ``clamp``).

    Parameters
    ----------
    x, y : ndarray
        Positions (pixels).
    image_shape : (ny, nx)
        Image size (pixels).
    grid_shape : (gy, gx)
        Number of nodes along y and x.
    clamp : bool
        Clamp instead of extrapolating.

    Returns
    -------
    index : ndarray, int, shape (N, 4)
        Flat node indices (``iy * gx + ix``).
    weight : ndarray, shape (N, 4)
        Weights (sum to one).
    """
    ny, nx = image_shape
    gy, gx = grid_shape
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    tx = (x + 0.5) * gx / nx - 0.5
    ty = (y + 0.5) * gy / ny - 0.5
    ix, fx = _grid_axis(tx, gx, clamp)
    iy, fy = _grid_axis(ty, gy, clamp)
    ix1 = np.minimum(ix + 1, gx - 1)
    iy1 = np.minimum(iy + 1, gy - 1)
    index = np.stack([iy * gx + ix, iy * gx + ix1, iy1 * gx + ix, iy1 * gx + ix1], axis=1)
    weight = np.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], axis=1)
    return index, weight


def grid_order_for_stars(n_stars: int) -> int:
    """Largest PSF grid size (nodes per axis) that ``n_stars`` PSF stars support.

    The IPP's rule (``pmPSFtryModel``): 3 stars for a constant model, 16 for 2x2, 54 for 3x3,
    128 for 4x4, 300 for 5x5 and more than 576 for 6x6.

    Parameters
    ----------
    n_stars : int
        Number of usable PSF stars.

    Returns
    -------
    int
        Grid size (0 if fewer than 3 stars).
    """
    if n_stars < 3:
        return 0
    order = 1
    for need, o in ((16, 2), (54, 3), (128, 4), (300, 5)):
        if n_stars >= need:
            order = o
    if n_stars > 576:
        order = 6
    return order


def _hat_weights(u: np.ndarray, n: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Linear-interpolation weights of table samples ``0..n-1`` at coordinates ``u`` (zero
    beyond the table) and their derivatives with respect to ``u`` (the right derivative at
    the samples, as floor-based interpolation gives).  Shapes ``u.shape + (n,)``."""
    t = np.asarray(u, dtype=dtype)[..., None] - np.arange(n, dtype=dtype)
    right = (t >= 0) & (t < 1)
    left = (t >= -1) & (t < 0)
    w = np.where(right, 1 - t, np.where(left, 1 + t, 0)).astype(dtype, copy=False)
    g = (left.astype(dtype) - right.astype(dtype))
    return w, g


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

@dataclass
class PSFModel:
    """A PS1_V1 PSF varying over an image: node grids of the shape, an optional residual
    table, normalisation radius and aperture correction.

    Parameters
    ----------
    image_shape : (ny, nx)
        Size of the image the model describes (pixels).
    sigma_x, sigma_y : ndarray, shape (gy, gx)
        psphot ``sx``, ``sy`` at the grid nodes (pixels).
    sxy : ndarray, shape (gy, gx)
        psphot ``sxy`` at the nodes (pixels**-2).
    k : ndarray, shape (gy, gx)
        Linear term at the nodes.
    norm_radius : float
        Radius (pixels) of the circle whose area defines the normalisation contour.
    residual : ndarray or None, shape (2R+1, 2R+1)
        Pixel residual table (fraction of the flux per pixel, centred on the source), or None.
    ap_corr : float
        Multiplicative aperture correction: true flux within the reference radius divided by
        the fitted PSF flux, measured on the PSF stars.
    ap_corr_err : float
        Statistical error of ``ap_corr``.
    ap_sys_err : float
        Star-to-star systematic scatter of aperture minus PSF magnitude beyond the noise (mag).
    aperture_radius : float
        Radius of the aperture used for ``ap_corr`` (pixels); NaN if not measured.
    n_psf_stars : int
        Number of PSF stars that made the model.
    psf_star_index : ndarray of int
        Indices (into the positions given to :func:`fit_psf_model`) of those stars.
    chi2_dof : float
        Median reduced chi-square of the PSF stars under the final model.
    residual_gain : float
        Cross-validated fractional chi-square reduction the residual table gave (NaN if not
        tried).
    model : str
        Analytic family, a key of :data:`MODEL_ALPHA` (``"PS1_V1"`` or ``"QGAUSS"``).
    model_chi2 : dict
        Chi-square of the free fits of the model-selection stars under each family tried
        (empty when only one was tried).
    """

    image_shape: tuple[int, int]
    sigma_x: np.ndarray
    sigma_y: np.ndarray
    sxy: np.ndarray
    k: np.ndarray
    norm_radius: float = 25.0
    residual: np.ndarray | None = None
    ap_corr: float = 1.0
    ap_corr_err: float = 0.0
    ap_sys_err: float = 0.0
    aperture_radius: float = float("nan")
    n_psf_stars: int = 0
    psf_star_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    chi2_dof: float = float("nan")
    residual_gain: float = float("nan")
    model: str = "PS1_V1"
    model_chi2: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model not in MODEL_ALPHA:
            raise ValueError(f"PSFModel: unknown model family {self.model!r}; known: "
                             f"{sorted(MODEL_ALPHA)}")
        self.model_chi2 = {str(a): float(b) for a, b in dict(self.model_chi2).items()}
        ny, nx = (int(v) for v in self.image_shape)
        if ny <= 0 or nx <= 0:
            raise ValueError(f"PSFModel: image_shape must be positive, got {self.image_shape}")
        self.image_shape = (ny, nx)
        arrs = [np.atleast_2d(np.asarray(a, dtype=np.float64))
                for a in (self.sigma_x, self.sigma_y, self.sxy, self.k)]
        if len({a.shape for a in arrs}) != 1:
            raise ValueError("PSFModel: sigma_x, sigma_y, sxy and k grids must have one shape, "
                             f"got {[a.shape for a in arrs]}")
        if not all(np.all(np.isfinite(a)) for a in arrs):
            raise ValueError("PSFModel: node parameters must be finite")
        self.sigma_x, self.sigma_y, self.sxy, self.k = arrs
        self._mxx, self._myy, self._mxy = shape_matrix(self.sigma_x, self.sigma_y, self.sxy)
        if np.any(self.k < K_LIMITS[0]) or np.any(self.k > K_LIMITS[1]):
            raise ValueError(f"PSFModel: k outside {K_LIMITS}: {self.k.min()}..{self.k.max()}")
        if not self.norm_radius > 0:
            raise ValueError(f"PSFModel: norm_radius must be positive, got {self.norm_radius}")
        if self.residual is not None:
            r = np.asarray(self.residual, dtype=np.float64)
            if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] % 2 != 1:
                raise ValueError(f"PSFModel: residual must be square and odd, got {r.shape}")
            self.residual = r
        self.psf_star_index = np.asarray(self.psf_star_index, dtype=np.int64)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def constant(cls, image_shape: tuple[int, int], *, sigma_x: float, sigma_y: float,
                 sxy: float = 0.0, k: float = 0.5, norm_radius: float = 25.0,
                 **kw) -> "PSFModel":
        """A PSF constant over the image (a 1x1 grid).

        Parameters
        ----------
        image_shape : (ny, nx)
            Image size (pixels).
        sigma_x, sigma_y : float
            psphot ``sx``, ``sy`` (pixels).
        sxy : float
            Cross term (pixels**-2).
        k : float
            Linear term.
        norm_radius : float
            Normalisation radius (pixels).
        **kw
            Further :class:`PSFModel` fields.
        """
        one = np.ones((1, 1))
        return cls(image_shape, sigma_x * one, sigma_y * one, sxy * one, k * one,
                   norm_radius=norm_radius, **kw)

    @classmethod
    def from_axes(cls, image_shape: tuple[int, int], *, sigma_major: np.ndarray | float,
                  sigma_minor: np.ndarray | float, theta: np.ndarray | float,
                  k: np.ndarray | float = 0.5, norm_radius: float = 25.0, **kw) -> "PSFModel":
        """A model from node grids of axes: scales along the major/minor axis (pixels; square
        roots of the eigenvalues of the shape matrix) and position angle ``theta`` (degrees
        counter-clockwise from +x).  Scalars give a constant model."""
        smaj, smin, th, kk = np.broadcast_arrays(*(np.atleast_2d(np.asarray(v, dtype=float))
                                                   for v in (sigma_major, sigma_minor, theta, k)))
        t = np.radians(th)
        c, s = np.cos(t), np.sin(t)
        mxx = smaj ** 2 * c * c + smin ** 2 * s * s
        myy = smaj ** 2 * s * s + smin ** 2 * c * c
        mxy = (smaj ** 2 - smin ** 2) * s * c
        sx, sy, sxy = shape_params(mxx, myy, mxy)
        return cls(image_shape, sx, sy, sxy, kk.copy(), norm_radius=norm_radius, **kw)

    # -- properties -------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        """Power-law index of the model family (dimensionless)."""
        return MODEL_ALPHA[self.model]

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Number of nodes ``(gy, gx)``."""
        return self.sigma_x.shape  # type: ignore[return-value]

    @property
    def residual_radius(self) -> int:
        """Half-size of the residual table (pixels), 0 without one."""
        return 0 if self.residual is None else self.residual.shape[0] // 2

    @property
    def fwhm_max(self) -> float:
        """Largest major-axis FWHM over the grid nodes (pixels)."""
        a, _, _ = _axes(self._mxx, self._myy, self._mxy)
        return float(np.max(2.0 * a * np.sqrt(2.0 * ps1v1_half_max_z(self.k,
                                                                      alpha=self.alpha))))

    # -- evaluation -------------------------------------------------------------------------
    def moments_at(self, x: np.ndarray | float, y: np.ndarray | float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Interpolated shape matrix and linear term at positions.

        Parameters
        ----------
        x, y : array_like
            Positions (pixels).

        Returns
        -------
        (Mxx, Myy, Mxy, k) : tuple of ndarray
            Shape matrix (pixels squared) and linear term, shape of the broadcast inputs.
        """
        x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64),
                                   np.asarray(y, dtype=np.float64))
        shp = x.shape
        nodes = np.stack([self._mxx.ravel(), self._myy.ravel(), self._mxy.ravel(),
                          self.k.ravel()], axis=1)
        idx, w = grid_weights(x, y, self.image_shape, self.grid_shape)
        v = np.einsum("nj,njp->np", w, nodes[idx])
        mxx, myy, mxy, kk = v.T
        bad = ~((mxx > 0) & (myy > 0) & (mxx * myy - mxy * mxy > 1e-6 * mxx * myy))
        if np.any(bad):  # extrapolation broke positivity: fall back to clamped values
            idx, w = grid_weights(x.ravel()[bad], y.ravel()[bad], self.image_shape,
                                  self.grid_shape, clamp=True)
            vb = np.einsum("nj,njp->np", w, nodes[idx])
            mxx[bad], myy[bad], mxy[bad], kk[bad] = vb.T
        kk = np.clip(kk, *K_LIMITS)
        return (mxx.reshape(shp), myy.reshape(shp), mxy.reshape(shp), kk.reshape(shp))

    def params_at(self, x: np.ndarray | float, y: np.ndarray | float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """psphot's shape parameters at positions.

        Parameters
        ----------
        x, y : array_like
            Positions (pixels).

        Returns
        -------
        (sigma_x, sigma_y, sxy, k) : tuple of ndarray
            ``sx``, ``sy`` (pixels), ``sxy`` (pixels**-2) and ``k``.
        """
        mxx, myy, mxy, kk = self.moments_at(x, y)
        sx, sy, sxy = shape_params(mxx, myy, mxy)
        return sx, sy, sxy, kk

    def source_params(self, x: np.ndarray | float, y: np.ndarray | float) -> PSFParams:
        """Profile parameters (including the unit-flux normalisation) at positions; the input
        of :meth:`render`.

        Parameters
        ----------
        x, y : array_like
            Positions (pixels).

        Returns
        -------
        PSFParams
        """
        mxx, myy, mxy, kk = self.moments_at(x, y)
        p = _params_from_moments(mxx, myy, mxy, kk, self.norm_radius, self.alpha)
        if self.residual is not None:
            p = p._replace(norm=p.norm / (1.0 + float(self.residual.sum())))
        return p

    def render(self, dx: np.ndarray, dy: np.ndarray, params: PSFParams, *,
               derivatives: bool = False
               ) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unit-flux PSF at pixel offsets ``(dx, dy)`` from source centres.

        Parameters
        ----------
        dx, dy : ndarray
            Pixel-centre coordinates minus source centre (pixels), broadcastable with the
            arrays of ``params``.
        params : PSFParams
            From :meth:`source_params` (expanded to broadcast against ``dx``).
        derivatives : bool
            Also return ``dP/dx0`` and ``dP/dy0`` (derivatives with respect to the centre).

        Returns
        -------
        P : ndarray
            PSF value per pixel (fraction of the flux).
        dP/dx0, dP/dy0 : ndarray
            With ``derivatives``.
        """
        res = self.residual
        if res is None:
            return ps1v1_profile(dx, dy, params, derivatives=derivatives)
        scale = 1.0 / (1.0 + float(res.sum()))
        out = ps1v1_profile(dx, dy, params, derivatives=derivatives)
        r = self._residual_at(dx, dy, derivatives)
        if not derivatives:
            return out + scale * r
        return out[0] + scale * r[0], out[1] + scale * r[1], out[2] + scale * r[2]

    def _residual_at(self, dx: np.ndarray, dy: np.ndarray, derivatives: bool):
        res = self.residual
        assert res is not None
        rr = res.shape[0] // 2
        n = res.shape[0]
        dx = np.asarray(dx)
        dy = np.asarray(dy)
        if dx.ndim >= 2 and dy.ndim >= 2 and dx.shape[-2] == 1 and dy.shape[-1] == 1:
            # offsets on a grid (x along the last axis, y along the one before): bilinear
            # interpolation is separable, val = Wy T Wx^T with the 1-D interpolation weights
            dt = np.float32 if (dx.dtype == np.float32 and dy.dtype == np.float32) \
                else np.float64
            tab = res.astype(dt)
            wx, gx = _hat_weights(dx[..., 0, :] + rr, n, dt)          # (..., W, n)
            wy, gy = _hat_weights(dy[..., :, 0] + rr, n, dt)          # (..., H, n)
            wyt = wy @ tab                                            # (..., H, n)
            wxt = np.swapaxes(wx, -1, -2)
            val = wyt @ wxt
            if not derivatives:
                return val
            ddx = wyt @ np.swapaxes(gx, -1, -2)
            ddy = (gy @ tab) @ wxt
            return val, -ddx, -ddy
        pad = np.zeros((n + 2, n + 2))
        pad[1:-1, 1:-1] = res
        u = np.asarray(dx, dtype=np.float64) + rr + 1.0
        v = np.asarray(dy, dtype=np.float64) + rr + 1.0
        u, v = np.broadcast_arrays(u, v)
        inside = (u >= 0) & (u < n + 1) & (v >= 0) & (v < n + 1)
        i0 = np.clip(np.floor(u).astype(np.intp), 0, n)
        j0 = np.clip(np.floor(v).astype(np.intp), 0, n)
        fx = np.where(inside, u - i0, 0.0)
        fy = np.where(inside, v - j0, 0.0)
        t00 = pad[j0, i0]
        t01 = pad[j0, i0 + 1]
        t10 = pad[j0 + 1, i0]
        t11 = pad[j0 + 1, i0 + 1]
        val = (1 - fy) * ((1 - fx) * t00 + fx * t01) + fy * ((1 - fx) * t10 + fx * t11)
        val = np.where(inside, val, 0.0)
        if not derivatives:
            return val
        ddx = np.where(inside, (1 - fy) * (t01 - t00) + fy * (t11 - t10), 0.0)
        ddy = np.where(inside, (1 - fx) * (t10 - t00) + fx * (t11 - t01), 0.0)
        return val, -ddx, -ddy

    @staticmethod
    def stamp_origin(x: np.ndarray | float, y: np.ndarray | float, size: int
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Image pixel of stamp element ``[0, 0]`` for :meth:`evaluate` stamps: ``(round(x) -
        size//2, round(y) - size//2)``."""
        half = size // 2
        return (np.rint(np.asarray(x)).astype(np.int64) - half,
                np.rint(np.asarray(y)).astype(np.int64) - half)

    def default_size(self) -> int:
        """Default stamp size: odd, covering 3 FWHM on each side of the centre (pixels)."""
        return 2 * int(math.ceil(3.0 * self.fwhm_max)) + 1

    def evaluate(self, x: np.ndarray | float, y: np.ndarray | float, *,
                 size: int | None = None, derivatives: bool = False
                 ) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unit-flux PSF stamps centred (to the sub-pixel) on positions.

        Stamp element ``[n, j, i]`` is the PSF of source ``n`` at image pixel
        ``(ix0 + i, iy0 + j)`` with ``(ix0, iy0) = stamp_origin(x, y, size)``, i.e. the centre
        element ``[size//2, size//2]`` is the pixel nearest to ``(x, y)``.

        Parameters
        ----------
        x, y : array_like
            Source positions (pixels); scalars give one stamp.
        size : int, optional
            Odd stamp size (pixels); default :meth:`default_size`.
        derivatives : bool
            Also return the derivative stamps with respect to the source centre.

        Returns
        -------
        stamps : ndarray, shape (N, size, size)
            Fraction of the flux per pixel (unit flux within the normalisation contour).
        dP/dx0, dP/dy0 : ndarray, shape (N, size, size)
            With ``derivatives`` (per pixel).
        """
        size = self.default_size() if size is None else int(size)
        if size < 1 or size % 2 != 1:
            raise ValueError(f"PSFModel.evaluate: size must be a positive odd integer, got {size}")
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        if x.shape != y.shape or x.ndim != 1:
            raise ValueError("PSFModel.evaluate: x and y must be scalars or 1-D arrays of one "
                             f"length, got {x.shape} and {y.shape}")
        ix0, iy0 = self.stamp_origin(x, y, size)
        g = np.arange(size, dtype=np.float64)
        dx = (ix0[:, None, None] + g[None, None, :]) - x[:, None, None]
        dy = (iy0[:, None, None] + g[None, :, None]) - y[:, None, None]
        p = self.source_params(x, y).expand(2)
        return self.render(dx, dy, p, derivatives=derivatives)

    def shape_at(self, x: np.ndarray | float, y: np.ndarray | float) -> PSFShape:
        """FWHM along the major and minor axes and position angle at positions.

        Parameters
        ----------
        x, y : array_like
            Positions (pixels).

        Returns
        -------
        PSFShape
            ``fwhm_major``, ``fwhm_minor`` (pixels) and ``theta`` (degrees) of the analytic
            part of the model.
        """
        mxx, myy, mxy, kk = self.moments_at(x, y)
        a, b, th = _axes(mxx, myy, mxy)
        scale = 2.0 * np.sqrt(2.0 * ps1v1_half_max_z(kk, alpha=self.alpha))
        theta = np.degrees(th)
        theta = np.where(theta <= -90.0, theta + 180.0, theta)
        return PSFShape(scale * a, scale * b, theta)

    def aperture_fraction(self, x: np.ndarray | float, y: np.ndarray | float,
                          radius: float) -> np.ndarray:
        """Fraction of the (unit) flux in the pixels whose centres lie within ``radius`` of
        the source centre: the model's curve of growth sampled like an aperture.

        Parameters
        ----------
        x, y : array_like
            Source positions (pixels).
        radius : float
            Aperture radius (pixels).

        Returns
        -------
        ndarray
            Enclosed fraction per source.
        """
        size = 2 * int(math.ceil(radius)) + 3
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        st = self.evaluate(x, y, size=size)
        ix0, iy0 = self.stamp_origin(x, y, size)
        g = np.arange(size, dtype=np.float64)
        dx = (ix0[:, None, None] + g[None, None, :]) - x[:, None, None]
        dy = (iy0[:, None, None] + g[None, :, None]) - y[:, None, None]
        return np.sum(np.where(dx * dx + dy * dy <= radius * radius, st, 0.0), axis=(1, 2))

    # -- FITS -------------------------------------------------------------------------------
    def to_hdulist(self) -> fits.HDUList:
        """The model as FITS HDUs.

        Layout: a primary header (``PSFMODEL`` = ``'PS1_V1'`` or ``'QGAUSS'``, ``PSFALPHA``,
        image and grid size, ``NORMRAD``, aperture correction
        ``APCORR``/``APCORERR``/``APSYSERR``/``APRADIUS``, ``NPSFSTAR``, ``PSFCHI2``,
        ``RESIDGN``, the FWHM/angle at the image centre, and per family tried ``MODNAMi`` /
        ``MODCHIi``, the chi-square of the model-selection fits); a
        binary table ``PSF_GRID`` with one row per node (``IX``, ``IY``, node position ``X``,
        ``Y`` in pixels, ``SIGMA_X``, ``SIGMA_Y`` (pixels), ``SXY`` (pixels**-2), ``K``, and
        for readers ``FWHM_MAJ``, ``FWHM_MIN`` (pixels), ``THETA`` (degrees)); a binary table
        ``PSF_STARS`` with the indices of the PSF stars; and, if present, an image
        ``PSF_RESID`` with the residual table (fraction of the flux per pixel, centred).

        Returns
        -------
        astropy.io.fits.HDUList
        """
        ny, nx = self.image_shape
        gy, gx = self.grid_shape
        hdr = fits.Header()
        hdr["PSFMODEL"] = (self.model, "f = I0 / (1 + k z + z^PSFALPHA)")
        hdr["PSFVERS"] = (_FORMAT_VERSION, "ps1mpi PSF file layout version")
        hdr["PSFALPHA"] = (self.alpha, "power-law index in z")
        hdr["IMNAXIS1"] = (nx, "image width the model describes (pixels)")
        hdr["IMNAXIS2"] = (ny, "image height (pixels)")
        hdr["GRIDNX"] = (gx, "PSF parameter grid nodes along x")
        hdr["GRIDNY"] = (gy, "PSF parameter grid nodes along y")
        hdr["NORMRAD"] = (self.norm_radius, "unit flux within equal-area ellipse (pixels)")
        hdr["APCORR"] = (self.ap_corr, "aperture correction: true / PSF flux")
        hdr["APCORERR"] = (self.ap_corr_err, "statistical error of APCORR")
        hdr["APSYSERR"] = (self.ap_sys_err, "systematic ap-PSF scatter (mag)")
        hdr["APRADIUS"] = (self.aperture_radius if np.isfinite(self.aperture_radius) else -1.0,
                           "APCORR aperture radius (pixels), -1: none")
        hdr["NPSFSTAR"] = (self.n_psf_stars, "number of PSF stars")
        hdr["PSFCHI2"] = (self.chi2_dof if np.isfinite(self.chi2_dof) else -1.0,
                          "median reduced chi2 of PSF stars, -1 if none")
        hdr["RESIDGN"] = (self.residual_gain if np.isfinite(self.residual_gain) else -1.0,
                          "CV chi2 gain of residual table, -1 if not tried")
        hdr["RESID"] = (self.residual is not None, "pixel residual table present")
        shp = self.shape_at((nx - 1) / 2.0, (ny - 1) / 2.0)
        hdr["FWHM_MAJ"] = (float(shp.fwhm_major), "FWHM major axis at centre (pixels)")
        hdr["FWHM_MIN"] = (float(shp.fwhm_minor), "FWHM minor axis at centre (pixels)")
        hdr["FWHM_ANG"] = (float(shp.theta), "major axis angle at centre (deg)")
        for i, (name, chi2) in enumerate(self.model_chi2.items(), start=1):
            hdr[f"MODNAM{i}"] = (name, "model family tried")
            hdr[f"MODCHI{i}"] = (chi2 if np.isfinite(chi2) else -1.0,
                                 "its chi2 on the model-selection stars")
        primary = fits.PrimaryHDU(header=hdr)

        iy, ix = np.mgrid[0:gy, 0:gx]
        xn = (ix + 0.5) * nx / gx - 0.5
        yn = (iy + 0.5) * ny / gy - 0.5
        a, b, th = _axes(self._mxx, self._myy, self._mxy)
        sc = 2.0 * np.sqrt(2.0 * ps1v1_half_max_z(self.k))
        cols = [
            fits.Column("IX", "J", array=ix.ravel()),
            fits.Column("IY", "J", array=iy.ravel()),
            fits.Column("X", "D", unit="pix", array=xn.ravel()),
            fits.Column("Y", "D", unit="pix", array=yn.ravel()),
            fits.Column("SIGMA_X", "D", unit="pix", array=self.sigma_x.ravel()),
            fits.Column("SIGMA_Y", "D", unit="pix", array=self.sigma_y.ravel()),
            fits.Column("SXY", "D", unit="pix-2", array=self.sxy.ravel()),
            fits.Column("K", "D", array=self.k.ravel()),
            fits.Column("FWHM_MAJ", "D", unit="pix", array=(sc * a).ravel()),
            fits.Column("FWHM_MIN", "D", unit="pix", array=(sc * b).ravel()),
            fits.Column("THETA", "D", unit="deg", array=np.degrees(th).ravel()),
        ]
        grid = fits.BinTableHDU.from_columns(cols, name="PSF_GRID")
        stars = fits.BinTableHDU.from_columns(
            [fits.Column("INDEX", "K", array=self.psf_star_index)], name="PSF_STARS")
        hdus = [primary, grid, stars]
        if self.residual is not None:
            hdus.append(fits.ImageHDU(self.residual.astype(np.float64), name="PSF_RESID"))
        return fits.HDUList(hdus)

    @classmethod
    def from_hdulist(cls, hdul: fits.HDUList) -> "PSFModel":
        """Read a model written by :meth:`to_hdulist`.

        Parameters
        ----------
        hdul : astropy.io.fits.HDUList

        Returns
        -------
        PSFModel

        Raises
        ------
        ValueError
            If the HDUs are not a PSF model of a known family and layout.
        """
        hdr = hdul[0].header
        model = hdr.get("PSFMODEL")
        if model not in MODEL_ALPHA:
            raise ValueError(f"PSF HDU list: PSFMODEL is {model!r}, not one of "
                             f"{sorted(MODEL_ALPHA)}")
        if abs(float(hdr.get("PSFALPHA", MODEL_ALPHA[model])) - MODEL_ALPHA[model]) > 1e-6:
            raise ValueError(f"PSF HDU list: PSFALPHA {hdr.get('PSFALPHA')} does not match "
                             f"the {model} index {MODEL_ALPHA[model]}")
        if int(hdr.get("PSFVERS", -1)) != _FORMAT_VERSION:
            raise ValueError(f"PSF HDU list: unknown PSFVERS {hdr.get('PSFVERS')}")
        if "PSF_GRID" not in hdul:
            raise ValueError("PSF HDU list: no PSF_GRID extension")
        gx, gy = int(hdr["GRIDNX"]), int(hdr["GRIDNY"])
        tab = hdul["PSF_GRID"].data
        if len(tab) != gx * gy:
            raise ValueError(f"PSF HDU list: PSF_GRID has {len(tab)} rows, expected {gx * gy}")
        order = np.lexsort((np.asarray(tab["IX"]), np.asarray(tab["IY"])))

        def col(name: str) -> np.ndarray:
            return np.asarray(tab[name], dtype=np.float64)[order].reshape(gy, gx)

        residual = None
        if "PSF_RESID" in hdul:
            residual = np.asarray(hdul["PSF_RESID"].data, dtype=np.float64)
        idx = np.zeros(0, dtype=np.int64)
        if "PSF_STARS" in hdul:
            idx = np.asarray(hdul["PSF_STARS"].data["INDEX"], dtype=np.int64)
        aprad = float(hdr.get("APRADIUS", -1.0))
        chi2 = float(hdr.get("PSFCHI2", -1.0))
        rgain = float(hdr.get("RESIDGN", -1.0))
        tried = {}
        i = 1
        while f"MODNAM{i}" in hdr:
            c2 = float(hdr.get(f"MODCHI{i}", -1.0))
            tried[str(hdr[f"MODNAM{i}"])] = c2 if c2 >= 0 else float("nan")
            i += 1
        return cls((int(hdr["IMNAXIS2"]), int(hdr["IMNAXIS1"])), col("SIGMA_X"),
                   col("SIGMA_Y"), col("SXY"), col("K"), norm_radius=float(hdr["NORMRAD"]),
                   residual=residual, ap_corr=float(hdr["APCORR"]),
                   ap_corr_err=float(hdr["APCORERR"]), ap_sys_err=float(hdr["APSYSERR"]),
                   aperture_radius=aprad if aprad > 0 else float("nan"),
                   n_psf_stars=int(hdr["NPSFSTAR"]), psf_star_index=idx,
                   chi2_dof=chi2 if chi2 >= 0 else float("nan"),
                   residual_gain=rgain if rgain != -1.0 else float("nan"), model=model,
                   model_chi2=tried)

    def to_fits(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write :meth:`to_hdulist` to a FITS file.

        Parameters
        ----------
        path : str or Path
            Output file.
        overwrite : bool
            Replace an existing file.
        """
        self.to_hdulist().writeto(path, overwrite=overwrite)

    @classmethod
    def from_fits(cls, path: str | Path) -> "PSFModel":
        """Read a model from a FITS file written by :meth:`to_fits`.

        Parameters
        ----------
        path : str or Path
            Input file.

        Returns
        -------
        PSFModel
        """
        with fits.open(path) as hdul:
            return cls.from_hdulist(hdul)


# ---------------------------------------------------------------------------------------------
# Pixel access and moments
# ---------------------------------------------------------------------------------------------

def extract_boxes(arr: np.ndarray, ox: np.ndarray, oy: np.ndarray, height: int, width: int,
                  *, fill: float | int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rectangular boxes of an image, with out-of-image elements filled.

    Parameters
    ----------
    arr : ndarray, shape (ny, nx)
        Image.
    ox, oy : ndarray of int, shape (N,)
        Image pixel of box element ``[0, 0]``.
    height, width : int
        Box size (pixels).
    fill : scalar
        Value of elements outside the image.

    Returns
    -------
    boxes : ndarray, shape (N, height, width)
        Pixel values (dtype of ``arr``).
    inside : ndarray of bool, shape (N, height, width)
        True where the element lies in the image.
    """
    ny, nx = arr.shape
    ox = np.asarray(ox, dtype=np.int64)
    oy = np.asarray(oy, dtype=np.int64)
    n = ox.size
    full = (ox >= 0) & (oy >= 0) & (ox + width <= nx) & (oy + height <= ny)
    boxes = np.empty((n, height, width), dtype=arr.dtype)
    inside = np.ones((n, height, width), dtype=bool)
    if height <= ny and width <= nx and np.any(full):
        # boxes wholly inside: a gather from the sliding-window view (contiguous rows)
        view = np.lib.stride_tricks.sliding_window_view(arr, (height, width))
        boxes[full] = view[oy[full], ox[full]]
    else:
        full[:] = False
    part = np.flatnonzero(~full)
    if part.size:
        xi = ox[part, None] + np.arange(width)[None, :]
        yi = oy[part, None] + np.arange(height)[None, :]
        okx = (xi >= 0) & (xi < nx)
        oky = (yi >= 0) & (yi < ny)
        ins = oky[:, :, None] & okx[:, None, :]
        b = arr[np.clip(yi, 0, ny - 1)[:, :, None], np.clip(xi, 0, nx - 1)[:, None, :]]
        boxes[part] = np.where(ins, b, np.asarray(fill, dtype=arr.dtype))
        inside[part] = ins
    return boxes, inside


def adaptive_moments(stamps: np.ndarray, good: np.ndarray, xc: np.ndarray, yc: np.ndarray,
                     *, sigma0: float = 2.0, n_iter: int = 12
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                np.ndarray]:
    """Elliptical-Gaussian adaptive moments of stamps (vectorised over stamps).

    The weight is a Gaussian with covariance ``W``; at convergence the weighted second moments
    equal ``W / 2`` for a Gaussian source, so ``W <- 2 * moments`` is iterated from a round
    Gaussian of ``sigma0``.  The centre is refined too.

    Parameters
    ----------
    stamps : ndarray, shape (N, S, S)
        Background-subtracted pixel values.
    good : ndarray of bool, shape (N, S, S)
        Pixels to use.
    xc, yc : ndarray, shape (N,)
        Starting centres in stamp coordinates (pixels; element ``[j, i]`` is at ``(i, j)``).
    sigma0 : float
        Starting Gaussian sigma (pixels).
    n_iter : int
        Iterations.

    Returns
    -------
    mxx, myy, mxy : ndarray
        Adaptive second moments (pixels squared; Gaussian covariance for a Gaussian source).
    xc, yc : ndarray
        Refined centres (stamp coordinates).
    ok : ndarray of bool
        Converged to a finite, positive-definite result.
    """
    n, s, _ = stamps.shape
    if HAVE_NUMBA and n:
        d64 = np.ascontiguousarray(np.where(good, stamps, 0.0), dtype=np.float64)
        out = _adaptive_moments_nb(d64, np.asarray(xc, dtype=np.float64).copy(),
                                   np.asarray(yc, dtype=np.float64).copy(), float(sigma0),
                                   int(n_iter))
        mxx, myy, mxy, xo, yo, ok = out
        ok &= np.isfinite(mxx) & np.isfinite(myy) & (mxx * myy - mxy * mxy > 0)
        return mxx, myy, mxy, xo, yo, ok
    g = np.arange(s, dtype=np.float32)
    d = np.where(good, stamps, 0.0).astype(np.float32)
    wxx = np.full(n, sigma0 ** 2)
    wyy = np.full(n, sigma0 ** 2)
    wxy = np.zeros(n)
    xc = np.asarray(xc, dtype=np.float64).copy()
    yc = np.asarray(yc, dtype=np.float64).copy()
    ok = np.ones(n, dtype=bool)
    lim_hi = (s / 2.0) ** 2
    for _ in range(n_iter):
        det = wxx * wyy - wxy * wxy
        dx = g[None, None, :] - xc[:, None, None].astype(np.float32)
        dy = g[None, :, None] - yc[:, None, None].astype(np.float32)
        q = ((wyy / det)[:, None, None].astype(np.float32) * dx * dx
             + (wxx / det)[:, None, None].astype(np.float32) * dy * dy
             - (2.0 * wxy / det)[:, None, None].astype(np.float32) * dx * dy)
        wd = np.exp(-0.5 * q) * d
        wdx = wd * dx
        wdy = wd * dy
        f = wd.sum(axis=(1, 2), dtype=np.float64)
        okf = f > 0
        fs = np.where(okf, f, 1.0)
        mx = wdx.sum(axis=(1, 2), dtype=np.float64) / fs
        my = wdy.sum(axis=(1, 2), dtype=np.float64) / fs
        sxx = (wdx * dx).sum(axis=(1, 2), dtype=np.float64) / fs - mx * mx
        syy = (wdy * dy).sum(axis=(1, 2), dtype=np.float64) / fs - my * my
        sxy = (wdx * dy).sum(axis=(1, 2), dtype=np.float64) / fs - mx * my
        nxx, nyy, nxy = 2.0 * sxx, 2.0 * syy, 2.0 * sxy
        good_m = okf & (nxx > 0.05) & (nyy > 0.05) & (nxx * nyy - nxy * nxy > 1e-4) \
            & (nxx < lim_hi) & (nyy < lim_hi)
        ok &= good_m
        # damped update keeps the iteration stable for non-Gaussian profiles
        wxx = np.where(good_m, 0.5 * (wxx + nxx), wxx)
        wyy = np.where(good_m, 0.5 * (wyy + nyy), wyy)
        wxy = np.where(good_m, 0.5 * (wxy + nxy), wxy)
        step = np.clip(np.where(okf, mx, 0.0), -1.0, 1.0), np.clip(np.where(okf, my, 0.0), -1, 1)
        xc += step[0]
        yc += step[1]
    mxx, myy, mxy = 0.5 * wxx, 0.5 * wyy, 0.5 * wxy
    ok &= np.isfinite(mxx) & np.isfinite(myy) & (mxx * myy - mxy * mxy > 0)
    return mxx, myy, mxy, xc, yc, ok


def _validate_images(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, who: str
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = np.asarray(image)
    variance = np.asarray(variance)
    mask = np.asarray(mask)
    if image.ndim != 2:
        raise ValueError(f"{who}: image must be 2-D, got shape {image.shape}")
    if variance.shape != image.shape:
        raise ValueError(f"{who}: variance shape {variance.shape} differs from image "
                         f"{image.shape}")
    if mask.shape != image.shape:
        raise ValueError(f"{who}: mask shape {mask.shape} differs from image {image.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"{who}: mask must be an integer bit mask, got dtype {mask.dtype}")
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"{who}: image must be floating point, got dtype {image.dtype}")
    return image, variance, mask


def _validate_positions(x: np.ndarray, y: np.ndarray, who: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"{who}: x and y must be 1-D arrays of one length, got {x.shape} and "
                         f"{y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"{who}: x and y must be finite")
    return x, y


def weight_variance(var: np.ndarray, data: np.ndarray, model: np.ndarray | None,
                    gain: float | None, floor: np.ndarray | float) -> np.ndarray:
    """Variance used to weight a fit.

    Without ``gain`` the given variance is used as is.  With ``gain`` the variance is assumed
    to hold the Poisson term of the *data* (``signal / gain``, as the chip stage builds it) and
    that term is swapped for the model's: ``var - data/gain + max(model, 0)/gain``; weights
    then no longer correlate with the noise of the pixel, which removes the flux bias of
    data-derived weights.

    Parameters
    ----------
    var : ndarray
        Variance (image units squared).
    data : ndarray
        Background-subtracted data (image units).
    model : ndarray or None
        Current model of the data (image units); None gives the background variance only.
    gain : float or None
        Counts per image unit of the Poisson term (1 for images in electrons).
    floor : ndarray or float
        Lower bound of the result.

    Returns
    -------
    ndarray
        Variance for the weights.
    """
    if gain is None:
        return np.maximum(var, floor)
    v = var - data / gain
    v = np.maximum(v, floor)
    if model is not None:
        v = v + np.maximum(model, 0.0) / gain
    return v


# ---------------------------------------------------------------------------------------------
# Free-shape fits of PSF stars (stage 1)
# ---------------------------------------------------------------------------------------------

def _model_free(p: np.ndarray, dxg: np.ndarray, dyg: np.ndarray, derivatives: bool,
                alpha: float = ALPHA):
    """Power-law profile with free amplitude, centre and shape. p: (N, 7) [I0, x0, y0, qxx,
    qyy, qxy, k]; dxg/dyg: pixel coordinates (N, S, S). Returns model (N,S,S) [, J (N, 7,
    S*S)]."""
    i0, x0, y0, qxx, qyy, qxy, k = (p[:, i, None, None] for i in range(7))
    dx = dxg - x0
    dy = dyg - y0
    z = 0.5 * (qxx * dx * dx + qyy * dy * dy) + qxy * dx * dy
    np.maximum(z, 0.0, out=z)
    zp = z ** (alpha - 1.0)
    d = 1.0 + k * z + z * zp
    f = 1.0 / d
    m = i0 * f
    if not derivatives:
        return m
    fz = -(k + alpha * zp) * f * f          # df/dz
    a = i0 * fz
    n = p.shape[0]
    jac = np.empty((n, 7) + dx.shape[1:])
    jac[:, 0] = f
    jac[:, 1] = -a * (qxx * dx + qxy * dy)
    jac[:, 2] = -a * (qyy * dy + qxy * dx)
    jac[:, 3] = a * 0.5 * dx * dx
    jac[:, 4] = a * 0.5 * dy * dy
    jac[:, 5] = a * dx * dy
    jac[:, 6] = -i0 * z * f * f
    return m, jac.reshape(n, 7, -1)


def _valid_free(p: np.ndarray, box: float) -> np.ndarray:
    qxx, qyy, qxy, k = p[:, 3], p[:, 4], p[:, 5], p[:, 6]
    return (np.all(np.isfinite(p), axis=1) & (p[:, 0] > 0) & (qxx > 1.0 / box ** 2)
            & (qyy > 1.0 / box ** 2) & (qxx < 25.0) & (qyy < 25.0)
            & (qxx * qyy - qxy * qxy > 1e-3 * qxx * qyy)
            & (k >= K_LIMITS[0]) & (k <= K_LIMITS[1]))


def _fit_free_ps1v1(data: np.ndarray, var: np.ndarray, good: np.ndarray, xg: np.ndarray,
                    yg: np.ndarray, p0: np.ndarray, *, gain: float | None, max_iter: int,
                    box: float, floor: np.ndarray, alpha: float = ALPHA,
                    use_numba: bool | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Levenberg-Marquardt fit of the free power-law model (amplitude, centre, shape, ``k``)
    to each star's stamp.

    Two weight passes: the first with the background-only weights, the second with the
    weights of the first pass's model (see :func:`weight_variance`).  Compiled per star with
    numba when available (``use_numba`` None), else vectorised over stars with numpy; both
    run the same iteration.

    Returns params (N,7), covariance (N,7,7), chi2 (N,), npix (N,), ok (N,).
    """
    if use_numba is None:
        use_numba = HAVE_NUMBA
    if not use_numba or data.shape[0] == 0:
        return _fit_free_np(data, var, good, xg, yg, p0, gain=gain, max_iter=max_iter,
                            box=box, floor=floor, alpha=alpha)
    n = data.shape[0]
    ox = np.ascontiguousarray(np.asarray(xg)[:, 0, 0], dtype=np.float64)
    oy = np.ascontiguousarray(np.asarray(yg)[:, 0, 0], dtype=np.float64)
    p, cov, chi2, ok = _free_fit_nb(
        np.ascontiguousarray(data, dtype=np.float64), np.ascontiguousarray(var, np.float64),
        np.ascontiguousarray(good, dtype=np.bool_), ox, oy,
        np.ascontiguousarray(p0, dtype=np.float64),
        0.0 if gain is None else 1.0 / float(gain),
        np.ascontiguousarray(floor, dtype=np.float64), float(alpha), int(max_iter),
        float(box), float(K_LIMITS[0]), float(K_LIMITS[1]))
    npix = good.reshape(n, -1).sum(axis=1)
    return p, cov, chi2, npix, ok


def _fit_free_np(data: np.ndarray, var: np.ndarray, good: np.ndarray, xg: np.ndarray,
                 yg: np.ndarray, p0: np.ndarray, *, gain: float | None, max_iter: int,
                 box: float, floor: np.ndarray, alpha: float = ALPHA
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The numpy path of :func:`_fit_free_ps1v1`, vectorised over stars."""
    n = data.shape[0]
    p = p0.copy()
    ok = _valid_free(p, box)
    npix = good.reshape(n, -1).sum(axis=1)
    chi2 = np.full(n, np.inf)
    cov = np.full((n, 7, 7), np.nan)
    dflat = data.reshape(n, -1)
    for wpass in range(2):
        model_w = None if wpass == 0 else _model_free(p, xg, yg, False, alpha)
        vw = weight_variance(var, data, model_w, gain, floor[:, None, None])
        w = np.where(good, 1.0 / vw, 0.0).reshape(n, -1)
        lam = np.full(n, 1e-3)
        active = ok.copy()
        m, jac = _model_free(p, xg, yg, True, alpha)
        r = dflat - m.reshape(n, -1)
        chi2 = np.sum(w * r * r, axis=1)
        jw = jac * w[:, None, :]
        amat = jw @ jac.transpose(0, 2, 1)
        bvec = (jw @ r[..., None])[..., 0]
        for _ in range(max_iter):
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            a = amat[idx]
            diag = np.einsum("nii->ni", a)
            a_l = a + lam[idx, None, None] * diag[:, :, None] * np.eye(7)
            try:
                step = np.linalg.solve(a_l, bvec[idx][..., None])[..., 0]
            except np.linalg.LinAlgError:
                step = np.stack([np.linalg.lstsq(m_, b_, rcond=None)[0]
                                 for m_, b_ in zip(a_l, bvec[idx])])
            # keep centre steps modest
            sh = np.hypot(step[:, 1], step[:, 2])
            step *= np.minimum(1.0, 1.0 / np.maximum(sh, 1e-12))[:, None]
            trial = p[idx] + step
            valid = _valid_free(trial, box)
            mt, jt = _model_free(np.where(valid[:, None], trial, p[idx]), xg[idx], yg[idx], True,
                                 alpha)
            rt = dflat[idx] - mt.reshape(idx.size, -1)
            wi = w[idx]
            c2t = np.where(valid, np.sum(wi * rt * rt, axis=1), np.inf)
            better = c2t < chi2[idx]
            acc = idx[better]
            old = chi2[acc]
            p[acc] = trial[better]
            chi2[acc] = c2t[better]
            jwt = jt[better] * wi[better][:, None, :]
            amat[acc] = jwt @ jt[better].transpose(0, 2, 1)
            bvec[acc] = (jwt @ rt[better][..., None])[..., 0]
            lam[acc] = np.maximum(lam[acc] * 0.2, 1e-7)
            lam[idx[~better]] *= 10.0
            conv = (old - chi2[acc]) < 1e-6 * chi2[acc] + 1e-3
            active[acc[conv]] = False
            active[idx[~better][lam[idx[~better]] > 1e8]] = False
    try:
        cov = np.linalg.inv(amat)
    except np.linalg.LinAlgError:
        cov = np.stack([np.linalg.pinv(a) for a in amat])
    ok &= _valid_free(p, box) & np.all(np.isfinite(cov), axis=(1, 2)) & np.isfinite(chi2)
    return p, cov, chi2, npix, ok


# ---------------------------------------------------------------------------------------------
# Compiled kernels (numba)
# ---------------------------------------------------------------------------------------------

def _njit(fn):
    return _numba.njit(cache=True, nogil=True)(fn) if _numba is not None else fn


@_njit
def _spd_solve(a, rhs, out):  # pragma: no cover - compiled
    """Solve ``a out = rhs`` for a small symmetric positive-definite ``a`` (Cholesky after
    diagonal equilibration).  Returns False if ``a`` is not positive definite."""
    m = a.shape[0]
    d = np.empty(m)
    for i in range(m):
        if not a[i, i] > 0.0:
            return False
        d[i] = 1.0 / math.sqrt(a[i, i])
    low = np.zeros((m, m))
    for i in range(m):
        for j in range(i + 1):
            acc = a[i, j] * d[i] * d[j]
            for k in range(j):
                acc -= low[i, k] * low[j, k]
            if i == j:
                if not acc > 1e-14:
                    return False
                low[i, i] = math.sqrt(acc)
            else:
                low[i, j] = acc / low[j, j]
    y = np.empty(m)
    for i in range(m):
        acc = rhs[i] * d[i]
        for k in range(i):
            acc -= low[i, k] * y[k]
        y[i] = acc / low[i, i]
    for i in range(m - 1, -1, -1):
        acc = y[i]
        for k in range(i + 1, m):
            acc -= low[k, i] * y[k]
        y[i] = acc / low[i, i]
    for i in range(m):
        out[i] = y[i] * d[i]
    return True


@_njit
def _free_valid_nb(p, box, kmin, kmax):  # pragma: no cover - compiled
    for i in range(7):
        if not math.isfinite(p[i]):
            return False
    qxx, qyy, qxy, k = p[3], p[4], p[5], p[6]
    lim = 1.0 / (box * box)
    return (p[0] > 0.0 and qxx > lim and qyy > lim and qxx < 25.0 and qyy < 25.0
            and qxx * qyy - qxy * qxy > 1e-3 * qxx * qyy and k >= kmin and k <= kmax)


@_njit
def _free_normal_nb(d, w, ox, oy, p, alpha, amat, bvec):  # pragma: no cover - compiled
    """Chi-square of the free model ``p`` on one stamp, and its normal equations
    ``J^T W J`` (amat) and ``J^T W r`` (bvec)."""
    ny, nx = d.shape
    i0, x0, y0, qxx, qyy, qxy, k = p[0], p[1], p[2], p[3], p[4], p[5], p[6]
    am1 = alpha - 1.0
    amat[:, :] = 0.0
    bvec[:] = 0.0
    jac = np.empty(7)
    chi2 = 0.0
    for jy in range(ny):
        dy = oy + jy - y0
        for jx in range(nx):
            ww = w[jy, jx]
            if ww == 0.0:
                continue
            dx = ox + jx - x0
            z = 0.5 * (qxx * dx * dx + qyy * dy * dy) + qxy * dx * dy
            zp = 0.0
            if z > 0.0:
                zp = z ** am1
            else:
                z = 0.0
            f = 1.0 / (1.0 + k * z + z * zp)
            ff = f * f
            r = d[jy, jx] - i0 * f
            chi2 += ww * r * r
            a = -i0 * (k + alpha * zp) * ff
            jac[0] = f
            jac[1] = -a * (qxx * dx + qxy * dy)
            jac[2] = -a * (qyy * dy + qxy * dx)
            jac[3] = 0.5 * a * dx * dx
            jac[4] = 0.5 * a * dy * dy
            jac[5] = a * dx * dy
            jac[6] = -i0 * z * ff
            for u in range(7):
                t = ww * jac[u]
                bvec[u] += t * r
                for v in range(u + 1):
                    amat[u, v] += t * jac[v]
    for u in range(7):
        for v in range(u + 1, 7):
            amat[u, v] = amat[v, u]
    return chi2


@_njit
def _free_fit_nb(data, var, good, ox, oy, p0, inv_gain, floor, alpha, max_iter, box,
                 kmin, kmax):  # pragma: no cover - compiled
    """Per-star Levenberg-Marquardt of the free model: the iteration of :func:`_fit_free_np`
    (two weight passes, damping 1e-3 x0.2 / x10, centre steps capped at 1 pixel)."""
    n, ny, nx = data.shape
    p_all = p0.copy()
    cov = np.full((n, 7, 7), np.nan)
    chi2_all = np.full(n, np.inf)
    ok = np.zeros(n, dtype=np.bool_)
    w = np.empty((ny, nx))
    amat = np.empty((7, 7))
    bvec = np.empty(7)
    at = np.empty((7, 7))
    bt = np.empty(7)
    al = np.empty((7, 7))
    step = np.empty(7)
    trial = np.empty(7)
    col = np.empty(7)
    ecol = np.zeros(7)
    for s in range(n):
        p = p_all[s]
        valid0 = _free_valid_nb(p, box, kmin, kmax)
        chi2 = np.inf
        for wpass in range(2):
            am1 = alpha - 1.0
            for jy in range(ny):
                dy = oy[s] + jy - p[2]
                for jx in range(nx):
                    if not good[s, jy, jx]:
                        w[jy, jx] = 0.0
                        continue
                    v = var[s, jy, jx]
                    if inv_gain > 0.0:
                        v -= data[s, jy, jx] * inv_gain
                    if v < floor[s]:
                        v = floor[s]
                    if wpass == 1 and inv_gain > 0.0:
                        dx = ox[s] + jx - p[1]
                        z = 0.5 * (p[3] * dx * dx + p[4] * dy * dy) + p[5] * dx * dy
                        zp = 0.0
                        if z > 0.0:
                            zp = z ** am1
                        else:
                            z = 0.0
                        mdl = p[0] / (1.0 + p[6] * z + z * zp)
                        if mdl > 0.0:
                            v += mdl * inv_gain
                    w[jy, jx] = 1.0 / v
            chi2 = _free_normal_nb(data[s], w, ox[s], oy[s], p, alpha, amat, bvec)
            if not valid0:
                continue
            lam = 1e-3
            for _ in range(max_iter):
                for u in range(7):
                    for v in range(7):
                        al[u, v] = amat[u, v]
                    al[u, u] = amat[u, u] * (1.0 + lam)
                if not _spd_solve(al, bvec, step):
                    lam *= 10.0
                    if lam > 1e8:
                        break
                    continue
                sh = math.sqrt(step[1] * step[1] + step[2] * step[2])
                if sh > 1.0:
                    for u in range(7):
                        step[u] /= sh
                for u in range(7):
                    trial[u] = p[u] + step[u]
                c2t = np.inf
                if _free_valid_nb(trial, box, kmin, kmax):
                    c2t = _free_normal_nb(data[s], w, ox[s], oy[s], trial, alpha, at, bt)
                if c2t < chi2:
                    old = chi2
                    chi2 = c2t
                    for u in range(7):
                        p[u] = trial[u]
                        bvec[u] = bt[u]
                        for v in range(7):
                            amat[u, v] = at[u, v]
                    lam = max(lam * 0.2, 1e-7)
                    if old - chi2 < 1e-6 * chi2 + 1e-3:
                        break
                else:
                    lam *= 10.0
                    if lam > 1e8:
                        break
        chi2_all[s] = chi2
        # covariance: inverse of the normal matrix at the solution (last pass's weights)
        inv_ok = True
        for u in range(7):
            ecol[:] = 0.0
            ecol[u] = 1.0
            if not _spd_solve(amat, ecol, col):
                inv_ok = False
                break
            for v in range(7):
                cov[s, v, u] = col[v]
        if not inv_ok:
            cov[s, :, :] = np.nan
        ok[s] = (_free_valid_nb(p, box, kmin, kmax) and inv_ok and math.isfinite(chi2))
    return p_all, cov, chi2_all, ok


@_njit
def _adaptive_moments_nb(d, xc, yc, sigma0, n_iter):  # pragma: no cover - compiled
    """The iteration of :func:`adaptive_moments` per stamp (double precision; pixels whose
    weight is below exp(-20) are skipped)."""
    n, s, _ = d.shape
    mxx = np.empty(n)
    myy = np.empty(n)
    mxy = np.empty(n)
    ok = np.ones(n, dtype=np.bool_)
    lim_hi = (s / 2.0) ** 2
    for t in range(n):
        wxx = sigma0 * sigma0
        wyy = sigma0 * sigma0
        wxy = 0.0
        for _ in range(n_iter):
            det = wxx * wyy - wxy * wxy
            axx = wyy / det
            ayy = wxx / det
            axy = 2.0 * wxy / det
            f = 0.0
            sx = 0.0
            sy = 0.0
            sxx = 0.0
            syy = 0.0
            sxy = 0.0
            for j in range(s):
                dy = j - yc[t]
                for i in range(s):
                    v = d[t, j, i]
                    if v == 0.0:
                        continue
                    dx = i - xc[t]
                    q = axx * dx * dx + ayy * dy * dy - axy * dx * dy
                    if q > 40.0:
                        continue
                    wd = math.exp(-0.5 * q) * v
                    f += wd
                    sx += wd * dx
                    sy += wd * dy
                    sxx += wd * dx * dx
                    syy += wd * dy * dy
                    sxy += wd * dx * dy
            okf = f > 0.0
            fs = f if okf else 1.0
            mx = sx / fs
            my = sy / fs
            nxx = 2.0 * (sxx / fs - mx * mx)
            nyy = 2.0 * (syy / fs - my * my)
            nxy = 2.0 * (sxy / fs - mx * my)
            good_m = (okf and nxx > 0.05 and nyy > 0.05 and nxx * nyy - nxy * nxy > 1e-4
                      and nxx < lim_hi and nyy < lim_hi)
            if not good_m:
                ok[t] = False
            else:
                wxx = 0.5 * (wxx + nxx)
                wyy = 0.5 * (wyy + nyy)
                wxy = 0.5 * (wxy + nxy)
            if okf:
                xc[t] += min(max(mx, -1.0), 1.0)
                yc[t] += min(max(my, -1.0), 1.0)
        mxx[t] = 0.5 * wxx
        myy[t] = 0.5 * wyy
        mxy[t] = 0.5 * wxy
    return mxx, myy, mxy, xc, yc, ok


def _moment_cov(p: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Convert fitted (qxx, qyy, qxy, k) and their covariance to (Mxx, Myy, Mxy, k)."""
    qxx, qyy, qxy, k = p[:, 3], p[:, 4], p[:, 5], p[:, 6]
    det = qxx * qyy - qxy * qxy
    sxx, syy, sxy = qyy / det, qxx / det, -qxy / det
    n = p.shape[0]
    t = np.zeros((n, 4, 4))
    t[:, 0, 0], t[:, 0, 1], t[:, 0, 2] = -sxx * sxx, -sxy * sxy, -2 * sxx * sxy
    t[:, 1, 0], t[:, 1, 1], t[:, 1, 2] = -sxy * sxy, -syy * syy, -2 * sxy * syy
    t[:, 2, 0], t[:, 2, 1], t[:, 2, 2] = -sxx * sxy, -sxy * syy, -(sxx * syy + sxy * sxy)
    t[:, 3, 3] = 1.0
    c = cov[:, 3:7, 3:7]
    vals = np.stack([sxx, syy, sxy, k], axis=1)
    return vals, t @ c @ t.transpose(0, 2, 1)


# ---------------------------------------------------------------------------------------------
# Grid fit of the shape parameters (stage 2)
# ---------------------------------------------------------------------------------------------

def _grid_design(x: np.ndarray, y: np.ndarray, image_shape: tuple[int, int],
                 grid: tuple[int, int]) -> np.ndarray:
    idx, w = grid_weights(x, y, image_shape, grid)
    g = grid[0] * grid[1]
    b = np.zeros((x.size, g))
    np.add.at(b, (np.repeat(np.arange(x.size), 4), idx.ravel()), w.ravel())
    return b


def _gls_grid(b: np.ndarray, vals: np.ndarray, wmat: np.ndarray, ridge: float,
              const_k: bool = False) -> np.ndarray:
    """Generalised least squares for node values: minimise sum_s r_s^T W_s r_s with
    r_s = vals_s - (B_s kron I4) nodes, plus a weak ridge pulling nodes to the constant
    solution (keeps nodes without stars determined).  With ``const_k`` the linear term is one
    value for the whole image (the shape matrix still varies on the grid): ``k`` and the size
    trade off star by star, and tying ``k`` removes that freedom from the nodes.  Returns
    nodes (G, 4)."""
    n, g = b.shape
    wsum = wmat.sum(axis=0)
    v0 = np.linalg.solve(wsum, np.einsum("sij,sj->i", wmat, vals))
    wv = np.einsum("sij,sj->si", wmat, vals)                           # (n, 4)
    wbar = ridge * wsum / max(n, 1)
    # normal equations of all (node, parameter) pairs: N[(G,p),(G,q)] = B^T diag(W_pq) B
    bw = b[:, :, None, None] * wmat[:, None, :, :]                    # (n, G, 4, 4)
    nmat = np.tensordot(b, bw, axes=(0, 0)).transpose(0, 2, 1, 3).reshape(g * 4, g * 4)
    rhs = (b.T @ wv).reshape(g * 4)
    nmat += np.kron(np.eye(g), wbar)
    rhs += np.tile(wbar @ v0, g)
    if const_k:
        # k_g = k for every node: project with the map T (free: G*3 shape values + 1 k)
        t = np.zeros((g * 4, g * 3 + 1))
        rows = np.arange(g * 4).reshape(g, 4)
        t[rows[:, :3].ravel(), np.arange(g * 3)] = 1.0
        t[rows[:, 3], g * 3] = 1.0
        nmat = t.T @ nmat @ t
        rhs = t.T @ rhs
    try:
        sol = np.linalg.solve(nmat, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(nmat, rhs, rcond=None)[0]
    if const_k:
        return np.column_stack([sol[:g * 3].reshape(g, 3), np.full(g, sol[-1])])
    return sol.reshape(g, 4)


def _chi2_4(res: np.ndarray, wmat: np.ndarray) -> np.ndarray:
    return np.einsum("si,sij,sj->s", res, wmat, res)


def _nodes_ok(nodes: np.ndarray) -> bool:
    mxx, myy, mxy, k = nodes.T
    return bool(np.all(np.isfinite(nodes)) and np.all(mxx > 0) and np.all(myy > 0)
                and np.all(mxx * myy - mxy * mxy > 1e-4 * mxx * myy)
                and np.all(k >= K_LIMITS[0]) and np.all(k <= K_LIMITS[1]))


def _fit_grid_robust(x: np.ndarray, y: np.ndarray, vals: np.ndarray, cov: np.ndarray,
                     image_shape: tuple[int, int], grid: tuple[int, int], clip_chi2: float,
                     ridge: float, const_k: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid fit with a systematic floor (so that the median chi2 per star matches 4 degrees
    of freedom) and clipping of outlying stars. Returns nodes, keep mask, effective W."""
    b = _grid_design(x, y, image_shape, grid)
    dfl = np.diag(np.median(np.einsum("sii->si", cov), axis=0))
    med4 = _stats.chi2.median(4)
    s2 = 0.0
    keep = np.ones(x.size, dtype=bool)
    nodes = None
    for _ in range(4):
        wmat = np.linalg.inv(cov + s2 * dfl)
        nodes = _gls_grid(b[keep], vals[keep], wmat[keep], ridge, const_k)
        res = vals - b @ nodes
        # systematic floor: find s2 with median chi2 == median of chi2(4 dof)
        c2 = _chi2_4(res[keep], wmat[keep])
        if np.median(c2) > med4:
            lo, hi = s2, max(1.0, s2 * 4)
            while np.median(_chi2_4(res[keep], np.linalg.inv(cov[keep] + hi * dfl))) > med4:
                hi *= 4.0
                if hi > 1e8:
                    break
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                if np.median(_chi2_4(res[keep], np.linalg.inv(cov[keep] + mid * dfl))) > med4:
                    lo = mid
                else:
                    hi = mid
            s2 = hi
            wmat = np.linalg.inv(cov + s2 * dfl)
        c2all = _chi2_4(res, wmat)
        new_keep = c2all < clip_chi2
        if new_keep.sum() < 3:
            break
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    wmat = np.linalg.inv(cov + s2 * dfl)
    nodes = _gls_grid(b[keep], vals[keep], wmat[keep], ridge, const_k)
    return nodes, keep, wmat


def _grid_for_order(order: int, image_shape: tuple[int, int]) -> tuple[int, int]:
    ny, nx = image_shape
    if nx >= ny:
        return max(1, int(order * ny / nx + 0.5)), order
    return order, max(1, int(order * nx / ny + 0.5))


def _select_grid(x: np.ndarray, y: np.ndarray, vals: np.ndarray, cov: np.ndarray,
                 image_shape: tuple[int, int], max_order: int, clip_chi2: float,
                 ridge: float, seed: int
                 ) -> tuple[tuple[int, int], bool, np.ndarray, np.ndarray, dict[str, float]]:
    """Choose the grid size, and whether ``k`` varies over it or is one value, by 5-fold
    cross-validation (one-standard-error rule: the simplest candidate, in number of free
    node values, whose held-out score is within one standard error of the best).

    All candidates are scored with one weight matrix and one star selection, those of the
    robust fit at the largest size (the smallest systematic floor), so that the scores
    compare.  Returns the grid, ``const_k``, nodes, the kept stars and the scores."""
    rng = np.random.default_rng(seed)
    folds = rng.permutation(x.size) % 5
    _, keep_ref, w_ref = _fit_grid_robust(x, y, vals, cov, image_shape,
                                          _grid_for_order(max_order, image_shape), clip_chi2,
                                          ridge)
    scores: dict[tuple[int, bool], tuple[float, float]] = {}
    cands = [(o, ck) for o in range(1, max_order + 1) for ck in ((False,) if o == 1
                                                                 else (True, False))]
    for order, const_k in cands:
        grid = _grid_for_order(order, image_shape)
        b = _grid_design(x, y, image_shape, grid)
        held = np.full(x.size, np.nan)
        for f in range(5):
            tr = keep_ref & (folds != f)
            te = keep_ref & (folds == f)
            if tr.sum() < 3 or te.sum() == 0:
                continue
            nd = _gls_grid(b[tr], vals[tr], w_ref[tr], ridge, const_k)
            res = vals[te] - b[te] @ nd
            held[te] = _chi2_4(res, w_ref[te])
        h = held[np.isfinite(held)]
        if h.size == 0:
            continue
        h = np.minimum(h, clip_chi2)  # robust: a single wild star must not decide
        scores[(order, const_k)] = (float(h.mean()), float(h.std(ddof=1) / math.sqrt(h.size))
                                    if h.size > 1 else 0.0)

    def n_free(c: tuple[int, bool]) -> int:
        gy, gx = _grid_for_order(c[0], image_shape)
        return gy * gx * 3 + 1 if c[1] else gy * gx * 4

    order_list = sorted(scores, key=lambda c: (n_free(c), c)) if scores else [(1, False)]
    if scores:
        best = min(scores, key=lambda c: scores[c][0])
        limit = scores[best][0] + scores[best][1]
        order_list = ([c for c in order_list if scores[c][0] <= limit]
                      + [c for c in order_list if scores[c][0] > limit])
    named = {f"{_grid_for_order(o, image_shape)[0]}x{_grid_for_order(o, image_shape)[1]}"
             + (" const k" if ck else ""): sc[0] for (o, ck), sc in scores.items()}
    for order, const_k in order_list:
        grid = _grid_for_order(order, image_shape)
        nodes, keep, _ = _fit_grid_robust(x, y, vals, cov, image_shape, grid, clip_chi2, ridge,
                                          const_k)
        if _nodes_ok(nodes):
            return grid, const_k, nodes, keep, named
    raise ValueError("fit_psf_model: no grid of PSF shape parameters is positive definite")


# ---------------------------------------------------------------------------------------------
# Residual table and aperture correction (stage 3)
# ---------------------------------------------------------------------------------------------

def _residual_samples(data: np.ndarray, good: np.ndarray, var: np.ndarray, model: np.ndarray,
                      flux: np.ndarray, x: np.ndarray, y: np.ndarray, ox: np.ndarray,
                      oy: np.ndarray, rr: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-star residuals (data - model)/flux resampled (bilinearly) at integer offsets
    -rr..rr from each star's centre. Returns values (N, 2rr+1, 2rr+1) and inverse variances
    (0 where any contributing pixel is bad)."""
    n, s, _ = data.shape
    r = (data - model) / flux[:, None, None]
    iv = np.where(good, flux[:, None, None] ** 2 / var, 0.0)
    u = x - ox  # star centre in box coordinates
    v = y - oy
    i0 = np.floor(u).astype(np.int64)
    j0 = np.floor(v).astype(np.int64)
    fx = (u - i0)[:, None, None]
    fy = (v - j0)[:, None, None]
    off = np.arange(-rr, rr + 1)
    ii = i0[:, None] + off[None, :]
    jj = j0[:, None] + off[None, :]
    ok_i = (ii >= 0) & (ii + 1 < s)
    ok_j = (jj >= 0) & (jj + 1 < s)
    ii = np.clip(ii, 0, s - 2)
    jj = np.clip(jj, 0, s - 2)
    nn = np.arange(n)[:, None, None]
    J = jj[:, :, None]
    I = ii[:, None, :]
    r00, r01, r10, r11 = r[nn, J, I], r[nn, J, I + 1], r[nn, J + 1, I], r[nn, J + 1, I + 1]
    val = (1 - fy) * ((1 - fx) * r00 + fx * r01) + fy * ((1 - fx) * r10 + fx * r11)
    w00, w01, w10, w11 = iv[nn, J, I], iv[nn, J, I + 1], iv[nn, J + 1, I], iv[nn, J + 1, I + 1]
    allgood = (w00 > 0) & (w01 > 0) & (w10 > 0) & (w11 > 0)
    # variance of the bilinear combination
    with np.errstate(divide="ignore"):
        varc = ((1 - fy) ** 2 * ((1 - fx) ** 2 / w00 + fx ** 2 / w01)
                + fy ** 2 * ((1 - fx) ** 2 / w10 + fx ** 2 / w11))
    inside = ok_j[:, :, None] & ok_i[:, None, :]
    wout = np.where(allgood & inside & np.isfinite(varc) & (varc > 0), 1.0 / varc, 0.0)
    return np.where(wout > 0, val, 0.0), wout


def _combine_residuals(val: np.ndarray, w: np.ndarray, nsigma: float = 3.0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Clipped inverse-variance weighted mean over stars. Returns table and its variance."""
    use = w > 0
    mean = np.zeros(val.shape[1:])
    for _ in range(3):
        ww = np.where(use, w, 0.0)
        sw = ww.sum(axis=0)
        mean = np.where(sw > 0, (ww * val).sum(axis=0) / np.where(sw > 0, sw, 1.0), 0.0)
        dev = (val - mean) * np.sqrt(w)
        new = (w > 0) & (np.abs(dev) < nsigma)
        if np.array_equal(new, use):
            break
        use = new
    ww = np.where(use, w, 0.0)
    sw = ww.sum(axis=0)
    return mean, np.where(sw > 0, 1.0 / np.where(sw > 0, sw, 1.0), np.inf)


def fit_psf_model(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, x: np.ndarray,
                  y: np.ndarray, *, flux: np.ndarray | None = None,
                  candidates: np.ndarray | None = None, max_stars: int = 2000,
                  min_snr: float = 20.0, max_grid: int = 6, fit_radius_fwhm: float = 3.0,
                  isolation_fwhm: float = 3.0, core_radius_fwhm: float = 1.0,
                  max_masked_fraction: float = 0.2, mask_bits: int = maskbits.BAD,
                  saturation_bits: int = maskbits.SAT | maskbits.BLEED | maskbits.STARCORE,
                  norm_radius: float = 25.0, residuals: bool | str = "auto",
                  residual_radius: int = 8, residual_min_gain: float = 0.005,
                  aperture_scale: float = 4.5, clip_nsigma: float = 3.0,
                  gain: float | None = None, max_iter: int = 40, seed: int = 0,
                  models: tuple[str, ...] | str = ("PS1_V1", "QGAUSS"),
                  model_select_stars: int = 300) -> PSFModel:
    """Fit a spatially varying PS1_V1 PSF model to the PSF stars of an image.

    Steps (after psphot's ``psphotChoosePSF`` / ``pmPSFtryModel``):

    1. candidates: the given positions inside the image, isolated (no other position within
       ``isolation_fwhm`` FWHM), with no saturated pixel in the fit radius, no masked pixel in
       the core and at most ``max_masked_fraction`` masked pixels in the fit radius, matched
       filter S/N at least ``min_snr``, and in the clump of adaptive-moment sizes (median
       +/- 3 robust sigma: rejects galaxies and cosmic rays); the ``max_stars`` brightest;
    2. each star is fitted with a free PS1_V1 model (amplitude, centre, shape, ``k``);
    3. the shape matrix and ``k`` are fitted on the node grid by generalised least squares
       with each star's 4x4 covariance, a systematic floor and chi-square clipping; the grid
       size is chosen as described in the module docstring;
    4. the stars are refitted with the grid model (flux and centre); a pixel residual table
       is built and kept if it measurably helps (``residuals='auto'``);
    5. the aperture correction is measured: flux in a circular aperture of radius
       ``aperture_scale`` Gaussian sigmas (FWHM/2.355) against the PSF flux times the model's
       own fraction in that aperture.

    Parameters
    ----------
    image : ndarray, float, shape (ny, nx)
        Background-subtracted image (image units, e.g. electrons).
    variance : ndarray, shape (ny, nx)
        Variance (image units squared).  Non-positive or non-finite values mark bad pixels.
    mask : ndarray of uint16, shape (ny, nx)
        Mask bits (:mod:`ps1mpi.algorithms.maskbits`).
    x, y : ndarray, shape (N,)
        Source positions (pixels), e.g. detected peaks.  All of them count as neighbours for
        the isolation test.
    flux : ndarray, shape (N,), optional
        Brightness used to rank candidates (any monotonic measure); default: the sum of the
        3x3 pixels around each position.
    candidates : ndarray of bool, shape (N,), optional
        Restrict PSF stars to these sources (e.g. stars pre-identified on a stack).
    max_stars : int
        Maximum number of PSF stars (IPP: 2000).
    min_snr : float
        Minimum S/N of a PSF star (psphot ``PSF_SN_LIM`` 20).
    max_grid : int
        Maximum nodes per axis of the shape grid (IPP: 6).
    fit_radius_fwhm : float
        Radius of the pixels used in the fits, in units of the FWHM.
    isolation_fwhm : float
        Minimum distance to any other source, in FWHM.
    core_radius_fwhm : float
        Radius (FWHM) within which no pixel may be masked.
    max_masked_fraction : float
        Largest masked fraction of the fit pixels.
    mask_bits : int
        Mask bits that make a pixel unusable.
    saturation_bits : int
        Bits that disqualify a star when present anywhere within the fit radius.
    norm_radius : float
        Normalisation radius (pixels; psphot ``PSF_REF_RADIUS`` 25).
    residuals : bool or 'auto'
        Build the residual table always, never, or only if it helps.
    residual_radius : int
        Half-size of the residual table (pixels; psphot ``PSF.RESIDUALS.RADIUS`` 8).
    residual_min_gain : float
        Minimal cross-validated fractional chi-square reduction for 'auto' to keep it.
    aperture_scale : float
        Aperture radius for the aperture correction, in Gaussian sigmas (psphot
        ``PSF_APERTURE_SCALE`` 4.5).
    clip_nsigma : float
        Clipping threshold (Gaussian-equivalent sigma) for the grid fit and the aperture
        correction.
    gain : float, optional
        Counts per image unit of the Poisson term in ``variance`` (1 for images in
        electrons); enables model-based weights (:func:`weight_variance`).
    max_iter : int
        Maximum Levenberg-Marquardt iterations per weight pass.
    seed : int
        Seed of the cross-validation fold assignment (results are deterministic).

    Returns
    -------
    PSFModel

    Raises
    ------
    ValueError
        On inconsistent inputs, or if fewer than 3 usable PSF stars are found.
    """
    from ps1mpi.algorithms import psfphot  # the photometry engine refits the PSF stars

    who = "fit_psf_model"
    image, variance, mask = _validate_images(image, variance, mask, who)
    x, y = _validate_positions(x, y, who)
    ny, nx = image.shape
    if flux is not None:
        flux = np.asarray(flux, dtype=np.float64)
        if flux.shape != x.shape:
            raise ValueError(f"{who}: flux shape {flux.shape} differs from x {x.shape}")
    if candidates is not None:
        candidates = np.asarray(candidates, dtype=bool)
        if candidates.shape != x.shape:
            raise ValueError(f"{who}: candidates shape {candidates.shape} differs from x "
                             f"{x.shape}")
    if max_stars < 3:
        raise ValueError(f"{who}: max_stars must be >= 3, got {max_stars}")
    if not 1 <= max_grid <= 6:
        raise ValueError(f"{who}: max_grid must be in 1..6, got {max_grid}")
    if residuals not in (True, False, "auto"):
        raise ValueError(f"{who}: residuals must be True, False or 'auto', got {residuals!r}")
    families = (models,) if isinstance(models, str) else tuple(models)
    if not families or any(f not in MODEL_ALPHA for f in families):
        raise ValueError(f"{who}: models must name families among {sorted(MODEL_ALPHA)}, got "
                         f"{models!r}")

    bad_pix = ((mask & mask_bits) != 0) | ~np.isfinite(variance) | ~(variance > 0) \
        | ~np.isfinite(image)

    # --- candidate pre-selection ---------------------------------------------------------
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    use = (ix >= 2) & (ix < nx - 2) & (iy >= 2) & (iy < ny - 2)
    if candidates is not None:
        use &= candidates
    if flux is None:
        b3, _ = extract_boxes(np.where(bad_pix, 0, image).astype(np.float64), ix - 1, iy - 1,
                              3, 3)
        bright = b3.sum(axis=(1, 2))
    else:
        bright = flux.copy()
    cand = np.flatnonzero(use & np.isfinite(bright))
    cand = cand[np.argsort(-bright[cand], kind="stable")][: 2 * max_stars]
    if cand.size < 3:
        raise ValueError(f"{who}: only {cand.size} candidate PSF stars inside the image")

    # --- adaptive moments: size clump and matched-filter S/N -----------------------------
    hm = 15
    sm = 2 * hm + 1
    dm, _ = extract_boxes(image, ix[cand] - hm, iy[cand] - hm, sm, sm, fill=0)
    vm, _ = extract_boxes(variance, ix[cand] - hm, iy[cand] - hm, sm, sm, fill=0)
    bm, inside_m = extract_boxes(bad_pix, ix[cand] - hm, iy[cand] - hm, sm, sm, fill=True)
    gm = ~bm & inside_m
    dm = dm.astype(np.float64)
    mxx, myy, mxy, cxs, cys, okm = adaptive_moments(
        dm, gm, x[cand] - (ix[cand] - hm), y[cand] - (iy[cand] - hm))
    gg = np.arange(sm, dtype=np.float64)
    ddx = gg[None, None, :] - cxs[:, None, None]
    ddy = gg[None, :, None] - cys[:, None, None]
    det = np.where(okm, mxx * myy - mxy * mxy, 1.0)
    qq = (np.where(okm, myy, 1)[:, None, None] * ddx ** 2
          + np.where(okm, mxx, 1)[:, None, None] * ddy ** 2
          - 2 * np.where(okm, mxy, 0)[:, None, None] * ddx * ddy) / det[:, None, None]
    wgt = np.where(gm, np.exp(-0.5 * qq), 0.0)
    snr = (wgt * dm).sum(axis=(1, 2)) / np.sqrt(np.maximum((wgt * wgt * vm).sum(axis=(1, 2)),
                                                           1e-300))
    size = np.where(okm, np.sqrt(np.sqrt(np.maximum(det, 0))), np.nan)
    ref = okm & (snr >= min_snr)
    if ref.sum() < 3:
        raise ValueError(f"{who}: only {int(ref.sum())} candidates with S/N >= {min_snr} and "
                         "valid moments (need 3 PSF stars)")
    med = np.median(size[ref])
    mad = 1.4826 * np.median(np.abs(size[ref] - med))
    in_clump = okm & (np.abs(size - med) <= max(3.0 * mad, 0.05 * med))
    fwhm0 = _FWHM_PER_SIGMA * float(np.median(size[ref & in_clump]))

    # --- isolation, masks, S/N --------------------------------------------------------------
    r_fit = max(fit_radius_fwhm * fwhm0, 4.0)
    tree = cKDTree(np.column_stack([x, y]))
    cnt = tree.query_ball_point(np.column_stack([x[cand], y[cand]]), isolation_fwhm * fwhm0,
                                return_length=True)
    isolated = np.asarray(cnt) <= 1
    hr = int(math.ceil(r_fit)) + 1
    sz = 2 * hr + 1
    mb, ins = extract_boxes(mask, ix[cand] - hr, iy[cand] - hr, sz, sz, fill=maskbits.GAP)
    bb, _ = extract_boxes(bad_pix, ix[cand] - hr, iy[cand] - hr, sz, sz, fill=True)
    gg = np.arange(sz, dtype=np.float64)
    rx = gg[None, None, :] + (ix[cand] - hr)[:, None, None] - x[cand][:, None, None]
    ry = gg[None, :, None] + (iy[cand] - hr)[:, None, None] - y[cand][:, None, None]
    r2 = rx * rx + ry * ry
    in_fit = r2 <= r_fit * r_fit
    in_core = r2 <= (core_radius_fwhm * fwhm0) ** 2
    sat = np.any(in_fit & ((mb & saturation_bits) != 0), axis=(1, 2))
    core_bad = np.any(in_core & bb, axis=(1, 2))
    frac_bad = np.sum(in_fit & bb, axis=(1, 2)) / np.maximum(np.sum(in_fit, axis=(1, 2)), 1)
    off_image = ~np.all(ins | ~in_fit, axis=(1, 2))
    sel = (in_clump & isolated & ~sat & ~core_bad & (frac_bad <= max_masked_fraction)
           & ~off_image & (snr >= min_snr))
    stars = cand[sel][:max_stars]
    if stars.size < 3:
        raise ValueError(f"{who}: only {stars.size} usable PSF stars (isolated, unsaturated, "
                         f"unmasked, S/N >= {min_snr}, star-like); need at least 3")
    mom = {"mxx": mxx[sel][:max_stars], "myy": myy[sel][:max_stars],
           "mxy": mxy[sel][:max_stars]}

    # --- stage 1: free fits of the analytic model -------------------------------------------
    ns = stars.size
    ox = ix[stars] - hr
    oy = iy[stars] - hr
    d1, _ = extract_boxes(image, ox, oy, sz, sz, fill=0)
    v1, _ = extract_boxes(variance, ox, oy, sz, sz, fill=1)
    b1, _ = extract_boxes(bad_pix, ox, oy, sz, sz, fill=True)
    d1 = d1.astype(np.float64)
    v1 = v1.astype(np.float64)
    xg = np.broadcast_to((ox[:, None, None] + gg[None, None, :]).astype(np.float64),
                         (ns, sz, sz))
    yg = np.broadcast_to((oy[:, None, None] + gg[None, :, None]).astype(np.float64),
                         (ns, sz, sz))
    good1 = ~b1 & ((xg - x[stars][:, None, None]) ** 2 + (yg - y[stars][:, None, None]) ** 2
                   <= r_fit * r_fit)
    floor = 0.25 * np.median(np.where(good1, v1, np.nan).reshape(ns, -1), axis=1)
    floor = np.where(np.isfinite(floor) & (floor > 0), floor, 1e-12)
    # initial guess: moments -> shape matrix (k = 0.5), peak from the data
    m0 = np.stack([mom["mxx"], mom["myy"], mom["mxy"]], axis=1)
    det0 = m0[:, 0] * m0[:, 1] - m0[:, 2] ** 2
    peak = np.max(np.where(good1 & ((xg - x[stars][:, None, None]) ** 2
                                    + (yg - y[stars][:, None, None]) ** 2 <= 2.0), d1, -np.inf),
                  axis=(1, 2))
    p0 = np.column_stack([np.maximum(peak, 1e-6), x[stars], y[stars], m0[:, 1] / det0,
                          m0[:, 0] / det0, -m0[:, 2] / det0, np.full(ns, 0.5)])
    def free_fits(rows: np.ndarray, fam: str):
        pf_, cov_, _, npix_, ok_ = _fit_free_ps1v1(
            d1[rows], v1[rows], good1[rows], xg[rows], yg[rows], p0[rows], gain=gain,
            max_iter=max_iter, box=float(sz), floor=floor[rows], alpha=MODEL_ALPHA[fam])
        moved_ = np.hypot(pf_[:, 1] - x[stars[rows]], pf_[:, 2] - y[stars[rows]]) \
            > 0.5 * fwhm0 + 1.0
        return pf_, cov_, ok_ & ~moved_ & (npix_ > 10)

    # the model family: the one whose free fits of the brightest stars have the lowest
    # chi-square (the families have the same number of parameters, so the in-sample
    # chi-square compares them fairly); weights from the variance as given, common to all
    model_chi2: dict[str, float] = {}
    family = families[0]
    if len(families) > 1:
        head = np.arange(min(ns, max(int(model_select_stars), 3)))
        trial = {fam: free_fits(head, fam) for fam in families}
        common = np.logical_and.reduce([trial[f][2] for f in families])
        if common.sum() >= 3:
            hc = head[common]
            w_c = np.where(good1[hc], 1.0 / np.maximum(v1[hc], floor[hc, None, None]), 0.0)
            for fam in families:
                mdl = _model_free(trial[fam][0][common], xg[hc], yg[hc], False,
                                  MODEL_ALPHA[fam])
                model_chi2[fam] = float(np.sum(w_c * (d1[hc] - mdl) ** 2))
            family = min(model_chi2, key=model_chi2.__getitem__)
        pf, covf, okf = (np.empty((ns, 7)), np.empty((ns, 7, 7)), np.zeros(ns, dtype=bool))
        pf[head], covf[head], okf[head] = trial[family]
        tail = np.arange(head.size, ns)
        if tail.size:
            pf[tail], covf[tail], okf[tail] = free_fits(tail, family)
    else:
        pf, covf, okf = free_fits(np.arange(ns), family)
    if okf.sum() < 3:
        raise ValueError(f"{who}: only {int(okf.sum())} PSF stars gave a valid {family} fit")
    vals, vcov = _moment_cov(pf[okf], covf[okf])
    xs, ys = pf[okf, 1], pf[okf, 2]
    star_idx = stars[okf]

    # --- stage 2: grid ----------------------------------------------------------------------
    clip_chi2 = float(_stats.chi2.isf(2.0 * _stats.norm.sf(clip_nsigma), 4))
    max_order = min(max_grid, grid_order_for_stars(int(okf.sum())))
    grid, _const_k, nodes, keep, _scores = _select_grid(xs, ys, vals, vcov, (ny, nx),
                                                        max_order, clip_chi2, 1e-2, seed)
    gy, gx = grid
    gmxx, gmyy, gmxy, gk = (nodes[:, i].reshape(gy, gx) for i in range(4))
    gk = np.clip(gk, *K_LIMITS)
    sx, sy, sxy = shape_params(gmxx, gmyy, gmxy)
    psf = PSFModel((ny, nx), sx, sy, sxy, gk, norm_radius=norm_radius, model=family)
    star_idx = star_idx[keep]
    xs, ys = xs[keep], ys[keep]

    # --- stage 3: refit, residual table, aperture correction -----------------------------
    phot_kw = dict(gain=gain, fit_radius=r_fit, mask_bits=mask_bits, apply_apcorr=False,
                   blend_radius=0.0, neighbour_passes=0)
    rr = int(residual_radius)
    res_gain = float("nan")
    if residuals is not False and rr >= 1:
        ph = psfphot.fit_psf_photometry(image, variance, mask, psf, xs, ys, **phot_kw)
        okp = (ph.flags & psfphot.PHOT_BAD) == 0
        okp &= ph.flux > 0
        if okp.sum() >= 6:
            table, gain_cv = _build_residual(image, variance, bad_pix, psf, ph.x[okp],
                                             ph.y[okp], ph.flux[okp], rr, r_fit, gain)
            res_gain = gain_cv
            if residuals is True or gain_cv >= residual_min_gain:
                psf = PSFModel((ny, nx), sx, sy, sxy, gk, norm_radius=norm_radius, model=family,
                               residual=table)

    ph = psfphot.fit_psf_photometry(image, variance, mask, psf, xs, ys, **phot_kw)
    okp = ((ph.flags & psfphot.PHOT_BAD) == 0) & (ph.flux > 0)
    chi2_med = float(np.median(ph.chi2_dof[okp])) if okp.any() else float("nan")
    sigma_g = psf.shape_at(xs, ys).fwhm_major / _FWHM_PER_SIGMA
    r_ap = float(aperture_scale * np.median(sigma_g))
    ap, ap_var, ap_ok = _aperture_flux(image, variance, bad_pix, ph.x, ph.y, r_ap)
    frac = psf.aperture_fraction(ph.x, ph.y, r_ap)
    okr = okp & ap_ok & (ap > 0)
    ap_corr, ap_corr_err, ap_sys = 1.0, 0.0, 0.0
    if okr.sum() >= 3:
        ratio = ap[okr] / (ph.flux[okr] * frac[okr])
        rvar = ratio ** 2 * (ap_var[okr] / ap[okr] ** 2 + (ph.flux_sig[okr] / ph.flux[okr]) ** 2)
        ap_corr, ap_corr_err, ap_sys = _clipped_ratio(ratio, rvar, clip_nsigma)
    return PSFModel((ny, nx), sx, sy, sxy, gk, norm_radius=norm_radius,
                    residual=psf.residual, ap_corr=ap_corr, ap_corr_err=ap_corr_err,
                    ap_sys_err=ap_sys, aperture_radius=r_ap, n_psf_stars=int(star_idx.size),
                    psf_star_index=star_idx, chi2_dof=chi2_med, residual_gain=res_gain,
                    model=family, model_chi2=model_chi2)


def _aperture_flux(image: np.ndarray, variance: np.ndarray, bad_pix: np.ndarray, x: np.ndarray,
                   y: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum and variance of pixels with centres within ``radius`` (sharp edge); ok False when a
    bad or off-image pixel falls inside."""
    h = int(math.ceil(radius)) + 1
    s = 2 * h + 1
    ox = np.rint(x).astype(np.int64) - h
    oy = np.rint(y).astype(np.int64) - h
    d, ins = extract_boxes(image, ox, oy, s, s, fill=0)
    v, _ = extract_boxes(variance, ox, oy, s, s, fill=0)
    b, _ = extract_boxes(bad_pix, ox, oy, s, s, fill=True)
    g = np.arange(s, dtype=np.float64)
    rx = ox[:, None, None] + g[None, None, :] - x[:, None, None]
    ry = oy[:, None, None] + g[None, :, None] - y[:, None, None]
    inap = rx * rx + ry * ry <= radius * radius
    ok = ~np.any(inap & (b | ~ins), axis=(1, 2))
    return (np.sum(np.where(inap, d, 0.0), axis=(1, 2), dtype=np.float64),
            np.sum(np.where(inap & ~b, v, 0.0), axis=(1, 2), dtype=np.float64), ok)


def _clipped_ratio(ratio: np.ndarray, rvar: np.ndarray, nsigma: float
                   ) -> tuple[float, float, float]:
    """Weighted clipped mean of ratios with a systematic term; returns (mean, error,
    systematic scatter in mag)."""
    use = np.isfinite(ratio) & np.isfinite(rvar) & (rvar > 0)
    mean, sys2 = float(np.median(ratio[use])), 0.0
    for _ in range(5):
        w = 1.0 / (rvar + sys2)
        mean = float(np.sum(w[use] * ratio[use]) / np.sum(w[use]))
        resid = ratio - mean
        # systematic scatter beyond the noise: chi2/dof = 1
        r = resid[use]
        rv = rvar[use]
        lo, hi = 0.0, max(float(np.var(r)), 1e-12)
        if np.mean(r * r / rv) > 1.0:
            for _ in range(50):
                mid = 0.5 * (lo + hi)
                if np.mean(r * r / (rv + mid)) > 1.0:
                    lo = mid
                else:
                    hi = mid
            sys2 = hi
        else:
            sys2 = 0.0
        new = np.isfinite(ratio) & (np.abs(resid) <= nsigma * np.sqrt(rvar + sys2))
        if new.sum() < 3 or np.array_equal(new, use):
            break
        use = new
    w = 1.0 / (rvar[use] + sys2)
    mean = float(np.sum(w * ratio[use]) / np.sum(w))
    err = float(1.0 / math.sqrt(np.sum(w)))
    sys_mag = float(2.5 / math.log(10.0) * math.sqrt(sys2) / mean) if mean > 0 else 0.0
    return mean, err, sys_mag


def _build_residual(image: np.ndarray, variance: np.ndarray, bad_pix: np.ndarray,
                    psf: PSFModel, x: np.ndarray, y: np.ndarray, flux: np.ndarray, rr: int,
                    r_fit: float, gain: float | None) -> tuple[np.ndarray, float]:
    """Residual table from all stars, and the two-fold cross-validated fractional chi-square
    reduction it gives (stars split alternately in brightness order)."""
    h = rr + 2
    s = 2 * h + 1
    ox = np.rint(x).astype(np.int64) - h
    oy = np.rint(y).astype(np.int64) - h
    d, _ = extract_boxes(image, ox, oy, s, s, fill=0)
    v, _ = extract_boxes(variance, ox, oy, s, s, fill=1)
    b, ins = extract_boxes(bad_pix, ox, oy, s, s, fill=True)
    d = d.astype(np.float64)
    good = ~b & ins
    g = np.arange(s, dtype=np.float64)
    dx = ox[:, None, None] + g[None, None, :] - x[:, None, None]
    dy = oy[:, None, None] + g[None, :, None] - y[:, None, None]
    p = psf.source_params(x, y).expand(2)
    model = flux[:, None, None] * psf.render(dx, dy, p)
    floor = 0.25 * np.median(np.where(good, v, np.nan).reshape(x.size, -1), axis=1)
    floor = np.where(np.isfinite(floor) & (floor > 0), floor, 1e-12)[:, None, None]
    vw = weight_variance(v.astype(np.float64), d, model, gain, floor)
    val, w = _residual_samples(d, good, vw, model, flux, x, y, ox, oy, rr)
    table, _ = _combine_residuals(val, w)
    # cross-validation: table from one half applied to the other
    order = np.argsort(-flux, kind="stable")
    half = np.zeros(x.size, dtype=bool)
    half[order[::2]] = True
    inner = (dx * dx + dy * dy <= min(r_fit, rr) ** 2) & good
    base = np.sum(np.where(inner, (d - model) ** 2 / vw, 0.0))
    chi_new = 0.0
    for part in (half, ~half):
        tab, _ = _combine_residuals(val[~part], w[~part])
        trial = PSFModel(psf.image_shape, psf.sigma_x, psf.sigma_y, psf.sxy, psf.k, model=psf.model,
                         norm_radius=psf.norm_radius, residual=tab)
        pt = trial.source_params(x[part], y[part]).expand(2)
        mt = flux[part, None, None] * trial.render(dx[part], dy[part], pt)
        chi_new += np.sum(np.where(inner[part], (d[part] - mt) ** 2 / vw[part], 0.0))
    return table, float((base - chi_new) / base) if base > 0 else 0.0
