"""Serve simulated raw exposures over HTTP like the PS1 datastore, or read a datastore.

Subcommands:
  serve --root DIR [--host 127.0.0.1] [--port 0] [--settle S] [--no-warm]
        [--fail-rate MODE=RATE ...] [--fault-seed N] [--fault-attempts N]
        [--fault-match GLOB] [--slow-s S] [--truncate-fraction F]
                  serve DIR/<EXPNAME>/<EXPNAME>.<CHIP>.fits until SIGTERM/SIGINT; the first
                  line printed is "datastore serving DIR at URL"
  ls URL [--since MJD|ISO] [--chips]
                  print the exposure listing (and each exposure's chips)

Fault modes for --fail-rate (deterministic from --fault-seed; see docs/datastore.md):
  error     answer 500            slow      answer after --slow-s seconds
  truncate  cut the body short    bad_md5   list a wrong md5 for the chip
  oversize  list a size smaller than the file

Listing formats, routes and fault semantics: docs/datastore.md.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

DESCRIPTION = __doc__


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ps1mpi datastore", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("serve", help="serve a directory of raw exposures over HTTP")
    s.add_argument("--root", type=Path, required=True,
                   help="datastore directory: ROOT/<EXPNAME>/<EXPNAME>.<CHIP>.fits")
    s.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default loopback; 0.0.0.0 exposes it to the network)")
    s.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
    s.add_argument("--settle", type=float, default=0.0, metavar="S",
                   help="list an exposure only once its files are unchanged for S seconds "
                        "(use when the directory is still being written)")
    s.add_argument("--public-url", default=None,
                   help="base URL written in listings (default: the bound address, or the "
                        "request's Host when bound to all interfaces)")
    s.add_argument("--no-warm", action="store_true",
                   help="do not compute every checksum in the background at start")
    s.add_argument("--fail-rate", action="append", default=[], metavar="MODE=RATE",
                   help="inject faults: error, slow, truncate, bad_md5, oversize (repeatable)")
    s.add_argument("--fault-seed", type=int, default=0, help="seed of the fault draws")
    s.add_argument("--fault-attempts", type=int, default=0, metavar="N",
                   help="faults only on the first N requests of each path (0: always)")
    s.add_argument("--fault-match", default="*", metavar="GLOB",
                   help="faults only on paths matching this pattern (e.g. '*.fits')")
    s.add_argument("--slow-s", type=float, default=5.0, help="delay of a slow answer (s)")
    s.add_argument("--truncate-fraction", type=float, default=0.5,
                   help="fraction of a truncated body that is sent")
    ls = sub.add_parser("ls", help="print a datastore's listing")
    ls.add_argument("url", help="datastore URL, e.g. http://127.0.0.1:8080")
    ls.add_argument("--since", default=None, help="only exposures at or after this MJD or ISO time")
    ls.add_argument("--chips", action="store_true", help="also list each exposure's chips")
    ls.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    return p.parse_args(argv)


def _serve(args: argparse.Namespace) -> int:
    from ..sim.datastore import FaultSpec, make_server

    try:
        faults = FaultSpec.parse(args.fail_rate, seed=args.fault_seed,
                                 attempts=args.fault_attempts, match=args.fault_match,
                                 slow_s=args.slow_s, truncate_fraction=args.truncate_fraction)
        server = make_server(args.root, faults=faults, host=args.host, port=args.port,
                             settle_s=args.settle, public_url=args.public_url)
    except (ValueError, OSError) as err:
        print(f"ps1mpi datastore serve: {err}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    url = server.public_url or f"http://{host}:{port}"
    print(f"datastore serving {args.root} at {url}", flush=True)
    if faults.active:
        print(f"faults: {faults}", flush=True)

    def stop(signum, frame):  # shutdown() must not run in the serving thread
        server.stop_event.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    if not args.no_warm:
        threading.Thread(target=_warm, args=(server,), name="md5-warm", daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    counts = dict(server.counts)
    print(f"datastore stopped: {counts}", flush=True)
    return 0


def _warm(server) -> None:
    import logging

    try:
        n = server.index.warm()
        logging.getLogger("ps1mpi.datastore").info("datastore: checksums of %d files ready", n)
    except OSError as err:  # a file vanished while summing: it is summed again when listed
        logging.getLogger("ps1mpi.datastore").warning("datastore: warming checksums: %s", err)


def _ls(args: argparse.Namespace) -> int:
    from ..infra.http import DownloadError, list_chips, list_exposures

    try:
        rows = list_exposures(args.url, since=args.since, timeout=args.timeout)
        print(f"{'exp_name':<14}{'dateobs':<25}{'filter':<7}{'ra':>11}{'dec':>11}"
              f"{'exptime':>9}{'nchips':>8}")
        for e in rows:
            print(f"{e.exp_name:<14}{e.dateobs:<25}{e.filter:<7}{e.ra:>11.5f}{e.dec:>11.5f}"
                  f"{e.exptime:>9.1f}{e.nchips:>8d}")
            if args.chips:
                for c in list_chips(e.uri, timeout=args.timeout):
                    print(f"    {c.chip:<8}{c.bytes:>12d}  {c.md5}  {c.uri}")
        print(f"{len(rows)} exposures")
    except (DownloadError, ValueError) as err:
        print(f"ps1mpi datastore ls: {err}", file=sys.stderr)
        return 2
    return 0


def main(args: argparse.Namespace) -> int:
    if args.action == "serve":
        return _serve(args)
    return _ls(args)
