"""Saturated pixels and bleed trails.

A saturated star overflows its pixels' wells; the excess charge spills along the column
(the parallel readout direction) and leaves a bright trail of saturated or nearly saturated
pixels above and below the star.  The chip stage masks the saturated pixels SAT and the
trails BLEED (with a small growth, since the trail's edges are only partly filled).

Everything here works in raw-cell orientation, where the readout (bleed) direction is the
array axis ``axis`` (0 = along columns, y, as for GPC1 cells).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ps1mpi.algorithms import maskbits

__all__ = ["saturation_mask", "bleed_mask", "mask_saturation"]


def saturation_mask(raw: np.ndarray, *, saturation: float) -> np.ndarray:
    """Pixels at or above the saturation level.

    Parameters
    ----------
    raw : ndarray
        Raw counts (ADU, before overscan subtraction).
    saturation : float
        Saturation level (ADU), the cell's ``SATURATE`` keyword.

    Returns
    -------
    ndarray of bool
    """
    if not np.isfinite(saturation):
        raise ValueError(f"saturation must be finite ADU, got {saturation}")
    return np.asarray(raw) >= saturation


def bleed_mask(values: np.ndarray, saturated: np.ndarray, *, threshold: float, grow: int = 2,
               axis: int = 0) -> np.ndarray:
    """Bleed trails: runs along the readout axis of bright pixels that touch a saturated one.

    A run is a maximal set of consecutive pixels along ``axis`` (one column for ``axis=0``)
    whose values are ``>= threshold`` or saturated.  Every run that contains at least one
    saturated pixel is a trail (this includes the saturated core of the star); the union of
    trails is then grown by ``grow`` pixels in both directions.

    Parameters
    ----------
    values : ndarray, shape (ny, nx)
        Signal above bias (ADU, overscan subtracted) in raw-cell orientation.
    saturated : ndarray of bool, shape (ny, nx)
        Saturated pixels.
    threshold : float
        Near-saturation level (same units as ``values``), e.g. half the saturation signal.
    grow : int
        Growth (pixels) of the trail mask, a square structuring element of side
        ``2 grow + 1``.
    axis : {0, 1}
        Readout (bleed) direction: 0 along columns (y), 1 along rows (x).

    Returns
    -------
    ndarray of bool
        Trail pixels.
    """
    values = np.asarray(values)
    saturated = np.asarray(saturated, dtype=bool)
    if values.ndim != 2 or values.shape != saturated.shape:
        raise ValueError(f"values {values.shape} and saturated {saturated.shape} must be 2-D "
                         "arrays of the same shape")
    if axis not in (0, 1):
        raise ValueError(f"bleed axis must be 0 (columns) or 1 (rows), got {axis}")
    if grow < 0:
        raise ValueError(f"bleed grow must be >= 0 pixels, got {grow}")
    out = np.zeros(values.shape, dtype=bool)
    if not saturated.any():
        return out
    bright = (values >= threshold) | saturated
    # work inside the bounding box of the bright lines that hold saturated pixels
    lines = np.flatnonzero(saturated.any(axis=axis))
    if axis == 0:
        sub_b = bright[:, lines[0]:lines[-1] + 1]
        sub_s = saturated[:, lines[0]:lines[-1] + 1]
        structure = np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], bool)
    else:
        sub_b = bright[lines[0]:lines[-1] + 1, :]
        sub_s = saturated[lines[0]:lines[-1] + 1, :]
        structure = np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], bool)
    lab, _ = ndimage.label(sub_b, structure=structure)
    hit = np.unique(lab[sub_s])
    hit = hit[hit > 0]
    trail = np.isin(lab, hit)
    if axis == 0:
        out[:, lines[0]:lines[-1] + 1] = trail
    else:
        out[lines[0]:lines[-1] + 1, :] = trail
    if grow > 0:
        ys, xs = np.nonzero(out)
        y0, y1 = max(ys.min() - grow, 0), min(ys.max() + grow + 1, out.shape[0])
        x0, x1 = max(xs.min() - grow, 0), min(xs.max() + grow + 1, out.shape[1])
        box = np.ones((2 * grow + 1, 2 * grow + 1), bool)
        out[y0:y1, x0:x1] = ndimage.binary_dilation(out[y0:y1, x0:x1], structure=box)
    return out


def mask_saturation(raw: np.ndarray, *, saturation: float, bias_level: float | np.ndarray = 0.0,
                    bleed_fraction: float = 0.5, grow: int = 2, axis: int = 0) -> np.ndarray:
    """SAT and BLEED mask bits of one raw cell (data section).

    Parameters
    ----------
    raw : ndarray, shape (ny, nx)
        Raw counts of the data section (ADU) in raw orientation.
    saturation : float
        Saturation level of the raw counts (ADU).
    bias_level : float or ndarray
        Overscan level to remove before comparing with the bleed threshold (ADU; scalar or
        one value per row).
    bleed_fraction : float
        Trail pixels are those ``>= bleed_fraction * (saturation - bias)`` above bias.
    grow, axis
        See :func:`bleed_mask`.

    Returns
    -------
    ndarray of uint16
        ``maskbits.SAT`` | ``maskbits.BLEED`` bits.
    """
    raw = np.asarray(raw)
    if raw.ndim != 2:
        raise ValueError(f"raw cell: expected a 2-D array, got shape {raw.shape}")
    if not (0 < bleed_fraction <= 1):
        raise ValueError(f"bleed_fraction must be in (0, 1], got {bleed_fraction}")
    sat = saturation_mask(raw, saturation=saturation)
    out = np.zeros(raw.shape, np.uint16)
    out[sat] = maskbits.SAT
    if sat.any():
        lvl = np.asarray(bias_level, dtype=np.float32)
        if lvl.ndim == 1:
            lvl = lvl[:, None]
        vals = raw.astype(np.float32) - lvl
        thresh = bleed_fraction * (saturation - float(np.median(lvl)))
        out[bleed_mask(vals, sat, threshold=thresh, grow=grow, axis=axis)] |= maskbits.BLEED
    return out
