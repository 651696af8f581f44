"""The campaign's overlapping mode (``run_campaign(..., overlap=True)``, ``--overlap``).

A toy three-stage pipeline runs the same ledger in both modes under ``mpiexec -n 3`` (this
file is also the MPI job: ``python tests/test_campaign_overlap.py --ledger ...``):

- ``toychip`` (one rank per unit): sleeps, writes one product per chip; a chip named
  ``...-RAISE`` faults, which must block its exposure downstream;
- ``toycam`` (``group_size = 2``, streams): one unit per exposure whose chipRun is DONE, run by
  a gang of two ranks that exchange the chips' products by buffer collectives;
- ``toystack`` (one rank, does not stream): defined, like the real stack, from whatever
  exposures are calibrated when it is asked; it must see all of them in both modes.

The slow test runs the real ``tiny`` campaign in both modes and compares every FITS product.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from ps1mpi.campaign import effective_group_size  # noqa: E402
from ps1mpi.infra.ledger import Ledger  # noqa: E402
from ps1mpi.infra.products import atomic_output, data_digests  # noqa: E402
from ps1mpi.infra.schema import State  # noqa: E402
from ps1mpi.stages.base import Outcome, Stage, WorkUnit  # noqa: E402

N_EXP = 6
CHIPS = ("c0", "c1", "c2", "c3")
CHIP_SLEEP = 0.1


# ------------------------------------------------------------------------------ toy stages

class ToyChip(Stage):
    name = "toychip"
    run_table = "chipRun"
    element_table = "chipProcessedImfile"
    outputs = {"out": "toy/chip/{exp}.{chip}.txt"}

    def units(self, ledger, ctx):
        units = super().units(ledger, ctx)
        for u in units:
            row = ledger.read(self.element_table, [u.row], ["exp_name", "chip"])
            u.info = {"exp": row["exp_name"][0].decode(), "chip": row["chip"][0].decode()}
        return units

    def process(self, unit: WorkUnit, ctx) -> Outcome:
        if unit.info["chip"].endswith("RAISE"):
            raise OSError(f"simulated disk failure on {unit.info['exp']}.{unit.info['chip']}")
        time.sleep(CHIP_SLEEP)
        with atomic_output(self.product_path(ctx, "out", **unit.info)) as tmp:
            tmp.write_text(f"{unit.info['exp']} {unit.info['chip']} {7 * len(unit.info['chip'])}\n")
        return Outcome(summary={"n_sources": 7})


class ToyCamera(Stage):
    name = "toycam"
    run_table = "camRun"
    element_table = "camProcessedExp"
    outputs = {"out": "toy/cam/{exp}.txt"}
    group_size = 2

    def define(self, ledger, ctx) -> int:
        state = ledger.column("chipRun", "state")
        ready = np.flatnonzero((state == State.DONE) & (ledger.column("chipRun", "quality") == 0))
        if ledger.nrows(self.run_table):
            ready = ready[~np.isin(ready, ledger.column(self.run_table, "chip_run"))]
        if ready.size == 0:
            return 0
        names = ledger.column("chipRun", "exp_name", ready)
        runs = ledger.append(self.run_table, ready.size, exp_name=names, chip_run=ready)
        ledger.transition(self.run_table, runs, State.RUN)
        rows = ledger.append(self.element_table, ready.size, run=runs, exp_name=names,
                             ra=np.full(ready.size, 10.0), dec=np.full(ready.size, 5.0))
        ledger.transition(self.element_table, rows, State.NEW)
        return int(ready.size)

    def units(self, ledger, ctx):
        units = super().units(ledger, ctx)
        for u in units:
            u.info = {"exp": ledger.column(self.element_table, "exp_name", [u.row])[0].decode()}
        return units

    def process(self, unit: WorkUnit, ctx) -> Outcome:
        group = ctx.world
        exp = unit.info["exp"]
        text = None
        if group.rank == 0:
            paths = sorted((ctx.root / "toy" / "chip").glob(f"{exp}.*.txt"))
            text = np.frombuffer("".join(p.read_text() for p in paths).encode(), np.uint8)
        text = group.bcast_array(text).tobytes().decode()
        size = int(group.allreduce(np.array([1], np.int64))[0])
        if group.rank == group.size - 1:  # a non-leader writes: the gang really shares the unit
            with atomic_output(self.product_path(ctx, "out", exp=exp)) as tmp:
                tmp.write_text(f"calibrated {exp}\n{text}")
        return Outcome(summary={"n_chips": size})


class ToyStack(Stage):
    name = "toystack"
    run_table = "stackRun"
    element_table = "stackSumSkyfile"
    outputs = {"out": "toy/stack/all.txt"}

    def define(self, ledger, ctx) -> int:
        if ledger.nrows(self.run_table) or not ledger.nrows("camRun"):
            return 0
        if not np.any(ledger.column("camRun", "state") == State.DONE):
            return 0
        run = ledger.append(self.run_table, 1, skycell="all", filter="r", kind="deep",
                            label="all", ra=10.0, dec=5.0)
        ledger.transition(self.run_table, run, State.RUN)
        row = ledger.append(self.element_table, 1, run=run[0], skycell="all", filter="r",
                            kind="deep", label="all", ra=10.0, dec=5.0)
        ledger.transition(self.element_table, row, State.NEW)
        return 1

    def units(self, ledger, ctx):
        units = super().units(ledger, ctx)
        done = ledger.column("camRun", "state") == State.DONE
        inputs = sorted(n.decode() for n in ledger.column("camRun", "exp_name")[done])
        for u in units:
            u.info = {"inputs": inputs}
        return units

    def process(self, unit: WorkUnit, ctx) -> Outcome:
        with atomic_output(self.product_path(ctx, "out")) as tmp:
            tmp.write_text("\n".join(unit.info["inputs"]) + "\n")
        return Outcome(summary={"n_inputs": len(unit.info["inputs"])})


class BrokenDefine(ToyStack):
    def define(self, ledger, ctx) -> int:
        raise ValueError("toy define failure")


def _pipeline(broken: bool = False):
    from ps1mpi.campaign import StageSpec

    last = BrokenDefine if broken else ToyStack
    return (StageSpec("toychip", __name__, lambda c, r: ToyChip(), streams=True),
            StageSpec("toycam", __name__, lambda c, r: ToyCamera(), streams=True),
            StageSpec("toystack", __name__, lambda c, r: last()))


def _job(argv: list[str]) -> int:
    """The MPI job: the toy pipeline over the ledger, sequential or overlapping."""
    import argparse

    from ps1mpi.campaign import CampaignDefinition, run_campaign, summarise
    from ps1mpi.infra.config import load_recipe
    from ps1mpi.infra.world import World

    p = argparse.ArgumentParser()
    p.add_argument("--ledger", type=Path, required=True)
    p.add_argument("--overlap", action="store_true")
    p.add_argument("--broken", action="store_true")
    p.add_argument("--gang-min-units", type=int, default=None)
    p.add_argument("--groups", default="adaptive")
    args = p.parse_args(argv)
    world = World.from_mpi()
    # the toy's units take 0.1 s: record and look for new work at that pace too
    recipe = load_recipe([], ["runtime.retry_cap=0", "runtime.log_level=WARNING",
                              "runtime.ledger_flush_s=0.05"])
    ledger = Ledger.open(args.ledger, "a") if world.rank == 0 else None
    try:
        report = run_campaign(world, ledger=ledger, root=args.ledger.parent,
                              ledger_path=args.ledger, recipe=recipe,
                              campaign=CampaignDefinition(), overlap=args.overlap,
                              groups=args.groups,
                              pipeline=_pipeline(args.broken),
                              overlap_options={"refresh_s": 0.05} if args.gang_min_units is None
                              else {"refresh_s": 0.05, "gang_min_units": args.gang_min_units})
    except RuntimeError as err:
        print(f"rank {world.rank} error: {err}", flush=True)
        return 2
    if world.rank == 0:
        summary = summarise(ledger, report)
        ledger.close()
        print("SUMMARY " + json.dumps({k: summary[k] for k in ("timings", "mode", "ranks",
                                                               "wait_fraction")}))
        print("GROUPS " + json.dumps({k: v for k, v in report.groups.items()}))
    return report.exit_code


# ------------------------------------------------------------------------------ tests

def _make_ledger(path: Path, raise_chip: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    with Ledger.create(path) as led:  # exposures 1 degree apart: region order keeps them whole
        for e in range(N_EXP):
            exp = f"exp{e}"
            run = led.append("chipRun", 1, exp_name=exp, nchips=len(CHIPS))
            led.transition("chipRun", run, State.RUN)
            chips = [f"{c}-RAISE" if f"{exp}.{c}" == raise_chip else c for c in CHIPS]
            rows = led.append("chipProcessedImfile", len(CHIPS), run=run[0], exp_name=exp,
                              chip=chips, ra=10.0 + e + rng.uniform(0, 0.01, len(CHIPS)),
                              dec=5.0 + rng.uniform(0, 0.01, len(CHIPS)))
            led.transition("chipProcessedImfile", rows, State.NEW)


def _run(nranks: int, ledger: Path, *extra: str, timeout: float = 120):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(["mpiexec", "-n", str(nranks), sys.executable, str(HERE), "--ledger",
                           str(ledger)] + list(extra), capture_output=True, text=True, env=env,
                          timeout=timeout)


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted((root / "toy").rglob("*.txt"))}


def _spans(led: Ledger, table: str) -> tuple[np.ndarray, np.ndarray]:
    ok = led.column(table, "state") == State.DONE
    start = led.column(table, "t_start")[ok]
    return start, start + led.column(table, "duration")[ok]


@pytest.mark.mpi
def test_overlap_gives_sequential_products_with_gangs_and_a_barrier(tmp_path):
    bad = "exp2.c1"
    outputs = {}
    for mode in ("sequential", "overlap"):
        ledger = tmp_path / mode / "ledger.h5"
        _make_ledger(ledger, raise_chip=bad)
        # the recipe's group sizes; in overlap a gang is formed as soon as one toycam unit
        # is ready
        proc = _run(3, ledger, "--groups", "recipe",
                    *(["--overlap", "--gang-min-units", "1"] if mode == "overlap" else []))
        assert proc.returncode == 1, proc.stdout + proc.stderr  # the faulted chip: exit 1
        summary = json.loads(proc.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
        assert summary["mode"] == mode and summary["ranks"] == 3
        t = summary["timings"]
        assert (t["toychip"]["done"], t["toychip"]["faulted"]) == (N_EXP * len(CHIPS) - 1, 1)
        assert t["toycam"]["done"] == N_EXP - 1 and t["toystack"]["done"] == 1
        outputs[mode] = _files(ledger.parent)
        with Ledger.open(ledger) as led:
            for table in ("chipProcessedImfile", "camProcessedExp", "stackSumSkyfile"):
                ev = led.events(table=table)
                runs = np.sort(ev["row"][ev["state"] == State.RUN])
                assert list(runs) == list(range(led.nrows(table))), table  # each unit once
            gangs = list(led.column("camProcessedExp", "n_chips"))
            if mode == "overlap":  # every toycam unit was run by a gang of group_size = 2
                assert gangs == [2] * (N_EXP - 1)
            else:  # ranks 0-1 form a group, rank 2 is a group of one on its own
                assert set(gangs) <= {1, 2} and len(gangs) == N_EXP - 1
            names = [n.decode() for n in led.column("camRun", "exp_name")]
            assert "exp2" not in names  # the faulted chip blocks its exposure
            chip_start, chip_end = _spans(led, "chipProcessedImfile")
            cam_start, _ = _spans(led, "camProcessedExp")
            stack_start, _ = _spans(led, "stackSumSkyfile")
            _, cam_end = _spans(led, "camProcessedExp")
            if mode == "overlap":
                # a camera unit ran while chips were still being processed ...
                assert cam_start.min() < chip_end.max() - CHIP_SLEEP
            else:
                assert cam_start.min() >= chip_end.max()
            # ... but the stack waited for every exposure in both modes
            assert stack_start.min() >= max(cam_end.max(), chip_end.max())
    assert outputs["overlap"] == outputs["sequential"]
    stack = outputs["overlap"]["toy/stack/all.txt"].split()
    assert stack == [f"exp{e}" for e in range(N_EXP) if e != 2]
    assert len(outputs["overlap"]) == (N_EXP * len(CHIPS) - 1) + (N_EXP - 1) + 1


def test_effective_group_size():
    assert effective_group_size(2, 2, 17) == 1      # more units than ranks: one rank each
    assert effective_group_size(2, 8, 4) == 2       # ranks to spare: pairs
    assert effective_group_size(4, 8, 3) == 2       # 8 // 3
    assert effective_group_size(2, 8, 1) == 2       # never above group_size
    assert effective_group_size(2, 1, 1) == 1
    assert effective_group_size(2, 4, None) == 2    # unknown count: the recipe's size
    assert effective_group_size(2, 4, 0) == 2
    with pytest.raises(ValueError, match="group_size 0"):
        effective_group_size(0, 4, 3)


@pytest.mark.mpi
@pytest.mark.parametrize("overlap,nranks", [(False, 2), (True, 1), (True, 2)])
def test_adaptive_groups_and_one_rank(tmp_path, overlap, nranks):
    """Adaptive groups (the default): with more toycam units than ranks the sequential mode
    runs each on one rank; the overlapping mode pairs only ranks that are free anyway (both,
    when a unit is the only work left). A gang stage on one rank runs alone."""
    ledger = tmp_path / "ledger.h5"
    _make_ledger(ledger)
    proc = _run(nranks, ledger, *(["--overlap"] if overlap else []))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    groups = json.loads(proc.stdout.split("GROUPS ", 1)[1].splitlines()[0])["toycam"]
    with Ledger.open(ledger) as led:
        used = led.column("camProcessedExp", "n_chips")
        assert led.counts("stackSumSkyfile")["done"] == 1
    assert {int(g): n for g, n in groups.items()} == \
        {int(g): int(np.count_nonzero(used == g)) for g in np.unique(used)}
    if nranks == 1 or not overlap:
        assert groups == {"1": N_EXP}
    else:
        assert set(groups) <= {"1", "2"} and sum(groups.values()) == N_EXP
    stack = _files(ledger.parent)["toy/stack/all.txt"].split()
    assert stack == [f"exp{e}" for e in range(N_EXP)]


@pytest.mark.mpi
def test_a_failing_define_stops_every_rank_with_the_reason(tmp_path):
    ledger = tmp_path / "broken" / "ledger.h5"
    _make_ledger(ledger)
    proc = _run(2, ledger, "--overlap", "--broken")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for rank in (0, 1):
        assert f"rank {rank} error: overlapping campaign: ValueError: toy define failure" \
            in proc.stdout
    with Ledger.open(ledger) as led:  # what was done before the failure is recorded
        assert led.counts("chipProcessedImfile")["done"] == N_EXP * len(CHIPS)
        assert led.counts("chipProcessedImfile")["run"] == 0


# ------------------------------------------------------------------------------ the real thing

@pytest.mark.slow
@pytest.mark.mpi
def test_tiny_campaign_overlap_products_equal_sequential(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "ps1mpi", "sim", "--out", str(tmp_path / "sim"),
                    "--preset", "tiny", "--quiet"], check=True, env=env, capture_output=True,
                   timeout=600)
    digests = {}
    for mode in ("sequential", "overlap"):
        demo = tmp_path / mode
        shutil.copytree(tmp_path / "sim", demo / "sim")
        proc = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-m", "ps1mpi", "campaign",
                               "--demo", str(demo), "--preset", "tiny", "--no-report"]
                              + (["--overlap"] if mode == "overlap" else []),
                              capture_output=True, text=True, env=env, timeout=1200)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        summary = json.loads((demo / "summary.json").read_text())
        assert summary["mode"] == mode and summary["faults"] == []
        assert summary["timings"]["stack"]["done"] > 0
        digests[mode] = data_digests(demo)
    assert len(digests["sequential"]) > 100
    assert digests["overlap"] == digests["sequential"]


if __name__ == "__main__":
    sys.exit(_job(sys.argv[1:]))
