"""Completions per second the coordinator records when every rank reports tiny work units.

Run under MPI: `mpiexec -n 4 ps1mpi bench coordinator [--units N]`. Each unit does nothing
but return its summary, so the figure is the runtime's ceiling: hand-out, reports, ledger
writes (batched RUN and DONE records with history), all on rank 0.
JSON keys: ranks, completions_per_s.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..infra.config import load_recipe
from ..infra.ledger import Ledger
from ..infra.log import setup_logging
from ..infra.runtime import Outcome, run_units
from ..infra.schema import State
from ..infra.world import World
from ..stages.base import Stage, make_context
from .common import emit


class _TinyStage(Stage):
    name = "tiny"
    run_table = "chipRun"
    element_table = "chipProcessedImfile"

    def process(self, unit, ctx) -> Outcome:
        return Outcome(summary={"n_sources": unit.row})


def run(argv: list[str]) -> dict | None:
    p = argparse.ArgumentParser(prog="ps1mpi bench coordinator", description=__doc__)
    p.add_argument("--units", type=int, default=200_000)
    args = p.parse_args(argv)
    world = World.from_mpi()
    setup_logging(world.rank, level="WARNING")
    recipe = load_recipe()
    stage = _TinyStage()
    ledger = None
    units = None
    workdir = None
    if world.rank == 0:
        workdir = Path(tempfile.mkdtemp(prefix="bench-coord-"))
        ledger = Ledger.create(workdir / "ledger.h5")
        rng = np.random.default_rng(3)
        n = args.units
        run_row = ledger.append("chipRun", 1, state=State.RUN)
        ledger.append("chipProcessedImfile", n, run=run_row[0], ra=rng.uniform(0, 360, n),
                      dec=rng.uniform(-30, 90, n))
        ledger.flush()
        units = stage.units(ledger, make_context(root=workdir, recipe=recipe, world=world,
                                                 ledger_path=workdir / "ledger.h5", stage="tiny"))
    ctx = make_context(root=workdir or Path("."), recipe=recipe, world=world,
                       ledger_path=Path("."), stage="tiny")
    world.barrier()
    report = run_units(stage, ctx, ledger, units)
    if world.rank != 0:
        return None
    done = ledger.counts("chipProcessedImfile")["done"]
    n_events = ledger.events().size
    ledger.close()
    shutil.rmtree(workdir)
    rate = report.done / report.wall_s
    print(f"ranks                {world.size}")
    print(f"units                {report.units:,} ({done:,} recorded done, {n_events:,} history events)")
    print(f"wall                 {report.wall_s:.2f} s")
    print(f"completions/s        {rate:,.0f}")
    return emit({"ranks": world.size, "completions_per_s": round(rate)})
