"""Registration: header and pixel metadata per chip, exposures merged from chips, bad data as
quality, registered once. MPI runs use `mpiexec -n 2` against the real local datastore."""

from __future__ import annotations

import math
from pathlib import Path

import fitsio
import numpy as np
import pytest
from astropy.io import fits

from ps1mpi.infra.config import load_recipe
from ps1mpi.infra.ledger import Ledger
from ps1mpi.infra.runtime import WorkUnit
from ps1mpi.infra.schema import State
from ps1mpi.sim.datastore import start_datastore
from ps1mpi.stages.base import make_context
from ps1mpi.stages.register import EXP_QUALITY, QUALITY, RegisterStage
from tests.mpi_util import ps1mpi
from tests.test_summitcopy import CAMERA, NIGHT, make_exposure, make_night

BAD_A, BAD_B, CONFLICT = "o5000t0011o", "o5000t0012o", "o5000t0013o"


def truth_stats(path: Path) -> tuple[float, float]:
    """Mean and standard deviation of a raw chip's data sections, computed independently."""
    y0, y1, x0, x1 = CAMERA.datasec
    with fitsio.FITS(str(path)) as f:
        data = np.concatenate([f[i].read()[y0:y1, x0:x1].astype(np.float64).ravel()
                               for i in range(1, len(f))])
    return float(data.mean()), float(data.std())


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def drop_keyword(path: Path, key: str) -> None:
    with fits.open(path, mode="update") as hdul:
        del hdul[0].header[key]


def make_bad_exposures(root: Path) -> None:
    # A: two good chips, one truncated, one with a cell missing
    a = make_exposure(root, BAD_A, 55000.40, "r", 1800.0, seed=11,
                      chips=["XY00", "XY01", "XY11"])
    make_exposure(root, BAD_A, 55000.40, "r", 1800.0, seed=12, chips=["XY10"],
                  cells=CAMERA.cell_names[:3])
    truncate(a["XY00"])
    # B: nothing good: all-NaN pixels, a missing keyword, a header of another exposure/chip
    make_exposure(root, BAD_B, 55000.41, "r", np.nan, seed=13, chips=["XY00"], dtype="float32")
    b = make_exposure(root, BAD_B, 55000.41, "r", 1900.0, seed=14, chips=["XY01", "XY10", "XY11"],
                      chip_header={"XY10": {"EXPNAME": "o5000t0099o"}, "XY11": {"DETECTOR": "XY00"}})
    drop_keyword(b["XY01"], "AIRMASS")
    # C: good chips that disagree on the airmass (not checked against the listing)
    make_exposure(root, CONFLICT, 55000.42, "z", 2000.0, seed=15,
                  chip_header={"XY11": {"AIRMASS": 1.5}})


def rows_by_name(led: Ledger, table: str) -> dict[str, int]:
    exp = [e.decode() for e in led.column(table, "exp_name")]
    if "chip" in led.table(table).column_names:
        return {f"{e}.{c.decode()}": i for i, (e, c) in enumerate(zip(exp, led.column(table, "chip")))}
    return {e: i for i, e in enumerate(exp)}


# ------------------------------------------------------------------------------ MPI runs

def test_night_downloads_registers_once_and_refuses_a_second_version(tmp_path):
    store = tmp_path / "datastore"
    files = make_night(store)
    make_bad_exposures(store)
    camp = tmp_path / "campaign"
    led_path = camp / "ledger.h5"
    Ledger.create(led_path).close()
    with start_datastore(store) as ds:
        proc = ps1mpi(2, ["summitcopy", "--datastore", ds.url, "--ledger", led_path])
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = ps1mpi(2, ["register", "--ledger", led_path])
    assert proc.returncode == 0, proc.stdout + proc.stderr  # bad data is quality, not a fault
    assert "24 done (6 bad quality), 0 faulted of 24 units" in proc.stdout

    with Ledger.open(led_path) as led:
        chips = rows_by_name(led, "rawImfile")
        exps = rows_by_name(led, "rawExp")
        im = led.read("rawImfile")
        ex = led.read("rawExp")
        im_msg = led.message_text(im["message"])
        ex_msg = led.message_text(ex["message"])
    assert len(chips) == 24 and len(exps) == 6
    assert np.all(im["state"] == State.DONE) and np.all(ex["state"] == State.DONE)
    assert np.all(im["fault"] == 0) and np.all(ex["fault"] == 0)

    # good chips: header values and pixel statistics against independent truth
    for exp, mjd, filt, level in NIGHT:
        for chip, path in files[exp].items():
            r = chips[f"{exp}.{chip}"]
            mean, std = truth_stats(path)
            assert im["quality"][r] == 0
            assert im["mean"][r] == pytest.approx(mean, rel=1e-6)
            assert im["stdev"][r] == pytest.approx(std, rel=1e-5)
            assert im["sat_frac"][r] == 0 and im["ncells"][r] == 4
            assert (im["filter"][r].decode(), im["mjd"][r], im["exptime"][r]) == (filt, mjd, 30.0)
            assert im["airmass"][r] == pytest.approx(1.1)
            assert im["path"][r].decode() == f"raw/{exp}/{path.name}"
        e = exps[exp]
        means = [truth_stats(p)[0] for p in files[exp].values()]
        assert ex["quality"][e] == 0 and ex["nchips"][e] == 4 and ex["nchips_bad"][e] == 0
        assert ex["mean"][e] == pytest.approx(np.mean(means), rel=1e-6)
        assert abs(ex["mean"][e] - level) < 0.1
        assert ex["posangle"][e] == 0.75 and ex["ra"][e] == 150.25 and ex["dec"][e] == 2.5
        assert ex["filter"][e].decode() == filt and ex["camera"][e].decode() == "testcam"

    # bad chips: the right quality code and a reason naming the file
    want = {f"{BAD_A}.XY00": ("unreadable", "truncated"), f"{BAD_A}.XY10": ("cells", "cell"),
            f"{BAD_B}.XY00": ("all_nan", "NaN"), f"{BAD_B}.XY01": ("header", "AIRMASS"),
            f"{BAD_B}.XY10": ("mismatch", "EXPNAME"), f"{BAD_B}.XY11": ("mismatch", "DETECTOR")}
    bad = {name for name, r in chips.items() if im["quality"][r]}
    assert bad == set(want)
    for name, (code, word) in want.items():
        r = chips[name]
        assert im["quality"][r] == QUALITY[code], (name, im_msg[r])
        assert word in im_msg[r] and name.split(".")[1] in im_msg[r], (name, im_msg[r])
    a, b, c = exps[BAD_A], exps[BAD_B], exps[CONFLICT]
    assert ex["quality"][a] == 0 and ex["nchips_bad"][a] == 2 and ex["nchips"][a] == 4
    good_a = [chips[f"{BAD_A}.XY01"], chips[f"{BAD_A}.XY11"]]
    assert ex["mean"][a] == pytest.approx(np.mean(im["mean"][good_a]), rel=1e-6)
    assert ex["quality"][b] == EXP_QUALITY["no_good_chip"] and ex["nchips_bad"][b] == 4
    assert math.isnan(ex["mean"][b])
    assert ex["quality"][c] == EXP_QUALITY["conflict"] and "airmass" in ex_msg[c]
    assert ex["nchips_bad"][c] == 0

    # registering again is a no-op
    again = ps1mpi(2, ["register", "--ledger", led_path])
    assert again.returncode == 0 and "0 done (0 bad quality), 0 faulted of 0 units" in again.stdout

    # a second version of an exposure (another summitExp row with its name) is refused
    exp = NIGHT[0][0]
    with Ledger.open(led_path, "a") as led:
        run = led.append("summitExp", 1, exp_name=exp, filter="r", mjd=NIGHT[0][1], nchips=1,
                         camera="testcam", exptime=30.0, state=State.DONE)
        led.append("summitImfile", 1, run=run[0], exp_name=exp, chip="XY00", state=State.DONE,
                   path=f"raw/{exp}/{exp}.XY00.fits")
    proc = ps1mpi(2, ["register", "--ledger", led_path])
    assert proc.returncode == 1
    assert "second version" in proc.stderr and exp in proc.stderr
    with Ledger.open(led_path) as led:
        assert led.nrows("rawExp") == 6 and led.nrows("rawImfile") == 24


# ------------------------------------------------------------------------------ in-process

@pytest.fixture()
def one_chip(tmp_path):
    """A registered-looking rawImfile unit for a chip written in the campaign's raw tree."""
    exp, mjd, filt, level = NIGHT[0]
    paths = make_exposure(tmp_path / "raw", exp, mjd, filt, level, chips=["XY01"])
    ctx = make_context(root=tmp_path, recipe=load_recipe(), world=None,
                       ledger_path=tmp_path / "ledger.h5", stage="register")

    def unit(**info):
        base = {"exp_name": exp, "chip": "XY01", "path": f"raw/{exp}/{paths['XY01'].name}",
                "filter": filt, "mjd": mjd, "exptime": 30.0, "camera": "testcam"}
        base.update(info)
        return WorkUnit("rawImfile", 0, f"{exp}.XY01", 150.25, 2.5, info=base)

    return RegisterStage(), ctx, unit, paths["XY01"]


def test_process_good_chip(one_chip):
    stage, ctx, unit, path = one_chip
    out = stage.process(unit(), ctx)
    mean, std = truth_stats(path)
    assert out.quality == 0 and out.message == ""
    assert out.summary["mean"] == pytest.approx(mean, rel=1e-9)
    assert out.summary["stdev"] == pytest.approx(std, rel=1e-7)
    assert out.summary["ncells"] == 4 and out.summary["sat_frac"] == 0.0
    assert out.summary["ra"] == 150.25 and out.summary["filter"] == "r"


def test_process_saturation_fraction(one_chip):
    stage, ctx, unit, path = one_chip
    with fits.open(path, mode="update") as hdul:
        data = hdul["xy00"].data
        data[10:20, 10:30] = 65000          # 200 data pixels above SATURATE = 60000
        data[5, 410] = 65000                # overscan: not counted
        hdul["xy00"].data = data
    out = stage.process(unit(), ctx)
    assert out.quality == 0
    assert out.summary["sat_frac"] == pytest.approx(200 / (4 * 400 * 400))


def test_process_listing_mismatch_and_missing_file(one_chip):
    stage, ctx, unit, path = one_chip
    out = stage.process(unit(filter="g", mjd=NIGHT[0][1] + 10 / 86400), ctx)
    assert out.quality == QUALITY["mismatch"]
    assert "FILTER 'r'" in out.message and "MJD-OBS" in out.message
    assert out.summary["filter"] == "r"  # the header's values are still recorded
    path.unlink()
    with pytest.raises(FileNotFoundError, match="missing from the raw tree"):
        stage.process(unit(), ctx)  # a lost file is a fault (system), not bad data
