"""Astrometric calibration of whole exposures against constructed truth."""

from __future__ import annotations

import numpy as np
import pytest

from ps1mpi.algorithms.astrometry import (AstrometrySolution, ChipTerms, mjd_to_julian_year,
                                          propagate_proper_motion, solve_exposure_astrometry)
from ps1mpi.geometry.camera import load_camera
from ps1mpi.geometry.focalplane import Distortion, FocalPlaneModel, gnomonic_inverse

MJD = 60310.0          # 2024-01-01


def sky_err_mas(ra1, dec1, ra2, dec2):
    dra = ((np.asarray(ra2) - ra1 + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec1))
    return np.hypot(dra, np.asarray(dec2) - dec1) * 3.6e6


def offset_pointing(model, east_arcmin, north_arcmin):
    ra, dec = gnomonic_inverse(np.radians(east_arcmin / 60.0), np.radians(north_arcmin / 60.0),
                               model.ra, model.dec)
    return float(ra), float(dec)


def make_exposure(cam, truth, *, rng, n_ref, noise=0.0, chip_terms=None, pad_arcmin=7.0,
                  pm_sigma=0.0, ref_epoch=2015.5, n_spurious=0):
    """Reference catalog over a padded field and the detections the camera would make.

    Detections are the reference stars that fall on a chip, at their true positions (proper
    motions applied to the exposure epoch), seen through ``truth`` and ``chip_terms``.
    """
    xmin, xmax, ymin, ymax = cam.focal_plane_extent()
    pad = pad_arcmin * 60.0 / truth.scale
    Xr = rng.uniform(xmin - pad, xmax + pad, n_ref)
    Yr = rng.uniform(ymin - pad, ymax + pad, n_ref)
    ra_now, dec_now = truth.focal_to_sky(Xr, Yr)
    pmra = rng.normal(0, pm_sigma, n_ref) if pm_sigma else np.zeros(n_ref)
    pmdec = rng.normal(0, pm_sigma, n_ref) if pm_sigma else np.zeros(n_ref)
    years = mjd_to_julian_year(MJD) - ref_epoch
    ra_ref, dec_ref = propagate_proper_motion(ra_now, dec_now, pmra, pmdec, -years)
    mag = rng.uniform(14.0, 21.0, n_ref)
    ref = {"ra": ra_ref, "dec": dec_ref, "pmra": pmra, "pmdec": pmdec,
           "epoch": np.full(n_ref, ref_epoch), "r": mag}
    terms = chip_terms or {}
    chips = np.full(n_ref, "", dtype="<U4")
    x = np.full(n_ref, np.nan)
    y = np.full(n_ref, np.nan)
    for c in cam.chip_names:
        t = terms.get(c)
        Xn, Yn = (Xr, Yr) if t is None else t.invert(Xr, Yr)
        xx, yy = cam.focal_to_chip(c, Xn, Yn)
        on = (xx >= 0) & (xx <= cam.chip_nx - 1) & (yy >= 0) & (yy <= cam.chip_ny - 1)
        chips[on], x[on], y[on] = c, xx[on], yy[on]
    on = chips != ""
    det = {"chip": chips[on], "x": x[on] + rng.normal(0, noise, on.sum()),
           "y": y[on] + rng.normal(0, noise, on.sum()),
           "x_err": np.full(on.sum(), max(noise, 0.01)),
           "y_err": np.full(on.sum(), max(noise, 0.01)),
           "mag": mag[on] - 25.0 + rng.normal(0, 0.05, on.sum()),
           "flags": np.zeros(on.sum(), np.int32)}
    if n_spurious:
        c = rng.choice(cam.chip_names, n_spurious)
        extra = {"chip": c, "x": rng.uniform(0, cam.chip_nx - 1, n_spurious),
                 "y": rng.uniform(0, cam.chip_ny - 1, n_spurious),
                 "x_err": np.full(n_spurious, 0.05), "y_err": np.full(n_spurious, 0.05),
                 "mag": rng.uniform(-11, -4, n_spurious), "flags": np.zeros(n_spurious, np.int32)}
        det = {k: np.concatenate([det[k], extra[k]]) for k in det}
    return det, ref


def max_chip_error(sol, truth, cam, terms=None, *, use_wcs=False, rms=False):
    """Largest (or RMS) sky distance between solution and truth on a grid over every chip."""
    errs = []
    for c in cam.chip_names:
        gx, gy = np.meshgrid(np.linspace(0, cam.chip_nx - 1, 7), np.linspace(0, cam.chip_ny - 1, 7))
        X, Y = cam.chip_to_focal(c, gx.ravel(), gy.ravel())
        if terms and c in terms:
            X, Y = terms[c].apply(X, Y)
        r1, d1 = truth.focal_to_sky(X, Y)
        if use_wcs:
            r2, d2 = sol.chip_wcs(c).all_pix2world(gx.ravel(), gy.ravel(), 0)
        else:
            r2, d2 = sol.pixel_to_sky(c, gx.ravel(), gy.ravel())
        errs.append(sky_err_mas(r1, d1, r2, d2))
    errs = np.concatenate(errs)
    return float(np.sqrt(np.mean(errs ** 2))) if rms else float(errs.max())


@pytest.fixture(scope="module")
def small_cam():
    return load_camera("testcam")


def test_proper_motion_propagation():
    # 100 mas/yr due North for 10 years: 1 arcsec in Dec, RA unchanged
    ra, dec = propagate_proper_motion(np.array([10.0]), np.array([20.0]), np.array([0.0]),
                                      np.array([100.0]), 10.0)
    assert ra[0] == pytest.approx(10.0, abs=1e-12)
    assert (dec[0] - 20.0) * 3.6e6 == pytest.approx(1000.0, abs=1e-3)
    # East motion includes cos(dec): 1 arcsec on the sky at dec 60 is 2 arcsec of RA
    ra, dec = propagate_proper_motion(np.array([10.0]), np.array([60.0]), np.array([100.0]),
                                      np.array([0.0]), 10.0)
    assert (ra[0] - 10.0) * 3.6e6 == pytest.approx(2000.0, rel=1e-6)
    # at the pole the motion is still a 1-arcsec displacement
    ra, dec = propagate_proper_motion(np.array([0.0]), np.array([90.0]), np.array([0.0]),
                                      np.array([100.0]), 10.0)
    assert (90.0 - dec[0]) * 3.6e6 == pytest.approx(1000.0, rel=1e-6)
    assert mjd_to_julian_year(51544.5) == 2000.0


def test_match_survives_pointing_and_rotation_errors_noise_free(small_cam):
    """5 arcmin pointing error and 0.5 deg rotation; the distortion polynomial is recovered."""
    rng = np.random.default_rng(1)
    dist = Distortion.gpc1_like(amplitude=3.0, norm=837.0)
    truth = FocalPlaneModel(150.0, 30.0, 12.0, 0.2581, dist)
    det, ref = make_exposure(small_cam, truth, rng=rng, n_ref=2500)
    ra_g, dec_g = offset_pointing(truth, 3.0, -4.0)          # 5 arcmin away
    sol = solve_exposure_astrometry(det, ref, camera=small_cam, guess=(ra_g, dec_g, 12.5),
                                    mjd=MJD, filter="r", sys_floor_px=0.0)
    assert sol.success, sol.reason
    assert sol.pattern.success and abs(np.degrees(sol.pattern.rotation) + 0.5) < 0.1
    assert sol.n_matched == len(det["x"])
    assert sky_err_mas(truth.ra, truth.dec, sol.model.ra, sol.model.dec) < 0.01
    assert sol.model.pa == pytest.approx(12.0, abs=1e-8)
    assert sol.model.scale == pytest.approx(0.2581, rel=1e-9)
    np.testing.assert_allclose(sol.model.distortion.coeffs_x, dist.coeffs_x, atol=1e-5)
    np.testing.assert_allclose(sol.model.distortion.coeffs_y, dist.coeffs_y, atol=1e-5)
    assert sol.rms_mas[2] < 5.0
    assert max_chip_error(sol, truth, small_cam) < 5.0
    assert max_chip_error(sol, truth, small_cam, use_wcs=True) < 5.0


def test_rms_consistent_with_noise_and_proper_motions(small_cam):
    rng = np.random.default_rng(2)
    truth = FocalPlaneModel(210.0, 55.0, -33.0, 0.2579,
                            Distortion.gpc1_like(amplitude=2.0, norm=837.0))
    noise = 0.06                                            # px -> 15.5 mas per axis
    det, ref = make_exposure(small_cam, truth, rng=rng, n_ref=6000, noise=noise, pm_sigma=40.0)
    ra_g, dec_g = offset_pointing(truth, -2.0, 1.5)
    sol = solve_exposure_astrometry(det, ref, camera=small_cam, guess=(ra_g, dec_g, -33.8),
                                    mjd=MJD, sys_floor_px=0.0)
    assert sol.success, sol.reason
    expected = noise * truth.scale * 1000.0
    assert sol.rms_mas[0] == pytest.approx(expected, rel=0.12)
    assert sol.rms_mas[1] == pytest.approx(expected, rel=0.12)
    # the fitted model (30 parameters from ~600 stars) is far better than one measurement
    assert max_chip_error(sol, truth, small_cam, rms=True) < 0.4 * expected
    assert max_chip_error(sol, truth, small_cam) < expected
    # without moving the reference stars (~0.35" after 8.5 yr) the fit is visibly worse
    ref_static = dict(ref, pmra=np.zeros_like(ref["pmra"]), pmdec=np.zeros_like(ref["pmdec"]))
    bad = solve_exposure_astrometry(det, ref_static, camera=small_cam, guess=(ra_g, dec_g, -33.8),
                                    mjd=MJD, sys_floor_px=0.0, max_rms_mas=1e4)
    assert bad.rms_mas[2] > 10 * sol.rms_mas[2]


def test_chip_terms_and_chip_wcs_agree_with_truth(small_cam):
    rng = np.random.default_rng(3)
    truth = FocalPlaneModel(30.0, -10.0, 95.0, 0.2582,
                            Distortion.gpc1_like(amplitude=2.0, norm=837.0))
    true_terms = {}
    for k, c in enumerate(small_cam.chip_names):
        xc, yc = small_cam.chip_to_focal(c, 0.5 * (small_cam.chip_nx - 1), 0.5 * (small_cam.chip_ny - 1))
        true_terms[c] = ChipTerms(dx=[1.5, -2.0, 0.7, -0.2][k], dy=[-1.0, 0.5, 2.2, -1.7][k],
                                  rot=[3e-4, -2e-4, -4e-4, 3e-4][k], xc=float(xc), yc=float(yc))
    det, ref = make_exposure(small_cam, truth, rng=rng, n_ref=6000, chip_terms=true_terms)
    ra_g, dec_g = offset_pointing(truth, 1.0, 2.0)
    sol = solve_exposure_astrometry(det, ref, camera=small_cam, guess=(ra_g, dec_g, 95.3),
                                    mjd=MJD, sys_floor_px=0.0)
    assert sol.success, sol.reason
    # chip terms are defined up to what the shared model absorbs: compare positions, and
    # the relative chip offsets and rotations
    assert max_chip_error(sol, truth, small_cam, true_terms) < 2.0
    assert max_chip_error(sol, truth, small_cam, true_terms, use_wcs=True) < 2.0
    names = small_cam.chip_names
    rot_fit = np.array([sol.chip_offsets[c].rot for c in names])
    rot_true = np.array([true_terms[c].rot for c in names])
    np.testing.assert_allclose(rot_fit - rot_fit.mean(), rot_true - rot_true.mean(), atol=2e-6)
    # sky_to_pixel inverts pixel_to_sky with the chip terms
    ra, dec = sol.pixel_to_sky("XY10", np.array([10.0, 400.0]), np.array([20.0, 700.0]))
    x, y = sol.sky_to_pixel("XY10", ra, dec)
    np.testing.assert_allclose(x, [10.0, 400.0], atol=1e-6)
    np.testing.assert_allclose(y, [20.0, 700.0], atol=1e-6)
    # without chip terms the same data cannot be fitted to the mas level
    plain = solve_exposure_astrometry(det, ref, camera=small_cam, guess=(ra_g, dec_g, 95.3),
                                      mjd=MJD, sys_floor_px=0.0, chip_terms="none",
                                      max_rms_mas=1e4)
    assert plain.rms_mas[2] > 50.0 > 10 * sol.rms_mas[2]
    # the solution survives a round trip through plain values
    again = AstrometrySolution.from_dict(sol.to_dict(), small_cam)
    r2, d2 = again.pixel_to_sky("XY01", np.array([5.0]), np.array([6.0]))
    r1, d1 = sol.pixel_to_sky("XY01", np.array([5.0]), np.array([6.0]))
    assert sky_err_mas(r1, d1, r2, d2)[0] < 1e-6


def test_affine_chip_terms_absorb_chip_scale_and_shear(small_cam):
    rng = np.random.default_rng(8)
    truth = FocalPlaneModel(45.0, 20.0, 0.0, 0.258, Distortion.none())
    true_terms = {}
    for k, c in enumerate(small_cam.chip_names):
        xc, yc = small_cam.chip_to_focal(c, 0.5 * (small_cam.chip_nx - 1), 0.5 * (small_cam.chip_ny - 1))
        true_terms[c] = ChipTerms(dx=0.5 * k, rot=1e-4 * (k - 1.5), scale=[2e-4, -1e-4, 0, 1e-4][k],
                                  e1=[-1e-4, 2e-4, 1e-4, 0][k], e2=[0, 1e-4, -2e-4, 1e-4][k],
                                  xc=float(xc), yc=float(yc))
    det, ref = make_exposure(small_cam, truth, rng=rng, n_ref=6000, chip_terms=true_terms)
    kw = dict(camera=small_cam, guess=(45.02, 20.01, 0.2), mjd=MJD, sys_floor_px=0.0, order=2)
    aff = solve_exposure_astrometry(det, ref, chip_terms="affine", **kw)
    assert aff.success, aff.reason
    assert max_chip_error(aff, truth, small_cam, true_terms, use_wcs=True) < 2.0
    rot = solve_exposure_astrometry(det, ref, chip_terms="rotation", max_rms_mas=1e4, **kw)
    assert rot.rms_mas[2] > 5 * max(aff.rms_mas[2], 1.0)


def test_outliers_and_spurious_detections_are_rejected(small_cam):
    rng = np.random.default_rng(4)
    truth = FocalPlaneModel(120.0, 70.0, 200.0, 0.258, Distortion.none())
    det, ref = make_exposure(small_cam, truth, rng=rng, n_ref=5000, noise=0.05, n_spurious=150)
    n_real = len(det["x"]) - 150
    # a few real detections badly measured (blends): 3-8 px off
    bad = rng.choice(n_real, 15, replace=False)
    det["x"][bad] += rng.choice([-1, 1], 15) * rng.uniform(3, 8, 15)
    det["flags"][:5] = 1                                  # flagged detections are ignored
    ra_g, dec_g = offset_pointing(truth, 4.0, 3.0)
    sol = solve_exposure_astrometry(det, ref, camera=small_cam, guess=(ra_g, dec_g, 200.7),
                                    mjd=MJD)
    assert sol.success, sol.reason
    used = sol.det_index[sol.used]
    assert not np.isin(bad, used).any()
    assert not np.isin(np.arange(5), sol.det_index).any()
    assert (used < n_real).mean() > 0.99
    single = 0.05 * 258.0                                  # mas per axis
    assert sol.rms_mas[2] < 1.2 * np.sqrt(2) * single
    assert max_chip_error(sol, truth, small_cam, rms=True) < 0.4 * single
    assert max_chip_error(sol, truth, small_cam) < single


def test_failures_are_reported_not_raised(small_cam):
    rng = np.random.default_rng(5)
    truth = FocalPlaneModel(10.0, 5.0, 0.0, 0.258)
    det, ref = make_exposure(small_cam, truth, rng=rng, n_ref=3000)
    # detections unrelated to the catalogue: no pattern
    junk = dict(det, x=rng.uniform(0, 800, len(det["x"])), y=rng.uniform(0, 800, len(det["x"])))
    sol = solve_exposure_astrometry(junk, ref, camera=small_cam, guess=(10.0, 5.0, 0.0), mjd=MJD)
    assert not sol.success and "pattern" in sol.reason
    # pointing far outside the search range
    ra_g, dec_g = offset_pointing(truth, 20.0, 0.0)
    sol = solve_exposure_astrometry(det, ref, camera=small_cam, guess=(ra_g, dec_g, 0.0), mjd=MJD)
    assert not sol.success
    # too few detections
    few = {k: v[:8] for k, v in det.items()}
    sol = solve_exposure_astrometry(few, ref, camera=small_cam, guess=(10.0, 5.0, 0.0), mjd=MJD)
    assert not sol.success and "usable detections" in sol.reason
    with pytest.raises(ValueError, match="det: missing column 'x'"):
        solve_exposure_astrometry({"chip": det["chip"], "y": det["y"]}, ref, camera=small_cam,
                                  guess=(10.0, 5.0, 0.0), mjd=MJD)
    with pytest.raises(ValueError, match="not chips of camera"):
        solve_exposure_astrometry(dict(det, chip=np.full(len(det["x"]), "XY77")), ref,
                                  camera=small_cam, guess=(10.0, 5.0, 0.0), mjd=MJD)


def test_gpc1_exposure_with_rotation_of_one_degree():
    cam = load_camera("gpc1")
    rng = np.random.default_rng(6)
    truth = FocalPlaneModel(250.0, 40.0, 3.0, 0.2582, Distortion.gpc1_like())
    det, ref = make_exposure(cam, truth, rng=rng, n_ref=16000, noise=0.04, pad_arcmin=6.0)
    ra_g, dec_g = offset_pointing(truth, -3.0, -3.5)
    sol = solve_exposure_astrometry(det, ref, camera=cam, guess=(ra_g, dec_g, 2.0), mjd=MJD)
    assert sol.success, sol.reason
    # the chip rotations share the rotation with the model's PA (weakly anchored by their
    # prior), so PA itself is known to ~1e-5 deg while positions are right to the mas
    assert sol.model.pa == pytest.approx(3.0, abs=1e-4)
    single = 0.04 * 258.2
    assert sol.rms_mas[0] == pytest.approx(single, rel=0.1)
    assert max_chip_error(sol, truth, cam, rms=True) < 0.25 * single
    assert max_chip_error(sol, truth, cam) < single
