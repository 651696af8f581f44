"""Detection, footprints, deblending and the FWHM estimate on constructed images."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.special import erf

from ps1mpi.algorithms import maskbits
from ps1mpi.algorithms.detect import (DETECTION_DTYPE, FWHM_PER_SIGMA, detect_sources,
                                      estimate_fwhm, significance_image)

SKY = 10.0          # sky noise per pixel (ADU)
PSF_SIGMA = 2.0     # pixels
FWHM = FWHM_PER_SIGMA * PSF_SIGMA


def add_stars(img, xs, ys, flux, sigma=PSF_SIGMA):
    """Add pixel-integrated circular Gaussians of total ``flux`` (in place)."""
    ny, nx = img.shape
    half = int(np.ceil(6 * sigma))
    off = np.arange(-half, half + 1)
    for x, y, f in zip(np.atleast_1d(xs), np.atleast_1d(ys), np.atleast_1d(flux)):
        xi, yi = int(round(x)), int(round(y))
        gx, gy = xi + off, yi + off
        s2 = np.sqrt(2) * sigma
        ex = 0.5 * (erf((gx + 0.5 - x) / s2) - erf((gx - 0.5 - x) / s2))
        ey = 0.5 * (erf((gy + 0.5 - y) / s2) - erf((gy - 0.5 - y) / s2))
        ys_ = slice(max(gy[0], 0), min(gy[-1] + 1, ny))
        xs_ = slice(max(gx[0], 0), min(gx[-1] + 1, nx))
        st = f * np.outer(ey, ex)
        img[ys_, xs_] += st[ys_.start - gy[0]:ys_.stop - gy[0], xs_.start - gx[0]:xs_.stop - gx[0]]
    return img


def flux_for_snr(snr, sigma=PSF_SIGMA, sky=SKY):
    """Total flux of a Gaussian star whose optimal (PSF-weighted) S/N is ``snr``."""
    return snr * sky * np.sqrt(4.0 * np.pi) * sigma


def noise_image(shape, seed):
    rng = np.random.default_rng(seed)
    img = rng.normal(0.0, SKY, shape).astype(np.float32)
    return img, np.full(shape, SKY ** 2, np.float32), np.zeros(shape, np.uint16)


def test_completeness_of_isolated_10_sigma_stars():
    n = 2000
    img, var, mask = noise_image((n, n), 1)
    # 400 stars on a jittered grid (>= 80 px apart), away from the edges
    g = np.arange(60, n - 40, 95)
    gx, gy = np.meshgrid(g, g)
    rng = np.random.default_rng(2)
    xs = gx.ravel()[:400] + rng.uniform(-5, 5, 400)
    ys = gy.ravel()[:400] + rng.uniform(-5, 5, 400)
    add_stars(img, xs, ys, np.full(400, flux_for_snr(10.0)))
    src = detect_sources(img, var, mask, fwhm=FWHM, threshold=5.0)
    assert src.dtype == DETECTION_DTYPE
    d, j = cKDTree(np.column_stack([src["x"], src["y"]])).query(np.column_stack([xs, ys]))
    found = d < 1.5
    assert found.mean() >= 0.99
    # the matched filter measures the S/N: ~10 on average
    assert np.median(src["significance"][j[found]]) == pytest.approx(10.0, rel=0.1)
    # and the PSF peak amplitude of a 10-sigma star
    peak = flux_for_snr(10.0) / (2 * np.pi * PSF_SIGMA ** 2)
    assert np.median(src["amp_peak"][j[found]]) == pytest.approx(peak, rel=0.1)
    # sub-pixel peaks are good to a fraction of a pixel
    assert np.median(d[found]) < 0.4
    # few extras: noise peaks at 5 sigma are rare (about 0.15 per Mpix expected)
    assert len(src) - found.sum() <= 4


def test_false_positives_in_pure_noise_below_one_per_megapixel():
    n = 2000
    img, var, mask = noise_image((n, n), 4)
    src = detect_sources(img, var, mask, fwhm=FWHM, threshold=5.0)
    assert len(src) < 4          # 4 Mpix
    # at a low threshold the noise peaks do appear, so the test can fail
    low = detect_sources(img, var, mask, fwhm=FWHM, threshold=3.5, footprint_threshold=2.5)
    assert len(low) > 50


def test_close_pair_at_one_and_a_half_fwhm_is_deblended():
    img, var, mask = noise_image((121, 121), 5)
    sep = 1.5 * FWHM
    x1, x2, y0 = 60.0 - sep / 2, 60.0 + sep / 2, 60.3
    # in the matched-filter image the pair is 2.5 sigma apart: the saddle is ~12% below the
    # peaks, 13 sigma at S/N 100; a flux ratio much above 1.2 would leave no second maximum
    add_stars(img, [x1, x2], [y0, y0], [flux_for_snr(110.0), flux_for_snr(100.0)])
    src = detect_sources(img, var, mask, fwhm=FWHM)
    assert len(src) == 2
    assert np.all(src["blend"])
    assert src["footprint_id"][0] == src["footprint_id"][1]
    assert src["n_peaks"].tolist() == [2, 2]
    assert src["blend_primary"].tolist() == [True, False]
    assert abs(src["x"][0] - x1) < 1.0 and abs(src["x"][1] - x2) < 1.0
    # a pair closer than the PSF has no saddle: one source
    img2, _, _ = noise_image((121, 121), 6)
    add_stars(img2, [60.0 - 0.35 * FWHM, 60.0 + 0.35 * FWHM], [60.0, 60.0],
              [flux_for_snr(150.0)] * 2)
    src2 = detect_sources(img2, var, mask, fwhm=FWHM)
    assert len(src2) == 1 and not src2["blend"][0]


def test_noise_bumps_on_an_extended_source_are_culled():
    # a flat disc (3 sigma per pixel, ~25 sigma in the matched filter): noise makes many
    # local maxima on its top, none separated from the brightest by a 4-sigma saddle
    img, var, mask = noise_image((201, 201), 8)
    yy, xx = np.mgrid[0:201, 0:201]
    img += (3 * SKY * (np.hypot(xx - 100, yy - 100) < 25)).astype(np.float32)
    src = detect_sources(img, var, mask, fwhm=FWHM)
    assert len(src) == 1 and not src["blend"][0]
    raw = detect_sources(img, var, mask, fwhm=FWHM, cull_nsigma=0.0, cull_padding=0.0)
    assert len(raw) > 5
    assert np.all(raw["blend"]) and raw["blend_primary"].sum() == 1
    assert np.all(np.hypot(raw["x"] - 100, raw["y"] - 100) < 26)


def test_significance_and_amplitude_of_a_matched_star_are_exact():
    # a star with exactly the filter's profile, centred on a pixel, no noise
    n = 81
    yy, xx = np.mgrid[0:n, 0:n]
    amp = 500.0
    r2 = (xx - 40) ** 2 + (yy - 40) ** 2
    img = (amp * np.exp(-r2 / (2 * PSF_SIGMA ** 2))).astype(np.float32)
    var = np.full((n, n), SKY ** 2, np.float32)
    sig, a = significance_image(img, var, None, fwhm=FWHM)
    r = np.arange(-8, 9)
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * PSF_SIGMA ** 2))
    assert a[40, 40] == pytest.approx(amp, rel=1e-5)
    assert sig[40, 40] == pytest.approx(amp * np.sqrt((g ** 2).sum()) / SKY, rel=1e-5)


def test_masked_garbage_gives_no_detections_and_flags_are_set():
    n = 300
    img, var, mask = noise_image((n, n), 10)
    img[100:150, 100:200] = 1e5                    # a dead region, masked
    mask[100:150, 100:200] = maskbits.DEAD_CELL
    img[:, 250] = np.nan                           # a bad column, masked
    mask[:, 250] = maskbits.DETECTOR
    add_stars(img, [3.0, 60.2], [200.0, 60.7], [flux_for_snr(50.0), flux_for_snr(2000.0)])
    mask[59:62, 59:62] |= maskbits.SAT            # saturated core of the bright star
    src = detect_sources(img, var, mask, fwhm=FWHM)
    assert len(src) == 2
    bright = src[np.argmin(np.hypot(src["x"] - 60.2, src["y"] - 60.7))]
    edge = src[np.argmin(np.hypot(src["x"] - 3.0, src["y"] - 200.0))]
    assert bright["saturated"] and not bright["edge"]
    assert edge["edge"] and not edge["saturated"]
    assert bright["masked"]          # its peak pixel carries the SAT bit


def test_fwhm_estimate_from_bright_stars():
    n = 800
    img, var, mask = noise_image((n, n), 12)
    rng = np.random.default_rng(13)
    g = np.arange(40, n - 30, 60)
    gx, gy = np.meshgrid(g, g)
    xs = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    ys = gy.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    add_stars(img, xs, ys, flux_for_snr(rng.uniform(30, 300, xs.size)), sigma=2.4)
    src = detect_sources(img, var, mask, fwhm=4.0)        # a poor first guess
    est = estimate_fwhm(img, var, mask, src, fwhm_guess=4.0)
    expected = FWHM_PER_SIGMA * np.sqrt(2.4 ** 2 + 1.0 / 12.0)   # pixelated Gaussian
    assert est.n_stars >= 0.8 * xs.size
    assert est.fwhm == pytest.approx(expected, rel=0.02)
    assert est.fwhm_major / est.fwhm_minor < 1.03


def test_bad_inputs_are_named():
    img = np.zeros((20, 20), np.float32)
    with pytest.raises(ValueError, match="variance shape"):
        detect_sources(img, np.ones((10, 10), np.float32))
    with pytest.raises(ValueError, match="footprint_threshold"):
        detect_sources(img, np.ones((20, 20), np.float32), threshold=3.0, footprint_threshold=4.0)
    with pytest.raises(ValueError, match="fwhm"):
        significance_image(img, np.ones((20, 20), np.float32), None, fwhm=0.0)
