"""The campaign end to end: a small simulated survey through every stage under mpiexec, killed
with SIGKILL at random moments and restarted, must end with the same products as a run that
was never interrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ps1mpi.infra.ledger import Ledger
from ps1mpi.infra.products import data_digests
from ps1mpi.infra.schema import State

from .mpi_util import REPO

PRESET = "tiny"


def _campaign(demo_dir: Path, nranks: int = 2) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(["mpiexec", "-n", str(nranks), sys.executable, "-m", "ps1mpi",
                             "campaign", "--demo", str(demo_dir), "--preset", PRESET,
                             "--no-report"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    """The simulated survey, made once and copied into each campaign directory."""
    base = tmp_path_factory.mktemp("sim")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "ps1mpi", "sim", "--out", str(base / "sim"),
                    "--preset", PRESET], check=True, env=env, capture_output=True, timeout=600)
    return base / "sim"


@pytest.fixture(scope="module")
def reference(simulated, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    demo = tmp_path_factory.mktemp("uninterrupted")
    shutil.copytree(simulated, demo / "sim")
    out = _finish(_campaign(demo))
    assert "=== campaign summary ===" in out
    return demo, data_digests(demo)


def test_uninterrupted_campaign_completes(reference):
    demo, products = reference
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["faults"] == []
    for table, counts in summary["stages"].items():
        assert counts["faulted"] == 0, table
        assert counts["done"] + counts["drop"] == counts["total"], (table, counts)
    assert any(p.startswith("raw/") for p in products)
    # a second run finds nothing to do
    out = _finish(_campaign(demo))
    assert "0 done" not in out or "faulted of 0 units" in out
    with Ledger.open(demo / "ledger.h5") as led:
        ev = led.events(table="summitImfile")
        assert np.count_nonzero(ev["state"] == State.DONE) == led.nrows("summitImfile")


STAGES = ("summitcopy", "register", "chip", "camera", "warp", "stack")


def _kill_during(demo: Path, stage: str, delay: float) -> None:
    """Start the campaign, SIGKILL the whole job (mpiexec and every rank) ``delay`` seconds
    after ``stage`` has been handed its units, and check the kill landed mid-run."""
    proc = _campaign(demo)
    started = threading.Event()
    marker = f"{stage}: "

    def watch():  # the job's log lines, as they come
        for line in proc.stdout:
            if marker in line and "units to process" in line:
                started.set()

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    assert started.wait(timeout=600), f"stage {stage} never started"
    time.sleep(delay)
    # a run that ended before its kill would test nothing
    assert proc.poll() is None, f"the campaign ended within {delay:.2f} s of {stage} starting"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join(timeout=10)


@pytest.mark.parametrize("seed", [1, 2])
def test_killed_campaign_restarts_to_identical_products(simulated, reference, tmp_path, seed):
    """Kill the whole job at a random moment (a random stage, a random delay into it),
    restart, kill again at a random moment of a later stage, then let the same command
    finish: the products must be those of the uninterrupted run."""
    _, expected = reference
    demo = tmp_path / "campaign"
    shutil.copytree(simulated, demo / "sim")
    rng = np.random.default_rng(seed)
    first = int(rng.integers(1, len(STAGES) - 1))          # register .. warp
    second = int(rng.integers(first + 1, len(STAGES)))     # a later stage, which has work left
    for stage in (STAGES[first], STAGES[second]):
        _kill_during(demo, stage, delay=float(rng.uniform(0.0, 1.0)))
    # restart: the same command finishes the campaign doing only what is missing
    _finish(_campaign(demo))
    with Ledger.open(demo / "ledger.h5") as led:
        for table in ("summitImfile", "rawImfile"):
            counts = led.counts(table)
            assert counts["done"] == counts["total"] and counts["run"] == 0
    assert data_digests(demo) == expected
