"""Wall time of the demo campaign with 1, 2 and 4 ranks, sequential and overlapping stages.

`ps1mpi bench campaign [--preset demo] [--ranks 1,2,4] [--overlap-ranks 2,4] [--workdir DIR]
[--keep] [--no-warmup]`

Simulates the survey once (`ps1mpi sim`, the seed `ps1mpi campaign --demo` uses), then for
each rank count runs `mpiexec -n N python -m ps1mpi campaign --demo RUN --no-report` on a
fresh copy of the simulated data and times the whole command (wall clock, including the
start-up of Python and MPI and the local datastore). Each run's summary.json gives the time
per stage and where the ranks' time went: computing in units, blocked in collectives (wait),
waiting for the coordinator (idle), summed over ranks. With ``--overlap-ranks`` the campaign
is also run with ``--overlap`` on those rank counts, and its products are compared with the
sequential run's (FITS data, not headers).

Each run's products (~3.5 GB for the demo) are deleted once measured (``--keep`` keeps
them), and a run is stopped if the disk falls below ``--min-free-gb`` free: the machine's disk
is shared.

A warm-up campaign on the ``tiny`` preset runs first (unless ``--no-warmup``): it fills the
numba caches, so that no run pays for compiling the kernels.

JSON keys: wall_s_1, wall_s_2, wall_s_4 (s), efficiency_2 = wall_s_1 / (2 wall_s_2),
efficiency_4 = wall_s_1 / (4 wall_s_4), wall_s_2_overlap, wall_s_4_overlap,
efficiency_N_cpu = cpu_critical_s_1 / (N cpu_critical_s_N) where cpu_critical_s is the sum
over stages of the busiest rank's CPU seconds (overlap: the busiest rank's total): the
efficiency the job would have on dedicated cores, which a shared machine cannot time (an
upper bound: it ignores waits), efficiency_N_dedicated from dedicated_wall_s (each stage's
wall less its ranks' mean run-queue time: the time other jobs held the cores; a lower
bound), runqueue_fraction_N,
compute_fraction_N / wait_fraction_N / idle_fraction_N / other_fraction_N (of N x the
campaign's in-job wall time; disjoint),
stage_s_N (per-stage wall seconds), cpu_s_N (user + system CPU seconds of all ranks),
products_identical (overlap vs sequential), load_avg (1-minute load average before each run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from ..infra.products import data_digests
from .common import emit

REPO = Path(__file__).resolve().parents[2]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ps1mpi bench campaign", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", help="simulated survey preset (default demo)")
    p.add_argument("--ranks", default="1,2,4", help="rank counts, sequential mode")
    p.add_argument("--overlap-ranks", default="2,4",
                   help="rank counts also run with --overlap ('' for none)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a "
                   "temporary directory, removed unless --keep)")
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch directory and every run's products (a demo run "
                   "writes ~3.5 GB; by default each is deleted once measured)")
    p.add_argument("--min-free-gb", type=float, default=8.0,
                   help="stop a run when the scratch disk has less free space (GB)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up campaign")
    p.add_argument("--groups", choices=("adaptive", "recipe"), default="adaptive",
                   help="group policy of the campaigns (ps1mpi campaign --groups)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per run")
    return p.parse_args(argv)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    return env


def _cpu_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def simulate(out: Path, *, preset: str, nranks: int = 2, extra: Sequence[str] = (),
             timeout: float = 3600.0) -> float:
    """Simulate the campaign's survey into ``out`` (the seed of ``campaign --demo``); seconds.
    ``extra`` are more options of ``ps1mpi sim`` (e.g. ``--camera gpc1``)."""
    from ..cli.campaign import DEMO_SEED

    t0 = time.time()
    cmd = ["mpiexec", "-n", str(nranks), sys.executable, "-m", "ps1mpi", "sim", "--out",
           str(out), "--preset", preset, "--seed", str(DEMO_SEED), "--quiet"] + list(extra)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    return time.time() - t0


def free_gb(path: Path) -> float:
    """Free space (GB) of the file system holding ``path``."""
    return shutil.disk_usage(path).free / 1e9


def run_command(cmd: list[str], *, log: Path, watch: Path, min_free_gb: float = 8.0,
                timeout: float = 3600.0) -> tuple[int, str]:
    """Run ``cmd`` (its own process group), output to ``log``; stop it (SIGTERM, then
    SIGKILL) if the disk holding ``watch`` falls below ``min_free_gb`` GB free or after
    ``timeout`` s: other jobs share the disk.

    Returns
    -------
    (int, str)
        Exit code and the reason it was stopped ('' if it ended by itself).
    """
    import signal

    reason = ""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        t0 = time.time()
        while proc.poll() is None:
            time.sleep(1.0)
            if free_gb(watch) < min_free_gb:
                reason = (f"stopped: less than {min_free_gb:.0f} GB free on the disk of "
                          f"{watch}")
            elif time.time() - t0 > timeout:
                reason = f"stopped: still running after {timeout:.0f} s"
            if reason:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    return proc.returncode, reason


def run_campaign(demo: Path, sim: Path, *, nranks: int, preset: str, overlap: bool = False,
                 extra: Sequence[str] = (), link: bool = False, fresh: bool = True,
                 min_free_gb: float = 8.0, timeout: float = 3600.0) -> dict:
    """Copy ``sim`` into ``demo/sim`` (or link it: ``link``), run the campaign there.

    ``extra`` are more options of ``ps1mpi campaign`` (e.g. ``--until warp``); ``fresh``
    False continues the campaign already in ``demo``. The run is stopped if the disk falls
    below ``min_free_gb`` GB free.

    Returns
    -------
    dict
        ``wall_s`` (the command, s), ``cpu_s`` (CPU seconds of all its processes),
        ``load_avg`` (before the run) and the run's ``summary`` (summary.json).

    Raises
    ------
    RuntimeError
        If the campaign exits non-zero or is stopped (the end of its output is in the
        message).
    """
    if fresh:
        if demo.exists():
            shutil.rmtree(demo)
        demo.mkdir(parents=True)
        if link:
            (demo / "sim").symlink_to(sim.resolve(), target_is_directory=True)
        else:
            shutil.copytree(sim, demo / "sim")
    cmd = ["mpiexec", "-n", str(nranks), sys.executable, "-m", "ps1mpi", "campaign", "--demo",
           str(demo), "--preset", preset, "--no-report"] + (["--overlap"] if overlap else [])
    cmd += list(extra)
    load = os.getloadavg()[0]
    cpu0 = _cpu_children()
    t0 = time.time()
    log = demo / f"campaign-{time.strftime('%H%M%S')}.log"
    code, reason = run_command(cmd, log=log, watch=demo, min_free_gb=min_free_gb,
                               timeout=timeout)
    wall = time.time() - t0
    cpu = _cpu_children() - cpu0
    if code != 0 or reason:
        raise RuntimeError(f"{' '.join(cmd)} exited {code} {reason}:\n"
                           f"{log.read_text()[-3000:]}")
    summary = json.loads((demo / "summary.json").read_text())
    return {"wall_s": wall, "cpu_s": cpu, "load_avg": load, "summary": summary}


def _line(label: str, run: dict) -> str:
    s = run["summary"]
    stages = "  ".join(f"{k} {v['wall_s']:.1f}" for k, v in s["timings"].items())
    return (f"{label:<14} {run['wall_s']:8.1f} s (in job {s['wall_s']:.1f} s, CPU "
            f"{run['cpu_s']:.0f} s, load {run['load_avg']:.1f})  compute "
            f"{100 * s['compute_fraction']:.0f}%  wait {100 * s['wait_fraction']:.0f}%  idle "
            f"{100 * s['idle_fraction']:.0f}%  other {100 * s['other_fraction']:.0f}%  "
            f"run queue {100 * s['runqueue_fraction']:.0f}% (dedicated ~"
            f"{s['dedicated_wall_s']:.0f} s)\n"
            f"{'':<14} stages (s): {stages}")


def run(argv: list[str]) -> dict:
    args = parse(argv)
    ranks = [int(r) for r in args.ranks.split(",") if r]
    overlap_ranks = [int(r) for r in args.overlap_ranks.split(",") if r]
    if not ranks or min(ranks + overlap_ranks or [1]) < 1:
        raise SystemExit("ps1mpi bench campaign: --ranks must list positive rank counts")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ps1mpi-bench-campaign-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"campaign benchmark: preset {args.preset}, {os.cpu_count()} cores, scratch {work}",
          flush=True)
    print("note: the machine may be shared with other jobs; the load average before each run "
          "is printed with it", flush=True)
    result: dict = {"preset": args.preset, "cores": os.cpu_count(), "groups": args.groups}
    try:
        if not args.no_warmup:
            t0 = time.time()
            simulate(work / "warmup-sim", preset="tiny", timeout=args.timeout)
            run_campaign(work / "warmup", work / "warmup-sim", nranks=1, preset="tiny",
                         min_free_gb=args.min_free_gb, timeout=args.timeout)
            if not args.keep:
                shutil.rmtree(work / "warmup", ignore_errors=True)
            print(f"warm-up (tiny preset, 1 rank): {time.time() - t0:.1f} s", flush=True)
        sim = work / "sim"
        if not (sim / "survey.fits").exists():
            print(f"simulated the survey in {simulate(sim, preset=args.preset):.1f} s",
                  flush=True)
        runs: dict[str, dict] = {}
        digests: dict[str, dict[str, str]] = {}
        compare = {f"{n}" for n in overlap_ranks[:1] if n in ranks}
        compare |= {f"{n}_overlap" for n in overlap_ranks} if compare else set()
        plan = [(str(n), n, False) for n in ranks] + [(f"{n}_overlap", n, True)
                                                       for n in overlap_ranks]
        for key, n, overlap in plan:
            demo = work / f"run{key}"
            runs[key] = run_campaign(demo, sim, nranks=n, preset=args.preset, overlap=overlap,
                                     extra=["--groups", args.groups],
                                     min_free_gb=args.min_free_gb, timeout=args.timeout)
            print(_line(f"{n} {'overlap' if overlap else 'rank(s)'}", runs[key]), flush=True)
            if key in compare:
                digests[key] = data_digests(demo)
            if not args.keep:
                shutil.rmtree(demo, ignore_errors=True)
        for key, r in runs.items():
            s = r["summary"]
            result[f"wall_s_{key}"] = round(r["wall_s"], 2)
            result[f"job_wall_s_{key}"] = s["wall_s"]
            result[f"cpu_s_{key}"] = round(r["cpu_s"], 1)
            result[f"cpu_critical_s_{key}"] = s["cpu_critical_s"]
            result[f"dedicated_wall_s_{key}"] = s["dedicated_wall_s"]
            result[f"runqueue_fraction_{key}"] = s["runqueue_fraction"]
            result[f"load_avg_{key}"] = round(r["load_avg"], 2)
            for frac in ("compute_fraction", "wait_fraction", "idle_fraction",
                         "other_fraction"):
                result[f"{frac}_{key}"] = s[frac]
            result[f"stage_s_{key}"] = {k: v["wall_s"] for k, v in s["timings"].items()}
            result[f"stage_compute_s_{key}"] = {k: v["compute_s"]
                                                for k, v in s["timings"].items()}
            result[f"stage_wait_s_{key}"] = {k: v["wait_s"] for k, v in s["timings"].items()}
        if "1" in runs:
            for n in (2, 4):
                for suffix in ("", "_overlap"):
                    if f"{n}{suffix}" in runs:
                        eff = runs["1"]["wall_s"] / (n * runs[f"{n}{suffix}"]["wall_s"])
                        result[f"efficiency_{n}{suffix}"] = round(eff, 4)
                        one, many = runs["1"]["summary"], runs[f"{n}{suffix}"]["summary"]
                        if many["cpu_critical_s"] > 0:
                            result[f"efficiency_{n}{suffix}_cpu"] = round(
                                one["cpu_critical_s"] / (n * many["cpu_critical_s"]), 4)
                        if many["dedicated_wall_s"] > 0:
                            result[f"efficiency_{n}{suffix}_dedicated"] = round(
                                one["dedicated_wall_s"] / (n * many["dedicated_wall_s"]), 4)
        if len(digests) > 1:
            ref = digests[str(overlap_ranks[0])]
            same = all(d == ref for d in digests.values())
            result["products_identical"] = bool(same)
            result["n_products"] = len(ref)
            print(f"overlap products identical to sequential ({len(ref)} files, "
                  f"{', '.join(sorted(digests))}): {same}", flush=True)
        if "efficiency_2" in result:
            print(f"parallel efficiency at 2 ranks: {100 * result['efficiency_2']:.1f}% from "
                  f"wall times (goal >= 90%); "
                  f"{100 * result.get('efficiency_2_dedicated', float('nan')):.1f}% from the "
                  "wall times less the ranks' run-queue waits; "
                  f"{100 * result.get('efficiency_2_cpu', float('nan')):.1f}% from the busiest "
                  "rank's CPU per stage", flush=True)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return emit(result)
