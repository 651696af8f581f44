"""Source catalogs: find and measure the sources of one image, and assemble the CMF table.

Two pure functions (arrays in, arrays out; no files, no MPI):

:func:`find_and_measure`
    The psphot sequence on one detrended image: background model (subtracted), detection
    with a first FWHM guess, FWHM from the bright isolated stars and detection again with it,
    PS1_V1 PSF model varying over the image, PSF-fit photometry of every detection (flux,
    centre, errors, chi-square, extendedness), moments, Kron and aperture photometry, and
    the catalog. The chip stage (:mod:`ps1mpi.stages.chip`) and the standalone photometry
    command (``ps1mpi phot``) both call it.

:func:`assemble_catalog`
    The measurement arrays of the detection, PSF-photometry and moments steps as one
    structured array with PS1 CMF-style column names (:data:`CMF_COLUMNS`, with units and
    meanings) and the ``FLAGS`` bits of :data:`FLAG_BITS`.

Units: the image unit is called ``flux_unit`` (electrons for the chip stage); magnitudes are
instrumental, ``-2.5 log10(flux)``; positions are 0-based pixels with the centre of pixel
``[j, i]`` at ``(x, y) = (i, j)``; angles in degrees counter-clockwise from +x.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from . import maskbits
from .background import BackgroundModel, fit_background
from .detect import FWHM_PER_SIGMA, FWHMEstimate, detect_sources, estimate_fwhm
from .moments import (KRON_FAILED, MOMENTS_CENTROID_SHIFT, MOMENTS_FAILED,
                      MOMENTS_FEW_PIXELS, circle_pixel_overlap, measure_sources)
from .psf import PSFModel, fit_psf_model, ps1v1_half_max_z
from .psfphot import (PHOT_BIG_GROUP, PHOT_BLENDED, PHOT_EDGE, PHOT_FIT_FAILED, PHOT_MASKED,
                      PHOT_NOT_CONVERGED, PHOT_POS_FAILED, PHOT_POS_FIXED, PHOT_SKY_FIT,
                      PSFPhotometry, fit_psf_photometry)

__all__ = [
    "FLAG_BITS", "FLAG_DOC", "CALIBRATION_BAD", "CMF_COLUMNS", "cmf_dtype", "column_units",
    "assemble_catalog", "aperture_fraction", "constant_psf", "find_and_measure",
    "SourceMeasurement", "MeasureOptions", "PROBLEMS",
]

# ------------------------------------------------------------------------------------------
# FLAGS bits (uint32). Bits 0x1-0x100 are those of ps1mpi.algorithms.psfphot (same values).

FLAG_BITS: dict[str, int] = {
    "FIT_FAILED": 0x00001,      # no PSF measurement: no usable pixels or a singular fit
    "POS_FAILED": 0x00002,      # centre fit diverged or moved too far: flux at the peak
    "NOT_CONVERGED": 0x00004,   # PSF fit reached its iteration limit
    "EDGE": 0x00008,            # fit radius beyond the image, or peak within a FWHM of the edge
    "MASKED": 0x00010,          # core compromised (PSF_QF < 0.85, or SAT/BLEED at the peak)
    "BLENDED": 0x00020,         # fitted together with neighbours / footprint with several peaks
    "POS_FIXED": 0x00040,       # centre held at the peak (too faint to fit a centre)
    "BIG_GROUP": 0x00080,       # blend group too large: fitted alone after neighbour subtraction
    "SKY_FIT": 0x00100,         # a local sky level was fitted
    "SATURATED": 0x00200,       # saturated or bleed pixel within 1 pixel of the peak
    "EXTENDED": 0x00400,        # EXT_NSIGMA above the extendedness threshold
    "PSF_STAR": 0x00800,        # used to build the PSF model
    "BLEND_PRIMARY": 0x01000,   # brightest peak of a blended footprint
    "MOMENTS_FAILED": 0x02000,  # moments unusable (no positive sum, few pixels, centroid ran off)
    "KRON_FAILED": 0x04000,     # Kron radius not measurable
    "PEAK_MASKED": 0x08000,     # the peak pixel itself is masked
    "PSF_FALLBACK": 0x10000,    # no fitted PSF model: constant model from the moments FWHM
}
FLAG_DOC: dict[str, str] = {
    "FIT_FAILED": "no PSF measurement (no usable pixels or a singular fit)",
    "POS_FAILED": "centre fit diverged or moved > 1 FWHM: flux measured at the peak",
    "NOT_CONVERGED": "PSF fit reached its iteration limit",
    "EDGE": "fit radius extends beyond the image, or peak within 1 FWHM of the edge",
    "MASKED": "PSF core compromised: PSF-weighted good fraction < min_qf, or SAT/BLEED at peak",
    "BLENDED": "fitted simultaneously with neighbours, or footprint with several peaks",
    "POS_FIXED": "centre held at the detection peak (S/N too low to fit a centre)",
    "BIG_GROUP": "blend group too large: fitted alone after neighbour subtraction",
    "SKY_FIT": "a local sky level was fitted with the flux",
    "SATURATED": "saturated or bleed-trail pixel within 1 pixel of the peak",
    "EXTENDED": "EXT_NSIGMA above the extendedness threshold (not a point source)",
    "PSF_STAR": "one of the stars the PSF model was built from",
    "BLEND_PRIMARY": "brightest peak of a blended footprint",
    "MOMENTS_FAILED": "moments unusable (non-positive sum, few pixels or centroid ran off)",
    "KRON_FAILED": "first radial moment (Kron radius) not measurable",
    "PEAK_MASKED": "the peak pixel itself is masked",
    "PSF_FALLBACK": "PSF model not fitted: constant PS1_V1 model of the moments FWHM used",
}
#: Bits that make a detection unsuitable as an astrometric or photometric reference (the
#: camera stage's ``flag_mask`` default, 31).
CALIBRATION_BAD = (FLAG_BITS["FIT_FAILED"] | FLAG_BITS["POS_FAILED"]
                   | FLAG_BITS["NOT_CONVERGED"] | FLAG_BITS["EDGE"] | FLAG_BITS["MASKED"])

_PHOT_SAME = (PHOT_FIT_FAILED | PHOT_POS_FAILED | PHOT_NOT_CONVERGED | PHOT_EDGE | PHOT_MASKED
              | PHOT_BLENDED | PHOT_POS_FIXED | PHOT_BIG_GROUP | PHOT_SKY_FIT)
assert all(FLAG_BITS[k] == v for k, v in (
    ("FIT_FAILED", PHOT_FIT_FAILED), ("POS_FAILED", PHOT_POS_FAILED),
    ("NOT_CONVERGED", PHOT_NOT_CONVERGED), ("EDGE", PHOT_EDGE), ("MASKED", PHOT_MASKED),
    ("BLENDED", PHOT_BLENDED), ("POS_FIXED", PHOT_POS_FIXED), ("BIG_GROUP", PHOT_BIG_GROUP),
    ("SKY_FIT", PHOT_SKY_FIT)))

# ------------------------------------------------------------------------------------------
# Columns: (name, dtype, unit, meaning). "FLUX" in a unit stands for the image unit.

CMF_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("IPP_IDET", "u4", "", "detection number in this catalog (0-based)"),
    ("X_PSF", "f8", "pix", "PSF-fit x centre (0-based pixel)"),
    ("Y_PSF", "f8", "pix", "PSF-fit y centre (0-based pixel)"),
    ("X_PSF_SIG", "f4", "pix", "error of X_PSF (0 if held fixed)"),
    ("Y_PSF_SIG", "f4", "pix", "error of Y_PSF (0 if held fixed)"),
    ("RA_PSF", "f8", "deg", "RA of the PSF centre (only with a WCS)"),
    ("DEC_PSF", "f8", "deg", "Dec of the PSF centre (only with a WCS)"),
    ("PSF_INST_FLUX", "f4", "FLUX", "PSF flux, aperture-corrected to the reference radius"),
    ("PSF_INST_FLUX_SIG", "f4", "FLUX", "error of PSF_INST_FLUX (Fisher matrix)"),
    ("PSF_INST_MAG", "f4", "mag", "-2.5 log10(PSF_INST_FLUX); NaN if flux <= 0"),
    ("PSF_INST_MAG_SIG", "f4", "mag", "1.0857 PSF_INST_FLUX_SIG / PSF_INST_FLUX"),
    ("AP_MAG", "f4", "mag", "aperture mag corrected to the PSF normalisation (curve of growth)"),
    ("AP_MAG_RAW", "f4", "mag", "-2.5 log10(AP_FLUX) in the AP_MAG_RADIUS aperture"),
    ("AP_MAG_RADIUS", "f4", "pix", "radius of the aperture (4.5 PSF sigma)"),
    ("AP_FLUX", "f4", "FLUX", "flux in the aperture (exact pixel overlap)"),
    ("AP_FLUX_SIG", "f4", "FLUX", "error of AP_FLUX"),
    ("PEAK_FLUX_AS_MAG", "f4", "mag", "-2.5 log10 of the peak pixel value"),
    ("DETECT_NSIGMA", "f4", "", "matched-filter significance of the detection peak"),
    ("KRON_FLUX", "f4", "FLUX", "flux within 2.5 MOMENTS_R1"),
    ("KRON_FLUX_ERR", "f4", "FLUX", "error of KRON_FLUX"),
    ("KRON_RADIUS", "f4", "pix", "Kron aperture radius, 2.5 MOMENTS_R1"),
    ("KRON_FLUX_INNER", "f4", "FLUX", "flux in the annulus MOMENTS_R1..KRON_RADIUS"),
    ("KRON_MASKED_FRAC", "f4", "", "masked fraction of the Kron aperture"),
    ("MOMENTS_R1", "f4", "pix", "first radial moment (smoothed image)"),
    ("MOMENTS_XX", "f4", "pix2", "second moment xx (PSF-sigma Gaussian window)"),
    ("MOMENTS_XY", "f4", "pix2", "second moment xy (windowed)"),
    ("MOMENTS_YY", "f4", "pix2", "second moment yy (windowed)"),
    ("PSF_MAJOR", "f4", "pix", "PSF model FWHM along its major axis at the source"),
    ("PSF_MINOR", "f4", "pix", "PSF model FWHM along its minor axis at the source"),
    ("PSF_THETA", "f4", "deg", "PSF major-axis angle from +x, counter-clockwise"),
    ("PSF_CHISQ", "f4", "", "reduced chi-square of the PSF fit"),
    ("PSF_NDOF", "i4", "", "degrees of freedom of the PSF fit"),
    ("PSF_NPIX", "i4", "", "pixels in the PSF fit"),
    ("PSF_QF", "f4", "", "PSF-weighted fraction of unmasked fit pixels"),
    ("EXT_NSIGMA", "f4", "", "sigma of light in excess of the PSF (extendedness)"),
    ("SKY", "f4", "FLUX/pix", "local background level (model + fitted offset)"),
    ("SKY_SIGMA", "f4", "FLUX/pix", "local background noise per pixel"),
    ("FLAGS", "u4", "", "bit flags, see FLAG_BITS / the FLAGnnnn header cards"),
)


def cmf_dtype(*, with_wcs: bool = False) -> np.dtype:
    """The catalog's structured dtype (RA_PSF/DEC_PSF only ``with_wcs``)."""
    return np.dtype([(n, t) for n, t, _, _ in CMF_COLUMNS
                     if with_wcs or n not in ("RA_PSF", "DEC_PSF")])


def column_units(names: tuple[str, ...] | list[str], *, flux_unit: str = "e-") -> list[str]:
    """FITS ``TUNIT`` values for catalog columns (``FLUX`` replaced by ``flux_unit``)."""
    units = {n: u for n, _, u, _ in CMF_COLUMNS}
    return [units[n].replace("FLUX", flux_unit) for n in names]


# ------------------------------------------------------------------------------------------

def _mag(flux: np.ndarray) -> np.ndarray:
    f = np.asarray(flux, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(f > 0, -2.5 * np.log10(np.where(f > 0, f, 1.0)), np.nan)


def aperture_fraction(psf: PSFModel, x: np.ndarray, y: np.ndarray,
                      radius: float | np.ndarray) -> np.ndarray:
    """Fraction of the unit-flux PSF model inside circular apertures (exact pixel overlap,
    the same weights as :func:`ps1mpi.algorithms.moments.aperture_photometry`).

    Parameters
    ----------
    psf : PSFModel
        The image's PSF model.
    x, y : ndarray, shape (n,)
        Aperture centres (pixels); non-finite entries give NaN.
    radius : float or ndarray, shape (n,)
        Aperture radius (pixels).

    Returns
    -------
    ndarray, shape (n,)
        Fraction of the model's unit flux in each aperture (dimensionless).
    """
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    r = np.broadcast_to(np.asarray(radius, dtype=np.float64), x.shape)
    out = np.full(x.shape, np.nan)
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(r) & (r > 0)
    if not ok.any():
        return out
    size = 2 * int(math.ceil(float(np.max(r[ok])))) + 3
    idx = np.flatnonzero(ok)
    g = np.arange(size, dtype=np.float64)
    for a in range(0, idx.size, max(1, 2_000_000 // (size * size))):
        k = idx[a:a + max(1, 2_000_000 // (size * size))]
        st = psf.evaluate(x[k], y[k], size=size)
        ix0, iy0 = psf.stamp_origin(x[k], y[k], size)
        dx = (ix0[:, None, None] + g[None, None, :]) - x[k, None, None]
        dy = (iy0[:, None, None] + g[None, :, None]) - y[k, None, None]
        w = circle_pixel_overlap(dx, dy, r[k, None, None])
        out[k] = np.sum(st * w, axis=(1, 2))
    return out


def assemble_catalog(detections: np.ndarray, phot: PSFPhotometry, moments: np.ndarray, *,
                     sky: np.ndarray, sky_sigma: np.ndarray, ap_fraction: np.ndarray,
                     psf_star_index: np.ndarray | None = None, ext_threshold: float = 3.0,
                     ra: np.ndarray | None = None, dec: np.ndarray | None = None,
                     psf_fallback: bool = False) -> np.ndarray:
    """The CMF catalog of one image from its measurement arrays.

    Parameters
    ----------
    detections : ndarray of ``ps1mpi.algorithms.detect.DETECTION_DTYPE``, shape (n,)
        Detections (peaks, significance, blend/edge/saturated/masked flags).
    phot : PSFPhotometry
        PSF photometry of the same n sources, in the same order (image units).
    moments : ndarray, shape (n,)
        Output of :func:`ps1mpi.algorithms.moments.measure_sources` (moments, Kron,
        aperture), same order.
    sky : ndarray, shape (n,)
        Background level removed at each source (image units per pixel); the fitted local
        offset ``phot.sky`` is added to it.
    sky_sigma : ndarray, shape (n,)
        Background noise per pixel at each source (image units).
    ap_fraction : ndarray, shape (n,)
        Fraction of the PSF model's unit flux inside each source's aperture
        (:func:`aperture_fraction`), for ``AP_MAG``.
    psf_star_index : ndarray of int, optional
        Indices of the sources used for the PSF model (flag ``PSF_STAR``).
    ext_threshold : float
        ``EXT_NSIGMA`` above which a source is flagged ``EXTENDED`` (sigma).
    ra, dec : ndarray, shape (n,), optional
        Sky position of the PSF centres (degrees); adds ``RA_PSF`` and ``DEC_PSF``.
    psf_fallback : bool
        The PSF model was not fitted (flag ``PSF_FALLBACK`` on every source).

    Returns
    -------
    ndarray of :func:`cmf_dtype`, shape (n,)
        One row per detection, in the order given.
    """
    det = np.asarray(detections)
    n = det.size
    for name, arr in (("phot", phot.x), ("moments", moments), ("sky", sky),
                      ("sky_sigma", sky_sigma), ("ap_fraction", ap_fraction)):
        if np.shape(arr)[0] != n:
            raise ValueError(f"assemble_catalog: {name} has {np.shape(arr)[0]} rows, the "
                             f"detections {n}")
    with_wcs = ra is not None and dec is not None
    if (ra is None) != (dec is None):
        raise ValueError("assemble_catalog: give both ra and dec or neither")
    out = np.zeros(n, dtype=cmf_dtype(with_wcs=with_wcs))
    if n == 0:
        return out
    out["IPP_IDET"] = np.arange(n)
    out["X_PSF"], out["Y_PSF"] = phot.x, phot.y
    out["X_PSF_SIG"], out["Y_PSF_SIG"] = phot.x_sig, phot.y_sig
    if with_wcs:
        out["RA_PSF"], out["DEC_PSF"] = ra, dec
    flux = np.asarray(phot.flux, dtype=np.float64)
    fsig = np.asarray(phot.flux_sig, dtype=np.float64)
    out["PSF_INST_FLUX"], out["PSF_INST_FLUX_SIG"] = flux, fsig
    out["PSF_INST_MAG"] = _mag(flux)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["PSF_INST_MAG_SIG"] = np.where(flux > 0, 2.5 / math.log(10.0) * fsig / flux, np.nan)
    apf = np.asarray(moments["AP_FLUX"], dtype=np.float64)
    out["AP_FLUX"], out["AP_FLUX_SIG"] = apf, moments["AP_FLUX_ERR"]
    out["AP_MAG_RAW"] = _mag(apf)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.asarray(ap_fraction, dtype=np.float64)
        out["AP_MAG"] = _mag(np.where(frac > 0, apf / np.where(frac > 0, frac, 1.0), np.nan))
    out["AP_MAG_RADIUS"] = moments["AP_RADIUS"]
    out["PEAK_FLUX_AS_MAG"] = _mag(det["flux_peak"])
    out["DETECT_NSIGMA"] = det["significance"]
    have = set(moments.dtype.names or ())
    for col in ("KRON_FLUX", "KRON_FLUX_ERR", "KRON_RADIUS", "KRON_FLUX_INNER",
                "KRON_MASKED_FRAC", "MOMENTS_R1", "MOMENTS_XX", "MOMENTS_XY", "MOMENTS_YY"):
        out[col] = moments[col] if col in have else np.nan
    out["PSF_MAJOR"], out["PSF_MINOR"], out["PSF_THETA"] = (phot.psf_major, phot.psf_minor,
                                                            phot.psf_theta)
    out["PSF_CHISQ"], out["PSF_NDOF"], out["PSF_NPIX"] = phot.chi2_dof, phot.n_dof, phot.n_pix
    out["PSF_QF"], out["EXT_NSIGMA"] = phot.psf_qf, phot.ext_nsigma
    out["SKY"] = np.asarray(sky, dtype=np.float64) + np.asarray(phot.sky, dtype=np.float64)
    out["SKY_SIGMA"] = sky_sigma

    fl = np.asarray(phot.flags, dtype=np.uint32) & np.uint32(_PHOT_SAME)
    B = FLAG_BITS
    fl |= np.where(det["edge"], B["EDGE"], 0).astype(np.uint32)
    fl |= np.where(det["blend"], B["BLENDED"], 0).astype(np.uint32)
    fl |= np.where(det["blend_primary"], B["BLEND_PRIMARY"], 0).astype(np.uint32)
    fl |= np.where(det["saturated"], B["SATURATED"] | B["MASKED"], 0).astype(np.uint32)
    fl |= np.where(det["masked"], B["PEAK_MASKED"], 0).astype(np.uint32)
    ext = np.asarray(phot.ext_nsigma, dtype=np.float64)
    fl |= np.where(np.isfinite(ext) & (ext > ext_threshold), B["EXTENDED"], 0).astype(np.uint32)
    mflags = np.asarray(moments["MOMENTS_FLAGS"]).astype(np.int64)
    bad_m = (mflags & (MOMENTS_FAILED | MOMENTS_FEW_PIXELS | MOMENTS_CENTROID_SHIFT)) != 0
    fl |= np.where(bad_m, B["MOMENTS_FAILED"], 0).astype(np.uint32)
    kflags = np.asarray(moments["KRON_FLAGS"]).astype(np.int64)
    fl |= np.where((kflags & KRON_FAILED) != 0, B["KRON_FAILED"], 0).astype(np.uint32)
    if psf_star_index is not None and len(psf_star_index):
        fl[np.asarray(psf_star_index, dtype=np.int64)] |= np.uint32(B["PSF_STAR"])
    if psf_fallback:
        fl |= np.uint32(B["PSF_FALLBACK"])
    out["FLAGS"] = fl
    return out


def constant_psf(image_shape: tuple[int, int], fwhm_major: float, fwhm_minor: float | None = None,
                 theta: float = 0.0, *, k: float = 0.5, norm_radius: float = 25.0,
                 ap_corr: float = 1.0) -> PSFModel:
    """A PS1_V1 PSF model constant over the image with the given FWHM (pixels).

    Used when too few stars allow a fitted model (``ps1mpi phot`` on sparse images).

    Parameters
    ----------
    image_shape : (ny, nx)
        Image size (pixels).
    fwhm_major, fwhm_minor : float
        FWHM along the major and minor axes (pixels); ``fwhm_minor`` defaults to the major.
    theta : float
        Major-axis angle (degrees from +x).
    k : float
        PS1_V1 linear term.
    norm_radius : float
        Normalisation radius (pixels).
    ap_corr : float
        Aperture correction recorded in the model (true / PSF flux).

    Returns
    -------
    PSFModel
    """
    fwhm_minor = fwhm_major if fwhm_minor is None else fwhm_minor
    if not (np.isfinite(fwhm_major) and fwhm_major > 0 and np.isfinite(fwhm_minor)
            and fwhm_minor > 0):
        raise ValueError(f"constant_psf: FWHM must be finite and positive, got "
                         f"{fwhm_major}, {fwhm_minor}")
    scale = 2.0 * math.sqrt(2.0 * float(ps1v1_half_max_z(k)))
    return PSFModel.from_axes(image_shape, sigma_major=fwhm_major / scale,
                              sigma_minor=fwhm_minor / scale, theta=theta, k=k,
                              norm_radius=norm_radius, ap_corr=float(ap_corr))


def _fallback_apcorr(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, psf: PSFModel,
                     phot: PSFPhotometry, *, radius: float, mask_bits: int) -> tuple[float, int]:
    """Aperture correction of a constant (unfitted) PSF model: median over the measurable
    stars of the flux in a circle of ``radius`` pixels divided by the PSF flux times the
    model's fraction in that circle. ``(1.0, 0)`` when no star qualifies."""
    from .moments import aperture_photometry
    from .psfphot import PHOT_BAD

    ok = ((phot.flags & PHOT_BAD) == 0) & np.isfinite(phot.x) & np.isfinite(phot.y)
    ok &= (phot.flux > 0) & (phot.flux_sig > 0)
    snr = np.where(ok, phot.flux / np.where(phot.flux_sig > 0, phot.flux_sig, 1.0), 0.0)
    use = np.flatnonzero(ok & (snr >= 20.0))
    if use.size == 0:
        use = np.flatnonzero(ok & (snr >= 5.0))
    if use.size == 0:
        return 1.0, 0
    ap = aperture_photometry(image, variance, mask, phot.x[use], phot.y[use], radius,
                             mask_bits=mask_bits)
    frac = aperture_fraction(psf, phot.x[use], phot.y[use], radius)
    clean = (ap.masked_frac[:, 0] < 0.05) & (frac > 0)
    if not clean.any():
        return 1.0, 0
    ratio = ap.flux[clean, 0] / (phot.flux[use][clean] * frac[clean])
    return float(np.median(ratio)), int(clean.sum())


# ------------------------------------------------------------------------------------------
# The psphot sequence

#: Reasons :func:`find_and_measure` stops early (``SourceMeasurement.problem``).
PROBLEMS = {
    "no_sky": "no usable background (too few unmasked pixels)",
    "no_sources": "too few sources detected",
    "psf_failed": "the PSF model could not be fitted",
}


@dataclass
class MeasureOptions:
    """Options of :func:`find_and_measure` (IPP psphot recipe values by default).

    Attributes
    ----------
    background_cell : int
        Background node spacing (pixels), GPC1 400.
    fwhm_guess : float
        First FWHM for the matched filter (pixels).
    threshold : float
        Detection threshold (sigma of the matched filter), psphot 5.
    footprint_threshold : float
        Footprint threshold (sigma).
    min_sources : int
        Fewer detections is bad data ("no_sources").
    psf_max_stars, psf_min_snr, psf_max_grid : int, float, int
        PSF model: at most 2000 stars of S/N >= 20, grid up to 6x6.
    psf_residuals : bool or "auto"
        Pixel residual table of the PSF model.
    psf_fallback : bool
        If the PSF model cannot be fitted, measure with a constant model of the moments
        FWHM (flag ``PSF_FALLBACK``) instead of stopping.
    fit_radius_fwhm : float
        PSF-fit radius (FWHM).
    ext_threshold : float
        ``EXT_NSIGMA`` above which a source is ``EXTENDED``.
    max_sources : int
        If positive, keep only the most significant detections.
    mask_bits : int
        Mask bits excluding a pixel from every measurement.
    """

    background_cell: int = 400
    fwhm_guess: float = 4.5
    threshold: float = 5.0
    footprint_threshold: float = 3.0
    min_sources: int = 3
    psf_max_stars: int = 2000
    psf_min_snr: float = 20.0
    psf_max_grid: int = 6
    psf_residuals: bool | str = "auto"
    psf_fallback: bool = False
    fit_radius_fwhm: float = 3.0
    ext_threshold: float = 3.0
    max_sources: int = 0
    mask_bits: int = maskbits.BAD


@dataclass
class SourceMeasurement:
    """Result of :func:`find_and_measure`.

    Attributes
    ----------
    catalog : ndarray of :func:`cmf_dtype`
        One row per detection (empty when ``problem`` stopped the sequence early).
    background : BackgroundModel or None
        The background model subtracted (None if it failed).
    sky_subtracted : ndarray or None
        The background-subtracted image (float32, image units; None if no background).
    psf : PSFModel or None
        The fitted PSF model (the constant fallback when ``psf_fallback`` was used).
    detections : ndarray
        The detections (``DETECTION_DTYPE``).
    fwhm : FWHMEstimate or None
        FWHM from the bright isolated stars before the PSF fit.
    timings : dict
        Seconds per step: ``background``, ``detect`` (both passes and the FWHM estimate),
        ``psf``, ``measure`` (PSF photometry, moments, catalog).
    problem : str
        "" when the sequence completed; otherwise a key of :data:`PROBLEMS`: the sequence
        stopped there (empty catalog), except for "psf_failed" with
        ``MeasureOptions.psf_fallback``, where every source was measured with the constant
        fallback model (flag ``PSF_FALLBACK``).
    message : str
        Why it stopped, or a note (e.g. the fallback PSF).
    """

    catalog: np.ndarray
    background: BackgroundModel | None
    sky_subtracted: np.ndarray | None
    psf: PSFModel | None
    detections: np.ndarray
    fwhm: FWHMEstimate | None
    timings: dict = field(default_factory=dict)
    problem: str = ""
    message: str = ""


def _cell_sigma_at(bg: BackgroundModel, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Robust sky noise of the statistics cell nearest to each position (image units)."""
    cs = np.asarray(bg.cell_sigma, dtype=np.float64)
    if cs.size == 0 or bg.cell_x.size == 0 or bg.cell_y.size == 0:
        return np.full(np.shape(x), bg.sigma)
    ix = np.clip(np.searchsorted(bg.cell_x, x), 0, bg.cell_x.size - 1)
    ixm = np.clip(ix - 1, 0, bg.cell_x.size - 1)
    ix = np.where(np.abs(bg.cell_x[ixm] - x) < np.abs(bg.cell_x[ix] - x), ixm, ix)
    iy = np.clip(np.searchsorted(bg.cell_y, y), 0, bg.cell_y.size - 1)
    iym = np.clip(iy - 1, 0, bg.cell_y.size - 1)
    iy = np.where(np.abs(bg.cell_y[iym] - y) < np.abs(bg.cell_y[iy] - y), iym, iy)
    val = cs[iy, ix]
    return np.where(np.isfinite(val) & (val > 0), val, bg.sigma)


def find_and_measure(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, *,
                     gain: float | None = 1.0, options: MeasureOptions | None = None,
                     wcs=None) -> SourceMeasurement:
    """Find and measure the sources of one detrended image (the psphot sequence).

    Steps: background model (:func:`~ps1mpi.algorithms.background.fit_background`) and its
    subtraction; detection at ``options.fwhm_guess`` and FWHM estimate from bright isolated
    stars, detection again with the measured FWHM when it differs by more than 5%; PSF model
    (:func:`~ps1mpi.algorithms.psf.fit_psf_model`); PSF photometry of every detection
    (:func:`~ps1mpi.algorithms.psfphot.fit_psf_photometry`); moments, Kron and aperture
    photometry (:func:`~ps1mpi.algorithms.moments.measure_sources`) started at the PSF
    centres; the catalog (:func:`assemble_catalog`).

    Parameters
    ----------
    image : ndarray, float32, shape (ny, nx)
        Detrended image with its sky (image units, e.g. electrons). Not modified.
    variance : ndarray, shape (ny, nx)
        Variance (image units squared); non-positive or non-finite values are unusable.
    mask : ndarray of uint16, shape (ny, nx)
        Mask bits (:mod:`ps1mpi.algorithms.maskbits`).
    gain : float or None
        Counts per image unit of the Poisson term of ``variance`` (1 for electrons); None
        when the variance is not Poisson (weights then come from the variance as given).
    options : MeasureOptions, optional
        Recipe values.
    wcs : astropy.wcs.WCS, optional
        Celestial WCS of the image (0-based pixels are converted with ``origin=0``); adds
        ``RA_PSF`` / ``DEC_PSF``.

    Returns
    -------
    SourceMeasurement
        ``problem`` is "" on success, or names why the image is bad data.

    Raises
    ------
    ValueError
        If the arrays have different shapes or are not 2-D.
    """
    opt = options or MeasureOptions()
    image = np.asarray(image)
    variance = np.asarray(variance)
    mask = np.asarray(mask)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"find_and_measure: image must be a non-empty 2-D array, got shape "
                         f"{image.shape}")
    for name, arr in (("variance", variance), ("mask", mask)):
        if arr.shape != image.shape:
            raise ValueError(f"find_and_measure: {name} shape {arr.shape} differs from the "
                             f"image shape {image.shape}")
    if mask.dtype != np.uint16:
        mask = mask.astype(np.uint16)
    if gain is not None and not (np.isfinite(gain) and gain > 0):
        raise ValueError(f"find_and_measure: gain must be positive or None, got {gain}")
    timings = {"background": 0.0, "detect": 0.0, "psf": 0.0, "measure": 0.0}
    empty = np.zeros(0, dtype=cmf_dtype(with_wcs=wcs is not None))

    # --- background
    t0 = time.perf_counter()
    try:
        bg = fit_background(image, mask, cell=int(opt.background_cell), mask_bits=opt.mask_bits)
    except ValueError as err:
        timings["background"] = time.perf_counter() - t0
        return SourceMeasurement(empty, None, None, None, np.zeros(0), None, timings,
                                 "no_sky", f"background: {err}")
    sub = image.astype(np.float32, copy=True)
    sub -= bg.evaluate(image.shape)
    unusable = ((mask & maskbits.GAP) != 0) | ~np.isfinite(sub)
    if unusable.any():
        sub[unusable] = 0.0
    timings["background"] = time.perf_counter() - t0

    # --- detection, FWHM, detection with the measured FWHM
    t0 = time.perf_counter()
    det_kw = dict(threshold=opt.threshold, footprint_threshold=opt.footprint_threshold,
                  mask_bits=opt.mask_bits, max_peaks=int(opt.max_sources))
    fwhm = float(opt.fwhm_guess)
    det = detect_sources(sub, variance, mask, fwhm=fwhm, **det_kw)
    est = estimate_fwhm(sub, variance, mask, det, fwhm_guess=fwhm, mask_bits=opt.mask_bits)
    if est.n_stars >= 3 and np.isfinite(est.fwhm) and est.fwhm > 0:
        if abs(est.fwhm - fwhm) > 0.05 * fwhm:
            fwhm = float(est.fwhm)
            det = detect_sources(sub, variance, mask, fwhm=fwhm, **det_kw)
    timings["detect"] = time.perf_counter() - t0
    if det.size < max(int(opt.min_sources), 1):
        return SourceMeasurement(empty, bg, sub, None, det, est, timings, "no_sources",
                                 f"{det.size} sources above {opt.threshold} sigma "
                                 f"(need {opt.min_sources})")

    # --- PSF model
    t0 = time.perf_counter()
    x = det["x"].astype(np.float64)
    y = det["y"].astype(np.float64)
    fallback = False
    note = ""
    try:
        psf = fit_psf_model(sub, variance, mask, x, y, flux=det["amp_peak"].astype(np.float64),
                            candidates=~(det["saturated"] | det["masked"] | det["edge"]),
                            max_stars=int(opt.psf_max_stars), min_snr=float(opt.psf_min_snr),
                            max_grid=int(opt.psf_max_grid), residuals=opt.psf_residuals,
                            fit_radius_fwhm=float(opt.fit_radius_fwhm),
                            mask_bits=opt.mask_bits, gain=gain)
    except ValueError as err:
        timings["psf"] = time.perf_counter() - t0
        if not opt.psf_fallback:
            return SourceMeasurement(empty, bg, sub, None, det, est, timings, "psf_failed",
                                     f"PSF model: {err}")
        fmaj = est.fwhm_major if est.n_stars >= 1 and np.isfinite(est.fwhm_major) else fwhm
        fmin = est.fwhm_minor if est.n_stars >= 1 and np.isfinite(est.fwhm_minor) else fwhm
        psf0 = constant_psf(image.shape, float(fmaj), float(fmin))
        ph0 = fit_psf_photometry(sub, variance, mask, psf0, x, y, gain=gain,
                                 fit_radius_fwhm=float(opt.fit_radius_fwhm),
                                 mask_bits=opt.mask_bits, neighbour_passes=0)
        apc, napc = _fallback_apcorr(sub, variance, mask, psf0, ph0,
                                     radius=2.0 * math.sqrt(fmaj * fmin),
                                     mask_bits=opt.mask_bits)
        psf = constant_psf(image.shape, float(fmaj), float(fmin), ap_corr=apc)
        fallback = True
        note = (f"PSF model not fitted ({err}); constant model of FWHM {fmaj:.2f} x "
                f"{fmin:.2f} px used, aperture correction {apc:.4f} from {napc} stars")
    timings["psf"] = time.perf_counter() - t0

    # --- measurement
    t0 = time.perf_counter()
    phot = fit_psf_photometry(sub, variance, mask, psf, x, y, gain=gain,
                              fit_radius_fwhm=float(opt.fit_radius_fwhm),
                              mask_bits=opt.mask_bits)
    good_pos = (np.isfinite(phot.x) & np.isfinite(phot.y)
                & ((phot.flags & (PHOT_FIT_FAILED | PHOT_POS_FAILED)) == 0))
    xm = np.where(good_pos, phot.x, x)
    ym = np.where(good_pos, phot.y, y)
    psf_fwhm = float(np.median(np.sqrt(phot.psf_major * phot.psf_minor)))
    if not (np.isfinite(psf_fwhm) and psf_fwhm > 0):
        psf_fwhm = fwhm
    mom = measure_sources(sub, variance, mask, xm, ym, psf_sigma=psf_fwhm / FWHM_PER_SIGMA,
                          sky_sigma=bg.sigma, mask_bits=opt.mask_bits)
    frac = aperture_fraction(psf, mom["X_MOMENTS"], mom["Y_MOMENTS"], mom["AP_RADIUS"])
    sky = bg.evaluate_at(xm, ym)
    sky_sig = _cell_sigma_at(bg, xm, ym)
    ra = dec = None
    if wcs is not None:
        px = np.where(np.isfinite(phot.x), phot.x, x)
        py = np.where(np.isfinite(phot.y), phot.y, y)
        ra, dec = wcs.all_pix2world(px, py, 0)
    cat = assemble_catalog(det, phot, mom, sky=sky, sky_sigma=sky_sig, ap_fraction=frac,
                           psf_star_index=None if fallback else psf.psf_star_index,
                           ext_threshold=float(opt.ext_threshold), ra=ra, dec=dec,
                           psf_fallback=fallback)
    timings["measure"] = time.perf_counter() - t0
    return SourceMeasurement(cat, bg, sub, psf, det, est, timings,
                             "psf_failed" if fallback else "", note)
