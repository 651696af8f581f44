"""Camera geometry: layouts, cells, raw-cell sections, focal-plane coordinates."""

from __future__ import annotations

import numpy as np
import pytest

from ps1mpi.geometry.camera import CAMERA_DIR, load_camera, parse_fits_section


@pytest.fixture(scope="module")
def gpc1():
    return load_camera("gpc1")


@pytest.fixture(scope="module")
def small_cam():
    return load_camera("testcam")


def _inside(px, py, X, Y):
    """Crossing-number point-in-polygon (vectorised over points)."""
    X2, Y2 = np.roll(X, -1), np.roll(Y, -1)
    px = np.atleast_1d(px)[:, None]
    py = np.atleast_1d(py)[:, None]
    cond = (Y > py) != (Y2 > py)
    xint = X + (py - Y) * (X2 - X) / np.where(Y2 == Y, 1, Y2 - Y)
    return (np.count_nonzero(cond & (px < xint), axis=1) % 2) == 1


def test_gpc1_structure(gpc1):
    assert gpc1.name == "gpc1"
    assert len(gpc1.chip_names) == 60
    assert "XY00" not in gpc1.chip_names and "XY77" not in gpc1.chip_names
    assert (gpc1.ncell_x, gpc1.ncell_y, gpc1.cell_nx, gpc1.cell_ny) == (8, 8, 590, 598)
    assert (gpc1.cell_gap_x, gpc1.cell_gap_y, gpc1.chip_nx, gpc1.chip_ny) == (18, 12, 4846, 4868)
    assert gpc1.cell_names[0] == "xy00" and gpc1.cell_names[-1] == "xy77"
    assert len(gpc1.cell_names) == 64 and len(set(gpc1.cell_names)) == 64
    assert gpc1.pixel_scale == pytest.approx(0.258) and gpc1.pixel_size_um == 10.0
    c = gpc1.chip("xy01")  # case-insensitive
    assert (c.x0, c.y0, c.xparity, c.yparity) == (4971, 10286, -1, -1)
    c = gpc1.chip("XY76")
    assert (c.x0, c.y0, c.xparity, c.yparity) == (34954, 31164, 1, 1)
    with pytest.raises(KeyError, match="XY00"):
        gpc1.chip("XY00")


def test_cells_tile_the_chip(gpc1, small_cam):
    for cam in (gpc1, small_cam):
        # xyIJ: I is the column (x), J the row (y)
        assert cam.cell_origin("xy10") == (cam.cell_nx + cam.cell_gap_x, 0)
        assert cam.cell_origin("xy01") == (0, cam.cell_ny + cam.cell_gap_y)
        last = f"xy{cam.ncell_x - 1}{cam.ncell_y - 1}"
        x0, y0 = cam.cell_origin(last)
        assert (x0 + cam.cell_nx, y0 + cam.cell_ny) == (cam.chip_nx, cam.chip_ny)
        # every data pixel is in exactly the cell whose origin/size covers it
        img = np.zeros((cam.chip_ny, cam.chip_nx), dtype=int)
        for name in cam.cell_names:
            x0, y0 = cam.cell_origin(name)
            img[y0:y0 + cam.cell_ny, x0:x0 + cam.cell_nx] += 1
        assert img.max() == 1
        assert img.sum() == len(cam.cell_names) * cam.cell_nx * cam.cell_ny
    assert gpc1.cell_origin("xy34") == (3 * 608, 4 * 610)
    with pytest.raises(KeyError, match="xy88"):
        gpc1.cell_origin("xy88")
    with pytest.raises(KeyError, match="not a cell name"):
        gpc1.cell_origin("cell7")


def test_cell_at(gpc1):
    x = np.array([0.0, 589.0, 590.0, 607.4, 608.0, 4845.0, 100.0, -1.0])
    y = np.array([0.0, 597.0, 0.0, 0.0, 0.0, 4867.0, 600.0, 0.0])
    assert gpc1.cell_at(x, y).tolist() == ["xy00", "xy00", "", "", "xy10", "xy77", "", ""]


def test_raw_cell_sections(gpc1, small_cam):
    assert gpc1.raw_cell_shape == (598, 624)
    assert gpc1.datasec == (0, 598, 0, 590)
    assert gpc1.biassec == (0, 598, 590, 624)
    assert gpc1.datasec_fits == "[1:590,1:598]"
    raw = np.zeros(gpc1.raw_cell_shape)
    y0, y1, x0, x1 = gpc1.datasec
    assert raw[y0:y1, x0:x1].shape == (gpc1.cell_ny, gpc1.cell_nx)
    y0, y1, x0, x1 = small_cam.datasec
    assert np.zeros(small_cam.raw_cell_shape)[y0:y1, x0:x1].shape == (400, 400)
    b = small_cam.biassec
    assert b[1] - b[0] == 400 and b[3] - b[2] == 32
    assert parse_fits_section("[591:624,1:598]") == (0, 598, 590, 624)
    with pytest.raises(ValueError, match="BIASSEC"):
        parse_fits_section("591:624,1:598", what="BIASSEC")
    with pytest.raises(ValueError, match="empty"):
        parse_fits_section("[10:5,1:3]")


def test_electronics_defaults(gpc1, small_cam):
    for cam in (gpc1, small_cam):
        assert 1.0 <= cam.gain <= 1.3
        assert 5.0 <= cam.read_noise <= 8.0
        assert 50000 <= cam.saturation <= 65535
        assert 0 < cam.bias_level < cam.saturation
        assert 0 <= cam.dark_current < 1.0


def test_testcam(small_cam):
    assert small_cam.chip_names == ["XY00", "XY01", "XY10", "XY11"]
    parities = {(c.xparity, c.yparity) for c in small_cam.chips.values()}
    assert parities == {(-1, -1), (1, 1)}
    assert (small_cam.chip_nx, small_cam.chip_ny) == (808, 806)
    assert small_cam.pixel_scale == pytest.approx(0.258)
    raw = len(small_cam.chip_names) * 4 * np.prod(small_cam.raw_cell_shape)
    assert 2.5e6 < raw < 3.5e6
    assert small_cam.npix_exposure == 4 * 4 * 400 * 400


def test_optical_axis_is_layout_centre(gpc1, small_cam):
    # GPC1 chips span layout X 125.5 .. 39799.5 and Y 275.5 .. 41174.5 (pixel edges)
    assert (gpc1.axis_x, gpc1.axis_y) == (19962.5, 20725.0)
    assert gpc1.focal_plane_extent() == (-19837.0, 19837.0, -20449.5, 20449.5)
    x0, x1, y0, y1 = small_cam.focal_plane_extent()
    assert x0 == -x1 and y0 == -y1


def test_chip_focal_round_trip_and_parity(gpc1):
    rng = np.random.default_rng(5)
    x = rng.uniform(-0.5, gpc1.chip_nx - 0.5, 500)
    y = rng.uniform(-0.5, gpc1.chip_ny - 0.5, 500)
    for name in gpc1.chip_names:
        X, Y = gpc1.chip_to_focal(name, x, y)
        x2, y2 = gpc1.focal_to_chip(name, X, Y)
        np.testing.assert_allclose(x2, x, atol=1e-9)
        np.testing.assert_allclose(y2, y, atol=1e-9)
        assert np.all(gpc1.chip_at_focal(X, Y) == name)
    # XY01 has parity -1: pixel (0, 0) at layout (4971, 10286), x increasing to -X
    X, Y = gpc1.chip_to_focal("XY01", [0.0, 10.0], [0.0, 20.0])
    np.testing.assert_allclose(X, [4971 - 19962.5, 4961 - 19962.5])
    np.testing.assert_allclose(Y, [10286 - 20725.0, 10266 - 20725.0])
    # XY40 has parity +1
    X, Y = gpc1.chip_to_focal("XY40", [0.0, 10.0], [0.0, 20.0])
    np.testing.assert_allclose(X, [20041 - 19962.5, 20051 - 19962.5])


def test_chip_at_focal_gaps_and_outside(gpc1):
    # between XY3* (right edge 19884.5) and XY4* (left edge 20040.5): a 156-px gap
    X = np.array([19950.0, 0.0]) - gpc1.axis_x
    Y = np.array([20000.0, 0.0]) - gpc1.axis_y
    assert gpc1.chip_at_focal(X, Y).tolist() == ["", ""]
    # the missing corner chip XY00 area
    X, Y = gpc1.chip_to_focal("XY01", 2000.0, 2000.0)
    assert gpc1.chip_at_focal(X, Y - 5143) == ""
    assert gpc1.chip_at_focal(1e6, 0.0) == ""


def test_focal_plane_outline(gpc1, small_cam):
    for cam in (gpc1, small_cam):
        X, Y = cam.focal_plane_outline()
        # counter-clockwise (positive signed area), rectilinear
        area = 0.5 * np.sum(X * np.roll(Y, -1) - np.roll(X, -1) * Y)
        assert area > 0
        assert np.all((np.roll(X, -1) == X) | (np.roll(Y, -1) == Y))
        for name in cam.chip_names:
            cx, cy = cam.chip_to_focal(name, np.array([-0.5, cam.chip_nx - 0.5, 0, 100]),
                                       np.array([-0.5, cam.chip_ny - 0.5, 300, 0]))
            assert np.all(_inside(cx, cy, X, Y)), name
        # no point far beyond the chips is inside
        x0, x1, y0, y1 = cam.focal_plane_extent()
        assert not _inside(np.array([x1 + 500]), np.array([0.0]), X, Y)[0]
    # GPC1: the outline follows the missing corner OTAs
    X, Y = gpc1.focal_plane_outline()
    cx, cy = gpc1.chip_to_focal("XY01", 2400.0, 2400.0)
    assert not _inside(cx, cy - 5143, X, Y)[0]
    assert gpc1.focal_plane_outline(grow=200)[0].max() == pytest.approx(19837.0 + 200)


def test_load_by_path_and_errors(tmp_path):
    cam = load_camera(CAMERA_DIR / "testcam.toml")
    assert cam is load_camera("testcam")
    with pytest.raises(ValueError, match="known cameras"):
        load_camera("nosuchcam")
    text = (CAMERA_DIR / "testcam.toml").read_text()
    (tmp_path / "testcam_focal_plane.csv").write_text(
        (CAMERA_DIR / "testcam_focal_plane.csv").read_text())
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('datasec = "[1:400,1:400]"', 'datasec = "[1:390,1:400]"'))
    with pytest.raises(ValueError, match="datasec"):
        load_camera(bad)
    bad.write_text(text.replace('biassec = "[401:432,1:400]"', 'biassec = "[390:432,1:400]"'))
    with pytest.raises(ValueError, match="overlap"):
        load_camera(bad)
    bad.write_text(text.replace("gain = 1.15", 'gain = "high"'))
    with pytest.raises(ValueError, match="gain"):
        load_camera(bad)
    (tmp_path / "over.csv").write_text("chip,x0,y0,xparity,yparity\nXY00,0,0,1,1\nXY01,500,0,1,1\n")
    bad.write_text(text.replace("testcam_focal_plane.csv", "over.csv"))
    with pytest.raises(ValueError, match="XY00 and XY01 overlap"):
        load_camera(bad)
    (tmp_path / "par.csv").write_text("chip,x0,y0,xparity,yparity\nXY00,0,0,2,1\n")
    bad.write_text(text.replace("testcam_focal_plane.csv", "par.csv"))
    with pytest.raises(ValueError, match="parities"):
        load_camera(bad)
