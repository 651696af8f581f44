"""Camera stage on a constructed testcam campaign with known truth: a 3' pointing error solved,
zero point to 2 mmag, calibrated catalogs, dynamic masks, the solution file the warp stage
reads, bad data flagged, faults shared by the group, and the collective path under
`mpiexec -n 2` and `-n 4` giving exactly the serial solution."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import fitsio
import numpy as np
import pytest
from scipy import ndimage

from ps1mpi.algorithms import maskbits
from ps1mpi.algorithms.dynamic_masks import starcore_radius
from ps1mpi.bench.camera_speed import (ExposureSpec, SkySpec, build_campaign, sky_radius,
                                       true_model)
from ps1mpi.geometry.camera import load_camera
from ps1mpi.infra.config import RecipeError, load_recipe
from ps1mpi.infra.ledger import Ledger
from ps1mpi.infra.schema import Fault, State
from ps1mpi.infra.world import World
from ps1mpi.stages.base import make_context, run_stage
from ps1mpi.stages.camera import (DET_DTYPE, QUALITY, CameraStage, ExposureCalibration,
                                  detection_limits, group_failure_check, pack_solution,
                                  read_camera_solution, unpack_solution)
from tests.mpi_util import ps1mpi

CAM = load_camera("testcam")
GOOD, RANDOM, BLOCKED, MISSING = "o5000t0001o", "o5000t0002o", "o5000t0003o", "o5000t0004o"
WBAND = "o5000t0005o"
EXPOSURES = [
    # 2.4' East, 1.8' South: a 3' pointing error, and 0.3 deg of rotation
    ExposureSpec(GOOD, 150.0, 2.0, pa=0.2, header_offset=(144.0, -108.0, 0.3), exptime=60.0,
                 bad_chips=("XY11",)),
    ExposureSpec(RANDOM, 150.0, 2.0, random=True, mjd=57000.31),
    ExposureSpec(BLOCKED, 150.0, 2.0, faulted_chips=("XY01",), mjd=57000.32),
    ExposureSpec(MISSING, 150.0, 2.0, missing_catalogs=("XY01",), mjd=57000.33),
    # w: the reference catalog has no w, the zero point comes from synthetic w (g, r, i)
    ExposureSpec(WBAND, 150.0, 2.0, filter="w", zpt_obs=26.1, header_offset=(-60.0, 90.0, -0.1),
                 mjd=57000.34, exptime=60.0),
]
BRIGHT_CHIP, BRIGHT_XY, BRIGHT_R = "XY00", (200.0, 300.0), 11.0


def _sky() -> SkySpec:
    ra, dec = true_model(EXPOSURES[0], CAM).pixel_to_sky(CAM, BRIGHT_CHIP, *BRIGHT_XY)
    return SkySpec(150.0, 2.0, sky_radius(CAM), density=100000.0, pm_sigma=5.0,
                   bright=[(float(ra), float(dec), BRIGHT_R)])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("camera") / "base"
    truth = build_campaign(root, EXPOSURES, camera="testcam", sky=_sky(), seed=5)
    return root, truth


@pytest.fixture(scope="module")
def serial(base, tmp_path_factory):
    """The stage run in this process on one rank."""
    src, truth = base
    root = tmp_path_factory.mktemp("serial") / "camp"
    shutil.copytree(src, root)
    led = Ledger.open(root / "ledger.h5", "a")
    world = World.from_mpi()
    ctx = make_context(root=root, recipe=load_recipe(overrides=["camera.group_size=1"]),
                       world=world, ledger_path=root / "ledger.h5", stage="camera")
    report = run_stage(CameraStage(group_size=1), ctx, led)
    led.close()
    return root, truth, report


def _element(root: Path, exp: str) -> dict:
    with Ledger.open(root / "ledger.h5") as led:
        rows = led.find("camProcessedExp", "exp_name", exp)
        assert rows.size == 1, f"{exp}: {rows.size} camProcessedExp rows"
        out = {k: v[0] for k, v in led.read("camProcessedExp", rows).items()}
        out["message_text"] = led.message_text(out["message"])[0]
        return out


def _product(root: Path, exp: str, suffix: str) -> Path:
    return root / "camera" / exp / f"{exp}.{suffix}"


# ------------------------------------------------------------------------------ the ledger

def test_define_runs_only_unblocked_exposures_and_good_chips(serial):
    root, _, report = serial
    with Ledger.open(root / "ledger.h5") as led:
        names = {n.decode() for n in led.column("camRun", "exp_name")}
        assert names == {GOOD, RANDOM, MISSING, WBAND}  # a faulted chip blocks its exposure
        run_state = dict(zip((n.decode() for n in led.column("camRun", "exp_name")),
                             led.column("camRun", "state")))
    assert report.done == 3 and report.faulted == 1 and report.bad_quality == 1
    assert run_state[GOOD] == State.DONE and run_state[MISSING] == State.RUN
    good = _element(root, GOOD)
    assert good["n_chips"] == 3                        # XY11 had bad quality at the chip stage
    made = sorted(p.name for p in (root / "camera" / GOOD).iterdir())
    assert made == sorted([f"{GOOD}.astrom.fits", f"{GOOD}.jpg"]
                          + [f"{GOOD}.{c}.{s}" for c in ("XY00", "XY01", "XY10")
                             for s in ("cmf", "mk.fits")])


# ------------------------------------------------------------------------------ astrometry, zp

def test_three_arcmin_pointing_error_is_solved_and_zero_point_within_2_mmag(serial):
    root, truth, _ = serial
    el = _element(root, GOOD)
    assert el["state"] == State.DONE and el["quality"] == 0 and el["fault"] == 0
    assert el["n_matched"] > 300
    # header minus truth was (+144", -108") and +0.3 deg: the solution undoes it
    assert el["ra_offset_arcsec"] == pytest.approx(-144.0, abs=0.05)
    assert el["dec_offset_arcsec"] == pytest.approx(108.0, abs=0.05)
    # (a few arcsec of the rotation may sit in the chip terms: the total mapping is checked below)
    assert el["pa_offset_arcsec"] == pytest.approx(-0.3 * 3600.0, abs=10.0)
    assert el["zero_point_err"] < 0.0015
    assert abs(el["zero_point"] - truth[GOOD]["zpt_obs"]) < 0.002
    sol = read_camera_solution(_product(root, GOOD, "astrom.fits"), CAM)
    model = truth[GOOD]["model"]
    # the fitted model, chip terms included, reproduces the true mapping across every chip
    for chip in ("XY00", "XY01", "XY10"):
        gx, gy = np.meshgrid(np.linspace(0, CAM.chip_nx - 1, 9), np.linspace(0, CAM.chip_ny - 1, 9))
        ra_f, dec_f = sol["solution"].pixel_to_sky(chip, gx.ravel(), gy.ravel())
        ra_t, dec_t = model.pixel_to_sky(CAM, chip, gx.ravel(), gy.ravel())
        err = np.hypot((ra_f - ra_t) * math.cos(math.radians(2.0)), dec_f - dec_t) * 3.6e6
        assert err.max() < 15.0, f"{chip}: model error up to {err.max():.1f} mas"


def test_w_band_is_calibrated_against_synthetic_w(serial):
    root, truth, _ = serial
    el = _element(root, WBAND)
    assert el["quality"] == 0 and el["n_phot"] > 100
    assert abs(el["zero_point"] - truth[WBAND]["zpt_obs"]) < 0.002


def test_calibrated_catalogs_agree_with_truth(serial):
    root, truth, _ = serial
    zp_exp = truth[GOOD]["zp_exp"]
    pulls, dmag = [], []
    for chip, tr in truth[GOOD]["chips"].items():
        cat = fitsio.read(str(_product(root, GOOD, f"{chip}.cmf")), ext=1)
        src = fitsio.read(str(root / "chip" / GOOD / f"{GOOD}.{chip}.cmf"), ext=1)
        for col in src.dtype.names:            # chip columns are carried over unchanged
            np.testing.assert_array_equal(cat[col], src[col])
        hdr = fitsio.read_header(str(_product(root, GOOD, f"{chip}.cmf")), ext=1)
        assert hdr["ZPT_EXP"] == pytest.approx(hdr["ZPT_OBS"] + 2.5 * math.log10(60.0))
        star = np.isfinite(tr["ra"]) & (cat["FLAGS"] == 0)
        cosd = math.cos(math.radians(2.0))
        sig = tr["pos_sig"][star] * CAM.pixel_scale * 1000.0
        pulls.append((cat["RA_PSF"][star] - tr["ra"][star]) * cosd * 3.6e6 / sig)
        pulls.append((cat["DEC_PSF"][star] - tr["dec"][star]) * 3.6e6 / sig)
        bright = star & (cat["PSF_INST_MAG_SIG"] < 0.02)
        dmag.append(cat["CAL_PSF_MAG"][bright] - tr["mag"][bright])
        np.testing.assert_allclose(cat["CAL_PSF_MAG"], cat["PSF_INST_MAG"] + hdr["ZPT_EXP"],
                                   atol=2e-6)
    p = np.concatenate(pulls)
    d = np.concatenate(dmag)
    # positions: errors at the level of the centroid errors, no bias
    assert 0.85 < np.std(p) < 1.2 and abs(np.mean(p)) < 0.1
    # magnitudes: bright stars on their true magnitudes within the zero-point accuracy
    assert d.size > 50 and abs(np.median(d)) < 0.004
    assert zp_exp == pytest.approx(truth[GOOD]["zpt_obs"] + 2.5 * math.log10(60.0))


def test_solution_file_is_what_the_warp_stage_reads(serial):
    from ps1mpi.stages.warp import read_astrometry

    root, truth, _ = serial
    path = _product(root, GOOD, "astrom.fits")
    sol = read_astrometry(path)
    el = _element(root, GOOD)
    assert sol.zpt_obs == pytest.approx(float(el["zero_point"]), abs=1e-6)
    assert sorted(sol.chips) == ["XY00", "XY01", "XY10"]
    mine = read_camera_solution(path, CAM)
    assert mine["header"]["NASTRO"] == el["n_matched"]
    for chip, cs in sol.chips.items():
        assert cs.zpt_offset == 0.0            # chip offsets are diagnostics by default
        assert "ZP_CHOFF" in mine["chips"][chip]
        x = np.array([0.0, 400.0, CAM.chip_nx - 1.0])
        y = np.array([0.0, 300.0, CAM.chip_ny - 1.0])
        ra_w, dec_w = cs.wcs.all_pix2world(x, y, 0)
        ra_s, dec_s = mine["solution"].pixel_to_sky(chip, x, y)
        err = np.hypot((ra_w - ra_s) * math.cos(math.radians(2.0)), dec_w - dec_s) * 3.6e6
        assert err.max() < 0.01, f"{chip}: TAN-SIP differs from the model by {err.max()} mas"


def test_dynamic_masks_added_to_the_static_mask(serial):
    root, truth, _ = serial
    zp_exp = truth[GOOD]["zp_exp"]
    for chip in ("XY00", "XY01", "XY10"):
        out = fitsio.read(str(_product(root, GOOD, f"{chip}.mk.fits")))
        static = fitsio.read(str(root / "chip" / GOOD / f"{GOOD}.{chip}.mk.fits"))
        np.testing.assert_array_equal(out & maskbits.STATIC, static)
        assert not np.any(static & maskbits.DYNAMIC)
    mask = fitsio.read(str(_product(root, GOOD, f"{BRIGHT_CHIP}.mk.fits")))
    m_inst = BRIGHT_R - zp_exp
    r = float(starcore_radius(np.array([m_inst]))[0])
    assert r > 25.0
    yy, xx = np.mgrid[0:CAM.chip_ny, 0:CAM.chip_nx]
    x0, y0 = BRIGHT_XY
    d = np.hypot(xx - x0, yy - y0)
    core = (mask & maskbits.STARCORE) != 0
    assert core[d < r - 1.5].all()                         # the whole circle
    lab, _ = ndimage.label(core)
    disc = lab == lab[int(y0), int(x0)]                    # and no more than the circle
    assert d[disc].max() < r + 1.0 and disc.sum() == pytest.approx(math.pi * r * r, rel=0.02)
    # testcam crosstalk (testcam_masks.toml): cell xy00 leaks into xy01, the other cell row,
    # at the same cell coordinates
    xt = (mask & maskbits.CROSSTALK) != 0
    yi = int(y0 + CAM.cell_ny + CAM.cell_gap_y)
    assert xt[yi, int(x0)] and not xt[int(y0), int(x0)]
    el = _element(root, GOOD)
    n_dyn = sum(int(np.count_nonzero(fitsio.read(str(_product(root, GOOD, f"{c}.mk.fits")))
                                     & maskbits.DYNAMIC)) for c in ("XY00", "XY01", "XY10"))
    assert el["dyn_masked_frac"] == pytest.approx(n_dyn / (3 * CAM.chip_nx * CAM.chip_ny),
                                                  rel=1e-5)


def test_focal_plane_jpeg(serial):
    from PIL import Image

    from ps1mpi.algorithms.jpeg import mosaic_binned_chips

    root, _, _ = serial
    with Image.open(_product(root, GOOD, "jpg")) as im:
        assert im.format == "JPEG"
        arr = np.asarray(im)
    b = 16
    shape = (-(-CAM.chip_ny // b), -(-CAM.chip_nx // b))
    mosaic, _ = mosaic_binned_chips({"XY00": np.ones(shape)}, camera=CAM, binning=b)
    assert arr.shape == mosaic.shape
    # the missing chip XY11 (bad quality) is an empty quarter: black in the picture
    assert arr.mean() > 30 and (arr < 8).mean() > 0.2


# ------------------------------------------------------------------------------ bad data, faults

def test_random_detections_give_bad_quality_and_no_products(serial):
    root, _, _ = serial
    el = _element(root, RANDOM)
    assert el["state"] == State.DONE and el["fault"] == 0
    assert el["quality"] == QUALITY["astrometry"]
    assert "pattern" in el["message_text"]
    assert not (root / "camera" / RANDOM).exists()
    with Ledger.open(root / "ledger.h5") as led:
        row = led.find("camRun", "exp_name", RANDOM)
        assert led.column("camRun", "quality", row)[0] != 0   # warp will not take it


def test_missing_catalog_is_a_fault_with_its_cause(serial):
    root, _, _ = serial
    el = _element(root, MISSING)
    assert el["fault"] == Fault.SYSTEM and el["state"] == State.NEW
    assert f"{MISSING}.XY01.cmf" in el["message_text"]
    assert not (_product(root, MISSING, "astrom.fits")).exists()


# ------------------------------------------------------------------------------ MPI

@pytest.mark.parametrize("nranks", [2, 4])
def test_collective_path_gives_the_serial_solution(base, serial, tmp_path, nranks):
    src, _ = base
    sroot = serial[0]
    root = tmp_path / "camp"
    shutil.copytree(src, root)
    proc = ps1mpi(nranks, ["camera", "--ledger", root / "ledger.h5",
                           "--set", f"camera.group_size={nranks}"], timeout=240)
    assert proc.returncode == 1, proc.stdout + proc.stderr   # the MISSING exposure faulted
    for exp in (GOOD, RANDOM, MISSING, WBAND):
        a, b = _element(sroot, exp), _element(root, exp)
        for key in ("state", "fault", "quality", "n_matched", "n_phot", "n_det", "n_ref",
                    "zero_point", "zero_point_err", "astrom_rms_mas", "ra_offset_arcsec",
                    "dec_offset_arcsec", "pa_offset_arcsec", "dyn_masked_frac"):
            assert a[key] == b[key] or (np.isnan(a[key]) and np.isnan(b[key])), \
                f"{exp}.{key}: serial {a[key]} vs {nranks} ranks {b[key]}"
    assert _element(root, GOOD)["n_ranks"] == nranks
    # the non-leader's missing catalog is reported with its own cause
    assert f"{MISSING}.XY01.cmf" in _element(root, MISSING)["message_text"]
    h1 = fitsio.read_header(str(_product(sroot, GOOD, "astrom.fits")))
    h2 = fitsio.read_header(str(_product(root, GOOD, "astrom.fits")))
    assert json.loads(h1["FPMODEL"]) == json.loads(h2["FPMODEL"])
    for chip in ("XY00", "XY01", "XY10"):
        for suffix in ("cmf", "mk.fits"):
            a = fitsio.read(str(_product(sroot, GOOD, f"{chip}.{suffix}")), ext=1)
            b = fitsio.read(str(_product(root, GOOD, f"{chip}.{suffix}")), ext=1)
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------ pieces

def test_solution_packs_and_unpacks_exactly(serial):
    root, _, _ = serial
    sol = read_camera_solution(_product(root, GOOD, "astrom.fits"), CAM)["solution"]
    from ps1mpi.algorithms.photcal import ZeroPoint

    zp = ZeroPoint(28.4, 0.001, 300, 320, 0.02, 0.03, 0.004, {"XY00": (0.003, 0.002, 90)},
                   success=True, zp_per_second=24.0)
    cal = ExposureCalibration(quality=0, astrometry=sol, zero_point=zp,
                              limits=np.array([-6.5, np.nan, -6.9, np.nan]))
    packed = pack_solution(cal, CAM.chip_names)
    sol2, zp2, lim = unpack_solution(packed, CAM)
    assert sol2.to_dict()["model"] == sol.to_dict()["model"]
    assert sol2.chip_offsets == sol.chip_offsets
    assert (zp2.zp, zp2.zp_err, zp2.zp_per_second, zp2.n_stars) == (28.4, 0.001, 24.0, 300)
    assert zp2.chip_offsets == {"XY00": (0.003, 0.002, 90)}
    np.testing.assert_array_equal(lim, cal.limits)
    with pytest.raises(ValueError, match="expected"):
        unpack_solution(np.append(packed, 1.0), CAM)


def test_detection_limits_are_the_5_sigma_magnitudes():
    det = np.zeros(200, DET_DTYPE)
    det["chip"] = np.repeat([0, 2], 100)
    det["mag"] = np.linspace(-12, -5, 200)
    det["mag_err"] = 1.0857 * 10 ** (0.4 * (det["mag"] + 7.0)) / 5.0   # 5 sigma at -7
    lim = detection_limits(det, 4)
    assert np.isnan(lim[1]) and np.isnan(lim[3])
    assert lim[2] == pytest.approx(-7.0, abs=0.1)
    assert np.isnan(lim[0])              # chip 0 never reaches 5 sigma


def test_group_failure_check_reraises_the_local_error_and_bad_recipes_are_named():
    world = World.from_mpi(None)
    group = world.split(world.rank)
    group_failure_check(group, None, "nothing")
    with pytest.raises(OSError, match="disk"):
        group_failure_check(group, OSError("disk gone"), "reading")
    group.free()
    world.free()
    ctx = make_context(root=Path("."), recipe=load_recipe(overrides=[
        "camera.dynamic_masks={spike = {angle = 0.0}}"]), world=None, ledger_path=Path("x"),
        stage="camera")
    with pytest.raises(RecipeError, match="camera.dynamic_masks"):
        CameraStage._rules(ctx, CAM)


def test_missing_reference_catalog_is_a_configuration_fault(base, tmp_path):
    src, _ = base
    root = tmp_path / "camp"
    shutil.copytree(src, root)
    (root / "refcat" / "refcat.fits").unlink()
    led = Ledger.open(root / "ledger.h5", "a")
    ctx = make_context(root=root, recipe=load_recipe(overrides=["camera.group_size=1"]),
                       world=World.from_mpi(), ledger_path=root / "ledger.h5", stage="camera")
    report = run_stage(CameraStage(group_size=1), ctx, led)
    led.close()
    assert report.faulted == 4 and report.done == 0
    el = _element(root, GOOD)
    assert el["fault"] == Fault.CONFIG and "camera.refcat" in el["message_text"]
