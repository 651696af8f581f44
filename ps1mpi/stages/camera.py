"""camera: calibrate each exposure as a whole, collectively over a group of ranks (psastro).

One unit of work is one exposure (``camProcessedExp``, one element per ``camRun``), processed by
a group of ``camera.group_size`` ranks (a sub-communicator; see ``docs/camera-stage.md``):

define (rank 0)
    For every ``chipRun`` DONE with quality 0 and no ``camRun`` yet: one ``camRun`` and one
    ``camProcessedExp`` element. A chipRun with a faulted chip is not DONE, so it blocks its
    exposure; chips with bad quality are left out of the calibration (good chips only).
process (the group)
    1. *Read*: each rank reads a share of the good chips' catalogs
       (``chip/<exp>/<exp>.<chip>.cmf``) into a fixed-layout structured array.
    2. *Gather*: the arrays go to the group leader with :meth:`World.gatherv` (buffers, no
       pickles), sorted there into the serial order, so every group size gives the same fit.
    3. *Fit* (leader): reference stars in the footprint padded for pointing errors
       (``camera.refcat``), proper motions to the exposure epoch, pattern match and iterative
       fit of one focal-plane model plus chip terms
       (:func:`~ps1mpi.algorithms.astrometry.solve_exposure_astrometry`), zero point with colour
       terms (:func:`~ps1mpi.algorithms.photcal.fit_zero_point`), and the bright stars that
       make artefacts (reference stars projected through the solution, plus bright detections
       without a reference star), with instrumental magnitudes ``m_ref - zp``.
    4. *Broadcast*: the solution's numbers (:func:`pack_solution`) and the bright stars go to
       every rank with :meth:`World.bcast_array`. Bad data (too few matches, a bad fit, too few
       photometric stars) ends the unit here on every rank with ``quality != 0``.
    5. *Write*: each rank adds RA_PSF, DEC_PSF, CAL_PSF_MAG ... to its chips' catalogs and ORs
       the dynamic masks (:func:`~ps1mpi.algorithms.dynamic_masks.artifacts_for_chip`) into
       its chips' masks, writing ``camera/<exp>/<exp>.<chip>.cmf`` and ``.mk.fits``; the
       binned chip images and the chips' WCS headers are gathered to the leader, which writes
       the focal-plane JPEG (Pillow) and, last, the solution ``camera/<exp>/<exp>.astrom.fits``.

Every collective step is preceded by :meth:`World.agree`, so a rank that failed (a missing
catalog, an exception in the fit) makes the whole group raise the same fault instead of
leaving its peers waiting.

Zero points: ``PSF_INST_MAG = -2.5 log10(counts)`` with counts the electrons in the exposure;
the exposure zero point ``zp`` gives ``m = PSF_INST_MAG + zp``; ``ZPT_OBS = zp - 2.5
log10(EXPTIME)`` is the magnitude of 1 e-/s (what the warp stage reads).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..algorithms import maskbits
from ..algorithms.astrometry import (AstrometrySolution, ChipTerms, mjd_to_julian_year,
                                     propagate_proper_motion, solve_exposure_astrometry)
from ..algorithms.dynamic_masks import (BrightStars, DynamicMaskRules, artifacts_for_chip,
                                        default_rules, paint_artifacts)
from ..algorithms.jpeg import focal_plane_mosaic
from ..algorithms.photcal import (DEFAULT_COLOR_TERMS, ColorTerm, ZeroPoint, fit_zero_point,
                                  reference_system_mags)
from ..geometry.focalplane import Distortion, FocalPlaneModel
from ..infra.config import RecipeError
from ..infra.ledger import Ledger
from ..infra.products import atomic_output
from ..infra.runtime import ConfigError, DataError, Outcome, WorkUnit, fault_code
from ..infra.schema import State
from ..infra.world import World
from .base import Stage, StageContext

__all__ = ["CameraStage", "QUALITY", "INPUTS", "DET_DTYPE", "CAL_COLUMNS", "ReferenceCatalog",
           "ExposureCalibration", "calibrate_exposure", "detections_from_catalog",
           "detection_limits", "pack_solution", "unpack_solution", "read_camera_solution",
           "group_failure_check", "GroupFailure"]

#: camProcessedExp quality codes (bad data: the exposure goes no further)
QUALITY = {
    "no_pointing": 1,      # the header has no usable boresight or position angle
    "few_detections": 2,   # too few usable detections in the good chips' catalogs
    "few_references": 3,   # too few reference stars in the padded footprint
    "astrometry": 4,       # no significant pattern, too few matches, or residuals too large
    "photometry": 5,       # too few stars for the zero point
}

#: Products of the chip stage this stage reads (relative to the campaign root).
INPUTS = {
    "catalog": "chip/{exp_name}/{exp_name}.{chip}.cmf",
    "mask": "chip/{exp_name}/{exp_name}.{chip}.mk.fits",
    "binned": "chip/{exp_name}/{exp_name}.{chip}.b16.fits",
}

#: One detection as it travels to the group leader (fixed layout: a buffer, not a pickle).
DET_DTYPE = np.dtype([
    ("chip", "i2"),       # index into camera.chip_names
    ("row", "i4"),        # row in the chip catalog
    ("x", "f8"), ("y", "f8"),              # chip px, 0-based
    ("x_err", "f4"), ("y_err", "f4"),      # px
    ("mag", "f4"), ("mag_err", "f4"),      # -2.5 log10(e-), mag
    ("flags", "i8"),
])

#: Columns the camera stage adds to every catalog.
CAL_COLUMNS = {
    "RA_PSF": "Right ascension of the PSF position (deg, ICRS, exposure epoch)",
    "DEC_PSF": "Declination of the PSF position (deg)",
    "CAL_PSF_MAG": "Calibrated PSF magnitude PSF_INST_MAG + ZPT_EXP (mag)",
    "CAL_PSF_MAG_SIG": "Its statistical error, PSF_INST_MAG_SIG (mag; ZPT_ERR in the header)",
    "CAL_AP_MAG": "Calibrated aperture magnitude AP_MAG + ZPT_EXP (mag), when AP_MAG exists",
    "CAL_KRON_MAG": "Calibrated Kron magnitude -2.5 log10(KRON_FLUX) + ZPT_EXP (mag), when "
                    "KRON_FLUX exists",
}

_REQUIRED = ("X_PSF", "Y_PSF", "X_PSF_SIG", "Y_PSF_SIG", "PSF_INST_MAG", "PSF_INST_MAG_SIG",
             "FLAGS")
_CARD_BYTES = 80 * 256          # room for a chip's WCS header cards in a gathered record
_DEG = math.pi / 180.0


# ----------------------------------------------------------------------------- group failures

class GroupFailure(RuntimeError):
    """A peer in the calibration group failed; carries the peer's fault code."""

    def __init__(self, message: str, fault: int) -> None:
        super().__init__(message)
        self.fault = int(fault)


def group_failure_check(group: World, error: BaseException | None, what: str) -> None:
    """Agree that every rank of ``group`` got through a step; otherwise raise everywhere.

    Collective. A rank that failed re-raises its own exception; the others raise
    :class:`GroupFailure` with the first failing rank's fault code and message, so the unit is
    faulted with the real cause whichever rank reports it.

    Parameters
    ----------
    group : World
        The unit's group.
    error : BaseException or None
        This rank's failure in the step, if any.
    what : str
        The step, for the message.
    """
    if group.agree(error is None):
        return
    rec = np.zeros(1, [("fault", "i4"), ("msg", "S200")])
    if error is not None:
        rec[0] = (fault_code(error), f"rank {group.rank} ({what}): {type(error).__name__}: "
                  f"{error}".encode("utf-8", "replace")[:200])
    every = group.gatherv(rec)
    first = None
    if group.rank == 0:
        bad = every[every["fault"] > 0]
        first = (int(bad["fault"][0]), bad["msg"][0].decode("utf-8", "replace")) if bad.size \
            else (1, f"a peer failed ({what})")
    first = group.bcast_object(first)
    if error is not None:
        raise error
    raise GroupFailure(f"peer failed: {first[1]}", first[0])


# ----------------------------------------------------------------------------- reference stars

class ReferenceCatalog:
    """A reference catalog FITS table, read by cones around exposures.

    The positions are read once (and kept as unit vectors); a cone reads only its rows.

    Parameters
    ----------
    path : str or Path
        FITS file whose first binary table has at least ``RA`` and ``DEC`` (degrees).

    Raises
    ------
    ConfigError
        If the file is missing or has no RA/DEC table.
    """

    def __init__(self, path: str | Path) -> None:
        import fitsio

        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: reference catalog not found (recipe camera.refcat)")
        with fitsio.FITS(str(self.path)) as f:
            ext = next((i for i, h in enumerate(f) if h.get_exttype() == "BINARY_TBL"), None)
            if ext is None:
                raise ConfigError(f"{self.path}: no binary table (reference catalog)")
            hdu = f[ext]
            names = {n.upper(): n for n in hdu.get_colnames()}
            missing = [c for c in ("RA", "DEC") if c not in names]
            if missing:
                raise ConfigError(f"{self.path}: reference catalog lacks columns {missing}")
            ra = np.asarray(hdu.read_column(names["RA"]), np.float64)
            dec = np.asarray(hdu.read_column(names["DEC"]), np.float64)
        self.ext = ext
        self.columns = list(names.values())
        self.size = ra.size
        cd = np.cos(dec * _DEG)
        self._xyz = np.column_stack([cd * np.cos(ra * _DEG), cd * np.sin(ra * _DEG),
                                     np.sin(dec * _DEG)])

    def cone(self, ra: float, dec: float, radius_deg: float) -> np.ndarray:
        """Rows within ``radius_deg`` of ``(ra, dec)`` (degrees), all columns, file order."""
        import fitsio

        cd = math.cos(dec * _DEG)
        v = np.array([cd * math.cos(ra * _DEG), cd * math.sin(ra * _DEG), math.sin(dec * _DEG)])
        rows = np.flatnonzero(self._xyz @ v >= math.cos(min(radius_deg, 180.0) * _DEG))
        with fitsio.FITS(str(self.path)) as f:
            if rows.size == 0:
                return f[self.ext].read(rows=[0])[:0]
            return f[self.ext].read(rows=rows)


def _ref_bands(ref: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Reference magnitudes and errors by band (lower-case keys) from catalog columns."""
    names = {n.upper(): n for n in ref.dtype.names}
    mags, errs = {}, {}
    for b in "grizyw":
        if b.upper() in names:
            mags[b] = np.asarray(ref[names[b.upper()]], np.float64)
            e = names.get(f"{b.upper()}_ERR")
            errs[b] = (np.asarray(ref[e], np.float64) if e else np.zeros(ref.size))
    return mags, errs


# ----------------------------------------------------------------------------- detections

def detections_from_catalog(table: np.ndarray, chip_index: int, *, source: str = "catalog"
                            ) -> np.ndarray:
    """The detections of one chip catalog in the gathered layout :data:`DET_DTYPE`.

    Parameters
    ----------
    table : structured ndarray
        Chip catalog with CMF columns X_PSF, Y_PSF, X_PSF_SIG, Y_PSF_SIG (px), PSF_INST_MAG,
        PSF_INST_MAG_SIG (mag) and FLAGS.
    chip_index : int
        Index of the chip in the camera's chip list.
    source : str
        Name of the catalog, for errors.

    Returns
    -------
    ndarray of DET_DTYPE

    Raises
    ------
    DataError
        If a required column is missing.
    """
    names = {n.upper(): n for n in (table.dtype.names or ())}
    missing = [c for c in _REQUIRED if c not in names]
    if missing:
        raise DataError(f"{source}: catalog lacks columns {missing}")
    out = np.zeros(table.size, DET_DTYPE)
    out["chip"] = chip_index
    out["row"] = np.arange(table.size)
    out["x"], out["y"] = table[names["X_PSF"]], table[names["Y_PSF"]]
    out["x_err"], out["y_err"] = table[names["X_PSF_SIG"]], table[names["Y_PSF_SIG"]]
    out["mag"], out["mag_err"] = table[names["PSF_INST_MAG"]], table[names["PSF_INST_MAG_SIG"]]
    out["flags"] = np.asarray(table[names["FLAGS"]]).astype(np.int64)
    return out


def detection_limits(det: np.ndarray, n_chips: int, *, snr: float = 5.0,
                     min_stars: int = 5) -> np.ndarray:
    """Instrumental detection limit of each chip: the median magnitude of its detections
    measured at ``snr`` sigma (magnitude errors within 25% of ``1.0857 / snr``).

    Parameters
    ----------
    det : ndarray of DET_DTYPE
        Detections.
    n_chips : int
        Number of chips of the camera.
    snr : float
        Signal-to-noise ratio of the limit.
    min_stars : int
        Fewest detections near the limit for a value.

    Returns
    -------
    ndarray
        Limit per chip index (mag); NaN where it cannot be measured.
    """
    target = 2.5 / math.log(10.0) / snr
    sel = (np.isfinite(det["mag"]) & (det["mag_err"] > 0.75 * target)
           & (det["mag_err"] < 1.25 * target))
    out = np.full(n_chips, np.nan)
    chips = det["chip"][sel].astype(int)
    mags = det["mag"][sel].astype(float)
    for c in np.unique(chips):
        m = mags[chips == c]
        if m.size >= min_stars:
            out[c] = float(np.median(m))
    return out


# ----------------------------------------------------------------------------- the fit (leader)

@dataclass
class ExposureCalibration:
    """What the leader computes for one exposure.

    Attributes
    ----------
    quality : int
        0 when calibrated, else a :data:`QUALITY` code.
    reason : str
        Why not.
    astrometry : AstrometrySolution or None
        The astrometric solution (None when not attempted).
    zero_point : ZeroPoint or None
        The photometric fit (None when not attempted).
    stars : ndarray, shape (N, 3)
        Bright stars for the dynamic masks: focal-plane X, Y (px) and instrumental magnitude
        ``m_ref - zp`` (mag).
    limits : ndarray
        Detection limit per chip index (instrumental mag, NaN = rule default).
    n_det, n_ref : int
        Detections offered and reference stars loaded.
    t_astrom, t_phot : float
        Seconds in the astrometric and photometric fits.
    """

    quality: int
    reason: str = ""
    astrometry: AstrometrySolution | None = None
    zero_point: ZeroPoint | None = None
    stars: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    limits: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n_det: int = 0
    n_ref: int = 0
    t_astrom: float = 0.0
    t_phot: float = 0.0


def _bright_threshold(rules: DynamicMaskRules, filter: str, limits: np.ndarray) -> float:
    """Faintest instrumental magnitude any enabled rule can act on (mag)."""
    fkey = str(filter).split(".")[0]
    cands = [rules.starcore.max_mag]
    if "ghost" in rules.enabled:
        cands.append(rules.ghost.max_mag.get(fkey, -np.inf))
    if "glint" in rules.enabled:
        cands.append(rules.glint.max_mag.get(fkey, -np.inf))
    if "crosstalk" in rules.enabled and rules.crosstalk.rules:
        lim = np.nanmax(np.append(limits, rules.crosstalk.detection_limit_mag))
        cands.append(float(lim) - min(r.magdiff for r in rules.crosstalk.rules))
    return float(max(cands))


def calibrate_exposure(det: np.ndarray, ref: np.ndarray, *, camera: Any,
                       guess: tuple[float, float, float], mjd: float, filter: str,
                       exptime: float, flag_mask: int = 31,
                       astrometry: Mapping[str, Any] | None = None,
                       photometry: Mapping[str, Any] | None = None,
                       color_terms: Mapping[str, ColorTerm | Mapping] | None = None,
                       rules: DynamicMaskRules | None = None,
                       astrometry_radius_deg: float | None = None) -> ExposureCalibration:
    """Calibrate one exposure from its gathered detections and reference stars.

    Parameters
    ----------
    det : ndarray of DET_DTYPE
        Every detection of the exposure's good chips.
    ref : structured ndarray
        Reference stars around the exposure (RA, DEC in degrees, optional proper motions,
        epoch, errors in mas, magnitudes G..Y with *_ERR), as in the reference catalog.
    camera : Camera
        Camera geometry.
    guess : tuple of float
        Header boresight and position angle ``(ra, dec, pa)`` (degrees).
    mjd : float
        Exposure mid-time (MJD).
    filter : str
        Exposure filter.
    exptime : float
        Exposure time (s).
    flag_mask : int
        Detection flags excluding a detection from the fits.
    astrometry : mapping, optional
        Options of :func:`solve_exposure_astrometry` (``sip_order`` is ignored here).
    photometry : mapping, optional
        Options of :func:`fit_zero_point`.
    color_terms : mapping, optional
        Colour terms per filter.
    rules : DynamicMaskRules, optional
        Dynamic-mask rules (they decide which stars are bright enough to return).
    astrometry_radius_deg : float, optional
        Only reference stars within this distance of the header boresight enter the
        astrometric fit (the others may still make artefacts); all when None.

    Returns
    -------
    ExposureCalibration
    """
    opts = dict(astrometry or {})
    opts.pop("sip_order", None)
    popts = dict(photometry or {})
    if "ref_mag_range" in popts:
        popts["ref_mag_range"] = tuple(popts["ref_mag_range"])
    if "radii" in opts:
        opts["radii"] = tuple(opts["radii"])
    rules = rules or default_rules(camera)
    names = np.array(camera.chip_names)
    limits = detection_limits(det, len(names))
    out = ExposureCalibration(quality=0, limits=limits, n_det=int(det.size), n_ref=int(ref.size))
    ra0, dec0, pa0 = (float(v) for v in guess)
    if not (math.isfinite(ra0) and math.isfinite(dec0) and math.isfinite(pa0)
            and -90.0 <= dec0 <= 90.0):
        out.quality, out.reason = QUALITY["no_pointing"], (
            f"header pointing (RA, DEC, POSANGLE) = ({ra0}, {dec0}, {pa0}) is not usable")
        return out
    min_matches = int(opts.get("min_matches", 20))
    usable = (np.isfinite(det["x"]) & np.isfinite(det["y"])
              & ((det["flags"] & int(flag_mask)) == 0))
    if int(usable.sum()) < min_matches:
        out.quality, out.reason = QUALITY["few_detections"], (
            f"only {int(usable.sum())} usable detections in {np.unique(det['chip']).size} "
            f"chips (need {min_matches})")
        return out
    rnames = {n.upper(): n for n in ref.dtype.names}
    ref_ra = np.asarray(ref[rnames["RA"]], np.float64)
    ref_dec = np.asarray(ref[rnames["DEC"]], np.float64)
    in_fit = np.ones(ref.size, bool)
    if astrometry_radius_deg is not None and ref.size:
        cd0 = math.cos(dec0 * _DEG)
        v0 = np.array([cd0 * math.cos(ra0 * _DEG), cd0 * math.sin(ra0 * _DEG),
                       math.sin(dec0 * _DEG)])
        cd = np.cos(ref_dec * _DEG)
        dots = (cd * np.cos(ref_ra * _DEG) * v0[0] + cd * np.sin(ref_ra * _DEG) * v0[1]
                + np.sin(ref_dec * _DEG) * v0[2])
        in_fit = dots >= math.cos(astrometry_radius_deg * _DEG)
    fit_rows = np.flatnonzero(in_fit)
    if fit_rows.size < min_matches:
        out.quality, out.reason = QUALITY["few_references"], (
            f"only {fit_rows.size} reference stars within {astrometry_radius_deg} deg of the "
            f"header boresight (need {min_matches})")
        return out
    t0 = time.perf_counter()
    det_in = {"chip": names[det["chip"]], "x": det["x"], "y": det["y"], "x_err": det["x_err"],
              "y_err": det["y_err"], "mag": det["mag"], "flags": det["flags"]}
    sol = solve_exposure_astrometry(det_in, ref[fit_rows], camera=camera, guess=(ra0, dec0, pa0),
                                    mjd=mjd, filter=filter, flag_mask=int(flag_mask), **opts)
    out.t_astrom = time.perf_counter() - t0
    out.astrometry = sol
    if not sol.success:
        out.quality, out.reason = QUALITY["astrometry"], f"astrometry failed: {sol.reason}"
        return out
    # ---- photometry on the matched stars kept by the astrometric fit
    t0 = time.perf_counter()
    d_idx = sol.det_index[sol.used]
    r_idx = fit_rows[sol.ref_index[sol.used]]
    mags, errs = _ref_bands(ref)
    zp = fit_zero_point(det["mag"][d_idx].astype(float), det["mag_err"][d_idx].astype(float),
                        {b: v[r_idx] for b, v in mags.items()}, filter=filter,
                        color_terms=color_terms, ref_errs={b: v[r_idx] for b, v in errs.items()},
                        chip=names[det["chip"][d_idx]], exptime=float(exptime), **popts)
    out.t_phot = time.perf_counter() - t0
    out.zero_point = zp
    if not zp.success:
        out.quality, out.reason = QUALITY["photometry"], f"zero point failed: {zp.reason}"
        return out
    # ---- bright stars for the dynamic masks
    thr = _bright_threshold(rules, filter, limits)
    table = dict(DEFAULT_COLOR_TERMS)
    if color_terms:
        table.update({k: ColorTerm.from_mapping(v, filter=k) for k, v in color_terms.items()})
    fkey = str(filter).split(".")[0]
    m_sys = np.full(ref.size, np.nan)
    if mags and fkey in table:
        m_sys, _, _ = reference_system_mags(mags, table[fkey], ref_errs=errs)
        band = mags.get(table[fkey].band)
        if band is not None:   # colour out of range: the band itself is good enough here
            m_sys = np.where(np.isfinite(m_sys), m_sys, band)
    m_inst = m_sys - zp.zp
    bright = np.flatnonzero(np.isfinite(m_inst) & (m_inst < thr))
    stars = np.zeros((0, 3))
    if bright.size:
        ra_b, dec_b = ref_ra[bright], ref_dec[bright]
        if "PMRA" in rnames and "PMDEC" in rnames:
            ep = (np.asarray(ref[rnames["EPOCH"]], float)[bright] if "EPOCH" in rnames
                  else np.full(bright.size, 2000.0))
            ra_b, dec_b = propagate_proper_motion(
                ra_b, dec_b, np.asarray(ref[rnames["PMRA"]], float)[bright],
                np.asarray(ref[rnames["PMDEC"]], float)[bright], mjd_to_julian_year(mjd) - ep)
        X, Y = sol.model.sky_to_focal(ra_b, dec_b)
        ok = np.isfinite(X) & np.isfinite(Y)
        stars = np.column_stack([X[ok], Y[ok], m_inst[bright][ok]])
    # bright detections without a reference star (the catalog may miss the brightest)
    dsel = np.flatnonzero(np.isfinite(det["mag"]) & (det["mag"] < thr) & np.isfinite(det["x"])
                          & np.isfinite(det["y"]))
    if dsel.size:
        Xd = np.empty(dsel.size)
        Yd = np.empty(dsel.size)
        for c in np.unique(det["chip"][dsel]):
            s = det["chip"][dsel] == c
            Xd[s], Yd[s] = sol.chip_to_focal(str(names[c]), det["x"][dsel][s], det["y"][dsel][s])
        new = np.ones(dsel.size, bool)
        if stars.shape[0]:
            from scipy.spatial import cKDTree
            dist, _ = cKDTree(stars[:, :2]).query(np.column_stack([Xd, Yd]), k=1)
            new = dist > 10.0
        if new.any():
            stars = np.vstack([stars, np.column_stack([Xd[new], Yd[new],
                                                       det["mag"][dsel][new]])])
    out.stars = stars
    return out


# ----------------------------------------------------------------------------- packing

_N_TERM = 9  # dx, dy, rot, scale, e1, e2, xc, yc, n_stars


def pack_solution(cal: ExposureCalibration, chip_names: Sequence[str]) -> np.ndarray:
    """The numbers of a successful calibration as one float64 array (for ``bcast_array``).

    Layout: boresight RA, Dec, PA, scale; distortion order, norm, number of terms and the x, y
    coefficients; per chip (camera order) the 9 :class:`ChipTerms` values; astrometric
    statistics (n_matched, rms x3, n_iter, match_radius, mjd); the zero point (zp, zp_err,
    zp_per_second, n_stars, n_input, rms, scatter, sigma_int) and per chip its offset, error
    and star count (NaN where none); per chip the detection limit.
    """
    sol, zp = cal.astrometry, cal.zero_point
    if sol is None or zp is None:
        raise ValueError("pack_solution: the calibration has no astrometric or photometric fit")
    m = sol.model
    d = m.distortion
    parts: list[Any] = [m.ra, m.dec, m.pa, m.scale, d.order, d.norm, len(d.coeffs_x),
                        *d.coeffs_x, *d.coeffs_y]
    for c in chip_names:
        t = sol.chip_offsets.get(c, ChipTerms())
        parts += [t.dx, t.dy, t.rot, t.scale, t.e1, t.e2, t.xc, t.yc, t.n_stars]
    parts += [sol.n_matched, *sol.rms_mas, sol.n_iter, sol.match_radius, sol.mjd]
    zp1 = np.nan if zp.zp_per_second is None else zp.zp_per_second
    parts += [zp.zp, zp.zp_err, zp1, zp.n_stars, zp.n_input, zp.rms, zp.scatter, zp.sigma_int]
    for c in chip_names:
        parts += list(zp.chip_offsets.get(c, (np.nan, np.nan, 0)))
    parts += list(np.asarray(cal.limits, float))
    return np.asarray(parts, np.float64)


def unpack_solution(packed: np.ndarray, camera: Any) -> tuple[AstrometrySolution, ZeroPoint,
                                                               np.ndarray]:
    """Inverse of :func:`pack_solution`: (astrometric solution without per-star arrays, zero
    point, detection limits per chip)."""
    v = np.asarray(packed, np.float64)
    names = list(camera.chip_names)
    pos = 0

    def take(n: int) -> np.ndarray:
        nonlocal pos
        out = v[pos:pos + n]
        pos += n
        return out

    ra, dec, pa, scale, order, norm, nt = take(7)
    cx, cy = take(int(nt)), take(int(nt))
    dist = Distortion(int(order), cx, cy, norm=float(norm)) if int(order) >= 2 else \
        Distortion.none()
    model = FocalPlaneModel(float(ra), float(dec), float(pa), float(scale), dist)
    terms = {}
    for c in names:
        t = take(_N_TERM)
        terms[c] = ChipTerms(*(float(a) for a in t[:8]), n_stars=int(t[8]))
    n_matched, r1, r2, r3, n_iter, radius, mjd = take(7)
    sol = AstrometrySolution(model=model, camera=camera, chip_offsets=terms,
                             n_matched=int(n_matched), rms_mas=(float(r1), float(r2), float(r3)),
                             success=True, n_iter=int(n_iter), match_radius=float(radius),
                             mjd=float(mjd))
    z = take(8)
    offsets = {}
    for c in names:
        o, e, n = take(3)
        if n > 0:
            offsets[c] = (float(o), float(e), int(n))
    zp = ZeroPoint(float(z[0]), float(z[1]), int(z[3]), int(z[4]), float(z[5]), float(z[6]),
                   float(z[7]), offsets, success=True,
                   zp_per_second=None if not np.isfinite(z[2]) else float(z[2]))
    limits = take(len(names)).copy()
    if pos != v.size:
        raise ValueError(f"unpack_solution: {v.size} numbers, expected {pos}")
    return sol, zp, limits


# ----------------------------------------------------------------------------- products

def _cards(header: Any) -> list[dict]:
    """astropy Header -> fitsio card dicts (structural and empty cards left out)."""
    skip = {"", "COMMENT", "HISTORY", "SIMPLE", "BITPIX", "EXTEND", "XTENSION", "PCOUNT",
            "GCOUNT", "TFIELDS"}
    out = []
    for card in header.cards:
        key = card.keyword
        if key in skip or key.startswith("NAXIS"):
            continue
        out.append({"name": key, "value": card.value, "comment": card.comment})
    return out


def _read_fits_header_cards(hdr: Any) -> list[dict]:
    """fitsio header -> card dicts without the structural keywords."""
    skip = {"SIMPLE", "BITPIX", "EXTEND", "XTENSION", "PCOUNT", "GCOUNT", "TFIELDS", "EXTNAME",
            "ZIMAGE", "ZBITPIX", "ZCMPTYPE", "ZTENSION", "ZPCOUNT", "ZGCOUNT", "ZQUANTIZ",
            "ZDITHER0", "ZSIMPLE", "ZEXTEND", "BZERO", "BSCALE", "CHECKSUM", "DATASUM",
            "ZHECKSUM", "ZDATASUM", "COMMENT", "HISTORY", ""}
    out = []
    for rec in hdr.records():
        name = rec.get("name")
        if not name or name in skip or name.startswith(("NAXIS", "ZNAXIS", "ZTILE", "ZNAME",
                                                         "ZVAL", "TTYPE", "TFORM", "TUNIT",
                                                         "TDIM", "TNULL", "TSCAL", "TZERO",
                                                         "TDISP")):
            continue
        out.append({"name": name, "value": rec.get("value"), "comment": rec.get("comment", "")})
    return out


def _merge_cards(*lists: list[dict]) -> list[dict]:
    """Header cards in order, a later card replacing an earlier one of the same name."""
    out: dict[str, dict] = {}
    for cards in lists:
        for c in cards:
            out.pop(c["name"], None)
            out[c["name"]] = c
    return list(out.values())


def read_camera_solution(path: str | Path, camera: Any) -> dict[str, Any]:
    """Read ``camera/<exp>/<exp>.astrom.fits`` back.

    Parameters
    ----------
    path : str or Path
        The solution file.
    camera : Camera
        Its camera.

    Returns
    -------
    dict
        ``solution`` (:class:`AstrometrySolution` rebuilt from the FPMODEL JSON), ``header``
        (primary keywords), ``wcs`` (chip -> astropy WCS of each chip extension) and
        ``chips`` (chip -> extension keywords).
    """
    from astropy.io import fits
    from astropy.wcs import FITSFixedWarning, WCS

    with fits.open(path) as hdul:
        prim = hdul[0].header
        d = json.loads(prim["FPMODEL"])
        sol = AstrometrySolution.from_dict(d, camera)
        wcs, chips = {}, {}
        for hdu in hdul[1:]:
            name = hdu.header["EXTNAME"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                wcs[name] = WCS(hdu.header)
            chips[name] = {k: hdu.header[k] for k in hdu.header if k}
        header = {k: prim[k] for k in prim if k not in ("", "COMMENT", "HISTORY")}
    return {"solution": sol, "header": header, "wcs": wcs, "chips": chips}


def _read_table(path: Path) -> tuple[list[tuple[str, np.ndarray | None, Any, str]], int]:
    """Every HDU of a catalog file: (kind, data, header, extname); index of the source table
    (the first binary table with an X_PSF column). Tables without rows come back empty."""
    import fitsio

    if not path.is_file():
        raise FileNotFoundError(f"{path}: chip catalog is missing")
    hdus = []
    main = -1
    with fitsio.FITS(str(path)) as f:
        for i, h in enumerate(f):
            kind = h.get_exttype()
            if kind == "IMAGE_HDU":
                data = h.read() if h.has_data() else None
            elif h.get_nrows() > 0:
                data = h.read()
            else:
                data = np.zeros(0, h.get_rec_dtype()[0])
            hdus.append((kind, data, h.read_header(), h.get_extname()))
            if main < 0 and kind == "BINARY_TBL" and "X_PSF" in {
                    n.upper() for n in (data.dtype.names or ())}:
                main = i
    if main < 0:
        raise DataError(f"{path}: no binary table with an X_PSF column (chip catalog)")
    return hdus, main


def _with_columns(table: np.ndarray, new: dict[str, np.ndarray]) -> np.ndarray:
    """A copy of ``table`` with columns added or replaced."""
    descr = [(n, table.dtype[n]) for n in table.dtype.names if n not in new]
    descr += [(n, v.dtype) for n, v in new.items()]
    out = np.zeros(table.size, descr)
    for n in table.dtype.names:
        if n not in new:
            out[n] = table[n]
    for n, v in new.items():
        out[n] = v
    return out


def _first_image(path: Path) -> tuple[np.ndarray, Any]:
    import fitsio

    if not path.is_file():
        raise FileNotFoundError(f"{path}: input product is missing")
    with fitsio.FITS(str(path)) as f:
        for h in f:
            if h.get_exttype() == "IMAGE_HDU" and h.has_data():
                return h.read(), h.read_header()
    raise DataError(f"{path}: holds no image")


# ----------------------------------------------------------------------------- the stage

class CameraStage(Stage):
    """Calibrate exposures collectively (see the module docstring).

    Parameters
    ----------
    group_size : int
        Ranks per exposure (recipe ``camera.group_size``; the CLI passes it).
    """

    name = "camera"
    run_table = "camRun"
    element_table = "camProcessedExp"
    inputs = ("chipRun", "chipProcessedImfile", "rawExp")
    outputs = {
        "mask": "camera/{exp_name}/{exp_name}.{chip}.mk.fits",
        "catalog": "camera/{exp_name}/{exp_name}.{chip}.cmf",
        "jpeg": "camera/{exp_name}/{exp_name}.jpg",
        "astrom": "camera/{exp_name}/{exp_name}.astrom.fits",
    }
    group_size = 2

    def __init__(self, *, group_size: int | None = None) -> None:
        if group_size is not None:
            if int(group_size) < 1:
                raise ValueError(f"group_size: must be >= 1, got {group_size!r}")
            self.group_size = int(group_size)
        self._cameras: dict[str, Any] = {}
        self._refcats: dict[Path, ReferenceCatalog] = {}

    # ------------------------------------------------------------------ helpers
    def input_path(self, ctx: StageContext, what: str, **keys) -> Path:
        """Absolute path of an input product of the chip stage."""
        return ctx.root / INPUTS[what].format(**keys)

    def _camera(self, name: str) -> Any:
        if name not in self._cameras:
            from ..geometry.camera import load_camera
            try:
                self._cameras[name] = load_camera(name)
            except (ValueError, FileNotFoundError) as err:
                raise DataError(f"camera {name!r} of the exposure: {err}") from err
        return self._cameras[name]

    def _refcat(self, ctx: StageContext) -> ReferenceCatalog:
        rel = str(ctx.recipe.get("camera.refcat"))
        if not rel:
            raise ConfigError("recipe camera.refcat: no reference catalog configured")
        path = Path(rel)
        path = path if path.is_absolute() else ctx.root / path
        if path not in self._refcats:
            self._refcats[path] = ReferenceCatalog(path)
        return self._refcats[path]

    @staticmethod
    def _rules(ctx: StageContext, camera: Any) -> DynamicMaskRules:
        data = ctx.recipe.get("camera.dynamic_masks")
        data.pop("_free", None)
        try:
            return DynamicMaskRules.from_mapping(data, base=default_rules(camera))
        except ValueError as err:
            raise RecipeError(f"recipe camera.dynamic_masks: {err}") from None

    @staticmethod
    def _color_terms(ctx: StageContext) -> dict[str, ColorTerm]:
        data = ctx.recipe.get("camera.color_terms")
        data.pop("_free", None)
        try:
            return {k: ColorTerm.from_mapping(v, filter=k) for k, v in data.items()}
        except (ValueError, TypeError, AttributeError) as err:
            raise RecipeError(f"recipe camera.color_terms: {err}") from None

    # ------------------------------------------------------------------ define (rank 0)
    def define(self, ledger: Ledger, ctx: StageContext) -> int:
        """Create a camRun and its camProcessedExp element for every chipRun that is DONE with
        quality 0 and not calibrated yet. Returns the elements created."""
        if ledger.nrows("chipRun") == 0:
            return 0
        state = ledger.column("chipRun", "state")
        quality = ledger.column("chipRun", "quality")
        ready = np.flatnonzero((state == State.DONE) & (quality == 0))
        ready = ready[~np.isin(ready, ledger.column(self.run_table, "chip_run"))]
        if ready.size == 0:
            return 0
        cr = ledger.read("chipRun", ready, ["exp_name", "raw_exp", "filter"])
        raw = ledger.read("rawExp", cr["raw_exp"], ["ra", "dec"])
        runs = ledger.append(self.run_table, ready.size, exp_name=cr["exp_name"],
                             chip_run=ready, filter=cr["filter"], ra=raw["ra"], dec=raw["dec"])
        ledger.transition(self.run_table, runs, State.RUN,
                          message=[f"from chipRun row {int(r)}" for r in ready])
        rows = ledger.append(self.element_table, ready.size, run=runs, exp_name=cr["exp_name"],
                             ra=raw["ra"], dec=raw["dec"])
        ledger.transition(self.element_table, rows, State.NEW, message="chips done")
        return int(ready.size)

    # ------------------------------------------------------------------ units (rank 0)
    def units(self, ledger: Ledger, ctx: StageContext) -> list[WorkUnit]:
        """Pending exposures with their header values and good chips; cost = good chips."""
        rows = ledger.pending(self.element_table,
                              retry_cap=int(ctx.recipe.get("runtime.retry_cap")))
        if rows.size == 0:
            return []
        el = ledger.read(self.element_table, rows, ["run", "exp_name", "ra", "dec"])
        chip_run = ledger.column(self.run_table, "chip_run", el["run"])
        raw_rows = ledger.column("chipRun", "raw_exp", chip_run)
        raw = ledger.read("rawExp", raw_rows, ["camera", "filter", "mjd", "exptime", "ra",
                                               "dec", "posangle"])
        ci_run = ledger.column("chipProcessedImfile", "run")
        good_rows = np.flatnonzero(np.isin(ci_run, chip_run))
        good_rows = good_rows[
            (ledger.column("chipProcessedImfile", "state", good_rows) == State.DONE)
            & (ledger.column("chipProcessedImfile", "quality", good_rows) == 0)]
        g_run = ci_run[good_rows]
        order = np.argsort(g_run, kind="stable")
        g_run = g_run[order]
        g_chip = ledger.column("chipProcessedImfile", "chip", good_rows[order])
        lo = np.searchsorted(g_run, chip_run, side="left")
        hi = np.searchsorted(g_run, chip_run, side="right")
        out = []
        for i, r in enumerate(rows):
            cname = raw["camera"][i].decode()
            chips = sorted({c.decode() for c in g_chip[lo[i]:hi[i]]})
            try:
                known = self._camera(cname).chip_names
                chips = [c for c in known if c in set(chips)] + sorted(set(chips) - set(known))
            except DataError:
                pass  # process() reports the unknown camera as a fault
            exp = el["exp_name"][i].decode()
            out.append(WorkUnit(self.element_table, int(r), exp, float(el["ra"][i]),
                                float(el["dec"][i]), cost=float(max(1, len(chips))),
                                info={"exp_name": exp, "chips": chips, "camera": cname,
                                      "filter": raw["filter"][i].decode(),
                                      "mjd": float(raw["mjd"][i]),
                                      "exptime": float(raw["exptime"][i]),
                                      "ra": float(raw["ra"][i]), "dec": float(raw["dec"][i]),
                                      "posangle": float(raw["posangle"][i])}))
        return out

    # ------------------------------------------------------------------ process (the group)
    def process(self, unit: WorkUnit, ctx: StageContext) -> Outcome:
        """Calibrate one exposure with the ranks of ``ctx.world`` (collective over them)."""
        group = ctx.world
        info = unit.info
        exp = info["exp_name"]
        rec = ctx.recipe["camera"]
        times: dict[str, float] = {}
        leader = group.rank == 0

        # ---- 1. read this rank's share of the catalogs
        t0 = time.perf_counter()
        err: BaseException | None = None
        camera = None
        mine: list[str] = []
        tables: dict[str, tuple[list, int]] = {}
        det_local = np.zeros(0, DET_DTYPE)
        try:
            camera = self._camera(info["camera"])
            index = {c: k for k, c in enumerate(camera.chip_names)}
            unknown = [c for c in info["chips"] if c not in index]
            if unknown:
                raise DataError(f"exposure {exp}: chips {unknown} are not chips of camera "
                                f"{camera.name}")
            mine = list(info["chips"][group.rank::group.size])
            parts = []
            for chip in mine:
                path = self.input_path(ctx, "catalog", exp_name=exp, chip=chip)
                hdus, main = _read_table(path)
                tables[chip] = (hdus, main)
                parts.append(detections_from_catalog(hdus[main][1], index[chip],
                                                     source=str(path)))
            if parts:
                det_local = np.concatenate(parts)
        except Exception as e:  # noqa: BLE001 - shared with the group below
            err = e
        times["read"] = time.perf_counter() - t0
        group_failure_check(group, err, "reading catalogs")

        # ---- 2. gather to the leader, in the serial order
        t0 = time.perf_counter()
        det = group.gatherv(det_local)
        if leader:
            det = det[np.lexsort((det["row"], det["chip"]))]
        times["gather"] = time.perf_counter() - t0

        # ---- 3. the leader fits
        packed = stars = None
        status = None
        if leader:
            try:
                cal = self._fit(ctx, camera, det, info)
                summary = {"n_det": cal.n_det, "n_ref": cal.n_ref, "n_chips": len(info["chips"]),
                           "t_astrom": cal.t_astrom, "t_phot": cal.t_phot}
                if cal.quality:
                    sol = cal.astrometry
                    if sol is not None:
                        summary["n_matched"] = int(sol.n_matched)
                        summary["astrom_rms_mas"] = float(sol.rms_mas[2])
                    status = (int(cal.quality), cal.reason, summary)
                else:
                    packed = pack_solution(cal, camera.chip_names)
                    stars = np.ascontiguousarray(cal.stars, np.float64)
                    status = (0, "", summary)
            except Exception as e:  # noqa: BLE001 - shared with the group below
                err = e
        group_failure_check(group, err, "fitting the exposure")
        status = group.bcast_object(status)
        quality, reason, summary = status
        summary["n_ranks"] = group.size
        summary["t_read"] = float(group.allreduce(np.array([times["read"]]), op="max")[0])
        summary["t_gather"] = times["gather"] if leader else 0.0
        summary = group.bcast_object(summary)
        if quality:
            return Outcome(quality=quality, message=reason, summary=summary)
        packed = group.bcast_array(packed)
        stars = group.bcast_array(stars)
        sol, zp, limits = unpack_solution(packed, camera)

        # ---- 4. every rank writes its chips' products
        t0 = time.perf_counter()
        local = np.zeros(2, np.float64)       # dynamically masked pixels, pixels
        b = int(rec["jpeg_binning"])
        bshape = (-(-camera.chip_ny // b), -(-camera.chip_nx // b))
        binned = np.zeros((len(mine),) + bshape, np.float32)
        wcs_rec = np.zeros(len(mine), [("chip", "i2"), ("cards", f"S{_CARD_BYTES}")])
        try:
            rules = self._rules(ctx, camera)
            bright = BrightStars(stars[:, 0], stars[:, 1], stars[:, 2])
            if len(bright):
                bright.locate(camera)
            index = {c: k for k, c in enumerate(camera.chip_names)}
            for k, chip in enumerate(mine):
                keys = dict(exp_name=exp, chip=chip)
                whdr = sol.chip_wcs(chip, sip_order=int(rec["astrometry"]["sip_order"])
                                    ).to_header(relax=True)
                wcs_cards = _cards(whdr)
                text = whdr.tostring().encode()
                if len(text) > _CARD_BYTES:
                    raise ValueError(f"chip {chip}: WCS header of {len(text)} bytes exceeds "
                                     f"{_CARD_BYTES}")
                wcs_rec[k] = (index[chip], text)
                lim = limits[index[chip]]
                n_dyn, n_pix = self._write_mask(ctx, keys, chip, camera, bright, rules, info,
                                                wcs_cards, None if not np.isfinite(lim)
                                                else float(lim))
                local += (n_dyn, n_pix)
                hdus, main = tables[chip]
                self._write_catalog(ctx, keys, chip, sol, zp, hdus, main, wcs_cards)
                img, _ = _first_image(self.input_path(ctx, "binned", **keys))
                if img.shape != bshape:
                    raise DataError(f"{self.input_path(ctx, 'binned', **keys)}: shape "
                                    f"{img.shape}, expected {bshape} for x{b} binning")
                binned[k] = img
        except Exception as e:  # noqa: BLE001 - shared with the group below
            err = e
        group_failure_check(group, err, "writing chip products")
        counts = group.allreduce(local, op="sum")
        all_binned = group.gatherv(binned)
        all_wcs = group.gatherv(wcs_rec)
        times["write"] = float(group.allreduce(np.array([time.perf_counter() - t0]),
                                               op="max")[0])

        # ---- 5. the leader writes the picture and, last, the solution
        if leader:
            try:
                t0 = time.perf_counter()
                names = list(camera.chip_names)
                self._write_jpeg(ctx, exp, camera, {names[int(c)]: img for c, img in
                                                    zip(all_wcs["chip"], all_binned)}, rec)
                self._write_astrom(ctx, exp, camera, sol, zp, info, all_wcs, rec)
                times["write"] += time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - shared with the group below
                err = e
        group_failure_check(group, err, "writing the exposure products")
        h = sol.model
        ra_h, dec_h, pa_h = info["ra"], info["dec"], info["posangle"]
        summary.update(
            n_matched=int(sol.n_matched), astrom_rms_mas=float(sol.rms_mas[2]),
            astrom_rms_ra_mas=float(sol.rms_mas[0]), astrom_rms_dec_mas=float(sol.rms_mas[1]),
            ra_offset_arcsec=float(((h.ra - ra_h + 180.0) % 360.0 - 180.0)
                                   * math.cos(math.radians(dec_h)) * 3600.0),
            dec_offset_arcsec=float((h.dec - dec_h) * 3600.0),
            pa_offset_arcsec=float(((h.pa - pa_h + 180.0) % 360.0 - 180.0) * 3600.0),
            zero_point=float(zp.zp_per_second), zero_point_err=float(zp.zp_err),
            n_phot=int(zp.n_stars), zp_rms=float(zp.rms),
            dyn_masked_frac=float(counts[0] / counts[1]) if counts[1] else 0.0,
            t_write=times["write"])
        return Outcome(summary=summary)

    # ------------------------------------------------------------------ leader helpers
    def _fit(self, ctx: StageContext, camera: Any, det: np.ndarray,
             info: dict) -> ExposureCalibration:
        """Load the reference stars around the exposure and calibrate it."""
        rec = ctx.recipe["camera"]
        aopts = dict(rec["astrometry"])
        ra0, dec0, pa0 = info["ra"], info["dec"], info["posangle"]
        rules = self._rules(ctx, camera)
        mjd_mid = info["mjd"] + 0.5 * info["exptime"] / 86400.0
        if not (math.isfinite(ra0) and math.isfinite(dec0) and math.isfinite(pa0)):
            return calibrate_exposure(det, np.zeros(0, [("RA", "f8"), ("DEC", "f8")]),
                                      camera=camera, guess=(ra0, dec0, pa0), mjd=mjd_mid,
                                      filter=info["filter"], exptime=info["exptime"])
        xmin, xmax, ymin, ymax = camera.focal_plane_extent()
        field_deg = math.hypot(max(abs(xmin), abs(xmax)), max(abs(ymin), abs(ymax))) \
            * camera.pixel_scale / 3600.0
        fit_radius = field_deg * (1.0 + float(rec["refcat_pad"])) \
            + float(aopts["max_offset_arcmin"]) / 60.0
        radius = fit_radius
        if "glint" in rules.enabled:   # glint stars lie far beyond the focal-plane edge
            radius = max(radius, field_deg + rules.glint.region_max * camera.pixel_scale / 3600.0
                         + float(aopts["max_offset_arcmin"]) / 60.0)
        t0 = time.perf_counter()
        ref = self._refcat(ctx).cone(ra0, dec0, radius)
        t_ref = time.perf_counter() - t0
        cal = calibrate_exposure(det, ref, camera=camera, guess=(ra0, dec0, pa0), mjd=mjd_mid,
                                 filter=info["filter"], exptime=info["exptime"],
                                 flag_mask=int(rec["flag_mask"]), astrometry=aopts,
                                 photometry=rec["photometry"], color_terms=self._color_terms(ctx),
                                 rules=rules, astrometry_radius_deg=fit_radius)
        cal.t_astrom += t_ref
        return cal

    def _write_mask(self, ctx: StageContext, keys: dict, chip: str, camera: Any,
                    bright: BrightStars, rules: DynamicMaskRules, info: dict,
                    wcs_cards: list[dict], limit: float | None) -> tuple[int, int]:
        """OR the dynamic mask into the chip's mask and write it; returns (masked, pixels)."""
        import fitsio

        src = self.input_path(ctx, "mask", **keys)
        mask, hdr = _first_image(src)
        if mask.shape != (camera.chip_ny, camera.chip_nx):
            raise DataError(f"{src}: mask shape {mask.shape}, expected "
                            f"{(camera.chip_ny, camera.chip_nx)}")
        if mask.dtype != np.uint16:
            if not np.issubdtype(mask.dtype, np.integer):
                raise DataError(f"{src}: mask is {mask.dtype}, not an integer bit mask")
            mask = mask.astype(np.uint16)
        mask &= np.uint16(~maskbits.DYNAMIC & 0xFFFF)     # a redo starts from the static bits
        if len(bright):     # dynamic_mask_for_chip, painted straight into the chip mask
            paint_artifacts(mask, artifacts_for_chip(chip, mask.shape, bright, camera=camera,
                                                     rules=rules, filter=info["filter"],
                                                     detection_limit_mag=limit))
        n_dyn = int(np.count_nonzero(mask & np.uint16(maskbits.DYNAMIC)))
        extra = [{"name": "EXPNAME", "value": keys["exp_name"]},
                 {"name": "CHIP", "value": chip},
                 {"name": "DYNMASK", "value": n_dyn, "comment": "pixels with dynamic bits"}]
        for kind, bit in (("GHOST", maskbits.GHOST), ("GLINT", maskbits.GLINT),
                          ("STARCORE", maskbits.STARCORE), ("SPIKE", maskbits.SPIKE),
                          ("CROSSTALK", maskbits.CROSSTALK)):
            extra.append({"name": f"MASK_{kind[:3]}", "value": int(bit),
                          "comment": f"{kind} bit (dynamic)"})
        cards = _merge_cards(_read_fits_header_cards(hdr), wcs_cards, extra)
        with atomic_output(self.product_path(ctx, "mask", **keys)) as tmp:
            with fitsio.FITS(str(tmp), "rw", clobber=True) as f:
                f.write(mask, header=cards, compress="RICE")
        return n_dyn, int(mask.size)

    def _write_catalog(self, ctx: StageContext, keys: dict, chip: str, sol: AstrometrySolution,
                       zp: ZeroPoint, hdus: list, main: int, wcs_cards: list[dict]) -> None:
        """The chip catalog with calibrated positions and magnitudes added."""
        import fitsio

        kind, table, hdr, extname = hdus[main]
        names = {n.upper(): n for n in table.dtype.names}
        x = np.asarray(table[names["X_PSF"]], float)
        y = np.asarray(table[names["Y_PSF"]], float)
        ok = np.isfinite(x) & np.isfinite(y)
        ra = np.full(table.size, np.nan)
        dec = np.full(table.size, np.nan)
        if ok.any():
            ra[ok], dec[ok] = sol.pixel_to_sky(chip, x[ok], y[ok])
        mag = np.asarray(table[names["PSF_INST_MAG"]], float)
        new = {"RA_PSF": ra, "DEC_PSF": dec,
               "CAL_PSF_MAG": (mag + zp.zp).astype(np.float32),
               "CAL_PSF_MAG_SIG": np.asarray(table[names["PSF_INST_MAG_SIG"]], np.float32)}
        if "AP_MAG" in names:
            new["CAL_AP_MAG"] = (np.asarray(table[names["AP_MAG"]], float)
                                 + zp.zp).astype(np.float32)
        if "KRON_FLUX" in names:
            kf = np.asarray(table[names["KRON_FLUX"]], float)
            with np.errstate(divide="ignore", invalid="ignore"):
                km = np.where(kf > 0, -2.5 * np.log10(kf), np.nan)
            new["CAL_KRON_MAG"] = (km + zp.zp).astype(np.float32)
        out = _with_columns(table, {k: np.asarray(v) for k, v in new.items()})
        cards = _merge_cards(_read_fits_header_cards(hdr), wcs_cards, [
            {"name": "ZPT_OBS", "value": float(zp.zp_per_second),
             "comment": "[mag] zero point for 1 e-/s"},
            {"name": "ZPT_EXP", "value": float(zp.zp),
             "comment": "[mag] CAL_*_MAG = instrumental mag + ZPT_EXP"},
            {"name": "ZPT_ERR", "value": float(zp.zp_err), "comment": "[mag] zero-point error"},
            {"name": "NASTRO", "value": int(sol.n_matched), "comment": "stars in the fit"},
            {"name": "ASTRMS", "value": float(sol.rms_mas[2]), "comment": "[mas] 2-D RMS"}])
        with atomic_output(self.product_path(ctx, "catalog", **keys)) as tmp:
            with fitsio.FITS(str(tmp), "rw", clobber=True) as f:
                for i, (k, data, h, ename) in enumerate(hdus):
                    if i == main:
                        f.write(out, header=cards, extname=ename or None)
                    elif i == 0 and k == "IMAGE_HDU" and data is None:
                        f.write(None, header=_read_fits_header_cards(h))
                    else:
                        f.write(data, header=_read_fits_header_cards(h), extname=ename or None)

    def _write_jpeg(self, ctx: StageContext, exp: str, camera: Any,
                    binned: dict[str, np.ndarray], rec: dict) -> None:
        from PIL import Image

        picture = focal_plane_mosaic(binned, camera=camera, binning=int(rec["jpeg_binning"]),
                                     stretch=str(rec["jpeg_stretch"]))
        with atomic_output(self.product_path(ctx, "jpeg", exp_name=exp)) as tmp:
            Image.fromarray(picture).save(tmp, format="JPEG", quality=int(rec["jpeg_quality"]))

    def _write_astrom(self, ctx: StageContext, exp: str, camera: Any, sol: AstrometrySolution,
                      zp: ZeroPoint, info: dict, all_wcs: np.ndarray, rec: dict) -> None:
        """The exposure's solution (``docs/products.md``), written last."""
        from astropy.io import fits

        prim = fits.Header()
        m = sol.model
        values = [
            ("EXPNAME", exp, "exposure"), ("CAMERA", camera.name, "camera"),
            ("FILTER", info["filter"], "filter"), ("MJD-OBS", info["mjd"], "[d] exposure start"),
            ("EXPTIME", info["exptime"], "[s] exposure time"),
            ("ZPT_OBS", float(zp.zp_per_second), "[mag] zero point for 1 e-/s"),
            ("ZPT_ERR", float(zp.zp_err), "[mag] zero-point error"),
            ("ZPT_EXP", float(zp.zp), "[mag] zero point for the exposure's electrons"),
            ("ZPT_NSTR", int(zp.n_stars), "stars in the zero point"),
            ("ZPT_RMS", float(zp.rms), "[mag] RMS of their residuals"),
            ("ZPT_SINT", float(zp.sigma_int), "[mag] intrinsic scatter"),
            ("NASTRO", int(sol.n_matched), "stars in the astrometric fit"),
            ("ASTRMS", float(sol.rms_mas[2]), "[mas] 2-D astrometric RMS"),
            ("ASTRMSRA", float(sol.rms_mas[0]), "[mas] RMS along RA cos(Dec)"),
            ("ASTRMSDE", float(sol.rms_mas[1]), "[mas] RMS along Dec"),
            ("BORE_RA", float(m.ra), "[deg] fitted boresight RA"),
            ("BORE_DEC", float(m.dec), "[deg] fitted boresight Dec"),
            ("BORE_PA", float(m.pa), "[deg] fitted position angle of focal-plane +Y"),
            ("PLTSCALE", float(m.scale), "[arcsec/px] fitted plate scale at the axis"),
            ("DISTORD", int(m.distortion.order), "distortion polynomial order"),
            ("HDR_RA", float(info["ra"]), "[deg] header RA"),
            ("HDR_DEC", float(info["dec"]), "[deg] header Dec"),
            ("HDR_PA", float(info["posangle"]), "[deg] header POSANGLE"),
            ("NCHIPS", int(all_wcs.size), "good chips calibrated"),
        ]
        for k, v, c in values:
            prim[k] = (v, c)
        prim["FPMODEL"] = json.dumps(sol.to_dict(), sort_keys=True)
        hdus = [fits.PrimaryHDU(header=prim)]
        names = list(camera.chip_names)
        apply = bool(rec["apply_chip_zp_offsets"])
        for c_idx, text in zip(all_wcs["chip"], all_wcs["cards"]):
            chip = names[int(c_idx)]
            h = fits.Header.fromstring(text.decode())
            h["EXTNAME"] = chip
            h["CHIPNX"] = (camera.chip_nx, "[px] chip width")
            h["CHIPNY"] = (camera.chip_ny, "[px] chip height")
            off = zp.chip_offsets.get(chip)
            if off is not None:
                h["ZP_CHOFF"] = (off[0], "[mag] chip zp minus exposure zp (diagnostic)")
                h["ZP_CHERR"] = (off[1], "[mag] its error")
                h["ZP_CHN"] = (off[2], "stars on the chip")
                if apply:
                    h["ZPT_OFF"] = (off[0], "[mag] applied chip zero-point offset")
            t = sol.chip_offsets.get(chip)
            if t is not None:
                h["CT_DX"] = (t.dx, "[px] chip term offset X")
                h["CT_DY"] = (t.dy, "[px] chip term offset Y")
                h["CT_ROT"] = (t.rot, "[rad] chip term rotation")
                h["CT_NSTAR"] = (t.n_stars, "matched stars on the chip")
            hdus.append(fits.ImageHDU(header=h))
        with atomic_output(self.product_path(ctx, "astrom", exp_name=exp)) as tmp:
            fits.HDUList(hdus).writeto(tmp, output_verify="silentfix")
