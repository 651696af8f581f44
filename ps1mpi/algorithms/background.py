"""Sky background model: robust sky per cell, median-filtered, bicubic-spline surface.

The model is a tensor-product cubic spline (not-a-knot) whose nodes are spaced by about
``cell`` pixels (400 in the GPC1 chip recipe) with the first and last nodes on the image
edges, so the model is never extrapolated inside the image (extrapolating a spline from
cell centres to the image corners amplifies the noise of the corner cells several times).
It is built in two passes:

1. Pass 1 samples the pixels on a regular stride, about ``npix`` per ``cell x cell`` area
   (the IPP's ``IMSTATS_NPIX``, 10000); masked and non-finite pixels are dropped.
2. The samples are grouped into statistics cells of ``cell / subcells`` pixels (four per node
   interval along each axis). In every cell the sky is found from the histogram of its
   pixels: iterative asymmetric sigma clipping (3 sigma below, 2.5 above the median, the
   robust sigma from the inter-quartile range), then a Gaussian fitted to the histogram near
   its peak (0.25-sigma bins over [-2.5, +1.5] sigma): the mode of the sky distribution,
   the IPP's "fitted mean", which the positive tail of faint sources hardly moves.
3. The spline node values are fitted to the cell values by linear least squares (there
   are about 16 cells per node, so the noise is averaged and the edge nodes are well
   determined). The scatter of the cells about that fit is median filtered over 3x3 cells
   and fitted again as a correction: an outlying cell (the halo of a bright star) is
   replaced by the median of its neighbours, while a gradient passes unchanged.
4. Pixels of sources are found on an 8x8-binned copy of the image (bins more than 2.5
   sigma of the bin mean above the pass-1 model, grown by one bin). Pass 2 takes every
   unmasked non-source pixel, measures the cell statistics of its residual from the pass-1
   model (so a gradient within a cell does not widen the distribution), and adds the fitted
   correction to the node values.

``sigma``, the sky noise per pixel, is the median over cells of the clipped robust standard
deviation, corrected for the truncation of the clipping.

All values are in the units of the image (ADU); positions are 0-based pixel coordinates where
the centre of pixel ``[j, i]`` is ``(x, y) = (i, j)``.

With numba (a project dependency) the full-image passes (the subsample, the binned sums and
the pass-2 histograms, which evaluate the pass-1 model row by row) are compiled loops that
read the image and mask directly; without it the numpy path gives the same model to float
rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from scipy.interpolate import CubicSpline
from scipy.stats import norm

from . import maskbits

try:  # numba is a dependency; the numpy path computes the same result without it
    import numba

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None
    _HAVE_NUMBA = False

__all__ = ["BackgroundModel", "fit_background", "spline_weights"]

_IQR_TO_SIGMA = 1.0 / 1.3489795003921634


def spline_weights(nodes: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Weights of the background interpolant through ``nodes`` evaluated at ``coords``.

    Between the outermost nodes the interpolant is a not-a-knot cubic spline (exact for
    polynomials up to degree 3); beyond them it continues as a straight line with the
    spline's end value and end slope, which keeps the noise of the edge cells from being
    amplified by cubic extrapolation. The interpolant is linear in the node values: the
    curve through values ``v`` is ``spline_weights(nodes, coords) @ v``.

    Parameters
    ----------
    nodes : ndarray, shape (n,)
        Strictly increasing node positions (pixels).
    coords : ndarray, shape (m,)
        Positions where the interpolant is evaluated (pixels).

    Returns
    -------
    ndarray, shape (m, n)
        Interpolation weights (float64). With one node the weights are all 1 (a constant);
        with two nodes the interpolant is a straight line; with three a parabola.
    """
    nodes = np.asarray(nodes, dtype=np.float64)
    coords = np.asarray(coords, dtype=np.float64).ravel()
    n = nodes.size
    if n == 0:
        raise ValueError("spline_weights: nodes is empty")
    if n == 1:
        return np.ones((coords.size, 1))
    if np.any(np.diff(nodes) <= 0):
        raise ValueError("spline_weights: nodes must be strictly increasing")
    if n == 2:
        t = (coords - nodes[0]) / (nodes[1] - nodes[0])
        return np.stack([1.0 - t, t], axis=1)
    spline = CubicSpline(nodes, np.eye(n), axis=0, bc_type="not-a-knot")
    inside = np.clip(coords, nodes[0], nodes[-1])
    w = np.asarray(spline(inside))
    below = coords < nodes[0]
    above = coords > nodes[-1]
    if np.any(below):
        w[below] += (coords[below] - nodes[0])[:, None] * spline(nodes[:1], 1)
    if np.any(above):
        w[above] += (coords[above] - nodes[-1])[:, None] * spline(nodes[-1:], 1)
    return w



def _spline_pieces(nodes: np.ndarray, n: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The interpolant of :func:`spline_weights` on pixels ``0..n-1`` as polynomial pieces.

    Returns ``(coef, origin, start, end)``: on pixels ``start[m]:end[m]`` the curve through
    node values ``v`` is ``sum_d (coef[m, d] @ v) t^(3-d)`` with ``t = pixel - origin[m]``
    (the spline's cubic between two nodes, a straight line beyond the outer nodes).
    ``coef`` has shape (pieces, 4, nodes).
    """
    nodes = np.asarray(nodes, dtype=np.float64)
    nn = nodes.size
    pix = np.arange(n, dtype=np.float64)
    if nn == 1:
        coef = np.zeros((1, 4, 1))
        coef[0, 3, 0] = 1.0
        return coef, np.zeros(1), np.array([0]), np.array([n])
    if nn == 2:
        h = nodes[1] - nodes[0]
        coef = np.zeros((1, 4, 2))
        coef[0, 2] = [-1.0 / h, 1.0 / h]
        coef[0, 3] = [1.0, 0.0]
        return coef, nodes[:1].copy(), np.array([0]), np.array([n])
    spline = CubicSpline(nodes, np.eye(nn), axis=0, bc_type="not-a-knot")
    c = np.moveaxis(np.asarray(spline.c), 0, 1)            # (nn - 1, 4, nn)
    coef = np.zeros((nn + 1, 4, nn))
    coef[1:nn] = c
    coef[0, 2] = spline(nodes[0], 1)
    coef[0, 3] = np.eye(nn)[0]
    coef[nn, 2] = spline(nodes[-1], 1)
    coef[nn, 3] = np.eye(nn)[-1]
    origin = np.concatenate([nodes[:1], nodes[:-1], nodes[-1:]])
    piece = np.clip(np.searchsorted(nodes, pix, side="right") - 1, 0, nn - 2) + 1
    piece[pix < nodes[0]] = 0
    piece[pix > nodes[-1]] = nn
    start = np.searchsorted(piece, np.arange(nn + 1), side="left")
    end = np.searchsorted(piece, np.arange(nn + 1), side="right")
    return coef, origin, start, end


def _hist_cdf(F: np.ndarray, x: np.ndarray, width: float) -> np.ndarray:
    """Cumulative counts below ``x`` from cumulative histograms ``F`` (linear within bins).

    ``F`` has shape (ncells, nb + 1) with ``F[:, j]`` the count below edge
    ``(j - nb / 2) * width``; ``x`` has shape (ncells,) or (ncells, m).
    """
    nb = F.shape[1] - 1
    xx = x if x.ndim == 2 else x[:, None]
    u = np.clip(np.nan_to_num(xx / width + 0.5 * nb, nan=0.0), 0.0, float(nb))
    j = np.minimum(np.floor(u).astype(np.int64), nb - 1)
    f0 = np.take_along_axis(F, j, axis=1)
    f1 = np.take_along_axis(F, j + 1, axis=1)
    out = f0 + (u - j) * (f1 - f0)
    return out if x.ndim == 2 else out[:, 0]


def _hist_quantile(F: np.ndarray, t: np.ndarray, width: float) -> np.ndarray:
    """Value below which ``t`` counts lie (inverse of :func:`_hist_cdf`)."""
    if _HAVE_NUMBA:
        out = np.empty(F.shape[0])
        _hist_quantile_nb(F, np.ascontiguousarray(t, dtype=np.float64), float(width), out)
        return out
    nb = F.shape[1] - 1
    j = np.sum(F[:, 1:] < t[:, None], axis=1)
    j = np.minimum(j, nb - 1)
    f0 = np.take_along_axis(F, j[:, None], axis=1)[:, 0]
    f1 = np.take_along_axis(F, j[:, None] + 1, axis=1)[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(f1 > f0, (t - f0) / (f1 - f0), 0.5)
    return (j + np.clip(frac, 0.0, 1.0) - 0.5 * nb) * width


def _hist_robust_sky(H: np.ndarray, width: float, *, clip_low: float, clip_high: float,
                     max_iter: int, min_pixels: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Robust sky of every cell from its histogram.

    ``H`` (ncells, nb) counts values in bins of ``width`` centred on zero (bin ``j`` covers
    ``[(j - nb/2) width, (j + 1 - nb/2) width)``; the outermost bins also hold everything
    beyond). The median and the robust sigma (inter-quartile range) are iterated with
    asymmetric clipping at ``-clip_low`` and ``+clip_high`` sigma; the sky is then the
    vertex of a Gaussian (a parabola in log counts, weighted least squares) fitted to the
    histogram in 0.25-sigma bins over [-2.5, +1.5] sigma around the clipped median, which
    is the mode of the distribution and insensitive to the positive tail of faint sources.

    Returns ``(sky, sigma, n_used)``; NaN where fewer than ``min_pixels`` values remain.
    """
    ncells = H.shape[0]
    F = np.concatenate([np.zeros((ncells, 1)), np.cumsum(H, axis=1, dtype=np.float64)],
                       axis=1)
    total = F[:, -1]
    a = np.zeros(ncells)
    b = total.copy()
    med = sig = None
    for _ in range(max_iter):
        n = b - a
        med = _hist_quantile(F, a + 0.5 * n, width)
        q1 = _hist_quantile(F, a + 0.25 * n, width)
        q3 = _hist_quantile(F, a + 0.75 * n, width)
        sig = (q3 - q1) * _IQR_TO_SIGMA
        sig = np.where(sig > 0, sig, width)
        a_new = _hist_cdf(F, med - clip_low * sig, width)
        b_new = _hist_cdf(F, med + clip_high * sig, width)
        done = np.all(np.abs(a_new - a) < 0.5) and np.all(np.abs(b_new - b) < 0.5)
        a, b = a_new, b_new
        if done:
            break
    n = b - a
    med = _hist_quantile(F, a + 0.5 * n, width)
    sig = (_hist_quantile(F, a + 0.75 * n, width)
           - _hist_quantile(F, a + 0.25 * n, width)) * _IQR_TO_SIGMA
    # the IQR of a Gaussian truncated at (-clip_low, +clip_high) sigma is slightly smaller
    # than the full one; correct by the ratio for a pure Gaussian
    sig = sig * _truncated_iqr_correction(clip_low, clip_high)
    edges_u = np.arange(-2.5, 1.5001, 0.25)
    centres_u = 0.5 * (edges_u[:-1] + edges_u[1:])
    cum = _hist_cdf(F, med[:, None] + sig[:, None] * edges_u[None, :], width)
    nbin = np.diff(cum, axis=1)
    w = np.where(nbin > 0.5, nbin, 0.0)        # var(log n) = 1/n
    logn = np.log(np.where(nbin > 0.5, nbin, 1.0))
    X = np.stack([np.ones_like(centres_u), centres_u, centres_u ** 2], axis=1)
    A = np.einsum("cb,bi,bj->cij", w, X, X)
    rhs = np.einsum("cb,bi,cb->ci", w, X, logn)
    good = (np.sum(w > 0, axis=1) >= 5) & np.isfinite(sig) & (sig > 0)
    good &= np.abs(np.linalg.det(A)) > 1e-9 * np.maximum(np.sum(w, axis=1), 1.0) ** 3
    coef = np.full((ncells, 3), np.nan)
    if np.any(good):
        coef[good] = np.linalg.solve(A[good], rhs[good][..., None])[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        mode_u = -coef[:, 1] / (2.0 * coef[:, 2])
    fit_ok = good & (coef[:, 2] < 0) & (np.abs(mode_u) < 1.0)
    sky = np.where(fit_ok, med + mode_u * sig, med)
    few = n < min_pixels
    sky[few] = np.nan
    sig[few] = np.nan
    return sky, sig, n


def _truncated_iqr_correction(clip_low: float, clip_high: float) -> float:
    """Ratio sigma / (IQR/1.349) for a unit Gaussian truncated at (-clip_low, +clip_high)."""
    a, b = norm.cdf(-clip_low), norm.cdf(clip_high)
    q25 = norm.ppf(a + 0.25 * (b - a))
    q75 = norm.ppf(a + 0.75 * (b - a))
    return float(1.3489795003921634 / (q75 - q25))



def _fill_missing(grid: np.ndarray, name: str) -> np.ndarray:
    """Replace NaN cells by the mean of their valid neighbours, growing inwards."""
    g = grid.copy()
    if not np.any(np.isfinite(g)):
        raise ValueError(f"{name}: no cell of the image has enough unmasked sky pixels")
    while np.any(~np.isfinite(g)):
        ok = np.isfinite(g)
        s = ndi.convolve(np.where(ok, g, 0.0), np.ones((3, 3)), mode="constant")
        n = ndi.convolve(ok.astype(np.float64), np.ones((3, 3)), mode="constant")
        fill = (~ok) & (n > 0)
        g[fill] = s[fill] / n[fill]
    return g



def _median_filter_cells(grid: np.ndarray, size: int) -> np.ndarray:
    """Median filter over cells (mirror padding at the edges)."""
    if size <= 1:
        return grid.copy()
    sy = size if grid.shape[0] >= 2 else 1
    sx = size if grid.shape[1] >= 2 else 1
    return ndi.median_filter(grid, size=(sy, sx), mode="reflect")


@dataclass(frozen=True)
class BackgroundModel:
    """A smooth sky model: node values of a tensor-product cubic spline.

    Attributes
    ----------
    grid : ndarray, shape (ny_nodes, nx_nodes)
        Sky level at the nodes (ADU). Saved as the background-model product.
    x_nodes, y_nodes : ndarray
        Pixel coordinates of the nodes along x and y (pixels); the first node is at 0 and
        the last at ``n - 1``.
    sigma : float
        Sky noise: median over statistics cells of the robust standard deviation of the
        sky pixels (ADU per pixel).
    image_shape : tuple of int
        ``(ny, nx)`` of the image the model was fitted to.
    cell_values : ndarray, shape (ny_cells, nx_cells)
        Robust sky of every statistics cell in the final pass, before median filtering
        (ADU); NaN where a cell had too few sky pixels.
    cell_sigma : ndarray, shape (ny_cells, nx_cells)
        Robust standard deviation of the sky pixels of every statistics cell (ADU).
    cell_x, cell_y : ndarray
        Pixel coordinates of the centres of the statistics cells.
    cell_npix : ndarray, shape (ny_cells, nx_cells)
        Number of sampled sky pixels used in every statistics cell.
    """

    grid: np.ndarray
    x_nodes: np.ndarray
    y_nodes: np.ndarray
    sigma: float
    image_shape: tuple[int, int] = (0, 0)
    cell_values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    cell_sigma: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    cell_x: np.ndarray = field(default_factory=lambda: np.zeros(0))
    cell_y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    cell_npix: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))

    def evaluate(self, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Evaluate the model on every pixel of an image.

        Parameters
        ----------
        shape : tuple of int, optional
            ``(ny, nx)`` of the image; defaults to the shape the model was fitted to.
            Pixels beyond the outer nodes are extrapolated linearly.

        Returns
        -------
        ndarray, shape (ny, nx), float32
            Sky level (ADU).
        """
        if shape is None:
            shape = self.image_shape
        ny, nx = (int(s) for s in shape)
        if ny <= 0 or nx <= 0:
            raise ValueError(f"BackgroundModel.evaluate: shape {shape} must be positive")
        wy = spline_weights(self.y_nodes, np.arange(ny, dtype=np.float64))
        if _HAVE_NUMBA:
            # every row is the x-spline through its node values, as cubic pieces (Horner)
            out = np.empty((ny, nx), np.float32)
            _eval_rows_nb(np.ascontiguousarray(wy @ self.grid), *_spline_pieces(self.x_nodes, nx),
                          out)
            return out
        wx = spline_weights(self.x_nodes, np.arange(nx, dtype=np.float64))
        rows = (wy @ self.grid).astype(np.float32)          # (ny, nx_nodes)
        return rows @ wx.T.astype(np.float32)                # (ny, nx)

    def evaluate_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Evaluate the model at arbitrary positions.

        Parameters
        ----------
        x, y : array_like
            Pixel coordinates (same shape).

        Returns
        -------
        ndarray
            Sky level (ADU), float64, with the shape of ``x``.
        """
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"BackgroundModel.evaluate_at: x {x.shape} and y {y.shape} differ")
        wy = spline_weights(self.y_nodes, y.ravel())
        wx = spline_weights(self.x_nodes, x.ravel())
        return np.einsum("ij,jk,ik->i", wy, self.grid, wx).reshape(x.shape)

    def evaluate_grid(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Evaluate the model on the outer product of row positions ``y`` and columns ``x``.

        Parameters
        ----------
        y, x : array_like, 1-D
            Pixel coordinates of the rows and of the columns.

        Returns
        -------
        ndarray, shape (len(y), len(x)), float64
            Sky level (ADU).
        """
        return (spline_weights(self.y_nodes, np.asarray(y, dtype=np.float64)) @ self.grid
                @ spline_weights(self.x_nodes, np.asarray(x, dtype=np.float64)).T)


def _nodes(n: int, cell: int) -> np.ndarray:
    """Node positions along one axis: spaced by about ``cell``, first at 0, last at n-1."""
    nseg = int(round((n - 1) / cell))
    if n >= 2:
        nseg = max(nseg, 1)
    return np.linspace(0.0, n - 1.0, nseg + 1)


def _cell_centres(n: int, size: int) -> np.ndarray:
    """Pixel coordinate of the centre of every statistics cell along one axis."""
    starts = np.arange(0, n, size)
    ends = np.minimum(starts + size, n)
    return 0.5 * (starts + ends - 1).astype(np.float64)


_CHUNK_ROWS = 128


def _cell_histograms(rows_values, rows_ok, nrows: int, centre: float, width: float,
                     nbins: int, row_cell: np.ndarray, col_cell: np.ndarray,
                     shape: tuple[int, int]) -> np.ndarray:
    """Histograms (ncells, nbins) of ``values - centre`` in every statistics cell.

    Bin ``j`` covers ``[(j - nbins/2) width, (j + 1 - nbins/2) width)``; values beyond the
    range go into the outermost bins. ``rows_values(r0, r1)`` and ``rows_ok(r0, r1)`` return
    the values (float32) and the usable-pixel flags (bool or None for all) of rows
    ``r0:r1``; the work is done in blocks of rows to stay in cache. ``row_cell`` /
    ``col_cell`` give the cell row / column of every row / column.
    """
    ky, kx = shape
    ncells = ky * kx
    dump = ncells * nbins
    col_off = (col_cell.astype(np.int64) * nbins)[None, :]
    counts = np.zeros(dump + 1, dtype=np.int64)
    scale = np.float32(1.0 / width)
    shift = np.float32(0.5 * nbins - centre / width)
    for r0 in range(0, nrows, _CHUNK_ROWS):
        r1 = min(r0 + _CHUNK_ROWS, nrows)
        u = np.asarray(rows_values(r0, r1), dtype=np.float32) * scale
        u += shift
        np.nan_to_num(u, copy=False)
        np.clip(u, 0, nbins - 1, out=u)
        idx = u.astype(np.int64)
        idx += col_off
        idx += (row_cell[r0:r1].astype(np.int64) * (kx * nbins))[:, None]
        ok = rows_ok(r0, r1)
        if ok is not None:
            np.putmask(idx, ~ok, dump)
        counts += np.bincount(idx.ravel(), minlength=dump + 1)
    return counts[:-1].reshape(ncells, nbins)


def _binned_sums(image: np.ndarray, good: np.ndarray | None, binning: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Sum and number of usable pixels in every ``binning x binning`` bin (whole bins)."""
    ny, nx = image.shape
    b = binning
    nby, nbx = ny // b, nx // b
    s = np.zeros((nby, nbx))
    n = np.zeros((nby, nbx))
    rows = max(b, (_CHUNK_ROWS // b) * b)
    for r0 in range(0, nby * b, rows):
        r1 = min(r0 + rows, nby * b)
        blk = np.asarray(image[r0:r1, :nbx * b], dtype=np.float32)
        if good is not None:
            ok = good[r0:r1, :nbx * b]
            blk = np.where(ok, blk, np.float32(0))
            n[r0 // b:r1 // b] = ok.reshape(-1, b, nbx, b).sum(axis=(1, 3))
        else:
            n[r0 // b:r1 // b] = b * b
        s[r0 // b:r1 // b] = blk.reshape(-1, b, nx // b * b).sum(axis=1, dtype=np.float64) \
            .reshape(-1, nbx, b).sum(axis=2)
    return s, n


# ----------------------------------------------------------------------------------------
# compiled kernels (numba): the full-image passes read the image, mask and source mask
# directly (no boolean image of usable pixels, no full-resolution model image)


if _HAVE_NUMBA:
    _JIT = dict(cache=True, nogil=True, boundscheck=False, error_model="numpy")

    @numba.njit(**_JIT)
    def _usable_row(image, mask, use_mask, bits, src, use_src, j, i0, i1,
                    ok):  # pragma: no cover - compiled
        """Usable-pixel flags of ``image[j, i0:i1]`` into ``ok[:i1 - i0]``: finite, none of
        ``bits`` set, not in the source mask."""
        row = image[j, i0:i1]
        for i in range(row.size):
            ok[i] = np.isfinite(row[i])
        if use_mask:
            mrow = mask[j, i0:i1]
            for i in range(row.size):
                ok[i] &= (mrow[i] & bits) == 0
        if use_src:
            srow = src[j, i0:i1]
            for i in range(row.size):
                ok[i] &= not srow[i]

    @numba.njit(**_JIT)
    def _hist_quantile_nb(F, t, width, out):  # pragma: no cover - compiled
        """:func:`_hist_quantile` with a binary search in every (non-decreasing) row."""
        nb = F.shape[1] - 1
        for c in range(F.shape[0]):
            lo = 0
            hi = nb
            tc = t[c]
            while lo < hi:                  # entries of F[c, 1:] below tc
                mid = (lo + hi) // 2
                if F[c, 1 + mid] < tc:
                    lo = mid + 1
                else:
                    hi = mid
            j = min(lo, nb - 1)
            f0 = F[c, j]
            f1 = F[c, j + 1]
            frac = (tc - f0) / (f1 - f0) if f1 > f0 else 0.5
            if frac < 0.0:
                frac = 0.0
            elif frac > 1.0:
                frac = 1.0
            out[c] = (j + frac - 0.5 * nb) * width

    @numba.njit(**_JIT)
    def _row_diffs_nb(sub, sub_ok):  # pragma: no cover - compiled
        """Differences of horizontally adjacent usable samples (float32)."""
        ny, nx = sub.shape
        out = np.empty(ny * max(nx - 1, 0), np.float32)
        n = 0
        for j in range(ny):
            for i in range(nx - 1):
                if sub_ok[j, i] and sub_ok[j, i + 1]:
                    out[n] = sub[j, i + 1] - sub[j, i]
                    n += 1
        return out[:n]

    @numba.njit(**_JIT)
    def _float_keys(x):  # pragma: no cover - compiled
        """Unsigned keys of float32 values that sort in the order of the values."""
        u = x.view(np.uint32)
        out = np.empty(u.size, np.uint32)
        for i in range(u.size):
            v = u[i]
            out[i] = (v ^ np.uint32(0x80000000)) if v < np.uint32(0x80000000) else ~v
        return out

    @numba.njit(**_JIT)
    def _kth_key(keys, k):  # pragma: no cover - compiled
        """The ``k``-th smallest (0-based) key: radix selection on 16 + 16 bits."""
        hist = np.zeros(65536, np.int64)
        for i in range(keys.size):
            hist[keys[i] >> np.uint32(16)] += 1
        acc = 0
        top = 0
        for t in range(65536):
            if acc + hist[t] > k:
                top = t
                break
            acc += hist[t]
        hist[:] = 0
        for i in range(keys.size):
            if (keys[i] >> np.uint32(16)) == top:
                hist[keys[i] & np.uint32(0xFFFF)] += 1
        low = 0
        for t in range(65536):
            if acc + hist[t] > k:
                low = t
                break
            acc += hist[t]
        return np.uint32((top << 16) | low)

    @numba.njit(**_JIT)
    def _key_value(key):  # pragma: no cover - compiled
        """The float32 value of a key of :func:`_float_keys`."""
        v = (key ^ np.uint32(0x80000000)) if key >= np.uint32(0x80000000) else ~key
        return np.array([v], np.uint32).view(np.float32)[0]

    @numba.njit(**_JIT)
    def _median_f32_nb(x):  # pragma: no cover - compiled
        """``np.median`` of a non-empty float32 array without NaN (same value: the middle
        element, or the float32 mean of the two middle ones)."""
        keys = _float_keys(x)
        n = x.size
        if n % 2 == 1:
            return _key_value(_kth_key(keys, n // 2))
        a = _key_value(_kth_key(keys, n // 2 - 1))
        b = _key_value(_kth_key(keys, n // 2))
        return (a + b) / np.float32(2.0)

    @numba.njit(**_JIT)
    def _subsample_nb(image, mask, use_mask, bits, src, use_src, ys, xs, sub,
                      sub_ok):  # pragma: no cover - compiled
        """Strided subsample (float32) and its usable-pixel flags."""
        for a in range(ys.size):
            j = ys[a]
            for b in range(xs.size):
                i = xs[b]
                v = image[j, i]
                ok = np.isfinite(v)
                if use_mask:
                    ok &= (mask[j, i] & bits) == 0
                if use_src:
                    ok &= not src[j, i]
                sub[a, b] = v
                sub_ok[a, b] = ok

    @numba.njit(**_JIT)
    def _hist_nb(vals, ok, scale, shift, nbins, row_cell, col_cell, kx,
                 counts):  # pragma: no cover - compiled
        """Per-cell histograms of ``vals`` (see :func:`_cell_histograms`); ``counts`` has
        ``ncells * nbins + 1`` entries, the last collecting unusable pixels."""
        dump = counts.size - 1
        top = np.float32(nbins - 1)
        zero = np.float32(0.0)
        for j in range(vals.shape[0]):
            roff = row_cell[j] * kx * nbins
            for i in range(vals.shape[1]):
                if not ok[j, i]:
                    counts[dump] += 1
                    continue
                u = vals[j, i] * scale
                u += shift
                if np.isnan(u):
                    u = zero
                u = min(max(u, zero), top)
                counts[int(u) + col_cell[i] * nbins + roff] += 1

    @numba.njit(**_JIT)
    def _binned_sums_nb(image, mask, use_mask, bits, src, use_src, binning, s,
                        n):  # pragma: no cover - compiled
        """Sum (of float32 values) and count of usable pixels in every whole bin."""
        nby, nbx = s.shape
        w = nbx * binning
        ok = np.empty(w, np.bool_)
        rs = np.empty(w)
        rn = np.empty(w)
        for by in range(nby):
            rs[:] = 0.0
            rn[:] = 0.0
            for j in range(by * binning, (by + 1) * binning):
                _usable_row(image, mask, use_mask, bits, src, use_src, j, 0, w, ok)
                row = image[j, :w]
                for i in range(w):
                    v = np.float32(row[i])
                    rs[i] += v if ok[i] else 0.0
                    rn[i] += 1.0 if ok[i] else 0.0
            for bx in range(nbx):
                a = 0.0
                c = 0.0
                for i in range(bx * binning, (bx + 1) * binning):
                    a += rs[i]
                    c += rn[i]
                s[by, bx] = a
                n[by, bx] = c

    @numba.njit(**_JIT)
    def _row_model(crow, coef, origin, start, end, out):  # pragma: no cover - compiled
        """One row of the model: the x-spline through the node values ``crow``."""
        npc, _, nn = coef.shape
        for m in range(npc):
            if end[m] <= start[m]:
                continue
            p0 = 0.0
            p1 = 0.0
            p2 = 0.0
            p3 = 0.0
            for k in range(nn):
                p0 += crow[k] * coef[m, 0, k]
                p1 += crow[k] * coef[m, 1, k]
                p2 += crow[k] * coef[m, 2, k]
                p3 += crow[k] * coef[m, 3, k]
            o = origin[m]
            for i in range(start[m], end[m]):
                t = i - o
                out[i] = ((p0 * t + p1) * t + p2) * t + p3

    @numba.njit(**_JIT)
    def _eval_rows_nb(rows, coef, origin, start, end, out):  # pragma: no cover - compiled
        """The model on every pixel: row ``j`` through node values ``rows[j]``."""
        for j in range(out.shape[0]):
            _row_model(rows[j], coef, origin, start, end, out[j])

    @numba.njit(**_JIT)
    def _resid_hist_nb(image, mask, use_mask, bits, src, use_src, srcbin, use_srcbin,
                       binning, rows, coef, origin, start, end, scale, shift, nbins, row_cell,
                       col_cell, kx, counts):  # pragma: no cover - compiled
        """Per-cell histograms of the residuals from the model (row ``j`` the x-spline
        through node values ``rows[j]``, see :func:`_spline_pieces`), excluding the bins of
        ``srcbin`` (see :func:`_cell_histograms` and the pass-2 notes of
        :func:`fit_background`)."""
        ny, nx = image.shape
        dump = counts.size - 1
        top = np.float32(nbins - 1)
        zero = np.float32(0.0)
        model = np.empty(nx, np.float32)
        ok = np.empty(nx, np.bool_)
        idx = np.empty(nx, np.int64)
        nsy, nsx = srcbin.shape
        coloff = np.empty(nx, np.int64)
        colbin = np.empty(nx, np.int64)
        rowsrc = np.zeros(nx, np.bool_)
        for i in range(nx):
            coloff[i] = col_cell[i] * nbins
            colbin[i] = min(i // binning, nsx - 1)
        for j in range(ny):
            _row_model(rows[j], coef, origin, start, end, model)
            _usable_row(image, mask, use_mask, bits, src, use_src, j, 0, nx, ok)
            if use_srcbin and j // binning < nsy:
                if j % binning == 0:
                    brow = srcbin[j // binning]
                    for i in range(nx):
                        rowsrc[i] = brow[colbin[i]]
                for i in range(nx):
                    ok[i] &= not rowsrc[i]
            roff = row_cell[j] * kx * nbins
            row = image[j]
            for i in range(nx):
                u = (np.float32(row[i]) - model[i]) * scale
                u += shift
                u = zero if np.isnan(u) else u
                u = min(max(u, zero), top)
                idx[i] = int(u) + coloff[i] + roff if ok[i] else dump
            for i in range(nx):
                counts[idx[i]] += 1


def _binned_source_mask(sums: np.ndarray, npix: np.ndarray, model: BackgroundModel,
                        *, binning: int, nsigma: float, grow: int) -> np.ndarray:
    """Binned map (True = source) of bins significantly above the current model."""
    nby, nbx = sums.shape
    b = binning
    if nby == 0 or nbx == 0:
        return np.zeros((max(nby, 1), max(nbx, 1)), dtype=bool)
    sky = model.evaluate_grid(np.arange(nby) * b + 0.5 * (b - 1),
                              np.arange(nbx) * b + 0.5 * (b - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        excess = (sums / npix - sky) * np.sqrt(npix) / model.sigma
    src = (npix > 0) & (excess > nsigma)
    if grow > 0:
        src = ndi.binary_dilation(src, structure=np.ones((3, 3), dtype=bool), iterations=grow)
    return src


def fit_background(image: np.ndarray, mask: np.ndarray | None = None, *, cell: int = 400,
                   subcells: int = 4, npix: int = 10000, clip_low: float = 3.0,
                   clip_high: float = 2.5, max_iter: int = 10, min_pixels: int = 50,
                   median_size: int = 3, mask_bits: int = maskbits.BAD,
                   source_mask: np.ndarray | None = None, mask_sources: bool = True,
                   source_binning: int = 8, source_nsigma: float = 2.5,
                   source_grow: int = 1) -> BackgroundModel:
    """Fit a smooth sky background model to an image.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Image (ADU), float.
    mask : ndarray of uint16, shape (ny, nx), optional
        Bit mask; pixels with any of ``mask_bits`` set are ignored.
    cell : int
        Spacing of the spline nodes (pixels), 400 in the GPC1 chip recipe; the number of
        node intervals along an axis is ``round((n - 1) / cell)`` (at least 1).
    subcells : int
        Statistics cells per node interval along each axis; the cells are
        ``cell / subcells`` pixels wide (smaller for images smaller than ``cell``).
    npix : int
        Pixels sampled (on a regular stride) per ``cell x cell`` area in the first pass,
        the IPP's ``IMSTATS_NPIX``; the second pass uses every pixel.
    clip_low, clip_high : float
        Clipping limits below and above the median (robust standard deviations).
    max_iter : int
        Maximum number of clipping iterations.
    min_pixels : int
        A statistics cell with fewer usable pixels takes the mean of its neighbours.
    median_size : int
        Size of the median filter over statistics cells (cells); 1 disables it.
    mask_bits : int
        Mask bits that exclude a pixel (default ``maskbits.BAD``).
    source_mask : ndarray of bool, shape (ny, nx), optional
        Extra pixels to exclude (True), for example the footprints of detected sources.
    mask_sources : bool
        If True, bins of ``source_binning`` pixels lying more than ``source_nsigma``
        standard deviations of the bin mean above the first model (grown by
        ``source_grow`` bins) are excluded from the second pass.
    source_binning : int
        Bin size for finding source pixels (pixels).
    source_nsigma : float
        Threshold for source bins (standard deviations of the bin mean).
    source_grow : int
        Growth of the source bins (bins).

    Returns
    -------
    BackgroundModel
        Node grid, node positions, sky noise and the per-cell statistics.

    Raises
    ------
    ValueError
        If the inputs have wrong shapes or no cell has enough usable sky pixels.
    """
    image = np.asarray(image)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"fit_background: image must be a non-empty 2-D array, got shape "
                         f"{image.shape}")
    if cell < 2:
        raise ValueError(f"fit_background: cell must be >= 2 pixels, got {cell}")
    if subcells < 1:
        raise ValueError(f"fit_background: subcells must be >= 1, got {subcells}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise ValueError(f"fit_background: mask shape {mask.shape} differs from image "
                             f"shape {image.shape}")
    if source_mask is not None:
        source_mask = np.asarray(source_mask, dtype=bool)
        if source_mask.shape != image.shape:
            raise ValueError(f"fit_background: source_mask shape {source_mask.shape} differs "
                             f"from image shape {image.shape}")
    if _HAVE_NUMBA:
        # the compiled passes test every pixel themselves
        img_k = np.ascontiguousarray(image if image.dtype in (np.float32, np.float64)
                                     else image.astype(np.float64))
        if mask is None:
            mask_k, use_mask, bits = np.zeros((1, 1), np.uint16), False, np.uint16(0)
        elif mask.dtype == np.uint16:
            mask_k, use_mask, bits = np.ascontiguousarray(mask), True, np.uint16(mask_bits
                                                                                 & 0xFFFF)
        else:
            mask_k, use_mask, bits = ((mask & mask_bits) != 0).astype(np.uint16), True, \
                np.uint16(1)
        use_src = source_mask is not None
        src_k = np.ascontiguousarray(source_mask) if use_src else np.zeros((1, 1), bool)
        good = None
        all_good = False
    else:
        good = np.isfinite(image)
        if mask is not None:
            good &= (mask & mask_bits) == 0
        if source_mask is not None:
            good &= ~source_mask
        all_good = bool(good.all())
    ny, nx = image.shape
    # statistics cell (pixels); small images still get several cells per axis
    size = max(1, int(round(min(cell, max(ny, nx)) / subcells)))
    ky, kx = -(-ny // size), -(-nx // size)
    cy = _cell_centres(ny, size)
    cx = _cell_centres(nx, size)
    y_nodes = _nodes(ny, cell)
    x_nodes = _nodes(nx, cell)
    # never more nodes than statistics cells along an axis
    if y_nodes.size > ky:
        y_nodes = np.linspace(0.0, ny - 1.0, ky) if ky > 1 else np.array([0.0])
    if x_nodes.size > kx:
        x_nodes = np.linspace(0.0, nx - 1.0, kx) if kx > 1 else np.array([0.0])
    wy = spline_weights(y_nodes, cy)
    wx = spline_weights(x_nodes, cx)
    pinv_y = np.linalg.pinv(wy)
    pinv_x = np.linalg.pinv(wx)

    def fit_nodes(cell_values: np.ndarray) -> np.ndarray:
        # least-squares spline through the cells, then the median-filtered scatter of the
        # cells about it is fitted as a correction: an outlying cell (a bright star's halo)
        # is replaced by the median of its neighbours without the filter bending a gradient
        filled = _fill_missing(cell_values, "fit_background image")
        g0 = pinv_y @ filled @ pinv_x.T
        scatter = filled - wy @ g0 @ wx.T
        return g0 + pinv_y @ _median_filter_cells(scatter, median_size) @ pinv_x.T

    def stats(rows_values, rows_ok, nrows, rows, cols, centre, width, nbins):
        if callable(rows_values):
            H = _cell_histograms(rows_values, rows_ok, nrows, centre, width, nbins,
                                 rows // size, cols // size, (ky, kx))
        else:
            H = rows_values              # histograms made by a compiled pass
        sky, sig, nused = _hist_robust_sky(H, width, clip_low=clip_low, clip_high=clip_high,
                                           max_iter=max_iter, min_pixels=min_pixels)
        return ((sky + centre).reshape(ky, kx), sig.reshape(ky, kx),
                np.round(nused).astype(np.int64).reshape(ky, kx))

    # pass 1: a regularly strided subsample, absolute values
    stride = max(1, int(np.floor(np.sqrt(float(cell) ** 2 / max(npix, 1)))))
    # every statistics cell gets at least 4 min_pixels samples
    stride = max(1, min(stride, int(size / np.sqrt(4.0 * min_pixels))))
    ys = np.arange(min(stride // 2, ny - 1), ny, stride)
    xs = np.arange(min(stride // 2, nx - 1), nx, stride)
    if _HAVE_NUMBA:
        sub = np.empty((ys.size, xs.size), np.float32)
        sub_ok = np.empty((ys.size, xs.size), bool)
        _subsample_nb(img_k, mask_k, use_mask, bits, src_k, use_src, ys, xs, sub, sub_ok)
    else:
        sub = np.ascontiguousarray(image[np.ix_(ys, xs)], dtype=np.float32)
        sub_ok = good[np.ix_(ys, xs)]
    vals = sub[sub_ok]
    if vals.size < min_pixels:
        raise ValueError(f"fit_background: image has only {vals.size} usable sampled pixels")
    # pixel-to-pixel noise (insensitive to gradients) sets the histogram resolution
    if _HAVE_NUMBA:
        d = _row_diffs_nb(sub, sub_ok)
    else:
        d = np.diff(sub, axis=1)[sub_ok[:, 1:] & sub_ok[:, :-1]]
    if d.size >= 10 and _HAVE_NUMBA and np.isfinite(d).all():
        med = _median_f32_nb(d)
        noise = 1.4826 * float(_median_f32_nb(np.abs(d - med))) / np.sqrt(2.0)
    elif d.size >= 10:
        noise = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2.0)
    else:
        noise = 0.0
    lo, hi = np.percentile(vals, [0.1, 99.9])
    if not noise > 0:
        noise = max(float(hi - lo) / 20.0, 1e-6 * max(abs(float(lo)), 1.0))
    lo, hi = float(lo) - 5.0 * noise, float(hi) + 5.0 * noise
    width = max(0.1 * noise, (hi - lo) / 8192.0)
    nbins = int(np.ceil((hi - lo) / width / 2.0)) * 2
    centre1 = 0.5 * (lo + hi)
    if _HAVE_NUMBA:
        counts = np.zeros(ky * kx * nbins + 1, np.int64)
        _hist_nb(sub, sub_ok, np.float32(1.0 / width), np.float32(0.5 * nbins - centre1 / width),
                 nbins, ys // size, xs // size, kx, counts)
        sky1, sig1, n1 = stats(counts[:-1].reshape(ky * kx, nbins), None, ys.size, ys, xs,
                               centre1, width, nbins)
    else:
        sky1, sig1, n1 = stats(lambda a, b: sub[a:b], lambda a, b: sub_ok[a:b], ys.size, ys,
                               xs, centre1, width, nbins)
    grid1 = fit_nodes(sky1)
    sigma1 = float(np.nanmedian(sig1)) if np.any(np.isfinite(sig1)) else float("nan")
    model = BackgroundModel(grid=grid1, x_nodes=x_nodes, y_nodes=y_nodes, sigma=sigma1,
                            image_shape=(ny, nx), cell_values=sky1, cell_sigma=sig1,
                            cell_x=cx, cell_y=cy, cell_npix=n1)
    if not (np.isfinite(sigma1) and sigma1 > 0):
        return model
    # pass 2: every pixel, residuals from the first model, sources excluded
    src = None
    if mask_sources:
        if _HAVE_NUMBA:
            sums = np.zeros((ny // source_binning, nx // source_binning))
            npx = np.zeros_like(sums)
            _binned_sums_nb(img_k, mask_k, use_mask, bits, src_k, use_src, source_binning,
                            sums, npx)
        else:
            sums, npx = _binned_sums(image, None if all_good else good, source_binning)
        src = _binned_source_mask(sums, npx, model, binning=source_binning,
                                  nsigma=source_nsigma, grow=source_grow)
        if not np.any(src):
            src = None
    width2 = 0.1 * sigma1
    if _HAVE_NUMBA:
        counts = np.zeros(ky * kx * 160 + 1, np.int64)
        rows = np.ascontiguousarray(spline_weights(y_nodes, np.arange(ny, dtype=np.float64))
                                    @ grid1)
        _resid_hist_nb(img_k, mask_k, use_mask, bits, src_k, use_src,
                       src if src is not None else np.zeros((1, 1), bool), src is not None,
                       source_binning, rows, *_spline_pieces(x_nodes, nx),
                       np.float32(1.0 / width2),
                       np.float32(80.0), 160, np.arange(ny) // size, np.arange(nx) // size,
                       kx, counts)
        res2, sig2, n2 = stats(counts[:-1].reshape(ky * kx, 160), None, ny, None, None, 0.0,
                               width2, 160)
        grid = grid1 + fit_nodes(res2)
        sigma = float(np.nanmedian(sig2)) if np.any(np.isfinite(sig2)) else sigma1
        return BackgroundModel(grid=grid, x_nodes=x_nodes, y_nodes=y_nodes, sigma=sigma,
                               image_shape=(ny, nx),
                               cell_values=res2 + model.evaluate_grid(cy, cx),
                               cell_sigma=sig2, cell_x=cx, cell_y=cy, cell_npix=n2)
    b = source_binning
    by = np.arange(ny) // b
    bx = np.minimum(np.arange(nx) // b, (src.shape[1] - 1) if src is not None else 0)
    model1 = model.evaluate()

    def resid_rows(a: int, c: int) -> np.ndarray:
        return np.asarray(image[a:c], dtype=np.float32) - model1[a:c]

    def ok_rows(a: int, c: int) -> np.ndarray | None:
        ok = None if all_good else good[a:c]
        if src is not None:
            rows_src = src[np.minimum(by[a:c], src.shape[0] - 1)][:, bx]
            # rows beyond the last whole bin are not covered by the binned map
            rows_src[by[a:c] >= src.shape[0]] = False
            ok = ~rows_src if ok is None else ok & ~rows_src
        return ok

    res2, sig2, n2 = stats(resid_rows, ok_rows, ny, np.arange(ny), np.arange(nx), 0.0,
                           width2, 160)
    grid = grid1 + fit_nodes(res2)
    sigma = float(np.nanmedian(sig2)) if np.any(np.isfinite(sig2)) else sigma1
    return BackgroundModel(grid=grid, x_nodes=x_nodes, y_nodes=y_nodes, sigma=sigma,
                           image_shape=(ny, nx), cell_values=res2 + model.evaluate_grid(cy, cx),
                           cell_sigma=sig2, cell_x=cx, cell_y=cy, cell_npix=n2)
