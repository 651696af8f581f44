"""Photometric calibration of one exposure against a reference catalog (camera stage).

The camera stage matches the exposure's detections to the reference catalog (the astrometric
match, :mod:`ps1mpi.algorithms.astrometry`) and then determines one zero point for the whole
exposure, as the IPP's psastro did::

    m_sys = m_inst + zp

``m_inst = -2.5 log10(counts)`` is the instrumental magnitude of a detection (counts in the
exposure, ADU or electrons: whatever the chip stage measured), and ``m_sys`` is the reference
magnitude converted to the camera's own photometric system by the filter's colour term::

    m_sys = m_ref[band] + c1 * C + c2 * C**2 + ...,     C = m_ref[blue] - m_ref[red]

The reference catalog lacks a calibrated w band in most of the sky; for the w filter the
reference magnitude is then *synthesised* from g, r and i (:func:`synthetic_w`).

The fit is a clipped, weighted mean with an intrinsic-scatter term: after rejecting outliers
(variables, blends, mismatches) against a robust scatter estimate, each star gets the weight
``1 / (sigma_inst**2 + sigma_ref**2 + sigma_int**2)`` where ``sigma_int`` is solved for so that
the reduced chi-square is one; the zero-point error is ``sqrt(1 / sum(weights))``. Per-chip
offsets from the exposure zero point are reported (the same estimator on each chip's stars) for
quality assessment; they are not applied.

Everything here is pure: arrays in, numbers out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import brentq

__all__ = [
    "ColorTerm",
    "ZeroPoint",
    "DEFAULT_COLOR_TERMS",
    "W_WEIGHTS",
    "synthetic_w",
    "synthetic_w_err",
    "reference_system_mags",
    "fit_zero_point",
    "robust_weighted_mean",
]

#: Flux weights of g, r, i in the synthetic w band (they sum to one, so a source with a flat
#: AB spectrum has w = g = r = i). The PS1 w passband (400-820 nm) is the union of g
#: (400-550 nm), r (550-690 nm) and i (690-820 nm), three nearly equal widths, so w is the
#: magnitude of the mean of the three band fluxes (the simulator's ``w_from_gri`` uses the
#: same formula, so calibration closes on simulated data).
W_WEIGHTS: tuple[float, float, float] = (1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0)


@dataclass(frozen=True)
class ColorTerm:
    """The conversion of reference magnitudes to the camera's photometric system for a filter.

    ``m_sys = m_ref[band] + sum_k coeffs[k-1] * C**k`` with ``C = m_ref[color[0]] -
    m_ref[color[1]]`` (mag). Stars whose colour lies outside ``color_range`` are not used.

    Attributes
    ----------
    band : str
        Reference band the filter is calibrated against (``"w"`` is synthesised from g, r, i
        when the reference catalog lacks it).
    color : tuple of str
        The two reference bands whose difference is the colour index, e.g. ``("g", "r")``.
    coeffs : tuple of float
        Polynomial coefficients c1, c2, ... of the colour (mag per mag**k); empty = no term.
    color_range : tuple of float
        Usable colour interval (mag); outside it the transformation is not trusted.
    """

    band: str
    color: tuple[str, str] = ("g", "r")
    coeffs: tuple[float, ...] = ()
    color_range: tuple[float, float] = (-0.5, 3.0)

    @classmethod
    def from_mapping(cls, data: Mapping | "ColorTerm", *, filter: str = "?") -> "ColorTerm":
        """Build from a recipe table.

        The table has ``band``, and optionally ``color = [a, b]``, ``coeffs = [...]`` and
        ``color_range = [lo, hi]``.
        """
        if isinstance(data, ColorTerm):
            return data
        unknown = set(data) - {"band", "color", "coeffs", "color_range"}
        if unknown:
            raise ValueError(f"colour term for filter {filter!r}: unknown keys {sorted(unknown)}")
        if "band" not in data:
            raise ValueError(f"colour term for filter {filter!r}: missing 'band'")
        color = tuple(data.get("color", ("g", "r")))
        if len(color) != 2:
            raise ValueError(f"colour term for filter {filter!r}: 'color' must name two bands, "
                             f"got {color!r}")
        crange = tuple(float(v) for v in data.get("color_range", (-0.5, 3.0)))
        if len(crange) != 2 or not crange[0] < crange[1]:
            raise ValueError(f"colour term for filter {filter!r}: 'color_range' must be [lo, hi] "
                             f"with lo < hi, got {crange!r}")
        return cls(band=str(data["band"]), color=(str(color[0]), str(color[1])),
                   coeffs=tuple(float(c) for c in data.get("coeffs", ())),
                   color_range=(crange[0], crange[1]))


#: Default colour terms: the simulated camera shares the PS1 passbands, so the reference
#: magnitudes are already in its system (no colour term); w is synthesised from g, r, i.
#: Campaign recipes override ``camera.color_terms.<filter>`` with measured values.
DEFAULT_COLOR_TERMS: dict[str, ColorTerm] = {
    "g": ColorTerm("g", ("g", "r")),
    "r": ColorTerm("r", ("g", "r")),
    "i": ColorTerm("i", ("r", "i")),
    "z": ColorTerm("z", ("i", "z")),
    "y": ColorTerm("y", ("z", "y")),
    "w": ColorTerm("w", ("g", "i")),
}


@dataclass
class ZeroPoint:
    """Result of :func:`fit_zero_point`.

    Attributes
    ----------
    zp : float
        Zero point (mag): ``m_sys = m_inst + zp``. NaN when the fit failed.
    zp_err : float
        Statistical error of ``zp`` (mag).
    n_stars : int
        Stars kept after clipping.
    n_input : int
        Stars with valid magnitudes offered to the fit.
    rms : float
        Root-mean-square residual of the kept stars (mag).
    scatter : float
        Robust scatter of all valid residuals, 1.4826 x MAD (mag).
    sigma_int : float
        Extra per-star scatter needed for reduced chi-square = 1 (mag).
    chip_offsets : dict
        ``chip -> (offset, error, n)``: the chip's zero point minus ``zp`` (mag).
    used : ndarray of bool
        Which input stars were kept.
    residuals : ndarray
        ``m_sys - m_inst - zp`` for every input star (mag; NaN where invalid).
    success : bool
        True when at least ``min_stars`` stars survived.
    reason : str
        Why the fit failed (empty on success).
    zp_per_second : float or None
        ``zp - 2.5 log10(exptime)`` when an exposure time was given: the zero point for
        instrumental magnitudes of count rates.
    """

    zp: float
    zp_err: float
    n_stars: int
    n_input: int
    rms: float
    scatter: float
    sigma_int: float
    chip_offsets: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    used: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    residuals: np.ndarray = field(default_factory=lambda: np.zeros(0))
    success: bool = False
    reason: str = ""
    zp_per_second: float | None = None


def synthetic_w(g: np.ndarray, r: np.ndarray, i: np.ndarray, *,
                weights: Sequence[float] = W_WEIGHTS) -> np.ndarray:
    """Synthesise PS1 w magnitudes from g, r and i.

    ``w = -2.5 log10(a_g 10**(-0.4 g) + a_r 10**(-0.4 r) + a_i 10**(-0.4 i))`` with the flux
    weights ``a`` (:data:`W_WEIGHTS`; normalised to sum to one): the w passband covers the
    three bands, so its AB flux density is their bandwidth-weighted mean.

    Parameters
    ----------
    g, r, i : ndarray
        AB magnitudes (mag); NaN propagates.
    weights : sequence of 3 float
        Flux weights of g, r, i.

    Returns
    -------
    ndarray
        Synthetic w magnitudes (mag).
    """
    a = np.asarray(weights, dtype=float)
    if a.shape != (3,) or np.any(a < 0) or a.sum() <= 0:
        raise ValueError("synthetic_w: weights must be three non-negative numbers, "
                         f"got {weights!r}")
    a = a / a.sum()
    g, r, i = (np.asarray(v, dtype=float) for v in (g, r, i))
    flux = a[0] * 10.0 ** (-0.4 * g) + a[1] * 10.0 ** (-0.4 * r) + a[2] * 10.0 ** (-0.4 * i)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -2.5 * np.log10(flux)


def synthetic_w_err(g: np.ndarray, r: np.ndarray, i: np.ndarray, g_err: np.ndarray,
                    r_err: np.ndarray, i_err: np.ndarray, *,
                    weights: Sequence[float] = W_WEIGHTS) -> np.ndarray:
    """Error of :func:`synthetic_w` propagated from the band errors (mag)."""
    a = np.asarray(weights, dtype=float)
    a = a / a.sum()
    g, r, i = (np.asarray(v, dtype=float) for v in (g, r, i))
    fl = np.stack([a[0] * 10.0 ** (-0.4 * g), a[1] * 10.0 ** (-0.4 * r),
                   a[2] * 10.0 ** (-0.4 * i)])
    frac = fl / fl.sum(axis=0)        # dw/dm_b = flux fraction of band b
    errs = np.stack([np.asarray(e, dtype=float) for e in (g_err, r_err, i_err)])
    return np.sqrt(np.sum((frac * errs) ** 2, axis=0))


def _band(ref: Mapping[str, np.ndarray], name: str) -> np.ndarray | None:
    for key in (name, name.upper(), name.lower(), f"{name}_mag", f"{name.upper()}_MAG"):
        if key in ref:
            return np.asarray(ref[key], dtype=float)
    return None


def _band_err(ref_errs: Mapping[str, np.ndarray] | None, name: str, n: int) -> np.ndarray:
    if ref_errs is None:
        return np.zeros(n)
    v = _band(ref_errs, name)
    if v is None:
        for key in (f"{name}_err", f"{name.upper()}_ERR", f"{name}err"):
            if key in ref_errs:
                v = np.asarray(ref_errs[key], dtype=float)
                break
    return np.zeros(n) if v is None else v


def reference_system_mags(ref_mags: Mapping[str, np.ndarray], color_term: ColorTerm, *,
                          ref_errs: Mapping[str, np.ndarray] | None = None,
                          w_weights: Sequence[float] = W_WEIGHTS
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference magnitudes converted to the camera system for one filter.

    Parameters
    ----------
    ref_mags : mapping band -> ndarray
        Reference magnitudes (mag), NaN where missing. Keys are band names (``"g"``, or
        ``"G"``, ``"g_mag"``).
    color_term : ColorTerm
        The filter's transformation.
    ref_errs : mapping band -> ndarray, optional
        Reference magnitude errors (mag); zero if absent.
    w_weights : sequence of 3 float
        Flux weights for a synthetic w (used only if the band is w and absent or NaN).

    Returns
    -------
    m_sys : ndarray
        Magnitudes in the camera system (mag); NaN where not computable or the colour is out
        of range.
    m_sys_err : ndarray
        Their errors (mag).
    synthesised : ndarray of bool
        True where the band magnitude was synthesised (w from g, r, i).
    """
    lengths = {len(np.atleast_1d(v)) for v in ref_mags.values()}
    if len(lengths) != 1:
        raise ValueError(f"ref_mags: bands have different lengths {sorted(lengths)}")
    n = lengths.pop()
    base = _band(ref_mags, color_term.band)
    base_err = _band_err(ref_errs, color_term.band, n)
    synthesised = np.zeros(n, bool)
    if color_term.band.lower() == "w":
        g, r, i = (_band(ref_mags, b) for b in "gri")
        if g is not None and r is not None and i is not None:
            w_syn = synthetic_w(g, r, i, weights=w_weights)
            w_syn_err = synthetic_w_err(g, r, i, *(_band_err(ref_errs, b, n) for b in "gri"),
                                        weights=w_weights)
            if base is None:
                base = np.full(n, np.nan)
                base_err = np.zeros(n)
            missing = ~np.isfinite(base)
            synthesised = missing & np.isfinite(w_syn)
            base = np.where(missing, w_syn, base)
            base_err = np.where(missing, w_syn_err, base_err)
    if base is None:
        raise ValueError(f"ref_mags: no column for band {color_term.band!r} "
                         f"(have {sorted(ref_mags)})")
    m_sys = base.copy()
    blue, red = (_band(ref_mags, b) for b in color_term.color)
    if blue is None or red is None:
        if color_term.coeffs:
            raise ValueError(f"ref_mags: colour term needs bands {color_term.color} "
                             f"(have {sorted(ref_mags)})")
    else:
        c = blue - red
        lo, hi = color_term.color_range
        ok = np.isfinite(c) & (c >= lo) & (c <= hi)
        if color_term.coeffs:
            poly = np.zeros(n)
            for k, coeff in enumerate(color_term.coeffs, start=1):
                poly += coeff * c ** k
            m_sys = np.where(ok, m_sys + poly, np.nan)
        else:
            # without a term the colour only limits the sample where it is known
            m_sys = np.where(ok | ~np.isfinite(c), m_sys, np.nan)
    return m_sys, np.where(np.isfinite(m_sys), base_err, np.nan), synthesised


def robust_weighted_mean(d: np.ndarray, err: np.ndarray, *, clip_sigma: float = 3.0,
                         max_iter: int = 10, sys_floor: float = 0.0
                         ) -> tuple[float, float, np.ndarray, float, float]:
    """Clipped weighted mean with an intrinsic-scatter term.

    Parameters
    ----------
    d : ndarray
        Values (mag).
    err : ndarray
        Per-value errors (mag).
    clip_sigma : float
        Rejection threshold in units of the robust scatter (1.4826 MAD) combined with each
        value's error.
    max_iter : int
        Clipping iterations.
    sys_floor : float
        Minimum per-value error added in quadrature (mag).

    Returns
    -------
    mean, mean_err : float
        The weighted mean and its error (mag).
    keep : ndarray of bool
        Values kept.
    sigma_int : float
        Intrinsic scatter making reduced chi-square one (mag).
    scatter : float
        Robust scatter of all values (mag).
    """
    d = np.asarray(d, dtype=float)
    e = np.sqrt(np.asarray(err, dtype=float) ** 2 + sys_floor ** 2)
    valid = np.isfinite(d) & np.isfinite(e)
    if valid.sum() == 0:
        return np.nan, np.nan, valid, np.nan, np.nan
    e = np.where(valid, np.maximum(e, 1e-6), np.inf)
    med = np.median(d[valid])
    scatter = 1.4826 * np.median(np.abs(d[valid] - med))
    keep = valid.copy()
    centre = med
    sigma_int = 0.0
    for _ in range(max_iter):
        dk = d[keep]
        s = 1.4826 * np.median(np.abs(dk - centre)) if keep.sum() > 2 else 0.0
        # a value is an outlier if it is far both from the robust scatter and its own error
        tol = clip_sigma * np.sqrt(s ** 2 + e ** 2)
        new = valid & (np.abs(d - centre) <= tol)
        if new.sum() < 2:
            break
        sigma_int = _intrinsic_scatter(d[new], e[new])
        w = 1.0 / (e[new] ** 2 + sigma_int ** 2)
        centre = float(np.sum(w * d[new]) / np.sum(w))
        if np.array_equal(new, keep):
            keep = new
            break
        keep = new
    dk, ek = d[keep], e[keep]
    if keep.sum() == 0:
        return np.nan, np.nan, keep, np.nan, scatter
    sigma_int = _intrinsic_scatter(dk, ek) if keep.sum() > 1 else 0.0
    w = 1.0 / (ek ** 2 + sigma_int ** 2)
    mean = float(np.sum(w * dk) / np.sum(w))
    return mean, float(np.sqrt(1.0 / np.sum(w))), keep, float(sigma_int), float(scatter)


def _intrinsic_scatter(d: np.ndarray, e: np.ndarray) -> float:
    """sigma_int >= 0 with sum((d - mean_w)**2 / (e**2 + s**2)) = n - 1."""
    n = d.size
    if n < 3:
        return 0.0

    def excess(s: float) -> float:
        w = 1.0 / (e ** 2 + s ** 2)
        m = np.sum(w * d) / np.sum(w)
        return float(np.sum(w * (d - m) ** 2) - (n - 1))

    if excess(0.0) <= 0:
        return 0.0
    hi = max(float(np.std(d)), 1e-6) * 2.0 + 1e-6
    while excess(hi) > 0:
        hi *= 2.0
    return float(brentq(excess, 0.0, hi, xtol=1e-7))


def fit_zero_point(inst_mag: np.ndarray, inst_err: np.ndarray,
                   ref_mags: Mapping[str, np.ndarray], *, filter: str,
                   color_terms: Mapping[str, ColorTerm | Mapping] | None = None,
                   ref_errs: Mapping[str, np.ndarray] | None = None,
                   chip: np.ndarray | None = None,
                   clip_sigma: float = 3.0, max_iter: int = 10,
                   max_inst_err: float = 0.1, ref_mag_range: tuple[float, float] = (-3.0, 30.0),
                   sys_floor: float = 0.005, min_stars: int = 5,
                   w_weights: Sequence[float] = W_WEIGHTS,
                   exptime: float | None = None) -> ZeroPoint:
    """Fit the exposure zero point from matched stars.

    Parameters
    ----------
    inst_mag : ndarray
        Instrumental magnitudes of the matched detections, ``-2.5 log10(counts)`` (mag).
    inst_err : ndarray
        Their errors (mag).
    ref_mags : mapping band -> ndarray
        Magnitudes of the matched reference stars, same order (mag, NaN where missing).
    filter : str
        Exposure filter (``g r i z y w``; a FILTERID like ``"r.00000"`` is accepted).
    color_terms : mapping filter -> ColorTerm or recipe table, optional
        Colour terms per filter; :data:`DEFAULT_COLOR_TERMS` when None or when the filter is
        absent.
    ref_errs : mapping band -> ndarray, optional
        Reference magnitude errors (mag).
    chip : ndarray of str, optional
        Chip name of each star, for the per-chip offsets.
    clip_sigma : float
        Outlier rejection threshold (sigma).
    max_iter : int
        Clipping iterations.
    max_inst_err : float
        Stars with larger instrumental errors are not used (mag).
    ref_mag_range : tuple of float
        Usable reference magnitudes (mag); outside it catalog values are not trusted
        (IPP ``REFSTAR.ZP.MIN/MAX.MAG``).
    sys_floor : float
        Per-star error floor added in quadrature (mag).
    min_stars : int
        Fewest stars for a valid fit.
    w_weights : sequence of 3 float
        Flux weights for the synthetic w band.
    exptime : float, optional
        Exposure time (s); if given, ``zp_per_second`` is filled.

    Returns
    -------
    ZeroPoint
        The fit; ``success`` False with a ``reason`` when too few stars survive.
    """
    inst_mag = np.asarray(inst_mag, dtype=float)
    inst_err = np.asarray(inst_err, dtype=float)
    n = inst_mag.size
    if inst_err.shape != inst_mag.shape:
        raise ValueError(f"inst_err: shape {inst_err.shape} differs from inst_mag {inst_mag.shape}")
    for band, v in ref_mags.items():
        if np.shape(v) != (n,):
            raise ValueError(f"ref_mags[{band!r}]: shape {np.shape(v)} differs from "
                             f"inst_mag ({n},)")
    if chip is not None and np.shape(chip) != (n,):
        raise ValueError(f"chip: shape {np.shape(chip)} differs from inst_mag ({n},)")
    fkey = str(filter).split(".")[0].strip()
    if not fkey:
        raise ValueError("filter: empty filter name")
    table = dict(DEFAULT_COLOR_TERMS)
    if color_terms:
        table.update({k: ColorTerm.from_mapping(v, filter=k) for k, v in color_terms.items()})
    if fkey not in table:
        raise ValueError(f"filter: no colour term for {filter!r} (known: {sorted(table)})")
    term = table[fkey]
    m_sys, m_sys_err, _ = reference_system_mags(ref_mags, term, ref_errs=ref_errs,
                                                w_weights=w_weights)
    base = _band(ref_mags, term.band)
    ref_for_range = m_sys if base is None else np.where(np.isfinite(base), base, m_sys)
    valid = (np.isfinite(inst_mag) & np.isfinite(inst_err) & np.isfinite(m_sys)
             & (inst_err <= max_inst_err) & (ref_for_range >= ref_mag_range[0])
             & (ref_for_range <= ref_mag_range[1]))
    d = np.where(valid, m_sys - inst_mag, np.nan)
    err = np.sqrt(inst_err ** 2 + np.nan_to_num(m_sys_err) ** 2)
    n_input = int(valid.sum())
    if n_input < min_stars:
        return ZeroPoint(np.nan, np.nan, 0, n_input, np.nan, np.nan, np.nan, {},
                         np.zeros(n, bool), np.full(n, np.nan), False,
                         f"only {n_input} usable stars (need {min_stars})")
    zp, zp_err, keep, sigma_int, scatter = robust_weighted_mean(
        d, err, clip_sigma=clip_sigma, max_iter=max_iter, sys_floor=sys_floor)
    resid = d - zp
    n_kept = int(keep.sum())
    rms = float(np.sqrt(np.mean(resid[keep] ** 2))) if n_kept else np.nan
    offsets: dict[str, tuple[float, float, int]] = {}
    if chip is not None:
        chip = np.asarray(chip).astype(str)
        for name in np.unique(chip[keep]):
            sel = keep & (chip == name)
            if sel.sum() == 0:
                continue
            w = 1.0 / (err[sel] ** 2 + sys_floor ** 2 + sigma_int ** 2)
            off = float(np.sum(w * resid[sel]) / np.sum(w))
            offsets[str(name)] = (off, float(np.sqrt(1.0 / np.sum(w))), int(sel.sum()))
    ok = n_kept >= min_stars and np.isfinite(zp)
    zp1 = None
    if exptime is not None:
        if not exptime > 0:
            raise ValueError(f"exptime: must be positive, got {exptime!r}")
        zp1 = float(zp - 2.5 * np.log10(exptime))
    return ZeroPoint(float(zp), float(zp_err), n_kept, n_input, rms, float(scatter),
                     float(sigma_int), offsets, keep, resid, bool(ok),
                     "" if ok else f"only {n_kept} stars survived clipping (need {min_stars})",
                     zp1)
