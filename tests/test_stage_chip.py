"""The chip stage end to end under mpiexec -n 2 through the ledger, on the simulator's truth.

One chip (XY01) of the test camera is simulated with its detrend masters ("tiny" preset) for
an r exposure and a y exposure (fringes); a third exposure holds a copy of the r chip with
every pixel saturated. The ledger is filled as the register stage leaves it, the chip stage
runs on 2 ranks, and its products are compared with the truth.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ps1mpi.algorithms import maskbits
from ps1mpi.algorithms.catalog import CALIBRATION_BAD, FLAG_BITS
from ps1mpi.infra.config import load_recipe
from ps1mpi.infra.ledger import Ledger
from ps1mpi.infra.runtime import ConfigError
from ps1mpi.infra.schema import State
from ps1mpi.stages.base import StageContext
from ps1mpi.stages.chip import (QUALITY, ChipStage, DetrendIndex, read_background_model,
                                read_catalog)
from tests.mpi_util import ps1mpi

fitsio = pytest.importorskip("fitsio")

CHIP = "XY01"
R_EXP, Y_EXP, SAT_EXP = "o5576t0001o", "o5576t0002o", "o5576t0099o"


def _register(root: Path, exposures: list[str]) -> Path:
    """A ledger with rawExp/rawImfile rows DONE with quality 0, as register leaves them."""
    from ps1mpi.infra.rawfile import read_raw_chip

    path = root / "ledger.h5"
    with Ledger.create(path, campaign={"name": "chip-test"}) as led:
        for exp in exposures:
            rel = f"datastore/{exp}/{exp}.{CHIP}.fits"
            h = read_raw_chip(root / rel).header
            run = led.append("rawExp", 1, exp_name=exp, filter=h["FILTER"], mjd=h["MJD-OBS"],
                             camera=h["CAMERA"], exptime=h["EXPTIME"], ra=h["RA"], dec=h["DEC"],
                             posangle=h["POSANGLE"], nchips=1)
            led.transition("rawExp", run, State.DONE)
            rows = led.append("rawImfile", 1, run=run[0], exp_name=exp, chip=CHIP, path=rel,
                              filter=h["FILTER"], mjd=h["MJD-OBS"], exptime=h["EXPTIME"],
                              ra=h["RA"], dec=h["DEC"])
            led.transition("rawImfile", rows, State.DONE)
    return path


def _saturated_copy(root: Path) -> None:
    """Exposure SAT_EXP: the r chip with every pixel at 65535 ADU."""
    from ps1mpi.infra.rawfile import read_raw_chip, write_raw_chip

    raw = read_raw_chip(root / f"datastore/{R_EXP}/{R_EXP}.{CHIP}.fits")
    cells = {c: np.full(a.shape, 65535, np.uint16) for c, a in raw.cells.items()}
    header = dict(raw.header)
    header["EXPNAME"] = SAT_EXP
    header.pop("NCELLS", None)
    hdrs = raw.cell_headers
    write_raw_chip(root / f"datastore/{SAT_EXP}/{SAT_EXP}.{CHIP}.fits", cells, header=header,
                   datasec=raw.datasec("xy00"), biassec=raw.biassec("xy00"),
                   gain={c: h["GAIN"] for c, h in hdrs.items()},
                   read_noise={c: h["RDNOISE"] for c, h in hdrs.items()},
                   saturation={c: h["SATURATE"] for c, h in hdrs.items()},
                   maxlin={c: h["MAXLIN"] for c, h in hdrs.items()})


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    root = tmp_path_factory.mktemp("chipstage")
    # the "tiny" survey with fewer calibration frames per master (faster, noisier masters)
    import dataclasses

    from ps1mpi.sim.plan import PRESETS, CalibrationPlan
    from ps1mpi.sim.survey import simulate_survey

    plan = CalibrationPlan(n_bias=2, n_dark=2, n_linearity=5, n_dome=2, n_sky=3, n_fringe=3)
    simulate_survey(root, preset=dataclasses.replace(PRESETS["tiny"], calibration=plan), seed=1,
                    chips=[CHIP], exposures=[R_EXP, Y_EXP])
    _saturated_copy(root)
    ledger = _register(root, [R_EXP, Y_EXP, SAT_EXP])
    proc = ps1mpi(2, ["chip", "--ledger", ledger], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, ledger


def _elements(ledger: Path) -> dict[str, dict]:
    with Ledger.open(ledger) as led:
        cols = led.read("chipProcessedImfile")
        msgs = led.message_text(cols["message"])
    out = {}
    for i, exp in enumerate(cols["exp_name"]):
        out[exp.decode()] = {k: v[i] for k, v in cols.items()} | {"text": msgs[i]}
    return out


def _truth_header(root: Path, exp: str) -> dict:
    return dict(fitsio.read_header(str(root / f"truth/{exp}/{exp}.{CHIP}.truth.fits")))


# ---------------------------------------------------------------------------------- ledger

def test_ledger_runs_and_summaries(campaign):
    root, ledger = campaign
    with Ledger.open(ledger) as led:
        runs = led.read("chipRun")
    assert runs["state"].tolist() == [State.DONE] * 3
    by_exp = {e.decode(): q for e, q in zip(runs["exp_name"], runs["quality"])}
    assert by_exp[R_EXP] == 0 and by_exp[Y_EXP] == 0
    assert by_exp[SAT_EXP] == 1          # its only chip is bad: the run is bad
    el = _elements(ledger)
    for exp, band in ((R_EXP, "r"), (Y_EXP, "y")):
        e = el[exp]
        assert e["state"] == State.DONE and e["quality"] == 0 and e["fault"] == 0
        truth = _truth_header(root, exp)
        # background near the true sky (the flats are normalised to ~1 over the mosaic)
        assert e["bg"] == pytest.approx(truth["SKY_E"], rel=0.05)
        assert 0.5 * math.sqrt(truth["SKY_E"]) < e["bg_stdev"] < 2.0 * math.sqrt(truth["SKY_E"])
        # PSF FWHM near the seeing of the exposure
        fwhm = math.sqrt(e["fwhm_major"] * e["fwhm_minor"])
        assert fwhm == pytest.approx(truth["SEEING"], rel=0.15)
        assert e["n_sources"] > 50 and e["n_psf_stars"] >= 10
        label = e["detrend"].decode()
        assert f"flat.{band}@" in label and "bias@" in label and "nonlin@" in label
        assert ("fringe.y@" in label) == (band == "y")
        assert math.isfinite(e["fringe_amp"]) == (band == "y")
        for col in ("t_detrend", "t_background", "t_detect", "t_psf", "t_measure", "t_io"):
            assert e[col] > 0
        assert 0 <= e["sat_frac"] < 0.01 and 0 <= e["masked_frac"] < 0.05
        assert e["n_cr"] > 0                    # the simulator adds cosmic rays


def test_saturated_chip_is_bad_quality_not_fault(campaign):
    root, ledger = campaign
    e = _elements(ledger)[SAT_EXP]
    assert e["state"] == State.DONE and e["fault"] == 0
    assert e["quality"] == QUALITY["saturated"]
    assert "saturated" in e["text"]
    assert e["sat_frac"] > 0.99
    d = root / "chip" / SAT_EXP
    assert not (d / f"{SAT_EXP}.{CHIP}.cmf").exists()
    assert (d / f"{SAT_EXP}.{CHIP}.log").is_file()
    mask = fitsio.read(str(d / f"{SAT_EXP}.{CHIP}.mk.fits"))
    live = (mask & maskbits.GAP) == 0
    assert np.all((mask[live] & maskbits.SAT) != 0)


# ---------------------------------------------------------------------------------- products

def test_products_exist_and_read_back(campaign):
    from ps1mpi.algorithms.psf import PSFModel

    root, _ = campaign
    for exp in (R_EXP, Y_EXP):
        d = root / "chip" / exp
        for ext in ("ch.fits", "wt.fits", "mk.fits", "cmf", "psf.fits", "bg.fits", "b16.fits",
                    "b256.fits", "log"):
            assert (d / f"{exp}.{CHIP}.{ext}").is_file(), ext
        assert not list(d.glob(".*tmp*"))       # no temporary left behind
        with fitsio.FITS(str(d / f"{exp}.{CHIP}.ch.fits")) as f:
            h = f[1].read_header()
            assert h["ZCMPTYPE"].strip() == "RICE_1" and h["BUNIT"].strip() == "electron"
            assert h["BGSUB"] is True and h["DETREND"].startswith("bias@")
            img = f[1].read()
        assert img.shape == (806, 808) and img.dtype == np.float32
        mask = fitsio.read(str(d / f"{exp}.{CHIP}.mk.fits"))
        assert mask.dtype == np.uint16 and np.any(mask & maskbits.GAP)
        b16 = fitsio.read(str(d / f"{exp}.{CHIP}.b16.fits"))
        b256 = fitsio.read(str(d / f"{exp}.{CHIP}.b256.fits"))
        assert b16.shape == (51, 51) and b256.shape == (4, 4)
        # the x16 image is the mean of its unmasked pixels
        blk = img[160:176, 320:336]
        ok = (mask[160:176, 320:336] & maskbits.BAD) == 0
        assert b16[10, 20] == pytest.approx(float(blk[ok].mean()), abs=0.05)
        psf = PSFModel.from_fits(d / f"{exp}.{CHIP}.psf.fits")
        assert psf.image_shape == (806, 808)
        stamp = psf.evaluate(400.0, 400.0, size=51)[0]
        assert 0.9 < stamp.sum() < 1.05
        bg = read_background_model(d / f"{exp}.{CHIP}.bg.fits")
        assert bg.image_shape == (806, 808) and bg.sigma > 0
        log = (d / f"{exp}.{CHIP}.log").read_text()
        assert "master flat" in log and "PSF model" in log


def test_catalog_columns_have_units(campaign):
    root, _ = campaign
    path = root / "chip" / R_EXP / f"{R_EXP}.{CHIP}.cmf"
    cat, hdr = read_catalog(path)
    with fitsio.FITS(str(path)) as f:
        h = f["SOURCES"].read_header()
    units = {h[f"TTYPE{i}"]: h.get(f"TUNIT{i}", "").strip() for i in range(1, h["TFIELDS"] + 1)}
    expect = {"X_PSF": "pix", "Y_PSF": "pix", "X_PSF_SIG": "pix", "Y_PSF_SIG": "pix",
              "PSF_INST_MAG": "mag", "PSF_INST_MAG_SIG": "mag", "PSF_INST_FLUX": "e-",
              "PSF_INST_FLUX_SIG": "e-", "AP_MAG": "mag", "KRON_FLUX": "e-",
              "KRON_FLUX_ERR": "e-", "KRON_RADIUS": "pix", "MOMENTS_XX": "pix2",
              "MOMENTS_XY": "pix2", "MOMENTS_YY": "pix2", "PSF_MAJOR": "pix",
              "PSF_MINOR": "pix", "PSF_THETA": "deg", "PSF_CHISQ": "", "SKY": "e-/pix",
              "EXT_NSIGMA": "", "FLAGS": ""}
    for col, unit in expect.items():
        assert col in units, col
        assert units[col] == unit, col
    assert cat.size == hdr["NSOURCES"] > 50
    assert hdr["FLAG11"].strip() == "PSF_STAR" and hdr["FLUXUNIT"].strip() == "e-"
    # magnitudes follow the fluxes
    good = cat["PSF_INST_FLUX"] > 0
    assert np.allclose(cat["PSF_INST_MAG"][good], -2.5 * np.log10(cat["PSF_INST_FLUX"][good]),
                       atol=1e-4)
    assert np.count_nonzero(cat["FLAGS"] & FLAG_BITS["PSF_STAR"]) == hdr["NPSFSTAR"]


# ---------------------------------------------------------------------------------- truth

def _truth_sky(root: Path, exp: str) -> np.ndarray:
    """The simulator's sky (e-) on the chip without fringes (which detrending removes)."""
    from ps1mpi.sim.survey import survey_setup

    _, cam, inst, *_ = survey_setup(preset="tiny", seed=1)
    th = _truth_header(root, exp)
    X, _ = cam.chip_to_focal(CHIP, np.arange(cam.chip_nx, dtype=float), np.zeros(1))
    _, Y = cam.chip_to_focal(CHIP, np.zeros(1), np.arange(cam.chip_ny, dtype=float))
    R = inst.field_radius
    return th["SKY_E"] * (1 + th["SKYGRADX"] * X[None, :] / R + th["SKYGRADY"] * Y[:, None] / R)


@pytest.mark.parametrize("exp", [R_EXP, Y_EXP])
def test_detrended_pixels_match_truth_sky(campaign, exp):
    from scipy import ndimage as ndi

    root, _ = campaign
    d = root / "chip" / exp
    img = fitsio.read(str(d / f"{exp}.{CHIP}.ch.fits"))
    var = fitsio.read(str(d / f"{exp}.{CHIP}.wt.fits"))
    mask = fitsio.read(str(d / f"{exp}.{CHIP}.mk.fits"))
    bg = read_background_model(d / f"{exp}.{CHIP}.bg.fits")
    detrended = img + bg.evaluate()
    sky = _truth_sky(root, exp)
    tpath = str(root / f"truth/{exp}/{exp}.{CHIP}.truth.fits")
    tmask = fitsio.read(tpath, ext="MASK")
    src = fitsio.read(tpath, ext="SOURCES")
    # source-free pixels: away from every true source brighter than 30 e-, unmasked
    near = np.zeros(img.shape, bool)
    b = src["FLUX"] > 30
    ix = np.clip(np.rint(src["X"][b]).astype(int), 0, img.shape[1] - 1)
    iy = np.clip(np.rint(src["Y"][b]).astype(int), 0, img.shape[0] - 1)
    near[iy, ix] = True
    near = ndi.binary_dilation(near, iterations=12)
    use = (mask == 0) & (tmask == 0) & ~near & (var > 0)
    assert use.sum() > 100000
    # the flats are normalised over the simulated mosaic (here one chip): one common scale
    scale = np.median(detrended[use] / sky[use])
    assert abs(scale - 1.0) < 0.01, scale
    pull = (detrended[use] - scale * sky[use]) / np.sqrt(var[use])
    med = np.median(pull)
    width = 1.4826 * np.median(np.abs(pull - med))
    assert abs(med) < 0.05, med                 # sky shape right to a twentieth of the noise
    assert 0.95 < width < 1.1, width            # variance image describes the noise
    # large scales: 16 x 16 blocks (cells) match the sky to within a few errors of their mean
    ny, nx = (img.shape[0] // 50) * 50, (img.shape[1] // 50) * 50
    res = np.where(use, detrended - scale * sky, np.nan)[:ny, :nx].reshape(ny // 50, 50,
                                                                           nx // 50, 50)
    n = np.sum(np.isfinite(res), axis=(1, 3))
    blk = np.nanmean(res, axis=(1, 3))[n > 500] / (np.sqrt(np.median(var[use])) /
                                                    np.sqrt(n[n > 500]))
    assert np.median(np.abs(blk)) < 3.0, np.median(np.abs(blk))
    # the background model follows the true sky to a small fraction of the noise
    live = (mask & maskbits.GAP) == 0
    diff = bg.evaluate()[live] - scale * sky[live]
    assert np.sqrt(np.mean(diff ** 2)) < 0.1 * bg.sigma


def test_isolated_star_photometry_matches_truth(campaign):
    from scipy.spatial import cKDTree

    root, _ = campaign
    cat, _ = read_catalog(root / "chip" / R_EXP / f"{R_EXP}.{CHIP}.cmf")
    t = fitsio.read(str(root / f"truth/{R_EXP}/{R_EXP}.{CHIP}.truth.fits"), ext="SOURCES")
    tree = cKDTree(np.column_stack([t["X"], t["Y"]]))
    iso = np.array([all(t["FLUX"][j] < 0.02 * t["FLUX"][i] for j in js if j != i)
                    for i, js in enumerate(tree.query_ball_point(
                        np.column_stack([t["X"], t["Y"]]), 12.0))])
    dist, j = cKDTree(np.column_stack([cat["X_PSF"], cat["Y_PSF"]])).query(
        np.column_stack([t["X"], t["Y"]]))
    sel = (t["KIND"] == 0) & iso & (t["SATURATED"] == 0) & (t["MASKBITS"] == 0) & (dist < 1.0)
    ts, cs = t[sel], cat[j[sel]]
    snr = cs["PSF_INST_FLUX"] / cs["PSF_INST_FLUX_SIG"]
    ok = ((cs["FLAGS"] & CALIBRATION_BAD) == 0) & (snr > 20) & (snr < 150)
    ts, cs = ts[ok], cs[ok]
    assert ok.sum() >= 20
    # one common scale (the zero point absorbs it), then residuals against the errors
    w = (ts["FLUX"] / cs["PSF_INST_FLUX_SIG"]) ** 2
    scale = np.sum(w * cs["PSF_INST_FLUX"] / ts["FLUX"]) / np.sum(w)
    assert 0.95 < scale < 1.10, scale
    pull = (cs["PSF_INST_FLUX"] - scale * ts["FLUX"]) / cs["PSF_INST_FLUX_SIG"]
    med = np.median(pull)
    width = 1.4826 * np.median(np.abs(pull - med))
    assert abs(med) < 0.5 and width < 1.5, (med, width)
    # positions within their errors (truth and catalog share the pixel convention)
    for c in ("X", "Y"):
        p = (cs[f"{c}_PSF"] - ts[c]) / cs[f"{c}_PSF_SIG"]
        assert abs(np.median(p)) < 0.5
        assert 1.4826 * np.median(np.abs(p - np.median(p))) < 1.5
    # nearly every isolated unmasked star of S/N > 10 (truth) is found
    bright = (t["KIND"] == 0) & iso & (t["MASKBITS"] == 0) & (t["FLUX"] > 2000)
    assert np.mean(dist[bright] < 1.5) > 0.95


# ---------------------------------------------------------------------------------- masters

def _index(tmp: Path, entries: list[dict]) -> Path:
    d = tmp / "detrend"
    d.mkdir(parents=True, exist_ok=True)
    (d / "index.json").write_text(json.dumps({"camera": "testcam", "detrends": entries}))
    return d


def _entry(kind, chip="XY01", filter="", start=55000.0, end=56000.0, path=None):
    return {"kind": kind, "camera": "testcam", "chip": chip, "filter": filter,
            "path": path or f"{kind}/{kind}.{chip}.{filter}.{start:.0f}.fits",
            "mjd_start": start, "mjd_end": end, "nframes": 3}


def test_detrend_index_picks_latest_valid_master(tmp_path):
    d = _index(tmp_path, [_entry("flat", filter="r", start=55000), _entry("flat", filter="r",
                          start=55500), _entry("flat", filter="r", start=55900, end=55950),
                          _entry("flat", filter="g", start=55700), _entry("bias", start=55100),
                          _entry("bias", chip="XY10", start=55600)])
    idx = DetrendIndex(d)
    assert idx.select("flat", camera="testcam", chip="XY01", filter="r",
                      mjd=55600.0)["mjd_start"] == 55500
    assert idx.select("flat", camera="testcam", chip="XY01", filter="r",
                      mjd=55920.0)["mjd_start"] == 55900
    assert idx.select("flat", camera="testcam", chip="XY01", filter="i", mjd=55600.0) is None
    # bias is not filter-specific; the chip must match
    assert idx.select("bias", camera="testcam", chip="XY01", filter="r",
                      mjd=55600.0)["mjd_start"] == 55100
    assert idx.select("bias", camera="gpc1", chip="XY01", filter="r", mjd=55600.0) is None
    with pytest.raises(ConfigError, match="no detrend index"):
        DetrendIndex(tmp_path / "nowhere")


def test_missing_master_is_a_configuration_fault(tmp_path):
    import logging

    d = _index(tmp_path, [_entry("bias"), _entry("dark"), _entry("nonlin"), _entry("mask"),
                          _entry("flat", filter="r"), _entry("flat", filter="y")])
    recipe = load_recipe(overrides=[f"chip.detrend_dir={d}"])
    ctx = StageContext(root=tmp_path, recipe=recipe, world=None, ledger_path=tmp_path / "l.h5",
                       log=logging.LoggerAdapter(logging.getLogger("t"), {}))
    stage = ChipStage()
    with pytest.raises(ConfigError, match="no flat master for testcam XY01 filter g"):
        stage.select_masters(ctx, camera="testcam", chip="XY01", filter="g", mjd=55500.0)
    with pytest.raises(ConfigError, match="no fringe master .* filter y"):
        stage.select_masters(ctx, camera="testcam", chip="XY01", filter="y", mjd=55500.0)
    # listed but absent on disk
    with pytest.raises(ConfigError, match="missing"):
        stage.select_masters(ctx, camera="testcam", chip="XY01", filter="r", mjd=55500.0)
    assert ConfigError.fault == 3


def test_redo_writes_identical_products(campaign):
    """The restart rule: a unit redone from scratch (as after a crash) rewrites every data
    product byte for byte (the log, with its times, excepted)."""
    import logging

    from ps1mpi.infra.runtime import WorkUnit

    root, ledger = campaign
    d = root / "chip" / R_EXP
    names = [f"{R_EXP}.{CHIP}.{ext}" for ext in ("ch.fits", "wt.fits", "mk.fits", "cmf",
                                                 "psf.fits", "bg.fits", "b16.fits", "b256.fits")]
    before = {n: (d / n).read_bytes() for n in names}
    with Ledger.open(ledger) as led:
        row = int(np.flatnonzero(led.column("rawImfile", "exp_name") == R_EXP.encode())[0])
        im = led.read("rawImfile", [row], ["path", "filter", "mjd"])
    unit = WorkUnit("chipProcessedImfile", 0, f"{R_EXP}.{CHIP}", 0.0, 0.0,
                    info={"exp_name": R_EXP, "chip": CHIP, "path": im["path"][0].decode(),
                          "filter": im["filter"][0].decode(), "mjd": float(im["mjd"][0]),
                          "camera": "testcam"})
    ctx = StageContext(root=root, recipe=load_recipe(), world=None, ledger_path=ledger,
                       log=logging.LoggerAdapter(logging.getLogger("t"), {}))
    out = ChipStage().process(unit, ctx)
    assert out.quality == 0 and out.summary["n_sources"] > 50
    for n in names:
        assert (d / n).read_bytes() == before[n], n
