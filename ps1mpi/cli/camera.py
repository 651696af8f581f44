"""Calibrate exposures: one astrometric + photometric solution per exposure, dynamic masks, JPEG.

  mpiexec -n N ps1mpi camera --ledger LEDGER [--root DIR] [--recipe FILE] [--set camera.KEY=V]

Reads:  ledger chipRun/chipProcessedImfile/rawExp (exposures whose chips are all done without a
        fault; chips with bad quality are left out), the chip stage's products
        ROOT/chip/<EXP>/<EXP>.<CHIP>.{cmf,mk.fits,b16.fits}, and the reference catalog
        (recipe camera.refcat, relative to ROOT).
Writes: ROOT/camera/<EXP>/<EXP>.astrom.fits (the exposure's solution: zero point, focal-plane
        model, one TAN-SIP WCS per chip), <EXP>.<CHIP>.cmf (catalog + RA_PSF, DEC_PSF,
        CAL_PSF_MAG ...), <EXP>.<CHIP>.mk.fits (mask + dynamic bits), <EXP>.jpg; ledger camRun
        and camProcessedExp (matches, RMS, pointing offsets, zero point, timings).

Each exposure is calibrated by a group of camera.group_size ranks (default 2): the ranks read
a share of its chips, the leader fits, every rank writes its chips. Bad data (no pattern, too
few matches, residuals too large, too few photometric stars) completes with quality != 0 and
the exposure goes no further; see docs/camera-stage.md.

Exit codes (the same on every rank): 0 all done, 1 some exposures faulted, 2 the job could not
start.
"""

from __future__ import annotations

import argparse
import sys

from ..infra.config import RecipeError, load_recipe
from ..stages.camera import CameraStage
from .common import run_stage_command, stage_parser

DESCRIPTION = __doc__


def parse(argv: list[str]) -> argparse.Namespace:
    return stage_parser(CameraStage, DESCRIPTION).parse_args(argv)


def main(args: argparse.Namespace) -> int:
    try:
        group_size = int(load_recipe(args.recipe, args.set).get("camera.group_size"))
    except RecipeError:
        group_size = None   # run_stage_command reports the bad recipe and exits 2
    if group_size is not None and group_size < 1:
        print(f"ps1mpi camera: recipe camera.group_size must be >= 1, got {group_size}",
              file=sys.stderr)
        return 2
    return run_stage_command(CameraStage(group_size=group_size), args)
