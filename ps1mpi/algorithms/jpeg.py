"""The focal-plane picture of an exposure: binned chips mosaicked in the camera layout.

The camera stage merges the chip stage's x16-binned chip images into one image of the whole
focal plane for the process monitor, as the IPP did with its per-exposure JPEGs. Each binned
pixel is put where its centre falls in the focal plane (chip parities respected: the GPC1
chips of the left half are rotated by 180 degrees), the mosaic is stretched (asinh or linear
between two percentiles of all chips' pixels) to 8 bits, and focal-plane +Y is drawn up.

:func:`focal_plane_mosaic` returns the picture as a ``uint8`` array; the camera stage encodes it
as a JPEG with Pillow.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

__all__ = ["mosaic_binned_chips", "stretch_to_uint8", "focal_plane_mosaic"]


def mosaic_binned_chips(binned: Mapping[str, np.ndarray], *, camera: Any, binning: int = 16
                        ) -> tuple[np.ndarray, tuple[float, float]]:
    """Place binned chip images on one focal-plane grid.

    Parameters
    ----------
    binned : mapping chip name -> ndarray
        Binned chip images (any units); pixel ``[j, i]`` averages chip pixels
        ``[j*binning:(j+1)*binning, i*binning:(i+1)*binning]`` (the chip stage's
        ``bin_image``). Missing chips stay empty.
    camera : Camera
        Camera geometry.
    binning : int
        Binning factor (chip pixels per binned pixel).

    Returns
    -------
    mosaic : ndarray of float32, shape (NY, NX)
        Focal-plane image, row 0 at the *lowest* focal-plane Y; NaN where no chip data.
    origin : tuple of float
        Focal-plane ``(X, Y)`` (px) of the lower-left corner of mosaic pixel ``[0, 0]``.
    """
    b = int(binning)
    if b < 1:
        raise ValueError(f"binning: must be >= 1, got {binning!r}")
    xmin, xmax, ymin, ymax = camera.focal_plane_extent()
    # one spare pixel on each side: partial edge blocks stay on the canvas
    gx0, gy0 = xmin - b, ymin - b
    nx_out = int(np.ceil((xmax - xmin) / b)) + 2
    ny_out = int(np.ceil((ymax - ymin) / b)) + 2
    out = np.full((ny_out, nx_out), np.nan, np.float32)
    known = set(camera.chip_names)
    for chip, img in binned.items():
        if chip not in known:
            raise ValueError(f"binned: {chip!r} is not a chip of camera {camera.name}")
        img = np.asarray(img)
        if img.ndim != 2:
            raise ValueError(f"binned[{chip!r}]: expected a 2-D image, got shape {img.shape}")
        exp_shape = (-(-camera.chip_ny // b), -(-camera.chip_nx // b))
        if img.shape != exp_shape:
            raise ValueError(f"binned[{chip!r}]: shape {img.shape}, expected {exp_shape} for "
                             f"x{b} binning of a {camera.chip_ny}x{camera.chip_nx} chip")
        ny, nx = img.shape
        lay = camera.chip(chip)
        # the first (full) block's centre fixes the cell; the others follow with the parity
        X0, Y0 = camera.chip_to_focal(chip, 0.5 * (b - 1), 0.5 * (b - 1))
        i0 = int(np.floor((float(X0) - gx0) / b))
        j0 = int(np.floor((float(Y0) - gy0) / b))
        ii = np.clip(i0 + lay.xparity * np.arange(nx), 0, nx_out - 1)
        jj = np.clip(j0 + lay.yparity * np.arange(ny), 0, ny_out - 1)
        out[jj[:, None], ii[None, :]] = img
    return out, (gx0, gy0)


def stretch_to_uint8(image: np.ndarray, *, stretch: str = "asinh",
                     percentiles: tuple[float, float] = (1.0, 99.5), softening: float = 0.05
                     ) -> tuple[np.ndarray, tuple[float, float]]:
    """Map an image to 0..255.

    Parameters
    ----------
    image : ndarray
        Image; non-finite pixels map to 0.
    stretch : {"asinh", "linear"}
        ``asinh``: ``asinh(t / s) / asinh(1 / s)`` with ``t`` the value scaled to 0..1 between
        the percentiles and ``s`` the softening (faint structure lifted, bright stars not
        saturated); ``linear``: ``t``.
    percentiles : tuple of float
        Low and high percentiles (of the finite pixels) mapped to 0 and 255.
    softening : float
        asinh softening in units of the percentile range.

    Returns
    -------
    out : ndarray of uint8
    limits : tuple of float
        The values mapped to 0 and 255.
    """
    if stretch not in ("asinh", "linear"):
        raise ValueError(f"stretch: must be 'asinh' or 'linear', got {stretch!r}")
    lo_p, hi_p = percentiles
    if not 0 <= lo_p < hi_p <= 100:
        raise ValueError(f"percentiles: need 0 <= low < high <= 100, got {percentiles!r}")
    if not softening > 0:
        raise ValueError(f"softening: must be positive, got {softening!r}")
    image = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(image)
    if not finite.any():
        return np.zeros(image.shape, np.uint8), (np.nan, np.nan)
    lo, hi = np.percentile(image[finite], [lo_p, hi_p])
    if not hi > lo:
        hi = lo + 1.0
    t = np.clip((np.where(finite, image, lo) - lo) / (hi - lo), 0.0, 1.0)
    if stretch == "asinh":
        t = np.arcsinh(t / softening) / np.arcsinh(1.0 / softening)
    out = np.round(t * 255.0).astype(np.uint8)
    out[~finite] = 0
    return out, (float(lo), float(hi))


def focal_plane_mosaic(binned: Mapping[str, np.ndarray], *, camera: Any, binning: int = 16,
                       stretch: str = "asinh", percentiles: tuple[float, float] = (1.0, 99.5),
                       softening: float = 0.05, rgb: bool = False,
                       nodata_rgb: tuple[int, int, int] = (0, 0, 48)) -> np.ndarray:
    """The display picture of an exposure's focal plane.

    Parameters
    ----------
    binned : mapping chip name -> ndarray
        x``binning`` binned chip images (e.g. background-subtracted counts per pixel).
    camera : Camera
        Camera geometry.
    binning : int
        Binning factor of the inputs.
    stretch, percentiles, softening
        See :func:`stretch_to_uint8`.
    rgb : bool
        Return an RGB image in which pixels without data (gaps, missing chips) are drawn in
        ``nodata_rgb``; otherwise a grey image with them black.
    nodata_rgb : tuple of int
        Colour of pixels without data when ``rgb``.

    Returns
    -------
    ndarray of uint8
        ``(NY, NX)`` grey or ``(NY, NX, 3)`` RGB, row 0 at the top (highest focal-plane Y).
    """
    mosaic, _ = mosaic_binned_chips(binned, camera=camera, binning=binning)
    grey, _ = stretch_to_uint8(mosaic, stretch=stretch, percentiles=percentiles,
                               softening=softening)
    grey = grey[::-1]
    if not rgb:
        return np.ascontiguousarray(grey)
    out = np.repeat(grey[:, :, None], 3, axis=2)
    out[~np.isfinite(mosaic[::-1])] = np.asarray(nodata_rgb, np.uint8)
    return out
