"""Per-rank logging: every line says when, which rank on which host, which stage and unit.

Rank 0 also prints the coordinator's aggregated progress lines. Each rank may also write its
own file (``<logdir>/<stage>.rank<NNNN>.log``) so a batch job leaves one log per rank.
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

__all__ = ["setup_logging", "unit_logger"]

_FORMAT = "%(asctime)s rank=%(rank)d host=%(host)s stage=%(stage)s unit=%(unit)s %(levelname)s %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank
        self.host = socket.gethostname()

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        record.host = self.host
        for attr in ("stage", "unit"):
            if not hasattr(record, attr):
                setattr(record, attr, "-")
        return True


def setup_logging(rank: int, *, level: str = "INFO", logdir: str | Path | None = None,
                  stage: str = "ps1mpi", quiet_workers: bool = True) -> None:
    """Configure the ``ps1mpi`` loggers for this rank (idempotent).

    With ``quiet_workers`` only rank 0 prints INFO lines to stderr; other ranks print WARNING
    and above (their INFO lines still go to their log file when ``logdir`` is given).
    """
    root = logging.getLogger("ps1mpi")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(level)
    root.propagate = False
    fmt = logging.Formatter(_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S")
    flt = _RankFilter(rank)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    stream.addFilter(flt)
    if quiet_workers and rank != 0:
        stream.setLevel(logging.WARNING)
    root.addHandler(stream)
    if logdir is not None:
        Path(logdir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(logdir) / f"{stage}.rank{rank:04d}.log")
        fh.setFormatter(fmt)
        fh.addFilter(flt)
        root.addHandler(fh)


def unit_logger(stage: str, unit: str = "-") -> logging.LoggerAdapter:
    """A logger whose lines carry the stage and work-unit names."""
    return logging.LoggerAdapter(logging.getLogger(f"ps1mpi.{stage}"), {"stage": stage, "unit": unit})
