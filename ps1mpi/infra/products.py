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

__all__ = ["atomic_output", "atomic_outputs", "data_digests", "PRODUCT_DIRS"]

PRODUCT_DIRS = ("raw", "chip", "camera", "warp", "stack")
"""Top-level product directories of a campaign, in pipeline order."""


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


def data_digests(root: str | os.PathLike, subdirs: tuple[str, ...] = PRODUCT_DIRS
                 ) -> dict[str, str]:
    """SHA-256 of the data of every FITS product (``.fits``, ``.cmf``) under ``root/<subdir>``,
    keyed by the path relative to ``root``. Headers are left out: they carry creation times,
    so two runs with the same products have the same digests."""
    import hashlib

    import fitsio
    import numpy as np

    root = Path(root)
    out: dict[str, str] = {}
    for sub in subdirs:
        base = root / sub
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if not (path.is_file() and not path.name.startswith(".")
                    and path.suffix in (".fits", ".cmf")):
                continue
            h = hashlib.sha256()
            with fitsio.FITS(str(path)) as fits:
                for hdu in fits:
                    if hdu.has_data():
                        h.update(np.ascontiguousarray(hdu.read()).tobytes())
            out[str(path.relative_to(root))] = h.hexdigest()
    return out
