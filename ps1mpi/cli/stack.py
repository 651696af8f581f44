"""Stack the warps of each skycell and filter: nightly, deep, best-seeing, out-of-season.

  mpiexec -n N ps1mpi stack --ledger LEDGER [--root DIR] [--set stack.group_size=G]

Reads:  ledger warpRun/warpSkyfile (a skycell and filter is stacked once every warp of it is
        finished; inputs are the warps with good quality and PSF FWHM <= stack.max_fwhm_pixels),
        the campaign definition (stack_kinds) and the warps ROOT/warp/<EXP>/<EXP>.<SKYCELL>.wrp*.fits.
Writes: ROOT/stack/<SKYCELL>/<SKYCELL>.<FILTER>.<KIND>.<LABEL>.stk.fits (flux at zero point 25),
        .stk.wt.fits (variance), .stk.mk.fits (mask), .stk.num.fits (inputs per pixel),
        .stk.exp.fits (exposure time per pixel, s), .inputs.fits (the inputs, their weights and
        rejected pixels), .png (preview); ledger stackRun / stackSumSkyfile (inputs used and
        dropped, 5-sigma depth, good fraction, timings).

Each stack is assembled by a group of stack.group_size ranks: every rank reads and combines a
band of rows of all inputs, the leader gathers the bands and writes. The result is the same
bit for bit for any group size. Labels: the night (MJD integer) for nightly stacks,
s<first night> for the season left out of an out-of-season stack, `all` otherwise.

Exit codes (the same on every rank): 0 all done, 1 some stacks faulted, 2 the job could not
start.
"""

from __future__ import annotations

import argparse
import sys

from mpi4py import MPI

from ..infra.config import RecipeError, load_recipe
from ..stages.stack import StackStage
from .common import run_stage_command, stage_parser

DESCRIPTION = __doc__


def parse(argv: list[str]) -> argparse.Namespace:
    return stage_parser(StackStage, DESCRIPTION).parse_args(argv)


def main(args: argparse.Namespace) -> int:
    try:
        recipe = load_recipe(args.recipe, args.set)
    except RecipeError:
        return run_stage_command(StackStage(), args)  # reports the recipe error, exits 2
    try:
        stage = StackStage.from_recipe(recipe)
    except RecipeError as err:
        if MPI.COMM_WORLD.Get_rank() == 0:
            print(f"ps1mpi stack: {err}", file=sys.stderr)
        return 2
    return run_stage_command(stage, args)
