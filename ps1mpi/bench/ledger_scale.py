"""Build a ledger at PV3 scale and time appends, the pending-work query, and opening.

PV3: 375,573 exposures x 60 chips = 22.5 million chip elements. `--exposures` shrinks it.
Half the chips are marked done (in region blocks, as a campaign would) before the query.
JSON keys: chip_elements, append_rows_per_s, pending_query_s, open_s, file_bytes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ..infra.ledger import Ledger
from ..infra.schema import State
from .common import emit

PV3_EXPOSURES = 375_573


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="ps1mpi bench ledger-scale", description=__doc__)
    p.add_argument("--exposures", type=int, default=PV3_EXPOSURES)
    p.add_argument("--chips", type=int, default=60)
    p.add_argument("--batch", type=int, default=2000, help="exposures appended per batch")
    p.add_argument("--dir", type=Path, default=None, help="where to build it (default: a temp dir)")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ledger-scale-", dir=args.dir))
    path = workdir / "ledger.h5"
    rng = np.random.default_rng(42)
    n_el = args.exposures * args.chips
    chips = np.array([f"XY{i // 8}{i % 8}" for i in range(64) if i not in (0, 7, 56, 63)][:args.chips],
                     dtype="S8")
    t0 = time.perf_counter()
    with Ledger.create(path, campaign={"name": "ledger-scale"}) as led:
        for start in range(0, args.exposures, args.batch):
            n = min(args.batch, args.exposures - start)
            names = np.char.add(b"o", np.arange(start, start + n).astype("S10"))
            ra = rng.uniform(0, 360, n)
            dec = np.degrees(np.arcsin(rng.uniform(-0.5, 1, n)))
            runs = led.append("chipRun", n, exp_name=names, ra=ra, dec=dec, state=State.RUN,
                              nchips=args.chips)
            led.append("chipProcessedImfile", n * args.chips, run=np.repeat(runs, args.chips),
                       exp_name=np.repeat(names, args.chips), chip=np.tile(chips, n),
                       ra=np.repeat(ra, args.chips), dec=np.repeat(dec, args.chips))
            led.flush()
        append_s = time.perf_counter() - t0
        # mark half the chips done, in blocks, as a campaign would
        done = np.arange(0, n_el // 2)
        t1 = time.perf_counter()
        led.update("chipProcessedImfile", done, state=State.DONE)
        led.flush()
        update_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    led = Ledger.open(path)
    open_s = time.perf_counter() - t2
    t3, c3 = time.perf_counter(), time.process_time()
    pending = led.pending("chipProcessedImfile", retry_cap=2)
    query_s, query_cpu_s = time.perf_counter() - t3, time.process_time() - c3
    led.close()
    size = os.path.getsize(path)
    assert pending.size == n_el - done.size, "pending query returned the wrong rows"
    print(f"chip elements        {n_el:,}")
    print(f"append               {append_s:.1f} s = {n_el / append_s:,.0f} rows/s")
    print(f"mark half done       {update_s:.2f} s")
    print(f"open (reader)        {open_s * 1e3:.1f} ms")
    print(f"pending-work query   {query_s:.3f} s wall, {query_cpu_s:.3f} s CPU ({pending.size:,} pending)")
    print(f"file size            {size / 2**20:.1f} MiB")
    for f in workdir.iterdir():
        f.unlink()
    workdir.rmdir()
    return emit({"chip_elements": n_el, "append_rows_per_s": round(n_el / append_s),
                 "pending_query_s": round(query_s, 4),
                 "pending_query_cpu_s": round(query_cpu_s, 4), "open_s": round(open_s, 4),
                 "file_bytes": size})
