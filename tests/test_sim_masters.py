"""Detrend-master algorithms (ps1mpi.algorithms.masters) on constructed frames with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from ps1mpi.algorithms import maskbits, masters


def test_overscan_correct_removes_row_pattern():
    rng = np.random.default_rng(1)
    ny, nx, nover = 200, 100, 32
    rows = 1000.0 + 5.0 * np.sin(np.arange(ny) / 15.0) + 0.02 * np.arange(ny)   # smooth row pattern
    cell = rows[:, None] + rng.normal(0, 5.0, (ny, nx + nover))
    signal = np.linspace(0, 500, nx)[None, :] * np.ones((ny, 1))
    cell[:, :nx] += signal
    out = masters.overscan_correct(cell, datasec=(0, ny, 0, nx), biassec=(0, ny, nx, nx + nover))
    assert out.shape == (ny, nx) and out.dtype == np.float32
    resid = out - signal
    # the per-row bias estimate (median of 32 px smoothed over 3 rows) has ~5*1.25/sqrt(96) ~ 0.65 ADU
    # of noise; without the correction the residual would carry the +-5 ADU pattern
    row_err = resid.mean(axis=1)
    assert abs(row_err.mean()) < 0.3 and row_err.std() < 1.0
    with pytest.raises(ValueError, match="rows"):
        masters.overscan_correct(cell, datasec=(0, ny, 0, nx), biassec=(0, ny - 1, nx, nx + nover))


def test_sigma_clip_combine_rejects_outliers_and_keeps_noise():
    rng = np.random.default_rng(2)
    for n in (3, 5, 8):
        stack = (100.0 + rng.normal(0, 5.0, (n, 300, 300))).astype(np.float32)
        stack[1, 10, 10] = 1e4            # cosmic ray
        stack[0, 20, 20] = -400.0         # dead pixel in one frame
        res = masters.sigma_clip_combine(stack)
        assert abs(res.image[10, 10] - 100) < 20 and abs(res.image[20, 20] - 100) < 20
        assert res.nused[10, 10] == n - 1 and res.nused[20, 20] == n - 1
        # a 3-sigma clip removes ~0.27% of good values per frame
        assert (res.nused < n).mean() < 0.006 * n
        assert res.image.std() == pytest.approx(5.0 / np.sqrt(n), rel=0.05)
        assert np.nanmedian(res.error) == pytest.approx(5.0 / np.sqrt(n), rel=0.05)


def test_frame_noise_from_pairs():
    rng = np.random.default_rng(3)
    sig = np.array([2.0, 4.0, 6.0, 3.0])
    pattern = rng.normal(0, 50.0, (200, 200))          # shared structure cancels in differences
    stack = pattern[None] + rng.normal(0, 1, (4, 200, 200)) * sig[:, None, None]
    got = masters.frame_noise(stack.astype(np.float32))
    np.testing.assert_allclose(got, sig, rtol=0.05)


def test_scales_and_masks():
    rng = np.random.default_rng(4)
    levels = np.array([1000.0, 2000.0, 1500.0, 1200.0])
    truth = 1.0 + 0.05 * rng.normal(size=(100, 100))
    stack = (levels[:, None, None] * truth[None] * (1 + 0.001 * rng.normal(size=(4, 100, 100)))).astype(np.float32)
    m = np.zeros(stack.shape, np.uint8)
    m[2, :50] = 1
    stack[2, :50] = 0.0
    res = masters.sigma_clip_combine(stack, scales=levels, masks=m)
    np.testing.assert_allclose(res.image, truth, atol=0.004)
    assert (res.nused[:50] <= 3).all() and res.nused[:50].mean() > 2.98 and res.nused[50:].mean() > 3.97
    with pytest.raises(ValueError, match="scales"):
        masters.sigma_clip_combine(stack, scales=[1, 2])


def test_make_bias_and_dark():
    rng = np.random.default_rng(5)
    pattern = (10 * np.exp(-np.arange(120) / 15.0))[None, :] * np.ones((100, 1))
    biases = (pattern[None] + rng.normal(0, 5, (6, 100, 120))).astype(np.float32)
    bias = masters.make_bias(biases)
    assert np.abs(bias - pattern).mean() < 2.0 and (bias - pattern).std() == pytest.approx(5 / np.sqrt(6), rel=0.1)
    rate = np.full((100, 120), 0.05)
    rate[50, 60] = 20.0                                     # hot pixel
    t = np.array([300.0, 300.0, 600.0])
    darks = pattern[None] + rate[None] * t[:, None, None] + rng.normal(0, 5, (3, 100, 120))
    darks[0, 5, 5] += 3000.0                                # cosmic ray
    dark = masters.make_dark(darks.astype(np.float32), t, bias=pattern.astype(np.float32))
    assert dark[50, 60] == pytest.approx(20.0, rel=0.01)
    assert abs(dark[5, 5] - 0.05) < 0.1
    assert abs(np.median(dark) - 0.05) < 0.01
    with pytest.raises(ValueError, match="dark_times"):
        masters.make_dark(darks.astype(np.float32), np.array([300.0, 0.0, 1.0]))


def test_nonlinearity_table_inverts_a_known_response():
    S, a, rate = 59000.0, 0.03, 1000.0
    t = np.geomspace(0.8, 50.0, 10)
    true = rate * t
    measured = true * (1 - a * (true / S) ** 2)
    curve = masters.fit_nonlinearity(measured, t, extrapolate=1.3)
    assert curve.rate == pytest.approx(rate, rel=1e-4)
    probe_true = np.array([100.0, 5000.0, 30000.0, 50000.0, 60000.0])
    probe = probe_true * (1 - a * (probe_true / S) ** 2)
    np.testing.assert_allclose(masters.apply_nonlinearity(probe, curve.adu, curve.factor), probe_true, rtol=2e-4)
    with pytest.raises(ValueError, match="usable frames"):
        masters.fit_nonlinearity(measured[:3], t[:3])


def test_flat_with_illumination_correction():
    rng = np.random.default_rng(6)
    ny, nx = 256, 256
    yy, xx = np.mgrid[0:ny, 0:nx] / 256.0
    response = (1 + 0.01 * rng.normal(size=(ny, nx))) * (1 - 0.08 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2))
    dome_light = 1 + 0.1 * xx - 0.05 * yy                  # the lamp does not light like the sky
    domes = np.stack([20000 * k * response * dome_light * (1 + rng.normal(0, 1 / np.sqrt(20000 * k), (ny, nx)))
                      for k in (1.0, 1.02, 0.98, 1.01)]).astype(np.float32)
    skies = []
    for k in range(5):
        f = 5000 * response * (1 + rng.normal(0, 1 / np.sqrt(5000), (ny, nx)))
        sx, sy = rng.integers(10, 246, 2)
        f[sy - 2:sy + 3, sx - 2:sx + 3] += 50000              # a star in each sky frame
        skies.append(f)
    dome = masters.make_flat(domes)
    sky = masters.make_flat(np.stack(skies).astype(np.float32))
    corr = masters.illumination_correction(dome, sky, box=32)
    flat = dome * corr
    ratio = flat / response
    ratio /= ratio.mean()
    # the dome's 10% gradient is gone; what is left is the noise of the dome frames (~0.4%)
    assert ratio.std() < 0.006
    assert abs(np.polyfit(xx[0], ratio.mean(axis=0), 1)[0]) < 0.005


def test_fringe_template_recovers_pattern():
    rng = np.random.default_rng(7)
    ny, nx = 300, 300
    yy, xx = np.mgrid[0:ny, 0:nx]
    pattern = 0.03 * np.cos(2 * np.pi * (xx * 0.013 + yy * 0.009 + 0.3 * np.sin(xx / 90.0)))
    frames, levels = [], []
    for k in range(5):
        lev = rng.uniform(3000, 6000)
        amp = rng.uniform(0.7, 1.3)
        f = lev * (1 + 0.02 * (xx / nx)) * (1 + amp * pattern) + rng.normal(0, np.sqrt(lev), (ny, nx))
        for _ in range(20):
            sx, sy = rng.integers(5, 295, 2)
            f[sy - 2:sy + 3, sx - 2:sx + 3] += rng.uniform(1e3, 1e5)
        frames.append(f)
        levels.append(lev)
    tmpl = masters.make_fringe(np.stack(frames).astype(np.float32), levels=np.array(levels), box=64)
    c = np.corrcoef(tmpl[20:-20, 20:-20].ravel(), pattern[20:-20, 20:-20].ravel())[0, 1]
    # pattern rms 2.1%, noise of the mean of 5 frames ~0.67% per pixel: corr ~ 0.95 at best
    assert c > 0.92
    # amplitude: the mean fringe factor (~1) times the pattern
    k = (tmpl * pattern).sum() / (pattern * pattern).sum()
    assert 0.8 < k < 1.2


def test_static_mask():
    rng = np.random.default_rng(8)
    dark = np.abs(rng.normal(0.02, 0.005, (100, 200))).astype(np.float32)
    flat = np.ones((100, 200), np.float32)
    dark[10, 10] = 50.0                  # hot pixel
    flat[:, 30] = 0.1                    # dead column
    flat[:, 100:200] = 0.0               # dead cell
    gap = np.zeros((100, 200), bool)
    gap[:, 95:100] = True
    flat[gap] = 0.0
    cells = {"xy00": (slice(0, 100), slice(0, 95)), "xy10": (slice(0, 100), slice(100, 200))}
    m = masters.make_static_mask(dark, flat, gap=gap, cell_slices=cells)
    assert m[10, 10] & maskbits.DETECTOR and (m[:, 30] & maskbits.DETECTOR).all()
    assert (m[:, 100:] & maskbits.DEAD_CELL).all() and not (m[:, :95] & maskbits.DEAD_CELL).any()
    assert (m[gap] == maskbits.GAP).all()
    good = np.ones_like(gap)
    good[10, 10] = good[:, 30] = False
    good[:, 95:] = False
    assert (m[good] == 0).all()
