"""Sky tessellations: RINGS.V3 against published facts, coverage, overlaps, footprints."""

from __future__ import annotations

import time

import numpy as np
import pytest
from astropy.wcs import WCS

from ps1mpi.cli import tess as tess_cli
from ps1mpi.geometry.camera import load_camera
from ps1mpi.geometry.focalplane import (
    Distortion,
    FocalPlaneModel,
    angular_separation,
)
from ps1mpi.geometry.tessellation import (
    load_tessellation,
    parse_skycell_name,
    ring_table,
    tessellation_dirs,
)

ARCSEC = 1.0 / 3600.0


@pytest.fixture(scope="module")
def rings():
    return load_tessellation("RINGS.V3")


@pytest.fixture(scope="module")
def tess_test_v1():
    return load_tessellation("TEST.V1")


def _random_sky(n, dec_min, seed):
    rng = np.random.default_rng(seed)
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(dec_min)), 1.0, n)))
    return ra, dec


def test_rings_v3_table(rings):
    assert rings.name == "RINGS.V3"
    assert len(rings.zone) == 33 and rings.zone[0] == 13 and rings.zone[-1] == 45
    assert rings.first_projcell == 487 and rings.n_projcells == 2157
    assert rings.nband[-1] == 1 and rings.dec[-1] == 90.0
    assert np.all((rings.xcell > 6200) & (rings.xcell < 6520))
    assert rings.pixel_scale == 0.25 and rings.overlap == 480


def test_published_skycell_center(rings):
    """The archive's stack of skycell.1405.053 is centred at RA 332.6004516572, Dec 2.1998090576."""
    sc = rings.skycell("skycell.1405.053")
    assert (sc.projcell, sc.index, sc.nx, sc.ny) == (1405, 53, 6240, 6243)
    sep = angular_separation(sc.ra_center, sc.dec_center, 332.6004516572, 2.1998090576)
    assert sep < 1e-3 * ARCSEC          # the brief asks < 1"; the construction gives 1e-7"
    r, d = sc.wcs.all_pix2world((sc.nx - 1) / 2, (sc.ny - 1) / 2, 0)
    assert angular_separation(r, d, 332.6004516572, 2.1998090576) < 1e-3 * ARCSEC
    assert rings.skycells_at(332.6004516572, 2.1998090576) == ["skycell.1405.053"]
    # projection cell 1405 is number 83 of the 90 in zone 23 (Dec 2): centre RA 332
    ra0, dec0 = rings.projcell_center(1405)
    assert (float(ra0), float(dec0)) == (332.0, 2.0)


def test_skycell_numbering_starts_lower_left(rings, tess_test_v1):
    for t, p in ((rings, 1405), (tess_test_v1, 70825)):
        c = {s: t.skycell(t.skycell_name(p, s)) for s in (0, 9, 90, 55)}
        # row j grows to the North, column k to the West (RA decreasing, East left)
        assert c[90].dec_center > c[0].dec_center
        assert c[0].ra_center > c[9].ra_center
        assert abs(c[0].dec_center - c[9].dec_center) < 0.02 * (c[90].dec_center
                                                                 - c[0].dec_center)
        # the tangent point is at the lower-left corner of skycell 55's own (unpadded) area
        r, d = t.projcell_center(p)
        x, y = c[55].sky_to_pixel(r, d)
        assert float(x) == pytest.approx(t.overlap / 2 - 0.5, abs=1.0)
        assert float(y) == pytest.approx(t.overlap / 2 - 0.5, abs=2.5)


@pytest.mark.parametrize("name,dec_min", [("RINGS.V3", -30.0), ("TEST.V1", -90.0)])
def test_coverage(name, dec_min):
    t = load_tessellation(name)
    ra, dec = _random_sky(20000, dec_min, seed=7)
    r = t.locate(ra, dec)
    counts = np.bincount(r["pos"], minlength=ra.size)
    assert counts.min() >= 1
    assert counts.max() <= 8
    # the reported pixel positions agree with the skycell WCS and lie inside the image
    for i in range(0, r["pos"].size, max(1, r["pos"].size // 40)):
        sc = t.skycell(t.skycell_name(r["projcell"][i], r["index"][i]))
        x, y = sc.sky_to_pixel(ra[r["pos"][i]], dec[r["pos"][i]])
        assert abs(float(x) - r["x"][i]) < 1e-6 and abs(float(y) - r["y"][i]) < 1e-6
        assert -0.5 <= r["x"][i] < sc.nx - 0.5 and -0.5 <= r["y"][i] < sc.ny - 0.5


def test_outside_declination_range(rings):
    assert rings.skycells_at(10.0, -60.0) == []
    polar = rings.skycells_at(123.0, 89.99)
    assert polar and all(n.startswith("skycell.2643.") for n in polar)


def test_neighbouring_skycells_overlap(rings, tess_test_v1):
    for t in (rings, tess_test_v1):
        sc = t.skycell(t.skycell_name(t.first_projcell + len(t.zone) * 3, 44))
        half = t.overlap / 2
        # a point inside the overlap strip on each side belongs to both neighbours
        for x, y, other in ((sc.nx - 1 - half / 2, sc.ny / 2, 45), (half / 2, sc.ny / 2, 43),
                            (sc.nx / 2, sc.ny - 1 - half / 2, 54), (sc.nx / 2, half / 2, 34)):
            r, d = sc.pixel_to_sky(x, y)
            got = t.skycells_at(float(r), float(d))
            assert sc.name in got and t.skycell_name(sc.projcell, other) in got, got
        # overlap width: 480 px for RINGS.V3 -> the strip just beyond it is not shared
        r, d = sc.pixel_to_sky(sc.nx - 1 - t.overlap - 3, sc.ny / 2)
        assert t.skycell_name(sc.projcell, 45) not in t.skycells_at(float(r), float(d))
    # neighbouring projection cells of every RINGS.V3 zone overlap at the zone's centre Dec
    for z in range(len(rings.zone) - 1):
        p0 = rings.projcell0[z]
        ra_mid = 0.5 * 360.0 / rings.nband[z]
        got = {parse_skycell_name(n)[0] for n in rings.skycells_at(ra_mid, rings.dec[z])}
        assert {p0, p0 + 1} <= got, (z, got)


def test_ring_construction_reproduces_rings_v3_bands(rings):
    """ring_table's NBAND rule gives RINGS.V3's number of cells per zone exactly."""
    t = ring_table(zone_height=4.0, pixel_scale=0.25, overlap=480)
    assert len(t["ZONE"]) == 46
    np.testing.assert_array_equal(t["NBAND"][13:], rings.nband)
    np.testing.assert_array_equal(t["PROJCELL"][13:], rings.projcell0)
    np.testing.assert_allclose(t["DEC"][13:], rings.dec)
    # our pitch always covers the zone band; RINGS.V3's XCELL is within a few pixels
    assert np.all(np.abs(t["XCELL"][13:40] - rings.xcell[:27]) <= 8)


def test_test_tessellation(tess_test_v1):
    assert tess_test_v1.name == "TEST.V1"
    assert tess_test_v1.dec_limit == (-90.0, 90.0)
    assert np.all((tess_test_v1.xcell >= 1000) & (tess_test_v1.xcell <= 1100))
    assert np.all((tess_test_v1.ycell >= 1000) & (tess_test_v1.ycell <= 1100))
    cam = load_camera("testcam")
    dist = Distortion.gpc1_like(norm=850.0)
    rng = np.random.default_rng(11)
    for _ in range(5):
        m = FocalPlaneModel(rng.uniform(0, 360), rng.uniform(-30, 80), rng.uniform(0, 360),
                            cam.pixel_scale, dist)
        names = tess_test_v1.skycells_in_polygon(*m.exposure_footprint(cam))
        assert 2 <= len(names) <= 16


def test_polygon_exact_cases(rings):
    sc = rings.skycell("skycell.1405.053")
    h = rings.overlap

    def poly(x0, x1, y0, y1):
        return sc.pixel_to_sky([x0, x1, x1, x0], [y0, y0, y1, y1])

    # strictly inside the skycell's own area: only itself
    assert rings.skycells_in_polygon(*poly(h + 100, h + 900, h + 100, h + 900)) == [sc.name]
    # around the corner shared with 054, 063, 064 (beyond the overlap): all four
    x, y = sc.nx - 1 - h // 4, sc.ny - 1 - h // 4
    got = rings.skycells_in_polygon(*poly(x - 10, x + 10, y - 10, y + 10))
    assert got == ["skycell.1405.053", "skycell.1405.054", "skycell.1405.063",
                   "skycell.1405.064"]
    # a polygon larger than the skycell, with no vertex or edge inside it, still touches it
    big = poly(-3000, sc.nx + 3000, -3000, sc.ny + 3000)
    got = rings.skycells_in_polygon(*big)
    assert sc.name in got and len(got) == 9


@pytest.mark.parametrize("camname,tname", [("gpc1", "RINGS.V3"), ("testcam", "TEST.V1")])
def test_exposure_footprint_contains_chip_corner_skycells(camname, tname):
    cam = load_camera(camname)
    t = load_tessellation(tname)
    x0, x1, y0, y1 = cam.focal_plane_extent()
    dist = Distortion.gpc1_like(norm=0.5 * max(x1 - x0, y1 - y0))
    rng = np.random.default_rng(13)
    for ra0, dec0 in ((0.3, 0.5), (rng.uniform(0, 360), rng.uniform(-29, 60)), (100.0, 86.0)):
        m = FocalPlaneModel(ra0, dec0, rng.uniform(0, 360), cam.pixel_scale, dist)
        got = set(t.skycells_in_polygon(*m.exposure_footprint(cam)))
        need = set()
        for chip in cam.chip_names:
            for r, d in zip(*m.chip_footprint(cam, chip)):
                need |= set(t.skycells_at(float(r), float(d)))
        assert need and need <= got
        # and no skycell far from every chip: each returned one holds a sampled chip pixel
        # or lies within the chip growth (half the inter-chip gap) of one
        step = 0.02 * cam.chip_nx
        rr, dd = [], []
        for chip in cam.chip_names:
            X, Y = np.meshgrid(np.arange(-0.5, cam.chip_nx, step),
                               np.arange(-0.5, cam.chip_ny, step))
            r, d = m.pixel_to_sky(cam, chip, X.ravel(), Y.ravel())
            rr.append(r)
            dd.append(d)
        rr, dd = np.concatenate(rr), np.concatenate(dd)
        loc = t.locate(rr, dd)
        hold = {t.skycell_name(p, s) for p, s in zip(loc["projcell"], loc["index"])}
        assert hold <= got
        margin = (cam._default_grow() + 1.5 * step) * cam.pixel_scale / t.pixel_scale
        for name in got - hold:
            sc = t.skycell(name)
            x, y = sc.sky_to_pixel(rr, dd)
            dx = np.maximum(np.maximum(-0.5 - x, x - (sc.nx - 0.5)), 0)
            dy = np.maximum(np.maximum(-0.5 - y, y - (sc.ny - 0.5)), 0)
            assert np.min(np.hypot(dx, dy)) < margin, name


def test_polygon_lookup_speed(rings):
    cam = load_camera("gpc1")
    rng = np.random.default_rng(17)
    models = [FocalPlaneModel(rng.uniform(0, 360), rng.uniform(-30, 85), rng.uniform(0, 360),
                              cam.pixel_scale, Distortion.gpc1_like()) for _ in range(20)]
    polys = [m.exposure_footprint(cam) for m in models]
    t0 = time.perf_counter()
    n = sum(len(rings.skycells_in_polygon(*p)) for p in polys)
    per = (time.perf_counter() - t0) / len(polys)
    assert 55 < n / len(polys) < 95        # a GPC1 exposure touches 61-90 RINGS.V3 skycells
    assert per < 0.1, f"{per * 1e3:.1f} ms per exposure"


def test_header_and_names(rings):
    sc = rings.skycell("skycell.1405.053")
    h = sc.header()
    assert h["NAXIS1"] == 6240 and h["NAXIS2"] == 6243
    assert h["SKYCELL"] == "skycell.1405.053" and h["TESS_ID"] == "RINGS.V3"
    assert h["CRPIX1"] == pytest.approx(240 + 2 * 5760 + 1)
    assert h["CRVAL1"] == 332.0 and h["CRVAL2"] == 2.0
    w = WCS(h)
    r, d = w.all_pix2world(3119.5, 3121.0, 0)
    assert angular_separation(r, d, sc.ra_center, sc.dec_center) < 1e-6 * ARCSEC
    assert parse_skycell_name("skycell.0487.000") == (487, 0)
    with pytest.raises(ValueError, match="skycell.PPPP.SSS"):
        rings.skycell("sky.1405.053")
    with pytest.raises(ValueError, match="does not exist"):
        rings.skycell("skycell.0100.000")
    with pytest.raises(ValueError, match="outside"):
        load_tessellation("TEST.V1").skycell("skycell.0100.0100")


def test_search_path(tmp_path, monkeypatch):
    (tmp_path / "TINY.V0.toml").write_text(
        'name = "TINY.V0"\nkind = "rings"\npixel_scale = 1.0\noverlap = 20\n'
        "[construction]\nzone_height = 10.0\n")
    monkeypatch.setenv("PS1MPI_TESSELLATION_DIR", str(tmp_path))
    assert tessellation_dirs()[0] == tmp_path
    t = load_tessellation("TINY.V0")
    assert t.name == "TINY.V0" and len(t.zone) == 19
    assert len(t.skycells_at(12.0, 34.0)) >= 1
    with pytest.raises(ValueError, match="unknown tessellation"):
        load_tessellation("NOPE.V9")
    (tmp_path / "BAD.toml").write_text('name = "BAD"\npixel_scale = 1.0\noverlap = 20\n')
    with pytest.raises(ValueError, match="table"):
        load_tessellation("BAD")


def test_cli(capsys):
    assert tess_cli.main(tess_cli.parse(["lookup", "332.6004516572", "2.1998090576"])) == 0
    out = capsys.readouterr().out
    assert out.startswith("skycell.1405.053") and "x=3119.50" in out
    args = tess_cli.parse(["footprint", "--ra", "10", "--dec", "20", "--pa", "30",
                           "--camera", "testcam", "--tess", "TEST.V1"])
    assert tess_cli.main(args) == 0
    names = capsys.readouterr().out.split()
    assert 2 <= len(names) <= 16 and all(n.startswith("skycell.") for n in names)
    assert tess_cli.main(tess_cli.parse(["wcs", "skycell.1405.053"])) == 0
    assert "CRVAL1  =                332.0" in capsys.readouterr().out
    assert tess_cli.main(tess_cli.parse(["wcs", "skycell.9999.000"])) == 2
    assert "does not exist" in capsys.readouterr().err
    assert tess_cli.main(tess_cli.parse(["lookup", "10", "-60"])) == 1
    assert isinstance(tess_cli.DESCRIPTION, str) and tess_cli.DESCRIPTION
