"""The quantisation step from an image's own noise, and what it does to a RICE round trip."""

import numpy as np
import pytest

from ps1mpi.algorithms.quantise import quantisation_step, row_noise


def test_row_noise_recovers_white_noise_under_sources_and_gaps():
    rng = np.random.default_rng(4)
    img = rng.normal(100.0, 7.0, (320, 600))
    yy, xx = np.mgrid[:320, :600]
    for x0, y0 in rng.uniform(20, 580, (15, 2)):  # stars on top of the noise
        img += 5e3 * np.exp(-((xx - x0) ** 2 + (yy - y0 % 300) ** 2) / 8.0)
    img[:, 200:260] = 0.0  # a gap (exact zeros: left out)
    noise = row_noise(img, row_step=4)
    assert np.nanmedian(noise) == pytest.approx(7.0, rel=0.04)
    assert quantisation_step(img, qlevel=16) == pytest.approx(7.0 / 16, rel=0.08)


def test_step_follows_the_quiet_rows_and_refuses_bad_input():
    rng = np.random.default_rng(5)
    img = rng.normal(0.0, 10.0, (400, 300))
    img[:100] = rng.normal(0.0, 4.0, (100, 300))  # a quarter of the rows is quieter
    assert quantisation_step(img, qlevel=1, quantile=0.1) == pytest.approx(4.0, rel=0.1)
    assert quantisation_step(img, qlevel=1, quantile=0.9) == pytest.approx(10.0, rel=0.1)
    assert quantisation_step(np.zeros((50, 50)), qlevel=16) is None
    with pytest.raises(ValueError, match="qlevel"):
        quantisation_step(img, qlevel=0)
    with pytest.raises(ValueError, match="2-d"):
        row_noise(np.zeros(10))


def test_rice_round_trip_adds_the_expected_quantisation_noise(tmp_path):
    from ps1mpi.stages.chip import write_float_image
    import fitsio

    rng = np.random.default_rng(6)
    img = rng.normal(0.0, 30.0, (256, 512)).astype(np.float32)
    img[:, :16] = 0.0
    path = tmp_path / "q.fits"
    write_float_image(path, img, {}, compress=True, qlevel=16.0, seed_name="exp.XY01")
    back = fitsio.read(str(path))
    err = (back - img)[:, 16:]
    assert np.all(back[:, :16] == 0.0)  # exact zeros kept
    # step = sigma / 16: uniform quantisation error of width step -> sigma / (16 sqrt 12)
    assert np.std(err) == pytest.approx(30.0 / 16 / np.sqrt(12), rel=0.1)
    assert abs(np.mean(err)) < 0.01
    write_float_image(tmp_path / "r.fits", img, {}, compress=True, qlevel=16.0,
                      seed_name="exp.XY01")
    assert (tmp_path / "r.fits").read_bytes() == path.read_bytes()  # a redo: same bytes
