"""Cosmic-ray detection: planted hits found, stars of FWHM 2.5-6 px left alone."""

from __future__ import annotations

import numpy as np
import pytest

from ps1mpi.algorithms import cosmics, maskbits

ENGINES = ["numpy"] + (["numba"] if cosmics._HAVE_NUMBA else [])
SKY = 300.0           # electrons
RN = 5.0              # electrons


def _star(shape, x0, y0, fwhm, flux, kind, oversample=5):
    """Pixel-integrated Gaussian or Moffat (beta 2.5) star on a local box."""
    r = int(np.ceil(4 * fwhm)) + 2
    ys = np.arange(max(int(y0) - r, 0), min(int(y0) + r + 1, shape[0]))
    xs = np.arange(max(int(x0) - r, 0), min(int(x0) + r + 1, shape[1]))
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    dx = xs[None, :, None, None] + sub[None, None, None, :] - x0
    dy = ys[:, None, None, None] + sub[None, None, :, None] - y0
    r2 = dx ** 2 + dy ** 2
    if kind == "gauss":
        s = fwhm / 2.3548
        prof = np.exp(-r2 / (2 * s * s)) / (2 * np.pi * s * s)
    else:
        beta = 2.5
        alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
        prof = (beta - 1) / (np.pi * alpha ** 2) * (1 + r2 / alpha ** 2) ** (-beta)
    return ys, xs, flux * prof.mean(axis=(2, 3))


def make_scene(seed, shape=(500, 500), nstars=50, nhits=70):
    """Image, variance, truth masks of cosmic-ray pixels and of star pixels."""
    rng = np.random.default_rng(seed)
    model = np.full(shape, SKY)
    star_px = np.zeros(shape, bool)
    centres = []
    fwhms = np.linspace(2.5, 6.0, nstars)
    for k in range(nstars):
        x0, y0 = rng.uniform(15, shape[1] - 15), rng.uniform(15, shape[0] - 15)
        flux = 10 ** rng.uniform(3.5, 6.3)            # peak S/N ~10 up to ~1e5 e- peaks
        ys, xs, st = _star(shape, x0, y0, fwhms[k], flux, "gauss" if k % 2 else "moffat")
        model[np.ix_(ys, xs)] += st
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        star_px[np.ix_(ys, xs)] |= np.hypot(xx - x0, yy - y0) < 1.5 * fwhms[k]
        centres.append((x0, y0, fwhms[k]))
    img = rng.poisson(model).astype(np.float64) + rng.normal(0, RN, shape)
    cr_px = np.zeros(shape, bool)
    placed = 0
    while placed < nhits:
        x0, y0 = rng.integers(6, shape[1] - 6), rng.integers(6, shape[0] - 6)
        if any(np.hypot(x0 - cx, y0 - cy) < 4 * fw for cx, cy, fw in centres):
            continue                                  # keep hits off stars: clear truth
        length = int(rng.integers(1, 9))
        ang = rng.uniform(0, np.pi)
        amp = rng.uniform(150, 3000)                  # e- per pixel (8-170 sigma)
        for t in range(length):
            y = int(round(y0 + t * np.sin(ang)))
            x = int(round(x0 + t * np.cos(ang)))
            img[y, x] += amp * rng.uniform(0.5, 1.0)
            cr_px[y, x] = True
        placed += 1
    var = np.maximum(img, 0) + RN ** 2
    return img.astype(np.float32), var.astype(np.float32), cr_px, star_px


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("seed", [11, 12])
def test_cosmic_rays_found_and_stars_left_alone(engine, seed):
    img, var, cr_px, star_px = make_scene(seed)
    found = cosmics.find_cosmics(img, var, engine=engine)
    assert found[cr_px].mean() >= 0.95
    assert found[star_px].mean() < 0.01
    # what is flagged is the hits and their immediate edges, plus rare noise peaks: with
    # sigclip 4.5, L.A.Cosmic seeds on about 4e-5 of pure-noise pixels (+ their growth)
    near = np.zeros_like(cr_px)
    ys, xs = np.nonzero(cr_px)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            near[np.clip(ys + dy, 0, img.shape[0] - 1),
                 np.clip(xs + dx, 0, img.shape[1] - 1)] = True
    assert (found & ~near).sum() <= 1e-4 * img.size


@pytest.mark.skipif(not cosmics._HAVE_NUMBA, reason="numba not installed")
def test_engines_agree():
    img, var, _, _ = make_scene(13, shape=(300, 300), nstars=25, nhits=40)
    mask = np.zeros(img.shape, np.uint16)
    mask[:, 150:154] = maskbits.GAP
    a = cosmics.find_cosmic_pixels(img, var, mask=mask, engine="numba")
    b = cosmics.find_cosmic_pixels(img, var, mask=mask, engine="numpy")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(cosmics.sharpness(img, var, mask=mask, engine="numba"),
                                  cosmics.sharpness(img, var, mask=mask, engine="numpy"))


@pytest.mark.parametrize("engine", ENGINES)
def test_sharpness_of_a_hot_pixel_is_its_significance(engine):
    img = np.full((21, 21), 100.0, np.float32)
    var = np.full((21, 21), 25.0, np.float32)
    img[10, 10] += 60.0                      # 12 sigma
    s = cosmics.sharpness(img, var, engine=engine)
    assert s[10, 10] == pytest.approx(12.0, rel=1e-6)
    assert s[10, 11] == 0.0 and s[0, 0] == 0.0   # neighbours are below their neighbours: clipped


@pytest.mark.parametrize("engine", ENGINES)
def test_masked_regions_are_neither_flagged_nor_edges(engine):
    rng = np.random.default_rng(3)
    img = (SKY + rng.normal(0, np.sqrt(SKY + RN ** 2), (200, 200))).astype(np.float32)
    var = np.full(img.shape, SKY + RN ** 2, np.float32)
    mask = np.zeros(img.shape, np.uint16)
    img[:, 90:108] = 0.0                     # a cell gap: zeros next to the sky
    var[:, 90:108] = 0.0
    mask[:, 90:108] = maskbits.GAP
    img[50, 40] += 5000.0                    # a hit inside a masked bad column is not reported
    mask[:, 40] = maskbits.DETECTOR
    img[120, 150] += 2000.0                  # a real hit
    found = cosmics.find_cosmics(img, var, mask=mask, engine=engine)
    assert found[120, 150]
    assert not found[:, 88:110].any()
    assert not found[:, 40].any()
    assert found.sum() <= 6


def test_options_are_validated():
    img = np.zeros((10, 10), np.float32)
    with pytest.raises(ValueError, match="sigfrac"):
        cosmics.find_cosmics(img, img, sigfrac=2.0)
    with pytest.raises(ValueError, match="variance shape"):
        cosmics.find_cosmics(img, np.zeros((5, 5), np.float32))


def test_cosmic_rays_masked_in_the_detrend_chain():
    from ps1mpi.algorithms.detrend import detrend_cells

    rng = np.random.default_rng(21)
    ny, nx, nover = 80, 60, 10
    origins = {"xy00": (0, 0), "xy10": (nx + 6, 0)}
    cells = {}
    for c in origins:
        raw = 1000.0 + rng.poisson(SKY, (ny, nx + nover)).astype(float)
        raw[:, nx:] = 1000.0
        raw += rng.normal(0, 4.0, raw.shape)
        cells[c] = raw
    cells["xy10"][30, 40:42] += 2500.0            # a two-pixel hit in raw pixels
    res = detrend_cells({c: np.rint(r).astype(np.uint16) for c, r in cells.items()},
                        datasec=(0, ny, 0, nx), biassec=(0, ny, nx, nx + nover),
                        cell_origins=origins, chip_shape=(ny, 2 * nx + 6), gain=1.0,
                        read_noise=4.0, saturation=60000.0, cell_parity={"xy10": (-1, 1)})
    cr = (res.mask & maskbits.CR) != 0
    x0 = origins["xy10"][0]
    assert cr[30, x0 + nx - 1 - 40] and cr[30, x0 + nx - 1 - 41]   # flipped in x
    assert res.stats["n_cr"] == cr.sum() and cr.sum() <= 6
    assert res.stats["timings"]["cosmics"] > 0
