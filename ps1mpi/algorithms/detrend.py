"""Detrending of raw OTA cells into one chip image, variance and mask (the ppImage chain).

The chain follows the IPP GPC1 order, per cell:

1. saturation flag on the raw counts (``>= saturation`` ADU, before any correction);
2. overscan: median of the bias section per row, smoothed along rows with a 3-row boxcar,
   subtracted row by row; the data section is trimmed out;
3. nonlinearity: ``a_lin = a * factor(a)`` from a per-cell lookup table (ADU);
4. residual bias master (ADU) and dark master (ADU/s, scaled by the dark time) subtracted;
5. gain: ADU -> electrons (the chip image is in electrons);
6. flat field: divided; pixels whose flat is ``<= flat_min`` (or not finite) are masked LOW
   and set to 0;
7. static mask OR-ed in; variance built (electrons squared);
8. cells stitched into the chip (gaps: value 0, variance 0, mask GAP);

then per chip: bleed trails of saturated stars (BLEED), fringe amplitude fit and
subtraction, and cosmic rays (CR, :mod:`ps1mpi.algorithms.cosmics`).

Every step exists as a pure function on numpy arrays, testable alone.  :func:`detrend_cells`
runs the chain in one fused pass that writes straight into the stitched chip arrays: a numba
kernel walking the chip row by row across the cells (when numba is installed), otherwise the
numpy functions cell by cell.

Units: raw data, overscan, bias and saturation in ADU; dark in ADU per second; gain in
electrons per ADU; read noise in ADU (the ``RDNOISE`` header convention); outputs in
electrons (image) and electrons squared (variance).  The flat field is dimensionless and must
describe the response to light *after* the gain conversion (i.e. be made from frames in
electrons): the per-cell gain is applied here, not through the flat.

Sections are 0-based half-open ``(y0, y1, x0, x1)`` tuples in raw-cell pixels.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ps1mpi.algorithms import maskbits

try:  # numba fuses the per-pixel chain into one pass; the numpy path is the reference
    import numba

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None
    _HAVE_NUMBA = False

Section = tuple[int, int, int, int]

__all__ = [
    "DetrendResult",
    "FringeFit",
    "NonlinearityTable",
    "apply_flat",
    "correct_nonlinearity",
    "detrend_cells",
    "fit_fringe",
    "overscan_vector",
    "stitch_cells",
    "subtract_bias",
    "subtract_dark",
    "subtract_fringe",
    "subtract_overscan",
    "to_electrons",
    "variance_image",
    "HAVE_NUMBA",
]

HAVE_NUMBA = _HAVE_NUMBA

#: Default overscan boxcar (rows), the GPC1 recipe.
OVERSCAN_BOXCAR = 3
#: Flat values at or below this are masked LOW (the flat is normalised to ~1).
FLAT_MIN = 0.01


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def _check_section(sec: Any, shape: tuple[int, int], name: str) -> Section:
    try:
        y0, y1, x0, x1 = (int(v) for v in sec)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a (y0, y1, x0, x1) tuple, got {sec!r}") from exc
    ny, nx = shape
    if not (0 <= y0 < y1 <= ny and 0 <= x0 < x1 <= nx):
        raise ValueError(f"{name} {sec!r} does not fit inside the raw cell of shape {shape}")
    return y0, y1, x0, x1


def _per_cell(value: Any, cell: str, name: str) -> Any:
    if isinstance(value, Mapping):
        if cell not in value:
            raise KeyError(f"{name}: no value for cell {cell!r}")
        return value[cell]
    return value


def _require_2d(arr: Any, name: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {arr.shape}")
    return arr


def _boxcar_rows(vec: np.ndarray, width: int) -> np.ndarray:
    """Running mean of ``width`` rows, truncated (renormalised) at both ends."""
    if width <= 1 or vec.size < 2:
        return vec.astype(np.float64, copy=True)
    half = width // 2
    c = np.concatenate([[0.0], np.cumsum(vec, dtype=np.float64)])
    n = vec.size
    i = np.arange(n)
    lo = np.maximum(i - half, 0)
    hi = np.minimum(i + half + 1, n)
    return (c[hi] - c[lo]) / (hi - lo)


# ---------------------------------------------------------------------------------------------
# Overscan
# ---------------------------------------------------------------------------------------------

def overscan_vector(raw: np.ndarray, *, biassec: Section, statistic: str = "median",
                    boxcar: int = OVERSCAN_BOXCAR) -> np.ndarray:
    """Overscan level per raw row, as the IPP GPC1 recipe computes it.

    Parameters
    ----------
    raw : ndarray, shape (ny, nx)
        Raw cell including its overscan (ADU).
    biassec : tuple of int
        Bias (overscan) section ``(y0, y1, x0, x1)``, 0-based half-open.
    statistic : {"median", "mean"}
        Statistic of each row of the bias section.
    boxcar : int
        Width (rows) of the running mean applied along rows; 3 for GPC1.  1 disables it.

    Returns
    -------
    ndarray, shape (biassec y1 - y0,)
        Overscan level (ADU, float64) for raw rows ``y0 .. y1-1`` of the bias section.
    """
    raw = _require_2d(raw, "raw cell")
    y0, y1, x0, x1 = _check_section(biassec, raw.shape, "biassec")
    block = raw[y0:y1, x0:x1]
    if statistic == "median":
        vec = np.median(block, axis=1)
    elif statistic == "mean":
        vec = block.mean(axis=1, dtype=np.float64)
    else:
        raise ValueError(f"overscan statistic must be 'median' or 'mean', got {statistic!r}")
    if boxcar < 1:
        raise ValueError(f"overscan boxcar must be >= 1 row, got {boxcar}")
    return _boxcar_rows(np.asarray(vec, dtype=np.float64), int(boxcar))


def _data_overscan(raw: np.ndarray, datasec: Section, biassec: Section, statistic: str,
                   boxcar: int) -> np.ndarray:
    """Overscan vector restricted to the data rows (float32)."""
    dy0, dy1 = datasec[0], datasec[1]
    by0, by1 = biassec[0], biassec[1]
    if dy0 < by0 or dy1 > by1:
        raise ValueError(f"biassec rows {by0}:{by1} do not cover the datasec rows {dy0}:{dy1}; "
                         "the overscan is subtracted row by row")
    vec = overscan_vector(raw, biassec=biassec, statistic=statistic, boxcar=boxcar)
    return vec[dy0 - by0:dy1 - by0].astype(np.float32)


def subtract_overscan(raw: np.ndarray, *, datasec: Section, biassec: Section,
                      statistic: str = "median", boxcar: int = OVERSCAN_BOXCAR
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Subtract the row-by-row overscan and trim to the data section.

    Parameters
    ----------
    raw : ndarray, shape (ny, nx)
        Raw cell (ADU), any numeric dtype.
    datasec, biassec : tuple of int
        Data and bias sections ``(y0, y1, x0, x1)``, 0-based half-open.  The bias section
        rows must cover the data section rows.
    statistic, boxcar
        See :func:`overscan_vector`.

    Returns
    -------
    image : ndarray, float32, shape of the data section
        Overscan-subtracted data (ADU).
    level : ndarray, float32, shape (data rows,)
        Overscan level subtracted from each data row (ADU).
    """
    raw = _require_2d(raw, "raw cell")
    datasec = _check_section(datasec, raw.shape, "datasec")
    biassec = _check_section(biassec, raw.shape, "biassec")
    level = _data_overscan(raw, datasec, biassec, statistic, boxcar)
    y0, y1, x0, x1 = datasec
    out = raw[y0:y1, x0:x1].astype(np.float32)
    out -= level[:, None]
    return out, level


# ---------------------------------------------------------------------------------------------
# Nonlinearity
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class NonlinearityTable:
    """Per-cell nonlinearity correction: ``linear = measured * factor(measured)``.

    Parameters
    ----------
    adu : ndarray
        Measured (overscan-subtracted) signal at the table knots (ADU), strictly increasing.
    factor : ndarray
        Multiplicative correction at each knot (dimensionless, ~1).

    Notes
    -----
    The factor is linearly interpolated between knots and held at the end values beyond
    them; pixels above the last knot are flagged SUSPECT (outside the calibrated range).
    For speed the table is resampled once onto a uniform grid (:meth:`uniform`) of
    ``grid_size`` points spanning the knots; both engines use that grid.
    """

    adu: np.ndarray
    factor: np.ndarray
    grid_size: int = 4096

    def __post_init__(self) -> None:
        adu = np.asarray(self.adu, dtype=np.float64).ravel()
        fac = np.asarray(self.factor, dtype=np.float64).ravel()
        if adu.size < 2 or adu.size != fac.size:
            raise ValueError("nonlinearity table: adu and factor need the same length >= 2, "
                             f"got {adu.size} and {fac.size}")
        if not np.all(np.diff(adu) > 0):
            raise ValueError("nonlinearity table: adu knots must be strictly increasing")
        if not (np.all(np.isfinite(fac)) and np.all(fac > 0)):
            raise ValueError("nonlinearity table: factors must be finite and positive")
        if int(self.grid_size) < 2:
            raise ValueError(f"nonlinearity table: grid_size must be >= 2, got {self.grid_size}")
        object.__setattr__(self, "adu", adu)
        object.__setattr__(self, "factor", fac)
        a0, amax = float(adu[0]), float(adu[-1])
        n = int(self.grid_size)
        grid = np.interp(np.linspace(a0, amax, n), adu, fac).astype(np.float32)
        object.__setattr__(self, "_uniform", (a0, (n - 1) / (amax - a0), grid, amax))

    @classmethod
    def from_curve(cls, true_adu: np.ndarray, measured_adu: np.ndarray,
                   grid_size: int = 4096) -> "NonlinearityTable":
        """Table from a response curve: measured signal for each true (linear) signal (ADU).

        At a zero knot (true = measured = 0) the factor ``true / measured`` is undefined; it
        is extrapolated linearly from the next two knots (or, with only one more knot, set to
        the inverse slope of the response)."""
        t = np.asarray(true_adu, dtype=np.float64).ravel()
        m = np.asarray(measured_adu, dtype=np.float64).ravel()
        if t.shape != m.shape or t.size < 2:
            raise ValueError("nonlinearity curve: true_adu and measured_adu need the same "
                             f"length >= 2, got {t.size} and {m.size}")
        with np.errstate(divide="ignore", invalid="ignore"):
            fac = t / m
        zero = m == 0
        if zero.any():
            i = int(np.flatnonzero(zero)[0])
            if i + 1 >= m.size or zero.sum() > 1 or t[i] != 0:
                raise ValueError("nonlinearity curve: measured = 0 only allowed once, at true = 0")
            if i + 2 < m.size and not zero[i + 2]:
                w = (m[i] - m[i + 1]) / (m[i + 2] - m[i + 1])
                fac[i] = fac[i + 1] + w * (fac[i + 2] - fac[i + 1])
            else:
                fac[i] = (t[i + 1] - t[i]) / (m[i + 1] - m[i])
        return cls(adu=m, factor=fac, grid_size=grid_size)

    def uniform(self) -> tuple[float, float, np.ndarray, float]:
        """``(a0, inv_step, factors, amax)`` of the uniform-grid resampling (float32 factors),
        computed once at construction."""
        return self._uniform

    def __call__(self, measured: np.ndarray) -> np.ndarray:
        """Correction factor at the measured signal (uniform-grid interpolation)."""
        a0, inv, fac, _ = self.uniform()
        return _nl_factor_numpy(np.asarray(measured, dtype=np.float32), a0, inv, fac)


def _nl_factor_numpy(values: np.ndarray, a0: float, inv_step: float, fac: np.ndarray
                     ) -> np.ndarray:
    u = (values - np.float32(a0)) * np.float32(inv_step)
    np.clip(u, 0, fac.size - 1, out=u)
    i = np.minimum(u.astype(np.int32), fac.size - 2)
    w = u - i
    return fac[i] * (1 - w) + fac[i + 1] * w


def correct_nonlinearity(image: np.ndarray, table: NonlinearityTable
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Linearise overscan-subtracted counts in place.

    Parameters
    ----------
    image : ndarray, float32
        Overscan-subtracted signal (ADU); corrected in place.
    table : NonlinearityTable
        The cell's correction.

    Returns
    -------
    image : ndarray
        The same array, linearised (ADU).
    suspect : ndarray of bool
        Pixels above the table's calibrated range.
    """
    if not isinstance(table, NonlinearityTable):
        raise TypeError(f"nonlinearity: expected a NonlinearityTable, got {type(table).__name__}")
    a0, inv, fac, amax = table.uniform()
    suspect = image > amax
    image *= _nl_factor_numpy(image, a0, inv, fac)
    return image, suspect


# ---------------------------------------------------------------------------------------------
# Bias, dark, gain, flat, variance
# ---------------------------------------------------------------------------------------------

def _check_same_shape(a: np.ndarray, b: np.ndarray, name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name}: shape {b.shape} does not match the image shape {a.shape}")


def subtract_bias(image: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Subtract the residual 2-D bias master in place (ADU)."""
    bias = np.asarray(bias)
    _check_same_shape(image, bias, "bias master")
    image -= bias
    return image


def subtract_dark(image: np.ndarray, dark: np.ndarray, *, dark_time: float) -> np.ndarray:
    """Subtract the dark master scaled by the dark time, in place.

    Parameters
    ----------
    image : ndarray, float32
        Image (ADU).
    dark : ndarray
        Dark current master (ADU per second).
    dark_time : float
        Dark time of the exposure (s).
    """
    dark = np.asarray(dark)
    _check_same_shape(image, dark, "dark master")
    if not np.isfinite(dark_time) or dark_time < 0:
        raise ValueError(f"dark_time must be finite and >= 0 s, got {dark_time}")
    image -= dark * np.float32(dark_time)
    return image


def to_electrons(image: np.ndarray, *, gain: float) -> np.ndarray:
    """Multiply by the gain (electrons per ADU) in place: ADU -> electrons."""
    if not (np.isfinite(gain) and gain > 0):
        raise ValueError(f"gain must be finite and > 0 e-/ADU, got {gain}")
    image *= np.float32(gain)
    return image


def apply_flat(image: np.ndarray, flat: np.ndarray, *, flat_min: float = FLAT_MIN
               ) -> tuple[np.ndarray, np.ndarray]:
    """Divide by the flat field in place; mask pixels with a flat ``<= flat_min``.

    Parameters
    ----------
    image : ndarray, float32
        Image (electrons).
    flat : ndarray
        Flat field (dimensionless, normalised near 1).
    flat_min : float
        Flat values at or below this (or not finite) are unusable: the pixel is set to 0.

    Returns
    -------
    image : ndarray
        Flat-fielded image (electrons), 0 at the LOW pixels.
    low : ndarray of bool
        Pixels to be masked LOW.
    """
    flat = np.asarray(flat, dtype=np.float32)
    _check_same_shape(image, flat, "flat master")
    good = flat > flat_min  # False for NaN as well
    low = ~good
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(image, flat, out=image, where=good)
    image[low] = 0.0
    return image, low


def variance_image(image: np.ndarray, *, flat: np.ndarray | float = 1.0,
                   read_noise: float, dark_electrons: np.ndarray | float = 0.0,
                   extra_read_variance: float = 0.0) -> np.ndarray:
    """Variance of a flat-fielded image in electrons squared.

    ``var = (max(image * flat + dark_electrons, 0) + read_noise**2 + extra) / flat**2``:
    Poisson noise of everything that was collected before the flat division (sky, objects
    and the subtracted dark current), plus read noise, propagated through the flat.

    Parameters
    ----------
    image : ndarray
        Flat-fielded image (electrons).
    flat : ndarray or float
        The flat it was divided by (dimensionless).
    read_noise : float
        Read noise (electrons).
    dark_electrons : ndarray or float
        Dark current subtracted from each pixel (electrons).
    extra_read_variance : float
        Additional signal-independent variance before the flat (electrons squared), e.g.
        the noise of the subtracted overscan level.

    Returns
    -------
    ndarray, float32
        Variance (electrons squared); 0 where the flat is not positive.
    """
    flat = np.asarray(flat, dtype=np.float32)
    pre = image * flat + np.asarray(dark_electrons, dtype=np.float32)
    np.maximum(pre, 0, out=pre)
    pre += np.float32(read_noise ** 2 + extra_read_variance)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = pre / (flat * flat)
    var[~(np.broadcast_to(flat, var.shape) > 0)] = 0.0
    return var.astype(np.float32, copy=False)


def overscan_read_variance(read_noise_e: float, n_columns: int, boxcar: int,
                           statistic: str = "median") -> float:
    """Variance (e-^2) of the subtracted overscan level: median of ``n_columns`` pixels
    per row (efficiency 2/pi) averaged over ``boxcar`` rows."""
    eff = math.pi / 2.0 if statistic == "median" else 1.0
    return float(read_noise_e ** 2 * eff / max(n_columns * max(boxcar, 1), 1))


# ---------------------------------------------------------------------------------------------
# Fringe
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FringeFit:
    """Result of :func:`fit_fringe`.

    Attributes
    ----------
    amplitude : float
        Scale of the template in the image (image units per template unit).
    amplitude_err : float
        1-sigma error of the amplitude.
    offset : float
        Fitted constant (residual sky mismatch between the sample statistics; image units).
    n_used : int
        Sample points kept after clipping.
    n_points : int
        Sample points measured.
    """

    amplitude: float
    amplitude_err: float
    offset: float
    n_used: int
    n_points: int


def _block_sky(image: np.ndarray, template: np.ndarray, mask: np.ndarray | None,
               bad_bits: int, grid: tuple[int, int], step: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Background level per coarse block of the image (clipped mean) and of the template
    (mean of the same pixels), from every ``step``-th pixel, ignoring masked and non-finite
    pixels (of either)."""
    ny, nx = image.shape
    gy, gx = grid
    sky_i = np.full((gy, gx), np.nan)
    sky_t = np.full((gy, gx), np.nan)
    ye = np.linspace(0, ny, gy + 1).astype(int)
    xe = np.linspace(0, nx, gx + 1).astype(int)
    for j in range(gy):
        for i in range(gx):
            sl = (slice(ye[j], ye[j + 1], step), slice(xe[i], xe[i + 1], step))
            bi, bt = image[sl].astype(np.float64), template[sl].astype(np.float64)
            ok = np.isfinite(bi) & np.isfinite(bt)
            if mask is not None:
                ok &= (mask[sl] & bad_bits) == 0
            if ok.sum() < 3:
                continue
            vi, vt = bi[ok], bt[ok]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                q25, med, q75 = np.percentile(vi, [25, 50, 75])
            keep = np.abs(vi - med) <= 3.0 * max(0.7413 * (q75 - q25), 1e-30)
            sky_i[j, i] = vi[keep].mean()
            sky_t[j, i] = vt[keep].mean()
    return sky_i, sky_t


def _row_quantiles(v: np.ndarray, n: np.ndarray, qs: tuple[float, ...]
                   ) -> list[np.ndarray]:
    """Quantiles (linear interpolation, as ``np.percentile``) of each row of ``v`` over its
    ``n`` finite values (NaN elsewhere); NaN for empty rows.  Columns of shape (rows, 1)."""
    srt = np.sort(v, axis=1)                     # NaNs sort last
    out = []
    last = np.maximum(n - 1, 0)[:, None].astype(np.float64)
    for q in qs:
        pos = q * last
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, last.astype(np.int64))
        w = pos - lo
        val = (np.take_along_axis(srt, lo, axis=1) * (1 - w)
               + np.take_along_axis(srt, hi, axis=1) * w)
        val[n == 0] = np.nan
        out.append(val)
    return out


def _box_stats(image: np.ndarray, template: np.ndarray, mask: np.ndarray | None,
               bad_bits: int, ys: np.ndarray, xs: np.ndarray, half: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Level of the image (3-sigma clipped mean) and of the template (mean of the same
    pixels) in (2 half + 1)^2 boxes centred on the points, and the image's robust scatter.

    Means rather than the IPP's medians: the median of fringes plus noise is not the
    median of the noiseless template scaled (it drifts towards the mean as the noise
    grows), which biases the amplitude low by a few per cent at realistic noise."""
    off = np.arange(-half, half + 1)
    yy = ys[:, None, None] + off[None, :, None]
    xx = xs[:, None, None] + off[None, None, :]
    si = image[yy, xx].astype(np.float64).reshape(len(ys), -1)
    st = template[yy, xx].astype(np.float64).reshape(len(ys), -1)
    bad = ~(np.isfinite(si) & np.isfinite(st))
    if mask is not None:
        bad |= ((mask[yy, xx] & bad_bits) != 0).reshape(len(ys), -1)
    si[bad] = np.nan
    nvalid = si.shape[1] - bad.sum(axis=1)
    q25, med, q75 = _row_quantiles(si, nvalid, (0.25, 0.5, 0.75))
    sig = 0.7413 * (q75 - q25)
    keep = np.abs(si - med) <= 3.0 * np.maximum(sig, 1e-30)     # False at NaN
    nkeep = np.maximum(keep.sum(axis=1), 1)
    lvl_i = np.where(keep, si, 0.0).sum(axis=1) / nkeep
    lvl_t = np.where(keep, st, 0.0).sum(axis=1) / nkeep
    sig = sig[:, 0]
    enough = nvalid >= max(3, si.shape[1] // 2)
    lvl_i[~enough] = np.nan
    return lvl_i, lvl_t, sig


def fit_fringe(image: np.ndarray, template: np.ndarray, *, mask: np.ndarray | None = None,
               bad_bits: int = maskbits.STATIC, npoints: int = 2000, half_box: int = 5,
               sky_grid: tuple[int, int] = (8, 8), rej: float = 2.0, niter: int = 10,
               keep: float = 0.5, seed: int = 0) -> FringeFit:
    """Fit the amplitude of a fringe template in an image, as the IPP did.

    Sample points are drawn at random; at each, the level of a small box minus the level of
    its coarse background block is measured in the image and in the template (removing the
    background); the image measurements are fitted as ``offset + amplitude * template`` by
    weighted least squares (weights from each box's robust scatter), rejecting outliers
    (stars, defects) iteratively.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Flat-fielded image (electrons) still containing the fringes and the sky.
    template : ndarray, shape (ny, nx)
        Fringe template (arbitrary units; fringe pattern per unit amplitude).
    mask : ndarray of uint16, optional
        Image mask; pixels with any of ``bad_bits`` are ignored.
    bad_bits : int
        Mask bits to ignore.
    npoints : int
        Number of sample boxes.
    half_box : int
        Half-size of each box (pixels); the box is ``2 half_box + 1`` square.
    sky_grid : (int, int)
        Number of coarse background blocks in y and x.
    rej : float
        Clipping threshold (robust standard deviations of the normalised residuals); IPP
        ``FRINGE.REJ`` = 2.0.
    niter : int
        Maximum clipping iterations; IPP ``FRINGE.ITER`` = 10.
    keep : float
        Minimum fraction of points kept; IPP ``FRINGE.KEEP`` = 0.5.
    seed : int
        Seed of the sample positions.

    Returns
    -------
    FringeFit
    """
    image = _require_2d(image, "image")
    template = _require_2d(template, "fringe template")
    _check_same_shape(image, template, "fringe template")
    ny, nx = image.shape
    if ny <= 2 * half_box + 1 or nx <= 2 * half_box + 1:
        raise ValueError(f"image {image.shape} too small for fringe boxes of half-size {half_box}")
    if npoints < 10:
        raise ValueError(f"fringe npoints must be >= 10, got {npoints}")
    if mask is not None:
        mask = np.asarray(mask)
        _check_same_shape(image, mask, "mask")

    rng = np.random.default_rng(seed)
    ys = rng.integers(half_box, ny - half_box, npoints)
    xs = rng.integers(half_box, nx - half_box, npoints)
    step = max(1, int(min(ny / sky_grid[0], nx / sky_grid[1]) // 64))  # ~64x64 px per block
    sky_i, sky_t = _block_sky(image, template, mask, bad_bits, sky_grid, step)
    by = np.minimum((ys * sky_grid[0]) // ny, sky_grid[0] - 1)
    bx = np.minimum((xs * sky_grid[1]) // nx, sky_grid[1] - 1)
    fi, ft, si = _box_stats(image, template, mask, bad_bits, ys, xs, half_box)
    fi = fi - sky_i[by, bx]
    ft = ft - sky_t[by, bx]
    ok = np.isfinite(fi) & np.isfinite(ft) & np.isfinite(si) & (si > 0)
    n_points = int(ok.sum())
    if n_points < 10:
        raise ValueError(f"fringe fit: only {n_points} usable sample points (image mostly masked?)")
    fi, ft, w = fi[ok], ft[ok], 1.0 / si[ok]
    use = np.ones(fi.size, dtype=bool)
    nmin = max(3, int(math.ceil(keep * fi.size)))
    coef = cov = None
    for _ in range(max(1, niter)):
        a = np.stack([w[use], w[use] * ft[use]], axis=1)
        b = w[use] * fi[use]
        ata = a.T @ a
        coef = np.linalg.solve(ata, a.T @ b)
        cov = np.linalg.inv(ata)
        r = (fi - coef[0] - coef[1] * ft) * w
        med = np.median(r[use])
        sig = 1.4826 * np.median(np.abs(r[use] - med))
        new = np.abs(r - med) <= rej * sig
        if np.array_equal(new, use) or new.sum() < nmin:
            break
        use = new
    r = (fi - coef[0] - coef[1] * ft) * w
    dof = max(int(use.sum()) - 2, 1)
    chi2 = float(np.sum(r[use] ** 2) / dof)
    err = float(np.sqrt(cov[1, 1] * max(chi2, 1e-30)))
    return FringeFit(amplitude=float(coef[1]), amplitude_err=err, offset=float(coef[0]),
                     n_used=int(use.sum()), n_points=n_points)


def subtract_fringe(image: np.ndarray, template: np.ndarray, amplitude: float,
                    *, mask: np.ndarray | None = None, skip_bits: int = maskbits.GAP | maskbits.LOW
                    ) -> np.ndarray:
    """Subtract ``amplitude * template`` in place (pixels with ``skip_bits`` left alone)."""
    template = np.asarray(template, dtype=np.float32)
    _check_same_shape(image, template, "fringe template")
    if (_HAVE_NUMBA and mask is not None and image.dtype == np.float32
            and image.flags.c_contiguous and template.flags.c_contiguous
            and np.asarray(mask).flags.c_contiguous):
        _subtract_scaled_nb(image, template, float(amplitude), np.asarray(mask, np.uint16),
                            np.uint16(skip_bits))
        return image
    fr = np.nan_to_num(template * np.float32(amplitude), nan=0.0, posinf=0.0, neginf=0.0)
    if mask is not None:
        fr[(np.asarray(mask) & skip_bits) != 0] = 0.0
    image -= fr
    return image


# ---------------------------------------------------------------------------------------------
# Stitching
# ---------------------------------------------------------------------------------------------

def _cell_view(arr: np.ndarray, origin: tuple[int, int], shape: tuple[int, int],
               parity: tuple[int, int]) -> np.ndarray:
    """View of a chip-shaped array covering a cell, in the cell's raw orientation."""
    x0, y0 = origin
    ny, nx = shape
    v = arr[y0:y0 + ny, x0:x0 + nx]
    if v.shape != (ny, nx):
        raise ValueError(f"cell of shape {shape} at origin (x0={x0}, y0={y0}) falls outside "
                         f"the chip of shape {arr.shape}")
    if parity[1] < 0:
        v = v[::-1]
    if parity[0] < 0:
        v = v[:, ::-1]
    return v


def _parity(cell_parity: Mapping[str, tuple[int, int]] | None, cell: str) -> tuple[int, int]:
    if cell_parity is None or cell not in cell_parity:
        return (1, 1)
    px, py = cell_parity[cell]
    if px not in (1, -1) or py not in (1, -1):
        raise ValueError(f"cell_parity[{cell!r}] must be (+-1, +-1), got {(px, py)}")
    return int(px), int(py)


def stitch_cells(cells: Mapping[str, np.ndarray], *, cell_origins: Mapping[str, tuple[int, int]],
                 chip_shape: tuple[int, int],
                 cell_parity: Mapping[str, tuple[int, int]] | None = None,
                 fill: float = 0.0, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Place trimmed cells into a chip image.

    Parameters
    ----------
    cells : mapping of str to ndarray
        Trimmed cell images in raw orientation (cell name, e.g. ``'xy01'``, to array).
    cell_origins : mapping of str to (int, int)
        Chip pixel ``(x0, y0)`` of each cell's lower-left corner in the stitched chip.
    chip_shape : (int, int)
        ``(ny, nx)`` of the chip.
    cell_parity : mapping of str to (int, int), optional
        ``(xparity, yparity)`` per cell; -1 means the cell's x (or y) runs opposite to the
        chip's, so the cell is flipped along that axis when placed.
    fill : float
        Value of pixels covered by no cell (gaps).
    dtype
        Output dtype.

    Returns
    -------
    image : ndarray, shape chip_shape
    covered : ndarray of bool
        True where a cell landed; False in gaps.
    """
    out = np.full(chip_shape, fill, dtype=dtype)
    covered = np.zeros(chip_shape, dtype=bool)
    for name, data in cells.items():
        if name not in cell_origins:
            raise KeyError(f"cell {name!r} has no origin in cell_origins")
        data = _require_2d(data, f"cell {name}")
        par = _parity(cell_parity, name)
        _cell_view(out, cell_origins[name], data.shape, par)[...] = data
        _cell_view(covered, cell_origins[name], data.shape, par)[...] = True
    return out, covered


# ---------------------------------------------------------------------------------------------
# Fused per-cell kernel
# ---------------------------------------------------------------------------------------------

_SAT = np.uint16(maskbits.SAT)
_LOW = np.uint16(maskbits.LOW)
_SUSPECT = np.uint16(maskbits.SUSPECT)
_ZERO16 = np.uint16(0)
_DETECTOR = np.uint16(maskbits.DETECTOR)
_GAP = np.uint16(maskbits.GAP)
# fast-math flags that keep NaN/Inf semantics (a NaN flat must still fail ``f > flat_min``)
_FM = {"nsz", "arcp", "contract", "afn", "reassoc"}

if _HAVE_NUMBA:
    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _overscan_nb(raw, by0, by1, bx0, bx1, use_median, boxcar, dy0, dy1
                     ):  # pragma: no cover - compiled
        """Overscan level of data rows dy0..dy1 (float32): per-row median (or mean) of the
        bias section, then a truncated running mean of ``boxcar`` rows.  The medians use an
        odd-even transposition sort vectorised across rows."""
        ny = by1 - by0
        nc = bx1 - bx0
        vec = np.empty(ny, np.float64)
        if use_median:
            b = np.empty((nc, ny), np.float32)
            for j in range(ny):
                for i in range(nc):
                    b[i, j] = raw[by0 + j, bx0 + i]
            for p in range(nc):
                for k in range(p % 2, nc - 1, 2):
                    lo = b[k]
                    hi = b[k + 1]
                    for j in range(ny):
                        x = lo[j]
                        y = hi[j]
                        lo[j] = min(x, y)
                        hi[j] = max(x, y)
            h = nc // 2
            for j in range(ny):
                if nc % 2 == 1:
                    vec[j] = b[h, j]
                else:
                    vec[j] = 0.5 * (np.float64(b[h - 1, j]) + np.float64(b[h, j]))
        else:
            for j in range(ny):
                acc = 0.0
                for i in range(nc):
                    acc += raw[by0 + j, bx0 + i]
                vec[j] = acc / nc
        half = boxcar // 2
        out = np.empty(dy1 - dy0, np.float32)
        for jj in range(dy1 - dy0):
            j = dy0 - by0 + jj
            lo_ = max(j - half, 0)
            hi_ = min(j + half + 1, ny)
            acc = 0.0
            for k in range(lo_, hi_):
                acc += vec[k]
            out[jj] = acc / (hi_ - lo_)
        return out

    @numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=_FM, error_model="numpy")
    def _segment_nb(r_, o, b_, d_, f_, s_, im_, v_, m_, nl_on, nl_fac, a0, ainv, amax, umax,
                    g, dt, fmin, rv, sat, abuf):  # pragma: no cover - compiled
        """The fused per-pixel chain on one row segment of a cell (C-contiguous 1-D views);
        returns (saturated, LOW, SUSPECT) counts.  The nonlinearity lookup (a gather, which
        does not vectorise) runs as a separate loop into ``abuf`` so that the main loop
        stays vectorised."""
        zero = np.float32(0.0)
        one = np.float32(1.0)
        dkg = dt * g
        n = r_.shape[0]
        nsat = 0
        nlow = 0
        nsus = 0
        if nl_on:
            for i in range(n):
                a = np.float32(r_[i]) - o
                u = min(max((a - a0) * ainv, zero), umax)
                k = np.int32(u)
                w = u - np.float32(k)
                f0 = nl_fac[k]
                abuf[i] = a * (f0 + (nl_fac[k + 1] - f0) * w)
        for i in range(n):
            r = np.float32(r_[i])
            a = r - o
            m = s_[i]
            issat = r >= sat
            nsat += issat
            m |= _SAT if issat else _ZERO16
            sus = nl_on and a > amax
            nsus += sus
            m |= _SUSPECT if sus else _ZERO16
            a = abuf[i] if nl_on else a
            dk = d_[i] * dt
            sg = (a - b_[i] - dk) * g
            f = f_[i]
            good = f > fmin
            inv = one / f if good else zero
            nlow += not good
            m |= _ZERO16 if good else _LOW
            fin = np.isfinite(sg)              # a non-finite raw value is a bad pixel
            m |= _ZERO16 if fin else _DETECTOR
            inv = inv if fin else zero
            sg = sg if fin else zero
            im_[i] = sg * inv
            p = max(sg + d_[i] * dkg, zero)
            v_[i] = (p + rv) * inv * inv
            m_[i] = m
        return nsat, nlow, nsus

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _chip_kernel_nb(raws, ovecs, pint, pflt, nl_facs, bias, b_rs, dark, d_rs, flat, f_rs,
                        static, s_rs, dark_t, flat_min, img, var, mask):  # pragma: no cover
        """Every cell, in chip-row order (the masters and outputs are then read and written
        in long contiguous rows, which the memory system streams much better than one cell
        at a time).

        ``pint[k]`` = (rx0, ry_first, ry_step, o_first, chip_y0, chip_x0, ny, nx, nl_index,
        nfac): raw row of chip row ``chip_y0 + jj`` is ``ry_first + ry_step * jj``, its
        overscan ``ovecs[k, o_first + ry_step * jj]``, raw columns start at ``rx0``;
        ``nl_index`` < 0 means no nonlinearity table.  ``pflt[k]`` = (gain, read variance e-^2,
        saturation ADU, nl a0, nl 1/step, nl amax).  A master row is ``Y * rs`` (``rs`` 0:
        a constant row).  Returns (ncell, 3) counts: saturated, LOW, SUSPECT."""
        ncell = pint.shape[0]
        counts = np.zeros((ncell, 3), np.int64)
        ny_chip, nx_chip = img.shape
        dt = np.float32(dark_t)
        fmin = np.float32(flat_min)
        abuf = np.empty(max(pint[:, 7].max(), 1), np.float32)
        for y in range(ny_chip):
            xprev = 0
            for k in range(ncell):
                cy0 = pint[k, 4]
                nyk = pint[k, 6]
                if y < cy0 or y >= cy0 + nyk:
                    continue
                cx0 = pint[k, 5]
                if cx0 > xprev:                    # a gap between cells on this row
                    _fill_gap_nb(img[y], var[y], mask[y], xprev, cx0)
                xprev = max(xprev, cx0 + pint[k, 7])
                jj = y - cy0
                rx0 = pint[k, 0]
                cx0 = pint[k, 5]
                nx = pint[k, 7]
                j = pint[k, 1] + pint[k, 2] * jj
                o = ovecs[k, pint[k, 3] + pint[k, 2] * jj]
                nl_i = pint[k, 8]
                nl_on = nl_i >= 0
                nfac = pint[k, 9]
                fac = nl_facs[nl_i if nl_on else 0]
                umax = np.float32(nfac - 1) - np.float32(1e-3)
                raw = raws[k]
                ns, nl_, nsu = _segment_nb(
                    raw[j, rx0:rx0 + nx], o, bias[y * b_rs, cx0:cx0 + nx],
                    dark[y * d_rs, cx0:cx0 + nx], flat[y * f_rs, cx0:cx0 + nx],
                    static[y * s_rs, cx0:cx0 + nx], img[y, cx0:cx0 + nx],
                    var[y, cx0:cx0 + nx], mask[y, cx0:cx0 + nx], nl_on, fac,
                    np.float32(pflt[k, 3]), np.float32(pflt[k, 4]), np.float32(pflt[k, 5]),
                    umax, np.float32(pflt[k, 0]), dt, fmin, np.float32(pflt[k, 1]),
                    np.float32(pflt[k, 2]), abuf)
                counts[k, 0] += ns
                counts[k, 1] += nl_
                counts[k, 2] += nsu
            if xprev < nx_chip:
                _fill_gap_nb(img[y], var[y], mask[y], xprev, nx_chip)
        return counts

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _fill_gap_nb(im_, v_, m_, x0, x1):  # pragma: no cover - compiled
        for i in range(x0, x1):
            im_[i] = 0.0
            v_[i] = 0.0
            m_[i] = _GAP

    @numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=_FM, error_model="numpy")
    def _subtract_scaled_nb(image, template, amp, mask, skip):  # pragma: no cover
        ny, nx = image.shape
        a = np.float32(amp)
        zero = np.float32(0.0)
        for j in range(ny):
            im_ = image[j]
            t_ = template[j]
            m_ = mask[j]
            for i in range(nx):
                t = t_[i] * a
                ok = ((m_[i] & skip) == 0) and np.isfinite(t)
                im_[i] -= t if ok else zero


def _cell_numpy(raw_data, ovec, nl, bias, dark, dark_t, gain, flat, flat_min, read_var_e,
                sat_level, static, img, var, mask) -> tuple[int, int, int]:
    """Reference (numpy) version of the fused per-cell chain; writes into img/var/mask views."""
    m = np.array(static, dtype=np.uint16)
    sat = raw_data >= np.float32(sat_level)
    m[sat] |= maskbits.SAT
    a = raw_data.astype(np.float32)
    a -= ovec[:, None]
    nsus = 0
    if nl is not None:
        a, sus = correct_nonlinearity(a, nl)
        m[sus] |= maskbits.SUSPECT
        nsus = int(sus.sum())
    dk = np.asarray(dark, dtype=np.float32) * np.float32(dark_t)
    a -= bias
    a -= dk
    a *= np.float32(gain)
    f = np.asarray(flat, dtype=np.float32)
    good = f > np.float32(flat_min)
    inv = np.zeros(a.shape, np.float32)
    np.divide(np.float32(1.0), f, out=inv, where=good)
    fin = np.isfinite(a)                       # a non-finite raw value is a bad pixel
    if not fin.all():
        m[~fin] |= maskbits.DETECTOR
        inv[~fin] = 0.0
        a[~fin] = 0.0
    img[...] = a * inv
    p = a + dk * np.float32(gain)
    np.maximum(p, 0, out=p)
    p += np.float32(read_var_e)
    var[...] = p * inv * inv
    m[~good] |= maskbits.LOW
    mask[...] = m
    return int(sat.sum()), int((~good).sum()), nsus


# ---------------------------------------------------------------------------------------------
# Top level
# ---------------------------------------------------------------------------------------------

@dataclass
class DetrendResult:
    """Output of :func:`detrend_cells`.

    Attributes
    ----------
    image : ndarray, float32, (ny, nx)
        Detrended chip (electrons); 0 in gaps and at LOW pixels.
    variance : ndarray, float32, (ny, nx)
        Variance (electrons squared); 0 in gaps and at LOW pixels.
    mask : ndarray, uint16, (ny, nx)
        Mask bits from :mod:`ps1mpi.algorithms.maskbits`.
    stats : dict
        ``timings`` (wall-clock seconds per step: gaps, overscan, pixels, bleed, fringe,
        cosmics, total), ``engine``, ``overscan`` (mean overscan level subtracted per cell,
        ADU), ``n_sat``, ``n_bleed``, ``n_low``, ``n_suspect``, ``n_cr``, ``n_gap`` (pixel
        counts), ``fringe`` (:class:`FringeFit` or None), ``mpix`` (chip pixels / 1e6).
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    stats: dict = field(default_factory=dict)


def _fill_outside(targets, rects, shape: tuple[int, int]) -> None:
    """Set every pixel outside the rectangles ``(x0, y0, nx, ny)`` to each target's value.

    The chip is cut into horizontal bands at every rectangle edge; in each band the columns
    not covered by a rectangle spanning it are filled (only gaps are written)."""
    ny, nx = shape
    edges = sorted({0, ny, *(r[1] for r in rects), *(r[1] + r[3] for r in rects)})
    for ya, yb in zip(edges[:-1], edges[1:]):
        if yb <= ya:
            continue
        spans = sorted((r[0], r[0] + r[2]) for r in rects if r[1] <= ya and r[1] + r[3] >= yb)
        x = 0
        for xa, xb in spans + [(nx, nx)]:
            if xa > x:
                for arr, val in targets:
                    arr[ya:yb, x:xa] = val
            x = max(x, xb)


def _run_chip_kernel(raws, ovecs, rows_int, rows_flt, tables, masters, cell_origins,
                     cell_parity, datasec, chip_shape, dark_time, flat_min, img, var, msk,
                     present) -> np.ndarray:
    """Pack the per-cell parameters and run :func:`_chip_kernel_nb`; returns (ncell, 3)
    counts (saturated, LOW, SUSPECT)."""
    from numba.typed import List

    if len({(r.dtype, r.flags.c_contiguous) for r in raws}) > 1:
        raws = [np.ascontiguousarray(r, dtype=np.float32) for r in raws]
    maxny = max(o.size for o in ovecs)
    ov = np.zeros((len(ovecs), maxny), np.float32)
    for k, o in enumerate(ovecs):
        ov[k, :o.size] = o
    pint = np.array(rows_int, dtype=np.int64)
    pflt = np.array(rows_flt, dtype=np.float64)
    if tables:
        nmax = max(t.uniform()[2].size for _, t in tables.values())
        facs = np.ones((len(tables), nmax), np.float32)
        for idx, t in tables.values():
            f = t.uniform()[2]
            facs[idx, :f.size] = f
    else:
        facs = np.ones((1, 2), np.float32)
    args = []
    for m, name, dtype, default in zip(masters, ("bias", "dark", "flat", "static mask"),
                                       (np.float32, np.float32, np.float32, np.uint16),
                                       (0.0, 0.0, 1.0, 0)):
        if m is None or np.ndim(m) == 0 and not isinstance(m, Mapping):
            row = np.full((1, chip_shape[1]), default if m is None else m, dtype)
            args += [row, 0]
        elif isinstance(m, Mapping):
            args += [_stitch_master(m, name, dtype, default, cell_origins, cell_parity,
                                    datasec, chip_shape, present), 1]
        else:
            args += [m, 1]
    return _chip_kernel_nb(List(raws), ov, pint, pflt, facs, *args, dark_time, flat_min,
                           img, var, msk)


def _stitch_master(master: Mapping, name: str, dtype: Any, default: float,
                   cell_origins: Mapping, cell_parity: Mapping | None, datasec: Any,
                   chip_shape: tuple[int, int], present: set[str]) -> np.ndarray:
    """Chip-shaped array (chip orientation) from per-cell masters in raw orientation."""
    out = np.full(chip_shape, default, dtype)
    for cell, origin in cell_origins.items():
        if cell not in master:
            if cell in present:
                raise KeyError(f"{name} master: no array for cell {cell!r}")
            continue
        d = _per_cell(datasec, cell, "datasec")
        shape = (int(d[1]) - int(d[0]), int(d[3]) - int(d[2]))
        arr = np.asarray(master[cell])
        if arr.shape != shape:
            raise ValueError(f"{name} master for cell {cell!r}: shape {arr.shape} does not match "
                             f"the data section {shape}")
        _cell_view(out, origin, shape, _parity(cell_parity, cell))[...] = arr
    return out


def _master_view(master: Any, cell: str, origin, shape, parity, chip_shape, name: str,
                 dtype) -> np.ndarray:
    """Per-cell view of a master given as a chip array or a per-cell mapping, or a zero-
    stride constant when the master is a scalar."""
    if isinstance(master, Mapping):
        if cell not in master:
            raise KeyError(f"{name} master: no array for cell {cell!r}")
        arr = np.asarray(master[cell])
        if arr.shape != shape:
            raise ValueError(f"{name} master for cell {cell!r}: shape {arr.shape} does not match "
                             f"the data section {shape}")
        return arr if arr.dtype == dtype else arr.astype(dtype)
    arr = np.asarray(master)
    if arr.ndim == 0:
        return np.broadcast_to(arr.astype(dtype), shape)
    if arr.shape != tuple(chip_shape):
        raise ValueError(f"{name} master: shape {arr.shape} is neither the chip shape "
                         f"{tuple(chip_shape)} nor a per-cell mapping")
    if arr.dtype != dtype:
        raise ValueError(f"{name} master: dtype {arr.dtype}, expected {np.dtype(dtype)} "
                         "(convert once per run, not per exposure)")
    return _cell_view(arr, origin, shape, parity)


def detrend_cells(cells: Mapping[str, np.ndarray], *, datasec: Section | Mapping[str, Section],
                  biassec: Section | Mapping[str, Section],
                  cell_origins: Mapping[str, tuple[int, int]], chip_shape: tuple[int, int],
                  gain: float | Mapping[str, float], read_noise: float | Mapping[str, float],
                  saturation: float | Mapping[str, float],
                  bias: Any = None, dark: Any = None, dark_time: float = 0.0,
                  flat: Any = None, fringe: Any = None, static_mask: Any = None,
                  nonlinearity: NonlinearityTable | Mapping[str, NonlinearityTable] | None = None,
                  cell_parity: Mapping[str, tuple[int, int]] | None = None,
                  dead_cells: frozenset[str] | set[str] | tuple[str, ...] = (),
                  overscan_statistic: str = "median", overscan_boxcar: int = OVERSCAN_BOXCAR,
                  flat_min: float = FLAT_MIN,
                  bleed_fraction: float = 0.5, bleed_grow: int = 2, bleed_axis: int = 0,
                  fringe_points: int = 2000, fringe_half_box: int = 5,
                  fringe_sky_grid: tuple[int, int] = (8, 8), fringe_rej: float = 2.0,
                  fringe_iter: int = 10, fringe_keep: float = 0.5, fringe_seed: int = 0,
                  find_cosmics: bool = True, cosmic_options: Mapping[str, Any] | None = None,
                  engine: str = "auto",
                  out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> DetrendResult:
    """Detrend the raw cells of one OTA into a chip image, variance and mask.

    Parameters
    ----------
    cells : mapping of str to ndarray
        Raw cells (ADU, any numeric dtype) including overscan, by cell name ``xyIJ``.
        Cells of ``cell_origins`` absent here are masked DEAD_CELL (value 0).
    datasec, biassec : tuple or mapping of tuple
        Data and bias sections ``(y0, y1, x0, x1)`` (0-based half-open raw-cell pixels), one
        for all cells or one per cell.
    cell_origins : mapping of str to (int, int)
        Chip pixel ``(x0, y0)`` of each cell's data pixel (0, 0) (after its parity flip, the
        lower-left corner of its footprint).
    chip_shape : (int, int)
        ``(ny, nx)`` of the stitched chip (4868, 4846 for GPC1).
    gain : float or mapping
        Gain (electrons per ADU), per cell or one value.
    read_noise : float or mapping
        Read noise (ADU), per cell or one value.
    saturation : float or mapping
        Saturation level of the raw counts (ADU, before overscan subtraction).
    bias : ndarray or mapping, optional
        Residual bias master (ADU, after overscan): float32 array of ``chip_shape`` in chip
        orientation, or per-cell arrays of the data-section shape in raw orientation.
    dark : ndarray or mapping, optional
        Dark-current master (ADU per second), same layouts as ``bias``.
    dark_time : float
        Dark time (s) by which the dark master is scaled.
    flat : ndarray or mapping, optional
        Flat field (dimensionless, from frames in electrons), same layouts.
    fringe : ndarray or mapping, optional
        Fringe template, same layouts; its amplitude is fitted per chip and subtracted.
    static_mask : ndarray or mapping, optional
        Static mask (uint16 bits), same layouts; OR-ed into the output mask.
    nonlinearity : NonlinearityTable or mapping, optional
        Per-cell (or common) nonlinearity correction.
    cell_parity : mapping, optional
        ``(xparity, yparity)`` per cell (see :func:`stitch_cells`).
    dead_cells : collection of str
        Cells to mask DEAD_CELL although present (they are still detrended).
    overscan_statistic, overscan_boxcar
        Overscan reduction (GPC1: median per row, 3-row boxcar).
    flat_min : float
        Flat values at or below this are masked LOW.
    bleed_fraction, bleed_grow, bleed_axis
        Bleed-trail options, see :func:`ps1mpi.algorithms.saturation.bleed_mask`: runs along
        the readout axis of pixels above ``bleed_fraction`` x (saturation - overscan) that
        touch saturated pixels, grown by ``bleed_grow`` pixels.
    fringe_points, fringe_half_box, fringe_sky_grid, fringe_rej, fringe_iter, fringe_keep,
    fringe_seed
        Options of :func:`fit_fringe` (IPP: 10 iterations, 2.0 sigma, keep 0.5).
    find_cosmics : bool
        Detect and mask cosmic rays (:func:`ps1mpi.algorithms.cosmics.find_cosmics`).
    cosmic_options : mapping, optional
        Keyword options for :func:`~ps1mpi.algorithms.cosmics.find_cosmics`.
    engine : {"auto", "numba", "numpy"}
        Per-pixel engine; "auto" uses numba when installed.
    out : (image, variance, mask), optional
        Preallocated chip arrays (float32, float32, uint16 of ``chip_shape``) to reuse.

    Returns
    -------
    DetrendResult
    """
    from ps1mpi.algorithms import saturation as satmod

    t_all = time.perf_counter()
    timings: dict[str, float] = {"overscan": 0.0, "pixels": 0.0, "bleed": 0.0,
                                 "fringe": 0.0, "cosmics": 0.0, "gaps": 0.0}
    if engine not in ("auto", "numba", "numpy"):
        raise ValueError(f"engine must be 'auto', 'numba' or 'numpy', got {engine!r}")
    if engine == "numba" and not _HAVE_NUMBA:
        raise RuntimeError("engine='numba' requested but numba is not installed")
    use_nb = _HAVE_NUMBA and engine != "numpy"
    chip_shape = (int(chip_shape[0]), int(chip_shape[1]))
    if not cell_origins:
        raise ValueError("cell_origins is empty: no cells to place in the chip")
    unknown = set(cells) - set(cell_origins)
    if unknown:
        raise KeyError(f"cells {sorted(unknown)} have no origin in cell_origins")
    if not np.isfinite(dark_time) or dark_time < 0:
        raise ValueError(f"dark_time must be finite and >= 0 s, got {dark_time}")

    if overscan_statistic not in ("median", "mean"):
        raise ValueError("overscan statistic must be 'median' or 'mean', "
                         f"got {overscan_statistic!r}")
    if overscan_boxcar < 1:
        raise ValueError(f"overscan boxcar must be >= 1 row, got {overscan_boxcar}")

    # geometry of every cell footprint, checked before any pixel is touched
    plan = []
    for cell, origin in cell_origins.items():
        par = _parity(cell_parity, cell)
        raw = cells.get(cell)
        if raw is not None:
            raw = _require_2d(raw, f"raw cell {cell}")
            ds = _check_section(_per_cell(datasec, cell, "datasec"), raw.shape,
                                f"datasec of {cell}")
            bs = _check_section(_per_cell(biassec, cell, "biassec"), raw.shape,
                                f"biassec of {cell}")
            if ds[0] < bs[0] or ds[1] > bs[1]:
                raise ValueError(f"biassec rows {bs[0]}:{bs[1]} of cell {cell} do not cover its "
                                 f"datasec rows {ds[0]}:{ds[1]}; the overscan is subtracted "
                                 "row by row")
        else:
            d = _per_cell(datasec, cell, "datasec")
            ds = (int(d[0]), int(d[1]), int(d[2]), int(d[3]))
            bs = None
        shape = (ds[1] - ds[0], ds[3] - ds[2])
        x0, y0 = int(origin[0]), int(origin[1])
        if x0 < 0 or y0 < 0 or y0 + shape[0] > chip_shape[0] or x0 + shape[1] > chip_shape[1]:
            raise ValueError(f"cell {cell} of shape {shape} at origin (x0={x0}, y0={y0}) falls "
                             f"outside the chip of shape {chip_shape}")
        plan.append((cell, (x0, y0), par, raw, ds, bs, shape))

    t0 = time.perf_counter()
    if out is None:
        img = np.empty(chip_shape, np.float32)
        var = np.empty(chip_shape, np.float32)
        msk = np.empty(chip_shape, np.uint16)
    else:
        img, var, msk = out
        for arr, dt, nm in ((img, np.float32, "out image"), (var, np.float32, "out variance"),
                            (msk, np.uint16, "out mask")):
            if arr.shape != chip_shape or arr.dtype != dt or not arr.flags.c_contiguous:
                raise ValueError(f"{nm}: need a C-contiguous {np.dtype(dt)} array of shape "
                                 f"{chip_shape}, got {arr.dtype} {arr.shape}")
    if not (use_nb and any(p[3] is not None for p in plan)):
        # (the numba kernel writes the gaps while it streams the chip rows)
        rects = [(p[1][0], p[1][1], p[6][1], p[6][0]) for p in plan]
        _fill_outside(((img, 0.0), (var, 0.0), (msk, maskbits.GAP)), rects, chip_shape)
    # cells in chip-row order, left to right (the order the numba kernel needs)
    plan.sort(key=lambda p: (p[1][1], p[1][0]))
    timings["gaps"] += time.perf_counter() - t0

    # chip-shaped masters: one conversion per call at most (none when already float32/C)
    def _chip_master(m, name, dtype):
        if m is None or isinstance(m, Mapping) or np.ndim(m) == 0:
            return m
        arr = np.asarray(m)
        if arr.shape != chip_shape:
            raise ValueError(f"{name} master: shape {arr.shape} is neither the chip shape "
                             f"{chip_shape} nor a per-cell mapping")
        return np.ascontiguousarray(arr, dtype=dtype)

    bias_m = _chip_master(bias, "bias", np.float32)
    dark_m = _chip_master(dark, "dark", np.float32)
    flat_m = _chip_master(flat, "flat", np.float32)
    static_m = _chip_master(static_mask, "static mask", np.uint16)

    n_sat = n_low = n_sus = n_bleed = 0
    n_covered = 0
    levels: dict[str, float] = {}
    per_cell: list[tuple] = []  # (cell, origin, par, raw, ds, bs, shape, ovec, sat_level)
    rows_int: list[list[int]] = []
    rows_flt: list[list[float]] = []
    raws_nb: list[np.ndarray] = []
    ovecs_nb: list[np.ndarray] = []
    tables: dict[int, tuple[int, NonlinearityTable]] = {}

    for cell, origin, par, raw, ds, bs, shape in plan:
        n_covered += shape[0] * shape[1]
        if raw is None:
            continue                      # a missing (dead) cell: written after the kernel
        g = float(_per_cell(gain, cell, "gain"))
        rn = float(_per_cell(read_noise, cell, "read_noise"))
        sat_level = float(_per_cell(saturation, cell, "saturation"))
        if not (np.isfinite(g) and g > 0):
            raise ValueError(f"gain of cell {cell}: must be finite and > 0 e-/ADU, got {g}")
        if not (np.isfinite(rn) and rn >= 0):
            raise ValueError(f"read_noise of cell {cell}: must be finite and >= 0 ADU, got {rn}")
        if not np.isfinite(sat_level):
            raise ValueError(f"saturation of cell {cell}: must be finite ADU, got {sat_level}")
        nl = _per_cell(nonlinearity, cell, "nonlinearity") if nonlinearity is not None else None
        if nl is not None and not isinstance(nl, NonlinearityTable):
            raise TypeError(f"nonlinearity of cell {cell}: expected a NonlinearityTable, "
                            f"got {type(nl).__name__}")
        if use_nb and not raw.dtype.isnative:
            raw = raw.astype(raw.dtype.newbyteorder("="))
        rn_e = rn * g
        read_var = rn_e ** 2 + overscan_read_variance(rn_e, bs[3] - bs[2], overscan_boxcar,
                                                      overscan_statistic)

        # overscan
        t0 = time.perf_counter()
        if use_nb:
            ovec = _overscan_nb(raw, bs[0], bs[1], bs[2], bs[3], overscan_statistic == "median",
                                int(overscan_boxcar), ds[0], ds[1])
        else:
            ovec = _data_overscan(raw, ds, bs, overscan_statistic, overscan_boxcar)
        levels[cell] = float(ovec.mean())
        timings["overscan"] += time.perf_counter() - t0
        per_cell.append((cell, origin, par, raw, ds, bs, shape, ovec, sat_level))

        t0 = time.perf_counter()
        if use_nb:
            # parameters of the chip-row-order kernel
            ny, nx = shape
            if par[0] < 0:
                rsrc = np.ascontiguousarray(raw[:, ds[2]:ds[3]][:, ::-1])
                rx0 = 0
            else:
                rsrc = raw if raw.flags.c_contiguous else np.ascontiguousarray(raw)
                rx0 = ds[2]
            if par[1] < 0:
                ry_first, o_first, ry_step = ds[1] - 1, ny - 1, -1
            else:
                ry_first, o_first, ry_step = ds[0], 0, 1
            if nl is not None:
                key = id(nl)
                if key not in tables:
                    tables[key] = (len(tables), nl)
                a0, ainv, fac, amax = nl.uniform()
                nl_index, nfac = tables[key][0], fac.size
            else:
                a0, ainv, amax, nl_index, nfac = 0.0, 1.0, np.inf, -1, 2
            raws_nb.append(rsrc)
            ovecs_nb.append(ovec)
            rows_int.append([rx0, ry_first, ry_step, o_first, origin[1], origin[0], ny, nx,
                             nl_index, nfac])
            rows_flt.append([g, read_var, sat_level, a0, ainv, amax])
        else:
            vb = _master_view(bias_m if bias_m is not None else np.float32(0), cell, origin,
                              shape, par, chip_shape, "bias", np.float32)
            vd = _master_view(dark_m if dark_m is not None else np.float32(0), cell, origin,
                              shape, par, chip_shape, "dark", np.float32)
            vf = _master_view(flat_m if flat_m is not None else np.float32(1), cell, origin,
                              shape, par, chip_shape, "flat", np.float32)
            vs = _master_view(static_m if static_m is not None else np.uint16(0), cell, origin,
                              shape, par, chip_shape, "static mask", np.uint16)
            ns, nlw, nsu = _cell_numpy(raw[ds[0]:ds[1], ds[2]:ds[3]], ovec, nl, vb, vd,
                                       float(dark_time), g, vf, float(flat_min), read_var,
                                       sat_level, vs, _cell_view(img, origin, shape, par),
                                       _cell_view(var, origin, shape, par),
                                       _cell_view(msk, origin, shape, par))
            n_sat += ns
            n_low += nlw
            n_sus += nsu
        timings["pixels"] += time.perf_counter() - t0

    if use_nb and raws_nb:
        t0 = time.perf_counter()
        counts = _run_chip_kernel(raws_nb, ovecs_nb, rows_int, rows_flt, tables,
                                  (bias_m, dark_m, flat_m, static_m), cell_origins, cell_parity,
                                  datasec, chip_shape, float(dark_time), float(flat_min),
                                  img, var, msk, {pc[0] for pc in per_cell})
        n_sat, n_low, n_sus = (int(v) for v in counts.sum(axis=0))
        sat_cells = {per_cell[k][0] for k in np.flatnonzero(counts[:, 0])}
        timings["pixels"] += time.perf_counter() - t0
    else:
        sat_cells = None

    t0 = time.perf_counter()
    for cell, origin, par, raw, ds, bs, shape in plan:
        if raw is None:
            _cell_view(img, origin, shape, par)[...] = 0.0
            _cell_view(var, origin, shape, par)[...] = 0.0
            _cell_view(msk, origin, shape, par)[...] = maskbits.DEAD_CELL
    timings["gaps"] += time.perf_counter() - t0

    for cell, origin, par, raw, ds, bs, shape, ovec, sat_level in per_cell:
        om = _cell_view(msk, origin, shape, par)
        if cell in dead_cells:
            om |= np.uint16(maskbits.DEAD_CELL)
        # bleed trails, only where something saturated (raw orientation = readout axes),
        # computed on the band of lines (columns for axis 0) that hold saturated pixels
        if sat_cells is not None and cell not in sat_cells:
            continue
        t0 = time.perf_counter()
        sat_px = (om & maskbits.SAT) != 0
        lines = np.flatnonzero(sat_px.any(axis=bleed_axis))
        if lines.size:
            lo = max(int(lines[0]) - bleed_grow, 0)
            hi = min(int(lines[-1]) + bleed_grow + 1, shape[1 - bleed_axis])
            band = ((slice(None), slice(lo, hi)) if bleed_axis == 0
                    else (slice(lo, hi), slice(None)))
            rdata = raw[ds[0]:ds[1], ds[2]:ds[3]][band]
            above = rdata.astype(np.float32) - ovec[band[0], None]
            thresh = bleed_fraction * (sat_level - levels[cell])
            bl = satmod.bleed_mask(above, sat_px[band], threshold=thresh, grow=bleed_grow,
                                   axis=bleed_axis)
            om[band][bl] |= np.uint16(maskbits.BLEED)
            n_bleed += int(bl.sum())
        timings["bleed"] += time.perf_counter() - t0

    fit = None
    if fringe is not None:
        t0 = time.perf_counter()
        if isinstance(fringe, Mapping):
            ftmp, _ = stitch_cells({c: np.asarray(fringe[c], np.float32) for c in fringe},
                                         cell_origins=cell_origins, chip_shape=chip_shape,
                                         cell_parity=cell_parity, fill=np.nan)
        else:
            ftmp = np.asarray(fringe, dtype=np.float32)
            _check_same_shape(img, ftmp, "fringe template")
        fit = fit_fringe(img, ftmp, mask=msk, npoints=fringe_points, half_box=fringe_half_box,
                         sky_grid=fringe_sky_grid, rej=fringe_rej, niter=fringe_iter,
                         keep=fringe_keep, seed=fringe_seed)
        subtract_fringe(img, ftmp, fit.amplitude, mask=msk)
        timings["fringe"] = time.perf_counter() - t0

    n_cr = 0
    if find_cosmics:
        from ps1mpi.algorithms.cosmics import find_cosmic_pixels
        t0 = time.perf_counter()
        opts = dict(cosmic_options or {})
        opts.setdefault("engine", "numba" if use_nb else "numpy")
        flat_idx = find_cosmic_pixels(img, var, mask=msk, **opts)
        msk.ravel()[flat_idx] |= np.uint16(maskbits.CR)
        n_cr = int(flat_idx.size)
        timings["cosmics"] = time.perf_counter() - t0

    timings["total"] = time.perf_counter() - t_all
    stats = {
        "timings": timings,
        "engine": "numba" if use_nb else "numpy",
        "overscan": levels,
        "n_sat": n_sat, "n_bleed": n_bleed, "n_low": n_low, "n_suspect": n_sus,
        "n_cr": n_cr, "n_gap": chip_shape[0] * chip_shape[1] - n_covered,
        "fringe": fit,
        "mpix": chip_shape[0] * chip_shape[1] / 1e6,
    }
    return DetrendResult(image=img, variance=var, mask=msk, stats=stats)
