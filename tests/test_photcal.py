"""Photometric calibration (zero point, colour terms, synthetic w) on constructed catalogs."""

from __future__ import annotations

import numpy as np
import pytest

from ps1mpi.algorithms.photcal import (ColorTerm, fit_zero_point, reference_system_mags,
                                       synthetic_w, synthetic_w_err)


def make_catalog(rng, n, *, zp, filter_band="r", color_term=None, noise=0.005,
                 outlier_frac=0.0, chips=("XY01", "XY02", "XY10", "XY11")):
    """Reference magnitudes of stars and their instrumental magnitudes through a zero point."""
    r = rng.uniform(15.0, 20.0, n)
    gr = rng.uniform(0.2, 1.4, n)
    ri = 0.45 * gr + rng.normal(0, 0.05, n)
    ref = {"g": r + gr, "r": r, "i": r - ri, "z": r - ri - 0.2 * gr, "y": r - ri - 0.3 * gr}
    term = color_term or ColorTerm(filter_band, ("g", "r"))
    if filter_band == "w":
        base = synthetic_w(ref["g"], ref["r"], ref["i"])
    else:
        base = ref[term.band]
    c = ref[term.color[0]] - ref[term.color[1]]
    m_sys = base + sum(k * c ** (p + 1) for p, k in enumerate(term.coeffs))
    err = np.full(n, noise)
    inst = m_sys - zp + rng.normal(0, noise, n)
    bad = rng.random(n) < outlier_frac
    inst[bad] += rng.choice([-1, 1], bad.sum()) * rng.uniform(0.2, 1.5, bad.sum())
    chip = rng.choice(np.asarray(chips), n)
    return inst, err, ref, chip, bad


def test_zero_point_with_colour_term_and_outliers_within_1_mmag():
    rng = np.random.default_rng(11)
    term = ColorTerm("g", ("g", "r"), coeffs=(0.05, -0.01))
    inst, err, ref, chip, bad = make_catalog(rng, 800, zp=24.9, filter_band="g", color_term=term,
                                             outlier_frac=0.08)
    zp = fit_zero_point(inst, err, ref, filter="g.00000", color_terms={"g": term}, chip=chip,
                        sys_floor=0.0, exptime=45.0)
    assert zp.success, zp.reason
    assert abs(zp.zp - 24.9) < 0.001
    assert zp.zp_err < 0.0005
    # the outliers are the rejected stars
    assert not np.any(zp.used & bad)
    assert zp.used[~bad].mean() > 0.98
    assert zp.rms == pytest.approx(0.005, rel=0.15)
    assert zp.zp_per_second == pytest.approx(24.9 - 2.5 * np.log10(45.0), abs=0.001)
    assert set(zp.chip_offsets) == {"XY01", "XY02", "XY10", "XY11"}
    # ignoring the colour term biases the zero point by the mean colour times the term
    plain = fit_zero_point(inst, err, ref, filter="g", sys_floor=0.0)
    assert abs(plain.zp - 24.9) > 0.02


def test_colour_terms_from_recipe_tables_and_colour_range():
    rng = np.random.default_rng(12)
    table = {"i": {"band": "i", "color": ["r", "i"], "coeffs": [-0.08],
                   "color_range": [0.1, 0.5]}}
    term = ColorTerm.from_mapping(table["i"], filter="i")
    inst, err, ref, chip, _ = make_catalog(rng, 600, zp=24.7, filter_band="i", color_term=term)
    zp = fit_zero_point(inst, err, ref, filter="i", color_terms=table, sys_floor=0.0)
    assert abs(zp.zp - 24.7) < 0.001
    # stars outside the colour range are not used
    c = ref["r"] - ref["i"]
    assert not np.any(zp.used & ((c < 0.1) | (c > 0.5)))
    assert zp.n_input == np.sum((c >= 0.1) & (c <= 0.5))
    with pytest.raises(ValueError, match="colour term for filter 'i': unknown keys"):
        ColorTerm.from_mapping({"band": "i", "colour": ["r", "i"]}, filter="i")
    with pytest.raises(ValueError, match="color_range"):
        ColorTerm.from_mapping({"band": "i", "color_range": [1, 0]}, filter="i")


def test_synthetic_w_closes_the_calibration_and_matches_the_simulator():
    # a flat AB spectrum has the same magnitude in every band
    assert synthetic_w(np.array([17.0]), np.array([17.0]), np.array([17.0]))[0] == \
        pytest.approx(17.0, abs=1e-12)
    # w is the magnitude of the mean band flux
    g, r, i = 18.0, 17.0, 16.5
    f = (10 ** (-0.4 * g) + 10 ** (-0.4 * r) + 10 ** (-0.4 * i)) / 3
    assert synthetic_w(np.array([g]), np.array([r]), np.array([i]))[0] == \
        pytest.approx(-2.5 * np.log10(f), abs=1e-12)
    sky = pytest.importorskip("ps1mpi.sim.sky")
    rng = np.random.default_rng(13)
    gg, rr, ii = rng.uniform(14, 21, (3, 50))
    np.testing.assert_allclose(synthetic_w(gg, rr, ii), sky.w_from_gri(gg, rr, ii), atol=1e-12)
    # error propagation: with equal fluxes each band contributes a third
    e = synthetic_w_err(np.array([17.0]), np.array([17.0]), np.array([17.0]),
                        np.array([0.03]), np.array([0.03]), np.array([0.03]))
    assert e[0] == pytest.approx(0.03 / np.sqrt(3), rel=1e-9)
    # a w exposure calibrates against a reference catalog without w
    inst, err, ref, chip, _ = make_catalog(rng, 700, zp=26.0, filter_band="w",
                                           color_term=ColorTerm("w", ("g", "i")))
    zp = fit_zero_point(inst, err, ref, filter="w", sys_floor=0.0)
    assert abs(zp.zp - 26.0) < 0.001
    # where the catalog has w it is used as is
    m, _, synth = reference_system_mags({**ref, "w": np.where(np.arange(700) < 10, 15.0, np.nan)},
                                        ColorTerm("w", ("g", "i"), color_range=(-9, 9)))
    assert np.all(m[:10] == 15.0) and not synth[:10].any() and synth[10:].all()


def test_zero_point_error_matches_the_scatter_of_repeated_fits():
    rng = np.random.default_rng(14)
    zps, errs, sints = [], [], []
    for _ in range(150):
        inst, err, ref, chip, _ = make_catalog(rng, 120, zp=25.0, noise=0.02)
        # an intrinsic 0.015 mag scatter the errors do not describe
        inst = inst + rng.normal(0, 0.015, inst.size)
        zp = fit_zero_point(inst, err, ref, filter="r", sys_floor=0.0)
        zps.append(zp.zp)
        errs.append(zp.zp_err)
        sints.append(zp.sigma_int)
    assert np.mean(sints) == pytest.approx(0.015, abs=0.002)
    pull = (np.array(zps) - 25.0) / np.array(errs)
    assert np.std(pull) == pytest.approx(1.0, abs=0.15)
    assert abs(np.mean(pull)) < 0.25


def test_per_chip_offsets_are_measured():
    rng = np.random.default_rng(15)
    inst, err, ref, chip, _ = make_catalog(rng, 2000, zp=24.5, noise=0.01)
    inst[chip == "XY10"] -= 0.03          # that chip is 3% more sensitive
    zp = fit_zero_point(inst, err, ref, filter="r", chip=chip, sys_floor=0.0)
    off, off_err, n = zp.chip_offsets["XY10"]
    others = [zp.chip_offsets[c][0] for c in ("XY01", "XY02", "XY11")]
    assert off - np.mean(others) == pytest.approx(0.03, abs=4 * off_err + 0.002)
    assert n > 400


def test_failures_and_bad_input():
    rng = np.random.default_rng(16)
    inst, err, ref, chip, _ = make_catalog(rng, 4, zp=25.0)
    zp = fit_zero_point(inst, err, ref, filter="r")
    assert not zp.success and "usable stars" in zp.reason and np.isnan(zp.zp)
    inst, err, ref, chip, _ = make_catalog(rng, 50, zp=25.0)
    with pytest.raises(ValueError, match=r"ref_mags\['g'\]: shape"):
        fit_zero_point(inst, err, {**ref, "g": ref["g"][:10]}, filter="r")
    with pytest.raises(ValueError, match="inst_err: shape"):
        fit_zero_point(inst, err[:3], ref, filter="r")
    with pytest.raises(ValueError, match="no colour term for 'q'"):
        fit_zero_point(inst, err, ref, filter="q")
    # NaN reference magnitudes and large instrumental errors are skipped
    ref2 = dict(ref, r=np.where(np.arange(50) < 20, np.nan, ref["r"]))
    err2 = np.where(np.arange(50) >= 45, 0.5, err)
    zp = fit_zero_point(inst, err2, ref2, filter="r", sys_floor=0.0)
    assert zp.n_input == 25 and abs(zp.zp - 25.0) < 0.005
