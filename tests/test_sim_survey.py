"""End to end: the 'tiny' survey on two chips of the test camera, checked against its truth.

The raw chips are reduced here by hand (overscan, nonlinearity, bias, dark, gain, flat with the
simulated masters) and compared with the truth tables; the masters are compared with the
camera model's true signatures; the run is repeated (same seed, other seed, two MPI ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

import fitsio
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from ps1mpi.algorithms import maskbits, masters
from ps1mpi.infra.rawfile import read_raw_chip, validate_raw_chip
from ps1mpi.sim import psf as P
from ps1mpi.sim.catalogs import read_survey
from ps1mpi.sim.detrend import read_detrend_index, read_nonlin
from ps1mpi.sim.survey import raw_path, simulate_survey, survey_setup, truth_path

from .mpi_util import mpi_run

SEED = 5                  # this seed puts the camera's dead cell on XY11
CHIPS = ["XY10", "XY11"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    summary = simulate_survey(out, preset="tiny", seed=SEED, chips=CHIPS)
    setup = survey_setup(preset="tiny", seed=SEED)
    return out, summary, setup


def _index(out):
    return {(e["kind"], e["chip"], e["filter"]): Path(out) / "detrend" / e["path"] for e in read_detrend_index(Path(out) / "detrend")}


def _reduce(out, exp, chip):
    """Detrend a raw chip by hand with the simulated masters -> electrons, flat-fielded."""
    idx = _index(out)
    raw = read_raw_chip(raw_path(out, exp, chip))
    cam = survey_setup(preset="tiny", seed=SEED)[1]
    nl = read_nonlin(idx[("nonlin", chip, "")])
    img = np.zeros((cam.chip_ny, cam.chip_nx), np.float32)
    for cell in cam.cell_names:
        d = masters.overscan_correct(raw.cells[cell], datasec=raw.datasec(cell), biassec=raw.biassec(cell))
        d = masters.apply_nonlinearity(d, *nl[cell])
        x0, y0 = cam.cell_origin(cell)
        img[y0:y0 + cam.cell_ny, x0:x0 + cam.cell_nx] = d
    img -= fitsio.read(str(idx[("bias", chip, "")]))
    img -= fitsio.read(str(idx[("dark", chip, "")])) * raw.header["DARKTIME"]
    for cell in cam.cell_names:
        x0, y0 = cam.cell_origin(cell)
        img[y0:y0 + cam.cell_ny, x0:x0 + cam.cell_nx] *= raw.cell_headers[cell]["GAIN"]
    flat = fitsio.read(str(idx[("flat", chip, raw.header["FILTER"])]))
    with np.errstate(all="ignore"):
        img = np.where(flat > 0.3, img / flat, 0.0)
    return img, raw


def test_outputs_exist_and_are_valid(tiny):
    out, summary, (pre, cam, inst, plan, sky, dist) = tiny
    assert summary.n_chips == 4 * len(CHIPS) and len(summary.exposures) == 4
    for exp in summary.exposures:
        for chip in CHIPS:
            p = raw_path(out, exp, chip)
            assert validate_raw_chip(p, camera=cam) == []
            with fits.open(p) as h:                         # astropy reads it
                assert h[0].header["EXPNAME"] == exp and h[0].header["DETECTOR"] == chip
                assert len(h) == 1 + len(cam.cell_names)
            with fitsio.FITS(str(p)) as f:                  # fitsio too
                assert f["xy00"].read().dtype == np.uint16
            assert truth_path(out, exp, chip).exists()
    tab, hdr, d = read_survey(out / "survey.fits")
    assert len(tab) == 4 and hdr["PRESET"] == "tiny" and d["order"] >= 3
    ref = fitsio.read(str(out / "refcat" / "refcat.fits"))
    assert ref.size > 100 and "W" not in ref.dtype.names
    idx = _index(out)
    for chip in CHIPS:
        for kind, f in (("bias", ""), ("dark", ""), ("mask", ""), ("nonlin", ""), ("flat", "r"), ("flat", "y"),
                        ("fringe", "y")):
            assert idx[(kind, chip, f)].exists()
    entries = read_detrend_index(out / "detrend")
    assert all(e["mjd_start"] < plan["mjd"].min() and e["mjd_end"] > plan["mjd"].max() for e in entries)
    for name in ("stars", "galaxies", "transients", "movers"):
        assert (out / "truth" / f"{name}.fits").exists()
    assert json.loads((out / "summary.json").read_text())["n_chips"] == summary.n_chips


def test_header_pointing_error_and_true_wcs(tiny):
    out, summary, (pre, cam, inst, plan, sky, dist) = tiny
    exp = summary.exposures[0]
    raw = read_raw_chip(raw_path(out, exp, "XY10"), cells=["xy00"])
    h = fitsio.read_header(str(truth_path(out, exp, "XY10")))
    off = np.hypot((raw.header["RA"] - h["BORE_RA"]) * np.cos(np.radians(h["BORE_DEC"])),
                   raw.header["DEC"] - h["BORE_DEC"]) * 3600
    assert 0 < off <= pre.pointing_error
    # the true WCS in the truth header maps the truth positions
    t = fitsio.read(str(truth_path(out, exp, "XY10")), ext="SOURCES")
    with fits.open(truth_path(out, exp, "XY10")) as hh:
        w = WCS(hh["MASK"].header)
    ra, dec = w.all_pix2world(t["X"], t["Y"], 0)
    dra = (ra - t["RA"]) * np.cos(np.radians(dec)) * 3.6e6
    assert np.abs(dra).max() < 5 and np.abs((dec - t["DEC"]) * 3.6e6).max() < 5      # mas


def _isolated_stars(t, img, cam, *, fmin=2e4, fmax=5e5):
    """Bright unsaturated stars with no comparable neighbour, whole 41x41 box inside one cell."""
    out = []
    for r in t[(t["KIND"] == 0) & (t["SATURATED"] == 0) & (t["MASKBITS"] == 0) & (t["FLUX"] > fmin)
               & (t["FLUX"] < fmax)]:
        d = np.hypot(t["X"] - r["X"], t["Y"] - r["Y"])
        if np.any((d > 0) & (d < 20) & (t["FLUX"] > 0.005 * r["FLUX"])):
            continue
        box = cam.cell_at(np.array([r["X"] - 21, r["X"] + 21]), np.array([r["Y"] - 21, r["Y"] + 21]))
        if box[0] == "" or box[0] != box[1]:
            continue
        out.append(r)
    return out


def test_truth_stars_are_where_and_as_bright_as_the_truth_says(tiny):
    out, summary, (pre, cam, inst, plan, sky, dist) = tiny
    ratios, dpos = [], []
    for exp in summary.exposures[:2]:
        row = plan[[n.decode() == exp for n in plan["expname"]]][0]
        psf = P.ExposurePSF(seeing=float(row["seeing"]), beta=float(row["psf_beta"]), e1=float(row["psf_e1"]),
                            e2=float(row["psf_e2"]), astig=float(row["psf_astig"]),
                            fwhm_radial=float(row["psf_fwhm_radial"]), wing_frac=float(row["psf_wing_frac"]),
                            wing_scale=float(row["psf_wing_scale"]), wing_beta=float(row["psf_wing_beta"]),
                            field_radius=inst.field_radius, pixel_scale=cam.pixel_scale)
        for chip in CHIPS:
            img, _ = _reduce(out, exp, chip)
            t = fitsio.read(str(truth_path(out, exp, chip)), ext="SOURCES")
            tmask = fitsio.read(str(truth_path(out, exp, chip)), ext="MASK")
            lay = cam.chip(chip)
            yy, xx = np.mgrid[-20:21, -20:21]
            for r in _isolated_stars(t, img, cam):
                ix, iy = int(round(r["X"])), int(round(r["Y"]))
                if tmask[iy - 20:iy + 21, ix - 20:ix + 21].any():
                    continue                   # a cosmic ray, ghost, spike... in the box adds light
                st = img[iy - 20:iy + 21, ix - 20:ix + 21].astype(np.float64)
                X, Y = cam.chip_to_focal(chip, r["X"], r["Y"])
                model = P.psf_image(psf, float(X), float(Y), size=41, xparity=lay.xparity, yparity=lay.yparity,
                                    dx=r["X"] - ix, dy=r["Y"] - iy).astype(np.float64) * r["FLUX"]
                rr = np.hypot(xx - (r["X"] - ix), yy - (r["Y"] - iy))
                ann = (rr > 14) & (rr < 20)
                bkg = np.median(st[ann]) - np.median(model[ann])
                ap = rr < 8
                ratios.append((st[ap] - bkg).sum() / model[ap].sum())
                # the same windowed centroid on data and on the noiseless truth model
                w = rr < 6
                cd = [((st - bkg) * w * a).sum() / ((st - bkg) * w).sum() for a in (xx, yy)]
                cm = [(model * w * a).sum() / (model * w).sum() for a in (xx, yy)]
                dpos.append(np.hypot(cd[0] - cm[0], cd[1] - cm[1]))
    ratios, dpos = np.array(ratios), np.array(dpos)
    assert ratios.size >= 8
    # flux: the masters (flat ~0.5%, bias, dark) and noise leave a percent or so per star
    assert np.median(ratios) == pytest.approx(1.0, abs=0.01)
    assert np.all(np.abs(ratios - 1) < 0.04), np.sort(ratios)
    # position: hundredths of a pixel
    assert np.median(dpos) < 0.03 and dpos.max() < 0.1


def test_masters_match_the_true_signatures(tiny):
    out, summary, (pre, cam, inst, plan, sky, dist) = tiny
    idx = _index(out)
    for chip in CHIPS:
        sig = inst.chip(chip)
        good = sig.defects == 0
        flat = fitsio.read(str(idx[("flat", chip, "r")]))
        ratio = flat[good] / sig.flat[good]
        assert np.median(ratio) == pytest.approx(1.0, abs=0.01) and masters.robust_sigma(ratio) < 0.01
        bias = fitsio.read(str(idx[("bias", chip, "")]))
        y0, y1, x0, x1 = cam.datasec
        for cell, (sy, sx) in inst.cell_slices().items():
            resid = bias[sy, sx] - sig.bias_pattern[cell][y0:y1, x0:x1]
            rn = sig.cells[cell].read_noise
            assert abs(resid.mean()) < 0.5 and resid.std() < 1.3 * rn / np.sqrt(pre.calibration.n_bias)
        dark = fitsio.read(str(idx[("dark", chip, "")]))
        de = dark.copy()
        for cell, (sy, sx) in inst.cell_slices().items():
            de[sy, sx] *= sig.cells[cell].gain
        hot = sig.dark > 5.0
        assert np.allclose(de[hot], sig.dark[hot], rtol=0.1)
        assert abs(np.median(de[good]) - np.median(sig.dark[good])) < 0.01
        mask = fitsio.read(str(idx[("mask", chip, "")]))
        np.testing.assert_array_equal(mask & maskbits.GAP, sig.defects & maskbits.GAP)
        np.testing.assert_array_equal(mask & maskbits.DEAD_CELL, sig.defects & maskbits.DEAD_CELL)
        agree = ((mask & maskbits.DETECTOR) > 0) == ((sig.defects & maskbits.DETECTOR) > 0)
        assert agree.mean() > 0.9995
        nl = read_nonlin(idx[("nonlin", chip, "")])
        for cell, el in sig.cells.items():
            if cell in sig.dead_cells:
                continue
            s = np.array([500.0, 5000.0, 20000.0, 40000.0, 52000.0])
            m = s * (1 - el.nonlin * (s / el.linear_range) ** 2)
            np.testing.assert_allclose(masters.apply_nonlinearity(m, *nl[cell]), s, rtol=3e-3)
        # the fringe template is the pattern without its large scales (removed with the
        # illumination): compare with the true pattern treated the same way
        fr = fitsio.read(str(idx[("fringe", chip, "y")]))
        true = masters.fringe_template(1.0 + inst.fringe_pattern(chip, "y"), mask=~good, box=128)
        assert np.corrcoef(fr[good], true[good])[0, 1] > 0.85
        amp = (fr[good] * true[good]).sum() / (true[good] ** 2).sum()
        assert 0.6 < amp < 1.4                 # the mean fringe factor of the frames (0.7-1.3 each)


def test_truth_mask_and_artefacts(tiny):
    out, summary, (pre, cam, inst, plan, sky, dist) = tiny
    bits = 0
    n_cr = 0
    for exp in summary.exposures:
        for chip in CHIPS:
            tp = truth_path(out, exp, chip)
            mask = fitsio.read(str(tp), ext="MASK")
            bits |= int(np.bitwise_or.reduce(mask.ravel()))
            n_cr += fitsio.read_header(str(tp), ext="COSMICS")["NAXIS2"]
            raw = read_raw_chip(raw_path(out, exp, chip))
            for cell, (sy, sx) in inst.cell_slices().items():
                sat = (mask[sy, sx] & maskbits.SAT) > 0
                if sat.any():
                    y0, y1, x0, x1 = raw.datasec(cell)
                    assert (raw.cells[cell][y0:y1, x0:x1][sat] >= raw.cell_headers[cell]["SATURATE"]).mean() > 0.95
    for b in (maskbits.GAP, maskbits.DEAD_CELL, maskbits.DETECTOR, maskbits.SAT, maskbits.BLEED,
              maskbits.SPIKE, maskbits.CROSSTALK):
        assert bits & b, f"no pixel with mask bit {b:#06x} in the tiny survey"
    assert n_cr > 0
    # the dead cell holds no light: bias + read noise only
    dead = [(c, cell) for c in CHIPS for cell in inst.dead_cells(c)]
    assert dead, "the tiny camera has a dead cell on XY11"
    chip, cell = dead[0]
    raw = read_raw_chip(raw_path(out, summary.exposures[0], chip), cells=[cell])
    d = masters.overscan_correct(raw.cells[cell], datasec=raw.datasec(cell), biassec=raw.biassec(cell))
    y0, y1, x0, x1 = raw.datasec(cell)
    d -= inst.chip(chip).bias_pattern[cell][y0:y1, x0:x1]
    assert abs(np.median(d)) < 1.0
    # read noise, digitisation and what the 3-row overscan smoothing leaves of the row pattern
    assert masters.robust_sigma(d) < 1.25 * inst.electronics(chip)[cell].read_noise
    # cosmic rays are bright in the reduced image
    exp = summary.exposures[0]
    img, _ = _reduce(out, exp, "XY10")
    m = fitsio.read(str(truth_path(out, exp, "XY10")), ext="MASK")
    cr = (m & maskbits.CR) > 0
    if cr.any():
        assert np.median(img[cr]) > np.median(img[(m == 0)]) + 30


def test_same_seed_same_pixels_other_seed_other_pixels(tiny, tmp_path):
    out, summary, _ = tiny
    exp = summary.exposures[0]
    simulate_survey(tmp_path / "a", preset="tiny", seed=SEED, chips=["XY10"], exposures=[exp], detrend=False)
    simulate_survey(tmp_path / "b", preset="tiny", seed=SEED + 1, chips=["XY10"], exposures=[exp], detrend=False)
    r0 = read_raw_chip(raw_path(out, exp, "XY10"))
    r1 = read_raw_chip(raw_path(tmp_path / "a", exp, "XY10"))
    r2 = read_raw_chip(raw_path(tmp_path / "b", exp, "XY10"))
    for c in r0.cells:
        np.testing.assert_array_equal(r0.cells[c], r1.cells[c])
        assert not np.array_equal(r0.cells[c], r2.cells[c])
    t0 = fitsio.read(str(truth_path(out, exp, "XY10")), ext="SOURCES")
    t1 = fitsio.read(str(truth_path(tmp_path / "a", exp, "XY10")), ext="SOURCES")
    np.testing.assert_array_equal(t0, t1)


@pytest.mark.mpi
def test_two_ranks_make_the_same_survey(tiny, tmp_path):
    out, summary, _ = tiny
    exp = summary.exposures[1]
    proc = mpi_run(2, ["-m", "ps1mpi.cli.sim", "--out", tmp_path / "m", "--preset", "tiny", "--seed", SEED,
                       "--chips", ",".join(CHIPS), "--exposures", exp, "--quiet"], timeout=600)
    assert proc.returncode == 0, proc.stderr
    for chip in CHIPS:
        a = read_raw_chip(raw_path(out, exp, chip))
        b = read_raw_chip(raw_path(tmp_path / "m", exp, chip))
        for c in a.cells:
            np.testing.assert_array_equal(a.cells[c], b.cells[c])
    ia, ib = _index(out), _index(tmp_path / "m")
    assert set(ia) == set(ib)
    for key in ia:
        if key[0] != "nonlin":
            np.testing.assert_array_equal(fitsio.read(str(ia[key])), fitsio.read(str(ib[key])))
