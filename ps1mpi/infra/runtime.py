"""The SPMD runtime: hands work units to ranks, records what they did, never hangs.

Shape of a stage run (see ``docs/runtime.md``)::

    rank 0 (main thread)            rank 0 (coordinator thread)        ranks 1..N-1
    stage.define(ledger)  ---------------------------------------------------------------
    stage.units(ledger)   -> units sorted by HEALPix nested index of (ra, dec)
                             hands out contiguous region blocks, guided sizes;
    worker loop  <-------->  records RUN/DONE/fault in the ledger  <--------> worker loop
    stage.complete(ledger)   (the only writer of the ledger)

- Work units are ordered by sky region (HEALPix nested index of their centre) and handed out
  in contiguous blocks whose cost shrinks as the work runs out (guided self-scheduling), pulled
  by ranks when they need more: this keeps a rank's inputs together and absorbs imbalance.
- The coordinator is a thread on rank 0, so rank 0 works too (measured in
  ``ps1mpi bench coordinator`` and ``docs/runtime.md``); its ledger writes are batched.
- Stages with ``group_size > 1`` run each unit on a group of ranks (a sub-communicator): the
  group leader talks to the coordinator and broadcasts the unit to its group.
- An exception in a unit becomes a fault code on that element; the rank goes on. A unit that
  runs past its timeout raises :class:`UnitTimeout` (fault 6). A rank that stops answering is
  written off after its deadline; the job still ends, with one exit code that every live rank
  receives from the coordinator.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import healpy as hp
import numpy as np
from mpi4py import MPI

from .ledger import Ledger
from .schema import TABLES, Fault, State
from .world import CollectiveTimeout, World

if TYPE_CHECKING:
    from ..stages.base import Stage, StageContext

__all__ = ["WorkUnit", "Outcome", "UnitTimeout", "DataError", "ConfigError", "run_units",
           "region_order", "fault_code", "RunReport"]

log = logging.getLogger("ps1mpi.runtime")

TAG_REQUEST = 11
TAG_REPLY = 12
HEALPIX_NSIDE = 1 << 12  # ~0.86 arcmin pixels: finer than any unit of work


class UnitTimeout(RuntimeError):
    """A work unit ran past its timeout (fault 6)."""
    fault = Fault.TIMEOUT


class DataError(RuntimeError):
    """The input data are unusable in a way that a retry may fix (fault 5)."""
    fault = Fault.DATA


class ConfigError(RuntimeError):
    """The configuration (recipe, campaign) is wrong (fault 3)."""
    fault = Fault.CONFIG


def fault_code(err: BaseException) -> int:
    """The IPP fault code for an exception raised by a work unit."""
    code = getattr(err, "fault", None)
    if code is not None:
        return int(code)
    if isinstance(err, (CollectiveTimeout, TimeoutError)):
        return Fault.TIMEOUT
    if isinstance(err, (OSError, MemoryError)):
        return Fault.SYSTEM
    if isinstance(err, (TypeError, AttributeError, NameError, IndexError, KeyError, ValueError,
                        AssertionError, ZeroDivisionError, NotImplementedError)):
        return Fault.PROGRAMMING
    return Fault.UNKNOWN


@dataclass
class WorkUnit:
    """One unit of work: an element row of a ledger table, with its sky position and cost."""

    table: str
    row: int
    name: str
    ra: float
    dec: float
    cost: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What processing a unit produced: quality (0 = good data), a reason, summary metadata
    (keys are columns of the element table)."""

    quality: int = 0
    message: str = ""
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunReport:
    """What a stage run did, identical on every rank at the end."""

    stage: str
    units: int = 0
    done: int = 0
    faulted: int = 0
    bad_quality: int = 0
    wall_s: float = 0.0
    exit_code: int = 0
    busy_s: float = 0.0  # seconds this rank spent inside units
    wait_s: float = 0.0  # seconds this rank was blocked in its group's collectives
    idle_s: float = 0.0  # seconds this rank (a group leader) waited for the coordinator
    unit_wait_s: float = 0.0  # the part of wait_s spent inside units (also in busy_s)


def region_index(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """HEALPix nested index of each position (the sky-region key; the largest int64 for a
    position that is not finite)."""
    ra = np.asarray(ra, float)
    dec = np.asarray(dec, float)
    ok = np.isfinite(ra) & np.isfinite(dec)
    pix = np.full(ra.shape, np.iinfo(np.int64).max, np.int64)
    if ok.any():
        pix[ok] = hp.ang2pix(HEALPIX_NSIDE, ra[ok], dec[ok], nest=True, lonlat=True)
    return pix


def region_order(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Indices that sort positions by their HEALPix nested index (sky-region order); equal
    indices keep their input order."""
    pix = region_index(ra, dec)
    return np.lexsort((np.arange(pix.size), pix))


# ------------------------------------------------------------------------------ coordinator

class _Coordinator:
    """Runs in a thread of rank 0: the only code that writes the ledger during a stage."""

    def __init__(self, comm: MPI.Intracomm, ledger: Ledger, units: list[WorkUnit],
                 leaders: list[int], *, timeout: float, flush_s: float = 0.5,
                 progress_s: float = 10.0, stage: str = ""):
        self.comm = comm
        self.ledger = ledger
        order = region_order(np.array([u.ra for u in units]), np.array([u.dec for u in units]))
        self.units = [units[i] for i in order]
        self.queue = deque(range(len(self.units)))
        self.remaining_cost = float(sum(u.cost for u in self.units))
        self.leaders = set(leaders)
        self.outstanding: dict[int, tuple[set[int], float]] = {}
        self.parked: list[int] = []
        self.dead: set[int] = set()
        self.timeout = timeout
        self.flush_s = flush_s
        self.progress_s = progress_s
        self.stage = stage
        self.done = 0
        self.faulted = 0
        self.bad_quality = 0
        self.t0 = time.time()
        self.error: BaseException | None = None
        self._buffer: list[tuple[WorkUnit, int, tuple]] = []
        self._last_flush = time.monotonic()
        self._last_progress = time.monotonic()

    # guided self-scheduling: a block's cost is a share of what remains
    def _next_block(self) -> list[int]:
        target = self.remaining_cost / (2.0 * max(1, len(self.leaders - self.dead)))
        block: list[int] = []
        cost = 0.0
        while self.queue and (not block or cost + self.units[self.queue[0]].cost <= target) \
                and len(block) < 4096:
            i = self.queue.popleft()
            block.append(i)
            cost += self.units[i].cost
        self.remaining_cost -= cost
        return block

    def _assign(self, rank: int) -> None:
        block = self._next_block()
        if not block:
            self.parked.append(rank)
            return
        units = [self.units[i] for i in block]
        by_table: dict[str, list[int]] = {}
        for u in units:
            by_table.setdefault(u.table, []).append(u.row)
        for table, rows in by_table.items():
            self.ledger.transition(table, rows, State.RUN, rank=rank)
        deadline = time.monotonic() + self.timeout * len(block) + 60.0
        self.outstanding[rank] = (set(block), deadline)
        self.comm.send({"units": [(i, self.units[i]) for i in block]}, dest=rank, tag=TAG_REPLY)

    def _record(self, rank: int, results: list[tuple]) -> None:
        held = self.outstanding.get(rank, (set(), 0.0))[0]
        for index, fault, quality, message, summary, t_start, duration in results:
            if index not in held:
                continue  # a late report from a rank already written off
            held.discard(index)
            unit = self.units[index]
            self._buffer.append((unit, rank, (fault, quality, message, summary, t_start, duration)))
            if fault:
                self.faulted += 1
            else:
                self.done += 1
                self.bad_quality += quality != 0
        if rank in self.outstanding:
            if held:  # progress refreshes the deadline of what the rank still holds
                self.outstanding[rank] = (held, time.monotonic() + self.timeout * len(held) + 60.0)
            else:
                del self.outstanding[rank]

    def _flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < self.flush_s and len(self._buffer) < 20000:
            return
        groups: dict[tuple, list] = {}
        for unit, rank, res in self._buffer:
            key = (unit.table, tuple(sorted(res[3])))
            groups.setdefault(key, []).append((unit, rank, res))
        for (table, keys), items in groups.items():
            spec = TABLES[table]
            unknown = [k for k in keys if k not in spec.column_names]
            rows = np.array([u.row for u, _, _ in items])
            fault = np.array([r[0] for _, _, r in items])
            message = [r[2] for _, _, r in items]
            if unknown:
                fault[:] = Fault.PROGRAMMING
                message = [f"stage reported unknown summary columns {unknown}"] * len(items)
                keys = ()
            summary = {k: np.array([r[3][k] for _, _, r in items]) for k in keys}
            self.ledger.transition(
                table, rows, State.DONE, fault=fault,
                quality=np.array([r[1] for _, _, r in items]),
                rank=np.array([rank for _, rank, _ in items]),
                t_start=np.array([r[4] for _, _, r in items]),
                duration=np.array([r[5] for _, _, r in items]),
                message=message, **summary)
        self._buffer.clear()
        self.ledger.flush()
        self._last_flush = now

    def _progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < self.progress_s:
            return
        self._last_progress = now
        total = len(self.units)
        finished = self.done + self.faulted
        elapsed = time.time() - self.t0
        rate = finished / elapsed if elapsed > 0 else 0.0
        left = (total - finished) / rate if rate > 0 else float("nan")
        log.info("progress %s: %d/%d units done (%d faulted), %.2f units/s, %.0f s left, "
                 "%d ranks busy", self.stage, finished, total, self.faulted, rate, left,
                 len(self.outstanding))

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for rank, (held, deadline) in list(self.outstanding.items()):
            if now > deadline:
                log.error("rank %d did not report within its deadline; its %d units are faulted "
                          "(timeout) and the rank is written off", rank, len(held))
                self._record(rank, [(i, Fault.TIMEOUT, 0, f"rank {rank} unresponsive past its "
                                     "deadline", {}, np.nan, np.nan) for i in held])
                self.dead.add(rank)
                self.outstanding.pop(rank, None)

    def serve(self) -> None:
        status = MPI.Status()
        delay = 2e-5
        try:
            while True:
                if self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_REQUEST, status=status):
                    src = status.Get_source()
                    msg = self.comm.recv(source=src, tag=TAG_REQUEST)
                    self._record(src, msg.get("results", []))
                    if msg.get("want") and src not in self.dead:
                        self._assign(src)
                    delay = 2e-5
                else:
                    time.sleep(delay)
                    delay = min(delay * 1.5, 0.005)
                self._flush()
                self._progress()
                self._check_deadlines()
                live = self.leaders - self.dead
                if not self.queue and not self.outstanding and set(self.parked) >= live:
                    break
            self._flush(force=True)
            self._progress(force=True)
        except BaseException as err:  # the coordinator must still release every rank
            self.error = err
            log.error("coordinator failed: %s\n%s", err, traceback.format_exc())
            self.queue.clear()
        finally:
            code = 1 if (self.faulted or self.error) else 0
            waiting = set(self.parked)
            # Ranks still asking (e.g. after a coordinator error) are released too.
            stop = {"stop": code, "done": self.done, "faulted": self.faulted,
                    "bad_quality": self.bad_quality, "units": len(self.units)}
            for rank in sorted(waiting | (self.leaders - self.dead - waiting)):
                if rank not in waiting:
                    # it has a request in flight or will send one: drain until it asks
                    self._drain_until_request(rank)
                self.comm.send(stop, dest=rank, tag=TAG_REPLY)
            self.exit_code = code

    def _drain_until_request(self, rank: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.comm.Iprobe(source=rank, tag=TAG_REQUEST):
                msg = self.comm.recv(source=rank, tag=TAG_REQUEST)
                if msg.get("want"):
                    return
            time.sleep(0.001)


# ------------------------------------------------------------------------------ worker

def _alarm(signum, frame):
    raise UnitTimeout("work unit exceeded its timeout")


def _run_one(stage: "Stage", unit: WorkUnit, ctx: "StageContext", timeout: float) -> tuple:
    """Process one unit on this rank; every failure becomes a fault code, never an escape."""
    t0 = time.time()
    in_main = threading.current_thread() is threading.main_thread()
    if in_main and timeout > 0:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        outcome = stage.process(unit, ctx)
        fault, quality, message, summary = 0, int(outcome.quality), outcome.message, outcome.summary
    except BaseException as err:  # noqa: BLE001 - every failure of a unit is recorded
        if isinstance(err, KeyboardInterrupt):
            raise
        fault = fault_code(err)
        quality, summary = 0, {}
        message = f"{type(err).__name__}: {err}"
        ctx.log.error("unit %s failed (fault %d): %s\n%s", unit.name, fault, message,
                      traceback.format_exc())
    finally:
        if in_main and timeout > 0:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    return fault, quality, message[:240], summary, t0, time.time() - t0


def _worker(stage: "Stage", ctx: "StageContext", ctl: MPI.Intracomm, group: World,
            timeout: float, report_s: float = 0.25) -> tuple[dict, float, float, float]:
    """The loop every rank runs: leaders pull blocks from the coordinator, groups follow.

    Returns the coordinator's stop message, the seconds spent in units, the seconds spent
    waiting for the coordinator's replies and the seconds blocked in collectives inside units.
    """
    leader = group.rank == 0
    busy = 0.0
    idle = 0.0
    unit_wait = 0.0
    results: list[tuple] = []
    last_report = time.monotonic()
    while True:
        if leader:
            ctl.send({"results": results, "want": True}, dest=0, tag=TAG_REQUEST)
            results = []
            t_ask = time.monotonic()
            reply = _receive(ctl, source=0, tag=TAG_REPLY)
            last_report = time.monotonic()
            idle += last_report - t_ask
        else:
            reply = None
        if group.size > 1:
            reply = group.bcast_object(reply, root=0)
        if "stop" in reply:
            return reply, busy, idle, unit_wait
        for index, unit in reply["units"]:
            wait0 = group.wait_s
            res = _run_one(stage, unit, ctx, timeout)
            unit_wait += group.wait_s - wait0
            if group.size > 1:  # the group agrees: one failed member faults the unit
                worst = group.allreduce(np.array([res[0]], np.int32), op="max")[0]
                if worst and not res[0]:
                    res = (int(worst), 0, "a peer in the group failed", {}, res[4], res[5])
            busy += res[5]
            results.append((index,) + res)
            if leader and time.monotonic() - last_report > report_s:
                ctl.send({"results": results, "want": False}, dest=0, tag=TAG_REQUEST)
                results = []
                last_report = time.monotonic()


def _receive(comm: MPI.Intracomm, *, source: int, tag: int):
    """Receive a (small, pickled) control message, polling so a waiting rank sleeps."""
    delay = 2e-5
    while not comm.Iprobe(source=source, tag=tag):
        time.sleep(delay)
        delay = min(delay * 1.5, 0.005)
    return comm.recv(source=source, tag=tag)


def run_units(stage: "Stage", ctx: "StageContext", ledger: Ledger | None,
              units: list[WorkUnit] | None) -> RunReport:
    """Process ``units`` (given on rank 0; None elsewhere) on every rank of ``ctx.world``.

    Collective over the world. Rank 0 passes the open writable ledger. Returns the same
    report on every rank.
    """
    world = ctx.world
    t0 = time.time()
    timeout = float(ctx.recipe.get("runtime.unit_timeout_s"))
    group_size = max(1, int(getattr(stage, "group_size", 1)))
    color = world.rank // group_size
    group = world.split(color)
    leaders = list(range(0, world.size, group_size))
    ctl = world.comm.Dup()
    coordinator = None
    thread = None
    if world.rank == 0:
        coordinator = _Coordinator(ctl, ledger, units or [], leaders, timeout=timeout,
                                   flush_s=float(ctx.recipe.get("runtime.ledger_flush_s")),
                                   progress_s=float(ctx.recipe.get("runtime.progress_s")),
                                   stage=stage.name)
        thread = threading.Thread(target=coordinator.serve, name="coordinator", daemon=True)
        thread.start()
    sub_ctx = ctx.with_group(group)
    stop, busy, idle, unit_wait = _worker(stage, sub_ctx, ctl, group, timeout)
    if thread is not None:
        thread.join()
        if coordinator.error is not None:
            log.error("coordinator error: %s", coordinator.error)
    group.free()
    ctl.Free()
    return RunReport(stage=stage.name, units=int(stop["units"]), done=int(stop["done"]),
                     faulted=int(stop["faulted"]), bad_quality=int(stop["bad_quality"]),
                     wall_s=time.time() - t0, exit_code=int(stop["stop"]), busy_s=busy,
                     wait_s=group.wait_s, idle_s=idle, unit_wait_s=unit_wait)
