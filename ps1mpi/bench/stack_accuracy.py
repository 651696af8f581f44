"""Stack accuracy: flux of warped stars, stack variance, depth gain of N inputs, artefact rejection.

Simulated exposures of the test camera (chips with a GPC1-like relative distortion, their
TAN-SIP WCS from the focal-plane model, cell gaps masked) hold known stars (pixel-integrated
Gaussians) on a flat sky with Gaussian noise drawn from the variance; the first exposure also
carries cosmic rays and a satellite streak. Every exposure is warped onto one TEST.V1 skycell
with the warp stage's code (:func:`ps1mpi.stages.warp.warp_to_skycell`, Lanczos-3, zero point
25) and the warps are stacked with the stack stage's code
(:func:`ps1mpi.stages.stack.assemble_stack`, one rank). The same exposures without noise, and
the artefacts alone, are warped through the same maps to give the truth.

Figures (JSON keys):

- ``flux_bias``: median of (aperture flux of a star in a noise-free warp / its true flux at
  zero point 25) - 1, over every star and exposure (goal: |bias| < 0.001);
- ``norm_resid_width``: robust width (1.4826 MAD) of (stack - truth) / sqrt(stack variance)
  over the good pixels, the truth being the noise-free warps combined with the same weights
  and rejections (goal: 1);
- ``depth_gain_minus_ideal_mag``: 2.5 log10(sigma_single / sigma_stack) - 2.5 log10(sqrt(N)),
  sigma the scatter of PSF-weighted flux measurements of pure noise at random positions
  covered by every input (single: the median over the inputs) (goal: within 0.05 mag);
- ``artefact_rejected_fraction``: fraction of the pixels where the warped artefacts exceed
  5 sigma of their input that the rejection removed (goal: 1).

Extra keys: n_inputs, flux_bias_rms, stack_flux_bias, artefact_max_resid_sigma,
covariance_factor, map_error_px, warp_s, stack_s.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from scipy.signal import fftconvolve
from scipy.special import erf

from ..algorithms import maskbits
from ..algorithms.combine import RejectionResult, combine_images
from ..geometry.camera import load_camera
from ..geometry.focalplane import Distortion, FocalPlaneModel
from ..geometry.tessellation import load_tessellation
from ..infra.world import World
from ..stages.stack import assemble_stack
from ..stages.warp import ChipInput, flux_scale, warp_to_skycell
from .common import emit

ZPT_OBS = 28.0
EXPTIME = 30.0
SKY_E = 400.0        # sky per chip pixel (e-)
SIGMA_CHIP = 1.3     # Gaussian PSF sigma (chip pixels)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ps1mpi bench stack-accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", type=int, default=8, help="exposures stacked (default 8)")
    p.add_argument("--stars", type=int, default=150, help="stars in the skycell (default 150)")
    p.add_argument("--seed", type=int, default=2, help="random seed")
    return p.parse_args(argv)


def _render(shape, xs, ys, fluxes, sigma, half=9):
    """Pixel-integrated Gaussian stars on an image of ``shape``."""
    ny, nx = shape
    img = np.zeros(shape)
    s2 = sigma * math.sqrt(2.0)
    for x0, y0, f in zip(xs, ys, fluxes):
        ix, iy = int(round(x0)), int(round(y0))
        xa = np.arange(max(ix - half, 0), min(ix + half + 1, nx))
        ya = np.arange(max(iy - half, 0), min(iy + half + 1, ny))
        if xa.size == 0 or ya.size == 0:
            continue
        gx = 0.5 * (erf((xa + 0.5 - x0) / s2) - erf((xa - 0.5 - x0) / s2))
        gy = 0.5 * (erf((ya + 0.5 - y0) / s2) - erf((ya - 0.5 - y0) / s2))
        img[np.ix_(ya, xa)] += f * np.outer(gy, gx)
    return img


def _artefacts(shape, rng):
    """Cosmic rays (1-3 pixels, 2000-20000 e-) and a satellite streak (peak 300 e-)."""
    ny, nx = shape
    art = np.zeros(shape)
    for _ in range(40):
        x, y = rng.integers(2, nx - 3), rng.integers(2, ny - 3)
        art[y, x] += rng.uniform(2000, 20000)
        for _ in range(rng.integers(0, 3)):
            art[y + rng.integers(-1, 2), x + rng.integers(-1, 2)] += rng.uniform(500, 5000)
    yy, xx = np.mgrid[0:ny, 0:nx]
    d = (0.6 * xx - yy + 0.3 * ny) / math.hypot(0.6, 1.0)
    art += 300.0 * np.exp(-0.5 * d ** 2)
    return art


def _noise_sigma(noise, ok, psf, positions):
    """Scatter of PSF-weighted flux estimates of a noise image at the given positions."""
    conv = fftconvolve(np.where(ok, noise, 0.0), psf[::-1, ::-1], mode="same") / np.sum(psf ** 2)
    v = conv[positions]
    return 1.4826 * float(np.median(np.abs(v - np.median(v))))


def run(argv: list[str]) -> dict:
    args = _parse(argv)
    rng = np.random.default_rng(args.seed)
    cam = load_camera("testcam")
    tess = load_tessellation("TEST.V1")
    cell = tess.skycell(tess.skycells_at(120.0, 20.0)[0])
    ny, nx = cell.shape
    # stars uniformly over the skycell
    sx = rng.uniform(20, nx - 20, args.stars)
    sy = rng.uniform(20, ny - 20, args.stars)
    sra, sdec = cell.pixel_to_sky(sx, sy)
    sflux = 10 ** rng.uniform(3.5, 5.5, args.stars)          # e- per exposure
    print(f"skycell {cell.name} ({nx}x{ny}), {args.inputs} exposures of testcam, "
          f"{args.stars} stars", flush=True)

    warps, truths, arts = [], [], None
    flux_ratios = []
    t0 = time.perf_counter()
    cov, map_err = [], []
    for k in range(args.inputs):
        dra = rng.uniform(-20, 20) / 3600.0 / math.cos(math.radians(cell.dec_center))
        ddec = rng.uniform(-20, 20) / 3600.0
        model = FocalPlaneModel(cell.ra_center + dra, cell.dec_center + ddec,
                                rng.uniform(-3.0, 3.0), cam.pixel_scale,
                                Distortion.gpc1_like(amplitude=3.0, norm=808.0))
        scale = flux_scale(ZPT_OBS, EXPTIME)
        noisy, clean, art_in = [], [], []
        for chip in cam.chip_names:
            shape = (cam.chip_ny, cam.chip_nx)
            px, py = model.sky_to_pixel(cam, chip, sra, sdec)
            on = (px > -10) & (px < shape[1] + 10) & (py > -10) & (py < shape[0] + 10)
            truth = _render(shape, px[on], py[on], sflux[on], SIGMA_CHIP)
            yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
            mask = np.where(cam.cell_at(xx, yy) == "", maskbits.GAP, 0).astype(np.uint16)
            var = (SKY_E + truth).astype(np.float32)
            img = truth + rng.normal(0.0, 1.0, shape) * np.sqrt(var)
            art = _artefacts(shape, rng) if (k == 0 and chip == cam.chip_names[1]) else None
            if art is not None:
                img = img + art
            wcs = model.chip_wcs(cam, chip)
            zero = np.zeros(shape, np.float32)
            noisy.append(ChipInput(chip, img.astype(np.float32), var, mask, wcs, scale))
            clean.append(ChipInput(chip, truth.astype(np.float32), var, mask, wcs, scale))
            art_in.append(ChipInput(chip, art.astype(np.float32) if art is not None else zero,
                                    var, mask, wcs, scale))
        w = warp_to_skycell(noisy, cell)
        c = warp_to_skycell(clean, cell)
        warps.append(w)
        truths.append(c)
        cov.append(w.covariance_factor)
        map_err.append(w.map_error)
        if k == 0:
            arts = warp_to_skycell(art_in, cell).image
        # flux conservation on the noise-free warp: isolated stars fully on good pixels
        good = (c.mask & maskbits.BAD) == 0
        sig_sky = SIGMA_CHIP * cam.pixel_scale / tess.pixel_scale
        rad = 6.0 * sig_sky
        for i in range(args.stars):
            d2 = (sx - sx[i]) ** 2 + (sy - sy[i]) ** 2
            if np.sort(d2)[1] < (4 * rad) ** 2:
                continue
            ix, iy = int(round(sx[i])), int(round(sy[i]))
            r = int(math.ceil(rad)) + 1
            sl = (slice(iy - r, iy + r + 1), slice(ix - r, ix + r + 1))
            if not good[sl].all():
                continue
            yy, xx = np.mgrid[sl]
            inside = (xx - sx[i]) ** 2 + (yy - sy[i]) ** 2 <= rad * rad
            flux_ratios.append(float(c.image[sl][inside].astype(np.float64).sum())
                               / (sflux[i] * scale))
    t_warp = time.perf_counter() - t0

    n = len(warps)
    world = World.from_mpi(__import__("mpi4py.MPI", fromlist=["MPI"]).COMM_SELF)
    weights = np.array([1.0 / np.median(w.variance[(w.mask & maskbits.BAD) == 0]) for w in warps])
    t0 = time.perf_counter()
    asm = assemble_stack(world, lambda i, a, b: (warps[i].image[a:b], warps[i].variance[a:b],
                                                 warps[i].mask[a:b]),
                         n, (ny, nx), weights=weights, exptimes=np.full(n, EXPTIME),
                         keep_rejected=True)
    t_stack = time.perf_counter() - t0
    world.free()

    # truth stack: the noise-free warps combined with the same weights and rejections
    excluded = tuple(sorted(set(asm.dropped) | {i for i in range(n) if weights[i] <= 0}))
    rej = RejectionResult(rejected=asm.rejected, n_rejected=asm.rejected_pixels,
                          n_valid=asm.valid_pixels, excluded=excluded)
    truth = combine_images([t.image for t in truths], [w.variance for w in warps],
                           [w.mask for w in warps], weights=weights, dropped=asm.dropped,
                           rejection=rej)
    good = (asm.mask & maskbits.BAD) == 0
    z = (asm.image.astype(np.float64) - truth.image)[good] / np.sqrt(asm.variance[good])
    width = 1.4826 * float(np.median(np.abs(z - np.median(z))))

    # depth: PSF-weighted noise at positions covered by every input
    sig_sky = SIGMA_CHIP * cam.pixel_scale / tess.pixel_scale
    h = int(math.ceil(4 * sig_sky))
    g = np.arange(-h, h + 1)
    psf = np.exp(-(g[:, None] ** 2 + g[None, :] ** 2) / (2 * sig_sky ** 2))
    psf /= psf.sum()
    from scipy.ndimage import minimum_filter
    full = minimum_filter(((asm.n_inputs == n) & good).astype(np.uint8), size=2 * h + 1) > 0
    for w in warps:
        full &= minimum_filter(((w.mask & maskbits.BAD) == 0).astype(np.uint8), size=2 * h + 1) > 0
    yy, xx = np.nonzero(full)
    pick = rng.choice(yy.size, size=min(4000, yy.size), replace=False)
    pos = (yy[pick], xx[pick])
    single = [_noise_sigma(w.image - t.image, (w.mask & maskbits.BAD) == 0, psf, pos)
              for w, t in zip(warps, truths)]
    stack_sigma = _noise_sigma(asm.image - truth.image, good, psf, pos)
    gain = 2.5 * math.log10(float(np.median(single)) / stack_sigma)
    ideal = 2.5 * math.log10(math.sqrt(n))

    # artefacts: pixels where the warped artefacts exceed 5 sigma of their input
    w0 = warps[0]
    art_pix = (arts > 5.0 * np.sqrt(np.maximum(w0.variance, 1e-30))) & ((w0.mask & maskbits.BAD) == 0)
    art_frac = float(asm.rejected[0][art_pix].mean()) if art_pix.any() else float("nan")
    art_resid = float(np.max(np.abs((asm.image - truth.image)[art_pix & good])
                             / np.sqrt(asm.variance[art_pix & good]))) if (art_pix & good).any() \
        else float("nan")

    # stack photometry of the brightest stars
    bright = np.argsort(sflux)[-30:]
    rad = 6.0 * sig_sky
    ratios = []
    for i in bright:
        ix, iy = int(round(sx[i])), int(round(sy[i]))
        r = int(math.ceil(rad)) + 1
        sl = (slice(iy - r, iy + r + 1), slice(ix - r, ix + r + 1))
        if not good[sl].all():
            continue
        yy2, xx2 = np.mgrid[sl]
        inside = (xx2 - sx[i]) ** 2 + (yy2 - sy[i]) ** 2 <= rad * rad
        ratios.append(float(asm.image[sl][inside].astype(np.float64).sum())
                      / (sflux[i] * flux_scale(ZPT_OBS, EXPTIME)))

    fr = np.array(flux_ratios)
    result = {
        "flux_bias": float(np.median(fr) - 1.0),
        "flux_bias_rms": float(np.std(fr)),
        "norm_resid_width": width,
        "depth_gain_minus_ideal_mag": gain - ideal,
        "artefact_rejected_fraction": art_frac,
        "artefact_max_resid_sigma": art_resid,
        "stack_flux_bias": float(np.median(ratios) - 1.0) if ratios else float("nan"),
        "n_inputs": n,
        "covariance_factor": float(np.median(cov)),
        "map_error_px": float(np.nanmax(map_err)),
        "warp_s": t_warp,
        "stack_s": t_stack,
    }
    print(f"flux conservation: median ratio - 1 = {result['flux_bias']:+.2e} "
          f"(rms {result['flux_bias_rms']:.1e}, {fr.size} star measurements); stack: "
          f"{result['stack_flux_bias']:+.2e}")
    print(f"stack normalised residuals: width {width:.4f} over {z.size} good pixels")
    print(f"depth gain of {n} inputs: {gain:.4f} mag, ideal {ideal:.4f} mag "
          f"(difference {gain - ideal:+.4f}); single-input sigma median {np.median(single):.4g}, "
          f"stack {stack_sigma:.4g}")
    print(f"artefacts: {art_frac:.4f} of {int(art_pix.sum())} artefact pixels rejected; largest "
          f"stack residual there {art_resid:.2f} sigma; dropped inputs {list(asm.dropped)}")
    print(f"warping {t_warp:.1f} s ({3 * n} warps incl. truth), stacking {t_stack:.1f} s")
    return emit(result)
