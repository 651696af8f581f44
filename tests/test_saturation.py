"""Saturation and bleed-trail masks against planted saturated stars."""

from __future__ import annotations

import numpy as np
import pytest

from ps1mpi.algorithms import maskbits, saturation
from ps1mpi.algorithms.detrend import detrend_cells

SAT_ADU = 60000.0
BIAS = 1000.0


def _cell_with_bleed(ny=300, nx=200, *, x0=80, y0=150, up=70, down=45, seed=0):
    """Raw data section (ADU incl. bias) with a saturated star and a vertical bleed trail,
    an unsaturated bright star and noise; returns the raw cell and the planted trail."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:ny, 0:nx]
    sig = BIAS + 500 + rng.normal(0, 8, (ny, nx))
    sig += 4e5 * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * 2.0 ** 2))
    sig += 2e4 * np.exp(-((x - 150) ** 2 + (y - 60) ** 2) / (2 * 2.0 ** 2))  # not saturated
    trail = np.zeros((ny, nx), bool)
    # the trail: full columns x0-1..x0+1 from y0-down to y0+up, fading over its last 8 rows
    for cx in (x0 - 1, x0, x0 + 1):
        for yy in range(y0 - down, y0 + up + 1):
            d = max(yy - (y0 + up - 8), (y0 - down + 8) - yy, 0)
            level = SAT_ADU * (1 - 0.06 * d)
            sig[yy, cx] = max(sig[yy, cx], level)
            trail[yy, cx] = True
    raw = np.minimum(np.rint(sig), 65535).astype(np.uint16)
    return raw, trail


def test_saturation_mask_threshold():
    raw = np.array([[59999, 60000, 65535, 100]], np.uint16)
    np.testing.assert_array_equal(saturation.saturation_mask(raw, saturation=SAT_ADU),
                                  [[False, True, True, False]])
    with pytest.raises(ValueError, match="saturation"):
        saturation.saturation_mask(raw, saturation=np.nan)


def test_planted_bleed_trail_is_covered():
    raw, trail = _cell_with_bleed()
    m = saturation.mask_saturation(raw, saturation=SAT_ADU, bias_level=BIAS)
    sat = (m & maskbits.SAT) != 0
    bleed = (m & maskbits.BLEED) != 0
    assert sat.sum() > 0
    np.testing.assert_array_equal(sat, raw >= SAT_ADU)
    assert np.all(bleed[trail])                      # the whole planted trail, fading ends too
    assert np.all(bleed[sat])
    # grown by 2 px around the trail, not more
    ys, xs = np.nonzero(trail)
    assert bleed[ys.max() + 2, 80] and not bleed[ys.max() + 4, 80]
    assert bleed[150, 80 + 1 + 2] and not bleed[100, 80 + 1 + 4]
    # the bright unsaturated star is left alone
    assert not bleed[55:66, 145:156].any() and not sat[55:66, 145:156].any()
    # the trail does not leak along the rows: the mask is a narrow vertical band
    assert bleed[:, :60].sum() == 0 and bleed[:, 110:].sum() == 0


def test_bleed_along_rows_when_readout_axis_is_x():
    raw, trail = _cell_with_bleed()
    m = saturation.mask_saturation(raw.T.copy(), saturation=SAT_ADU, bias_level=BIAS, axis=1)
    assert np.all((m & maskbits.BLEED)[trail.T] != 0)


def test_bleed_mask_validates_inputs():
    with pytest.raises(ValueError, match="same shape"):
        saturation.bleed_mask(np.zeros((4, 4)), np.zeros((4, 5), bool), threshold=1.0)
    with pytest.raises(ValueError, match="axis"):
        saturation.bleed_mask(np.zeros((4, 4)), np.zeros((4, 4), bool), threshold=1.0, axis=2)
    assert not saturation.bleed_mask(np.ones((4, 4)), np.zeros((4, 4), bool),
                                     threshold=0.5).any()


@pytest.mark.parametrize("yparity", [1, -1])
def test_bleed_masked_in_the_detrend_chain(yparity):
    raw_data, trail = _cell_with_bleed()
    ny, nx = raw_data.shape
    nover = 16
    raw = np.full((ny, nx + nover), BIAS, np.uint16)
    raw[:, :nx] = raw_data
    cells = {"xy00": raw}
    origins = {"xy00": (5, 7)}
    res = detrend_cells(cells, datasec=(0, ny, 0, nx), biassec=(0, ny, nx, nx + nover),
                        cell_origins=origins, chip_shape=(ny + 14, nx + 10), gain=1.2,
                        read_noise=5.0, saturation=SAT_ADU,
                        cell_parity={"xy00": (1, yparity)}, find_cosmics=False)
    block = res.mask[7:7 + ny, 5:5 + nx]
    if yparity < 0:
        block = block[::-1]
    assert np.all(block[trail] & maskbits.BLEED)
    assert np.count_nonzero(block & maskbits.SAT) == np.count_nonzero(raw_data >= SAT_ADU)
    assert res.stats["n_bleed"] == np.count_nonzero(block & maskbits.BLEED)
