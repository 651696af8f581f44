"""Combination of warped images into a stack (the IPP's ``ppStack`` / ``pmStackCombine``).

Every input is one warp of the same skycell: image, variance and mask on the same pixel grid.
The combination is a weighted mean with one weight per input image (ppStack: 1 / the robust
median variance of the input, see :func:`compute_input_weights`), after per-pixel outlier
rejection:

1. At each pixel the usable inputs (``mask & bad_bits == 0``, finite values, positive variance,
   positive weight, not excluded) are compared with a reference, the weighted trimmed
   ("Olympic") mean that discards ``discard_fraction`` of the values (the lowest
   ``floor(k/2)`` and the highest ``k - floor(k/2)``, ``k = floor(discard_fraction * n + 0.5)``).
   The input deviating most, if beyond ``reject_sigma`` times
   ``sqrt(variance + (sys_error * value)**2)``, is rejected; the reference is recomputed without
   it and the test repeated, at most ``max(floor(iterations_per_input * n), 1)`` times
   (IPP COMBINE.ITER 0.5, COMBINE.REJ 3.5, COMBINE.SYS 0.1, COMBINE.DISCARD 0.2). When two
   inputs remain they must agree within ``reject_sigma`` of their joint error, else (``safe``)
   both are rejected.
2. Rejected pixels are grown by ``grow`` pixels (a ``(2 grow + 1)`` square) in their input.
3. An input with more than ``max_reject_fraction`` of its usable pixels rejected (after growth)
   is dropped and the rejection redone without it (IPP IMAGE.REJ 0.1).
4. The stack is ``sum(w_i x_i) / sum(w_i)`` over the remaining inputs, with variance
   ``sum(w_i**2 v_i) / sum(w_i)**2`` from the per-pixel variances (equal to ``1 / sum(w_i)``
   when ``w_i = 1 / v_i``). With ``safe`` a pixel with a single input is not trusted.

Everything is computed per pixel from the values at that pixel (plus the ``grow`` neighbours of
rejections), with the per-input weights and the drop decision passed in, so a band of rows
combined on its own (with ``grow`` rows of halo) is bit-for-bit the same band of the full
combination. For MPI: each rank runs :func:`reject_outliers` on its band, the per-input
counts are summed across ranks, the inputs to drop decided once (:func:`inputs_to_drop`), and
each rank calls :func:`combine_images` on its band with ``dropped`` (and, when nothing was
dropped, ``rejection``) given.

Mask of the stack: an unusable output pixel (no input left, or only one with ``safe``) carries
the OR of the inputs' ``bad_bits`` at that pixel (``GAP`` when there are none) and 0 in image
and variance; a usable pixel carries the non-``bad_bits`` bits (``CONV``, ``SUSPECT``) set in
more than 65% of its inputs (as pmStack does), and ``REJECTED`` where any input was rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
from . import maskbits

__all__ = ["CombineResult", "RejectionResult", "combine_images", "reject_outliers",
           "compute_input_weights", "inputs_to_drop"]

ArrayStack = Union[np.ndarray, Sequence[np.ndarray]]

_ELEMENTS_PER_CHUNK = 1 << 18   # inputs x pixels per chunk: cache-sized passes, bounded memory
_ADVISORY_FRACTION = 0.65       # pmStack SUSPECT_FRACTION


@dataclass(frozen=True)
class RejectionResult:
    """Outlier rejection of a set of inputs (see :func:`reject_outliers`).

    Attributes
    ----------
    rejected : ndarray of bool, shape (n_inputs, ny, nx)
        Rejected pixels per input after growth (interior rows only; usable pixels only).
    n_rejected : ndarray of int64, shape (n_inputs,)
        Number of rejected usable pixels per input (interior rows).
    n_valid : ndarray of int64, shape (n_inputs,)
        Number of usable pixels per input (interior rows).
    excluded : tuple of int
        Inputs that took no part (dropped, or with zero weight).
    """

    rejected: np.ndarray
    n_rejected: np.ndarray
    n_valid: np.ndarray
    excluded: tuple[int, ...]

    @property
    def reject_fraction(self) -> np.ndarray:
        """Rejected fraction of each input's usable pixels (0 for an input with none)."""
        return self.n_rejected / np.maximum(self.n_valid, 1)


@dataclass(frozen=True)
class CombineResult:
    """Result of :func:`combine_images`.

    Attributes
    ----------
    image : ndarray of float32, shape (ny, nx)
        Weighted mean (input units); 0 where the mask marks the pixel unusable.
    variance : ndarray of float32
        Variance of the mean (input units squared); 0 where unusable.
    mask : ndarray of uint16
        Stack mask bits (see module docstring).
    n_inputs : ndarray of uint16
        Number of inputs combined at each pixel.
    exptime_map : ndarray of float32 or None
        Sum of the exposure times (seconds) of the inputs combined at each pixel, when
        ``exptimes`` were given.
    rejected_mask : ndarray of bool, shape (n_inputs, ny, nx)
        Pixels of each input rejected as outliers (after growth) in the final combination.
    dropped_inputs : tuple of int
        Inputs dropped for too many rejected pixels.
    reject_fraction : ndarray of float64, shape (n_inputs,)
        Rejected fraction of each input's usable pixels in the first rejection pass (the one
        the drop decision was made on when ``dropped`` was not given).
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    n_inputs: np.ndarray
    exptime_map: Optional[np.ndarray]
    rejected_mask: np.ndarray
    dropped_inputs: tuple[int, ...]
    reject_fraction: np.ndarray


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------

def _as_list(arrays: ArrayStack, name: str) -> list[np.ndarray]:
    if isinstance(arrays, np.ndarray):
        if arrays.ndim != 3:
            raise ValueError(f"{name} must be a sequence of 2-D arrays or a 3-D array "
                             f"(n_inputs, ny, nx), got shape {arrays.shape}")
        return list(arrays)
    out = [np.asarray(a) for a in arrays]
    for i, a in enumerate(out):
        if a.ndim != 2:
            raise ValueError(f"{name}[{i}] must be 2-D, got shape {a.shape}")
    return out


def _check_inputs(images: ArrayStack, variances: ArrayStack, masks: ArrayStack):
    imgs = _as_list(images, "images")
    vars_ = _as_list(variances, "variances")
    msks = _as_list(masks, "masks")
    if not imgs:
        raise ValueError("images is empty: need at least one input")
    if len(vars_) != len(imgs) or len(msks) != len(imgs):
        raise ValueError(f"got {len(imgs)} images, {len(vars_)} variances and {len(msks)} masks")
    shape = imgs[0].shape
    for name, group in (("images", imgs), ("variances", vars_), ("masks", msks)):
        for i, a in enumerate(group):
            if a.shape != shape:
                raise ValueError(f"{name}[{i}] has shape {a.shape}, images[0] has {shape}")
    for i, m in enumerate(msks):
        if not np.issubdtype(m.dtype, np.integer):
            raise ValueError(f"masks[{i}] must hold integer bit values, got dtype {m.dtype}")
    return imgs, vars_, msks, shape


def _check_weights(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"weights must have one value per input ({n}), got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative, got {w}")
    return w


def _check_halo(halo, ny: int, grow: int) -> tuple[int, int]:
    try:
        top, bottom = (int(h) for h in halo)
    except (TypeError, ValueError):
        raise ValueError(f"halo must be a pair (top, bottom) of row counts, got {halo!r}") from None
    if top < 0 or bottom < 0 or top + bottom >= ny:
        raise ValueError(f"halo {halo!r} leaves no interior rows in an image of {ny} rows")
    return top, bottom


def _check_options(reject_sigma, grow, max_reject_fraction, sys_error, discard_fraction,
                   iterations_per_input):
    if not reject_sigma > 0:
        raise ValueError(f"reject_sigma must be positive, got {reject_sigma!r}")
    if int(grow) != grow or grow < 0:
        raise ValueError(f"grow must be a non-negative integer (pixels), got {grow!r}")
    if not 0 <= max_reject_fraction <= 1:
        raise ValueError(f"max_reject_fraction must be in [0, 1], got {max_reject_fraction!r}")
    if not sys_error >= 0:
        raise ValueError(f"sys_error must be non-negative, got {sys_error!r}")
    if not 0 <= discard_fraction < 1:
        raise ValueError(f"discard_fraction must be in [0, 1), got {discard_fraction!r}")
    if not iterations_per_input >= 0:
        raise ValueError(f"iterations_per_input must be non-negative, got {iterations_per_input!r}")


def _chunks(ny: int, nx: int, n_inputs: int):
    rows = max(1, _ELEMENTS_PER_CHUNK // max(1, n_inputs * nx))
    for r0 in range(0, ny, rows):
        yield r0, min(r0 + rows, ny)


def _load(arrays: list[np.ndarray], use: np.ndarray, r0: int, r1: int, dtype) -> np.ndarray:
    """Rows r0:r1 of the inputs flagged in ``use`` as an (n_inputs, pixels) array."""
    n = len(arrays)
    nx = arrays[0].shape[1]
    out = np.zeros((n, (r1 - r0) * nx), dtype=dtype)
    for i in range(n):
        if use[i]:
            out[i] = arrays[i][r0:r1].ravel()
    return out


def _sum0(a: np.ndarray) -> np.ndarray:
    """Floating-point sum over inputs (axis 0) in a fixed order, so that every pixel's result
    is independent of how many pixels are processed together (numpy's pairwise sums are not)."""
    acc = a[0].copy()
    for i in range(1, a.shape[0]):
        acc += a[i]
    return acc


def _count0(a: np.ndarray) -> np.ndarray:
    """Number of True values over inputs (axis 0) of a boolean array (exact in any order)."""
    acc = a[0].astype(np.uint16)
    for i in range(1, a.shape[0]):
        acc += a[i]
    return acc.astype(np.int64)


def _first_index(eq: np.ndarray) -> np.ndarray:
    """Index of the first True over axis 0 of a boolean array with a True in every column
    (numpy's argmax along axis 0 is strided and several times slower)."""
    n = eq.shape[0]
    dtype = np.uint8 if n < 256 else np.uint16
    rank = (n - np.arange(n)).astype(dtype)[:, None]
    return n - (eq.view(np.uint8).astype(dtype, copy=False) * rank).max(axis=0).astype(np.intp)


def _argmax0(a: np.ndarray) -> np.ndarray:
    """First index of the maximum over axis 0 (as ``np.argmax(a, axis=0)``, NaN-free input)."""
    return _first_index(a == a.max(axis=0))


def _argmin0(a: np.ndarray) -> np.ndarray:
    """First index of the minimum over axis 0 (NaN-free input)."""
    return _first_index(a == a.min(axis=0))


def _usable(x: np.ndarray, v: np.ndarray, m: np.ndarray, use: np.ndarray, bad_bits: int):
    ok = (m & bad_bits) == 0
    ok &= v > 0                 # False for NaN
    ok &= v < np.inf
    ok &= np.isfinite(x)
    ok &= use[:, None]
    return ok


def _grow(raw: np.ndarray, grow: int) -> np.ndarray:
    """Dilate each input's rejection flags by a (2 grow + 1)^2 square (zero outside), by
    marking the neighbours of the (few) rejected pixels."""
    if grow <= 0 or not raw.any():
        return raw
    n_in, ny, nx = raw.shape
    ii, yy, xx = np.nonzero(raw)
    out = raw.copy()
    for dy in range(-grow, grow + 1):
        y = yy + dy
        oky = (y >= 0) & (y < ny)
        for dx in range(-grow, grow + 1):
            x = xx + dx
            ok = oky & (x >= 0) & (x < nx)
            out[ii[ok], y[ok], x[ok]] = True
    return out


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

def compute_input_weights(variances: ArrayStack, masks: ArrayStack, *,
                          bad_bits: int = maskbits.BAD, sample_step: int = 1) -> np.ndarray:
    """Per-input weights 1 / median variance of the usable pixels (ppStack WEIGHTS).

    Compute them once from the full images (or a regular subsample) and pass them to
    :func:`combine_images`, so that bands of rows combined separately use the same weights.

    Parameters
    ----------
    variances : sequence of ndarray or ndarray (n_inputs, ny, nx)
        Variance maps (image units squared).
    masks : sequence of ndarray or ndarray
        Mask bits of the inputs.
    bad_bits : int, optional
        Mask bits marking unusable pixels.
    sample_step : int, optional
        Use every ``sample_step``-th pixel in each direction (1 = all).

    Returns
    -------
    ndarray of float64, shape (n_inputs,)
        Weights (inverse image units squared); 0 for an input without usable pixels.
    """
    vars_ = _as_list(variances, "variances")
    msks = _as_list(masks, "masks")
    if len(vars_) != len(msks):
        raise ValueError(f"got {len(vars_)} variances and {len(msks)} masks")
    if int(sample_step) != sample_step or sample_step < 1:
        raise ValueError(f"sample_step must be a positive integer, got {sample_step!r}")
    out = np.zeros(len(vars_))
    for i, (v, m) in enumerate(zip(vars_, msks)):
        if v.shape != m.shape:
            raise ValueError(f"variances[{i}] has shape {v.shape}, masks[{i}] has {m.shape}")
        vs = v[::sample_step, ::sample_step]
        ms = m[::sample_step, ::sample_step]
        good = ((ms & bad_bits) == 0) & np.isfinite(vs) & (vs > 0)
        if good.any():
            out[i] = 1.0 / float(np.median(vs[good]))
    return out


def inputs_to_drop(n_rejected: np.ndarray, n_valid: np.ndarray, *,
                   max_reject_fraction: float = 0.1) -> tuple[int, ...]:
    """Inputs whose rejected fraction exceeds ``max_reject_fraction`` (IPP IMAGE.REJ).

    ``n_rejected`` and ``n_valid`` are per-input counts, summed over all bands of the image.
    """
    n_rejected = np.asarray(n_rejected)
    n_valid = np.asarray(n_valid)
    if n_rejected.shape != n_valid.shape:
        raise ValueError(f"n_rejected has shape {n_rejected.shape}, n_valid has {n_valid.shape}")
    frac = n_rejected / np.maximum(n_valid, 1)
    return tuple(int(i) for i in np.nonzero(frac > max_reject_fraction)[0])


# --------------------------------------------------------------------------------------------
# Rejection
# --------------------------------------------------------------------------------------------

def _trimmed_mean(x: np.ndarray, valid: np.ndarray, w: np.ndarray, discard: float) -> np.ndarray:
    """Weighted Olympic mean of the valid values of each column (pmStack's weighted Olympic):
    of ``n`` values, ``k = floor(discard n + 0.5)`` are discarded, ``floor(k/2)`` lowest and
    the rest highest. The extremes are removed one at a time (ties: the first input), which
    for the few values discarded is cheaper than sorting."""
    n = _count0(valid)
    nbad = np.floor(discard * n + 0.5).astype(np.int64)
    n_low = nbad // 2
    n_high = nbad - n_low
    keep = valid.copy()
    for k in range(int(n_low.max(initial=0))):
        sel = np.nonzero(n_low > k)[0]
        lo = _argmin0(np.where(keep, x, np.inf))
        keep[lo[sel], sel] = False
    for k in range(int(n_high.max(initial=0))):
        sel = np.nonzero(n_high > k)[0]
        hi = _argmax0(np.where(keep, x, -np.inf))
        keep[hi[sel], sel] = False
    wk = keep * w[:, None]
    return _sum0(wk * x) / _sum0(wk)


def _reject_chunk(x, v, valid, w, *, rej2, sys_error, discard, iters, safe):
    """Per-pixel rejection on an (n_inputs, pixels) chunk; returns the rejected flags."""
    n_in, npix = x.shape
    sys2 = sys_error * sys_error
    valid = valid.copy()
    rejected = np.zeros_like(valid)
    n0 = _count0(valid)
    max_iter = np.maximum(np.floor(iters * n0).astype(np.int64), 1)
    used = np.zeros(npix, dtype=np.int64)
    active = np.nonzero(n0 >= 2)[0]
    while active.size:
        whole = active.size == npix  # first round: avoid copying the chunk
        va = valid if whole else valid[:, active]
        n = _count0(va)
        next_active = []
        many = n >= 3
        if many.any():
            if whole and many.all():
                idx, xa, vv, va_ = active, x, va, v
            else:
                idx = active[many]
                xa, vv, va_ = x[:, idx], va[:, many], v[:, idx]
            ref = _trimmed_mean(xa, vv, w, discard)
            # limit: noise of each input plus the systematic error of the reference level
            lim = va_ + sys2 * ref * ref
            lim *= rej2
            dev = xa - ref
            dev *= dev
            dev /= lim
            np.copyto(dev, -1.0, where=~vv)
            worst = _argmax0(dev)
            hit = dev[worst, np.arange(idx.size)] > 1.0
            valid[worst[hit], idx[hit]] = False
            rejected[worst[hit], idx[hit]] = True
            used[idx] += 1
            cont = hit & (used[idx] < max_iter[idx]) & (n[many] - hit >= 2)
            next_active.append(idx[cont])
        pair = n == 2
        if pair.any():
            idx = active[pair]
            vv = va[:, pair]
            first = np.argmax(vv, axis=0)
            second = n_in - 1 - np.argmax(vv[::-1], axis=0)
            x0, x1 = x[first, idx], x[second, idx]
            mean = 0.5 * (x0 + x1)
            tol = rej2 * (v[first, idx] + v[second, idx] + 2 * sys2 * mean * mean)
            bad = ((x0 - x1) ** 2 > tol) & safe
            for which in (first, second):
                valid[which[bad], idx[bad]] = False
                rejected[which[bad], idx[bad]] = True
            used[idx] += 1
        active = np.concatenate(next_active) if next_active else np.zeros(0, dtype=np.int64)
        active.sort()
    return rejected


def reject_outliers(images: ArrayStack, variances: ArrayStack, masks: ArrayStack, *,
                    weights: Optional[np.ndarray] = None, reject_sigma: float = 3.5,
                    sys_error: float = 0.1, discard_fraction: float = 0.2,
                    iterations_per_input: float = 0.5, grow: int = 1, safe: bool = True,
                    exclude: Sequence[int] = (), halo: tuple[int, int] = (0, 0),
                    bad_bits: int = maskbits.BAD) -> RejectionResult:
    """Per-pixel outlier rejection across inputs, grown by ``grow`` pixels (pmStackCombine).

    Parameters
    ----------
    images, variances, masks : sequence of ndarray or ndarray (n_inputs, ny, nx)
        Inputs on a common grid: image (any flux unit), variance (unit squared), mask bits.
    weights : ndarray, shape (n_inputs,), optional
        Per-input weights for the trimmed-mean reference (default: equal); inputs with
        weight 0 take no part.
    reject_sigma : float, optional
        Rejection threshold (sigma; IPP COMBINE.REJ 3.5, 3.0 for deep medium-deep stacks).
    sys_error : float, optional
        Relative systematic error added in quadrature to each pixel's noise (COMBINE.SYS).
    discard_fraction : float, optional
        Fraction of values discarded by the trimmed-mean reference (COMBINE.DISCARD).
    iterations_per_input : float, optional
        Rejections allowed per pixel, per input present there (COMBINE.ITER), at least one.
    grow : int, optional
        Rejected pixels are grown by this many pixels (a square).
    safe : bool, optional
        Reject both of two inputs that disagree (IPP SAFE).
    exclude : sequence of int, optional
        Inputs to leave out entirely (e.g. dropped ones).
    halo : tuple of int, optional
        ``(top, bottom)`` rows at the start and end of the arrays that only provide growth
        context (at least ``grow`` rows where a neighbouring band exists); results cover the
        rows in between.
    bad_bits : int, optional
        Mask bits marking unusable input pixels.

    Returns
    -------
    RejectionResult
        Grown rejection flags and per-input counts for the interior rows.
    """
    imgs, vars_, msks, (ny, nx) = _check_inputs(images, variances, masks)
    n_in = len(imgs)
    w = _check_weights(weights, n_in)
    _check_options(reject_sigma, grow, 0.0, sys_error, discard_fraction, iterations_per_input)
    top, bottom = _check_halo(halo, ny, grow)
    use = w > 0
    for i in exclude:
        if not 0 <= int(i) < n_in:
            raise ValueError(f"exclude holds input {i}, but there are {n_in} inputs")
        use[int(i)] = False
    excl = tuple(sorted(set(int(i) for i in np.nonzero(~use)[0])))
    bad_bits = int(bad_bits) & 0xFFFF

    # weights only matter relative to each other: scale them to at most 1 for float32 sums
    wn = (w / w[use].max() if use.any() else w).astype(np.float32)
    raw = np.zeros((n_in, ny, nx), dtype=bool)
    valid_all = np.zeros((n_in, ny, nx), dtype=bool)
    for r0, r1 in _chunks(ny, nx, n_in):
        x = _load(imgs, use, r0, r1, np.float32)
        v = _load(vars_, use, r0, r1, np.float32)
        m = _load(msks, use, r0, r1, np.uint16)
        valid = _usable(x, v, m, use, bad_bits)
        x[~valid] = 0.0
        v[~valid] = 1.0
        rej = _reject_chunk(x, v, valid, wn, rej2=float(reject_sigma) ** 2,
                            sys_error=float(sys_error), discard=float(discard_fraction),
                            iters=float(iterations_per_input), safe=bool(safe))
        raw[:, r0:r1] = rej.reshape(n_in, r1 - r0, nx)
        valid_all[:, r0:r1] = valid.reshape(n_in, r1 - r0, nx)

    raw = _grow(raw, int(grow))
    inner = slice(top, ny - bottom)
    rejected = raw[:, inner]
    rejected &= valid_all[:, inner]
    n_valid = np.count_nonzero(valid_all[:, inner].reshape(n_in, -1), axis=1)
    n_rejected = np.count_nonzero(rejected.reshape(n_in, -1), axis=1)
    return RejectionResult(rejected=rejected, n_rejected=n_rejected.astype(np.int64),
                           n_valid=n_valid.astype(np.int64), excluded=excl)


# --------------------------------------------------------------------------------------------
# Combination
# --------------------------------------------------------------------------------------------

def combine_images(images: ArrayStack, variances: ArrayStack, masks: ArrayStack, *,
                   weights: Optional[np.ndarray] = None, exptimes: Optional[np.ndarray] = None,
                   reject_sigma: float = 3.5, grow: int = 1, max_reject_fraction: float = 0.1,
                   sys_error: float = 0.1, discard_fraction: float = 0.2,
                   iterations_per_input: float = 0.5, safe: bool = True,
                   dropped: Optional[Sequence[int]] = None,
                   rejection: Optional[RejectionResult] = None,
                   halo: tuple[int, int] = (0, 0),
                   bad_bits: int = maskbits.BAD) -> CombineResult:
    """Weighted-mean stack of warps with outlier rejection (ppStack).

    Parameters
    ----------
    images, variances, masks : sequence of ndarray or ndarray (n_inputs, ny, nx)
        Inputs on the same grid: image (flux units, scaled to a common zero point), variance
        (flux units squared), mask bits (``maskbits``).
    weights : ndarray, shape (n_inputs,), optional
        One weight per input (ppStack: :func:`compute_input_weights`, 1 / median variance).
        Default: equal weights. Not computed here, so that bands agree with the whole.
    exptimes : ndarray, shape (n_inputs,), optional
        Exposure times (seconds) for the exposure-time map.
    reject_sigma : float, optional
        Outlier threshold (sigma; IPP COMBINE.REJ 3.5).
    grow : int, optional
        Growth of rejected pixels (pixels).
    max_reject_fraction : float, optional
        Inputs with more than this fraction of their usable pixels rejected are dropped and
        the combination redone (IPP IMAGE.REJ 0.1). Ignored when ``dropped`` is given.
    sys_error, discard_fraction, iterations_per_input, safe
        Rejection options, see :func:`reject_outliers` (IPP COMBINE.SYS 0.1, COMBINE.DISCARD
        0.2, COMBINE.ITER 0.5, SAFE true). With ``safe``, pixels where a single input is
        left are masked.
    dropped : sequence of int, optional
        Inputs to drop, decided beforehand over the whole image (:func:`inputs_to_drop` on
        counts summed over bands). ``None``: decide from these arrays.
    rejection : RejectionResult, optional
        A rejection already computed on these arrays with the same options and ``halo``, reused
        when it excluded exactly the inputs now left out.
    halo : tuple of int, optional
        ``(top, bottom)`` context rows for the growth of rejections; outputs cover the rows in
        between.
    bad_bits : int, optional
        Mask bits marking unusable input pixels.

    Returns
    -------
    CombineResult
        Stack image, variance, mask, input count map, exposure-time map, per-input rejection
        masks, dropped inputs and first-pass rejected fractions.
    """
    imgs, vars_, msks, (ny, nx) = _check_inputs(images, variances, masks)
    n_in = len(imgs)
    w = _check_weights(weights, n_in)
    _check_options(reject_sigma, grow, max_reject_fraction, sys_error, discard_fraction,
                   iterations_per_input)
    top, bottom = _check_halo(halo, ny, grow)
    if exptimes is not None:
        exptimes = np.asarray(exptimes, dtype=np.float64)
        if exptimes.shape != (n_in,) or not np.all(np.isfinite(exptimes)):
            raise ValueError(f"exptimes must hold one finite value per input ({n_in}), "
                             f"got {exptimes!r}")
    bad_bits = int(bad_bits) & 0xFFFF
    opts = dict(weights=w, reject_sigma=reject_sigma, sys_error=sys_error,
                discard_fraction=discard_fraction, iterations_per_input=iterations_per_input,
                grow=grow, safe=safe, halo=(top, bottom), bad_bits=bad_bits)
    zero_weight = tuple(int(i) for i in np.nonzero(w <= 0)[0])

    if dropped is None:
        if rejection is not None and rejection.excluded == zero_weight:
            first = rejection
        else:
            first = reject_outliers(imgs, vars_, msks, **opts)
        drop = inputs_to_drop(first.n_rejected, first.n_valid,
                              max_reject_fraction=max_reject_fraction)
    else:
        drop = tuple(sorted(set(int(i) for i in dropped)))
        for i in drop:
            if not 0 <= i < n_in:
                raise ValueError(f"dropped holds input {i}, but there are {n_in} inputs")
        first = None
        if rejection is not None:
            first = rejection
    excluded = tuple(sorted(set(drop) | set(zero_weight)))
    if first is not None and first.excluded == excluded:
        final = first
    else:
        final = reject_outliers(imgs, vars_, msks, exclude=drop, **opts)
    if first is None:
        first = final
    if final.rejected.shape != (n_in, ny - top - bottom, nx):
        raise ValueError(f"rejection covers shape {final.rejected.shape[1:]}, expected "
                         f"{(ny - top - bottom, nx)}")

    use = np.ones(n_in, dtype=bool)
    use[list(excluded)] = False
    nyi = ny - top - bottom
    out_img = np.zeros((nyi, nx), dtype=np.float32)
    out_var = np.zeros((nyi, nx), dtype=np.float32)
    out_msk = np.zeros((nyi, nx), dtype=np.uint16)
    out_n = np.zeros((nyi, nx), dtype=np.uint16)
    out_exp = np.zeros((nyi, nx), dtype=np.float32) if exptimes is not None else None
    inner_imgs = [a[top:ny - bottom] for a in imgs]
    inner_vars = [a[top:ny - bottom] for a in vars_]
    inner_msks = [a[top:ny - bottom] for a in msks]
    advisory_bits = [b for b in range(16) if not (1 << b) & bad_bits
                     and (1 << b) != maskbits.REJECTED]
    for r0, r1 in _chunks(nyi, nx, n_in):
        x = _load(inner_imgs, use, r0, r1, np.float32)
        v = _load(inner_vars, use, r0, r1, np.float32)
        m = _load(inner_msks, use, r0, r1, np.uint16)
        ok = _usable(x, v, m, use, bad_bits)
        rej = final.rejected[:, r0:r1].reshape(n_in, -1)
        ok &= ~rej
        x[~ok] = 0.0
        v[~ok] = 0.0
        npx = x.shape[1]
        sw = np.zeros(npx)
        sx = np.zeros(npx)
        sv = np.zeros(npx)
        for i in range(n_in):  # fixed order: bands give the same bits as the whole
            if use[i]:
                sw += np.where(ok[i], w[i], 0.0)
                sx += w[i] * x[i]
                sv += (w[i] * w[i]) * v[i]
        n = _count0(ok)
        good = n >= (2 if safe else 1)
        sw_safe = np.where(good, sw, 1.0)
        img = np.where(good, sx / sw_safe, 0.0)
        var = np.where(good, sv / (sw_safe * sw_safe), 0.0)
        any_rej = rej.any(axis=0)
        badbits = np.zeros(n.shape, dtype=np.uint16)
        present = np.uint16(0)
        for i in range(n_in):
            if use[i]:
                badbits |= m[i] & np.uint16(bad_bits)
                present |= np.bitwise_or.reduce(m[i]) if m[i].size else np.uint16(0)
        blank = np.where(badbits == 0, np.uint16(maskbits.GAP), badbits)
        adv = np.zeros(n.shape, dtype=np.uint16)
        for b in advisory_bits:
            if not (int(present) >> b) & 1:
                continue
            count = _count0(ok & ((m >> b) & 1).astype(bool))
            adv |= np.where(count > _ADVISORY_FRACTION * n, np.uint16(1 << b), np.uint16(0))
        mask = np.where(good, adv, blank) | np.where(any_rej, np.uint16(maskbits.REJECTED),
                                                     np.uint16(0))
        rows = slice(r0, r1)
        out_img[rows] = img.reshape(r1 - r0, nx)
        out_var[rows] = var.reshape(r1 - r0, nx)
        out_msk[rows] = mask.reshape(r1 - r0, nx)
        out_n[rows] = np.where(good, n, 0).reshape(r1 - r0, nx)
        if out_exp is not None:
            et = _sum0(np.where(ok, exptimes[:, None], 0.0))
            out_exp[rows] = np.where(good, et, 0.0).reshape(r1 - r0, nx)

    return CombineResult(image=out_img, variance=out_var, mask=out_msk, n_inputs=out_n,
                         exptime_map=out_exp, rejected_mask=final.rejected,
                         dropped_inputs=drop, reject_fraction=first.reject_fraction)
