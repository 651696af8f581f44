"""``ps1mpi <command> ...``: one console command, one module per subcommand.

Each command module in ``ps1mpi.cli`` has ``DESCRIPTION``, ``parse(argv)`` and ``main(args)``
(desispec style); this dispatcher only finds the module and runs it.
"""

from __future__ import annotations

import importlib
import os
import sys

# One BLAS/OpenMP thread per rank: MPI ranks are the parallelism (measured: a threaded BLAS
# on an oversubscribed node makes the astrometry fit 3-4x slower). Set before numpy loads.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

# command -> module in ps1mpi.cli, in pipeline order
COMMANDS = {
    "campaign": "campaign",
    "summitcopy": "summitcopy",
    "register": "register",
    "chip": "chip",
    "camera": "camera",
    "warp": "warp",
    "stack": "stack",
    "phot": "phot",
    "ledger": "ledger",
    "monitor": "monitor",
    "sim": "sim",
    "datastore": "datastore",
    "tess": "tess",
    "bench": "bench",
}


def _available() -> dict[str, str]:
    out = {}
    for name, module in COMMANDS.items():
        if importlib.util.find_spec(f"ps1mpi.cli.{module}") is not None:
            out[name] = module
    return out


def usage() -> str:
    lines = ["usage: ps1mpi <command> [options]   (run under mpiexec for parallel stages)", "",
             "commands:"]
    for name, module in _available().items():
        mod = importlib.import_module(f"ps1mpi.cli.{module}")
        first = (getattr(mod, "DESCRIPTION", "") or "").strip().splitlines()
        lines.append(f"  {name:<11} {first[0] if first else ''}")
    lines += ["", "`ps1mpi <command> --help` says what a command does, reads and writes."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from .. import __version__
        print(f"ps1mpi {__version__}")
        return 0
    available = _available()
    name = argv[0]
    if name not in available:
        print(f"ps1mpi: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"ps1mpi.cli.{available[name]}")
    args = module.parse(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
