import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from ps1mpi.infra.ledger import (Ledger, LedgerBusy, LedgerError, LedgerVersionError,
                                 clear_open_flags)
from ps1mpi.infra.schema import Fault, State
from ps1mpi.stages.base import close_finished_runs


def _exposure_with_chips(led, nchips=4, name="o1000g0001o"):
    run = led.append("chipRun", 1, exp_name=name, state=State.RUN, nchips=nchips)[0]
    rows = led.append("chipProcessedImfile", nchips, run=run, exp_name=name,
                      chip=[f"XY0{i}" for i in range(nchips)], ra=10.0, dec=20.0)
    return run, rows


def test_state_machine_faults_and_retry_cap(tmp_path):
    with Ledger.create(tmp_path / "l.h5") as led:
        run, rows = _exposure_with_chips(led)
        assert list(led.pending("chipProcessedImfile")) == list(rows)
        led.transition("chipProcessedImfile", rows, State.RUN, rank=1)
        assert led.pending("chipProcessedImfile").size == 0
        led.transition("chipProcessedImfile", rows[:2], State.DONE, rank=1, duration=2.0,
                       n_sources=[10, 20])
        led.transition("chipProcessedImfile", rows[2], State.DONE, quality=5, message="no stars")
        led.transition("chipProcessedImfile", rows[3], State.DONE, fault=Fault.SYSTEM,
                       message="disk full")
        # a fault sends the element back to NEW with its retry count raised
        assert led.column("chipProcessedImfile", "state", rows[3])[0] == State.NEW
        assert led.column("chipProcessedImfile", "nfault", rows[3])[0] == 1
        assert led.pending("chipProcessedImfile", retry_cap=0).size == 0
        assert list(led.pending("chipProcessedImfile", retry_cap=2)) == [rows[3]]
        led.transition("chipProcessedImfile", rows[3], State.DONE, fault=Fault.SYSTEM)
        assert led.pending("chipProcessedImfile", retry_cap=2).size == 0  # cap reached
        assert list(led.column("chipProcessedImfile", "n_sources", rows[:2])) == [10, 20]
        # history: every change with its message
        ev = led.events(table="chipProcessedImfile", rows=[rows[2]])
        assert [State(s) for s in ev["state"]] == [State.RUN, State.DONE]
        assert led.message_text(ev["message"])[-1] == "no stars"
        # revert clears the fault and the retry count
        reverted = led.revert("chipProcessedImfile")
        assert list(reverted) == [rows[3]]
        assert list(led.pending("chipProcessedImfile")) == [rows[3]]
        assert led.column("chipProcessedImfile", "nfault", rows[3])[0] == 0


def test_fault_blocks_run_and_bad_quality_run(tmp_path):
    with Ledger.create(tmp_path / "l.h5") as led:
        run_a, rows_a = _exposure_with_chips(led, name="a")
        run_b, rows_b = _exposure_with_chips(led, name="b")
        led.transition("chipProcessedImfile", rows_a, State.DONE)
        led.transition("chipProcessedImfile", rows_a[0], State.DONE, fault=Fault.SYSTEM)
        led.transition("chipProcessedImfile", rows_b, State.DONE, quality=3)
        closed = close_finished_runs(led, "chipRun", "chipProcessedImfile")
        # run a has a faulted chip: not done, so the camera stage cannot take it
        assert list(closed) == [run_b]
        assert led.column("chipRun", "state", run_a)[0] == State.RUN
        # run b is done but all its chips are bad: the run carries bad quality
        assert led.column("chipRun", "quality", run_b)[0] != 0
        led.transition("chipProcessedImfile", rows_a[0], State.DONE)
        assert list(close_finished_runs(led, "chipRun", "chipProcessedImfile")) == [run_a]
        assert led.column("chipRun", "quality", run_a)[0] == 0


def test_second_writer_refused_and_reader_allowed(tmp_path):
    path = tmp_path / "l.h5"
    led = Ledger.create(path)
    with pytest.raises(LedgerBusy, match="open for writing by another job"):
        Ledger.open(path, "a")
    with Ledger.open(path) as reader:
        assert reader.nrows("chipRun") == 0
    led.close()
    Ledger.open(path, "a").close()  # the lock is released on close


def test_version_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "l.h5"
    Ledger.create(path).close()
    with h5py.File(path, "a", libver="latest") as f:
        f["schema_version"][()] = 999
    with pytest.raises(LedgerVersionError, match="schema version 999"):
        Ledger.open(path)
    with pytest.raises(LedgerError, match="no ledger here"):
        Ledger.open(tmp_path / "missing.h5")


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from ps1mpi.infra.ledger import Ledger
    from ps1mpi.infra.schema import State
    led = Ledger.open(sys.argv[1], "a")
    i = 0
    print("ready", flush=True)
    while True:
        rows = led.append("rawImfile", 50, exp_name=f"e{i}", chip="XY01", run=i)
        led.transition("rawImfile", rows, State.RUN, rank=0)
        led.transition("rawImfile", rows[:25], State.DONE, rank=0, mean=np.arange(25.0))
        led.flush()
        i += 1
""")


def _start_writer(path, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_concurrent_reader_sees_consistent_state(tmp_path):
    path = tmp_path / "l.h5"
    Ledger.create(path).close()
    proc = _start_writer(path, tmp_path)
    try:
        seen = []
        for _ in range(15):
            with Ledger.open(path) as reader:
                state = reader.column("rawImfile", "state")
                n = state.size
                seen.append(n)
                # every flushed batch is 25 done + 25 run; a reader never sees a torn batch
                if n:
                    assert n % 50 == 0
                    assert np.count_nonzero(state == State.DONE) * 2 <= n
            time.sleep(0.05)
        assert seen == sorted(seen) and seen[-1] > 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.8, 1.5])
def test_sigkill_then_reopen_and_restart(tmp_path, delay):
    path = tmp_path / "l.h5"
    Ledger.create(path).close()
    proc = _start_writer(path, tmp_path)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Ledger.open(path, "a") as led:  # opens; stale RUN rows are reverted to NEW
        state = led.column("rawImfile", "state")
        assert not np.any(state == State.RUN)
        done = np.flatnonzero(state == State.DONE)
        assert np.all(led.column("rawImfile", "mean", done) >= 0)
        pending = led.pending("rawImfile")
        assert pending.size + done.size == state.size
        led.transition("rawImfile", pending, State.DONE)  # the restart does the rest
    with Ledger.open(path) as led:
        assert led.counts("rawImfile")["done"] == led.nrows("rawImfile")
    assert clear_open_flags(path) is False  # closed cleanly: nothing left to clear
