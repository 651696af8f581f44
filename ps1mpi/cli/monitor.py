"""Write the campaign's monitor page: a static HTML report made from the ledger.

  ps1mpi monitor --ledger RUN/ledger.h5 --out RUN/report [--refresh SECONDS]

Reads the ledger (read-only, safe while a job writes it) and the products' JPEG/PNG previews.
Writes OUT/index.html and OUT/coverage.png. With --refresh the page is rewritten every
SECONDS until interrupted, as a live view of a running campaign.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..infra.ledger import LedgerError
from ..monitor import write_report

DESCRIPTION = __doc__


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ps1mpi monitor", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ledger", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--root", type=Path, help="campaign directory (default: the ledger's)")
    p.add_argument("--refresh", type=float, default=0.0, help="rewrite every N seconds")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    try:
        while True:
            page = write_report(args.ledger, args.out, root=args.root)
            print(f"wrote {page}", flush=True)
            if args.refresh <= 0:
                return 0
            time.sleep(args.refresh)
    except LedgerError as err:
        print(f"ps1mpi monitor: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
