"""Warp calibrated exposures onto the skycells of a sky tessellation (Lanczos-3, zero point 25).

  mpiexec -n N ps1mpi warp --ledger LEDGER [--root DIR] [--set warp.tessellation=TEST.V1]

Reads:  ledger camRun (exposures calibrated by the camera stage, DONE with quality 0), chipRun
        and rawExp (time, exposure time, camera); the camera solution
        ROOT/camera/<EXP>/<EXP>.astrom.fits (ZPT_OBS, one TAN-SIP WCS per good chip), the chips
        ROOT/chip/<EXP>/<EXP>.<CHIP>.ch.fits (e-), .wt.fits (e-^2), .psf.fits (PSF model) and
        the masks ROOT/camera/<EXP>/<EXP>.<CHIP>.mk.fits.
Writes: ROOT/warp/<EXP>/<EXP>.<SKYCELL>.wrp.fits (flux at zero point 25), .wrp.wt.fits
        (variance), .wrp.mk.fits (mask), .wrp.psf.fits (PSF model in skycell pixels); ledger
        warpRun (one per exposure) and warpSkyfile (one per exposure x skycell: good-pixel
        fraction, FWHM, zero point, covariance factor, map error, chips read).

Work is ordered by exposure (exposures in sky order, skycells in region order within one);
each rank keeps the chips it has read (recipe warp.chip_cache_mb) so a chip feeding several
skycells is read once. A warp with fewer good pixels than warp.min_good_frac (10%) gets
quality 1 and is not written.
Recipe section [warp]: tessellation, kernel, grid_step, zero_point, min_good_frac, ...

Exit codes (the same on every rank): 0 all done, 1 some warps faulted or some calibrated
exposures could not be defined (missing or unreadable camera solution), 2 the job could not
start.
"""

from __future__ import annotations

import argparse
import sys

from ..infra.world import World
from ..stages.warp import WarpStage
from .common import run_stage_command, stage_parser

DESCRIPTION = __doc__


def parse(argv: list[str]) -> argparse.Namespace:
    return stage_parser(WarpStage, DESCRIPTION).parse_args(argv)


def main(args: argparse.Namespace) -> int:
    stage = WarpStage()
    code = run_stage_command(stage, args)
    world = World.from_mpi()
    problems = world.bcast_object(stage.problems if world.rank == 0 else None)
    if problems and world.rank == 0:
        for msg in problems:
            print(f"ps1mpi warp: not defined: {msg}", file=sys.stderr)
    world.free()
    return max(code, 1) if problems and code != 2 else code
