"""Pieces shared by the command modules: common options and the stage-command driver."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..infra.config import RecipeError, load_recipe
from ..infra.ledger import Ledger, LedgerError
from ..infra.log import setup_logging
from ..infra.world import World
from ..stages.base import Stage, make_context, run_stage

__all__ = ["add_job_options", "open_ledger_on_root", "run_stage_command", "stage_parser"]


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """Options every ledger-driven command takes."""
    parser.add_argument("--ledger", required=True, type=Path,
                        help="the campaign's ledger (HDF5); products go beside it unless --root")
    parser.add_argument("--root", type=Path, default=None,
                        help="campaign directory for products (default: the ledger's directory)")
    parser.add_argument("--recipe", action="append", default=[], type=Path, metavar="FILE",
                        help="campaign recipe TOML overriding the packaged defaults (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one recipe value (repeatable)")
    parser.add_argument("--logdir", type=Path, default=None,
                        help="write one log file per rank here")


def stage_parser(stage: type[Stage], description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"ps1mpi {stage.name}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_options(parser)
    return parser


def open_ledger_on_root(world: World, path: Path, *, prog: str) -> tuple[bool, Ledger | None]:
    """Rank 0 opens the ledger for writing; every rank learns whether it worked (collective).

    Returns (ok, ledger): the ledger on rank 0, None elsewhere. On failure rank 0 prints the
    reason under ``prog``.
    """
    ledger = None
    error = None
    if world.rank == 0:
        try:
            ledger = Ledger.open(path, "a")
        except LedgerError as err:
            error = str(err)
    error = world.bcast_object(error)
    if error and world.rank == 0:
        print(f"{prog}: {error}", file=sys.stderr)
    return not error, ledger


def run_stage_command(stage: Stage, args: argparse.Namespace) -> int:
    """Run one stage as a job: validate the recipe, open the ledger on rank 0, run, report.

    Exit codes, the same on every rank: 0 all units done, 1 some units faulted,
    2 the job could not start (bad recipe, ledger missing or busy).
    """
    world = World.from_mpi()
    try:
        recipe = load_recipe(args.recipe, args.set)
    except RecipeError as err:
        if world.rank == 0:
            print(f"ps1mpi {stage.name}: {err}", file=sys.stderr)
        return 2
    setup_logging(world.rank, level=recipe.get("runtime.log_level"), logdir=args.logdir,
                  stage=stage.name)
    ok, ledger = open_ledger_on_root(world, args.ledger, prog=f"ps1mpi {stage.name}")
    if not ok:
        return 2
    root = args.root or Path(args.ledger).parent
    ctx = make_context(root=root, recipe=recipe, world=world, ledger_path=args.ledger,
                       stage=stage.name)
    try:
        report = run_stage(stage, ctx, ledger)
    finally:
        if ledger is not None:
            ledger.close()
    if world.rank == 0:
        print(f"{stage.name}: {report.done} done ({report.bad_quality} bad quality), "
              f"{report.faulted} faulted of {report.units} units in {report.wall_s:.1f} s "
              f"on {world.size} ranks")
    return report.exit_code
