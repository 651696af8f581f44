"""A toy stage for runtime tests: each element's chip name says what its unit does.

  OK    writes a small product and reports a summary
  BADQ  completes with quality 7 (bad data)
  RAISE raises (a fault)
  SLOW  sleeps past the unit timeout (a timeout fault)
  EXIT  kills its rank abruptly
Usage: mpiexec -n N python toy_stage.py LEDGER [--set key=value ...]
"""

import os
import sys
import time

import numpy as np

from ps1mpi.cli.common import add_job_options, run_stage_command
from ps1mpi.infra.products import atomic_output
from ps1mpi.stages.base import Outcome, Stage, WorkUnit


class ToyStage(Stage):
    name = "toy"
    run_table = "chipRun"
    element_table = "chipProcessedImfile"
    outputs = {"result": "toy/{row}.txt"}

    def unit_names(self, ledger, rows):
        return [c.decode() for c in ledger.column(self.element_table, "chip", rows)]

    def units(self, ledger, ctx):
        units = super().units(ledger, ctx)
        for u in units:
            u.info["kind"] = u.name.split("-")[0]
        return units

    def process(self, unit: WorkUnit, ctx) -> Outcome:
        kind = unit.info["kind"]
        if kind == "RAISE":
            raise OSError(f"simulated disk failure on {unit.name}")
        if kind == "SLOW":
            time.sleep(30)
        if kind == "EXIT":
            os._exit(3)
        if kind == "BADQ":
            return Outcome(quality=7, message="no stars found")
        work = float(ctx.recipe.get("runtime.progress_s")) * 0  # recipe reachable on every rank
        with atomic_output(self.product_path(ctx, "result", row=unit.row)) as tmp:
            tmp.write_text(f"{unit.name} rank {ctx.world.rank}\n")
        return Outcome(summary={"n_sources": unit.row, "bg": 1.5 + work})


class GroupToyStage(ToyStage):
    """Each unit is processed by a group of two ranks that exchange arrays by buffer calls."""

    group_size = 2

    def process(self, unit: WorkUnit, ctx) -> Outcome:
        group = ctx.world
        data = group.bcast_array(np.arange(5.0) * unit.row if group.rank == 0 else None)
        part = np.array([group.rank + 1.0]) * data[1]
        total = group.allreduce(part)[0]
        gathered = group.gatherv(np.full(group.rank + 1, unit.row, np.int64))
        if group.rank == 0:
            expected = unit.row * sum(range(1, group.size + 1))
            assert total == expected, (total, expected)
            assert gathered.size == sum(range(1, group.size + 1))
            with atomic_output(self.product_path(ctx, "result", row=unit.row)) as tmp:
                tmp.write_text(f"{total} {group.size}\n")
        return Outcome(summary={"n_sources": int(total)})


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser()
    add_job_options(p)
    p.add_argument("--group", action="store_true")
    args = p.parse_args()
    sys.exit(run_stage_command(GroupToyStage() if args.group else ToyStage(), args))
