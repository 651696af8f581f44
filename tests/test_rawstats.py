"""Registration metadata: headers, quick pixel statistics, and the merge into an exposure."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ps1mpi.algorithms.rawstats import (MetadataConflict, RawMetadataError, chip_pixel_stats,
                                        header_metadata, merge_exposure_metadata, parse_angle)


def good_header(**over):
    h = {"EXPNAME": "o5432g0123o", "RA": "22:10:24.0", "DEC": "-00:30:00", "POSANGLE": 12.5,
         "FILTERID": "r.00000", "FILTER": "r", "MJD-OBS": 55317.25, "EXPTIME": 45.0,
         "AIRMASS": 1.2, "DETECTOR": "XY01", "CAMERA": "gpc1", "TELESCOP": "PS1"}
    h.update(over)
    return {k: v for k, v in h.items() if v is not None}


# ------------------------------------------------------------------------------ headers

def test_parse_angle():
    assert parse_angle("22:10:24.0", hours=True) == pytest.approx(332.6, abs=1e-12)
    assert parse_angle("-00:30:00") == -0.5  # the sign of a zero-degree declination
    assert parse_angle("+45 30 36") == pytest.approx(45.51, abs=1e-12)
    assert parse_angle(" 12.25 ", hours=True) == 12.25  # decimal values are degrees
    assert parse_angle(np.float32(3.5)) == 3.5
    for bad in ("12:75:00", "abc", None, True, "nan"):
        with pytest.raises(ValueError):
            parse_angle(bad, what="RA")


def test_header_metadata_values():
    md = header_metadata(good_header())
    assert md["exp_name"] == "o5432g0123o" and md["chip"] == "XY01"
    assert md["ra"] == pytest.approx(332.6, abs=1e-12) and md["dec"] == -0.5
    assert (md["filter"], md["filter_id"]) == ("r", "r.00000")
    assert (md["mjd"], md["exptime"], md["airmass"], md["posangle"]) == (55317.25, 45.0, 1.2, 12.5)
    assert (md["camera"], md["telescope"]) == ("gpc1", "PS1")
    # FILTER derived from FILTERID, CHIP accepted for DETECTOR, RA in degrees wraps
    md = header_metadata(good_header(FILTER=None, DETECTOR=None, CHIP="XY77", RA=360.5))
    assert (md["filter"], md["chip"], md["ra"]) == ("r", "XY77", pytest.approx(0.5))


def test_header_metadata_reports_every_problem():
    with pytest.raises(RawMetadataError) as info:
        header_metadata(good_header(EXPTIME=None, AIRMASS=None, FILTER=None, FILTERID=None),
                        source="raw/o1/o1.XY01.fits")
    msg = str(info.value)
    assert msg.startswith("raw/o1/o1.XY01.fits:")
    assert "EXPTIME" in msg and "AIRMASS" in msg and "FILTER" in msg
    with pytest.raises(RawMetadataError) as info:
        header_metadata(good_header(DEC=95.0, AIRMASS=0.5, EXPTIME=-1, **{"MJD-OBS": "soon"}))
    problems = " ".join(info.value.problems)
    for word in ("DEC", "AIRMASS", "EXPTIME", "MJD-OBS"):
        assert word in problems
    assert len(info.value.problems) == 4


# ------------------------------------------------------------------------------ pixels

def test_pixel_stats_exact_over_data_sections():
    rng = np.random.default_rng(1)
    sec = (0, 30, 0, 40)
    cells = {}
    for i in range(4):
        raw = np.full((30, 48), 9999.0, np.float32)          # overscan: must not count
        raw[:, :40] = rng.normal(1000 + 50 * i, 10 + i, (30, 40))
        cells[f"xy{i}0"] = raw
    cells["xy00"][3, 5] = 65000.0                             # 2 saturated data pixels
    cells["xy20"][7, 7] = 70000.0
    cells["xy30"][0, 0] = np.nan                              # excluded
    stats = chip_pixel_stats(cells, saturation=60000.0, datasec=sec)
    data = np.concatenate([c[:30, :40].ravel() for c in cells.values()]).astype(np.float64)
    data = data[np.isfinite(data)]
    assert stats.npix == data.size == 4 * 1200 - 1 and stats.ntotal == 4800
    assert stats.mean == pytest.approx(data.mean(), rel=1e-12)
    assert stats.stdev == pytest.approx(data.std(), rel=1e-10)
    assert stats.sat_frac == pytest.approx(2 / data.size)
    assert stats.nan_frac == pytest.approx(1 / 4800)
    assert not stats.all_nan and stats.nan_cells == ()
    assert stats.as_summary() == {"ncells": 4, "mean": stats.mean, "stdev": stats.stdev,
                                  "sat_frac": stats.sat_frac}


def test_pixel_stats_precise_with_large_offset():
    # float32 pixels near 1e6 with unit noise: a naive sum of squares in float32 would fail
    rng = np.random.default_rng(2)
    cells = [(1e6 + rng.normal(0, 1, (100, 100))).astype(np.float32) for _ in range(3)]
    stats = chip_pixel_stats(cells)
    data = np.concatenate([c.ravel() for c in cells]).astype(np.float64)
    assert stats.stdev == pytest.approx(data.std(), rel=1e-9)
    assert stats.mean == pytest.approx(data.mean(), rel=1e-14)


def test_pixel_stats_saturation_per_cell_and_integers():
    cells = {"xy00": np.array([[10, 20], [30, 40]], np.uint16),
             "xy01": np.array([[10, 20], [30, 40]], np.uint16)}
    stats = chip_pixel_stats(cells, saturation={"xy00": 30, "xy01": 100})
    assert stats.sat_frac == pytest.approx(2 / 8)          # 30 and 40 in xy00 only
    assert stats.mean == 25.0 and stats.stdev == pytest.approx(np.std([10, 20, 30, 40]))
    with pytest.raises(ValueError, match="no entry for cells"):
        chip_pixel_stats(cells, saturation={"xy00": 30})


def test_all_nan_detection():
    nan = np.full((5, 5), np.nan, np.float32)
    stats = chip_pixel_stats({"xy00": nan, "xy01": np.ones((5, 5), np.float32)})
    assert stats.nan_cells == ("xy00",) and not stats.all_nan and stats.mean == 1.0
    stats = chip_pixel_stats({"xy00": nan, "xy01": nan.copy()})
    assert stats.all_nan and math.isnan(stats.mean) and stats.nan_frac == 1.0
    assert stats.nan_cells == ("xy00", "xy01")


def test_pixel_stats_bad_input_named():
    with pytest.raises(ValueError, match="no cells"):
        chip_pixel_stats({})
    with pytest.raises(ValueError, match="cell xy00: expected a 2-D"):
        chip_pixel_stats({"xy00": np.ones(5)})
    with pytest.raises(ValueError, match="cell xy00: data section"):
        chip_pixel_stats({"xy00": np.ones((5, 5))}, datasec=(0, 6, 0, 5))


# ------------------------------------------------------------------------------ merging

def chip_record(chip, mean, stdev, sat, quality=0, **over):
    md = header_metadata(good_header(DETECTOR=chip, **over))
    md.update(mean=mean, stdev=stdev, sat_frac=sat, quality=quality)
    return md


def test_merge_shared_and_derived_values():
    chips = [chip_record("XY01", 1000.0, 10.0, 0.001),
             chip_record("XY02", 1100.0, 12.0, 0.003),
             chip_record("XY03", 5000.0, 99.0, 0.5, quality=4)]   # bad: left out of the means
    exp = merge_exposure_metadata(chips)
    assert exp.ok and exp.nchips == 3 and exp.nchips_bad == 1
    assert exp.mean == 1050.0 and exp.stdev == 11.0 and exp.sat_frac == pytest.approx(0.002)
    rec = exp.as_record()
    assert rec["exp_name"] == "o5432g0123o" and rec["filter"] == "r" and rec["mjd"] == 55317.25
    assert rec["ra"] == pytest.approx(332.6) and rec["nchips"] == 3


def test_merge_tolerances():
    base = chip_record("XY01", 1.0, 1.0, 0.0, **{"MJD-OBS": 55317.25})
    near = chip_record("XY02", 1.0, 1.0, 0.0, **{"MJD-OBS": 55317.25 + 0.2 / 86400})
    far = chip_record("XY03", 1.0, 1.0, 0.0, **{"MJD-OBS": 55317.25 + 10 / 86400})
    assert merge_exposure_metadata([base, near]).ok
    exp = merge_exposure_metadata([base, near, far])
    assert [c.key for c in exp.conflicts] == ["mjd"] and "XY03" in str(exp.conflicts[0])
    # RA across 0/360 is compared on the sky
    a = chip_record("XY01", 1.0, 1.0, 0.0, RA=359.99999, DEC=0.0)
    b = chip_record("XY02", 1.0, 1.0, 0.0, RA=0.00001, DEC=0.0)
    assert merge_exposure_metadata([a, b]).ok
    # 1.5 arcsec in RA at dec 80 deg is 0.26 arcsec on the sky: consistent
    a = chip_record("XY01", 1.0, 1.0, 0.0, RA=100.0, DEC=80.0)
    b = chip_record("XY02", 1.0, 1.0, 0.0, RA=100.0 + 1.5 / 3600, DEC=80.0)
    assert merge_exposure_metadata([a, b]).ok
    b = chip_record("XY02", 1.0, 1.0, 0.0, RA=100.0 + 1.5 / 3600, DEC=0.0)
    a = chip_record("XY01", 1.0, 1.0, 0.0, RA=100.0, DEC=0.0)
    assert [c.key for c in merge_exposure_metadata([a, b]).conflicts] == ["ra"]


def test_merge_conflicts_reported_and_strict_raises():
    chips = [chip_record("XY01", 1.0, 1.0, 0.0),
             chip_record("XY02", 1.0, 1.0, 0.0, FILTER="g", FILTERID="g.00000"),
             chip_record("XY03", 1.0, 1.0, 0.0, EXPNAME="o5432g0124o")]
    exp = merge_exposure_metadata(chips)
    keys = sorted(c.key for c in exp.conflicts)
    assert keys == ["exp_name", "filter", "filter_id"] and not exp.ok
    assert exp.values["filter"] == "r"  # the first chip's value is kept
    with pytest.raises(MetadataConflict) as info:
        merge_exposure_metadata(chips, strict=True)
    assert "o5432g0123o" in str(info.value) and "XY02='g'" in str(info.value)


def test_merge_all_bad_and_partial_headers():
    chips = [{"chip": "XY01", "exp_name": "o1", "quality": 2},
             {"chip": "XY02", "exp_name": "o1", "filter": "r", "mean": 5.0, "quality": 3}]
    exp = merge_exposure_metadata(chips)
    assert exp.ok and exp.nchips_bad == 2 and math.isnan(exp.mean)
    assert exp.values == {"exp_name": "o1", "filter": "r"}
    with pytest.raises(ValueError, match="no chips"):
        merge_exposure_metadata([])
