"""Source detection: matched-filter significance, peaks, footprints, deblending, FWHM.

Detection follows psphot (IPP):

1. The significance image is the PSF-matched filter of the sky-subtracted image with a
   circular Gaussian of the PSF sigma ``g``, weighted by the inverse variance ``W`` (zero on
   masked pixels): ``nu = (g * (W I)) / sqrt(g^2 * W)``, where ``*`` is convolution. For a
   point source ``(g * (W I)) / (g^2 * W)`` is the maximum-likelihood peak amplitude and
   ``nu`` its signal-to-noise ratio; pixels whose kernel is less than ``min_coverage`` (0.5,
   ``PEAKS_MIN_GAUSS``) covered by usable pixels are given no significance.
2. Peaks are local maxima (3x3) of ``nu`` above ``threshold`` (5 sigma,
   ``PEAKS_NSIGMA_LIMIT_2``).
3. Footprints are the 8-connected regions of ``nu`` above ``footprint_threshold``, grown
   by ``footprint_grow`` pixels (``FOOTPRINT_GROW_RADIUS`` 3; in the L1 metric, by iterated
   4-connected dilation) and labelled; a peak whose footprint holds fewer than
   ``footprint_npix_min`` pixels above the threshold (``FOOTPRINT_NPIXMIN`` 5) is dropped.
4. Deblending (``pmFootprintCullPeaks``, on the significance image): in every footprint the
   peaks are taken brightest first; a fainter peak survives only if the region connected
   to it above ``nu_peak - cull_nsigma * sqrt(1 + (cull_padding nu_peak)^2)`` (at least
   ``cull_min``) holds no brighter surviving peak, i.e. if the saddle ("col") separating it
   from every brighter peak is deep enough. Recipe values 4, 0.01 and 1
   (``FOOTPRINT_CULL_NSIGMA_DELTA``, ``_PAD``, ``_MIN``). Footprints left with several peaks
   are blends; every peak in them is flagged ``blend`` and the brightest ``blend_primary``.

Coordinates are 0-based pixels with the centre of pixel ``[j, i]`` at ``(x, y) = (i, j)``.

Implementation. With numba (a project dependency) the matched filter is one streaming pass
over the rows (weighting, separable filters in float32 through a ring of rows held in cache,
the kernel coverage computed only near unusable pixels), the pixels above the footprint
threshold are kept as runs per row, grown and labelled as runs (union-find, numbered in
raster order like ``scipy.ndimage.label``), and the saddle test is a flood fill that stops
at the first brighter surviving peak. Without numba the same results come from
``scipy.ndimage`` filters, dilation and labelling (to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from . import maskbits
from .moments import centroid_moments, deconvolve_window

try:  # numba is a dependency; the scipy path computes the same result without it
    import numba

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None
    _HAVE_NUMBA = False

__all__ = [
    "DETECTION_DTYPE",
    "FWHMEstimate",
    "significance_image",
    "detect_sources",
    "estimate_fwhm",
]

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))

DETECTION_DTYPE = np.dtype([
    ("id", "i4"),
    ("x_peak", "i4"), ("y_peak", "i4"),        # peak pixel (pixels)
    ("x", "f8"), ("y", "f8"),                  # sub-pixel peak of the significance (pixels)
    ("significance", "f4"),                    # matched-filter S/N at the peak
    ("flux_peak", "f4"),                       # image value at the peak pixel (ADU)
    ("amp_peak", "f4"),                        # matched-filter PSF peak amplitude (ADU)
    ("footprint_id", "i4"),                    # 1-based footprint label
    ("footprint_npix", "i4"),                  # footprint size (pixels)
    ("n_peaks", "i2"),                         # surviving peaks in the footprint
    ("blend", "?"),                            # footprint holds more than one peak
    ("blend_primary", "?"),                    # brightest peak of a blended footprint
    ("edge", "?"),                             # peak near the image edge
    ("saturated", "?"),                        # SAT or BLEED pixel within 1 pixel of peak
    ("masked", "?"),                           # peak pixel itself is masked
])


def _check(image, variance, mask, func):
    image = np.asarray(image)
    variance = np.asarray(variance)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"{func}: image must be a non-empty 2-D array, got shape {image.shape}")
    if variance.shape != image.shape:
        raise ValueError(f"{func}: variance shape {variance.shape} differs from image shape "
                         f"{image.shape}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise ValueError(f"{func}: mask shape {mask.shape} differs from image shape "
                             f"{image.shape}")
    return image, variance, mask


def _kernel_sum(sigma: float, truncate: float) -> float:
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    return float(np.exp(-0.5 * t * t / sigma ** 2).sum())


def _matched_filter(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None,
                    fwhm: float, mask_bits: int, truncate: float, min_coverage: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Matched-filter numerator ``g * (W I)`` and denominator ``g^2 * W`` (float32).

    The denominator is 0 where the kernel coverage by usable pixels is below
    ``min_coverage``.
    """
    sigma = fwhm / FWHM_PER_SIGMA
    s2 = sigma / np.sqrt(2.0)
    t2 = truncate * np.sqrt(2.0)
    var = np.asarray(variance, dtype=np.float32)
    img = np.asarray(image, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        w = np.float32(1.0) / var                      # new array
        good = np.isfinite(w) & (var > 0) & np.isfinite(img)
        if mask is not None:
            good &= (mask & mask_bits) == 0
        all_good = bool(good.all())
        if not all_good:
            w[~good] = 0.0
        wi = np.multiply(w, img, dtype=np.float32)
        if not all_good:
            wi[~good] = 0.0
    num = ndi.gaussian_filter(wi, sigma, truncate=truncate, output=np.float32, mode="constant")
    del wi
    den = ndi.gaussian_filter(w, s2, truncate=t2, output=np.float32, mode="constant")
    del w
    num *= np.float32(_kernel_sum(sigma, truncate) ** 2)
    den *= np.float32(_kernel_sum(s2, t2) ** 2)
    if all_good:
        # only the image border lacks coverage
        cov_y = ndi.gaussian_filter1d(np.ones(image.shape[0], np.float32), s2, truncate=t2,
                                      mode="constant")
        cov_x = ndi.gaussian_filter1d(np.ones(image.shape[1], np.float32), s2, truncate=t2,
                                      mode="constant")
        ry = np.flatnonzero(cov_y < 1.0 - 1e-6)
        rx = np.flatnonzero(cov_x < 1.0 - 1e-6)
        den[ry, :] *= np.outer(cov_y[ry], cov_x) >= min_coverage
        den[:, rx] *= np.outer(cov_y, cov_x[rx]) >= min_coverage
    else:
        cov = ndi.gaussian_filter(good.astype(np.float32), s2, truncate=t2, output=np.float32,
                                  mode="constant")
        den[cov < min_coverage] = 0.0
    return num, den


# ----------------------------------------------------------------------------------------
# compiled kernels (numba): one streaming pass for the matched filter, run-length footprints


if _HAVE_NUMBA:
    _JIT = dict(cache=True, nogil=True, boundscheck=False, error_model="numpy")

    @numba.njit(**_JIT)
    def _grow_i4(a, n):  # pragma: no cover - compiled
        """``a`` with its capacity doubled (the first ``n`` values kept)."""
        b = np.empty(max(2 * a.size, 64), np.int32)
        b[:n] = a[:n]
        return b

    @numba.njit(**_JIT)
    def _hfilter(p, g, r, out):  # pragma: no cover - compiled
        """``out[i] = sum_k g[k] p[i + k]`` for a symmetric kernel of half-width ``r``;
        ``p`` is the row padded by ``r`` zeros on both sides."""
        n = out.size
        c = p[r:r + n]
        g0 = g[r]
        for i in range(n):
            out[i] = g0 * c[i]
        for k in range(1, r + 1):
            gk = g[r + k]
            a = p[r - k:r - k + n]
            b = p[r + k:r + k + n]
            for i in range(n):
                out[i] += gk * (a[i] + b[i])

    @numba.njit(**_JIT)
    def _matched_filter_nb(img, var, mask, use_mask, bits, g, g2, min_cov, sig, amp,
                           want_amp):  # pragma: no cover - compiled
        """Significance (and amplitude) images of the inverse-variance-weighted matched
        filter in one pass over the rows.

        Every input row is weighted (``W = 1/V``, 0 on unusable pixels) and filtered along
        x into a ring of ``2r + 1`` rows; every output row is then the filter along y of
        the ring, by blocks of columns that stay in the L1 cache. The kernel coverage by
        usable pixels is the border coverage (separable) less the filtered unusable
        pixels, which are only visited near unusable pixels.
        """
        ny, nx = img.shape
        r = (g.size - 1) // 2
        nr = 2 * r + 1
        bw = 256
        nblk = (nx + bw - 1) // bw
        f32 = np.float32
        pw = np.zeros(nx + 2 * r, np.float32)
        pwi = np.zeros(nx + 2 * r, np.float32)
        pgood = np.zeros(nx, np.uint8)
        hn = np.empty((nr, nx), np.float32)
        hd = np.empty((nr, nx), np.float32)
        hb = np.empty((nr, nx), np.float32)
        bflag = np.zeros((nr, nblk), np.bool_)
        acc_n = np.empty(bw, np.float32)
        acc_d = np.empty(bw, np.float32)
        acc_c = np.empty(bw, np.float32)
        k2 = 0.0
        for k in range(nr):
            k2 += g2[k]
        covx = np.empty(nx, np.float32)
        for i in range(nx):
            s = 0.0
            for k in range(-r, r + 1):
                if 0 <= i + k < nx:
                    s += g2[k + r]
            covx[i] = s / k2
        covy = np.empty(ny, np.float32)
        for j in range(ny):
            s = 0.0
            for k in range(-r, r + 1):
                if 0 <= j + k < ny:
                    s += g2[k + r]
            covy[j] = s / k2
        inv_kk2 = f32(1.0 / (k2 * k2))
        one = f32(1.0)
        zero = f32(0.0)
        for jin in range(ny + r):
            if jin < ny:
                slot = jin % nr
                row = img[jin]
                vrow = var[jin]
                cw = pw[r:r + nx]
                cwi = pwi[r:r + nx]
                nbad = 0
                if use_mask:
                    mrow = mask[jin]
                    for i in range(nx):
                        v = vrow[i]
                        x = row[i]
                        w = one / v
                        ok = (v > 0) & np.isfinite(w) & np.isfinite(x) & ((mrow[i] & bits) == 0)
                        cw[i] = w if ok else zero
                        cwi[i] = w * x if ok else zero
                        pgood[i] = ok
                        nbad += not ok
                else:
                    for i in range(nx):
                        v = vrow[i]
                        x = row[i]
                        w = one / v
                        ok = (v > 0) & np.isfinite(w) & np.isfinite(x)
                        cw[i] = w if ok else zero
                        cwi[i] = w * x if ok else zero
                        pgood[i] = ok
                        nbad += not ok
                _hfilter(pwi, g, r, hn[slot])
                _hfilter(pw, g2, r, hd[slot])
                # unusable pixels of the row, filtered along x (only near them)
                bflag[slot, :] = False
                if nbad > 0:
                    hbr = hb[slot]
                    for i in range(nx):
                        if pgood[i] == 0:
                            b0 = max(i - r, 0) // bw
                            b1 = min(i + r, nx - 1) // bw
                            for b in range(b0, b1 + 1):
                                if not bflag[slot, b]:
                                    bflag[slot, b] = True
                                    hbr[b * bw:min((b + 1) * bw, nx)] = 0.0
                    for i in range(nx):
                        if pgood[i] == 0:
                            for t in range(max(i - r, 0), min(i + r, nx - 1) + 1):
                                hbr[t] += g2[t - i + r]
            jo = jin - r
            if jo < 0:
                continue
            c = jo % nr
            cy = covy[jo]
            srow = sig[jo]
            for b in range(nblk):
                i0 = b * bw
                n = min(bw, nx - i0)
                hc = hn[c, i0:i0 + n]
                dc = hd[c, i0:i0 + n]
                g0 = g[r]
                g20 = g2[r]
                for i in range(n):
                    acc_n[i] = g0 * hc[i]
                    acc_d[i] = g20 * dc[i]
                for k in range(1, r + 1):
                    gk = g[r + k]
                    g2k = g2[r + k]
                    lo = jo - k
                    hi = jo + k
                    if lo >= 0 and hi < ny:
                        a1 = hn[lo % nr, i0:i0 + n]
                        a2 = hn[hi % nr, i0:i0 + n]
                        d1 = hd[lo % nr, i0:i0 + n]
                        d2 = hd[hi % nr, i0:i0 + n]
                        for i in range(n):
                            acc_n[i] += gk * (a1[i] + a2[i])
                            acc_d[i] += g2k * (d1[i] + d2[i])
                    elif lo >= 0 or hi < ny:
                        jj = lo if lo >= 0 else hi
                        a1 = hn[jj % nr, i0:i0 + n]
                        d1 = hd[jj % nr, i0:i0 + n]
                        for i in range(n):
                            acc_n[i] += gk * a1[i]
                            acc_d[i] += g2k * d1[i]
                flagged = False
                for k in range(-r, r + 1):
                    jj = jo + k
                    if 0 <= jj < ny and bflag[jj % nr, b]:
                        flagged = True
                        break
                cx = covx[i0:i0 + n]
                if flagged:
                    for i in range(n):
                        acc_c[i] = 0.0
                    for k in range(-r, r + 1):
                        jj = jo + k
                        if 0 <= jj < ny and bflag[jj % nr, b]:
                            gk = g2[k + r]
                            hbr = hb[jj % nr, i0:i0 + n]
                            for i in range(n):
                                acc_c[i] += gk * hbr[i]
                    for i in range(n):
                        acc_c[i] = cy * cx[i] - acc_c[i] * inv_kk2
                else:
                    for i in range(n):
                        acc_c[i] = cy * cx[i]
                so = srow[i0:i0 + n]
                for i in range(n):
                    d = acc_d[i]
                    ok = (d > 0) & (acc_c[i] >= min_cov)
                    so[i] = acc_n[i] / np.sqrt(d) if ok else zero
                if want_amp:
                    ao = amp[jo, i0:i0 + n]
                    for i in range(n):
                        d = acc_d[i]
                        ok = (d > 0) & (acc_c[i] >= min_cov)
                        ao[i] = acc_n[i] / d if ok else zero

    @numba.njit(**_JIT)
    def _amplitude_at_nb(img, var, mask, use_mask, bits, g, g2, ys, xs):  # pragma: no cover
        """Matched-filter amplitude ``(g * W I) / (g^2 * W)`` at single pixels."""
        ny, nx = img.shape
        r = (g.size - 1) // 2
        out = np.zeros(ys.size)
        for q in range(ys.size):
            num = 0.0
            den = 0.0
            for dy in range(-r, r + 1):
                j = ys[q] + dy
                if j < 0 or j >= ny:
                    continue
                for dx in range(-r, r + 1):
                    i = xs[q] + dx
                    if i < 0 or i >= nx:
                        continue
                    v = var[j, i]
                    x = img[j, i]
                    w = np.float32(1.0) / v
                    ok = (v > 0) & np.isfinite(w) & np.isfinite(x)
                    if use_mask:
                        ok = ok & ((mask[j, i] & bits) == 0)
                    if ok:
                        num += g[dy + r] * g[dx + r] * (float(w) * float(x))
                        den += g2[dy + r] * g2[dx + r] * float(w)
            out[q] = num / den if den > 0 else 0.0
        return out

    @numba.njit(**_JIT)
    def _next_above(row, i, fthr):  # pragma: no cover - compiled
        """First index >= ``i`` where ``row > fthr`` (``row.size`` if none)."""
        n = row.size
        # skip blocks of 64 pixels with a branch-free (vectorised) test
        while i + 64 <= n:
            hit = False
            for t in range(i, i + 64):
                hit |= row[t] > fthr
            if hit:
                break
            i += 64
        while i < n and not row[i] > fthr:
            i += 1
        return i

    @numba.njit(**_JIT)
    def _is_peak(sig, j, i):  # pragma: no cover - compiled
        """3x3 local maximum test; ties go to the first pixel in raster order."""
        ny, nx = sig.shape
        v = sig[j, i]
        for dy in range(-1, 2):
            jj = j + dy
            if jj < 0 or jj >= ny:
                continue
            for dx in range(-1, 2):
                ii = i + dx
                if (dy == 0 and dx == 0) or ii < 0 or ii >= nx:
                    continue
                nv = sig[jj, ii]
                if dy < 0 or (dy == 0 and dx < 0):
                    if not v > nv:
                        return False
                elif not v >= nv:
                    return False
        return True

    @numba.njit(**_JIT)
    def _run_end(sig, j, i, thr, fthr, pk_x, npk):  # pragma: no cover - compiled
        """End (exclusive) of the run above ``fthr`` starting at ``(j, i)``; the columns of
        its peaks above ``thr`` are written to ``pk_x[npk:]`` (the count is returned; the
        caller guarantees room for a whole row)."""
        row = sig[j]
        n = row.size
        while i < n and row[i] > fthr:
            if row[i] > thr and _is_peak(sig, j, i):
                pk_x[npk] = i
                npk += 1
            i += 1
        return i, npk

    @numba.njit(**_JIT)
    def _scan_nb(sig, thr, fthr):  # pragma: no cover - compiled
        """Runs of pixels above ``fthr`` (row, first, last) and the 3x3 local maxima above
        ``thr`` (ties go to the first in raster order), both in raster order."""
        ny, nx = sig.shape
        run_row = np.empty(4096, np.int32)
        run_s = np.empty(4096, np.int32)
        run_e = np.empty(4096, np.int32)
        pk_y = np.empty(1024, np.int32)
        pk_x = np.empty(1024, np.int32)
        rowpk = np.empty(nx, np.int32)
        rs = np.empty(nx, np.int32)
        re = np.empty(nx, np.int32)
        nrun = 0
        npk = 0
        for j in range(ny):
            row = sig[j]
            i = _next_above(row, 0, fthr)
            nrow = 0
            nr = 0
            while i < nx:
                rs[nr] = i
                i, nrow = _run_end(sig, j, i, thr, fthr, rowpk, nrow)
                re[nr] = i - 1
                nr += 1
                i = _next_above(row, i, fthr)
            if nr:
                while nrun + nr > run_row.size:
                    run_row = _grow_i4(run_row, nrun)
                    run_s = _grow_i4(run_s, nrun)
                    run_e = _grow_i4(run_e, nrun)
                run_row[nrun:nrun + nr] = j
                run_s[nrun:nrun + nr] = rs[:nr]
                run_e[nrun:nrun + nr] = re[:nr]
                nrun += nr
            if nrow:
                while npk + nrow > pk_y.size:
                    pk_y = _grow_i4(pk_y, npk)
                    pk_x = _grow_i4(pk_x, npk)
                pk_y[npk:npk + nrow] = j
                pk_x[npk:npk + nrow] = rowpk[:nrow]
                npk += nrow
        return (pk_y[:npk].copy(), pk_x[:npk].copy(), run_row[:nrun].copy(),
                run_s[:nrun].copy(), run_e[:nrun].copy())

    @numba.njit(**_JIT)
    def _find(parent, a):  # pragma: no cover - compiled
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    @numba.njit(**_JIT)
    def _footprints_nb(run_row, run_s, run_e, ny, nx, grow):  # pragma: no cover - compiled
        """Grow the runs above threshold by ``grow`` pixels (L1 metric) and label the grown
        runs 8-connected, numbered in raster order of their first pixel (as
        ``scipy.ndimage.label``).

        Returns the grown runs ``(row, first, last, label)`` in raster order, their row
        pointers, the number of labels, per label (index 1..n) the pixel count, the count
        of pixels above threshold and the bounding box, and the runs of each label.
        """
        nrun = run_row.size
        rptr = np.zeros(ny + 1, np.int64)
        for q in range(nrun):
            rptr[run_row[q] + 1] += 1
        for j in range(ny):
            rptr[j + 1] += rptr[j]
        # a row has at most as many grown runs as there are runs in its 2 grow + 1 rows
        cap = (2 * grow + 1) * nrun + 1
        g_row = np.empty(cap, np.int32)
        g_s = np.empty(cap, np.int32)
        g_e = np.empty(cap, np.int32)
        ng = 0
        gptr = np.zeros(ny + 1, np.int64)
        head = np.empty(2 * grow + 1, np.int64)
        for j in range(ny):
            # the runs of rows j-grow..j+grow, each row already sorted by start and widened
            # by the same amount, merged by start (k-way) into the grown runs of row j
            for dy in range(-grow, grow + 1):
                jj = j + dy
                head[dy + grow] = rptr[jj] if 0 <= jj < ny else 0
            have = False
            s0 = 0
            e0 = 0
            while True:
                found = False
                best = 0
                bs = 0
                for dy in range(-grow, grow + 1):
                    jj = j + dy
                    if jj < 0 or jj >= ny or head[dy + grow] >= rptr[jj + 1]:
                        continue
                    st = max(run_s[head[dy + grow]] - (grow - abs(dy)), 0)
                    if not found or st < bs:
                        found = True
                        best = dy
                        bs = st
                if not found:
                    break
                q = head[best + grow]
                head[best + grow] += 1
                en = min(run_e[q] + (grow - abs(best)), nx - 1)
                if have and bs <= e0 + 1:
                    e0 = max(e0, en)
                    continue
                if have:
                    g_row[ng] = j
                    g_s[ng] = s0
                    g_e[ng] = e0
                    ng += 1
                have = True
                s0 = bs
                e0 = en
            if have:
                g_row[ng] = j
                g_s[ng] = s0
                g_e[ng] = e0
                ng += 1
            gptr[j + 1] = ng
        parent = np.arange(ng)
        for j in range(1, ny):
            p = gptr[j - 1]
            p1 = gptr[j]
            q = gptr[j]
            q1 = gptr[j + 1]
            while p < p1 and q < q1:
                if g_e[p] + 1 < g_s[q]:
                    p += 1
                elif g_e[q] + 1 < g_s[p]:
                    q += 1
                else:
                    a = _find(parent, p)
                    b = _find(parent, q)
                    if a != b:
                        if a < b:
                            parent[b] = a
                        else:
                            parent[a] = b
                    if g_e[p] < g_e[q]:
                        p += 1
                    else:
                        q += 1
        lab_of_root = np.zeros(ng, np.int32)
        g_lab = np.empty(ng, np.int32)
        nlab = 0
        for t in range(ng):
            root = _find(parent, t)
            if lab_of_root[root] == 0:
                nlab += 1
                lab_of_root[root] = nlab
            g_lab[t] = lab_of_root[root]
        npix = np.zeros(nlab + 1, np.int64)
        nabove = np.zeros(nlab + 1, np.int64)
        bbox = np.empty((nlab + 1, 4), np.int64)     # y0, y1, x0, x1 (inclusive)
        bbox[:, 0] = ny
        bbox[:, 1] = -1
        bbox[:, 2] = nx
        bbox[:, 3] = -1
        lptr = np.zeros(nlab + 2, np.int64)
        for t in range(ng):
            lab = g_lab[t]
            npix[lab] += g_e[t] - g_s[t] + 1
            bbox[lab, 0] = min(bbox[lab, 0], g_row[t])
            bbox[lab, 1] = max(bbox[lab, 1], g_row[t])
            bbox[lab, 2] = min(bbox[lab, 2], g_s[t])
            bbox[lab, 3] = max(bbox[lab, 3], g_e[t])
            lptr[lab + 1] += 1
        for lab in range(nlab + 1):
            lptr[lab + 1] += lptr[lab]
        fill = lptr[:-1].copy()
        lruns = np.empty(ng, np.int64)
        for t in range(ng):
            lab = g_lab[t]
            lruns[fill[lab]] = t
            fill[lab] += 1
        # pixels above threshold per label: every run lies inside one grown run of its row
        for j in range(ny):
            p = gptr[j]
            for q in range(rptr[j], rptr[j + 1]):
                while g_e[p] < run_s[q]:
                    p += 1
                nabove[g_lab[p]] += run_e[q] - run_s[q] + 1
        return g_row[:ng], g_s[:ng], g_e[:ng], g_lab, gptr, nlab, npix, nabove, bbox, lptr, lruns

    @numba.njit(**_JIT)
    def _label_at_nb(gptr, g_s, g_e, g_lab, ys, xs):  # pragma: no cover - compiled
        """Footprint label (0 = none) of pixels ``(xs, ys)``."""
        out = np.zeros(ys.size, np.int32)
        for q in range(ys.size):
            a = gptr[ys[q]]
            b = gptr[ys[q] + 1]
            while a < b:                      # last run starting at or before xs[q]
                m = (a + b) // 2
                if g_s[m] <= xs[q]:
                    a = m + 1
                else:
                    b = m
            t = a - 1
            if t >= gptr[ys[q]] and g_e[t] >= xs[q]:
                out[q] = g_lab[t]
        return out

    @numba.njit(**_JIT)
    def _paint_nb(g_row, g_s, g_e, g_lab, out):  # pragma: no cover - compiled
        for t in range(g_row.size):
            out[g_row[t], g_s[t]:g_e[t] + 1] = g_lab[t]

    @numba.njit(**_JIT)
    def _cull_nb(sig, g_row, g_s, g_e, lptr, lruns, bbox, fids, mstart, mend, members, py, px,
                 pv, nsigma, padding, cull_min):  # pragma: no cover - compiled
        """Saddle test of the peaks of every footprint in ``fids`` (see the module notes);
        ``members[mstart[f]:mend[f]]`` are the peaks of ``fids[f]``, brightest first (ties
        in raster order).
        Returns the surviving-peak flags."""
        keep = np.ones(py.size, np.bool_)
        for f in range(fids.size):
            fid = fids[f]
            y0 = bbox[fid, 0]
            x0 = bbox[fid, 2]
            h = bbox[fid, 1] - y0 + 1
            w = bbox[fid, 3] - x0 + 1
            infp = np.zeros((h, w), np.bool_)
            for q in range(lptr[fid], lptr[fid + 1]):
                t = lruns[q]
                infp[g_row[t] - y0, g_s[t] - x0:g_e[t] - x0 + 1] = True
            mem = members[mstart[f]:mend[f]]
            kept_at = np.zeros((h, w), np.bool_)
            visit = np.zeros((h, w), np.int32)
            queue = np.empty(h * w, np.int64)
            first = mem[0]
            kept_at[py[first] - y0, px[first] - x0] = True
            for q in range(mem.size):
                keep[mem[q]] = False
            keep[first] = True
            for o in range(1, mem.size):
                i = mem[o]
                nu = float(pv[i])
                level = nu - nsigma * np.hypot(1.0, padding * nu)
                level = max(level, cull_min)
                level = min(level, nu - 1e-6)
                sy = py[i] - y0
                sx = px[i] - x0
                if not (infp[sy, sx] and sig[py[i], px[i]] >= level):
                    keep[i] = True
                    kept_at[sy, sx] = True
                    continue
                stamp = o + 1
                visit[sy, sx] = stamp
                queue[0] = sy * w + sx
                head = 0
                tail = 1
                reached = False
                while head < tail and not reached:
                    cur = queue[head]
                    head += 1
                    cyy = cur // w
                    cxx = cur - cyy * w
                    for dy in range(-1, 2):
                        yy = cyy + dy
                        if yy < 0 or yy >= h:
                            continue
                        for dx in range(-1, 2):
                            xx = cxx + dx
                            if xx < 0 or xx >= w or visit[yy, xx] == stamp:
                                continue
                            if not infp[yy, xx] or not sig[yy + y0, xx + x0] >= level:
                                continue
                            if kept_at[yy, xx]:
                                reached = True
                                break
                            visit[yy, xx] = stamp
                            queue[tail] = yy * w + xx
                            tail += 1
                        if reached:
                            break
                if not reached:
                    keep[i] = True
                    kept_at[sy, sx] = True
        return keep


def _filter_kernels(fwhm: float, truncate: float) -> tuple[np.ndarray, np.ndarray]:
    """Unnormalised matched-filter kernels ``g`` and ``g^2`` (1-D, float32, same length).

    The half-widths are those of ``scipy.ndimage.gaussian_filter`` for the PSF sigma and
    for ``sigma / sqrt(2)`` with ``truncate * sqrt(2)`` (the reference path).
    """
    sigma = fwhm / FWHM_PER_SIGMA
    s2 = sigma / np.sqrt(2.0)
    r = max(int(truncate * sigma + 0.5), int(truncate * np.sqrt(2.0) * s2 + 0.5))
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * t * t / sigma ** 2)
    g2 = np.exp(-0.5 * t * t / s2 ** 2)
    r1 = int(truncate * sigma + 0.5)
    r2 = int(truncate * np.sqrt(2.0) * s2 + 0.5)
    g[np.abs(t) > r1] = 0.0
    g2[np.abs(t) > r2] = 0.0
    return g.astype(np.float32), g2.astype(np.float32)


def _kernel_inputs(image, variance, mask, mask_bits):
    """Contiguous float32 image and variance, and a mask with the bits to test."""
    img = np.ascontiguousarray(image, dtype=np.float32)
    var = np.ascontiguousarray(variance, dtype=np.float32)
    if mask is None:
        return img, var, np.zeros((1, 1), np.uint16), False, np.uint16(0)
    mask = np.asarray(mask)
    if mask.dtype == np.uint16:
        return img, var, np.ascontiguousarray(mask), True, np.uint16(mask_bits & 0xFFFF)
    bad = ((mask & mask_bits) != 0).astype(np.uint16)
    return img, var, bad, True, np.uint16(1)


def _significance_nb(image, variance, mask, fwhm, mask_bits, truncate, min_coverage,
                     want_amp):
    """Significance and (if ``want_amp``) amplitude images with the compiled kernel."""
    img, var, m, use_mask, bits = _kernel_inputs(image, variance, mask, mask_bits)
    g, g2 = _filter_kernels(fwhm, truncate)
    sig = np.empty(img.shape, np.float32)
    amp = np.empty(img.shape if want_amp else (1, 1), np.float32)
    _matched_filter_nb(img, var, m, use_mask, bits, g, g2, np.float32(min_coverage), sig, amp,
                       bool(want_amp))
    return sig, (amp if want_amp else None)


def significance_image(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None, *,
                       fwhm: float, mask_bits: int = maskbits.BAD, truncate: float = 4.0,
                       min_coverage: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """PSF-matched-filter significance and amplitude images.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Sky-subtracted image (ADU).
    variance : ndarray, shape (ny, nx)
        Pixel variances (ADU^2); non-positive or non-finite values mark unusable pixels.
    mask : ndarray of uint16 or None
        Bit mask; pixels with ``mask_bits`` set are unusable.
    fwhm : float
        FWHM of the Gaussian matched filter (pixels).
    mask_bits : int
        Mask bits that make a pixel unusable.
    truncate : float
        Kernel half-width in sigmas.
    min_coverage : float
        Minimum fraction of the kernel weight on usable pixels; below it the significance
        is 0.

    Returns
    -------
    significance : ndarray, shape (ny, nx), float32
        Signal-to-noise ratio of a point source centred on each pixel.
    amplitude : ndarray, shape (ny, nx), float32
        Maximum-likelihood PSF peak amplitude at each pixel (ADU).
    """
    image, variance, mask = _check(image, variance, mask, "significance_image")
    if not fwhm > 0:
        raise ValueError(f"significance_image: fwhm must be positive, got {fwhm}")
    if _HAVE_NUMBA:
        return _significance_nb(image, variance, mask, fwhm, mask_bits, truncate, min_coverage,
                                True)
    num, den = _matched_filter(image, variance, mask, fwhm, mask_bits, truncate, min_coverage)
    with np.errstate(invalid="ignore", divide="ignore"):
        sig = np.where(den > 0, num / np.sqrt(den), np.float32(0.0)).astype(np.float32)
        amp = np.where(den > 0, num / den, np.float32(0.0)).astype(np.float32)
    return sig, amp


def _local_maxima(sig: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixels above ``threshold`` that are 3x3 local maxima (ties go to the first in raster
    order)."""
    ny, nx = sig.shape
    yy, xx = np.nonzero(sig > threshold)
    if yy.size == 0:
        return yy, xx
    v = sig[yy, xx]
    keep = np.ones(yy.size, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            y2 = yy + dy
            x2 = xx + dx
            inside = (y2 >= 0) & (y2 < ny) & (x2 >= 0) & (x2 < nx)
            nv = np.full(yy.size, -np.inf, dtype=np.float32)
            nv[inside] = sig[y2[inside], x2[inside]]
            before = (dy < 0) or (dy == 0 and dx < 0)
            keep &= (v > nv) if before else (v >= nv)
    return yy[keep], xx[keep]


def _subpixel(sig: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parabolic sub-pixel refinement of peaks along x and y."""
    ny, nx = sig.shape
    c = sig[yy, xx].astype(np.float64)

    def axis_offset(a_m, a_p):
        den = a_m - 2.0 * c + a_p
        with np.errstate(invalid="ignore", divide="ignore"):
            d = np.where(den < 0, 0.5 * (a_m - a_p) / den, 0.0)
        return np.clip(np.nan_to_num(d), -0.5, 0.5)

    xm = sig[yy, np.maximum(xx - 1, 0)].astype(np.float64)
    xp = sig[yy, np.minimum(xx + 1, nx - 1)].astype(np.float64)
    ym = sig[np.maximum(yy - 1, 0), xx].astype(np.float64)
    yp = sig[np.minimum(yy + 1, ny - 1), xx].astype(np.float64)
    ox = np.where((xx > 0) & (xx < nx - 1), axis_offset(xm, xp), 0.0)
    oy = np.where((yy > 0) & (yy < ny - 1), axis_offset(ym, yp), 0.0)
    return xx + ox, yy + oy


def _cull_footprint(sig_sub: np.ndarray, in_fp: np.ndarray, py: np.ndarray, px: np.ndarray,
                    pv: np.ndarray, *, nsigma: float, padding: float, cull_min: float
                    ) -> np.ndarray:
    """Saddle test for the peaks of one footprint; returns the surviving-peak flags."""
    order = np.argsort(-pv, kind="stable")
    keep = np.zeros(pv.size, dtype=bool)
    keep[order[0]] = True
    kept = [order[0]]
    structure = np.ones((3, 3), dtype=bool)
    for i in order[1:]:
        nu = float(pv[i])
        level = nu - nsigma * np.hypot(1.0, padding * nu)
        level = max(level, cull_min)
        level = min(level, nu - 1e-6)
        region = in_fp & (sig_sub >= level)
        lab, _ = ndi.label(region, structure=structure)
        mine = lab[py[i], px[i]]
        if mine == 0:
            keep[i] = True
            kept.append(i)
            continue
        kk = np.asarray(kept)
        if np.any(lab[py[kk], px[kk]] == mine):
            continue
        keep[i] = True
        kept.append(i)
    return keep


def _peaks_footprints_scipy(image, variance, mask, *, fwhm, threshold, footprint_threshold,
                            footprint_grow, footprint_npix_min, cull_nsigma, cull_padding,
                            cull_min, min_coverage, mask_bits, return_footprints):
    """Peaks, footprints and deblending with scipy.ndimage (the path without numba).

    Returns ``(sig, py, px, pfp, pv, amp, npix, labels)``: the significance image, the
    surviving peaks (pixel, footprint label, significance, matched-filter amplitude), the
    pixel count of every label (index 0..nlab) and the label image (None unless
    ``return_footprints``).
    """
    num, den = _matched_filter(image, variance, mask, fwhm, mask_bits, 4.0, min_coverage)
    with np.errstate(invalid="ignore", divide="ignore"):
        sig = np.sqrt(den)
        np.divide(num, sig, out=sig, where=den > 0)
        sig[~(den > 0)] = 0.0
    py, px = _local_maxima(sig, threshold)
    # footprints: connected pixels above footprint_threshold, grown, labelled
    above = sig > footprint_threshold
    structure = np.ones((3, 3), dtype=bool)
    if footprint_grow > 0:
        # grown by the radius in the L1 metric (a diamond), by iterated 4-connected dilation
        grown = ndi.binary_dilation(above, structure=ndi.generate_binary_structure(2, 1),
                                    iterations=int(footprint_grow))
    else:
        grown = above
    labels, nlab = ndi.label(grown, structure=structure)
    if py.size and footprint_npix_min > 1:
        # drop peaks whose footprint has fewer than footprint_npix_min pixels above threshold
        plab = labels[py, px]
        ulab = np.unique(plab[plab > 0])
        if ulab.size:
            n_above = np.bincount(labels[above], minlength=nlab + 1)
            small = np.zeros(nlab + 1, dtype=bool)
            small[ulab[n_above[ulab] < footprint_npix_min]] = True
            okp = ~small[plab]
            py, px = py[okp], px[okp]
    pfp = labels[py, px] if py.size else np.zeros(0, dtype=np.int32)
    inside = pfp > 0
    py, px, pfp = py[inside], px[inside], pfp[inside]
    pv = sig[py, px]
    # deblending: cull peaks without a deep enough saddle to a brighter one
    keep = np.ones(py.size, dtype=bool)
    if py.size:
        counts = np.bincount(pfp, minlength=nlab + 1)
        multi = np.flatnonzero(counts > 1)
        if multi.size:
            slices = ndi.find_objects(labels)
            order = np.argsort(pfp, kind="stable")
            bounds = np.searchsorted(pfp[order], np.arange(nlab + 2))
            for fid in multi:
                members = order[bounds[fid]:bounds[fid + 1]]
                sl = slices[fid - 1]
                sub_lab = labels[sl] == fid
                sub_sig = sig[sl]
                k = _cull_footprint(sub_sig, sub_lab, py[members] - sl[0].start,
                                    px[members] - sl[1].start, pv[members],
                                    nsigma=cull_nsigma, padding=cull_padding,
                                    cull_min=cull_min)
                keep[members] = k
    py, px, pfp, pv = py[keep], px[keep], pfp[keep], pv[keep]
    with np.errstate(invalid="ignore", divide="ignore"):
        amp = np.where(den[py, px] > 0, num[py, px] / den[py, px], 0.0)
    npix = np.bincount(labels[grown], minlength=nlab + 1)
    return sig, py, px, pfp, pv, amp, npix, (labels.astype(np.int32) if return_footprints
                                             else None)


def _peaks_footprints_nb(image, variance, mask, *, fwhm, threshold, footprint_threshold,
                         footprint_grow, footprint_npix_min, cull_nsigma, cull_padding,
                         cull_min, min_coverage, mask_bits, return_footprints):
    """Peaks, footprints and deblending with the compiled kernels (same returns as
    :func:`_peaks_footprints_scipy`)."""
    ny, nx = image.shape
    img, var, m, use_mask, bits = _kernel_inputs(image, variance, mask, mask_bits)
    g, g2 = _filter_kernels(fwhm, 4.0)
    sig = np.empty(img.shape, np.float32)
    _matched_filter_nb(img, var, m, use_mask, bits, g, g2, np.float32(min_coverage), sig,
                       np.empty((1, 1), np.float32), False)
    py, px, run_row, run_s, run_e = _scan_nb(sig, np.float32(threshold),
                                             np.float32(footprint_threshold))
    (g_row, g_s, g_e, g_lab, gptr, nlab, npix, nabove, bbox, lptr,
     lruns) = _footprints_nb(run_row, run_s, run_e, ny, nx, int(max(footprint_grow, 0)))
    plab = _label_at_nb(gptr, g_s, g_e, g_lab, py, px)
    okp = plab > 0
    if footprint_npix_min > 1:
        # drop peaks whose footprint has fewer than footprint_npix_min pixels above threshold
        okp &= nabove[plab] >= footprint_npix_min
    py, px, pfp = py[okp], px[okp], plab[okp]
    pv = sig[py, px]
    keep = np.ones(py.size, dtype=bool)
    if py.size:
        counts = np.bincount(pfp, minlength=nlab + 1)
        multi = np.flatnonzero(counts > 1)
        if multi.size:
            # by footprint, brightest first, ties in raster order (as the scipy path)
            order = np.lexsort((-pv.astype(np.float64), pfp))
            bounds = np.searchsorted(pfp[order], np.arange(nlab + 2))
            keep = _cull_nb(sig, g_row, g_s, g_e, lptr, lruns, bbox, multi.astype(np.int64),
                            bounds[multi].astype(np.int64), bounds[multi + 1].astype(np.int64),
                            order.astype(np.int64), py, px, pv, float(cull_nsigma),
                            float(cull_padding), float(cull_min))
    py, px, pfp, pv = py[keep], px[keep], pfp[keep], pv[keep]
    amp = _amplitude_at_nb(img, var, m, use_mask, bits, g, g2, py.astype(np.int64),
                           px.astype(np.int64))
    labels = None
    if return_footprints:
        labels = np.zeros((ny, nx), np.int32)
        _paint_nb(g_row, g_s, g_e, g_lab, labels)
    return sig, py.astype(np.int64), px.astype(np.int64), pfp, pv, amp, npix, labels


def detect_sources(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None = None, *,
                   fwhm: float = 4.5, threshold: float = 5.0,
                   footprint_threshold: float = 3.0, footprint_grow: int = 3,
                   footprint_npix_min: int = 5, cull_nsigma: float = 4.0,
                   cull_padding: float = 0.01, cull_min: float = 1.0,
                   edge_margin: float | None = None, min_coverage: float = 0.5,
                   mask_bits: int = maskbits.BAD,
                   saturation_bits: int = maskbits.SAT | maskbits.BLEED,
                   max_peaks: int = 0, return_footprints: bool = False):
    """Detect sources in a sky-subtracted image.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Sky-subtracted image (ADU).
    variance : ndarray, shape (ny, nx)
        Pixel variances (ADU^2).
    mask : ndarray of uint16, optional
        Bit mask; pixels with ``mask_bits`` set are not used.
    fwhm : float
        FWHM of the PSF (pixels) for the matched filter; 4.5 pixels (1.16 arcsec) by
        default, refine with :func:`estimate_fwhm`.
    threshold : float
        Peak significance threshold (sigma), 5.
    footprint_threshold : float
        Significance above which pixels belong to footprints (sigma); must not exceed
        ``threshold``.
    footprint_grow : int
        Footprints are grown by this radius (pixels) before being labelled.
    footprint_npix_min : int
        Fewest footprint pixels above ``footprint_threshold`` for its peaks to be kept.
    cull_nsigma, cull_padding, cull_min : float
        Saddle criterion of the deblending (see the module notes).
    edge_margin : float, optional
        Peaks closer than this to the image border are flagged ``edge``; ``fwhm`` by
        default.
    min_coverage : float
        Minimum fraction of the filter kernel on usable pixels for a pixel to have a
        significance (``PEAKS_MIN_GAUSS``, 0.5).
    mask_bits : int
        Mask bits that make a pixel unusable.
    saturation_bits : int
        Mask bits that flag a peak ``saturated`` when set within 1 pixel of it.
    max_peaks : int
        If positive, keep only the most significant ``max_peaks`` detections.
    return_footprints : bool
        Also return the footprint label image.

    Returns
    -------
    sources : ndarray of DETECTION_DTYPE, shape (n,)
        Detections sorted by decreasing significance, ``id`` 0..n-1.
    footprints : ndarray of int32, shape (ny, nx)
        Only if ``return_footprints``: footprint labels (0 = none) matching
        ``sources["footprint_id"]``.
    """
    image, variance, mask = _check(image, variance, mask, "detect_sources")
    if not threshold > 0:
        raise ValueError(f"detect_sources: threshold must be positive, got {threshold}")
    if footprint_threshold > threshold:
        raise ValueError(f"detect_sources: footprint_threshold {footprint_threshold} exceeds "
                         f"threshold {threshold}")
    if edge_margin is None:
        edge_margin = fwhm
    ny, nx = image.shape
    if not fwhm > 0:
        raise ValueError(f"detect_sources: fwhm must be positive, got {fwhm}")
    kw = dict(fwhm=fwhm, threshold=threshold, footprint_threshold=footprint_threshold,
              footprint_grow=footprint_grow, footprint_npix_min=footprint_npix_min,
              cull_nsigma=cull_nsigma, cull_padding=cull_padding, cull_min=cull_min,
              min_coverage=min_coverage, mask_bits=mask_bits,
              return_footprints=return_footprints)
    backend = _peaks_footprints_nb if _HAVE_NUMBA else _peaks_footprints_scipy
    sig, py, px, pfp, pv, amp, npix, labels = backend(image, variance, mask, **kw)
    order = np.argsort(-pv, kind="stable")
    if max_peaks > 0:
        order = order[:max_peaks]
    py, px, pfp, pv, amp = py[order], px[order], pfp[order], pv[order], amp[order]
    n = py.size
    out = np.zeros(n, dtype=DETECTION_DTYPE)
    out["id"] = np.arange(n)
    out["x_peak"] = px
    out["y_peak"] = py
    xs, ys = _subpixel(sig, py, px)
    out["x"] = xs
    out["y"] = ys
    out["significance"] = pv
    out["flux_peak"] = image[py, px]
    out["amp_peak"] = amp
    out["footprint_id"] = pfp
    if n:
        out["footprint_npix"] = npix[pfp]
        npk = np.bincount(pfp, minlength=npix.size)
        out["n_peaks"] = npk[pfp]
        out["blend"] = npk[pfp] > 1
        _, first_idx = np.unique(pfp, return_index=True)   # sorted by significance already
        prim = np.zeros(n, dtype=bool)
        prim[first_idx] = True
        out["blend_primary"] = prim & out["blend"]
    out["edge"] = ((px < edge_margin) | (py < edge_margin) | (px > nx - 1 - edge_margin)
                   | (py > ny - 1 - edge_margin))
    if mask is not None and n:
        out["masked"] = (mask[py, px] & mask_bits) != 0
        sat = np.zeros(n, dtype=bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy = np.clip(py + dy, 0, ny - 1)
                xx = np.clip(px + dx, 0, nx - 1)
                sat |= (mask[yy, xx] & saturation_bits) != 0
        out["saturated"] = sat
    if return_footprints:
        return out, labels
    return out


@dataclass(frozen=True)
class FWHMEstimate:
    """PSF size measured from bright isolated stars.

    Attributes
    ----------
    fwhm : float
        Median geometric-mean FWHM ``2.3548 (det C)^(1/4)`` (pixels).
    fwhm_major, fwhm_minor : float
        Median FWHM along the major and minor axes (pixels).
    n_stars : int
        Number of stars used.
    """

    fwhm: float
    fwhm_major: float
    fwhm_minor: float
    n_stars: int


def estimate_fwhm(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None,
                  sources: np.ndarray, *, fwhm_guess: float = 4.5,
                  min_significance: float = 20.0, saturation: float | None = None,
                  isolation: float = 3.0, max_stars: int = 500, n_iter: int = 4,
                  mask_bits: int = maskbits.BAD) -> FWHMEstimate:
    """First estimate of the PSF FWHM from bright, unsaturated, isolated peaks.

    The stars are the detections that are not blended, masked, saturated or near the edge,
    have ``significance >= min_significance`` (``PSF_SN_LIM`` 20) and a peak below
    ``saturation``, and have no other detection within ``isolation * fwhm_guess``. For each
    star the Gaussian-windowed second moments are measured and the window deconvolved
    (adaptive moments: the window is set to the deconvolved size and the measurement
    repeated ``n_iter`` times). The FWHM is that of the pixelated image of the star.

    Parameters
    ----------
    image, variance, mask
        Sky-subtracted image (ADU), variance (ADU^2) and bit mask.
    sources : ndarray of DETECTION_DTYPE
        Output of :func:`detect_sources`.
    fwhm_guess : float
        Starting FWHM (pixels).
    min_significance : float
        Minimum detection significance of a star.
    saturation : float, optional
        Peak value (ADU) above which a star is not used.
    isolation : float
        Isolation radius in units of ``fwhm_guess``.
    max_stars : int
        Use at most this many of the most significant candidates (``PSF_MAX_NSTARS``).
    n_iter : int
        Window iterations.
    mask_bits : int
        Mask bits that exclude a pixel.

    Returns
    -------
    FWHMEstimate
        NaN values and ``n_stars = 0`` if no star qualifies.
    """
    image, variance, mask = _check(image, variance, mask, "estimate_fwhm")
    s = np.asarray(sources)
    if s.dtype.names is None or "significance" not in s.dtype.names:
        raise ValueError("estimate_fwhm: sources must be the structured array of "
                         "detect_sources")
    sel = (~s["blend"]) & (~s["edge"]) & (~s["saturated"]) & (~s["masked"])
    sel &= s["significance"] >= min_significance
    if saturation is not None:
        sel &= s["flux_peak"] < saturation
    if s.size > 1:
        pts = np.column_stack([s["x"], s["y"]])
        cnt = cKDTree(pts).query_ball_point(pts, isolation * fwhm_guess, return_length=True)
        sel &= cnt <= 1
    idx = np.flatnonzero(sel)
    idx = idx[np.argsort(-s["significance"][idx], kind="stable")][:max_stars]
    nan = float("nan")
    if idx.size == 0:
        return FWHMEstimate(nan, nan, nan, 0)
    x = s["x"][idx].astype(np.float64)
    y = s["y"][idx].astype(np.float64)
    w = np.full(idx.size, fwhm_guess / FWHM_PER_SIGMA)
    cxx = cxy = cyy = np.full(idx.size, np.nan)
    for _ in range(max(n_iter, 1)):
        # one window per batch: use the median so the batch shares a window
        wsig = float(np.nanmedian(w))
        m = centroid_moments(image, variance, mask, x, y, sigma=wsig, mask_bits=mask_bits)
        x, y = m["X_MOMENTS"], m["Y_MOMENTS"]
        cxx, cxy, cyy = deconvolve_window(m["MOMENTS_XX"], m["MOMENTS_XY"], m["MOMENTS_YY"],
                                          wsig)
        det = cxx * cyy - cxy * cxy
        w = np.where(det > 0, det ** 0.25, np.nan)
        if not np.any(np.isfinite(w)):
            return FWHMEstimate(nan, nan, nan, 0)
    det = cxx * cyy - cxy * cxy
    ok = np.isfinite(det) & (det > 0)
    if not np.any(ok):
        return FWHMEstimate(nan, nan, nan, 0)
    tr = 0.5 * (cxx + cyy)
    dd = np.sqrt(np.maximum(0.25 * (cxx - cyy) ** 2 + cxy ** 2, 0.0))
    smaj = np.sqrt(tr + dd)
    smin = np.sqrt(np.maximum(tr - dd, 0.0))
    sgeo = det ** 0.25
    # clip outliers (galaxies, residual blends) at 3 robust sigma around the median
    v = sgeo[ok]
    med = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - med))
    good = ok.copy()
    if mad > 0:
        good[ok] = np.abs(v - med) < 3.0 * mad
    return FWHMEstimate(float(FWHM_PER_SIGMA * np.median(sgeo[good])),
                        float(FWHM_PER_SIGMA * np.median(smaj[good])),
                        float(FWHM_PER_SIGMA * np.median(smin[good])),
                        int(np.count_nonzero(good)))
