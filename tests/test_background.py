"""Background model: constructed skies with known truth."""

from __future__ import annotations

import numpy as np
import pytest

from ps1mpi.algorithms import maskbits
from ps1mpi.algorithms.background import BackgroundModel, fit_background, spline_weights

SKY_SIGMA = 10.0


def _ps1v1_stamp(sigma: float, half: int, k: float = 0.6) -> np.ndarray:
    """Unit-flux PS1_V1-like star (power-law wings), 4x4 sub-sampled per pixel."""
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    acc = np.zeros_like(xx)
    for a in (np.arange(4) + 0.5) / 4 - 0.5:
        for b in (np.arange(4) + 0.5) / 4 - 0.5:
            z = ((xx + a) ** 2 + (yy + b) ** 2) / (2 * sigma ** 2)
            acc += 1.0 / (1.0 + k * z + z ** 1.666)
    return acc / acc.sum()


def _truth(n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    return 1000.0 + 0.05 * xx + 0.03 * yy + 2e-5 * (xx - 0.5 * n) ** 2


def _star_field(n: int, nstar: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = _truth(n)
    img = truth + rng.normal(0.0, SKY_SIGMA, (n, n))
    half = 40
    stamp = _ps1v1_stamp(2.0, half)
    xs = rng.integers(half, n - half, nstar)
    ys = rng.integers(half, n - half, nstar)
    flux = 10 ** rng.uniform(3.0, 5.5, nstar)
    for x, y, f in zip(xs, ys, flux):
        img[y - half:y + half + 1, x - half:x + half + 1] += f * stamp
    return img.astype(np.float32), truth


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_sky_under_stars_recovered_within_a_tenth_sigma(seed):
    # 156 stars per Mpix with power-law wings, a gradient of 2 sigma per cell and curvature
    img, truth = _star_field(1600, 400, seed)
    model = fit_background(img, np.zeros(img.shape, np.uint16), cell=400)
    err = (model.evaluate() - truth) / SKY_SIGMA
    assert np.max(np.abs(err)) < 0.1
    assert abs(np.mean(err)) < 0.03
    assert model.sigma == pytest.approx(SKY_SIGMA, rel=0.03)
    # the grid is the product: nodes every ~400 px from edge to edge
    assert model.grid.shape == (5, 5)
    assert model.x_nodes[0] == 0 and model.x_nodes[-1] == 1599


def test_pure_noise_corners_are_not_amplified():
    rng = np.random.default_rng(7)
    truth = _truth(1600)
    img = (truth + rng.normal(0.0, SKY_SIGMA, truth.shape)).astype(np.float32)
    model = fit_background(img, None)
    err = (model.evaluate() - truth) / SKY_SIGMA
    assert np.max(np.abs(err)) < 0.06
    for corner in (err[:50, :50], err[:50, -50:], err[-50:, :50], err[-50:, -50:]):
        assert np.max(np.abs(corner)) < 0.06


def test_masked_pixels_and_unmasked_halo_do_not_pull_the_model():
    rng = np.random.default_rng(3)
    n = 1200
    truth = _truth(n)
    img = truth + rng.normal(0.0, SKY_SIGMA, (n, n))
    mask = np.zeros((n, n), np.uint16)
    # a dead region full of garbage, masked
    img[100:400, 700:900] = 5e4
    mask[100:400, 700:900] = maskbits.DEAD_CELL
    # saturated columns with garbage, masked
    img[:, 300:303] = -3e4
    mask[:, 300:303] = maskbits.BLEED
    # NaN pixels are ignored too
    img[900:905, 900:1000] = np.nan
    model = fit_background(img.astype(np.float32), mask, cell=400)
    err = (model.evaluate() - truth) / SKY_SIGMA
    assert np.max(np.abs(err)) < 0.1


def test_median_filter_rejects_a_single_bright_cell():
    rng = np.random.default_rng(5)
    n = 1600
    truth = np.full((n, n), 500.0)
    img = truth + rng.normal(0.0, SKY_SIGMA, (n, n))
    # a diffuse glow filling one 100-px statistics cell at 10 sigma
    img[800:900, 800:900] += 10.0 * SKY_SIGMA
    img = img.astype(np.float32)
    filt = fit_background(img, None, mask_sources=False)
    raw = fit_background(img, None, mask_sources=False, median_size=1)
    e_filt = np.abs(filt.evaluate() - truth) / SKY_SIGMA
    e_raw = np.abs(raw.evaluate() - truth) / SKY_SIGMA
    assert e_raw[850, 850] > 0.3          # without the filter the glow enters the sky
    assert np.max(e_filt) < 0.1           # with it, it does not
    # the source masking of the second pass removes it as well
    both = fit_background(img, None)
    assert np.max(np.abs(both.evaluate() - truth)) / SKY_SIGMA < 0.06


def test_spline_weights_reproduce_cubics_and_extrapolate_linearly():
    nodes = np.linspace(0.0, 1599.0, 5)
    x = np.linspace(0.0, 1599.0, 301)
    cubic = lambda t: 3.0 - 0.01 * t + 2e-6 * t ** 2 - 1e-9 * t ** 3
    w = spline_weights(nodes, x)
    assert np.allclose(w @ cubic(nodes), cubic(x), rtol=0, atol=1e-9)
    # beyond the outer nodes: a straight line with the end slope
    xo = np.array([-100.0, -50.0, 1699.0])
    yo = spline_weights(nodes, xo) @ cubic(nodes)
    slope0 = (-0.01 + 4e-6 * 0 - 3e-9 * 0)
    assert yo[0] == pytest.approx(cubic(0.0) - 100 * slope0, abs=1e-9)
    assert yo[1] == pytest.approx(cubic(0.0) - 50 * slope0, abs=1e-9)
    # 1 and 2 nodes: constant and straight line
    assert np.allclose(spline_weights(np.array([5.0]), x) @ [7.0], 7.0)
    assert np.allclose(spline_weights(np.array([0.0, 10.0]), np.array([5.0, 20.0])) @ [1.0, 3.0],
                       [2.0, 5.0])


def test_evaluate_at_matches_evaluate_and_small_images_work():
    rng = np.random.default_rng(11)
    img = (250.0 + 0.1 * np.arange(70)[None, :] + rng.normal(0, 2.0, (50, 70))).astype(np.float32)
    model = fit_background(img, None, cell=400)
    full = model.evaluate()
    assert full.shape == (50, 70)
    ys = np.array([0, 10, 49])
    xs = np.array([0, 33, 69])
    assert np.allclose(model.evaluate_at(xs, ys), full[ys, xs], atol=1e-3)
    truth = 250.0 + 0.1 * np.arange(70)[None, :]
    assert np.max(np.abs(full - truth)) < 0.5      # 3500 pixels, sigma 2
    assert isinstance(model, BackgroundModel)


def test_bad_inputs_are_named():
    img = np.zeros((100, 100), np.float32)
    with pytest.raises(ValueError, match="mask shape"):
        fit_background(img, np.zeros((10, 10), np.uint16))
    with pytest.raises(ValueError, match="2-D"):
        fit_background(np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="usable"):
        fit_background(img, np.full((100, 100), maskbits.GAP, np.uint16))
