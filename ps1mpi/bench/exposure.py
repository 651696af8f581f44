"""Core-minutes to take one full-size GPC1 exposure (60 chips, 1.4 Gpix) from raw to warps.

`ps1mpi bench exposure [--ranks 2] [--workdir DIR] [--keep-inputs] [--tessellation RINGS.V3]
[--overlap] [--min-free-gb 8]`

Simulates the ``single`` preset with the GPC1 camera once (one r exposure: 60 raw chips of
64 cells, 2.9 GB, and the detrend masters of every chip, 17 GB; `ps1mpi sim --preset single
--camera gpc1`, one to two hours on two shared cores; reused when ``--workdir`` already holds
it), then runs the campaign on it, `mpiexec -n N ps1mpi campaign --demo RUN --preset single`,
with the real RINGS.V3 tessellation, in two steps:

1. ``--until camera``: download from the local datastore (summitcopy), registration, the
   chip stage on the 60 chips, the camera stage;
2. ``--until warp``: the same command again (the ledger says only the warps are left), onto
   every skycell the exposure touches (~75 skycells of 6274 x 6258 pixels, ~25 GB).

Between the steps the inputs nothing downstream reads (the masters, the datastore's and the
campaign's raw chips: ~23 GB) are deleted unless ``--keep-inputs``, so that the run never
holds more than ~35 GB of the shared disk; a step is stopped if the disk falls below
``--min-free-gb`` free. A deleted simulation is made again by the next run.

Core-minutes, summed over both steps: ``core_minutes`` = ranks x wall time of the commands
(what a batch system charges; inflated when other jobs share the cores), ``cpu_minutes`` =
user + system CPU time of all ranks, ``busy_minutes`` = time the ranks spent inside work
units, ``dedicated_minutes`` = ranks x the in-job wall time less the ranks' run-queue waits
(the estimate for cores of one's own). Goal (issue 8): <= 10 core-minutes. The simulation's
time is reported apart (``sim_s``).

JSON keys: core_minutes, cpu_minutes, busy_minutes, dedicated_minutes, wall_s, ranks,
stage_s (per-stage wall), stage_busy_s (per-stage seconds in units, summed over ranks),
stage_cpu_s, chips, raw_gb, warps, sim_s, load_avg, faults, science.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from .campaign import free_gb, run_campaign, simulate
from .common import emit

PRESET = "single"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ps1mpi bench exposure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="ranks of the campaign (default 2)")
    p.add_argument("--sim-ranks", type=int, default=2, help="ranks of the simulation")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch directory; a simulation already in WORKDIR/sim is reused")
    p.add_argument("--keep", action="store_true", help="keep a temporary scratch directory")
    p.add_argument("--keep-inputs", action="store_true",
                   help="keep the masters and raw chips between the steps (~23 GB more)")
    p.add_argument("--tessellation", default="RINGS.V3", help="warp tessellation")
    p.add_argument("--overlap", action="store_true", help="overlap the stages of each step")
    p.add_argument("--min-free-gb", type=float, default=8.0,
                   help="stop a step when the disk has less free space (GB)")
    p.add_argument("--timeout", type=float, default=6 * 3600.0, help="seconds allowed per step")
    return p.parse_args(argv)


def _discard_inputs(sim: Path, run: Path) -> float:
    """Delete what the warp stage does not read (the masters with their index, so that the
    next run simulates again; the datastore is left empty, so that the second step finds no
    new exposure); GB freed."""
    freed = 0.0
    for d in (sim / "detrend", sim / "datastore", run / "raw"):
        if d.is_dir():
            freed += sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) / 1e9
            shutil.rmtree(d, ignore_errors=True)
    (sim / "datastore").mkdir(exist_ok=True)
    return freed


def run(argv: list[str]) -> dict:
    args = parse(argv)
    if args.ranks < 1 or args.sim_ranks < 1:
        raise SystemExit("ps1mpi bench exposure: --ranks and --sim-ranks must be positive")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ps1mpi-bench-exposure-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"exposure benchmark: GPC1, preset {PRESET}, {args.ranks} ranks, scratch {work} "
          f"({free_gb(work):.0f} GB free; up to ~35 GB used)", flush=True)
    result: dict = {"ranks": args.ranks, "cores": os.cpu_count()}
    try:
        sim = work / "sim"
        if (sim / "survey.fits").exists() and (sim / "detrend" / "index.json").exists():
            result["sim_s"] = None
            print(f"reusing the simulation in {sim}", flush=True)
        else:
            shutil.rmtree(sim, ignore_errors=True)
            result["sim_s"] = round(simulate(sim, preset=PRESET, nranks=args.sim_ranks,
                                             extra=["--camera", "gpc1"],
                                             timeout=args.timeout), 1)
            print(f"simulated the exposure and its masters in {result['sim_s']:.0f} s",
                  flush=True)
        raw = sorted((sim / "datastore").rglob("*.fits"))
        result["chips"] = len(raw)
        result["raw_gb"] = round(sum(p.stat().st_size for p in raw) / 1e9, 2)
        common = ["--set", f"warp.tessellation={args.tessellation}"]
        steps = []
        for k, until in enumerate(("camera", "warp")):
            steps.append(run_campaign(work / "run", sim, nranks=args.ranks, preset=PRESET,
                                      overlap=args.overlap, link=True, fresh=k == 0,
                                      extra=["--until", until] + common,
                                      min_free_gb=args.min_free_gb, timeout=args.timeout))
            print(f"step {k + 1} (--until {until}): {steps[-1]['wall_s']:.0f} s wall, load "
                  f"{steps[-1]['load_avg']:.1f} before, {free_gb(work):.0f} GB free after",
                  flush=True)
            if k == 0 and not args.keep_inputs:
                print(f"deleted the masters and raw chips: {_discard_inputs(sim, work / 'run'):.1f}"
                      " GB", flush=True)
        timings: dict[str, dict] = {}
        for step in steps:
            for name, t in step["summary"]["timings"].items():
                if t["units"]:
                    timings[name] = t
        last = steps[-1]["summary"]
        wall = sum(s["wall_s"] for s in steps)
        busy = sum(t["busy_s"] for t in timings.values())
        dedicated = sum(s["summary"]["dedicated_wall_s"] for s in steps)
        result.update({
            "wall_s": round(wall, 1),
            "core_minutes": round(args.ranks * wall / 60.0, 2),
            "cpu_minutes": round(sum(s["cpu_s"] for s in steps) / 60.0, 2),
            "busy_minutes": round(busy / 60.0, 2),
            "dedicated_minutes": round(args.ranks * dedicated / 60.0, 2),
            "load_avg": [round(s["load_avg"], 2) for s in steps],
            "runqueue_fraction": [s["summary"]["runqueue_fraction"] for s in steps],
            "stage_s": {k: v["wall_s"] for k, v in timings.items()},
            "stage_busy_s": {k: v["busy_s"] for k, v in timings.items()},
            "stage_cpu_s": {k: v["cpu_s"] for k, v in timings.items()},
            "faults": last["faults"],
            "gpix": round(len(raw) * 4846 * 4868 / 1e9, 3),
            "warps": last["stages"].get("warpSkyfile", {}).get("done", 0),
            "science": last["science"],
        })
        for k, v in timings.items():
            print(f"  {k:<12} {v['wall_s']:8.1f} s wall  {v['busy_s']:8.1f} s in units  "
                  f"{v['cpu_s']:8.1f} s CPU ({v['done']} done, {v['faulted']} faulted)",
                  flush=True)
        print(f"core-minutes: {result['core_minutes']:.1f} (ranks x wall), "
              f"{result['cpu_minutes']:.1f} (CPU), {result['busy_minutes']:.1f} (in units), "
              f"{result['dedicated_minutes']:.1f} (ranks x wall less run-queue waits); "
              "goal <= 10", flush=True)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return emit(result)
