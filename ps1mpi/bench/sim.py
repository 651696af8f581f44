"""Simulator speed: seconds to generate one full GPC1 chip (raw file + truth), and peak memory.

``ps1mpi bench sim [--chips N] [--testcam] [--seed S] [--keep DIR]`` generates N science chips of
the GPC1 ``single`` preset (streaming chip by chip, as ``ps1mpi sim --camera gpc1`` does), times
each (rendering, detector, writing the raw file and the truth), and prints the figures; the
last line is one JSON object with ``chip_s`` (mean seconds per GPC1 chip, exposure setup
excluded; ``chip_cpu_s`` the CPU seconds, which a loaded machine does not inflate), ``peak_mb``
(peak resident memory of the process), ``setup_s`` (sky, plan and
exposure context, once per exposure) and ``testcam_chip_s`` (seconds per test-camera chip).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ps1mpi.bench.common import emit, peak_mb

DESCRIPTION = __doc__


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ps1mpi bench sim", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chips", type=int, default=2, help="GPC1 chips to generate (default 2)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", type=Path, default=None, help="write the chips here and keep them")
    p.add_argument("--no-testcam", action="store_true", help="skip the test-camera figure")
    return p.parse_args(argv)


def _time_chips(preset: str, camera: str, chips: list[str], seed: int, out: Path) -> tuple[float, list[float]]:
    from ps1mpi.infra.rawfile import write_raw_chip
    from ps1mpi.sim.catalogs import write_chip_truth
    from ps1mpi.sim.exposure import exposure_context, simulate_chip
    from ps1mpi.sim.survey import CAMERA_CODE, raw_path, survey_setup, truth_path

    t0 = time.perf_counter()
    pre, cam, inst, plan, sky, distortion = survey_setup(preset=preset, camera=camera, seed=seed)
    ctx = exposure_context(plan[0], inst=inst, sky=sky, distortion=distortion,
                           camera_code=CAMERA_CODE.get(cam.name, "x"))
    setup = time.perf_counter() - t0
    name = plan[0]["expname"].decode()
    times, cpu = [], []
    for chip in chips:
        t = time.perf_counter()
        c = time.process_time()
        res = simulate_chip(ctx, chip, rng=np.random.default_rng([seed, 71, 0, cam.chip_names.index(chip)]))
        write_raw_chip(raw_path(out, name, chip), res.cells, header=res.header, datasec=cam.datasec,
                       biassec=cam.biassec, gain=res.cell_headers["gain"], read_noise=res.cell_headers["read_noise"],
                       saturation=res.cell_headers["saturation"], maxlin=res.cell_headers["maxlin"])
        write_chip_truth(truth_path(out, name, chip), res)
        del res
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return setup, times, cpu


def run(argv: list[str]) -> dict:
    """Run the benchmark; print the figures and, last, one JSON line; return the result."""
    args = _parse(argv)
    out = args.keep or Path(tempfile.mkdtemp(prefix="ps1mpi-bench-sim-"))
    try:
        from ps1mpi.geometry.camera import load_camera
        gpc1 = load_camera("gpc1")
        # chips near the centre of the mosaic (full of sources) and one at the edge
        order = sorted(gpc1.chip_names, key=lambda c: np.hypot(*[np.mean(v) for v in (
            gpc1.chip_extent(c)[0:2], gpc1.chip_extent(c)[2:4])]))
        chips = order[:max(args.chips - 1, 1)] + ([order[-1]] if args.chips > 1 else [])
        tc = None
        if not args.no_testcam:
            _, ttimes, _ = _time_chips("tiny", "testcam", ["XY00", "XY01", "XY10", "XY11"], args.seed,
                                       out / "testcam")
            tc = float(np.mean(ttimes[1:])) if len(ttimes) > 1 else float(ttimes[0])
            print(f"testcam chip (808 x 806 px): {tc:.3f} s")
        setup, times, cpu = _time_chips("single", "gpc1", chips, args.seed, out / "gpc1")
        print(f"gpc1 exposure setup (sky {'+'} plan {'+'} context): {setup:.2f} s")
        for c, t, u in zip(chips, times, cpu):
            print(f"gpc1 chip {c} (4846 x 4868 px, 64 cells): {t:.2f} s wall, {u:.2f} s cpu")
        mb = peak_mb()
        print(f"peak memory: {mb:.0f} MB")
        result = {"chip_s": float(np.mean(times)), "chip_cpu_s": float(np.mean(cpu)), "peak_mb": float(mb),
                  "setup_s": float(setup), "testcam_chip_s": tc, "chips": chips}
    finally:
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)
    return emit(result)


if __name__ == "__main__":  # pragma: no cover
    import sys
    run(sys.argv[1:])
