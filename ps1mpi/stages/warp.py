"""warp: resample calibrated exposures onto the skycells of a sky tessellation (pswarp).

One unit of work is one exposure x one skycell (``warpSkyfile``); one ``warpRun`` per
calibrated exposure. See ``docs/warp-stack-stages.md`` for the whole story.

define (rank 0)
    For every ``camRun`` DONE with quality 0 and no ``warpRun`` yet: read the camera stage's
    solution (``camera/<exp>/<exp>.astrom.fits``: one extension per good chip with its TAN-SIP
    WCS), find the skycells each chip's sky outline touches (tessellation ``warp.tessellation``)
    and create one element per skycell, centred on the skycell, listing the chips that feed it.
    An exposure that touches no skycell gets a ``warpRun`` DONE with quality 1.
process (any rank)
    For every chip feeding the skycell: compose skycell pixel -> sky (skycell TAN WCS) -> chip
    pixel (chip TAN-SIP WCS, inverted exactly) at the nodes of a coarse grid, warp image,
    variance and mask with Lanczos-3 (:func:`ps1mpi.algorithms.warp.warp_image`, flux
    conserving), scale the flux to the warp zero point (``warp.zero_point``, 25) and paste the
    chip's pixels into the skycell. A warp with fewer good pixels than ``warp.min_good_frac``
    (IPP 10%) gets quality 1 and is not written. Otherwise image, variance, mask and the warp's
    PSF model (the chip PSF models carried through the local Jacobian of the map) are written
    atomically, image last.
Chip cache
    Units are handed out in sky-region order, and units of one skycell in exposure order, so a
    rank sees the skycells fed by one chip close together; a per-rank cache of chips
    (``warp.chip_cache_mb``, least recently used dropped first) lets it read each chip once for
    all the skycells it feeds (``warpSkyfile.chip_reads`` records the reads).

Zero points: the camera stage's ``ZPT_OBS`` is the magnitude of 1 e-/s; a chip's extension may
carry ``ZPT_OFF`` (mag) added to it. A chip image in electrons is scaled by
``10**(0.4 (zero_point - ZPT_OBS - ZPT_OFF)) / EXPTIME`` so that ``m = zero_point - 2.5 log10(flux)``
in the warp.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..algorithms import maskbits
from ..algorithms.combine import compute_input_weights
from ..infra.ledger import Ledger
from ..infra.products import atomic_outputs
from ..infra.runtime import DataError, Outcome, WorkUnit, region_index
from ..infra.schema import State
from .base import Stage, StageContext

if TYPE_CHECKING:  # the PSF and resampling modules are imported where used (scipy.stats and
    # numba take seconds to import, which the stack stage, importing this module, never needs)
    from ..algorithms.psf import PSFModel

__all__ = ["WarpStage", "ChipInput", "SkycellWarp", "ExposureSolution", "QUALITY",
           "RUN_QUALITY", "INPUTS", "read_astrometry", "chip_sky_outline", "skycell_to_chip_map",
           "chip_region", "warp_to_skycell", "warp_psf_model", "flux_scale", "fits_cards",
           "read_image", "write_image"]

#: warpSkyfile quality codes
QUALITY = {
    "few_good_pixels": 1,   # fewer good pixels than warp.min_good_frac: not written
}
#: warpRun quality codes
RUN_QUALITY = {
    "no_skycell": 1,        # the exposure's chips touch no skycell of the tessellation
}

#: Products of earlier stages this stage reads (relative to the campaign root).
INPUTS = {
    "astrom": "camera/{exp_name}/{exp_name}.astrom.fits",
    "image": "chip/{exp_name}/{exp_name}.{chip}.ch.fits",
    "variance": "chip/{exp_name}/{exp_name}.{chip}.wt.fits",
    "mask": "camera/{exp_name}/{exp_name}.{chip}.mk.fits",
    "psf": "chip/{exp_name}/{exp_name}.{chip}.psf.fits",
}

_OUTLINE_POINTS = 16  # points per chip edge for the chip's sky outline
_MIN_GRID_STEP = 8    # finest pixel-map grid (output pixels)


# ------------------------------------------------------------------------------------ inputs

@dataclass
class ChipSolution:
    """One chip of the camera stage's solution."""

    name: str
    wcs: Any                 # astropy.wcs.WCS, TAN-SIP (use origin=0 for 0-based pixels)
    zpt_offset: float = 0.0  # mag added to the exposure zero point for this chip


@dataclass
class ExposureSolution:
    """The camera stage's solution of one exposure (``<exp>.astrom.fits``).

    Attributes
    ----------
    zpt_obs : float
        Exposure zero point (mag for 1 e-/s).
    chips : dict of str to ChipSolution
        Good chips with their WCS and zero-point offsets.
    header : dict
        Primary header values (for provenance).
    """

    zpt_obs: float
    chips: dict[str, ChipSolution]
    header: dict = field(default_factory=dict)


def read_astrometry(path: str | Path) -> ExposureSolution:
    """Read the camera stage's solution file.

    Parameters
    ----------
    path : str or Path
        ``camera/<exp>/<exp>.astrom.fits``: primary header with ``ZPT_OBS`` (mag for 1 e-/s),
        one image-less extension per good chip (``EXTNAME`` = chip) holding the chip's
        TAN-SIP WCS and optionally ``ZPT_OFF`` (mag).

    Returns
    -------
    ExposureSolution

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    ValueError
        If ``ZPT_OBS`` is missing or not finite, a chip extension has no celestial WCS, or
        there is no chip extension.
    """
    from astropy.io import fits
    from astropy.wcs import FITSFixedWarning, WCS

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the camera solution is missing")
    with fits.open(path) as hdul:
        prim = hdul[0].header
        try:
            zpt = float(prim["ZPT_OBS"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: primary header has no numeric ZPT_OBS") from None
        if not math.isfinite(zpt):
            raise ValueError(f"{path}: ZPT_OBS is {zpt}")
        chips: dict[str, ChipSolution] = {}
        for hdu in hdul[1:]:
            name = str(hdu.header.get("EXTNAME", "")).strip()
            if not name:
                raise ValueError(f"{path}: extension {hdu} has no EXTNAME (chip name)")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                w = WCS(hdu.header)
            if not w.has_celestial or w.naxis != 2:
                raise ValueError(f"{path}: extension {name} holds no 2-axis celestial WCS")
            off = float(hdu.header.get("ZPT_OFF", 0.0))
            if not math.isfinite(off):
                raise ValueError(f"{path}: extension {name}: ZPT_OFF is {off}")
            chips[name] = ChipSolution(name, w, off)
        if not chips:
            raise ValueError(f"{path}: no chip extension (no good chip)")
        header = {k: prim[k] for k in prim if k not in ("COMMENT", "HISTORY", "")}
    return ExposureSolution(zpt, chips, header)


def flux_scale(zpt_obs: float, exptime: float, *, zero_point: float = 25.0,
               zpt_offset: float = 0.0) -> float:
    """Factor from chip electrons to warp flux at ``zero_point``.

    Parameters
    ----------
    zpt_obs : float
        Exposure zero point (mag for 1 e-/s).
    exptime : float
        Exposure time (s).
    zero_point : float, optional
        Zero point of the warp (mag for one unit of warp flux).
    zpt_offset : float, optional
        Chip zero-point offset (mag), added to ``zpt_obs``.

    Returns
    -------
    float
        ``10**(0.4 (zero_point - zpt_obs - zpt_offset)) / exptime`` (flux units per electron).
    """
    if not (exptime > 0 and math.isfinite(exptime)):
        raise ValueError(f"flux_scale: exptime must be positive seconds, got {exptime!r}")
    if not (math.isfinite(zpt_obs) and math.isfinite(zpt_offset)):
        raise ValueError(f"flux_scale: zero points must be finite, got {zpt_obs!r}, {zpt_offset!r}")
    return 10.0 ** (0.4 * (zero_point - zpt_obs - zpt_offset)) / exptime


def chip_sky_outline(wcs: Any, shape: tuple[int, int], *,
                     points_per_edge: int = _OUTLINE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Sky polygon of a chip's outer pixel edges.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        The chip's WCS.
    shape : (ny, nx)
        Chip size (pixels).
    points_per_edge : int, optional
        Vertices per edge (the edges curve slightly with the distortion).

    Returns
    -------
    ra, dec : ndarray
        Vertices (degrees), in order around the chip, not closed.
    """
    ny, nx = shape
    t = np.arange(points_per_edge) / points_per_edge
    x = np.concatenate([-0.5 + t * nx, np.full(points_per_edge, nx - 0.5),
                        nx - 0.5 - t * nx, np.full(points_per_edge, -0.5)])
    y = np.concatenate([np.full(points_per_edge, -0.5), -0.5 + t * ny,
                        np.full(points_per_edge, ny - 0.5), ny - 0.5 - t * ny])
    ra, dec = wcs.all_pix2world(x, y, 0)
    return np.asarray(ra, float), np.asarray(dec, float)


def skycell_to_chip_map(skycell_wcs: Any, chip_wcs: Any, *, tolerance: float = 1e-6
                        ) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The exact pixel map skycell pixel -> sky -> chip pixel (0-based, vectorised).

    The chip's TAN-SIP WCS is inverted iteratively (astropy ``all_world2pix``) to
    ``tolerance`` chip pixels; points where the inversion fails (checked by mapping back, to
    1e-3 skycell pixels) are NaN, which the warp treats as "not on the chip".

    Parameters
    ----------
    skycell_wcs, chip_wcs : astropy.wcs.WCS
        Skycell TAN WCS and chip TAN-SIP WCS.
    tolerance : float, optional
        Inversion tolerance (chip pixels).

    Returns
    -------
    callable
        ``pixel_map(x_out, y_out) -> (x_in, y_in)``.
    """
    def pixel_map(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        shape = x.shape
        xf, yf = x.ravel(), y.ravel()
        ra, dec = skycell_wcs.wcs_pix2world(xf, yf, 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xi, yi = chip_wcs.all_world2pix(ra, dec, 0, tolerance=tolerance, maxiter=100,
                                            adaptive=False, detect_divergence=True, quiet=True)
            rb, db = chip_wcs.all_pix2world(xi, yi, 0)
            xb, yb = skycell_wcs.wcs_world2pix(rb, db, 0)
        bad = ~(np.hypot(xb - xf, yb - yf) < 1e-3)
        xi = np.where(bad, np.nan, xi)
        yi = np.where(bad, np.nan, yi)
        return xi.reshape(shape), yi.reshape(shape)

    return pixel_map


def chip_region(skycell_wcs: Any, skycell_shape: tuple[int, int], chip_wcs: Any,
                chip_shape: tuple[int, int], *, margin: int = 4
                ) -> tuple[int, int, int, int] | None:
    """Skycell pixel box that the chip can feed.

    Parameters
    ----------
    skycell_wcs : astropy.wcs.WCS
        Skycell WCS.
    skycell_shape : (ny, nx)
        Skycell size (pixels).
    chip_wcs : astropy.wcs.WCS
        Chip WCS.
    chip_shape : (ny, nx)
        Chip size (pixels).
    margin : int, optional
        Pixels added around the chip's outline (at least the kernel half width).

    Returns
    -------
    (x0, y0, x1, y1) or None
        Half-open box in skycell pixels, clipped to the skycell; None when empty.
    """
    ra, dec = chip_sky_outline(chip_wcs, chip_shape, points_per_edge=32)
    sx, sy = skycell_wcs.wcs_world2pix(ra, dec, 0)
    if not (np.all(np.isfinite(sx)) and np.all(np.isfinite(sy))):
        return None
    ny, nx = skycell_shape
    x0 = max(int(math.floor(sx.min())) - margin, 0)
    y0 = max(int(math.floor(sy.min())) - margin, 0)
    x1 = min(int(math.ceil(sx.max())) + margin + 1, nx)
    y1 = min(int(math.ceil(sy.max())) + margin + 1, ny)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


# ------------------------------------------------------------------------------------ warping

@dataclass
class ChipInput:
    """One calibrated chip going into a warp.

    Attributes
    ----------
    name : str
        Chip name.
    image : ndarray of float32
        Detrended image (electrons).
    variance : ndarray of float32
        Variance (electrons squared).
    mask : ndarray of uint16
        Mask bits (static and dynamic).
    wcs : astropy.wcs.WCS
        The chip's TAN-SIP WCS.
    flux_scale : float
        Factor from electrons to warp flux (:func:`flux_scale`).
    psf : PSFModel or None
        The chip's PSF model (chip pixels).
    """

    name: str
    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    wcs: Any
    flux_scale: float
    psf: "PSFModel | None" = None


@dataclass
class SkycellWarp:
    """An exposure warped onto one skycell (see :func:`warp_to_skycell`).

    Attributes
    ----------
    image : ndarray of float32, shape (ny, nx)
        Flux at the warp zero point per skycell pixel; 0 where unusable.
    variance : ndarray of float32
        Variance (flux squared); 0 where unusable.
    mask : ndarray of uint16
        Mask bits; ``GAP`` where no chip maps.
    owner : ndarray of int16
        Index (into the chips given) of the chip each pixel came from; -1 if none.
    good_frac : float
        Fraction of the skycell's pixels that are usable.
    covariance_factor : float
        Large-scale to per-pixel noise variance ratio (see ``WarpResult``); NaN if no good pixel.
    map_error : float
        Largest pixel-map interpolation error over the chips (chip pixels); NaN if no chip.
    maps : dict of int to callable
        The exact pixel map of each chip that fed the skycell.
    chips_used : list of str
        Chips that contributed at least one pixel.
    grid_step : int
        Finest map grid step used (output pixels).
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    owner: np.ndarray
    good_frac: float
    covariance_factor: float
    map_error: float
    maps: dict[int, Callable]
    chips_used: list[str]
    grid_step: int = 128


def warp_to_skycell(chips: Sequence[ChipInput], skycell: Any, *, kernel: str = "lanczos3",
                    grid_step: int = 128, poor_fraction: float = 0.01,
                    bad_bits: int = maskbits.BAD, wcs_tolerance: float = 1e-6,
                    max_map_error: float | None = 0.005) -> SkycellWarp:
    """Resample the chips of one exposure onto a skycell (pswarp).

    Each chip is warped (:func:`ps1mpi.algorithms.warp.warp_image`) onto the box of the
    skycell it can feed, its flux scaled by ``chip.flux_scale``; an output pixel takes the
    chip its centre maps into (chips do not overlap on the sky), a usable value winning over
    a masked one where a pixel is touched by two chips' kernels.

    Parameters
    ----------
    chips : sequence of ChipInput
        The exposure's chips (only those overlapping the skycell do any work).
    skycell : Skycell
        Output grid (``shape``, ``wcs``).
    kernel : str, optional
        Interpolation kernel (IPP LANCZOS3).
    grid_step : int, optional
        Output pixels between exact map nodes (IPP 128).
    poor_fraction : float, optional
        IPP POOR.FRAC.
    bad_bits : int, optional
        Mask bits of unusable pixels.
    wcs_tolerance : float, optional
        Tolerance of the chip WCS inversion (chip pixels).
    max_map_error : float or None, optional
        Largest allowed error (chip pixels) of the interpolated pixel map, measured at the
        cell centres and edge midpoints before warping; ``grid_step`` is halved (down to 8)
        until the map meets it. None keeps ``grid_step``.

    Returns
    -------
    SkycellWarp
    """
    from ..algorithms.warp import KERNEL_HALF_WIDTH, PixelMapGrid, paste_warp, warp_image

    ny, nx = skycell.shape
    img = np.zeros((ny, nx), np.float32)
    var = np.zeros((ny, nx), np.float32)
    msk = np.full((ny, nx), maskbits.GAP, np.uint16)
    owner = np.full((ny, nx), -1, np.int16)
    good = np.zeros((ny, nx), bool)
    margin = KERNEL_HALF_WIDTH[kernel] + 2
    sum_j = sum_j2s = 0.0
    map_error = float("nan")
    maps: dict[int, Callable] = {}
    steps: list[int] = []
    for k, chip in enumerate(chips):
        shape = chip.image.shape
        if chip.variance.shape != shape or chip.mask.shape != shape:
            raise ValueError(f"chip {chip.name}: image {shape}, variance {chip.variance.shape} "
                             f"and mask {chip.mask.shape} differ in shape")
        box = chip_region(skycell.wcs, (ny, nx), chip.wcs, shape, margin=margin)
        if box is None:
            continue
        x0, y0, x1, y1 = box
        pmap = skycell_to_chip_map(skycell.wcs, chip.wcs, tolerance=wcs_tolerance)
        step = int(grid_step)
        while True:
            grid = PixelMapGrid(pmap, (y1 - y0, x1 - x0), grid_step=step, out_origin=(x0, y0))
            err = grid.max_error()
            if max_map_error is None or not err > max_map_error or step <= _MIN_GRID_STEP:
                break
            step = max(step // 2, _MIN_GRID_STEP)
        steps.append(step)
        res = warp_image(chip.image, chip.variance, chip.mask, grid,
                         out_shape=(y1 - y0, x1 - x0), kernel=kernel,
                         poor_fraction=poor_fraction, bad_bits=bad_bits)
        touched = res.mask != maskbits.GAP       # exactly GAP: the centre maps off the chip
        if not touched.any():
            continue
        maps[k] = pmap
        paste_warp(img, var, msk, owner, good, (x0, y0), res, scale=chip.flux_scale, index=k,
                   bad_bits=bad_bits, gap_bit=maskbits.GAP)
        if np.isfinite(res.map_error):
            map_error = res.map_error if not np.isfinite(map_error) else max(map_error,
                                                                              res.map_error)
        n_good = res.good_fraction * res.image.size
        if n_good > 0 and np.isfinite(res.covariance_factor):
            sj = n_good * res.jacobian
            sum_j += sj
            sum_j2s += sj / res.covariance_factor
    bad = ~good
    np.copyto(img, 0.0, where=bad)
    np.copyto(var, 0.0, where=bad)
    # chips owning a good pixel (a count, not np.unique: no sort of the whole skycell)
    used = np.flatnonzero(np.bincount(owner[good], minlength=len(chips))).tolist()
    return SkycellWarp(image=img, variance=var, mask=msk, owner=owner,
                       good_frac=float(good.mean()),
                       covariance_factor=float(sum_j / sum_j2s) if sum_j2s > 0 else float("nan"),
                       map_error=map_error, maps=maps,
                       chips_used=[chips[i].name for i in used],
                       grid_step=min(steps) if steps else int(grid_step))


def _local_jacobian(pmap: Callable, x: np.ndarray, y: np.ndarray, h: float = 1.0) -> np.ndarray:
    """``d(x_in, y_in) / d(x_out, y_out)`` by central differences, shape (n, 2, 2)."""
    xs = np.concatenate([x + h, x - h, x, x])
    ys = np.concatenate([y, y, y + h, y - h])
    xi, yi = pmap(xs, ys)
    n = x.size
    a = np.empty((n, 2, 2))
    a[:, 0, 0] = (xi[:n] - xi[n:2 * n]) / (2 * h)
    a[:, 1, 0] = (yi[:n] - yi[n:2 * n]) / (2 * h)
    a[:, 0, 1] = (xi[2 * n:3 * n] - xi[3 * n:]) / (2 * h)
    a[:, 1, 1] = (yi[2 * n:3 * n] - yi[3 * n:]) / (2 * h)
    return a


def warp_psf_model(chips: Sequence[ChipInput], warp: SkycellWarp, *, grid: int = 6,
                   bad_bits: int = maskbits.BAD) -> "PSFModel | None":
    """The PSF model of a warp, from the chips' PSF models.

    At each node of a ``grid x grid`` model grid (psphot's node layout) the PSF is that of the
    chip feeding the nearest good warp pixel, at the chip position that pixel maps to,
    transformed by the local Jacobian ``A = d(chip)/d(skycell)`` of the pixel map: the shape
    matrix becomes ``A^-1 M A^-T``, the PS1_V1 linear term ``k`` is unchanged (the profile is a
    function of the same elliptical radius), the normalisation radius scales by
    ``|det A|^-1/2``. Lanczos-3 resampling adds no second moment (its normalised weights have
    zero second moment about the sampled point at every phase), so the shape is carried over
    without broadening. The pixel residual table of a chip model is not carried over.

    Parameters
    ----------
    chips : sequence of ChipInput
        The chips given to :func:`warp_to_skycell` (with their ``psf``).
    warp : SkycellWarp
        The warp.
    grid : int, optional
        Nodes per axis (at most 6 in psphot).
    bad_bits : int, optional
        Mask bits of unusable pixels.

    Returns
    -------
    PSFModel or None
        None when the warp has no good pixel.
    """
    from scipy.spatial import cKDTree

    from ..algorithms.psf import PSFModel, shape_params

    if int(grid) != grid or grid < 1:
        raise ValueError(f"warp_psf_model: grid must be a positive integer, got {grid!r}")
    ny, nx = warp.image.shape
    good = ((warp.mask & bad_bits) == 0) & (warp.owner >= 0)
    step = max(1, min(nx, ny) // 128)
    gy, gx = np.nonzero(good[::step, ::step])
    if gy.size == 0:
        return None
    cand = np.column_stack([gx * step, gy * step]).astype(np.float64)
    g = int(grid)
    xs = (np.arange(g) + 0.5) * nx / g - 0.5
    ys = (np.arange(g) + 0.5) * ny / g - 0.5
    nxg, nyg = np.meshgrid(xs, ys)
    _, idx = cKDTree(cand).query(np.column_stack([nxg.ravel(), nyg.ravel()]))
    qx, qy = cand[idx, 0], cand[idx, 1]
    who = warp.owner[qy.astype(int), qx.astype(int)]
    n_nodes = g * g
    mxx = np.empty(n_nodes)
    myy = np.empty(n_nodes)
    mxy = np.empty(n_nodes)
    kk = np.empty(n_nodes)
    nrad = np.empty(n_nodes)
    used: list[int] = []
    for k in np.unique(who):
        sel = np.flatnonzero(who == k)
        chip = chips[int(k)]
        if chip.psf is None:
            raise ValueError(f"warp_psf_model: chip {chip.name} has no PSF model")
        pmap = warp.maps[int(k)]
        xi, yi = pmap(qx[sel], qy[sel])
        a = _local_jacobian(pmap, qx[sel], qy[sel])
        m_xx, m_yy, m_xy, k_lin = chip.psf.moments_at(xi, yi)
        m = np.empty((sel.size, 2, 2))
        m[:, 0, 0], m[:, 1, 1] = m_xx, m_yy
        m[:, 0, 1] = m[:, 1, 0] = m_xy
        ainv = np.linalg.inv(a)
        mo = ainv @ m @ np.transpose(ainv, (0, 2, 1))
        mxx[sel], myy[sel], mxy[sel] = mo[:, 0, 0], mo[:, 1, 1], 0.5 * (mo[:, 0, 1] + mo[:, 1, 0])
        kk[sel] = k_lin
        nrad[sel] = chip.psf.norm_radius / np.sqrt(np.abs(np.linalg.det(a)))
        used.append(int(k))
    sx, sy, sxy = shape_params(mxx.reshape(g, g), myy.reshape(g, g), mxy.reshape(g, g))
    models = [chips[k].psf for k in used]
    return PSFModel((ny, nx), sx, sy, sxy, kk.reshape(g, g), norm_radius=float(np.median(nrad)),
                    ap_corr=float(np.mean([p.ap_corr for p in models])),
                    ap_corr_err=float(np.sqrt(np.mean([p.ap_corr_err ** 2 for p in models]))),
                    ap_sys_err=float(np.max([p.ap_sys_err for p in models])),
                    n_psf_stars=int(sum(p.n_psf_stars for p in models)))


# ------------------------------------------------------------------------------------ FITS I/O

_STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "PCOUNT", "GCOUNT",
               "BZERO", "BSCALE", "XTENSION", "COMMENT", "HISTORY", ""}


def fits_cards(header: Any = None, **extra: Any) -> list[dict]:
    """fitsio header cards from an astropy header (structural keywords dropped) plus
    ``KEY=(value, comment)`` or ``KEY=value`` items (``MJD_OBS`` becomes ``MJD-OBS``;
    non-finite floats are written as -1, which FITS headers can hold)."""
    cards: list[dict] = []
    if header is not None:
        for card in header.cards:
            if card.keyword in _STRUCTURAL:
                continue
            cards.append({"name": card.keyword, "value": card.value, "comment": card.comment})
    for key, val in extra.items():
        value, comment = val if isinstance(val, tuple) else (val, "")
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value, comment = -1.0, (comment + " (-1: undefined)")[:68]
        name = "MJD-OBS" if key == "MJD_OBS" else key.upper()
        cards.append({"name": name, "value": value, "comment": comment})
    return cards


def read_image(path: str | Path, rows: tuple[int, int] | None = None) -> np.ndarray:
    """The first image HDU with data of a FITS file (compressed or not), whole or rows.

    Parameters
    ----------
    path : str or Path
        The file.
    rows : (r0, r1), optional
        Half-open row range to read (only those rows are read).

    Returns
    -------
    ndarray

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    ValueError
        If the file holds no image.
    """
    import fitsio

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: input product is missing")
    with fitsio.FITS(str(path)) as f:
        for hdu in f:
            if hdu.get_exttype() == "IMAGE_HDU" and hdu.has_data():
                if rows is None:
                    return hdu.read()
                return hdu[rows[0]:rows[1], :]
    raise ValueError(f"{path}: no image HDU with data")


def write_image(path: str | Path, data: np.ndarray, cards: list[dict]) -> None:
    """Write one uncompressed image (so that readers can take row ranges cheaply)."""
    import fitsio

    fitsio.write(str(path), data, header=cards, clobber=True)


# ------------------------------------------------------------------------------------ the stage

class _ChipCache:
    """Chips read by this rank, least recently used dropped first past ``limit`` bytes."""

    def __init__(self, limit_bytes: float):
        self.limit = float(limit_bytes)
        self.items: OrderedDict[tuple, tuple] = OrderedDict()
        self.nbytes = 0
        self.reads = 0
        self.hits = 0

    def get(self, key: tuple, loader: Callable[[], tuple]) -> tuple[tuple, bool]:
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key], False
        value = loader()
        self.reads += 1
        size = sum(getattr(v, "nbytes", 0) for v in value)
        self.items[key] = value
        self.nbytes += size
        while self.nbytes > self.limit and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.nbytes -= sum(getattr(v, "nbytes", 0) for v in old)
        return value, True


def _group_centres(keys: np.ndarray, ra: np.ndarray, dec: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the mean position (deg, through unit vectors: safe across RA 0) of all
    rows with the same key."""
    _, inverse = np.unique(keys, return_inverse=True)
    r, d = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    vec = np.column_stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])
    sums = np.zeros((inverse.max() + 1, 3))
    np.add.at(sums, inverse, vec)
    x, y, z = sums[inverse].T
    return np.degrees(np.arctan2(y, x)) % 360.0, np.degrees(np.arctan2(z, np.hypot(x, y)))


class WarpStage(Stage):
    """Warp calibrated exposures onto skycells (see the module docstring)."""

    name = "warp"
    run_table = "warpRun"
    element_table = "warpSkyfile"
    inputs = ("camRun", "camProcessedExp", "chipRun", "rawExp")
    outputs = {
        "psf": "warp/{exp_name}/{exp_name}.{skycell}.wrp.psf.fits",
        "variance": "warp/{exp_name}/{exp_name}.{skycell}.wrp.wt.fits",
        "mask": "warp/{exp_name}/{exp_name}.{skycell}.wrp.mk.fits",
        "image": "warp/{exp_name}/{exp_name}.{skycell}.wrp.fits",
    }

    def __init__(self) -> None:
        self.problems: list[str] = []   # exposures define could not use (rank 0)
        self._cache: _ChipCache | None = None
        self._solutions: OrderedDict[str, ExposureSolution] = OrderedDict()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _tessellation(ctx: StageContext):
        from ..geometry.tessellation import load_tessellation

        name = str(ctx.recipe.get("warp.tessellation"))
        try:
            return load_tessellation(name)
        except ValueError as err:
            from ..infra.config import RecipeError
            raise RecipeError(f"recipe warp.tessellation: {err}") from None

    def input_path(self, ctx: StageContext, what: str, **keys) -> Path:
        """Absolute path of an input product of an earlier stage."""
        return ctx.root / INPUTS[what].format(**keys)

    def _solution(self, ctx: StageContext, exp_name: str) -> ExposureSolution:
        if exp_name not in self._solutions:
            self._solutions[exp_name] = read_astrometry(self.input_path(ctx, "astrom",
                                                                        exp_name=exp_name))
            while len(self._solutions) > 8:
                self._solutions.popitem(last=False)
        self._solutions.move_to_end(exp_name)
        return self._solutions[exp_name]

    # ------------------------------------------------------------------ define (rank 0)
    def define(self, ledger: Ledger, ctx: StageContext) -> int:
        """Create a warpRun per calibrated exposure and a warpSkyfile per skycell it touches.

        Returns the number of elements created.
        """
        from ..geometry.camera import load_camera

        self.problems = []
        if ledger.nrows("camRun") == 0:
            return 0
        c_state = ledger.column("camRun", "state")
        c_quality = ledger.column("camRun", "quality")
        ready = np.flatnonzero((c_state == State.DONE) & (c_quality == 0))
        if ready.size == 0:
            return 0
        ready = ready[~np.isin(ready, ledger.column(self.run_table, "cam_run"))]
        if ready.size == 0:
            return 0
        tess = self._tessellation(ctx)
        cam = ledger.read("camRun", ready, ["exp_name", "chip_run", "filter"])
        raw_rows = ledger.column("chipRun", "raw_exp", cam["chip_run"])
        raw = ledger.read("rawExp", raw_rows, ["mjd", "exptime", "camera", "ra", "dec"])
        cameras: dict[str, Any] = {}
        run_cols: dict[str, list] = {c: [] for c in ("exp_name", "filter", "mjd", "exptime",
                                                     "cam_run", "ra", "dec", "n_skycells")}
        el_cols: dict[str, list] = {c: [] for c in ("run", "exp_name", "filter", "mjd",
                                                    "exptime", "skycell", "ra", "dec", "chips",
                                                    "n_chips")}
        for i, crow in enumerate(ready):
            exp = cam["exp_name"][i].decode()
            camname = raw["camera"][i].decode()
            try:
                if camname not in cameras:
                    cameras[camname] = load_camera(camname)
                camera = cameras[camname]
                sol = read_astrometry(self.input_path(ctx, "astrom", exp_name=exp))
                feeds: dict[str, list[str]] = {}
                for chip, cs in sol.chips.items():
                    if chip not in camera.chips:
                        raise ValueError(f"chip {chip} of the solution is not a chip of camera "
                                         f"{camname}")
                    ra, dec = chip_sky_outline(cs.wcs, (camera.chip_ny, camera.chip_nx))
                    for name in tess.skycells_in_polygon(ra, dec):
                        feeds.setdefault(name, []).append(chip)
            except (OSError, ValueError) as err:
                msg = f"exposure {exp} (camRun row {int(crow)}): {err}"
                self.problems.append(msg)
                ctx.log.error("warp: cannot define the warps of %s", msg)
                continue
            common = dict(exp_name=exp, filter=cam["filter"][i], mjd=raw["mjd"][i],
                          exptime=raw["exptime"][i])
            for col, val in dict(common, cam_run=int(crow), ra=raw["ra"][i], dec=raw["dec"][i],
                                 n_skycells=len(feeds)).items():
                run_cols[col].append(val)
            local = len(run_cols["exp_name"]) - 1
            for name in sorted(feeds):
                c = tess.skycell(name)
                chips = ",".join(sorted(feeds[name]))
                for col, val in dict(common, run=local, skycell=name, ra=c.ra_center,
                                     dec=c.dec_center, chips=chips if len(chips) <= 64 else "",
                                     n_chips=len(feeds[name])).items():
                    el_cols[col].append(val)
        n_runs = len(run_cols["exp_name"])
        if n_runs == 0:
            return 0
        runs = ledger.append(self.run_table, n_runs, **run_cols)
        n_sky = np.array(run_cols["n_skycells"])
        if np.any(n_sky == 0):
            ledger.transition(self.run_table, runs[n_sky == 0], State.DONE,
                              quality=RUN_QUALITY["no_skycell"],
                              message=f"the exposure touches no skycell of {tess.name}")
        if np.any(n_sky > 0):
            ledger.transition(self.run_table, runs[n_sky > 0], State.RUN,
                              message=[f"{k} skycells of {tess.name}" for k in n_sky[n_sky > 0]])
        n_el = len(el_cols["run"])
        if n_el:
            el_cols["run"] = runs[np.array(el_cols["run"])]
            rows = ledger.append(self.element_table, n_el, **el_cols)
            ledger.transition(self.element_table, rows, State.NEW, message="defined")
        return n_el

    # ------------------------------------------------------------------ units (rank 0)
    def units(self, ledger: Ledger, ctx: StageContext) -> list[WorkUnit]:
        """Pending warps, one exposure's together: each unit carries its exposure's centre
        (the mean of its skycells' centres) as the position the coordinator orders by, and
        within an exposure the skycells are in sky-region order. A rank then gets runs of
        adjacent skycells of one exposure and reads each chip once for all of them; ordered
        by skycell, a rank needs every overlapping exposure's chips for each skycell, and on
        the demo with 2 ranks 57 of 125 chip reads were repeats. Cost = chips feeding the
        skycell."""
        rows = ledger.pending(self.element_table,
                              retry_cap=int(ctx.recipe.get("runtime.retry_cap")))
        if rows.size == 0:
            return []
        el = ledger.read(self.element_table, rows, ["exp_name", "skycell", "filter", "mjd",
                                                    "exptime", "chips", "n_chips", "ra", "dec",
                                                    "run"])
        exp_ra, exp_dec = _group_centres(el["exp_name"], el["ra"], el["dec"])
        order = np.lexsort((el["skycell"], region_index(el["ra"], el["dec"]), el["exp_name"],
                            region_index(exp_ra, exp_dec)))
        out = []
        for i in order:
            exp, cell = el["exp_name"][i].decode(), el["skycell"][i].decode()
            chips = [c for c in el["chips"][i].decode().split(",") if c]
            out.append(WorkUnit(self.element_table, int(rows[i]), f"{exp}.{cell}",
                                float(exp_ra[i]), float(exp_dec[i]),
                                cost=float(max(1, int(el["n_chips"][i]))),
                                info={"exp_name": exp, "skycell": cell, "chips": chips,
                                      "filter": el["filter"][i].decode(),
                                      "mjd": float(el["mjd"][i]),
                                      "exptime": float(el["exptime"][i])}))
        return out

    # ------------------------------------------------------------------ process (any rank)
    def _load_chip(self, ctx: StageContext, exp: str, chip: str) -> tuple:
        from ..algorithms.psf import PSFModel

        keys = dict(exp_name=exp, chip=chip)
        image = read_image(self.input_path(ctx, "image", **keys)).astype(np.float32, copy=False)
        variance = read_image(self.input_path(ctx, "variance", **keys)).astype(np.float32,
                                                                               copy=False)
        mask = read_image(self.input_path(ctx, "mask", **keys))
        if mask.dtype != np.uint16:
            if not np.issubdtype(mask.dtype, np.integer):
                raise DataError(f"{self.input_path(ctx, 'mask', **keys)}: mask is not integer")
            mask = mask.astype(np.uint16)
        for what, arr in (("variance", variance), ("mask", mask)):
            if arr.shape != image.shape:
                raise DataError(f"{self.input_path(ctx, what, **keys)}: shape {arr.shape} but "
                                f"the image is {image.shape}")
        psf_path = self.input_path(ctx, "psf", **keys)
        if not psf_path.is_file():
            raise FileNotFoundError(f"{psf_path}: the chip's PSF model is missing")
        psf = PSFModel.from_fits(psf_path)
        return image, variance, mask, psf

    def process(self, unit: WorkUnit, ctx: StageContext) -> Outcome:
        """Warp one exposure onto one skycell and write its products (or flag it)."""
        rec = ctx.recipe["warp"]
        info = unit.info
        exp, cellname = info["exp_name"], info["skycell"]
        if self._cache is None:
            self._cache = _ChipCache(float(rec["chip_cache_mb"]) * 1e6)
        tess = self._tessellation(ctx)
        cell = tess.skycell(cellname)
        sol = self._solution(ctx, exp)
        names = info["chips"] or sorted(sol.chips)
        missing = [c for c in names if c not in sol.chips]
        if missing:
            raise DataError(f"{self.input_path(ctx, 'astrom', exp_name=exp)}: no solution for "
                            f"chips {missing} that the warp was defined with")
        zp = float(rec["zero_point"])
        base = flux_scale(sol.zpt_obs, info["exptime"], zero_point=zp)
        chips = []
        reads = 0
        for name in names:
            (image, variance, mask, psf), fresh = self._cache.get(
                (exp, name), lambda n=name: self._load_chip(ctx, exp, n))
            reads += int(fresh)
            cs = sol.chips[name]
            chips.append(ChipInput(name, image, variance, mask, cs.wcs,
                                   base * 10.0 ** (-0.4 * cs.zpt_offset), psf))
        warp = warp_to_skycell(chips, cell, kernel=str(rec["kernel"]),
                               grid_step=int(rec["grid_step"]),
                               poor_fraction=float(rec["poor_fraction"]),
                               wcs_tolerance=float(rec["wcs_tolerance_px"]),
                               max_map_error=float(rec["max_map_error_px"]))
        summary: dict[str, Any] = {
            "good_frac": warp.good_frac, "zero_point": zp, "zpt_obs": sol.zpt_obs,
            "flux_scale": base, "cov_factor": warp.covariance_factor,
            "map_error": warp.map_error, "chip_reads": reads, "n_chips": len(warp.chips_used),
        }
        min_good = float(rec["min_good_frac"])
        if warp.good_frac < min_good:
            return Outcome(quality=QUALITY["few_good_pixels"],
                           message=f"{exp} on {cellname}: {warp.good_frac:.4f} of the pixels "
                                   f"are good (< warp.min_good_frac {min_good}); not written",
                           summary=summary)
        psf = warp_psf_model(chips, warp, grid=int(rec["psf_grid"]))
        g = psf.grid_shape
        xs = (np.arange(g[1]) + 0.5) * cell.nx / g[1] - 0.5
        ys = (np.arange(g[0]) + 0.5) * cell.ny / g[0] - 0.5
        nx_, ny_ = np.meshgrid(xs, ys)
        shp = psf.shape_at(nx_.ravel(), ny_.ravel())
        fwhm = float(np.median(np.sqrt(shp.fwhm_major * shp.fwhm_minor))) * tess.pixel_scale
        # every 4th pixel each way: 2.4 Mpix of a RINGS.V3 skycell fix the median to ~0.1%
        # and cost 0.03 s instead of 0.4 s
        weight = compute_input_weights([warp.variance], [warp.mask], sample_step=4)[0]
        med_var = 1.0 / weight if weight > 0 else float("nan")
        summary.update(fwhm=fwhm, med_var=med_var)

        meta = dict(
            EXPNAME=(exp, "exposure"), FILTER=(info["filter"], "filter"),
            MJD_OBS=(info["mjd"], "[d] MJD at the start of the exposure"),
            EXPTIME=(info["exptime"], "[s] exposure time"),
            ZPT=(zp, "[mag] m = ZPT - 2.5 log10(flux)"),
            ZPT_OBS=(sol.zpt_obs, "[mag] exposure zero point for 1 e-/s"),
            FLXSCALE=(base, "flux per e- (before chip ZPT_OFF)"),
            GOODFRAC=(warp.good_frac, "fraction of good pixels"),
            COVFACT=(warp.covariance_factor, "large-scale/per-pixel noise variance"),
            MAPERR=(warp.map_error, "[px] max pixel-map interpolation error"),
            MEDVAR=(med_var, "median good variance; stack weight 1/MEDVAR"),
            FWHM=(fwhm, "[arcsec] PSF FWHM, sqrt(major*minor)"),
            KERNEL=(str(rec["kernel"]), "interpolation kernel"),
            GRIDSTEP=(warp.grid_step, "[px] pixel-map grid step (finest chip)"),
            NCHIPS=(len(warp.chips_used), "chips that contributed"),
            CHIPS=(",".join(warp.chips_used)[:68], "chips that contributed"),
        )
        cards = fits_cards(cell.header(), **meta)
        keys = dict(exp_name=exp, skycell=cellname)
        paths = {k: self.product_path(ctx, k, **keys) for k in self.outputs}
        with atomic_outputs(paths) as tmp:
            hdul = psf.to_hdulist()
            for key in ("EXPNAME", "FILTER", "FWHM"):
                hdul[0].header[key] = meta[key]
            hdul[0].header["SKYCELL"] = (cellname, "skycell")
            with warnings.catch_warnings():  # a long comment card of the PSF header is cut
                from astropy.io.fits.verify import VerifyWarning
                warnings.simplefilter("ignore", VerifyWarning)
                hdul.writeto(tmp["psf"])
            write_image(tmp["variance"], warp.variance,
                        cards + [{"name": "BUNIT", "value": "flux^2 (ZPT)"}])
            write_image(tmp["mask"], warp.mask, cards + [{"name": "BUNIT", "value": "mask bits"}])
            write_image(tmp["image"], warp.image, cards + [{"name": "BUNIT", "value": "flux (ZPT)"}])
        return Outcome(summary=summary)
