"""``ps1mpi sim``: make a simulated survey (raw chips, detrend masters, reference catalog, truth).

Examples::

    ps1mpi sim --out demo                       # the README demo: 17 testcam exposures
    mpiexec -n 4 ps1mpi sim --out t --preset tiny
    mpiexec -n 8 ps1mpi sim --out g --preset single --camera gpc1 --compress
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

DESCRIPTION = ("Simulate a survey: raw chip FITS files for the datastore, detrend masters, a reference "
               "catalog and truth tables, deterministic from a seed (MPI-parallel by chip).")


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse the command line of ``ps1mpi sim``.

    Parameters
    ----------
    argv : list of str
        Arguments after ``sim``.

    Returns
    -------
    argparse.Namespace
    """
    from ps1mpi.sim.plan import PRESETS

    p = argparse.ArgumentParser(prog="ps1mpi sim", description=DESCRIPTION,
                                epilog="Output tree and file formats: docs/sim.md and docs/raw-format.md.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                   help="survey preset (default demo: 17 testcam exposures; tiny: 4; single: 1, for gpc1)")
    p.add_argument("--camera", default=None, choices=["testcam", "gpc1"],
                   help="camera (default: the preset's)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--star-density", type=float, default=None,
                   help="stars with r < 21 per square degree (default: the preset's; 40000 for testcam)")
    p.add_argument("--chips", default=None, help="comma-separated chips to simulate (default all)")
    p.add_argument("--exposures", default=None, help="comma-separated exposure names to write (default all)")
    p.add_argument("--no-detrend", action="store_true", help="do not make the detrend masters")
    p.add_argument("--compress", action="store_true", help="tile-compress the raw cells (RICE, lossless)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    """Run the simulation on every rank of MPI.COMM_WORLD; rank 0 prints the summary.

    Returns
    -------
    int
        0 on success, 1 on error (the error is printed; with several ranks the job is aborted so
        that no rank waits forever).
    """
    from mpi4py import MPI

    from ps1mpi.sim.survey import simulate_survey

    comm = MPI.COMM_WORLD
    say = None if args.quiet else (lambda m: print(m, flush=True))
    try:
        summary = simulate_survey(
            args.out, preset=args.preset, camera=args.camera, seed=args.seed, comm=comm,
            chips=args.chips.split(",") if args.chips else None,
            exposures=args.exposures.split(",") if args.exposures else None,
            detrend=not args.no_detrend, compress=args.compress, star_density=args.star_density, log=say)
    except (ValueError, KeyError) as err:
        print(f"ps1mpi sim: rank {comm.rank}: {err}", file=sys.stderr, flush=True)
        if comm.size > 1:
            comm.Abort(1)
        return 1
    except Exception:
        traceback.print_exc()
        if comm.size > 1:
            comm.Abort(1)
        return 1
    if comm.rank == 0:
        s = summary
        print(f"sim: wrote {s.n_chips} raw chips of {len(s.exposures)} exposures ({', '.join(s.filters)}) "
              f"to {s.out_dir} in {s.seconds.get('total', 0.0):.1f} s on {s.nranks} ranks "
              f"({s.chip_seconds:.2f} s per chip)")
        print(json.dumps({k: s.paths[k] for k in s.paths}, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(parse(sys.argv[1:])))
