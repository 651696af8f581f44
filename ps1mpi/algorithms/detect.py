"""Source detection: matched-filter significance, peaks, footprints, deblending, FWHM.

Detection follows psphot (IPP):

1. The significance image is the PSF-matched filter of the sky-subtracted image with a
   circular Gaussian of the PSF sigma ``g``, weighted by the inverse variance ``W`` (zero on
   masked pixels): ``nu = (g * (W I)) / sqrt(g^2 * W)``, where ``*`` is convolution. For a
   point source ``(g * (W I)) / (g^2 * W)`` is the maximum-likelihood peak amplitude and
   ``nu`` its signal-to-noise ratio; pixels whose kernel is less than ``min_coverage`` (0.5,
   ``PEAKS_MIN_GAUSS``) covered by usable pixels are given no significance.
2. Peaks are local maxima (3x3) of ``nu`` above ``threshold`` (5 sigma,
   ``PEAKS_NSIGMA_LIMIT_2``).
3. Footprints are the 8-connected regions of ``nu`` above ``footprint_threshold``, grown
   by ``footprint_grow`` pixels (``FOOTPRINT_GROW_RADIUS`` 3; in the L1 metric, by iterated
   4-connected dilation) and labelled; a peak whose footprint holds fewer than
   ``footprint_npix_min`` pixels above the threshold (``FOOTPRINT_NPIXMIN`` 5) is dropped.
4. Deblending (``pmFootprintCullPeaks``, on the significance image): in every footprint the
   peaks are taken brightest first; a fainter peak survives only if the region connected
   to it above ``nu_peak - cull_nsigma * sqrt(1 + (cull_padding nu_peak)^2)`` (at least
   ``cull_min``) holds no brighter surviving peak, i.e. if the saddle ("col") separating it
   from every brighter peak is deep enough. Recipe values 4, 0.01 and 1
   (``FOOTPRINT_CULL_NSIGMA_DELTA``, ``_PAD``, ``_MIN``). Footprints left with several peaks
   are blends; every peak in them is flagged ``blend`` and the brightest ``blend_primary``.

Coordinates are 0-based pixels with the centre of pixel ``[j, i]`` at ``(x, y) = (i, j)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from . import maskbits
from .moments import centroid_moments, deconvolve_window

__all__ = [
    "DETECTION_DTYPE",
    "FWHMEstimate",
    "significance_image",
    "detect_sources",
    "estimate_fwhm",
]

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))

DETECTION_DTYPE = np.dtype([
    ("id", "i4"),
    ("x_peak", "i4"), ("y_peak", "i4"),        # peak pixel (pixels)
    ("x", "f8"), ("y", "f8"),                  # sub-pixel peak of the significance (pixels)
    ("significance", "f4"),                    # matched-filter S/N at the peak
    ("flux_peak", "f4"),                       # image value at the peak pixel (ADU)
    ("amp_peak", "f4"),                        # matched-filter PSF peak amplitude (ADU)
    ("footprint_id", "i4"),                    # 1-based footprint label
    ("footprint_npix", "i4"),                  # footprint size (pixels)
    ("n_peaks", "i2"),                         # surviving peaks in the footprint
    ("blend", "?"),                            # footprint holds more than one peak
    ("blend_primary", "?"),                    # brightest peak of a blended footprint
    ("edge", "?"),                             # peak near the image edge
    ("saturated", "?"),                        # SAT or BLEED pixel within 1 pixel of peak
    ("masked", "?"),                           # peak pixel itself is masked
])


def _check(image, variance, mask, func):
    image = np.asarray(image)
    variance = np.asarray(variance)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"{func}: image must be a non-empty 2-D array, got shape {image.shape}")
    if variance.shape != image.shape:
        raise ValueError(f"{func}: variance shape {variance.shape} differs from image shape "
                         f"{image.shape}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise ValueError(f"{func}: mask shape {mask.shape} differs from image shape "
                             f"{image.shape}")
    return image, variance, mask


def _kernel_sum(sigma: float, truncate: float) -> float:
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    return float(np.exp(-0.5 * t * t / sigma ** 2).sum())


def _matched_filter(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None,
                    fwhm: float, mask_bits: int, truncate: float, min_coverage: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Matched-filter numerator ``g * (W I)`` and denominator ``g^2 * W`` (float32).

    The denominator is 0 where the kernel coverage by usable pixels is below
    ``min_coverage``.
    """
    sigma = fwhm / FWHM_PER_SIGMA
    s2 = sigma / np.sqrt(2.0)
    t2 = truncate * np.sqrt(2.0)
    var = np.asarray(variance, dtype=np.float32)
    img = np.asarray(image, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        w = np.float32(1.0) / var                      # new array
        good = np.isfinite(w) & (var > 0) & np.isfinite(img)
        if mask is not None:
            good &= (mask & mask_bits) == 0
        all_good = bool(good.all())
        if not all_good:
            w[~good] = 0.0
        wi = np.multiply(w, img, dtype=np.float32)
        if not all_good:
            wi[~good] = 0.0
    num = ndi.gaussian_filter(wi, sigma, truncate=truncate, output=np.float32, mode="constant")
    del wi
    den = ndi.gaussian_filter(w, s2, truncate=t2, output=np.float32, mode="constant")
    del w
    num *= np.float32(_kernel_sum(sigma, truncate) ** 2)
    den *= np.float32(_kernel_sum(s2, t2) ** 2)
    if all_good:
        # only the image border lacks coverage
        cov_y = ndi.gaussian_filter1d(np.ones(image.shape[0], np.float32), s2, truncate=t2,
                                      mode="constant")
        cov_x = ndi.gaussian_filter1d(np.ones(image.shape[1], np.float32), s2, truncate=t2,
                                      mode="constant")
        ry = np.flatnonzero(cov_y < 1.0 - 1e-6)
        rx = np.flatnonzero(cov_x < 1.0 - 1e-6)
        den[ry, :] *= np.outer(cov_y[ry], cov_x) >= min_coverage
        den[:, rx] *= np.outer(cov_y, cov_x[rx]) >= min_coverage
    else:
        cov = ndi.gaussian_filter(good.astype(np.float32), s2, truncate=t2, output=np.float32,
                                  mode="constant")
        den[cov < min_coverage] = 0.0
    return num, den


def significance_image(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None, *,
                       fwhm: float, mask_bits: int = maskbits.BAD, truncate: float = 4.0,
                       min_coverage: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """PSF-matched-filter significance and amplitude images.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Sky-subtracted image (ADU).
    variance : ndarray, shape (ny, nx)
        Pixel variances (ADU^2); non-positive or non-finite values mark unusable pixels.
    mask : ndarray of uint16 or None
        Bit mask; pixels with ``mask_bits`` set are unusable.
    fwhm : float
        FWHM of the Gaussian matched filter (pixels).
    mask_bits : int
        Mask bits that make a pixel unusable.
    truncate : float
        Kernel half-width in sigmas.
    min_coverage : float
        Minimum fraction of the kernel weight on usable pixels; below it the significance
        is 0.

    Returns
    -------
    significance : ndarray, shape (ny, nx), float32
        Signal-to-noise ratio of a point source centred on each pixel.
    amplitude : ndarray, shape (ny, nx), float32
        Maximum-likelihood PSF peak amplitude at each pixel (ADU).
    """
    image, variance, mask = _check(image, variance, mask, "significance_image")
    if not fwhm > 0:
        raise ValueError(f"significance_image: fwhm must be positive, got {fwhm}")
    num, den = _matched_filter(image, variance, mask, fwhm, mask_bits, truncate, min_coverage)
    with np.errstate(invalid="ignore", divide="ignore"):
        sig = np.where(den > 0, num / np.sqrt(den), np.float32(0.0)).astype(np.float32)
        amp = np.where(den > 0, num / den, np.float32(0.0)).astype(np.float32)
    return sig, amp


def _local_maxima(sig: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixels above ``threshold`` that are 3x3 local maxima (ties go to the first in raster
    order)."""
    ny, nx = sig.shape
    yy, xx = np.nonzero(sig > threshold)
    if yy.size == 0:
        return yy, xx
    v = sig[yy, xx]
    keep = np.ones(yy.size, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            y2 = yy + dy
            x2 = xx + dx
            inside = (y2 >= 0) & (y2 < ny) & (x2 >= 0) & (x2 < nx)
            nv = np.full(yy.size, -np.inf, dtype=np.float32)
            nv[inside] = sig[y2[inside], x2[inside]]
            before = (dy < 0) or (dy == 0 and dx < 0)
            keep &= (v > nv) if before else (v >= nv)
    return yy[keep], xx[keep]


def _subpixel(sig: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parabolic sub-pixel refinement of peaks along x and y."""
    ny, nx = sig.shape
    c = sig[yy, xx].astype(np.float64)

    def axis_offset(a_m, a_p):
        den = a_m - 2.0 * c + a_p
        with np.errstate(invalid="ignore", divide="ignore"):
            d = np.where(den < 0, 0.5 * (a_m - a_p) / den, 0.0)
        return np.clip(np.nan_to_num(d), -0.5, 0.5)

    xm = sig[yy, np.maximum(xx - 1, 0)].astype(np.float64)
    xp = sig[yy, np.minimum(xx + 1, nx - 1)].astype(np.float64)
    ym = sig[np.maximum(yy - 1, 0), xx].astype(np.float64)
    yp = sig[np.minimum(yy + 1, ny - 1), xx].astype(np.float64)
    ox = np.where((xx > 0) & (xx < nx - 1), axis_offset(xm, xp), 0.0)
    oy = np.where((yy > 0) & (yy < ny - 1), axis_offset(ym, yp), 0.0)
    return xx + ox, yy + oy


def _cull_footprint(sig_sub: np.ndarray, in_fp: np.ndarray, py: np.ndarray, px: np.ndarray,
                    pv: np.ndarray, *, nsigma: float, padding: float, cull_min: float
                    ) -> np.ndarray:
    """Saddle test for the peaks of one footprint; returns the surviving-peak flags."""
    order = np.argsort(-pv, kind="stable")
    keep = np.zeros(pv.size, dtype=bool)
    keep[order[0]] = True
    kept = [order[0]]
    structure = np.ones((3, 3), dtype=bool)
    for i in order[1:]:
        nu = float(pv[i])
        level = nu - nsigma * np.hypot(1.0, padding * nu)
        level = max(level, cull_min)
        level = min(level, nu - 1e-6)
        region = in_fp & (sig_sub >= level)
        lab, _ = ndi.label(region, structure=structure)
        mine = lab[py[i], px[i]]
        if mine == 0:
            keep[i] = True
            kept.append(i)
            continue
        kk = np.asarray(kept)
        if np.any(lab[py[kk], px[kk]] == mine):
            continue
        keep[i] = True
        kept.append(i)
    return keep


def detect_sources(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None = None, *,
                   fwhm: float = 4.5, threshold: float = 5.0,
                   footprint_threshold: float = 3.0, footprint_grow: int = 3,
                   footprint_npix_min: int = 5, cull_nsigma: float = 4.0,
                   cull_padding: float = 0.01, cull_min: float = 1.0,
                   edge_margin: float | None = None, min_coverage: float = 0.5,
                   mask_bits: int = maskbits.BAD,
                   saturation_bits: int = maskbits.SAT | maskbits.BLEED,
                   max_peaks: int = 0, return_footprints: bool = False):
    """Detect sources in a sky-subtracted image.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Sky-subtracted image (ADU).
    variance : ndarray, shape (ny, nx)
        Pixel variances (ADU^2).
    mask : ndarray of uint16, optional
        Bit mask; pixels with ``mask_bits`` set are not used.
    fwhm : float
        FWHM of the PSF (pixels) for the matched filter; 4.5 pixels (1.16 arcsec) by
        default, refine with :func:`estimate_fwhm`.
    threshold : float
        Peak significance threshold (sigma), 5.
    footprint_threshold : float
        Significance above which pixels belong to footprints (sigma); must not exceed
        ``threshold``.
    footprint_grow : int
        Footprints are grown by this radius (pixels) before being labelled.
    footprint_npix_min : int
        Fewest footprint pixels above ``footprint_threshold`` for its peaks to be kept.
    cull_nsigma, cull_padding, cull_min : float
        Saddle criterion of the deblending (see the module notes).
    edge_margin : float, optional
        Peaks closer than this to the image border are flagged ``edge``; ``fwhm`` by
        default.
    min_coverage : float
        Minimum fraction of the filter kernel on usable pixels for a pixel to have a
        significance (``PEAKS_MIN_GAUSS``, 0.5).
    mask_bits : int
        Mask bits that make a pixel unusable.
    saturation_bits : int
        Mask bits that flag a peak ``saturated`` when set within 1 pixel of it.
    max_peaks : int
        If positive, keep only the most significant ``max_peaks`` detections.
    return_footprints : bool
        Also return the footprint label image.

    Returns
    -------
    sources : ndarray of DETECTION_DTYPE, shape (n,)
        Detections sorted by decreasing significance, ``id`` 0..n-1.
    footprints : ndarray of int32, shape (ny, nx)
        Only if ``return_footprints``: footprint labels (0 = none) matching
        ``sources["footprint_id"]``.
    """
    image, variance, mask = _check(image, variance, mask, "detect_sources")
    if not threshold > 0:
        raise ValueError(f"detect_sources: threshold must be positive, got {threshold}")
    if footprint_threshold > threshold:
        raise ValueError(f"detect_sources: footprint_threshold {footprint_threshold} exceeds "
                         f"threshold {threshold}")
    if edge_margin is None:
        edge_margin = fwhm
    ny, nx = image.shape
    if not fwhm > 0:
        raise ValueError(f"detect_sources: fwhm must be positive, got {fwhm}")
    num, den = _matched_filter(image, variance, mask, fwhm, mask_bits, 4.0, min_coverage)
    with np.errstate(invalid="ignore", divide="ignore"):
        sig = np.sqrt(den)
        np.divide(num, sig, out=sig, where=den > 0)
        sig[~(den > 0)] = 0.0
    py, px = _local_maxima(sig, threshold)
    # footprints: connected pixels above footprint_threshold, grown, labelled
    above = sig > footprint_threshold
    structure = np.ones((3, 3), dtype=bool)
    if footprint_grow > 0:
        # grown by the radius in the L1 metric (a diamond), by iterated 4-connected dilation
        grown = ndi.binary_dilation(above, structure=ndi.generate_binary_structure(2, 1),
                                    iterations=int(footprint_grow))
    else:
        grown = above
    labels, nlab = ndi.label(grown, structure=structure)
    if py.size and footprint_npix_min > 1:
        # drop peaks whose footprint has fewer than footprint_npix_min pixels above threshold
        plab = labels[py, px]
        ulab = np.unique(plab[plab > 0])
        if ulab.size:
            n_above = np.bincount(labels[above], minlength=nlab + 1)
            small = np.zeros(nlab + 1, dtype=bool)
            small[ulab[n_above[ulab] < footprint_npix_min]] = True
            okp = ~small[plab]
            py, px = py[okp], px[okp]
    pfp = labels[py, px] if py.size else np.zeros(0, dtype=np.int32)
    inside = pfp > 0
    py, px, pfp = py[inside], px[inside], pfp[inside]
    pv = sig[py, px]
    # deblending: cull peaks without a deep enough saddle to a brighter one
    keep = np.ones(py.size, dtype=bool)
    if py.size:
        counts = np.bincount(pfp, minlength=nlab + 1)
        multi = np.flatnonzero(counts > 1)
        if multi.size:
            slices = ndi.find_objects(labels)
            order = np.argsort(pfp, kind="stable")
            bounds = np.searchsorted(pfp[order], np.arange(nlab + 2))
            for fid in multi:
                members = order[bounds[fid]:bounds[fid + 1]]
                sl = slices[fid - 1]
                sub_lab = labels[sl] == fid
                sub_sig = sig[sl]
                k = _cull_footprint(sub_sig, sub_lab, py[members] - sl[0].start,
                                    px[members] - sl[1].start, pv[members],
                                    nsigma=cull_nsigma, padding=cull_padding,
                                    cull_min=cull_min)
                keep[members] = k
    py, px, pfp, pv = py[keep], px[keep], pfp[keep], pv[keep]
    order = np.argsort(-pv, kind="stable")
    if max_peaks > 0:
        order = order[:max_peaks]
    py, px, pfp, pv = py[order], px[order], pfp[order], pv[order]
    n = py.size
    out = np.zeros(n, dtype=DETECTION_DTYPE)
    out["id"] = np.arange(n)
    out["x_peak"] = px
    out["y_peak"] = py
    xs, ys = _subpixel(sig, py, px)
    out["x"] = xs
    out["y"] = ys
    out["significance"] = pv
    out["flux_peak"] = image[py, px]
    with np.errstate(invalid="ignore", divide="ignore"):
        out["amp_peak"] = np.where(den[py, px] > 0, num[py, px] / den[py, px], 0.0)
    out["footprint_id"] = pfp
    if n:
        out["footprint_npix"] = np.bincount(labels[grown], minlength=nlab + 1)[pfp]
        npk = np.bincount(pfp, minlength=nlab + 1)
        out["n_peaks"] = npk[pfp]
        out["blend"] = npk[pfp] > 1
        _, first_idx = np.unique(pfp, return_index=True)   # sorted by significance already
        prim = np.zeros(n, dtype=bool)
        prim[first_idx] = True
        out["blend_primary"] = prim & out["blend"]
    out["edge"] = ((px < edge_margin) | (py < edge_margin) | (px > nx - 1 - edge_margin)
                   | (py > ny - 1 - edge_margin))
    if mask is not None and n:
        out["masked"] = (mask[py, px] & mask_bits) != 0
        sat = np.zeros(n, dtype=bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy = np.clip(py + dy, 0, ny - 1)
                xx = np.clip(px + dx, 0, nx - 1)
                sat |= (mask[yy, xx] & saturation_bits) != 0
        out["saturated"] = sat
    if return_footprints:
        return out, labels.astype(np.int32)
    return out


@dataclass(frozen=True)
class FWHMEstimate:
    """PSF size measured from bright isolated stars.

    Attributes
    ----------
    fwhm : float
        Median geometric-mean FWHM ``2.3548 (det C)^(1/4)`` (pixels).
    fwhm_major, fwhm_minor : float
        Median FWHM along the major and minor axes (pixels).
    n_stars : int
        Number of stars used.
    """

    fwhm: float
    fwhm_major: float
    fwhm_minor: float
    n_stars: int


def estimate_fwhm(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None,
                  sources: np.ndarray, *, fwhm_guess: float = 4.5,
                  min_significance: float = 20.0, saturation: float | None = None,
                  isolation: float = 3.0, max_stars: int = 500, n_iter: int = 4,
                  mask_bits: int = maskbits.BAD) -> FWHMEstimate:
    """First estimate of the PSF FWHM from bright, unsaturated, isolated peaks.

    The stars are the detections that are not blended, masked, saturated or near the edge,
    have ``significance >= min_significance`` (``PSF_SN_LIM`` 20) and a peak below
    ``saturation``, and have no other detection within ``isolation * fwhm_guess``. For each
    star the Gaussian-windowed second moments are measured and the window deconvolved
    (adaptive moments: the window is set to the deconvolved size and the measurement
    repeated ``n_iter`` times). The FWHM is that of the pixelated image of the star.

    Parameters
    ----------
    image, variance, mask
        Sky-subtracted image (ADU), variance (ADU^2) and bit mask.
    sources : ndarray of DETECTION_DTYPE
        Output of :func:`detect_sources`.
    fwhm_guess : float
        Starting FWHM (pixels).
    min_significance : float
        Minimum detection significance of a star.
    saturation : float, optional
        Peak value (ADU) above which a star is not used.
    isolation : float
        Isolation radius in units of ``fwhm_guess``.
    max_stars : int
        Use at most this many of the most significant candidates (``PSF_MAX_NSTARS``).
    n_iter : int
        Window iterations.
    mask_bits : int
        Mask bits that exclude a pixel.

    Returns
    -------
    FWHMEstimate
        NaN values and ``n_stars = 0`` if no star qualifies.
    """
    image, variance, mask = _check(image, variance, mask, "estimate_fwhm")
    s = np.asarray(sources)
    if s.dtype.names is None or "significance" not in s.dtype.names:
        raise ValueError("estimate_fwhm: sources must be the structured array of "
                         "detect_sources")
    sel = (~s["blend"]) & (~s["edge"]) & (~s["saturated"]) & (~s["masked"])
    sel &= s["significance"] >= min_significance
    if saturation is not None:
        sel &= s["flux_peak"] < saturation
    if s.size > 1:
        pts = np.column_stack([s["x"], s["y"]])
        cnt = cKDTree(pts).query_ball_point(pts, isolation * fwhm_guess, return_length=True)
        sel &= cnt <= 1
    idx = np.flatnonzero(sel)
    idx = idx[np.argsort(-s["significance"][idx], kind="stable")][:max_stars]
    nan = float("nan")
    if idx.size == 0:
        return FWHMEstimate(nan, nan, nan, 0)
    x = s["x"][idx].astype(np.float64)
    y = s["y"][idx].astype(np.float64)
    w = np.full(idx.size, fwhm_guess / FWHM_PER_SIGMA)
    cxx = cxy = cyy = np.full(idx.size, np.nan)
    for _ in range(max(n_iter, 1)):
        # one window per batch: use the median so the batch shares a window
        wsig = float(np.nanmedian(w))
        m = centroid_moments(image, variance, mask, x, y, sigma=wsig, mask_bits=mask_bits)
        x, y = m["X_MOMENTS"], m["Y_MOMENTS"]
        cxx, cxy, cyy = deconvolve_window(m["MOMENTS_XX"], m["MOMENTS_XY"], m["MOMENTS_YY"],
                                          wsig)
        det = cxx * cyy - cxy * cxy
        w = np.where(det > 0, det ** 0.25, np.nan)
        if not np.any(np.isfinite(w)):
            return FWHMEstimate(nan, nan, nan, 0)
    det = cxx * cyy - cxy * cxy
    ok = np.isfinite(det) & (det > 0)
    if not np.any(ok):
        return FWHMEstimate(nan, nan, nan, 0)
    tr = 0.5 * (cxx + cyy)
    dd = np.sqrt(np.maximum(0.25 * (cxx - cyy) ** 2 + cxy ** 2, 0.0))
    smaj = np.sqrt(tr + dd)
    smin = np.sqrt(np.maximum(tr - dd, 0.0))
    sgeo = det ** 0.25
    # clip outliers (galaxies, residual blends) at 3 robust sigma around the median
    v = sgeo[ok]
    med = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - med))
    good = ok.copy()
    if mad > 0:
        good[ok] = np.abs(v - med) < 3.0 * mad
    return FWHMEstimate(float(FWHM_PER_SIGMA * np.median(sgeo[good])),
                        float(FWHM_PER_SIGMA * np.median(smaj[good])),
                        float(FWHM_PER_SIGMA * np.median(smin[good])),
                        int(np.count_nonzero(good)))
