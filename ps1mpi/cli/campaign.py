"""Run a campaign: a region of sky through every stage, in order, through one ledger.

  mpiexec -n 4 ps1mpi campaign --ledger RUN/ledger.h5 --campaign campaign.toml [--until STAGE]
  mpiexec -n 2 ps1mpi campaign --demo DIR [--until STAGE] [--overlap]

Reads: the datastore named in the campaign definition (or, with --demo, a simulated survey
made in DIR/sim and served on loopback by rank 0), the recipes. Writes: products under the
campaign directory (the ledger's), the ledger, a summary on stdout and summary.json, and a
static HTML report (DIR/report/index.html). Run the same command again after a crash: it does
only what is missing.

By default each stage runs to completion before the next starts; --overlap runs all stages in
one distribution, later stages taking up exposures as soon as the ledger says they are ready
(same products; docs/campaign.md compares the two). The camera and stack stages use groups
of ranks per unit only when they have fewer units than ranks (--groups recipe: always).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

from ..campaign import (GROUP_POLICIES, CampaignDefinition, format_summary, run_campaign,
                        stage_names, summarise)
from ..infra.config import RecipeError, load_recipe
from ..infra.ledger import Ledger, LedgerError
from ..infra.log import setup_logging, unit_logger
from ..infra.world import World

DESCRIPTION = __doc__
DEMO_SEED = 1


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ps1mpi campaign", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--demo", type=Path, metavar="DIR",
                       help="simulate the demo survey in DIR/sim and process it in DIR")
    where.add_argument("--ledger", type=Path, help="the campaign's ledger (created if missing)")
    p.add_argument("--campaign", type=Path, metavar="FILE",
                   help="campaign definition TOML ([campaign] table; other tables are recipes)")
    p.add_argument("--datastore", help="datastore URL (overrides the campaign definition)")
    p.add_argument("--until", choices=stage_names(), help="stop after this stage")
    p.add_argument("--recipe", action="append", default=[], type=Path, metavar="FILE")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--logdir", type=Path)
    p.add_argument("--preset", default="demo", help="simulated survey preset for --demo")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("--overlap", action="store_true",
                   help="overlap the stages (one distribution for all; see docs/campaign.md)")
    p.add_argument("--groups", choices=GROUP_POLICIES, default="adaptive",
                   help="ranks per unit of the camera and stack stages: 'adaptive' (default) "
                   "groups ranks only when a stage has fewer units than ranks, 'recipe' always "
                   "uses their group_size (same products)")
    return p.parse_args(argv)


def _definition(args: argparse.Namespace) -> tuple[dict, list[Path]]:
    data: dict = {}
    recipes = list(args.recipe)
    if args.campaign:
        with open(args.campaign, "rb") as fh:
            raw = tomllib.load(fh)
        data = raw.pop("campaign", {})
        if raw:  # the other tables of the campaign file are recipe overrides
            recipes.insert(0, args.campaign)
    return data, recipes


def main(args: argparse.Namespace) -> int:
    world = World.from_mpi()
    try:
        data, recipe_files = _definition(args)
        if args.demo:  # where the simulated survey keeps its masters and reference catalog
            recipe_files.insert(0, Path(__file__).resolve().parents[1] / "data" / "demo_campaign.toml")
        recipe = load_recipe(recipe_files, args.set, data=None)
    except (RecipeError, OSError, tomllib.TOMLDecodeError) as err:
        if world.rank == 0:
            print(f"ps1mpi campaign: {err}", file=sys.stderr)
        return 2
    setup_logging(world.rank, level=recipe.get("runtime.log_level"), logdir=args.logdir,
                  stage="campaign")
    log = unit_logger("campaign")
    root = args.demo if args.demo else args.ledger.parent
    ledger_path = root / "ledger.h5" if args.demo else args.ledger
    server = None
    if args.demo:
        from ..sim.survey import simulate_survey
        sim_dir = root / "sim"
        if not (sim_dir / "survey.fits").exists():
            simulate_survey(sim_dir, preset=args.preset, seed=DEMO_SEED, comm=world.comm)
        world.barrier()
        if world.rank == 0:
            from ..sim.datastore import start_datastore
            server = start_datastore(sim_dir / "datastore")
            data.setdefault("name", f"demo-{args.preset}")
        url = world.bcast_object(server.url if server else None)
        data["datastore"] = url
    if args.datastore:
        data["datastore"] = args.datastore
    ledger = None
    error = None
    campaign = None
    if world.rank == 0:
        try:
            campaign = CampaignDefinition.from_dict(data)
            if ledger_path.exists():
                ledger = Ledger.open(ledger_path, "a")
                stored = ledger.campaign
                if stored and not args.demo and not data:
                    campaign = CampaignDefinition.from_dict(stored)
            else:
                ledger = Ledger.create(ledger_path, campaign=campaign.as_dict())
            if not campaign.datastore:
                raise RecipeError("no datastore: give --datastore or [campaign] datastore")
        except (LedgerError, RecipeError, OSError) as err:
            error = str(err)
    error, campaign = world.bcast_object((error, campaign))
    if error:
        if world.rank == 0:
            print(f"ps1mpi campaign: {error}", file=sys.stderr)
        if server:
            server.stop()
        return 2
    try:
        report = run_campaign(world, ledger=ledger, root=root, ledger_path=ledger_path,
                              recipe=recipe, campaign=campaign, until=args.until,
                              overlap=args.overlap, groups=args.groups, log=log)
    finally:
        if server:
            server.stop()
    if world.rank == 0:
        summary = summarise(ledger, report)
        ledger.close()
        print(format_summary(summary))
        (root / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
        if not args.no_report:
            from .monitor import write_report
            page = write_report(ledger_path, root / "report")
            print(f"\nreport: {page}")
    return report.exit_code
