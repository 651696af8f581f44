"""Simulated sky, survey plan and reference catalog."""

from __future__ import annotations

import numpy as np
import pytest

from ps1mpi.infra.rawfile import parse_exposure_name
from ps1mpi.sim.catalogs import make_refcat
from ps1mpi.sim.plan import PRESETS, airmass_at, make_plan
from ps1mpi.sim.sky import (REF_EPOCH, SkyParams, angular_sep_deg, make_sky, mover_positions_at, propagate,
                            star_mags_at, transient_mags_at, w_from_gri)


@pytest.fixture(scope="module")
def sky():
    return make_sky((120.0, 20.0), 0.25, seed=11, mjd_range=(55576.0, 55942.0), pointings=[(120.0, 20.0)],
                    field_radius=0.08, nights=[55576, 55579], params=SkyParams(star_density=20000.0))


def test_star_counts_and_colours(sky):
    st = sky.stars[sky.stars["injected"] == 0]
    area = 2 * np.pi * (1 - np.cos(np.radians(0.25))) * (180 / np.pi) ** 2
    n21 = (st["r"] < 21).sum()
    assert abs(n21 - 20000 * area) < 5 * np.sqrt(20000 * area)
    # faint-end slope d log N / dm = 0.22
    h1, h2 = ((st["r"] > 20) & (st["r"] < 21)).sum(), ((st["r"] > 22) & (st["r"] < 23)).sum()
    assert np.log10(h2 / h1) / 2 == pytest.approx(0.22, abs=0.04)
    # all positions inside the cap
    assert angular_sep_deg(st["ra"], st["dec"], 120.0, 20.0).max() <= 0.25
    # stellar locus: redder in g-r is redder in r-i; M dwarfs have r-i > 1
    gr, ri = st["g"] - st["r"], st["r"] - st["i"]
    rank = lambda a: np.argsort(np.argsort(a))  # noqa: E731
    assert np.corrcoef(rank(gr), rank(ri))[0, 1] > 0.9 and ri[gr > 1.45].mean() > 1.3
    assert np.allclose(st["w"], w_from_gri(st["g"], st["r"], st["i"]), atol=1e-5)
    # w of equal g, r, i magnitudes is that magnitude
    assert w_from_gri(20.0, 20.0, 20.0) == pytest.approx(20.0)


def test_galaxies(sky):
    g = sky.galaxies
    assert set(np.unique(g["sersic_n"][(g["sersic_n"] == 1) | (g["sersic_n"] == 4)])) == {1.0, 4.0}
    assert 0.45 < (g["sersic_n"] == 1).mean() < 0.65 and 0.15 < (g["sersic_n"] == 4).mean() < 0.35
    # brighter galaxies are bigger
    assert np.median(g["r_e"][g["r"] < 20]) > 2 * np.median(g["r_e"][g["r"] > 23])
    assert g["q"].min() >= 0.2 and g["q"].max() <= 1.0


def test_proper_motion_propagation():
    ra, dec = propagate(np.array([10.0]), np.array([60.0]), np.array([100.0]), np.array([-50.0]), 10.0)
    # 1000 mas East (on the sky) = 1000 / cos(60) mas of RA; -500 mas in Dec
    assert (ra[0] - 10.0) * 3.6e6 == pytest.approx(2000.0, rel=1e-6)
    assert (dec[0] - 60.0) * 3.6e6 == pytest.approx(-500.0, rel=1e-6)


def test_variables_transients_movers(sky):
    st = sky.stars
    v = np.flatnonzero(st["var_amp"] > 0)
    assert v.size > 0
    mags = np.array([star_mags_at(st[v[:1]], "r", 55576.0 + t)[0] for t in np.linspace(0, st["var_period"][v[0]], 50)])
    assert mags.max() - mags.min() == pytest.approx(st["var_amp"][v[0]], rel=0.05)
    tr = sky.transients
    assert tr.size > 0
    t0 = tr[:1]
    at_peak = transient_mags_at(t0, "r", t0["t_peak"][0])[0]
    assert at_peak == pytest.approx(t0["r_peak"][0])
    assert transient_mags_at(t0, "r", t0["t_peak"][0] + 20)[0] == pytest.approx(at_peak + 20 * t0["decline"][0])
    assert transient_mags_at(t0, "r", t0["t_peak"][0] - 5)[0] > at_peak
    assert np.isinf(transient_mags_at(t0, "r", t0["t_peak"][0] - 200)[0])
    mv = sky.movers
    assert mv.size > 0 and set(np.floor(mv["mjd0"]).astype(int)) <= {55576, 55579}
    ra1, dec1 = mover_positions_at(mv[:1], mv["mjd0"][0] + 0.5)
    rate = np.hypot(mv["rate_ra"][0], mv["rate_dec"][0])
    assert angular_sep_deg(ra1, dec1, mv["ra0"][0], mv["dec0"][0])[0] == pytest.approx(0.5 * rate, rel=1e-3)


def test_plans():
    tiny = make_plan(PRESETS["tiny"], seed=1, camera_code="t", pixel_scale=0.258)
    assert len(tiny) == 4
    demo = make_plan(PRESETS["demo"], seed=1, camera_code="t", pixel_scale=0.258)
    assert 12 <= len(demo) <= 20
    names = [n.decode() for n in demo["expname"]]
    assert len(set(names)) == len(names)
    assert all(parse_exposure_name(n)["camera_code"] == "t" for n in names)
    assert set(b.decode() for b in demo["band"]) == {"g", "r", "i"}
    assert set(demo["pointing"]) == {0, 1} and len(set(demo["night"])) >= 3 and len(set(demo["season"])) == 2
    assert np.all(np.diff(demo["mjd"]) > 0)
    # TTI pairs: two exposures of the same pointing and filter within an hour
    for pair in np.unique(demo["tti_pair"]):
        rows = demo[demo["tti_pair"] == pair]
        if len(rows) == 2:
            dt = (rows["mjd"][1] - rows["mjd"][0]) * 1440
            assert 10 < dt < 60 and rows["band"][0] == rows["band"][1] and rows["pointing"][0] == rows["pointing"][1]
    # per filter and pointing several exposures (deep stacks), a night with two (nightly stacks)
    assert ((demo["band"] == b"r") & (demo["pointing"] == 0)).sum() >= 4
    assert (demo["airmass"] >= 1).all() and (demo["airmass"] < 2).all()
    # header pointing off the truth by at most the preset's error; the seeing in range
    err = angular_sep_deg(demo["ra"], demo["dec"], demo["ra_hdr"], demo["dec_hdr"]) * 3600
    assert err.max() <= PRESETS["demo"].pointing_error + 1e-6 and err.max() > 5
    assert demo["seeing"].min() >= 0.75 and demo["seeing"].max() <= 1.6
    # the same seed gives the same plan, another seed another
    again = make_plan(PRESETS["demo"], seed=1, camera_code="t", pixel_scale=0.258)
    assert np.array_equal(again, demo)
    other = make_plan(PRESETS["demo"], seed=2, camera_code="t", pixel_scale=0.258)
    assert not np.array_equal(other["seeing"], demo["seeing"])


def test_airmass():
    x, ha = airmass_at(0.0, 20.7072, 55576.0)
    # airmass is 1 at transit of a star at the site's latitude and grows with hour angle
    xs, has = airmass_at(0.0, 20.7072, 55576.0 + np.linspace(0, 1, 200))
    assert np.nanmin(xs[np.isfinite(xs)]) == pytest.approx(1.0, abs=2e-3)


def test_refcat_errors_are_honest(sky):
    ref = make_refcat(sky, seed=3)
    assert "W" not in ref.dtype.names and {"RA", "DEC", "PMRA", "PMDEC", "EPOCH", "G", "Y_ERR"} <= set(ref.dtype.names)
    assert (ref["EPOCH"] == REF_EPOCH).all()
    st = sky.stars[sky.stars["r"] < 21.5]
    np.testing.assert_array_equal(ref["ID"], st["id"])
    pull_dec = (ref["DEC"] - st["dec"]) * 3.6e6 / ref["DEC_ERR"]
    pull_r = (ref["R"] - st["r"]) / ref["R_ERR"]
    pull_pm = (ref["PMRA"] - st["pmra"]) / ref["PMRA_ERR"]
    for p in (pull_dec, pull_r, pull_pm):
        assert abs(np.mean(p)) < 0.1 and np.std(p) == pytest.approx(1.0, abs=0.1)
    assert make_refcat(sky, seed=3, with_w=True)["W"].size == ref.size


def test_cli_parse_and_bad_input(tmp_path, capsys):
    from ps1mpi.cli import sim as cli
    args = cli.parse(["--out", str(tmp_path / "o"), "--preset", "tiny", "--chips", "XY10,XY11", "--seed", "7",
                      "--no-detrend", "--star-density", "9000"])
    assert args.preset == "tiny" and args.chips == "XY10,XY11" and args.seed == 7 and args.no_detrend
    assert args.star_density == 9000.0 and cli.DESCRIPTION
    bad = cli.parse(["--out", str(tmp_path / "o"), "--preset", "tiny", "--exposures", "o0000t0001o"])
    assert cli.main(bad) == 1
    assert "o0000t0001o" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        cli.parse(["--out", "x", "--preset", "nope"])
