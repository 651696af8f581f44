"""Test helpers for the batch scripts and the monitor: a private one-node Slurm cluster on
localhost, a small night of raw exposures to run a campaign on, and a headless Chromium.

:class:`LocalSlurm` starts its own ``munged`` (own key and socket), ``slurmctld`` and ``slurmd``
from a private ``slurm.conf`` (free loopback ports, state and spool in a temporary directory,
no accounting, no cgroups), so it touches nothing of the machine's own configuration and is
stopped completely afterwards. It needs Debian's ``slurmctld slurmd slurm-client munge`` (see
``.ci/services.sh``) and root (slurmd runs jobs as their owner).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from ps1mpi.geometry.camera import load_camera
from ps1mpi.infra.rawfile import write_raw_chip

REPO = Path(__file__).resolve().parents[1]
SLURM_PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo",
                  "srun", "scancel")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")


# ------------------------------------------------------------------------------ raw night

def write_night(store: Path, exposures: list[dict], *, camera: str = "testcam") -> list[Path]:
    """Write raw exposures into a datastore directory (``STORE/<exp>/<exp>.<chip>.fits``).

    Each entry of ``exposures`` has ``name``, ``mjd``, ``filter``, ``level`` (ADU) and
    ``ra``, ``dec`` (deg); every chip of ``camera`` is written with its data section at
    ``level`` +- 10 ADU and its overscan at the bias level. Returns the files written.
    """
    cam = load_camera(camera)
    y0, y1, x0, x1 = cam.datasec
    paths = []
    for k, exp in enumerate(exposures):
        rng = np.random.default_rng(k)
        for chip in cam.chip_names:
            cells = {}
            for cell in cam.cell_names:
                raw = np.full(cam.raw_cell_shape, cam.bias_level, np.float64)
                raw[y0:y1, x0:x1] = exp["level"] + rng.normal(0.0, 10.0, (y1 - y0, x1 - x0))
                cells[cell] = raw
            header = {"EXPNAME": exp["name"], "TELESCOP": "PS1", "CAMERA": camera,
                      "DETECTOR": chip, "OBSTYPE": "OBJECT", "FILTERID": f"{exp['filter']}.00000",
                      "FILTER": exp["filter"], "RA": float(exp["ra"]), "DEC": float(exp["dec"]),
                      "POSANGLE": 0.0, "MJD-OBS": float(exp["mjd"]), "EXPTIME": 30.0,
                      "AIRMASS": 1.1}
            path = store / exp["name"] / f"{exp['name']}.{chip}.fits"
            write_raw_chip(path, cells, header=header, datasec=cam.datasec, biassec=cam.biassec,
                           gain=cam.gain, read_noise=cam.read_noise, saturation=cam.saturation)
            paths.append(path)
    return paths


def small_night(n: int = 3) -> list[dict]:
    """``n`` r-band exposures of one night, each at its own pointing 0.6 deg apart."""
    return [{"name": f"o5000t{k + 1:04d}o", "mjd": 55000.30 + 0.01 * k, "filter": "r",
             "level": 1500.0 + 1000.0 * k, "ra": 150.25 + 0.6 * k, "dec": 2.5 + 0.3 * (k % 2)}
            for k in range(n)]


def repo_env(**extra: str) -> dict[str, str]:
    """This environment with the repository importable (the package need not be installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


# ------------------------------------------------------------------------------ Slurm

def slurm_missing() -> str | None:
    """Why a local Slurm cluster cannot run here (None when it can)."""
    missing = [p for p in SLURM_PROGRAMS if shutil.which(p) is None]
    if missing:
        return (f"Slurm/munge not installed (missing {', '.join(missing)}): "
                "apt-get install slurmctld slurmd slurm-client munge, or run .ci/services.sh")
    if os.geteuid() != 0:
        return "a local slurmd must run as root to start jobs"
    return None


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmError(RuntimeError):
    """The local cluster did not start, or a job did not reach the expected state in time."""


class LocalSlurm:
    """A one-node Slurm cluster on localhost, private to one test session.

    Parameters
    ----------
    cpus : int, optional
        CPUs of the node (default: this machine's).
    cred_expire_s : int, optional
        Lifetime of job credentials (s), which is also how long a requeued job waits before
        it may start again (Slurm's default: 120 s).
    """

    def __init__(self, *, cpus: int | None = None, cred_expire_s: int = 10):
        self.cpus = int(cpus or os.cpu_count() or 1)
        self.cred_expire_s = int(cred_expire_s)
        self.host = socket.gethostname().split(".")[0]
        # munged insists that every directory above its socket be searchable by all
        self.dir = Path(tempfile.mkdtemp(prefix="ps1mpi-slurm-"))
        self.dir.chmod(0o755)
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}

    # -------------------------------------------------------------- life cycle
    @property
    def env(self) -> dict[str, str]:
        """Environment for the Slurm client commands (and for the jobs they submit)."""
        env = repo_env(SLURM_CONF=str(self.conf))
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            if key != "SLURM_CONF":
                del env[key]
        return env

    def _write_conf(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir(exist_ok=True)
        ctld_port, d_port = _free_ports(2)
        self.conf.write_text("\n".join([
            "ClusterName=ps1mpitest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # credentials live cred_expire s, and a requeued job waits that long (+1 s)
            # before it may start again: 120 s by default, shortened here
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # look for startable jobs every 2 s (a requeued job becoming eligible is no event)
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=10",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            ""]))

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.dir / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env,
                                            start_new_session=True)
        out.close()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with {proc.returncode}:\n{self.logs()}")

    def start(self, *, timeout: float = 60.0) -> "LocalSlurm":
        """Start munged, slurmctld and slurmd; return once the node is idle."""
        self._write_conf()
        keydir = self.dir / "munge"
        keydir.mkdir(mode=0o700, exist_ok=True)
        key = keydir / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True,
                       capture_output=True)
        self._spawn("munged", ["munged", "--foreground", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.dir / 'munged.pid'}",
                               f"--log-file={self.dir / 'log' / 'munged.log'}",
                               f"--seed-file={keydir / 'munged.seed'}"])
        t0 = time.monotonic()
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() - t0 > timeout:
                raise SlurmError(f"munged made no socket in {timeout} s:\n{self.logs()}")
            time.sleep(0.1)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        while True:
            self._check_alive()
            state = self.run(["sinfo", "--noheader", "--format=%T"], check=False).stdout.strip()
            if state == "idle":
                return self
            if time.monotonic() - t0 > timeout:
                raise SlurmError(f"node not idle after {timeout} s (sinfo: {state!r}):\n"
                                 f"{self.logs()}")
            time.sleep(0.25)

    def stop(self) -> None:
        """Cancel every job, stop the daemons (TERM, then KILL) and remove the directory."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user=root"], check=False)
            time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=5)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self, tail: int = 40) -> str:
        """The last lines of the daemons' logs (for failure messages)."""
        out = []
        for path in sorted((self.dir / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(out)

    # -------------------------------------------------------------- jobs
    def run(self, cmd: list[str], *, check: bool = True, env: dict | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=env or self.env)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def sbatch(self, script: Path, *options: str, env: dict[str, str] | None = None) -> int:
        """Submit ``script`` with sbatch ``options``; ``env`` adds to the job's environment."""
        full = self.env
        full.update(env or {})
        out = self.run(["sbatch", "--parsable", *options, str(script)], env=full).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, Reason, ...)."""
        out = self.run(["scontrol", "--oneliner", "show", "job", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, states: set[str] | tuple[str, ...], *, timeout: float,
             restarts: int | None = None) -> dict[str, str]:
        """Poll until the job is in one of ``states`` (with ``restarts`` if given)."""
        t0 = time.monotonic()
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states and (
                    restarts is None or int(info.get("Restarts", -1)) == restarts):
                return info
            if time.monotonic() - t0 > timeout:
                raise SlurmError(f"job {job_id} not in {sorted(states)} after {timeout} s: "
                                 f"{info.get('JobState')} ({info.get('Reason')}), restarts "
                                 f"{info.get('Restarts')}\n{self.logs()}")
            time.sleep(0.25)


# ------------------------------------------------------------------------------ Chromium

def chromium_missing() -> str | None:
    """Why headless Chromium cannot run here (None when it can)."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} not installed: apt-get install chromium, or run .ci/services.sh"
    return None


def chromium(args: list[str], *, profile: Path, timeout: float = 90.0
             ) -> subprocess.CompletedProcess:
    """Run headless Chromium (as root: no sandbox) with a fresh profile in ``profile``."""
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise RuntimeError(f"chromium did not finish in {timeout} s: {' '.join(args)}\n"
                           f"{err[-3000:]}")
    finally:
        # renderer/GPU helpers that outlive the browser process
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
