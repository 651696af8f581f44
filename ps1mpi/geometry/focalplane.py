"""The focal-plane model: focal-plane pixels to sky and back, for one exposure.

The model the simulator draws from and the camera stage fits (see ``docs/geometry.md``):

1. focal-plane pixels ``(X, Y)`` relative to the optical axis (from :mod:`camera`);
2. optical distortion, a polynomial in the normalised coordinates ``(X/R, Y/R)`` *added* to
   ``(X, Y)``: ``P = X + Dx(X/R, Y/R)``, ``Q = Y + Dy(X/R, Y/R)`` (tangent-plane pixels);
3. rotation and parity: ``PA`` is the angle from North through East of the focal-plane +Y axis,
   and the sky appears as on a real camera (East left when North is up), so
   ``xi = s (-P cos PA + Q sin PA)``, ``eta = s (P sin PA + Q cos PA)`` with ``s`` the scale;
4. gnomonic (TAN) projection about the boresight ``(ra, dec)``: ``(xi, eta)`` are the standard
   coordinates (xi towards East, eta towards North).

``sky_to_focal`` inverts step 2 exactly with Newton's method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from astropy.wcs import WCS

    from ps1mpi.geometry.camera import Camera

__all__ = [
    "Distortion",
    "FocalPlaneModel",
    "gnomonic_forward",
    "gnomonic_inverse",
    "angular_separation",
]

_DEG = math.pi / 180.0
_ARCSEC = _DEG / 3600.0


# ---------------------------------------------------------------------------- projections
def gnomonic_forward(ra: Any, dec: Any, ra0: Any, dec0: Any) -> tuple[np.ndarray, np.ndarray,
                                                                     np.ndarray]:
    """Gnomonic (TAN) projection of sky positions about a tangent point.

    Parameters
    ----------
    ra, dec : array_like
        Sky positions (degrees).
    ra0, dec0 : array_like
        Tangent point (degrees); broadcast against ``ra, dec``.

    Returns
    -------
    xi, eta : numpy.ndarray
        Standard coordinates (radians): xi towards East (increasing RA), eta towards North.
    cosc : numpy.ndarray
        Cosine of the angular distance from the tangent point; the projection is valid only
        where it is positive.
    """
    ra = np.asarray(ra, dtype=float) * _DEG
    dec = np.asarray(dec, dtype=float) * _DEG
    ra0 = np.asarray(ra0, dtype=float) * _DEG
    dec0 = np.asarray(dec0, dtype=float) * _DEG
    dra = ra - ra0
    cd, sd = np.cos(dec), np.sin(dec)
    cd0, sd0 = np.cos(dec0), np.sin(dec0)
    cdra = np.cos(dra)
    cosc = sd * sd0 + cd * cd0 * cdra
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = cd * np.sin(dra) / cosc
        eta = (sd * cd0 - cd * sd0 * cdra) / cosc
    return xi, eta, cosc


def gnomonic_inverse(xi: Any, eta: Any, ra0: Any, dec0: Any) -> tuple[np.ndarray, np.ndarray]:
    """Inverse gnomonic projection.

    Parameters
    ----------
    xi, eta : array_like
        Standard coordinates (radians).
    ra0, dec0 : array_like
        Tangent point (degrees).

    Returns
    -------
    ra, dec : numpy.ndarray
        Sky positions (degrees), RA in [0, 360).
    """
    xi = np.asarray(xi, dtype=float)
    eta = np.asarray(eta, dtype=float)
    ra0 = np.asarray(ra0, dtype=float) * _DEG
    dec0 = np.asarray(dec0, dtype=float) * _DEG
    cd0, sd0 = np.cos(dec0), np.sin(dec0)
    den = cd0 - eta * sd0
    ra = ra0 + np.arctan2(xi, den)
    dec = np.arctan2(sd0 + eta * cd0, np.hypot(xi, den))
    return np.mod(ra / _DEG, 360.0), dec / _DEG


def angular_separation(ra1: Any, dec1: Any, ra2: Any, dec2: Any) -> np.ndarray:
    """Angular distance between sky positions (degrees in, degrees out; Vincenty formula)."""
    r1, d1 = np.asarray(ra1, float) * _DEG, np.asarray(dec1, float) * _DEG
    r2, d2 = np.asarray(ra2, float) * _DEG, np.asarray(dec2, float) * _DEG
    dra = r2 - r1
    num = np.hypot(np.cos(d2) * np.sin(dra),
                   np.cos(d1) * np.sin(d2) - np.sin(d1) * np.cos(d2) * np.cos(dra))
    den = np.sin(d1) * np.sin(d2) + np.cos(d1) * np.cos(d2) * np.cos(dra)
    return np.arctan2(num, den) / _DEG


# ---------------------------------------------------------------------------- distortion
def _poly_terms(order: int, lowest: int) -> list[tuple[int, int]]:
    return [(n - j, j) for n in range(lowest, order + 1) for j in range(n + 1)]


@dataclass(frozen=True)
class Distortion:
    """Optical distortion of the focal plane: a 2-D polynomial added to (X, Y).

    ``P = X + sum_k coeffs_x[k] * Xn**i_k * Yn**j_k`` and likewise for ``Q`` with
    ``coeffs_y``, where ``Xn = X / norm`` and ``Yn = Y / norm``. The terms ``(i_k, j_k)`` are
    :meth:`terms`: every power with ``2 <= i + j <= order``, by total degree then by the power
    of Yn (``X^2, XY, Y^2, X^3, X^2Y, ...``). Constant and linear terms are left out: they are
    the pointing, scale and position angle of :class:`FocalPlaneModel`.

    Parameters
    ----------
    order : int
        Highest total degree (>= 2; 0 or 1 means no distortion, with no coefficients).
    coeffs_x, coeffs_y : array_like
        Coefficients (pixels), one per term.
    norm : float
        Normalisation radius (pixels); coefficients are the displacement at ``norm``.
    """

    order: int = 0
    coeffs_x: Any = ()
    coeffs_y: Any = ()
    norm: float = 20000.0
    _cx: np.ndarray = field(init=False, repr=False, compare=False)
    _cy: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if int(self.order) != self.order or self.order < 0:
            raise ValueError(f"Distortion order must be a non-negative integer, got {self.order}")
        if not self.norm > 0:
            raise ValueError(f"Distortion norm must be positive (pixels), got {self.norm}")
        n = len(self.terms(int(self.order)))
        cx = np.asarray(self.coeffs_x, dtype=float).ravel()
        cy = np.asarray(self.coeffs_y, dtype=float).ravel()
        if cx.size != n or cy.size != n:
            raise ValueError(f"Distortion of order {self.order} needs {n} coefficients per axis, "
                             f"got coeffs_x: {cx.size}, coeffs_y: {cy.size}")
        if not (np.all(np.isfinite(cx)) and np.all(np.isfinite(cy))):
            raise ValueError("Distortion coefficients must be finite")
        object.__setattr__(self, "order", int(self.order))
        object.__setattr__(self, "coeffs_x", tuple(cx.tolist()))
        object.__setattr__(self, "coeffs_y", tuple(cy.tolist()))
        object.__setattr__(self, "_cx", cx)
        object.__setattr__(self, "_cy", cy)

    # -------------------------------------------------------------- constructors
    @staticmethod
    def terms(order: int) -> list[tuple[int, int]]:
        """Powers ``(i, j)`` of ``Xn**i * Yn**j`` for a given order, in coefficient order."""
        return _poly_terms(int(order), 2)

    @classmethod
    def none(cls) -> Distortion:
        """No distortion."""
        return cls(0, (), ())

    @classmethod
    def radial(cls, k3: float, *, k5: float = 0.0, norm: float = 20000.0) -> Distortion:
        """Radial distortion ``d = r (k3 rn^2 + k5 rn^4)`` along the radius.

        Parameters
        ----------
        k3 : float
            Radial displacement at ``r = norm`` from the cubic term (pixels); positive is
            pincushion (outwards), negative barrel.
        k5 : float
            Same for the quintic term (pixels).
        norm : float
            Normalisation radius (pixels).
        """
        order = 5 if k5 else 3
        terms = cls.terms(order)
        cx = np.zeros(len(terms))
        cy = np.zeros(len(terms))
        # X rn^2 = X^3 + X Y^2 ; X rn^4 = X^5 + 2 X^3 Y^2 + X Y^4
        idx = {t: k for k, t in enumerate(terms)}
        cx[idx[(3, 0)]] += k3
        cx[idx[(1, 2)]] += k3
        cy[idx[(2, 1)]] += k3
        cy[idx[(0, 3)]] += k3
        if k5:
            for (i, j), c in (((5, 0), 1.0), ((3, 2), 2.0), ((1, 4), 1.0)):
                cx[idx[(i, j)]] += c * k5
                cy[idx[(j, i)]] += c * k5
        return cls(order, cx, cy, norm=norm)

    @classmethod
    def gpc1_like(cls, *, amplitude: float = 3.0, norm: float = 20000.0) -> Distortion:
        """A GPC1-like distortion: radial cubic, a few pixels at the field edge.

        Parameters
        ----------
        amplitude : float
            Radial displacement at ``r = norm`` (pixels); the default gives 3 px at 20000 px
            (1.43 degrees, the edge of the GPC1 field) and 6.1 px at the outermost chip
            corners.
        norm : float
            Normalisation radius (pixels). Use about the half-width of the camera to get the
            same relative distortion on a smaller camera.
        """
        return cls.radial(amplitude, norm=norm)

    # -------------------------------------------------------------- evaluation
    @property
    def nterms(self) -> int:
        """Number of coefficients per axis."""
        return len(self._cx)

    @property
    def is_zero(self) -> bool:
        """True when the distortion vanishes."""
        return not (np.any(self._cx) or np.any(self._cy))

    def design_matrix(self, Xn: Any, Yn: Any) -> np.ndarray:
        """Design matrix of the polynomial terms.

        Parameters
        ----------
        Xn, Yn : array_like
            Normalised focal-plane coordinates ``X / norm``, ``Y / norm`` (dimensionless).

        Returns
        -------
        numpy.ndarray
            Shape ``(N, nterms)``: column k is ``Xn**i_k * Yn**j_k``.
        """
        Xn = np.asarray(Xn, dtype=float).ravel()
        Yn = np.asarray(Yn, dtype=float).ravel()
        return _monomials(Xn, Yn, self.terms(self.order))

    def offsets(self, X: Any, Y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Distortion displacement at focal-plane positions.

        Parameters
        ----------
        X, Y : array_like
            Focal-plane coordinates (pixels).

        Returns
        -------
        dX, dY : numpy.ndarray
            Displacements (pixels), same shape as the broadcast inputs.
        """
        X, Y = np.broadcast_arrays(np.asarray(X, dtype=float), np.asarray(Y, dtype=float))
        if self.nterms == 0:
            return np.zeros(X.shape), np.zeros(X.shape)
        A = self.design_matrix(X / self.norm, Y / self.norm)
        return (A @ self._cx).reshape(X.shape), (A @ self._cy).reshape(X.shape)

    def apply(self, X: Any, Y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Focal-plane to tangent-plane pixels: ``(X + dX, Y + dY)``."""
        X, Y = np.broadcast_arrays(np.asarray(X, dtype=float), np.asarray(Y, dtype=float))
        dX, dY = self.offsets(X, Y)
        return X + dX, Y + dY

    def jacobian(self, X: Any, Y: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Partial derivatives of :meth:`apply` (dimensionless).

        Returns
        -------
        dPdX, dPdY, dQdX, dQdY : numpy.ndarray
        """
        X, Y = np.broadcast_arrays(np.asarray(X, dtype=float), np.asarray(Y, dtype=float))
        one = np.ones(X.shape)
        if self.nterms == 0:
            zero = np.zeros(X.shape)
            return one, zero, zero, one.copy()
        Xn, Yn = (X / self.norm).ravel(), (Y / self.norm).ravel()
        terms = self.terms(self.order)
        dx_terms = [(i - 1, j) for i, j in terms]
        dy_terms = [(i, j - 1) for i, j in terms]
        ci = np.array([i for i, _ in terms], dtype=float)
        cj = np.array([j for _, j in terms], dtype=float)
        Ax = _monomials(Xn, Yn, dx_terms) * ci / self.norm
        Ay = _monomials(Xn, Yn, dy_terms) * cj / self.norm
        s = X.shape
        return (one + (Ax @ self._cx).reshape(s), (Ay @ self._cx).reshape(s),
                (Ax @ self._cy).reshape(s), one + (Ay @ self._cy).reshape(s))

    def invert(self, P: Any, Q: Any, *, tol: float = 1e-9,
               max_iter: int = 30) -> tuple[np.ndarray, np.ndarray]:
        """Solve ``apply(X, Y) = (P, Q)`` for ``(X, Y)`` with Newton's method.

        Parameters
        ----------
        P, Q : array_like
            Tangent-plane pixels.
        tol : float
            Convergence tolerance on the step (pixels).
        max_iter : int
            Iteration limit.

        Returns
        -------
        X, Y : numpy.ndarray
            Focal-plane pixels.
        """
        P, Q = np.broadcast_arrays(np.asarray(P, dtype=float), np.asarray(Q, dtype=float))
        if self.nterms == 0 or self.is_zero:
            return P.copy(), Q.copy()
        X, Y = P.copy(), Q.copy()
        for _ in range(max_iter):
            fx, fy = self.apply(X, Y)
            rx, ry = fx - P, fy - Q
            a, b, c, d = self.jacobian(X, Y)
            det = a * d - b * c
            with np.errstate(divide="ignore", invalid="ignore"):
                sx = (d * rx - b * ry) / det
                sy = (a * ry - c * rx) / det
            X = X - sx
            Y = Y - sy
            step = np.nanmax(np.abs(np.concatenate([sx.ravel(), sy.ravel()]))) if sx.size else 0.0
            if step < tol:
                break
        else:
            raise ValueError(f"Distortion.invert: Newton did not converge within {max_iter} "
                             f"iterations (last step {step:.3g} px); positions too far "
                             "outside the field for this polynomial")
        if sx.size and not np.all(np.isfinite(X) & np.isfinite(Y)):
            raise ValueError("Distortion.invert: the distortion is singular at some positions")
        return X, Y

    # -------------------------------------------------------------- fitting, I/O
    @classmethod
    def fit(cls, X: Any, Y: Any, P: Any, Q: Any, *, order: int = 3, norm: float = 20000.0,
            weights: Any = None) -> Distortion:
        """Least-squares fit of a distortion mapping focal (X, Y) to tangent-plane (P, Q).

        Parameters
        ----------
        X, Y : array_like
            Focal-plane positions (pixels).
        P, Q : array_like
            Tangent-plane positions of the same points (pixels), e.g. reference stars
            projected with the exposure's pointing, scale and PA.
        order : int
            Highest total degree.
        norm : float
            Normalisation radius (pixels).
        weights : array_like, optional
            Weights (1 / sigma^2) per point.

        Returns
        -------
        Distortion
        """
        X, Y, P, Q = (np.asarray(v, dtype=float).ravel() for v in (X, Y, P, Q))
        if not (X.size == Y.size == P.size == Q.size):
            raise ValueError("Distortion.fit: X, Y, P, Q must have the same length")
        terms = cls.terms(order)
        if X.size < len(terms):
            raise ValueError(f"Distortion.fit: {X.size} points for {len(terms)} terms")
        A = _monomials(X / norm, Y / norm, terms)
        w = np.ones(X.size) if weights is None else np.sqrt(np.asarray(weights, float).ravel())
        cx = np.linalg.lstsq(A * w[:, None], (P - X) * w, rcond=None)[0]
        cy = np.linalg.lstsq(A * w[:, None], (Q - Y) * w, rcond=None)[0]
        return cls(order, cx, cy, norm=norm)

    def to_dict(self) -> dict[str, Any]:
        """Plain-value description (for headers, JSON, HDF5 attributes)."""
        return {"order": self.order, "norm": self.norm,
                "coeffs_x": list(self.coeffs_x), "coeffs_y": list(self.coeffs_y)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Distortion:
        """Inverse of :meth:`to_dict`."""
        return cls(int(d["order"]), d["coeffs_x"], d["coeffs_y"], norm=float(d["norm"]))


def _monomials(Xn: np.ndarray, Yn: np.ndarray, terms: list[tuple[int, int]]) -> np.ndarray:
    if not terms:
        return np.zeros((Xn.size, 0))
    maxp = max(max(i for i, _ in terms), max(j for _, j in terms), 0)
    px = [np.ones_like(Xn)]
    py = [np.ones_like(Yn)]
    for _ in range(maxp):
        px.append(px[-1] * Xn)
        py.append(py[-1] * Yn)
    cols = [px[i] * py[j] if i >= 0 and j >= 0 else np.zeros_like(Xn) for i, j in terms]
    return np.column_stack(cols)


# ---------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class FocalPlaneModel:
    """Astrometric model of one exposure: focal-plane pixels to sky.

    Parameters
    ----------
    ra, dec : float
        Boresight: the sky position of the optical axis (degrees).
    pa : float
        Position angle of the focal-plane +Y axis, from North through East (degrees).
    scale : float
        Pixel scale at the optical axis (arcsec / pixel).
    distortion : Distortion
        Optical distortion (default none).
    """

    ra: float
    dec: float
    pa: float = 0.0
    scale: float = 0.258
    distortion: Distortion = field(default_factory=Distortion.none)

    def __post_init__(self) -> None:
        for name in ("ra", "dec", "pa", "scale"):
            v = getattr(self, name)
            if not np.isfinite(v):
                raise ValueError(f"FocalPlaneModel: {name} must be finite, got {v}")
        if not -90.0 <= self.dec <= 90.0:
            raise ValueError(f"FocalPlaneModel: dec must be in [-90, 90] degrees, got {self.dec}")
        if not self.scale > 0:
            raise ValueError(f"FocalPlaneModel: scale must be positive (arcsec/px), "
                             f"got {self.scale}")
        if not isinstance(self.distortion, Distortion):
            raise TypeError("FocalPlaneModel: distortion must be a Distortion")
        object.__setattr__(self, "ra", float(self.ra) % 360.0)

    # -------------------------------------------------------------- focal plane <-> sky
    def _rot(self) -> tuple[float, float, float]:
        t = self.pa * _DEG
        return math.cos(t), math.sin(t), self.scale * _ARCSEC

    def tangent_to_standard(self, P: Any, Q: Any) -> tuple[np.ndarray, np.ndarray]:
        """Tangent-plane pixels to standard coordinates (radians), applying PA and parity."""
        c, s, k = self._rot()
        P = np.asarray(P, dtype=float)
        Q = np.asarray(Q, dtype=float)
        return k * (-P * c + Q * s), k * (P * s + Q * c)

    def standard_to_tangent(self, xi: Any, eta: Any) -> tuple[np.ndarray, np.ndarray]:
        """Standard coordinates (radians) to tangent-plane pixels."""
        c, s, k = self._rot()
        xi = np.asarray(xi, dtype=float)
        eta = np.asarray(eta, dtype=float)
        return (-xi * c + eta * s) / k, (xi * s + eta * c) / k

    def focal_to_sky(self, X: Any, Y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Focal-plane pixels to sky.

        Parameters
        ----------
        X, Y : array_like
            Focal-plane coordinates relative to the optical axis (pixels).

        Returns
        -------
        ra, dec : numpy.ndarray
            Sky positions (degrees).
        """
        P, Q = self.distortion.apply(X, Y)
        xi, eta = self.tangent_to_standard(P, Q)
        return gnomonic_inverse(xi, eta, self.ra, self.dec)

    def sky_to_focal(self, ra: Any, dec: Any) -> tuple[np.ndarray, np.ndarray]:
        """Sky to focal-plane pixels (exact inverse of :meth:`focal_to_sky`).

        Parameters
        ----------
        ra, dec : array_like
            Sky positions (degrees); must lie in the hemisphere around the boresight.

        Returns
        -------
        X, Y : numpy.ndarray
            Focal-plane coordinates relative to the optical axis (pixels).
        """
        xi, eta, cosc = gnomonic_forward(ra, dec, self.ra, self.dec)
        if np.any(cosc <= 0):
            raise ValueError("FocalPlaneModel.sky_to_focal: some positions are 90 degrees or "
                             "more from the boresight")
        P, Q = self.standard_to_tangent(xi, eta)
        return self.distortion.invert(P, Q)

    def pixel_to_sky(self, cam: Camera, chip: str, x: Any, y: Any) -> tuple[np.ndarray,
                                                                             np.ndarray]:
        """Chip pixels to sky.

        Parameters
        ----------
        cam : Camera
            The camera.
        chip : str
            Chip name.
        x, y : array_like
            Chip pixel coordinates (pixels, 0-based centres).

        Returns
        -------
        ra, dec : numpy.ndarray
            Sky positions (degrees).
        """
        return self.focal_to_sky(*cam.chip_to_focal(chip, x, y))

    def sky_to_pixel(self, cam: Camera, chip: str, ra: Any, dec: Any) -> tuple[np.ndarray,
                                                                              np.ndarray]:
        """Sky to chip pixels (not restricted to the chip's area).

        Returns
        -------
        x, y : numpy.ndarray
            Chip pixel coordinates (pixels).
        """
        return cam.focal_to_chip(chip, *self.sky_to_focal(ra, dec))

    # -------------------------------------------------------------- WCS
    def chip_wcs(self, cam: Camera, chip: str, *, sip_order: int = 3,
                 ngrid: int = 16) -> WCS:
        """TAN-SIP WCS of one chip fitted to the model.

        The tangent point (CRVAL) is the boresight and CRPIX the optical axis in chip pixels,
        so the TAN part is the model's own projection and the SIP polynomial absorbs the
        distortion (exact for a distortion of order <= ``sip_order``). The inverse polynomials
        AP/BP are fitted with order ``sip_order + 1``.

        Parameters
        ----------
        cam : Camera
            The camera.
        chip : str
            Chip name.
        sip_order : int
            SIP polynomial order (>= 2).
        ngrid : int
            Fit grid points per axis over the chip.

        Returns
        -------
        astropy.wcs.WCS
            Celestial WCS with ``RA---TAN-SIP`` / ``DEC--TAN-SIP``; pixel origin as FITS
            (use ``origin=0`` with astropy for the 0-based chip coordinates).
        """
        from astropy.wcs import Sip, WCS

        if sip_order < 2:
            raise ValueError(f"chip_wcs: sip_order must be >= 2, got {sip_order}")
        nx, ny = cam.chip_nx, cam.chip_ny
        g = np.linspace(-0.5, nx - 0.5, ngrid)
        h = np.linspace(-0.5, ny - 0.5, ngrid)
        x, y = (a.ravel() for a in np.meshgrid(g, h))
        ra, dec = self.pixel_to_sky(cam, chip, x, y)
        xi, eta, _ = gnomonic_forward(ra, dec, self.ra, self.dec)
        xi, eta = xi / _DEG, eta / _DEG          # degrees, as the FITS intermediate coords
        xc, yc = cam.focal_to_chip(chip, 0.0, 0.0)
        xc, yc = float(xc), float(yc)
        u, v = x - xc, y - yc
        L = float(max(np.abs(u).max(), np.abs(v).max()))
        terms = _poly_terms(sip_order, 1)
        A = _monomials(u / L, v / L, terms)
        scl = np.array([L ** -(i + j) for i, j in terms])
        a_xi = np.linalg.lstsq(A, xi, rcond=None)[0] * scl
        a_eta = np.linalg.lstsq(A, eta, rcond=None)[0] * scl
        lin = {t: k for k, t in enumerate(terms)}
        cd = np.array([[a_xi[lin[(1, 0)]], a_xi[lin[(0, 1)]]],
                       [a_eta[lin[(1, 0)]], a_eta[lin[(0, 1)]]]])
        cdinv = np.linalg.inv(cd)
        sip_a = np.zeros((sip_order + 1, sip_order + 1))
        sip_b = np.zeros((sip_order + 1, sip_order + 1))
        for k, (i, j) in enumerate(terms):
            if i + j < 2:
                continue
            fa, fb = cdinv @ np.array([a_xi[k], a_eta[k]])
            sip_a[i, j] = fa
            sip_b[i, j] = fb
        # inverse: from intermediate pixels (U, V) = CD^-1 (xi, eta) back to (u, v)
        UV = cdinv @ np.vstack([xi, eta])
        U, V = UV[0], UV[1]
        inv_order = sip_order + 1
        iterms = _poly_terms(inv_order, 1)
        Ai = _monomials(U / L, V / L, iterms)
        iscl = np.array([L ** -(i + j) for i, j in iterms])
        ap_c = np.linalg.lstsq(Ai, u - U, rcond=None)[0] * iscl
        bp_c = np.linalg.lstsq(Ai, v - V, rcond=None)[0] * iscl
        sip_ap = np.zeros((inv_order + 1, inv_order + 1))
        sip_bp = np.zeros((inv_order + 1, inv_order + 1))
        for k, (i, j) in enumerate(iterms):
            sip_ap[i, j] = ap_c[k]
            sip_bp[i, j] = bp_c[k]
        crpix = [xc + 1.0, yc + 1.0]
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        w.wcs.crval = [self.ra, self.dec]
        w.wcs.crpix = crpix
        w.wcs.cd = cd
        w.wcs.radesys = "ICRS"
        w.wcs.cunit = ["deg", "deg"]
        w.sip = Sip(sip_a, sip_b, sip_ap, sip_bp, crpix)
        w.pixel_shape = (nx, ny)
        w.wcs.set()
        return w

    # -------------------------------------------------------------- footprints
    def chip_footprint(self, cam: Camera, chip: str) -> tuple[np.ndarray, np.ndarray]:
        """Sky positions of a chip's four outer pixel corners.

        Returns
        -------
        ra, dec : numpy.ndarray
            Four corners (degrees), in the order (x, y) = (-0.5, -0.5), (nx - 0.5, -0.5),
            (nx - 0.5, ny - 0.5), (-0.5, ny - 0.5).
        """
        nx, ny = cam.chip_nx, cam.chip_ny
        x = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
        y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
        return self.pixel_to_sky(cam, chip, x, y)

    def exposure_footprint(self, cam: Camera, *, grow: float | None = None,
                           max_step: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Sky polygon enclosing every chip of the exposure.

        The outline of the union of the chips, each grown by ``grow`` pixels to close the
        inter-chip gaps (:meth:`Camera.focal_plane_outline`), with points added along its edges
        so that the polygon follows the distortion, mapped to the sky.

        Parameters
        ----------
        cam : Camera
            The camera.
        grow : float, optional
            Chip growth (pixels); default half the largest inter-chip gap plus one pixel.
        max_step : float, optional
            Largest distance between polygon vertices in the focal plane (pixels); default
            half a chip width.

        Returns
        -------
        ra, dec : numpy.ndarray
            Polygon vertices (degrees), counter-clockwise in the focal plane, not closed
            (edges are great-circle arcs between consecutive vertices and last to first).
        """
        X, Y = cam.focal_plane_outline(grow=grow)
        step = float(max_step) if max_step is not None else 0.5 * min(cam.chip_nx, cam.chip_ny)
        if not step > 0:
            raise ValueError(f"exposure_footprint: max_step must be positive, got {max_step}")
        X2, Y2 = np.roll(X, -1), np.roll(Y, -1)
        seg = np.hypot(X2 - X, Y2 - Y)
        nsub = np.maximum(1, np.ceil(seg / step).astype(int))
        t = np.concatenate([np.arange(n) / n for n in nsub])
        k = np.repeat(np.arange(len(X)), nsub)
        Xd = X[k] + t * (X2[k] - X[k])
        Yd = Y[k] + t * (Y2[k] - Y[k])
        return self.focal_to_sky(Xd, Yd)

    # -------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        """Plain-value description (for headers, JSON, HDF5 attributes)."""
        return {"ra": self.ra, "dec": self.dec, "pa": self.pa, "scale": self.scale,
                "distortion": self.distortion.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FocalPlaneModel:
        """Inverse of :meth:`to_dict`."""
        dist = d.get("distortion")
        return cls(float(d["ra"]), float(d["dec"]), float(d["pa"]), float(d["scale"]),
                   Distortion.from_dict(dist) if dist else Distortion.none())
