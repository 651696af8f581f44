"""What every stage is, and how a stage runs through the ledger. STABLE (API for stage authors).

A stage is a class with declared data and four hooks::

    class ChipStage(Stage):
        name = "chip"                          # the CLI subcommand
        run_table = "chipRun"                  # ledger tables (schema in infra/schema.py)
        element_table = "chipProcessedImfile"
        inputs = ("rawExp", "rawImfile")       # ledger tables it reads (for docs and checks)
        outputs = {"image": "chip/{exp_name}/{exp_name}.{chip}.ch.fits", ...}  # relative to root
        group_size = 1                         # >1: each unit is processed by a group of ranks

        def define(self, ledger, ctx) -> int       # rank 0: create runs/elements whose inputs
                                                   #   are done with good quality; return count
        def units(self, ledger, ctx) -> list[WorkUnit]   # rank 0: pending elements as units
        def process(self, unit, ctx) -> Outcome    # any rank (ctx.world is the unit's group)
        def complete(self, ledger, ctx) -> None    # rank 0: close runs whose elements are done

Rules:

- ``define`` is where dependencies live: a stage creates elements only for parents that are
  DONE with quality 0; a parent run with a faulted element is not DONE, so it blocks; a bad
  quality parent gets no child (it is dropped downstream).
- ``process`` reads inputs, calls pure algorithms, writes every product under a temporary name
  and renames it into place (:func:`ps1mpi.infra.products.atomic_output`), and returns an
  :class:`Outcome` whose ``summary`` keys are columns of ``element_table``. Bad data is an
  Outcome with ``quality != 0`` and a reason; anything raised becomes a fault.
- Restart rule: a unit is redone from scratch whenever its element is not DONE; products are
  overwritten atomically, so a redo after a crash gives identical products.
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from ..infra.config import Recipe
from ..infra.ledger import Ledger
from ..infra.log import unit_logger
from ..infra.runtime import Outcome, RunReport, WorkUnit, run_units
from ..infra.schema import State
from ..infra.world import World

__all__ = ["Stage", "StageContext", "run_stage", "Outcome", "WorkUnit", "RunReport"]


@dataclass
class StageContext:
    """What a stage needs besides its unit: where products go, the recipe, its ranks."""

    root: Path                 # campaign directory; product paths are relative to it
    recipe: Recipe
    world: World               # the whole job, or the unit's group inside process()
    ledger_path: Path
    log: logging.LoggerAdapter

    def with_group(self, group: World) -> "StageContext":
        return replace(self, world=group)

    def path(self, relative: str | Path) -> Path:
        return self.root / relative


class Stage(abc.ABC):
    """Base class of every stage; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    run_table: ClassVar[str | None] = None
    element_table: ClassVar[str] = ""
    inputs: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[dict[str, str]] = {}
    group_size: ClassVar[int] = 1

    def product_path(self, ctx: StageContext, product: str, **keys) -> Path:
        """Absolute path of a declared output, its template filled with ``keys``."""
        return ctx.root / self.outputs[product].format(**keys)

    # ----- hooks (rank 0 unless stated)
    def define(self, ledger: Ledger, ctx: StageContext) -> int:
        return 0

    def units(self, ledger: Ledger, ctx: StageContext) -> list[WorkUnit]:
        """Default: every pending element, with its ra/dec and unit cost."""
        rows = ledger.pending(self.element_table, retry_cap=int(ctx.recipe.get("runtime.retry_cap")))
        if rows.size == 0:
            return []
        ra = ledger.column(self.element_table, "ra", rows)
        dec = ledger.column(self.element_table, "dec", rows)
        names = self.unit_names(ledger, rows)
        return [WorkUnit(self.element_table, int(r), n, float(a), float(d))
                for r, n, a, d in zip(rows, names, ra, dec)]

    def unit_names(self, ledger: Ledger, rows: np.ndarray) -> list[str]:
        return [f"{self.element_table}[{r}]" for r in rows]

    @abc.abstractmethod
    def process(self, unit: WorkUnit, ctx: StageContext) -> Outcome:
        """Process one unit on any rank (``ctx.world`` is the unit's group)."""

    def complete(self, ledger: Ledger, ctx: StageContext) -> None:
        """Default: a run is DONE when all its elements are DONE or DROP (none faulted)."""
        if self.run_table is None:
            return
        close_finished_runs(ledger, self.run_table, self.element_table)


def close_finished_runs(ledger: Ledger, run_table: str, element_table: str) -> np.ndarray:
    """Mark runs DONE whose elements are all DONE/DROP; a run whose elements all have bad
    quality gets quality 1. Returns the rows closed."""
    run_state = ledger.column(run_table, "state")
    open_runs = np.flatnonzero(run_state == State.RUN)
    if open_runs.size == 0:
        return open_runs
    el_run = ledger.column(element_table, "run")
    el_state = ledger.column(element_table, "state")
    el_quality = ledger.column(element_table, "quality")
    finished = (el_state == State.DONE) | (el_state == State.DROP)
    n_all = np.bincount(el_run[el_run >= 0], minlength=run_state.size)
    n_fin = np.bincount(el_run[(el_run >= 0) & finished], minlength=run_state.size)
    n_good = np.bincount(el_run[(el_run >= 0) & (el_state == State.DONE) & (el_quality == 0)],
                         minlength=run_state.size)
    close = open_runs[(n_all[open_runs] > 0) & (n_fin[open_runs] == n_all[open_runs])]
    if close.size:
        ledger.transition(run_table, close, State.DONE,
                          quality=(n_good[close] == 0).astype(np.uint16),
                          message=["" if n_good[r] else "no element with good quality"
                                   for r in close])
        ledger.flush()
    return close


def run_stage(stage: Stage, ctx: StageContext, ledger: Ledger | None, *,
              on_units: Callable[[int], None] | None = None) -> RunReport:
    """Define, distribute and complete one stage over the job's world (collective).

    Rank 0 passes the open writable ledger; other ranks pass None. If rank 0 fails while
    defining the work, every rank learns it and the error is raised everywhere. When given,
    ``on_units(n)`` is called on every rank with the number of units about to run, before they
    are handed out (the campaign sizes the rank groups of a stage with it).
    """
    world = ctx.world
    setup_error = None
    units = None
    if world.rank == 0:
        t0 = time.time()
        try:
            created = stage.define(ledger, ctx)
            ledger.flush()
            units = stage.units(ledger, ctx)
            ctx.log.info("%s: %d new elements defined, %d units to process (%.2f s)",
                         stage.name, created, len(units), time.time() - t0)
        except Exception as err:  # noqa: BLE001 - reported to every rank below
            setup_error = f"{type(err).__name__}: {err}"
            ctx.log.exception("%s: defining the work failed", stage.name)
    setup_error, n_units = world.bcast_object(
        (setup_error, len(units) if units is not None else 0))
    if setup_error:
        raise RuntimeError(f"stage {stage.name}: {setup_error}")
    if on_units is not None:
        on_units(n_units)
    report = run_units(stage, ctx, ledger, units)
    if world.rank == 0:
        stage.complete(ledger, ctx)
        ledger.flush()
    world.barrier()
    return report


def make_context(*, root: Path, recipe: Recipe, world: World, ledger_path: Path,
                 stage: str) -> StageContext:
    return StageContext(root=Path(root), recipe=recipe, world=world,
                        ledger_path=Path(ledger_path), log=unit_logger(stage))

