"""Resampling of a detector image onto a sky pixel grid (the IPP's ``pswarp``).

The warp pulls every output pixel from the input: an exact pixel map
``pixel_map(x_out, y_out) -> (x_in, y_in)`` (the stage composes skycell WCS -> sky -> chip
pixel through the camera's astrometry) is evaluated on a coarse grid of nodes every
``grid_step`` output pixels (the IPP's 128-pixel boxes) and interpolated bilinearly inside each
cell (continuous, unlike the IPP's piecewise-linear boxes); the input is then sampled there with
a separable, normalised Lanczos kernel.

Units and conventions
---------------------
- Pixel coordinates are 0-based with the centre of pixel ``[j, i]`` at ``(x, y) = (i, j)``;
  pixel ``i`` covers ``[i - 0.5, i + 0.5)``.
- The output image is the input surface brightness times the Jacobian ``J = |det d(x_in,
  y_in)/d(x_out, y_out)|`` (input pixels per output pixel), so the total flux of a source is
  conserved (ADU stay ADU). The variance is propagated with the squared kernel weights and
  ``J**2``.
- Mask rule (documented in ``docs/warp-stack.md``): let ``f`` be the fraction of the kernel's
  squared weight that falls on unusable input pixels (``mask & bad_bits``, non-finite values,
  or outside the input). Unusable pixels never enter the sums; the remaining weights are
  renormalised. If ``f > conv_fraction`` the output pixel gets ``CONV``; if also
  ``f > poor_fraction**2`` (the IPP's ``POOR.FRAC`` rule) it is unusable itself and gets the
  OR of the unusable inputs' bits (only inputs whose own squared weight fraction exceeds
  ``conv_fraction`` contribute bits). Bits outside ``bad_bits`` (e.g. ``SUSPECT``) are copied
  from the nearest input pixel. Output pixels whose centre maps outside the input get ``GAP``
  and zero image and variance.

The resampling kernel runs compiled with numba when it is importable (about 10x faster than
the vectorised numpy implementation, which is kept as the fallback and as a cross-check).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np

from . import maskbits

try:  # numba is optional; the numpy path computes the same result
    import numba as _numba
except ImportError:  # pragma: no cover - exercised only where numba is absent
    _numba = None

__all__ = ["WarpResult", "PixelMapGrid", "warp_image", "lanczos_weights", "paste_warp",
           "KERNEL_HALF_WIDTH", "HAVE_NUMBA"]

HAVE_NUMBA = _numba is not None

#: kernel name -> half width ``a`` (the kernel spans ``2a`` pixels per axis)
KERNEL_HALF_WIDTH = {"lanczos2": 2, "lanczos3": 3, "lanczos4": 4}

_N_PHASE = 4096  # sub-pixel phases tabulated per kernel (linear interpolation between them)

PixelMap = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class WarpResult:
    """Result of :func:`warp_image`.

    Attributes
    ----------
    image : ndarray of float32, shape ``out_shape``
        Warped image (input units per output pixel, i.e. flux-conserving); 0 where ``GAP``.
    variance : ndarray of float32
        Propagated per-pixel variance (input units squared); 0 where ``GAP``.
    mask : ndarray of uint16
        Output mask bits (``maskbits``): ``GAP`` off the input, ``CONV`` and/or the OR of
        unusable input bits near masked inputs, advisory bits copied from the nearest input.
    covariance_factor : float
        Ratio of the true noise variance per pixel on scales larger than the kernel (what
        sums over apertures see) to the propagated per-pixel variance, for white input noise:
        ``sum(J) / sum(J**2 * sum(w**2))`` over good output pixels (``w`` the normalised
        kernel weights). 1 for a pure integer shift; about 1.3 for Lanczos-3 at random
        sub-pixel phases. NaN if there is no good pixel.
    good_fraction : float
        Fraction of output pixels that are usable (``mask & bad_bits == 0``); the IPP keeps a
        warp when it is at least 0.1.
    jacobian : float
        Mean Jacobian (input pixels per output pixel) over the good output pixels; NaN if none.
    map_error : float
        Largest distance (input pixels) between the interpolated and the exact pixel map at
        the cell centres and edge midpoints, where bilinear interpolation errs most.
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    covariance_factor: float
    good_fraction: float
    jacobian: float
    map_error: float


class PixelMapGrid:
    """An exact pixel map sampled on a coarse grid of output nodes, interpolated bilinearly.

    Nodes sit at multiples of ``grid_step`` in the global output frame, so a skycell warped in
    pieces (different ``out_origin``) sees identical nodes and identical interpolated maps.

    Parameters
    ----------
    pixel_map : callable
        ``pixel_map(x_out, y_out) -> (x_in, y_in)``, vectorised over arrays of output pixel
        coordinates (pixels); non-finite results mark points that do not map to the input.
    out_shape : tuple of int
        ``(ny, nx)`` of the output array (pixels).
    grid_step : int, optional
        Spacing of the exact nodes (output pixels); the IPP's GRID.NX/NY = 128.
    out_origin : tuple of int, optional
        ``(x0, y0)``: global output coordinates of output pixel ``[0, 0]`` (pixels).
    jacobian_step : float, optional
        Half step (output pixels) of the central differences giving the Jacobian at the nodes.
    """

    def __init__(self, pixel_map: PixelMap, out_shape: tuple[int, int], *,
                 grid_step: int = 128, out_origin: tuple[int, int] = (0, 0),
                 jacobian_step: float = 0.5) -> None:
        if not callable(pixel_map):
            raise TypeError(f"pixel_map must be callable (x_out, y_out) -> (x_in, y_in), "
                            f"got {type(pixel_map).__name__}")
        ny, nx = _check_shape(out_shape, "out_shape")
        if int(grid_step) != grid_step or grid_step < 2:
            raise ValueError(f"grid_step must be an integer >= 2 output pixels, got {grid_step!r}")
        if not jacobian_step > 0:
            raise ValueError(f"jacobian_step must be positive, got {jacobian_step!r}")
        self.pixel_map = pixel_map
        self.out_shape = (ny, nx)
        self.grid_step = int(grid_step)
        self.out_origin = (int(out_origin[0]), int(out_origin[1]))
        x0, y0 = self.out_origin
        step = self.grid_step
        kx0 = x0 // step
        kx1 = max(-(-(x0 + nx - 1) // step), kx0 + 1)
        ky0 = y0 // step
        ky1 = max(-(-(y0 + ny - 1) // step), ky0 + 1)
        self.node_x = step * np.arange(kx0, kx1 + 1, dtype=np.float64)
        self.node_y = step * np.arange(ky0, ky1 + 1, dtype=np.float64)
        gx, gy = np.meshgrid(self.node_x, self.node_y)
        self.x_in, self.y_in = self._exact(gx, gy)
        h = float(jacobian_step)
        xpx, ypx = self._exact(gx + h, gy)
        xmx, ymx = self._exact(gx - h, gy)
        xpy, ypy = self._exact(gx, gy + h)
        xmy, ymy = self._exact(gx, gy - h)
        dxdx = (xpx - xmx) / (2 * h)
        dydx = (ypx - ymx) / (2 * h)
        dxdy = (xpy - xmy) / (2 * h)
        dydy = (ypy - ymy) / (2 * h)
        self.jac = np.abs(dxdx * dydy - dxdy * dydx)

    def _exact(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        res = self.pixel_map(x, y)
        try:
            xi, yi = res
        except (TypeError, ValueError):
            raise TypeError("pixel_map must return a pair (x_in, y_in)") from None
        xi = np.asarray(xi, dtype=np.float64)
        yi = np.asarray(yi, dtype=np.float64)
        if xi.shape != np.shape(x) or yi.shape != np.shape(x):
            raise ValueError(f"pixel_map returned shapes {xi.shape} and {yi.shape} for input "
                             f"coordinates of shape {np.shape(x)}")
        return xi, yi

    def _cell(self, x: np.ndarray, y: np.ndarray):
        step = self.grid_step
        fx = (x - self.node_x[0]) / step
        fy = (y - self.node_y[0]) / step
        cx = np.clip(np.floor(fx).astype(np.int64), 0, self.node_x.size - 2)
        cy = np.clip(np.floor(fy).astype(np.int64), 0, self.node_y.size - 2)
        return cx, cy, fx - cx, fy - cy

    @staticmethod
    def _bilinear(g: np.ndarray, cx, cy, u, t) -> np.ndarray:
        top = g[cy, cx] + u * (g[cy, cx + 1] - g[cy, cx])
        bot = g[cy + 1, cx] + u * (g[cy + 1, cx + 1] - g[cy + 1, cx])
        return top + t * (bot - top)

    def __call__(self, x_out: np.ndarray, y_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Interpolated input coordinates (pixels) at global output coordinates (pixels)."""
        x_out = np.asarray(x_out, dtype=np.float64)
        y_out = np.asarray(y_out, dtype=np.float64)
        cx, cy, u, t = self._cell(x_out, y_out)
        return (self._bilinear(self.x_in, cx, cy, u, t),
                self._bilinear(self.y_in, cx, cy, u, t))

    def jacobian(self, x_out: np.ndarray, y_out: np.ndarray) -> np.ndarray:
        """Interpolated ``|det d(x_in, y_in)/d(x_out, y_out)|`` (input pixels per output pixel)."""
        x_out = np.asarray(x_out, dtype=np.float64)
        y_out = np.asarray(y_out, dtype=np.float64)
        cx, cy, u, t = self._cell(x_out, y_out)
        return self._bilinear(self.jac, cx, cy, u, t)

    def max_error(self) -> float:
        """Largest |interpolated - exact| (input pixels) at cell centres and edge midpoints.

        Only points inside the output array are tested; NaN when none maps finitely.
        """
        ny, nx = self.out_shape
        x0, y0 = self.out_origin
        half = 0.5 * self.grid_step
        xs = np.concatenate([self.node_x, self.node_x[:-1] + half])
        ys = np.concatenate([self.node_y, self.node_y[:-1] + half])
        gx, gy = np.meshgrid(xs, ys)
        # skip the nodes themselves (exact by construction)
        keep = ~(np.isin(gx, self.node_x) & np.isin(gy, self.node_y))
        keep &= (gx >= x0) & (gx <= x0 + nx - 1) & (gy >= y0) & (gy <= y0 + ny - 1)
        if not keep.any():  # output smaller than a half cell: test its centre
            gx = np.array([x0 + 0.5 * (nx - 1)])
            gy = np.array([y0 + 0.5 * (ny - 1)])
        else:
            gx, gy = gx[keep], gy[keep]
        xe, ye = self._exact(gx, gy)
        xa, ya = self(gx, gy)
        d = np.hypot(xa - xe, ya - ye)
        d = d[np.isfinite(d)]
        return float(d.max()) if d.size else float("nan")


# --------------------------------------------------------------------------------------------
# Lanczos kernel
# --------------------------------------------------------------------------------------------

def lanczos_weights(frac: np.ndarray, a: int) -> np.ndarray:
    """Exact, normalised 1-D Lanczos weights for sub-pixel phases.

    Parameters
    ----------
    frac : array_like
        Fractional position ``x - floor(x)`` in [0, 1) (pixels).
    a : int
        Kernel half width (3 for Lanczos-3).

    Returns
    -------
    ndarray, shape ``frac.shape + (2a,)``
        Weights of the input pixels ``floor(x) - a + 1 ... floor(x) + a``; they sum to 1.
    """
    frac = np.asarray(frac, dtype=np.float64)
    d = frac[..., None] + (a - 1) - np.arange(2 * a)  # distance from each tap to the point
    w = np.sinc(d) * np.sinc(d / a)
    w[np.abs(d) >= a] = 0.0
    return w / w.sum(axis=-1, keepdims=True)


@functools.lru_cache(maxsize=8)
def _kernel_table(a: int) -> np.ndarray:
    """Normalised weights at ``_N_PHASE + 1`` phases in [0, 1] (rows), for linear interpolation."""
    table = lanczos_weights(np.arange(_N_PHASE + 1) / _N_PHASE, a)
    table.setflags(write=False)
    return table


def _table_weights(table: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """Weights at phases ``frac`` by linear interpolation in the table, rounded to float32
    (as the compiled kernel stores them) and returned as float64."""
    pos = frac * _N_PHASE
    i0 = np.minimum(pos.astype(np.int64), _N_PHASE - 1)
    t = (pos - i0)[:, None]
    w = table[i0] + t * (table[i0 + 1] - table[i0])
    return w.astype(np.float32).astype(np.float64)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------

def warp_image(image: np.ndarray, variance: np.ndarray, mask: np.ndarray,
               pixel_map: Union[PixelMap, PixelMapGrid], *, out_shape: tuple[int, int],
               kernel: str = "lanczos3", grid_step: int = 128,
               out_origin: tuple[int, int] = (0, 0), bad_bits: int = maskbits.BAD,
               poor_fraction: float = 0.01, conv_fraction: float = 1e-8,
               backend: str = "auto") -> WarpResult:
    """Resample an image, its variance and mask onto an output pixel grid (pswarp).

    Parameters
    ----------
    image : ndarray, shape (ny_in, nx_in)
        Input image (ADU or electrons per input pixel).
    variance : ndarray, shape (ny_in, nx_in)
        Input variance (image units squared); non-finite or negative values are unusable.
    mask : ndarray of uint16, shape (ny_in, nx_in)
        Input mask bits (``maskbits``).
    pixel_map : callable or PixelMapGrid
        ``pixel_map(x_out, y_out) -> (x_in, y_in)`` exact and vectorised over global output
        pixel coordinates; or a :class:`PixelMapGrid` built from one (then ``grid_step`` and
        ``out_origin`` are taken from it).
    out_shape : tuple of int
        ``(ny, nx)`` of the output arrays (pixels).
    kernel : {"lanczos3", "lanczos2", "lanczos4"}, optional
        Interpolation kernel (IPP INTERPOLATION.MODE = LANCZOS3).
    grid_step : int, optional
        Spacing of the exactly evaluated map nodes (output pixels; IPP GRID.NX = 128).
    out_origin : tuple of int, optional
        ``(x0, y0)`` global output coordinates of output pixel ``[0, 0]`` (pixels), to warp
        part of a larger grid; nodes stay on the global multiples of ``grid_step``.
    bad_bits : int, optional
        Input mask bits that make a pixel unusable (default ``maskbits.BAD``).
    poor_fraction : float, optional
        IPP POOR.FRAC (0.01): an output pixel whose unusable squared-weight fraction exceeds
        ``poor_fraction**2`` is itself unusable.
    conv_fraction : float, optional
        Squared-weight fraction (1e-8, i.e. 1e-4 in amplitude) above which an unusable input
        marks the output ``CONV``.
    backend : {"auto", "numba", "numpy"}, optional
        Resampling implementation; "auto" uses numba when it is installed.

    Returns
    -------
    WarpResult
        Image, variance, mask (``out_shape``), covariance factor, good fraction, mean
        Jacobian and the map interpolation error.

    Raises
    ------
    ValueError
        If arrays have mismatched shapes or wrong types, or options are out of range.
    """
    image = np.asarray(image)
    variance = np.asarray(variance)
    mask = np.asarray(mask)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"image must be a non-empty 2-D array, got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image must be floating point, got dtype {image.dtype}")
    if variance.shape != image.shape:
        raise ValueError(f"variance has shape {variance.shape}, image has {image.shape}")
    if mask.shape != image.shape:
        raise ValueError(f"mask has shape {mask.shape}, image has {image.shape}")
    if mask.dtype != np.uint16:
        if not np.issubdtype(mask.dtype, np.integer) or (mask.size and (
                mask.min() < 0 or mask.max() > 0xFFFF)):
            raise ValueError(f"mask must hold uint16 bit values, got dtype {mask.dtype}")
        mask = mask.astype(np.uint16)
    if kernel not in KERNEL_HALF_WIDTH:
        raise ValueError(f"kernel must be one of {sorted(KERNEL_HALF_WIDTH)}, got {kernel!r}")
    if not 0 < poor_fraction <= 1:
        raise ValueError(f"poor_fraction must be in (0, 1], got {poor_fraction!r}")
    if not 0 <= conv_fraction < 1:
        raise ValueError(f"conv_fraction must be in [0, 1), got {conv_fraction!r}")
    if backend not in ("auto", "numba", "numpy"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'numpy', got {backend!r}")
    if backend == "numba" and not HAVE_NUMBA:
        raise ValueError("backend='numba' requested but numba is not installed")
    use_numba = HAVE_NUMBA and backend != "numpy"
    ny, nx = _check_shape(out_shape, "out_shape")

    if isinstance(pixel_map, PixelMapGrid):
        grid = pixel_map
        if grid.out_shape != (ny, nx):
            raise ValueError(f"PixelMapGrid was built for out_shape {grid.out_shape}, "
                             f"warp_image got {(ny, nx)}")
    else:
        grid = PixelMapGrid(pixel_map, (ny, nx), grid_step=grid_step, out_origin=out_origin)
    bad_bits = int(bad_bits) & 0xFFFF
    if bad_bits == 0:
        raise ValueError("bad_bits must select at least one mask bit")

    a = KERNEL_HALF_WIDTH[kernel]
    table = _kernel_table(a)
    cell_on = _active_cells(grid, image.shape)
    out_img = np.zeros((ny, nx), dtype=np.float32)
    out_var = np.zeros((ny, nx), dtype=np.float32)
    out_msk = np.full((ny, nx), maskbits.GAP, dtype=np.uint16)
    # stats: [n good, sum J over good, sum J^2 * sum(w^2) over good]
    stats = np.zeros(3, dtype=np.float64)
    if cell_on.any():
        # only the part of the input that the active cells can reach is copied and padded
        x0c, x1c, y0c, y1c = _crop_box(grid, cell_on, a, image.shape)
        crop = (slice(y0c, y1c), slice(x0c, x1c))
        img_pad, var_pad, msk_pad = _pad_inputs(image[crop], variance[crop], mask[crop], a,
                                                bad_bits, use_numba)
        # the input's own edges, in the coordinates of the cropped copy
        bounds = (-0.5 - x0c, image.shape[1] - 0.5 - x0c, -0.5 - y0c, image.shape[0] - 0.5 - y0c)
        args = (img_pad, var_pad, msk_pad, table, a, grid.node_x, grid.node_y,
                grid.x_in - x0c, grid.y_in - y0c, grid.jac, cell_on, float(grid.grid_step),
                float(grid.out_origin[0]), float(grid.out_origin[1]), bounds, bad_bits,
                float(conv_fraction), float(poor_fraction) ** 2, out_img, out_var, out_msk,
                stats)
        if use_numba:
            _numba_kernels(a)[1](*args)
        else:
            _warp_numpy(*args)

    n_good, sum_j, sum_j2s = stats
    return WarpResult(
        image=out_img, variance=out_var, mask=out_msk,
        covariance_factor=float(sum_j / sum_j2s) if n_good > 0 else float("nan"),
        good_fraction=float(n_good / (ny * nx)),
        jacobian=float(sum_j / n_good) if n_good > 0 else float("nan"),
        map_error=grid.max_error(),
    )


# --------------------------------------------------------------------------------------------
# Helpers shared by both backends
# --------------------------------------------------------------------------------------------

def _check_shape(shape, name: str) -> tuple[int, int]:
    try:
        ny, nx = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (ny, nx), got {shape!r}") from None
    if ny <= 0 or nx <= 0:
        raise ValueError(f"{name} must be positive, got {shape!r}")
    return ny, nx


def _pad_inputs(image, variance, mask, a: int, bad_bits: int, use_numba: bool):
    """Copies padded by ``a`` pixels; padding and non-finite pixels are unusable (value 0).

    Non-finite image or variance values (or negative variance) are flagged with ``SAT``, as the
    IPP does before warping, unless the pixel is already masked.
    """
    ny, nx = image.shape
    flag = maskbits.SAT if maskbits.SAT & bad_bits else bad_bits & -bad_bits
    if use_numba:
        img = np.empty((ny + 2 * a, nx + 2 * a), dtype=np.float32)
        var = np.empty_like(img)
        msk = np.empty(img.shape, dtype=np.uint16)
        _numba_kernels(a)[0](image, variance, mask, bad_bits, flag, img, var, msk)
        return img, var, msk
    img = np.zeros((ny + 2 * a, nx + 2 * a), dtype=np.float32)
    var = np.zeros_like(img)
    msk = np.full(img.shape, maskbits.GAP, dtype=np.uint16)
    inner = (slice(a, a + ny), slice(a, a + nx))
    img[inner] = image
    var[inner] = variance
    msk[inner] = mask
    broken = ~(np.isfinite(img[inner]) & np.isfinite(var[inner]) & (var[inner] >= 0))
    if broken.any():
        sub = msk[inner]
        sub[broken & ((sub & bad_bits) == 0)] |= np.uint16(flag)
    unusable = (msk & bad_bits) != 0
    img[unusable] = 0.0
    var[unusable] = 0.0
    return img, var, msk


def _active_cells(grid: PixelMapGrid, in_shape: tuple[int, int]) -> np.ndarray:
    """Cells whose interpolated map can reach the input (the bilinear map stays within the
    range of its four corner values, so the test is exact)."""
    ny, nx = in_shape
    xs = np.stack([grid.x_in[:-1, :-1], grid.x_in[:-1, 1:], grid.x_in[1:, :-1], grid.x_in[1:, 1:]])
    ys = np.stack([grid.y_in[:-1, :-1], grid.y_in[:-1, 1:], grid.y_in[1:, :-1], grid.y_in[1:, 1:]])
    js = np.stack([grid.jac[:-1, :-1], grid.jac[:-1, 1:], grid.jac[1:, :-1], grid.jac[1:, 1:]])
    finite = np.isfinite(xs).all(0) & np.isfinite(ys).all(0) & np.isfinite(js).all(0)
    with np.errstate(invalid="ignore"):
        on = ((xs.max(0) >= -0.5) & (xs.min(0) < nx - 0.5)
              & (ys.max(0) >= -0.5) & (ys.min(0) < ny - 0.5))
    return (on & finite).astype(np.uint8)


def _crop_box(grid: PixelMapGrid, cell_on: np.ndarray, a: int,
              in_shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Input columns x0:x1 and rows y0:y1 that the kernels of the active cells can touch."""
    on = cell_on.astype(bool)

    def corners(g):
        return np.stack([g[:-1, :-1], g[:-1, 1:], g[1:, :-1], g[1:, 1:]])[:, on]

    xs, ys = corners(grid.x_in), corners(grid.y_in)
    ny, nx = in_shape
    x0 = min(max(int(np.floor(xs.min())) - a, 0), nx)
    x1 = max(min(int(np.ceil(xs.max())) + a + 2, nx), x0)
    y0 = min(max(int(np.floor(ys.min())) - a, 0), ny)
    y1 = max(min(int(np.ceil(ys.max())) + a + 2, ny), y0)
    return x0, x1, y0, y1


# --------------------------------------------------------------------------------------------
# numpy backend: vectorised over the pixels of one row of cells at a time
# --------------------------------------------------------------------------------------------

def _warp_numpy(img_pad, var_pad, msk_pad, table, a, node_x, node_y, gx_in, gy_in, gjac,
                cell_on, step, ox, oy, bounds, bad_bits, conv_frac, poor2, out_img, out_var,
                out_msk, stats):
    ny, nx = out_img.shape
    bx0, bx1, by0, by1 = bounds
    width = img_pad.shape[1]
    size = 2 * a
    flat_img = img_pad.ravel()
    flat_var = var_pad.ravel()
    flat_msk = msk_pad.ravel()
    unusable = ((msk_pad & bad_bits) != 0).astype(np.int32)
    # any unusable tap in the window whose top-left padded pixel is (py, px)
    s = np.zeros((unusable.shape[0] + 1, unusable.shape[1] + 1), dtype=np.int32)
    np.cumsum(np.cumsum(unusable, axis=0), axis=1, out=s[1:, 1:])
    dirty_tl = (s[size:, size:] - s[:-size, size:] - s[size:, :-size] + s[:-size, :-size]) > 0
    advisory = np.uint16(~bad_bits & 0xFFFF)
    ncx = node_x.size - 1
    col_x = ox + np.arange(nx)
    col_cell = np.clip(((col_x - node_x[0]) // step).astype(np.int64), 0, ncx - 1)
    for cy in range(node_y.size - 1):
        if not cell_on[cy].any():
            continue
        r0 = max(int(node_y[cy] - oy), 0)
        r1 = min(int(node_y[cy + 1] - oy), ny) if cy < node_y.size - 2 else ny
        if r1 <= r0:
            continue
        cols = np.nonzero(cell_on[cy][col_cell])[0]
        if cols.size == 0:
            continue
        rows = np.arange(r0, r1)
        jj = np.repeat(rows, cols.size)
        ii = np.tile(cols, rows.size)
        xo = ox + ii.astype(np.float64)
        yo = oy + jj.astype(np.float64)
        cx = col_cell[ii]
        u = (xo - node_x[cx]) / step
        t = (yo - node_y[cy]) / step
        cyv = np.full_like(cx, cy)
        xin = PixelMapGrid._bilinear(gx_in, cx, cyv, u, t)
        yin = PixelMapGrid._bilinear(gy_in, cx, cyv, u, t)
        jac = PixelMapGrid._bilinear(gjac, cx, cyv, u, t)
        inside = (xin >= bx0) & (xin < bx1) & (yin >= by0) & (yin < by1)
        jj, ii, xin, yin, jac = jj[inside], ii[inside], xin[inside], yin[inside], jac[inside]
        if jj.size == 0:
            continue
        fx0 = np.floor(xin)
        fy0 = np.floor(yin)
        kx = _table_weights(table, xin - fx0)
        ky = _table_weights(table, yin - fy0)
        px = fx0.astype(np.int64) + 1  # padded column of the first tap
        py = fy0.astype(np.int64) + 1
        base = py * width + px
        near = ((np.floor(yin + 0.5).astype(np.int64) + a) * width
                + np.floor(xin + 0.5).astype(np.int64) + a)
        sx = kx.sum(1)
        sy = ky.sum(1)
        sx2 = (kx * kx).sum(1)
        sy2 = (ky * ky).sum(1)
        dirty = dirty_tl[py, px]

        val = np.zeros(jj.size)
        var = np.zeros(jj.size)
        clean = ~dirty
        b = base[clean]
        kxc, kyc = kx[clean], ky[clean]
        vc = np.zeros(b.size)
        wc = np.zeros(b.size)
        for j in range(size):
            rv = np.zeros(b.size)
            rw = np.zeros(b.size)
            bj = b + j * width
            for i in range(size):
                rv += kxc[:, i] * flat_img[bj + i]
                rw += kxc[:, i] * kxc[:, i] * flat_var[bj + i]
            vc += kyc[:, j] * rv
            wc += kyc[:, j] * kyc[:, j] * rw
        norm = sx[clean] * sy[clean]
        val[clean] = vc / norm
        var[clean] = wc / (norm * norm)
        msk = flat_msk[near] & advisory
        sumw2 = sx2 * sy2 / (sx * sy) ** 2  # sum of squared normalised weights
        good = np.ones(jj.size, dtype=bool)

        if dirty.any():
            d = np.nonzero(dirty)[0]
            bd = base[d]
            kxd, kyd = kx[d], ky[d]
            s2all = sx2[d] * sy2[d]
            sw = np.zeros(d.size)
            sv = np.zeros(d.size)
            svar = np.zeros(d.size)
            sw2 = np.zeros(d.size)
            bad2 = np.zeros(d.size)
            bits = np.zeros(d.size, dtype=np.uint16)
            for j in range(size):
                bj = bd + j * width
                for i in range(size):
                    w = kyd[:, j] * kxd[:, i]
                    w2 = w * w
                    m = flat_msk[bj + i]
                    isbad = (m & bad_bits) != 0
                    ok = ~isbad
                    sw += np.where(ok, w, 0.0)
                    sw2 += np.where(ok, w2, 0.0)
                    sv += np.where(ok, w * flat_img[bj + i], 0.0)
                    svar += np.where(ok, w2 * flat_var[bj + i], 0.0)
                    bad2 += np.where(isbad, w2, 0.0)
                    big = isbad & (w2 > conv_frac * s2all)
                    bits |= np.where(big, m & bad_bits, 0).astype(np.uint16)
            frac = bad2 / s2all
            conv = frac > conv_frac
            poor_bad = frac > poor2
            usable_sum = np.abs(sw) > 0.5 * np.abs(sx[d] * sy[d])
            vd = np.where(usable_sum, sv / np.where(usable_sum, sw, 1.0), 0.0)
            wd = np.where(usable_sum, svar / np.where(usable_sum, sw * sw, 1.0), 0.0)
            val[d] = vd
            var[d] = wd
            sumw2[d] = np.where(usable_sum, sw2 / np.where(usable_sum, sw * sw, 1.0), 0.0)
            md = msk[d]
            md = np.where(conv, md | np.uint16(maskbits.CONV), md)
            md = np.where(poor_bad, md | bits, md)
            msk[d] = md.astype(np.uint16)
            good[d] = ~poor_bad

        out_img[jj, ii] = val * jac
        out_var[jj, ii] = var * jac * jac
        out_msk[jj, ii] = msk
        if good.any():
            stats[0] += good.sum()
            stats[1] += jac[good].sum()
            stats[2] += (jac[good] ** 2 * sumw2[good]).sum()


# --------------------------------------------------------------------------------------------
# numba backend: the same arithmetic, one output pixel at a time
# --------------------------------------------------------------------------------------------

# Reassociation lets the compiler vectorise the tap sums; NaN/Inf semantics are kept (no
# 'nnan'/'ninf'), and unusable inputs are zeroed before the sums anyway.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}


@functools.lru_cache(maxsize=None)
def _numba_kernels(a: int):
    """Compiled (pad, kernel) for half width ``a``; ``a`` is a compile-time constant of the
    closure so that the tap loops have a fixed trip count (unrolled and vectorised)."""
    njit = _numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_FASTMATH)
    size = 2 * a

    @njit
    def pad(image, variance, mask, bad_bits, flag, img_pad, var_pad, msk_pad):
        ny, nx = image.shape
        gap = 0x0020
        for j in range(img_pad.shape[0]):  # border: unusable, no data
            edge_row = j < a or j >= ny + a
            for i in range(img_pad.shape[1]):
                if edge_row or i < a or i >= nx + a:
                    img_pad[j, i] = 0.0
                    var_pad[j, i] = 0.0
                    msk_pad[j, i] = gap
        for j in range(ny):
            for i in range(nx):
                v = image[j, i]
                w = variance[j, i]
                m = mask[j, i]
                if (m & bad_bits) == 0 and not (math.isfinite(v) and math.isfinite(w) and w >= 0):
                    m |= flag
                if m & bad_bits:
                    v = 0.0
                    w = 0.0
                img_pad[j + a, i + a] = v
                var_pad[j + a, i + a] = w
                msk_pad[j + a, i + a] = m

    @njit
    def kernel(img_pad, var_pad, msk_pad, table, a_unused, node_x, node_y, gx_in, gy_in, gjac,
               cell_on, step, ox, oy, bounds, bad_bits, conv_frac, poor2, out_img, out_var,
               out_msk, stats):
        ny, nx = out_img.shape
        bx0, bx1, by0, by1 = bounds
        width = img_pad.shape[1]
        fimg = img_pad.ravel()
        fvar = var_pad.ravel()
        fmsk = msk_pad.ravel()
        nph = table.shape[0] - 1
        ncx = node_x.shape[0] - 1
        nny = node_y.shape[0]
        advisory = (~bad_bits) & 0xFFFF
        conv_bit = 0x4000
        kx = np.empty(size, dtype=np.float32)
        ky = np.empty(size, dtype=np.float32)
        kx2 = np.empty(size, dtype=np.float32)
        rx = np.empty(ncx + 1)
        ry = np.empty(ncx + 1)
        rj = np.empty(ncx + 1)
        n_good = 0.0
        sum_j = 0.0
        sum_j2s = 0.0
        for j in range(ny):
            yo = oy + j
            cy = int(math.floor((yo - node_y[0]) / step))
            if cy > nny - 2:
                cy = nny - 2
            if cell_on[cy].sum() == 0:
                continue
            t = (yo - node_y[cy]) / step
            for k in range(ncx + 1):
                rx[k] = gx_in[cy, k] + t * (gx_in[cy + 1, k] - gx_in[cy, k])
                ry[k] = gy_in[cy, k] + t * (gy_in[cy + 1, k] - gy_in[cy, k])
                rj[k] = gjac[cy, k] + t * (gjac[cy + 1, k] - gjac[cy, k])
            cx = 0
            edge = node_x[1] - ox  # first output column of the next cell
            for i in range(nx):
                while cx < ncx - 1 and i >= edge:
                    cx += 1
                    edge = node_x[cx + 1] - ox
                if cell_on[cy, cx] == 0:
                    continue
                u = (ox + i - node_x[cx]) / step
                xin = rx[cx] + u * (rx[cx + 1] - rx[cx])
                yin = ry[cx] + u * (ry[cx + 1] - ry[cx])
                if not (xin >= bx0 and xin < bx1 and yin >= by0 and yin < by1):
                    continue
                jac = rj[cx] + u * (rj[cx + 1] - rj[cx])
                fx0 = math.floor(xin)
                fy0 = math.floor(yin)
                # kernel weights: linear interpolation in the normalised table
                pos = (xin - fx0) * nph
                i0 = min(int(pos), nph - 1)
                tt = pos - i0
                sx = 0.0
                sx2 = 0.0
                for k in range(size):
                    w = np.float32(table[i0, k] + tt * (table[i0 + 1, k] - table[i0, k]))
                    kx[k] = w
                    kx2[k] = w * w
                    sx += w
                    sx2 += w * w
                pos = (yin - fy0) * nph
                i0 = min(int(pos), nph - 1)
                tt = pos - i0
                sy = 0.0
                sy2 = 0.0
                for k in range(size):
                    w = np.float32(table[i0, k] + tt * (table[i0 + 1, k] - table[i0, k]))
                    ky[k] = w
                    sy += w
                    sy2 += w * w
                # unsigned flat indices: no negative-index wraparound in the inner loops
                base = np.uint64((int(fy0) + 1) * width + int(fx0) + 1)
                near = (int(math.floor(yin + 0.5)) + a) * width + int(math.floor(xin + 0.5)) + a
                msk = fmsk[near] & advisory
                # separable pass; remember whether any tap is unusable
                anybad = 0
                v = 0.0
                w2v = 0.0
                for jj in range(size):
                    rv = np.float32(0.0)
                    rw = np.float32(0.0)
                    b = base + np.uint64(jj * width)
                    for ii in range(size):
                        q = b + np.uint64(ii)
                        anybad |= fmsk[q]
                        rv += kx[ii] * fimg[q]
                        rw += kx2[ii] * fvar[q]
                    v += ky[jj] * rv
                    w2v += ky[jj] * ky[jj] * rw
                norm = sx * sy
                good = True
                if (anybad & bad_bits) == 0:
                    inv = 1.0 / norm
                    val = v * inv
                    var = w2v * inv * inv
                    sumw2 = sx2 * sy2 * inv * inv
                else:
                    s2all = sx2 * sy2
                    sw = 0.0
                    sv = 0.0
                    svar = 0.0
                    sw2 = 0.0
                    bad2 = 0.0
                    bits = 0
                    for jj in range(size):
                        b = base + jj * width
                        for ii in range(size):
                            w = float(ky[jj]) * float(kx[ii])
                            w2 = w * w
                            m = fmsk[b + ii]
                            if m & bad_bits:
                                bad2 += w2
                                if w2 > conv_frac * s2all:
                                    bits |= m & bad_bits
                            else:
                                sw += w
                                sw2 += w2
                                sv += w * fimg[b + ii]
                                svar += w2 * fvar[b + ii]
                    frac = bad2 / s2all
                    if abs(sw) > 0.5 * abs(norm):
                        val = sv / sw
                        var = svar / (sw * sw)
                        sumw2 = sw2 / (sw * sw)
                    else:
                        val = 0.0
                        var = 0.0
                        sumw2 = 0.0
                    if frac > conv_frac:
                        msk |= conv_bit
                    if frac > poor2:
                        msk |= bits
                        good = False
                out_img[j, i] = val * jac
                out_var[j, i] = var * jac * jac
                out_msk[j, i] = msk
                if good:
                    n_good += 1.0
                    sum_j += jac
                    sum_j2s += jac * jac * sumw2
        stats[0] += n_good
        stats[1] += sum_j
        stats[2] += sum_j2s

    return pad, kernel


# ------------------------------------------------------------------------------------------
# pasting one chip's warp into the skycell

def paste_warp(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, owner: np.ndarray,
               good: np.ndarray, origin: tuple[int, int], result: WarpResult, *, scale: float,
               index: int, bad_bits: int, gap_bit: int) -> None:
    """Paste one chip's warp (``result``, a box at ``origin`` = (x0, y0)) into skycell arrays.

    A pixel the chip touched (mask not exactly ``gap_bit``) is taken unless the skycell pixel
    is already good, and then only if it is good itself or no chip has given the pixel
    anything yet (``owner < 0``): the first good value wins, a bad one is kept until a good
    one comes. Taken pixels get the image times ``scale``, the variance times ``scale**2``,
    the mask and ``owner = index``; ``good`` is set where the taken pixel is good. In place.

    Parameters
    ----------
    image, variance : ndarray of float32, shape (ny, nx)
        Skycell image and variance.
    mask : ndarray of uint16
        Skycell mask bits.
    owner : ndarray of int16
        Index of the chip that gave each pixel (-1 none).
    good : ndarray of bool
        Pixels holding a good value.
    origin : (int, int)
        Skycell (x, y) of the box's first pixel.
    result : WarpResult
        :func:`warp_image` output for the box.
    scale : float
        Flux scale of the chip (warp units per chip unit).
    index : int
        The chip's index (stored in ``owner``).
    bad_bits, gap_bit : int
        Mask bits of unusable pixels; the bit of pixels the chip does not reach.
    """
    x0, y0 = (int(v) for v in origin)
    h, w = result.image.shape
    if HAVE_NUMBA:
        _paste_kernel()(image, variance, mask, owner, good, x0, y0, result.image,
                        result.variance, result.mask, np.float32(scale), np.int16(index),
                        np.uint16(bad_bits), np.uint16(gap_bit))
        return
    sub = (slice(y0, y0 + h), slice(x0, x0 + w))
    touched = result.mask != gap_bit
    res_good = touched & ((result.mask & bad_bits) == 0)
    take = touched & ~good[sub] & (res_good | (owner[sub] < 0))
    s = np.float32(scale)
    image[sub][take] = result.image[take] * s
    variance[sub][take] = result.variance[take] * (s * s)
    mask[sub][take] = result.mask[take]
    owner[sub][take] = index
    good[sub] |= res_good & take


_PASTE = None


def _paste_kernel():
    global _PASTE
    if _PASTE is None:
        @_numba.njit(cache=True, nogil=True)
        def paste(img, var, msk, owner, good, x0, y0, rimg, rvar, rmsk, s, k, bad,
                  gap):  # pragma: no cover - compiled
            h, w = rimg.shape
            s2 = s * s
            for j in range(h):
                for i in range(w):
                    m = rmsk[j, i]
                    if m == gap:
                        continue
                    yy = y0 + j
                    xx = x0 + i
                    if good[yy, xx]:
                        continue
                    ok = (m & bad) == 0
                    if ok or owner[yy, xx] < 0:
                        img[yy, xx] = rimg[j, i] * s
                        var[yy, xx] = rvar[j, i] * s2
                        msk[yy, xx] = m
                        owner[yy, xx] = k
                        if ok:
                            good[yy, xx] = True
        _PASTE = paste
    return _PASTE
