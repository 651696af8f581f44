"""Detrend every registered chip, stitch its cells, find and measure its sources (ppImage+psphot).

  mpiexec -n N ps1mpi chip --ledger LEDGER [--root DIR] [--set chip.detrend_dir=/path/detrend]

Reads:  ledger rawExp/rawImfile (exposures registered with quality 0, their good chips), the
        raw chips ROOT/<path in rawImfile>, the detrend masters listed in
        <chip.detrend_dir>/index.json (bias, dark, nonlinearity, flat, static mask, fringe for
        z and y), chosen per chip, filter and date.
Writes: ROOT/chip/<EXP>/<EXP>.<CHIP>.ch.fits (background-subtracted image, e-, RICE),
        .wt.fits (variance, e-^2, RICE), .mk.fits (mask bits), .cmf (source catalog, CMF-style
        columns with units), .psf.fits (PS1_V1 PSF model), .bg.fits (background model),
        .b16.fits / .b256.fits (binned images), .log (what was done); ledger chipRun (one per
        exposure) and chipProcessedImfile (one per chip: background, FWHM, sources, PSF stars,
        masked and saturated fractions, cosmic rays, fringe amplitude, masters used, seconds
        per step).

Chips are processed in parallel, ordered by sky region. Bad data is quality, not a fault
(docs/chip-stage.md): 1 raw chip unreadable, 2 saturated, 3 too masked, 4 no background,
5 no sources, 6 PSF model failed; such chips are skipped by the camera stage. A missing
master is a configuration fault (3). Recipe section [chip] (chip.toml).

Exit codes (the same on every rank): 0 all done, 1 some chips faulted, 2 the job could not
start.
"""

from __future__ import annotations

import argparse

from ..stages.chip import ChipStage
from .common import run_stage_command, stage_parser

DESCRIPTION = __doc__


def parse(argv: list[str]) -> argparse.Namespace:
    return stage_parser(ChipStage, DESCRIPTION).parse_args(argv)


def main(args: argparse.Namespace) -> int:
    return run_stage_command(ChipStage(), args)
