"""The local HTTP datastore: listings, checksums, downloads and deterministic fault injection."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from ps1mpi.infra import http
from ps1mpi.sim.datastore import DatastoreIndex, FaultSpec, start_datastore

# (exposure, MJD-OBS, filter, RA text (hours), DEC text, true RA, true DEC)
EXPOSURES = [
    ("o5000g0003o", 55000.30, "i", "22:10:24.0", "+02:12:00", 332.6, 2.2),
    ("o5000g0001o", 55000.10, "r", "00:00:00.0", "-00:30:00", 0.0, -0.5),
    ("o5000g0002o", 55000.20, "r", "12:00:00.0", "+45:00:00", 180.0, 45.0),
]
CHIPS = ("XY01", "XY10", "XY11")


def write_chip(path: Path, exp: str, chip: str, mjd: float, filt: str, ra: str, dec: str,
               value: int = 1000) -> None:
    h = fits.Header()
    h["EXPNAME"] = exp
    h["RA"] = ra
    h["DEC"] = dec
    h["POSANGLE"] = 12.5
    h["FILTERID"] = f"{filt}.00000"
    h["FILTER"] = filt
    h["MJD-OBS"] = mjd
    h["EXPTIME"] = 45.0
    h["AIRMASS"] = 1.25
    h["DETECTOR"] = chip
    h["CAMERA"] = "testcam"
    rng = np.random.default_rng(abs(hash((exp, chip))) % 2**32)
    cells = [fits.ImageHDU((value + rng.integers(0, 50, (20, 24))).astype(np.uint16), name=f"xy{i}0")
             for i in range(2)]
    fits.HDUList([fits.PrimaryHDU(header=h), *cells]).writeto(path)


@pytest.fixture()
def store(tmp_path):
    root = tmp_path / "datastore"
    for exp, mjd, filt, ra, dec, _, _ in EXPOSURES:
        (root / exp).mkdir(parents=True)
        for chip in CHIPS:
            write_chip(root / exp / f"{exp}.{chip}.fits", exp, chip, mjd, filt, ra, dec)
    return root


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_exposure_listing_from_headers(store):
    (store / "o5000g0001o" / ".o5000g0001o.XY00.fits.tmp-1234").write_bytes(b"partial")
    (store / ".hidden").mkdir()
    (store / "notes.txt").write_text("not an exposure")
    with start_datastore(store) as ds:
        rows = http.list_exposures(ds.url)
        assert [r.exp_name for r in rows] == ["o5000g0001o", "o5000g0002o", "o5000g0003o"]
        truth = {e[0]: e for e in EXPOSURES}
        for r in rows:
            exp, mjd, filt, _, _, ra, dec = truth[r.exp_name]
            assert r.mjd_obs == mjd and r.filter == filt and r.camera == "testcam"
            assert r.ra == pytest.approx(ra, abs=1e-9) and r.dec == pytest.approx(dec, abs=1e-9)
            assert (r.posangle, r.exptime, r.airmass, r.nchips) == (12.5, 45.0, 1.25, 3)
            assert r.dateobs == http.mjd_to_iso(mjd)
            assert r.uri == f"{ds.url}/{exp}/index.txt"
        # time filters: MJD and ISO, inclusive
        assert [r.exp_name for r in http.list_exposures(ds.url, since=55000.2)] == \
            ["o5000g0002o", "o5000g0003o"]
        iso = http.mjd_to_iso(55000.25)
        assert [r.exp_name for r in http.list_exposures(ds.url, since=iso)] == ["o5000g0003o"]
        assert http.list_exposures(ds.url, since=56000) == []
        with pytest.raises(http.HTTPStatusError) as info:
            http.list_exposures(ds.url, since="not-a-time")
        assert info.value.status == 400


def test_chip_listing_sizes_and_md5(store):
    with start_datastore(store) as ds:
        chips = http.list_chips(f"{ds.url}/o5000g0002o/index.txt")
        assert [c.chip for c in chips] == list(CHIPS)
        for c in chips:
            path = store / "o5000g0002o" / c.file
            assert c.file == f"o5000g0002o.{c.chip}.fits"
            assert c.bytes == path.stat().st_size and c.md5 == md5_of(path)
            assert c.uri == f"{ds.url}/o5000g0002o/{c.file}"
        # the JSON form carries the same rows
        import json
        doc = json.loads(http.fetch(f"{ds.url}/o5000g0002o/index.json"))
        assert [(c["chip"], c["md5"]) for c in doc["chips"]] == [(c.chip, c.md5) for c in chips]
        assert http.fetch(f"{ds.url}/o5000g0002o/").startswith(b"# ps1mpi-datastore chips v1")


def test_md5_computed_once_and_recomputed_when_file_changes(store):
    index = DatastoreIndex(store)
    rows = index.chip_rows("o5000g0001o")
    assert index.md5_computed == 3
    assert index.chip_rows("o5000g0001o") == rows and index.md5_computed == 3
    path = store / "o5000g0001o" / "o5000g0001o.XY10.fits"
    write_chip(path.with_suffix(".new"), "o5000g0001o", "XY10", 55000.1, "r", "0:0:0", "0:0:0",
               value=2000)
    os.replace(path.with_suffix(".new"), path)
    rows2 = index.chip_rows("o5000g0001o")
    assert index.md5_computed == 4
    new = {r["chip"]: r["md5"] for r in rows2}
    assert new["XY10"] == md5_of(path) != {r["chip"]: r["md5"] for r in rows}["XY10"]
    # warming sums what is not cached yet, once
    assert index.warm() == 9 and index.md5_computed == 10
    assert index.warm() == 9 and index.md5_computed == 10


def test_download_files_and_refuse_unknown_paths(store, tmp_path):
    with start_datastore(store) as ds:
        (c,) = [c for c in http.list_chips(f"{ds.url}/o5000g0003o/index.txt") if c.chip == "XY11"]
        res = http.download(c.uri, tmp_path / "dl" / c.file, size=c.bytes, md5=c.md5)
        assert res.path.read_bytes() == (store / "o5000g0003o" / c.file).read_bytes()
        for bad in ("/o5000g0003o/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
                    "/o5000g0003o/o5000g0001o.XY01.fits", "/nope/index.txt", "/o5000g0003o",
                    "/a/b/c"):
            with pytest.raises(http.HTTPStatusError) as info:
                http.fetch(ds.url + bad)
            assert info.value.status == 404, bad
        assert ds.stats()["files"] == 1


def test_settle_hides_exposures_being_written(store):
    with start_datastore(store, settle_s=3600) as ds:
        assert http.list_exposures(ds.url) == []
    old = time.time() - 10
    for p in store.rglob("*"):
        os.utime(p, (old, old))
    with start_datastore(store, settle_s=5) as ds:
        assert len(http.list_exposures(ds.url)) == 3


# ------------------------------------------------------------------------------ faults

def test_fault_draws_are_deterministic_and_near_their_rate():
    spec = FaultSpec(error_rate=0.3, seed=7)
    paths = [f"/o{i:04d}/o{i:04d}.XY01.fits" for i in range(2000)]
    hits = [spec.draw("error", p, 0) for p in paths]
    assert hits == [FaultSpec(error_rate=0.3, seed=7).draw("error", p, 0) for p in paths]
    assert 0.26 < np.mean(hits) < 0.34
    assert hits != [FaultSpec(error_rate=0.3, seed=8).draw("error", p, 0) for p in paths]
    limited = FaultSpec(error_rate=1.0, attempts=2, match="*XY01*")
    assert [limited.draw("error", paths[0], n) for n in range(4)] == [True, True, False, False]
    assert not limited.draw("error", "/o1/o1.XY02.fits", 0)
    with pytest.raises(ValueError, match="error_rate"):
        FaultSpec(error_rate=1.5)
    with pytest.raises(ValueError, match="MODE=RATE"):
        FaultSpec.parse(["explode=0.1"])
    assert FaultSpec.parse(["error=0.25", "bad-md5=0.5"], seed=3) == \
        FaultSpec(error_rate=0.25, bad_md5_rate=0.5, seed=3)


def test_error_faults_then_retry_succeeds(store, tmp_path):
    with start_datastore(store, faults=FaultSpec(error_rate=1.0, attempts=1, match="*.fits")) as ds:
        (c, *_) = http.list_chips(f"{ds.url}/o5000g0001o/index.txt")  # listings unaffected
        with pytest.raises(http.HTTPStatusError) as info:
            http.download(c.uri, tmp_path / c.file, size=c.bytes, md5=c.md5)
        assert info.value.status == 500 and info.value.fault == 2
        assert not (tmp_path / c.file).exists()
        http.download(c.uri, tmp_path / c.file, size=c.bytes, md5=c.md5)  # second request ok
        assert md5_of(tmp_path / c.file) == c.md5
        assert ds.stats()["error"] == 1


def test_truncated_body_fault(store, tmp_path):
    tmp_path = tmp_path / "dl"
    tmp_path.mkdir()
    with start_datastore(store, faults=FaultSpec(truncate_rate=1.0, truncate_fraction=0.25,
                                                 match="*.fits")) as ds:
        (c, *_) = http.list_chips(f"{ds.url}/o5000g0001o/index.txt")
        with pytest.raises(http.TruncatedBody) as info:
            http.download(c.uri, tmp_path / c.file, size=c.bytes, md5=c.md5)
        assert info.value.fault == 5 and f"{c.bytes * 1 // 4} of {c.bytes}" in str(info.value)
        assert list(tmp_path.iterdir()) == []


def test_slow_fault_times_out(store, tmp_path):
    with start_datastore(store, faults=FaultSpec(slow_rate=1.0, slow_s=2.0, match="*.fits")) as ds:
        (c, *_) = http.list_chips(f"{ds.url}/o5000g0001o/index.txt")
        t0 = time.monotonic()
        with pytest.raises(http.DownloadTimeout) as info:
            http.download(c.uri, tmp_path / c.file, size=c.bytes, md5=c.md5, timeout=0.3)
        assert info.value.fault == 6 and time.monotonic() - t0 < 1.5
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 1.5  # stop() does not wait for the slow answer


def test_bad_md5_and_oversize_listing_faults(store, tmp_path):
    tmp_path = tmp_path / "dl"
    tmp_path.mkdir()
    faults = FaultSpec(bad_md5_rate=1.0, match="*XY10*", attempts=1)
    with start_datastore(store, faults=faults) as ds:
        url = f"{ds.url}/o5000g0002o/index.txt"
        first = {c.chip: c for c in http.list_chips(url)}
        truth = {c: md5_of(store / "o5000g0002o" / f"o5000g0002o.{c}.fits") for c in CHIPS}
        assert first["XY10"].md5 != truth["XY10"]
        assert first["XY01"].md5 == truth["XY01"] and first["XY11"].md5 == truth["XY11"]
        with pytest.raises(http.ChecksumMismatch) as info:
            http.download(first["XY10"].uri, tmp_path / "x", size=first["XY10"].bytes,
                          md5=first["XY10"].md5)
        assert info.value.fault == 5 and not (tmp_path / "x").exists()
        second = {c.chip: c for c in http.list_chips(url)}  # the listing is corrected
        assert second["XY10"].md5 == truth["XY10"]
        ds.set_faults(FaultSpec(oversize_rate=1.0, match="*XY11*"))
        c = {c.chip: c for c in http.list_chips(url)}["XY11"]
        real = (store / "o5000g0002o" / c.file).stat().st_size
        assert c.bytes < real
        with pytest.raises(http.OversizeBody):
            http.download(c.uri, tmp_path / "y", size=c.bytes, md5=c.md5)
        assert list(tmp_path.iterdir()) == []


def test_cli_serve_and_ls(store):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "ps1mpi", "datastore", "serve", "--root",
                             str(store), "--fail-rate", "error=1", "--fault-match", "*XY01.fits"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("datastore serving"), line + proc.stderr.read()
        url = line.split()[-1]
        out = subprocess.run([sys.executable, "-m", "ps1mpi", "datastore", "ls", url, "--chips",
                              "--since", "55000.15"], capture_output=True, text=True, env=env,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        assert "2 exposures" in out.stdout and "o5000g0001o" not in out.stdout
        assert md5_of(store / "o5000g0003o" / "o5000g0003o.XY11.fits") in out.stdout
        with pytest.raises(http.HTTPStatusError):
            http.fetch(f"{url}/o5000g0003o/o5000g0003o.XY01.fits")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
    assert rc == 0
    assert "'error': 1" in proc.stdout.read()
