"""Detrend masters from calibration frames: pure functions on arrays.

The IPP built its detrend masters (``ppMerge``) by reducing each calibration frame with the
detrends already made, normalising it, and combining the stack pixel by pixel with an
iterative sigma-clipped mean. These functions do the same on numpy arrays; the caller reads
and writes files. Order of construction (each master uses the previous ones):

1. bias: overscan-corrected bias frames -> clipped mean (ADU);
2. dark: (frame - bias) / dark time -> clipped mean (ADU/s);
3. nonlinearity: a flat-field exposure-time sequence -> measured level vs exposure time per
   cell -> correction table (measured ADU -> factor true/measured);
4. flat: linearised, bias- and dark-subtracted dome flats in electrons, each normalised by its
   level -> clipped mean; corrected for the dome's illumination with night-sky flats
   (:func:`illumination_correction`);
5. fringe: flat-fielded night-sky frames normalised by their sky level -> clipped mean minus its
   large-scale structure = fractional fringe pattern;
6. static mask: hot pixels from the dark, low-response pixels from the flat, dead cells.

Arrays are float32 ``(ny, nx)`` indexed ``[y, x]``; stacks are ``(n, ny, nx)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ps1mpi.algorithms import maskbits

__all__ = [
    "CombinedFrame", "NonlinearityCurve",
    "overscan_correct", "nanmedian0", "robust_sigma", "frame_noise", "sigma_clip_combine", "make_bias", "make_dark",
    "fit_nonlinearity", "apply_nonlinearity", "frame_level", "make_flat",
    "illumination_correction", "make_fringe", "fringe_template", "make_static_mask",
]


@dataclass
class CombinedFrame:
    """Result of a sigma-clipped combination.

    Attributes
    ----------
    image : ndarray
        Clipped mean, float32 ``(ny, nx)``, in the units of the inputs (after scaling).
    error : ndarray
        Standard error of the mean per pixel (same units).
    nused : ndarray
        Inputs kept per pixel (int16).
    """

    image: np.ndarray
    error: np.ndarray
    nused: np.ndarray


@dataclass
class NonlinearityCurve:
    """Correction table of one readout cell.

    ``true = measured * np.interp(measured, adu, factor)``, measured in ADU above bias.

    Attributes
    ----------
    adu : ndarray
        Measured level nodes (ADU above bias), increasing, starting at 0.
    factor : ndarray
        Correction factor (true / measured) at each node.
    rate : float
        Fitted linear signal rate of the sequence (ADU/s), for diagnostics.
    rms : float
        RMS fractional residual of the fit to the sequence.
    """

    adu: np.ndarray
    factor: np.ndarray
    rate: float
    rms: float


def overscan_correct(cell: np.ndarray, *, datasec: tuple[int, int, int, int],
                     biassec: tuple[int, int, int, int], smooth_rows: int = 3) -> np.ndarray:
    """Subtract the overscan and trim a raw cell to its data section.

    The bias of each row is the median of that row's overscan pixels, smoothed along the rows
    with a ``smooth_rows`` boxcar (the IPP GPC1 recipe uses 3).

    Parameters
    ----------
    cell : ndarray
        Raw cell (ADU) including the overscan.
    datasec, biassec : tuple
        0-based half-open ``(y0, y1, x0, x1)`` data and overscan sections; they must cover the
        same rows.
    smooth_rows : int
        Boxcar length (rows) applied to the per-row overscan medians; 1 = no smoothing.

    Returns
    -------
    ndarray
        Data section minus the row bias, float32 (ADU).
    """
    cell = np.asarray(cell)
    y0, y1, x0, x1 = datasec
    by0, by1, bx0, bx1 = biassec
    if (y0, y1) != (by0, by1):
        raise ValueError(f"cell: DATASEC rows {y0}:{y1} and BIASSEC rows {by0}:{by1} differ")
    if y1 > cell.shape[0] or x1 > cell.shape[1] or bx1 > cell.shape[1]:
        raise ValueError(f"cell: shape {cell.shape} smaller than the sections {datasec} / {biassec}")
    rows = np.median(cell[by0:by1, bx0:bx1], axis=1).astype(np.float64)
    if smooth_rows > 1:
        rows = ndimage.uniform_filter1d(rows, smooth_rows, mode="nearest")
    return (cell[y0:y1, x0:x1].astype(np.float32) - rows[:, None].astype(np.float32))


def nanmedian0(stack: np.ndarray) -> np.ndarray:
    """Median along axis 0 ignoring NaNs (all-NaN -> NaN); fast for short stacks.

    ``numpy.nanmedian`` falls back to masked arrays for short axes; sorting along the axis
    (NaNs sort last) and picking the middle of the finite values is much faster.
    """
    stack = np.asarray(stack)
    srt = np.sort(stack, axis=0)
    cnt = np.isfinite(stack).sum(axis=0)
    lo = np.clip((cnt - 1) // 2, 0, None)
    hi = np.clip(cnt // 2, 0, None)
    a = np.take_along_axis(srt, lo[None], axis=0)[0]
    b = np.take_along_axis(srt, hi[None], axis=0)[0]
    med = 0.5 * (a + b)
    return np.where(cnt > 0, med, np.nan).astype(stack.dtype, copy=False)


def robust_sigma(values: np.ndarray, axis=None) -> np.ndarray | float:
    """Standard deviation estimated from the median absolute deviation (1.4826 MAD), NaNs ignored."""
    if axis == 0 and np.ndim(values) >= 2:
        med = nanmedian0(values)
        return 1.4826 * nanmedian0(np.abs(values - med[None]))
    med = np.nanmedian(values, axis=axis, keepdims=True)
    mad = np.nanmedian(np.abs(values - med), axis=axis)
    return 1.4826 * mad


def frame_noise(data: np.ndarray, valid: np.ndarray | None = None, *, max_samples: int = 50_000) -> np.ndarray:
    """Noise (sigma) of each frame of a stack from the scatter of pairwise differences.

    ``x_k - x_j`` cancels what the frames share (the flat-field pattern, the bias structure),
    and its robust variance (1.4826 MAD)^2 is ``sigma_k^2 + sigma_j^2``; the ``n(n-1)/2`` pairs
    are solved for the ``n`` variances by least squares (two frames share the variance).

    Parameters
    ----------
    data : ndarray
        ``(n, ny, nx)`` stack.
    valid : ndarray, optional
        Bool, usable values.
    max_samples : int
        Pixels sampled per pair (evenly spaced).

    Returns
    -------
    ndarray
        ``(n,)`` sigma of each frame (units of the stack).
    """
    n = data.shape[0]
    flat = data.reshape(n, -1)
    ok = np.isfinite(flat) if valid is None else valid.reshape(n, -1) & np.isfinite(flat)
    step = max(1, flat.shape[1] // max_samples)
    flat, ok = flat[:, ::step], ok[:, ::step]
    if n == 1:
        return np.array([np.nan])
    rows, rhs = [], []
    for k in range(n):
        for j in range(k + 1, n):
            both = ok[k] & ok[j]
            if both.sum() < 10:
                continue
            d = flat[k, both] - flat[j, both]
            v = (1.4826 * np.median(np.abs(d - np.median(d)))) ** 2
            row = np.zeros(n)
            row[k] = row[j] = 1.0
            rows.append(row)
            rhs.append(v)
    if not rows:
        return np.full(n, np.nan)
    if n == 2:
        return np.full(2, np.sqrt(rhs[0] / 2.0))
    var, *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    floor = 1e-6 * max(float(np.max(rhs)), 1e-30)
    return np.sqrt(np.maximum(var, floor))


def sigma_clip_combine(stack: np.ndarray, *, scales: np.ndarray | None = None,
                       masks: np.ndarray | None = None, nsigma: float = 3.0,
                       iterations: int = 2) -> CombinedFrame:
    """Combine a stack of frames pixel by pixel with an iterative sigma-clipped mean.

    The noise of each frame is measured once from pairwise frame differences
    (:func:`frame_noise`). The first pass tests every value against the median of its pixel's
    stack, with a threshold of ``nsigma`` times the frame's noise; later passes test it against
    the mean of the *other* kept values of the pixel (leave-one-out, so a value cannot pull its
    own reference), with a threshold of ``nsigma`` times the exact sigma of that difference,
    ``sqrt(sigma_k^2 + sum_j sigma_j^2 / m^2)``. Each pass starts again from all valid values,
    so false rejections of the first pass are undone. The result is the mean of the kept
    values. With fewer than three frames nothing is clipped.

    Parameters
    ----------
    stack : ndarray
        ``(n, ny, nx)`` frames.
    scales : ndarray, optional
        ``(n,)`` divisors applied to each frame first (e.g. its median level for flats).
    masks : ndarray, optional
        ``(n, ny, nx)`` bool or int; non-zero pixels are excluded.
    nsigma : float
        Clipping threshold (sigma).
    iterations : int
        Clipping passes (0 = plain mean).

    Returns
    -------
    CombinedFrame
        Mean, its standard error from the frame noises, and the number of values kept.
    """
    stack = np.asarray(stack, dtype=np.float32)
    if stack.ndim != 3:
        raise ValueError(f"stack: expected (n, ny, nx), got shape {stack.shape}")
    n = stack.shape[0]
    if n < 1:
        raise ValueError("stack: no frames to combine")
    data = stack.copy()
    if scales is not None:
        scales = np.asarray(scales, dtype=np.float64)
        if scales.shape != (n,) or not np.all(np.isfinite(scales)) or np.any(scales == 0):
            raise ValueError(f"scales: need {n} finite non-zero values, got {scales}")
        data /= scales.astype(np.float32)[:, None, None]
    valid = np.isfinite(data)
    if masks is not None:
        masks = np.asarray(masks)
        if masks.shape != data.shape:
            raise ValueError(f"masks: shape {masks.shape} differs from stack {data.shape}")
        valid &= masks == 0
    sig = frame_noise(data, valid).astype(np.float32)
    var = np.where(np.isfinite(sig), sig * sig, 0.0).astype(np.float32)
    data[~valid] = 0.0
    keep = valid.copy()
    thr = np.float32(nsigma)
    if n >= 3 and iterations > 0 and np.all(np.isfinite(sig)):
        med = nanmedian0(np.where(valid, data, np.float32(np.nan)))
        keep = valid & (np.abs(data - med[None]) <= thr * sig[:, None, None])
        del med
        for _ in range(iterations - 1):
            kf = keep.astype(np.float32)
            S = np.einsum("ijk,ijk->jk", data, kf)[None]
            V = np.einsum("i,ijk->jk", var, kf)[None]
            C = kf.sum(axis=0)[None]
            m = C - kf                                          # other kept values
            with np.errstate(invalid="ignore", divide="ignore"):
                ref = (S - data * kf) / m
                vref = (V - var[:, None, None] * kf) / (m * m)
                new_keep = valid & ((m < 1) | (np.abs(data - ref) <= thr * np.sqrt(var[:, None, None] + vref)))
            del S, V, C, m, ref, vref
            if np.array_equal(new_keep, keep):
                break
            keep = new_keep
    kf = keep.astype(np.float32)
    nused = keep.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.einsum("ijk,ijk->jk", data, kf) / nused
        err = np.sqrt(np.einsum("i,ijk->jk", var, kf)) / nused
    if np.any(nused == 0):
        # a pixel whose every value was rejected falls back to the median of its valid values
        mean = np.where(nused > 0, mean, nanmedian0(np.where(valid, data, np.float32(np.nan))))
    return CombinedFrame(mean.astype(np.float32), err.astype(np.float32), nused.astype(np.int16))


def make_bias(frames: np.ndarray, *, nsigma: float = 3.0, iterations: int = 2) -> np.ndarray:
    """Residual 2-D bias master (ADU) from overscan-corrected bias frames ``(n, ny, nx)``."""
    return sigma_clip_combine(frames, nsigma=nsigma, iterations=iterations).image


def make_dark(frames: np.ndarray, dark_times: np.ndarray, *, bias: np.ndarray | None = None,
              nsigma: float = 3.0, iterations: int = 2) -> np.ndarray:
    """Dark-current master (ADU per second of dark time).

    Parameters
    ----------
    frames : ndarray
        ``(n, ny, nx)`` overscan-corrected dark frames (ADU).
    dark_times : ndarray
        ``(n,)`` dark times (s), all positive.
    bias : ndarray, optional
        Bias master (ADU) subtracted from every frame first.

    Returns
    -------
    ndarray
        Dark rate (ADU/s), float32.
    """
    frames = np.asarray(frames, dtype=np.float32)
    dark_times = np.asarray(dark_times, dtype=np.float64)
    if dark_times.shape != (frames.shape[0],) or np.any(dark_times <= 0):
        raise ValueError(f"dark_times: need {frames.shape[0]} positive values, got {dark_times}")
    if bias is not None:
        frames = frames - np.asarray(bias, dtype=np.float32)[None]
    return sigma_clip_combine(frames, scales=dark_times, nsigma=nsigma, iterations=iterations).image


def fit_nonlinearity(levels: np.ndarray, exptimes: np.ndarray, *, degree: int = 3,
                     n_nodes: int = 64, max_level: float | None = None,
                     extrapolate: float = 1.1) -> NonlinearityCurve:
    """Nonlinearity correction table from an exposure-time sequence of a stable source.

    The measured level ``L(t)`` (ADU above bias, e.g. the median of a cell of a flat-field
    exposure) is fitted with a polynomial through the origin, ``L = p1 t + p2 t^2 + ...``; the
    true (linear) signal is ``p1 t``, so the correction factor at measured level ``L(t)`` is
    ``p1 t / L(t)``. The median commutes with any monotonic response, so a table from cell
    medians is valid for every pixel of the cell.

    Parameters
    ----------
    levels : ndarray
        Measured levels (ADU above bias, bias and dark removed).
    exptimes : ndarray
        Exposure times (s) of the same frames.
    degree : int
        Polynomial degree (>= 2).
    n_nodes : int
        Nodes in the returned table.
    max_level : float, optional
        Ignore frames above this level (e.g. saturated ones).
    extrapolate : float
        The table extends to this multiple of the longest exposure of the sequence (the
        polynomial carried beyond the last measured level, up to saturation).

    Returns
    -------
    NonlinearityCurve
    """
    levels = np.asarray(levels, dtype=np.float64)
    t = np.asarray(exptimes, dtype=np.float64)
    if levels.shape != t.shape or levels.ndim != 1:
        raise ValueError(f"levels {levels.shape} and exptimes {t.shape} must be equal 1-D arrays")
    use = np.isfinite(levels) & (t > 0) & (levels > 0)
    if max_level is not None:
        use &= levels <= max_level
    if use.sum() < degree + 1:
        raise ValueError(f"nonlinearity sequence: {int(use.sum())} usable frames, need >= {degree + 1}")
    L, tt = levels[use], t[use]
    A = np.stack([tt ** k for k in range(1, degree + 1)], axis=1)
    # relative weights: each level has a similar fractional error
    w = 1.0 / L
    coef, *_ = np.linalg.lstsq(A * w[:, None], L * w, rcond=None)
    model = A @ coef
    rms = float(np.sqrt(np.mean(((L - model) / L) ** 2)))
    p1 = coef[0]
    if p1 <= 0:
        raise ValueError("nonlinearity sequence: the fitted linear rate is not positive")
    tgrid = np.linspace(0.0, tt.max() * max(extrapolate, 1.0), n_nodes)
    Lgrid = np.stack([tgrid ** k for k in range(1, degree + 1)], axis=1) @ coef
    if np.any(np.diff(Lgrid) <= 0):
        # keep the monotonic part (the extrapolation may turn over past saturation)
        stop = int(np.argmax(np.diff(Lgrid) <= 0)) + 1
        if tgrid[stop - 1] < tt.max():
            raise ValueError("nonlinearity sequence: the fitted response is not monotonic")
        tgrid, Lgrid = tgrid[:stop], Lgrid[:stop]
    factor = np.ones_like(Lgrid)
    factor[1:] = p1 * tgrid[1:] / Lgrid[1:]
    return NonlinearityCurve(Lgrid.astype(np.float32), factor.astype(np.float32), float(p1), rms)


def apply_nonlinearity(data: np.ndarray, adu: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Linearise ``data`` (ADU above bias): ``data * interp(data, adu, factor)``.

    Beyond the table the end factors are held constant.
    """
    data = np.asarray(data, dtype=np.float32)
    return data * np.interp(data, np.asarray(adu, dtype=np.float32),
                            np.asarray(factor, dtype=np.float32)).astype(np.float32)


def frame_level(frame: np.ndarray, mask: np.ndarray | None = None, *, step: int = 1) -> float:
    """Robust level of a frame: median of its finite unmasked pixels (every ``step``-th)."""
    frame = np.asarray(frame)
    sel = np.isfinite(frame)
    if mask is not None:
        sel &= np.asarray(mask) == 0
    vals = frame[sel][::max(step, 1)]
    if vals.size == 0:
        raise ValueError("frame: no finite unmasked pixels to measure a level")
    return float(np.median(vals))


def make_flat(frames: np.ndarray, *, levels: np.ndarray | None = None, masks: np.ndarray | None = None,
              nsigma: float = 3.0, iterations: int = 2) -> np.ndarray:
    """Flat-field master (relative response) from reduced flat frames.

    Parameters
    ----------
    frames : ndarray
        ``(n, ny, nx)`` flat frames with bias, dark and nonlinearity removed, in electrons.
    levels : ndarray, optional
        ``(n,)`` normalisation of each frame (e.g. its median over the whole chip or mosaic,
        computed by the caller when frames are combined cell by cell); default: each frame's
        own median.
    masks : ndarray, optional
        Pixels to exclude from the combination.

    Returns
    -------
    ndarray
        Combined flat, float32: each frame divided by its level, clipped mean (so about 1).
    """
    frames = np.asarray(frames, dtype=np.float32)
    if levels is None:
        levels = np.array([frame_level(f) for f in frames])
    return sigma_clip_combine(frames, scales=np.asarray(levels), masks=masks,
                              nsigma=nsigma, iterations=iterations).image


def _smooth_large_scale(image: np.ndarray, valid: np.ndarray, box: int) -> np.ndarray:
    """Large-scale structure: medians in ``box`` x ``box`` blocks (valid pixels only; empty blocks
    take their nearest neighbour's), interpolated back to full resolution (bilinear, linear
    extrapolation over the outer half blocks)."""
    ny, nx = image.shape
    by, bx = max(1, -(-ny // box)), max(1, -(-nx // box))
    grid = np.empty((by, bx), np.float32)
    band = np.empty((box, bx * box), np.float32)
    for j in range(by):                       # one row of blocks at a time (small temporaries)
        rows = slice(j * box, min((j + 1) * box, ny))
        band.fill(np.nan)
        h = rows.stop - rows.start
        band[:h, :nx] = np.where(valid[rows], image[rows], np.float32(np.nan))
        blocks = band.reshape(box, bx, box).transpose(1, 0, 2).reshape(bx, box * box)
        grid[j] = nanmedian0(blocks.T)
    if np.all(np.isnan(grid)):
        return np.full_like(image, np.nan)
    # fill empty blocks with the nearest filled one
    bad = np.isnan(grid)
    if bad.any():
        idx = ndimage.distance_transform_edt(bad, return_distances=False, return_indices=True)
        grid = grid[tuple(idx)]
    # block centres in pixel coordinates; bilinear interpolation between them and linear
    # extrapolation over the outer half blocks (a gradient continues to the edge)
    fy = (np.arange(ny) + 0.5) / box - 0.5
    fx = (np.arange(nx) + 0.5) / box - 0.5

    def _weights(f, n):
        if n == 1:
            return np.zeros(f.size, int), np.zeros(f.size)
        i0 = np.clip(np.floor(f).astype(int), 0, n - 2)
        return i0, f - i0

    iy, ty = _weights(fy, by)
    ix, tx = _weights(fx, bx)
    g = grid.astype(np.float64)
    if by == 1 and bx == 1:
        return np.full((ny, nx), g[0, 0], np.float32)
    if by == 1:
        row = g[0, ix] * (1 - tx) + g[0, ix + 1] * tx
        return np.broadcast_to(row[None, :], (ny, nx)).astype(np.float32)
    if bx == 1:
        col = g[iy, 0] * (1 - ty) + g[iy + 1, 0] * ty
        return np.broadcast_to(col[:, None], (ny, nx)).astype(np.float32)
    # separable: interpolate the grid along x first (by x nx), then along y, in bands of rows
    gx = (g[:, ix] * (1 - tx)[None, :] + g[:, ix + 1] * tx[None, :]).astype(np.float32)
    out = np.empty((ny, nx), np.float32)
    wy0, wy1 = (1 - ty).astype(np.float32), ty.astype(np.float32)
    for a in range(0, ny, 256):
        sl = slice(a, a + 256)
        out[sl] = gx[iy[sl]] * wy0[sl, None] + gx[iy[sl] + 1] * wy1[sl, None]
    return out


def illumination_correction(dome_flat: np.ndarray, sky_flat: np.ndarray, *,
                            mask: np.ndarray | None = None, box: int = 64) -> np.ndarray:
    """Large-scale correction of a dome flat from a night-sky flat.

    The dome lamp does not light the focal plane like the sky; the ratio of a combined,
    star-rejected night-sky flat to the dome flat, smoothed on ``box``-pixel scales, is the
    illumination correction: ``flat = dome_flat * correction``.

    Parameters
    ----------
    dome_flat, sky_flat : ndarray
        Normalised flats of the same chip (relative response).
    mask : ndarray, optional
        Pixels to ignore (non-zero).
    box : int
        Smoothing scale (pixels).

    Returns
    -------
    ndarray
        Multiplicative correction, float32.
    """
    dome_flat = np.asarray(dome_flat, dtype=np.float32)
    sky_flat = np.asarray(sky_flat, dtype=np.float32)
    if dome_flat.shape != sky_flat.shape:
        raise ValueError(f"dome_flat {dome_flat.shape} and sky_flat {sky_flat.shape} differ in shape")
    valid = np.isfinite(dome_flat) & np.isfinite(sky_flat) & (dome_flat > 0.2)
    if mask is not None:
        valid &= np.asarray(mask) == 0
    ratio = np.full(dome_flat.shape, np.nan, np.float32)
    np.divide(sky_flat, dome_flat, out=ratio, where=valid)
    corr = _smooth_large_scale(ratio, valid, box)
    del ratio
    return np.where(np.isfinite(corr), corr, 1.0).astype(np.float32)


def make_fringe(frames: np.ndarray, *, levels: np.ndarray | None = None, mask: np.ndarray | None = None,
                box: int = 64, nsigma: float = 3.0, iterations: int = 2) -> np.ndarray:
    """Fringe template (fraction of the sky level) from flat-fielded night-sky frames.

    Each frame is divided by its sky level; the stack is combined with a clipped mean (which
    rejects the stars, different in every frame); the large-scale structure (``box`` px) is
    removed, leaving the fringe pattern as a fraction of the sky. The chip stage scales it by a
    fitted amplitude times the sky level.

    Parameters
    ----------
    frames : ndarray
        ``(n, ny, nx)`` bias/dark/flat-corrected sky frames (any linear unit).
    levels : ndarray, optional
        Sky level of each frame; default: each frame's median.
    mask : ndarray, optional
        ``(ny, nx)`` pixels to ignore (set to 0 in the template).
    box : int
        Scale (pixels) of the large-scale structure removed; larger than the fringe spacing.

    Returns
    -------
    ndarray
        Fringe template (dimensionless), float32; 0 where masked.
    """
    frames = np.asarray(frames, dtype=np.float32)
    if levels is None:
        levels = np.array([frame_level(f, mask) for f in frames])
    masks = None if mask is None else np.broadcast_to(np.asarray(mask) != 0, frames.shape)
    comb = sigma_clip_combine(frames, scales=np.asarray(levels), masks=masks,
                              nsigma=nsigma, iterations=iterations).image
    return fringe_template(comb, mask=mask, box=box)


def fringe_template(combined: np.ndarray, *, mask: np.ndarray | None = None, box: int = 64) -> np.ndarray:
    """Fringe template from a combined, sky-normalised frame (about 1 + fringe): the frame minus
    its large-scale structure on ``box``-pixel scales; 0 where masked or not finite."""
    combined = np.asarray(combined, dtype=np.float32)
    valid = np.isfinite(combined)
    if mask is not None:
        valid &= np.asarray(mask) == 0
    smooth = _smooth_large_scale(combined, valid, box)
    out = np.where(valid, combined - smooth, 0.0)
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


def make_static_mask(dark_rate: np.ndarray, flat: np.ndarray, *, gap: np.ndarray | None = None,
                     cell_slices: dict[str, tuple[slice, slice]] | None = None,
                     hot_rate: float = 1.0, hot_nsigma: float = 8.0, low_flat: float = 0.5,
                     high_flat: float = 1.5, dead_fraction: float = 0.5) -> np.ndarray:
    """Static bad-pixel mask of a chip from its dark and flat masters.

    Parameters
    ----------
    dark_rate : ndarray
        Dark master (ADU/s or e-/s; ``hot_rate`` in the same unit).
    flat : ndarray
        Flat master (normalised, about 1).
    gap : ndarray, optional
        Bool array, True where there are no detector pixels (cell gaps) -> ``GAP``.
    cell_slices : dict, optional
        Cell name -> (y slice, x slice) in the chip; a cell with more than ``dead_fraction`` of
        its pixels bad is masked ``DEAD_CELL`` entirely.
    hot_rate : float
        A pixel is hot if its dark rate exceeds this absolute rate and the chip's median by
        ``hot_nsigma`` robust sigma.
    low_flat, high_flat : float
        Response limits: outside them a pixel is bad (``DETECTOR``).
    dead_fraction : float
        Fraction of bad pixels above which a whole cell is dead.

    Returns
    -------
    ndarray
        uint16 mask with bits ``DETECTOR``, ``DEAD_CELL``, ``GAP`` of
        :mod:`ps1mpi.algorithms.maskbits`.
    """
    dark_rate = np.asarray(dark_rate, dtype=np.float32)
    flat = np.asarray(flat, dtype=np.float32)
    if dark_rate.shape != flat.shape:
        raise ValueError(f"dark_rate {dark_rate.shape} and flat {flat.shape} differ in shape")
    live = np.ones(flat.shape, bool) if gap is None else ~np.asarray(gap, bool)
    mask = np.zeros(flat.shape, np.uint16)
    sample = dark_rate[::3, ::3][live[::3, ::3]]          # the chip's dark statistics, subsampled
    sample = sample[np.isfinite(sample)]
    med = float(np.median(sample))
    sig = float(1.4826 * np.median(np.abs(sample - med)))
    del sample
    bad = (dark_rate > hot_rate) & (dark_rate > med + hot_nsigma * sig)
    bad |= ~np.isfinite(flat)
    bad |= flat < low_flat
    bad |= flat > high_flat
    bad &= live
    mask[bad] |= maskbits.DETECTOR
    if cell_slices:
        for sy, sx in cell_slices.values():
            if bad[sy, sx].mean() > dead_fraction:
                mask[sy, sx] |= maskbits.DEAD_CELL
    if gap is not None:
        mask[~live] = maskbits.GAP
    return mask
