"""The batch scripts of jobs/ run a real campaign: under a real Slurm (a private one-node
cluster on localhost: munged, slurmctld, slurmd started here and stopped after), with both
launchers, through a requeue that must finish only what is missing; and the PBS script's
own logic (rank count, walltime stop, resubmission) outside PBS.

Needs Debian's slurmctld, slurmd, slurm-client and munge (installed by .ci/services.sh); the
Slurm tests are skipped, with the reason, where they are missing.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ps1mpi.infra.ledger import Ledger, LedgerError
from ps1mpi.infra.schema import TABLE_NAMES, State
from ps1mpi.sim.datastore import FaultSpec, start_datastore
from tests.slurm_util import REPO, LocalSlurm, repo_env, slurm_missing, small_night, write_night

SLURM_SCRIPT = REPO / "jobs" / "campaign.slurm"
PBS_SCRIPT = REPO / "jobs" / "campaign.pbs"
NIGHT = small_night(3)
N_CHIPS = 4 * len(NIGHT)  # testcam has 4 chips
MPIEXEC = subprocess.run(["which", "mpiexec"], capture_output=True, text=True).stdout.strip()

needs_slurm = pytest.mark.skipif(slurm_missing() is not None, reason=str(slurm_missing()))


@pytest.fixture(scope="module")
def slurm():
    with LocalSlurm() as cluster:
        yield cluster


@pytest.fixture()
def store(tmp_path):
    store = tmp_path / "datastore"
    write_night(store, NIGHT)
    return store


def campaign_env(camp: Path, url: str, **extra: str) -> dict[str, str]:
    env = {"PS1MPI_LEDGER": str(camp / "ledger.h5"), "PS1MPI_DATASTORE": url,
           "PS1MPI_UNTIL": "register", "PS1MPI_PYTHON": sys.executable,
           "PS1MPI_MPIEXEC": MPIEXEC}
    env.update(extra)
    return env


def assert_campaign_done(ledger_path: Path) -> None:
    with Ledger.open(ledger_path) as led:
        assert led.counts("summitImfile")["done"] == N_CHIPS
        assert led.counts("summitExp")["done"] == len(NIGHT)
        assert led.counts("rawImfile")["done"] == N_CHIPS
        raw = led.counts("rawExp")
        assert raw["done"] == raw["total"] == len(NIGHT) and raw["faulted"] == 0
        names = sorted(n.decode() for n in led.column("rawExp", "exp_name"))
        assert names == sorted(e["name"] for e in NIGHT)
        # the registered metadata is the data's: the exposure levels written into the raw files
        levels = dict(zip((n.decode() for n in led.column("rawExp", "exp_name")),
                          led.column("rawExp", "mean")))
    for exp in NIGHT:
        assert abs(levels[exp["name"]] - exp["level"]) < 1.0, (exp, levels)


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} missing)"


# ------------------------------------------------------------------------------ Slurm

@needs_slurm
def test_campaign_job_completes_with_srun(slurm, store, tmp_path):
    camp = tmp_path / "campaign"
    out = tmp_path / "job.out"
    with start_datastore(store) as ds:
        job = slurm.sbatch(SLURM_SCRIPT, "--ntasks-per-node=2", f"--output={out}",
                           "--time=00:10:00", f"--chdir={tmp_path}",
                           env=campaign_env(camp, ds.url, PS1MPI_LAUNCHER="srun",
                                            PS1MPI_MONITOR_S="1"))
        info = slurm.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"},
                          timeout=150)
    text = read(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    assert info["Restarts"] == "0" and info["NumTasks"] == "2", info
    assert "attempt 1: 2 ranks on 1 node(s)" in text and "walltime 10:00," in text, text
    assert "campaign complete" in text, text
    assert "srun --mpi=pmi2" in text, text
    # the campaign's own summary, printed by rank 0 into the job's output
    assert "=== campaign summary ===" in text, text
    assert re.search(r"exposures_registered\s+3\n", text), text
    assert_campaign_done(camp / "ledger.h5")
    # one log per rank in the job's log directory, both ranks of the job took part
    logdir = camp / "logs" / f"slurm-{job}"
    assert sorted(p.name for p in logdir.glob("campaign.rank*.log")) == \
        ["campaign.rank0000.log", "campaign.rank0001.log"]
    assert "register" in read(logdir / "campaign.rank0000.log")
    # the live monitor ran beside the campaign and wrote its page
    assert "wrote" in read(logdir / "monitor.log")
    assert (camp / "monitor" / "index.html").stat().st_size > 0
    assert (camp / "report" / "index.html").exists()


@needs_slurm
def test_requeue_before_walltime_finishes_only_what_is_missing(slurm, store, tmp_path):
    """USR1 (what Slurm sends 300 s before the walltime) stops the ranks mid-download; the job
    requeues itself and the second run downloads only the chips the ledger lacks."""
    camp = tmp_path / "campaign"
    ledger_path = camp / "ledger.h5"
    out = tmp_path / "job.out"
    slow = FaultSpec(slow_rate=1.0, slow_s=1.0, match="*.fits")  # 1 s per chip download
    with start_datastore(store, faults=slow) as ds:
        job = slurm.sbatch(SLURM_SCRIPT, "--ntasks-per-node=2", f"--output={out}",
                           "--time=00:10:00", f"--chdir={tmp_path}",
                           env=campaign_env(camp, ds.url, PS1MPI_LAUNCHER="mpiexec",
                                            PS1MPI_STOP_GRACE_S="20"))
        # wait until the first run has downloaded some but not all chips
        t0 = time.monotonic()
        done_before: np.ndarray = np.empty(0, int)
        while time.monotonic() - t0 < 90:
            if ledger_path.exists():
                try:
                    with Ledger.open(ledger_path) as led:
                        if led.nrows("summitImfile"):
                            done_before = np.flatnonzero(
                                led.column("summitImfile", "state") == State.DONE)
                except (OSError, LedgerError):  # the ledger is being created: try again
                    pass
            if done_before.size >= 5:
                break
            time.sleep(0.2)
        assert 5 <= done_before.size < N_CHIPS, (done_before, read(out))
        slurm.run(["scancel", "--signal=USR1", "--batch", str(job)])
        slurm.wait(job, {"PENDING"}, restarts=1, timeout=60)
        assert "requeueing (restart 1)" in read(out)
        # the requeued job starts again by itself once its old credential has expired
        info = slurm.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=150)
        served = ds.stats()
    text = read(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"{info}\n{text}\n{slurm.logs()}"
    assert info["Restarts"] == "1", info
    assert "attempt 1:" in text and "got USR1" in text and "attempt 2:" in text, text
    assert_campaign_done(ledger_path)
    summit = TABLE_NAMES.index("summitImfile")
    with Ledger.open(ledger_path) as led:
        events = led.events(table="summitImfile")
        assert events.size and np.all(events["table"] == summit)
        done_events = events[events["state"] == State.DONE]
        per_row = np.bincount(done_events["row"], minlength=N_CHIPS)
    # what the first run had recorded as done was not done again; every chip is done once
    assert np.all(per_row == 1), per_row
    assert set(done_before.tolist()) <= set(np.flatnonzero(per_row).tolist())
    # fetched twice: only chips in flight at the stop or done since the last ledger flush
    # (a few per rank; a rerun from scratch would fetch >= N_CHIPS + 5)
    assert N_CHIPS <= served["files"] <= N_CHIPS + 4, served
    assert served["slow"] <= N_CHIPS + 4, served  # every chip request, finished or not


@needs_slurm
def test_failing_campaign_fails_the_job_without_requeue(slurm, store, tmp_path):
    camp = tmp_path / "campaign"
    out = tmp_path / "job.out"
    missing = tmp_path / "no-such-campaign.toml"
    job = slurm.sbatch(SLURM_SCRIPT, "--ntasks-per-node=1", f"--output={out}",
                       f"--chdir={tmp_path}",
                       env=campaign_env(camp, "http://127.0.0.1:9", PS1MPI_LAUNCHER="srun",
                                        PS1MPI_CAMPAIGN=str(missing)))
    info = slurm.wait(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=90)
    text = read(out)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", f"{info}\n{text}"
    assert info["Restarts"] == "0"
    assert "no-such-campaign.toml" in text and "campaign failed (exit 2)" in text, text
    assert not (camp / "ledger.h5").exists()


# ------------------------------------------------------------------------------ both scripts

@pytest.mark.parametrize("script, var", [(SLURM_SCRIPT, "SLURM_JOB_ID"), (PBS_SCRIPT, "PBS_JOBID")])
def test_scripts_refuse_to_run_outside_their_batch_system(script, var, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_"))}
    env["PS1MPI_LEDGER"] = str(tmp_path / "ledger.h5")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env,
                          timeout=30)
    assert proc.returncode == 2 and "not inside a" in proc.stdout, proc.stdout + proc.stderr
    assert not (tmp_path / "ledger.h5").exists()


def test_pbs_script_stops_before_walltime_and_resubmits_itself(store, tmp_path):
    """The PBS script outside PBS (its environment made by hand, `qsub` a recorder): ranks
    from the node file, the stop PS1MPI_MARGIN_S before the walltime, the resubmission with
    its counter, and the resubmitted job finishing the campaign."""
    camp = tmp_path / "campaign"
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\nlocalhost\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "qsub.calls"
    qsub = bindir / "qsub"
    qsub.write_text(f"#!/bin/bash\nprintf '%s\\n' \"$*\" >> {shlex.quote(str(calls))}\n"
                    "echo 4243.pbs-test\n")
    qsub.chmod(0o755)
    env = repo_env(**campaign_env(camp, "", PBS_JOBID="4242.pbs-test", PBS_NODEFILE=str(nodefile),
                                  PBS_O_WORKDIR=str(REPO), PS1MPI_WALLTIME="00:00:06",
                                  PS1MPI_MARGIN_S="0", PS1MPI_STOP_GRACE_S="10"))
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    slow = FaultSpec(slow_rate=1.0, slow_s=1.0, match="*.fits")
    with start_datastore(store, faults=slow) as ds:
        env["PS1MPI_DATASTORE"] = ds.url
        t0 = time.monotonic()
        first = subprocess.run(["bash", str(PBS_SCRIPT)], capture_output=True, text=True,
                               env=env, timeout=120)
        took = time.monotonic() - t0
        assert first.returncode == 0, first.stdout + first.stderr
        assert "run 1: 2 ranks, walltime 00:00:06 (ranks stopped after 6 s)" in first.stdout
        assert "stopped 0 s before the walltime" in first.stdout
        assert "resubmitted as 4243.pbs-test" in first.stdout, first.stdout
        assert took < 6 + 10 + 5, took
        # 12 chips at 1 s each on 2 ranks need more than the 6 s: the job was stopped short
        if (camp / "ledger.h5").exists():  # (not yet made if the ranks started very slowly)
            with Ledger.open(camp / "ledger.h5") as led:
                assert led.counts("summitImfile")["done"] < N_CHIPS
        call = calls.read_text().splitlines()
        assert call == [f"-V -v PS1MPI_RESUBMITS=1 -W depend=afterany:4242.pbs-test "
                        f"{REPO}/jobs/campaign.pbs"], call
        # the resubmitted job: same environment plus the counter, no walltime limit this time
        env.update(PBS_JOBID="4243.pbs-test", PS1MPI_RESUBMITS="1", PS1MPI_WALLTIME="")
        second = subprocess.run(["bash", str(PBS_SCRIPT)], capture_output=True, text=True,
                                env=env, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "run 2: 2 ranks" in second.stdout and "campaign complete" in second.stdout
    assert_campaign_done(camp / "ledger.h5")
    assert calls.read_text().count("\n") == 1  # no second resubmission
    assert (camp / "logs" / "pbs-4242" / "campaign.rank0001.log").exists()
    assert (camp / "logs" / "pbs-4243" / "campaign.rank0000.log").exists()
