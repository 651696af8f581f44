"""A campaign: a region of sky driven through every stage, in order, through one ledger.

The campaign definition (TOML, stored in the ledger at creation) names the region, filters,
dates and stack kinds; the recipes say how each stage works. :func:`run_campaign` runs each
stage of :data:`PIPELINE` in turn over the job's ranks; every stage asks the ledger what is
ready, so the same call after a crash does only what is missing.

Two modes (``docs/campaign.md`` has the measurements and the reasons for the default):

sequential (default)
    Each stage runs to completion before the next starts: define, distribute, complete.
overlap (``overlap=True``, ``ps1mpi campaign --overlap``)
    One distribution for all stages at once. A coordinator thread on rank 0 records results,
    closes finished runs and asks the later stages what has become ready, so a camera can
    calibrate an exposure while other exposures' chips are still being processed. Units of a
    stage with ``group_size > 1`` are run by a gang of free ranks, formed on demand
    (``MPI_Comm_create_group``, collective only over the gang). A stage whose units depend on
    many exposures (``StageSpec.streams`` False: stack) starts only once every earlier stage
    is drained, so the products are identical in both modes.

Group sizes (both modes): a stage's ``group_size`` (camera, stack) is the most ranks one unit
may use. With ``groups="adaptive"`` (default) a unit gets a group only when there are more
ranks than units to share them (:func:`effective_group_size`): a group's members wait for each
other inside the unit (the leader's fit, reads and writes), which costs a third to a half of
their time (docs/campaign.md), while independent units on single ranks wait for nothing.
``groups="recipe"`` always uses ``group_size``. The products do not depend on it.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from mpi4py import MPI

from .infra.config import Recipe, RecipeError
from .infra.ledger import Ledger
from .infra.runtime import RunReport, WorkUnit, _receive, _run_one, region_order
from .infra.schema import TABLES, Fault, State
from .infra.world import World
from .stages.base import Stage, StageContext, make_context, run_stage

__all__ = ["PIPELINE", "CampaignDefinition", "StageSpec", "run_campaign", "run_overlapped",
           "effective_group_size", "summarise", "format_summary", "GROUP_POLICIES"]

GROUP_POLICIES = ("adaptive", "recipe")


@dataclass
class CampaignDefinition:
    """What a campaign covers. Stored as JSON in the ledger; read from ``[campaign]`` TOML."""

    name: str = "campaign"
    datastore: str = ""
    ra_range: tuple[float, float] = (0.0, 360.0)
    dec_range: tuple[float, float] = (-90.0, 90.0)
    filters: tuple[str, ...] = ("g", "r", "i", "z", "y", "w")
    mjd_range: tuple[float, float] = (0.0, 1e6)
    stack_kinds: tuple[str, ...] = ("nightly", "deep", "best_seeing", "out_of_season")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CampaignDefinition":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise RecipeError(f"campaign definition: unknown keys {sorted(unknown)}; "
                              f"known: {sorted(known)}")
        out = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        for rng_name in ("ra_range", "dec_range", "mjd_range"):
            lo, hi = getattr(out, rng_name)
            if not lo <= hi:
                raise RecipeError(f"campaign definition: {rng_name} must be [low, high]")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    def accepts(self, *, ra: float, dec: float, filter: str, mjd: float) -> bool:
        """Whether an exposure at this pointing, filter and time belongs to the campaign."""
        ra_lo, ra_hi = self.ra_range
        in_ra = ra_lo <= ra % 360.0 <= ra_hi if ra_lo <= ra_hi else True
        return (in_ra and self.dec_range[0] <= dec <= self.dec_range[1]
                and filter[:1] in self.filters and self.mjd_range[0] <= mjd <= self.mjd_range[1])


@dataclass
class StageSpec:
    """One step of the pipeline: its name, ledger tables and how to build it.

    ``streams``: in the overlapping mode the stage may define work while earlier stages still
    have work, because each of its units depends on one exposure only (whose upstream is
    complete when the ledger says so). A stage whose units gather many exposures (a stack
    takes every warp of its skycell) must wait until every earlier stage is drained, or its
    products would depend on timing: False, the safe default.
    """

    name: str
    module: str
    build: Callable[[CampaignDefinition, Recipe], Stage]
    tables: tuple[str, ...] = ()
    streams: bool = False


def _summitcopy(campaign: CampaignDefinition, recipe: Recipe) -> Stage:
    from .stages.summitcopy import SummitcopyStage
    r = recipe["summitcopy"]
    return SummitcopyStage(campaign.datastore, timeout_s=r["timeout_s"],
                           deadline_s=r["deadline_s"], retry_cap=r["retry_cap"],
                           accept=campaign.accepts)


def _camera(campaign: CampaignDefinition, recipe: Recipe) -> Stage:
    from .stages.camera import CameraStage
    return CameraStage(group_size=int(recipe.get("camera.group_size")))


def _stack(campaign: CampaignDefinition, recipe: Recipe) -> Stage:
    from .stages.stack import build_stage
    return build_stage(campaign, recipe)


def _plain(module: str, cls: str) -> Callable[[CampaignDefinition, Recipe], Stage]:
    def build(campaign: CampaignDefinition, recipe: Recipe) -> Stage:
        return getattr(importlib.import_module(module), cls)()
    return build


PIPELINE: tuple[StageSpec, ...] = (
    StageSpec("summitcopy", "ps1mpi.stages.summitcopy", _summitcopy, ("summitExp", "summitImfile"),
              streams=True),
    StageSpec("register", "ps1mpi.stages.register", _plain("ps1mpi.stages.register", "RegisterStage"),
              ("rawExp", "rawImfile"), streams=True),
    StageSpec("chip", "ps1mpi.stages.chip", _plain("ps1mpi.stages.chip", "ChipStage"),
              ("chipRun", "chipProcessedImfile"), streams=True),
    StageSpec("camera", "ps1mpi.stages.camera", _camera, ("camRun", "camProcessedExp"),
              streams=True),
    StageSpec("warp", "ps1mpi.stages.warp", _plain("ps1mpi.stages.warp", "WarpStage"),
              ("warpRun", "warpSkyfile"), streams=True),
    StageSpec("stack", "ps1mpi.stages.stack", _stack, ("stackRun", "stackSumSkyfile")),
)


def stage_names() -> list[str]:
    return [s.name for s in PIPELINE]


@dataclass
class CampaignReport:
    """What a campaign job did (the same on every rank, except ``rank_seconds``).

    Attributes
    ----------
    stages : list of RunReport
        One per stage run. ``wall_s`` is the stage's wall time (sequential: from building the
        stage to its closing barrier, define and complete included; overlap: from its first
        unit's start to its last unit's end); ``busy_s``, ``wait_s``, ``idle_s`` are this
        rank's seconds in units, blocked in collectives and waiting for the coordinator.
    wall_s : float
        Seconds for the whole campaign job.
    mode : str
        ``"sequential"`` or ``"overlap"``.
    nranks : int
    rank_seconds : dict
        Rank 0 only: stage name -> array ``(nranks, 6)`` of every rank's busy, wait, idle,
        in-unit wait, CPU (the process's, all threads) and run-queue (the main thread's time
        runnable but without a core: other jobs' share) seconds; empty on other ranks. In
        the overlapping mode what a rank did outside the blocks of units (waiting for work;
        rank 0's coordinator between blocks) belongs to no stage: key ``"*"``.
    groups : dict
        Stage name -> {ranks per unit: units run so} for the stages with ``group_size > 1``.
    """

    stages: list[RunReport] = field(default_factory=list)
    wall_s: float = 0.0
    mode: str = "sequential"
    nranks: int = 1
    rank_seconds: dict[str, np.ndarray] = field(default_factory=dict)
    groups: dict[str, dict[int, int]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return max([r.exit_code for r in self.stages] or [0])


def _selected(until: str | None, pipeline: Sequence[StageSpec]) -> list[StageSpec]:
    names = [s.name for s in pipeline]
    if until is not None and until not in names:
        raise RecipeError(f"--until {until!r}: stages are {', '.join(names)}")
    out = []
    for spec in pipeline:
        out.append(spec)
        if spec.name == until:
            break
    return out


def run_campaign(world: World, *, ledger: Ledger | None, root: Path, ledger_path: Path,
                 recipe: Recipe, campaign: CampaignDefinition, until: str | None = None,
                 overlap: bool = False, groups: str = "adaptive",
                 pipeline: Sequence[StageSpec] | None = None,
                 overlap_options: dict[str, float] | None = None, log=None) -> CampaignReport:
    """Run every stage up to ``until`` (inclusive) over ``world``; collective.

    Parameters
    ----------
    world : World
        The job's ranks.
    ledger : Ledger or None
        Rank 0: the open, writable ledger; None elsewhere.
    root, ledger_path : Path
        Campaign directory (products are relative to it) and the ledger file.
    recipe : Recipe
    campaign : CampaignDefinition
    until : str, optional
        Last stage to run (default: all of :data:`PIPELINE`).
    overlap : bool
        False (default): each stage runs to completion before the next starts. True: all
        stages in one distribution, later stages taking up what the ledger says is ready
        while earlier ones still run (:func:`run_overlapped`). The products are the same.
    groups : {"adaptive", "recipe"}
        Ranks per unit of a stage with ``group_size > 1``: ``"adaptive"`` uses groups only
        when the stage has fewer units than ranks (:func:`effective_group_size`),
        ``"recipe"`` always ``group_size``. The products are the same.
    pipeline : sequence of StageSpec, optional
        The stages, in order (default :data:`PIPELINE`).
    overlap_options : dict, optional
        Keyword options of :func:`run_overlapped` (``refresh_s``, ``block_s``,
        ``gang_min_units``).
    log : logging.LoggerAdapter, optional
        Unused; kept for callers that pass one.

    Returns
    -------
    CampaignReport
    """
    specs = _selected(until, PIPELINE if pipeline is None else pipeline)
    if groups not in GROUP_POLICIES:
        raise RecipeError(f"groups {groups!r}: policies are {', '.join(GROUP_POLICIES)}")
    if overlap:
        return run_overlapped(world, ledger=ledger, root=root, ledger_path=ledger_path,
                              recipe=recipe, campaign=campaign, specs=specs, groups=groups,
                              **(overlap_options or {}))
    report = CampaignReport(mode="sequential", nranks=world.size)
    t0 = time.time()
    for spec in specs:
        t_stage = time.time()
        cpu0 = time.process_time()
        rq0 = runqueue_s()
        w0 = world.wait_s
        stage = spec.build(campaign, recipe)
        ctx = make_context(root=root, recipe=recipe, world=world, ledger_path=ledger_path,
                           stage=spec.name)
        size = max(1, int(getattr(stage, "group_size", 1)))
        adapt = (_group_sizer(stage, size, world.size)
                 if size > 1 and groups == "adaptive" else None)
        rep = run_stage(stage, ctx, ledger, on_units=adapt)
        if size > 1:
            group = max(1, min(int(stage.group_size), world.size))
            report.groups[spec.name] = {group: rep.units} if rep.units else {}
        # the job world's waits: other ranks waiting for rank 0's define, the closing barrier
        rep.wait_s += world.wait_s - w0
        rep.wall_s = time.time() - t_stage
        report.stages.append(rep)
        _gather_seconds(world, report, rep, time.process_time() - cpu0, runqueue_s() - rq0)
    report.wall_s = time.time() - t0
    return report


def effective_group_size(group_size: int, nranks: int, nunits: int | None) -> int:
    """Ranks per unit for a stage allowed ``group_size`` ranks per unit, with ``nunits``
    units to run on ``nranks`` ranks: as many as the ranks left over once every unit has one,
    at most ``group_size`` (``group_size`` itself when the count is unknown).

    >>> effective_group_size(2, 2, 17), effective_group_size(2, 8, 4), effective_group_size(4, 8, 3)
    (1, 2, 2)
    """
    if group_size < 1 or nranks < 1:
        raise ValueError(f"group_size {group_size} and nranks {nranks} must be >= 1")
    if nunits is None:
        return min(group_size, nranks)
    return max(1, min(group_size, nranks // max(1, int(nunits))))


def _group_sizer(stage: Stage, group_size: int, nranks: int):
    """``on_units`` callback of :func:`run_stage`: the stage's ranks per unit for the number of
    units it is about to run (:func:`effective_group_size`)."""
    def size_groups(n_units: int) -> None:
        stage.group_size = effective_group_size(group_size, nranks, n_units)
    return size_groups


def runqueue_s() -> float:
    """Seconds the calling thread has waited on a run queue: runnable, while other processes
    had the cores (Linux ``/proc/thread-self/schedstat``; 0 where it is not available)."""
    try:
        with open("/proc/thread-self/schedstat") as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _gather_seconds(world: World, report: CampaignReport, rep: RunReport, cpu_s: float,
                    runqueue: float) -> None:
    """Every rank's busy/wait/idle/in-unit wait/CPU/run-queue seconds of one stage, to rank 0
    (collective)."""
    mine = np.array([[rep.busy_s, rep.wait_s, rep.idle_s, rep.unit_wait_s, cpu_s, runqueue]],
                    np.float64)
    wait0 = world.wait_s
    table = world.gatherv(mine)
    world.wait_s = wait0  # the bookkeeping itself is not the stage's waiting
    if world.rank == 0:
        report.rank_seconds[rep.stage] = table


# ------------------------------------------------------------------------------ overlap

TAG_WANT = 21   # rank -> coordinator: results, and whether it wants work
TAG_WORK = 22   # coordinator -> rank: a block of units of one stage (or stop)


@dataclass
class _Step:
    """The coordinator's view of one stage in the overlapping mode."""

    index: int
    spec: StageSpec
    stage: Stage
    ctx: StageContext
    group_size: int
    queue: deque = field(default_factory=deque)
    issued: set = field(default_factory=set)        # (table, row) handed out by this job
    outstanding: int = 0                             # units handed out, not yet reported
    units: int = 0
    done: int = 0
    faulted: int = 0
    bad_quality: int = 0
    to_complete: bool = True                         # results recorded since complete()
    epoch: int = 0                                   # complete() calls so far
    seen: int = -1                                   # the predecessor's epoch at define
    t_first: float = math.inf
    t_last: float = -math.inf
    unit_s: float = 0.0                              # summed seconds of reported units
    n_timed: int = 0
    refresh_s: float = 0.0                           # coordinator time in its refreshes

    def drained(self) -> bool:
        return not self.queue and self.outstanding == 0 and not self.to_complete

    def mean_unit_s(self) -> float | None:
        return self.unit_s / self.n_timed if self.n_timed else None


class _OverlapCoordinator:
    """Thread of rank 0 in the overlapping mode: the only code that touches the ledger.

    It records results, closes finished runs (``complete``), asks every stage what has become
    ready (``define`` + ``units``) and hands blocks of units to free ranks: the stage with the
    shortest measured unit time first (a stage not timed yet counts as instant; ties go
    downstream), a stage with ``group_size = G`` to G free ranks at once (a gang). Shortest
    first keeps the cheap feeding stages (register) from starving behind expensive ones
    (chip), so that downstream work is exposed early. Blocks are sized to about ``block_s``
    seconds of work (from the stage's measured unit time), so that ranks come back often
    enough to take up newly ready work and to form gangs.
    """

    def __init__(self, comm: MPI.Intracomm, ledger: Ledger, steps: list[_Step], nranks: int, *,
                 timeout: float, flush_s: float, progress_s: float, refresh_s: float,
                 block_s: float, gang_min_units: int, groups: str = "adaptive"):
        self.comm = comm
        self.ledger = ledger
        self.steps = steps
        self.live = set(range(nranks))
        self.timeout = timeout
        self.flush_s = flush_s
        self.progress_s = progress_s
        self.refresh_s = refresh_s
        self.block_s = block_s
        self.gang_min_units = gang_min_units
        self.groups = groups
        self.gang_units: list[dict[int, int]] = [{} for _ in steps]  # per step: size -> units
        self.units: list[tuple[int, WorkUnit]] = []
        self.free: list[int] = []
        self.held: dict[int, tuple[int, set[int]]] = {}   # leader -> (step, unit indices)
        self.members: dict[int, list[int]] = {}           # leader -> its gang
        self.deadline: dict[int, float] = {}              # every rank at work -> deadline
        self.buffer: list[tuple[int, int, tuple]] = []
        self.changed = True                               # the ledger may hold new work
        self.gangs = 0
        self.n_refresh = 0
        self.refresh_time = 0.0
        self.error: str | None = None
        self.exit_code = 0
        self.log = logging.getLogger("ps1mpi.campaign")
        self._last_flush = self._last_refresh = self._last_progress = time.monotonic()

    # ------------------------------------------------------------ defining the work
    def _refresh(self) -> None:
        """complete() where results came in, then define() + units() of every stage whose
        predecessor closed runs since (its define reads only the predecessor's runs); a
        non-streaming stage only once every earlier stage is drained."""
        t_refresh = time.monotonic()
        upstream = 0
        quiet = True
        for step in self.steps:
            t_step = time.monotonic()
            if step.to_complete:
                step.stage.complete(self.ledger, step.ctx)
                self.ledger.flush()
                step.to_complete = False
                step.epoch += 1
            if (step.spec.streams or quiet) and step.seen != upstream:
                t0 = time.time()
                created = step.stage.define(self.ledger, step.ctx)
                self.ledger.flush()
                new = [u for u in step.stage.units(self.ledger, step.ctx)
                       if (u.table, u.row) not in step.issued]
                step.seen = upstream
                if new:
                    order = region_order(np.array([u.ra for u in new]),
                                         np.array([u.dec for u in new]))
                    for i in order:
                        unit = new[i]
                        step.issued.add((unit.table, unit.row))
                        step.queue.append(len(self.units))
                        self.units.append((step.index, unit))
                    step.units += len(new)
                if created or new:
                    step.ctx.log.info("%s: %d new elements defined, %d units queued (%.2f s)",
                                      step.spec.name, created, len(new), time.time() - t0)
            quiet = quiet and step.drained() and step.seen == upstream
            upstream = step.epoch
            step.refresh_s += time.monotonic() - t_step
        self.changed = False
        self._last_refresh = time.monotonic()
        self.n_refresh += 1
        self.refresh_time += time.monotonic() - t_refresh

    # ------------------------------------------------------------ handing out work
    def _gang_size(self, step: _Step) -> int:
        """Ranks for the next block of ``step``: ``group_size`` (at most the live ranks);
        adaptive: only the free ranks left over once each queued unit has one."""
        size = max(1, min(step.group_size, len(self.live)))
        if self.groups == "adaptive" and size > 1:
            size = effective_group_size(size, max(1, len(self.free)), len(step.queue))
        return size

    def _choose(self) -> _Step | None:
        """The stage to serve next: the one with queued units and the shortest measured unit
        time that the free ranks can run; a gang stage that does not fit yet is waited for
        (free ranks held back) when it has gathered ``gang_min_units`` units or nothing else
        is runnable."""
        ready = [s for s in self.steps if s.queue]
        if not ready:
            return None
        ready.sort(key=lambda s: (s.mean_unit_s() or 0.0, -s.index))
        nfree = len(self.free)
        if all(self._gang_size(s) > nfree for s in ready):
            return ready[0]
        for step in ready:
            if self._gang_size(step) <= nfree or len(step.queue) >= self.gang_min_units:
                return step
        return None

    def _block(self, step: _Step, gang: int) -> list[int]:
        """Units for one gang: about ``block_s`` seconds of the stage's measured unit time
        (one unit while none has been timed). Single ranks get no more than a fair share of
        the queue (guided self-scheduling); a gang of several ranks, whose forming may have
        kept ranks waiting, keeps its ``block_s`` of work; a stage that only one gang can run
        at a time gets all it has queued."""
        ngangs = max(1, len(self.live) // gang)
        mean = step.mean_unit_s()
        if ngangs == 1:
            n = len(step.queue)
        elif mean is None:
            n = 1
        else:
            n = max(1, int(self.block_s / max(mean, 1e-3)))
            if gang == 1:
                n = min(n, max(1, math.ceil(len(step.queue) / (2 * ngangs))))
        return [step.queue.popleft() for _ in range(min(n, len(step.queue), 4096))]

    def _dispatch(self) -> None:
        while self.free:
            step = self._choose()
            if step is None:
                return
            g = self._gang_size(step)
            if len(self.free) < g:
                return  # reserved: wait for more ranks to come back
            members = sorted(self.free[:g])
            del self.free[:g]
            block = self._block(step, g)
            units = [self.units[i][1] for i in block]
            by_table: dict[str, list[int]] = {}
            for u in units:
                by_table.setdefault(u.table, []).append(u.row)
            for table, rows in by_table.items():
                self.ledger.transition(table, rows, State.RUN, rank=members[0])
            step.outstanding += len(block)
            self.gangs += 1
            if step.group_size > 1:
                sizes = self.gang_units[step.index]
                sizes[g] = sizes.get(g, 0) + len(block)
            leader = members[0]
            self.held[leader] = (step.index, set(block))
            self.members[leader] = members
            deadline = time.monotonic() + self.timeout * len(block) + 60.0
            msg = {"step": step.index, "members": members, "gang": self.gangs,
                   "units": [(i, self.units[i][1]) for i in block]}
            for rank in members:
                self.deadline[rank] = deadline
                self.comm.send(msg, dest=rank, tag=TAG_WORK)

    # ------------------------------------------------------------ recording results
    def _record(self, rank: int, results: list[tuple]) -> None:
        step_index, held = self.held.get(rank, (None, set()))
        for index, fault, quality, message, summary, t_start, duration in results:
            if index not in held:
                continue  # a late report from a rank already written off
            held.discard(index)
            step = self.steps[self.units[index][0]]
            step.outstanding -= 1
            self.buffer.append((index, rank, (fault, quality, message, summary, t_start,
                                              duration)))
            step.t_first = min(step.t_first, t_start)
            step.t_last = max(step.t_last, t_start + duration)
            step.unit_s += duration
            step.n_timed += 1
            if fault:
                step.faulted += 1
            else:
                step.done += 1
                step.bad_quality += quality != 0
        if rank in self.held:
            deadline = time.monotonic() + self.timeout * max(1, len(held)) + 60.0
            for member in self.members.get(rank, [rank]):
                if member in self.deadline:
                    self.deadline[member] = deadline
            if not held:
                del self.held[rank]
                self.members.pop(rank, None)

    def _flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.buffer or (not force and now - self._last_flush < self.flush_s):
            return
        groups: dict[tuple, list] = {}
        for index, rank, res in self.buffer:
            unit = self.units[index][1]
            groups.setdefault((unit.table, tuple(sorted(res[3]))), []).append((unit, rank, res))
            self.steps[self.units[index][0]].to_complete = True
        for (table, keys), items in groups.items():
            spec = TABLES[table]
            unknown = [k for k in keys if k not in spec.column_names]
            fault = np.array([r[0] for _, _, r in items])
            message = [r[2] for _, _, r in items]
            if unknown:
                fault[:] = Fault.PROGRAMMING
                message = [f"stage reported unknown summary columns {unknown}"] * len(items)
                keys = ()
            self.ledger.transition(
                table, np.array([u.row for u, _, _ in items]), State.DONE, fault=fault,
                quality=np.array([r[1] for _, _, r in items]),
                rank=np.array([rank for _, rank, _ in items]),
                t_start=np.array([r[4] for _, _, r in items]),
                duration=np.array([r[5] for _, _, r in items]),
                message=message, **{k: np.array([r[3][k] for _, _, r in items]) for k in keys})
        self.buffer.clear()
        self.ledger.flush()
        self.changed = True
        self._last_flush = now

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for rank, deadline in list(self.deadline.items()):
            if now <= deadline or rank not in self.live:
                continue
            self.log.error("rank %d stopped reporting; its units are faulted (timeout) and the "
                           "rank is written off", rank)
            self.live.discard(rank)
            self.deadline.pop(rank, None)
            if rank in self.held:
                step_index, held = self.held.pop(rank)
                self.members.pop(rank, None)
                self._record_lost(rank, held)

    def _record_lost(self, rank: int, held: set[int]) -> None:
        """Fault (timeout) the units of a rank written off."""
        reason = f"rank {rank} unresponsive past its deadline"
        for index in held:
            step = self.steps[self.units[index][0]]
            step.outstanding -= 1
            step.faulted += 1
            self.buffer.append((index, rank, (int(Fault.TIMEOUT), 0, reason, {}, np.nan,
                                              np.nan)))

    def _progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < self.progress_s:
            return
        self._last_progress = now
        parts = [f"{s.spec.name} {s.done + s.faulted}/{s.units}" for s in self.steps if s.units]
        self.log.info("progress (overlap): %s; %d of %d ranks at work",
                      ", ".join(parts) or "nothing defined yet",
                      len(self.live) - len(self.free), len(self.live))

    def _finished(self) -> bool:
        return (not self.changed and not self.buffer and not self.held
                and all(s.drained() for s in self.steps) and set(self.free) >= self.live)

    # ------------------------------------------------------------ the loop
    def serve(self) -> None:
        status = MPI.Status()
        delay = 2e-5
        try:
            while True:
                got = False
                while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_WANT, status=status):
                    src = status.Get_source()
                    msg = self.comm.recv(source=src, tag=TAG_WANT)
                    got = True
                    self._record(src, msg.get("results", []))
                    if msg.get("want") and src in self.live:
                        self.deadline.pop(src, None)
                        self.free.append(src)
                starved = bool(self.free) and not any(s.queue for s in self.steps)
                self._flush(force=starved)
                if self.changed and (starved or
                                     time.monotonic() - self._last_refresh >= self.refresh_s):
                    self._refresh()
                self._dispatch()
                self._progress()
                self._check_deadlines()
                if self._finished():
                    break
                if got:
                    delay = 2e-5
                else:
                    time.sleep(delay)
                    delay = min(delay * 1.5, 0.005)
            self._progress(force=True)
            self.log.info("overlap coordinator: %d blocks handed out, %d refreshes of the ready "
                          "work taking %.1f s (%s)", self.gangs, self.n_refresh,
                          self.refresh_time, ", ".join(f"{s.spec.name} {s.refresh_s:.1f} s"
                                                       for s in self.steps))
        except BaseException as err:  # the coordinator must still release every rank
            self.error = f"{type(err).__name__}: {err}"
            self.log.error("overlap coordinator failed: %s\n%s", err, traceback.format_exc())
            try:
                self._flush(force=True)
            except BaseException:  # noqa: BLE001 - already failing; the ledger reverts RUN rows
                pass
        finally:
            faulted = sum(s.faulted for s in self.steps)
            self.exit_code = 1 if (faulted or self.error) else 0
            stop = {"stop": self.exit_code, "error": self.error, "groups": self.gang_units,
                    "steps": [(s.units, s.done, s.faulted, s.bad_quality,
                               max(0.0, s.t_last - s.t_first)) for s in self.steps]}
            for rank in sorted(self.live):
                if rank not in self.free:
                    self._drain_until_request(rank)
                self.comm.send(stop, dest=rank, tag=TAG_WORK)

    def _drain_until_request(self, rank: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.comm.Iprobe(source=rank, tag=TAG_WANT):
                if self.comm.recv(source=rank, tag=TAG_WANT).get("want"):
                    return
            time.sleep(0.001)


def _overlap_worker(steps: list[tuple[Stage, StageContext]], world: World, ctl: MPI.Intracomm,
                    gangs: MPI.Intracomm, timeout: float, report_s: float = 0.25
                    ) -> tuple[dict, np.ndarray, float]:
    """Every rank's loop in the overlapping mode: ask for work, run the block (alone or in its
    gang), report. Returns the stop message, per-stage (busy, wait, wait inside units, CPU,
    run queue) seconds and the idle seconds."""
    alone = World(MPI.COMM_SELF.Dup())
    everyone = gangs.Get_group()
    seconds = np.zeros((len(steps), 5))  # busy, wait, wait inside units, CPU, run queue
    idle = 0.0
    results: list[tuple] = []
    try:
        while True:
            ctl.send({"results": results, "want": True}, dest=0, tag=TAG_WANT)
            results = []
            t_ask = time.monotonic()
            reply = _receive(ctl, source=0, tag=TAG_WORK)
            idle += time.monotonic() - t_ask
            if "stop" in reply:
                return reply, seconds, idle
            k = reply["step"]
            stage, ctx = steps[k]
            members = reply["members"]
            leader = members[0] == world.rank
            if len(members) > 1:
                sub = everyone.Incl(members)
                group = World(gangs.Create_group(sub, tag=int(reply["gang"]) % 32768))
                sub.Free()
            else:
                group = alone
            wait0 = group.wait_s
            cpu0 = time.process_time()
            rq0 = runqueue_s()
            last_report = time.monotonic()
            try:
                for index, unit in reply["units"]:
                    wait_unit = group.wait_s
                    res = _run_one(stage, unit, ctx.with_group(group), timeout)
                    seconds[k, 2] += group.wait_s - wait_unit
                    if group.size > 1:  # the gang agrees: one failed member faults the unit
                        worst = group.allreduce(np.array([res[0]], np.int32), op="max")[0]
                        if worst and not res[0]:
                            res = (int(worst), 0, "a peer in the group failed", {}, res[4],
                                   res[5])
                    seconds[k, 0] += res[5]
                    if leader:
                        results.append((index,) + res)
                        if time.monotonic() - last_report > report_s:
                            ctl.send({"results": results, "want": False}, dest=0, tag=TAG_WANT)
                            results = []
                            last_report = time.monotonic()
            finally:
                seconds[k, 1] += group.wait_s - wait0
                seconds[k, 3] += time.process_time() - cpu0
                seconds[k, 4] += runqueue_s() - rq0
                if group is not alone:
                    group.free()
    finally:
        everyone.Free()
        alone.free()


def run_overlapped(world: World, *, ledger: Ledger | None, root: Path, ledger_path: Path,
                   recipe: Recipe, campaign: CampaignDefinition, specs: list[StageSpec],
                   groups: str = "adaptive", refresh_s: float = 2.0, block_s: float = 20.0,
                   gang_min_units: int = 4) -> CampaignReport:
    """Run ``specs`` as one overlapping distribution over ``world`` (collective).

    Parameters
    ----------
    world : World
    ledger : Ledger or None
        Rank 0: the open, writable ledger; None elsewhere.
    root, ledger_path : Path
    recipe : Recipe
    campaign : CampaignDefinition
    specs : list of StageSpec
        The stages, in pipeline order.
    groups : {"adaptive", "recipe"}
        Ranks per unit of a stage with ``group_size > 1`` (see :func:`run_campaign`):
        adaptive gangs use only ranks that are free anyway, so no rank is ever held back.
    refresh_s : float
        Seconds between the coordinator's re-definitions of ready work while ranks are busy
        (at once when a rank is idle for lack of work). Each costs rank 0 the stages' define,
        units and complete (~75 ms on the demo), next to its own units.
    block_s : float
        Seconds of work handed out per block (from each stage's measured mean unit time):
        longer blocks mean fewer round trips to the coordinator (5 s: 6.5% of the ranks' time
        waiting for work on the demo with 2 ranks; 20 s: 4.9%), shorter ones take up newly
        ready work sooner.
    gang_min_units : int
        ``groups="recipe"``: queued units of a stage with ``group_size > 1`` for which free
        ranks are held back until a whole gang is free, while other work could still be done.

    Returns
    -------
    CampaignReport
        ``stages[i].wall_s`` is the span from the stage's first unit start to its last unit
        end.

    Raises
    ------
    RuntimeError
        On every rank, when the coordinator failed (e.g. a stage's define raised).
    """
    t0 = time.time()
    cpu0 = time.process_time()
    rq0 = runqueue_s()
    timeout = float(recipe.get("runtime.unit_timeout_s"))
    local = []
    for spec in specs:
        stage = spec.build(campaign, recipe)
        local.append((stage, make_context(root=root, recipe=recipe, world=world,
                                          ledger_path=ledger_path, stage=spec.name)))
    ctl = world.comm.Dup()
    gangs = world.comm.Dup()
    coordinator = None
    thread = None
    if world.rank == 0:
        # the coordinator's own stage objects: define() never shares state with process()
        steps = []
        for i, spec in enumerate(specs):
            stage = spec.build(campaign, recipe)
            steps.append(_Step(i, spec, stage, make_context(
                root=root, recipe=recipe, world=world, ledger_path=ledger_path,
                stage=spec.name), max(1, int(getattr(stage, "group_size", 1)))))
        coordinator = _OverlapCoordinator(
            ctl, ledger, steps, world.size, timeout=timeout,
            flush_s=float(recipe.get("runtime.ledger_flush_s")),
            progress_s=float(recipe.get("runtime.progress_s")), refresh_s=refresh_s,
            block_s=block_s, gang_min_units=gang_min_units, groups=groups)
        thread = threading.Thread(target=coordinator.serve, name="overlap-coordinator",
                                  daemon=True)
        thread.start()
    stop, seconds, idle = _overlap_worker(local, world, ctl, gangs, timeout)
    if thread is not None:
        thread.join()
    ctl.Free()
    gangs.Free()
    if stop.get("error"):
        raise RuntimeError(f"overlapping campaign: {stop['error']}")
    report = CampaignReport(mode="overlap", nranks=world.size)
    for k, spec in enumerate(specs):
        units, done, faulted, bad, span = stop["steps"][k]
        rep = RunReport(stage=spec.name, units=int(units), done=int(done), faulted=int(faulted),
                        bad_quality=int(bad), wall_s=float(span),
                        exit_code=1 if faulted else 0, busy_s=float(seconds[k, 0]),
                        wait_s=float(seconds[k, 1]), unit_wait_s=float(seconds[k, 2]))
        report.stages.append(rep)
        if stop["groups"][k]:
            report.groups[spec.name] = {int(g): int(n) for g, n in stop["groups"][k].items()}
        _gather_seconds(world, report, rep, float(seconds[k, 3]), float(seconds[k, 4]))
    _gather_seconds(world, report, RunReport(stage="*", idle_s=idle),
                    time.process_time() - cpu0 - float(seconds[:, 3].sum()),
                    runqueue_s() - rq0 - float(seconds[:, 4].sum()))
    report.wall_s = time.time() - t0
    return report


# ------------------------------------------------------------------------------ summary

def summarise(ledger: Ledger, report: CampaignReport | None = None) -> dict[str, Any]:
    """The figures a user looks at first, from the ledger (and this job's timings)."""
    out: dict[str, Any] = {"stages": {}, "faults": [], "quality": [], "science": {}}
    for spec in PIPELINE:
        for table in spec.tables:
            if ledger.nrows(table):
                out["stages"][table] = ledger.counts(table)
    for table in TABLES:
        n = ledger.nrows(table)
        if not n or TABLES[table].kind != "element":
            continue
        fault = ledger.column(table, "fault")
        quality = ledger.column(table, "quality")
        state = ledger.column(table, "state")
        msg = ledger.column(table, "message")
        for kind, sel in (("faults", fault != 0), ("quality", (quality != 0) & (state == State.DONE))):
            rows = np.flatnonzero(sel)
            texts = ledger.message_text(msg[rows]) if rows.size else []
            reasons: dict[str, int] = {}
            for t in texts:
                reasons[t] = reasons.get(t, 0) + 1
            for text, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
                out[kind].append({"table": table, "count": count, "reason": text or "-"})
    if report is not None:
        out.update(_timings(report))
    out["science"] = _science(ledger)
    return out


def _timings(report: CampaignReport) -> dict[str, Any]:
    """Per-stage timings and where the ranks' time went (seconds summed over ranks).

    Per stage: ``busy_s`` inside units, ``wait_s`` blocked in collectives (of which
    ``unit_wait_s`` inside units), ``idle_s`` waiting for the coordinator, ``compute_s`` =
    busy - unit_wait. The job's fractions of ranks x wall time are disjoint: compute, wait,
    idle and other (rank 0 defining and completing while the others wait is in wait; starting
    stages, imports and ledger writes on rank 0 are in other).

    On shared cores the wall times include other jobs' share. ``runqueue_s`` (per stage,
    summed over ranks) is the time the ranks' main threads were runnable without a core;
    ``runqueue_fraction`` its share of ranks x wall; ``dedicated_wall_s`` estimates the wall
    time on dedicated cores as the sum over stages of (stage wall - the ranks' mean run-queue
    time) (overlap: job wall - mean run-queue time); it is an underestimate of the gain,
    since a rank waiting for a descheduled peer sleeps rather than queues. CPU seconds
    (``cpu_s`` per stage and job, summed over ranks; ``cpu_max_s`` the busiest rank's) do not
    count other jobs either: ``cpu_critical_s``, the sum over stages of the busiest rank's CPU
    (overlap: the busiest rank's total), is the lower bound of the wall time on dedicated
    cores (it ignores waits for peers).
    """
    timings: dict[str, Any] = {}
    total = np.zeros(6)
    rank_cpu = np.zeros(report.nranks)
    rank_rq = np.zeros(report.nranks)
    critical = 0.0
    dedicated = 0.0
    for r in report.stages:
        per_rank = report.rank_seconds.get(r.stage)
        if per_rank is None:  # not rank 0: this rank's figures only
            per_rank = np.array([[r.busy_s, r.wait_s, r.idle_s, r.unit_wait_s, 0.0, 0.0]])
        sums = per_rank.sum(axis=0)
        total += sums
        if per_rank.shape[0] == rank_cpu.size:
            rank_cpu += per_rank[:, 4]
            rank_rq += per_rank[:, 5]
        critical += float(per_rank[:, 4].max())
        dedicated += max(0.0, r.wall_s - float(per_rank[:, 5].mean()))
        timings[r.stage] = {"wall_s": round(r.wall_s, 2), "units": r.units, "done": r.done,
                            "faulted": r.faulted, "busy_s": round(float(sums[0]), 2),
                            "compute_s": round(float(sums[0] - sums[3]), 2),
                            "wait_s": round(float(sums[1]), 2),
                            "unit_wait_s": round(float(sums[3]), 2),
                            "idle_s": round(float(sums[2]), 2),
                            "cpu_s": round(float(sums[4]), 2),
                            "cpu_max_s": round(float(per_rank[:, 4].max()), 2),
                            "runqueue_s": round(float(sums[5]), 2)}
    if "*" in report.rank_seconds:
        total += report.rank_seconds["*"].sum(axis=0)
        rank_cpu += report.rank_seconds["*"][:, 4]
        rank_rq += report.rank_seconds["*"][:, 5]
    if report.mode == "overlap":  # stages run at once: the busiest rank bounds the job
        critical = float(rank_cpu.max()) if rank_cpu.size else 0.0
        dedicated = max(0.0, report.wall_s - float(rank_rq.mean()) if rank_rq.size else 0.0)
    else:  # time outside the stages (none today) counts as is
        dedicated += max(0.0, report.wall_s - sum(r.wall_s for r in report.stages))
    rank_s = max(report.nranks * report.wall_s, 1e-9)
    compute, wait, idle = total[0] - total[3], total[1], total[2]
    for stage, sizes in report.groups.items():
        if stage in timings:
            timings[stage]["ranks_per_unit"] = {str(g): n for g, n in sorted(sizes.items())}
    return {"timings": timings, "wall_s": round(report.wall_s, 2), "mode": report.mode,
            "ranks": report.nranks, "cpu_s": round(float(total[4]), 2),
            "cpu_critical_s": round(critical, 2),
            "runqueue_fraction": round(float(total[5] / rank_s), 4),
            "dedicated_wall_s": round(dedicated, 2),
            "compute_fraction": round(float(compute / rank_s), 4),
            "wait_fraction": round(float(wait / rank_s), 4),
            "idle_fraction": round(float(idle / rank_s), 4),
            "other_fraction": round(float(1.0 - (compute + wait + idle) / rank_s), 4)}


def _median(ledger: Ledger, table: str, column: str) -> float | None:
    if not ledger.nrows(table):
        return None
    ok = (ledger.column(table, "state") == State.DONE) & (ledger.column(table, "quality") == 0)
    vals = ledger.column(table, column)[ok].astype(float)
    vals = vals[np.isfinite(vals) & (vals >= 0)]
    return round(float(np.median(vals)), 4) if vals.size else None


def _science(ledger: Ledger) -> dict[str, Any]:
    sci = {
        "exposures_registered": int(np.count_nonzero(ledger.column("rawExp", "state") == State.DONE))
        if ledger.nrows("rawExp") else 0,
        "raw_mean_adu_median": _median(ledger, "rawImfile", "mean"),
        "fwhm_arcsec_median": _median(ledger, "chipProcessedImfile", "fwhm_major"),
        "sources_per_chip_median": _median(ledger, "chipProcessedImfile", "n_sources"),
        "astrom_rms_mas_median": _median(ledger, "camProcessedExp", "astrom_rms_mas"),
        "zero_point_median": _median(ledger, "camProcessedExp", "zero_point"),
        "stack_depth_5sigma_median": _median(ledger, "stackSumSkyfile", "depth_5sigma"),
    }
    return {k: v for k, v in sci.items() if v is not None}


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["", "=== campaign summary ===", "",
             f"{'table':<22}{'total':>8}{'done':>8}{'new':>8}{'run':>6}{'drop':>6}{'faulted':>9}{'badqual':>9}"]
    for table, c in summary["stages"].items():
        lines.append(f"{table:<22}{c['total']:>8}{c['done']:>8}{c['new']:>8}{c['run']:>6}"
                     f"{c['drop']:>6}{c['faulted']:>9}{c['bad_quality']:>9}")
    if summary.get("timings"):
        lines += ["", f"timings (this job, {summary.get('mode', 'sequential')}, "
                      f"{summary.get('ranks', 1)} ranks; busy/wait/idle summed over ranks):"]
        for stage, t in summary["timings"].items():
            lines.append(f"  {stage:<12} {t['wall_s']:>8.1f} s  {t['done']} done, "
                         f"{t['faulted']} faulted of {t['units']} units; compute "
                         f"{t.get('compute_s', 0.0):.1f} s, wait {t.get('wait_s', 0.0):.1f} s, "
                         f"idle {t.get('idle_s', 0.0):.1f} s"
                         + "".join(f"; {n} units on {g} ranks"
                                   for g, n in t.get("ranks_per_unit", {}).items()))
        lines.append(f"  {'total':<12} {summary['wall_s']:>8.1f} s")
        if "compute_fraction" in summary:
            lines.append(f"  of the ranks' time: {100 * summary['compute_fraction']:.1f}% "
                         f"computing in units, {100 * summary['wait_fraction']:.1f}% waiting in "
                         f"collectives, {100 * summary['idle_fraction']:.1f}% waiting for work, "
                         f"{100 * summary['other_fraction']:.1f}% other")
        if summary.get("runqueue_fraction", 0.0) > 0.01:
            lines.append(f"  shared cores: the ranks waited for a core "
                         f"{100 * summary['runqueue_fraction']:.1f}% of the time; on dedicated "
                         f"cores about {summary['dedicated_wall_s']:.1f} s")
    for kind, title in (("faults", "faults"), ("quality", "bad-quality items")):
        if summary[kind]:
            lines += ["", f"{title}:"]
            shown: dict[str, int] = {}
            for item in summary[kind]:
                n = shown.get(item["table"], 0)
                shown[item["table"]] = n + 1
                if n < 5:
                    lines.append(f"  {item['table']:<20} x{item['count']:<4} {item['reason']}")
            for table, n in shown.items():
                if n > 5:
                    lines.append(f"  {table:<20} ... and {n - 5} more reasons "
                                 f"(`ps1mpi ledger faults` / summary.json list them all)")
    if summary["science"]:
        lines += ["", "science:"]
        for key, val in summary["science"].items():
            lines.append(f"  {key:<28} {val}")
    return "\n".join(lines)
