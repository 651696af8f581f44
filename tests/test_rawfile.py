"""Raw chip FITS files: round trip, readability by astropy and fitsio, validation."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from ps1mpi.geometry.camera import load_camera
from ps1mpi.infra.rawfile import (RawFileError, exposure_name, format_section, parse_exposure_name,
                                  parse_section, read_raw_chip, validate_raw_chip, write_raw_chip)

CAM = load_camera("testcam")


def _header(**over):
    h = {"EXPNAME": "o5576t0012o", "TELESCOP": "PS1", "CAMERA": "testcam", "DETECTOR": "XY10",
         "OBSTYPE": "OBJECT", "FILTERID": "r.00000", "FILTER": "r", "RA": 120.5, "DEC": 20.25,
         "POSANGLE": 0.0, "MJD-OBS": 55576.4075, "EXPTIME": 40.0, "AIRMASS": 1.03}
    h.update(over)
    return h


def _cells(seed=0, value=None):
    rng = np.random.default_rng(seed)
    ny, nx = CAM.raw_cell_shape
    out = {}
    for k, c in enumerate(CAM.cell_names):
        a = rng.integers(900, 1200, (ny, nx)).astype(np.float32)
        a[0, 0] = 1000 + k          # a marker per cell
        if value is not None:
            a[:] = value
        out[c] = a
    return out


def _write(path, cells=None, **kw):
    cells = _cells() if cells is None else cells
    args = dict(header=_header(), datasec=CAM.datasec, biassec=CAM.biassec, gain=1.15, read_noise=5.5,
                saturation=60000.0)
    args.update(kw)
    return write_raw_chip(path, cells, **args)


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_and_readers(tmp_path, dtype, compress):
    cells = _cells(1)
    p = _write(tmp_path / "o5576t0012o.XY10.fits", cells, dtype=dtype, compress=compress,
               gain={c: 1.0 + 0.01 * k for k, c in enumerate(CAM.cell_names)})
    raw = read_raw_chip(p)
    assert list(raw.cells) == CAM.cell_names
    for k, c in enumerate(CAM.cell_names):
        np.testing.assert_array_equal(raw.cells[c], cells[c])
        assert raw.cell_headers[c]["GAIN"] == pytest.approx(1.0 + 0.01 * k)
        assert raw.datasec(c) == CAM.datasec and raw.biassec(c) == CAM.biassec
    assert raw.header["EXPNAME"] == "o5576t0012o" and raw.header["NCELLS"] == 4
    assert raw.header["MJD-OBS"] == pytest.approx(55576.4075)
    assert raw.chip == "XY10"
    assert validate_raw_chip(p, camera=CAM) == []
    # astropy reads the same pixels and keywords
    with fits.open(p) as h:
        ext = [x for x in h if x.name.lower() == "xy01"][0]
        np.testing.assert_array_equal(ext.data.astype(np.float32), cells["xy01"])
        assert ext.header["DATASEC"] == "[1:400,1:400]" and ext.header["BIASSEC"] == "[401:432,1:400]"
        assert h[0].header["FILTER"] == "r"


def test_uint16_rounds_and_clips(tmp_path):
    cells = _cells(2)
    cells["xy00"][5, 5] = 70000.7
    cells["xy00"][6, 6] = -3.0
    cells["xy00"][7, 7] = 1234.6
    raw = read_raw_chip(_write(tmp_path / "a.fits", cells))
    assert raw.cells["xy00"][5, 5] == 65535 and raw.cells["xy00"][6, 6] == 0 and raw.cells["xy00"][7, 7] == 1235


def test_read_subset_and_missing_cell(tmp_path):
    p = _write(tmp_path / "a.fits")
    raw = read_raw_chip(p, cells=["xy11"])
    assert list(raw.cells) == ["xy11"] and raw.cells["xy11"][0, 0] == 1003
    with pytest.raises(RawFileError, match="a.fits.*xy22"):
        read_raw_chip(p, cells=["xy22"])


def test_writer_refuses_bad_input(tmp_path):
    h = _header()
    del h["FILTER"]
    with pytest.raises(ValueError, match="FILTER"):
        _write(tmp_path / "a.fits", header=h)
    with pytest.raises(ValueError, match="dtype"):
        _write(tmp_path / "a.fits", dtype="int32")
    small = {c: np.zeros((10, 10), np.float32) for c in CAM.cell_names}
    with pytest.raises(ValueError, match="smaller than DATASEC"):
        _write(tmp_path / "a.fits", small)
    assert not (tmp_path / "a.fits").exists()


def test_validate_truncated(tmp_path):
    p = _write(tmp_path / "t.fits")
    data = p.read_bytes()
    for cut in (len(data) - 2880 * 3, len(data) // 2, 1000):
        q = tmp_path / f"t{cut}.fits"
        q.write_bytes(data[:cut])
        problems = validate_raw_chip(q)
        assert problems and all(str(q) in m for m in problems)
        assert any("truncated" in m or "not a multiple" in m for m in problems), problems
    with pytest.raises(RawFileError, match=str(tmp_path / f"t{len(data) // 2}.fits")):
        r = read_raw_chip(tmp_path / f"t{len(data) // 2}.fits")
        for c in CAM.cell_names:
            assert r.cells[c].size  # pragma: no cover


def test_validate_missing_keywords_and_cells(tmp_path):
    # a file written by another program without FILTER and MJD-OBS, one cell missing GAIN,
    # and one cell fewer than NCELLS says
    prim = fits.PrimaryHDU()
    for k, v in _header().items():
        if k not in ("FILTER", "MJD-OBS"):
            prim.header[k] = v
    prim.header["NCELLS"] = 4
    hdus = [prim]
    for c in CAM.cell_names[:3]:
        im = fits.ImageHDU(np.full(CAM.raw_cell_shape, 1000, np.uint16), name=c)
        im.header["DATASEC"] = "[1:400,1:400]"
        im.header["BIASSEC"] = "[401:432,1:400]"
        if c != "xy01":
            im.header["GAIN"] = 1.1
        im.header["RDNOISE"] = 5.0
        im.header["SATURATE"] = 60000.0
        im.header["MAXLIN"] = 60000.0
        hdus.append(im)
    p = tmp_path / "m.fits"
    fits.HDUList(hdus).writeto(p)
    problems = validate_raw_chip(p, camera=CAM)
    text = "\n".join(problems)
    assert "lacks FILTER" in text and "lacks MJD-OBS" in text
    assert "NCELLS = 4 but the file has 3" in text
    assert "cell xy01 lacks GAIN" in text
    assert "missing ['xy11']" in text
    assert "constant" in text                # every cell is 1000 everywhere


def test_validate_all_nan_and_bad_values(tmp_path):
    cells = _cells(3)
    cells["xy10"] = np.full(CAM.raw_cell_shape, np.nan, np.float32)
    p = _write(tmp_path / "n.fits", cells, dtype="float32", header=_header(RA=400.0, EXPNAME="exp12"))
    problems = "\n".join(validate_raw_chip(p))
    assert "cell xy10 is all NaN" in problems
    assert "RA = 400.0 outside" in problems
    assert "EXPNAME = 'exp12'" in problems


def test_validate_against_camera(tmp_path):
    gpc1 = load_camera("gpc1")
    p = _write(tmp_path / "c.fits")
    problems = "\n".join(validate_raw_chip(p, camera=gpc1))
    assert "differs from camera gpc1" in problems and "cell extensions do not match camera gpc1" in problems


def test_validate_not_fits_and_empty(tmp_path):
    e = tmp_path / "empty.fits"
    e.write_bytes(b"")
    assert validate_raw_chip(e) == [f"{e}: file is empty"]
    t = tmp_path / "text.fits"
    t.write_bytes(b"hello world" * 400)
    assert any("not a FITS file" in m for m in validate_raw_chip(t))
    assert validate_raw_chip(tmp_path / "nope.fits") == [f"{tmp_path / 'nope.fits'}: no such file"]
    with pytest.raises(RawFileError, match="no such raw chip file"):
        read_raw_chip(tmp_path / "nope.fits")


def test_sections_and_names():
    assert format_section((0, 598, 590, 624)) == "[591:624,1:598]"
    assert parse_section("[591:624,1:598]") == (0, 598, 590, 624)
    assert parse_section(format_section((3, 10, 5, 9))) == (3, 10, 5, 9)
    with pytest.raises(RawFileError, match="DATASEC"):
        parse_section("[1:10;1:5]", what="DATASEC")
    with pytest.raises(ValueError):
        format_section((5, 5, 0, 3))
    name = exposure_name(55432, 123, camera_code="g")
    assert name == "o5432g0123o"
    assert parse_exposure_name(name) == {"night": 5432, "camera_code": "g", "seq": 123, "type_code": "o"}
    assert exposure_name(55432, 1, camera_code="t", obstype="BIAS") == "o5432t0001b"
    with pytest.raises(ValueError, match="o5432g0123o"):
        parse_exposure_name("x123")
