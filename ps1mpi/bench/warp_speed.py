"""Warp speed: one rank resampling a 4096x4096 image (+ variance + mask) onto a TAN grid, vs SWarp.

The input is a simulated chip (sky, noise, stars, bad columns, cosmic rays) with a TAN WCS at
0.258"/px rotated by 1 degree; the output is a north-up TAN grid at 0.25"/px of the same pixel
size. Both warpers use Lanczos-3 on one thread. SWarp (Debian package `swarp`, command
`SWarp`) reads FITS and writes FITS, so its wall time includes I/O; ours is given both for the
warp alone (`mpix_s`) and with the equivalent FITS reading and writing (`mpix_s_io`).
CPU times (ours: process time; SWarp: its user + system time) are printed too, as the
wall times of a shared machine vary with its load.
JSON keys: mpix_s, mpix_s_io, swarp_mpix_s, speedup (with I/O), cpu_s, cpu_s_io, swarp_cpu_s,
covariance_factor, map_error_px, compile_s, flux_ratio_swarp, rms_diff_swarp_sigma.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from ..algorithms import maskbits
from ..algorithms.warp import HAVE_NUMBA, warp_image
from .common import emit, peak_mb, peer

ARCSEC = 1.0 / 3600.0


def _wcs(n: int, scale_arcsec: float, rotation_deg: float, crval=(150.0, 2.0)):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = [n / 2 + 0.5, n / 2 + 0.5]
    s = scale_arcsec * ARCSEC
    th = np.radians(rotation_deg)
    w.wcs.cd = [[-s * np.cos(th), s * np.sin(th)], [s * np.sin(th), s * np.cos(th)]]
    return w


def _header_cards(wcs) -> list[dict]:
    h = wcs.to_header()
    return [{"name": k, "value": h[k]} for k in h]


def _simulate(n: int, rng: np.random.Generator):
    """A chip-like image in ADU with its variance and mask."""
    gain, rn, sky = 1.0, 5.0, 400.0
    img = rng.normal(sky, np.sqrt(sky + rn ** 2), (n, n)).astype(np.float32)
    nstar = n * n // 20000
    xs, ys = rng.uniform(0, n, nstar), rng.uniform(0, n, nstar)
    flux = 10 ** rng.uniform(2.5, 5.5, nstar)
    sig = 1.5
    half = 8
    for x0, y0, f in zip(xs, ys, flux):
        i0, j0 = int(x0) - half, int(y0) - half
        i1, j1 = i0 + 2 * half + 1, j0 + 2 * half + 1
        if i0 < 0 or j0 < 0 or i1 > n or j1 > n:
            continue
        yy, xx = np.mgrid[j0:j1, i0:i1]
        img[j0:j1, i0:i1] += (f / (2 * np.pi * sig ** 2)
                              * np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / sig ** 2))
    var = (np.maximum(img, 0) / gain + rn ** 2).astype(np.float32)
    mask = np.zeros((n, n), np.uint16)
    mask[:, rng.integers(0, n, 6)] |= maskbits.DETECTOR
    mask[rng.integers(0, n, n), rng.integers(0, n, n)] |= maskbits.CR
    return img, var, mask


def _run_swarp(exe: str, workdir: Path, n: int, in_wcs, out_wcs, img, var,
               mask) -> tuple[float, float, Path]:
    import fitsio

    weight = np.where((mask & maskbits.BAD) == 0, 1.0 / var, 0.0).astype(np.float32)
    fitsio.write(workdir / "in.fits", img, header=_header_cards(in_wcs), clobber=True)
    fitsio.write(workdir / "in.weight.fits", weight, header=_header_cards(in_wcs), clobber=True)
    cards = [f"{'NAXIS':8s}= 2", f"{'NAXIS1':8s}= {n}", f"{'NAXIS2':8s}= {n}"]
    for card in _header_cards(out_wcs):
        v = card["value"]
        cards.append(f"{card['name']:8s}= {repr(v) if isinstance(v, str) else v}")
    (workdir / "out.head").write_text("\n".join(cards + ["END"]) + "\n")
    cmd = [exe, str(workdir / "in.fits"),
           "-IMAGEOUT_NAME", str(workdir / "out.fits"),
           "-WEIGHTOUT_NAME", str(workdir / "out.weight.fits"),
           "-WEIGHT_TYPE", "MAP_WEIGHT", "-WEIGHT_SUFFIX", ".weight.fits",
           "-RESAMPLING_TYPE", "LANCZOS3", "-NTHREADS", "1", "-COMBINE", "N",
           "-SUBTRACT_BACK", "N", "-RESAMPLE_DIR", str(workdir), "-VERBOSE_TYPE", "QUIET",
           "-WRITE_XML", "N"]
    t0 = time.perf_counter()
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, cwd=workdir, capture_output=True)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    return time.perf_counter() - t0, cpu, workdir / "in.resamp.fits"


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="ps1mpi bench warp-speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="input and output size (pixels)")
    p.add_argument("--rotation", type=float, default=1.0, help="input rotation (degrees)")
    p.add_argument("--repeats", type=int, default=3, help="timed warps (the best is kept)")
    p.add_argument("--backend", choices=["auto", "numba", "numpy"], default="auto")
    p.add_argument("--dir", type=Path, default=None, help="scratch directory (default: temp)")
    args = p.parse_args(argv)
    import fitsio

    n = args.size
    rng = np.random.default_rng(2016)
    img, var, mask = _simulate(n, rng)
    in_wcs = _wcs(n, 0.258, args.rotation)
    out_wcs = _wcs(n, 0.25, 0.0)

    def pixel_map(x, y):
        ra, dec = out_wcs.wcs_pix2world(np.ravel(x), np.ravel(y), 0)
        xi, yi = in_wcs.wcs_world2pix(ra, dec, 0)
        return xi.reshape(np.shape(x)), yi.reshape(np.shape(x))

    backend = args.backend
    print(f"warp-speed: {n}x{n} input (0.258\"/px, rotated {args.rotation} deg) -> {n}x{n} "
          f"TAN grid (0.25\"/px), Lanczos-3, backend "
          f"{'numba' if (HAVE_NUMBA and backend != 'numpy') else 'numpy'}", flush=True)
    t0 = time.perf_counter()
    small = 256
    warp_image(img[:small, :small], var[:small, :small], mask[:small, :small], pixel_map,
               out_shape=(small, small), backend=backend)
    compile_s = time.perf_counter() - t0

    times, cpu = [], []
    res = None
    for _ in range(max(args.repeats, 1)):
        t0, c0 = time.perf_counter(), time.process_time()
        res = warp_image(img, var, mask, pixel_map, out_shape=(n, n), backend=backend)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    warp_s = min(times)
    cpu_s = min(cpu)
    mpix_s = n * n / warp_s / 1e6
    runs = ", ".join(f"{t:.2f}" for t in times)
    print(f"  ours : {warp_s:.2f} s per warp ({mpix_s:.1f} Mpix/s; runs {runs} s; CPU "
          f"{cpu_s:.2f} s; first call incl. compilation {compile_s:.2f} s)")
    print(f"         covariance factor {res.covariance_factor:.3f}, good fraction "
          f"{res.good_fraction:.3f}, map interpolation error {res.map_error:.2e} px")

    workdir = Path(tempfile.mkdtemp(prefix="warp-speed-", dir=args.dir))
    try:
        # the same work with FITS input and output, as SWarp does it
        fitsio.write(workdir / "chip.im.fits", img, clobber=True)
        fitsio.write(workdir / "chip.var.fits", var, clobber=True)
        fitsio.write(workdir / "chip.mk.fits", mask, clobber=True)
        t0, c0 = time.perf_counter(), time.process_time()
        r = warp_image(fitsio.read(workdir / "chip.im.fits"),
                       fitsio.read(workdir / "chip.var.fits"),
                       fitsio.read(workdir / "chip.mk.fits"), pixel_map, out_shape=(n, n),
                       backend=backend)
        fitsio.write(workdir / "warp.im.fits", r.image, clobber=True)
        fitsio.write(workdir / "warp.var.fits", r.variance, clobber=True)
        fitsio.write(workdir / "warp.mk.fits", r.mask, clobber=True)
        io_s = time.perf_counter() - t0
        io_cpu_s = time.process_time() - c0
        mpix_s_io = n * n / io_s / 1e6
        print(f"  ours with FITS read/write of image, variance and mask: {io_s:.2f} s "
              f"({mpix_s_io:.1f} Mpix/s; CPU {io_cpu_s:.2f} s)")

        swarp_mpix_s = flux_ratio = rms_sigma = swarp_cpu_s = None
        exe = peer("SWarp", "swarp")
        if exe is not None:
            swarp_s, swarp_cpu_s, out = _run_swarp(exe, workdir, n, in_wcs, out_wcs, img, var,
                                                   mask)
            swarp_mpix_s = n * n / swarp_s / 1e6
            sw = fitsio.read(out).astype(np.float64)
            good = ((res.mask & maskbits.BAD) == 0) & np.isfinite(sw) & (sw != 0)
            bright = good & (res.image > 2 * np.median(res.image[good]))
            flux_ratio = float(np.median(res.image[bright] / sw[bright]))
            diff = (res.image[good] - sw[good]) / np.sqrt(res.variance[good])
            rms_sigma = float(np.sqrt(np.mean(diff ** 2)))
            print(f"  SWarp: {swarp_s:.2f} s incl. its FITS I/O ({swarp_mpix_s:.1f} Mpix/s; "
                  f"CPU {swarp_cpu_s:.2f} s)")
            print(f"         ours/SWarp on bright pixels {flux_ratio:.4f} (both conserve flux: "
                  f"J = {res.jacobian:.4f}); rms difference {rms_sigma:.4f} sigma")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "mpix_s": round(mpix_s, 3),
        "mpix_s_io": round(mpix_s_io, 3),
        "swarp_mpix_s": None if swarp_mpix_s is None else round(swarp_mpix_s, 3),
        "speedup": None if swarp_mpix_s is None else round(mpix_s_io / swarp_mpix_s, 3),
        "cpu_s": round(cpu_s, 3),
        "cpu_s_io": round(io_cpu_s, 3),
        "swarp_cpu_s": None if swarp_cpu_s is None else round(swarp_cpu_s, 3),
        "covariance_factor": round(res.covariance_factor, 4),
        "good_fraction": round(res.good_fraction, 4),
        "map_error_px": res.map_error,
        "compile_s": round(compile_s, 3),
        "flux_ratio_swarp": flux_ratio,
        "rms_diff_swarp_sigma": rms_sigma,
        "peak_mb": round(peak_mb(), 1),
        "backend": "numba" if (HAVE_NUMBA and backend != "numpy") else "numpy",
    }
    return emit(result)


if __name__ == "__main__":  # pragma: no cover
    import sys

    run(sys.argv[1:])
