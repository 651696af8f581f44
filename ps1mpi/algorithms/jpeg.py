"""The focal-plane picture of an exposure: binned chips mosaicked in the camera layout.

The camera stage merges the chip stage's x16-binned chip images into one image of the whole
focal plane for the process monitor, as the IPP did with its per-exposure JPEGs. Each binned
pixel is put where its centre falls in the focal plane (chip parities respected: the GPC1
chips of the left half are rotated by 180 degrees), the mosaic is stretched (asinh or linear
between two percentiles of all chips' pixels) to 8 bits, and focal-plane +Y is drawn up.

:func:`focal_plane_mosaic` returns the picture as a ``uint8`` array; :func:`encode_jpeg`
turns it into baseline JPEG bytes without any imaging library (the stage writes the bytes).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

__all__ = ["mosaic_binned_chips", "stretch_to_uint8", "focal_plane_mosaic", "encode_jpeg"]


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


# ----------------------------------------------------------------------------------------------
# Baseline JPEG encoder (ITU-T T.81, JFIF), vectorised with numpy
# ----------------------------------------------------------------------------------------------

_LUMA_Q = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], float).reshape(8, 8)
_CHROMA_Q = np.array([
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99], float).reshape(8, 8)

# Standard Huffman tables (T.81 Annex K.3): code-length counts and symbol values.
_DC_LUMA = ([0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0], list(range(12)))
_DC_CHROMA = ([0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], list(range(12)))
_AC_LUMA = ([0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D], [
    0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61,
    0x07, 0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xA1, 0x08, 0x23, 0x42, 0xB1, 0xC1, 0x15, 0x52,
    0xD1, 0xF0, 0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0A, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x25,
    0x26, 0x27, 0x28, 0x29, 0x2A, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44, 0x45,
    0x46, 0x47, 0x48, 0x49, 0x4A, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x63, 0x64,
    0x65, 0x66, 0x67, 0x68, 0x69, 0x6A, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x83,
    0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99,
    0x9A, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7, 0xA8, 0xA9, 0xAA, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6,
    0xB7, 0xB8, 0xB9, 0xBA, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xD2, 0xD3,
    0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA, 0xE1, 0xE2, 0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8,
    0xE9, 0xEA, 0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8, 0xF9, 0xFA])
_AC_CHROMA = ([0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77], [
    0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61,
    0x71, 0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xA1, 0xB1, 0xC1, 0x09, 0x23, 0x33,
    0x52, 0xF0, 0x15, 0x62, 0x72, 0xD1, 0x0A, 0x16, 0x24, 0x34, 0xE1, 0x25, 0xF1, 0x17, 0x18,
    0x19, 0x1A, 0x26, 0x27, 0x28, 0x29, 0x2A, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44,
    0x45, 0x46, 0x47, 0x48, 0x49, 0x4A, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x63,
    0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6A, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A,
    0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97,
    0x98, 0x99, 0x9A, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7, 0xA8, 0xA9, 0xAA, 0xB2, 0xB3, 0xB4,
    0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA,
    0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA, 0xE2, 0xE3, 0xE4, 0xE5, 0xE6, 0xE7,
    0xE8, 0xE9, 0xEA, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8, 0xF9, 0xFA])

_ZIGZAG = np.array(sorted(((i, j) for i in range(8) for j in range(8)),
                          key=lambda p: (p[0] + p[1], -p[1] if (p[0] + p[1]) % 2 else p[1])))
_ZZ_FLAT = _ZIGZAG[:, 0] * 8 + _ZIGZAG[:, 1]


def _dct_matrix() -> np.ndarray:
    k = np.arange(8)[:, None]
    n = np.arange(8)[None, :]
    c = np.sqrt(2.0 / 8.0) * np.cos((2 * n + 1) * k * np.pi / 16.0)
    c[0] /= np.sqrt(2.0)
    return c


_DCT = _dct_matrix()


def _huff_codes(table: tuple[list[int], list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Canonical Huffman codes: arrays indexed by symbol (0..255) of code and length."""
    counts, symbols = table
    code_of = np.zeros(256, np.int64)
    len_of = np.zeros(256, np.int64)
    code, k = 0, 0
    for length in range(1, 17):
        for _ in range(counts[length - 1]):
            code_of[symbols[k]] = code
            len_of[symbols[k]] = length
            code += 1
            k += 1
        code <<= 1
    return code_of, len_of


def _scaled_q(base: np.ndarray, quality: int) -> np.ndarray:
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return np.clip(np.floor((base * scale + 50) / 100), 1, 255)


def _blocks(plane: np.ndarray) -> np.ndarray:
    """(nby*nbx, 8, 8) blocks in raster order of an edge-padded plane."""
    h, w = plane.shape
    H, W = -(-h // 8) * 8, -(-w // 8) * 8
    p = np.pad(plane, ((0, H - h), (0, W - w)), mode="edge")
    return p.reshape(H // 8, 8, W // 8, 8).swapaxes(1, 2).reshape(-1, 8, 8)


def _quantised_zigzag(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    coef = np.einsum("ij,bjk,lk->bil", _DCT, blocks - 128.0, _DCT)
    return np.round(coef / q).astype(np.int64).reshape(-1, 64)[:, _ZZ_FLAT]


def _magnitude(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """JPEG size category and appended bits of signed values."""
    a = np.abs(v)
    size = np.zeros(v.shape, np.int64)
    nz = a > 0
    size[nz] = np.floor(np.log2(a[nz])).astype(np.int64) + 1
    bits = np.where(v >= 0, v, v + (1 << size) - 1)
    return size, bits


def _symbols(zz: np.ndarray, dc_pred_diff: np.ndarray, dc_tab, ac_tab
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bit items (value, nbits) of one component's blocks, ordered by (block, position)."""
    nblk = zz.shape[0]
    dc_code, dc_len = dc_tab
    ac_code, ac_len = ac_tab
    items_blk: list[np.ndarray] = []
    items_pos: list[np.ndarray] = []
    items_val: list[np.ndarray] = []
    items_nb: list[np.ndarray] = []

    def emit(blk, pos, val, nb):
        items_blk.append(np.asarray(blk, np.int64))
        items_pos.append(np.asarray(pos, np.float64))
        items_val.append(np.asarray(val, np.int64))
        items_nb.append(np.asarray(nb, np.int64))

    # DC: Huffman(size) then the magnitude bits
    size, bits = _magnitude(dc_pred_diff)
    emit(np.arange(nblk), np.zeros(nblk), (dc_code[size] << size) | bits, dc_len[size] + size)
    # AC: (run, size) symbols for the non-zero coefficients, ZRL for runs of 16 zeros, EOB
    ac = zz[:, 1:]
    b_idx, k_idx = np.nonzero(ac)
    if b_idx.size:
        prev = np.empty_like(k_idx)
        prev[0] = -1
        prev[1:] = np.where(b_idx[1:] == b_idx[:-1], k_idx[:-1], -1)
        prev[np.r_[True, b_idx[1:] != b_idx[:-1]]] = -1
        run = k_idx - prev - 1
        nzrl = run // 16
        run = run % 16
        # ZRL symbols (0xF0), placed just before their coefficient
        if nzrl.any():
            rep = np.repeat(np.arange(b_idx.size), nzrl)
            sub = np.concatenate([np.arange(n) for n in nzrl[nzrl > 0]]) if rep.size else rep
            # between the previous coefficient (position <= k - 16) and this one (k + 1)
            emit(b_idx[rep], k_idx[rep] + 0.5 + 0.01 * sub,
                 np.full(rep.size, ac_code[0xF0]), np.full(rep.size, ac_len[0xF0]))
        vals = ac[b_idx, k_idx]
        size, bits = _magnitude(vals)
        sym = (run << 4) | size
        emit(b_idx, 1 + k_idx, (ac_code[sym] << size) | bits, ac_len[sym] + size)
    # EOB where the last coefficient is zero
    last = np.full(nblk, -1)
    if b_idx.size:
        np.maximum.at(last, b_idx, k_idx)
    eob = np.flatnonzero(last < 62)
    emit(eob, np.full(eob.size, 100.0), np.full(eob.size, ac_code[0x00]),
         np.full(eob.size, ac_len[0x00]))
    blk = np.concatenate(items_blk)
    pos = np.concatenate(items_pos)
    order = np.lexsort((pos, blk))
    return blk[order], np.concatenate(items_val)[order], np.concatenate(items_nb)[order]


def _pack_bits(values: np.ndarray, nbits: np.ndarray) -> bytes:
    """Concatenate variable-length codes MSB first, pad with ones, stuff 0xFF bytes.

    Every item (at most 27 bits) is shifted into a 64-bit field at its bit offset and split
    over the two 32-bit output words it can touch; items never share bits, so the words are
    sums (exact in float64) of their parts.
    """
    nbits = nbits.astype(np.int64)
    total = int(nbits.sum())
    if total == 0:
        return b""
    start = np.cumsum(nbits) - nbits
    word = start >> 5
    shift = (64 - nbits - (start & 31)).astype(np.uint64)
    v64 = values.astype(np.uint64) << shift
    nw = (total + 31) // 32 + 1
    hi = np.bincount(word, weights=(v64 >> np.uint64(32)).astype(np.float64), minlength=nw)
    lo = np.bincount(word + 1, weights=(v64 & np.uint64(0xFFFFFFFF)).astype(np.float64),
                     minlength=nw)
    words = (hi + lo).astype(np.uint64).astype(">u4")
    data = np.frombuffer(words.tobytes(), np.uint8)[:(total + 7) // 8].copy()
    pad = (-total) % 8
    if pad:
        data[-1] |= np.uint8((1 << pad) - 1)
    ff = np.flatnonzero(data == 0xFF)
    if ff.size:
        data = np.insert(data, ff + 1, 0)
    return data.tobytes()


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def _dht(tc: int, th: int, table) -> bytes:
    counts, symbols = table
    return bytes([(tc << 4) | th]) + bytes(counts) + bytes(symbols)


def encode_jpeg(image: np.ndarray, *, quality: int = 90) -> bytes:
    """Encode a ``uint8`` grey ``(H, W)`` or RGB ``(H, W, 3)`` image as baseline JFIF JPEG.

    Parameters
    ----------
    image : ndarray of uint8
        The picture, row 0 at the top.
    quality : int
        1..100, the IJG quality scale of the standard quantisation tables.

    Returns
    -------
    bytes
        The JPEG file content (4:4:4 sampling for colour).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image: must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"image: expected (H, W) or (H, W, 3), got shape {image.shape}")
    h, w = image.shape[:2]
    if not (0 < h < 65536 and 0 < w < 65536):
        raise ValueError(f"image: size {w}x{h} outside the JPEG range 1..65535")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality: must be 1..100, got {quality!r}")
    quality = int(quality)
    if image.ndim == 2:
        planes = [image.astype(np.float64)]
    else:
        rgb = image.astype(np.float64)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        planes = [0.299 * r + 0.587 * g + 0.114 * b,
                  -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0,
                  0.5 * r - 0.418688 * g - 0.081312 * b + 128.0]
    qs = [_scaled_q(_LUMA_Q, quality), _scaled_q(_CHROMA_Q, quality)]
    tabs = [(_huff_codes(_DC_LUMA), _huff_codes(_AC_LUMA)),
            (_huff_codes(_DC_CHROMA), _huff_codes(_AC_CHROMA))]
    blk_all, val_all, nb_all, comp_all = [], [], [], []
    for c, plane in enumerate(planes):
        t = 0 if c == 0 else 1
        zz = _quantised_zigzag(_blocks(plane), qs[t])
        dc = zz[:, 0]
        diff = np.diff(dc, prepend=0)
        blk, val, nb = _symbols(zz, diff, tabs[t][0], tabs[t][1])
        blk_all.append(blk)
        val_all.append(val)
        nb_all.append(nb)
        comp_all.append(np.full(blk.size, c))
    # interleave components block by block (MCU = one block of each component at 4:4:4)
    blk = np.concatenate(blk_all)
    comp = np.concatenate(comp_all)
    seq = np.arange(blk.size)
    order = np.lexsort((seq, comp, blk))
    scan = _pack_bits(np.concatenate(val_all)[order], np.concatenate(nb_all)[order])
    ncomp = len(planes)
    out = bytearray(b"\xFF\xD8")
    out += _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    for t in range(1 if ncomp == 1 else 2):
        out += _segment(0xDB, bytes([t]) + bytes(qs[t].astype(np.uint8).ravel()[_ZZ_FLAT]))
    sof = bytes([8]) + h.to_bytes(2, "big") + w.to_bytes(2, "big") + bytes([ncomp])
    for c in range(ncomp):
        sof += bytes([c + 1, 0x11, 0 if c == 0 else 1])
    out += _segment(0xC0, sof)
    out += _segment(0xC4, _dht(0, 0, _DC_LUMA) + _dht(1, 0, _AC_LUMA))
    if ncomp == 3:
        out += _segment(0xC4, _dht(0, 1, _DC_CHROMA) + _dht(1, 1, _AC_CHROMA))
    sos = bytes([ncomp])
    for c in range(ncomp):
        sos += bytes([c + 1, 0x00 if c == 0 else 0x11])
    sos += bytes([0, 63, 0])
    out += _segment(0xDA, sos)
    out += scan
    out += b"\xFF\xD9"
    return bytes(out)
