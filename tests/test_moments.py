"""Moments, Kron, aperture and Petrosian measurements against analytic truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import erf

from ps1mpi.algorithms import maskbits
from ps1mpi.algorithms.moments import (RADIAL_APERTURE_RADII, aperture_photometry,
                                       centroid_moments, circle_pixel_overlap,
                                       deconvolve_window, kron_photometry, measure_sources,
                                       petrosian, radial_apertures)


def gaussian_integrated(shape, x0, y0, flux, sigma):
    """Circular Gaussian integrated over every pixel (exact)."""
    ny, nx = shape
    gx = np.arange(nx)
    gy = np.arange(ny)
    s = np.sqrt(2.0) * sigma
    ex = 0.5 * (erf((gx + 0.5 - x0) / s) - erf((gx - 0.5 - x0) / s))
    ey = 0.5 * (erf((gy + 0.5 - y0) / s) - erf((gy - 0.5 - y0) / s))
    return flux * np.outer(ey, ex)


def gaussian_sampled(shape, x0, y0, flux, cov):
    """Elliptical Gaussian with covariance ``cov`` sampled at pixel centres."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    dx, dy = xx - x0, yy - y0
    inv = np.linalg.inv(cov)
    q = inv[0, 0] * dx * dx + 2 * inv[0, 1] * dx * dy + inv[1, 1] * dy * dy
    return flux * np.exp(-0.5 * q) / (2 * np.pi * np.sqrt(np.linalg.det(cov)))


def test_circle_pixel_overlap_is_exact():
    dx, dy = np.meshgrid(np.arange(-12, 13) - 0.3, np.arange(-12, 13) + 0.2)
    for r in (0.3, 1.0, 4.16, 7.3, 11.0):
        assert circle_pixel_overlap(dx, dy, r).sum() == pytest.approx(np.pi * r * r, rel=1e-12)
    # a small circle inside one pixel, and a pixel cut in half by a large circle
    assert circle_pixel_overlap(0.1, -0.2, 0.25) == pytest.approx(np.pi * 0.0625, rel=1e-12)
    # a huge circle through the pixel centre: half, less the sagitta term ~1/(12 R)
    assert circle_pixel_overlap(1000.0, 0.0, 1000.0) == pytest.approx(0.5 - 1 / 24000, abs=2e-6)
    a = circle_pixel_overlap(dx, dy, 5.0)
    assert np.all((a >= 0) & (a <= 1 + 1e-12))


def test_compiled_circle_overlap_matches_numpy():
    from ps1mpi.algorithms import moments
    rng = np.random.default_rng(3)
    dx, dy = rng.uniform(-9, 9, (2, 40, 40))
    r = rng.uniform(0.05, 8.0, (40, 1))
    ref = moments._circle_pixel_overlap_np(dx, dy, np.broadcast_to(r, dx.shape))
    assert np.abs(circle_pixel_overlap(dx, dy, r) - ref).max() < 1e-12
    assert ref.sum() > 100  # the draws do overlap the discs


@pytest.mark.parametrize("x0,y0", [(40.0, 40.0), (40.37, 39.71), (40.5, 40.5)])
def test_aperture_flux_of_noiseless_gaussian_matches_analytic(x0, y0):
    sigma, flux = 2.5, 1000.0
    img = gaussian_integrated((81, 81), x0, y0, flux, sigma)
    var = np.ones_like(img)
    radii = np.array([1.5, 2.0, 3.0, 5.0, 8.0]) * sigma
    ap = aperture_photometry(img, var, None, [x0], [y0], radii)
    truth = flux * (1.0 - np.exp(-radii ** 2 / (2 * sigma ** 2)))
    assert np.allclose(ap.flux[0] / truth, 1.0, atol=1e-3)
    assert np.all(ap.masked_frac == 0)
    # for unit variance the flux variance is the sum of the squared pixel weights
    yy, xx = np.mgrid[0:81, 0:81]
    w2 = [np.sum(circle_pixel_overlap(xx - x0, yy - y0, r) ** 2) for r in radii]
    assert np.allclose(ap.flux_err[0] ** 2, w2, rtol=1e-9)


def test_aperture_errors_match_noise_realisations():
    rng = np.random.default_rng(0)
    n, nreal = 51, 400
    base = gaussian_integrated((n, n), 25.37, 24.81, 2000.0, 2.0)
    var = np.full((n, n), 25.0)
    radii = [2.5, 5.0, 9.0]
    fluxes, errs = [], []
    for k in range(nreal):
        img = base + rng.normal(0.0, 5.0, (n, n))
        ap = aperture_photometry(img, var, None, [25.37], [24.81], radii)
        fluxes.append(ap.flux[0])
        errs.append(ap.flux_err[0])
    ratio = np.std(fluxes, axis=0) / np.mean(errs, axis=0)
    assert np.all(np.abs(ratio - 1.0) < 0.1)


def test_masked_fraction_and_masked_pixels_left_out():
    img = np.full((61, 61), 2.0)
    var = np.ones_like(img)
    mask = np.zeros(img.shape, np.uint16)
    mask[:, 31:] = maskbits.CR
    img[:, 31:] = 1e6                           # masked garbage must not enter
    ap = aperture_photometry(img, var, mask, [30.5], [30.0], [10.0])
    assert ap.masked_frac[0, 0] == pytest.approx(0.5, abs=1e-12)
    assert ap.flux[0, 0] == pytest.approx(2.0 * 0.5 * np.pi * 100.0, rel=1e-9)
    # off the image counts as masked
    ap2 = aperture_photometry(img, var, None, [0.0 - 0.5], [30.0], [10.0])
    assert ap2.masked_frac[0, 0] == pytest.approx(0.5, abs=1e-12)


def test_radial_apertures_follow_the_curve_of_growth():
    sigma, flux = 3.0, 5000.0
    img = gaussian_integrated((401, 401), 200.2, 199.6, flux, sigma)
    ap = radial_apertures(img, np.ones_like(img), None, [200.2], [199.6])
    r = RADIAL_APERTURE_RADII
    truth = flux * (1.0 - np.exp(-r ** 2 / (2 * sigma ** 2)))
    assert ap.flux.shape == (1, 9)
    assert np.allclose(ap.flux[0], truth, rtol=1e-3)
    assert np.all(np.diff(ap.flux_err[0]) > 0)


def test_windowed_moments_of_an_elliptical_gaussian():
    # covariance with sigma_major 3.2, sigma_minor 2.0 at 30 degrees
    th = np.deg2rad(30.0)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    cov = rot @ np.diag([3.2 ** 2, 2.0 ** 2]) @ rot.T
    x0, y0 = 40.31, 39.62
    img = gaussian_sampled((81, 81), x0, y0, 1e4, cov)
    w = 2.5
    m = centroid_moments(img, np.full(img.shape, 1e-4), None, [41.0], [39.0], sigma=w,
                         radius=6 * w)
    assert m["X_MOMENTS"][0] == pytest.approx(x0, abs=2e-3)
    assert m["Y_MOMENTS"][0] == pytest.approx(y0, abs=2e-3)
    expect = np.linalg.inv(np.linalg.inv(cov) + np.eye(2) / w ** 2)
    assert m["MOMENTS_XX"][0] == pytest.approx(expect[0, 0], rel=5e-3)
    assert m["MOMENTS_YY"][0] == pytest.approx(expect[1, 1], rel=5e-3)
    assert m["MOMENTS_XY"][0] == pytest.approx(expect[0, 1], rel=5e-3)
    cxx, cxy, cyy = deconvolve_window(m["MOMENTS_XX"], m["MOMENTS_XY"], m["MOMENTS_YY"], w)
    assert np.allclose([cxx[0], cxy[0], cyy[0]], [cov[0, 0], cov[0, 1], cov[1, 1]], rtol=0.02)
    # with the default window radius (4 sigma) the moments stay within 2%
    d = centroid_moments(img, np.full(img.shape, 1e-4), None, [x0], [y0], sigma=w)
    assert d["MOMENTS_XX"][0] == pytest.approx(expect[0, 0], rel=0.02)
    assert d["MOMENTS_FLAGS"][0] == 0


def test_centroid_errors_match_noise_realisations():
    rng = np.random.default_rng(1)
    n = 41
    base = gaussian_integrated((n, n), 20.37, 19.81, 2000.0, 2.0)
    var = np.full((n, n), 25.0)
    xs, es = [], []
    for _ in range(300):
        m = centroid_moments(base + rng.normal(0, 5.0, (n, n)), var, None, [20.0], [20.0],
                             sigma=2.0)
        xs.append(m["X_MOMENTS"][0])
        es.append(m["X_MOMENTS_ERR"][0])
    assert np.mean(xs) == pytest.approx(20.37, abs=0.01)
    assert np.std(xs) / np.mean(es) == pytest.approx(1.0, abs=0.12)


def test_kron_flux_and_radius_of_a_gaussian():
    sigma, flux = 2.5, 1e4
    img = gaussian_integrated((101, 101), 50.3, 49.6, flux, sigma)
    var = np.full(img.shape, 1e-2)
    k = kron_photometry(img, var, None, [50.3], [49.6], sigma=sigma, sky_sigma=0.1)
    # R1 of a Gaussian is sqrt(pi/2) sigma; measured after smoothing by the 1.7-pixel
    # kernel cut at 2 sigma (radius 3 pixels), whose variance is computed here
    t = np.arange(-3, 4)
    kern = np.exp(-t ** 2 / (2 * 1.7 ** 2))
    kvar = (t ** 2 * kern).sum() / kern.sum()
    r1 = np.sqrt(np.pi / 2) * np.sqrt(sigma ** 2 + 1 / 12 + kvar)
    assert k["MOMENTS_R1"][0] == pytest.approx(r1, rel=0.02)
    assert k["KRON_RADIUS"][0] == pytest.approx(2.5 * k["MOMENTS_R1"][0])
    frac = k["KRON_FLUX"][0] / flux
    expect = 1.0 - np.exp(-(2.5 * k["MOMENTS_R1"][0]) ** 2 / (2 * sigma ** 2))
    assert frac > 0.9
    assert frac == pytest.approx(expect, abs=1e-3)
    assert k["KRON_FLAGS"][0] == 0


def test_kron_flux_of_an_exponential_disc_captures_most_of_the_light():
    n = 201
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    h = 4.0                                     # scale length (pixels)
    r = np.hypot(xx - 100.2, yy - 99.7)
    img = 2e5 * np.exp(-r / h) / (2 * np.pi * h * h)
    total = img.sum()
    var = np.full(img.shape, 1e-2)
    k = kron_photometry(img, var, None, [100.2], [99.7], sigma=2.0, sky_sigma=0.1)
    # the first radial moment of an exponential is 2 h; 2.5 R1 = 5 h holds 96% of the light
    assert k["MOMENTS_R1"][0] == pytest.approx(2 * h, rel=0.1)
    assert 0.9 < k["KRON_FLUX"][0] / total < 1.0


def test_petrosian_of_a_gaussian():
    sigma, flux = 3.0, 1e4
    x0, y0 = 100.4, 99.8
    img = gaussian_integrated((201, 201), x0, y0, flux, sigma)
    p = petrosian(img, np.full(img.shape, 1e-6), None, [x0], [y0])
    # the continuous Petrosian radius at ratio 0.1 solves u / (e^u - 1) = 0.1, r^2 = 2 u s^2
    from scipy.optimize import brentq
    u = brentq(lambda v: v / np.expm1(v) - 0.1, 1.0, 10.0)
    s_eff = np.sqrt(sigma ** 2 + 1 / 12)
    assert p["PETRO_RADIUS"][0] == pytest.approx(np.sqrt(2 * u) * s_eff, rel=0.06)
    assert p["PETRO_FLUX"][0] == pytest.approx(flux, rel=1e-3)
    assert p["PETRO_R50"][0] == pytest.approx(np.sqrt(2 * np.log(2)) * s_eff, rel=0.03)
    assert p["PETRO_R90"][0] == pytest.approx(np.sqrt(2 * np.log(10)) * s_eff, rel=0.03)
    assert p["PETRO_FILL"][0] == pytest.approx(1.0)
    assert p["PETRO_FLAGS"][0] == 0
    # a wider source has a proportionally larger Petrosian radius
    img2 = gaussian_integrated((201, 201), x0, y0, flux, 2 * sigma)
    p2 = petrosian(img2, np.full(img.shape, 1e-6), None, [x0], [y0])
    assert p2["PETRO_RADIUS"][0] / p["PETRO_RADIUS"][0] == pytest.approx(2.0, rel=0.05)


def test_measure_sources_combines_the_measurements():
    rng = np.random.default_rng(3)
    img = np.zeros((120, 160))
    pos = [(30.2, 40.7, 5000.0), (120.6, 80.1, 20000.0)]
    for x, y, f in pos:
        img += gaussian_integrated(img.shape, x, y, f, 2.0)
    img += rng.normal(0, 3.0, img.shape)
    var = np.full(img.shape, 9.0)
    out = measure_sources(img, var, None, [30.0, 121.0], [41.0, 80.0], psf_sigma=2.0,
                          sky_sigma=3.0)
    for name in ("X_MOMENTS", "MOMENTS_XX", "MOMENTS_R1", "KRON_FLUX", "AP_FLUX",
                 "AP_FLUX_ERR", "AP_MASKED_FRAC"):
        assert name in out.dtype.names
    assert np.allclose(out["X_MOMENTS"], [30.2, 120.6], atol=0.05)
    assert np.allclose(out["AP_RADIUS"], 9.0)
    frac = 1.0 - np.exp(-81.0 / 8.0)
    assert np.allclose(out["AP_FLUX"], np.array([5000.0, 20000.0]) * frac,
                       atol=4 * out["AP_FLUX_ERR"])


def test_bad_inputs_are_named():
    img = np.zeros((20, 20))
    with pytest.raises(ValueError, match="variance shape"):
        aperture_photometry(img, np.ones((5, 5)), None, [1.0], [1.0], 2.0)
    with pytest.raises(ValueError, match="finite"):
        centroid_moments(img, np.ones_like(img), None, [np.nan], [1.0], sigma=1.0)
    with pytest.raises(ValueError, match="radii"):
        aperture_photometry(img, np.ones_like(img), None, [1.0], [1.0], -2.0)
    with pytest.raises(ValueError, match="sigma"):
        kron_photometry(img, np.ones_like(img), None, [1.0], [1.0], sigma=0.0)
