"""Run a command under mpiexec from inside the test suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mpi_run(nranks: int, args: list[str], *, timeout: float = 300, cwd: Path | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """`mpiexec -n N python ARGS...` with the repository on the path; output captured."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = ["mpiexec", "-n", str(nranks), sys.executable] + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def ps1mpi(nranks: int, args: list[str], **kw) -> subprocess.CompletedProcess:
    """`mpiexec -n N python -m ps1mpi ARGS...`."""
    return mpi_run(nranks, ["-m", "ps1mpi"] + list(args), **kw)
