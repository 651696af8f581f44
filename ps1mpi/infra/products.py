"""Writing products safely: under a temporary name, renamed into place when complete.

A product path that exists is therefore always complete; the ledger's 'done' record is written
only after the rename (the last output written marks the unit done).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_output", "atomic_outputs"]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    On any exception the temporary file is removed and nothing appears at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{path}: the product was not written")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_outputs(paths: dict[str, str | os.PathLike]) -> Iterator[dict[str, Path]]:
    """Several products at once: all are renamed into place only if the block succeeds.

    Renames happen in the order given; put the product that marks completion last.
    """
    finals = {k: Path(p) for k, p in paths.items()}
    tmps = {}
    for key, final in finals.items():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmps[key] = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmps
        missing = [str(finals[k]) for k, t in tmps.items() if not t.exists()]
        if missing:
            raise FileNotFoundError(f"products not written: {', '.join(missing)}")
        for key, tmp in tmps.items():
            os.replace(tmp, finals[key])
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                tmp.unlink()
