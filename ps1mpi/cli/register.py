"""Register downloaded raw exposures: header and pixel metadata per chip, merged per exposure.

  mpiexec -n N ps1mpi register --ledger LEDGER [--root DIR]

Reads:  ledger summitExp/summitImfile (exposures whose chips were all downloaded without
        fault) and the raw chips ROOT/raw/<EXPNAME>/<EXPNAME>.<CHIP>.fits.
Writes: ledger rawImfile (one row per chip: filter, MJD-OBS, exposure time, airmass, cells,
        mean, standard deviation and saturated fraction of the pixels) and rawExp (one row per
        exposure: shared values checked across chips, mean of the chip values, chips with bad
        quality). No files.

Bad data is quality, not a fault: an unreadable or malformed chip (truncated FITS, missing
keywords, wrong cell count, all-NaN pixels, header disagreeing with the datastore) is
registered with a non-zero quality and its reason (codes in docs/datastore.md), and later
stages skip it. An exposure is registered once; a second version of it (another summitExp
row with the same name) is refused and reported as an error.

Exit codes (the same on every rank): 0 all done, 1 some chips faulted or a conflicting second
version was refused, 2 the job could not start.
"""

from __future__ import annotations

import argparse
import sys

from ..infra.world import World
from ..stages.register import RegisterStage
from .common import run_stage_command, stage_parser

DESCRIPTION = __doc__


def parse(argv: list[str]) -> argparse.Namespace:
    return stage_parser(RegisterStage, DESCRIPTION).parse_args(argv)


def main(args: argparse.Namespace) -> int:
    stage = RegisterStage()
    code = run_stage_command(stage, args)
    world = World.from_mpi()
    conflicts = world.bcast_object(stage.conflicts if world.rank == 0 else None)
    if conflicts and world.rank == 0:
        for msg in conflicts:
            print(f"ps1mpi register: {msg}", file=sys.stderr)
    world.free()
    return max(code, 1) if conflicts else code
