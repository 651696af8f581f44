"""summitcopy against the real local datastore: a night, faults and recovery, hostile listings,
watch mode. MPI runs use `mpiexec -n 2`."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from ps1mpi.geometry.camera import load_camera
from ps1mpi.infra import http
from ps1mpi.infra.config import load_recipe
from ps1mpi.infra.ledger import Ledger
from ps1mpi.infra.rawfile import write_raw_chip
from ps1mpi.infra.schema import Fault, State
from ps1mpi.sim.datastore import FaultSpec, start_datastore
from ps1mpi.stages.base import make_context
from ps1mpi.stages.summitcopy import SummitcopyStage
from tests.mpi_util import REPO, ps1mpi

CAMERA = load_camera("testcam")
# (exposure, MJD-OBS, filter, data level in ADU)
NIGHT = [("o5000t0001o", 55000.30, "r", 1500.0), ("o5000t0002o", 55000.31, "r", 2500.0),
         ("o5000t0003o", 55000.35, "i", 3500.0)]


def make_exposure(root: Path, exp: str, mjd: float, filt: str, level: float, *, seed: int = 0,
                  chips=None, header: dict | None = None, chip_header: dict | None = None,
                  cells=None, dtype: str = "uint16") -> dict[str, Path]:
    """Write a testcam exposure in the raw format (data at ``level`` +- 10 ADU, overscan at the
    bias level); returns chip -> path. ``chip_header`` maps chip -> header overrides."""
    rng = np.random.default_rng(seed)
    out = {}
    for chip in chips or CAMERA.chip_names:
        arrays = {}
        for cell in cells or CAMERA.cell_names:
            raw = np.full(CAMERA.raw_cell_shape, CAMERA.bias_level, np.float64)
            y0, y1, x0, x1 = CAMERA.datasec
            raw[y0:y1, x0:x1] = level + rng.normal(0, 10, (y1 - y0, x1 - x0))
            arrays[cell] = raw
        hdr = {"EXPNAME": exp, "TELESCOP": "PS1", "CAMERA": "testcam", "DETECTOR": chip,
               "OBSTYPE": "OBJECT", "FILTERID": f"{filt}.00000", "FILTER": filt, "RA": 150.25,
               "DEC": 2.5, "POSANGLE": 0.75, "MJD-OBS": mjd, "EXPTIME": 30.0, "AIRMASS": 1.1}
        hdr.update(header or {})
        hdr.update((chip_header or {}).get(chip, {}))
        path = root / exp / f"{exp}.{chip}.fits"
        write_raw_chip(path, arrays, header=hdr, datasec=CAMERA.datasec, biassec=CAMERA.biassec,
                       gain=CAMERA.gain, read_noise=CAMERA.read_noise,
                       saturation=CAMERA.saturation, dtype=dtype)
        out[chip] = path
    return out


def make_night(root: Path) -> dict[str, dict[str, Path]]:
    return {exp: make_exposure(root, exp, mjd, filt, level, seed=i)
            for i, (exp, mjd, filt, level) in enumerate(NIGHT)}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def leftovers(tree: Path) -> list[str]:
    return sorted(str(p) for p in tree.rglob(".*")) if tree.exists() else []


@pytest.fixture()
def campaign(tmp_path):
    store = tmp_path / "datastore"
    files = make_night(store)
    camp = tmp_path / "campaign"
    Ledger.create(camp / "ledger.h5").close()
    return store, camp, files


# ------------------------------------------------------------------------------ MPI runs

def test_night_downloads_completely_and_rerun_does_nothing(campaign):
    store, camp, files = campaign
    with start_datastore(store) as ds:
        proc = ps1mpi(2, ["summitcopy", "--datastore", ds.url, "--ledger", camp / "ledger.h5"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "3 new (12 chips, 0 refused)" in proc.stdout
        for exp, chips in files.items():
            for chip, src in chips.items():
                dst = camp / "raw" / exp / src.name
                assert md5(dst) == md5(src), dst
        assert leftovers(camp / "raw") == []
        with Ledger.open(camp / "ledger.h5") as led:
            assert led.counts("summitImfile")["done"] == 12
            assert np.all(led.column("summitExp", "state") == State.DONE)
            ranks = set(led.column("summitImfile", "rank").tolist())
            mb_s = led.column("summitImfile", "mb_s")
            paths = {p.decode() for p in led.column("summitImfile", "path")}
        assert ranks <= {0, 1} and np.all(mb_s > 0)
        assert paths == {f"raw/{e}/{p.name}" for e, c in files.items() for p in c.values()}
        served = ds.stats()["files"]
        again = ps1mpi(2, ["summitcopy", "--datastore", ds.url, "--ledger", camp / "ledger.h5"])
        assert again.returncode == 0, again.stderr
        assert "0 new (0 chips" in again.stdout and "0 downloaded" in again.stdout
        assert ds.stats()["files"] == served  # nothing fetched again
    with Ledger.open(camp / "ledger.h5") as led:
        assert led.nrows("summitExp") == 3 and led.nrows("summitImfile") == 12


def test_each_failure_mode_is_the_right_fault_and_revert_completes(campaign):
    store, camp, files = campaign
    e1, e2, e3 = (n for n, *_ in NIGHT)
    faults = [FaultSpec(error_rate=1.0, attempts=1, match=f"/{e1}/*XY00.fits"),
              FaultSpec(truncate_rate=1.0, attempts=1, match=f"/{e1}/*XY01.fits"),
              FaultSpec(bad_md5_rate=1.0, attempts=1, match=f"/{e2}/*XY00.fits"),
              FaultSpec(oversize_rate=1.0, attempts=1, match=f"/{e2}/*XY01.fits"),
              FaultSpec(slow_rate=1.0, slow_s=4.0, attempts=1, match=f"/{e3}/*XY00.fits")]
    expected = {(e1, "XY00"): (Fault.SYSTEM, "HTTP 500"), (e1, "XY01"): (Fault.DATA, "ended after"),
                (e2, "XY00"): (Fault.DATA, "md5"), (e2, "XY01"): (Fault.DATA, "more than the listed"),
                (e3, "XY00"): (Fault.TIMEOUT, "no answer")}
    led_path = camp / "ledger.h5"
    with start_datastore(store, faults=faults) as ds:
        proc = ps1mpi(2, ["summitcopy", "--datastore", ds.url, "--ledger", led_path,
                          "--timeout", "1"])
        assert proc.returncode == 1, proc.stdout + proc.stderr
        with Ledger.open(led_path) as led:
            exp = [e.decode() for e in led.column("summitImfile", "exp_name")]
            chip = [c.decode() for c in led.column("summitImfile", "chip")]
            fault = led.column("summitImfile", "fault")
            msgs = led.message_text(led.column("summitImfile", "message"))
            state = led.column("summitExp", "state")
        got = {(e, c): (int(f), m) for e, c, f, m in zip(exp, chip, fault, msgs) if f}
        assert set(got) == set(expected)
        for key, (code, word) in expected.items():
            assert got[key][0] == code, (key, got[key])
            assert word in got[key][1], (key, got[key])
            assert not (camp / "raw" / key[0] / f"{key[0]}.{key[1]}.fits").exists()
        assert leftovers(camp / "raw") == []             # nothing half-written
        assert list(state) == [State.RUN] * 3            # every exposure blocked by its fault
        # faults wait for an operator: a plain re-run retries nothing
        again = ps1mpi(2, ["summitcopy", "--datastore", ds.url, "--ledger", led_path])
        assert again.returncode == 0 and "0 downloaded, 0 faulted of 0 chips" in again.stdout
        rev = subprocess.run([sys.executable, "-m", "ps1mpi", "ledger", "revert", str(led_path),
                              "--table", "summitImfile"], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert rev.returncode == 0 and "reverted 5 rows" in rev.stdout, rev.stderr
        proc = ps1mpi(2, ["summitcopy", "--datastore", ds.url, "--ledger", led_path])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "5 downloaded, 0 faulted of 5 chips" in proc.stdout
    with Ledger.open(led_path) as led:
        assert np.all(led.column("summitExp", "state") == State.DONE)
        assert led.counts("summitImfile")["faulted"] == 0
        md5s = {(e.decode(), c.decode()): m.decode() for e, c, m in zip(
            led.column("summitImfile", "exp_name"), led.column("summitImfile", "chip"),
            led.column("summitImfile", "md5"))}
    for exp, chips in files.items():
        for chip, src in chips.items():
            assert md5(camp / "raw" / exp / src.name) == md5(src) == md5s[(exp, chip)]


def test_watch_picks_up_new_exposures_and_stops_on_sigterm(tmp_path):
    store = tmp_path / "datastore"
    first = make_exposure(store, *NIGHT[0], seed=0)
    # Backdate the first exposure past the settle time so poll 1 lists it however fast the
    # machine is; the second one, added later, must wait out the settle time itself.
    old = time.time() - 60
    for f in [*(store / NIGHT[0][0]).iterdir(), store / NIGHT[0][0]]:
        os.utime(f, (old, old))
    camp = tmp_path / "campaign"
    Ledger.create(camp / "ledger.h5").close()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with start_datastore(store, settle_s=0.5) as ds:
        proc = subprocess.Popen(["mpiexec", "-n", "2", sys.executable, "-m", "ps1mpi", "summitcopy",
                                 "--datastore", ds.url, "--ledger", str(camp / "ledger.h5"),
                                 "--watch", "--interval", "0.3"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        lines = []
        try:
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                lines.append(line)
                if "poll 1:" in line:
                    exp, mjd, filt, level = NIGHT[1]
                    make_exposure(tmp_path / "staging", exp, mjd, filt, level, seed=1)
                    os.replace(tmp_path / "staging" / exp, store / exp)  # appears at once
                if "1 new (4 chips" in line and "poll 1:" not in line:
                    break
        finally:
            proc.send_signal(signal.SIGTERM)
            rest, _ = proc.communicate(timeout=30)
        lines.append(rest)
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert "poll 1: 1 listed, 1 new (4 chips" in out and "stop requested" in out
    with Ledger.open(camp / "ledger.h5") as led:  # consistent after the stop
        assert [e.decode() for e in led.column("summitExp", "exp_name")] == [NIGHT[0][0], NIGHT[1][0]]
        assert np.all(led.column("summitImfile", "state") == State.DONE)
    assert md5(camp / "raw" / NIGHT[0][0] / first["XY11"].name) == md5(first["XY11"])


# ------------------------------------------------------------------------------ hostile listings

class _Hostile(BaseHTTPRequestHandler):
    """A datastore whose listings try to escape the raw tree, reach other hosts, and serve
    bodies larger than listed."""

    protocol_version = "HTTP/1.1"
    body = b"SIMPLE  =                    T" + b" " * 2849  # one FITS-sized block

    def log_message(self, *args):
        pass

    def _send(self, data: bytes, status: int = 200):
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        good_md5 = hashlib.md5(self.body).hexdigest()
        if self.path.startswith("/index.txt"):
            rows = [{"exp_name": "o1", "mjd_obs": 55000.1, "filter": "r", "ra": 10.0, "dec": 5.0,
                     "nchips": 7, "uri": f"{base}/o1/index.txt"},
                    {"exp_name": "../../etc", "mjd_obs": 55000.2, "nchips": 1,
                     "uri": f"{base}/x/index.txt"},
                    {"exp_name": "o2", "mjd_obs": 55000.3, "nchips": 1,
                     "uri": "http://evil.example:8/o2/index.txt"}]
            self._send(http.format_exposure_listing(rows).encode())
        elif self.path == "/o1/index.txt":
            chips = [("XY00", "o1.XY00.fits", f"{base}/o1/o1.XY00.fits", len(self.body)),
                     ("XY01", "../../../evil.fits", f"{base}/o1/evil.fits", len(self.body)),
                     ("XY02", "/tmp/abs.fits", f"{base}/o1/abs.fits", len(self.body)),
                     ("XY03", "o1.XY03.fits", "http://evil.example/o1.XY03.fits", len(self.body)),
                     ("XY04", "o1.XY04.fits", f"{base}/o1/o1.XY04.fits", 100),  # oversize body
                     ("../X", "o1.XY05.fits", f"{base}/o1/o1.XY05.fits", len(self.body)),
                     ("XY00", "o1.XY00.fits", f"{base}/o1/o1.XY00.fits", len(self.body))]  # twice
            self._send(http.format_chip_listing(
                [{"chip": c, "file": f, "uri": u, "bytes": n, "md5": good_md5}
                 for c, f, u, n in chips]).encode())
        elif self.path.endswith(".fits"):
            self._send(self.body)
        else:
            self._send(b"no\n", 404)


def test_hostile_listing_refused(tmp_path):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    camp = tmp_path / "campaign"
    absolute_before = Path("/tmp/abs.fits").exists()
    try:
        stage = SummitcopyStage(url)
        ctx = make_context(root=camp, recipe=load_recipe(), world=None,
                           ledger_path=camp / "ledger.h5", stage="summitcopy")
        with Ledger.create(camp / "ledger.h5") as led:
            assert stage.define(led, ctx) == 7
            poll = stage.last_poll
            assert poll.new == 1 and poll.refused == 5 and len(poll.errors) == 2
            assert any("../../etc" in e for e in poll.errors)
            assert any("evil.example" in e for e in poll.errors)
            fault = led.column("summitImfile", "fault")
            msgs = led.message_text(led.column("summitImfile", "message"))
            assert list(fault) == [0, 5, 5, 5, 0, 5, 5]
            assert "path separator" in msgs[1] and "path separator" in msgs[2]
            assert "evil.example" in msgs[3] and "listed twice" in msgs[6]
            units = stage.units(led, ctx)
            assert [u.info["chip"] for u in units] == ["XY00", "XY04"]
            outcome = stage.process(units[0], ctx)
            assert outcome.summary["mb_s"] > 0
            with pytest.raises(http.OversizeBody) as info:
                stage.process(units[1], ctx)
            assert info.value.fault == Fault.DATA
    finally:
        srv.shutdown()
        srv.server_close()
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.fits"))
    assert written == ["campaign/raw/o1/o1.XY00.fits"]
    assert Path("/tmp/abs.fits").exists() == absolute_before


def test_retry_cap_and_retry_rereads_the_listing(campaign):
    store, camp, files = campaign
    exp = NIGHT[0][0]
    bad = FaultSpec(bad_md5_rate=1.0, attempts=1, match=f"/{exp}/*XY10.fits")
    ctx = make_context(root=camp, recipe=load_recipe(), world=None,
                       ledger_path=camp / "ledger.h5", stage="summitcopy")
    with start_datastore(store, faults=bad) as ds, Ledger.open(camp / "ledger.h5", "a") as led:
        stage = SummitcopyStage(ds.url)
        assert stage.define(led, ctx) == 12
        (unit,) = [u for u in stage.units(led, ctx) if u.name == f"{exp}.XY10"]
        assert not unit.info["attempted"]
        with pytest.raises(http.ChecksumMismatch):
            stage.process(unit, ctx)
        led.transition("summitImfile", unit.row, State.RUN, rank=0)   # as the coordinator does
        led.transition("summitImfile", unit.row, State.DONE, fault=Fault.DATA, message="md5")
        assert unit.row not in [u.row for u in stage.units(led, ctx)]  # default: no retry
        auto = SummitcopyStage(ds.url, retry_cap=2)
        (retry,) = [u for u in auto.units(led, ctx) if u.row == unit.row]
        assert retry.info["attempted"]
        out = auto.process(retry, ctx)  # re-reads the corrected listing, then downloads
        truth = md5(files[exp]["XY10"])
        assert out.summary["md5"] == truth and retry.info["md5"] != truth
        assert md5(camp / "raw" / exp / files[exp]["XY10"].name) == truth


def test_accept_keeps_exposures_outside_the_campaign_out(campaign):
    store, camp, _ = campaign
    ctx = make_context(root=camp, recipe=load_recipe(), world=None,
                       ledger_path=camp / "ledger.h5", stage="summitcopy")
    seen = []

    def accept(*, ra, dec, filter, mjd):
        seen.append((ra, dec, filter, mjd))
        return filter == "r"

    with start_datastore(store) as ds, Ledger.open(camp / "ledger.h5", "a") as led:
        stage = SummitcopyStage(ds.url, accept=accept)
        assert stage.define(led, ctx) == 8
        assert stage.last_poll.skipped == 1 and stage.last_poll.new == 2
        assert sorted(e.decode() for e in led.column("summitExp", "exp_name")) == \
            [NIGHT[0][0], NIGHT[1][0]]
    assert (150.25, 2.5, "i", NIGHT[2][1]) in seen


def test_unreachable_datastore_raises_a_system_fault(tmp_path):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    ctx = make_context(root=tmp_path, recipe=load_recipe(), world=None,
                       ledger_path=tmp_path / "ledger.h5", stage="summitcopy")
    stage = SummitcopyStage(f"http://127.0.0.1:{port}", timeout_s=2)
    with Ledger.create(tmp_path / "ledger.h5") as led:
        with pytest.raises(http.ConnectionFailed) as info:
            stage.define(led, ctx)
        assert info.value.fault == Fault.SYSTEM and stage.last_poll is None
        assert led.nrows("summitExp") == 0


def test_bad_options_named():
    with pytest.raises(ValueError, match="datastore URL"):
        SummitcopyStage("ftp://x")
    with pytest.raises(ValueError, match="retry_cap"):
        SummitcopyStage("http://127.0.0.1:1", retry_cap=-1)
