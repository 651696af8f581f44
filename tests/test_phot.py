"""`ps1mpi phot` on constructed foreign images, and the catalog assembly (flags, magnitudes).

Images are made with known stars (a PS1_V1 PSF, so that the PSF photometry can be held to its
errors), a sky, Poisson and read noise in ADU with a gain, optionally a TAN WCS, NaN holes and
no instrument keywords.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ps1mpi.algorithms import maskbits
from ps1mpi.algorithms.catalog import (CALIBRATION_BAD, FLAG_BITS, assemble_catalog,
                                       aperture_fraction, cmf_dtype, constant_psf)
from ps1mpi.algorithms.detect import DETECTION_DTYPE
from ps1mpi.algorithms.psf import PSFModel
from ps1mpi.algorithms.psfphot import (PHOT_BLENDED, PHOT_EDGE, PHOT_FIT_FAILED,
                                       PHOT_MASKED, PSFPhotometry)
from ps1mpi.cli import phot
from ps1mpi.stages.chip import read_catalog

fitsio = pytest.importorskip("fitsio")

SHAPE = (400, 380)
GAIN = 2.0          # e-/ADU
SKY_ADU = 400.0
RN_ADU = 3.0


def _stars(rng, n, shape, margin=12, min_sep=14.0):
    """Positions on a jittered grid (isolated) and fluxes (e-) from S/N ~ 8 to ~ 600."""
    ny, nx = shape
    pts = []
    while len(pts) < n:
        x, y = rng.uniform(margin, nx - 1 - margin), rng.uniform(margin, ny - 1 - margin)
        if all((x - a) ** 2 + (y - b) ** 2 > min_sep ** 2 for a, b in pts):
            pts.append((x, y))
    xy = np.array(pts)
    flux = 10 ** rng.uniform(np.log10(400.0), np.log10(2e5), n)
    return xy[:, 0], xy[:, 1], flux


def render(psf, x, y, flux, size=41):
    """Sum of the stars (e-) on the image grid (stamps clipped at the edges)."""
    pad = size
    canvas = np.zeros((SHAPE[0] + 2 * pad, SHAPE[1] + 2 * pad))
    st = psf.evaluate(x, y, size=size)
    ox, oy = psf.stamp_origin(x, y, size)
    for k in range(x.size):
        canvas[oy[k] + pad:oy[k] + pad + size, ox[k] + pad:ox[k] + pad + size] += flux[k] * st[k]
    return canvas[pad:-pad, pad:-pad]


def make_image(path: Path, *, nstars=100, seed=1, wcs=True, nan_hole=True, gain_keyword=False,
               fwhm=4.0, sky_adu=SKY_ADU, sky_subtracted=False, flux=None):
    """Write a foreign image (ADU) and return its truth (x, y, flux in e-, psf, wcs)."""
    rng = np.random.default_rng(seed)
    psf = constant_psf(SHAPE, fwhm, 0.8 * fwhm, 30.0)
    x, y, f = _stars(rng, nstars, SHAPE)
    flux = f if flux is None else np.asarray(flux, dtype=np.float64)
    light = sky_adu * GAIN + render(psf, x, y, flux)
    e = rng.poisson(light).astype(np.float64) + rng.normal(0, RN_ADU * GAIN, SHAPE)
    img = (e / GAIN).astype(np.float32)
    if sky_subtracted:
        img -= np.float32(sky_adu)
    if nan_hole:
        img[40:70, 200:240] = np.nan
    cards = [{"name": "OBJECT", "value": "test field"}, {"name": "EXPTIME", "value": 60.0}]
    w = None
    if wcs:
        from astropy.wcs import WCS
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [150.0, 2.2]
        w.wcs.crpix = [150.5, 160.5]
        w.wcs.cdelt = [-0.4 / 3600.0, 0.4 / 3600.0]
        cards += [{"name": k, "value": v} for k, v in w.to_header().items()
                  if k not in ("COMMENT", "HISTORY")]
    if gain_keyword:
        cards.append({"name": "GAIN", "value": GAIN})
    fitsio.write(str(path), img, header=cards, clobber=True)
    return dict(x=x, y=y, flux=flux, psf=psf, wcs=w, image=img)


def _run(argv):
    return phot.main(phot.parse([str(a) for a in argv]))


def _match(cat, truth, radius=1.0):
    from scipy.spatial import cKDTree
    d, j = cKDTree(np.column_stack([cat["X_PSF"], cat["Y_PSF"]])).query(
        np.column_stack([truth["x"], truth["y"]]))
    return d < radius, j


def test_foreign_image_with_wcs_and_nans(tmp_path):
    img = tmp_path / "field.fits"
    truth = make_image(img, gain_keyword=True)
    assert _run([img]) == 0
    cat, hdr = read_catalog(tmp_path / "field.cmf")
    assert hdr["GAIN"] == GAIN and hdr["WCS"] is True and hdr["FLUXUNIT"].strip() == "e-"
    assert hdr["OBJECT"].strip() == "test field"
    found, j = _match(cat, truth)
    in_hole = (truth["x"] > 190) & (truth["x"] < 250) & (truth["y"] > 30) & (truth["y"] < 80)
    snr_true = truth["flux"] / np.sqrt(truth["flux"] + 4 * np.pi * (4.0 / 2.355) ** 2 * 0.8
                                       * (SKY_ADU * GAIN + (RN_ADU * GAIN) ** 2))
    assert np.all(found[(snr_true > 10) & ~in_hole])
    # nothing is detected inside the NaN hole
    assert not np.any((cat["X_PSF"] > 200) & (cat["X_PSF"] < 239) & (cat["Y_PSF"] > 40)
                      & (cat["Y_PSF"] < 69))
    c = cat[j[found & ~in_hole]]
    t = {k: truth[k][found & ~in_hole] for k in ("x", "y", "flux")}
    good = (c["FLAGS"] & CALIBRATION_BAD) == 0
    # fluxes in electrons, unbiased, errors right (the PSF is of the model's family); above
    # S/N ~ 100 the PSF model's own fit error (~0.3%) starts to show, so S/N < 100 here
    pull = (c["PSF_INST_FLUX"] - t["flux"]) / c["PSF_INST_FLUX_SIG"]
    sel = good & (t["flux"] / c["PSF_INST_FLUX_SIG"] < 100)
    assert sel.sum() > 40
    assert abs(np.median(pull[sel])) < 0.5
    assert 0.75 < np.std(pull[sel]) < 1.3
    ratio = c["PSF_INST_FLUX"][good] / t["flux"][good]
    assert np.median(ratio[t["flux"][good] > 50000]) == pytest.approx(1.0, abs=0.01)
    for axis in ("x", "y"):
        p = (c[f"{axis.upper()}_PSF"] - t[axis]) / c[f"{axis.upper()}_PSF_SIG"]
        assert abs(np.median(p[sel])) < 0.5
        assert 0.7 < np.std(p[sel]) < 1.3
    # sky positions from the image WCS
    ra, dec = truth["wcs"].all_pix2world(t["x"], t["y"], 0)
    dra = (c["RA_PSF"] - ra) * np.cos(np.radians(dec)) * 3600.0
    ddec = (c["DEC_PSF"] - dec) * 3600.0
    assert np.max(np.hypot(dra, ddec)[good & (c["PSF_INST_FLUX_SIG"] < 0.02 * t["flux"])]) < 0.05
    # point sources are not extended; the sky is the true sky in electrons
    assert np.mean((c["FLAGS"][good] & FLAG_BITS["EXTENDED"]) != 0) < 0.05
    assert np.median(c["SKY"]) == pytest.approx(SKY_ADU * GAIN, rel=0.01)


def test_no_wcs_no_gain_keyword_uses_recipe_defaults(tmp_path):
    img = tmp_path / "plain.fits"
    truth = make_image(img, wcs=False, gain_keyword=False, nan_hole=False)
    out = tmp_path / "cat.fits"
    assert _run([img, "--out", out, "--set", "chip.phot.gain=2.0"]) == 0
    cat, hdr = read_catalog(out)
    assert "RA_PSF" not in cat.dtype.names and hdr["WCS"] is False
    assert hdr["GAIN"] == 2.0
    found, j = _match(cat, truth)
    bright = truth["flux"] > 20000
    ratio = cat["PSF_INST_FLUX"][j[found & bright]] / truth["flux"][found & bright]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.01)
    # --gain 0 keeps image units (ADU): fluxes scale by 1/gain
    out2 = tmp_path / "adu.fits"
    assert _run([img, "--out", out2, "--gain", "0"]) == 0
    cat2, hdr2 = read_catalog(out2)
    assert hdr2["FLUXUNIT"].strip() == "count"
    f2, j2 = _match(cat2, truth)
    both = found & f2 & bright
    r = cat2["PSF_INST_FLUX"][j2[both]] / cat["PSF_INST_FLUX"][j[both]]
    assert np.median(r) == pytest.approx(1.0 / 2.0, rel=0.01)


@pytest.mark.parametrize("kind", ["variance", "inverse-variance"])
def test_weight_image(tmp_path, kind):
    img = tmp_path / "w.fits"
    truth = make_image(img, wcs=False, gain_keyword=True, sky_subtracted=True, nan_hole=False)
    # true variance in ADU^2 (sky-subtracted image: the empirical sky is 0, the noise is not)
    model = SKY_ADU * GAIN + render(truth["psf"], truth["x"], truth["y"], truth["flux"])
    var_adu = (model + (RN_ADU * GAIN) ** 2) / GAIN ** 2
    wimg = var_adu if kind == "variance" else 1.0 / var_adu
    wimg = wimg.astype(np.float32)
    # zero weight (or zero variance) is "no data": a block around the first star
    x0, y0 = int(round(truth["x"][0])), int(round(truth["y"][0]))
    wimg[y0 - 8:y0 + 9, x0 - 8:x0 + 9] = 0.0
    wpath = tmp_path / "w.wt.fits"
    fitsio.write(str(wpath), wimg, clobber=True)
    out = tmp_path / f"{kind}.cmf"
    assert _run([img, "--weight", wpath, "--weight-type", kind, "--out", out]) == 0
    cat, _ = read_catalog(out)
    found, j = _match(cat, truth)
    c = cat[j[found]]
    f = truth["flux"][found]
    sel = ((c["FLAGS"] & CALIBRATION_BAD) == 0) & (f / c["PSF_INST_FLUX_SIG"] < 100)
    pull = (c["PSF_INST_FLUX"] - f) / c["PSF_INST_FLUX_SIG"]
    assert abs(np.median(pull[sel])) < 0.5
    assert 0.75 < np.std(pull[sel]) < 1.3
    assert not found[0] and found[1:].sum() > 50          # nothing measured where no data


def test_sparse_image_uses_constant_psf(tmp_path):
    img = tmp_path / "sparse.fits"
    truth = make_image(img, nstars=2, wcs=False, nan_hole=False, gain_keyword=True,
                       flux=[50000.0, 20000.0])
    assert _run([img]) == 0
    cat, hdr = read_catalog(tmp_path / "sparse.cmf")
    found, j = _match(cat, truth)
    assert found.all() and cat.size == 2
    assert np.all((cat["FLAGS"] & FLAG_BITS["PSF_FALLBACK"]) != 0)
    assert hdr["PROBLEM"].strip() == "psf_failed"
    # the constant model has the measured FWHM: fluxes within a few per cent
    ratio = cat["PSF_INST_FLUX"][j] / truth["flux"]
    assert np.all(np.abs(ratio - 1.0) < 0.05), ratio
    # without the fallback the image is bad data
    assert _run([img, "--out", tmp_path / "nofb.cmf", "--set", "chip.phot.psf_fallback=false"]) == 1


def test_blank_image_is_bad_data(tmp_path, capsys):
    img = tmp_path / "blank.fits"
    rng = np.random.default_rng(3)
    fitsio.write(str(img), rng.normal(100.0, 5.0, (200, 200)).astype(np.float32), clobber=True)
    assert _run([img]) == 1
    cat, hdr = read_catalog(tmp_path / "blank.cmf")
    assert cat.size == 0 and hdr["PROBLEM"].strip() == "no_sources"
    assert "empty catalog written" in capsys.readouterr().err
    # an image without a single finite pixel: no sky, bad data too (not a crash)
    nan = tmp_path / "nan.fits"
    fitsio.write(str(nan), np.full((100, 100), np.nan, np.float32), clobber=True)
    assert _run([nan]) == 1
    cat, hdr = read_catalog(tmp_path / "nan.cmf")
    assert cat.size == 0 and hdr["PROBLEM"].strip() == "no_sky"


def test_bad_inputs_exit_2(tmp_path, capsys):
    assert _run([tmp_path / "missing.fits"]) == 2
    assert "missing.fits: image not found" in capsys.readouterr().err
    img = tmp_path / "a.fits"
    make_image(img, nstars=5, wcs=False, nan_hole=False)
    w = tmp_path / "w.fits"
    fitsio.write(str(w), np.ones((10, 10), np.float32), clobber=True)
    assert _run([img, "--weight", w]) == 2
    assert "weight: shape (10, 10)" in capsys.readouterr().err
    assert _run([img, "--set", "chip.phot.weight_type=sigma", "--weight", img]) == 2


# ------------------------------------------------------------------------------ catalog

def _fake_inputs(n):
    det = np.zeros(n, DETECTION_DTYPE)
    det["id"] = np.arange(n)
    det["x"] = det["y"] = np.arange(n) * 10.0 + 20.0
    det["significance"] = 10.0
    det["flux_peak"] = [100.0, 50.0, 0.0, 10.0][:n]
    ones = np.ones(n)
    ph = PSFPhotometry(x=det["x"] + 0.1, y=det["y"] - 0.1, x_sig=0.05 * ones, y_sig=0.05 * ones,
                       flux=np.array([1000.0, -5.0, 100.0, 200.0][:n]),
                       flux_sig=np.array([10.0, 5.0, 10.0, 20.0][:n]), sky=np.zeros(n),
                       sky_sig=np.zeros(n), chi2_dof=ones, n_pix=np.full(n, 50),
                       n_dof=np.full(n, 47), psf_qf=ones, ext_nsigma=np.array([0.0, 1.0, 8.0,
                                                                               -1.0][:n]),
                       ap_flux=np.zeros(n), ap_flux_sig=np.zeros(n), psf_major=4 * ones,
                       psf_minor=3 * ones, psf_theta=np.zeros(n), group=np.arange(n),
                       flags=np.array([0, PHOT_FIT_FAILED, PHOT_BLENDED | PHOT_EDGE,
                                       PHOT_MASKED][:n], np.uint16))
    from ps1mpi.algorithms.moments import KRON_DTYPE, MOMENTS_DTYPE
    mom = np.zeros(n, np.dtype(MOMENTS_DTYPE.descr + KRON_DTYPE.descr
                               + [("AP_RADIUS", "f4"), ("AP_FLUX", "f4"), ("AP_FLUX_ERR", "f4"),
                                  ("AP_MASKED_FRAC", "f4")]))
    mom["AP_FLUX"] = [800.0, 1.0, 90.0, 150.0][:n]
    mom["AP_RADIUS"] = 8.0
    mom["KRON_FLUX"] = 1.0
    return det, ph, mom


def test_assemble_catalog_flags_and_magnitudes():
    det, ph, mom = _fake_inputs(4)
    det["saturated"][3] = True
    det["blend"][2] = True
    det["masked"][1] = True
    cat = assemble_catalog(det, ph, mom, sky=np.full(4, 100.0), sky_sigma=np.full(4, 3.0),
                           ap_fraction=np.array([0.8, 0.8, 0.8, 0.5]),
                           psf_star_index=np.array([0]), ext_threshold=3.0)
    assert cat.dtype == cmf_dtype()
    B = FLAG_BITS
    assert cat["FLAGS"][0] == B["PSF_STAR"]
    assert cat["FLAGS"][1] & B["FIT_FAILED"] and cat["FLAGS"][1] & B["PEAK_MASKED"]
    assert cat["FLAGS"][2] & B["BLENDED"] and cat["FLAGS"][2] & B["EDGE"]
    assert cat["FLAGS"][2] & B["EXTENDED"]
    assert cat["FLAGS"][3] & B["SATURATED"] and cat["FLAGS"][3] & B["MASKED"]
    assert (cat["FLAGS"][3] & CALIBRATION_BAD) and not (cat["FLAGS"][0] & CALIBRATION_BAD)
    assert cat["PSF_INST_MAG"][0] == pytest.approx(-7.5)
    assert np.isnan(cat["PSF_INST_MAG"][1])            # negative flux: no magnitude
    assert cat["PSF_INST_MAG_SIG"][0] == pytest.approx(2.5 / np.log(10) * 0.01, rel=1e-5)
    # AP_MAG is the aperture flux scaled by the PSF's fraction inside the aperture
    assert cat["AP_MAG_RAW"][0] == pytest.approx(-2.5 * np.log10(800.0), rel=1e-6)
    assert cat["AP_MAG"][0] == pytest.approx(-2.5 * np.log10(800.0 / 0.8), rel=1e-6)
    assert cat["SKY"][0] == 100.0 and cat["IPP_IDET"].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="sky has 3 rows"):
        assemble_catalog(det, ph, mom, sky=np.zeros(3), sky_sigma=np.zeros(4),
                         ap_fraction=np.ones(4))


def test_aperture_fraction_is_the_models_curve_of_growth():
    psf = constant_psf((200, 200), 4.0)
    big = aperture_fraction(psf, np.array([100.3]), np.array([99.8]), 60.0)[0]
    # the model is normalised to unit flux inside an ellipse of equal area to r = 25 px
    inside = aperture_fraction(psf, np.array([100.3]), np.array([99.8]), 25.0)[0]
    assert inside == pytest.approx(1.0, abs=0.003)
    assert big > inside
    r2 = aperture_fraction(psf, np.array([100.0, 100.5]), np.array([100.0, 100.5]), 2.0)
    assert 0.1 < r2[0] < inside and abs(r2[0] - r2[1]) < 0.02
    assert np.isnan(aperture_fraction(psf, np.array([np.nan]), np.array([1.0]), 3.0)[0])
    assert isinstance(psf, PSFModel) and psf.shape_at(50, 50).fwhm_major == pytest.approx(4.0)
    assert maskbits.GAP  # the mask bits the phot command uses exist
