"""Detrending steps against constructed inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from ps1mpi.algorithms import binning, detrend, maskbits
from ps1mpi.algorithms.detrend import NonlinearityTable, detrend_cells

ENGINES = ["numpy"] + (["numba"] if detrend.HAVE_NUMBA else [])

# a small camera: 2x2 cells of 120 rows x 100 data columns + 20 overscan columns
NY, NX, NOVER = 120, 100, 20
GAPX, GAPY = 8, 6
CHIP = (2 * NY + GAPY, 2 * NX + GAPX)
ORIGINS = {f"xy{i}{j}": (i * (NX + GAPX), j * (NY + GAPY)) for j in range(2) for i in range(2)}
DATASEC = (0, NY, 0, NX)
BIASSEC = (0, NY, NX, NX + NOVER)


def _row_pattern(ny: int, phase: float = 0.0) -> np.ndarray:
    y = np.arange(ny)
    return 1000.0 + 20.0 * np.sin(2 * np.pi * y / 37.0 + phase) + 0.05 * y


# --------------------------------------------------------------------------- overscan

def test_overscan_vector_is_row_median_with_truncated_3_row_boxcar():
    ny = 50
    y = np.arange(ny, dtype=float)
    raw = np.zeros((ny, 30))
    raw[:, 20:] = (y ** 2)[:, None]          # noiseless overscan = y^2 in every column
    raw[:, 25] = 1e6                          # one hot overscan column: the median ignores it
    vec = detrend.overscan_vector(raw, biassec=(0, ny, 20, 30))
    expect = y ** 2 + 2.0 / 3.0               # ((y-1)^2 + y^2 + (y+1)^2) / 3
    expect[0] = (0 + 1) / 2.0                 # truncated window at the ends
    expect[-1] = ((ny - 2) ** 2 + (ny - 1) ** 2) / 2.0
    np.testing.assert_allclose(vec, expect, rtol=0, atol=1e-9)
    np.testing.assert_allclose(detrend.overscan_vector(raw, biassec=(0, ny, 20, 30), boxcar=1),
                               y ** 2, atol=1e-9)


def test_subtract_overscan_removes_a_known_row_pattern():
    rng = np.random.default_rng(1)
    pattern = _row_pattern(NY)
    signal = 500.0 + 0.5 * np.arange(NX)[None, :] * np.ones((NY, 1))
    raw = np.empty((NY, NX + NOVER))
    raw[:, :NX] = signal + pattern[:, None]
    raw[:, NX:] = pattern[:, None]
    raw += rng.normal(0, 5.0, raw.shape)
    out, level = detrend.subtract_overscan(np.rint(raw).astype(np.uint16), datasec=DATASEC,
                                           biassec=BIASSEC)
    assert out.dtype == np.float32 and out.shape == (NY, NX)
    resid_rows = (out - signal).mean(axis=1)
    # before: the pattern swings by +-20 ADU; after: only the overscan noise (~0.6 ADU per
    # row from a median of 20 pixels over 3 rows) and the boxcar's smoothing of the sine
    assert np.std(pattern) > 10
    assert np.sqrt(np.mean(resid_rows ** 2)) < 1.2
    assert abs(np.mean(out - signal)) < 0.3
    np.testing.assert_allclose(level, pattern, atol=3.0)


def test_overscan_rejects_bad_sections():
    raw = np.zeros((10, 12))
    with pytest.raises(ValueError, match="biassec"):
        detrend.subtract_overscan(raw, datasec=(0, 10, 0, 8), biassec=(0, 10, 8, 14))
    with pytest.raises(ValueError, match="cover the datasec rows"):
        detrend.subtract_overscan(raw, datasec=(0, 10, 0, 8), biassec=(2, 10, 8, 12))
    with pytest.raises(ValueError, match="statistic"):
        detrend.overscan_vector(raw, biassec=(0, 10, 8, 12), statistic="mode")


# --------------------------------------------------------------------------- nonlinearity

def test_nonlinearity_inverts_a_known_response_curve():
    true = np.linspace(0, 65000, 200)
    measured = true * (1 - 1.2e-6 * true) + 3e-12 * true ** 3      # sub-linear response
    table = NonlinearityTable.from_curve(true, measured)
    rng = np.random.default_rng(2)
    t = rng.uniform(100, 60000, 20000)
    m = (t * (1 - 1.2e-6 * t) + 3e-12 * t ** 3).astype(np.float32)
    corrected, suspect = detrend.correct_nonlinearity(m.copy(), table)
    np.testing.assert_allclose(corrected, t, rtol=2e-5)
    assert not suspect.any()
    # beyond the calibrated range: flagged, factor held at the last knot
    big = np.array([measured[-1] + 500.0], np.float32)
    _, sus = detrend.correct_nonlinearity(big, table)
    assert sus.all()


def test_nonlinearity_table_validates():
    with pytest.raises(ValueError, match="increasing"):
        NonlinearityTable(adu=[0, 2, 1], factor=[1, 1, 1])
    with pytest.raises(ValueError, match="positive"):
        NonlinearityTable(adu=[0, 1], factor=[1, -1])


# --------------------------------------------------------------------------- bias/dark/flat

def test_bias_dark_scaling_and_flat():
    rng = np.random.default_rng(3)
    bias = rng.normal(0, 3, (40, 50)).astype(np.float32)
    dark = rng.uniform(0.0, 2.0, (40, 50)).astype(np.float32)      # ADU/s
    flat = rng.uniform(0.5, 1.5, (40, 50)).astype(np.float32)
    flat[3, 4] = 0.0
    flat[5, 6] = np.nan
    sky_e = 700.0
    gain = 1.3
    dark_time = 37.5
    adu = (sky_e * flat / gain + bias + dark * dark_time).astype(np.float32)
    img = adu.copy()
    detrend.subtract_bias(img, bias)
    detrend.subtract_dark(img, dark, dark_time=dark_time)
    detrend.to_electrons(img, gain=gain)
    img, low = detrend.apply_flat(img, flat)
    good = ~low
    np.testing.assert_allclose(img[good], sky_e, rtol=1e-5)
    assert low[3, 4] and low[5, 6] and low.sum() == 2
    assert img[3, 4] == 0 and img[5, 6] == 0
    with pytest.raises(ValueError, match="dark master"):
        detrend.subtract_dark(img, dark[:10], dark_time=1.0)
    with pytest.raises(ValueError, match="dark_time"):
        detrend.subtract_dark(img, dark, dark_time=-1.0)


def test_dark_is_scaled_by_dark_time_in_the_chain():
    """The same dark current over 10 s or 100 s is removed exactly."""
    dark = np.full(CHIP, 2.0, np.float32)        # ADU/s
    outs = []
    for t in (10.0, 100.0):
        cells = {}
        for c in ORIGINS:
            raw = np.zeros((NY, NX + NOVER), np.float32)
            raw[:] = 1000.0
            raw[:, :NX] += 300.0 + 2.0 * t
            cells[c] = raw
        res = detrend_cells(cells, datasec=DATASEC, biassec=BIASSEC, cell_origins=ORIGINS,
                            chip_shape=CHIP, gain=1.0, read_noise=0.0, saturation=60000.0,
                            dark=dark, dark_time=t, find_cosmics=False)
        good = res.mask == 0
        outs.append(res.image[good])
    np.testing.assert_allclose(outs[0], 300.0, atol=1e-3)
    np.testing.assert_allclose(outs[1], 300.0, atol=1e-3)


# --------------------------------------------------------------------------- fringe

def _fringe_template(shape):
    y, x = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    return np.sin(x / 23.0 + y / 41.0) * np.cos(x / 57.0 - y / 19.0)


def test_fringe_amplitude_recovered_within_two_percent():
    rng = np.random.default_rng(4)
    shape = (600, 640)
    tmpl = _fringe_template(shape).astype(np.float32)
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    sky = 1000.0 + 0.2 * x + 0.1 * y                      # background with a gradient
    amp = 37.5
    img = sky + amp * tmpl + rng.normal(0, 30.0, shape)   # noise comparable to the fringes
    for _ in range(40):                                   # stars, which the fit must reject
        x0, y0 = rng.uniform(10, shape[1] - 10), rng.uniform(10, shape[0] - 10)
        img += 5e4 * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * 1.5 ** 2))
    mask = np.zeros(shape, np.uint16)
    mask[:, 100:104] = maskbits.DETECTOR
    img[:, 100:104] = 1e5                                 # bad columns, masked
    fit = detrend.fit_fringe(img.astype(np.float32), tmpl, mask=mask)
    assert abs(fit.amplitude - amp) / amp < 0.02
    assert fit.amplitude_err < 0.02 * amp
    assert fit.n_used >= 0.5 * fit.n_points
    out = img.astype(np.float32)
    detrend.subtract_fringe(out, tmpl, fit.amplitude, mask=mask)
    # the fringe pattern is gone: the residual no longer correlates with the template
    good = mask == 0
    corr = np.corrcoef((out - sky)[good], tmpl[good])[0, 1]
    assert abs(corr) < 0.02


# --------------------------------------------------------------------------- stitching

@pytest.mark.parametrize("engine", ENGINES)
def test_stitching_places_each_cell_with_its_parity(engine):
    parity = {"xy00": (1, 1), "xy10": (-1, 1), "xy01": (1, -1), "xy11": (-1, -1)}
    cells = {}
    for k, c in enumerate(ORIGINS):
        raw = np.full((NY, NX + NOVER), 1000, np.uint16)
        raw[:, :NX] += 100
        raw[1, 2] = 1000 + 5000 + 1000 * k         # marker at raw data pixel (row 1, col 2)
        cells[c] = raw
    res = detrend_cells(cells, datasec=DATASEC, biassec=BIASSEC, cell_origins=ORIGINS,
                        chip_shape=CHIP, gain=1.0, read_noise=5.0, saturation=60000.0,
                        cell_parity=parity, find_cosmics=False, engine=engine)
    for k, (c, (x0, y0)) in enumerate(ORIGINS.items()):
        px, py = parity[c]
        xe = x0 + (2 if px > 0 else NX - 1 - 2)
        ye = y0 + (1 if py > 0 else NY - 1 - 1)
        assert res.image[ye, xe] == pytest.approx(5000 + 1000 * k)
        block = res.image[y0:y0 + NY, x0:x0 + NX]
        assert np.count_nonzero(block > 1000) == 1       # only the marker
    # gaps: mask GAP, value 0, variance 0; cells: no GAP bit
    gap = (res.mask & maskbits.GAP) != 0
    covered = np.zeros(CHIP, bool)
    for x0, y0 in ORIGINS.values():
        covered[y0:y0 + NY, x0:x0 + NX] = True
    np.testing.assert_array_equal(gap, ~covered)
    assert np.all(res.image[gap] == 0) and np.all(res.variance[gap] == 0)
    assert res.stats["n_gap"] == int((~covered).sum())
    # the plain stitcher agrees
    trimmed = {c: detrend.subtract_overscan(cells[c], datasec=DATASEC, biassec=BIASSEC)[0]
               for c in cells}
    st, cov = detrend.stitch_cells(trimmed, cell_origins=ORIGINS, chip_shape=CHIP,
                                   cell_parity=parity)
    np.testing.assert_array_equal(cov, covered)
    np.testing.assert_allclose(st[covered], res.image[covered], atol=1e-3)


def test_missing_cell_is_a_dead_cell_and_geometry_is_checked():
    cells = {c: np.full((NY, NX + NOVER), 1200, np.uint16) for c in list(ORIGINS)[:3]}
    res = detrend_cells(cells, datasec=DATASEC, biassec=BIASSEC, cell_origins=ORIGINS,
                        chip_shape=CHIP, gain=1.0, read_noise=5.0, saturation=60000.0,
                        dead_cells={"xy00"}, find_cosmics=False)
    x0, y0 = ORIGINS["xy11"]
    assert np.all(res.mask[y0:y0 + NY, x0:x0 + NX] == maskbits.DEAD_CELL)
    assert np.all(res.image[y0:y0 + NY, x0:x0 + NX] == 0)
    x0, y0 = ORIGINS["xy00"]
    assert np.all(res.mask[y0:y0 + NY, x0:x0 + NX] & maskbits.DEAD_CELL)
    with pytest.raises(ValueError, match="falls outside the chip"):
        detrend_cells(cells, datasec=DATASEC, biassec=BIASSEC,
                      cell_origins={**ORIGINS, "xy00": (CHIP[1] - 10, 0)}, chip_shape=CHIP,
                      gain=1.0, read_noise=5.0, saturation=6e4, find_cosmics=False)
    with pytest.raises(ValueError, match="flat master: shape"):
        detrend_cells(cells, datasec=DATASEC, biassec=BIASSEC, cell_origins=ORIGINS,
                      chip_shape=CHIP, gain=1.0, read_noise=5.0, saturation=6e4,
                      flat=np.ones((10, 10), np.float32), find_cosmics=False)
    with pytest.raises(ValueError, match="gain of cell"):
        detrend_cells(cells, datasec=DATASEC, biassec=BIASSEC, cell_origins=ORIGINS,
                      chip_shape=CHIP, gain=0.0, read_noise=5.0, saturation=6e4,
                      find_cosmics=False)


# --------------------------------------------------------------------------- full chain

def _flat_field_frame(seed: int, *, nonlinear: bool):
    """Raw cells of a uniformly illuminated exposure with every signature, and its truth."""
    rng = np.random.default_rng(seed)
    gains = {"xy00": 1.0, "xy10": 1.2, "xy01": 1.45, "xy11": 0.9}
    rn_adu = {"xy00": 5.0, "xy10": 6.0, "xy01": 4.0, "xy11": 7.0}
    y, x = np.mgrid[0:CHIP[0], 0:CHIP[1]]
    flat = (1.0 + 0.15 * np.sin(x / 31.0) * np.cos(y / 23.0)
            + rng.normal(0, 0.02, CHIP)).astype(np.float32)
    bias = rng.normal(0, 3.0, CHIP).astype(np.float32)
    dark = rng.uniform(0.0, 0.4, CHIP).astype(np.float32)
    dark_time = 60.0
    sky_e = 400.0          # low enough that read noise (16-40 e-^2) matters
    true_t = np.linspace(0, 70000, 300)
    meas_t = true_t * (1 - 1.0e-6 * true_t)
    table = NonlinearityTable.from_curve(true_t, meas_t)
    cells = {}
    for k, (c, (x0, y0)) in enumerate(ORIGINS.items()):
        sl = (slice(y0, y0 + NY), slice(x0, x0 + NX))
        g = gains[c]
        e = rng.poisson(sky_e * flat[sl] + dark[sl] * dark_time * g).astype(np.float64)
        lin = e / g + bias[sl]
        meas = np.interp(lin, true_t, meas_t) if nonlinear else lin
        pattern = _row_pattern(NY, phase=k)
        raw = np.empty((NY, NX + NOVER))
        raw[:, :NX] = meas + pattern[:, None]
        raw[:, NX:] = pattern[:, None]
        raw += rng.normal(0, rn_adu[c], raw.shape)
        cells[c] = np.rint(raw).astype(np.uint16)
    kwargs = dict(datasec=DATASEC, biassec=BIASSEC, cell_origins=ORIGINS, chip_shape=CHIP,
                  gain=gains, read_noise=rn_adu, saturation=65000.0, bias=bias, dark=dark,
                  dark_time=dark_time, flat=flat,
                  nonlinearity=table if nonlinear else None, find_cosmics=False)
    return cells, kwargs, sky_e


@pytest.mark.parametrize("engine", ENGINES)
def test_flat_field_frame_is_flat_and_variance_is_right(engine):
    cells, kw, sky_e = _flat_field_frame(5, nonlinear=True)
    res = detrend_cells(cells, **kw, engine=engine)
    good = res.mask == 0
    assert good.sum() == 4 * NY * NX
    resid = res.image[good] - sky_e
    # flat across cells of different gains: no cell offsets, unbiased
    for x0, y0 in ORIGINS.values():
        cell = res.image[y0:y0 + NY, x0:x0 + NX]
        assert abs(cell.mean() - sky_e) < 5 * np.sqrt(sky_e / cell.size) + 0.3
    assert abs(resid.mean()) < 0.5
    norm = resid / np.sqrt(res.variance[good])
    assert abs(norm.std() - 1.0) < 0.02
    # and in each cell (each has its own gain and read noise)
    for x0, y0 in ORIGINS.values():
        sl = (slice(y0, y0 + NY), slice(x0, x0 + NX))
        z = (res.image[sl] - sky_e) / np.sqrt(res.variance[sl])
        assert abs(z.std() - 1.0) < 0.03
    assert res.variance.dtype == np.float32 and res.image.dtype == np.float32


def test_variance_formula_matches_poisson_plus_read_noise():
    img = np.array([[100.0, 400.0, 0.0]], np.float32)
    flat = np.array([[1.0, 2.0, 0.5]], np.float32)
    var = detrend.variance_image(img, flat=flat, read_noise=5.0, dark_electrons=10.0)
    expect = (np.maximum(img * flat + 10.0, 0) + 25.0) / flat ** 2
    np.testing.assert_allclose(var, expect, rtol=1e-6)


@pytest.mark.skipif(not detrend.HAVE_NUMBA, reason="numba not installed")
def test_engines_agree_on_the_whole_chain():
    cells, kw, _ = _flat_field_frame(6, nonlinear=True)
    static = np.zeros(CHIP, np.uint16)
    static[:, 33] = maskbits.DETECTOR
    kw = dict(kw, static_mask=static, saturation=6500.0,
              cell_parity={"xy10": (-1, 1), "xy01": (1, -1), "xy11": (-1, -1)})
    cells["xy10"][50:53, 40:43] = 7000                   # a saturated spot
    a = detrend_cells(cells, **kw, engine="numba")
    b = detrend_cells(cells, **kw, engine="numpy")
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.image, b.image, rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(a.variance, b.variance, rtol=1e-5, atol=1e-2)
    assert a.stats["n_sat"] == b.stats["n_sat"] == 9
    col = a.mask[:, 33]
    assert np.all(col[:NY] & maskbits.DETECTOR) and np.all(col[NY + GAPY:] & maskbits.DETECTOR)
    assert np.all(col[NY:NY + GAPY] == maskbits.GAP)         # the static mask stops at gaps
    # preallocated outputs give the same result
    out = (np.full(CHIP, 7, np.float32), np.full(CHIP, 7, np.float32), np.full(CHIP, 7, np.uint16))
    c = detrend_cells(cells, **kw, out=out)
    np.testing.assert_array_equal(c.mask, a.mask)
    np.testing.assert_array_equal(c.image, a.image)


def test_fringe_is_fitted_and_removed_in_the_chain():
    rng = np.random.default_rng(7)
    tmpl = _fringe_template(CHIP).astype(np.float32)
    amp = 25.0
    cells = {}
    for c, (x0, y0) in ORIGINS.items():
        sl = (slice(y0, y0 + NY), slice(x0, x0 + NX))
        e = rng.poisson(900.0 + amp * tmpl[sl]).astype(float)
        raw = np.full((NY, NX + NOVER), 800.0)
        raw[:, :NX] += e
        raw += rng.normal(0, 4.0, raw.shape)
        cells[c] = np.rint(raw).astype(np.uint16)
    res = detrend_cells(cells, datasec=DATASEC, biassec=BIASSEC, cell_origins=ORIGINS,
                        chip_shape=CHIP, gain=1.0, read_noise=4.0, saturation=6e4,
                        fringe=tmpl, find_cosmics=False)
    fit = res.stats["fringe"]
    assert abs(fit.amplitude - amp) / amp < 0.05
    good = res.mask == 0
    assert abs(np.corrcoef(res.image[good], tmpl[good])[0, 1]) < 0.05
    assert res.stats["timings"]["fringe"] > 0


# --------------------------------------------------------------------------- binning

@pytest.mark.parametrize("engine", ENGINES)
def test_binning_ignores_masked_pixels(engine):
    ny, nx = 70, 45                                  # not multiples of 16: partial edge blocks
    y, x = np.mgrid[0:ny, 0:nx]
    img = ((y // 16) * 10 + (x // 16)).astype(np.float32)   # each 16x16 block is constant
    mask = np.zeros((ny, nx), np.uint16)
    img[3, 4] = 1e6
    mask[3, 4] = maskbits.CR                          # masked outlier: ignored
    img[20:32, 16:32] = np.nan                        # non-finite: ignored
    mask[32:48, 32:45] = maskbits.GAP                 # a whole block masked -> fill
    out, n = binning.bin_image(img, 16, mask=mask, return_counts=True, engine=engine)
    assert out.shape == (5, 3)
    expect = (np.arange(5)[:, None] * 10 + np.arange(3)[None, :]).astype(np.float32)
    ok = np.isfinite(out)
    np.testing.assert_allclose(out[ok], expect[ok], rtol=1e-6)
    assert not ok[2, 2] and ok.sum() == 14
    assert n[0, 0] == 255 and n[4, 2] == (70 - 64) * (45 - 32)
    assert n[1, 1] == 256 - 12 * 16
    coarse = binning.bin_image(img, 256, mask=mask, engine=engine)
    assert coarse.shape == (1, 1)
    good = ((mask & maskbits.BAD) == 0) & np.isfinite(img)
    assert coarse[0, 0] == pytest.approx(img[good].mean(), rel=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_per_cell_masters_and_raw_dtypes_give_the_same_chip(engine):
    """Masters as per-cell arrays in raw orientation == chip arrays in chip orientation;
    big-endian (astropy) and float32 raw cells == native uint16."""
    cells, kw, _ = _flat_field_frame(8, nonlinear=False)
    parity = {"xy10": (-1, 1), "xy01": (1, -1), "xy11": (-1, -1)}
    static = np.zeros(CHIP, np.uint16)
    static[10:20, 30] = maskbits.DETECTOR
    kw = dict(kw, cell_parity=parity, static_mask=static, engine=engine)
    ref = detrend_cells(cells, **kw)

    def per_cell(arr):
        out = {}
        for c, (x0, y0) in ORIGINS.items():
            v = arr[y0:y0 + NY, x0:x0 + NX]
            px, py = parity.get(c, (1, 1))
            out[c] = v[::py, ::px].copy()
        return out

    kw_cells = dict(kw, bias=per_cell(kw["bias"]), dark=per_cell(kw["dark"]),
                    flat=per_cell(kw["flat"]), static_mask=per_cell(static))
    a = detrend_cells(cells, **kw_cells)
    np.testing.assert_array_equal(a.mask, ref.mask)
    np.testing.assert_allclose(a.image, ref.image, rtol=1e-6, atol=1e-3)
    b = detrend_cells({c: r.astype(">u2") for c, r in cells.items()}, **kw)
    np.testing.assert_array_equal(b.image, ref.image)
    f = detrend_cells({c: r.astype(np.float32) for c, r in cells.items()}, **kw)
    np.testing.assert_allclose(f.image, ref.image, rtol=1e-6, atol=1e-3)
    assert np.count_nonzero(ref.mask & maskbits.DETECTOR) == 10


@pytest.mark.parametrize("engine", ENGINES)
def test_non_finite_raw_pixels_are_masked_not_propagated(engine):
    cells = {c: np.full((NY, NX + NOVER), 1100.0, np.float32) for c in ORIGINS}
    cells["xy00"][5, 6] = np.nan
    cells["xy00"][7, 8] = np.inf
    res = detrend_cells(cells, datasec=DATASEC, biassec=BIASSEC, cell_origins=ORIGINS,
                        chip_shape=CHIP, gain=1.0, read_noise=5.0, saturation=60000.0,
                        find_cosmics=False, engine=engine)
    assert np.isfinite(res.image).all() and np.isfinite(res.variance).all()
    assert res.mask[5, 6] & maskbits.DETECTOR and res.mask[7, 8] & maskbits.DETECTOR
    assert np.count_nonzero(res.mask & maskbits.DETECTOR) == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_all_cells_dead_still_gives_a_valid_chip(engine):
    out = (np.full(CHIP, 9, np.float32), np.full(CHIP, 9, np.float32), np.full(CHIP, 9, np.uint16))
    res = detrend_cells({}, datasec=DATASEC, biassec=BIASSEC, cell_origins=ORIGINS,
                        chip_shape=CHIP, gain=1.0, read_noise=5.0, saturation=6e4,
                        find_cosmics=False, engine=engine, out=out)
    assert np.all(res.image == 0) and np.all(res.variance == 0)
    assert np.all((res.mask == maskbits.GAP) | (res.mask == maskbits.DEAD_CELL))
    assert np.count_nonzero(res.mask == maskbits.DEAD_CELL) == 4 * NY * NX
