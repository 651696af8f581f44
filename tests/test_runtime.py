"""The SPMD runtime under mpiexec -n 1, 2 and 4, with a toy stage (tests/jobs/toy_stage.py)."""

import time
from pathlib import Path

import numpy as np
import pytest

from ps1mpi.infra.ledger import Ledger
from ps1mpi.infra.runtime import region_order
from ps1mpi.infra.schema import Fault, State

from .mpi_util import mpi_run

TOY = Path(__file__).parent / "jobs" / "toy_stage.py"


def make_ledger(path, kinds, seed=1):
    rng = np.random.default_rng(seed)
    n = len(kinds)
    with Ledger.create(path) as led:
        run = led.append("chipRun", 1, exp_name="e1", state=State.RUN)[0]
        led.append("chipProcessedImfile", n, run=run, exp_name="e1",
                   chip=[f"{k}-{i}" for i, k in enumerate(kinds)],
                   ra=rng.uniform(0, 360, n), dec=rng.uniform(-30, 80, n))


def test_region_order_groups_nearby_positions():
    rng = np.random.default_rng(0)
    ra = np.concatenate([rng.normal(10, 0.1, 50), rng.normal(200, 0.1, 50)])
    dec = np.concatenate([rng.normal(5, 0.1, 50), rng.normal(-20, 0.1, 50)])
    perm = rng.permutation(100)
    order = region_order(ra[perm], dec[perm])
    assert sorted(order) == list(range(100))
    groups = (perm[order] >= 50).astype(int)
    assert np.count_nonzero(np.diff(groups)) == 1  # the two regions are contiguous


@pytest.mark.parametrize("nranks", [1, 2, 4])
def test_every_unit_once_faults_and_quality(tmp_path, nranks):
    kinds = ["OK"] * 37 + ["BADQ", "RAISE"]
    make_ledger(tmp_path / "l.h5", kinds)
    proc = mpi_run(nranks, [TOY, "--ledger", tmp_path / "l.h5", "--set", "runtime.retry_cap=0"],
                   timeout=120)
    assert proc.returncode == 1, proc.stderr  # one fault -> exit code 1 on every rank
    assert "37 done" not in proc.stdout and "38 done (1 bad quality), 1 faulted of 39 units" in proc.stdout
    with Ledger.open(tmp_path / "l.h5") as led:
        state = led.column("chipProcessedImfile", "state")
        fault = led.column("chipProcessedImfile", "fault")
        quality = led.column("chipProcessedImfile", "quality")
        chip = led.column("chipProcessedImfile", "chip")
        assert fault[chip == b"RAISE-38"][0] == Fault.SYSTEM
        assert quality[chip == b"BADQ-37"][0] == 7
        assert np.all(state[fault == 0] == State.DONE)
        ev = led.events(table="chipProcessedImfile")
        # each unit was handed out exactly once (one RUN record per row)
        runs = ev["row"][ev["state"] == State.RUN]
        assert sorted(runs) == list(range(39))
        ranks = led.column("chipProcessedImfile", "rank")
        assert set(ranks) <= set(range(nranks))
        # the faulted run stays open: it blocks the stages after chip
        assert led.column("chipRun", "state", 0)[0] == State.RUN
    products = sorted(p.name for p in (tmp_path / "toy").iterdir())
    assert len(products) == 37 and not any(p.startswith(".") for p in products)
    # a second run with retries allowed redoes only the faulted unit, which fails again
    proc = mpi_run(nranks, [TOY, "--ledger", tmp_path / "l.h5"], timeout=120)
    assert "0 done (0 bad quality), 1 faulted of 1 units" in proc.stdout


def test_unit_timeout_becomes_fault_6(tmp_path):
    make_ledger(tmp_path / "l.h5", ["OK", "SLOW", "OK", "OK"])
    t0 = time.time()
    proc = mpi_run(2, [TOY, "--ledger", tmp_path / "l.h5", "--set", "runtime.unit_timeout_s=1"],
                   timeout=60)
    assert time.time() - t0 < 25
    assert proc.returncode == 1
    with Ledger.open(tmp_path / "l.h5") as led:
        chip = led.column("chipProcessedImfile", "chip")
        assert led.column("chipProcessedImfile", "fault")[chip == b"SLOW-1"][0] == Fault.TIMEOUT
        assert led.counts("chipProcessedImfile")["done"] == 3


def test_rank_exiting_abruptly_does_not_hang_and_restart_completes(tmp_path):
    make_ledger(tmp_path / "l.h5", ["OK"] * 10 + ["EXIT"] + ["OK"] * 10)
    t0 = time.time()
    proc = mpi_run(4, [TOY, "--ledger", tmp_path / "l.h5"], timeout=60)
    assert proc.returncode != 0
    assert time.time() - t0 < 30
    # the operator drops the poisonous unit; the restart does the missing work only
    with Ledger.open(tmp_path / "l.h5", "a") as led:
        chip = led.column("chipProcessedImfile", "chip")
        assert not np.any(led.column("chipProcessedImfile", "state") == State.RUN)
        led.transition("chipProcessedImfile", np.flatnonzero(chip == b"EXIT-10"), State.DROP)
        already = set(np.flatnonzero(led.column("chipProcessedImfile", "state") == State.DONE))
    proc = mpi_run(2, [TOY, "--ledger", tmp_path / "l.h5"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    with Ledger.open(tmp_path / "l.h5") as led:
        assert led.counts("chipProcessedImfile")["done"] == 20
        ev = led.events(table="chipProcessedImfile")
        for row in already:  # finished work was not redone
            assert np.count_nonzero((ev["row"] == row) & (ev["state"] == State.DONE)) == 1


@pytest.mark.parametrize("nranks", [2, 4])
def test_group_stage_uses_buffer_collectives(tmp_path, nranks):
    make_ledger(tmp_path / "l.h5", ["OK"] * 9)
    proc = mpi_run(nranks, [TOY, "--group", "--ledger", tmp_path / "l.h5"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    with Ledger.open(tmp_path / "l.h5") as led:
        n = led.column("chipProcessedImfile", "n_sources")
        assert list(n) == [3 * r for r in range(9)]  # row * (1 + 2): groups of two ranks
        ranks = set(led.column("chipProcessedImfile", "rank"))
        assert ranks <= set(range(0, nranks, 2))  # group leaders report
