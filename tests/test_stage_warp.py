"""The warp stage end to end on constructed calibrated chips with known stars.

The camera stage's products are built here from the focal-plane model (FocalPlaneModel.chip_wcs,
with distortion): chip images in electrons with Gaussian stars at known sky positions, their
variance, masks (cell gaps, one bad column) and PSF models, and the astrometric solution file.
The warp stage then runs under ``mpiexec -n 2`` and the warps are checked against the truth.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.special import erf

from ps1mpi.algorithms import maskbits
from ps1mpi.algorithms.psf import PSFModel
from ps1mpi.geometry.camera import load_camera
from ps1mpi.geometry.focalplane import Distortion, FocalPlaneModel
from ps1mpi.geometry.tessellation import load_tessellation
from ps1mpi.infra.ledger import Ledger
from ps1mpi.infra.schema import State
from ps1mpi.stages.warp import (ChipInput, flux_scale, read_image, warp_psf_model,
                                warp_to_skycell)

from .mpi_util import ps1mpi

EXP = "o5576g0001o"
ZPT_OBS = 28.0
EXPTIME = 30.0
ZPT_OFF = {"XY11": 0.1}   # chip zero-point offsets (mag)
SIGMA = 1.3               # chip PSF, Gaussian sigma (chip pixels)
BAD_COLUMN = ("XY01", 300)


def _gauss_stamp(x0, y0, flux, sigma, shape):
    """Pixel-integrated Gaussian added over a (2h+1)^2 box."""
    ny, nx = shape
    h = 9
    ix, iy = int(round(x0)), int(round(y0))
    xs = np.arange(max(ix - h, 0), min(ix + h + 1, nx))
    ys = np.arange(max(iy - h, 0), min(iy + h + 1, ny))
    s2 = sigma * math.sqrt(2.0)
    fx = 0.5 * (erf((xs + 0.5 - x0) / s2) - erf((xs - 0.5 - x0) / s2))
    fy = 0.5 * (erf((ys + 0.5 - y0) / s2) - erf((ys - 0.5 - y0) / s2))
    return ys, xs, flux * np.outer(fy, fx)


def build_exposure(root: Path, *, seed: int = 3):
    """Write the inputs of the warp stage for one testcam exposure; return the truth."""
    from astropy.io import fits

    cam = load_camera("testcam")
    model = FocalPlaneModel(120.02, 20.01, 12.0, cam.pixel_scale,
                            Distortion.gpc1_like(amplitude=3.0, norm=808.0))
    rng = np.random.default_rng(seed)
    ny, nx = cam.chip_ny, cam.chip_nx
    stars = []
    hdus = [fits.PrimaryHDU()]
    hdus[0].header["ZPT_OBS"] = ZPT_OBS
    hdus[0].header["EXPNAME"] = EXP
    for chip in cam.chip_names:
        img = np.zeros((ny, nx), np.float32)
        yy, xx = np.mgrid[0:ny, 0:nx]
        mask = np.where(cam.cell_at(xx, yy) == "", maskbits.GAP, 0).astype(np.uint16)
        if chip == BAD_COLUMN[0]:
            mask[:, BAD_COLUMN[1]] |= maskbits.DETECTOR
        # stars well inside the chip, away from cell gaps and the bad column
        n_placed = 0
        while n_placed < 14:
            x, y = rng.uniform(14, nx - 15), rng.uniform(14, ny - 15)
            box = mask[int(y) - 10:int(y) + 11, int(x) - 10:int(x) + 11]
            if box.any() or any(abs(x - s["x"]) < 25 and abs(y - s["y"]) < 25
                                for s in stars if s["chip"] == chip):
                continue
            flux = float(10 ** rng.uniform(4.3, 5.3))
            ys, xs, st = _gauss_stamp(x, y, flux, SIGMA, (ny, nx))
            img[np.ix_(ys, xs)] += st.astype(np.float32)
            ra, dec = model.pixel_to_sky(cam, chip, x, y)
            stars.append(dict(chip=chip, x=x, y=y, ra=float(ra), dec=float(dec), flux=flux))
            n_placed += 1
        var = (25.0 + img).astype(np.float32)
        img[(mask & maskbits.GAP) != 0] = 0.0
        d = root / "chip" / EXP
        d.mkdir(parents=True, exist_ok=True)
        (root / "camera" / EXP).mkdir(parents=True, exist_ok=True)
        import fitsio
        fitsio.write(str(d / f"{EXP}.{chip}.ch.fits"), img, compress="GZIP", clobber=True,
                     qlevel=0)  # lossless float
        fitsio.write(str(d / f"{EXP}.{chip}.wt.fits"), var, clobber=True)
        fitsio.write(str(root / "camera" / EXP / f"{EXP}.{chip}.mk.fits"), mask, clobber=True)
        with warnings.catch_warnings():   # PSFModel's header has a long comment card
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            PSFModel.constant((ny, nx), sigma_x=SIGMA, sigma_y=SIGMA, k=0.5).to_fits(
                d / f"{EXP}.{chip}.psf.fits", overwrite=True)
        with warnings.catch_warnings():   # astropy shortens a long SIP comment card
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            h = model.chip_wcs(cam, chip).to_header(relax=True)
        h["EXTNAME"] = chip
        h["ZPT_OFF"] = ZPT_OFF.get(chip, 0.0)
        hdus.append(fits.ImageHDU(header=h))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        fits.HDUList(hdus).writeto(root / "camera" / EXP / f"{EXP}.astrom.fits", overwrite=True)
    return cam, model, stars


def _fit_centre(stamp, xx, yy, x0, y0):
    """Least-squares centre of a pixel-integrated circular Gaussian fitted to a stamp."""
    from scipy.optimize import least_squares

    def resid(p):
        f, cx, cy, sig = p
        s2 = sig * math.sqrt(2.0)
        gx = 0.5 * (erf((xx + 0.5 - cx) / s2) - erf((xx - 0.5 - cx) / s2))
        gy = 0.5 * (erf((yy + 0.5 - cy) / s2) - erf((yy - 0.5 - cy) / s2))
        return (f * gx * gy - stamp).ravel()

    sol = least_squares(resid, [stamp.sum(), x0 + 0.2, y0 - 0.2, 1.4], x_scale="jac")
    return sol.x[1], sol.x[2]


def make_ledger(path: Path):
    with Ledger.create(path, campaign={"name": "t"}) as led:
        raw = led.append("rawExp", 2, exp_name=[EXP, "o5576g0002o"], filter="r",
                         mjd=[55576.4, 55576.45], camera="testcam", exptime=EXPTIME,
                         ra=120.02, dec=20.01)
        led.transition("rawExp", raw, State.DONE)
        chip = led.append("chipRun", 2, exp_name=[EXP, "o5576g0002o"], raw_exp=raw, filter="r")
        led.transition("chipRun", chip, State.DONE)
        cam = led.append("camRun", 2, exp_name=[EXP, "o5576g0002o"], chip_run=chip, filter="r")
        # the second exposure failed calibration (bad quality): it must not be warped
        led.transition("camRun", cam, State.DONE, quality=[0, 1])


@pytest.fixture(scope="module")
def warped(tmp_path_factory):
    root = tmp_path_factory.mktemp("warp")
    cam, model, stars = build_exposure(root)
    make_ledger(root / "ledger.h5")
    proc = ps1mpi(2, ["warp", "--ledger", root / "ledger.h5", "--set", "warp.tessellation=TEST.V1"],
                  timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, cam, model, stars, proc


def _elements(root):
    with Ledger.open(root / "ledger.h5") as led:
        return (led.read("warpRun"), led.read("warpSkyfile"))


def test_every_touched_skycell_defined_and_done(warped):
    root, cam, model, stars, proc = warped
    runs, el = _elements(root)
    assert runs["exp_name"].tolist() == [EXP.encode()]          # the bad-quality one skipped
    assert runs["state"][0] == State.DONE and runs["quality"][0] == 0
    assert np.all(el["state"] == State.DONE) and np.all(el["fault"] == 0)
    names = {n.decode() for n in el["skycell"]}
    assert runs["n_skycells"][0] == len(names)
    tess = load_tessellation("TEST.V1")
    for s in stars:   # every skycell holding a star was defined
        assert set(tess.skycells_at(s["ra"], s["dec"])) <= names
    # a warp is written exactly when it has >= 10% good pixels
    for i, name in enumerate(el["skycell"]):
        img = root / "warp" / EXP / f"{EXP}.{name.decode()}.wrp.fits"
        good = el["good_frac"][i] >= 0.1
        assert img.exists() == good
        assert el["quality"][i] == (0 if good else 1)
    assert np.any(el["quality"] == 1) and np.any(el["quality"] == 0)


def test_stars_at_true_positions_with_zero_point_25_flux(warped):
    root, cam, model, stars, proc = warped
    runs, el = _elements(root)
    tess = load_tessellation("TEST.V1")
    checked = 0
    for i, name in enumerate(el["skycell"]):
        name = name.decode()
        path = root / "warp" / EXP / f"{EXP}.{name}.wrp.fits"
        if not path.exists():
            continue
        img = read_image(path)
        msk = read_image(root / "warp" / EXP / f"{EXP}.{name}.wrp.mk.fits")
        cell = tess.skycell(name)
        for s in stars:
            x, y = cell.sky_to_pixel(s["ra"], s["dec"])
            x, y = float(x), float(y)
            if not (12 <= x < cell.nx - 12 and 12 <= y < cell.ny - 12):
                continue
            ix, iy = int(round(x)), int(round(y))
            sl = (slice(iy - 8, iy + 9), slice(ix - 8, ix + 9))
            if (msk[sl] & maskbits.BAD).any():
                continue
            yy, xx = np.mgrid[sl]
            r2 = (xx - x) ** 2 + (yy - y) ** 2
            stamp = img[sl].astype(np.float64)
            flux = stamp[r2 <= 7.5 ** 2].sum()
            expected = s["flux"] * flux_scale(ZPT_OBS, EXPTIME, zpt_offset=ZPT_OFF.get(s["chip"], 0.0))
            assert flux == pytest.approx(expected, rel=2e-3), (name, s)
            cx, cy = _fit_centre(stamp, xx, yy, x, y)
            assert math.hypot(cx - x, cy - y) < 0.01, (name, s, cx - x, cy - y)
            checked += 1
    assert checked >= 40


def test_bad_column_masked_and_psf_carried(warped):
    root, cam, model, stars, proc = warped
    runs, el = _elements(root)
    tess = load_tessellation("TEST.V1")
    wcs = model.chip_wcs(cam, BAD_COLUMN[0])
    hits = 0
    for i, name in enumerate(el["skycell"]):
        name = name.decode()
        mpath = root / "warp" / EXP / f"{EXP}.{name}.wrp.mk.fits"
        if not mpath.exists() or BAD_COLUMN[0] not in el["chips"][i].decode():
            continue
        msk = read_image(mpath)
        cell = tess.skycell(name)
        yy, xx = np.mgrid[0:cell.ny:3, 0:cell.nx:3]
        ra, dec = cell.pixel_to_sky(xx.ravel(), yy.ravel())
        cx, cy = wcs.all_world2pix(ra, dec, 0)
        on = (np.abs(cx - BAD_COLUMN[1]) < 0.3) & (cy > 20) & (cy < cam.chip_ny - 20)
        on &= cam.cell_at(np.round(cx).astype(int).clip(0, cam.chip_nx - 1),
                          np.round(cy).astype(int).clip(0, cam.chip_ny - 1)) != ""
        if on.any():
            bits = msk[yy.ravel()[on], xx.ravel()[on]]
            assert np.all(bits & maskbits.DETECTOR), name
            hits += int(on.sum())
        # the PSF model: FWHM in skycell pixels = chip FWHM x 0.258/0.25 (the scale change)
        psf = PSFModel.from_fits(root / "warp" / EXP / f"{EXP}.{name}.wrp.psf.fits")
        chip_fwhm = float(PSFModel.constant((10, 10), sigma_x=SIGMA, sigma_y=SIGMA,
                                            k=0.5).shape_at(5, 5).fwhm_major)
        shp = psf.shape_at(cell.nx / 2, cell.ny / 2)
        ratio = cam.pixel_scale / tess.pixel_scale
        assert float(shp.fwhm_major) == pytest.approx(chip_fwhm * ratio, rel=0.02)
        assert float(shp.fwhm_minor) == pytest.approx(chip_fwhm * ratio, rel=0.02)
        assert el["fwhm"][i] == pytest.approx(chip_fwhm * cam.pixel_scale, rel=0.02)
    assert hits > 20


def test_chips_read_once_per_rank_and_maps_accurate(warped):
    root, cam, model, stars, proc = warped
    runs, el = _elements(root)
    for rank in np.unique(el["rank"]):
        sel = el["rank"] == rank
        assert el["chip_reads"][sel].sum() <= len(cam.chip_names)
    done = el["quality"] == 0
    assert np.all(el["map_error"][done] < 0.01)          # the bound, in chip pixels
    assert np.all((el["cov_factor"][done] > 1.0) & (el["cov_factor"][done] < 2.0))
    assert np.all(el["zero_point"][done] == 25.0)
    # re-running defines nothing new and does nothing
    proc = ps1mpi(1, ["warp", "--ledger", root / "ledger.h5", "--set", "warp.tessellation=TEST.V1"],
                  timeout=120)
    assert proc.returncode == 0 and "0 done (0 bad quality), 0 faulted of 0 units" in proc.stdout


def test_psf_transform_of_an_affine_map():
    """warp_psf_model on a pure rotation + scale: M_out = A^-1 M A^-T exactly."""
    from astropy.wcs import WCS

    from ps1mpi.geometry.tessellation import Skycell

    def tan(crval, scale_arcsec, rot_deg, crpix):
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = crval
        w.wcs.crpix = crpix
        s = scale_arcsec / 3600.0
        t = math.radians(rot_deg)
        w.wcs.cd = [[-s * math.cos(t), s * math.sin(t)], [s * math.sin(t), s * math.cos(t)]]
        return w

    out_wcs = tan([30.0, 10.0], 0.25, 0.0, [100.5, 100.5])
    cell = Skycell("skycell.0000.000", 0, 0, 200, 200, 30.0, 10.0, out_wcs)
    chip_wcs = tan([30.0, 10.0], 0.5, 30.0, [80.5, 80.5])
    psf = PSFModel.from_axes((160, 160), sigma_major=2.0, sigma_minor=1.0, theta=10.0, k=0.5)
    shape = (160, 160)
    chip = ChipInput("C", np.zeros(shape, np.float32), np.ones(shape, np.float32),
                     np.zeros(shape, np.uint16), chip_wcs, 1.0, psf)
    warp = warp_to_skycell([chip], cell)
    assert warp.good_frac > 0.9
    model = warp_psf_model([chip], warp, grid=3)
    shp = model.shape_at(100.0, 100.0)
    # scale 2 (0.5"/px -> 0.25"/px): FWHM doubles; the sky rotation of 30 deg turns the axes
    ref = psf.shape_at(80.0, 80.0)
    assert float(shp.fwhm_major) == pytest.approx(2 * float(ref.fwhm_major), rel=1e-4)
    assert float(shp.fwhm_minor) == pytest.approx(2 * float(ref.fwhm_minor), rel=1e-4)
    dtheta = (float(shp.theta) - float(ref.theta) + 90.0) % 180.0 - 90.0
    assert abs(abs(dtheta) - 30.0) < 0.05
    assert model.norm_radius == pytest.approx(2 * psf.norm_radius, rel=1e-4)


def test_exposure_centres_for_the_warp_order_wrap_at_ra_zero():
    from ps1mpi.stages.warp import _group_centres

    keys = np.array([b"e1", b"e2", b"e1", b"e2", b"e1"])
    ra = np.array([359.8, 10.0, 0.2, 12.0, 0.0])
    dec = np.array([-1.0, 5.0, 1.0, 7.0, 0.0])
    cra, cdec = _group_centres(keys, ra, dec)
    e1 = keys == b"e1"
    # e1 straddles RA 0: its centre is near 0, not near 180
    assert np.allclose(np.where(cra[e1] > 180, cra[e1] - 360, cra[e1]), 0.0, atol=1e-6)
    assert np.allclose(cdec[e1], 0.0, atol=1e-3)
    assert np.allclose(cra[~e1], 11.0, atol=0.01) and np.allclose(cdec[~e1], 6.0, atol=0.01)
