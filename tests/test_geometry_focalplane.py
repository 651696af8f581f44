"""Focal-plane model: projection, distortion, orientation, chip WCS, footprints."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

from ps1mpi.geometry.camera import load_camera
from ps1mpi.geometry.focalplane import (
    Distortion,
    FocalPlaneModel,
    angular_separation,
    gnomonic_forward,
    gnomonic_inverse,
)

MAS = 1.0 / 3.6e6  # degrees


@pytest.fixture(scope="module")
def gpc1():
    return load_camera("gpc1")


@pytest.fixture(scope="module")
def small_cam():
    return load_camera("testcam")


def _dist_for(cam):
    x0, x1, y0, y1 = cam.focal_plane_extent()
    return Distortion.gpc1_like(norm=0.5 * max(x1 - x0, y1 - y0))


def test_gnomonic_known_values():
    # 1 degree North / East of the tangent point on the equator
    xi, eta, cosc = gnomonic_forward([0.0, 1.0], [1.0, 0.0], 0.0, 0.0)
    np.testing.assert_allclose(eta[0], np.tan(np.radians(1.0)), rtol=1e-14)
    np.testing.assert_allclose(xi[1], np.tan(np.radians(1.0)), rtol=1e-14)
    assert xi[0] == 0 and eta[1] == 0 and np.all(cosc > 0)
    rng = np.random.default_rng(1)
    ra0, dec0 = 359.5, 60.0
    ra = ra0 + rng.uniform(-3, 3, 1000)
    dec = dec0 + rng.uniform(-2, 2, 1000)
    xi, eta, _ = gnomonic_forward(ra, dec, ra0, dec0)
    r2, d2 = gnomonic_inverse(xi, eta, ra0, dec0)
    assert np.max(angular_separation(ra, dec, r2, d2)) < 1e-6 * MAS
    assert np.all((r2 >= 0) & (r2 < 360))


def test_distortion_terms_and_radial():
    assert Distortion.terms(3) == [(2, 0), (1, 1), (0, 2), (3, 0), (2, 1), (1, 2), (0, 3)]
    d = Distortion.gpc1_like(amplitude=3.0, norm=20000.0)
    dX, dY = d.offsets([20000.0, 0.0, 0.0], [0.0, -20000.0, 0.0])
    np.testing.assert_allclose(dX, [3.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(dY, [0.0, -3.0, 0.0], atol=1e-12)
    # radial: displacement along the radius, |d| = 3 (r/norm)^3
    ang = np.radians(37.0)
    X, Y = 28000 * np.cos(ang), 28000 * np.sin(ang)
    dX, dY = d.offsets(X, Y)
    np.testing.assert_allclose(np.hypot(dX, dY), 3.0 * 1.4 ** 3, rtol=1e-12)
    np.testing.assert_allclose(np.arctan2(dY, dX), ang, atol=1e-12)
    d5 = Distortion.radial(2.0, k5=-1.0, norm=1000.0)
    dX, dY = d5.offsets(0.0, 2000.0)
    # at rn = 2: dY = k3 rn^3 + k5 rn^5 = 2*8 - 1*32
    np.testing.assert_allclose([dX, dY], [0.0, -16.0], atol=1e-9)
    assert Distortion.none().is_zero
    with pytest.raises(ValueError, match="needs 7 coefficients"):
        Distortion(3, [1.0, 2.0], [0.0, 0.0])


def test_distortion_jacobian_and_inverse():
    rng = np.random.default_rng(2)
    d = Distortion(3, rng.normal(0, 2, 7), rng.normal(0, 2, 7), norm=20000.0)
    X = rng.uniform(-25000, 25000, 200)
    Y = rng.uniform(-25000, 25000, 200)
    a, b, c, e = d.jacobian(X, Y)
    h = 1e-3
    P1, Q1 = d.apply(X + h, Y)
    P0, Q0 = d.apply(X - h, Y)
    np.testing.assert_allclose(a, (P1 - P0) / (2 * h), atol=1e-8)
    np.testing.assert_allclose(c, (Q1 - Q0) / (2 * h), atol=1e-8)
    P1, Q1 = d.apply(X, Y + h)
    P0, Q0 = d.apply(X, Y - h)
    np.testing.assert_allclose(b, (P1 - P0) / (2 * h), atol=1e-8)
    np.testing.assert_allclose(e, (Q1 - Q0) / (2 * h), atol=1e-8)
    P, Q = d.apply(X, Y)
    X2, Y2 = d.invert(P, Q)
    np.testing.assert_allclose(X2, X, atol=1e-8)
    np.testing.assert_allclose(Y2, Y, atol=1e-8)


def test_distortion_fit_recovers_truth():
    rng = np.random.default_rng(3)
    truth = Distortion(3, rng.normal(0, 3, 7), rng.normal(0, 3, 7), norm=20000.0)
    X = rng.uniform(-20000, 20000, 500)
    Y = rng.uniform(-20000, 20000, 500)
    P, Q = truth.apply(X, Y)
    fit = Distortion.fit(X, Y, P, Q, order=3, norm=20000.0)
    np.testing.assert_allclose(fit.coeffs_x, truth.coeffs_x, atol=1e-8)
    np.testing.assert_allclose(fit.coeffs_y, truth.coeffs_y, atol=1e-8)
    A = truth.design_matrix(X / 2e4, Y / 2e4)
    assert A.shape == (500, 7)
    np.testing.assert_allclose(A @ np.array(truth.coeffs_x), P - X, atol=1e-9)
    assert Distortion.from_dict(truth.to_dict()) == truth


def test_orientation_parity_and_scale():
    m = FocalPlaneModel(150.0, 20.0, 0.0, 0.258)
    ra, dec = m.focal_to_sky([0.0, 0.0, 1000.0], [0.0, 1000.0, 0.0])
    assert ra[0] == pytest.approx(150.0) and dec[0] == pytest.approx(20.0)
    assert dec[1] > 20.0 and abs(ra[1] - 150.0) < 1e-9          # +Y is North at PA 0
    assert ra[2] < 150.0 and abs(dec[2] - 20.0) < 1e-4          # +X is West: East left
    sep = angular_separation(150.0, 20.0, ra[1:], dec[1:]) * 3600
    np.testing.assert_allclose(sep, np.degrees(np.arctan(np.radians(258.0 / 3600))) * 3600,
                               rtol=1e-12)
    m90 = FocalPlaneModel(150.0, 20.0, 90.0, 0.258)
    ra, dec = m90.focal_to_sky([0.0, 1000.0], [1000.0, 0.0])
    assert ra[0] > 150.0 and abs(dec[0] - 20.0) < 1e-4          # PA 90: +Y points East
    assert dec[1] > 20.0                                         # and +X North
    # parity: a counter-clockwise triangle in (X, Y) is clockwise on the sky (East left)
    ra, dec = m.focal_to_sky([0.0, 1000.0, 0.0], [0.0, 0.0, 1000.0])
    xi, eta, _ = gnomonic_forward(ra, dec, 150.0, 20.0)
    assert (xi[1] - xi[0]) * (eta[2] - eta[0]) - (xi[2] - xi[0]) * (eta[1] - eta[0]) < 0


@pytest.mark.parametrize("camname", ["gpc1", "testcam"])
def test_pixel_sky_round_trip_every_chip(camname):
    cam = load_camera(camname)
    rng = np.random.default_rng(4)
    dist = _dist_for(cam)
    for ra0, dec0, pa in ((0.05, 1.0, 33.0), (200.0, -28.0, 271.0), (45.0, 88.5, 130.0)):
        m = FocalPlaneModel(ra0, dec0, pa, cam.pixel_scale, dist)
        for chip in cam.chip_names:
            x = rng.uniform(-0.5, cam.chip_nx - 0.5, 200)
            y = rng.uniform(-0.5, cam.chip_ny - 0.5, 200)
            ra, dec = m.pixel_to_sky(cam, chip, x, y)
            x2, y2 = m.sky_to_pixel(cam, chip, ra, dec)
            assert np.max(np.abs(x2 - x)) < 1e-3 and np.max(np.abs(y2 - y)) < 1e-3, chip
    # the distortion is really applied: a few pixels at the GPC1 field edge
    if camname == "gpc1":
        m0 = FocalPlaneModel(10.0, 10.0, 0.0, cam.pixel_scale)
        m1 = FocalPlaneModel(10.0, 10.0, 0.0, cam.pixel_scale, dist)
        # outer corner of XY76: r = 25055 px = 1.225 norm -> 3 * 1.225^3 = 5.5 px
        r0, d0 = m0.pixel_to_sky(cam, "XY76", 4845.0, 4867.0)
        r1, d1 = m1.pixel_to_sky(cam, "XY76", 4845.0, 4867.0)
        shift_px = angular_separation(r0, d0, r1, d1) * 3600 / cam.pixel_scale
        assert shift_px == pytest.approx(5.5, abs=0.1)


@pytest.mark.parametrize("camname,chips", [("gpc1", ["XY01", "XY33", "XY44", "XY76"]),
                                           ("testcam", ["XY00", "XY11"])])
def test_chip_wcs_matches_model(camname, chips):
    cam = load_camera(camname)
    m = FocalPlaneModel(359.9, 45.0, 17.0, cam.pixel_scale, _dist_for(cam))
    rng = np.random.default_rng(5)
    for chip in chips:
        w = m.chip_wcs(cam, chip)
        x = rng.uniform(-0.5, cam.chip_nx - 0.5, 2000)
        y = rng.uniform(-0.5, cam.chip_ny - 0.5, 2000)
        ra, dec = m.pixel_to_sky(cam, chip, x, y)
        w2 = WCS(w.to_header(relax=True))             # as written into a FITS header
        for ww in (w, w2):
            r2, d2 = ww.all_pix2world(x, y, 0)
            assert np.max(angular_separation(ra, dec, r2, d2)) < 1 * MAS
            x2, y2 = ww.all_world2pix(ra, dec, 0)
            assert np.max(np.hypot(x2 - x, y2 - y)) < 1e-3
        # inverse polynomials AP/BP on their own
        px, py = w.wcs_world2pix(ra, dec, 0)
        U, V = px - (w.wcs.crpix[0] - 1), py - (w.wcs.crpix[1] - 1)
        u, v = U.copy(), V.copy()
        for i in range(w.sip.ap.shape[0]):
            for j in range(w.sip.ap.shape[1]):
                u += w.sip.ap[i, j] * U ** i * V ** j
                v += w.sip.bp[i, j] * U ** i * V ** j
        assert np.max(np.abs(u + w.wcs.crpix[0] - 1 - x)) < 1e-3
        assert np.max(np.abs(v + w.wcs.crpix[1] - 1 - y)) < 1e-3
    with pytest.raises(ValueError, match="sip_order"):
        m.chip_wcs(cam, chips[0], sip_order=1)


def test_footprints(gpc1, small_cam):
    for cam in (gpc1, small_cam):
        m = FocalPlaneModel(0.2, -10.0, 61.0, cam.pixel_scale, _dist_for(cam))
        fr, fd = m.exposure_footprint(cam)
        fx, fy, _ = gnomonic_forward(fr, fd, m.ra, m.dec)
        for chip in cam.chip_names:
            r, d = m.chip_footprint(cam, chip)
            r2, d2 = m.pixel_to_sky(cam, chip, [-0.5, cam.chip_nx - 0.5], [-0.5, -0.5])
            np.testing.assert_allclose(r[:2], r2)
            np.testing.assert_allclose(d[:2], d2)
            # every chip corner lies inside the exposure polygon
            px, py, _ = gnomonic_forward(r, d, m.ra, m.dec)
            X2, Y2 = np.roll(fx, -1), np.roll(fy, -1)
            cond = (fy > py[:, None]) != (Y2 > py[:, None])
            xint = fx + (py[:, None] - fy) * (X2 - fx) / (Y2 - fy + (Y2 == fy))
            inside = np.count_nonzero(cond & (px[:, None] < xint), axis=1) % 2 == 1
            assert np.all(inside), chip
        # the polygon is not much larger than the focal plane (GPC1: ~3.3 deg across)
        width = 2 * np.max(angular_separation(m.ra, m.dec, fr, fd))
        x0, x1, y0, y1 = cam.focal_plane_extent()
        diag = np.hypot(x1 - x0, y1 - y0) * cam.pixel_scale / 3600
        assert width < diag * 1.05   # chips grown by half the inter-chip gap


def test_model_validation_and_dict():
    with pytest.raises(ValueError, match="dec"):
        FocalPlaneModel(10.0, 95.0)
    with pytest.raises(ValueError, match="scale"):
        FocalPlaneModel(10.0, 5.0, 0.0, -1.0)
    m = FocalPlaneModel(370.0, 5.0, 10.0, 0.26, Distortion.gpc1_like())
    assert m.ra == pytest.approx(10.0)
    assert FocalPlaneModel.from_dict(m.to_dict()) == m
    with pytest.raises(ValueError, match="90 degrees"):
        m.sky_to_focal(190.0, -5.0)
