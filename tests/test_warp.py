"""Tests of ps1mpi.algorithms.warp against constructed inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from ps1mpi.algorithms import maskbits
from ps1mpi.algorithms.warp import (HAVE_NUMBA, PixelMapGrid, lanczos_weights, warp_image)

BACKENDS = ["numpy"] + (["numba"] if HAVE_NUMBA else [])


def affine_map(theta_deg: float, scale: float, shift: tuple[float, float],
               centre: tuple[float, float]):
    """Output -> input map: rotation by theta and scale about ``centre``, then a shift."""
    c, s = np.cos(np.radians(theta_deg)), np.sin(np.radians(theta_deg))
    cx, cy = centre

    def pixel_map(xo, yo):
        dx, dy = np.asarray(xo) - cx, np.asarray(yo) - cy
        return (cx + scale * (c * dx - s * dy) + shift[0],
                cy + scale * (s * dx + c * dy) + shift[1])

    return pixel_map


def gaussian_field(x, y, sources, background=10.0):
    """Sum of circular Gaussians ``(x0, y0, sigma, amplitude)`` on a flat background."""
    f = np.full(np.shape(x), background, dtype=np.float64)
    for x0, y0, sig, amp in sources:
        f += amp * np.exp(-0.5 * ((x - x0) ** 2 + (y - y0) ** 2) / sig ** 2)
    return f


# ---- sky geometry for a realistic map: skycell TAN -> sky -> chip TAN + distortion ---------

def _basis(ra0, dec0):
    a, d = np.radians(ra0), np.radians(dec0)
    centre = np.array([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)])
    east = np.array([-np.sin(a), np.cos(a), 0.0])
    north = np.cross(centre, east)
    return centre, east, north


def _to_tangent(p, basis):
    c, e, n = basis
    w = np.tensordot(c, p, axes=1)
    return np.tensordot(e, p, axes=1) / w, np.tensordot(n, p, axes=1) / w


def _from_tangent(xi, eta, basis):
    c, e, n = (v.reshape((3,) + (1,) * np.ndim(xi)) for v in basis)
    p = c + e * xi + n * eta
    return p / np.linalg.norm(p, axis=0)


def realistic_map():
    """A chip 1.2 degrees off the boresight seen from a projection cell 1.5 degrees away:
    skycell TAN (0.25"/px) -> sky -> boresight TAN with a radial cubic distortion reaching
    10" at 1.6 degrees -> chip pixels (0.258"/px, rotated by 1.3 degrees). Returns the map and
    the out_origin that puts the chip in the middle of a 4096 x 4096 output."""
    arcsec = np.radians(1 / 3600)
    bore = _basis(150.0, 30.0)
    k = (10 * arcsec) / np.radians(1.6) ** 3
    chip_xi, chip_eta = np.radians(0.9), np.radians(0.8)
    th = np.radians(1.3)
    cell = _basis(151.2, 31.0)
    sky_scale = 0.25 * arcsec
    chip_scale = 0.258 * arcsec

    def pixel_map(xo, yo):
        xo, yo = np.asarray(xo, dtype=float), np.asarray(yo, dtype=float)
        p = _from_tangent(-xo * sky_scale, yo * sky_scale, cell)
        xi, eta = _to_tangent(p, bore)
        r2 = xi * xi + eta * eta
        xi, eta = xi * (1 + k * r2), eta * (1 + k * r2)
        dx, dy = (xi - chip_xi) / chip_scale, (eta - chip_eta) / chip_scale
        return (2400 + np.cos(th) * dx + np.sin(th) * dy,
                2400 - np.sin(th) * dx + np.cos(th) * dy)

    # sky position of the chip centre, in skycell pixels
    p = _from_tangent(np.array(chip_xi), np.array(chip_eta), bore)
    xi, eta = _to_tangent(p, cell)
    origin = (int(round(-float(xi) / sky_scale)) - 2048, int(round(float(eta) / sky_scale)) - 2048)
    return pixel_map, origin


# --------------------------------------------------------------------------------------------

def lanczos_first_moment(frac: np.ndarray) -> np.ndarray:
    """sum_k w_k (x_k - x) of the normalised Lanczos-3 weights: the sub-pixel shift (up to
    0.02 px) that any Lanczos-3 resampler (SWarp, pswarp) applies at phase ``frac``."""
    w = lanczos_weights(frac, 3)
    return (w * (np.arange(-2, 4) - np.asarray(frac)[..., None])).sum(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("theta,scale", [(30.0, 1.0), (-12.0, 0.8), (1.0, 1.06)])
def test_rotated_gaussian_field_matches_analytic(backend, theta, scale):
    n = 160
    sources = [(50.3, 60.2, 3.0, 500.0), (100.7, 80.1, 3.5, 300.0), (80.0, 110.5, 4.0, 800.0)]
    y, x = np.mgrid[0:n, 0:n].astype(float)
    img = gaussian_field(x, y, sources).astype(np.float32)
    pm = affine_map(theta, scale, (0.37, -0.61), (80.0, 80.0))
    m = 200  # larger than the input: some output pixels map off it
    res = warp_image(img, np.ones_like(img), np.zeros(img.shape, np.uint16), pm,
                     out_shape=(m, m), backend=backend)
    xi, yi = pm(*np.mgrid[0:m, 0:m].astype(float)[::-1])
    truth = scale ** 2 * gaussian_field(xi, yi, sources)  # surface brightness x Jacobian
    inner = (xi > 4) & (xi < n - 5) & (yi > 4) & (yi < n - 5)
    err = np.abs(res.image - truth)[inner].max() / truth.max()
    assert err < 4e-3, f"max error {err:.2e} of the peak"
    assert (res.mask[inner] == 0).all()
    assert res.jacobian == pytest.approx(scale ** 2, rel=1e-9)
    # pixels mapping off the input are GAP and zero
    off = (xi < -0.5) | (xi >= n - 0.5) | (yi < -0.5) | (yi >= n - 0.5)
    assert off.any()
    assert (res.mask[off] == maskbits.GAP).all() and (res.image[off] == 0).all()
    assert (res.variance[off] == 0).all()
    # the map is affine, so bilinear interpolation between nodes is exact
    assert res.map_error < 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_broad_field_positions_exact_to_kernel_shift(backend):
    """For a broad field the only error left is the Lanczos-3 first-moment shift; taking it
    into account the warp matches to 3e-4 of the peak, i.e. positions are right to ~3 mpx."""
    n = 160
    sources = [(70.3, 80.2, 7.0, 1000.0), (95.0, 70.0, 8.0, 600.0)]
    y, x = np.mgrid[0:n, 0:n].astype(float)
    img = gaussian_field(x, y, sources, background=0.0).astype(np.float32)
    pm = affine_map(30.0, 0.97, (0.37, -0.61), (80.0, 80.0))
    res = warp_image(img, np.ones_like(img), np.zeros(img.shape, np.uint16), pm,
                     out_shape=(n, n), backend=backend)
    xi, yi = pm(x, y)
    naive = 0.97 ** 2 * gaussian_field(xi, yi, sources, background=0.0)
    shifted = 0.97 ** 2 * gaussian_field(xi + lanczos_first_moment(xi - np.floor(xi)),
                                         yi + lanczos_first_moment(yi - np.floor(yi)),
                                         sources, background=0.0)
    peak = naive.max()
    assert np.abs(res.image - shifted).max() / peak < 3e-4
    assert np.abs(res.image - naive).max() / peak > 3 * np.abs(res.image - shifted).max() / peak


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("theta,scale", [(17.0, 0.95), (1.0, 1.1), (-40.0, 0.9), (0.5, 0.97)])
def test_flux_conservation(backend, theta, scale):
    """Stars (FWHM 3.5 px) keep their flux through rotation and scaling: no bias above 0.1%
    over random sub-pixel positions; single stars scatter by the Lanczos-3 interpolation
    error (under 1%)."""
    n = 240
    rng = np.random.default_rng(3)
    centres = np.stack(np.meshgrid(np.arange(36, 205, 24.0), np.arange(36, 205, 24.0)), -1)
    centres = centres.reshape(-1, 2) + rng.uniform(-0.5, 0.5, (centres.size // 2, 2))
    sig, amp = 1.5, 1000.0
    star_flux = amp * 2 * np.pi * sig ** 2
    y, x = np.mgrid[0:n, 0:n].astype(float)
    img = gaussian_field(x, y, [(cx, cy, sig, amp) for cx, cy in centres], background=0.0)
    pm = affine_map(theta, scale, (0.23, 0.41), (120.0, 120.0))
    res = warp_image(img.astype(np.float32), np.ones((n, n), np.float32),
                     np.zeros((n, n), np.uint16), pm, out_shape=(n, n), backend=backend)
    # output positions of the stars: invert the affine map
    c, s = np.cos(np.radians(theta)), np.sin(np.radians(theta))
    d = centres - 120.0 - np.array([0.23, 0.41])
    out_x = 120.0 + (c * d[:, 0] + s * d[:, 1]) / scale
    out_y = 120.0 + (-s * d[:, 0] + c * d[:, 1]) / scale
    inside = (out_x > 12) & (out_x < n - 13) & (out_y > 12) & (out_y < n - 13)
    assert inside.sum() >= 36
    flux = np.array([res.image[(x - ox) ** 2 + (y - oy) ** 2 < 10.0 ** 2].sum(dtype=np.float64)
                     for ox, oy in zip(out_x[inside], out_y[inside])])
    bias = flux / star_flux - 1
    assert abs(bias.mean()) < 1e-3, bias.mean()
    assert np.abs(bias).max() < 1e-2, np.abs(bias).max()
    assert (res.mask[res.image > 1.0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_masked_pixel_marks_its_kernel_footprint(backend):
    n = 100
    rng = np.random.default_rng(1)
    img = rng.normal(100.0, 1.0, (n, n)).astype(np.float32)
    msk = np.zeros((n, n), np.uint16)
    msk[50, 40] = maskbits.DETECTOR
    img[50, 40] = 1e6  # must not leak into any output pixel
    shift = (10.5, 5.5)  # half-pixel phase: all 36 taps carry weight
    pm = affine_map(0.0, 1.0, shift, (0.0, 0.0))
    res = warp_image(img, np.ones_like(img), msk, pm, out_shape=(n, n), backend=backend)
    # output x sees inputs floor(x + 10.5) - 2 ... + 3: pixel 40 for x in 27..32, y in 42..47
    w = lanczos_weights(np.array(0.5), 3)
    frac = np.zeros((n, n))
    for j in range(42, 48):
        for i in range(27, 33):
            ky, kx = 50 - (j + 5 - 2), 40 - (i + 10 - 2)
            frac[j, i] = (w[ky] * w[kx]) ** 2 / (w ** 2).sum() ** 2
    inside = np.zeros((n, n), bool)
    inside[:n - 16, :n - 16] = True  # away from the right/top edge of the input
    flagged = (res.mask != 0) & inside
    assert np.array_equal(np.argwhere(flagged), np.argwhere((frac > 1e-8) & inside))
    assert flagged.sum() == 36
    conv = (res.mask & maskbits.CONV) != 0
    bad = (res.mask & maskbits.DETECTOR) != 0
    assert np.array_equal(conv & inside, (frac > 1e-8) & inside)
    assert np.array_equal(bad & inside, (frac > 1e-4) & inside)  # IPP POOR.FRAC 0.01, squared
    assert 0 < bad.sum() < 36  # a core of unusable pixels inside a CONV rim
    # renormalised values stay unbiased where the output is only CONV
    rim = conv & ~bad & inside
    assert np.abs(res.image[rim] - 100.0).max() < 6.0
    assert np.abs(res.image[inside]).max() < 200


@pytest.mark.parametrize("backend", BACKENDS)
def test_edges_nonfinite_and_advisory_bits(backend):
    n = 64
    img = np.full((n, n), 5.0, np.float32)
    var = np.full((n, n), 2.0, np.float32)
    msk = np.zeros((n, n), np.uint16)
    img[20, 20] = np.nan
    msk[30:40, 30:40] = maskbits.SUSPECT  # advisory: copied, not masking
    pm = affine_map(0.0, 1.0, (0.5, 0.5), (0.0, 0.0))
    res = warp_image(img, var, msk, pm, out_shape=(n, n), backend=backend)
    assert np.isfinite(res.image).all() and np.isfinite(res.variance).all()
    # NaN input -> flagged SAT around it, never propagated
    assert res.mask[17:23, 17:23].max() & maskbits.SAT
    assert (res.mask[18:22, 18:22] & maskbits.SAT).all()
    # advisory bit from the nearest pixel: x_in = x + 0.5 rounds to x + 1
    assert (res.mask[29:39, 29:39] == maskbits.SUSPECT).all()
    assert not (res.mask[39, 29:40] & maskbits.SUSPECT).any()
    assert not (res.mask[28, 29:40] & maskbits.SUSPECT).any()
    assert not (res.mask[29:40, 39] & maskbits.SUSPECT).any()
    assert (res.mask[25:28, 45:50] == 0).all()
    # pixels whose kernel runs off the input are flagged with GAP; their centre maps inside
    assert (res.mask[:, n - 3:] & maskbits.GAP).all()
    assert (res.mask[:, n - 1] == maskbits.GAP).all() and (res.image[:, n - 1] == 0).all()
    interior = res.mask == 0
    assert np.allclose(res.image[interior], 5.0, rtol=1e-6)
    # variance of a constant-variance input: 2 * sum(w^2) at phase 0.5 in both axes
    w = lanczos_weights(np.array(0.5), 3)
    assert np.allclose(res.variance[interior], 2.0 * ((w ** 2).sum()) ** 2, rtol=1e-5)
    assert res.good_fraction == pytest.approx((res.mask & maskbits.BAD == 0).mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_white_noise_variance_and_covariance_factor(backend):
    """Per pixel the measured variance equals the propagated one; on scales larger than the
    kernel (block sums) it is the propagated one times the covariance factor."""
    n = 768
    rng = np.random.default_rng(7)
    sigma2 = 4.0
    img = rng.normal(0.0, np.sqrt(sigma2), (n, n)).astype(np.float32)
    var = np.full((n, n), sigma2, np.float32)
    scale = 0.97  # J = 0.94, like chip 0.258"/px onto skycell 0.25"/px
    pm = affine_map(23.0, scale, (0.3, 0.1), (n / 2, n / 2))
    res = warp_image(img, var, np.zeros((n, n), np.uint16), pm, out_shape=(n, n),
                     backend=backend)
    y, x = np.mgrid[0:n, 0:n].astype(float)
    xi, yi = pm(x, y)
    good = (xi > 5) & (xi < n - 6) & (yi > 5) & (yi < n - 6)
    # the largest square of good pixels
    g0, g1 = int(n * 0.2), int(n * 0.8)
    assert good[g0:g1, g0:g1].all()
    im = res.image[g0:g1, g0:g1].astype(np.float64)
    pv = res.variance[g0:g1, g0:g1].astype(np.float64).mean()
    assert im.var() / pv == pytest.approx(1.0, abs=0.03)
    b = 12
    m = (im.shape[0] // b) * b
    sums = im[:m, :m].reshape(m // b, b, m // b, b).sum(axis=(1, 3))
    measured = sums.var() / (b * b * pv)
    assert res.covariance_factor == pytest.approx(measured, rel=0.06)
    assert 1.1 < res.covariance_factor < 1.6
    # and the factor is the large-scale variance sigma^2 * J over the propagated variance
    assert res.covariance_factor == pytest.approx(sigma2 * scale ** 2 / pv, rel=0.01)


def test_backends_agree():
    if not HAVE_NUMBA:
        pytest.skip("numba not installed")
    n = 300
    rng = np.random.default_rng(11)
    img = rng.normal(50.0, 3.0, (n, n)).astype(np.float32)
    var = rng.uniform(5.0, 15.0, (n, n)).astype(np.float32)
    msk = np.zeros((n, n), np.uint16)
    msk[rng.integers(0, n, 300), rng.integers(0, n, 300)] = maskbits.CR
    msk[100:104, :] |= maskbits.BLEED
    pm = affine_map(7.0, 0.93, (12.2, -8.7), (150.0, 150.0))
    a = warp_image(img, var, msk, pm, out_shape=(280, 310), backend="numpy", grid_step=64)
    b = warp_image(img, var, msk, pm, out_shape=(280, 310), backend="numba", grid_step=64)
    assert np.array_equal(a.mask, b.mask)
    assert np.allclose(a.image, b.image, rtol=2e-6, atol=1e-4)
    assert np.allclose(a.variance, b.variance, rtol=2e-6, atol=1e-5)
    assert a.covariance_factor == pytest.approx(b.covariance_factor, rel=1e-9)
    assert a.good_fraction == b.good_fraction


def test_pieces_with_out_origin_equal_whole():
    """A grid warped in row bands (out_origin) equals the whole warp bit for bit."""
    n = 200
    rng = np.random.default_rng(5)
    img = rng.normal(10.0, 1.0, (n, n)).astype(np.float32)
    var = np.ones_like(img)
    msk = np.zeros((n, n), np.uint16)
    msk[rng.integers(0, n, 50), rng.integers(0, n, 50)] = maskbits.CR
    pm = affine_map(3.0, 1.0, (0.2, 0.7), (100.0, 100.0))
    whole = warp_image(img, var, msk, pm, out_shape=(n, n), grid_step=32)
    parts = [warp_image(img, var, msk, pm, out_shape=(r1 - r0, n), grid_step=32,
                        out_origin=(0, r0)) for r0, r1 in [(0, 70), (70, 71), (71, 200)]]
    assert np.array_equal(whole.image, np.vstack([p.image for p in parts]))
    assert np.array_equal(whole.variance, np.vstack([p.variance for p in parts]))
    assert np.array_equal(whole.mask, np.vstack([p.mask for p in parts]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_inside_a_large_input_uses_only_the_pixels_it_needs(backend):
    """Warping from a large input equals warping from a sub-image around the mapped region
    (the input is cropped to what the kernels reach); an output off the input is all GAP."""
    rng = np.random.default_rng(9)
    big = rng.normal(100.0, 5.0, (400, 400)).astype(np.float32)
    var = rng.uniform(20.0, 30.0, (400, 400)).astype(np.float32)
    msk = np.zeros((400, 400), np.uint16)
    msk[rng.integers(0, 400, 400), rng.integers(0, 400, 400)] = maskbits.CR
    pm = affine_map(11.0, 0.96, (170.0, 150.0), (30.0, 30.0))
    whole = warp_image(big, var, msk, pm, out_shape=(60, 60), backend=backend, grid_step=16)
    sub = (slice(100, 260), slice(120, 280))

    def pm_sub(x, y):
        xi, yi = pm(x, y)
        return xi - 120.0, yi - 100.0

    part = warp_image(big[sub], var[sub], msk[sub], pm_sub, out_shape=(60, 60),
                      backend=backend, grid_step=16)
    assert (whole.mask != maskbits.GAP).all()
    assert np.array_equal(whole.mask, part.mask)
    assert np.allclose(whole.image, part.image, rtol=1e-6)
    assert np.allclose(whole.variance, part.variance, rtol=1e-6)
    far = warp_image(big, var, msk, affine_map(0.0, 1.0, (1000.0, 0.0), (0.0, 0.0)),
                     out_shape=(30, 30), backend=backend)
    assert (far.mask == maskbits.GAP).all() and (far.image == 0).all()
    assert far.good_fraction == 0.0 and np.isnan(far.covariance_factor)


def test_realistic_map_interpolation_error():
    """Bilinear interpolation between exact nodes every 128 px errs far below 0.01 px for a
    TAN -> sky -> TAN + distortion map."""
    pixel_map, origin = realistic_map()
    grid = PixelMapGrid(pixel_map, (4096, 4096), grid_step=128, out_origin=origin)
    y, x = np.mgrid[0:4096:9, 0:4096:9].astype(float)
    x += origin[0]
    y += origin[1]
    xe, ye = pixel_map(x, y)
    xa, ya = grid(x, y)
    dense = np.hypot(xa - xe, ya - ye).max()
    # the chip centre lands in the middle of the output
    xc, yc = pixel_map(np.array(origin[0] + 2048.0), np.array(origin[1] + 2048.0))
    assert abs(xc - 2400) < 50 and abs(yc - 2400) < 50  # distortion moves it ~12 px
    assert grid.max_error() < 2e-3  # measured 1.2e-3 px, 1/8 of the 0.01 px goal
    assert dense < 2e-3
    assert dense <= grid.max_error() * 1.05
    # Jacobian against finite differences of the exact map (h = 2 px)
    xs, ys = x[::17, ::17], y[::17, ::17]
    h = 2.0
    xpx, ypx = pixel_map(xs + h, ys)
    xmx, ymx = pixel_map(xs - h, ys)
    xpy, ypy = pixel_map(xs, ys + h)
    xmy, ymy = pixel_map(xs, ys - h)
    det = ((xpx - xmx) * (ypy - ymy) - (xpy - xmy) * (ypx - ymx)) / (2 * h) ** 2
    jac = grid.jacobian(xs, ys)
    assert np.allclose(jac, np.abs(det), rtol=1e-6)
    # about (0.25 / 0.258)^2, raised 0.5% by the distortion and projection
    assert np.allclose(jac, (0.25 / 0.258) ** 2, rtol=1e-2)


def test_bad_input_is_reported():
    img = np.zeros((10, 10), np.float32)
    ok = dict(out_shape=(10, 10))
    pm = affine_map(0.0, 1.0, (0, 0), (0, 0))
    with pytest.raises(ValueError, match="variance"):
        warp_image(img, np.zeros((10, 9), np.float32), np.zeros((10, 10), np.uint16), pm, **ok)
    with pytest.raises(ValueError, match="mask"):
        warp_image(img, img, np.zeros((9, 10), np.uint16), pm, **ok)
    with pytest.raises(ValueError, match="kernel"):
        warp_image(img, img, np.zeros((10, 10), np.uint16), pm, kernel="cubic", **ok)
    with pytest.raises(ValueError, match="out_shape"):
        warp_image(img, img, np.zeros((10, 10), np.uint16), pm, out_shape=(0, 5))
    with pytest.raises(ValueError, match="pixel_map returned shapes"):
        warp_image(img, img, np.zeros((10, 10), np.uint16), lambda x, y: (x[:1], y), **ok)
    with pytest.raises(TypeError, match="pixel_map"):
        warp_image(img, img, np.zeros((10, 10), np.uint16), "not a map", **ok)


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
def test_paste_warp_compiled_matches_numpy(monkeypatch):
    """Chips pasted into a skycell: the first good value wins, a bad one stays until a good
    one comes; the compiled paste gives the numpy one exactly."""
    from types import SimpleNamespace

    from ps1mpi.algorithms import warp as warpmod

    rng = np.random.default_rng(0)

    def skycell():
        return (np.zeros((60, 80), np.float32), np.zeros((60, 80), np.float32),
                np.full((60, 80), maskbits.GAP, np.uint16), np.full((60, 80), -1, np.int16),
                np.zeros((60, 80), bool))

    compiled, plain = skycell(), skycell()
    for k in range(5):
        m = rng.choice([0, 0, 0, maskbits.GAP, maskbits.SAT, maskbits.CR], size=(30, 40))
        res = SimpleNamespace(image=rng.normal(size=(30, 40)).astype(np.float32),
                              variance=rng.random((30, 40)).astype(np.float32),
                              mask=m.astype(np.uint16))
        origin = (int(rng.integers(0, 40)), int(rng.integers(0, 30)))
        kw = dict(scale=1.7, index=k, bad_bits=maskbits.BAD, gap_bit=maskbits.GAP)
        warpmod.paste_warp(*compiled, origin, res, **kw)
        monkeypatch.setattr(warpmod, "HAVE_NUMBA", False)
        warpmod.paste_warp(*plain, origin, res, **kw)
        monkeypatch.setattr(warpmod, "HAVE_NUMBA", True)
    for a, b in zip(compiled, plain):
        assert np.array_equal(a, b)
    img, var, msk, owner, good = plain
    assert good.sum() > 1000 and (owner >= 0).sum() > good.sum()  # bad pixels kept too
    assert np.all((msk[good] & maskbits.BAD) == 0)
    assert np.allclose(var[owner >= 0] >= 0, True)
