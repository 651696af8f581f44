"""Chip photometry accuracy: errors against the Cramer-Rao bound, completeness, false detections.

``ps1mpi bench chip-accuracy [--chips N] [--seeing ARCSEC] [--seed S]``

Each chip is made by the simulator's own machinery: stars on a jittered grid (30 px apart,
isolated) with fluxes log-uniform from S/N ~ 2 to ~ 1000, rendered with the simulator's PSF
(Moffat core plus wide wing, varying over the focal plane: *not* the pipeline's PS1_V1) on a
flat sky, exposed through the simulated test camera (flat field, dark current, bias
structure, nonlinearity, read noise, Poisson noise, cosmic rays, saturation;
:func:`ps1mpi.sim.instrument.expose_chip`). The chip is detrended with the instrument's true
signatures as masters (so that master noise does not enter: this measures the measurement),
then sources are found and measured exactly as the chip stage does
(:func:`ps1mpi.algorithms.catalog.find_and_measure`).

Figures:

* Cramer-Rao bounds per star from the true PSF (pixel-integrated, derivatives by finite
  differences) and the per-pixel variance ``V_bg + f P`` (``V_bg`` from the chip's variance
  image around the star): Fisher matrix of (flux, x, y). In bins of S/N the robust scatter
  of the PSF flux (after one global scale, the PSF normalisation, which a zero point absorbs)
  and of the positions divided by their bound; and the bias in units of the bound.
* Pull widths: (flux - scale x truth) / PSF_INST_FLUX_SIG, and for x, y.
* Completeness versus magnitude (a detection within 1.5 px), ``m50`` from an erfc fit, and
  the theoretical 5-sigma limit ``m5`` (PSF-fit S/N = 5 at a known position, background
  limited) from the same bounds: ``m50_minus_m5sigma``.
* False detections per chip: detections above threshold farther than 3 px from every
  injected star.

JSON keys: flux_err_over_crlb, pos_err_over_crlb (medians over S/N bins of S/N >= 10),
flux_pull_width, m50_minus_m5sigma, false_per_chip (and false_clean_per_chip: those without a
calibration-bad flag), plus details.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np

from ps1mpi.algorithms import maskbits
from ps1mpi.algorithms.catalog import CALIBRATION_BAD, MeasureOptions, find_and_measure
from ps1mpi.algorithms.detrend import NonlinearityTable, detrend_cells

__all__ = ["truth_detrend_kwargs", "star_light", "cramer_rao", "measure_chip", "run"]

SNR_EDGES = np.array([5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 1e9])


def truth_detrend_kwargs(inst, chip: str) -> dict[str, Any]:
    """Keyword arguments of :func:`~ps1mpi.algorithms.detrend.detrend_cells` for a simulated
    chip with the instrument's true signatures as masters (bias pattern, dark, flat, static
    defects, nonlinearity, gains, read noise, saturation)."""
    cam = inst.camera
    sig = inst.chip(chip)
    el = sig.cells
    y0, y1, x0, x1 = cam.datasec
    dark_adu = sig.dark.copy()
    for cell, (sy, sx) in inst.cell_slices().items():
        dark_adu[sy, sx] /= np.float32(el[cell].gain)
    nonlin = {}
    for cell, e in el.items():
        s = np.linspace(0.0, 1.3 * e.linear_range, 256)
        meas = s * (1.0 - e.nonlin * (s / e.linear_range) ** 2)
        keep = np.concatenate([[True], np.diff(meas) > 0])
        nonlin[cell] = NonlinearityTable.from_curve(s[keep], meas[keep])
    return dict(
        datasec=cam.datasec, biassec=cam.biassec,
        cell_origins={c: cam.cell_origin(c) for c in cam.cell_names},
        chip_shape=(cam.chip_ny, cam.chip_nx),
        gain={c: e.gain for c, e in el.items()},
        read_noise={c: e.read_noise for c, e in el.items()},
        saturation={c: e.saturate for c, e in el.items()},
        bias={c: sig.bias_pattern[c][y0:y1, x0:x1] for c in cam.cell_names},
        dark=np.ascontiguousarray(dark_adu, np.float32),
        flat=np.ascontiguousarray(sig.flat, np.float32),
        static_mask=np.ascontiguousarray(sig.defects, np.uint16), nonlinearity=nonlin)


def _psf_at(psf, cam, chip: str, x: np.ndarray, y: np.ndarray):
    from ps1mpi.sim import psf as P

    lay = cam.chip(chip)
    X, Y = cam.chip_to_focal(chip, x, y)
    fw, e1, e2 = psf.at_focal(X, Y)
    e1, e2 = P.shape_to_chip(e1, e2, lay.xparity, lay.yparity)
    return fw, e1, e2


def star_light(inst, chip: str, psf, x: np.ndarray, y: np.ndarray, flux: np.ndarray, *,
               sky_e: float) -> tuple[np.ndarray, np.ndarray]:
    """Light (e-, unit response) of a flat sky plus stars rendered with the simulator's PSF.

    Returns
    -------
    light : ndarray, float32, chip shape
    captured : ndarray
        Fraction of each star's flux inside its rendered stamp.
    """
    from ps1mpi.sim import psf as P

    cam = inst.camera
    light = np.full((cam.chip_ny, cam.chip_nx), np.float32(sky_e))
    fw, e1, e2 = _psf_at(psf, cam, chip, x, y)
    rad = P.stamp_radius(flux, fw, psf=psf, threshold=0.02 * math.sqrt(sky_e))
    captured = np.zeros(x.size)
    for r in np.unique(rad):
        s = np.flatnonzero(rad == r)
        for a in range(0, s.size, 500):
            k = s[a:a + 500]
            st, ix, iy = P.render_point_stamps(x[k], y[k], fw[k], e1[k], e2[k], psf=psf,
                                               radius=int(r))
            P.add_stamps(light, st, ix, iy, flux[k])
            captured[k] = st.sum(axis=(1, 2))
    return light, captured


def cramer_rao(psf, cam, chip: str, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
               v_bg: np.ndarray, *, radius: int = 12, h: float = 0.02
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cramer-Rao bounds of (flux, x, y) for PSF fits of stars with the true PSF.

    Parameters
    ----------
    psf : ps1mpi.sim.psf.ExposurePSF
    cam : Camera
    chip : str
    x, y : ndarray
        True positions (chip pixels).
    flux : ndarray
        True fluxes (e-, unit response).
    v_bg : ndarray
        Background variance per pixel at each star (e-^2).
    radius : int
        Half-size of the stamps summed over (pixels).
    h : float
        Finite-difference step for the position derivatives (pixels).

    Returns
    -------
    sig_f, sig_x, sig_y : ndarray
        Bounds on the flux (e-) and position (pixels) errors.
    sig_f0 : ndarray
        Flux bound at a known position, background limited (flux -> 0): the 5-sigma flux is
        ``5 sig_f0``.
    """
    from ps1mpi.sim import psf as P

    fw, e1, e2 = _psf_at(psf, cam, chip, x, y)
    out = [np.zeros(x.size) for _ in range(4)]
    for a in range(0, x.size, 400):
        k = slice(a, a + 400)
        # the stamp grid is fixed by round(x); shifting the star by +-h keeps the same pixels
        base, ix, iy = P.render_point_stamps(x[k], y[k], fw[k], e1[k], e2[k], psf=psf,
                                             radius=radius)
        def shifted(dx, dy):
            st, jx, jy = P.render_point_stamps(x[k] + dx, y[k] + dy, fw[k], e1[k], e2[k],
                                               psf=psf, radius=radius)
            same = (jx == ix) & (jy == iy)
            return st, same
        sxp, okxp = shifted(h, 0.0)
        sxm, okxm = shifted(-h, 0.0)
        syp, okyp = shifted(0.0, h)
        sym, okym = shifted(0.0, -h)
        p = base.astype(np.float64)
        dpx = (sxp.astype(np.float64) - sxm) / (2 * h)
        dpy = (syp.astype(np.float64) - sym) / (2 * h)
        bad = ~(okxp & okxm & okyp & okym)
        if bad.any():   # a shift crossed a pixel boundary: one-sided difference on that side
            dpx[bad] = (sxp[bad].astype(np.float64) - p[bad]) / h
            dpy[bad] = (syp[bad].astype(np.float64) - p[bad]) / h
        f = flux[k][:, None, None]
        var = v_bg[k][:, None, None] + f * np.maximum(p, 0.0)
        g = [p, f * dpx, f * dpy]
        fish = np.empty((p.shape[0], 3, 3))
        for i in range(3):
            for j in range(i, 3):
                fish[:, i, j] = fish[:, j, i] = np.sum(g[i] * g[j] / var, axis=(1, 2))
        cov = np.linalg.inv(fish)
        out[0][k] = np.sqrt(cov[:, 0, 0])
        out[1][k] = np.sqrt(cov[:, 1, 1])
        out[2][k] = np.sqrt(cov[:, 2, 2])
        out[3][k] = 1.0 / np.sqrt(np.sum(p * p / v_bg[k][:, None, None], axis=(1, 2)))
    return out[0], out[1], out[2], out[3]


def _annulus_median(arr: np.ndarray, x: np.ndarray, y: np.ndarray, r_in: float, r_out: float,
                    valid: np.ndarray) -> np.ndarray:
    R = int(math.ceil(r_out))
    g = np.arange(-R, R + 1)
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    yy = np.clip(iy[:, None, None] + g[None, :, None], 0, arr.shape[0] - 1)
    xx = np.clip(ix[:, None, None] + g[None, None, :], 0, arr.shape[1] - 1)
    r2 = g[None, :, None] ** 2 + g[None, None, :] ** 2
    ring = (r2 >= r_in ** 2) & (r2 <= r_out ** 2) & valid[yy, xx]
    vals = np.where(ring, arr[yy, xx], np.nan).reshape(x.size, -1)
    out = np.full(x.size, np.nan)
    some = np.any(np.isfinite(vals), axis=1)
    out[some] = np.nanmedian(vals[some], axis=1)
    return out


def measure_chip(inst, chip: str, psf, *, rng: np.random.Generator, sky_e: float,
                 exptime: float, spacing: float = 30.0, snr_range=(2.0, 1000.0),
                 options: MeasureOptions | None = None) -> dict[str, Any]:
    """Simulate one chip with injected stars, detrend and measure it; truth and catalog."""
    from ps1mpi.sim.instrument import expose_chip

    cam = inst.camera
    ny, nx = cam.chip_ny, cam.chip_nx
    gx = np.arange(spacing / 2 + 8, nx - 8, spacing)
    gy = np.arange(spacing / 2 + 8, ny - 8, spacing)
    x = (gx[None, :] + np.zeros((gy.size, 1))).ravel() + rng.uniform(-4, 4, gx.size * gy.size)
    y = (gy[:, None] + np.zeros((1, gx.size))).ravel() + rng.uniform(-4, 4, gx.size * gy.size)
    fw, _, _ = _psf_at(psf, cam, chip, x, y)
    rn_e = float(np.median([e.read_noise * e.gain for e in inst.chip(chip).cells.values()]))
    sig_bg = math.sqrt(sky_e + rn_e ** 2)
    f_per_snr = sig_bg * math.sqrt(4 * math.pi) * np.median(fw) / 2.3548 * 1.15
    lo, hi = np.log10(np.asarray(snr_range) * f_per_snr)
    flux = 10 ** rng.uniform(lo, hi, x.size)
    light, captured = star_light(inst, chip, psf, x, y, flux, sky_e=sky_e)
    res = expose_chip(inst, chip, light, exptime=exptime, dark_time=exptime, rng=rng,
                      cosmic_rays=True, crosstalk=False)
    kw = truth_detrend_kwargs(inst, chip)
    det = detrend_cells(res.cells, dark_time=exptime, **kw)
    opts = options or MeasureOptions(fwhm_guess=float(np.median(fw)) * 1.1)
    t0 = time.perf_counter()
    meas = find_and_measure(det.image, det.variance, det.mask, gain=1.0, options=opts)
    t_meas = time.perf_counter() - t0
    usable = (det.mask & maskbits.BAD) == 0
    v_bg = _annulus_median(det.variance, x, y, 12.0, 15.0, usable & (det.variance > 0))
    sig_f, sig_x, sig_y, sig_f0 = cramer_rao(psf, cam, chip, x, y, flux,
                                             np.where(np.isfinite(v_bg), v_bg, sig_bg ** 2))
    # stars whose core (1.5 FWHM) or fit region (3 FWHM) touches a masked pixel
    R = int(math.ceil(3 * np.max(fw)))
    g = np.arange(-R, R + 1)
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    yy = np.clip(iy[:, None, None] + g[None, :, None], 0, ny - 1)
    xx = np.clip(ix[:, None, None] + g[None, None, :], 0, nx - 1)
    r2 = (g[None, :, None] ** 2 + g[None, None, :] ** 2)
    badpix = ~usable[yy, xx]
    core_bad = np.any(badpix & (r2 <= (1.5 * fw[:, None, None]) ** 2), axis=(1, 2))
    fit_bad = np.any(badpix & (r2 <= (3.0 * fw[:, None, None]) ** 2), axis=(1, 2))
    return dict(x=x, y=y, flux=flux, captured=captured, fwhm=fw, sig_f=sig_f, sig_x=sig_x,
                sig_y=sig_y, sig_f0=sig_f0, core_bad=core_bad, fit_bad=fit_bad,
                catalog=meas.catalog, problem=meas.problem, t_measure=t_meas,
                n_det=int(meas.detections.size))


def _robust_std(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 3:
        return float("nan")
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def _erfc_fit(mag: np.ndarray, found: np.ndarray) -> tuple[float, float]:
    """m50 and width of completeness(m) = 0.5 erfc((m - m50) / (sqrt(2) w)), maximum likelihood."""
    from scipy.optimize import minimize
    from scipy.special import erfc

    def nll(p):
        c = np.clip(0.5 * erfc((mag - p[0]) / (math.sqrt(2) * abs(p[1]) + 1e-6)), 1e-9, 1 - 1e-9)
        return -np.sum(np.where(found, np.log(c), np.log(1 - c)))

    order = np.argsort(mag)
    cum = np.cumsum(found[order][::-1])[::-1] / np.arange(mag.size, 0, -1)
    start = float(mag[order][np.argmin(np.abs(cum - 0.5))])
    best = minimize(nll, [start, 0.2], method="Nelder-Mead",
                    options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 2000})
    return float(best.x[0]), float(abs(best.x[1]))


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry: print the figures, then one JSON line."""
    from scipy.spatial import cKDTree

    from ps1mpi.bench.common import emit
    from ps1mpi.geometry.camera import load_camera
    from ps1mpi.sim.instrument import Instrument
    from ps1mpi.sim.psf import ExposurePSF

    ap = argparse.ArgumentParser(prog="ps1mpi bench chip-accuracy",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--chips", type=int, default=8, help="simulated chips (test camera)")
    ap.add_argument("--seeing", type=float, default=1.0, help="seeing FWHM (arcsec)")
    ap.add_argument("--sky", type=float, default=900.0, help="sky (e- per pixel)")
    ap.add_argument("--exptime", type=float, default=40.0, help="exposure time (s)")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)

    cam = load_camera("testcam")
    inst = Instrument(cam, seed=args.seed)
    psf = ExposurePSF(seeing=args.seeing, field_radius=inst.field_radius,
                      pixel_scale=cam.pixel_scale)
    rng = np.random.default_rng(args.seed)
    rows = []
    false_counts: list[int] = []
    false_clean: list[int] = []
    t0 = time.perf_counter()
    for k in range(args.chips):
        chip = cam.chip_names[k % len(cam.chip_names)]
        r = measure_chip(inst, chip, psf, rng=rng, sky_e=args.sky, exptime=args.exptime)
        cat = r["catalog"]
        tree = cKDTree(np.column_stack([cat["X_PSF"], cat["Y_PSF"]])) if cat.size else None
        if tree is not None:
            d, j = tree.query(np.column_stack([r["x"], r["y"]]))
        else:
            d, j = np.full(r["x"].size, np.inf), np.zeros(r["x"].size, int)
        found = d < 1.5
        star_tree = cKDTree(np.column_stack([r["x"], r["y"]]))
        dd, _ = star_tree.query(np.column_stack([cat["X_PSF"], cat["Y_PSF"]])) if cat.size \
            else (np.zeros(0), None)
        false_counts.append(int(np.count_nonzero(dd > 3.0)))
        false_clean.append(int(np.count_nonzero((dd > 3.0) & ((cat["FLAGS"].astype(np.int64)
                                                               & CALIBRATION_BAD) == 0))))
        c = cat[np.where(found, j, 0)] if cat.size else None
        for i in range(r["x"].size):
            rows.append((k, r["x"][i], r["y"][i], r["flux"][i], r["captured"][i], r["sig_f"][i],
                         r["sig_x"][i], r["sig_y"][i], r["sig_f0"][i], r["core_bad"][i],
                         r["fit_bad"][i], found[i],
                         c["PSF_INST_FLUX"][i] if found[i] else np.nan,
                         c["PSF_INST_FLUX_SIG"][i] if found[i] else np.nan,
                         c["X_PSF"][i] if found[i] else np.nan,
                         c["Y_PSF"][i] if found[i] else np.nan,
                         c["X_PSF_SIG"][i] if found[i] else np.nan,
                         c["Y_PSF_SIG"][i] if found[i] else np.nan,
                         int(c["FLAGS"][i]) if found[i] else -1))
        print(f"chip {k} ({chip}): {r['x'].size} stars, {r['n_det']} detections, "
              f"{false_counts[-1]} false, measured in {r['t_measure']:.1f} s"
              + (f" [{r['problem']}]" if r["problem"] else ""), flush=True)
    names = ["chip", "x", "y", "f", "cap", "sf", "sx", "sy", "sf0", "core_bad", "fit_bad",
             "found", "fm", "fms", "xm", "ym", "xms", "yms", "flags"]
    t = {n: np.array([row[i] for row in rows]) for i, n in enumerate(names)}
    snr = t["f"] / t["sf"]
    good = (t["found"] & ~t["fit_bad"] & (t["flags"] >= 0)
            & ((t["flags"].astype(np.int64) & CALIBRATION_BAD) == 0))
    # the PSF normalisation (flux within the model's reference radius, aperture corrected)
    scale_sel = good & (snr > 50) & (snr < 1000)
    scale = float(np.median(t["fm"][scale_sel] / t["f"][scale_sel])) if scale_sel.any() else 1.0
    # the bounds are in injected-flux units: bring the measured fluxes to those units first
    # (dividing the difference by the bound alone would scale the ratio by ``scale``)
    zf = (t["fm"] / scale - t["f"]) / t["sf"]
    zx = (t["xm"] - t["x"]) / t["sx"]
    zy = (t["ym"] - t["y"]) / t["sy"]
    print(f"{len(rows)} stars on {args.chips} chips ({time.perf_counter() - t0:.0f} s); "
          f"PSF flux / injected flux = {scale:.4f}")
    print(f"{'S/N bin':>14} {'n':>5} {'flux/CRLB':>10} {'bias/CRLB':>10} {'pos/CRLB':>9} "
          f"{'posbias':>8} {'flux pull':>9}")
    bins = []
    for lo, hi in zip(SNR_EDGES[:-1], SNR_EDGES[1:]):
        s = good & (snr >= lo) & (snr < hi)
        if s.sum() < 10:
            continue
        rf = _robust_std(zf[s])
        rp = math.sqrt(0.5 * (_robust_std(zx[s]) ** 2 + _robust_std(zy[s]) ** 2))
        pull = (t["fm"][s] - scale * t["f"][s]) / t["fms"][s]
        bins.append(dict(snr_lo=float(lo), snr_hi=float(hi), n=int(s.sum()), flux_over_crlb=rf,
                         flux_bias_over_crlb=float(np.median(zf[s])), pos_over_crlb=rp,
                         pos_bias_over_crlb=float(np.median(np.concatenate([zx[s], zy[s]]))),
                         flux_pull_width=_robust_std(pull)))
        b = bins[-1]
        print(f"{lo:6.0f}-{hi:<7.0f} {b['n']:5d} {rf:10.3f} {b['flux_bias_over_crlb']:10.3f} "
              f"{rp:9.3f} {b['pos_bias_over_crlb']:8.3f} {b['flux_pull_width']:9.3f}")
    use = [b for b in bins if b["snr_lo"] >= 10]
    flux_ratio = float(np.median([b["flux_over_crlb"] for b in use])) if use else float("nan")
    pos_ratio = float(np.median([b["pos_over_crlb"] for b in use])) if use else float("nan")
    sel = good & (snr >= 5)
    pull_f = (t["fm"][sel] - scale * t["f"][sel]) / t["fms"][sel]
    psel = sel & (t["xms"] > 0) & (t["yms"] > 0)          # centres that were fitted
    pull_x = np.concatenate([zx[psel] * t["sx"][psel] / t["xms"][psel],
                             zy[psel] * t["sy"][psel] / t["yms"][psel]])
    flux_pull = _robust_std(pull_f)
    pos_pull = _robust_std(pull_x)
    # completeness against the injected magnitude; theoretical 5-sigma limit
    comp = ~t["core_bad"]
    mag = -2.5 * np.log10(t["f"][comp])
    m50, width = _erfc_fit(mag, t["found"][comp])
    m5 = float(np.median(-2.5 * np.log10(5.0 * t["sf0"][comp])))
    print(f"completeness: m50 = {m50:.3f} (width {width:.3f} mag), theoretical 5-sigma "
          f"m5 = {m5:.3f}, m50 - m5 = {m50 - m5:+.3f} mag (instrumental)")
    for mlo in np.arange(np.floor((m5 - 1.0) * 4) / 4, m5 + 1.0, 0.25):
        s = (mag >= mlo) & (mag < mlo + 0.25)
        if s.any():
            print(f"  m {mlo:7.2f}..{mlo + 0.25:7.2f}: {t['found'][comp][s].mean():6.1%} "
                  f"of {s.sum()}")
    false_per_chip = float(np.mean(false_counts))
    false_clean_per_chip = float(np.mean(false_clean))
    print(f"pull widths: flux {flux_pull:.3f}, position {pos_pull:.3f}; false detections per "
          f"chip {false_per_chip:.2f}, of which without calibration-bad flags "
          f"{false_clean_per_chip:.2f} ({cam.chip_nx}x{cam.chip_ny} px chips)")
    return emit({"flux_err_over_crlb": flux_ratio, "pos_err_over_crlb": pos_ratio,
                 "flux_pull_width": flux_pull, "pos_pull_width": pos_pull,
                 "m50_minus_m5sigma": m50 - m5, "m50": m50, "m5sigma": m5,
                 "completeness_width_mag": width, "false_per_chip": false_per_chip,
                 "false_clean_per_chip": false_clean_per_chip,
                 "chip_mpix": cam.chip_nx * cam.chip_ny / 1e6,
                 "flux_scale": scale, "n_stars": int(len(rows)), "chips": args.chips,
                 "seeing_arcsec": args.seeing, "bins": bins})


if __name__ == "__main__":
    run()
