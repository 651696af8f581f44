"""Helpers shared by benchmarks: the JSON last line, peak memory, peer programs."""

from __future__ import annotations

import json
import resource
import shutil
import sys


def emit(result: dict) -> dict:
    """Print the result as the benchmark's last line (one JSON object) and return it."""
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=True, default=float), flush=True)
    return result


def peak_mb() -> float:
    """Peak resident memory of this process (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peer(command: str, package: str) -> str | None:
    """Path of a peer program, or None after saying which package would provide it."""
    path = shutil.which(command)
    if path is None:
        print(f"note: `{command}` is not installed (Debian package `{package}`); "
              "its figures are null", flush=True)
    return path
