"""Single-image cosmic-ray detection: L.A.Cosmic (van Dokkum 2001, PASP 113, 1420).

Cosmic rays are sharper than the PSF: their edges are steeper than any star's.  L.A.Cosmic
measures that with a Laplacian of the image (2x block-replicated, Laplacian taken, negative
values clipped, binned back), normalised by the noise, ``S = L+ / (2 N)``; extended
structure is removed with ``S' = S - med5(S)``.  A pixel is a cosmic ray when ``S' > sigclip``
and when the sharpness is not explained by the local fine structure of the image (stars,
compact galaxies): ``S' / (F / N) > objlim`` with ``F = med3(I) - med7(med3(I))``.  The hits
are grown into their neighbours (``S' > sigclip``, then ``S' > sigfrac * sigclip``) and the
search is repeated (``niter`` times at most) with the pixels found so far excluded, which
uncovers the fainter parts of hits next to bright ones.  (L.A.Cosmic replaces the found
pixels by a local median before the next pass; excluding them as masked pixels has the same
purpose without inventing values.)

Implementation notes (this module's own, for speed on a 23.6-Mpix GPC1 chip):

* ``L+`` uses the closed form of the subsampled Laplacian: with ``d_l = x - x_left`` etc.,
  ``L+ = (max(d_l + d_u, 0) + max(d_l + d_d, 0) + max(d_r + d_u, 0) + max(d_r + d_d, 0)) / 4``;
  a masked neighbour contributes a zero difference, so gaps and saturated regions raise no
  false edges.
* The noise ``N`` comes from the variance image: the median of the variances of the four
  neighbours (L.A.Cosmic takes it from a median-filtered image), so that a hit's own Poisson
  noise does not hide it.
* ``S'`` and ``F`` are computed only at candidate pixels (``S > sigclip``; ``med5(S) >= 0``
  so ``S' <= S``) and at the neighbours examined by the growth steps.
"""

from __future__ import annotations

import warnings

import numpy as np

from ps1mpi.algorithms import maskbits

try:
    import numba

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    numba = None
    _HAVE_NUMBA = False

__all__ = ["find_cosmics", "find_cosmic_pixels", "sharpness"]

#: Mask bits whose pixels are neither examined nor used as neighbours.
COSMIC_BAD_BITS = (maskbits.DETECTOR | maskbits.DEAD_CELL | maskbits.SAT | maskbits.BLEED
                   | maskbits.GAP | maskbits.LOW | maskbits.CR)


# ---------------------------------------------------------------------------------------------
# S = L+ / (2 N)
# ---------------------------------------------------------------------------------------------

def _noise_var_numpy(var: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Noise variance of every pixel: the median of its usable 4-neighbours' variances (the
    pixel's own when it has none), so that a hit does not inflate its own noise."""
    ny, nx = var.shape
    vals = np.zeros((4, ny, nx), np.float32)
    oks = np.zeros((4, ny, nx), bool)
    vals[0, :, 1:], oks[0, :, 1:] = var[:, :-1], valid[:, :-1]
    vals[1, :, :-1], oks[1, :, :-1] = var[:, 1:], valid[:, 1:]
    vals[2, 1:, :], oks[2, 1:, :] = var[:-1, :], valid[:-1, :]
    vals[3, :-1, :], oks[3, :-1, :] = var[1:, :], valid[1:, :]
    return _median_of_usable(vals, oks, var)


def _median_of_usable(vals: np.ndarray, oks: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Median over axis 0 of up to 4 values where ``oks``: (s - min - max) / 2 for four,
    s - min - max for three, the mean for two, the value for one, ``own`` for none."""
    big = np.float32(3.4e38)
    n = oks.sum(axis=0)
    ssum = np.where(oks, vals, 0).sum(axis=0, dtype=np.float32)
    mn = np.where(oks, vals, big).min(axis=0)
    mx = np.where(oks, vals, -big).max(axis=0)
    out = np.where(n == 4, (ssum - mn - mx) * np.float32(0.5),
                   np.where(n == 3, ssum - mn - mx, ssum / np.maximum(n, 1)))
    return np.where(n == 0, own, out).astype(np.float32)


def _sharpness_numpy(img: np.ndarray, var: np.ndarray, valid: np.ndarray) -> np.ndarray:
    x = img.astype(np.float32, copy=False)
    ny, nx = x.shape
    dl = np.zeros_like(x)
    dr = np.zeros_like(x)
    du = np.zeros_like(x)
    dd = np.zeros_like(x)
    # left neighbour of (j, i) is (j, i-1); "up" is (j-1, i)
    np.multiply(x[:, 1:] - x[:, :-1], valid[:, :-1], out=dl[:, 1:])
    np.multiply(x[:, :-1] - x[:, 1:], valid[:, 1:], out=dr[:, :-1])
    np.multiply(x[1:, :] - x[:-1, :], valid[:-1, :], out=du[1:, :])
    np.multiply(x[:-1, :] - x[1:, :], valid[1:, :], out=dd[:-1, :])
    lap = np.maximum(dl + du, 0)
    lap += np.maximum(dl + dd, 0)
    lap += np.maximum(dr + du, 0)
    lap += np.maximum(dr + dd, 0)
    nv = _noise_var_numpy(var, valid)
    ok = valid & (nv > 0)
    s = np.zeros_like(x)
    np.divide(lap, 8.0 * np.sqrt(np.where(ok, nv, 1.0)), out=s, where=ok)
    return s


if _HAVE_NUMBA:
    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _nv4_nb(vc, v0, o0, v1, o1, v2, o2, v3, o3):  # pragma: no cover - compiled
        """Median of the usable neighbours' variances (``vc`` when none is usable)."""
        n = 0
        ssum = np.float32(0.0)
        mn = np.float32(3.4e38)
        mx = np.float32(-3.4e38)
        if o0:
            n += 1
            ssum += v0
            mn = min(mn, v0)
            mx = max(mx, v0)
        if o1:
            n += 1
            ssum += v1
            mn = min(mn, v1)
            mx = max(mx, v1)
        if o2:
            n += 1
            ssum += v2
            mn = min(mn, v2)
            mx = max(mx, v2)
        if o3:
            n += 1
            ssum += v3
            mn = min(mn, v3)
            mx = max(mx, v3)
        if n == 4:
            return (ssum - mn - mx) * np.float32(0.5)
        if n == 3:
            return ssum - mn - mx
        if n == 0:
            return vc
        return ssum / np.float32(n)

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _valid_row_nb(img, var, mask, use_mask, bad, y, out):  # pragma: no cover - compiled
        nx = img.shape[1]
        r = img[y]
        v = var[y]
        if use_mask:
            mk = mask[y]
            for x in range(nx):
                out[x] = np.uint8(np.isfinite(r[x]) & np.isfinite(v[x]) & ((mk[x] & bad) == 0))
        else:
            for x in range(nx):
                out[x] = np.uint8(np.isfinite(r[x]) & np.isfinite(v[x]))

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _sharpness_rows_nb(img, var, mask, use_mask, bad, sigclip, want_image, s_out
                           ):  # pragma: no cover - compiled
        """Full pass: S of every pixel (into ``s_out`` when ``want_image``) and the flat
        indices of the pixels with ``S > sigclip``.  Rows are processed with select-based
        (vectorisable) arithmetic; masked neighbours contribute zero differences."""
        ny, nx = img.shape
        buf = np.zeros((3, nx), np.uint8)
        zrow = np.zeros(nx, np.uint8)
        srow = np.zeros(nx, np.float32)
        cand = np.empty(4096, np.int64)
        ncand = 0
        zero = np.float32(0.0)
        eight = np.float32(8.0)
        zstate = np.zeros((1, 1), np.uint8)  # "no earlier cosmic rays" for _s_at_nb
        _valid_row_nb(img, var, mask, use_mask, bad, 0, buf[0])
        for y in range(ny):
            cur = buf[y % 3]
            r = img[y]
            v = var[y]
            if y + 1 < ny:
                _valid_row_nb(img, var, mask, use_mask, bad, y + 1, buf[(y + 1) % 3])
                nxt = buf[(y + 1) % 3]
                rd = img[y + 1]
                vd = var[y + 1]
            else:
                nxt = zrow
                rd = r
                vd = v
            if y > 0:
                prv = buf[(y - 1) % 3]
                ru = img[y - 1]
                vu = var[y - 1]
            else:
                prv = zrow
                ru = r
                vu = v
            for x in range(1, nx - 1):
                cc = r[x]
                wl = cur[x - 1] != 0
                wr = cur[x + 1] != 0
                wu = prv[x] != 0
                wd = nxt[x] != 0
                tl = cc - r[x - 1]
                tr = cc - r[x + 1]
                tu = cc - ru[x]
                td = cc - rd[x]
                ml = v[x - 1]
                mr = v[x + 1]
                mu = vu[x]
                md = vd[x]
                allv = wl & wr & wu & wd & (cur[x] != 0)
                mn = min(min(ml, mr), min(mu, md))
                mx = max(max(ml, mr), max(mu, md))
                m = (ml + mr + mu + md - mn - mx) * np.float32(0.5)
                lap = (max(tl + tu, zero) + max(tl + td, zero)
                       + max(tr + tu, zero) + max(tr + td, zero))
                q = lap / (eight * np.sqrt(m))
                q = q if m > zero else zero
                # pixels next to masked ones (or masked): the general code below
                srow[x] = q if allv else np.float32(-1.0)
            for x in range(1, nx - 1):
                if srow[x] < 0:
                    srow[x] = _s_at_nb(img, var, mask, use_mask, bad, zstate, y, x) \
                        if cur[x] else zero
            # the two edge columns, with the general single-pixel code
            srow[0] = _s_at_nb(img, var, mask, use_mask, bad, zstate, y, 0)
            srow[nx - 1] = _s_at_nb(img, var, mask, use_mask, bad, zstate, y, nx - 1)
            if want_image:
                for x in range(nx):
                    s_out[y, x] = srow[x]
            nrow = 0
            for x in range(nx):
                nrow += srow[x] > sigclip
            if nrow:
                if ncand + nrow > cand.shape[0]:
                    bigger = np.empty(2 * (ncand + nrow), np.int64)
                    bigger[:ncand] = cand[:ncand]
                    cand = bigger
                for x in range(nx):
                    if srow[x] > sigclip:
                        cand[ncand] = y * nx + x
                        ncand += 1
        return cand[:ncand]

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _ok_nb(img, var, mask, use_mask, bad, state, y, x):  # pragma: no cover - compiled
        if not (np.isfinite(img[y, x]) and np.isfinite(var[y, x])):
            return False
        if use_mask and (mask[y, x] & bad) != 0:
            return False
        # a state array of another shape means "no earlier cosmic rays" (full-pass edges)
        return state.shape[0] != img.shape[0] or state[y, x] != 1

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _s_at_nb(img, var, mask, use_mask, bad, state, y, x):  # pragma: no cover - compiled
        """S at one pixel, with pixels of state 1 (earlier cosmic rays) excluded; the same
        definition as the full pass."""
        ny, nx = img.shape
        zero = np.float32(0.0)
        if not _ok_nb(img, var, mask, use_mask, bad, state, y, x):
            return zero
        c = img[y, x]
        ol = x > 0 and _ok_nb(img, var, mask, use_mask, bad, state, y, x - 1)
        orr = x < nx - 1 and _ok_nb(img, var, mask, use_mask, bad, state, y, x + 1)
        ou = y > 0 and _ok_nb(img, var, mask, use_mask, bad, state, y - 1, x)
        od = y < ny - 1 and _ok_nb(img, var, mask, use_mask, bad, state, y + 1, x)
        dl = c - img[y, x - 1] if ol else zero
        dr = c - img[y, x + 1] if orr else zero
        du = c - img[y - 1, x] if ou else zero
        dd = c - img[y + 1, x] if od else zero
        m = _nv4_nb(var[y, x], var[y, x - 1] if ol else zero, ol,
                    var[y, x + 1] if orr else zero, orr,
                    var[y - 1, x] if ou else zero, ou, var[y + 1, x] if od else zero, od)
        if not (m > 0):
            return zero
        lap = max(dl + du, zero) + max(dl + dd, zero) + max(dr + du, zero) + max(dr + dd, zero)
        return lap / (np.float32(8.0) * np.sqrt(m))

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _median_nb(buf, n):  # pragma: no cover - compiled
        """Median of buf[:n] (sorted in place by insertion: n <= 49, no allocation)."""
        for i in range(1, n):
            v = buf[i]
            k = i
            while k > 0 and buf[k - 1] > v:
                buf[k] = buf[k - 1]
                k -= 1
            buf[k] = v
        h = n // 2
        if n % 2 == 1:
            return buf[h]
        return np.float32(0.5) * (buf[h - 1] + buf[h])

    # Candidate pixels are evaluated on a 9x9 stamp (+-4 pixels) copied once: random access
    # to the big arrays is what costs, not the arithmetic.
    _H = 4
    _W = 2 * _H + 1

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _load_nb(img, var, mask, use_mask, bad, state, y, x, st, sv, sok, sin, h
                 ):  # pragma: no cover - compiled
        """Copy the (2h+1)^2 neighbourhood of (y, x) into the stamp buffers: values, variances,
        usability (finite, unmasked, not an earlier cosmic ray) and inside-the-image flags."""
        ny, nx = img.shape
        for a in range(2 * h + 1):
            yy = y - h + a
            for b in range(2 * h + 1):
                xx = x - h + b
                if 0 <= yy < ny and 0 <= xx < nx:
                    v = img[yy, xx]
                    w = var[yy, xx]
                    ok = np.isfinite(v) and np.isfinite(w) and state[yy, xx] != 1
                    if use_mask:
                        ok = ok and (mask[yy, xx] & bad) == 0
                    st[a, b] = v
                    sv[a, b] = w
                    sok[a, b] = ok
                    sin[a, b] = True
                else:
                    st[a, b] = 0.0
                    sv[a, b] = 0.0
                    sok[a, b] = False
                    sin[a, b] = False

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _s_stamp_nb(st, sv, sok, a, b):  # pragma: no cover - compiled
        """S at stamp position (a, b), 1 <= a, b <= size - 2 (same definition as the full
        pass)."""
        zero = np.float32(0.0)
        if not sok[a, b]:
            return zero
        c = st[a, b]
        ol = sok[a, b - 1]
        orr = sok[a, b + 1]
        ou = sok[a - 1, b]
        od = sok[a + 1, b]
        dl = c - st[a, b - 1] if ol else zero
        dr = c - st[a, b + 1] if orr else zero
        du = c - st[a - 1, b] if ou else zero
        dd = c - st[a + 1, b] if od else zero
        m = _nv4_nb(sv[a, b], sv[a, b - 1], ol, sv[a, b + 1], orr, sv[a - 1, b], ou,
                    sv[a + 1, b], od)
        if not (m > 0):
            return zero
        lap = max(dl + du, zero) + max(dl + dd, zero) + max(dr + du, zero) + max(dr + dd, zero)
        return lap / (np.float32(8.0) * np.sqrt(m))

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _sprime_stamp_nb(st, sv, sok, sin, b25):  # pragma: no cover - compiled
        """(S, S') at the stamp centre; S' = S - median of S over the 5x5 inside the image."""
        n = 0
        for a in range(_H - 2, _H + 3):
            for b in range(_H - 2, _H + 3):
                if sin[a, b]:
                    b25[n] = _s_stamp_nb(st, sv, sok, a, b)
                    n += 1
        s_c = _s_stamp_nb(st, sv, sok, _H, _H)
        return s_c, s_c - _median_nb(b25, n)

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _fine_stamp_nb(st, sv, sok, b9, b49):  # pragma: no cover - compiled
        """max(F / N, 0.01) at the stamp centre, F = med3(I) - med7(med3(I)) over usable
        pixels, N the noise of the full pass (median variance of the usable 4-neighbours)."""
        n49 = 0
        centre = np.float32(np.nan)
        for cy in range(1, _W - 1):
            for cx in range(1, _W - 1):
                n9 = 0
                for a in range(cy - 1, cy + 2):
                    for b in range(cx - 1, cx + 2):
                        if sok[a, b]:
                            b9[n9] = st[a, b]
                            n9 += 1
                if n9 > 0:
                    m3 = _median_nb(b9, n9)
                    b49[n49] = m3
                    n49 += 1
                    if cy == _H and cx == _H:
                        centre = m3
        f = centre - _median_nb(b49, n49)
        m = _nv4_nb(sv[_H, _H], sv[_H, _H - 1], sok[_H, _H - 1], sv[_H, _H + 1],
                    sok[_H, _H + 1], sv[_H - 1, _H], sok[_H - 1, _H], sv[_H + 1, _H],
                    sok[_H + 1, _H])
        noise = np.sqrt(max(m, np.float32(0.0)))
        return max(f / max(noise, np.float32(1e-30)), np.float32(0.01))

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _iterate_nb(img, var, mask, use_mask, bad, state, cand, sigclip, sigfrac, objlim
                    ):  # pragma: no cover - compiled
        """One L.A.Cosmic iteration on the candidate pixels (flat indices); returns the new
        cosmic-ray pixels (marked state 1 on return).  States: 0 normal, 1 cosmic ray of an
        earlier iteration (excluded), 2 selected in this iteration, 3 grown in this step."""
        ny, nx = img.shape
        st = np.empty((_W, _W), np.float32)
        sv = np.empty((_W, _W), np.float32)
        sok = np.empty((_W, _W), np.bool_)
        sin = np.empty((_W, _W), np.bool_)
        b25 = np.empty(25, np.float32)
        b9 = np.empty(9, np.float32)
        b49 = np.empty(49, np.float32)
        sel = np.empty(cand.shape[0] + 16, np.int64)
        nsel = 0
        for k in range(cand.shape[0]):
            y = cand[k] // nx
            x = cand[k] % nx
            if state[y, x] != 0:
                continue
            _load_nb(img, var, mask, use_mask, bad, state, y, x, st, sv, sok, sin, _H)
            if not sok[_H, _H]:
                continue
            s_c, sp = _sprime_stamp_nb(st, sv, sok, sin, b25)
            if not (s_c > sigclip and sp > sigclip):
                continue
            if sp / _fine_stamp_nb(st, sv, sok, b9, b49) > objlim:
                sel[nsel] = cand[k]
                nsel += 1
        sel = sel[:nsel]
        for k in range(nsel):
            state[sel[k] // nx, sel[k] % nx] = 2
        for limit in (sigclip, sigfrac * sigclip):
            grown = np.empty(9 * sel.shape[0] + 16, np.int64)
            ng = 0
            for k in range(sel.shape[0]):
                y0 = sel[k] // nx
                x0 = sel[k] % nx
                for y in range(max(y0 - 1, 0), min(y0 + 2, ny)):
                    for x in range(max(x0 - 1, 0), min(x0 + 2, nx)):
                        if state[y, x] != 0:
                            continue
                        _load_nb(img, var, mask, use_mask, bad, state, y, x, st, sv, sok, sin, _H)
                        if not sok[_H, _H]:
                            continue
                        s_c, sp = _sprime_stamp_nb(st, sv, sok, sin, b25)
                        if sp > limit:
                            state[y, x] = 3  # accepted in this growth step
                            grown[ng] = y * nx + x
                            ng += 1
            both = np.empty(sel.shape[0] + ng, np.int64)
            both[:sel.shape[0]] = sel
            both[sel.shape[0]:] = grown[:ng]
            for k in range(ng):
                state[grown[k] // nx, grown[k] % nx] = 2
            sel = both
        for k in range(sel.shape[0]):
            state[sel[k] // nx, sel[k] % nx] = 1
        return sel

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def _near_candidates_nb(img, var, mask, use_mask, bad, state, new, radius, sigclip
                            ):  # pragma: no cover - compiled
        """Pixels within ``radius`` of the new cosmic rays (whose S, S' or F may have
        changed) that are usable and have S > sigclip (state 4 marks visited pixels)."""
        ny, nx = img.shape
        h = radius + 1
        w = 2 * h + 1
        st = np.empty((w, w), np.float32)
        sv = np.empty((w, w), np.float32)
        sok = np.empty((w, w), np.bool_)
        sin = np.empty((w, w), np.bool_)
        out = np.empty(16, np.int64)
        n = 0
        for k in range(new.shape[0]):
            y0 = new[k] // nx
            x0 = new[k] % nx
            _load_nb(img, var, mask, use_mask, bad, state, y0, x0, st, sv, sok, sin, h)
            for y in range(max(y0 - radius, 0), min(y0 + radius + 1, ny)):
                for x in range(max(x0 - radius, 0), min(x0 + radius + 1, nx)):
                    if state[y, x] != 0:
                        continue
                    state[y, x] = 4
                    if _s_stamp_nb(st, sv, sok, y - y0 + h, x - x0 + h) > sigclip:
                        if n == out.shape[0]:
                            bigger = np.empty(2 * n, np.int64)
                            bigger[:n] = out
                            out = bigger
                        out[n] = y * nx + x
                        n += 1
        for k in range(new.shape[0]):
            y0 = new[k] // nx
            x0 = new[k] % nx
            for y in range(max(y0 - radius, 0), min(y0 + radius + 1, ny)):
                for x in range(max(x0 - radius, 0), min(x0 + radius + 1, nx)):
                    if state[y, x] == 4:
                        state[y, x] = 0
        return out[:n]


# ---------------------------------------------------------------------------------------------
# numpy versions of the stamp operations (same definitions)
# ---------------------------------------------------------------------------------------------

def _stamps(arr: np.ndarray, ys: np.ndarray, xs: np.ndarray, half: int, fill: float
            ) -> np.ndarray:
    pad = np.pad(arr.astype(np.float64), half, constant_values=fill)
    off = np.arange(-half, half + 1)
    return pad[(ys + half)[:, None, None] + off[None, :, None],
               (xs + half)[:, None, None] + off[None, None, :]]


def _sprime_numpy(s: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    st = _stamps(s, ys, xs, 2, np.nan).reshape(len(ys), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return (s[ys, xs] - np.nanmedian(st, axis=1)).astype(np.float32)


def _fine_numpy(img: np.ndarray, valid: np.ndarray, ys: np.ndarray, xs: np.ndarray
                ) -> np.ndarray:
    work = np.where(valid, img, np.nan)
    st = _stamps(work, ys, xs, 4, np.nan)                       # (n, 9, 9)
    win = np.lib.stride_tricks.sliding_window_view(st, (3, 3), axis=(1, 2))  # (n, 7, 7, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m3 = np.nanmedian(win.reshape(len(ys), 7, 7, 9), axis=3)
        m7 = np.nanmedian(m3.reshape(len(ys), 49), axis=1)
    return (m3[:, 3, 3] - m7).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def sharpness(image: np.ndarray, variance: np.ndarray, *, mask: np.ndarray | None = None,
              bad_bits: int = COSMIC_BAD_BITS, engine: str = "auto") -> np.ndarray:
    """L.A.Cosmic significance of the clipped Laplacian, ``S = L+ / (2 N)``.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Image (electrons, sky included).
    variance : ndarray, shape (ny, nx)
        Its variance (electrons squared).
    mask : ndarray of uint16, optional
        Pixels with ``bad_bits`` are ignored (S = 0) and not used as neighbours.
    bad_bits : int
        Mask bits to ignore.
    engine : {"auto", "numba", "numpy"}

    Returns
    -------
    ndarray, float32
        S (dimensionless, in units of the noise).  A single hot pixel of amplitude A on a
        flat background has ``S = A / N``.
    """
    image, variance, mask = _prepare(image, variance, mask)
    if _use_numba(engine):
        out = np.empty(image.shape, np.float32)
        _sharpness_rows_nb(image, variance, *_mask_args(mask, bad_bits), np.float32(np.inf),
                           True, out)
        return out
    return _sharpness_numpy(image, variance, _valid_numpy(image, variance, mask, bad_bits))


def _use_numba(engine: str) -> bool:
    if engine not in ("auto", "numba", "numpy"):
        raise ValueError(f"engine must be 'auto', 'numba' or 'numpy', got {engine!r}")
    if engine == "numba" and not _HAVE_NUMBA:
        raise RuntimeError("engine='numba' requested but numba is not installed")
    return _HAVE_NUMBA and engine != "numpy"


def _prepare(image, variance, mask):
    image = np.asarray(image)
    variance = np.asarray(variance)
    if image.ndim != 2:
        raise ValueError(f"image: expected a 2-D array, got shape {image.shape}")
    if variance.shape != image.shape:
        raise ValueError(f"variance shape {variance.shape} does not match the image shape "
                         f"{image.shape}")
    image = np.ascontiguousarray(image, dtype=np.float32)
    variance = np.ascontiguousarray(variance, dtype=np.float32)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise ValueError(f"mask shape {mask.shape} does not match the image shape "
                             f"{image.shape}")
        mask = np.ascontiguousarray(mask, dtype=np.uint16)
    return image, variance, mask


def _mask_args(mask, bad_bits):
    if mask is None:
        return np.zeros((1, 1), np.uint16), False, np.uint16(0)
    return mask, True, np.uint16(bad_bits & 0xFFFF)


def _valid_numpy(image, variance, mask, bad_bits):
    valid = np.isfinite(image) & np.isfinite(variance)
    if mask is not None:
        valid &= (mask & bad_bits) == 0
    return valid


def _noise_at(var: np.ndarray, usable: np.ndarray, ys: np.ndarray, xs: np.ndarray
              ) -> np.ndarray:
    """Noise at a pixel list: sqrt of the median variance of the usable 4-neighbours (the
    same noise model as :func:`sharpness`)."""
    ny, nx = var.shape
    vals = np.zeros((4, ys.size), np.float32)
    oks = np.zeros((4, ys.size), bool)
    for k, (dy, dx) in enumerate(((0, -1), (0, 1), (-1, 0), (1, 0))):
        yy = np.clip(ys + dy, 0, ny - 1)
        xx = np.clip(xs + dx, 0, nx - 1)
        inside = (ys + dy >= 0) & (ys + dy < ny) & (xs + dx >= 0) & (xs + dx < nx)
        vals[k] = var[yy, xx]
        oks[k] = inside & usable[yy, xx]
    nv = _median_of_usable(vals, oks, var[ys, xs].astype(np.float32))
    return np.sqrt(np.maximum(nv, 0.0))


def _neighbours(ys: np.ndarray, xs: np.ndarray, shape: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Unique 3x3 neighbourhood (centre included) of a pixel list, clipped to the image."""
    d = np.array([-1, 0, 1])
    yy = (ys[:, None, None] + d[None, :, None]).repeat(3, axis=2).ravel()
    xx = (xs[:, None, None] + d[None, None, :]).repeat(3, axis=1).ravel()
    ok = (yy >= 0) & (yy < shape[0]) & (xx >= 0) & (xx < shape[1])
    flat = np.unique(yy[ok].astype(np.int64) * shape[1] + xx[ok])
    return (flat // shape[1]).astype(np.int64), (flat % shape[1]).astype(np.int64)


def _find_numpy(img, var, valid, sigclip, sigfrac, objlim, niter):
    """Reference implementation on whole-image arrays (same definitions as the numba path)."""
    ny, nx = img.shape
    cr = np.zeros((ny, nx), dtype=bool)
    for _ in range(niter):
        usable = valid & ~cr
        s = _sharpness_numpy(img, var, usable)
        cy, cx = np.nonzero(s > sigclip)
        if cy.size == 0:
            break
        sp_c = _sprime_numpy(s, cy, cx)
        keep = sp_c > sigclip
        cy, cx, sp_c = cy[keep], cx[keep], sp_c[keep]
        if cy.size == 0:
            break
        f = _fine_numpy(img, usable, cy, cx)
        noise = _noise_at(var, usable, cy, cx)
        fn = np.maximum(f / np.maximum(noise, 1e-30), 0.01)
        hit = sp_c / fn > objlim
        sel = np.zeros((ny, nx), dtype=bool)
        sel[cy[hit], cx[hit]] = True
        if not sel.any():
            break
        # growth: neighbours with S' > sigclip, then their neighbours with S' > sigfrac*sigclip
        for limit in (sigclip, sigfrac * sigclip):
            gy, gx = _neighbours(*np.nonzero(sel), (ny, nx))
            ok = usable[gy, gx]
            gy, gx = gy[ok], gx[ok]
            spg = _sprime_numpy(s, gy, gx)
            sel[gy[spg > limit], gx[spg > limit]] = True
        new = sel & usable
        if not new.any():
            break
        cr |= new
    return np.flatnonzero(cr)


def find_cosmic_pixels(image: np.ndarray, variance: np.ndarray, *,
                       mask: np.ndarray | None = None, bad_bits: int = COSMIC_BAD_BITS,
                       sigclip: float = 4.5, sigfrac: float = 0.3, objlim: float = 4.0,
                       niter: int = 4, engine: str = "auto") -> np.ndarray:
    """Flat indices (``y * nx + x``, sorted) of the cosmic-ray pixels; see
    :func:`find_cosmics` for the parameters.  Cheaper than the boolean image on a full chip
    (no image-sized output)."""
    if sigclip <= 0 or not (0 < sigfrac <= 1) or objlim <= 0 or niter < 1:
        raise ValueError(f"cosmic options out of range: sigclip={sigclip} (>0), sigfrac={sigfrac} "
                         f"(0..1], objlim={objlim} (>0), niter={niter} (>=1)")
    img, var, mask = _prepare(image, variance, mask)
    if not _use_numba(engine):
        return _find_numpy(img, var, _valid_numpy(img, var, mask, bad_bits), sigclip, sigfrac,
                           objlim, niter)
    m, use_mask, bad = _mask_args(mask, bad_bits)
    # pixel states: 0 normal, 1 cosmic ray (excluded), 2-4 transient marks of one iteration;
    # np.zeros maps pages lazily, so only the neighbourhoods of candidates are touched
    state = np.zeros(img.shape, np.uint8)
    cand = _sharpness_rows_nb(img, var, m, use_mask, bad, np.float32(sigclip), False,
                              np.empty((1, 1), np.float32))
    found = []
    for _ in range(niter):
        if cand.size == 0:
            break
        new = _iterate_nb(img, var, m, use_mask, bad, state, cand, np.float32(sigclip),
                          np.float32(sigfrac), np.float32(objlim))
        if new.size == 0:
            break
        found.append(new)
        # S, S' and F change only within 4 pixels of the new cosmic rays
        cand = _near_candidates_nb(img, var, m, use_mask, bad, state, new, 4,
                                   np.float32(sigclip))
    if not found:
        return np.empty(0, np.int64)
    return np.sort(np.concatenate(found))


def find_cosmics(image: np.ndarray, variance: np.ndarray, *, mask: np.ndarray | None = None,
                 bad_bits: int = COSMIC_BAD_BITS, sigclip: float = 4.5, sigfrac: float = 0.3,
                 objlim: float = 4.0, niter: int = 4, engine: str = "auto") -> np.ndarray:
    """Cosmic-ray pixels of a single image (L.A.Cosmic).

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Detrended image (electrons) with its sky (not background-subtracted: the noise model
        needs it; a constant sky does not change the Laplacian).
    variance : ndarray, shape (ny, nx)
        Variance (electrons squared).
    mask : ndarray of uint16, optional
        Mask; pixels with ``bad_bits`` are never flagged and not used as neighbours.
    bad_bits : int
        Mask bits to ignore (defects, dead cells, saturation, bleeds, gaps, LOW, earlier CR).
    sigclip : float
        Detection limit on ``S'`` (sigma); L.A.Cosmic's 4.5.
    sigfrac : float
        Growth limit as a fraction of ``sigclip``; L.A.Cosmic's 0.3.
    objlim : float
        Minimum contrast between the Laplacian and the fine structure; raised from
        L.A.Cosmic's 2 (for well-sampled images) to 4 so that stars of FWHM down to
        2.5 px (PS1's best seeing) are not flagged.
    niter : int
        Maximum number of detection iterations (4 in L.A.Cosmic).  Pixels found in one
        iteration are excluded (masked) in the next, which uncovers the fainter parts of
        hits next to bright ones.
    engine : {"auto", "numba", "numpy"}
        numba works on candidate pixels only; numpy on whole-image arrays (reference).

    Returns
    -------
    ndarray of bool, shape (ny, nx)
        Cosmic-ray pixels.
    """
    flat = find_cosmic_pixels(image, variance, mask=mask, bad_bits=bad_bits, sigclip=sigclip,
                              sigfrac=sigfrac, objlim=objlim, niter=niter, engine=engine)
    out = np.zeros(np.shape(image), dtype=bool)
    out.ravel()[flat] = True
    return out
