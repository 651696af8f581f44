"""Non-PSF source measurements: centroids, second moments, Kron, apertures, Petrosian.

Everything works on stamps cut around many sources at once (arrays of shape
``(nsources, size, size)``), in chunks that bound the memory, with no loop over pixels.
Images are sky-subtracted float arrays indexed ``[y, x]``; the centre of pixel ``[j, i]`` is
at ``(x, y) = (i, j)``. Fluxes are in image units (ADU), variances in ADU^2, lengths in
pixels. Pixels with any of ``mask_bits`` set in the ``uint16`` mask, or with a non-finite value
or variance, are ignored; pixels outside the image count as masked.

The choices follow psphot (IPP):

- Centroid and second moments use a circular Gaussian window of the PSF sigma within a
  radius of 4 sigma (``PSF_MOMENTS_RADIUS``). The reported ``MOMENTS_XX/XY/YY`` are the
  windowed moments, as in psphot; :func:`deconvolve_window` recovers the unweighted ones
  for a Gaussian source. The centroid is iterated to the fixed point of the windowed first
  moment, with the Gaussian correction that makes each step exact for a Gaussian source.
- The first radial moment ``MOMENTS_R1`` is measured on the image smoothed by a Gaussian of
  sigma 1.7 pixels (``KRON_SMOOTH_SIGMA``, kernel cut at 2 sigma), from point-symmetric pixel
  pairs ``R1 = sum r sqrt(f(r) f(-r)) / sum (f(r) + f(-r)) / 2``, in two iterations
  (``KRON_ITERATIONS``): the second window is ``6 R1`` bounded by a surface-brightness limit
  (``KRON_SB_MIN_FACTOR``). The Kron flux is the flux within ``2.5 R1``.
- Aperture fluxes use the exact area of overlap of the circle with every pixel.
- The Petrosian radius is where the surface brightness in an annulus falls to
  ``PETROSIAN_FLUX_RATIO`` (0.1) of the mean surface brightness inside it; the Petrosian flux
  is the flux within 2 Petrosian radii (``PETROSIAN_RADII``), with R50 and R90.
- Radial apertures for stack photometry have the IPP edges 4.16 ... 176.88 pixels.

Implementation. With numba (a project dependency) every measurement is a compiled loop over
the sources that reads the pixels of each source's window straight from the image (no
stamp arrays); the pixels are visited and summed as in the numpy path, which is used when
numba is absent and gives the same results to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np
from scipy import ndimage as ndi

from . import maskbits

try:  # numba is a dependency; the numpy path computes the same result without it
    import numba

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None
    _HAVE_NUMBA = False

__all__ = [
    "RADIAL_APERTURE_RADII",
    "ApertureResult",
    "MOMENTS_DTYPE",
    "KRON_DTYPE",
    "PETROSIAN_DTYPE",
    "MOMENTS_FAILED",
    "MOMENTS_FEW_PIXELS",
    "MOMENTS_CENTROID_SHIFT",
    "KRON_FAILED",
    "PETRO_INSIGNIFICANT",
    "PETRO_NO_PROFILE",
    "circle_pixel_overlap",
    "aperture_photometry",
    "radial_apertures",
    "centroid_moments",
    "deconvolve_window",
    "kron_photometry",
    "petrosian",
    "measure_sources",
]

#: IPP radial aperture outer edges (pixels), ``RADIAL.ANNULAR.BINS.UPPER`` (PV2 and later).
RADIAL_APERTURE_RADII = np.array([4.16, 7.04, 12.0, 18.56, 29.76, 45.68, 72.8, 112.8, 176.88])

# flag bits (``FLAGS`` columns)
MOMENTS_FAILED = 0x01          #: no valid moments (non-positive windowed sum)
MOMENTS_FEW_PIXELS = 0x02      #: fewer than a quarter of the window pixels usable
MOMENTS_CENTROID_SHIFT = 0x04  #: centroid moved beyond the window; input position kept
KRON_FAILED = 0x08             #: first radial moment not measurable (non-positive sums)
PETRO_INSIGNIFICANT = 0x10     #: ratio never fell significantly below the Petrosian ratio
PETRO_NO_PROFILE = 0x20        #: no usable radial profile

_HALF_DIAG = np.sqrt(0.5)
_MAX_CHUNK_PIXELS = 4_000_000

MOMENTS_DTYPE = np.dtype([
    ("X_MOMENTS", "f8"), ("Y_MOMENTS", "f8"),
    ("X_MOMENTS_ERR", "f4"), ("Y_MOMENTS_ERR", "f4"),
    ("MOMENTS_XX", "f4"), ("MOMENTS_XY", "f4"), ("MOMENTS_YY", "f4"),
    ("MOMENTS_SUM", "f4"), ("MOMENTS_SN", "f4"), ("MOMENTS_NPIX", "i4"),
    ("MOMENTS_FLAGS", "u2"),
])

KRON_DTYPE = np.dtype([
    ("MOMENTS_R1", "f4"), ("KRON_RADIUS", "f4"),
    ("KRON_FLUX", "f4"), ("KRON_FLUX_ERR", "f4"), ("KRON_MASKED_FRAC", "f4"),
    ("KRON_FLUX_INNER", "f4"),
    ("KRON_FLAGS", "u2"),
])

PETROSIAN_DTYPE = np.dtype([
    ("PETRO_RADIUS", "f4"), ("PETRO_RADIUS_ERR", "f4"),
    ("PETRO_FLUX", "f4"), ("PETRO_FLUX_ERR", "f4"),
    ("PETRO_R50", "f4"), ("PETRO_R90", "f4"), ("PETRO_FILL", "f4"),
    ("PETRO_FLAGS", "u2"),
])


# ----------------------------------------------------------------------------------------
# input checks and stamps


def _check_inputs(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None,
                  x: np.ndarray, y: np.ndarray, func: str):
    image = np.asarray(image)
    variance = np.asarray(variance)
    if image.ndim != 2:
        raise ValueError(f"{func}: image must be 2-D, got shape {image.shape}")
    if variance.shape != image.shape:
        raise ValueError(f"{func}: variance shape {variance.shape} differs from image shape "
                         f"{image.shape}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise ValueError(f"{func}: mask shape {mask.shape} differs from image shape "
                             f"{image.shape}")
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"{func}: x and y must be 1-D arrays of equal length, got shapes "
                         f"{x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"{func}: x and y must be finite")
    return image, variance, mask, x, y


def _gather(image: np.ndarray, variance: np.ndarray | None, mask: np.ndarray | None,
            xi: np.ndarray, yi: np.ndarray, half: int, mask_bits: int,
            dtype=np.float64):
    """Stamps of side ``2 half + 1`` centred on integer pixels ``(xi, yi)``.

    Returns ``(f, v, ok)`` of shape (n, s, s): values (0 where unusable), variances (0 where
    unusable; None if ``variance`` is None) and the usable-pixel flags (False outside the
    image).
    """
    ny, nx = image.shape
    itype = np.int32 if ny * nx < 2 ** 31 else np.int64
    off = np.arange(-half, half + 1, dtype=itype)
    iy = yi.astype(itype)[:, None] + off[None, :]
    ix = xi.astype(itype)[:, None] + off[None, :]
    inside = (((iy >= 0) & (iy < ny))[:, :, None] & ((ix >= 0) & (ix < nx))[:, None, :])
    flat = (np.clip(iy, 0, ny - 1) * itype(nx))[:, :, None] + np.clip(ix, 0, nx - 1)[:, None, :]
    f = np.take(image.reshape(-1), flat).astype(dtype, copy=False)
    ok = inside & np.isfinite(f)
    v = None
    if variance is not None:
        v = np.take(variance.reshape(-1), flat).astype(dtype, copy=False)
        ok &= np.isfinite(v) & (v >= 0)
    if mask is not None:
        ok &= (np.take(mask.reshape(-1), flat) & mask_bits) == 0
    if not ok.all():
        bad = ~ok
        f[bad] = 0.0
        if v is not None:
            v[bad] = 0.0
    return f, v, ok


def _chunks(n: int, size: int):
    step = max(1, _MAX_CHUNK_PIXELS // (size * size))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


_LADDER_STEPS = np.concatenate([np.arange(2, 33, 2),
                                [40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384,
                                 448, 512]]).astype(np.int64)


def _ladder(half: np.ndarray) -> np.ndarray:
    """Round stamp half-sizes up to a coarse ladder so sources can be batched."""
    half = np.maximum(np.ceil(half).astype(np.int64), 1)
    steps = _LADDER_STEPS
    idx = np.searchsorted(steps, half)
    out = np.where(idx < steps.size, steps[np.minimum(idx, steps.size - 1)], half)
    return out


def _groups(half: np.ndarray):
    """Yield ``(indices, half)`` for batches of sources with a common stamp half-size."""
    lad = _ladder(half)
    for h in np.unique(lad):
        yield np.flatnonzero(lad == h), int(h)


# ----------------------------------------------------------------------------------------
# exact circle / pixel overlap


def _quadrant_area(x: np.ndarray, y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed area of the disc of radius r with the rectangle between (0, 0) and (x, y)."""
    sx = np.sign(x)
    sy = np.sign(y)
    xa = np.minimum(np.abs(x), r)
    ya = np.minimum(np.abs(y), r)
    inside = xa * xa + ya * ya <= r * r
    t = np.sqrt(np.maximum(r * r - ya * ya, 0.0))
    t = np.minimum(t, xa)

    def prim(u):
        return 0.5 * (u * np.sqrt(np.maximum(r * r - u * u, 0.0))
                      + r * r * np.arcsin(np.clip(u / np.where(r > 0, r, 1.0), -1.0, 1.0)))

    area = np.where(inside, xa * ya, ya * t + prim(xa) - prim(t))
    return sx * sy * area


def circle_pixel_overlap(dx: np.ndarray, dy: np.ndarray, r: np.ndarray | float) -> np.ndarray:
    """Exact area of overlap of a disc with unit pixels.

    Parameters
    ----------
    dx, dy : array_like
        Offsets of the pixel centres from the centre of the disc (pixels).
    r : array_like or float
        Radius of the disc (pixels), broadcast against ``dx``.

    Returns
    -------
    ndarray
        Overlap area of each pixel, between 0 and 1 (pixel^2).
    """
    dx = np.asarray(dx, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    r = np.broadcast_to(np.asarray(r, dtype=np.float64), np.broadcast(dx, dy).shape)
    if _HAVE_NUMBA:  # one fused pass: the numpy form below makes ~40 temporaries per pixel
        return _circle_pixel_overlap_ufunc(dx, dy, r)
    return _circle_pixel_overlap_np(dx, dy, r)


def _circle_pixel_overlap_np(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    x0, x1 = dx - 0.5, dx + 0.5
    y0, y1 = dy - 0.5, dy + 0.5
    area = (_quadrant_area(x1, y1, r) - _quadrant_area(x0, y1, r)
            - _quadrant_area(x1, y0, r) + _quadrant_area(x0, y0, r))
    return np.clip(area, 0.0, 1.0)


if _HAVE_NUMBA:
    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def _quadrant_area_scalar(x, y, r):  # pragma: no cover - compiled
        """:func:`_quadrant_area` of one point."""
        sgn = (1.0 if x > 0 else (-1.0 if x < 0 else 0.0)) * \
            (1.0 if y > 0 else (-1.0 if y < 0 else 0.0))
        xa = min(abs(x), r)
        ya = min(abs(y), r)
        r2 = r * r
        if xa * xa + ya * ya <= r2:
            return sgn * xa * ya
        t = min(math.sqrt(max(r2 - ya * ya, 0.0)), xa)
        rr = r if r > 0 else 1.0
        pa = 0.5 * (xa * math.sqrt(max(r2 - xa * xa, 0.0))
                    + r2 * math.asin(min(max(xa / rr, -1.0), 1.0)))
        pt = 0.5 * (t * math.sqrt(max(r2 - t * t, 0.0))
                    + r2 * math.asin(min(max(t / rr, -1.0), 1.0)))
        return sgn * (ya * t + pa - pt)

    @numba.vectorize(["float64(float64, float64, float64)"], cache=True)
    def _circle_pixel_overlap_ufunc(dx, dy, r):  # pragma: no cover - compiled
        """:func:`circle_pixel_overlap` of one pixel."""
        x0, x1 = dx - 0.5, dx + 0.5
        y0, y1 = dy - 0.5, dy + 0.5
        a = (_quadrant_area_scalar(x1, y1, r) - _quadrant_area_scalar(x0, y1, r)
             - _quadrant_area_scalar(x1, y0, r) + _quadrant_area_scalar(x0, y0, r))
        return min(max(a, 0.0), 1.0)


def _corner_terms(x: np.ndarray, y: np.ndarray, r: np.ndarray):
    """Signed area and first moments of the disc within the rectangle (0, 0)-(x, y)."""
    sx = np.sign(x)
    sy = np.sign(y)
    xa = np.minimum(np.abs(x), r)
    ya = np.minimum(np.abs(y), r)
    r2 = r * r
    inside = xa * xa + ya * ya <= r2
    sxa = np.sqrt(np.maximum(r2 - xa * xa, 0.0))       # chord height at u = xa
    sya = np.sqrt(np.maximum(r2 - ya * ya, 0.0))       # abscissa where the circle meets ya
    rr = np.where(r > 0, r, 1.0)
    asx = np.arcsin(np.clip(xa / rr, -1.0, 1.0))
    asy = np.arcsin(np.clip(sya / rr, -1.0, 1.0))
    # outside case: the circle cuts the rectangle; t = sya < xa
    area_out = ya * sya + 0.5 * (xa * sxa + r2 * asx) - 0.5 * (sya * ya + r2 * asy)
    mx_out = ya * sya * sya / 2.0 + (ya ** 3 - sxa ** 3) / 3.0
    my_out = xa * sxa * sxa / 2.0 + (xa ** 3 - sya ** 3) / 3.0
    area = np.where(inside, xa * ya, area_out)
    mx = np.where(inside, ya * xa * xa / 2.0, mx_out)
    my = np.where(inside, xa * ya * ya / 2.0, my_out)
    return sx * sy * area, sy * mx, sx * my


def _overlap_moments(dx: np.ndarray, dy: np.ndarray, r: np.ndarray):
    """Overlap area and its first moments about the pixel centre, for unit pixels."""
    a = np.zeros(dx.shape)
    mx = np.zeros(dx.shape)
    my = np.zeros(dx.shape)
    for cx, cy, sgn in ((0.5, 0.5, 1.0), (-0.5, 0.5, -1.0), (0.5, -0.5, -1.0),
                        (-0.5, -0.5, 1.0)):
        ca, cmx, cmy = _corner_terms(dx + cx, dy + cy, r)
        a += sgn * ca
        mx += sgn * cmx
        my += sgn * cmy
    return a, mx - a * dx, my - a * dy


def _pixel_gradients(f: np.ndarray, ok: np.ndarray, flat: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Central-difference gradients of stamps at flat indices ``flat`` (zero where a
    neighbour is unusable or outside the stamp)."""
    n, s, _ = f.shape
    ff = f.reshape(-1)
    okf = ok.reshape(-1)
    col = flat % s
    row = (flat // s) % s
    gx = np.zeros(flat.size)
    gy = np.zeros(flat.size)
    inx = (col > 0) & (col < s - 1)
    i = flat[inx]
    both = okf[i - 1] & okf[i + 1]
    gx[inx] = np.where(both, 0.5 * (ff[i + 1] - ff[i - 1]), 0.0)
    iny = (row > 0) & (row < s - 1)
    i = flat[iny]
    both = okf[i - s] & okf[i + s]
    gy[iny] = np.where(both, 0.5 * (ff[i + s] - ff[i - s]), 0.0)
    return gx, gy


# ----------------------------------------------------------------------------------------
# compiled kernels (numba): per-source loops over the pixels of a stamp, read from the image


def _kernel_image(a: np.ndarray) -> np.ndarray:
    """A C-contiguous float array for the kernels (no copy for float32/float64 inputs)."""
    a = np.asarray(a)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    return np.ascontiguousarray(a)


def _kernel_mask(mask: np.ndarray | None, mask_bits: int):
    """``(mask, use_mask, bits)`` for the kernels: the uint16 mask itself, or the flags
    of the excluding bits for other integer types."""
    if mask is None:
        return np.zeros((1, 1), np.uint16), False, np.uint16(0)
    mask = np.asarray(mask)
    if mask.dtype == np.uint16:
        return np.ascontiguousarray(mask), True, np.uint16(mask_bits & 0xFFFF)
    return ((mask & mask_bits) != 0).astype(np.uint16), True, np.uint16(1)


if _HAVE_NUMBA:
    _JIT = dict(cache=True, nogil=True, boundscheck=False, error_model="numpy")

    @numba.njit(**_JIT)
    def _gather_nb(image, variance, use_var, mask, use_mask, bits, xc, yc, h, f, v,
                   ok):  # pragma: no cover - compiled
        """Stamp of side ``2h + 1`` centred on pixel ``(xc, yc)`` into the top-left corner
        of ``f`` (values, 0 where unusable), ``ok`` (usable: inside the image, finite in the
        dtype of ``f``, unmasked, and with a finite non-negative variance when ``use_var``)
        and, when ``use_var``, ``v`` (variances, 0 where unusable; untouched otherwise).
        """
        ny, nx = image.shape
        s = 2 * h + 1
        i0 = xc - h
        b0 = min(max(0, -i0), s)
        b1 = max(min(s, nx - i0), b0)
        for a in range(s):
            j = yc - h + a
            fr = f[a]
            okr = ok[a]
            inside = 0 <= j < ny
            lo = b0 if inside else s
            hi = b1 if inside else s
            for b in range(lo):
                fr[b] = 0.0
                okr[b] = False
            for b in range(hi, s):
                fr[b] = 0.0
                okr[b] = False
            if use_var:
                vr = v[a]
                for b in range(lo):
                    vr[b] = 0.0
                for b in range(hi, s):
                    vr[b] = 0.0
            if not inside:
                continue
            irow = image[j, i0 + b0:i0 + b1]
            fo = fr[b0:b1]
            oo = okr[b0:b1]
            for b in range(irow.size):
                fo[b] = irow[b]
                oo[b] = np.isfinite(fo[b])
            if use_mask:
                mrow = mask[j, i0 + b0:i0 + b1]
                for b in range(irow.size):
                    oo[b] &= (mrow[b] & bits) == 0
            if use_var:
                vo = v[a, b0:b1]
                vrow = variance[j, i0 + b0:i0 + b1]
                for b in range(irow.size):
                    vo[b] = vrow[b]
                    oo[b] &= np.isfinite(vo[b]) & (vo[b] >= 0)
                for b in range(irow.size):
                    if not oo[b]:
                        vo[b] = 0.0
            for b in range(irow.size):
                if not oo[b]:
                    fo[b] = 0.0

    @numba.njit(**_JIT)
    def _gain_nb(m, sigma2):  # pragma: no cover - compiled
        """Scalar :func:`_window_gain`."""
        g = 1.0 / (1.0 - m / sigma2)
        if np.isnan(g):
            return 2.0
        return min(max(g, 1.0), 4.0)

    @numba.njit(**_JIT)
    def _window_weights(xi, yi, xc, yc, h, inv2s2, ex, ey, dxs, dys):  # pragma: no cover
        """Offsets of the stamp columns/rows from the centre and their Gaussian factors."""
        for b in range(2 * h + 1):
            dxs[b] = (xi + float(b - h)) - xc
            ex[b] = np.exp(-dxs[b] * dxs[b] * inv2s2)
            dys[b] = (yi + float(b - h)) - yc
            ey[b] = np.exp(-dys[b] * dys[b] * inv2s2)

    @numba.njit(**_JIT)
    def _centroid_iter_nb(image, variance, mask, use_mask, bits, xi, yi, half, x0, y0, n_iter,
                          r2max, inv2s2, sigma2, max_shift, xs, ys, moved, small
                          ):  # pragma: no cover - compiled
        """Centroid iterations of every source on its own: ``xs, ys`` (n, n_iter) receive
        the centroid after each iteration, ``moved`` whether it was reset to the start so
        far and ``small`` whether both steps of that iteration were below 1e-4 pixels."""
        s = 2 * half + 1
        f = np.empty((s, s), image.dtype)
        v = np.empty((s, s), variance.dtype)
        ok = np.empty((s, s), np.bool_)
        ex = np.empty(s)
        ey = np.empty(s)
        dxs = np.empty(s)
        dys = np.empty(s)
        for q in range(xi.size):
            _gather_nb(image, variance, True, mask, use_mask, bits, xi[q], yi[q], half, f, v,
                       ok)
            xc = x0[q]
            yc = y0[q]
            mv = False
            for it in range(n_iter):
                _window_weights(xi[q], yi[q], xc, yc, half, inv2s2, ex, ey, dxs, dys)
                sw = 0.0
                sx = 0.0
                sy = 0.0
                sxx = 0.0
                syy = 0.0
                for a in range(s):
                    dy = dys[a]
                    dy2 = dy * dy
                    if dy2 > r2max:
                        continue
                    fr = f[a]
                    for b in range(s):
                        dx = dxs[b]
                        if not dx * dx + dy2 <= r2max:
                            continue
                        wf = (ey[a] * ex[b]) * fr[b]
                        sw += wf
                        sx += wf * dx
                        sy += wf * dy
                        sxx += wf * dx * dx
                        syy += wf * dy2
                mx = sx / sw
                my = sy / sw
                mxx = sxx / sw - mx * mx
                myy = syy / sw - my * my
                stepx = mx * _gain_nb(mxx, sigma2) if (np.isfinite(mx) and sw > 0) else 0.0
                stepy = my * _gain_nb(myy, sigma2) if (np.isfinite(my) and sw > 0) else 0.0
                xc += min(max(stepx, -1.0), 1.0)
                yc += min(max(stepy, -1.0), 1.0)
                if np.hypot(xc - x0[q], yc - y0[q]) > max_shift:
                    mv = True
                    xc = x0[q]
                    yc = y0[q]
                xs[q, it] = xc
                ys[q, it] = yc
                moved[q, it] = mv
                small[q, it] = abs(stepx) < 1e-4 and abs(stepy) < 1e-4

    @numba.njit(**_JIT)
    def _centroid_final_nb(image, variance, mask, use_mask, bits, xi, yi, half, xc, yc, r2max,
                           inv2s2, sums):  # pragma: no cover - compiled
        """Windowed sums about the final centroids; ``sums[q]`` receives
        ``(S, sum w^2 V, npix, Sxx, Sxy, Syy, sum w^2 V dx^2, sum w^2 V dy^2, npossible)``."""
        s = 2 * half + 1
        f = np.empty((s, s), image.dtype)
        v = np.empty((s, s), variance.dtype)
        ok = np.empty((s, s), np.bool_)
        ex = np.empty(s)
        ey = np.empty(s)
        dxs = np.empty(s)
        dys = np.empty(s)
        for q in range(xi.size):
            _gather_nb(image, variance, True, mask, use_mask, bits, xi[q], yi[q], half, f, v,
                       ok)
            _window_weights(xi[q], yi[q], xc[q], yc[q], half, inv2s2, ex, ey, dxs, dys)
            acc = np.zeros(9)
            for a in range(s):
                dy = dys[a]
                for b in range(s):
                    dx = dxs[b]
                    if not dx * dx + dy * dy <= r2max:
                        continue
                    acc[8] += 1.0
                    if not ok[a, b]:
                        continue
                    w = ey[a] * ex[b]
                    wf = w * f[a, b]
                    w2v = w * w * v[a, b]
                    acc[0] += wf
                    acc[1] += w2v
                    acc[2] += 1.0
                    acc[3] += wf * dx * dx
                    acc[4] += wf * dx * dy
                    acc[5] += wf * dy * dy
                    acc[6] += w2v * dx * dx
                    acc[7] += w2v * dy * dy
            sums[q, :] = acc

    @numba.njit(**_JIT)
    def _ladder_nb(v, steps):  # pragma: no cover - compiled
        """Scalar :func:`_ladder`."""
        h = max(int(np.ceil(v)), 1)
        lo = 0
        hi = steps.size
        while lo < hi:
            mid = (lo + hi) // 2
            if steps[mid] < h:
                lo = mid + 1
            else:
                hi = mid
        return steps[lo] if lo < steps.size else h

    @numba.njit(**_JIT)
    def _r1_stamp(fr, okr, hs, h, margin, kern, xq, yq, xiq, yiq, kxq, kyq, win, f, okb,
                  okf, ty, td, fs, oks, dxs):  # pragma: no cover - compiled
        """First radial moment (see :func:`_radial_moment`) from the stamp ``fr, okr`` of
        half-size ``hs`` (values as float64, usable flags), in a window of ``win`` pixels,
        on the crop of half-size ``h`` smoothed by ``kern`` (``margin`` >= its half-width,
        so the crop never sees the border of the ``h + margin`` stamp). The other arrays
        are work space."""
        rk = (kern.size - 1) // 2
        f32 = np.float32
        zero = f32(0.0)
        hh = h + margin
        big = 2 * hh + 1
        s = 2 * h + 1
        o = hs - hh
        allok = True
        for a in range(big):
            src = fr[o + a, o:o + big]
            osrc = okr[o + a, o:o + big]
            fa = f[a, :big]
            oa = okb[a, :big]
            for b in range(big):
                fa[b] = src[b]
                oa[b] = osrc[b] and np.isfinite(fa[b])
                if not oa[b]:
                    fa[b] = zero
            for b in range(big):
                allok &= oa[b]
        if kern.size > 0:
            # separable Gaussian, rows then columns, on the crop only
            for a in range(s):
                tr = ty[a, :big]
                for b in range(big):
                    tr[b] = zero
                for t in range(2 * rk + 1):
                    kt = kern[t]
                    frow = f[a + margin - rk + t, :big]
                    for b in range(big):
                        tr[b] += kt * frow[b]
            for a in range(s):
                orow = fs[a, :s]
                for b in range(s):
                    orow[b] = zero
                for t in range(2 * rk + 1):
                    kt = kern[t]
                    tr = ty[a, margin - rk + t:margin - rk + t + s]
                    for b in range(s):
                        orow[b] += kt * tr[b]
            if allok:
                for a in range(s):
                    for b in range(s):
                        oks[a, b] = True
            else:
                # normalised convolution: divide by the smoothed usable-pixel weight
                for a in range(big):
                    for b in range(big):
                        okf[a, b] = 1.0 if okb[a, b] else 0.0
                for a in range(s):
                    tr = td[a, :big]
                    for b in range(big):
                        tr[b] = zero
                    for t in range(2 * rk + 1):
                        kt = kern[t]
                        orw = okf[a + margin - rk + t, :big]
                        for b in range(big):
                            tr[b] += kt * orw[b]
                for a in range(s):
                    for b in range(s):
                        den = zero
                        for t in range(2 * rk + 1):
                            den += kern[t] * td[a, b + margin - rk + t]
                        oks[a, b] = den >= f32(0.25)
                        fs[a, b] = fs[a, b] / den if oks[a, b] else zero
        else:
            for a in range(s):
                for b in range(s):
                    fs[a, b] = f[a + margin, b + margin]
                    oks[a, b] = okb[a + margin, b + margin]
        # mirror about the centroid rounded to half a pixel: [2h + ky - j, 2h + kx - i]
        rf = 0.0
        rs = 0.0
        for b in range(s):
            dxs[b] = f32((xiq - xq) + float(b - h))
        for a in range(s):
            dy = f32((yiq - yq) + float(a - h))
            am = 2 * h + kyq - a
            if am < 0 or am >= s:
                continue
            dy2 = dy * dy
            for b in range(s):
                bm = 2 * h + kxq - b
                if bm < 0 or bm >= s or not (oks[a, b] and oks[am, bm]):
                    continue
                r = np.sqrt(dxs[b] * dxs[b] + dy2)
                if not r <= win:
                    continue
                fv = fs[a, b]
                fm = fs[am, bm]
                prod = np.sqrt(abs(fv * fm))
                if fv < 0:
                    prod = -prod
                rf += r * prod
                rs += fv + fm
        rs *= 0.5
        val = rf / rs
        return val if (rf > 0 and rs > 0 and np.isfinite(val)) else np.nan

    @numba.njit(**_JIT)
    def _whole_pixel_sum(fr, hs, xq, yq, xiq, yiq, radius):  # pragma: no cover - compiled
        """Sum of the stamp values of the pixels whose centre is within ``radius`` (the
        ``exact=False`` aperture of :func:`_aperture_sums`, same order of summation)."""
        f32 = np.float32
        hw = int(np.ceil(radius + 1.0))
        r2 = f32(radius * radius)
        tot = 0.0
        for a in range(-hw, hw + 1):
            ay = f32(abs((yiq - yq) + float(a)))
            ayy = ay * ay
            if not ayy < r2:
                continue
            row = fr[hs + a]
            for b in range(-hw, hw + 1):
                ax = f32(abs((xiq - xq) + float(b)))
                if ayy + ax * ax < r2:
                    tot += row[hs + b]
        return tot

    @numba.njit(**_JIT)
    def _kron_r1_nb(image, mask, use_mask, bits, x, y, xi, yi, kx, ky, win, n_iter, radius0,
                    max_window, sb_min_factor, sky_sigma, min_radius, kron_factor, margin,
                    kern, steps, mrf, failed):  # pragma: no cover - compiled
        """The R1 iterations of :func:`kron_photometry` for every source on its own, from
        one stamp per source (gathered again only when a later window needs a larger one).
        ``win`` holds the first windows and receives the last; ``mrf`` receives R1 (NaN
        where it failed, flagged in ``failed``)."""
        cap = 1
        for q in range(x.size):
            cap = max(cap, _ladder_nb(win[q] + 2.0, steps) + margin)
        fr = np.empty((2 * cap + 1, 2 * cap + 1))
        okr = np.empty((2 * cap + 1, 2 * cap + 1), np.bool_)
        wk = _kron_work(cap)
        sbden = np.sqrt(np.pi * sb_min_factor * sky_sigma) if sky_sigma > 0 else 1.0
        for q in range(x.size):
            hs = -1
            m = np.nan
            kf = np.nan
            w = win[q]
            active = True
            for it in range(n_iter):
                if it > 0:
                    new = 6.0 * m if np.isfinite(m) else w
                    if sb_min_factor > 0 and sky_sigma > 0 and np.isfinite(kf) and kf > 0:
                        new = min(new, np.sqrt(max(kf, 0.0)) / sbden)
                    w = min(max(new, radius0), max_window)
                if not active:
                    continue
                h = _ladder_nb(w + 2.0, steps)
                need = h + margin
                if need > cap:
                    cap = need
                    fr = np.empty((2 * cap + 1, 2 * cap + 1))
                    okr = np.empty((2 * cap + 1, 2 * cap + 1), np.bool_)
                    wk = _kron_work(cap)
                    hs = -1
                if need > hs:
                    hs = need
                    _gather_nb(image, image, False, mask, use_mask, bits, xi[q], yi[q], hs,
                               fr, fr, okr)
                r1 = _r1_stamp(fr, okr, hs, h, margin, kern, x[q], y[q], xi[q], yi[q], kx[q],
                               ky[q], w, wk[0], wk[1], wk[2], wk[3], wk[4], wk[5], wk[6],
                               wk[7][0])
                if not np.isfinite(r1):
                    failed[q] = True
                    active = False
                    m = np.nan
                    continue
                m = min(max(r1, min_radius), w)
                if it < n_iter - 1:
                    rad = kron_factor * m
                    hw = int(np.ceil(rad + 1.0))
                    if hw > hs:
                        if hw > cap:
                            cap = hw
                            fr = np.empty((2 * cap + 1, 2 * cap + 1))
                            okr = np.empty((2 * cap + 1, 2 * cap + 1), np.bool_)
                            wk = _kron_work(cap)
                        hs = hw
                        _gather_nb(image, image, False, mask, use_mask, bits, xi[q], yi[q],
                                   hs, fr, fr, okr)
                    kf = _whole_pixel_sum(fr, hs, x[q], y[q], xi[q], yi[q], rad)
            mrf[q] = m
            win[q] = w

    @numba.njit(**_JIT)
    def _kron_work(cap):  # pragma: no cover - compiled
        """Work space of :func:`_r1_stamp` for stamps of half-size up to ``cap``."""
        b = 2 * cap + 1
        return (np.empty((b, b), np.float32), np.empty((b, b), np.bool_),
                np.empty((b, b), np.float32), np.empty((b, b), np.float32),
                np.empty((b, b), np.float32), np.empty((b, b), np.float32),
                np.empty((b, b), np.bool_), np.empty((1, b), np.float32))

    @numba.njit(**_JIT)
    def _axis_terms(u, r, arc_of_chord):  # pragma: no cover - compiled
        """Per-axis parts of :func:`_corner_terms` for a corner coordinate ``u``: its sign,
        ``ua = min(|u|, r)``, the chord ``sqrt(r^2 - ua^2)`` and the arcsine of ``ua / r``
        (columns) or of ``chord / r`` (rows, ``arc_of_chord``)."""
        ua = min(abs(u), r)
        su = np.sqrt(max(r * r - ua * ua, 0.0))
        rr = r if r > 0 else 1.0
        v = su / rr if arc_of_chord else ua / rr
        return np.sign(u), ua, su, np.arcsin(min(max(v, -1.0), 1.0))

    @numba.njit(**_JIT)
    def _corner_pre(sx, xa, sxa, asx, sy, ya, sya, asy, r):  # pragma: no cover - compiled
        """Scalar :func:`_corner_terms` from the per-axis parts of :func:`_axis_terms`."""
        r2 = r * r
        if xa * xa + ya * ya <= r2:
            return sx * sy * (xa * ya), sy * (ya * xa * xa / 2.0), sx * (xa * ya * ya / 2.0)
        area = ya * sya + 0.5 * (xa * sxa + r2 * asx) - 0.5 * (sya * ya + r2 * asy)
        mx = ya * sya * sya / 2.0 + (ya * ya * ya - sxa * sxa * sxa) / 3.0
        my = xa * sxa * sxa / 2.0 + (xa * xa * xa - sya * sya * sya) / 3.0
        return sx * sy * area, sy * mx, sx * my

    @numba.njit(**_JIT)
    def _aperture_nb(image, variance, use_var, mask, use_mask, bits, x, y, xi, yi, radii,
                     exact, flux, var, marea):  # pragma: no cover - compiled
        """Aperture sums (see :func:`_aperture_sums`) of every source.

        Pixels are visited in the raster order of the numpy path's stamps, so the sums of
        whole pixels are the same; a stamp one pixel wider than the largest circle gives
        the neighbours of the cut pixels.
        """
        n, k = radii.shape
        f32 = np.float32
        half_px = f32(0.5)
        zero = f32(0.0)
        hmax = 0
        for q in range(n):
            hmax = max(hmax, int(np.ceil(radii[q, k - 1] + 1.0)) + 1)
        smax = 2 * hmax + 1
        f = np.empty((smax, smax))
        v = np.empty((smax, smax))
        ok = np.empty((smax, smax), np.bool_)
        r2 = np.empty(k, np.float32)
        bf = np.empty(k + 1)
        bv = np.empty(k + 1)
        bb = np.empty(k + 1)
        cf = np.empty(k)
        cv = np.empty(k)
        cb = np.empty(k)
        ax = np.empty(smax, np.float32)
        # per radius, stamp column / row and side (+0.5, -0.5): the axis parts of the corner
        # terms, computed once per source when a cut pixel first needs them
        colt = np.empty((k, 2, smax, 4))
        rowt = np.empty((k, 2, smax, 4))
        colg = np.zeros((k, 2, smax), np.int64)
        rowg = np.zeros((k, 2, smax), np.int64)
        for q in range(n):
            rmax = radii[q, k - 1]
            hw = int(np.ceil(rmax + 1.0))
            h = hw + 1
            _gather_nb(image, variance, use_var, mask, use_mask, bits, xi[q], yi[q], h, f, v,
                       ok)
            rmax2 = f32(rmax * rmax)
            for t in range(k):
                r2[t] = f32(radii[q, t] * radii[q, t])
            bf[:] = 0.0
            bv[:] = 0.0
            bb[:] = 0.0
            cf[:] = 0.0
            cv[:] = 0.0
            cb[:] = 0.0
            for b in range(-hw, hw + 1):
                ax[b + hw] = f32(abs((xi[q] - x[q]) + float(b)))
            for a in range(-hw, hw + 1):
                oy = (yi[q] - y[q]) + float(a)
                ay = f32(abs(oy))
                ny_ = max(ay - half_px, zero) if exact else ay
                nyy = ny_ * ny_
                if not nyy < rmax2:
                    continue
                fr = f[a + h]
                vr = v[a + h]
                okr = ok[a + h]
                for b in range(-hw, hw + 1):
                    axb = ax[b + hw]
                    nx_ = max(axb - half_px, zero) if exact else axb
                    dnear2 = nyy + nx_ * nx_
                    if not dnear2 < rmax2:
                        continue
                    if exact:
                        fx = axb + half_px
                        fy = ay + half_px
                        dfar2 = fx * fx + fy * fy
                    else:
                        dfar2 = dnear2
                    kin = 0
                    for t in range(k):
                        kin += dfar2 > r2[t]
                    fv = fr[b + h]
                    vv = vr[b + h]
                    bad = 0.0 if okr[b + h] else 1.0
                    bf[kin] += fv
                    bv[kin] += vv
                    bb[kin] += bad
                    if exact and kin >= 1 and dnear2 < r2[kin - 1]:
                        # a pixel cut by radius kin-1: its overlap, plus the first-order
                        # term of the flux gradient across it
                        ox = (xi[q] - x[q]) + float(b)
                        rc = radii[q, kin - 1]
                        for side in range(2):
                            if colg[kin - 1, side, b + hw] != q + 1:
                                colg[kin - 1, side, b + hw] = q + 1
                                t0, t1, t2, t3 = _axis_terms(ox + (0.5 - side), rc, False)
                                colt[kin - 1, side, b + hw, 0] = t0
                                colt[kin - 1, side, b + hw, 1] = t1
                                colt[kin - 1, side, b + hw, 2] = t2
                                colt[kin - 1, side, b + hw, 3] = t3
                            if rowg[kin - 1, side, a + hw] != q + 1:
                                rowg[kin - 1, side, a + hw] = q + 1
                                t0, t1, t2, t3 = _axis_terms(oy + (0.5 - side), rc, True)
                                rowt[kin - 1, side, a + hw, 0] = t0
                                rowt[kin - 1, side, a + hw, 1] = t1
                                rowt[kin - 1, side, a + hw, 2] = t2
                                rowt[kin - 1, side, a + hw, 3] = t3
                        area = 0.0
                        mxs = 0.0
                        mys = 0.0
                        for c in range(4):
                            cs = 0 if (c == 0 or c == 2) else 1       # x side: +0.5, -0.5
                            rs_ = 0 if c < 2 else 1                   # y side: +0.5, -0.5
                            sg = 1.0 if (c == 0 or c == 3) else -1.0
                            ct = colt[kin - 1, cs, b + hw]
                            rt = rowt[kin - 1, rs_, a + hw]
                            ca, cmx, cmy = _corner_pre(ct[0], ct[1], ct[2], ct[3], rt[0], rt[1],
                                                       rt[2], rt[3], rc)
                            area += sg * ca
                            mxs += sg * cmx
                            mys += sg * cmy
                        mxs -= area * ox
                        mys -= area * oy
                        c0 = b + h
                        gx = 0.5 * (fr[c0 + 1] - fr[c0 - 1]) if (okr[c0 - 1] and okr[c0 + 1]) \
                            else 0.0
                        gy = 0.5 * (f[a + h + 1, c0] - f[a + h - 1, c0]) \
                            if (ok[a + h - 1, c0] and ok[a + h + 1, c0]) else 0.0
                        cf[kin - 1] += fv * area + gx * mxs + gy * mys
                        cv[kin - 1] += vv * area * area
                        cb[kin - 1] += bad * area
            sf = 0.0
            sv = 0.0
            sb = 0.0
            for t in range(k):
                sf += bf[t]
                sv += bv[t]
                sb += bb[t]
                flux[q, t] = sf + cf[t]
                var[q, t] = sv + cv[t]
                marea[q, t] = sb + cb[t]


@dataclass(frozen=True)
class ApertureResult:
    """Fluxes in circular apertures.

    Attributes
    ----------
    radius : ndarray, shape (n, k)
        Aperture radii (pixels).
    flux : ndarray, shape (n, k)
        Sum of the usable pixel values weighted by their area inside the circle (ADU).
    flux_err : ndarray, shape (n, k)
        Standard deviation of ``flux`` from the variance image (ADU).
    masked_frac : ndarray, shape (n, k)
        Fraction of the aperture area that is masked or outside the image.
    """

    radius: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    masked_frac: np.ndarray


def _aperture_sums(f: np.ndarray, v: np.ndarray, ok: np.ndarray, ox: np.ndarray,
                   oy: np.ndarray, radii: np.ndarray, exact: bool = True):
    """Aperture sums on stamps for ascending radii spaced by at least sqrt(2).

    ``f, v, ok`` are (n, s, s) stamps; ``ox`` (n, s) and ``oy`` (n, s) the offsets of the
    stamp columns and rows from each source centre (pixels); ``radii`` (n, k). Returns
    ``(flux, var, masked_area)`` each (n, k). With ``exact`` False pixels count whole when
    their centre is inside (a cheap estimate).
    """
    n, k = radii.shape
    s = f.shape[1]
    ax = np.abs(ox).astype(np.float32)
    ay = np.abs(oy).astype(np.float32)
    if exact:
        nx_ = np.maximum(ax - np.float32(0.5), np.float32(0.0))
        ny_ = np.maximum(ay - np.float32(0.5), np.float32(0.0))
    else:
        nx_, ny_ = ax, ay
    dnear2 = (ny_ * ny_)[:, :, None] + (nx_ * nx_)[:, None, :]
    # work only on pixels that touch the largest circle
    rmax2 = (radii[:, -1] ** 2).astype(np.float32)[:, None, None]
    src, pix = np.nonzero((dnear2 < rmax2).reshape(n, -1))
    row = pix // s
    col = pix - row * s
    flat = src * (s * s) + pix
    fz = f.reshape(-1)[flat]
    vz = v.reshape(-1)[flat]
    okz = ok.reshape(-1)[flat]
    axz = ax[src, col]
    ayz = ay[src, row]
    dnz = dnear2.reshape(-1)[flat]
    if exact:
        dfar2 = (axz + np.float32(0.5)) ** 2 + (ayz + np.float32(0.5)) ** 2
    else:
        dfar2 = dnz
    r2 = (radii ** 2).astype(np.float32)
    # kin: first radius holding the whole pixel; the pixel is cut by radius kin-1
    kin = np.zeros(src.size, dtype=np.int64)
    for j in range(k):
        kin += dfar2 > r2[src, j]
    idx = src * (k + 1) + kin
    bad = (~okz).astype(np.float64)

    def cumulate(w):
        sums = np.bincount(idx, weights=w, minlength=n * (k + 1)).reshape(n, k + 1)
        return np.cumsum(sums[:, :k], axis=1)

    flux = cumulate(fz)
    var = cumulate(vz)
    marea = cumulate(bad)
    if exact:
        kb = kin - 1
        cut = kb >= 0
        cut[cut] = dnz[cut] < r2[src[cut], kb[cut]]
        if np.any(cut):
            # flux of a cut pixel: area times its mean value, plus the first-order term of
            # the flux gradient across the pixel (the part inside is off the pixel centre)
            sc = src[cut]
            kc = kb[cut]
            a, mx, my = _overlap_moments(ox[sc, col[cut]].astype(np.float64),
                                         oy[sc, row[cut]].astype(np.float64), radii[sc, kc])
            gx, gy = _pixel_gradients(f, ok, flat[cut])
            fa = fz[cut] * a + gx * mx + gy * my
            ic = sc * k + kc
            flux += np.bincount(ic, weights=fa, minlength=n * k).reshape(n, k)
            var += np.bincount(ic, weights=vz[cut] * a * a, minlength=n * k).reshape(n, k)
            marea += np.bincount(ic, weights=bad[cut] * a, minlength=n * k).reshape(n, k)
    return flux, var, marea


def _aperture_core(image, variance, mask, x, y, radii, mask_bits, exact=True):
    """Aperture sums for sources at float positions with radii (n, k) ascending per row."""
    n, k = radii.shape
    flux = np.zeros((n, k))
    var = np.zeros((n, k))
    marea = np.zeros((n, k))
    if n == 0:
        return flux, var, marea
    spaced = k == 1 or np.all(np.diff(radii, axis=1) >= np.sqrt(2.0) - 1e-12)
    if not spaced:
        for j in range(k):
            fj, vj, mj = _aperture_core(image, variance, mask, x, y, radii[:, j:j + 1],
                                        mask_bits, exact)
            flux[:, j], var[:, j], marea[:, j] = fj[:, 0], vj[:, 0], mj[:, 0]
        return flux, var, marea
    xi = np.round(x).astype(np.int64)
    yi = np.round(y).astype(np.int64)
    if _HAVE_NUMBA:
        m, use_mask, bits = _kernel_mask(mask, mask_bits)
        _aperture_nb(_kernel_image(image), _kernel_image(variance), bool(exact), m, use_mask,
                     bits, x, y, xi, yi, np.ascontiguousarray(radii, dtype=np.float64),
                     bool(exact), flux, var, marea)
        return flux, var, marea
    for idx, half in _groups(radii[:, -1] + 1.0):
        size = 2 * half + 1
        off = np.arange(-half, half + 1, dtype=np.float64)
        for sl in _chunks(idx.size, size):
            sel = idx[sl]
            f, v, ok = _gather(image, variance if exact else None, mask, xi[sel], yi[sel],
                               half, mask_bits)
            if v is None:
                v = np.zeros_like(f)
            ox = (xi[sel] - x[sel])[:, None] + off[None, :]
            oy = (yi[sel] - y[sel])[:, None] + off[None, :]
            fs, vs, ms = _aperture_sums(f, v, ok, ox, oy, radii[sel], exact)
            flux[sel], var[sel], marea[sel] = fs, vs, ms
    return flux, var, marea


def aperture_photometry(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None,
                        x: np.ndarray, y: np.ndarray, radii, *,
                        mask_bits: int = maskbits.BAD) -> ApertureResult:
    """Flux in circular apertures with exact pixel overlap.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Sky-subtracted image (ADU).
    variance : ndarray, shape (ny, nx)
        Variance of every pixel (ADU^2).
    mask : ndarray of uint16, shape (ny, nx), or None
        Bit mask; pixels with ``mask_bits`` set are left out.
    x, y : array_like, shape (n,)
        Aperture centres (pixels).
    radii : float or array_like
        Aperture radii (pixels): a scalar or shape (k,), shared by all sources; or shape
        (n, 1) / (n, k), one row per source.
    mask_bits : int
        Mask bits that exclude a pixel.

    Returns
    -------
    ApertureResult
        Fluxes (ADU), their errors (ADU) and masked fractions, shape (n, k). Masked pixels
        contribute nothing to the flux; ``masked_frac`` tells how much area they cover.
    """
    image, variance, mask, x, y = _check_inputs(image, variance, mask, x, y,
                                                "aperture_photometry")
    n = x.size
    r = np.asarray(radii, dtype=np.float64)
    if r.ndim == 0:
        r = np.full((n, 1), float(r))
    elif r.ndim == 1:
        r = np.broadcast_to(r[None, :], (n, r.size)).copy()
    elif r.ndim == 2 and r.shape[0] == n:
        r = r.copy()
    else:
        raise ValueError(f"aperture_photometry: radii of shape {r.shape} do not match "
                         f"{n} sources")
    if not np.all(np.isfinite(r)) or np.any(r <= 0):
        raise ValueError("aperture_photometry: radii must be finite and positive")
    order = np.argsort(r, axis=1, kind="stable")
    rs = np.take_along_axis(r, order, axis=1)
    flux, var, marea = _aperture_core(image, variance, mask, x, y, rs, mask_bits)
    inv = np.argsort(order, axis=1)
    flux = np.take_along_axis(flux, inv, axis=1)
    var = np.take_along_axis(var, inv, axis=1)
    marea = np.take_along_axis(marea, inv, axis=1)
    return ApertureResult(radius=r, flux=flux, flux_err=np.sqrt(var),
                          masked_frac=marea / (np.pi * r * r))


def radial_apertures(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None,
                     x: np.ndarray, y: np.ndarray, *,
                     radii: np.ndarray = RADIAL_APERTURE_RADII,
                     mask_bits: int = maskbits.BAD) -> ApertureResult:
    """Fluxes within the IPP radial aperture radii (stack photometry).

    Parameters
    ----------
    image, variance, mask, x, y
        As for :func:`aperture_photometry`.
    radii : array_like, shape (k,)
        Outer radii (pixels); the IPP edges 4.16, 7.04, 12, 18.56, 29.76, 45.68, 72.8,
        112.8, 176.88 by default. Annular fluxes are differences of consecutive columns.
    mask_bits : int
        Mask bits that exclude a pixel.

    Returns
    -------
    ApertureResult
        Cumulative fluxes within each radius, shape (n, k).
    """
    radii = np.asarray(radii, dtype=np.float64)
    if radii.ndim != 1:
        raise ValueError(f"radial_apertures: radii must be 1-D, got shape {radii.shape}")
    n = np.atleast_1d(x).size
    return aperture_photometry(image, variance, mask, x, y,
                               np.broadcast_to(radii, (n, radii.size)), mask_bits=mask_bits)


# ----------------------------------------------------------------------------------------
# centroid and second moments


def deconvolve_window(mxx, mxy, myy, window_sigma: float):
    """Unweighted second moments of a Gaussian source from its windowed moments.

    A Gaussian of covariance C seen through a circular Gaussian window of covariance
    ``w^2 I`` has windowed covariance ``M = (C^-1 + I / w^2)^-1``; this inverts that.

    Parameters
    ----------
    mxx, mxy, myy : array_like
        Windowed moments (pixel^2), e.g. ``MOMENTS_XX/XY/YY``.
    window_sigma : float
        Sigma of the window (pixels).

    Returns
    -------
    tuple of ndarray
        ``(cxx, cxy, cyy)`` (pixel^2); NaN where the windowed moments are not smaller than
        the window (no Gaussian source fits them).
    """
    mxx = np.asarray(mxx, dtype=np.float64)
    mxy = np.asarray(mxy, dtype=np.float64)
    myy = np.asarray(myy, dtype=np.float64)
    det = mxx * myy - mxy * mxy
    with np.errstate(invalid="ignore", divide="ignore"):
        ixx, ixy, iyy = myy / det, -mxy / det, mxx / det
        w2 = 1.0 / window_sigma ** 2
        axx, ayy, axy = ixx - w2, iyy - w2, ixy
        d2 = axx * ayy - axy * axy
        ok = (det > 0) & (axx > 0) & (ayy > 0) & (d2 > 0)
        cxx = np.where(ok, ayy / d2, np.nan)
        cyy = np.where(ok, axx / d2, np.nan)
        cxy = np.where(ok, -axy / d2, np.nan)
    return cxx, cxy, cyy


def _window_gain(m: np.ndarray, sigma: float) -> np.ndarray:
    """``1 / (1 - m / sigma^2)``: windowed-to-true offset ratio of a Gaussian source.

    Bounded to [1, 4]; 2 where undefined (a source as wide as the window or wider).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        g = np.clip(1.0 / (1.0 - m / sigma ** 2), 1.0, 4.0)
    return np.nan_to_num(g, nan=2.0)


def centroid_moments(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None,
                     x: np.ndarray, y: np.ndarray, *, sigma: float,
                     radius: float | None = None, n_iter: int = 4, max_shift: float = 2.0,
                     mask_bits: int = maskbits.BAD) -> np.ndarray:
    """Gaussian-windowed centroids and second moments (psphot ``pmSourceMoments``).

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Sky-subtracted image (ADU).
    variance : ndarray, shape (ny, nx)
        Pixel variances (ADU^2).
    mask : ndarray of uint16 or None
        Bit mask; pixels with ``mask_bits`` set are left out.
    x, y : array_like, shape (n,)
        Starting positions (pixels), e.g. detection peaks.
    sigma : float
        Sigma of the Gaussian window (pixels): the PSF sigma, FWHM / 2.3548.
    radius : float, optional
        Radius of the window (pixels); ``4 sigma`` by default (``PSF_MOMENTS_RADIUS``).
    n_iter : int
        Centroid iterations (each moves the window to the current centroid).
    max_shift : float
        Largest distance the centroid may move from the start (pixels); beyond it the
        start position is kept and ``MOMENTS_CENTROID_SHIFT`` is set.
    mask_bits : int
        Mask bits that exclude a pixel.

    Returns
    -------
    ndarray of MOMENTS_DTYPE, shape (n,)
        ``X_MOMENTS, Y_MOMENTS`` (pixels) and errors; windowed ``MOMENTS_XX/XY/YY``
        (pixel^2); ``MOMENTS_SUM`` (windowed sum, ADU), ``MOMENTS_SN``, ``MOMENTS_NPIX`` and
        ``MOMENTS_FLAGS``.
    """
    image, variance, mask, x, y = _check_inputs(image, variance, mask, x, y,
                                                "centroid_moments")
    if not sigma > 0:
        raise ValueError(f"centroid_moments: sigma must be positive, got {sigma}")
    if radius is None:
        radius = 4.0 * sigma
    out = np.zeros(x.size, dtype=MOMENTS_DTYPE)
    if x.size == 0:
        return out
    half = int(np.ceil(radius + max_shift + 1.0))
    size = 2 * half + 1
    off = np.arange(-half, half + 1, dtype=np.float64)
    r2max = radius * radius
    inv2s2 = 0.5 / sigma ** 2
    if _HAVE_NUMBA:
        img_k, var_k = _kernel_image(image), _kernel_image(variance)
        mask_k, use_mask, bits = _kernel_mask(mask, mask_bits)
    for sl in _chunks(x.size, size):
        x0, y0 = x[sl], y[sl]
        xi = np.round(x0).astype(np.int64)
        yi = np.round(y0).astype(np.int64)
        if _HAVE_NUMBA:
            # every source iterated on its own, then the state after the iteration where
            # the whole batch converged (as the numpy path iterates the batch together)
            nit = max(n_iter, 1)
            xs = np.empty((x0.size, nit))
            ys = np.empty((x0.size, nit))
            mv = np.empty((x0.size, nit), dtype=bool)
            sm = np.empty((x0.size, nit), dtype=bool)
            _centroid_iter_nb(img_k, var_k, mask_k, use_mask, bits, xi, yi, half, x0, y0, nit,
                              r2max, inv2s2, sigma ** 2, max_shift, xs, ys, mv, sm)
            done = np.flatnonzero(sm.all(axis=0))
            last = int(done[0]) if done.size else nit - 1
            xc, yc, moved = xs[:, last].copy(), ys[:, last].copy(), mv[:, last].copy()
            sums = np.empty((x0.size, 9))
            _centroid_final_nb(img_k, var_k, mask_k, use_mask, bits, xi, yi, half, xc, yc,
                               r2max, inv2s2, sums)
            s = sums[:, 0]
            var_s = sums[:, 1]
            npix = np.round(sums[:, 2]).astype(np.int64)
            npossible = np.round(sums[:, 8]).astype(np.int64)
            with np.errstate(invalid="ignore", divide="ignore"):
                cxx = sums[:, 3] / s
                cxy = sums[:, 4] / s
                cyy = sums[:, 5] / s
                ex = _window_gain(cxx, sigma) * np.sqrt(sums[:, 6]) / np.abs(s)
                ey = _window_gain(cyy, sigma) * np.sqrt(sums[:, 7]) / np.abs(s)
                sn = s / np.sqrt(var_s)
        else:
            f, v, ok = _gather(image, variance, mask, xi, yi, half, mask_bits)
            gx = xi[:, None, None] + off[None, None, :]      # pixel x of stamp columns
            gy = yi[:, None, None] + off[None, :, None]
            xc, yc = x0.copy(), y0.copy()
            moved = np.zeros(x0.size, dtype=bool)
            for _ in range(max(n_iter, 1)):
                dx = gx - xc[:, None, None]
                dy = gy - yc[:, None, None]
                r2 = dx * dx + dy * dy
                w = np.exp(-r2 * inv2s2) * (r2 <= r2max)
                wf = w * f
                s = wf.sum(axis=(1, 2))
                with np.errstate(invalid="ignore", divide="ignore"):
                    mx = (wf * dx).sum(axis=(1, 2)) / s
                    my = (wf * dy).sum(axis=(1, 2)) / s
                    mxx = (wf * dx * dx).sum(axis=(1, 2)) / s - mx * mx
                    myy = (wf * dy * dy).sum(axis=(1, 2)) / s - my * my
                # for a Gaussian source the windowed mean offset understates the true one by
                # the factor (1 - M / w^2); undo it (bounded) so each step lands on the centre
                ok_s = s > 0
                stepx = np.where(np.isfinite(mx) & ok_s, mx * _window_gain(mxx, sigma), 0.0)
                stepy = np.where(np.isfinite(my) & ok_s, my * _window_gain(myy, sigma), 0.0)
                xc = xc + np.clip(stepx, -1.0, 1.0)
                yc = yc + np.clip(stepy, -1.0, 1.0)
                far = np.hypot(xc - x0, yc - y0) > max_shift
                moved |= far
                xc = np.where(far, x0, xc)
                yc = np.where(far, y0, yc)
                if np.all(np.abs(stepx) < 1e-4) and np.all(np.abs(stepy) < 1e-4):
                    break
            dx = gx - xc[:, None, None]
            dy = gy - yc[:, None, None]
            r2 = dx * dx + dy * dy
            inwin = r2 <= r2max
            w = np.exp(-r2 * inv2s2) * inwin
            wf = w * f
            s = wf.sum(axis=(1, 2))
            var_s = (w * w * v).sum(axis=(1, 2))
            npix = (ok & inwin).sum(axis=(1, 2))
            npossible = inwin.sum(axis=(1, 2))
            with np.errstate(invalid="ignore", divide="ignore"):
                cxx = (wf * dx * dx).sum(axis=(1, 2)) / s
                cxy = (wf * dx * dy).sum(axis=(1, 2)) / s
                cyy = (wf * dy * dy).sum(axis=(1, 2)) / s
                w2v = w * w * v
                ex = (_window_gain(cxx, sigma) * np.sqrt((w2v * dx * dx).sum(axis=(1, 2)))
                      / np.abs(s))
                ey = (_window_gain(cyy, sigma) * np.sqrt((w2v * dy * dy).sum(axis=(1, 2)))
                      / np.abs(s))
                sn = s / np.sqrt(var_s)
        flags = np.zeros(x0.size, dtype=np.uint16)
        few = npix < 0.25 * npossible
        failed = ~(s > 0)
        flags[few] |= MOMENTS_FEW_PIXELS
        flags[failed] |= MOMENTS_FAILED
        flags[moved] |= MOMENTS_CENTROID_SHIFT
        bad = failed | few
        o = out[sl]                                   # a view
        o["X_MOMENTS"] = np.where(bad, x0, xc)
        o["Y_MOMENTS"] = np.where(bad, y0, yc)
        o["X_MOMENTS_ERR"] = np.where(bad, np.nan, ex)
        o["Y_MOMENTS_ERR"] = np.where(bad, np.nan, ey)
        o["MOMENTS_XX"] = np.where(bad, np.nan, cxx)
        o["MOMENTS_XY"] = np.where(bad, np.nan, cxy)
        o["MOMENTS_YY"] = np.where(bad, np.nan, cyy)
        o["MOMENTS_SUM"] = s
        o["MOMENTS_SN"] = sn
        o["MOMENTS_NPIX"] = npix
        o["MOMENTS_FLAGS"] = flags
    return out


# ----------------------------------------------------------------------------------------
# Kron


def _mirror(a: np.ndarray, dx: np.ndarray, dy: np.ndarray, fill) -> np.ndarray:
    """Point-mirror stamps about their centre shifted by half-pixel steps.

    ``out[n, j, i] = a[n, 2h + dy[n] - j, 2h + dx[n] - i]`` for stamps of side ``2h + 1``
    and ``dx, dy`` in {-1, 0, 1}; positions falling outside the stamp get ``fill``.
    """
    n, s, _ = a.shape
    flipped = a[:, ::-1, ::-1]
    padded = np.full((n, s + 2, s + 2), fill, dtype=a.dtype)
    padded[:, 1:-1, 1:-1] = flipped
    out = np.empty_like(a)
    for sy in (-1, 0, 1):
        for sx in (-1, 0, 1):
            sel = np.flatnonzero((dy == sy) & (dx == sx))
            if sel.size:
                out[sel] = padded[sel, 1 - sy:1 - sy + s, 1 - sx:1 - sx + s]
    return out


def _radial_moment(image, variance, mask, x, y, window, smooth_sigma, mask_bits):
    """First radial moment R1 within ``window`` (n,) on the smoothed image."""
    n = x.size
    r1 = np.full(n, np.nan)
    margin = int(np.ceil(2.0 * smooth_sigma)) if smooth_sigma > 0 else 0
    xi = np.round(x).astype(np.int64)
    yi = np.round(y).astype(np.int64)
    for idx, half in _groups(window + 2.0):
        hh = half + margin
        size = 2 * hh + 1
        off = np.arange(-hh, hh + 1, dtype=np.float64)
        for sl in _chunks(idx.size, size):
            sel = idx[sl]
            f, _, ok = _gather(image, None, mask, xi[sel], yi[sel], hh, mask_bits,
                               dtype=np.float32)
            if smooth_sigma > 0:
                # normalised convolution: masked pixels are filled from their neighbours;
                # pixels with under a quarter of the kernel weight usable stay unusable
                num = ndi.gaussian_filter(f, (0, smooth_sigma, smooth_sigma), truncate=2.0,
                                          mode="constant")
                if ok.all():
                    fs, oks = num, np.ones(num.shape, dtype=bool)
                else:
                    den = ndi.gaussian_filter(ok.astype(np.float32),
                                              (0, smooth_sigma, smooth_sigma), truncate=2.0,
                                              mode="constant")
                    with np.errstate(invalid="ignore", divide="ignore"):
                        fs = np.where(den >= 0.25, num / den, 0.0)
                    oks = den >= 0.25
            else:
                fs, oks = f, ok
            if margin:
                fs = fs[:, margin:-margin, margin:-margin]
                oks = oks[:, margin:-margin, margin:-margin]
            offc = off[margin:size - margin] if margin else off
            xs, ys = x[sel], y[sel]
            # mirror about the centroid rounded to the nearest half pixel
            kx = np.clip(np.round(2.0 * (xs - xi[sel])).astype(np.int64), -1, 1)
            ky = np.clip(np.round(2.0 * (ys - yi[sel])).astype(np.int64), -1, 1)
            fm = _mirror(fs, kx, ky, 0.0)
            okm = _mirror(oks, kx, ky, False)
            dx = ((xi[sel] - xs)[:, None, None] + offc[None, None, :]).astype(np.float32)
            dy = ((yi[sel] - ys)[:, None, None] + offc[None, :, None]).astype(np.float32)
            r = np.sqrt(dx * dx + dy * dy)
            use = oks & okm & (r <= window[sel][:, None, None])
            prod = np.sqrt(np.abs(fs * fm))
            np.copysign(prod, fs, out=prod)
            rf = np.where(use, r * prod, 0.0).sum(axis=(1, 2), dtype=np.float64)
            rs = np.where(use, fs + fm, 0.0).sum(axis=(1, 2), dtype=np.float64) * 0.5
            with np.errstate(invalid="ignore", divide="ignore"):
                val = rf / rs
            r1[sel] = np.where((rf > 0) & (rs > 0) & np.isfinite(val), val, np.nan)
    return r1


def kron_photometry(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None,
                    x: np.ndarray, y: np.ndarray, *, sigma: float,
                    sky_sigma: float | None = None, smooth_sigma: float = 1.7,
                    n_iter: int = 2, kron_factor: float = 2.5,
                    window: np.ndarray | float | None = None,
                    min_radius: float | None = None, sb_min_factor: float = 2.0,
                    max_window: float = 200.0,
                    mask_bits: int = maskbits.BAD) -> np.ndarray:
    """First radial moment and Kron flux (psphot ``psphotKronIterate``).

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Sky-subtracted image (ADU).
    variance : ndarray, shape (ny, nx)
        Pixel variances (ADU^2).
    mask : ndarray of uint16 or None
        Bit mask; pixels with ``mask_bits`` set are left out.
    x, y : array_like, shape (n,)
        Source centres (pixels), e.g. ``X_MOMENTS, Y_MOMENTS``.
    sigma : float
        PSF sigma (pixels); sets the smallest window (``4 sigma``) and the default minimum
        Kron radius (``sigma``, psphot ``MOMENTS_MIN_KRON``).
    sky_sigma : float, optional
        Sky noise per pixel (ADU) for the surface-brightness limit of the window; the
        square root of the median variance if not given.
    smooth_sigma : float
        Sigma of the Gaussian smoothing applied before measuring R1 (pixels), 1.7 in the
        IPP recipe (``KRON_SMOOTH_SIGMA``); 0 disables smoothing.
    n_iter : int
        Iterations (``KRON_ITERATIONS``, 2).
    kron_factor : float
        Kron aperture radius in units of R1 (2.5).
    window : float or array_like, optional
        First-iteration window radius (pixels); by default four times the sigma of a
        smoothed point source, ``4 sqrt(sigma^2 + smooth_sigma^2)`` (at least ``4 sigma``,
        psphot's ``PSF_MOMENTS_RADIUS``).
    min_radius : float, optional
        Smallest R1 reported (pixels); ``sigma`` by default.
    sb_min_factor : float
        ``KRON_SB_MIN_FACTOR``: later windows are at most
        ``sqrt(kron_flux / (pi * sb_min_factor * sky_sigma))``.
    max_window : float
        Largest window radius (pixels).
    mask_bits : int
        Mask bits that exclude a pixel.

    Returns
    -------
    ndarray of KRON_DTYPE, shape (n,)
        ``MOMENTS_R1`` (pixels), ``KRON_RADIUS = kron_factor * R1`` (pixels), ``KRON_FLUX``
        and ``KRON_FLUX_ERR`` (ADU) within it, ``KRON_MASKED_FRAC``, the flux in the
        annulus ``R1..2.5 R1`` (``KRON_FLUX_INNER``, psphot's ``KronFinner``) and
        ``KRON_FLAGS``.
    """
    image, variance, mask, x, y = _check_inputs(image, variance, mask, x, y,
                                                "kron_photometry")
    if not sigma > 0:
        raise ValueError(f"kron_photometry: sigma must be positive, got {sigma}")
    n = x.size
    out = np.zeros(n, dtype=KRON_DTYPE)
    if n == 0:
        return out
    if sky_sigma is None:
        good_var = variance[np.isfinite(variance) & (variance > 0)]
        sky_sigma = float(np.sqrt(np.median(good_var))) if good_var.size else 0.0
    radius0 = 4.0 * sigma
    if min_radius is None:
        min_radius = sigma
    if window is None:
        win = np.full(n, max(radius0, 4.0 * np.hypot(sigma, smooth_sigma)))
    else:
        win = np.broadcast_to(np.asarray(window, dtype=np.float64), (n,)).copy()
    win = np.minimum(win, max_window)
    mrf = np.full(n, np.nan)
    kflux = np.full(n, np.nan)
    flags = np.zeros(n, dtype=np.uint16)
    active = np.ones(n, dtype=bool)
    if _HAVE_NUMBA:
        margin = int(np.ceil(2.0 * smooth_sigma)) if smooth_sigma > 0 else 0
        if smooth_sigma > 0:
            rad = int(2.0 * smooth_sigma + 0.5)          # scipy's radius for truncate=2
            t = np.arange(-rad, rad + 1, dtype=np.float64)
            kern = np.exp(-0.5 * t * t / smooth_sigma ** 2)
            kern = (kern / kern.sum()).astype(np.float32)
        else:
            kern = np.zeros(0, np.float32)
        xi = np.round(x).astype(np.int64)
        yi = np.round(y).astype(np.int64)
        kx = np.clip(np.round(2.0 * (x - xi)).astype(np.int64), -1, 1)
        ky = np.clip(np.round(2.0 * (y - yi)).astype(np.int64), -1, 1)
        failed = np.zeros(n, dtype=bool)
        m_k, use_mask, bits = _kernel_mask(mask, mask_bits)
        _kron_r1_nb(_kernel_image(image), m_k, use_mask, bits, x, y, xi, yi, kx, ky, win,
                    max(n_iter, 1), float(radius0), float(max_window), float(sb_min_factor),
                    float(sky_sigma), float(min_radius), float(kron_factor), margin, kern,
                    _LADDER_STEPS, mrf, failed)
        flags[failed] |= KRON_FAILED
    else:
        for it in range(max(n_iter, 1)):
            if it > 0:
                new = np.where(np.isfinite(mrf), 6.0 * mrf, win)
                if sb_min_factor > 0 and sky_sigma > 0:
                    with np.errstate(invalid="ignore"):
                        rmax = np.sqrt(np.maximum(kflux, 0.0)) / np.sqrt(np.pi * sb_min_factor
                                                                          * sky_sigma)
                    new = np.where(np.isfinite(kflux) & (kflux > 0), np.minimum(new, rmax), new)
                win = np.clip(new, radius0, max_window)
            sel = np.flatnonzero(active)
            if sel.size == 0:
                break
            r1 = _radial_moment(image, variance, mask, x[sel], y[sel], win[sel], smooth_sigma,
                                mask_bits)
            good = np.isfinite(r1)
            failed = sel[~good]
            flags[failed] |= KRON_FAILED
            active[failed] = False
            mrf[failed] = np.nan
            gsel = sel[good]
            mrf[gsel] = np.clip(r1[good], min_radius, win[gsel])
            if gsel.size and it < max(n_iter, 1) - 1:
                # only a guide for the next window: whole pixels with centres inside
                fl, _, _ = _aperture_core(image, variance, mask, x[gsel], y[gsel],
                                          (kron_factor * mrf[gsel])[:, None], mask_bits,
                                          exact=False)
                kflux[gsel] = fl[:, 0]
    ok = np.isfinite(mrf)
    out["MOMENTS_R1"] = mrf
    out["KRON_RADIUS"] = kron_factor * mrf
    out["KRON_FLUX"] = np.nan
    out["KRON_FLUX_ERR"] = np.nan
    out["KRON_MASKED_FRAC"] = np.nan
    out["KRON_FLUX_INNER"] = np.nan
    g = np.flatnonzero(ok)
    if g.size:
        radii = np.stack([mrf[g], kron_factor * mrf[g]], axis=1)
        ap = aperture_photometry(image, variance, mask, x[g], y[g], radii,
                                 mask_bits=mask_bits)
        out["KRON_FLUX"][g] = ap.flux[:, 1]
        out["KRON_FLUX_ERR"][g] = ap.flux_err[:, 1]
        out["KRON_MASKED_FRAC"][g] = ap.masked_frac[:, 1]
        out["KRON_FLUX_INNER"][g] = ap.flux[:, 1] - ap.flux[:, 0]
    out["KRON_FLAGS"] = flags
    return out


# ----------------------------------------------------------------------------------------
# Petrosian


def _petrosian_edges(max_radius: float) -> np.ndarray:
    """Annulus edges: 1.5-pixel steps to 12 pixels, then growing by 25% (>= 1.5 pixels)."""
    edges = list(np.arange(1.5, 12.0 + 1e-9, 1.5))
    while edges[-1] < max_radius:
        edges.append(edges[-1] * 1.25)
    return np.array(edges)


def petrosian(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None,
              x: np.ndarray, y: np.ndarray, *, ratio: float = 0.1, n_radii: float = 2.0,
              max_radius: float = 200.0, n_sigma: float = 2.0,
              mask_bits: int = maskbits.BAD) -> np.ndarray:
    """Petrosian radius, flux, R50 and R90 from circular annuli (psphot Petrosian).

    The profile is measured in annuli (1.5-pixel steps out to 12 pixels, then 25% wider
    each); in annulus ``i`` the Petrosian ratio is its mean surface brightness divided by
    the mean surface brightness inside the radius that splits the annulus' area in two.
    The Petrosian radius is the first radius where the ratio falls below ``ratio`` while
    still more than ``n_sigma`` standard deviations above zero (interpolated linearly
    between annuli). The flux is measured within ``n_radii`` Petrosian radii; R50 and R90
    enclose 50% and 90% of it.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Sky-subtracted image (ADU).
    variance : ndarray, shape (ny, nx)
        Pixel variances (ADU^2).
    mask : ndarray of uint16 or None
        Bit mask; pixels with ``mask_bits`` set are left out (their area is left out of
        the surface brightness).
    x, y : array_like, shape (n,)
        Source centres (pixels).
    ratio : float
        Petrosian ratio, 0.1 (``PETROSIAN_FLUX_RATIO``).
    n_radii : float
        Flux aperture in Petrosian radii, 2 (``PETROSIAN_RADII``).
    max_radius : float
        Outermost annulus radius (pixels).
    n_sigma : float
        Significance required of the ratio at the crossing.
    mask_bits : int
        Mask bits that exclude a pixel.

    Returns
    -------
    ndarray of PETROSIAN_DTYPE, shape (n,)
        ``PETRO_RADIUS`` and error (pixels), ``PETRO_FLUX`` and error (ADU), ``PETRO_R50``,
        ``PETRO_R90`` (pixels), ``PETRO_FILL`` (unmasked fraction of the flux aperture) and
        ``PETRO_FLAGS``. When the ratio never crosses, the radius of the lowest significant
        ratio is used and ``PETRO_INSIGNIFICANT`` set.
    """
    image, variance, mask, x, y = _check_inputs(image, variance, mask, x, y, "petrosian")
    if not 0 < ratio < 1:
        raise ValueError(f"petrosian: ratio must be in (0, 1), got {ratio}")
    n = x.size
    out = np.zeros(n, dtype=PETROSIAN_DTYPE)
    if n == 0:
        return out
    edges = _petrosian_edges(max_radius / n_radii)
    ap = aperture_photometry(image, variance, mask, x, y, np.broadcast_to(edges, (n, edges.size)),
                             mask_bits=mask_bits)
    area = np.pi * edges ** 2
    good_area = area[None, :] * (1.0 - ap.masked_frac)
    inner_edge = np.concatenate([[0.0], edges[:-1]])
    ann_flux = np.diff(np.concatenate([np.zeros((n, 1)), ap.flux], axis=1), axis=1)
    ann_var = np.diff(np.concatenate([np.zeros((n, 1)), ap.flux_err ** 2], axis=1), axis=1)
    ann_area = np.diff(np.concatenate([np.zeros((n, 1)), good_area], axis=1), axis=1)
    prev_flux = np.concatenate([np.zeros((n, 1)), ap.flux[:, :-1]], axis=1)
    prev_var = np.concatenate([np.zeros((n, 1)), ap.flux_err[:, :-1] ** 2], axis=1)
    prev_area = np.concatenate([np.zeros((n, 1)), good_area[:, :-1]], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sb = ann_flux / ann_area
        sb_err = np.sqrt(ann_var) / ann_area
        in_flux = prev_flux + 0.5 * ann_flux
        in_area = prev_area + 0.5 * ann_area
        mean_sb = in_flux / in_area
        mean_err = np.sqrt(prev_var + 0.25 * ann_var) / in_area
        pr = sb / mean_sb
        pr_err = np.abs(pr) * np.hypot(sb_err / sb, mean_err / mean_sb)
    rref = np.sqrt(0.5 * (inner_edge ** 2 + edges ** 2))
    usable = np.isfinite(pr) & (ann_area > 0.25 * np.diff(np.concatenate([[0.0], area])))
    signif = usable & (pr > n_sigma * pr_err)
    cross = signif & (pr < ratio)
    any_cross = cross.any(axis=1)
    k = np.argmax(cross, axis=1)
    rows = np.arange(n)
    km1 = np.maximum(k - 1, 0)
    p0 = np.where(k > 0, pr[rows, km1], 1.0)
    r0 = np.where(k > 0, rref[km1], 0.0)
    p1 = pr[rows, k]
    r1 = rref[k]
    e0 = np.where(k > 0, pr_err[rows, km1], 0.0)
    e1 = pr_err[rows, k]
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (ratio - p0) / (p1 - p0)
        rp = r0 + t * (r1 - r0)
        drdp = (r1 - r0) / (p1 - p0)
        rp_err = np.abs(drdp) * np.hypot(e1 * t, e0 * (1.0 - t))
    # no crossing: the radius of the lowest significant ratio
    lowest = np.where(signif, pr, np.inf)
    klow = np.argmin(lowest, axis=1)
    has_any = signif.any(axis=1)
    flags = np.zeros(n, dtype=np.uint16)
    rp = np.where(any_cross, rp, np.where(has_any, rref[klow], np.nan))
    rp_err = np.where(any_cross, rp_err, np.nan)
    flags[~any_cross & has_any] |= PETRO_INSIGNIFICANT
    flags[~has_any] |= PETRO_NO_PROFILE
    out["PETRO_RADIUS"] = rp
    out["PETRO_RADIUS_ERR"] = rp_err
    out["PETRO_FLUX"] = np.nan
    out["PETRO_FLUX_ERR"] = np.nan
    out["PETRO_R50"] = np.nan
    out["PETRO_R90"] = np.nan
    out["PETRO_FILL"] = np.nan
    g = np.flatnonzero(np.isfinite(rp) & (rp > 0))
    if g.size:
        rap = np.minimum(n_radii * rp[g], max_radius)
        pf = aperture_photometry(image, variance, mask, x[g], y[g], rap[:, None],
                                 mask_bits=mask_bits)
        flux = pf.flux[:, 0]
        out["PETRO_FLUX"][g] = flux
        out["PETRO_FLUX_ERR"][g] = pf.flux_err[:, 0]
        out["PETRO_FILL"][g] = 1.0 - pf.masked_frac[:, 0]
        # R50, R90: interpolate the curve of growth (annulus edges) in flux
        cog = ap.flux[g]
        for frac, col in ((0.5, "PETRO_R50"), (0.9, "PETRO_R90")):
            target = frac * flux
            above = cog > target[:, None]
            j = np.argmax(above, axis=1)
            found = above.any(axis=1) & (flux > 0)
            jm = np.maximum(j - 1, 0)
            fa = np.where(j > 0, cog[np.arange(g.size), jm], 0.0)
            ra = np.where(j > 0, edges[jm], 0.0)
            fb = cog[np.arange(g.size), j]
            rb = edges[j]
            with np.errstate(invalid="ignore", divide="ignore"):
                # flux grows ~ r^2 at small radii: interpolate in r^2
                tt = (target - fa) / (fb - fa)
                rr = np.sqrt(ra ** 2 + tt * (rb ** 2 - ra ** 2))
            out[col][g] = np.where(found, rr, np.nan)
    out["PETRO_FLAGS"] = flags
    return out


# ----------------------------------------------------------------------------------------
# everything for a chip catalog


def measure_sources(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None,
                    x: np.ndarray, y: np.ndarray, *, psf_sigma: float,
                    sky_sigma: float | None = None, aperture_radius: float | None = None,
                    aperture_scale: float = 4.5, kron_smooth_sigma: float = 1.7,
                    kron_iterations: int = 2, kron_factor: float = 2.5,
                    mask_bits: int = maskbits.BAD) -> np.ndarray:
    """Centroids, second moments, Kron and aperture photometry for a list of sources.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Sky-subtracted image (ADU).
    variance : ndarray, shape (ny, nx)
        Pixel variances (ADU^2).
    mask : ndarray of uint16 or None
        Bit mask; pixels with ``mask_bits`` set are left out.
    x, y : array_like, shape (n,)
        Starting positions (pixels), e.g. detection peaks.
    psf_sigma : float
        PSF sigma (pixels): the moments window.
    sky_sigma : float, optional
        Sky noise per pixel (ADU), for the Kron window limit.
    aperture_radius : float, optional
        Radius of the aperture flux (pixels); ``aperture_scale * psf_sigma`` by default
        (psphot ``PSF_APERTURE_SCALE`` = 4.5).
    aperture_scale : float
        See ``aperture_radius``.
    kron_smooth_sigma, kron_iterations, kron_factor : float, int, float
        Passed to :func:`kron_photometry`.
    mask_bits : int
        Mask bits that exclude a pixel.

    Returns
    -------
    ndarray, shape (n,)
        The columns of :data:`MOMENTS_DTYPE` and :data:`KRON_DTYPE` followed by
        ``AP_RADIUS`` (pixels), ``AP_FLUX``, ``AP_FLUX_ERR`` (ADU) and
        ``AP_MASKED_FRAC``. Kron and aperture are centred on the moments centroid.
    """
    image, variance, mask, x, y = _check_inputs(image, variance, mask, x, y,
                                                "measure_sources")
    mom = centroid_moments(image, variance, mask, x, y, sigma=psf_sigma, mask_bits=mask_bits)
    xc, yc = mom["X_MOMENTS"], mom["Y_MOMENTS"]
    kron = kron_photometry(image, variance, mask, xc, yc, sigma=psf_sigma, sky_sigma=sky_sigma,
                           smooth_sigma=kron_smooth_sigma, n_iter=kron_iterations,
                           kron_factor=kron_factor, mask_bits=mask_bits)
    if aperture_radius is None:
        aperture_radius = aperture_scale * psf_sigma
    ap = aperture_photometry(image, variance, mask, xc, yc, aperture_radius,
                             mask_bits=mask_bits)
    dtype = np.dtype(MOMENTS_DTYPE.descr + KRON_DTYPE.descr
                     + [("AP_RADIUS", "f4"), ("AP_FLUX", "f4"), ("AP_FLUX_ERR", "f4"),
                        ("AP_MASKED_FRAC", "f4")])
    out = np.zeros(x.size, dtype=dtype)
    for name in MOMENTS_DTYPE.names:
        out[name] = mom[name]
    for name in KRON_DTYPE.names:
        out[name] = kron[name]
    out["AP_RADIUS"] = aperture_radius
    out["AP_FLUX"] = ap.flux[:, 0]
    out["AP_FLUX_ERR"] = ap.flux_err[:, 0]
    out["AP_MASKED_FRAC"] = ap.masked_frac[:, 0]
    return out
