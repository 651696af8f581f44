"""Astrometric calibration of one exposure (the camera stage's psastro).

All chips of an exposure are solved together, as the IPP's psastro did in its mosaic mode:

1. **Reference stars to the exposure epoch.** Positions move by their proper motions from the
   catalog epoch to the exposure's (rigorously on the sphere).
2. **Pattern match.** With the header's boresight and position angle, the reference stars are
   projected to the focal plane's tangent-pixel frame and compared with the detections (chip
   positions mapped through the camera layout). The brightest detections and reference stars
   vote in a 2-D histogram of their pairwise offsets, for each rotation on a grid: the true
   offset and rotation collect the real pairs in one cell. This finds pointing errors of
   several arcminutes and rotations of about a degree.
3. **Iterative fit.** Detections are matched to their nearest reference star (one to one)
   within a radius that tightens from iteration to iteration. One focal-plane model is fitted
   to all matches: boresight RA/Dec, position angle, plate scale and a distortion polynomial
   shared by the exposure (:class:`~ps1mpi.geometry.focalplane.FocalPlaneModel`), plus small
   per-chip terms (offset and rotation, optionally a full affine term) that describe how each
   chip sits in the focal plane. Outliers are clipped. The problem is solved as a sequence of
   weighted linear least-squares problems in the tangent-pixel frame of the current model; the
   chip terms carry a weak Gaussian prior so that whatever the shared model can explain is not
   absorbed by them.
4. **Quality.** Too few matches, no significant pattern, or a residual scatter above the limit
   give ``success = False`` with the reason; the stage turns that into a quality flag.

The solution maps chip pixels to the sky (:meth:`AstrometrySolution.pixel_to_sky`) and gives
each chip a TAN-SIP WCS (:meth:`AstrometrySolution.chip_wcs`) that includes its chip terms.

Conventions: chip pixels 0-based (centre of pixel ``[j, i]`` at ``(i, j)``); focal-plane pixels
relative to the optical axis (:mod:`ps1mpi.geometry.camera`); proper motions in mas/yr with
``pmra`` = mu_alpha* (including cos dec); epochs in Julian years; MJD for the exposure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.spatial import cKDTree
from scipy.stats import poisson

from ps1mpi.geometry.focalplane import (Distortion, FocalPlaneModel, gnomonic_forward,
                                        gnomonic_inverse)

__all__ = [
    "ChipTerms",
    "PatternMatch",
    "AstrometrySolution",
    "propagate_proper_motion",
    "mjd_to_julian_year",
    "pattern_match",
    "solve_exposure_astrometry",
]

_DEG = math.pi / 180.0
_MAS = _DEG / 3.6e6
_MJD_J2000 = 51544.5


def mjd_to_julian_year(mjd: float | np.ndarray) -> float | np.ndarray:
    """Julian epoch (years) of an MJD: ``2000 + (mjd - 51544.5) / 365.25``."""
    return 2000.0 + (np.asarray(mjd, dtype=float) - _MJD_J2000) / 365.25


def propagate_proper_motion(ra: np.ndarray, dec: np.ndarray, pmra: np.ndarray,
                            pmdec: np.ndarray, years: float | np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Move positions along their proper motions.

    The displacement ``(pmra, pmdec) * years`` is applied along the local East and North unit
    vectors and the result renormalised onto the sphere, which is valid at the poles too.

    Parameters
    ----------
    ra, dec : ndarray
        Positions at the catalog epoch (degrees).
    pmra, pmdec : ndarray
        Proper motions (mas/yr); ``pmra`` includes cos(dec). NaN is treated as zero.
    years : float or ndarray
        Time from the catalog epoch to the target epoch (Julian years).

    Returns
    -------
    ra, dec : ndarray
        Positions at the target epoch (degrees).
    """
    a = np.asarray(ra, dtype=float) * _DEG
    d = np.asarray(dec, dtype=float) * _DEG
    mu_a = np.nan_to_num(np.asarray(pmra, dtype=float)) * _MAS * years
    mu_d = np.nan_to_num(np.asarray(pmdec, dtype=float)) * _MAS * years
    ca, sa, cd, sd = np.cos(a), np.sin(a), np.cos(d), np.sin(d)
    p = np.stack([cd * ca, cd * sa, sd])
    east = np.stack([-sa, ca, np.zeros_like(a)])
    north = np.stack([-sd * ca, -sd * sa, cd])
    v = p + east * mu_a + north * mu_d
    v /= np.linalg.norm(v, axis=0)
    ra_new = np.mod(np.arctan2(v[1], v[0]) / _DEG, 360.0)
    dec_new = np.arctan2(v[2], np.hypot(v[0], v[1])) / _DEG
    return ra_new, dec_new


# ----------------------------------------------------------------------------------------------
# Chip terms and the solution
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChipTerms:
    """How one chip departs from its nominal place in the focal plane.

    ``X' = X + dx + a11 (X - xc) + a12 (Y - yc)``, ``Y' = Y + dy + a21 (X - xc) + a22 (Y - yc)``
    with ``a11 = scale + e1``, ``a22 = scale - e1``, ``a12 = -rot + e2``, ``a21 = rot + e2``;
    ``(X, Y)`` the nominal focal-plane position from the camera layout and ``(xc, yc)`` the
    chip centre there.

    Attributes
    ----------
    dx, dy : float
        Offset (focal-plane px).
    rot : float
        Rotation (radians, counter-clockwise in the focal plane).
    scale, e1, e2 : float
        Isotropic scale change and the two shear terms (dimensionless; zero unless the
        solution was made with ``chip_terms="affine"``).
    xc, yc : float
        Chip centre in the focal plane (px).
    n_stars : int
        Matched stars on the chip in the final fit.
    """

    dx: float = 0.0
    dy: float = 0.0
    rot: float = 0.0
    scale: float = 0.0
    e1: float = 0.0
    e2: float = 0.0
    xc: float = 0.0
    yc: float = 0.0
    n_stars: int = 0

    def matrix(self) -> np.ndarray:
        """The 2x2 linear part ``[[a11, a12], [a21, a22]]``."""
        return np.array([[self.scale + self.e1, -self.rot + self.e2],
                         [self.rot + self.e2, self.scale - self.e1]])

    def apply(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nominal focal-plane positions to corrected ones (px)."""
        a = self.matrix()
        X = np.asarray(X, dtype=float)
        Y = np.asarray(Y, dtype=float)
        u, v = X - self.xc, Y - self.yc
        return (X + self.dx + a[0, 0] * u + a[0, 1] * v,
                Y + self.dy + a[1, 0] * u + a[1, 1] * v)

    def invert(self, Xp: np.ndarray, Yp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Corrected focal-plane positions back to nominal ones (exact, px)."""
        m = np.eye(2) + self.matrix()
        inv = np.linalg.inv(m)
        u = np.asarray(Xp, dtype=float) - self.xc - self.dx
        v = np.asarray(Yp, dtype=float) - self.yc - self.dy
        return (self.xc + inv[0, 0] * u + inv[0, 1] * v,
                self.yc + inv[1, 0] * u + inv[1, 1] * v)

    def to_dict(self) -> dict[str, float]:
        """Plain values."""
        return {k: (int(v) if k == "n_stars" else float(v)) for k, v in self.__dict__.items()}


class _ChipTermCamera:
    """A camera whose chip-to-focal mapping includes the solved chip terms (duck-typed)."""

    def __init__(self, camera: Any, terms: Mapping[str, ChipTerms]) -> None:
        self._camera = camera
        self._terms = terms

    def __getattr__(self, name: str) -> Any:
        return getattr(self._camera, name)

    def chip_to_focal(self, chip: str, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        X, Y = self._camera.chip_to_focal(chip, x, y)
        t = self._terms.get(str(chip).upper())
        return (X, Y) if t is None else t.apply(X, Y)

    def focal_to_chip(self, chip: str, X: Any, Y: Any) -> tuple[np.ndarray, np.ndarray]:
        t = self._terms.get(str(chip).upper())
        if t is not None:
            X, Y = t.invert(X, Y)
        return self._camera.focal_to_chip(chip, X, Y)


@dataclass
class PatternMatch:
    """Result of :func:`pattern_match`.

    Attributes
    ----------
    offset : tuple of float
        Shift (tangent-plane px) to add to the rotated detections to land on the references.
    rotation : float
        Rotation of the detections about the optical axis (radians, counter-clockwise).
    peak : int
        Pairs voting for the solution.
    background : float
        Expected votes in a cell by chance.
    significance : float
        ``(peak - background) / sqrt(background)``.
    success : bool
        True when the peak is significant.
    reason : str
        Why not, otherwise.
    """

    offset: tuple[float, float]
    rotation: float
    peak: int
    background: float
    significance: float
    success: bool
    reason: str = ""


@dataclass
class AstrometrySolution:
    """Astrometric solution of one exposure.

    Attributes
    ----------
    model : FocalPlaneModel
        The shared focal-plane model (boresight, PA, scale, distortion).
    camera : Camera
        The camera geometry it applies to.
    chip_offsets : dict
        Per-chip terms :class:`ChipTerms`, keyed by chip name.
    det_index, ref_index : ndarray of int
        Matched pairs of the final iteration (indices into the input detections and
        reference stars).
    used : ndarray of bool
        Which of those pairs survived clipping and entered the fit.
    n_matched : int
        Number of pairs used.
    rms_mas : tuple of float
        RMS residuals (det - ref) of the used pairs along RA (times cos Dec), along Dec, and
        the 2-D total ``sqrt(rms_ra**2 + rms_dec**2)`` (milliarcseconds).
    dra_mas, ddec_mas : ndarray
        Sky residuals of all final pairs (mas).
    dX, dY : ndarray
        Focal-plane residuals of all final pairs (px).
    success : bool
        True when the solution is acceptable.
    reason : str
        Why it failed (empty on success).
    pattern : PatternMatch or None
        The initial pattern match.
    n_iter : int
        Match-and-fit iterations made.
    match_radius : float
        Final match radius (px).
    mjd : float
        Exposure epoch (MJD).
    """

    model: FocalPlaneModel
    camera: Any
    chip_offsets: dict[str, ChipTerms] = field(default_factory=dict)
    det_index: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    ref_index: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    used: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    n_matched: int = 0
    rms_mas: tuple[float, float, float] = (np.nan, np.nan, np.nan)
    dra_mas: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ddec_mas: np.ndarray = field(default_factory=lambda: np.zeros(0))
    dX: np.ndarray = field(default_factory=lambda: np.zeros(0))
    dY: np.ndarray = field(default_factory=lambda: np.zeros(0))
    success: bool = False
    reason: str = ""
    pattern: PatternMatch | None = None
    n_iter: int = 0
    match_radius: float = np.nan
    mjd: float = np.nan

    def _cam(self) -> _ChipTermCamera:
        return _ChipTermCamera(self.camera, self.chip_offsets)

    def chip_to_focal(self, chip: str, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Chip pixels to corrected focal-plane pixels (chip terms applied)."""
        return self._cam().chip_to_focal(chip, x, y)

    def pixel_to_sky(self, chip: str, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Chip pixels to sky (degrees), chip terms included.

        Parameters
        ----------
        chip : str
            Chip name.
        x, y : array_like
            Chip pixel coordinates (0-based, px).
        """
        return self.model.focal_to_sky(*self.chip_to_focal(chip, x, y))

    def sky_to_pixel(self, chip: str, ra: Any, dec: Any) -> tuple[np.ndarray, np.ndarray]:
        """Sky (degrees) to chip pixels (0-based, px; not restricted to the chip)."""
        return self._cam().focal_to_chip(chip, *self.model.sky_to_focal(ra, dec))

    def chip_wcs(self, chip: str, *, sip_order: int = 3, ngrid: int = 16) -> Any:
        """TAN-SIP WCS of one chip including its chip terms.

        Parameters
        ----------
        chip : str
            Chip name.
        sip_order : int
            SIP polynomial order.
        ngrid : int
            Fit grid points per axis.

        Returns
        -------
        astropy.wcs.WCS
            Use ``origin=0`` with astropy for the 0-based chip pixel convention.
        """
        return self.model.chip_wcs(self._cam(), chip, sip_order=sip_order, ngrid=ngrid)

    def to_dict(self) -> dict[str, Any]:
        """Plain-value description (model, chip terms, statistics) for headers and ledgers."""
        return {
            "model": self.model.to_dict(),
            "chip_terms": {k: v.to_dict() for k, v in self.chip_offsets.items()},
            "n_matched": int(self.n_matched),
            "rms_mas": [float(v) for v in self.rms_mas],
            "success": bool(self.success), "reason": self.reason,
            "n_iter": int(self.n_iter), "match_radius": float(self.match_radius),
            "mjd": float(self.mjd),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], camera: Any) -> "AstrometrySolution":
        """Rebuild a solution (without the per-star arrays) from :meth:`to_dict`."""
        terms = {str(k): ChipTerms(**{kk: (int(vv) if kk == "n_stars" else float(vv))
                                      for kk, vv in v.items()})
                 for k, v in d.get("chip_terms", {}).items()}
        rms = tuple(float(v) for v in d.get("rms_mas", (np.nan,) * 3))
        return cls(model=FocalPlaneModel.from_dict(dict(d["model"])), camera=camera,
                   chip_offsets=terms, n_matched=int(d.get("n_matched", 0)),
                   rms_mas=(rms[0], rms[1], rms[2]), success=bool(d.get("success", False)),
                   reason=str(d.get("reason", "")), n_iter=int(d.get("n_iter", 0)),
                   match_radius=float(d.get("match_radius", np.nan)),
                   mjd=float(d.get("mjd", np.nan)))


# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------

def _column(table: Any, names: Sequence[str], what: str, *, required: bool = True) -> Any:
    keys = None
    if hasattr(table, "dtype") and getattr(table.dtype, "names", None):
        keys = list(table.dtype.names)
    elif hasattr(table, "colnames"):
        keys = list(table.colnames)
    elif isinstance(table, Mapping):
        keys = list(table.keys())
    if keys is None:
        raise TypeError(f"{what}: expected a mapping, structured array or table, "
                        f"got {type(table).__name__}")
    lower = {str(k).lower(): k for k in keys}
    for n in names:
        if n.lower() in lower:
            return np.asarray(table[lower[n.lower()]])
    if required:
        raise ValueError(f"{what}: missing column {names[0]!r} (have {sorted(map(str, keys))})")
    return None


def _tangent_pixels(model: FocalPlaneModel, ra: np.ndarray, dec: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sky to the model's tangent-plane pixel frame (before distortion), with validity."""
    xi, eta, cosc = gnomonic_forward(ra, dec, model.ra, model.dec)
    ok = cosc > 0.2
    P, Q = model.standard_to_tangent(np.where(ok, xi, 0.0), np.where(ok, eta, 0.0))
    return P, Q, ok


def _updated_model(model: FocalPlaneModel, t: np.ndarray, k: float, theta: float,
                   dist: Distortion) -> tuple[FocalPlaneModel, Distortion]:
    """Fold a fitted similarity ``P_ref = t + [[1+k, -theta], [theta, 1+k]] X' + D(X')`` into
    a new model (boresight, PA, scale) and return it with the distortion in its frame."""
    mag = math.hypot(1.0 + k, theta)
    ang = math.atan2(theta, 1.0 + k)
    xi0, eta0 = model.tangent_to_standard(t[0], t[1])
    ra, dec = gnomonic_inverse(xi0, eta0, model.ra, model.dec)
    if dist.nterms:
        c, s = math.cos(-ang), math.sin(-ang)
        cx = np.asarray(dist.coeffs_x)
        cy = np.asarray(dist.coeffs_y)
        dist = Distortion(dist.order, (c * cx - s * cy) / mag, (s * cx + c * cy) / mag,
                          norm=dist.norm)
    new = FocalPlaneModel(float(ra), float(dec), (model.pa + ang / _DEG + 180.0) % 360.0 - 180.0,
                          model.scale * mag, dist)
    return new, dist


# ----------------------------------------------------------------------------------------------
# Pattern matching
# ----------------------------------------------------------------------------------------------

def pattern_match(det_P: np.ndarray, det_Q: np.ndarray, ref_P: np.ndarray, ref_Q: np.ndarray,
                  *, max_offset: float, max_rotation: float = 1.5 * _DEG,
                  bin_size: float = 16.0, min_peak: int = 6, min_significance: float = 5.0,
                  max_false_alarm: float = 1e-3, max_pairs: int = 4_000_000) -> PatternMatch:
    """Find the offset and rotation that bring detections onto reference stars.

    For each rotation on a grid (steps small enough that the rotation smears the farthest
    detection by less than ``bin_size``), every detection-reference pair votes for its offset
    in a 2-D histogram of cell ``bin_size`` limited to ``max_offset``; votes are summed over
    2x2 cells so a true offset on a cell border is not split. The best cell over all rotations
    wins; the offset is the median of its pairs.

    Parameters
    ----------
    det_P, det_Q : ndarray
        Bright detections in the tangent-plane pixel frame (px from the optical axis).
    ref_P, ref_Q : ndarray
        Bright reference stars in the same frame (px).
    max_offset : float
        Largest offset searched along each axis (px).
    max_rotation : float
        Largest rotation searched (radians).
    bin_size : float
        Histogram cell (px).
    min_peak : int
        Fewest votes for a valid match.
    min_significance : float
        Required ``(peak - background) / sqrt(background)``.
    max_false_alarm : float
        Largest accepted probability that noise alone gives such a peak somewhere among all
        the cells and rotations tried (Poisson statistics of the votes).
    max_pairs : int
        Pairs evaluated at once (memory bound).

    Returns
    -------
    PatternMatch
    """
    det = np.column_stack([det_P, det_Q]).astype(float)
    ref = np.column_stack([ref_P, ref_Q]).astype(float)
    if len(det) < 3 or len(ref) < 3:
        return PatternMatch((0.0, 0.0), 0.0, 0, 0.0, 0.0, False,
                            f"too few stars for pattern matching ({len(det)} detections, "
                            f"{len(ref)} reference stars)")
    rmax = float(np.max(np.hypot(det[:, 0], det[:, 1]))) + 1.0
    step = min(bin_size / rmax, 0.25 * _DEG)
    nrot = int(np.ceil(max_rotation / step))
    angles = np.arange(-nrot, nrot + 1) * step
    nb = int(np.ceil(2 * max_offset / bin_size)) + 1
    best = (-1, 0.0, 0, 0, 0.0)            # votes, angle, ix, iy, background
    chunk = max(1, int(max_pairs // max(len(ref), 1)))
    for ang in angles:
        c, s = math.cos(ang), math.sin(ang)
        rd = np.column_stack([c * det[:, 0] - s * det[:, 1], s * det[:, 0] + c * det[:, 1]])
        hist = np.zeros(nb * nb, np.int64)
        nwin = 0
        for a in range(0, len(rd), chunk):
            dx = ref[None, :, 0] - rd[a:a + chunk, 0, None]
            dy = ref[None, :, 1] - rd[a:a + chunk, 1, None]
            sel = (np.abs(dx) < max_offset) & (np.abs(dy) < max_offset)
            ix = ((dx[sel] + max_offset) / bin_size).astype(np.int64)
            iy = ((dy[sel] + max_offset) / bin_size).astype(np.int64)
            nwin += ix.size
            hist += np.bincount(iy * nb + ix, minlength=nb * nb)
        h = hist.reshape(nb, nb)
        h2 = h[:-1, :-1] + h[1:, :-1] + h[:-1, 1:] + h[1:, 1:]
        j, i = np.unravel_index(int(np.argmax(h2)), h2.shape)
        votes = int(h2[j, i])
        if votes > best[0]:
            bg = 4.0 * nwin / float(nb * nb)
            best = (votes, float(ang), int(i), int(j), bg)
    votes, ang, i, j, bg = best
    # pairs of the winning cell; refine rotation and offset by a clipped similarity fit
    c, s = math.cos(ang), math.sin(ang)
    rd = np.column_stack([c * det[:, 0] - s * det[:, 1], s * det[:, 0] + c * det[:, 1]])
    lo_x, lo_y = i * bin_size - max_offset, j * bin_size - max_offset
    pi, pj = [], []
    for a in range(0, len(rd), chunk):
        dx = ref[None, :, 0] - rd[a:a + chunk, 0, None]
        dy = ref[None, :, 1] - rd[a:a + chunk, 1, None]
        sel = ((dx >= lo_x - bin_size) & (dx < lo_x + 3 * bin_size)
               & (dy >= lo_y - bin_size) & (dy < lo_y + 3 * bin_size))
        ii, jj = np.nonzero(sel)
        pi.append(ii + a)
        pj.append(jj)
    pi = np.concatenate(pi) if pi else np.zeros(0, int)
    pj = np.concatenate(pj) if pj else np.zeros(0, int)
    offset = (0.0, 0.0)
    if pi.size >= 3:
        d_ = det[pi]
        r_ = ref[pj]
        keep = np.ones(pi.size, bool)
        sol = np.array([c, s, 0.0, 0.0])
        for _ in range(6):
            # ref = [[a, -b], [b, a]] det + t
            A = np.zeros((2 * keep.sum(), 4))
            dk = d_[keep]
            A[0::2] = np.column_stack([dk[:, 0], -dk[:, 1], np.ones(len(dk)), np.zeros(len(dk))])
            A[1::2] = np.column_stack([dk[:, 1], dk[:, 0], np.zeros(len(dk)), np.ones(len(dk))])
            sol = np.linalg.lstsq(A, r_[keep].ravel(), rcond=None)[0]
            px = sol[0] * d_[:, 0] - sol[1] * d_[:, 1] + sol[2] - r_[:, 0]
            py = sol[1] * d_[:, 0] + sol[0] * d_[:, 1] + sol[3] - r_[:, 1]
            res = np.hypot(px, py)
            lim = max(3.0 * 1.4826 * float(np.median(res[keep])), 1e-3 * bin_size)
            new = res <= lim
            if new.sum() < 3 or np.array_equal(new, keep):
                break
            keep = new
        ang = math.atan2(sol[1], sol[0])
        offset = (float(sol[2]), float(sol[3]))
    sig = (votes - bg) / math.sqrt(max(bg, 1.0))
    # false-alarm probability of the best of all cells and rotations tried
    n_trials = float(len(angles) * (nb - 1) ** 2)
    fap = min(1.0, float(poisson.sf(votes - 1, max(bg, 1e-3))) * n_trials)
    ok = votes >= min_peak and sig >= min_significance and fap < max_false_alarm
    reason = "" if ok else (f"no significant pattern match: best cell has {votes} pairs against "
                            f"{bg:.1f} expected by chance (false-alarm probability {fap:.2g} "
                            f"over {n_trials:.0f} cells and rotations)")
    return PatternMatch(offset, ang, votes, bg, float(sig), bool(ok), reason)


# ----------------------------------------------------------------------------------------------
# The fit
# ----------------------------------------------------------------------------------------------

def _match(det_P: np.ndarray, det_Q: np.ndarray, tree: cKDTree, radius: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one nearest-neighbour matches within ``radius``: (det idx, ref idx, distance)."""
    dist, idx = tree.query(np.column_stack([det_P, det_Q]), k=1, distance_upper_bound=radius)
    good = np.isfinite(dist)
    d_idx = np.flatnonzero(good)
    r_idx = idx[good]
    dist = dist[good]
    order = np.argsort(dist, kind="stable")
    _, first = np.unique(r_idx[order], return_index=True)
    keep = np.sort(order[first])
    return d_idx[keep], r_idx[keep], dist[keep]


_LOCAL_NAMES = {"none": (), "rotation": ("dx", "dy", "rot"),
                "affine": ("dx", "dy", "rot", "scale", "e1", "e2")}


def _design(X: np.ndarray, Y: np.ndarray, chip_id: np.ndarray, xc: np.ndarray, yc: np.ndarray,
            *, order: int, norm: float, chip_mode: str
            ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Design of the stacked P (first n rows) and Q (last n rows) equations.

    Returns the global columns (similarity, distortion), the local columns of each row's own
    chip (offset, rotation[, scale, shears] about the chip centre) and the global names.
    """
    n = X.size
    one, zero = np.ones(n), np.zeros(n)
    gP = [one, zero, X, -Y]
    gQ = [zero, one, Y, X]
    names = ["tx", "ty", "k", "theta"]
    if order >= 2:
        terms = Distortion.terms(order)
        Xn, Yn = X / norm, Y / norm
        mono = [Xn ** i * Yn ** j for i, j in terms]
        gP += mono + [zero] * len(mono)
        gQ += [zero] * len(mono) + mono
        names += [f"cx{i}{j}" for i, j in terms] + [f"cy{i}{j}" for i, j in terms]
    G = np.vstack([np.column_stack(gP), np.column_stack(gQ)])
    u = X - xc[chip_id]
    v = Y - yc[chip_id]
    local = {"dx": (one, zero), "dy": (zero, one), "rot": (-v, u), "scale": (u, v),
             "e1": (u, -v), "e2": (v, u)}
    lnames = _LOCAL_NAMES[chip_mode]
    if lnames:
        L = np.vstack([np.column_stack([local[k][0] for k in lnames]),
                       np.column_stack([local[k][1] for k in lnames])])
    else:
        L = np.zeros((2 * n, 0))
    return G, L, names


def _solve(G: np.ndarray, L: np.ndarray, chip_rows: np.ndarray, b: np.ndarray, w: np.ndarray,
           n_chips: int, local_sigma: np.ndarray, active_chip: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares for global parameters and per-chip local parameters.

    The local (chip) parameters carry zero-mean Gaussian priors of widths ``local_sigma``;
    chips not ``active_chip`` keep zero. The normal equations are assembled chip by chip
    (the local columns are block-sparse) and solved with column scaling.

    Returns
    -------
    g : ndarray
        Global parameters.
    loc : ndarray, shape (n_chips, n_local)
        Local parameters per chip.
    """
    ng, nl = G.shape[1], L.shape[1]
    Gw = G * w[:, None]
    bw = b * w
    act = np.flatnonzero(active_chip) if nl else np.zeros(0, int)
    nt = ng + nl * act.size
    N = np.zeros((nt, nt))
    rhs = np.zeros(nt)
    N[:ng, :ng] = Gw.T @ Gw
    rhs[:ng] = Gw.T @ bw
    if nl and act.size:
        Lw = L * w[:, None]
        order = np.argsort(chip_rows, kind="stable")
        bounds = np.searchsorted(chip_rows[order], np.arange(n_chips + 1))
        for slot, c in enumerate(act):
            rows = order[bounds[c]:bounds[c + 1]]
            s0 = ng + slot * nl
            Gc, Lc = Gw[rows], Lw[rows]
            N[:ng, s0:s0 + nl] = Gc.T @ Lc
            N[s0:s0 + nl, :ng] = N[:ng, s0:s0 + nl].T
            N[s0:s0 + nl, s0:s0 + nl] = Lc.T @ Lc + np.diag(1.0 / local_sigma ** 2)
            rhs[s0:s0 + nl] = Lc.T @ bw[rows]
    d = np.sqrt(np.maximum(np.diag(N), 1e-300))
    sol = np.linalg.lstsq(N / d[:, None] / d[None, :], rhs / d, rcond=1e-13)[0] / d
    loc = np.zeros((n_chips, nl))
    if nl and act.size:
        loc[act] = sol[ng:].reshape(act.size, nl)
    return sol[:ng], loc


def solve_exposure_astrometry(det: Any, ref: Any, *, camera: Any,
                              guess: FocalPlaneModel | Sequence[float] | Mapping[str, float],
                              mjd: float, filter: str | None = None,
                              ref_mag_column: str | None = None,
                              order: int = 3, distortion_norm: float | None = None,
                              chip_terms: str = "rotation",
                              max_offset_arcmin: float = 6.0, max_rotation_deg: float = 1.5,
                              pattern_bin: float = 16.0, n_pattern_det: int = 300,
                              max_pattern_ref: int = 4000,
                              radii: Sequence[float] = (20.0, 10.0, 5.0, 3.0, 3.0),
                              min_radius: float = 1.0, clip_sigma: float = 3.0,
                              n_clip: int = 3, sys_floor_px: float = 0.02,
                              chip_offset_sigma: float = 5.0, chip_rot_sigma: float = 1e-3,
                              chip_affine_sigma: float = 1e-3, max_fit_per_chip: int = 1000,
                              flag_mask: int | None = None, min_matches: int = 20,
                              min_matches_per_chip: int = 5, max_rms_mas: float = 300.0,
                              ) -> AstrometrySolution:
    """Solve the astrometry of one exposure: one focal-plane model plus chip terms.

    Parameters
    ----------
    det : mapping, structured array or table
        Detections of the whole exposure with columns ``chip`` (name), ``x``, ``y`` (chip px,
        0-based), and optionally ``x_err``, ``y_err`` (px), ``mag`` (instrumental; brighter
        first for pattern matching) and ``flags`` (nonzero & ``flag_mask`` excludes).
    ref : mapping, structured array or table
        Reference catalog subset covering the footprint padded for pointing errors: ``ra``,
        ``dec`` (degrees), optionally ``pmra``, ``pmdec`` (mas/yr, pmra including cos dec),
        ``epoch`` (Julian year), ``ra_err``, ``dec_err`` (mas) and magnitudes.
    camera : Camera
        Camera geometry.
    guess : FocalPlaneModel or (ra, dec, pa) or mapping
        Header boresight and position angle (degrees); a model also supplies the initial
        scale and distortion. Without a model the scale is the camera's pixel scale.
    mjd : float
        Exposure mid-time (MJD) for the proper motions.
    filter : str, optional
        Exposure filter; selects the reference magnitude used to rank reference stars.
    ref_mag_column : str, optional
        Reference magnitude column for ranking (overrides ``filter``).
    order : int
        Distortion polynomial order (0 or 1: none).
    distortion_norm : float, optional
        Distortion normalisation radius (px); default the guess model's, else the largest
        focal-plane half-extent.
    chip_terms : {"rotation", "affine", "none"}
        Per-chip terms: offset and rotation (IPP-like default), full affine, or none.
    max_offset_arcmin : float
        Largest pointing error searched (arcmin).
    max_rotation_deg : float
        Largest rotation error searched (degrees).
    pattern_bin : float
        Offset histogram cell (px).
    n_pattern_det : int
        Brightest detections used for pattern matching.
    max_pattern_ref : int
        Most reference stars used for pattern matching.
    radii : sequence of float
        Match radii (px) of the successive iterations; the last is repeated until the matches
        stop changing (at most twice more). Each radius is also kept above ``5 x`` the current
        RMS and the first one above the pattern-match accuracy.
    min_radius : float
        Smallest match radius (px).
    clip_sigma : float
        Outlier rejection threshold.
    n_clip : int
        Clipping passes per iteration.
    sys_floor_px : float
        Error floor added to every star (px).
    chip_offset_sigma, chip_rot_sigma, chip_affine_sigma : float
        Prior widths of the chip terms (px, radians, dimensionless).
    max_fit_per_chip : int
        Most (brightest) matched stars per chip entering the fit.
    flag_mask : int, optional
        Detection flag bits that exclude a detection; None excludes any nonzero flag.
    min_matches : int
        Fewest matched stars for a valid solution.
    min_matches_per_chip : int
        Chips with fewer matches keep their prior (zero) chip terms.
    max_rms_mas : float
        Largest acceptable 2-D RMS residual (mas).

    Returns
    -------
    AstrometrySolution
        ``success`` False with a ``reason`` for bad data (too few matches, no pattern,
        large residuals); the model is then the best available (possibly the guess).
    """
    if chip_terms not in ("rotation", "affine", "none"):
        raise ValueError(f"chip_terms: must be 'rotation', 'affine' or 'none', got {chip_terms!r}")
    if not np.isfinite(mjd):
        raise ValueError(f"mjd: must be finite, got {mjd!r}")
    # ---- guess model
    if isinstance(guess, FocalPlaneModel):
        model = guess
    elif isinstance(guess, Mapping):
        model = FocalPlaneModel(float(guess["ra"]), float(guess["dec"]),
                                float(guess.get("pa", 0.0)),
                                float(guess.get("scale", camera.pixel_scale)))
    else:
        g = list(guess)
        if len(g) != 3:
            raise ValueError(f"guess: expected (ra, dec, pa) in degrees, got {guess!r}")
        model = FocalPlaneModel(float(g[0]), float(g[1]), float(g[2]), float(camera.pixel_scale))
    guess_model = model
    xmin, xmax, ymin, ymax = camera.focal_plane_extent()
    if distortion_norm is None:
        distortion_norm = (model.distortion.norm if model.distortion.nterms
                           else max(abs(xmin), abs(xmax), abs(ymin), abs(ymax)))
    norm = float(distortion_norm)
    order = int(order) if order >= 2 else 0
    dist = model.distortion
    if dist.nterms and (dist.order != order or dist.norm != norm):
        # re-express the guess distortion with the fitted order and norm
        gx, gy = np.meshgrid(np.linspace(xmin, xmax, 15), np.linspace(ymin, ymax, 15))
        P, Q = dist.apply(gx.ravel(), gy.ravel())
        dist = (Distortion.fit(gx.ravel(), gy.ravel(), P, Q, order=order, norm=norm)
                if order >= 2 else Distortion.none())
        model = FocalPlaneModel(model.ra, model.dec, model.pa, model.scale, dist)

    # ---- detections
    chip = np.char.upper(_column(det, ("chip", "chip_name", "ota"), "det").astype(str))
    x = _column(det, ("x", "x_psf", "xccd"), "det").astype(float)
    y = _column(det, ("y", "y_psf", "yccd"), "det").astype(float)
    n_det = x.size
    if chip.shape != (n_det,) or y.shape != (n_det,):
        raise ValueError("det: columns chip, x, y must have the same length")
    xe = _column(det, ("x_err", "x_psf_sig", "xerr"), "det", required=False)
    ye = _column(det, ("y_err", "y_psf_sig", "yerr"), "det", required=False)
    xe = np.full(n_det, 0.1) if xe is None else np.asarray(xe, float)
    ye = np.full(n_det, 0.1) if ye is None else np.asarray(ye, float)
    dmag = _column(det, ("mag", "inst_mag", "psf_inst_mag"), "det", required=False)
    dmag = np.zeros(n_det) if dmag is None else np.asarray(dmag, float)
    flags = _column(det, ("flags", "flag"), "det", required=False)
    good = np.isfinite(x) & np.isfinite(y)
    if flags is not None:
        fl = np.asarray(flags).astype(np.int64)
        good &= (fl == 0) if flag_mask is None else ((fl & int(flag_mask)) == 0)
    names = [c for c in camera.chip_names]
    name_to_id = {c: k for k, c in enumerate(names)}
    unknown = sorted(set(np.unique(chip[good]).tolist()) - set(names))
    if unknown:
        raise ValueError(f"det: chips {unknown} are not chips of camera {camera.name}")
    chip_id = np.array([name_to_id.get(c, -1) for c in chip])
    X = np.full(n_det, np.nan)
    Y = np.full(n_det, np.nan)
    for c in np.unique(chip[good]):
        sel = good & (chip == c)
        X[sel], Y[sel] = camera.chip_to_focal(str(c), x[sel], y[sel])
    xc = np.zeros(len(names))
    yc = np.zeros(len(names))
    for k, c in enumerate(names):
        cx_, cy_ = camera.chip_to_focal(c, 0.5 * (camera.chip_nx - 1), 0.5 * (camera.chip_ny - 1))
        xc[k], yc[k] = float(cx_), float(cy_)
    sig_det = np.sqrt(0.5 * (np.nan_to_num(xe, nan=0.1) ** 2 + np.nan_to_num(ye, nan=0.1) ** 2))

    # ---- reference stars at the exposure epoch
    ra = _column(ref, ("ra", "raj2000", "ra_deg"), "ref").astype(float)
    dec = _column(ref, ("dec", "dej2000", "dec_deg"), "ref").astype(float)
    n_ref = ra.size
    pmra = _column(ref, ("pmra",), "ref", required=False)
    pmdec = _column(ref, ("pmdec",), "ref", required=False)
    epoch = _column(ref, ("epoch", "ref_epoch"), "ref", required=False)
    years = 0.0
    if pmra is not None and pmdec is not None:
        t_exp = float(mjd_to_julian_year(mjd))
        ep = (np.full(n_ref, 2000.0) if epoch is None
              else np.asarray(epoch, float) * np.ones(n_ref))
        years = t_exp - ep
        ra, dec = propagate_proper_motion(ra, dec, pmra, pmdec, years)
    rae = _column(ref, ("ra_err", "raerr", "e_ra"), "ref", required=False)
    dee = _column(ref, ("dec_err", "decerr", "e_dec"), "ref", required=False)
    ref_sig_mas = np.zeros(n_ref)
    if rae is not None and dee is not None:
        ref_sig_mas = np.sqrt(0.5 * (np.nan_to_num(np.asarray(rae, float)) ** 2
                                     + np.nan_to_num(np.asarray(dee, float)) ** 2))
    pmre = _column(ref, ("pmra_err", "e_pmra"), "ref", required=False)
    pmde = _column(ref, ("pmdec_err", "e_pmdec"), "ref", required=False)
    if pmre is not None and pmde is not None:
        ref_sig_mas = np.sqrt(ref_sig_mas ** 2 + 0.5 * (
            (np.nan_to_num(np.asarray(pmre, float)) * years) ** 2
            + (np.nan_to_num(np.asarray(pmde, float)) * years) ** 2))
    ref_sig_px = ref_sig_mas / 1000.0 / model.scale
    rank_col = None
    cands = [ref_mag_column] if ref_mag_column else []
    if filter:
        cands.append(str(filter).split(".")[0])
    cands += ["mag", "r", "i", "g", "z", "y"]
    for cname in cands:
        if cname is None:
            continue
        rank_col = _column(ref, (cname, f"{cname}_mag"), "ref", required=False)
        if rank_col is not None:
            break
    rmag = np.zeros(n_ref) if rank_col is None else np.asarray(rank_col, float)
    rgood = np.isfinite(ra) & np.isfinite(dec)

    sol = AstrometrySolution(model=guess_model, camera=camera, mjd=float(mjd))
    usable = np.flatnonzero(good)
    if usable.size < min_matches:
        sol.reason = f"only {usable.size} usable detections (need {min_matches})"
        return sol
    if rgood.sum() < min_matches:
        sol.reason = f"only {int(rgood.sum())} reference stars (need {min_matches})"
        return sol

    # ---- pattern match (no chip terms, guess distortion)
    P_det, Q_det = model.distortion.apply(X, Y)
    P_ref, Q_ref, vis = _tangent_pixels(model, ra, dec)
    max_off = max_offset_arcmin * 60.0 / model.scale
    box = (np.nanmin(P_det[usable]) - max_off, np.nanmax(P_det[usable]) + max_off,
           np.nanmin(Q_det[usable]) - max_off, np.nanmax(Q_det[usable]) + max_off)
    in_box = (rgood & vis & (P_ref > box[0]) & (P_ref < box[1]) & (Q_ref > box[2])
              & (Q_ref < box[3]))
    bright_det = usable[np.argsort(np.where(np.isfinite(dmag[usable]), dmag[usable], np.inf),
                                   kind="stable")[:n_pattern_det]]
    det_area = ((np.nanmax(P_det[usable]) - np.nanmin(P_det[usable]))
                * (np.nanmax(Q_det[usable]) - np.nanmin(Q_det[usable])))
    box_area = (box[1] - box[0]) * (box[3] - box[2])
    n_pr = int(min(max_pattern_ref, max(3 * len(bright_det),
                                        len(bright_det) * box_area / max(det_area, 1.0))))
    cand_ref = np.flatnonzero(in_box)
    bright_ref = cand_ref[np.argsort(np.where(np.isfinite(rmag[cand_ref]), rmag[cand_ref], np.inf),
                                     kind="stable")[:n_pr]]
    pm = pattern_match(P_det[bright_det], Q_det[bright_det], P_ref[bright_ref], Q_ref[bright_ref],
                       max_offset=max_off, max_rotation=max_rotation_deg * _DEG,
                       bin_size=pattern_bin)
    sol.pattern = pm
    if not pm.success:
        sol.reason = pm.reason
        return sol
    # P_ref = R (X + D(X)) + offset: the distortion rotates with the frame, so it is unchanged
    dist = model.distortion
    model, _ = _updated_model(model, np.array(pm.offset), math.cos(pm.rotation) - 1.0,
                              math.sin(pm.rotation), Distortion.none())
    model = FocalPlaneModel(model.ra, model.dec, model.pa, model.scale, dist)

    # ---- iterative match and fit
    chip_mode = chip_terms
    terms = {c: ChipTerms(xc=xc[k], yc=yc[k]) for k, c in enumerate(names)}
    n_chips = len(names)
    n_chip_par = {"none": 0, "rotation": 3, "affine": 6}[chip_mode]
    rms_px = np.inf
    pattern_acc = pattern_bin * 2.0 + 2.0
    sched = list(radii)
    if not sched:
        raise ValueError("radii: need at least one match radius")
    sched = sched + [sched[-1]] * 2
    d_idx = r_idx = np.zeros(0, int)
    keep = np.zeros(0, bool)
    prev_pairs: set[tuple[int, int]] | None = None
    it = 0
    radius = float(sched[0])
    prev_radius = np.inf
    for it, r_sched in enumerate(sched):
        radius = max(float(r_sched), min_radius)
        if it == 0:
            radius = max(radius, pattern_acc)
        elif np.isfinite(rms_px):
            # not below 5x the scatter, never wider than the previous radius
            radius = min(max(radius, 5.0 * rms_px, min_radius), prev_radius)
        prev_radius = radius
        fit_order = order if it >= 1 else 0
        use_chips = chip_mode if (it >= 2 and n_chip_par) else "none"
        # positions in the current frame
        Xc_ = X.copy()
        Yc_ = Y.copy()
        for k, c in enumerate(names):
            sel = good & (chip_id == k)
            if sel.any():
                Xc_[sel], Yc_[sel] = terms[c].apply(X[sel], Y[sel])
        Pd, Qd = dist.apply(np.nan_to_num(Xc_), np.nan_to_num(Yc_))
        P_ref, Q_ref, vis = _tangent_pixels(model, ra, dec)
        ref_ok = np.flatnonzero(rgood & vis)
        tree = cKDTree(np.column_stack([P_ref[ref_ok], Q_ref[ref_ok]]))
        di, ri, _ = _match(Pd[usable], Qd[usable], tree, radius)
        d_idx, r_idx = usable[di], ref_ok[ri]
        # at most max_fit_per_chip brightest per chip
        if max_fit_per_chip and d_idx.size:
            order_b = np.lexsort((np.where(np.isfinite(dmag[d_idx]), dmag[d_idx], np.inf),
                                  chip_id[d_idx]))
            cid = chip_id[d_idx][order_b]
            first = np.searchsorted(cid, cid, side="left")
            rank = np.arange(cid.size) - first
            sel_b = np.sort(order_b[rank < max_fit_per_chip])
            d_idx, r_idx = d_idx[sel_b], r_idx[sel_b]
        n_par = 4 + (2 * len(Distortion.terms(fit_order)) if fit_order >= 2 else 0)
        if d_idx.size < max(min_matches, n_par + 2):
            sol.model, sol.reason, sol.n_iter = model, (
                f"only {d_idx.size} matches within {radius:.1f} px at iteration {it} "
                f"(need {max(min_matches, n_par + 2)})"), it + 1
            sol.match_radius = radius
            return sol
        # chips with too few matches keep zero terms
        cnt = np.bincount(chip_id[d_idx], minlength=n_chips)
        sig = np.sqrt(sig_det[d_idx] ** 2 + ref_sig_px[r_idx] ** 2 + sys_floor_px ** 2)
        G, L, cols = _design(Xc_[d_idx], Yc_[d_idx], chip_id[d_idx], xc, yc,
                             order=fit_order, norm=norm, chip_mode=use_chips)
        lnames = _LOCAL_NAMES[use_chips]
        local_sigma = np.array([{"dx": chip_offset_sigma, "dy": chip_offset_sigma,
                                 "rot": chip_rot_sigma}.get(k, chip_affine_sigma)
                                for k in lnames])
        rows_chip = np.concatenate([chip_id[d_idx], chip_id[d_idx]])
        # right-hand side: reference minus nominal focal position (minus a fixed distortion)
        bP = P_ref[r_idx] - X[d_idx]
        bQ = Q_ref[r_idx] - Y[d_idx]
        if fit_order < 2 and dist.nterms:
            oX, oY = dist.offsets(Xc_[d_idx], Yc_[d_idx])
            bP, bQ = bP - oX, bQ - oY
        b = np.concatenate([bP, bQ])
        nd = d_idx.size
        keep = np.ones(nd, bool)
        gsol = np.zeros(len(cols))
        lsol = np.zeros((n_chips, len(lnames)))
        for npass in range(max(1, n_clip) + 1):
            w = np.concatenate([keep / sig, keep / sig])
            gsol, lsol = _solve(G, L, rows_chip, b, w, n_chips, local_sigma,
                                cnt >= min_matches_per_chip)
            r = b - G @ gsol
            if len(lnames):
                r -= np.einsum("ij,ij->i", L, lsol[rows_chip])
            rP, rQ = r[:nd], r[nd:]
            if npass == max(1, n_clip):
                break                      # the last pass only refits with the final sample
            z = np.hypot(rP, rQ) / sig
            s_rob = max(float(np.median(z[keep])) / 1.1774, 1.0)
            new_keep = z <= clip_sigma * s_rob
            if new_keep.sum() < max(min_matches, n_par + 2) or np.array_equal(new_keep, keep):
                break
            keep = new_keep
        # unpack the solution
        par = dict(zip(cols, gsol))
        for j, k in enumerate(lnames):
            for c in range(n_chips):
                par[f"chip{c}.{k}"] = lsol[c, j]
        t = np.array([par["tx"], par["ty"]])
        if fit_order >= 2:
            tt = Distortion.terms(fit_order)
            dist = Distortion(fit_order, [par[f"cx{i}{j}"] for i, j in tt],
                              [par[f"cy{i}{j}"] for i, j in tt], norm=norm)
        new_terms = {}
        for k, c in enumerate(names):
            if use_chips == "none":
                new_terms[c] = ChipTerms(xc=xc[k], yc=yc[k], n_stars=int(cnt[k]))
                continue
            get = lambda p: float(par.get(f"chip{k}.{p}", 0.0))  # noqa: E731
            new_terms[c] = ChipTerms(get("dx"), get("dy"), get("rot"), get("scale"), get("e1"),
                                     get("e2"), xc[k], yc[k], int(cnt[k]))
        terms = new_terms
        model, dist = _updated_model(model, t, float(par["k"]), float(par["theta"]), dist)
        rms_px = (float(np.sqrt(np.mean(rP[keep] ** 2 + rQ[keep] ** 2) / 2.0))
                  if keep.any() else np.inf)
        pairs = set(zip(d_idx[keep].tolist(), r_idx[keep].tolist()))
        if it >= len(radii) - 1 and prev_pairs is not None and pairs == prev_pairs:
            break
        prev_pairs = pairs

    # ---- statistics in the final model
    sol.model = model
    sol.chip_offsets = terms
    sol.det_index, sol.ref_index, sol.used = d_idx, r_idx, keep
    sol.n_iter = it + 1
    sol.match_radius = radius
    Xf, Yf = X[d_idx].copy(), Y[d_idx].copy()
    for k, c in enumerate(names):
        sel = chip_id[d_idx] == k
        if sel.any():
            Xf[sel], Yf[sel] = terms[c].apply(Xf[sel], Yf[sel])
    ra_p, dec_p = model.focal_to_sky(Xf, Yf)
    cosd = np.cos(dec[r_idx] * _DEG)
    dra = ((ra_p - ra[r_idx] + 180.0) % 360.0 - 180.0) * cosd * 3.6e6
    ddec = (dec_p - dec[r_idx]) * 3.6e6
    Pp, Qp = model.distortion.apply(Xf, Yf)
    P_ref, Q_ref, _ = _tangent_pixels(model, ra[r_idx], dec[r_idx])
    sol.dra_mas, sol.ddec_mas = dra, ddec
    sol.dX, sol.dY = Pp - P_ref, Qp - Q_ref
    sol.n_matched = int(keep.sum())
    if sol.n_matched:
        r1 = float(np.sqrt(np.mean(dra[keep] ** 2)))
        r2 = float(np.sqrt(np.mean(ddec[keep] ** 2)))
        sol.rms_mas = (r1, r2, math.hypot(r1, r2))
    if sol.n_matched < min_matches:
        sol.reason = f"only {sol.n_matched} matched stars (need {min_matches})"
    elif not sol.rms_mas[2] <= max_rms_mas:
        sol.reason = (f"residual RMS {sol.rms_mas[2]:.0f} mas exceeds the limit "
                      f"{max_rms_mas:.0f} mas")
    else:
        sol.success = True
    return sol
