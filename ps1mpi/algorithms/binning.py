"""Block averaging of chip images for the visualisation products (x16 and x256 binned chips).
"""

from __future__ import annotations

import numpy as np

from ps1mpi.algorithms import maskbits

__all__ = ["bin_image", "BIN1", "BIN2"]

#: The two binning factors of the chip stage's binned products (the seed text's x16 and x256).
BIN1 = 16
BIN2 = 256

try:
    import numba

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    numba = None
    _HAVE_NUMBA = False

if _HAVE_NUMBA:
    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _bin_nb(image, mask, use_mask, bad, factor, by, bx):  # pragma: no cover - compiled
        """Block sums and counts: valid pixels are accumulated per column over the rows of a
        block row (a vectorisable pass), then the columns are summed per block."""
        ny, nx = image.shape
        s = np.zeros((by, bx), np.float64)
        n = np.zeros((by, bx), np.int32)
        col_s = np.zeros(nx, np.float64)
        col_n = np.zeros(nx, np.int32)
        zero = image.dtype.type(0)
        for j in range(ny):
            row = image[j]
            if use_mask:
                mrow = mask[j]
                for i in range(nx):
                    v = row[i]
                    ok = np.isfinite(v) & ((mrow[i] & bad) == 0)
                    col_s[i] += v if ok else zero
                    col_n[i] += 1 if ok else 0
            else:
                for i in range(nx):
                    v = row[i]
                    ok = np.isfinite(v)
                    col_s[i] += v if ok else zero
                    col_n[i] += 1 if ok else 0
            if (j + 1) % factor == 0 or j == ny - 1:
                jb = j // factor
                for b in range(bx):
                    acc = 0.0
                    cnt = 0
                    for i in range(b * factor, min((b + 1) * factor, nx)):
                        acc += col_s[i]
                        cnt += col_n[i]
                    s[jb, b] = acc
                    n[jb, b] = cnt
                col_s[:] = 0.0
                col_n[:] = 0
        return s, n


def bin_image(image: np.ndarray, factor: int, *, mask: np.ndarray | None = None,
              bad_bits: int = maskbits.BAD, fill: float = np.nan,
              return_counts: bool = False, engine: str = "auto"
              ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Average ``factor`` x ``factor`` blocks of an image, ignoring masked pixels.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Image (any units; output in the same units per pixel).
    factor : int
        Block size (pixels).  Edge blocks that are only partly inside the image average the
        pixels they contain; the output has ``ceil(ny / factor) x ceil(nx / factor)`` pixels.
        Output pixel ``[j, i]`` covers input pixels ``[j*factor:(j+1)*factor,
        i*factor:(i+1)*factor]``.
    mask : ndarray of uint16, optional
        Mask; pixels with any of ``bad_bits`` (and non-finite pixels) are ignored.
    bad_bits : int
        Mask bits that exclude a pixel (default: every bad bit, gaps included).
    fill : float
        Value of blocks without any valid pixel.
    return_counts : bool
        Also return the number of valid pixels per block.
    engine : {"auto", "numba", "numpy"}
        One-pass numba kernel (when installed) or the numpy reshape-sum.

    Returns
    -------
    binned : ndarray, float32
    counts : ndarray, int32 (only if ``return_counts``)
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image: expected a 2-D array, got shape {image.shape}")
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"binning factor must be >= 1, got {factor}")
    ny, nx = image.shape
    by, bx = -(-ny // factor), -(-nx // factor)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise ValueError(f"mask shape {mask.shape} does not match the image shape "
                             f"{image.shape}")
    if engine not in ("auto", "numba", "numpy"):
        raise ValueError(f"engine must be 'auto', 'numba' or 'numpy', got {engine!r}")
    if engine == "numba" and not _HAVE_NUMBA:
        raise RuntimeError("engine='numba' requested but numba is not installed")
    if _HAVE_NUMBA and engine != "numpy" and image.dtype in (np.float32, np.float64):
        img_c = np.ascontiguousarray(image)
        if mask is not None:
            s, n = _bin_nb(img_c, np.ascontiguousarray(mask, dtype=np.uint16), True,
                           np.uint16(bad_bits & 0xFFFF), factor, by, bx)
        else:
            s, n = _bin_nb(img_c, np.zeros((1, nx), np.uint16), False, np.uint16(0), factor,
                           by, bx)
    else:
        valid = np.isfinite(image)
        if mask is not None:
            valid &= (mask & bad_bits) == 0
        vals = np.where(valid, image, 0).astype(np.float64)
        if by * factor != ny or bx * factor != nx:
            vals = np.pad(vals, ((0, by * factor - ny), (0, bx * factor - nx)))
            valid = np.pad(valid, ((0, by * factor - ny), (0, bx * factor - nx)))
        # sum over x inside each block, then over y
        s = vals.reshape(by * factor, bx, factor).sum(axis=2)
        s = s.reshape(by, factor, bx).sum(axis=1)
        n = valid.reshape(by * factor, bx, factor).sum(axis=2, dtype=np.int32)
        n = n.reshape(by, factor, bx).sum(axis=1, dtype=np.int32)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(n > 0, s / np.maximum(n, 1), fill).astype(np.float32)
    if return_counts:
        return out, n
    return out
