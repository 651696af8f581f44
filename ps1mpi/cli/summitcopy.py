"""Download new exposures from the datastore into the raw data tree, verified (summitcopy).

  mpiexec -n N ps1mpi summitcopy --datastore URL --ledger LEDGER [--root DIR] [--since T]
                                 [--watch [--interval S]] [--allow-host HOST ...]

Reads:  the datastore's exposure listing (only exposures since the latest one already known,
        minus --overlap days, unless --since or --all), each new exposure's chip listing,
        and the chip files.
Writes: ROOT/raw/<EXPNAME>/<EXPNAME>.<CHIP>.fits (md5-verified, renamed into place when
        complete); ledger tables summitExp (one row per exposure) and summitImfile (one row
        per chip, with URL, size, md5, path, download rate).

A failed download (connection/HTTP error: fault 2, timeout: 6, truncated or oversize body,
checksum mismatch, refused listing content: 5) faults its chip with the reason and leaves no
file; the exposure waits. Retry with `ps1mpi ledger revert LEDGER --table summitImfile` and a
re-run (or --retry-cap N for automatic retries). --watch polls every --interval seconds, as
during a night, until SIGTERM/SIGINT, which stops it after the current pass with the ledger
consistent.

Exit codes (the same on every rank): 0 all done, 1 some chips faulted or the datastore could
not be read, 2 the job could not start.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import numpy as np

from ..infra.config import RecipeError, load_recipe
from ..infra.log import setup_logging
from ..infra.world import World
from ..stages.base import make_context, run_stage
from ..stages.summitcopy import SummitcopyStage
from .common import add_job_options, open_ledger_on_root

DESCRIPTION = __doc__


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ps1mpi summitcopy", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_options(p)
    p.add_argument("--datastore", required=True, help="datastore URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--since", default=None,
                   help="only exposures at or after this MJD or ISO 8601 time")
    p.add_argument("--all", action="store_true",
                   help="read the whole exposure listing at every poll")
    p.add_argument("--overlap", type=float, default=0.5, metavar="DAYS",
                   help="incremental polls ask for exposures since the latest known minus this")
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST[:PORT]",
                   help="another host chip URLs may point to (repeatable)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds allowed to connect and for each network wait (default: recipe "
                        "summitcopy.timeout_s, else 30)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds allowed for one whole chip download (default: recipe "
                        "summitcopy.deadline_s, else 600)")
    p.add_argument("--retry-cap", type=int, default=None,
                   help="retry faulted downloads automatically up to N times (default: recipe "
                        "summitcopy.retry_cap, else 0: wait for `ps1mpi ledger revert`)")
    p.add_argument("--no-fsync", action="store_true",
                   help="do not flush files to stable storage before renaming them into place")
    p.add_argument("--watch", action="store_true", help="keep polling until SIGTERM/SIGINT")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between polls (--watch)")
    p.add_argument("--max-polls", type=int, default=0,
                   help="with --watch: stop after this many polls (0: no limit)")
    return p.parse_args(argv)


def _option(value, recipe, key: str, default):
    """The command-line value, else the recipe's (when the recipe has the key), else default."""
    if value is not None:
        return value
    try:
        return recipe.get(key)
    except RecipeError:
        return default


class _StopFlag:
    """Set by SIGTERM/SIGINT; the ranks agree on it between polls."""

    def __init__(self) -> None:
        self.set = False

    def __call__(self, signum, frame) -> None:
        self.set = True


def main(args: argparse.Namespace) -> int:
    world = World.from_mpi()
    try:
        recipe = load_recipe(args.recipe, args.set)
        stage = SummitcopyStage(
            args.datastore, since=args.since, full_listing=args.all, overlap_days=args.overlap,
            allowed_hosts=args.allow_host, fsync=not args.no_fsync,
            timeout_s=_option(args.timeout, recipe, "summitcopy.timeout_s", 30.0),
            deadline_s=_option(args.deadline, recipe, "summitcopy.deadline_s", 600.0),
            retry_cap=int(_option(args.retry_cap, recipe, "summitcopy.retry_cap", 0)))
    except (RecipeError, ValueError) as err:
        if world.rank == 0:
            print(f"ps1mpi summitcopy: {err}", file=sys.stderr)
        return 2
    setup_logging(world.rank, level=recipe.get("runtime.log_level"), logdir=args.logdir,
                  stage=stage.name)
    ok, ledger = open_ledger_on_root(world, args.ledger, prog="ps1mpi summitcopy")
    if not ok:
        return 2
    stop = _StopFlag()
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    root = args.root or Path(args.ledger).parent
    ctx = make_context(root=root, recipe=recipe, world=world, ledger_path=args.ledger,
                       stage=stage.name)
    code = 0
    polls = 0
    try:
        while True:
            polls += 1
            t0 = time.time()
            try:
                report = run_stage(stage, ctx, ledger)
                code = report.exit_code
                done, faulted, units = report.done, report.faulted, report.units
            except RuntimeError as err:  # the datastore could not be polled
                if world.rank == 0:
                    print(f"ps1mpi summitcopy: poll {polls}: {err}", file=sys.stderr)
                code, done, faulted, units = 1, 0, 0, 0
            poll = stage.last_poll if world.rank == 0 else None
            # listing errors, or -1 when the exposure listing itself could not be read
            errors = world.bcast_object((len(poll.errors) if poll else -1)
                                        if world.rank == 0 else None)
            if errors:
                code = max(code, 1)
            if world.rank == 0:
                new = f"{poll.listed} listed, {poll.new} new ({poll.chips} chips, " \
                      f"{poll.refused} refused), {len(poll.errors)} listing errors" if poll else \
                      "datastore not read"
                if poll and poll.skipped:
                    new += f", {poll.skipped} outside the campaign"
                print(f"summitcopy poll {polls}: {new}; {done} downloaded, {faulted} faulted of "
                      f"{units} chips in {time.time() - t0:.1f} s on {world.size} ranks", flush=True)
            if not args.watch or (args.max_polls and polls >= args.max_polls):
                break
            if _wait(world, stop, args.interval):
                if world.rank == 0:
                    print("summitcopy: stop requested; ledger closed cleanly", flush=True)
                break
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if ledger is not None:
            ledger.close()
    return code


def _wait(world: World, stop: _StopFlag, interval: float) -> bool:
    """Sleep ``interval`` seconds between polls; True when any rank was asked to stop."""
    deadline = time.monotonic() + interval
    while True:
        flag = world.allreduce(np.array([1 if stop.set else 0], np.int32), op="max")[0]
        if flag:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(0.25, left))
