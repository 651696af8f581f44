"""Run a benchmark: `ps1mpi bench NAME [options]`; figures are printed, the last line is one
JSON object. Benchmarks measure speed and accuracy; peers (SWarp, source-extractor, ...) are
used when installed and reported as null otherwise. `ps1mpi bench list` names them all.

Benchmarks that use MPI run on the ranks they are started with, e.g.
`mpiexec -n 4 ps1mpi bench coordinator`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = __doc__

# name -> module in ps1mpi.bench (each has run(argv) -> dict, printing its JSON last)
BENCHMARKS = {
    "ledger-scale": "ledger_scale",
    "coordinator": "coordinator",
    "sim": "sim",
    "summitcopy": "summitcopy",
    "chip-accuracy": "chip_accuracy",
    "chip-speed": "chip_speed",
    "detect-speed": "detect_speed",
    "detrend-speed": "detrend_speed",
    "camera-accuracy": "camera_accuracy",
    "camera-speed": "camera_speed",
    "warp-speed": "warp_speed",
    "stack-speed": "stack_speed",
    "stack-accuracy": "stack_accuracy",
    "campaign": "campaign",
    "exposure": "exposure",
}


def available() -> dict[str, str]:
    out = {}
    for name, module in BENCHMARKS.items():
        if importlib.util.find_spec(f"ps1mpi.bench.{module}") is not None:
            out[name] = module
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ps1mpi bench", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="benchmark name, or 'list'")
    p.add_argument("options", nargs=argparse.REMAINDER, help="options of the benchmark")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    benches = available()
    if args.name == "list":
        for name, module in benches.items():
            mod = importlib.import_module(f"ps1mpi.bench.{module}")
            doc = (mod.__doc__ or "").strip().splitlines()
            print(f"{name:<16} {doc[0] if doc else ''}")
        return 0
    if args.name not in benches:
        print(f"ps1mpi bench: no benchmark {args.name!r}; available: {', '.join(benches)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"ps1mpi.bench.{benches[args.name]}")
    module.run(args.options)
    return 0
