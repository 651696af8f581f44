"""MB/s downloaded and registered for one full GPC1 exposure (60 chips) with 1, 2 and 4 ranks.

`ps1mpi bench summitcopy [--ranks 1,2,4] [--chips 60] [--workdir DIR] [--keep]`

Writes one raw exposure in the raw format (default: GPC1, 60 OTAs of 64 cells of 624x598
uint16 pixels, 47.8 MB per chip, 2.9 GB in all), serves it from a local datastore in this
process (checksums computed before timing), then for each rank count runs
`mpiexec -n N ps1mpi summitcopy` and `mpiexec -n N ps1mpi register` on a fresh campaign and
times them (wall clock, including the start-up of Python and MPI). The time split of the
downloads (network, md5, disk including fsync) is summed from the per-chip log lines.
JSON keys: mb_s_1, mb_s_2, mb_s_4 (download + register, MB = 1e6 bytes), download_mb_s_N,
register_mb_s_N, frac_network, frac_md5, frac_disk (over all downloads of all runs),
exposure_mb.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..geometry.camera import load_camera
from ..infra.ledger import Ledger
from ..infra.rawfile import write_raw_chip
from ..sim.datastore import start_datastore
from .common import emit

_TIMING = re.compile(r"summitcopy: \S+: ([\d.]+) MB in ([\d.]+) s \([\d.]+ MB/s; network ([\d.]+) s, "
                     r"md5 ([\d.]+) s, disk ([\d.]+) s\)")


def write_exposure(root: Path, *, camera: str = "gpc1", nchips: int | None = None,
                   exp: str = "o5500g0001o", seed: int = 1) -> int:
    """Write one raw exposure (sky level + noise in the data sections, bias in the overscan);
    returns the bytes written. Chips already present are kept."""
    cam = load_camera(camera)
    rng = np.random.default_rng(seed)
    total = 0
    y0, y1, x0, x1 = cam.datasec
    for chip in cam.chip_names[:nchips]:
        path = root / exp / f"{exp}.{chip}.fits"
        if not path.exists():
            cells = {}
            for cell in cam.cell_names:
                raw = np.full(cam.raw_cell_shape, cam.bias_level, np.float32)
                raw[y0:y1, x0:x1] = rng.normal(cam.bias_level + 800.0, 30.0,
                                               (y1 - y0, x1 - x0)).astype(np.float32)
                cells[cell] = raw
            header = {"EXPNAME": exp, "TELESCOP": "PS1", "CAMERA": cam.name, "DETECTOR": chip,
                      "OBSTYPE": "OBJECT", "FILTERID": "r.00000", "FILTER": "r", "RA": 150.0,
                      "DEC": 2.0, "POSANGLE": 0.0, "MJD-OBS": 55500.3, "EXPTIME": 45.0,
                      "AIRMASS": 1.1}
            write_raw_chip(path, cells, header=header, datasec=cam.datasec, biassec=cam.biassec,
                           gain=cam.gain, read_noise=cam.read_noise, saturation=cam.saturation)
        total += path.stat().st_size
    return total


def _run(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return dt, proc


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="ps1mpi bench summitcopy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts")
    p.add_argument("--camera", default="gpc1", help="camera of the exposure (gpc1, testcam)")
    p.add_argument("--chips", type=int, default=None, help="only the first N chips")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the exposure here between runs (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the downloaded campaigns")
    args = p.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-summitcopy-"))
    store = work / "datastore"
    t0 = time.perf_counter()
    nbytes = write_exposure(store, camera=args.camera, nchips=args.chips)
    print(f"exposure: {nbytes / 1e6:.1f} MB in {args.camera} chips "
          f"(written/checked in {time.perf_counter() - t0:.1f} s)", flush=True)
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    result: dict = {"exposure_mb": round(nbytes / 1e6, 1), "camera": args.camera}
    split = np.zeros(4)  # seconds: total, network, md5, disk
    with start_datastore(store) as ds:
        for exp in ds.index.exposures():
            ds.index.chip_rows(exp.exp_name)  # md5 computed once, before timing
        for n in ranks:
            camp = work / f"campaign-{n}"
            shutil.rmtree(camp, ignore_errors=True)
            Ledger.create(camp / "ledger.h5").close()
            mpi = ["mpiexec", "-n", str(n), sys.executable, "-m", "ps1mpi"]
            t_dl, _ = _run(mpi + ["summitcopy", "--datastore", ds.url, "--ledger",
                                  str(camp / "ledger.h5"), "--logdir", str(camp / "logs")], env)
            t_reg, _ = _run(mpi + ["register", "--ledger", str(camp / "ledger.h5")], env)
            for log in (camp / "logs").glob("*.log"):
                for m in _TIMING.finditer(log.read_text()):
                    split += np.array([float(m.group(i)) for i in (2, 3, 4, 5)])
            with Ledger.open(camp / "ledger.h5") as led:
                done = led.counts("rawImfile")["done"]
            mb = nbytes / 1e6
            result[f"download_mb_s_{n}"] = round(mb / t_dl, 1)
            result[f"register_mb_s_{n}"] = round(mb / t_reg, 1)
            result[f"mb_s_{n}"] = round(mb / (t_dl + t_reg), 1)
            print(f"{n} ranks: summitcopy {t_dl:.1f} s ({mb / t_dl:.1f} MB/s), register "
                  f"{t_reg:.1f} s ({mb / t_reg:.1f} MB/s), {done} chips registered; together "
                  f"{mb / (t_dl + t_reg):.1f} MB/s", flush=True)
            if not args.keep:
                shutil.rmtree(camp, ignore_errors=True)
    if split[0] > 0:
        result.update(frac_network=round(split[1] / split[0], 3),
                      frac_md5=round(split[2] / split[0], 3),
                      frac_disk=round(split[3] / split[0], 3))
        print(f"download time split: network {split[1] / split[0]:.1%}, md5 {split[2] / split[0]:.1%}, "
              f"disk (write + fsync + rename) {split[3] / split[0]:.1%}", flush=True)
    if args.workdir is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return emit(result)
